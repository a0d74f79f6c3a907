//! The WebAssembly plugin host.
//!
//! A **module** is a component (wasm32-wasip2, exporting the `berth:plugin`
//! world of `sdk/wit`) with its `plugin.toml` ([`manifest`]), installed by the
//! platform admin. An **instance** binds a module to a scope (the platform, a
//! tenant, or a namespace) with its own configuration and hooks; it sees only
//! events and pushes inside its scope. The host calls gates before a push
//! commits ([`PluginHost::gate`]) and delivers events ([`PluginHost::notify`]);
//! each call runs in a fresh sandbox ([`sandbox`]) within the module's limits.
//!
//! Invariants:
//! - A plugin never authorizes: the request was authorized before any plugin
//!   is called, and a plugin's answer can only refuse a push, never admit one.
//! - A trap, timeout or exhausted memory or fuel ends that call only. After
//!   `max_failures` consecutive failures the instance is switched off (its
//!   status says why) until an admin enables it again.
//! - A module whose component does not match its manifest's sha256, or speaks
//!   another contract version, is refused at load, naming both.

pub mod manifest;
mod sandbox;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

pub use manifest::{Hook, PluginManifest};
use sandbox::{wit, CallCtx, ImageAccess, PluginPre};

/// Reads the bytes of a blob the gated manifest references.
#[async_trait::async_trait]
pub trait BlobReader: Send + Sync {
    async fn read(&self, digest: &str, offset: u64, max: u64) -> Result<Vec<u8>, String>;
}

/// An instance's own key-value store (`scope` is the instance id).
#[async_trait::async_trait]
pub trait KvStore: Send + Sync {
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, String>;
    async fn set(&self, scope: &str, key: &str, value: &[u8]) -> Result<(), String>;
}

/// Why a call into a plugin did not produce an answer.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("timed out")]
    Timeout,
    #[error("out of memory")]
    OutOfMemory,
    #[error("out of fuel")]
    OutOfFuel,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("could not start: {0}")]
    Instantiate(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Asked to be called again later (a receiver that did not answer).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("failed: {0}")]
    Failed(String),
    #[error("switched off after {0} consecutive failures")]
    Tripped(u32),
}

/// Who an instance serves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Scope {
    Platform,
    Tenant(String),
    Namespace(String),
}

impl Scope {
    /// Whether a change in `namespace`, owned by `tenant`, is this scope's business.
    pub fn covers(&self, tenant: Option<&str>, namespace: &str) -> bool {
        match self {
            Scope::Platform => true,
            Scope::Tenant(t) => tenant == Some(t.as_str()),
            Scope::Namespace(n) => n == namespace,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Platform => f.write_str("platform"),
            Scope::Tenant(t) => write!(f, "tenant:{t}"),
            Scope::Namespace(n) => write!(f, "namespace:{n}"),
        }
    }
}

/// A severity of a gate's finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

/// What a gate found, as kept beside the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Finding {
    /// The instance that found it.
    pub plugin: String,
    pub rule: String,
    pub severity: Severity,
    pub message: String,
}

/// A manifest push, as a gate sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Push {
    pub tenant: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub content_size: u64,
    pub platforms: Vec<Platform>,
    pub subject: Option<String>,
    pub artifact_type: Option<String>,
    pub pusher: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// The gated image, for plugins granted `read_image`.
pub struct Image {
    pub manifest: Vec<u8>,
    /// The digests it references: the only blobs a plugin may read.
    pub refs: BTreeSet<String>,
    pub reader: Arc<dyn BlobReader>,
}

/// The gates' joint answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Allow { findings: Vec<Finding> },
    Deny { plugin: String, reason: String },
}

/// An installed module.
pub struct Module {
    pub manifest: PluginManifest,
    pub dir: PathBuf,
    pre: PluginPre<sandbox::State>,
}

/// A module bound to a scope, with its configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceSpec {
    /// Unique: lowercase letters, digits and `-`.
    pub id: String,
    pub module: String,
    pub scope: Scope,
    /// The hooks it is called for (a subset of the module's).
    pub hooks: BTreeSet<Hook>,
    pub config: BTreeMap<String, String>,
    /// Hosts its HTTP may reach, within the module's grant.
    pub allow_hosts: Vec<String>,
    pub enabled: bool,
}

