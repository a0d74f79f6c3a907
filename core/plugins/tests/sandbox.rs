//! The host against real components built from `plugins/`: the scanner judges
//! crafted images; every hostile fixture is ended or refused within its limits
//! and shows in the instance's health; the breaker switches a failing instance
//! off; pins, contract and the compiled cache.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use berth_plugins::{BlobReader, CallError, Decision, Event, EventKind, Hook, Image, InstanceSpec, PluginHost, Push, Scope};
use sha2::{Digest, Sha256};

struct Blobs(BTreeMap<String, Vec<u8>>);

#[async_trait::async_trait]
impl BlobReader for Blobs {
    async fn read(&self, digest: &str, offset: u64, max: u64) -> Result<Vec<u8>, String> {
        let b = self.0.get(digest).ok_or("no such blob")?;
        let start = (offset as usize).min(b.len());
        let end = (start + max as usize).min(b.len());
        Ok(b[start..end].to_vec())
    }
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// An image whose config has this ENV and user, with one layer of `layer_size`.
fn image(env: &[&str], user: &str, layer_size: u64) -> Image {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": env, "User": user, "Labels": {"team": "core"}},
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(b"layer"), "size": layer_size}]
    }))
    .unwrap();
    let refs = BTreeSet::from([digest(&config), digest(b"layer")]);
    Image { manifest, refs, reader: Arc::new(Blobs(BTreeMap::from([(digest(&config), config)]))) }
}

fn push(repo: &str) -> Push {
    Push {
        tenant: "acme".into(),
        repository: repo.into(),
        tag: Some("v1".into()),
        digest: digest(b"m"),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 1,
        content_size: 1,
        platforms: vec![],
        subject: None,
        artifact_type: None,
        pusher: "mia".into(),
    }
}

fn spec(id: &str, module: &str, scope: Scope, hooks: &[Hook], config: &[(&str, &str)]) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        module: module.into(),
        scope,
        hooks: hooks.iter().copied().collect(),
        config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        allow_hosts: vec![],
        enabled: true,
    }
}

const SCANNER: &str = r#"hooks = ["gate"]
[capabilities]
read_image = true
log = true
[config.deny_at]
[config.non_root_repositories]
[config.max_layer_bytes]
type = "integer"
[config.required_annotations]
[config.extra_secret_patterns]
"#;

fn host(dir: &tempfile::TempDir) -> PluginHost {
    PluginHost::new(&dir.path().join("cache"), None).unwrap()
}

