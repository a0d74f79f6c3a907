//! The repository actor: one per repository, it serializes every change to that
//! repository's manifests, tags and blob links. A change is validated against the
//! index, written to metadata in one transaction, and only then applied to the
//! index, so concurrent pushes of one tag are atomic and readers never see a tag
//! whose manifest is not durable.

use std::sync::Arc;

use actix::prelude::*;
use berth_metadata::{Guard, LinkRow, ManifestRow, Metadata, MetadataError, OutboxRow, Removed, TagRow};
use berth_oci::{Digest, ErrorCode, RegistryError, RepoName, Tag, UploadId};
use berth_plugins::{EventKind, Platform};

use crate::coherence::Coherence;
use crate::index::{Handle, Index, ManifestEntry};
use crate::plugins::{reported, Announce};
use crate::quota::Ticket;
use crate::{internal, now_ms};

/// Settle a quota reservation with what the transaction added (or freed).
fn settle(quota: Option<Ticket>, delta: i64) {
    if let Some(t) = quota {
        t.settle(delta);
    }
}

pub struct RepoActor {
    pub name: RepoName,
    pub meta: Metadata,
    pub index: Arc<Index>,
    coherence: Arc<Coherence>,
    /// Manifest commits waiting for the next group commit.
    queue: Vec<Queued>,
    flush_due: bool,
}

impl RepoActor {
    pub(crate) fn new(name: RepoName, meta: Metadata, index: Arc<Index>, coherence: Arc<Coherence>) -> RepoActor {
        RepoActor { name, meta, index, coherence, queue: Vec::new(), flush_due: false }
    }
}

impl Actor for RepoActor {
    type Context = Context<Self>;
}

/// How many times a change is tried when other replicas keep moving the
/// repository between its read and its write.
const TRIES: usize = 8;

/// The repository's state before a change is checked against it (`None`: it
/// does not exist): with a shared store, as the database holds it now; after
/// a refused try (`attempt` > 0), read again whatever the store; loaded if
/// not held.
async fn current(co: &Arc<Coherence>, name: &RepoName, attempt: usize) -> Result<Option<Handle>, RegistryError> {
    if attempt > 0 {
        return co.reload(name).await;
    }
    co.fresh(&[name], false).await?;
    co.resident(name).await
}

/// Make the repository's state held (for a read of a repository whose state
/// was not): answers it, `None` if the repository does not exist.
pub struct Load;
impl Message for Load {
    type Result = Result<Option<Handle>, RegistryError>;
}

impl Handler<Load> for RepoActor {
    type Result = AtomicResponse<Self, Result<Option<Handle>, RegistryError>>;

    fn handle(&mut self, _: Load, _: &mut Context<Self>) -> Self::Result {
        let (name, co) = (self.name.clone(), self.coherence.clone());
        AtomicResponse::new(Box::pin(async move { co.resident(&name).await }.into_actor(self)))
    }
}

/// What a change answers when its tries ran out.
fn busy(name: &RepoName) -> RegistryError {
    RegistryError::new(ErrorCode::Unavailable).with_detail(format!("repository {name} kept changing through other replicas; try again"))
}

/// The guard of a change to the repository as `state` holds it.
fn guard_of(state: &std::sync::RwLock<crate::index::RepoState>) -> Guard {
    Guard::at(&state.read().unwrap().version)
}

/// Store a manifest (already parsed, its bytes already stored) and move a tag.
pub struct CommitManifest {
    pub row: ManifestRow,
    pub tag: Option<Tag>,
    pub required_blobs: Vec<Digest>,
    pub required_manifests: Vec<Digest>,
    /// The tenant's reservation for the manifest's bytes, settled here.
    pub quota: Option<Ticket>,
    /// Its bytes were pinned before they were stored; the commit releases the pin.
    pub pinned: bool,
    /// The platforms of an index (for the event announcing the push).
    pub platforms: Vec<Platform>,
    pub announce: Option<Announce>,
}
impl Message for CommitManifest {
    type Result = Result<(), RegistryError>;
}

/// A commit waiting for the next group commit, with where its answer goes.
pub(crate) struct Queued {
    msg: CommitManifest,
    reply: tokio::sync::oneshot::Sender<Result<(), RegistryError>>,
}

