//! Registry services: what the OCI API does, independent of HTTP.
//!
//! [`Registry`] is the one entry point the HTTP crate calls. It owns the blob
//! store, the metadata store, the read [`index::Index`] and the actix actors that
//! own mutable state:
//! - [`uploads::UploadSessions`] — every upload session (one actor);
//! - [`repo::RepoActor`] — one per repository, serializing its manifest, tag and
//!   blob-link changes.
//!
//! Architecture invariants:
//! - Blob bytes stream from the request straight into storage while being hashed;
//!   they never pass through an actor mailbox. Actors receive only state.
//! - A blob is linked into a repository (and so becomes servable) only after its
//!   digest was verified and its bytes were published in storage.
//! - Reads (GET/HEAD) are answered from the index and storage and write nothing.
//! - With a metadata server that other replicas write too, every read of a
//!   repository first passes the read barrier of [`coherence`] (the index then
//!   holds the repository as the database did after the request arrived), and
//!   every change is conditional on the repository's version.
//! - This crate knows nothing of warp or HTTP; its errors are [`RegistryError`]s.

mod coherence;
pub mod counters;
pub mod delivery;
pub mod fsck;
pub mod gc;
pub mod index;
pub mod manage;
pub mod metrics;
pub mod plugins;
pub mod quota;
pub mod repo;
pub mod retention;
pub mod uploads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr};
use actix_rt::ArbiterHandle;
use berth_metadata::{ManifestRow, Metadata};
use berth_oci::manifest::Descriptor;
use berth_oci::range::{parse_range, ByteRange};
use berth_oci::{Digest, DigestAlgorithm, Digester, ErrorCode, ParsedManifest, Reference, RegistryError, RepoName, Tag, UploadId};
pub use berth_storage::ByteStream;
use berth_storage::{BlobStore, StorageError, Unpublished};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;

use crate::index::Index;
use crate::repo::RepoActor;
use crate::uploads::{Session, UploadSessions};

/// Service-level settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Upload sessions idle this long are expired and their staging removed.
    pub upload_ttl_secs: u64,
    /// How often expired sessions are swept.
    pub upload_sweep_secs: u64,
    /// Largest blob accepted, in bytes.
    pub max_blob_bytes: u64,
    /// Upload sessions one user may have open at once (a further one is a
    /// `429 TOOMANYREQUESTS`).
    pub max_uploads_per_user: usize,
    /// Memory budget for cached manifest bytes.
    pub manifest_cache_bytes: usize,
    /// Memory budget for the repositories' states held in memory (tags,
    /// manifest rows, blob links; see `index.rs`): beyond it, the least
    /// recently used are dropped and loaded again from metadata when asked for.
    pub index_cache_bytes: usize,
    /// Pull counters are written in batches this often (a crash loses at most one
    /// interval of pulls).
    pub counter_flush_secs: u64,
    /// Count pulls at all (`false`: pull counts and last-pulled times stay as
    /// they are; push counts are kept regardless).
    pub count_pulls: bool,
    /// The region this registry serves, as the consoles name it.
    pub region: String,
    /// The pull-through mirror a docker daemon would list in `registry-mirrors`
    /// (`https://mirror.example.com`), when the operator runs one.
    pub mirror_url: Option<String>,
    /// The platform-managed namespace of official images (readable as the
    /// policy allows: by default by everyone, anonymous callers included).
    pub official_namespace: String,
    /// Default per-tenant limits (`[registry.quota]`; unset: unlimited).
    pub quota: quota::QuotaConfig,
    /// Online garbage collection (`[registry.gc]`).
    pub gc: gc::GcConfig,
    /// Retention policies' schedule (`[registry.retention]`).
    pub retention: retention::RetentionConfig,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            upload_ttl_secs: 24 * 3600,
            upload_sweep_secs: 600,
            max_blob_bytes: 64 * 1024 * 1024 * 1024,
            max_uploads_per_user: 1000,
            manifest_cache_bytes: 16 * 1024 * 1024,
            index_cache_bytes: 32 * 1024 * 1024,
            counter_flush_secs: 5,
            count_pulls: true,
            region: "local".into(),
            mirror_url: None,
            official_namespace: "library".into(),
            quota: quota::QuotaConfig::default(),
            gc: gc::GcConfig::default(),
            retention: retention::RetentionConfig::default(),
        }
    }
}

/// The actor count below which no pruning happens (half of it).
const MIN_ACTORS_PRUNED: usize = 512;

/// Log an internal failure and turn it into an opaque 500.
pub(crate) fn internal<E: std::fmt::Display + 'static>(what: &str, e: E) -> RegistryError {
    metrics::failure::<E>();
    tracing::error!(error = %e, "{what} failed");
    // A metadata server out of reach is a condition to retry, not a fault.
    let any: &dyn std::any::Any = &e;
    match any.downcast_ref::<berth_metadata::MetadataError>() {
        Some(e) if e.is_unreachable() => {
            return RegistryError::new(ErrorCode::Unavailable)
                .with_detail(format!("{what} failed: the metadata server is out of reach; try again"));
        }
        Some(e @ (berth_metadata::MetadataError::Deleting | berth_metadata::MetadataError::TooLarge)) => {
            return RegistryError::new(ErrorCode::Unavailable).with_detail(format!("{what} failed: {e}"));
        }
        _ => {}
    }
    if matches!(any.downcast_ref::<StorageError>(), Some(e) if e.is_unavailable()) {
        return RegistryError::new(ErrorCode::Unavailable).with_detail(format!("{what} failed: the blob store did not answer; try again"));
    }
    if matches!(any.downcast_ref::<StorageError>(), Some(e) if e.is_out_of_space()) {
        return RegistryError::new(ErrorCode::Unavailable)
            .with_status(507)
            .with_detail(format!("{what} failed: the registry's storage is full; try again once space is freed"));
    }
    RegistryError::internal().with_detail(format!("{what} failed"))
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn storage_err(what: &str, e: StorageError) -> RegistryError {
    match e {
        StorageError::Client(m) => RegistryError::new(ErrorCode::BlobUploadInvalid).with_detail(format!("request body failed: {m}")),
        StorageError::TooLarge => RegistryError::new(ErrorCode::SizeInvalid).with_status(413).with_detail("blob exceeds the size limit"),
        other => internal(what, other),
    }
}

/// A blob ready to be streamed.
pub struct BlobBody {
    pub size: u64,
    /// The range served, when a single satisfiable range was asked for.
    pub range: Option<ByteRange>,
    pub stream: Option<ByteStream>,
}