#[tokio::test]
async fn the_scanner_denies_secrets_and_root_and_annotates_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(&dir);
    h.load(&support::install(&dir.path().join("plugins"), "berth_scanner", "scanner", SCANNER)).unwrap();
    let config = [
        ("non_root_repositories", "acme/secure-*"),
        ("max_layer_bytes", "1000"),
        ("required_annotations", "org.opencontainers.image.source"),
    ];
    h.put_instance(spec("scan", "scanner", Scope::Tenant("acme".into()), &[Hook::Gate], &config)).unwrap();

    // A cloud key in ENV: denied, naming the variable but never the value.
    let key = "AKIAIOSFODNN7EXAMPLE";
    match h.gate(&push("acme/app"), Some(&image(&[&format!("AWS_ACCESS_KEY_ID={key}"), "PATH=/bin"], "app", 10))).await {
        Decision::Deny { plugin, reason } => {
            assert_eq!(plugin, "scan");
            assert!(reason.contains("secret-in-env") && reason.contains("AWS_ACCESS_KEY_ID"), "{reason}");
            assert!(!reason.contains(key), "the secret itself is repeated: {reason}");
        }
        other => panic!("{other:?}"),
    }
    // A password by name; root where non-root is required.
    assert!(matches!(h.gate(&push("acme/app"), Some(&image(&["DB_PASSWORD=hunter2"], "app", 10))).await, Decision::Deny { .. }));
    match h.gate(&push("acme/secure-api"), Some(&image(&["PATH=/bin"], "", 10))).await {
        Decision::Deny { reason, .. } => assert!(reason.contains("runs-as-root"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Clean but for a big layer and a missing annotation: let in, with findings.
    match h.gate(&push("acme/secure-api"), Some(&image(&["PATH=/bin"], "1000:1000", 5000))).await {
        Decision::Allow { findings } => {
            let rules: BTreeSet<&str> = findings.iter().map(|f| f.rule.as_str()).collect();
            assert_eq!(rules, BTreeSet::from(["layer-too-large", "missing-annotation"]), "{findings:?}");
            assert!(findings.iter().all(|f| f.plugin == "scan"));
        }
        other => panic!("{other:?}"),
    }
    // Out of its scope (another tenant): not called.
    let mut other = push("globex/app");
    other.tenant = "globex".into();
    assert_eq!(h.gate(&other, Some(&image(&[&format!("K={key}")], "", 10))).await, Decision::Allow { findings: vec![] });
    let health = h.instance("scan").unwrap().health();
    assert_eq!((health.calls, health.failures), (4, 0), "{health:?}");

    // A bad configuration is refused when the instance is set.
    let bad = spec("scan2", "scanner", Scope::Platform, &[Hook::Gate], &[("max_layer_bytes", "big")]);
    assert!(h.put_instance(bad).err().unwrap().contains("integer"));
    let bad = spec("scan2", "scanner", Scope::Platform, &[Hook::ManifestPushed], &[]);
    assert!(h.put_instance(bad).err().unwrap().contains("does not implement"));
}

const HOSTILE: &str = r#"hooks = ["gate", "manifest-pushed"]
[capabilities]
log = true
http = ["127.0.0.1"]
[config.mode]
[config.sleep_ms]
type = "integer"
[config.garbage]
[limits]
timeout_ms = 300
memory_mib = 32
max_failures = 3
log_lines = 5
"#;

/// The outcome of one gate call to the hostile fixture (as installed under
/// `module`) in `mode`.
async fn hostile_as(h: &PluginHost, module: &str, mode: &str, extra: &[(&str, &str)]) -> (Decision, berth_plugins::Health) {
    let id = format!("h-{mode}");
    let mut config = vec![("mode", mode)];
    config.extend_from_slice(extra);
    h.put_instance(spec(&id, module, Scope::Namespace(id.clone()), &[Hook::Gate], &config)).unwrap();
    let d = h.gate(&push(&format!("{id}/app")), None).await;
    (d, h.instance(&id).unwrap().health())
}

async fn hostile(h: &PluginHost, mode: &str, extra: &[(&str, &str)]) -> (Decision, berth_plugins::Health) {
    hostile_as(h, "hostile", mode, extra).await
}

async fn finishing(h: &PluginHost, mode: &str, extra: &[(&str, &str)]) -> (Decision, berth_plugins::Health) {
    hostile_as(h, "hostile-patient", mode, extra).await
}

#[tokio::test]
async fn hostile_plugins_are_ended_within_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(&dir);
    h.load(&support::install(&dir.path().join("plugins"), "berth_hostile", "hostile", HOSTILE)).unwrap();
    // The same module with a clock that a call which ends on its own never
    // meets, even on a loaded machine: for the modes that must finish (a trap,
    // a refusal, garbage), so that only the limit under test decides them.
    let patient = HOSTILE.replace("timeout_ms = 300", "timeout_ms = 60000");
    h.load(&support::install(&dir.path().join("plugins"), "berth_hostile", "hostile-patient", &patient)).unwrap();
    let denied = |d: &Decision, what: &str| match d {
        Decision::Deny { reason, .. } => assert!(reason.contains(what), "{what}: {reason}"),
        other => panic!("{what}: {other:?}"),
    };

    let (d, health) = hostile(&h, "loop", &[]).await;
    denied(&d, "timed out");
    assert_eq!(health.timeouts, 1);
    let (d, health) = finishing(&h, "memory", &[]).await;
    denied(&d, "out of memory");
    assert_eq!(health.failures, 1);
    let (d, _) = finishing(&h, "trap", &[]).await;
    denied(&d, "trapped");
    let (d, _) = hostile(&h, "sleep", &[("sleep_ms", "60000")]).await;
    denied(&d, "timed out");
    // A flood of log lines: the call is ended, and only `log_lines` were kept.
    let (d, health) = hostile(&h, "log-flood", &[]).await;
    denied(&d, "timed out");
    // (Counted only for calls that returned; a flood that ran out the clock is
    // ended with its store.)
    assert_eq!(health.failures, 1);
    // HTTP to a host the module was not granted is refused by the host.
    let (d, _) = finishing(&h, "http-denied", &[]).await;
    denied(&d, "not granted");
    // Garbage: an enormous reason is clipped; 100,000 findings are cut to 100.
    let (d, _) = finishing(&h, "garbage", &[]).await;
    match d {
        Decision::Deny { reason, .. } => assert!(reason.len() < 1100, "{}", reason.len()),
        other => panic!("{other:?}"),
    }
    let (d, _) = finishing(&h, "garbage", &[("garbage", "findings")]).await;
    match d {
        Decision::Allow { findings } => {
            assert_eq!(findings.len(), 101);
            assert!(findings[100].message.contains("99900 more"), "{:?}", findings[100]);
        }
        other => panic!("{other:?}"),
    }

    // Meanwhile, and after all that, a well-behaved call still works.
    let (d, health) = finishing(&h, "allow", &[]).await;
    assert_eq!(d, Decision::Allow { findings: vec![] });
    assert_eq!((health.calls, health.failures), (1, 0));
}

/// An in-memory store standing in for metadata's `plugin_kv` (the server's
/// is tested with the metadata crate and end to end).
#[derive(Default)]
struct MemKv(std::sync::Mutex<std::collections::BTreeMap<(String, String), Vec<u8>>>);

#[async_trait::async_trait]
impl berth_plugins::KvStore for MemKv {
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().unwrap().get(&(scope.to_owned(), key.to_owned())).cloned())
    }
    async fn set(&self, scope: &str, key: &str, value: &[u8]) -> Result<(), String> {
        self.0.lock().unwrap().insert((scope.to_owned(), key.to_owned()), value.to_vec());
        Ok(())
    }
}