impl Handler<CommitManifest> for RepoActor {
    type Result = ResponseFuture<Result<(), RegistryError>>;

    /// Queue the commit; the first one queued schedules a group commit, which
    /// runs after the messages already waiting in the mailbox (so concurrent
    /// pushes to one repository share one transaction).
    fn handle(&mut self, msg: CommitManifest, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue.push(Queued { msg, reply });
        if !self.flush_due {
            self.flush_due = true;
            ctx.notify(Flush);
        }
        Box::pin(async move { answer.await.unwrap_or_else(|_| Err(internal("commit manifest", "the repository actor stopped"))) })
    }
}

/// Commit every queued manifest in one transaction.
#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

/// What one accepted commit of a group writes.
struct Plan {
    row: ManifestRow,
    tag: Option<TagRow>,
    /// The events announcing it.
    outbox: Vec<OutboxRow>,
}

/// Check each queued commit against the repository's state: refused ones are
/// answered; the others come back with what they write.
fn plan(name: &RepoName, s: &crate::index::RepoState, queue: Vec<Queued>) -> Vec<(Queued, Plan)> {
    // Manifests committed earlier in this group count as present for later ones.
    let mut earlier: std::collections::HashMap<Digest, u64> = std::collections::HashMap::new();
    let mut accepted = Vec::with_capacity(queue.len());
    for q in queue {
        let msg = &q.msg;
        if let Err(e) = check_references(name, s, &msg.required_blobs, &msg.required_manifests, |d| earlier.contains_key(d)) {
            let _ = q.reply.send(Err(e));
            continue;
        }
        // What the image takes: its blobs (each once) and its children's content.
        let mut row = msg.row.clone();
        let blobs: std::collections::HashSet<&Digest> = msg.required_blobs.iter().collect();
        let children: std::collections::HashSet<&Digest> = msg.required_manifests.iter().collect();
        row.content_size = row.size
            + blobs.iter().filter_map(|d| s.blobs.get(*d)).sum::<u64>()
            + children
                .iter()
                .filter_map(|d| s.manifests.get(*d).map(|m| m.row.content_size.max(m.row.size)).or_else(|| earlier.get(*d).copied()))
                .sum::<u64>();
        earlier.insert(row.digest.clone(), row.content_size);
        let tag = msg.tag.clone().map(|t| TagRow { repo: name.clone(), name: t, digest: row.digest.clone(), updated_ms: now_ms() });
        let outbox = msg.announce.as_ref().map_or_else(Vec::new, |a| {
            let mut rows = a.rows(a.repository_created(name), true);
            rows.extend(a.rows(
                EventKind::ManifestPushed {
                    tenant: a.tenant(),
                    repository: name.to_string(),
                    tag: tag.as_ref().map(|t| t.name.to_string()),
                    digest: row.digest.to_string(),
                    media_type: row.media_type.clone(),
                    size: row.size,
                    content_size: row.content_size,
                    platforms: msg.platforms.clone(),
                    subject: row.subject.as_ref().map(|d| d.to_string()),
                    artifact_type: row.artifact_type.clone(),
                    pusher: a.by.clone(),
                },
                false,
            ));
            rows
        });
        accepted.push((q, Plan { row, tag, outbox }));
    }
    accepted
}