/// A manifest ready to be served.
pub struct ManifestBody {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// The outcome of a manifest PUT.
pub struct PutManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// The registry service.
pub struct Registry {
    store: BlobStore,
    meta: Metadata,
    index: Arc<Index>,
    coherence: Arc<coherence::Coherence>,
    config: RegistryConfig,
    arbiter: ArbiterHandle,
    system: actix_rt::System,
    uploads: Addr<UploadSessions>,
    repos: Mutex<HashMap<RepoName, Arc<Addr<RepoActor>>>>,
    /// Half the actor count at which names without a repository are pruned next.
    actors_pruned_at: std::sync::atomic::AtomicUsize,
    pulls: Arc<counters::PullTally>,
    quotas: Arc<quota::Quotas>,
    /// One collection pass at a time.
    gc_lock: tokio::sync::Mutex<()>,
    gc_status: Mutex<gc::GcStatus>,
    metrics: metrics::Metrics,
    plugins: Option<plugins::Plugins>,
    /// Set on SIGTERM: readiness goes false while requests are still served.
    draining: std::sync::atomic::AtomicBool,
    /// This process, as the holder of database leases on background jobs.
    holder: String,
}

impl Registry {
    /// Load the index from metadata and start the actors on their own thread.
    pub async fn open(
        store: BlobStore,
        meta: Metadata,
        config: RegistryConfig,
        plugins: Option<plugins::Plugins>,
    ) -> Result<Arc<Registry>, String> {
        // The names and the set's version, read together; states are loaded when used.
        let (heads, catalog) = meta.all_repo_heads().await.map_err(|e| format!("loading metadata: {e}"))?;
        let names = heads.into_iter().map(|h| h.name);
        let index = Arc::new(Index::new(names, config.index_cache_bytes, config.manifest_cache_bytes));
        let coherence = Arc::new(coherence::Coherence::new(meta.clone(), index.clone(), catalog));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("berth-actors".into())
            .spawn(move || {
                let sys = actix_rt::System::new();
                let _ = tx.send((actix_rt::System::current(), actix_rt::Arbiter::current()));
                sys.run()
            })
            .map_err(|e| format!("starting actor thread: {e}"))?;
        let (system, arbiter) = rx.recv().map_err(|e| format!("actor thread: {e}"))?;
        let (m, s) = (meta.clone(), store.clone());
        let ttl = Duration::from_secs(config.upload_ttl_secs);
        let sweep = Duration::from_secs(config.upload_sweep_secs.max(1));
        let quotas = Arc::new(quota::Quotas::new(meta.clone(), index.clone(), config.quota, arbiter.clone(), ttl));
        let q = quotas.clone();
        let uploads = UploadSessions::start_in_arbiter(&arbiter, move |_| UploadSessions::new(m, s, q, ttl, sweep));
        let pulls = Arc::new(counters::PullTally::new(plugins.as_ref().map(|p| p.deliveries_handle())));
        let counter = counters::CounterActor {
            tally: pulls.clone(),
            meta: meta.clone(),
            every: Duration::from_secs(config.counter_flush_secs.max(1)),
            busy: false,
            runtime: tokio::runtime::Handle::current(),
        };
        counters::CounterActor::start_in_arbiter(&arbiter, move |_| counter);
        let registry = Arc::new(Registry {
            store,
            meta,
            index,
            coherence,
            config,
            arbiter,
            system,
            uploads,
            repos: Mutex::new(HashMap::new()),
            actors_pruned_at: std::sync::atomic::AtomicUsize::new(MIN_ACTORS_PRUNED),
            pulls,
            quotas,
            gc_lock: tokio::sync::Mutex::new(()),
            gc_status: Mutex::new(gc::GcStatus::default()),
            metrics: metrics::Metrics::default(),
            plugins,
            draining: std::sync::atomic::AtomicBool::new(false),
            holder: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
        });
        if registry.config.gc.enabled {
            Periodic::start(&registry, "gc", registry.config.gc.interval_secs, |r| {
                Box::pin(async move {
                    if let Err(e) = r.collect(false).await {
                        tracing::warn!(error = %e.detail_or_message(), "garbage collection pass failed");
                    }
                })
            });
        }
        // Repository deletes that stopped part-way (a crash, a failed sweep):
        // their markers untouched for a minute are finished here.
        Periodic::start(&registry, "sweep", SWEEP_EVERY_SECS, |r| {
            Box::pin(async move {
                if let Err(e) = r.meta.sweep_hidden(SWEEP_EVERY_SECS as i64 * 1000).await {
                    tracing::warn!(error = %e, "finishing deleted repositories failed");
                }
            })
        });
        if registry.config.retention.enabled {
            Periodic::start(&registry, "retention", registry.config.retention.interval_secs, |r| {
                Box::pin(async move { r.run_all_retention().await })
            });
        }
        Ok(registry)
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Where requests and background passes are counted.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// The metrics exposition (OpenMetrics text), gauges read now.
    pub async fn metrics_text(&self) -> String {
        if let Some(p) = &self.plugins {
            let figures: Vec<metrics::PluginFigures> = p
                .host()
                .instances()
                .iter()
                .map(|i| {
                    let h = i.health();
                    metrics::PluginFigures {
                        instance: i.spec.id.clone(),
                        calls: h.calls,
                        failures: h.failures,
                        timeouts: h.timeouts,
                        p99_seconds: h.p99_ms / 1000.0,
                        tripped: h.tripped.is_some(),
                        queue: p.deliveries().stats(&i.spec.id),
                    }
                })
                .collect();
            self.metrics.plugin_figures(&figures);
        }
        let uploads = Self::ask(&self.uploads, uploads::Open).await.unwrap_or(0);
        let scan = async {
            match self.meta.storage_by_tenant().await {
                Ok(t) => Some(t.into_iter().map(|(t, b)| (t.to_string(), b)).collect()),
                Err(e) => {
                    tracing::warn!(error = %e, "reading per-tenant storage for metrics failed");
                    None
                }
            }
        };
        let tenant_storage = self.metrics.tenant_storage(scan).await;
        self.metrics.render(metrics::Readings {
            repositories: self.index.repo_count(),
            repo_actors: self.repo_actor_count(),
            states_held: self.index.held_figures(),
            uploads,
            tenant_storage,
            metadata_reach: self.meta.reach(),
        })
    }

    /// The per-tenant quotas.
    pub fn quotas(&self) -> &quota::Quotas {
        &self.quotas
    }

    /// Write the pulls counted since the last batch (at graceful shutdown).
    pub async fn flush_counters(&self) {
        self.pulls.flush(&self.meta).await;
    }

    /// Stop the actors (after the HTTP server has drained).
    pub fn shutdown(&self) {
        self.system.stop();
    }

    /// Stop being ready (a load balancer takes this replica out) while still
    /// serving what comes.
    pub fn drain(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether this replica should be sent requests: not draining, and the
    /// metadata store and the blob store each answer within 2 s. `Err`: why not.
    pub async fn readiness(&self) -> Result<(), &'static str> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Err("draining");
        }
        let limit = Duration::from_secs(2);
        match tokio::time::timeout(limit, self.meta.ping()).await {
            Ok(Ok(())) => {}
            _ => return Err("metadata unreachable"),
        }
        match tokio::time::timeout(limit, self.store.probe()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err("storage unreachable"),
        }
    }

