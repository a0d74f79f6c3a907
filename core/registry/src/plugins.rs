//! The registry's side of plugins: the installed modules (a folder per module
//! under the plugins directory), the instances (rows in metadata, so every
//! replica runs the same ones), the gate run before a manifest commits, and the
//! host services a plugin's sandbox reads through (blob bytes, key-value store).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_metadata::{FindingRow, Metadata, OutboxRow, PluginInstanceRow};
use berth_oci::manifest::{ManifestKind, ParsedManifest};
use berth_oci::range::ByteRange;
use berth_oci::{Digest, ErrorCode, RegistryError, RepoName, Tag};
use berth_plugins::{
    BlobReader, Decision, EventKind, Hook, Image, InstanceSpec, KvStore, Module, Platform, PluginHost, PluginManifest, Push, Scope,
};
use berth_storage::BlobStore;
use futures::StreamExt;

use crate::delivery::Deliveries;
use crate::{internal, now_ms, Registry};

/// Largest component `install` accepts.
pub const MAX_COMPONENT_BYTES: usize = 32 << 20;

/// Installed modules and configured instances.
pub struct Plugins {
    host: Arc<PluginHost>,
    deliveries: Arc<Deliveries>,
    dir: PathBuf,
    meta: Metadata,
    /// Module folders that did not load, and why.
    refused: Mutex<BTreeMap<String, String>>,
    /// Instances in metadata that are not running, and why (their module is
    /// missing or refused, or no longer accepts their configuration).
    stalled: Mutex<BTreeMap<String, (PluginInstanceRow, String)>>,
}

struct Kv(Metadata);

#[async_trait::async_trait]
impl KvStore for Kv {
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.0.plugin_kv_get(scope, key).await.map_err(|e| e.to_string())
    }

    async fn set(&self, scope: &str, key: &str, value: &[u8]) -> Result<(), String> {
        self.0.plugin_kv_set(scope, key, value).await.map_err(|e| e.to_string())
    }
}

struct Blobs(BlobStore);

#[async_trait::async_trait]
impl BlobReader for Blobs {
    async fn read(&self, digest: &str, offset: u64, max: u64) -> Result<Vec<u8>, String> {
        let d: Digest = digest.parse().map_err(|e: RegistryError| e.detail_or_message())?;
        let size = self.0.stat_blob(&d).await.map_err(|e| e.to_string())?.ok_or("not stored")?;
        if offset >= size || max == 0 {
            return Ok(vec![]);
        }
        let end = size.min(offset.saturating_add(max)) - 1;
        let mut stream = self.0.read_blob(&d, size, Some(ByteRange { start: offset, end })).await.map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity((end - offset + 1) as usize);
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }
}

/// `platform`, `tenant:<name>`, `namespace:<name>`.
pub fn parse_scope(s: &str) -> Result<Scope, String> {
    match s.split_once(':') {
        None if s == "platform" => Ok(Scope::Platform),
        Some(("tenant", t)) if t.parse::<berth_oci::AccountName>().is_ok() => Ok(Scope::Tenant(t.into())),
        Some(("namespace", n)) if n.parse::<berth_oci::AccountName>().is_ok() => Ok(Scope::Namespace(n.into())),
        _ => Err(format!("scope {s:?}: platform, tenant:<name> or namespace:<name>")),
    }
}

fn spec_of(row: &PluginInstanceRow) -> Result<InstanceSpec, String> {
    Ok(InstanceSpec {
        id: row.id.clone(),
        module: row.module.clone(),
        scope: parse_scope(&row.scope)?,
        hooks: row.hooks.iter().map(|h| h.parse()).collect::<Result<BTreeSet<Hook>, String>>()?,
        config: row.config.clone(),
        allow_hosts: row.allow_hosts.clone(),
        enabled: row.enabled,
    })
}

fn row_of(spec: &InstanceSpec, by: &str) -> PluginInstanceRow {
    PluginInstanceRow {
        id: spec.id.clone(),
        module: spec.module.clone(),
        scope: spec.scope.to_string(),
        hooks: spec.hooks.iter().map(|h| h.name().to_owned()).collect(),
        config: spec.config.clone(),
        allow_hosts: spec.allow_hosts.clone(),
        enabled: spec.enabled,
        updated_ms: now_ms(),
        by: by.to_owned(),
    }
}

