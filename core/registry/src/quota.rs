//! Quotas: per-tenant limits on namespaces, repositories and storage bytes,
//! enforced by one [`QuotaActor`] per tenant.
//!
//! The truth about usage is in metadata: every link, manifest and delete
//! transaction maintains the tenant's reference counts and answers how many bytes
//! it added or freed (`berth_metadata::usage`). The actor mirrors that figure in
//! memory and adds what pushes in progress have **reserved**:
//! - an upload session reserves its staged bytes as each chunk arrives (checked
//!   before the chunk is acknowledged; a chunk that would pass the limit is
//!   refused with `DENIED` and its bytes are cut off, as any failed chunk's are);
//! - completing it reserves again (after a restart the actor has forgotten the
//!   session), then the link transaction's answer *settles* the reservation: the
//!   reservation goes, the bytes the tenant's usage really grew by come in (0 when
//!   the blob was already one of the tenant's);
//! - a cancelled, failed or expired session releases its reservation;
//! - mounts and manifest pushes reserve their size, deletes reserve nothing; each
//!   is settled with the transaction's answer by the repository actor that ran
//!   it, so a client that goes away mid-request cannot skip the settlement, and a
//!   [`Ticket`] dropped unsettled releases its reservation.
//!
//! Every change to a tenant's usage starts with a message to its actor that is
//! answered before the transaction runs, and the actor loads the persisted usage
//! before it answers its first message; so the figure in memory never counts a
//! transaction twice or misses one. Concurrent pushes of one tenant meet in the
//! actor (a map update per chunk), never on one database row.
//!
//! Limits: the configured defaults (`registry.quota`), overridden per tenant by
//! the platform admin. Repository and namespace counts are checked when one would
//! be created (an upload, mount or manifest push to a new repository; an explicit
//! create; a namespace create).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_rt::ArbiterHandle;
use berth_metadata::{Metadata, QuotaLimits, TenantUsage};
use berth_oci::{AccountName, ErrorCode, RegistryError, RepoName, UploadId};
use serde::Deserialize;

use crate::index::Index;
use crate::{internal, now_ms};

/// Default limits for every tenant (`None`: unlimited), `[registry.quota]`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    pub namespaces: Option<u64>,
    pub repositories: Option<u64>,
    pub storage_bytes: Option<u64>,
}

/// What holds a reservation: an upload session, or one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Upload(UploadId),
    Op(u64),
}

/// A tenant's limits and usage, as `describe` answers.
#[derive(Clone, Debug, PartialEq)]
pub struct QuotaReport {
    pub tenant: AccountName,
    /// The limits in force (the tenant's own, else the default).
    pub limits: QuotaLimits,
    /// The tenant's own limits (where set).
    pub own: QuotaLimits,
    pub usage: TenantUsage,
    /// Bytes reserved by pushes in progress on this replica.
    pub reserved_bytes: u64,
}

fn effective(own: &QuotaLimits, defaults: &QuotaConfig) -> QuotaLimits {
    QuotaLimits {
        namespaces: own.namespaces.or(defaults.namespaces),
        repositories: own.repositories.or(defaults.repositories),
        storage_bytes: own.storage_bytes.or(defaults.storage_bytes),
    }
}

fn denied(detail: String) -> RegistryError {
    RegistryError::new(ErrorCode::Denied).with_detail(detail)
}

/// The quota service: finds a repository's tenant and that tenant's actor.
pub struct Quotas {
    meta: Metadata,
    index: Arc<Index>,
    defaults: QuotaConfig,
    arbiter: ArbiterHandle,
    /// How long a repository admitted for a push that has not created it yet
    /// still counts (the upload session lifetime).
    admission: Duration,
    actors: Mutex<HashMap<AccountName, Addr<QuotaActor>>>,
    owners: Mutex<HashMap<String, (Option<AccountName>, Instant)>>,
    next_op: AtomicU64,
}

/// How long a namespace's owner is remembered (namespaces change owner only by
/// being deleted and created again).
const OWNER_TTL: Duration = Duration::from_secs(10);