    /// The actor of a repository, started on first use. Callers hold the handle
    /// while they use it; an actor nobody holds has nothing in flight and holds
    /// no state of its own (the index does), so idle actors are retired in
    /// passes as their number doubles: the actors alive follow the repositories
    /// in use, not those stored (nor names that were only tried). Every change
    /// is conditional on the repository's version besides, so even two actors of
    /// one name could not lose an update.
    fn repo_actor(&self, name: &RepoName) -> Arc<Addr<RepoActor>> {
        let mut repos = self.repos.lock().unwrap();
        if let Some(addr) = repos.get(name) {
            return addr.clone();
        }
        if repos.len() >= self.actors_pruned_at.load(std::sync::atomic::Ordering::Relaxed) * 2 {
            repos.retain(|_, addr| Arc::strong_count(addr) > 1);
            self.actors_pruned_at.store(repos.len().max(MIN_ACTORS_PRUNED), std::sync::atomic::Ordering::Relaxed);
        }
        let actor = RepoActor::new(name.clone(), self.meta.clone(), self.index.clone(), self.coherence.clone());
        let addr = Arc::new(RepoActor::start_in_arbiter(&self.arbiter, move |_| actor));
        repos.insert(name.clone(), addr.clone());
        addr
    }

    /// Repository actors alive (those in use, and idle ones not yet retired).
    pub fn repo_actor_count(&self) -> usize {
        self.repos.lock().unwrap().len()
    }

    async fn ask<A, M>(addr: &Addr<A>, msg: M) -> Result<M::Result, RegistryError>
    where
        A: Actor + actix::Handler<M>,
        A::Context: actix::dev::ToEnvelope<A, M>,
        M: actix::Message + Send + 'static,
        M::Result: Send,
    {
        let _waiting = metrics::Waiting::on::<A>();
        addr.send(msg).await.map_err(|e| internal("actor mailbox", e))
    }

    /// Wait until the index holds `repos` as the metadata store did after this
    /// call (at once unless other replicas share the store: see [`coherence`]).
    /// Every read of a repository's tags, manifests or blob links comes after it.
    pub async fn fresh(&self, repos: &[&RepoName]) -> Result<(), RegistryError> {
        self.coherence.fresh(repos, false).await
    }

    /// The states of `repos` (`None` for one that does not exist), as current
    /// as [`Registry::fresh`] makes them, loaded from metadata when not held.
    /// A handle keeps its state held while it lives.
    pub(crate) async fn states(&self, repos: &[&RepoName]) -> Result<Vec<Option<index::Handle>>, RegistryError> {
        self.fresh(repos).await?;
        self.states_now(repos).await
    }

    /// [`Registry::states`] after the caller made them fresh.
    async fn states_now(&self, repos: &[&RepoName]) -> Result<Vec<Option<index::Handle>>, RegistryError> {
        let mut out = Vec::with_capacity(repos.len());
        for name in repos {
            out.push(match self.index.held(name) {
                Some(state) => Some(state),
                None if !self.index.exists(name) => None,
                None => Self::ask(&self.repo_actor(name), repo::Load).await??,
            });
        }
        Ok(out)
    }

    /// A repository's state for a pass over many repositories (the collector,
    /// retention, fsck): the one held if it is, else read from metadata without
    /// being held, so a pass over every repository does not push the ones in
    /// use out of the index. For reading only.
    pub(crate) async fn peek(&self, repo: &RepoName) -> Result<Option<index::Handle>, RegistryError> {
        self.fresh(&[repo]).await?;
        if let Some(state) = self.index.held(repo) {
            return Ok(Some(state));
        }
        if !self.index.exists(repo) {
            return Ok(None);
        }
        let s = self.meta.repo_snapshot(repo).await.map_err(|e| internal("read repository", e))?;
        Ok(index::RepoState::from_snapshot(s).map(|s| Arc::new(std::sync::RwLock::new(s))))
    }

    /// [`Registry::states`] of one repository.
    pub(crate) async fn state(&self, repo: &RepoName) -> Result<Option<index::Handle>, RegistryError> {
        Ok(self.states(&[repo]).await?.pop().flatten())
    }

    /// [`Registry::fresh`] for the set of repositories (catalog, listings).
    pub async fn fresh_catalog(&self) -> Result<(), RegistryError> {
        self.coherence.fresh(&[], true).await
    }

    // ----- blobs -----

    /// Size of a blob readable through `repo` (its own blobs and its manifests).
    pub async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64, RegistryError> {
        let state = self.state(repo).await?.ok_or_else(|| name_unknown(repo))?;
        let s = state.read().unwrap();
        if let Some(size) = s.blobs.get(digest) {
            return Ok(*size);
        }
        if let Some(m) = s.manifests.get(digest) {
            return Ok(m.row.size);
        }
        Err(RegistryError::new(ErrorCode::BlobUnknown).with_detail(digest.to_string()))
    }

    /// Open a blob for reading, honouring a `Range` header.
    pub async fn get_blob(&self, repo: &RepoName, digest: &Digest, range: Option<&str>, body: bool) -> Result<BlobBody, RegistryError> {
        let size = self.stat_blob(repo, digest).await?;
        // A push that found the blob here is about to reference it: the collector waits.
        self.index.touch(repo, digest, now_ms());
        let range = match range {
            Some(h) => parse_range(h, size)?,
            None => None,
        };
        let stream = if body {
            match self.store.read_blob(digest, size, range).await {
                Ok(s) => Some(Box::pin(s.inspect(|r| {
                    if let Ok(b) = r {
                        metrics::sent(b.len() as u64)
                    }
                })) as ByteStream),
                Err(StorageError::NotFound) => {
                    tracing::error!(%repo, %digest, "linked blob missing from storage");
                    return Err(RegistryError::new(ErrorCode::BlobUnknown).with_detail(digest.to_string()));
                }
                Err(e) => return Err(internal("read blob", e)),
            }
        } else {
            None
        };
        Ok(BlobBody { size, range, stream })
    }

