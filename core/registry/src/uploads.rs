//! The upload-session actor: owns every session's state (repository, offset,
//! saved hash state, staging record), persists it to metadata after each chunk so
//! an upload resumes after a restart, leases a session to one writer at a time,
//! and expires abandoned sessions together with their staging data.
//!
//! Bytes never pass through this actor: a handler leases the session, streams the
//! chunk into storage itself, then reports the new state back.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use berth_metadata::{Metadata, UploadRow};
use berth_oci::{Digester, ErrorCode, RegistryError, RepoName, UploadId};
use berth_storage::{BlobStore, Staging};

use crate::quota::Quotas;
use crate::{internal, now_ms};

/// A session's state as handed to the writer holding the lease.
#[derive(Clone)]
pub struct Session {
    pub id: UploadId,
    pub repo: RepoName,
    pub offset: u64,
    pub digester: Digester,
    pub staging: Staging,
    pub started_ms: i64,
    pub owner: Option<String>,
}

impl Session {
    fn to_row(&self) -> UploadRow {
        UploadRow {
            id: self.id,
            repo: self.repo.clone(),
            offset: self.offset,
            hash_state: hex_encode(&self.digester.save()),
            staging: serde_json::to_value(&self.staging).expect("staging serializes"),
            started_ms: self.started_ms,
            updated_ms: now_ms(),
            owner: self.owner.clone(),
        }
    }

    fn from_row(row: UploadRow) -> Option<Session> {
        Some(Session {
            id: row.id,
            repo: row.repo,
            offset: row.offset,
            digester: Digester::restore(&hex_decode(&row.hash_state)?)?,
            staging: serde_json::from_value(row.staging).ok()?,
            started_ms: row.started_ms,
            owner: row.owner,
        })
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

struct Entry {
    session: Session,
    busy: bool,
    touched_ms: i64,
    /// With a shared store: the token of this process's lease in the database.
    lease: Option<String>,
}

/// How long a lease in a shared store lasts: a replica that died writing a
/// chunk holds its session no longer than this.
const LEASE_MS: i64 = 10 * 60 * 1000;

/// The actor.
pub struct UploadSessions {
    sessions: HashMap<UploadId, Entry>,
    meta: Metadata,
    store: BlobStore,
    /// Sessions that end without a blob release their quota reservation.
    quotas: std::sync::Arc<Quotas>,
    ttl: Duration,
    sweep_every: Duration,
}

impl UploadSessions {
    pub fn new(meta: Metadata, store: BlobStore, quotas: std::sync::Arc<Quotas>, ttl: Duration, sweep_every: Duration) -> Self {
        UploadSessions { sessions: HashMap::new(), meta, store, quotas, ttl, sweep_every }
    }
}

impl Actor for UploadSessions {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.notify(Sweep);
        ctx.run_interval(self.sweep_every, |_, ctx| ctx.notify(Sweep));
    }
}

fn unknown(id: &UploadId) -> RegistryError {
    RegistryError::new(ErrorCode::BlobUploadUnknown).with_detail(format!("upload {id} is unknown or expired"))
}

/// Create a session for `repo` whose digest will use `algorithm`'s hasher.
pub struct Create {
    pub repo: RepoName,
    pub digester: Digester,
    /// The user opening it, and how many sessions a user may have open.
    pub owner: String,
    pub max_per_owner: usize,
}
impl Message for Create {
    type Result = Result<UploadId, RegistryError>;
}

impl Handler<Create> for UploadSessions {
    type Result = ResponseActFuture<Self, Result<UploadId, RegistryError>>;

