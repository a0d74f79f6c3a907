//! Tenant isolation, cell by cell: 3 tenants × {tenant admin, maintainer,
//! developer, reader, anonymous, user of the tenant a repository is shared with,
//! user of an unrelated tenant} × {private, public, shared, in a shared namespace}
//! repositories × {pull, push, delete, list tags, catalog, and the management
//! API's repository detail, listing, tag listing, update and shared-with-me
//! listing, namespace visibility, the namespace's shares, the owning tenant's
//! quotas, the repository's and the namespace's retention policy, retention
//! runs, the namespace's plugin instance, its delivery log and the plugin listing, the
//! security audit log, the owning tenant's maintainer's tokens and disabling
//! them, the `/registry/v1` and `/api/console` adapters}. Every cell is asserted.

mod common;

#[path = "../../plugins/tests/support/mod.rs"]
mod support;

use common::*;
use serde_json::json;

const TENANTS: [&str; 3] = ["acme", "beta", "gamma"];
const ROLES: [(&str, &str); 4] = [("admin", "tenant-admin"), ("maint", "maintainer"), ("dev", "developer"), ("reader", "reader")];
const OPS: [&str; 25] = [
    "pull",
    "push",
    "delete",
    "tags",
    "catalog",
    "api-get",
    "api-list",
    "api-tags",
    "api-update",
    "api-namespace",
    "compat-tags",
    "compat-mine",
    "console-images",
    "api-shared",
    "api-ns-shares",
    "api-quota",
    "api-retention",
    "api-retention-runs",
    "api-ns-retention",
    "api-plugin",
    "api-plugin-list",
    "api-plugin-log",
    "api-audit",
    "api-user-tokens",
    "api-user-disable",
];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Who {
    Role(usize),
    Anonymous,
    /// A developer of the tenant the shared repository is shared with.
    ShareTenant,
    /// A developer of a tenant with no grant at all.
    Stranger,
}

fn password(user: &str) -> String {
    format!("{user}-password")
}

/// What the default policy promises for one cell.
fn expected(who: Who, repo_kind: &str, op: &str) -> bool {
    // The management API takes no anonymous calls, public repositories included.
    // Nor the catalog: an anonymous caller is challenged for its scope.
    if who == Who::Anonymous && (op.starts_with("api-") || op.starts_with("compat-") || op == "catalog") {
        return false;
    }
    // A namespace is visible to its tenant's members only (not through a public
    // or shared repository in it).
    if op == "api-namespace" || op == "console-images" || op == "api-quota" || op == "api-ns-retention" {
        return matches!(who, Who::Role(_));
    }
    // The security audit log is the platform admin's alone.
    if op == "api-audit" {
        return false;
    }
    // A user's tokens: the user's own and their tenant admin's to see; disabling
    // the user is the tenant admin's (not their own).
    if op == "api-user-tokens" {
        return matches!(who, Who::Role(0) | Who::Role(1));
    }
    if op == "api-user-disable" {
        return who == Who::Role(0);
    }
    // A namespace's shares and plugin instances are its administrator's to see.
    if op == "api-ns-shares" || op == "api-plugin" || op == "api-plugin-list" || op == "api-plugin-log" {
        return who == Who::Role(0);
    }
    // A repository in a namespace shared with a tenant is shared with it.
    let repo_kind = if repo_kind == "nsshared" { "shared" } else { repo_kind };
    // Repositories shared with my tenant: exactly the ones shared with it.
    if op == "api-shared" {
        return who == Who::ShareTenant && repo_kind == "shared";
    }
    if op == "compat-mine" {
        return expected(who, repo_kind, "push");
    }
    let read = matches!(
        op,
        "pull" | "tags" | "catalog" | "api-get" | "api-list" | "api-tags" | "compat-tags" | "api-retention" | "api-retention-runs"
    );
    match who {
        Who::Role(0) => true,
        Who::Role(1) => true,
        Who::Role(2) => op != "delete",
        Who::Role(3) => read,
        Who::Role(_) => unreachable!(),
        Who::Anonymous => read && repo_kind == "public",
        Who::ShareTenant => read && (repo_kind == "public" || repo_kind == "shared"),
        Who::Stranger => read && repo_kind == "public",
    }
}