impl Quotas {
    pub fn new(meta: Metadata, index: Arc<Index>, defaults: QuotaConfig, arbiter: ArbiterHandle, admission: Duration) -> Quotas {
        Quotas {
            meta,
            index,
            defaults,
            arbiter,
            admission,
            actors: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            next_op: AtomicU64::new(1),
        }
    }

    /// The tenant owning `repo`'s namespace (none: no quota applies).
    pub async fn owner(&self, repo: &RepoName) -> Result<Option<AccountName>, RegistryError> {
        let ns = repo.namespace();
        if let Some((t, at)) = self.owners.lock().unwrap().get(ns) {
            if at.elapsed() < OWNER_TTL {
                return Ok(t.clone());
            }
        }
        let t = self.meta.namespace_owner(ns).await.map_err(|e| internal("namespace owner", e))?;
        self.owners.lock().unwrap().insert(ns.to_owned(), (t.clone(), Instant::now()));
        Ok(t)
    }

    fn actor(&self, tenant: &AccountName) -> Addr<QuotaActor> {
        let mut actors = self.actors.lock().unwrap();
        if let Some(a) = actors.get(tenant).filter(|a| a.connected()) {
            return a.clone();
        }
        let actor = QuotaActor {
            tenant: tenant.clone(),
            meta: self.meta.clone(),
            index: self.index.clone(),
            defaults: self.defaults,
            admission_ms: self.admission.as_millis() as i64,
            own: QuotaLimits::default(),
            storage: 0,
            reserved: HashMap::new(),
            repos: HashSet::new(),
            admitted: HashMap::new(),
            namespaces_pending: 0,
        };
        let addr = QuotaActor::start_in_arbiter(&self.arbiter, move |_| actor);
        actors.insert(tenant.clone(), addr.clone());
        addr
    }

    async fn ask<M>(addr: &Addr<QuotaActor>, msg: M) -> Result<M::Result, RegistryError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        QuotaActor: Handler<M>,
    {
        let _waiting = crate::metrics::Waiting::on::<QuotaActor>();
        addr.send(msg).await.map_err(|e| internal("quota actor", e))
    }

    /// A fresh key for one operation's reservation.
    pub fn op_key(&self) -> Key {
        Key::Op(self.next_op.fetch_add(1, Ordering::Relaxed))
    }

    /// Reserve `total` bytes for `key` in `repo`'s tenant (replacing what `key`
    /// held); `DENIED` if the tenant's storage would pass its limit. `None` when
    /// no tenant owns the repository. The ticket settles or releases it.
    pub async fn reserve(&self, repo: &RepoName, key: Key, total: u64) -> Result<Option<Ticket>, RegistryError> {
        let Some(tenant) = self.owner(repo).await? else { return Ok(None) };
        let addr = self.actor(&tenant);
        Self::ask(&addr, Reserve { key, total }).await??;
        Ok(Some(Ticket { addr, key, settled: false }))
    }

    /// Like [`Quotas::reserve`] for an upload session's staged bytes, which stay
    /// reserved until the session completes, is cancelled or expires.
    pub async fn reserve_upload(&self, repo: &RepoName, id: UploadId, total: u64) -> Result<(), RegistryError> {
        if let Some(mut t) = self.reserve(repo, Key::Upload(id), total).await? {
            t.settled = true; // kept by the session, not by this call
        }
        Ok(())
    }

    /// The most bytes an upload session may reach before its next chunk would
    /// be refused (`None`: no limit).
    pub async fn upload_headroom(&self, repo: &RepoName, id: UploadId) -> Result<Option<u64>, RegistryError> {
        let Some(tenant) = self.owner(repo).await? else { return Ok(None) };
        Self::ask(&self.actor(&tenant), Headroom { key: Key::Upload(id) }).await
    }

    /// Drop an upload session's reservation (cancelled, failed or expired).
    pub async fn release_upload(&self, repo: &RepoName, id: UploadId) {
        if let Ok(Some(tenant)) = self.owner(repo).await {
            self.actor(&tenant).do_send(Release { key: Key::Upload(id) });
        }
    }

    /// Admit a repository that a push or an explicit create is about to create;
    /// `DENIED` if the tenant has as many as its limit allows.
    pub async fn admit_repo(&self, repo: &RepoName) -> Result<(), RegistryError> {
        if self.index.exists(repo) {
            return Ok(());
        }
        let Some(tenant) = self.owner(repo).await? else { return Ok(()) };
        Self::ask(&self.actor(&tenant), AdmitRepo { repo: repo.clone() }).await?
    }