/// How an instance has fared since it was (re)enabled.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Health {
    pub calls: u64,
    pub failures: u64,
    pub timeouts: u64,
    pub consecutive_failures: u32,
    /// Why it was switched off, if it was.
    pub tripped: Option<String>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    /// Latency of the last 1,024 calls, in ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Log lines a call wanted past its limit.
    pub logs_dropped: u64,
}

const LATENCY_WINDOW: usize = 1024;

#[derive(Default)]
struct Tally {
    health: Health,
    latencies: VecDeque<Duration>,
}

/// An instance as the host keeps it.
pub struct Instance {
    pub spec: InstanceSpec,
    pub module: Arc<Module>,
    tally: Mutex<Tally>,
}

impl Instance {
    pub fn health(&self) -> Health {
        let t = self.tally.lock().unwrap();
        let mut h = t.health.clone();
        let mut l: Vec<Duration> = t.latencies.iter().copied().collect();
        l.sort();
        let pick = |q: f64| l.get(((l.len() as f64 - 1.0) * q).round() as usize).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        (h.p50_ms, h.p99_ms) = (pick(0.5), pick(0.99));
        h
    }

    pub fn is_on(&self) -> bool {
        self.spec.enabled && self.tally.lock().unwrap().health.tripped.is_none()
    }

    fn record(&self, took: Duration, outcome: Result<(), &CallError>, logs_dropped: u64) {
        let mut t = self.tally.lock().unwrap();
        if t.latencies.len() == LATENCY_WINDOW {
            t.latencies.pop_front();
        }
        t.latencies.push_back(took);
        let max = self.module.manifest.limits.max_failures;
        let h = &mut t.health;
        h.calls += 1;
        h.logs_dropped += logs_dropped;
        match outcome {
            Ok(()) => h.consecutive_failures = 0,
            Err(e) => {
                h.failures += 1;
                if *e == CallError::Timeout {
                    h.timeouts += 1;
                }
                // A plugin that answers "unavailable" (its receiver is down)
                // works: delivery retries with backoff, and the breaker waits
                // for failures of the plugin itself.
                if !matches!(e, CallError::Unavailable(_)) {
                    h.consecutive_failures += 1;
                }
                h.last_error = Some(e.to_string());
                h.last_error_ms = Some(now_ms());
                if h.consecutive_failures >= max && h.tripped.is_none() {
                    h.tripped = Some(format!("{max} consecutive failures, the last: {e}"));
                    tracing::warn!(plugin = %self.spec.id, error = %e, "plugin switched off after {max} consecutive failures");
                }
            }
        }
    }
}

/// The host: the engine, the installed modules and the instances.
pub struct PluginHost {
    engine: Engine,
    linker: wasmtime::component::Linker<sandbox::State>,
    cache_dir: PathBuf,
    modules: RwLock<BTreeMap<String, Arc<Module>>>,
    instances: RwLock<BTreeMap<String, Arc<Instance>>>,
    http: reqwest::Client,
    kv: Option<Arc<dyn KvStore>>,
    ticking: Arc<AtomicBool>,
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Release);
    }
}

impl PluginHost {
    /// A host compiling into (and reusing compiled modules from) `cache_dir`.
    pub fn new(cache_dir: &Path, kv: Option<Arc<dyn KvStore>>) -> Result<PluginHost, String> {
        let mut cfg = wasmtime::Config::new();
        cfg.wasm_component_model(true).epoch_interruption(true).consume_fuel(true);
        let engine = Engine::new(&cfg).map_err(|e| format!("plugin engine: {e}"))?;
        let linker = sandbox::linker(&engine).map_err(|e| format!("plugin linker: {e}"))?;
        std::fs::create_dir_all(cache_dir).map_err(|e| format!("plugin cache {}: {e}", cache_dir.display()))?;
        let ticking = Arc::new(AtomicBool::new(true));
        let (e, on) = (engine.clone(), ticking.clone());
        std::thread::Builder::new()
            .name("berth-plugin-epoch".into())
            .spawn(move || {
                while on.load(Ordering::Acquire) {
                    std::thread::sleep(sandbox::TICK);
                    e.increment_epoch();
                }
            })
            .map_err(|e| format!("plugin epoch thread: {e}"))?;
        // No redirects: a redirect could lead to a host the plugin was not granted.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("plugin HTTP client: {e}"))?;
        Ok(PluginHost {
            engine,
            linker,
            cache_dir: cache_dir.to_owned(),
            modules: RwLock::new(BTreeMap::new()),
            instances: RwLock::new(BTreeMap::new()),
            http,
            kv,
            ticking,
        })
    }

