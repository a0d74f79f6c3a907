//! Liveness and readiness, for load balancers and orchestrators: `/healthz`
//! and `/readyz` answer without credentials; on SIGTERM readiness goes false
//! first while requests are still served for `drain_secs`, then Berth exits
//! cleanly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

#[test]
fn readiness_goes_false_on_sigterm_while_requests_are_served() {
    let dir = TempDir::new("health");
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "drain_secs = 3\n").unwrap();
    let mut s = Server::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap())]);
    block_on(async {
        let anon = anon_client();
        let r = anon.get(s.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), serde_json::json!({"status": "ok"}));
        let r = anon.get(s.url("/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), serde_json::json!({"status": "ready"}));
        push_image(&client(), &s, "library/app", "v1", 1, serde_json::json!({})).await;

        s.terminate();
        let signalled = Instant::now();
        let mut draining = None;
        while signalled.elapsed() < Duration::from_secs(2) {
            let r = anon.get(s.url("/readyz")).send().await.unwrap();
            if r.status() == 503 {
                draining = Some(r.json::<Value>().await.unwrap());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(draining, Some(serde_json::json!({"status": "not ready", "reason": "draining"})));
        // Still serving while it drains.
        let r = client().get(s.url("/v2/library/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(anon.get(s.url("/healthz")).send().await.unwrap().status(), 200, "alive while draining");
    });
    // Then it exits cleanly.
    s.stop();
}

#[test]
fn a_bad_drain_setting_is_refused() {
    let dir = TempDir::new("health-bad");
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "drain_secs = 100000\n").unwrap();
    let mut cmd = berth_command();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config", cfg.to_str().unwrap(), "--data-dir"]).arg(dir.path().join("data"));
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("drain_secs 100000: at most 600"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A clean stop loses nothing queued and logs no error: the audit events of the
/// last moment are stored before the metadata store closes, and no query
/// reaches the store once it is closing (the store logs such a query as an
/// error; the fuzz run reads the log for errors).
#[test]
fn a_clean_stop_stores_the_last_audit_events_and_logs_no_error() {
    let dir = TempDir::new("health-stop");
    let data = dir.path().join("data");
    let log = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut s = Server::start_with(&data, "127.0.0.1:0", &[], |cmd| {
        cmd.stderr(file);
    });
    block_on(async {
        // The first failed login is written at once; the writer then waits a
        // second before its next batch, and the second one arrives in it.
        for user in ["first-intruder", "second-intruder"] {
            let r = client_as(user, "wrong").get(s.url("/v2/")).send().await.unwrap();
            assert_eq!(r.status(), 401);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    s.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        assert!(!line.contains(" ERROR ") && !line.contains("panicked"), "the stop logged an error: {line}");
    }

    let s = Server::start_in(&data, &[]);
    block_on(async {
        let events: Value = client().get(s.url("/api/v1/audit?action=login-failed")).send().await.unwrap().json().await.unwrap();
        let actors: Vec<&str> = events["events"].as_array().unwrap().iter().filter_map(|e| e["actor"].as_str()).collect();
        for user in ["first-intruder", "second-intruder"] {
            assert!(actors.contains(&user), "{user}'s failed login was not stored before the stop: {events}");
        }
    });
}

/// The operations series of `/metrics`: bytes in and out, upload sessions,
/// messages waiting on actors, backend failures, per-tenant storage.
#[test]
fn metrics_count_bytes_sessions_actors_failures_and_tenant_storage() {
    let dir = TempDir::new("metrics");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    block_on(async {
        let token = tenant_user_token(&s, "acme", "mia", "maintainer").await;
        let mia = client_as("mia", &token);
        let (received, sent) = (metric(&s, "berth_received_bytes_total").await, metric(&s, "berth_sent_bytes_total").await);
        let layer = bytes(3, 70_000);
        let digest = push_blob(&mia, &s, "acme/app", &layer).await;
        assert_eq!(metric(&s, "berth_received_bytes_total").await - received, layer.len() as f64, "an upload's bytes, received");
        let r = mia.get(s.url(&format!("/v2/acme/app/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), layer.len());
        let r = mia.get(s.url(&format!("/v2/acme/app/blobs/{digest}"))).header("range", "bytes=0-99").send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 100);
        assert_eq!(metric(&s, "berth_sent_bytes_total").await - sent, (layer.len() + 100) as f64, "a pull's bytes and a range's, sent");
        let manifest = push_image(&mia, &s, "acme/app", "v1", 9, serde_json::json!({})).await;
        let before = metric(&s, "berth_sent_bytes_total").await;
        let r = mia.get(s.url("/v2/acme/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.headers()["docker-content-digest"], manifest.as_str());
        let len = r.bytes().await.unwrap().len();
        assert_eq!(metric(&s, "berth_sent_bytes_total").await - before, len as f64, "a manifest's bytes, sent");

        // An open upload session, then none.
        assert_eq!(metric(&s, "berth_upload_sessions").await, 0.0);
        let r = mia.post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        assert_eq!(metric(&s, "berth_upload_sessions").await, 1.0);
        assert_eq!(mia.delete(s.url(&loc)).send().await.unwrap().status(), 204);
        assert_eq!(metric(&s, "berth_upload_sessions").await, 0.0);

        // The tenant's storage is what its quota counts.
        let q: Value = client().get(s.url("/api/v1/tenants/acme/quota")).send().await.unwrap().json().await.unwrap();
        let used = q["quotas"].as_array().unwrap().iter().find(|i| i["resource"] == "storage_bytes").unwrap()["used"].as_u64().unwrap();
        assert!(used > layer.len() as u64, "{q}");
        // A scan is reused for twenty times its own duration (milliseconds here).
        let mut seen = 0.0;
        for _ in 0..50 {
            seen = metric(&s, "berth_tenant_storage_bytes{tenant=\"acme\"}").await;
            if seen == used as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, used as f64);

        // Nothing waits on an idle registry's actors, and nothing failed.
        for actor in ["repository", "uploads", "quota", "other"] {
            assert_eq!(metric(&s, &format!("berth_actor_messages_waiting{{actor=\"{actor}\"}}")).await, 0.0, "{actor}");
        }
        for backend in ["metadata", "storage"] {
            assert_eq!(metric(&s, &format!("berth_backend_errors_total{{backend=\"{backend}\"}}")).await, 0.0, "{backend}");
        }
    });
}

/// A blob store that stops answering (Garage stopped with SIGSTOP: connections
/// taken, nothing answered): readiness goes false, and a push is answered
/// 503 UNAVAILABLE once the store's deadline and retries are spent, instead of
/// being held for as long as the store stalls. Once the store runs again,
/// Berth is ready and the same push succeeds.
#[test]
fn a_stalled_blob_store_answers_503_and_readiness_goes_false() {
    let Some(bin) = std::env::var_os(berth_testkit::ENV_GARAGE) else {
        eprintln!("no S3 store: set {} to a garage binary (.ci/run builds it)", berth_testkit::ENV_GARAGE);
        return;
    };
    let dir = TempDir::new("health-stalled-store");
    let g = berth_testkit::Garage::start(std::path::Path::new(&bin), &dir.path().join("garage"));
    let toml = format!(
        "[storage]\nbackend = \"s3\"\nbucket = \"{}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\n\
         secret_access_key = \"{}\"\nrequest_timeout_secs = 3\n",
        g.bucket, g.endpoint, g.region, g.access_key_id, g.secret_access_key
    );
    let s = Server::start_configured(&dir, &toml);
    block_on(async {
        let (c, anon) = (client(), anon_client());
        push_image(&c, &s, "library/app", "v1", 1, serde_json::json!({})).await;
        let data = bytes(7, 100_000);
        let digest = sha256(&data);

        g.pause();
        let push = c.post(s.url(&format!("/v2/library/app/blobs/uploads/?digest={digest}"))).body(data.clone()).send();
        // Not a timing assertion: a bound far past the deadlines and retries
        // (five 3 s attempts, about 15 s of backoff), to fail instead of hang.
        let r = tokio::time::timeout(Duration::from_secs(300), push).await.expect("a push to a stalled store was held").unwrap();
        let ready = anon.get(s.url("/readyz")).send().await.unwrap();
        let ready = (ready.status().as_u16(), ready.json::<Value>().await.unwrap());
        g.resume();
        expect_error(r, 503, "UNAVAILABLE", "a push to a stalled store").await;
        assert_eq!(ready, (503, serde_json::json!({"status": "not ready", "reason": "storage unreachable"})));

        let resumed = Instant::now();
        while anon.get(s.url("/readyz")).send().await.unwrap().status() != 200 {
            assert!(resumed.elapsed() < Duration::from_secs(120), "not ready again after the store came back");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(push_blob(&c, &s, "library/app", &data).await, digest);
        let r = c.get(s.url(&format!("/v2/library/app/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.unwrap() == data, "the blob pushed after the stall reads back exact");
        let r = c.get(s.url("/v2/library/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 200, "what was stored before the stall is served");
    });
}
