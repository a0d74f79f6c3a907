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
    /// Start on a free port; a server that exits before it is ready (its
    /// port taken in the meantime by another test's process) is started again
    /// on another.
    fn start_free(bin: &str, dir: &Path) -> Surreal {
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            match Surreal::try_start(bin, dir, port) {
                Ok(s) => return s,
                Err(e) => eprintln!("{e}; trying another port"),
            }
        }
        panic!("the SurrealDB server did not start on three ports");
    }

    /// Start on `port` (a restart on the port of the server before).
    fn start(bin: &str, dir: &Path, port: u16) -> Surreal {
        Surreal::try_start(bin, dir, port).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start and wait until its `/ready` answers 200 (the server binds before
    /// its startup work is done when that is slow, and a TCP connect alone
    /// could reach another process that took the port).
    fn try_start(bin: &str, dir: &Path, port: u16) -> Result<Surreal, String> {
        let store = format!("surrealkv://{}", dir.display());
        let mut child = Command::new(bin)
            .args(["start", "--user", "root", "--pass", "root", "--bind", &format!("127.0.0.1:{port}"), "--log", "warn", &store])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the SurrealDB server");
        for _ in 0..600 {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the SurrealDB server on {port} exited ({status}) before it was ready"));
            }
            if berth_testkit::surreal_ready(port) {
                return Ok(Surreal { child, port });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("the SurrealDB server was not ready on {port} within 30 s"))
    }
}

/// The SurrealDB server binary (`BERTH_TEST_SURREAL`); without it, `test`
/// says so and is skipped.
fn surreal_bin(test: &str) -> Option<String> {
    let bin = std::env::var("BERTH_TEST_SURREAL").ok();
    if bin.is_none() {
        eprintln!("{test}: set BERTH_TEST_SURREAL to the surreal binary (.ci/run builds tools/surreal-server)");
    }
    bin
}

impl Drop for Surreal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The master key every Berth over one server shares (64 hex digits).
const MASTER_KEY: &str = "4d6173746572206b6579206f66207468652074657374732c20736861726564";

fn berth(dir: &TempDir, port: u16) -> Server {
    berth_with(dir, port, "")
}

/// With more `[auth]` settings.
fn berth_with(dir: &TempDir, port: u16, auth: &str) -> Server {
    berth_on(dir, port, auth, "")
}

/// With more `[auth]` settings and other sections (`more`).
fn berth_on(dir: &TempDir, port: u16, auth: &str, more: &str) -> Server {
    let cfg = dir.path().join("berth.toml");
    let key = dir.path().join("master.key");
    std::fs::write(&key, format!("{MASTER_KEY}00\n")).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{more}\n[metadata]\nurl = \"ws://127.0.0.1:{port}\"\nusername = \"root\"\npassword = \"root\"\nnamespace = \"berth\"\ndatabase = \"it\"\n\
             [registry]\ncounter_flush_secs = 1\n[auth]\nmaster_key_file = \"{}\"\n{auth}",
            key.display()
        ),
    )
    .unwrap();
    Server::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap())])
}

#[test]
fn berth_runs_over_a_surrealdb_server() {
    let Some(bin) = surreal_bin("berth_runs_over_a_surrealdb_server") else {
        return;
    };
    let dir = TempDir::new("surreal");
    let mut db = Surreal::start_free(&bin, &dir.path().join("db"));
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
    let port = db.port;
    drop(db);
    db = Surreal::start(&bin, &dir.path().join("db"), port);
    let s = berth(&dir, db.port);
    check(&s);
}

