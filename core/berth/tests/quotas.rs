//! Quotas against the real binary: exact storage usage after 20 concurrent pushes
//! of one tenant interleaved with refusals, deletes, cancelled and expired
//! uploads; repository and namespace limits; defaults from configuration;
//! describe and set through the API and the CLI; bad input; a restart.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn api(s: &Server, path: &str) -> String {
    s.url(&format!("/api/v1/{path}"))
}

fn start(dir: &TempDir, extra: &str) -> Server {
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, format!("[registry]\nupload_sweep_secs = 1\n{extra}")).unwrap();
    Server::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap()), ("BERTH_UPLOAD_TTL_SECS", "2")])
}

async fn quota(c: &reqwest::Client, s: &Server, tenant: &str) -> Value {
    let r = c.get(api(s, &format!("tenants/{tenant}/quota"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn item<'a>(q: &'a Value, resource: &str) -> &'a Value {
    q["quotas"].as_array().unwrap().iter().find(|i| i["resource"] == resource).unwrap()
}

fn used(q: &Value, resource: &str) -> u64 {
    item(q, resource)["used"].as_u64().unwrap()
}

/// A refusal: status and the first error's code and detail.
#[derive(Debug)]
struct Refused(u16, String, String);

async fn refused(r: reqwest::Response) -> Refused {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    Refused(status, v["errors"][0]["code"].as_str().unwrap_or("").into(), v["errors"][0]["detail"].as_str().unwrap_or("").into())
}

fn location(s: &Server, r: &reqwest::Response) -> String {
    let loc = r.headers()["location"].to_str().unwrap();
    if loc.starts_with("http") {
        loc.to_owned()
    } else {
        s.url(loc)
    }
}

/// A blob pushed in one monolithic request, or as POST + PATCH + PUT.
async fn push_blob_as(c: &reqwest::Client, s: &Server, repo: &str, data: &[u8], chunked: bool) -> Result<String, Refused> {
    let d = sha256(data);
    if !chunked {
        let r = c.post(s.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}"))).body(data.to_vec()).send().await.unwrap();
        return if r.status() == 201 { Ok(d) } else { Err(refused(r).await) };
    }
    let r = c.post(s.url(&format!("/v2/{repo}/blobs/uploads/"))).send().await.unwrap();
    if r.status() != 202 {
        return Err(refused(r).await);
    }
    let r = c.patch(location(s, &r)).header("content-type", "application/octet-stream").body(data.to_vec()).send().await.unwrap();
    if r.status() != 202 {
        return Err(refused(r).await);
    }
    let put = location(s, &r);
    let sep = if put.contains('?') { '&' } else { '?' };
    let r = c.put(format!("{put}{sep}digest={d}")).send().await.unwrap();
    if r.status() == 201 {
        Ok(d)
    } else {
        Err(refused(r).await)
    }
}

/// What the test knows was acknowledged: per repository, digest → size.
type Acked = HashMap<String, HashMap<String, u64>>;

fn expected_usage(acked: &Acked) -> u64 {
    let mut seen = HashMap::new();
    for blobs in acked.values() {
        seen.extend(blobs.iter().map(|(d, n)| (d.clone(), *n)));
    }
    seen.values().sum()
}

/// One worker: pushes an image (config, a layer of its own, the layer every
/// worker shares, the manifest) into its repository; records what was
/// acknowledged; some workers then delete their repository.
async fn worker(c: reqwest::Client, s: &Server, i: u64, shared: &[u8]) -> (String, HashMap<String, u64>, Vec<Refused>) {
    let repo = format!("acme/app{}", i % 14);
    let mut acked = HashMap::new();
    let mut refusals = vec![];
    let config = format!("{{\"worker\":{i}}}").into_bytes();
    let own = bytes(1000 + i, 20_000 + i as usize);
    let mut layers = vec![];
    for (n, data) in [&config[..], &own[..], shared].into_iter().enumerate() {
        match push_blob_as(&c, s, &repo, data, (i + n as u64).is_multiple_of(2)).await {
            Ok(d) => {
                acked.insert(d.clone(), data.len() as u64);
                layers.push((d, data.len()));
            }
            Err(e) => refusals.push(e),
        }
    }
    if layers.len() == 3 {
        let m = image_manifest((&layers[0].0, layers[0].1), &[(&layers[1].0, layers[1].1), (&layers[2].0, layers[2].1)], json!({}));
        let r =
            c.put(s.url(&format!("/v2/{repo}/manifests/v{i}"))).header("content-type", OCI_MANIFEST).body(m.clone()).send().await.unwrap();
        if r.status() == 201 {
            acked.insert(sha256(&m), m.len() as u64);
        } else {
            refusals.push(refused(r).await);
        }
    }
    (repo, acked, refusals)
}

#[test]
fn storage_quota_holds_exactly_under_concurrent_pushes() {
    let dir = TempDir::new("quota-storage");
    let mut s = start(&dir, "");
    block_on(async {
        let token = tenant_user_token(&s, "acme", "mia", "maintainer").await;
        let mia = client_as("mia", &token);
        let admin = client();
        let limit: u64 = 200_000;
        let r = admin.put(api(&s, "tenants/acme/quota")).json(&json!({"storage_bytes": limit})).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

        // An upload left to expire and one cancelled, both holding reservations
        // while the pushes run.
        let r = mia.post(s.url("/v2/acme/stale/blobs/uploads/")).send().await.unwrap();
        let stale = location(&s, &r);
        let r = mia.patch(&stale).body(bytes(7, 30_000)).send().await.unwrap();
        assert_eq!(r.status(), 202);
        let r = mia.post(s.url("/v2/acme/cancelled/blobs/uploads/")).send().await.unwrap();
        let cancelled = location(&s, &r);
        assert_eq!(mia.patch(&cancelled).body(bytes(8, 10_000)).send().await.unwrap().status(), 202);
        let q = quota(&mia, &s, "acme").await;
        assert_eq!(q["reserved_bytes"], 40_000, "{q}");

        // 20 concurrent pushes of ~20 KB each plus a 15 KB layer they all share:
        // more than the limit leaves room for.
        let shared = bytes(99, 15_000);
        type Task<'a> = Pin<Box<dyn Future<Output = (String, HashMap<String, u64>, Vec<Refused>)> + 'a>>;
        let mut tasks: Vec<Task> = vec![];
        for i in 0..20 {
            tasks.push(Box::pin(worker(mia.clone(), &s, i, &shared)));
        }
        tasks.push(Box::pin(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(mia.delete(&cancelled).send().await.unwrap().status(), 204);
            (String::new(), HashMap::new(), vec![])
        }));
        let results = futures::future::join_all(tasks).await;
        let mut acked: Acked = HashMap::new();
        let mut refusals = vec![];
        for (repo, blobs, refused) in results {
            acked.entry(repo).or_default().extend(blobs);
            refusals.extend(refused);
        }
        acked.remove("");
        assert!(!refusals.is_empty(), "the limit must have refused some pushes");
        for Refused(status, code, detail) in &refusals {
            assert_eq!((*status, code.as_str()), (403, "DENIED"), "{detail}");
            assert!(detail.contains("storage quota of tenant acme"), "{detail}");
        }
        let pushed = acked.values().filter(|b| !b.is_empty()).count();
        assert!(pushed > 0, "some pushes fit");

        // Delete two repositories whose pushes are over (other repositories may
        // hold the same shared layer, which then stays counted).
        for repo in ["acme/app0", "acme/app1"] {
            if acked.get(repo).is_some_and(|b| !b.is_empty()) {
                let r = mia.delete(api(&s, &format!("repositories/{repo}"))).send().await.unwrap();
                assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
                acked.remove(repo);
            }
        }

        // The expired session's reservation goes with it.
        let mut q = quota(&mia, &s, "acme").await;
        for _ in 0..50 {
            if q["reserved_bytes"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            q = quota(&mia, &s, "acme").await;
        }
        assert_eq!(q["reserved_bytes"], 0, "{q}");
        let usage = used(&q, "storage_bytes");
        assert_eq!(usage, expected_usage(&acked), "usage equals what was acknowledged, each digest once: {q}");
        assert!(usage <= limit);
        assert_eq!(item(&q, "storage_bytes")["limit"], limit);
        assert_eq!(item(&q, "storage_bytes")["source"], "tenant");

        // The quota actor's figure is exact too: exactly the headroom fits, one
        // byte more does not.
        let headroom = (limit - usage) as usize;
        let fits = bytes(5, headroom);
        let e = push_blob_as(&mia, &s, "acme/last", &[&fits[..], b"x"].concat(), true).await.unwrap_err();
        assert_eq!((e.0, e.1.as_str()), (403, "DENIED"), "{e:?}");
        assert!(e.2.contains(&format!("the limit is {limit} bytes")), "{e:?}");
        push_blob_as(&mia, &s, "acme/last", &fits, false).await.expect("exactly the headroom fits");
        let e = push_blob_as(&mia, &s, "acme/last", b"y", false).await.unwrap_err();
        assert_eq!(e.1, "DENIED");
        // The same bytes in another repository of the tenant cost nothing more.
        let r = mia.post(s.url(&format!("/v2/acme/again/blobs/uploads/?mount={}&from=acme/last", sha256(&fits)))).send().await.unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(used(&quota(&mia, &s, "acme").await, "storage_bytes"), limit);
        // Deleting it from one repository keeps it counted; from both, frees it.
        let r = mia.delete(api(&s, "repositories/acme/last")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(used(&quota(&mia, &s, "acme").await, "storage_bytes"), limit);
        let r = mia.delete(api(&s, "repositories/acme/again")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(used(&quota(&mia, &s, "acme").await, "storage_bytes"), usage);
    });

    // Usage survives a restart.
    let before = block_on(async { used(&quota(&client(), &s, "acme").await, "storage_bytes") });
    s.stop();
    let s = start(&dir, "");
    block_on(async {
        let q = quota(&client(), &s, "acme").await;
        assert_eq!(used(&q, "storage_bytes"), before);
        assert_eq!(item(&q, "storage_bytes")["limit"], 200_000);
    });
}

#[test]
fn repository_and_namespace_limits_defaults_cli_and_bad_input() {
    let dir = TempDir::new("quota-counts");
    let s = start(&dir, "[registry.quota]\nrepositories = 2\n");
    block_on(async {
        let token = tenant_user_token(&s, "acme", "mia", "tenant-admin").await;
        let mia = client_as("mia", &token);
        let admin = client();

        // The configured default applies until the tenant gets its own limit.
        let q = quota(&mia, &s, "acme").await;
        assert_eq!((item(&q, "repositories")["limit"].as_u64(), item(&q, "repositories")["source"].as_str()), (Some(2), Some("default")));
        assert_eq!(item(&q, "namespaces")["source"], "none");
        let mine: Value = mia.get(api(&s, "quotas")).send().await.unwrap().json().await.unwrap();
        assert_eq!(mine["tenant"], "acme");

        push_image(&mia, &s, "acme/one", "v1", 1, json!({})).await;
        let r = mia.post(api(&s, "repositories")).json(&json!({"name": "acme/two"})).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        // A third repository: refused at the first request that would create it,
        // by a push or explicitly, naming the quota.
        let e = refused(mia.post(s.url("/v2/acme/three/blobs/uploads/")).send().await.unwrap()).await;
        assert_eq!((e.0, e.1.as_str()), (403, "DENIED"));
        assert!(e.2.contains("repository quota of tenant acme reached: 2 of 2"), "{e:?}");
        let e = refused(mia.post(api(&s, "repositories")).json(&json!({"name": "acme/three"})).send().await.unwrap()).await;
        assert_eq!(e.1, "DENIED");
        // Pushing to an existing repository goes on.
        push_image(&mia, &s, "acme/one", "v2", 2, json!({})).await;
        // Deleting one makes room.
        assert_eq!(mia.delete(api(&s, "repositories/acme/two")).send().await.unwrap().status(), 200);
        push_image(&mia, &s, "acme/three", "v1", 3, json!({})).await;
        assert_eq!(used(&quota(&mia, &s, "acme").await, "repositories"), 2);

        // Namespaces: the tenant's own counts; the limit refuses the next.
        let r = admin.put(api(&s, "tenants/acme/quota")).json(&json!({"namespaces": 2, "repositories": 10})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let ns = |name: &str| json!({"name": name, "tenant": "acme"});
        assert_eq!(mia.post(api(&s, "namespaces")).json(&ns("acme-tools")).send().await.unwrap().status(), 201);
        let e = refused(mia.post(api(&s, "namespaces")).json(&ns("acme-more")).send().await.unwrap()).await;
        assert_eq!((e.0, e.1.as_str()), (403, "DENIED"), "{e:?}");
        assert!(e.2.contains("namespace quota of tenant acme reached: 2 of 2"), "{e:?}");
        let e = refused(admin.post(api(&s, "tenants/acme/namespaces")).json(&json!({"name": "acme-x"})).send().await.unwrap()).await;
        assert_eq!(e.1, "DENIED");
        let q = quota(&mia, &s, "acme").await;
        assert_eq!((used(&q, "namespaces"), item(&q, "repositories")["source"].as_str()), (2, Some("tenant")));

        // Bad input: a clear 4xx, nothing changed.
        for body in
            [json!({"storage": 5}), json!({"storage_bytes": -1}), json!({"storage_bytes": "5GB"}), json!({"namespaces": 1u64 << 60})]
        {
            let r = admin.put(api(&s, "tenants/acme/quota")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 400, "{body}: {}", r.text().await.unwrap());
        }
        let r = admin.put(api(&s, "tenants/nobody/quota")).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 404);
        // Only the platform admin sets limits; other tenants see nothing.
        assert_eq!(mia.put(api(&s, "tenants/acme/quota")).json(&json!({})).send().await.unwrap().status(), 403);
        let bob = client_as("bob", &tenant_user_token(&s, "beta", "bob", "tenant-admin").await);
        assert_eq!(bob.get(api(&s, "tenants/acme/quota")).send().await.unwrap().status(), 404);
        assert_eq!(anon_client().get(api(&s, "quotas")).send().await.unwrap().status(), 401);
        assert_eq!(admin.get(api(&s, "quotas")).send().await.unwrap().status(), 400, "a platform user names the tenant");
    });

    // The CLI: as the tenant's user and as the platform admin.
    let cli = |user: &str, secret: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .env("BERTH_SERVER", &s.base)
            .env("BERTH_USER", user)
            .env("BERTH_PASSWORD", secret)
            .env("BERTH_CREDENTIALS", dir.path().join("none.json"))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = cli("admin", ADMIN_PASSWORD, &["quota", "set", "acme", "--storage", "1MB", "--repositories", "7"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("storage_bytes") && out.contains("1000000") && out.contains("tenant"), "{out}");
    let (code, out) = cli("admin", ADMIN_PASSWORD, &["--json", "quota", "get", "acme"]);
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(item(&v, "repositories")["limit"], 7);
    assert_eq!(item(&v, "namespaces")["source"], "none", "a limit not given returns to the default (here: none)");
    let (code, out) = cli("admin", ADMIN_PASSWORD, &["quota", "set", "acme", "--storage", "lots"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("not a size"), "{out}");
}

/// One user cannot hold unbounded upload sessions: past
/// `registry.max_uploads_per_user` a new one is a 429; other users are not
/// affected, and a finished or cancelled session frees its place.
#[tokio::test]
async fn one_user_cannot_hold_unbounded_upload_sessions() {
    let dir = TempDir::new("upload-cap");
    let s = Server::start_configured(&dir, "[registry]\nmax_uploads_per_user = 3\n");
    let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "developer").await);
    let open = |c: &reqwest::Client| {
        let (c, url) = (c.clone(), s.url("/v2/acme/app/blobs/uploads/"));
        async move { c.post(url).send().await.unwrap() }
    };
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let r = open(&mia).await;
        assert_eq!(r.status(), 202);
        sessions.push(location(&s, &r));
    }
    let r = refused(open(&mia).await).await;
    assert_eq!((r.0, r.1.as_str()), (429, "TOOMANYREQUESTS"), "{r:?}");
    assert!(r.2.contains("max_uploads_per_user"), "{r:?}");
    assert_eq!(open(&client()).await.status(), 202, "another user opens sessions");
    assert_eq!(mia.delete(&sessions[0]).send().await.unwrap().status(), 204);
    assert_eq!(open(&mia).await.status(), 202, "a cancelled session frees its place");
}