    /// Load (or reload) the module whose `plugin.toml` is in `dir`: check its
    /// pin and contract, compile it (or reuse the compiled copy the cache holds
    /// for this pin), and make it ready to instantiate. Instances of a module
    /// loaded again use the new one from their next call.
    pub fn load(&self, dir: &Path) -> Result<Arc<Module>, String> {
        Ok(self.register(self.prepare(dir)?))
    }

    /// Check and compile the module in `dir` without installing it (so a
    /// module that does not load replaces nothing).
    pub fn prepare(&self, dir: &Path) -> Result<Module, String> {
        let toml_path = dir.join("plugin.toml");
        let text = std::fs::read_to_string(&toml_path).map_err(|e| format!("{}: {e}", toml_path.display()))?;
        let manifest = PluginManifest::parse(&text).map_err(|e| format!("{}: {e}", toml_path.display()))?;
        let file = dir.join(&manifest.file);
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != manifest.sha256 {
            return Err(format!("{}: its sha256 is {actual}, but plugin.toml pins {}", file.display(), manifest.sha256));
        }
        let component = self.compile(&manifest.sha256, &bytes)?;
        check_contract(&self.engine, &component, &manifest.name)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| format!("{}: {e:#}", manifest.name))?;
        let pre = PluginPre::new(pre).map_err(|e| format!("{} does not export the berth:plugin world: {e:#}", manifest.name))?;
        Ok(Module { manifest, dir: dir.to_owned(), pre })
    }

    /// Install a prepared module under its name; its instances move to it.
    pub fn register(&self, module: Module) -> Arc<Module> {
        let module = Arc::new(module);
        self.modules.write().unwrap().insert(module.manifest.name.clone(), module.clone());
        let mut instances = self.instances.write().unwrap();
        let moved: Vec<InstanceSpec> =
            instances.values().filter(|i| i.spec.module == module.manifest.name).map(|i| i.spec.clone()).collect();
        for spec in moved {
            instances.insert(spec.id.clone(), Arc::new(Instance { spec, module: module.clone(), tally: Mutex::new(Tally::default()) }));
        }
        tracing::info!(plugin = %module.manifest.name, version = %module.manifest.version, "plugin module loaded");
        module
    }

    /// Load every `<dir>/*/plugin.toml`; the folders refused, and why.
    pub fn load_all(&self, dir: &Path) -> BTreeMap<String, String> {
        let mut refused = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(dir) else { return refused };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.join("plugin.toml").is_file()).collect();
        dirs.sort();
        for d in dirs {
            if let Err(e) = self.load(&d) {
                tracing::error!(error = %e, "plugin module refused");
                refused.insert(d.file_name().unwrap_or_default().to_string_lossy().into_owned(), e);
            }
        }
        refused
    }

    fn compile(&self, sha256: &str, bytes: &[u8]) -> Result<Component, String> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let cached = self.cache_dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
        if cached.is_file() {
            // SAFETY: the file was written below by this engine configuration
            // (its compatibility hash is in the name) from a component whose
            // sha256 is in the name, into Berth's own data directory.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!(file = %cached.display(), error = %e, "compiled plugin unusable; compiling again"),
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| format!("compiling: {e:#}"))?;
        if let Ok(serialized) = component.serialize() {
            let tmp = cached.with_extension("tmp");
            if std::fs::write(&tmp, serialized).and_then(|()| std::fs::rename(&tmp, &cached)).is_err() {
                tracing::warn!(file = %cached.display(), "could not cache the compiled plugin");
            }
        }
        Ok(component)
    }

    pub fn modules(&self) -> Vec<Arc<Module>> {
        self.modules.read().unwrap().values().cloned().collect()
    }

    pub fn module(&self, name: &str) -> Option<Arc<Module>> {
        self.modules.read().unwrap().get(name).cloned()
    }

    /// Check an instance against its module (hooks, configuration, hosts).
    pub fn check(&self, spec: &InstanceSpec) -> Result<Arc<Module>, String> {
        let valid_id = !spec.id.is_empty()
            && spec.id.len() <= 64
            && spec.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !spec.id.starts_with('-');
        if !valid_id {
            return Err(format!("plugin instance id {:?}: lowercase letters, digits and -, at most 64", spec.id));
        }
        let module = self.module(&spec.module).ok_or_else(|| format!("no plugin module {:?} is installed", spec.module))?;
        let m = &module.manifest;
        if spec.hooks.is_empty() {
            return Err("hooks: at least one".into());
        }
        if let Some(h) = spec.hooks.iter().find(|h| !m.hooks.contains(h)) {
            return Err(format!("{} does not implement the {} hook", m.name, h.name()));
        }
        m.check_config(&spec.config)?;
        for h in &spec.allow_hosts {
            manifest::host_pattern(h)?;
            if h == "*" {
                return Err("allow_hosts: name the hosts (\"*\" is the module's grant to give, not an instance's)".into());
            }
        }
        if !spec.allow_hosts.is_empty() && m.capabilities.http.is_empty() {
            return Err(format!("{} is granted no outbound HTTP", m.name));
        }
        Ok(module)
    }

    /// Add or replace an instance (its health starts afresh).
    pub fn put_instance(&self, spec: InstanceSpec) -> Result<Arc<Instance>, String> {
        let module = self.check(&spec)?;
        let inst = Arc::new(Instance { spec, module, tally: Mutex::new(Tally::default()) });
        self.instances.write().unwrap().insert(inst.spec.id.clone(), inst.clone());
        Ok(inst)
    }

    pub fn remove_instance(&self, id: &str) -> Option<Arc<Instance>> {
        self.instances.write().unwrap().remove(id)
    }

    pub fn instance(&self, id: &str) -> Option<Arc<Instance>> {
        self.instances.read().unwrap().get(id).cloned()
    }

    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.instances.read().unwrap().values().cloned().collect()
    }

    /// Whether any enabled instance is called for `hook`.
    pub fn takes(&self, hook: Hook) -> bool {
        self.instances.read().unwrap().values().any(|i| i.spec.enabled && i.spec.hooks.contains(&hook))
    }

    /// The instances a change in `namespace` (owned by `tenant`) is delivered to
    /// for `hook`: switched-on ones whose scope covers it, platform first.
    pub fn subscribed(&self, hook: Hook, tenant: Option<&str>, namespace: &str) -> Vec<Arc<Instance>> {
        let mut out: Vec<Arc<Instance>> = self
            .instances
            .read()
            .unwrap()
            .values()
            .filter(|i| i.spec.enabled && i.spec.hooks.contains(&hook) && i.spec.scope.covers(tenant, namespace))
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.spec.scope, &a.spec.id).cmp(&(&b.spec.scope, &b.spec.id)));
        out
    }

    fn call_ctx(&self, inst: &Instance, image: Option<ImageAccess>) -> CallCtx {
        let m = &inst.module.manifest;
        CallCtx {
            label: inst.spec.id.clone(),
            caps: m.capabilities.clone(),
            allow_hosts: inst.spec.allow_hosts.clone(),
            config: inst.spec.config.clone(),
            image,
            kv: self.kv.clone().map(|kv| (kv, inst.spec.id.clone())),
            http: self.http.clone(),
            log_lines_left: m.limits.log_lines,
            logs_dropped: 0,
        }
    }

    /// Ask every gate covering the push, in order; the first denial wins. A gate
    /// that fails lets the push in or refuses it as its module's `fail_open` says.
    pub async fn gate(&self, push: &Push, image: Option<&Image>) -> Decision {
        let namespace = push.repository.split('/').next().unwrap_or_default();
        let mut findings = vec![];
        for inst in self.subscribed(Hook::Gate, Some(&push.tenant), namespace) {
            let fail_open = inst.module.manifest.limits.fail_open;
            match self.gate_one(&inst, push, image).await {
                Ok(wit::Verdict::Allow) => {}
                Ok(wit::Verdict::Deny(reason)) => return Decision::Deny { plugin: inst.spec.id.clone(), reason: clip(&reason, 1024) },
                Ok(wit::Verdict::Annotate(list)) => {
                    let total = list.len();
                    findings.extend(list.into_iter().take(MAX_FINDINGS).map(|f| Finding {
                        plugin: inst.spec.id.clone(),
                        rule: clip(&f.rule, 64),
                        severity: severity(f.severity),
                        message: clip(&f.message, 1024),
                    }));
                    if total > MAX_FINDINGS {
                        findings.push(Finding {
                            plugin: inst.spec.id.clone(),
                            rule: "truncated".into(),
                            severity: Severity::Info,
                            message: format!("{} more findings were not kept", total - MAX_FINDINGS),
                        });
                    }
                }
                Err(e) if fail_open => {
                    tracing::warn!(plugin = %inst.spec.id, error = %e, "gate failed; the push goes ahead (fail_open)");
                }
                Err(e) => return Decision::Deny { plugin: inst.spec.id.clone(), reason: format!("the gate could not decide ({e})") },
            }
        }
        Decision::Allow { findings }
    }

    async fn gate_one(&self, inst: &Instance, push: &Push, image: Option<&Image>) -> Result<wit::Verdict, CallError> {
        if inst.tally.lock().unwrap().health.tripped.is_some() {
            return Err(CallError::Tripped(inst.module.manifest.limits.max_failures));
        }
        let access = image.map(|i| ImageAccess {
            manifest: i.manifest.clone(),
            refs: i.refs.clone(),
            reader: i.reader.clone(),
            budget_left: inst.module.manifest.capabilities.image_budget_bytes,
        });
        let arg = wit::ManifestPush {
            tenant: push.tenant.clone(),
            repository: push.repository.clone(),
            tag: push.tag.clone(),
            digest: push.digest.clone(),
            media_type: push.media_type.clone(),
            size: push.size,
            content_size: push.content_size,
            platforms: push
                .platforms
                .iter()
                .map(|p| wit::Platform { os: p.os.clone(), architecture: p.architecture.clone(), variant: p.variant.clone() })
                .collect(),
            subject: push.subject.clone(),
            artifact_type: push.artifact_type.clone(),
            pusher: push.pusher.clone(),
        };
        let ctx = self.call_ctx(inst, access);
        self.call(inst, ctx, |plugin, store| Box::pin(async move { plugin.call_gate(store, &arg).await }))
            .await
            .and_then(|r| r.map_err(plugin_error))
    }

    /// Deliver one event to one instance. `Err(CallError::Unavailable)` (and
    /// timeouts and traps) ask to be tried again later.
    pub async fn notify(&self, inst: &Instance, event: &Event) -> Result<(), CallError> {
        if inst.tally.lock().unwrap().health.tripped.is_some() {
            return Err(CallError::Tripped(inst.module.manifest.limits.max_failures));
        }
        let arg = event.to_wit();
        let ctx = self.call_ctx(inst, None);
        self.call(inst, ctx, |plugin, store| Box::pin(async move { plugin.call_notify(store, &arg).await }))
            .await
            .and_then(|r| r.map_err(plugin_error))
    }

    /// Instantiate `inst`'s module in a fresh store and run `f` on it, within the
    /// module's limits; record the outcome in the instance's health.
    async fn call<R: Send>(
        &self,
        inst: &Instance,
        ctx: CallCtx,
        f: impl for<'a> FnOnce(
                &'a sandbox::Plugin,
                &'a mut wasmtime::Store<sandbox::State>,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = wasmtime::Result<R>> + Send + 'a>>
            + Send,
    ) -> Result<R, CallError> {
        let limits = inst.module.manifest.limits.clone();
        let timeout = Duration::from_millis(limits.timeout_ms);
        let started = Instant::now();
        let run = async {
            let mut store = sandbox::store(&self.engine, ctx, limits.memory_mib, limits.fuel, timeout).map_err(sandbox::classify)?;
            let plugin = inst.module.pre.instantiate_async(&mut store).await.map_err(|e| CallError::Instantiate(format!("{e:#}")))?;
            let r = f(&plugin, &mut store).await.map_err(sandbox::classify);
            Ok::<_, CallError>((r, store.data().call.logs_dropped))
        };
        let (result, dropped) = match tokio::time::timeout(timeout, run).await {
            Ok(Ok((r, dropped))) => (r, dropped),
            Ok(Err(e)) => (Err(e), 0),
            Err(_) => (Err(CallError::Timeout), 0),
        };
        inst.record(started.elapsed(), result.as_ref().map(|_| ()), dropped);
        result
    }
}