impl Plugins {
    /// Load the modules in `dir` (compiled copies cached in `cache_dir`) and the
    /// instances stored in metadata.
    pub async fn open(dir: &Path, cache_dir: &Path, meta: Metadata) -> Result<Plugins, String> {
        let host = Arc::new(PluginHost::new(cache_dir, Some(Arc::new(Kv(meta.clone()))))?);
        let deliveries = Arc::new(Deliveries::new(host.clone(), meta.clone()));
        let p = Plugins {
            host,
            deliveries,
            dir: dir.to_owned(),
            meta,
            refused: Mutex::new(BTreeMap::new()),
            stalled: Mutex::new(BTreeMap::new()),
        };
        p.reload().await?;
        Ok(p)
    }

    pub fn host(&self) -> &PluginHost {
        &self.host
    }

    /// The instances' event queues.
    pub fn deliveries(&self) -> &Deliveries {
        &self.deliveries
    }

    pub(crate) fn deliveries_handle(&self) -> Arc<Deliveries> {
        self.deliveries.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Load every module folder again, then every stored instance; instances
    /// start afresh (health and breaker reset). Answers the folders refused.
    pub async fn reload(&self) -> Result<BTreeMap<String, String>, String> {
        let refused = self.host.load_all(&self.dir);
        *self.refused.lock().unwrap() = refused.clone();
        let rows = self.meta.plugin_instances().await.map_err(|e| format!("reading plugin instances: {e}"))?;
        let mut stalled = BTreeMap::new();
        for row in rows {
            if let Err(e) = spec_of(&row).and_then(|s| self.host.put_instance(s).map(|_| ())) {
                tracing::warn!(plugin = %row.id, error = %e, "plugin instance not started");
                self.host.remove_instance(&row.id);
                stalled.insert(row.id.clone(), (row, e));
            }
        }
        *self.stalled.lock().unwrap() = stalled;
        self.deliveries.sync();
        Ok(refused)
    }

    /// Install a module: check its manifest and pin, write it to its folder
    /// (replacing an older version) and load it.
    pub async fn install(&self, manifest_toml: &str, component: &[u8]) -> Result<Arc<Module>, String> {
        let m = PluginManifest::parse(manifest_toml)?;
        if component.len() > MAX_COMPONENT_BYTES {
            return Err(format!("the component is {} bytes; at most {MAX_COMPONENT_BYTES}", component.len()));
        }
        let folder = self.dir.join(&m.name);
        let staging = self.dir.join(format!(".{}.installing", m.name));
        let write = || -> std::io::Result<()> {
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging)?;
            std::fs::write(staging.join(&m.file), component)?;
            std::fs::write(staging.join("plugin.toml"), manifest_toml)?;
            Ok(())
        };
        write().map_err(|e| format!("writing {}: {e}", staging.display()))?;
        // Checked and compiled from the staging folder first: a module that
        // does not load replaces nothing.
        let mut module = match self.host.prepare(&staging) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let old = self.dir.join(format!(".{}.old", m.name));
        let _ = std::fs::remove_dir_all(&old);
        if folder.exists() {
            std::fs::rename(&folder, &old).map_err(|e| format!("replacing {}: {e}", folder.display()))?;
        }
        std::fs::rename(&staging, &folder).map_err(|e| format!("installing {}: {e}", folder.display()))?;
        let _ = std::fs::remove_dir_all(&old);
        module.dir = folder;
        let module = self.host.register(module);
        self.refused.lock().unwrap().remove(&m.name);
        // Instances that were waiting for this module start now.
        let waiting: Vec<PluginInstanceRow> =
            self.stalled.lock().unwrap().values().filter(|(r, _)| r.module == m.name).map(|(r, _)| r.clone()).collect();
        for row in waiting {
            if spec_of(&row).and_then(|s| self.host.put_instance(s).map(|_| ())).is_ok() {
                self.stalled.lock().unwrap().remove(&row.id);
            }
        }
        self.deliveries.sync();
        Ok(module)
    }