    /// A repository was deleted.
    pub async fn repo_gone(&self, repo: &RepoName) {
        if let Ok(Some(tenant)) = self.owner(repo).await {
            self.actor(&tenant).do_send(RepoGone { repo: repo.clone() });
        }
    }

    /// Admit one more namespace for `tenant`; hold the guard until it is created.
    pub async fn admit_namespace(&self, tenant: &AccountName) -> Result<NamespaceGuard, RegistryError> {
        let addr = self.actor(tenant);
        Self::ask(&addr, AdmitNamespace).await??;
        Ok(NamespaceGuard { addr })
    }

    /// A namespace was given to `tenant`: forget its cached owner, and have the
    /// tenant's actor read its usage again (the namespace may already hold
    /// repositories, now counted for the tenant). A push of that tenant in flight
    /// at that moment may be counted once too often or too rarely in the actor's
    /// figure until it next loads; the persisted usage is exact regardless.
    pub fn claimed(&self, ns: &AccountName, tenant: &AccountName) {
        self.owners.lock().unwrap().remove(ns.as_str());
        if let Some(a) = self.actors.lock().unwrap().get(tenant).filter(|a| a.connected()) {
            a.do_send(Reload);
        }
    }

    /// A tenant's limits, usage (counted by the metadata) and reservations.
    pub async fn describe(&self, tenant: &AccountName) -> Result<QuotaReport, RegistryError> {
        Self::ask(&self.actor(tenant), Describe).await?
    }

    /// Set a tenant's own limits (`None`: the default applies).
    pub async fn set_limits(&self, tenant: &AccountName, own: QuotaLimits) -> Result<QuotaReport, RegistryError> {
        let addr = self.actor(tenant);
        Self::ask(&addr, SetLimits(own)).await??;
        Self::ask(&addr, Describe).await?
    }
}

/// A reservation held for one change; the repository actor that ran the change
/// settles it with the bytes the change added or freed. Dropped unsettled (the
/// change failed or never ran), it releases the reservation.
pub struct Ticket {
    addr: Addr<QuotaActor>,
    key: Key,
    settled: bool,
}

impl Ticket {
    /// The change committed: `delta` bytes came into (or, negative, left) the
    /// tenant's usage.
    pub fn settle(mut self, delta: i64) {
        self.settled = true;
        self.addr.do_send(Settle { key: self.key, delta });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.addr.do_send(Release { key: self.key });
        }
    }
}

/// Held while an admitted namespace is being created.
pub struct NamespaceGuard {
    addr: Addr<QuotaActor>,
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        self.addr.do_send(NamespaceDone);
    }
}

/// One tenant's quota state.
pub struct QuotaActor {
    tenant: AccountName,
    meta: Metadata,
    index: Arc<Index>,
    defaults: QuotaConfig,
    admission_ms: i64,
    own: QuotaLimits,
    /// The tenant's storage usage as committed in metadata.
    storage: u64,
    reserved: HashMap<Key, u64>,
    /// Repositories that exist, and ones admitted for a push not yet committed.
    repos: HashSet<RepoName>,
    admitted: HashMap<RepoName, i64>,
    namespaces_pending: u64,
}

/// How often a tenant's own limits are read again (set on another replica).
const LIMITS_REFRESH: Duration = Duration::from_secs(30);

impl Actor for QuotaActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Nothing is answered before the persisted usage is in memory.
        let (meta, tenant) = (self.meta.clone(), self.tenant.clone());
        ctx.wait(
            async move {
                let own = meta.quota_limits(&tenant).await?;
                let usage = meta.tenant_usage(&tenant).await?;
                let repos = meta.tenant_repos(&tenant).await?;
                Ok::<_, berth_metadata::MetadataError>((own, usage, repos))
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok((own, usage, repos)) => {
                    act.own = own;
                    act.storage = usage.storage_bytes;
                    act.repos = repos.into_iter().collect();
                }
                Err(e) => {
                    tracing::error!(tenant = %act.tenant, error = %e, "loading quota usage failed");
                    ctx.stop();
                }
            }),
        );
        ctx.run_interval(LIMITS_REFRESH, |act, ctx| {
            let (meta, tenant) = (act.meta.clone(), act.tenant.clone());
            ctx.spawn(async move { meta.quota_limits(&tenant).await }.into_actor(act).map(|res, act, _| {
                if let Ok(own) = res {
                    act.own = own;
                }
            }));
        });
    }
}