    /// Unlink a blob from a repository (its bytes stay while other repositories use them).
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<(), RegistryError> {
        if !self.repo_exists(repo).await? {
            return Err(name_unknown(repo));
        }
        let quota = self.quotas.reserve(repo, self.quotas.op_key(), 0).await?;
        let unlink = repo::Link { digest: digest.clone(), size: None, ends_upload: None, quota, pinned: false, announce: None };
        Self::ask(&self.repo_actor(repo), unlink).await?
    }

    // ----- uploads -----

    /// Begin a chunked upload session.
    pub async fn start_upload(&self, repo: &RepoName, by: &str) -> Result<UploadId, RegistryError> {
        self.fresh(&[repo]).await?;
        self.quotas.admit_repo(repo).await?;
        self.create_session(repo, DigestAlgorithm::Sha256, by).await
    }

    /// A session `by` opens (counted against their cap of open sessions).
    async fn create_session(&self, repo: &RepoName, algorithm: DigestAlgorithm, by: &str) -> Result<UploadId, RegistryError> {
        let create = uploads::Create {
            repo: repo.clone(),
            digester: Digester::new(algorithm),
            owner: by.to_owned(),
            max_per_owner: self.config.max_uploads_per_user.max(1),
        };
        Self::ask(&self.uploads, create).await?
    }

    /// Cross-repository mount: link `digest` from `from` into `repo` if `from` has it.
    /// Returns false when it cannot be mounted (the caller then opens a session).
    pub async fn mount_blob(&self, repo: &RepoName, digest: &Digest, from: &RepoName, by: &str) -> Result<bool, RegistryError> {
        let Some(from_state) = self.states(&[repo, from]).await?.pop().flatten() else {
            return Ok(false);
        };
        let Some(size) = from_state.read().unwrap().blobs.get(digest).copied() else {
            return Ok(false);
        };
        match self.store.stat_blob(digest).await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(false),
            Err(e) => return Err(internal("stat blob", e)),
        }
        self.quotas.admit_repo(repo).await?;
        // A blob mounted from another repository of the same tenant is already
        // counted; from another tenant's, it is that much more for this one.
        let cost = if self.quotas.owner(repo).await? == self.quotas.owner(from).await? { 0 } else { size };
        let quota = self.quotas.reserve(repo, self.quotas.op_key(), cost).await?;
        self.index.touch(repo, digest, now_ms());
        let announce = self.announcer(repo, by).await?;
        let link = repo::Link { digest: digest.clone(), size: Some(size), ends_upload: None, quota, pinned: false, announce };
        match Self::ask(&self.repo_actor(repo), link).await? {
            Ok(()) => Ok(true),
            // Its bytes are being collected: the client uploads them instead.
            Err(e) if e.code() == ErrorCode::Unavailable => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A whole blob in one request (`POST ?digest=` with a body).
    pub async fn upload_monolithic<S, E>(&self, repo: &RepoName, digest: &Digest, body: S, by: &str) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        self.quotas.admit_repo(repo).await?;
        let id = self.create_session(repo, digest.algorithm(), by).await?;
        self.finish_upload(repo, &id, digest, None, Some(body), by).await
    }

    /// Append a chunk (`PATCH`); returns the new committed size.
    pub async fn upload_chunk<S, E>(
        &self,
        repo: &RepoName,
        id: &UploadId,
        content_range: Option<ByteRange>,
        body: S,
    ) -> Result<u64, RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut session = self.lease_upload(repo, id).await?;
        let lease = LeaseHeld::on(&self.uploads, *id);
        let result = self.write_chunk(&mut session, content_range, body).await;
        lease.settled();
        let updated = result.is_ok().then(|| session.clone());
        Self::ask(&self.uploads, uploads::Release { id: *id, updated }).await??;
        result.map(|_| session.offset)
    }

    /// Take an upload session for writing, waiting up to [`uploads::LEASE_WAIT`]
    /// for another request holding it to give it back.
    async fn lease_upload(&self, repo: &RepoName, id: &UploadId) -> Result<Session, RegistryError> {
        let deadline = tokio::time::Instant::now() + uploads::LEASE_WAIT;
        loop {
            if let Some(session) = Self::ask(&self.uploads, uploads::Lease { id: *id, repo: repo.clone() }).await?? {
                return Ok(session);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(uploads::busy());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn write_chunk<S, E>(&self, session: &mut Session, content_range: Option<ByteRange>, body: S) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        self.receive(session, content_range, body, None).await.map(|_| ())
    }

    /// Receive a chunk into the session's staging or, with `in_place` (a blob
    /// received whole on a store that [writes in place](BlobStore::writes_in_place)),
    /// straight to that blob's key, unpublished. On an error nothing is kept.
    async fn receive<S, E>(
        &self,
        session: &mut Session,
        content_range: Option<ByteRange>,
        body: S,
        in_place: Option<&Digest>,
    ) -> Result<Option<Unpublished>, RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        if let Some(r) = content_range {
            if r.start != session.offset {
                return Err(RegistryError::new(ErrorCode::BlobUploadInvalid)
                    .with_status(416)
                    .with_detail(format!("chunk starts at {}, upload is at {}", r.start, session.offset)));
            }
        }
        // A chunk that would take the tenant past its storage quota is cut off as
        // soon as it passes the headroom, rather than staged in full and refused.
        let headroom = self.quotas.upload_headroom(&session.repo, session.id).await?;
        let cap = headroom.map(|h| h.saturating_sub(session.offset));
        let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut seen, flag) = (0u64, over.clone());
        let body = body.map(move |frame| {
            let b = frame.map_err(|e| e.to_string())?;
            seen += b.len() as u64;
            if cap.is_some_and(|c| seen > c) {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err("storage quota exceeded".to_string());
            }
            Ok(b)
        });
        let mut staging = session.staging.clone();
        let mut digester = session.digester.clone();
        let max = self.config.max_blob_bytes;
        let written = match in_place {
            None => self.store.write_chunk(&session.id, &mut staging, session.offset, body, &mut digester, max).await.map(|n| (n, None)),
            Some(digest) => self.store.write_unpublished(digest, body, &mut digester, max).await.map(|(n, u)| (n, Some(u))),
        };
        // A chunk cut off by the quota failed in the store: nothing was kept.
        if over.load(std::sync::atomic::Ordering::Relaxed) {
            // Reserving what the chunk needed names the quota and its figures.
            self.quotas.reserve_upload(&session.repo, session.id, session.offset + cap.unwrap_or(0) + 1).await?;
            // Room appeared meanwhile; the chunk was cut off all the same.
            self.quotas.reserve_upload(&session.repo, session.id, session.offset).await?;
            let tenant = self.quotas.owner(&session.repo).await?.map(|t| t.to_string()).unwrap_or_default();
            return Err(RegistryError::new(ErrorCode::Denied)
                .with_detail(format!("storage quota of tenant {tenant} exceeded while the chunk arrived; send it again")));
        }
        let (written, unpublished) = written.map_err(|e| storage_err("write upload chunk", e))?;
        metrics::received(written);
        let accepted = match content_range {
            Some(r) if written != r.len() => Err(RegistryError::new(ErrorCode::BlobUploadInvalid)
                .with_status(416)
                .with_detail(format!("Content-Range announces {} bytes, body had {written}", r.len()))),
            // The chunk is acknowledged only if the tenant's quota holds its bytes.
            _ => self.quotas.reserve_upload(&session.repo, session.id, session.offset + written).await,
        };
        if let Err(e) = accepted {
            if let Some(u) = unpublished {
                u.discard().await;
            }
            return Err(e);
        }
        session.offset += written;
        session.staging = staging;
        session.digester = digester;
        Ok(unpublished)
    }