    fn handle(&mut self, msg: Create, _: &mut Context<Self>) -> Self::Result {
        // One user cannot hold the store's staging space and session records.
        let open = self.sessions.values().filter(|e| e.session.owner.as_deref() == Some(msg.owner.as_str())).count();
        if open >= msg.max_per_owner {
            let e = RegistryError::new(ErrorCode::TooManyRequests).with_detail(format!(
                "{open} upload sessions open (registry.max_uploads_per_user); finish or cancel some, or wait for idle ones to expire"
            ));
            return Box::pin(fut::ready(Err(e)));
        }
        let session = Session {
            id: UploadId::random(),
            repo: msg.repo,
            offset: 0,
            digester: msg.digester,
            staging: Staging::default(),
            started_ms: now_ms(),
            owner: Some(msg.owner),
        };
        let id = session.id;
        let row = session.to_row();
        self.sessions.insert(id, Entry { session, busy: true, touched_ms: now_ms(), lease: None });
        let meta = self.meta.clone();
        Box::pin(async move { meta.put_upload(&row).await }.into_actor(self).map(move |res, act, _| match res {
            Ok(()) => {
                if let Some(e) = act.sessions.get_mut(&id) {
                    e.busy = false;
                }
                Ok(id)
            }
            Err(e) => {
                act.sessions.remove(&id);
                Err(internal("persist upload session", e))
            }
        }))
    }
}

/// Take the session for writing (or finishing): `None` while another request
/// holds it.
pub struct Lease {
    pub id: UploadId,
    pub repo: RepoName,
}
impl Message for Lease {
    type Result = Result<Option<Session>, RegistryError>;
}

/// How long a request waits for a session another request holds before it is
/// refused with [`busy`]. The holder is most often a request whose client went
/// away mid-chunk and is still being wound up, while the client already resumes.
pub const LEASE_WAIT: Duration = Duration::from_secs(3);

/// The refusal of a session another request is writing.
pub fn busy() -> RegistryError {
    RegistryError::new(ErrorCode::BlobUploadInvalid).with_status(416).with_detail("another request is writing to this upload")
}

impl UploadSessions {
    fn take(&mut self, id: &UploadId, repo: &RepoName) -> Result<Option<Session>, RegistryError> {
        let e = self.sessions.get_mut(id).ok_or_else(|| unknown(id))?;
        if &e.session.repo != repo {
            return Err(unknown(id));
        }
        if e.busy {
            return Ok(None);
        }
        e.busy = true;
        e.touched_ms = now_ms();
        Ok(Some(e.session.clone()))
    }
}

impl Handler<Lease> for UploadSessions {
    type Result = ResponseActFuture<Self, Result<Option<Session>, RegistryError>>;

    fn handle(&mut self, msg: Lease, _: &mut Context<Self>) -> Self::Result {
        if self.meta.is_shared() {
            return self.lease_shared(msg);
        }
        if self.sessions.contains_key(&msg.id) {
            let r = self.take(&msg.id, &msg.repo);
            return Box::pin(fut::ready(r));
        }
        // Not in memory: a session begun before a restart (or on another replica).
        let meta = self.meta.clone();
        let id = msg.id;
        Box::pin(async move { meta.get_upload(&id).await }.into_actor(self).map(move |res, act, _| {
            let row = res.map_err(|e| internal("load upload session", e))?.ok_or_else(|| unknown(&id))?;
            if let std::collections::hash_map::Entry::Vacant(slot) = act.sessions.entry(id) {
                let session = Session::from_row(row).ok_or_else(|| internal("decode upload session", id))?;
                slot.insert(Entry { session, busy: false, touched_ms: now_ms(), lease: None });
            }
            act.take(&id, &msg.repo)
        }))
    }
}

impl UploadSessions {
    /// A lease with a shared store: taken in the database (another replica may
    /// be writing the session, or have moved it on), with its state as stored.
    fn lease_shared(&mut self, msg: Lease) -> ResponseActFuture<Self, Result<Option<Session>, RegistryError>> {
        if self.sessions.get(&msg.id).is_some_and(|e| e.busy) {
            return Box::pin(fut::ready(self.take(&msg.id, &msg.repo)));
        }
        let (meta, id) = (self.meta.clone(), msg.id);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let now = now_ms();
        let t = token.clone();
        Box::pin(
            async move {
                match meta.lease_upload(&id, &t, now, now + LEASE_MS).await {
                    Ok(Some(row)) => Ok(Some(row)),
                    // Held by another writer, or gone.
                    Ok(None) => match meta.get_upload(&id).await {
                        Ok(Some(_)) => Ok(None),
                        Ok(None) => Err(unknown(&id)),
                        Err(e) => Err(internal("load upload session", e)),
                    },
                    Err(e) => Err(internal("lease upload session", e)),
                }
            }
            .into_actor(self)
            .map(move |res, act, _| {
                let Some(row) = res? else {
                    return Ok(None);
                };
                let session = Session::from_row(row).ok_or_else(|| internal("decode upload session", id))?;
                if session.repo != msg.repo {
                    // Not this repository's: the lease goes back untouched.
                    let meta = act.meta.clone();
                    actix::spawn(async move {
                        let _ = meta.release_upload(&id, &token, None).await;
                    });
                    return Err(unknown(&id));
                }
                act.sessions.insert(id, Entry { session: session.clone(), busy: true, touched_ms: now_ms(), lease: Some(token) });
                Ok(Some(session))
            }),
        )
    }
}

/// Give the lease back, with the session's new state if the chunk was written.
pub struct Release {
    pub id: UploadId,
    pub updated: Option<Session>,
}
impl Message for Release {
    type Result = Result<(), RegistryError>;
}

impl Handler<Release> for UploadSessions {
    type Result = ResponseActFuture<Self, Result<(), RegistryError>>;