impl Handler<Flush> for RepoActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        self.flush_due = false;
        let mut queue = std::mem::take(&mut self.queue);
        let (meta, index, name, co) = (self.meta.clone(), self.index.clone(), self.name.clone(), self.coherence.clone());
        AtomicResponse::new(Box::pin(
            async move {
                for attempt in 0..TRIES {
                    // A repository enters the index with its first commit: a
                    // refused push to a new name leaves nothing behind.
                    let state = match current(&co, &name, attempt).await {
                        Ok(state) => state.unwrap_or_default(),
                        Err(e) => {
                            for q in queue {
                                let _ = q.reply.send(Err(e.clone()));
                            }
                            return;
                        }
                    };
                    let accepted = plan(&name, &state.read().unwrap(), queue);
                    if accepted.is_empty() {
                        return;
                    }
                    let mut guard = guard_of(&state);
                    let batch: Vec<(ManifestRow, Option<TagRow>, bool)> =
                        accepted.iter().map(|(q, p)| (p.row.clone(), p.tag.clone(), q.msg.pinned)).collect();
                    let outboxes: Vec<Vec<OutboxRow>> = accepted.iter().map(|(_, p)| p.outbox.clone()).collect();
                    let outcomes: Vec<Result<u64, RegistryError>> = match meta.commit_manifests(&guard, &batch, &outboxes).await {
                        Ok(added) => added.into_iter().map(Ok).collect(),
                        Err(MetadataError::Stale) => {
                            // Another replica moved the repository: check again on what it holds now.
                            for (q, p) in &accepted {
                                if let Some(a) = &q.msg.announce {
                                    a.committed(&p.outbox, false);
                                }
                            }
                            queue = accepted.into_iter().map(|(q, _)| q).collect();
                            continue;
                        }
                        // One commit's failure must not fail the others: each alone.
                        Err(_) if batch.len() > 1 => {
                            let mut out = Vec::with_capacity(batch.len());
                            for ((row, tag, pinned), outbox) in batch.iter().zip(&outboxes) {
                                let next = Guard::at(guard.next());
                                let res = meta.commit_manifest(&guard, row, tag.as_ref(), *pinned, outbox).await;
                                if res.is_ok() {
                                    guard = next;
                                }
                                out.push(res.map_err(|e| match e {
                                    MetadataError::Stale => busy(&name),
                                    e => internal("commit manifest", e),
                                }));
                            }
                            out
                        }
                        Err(e) => vec![Err(internal("commit manifest", e))],
                    };
                    apply_commits(&index, &name, state, accepted, outcomes, &guard);
                    return;
                }
                for q in queue {
                    let _ = q.reply.send(Err(busy(&name)));
                }
            }
            .into_actor(self),
        ))
    }
}

/// Put what a group commit wrote into the index (its version: the one
/// `guard` was to leave, or for commits made one by one, the last one's)
/// and answer each commit.
fn apply_commits(
    index: &Index,
    name: &RepoName,
    state: Arc<std::sync::RwLock<crate::index::RepoState>>,
    accepted: Vec<(Queued, Plan)>,
    outcomes: Vec<Result<u64, RegistryError>>,
    guard: &Guard,
) {
    let any = outcomes.iter().any(Result::is_ok);
    let state = if any { index.repo_or_create(name) } else { state };
    let mut s = state.write().unwrap();
    if any {
        s.version = guard.next().to_owned();
    }
    for ((q, p), outcome) in accepted.into_iter().zip(outcomes) {
        if let Some(an) = &q.msg.announce {
            an.committed(&p.outbox, outcome.is_ok());
        }
        match outcome {
            Ok(added) => {
                settle(q.msg.quota, added as i64);
                s.manifests.entry(p.row.digest.clone()).or_insert(ManifestEntry { row: crate::index::resident(p.row), bytes: None });
                if let Some(t) = p.tag {
                    s.tags.insert(t.name, crate::index::TagEntry { digest: t.digest, updated_ms: t.updated_ms });
                }
                let _ = q.reply.send(Ok(()));
            }
            Err(e) => {
                let _ = q.reply.send(Err(e));
            }
        }
    }
    drop(s);
    index.changed(name);
}

/// Delete a manifest and the tags pointing at it (settling the tenant's ticket
/// with the bytes freed).
pub struct DeleteManifest(pub Digest, pub Option<Ticket>, pub Option<Announce>);
impl Message for DeleteManifest {
    type Result = Result<(), RegistryError>;
}

/// A stale write's events go back to their queues; the change is tried again.
fn retry<T>(announce: Option<&Announce>, outbox: &[OutboxRow], res: &Result<T, MetadataError>) -> bool {
    let stale = matches!(res, Err(MetadataError::Stale));
    if stale {
        if let Some(a) = announce {
            a.committed(outbox, false);
        }
    }
    stale
}

impl Handler<DeleteManifest> for RepoActor {
    type Result = AtomicResponse<Self, Result<(), RegistryError>>;