    /// Complete an upload (`PUT ?digest=`), with an optional final chunk that
    /// `content_range`, if given, must place at the upload's current offset. The
    /// blob becomes visible only if the content matches `digest`.
    pub async fn finish_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        content_range: Option<ByteRange>,
        body: Option<S>,
        by: &str,
    ) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut session = self.lease_upload(repo, id).await?;
        let lease = LeaseHeld::on(&self.uploads, *id);
        let result = self.commit(&mut session, digest, content_range, body, by).await;
        lease.settled();
        match &result {
            // The commit removed the staging data and, with the link, the record.
            Ok(()) => Self::ask(&self.uploads, uploads::End { id: *id, repo: repo.clone(), cancel: false, committed: true }).await??,
            // A body that failed mid-way leaves the session as it was: the client may retry.
            // So does a refusal by the quota (the tenant may free space and retry)
            // and a store or database out of reach (try again).
            Err(e)
                if matches!(e.code(), ErrorCode::BlobUploadInvalid | ErrorCode::Unknown | ErrorCode::Denied | ErrorCode::Unavailable) =>
            {
                Self::ask(&self.uploads, uploads::Release { id: *id, updated: None }).await??
            }
            // A digest mismatch ends the session: its content can never become that blob.
            Err(_) => Self::ask(&self.uploads, uploads::End { id: *id, repo: repo.clone(), cancel: false, committed: false }).await??,
        }
        result
    }

    async fn commit<S, E>(
        &self,
        session: &mut Session,
        digest: &Digest,
        content_range: Option<ByteRange>,
        body: Option<S>,
        by: &str,
    ) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        // A blob received whole in this request, on a store of one object per
        // chunk, goes straight to its key (published below, once verified and
        // pinned) instead of being staged, copied and deleted.
        let in_place =
            (session.offset == 0 && self.store.writes_in_place() && session.digester.algorithm() == digest.algorithm()).then_some(digest);
        let mut unpublished = match body {
            Some(body) => self.receive(session, content_range, body, in_place).await?,
            None => None,
        };
        let linked = self.verify_and_link(session, digest, &mut unpublished, by).await;
        // Not published (refused before that step): it never becomes visible.
        if let Some(u) = unpublished {
            u.discard().await;
        }
        linked
    }

    /// The rest of [`Self::commit`]: check the content against `digest`, then
    /// publish it (the `unpublished` blob, taken, or the session's staging) and
    /// link it.
    async fn verify_and_link(
        &self,
        session: &mut Session,
        digest: &Digest,
        unpublished: &mut Option<Unpublished>,
        by: &str,
    ) -> Result<(), RegistryError> {
        let computed = if let Some(u) = unpublished {
            u.computed().clone()
        } else if session.digester.algorithm() == digest.algorithm() {
            session.digester.finish()
        } else {
            // The session hashed with another algorithm: hash the staged bytes again.
            let mut d = Digester::new(digest.algorithm());
            let mut s = self
                .store
                .read_staged(&session.id, &session.staging, session.offset)
                .await
                .map_err(|e| internal("read staged upload", e))?;
            while let Some(chunk) = s.next().await {
                d.update(&chunk.map_err(|e| internal("read staged upload", e))?);
            }
            d.finish()
        };
        if &computed != digest {
            return Err(RegistryError::new(ErrorCode::DigestInvalid).with_detail(format!("content digest is {computed}, not {digest}")));
        }
        // Reserved again: after a restart the quota actor has forgotten the session.
        // (A blob the repository already has costs nothing more.)
        let state = self.state(&session.repo).await?;
        let linked_here = state.is_some_and(|s| s.read().unwrap().blobs.contains_key(digest));
        let cost = if linked_here { 0 } else { session.offset };
        let quota = self.quotas.reserve(&session.repo, quota::Key::Upload(session.id), cost).await?;
        // Pinned before the bytes are published, so the collector cannot delete
        // them between publish and link; the link releases the pin. (A blob the
        // repository already links needs none, as for manifests above.)
        let pinned = !linked_here;
        let announce = self.announcer(&session.repo, by).await?;
        if pinned {
            self.pin(digest).await?;
        }
        let published = match unpublished.take() {
            Some(u) => u.publish().await,
            None => self.store.commit_upload(&session.id, &session.staging, session.offset, digest).await,
        };
        let linked = match published {
            Err(e) => Err(internal("commit upload", e)),
            Ok(()) => {
                let link = repo::Link {
                    digest: digest.clone(),
                    size: Some(session.offset),
                    ends_upload: Some(session.id),
                    quota,
                    pinned,
                    announce,
                };
                Self::ask(&self.repo_actor(&session.repo), link).await.and_then(|r| r)
            }
        };
        if linked.is_err() && pinned {
            self.unpin(digest).await;
        }
        linked
    }

    /// Bytes received so far for an upload.
    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> Result<u64, RegistryError> {
        Self::ask(&self.uploads, uploads::Status { id: *id, repo: repo.clone() }).await?
    }

    /// Abandon an upload and drop its staged data.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<(), RegistryError> {
        Self::ask(&self.uploads, uploads::End { id: *id, repo: repo.clone(), cancel: true, committed: false }).await?
    }

    // ----- manifests -----

    /// Where `reference` points: digest, media type, size, and the bytes if cached.
    /// From the state when it is held; for a repository not held, by point
    /// reads of the tag and manifest records unless it was read recently
    /// ([`index::Index::read_again`]), when its state is loaded and held.
    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<(Digest, String, u64, Option<Bytes>), RegistryError> {
        let unknown = |d: &dyn std::fmt::Display| RegistryError::new(ErrorCode::ManifestUnknown).with_detail(format!("{d} is unknown"));
        let unknown_ref = || match reference {
            Reference::Tag(t) => unknown(&format_args!("tag {t}")),
            Reference::Digest(d) => unknown(&format_args!("manifest {d}")),
        };
        self.fresh(&[repo]).await?;
        let state = match self.index.held(repo) {
            Some(state) => state,
            None if !self.index.exists(repo) => return Err(name_unknown(repo)),
            None if !self.index.read_again(repo) => {
                let head = self.meta.manifest_head(repo, reference).await.map_err(|e| internal("read manifest", e))?;
                let head = head.ok_or_else(unknown_ref)?;
                return Ok((head.digest, head.media_type, head.size, None));
            }
            None => self.states_now(&[repo]).await?.pop().flatten().ok_or_else(|| name_unknown(repo))?,
        };
        let s = state.read().unwrap();
        let digest = match reference {
            Reference::Digest(d) => d,
            Reference::Tag(t) => s.tag(t).ok_or_else(unknown_ref)?,
        };
        let e = s.manifests.get(digest).ok_or_else(|| unknown(&format_args!("manifest {digest}")))?;
        Ok((digest.clone(), e.row.media_type.clone(), e.row.size, e.bytes.clone()))
    }

    /// Fetch a manifest by tag or digest (HEAD passes `body = false`).
    /// A pull by `puller` is counted, and announced to plugins that take pulls
    /// (at the next flush of the counts: nothing is written now).
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: bool,
        puller: &str,
    ) -> Result<(ManifestBody, u64), RegistryError> {
        let (m, size) = self.read_manifest(repo, reference, body).await?;
        metrics::sent(m.bytes.len() as u64);
        if body && self.config.count_pulls {
            let tag = match reference {
                Reference::Tag(t) => Some(t),
                Reference::Digest(_) => None,
            };
            self.pulls.count(repo, tag);
        }
        if body && self.plugins.as_ref().is_some_and(|p| p.deliveries().wanted(berth_plugins::Hook::ManifestPulled)) {
            // The manifest was read: a pull never fails for its announcement.
            match self.announcer(repo, puller).await {
                Ok(Some(a)) => {
                    let kind = berth_plugins::EventKind::ManifestPulled {
                        tenant: a.tenant(),
                        repository: repo.to_string(),
                        reference: reference.to_string(),
                        digest: m.digest.to_string(),
                        puller: puller.to_owned(),
                    };
                    self.pulls.announce(a.rows(kind, false));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%repo, error = %e, "a pull was not announced: its owner could not be read"),
            }
        }
        Ok((m, size))
    }

    /// A manifest for a management view: like [`Registry::get_manifest`], but not
    /// a pull (nothing is counted).
    pub async fn read_manifest(&self, repo: &RepoName, reference: &Reference, body: bool) -> Result<(ManifestBody, u64), RegistryError> {
        let (digest, media_type, size, cached) = self.resolve(repo, reference).await?;
        let bytes = match (cached, body) {
            (Some(b), _) => b,
            (None, false) => Bytes::new(),
            (None, true) => {
                let b = self.store.read_blob_bytes(&digest, size).await.map_err(|e| internal("read manifest", e))?;
                self.index.cache_manifest_bytes(repo, &digest, &b);
                b
            }
        };
        Ok((ManifestBody { digest, media_type, bytes }, size))
    }

    /// Validate, store and commit a manifest, moving the tag if the reference is one.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
        pusher: &str,
    ) -> Result<PutManifest, RegistryError> {
        metrics::received(bytes.len() as u64);
        let parsed = ParsedManifest::parse(&bytes, content_type)?;
        let (digest, tag) = match reference {
            Reference::Digest(d) => {
                let computed = Digest::of(d.algorithm(), &bytes);
                if &computed != d {
                    return Err(RegistryError::new(ErrorCode::DigestInvalid).with_detail(format!("manifest digest is {computed}, not {d}")));
                }
                (computed, None)
            }
            Reference::Tag(t) => (Digest::sha256(&bytes), Some(t.clone())),
        };
        // Plugin gates judge the push before anything of it is stored or
        // reserved, outside the repository actor: a slow gate delays only this push.
        let findings = self.gate(repo, &digest, tag.as_ref(), &parsed, &bytes, pusher).await?;
        // Its references are checked before anything is stored or reserved (the
        // repository actor checks again when it commits): a manifest naming
        // blobs the repository lacks leaves no bytes behind.
        let blobs: Vec<Digest> = parsed.required_blobs().cloned().collect();
        let children: Vec<Digest> = parsed.required_manifests().cloned().collect();
        let state = self.state(repo).await?.unwrap_or_default();
        repo::check_references(repo, &state.read().unwrap(), &blobs, &children, |_| false)?;
        self.quotas.admit_repo(repo).await?;
        // A manifest the repository already holds (a re-tag) costs nothing more.
        let known = state.read().unwrap().manifests.contains_key(&digest);
        drop(state);
        let quota = self.quotas.reserve(repo, self.quotas.op_key(), if known { 0 } else { bytes.len() as u64 }).await?;
        // Pinned before the bytes are stored; the commit releases the pin. A
        // manifest this repository already holds needs no pin: while it is
        // referenced the collector cannot mark it, and once unreferenced it waits
        // out the grace period (and a mark would make the commit fail, not dangle).
        let pinned = !known;
        if pinned {
            self.pin(&digest).await?;
        }
        let stored = self.store.put_blob(&digest, bytes.clone()).await.map_err(|e| internal("store manifest", e));
        if let Err(e) = stored {
            if pinned {
                self.unpin(&digest).await;
            }
            return Err(e);
        }
        let row = ManifestRow {
            repo: repo.clone(),
            digest: digest.clone(),
            media_type: parsed.media_type.clone(),
            size: bytes.len() as u64,
            artifact_type: parsed.artifact_type.clone(),
            subject: parsed.subject.as_ref().map(|s| s.digest.clone()),
            annotations: parsed.annotations.clone(),
            created_ms: now_ms(),
            // Completed by the repository actor, which knows the blobs' and children's sizes.
            content_size: bytes.len() as u64,
            refs: Some(parsed.required_blobs().chain(parsed.required_manifests()).cloned().collect()),
            findings,
        };
        let msg = repo::CommitManifest {
            row,
            tag: tag.clone(),
            required_blobs: blobs,
            required_manifests: children,
            quota,
            pinned,
            platforms: plugins::platforms(&parsed),
            announce: self.announcer(repo, pusher).await?,
        };
        let committed = Self::ask(&self.repo_actor(repo), msg).await.and_then(|r| r);
        if committed.is_err() && pinned {
            self.unpin(&digest).await;
        }
        committed?;
        self.index.cache_manifest_bytes(repo, &digest, &bytes);
        Ok(PutManifest { digest, subject: parsed.subject.map(|s| s.digest) })
    }

    /// Delete a manifest (by digest, with its tags) or just a tag; `by`: who.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference, by: &str) -> Result<(), RegistryError> {
        if !self.repo_exists(repo).await? {
            return Err(name_unknown(repo));
        }
        let actor = self.repo_actor(repo);
        let announce = self.announcer(repo, by).await?;
        match reference {
            Reference::Digest(d) => {
                let quota = self.quotas.reserve(repo, self.quotas.op_key(), 0).await?;
                Self::ask(&actor, repo::DeleteManifest(d.clone(), quota, announce)).await?
            }
            Reference::Tag(t) => Self::ask(&actor, repo::DeleteTag(t.clone(), announce)).await?,
        }
    }

    // ----- listings -----

    pub async fn tags(&self, repo: &RepoName, n: usize, last: Option<&str>) -> Result<(Vec<Tag>, bool), RegistryError> {
        let state = self.state(repo).await?.ok_or_else(|| name_unknown(repo))?;
        let page = state.read().unwrap().tags_page(n, last);
        Ok(page)
    }

    /// A page of the repositories `visible` admits (the caller's readable ones).
    pub fn catalog(&self, n: usize, last: Option<&str>, visible: impl FnMut(&RepoName) -> bool) -> (Vec<RepoName>, bool) {
        self.index.catalog(n, last, visible)
    }

    /// The actor system's arbiter, for services that run their own actors.
    pub fn arbiter(&self) -> &ArbiterHandle {
        &self.arbiter
    }

    /// Manifests in `repo` whose subject is `digest`, optionally of one artifact type.
    pub async fn referrers(&self, repo: &RepoName, digest: &Digest, artifact_type: Option<&str>) -> Result<Vec<Descriptor>, RegistryError> {
        let Some(state) = self.state(repo).await? else {
            return Ok(vec![]);
        };
        let mut out: Vec<Descriptor> = {
            let s = state.read().unwrap();
            s.manifests
                .values()
                .filter(|e| e.row.subject.as_ref() == Some(digest))
                .filter(|e| artifact_type.is_none_or(|t| e.row.artifact_type.as_deref() == Some(t)))
                .map(|e| Descriptor {
                    media_type: e.row.media_type.clone(),
                    digest: e.row.digest.clone(),
                    size: e.row.size,
                    artifact_type: e.row.artifact_type.clone(),
                    annotations: None,
                    platform: None,
                    urls: None,
                })
                .collect()
        };
        if out.is_empty() {
            return Ok(out);
        }
        // Annotations are not resident (see `index::resident`): read them now.
        let mut annotations = self.meta.referrer_annotations(repo, digest).await.map_err(|e| internal("referrer annotations", e))?;
        for d in &mut out {
            d.annotations = annotations.remove(&d.digest);
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }
}

