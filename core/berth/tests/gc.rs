//! Online garbage collection against the real binary: storage returns to its
//! starting size after images are pushed and deleted while other pushes go on,
//! with no image broken; each race the collector must survive (a blob uploaded
//! but not yet referenced, a blob a push found present and is about to
//! reference, a blob two repositories share) has a test that fails without its
//! protection; dry runs, the CLI, the background collector, usage per tenant.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const GRACE_SECS: u64 = 2;

fn start(dir: &TempDir, background: bool) -> Server {
    let cfg = dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "[registry.gc]\nenabled = {background}\ninterval_secs = 1\ngrace_secs = {GRACE_SECS}\n[registry]\ncounter_flush_secs = 1\n"
        ),
    )
    .unwrap();
    Server::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap())])
}

/// Every stored blob file: digest → size.
fn stored(data: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let root = data.join("blobs/blobs/sha256");
    for prefix in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(prefix.path()).into_iter().flatten().flatten() {
            out.insert(format!("sha256:{}", f.file_name().to_string_lossy()), f.metadata().unwrap().len());
        }
    }
    out
}

async fn gc(s: &Server, dry_run: bool) -> Value {
    let r = client().post(s.url("/api/v1/gc")).json(&json!({"dry_run": dry_run})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Wait out the grace period, then run a pass.
async fn gc_after_grace(s: &Server) -> Value {
    tokio::time::sleep(Duration::from_millis(GRACE_SECS * 1000 + 300)).await;
    gc(s, false).await
}

/// Pull an image completely and check every digest.
async fn pull_verified(c: &reqwest::Client, s: &Server, repo: &str, reference: &str) {
    let r = c.get(s.url(&format!("/v2/{repo}/manifests/{reference}"))).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200, "manifest {repo}:{reference}");
    let m: Value = r.json().await.unwrap();
    let mut descs = vec![m["config"].clone()];
    descs.extend(m["layers"].as_array().unwrap().iter().cloned());
    for d in descs {
        let digest = d["digest"].as_str().unwrap();
        let r = c.get(s.url(&format!("/v2/{repo}/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "blob {digest} of {repo}:{reference}");
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    }
}

/// Push an image whose config and layer are unique to `seed`, sharing `shared` as a second layer.
async fn push_with(c: &reqwest::Client, s: &Server, repo: &str, tag: &str, seed: u64, shared: &[u8]) -> String {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let cd = push_blob(c, s, repo, &config).await;
    let own = bytes(seed, 5000 + seed as usize);
    let od = push_blob(c, s, repo, &own).await;
    let sd = push_blob(c, s, repo, shared).await;
    let m = image_manifest((&cd, config.len()), &[(&od, own.len()), (&sd, shared.len())], json!({}));
    put_manifest(c, s, repo, tag, OCI_MANIFEST, &m).await
}

#[test]
fn storage_returns_to_its_size_while_other_pushes_go_on() {
    let dir = TempDir::new("gc-size");
    let s = start(&dir, false);
    let data = dir.path().join("data");
    block_on(async {
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "maintainer").await);
        let shared = bytes(4242, 7000);
        push_with(&mia, &s, "acme/base", "v1", 1, &shared).await;
        let before = stored(&data);
        let usage = |v: Value| v["quotas"].as_array().unwrap().iter().find(|q| q["resource"] == "storage_bytes").unwrap()["used"].as_u64();
        let usage_before = usage(client().get(s.url("/api/v1/tenants/acme/quota")).send().await.unwrap().json().await.unwrap());

        // Images pushed and deleted (whole repositories, and one manifest by
        // digest, which leaves its layers linked but unneeded) while other pushes
        // go on; the shared layer stays needed by acme/base throughout.
        let churn = async {
            for i in 0..4u64 {
                push_with(&mia, &s, &format!("acme/tmp{i}"), "v1", 100 + i, &shared).await;
            }
            let d = push_with(&mia, &s, "acme/mixed", "gone", 200, &shared).await;
            push_with(&mia, &s, "acme/mixed", "stays", 201, &shared).await;
            for i in 0..4u64 {
                let r = mia.delete(s.url(&format!("/api/v1/repositories/acme/tmp{i}"))).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
            let r = mia.delete(s.url(&format!("/v2/acme/mixed/manifests/{d}"))).send().await.unwrap();
            assert_eq!(r.status(), 202);
        };
        let others = async {
            let mut kept = vec![];
            for i in 0..6u64 {
                push_with(&mia, &s, "acme/keep", &format!("v{i}"), 300 + i, &shared).await;
                kept.push(format!("v{i}"));
                // Passes run while these pushes go on.
                gc(&s, false).await;
            }
            kept
        };
        let ((), kept) = futures::join!(churn, others);

        // Pass one removes the links no manifest needs; pass two, past the grace
        // period of the digests they left unreferenced, their bytes.
        let first = gc_after_grace(&s).await;
        assert!(first["links_removed"].as_u64().unwrap() >= 2, "the deleted manifest's own config and layer: {first}");
        assert!(first["freed_by_tenant"]["acme"].as_u64().unwrap() > 0, "{first}");
        let freed = metric(&s, "berth_gc_tenant_freed_bytes_total{tenant=\"acme\"}").await;
        assert!(freed >= first["freed_by_tenant"]["acme"].as_u64().unwrap() as f64, "{freed} {first}");
        let second = gc_after_grace(&s).await;
        assert!(second["blobs_deleted"].as_u64().unwrap() > 0, "{second}");
        assert_eq!(gc(&s, false).await["blobs_deleted"], 0, "nothing left");

        // What is stored: exactly what was there before, plus what the kept images use.
        let mut expected = before.clone();
        for repo_tag in kept.iter().map(|t| ("acme/keep", t.as_str())).chain([("acme/mixed", "stays")]) {
            let r = mia
                .get(s.url(&format!("/v2/{}/manifests/{}", repo_tag.0, repo_tag.1)))
                .header("accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            let body = r.bytes().await.unwrap();
            expected.insert(sha256(&body), body.len() as u64);
            let m: Value = serde_json::from_slice(&body).unwrap();
            for d in std::iter::once(&m["config"]).chain(m["layers"].as_array().unwrap()) {
                expected.insert(d["digest"].as_str().unwrap().to_owned(), d["size"].as_u64().unwrap());
            }
        }
        let after = stored(&data);
        assert_eq!(after, expected, "storage holds exactly what the remaining images use");
        // No image broken.
        pull_verified(&mia, &s, "acme/base", "v1").await;
        pull_verified(&mia, &s, "acme/mixed", "stays").await;
        for t in &kept {
            pull_verified(&mia, &s, "acme/keep", t).await;
        }
        // The tenant's usage agrees: deleting everything but the base brings it back.
        for repo in ["acme/keep", "acme/mixed"] {
            assert_eq!(mia.delete(s.url(&format!("/api/v1/repositories/{repo}"))).send().await.unwrap().status(), 200);
        }
        let q: Value = client().get(s.url("/api/v1/tenants/acme/quota")).send().await.unwrap().json().await.unwrap();
        assert_eq!(usage(q), usage_before);
        gc_after_grace(&s).await;
        assert_eq!(stored(&data), before, "storage back to its starting size");
        pull_verified(&mia, &s, "acme/base", "v1").await;
    });
}

#[test]
fn a_blob_uploaded_but_not_yet_referenced_stays() {
    let dir = TempDir::new("gc-pending");
    let s = start(&dir, false);
    block_on(async {
        let c = client();
        let config = b"{\"pending\":1}".to_vec();
        let layer = bytes(9, 4000);
        let cd = push_blob(&c, &s, "acme/pending", &config).await;
        let ld = push_blob(&c, &s, "acme/pending", &layer).await;
        // A pass while the push is between its blobs and its manifest.
        let r = gc(&s, false).await;
        assert_eq!(r["links_removed"], 0, "{r}");
        let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], json!({}));
        put_manifest(&c, &s, "acme/pending", "v1", OCI_MANIFEST, &m).await;
        pull_verified(&c, &s, "acme/pending", "v1").await;
    });
}

#[test]
fn a_blob_a_push_found_present_stays_for_its_manifest() {
    let dir = TempDir::new("gc-head");
    let s = start(&dir, false);
    block_on(async {
        let c = client();
        let shared = bytes(77, 3000);
        let old = push_with(&c, &s, "acme/r", "old", 1, &shared).await;
        // The image goes; its layers stay linked, unneeded, past the grace period.
        assert_eq!(c.delete(s.url(&format!("/v2/acme/r/manifests/{old}"))).send().await.unwrap().status(), 202);
        tokio::time::sleep(Duration::from_millis(GRACE_SECS * 1000 + 300)).await;
        // A client pushing a new image that reuses a layer checks it is there
        // (docker's HEAD) and skips uploading it ...
        let own = bytes(1, 5001);
        let od = sha256(&own);
        assert_eq!(c.head(s.url(&format!("/v2/acme/r/blobs/{od}"))).send().await.unwrap().status(), 200);
        // ... a pass runs meanwhile ...
        let r = gc(&s, false).await;
        // ... and the manifest that references the layer it found still lands.
        let config = b"{\"new\":1}".to_vec();
        let cd = push_blob(&c, &s, "acme/r", &config).await;
        let m = image_manifest((&cd, config.len()), &[(&od, own.len())], json!({}));
        put_manifest(&c, &s, "acme/r", "new", OCI_MANIFEST, &m).await;
        pull_verified(&c, &s, "acme/r", "new").await;
        // What nobody asked for went: the old config and the shared layer.
        assert_eq!(r["links_removed"], 2, "{r}");
    });
}

#[test]
fn a_blob_two_repositories_share_survives_one_deleted() {
    let dir = TempDir::new("gc-shared");
    let s = start(&dir, false);
    let data = dir.path().join("data");
    block_on(async {
        let c = client();
        let shared = bytes(5, 6000);
        push_with(&c, &s, "acme/a", "v1", 1, &shared).await;
        // The same bytes, uploaded separately to another tenant's repository.
        push_with(&c, &s, "beta/b", "v1", 1, &shared).await;
        assert_eq!(c.delete(s.url("/api/v1/repositories/acme/a")).send().await.unwrap().status(), 200);
        gc_after_grace(&s).await;
        gc_after_grace(&s).await;
        pull_verified(&c, &s, "beta/b", "v1").await;
        assert!(stored(&data).contains_key(&sha256(&shared)));
        // Once the last one goes, so do the bytes.
        assert_eq!(c.delete(s.url("/api/v1/repositories/beta/b")).send().await.unwrap().status(), 200);
        let r = gc_after_grace(&s).await;
        assert!(r["blobs_deleted"].as_u64().unwrap() >= 4, "{r}");
        assert!(stored(&data).is_empty(), "{:?}", stored(&data));
    });
}

#[test]
fn dry_runs_cli_and_the_background_collector() {
    let dir = TempDir::new("gc-bg");
    let s = start(&dir, true);
    let data = dir.path().join("data");
    let cli = |args: &[&str]| admin_cli(&s, dir.path(), args);
    block_on(async {
        let c = client();
        push_with(&c, &s, "acme/x", "v1", 1, &bytes(2, 100)).await;
        let files = stored(&data);
        assert_eq!(c.delete(s.url("/api/v1/repositories/acme/x")).send().await.unwrap().status(), 200);
        // Before the grace period: a dry run lists nothing yet.
        let r = gc(&s, true).await;
        assert_eq!((r["dry_run"].as_bool(), r["blobs_deleted"].as_u64()), (Some(true), Some(0)), "{r}");
        tokio::time::sleep(Duration::from_millis(GRACE_SECS * 1000 + 100)).await;
        let (code, out) = cli(&["gc", "run", "--dry-run"]);
        assert_eq!(code, Some(0), "{out}");
        // The background pass may have taken them already; if not, the dry run lists them.
        if stored(&data) == files {
            assert!(out.contains("would remove") && files.keys().any(|d| out.contains(d.as_str())), "{out}");
        }
        // The background collector reclaims them without being asked.
        for _ in 0..100 {
            if stored(&data).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(stored(&data).is_empty(), "the background collector did not run");
        let (code, out) = cli(&["gc", "status"]);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("collector: on") && out.contains("grace 2 s"), "{out}");
        let st: Value = c.get(s.url("/api/v1/gc")).send().await.unwrap().json().await.unwrap();
        assert!(st["bytes_reclaimed"].as_u64().unwrap() >= files.values().sum::<u64>(), "{st}");
        // The same totals in the metrics (OpenMetrics text, platform admin only).
        let r = c.get(s.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
        assert_eq!(metric(&s, "berth_gc_reclaimed_bytes_total").await, st["bytes_reclaimed"].as_u64().unwrap() as f64);
        assert_eq!(metric(&s, "berth_gc_blobs_deleted_total").await, st["blobs_deleted"].as_u64().unwrap() as f64);
        assert!(metric(&s, "berth_http_requests_total{route=\"uploads\",status=\"201\"}").await >= 1.0);
        assert!(metric(&s, "berth_process_resident_memory_bytes").await > 0.0);
        assert_eq!(reqwest::Client::new().get(s.url("/metrics")).send().await.unwrap().status(), 401);
        // Platform admins only; bad input gets a 400.
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "tenant-admin").await);
        assert_eq!(mia.get(s.url("/metrics")).send().await.unwrap().status(), 403);
        assert_eq!(mia.get(s.url("/api/v1/gc")).send().await.unwrap().status(), 403);
        assert_eq!(mia.post(s.url("/api/v1/gc")).json(&json!({})).send().await.unwrap().status(), 403);
        assert_eq!(c.post(s.url("/api/v1/gc")).json(&json!({"dry_run": "yes"})).send().await.unwrap().status(), 400);
        assert_eq!(c.post(s.url("/api/v1/gc")).json(&json!({"now": true})).send().await.unwrap().status(), 400);
    });
}

/// One blob pushed into many repositories at once (a popular base layer): every
/// push lands, and the digest's reference count is exact.
#[test]
fn one_blob_pushed_into_many_repositories_at_once() {
    let dir = TempDir::new("gc-popular");
    let s = start(&dir, false);
    block_on(async {
        let c = client();
        // The same image everywhere: one config, one layer, one manifest.
        let pushes = (0..120).map(|i| {
            let c = c.clone();
            let s = &s;
            async move {
                let repo = format!("acme/r{i:03}");
                let cd = push_blob(&c, s, &repo, b"{}").await;
                let ld = push_blob(&c, s, &repo, b"the same bytes").await;
                put_manifest(&c, s, &repo, "v1", OCI_MANIFEST, &image_manifest((&cd, 2), &[(&ld, 14)], json!({}))).await;
                ld
            }
        });
        let digests = futures::future::join_all(pushes).await;
        assert!(digests.iter().all(|d| d == &digests[0]));
        // Deleting all but one repository leaves the bytes; the last one frees them.
        for i in 1..120 {
            assert_eq!(c.delete(s.url(&format!("/api/v1/repositories/acme/r{i:03}"))).send().await.unwrap().status(), 200);
        }
        let r = gc_after_grace(&s).await;
        assert_eq!(r["blobs_deleted"], 0, "{r}");
        assert_eq!(c.get(s.url(&format!("/v2/acme/r000/blobs/{}", digests[0]))).send().await.unwrap().status(), 200);
        assert_eq!(c.delete(s.url("/api/v1/repositories/acme/r000")).send().await.unwrap().status(), 200);
        assert_eq!(gc_after_grace(&s).await["blobs_deleted"], 3, "config, layer and manifest");
    });
}