    fn handle(&mut self, msg: Release, _: &mut Context<Self>) -> Self::Result {
        let id = msg.id;
        if let Some(token) = self.sessions.get_mut(&id).and_then(|e| e.lease.take()) {
            // A lease in a shared store: given back there, with the new state.
            let row = msg.updated.as_ref().map(Session::to_row);
            if let Some(e) = self.sessions.get_mut(&id) {
                if let Some(updated) = msg.updated {
                    e.session = updated;
                }
                e.touched_ms = now_ms();
            }
            let meta = self.meta.clone();
            return Box::pin(async move { meta.release_upload(&id, &token, row.as_ref()).await }.into_actor(self).map(
                move |res, act, _| {
                    if let Some(e) = act.sessions.get_mut(&id) {
                        e.busy = false;
                    }
                    match res {
                        Ok(true) => Ok(()),
                        Ok(false) => {
                            act.sessions.remove(&id);
                            Err(RegistryError::new(ErrorCode::BlobUploadInvalid)
                                .with_status(416)
                                .with_detail("the upload's lease ran out and another request took it"))
                        }
                        Err(e) => Err(internal("persist upload session", e)),
                    }
                },
            ));
        }
        let Some(updated) = msg.updated else {
            if let Some(e) = self.sessions.get_mut(&id) {
                e.busy = false;
            }
            return Box::pin(fut::ready(Ok(())));
        };
        let row = updated.to_row();
        if let Some(e) = self.sessions.get_mut(&id) {
            e.session = updated;
            e.touched_ms = now_ms();
        }
        let meta = self.meta.clone();
        // The lease is held until the new state is durable, so writes stay ordered.
        Box::pin(async move { meta.put_upload(&row).await }.into_actor(self).map(move |res, act, _| {
            if let Some(e) = act.sessions.get_mut(&id) {
                e.busy = false;
            }
            res.map_err(|e| internal("persist upload session", e))
        }))
    }
}

/// How many sessions this process holds (for metrics).
pub struct Open;
impl Message for Open {
    type Result = usize;
}

impl Handler<Open> for UploadSessions {
    type Result = usize;

    fn handle(&mut self, _: Open, _: &mut Context<Self>) -> usize {
        self.sessions.len()
    }
}

/// The committed offset of a session (for the status endpoint).
pub struct Status {
    pub id: UploadId,
    pub repo: RepoName,
}
impl Message for Status {
    type Result = Result<u64, RegistryError>;
}

impl Handler<Status> for UploadSessions {
    type Result = ResponseActFuture<Self, Result<u64, RegistryError>>;

    fn handle(&mut self, msg: Status, _: &mut Context<Self>) -> Self::Result {
        // (With a shared store another replica may have moved it on: read it.)
        if let Some(e) = self.sessions.get(&msg.id).filter(|_| !self.meta.is_shared()) {
            let r = if e.session.repo == msg.repo { Ok(e.session.offset) } else { Err(unknown(&msg.id)) };
            return Box::pin(fut::ready(r));
        }
        let meta = self.meta.clone();
        Box::pin(async move { meta.get_upload(&msg.id).await }.into_actor(self).map(move |res, _, _| {
            match res.map_err(|e| internal("load upload session", e))? {
                Some(row) if row.repo == msg.repo => Ok(row.offset),
                _ => Err(unknown(&msg.id)),
            }
        }))
    }
}

/// End a session: after a successful commit (`Finish`) or on cancel. Removes the
/// persisted record and, on cancel, the staging data.
pub struct End {
    pub id: UploadId,
    pub repo: RepoName,
    /// True when the caller does not hold the lease (DELETE by the client).
    pub cancel: bool,
    /// True after a successful commit, which already removed the staging data and
    /// (with the blob link) the persisted record: only the memory entry is left.
    pub committed: bool,
}
impl Message for End {
    type Result = Result<(), RegistryError>;
}

impl Handler<End> for UploadSessions {
    type Result = ResponseActFuture<Self, Result<(), RegistryError>>;