async fn setup(s: &Server, data: &std::path::Path) -> Vec<(String, String, String)> {
    let admin = client();
    // A plugin module every namespace gets an instance of (a gate that allows).
    support::install(&data.join("plugins"), "berth_hostile", "hostile", "hooks = [\"gate\"]\n[config.mode]\n");
    let r = admin.post(s.url("/api/v1/plugins/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for (i, t) in TENANTS.iter().enumerate() {
        let r = admin.post(s.url("/api/v1/tenants")).json(&json!({"name": t})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        // Tenant admins are created by the platform admin; they create the rest.
        let ta = format!("{t}-admin");
        let r = admin
            .post(s.url(&format!("/api/v1/tenants/{t}/users")))
            .json(&json!({"name": ta, "password": password(&ta), "role": "tenant-admin"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let tac = client_as(&ta, &password(&ta));
        for (suffix, role) in &ROLES[1..] {
            let u = format!("{t}-{suffix}");
            let r = tac
                .post(s.url(&format!("/api/v1/tenants/{t}/users")))
                .json(&json!({"name": u, "password": password(&u), "role": role}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        }
        // A tenant admin cannot create users in another tenant.
        let other = TENANTS[(i + 1) % 3];
        let r = tac
            .post(s.url(&format!("/api/v1/tenants/{other}/users")))
            .json(&json!({"name": format!("{t}-intruder"), "password": "intruder-password", "role": "reader"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    // Each tenant's maintainer pushes three repositories; its admin makes one
    // public and shares one with the next tenant.
    let mut repos = vec![];
    for (i, t) in TENANTS.iter().enumerate() {
        let m = client_as(&format!("{t}-maint"), &password(&format!("{t}-maint")));
        let ta = client_as(&format!("{t}-admin"), &password(&format!("{t}-admin")));
        for kind in ["private", "public", "shared"] {
            let repo = format!("{t}/{kind}");
            push_image(&m, s, &repo, "v1", 100 + i as u64, json!({})).await;
            // A retention policy (disabled), so reading it answers 200 where allowed.
            let r = ta
                .put(s.url(&format!("/api/v1/repositories/{repo}/-/retention")))
                .json(&json!({"keep_last": 100, "enabled": false}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
            repos.push((t.to_string(), kind.to_string(), repo));
        }
        // A second namespace, shared as a whole with the next tenant.
        let ns = format!("{t}-ns");
        let r = ta.post(s.url("/api/v1/namespaces")).json(&json!({"name": ns})).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        push_image(&m, s, &format!("{ns}/app"), "v1", 200 + i as u64, json!({})).await;
        let r = ta
            .put(s.url(&format!("/api/v1/repositories/{ns}/app/-/retention")))
            .json(&json!({"keep_last": 100, "enabled": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = ta.put(s.url(&format!("/api/v1/namespaces/{ns}/shares/{}", TENANTS[(i + 1) % 3]))).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        repos.push((t.to_string(), "nsshared".to_string(), format!("{ns}/app")));
        // Namespace retention policies (disabled), readable by the tenant's
        // members; a plugin instance per namespace, its administrator's.
        for n in [t.to_string(), ns.clone()] {
            let r = ta
                .put(s.url(&format!("/api/v1/plugins/instances/{n}-plugin")))
                .json(&json!({"module": "hostile", "scope": format!("namespace:{n}"), "hooks": ["gate"], "config": {"mode": "allow"}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
            let r = ta
                .put(s.url(&format!("/api/v1/namespaces/{n}/retention")))
                .json(&json!({"keep_last": 100, "enabled": false}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        let r = ta.put(s.url(&format!("/api/v1/repositories/{t}/public/visibility"))).json(&json!({"public": true})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let next = TENANTS[(i + 1) % 3];
        let r = ta.put(s.url(&format!("/api/v1/repositories/{t}/shared/shares/{next}"))).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        // A maintainer is not a repository admin.
        let r = m.put(s.url(&format!("/api/v1/repositories/{t}/private/visibility"))).json(&json!({"public": true})).send().await.unwrap();
        assert_eq!(r.status(), 403);
    }
    repos
}

fn caller(owner: usize, who: Who) -> Option<String> {
    match who {
        Who::Role(i) => Some(format!("{}-{}", TENANTS[owner], ROLES[i].0)),
        Who::Anonymous => None,
        Who::ShareTenant => Some(format!("{}-dev", TENANTS[(owner + 1) % 3])),
        Who::Stranger => Some(format!("{}-dev", TENANTS[(owner + 2) % 3])),
    }
}

/// Perform one operation; `true` if it was allowed.
async fn attempt(s: &Server, c: &reqwest::Client, repo: &str, op: &str, seed: u64) -> bool {
    let denied = |code: u16| code == 401 || code == 403;
    match op {
        "pull" => {
            let r = c.get(s.url(&format!("/v2/{repo}/manifests/v1"))).header("accept", OCI_MANIFEST).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code), "pull {repo}: {code}");
            code == 200
        }
        "push" => {
            let data = bytes(seed, 64);
            let r = c.post(s.url(&format!("/v2/{repo}/blobs/uploads/?digest={}", sha256(&data)))).body(data).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 201 || denied(code), "push {repo}: {code}");
            code == 201
        }
        "delete" => {
            // A blob that does not exist: allowed callers get 404, refused ones 401/403.
            let d = sha256(&bytes(seed ^ 0xdead, 8));
            let r = c.delete(s.url(&format!("/v2/{repo}/blobs/{d}"))).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 404 || denied(code), "delete {repo}: {code}");
            code == 404
        }
        "tags" => {
            let r = c.get(s.url(&format!("/v2/{repo}/tags/list"))).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code), "tags {repo}: {code}");
            code == 200
        }
        "catalog" => {
            let r = c.get(s.url("/v2/_catalog")).send().await.unwrap();
            if r.status() == 401 {
                return false;
            }
            assert_eq!(r.status(), 200);
            let v: serde_json::Value = r.json().await.unwrap();
            v["repositories"].as_array().unwrap().iter().any(|x| x == repo)
        }
        "api-get" | "api-tags" => {
            let sub = if op == "api-tags" { "/-/tags" } else { "" };
            let r = c.get(s.url(&format!("/api/v1/repositories/{repo}{sub}"))).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code), "{op} {repo}: {code}");
            code == 200
        }
        "api-namespace" => {
            let ns = repo.split('/').next().unwrap();
            let r = c.get(s.url(&format!("/api/v1/namespaces/{ns}"))).send().await.unwrap();
            let code = r.status().as_u16();
            // Unknown and invisible answer alike.
            assert!(code == 200 || code == 404 || code == 401, "{op} {ns}: {code}");
            let listed = if code == 401 {
                false
            } else {
                let v: serde_json::Value = c.get(s.url("/api/v1/namespaces")).send().await.unwrap().json().await.unwrap();
                v["items"].as_array().unwrap().iter().any(|x| x["name"] == ns)
            };
            assert_eq!(listed, code == 200, "{op} {ns}: listing and detail disagree");
            code == 200
        }
        "compat-tags" => {
            let r = c.get(s.url(&format!("/registry/v1/tag/list/{repo}"))).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code), "{op} {repo}: {code}");
            code == 200
        }
        "compat-mine" => {
            let r = c.get(s.url("/registry/v1/repositories/mine")).send().await.unwrap();
            if r.status() == 401 {
                return false;
            }
            let v: serde_json::Value = r.json().await.unwrap();
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| format!("{}/{}", x["Namespace"].as_str().unwrap(), x["Image"].as_str().unwrap()) == repo)
        }
        "console-images" => {
            let (ns, image) = repo.split_once('/').unwrap();
            let body = json!({"Action": "DescribeContainerImage", "ContainerImageRepositoryID": ns, "Limit": 1000});
            let r = c.post(s.url("/api/console")).json(&body).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || code == 404 || code == 401, "{op} {repo}: {code}");
            if code != 200 {
                return false;
            }
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["TotalCount"].as_u64().unwrap() as usize, v["Infos"].as_array().unwrap().len());
            v["Infos"].as_array().unwrap().iter().any(|x| x["Name"] == image)
        }
        "api-shared" => {
            let r = c.get(s.url("/api/v1/repositories?scope=shared&limit=1000")).send().await.unwrap();
            if r.status() == 401 {
                return false;
            }
            let v: serde_json::Value = r.json().await.unwrap();
            v["items"].as_array().unwrap().iter().any(|x| x["name"] == repo)
        }
        "api-retention" => {
            let r = c.get(s.url(&format!("/api/v1/repositories/{repo}/-/retention"))).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code) || code == 404, "{op} {repo}: {code}");
            code == 200
        }
        "api-retention-runs" => {
            let r = c.get(s.url(&format!("/api/v1/retention/runs?repository={repo}"))).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code), "{op} {repo}: {code}");
            code == 200
        }
        "api-ns-retention" => {
            let ns = repo.split('/').next().unwrap();
            let r = c.get(s.url(&format!("/api/v1/namespaces/{ns}/retention"))).send().await.unwrap();
            let code = r.status().as_u16();
            // Another tenant's namespace answers like an unknown one.
            assert!(code == 200 || code == 404 || code == 401, "{op} {ns}: {code}");
            code == 200
        }
        "api-ns-shares" => {
            let ns = repo.split('/').next().unwrap();
            let r = c.get(s.url(&format!("/api/v1/namespaces/{ns}/shares"))).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code), "{op} {ns}: {code}");
            code == 200
        }
        "api-quota" => {
            let ns = repo.split('/').next().unwrap();
            let tenant = ns.trim_end_matches("-ns");
            let r = c.get(s.url(&format!("/api/v1/tenants/{tenant}/quota"))).send().await.unwrap();
            let code = r.status().as_u16();
            // Another tenant's quotas answer like an unknown tenant's.
            assert!(code == 200 || code == 404 || code == 401, "{op} {tenant}: {code}");
            code == 200
        }
        "api-list" => {
            let r = c.get(s.url("/api/v1/repositories?limit=1000")).send().await.unwrap();
            if r.status() == 401 {
                return false;
            }
            let v: serde_json::Value = r.json().await.unwrap();
            let listed = v["items"].as_array().unwrap().iter().any(|x| x["name"] == repo);
            // Counts never include what the caller cannot see.
            assert_eq!(v["total_count"].as_u64().unwrap() as usize, v["items"].as_array().unwrap().len());
            listed
        }
        "api-plugin" | "api-plugin-list" | "api-plugin-log" => {
            let ns = repo.split('/').next().unwrap();
            let id = format!("{ns}-plugin");
            if op != "api-plugin-list" {
                let path = if op == "api-plugin" { id.clone() } else { format!("{id}/deliveries") };
                let code = c.get(s.url(&format!("/api/v1/plugins/instances/{path}"))).send().await.unwrap().status().as_u16();
                // Another scope's instance answers like an unknown one.
                assert!(code == 200 || code == 404 || code == 401, "{op} {id}: {code}");
                return code == 200;
            }
            let r = c.get(s.url("/api/v1/plugins")).send().await.unwrap();
            if r.status() == 401 {
                return false;
            }
            let v: serde_json::Value = r.json().await.unwrap();
            v["instances"].as_array().unwrap().iter().any(|i| i["id"] == id.as_str())
        }
        "api-audit" => {
            // Events naming the repository (its visibility and shares were set up).
            let r = c.get(s.url("/api/v1/audit?limit=1000")).send().await.unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code), "{op}: {code}");
            if code != 200 {
                return false;
            }
            let v: serde_json::Value = r.json().await.unwrap();
            v["events"].as_array().unwrap().iter().any(|e| e["target"] == repo)
        }
        "api-user-tokens" | "api-user-disable" => {
            let tenant = repo.split('/').next().unwrap().trim_end_matches("-ns");
            let base = format!("/api/v1/users/{tenant}-maint");
            let r = if op == "api-user-tokens" {
                c.get(s.url(&format!("{base}/tokens"))).send().await.unwrap()
            } else {
                // Enabling again: changes nothing, and tells who may.
                c.put(s.url(&format!("{base}/disabled"))).json(&json!({"disabled": false})).send().await.unwrap()
            };
            let code = r.status().as_u16();
            // Another tenant's user answers like an unknown one; disabling yourself is a 400.
            assert!(matches!(code, 200 | 204 | 400 | 404) || denied(code), "{op} {tenant}: {code}");
            code == 200 || code == 204
        }
        "api-update" => {
            let r = c
                .patch(s.url(&format!("/api/v1/repositories/{repo}")))
                .json(&json!({"description": format!("by {seed}")}))
                .send()
                .await
                .unwrap();
            let code = r.status().as_u16();
            assert!(code == 200 || denied(code), "{op} {repo}: {code}");
            code == 200
        }
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn isolation_matrix() {
    let dir = TempDir::new("isolation");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let repos = setup(&s, &dir.path().join("data")).await;
    let whos = [Who::Role(0), Who::Role(1), Who::Role(2), Who::Role(3), Who::Anonymous, Who::ShareTenant, Who::Stranger];
    let mut cells = 0;
    let mut failures = vec![];
    let mut seed = 1000;
    for (tenant, kind, repo) in &repos {
        let owner = TENANTS.iter().position(|t| t == tenant).unwrap();
        for who in whos {
            let c = match caller(owner, who) {
                Some(u) => client_as(&u, &password(&u)),
                None => anon_client(),
            };
            for op in OPS {
                seed += 1;
                let got = attempt(&s, &c, repo, op, seed).await;
                let want = expected(who, kind, op);
                cells += 1;
                if got != want {
                    failures.push(format!("{repo} {who:?} ({:?}) {op}: expected {want}, got {got}", caller(owner, who)));
                }
            }
        }
    }
    assert_eq!(cells, 3 * 4 * 7 * OPS.len());
    assert!(failures.is_empty(), "{} of {cells} cells wrong:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn no_cross_tenant_blob_access_by_digest_or_mount() {
    let dir = TempDir::new("isolation-blobs");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let acme = tenant_user_token(&s, "acme", "alice", "maintainer").await;
    let beta = tenant_user_token(&s, "beta", "bob", "maintainer").await;
    let alice = client_as("alice", &acme);
    let bob = client_as("bob", &beta);

    let secret = bytes(7, 5000);
    let d = push_blob(&alice, &s, "acme/secret", &secret).await;
    // Bob knows the digest. Through Alice's repository: refused.
    let r = bob.get(s.url(&format!("/v2/acme/secret/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = bob.head(s.url(&format!("/v2/acme/secret/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // Through his own repository: the blob is not linked there, so it is unknown.
    push_blob(&bob, &s, "beta/own", b"bob's own").await;
    expect_error(bob.get(s.url(&format!("/v2/beta/own/blobs/{d}"))).send().await.unwrap(), 404, "BLOB_UNKNOWN", "guess by digest").await;
    // Mounting from a repository he cannot read never mounts: a plain session instead.
    let r = bob.post(s.url(&format!("/v2/beta/own/blobs/uploads/?mount={d}&from=acme/secret"))).send().await.unwrap();
    assert_eq!(r.status(), 202, "mount from an unreadable repository falls back to an upload");
    expect_error(bob.get(s.url(&format!("/v2/beta/own/blobs/{d}"))).send().await.unwrap(), 404, "BLOB_UNKNOWN", "after mount").await;
    // Anonymous: challenged, never served.
    let r = anon_client().get(s.url(&format!("/v2/acme/secret/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Bob cannot push into Alice's namespace, nor into a namespace nobody owns.
    let r = bob.post(s.url("/v2/acme/secret/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = bob.post(s.url("/v2/nobody/x/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // Once shared for pull, the mount works.
    let r = client().put(s.url("/api/v1/repositories/acme/secret/shares/beta")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = bob.post(s.url(&format!("/v2/beta/own/blobs/uploads/?mount={d}&from=acme/secret"))).send().await.unwrap();
    assert_eq!(r.status(), 201, "mount from a shared repository");
    // Catalog: Bob sees his repository and the shared one, never more.
    let v: serde_json::Value = bob.get(s.url("/v2/_catalog")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["repositories"], json!(["acme/secret", "beta/own"]));
}