    fn handle(&mut self, msg: DeleteManifest, _: &mut Context<Self>) -> Self::Result {
        let (digest, quota, announce) = (msg.0, msg.1, msg.2);
        let (meta, name, index, co) = (self.meta.clone(), self.name.clone(), self.index.clone(), self.coherence.clone());
        AtomicResponse::new(Box::pin(
            async move {
                for attempt in 0..TRIES {
                    let state = current(&co, &name, attempt).await?.filter(|s| s.read().unwrap().manifests.contains_key(&digest));
                    let Some(state) = state else { return Err(manifest_unknown(&digest)) };
                    let outbox = announce.as_ref().map_or_else(Vec::new, |a| {
                        let mut tags: Vec<String> =
                            state.read().unwrap().tags.iter().filter(|(_, e)| e.digest == digest).map(|(t, _)| t.to_string()).collect();
                        tags.sort();
                        let kind = EventKind::ManifestDeleted {
                            tenant: a.tenant(),
                            repository: name.to_string(),
                            digest: digest.to_string(),
                            tags,
                            by: a.by.clone(),
                        };
                        a.rows(kind, false)
                    });
                    let guard = guard_of(&state);
                    let res = meta.delete_manifest(&guard, &name, &digest, &outbox).await;
                    if retry(announce.as_ref(), &outbox, &res) {
                        continue;
                    }
                    let freed = reported(announce.as_ref(), &outbox, res.map_err(|e| internal("delete manifest", e)))?;
                    settle(quota, -(freed as i64));
                    let mut s = state.write().unwrap();
                    if let Some(e) = s.manifests.remove(&digest) {
                        if let Some(b) = e.bytes {
                            index.forget_cached(b.len());
                        }
                    }
                    s.tags.retain(|_, e| e.digest != digest);
                    s.version = guard.next().to_owned();
                    drop(s);
                    index.changed(&name);
                    return Ok(());
                }
                Err(busy(&name))
            }
            .into_actor(self),
        ))
    }
}

fn manifest_unknown(d: &Digest) -> RegistryError {
    RegistryError::new(ErrorCode::ManifestUnknown).with_detail(format!("manifest {d} is unknown"))
}

/// Delete one tag (the manifest stays).
pub struct DeleteTag(pub Tag, pub Option<Announce>);
impl Message for DeleteTag {
    type Result = Result<(), RegistryError>;
}

impl Handler<DeleteTag> for RepoActor {
    type Result = AtomicResponse<Self, Result<(), RegistryError>>;

    fn handle(&mut self, msg: DeleteTag, _: &mut Context<Self>) -> Self::Result {
        let (tag, announce) = (msg.0, msg.1);
        let (meta, name, index, co) = (self.meta.clone(), self.name.clone(), self.index.clone(), self.coherence.clone());
        AtomicResponse::new(Box::pin(
            async move {
                for attempt in 0..TRIES {
                    let state = current(&co, &name, attempt).await?;
                    let pointed = state.as_ref().and_then(|s| s.read().unwrap().tag(&tag).cloned());
                    let (Some(state), Some(pointed)) = (state, pointed) else {
                        return Err(RegistryError::new(ErrorCode::ManifestUnknown).with_detail(format!("tag {tag} is unknown")));
                    };
                    let outbox = announce.as_ref().map_or_else(Vec::new, |a| {
                        let kind = EventKind::TagDeleted {
                            tenant: a.tenant(),
                            repository: name.to_string(),
                            tag: tag.to_string(),
                            digest: pointed.to_string(),
                            by: a.by.clone(),
                        };
                        a.rows(kind, false)
                    });
                    let guard = guard_of(&state);
                    let res = meta.delete_tag(&guard, &name, &tag, &outbox).await;
                    if retry(announce.as_ref(), &outbox, &res) {
                        continue;
                    }
                    reported(announce.as_ref(), &outbox, res.map_err(|e| internal("delete tag", e)))?;
                    let mut s = state.write().unwrap();
                    s.tags.remove(&tag);
                    s.version = guard.next().to_owned();
                    drop(s);
                    index.changed(&name);
                    return Ok(());
                }
                Err(busy(&name))
            }
            .into_actor(self),
        ))
    }
}

/// Link a verified, stored blob into the repository (or unlink it).
pub struct Link {
    pub digest: Digest,
    /// `Some(size)` to link, `None` to unlink.
    pub size: Option<u64>,
    /// The upload session this blob completes: its record is removed together with
    /// the link (one metadata transaction per uploaded blob).
    pub ends_upload: Option<UploadId>,
    /// The tenant's reservation, settled with the bytes the link added (or the
    /// unlink freed).
    pub quota: Option<Ticket>,
    /// The bytes were pinned before they were stored; the link releases the pin.
    pub pinned: bool,
    pub announce: Option<Announce>,
}
impl Message for Link {
    type Result = Result<(), RegistryError>;
}

