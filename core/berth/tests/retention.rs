//! Retention policies against the real binary: a prepared history of tags, dry
//! runs that list exactly what real runs then delete, each rule (keep last N,
//! keep patterns, unpulled for, untagged older than), namespace policies and a
//! repository's own winning over them, the schedule, audit records, the CLI,
//! access and bad input.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn start(dir: &TempDir) -> Server {
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "[registry]\ncounter_flush_secs = 1\n[registry.retention]\ninterval_secs = 1\n").unwrap();
    Server::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap())])
}

fn api(s: &Server, path: &str) -> String {
    s.url(&format!("/api/v1/{path}"))
}

async fn tags(c: &reqwest::Client, s: &Server, repo: &str) -> Vec<String> {
    let v: Value = c.get(s.url(&format!("/v2/{repo}/tags/list"))).send().await.unwrap().json().await.unwrap();
    let mut t: Vec<String> = v["tags"].as_array().map(|a| a.iter().map(|x| x.as_str().unwrap().to_owned()).collect()).unwrap_or_default();
    t.sort();
    t
}

/// Push one image per tag, oldest first, a few milliseconds apart.
async fn history(c: &reqwest::Client, s: &Server, repo: &str, tags: &[&str], seed: u64) -> Vec<String> {
    let mut digests = vec![];
    for (i, t) in tags.iter().enumerate() {
        digests.push(push_image(c, s, repo, t, seed + i as u64, json!({})).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    digests
}

async fn put(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.put(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn run(c: &reqwest::Client, url: &str, dry_run: bool) -> Value {
    let r = c.post(url).json(&json!({"dry_run": dry_run})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn items(run: &Value) -> Vec<(String, String)> {
    run["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["kind"].as_str().unwrap().to_owned(), i["name"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn policies_delete_exactly_what_their_dry_runs_list() {
    let dir = TempDir::new("retention");
    let s = start(&dir);
    block_on(async {
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "tenant-admin").await);
        let names = ["latest", "v1.0", "v1.1", "b1", "b2", "b3", "b4", "b5"];
        let d = history(&mia, &s, "acme/app", &names, 10).await;
        // An image pushed by digest only: untagged from the start.
        let config = b"{\"orphan\":1}".to_vec();
        let cd = push_blob(&mia, &s, "acme/app", &config).await;
        let orphan = image_manifest((&cd, config.len()), &[], json!({}));
        let od = put_manifest(&mia, &s, "acme/app", &sha256(&orphan), OCI_MANIFEST, &orphan).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;

        let url = api(&s, "repositories/acme/app/-/retention");
        let (status, p) =
            put(&mia, &url, json!({"keep_last": 2, "keep_patterns": ["latest", "v*"], "untagged_older_than": "1s", "enabled": false}))
                .await;
        assert_eq!(status, 200, "{p}");
        assert_eq!((p["scope"].as_str(), p["untagged_older_than"].as_str()), (Some("repo:acme/app"), Some("1s")));

        // The dry run: b1–b3 (outside the newest two, matching no pattern), then
        // the manifests left untagged (theirs and the orphan); nothing deleted.
        let dry = run(&mia, &format!("{url}/run"), true).await;
        let mut expected: Vec<(String, String)> = ["b3", "b2", "b1"].iter().map(|t| ("tag".to_owned(), t.to_string())).collect();
        let mut untagged = vec![d[3].clone(), d[4].clone(), d[5].clone(), od.clone()];
        untagged.sort();
        expected.extend(untagged.iter().map(|d| ("manifest".to_owned(), d.clone())));
        assert_eq!(items(&dry), expected, "{dry}");
        assert!(dry["items"][0]["reason"].as_str().unwrap().contains("2 most recently pushed"), "{dry}");
        assert_eq!(tags(&mia, &s, "acme/app").await.len(), 8, "a dry run deletes nothing");

        // The real run deletes exactly that.
        let real = run(&mia, &format!("{url}/run"), false).await;
        assert_eq!(items(&real), expected);
        for kind in ["tag", "manifest"] {
            let n = expected.iter().filter(|(k, _)| k == kind).count() as f64;
            assert_eq!(metric(&s, &format!("berth_retention_deleted_total{{kind=\"{kind}\"}}")).await, n, "dry runs are not counted");
        }
        assert_eq!(tags(&mia, &s, "acme/app").await, ["b4", "b5", "latest", "v1.0", "v1.1"]);
        for gone in &untagged {
            let r = mia.get(s.url(&format!("/v2/acme/app/manifests/{gone}"))).header("accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.status(), 404);
        }
        for kept in ["latest", "v1.0", "b5"] {
            let r = mia.get(s.url(&format!("/v2/acme/app/manifests/{kept}"))).header("accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
        // Running again finds nothing.
        assert!(items(&run(&mia, &format!("{url}/run"), false).await).is_empty());

        // The audit record: both runs, by whom, what and why.
        let v: Value = mia.get(api(&s, "retention/runs?repository=acme/app")).send().await.unwrap().json().await.unwrap();
        let runs = v["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 3, "{v}");
        assert_eq!((runs[2]["dry_run"].as_bool(), runs[2]["by"].as_str()), (Some(true), Some("mia")));
        assert_eq!(items(&runs[1]), expected);

        // Tags nobody pulled: t1 goes, t2 (pulled recently) stays.
        history(&mia, &s, "acme/old", &["t1", "t2"], 50).await;
        let (status, _) = put(&mia, &api(&s, "repositories/acme/old/-/retention"), json!({"unpulled_for": "3s", "enabled": false})).await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let r = mia.get(s.url("/v2/acme/old/manifests/t2")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(1500)).await; // the pull counters' batch
        let r = run(&mia, &api(&s, "repositories/acme/old/-/retention/run"), false).await;
        assert_eq!(items(&r), [("tag".to_owned(), "t1".to_owned())], "{r}");
        assert!(r["items"][0]["reason"].as_str().unwrap().contains("neither pulled nor pushed for 3s"));
        assert_eq!(tags(&mia, &s, "acme/old").await, ["t2"]);
    });
}

#[test]
fn namespace_policies_schedule_cli_access_and_bad_input() {
    let dir = TempDir::new("retention-ns");
    let s = start(&dir);
    block_on(async {
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "tenant-admin").await);
        let rita = client_as("rita", &tenant_user_token(&s, "acme", "rita", "reader").await);
        let bob = client_as("bob", &tenant_user_token(&s, "beta", "bob", "tenant-admin").await);
        history(&mia, &s, "acme/one", &["a", "b", "c"], 1).await;
        history(&mia, &s, "acme/own", &["a", "b", "c"], 10).await;

        // A repository's own policy wins over its namespace's.
        let (st, _) = put(&mia, &api(&s, "repositories/acme/own/-/retention"), json!({"keep_last": 3, "enabled": false})).await;
        assert_eq!(st, 200);
        let ns_url = api(&s, "namespaces/acme/retention");
        let (st, p) = put(&mia, &ns_url, json!({"keep_last": 1, "enabled": false})).await;
        assert_eq!(st, 200, "{p}");
        let r = run(&mia, &format!("{ns_url}/run"), false).await;
        assert_eq!(items(&r), [("tag".to_owned(), "b".to_owned()), ("tag".to_owned(), "a".to_owned())], "{r}");
        assert!(r["items"].as_array().unwrap().iter().all(|i| i["repository"] == "acme/one"));
        assert_eq!(tags(&mia, &s, "acme/own").await.len(), 3);
        let v: Value = mia.get(api(&s, "retention/runs?namespace=acme")).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["runs"][0]["scope"], "ns:acme");

        // The schedule runs enabled policies (every second here) and records it.
        history(&mia, &s, "acme/sched", &["x", "y", "z"], 20).await;
        let (st, _) = put(&mia, &api(&s, "repositories/acme/sched/-/retention"), json!({"keep_last": 1})).await;
        assert_eq!(st, 200);
        for _ in 0..50 {
            if tags(&mia, &s, "acme/sched").await == ["z"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(tags(&mia, &s, "acme/sched").await, ["z"]);
        let v: Value = mia.get(api(&s, "retention/runs?repository=acme/sched")).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["runs"][0]["by"], "schedule", "{v}");
        // A disabled policy did not run on the schedule.
        assert_eq!(tags(&mia, &s, "acme/own").await.len(), 3);

        // Access: readers read, only those who may delete set or run; other
        // tenants neither.
        let own = api(&s, "repositories/acme/own/-/retention");
        assert_eq!(rita.get(&own).send().await.unwrap().status(), 200);
        assert_eq!(put(&rita, &own, json!({"keep_last": 1})).await.0, 403);
        assert_eq!(rita.post(format!("{own}/run")).json(&json!({})).send().await.unwrap().status(), 403);
        assert_eq!(rita.get(api(&s, "retention/runs")).send().await.unwrap().status(), 403, "all runs: platform admin");
        assert_eq!(bob.get(&own).send().await.unwrap().status(), 403);
        assert_eq!(bob.get(&ns_url).send().await.unwrap().status(), 404);
        assert_eq!(put(&bob, &ns_url, json!({"keep_last": 1})).await.0, 403);
        assert_eq!(bob.get(api(&s, "retention/runs?namespace=acme")).send().await.unwrap().status(), 404);

        // Bad input: a clear 400, nothing stored.
        for body in [
            json!({"keep_last": -1}),
            json!({"keep_last": 5, "unpulled_for": "10y"}),
            json!({"keep_last": 5, "untagged_older_than": "0s"}),
            json!({"keep_last": 5, "keep_patterns": ["a/b"]}),
            json!({"keep_patterns": ["v*"]}),
            json!({"keep_last": 5, "keep": ["v*"]}),
            json!({"keep_last": "5"}),
        ] {
            let (st, v) = put(&mia, &api(&s, "repositories/acme/one/-/retention"), body.clone()).await;
            assert_eq!(st, 400, "{body}: {v}");
            assert!(v["errors"][0]["detail"].is_string() || v["errors"][0]["message"].is_string(), "{v}");
        }
        assert_eq!(mia.get(api(&s, "repositories/acme/one/-/retention")).send().await.unwrap().status(), 404, "none of its own");
        assert_eq!(mia.post(api(&s, "repositories/acme/one/-/retention/run")).json(&json!({})).send().await.unwrap().status(), 404);
        assert_eq!(put(&mia, &api(&s, "repositories/acme/nothing/-/retention"), json!({"keep_last": 1})).await.0, 404);
        assert_eq!(mia.get(api(&s, "retention/runs?limit=0")).send().await.unwrap().status(), 400);
    });

    // The CLI.
    let cli = |args: &[&str]| admin_cli(&s, dir.path(), args);
    let ok = |args: &[&str]| {
        let (code, out) = cli(args);
        assert_eq!(code, Some(0), "berth {args:?}: {out}");
        out
    };
    let out = ok(&["retention", "set", "acme/own", "--keep-last", "2", "--keep", "c", "--disabled"]);
    assert!(out.contains("keep_last: 2") && out.contains("enabled: false"), "{out}");
    assert!(ok(&["retention", "get", "acme/own"]).contains("repo:acme/own"));
    let out = ok(&["retention", "run", "acme/own", "--dry-run"]);
    assert!(out.contains("would delete 1 item") && out.contains("tag acme/own:a"), "{out}");
    let out = ok(&["retention", "run", "acme/own"]);
    assert!(out.contains("deleted 1 item"), "{out}");
    assert!(ok(&["retention", "runs", "--repository", "acme/own"]).contains("by admin"));
    ok(&["retention", "delete", "acme/own"]);
    let (code, out) = cli(&["retention", "get", "acme/own"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(ok(&["retention", "get", "acme", "--namespace"]).contains("ns:acme"));
    let (code, out) = cli(&["retention", "set", "acme/own", "--unpulled-for", "soon"]);
    assert_eq!(code, Some(2));
    assert!(out.contains("unpulled_for"), "{out}");
}