#[tokio::test]
async fn the_key_value_store_is_granted_and_each_instances_own() {
    let dir = tempfile::tempdir().unwrap();
    let h = PluginHost::new(&dir.path().join("cache"), Some(std::sync::Arc::new(MemKv::default()))).unwrap();
    let plugins = dir.path().join("plugins");
    h.load(&support::install(&plugins, "berth_hostile", "counter", "hooks = [\"gate\"]\n[capabilities]\nkv = true\n[config.mode]\n"))
        .unwrap();
    h.load(&support::install(&plugins, "berth_hostile", "nokv", "hooks = [\"gate\"]\n[config.mode]\n")).unwrap();
    let count = |d: Decision| match d {
        Decision::Allow { findings } => findings.iter().map(|f| f.message.clone()).collect::<Vec<_>>().join(","),
        other => panic!("{other:?}"),
    };
    h.put_instance(spec("a", "counter", Scope::Namespace("a".into()), &[Hook::Gate], &[("mode", "kv")])).unwrap();
    h.put_instance(spec("b", "counter", Scope::Namespace("b".into()), &[Hook::Gate], &[("mode", "kv")])).unwrap();
    // Each instance counts in its own store, across calls (fresh sandboxes).
    assert_eq!(count(h.gate(&push("a/app"), None).await), "1");
    assert_eq!(count(h.gate(&push("a/app"), None).await), "2");
    assert_eq!(count(h.gate(&push("b/app"), None).await), "1");
    assert_eq!(count(h.gate(&push("a/app"), None).await), "3");
    // Not granted: the host refuses, and the gate's failure refuses the push.
    h.put_instance(spec("c", "nokv", Scope::Namespace("c".into()), &[Hook::Gate], &[("mode", "kv")])).unwrap();
    match h.gate(&push("c/app"), None).await {
        Decision::Deny { reason, .. } => assert!(reason.contains("kv: HostError::Denied") && reason.contains("not granted"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn repeated_failures_switch_an_instance_off() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(&dir);
    h.load(&support::install(&dir.path().join("plugins"), "berth_hostile", "hostile", HOSTILE)).unwrap();
    h.put_instance(spec("flaky", "hostile", Scope::Platform, &[Hook::Gate, Hook::ManifestPushed], &[("mode", "trap")])).unwrap();
    for _ in 0..3 {
        assert!(matches!(h.gate(&push("acme/app"), None).await, Decision::Deny { .. }));
    }
    let inst = h.instance("flaky").unwrap();
    let health = inst.health();
    assert!(health.tripped.as_deref().is_some_and(|t| t.contains("3 consecutive failures")), "{health:?}");
    assert!(!inst.is_on());
    // Switched off: no more calls into it; a fail-closed gate refuses, saying why.
    match h.gate(&push("acme/app"), None).await {
        Decision::Deny { reason, .. } => assert!(reason.contains("switched off"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let event = Event {
        id: "e1".into(),
        at_ms: 1,
        kind: EventKind::RepositoryCreated { tenant: "acme".into(), repository: "acme/app".into(), by: "mia".into() },
    };
    assert_eq!(h.notify(&inst, &event).await, Err(CallError::Tripped(3)));
    assert_eq!(inst.health().calls, 3, "no call after it was switched off");
    // Setting the instance again (enabling it) starts afresh.
    h.put_instance(spec("flaky", "hostile", Scope::Platform, &[Hook::Gate], &[("mode", "allow")])).unwrap();
    assert_eq!(h.gate(&push("acme/app"), None).await, Decision::Allow { findings: vec![] });
}

#[tokio::test]
async fn modules_are_pinned_and_compiled_once() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let module = support::install(&plugins, "berth_hostile", "hostile", HOSTILE);
    let h = host(&dir);
    h.load(&module).unwrap();
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("cache")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let compiled_at = std::fs::metadata(&cached[0]).unwrap().modified().unwrap();
    // A second host (a restart) reuses the compiled module.
    let again = host(&dir);
    again.load(&module).unwrap();
    assert_eq!(std::fs::metadata(&cached[0]).unwrap().modified().unwrap(), compiled_at);
    again.put_instance(spec("a", "hostile", Scope::Platform, &[Hook::Gate], &[])).unwrap();
    assert_eq!(again.gate(&push("acme/app"), None).await, Decision::Allow { findings: vec![] });

    // A component that is not the one pinned is refused, naming both digests.
    let toml = std::fs::read_to_string(module.join("plugin.toml")).unwrap();
    let mut wasm = std::fs::read(module.join("plugin.wasm")).unwrap();
    wasm.push(0);
    std::fs::write(module.join("plugin.wasm"), &wasm).unwrap();
    let e = match host(&dir).load(&module) {
        Err(e) => e,
        Ok(_) => panic!("a changed component was loaded"),
    };
    let actual = hex::encode(Sha256::digest(&wasm));
    assert!(e.contains(&actual) && toml.lines().any(|l| l.starts_with("sha256") && e.contains(&l[10..74])), "{e}");
    // Not a component at all: refused with the compiler's reason.
    std::fs::write(module.join("plugin.wasm"), b"not wasm").unwrap();
    let sha = hex::encode(Sha256::digest(b"not wasm"));
    let pinned = toml
        .lines()
        .map(|l| if l.starts_with("sha256") { format!("sha256 = \"{sha}\"") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(module.join("plugin.toml"), pinned).unwrap();
    assert!(host(&dir).load(&module).is_err());

    // A real component built for the next contract version (its own WIT,
    // `berth:plugin@0.2.0`): refused at load, naming both versions.
    let future = support::install(&plugins, "berth_future", "future", "hooks = [\"gate\"]\n");
    let e = match host(&dir).load(&future) {
        Err(e) => e,
        Ok(_) => panic!("a component of another contract version was loaded"),
    };
    assert_eq!(e, "future was built for berth:plugin@0.2.0; this Berth speaks berth:plugin@0.1.0");
}