/// An upload session leased to a request: if the request goes away before
/// it settles the lease (the client disconnected and the handler's future was
/// dropped mid-chunk), the lease is given back with the session as it was, so
/// the client can resume instead of meeting a busy session (and, with a
/// metadata server, a database lease held for its full term).
struct LeaseHeld<'a> {
    uploads: &'a Addr<UploadSessions>,
    id: Option<UploadId>,
}

impl<'a> LeaseHeld<'a> {
    fn on(uploads: &'a Addr<UploadSessions>, id: UploadId) -> Self {
        LeaseHeld { uploads, id: Some(id) }
    }

    /// The request goes on to settle the lease itself.
    fn settled(mut self) {
        self.id = None;
    }
}

impl Drop for LeaseHeld<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.uploads.do_send(uploads::Release { id, updated: None });
        }
    }
}

/// How often repository deletes that stopped part-way are looked for.
const SWEEP_EVERY_SECS: u64 = 60;

/// The future a scheduled job runs.
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Background work on a schedule (the collector, retention): runs `job` every
/// `every`, one run at a time, until the registry is gone. With a metadata
/// server shared by replicas, one replica at a time runs it: the one holding
/// the job's lease in the database (`job_lease`, renewed at each run and
/// lasting two intervals, so another replica takes over when the holder stops).
struct Periodic {
    registry: std::sync::Weak<Registry>,
    name: &'static str,
    every: Duration,
    job: fn(Arc<Registry>) -> Job,
}