const MAX_FINDINGS: usize = 100;

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

fn severity(s: wit::Severity) -> Severity {
    match s {
        wit::Severity::Info => Severity::Info,
        wit::Severity::Low => Severity::Low,
        wit::Severity::Medium => Severity::Medium,
        wit::Severity::High => Severity::High,
        wit::Severity::Critical => Severity::Critical,
    }
}

fn plugin_error(e: wit::PluginError) -> CallError {
    match e {
        wit::PluginError::InvalidConfig(m) => CallError::InvalidConfig(clip(&m, 1024)),
        wit::PluginError::Unavailable(m) => CallError::Unavailable(clip(&m, 1024)),
        wit::PluginError::Failed(m) => CallError::Failed(clip(&m, 1024)),
    }
}

/// Refuse a component built for another contract version, naming both.
fn check_contract(engine: &Engine, component: &Component, name: &str) -> Result<(), String> {
    let ty = component.component_type();
    for (import, _) in ty.imports(engine) {
        if let Some(e) = contract_mismatch(name, import) {
            return Err(e);
        }
    }
    Ok(())
}

/// The refusal for an import of another version of the contract, if it is one.
fn contract_mismatch(name: &str, import: &str) -> Option<String> {
    let rest = import.strip_prefix(manifest::CONTRACT_PACKAGE)?.strip_prefix('/')?;
    let version = rest.split_once('@').map_or("(unversioned)", |(_, v)| v);
    (version != manifest::CONTRACT_VERSION).then(|| {
        format!(
            "{name} was built for {}@{version}; this Berth speaks {}@{}",
            manifest::CONTRACT_PACKAGE,
            manifest::CONTRACT_PACKAGE,
            manifest::CONTRACT_VERSION
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn other_contract_versions_are_named() {
        assert_eq!(super::contract_mismatch("p", "berth:plugin/host@0.1.0"), None);
        assert_eq!(super::contract_mismatch("p", "wasi:cli/environment@0.2.6"), None);
        assert_eq!(
            super::contract_mismatch("p", "berth:plugin/host@0.2.0").as_deref(),
            Some("p was built for berth:plugin@0.2.0; this Berth speaks berth:plugin@0.1.0")
        );
        assert!(super::contract_mismatch("p", "berth:plugin/types").unwrap().contains("(unversioned)"));
    }
}

/// Something that happened, to be delivered to the instances subscribed.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Event {
    /// Unique and stable across redeliveries.
    pub id: String,
    pub at_ms: i64,
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum EventKind {
    ManifestPushed {
        tenant: String,
        repository: String,
        tag: Option<String>,
        digest: String,
        media_type: String,
        size: u64,
        content_size: u64,
        #[serde(default)]
        platforms: Vec<Platform>,
        subject: Option<String>,
        artifact_type: Option<String>,
        pusher: String,
    },
    ManifestPulled {
        tenant: String,
        repository: String,
        reference: String,
        digest: String,
        puller: String,
    },
    ManifestDeleted {
        tenant: String,
        repository: String,
        digest: String,
        tags: Vec<String>,
        by: String,
    },
    TagDeleted {
        tenant: String,
        repository: String,
        tag: String,
        digest: String,
        by: String,
    },
    BlobUploaded {
        tenant: String,
        repository: String,
        digest: String,
        size: u64,
        by: String,
    },
    RepositoryCreated {
        tenant: String,
        repository: String,
        by: String,
    },
    RepositoryDeleted {
        tenant: String,
        repository: String,
        by: String,
    },
}

impl EventKind {
    pub fn hook(&self) -> Hook {
        match self {
            EventKind::ManifestPushed { .. } => Hook::ManifestPushed,
            EventKind::ManifestPulled { .. } => Hook::ManifestPulled,
            EventKind::ManifestDeleted { .. } => Hook::ManifestDeleted,
            EventKind::TagDeleted { .. } => Hook::TagDeleted,
            EventKind::BlobUploaded { .. } => Hook::BlobUploaded,
            EventKind::RepositoryCreated { .. } => Hook::RepositoryCreated,
            EventKind::RepositoryDeleted { .. } => Hook::RepositoryDeleted,
        }
    }

    /// The tenant and repository it concerns.
    pub fn place(&self) -> (&str, &str) {
        match self {
            EventKind::ManifestPushed { tenant, repository, .. }
            | EventKind::ManifestPulled { tenant, repository, .. }
            | EventKind::ManifestDeleted { tenant, repository, .. }
            | EventKind::TagDeleted { tenant, repository, .. }
            | EventKind::BlobUploaded { tenant, repository, .. }
            | EventKind::RepositoryCreated { tenant, repository, .. }
            | EventKind::RepositoryDeleted { tenant, repository, .. } => (tenant, repository),
        }
    }
}

impl Event {
    /// A new event, happening now, with a fresh id: the time in ms (13 digits,
    /// so ids sort by time) and 64 random bits.
    pub fn new(kind: EventKind) -> Event {
        let at_ms = now_ms();
        let random = uuid::Uuid::new_v4().as_u64_pair().0;
        Event { id: format!("{at_ms:013}-{random:016x}"), at_ms, kind }
    }

    fn to_wit(&self) -> wit::Event {
        use wit::EventKind as W;
        let s = |v: &String| v.clone();
        let kind = match &self.kind {
            EventKind::ManifestPushed {
                tenant,
                repository,
                tag,
                digest,
                media_type,
                size,
                content_size,
                platforms,
                subject,
                artifact_type,
                pusher,
            } => W::ManifestPushed(wit::ManifestPush {
                tenant: s(tenant),
                repository: s(repository),
                tag: tag.clone(),
                digest: s(digest),
                media_type: s(media_type),
                size: *size,
                content_size: *content_size,
                platforms: platforms
                    .iter()
                    .map(|p| wit::Platform { os: p.os.clone(), architecture: p.architecture.clone(), variant: p.variant.clone() })
                    .collect(),
                subject: subject.clone(),
                artifact_type: artifact_type.clone(),
                pusher: s(pusher),
            }),
            EventKind::ManifestPulled { tenant, repository, reference, digest, puller } => W::ManifestPulled(wit::ManifestPull {
                tenant: s(tenant),
                repository: s(repository),
                reference: s(reference),
                digest: s(digest),
                puller: s(puller),
            }),
            EventKind::ManifestDeleted { tenant, repository, digest, tags, by } => W::ManifestDeleted(wit::ManifestDelete {
                tenant: s(tenant),
                repository: s(repository),
                digest: s(digest),
                tags: tags.clone(),
                by: s(by),
            }),
            EventKind::TagDeleted { tenant, repository, tag, digest, by } => {
                W::TagDeleted(wit::TagDelete { tenant: s(tenant), repository: s(repository), tag: s(tag), digest: s(digest), by: s(by) })
            }
            EventKind::BlobUploaded { tenant, repository, digest, size, by } => {
                W::BlobUploaded(wit::BlobUpload { tenant: s(tenant), repository: s(repository), digest: s(digest), size: *size, by: s(by) })
            }
            EventKind::RepositoryCreated { tenant, repository, by } => {
                W::RepositoryCreated(wit::RepositoryChange { tenant: s(tenant), repository: s(repository), by: s(by) })
            }
            EventKind::RepositoryDeleted { tenant, repository, by } => {
                W::RepositoryDeleted(wit::RepositoryChange { tenant: s(tenant), repository: s(repository), by: s(by) })
            }
        };
        wit::Event { id: self.id.clone(), at_ms: self.at_ms, kind }
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