    /// Set an instance (checked against its module), stored then started.
    pub async fn set_instance(&self, spec: InstanceSpec, by: &str) -> Result<(), RegistryError> {
        self.host.check(&spec).map_err(|e| RegistryError::new(ErrorCode::InvalidRequest).with_status(400).with_detail(e))?;
        self.meta.put_plugin_instance(&row_of(&spec, by)).await.map_err(|e| internal("store plugin instance", e))?;
        self.stalled.lock().unwrap().remove(&spec.id);
        self.host.put_instance(spec).map_err(|e| RegistryError::new(ErrorCode::InvalidRequest).with_status(400).with_detail(e))?;
        self.deliveries.sync();
        Ok(())
    }

    /// Remove an instance (and its key-value store). `false`: there was none.
    pub async fn delete_instance(&self, id: &str) -> Result<bool, RegistryError> {
        let known = self.host.instance(id).is_some() || self.stalled.lock().unwrap().contains_key(id);
        if !known {
            return Ok(false);
        }
        // Its worker stops first, so no delivery writes meet the delete.
        let running = self.host.instance(id).map(|i| i.spec.clone());
        self.host.remove_instance(id);
        self.deliveries.sync();
        if let Err(e) = self.meta.delete_plugin_instance(id).await {
            if let Some(spec) = running {
                let _ = self.host.put_instance(spec);
                self.deliveries.sync();
            }
            return Err(internal("delete plugin instance", e));
        }
        self.stalled.lock().unwrap().remove(id);
        Ok(true)
    }

    /// A page of `id`'s delivery log, newest first, and its length.
    pub async fn deliveries_log(
        &self,
        id: &str,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<berth_metadata::DeliveryRow>, u64), RegistryError> {
        self.meta.plugin_deliveries(id, limit, offset).await.map_err(|e| internal("read plugin deliveries", e))
    }

    /// The stored instance `id`, running or not.
    pub fn instance_spec(&self, id: &str) -> Option<InstanceSpec> {
        if let Some(i) = self.host.instance(id) {
            return Some(i.spec.clone());
        }
        self.stalled.lock().unwrap().get(id).and_then(|(r, _)| spec_of(r).ok())
    }

    /// Instances that are stored but not running, and why.
    pub fn stalled(&self) -> Vec<(InstanceSpec, String)> {
        self.stalled.lock().unwrap().values().filter_map(|(r, why)| Some((spec_of(r).ok()?, why.clone()))).collect()
    }

    pub fn refused(&self) -> BTreeMap<String, String> {
        self.refused.lock().unwrap().clone()
    }
}

/// How a change announces itself: who made it, whose it is, and the queues
/// its events go to. Made per request ([`Registry::announcer`]) and carried
/// to where the change's transaction is built.
#[derive(Clone)]
pub struct Announce {
    deliveries: Arc<Deliveries>,
    tenant: Option<String>,
    pub by: String,
}

impl Announce {
    /// The owning tenant, as events name it (`""`: none).
    pub fn tenant(&self) -> String {
        self.tenant.clone().unwrap_or_default()
    }

    /// The outbox rows for `kind` (see [`Deliveries::rows`]).
    pub fn rows(&self, kind: EventKind, if_new_repo: bool) -> Vec<OutboxRow> {
        self.deliveries.rows(kind, self.tenant.as_deref(), if_new_repo)
    }

    /// The event a transaction announces if it creates the repository.
    pub fn repository_created(&self, repo: &RepoName) -> EventKind {
        EventKind::RepositoryCreated { tenant: self.tenant(), repository: repo.to_string(), by: self.by.clone() }
    }

    pub fn committed(&self, rows: &[OutboxRow], ok: bool) {
        self.deliveries.committed(rows, ok);
    }
}

