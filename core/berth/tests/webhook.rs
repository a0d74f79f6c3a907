//! The webhook plugin in the real server, delivering to real HTTP receivers:
//! signed CloudEvents for pushes, pulls, uploads and deletes; each tenant's
//! instance sees only its tenant's events; a receiver that fails gets the
//! event again after a backoff, with every attempt in the delivery log; and
//! the outbox survives `kill -9`: events committed while the receiver was down
//! are delivered after a restart, and events already acknowledged are not
//! delivered again.

mod common;

#[path = "../../plugins/tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::receiver::Receiver;
use common::*;
use serde_json::{json, Value};

const ALL_HOOKS: [&str; 7] =
    ["manifest-pushed", "manifest-pulled", "manifest-deleted", "tag-deleted", "blob-uploaded", "repository-created", "repository-deleted"];

fn start(dir: &TempDir) -> Server {
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "[registry]\ncounter_flush_secs = 1\n").unwrap();
    Server::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap())])
}

fn install_webhook(s: &Server, dir: &TempDir) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let wasm = support::built().join("berth_webhook.wasm");
    let (code, out) = admin_cli(
        s,
        dir.path(),
        &["plugin", "install", root.join("plugins/webhook").to_str().unwrap(), "--component", wasm.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{out}");
}

fn hook(scope: &str, hooks: &[&str], r: &Receiver, secret: &str) -> Value {
    json!({"module": "webhook", "scope": scope, "hooks": hooks,
           "config": {"url": r.url, "secret": secret}, "allow_hosts": [r.host]})
}

/// Poll until `f` holds, for up to `secs`.
async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    for _ in 0..secs * 10 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not reached in {secs} s");
}

/// An instance's status once its queue is empty (every delivery settled).
async fn settled(c: &reqwest::Client, s: &Server, id: &str) -> Value {
    for _ in 0..200 {
        let st: Value = c.get(s.url(&format!("/api/v1/plugins/instances/{id}"))).send().await.unwrap().json().await.unwrap();
        if st["queue"]["depth"].as_u64() == Some(0) {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id}: its queue did not empty in 20 s");
}

fn kinds(r: &Receiver) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for d in r.acked() {
        *m.entry(d.kind).or_default() += 1;
    }
    m
}