impl QuotaActor {
    fn limits(&self) -> QuotaLimits {
        effective(&self.own, &self.defaults)
    }

    fn reserved_except(&self, key: &Key) -> u64 {
        self.reserved.iter().filter(|(k, _)| *k != key).map(|(_, v)| v).sum()
    }

    /// Forget admissions older than an upload session's lifetime, keeping those
    /// whose repository exists by now.
    fn prune_admitted(&mut self) {
        let cutoff = now_ms() - self.admission_ms;
        let index = self.index.clone();
        let mut created = Vec::new();
        self.admitted.retain(|r, at| {
            if index.exists(r) {
                created.push(r.clone());
                false
            } else {
                *at >= cutoff
            }
        });
        self.repos.extend(created);
    }
}

struct Reserve {
    key: Key,
    total: u64,
}
impl Message for Reserve {
    type Result = Result<(), RegistryError>;
}
impl Handler<Reserve> for QuotaActor {
    type Result = Result<(), RegistryError>;
    fn handle(&mut self, msg: Reserve, _: &mut Context<Self>) -> Self::Result {
        if let Some(limit) = self.limits().storage_bytes {
            let others = self.reserved_except(&msg.key);
            let had = self.reserved.get(&msg.key).copied().unwrap_or(0);
            if self.storage.saturating_add(others).saturating_add(msg.total) > limit && msg.total > had {
                return Err(denied(format!(
                    "storage quota of tenant {} exceeded: {} bytes used, {others} reserved by pushes in progress, \
                     this push needs {}; the limit is {limit} bytes",
                    self.tenant, self.storage, msg.total
                )));
            }
        }
        self.reserved.insert(msg.key, msg.total);
        Ok(())
    }
}