/// Tell the queues of `rows` whether the transaction that carried them
/// (`res`) committed, and pass `res` on.
pub(crate) fn reported<T, E>(announce: Option<&Announce>, rows: &[OutboxRow], res: Result<T, E>) -> Result<T, E> {
    if let Some(a) = announce {
        a.committed(rows, res.is_ok());
    }
    res
}

pub(crate) fn platforms(parsed: &ParsedManifest) -> Vec<Platform> {
    if parsed.kind != ManifestKind::Index {
        return vec![];
    }
    let field = |p: &serde_json::Value, k: &str| p.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    parsed
        .references
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| Platform {
            os: field(p, "os").unwrap_or_default(),
            architecture: field(p, "architecture").unwrap_or_default(),
            variant: field(p, "variant"),
        })
        .collect()
}

impl Registry {
    /// The plugin host, when plugins are configured.
    pub fn plugins(&self) -> Option<&Plugins> {
        self.plugins.as_ref()
    }

    /// What a change to `repo` by `by` needs to announce itself; `None` when
    /// no instance takes events.
    pub(crate) async fn announcer(&self, repo: &RepoName, by: &str) -> Result<Option<Announce>, RegistryError> {
        let Some(p) = self.plugins.as_ref().filter(|p| p.deliveries.any_queue()) else { return Ok(None) };
        let tenant = self.quotas.owner(repo).await?.map(|t| t.to_string());
        Ok(Some(Announce { deliveries: p.deliveries.clone(), tenant, by: by.to_owned() }))
    }

    /// Ask the gates covering `repo` about a manifest push. A denial is a
    /// `DENIED` carrying the plugin's reason; findings go with the commit. Only
    /// a push that could commit is gated (every blob it references is linked).
    pub(crate) async fn gate(
        &self,
        repo: &RepoName,
        digest: &Digest,
        tag: Option<&Tag>,
        parsed: &ParsedManifest,
        bytes: &[u8],
        pusher: &str,
    ) -> Result<Vec<FindingRow>, RegistryError> {
        let Some(plugins) = &self.plugins else { return Ok(vec![]) };
        let tenant = self.quotas.owner(repo).await?.map(|t| t.to_string());
        if plugins.host.subscribed(Hook::Gate, tenant.as_deref(), repo.namespace()).is_empty() {
            return Ok(vec![]);
        }
        let state = self.state(repo).await?.unwrap_or_default();
        if parsed.required_blobs().any(|d| !state.read().unwrap().blobs.contains_key(d)) {
            return Ok(vec![]);
        }
        drop(state);
        let content_size = bytes.len() as u64 + parsed.config.iter().chain(&parsed.references).map(|d| d.size).sum::<u64>();
        let push = Push {
            tenant: tenant.unwrap_or_default(),
            repository: repo.to_string(),
            tag: tag.map(|t| t.to_string()),
            digest: digest.to_string(),
            media_type: parsed.media_type.clone(),
            size: bytes.len() as u64,
            content_size,
            platforms: platforms(parsed),
            subject: parsed.subject.as_ref().map(|s| s.digest.to_string()),
            artifact_type: parsed.artifact_type.clone(),
            pusher: pusher.to_owned(),
        };
        let image = Image {
            manifest: bytes.to_vec(),
            refs: parsed.required_blobs().map(|d| d.to_string()).collect(),
            reader: Arc::new(Blobs(self.store.clone())),
        };
        match plugins.host.gate(&push, Some(&image)).await {
            Decision::Allow { findings } => Ok(findings
                .into_iter()
                .map(|f| FindingRow {
                    plugin: f.plugin,
                    rule: f.rule,
                    severity: serde_json::to_value(f.severity).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
                    message: f.message,
                })
                .collect()),
            Decision::Deny { plugin, reason } => {
                tracing::info!(%repo, %digest, plugin, reason, "push denied by a plugin gate");
                Err(RegistryError::new(ErrorCode::Denied).with_detail(format!("refused by plugin {plugin}: {reason}")))
            }
        }
    }

    /// The findings kept with a manifest.
    pub async fn findings(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<FindingRow>, RegistryError> {
        self.meta.manifest_findings(repo, digest).await.map_err(|e| internal("read findings", e))
    }
}