/// Berth started before its SurrealDB server waits for it
/// (`metadata.connect_wait_secs`) instead of exiting on the refused connection.
#[test]
fn berth_waits_for_a_server_that_starts_after_it() {
    let Some(bin) = surreal_bin("berth_waits_for_a_server_that_starts_after_it") else {
        return;
    };
    let dir = TempDir::new("surreal-late");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let db_dir = dir.path().join("db");
    let late = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(2));
        Surreal::start(&bin, &db_dir, port)
    });
    let s = berth(&dir, port);
    let _db = late.join().unwrap();
    block_on(async {
        let admin = client();
        let digest = push_image(&admin, &s, "library/app", "v1", 1, json!({})).await;
        let r = admin.get(s.url("/v2/library/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    });
}

/// Two Berths over one SurrealDB server: a password changed through one stops
/// working on the other within its refresh (2 s), although the other had just
/// verified it (and kept it in its cache of verified credentials).
#[test]
fn a_changed_password_stops_working_on_every_replica() {
    let Some(bin) = surreal_bin("a_changed_password_stops_working_on_every_replica") else {
        return;
    };
    let (one, two) = (TempDir::new("surreal-a"), TempDir::new("surreal-b"));
    let db = Surreal::start_free(&bin, &one.path().join("db"));
    let a = berth(&one, db.port);
    let b = berth(&two, db.port);
    block_on(async {
        tenant_user_token(&a, "acme", "mia", "developer").await;
        let old = client_as("mia", "mia-password");
        assert_eq!(old.get(b.url("/v2/")).send().await.unwrap().status(), 200, "b verifies (and caches) the password");
        let r = old
            .put(a.url("/api/v1/me/password"))
            .json(&json!({"current_password": "mia-password", "password": "mia-new-password"}))
            .send()
            .await
            .unwrap();
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

/// Two replicas over one SurrealDB server and one blob store (a folder both
/// use): each serves what the other wrote on the very next request (tags
/// pushed, moved and deleted; repositories made and deleted), a manifest goes
/// through one replica over blobs uploaded through the other, and concurrent
/// pushes of one tag through both lose no update.
#[test]
fn replicas_serve_each_others_writes_at_once() {
    let Some(bin) = surreal_bin("replicas_serve_each_others_writes_at_once") else {
        return;
    };
    let (one, two, blobs) = (TempDir::new("coherent-a"), TempDir::new("coherent-b"), TempDir::new("coherent-blobs"));
    let db = Surreal::start_free(&bin, &one.path().join("db"));
    let storage = format!("[storage]\nbackend = \"fs\"\nroot = \"{}\"\n", blobs.path().display());
    let a = berth_on(&one, db.port, "", &storage);
    let b = berth_on(&two, db.port, "", &storage);
    block_on(async {
        let c = client();
        let manifest = |s: &Server, reference: &str| {
            let url = s.url(&format!("/v2/library/app/manifests/{reference}"));
            let c = c.clone();
            async move {
                let r = c.get(url).header("accept", OCI_MANIFEST).send().await.unwrap();
                (r.status().as_u16(), r.headers().get("docker-content-digest").map(|v| v.to_str().unwrap().to_owned()))
            }
        };
        let tags = |s: &Server| {
            let url = s.url("/v2/library/app/tags/list");
            let c = c.clone();
            async move { c.get(url).send().await.unwrap().json::<Value>().await.unwrap()["tags"].clone() }
        };
        let catalog = |s: &Server| {
            let url = s.url("/v2/_catalog");
            let c = c.clone();
            async move { c.get(url).send().await.unwrap().json::<Value>().await.unwrap()["repositories"].clone() }
        };

        // Pushed through A, served by B at once: manifest, blob, tags, catalog.
        let v1 = push_image(&c, &a, "library/app", "v1", 1, json!({})).await;
        assert_eq!(manifest(&b, "v1").await, (200, Some(v1.clone())));
        let layer = sha256(&bytes(1, 1001));
        let r = c.get(b.url(&format!("/v2/library/app/blobs/{layer}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), layer);
        assert_eq!(tags(&b).await, json!(["v1"]));
        assert_eq!(catalog(&b).await, json!(["library/app"]));

        // Moved through B, served by A at once (read-your-writes across replicas).
        let v1b = push_image(&c, &b, "library/app", "v1", 2, json!({})).await;
        assert_eq!(manifest(&a, "v1").await, (200, Some(v1b.clone())));
        // Deleted through A: gone from B at once.
        assert_eq!(c.delete(a.url("/v2/library/app/manifests/v1")).send().await.unwrap().status(), 202);
        assert_eq!(manifest(&b, "v1").await.0, 404);
        assert_eq!(tags(&b).await, json!([]));

        // Blobs uploaded through A, their manifest through B.
        let config = b"{\"cross\":true}".to_vec();
        let cd = push_blob(&c, &a, "library/app", &config).await;
        let layer = bytes(7, 3000);
        let ld = push_blob(&c, &a, "library/app", &layer).await;
        let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], json!({}));
        let cross = put_manifest(&c, &b, "library/app", "cross", OCI_MANIFEST, &m).await;
        assert_eq!(manifest(&a, "cross").await, (200, Some(cross)));

        // An upload begun through A, continued through B and A in turn (each
        // replica seeing where the other left it), finished through B.
        let data = bytes(11, 300_000);
        let r = c.post(a.url("/v2/library/app/blobs/uploads/")).send().await.unwrap();
        assert_eq!(r.status(), 202);
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let mut off = 0;
        for (i, chunk) in data.chunks(100_000).enumerate() {
            let s = if i % 2 == 0 { &b } else { &a };
            let st = c.get(s.url(&loc)).send().await.unwrap();
            assert_eq!(st.status(), 204);
            let want = if off == 0 { "0-0".to_owned() } else { format!("0-{}", off - 1) };
            assert_eq!(st.headers()["range"], want.as_str(), "the status on the other replica");
            let r = c
                .patch(s.url(&loc))
                .header("content-type", "application/octet-stream")
                .header("content-range", format!("{}-{}", off, off + chunk.len() - 1))
                .body(chunk.to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "chunk {i}");
            off += chunk.len();
        }
        // A chunk at the offset where A last left the upload (B has moved it
        // on since) is refused: A reads the session's state from the database.
        let r = c.patch(a.url(&loc)).header("content-range", "200000-200009").body(vec![0u8; 10]).send().await.unwrap();
        assert_eq!(r.status(), 416);
        let digest = sha256(&data);
        let r = c.put(b.url(&format!("{loc}?digest={digest}"))).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let r = c.get(a.url(&format!("/v2/library/app/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest);

        // Concurrent pushes through both replicas: every tag lands, and both
        // replicas agree on where the shared one points.
        let mut pushes = Vec::new();
        for i in 0..12u64 {
            let (c, s) = (c.clone(), if i % 2 == 0 { &a } else { &b });
            let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], json!({"annotations": {"n": i.to_string()}}));
            pushes.push(async move {
                let own = put_manifest(&c, s, "library/app", &format!("t{i}"), OCI_MANIFEST, &m).await;
                let shared = put_manifest(&c, s, "library/app", "shared", OCI_MANIFEST, &m).await;
                assert_eq!(own, shared);
                own
            });
        }
        let pushed = futures::future::join_all(pushes).await;
        let mut want: Vec<String> = (0..12).map(|i| format!("t{i}")).chain(["cross".into(), "shared".into()]).collect();
        want.sort();
        for s in [&a, &b] {
            let mut got: Vec<String> = serde_json::from_value(tags(s).await).unwrap();
            got.sort();
            assert_eq!(got, want, "a tag pushed through one replica was lost");
        }
        let (sa, sb) = (manifest(&a, "shared").await, manifest(&b, "shared").await);
        assert_eq!(sa, sb);
        assert!(pushed.contains(sa.1.as_ref().unwrap()));

        // A repository made through B and deleted through A, seen by the other each time.
        push_image(&c, &b, "library/other", "v1", 9, json!({})).await;
        assert_eq!(catalog(&a).await, json!(["library/app", "library/other"]));
        assert_eq!(c.delete(a.url("/api/v1/repositories/library/other")).send().await.unwrap().status(), 200);
        assert_eq!(catalog(&b).await, json!(["library/app"]));
        let r = c.get(b.url("/v2/library/other/manifests/v1")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    });
}

/// The signing keys as the database holds them, read over the server's HTTP
/// `/sql` endpoint, as a backup of the database would have them.
async fn stored_keys(port: u16) -> Vec<Value> {
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/sql"))
        .basic_auth("root", Some("root"))
        .header("surreal-ns", "berth")
        .header("surreal-db", "it")
        .header("accept", "application/json")
        .body("SELECT kid, sealed, secret_hex, retired_ms, created_ms FROM signing_key ORDER BY created_ms")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    v[0]["result"].as_array().unwrap_or_else(|| panic!("{v}")).clone()
}

/// A key's secret, opened with the master key (what someone holding both the
/// database and the master key file, or a leaked key, has).
fn open_sealed(kid: &str, sealed: &str) -> Vec<u8> {
    use base64::Engine;
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    let key = hex::decode(format!("{MASTER_KEY}00")).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(sealed).unwrap();
    let cipher = chacha20poly1305::XChaCha20Poly1305::new(key.as_slice().into());
    cipher.decrypt(bytes[..24].into(), Payload { msg: &bytes[24..], aad: kid.as_bytes() }).unwrap()
}

/// A bearer token for the admin signed with `secret` under `kid`, valid for an hour.
fn forge(kid: &str, secret: &[u8]) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "typ": "JWT", "kid": kid})),
        b64(
            &json!({"iss": "berth", "sub": "admin", "aud": "berth", "exp": now + 3600, "nbf": now - 1, "iat": now, "jti": "forged", "access": []})
        )
    );
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{input}.{sig}")
}

async fn bearer_status(s: &Server, token: &str) -> u16 {
    reqwest::Client::new().get(s.url("/v2/")).bearer_auth(token).send().await.unwrap().status().as_u16()
}

async fn until_refused(s: &Server, token: &str) -> bool {
    for _ in 0..75 {
        if bearer_status(s, token).await == 401 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

/// A bearer token signed on one replica with a key it has just made (a
/// rotation, or replicas starting together) verifies at once on another that
/// has not refreshed its keys since: an unknown key id makes it reload them. A
/// made-up key id is still refused.
#[test]
fn a_token_signed_with_a_new_key_verifies_at_once_on_another_replica() {
    let Some(bin) = surreal_bin("a_token_signed_with_a_new_key_verifies_at_once_on_another_replica") else {
        return;
    };
    let (one, two) = (TempDir::new("newkey-a"), TempDir::new("newkey-b"));
    let db = Surreal::start_free(&bin, &one.path().join("db"));
    // No refresh tick during the test: only the reload on demand can help.
    let slow = "refresh_secs = 3600\n";
    let a = berth_with(&one, db.port, slow);
    let b = berth_with(&two, db.port, slow);
    block_on(async {
        assert_eq!(client().post(a.url("/api/v1/keys/rotate")).send().await.unwrap().status(), 200);
        let r = client().get(a.url("/auth/token?service=berth&scope=repository:library/app:pull")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
        assert_eq!(bearer_status(&a, &token).await, 200);
        assert_eq!(bearer_status(&b, &token).await, 200, "a token from the other replica's new key is refused");
        assert_eq!(bearer_status(&b, &forge("made-up", &[7; 32])).await, 401);
        assert_eq!(bearer_status(&b, &token).await, 200);
    });
}

/// Signing keys are sealed at rest (a database backup alone holds no key), a
/// rotated key stops verifying on every replica once the longest bearer
/// lifetime has passed, and an emergency rotation drops old keys at once here
/// and within a refresh on the other replica; no restart anywhere.
#[test]
fn rotated_keys_retire_on_every_replica_and_are_sealed_at_rest() {
    let Some(bin) = surreal_bin("rotated_keys_retire_on_every_replica_and_are_sealed_at_rest") else {
        return;
    };
    let (one, two) = (TempDir::new("keys-a"), TempDir::new("keys-b"));
    let db = Surreal::start_free(&bin, &one.path().join("db"));
    let short = "bearer_ttl_secs = 2\nclock_skew_secs = 1\n";
    let a = berth_with(&one, db.port, short);
    let b = berth_with(&two, db.port, short);
    block_on(async {
        let keys = stored_keys(db.port).await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        let (kid, sealed) = (keys[0]["kid"].as_str().unwrap().to_owned(), keys[0]["sealed"].as_str().unwrap().to_owned());
        assert!(keys[0]["secret_hex"].is_null(), "no key in the clear: {keys:?}");
        let secret = open_sealed(&kid, &sealed);
        assert!(!sealed.contains(&hex::encode(&secret)));
        let forged = forge(&kid, &secret);
        assert_eq!(bearer_status(&b, &forged).await, 200, "whoever holds the key can sign");

        // A rotation: the old key retires after 2 s + 1 s on both replicas.
        assert_eq!(client().post(a.url("/api/v1/keys/rotate")).send().await.unwrap().status(), 200);
        assert!(until_refused(&a, &forged).await, "the old key still verifies on the replica that rotated");
        assert!(until_refused(&b, &forged).await, "the old key still verifies on the other replica");

        // An emergency rotation: the replaced key stops at once where it was
        // rotated, and at the other's next refresh.
        let keys = stored_keys(db.port).await;
        let current = keys.iter().find(|k| k["retired_ms"].is_null()).unwrap();
        let kid = current["kid"].as_str().unwrap();
        let forged = forge(kid, &open_sealed(kid, current["sealed"].as_str().unwrap()));
        assert_eq!(bearer_status(&b, &forged).await, 200);
        assert_eq!(client().post(a.url("/api/v1/keys/rotate?now=true")).send().await.unwrap().status(), 200);
        assert_eq!(bearer_status(&a, &forged).await, 401, "dropped at once");
        assert!(until_refused(&b, &forged).await, "dropped on the other replica");
        assert!(stored_keys(db.port).await.iter().all(|k| k["retired_ms"].is_null()), "only the new key is left");
    });
}

/// A metadata server that stops answering (SIGSTOP: its connections stay open,
/// nothing answers). Once a query has waited out the timeout, the breaker opens:
/// queries fail at once while Berth tries the server in the background, so
/// requests answer 503 without each waiting 15 s. When the server answers
/// again the breaker closes by itself and everything is served as before.
#[test]
fn requests_fail_at_once_while_the_metadata_server_is_out_of_reach() {
    let Some(bin) = surreal_bin("requests_fail_at_once_while_the_metadata_server_is_out_of_reach") else {
        return;
    };
    let dir = TempDir::new("surreal-reach");
    let db = Surreal::start_free(&bin, &dir.path().join("db"));
    let s = berth(&dir, db.port);
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &db.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    };
    block_on(async {
        let admin = client();
        let pushed = push_image(&admin, &s, "library/app", "v1", 1, json!({})).await;
        let get = || admin.get(s.url("/v2/library/app/manifests/v1")).header("accept", OCI_MANIFEST).send();
        let refused_before = metric(&s, "berth_metadata_refused_total").await;

        signal("-STOP");
        // The first read waits out the query timeout, then answers 503 (never stale).
        assert_eq!(get().await.unwrap().status(), 503, "a read while the server is stopped");
        // Now eight more, one after another: each fails at once.
        for _ in 0..8 {
            assert_eq!(get().await.unwrap().status(), 503, "a read while the server is stopped");
        }
        signal("-CONT");

        let resumed = std::time::Instant::now();
        loop {
            let r = get().await.unwrap();
            if r.status() == 200 {
                assert_eq!(sha256(&r.bytes().await.unwrap()), pushed, "served as before the outage");
                break;
            }
            assert!(resumed.elapsed() < std::time::Duration::from_secs(120), "not serving again after the server came back");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let refused = metric(&s, "berth_metadata_refused_total").await - refused_before;
        assert!(refused >= 8.0, "the breaker failed {refused} queries at once, not the eight reads after the first");
        assert_eq!(metric(&s, "berth_metadata_out_of_reach").await, 0.0, "the breaker closed again");
    });
}
