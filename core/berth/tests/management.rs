//! The management API for repositories and tags (`/api/v1/repositories`) against
//! the real binary: listings with filters, sorting and paging edges, profiles,
//! pull and push counters (batched, surviving a restart), deletes, bad input, the
//! OpenAPI document, and tenant isolation of every answer.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn api(s: &Server, path: &str) -> String {
    s.url(&format!("/api/v1/{path}"))
}

async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    let r = c.get(url).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "GET {url}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn names(v: &Value) -> Vec<String> {
    v["items"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().to_owned()).collect()
}

/// Poll until `f` holds (counters are written in batches).
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not reached in 10 s");
}

fn start(dir: &TempDir) -> Server {
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "[registry]\ncounter_flush_secs = 1\n").unwrap();
    Server::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap())])
}

#[test]
fn repositories_listing_counters_and_isolation() {
    let dir = TempDir::new("manage");
    let mut s = start(&dir);
    block_on(async {
        let mia_token = tenant_user_token(&s, "acme", "mia", "maintainer").await;
        let bob_token = tenant_user_token(&s, "beta", "bob", "maintainer").await;
        let mia = client_as("mia", &mia_token);
        let bob = client_as("bob", &bob_token);
        push_image(&mia, &s, "acme/app", "v1", 1, json!({})).await;
        push_image(&mia, &s, "acme/app", "v2", 2, json!({})).await;
        push_image(&mia, &s, "acme/web", "latest", 3, json!({})).await;
        push_image(&bob, &s, "beta/secret", "v1", 4, json!({})).await;

        // The OpenAPI document needs no credentials and covers these routes.
        let doc: Value = anon_client().get(api(&s, "openapi.json")).send().await.unwrap().json().await.unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert!(doc["paths"]["/api/v1/repositories/{name}/-/tags"]["get"].is_object());

        // Listings hold only what the caller may read.
        let v = get_json(&mia, &api(&s, "repositories")).await;
        assert_eq!(names(&v), ["acme/app", "acme/web"]);
        assert_eq!(v["total_count"], 2);
        let app = &v["items"][0];
        assert_eq!((app["tag_count"].as_u64(), app["image_count"].as_u64(), app["push_count"].as_u64()), (Some(2), Some(2), Some(2)));
        assert_eq!(app["tenant"], "acme");
        assert_eq!(app["registry_address"], format!("{}/acme/app", s.addr));
        assert_eq!(app["latest_tag"], "v2");
        assert!(app["size_bytes"].as_u64().unwrap() > 2000, "{app}");
        assert_eq!(names(&get_json(&bob, &api(&s, "repositories")).await), ["beta/secret"]);
        for q in ["namespace=acme", "tenant=acme", "keyword=app", "scope=mine", "scope=public"] {
            let v = get_json(&bob, &api(&s, &format!("repositories?{q}"))).await;
            assert!(names(&v).iter().all(|n| n.starts_with("beta/")), "{q}: {v}");
        }
        let r = anon_client().get(api(&s, "repositories")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        for path in ["repositories/acme/app", "repositories/acme/app/-/tags", "repositories/acme/app/-/tags/v1"] {
            expect_error(bob.get(api(&s, path)).send().await.unwrap(), 403, "DENIED", path).await;
        }
        expect_error(bob.delete(api(&s, "repositories/acme/app")).send().await.unwrap(), 403, "DENIED", "delete other's").await;
        let r = bob.post(api(&s, "repositories")).json(&json!({"name": "acme/planted"})).send().await.unwrap();
        assert_eq!(r.status(), 403, "create in another tenant's namespace");

        // Paging edges, keyword, sorting.
        let v = get_json(&mia, &api(&s, "repositories?limit=1")).await;
        assert_eq!((names(&v), v["total_count"].as_u64()), (vec!["acme/app".to_owned()], Some(2)));
        let v = get_json(&mia, &api(&s, "repositories?limit=1&offset=1")).await;
        assert_eq!(names(&v), ["acme/web"]);
        let v = get_json(&mia, &api(&s, "repositories?offset=50")).await;
        assert_eq!((names(&v).len(), v["total_count"].as_u64()), (0, Some(2)));
        let v = get_json(&mia, &api(&s, "repositories?limit=0")).await;
        assert_eq!((names(&v).len(), v["total_count"].as_u64()), (0, Some(2)));
        assert_eq!(names(&get_json(&mia, &api(&s, "repositories?keyword=WEB")).await), ["acme/web"]);
        assert_eq!(names(&get_json(&mia, &api(&s, "repositories?sort=name&order=desc")).await), ["acme/web", "acme/app"]);
        for q in
            ["limit=-1", "limit=100000", "limit=abc", "offset=-2", "sort=size", "order=up", "scope=everything", "bogus=1", "labels=nokey"]
        {
            expect_error(mia.get(api(&s, &format!("repositories?{q}"))).send().await.unwrap(), 400, "INVALID_REQUEST", q).await;
        }

        // Pulls: three by tag, one by digest; counted in a batch, off the GET path.
        let d1 = {
            let r = mia.get(s.url("/v2/acme/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
            r.headers()["docker-content-digest"].to_str().unwrap().to_owned()
        };
        for _ in 0..2 {
            assert_eq!(mia.get(s.url("/v2/acme/app/manifests/v1")).send().await.unwrap().status(), 200);
        }
        assert_eq!(mia.get(s.url(&format!("/v2/acme/app/manifests/{d1}"))).send().await.unwrap().status(), 200);
        // A HEAD is not a pull.
        assert_eq!(mia.head(s.url("/v2/acme/app/manifests/v1")).send().await.unwrap().status(), 200);
        eventually("repository pull count", async || get_json(&mia, &api(&s, "repositories/acme/app")).await["pull_count"] == 4).await;
        let tags = get_json(&mia, &api(&s, "repositories/acme/app/-/tags")).await;
        assert_eq!(names(&tags), ["v1", "v2"]);
        assert_eq!((tags["items"][0]["pull_count"].as_u64(), tags["items"][1]["pull_count"].as_u64()), (Some(3), Some(0)));
        assert!(tags["items"][0]["last_pulled_ms"].as_i64().unwrap() > 0);
        assert_eq!(tags["items"][0]["digest"], d1.as_str());
        let v = get_json(&mia, &api(&s, "repositories?sort=pulls&order=desc")).await;
        assert_eq!(names(&v), ["acme/app", "acme/web"]);
        let t = get_json(&mia, &api(&s, "repositories/acme/app/-/tags/v2")).await;
        assert_eq!(t["push_count"], 1);
        assert_eq!(get_json(&mia, &api(&s, "repositories/acme/app/-/tags?keyword=2&limit=5")).await["total_count"], 1);

        // One more pull right before a graceful stop is kept too.
        assert_eq!(mia.get(s.url("/v2/acme/web/manifests/latest")).send().await.unwrap().status(), 200);
    });
    s.stop();
    let s = start(&dir);
    block_on(async {
        let mia = client_as("mia", "mia-password");
        let app = get_json(&mia, &api(&s, "repositories/acme/app")).await;
        assert_eq!((app["pull_count"].as_u64(), app["push_count"].as_u64()), (Some(4), Some(2)), "after restart: {app}");
        assert_eq!(get_json(&mia, &api(&s, "repositories/acme/web")).await["pull_count"], 1);
    });
}

#[test]
fn repository_profiles_and_deletes() {
    let dir = TempDir::new("manage-del");
    let s = start(&dir);
    block_on(async {
        let token = tenant_user_token(&s, "acme", "mia", "tenant-admin").await;
        let mia = client_as("mia", &token);

        // Explicit creation with a profile; names checked with clear messages.
        let r = mia
            .post(api(&s, "repositories"))
            .json(&json!({"name": "acme/tools/cli", "description": "Command line", "category": "tools", "labels": {"team": "core"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let v = get_json(&mia, &api(&s, "repositories/acme/tools/cli")).await;
        assert_eq!(
            (v["description"].as_str(), v["tag_count"].as_u64(), v["public"].as_bool()),
            (Some("Command line"), Some(0), Some(false))
        );
        // Percent-encoded names address the same repository.
        assert_eq!(get_json(&mia, &api(&s, "repositories/acme%2Ftools%2Fcli")).await["name"], "acme/tools/cli");
        // An empty repository exists for the OCI API too.
        let tags: Value = mia.get(s.url("/v2/acme/tools/cli/tags/list")).send().await.unwrap().json().await.unwrap();
        assert_eq!(tags["tags"], json!([]));
        let r = mia.post(api(&s, "repositories")).json(&json!({"name": "acme/tools/cli"})).send().await.unwrap();
        expect_error(r, 409, "CONFLICT", "create twice").await;
        for (body, code) in [
            (json!({"name": "Acme/Upper"}), "NAME_INVALID"),
            (json!({"name": "nobody/x"}), "DENIED"),
            (json!({"name": "acme/x", "colour": "red"}), "INVALID_REQUEST"),
            (json!({"name": "acme/x", "labels": {"bad key": "v"}}), "INVALID_REQUEST"),
            (json!({"name": 7}), "INVALID_REQUEST"),
        ] {
            let r = mia.post(api(&s, "repositories")).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            assert!(status == 400 || status == 403, "{body}: {status}");
            expect_error(r, status, code, &body.to_string()).await;
        }

        // Name checks: grammar, ownership, existence, with the reason.
        let c = get_json(&mia, &api(&s, "repositories/-/check?name=acme/tools/cli")).await;
        assert_eq!((c["valid"].as_bool(), c["pushable"].as_bool(), c["exists"].as_bool()), (Some(true), Some(true), Some(true)));
        let c = get_json(&mia, &api(&s, "repositories/-/check?name=acme/UPPER")).await;
        assert_eq!(c["valid"], false);
        assert!(c["reason"].as_str().unwrap().contains("must match"), "{c}");
        let c = get_json(&mia, &api(&s, "repositories/-/check?name=nobody/x")).await;
        assert_eq!((c["valid"].as_bool(), c["pushable"].as_bool()), (Some(true), Some(false)));
        assert!(c["reason"].as_str().unwrap().contains("no tenant owns"), "{c}");

        // Update: fields given change, the rest stay; visibility goes through policy.
        let r =
            mia.patch(api(&s, "repositories/acme/tools/cli")).json(&json!({"description": "CLI", "public": true})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v = get_json(&mia, &api(&s, "repositories/acme/tools/cli")).await;
        assert_eq!((v["description"].as_str(), v["category"].as_str(), v["public"].as_bool()), (Some("CLI"), Some("tools"), Some(true)));
        assert_eq!(names(&get_json(&mia, &api(&s, "repositories?labels=team:core")).await), ["acme/tools/cli"]);
        assert_eq!(names(&get_json(&mia, &api(&s, "repositories?scope=public")).await), ["acme/tools/cli"]);
        assert!(names(&get_json(&mia, &api(&s, "repositories?labels=team:other")).await).is_empty());
        let r = mia.patch(api(&s, "repositories/acme/none")).json(&json!({"description": "x"})).send().await.unwrap();
        expect_error(r, 404, "NAME_UNKNOWN", "update unknown").await;

        // Bulk delete by tag status: the untagged manifest goes, its referrer of a
        // tagged manifest and the tagged one stay.
        let tagged = push_image(&mia, &s, "acme/app", "v1", 1, json!({})).await;
        let untagged = {
            let config = b"{\"u\":1}".to_vec();
            let cd = push_blob(&mia, &s, "acme/app", &config).await;
            let m = image_manifest((&cd, config.len()), &[], json!({}));
            put_manifest(&mia, &s, "acme/app", &sha256(&m), OCI_MANIFEST, &m).await
        };
        let referrer = {
            let empty = push_blob(&mia, &s, "acme/app", b"{}").await;
            let m = serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x-signature",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
                "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": tagged, "size": 1}
            }))
            .unwrap();
            put_manifest(&mia, &s, "acme/app", &sha256(&m), OCI_MANIFEST, &m).await
        };
        let r = mia.post(api(&s, "repositories/acme/app/-/manifests/delete")).json(&json!({"status": "untagged"})).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["deleted"], json!([untagged]));
        assert_eq!(mia.get(s.url(&format!("/v2/acme/app/manifests/{referrer}"))).send().await.unwrap().status(), 200);
        assert_eq!(mia.get(s.url("/v2/acme/app/manifests/v1")).send().await.unwrap().status(), 200);
        let r = mia.post(api(&s, "repositories/acme/app/-/manifests/delete")).json(&json!({"status": "old"})).send().await.unwrap();
        expect_error(r, 400, "INVALID_REQUEST", "bad status").await;

        // Delete a tag, then a manifest by digest.
        push_image(&mia, &s, "acme/app", "v2", 2, json!({})).await;
        assert_eq!(mia.delete(api(&s, "repositories/acme/app/-/tags/v2")).send().await.unwrap().status(), 204);
        expect_error(mia.get(api(&s, "repositories/acme/app/-/tags/v2")).send().await.unwrap(), 404, "MANIFEST_UNKNOWN", "deleted tag")
            .await;
        assert_eq!(mia.delete(api(&s, &format!("repositories/acme/app/-/manifests/{referrer}"))).send().await.unwrap().status(), 204);
        let r = mia.delete(api(&s, "repositories/acme/app/-/manifests/sha256:nothex")).send().await.unwrap();
        expect_error(r, 400, "DIGEST_INVALID", "bad digest").await;

        // Delete the whole repository: it is gone everywhere, and its public rule
        // does not outlive it.
        let r = mia.delete(api(&s, "repositories/acme/app")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["manifests"].as_u64().unwrap() >= 2 && v["tags"] == 1, "{v}");
        expect_error(mia.get(api(&s, "repositories/acme/app")).send().await.unwrap(), 404, "NAME_UNKNOWN", "deleted repo").await;
        expect_error(mia.get(s.url("/v2/acme/app/tags/list")).send().await.unwrap(), 404, "NAME_UNKNOWN", "deleted repo, OCI").await;
        assert_eq!(names(&get_json(&mia, &api(&s, "repositories")).await), ["acme/tools/cli"]);
        assert_eq!(mia.delete(api(&s, "repositories/acme/tools/cli")).send().await.unwrap().status(), 200);
        let r = mia.post(api(&s, "repositories")).json(&json!({"name": "acme/tools/cli"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(get_json(&mia, &api(&s, "repositories/acme/tools/cli")).await["public"], false);
        // A push to a deleted repository starts it afresh.
        push_image(&mia, &s, "acme/app", "v9", 9, json!({})).await;
        assert_eq!(get_json(&mia, &api(&s, "repositories/acme/app")).await["tag_count"], 1);
    });
}

#[test]
fn namespaces_lifecycle_and_isolation() {
    let dir = TempDir::new("manage-ns");
    let s = start(&dir);
    block_on(async {
        let admin_token = tenant_user_token(&s, "acme", "ada", "tenant-admin").await;
        let ada = client_as("ada", &admin_token);
        let maint = client_as("max", &tenant_user_token(&s, "acme", "max", "maintainer").await);
        let reader = client_as("rea", &tenant_user_token(&s, "acme", "rea", "reader").await);
        let bob = client_as("bob", &tenant_user_token(&s, "beta", "bob", "tenant-admin").await);

        // A tenant admin creates a namespace for its own tenant (the default).
        let r = ada
            .post(api(&s, "namespaces"))
            .json(&json!({"name": "acme-tools", "description": "Tools", "labels": {"env": "prod"}, "project_id": "p7"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let v = get_json(&reader, &api(&s, "namespaces/acme-tools")).await;
        assert_eq!((v["tenant"].as_str(), v["project_id"].as_str()), (Some("acme"), Some("p7")));
        assert_eq!(v["registry_address"], format!("{}/acme-tools", s.addr));
        // Others may not create one, for their tenant or for another.
        let r = maint.post(api(&s, "namespaces")).json(&json!({"name": "acme-x"})).send().await.unwrap();
        expect_error(r, 403, "DENIED", "maintainer creates namespace").await;
        let r = bob.post(api(&s, "namespaces")).json(&json!({"name": "planted", "tenant": "acme"})).send().await.unwrap();
        expect_error(r, 403, "DENIED", "other tenant's admin").await;
        let r = ada.post(api(&s, "namespaces")).json(&json!({"name": "acme-tools"})).send().await.unwrap();
        expect_error(r, 409, "CONFLICT", "taken").await;
        let r = ada.post(api(&s, "namespaces")).json(&json!({"name": "Bad_Name"})).send().await.unwrap();
        expect_error(r, 400, "NAME_INVALID", "invalid").await;

        // Name checks say why.
        let c = get_json(&bob, &api(&s, "namespaces/check?name=Bad_Name")).await;
        assert_eq!((c["valid"].as_bool(), c["available"].as_bool()), (Some(false), Some(false)));
        assert!(c["reason"].as_str().unwrap().contains("[a-z0-9]"), "{c}");
        let c = get_json(&bob, &api(&s, "namespaces/check?name=acme-tools")).await;
        assert_eq!((c["valid"].as_bool(), c["available"].as_bool()), (Some(true), Some(false)));
        assert_eq!(get_json(&bob, &api(&s, "namespaces/check?name=fresh")).await["available"], true);

        // Listing: members see their tenant's namespaces, others never.
        let v = get_json(&reader, &api(&s, "namespaces")).await;
        assert_eq!(names(&v), ["acme", "acme-tools"]);
        assert_eq!(names(&get_json(&bob, &api(&s, "namespaces")).await), ["beta"]);
        assert_eq!(get_json(&bob, &api(&s, "namespaces?tenant=acme")).await["total_count"], 0);
        expect_error(bob.get(api(&s, "namespaces/acme-tools")).send().await.unwrap(), 404, "NOT_FOUND", "other's namespace").await;
        assert_eq!(names(&get_json(&reader, &api(&s, "namespaces?keyword=TOOL&limit=1")).await), ["acme-tools"]);
        expect_error(reader.get(api(&s, "namespaces?limit=-5")).send().await.unwrap(), 400, "INVALID_REQUEST", "bad limit").await;

        // Pushes go into it; its figures follow.
        push_image(&maint, &s, "acme-tools/app", "v1", 1, json!({})).await;
        let v = get_json(&reader, &api(&s, "namespaces/acme-tools")).await;
        assert_eq!(v["repository_count"], 1);
        assert!(v["storage_bytes"].as_u64().unwrap() > 1000);

        // Profile updates; public_default makes API-created repositories public.
        let r = reader.patch(api(&s, "namespaces/acme-tools")).json(&json!({"description": "x"})).send().await.unwrap();
        expect_error(r, 403, "DENIED", "reader updates").await;
        let r = ada.patch(api(&s, "namespaces/acme-tools")).json(&json!({"public_default": true})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = ada.post(api(&s, "repositories")).json(&json!({"name": "acme-tools/open"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(get_json(&ada, &api(&s, "repositories/acme-tools/open")).await["public"], true);

        // Delete: refused while not empty, then forced (repositories go with it).
        let r = ada.delete(api(&s, "namespaces/acme-tools")).send().await.unwrap();
        expect_error(r, 409, "CONFLICT", "not empty").await;
        let r = bob.delete(api(&s, "namespaces/acme-tools?force=true")).send().await.unwrap();
        expect_error(r, 403, "DENIED", "other tenant deletes").await;
        let r = ada.delete(api(&s, "namespaces/acme-tools?force=true")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["repositories"], json!(["acme-tools/app", "acme-tools/open"]));
        expect_error(ada.get(api(&s, "namespaces/acme-tools")).send().await.unwrap(), 404, "NOT_FOUND", "deleted").await;
        expect_error(maint.get(s.url("/v2/acme-tools/app/tags/list")).send().await.unwrap(), 403, "DENIED", "no owner, no access").await;
        let r = ada.delete(api(&s, "namespaces/acme")).send().await.unwrap();
        expect_error(r, 400, "INVALID_REQUEST", "own namespace").await;
        assert_eq!(get_json(&bob, &api(&s, "namespaces/check?name=acme-tools")).await["available"], true);
    });
}

/// Run the CLI with only the given environment (no BERTH_* of the runner).
fn cli(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = berth_command();
    cmd.args(args).envs(env.iter().copied()).stdin(std::process::Stdio::null());
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cli_drives_namespaces_repositories_and_tags() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("manage-cli");
    let s = start(&dir);
    let token = block_on(tenant_user_token(&s, "acme", "ada", "tenant-admin"));
    let creds = dir.path().join("creds.json");
    let env = [("BERTH_CREDENTIALS", creds.to_str().unwrap())];
    let run = |args: &[&str]| {
        let (code, out, err) = cli(&env, args);
        assert_eq!(code, 0, "berth {args:?}: {err}{out}");
        out
    };

    // Wrong credentials are not stored; right ones are, readable by the owner only.
    let (code, _, err) = cli(&env, &["login", "--server", &s.base, "--login", "ada", "--password", "wrong-password"]);
    assert_ne!(code, 0, "{err}");
    assert!(!creds.exists());
    run(&["login", "--server", &s.base, "--login", "ada", "--password", &token]);
    assert_eq!(std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777, 0o600);

    run(&["ns", "create", "acme-cli", "--description", "from the CLI", "--label", "env=dev"]);
    let out = run(&["ns", "list"]);
    assert!(out.lines().next().unwrap().starts_with("NAMESPACE"), "{out}");
    assert!(out.contains("acme-cli") && out.contains("from the CLI"), "{out}");
    let (code, out, _) = cli(&env, &["ns", "check", "acme-cli"]);
    assert_eq!(code, 1, "a taken name exits 1: {out}");
    assert_eq!(cli(&env, &["ns", "check", "free-name"]).0, 0);

    run(&["repo", "create", "acme-cli/tool", "--description", "a tool", "--label", "team=core"]);
    block_on(async {
        let c = client_as("ada", &token);
        push_image(&c, &s, "acme-cli/tool", "v1", 1, json!({})).await;
        push_image(&c, &s, "acme-cli/tool", "v2", 2, json!({})).await;
    });
    let out = run(&["repo", "list", "--namespace", "acme-cli"]);
    assert!(out.lines().nth(1).unwrap().starts_with("acme-cli/tool"), "{out}");
    let v: Value = serde_json::from_str(&run(&["repo", "list", "--labels", "team:core", "--json"])).unwrap();
    assert_eq!(v["total_count"], 1);
    assert_eq!(v["items"][0]["tag_count"], 2);
    let out = run(&["repo", "list", "--limit", "0"]);
    assert!(out.contains("(0 of 1, from offset 0)"), "{out}");
    run(&["repo", "update", "acme-cli/tool", "--description", "renamed"]);
    assert!(run(&["repo", "get", "acme-cli/tool"]).contains("description: renamed"));

    let out = run(&["tag", "list", "acme-cli/tool"]);
    assert!(out.contains("v1") && out.contains("v2") && out.contains("sha256:"), "{out}");
    run(&["tag", "delete", "acme-cli/tool", "v1"]);
    let out = run(&["repo", "prune", "acme-cli/tool"]);
    assert_eq!(out.lines().filter(|l| l.starts_with("deleted acme-cli/tool@sha256:")).count(), 1, "{out}");
    let (code, _, err) = cli(&env, &["tag", "get", "acme-cli/tool", "v1"]);
    assert_eq!(code, 2);
    assert!(err.contains("MANIFEST_UNKNOWN"), "{err}");

    // Shares through the CLI.
    block_on(async {
        tenant_user_token(&s, "beta", "bea", "developer").await;
    });
    run(&["repo", "share", "acme-cli/tool", "--tenant", "beta"]);
    let out = run(&["share", "list"]);
    assert!(out.contains("acme-cli/tool") && out.contains("beta"), "{out}");
    assert_eq!(cli(&env, &["share", "exists", "acme-cli/tool", "--tenant", "beta"]).0, 0);
    assert_eq!(cli(&env, &["share", "exists", "acme-cli/tool", "--tenant", "acme"]).0, 1);
    run(&["ns", "share", "acme-cli", "--tenant", "beta", "--push", "--expires-in", "3600"]);
    let out = run(&["ns", "shares", "acme-cli"]);
    assert!(out.contains("beta") && out.contains("push"), "{out}");
    let out = run(&["share", "list"]);
    assert!(out.lines().any(|l| l.contains("acme-cli") && l.contains("beta") && !l.contains("acme-cli/tool")), "{out}");
    run(&["ns", "unshare", "acme-cli", "--tenant", "beta"]);
    assert!(!run(&["ns", "shares", "acme-cli"]).contains("beta"));
    run(&["ns", "share", "acme-cli", "--tenant", "beta"]);

    let (code, _, err) = cli(&env, &["ns", "delete", "acme-cli"]);
    assert_eq!(code, 2);
    assert!(err.contains("409") && err.contains("force"), "{err}");
    assert!(run(&["ns", "delete", "acme-cli", "--force"]).contains("acme-cli/tool"));
    run(&["logout"]);
    assert!(!creds.exists());
    let (code, _, err) = cli(&env, &["repo", "list"]);
    assert_eq!(code, 2);
    assert!(err.contains("berth login"), "{err}");
}

/// `/registry/v1`, the seed console's API: its paths, `{"code":0,"data":…}`,
/// its field names and RFC 3339 times, errors with a non-zero code.
#[test]
fn registry_v1_compatibility_surface() {
    let dir = TempDir::new("manage-compat");
    let s = start(&dir);
    block_on(async {
        let ada = client_as("ada", &tenant_user_token(&s, "acme", "ada", "tenant-admin").await);
        let bob = client_as("bob", &tenant_user_token(&s, "beta", "bob", "tenant-admin").await);
        let d1 = push_image(&ada, &s, "acme/app", "v1", 1, json!({})).await;
        push_image(&ada, &s, "acme/app", "v2", 2, json!({})).await;
        push_image(&bob, &s, "beta/own", "v1", 3, json!({})).await;
        let url = |p: &str| s.url(&format!("/registry/v1/{p}"));
        let ok = async |c: &reqwest::Client, r: reqwest::RequestBuilder| -> Value {
            let _ = c;
            let resp = r.send().await.unwrap();
            let status = resp.status();
            let v: Value = resp.json().await.unwrap();
            assert_eq!((status.as_u16(), v["code"].as_i64()), (200, Some(0)), "{v}");
            v["data"].clone()
        };
        let err = async |r: reqwest::RequestBuilder, status: u16| {
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), status);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["code"].as_u64(), Some(status as u64), "{v}");
            assert!(!v["message"].as_str().unwrap().is_empty());
        };

        let tags = ok(&ada, ada.get(url("tag/list/acme/app"))).await;
        let tags = tags.as_array().unwrap();
        assert_eq!(tags.len(), 2);
        let t = &tags[0];
        assert_eq!((t["Namespace"].as_str(), t["Image"].as_str(), t["Tag"].as_str()), (Some("acme"), Some("app"), Some("v1")));
        assert_eq!(t["Digest"], d1.as_str());
        assert!(t["ID"].as_u64().unwrap() > 0 && t["Size"].as_u64().unwrap() > 0);
        let created = t["CreatedAt"].as_str().unwrap();
        assert!(created.len() == 24 && created.starts_with("20") && created.ends_with('Z'), "{created}");
        assert!(t["DeletedAt"].is_null());

        let m = ok(&ada, ada.get(url("manifests/v1/acme/app"))).await;
        assert_eq!((m["Digest"].as_str(), m["Manifest"]["schemaVersion"].as_i64()), (Some(d1.as_str()), Some(2)));
        assert_eq!(m["LatestTag"], "v2");

        let mine = ok(&ada, ada.get(url("repositories/mine"))).await;
        assert_eq!(
            mine.as_array()
                .unwrap()
                .iter()
                .map(|r| format!("{}/{}", r["Namespace"].as_str().unwrap(), r["Image"].as_str().unwrap()))
                .collect::<Vec<_>>(),
            ["acme/app"]
        );
        assert_eq!(mine[0]["PushCount"], 2);
        let anon = anon_client();
        assert_eq!(ok(&anon, anon.get(url("repositories/public"))).await, json!([]));

        // Publicity: the repository's admin only, 0 or 1.
        err(bob.patch(url("acme/app/publicity")).json(&json!({"Publicity": 1})), 403).await;
        err(ada.patch(url("acme/app/publicity")).json(&json!({"Publicity": 5})), 400).await;
        err(ada.patch(url("acme/app/publicity")).json(&json!({"publicity": 1})), 400).await;
        let r = ok(&ada, ada.patch(url("acme/app/publicity")).json(&json!({"Publicity": 1}))).await;
        assert_eq!(r["Publicity"], 1);
        let public = ok(&anon, anon.get(url("repositories/public"))).await;
        assert_eq!(public.as_array().unwrap().len(), 1);
        assert_eq!(public[0]["Image"], "app");

        // Isolation and bad input.
        err(bob.get(url("tag/list/acme/other")), 403).await;
        err(bob.delete(url("manifests/v1/acme/app")), 403).await;
        err(anon.get(url("tag/list/beta/own")), 401).await;
        assert!(ok(&bob, bob.get(url("repositories/mine"))).await.as_array().unwrap().iter().all(|r| r["Namespace"] == "beta"));
        err(ada.get(url("tag/list/acme/Bad_Name")), 400).await;
        err(ada.get(url("manifests/v9/acme/app")), 404).await;
        err(ada.get(url("nothing/here")), 404).await;

        // Delete by tag through the adapter.
        ok(&ada, ada.delete(url("manifests/v2/acme/app"))).await;
        assert_eq!(ok(&ada, ada.get(url("tag/list/acme/app"))).await.as_array().unwrap().len(), 1);
    });
}

/// `POST /api/console`, the action-style API: every action, its field names,
/// the region check, and the same isolation as `/api/v1`.
#[test]
fn console_actions() {
    let dir = TempDir::new("manage-console");
    let s = start(&dir);
    block_on(async {
        let ada = client_as("ada", &tenant_user_token(&s, "acme", "ada", "tenant-admin").await);
        let bob = client_as("bob", &tenant_user_token(&s, "beta", "bob", "tenant-admin").await);
        let call = async |c: &reqwest::Client, body: Value| -> (u16, Value) {
            let r = c.post(s.url("/api/console")).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json().await.unwrap())
        };
        let ok = async |c: &reqwest::Client, body: Value| -> Value {
            let (status, v) = call(c, body.clone()).await;
            assert_eq!((status, v["RetCode"].as_u64()), (200, Some(0)), "{body}: {v}");
            v
        };

        // The registry's own addresses (item: mirror address).
        let info = get_json(&ada, &api(&s, "registry")).await;
        assert_eq!((info["registry_address"].as_str(), info["region"].as_str()), (Some(s.addr.as_str()), Some("local")));
        assert!(info["mirror_address"].is_null());

        let v = ok(
            &ada,
            json!({"Action": "CreateContainerImageRepository", "Name": "acme-web", "Remark": "web images",
            "Region": "local", "ProjectID": "p1", "TagKeyValuePairs": [{"Key": "env", "Value": "prod"}]}),
        )
        .await;
        assert_eq!(
            (v["ContainerImageRepositoryID"].as_str(), v["Action"].as_str()),
            (Some("acme-web"), Some("CreateContainerImageRepositoryResponse"))
        );
        let (status, v) = call(&ada, json!({"Action": "CreateContainerImageRepository", "Name": "x", "Region": "mars"})).await;
        assert_eq!(status, 400);
        assert!(v["Message"].as_str().unwrap().contains("mars"), "{v}");
        let (status, _) =
            call(&bob, json!({"Action": "UpdateContainerImageRepository", "ContainerImageRepositoryID": "acme-web", "Remark": "mine"}))
                .await;
        assert_eq!(status, 403);
        ok(&ada, json!({"Action": "UpdateContainerImageRepository", "ContainerImageRepositoryID": "acme-web", "Remark": "Web"})).await;

        push_image(&ada, &s, "acme-web/site", "v1", 1, json!({})).await;
        push_image(&ada, &s, "acme-web/site", "v2", 2, json!({})).await;
        push_image(&ada, &s, "acme-web/api", "v1", 3, json!({})).await;

        let v = ok(&ada, json!({"Action": "DescribeContainerImageRepository", "ProjectIDs": ["p1"], "Limit": 10})).await;
        assert_eq!(v["TotalCount"], 1);
        let info = &v["Infos"][0];
        assert_eq!(
            (info["Name"].as_str(), info["Remark"].as_str(), info["Region"].as_str()),
            (Some("acme-web"), Some("Web"), Some("local"))
        );
        assert_eq!(info["ContainerImageNumbers"], 2);
        assert_eq!(info["Tags"], json!([{"Key": "env", "Value": "prod"}]));
        assert!(info["CompanyID"].as_u64().unwrap() > 0);
        assert_eq!(info["RegistryAddress"], format!("{}/acme-web", s.addr));
        // Bob's view holds his own namespace only.
        let v = ok(&bob, json!({"Action": "DescribeContainerImageRepository"})).await;
        assert_eq!(v["Infos"].as_array().unwrap().iter().map(|i| i["Name"].as_str().unwrap()).collect::<Vec<_>>(), ["beta"]);
        let (status, _) = call(&bob, json!({"Action": "DescribeContainerImage", "ContainerImageRepositoryID": "acme-web"})).await;
        assert_eq!(status, 404);

        let v = ok(&ada, json!({"Action": "DescribeContainerImage", "ContainerImageRepositoryID": "acme-web", "Limit": 1})).await;
        assert_eq!((v["TotalCount"].as_u64(), v["Infos"][0]["Name"].as_str()), (Some(2), Some("api")));
        assert_eq!(v["Infos"][0]["FullName"], format!("{}/acme-web/api", s.addr));
        let v = ok(
            &ada,
            json!({"Action": "DescribeContainerImageTag", "ContainerImageRepositoryID": "acme-web", "ContainerImageName": "site"}),
        )
        .await;
        assert_eq!(v["Infos"].as_array().unwrap().iter().map(|i| i["TagName"].as_str().unwrap()).collect::<Vec<_>>(), ["v1", "v2"]);
        assert!(v["Infos"][0]["ContainerImageTagDigest"].as_str().unwrap().starts_with("sha256:"));
        let (status, _) = call(&bob, json!({"Action": "DeleteContainerImageTag", "ContainerImageRepositoryID": "acme-web", "ContainerImageName": "site", "TagName": "v1"})).await;
        assert_eq!(status, 403);
        ok(&ada, json!({"Action": "DeleteContainerImageTag", "ContainerImageRepositoryID": "acme-web", "ContainerImageName": "site", "TagName": "v1"})).await;
        ok(&ada, json!({"Action": "DeleteContainerImage", "ContainerImageRepositoryID": "acme-web", "ContainerImageName": "api"})).await;
        let v = ok(&ada, json!({"Action": "DescribeContainerImage", "ContainerImageRepositoryID": "acme-web"})).await;
        assert_eq!(v["TotalCount"], 1);

        // Bad input: unknown actions and fields, wrong types, bad paging.
        for body in [
            json!({"Action": "DropEverything"}),
            json!({"Action": "DescribeContainerImage", "Colour": "red"}),
            json!({"Action": "DescribeContainerImage", "Limit": "ten"}),
            json!({"Action": "DescribeContainerImageRepository", "Limit": -1}),
            json!({"Name": "no-action"}),
        ] {
            let (status, v) = call(&ada, body.clone()).await;
            assert_eq!(status, 400, "{body}: {v}");
            assert_eq!(v["RetCode"], 400);
        }

        // Deleting a namespace that holds images needs DeleteAllImages.
        let (status, _) = call(&ada, json!({"Action": "DeleteContainerImageRepository", "ContainerImageRepositoryID": "acme-web"})).await;
        assert_eq!(status, 409);
        ok(&ada, json!({"Action": "DeleteContainerImageRepository", "ContainerImageRepositoryID": "acme-web", "DeleteAllImages": true}))
            .await;
        assert_eq!(ok(&ada, json!({"Action": "DescribeContainerImageRepository", "Keyword": "web"})).await["TotalCount"], 0);
        let r =
            anon_client().post(s.url("/api/console")).json(&json!({"Action": "DescribeContainerImageRepository"})).send().await.unwrap();
        assert_eq!(r.status(), 401);
    });
}

/// Access tokens as the consoles show them: listed with created, expiry, last
/// use and description; released one at a time or all at once.
#[test]
fn tokens_listed_and_released_all_at_once() {
    let dir = TempDir::new("manage-tokens");
    let s = start(&dir);
    block_on(async {
        let first = tenant_user_token(&s, "acme", "tia", "developer").await;
        let tia = client_as("tia", "tia-password");
        let r = tia.post(api(&s, "tokens")).json(&json!({"description": "ci"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let second: Value = r.json().await.unwrap();
        assert!(second["docker_auth"].is_string() && second["expires_ms"].as_i64().unwrap() > second["created_ms"].as_i64().unwrap());
        // A token that was used shows when (last use is written in batches).
        assert_eq!(client_as("tia", &first).get(s.url("/v2/")).send().await.unwrap().status(), 200);
        let listed = get_json(&tia, &api(&s, "tokens")).await;
        let tokens = listed["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.iter().all(|t| t["token"].is_null() && t["description"].is_string()), "no secret in a listing: {listed}");
        let other = tenant_user_token(&s, "acme", "oli", "developer").await;

        let r = tia.delete(api(&s, "tokens")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["revoked"].as_array().unwrap().len(), 2);
        assert!(get_json(&tia, &api(&s, "tokens")).await["tokens"].as_array().unwrap().is_empty());
        for t in [&first, second["token"].as_str().unwrap()] {
            assert_eq!(client_as("tia", t).get(s.url("/v2/")).send().await.unwrap().status(), 401);
        }
        // Someone else's tokens are untouched.
        assert_eq!(client_as("oli", &other).get(s.url("/v2/")).send().await.unwrap().status(), 200);
    });
}

/// Tag details: the image's size (manifest, config, layers), its creation time
/// from the config, the decoded manifest, and an index's platforms.
#[test]
fn tag_details_sizes_platforms_created() {
    let dir = TempDir::new("manage-detail");
    let s = start(&dir);
    block_on(async {
        let c = client_as("ada", &tenant_user_token(&s, "acme", "ada", "maintainer").await);
        let mut children = vec![];
        for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
            let config = serde_json::to_vec(&json!({"architecture": arch, "os": "linux", "created": "2026-01-02T03:04:05Z"})).unwrap();
            let cd = push_blob(&c, &s, "acme/multi", &config).await;
            let layer = bytes(i as u64, 5000);
            let ld = push_blob(&c, &s, "acme/multi", &layer).await;
            let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], json!({}));
            let d = put_manifest(&c, &s, "acme/multi", arch, OCI_MANIFEST, &m).await;
            children.push((d, m.len(), arch.to_string(), config.len() + layer.len() + m.len()));
        }
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": children.iter().map(|(d, n, arch, _)| json!({
                "mediaType": OCI_MANIFEST, "digest": d, "size": n, "platform": {"os": "linux", "architecture": arch}
            })).collect::<Vec<_>>()
        }))
        .unwrap();
        put_manifest(&c, &s, "acme/multi", "latest", OCI_INDEX, &index).await;

        let amd = get_json(&c, &api(&s, "repositories/acme/multi/-/tags/amd64")).await;
        assert_eq!(amd["size"].as_u64().unwrap() as usize, children[0].3, "{amd}");
        assert_eq!(amd["created"], "2026-01-02T03:04:05Z");
        assert_eq!(amd["manifest"]["layers"][0]["size"], 5000);
        assert_eq!(amd["platforms"], json!([]));

        let latest = get_json(&c, &api(&s, "repositories/acme/multi/-/tags/latest")).await;
        let platforms = latest["platforms"].as_array().unwrap();
        assert_eq!(platforms.len(), 2);
        assert_eq!(platforms[1]["platform"]["architecture"], "arm64");
        assert_eq!(platforms[1]["size"].as_u64().unwrap() as usize, children[1].3);
        assert_eq!(latest["size"].as_u64().unwrap() as usize, index.len() + children[0].3 + children[1].3);
        assert!(latest["created"].is_null());
        // The listing carries the same sizes; reading details is not a pull.
        let tags = get_json(&c, &api(&s, "repositories/acme/multi/-/tags")).await;
        assert_eq!(tags["items"][2]["size"], latest["size"]);
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert_eq!(get_json(&c, &api(&s, "repositories/acme/multi")).await["pull_count"], 0);
    });
}

/// Sharing as the consoles show it: the shares I granted, whether one exists,
/// and the repositories shared with my tenant.
#[test]
fn shares_granted_and_shared_with_me() {
    let dir = TempDir::new("manage-shares");
    let s = start(&dir);
    block_on(async {
        let ada = client_as("ada", &tenant_user_token(&s, "acme", "ada", "tenant-admin").await);
        let bob = client_as("bob", &tenant_user_token(&s, "beta", "bob", "developer").await);
        tenant_user_token(&s, "gamma", "gil", "developer").await;
        push_image(&ada, &s, "acme/app", "v1", 1, json!({})).await;
        push_image(&ada, &s, "acme/other", "v1", 2, json!({})).await;
        push_image(&bob, &s, "beta/own", "v1", 3, json!({})).await;
        let r = ada.put(api(&s, "repositories/acme/app/shares/beta")).json(&json!({"expires_in": 3600})).send().await.unwrap();
        assert_eq!(r.status(), 200);

        // Lifetimes that would overflow or wrap into the past are refused.
        for secs in [0u64, 4_611_686_018_427_387_904, u64::MAX] {
            let r = ada.put(api(&s, "repositories/acme/other/shares/beta")).json(&json!({"expires_in": secs})).send().await.unwrap();
            expect_error(r, 400, "INVALID_REQUEST", &format!("expires_in {secs}")).await;
        }

        let granted = get_json(&ada, &api(&s, "shares")).await;
        assert_eq!(granted["shares"].as_array().unwrap().len(), 1);
        assert_eq!(
            (granted["shares"][0]["repository"].as_str(), granted["shares"][0]["tenant"].as_str()),
            (Some("acme/app"), Some("beta"))
        );
        assert!(granted["shares"][0]["expires_ms"].as_i64().is_some());
        assert!(get_json(&bob, &api(&s, "shares")).await["shares"].as_array().unwrap().is_empty());

        assert_eq!(get_json(&ada, &api(&s, "repositories/acme/app/shares/beta")).await["actions"], json!(["pull"]));
        expect_error(ada.get(api(&s, "repositories/acme/app/shares/gamma")).send().await.unwrap(), 404, "NOT_FOUND", "not shared").await;
        expect_error(bob.get(api(&s, "repositories/acme/app/shares/beta")).send().await.unwrap(), 403, "DENIED", "not the owner").await;

        assert_eq!(names(&get_json(&bob, &api(&s, "repositories?scope=shared")).await), ["acme/app"]);
        assert!(names(&get_json(&ada, &api(&s, "repositories?scope=shared")).await).is_empty());
        // Bob's "all" holds his own and the shared one, never acme/other.
        assert_eq!(names(&get_json(&bob, &api(&s, "repositories")).await), ["acme/app", "beta/own"]);

        assert_eq!(ada.delete(api(&s, "repositories/acme/app/shares/beta")).send().await.unwrap().status(), 204);
        assert!(names(&get_json(&bob, &api(&s, "repositories?scope=shared")).await).is_empty());
        assert!(get_json(&ada, &api(&s, "shares")).await["shares"].as_array().unwrap().is_empty());
    });
}

/// A whole namespace shared with another tenant: every repository in it, present
/// and future, for pull or pull+push, until it lapses or is withdrawn; nothing
/// outside it, and not the namespace itself.
#[test]
fn namespace_shares_cover_every_repository_in_it() {
    let dir = TempDir::new("manage-ns-shares");
    let s = start(&dir);
    block_on(async {
        let ada = client_as("ada", &tenant_user_token(&s, "acme", "ada", "tenant-admin").await);
        let bob = client_as("bob", &tenant_user_token(&s, "beta", "bob", "developer").await);
        let r = ada.post(api(&s, "namespaces")).json(&json!({"name": "acme-tools"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        push_image(&ada, &s, "acme-tools/x", "v1", 1, json!({})).await;
        push_image(&ada, &s, "acme/app", "v1", 2, json!({})).await;
        let pull = |c: &reqwest::Client, repo: &str| {
            let c = c.clone();
            let url = s.url(&format!("/v2/{repo}/manifests/v1"));
            async move { c.get(url).header("accept", OCI_MANIFEST).send().await.unwrap().status().as_u16() }
        };
        assert_ne!(pull(&bob, "acme-tools/x").await, 200);

        let r = ada.put(api(&s, "namespaces/acme-tools/shares/beta")).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!((v["namespace"].as_str(), v["tenant"].as_str(), &v["actions"]), (Some("acme-tools"), Some("beta"), &json!(["pull"])));
        assert_eq!(pull(&bob, "acme-tools/x").await, 200);
        // A repository created later is covered too; nothing outside the namespace is.
        push_image(&ada, &s, "acme-tools/later", "v1", 3, json!({})).await;
        assert_eq!(pull(&bob, "acme-tools/later").await, 200);
        assert_ne!(pull(&bob, "acme/app").await, 200);
        assert_eq!(names(&get_json(&bob, &api(&s, "repositories?scope=shared")).await), ["acme-tools/later", "acme-tools/x"]);
        // Pull only: bob cannot push there; nor see or administer the namespace.
        let r = bob.post(s.url("/v2/acme-tools/x/blobs/uploads/")).send().await.unwrap();
        assert_eq!(r.status(), 403);
        expect_error(bob.get(api(&s, "namespaces/acme-tools")).send().await.unwrap(), 404, "NOT_FOUND", "namespace stays hidden").await;
        expect_error(bob.get(api(&s, "namespaces/acme-tools/shares")).send().await.unwrap(), 403, "DENIED", "not its admin").await;
        expect_error(bob.put(api(&s, "namespaces/acme-tools/shares/gamma")).json(&json!({})).send().await.unwrap(), 403, "DENIED", "x")
            .await;

        // What the consoles show: granted shares, exists, per namespace.
        let granted = get_json(&ada, &api(&s, "shares")).await;
        assert_eq!(granted["shares"], json!([{"namespace": "acme-tools", "tenant": "beta", "actions": ["pull"], "expires_ms": null}]));
        assert_eq!(get_json(&ada, &api(&s, "namespaces/acme-tools/shares/beta")).await["tenant"], "beta");
        expect_error(ada.get(api(&s, "namespaces/acme-tools/shares/gamma")).send().await.unwrap(), 404, "NOT_FOUND", "not shared").await;
        assert_eq!(get_json(&ada, &api(&s, "namespaces/acme-tools/shares")).await["shares"].as_array().unwrap().len(), 1);

        // Update to pull+push: bob pushes a new repository, which is acme's.
        let r = ada.put(api(&s, "namespaces/acme-tools/shares/beta")).json(&json!({"push": true})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        push_image(&bob, &s, "acme-tools/from-bob", "v1", 4, json!({})).await;
        assert_eq!(get_json(&ada, &api(&s, "repositories/acme-tools/from-bob")).await["tenant"], "acme");
        // Push goes only to beta's members who may push in beta: its reader pulls, never pushes.
        let bea = client_as("bea", &tenant_user_token(&s, "beta", "bea", "reader").await);
        assert_eq!(pull(&bea, "acme-tools/x").await, 200);
        let r = bea.post(s.url("/v2/acme-tools/x/blobs/uploads/")).send().await.unwrap();
        assert_eq!(r.status(), 403, "a reader of the share tenant may not push through a push share");

        // Bad input.
        for (body, what) in
            [(json!({"push": "yes"}), "wrong type"), (json!({"expires_in": 0}), "zero lifetime"), (json!({"x": 1}), "unknown field")]
        {
            let r = ada.put(api(&s, "namespaces/acme-tools/shares/beta")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 400, "{what}");
        }
        let r = ada.put(api(&s, "namespaces/acme-tools/shares/acme")).json(&json!({})).send().await.unwrap();
        expect_error(r, 400, "INVALID_REQUEST", "own tenant").await;
        let r = ada.put(api(&s, "namespaces/acme-tools/shares/nobody")).json(&json!({})).send().await.unwrap();
        expect_error(r, 404, "NOT_FOUND", "no such tenant").await;

        // Withdrawn: gone at once.
        assert_eq!(ada.delete(api(&s, "namespaces/acme-tools/shares/beta")).send().await.unwrap().status(), 204);
        assert_ne!(pull(&bob, "acme-tools/x").await, 200);
        assert!(names(&get_json(&bob, &api(&s, "repositories?scope=shared")).await).is_empty());

        // A share that lapses is withdrawn by the next refresh.
        let r = ada.put(api(&s, "namespaces/acme-tools/shares/beta")).json(&json!({"expires_in": 1})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(pull(&bob, "acme-tools/x").await, 200);
        eventually("namespace share expiry", async || pull(&bob, "acme-tools/x").await != 200).await;
        assert!(get_json(&ada, &api(&s, "shares")).await["shares"].as_array().unwrap().is_empty());

        // Deleting the namespace takes its shares: a namespace of the same name starts unshared.
        let r = ada.put(api(&s, "namespaces/acme-tools/shares/beta")).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(ada.delete(api(&s, "namespaces/acme-tools?force=true")).send().await.unwrap().status(), 200);
        let r = ada.post(api(&s, "namespaces")).json(&json!({"name": "acme-tools"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        push_image(&ada, &s, "acme-tools/x", "v1", 5, json!({})).await;
        assert_ne!(pull(&bob, "acme-tools/x").await, 200);
        assert!(get_json(&ada, &api(&s, "shares")).await["shares"].as_array().unwrap().is_empty());
    });
}

/// Official images: the platform's `library` namespace, readable by every
/// tenant and, as the default policy allows, by anonymous callers.
#[test]
fn official_images() {
    let dir = TempDir::new("manage-official");
    let s = start(&dir);
    block_on(async {
        let admin = client();
        let r = admin.post(api(&s, "tenants")).json(&json!({"name": "library"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        push_image(&admin, &s, "library/alpine", "3", 1, json!({})).await;
        push_image(&admin, &s, "library/alpine", "3.20", 2, json!({})).await;
        push_image(&admin, &s, "library/busybox", "1", 3, json!({})).await;
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "developer").await);
        push_image(&mia, &s, "acme/private", "v1", 4, json!({})).await;

        for c in [anon_client(), mia.clone()] {
            let v = get_json(&c, &api(&s, "official")).await;
            assert_eq!(names(&v), ["library/alpine", "library/busybox"]);
            assert_eq!(get_json(&c, &api(&s, "official/alpine")).await["tag_count"], 2);
            assert_eq!(names(&get_json(&c, &api(&s, "official/alpine/versions")).await), ["3", "3.20"]);
        }
        assert_eq!(names(&get_json(&mia, &api(&s, "official?keyword=busy")).await), ["library/busybox"]);
        expect_error(anon_client().get(api(&s, "official/nothing")).send().await.unwrap(), 404, "NAME_UNKNOWN", "unknown official").await;
        expect_error(anon_client().get(api(&s, "official?limit=-1")).send().await.unwrap(), 400, "INVALID_REQUEST", "bad limit").await;
        let r = anon_client().delete(api(&s, "official/alpine")).send().await.unwrap();
        assert_eq!(r.status(), 405);
        // The rest of the management API stays closed to anonymous callers.
        assert_eq!(anon_client().get(api(&s, "repositories/library/alpine")).send().await.unwrap().status(), 401);
        let r = admin.put(api(&s, "repositories/library/alpine/shares/acme")).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    });

    // The same through the CLI, with the registry's address and name checks.
    let creds = dir.path().join("creds.json");
    let env = [
        ("BERTH_SERVER", s.base.as_str()),
        ("BERTH_USER", "admin"),
        ("BERTH_PASSWORD", ADMIN_PASSWORD),
        ("BERTH_CREDENTIALS", creds.to_str().unwrap()),
    ];
    let run = |args: &[&str]| {
        let (code, out, err) = cli(&env, args);
        assert_eq!(code, 0, "berth {args:?}: {err}{out}");
        out
    };
    let out = run(&["official", "list"]);
    assert!(out.contains("library/alpine") && out.contains("library/busybox"), "{out}");
    assert!(run(&["official", "get", "alpine"]).contains("tag_count: 2"));
    let out = run(&["official", "versions", "alpine"]);
    assert!(out.contains("3.20"), "{out}");
    assert!(run(&["registry"]).contains(&format!("registry_address: {}", s.addr)));
    assert!(run(&["repo", "shares", "library/alpine"]).contains("acme"));
    assert_eq!(cli(&env, &["repo", "check", "acme/new-one"]).0, 0);
    let (code, out, _) = cli(&env, &["repo", "check", "library/alpine"]);
    assert_eq!(code, 1, "a taken name exits 1: {out}");
    let (code, out, _) = cli(&env, &["repo", "check", "Bad Name"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("valid: false"), "{out}");
}

/// The management APIs are no cross-site target: no Basic challenge a browser
/// would cache, JSON bodies only, cross-site state changes refused.
#[test]
fn management_api_is_not_a_csrf_target() {
    let dir = TempDir::new("manage-csrf");
    let s = start(&dir);
    block_on(async {
        let ada = client_as("ada", &tenant_user_token(&s, "acme", "ada", "tenant-admin").await);
        let create = |name: &str| json!({"name": name}).to_string();

        // A 401 never asks a browser for Basic credentials.
        for path in ["/api/v1/repositories", "/registry/v1/repositories/mine"] {
            let r = anon_client().get(s.url(path)).send().await.unwrap();
            assert_eq!(r.status(), 401);
            let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
            assert!(!challenge.to_ascii_lowercase().starts_with("basic"), "{path}: {challenge}");
        }
        let r = anon_client().post(s.url("/api/console")).json(&json!({"Action": "DescribeContainerImage"})).send().await.unwrap();
        assert!(!r.headers()["www-authenticate"].to_str().unwrap().to_ascii_lowercase().starts_with("basic"));

        // What an HTML form can send (text/plain, urlencoded) is refused before it is read.
        for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
            let r = ada.post(api(&s, "repositories")).header("content-type", ct).body(create("acme/form")).send().await.unwrap();
            expect_error(r, 415, "UNSUPPORTED", ct).await;
        }
        let r = ada
            .post(s.url("/api/console"))
            .header("content-type", "text/plain")
            .body(r#"{"Action":"DescribeContainerImageRepository"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415);

        // Cross-site state changes are refused; same-origin and non-browser ones pass.
        let r = ada
            .post(api(&s, "repositories"))
            .header("sec-fetch-site", "cross-site")
            .json(&json!({"name": "acme/x1"}))
            .send()
            .await
            .unwrap();
        expect_error(r, 403, "DENIED", "Sec-Fetch-Site cross-site").await;
        let r = ada
            .post(api(&s, "repositories"))
            .header("origin", "https://evil.example")
            .json(&json!({"name": "acme/x2"}))
            .send()
            .await
            .unwrap();
        expect_error(r, 403, "DENIED", "foreign Origin").await;
        let r = ada
            .patch(s.url("/registry/v1/acme/x/publicity"))
            .header("origin", "https://evil.example")
            .json(&json!({"Publicity": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let r = ada
            .post(api(&s, "repositories"))
            .header("origin", s.base.as_str())
            .header("sec-fetch-site", "same-origin")
            .json(&json!({"name": "acme/ok"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "same origin");
        // Nothing was created by the refused ones.
        assert_eq!(names(&get_json(&ada, &api(&s, "repositories")).await), ["acme/ok"]);
        // Reads are not state changes.
        let r = ada.get(api(&s, "repositories")).header("sec-fetch-site", "cross-site").send().await.unwrap();
        assert_eq!(r.status(), 200);
    });
}

/// Many tag pushes to one repository at once share group commits: every one
/// lands, with its tag, and the push counter counts each.
#[test]
fn concurrent_tag_pushes_all_land() {
    let dir = TempDir::new("manage-group");
    let s = start(&dir);
    block_on(async {
        let c = client();
        push_image(&c, &s, "acme/many", "base", 1, json!({})).await;
        let m: Value = get_json(&c, &s.url("/v2/acme/many/manifests/base")).await;
        let body = serde_json::to_vec(&m).unwrap();
        let pushes = (0..40).map(|i| {
            let (c, body, s) = (c.clone(), body.clone(), &s);
            async move {
                // Half re-tag the same manifest, half push new ones (a distinct annotation each).
                let body = if i % 2 == 0 {
                    body
                } else {
                    let mut v: Value = serde_json::from_slice(&body).unwrap();
                    v["annotations"] = json!({"n": i.to_string()});
                    serde_json::to_vec(&v).unwrap()
                };
                put_manifest(&c, s, "acme/many", &format!("t{i}"), OCI_MANIFEST, &body).await
            }
        });
        let digests = futures::future::join_all(pushes).await;
        for (i, d) in digests.iter().enumerate() {
            let r = c.head(s.url(&format!("/v2/acme/many/manifests/t{i}"))).header("accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), d);
        }
        let repo = get_json(&c, &api(&s, "repositories/acme/many")).await;
        assert_eq!((repo["tag_count"].as_u64(), repo["push_count"].as_u64(), repo["image_count"].as_u64()), (Some(41), Some(41), Some(21)));
        let fsck: Value = c.post(s.url("/api/v1/fsck")).json(&json!({})).send().await.unwrap().json().await.unwrap();
        assert_eq!(fsck["clean"], true, "{fsck}");
    });
}