impl Periodic {
    fn start(registry: &Arc<Registry>, name: &'static str, every_secs: u64, job: fn(Arc<Registry>) -> Job) {
        let p = Periodic { registry: Arc::downgrade(registry), name, every: Duration::from_secs(every_secs.max(1)), job };
        Periodic::start_in_arbiter(&registry.arbiter, move |_| p);
    }

    /// Whether this process runs the job now (always, unless replicas share the store).
    async fn ours(registry: &Registry, name: &str, every: Duration) -> bool {
        if !registry.meta.is_shared() {
            return true;
        }
        let ttl = 2 * every.as_millis() as i64;
        match registry.meta.job_lease(name, &registry.holder, now_ms(), ttl).await {
            Ok(ours) => ours,
            Err(e) => {
                tracing::warn!(job = name, error = %e, "job lease unavailable; skipping this run");
                false
            }
        }
    }
}

impl Actor for Periodic {
    type Context = actix::Context<Self>;

    fn started(&mut self, ctx: &mut actix::Context<Self>) {
        use actix::{ActorContext, AsyncContext, WrapFuture};
        ctx.run_interval(self.every, |act, ctx| {
            let Some(registry) = act.registry.upgrade() else {
                ctx.stop();
                return;
            };
            // Waited for, so runs never overlap (on-demand ones queue on their own locks).
            let (name, every, job) = (act.name, act.every, act.job);
            ctx.wait(
                async move {
                    if Periodic::ours(&registry, name, every).await {
                        job(registry).await;
                    }
                }
                .into_actor(act),
            );
        });
    }
}

