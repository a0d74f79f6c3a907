//! Berth over a SurrealDB server (`ws://`, the scale-out metadata store)
//! instead of the embedded one: the test starts the real server
//! (`tools/surreal-server`, the binary `BERTH_TEST_SURREAL` names; `.ci/run`
//! builds it and sets it), then pushes, pulls, deletes, restarts Berth and
//! finds everything where it was, and restarts the server too.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::{json, Value};

struct Surreal {
    child: Child,
    port: u16,
}

impl Surreal {
    fn start(bin: &str, dir: &Path, port: u16) -> Surreal {
        let store = format!("surrealkv://{}", dir.display());
        let mut child = Command::new(bin)
            .args(["start", "--user", "root", "--pass", "root", "--bind", &format!("127.0.0.1:{port}"), "--log", "warn", &store])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the SurrealDB server");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Surreal { child, port };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the SurrealDB server did not listen on {port}");
    }
}

impl Drop for Surreal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn berth(dir: &TempDir, port: u16) -> Server {
    let cfg = dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "[metadata]\nurl = \"ws://127.0.0.1:{port}\"\nusername = \"root\"\npassword = \"root\"\nnamespace = \"berth\"\ndatabase = \"it\"\n\
             [registry]\ncounter_flush_secs = 1\n"
        ),
    )
    .unwrap();
    Server::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap())])
}

#[test]
fn berth_runs_over_a_surrealdb_server() {
    let Ok(bin) = std::env::var("BERTH_TEST_SURREAL") else {
        eprintln!("berth_runs_over_a_surrealdb_server: set BERTH_TEST_SURREAL to the surreal binary (.ci/run builds tools/surreal-server)");
        return;
    };
    let dir = TempDir::new("surreal");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut db = Surreal::start(&bin, &dir.path().join("db"), port);
    let mut s = berth(&dir, db.port);
    let (kept, gone) = block_on(async {
        let admin = client();
        let kept = push_image(&admin, &s, "library/app", "v1", 1, json!({})).await;
        let gone = push_image(&admin, &s, "library/app", "v2", 2, json!({})).await;
        let r = admin.get(s.url("/v2/library/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(sha256(&r.bytes().await.unwrap()), kept);
        assert_eq!(admin.delete(s.url(&format!("/v2/library/app/manifests/{gone}"))).send().await.unwrap().status(), 202);
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "tenant-admin").await);
        push_image(&mia, &s, "acme/app", "v1", 3, json!({})).await;
        (kept, gone)
    });
    // Berth restarts: what it knows comes back from the server.
    s.stop();
    let mut s = berth(&dir, db.port);
    let check = |s: &Server| {
        block_on(async {
            let admin = client();
            let r = admin.get(s.url("/v2/library/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(sha256(&r.bytes().await.unwrap()), kept);
            let r = admin.get(s.url(&format!("/v2/library/app/manifests/{gone}"))).header("accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.status(), 404);
            let tags: Value = admin.get(s.url("/v2/library/app/tags/list")).send().await.unwrap().json().await.unwrap();
            assert_eq!(tags["tags"], json!(["v1"]));
            let r: Value = admin.get(s.url("/api/v1/repositories/acme/app")).send().await.unwrap().json().await.unwrap();
            assert_eq!(r["name"], "acme/app", "{r}");
            assert_eq!(admin.get(s.url("/readyz")).send().await.unwrap().status(), 200);
        })
    };
    check(&s);
    // The server restarts too (its data on disk): Berth, started again, finds it all.
    s.stop();
    drop(db);
    db = Surreal::start(&bin, &dir.path().join("db"), port);
    let s = berth(&dir, db.port);
    check(&s);
}

/// Two Berths over one SurrealDB server: a password changed through one stops
/// working on the other within its refresh (2 s), although the other had just
/// verified it (and kept it in its cache of verified credentials).
#[test]
fn a_changed_password_stops_working_on_every_replica() {
    let Ok(bin) = std::env::var("BERTH_TEST_SURREAL") else {
        eprintln!("a_changed_password_stops_working_on_every_replica: set BERTH_TEST_SURREAL");
        return;
    };
    let (one, two) = (TempDir::new("surreal-a"), TempDir::new("surreal-b"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let db = Surreal::start(&bin, &one.path().join("db"), port);
    let a = berth(&one, db.port);
    let b = berth(&two, db.port);
    block_on(async {
        tenant_user_token(&a, "acme", "mia", "developer").await;
        let old = client_as("mia", "mia-password");
        assert_eq!(old.get(b.url("/v2/")).send().await.unwrap().status(), 200, "b verifies (and caches) the password");
        let r = old.put(a.url("/api/v1/me/password")).json(&json!({"password": "mia-new-password"})).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let mut refused = false;
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if old.get(b.url("/v2/")).send().await.unwrap().status() == 401 {
                refused = true;
                break;
            }
        }
        assert!(refused, "the old password still works on the other replica after 10 s");
        assert_eq!(client_as("mia", "mia-new-password").get(b.url("/v2/")).send().await.unwrap().status(), 200);
    });
}