    fn handle(&mut self, msg: End, _: &mut Context<Self>) -> Self::Result {
        let id = msg.id;
        if let Some(e) = self.sessions.get(&id) {
            if e.session.repo != msg.repo {
                return Box::pin(fut::ready(Err(unknown(&id))));
            }
            if msg.cancel && e.busy {
                return Box::pin(fut::ready(Err(RegistryError::new(ErrorCode::BlobUploadInvalid).with_detail("upload is in progress"))));
            }
        }
        let known_here = self.sessions.remove(&id).is_some();
        if msg.committed {
            return Box::pin(fut::ready(Ok(())));
        }
        let (meta, store, quotas) = (self.meta.clone(), self.store.clone(), self.quotas.clone());
        let repo = msg.repo;
        Box::pin(
            async move {
                if !known_here {
                    match meta.get_upload(&id).await.map_err(|e| internal("load upload session", e))? {
                        Some(row) if row.repo == repo => {}
                        _ => return Err(unknown(&id)),
                    }
                }
                meta.delete_upload(&id).await.map_err(|e| internal("delete upload session", e))?;
                quotas.release_upload(&repo, id).await;
                store.delete_upload(&id).await.map_err(|e| internal("delete upload staging", e))?;
                Ok(())
            }
            .into_actor(self),
        )
    }
}

/// Expire sessions idle longer than the TTL, and staging data no session owns.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sweep;

impl Handler<Sweep> for UploadSessions {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Sweep, _: &mut Context<Self>) -> Self::Result {
        let cutoff = now_ms() - self.ttl.as_millis() as i64;
        let mut expired_here: Vec<(UploadId, RepoName)> =
            self.sessions.iter().filter(|(_, e)| !e.busy && e.touched_ms < cutoff).map(|(id, e)| (*id, e.session.repo.clone())).collect();
        for (id, _) in &expired_here {
            self.sessions.remove(id);
        }
        // With a shared store another replica may have used a session this one
        // left idle: the database's time decides (idle here is only forgotten).
        if self.meta.is_shared() {
            expired_here.clear();
        }
        let live: std::collections::HashSet<UploadId> = self.sessions.keys().copied().collect();
        let (meta, store, quotas) = (self.meta.clone(), self.store.clone(), self.quotas.clone());
        Box::pin(
            async move {
                let mut expired = expired_here;
                match meta.stale_uploads(cutoff).await {
                    Ok(rows) => expired.extend(rows.into_iter().map(|r| (r.id, r.repo)).filter(|(id, _)| !live.contains(id))),
                    Err(e) => tracing::warn!(error = %e, "listing stale uploads failed"),
                }
                expired.sort_by_key(|(id, _)| *id);
                expired.dedup_by_key(|(id, _)| *id);
                for (id, repo) in &expired {
                    if let Err(e) = meta.delete_upload(id).await {
                        tracing::warn!(upload = %id, error = %e, "expiring upload session failed");
                        continue;
                    }
                    quotas.release_upload(repo, *id).await;
                    if let Err(e) = store.delete_upload(id).await {
                        tracing::warn!(upload = %id, error = %e, "removing upload staging failed");
                    }
                }
                // Staging that no persisted session owns (a crash between steps). List
                // staging first: a session's record is durable before its first byte is
                // staged, so anything staged now has a record by the time we read them.
                let staged = store.staged_uploads().await.unwrap_or_default();
                let owned: std::collections::HashSet<UploadId> = match meta.upload_ids().await {
                    Ok(ids) => ids.into_iter().collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, "listing upload sessions failed");
                        return;
                    }
                };
                let mut orphans = 0;
                for id in staged.into_iter().filter(|id| !owned.contains(id) && !live.contains(id)) {
                    if store.delete_upload(&id).await.is_ok() {
                        orphans += 1;
                    }
                }
                if !expired.is_empty() || orphans > 0 {
                    tracing::info!(expired = expired.len(), orphans, "upload sweep");
                }
            }
            .into_actor(self),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(hex_decode(&hex_encode(&b)).unwrap(), b);
        assert!(hex_decode("abc").is_none());
        assert!(hex_decode("zz").is_none());
    }
}