struct Headroom {
    key: Key,
}
impl Message for Headroom {
    type Result = Option<u64>;
}
impl Handler<Headroom> for QuotaActor {
    type Result = Option<u64>;
    fn handle(&mut self, msg: Headroom, _: &mut Context<Self>) -> Option<u64> {
        let limit = self.limits().storage_bytes?;
        Some(limit.saturating_sub(self.storage).saturating_sub(self.reserved_except(&msg.key)))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Settle {
    key: Key,
    delta: i64,
}
impl Handler<Settle> for QuotaActor {
    type Result = ();
    fn handle(&mut self, msg: Settle, _: &mut Context<Self>) {
        self.reserved.remove(&msg.key);
        self.storage = self.storage.saturating_add_signed(msg.delta);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Release {
    key: Key,
}
impl Handler<Release> for QuotaActor {
    type Result = ();
    fn handle(&mut self, msg: Release, _: &mut Context<Self>) {
        self.reserved.remove(&msg.key);
    }
}

struct AdmitRepo {
    repo: RepoName,
}
impl Message for AdmitRepo {
    type Result = Result<(), RegistryError>;
}
impl Handler<AdmitRepo> for QuotaActor {
    type Result = Result<(), RegistryError>;
    fn handle(&mut self, msg: AdmitRepo, _: &mut Context<Self>) -> Self::Result {
        self.prune_admitted();
        if self.repos.contains(&msg.repo) {
            return Ok(());
        }
        if self.index.exists(&msg.repo) {
            self.repos.insert(msg.repo);
            return Ok(());
        }
        if !self.admitted.contains_key(&msg.repo) {
            let count = (self.repos.len() + self.admitted.len()) as u64;
            if let Some(limit) = self.limits().repositories {
                if count >= limit {
                    return Err(denied(format!(
                        "repository quota of tenant {} reached: {count} of {limit} repositories; {} would be one more",
                        self.tenant, msg.repo
                    )));
                }
            }
        }
        self.admitted.insert(msg.repo, now_ms());
        Ok(())
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct RepoGone {
    repo: RepoName,
}
impl Handler<RepoGone> for QuotaActor {
    type Result = ();
    fn handle(&mut self, msg: RepoGone, _: &mut Context<Self>) {
        self.repos.remove(&msg.repo);
        self.admitted.remove(&msg.repo);
    }
}

struct AdmitNamespace;
impl Message for AdmitNamespace {
    type Result = Result<(), RegistryError>;
}
impl Handler<AdmitNamespace> for QuotaActor {
    type Result = AtomicResponse<Self, Result<(), RegistryError>>;
    fn handle(&mut self, _: AdmitNamespace, _: &mut Context<Self>) -> Self::Result {
        let (meta, tenant) = (self.meta.clone(), self.tenant.clone());
        AtomicResponse::new(Box::pin(async move { meta.tenant_usage(&tenant).await }.into_actor(self).map(|res, act, _| {
            let usage = res.map_err(|e| internal("namespace count", e))?;
            let count = usage.namespaces + act.namespaces_pending;
            if let Some(limit) = act.limits().namespaces {
                if count >= limit {
                    return Err(denied(format!("namespace quota of tenant {} reached: {count} of {limit} namespaces", act.tenant)));
                }
            }
            act.namespaces_pending += 1;
            Ok(())
        })))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NamespaceDone;
impl Handler<NamespaceDone> for QuotaActor {
    type Result = ();
    fn handle(&mut self, _: NamespaceDone, _: &mut Context<Self>) {
        self.namespaces_pending = self.namespaces_pending.saturating_sub(1);
    }
}

struct Describe;
impl Message for Describe {
    type Result = Result<QuotaReport, RegistryError>;
}
impl Handler<Describe> for QuotaActor {
    type Result = ResponseActFuture<Self, Result<QuotaReport, RegistryError>>;
    fn handle(&mut self, _: Describe, _: &mut Context<Self>) -> Self::Result {
        let (meta, tenant) = (self.meta.clone(), self.tenant.clone());
        Box::pin(
            async move {
                let own = meta.quota_limits(&tenant).await?;
                let usage = meta.tenant_usage(&tenant).await?;
                Ok::<_, berth_metadata::MetadataError>((own, usage))
            }
            .into_actor(self)
            .map(|res, act, _| {
                let (own, usage) = res.map_err(|e| internal("quota usage", e))?;
                act.own = own;
                Ok(QuotaReport {
                    tenant: act.tenant.clone(),
                    limits: act.limits(),
                    own,
                    usage,
                    reserved_bytes: act.reserved.values().sum(),
                })
            }),
        )
    }
}

struct SetLimits(QuotaLimits);
impl Message for SetLimits {
    type Result = Result<(), RegistryError>;
}
impl Handler<SetLimits> for QuotaActor {
    type Result = AtomicResponse<Self, Result<(), RegistryError>>;
    fn handle(&mut self, msg: SetLimits, _: &mut Context<Self>) -> Self::Result {
        let (meta, tenant, own) = (self.meta.clone(), self.tenant.clone(), msg.0);
        AtomicResponse::new(Box::pin(async move { meta.set_quota_limits(&tenant, &own).await }.into_actor(self).map(move |res, act, _| {
            res.map_err(|e| internal("set quota", e))?;
            act.own = own;
            Ok(())
        })))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Reload;
impl Handler<Reload> for QuotaActor {
    type Result = AtomicResponse<Self, ()>;
    fn handle(&mut self, _: Reload, _: &mut Context<Self>) -> Self::Result {
        let (meta, tenant) = (self.meta.clone(), self.tenant.clone());
        AtomicResponse::new(Box::pin(
            async move {
                let usage = meta.tenant_usage(&tenant).await?;
                let repos = meta.tenant_repos(&tenant).await?;
                Ok::<_, berth_metadata::MetadataError>((usage, repos))
            }
            .into_actor(self)
            .map(|res, act, _| match res {
                Ok((usage, repos)) => {
                    act.storage = usage.storage_bytes;
                    act.repos = repos.into_iter().collect();
                }
                Err(e) => tracing::warn!(tenant = %act.tenant, error = %e, "reloading quota usage failed"),
            }),
        ))
    }
}