#[test]
fn webhooks_deliver_signed_events_of_their_tenant_and_retry() {
    let dir = TempDir::new("webhook");
    let s = start(&dir);
    install_webhook(&s, &dir);
    let (acme_rx, globex_rx) = (Receiver::start("acme-secret"), Receiver::start("globex-secret"));
    block_on(async {
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "tenant-admin").await);
        let bob = client_as("bob", &tenant_user_token(&s, "globex", "bob", "tenant-admin").await);
        let api = |p: &str| s.url(&format!("/api/v1/plugins/{p}"));
        let r = mia.put(api("instances/acme-hook")).json(&hook("tenant:acme", &ALL_HOOKS, &acme_rx, "acme-secret")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        let r = bob
            .put(api("instances/globex-hook"))
            .json(&hook("tenant:globex", &ALL_HOOKS, &globex_rx, "globex-secret"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        // The secret is never shown back.
        let st: Value = mia.get(api("instances/acme-hook")).send().await.unwrap().json().await.unwrap();
        assert_eq!(st["config"]["secret"], "********", "{st}");

        // acme: push (a new repository, two blobs, a manifest), pull, delete the
        // tag, the manifest, the repository. globex: one push.
        let digest = push_image(&mia, &s, "acme/app", "v1", 1, json!({})).await;
        let r = mia.get(s.url("/v2/acme/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 200);
        push_image(&bob, &s, "globex/app", "v1", 2, json!({})).await;
        eventually("acme's push and pull delivered", 20, || {
            let k = kinds(&acme_rx);
            k.get("manifest.pushed") == Some(&1) && k.get("manifest.pulled") == Some(&1)
        })
        .await;
        assert_eq!(mia.delete(s.url("/v2/acme/app/manifests/v1")).send().await.unwrap().status(), 202);
        assert_eq!(mia.delete(s.url(&format!("/v2/acme/app/manifests/{digest}"))).send().await.unwrap().status(), 202);
        assert_eq!(mia.delete(s.url("/api/v1/repositories/acme/app")).send().await.unwrap().status(), 200);
        // Delivered concurrently: the three deletions arrive in any order.
        eventually("acme's deletes delivered", 20, || {
            let k = kinds(&acme_rx);
            ["tag.deleted", "manifest.deleted", "repository.deleted"].iter().all(|d| k.contains_key(*d))
        })
        .await;

        let k = kinds(&acme_rx);
        let want: BTreeMap<String, usize> = [
            ("repository.created", 1),
            ("blob.uploaded", 2),
            ("manifest.pushed", 1),
            ("manifest.pulled", 1),
            ("tag.deleted", 1),
            ("manifest.deleted", 1),
            ("repository.deleted", 1),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
        assert_eq!(k, want);
        let acked = acme_rx.acked();
        assert!(acked.iter().all(|d| d.signature_ok), "every delivery is signed with the instance's secret: {acked:?}");
        assert!(acked.iter().all(|d| d.data["tenant"] == "acme" && d.data["repository"] == "acme/app"), "{acked:?}");
        let pushed = acked.iter().find(|d| d.kind == "manifest.pushed").unwrap();
        assert_eq!((pushed.data["tag"].as_str(), pushed.data["digest"].as_str()), (Some("v1"), Some(digest.as_str())));
        assert_eq!(pushed.data["pusher"], "mia");
        let pulled = acked.iter().find(|d| d.kind == "manifest.pulled").unwrap();
        assert_eq!((pulled.data["puller"].as_str(), pulled.data["reference"].as_str()), (Some("mia"), Some("v1")));
        let deleted = acked.iter().find(|d| d.kind == "manifest.deleted").unwrap();
        assert_eq!(deleted.data["tags"], json!([]), "the tag was deleted before: {deleted:?}");
        let ids: BTreeSet<&str> = acked.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids.len(), acked.len(), "event ids are unique");
        // globex's instance saw globex's push and nothing of acme's.
        eventually("globex's push delivered", 20, || kinds(&globex_rx).get("manifest.pushed") == Some(&1)).await;
        settled(&bob, &s, "globex-hook").await;
        assert!(globex_rx.acked().iter().all(|d| d.signature_ok && d.data["tenant"] == "globex"), "{:?}", globex_rx.acked());

        // A receiver that fails twice: the event comes again after a backoff.
        acme_rx.fail_next(2);
        let before = acme_rx.acked().len();
        push_image(&mia, &s, "acme/retry", "v1", 3, json!({})).await;
        eventually("delivered after two failures", 30, || {
            acme_rx.acked().len() >= before + 4 // created, two blobs, pushed
        })
        .await;
        assert_eq!(acme_rx.refused(), 2);
        let st = settled(&mia, &s, "acme-hook").await;
        let log: Value = mia.get(api("instances/acme-hook/deliveries?limit=1000")).send().await.unwrap().json().await.unwrap();
        let items = log["items"].as_array().unwrap();
        let retried: Vec<&Value> = items.iter().filter(|i| i["outcome"] == "retrying").collect();
        assert_eq!(retried.len(), 2, "{log}");
        for r in retried {
            let later =
                items.iter().find(|i| i["event_id"] == r["event_id"] && i["outcome"] == "delivered").unwrap_or_else(|| panic!("{log}"));
            assert!(later["attempt"].as_u64() > r["attempt"].as_u64() && later["at_ms"].as_i64() >= r["at_ms"].as_i64(), "{log}");
            assert!(r["detail"].as_str().unwrap().contains("503"), "{r}");
        }
        assert_eq!(log["total_count"].as_u64(), Some(items.len() as u64));
        // The same log and queue through the CLI.
        let (code, out) = admin_cli(&s, dir.path(), &["plugin", "deliveries", "acme-hook", "--limit", "1000"]);
        assert!(code == Some(0) && out.matches("retrying").count() == 2 && out.contains("manifest-pushed"), "{out}");
        let (code, out) = admin_cli(&s, dir.path(), &["plugin", "status", "acme-hook"]);
        assert!(code == Some(0) && out.contains("queue 0") && out.contains("retried 2"), "{out}");
        assert_eq!(st["state"], "on", "a receiver's 503 does not trip the breaker: {st}");
        assert_eq!((st["queue"]["depth"].as_u64(), st["queue"]["retried"].as_u64()), (Some(0), Some(2)), "{st}");
        assert_eq!(st["queue"]["delivered"].as_u64(), Some(acme_rx.acked().len() as u64), "{st}");

        // Another tenant's admin sees neither the instance nor its log.
        assert_eq!(bob.get(api("instances/acme-hook/deliveries")).send().await.unwrap().status(), 404);
        assert_eq!(mia.get(api("instances/acme-hook/deliveries?limit=-1")).send().await.unwrap().status(), 400);
        assert_eq!(mia.get(api("instances/acme-hook/deliveries?colour=red")).send().await.unwrap().status(), 400);
        // The platform's metrics, per instance.
        assert_eq!(metric(&s, "berth_plugin_events_delivered_total{instance=\"acme-hook\"}").await, acme_rx.acked().len() as f64);
        assert_eq!(metric(&s, "berth_plugin_events_retried_total{instance=\"acme-hook\"}").await, 2.0);
        assert_eq!(metric(&s, "berth_plugin_queue_depth{instance=\"globex-hook\"}").await, 0.0);

        // Removing an instance while its worker is busy (a receiver that is
        // down, pulls coming in): it goes, with its queue, log and series.
        acme_rx.set_down(true);
        push_image(&mia, &s, "acme/busy", "v1", 4, json!({})).await;
        let pulls = async {
            for _ in 0..50 {
                let r = mia.get(s.url("/v2/acme/busy/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        };
        let remove = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            mia.delete(api("instances/acme-hook")).send().await.unwrap().status()
        };
        let ((), status) = futures::join!(pulls, remove);
        assert_eq!(status, 204);
        assert_eq!(mia.get(api("instances/acme-hook")).send().await.unwrap().status(), 404);
        assert_eq!(mia.get(api("instances/acme-hook/deliveries")).send().await.unwrap().status(), 404);
        let text = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(!text.contains("acme-hook") && text.contains("globex-hook"), "{text}");
    });
}

#[test]
fn the_outbox_survives_kill_9() {
    let dir = TempDir::new("outbox");
    let mut s = start(&dir);
    install_webhook(&s, &dir);
    let rx = Receiver::start("k");
    rx.set_down(true);
    const TAGS: usize = 12;
    let mut pushed = BTreeSet::new();
    block_on(async {
        let admin = client();
        let r = admin
            .put(s.url("/api/v1/plugins/instances/audit"))
            .json(&hook("platform", &["manifest-pushed"], &rx, "k"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        for i in 0..TAGS {
            pushed.insert(push_image(&admin, &s, "library/app", &format!("v{i}"), i as u64, json!({})).await);
        }
        // Committed and queued, not delivered: the receiver answers 503.
        eventually("every event tried once", 20, || rx.refused() >= TAGS as u32).await;
        // Between tries all are queued. A call in flight is not counted as
        // waiting, and on a loaded machine (deliveries run at idle priority)
        // some of the webhook's 4 may be in flight throughout; that every event
        // was queued is proven after the kill, when all of them arrive.
        let mut st = Value::Null;
        for _ in 0..100 {
            st = admin.get(s.url("/api/v1/plugins/instances/audit")).send().await.unwrap().json().await.unwrap();
            if st["queue"]["depth"].as_u64() == Some(TAGS as u64) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(st["queue"]["depth"].as_u64().unwrap() >= TAGS as u64 - 4, "{st}");
        assert_eq!(st["queue"]["delivered"].as_u64(), Some(0), "{st}");
        assert!(st["queue"]["lag_ms"].as_u64().unwrap() > 0, "{st}");
    });
    // kill -9 with every event still queued.
    drop(s);
    rx.set_down(false);
    s = start(&dir);
    block_on(async {
        eventually("every event delivered after the restart", 40, || rx.acked().len() >= TAGS).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let acked = rx.acked();
        let digests: BTreeSet<String> = acked.iter().map(|d| d.data["digest"].as_str().unwrap().to_owned()).collect();
        assert_eq!(digests, pushed);
        assert_eq!(acked.len(), TAGS, "none acknowledged twice: {acked:?}");
        settled(&client(), &s, "audit").await;
    });
    // Killed again once all is acknowledged and settled: nothing comes twice.
    drop(s);
    let s = start(&dir);
    block_on(async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(rx.acked().len(), TAGS, "acknowledged events are not delivered again");
        let log: Value =
            client().get(s.url("/api/v1/plugins/instances/audit/deliveries?limit=1000")).send().await.unwrap().json().await.unwrap();
        let delivered = log["items"].as_array().unwrap().iter().filter(|i| i["outcome"] == "delivered").count();
        assert_eq!(delivered, TAGS, "{log}");
    });
}

#[test]
fn hostile_subscribers_do_not_hurt_pushes_or_pulls() {
    let dir = TempDir::new("hostile-events");
    let s = start(&dir);
    // Deliveries run at idle priority and their clock counts the wait for a
    // CPU.
    // The modes that must end on their own (a memory bomb, a trap) run under a
    // copy with a clock they never meet, so only their own limit decides them.
    for (name, timeout_ms) in [("hostile", 1000), ("hostile-patient", 60000)] {
        let module = support::install(
            &dir.path().join("src"),
            "berth_hostile",
            name,
            &format!(
                "hooks = [\"manifest-pushed\", \"manifest-pulled\"]\n[config.mode]\n\
                 [limits]\ntimeout_ms = {timeout_ms}\nmemory_mib = 16\nmax_failures = 3\nmax_attempts = 2\nlog_lines = 5\nconcurrency = 1\n"
            ),
        );
        let (code, out) = admin_cli(&s, dir.path(), &["plugin", "install", module.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{out}");
    }
    let modes = [("loop", "timed out"), ("memory", "out of memory"), ("trap", "trapped"), ("log-flood", "timed out")];
    block_on(async {
        let admin = client();
        for (mode, why) in modes {
            let module = if why == "timed out" { "hostile" } else { "hostile-patient" };
            let body =
                json!({"module": module, "scope": "platform", "hooks": ["manifest-pushed", "manifest-pulled"], "config": {"mode": mode}});
            let r = admin.put(s.url(&format!("/api/v1/plugins/instances/h-{mode}"))).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        // Pushes and pulls go on, correct, while every subscriber misbehaves
        // (and after each is switched off).
        for i in 0..10u64 {
            let digest = push_image(&admin, &s, "library/app", &format!("v{i}"), i, json!({})).await;
            let r = admin.get(s.url(&format!("/v2/library/app/manifests/v{i}"))).header("accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        for (mode, why) in modes {
            let url = s.url(&format!("/api/v1/plugins/instances/h-{mode}"));
            let mut st = Value::Null;
            for _ in 0..300 {
                st = admin.get(&url).send().await.unwrap().json().await.unwrap();
                if st["state"] == "tripped" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(st["state"], "tripped", "{mode}: {st}");
            assert!(st["reason"].as_str().unwrap().contains(why), "{mode}: {st}");
            assert_eq!(st["health"]["failures"].as_u64(), Some(3), "{mode}: no call after it was switched off: {st}");
            // What it did not take stays queued for when it is enabled again.
            assert!(st["queue"]["depth"].as_u64().unwrap() > 0, "{mode}: {st}");
            assert_eq!(st["queue"]["delivered"].as_u64(), Some(0), "{mode}: {st}");
        }
        assert_eq!(metric(&s, "berth_plugin_tripped{instance=\"h-loop\"}").await, 1.0);
        let digest = push_image(&admin, &s, "library/app", "after", 99, json!({})).await;
        let r = admin.get(s.url("/v2/library/app/manifests/after")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    });
}