impl Handler<Link> for RepoActor {
    type Result = AtomicResponse<Self, Result<(), RegistryError>>;

    fn handle(&mut self, msg: Link, _: &mut Context<Self>) -> Self::Result {
        let Link { digest, size, ends_upload, quota, pinned, announce } = msg;
        let (meta, name, index, co) = (self.meta.clone(), self.name.clone(), self.index.clone(), self.coherence.clone());
        AtomicResponse::new(Box::pin(
            async move {
                for attempt in 0..TRIES {
                    let state = current(&co, &name, attempt).await?.unwrap_or_default();
                    let linked = state.read().unwrap().blobs.contains_key(&digest);
                    if size.is_none() && !linked {
                        return Err(RegistryError::new(ErrorCode::BlobUnknown).with_detail(digest.to_string()));
                    }
                    // A mount of a blob the repository has: nothing to write. (An
                    // upload goes on to metadata even then: its session record and
                    // pin go, and the link's time is renewed for the collector.)
                    if size.is_some() && ends_upload.is_none() && !pinned && linked {
                        return Ok(());
                    }
                    // A link announces the repository if it creates it, and an upload's blob.
                    let outbox = match (&announce, size) {
                        (Some(a), Some(size)) => {
                            let mut rows = a.rows(a.repository_created(&name), true);
                            if ends_upload.is_some() {
                                let kind = EventKind::BlobUploaded {
                                    tenant: a.tenant(),
                                    repository: name.to_string(),
                                    digest: digest.to_string(),
                                    size,
                                    by: a.by.clone(),
                                };
                                rows.extend(a.rows(kind, false));
                            }
                            rows
                        }
                        _ => vec![],
                    };
                    let guard = guard_of(&state);
                    let res = match size {
                        Some(size) => meta
                            .link_blob(
                                &guard,
                                &LinkRow { repo: name.clone(), digest: digest.clone(), size },
                                ends_upload.as_ref(),
                                pinned,
                                &outbox,
                            )
                            .await
                            .map(|b| b as i64),
                        None => meta.unlink_blob(&guard, &name, &digest).await.map(|b| -(b as i64)),
                    };
                    if retry(announce.as_ref(), &outbox, &res) {
                        continue;
                    }
                    let delta = reported(announce.as_ref(), &outbox, res).map_err(|e| match e {
                        MetadataError::Collecting => {
                            RegistryError::new(ErrorCode::Unavailable).with_detail("the blob is being collected; push it again")
                        }
                        e => internal("blob link", e),
                    })?;
                    settle(quota, delta);
                    // A link creates the repository (an unlink found it).
                    let state = if size.is_some() { index.repo_or_create(&name) } else { state };
                    let mut s = state.write().unwrap();
                    match size {
                        Some(size) => s.blobs.insert(digest, size),
                        None => s.blobs.remove(&digest),
                    };
                    s.version = guard.next().to_owned();
                    drop(s);
                    index.changed(&name);
                    return Ok(());
                }
                Err(busy(&name))
            }
            .into_actor(self),
        ))
    }
}

/// Delete the whole repository: hide it (one small metadata transaction,
/// after which no read finds it), drop its index entry, then remove its tags,
/// manifests and blob links in parts (settling the tenant's ticket with the
/// bytes freed). A sweep that fails part-way is finished by the periodic sweep
/// ([`crate::Registry`]'s "sweep" job); the answer then counts what was removed.
/// `None`: the repository does not exist.
pub struct DeleteRepo(pub Option<Ticket>, pub Option<Announce>);
impl Message for DeleteRepo {
    type Result = Result<Option<Removed>, RegistryError>;
}

impl Handler<DeleteRepo> for RepoActor {
    type Result = AtomicResponse<Self, Result<Option<Removed>, RegistryError>>;

