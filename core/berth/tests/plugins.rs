//! Plugins in the real server: the platform admin installs the scanner with the
//! CLI; a tenant admin enables it for the tenant; a push with a cloud key in
//! its ENV is refused with the scanner's reason and leaves no tag or manifest;
//! a clean push lands with its findings shown by the management API; another
//! tenant's pushes are not judged; who may see and manage which instance; a
//! hostile gate that sleeps past its limit delays only its own scope's pushes.

mod common;

#[path = "../../plugins/tests/support/mod.rs"]
mod support;

use common::*;
use serde_json::{json, Value};

/// Push an image whose config has `env` and `user`; answers the manifest PUT's response.
async fn push_config(c: &reqwest::Client, s: &Server, repo: &str, tag: &str, env: &[&str], user: &str) -> reqwest::Response {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": env, "User": user},
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .unwrap();
    let cd = push_blob(c, s, repo, &config).await;
    let layer = bytes(tag.len() as u64 + env.len() as u64, 2000);
    let ld = push_blob(c, s, repo, &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], json!({}));
    c.put(s.url(&format!("/v2/{repo}/manifests/{tag}"))).header("content-type", OCI_MANIFEST).body(m).send().await.unwrap()
}

#[test]
fn the_scanner_gates_a_tenants_pushes() {
    let dir = TempDir::new("plugins");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cli = |args: &[&str]| admin_cli(&s, dir.path(), args);
    // Installed as an operator would: the manifest from the repository, the
    // component as built; the CLI pins its sha256.
    let wasm = support::built().join("berth_scanner.wasm");
    let (code, out) = cli(&["plugin", "install", root.join("plugins/scanner").to_str().unwrap(), "--component", wasm.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    let hostile = support::install(
        &dir.path().join("src"),
        "berth_hostile",
        "hostile",
        "hooks = [\"gate\"]\n[config.mode]\n[config.sleep_ms]\ntype = \"integer\"\n[limits]\ntimeout_ms = 1500\nfail_open = true\n",
    );
    let (code, out) = cli(&["plugin", "install", hostile.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = cli(&["plugin", "list"]);
    assert!(code == Some(0) && out.contains("scanner") && out.contains("hostile") && out.contains("read-image"), "{out}");

    block_on(async {
        let mia = client_as("mia", &tenant_user_token(&s, "acme", "mia", "tenant-admin").await);
        let bob = client_as("bob", &tenant_user_token(&s, "globex", "bob", "tenant-admin").await);
        let api = |p: &str| s.url(&format!("/api/v1/plugins/{p}"));
        let instance = json!({
            "module": "scanner", "scope": "tenant:acme", "hooks": ["gate"],
            "config": {"required_annotations": "org.opencontainers.image.source", "non_root_repositories": "acme/secure-*"}
        });
        // Tenant admins manage their own tenant's instances, not the platform's or another tenant's.
        let r = mia.put(api("instances/acme-scan")).json(&instance).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        let mut platform = instance.clone();
        platform["scope"] = json!("platform");
        assert_eq!(mia.put(api("instances/x")).json(&platform).send().await.unwrap().status(), 403);
        let mut theirs = instance.clone();
        theirs["scope"] = json!("tenant:globex");
        assert_eq!(mia.put(api("instances/x")).json(&theirs).send().await.unwrap().status(), 403);
        assert_eq!(bob.get(api("instances/acme-scan")).send().await.unwrap().status(), 404);
        assert_eq!(bob.delete(api("instances/acme-scan")).send().await.unwrap().status(), 404);
        assert_eq!(bob.put(api("instances/acme-scan")).json(&theirs).send().await.unwrap().status(), 400, "the id is taken");
        let listed: Value = bob.get(s.url("/api/v1/plugins")).send().await.unwrap().json().await.unwrap();
        assert_eq!(listed["instances"].as_array().unwrap().len(), 0, "{listed}");
        assert_eq!(
            bob.put(api("modules/scanner")).json(&json!({"manifest": "", "component_base64": ""})).send().await.unwrap().status(),
            403
        );
        // Bad module installs: every one a 400 that installs nothing.
        let admin = client();
        let garbage = b"not a component";
        let pinned =
            format!("name = \"junk\"\nversion = \"1\"\nfile = \"j.wasm\"\nsha256 = \"{}\"\nhooks = [\"gate\"]\n", &sha256(garbage)[7..]);
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(garbage);
        for (name, body) in [
            ("junk", json!({"manifest": "name = [", "component_base64": b64})),
            ("other", json!({"manifest": pinned, "component_base64": b64})),
            ("junk", json!({"manifest": pinned, "component_base64": "%%%"})),
            ("junk", json!({"manifest": pinned, "component_base64": b64})),
            ("junk", json!({"manifest": pinned, "component_base64": b64, "force": true})),
        ] {
            let r = admin.put(api(&format!("modules/{name}"))).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 400, "{body}: {}", r.text().await.unwrap());
        }
        let listed: Value = admin.get(s.url("/api/v1/plugins")).send().await.unwrap().json().await.unwrap();
        assert!(listed["modules"].as_array().unwrap().iter().all(|m| m["name"] != "junk"), "{listed}");
        assert_eq!(admin.post(s.url("/metrics")).send().await.unwrap().status(), 405);
        // Bad input: an unknown hook, config key, module or scope.
        for (field, value) in
            [("hooks", json!(["gates"])), ("config", json!({"colour": "red"})), ("module", json!("nope")), ("scope", json!("galaxy"))]
        {
            let mut b = instance.clone();
            b[field] = value;
            let r = mia.put(api("instances/acme-bad")).json(&b).send().await.unwrap();
            assert_eq!(r.status(), 400, "{field}: {}", r.text().await.unwrap());
        }

        // A cloud key in ENV: refused with the scanner's reason; nothing of it stays.
        let r = push_config(&mia, &s, "acme/app", "v1", &["AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"], "app").await;
        assert_eq!(r.status(), 403);
        let body = r.text().await.unwrap();
        assert!(body.contains("DENIED") && body.contains("acme-scan") && body.contains("secret-in-env"), "{body}");
        assert!(!body.contains("AKIAIOSFODNN7EXAMPLE"));
        let r = mia.get(s.url("/v2/acme/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 404);
        // Root where the repository requires non-root.
        assert_eq!(push_config(&mia, &s, "acme/secure-api", "v1", &["PATH=/bin"], "").await.status(), 403);
        // Clean but for a missing annotation: in, with the finding shown.
        assert_eq!(push_config(&mia, &s, "acme/app", "v2", &["PATH=/bin"], "app").await.status(), 201);
        let tag: Value = mia.get(s.url("/api/v1/repositories/acme/app/-/tags/v2")).send().await.unwrap().json().await.unwrap();
        let findings = tag["findings"].as_array().unwrap_or_else(|| panic!("{tag}"));
        assert_eq!(findings.len(), 1, "{tag}");
        assert_eq!((findings[0]["plugin"].as_str(), findings[0]["rule"].as_str()), (Some("acme-scan"), Some("missing-annotation")));
        // Another tenant's pushes are not its business.
        assert_eq!(push_config(&bob, &s, "globex/app", "v1", &["AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"], "").await.status(), 201);

        let st: Value = mia.get(api("instances/acme-scan")).send().await.unwrap().json().await.unwrap();
        assert_eq!(
            (st["state"].as_str(), st["health"]["calls"].as_u64(), st["health"]["failures"].as_u64()),
            (Some("on"), Some(3), Some(0)),
            "{st}"
        );

        // A gate that sleeps past its limit, on globex's namespace: its pushes
        // wait for the limit (then go ahead, fail_open); acme's do not wait for it.
        let sleepy =
            json!({"module": "hostile", "scope": "namespace:globex", "hooks": ["gate"], "config": {"mode": "sleep", "sleep_ms": "60000"}});
        assert_eq!(bob.put(api("instances/globex-sleepy")).json(&sleepy).send().await.unwrap().status(), 200);
        let slow = push_config(&bob, &s, "globex/slow", "v1", &["PATH=/bin"], "");
        let fast = async {
            let r = push_config(&mia, &s, "acme/app", "v3", &["PATH=/bin"], "app").await;
            (r.status(), std::time::Instant::now())
        };
        let (slow, (fast_status, fast_done)) = futures::join!(async { (slow.await.status(), std::time::Instant::now()) }, fast);
        assert_eq!((slow.0, fast_status), (reqwest::StatusCode::CREATED, reqwest::StatusCode::CREATED));
        assert!(fast_done < slow.1, "acme's push waited for globex's gate");
        let st: Value = bob.get(api("instances/globex-sleepy")).send().await.unwrap().json().await.unwrap();
        assert_eq!(st["health"]["timeouts"].as_u64(), Some(1), "{st}");

        // Disable, status and remove with the CLI.
        let (code, out) = cli(&["plugin", "disable", "acme-scan"]);
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(push_config(&mia, &s, "acme/app", "v4", &["AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"], "app").await.status(), 201);
        let (code, out) = cli(&["plugin", "status", "acme-scan"]);
        assert!(code == Some(0) && out.contains("acme-scan (scanner at tenant:acme): off"), "{out}");
        let (code, out) = cli(&["plugin", "remove", "acme-scan"]);
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(mia.get(api("instances/acme-scan")).send().await.unwrap().status(), 404);
    });
}