fn name_unknown(repo: &RepoName) -> RegistryError {
    RegistryError::new(ErrorCode::NameUnknown).with_detail(format!("repository {repo} is unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry over memory storage and an in-memory metadata store.
    async fn in_memory() -> Arc<Registry> {
        let store = BlobStore::open(&berth_storage::StorageConfig::Memory).await.unwrap();
        let meta = Metadata::connect(&berth_metadata::MetadataConfig::new("mem://")).await.unwrap();
        Registry::open(store, meta, RegistryConfig::default(), None).await.unwrap()
    }

    /// Idle actors (of names that never became a repository, of repositories
    /// no longer in use) are retired once nobody holds them; a held one stays,
    /// and the actors alive stay bounded however many names were used.
    #[tokio::test]
    async fn idle_actors_are_retired() {
        let registry = in_memory().await;
        let real: RepoName = "library/real".parse().unwrap();
        registry.index.repo_or_create(&real);
        drop(registry.repo_actor(&real));
        let held_name: RepoName = "library/held".parse().unwrap();
        let held = registry.repo_actor(&held_name);
        for i in 0..5_000 {
            let name: RepoName = format!("library/tried-{i}").parse().unwrap();
            drop(registry.repo_actor(&name));
            assert!(registry.repo_actor_count() <= 2 * MIN_ACTORS_PRUNED + 2, "{} actors after {i} names", registry.repo_actor_count());
        }
        let repos = registry.repos.lock().unwrap();
        assert!(!repos.contains_key(&real), "an idle actor was kept");
        assert!(repos.get(&held_name).is_some_and(|a| Arc::ptr_eq(a, &held)), "a held actor was dropped");
        drop(repos);
        registry.shutdown();
    }

    /// A request dropped while it holds an upload's lease (its client went
    /// away mid-chunk and the server dropped the handler) gives the lease back:
    /// the session stays at its last whole chunk and the next chunk is taken.
    #[tokio::test]
    async fn a_dropped_chunk_gives_its_lease_back() {
        let registry = in_memory().await;
        let repo: RepoName = "library/app".parse().unwrap();
        let id = registry.start_upload(&repo, "admin").await.unwrap();
        let chunk = |b: &'static [u8]| futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b))]);
        assert_eq!(registry.upload_chunk(&repo, &id, None, chunk(b"hello ")).await.unwrap(), 6);
        // A body that never ends: the request is dropped while it waits.
        let stalled = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"half"))]).chain(futures::stream::pending());
        let dropped = tokio::time::timeout(Duration::from_millis(200), registry.upload_chunk(&repo, &id, None, stalled)).await;
        assert!(dropped.is_err(), "the stalled chunk finished");
        let mut next = Err(RegistryError::internal());
        for _ in 0..50 {
            next = registry.upload_chunk(&repo, &id, None, chunk(b"world")).await;
            if next.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(next.map_err(|e| e.detail_or_message()), Ok(11), "the lease of the dropped request was never given back");
        assert_eq!(registry.upload_status(&repo, &id).await.unwrap(), 11);
        registry.shutdown();
    }

    /// On a store that writes a blob received whole straight to its key (memory,
    /// like S3), a monolithic upload is published only once its digest matches:
    /// a wrong digest or a short Content-Range leaves nothing stored, and the
    /// right one is stored, linked and leaves no staging behind.
    #[tokio::test]
    async fn a_blob_received_whole_is_published_in_place_only_when_verified() {
        let registry = in_memory().await;
        assert!(registry.store.writes_in_place());
        let repo: RepoName = "library/app".parse().unwrap();
        let body = |b: &'static [u8]| Some(futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b))]));
        let digest = Digest::sha256(b"layer bytes");
        let wrong = Digest::sha256(b"other bytes");
        let id = registry.start_upload(&repo, "admin").await.unwrap();
        let refused = registry.finish_upload(&repo, &id, &wrong, None, body(b"layer bytes"), "admin").await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::DigestInvalid);
        let short = ByteRange { start: 0, end: 4 };
        let id = registry.start_upload(&repo, "admin").await.unwrap();
        let refused = registry.finish_upload(&repo, &id, &digest, Some(short), body(b"layer bytes"), "admin").await.unwrap_err();
        assert_eq!(refused.status(), 416);
        for d in [&digest, &wrong] {
            assert_eq!(registry.store.stat_blob(d).await.unwrap(), None, "{d} is stored though it was refused");
        }
        // The session the short range left is still open and takes the blob.
        registry.finish_upload(&repo, &id, &digest, None, body(b"layer bytes"), "admin").await.unwrap();
        assert_eq!(registry.store.stat_blob(&digest).await.unwrap(), Some(11));
        let state = registry.state(&repo).await.unwrap().expect("the repository exists");
        assert_eq!(state.read().unwrap().blobs.get(&digest), Some(&11));
        assert!(registry.store.staged_uploads().await.unwrap().is_empty());
        registry.shutdown();
    }

    /// A change a repository actor refuses for a name with no repository
    /// (a manifest whose references are missing, an unlink) creates no index entry.
    #[tokio::test]
    async fn a_refused_change_to_a_new_name_leaves_no_index_entry() {
        let registry = in_memory().await;
        let ghost: RepoName = "library/ghost".parse().unwrap();
        let missing: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let unlink = repo::Link { digest: missing.clone(), size: None, ends_upload: None, quota: None, pinned: false, announce: None };
        assert!(Registry::ask(&registry.repo_actor(&ghost), unlink).await.unwrap().is_err());
        let row = ManifestRow {
            repo: ghost.clone(),
            digest: format!("sha256:{}", "cd".repeat(32)).parse().unwrap(),
            media_type: berth_oci::manifest::OCI_MANIFEST.into(),
            size: 10,
            artifact_type: None,
            subject: None,
            annotations: None,
            created_ms: 0,
            content_size: 10,
            refs: Some(vec![missing.clone()]),
            findings: Vec::new(),
        };
        let commit = repo::CommitManifest {
            row,
            tag: None,
            required_blobs: vec![missing],
            required_manifests: vec![],
            quota: None,
            pinned: false,
            platforms: vec![],
            announce: None,
        };
        let refused = Registry::ask(&registry.repo_actor(&ghost), commit).await.unwrap();
        assert_eq!(refused.unwrap_err().code(), ErrorCode::ManifestBlobUnknown);
        assert!(!registry.index.exists(&ghost) && registry.index.held(&ghost).is_none(), "a refused change left an index entry");
        assert_eq!(registry.index.repo_count(), 0);
        registry.shutdown();
    }
}