    fn handle(&mut self, msg: DeleteRepo, _: &mut Context<Self>) -> Self::Result {
        let (quota, announce) = (msg.0, msg.1);
        let (meta, name, index) = (self.meta.clone(), self.name.clone(), self.index.clone());
        AtomicResponse::new(Box::pin(
            async move {
                // Whatever the repository holds goes, changed meanwhile or not.
                let outbox = announce.as_ref().map_or_else(Vec::new, |a| {
                    a.rows(EventKind::RepositoryDeleted { tenant: a.tenant(), repository: name.to_string(), by: a.by.clone() }, false)
                });
                let hidden = meta.hide_repo(&Guard::any(), &name, &outbox).await;
                // The event was written only if the repository was there.
                if let Some(a) = &announce {
                    a.committed(&outbox, matches!(hidden, Ok(true)));
                }
                let hidden = hidden.map_err(|e| internal("delete repository", e))?;
                index.remove_repo(&name);
                if !hidden {
                    return Ok(None);
                }
                let mut removed = Removed::default();
                if let Err(e) = meta.sweep_repo(&name, &mut removed).await {
                    tracing::warn!(repository = %name, error = %e, "removing a deleted repository's records stopped; the periodic sweep finishes it");
                }
                settle(quota, -(removed.freed_bytes as i64));
                Ok(Some(removed))
            }
            .into_actor(self),
        ))
    }
}

/// The collector: remove a blob link no manifest of the repository needs, if it
/// still is unneeded, untouched by clients and idle since before `cutoff`.
/// Answers the bytes freed from the tenant's usage, or `None` if it stays.
pub struct Collect {
    pub digest: Digest,
    pub cutoff: i64,
    pub quota: Option<Ticket>,
}
impl Message for Collect {
    type Result = Result<Option<u64>, RegistryError>;
}

impl Handler<Collect> for RepoActor {
    type Result = AtomicResponse<Self, Result<Option<u64>, RegistryError>>;

    fn handle(&mut self, msg: Collect, _: &mut Context<Self>) -> Self::Result {
        let Collect { digest, cutoff, quota } = msg;
        let (meta, name, index, co) = (self.meta.clone(), self.name.clone(), self.index.clone(), self.coherence.clone());
        AtomicResponse::new(Box::pin(
            async move {
                for attempt in 0..TRIES {
                    let Some(state) = current(&co, &name, attempt).await? else { return Ok(None) };
                    // Changes are checked against the database's version, so what
                    // the index holds now is every manifest this repository has.
                    let needed = {
                        let s = state.read().unwrap();
                        !s.blobs.contains_key(&digest)
                            || s.manifests.values().any(|m| m.row.refs.as_ref().is_none_or(|r| r.contains(&digest)))
                    };
                    if needed || index.touched_since(&name, &digest, cutoff) {
                        return Ok(None);
                    }
                    let guard = guard_of(&state);
                    let freed = match meta.unlink_blob_if_idle(&guard, &name, &digest, cutoff).await {
                        Err(MetadataError::Stale) => continue,
                        res => res.map_err(|e| internal("collect link", e))?,
                    };
                    if let Some(freed) = freed {
                        settle(quota, -(freed as i64));
                        let mut s = state.write().unwrap();
                        s.blobs.remove(&digest);
                        s.version = guard.next().to_owned();
                    }
                    return Ok(freed);
                }
                Err(busy(&name))
            }
            .into_actor(self),
        ))
    }
}

/// Every blob and child manifest a manifest names is in the repository (or,
/// for a child, `committing` with it): otherwise `MANIFEST_BLOB_UNKNOWN`.
/// Checked before the manifest's bytes are stored, and again at commit.
pub(crate) fn check_references(
    repo: &RepoName,
    s: &crate::index::RepoState,
    blobs: &[Digest],
    manifests: &[Digest],
    committing: impl Fn(&Digest) -> bool,
) -> Result<(), RegistryError> {
    let detail = if let Some(d) = blobs.iter().find(|d| !s.blobs.contains_key(d)) {
        format!("blob {d} is not in repository {repo}")
    } else if let Some(d) = manifests.iter().find(|d| !s.manifests.contains_key(d) && !committing(d)) {
        format!("manifest {d} is not in repository {repo}")
    } else {
        return Ok(());
    };
    Err(RegistryError::new(ErrorCode::ManifestBlobUnknown).with_detail(detail))
}
