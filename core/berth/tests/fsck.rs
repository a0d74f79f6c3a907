//! `berth fsck` against the real binary: a clean store reports clean (through the
//! API and the CLI, online and offline); missing bytes, stray files and corrupt
//! content are found; `--repair` fixes what is safe to fix.

mod common;

use common::*;
use serde_json::{json, Value};

fn fsck_offline(data: &std::path::Path, args: &[&str]) -> (Option<i32>, Value) {
    let mut cmd = berth_command();
    let out = cmd.args(["--json", "fsck", "--offline", "--data-dir"]).arg(data).args(args).env("BERTH_LOG", "warn").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text} {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), v)
}

fn blob_path(data: &std::path::Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    data.join("blobs/blobs/sha256").join(&hex[..2]).join(hex)
}

#[test]
fn fsck_finds_and_repairs() {
    let dir = TempDir::new("fsck");
    let data = dir.path().join("data");
    let mut s = Server::start_in(&data, &[]);
    let (layer, kept) = block_on(async {
        let c = client();
        push_image(&c, &s, "acme/app", "v1", 1, json!({})).await;
        push_image(&c, &s, "acme/app", "v2", 2, json!({})).await;
        push_image(&c, &s, "beta/other", "v1", 3, json!({})).await;
        assert_eq!(c.delete(s.url("/api/v1/repositories/beta/other")).send().await.unwrap().status(), 200);
        let r = c.post(s.url("/api/v1/fsck")).json(&json!({"rehash": true})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["clean"], true, "{v}");
        assert_eq!((v["repositories"].as_u64(), v["tags"].as_u64()), (Some(1), Some(2)), "{v}");
        assert!(v["awaiting_collection"].as_u64().unwrap() >= 3, "beta/other's digests wait for the collector: {v}");
        // Platform admins only.
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "tenant-admin").await);
        assert_eq!(mia.post(s.url("/api/v1/fsck")).json(&json!({})).send().await.unwrap().status(), 403);
        let m: Value = c.get(s.url("/v2/acme/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap().json().await.unwrap();
        let m2: Value =
            c.get(s.url("/v2/acme/app/manifests/v2")).header("accept", OCI_MANIFEST).send().await.unwrap().json().await.unwrap();
        (m["layers"][0]["digest"].as_str().unwrap().to_owned(), m2["layers"][0]["digest"].as_str().unwrap().to_owned())
    });
    s.stop();

    // Offline, the same store is clean too.
    let (code, v) = fsck_offline(&data, &[]);
    assert_eq!((code, &v["clean"]), (Some(0), &json!(true)), "{v}");

    // Damage: a linked blob's bytes vanish; a stray file appears.
    std::fs::remove_file(blob_path(&data, &layer)).unwrap();
    let stray = bytes(99, 321);
    let stray_digest = sha256(&stray);
    let p = blob_path(&data, &stray_digest);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, &stray).unwrap();
    let (code, v) = fsck_offline(&data, &[]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["dangling_links"]["count"], 1, "{v}");
    assert!(v["dangling_links"]["items"][0].as_str().unwrap().contains(&format!("acme/app@{layer}")), "{v}");
    assert_eq!(v["orphans"]["count"], 1, "{v}");
    assert!(v["orphans"]["items"][0].as_str().unwrap().starts_with(&stray_digest), "{v}");

    // Repair: the dangling link goes, the orphan is adopted for the collector.
    let (code, v) = fsck_offline(&data, &["--repair"]);
    assert_eq!(code, Some(1), "the run that repairs still reports what it found: {v}");
    assert_eq!(v["repaired"].as_array().unwrap().len(), 3, "{v}");
    let (code, v) = fsck_offline(&data, &[]);
    assert_eq!((code, &v["clean"], &v["orphans"]["count"]), (Some(0), &json!(true), &json!(0)), "{v}");

    // Corrupt content of the same size: found only by rehashing, never "repaired".
    let kept_path = blob_path(&data, &kept);
    let mut content = std::fs::read(&kept_path).unwrap();
    content[0] ^= 0xff;
    std::fs::write(&kept_path, &content).unwrap();
    assert_eq!(fsck_offline(&data, &[]).0, Some(0));
    let (code, v) = fsck_offline(&data, &["--rehash", "--repair"]);
    assert_eq!(code, Some(1));
    assert_eq!(v["digest_mismatches"]["count"], 1, "{v}");
    assert!(v["digest_mismatches"]["items"][0].as_str().unwrap().starts_with(&kept), "{v}");

    // Served again: the repaired repository says the lost blob is unknown, so a
    // client uploads it again.
    let s = Server::start_in(&data, &[]);
    block_on(async {
        let c = client();
        assert_eq!(c.head(s.url(&format!("/v2/acme/app/blobs/{layer}"))).send().await.unwrap().status(), 404);
        let lost = bytes(1, 1001);
        assert_eq!(sha256(&lost), layer);
        push_blob(&c, &s, "acme/app", &lost).await;
        assert_eq!(c.head(s.url(&format!("/v2/acme/app/blobs/{layer}"))).send().await.unwrap().status(), 200);
    });
}
