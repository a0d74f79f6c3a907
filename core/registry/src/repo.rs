//! The repository actor: one per repository, it serializes every change to that
//! repository's manifests, tags and blob links. A change is validated against the
//! index, written to metadata in one transaction, and only then applied to the
//! index, so concurrent pushes of one tag are atomic and readers never see a tag
//! whose manifest is not durable.

use std::sync::Arc;

use actix::prelude::*;
use berth_metadata::{LinkRow, ManifestRow, Metadata, OutboxRow, Removed, TagRow};
use berth_oci::{Digest, ErrorCode, RegistryError, RepoName, Tag, UploadId};
use berth_plugins::{EventKind, Platform};

use crate::index::{Index, ManifestEntry};
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
    /// Manifest commits waiting for the next group commit.
    queue: Vec<Queued>,
    flush_due: bool,
}

impl RepoActor {
    pub fn new(name: RepoName, meta: Metadata, index: Arc<Index>) -> RepoActor {
        RepoActor { name, meta, index, queue: Vec::new(), flush_due: false }
    }
}

impl Actor for RepoActor {
    type Context = Context<Self>;
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

/// One accepted commit of a group.
struct Accepted {
    row: ManifestRow,
    tag: Option<TagRow>,
    pinned: bool,
    quota: Option<Ticket>,
    /// The events announcing it, and where to report their fate.
    outbox: Vec<OutboxRow>,
    announce: Option<Announce>,
    reply: tokio::sync::oneshot::Sender<Result<(), RegistryError>>,
}

impl Handler<Flush> for RepoActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        self.flush_due = false;
        let queue = std::mem::take(&mut self.queue);
        // A repository enters the index with its first commit: a refused push
        // to a new name leaves nothing behind.
        let state = self.index.repo(&self.name).unwrap_or_default();
        let mut accepted: Vec<Accepted> = Vec::with_capacity(queue.len());
        {
            let s = state.read().unwrap();
            // Manifests committed earlier in this group count as present for later ones.
            let mut earlier: std::collections::HashMap<Digest, u64> = std::collections::HashMap::new();
            for Queued { msg, reply } in queue {
                if let Err(e) = check_references(&self.name, &s, &msg.required_blobs, &msg.required_manifests, |d| earlier.contains_key(d))
                {
                    let _ = reply.send(Err(e));
                    continue;
                }
                // What the image takes: its blobs (each once) and its children's content.
                let mut row = msg.row;
                let blobs: std::collections::HashSet<&Digest> = msg.required_blobs.iter().collect();
                let children: std::collections::HashSet<&Digest> = msg.required_manifests.iter().collect();
                row.content_size = row.size
                    + blobs.iter().filter_map(|d| s.blobs.get(*d)).sum::<u64>()
                    + children
                        .iter()
                        .filter_map(|d| {
                            s.manifests.get(*d).map(|m| m.row.content_size.max(m.row.size)).or_else(|| earlier.get(*d).copied())
                        })
                        .sum::<u64>();
                earlier.insert(row.digest.clone(), row.content_size);
                let tag = msg.tag.map(|t| TagRow { repo: self.name.clone(), name: t, digest: row.digest.clone(), updated_ms: now_ms() });
                let outbox = msg.announce.as_ref().map_or_else(Vec::new, |a| {
                    let mut rows = a.rows(a.repository_created(&self.name), true);
                    rows.extend(a.rows(
                        EventKind::ManifestPushed {
                            tenant: a.tenant(),
                            repository: self.name.to_string(),
                            tag: tag.as_ref().map(|t| t.name.to_string()),
                            digest: row.digest.to_string(),
                            media_type: row.media_type.clone(),
                            size: row.size,
                            content_size: row.content_size,
                            platforms: msg.platforms,
                            subject: row.subject.as_ref().map(|d| d.to_string()),
                            artifact_type: row.artifact_type.clone(),
                            pusher: a.by.clone(),
                        },
                        false,
                    ));
                    rows
                });
                accepted.push(Accepted { row, tag, pinned: msg.pinned, quota: msg.quota, outbox, announce: msg.announce, reply });
            }
        }
        let (meta, index, name) = (self.meta.clone(), self.index.clone(), self.name.clone());
        AtomicResponse::new(Box::pin(
            async move {
                if accepted.is_empty() {
                    return;
                }
                let batch: Vec<(ManifestRow, Option<TagRow>, bool)> =
                    accepted.iter().map(|a| (a.row.clone(), a.tag.clone(), a.pinned)).collect();
                let outboxes: Vec<Vec<OutboxRow>> = accepted.iter().map(|a| a.outbox.clone()).collect();
                let outcomes: Vec<Result<u64, RegistryError>> = match meta.commit_manifests(&batch, &outboxes).await {
                    Ok(added) => added.into_iter().map(Ok).collect(),
                    // One commit's failure must not fail the others: each alone.
                    Err(_) if batch.len() > 1 => {
                        let mut out = Vec::with_capacity(batch.len());
                        for ((row, tag, pinned), outbox) in batch.iter().zip(&outboxes) {
                            out.push(
                                meta.commit_manifest(row, tag.as_ref(), *pinned, outbox).await.map_err(|e| internal("commit manifest", e)),
                            );
                        }
                        out
                    }
                    Err(e) => vec![Err(internal("commit manifest", e))],
                };
                let state = if outcomes.iter().any(Result::is_ok) { index.repo_or_create(&name) } else { state };
                let mut s = state.write().unwrap();
                for (a, outcome) in accepted.into_iter().zip(outcomes) {
                    if let Some(an) = &a.announce {
                        an.committed(&a.outbox, outcome.is_ok());
                    }
                    match outcome {
                        Ok(added) => {
                            settle(a.quota, added as i64);
                            s.manifests
                                .entry(a.row.digest.clone())
                                .or_insert(ManifestEntry { row: crate::index::resident(a.row), bytes: None });
                            if let Some(t) = a.tag {
                                s.tags.insert(t.name, crate::index::TagEntry { digest: t.digest, updated_ms: t.updated_ms });
                            }
                            let _ = a.reply.send(Ok(()));
                        }
                        Err(e) => {
                            let _ = a.reply.send(Err(e));
                        }
                    }
                }
            }
            .into_actor(self),
        ))
    }
}

/// Delete a manifest and the tags pointing at it (settling the tenant's ticket
/// with the bytes freed).
pub struct DeleteManifest(pub Digest, pub Option<Ticket>, pub Option<Announce>);
impl Message for DeleteManifest {
    type Result = Result<(), RegistryError>;
}

impl Handler<DeleteManifest> for RepoActor {
    type Result = AtomicResponse<Self, Result<(), RegistryError>>;

    fn handle(&mut self, msg: DeleteManifest, _: &mut Context<Self>) -> Self::Result {
        let (digest, quota, announce) = (msg.0, msg.1, msg.2);
        let Some(state) = self.index.repo(&self.name) else {
            return AtomicResponse::new(Box::pin(fut::ready(Err(manifest_unknown(&digest)))));
        };
        if !state.read().unwrap().manifests.contains_key(&digest) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(manifest_unknown(&digest)))));
        }
        let outbox = announce.as_ref().map_or_else(Vec::new, |a| {
            let mut tags: Vec<String> =
                state.read().unwrap().tags.iter().filter(|(_, e)| e.digest == digest).map(|(t, _)| t.to_string()).collect();
            tags.sort();
            let kind = EventKind::ManifestDeleted {
                tenant: a.tenant(),
                repository: self.name.to_string(),
                digest: digest.to_string(),
                tags,
                by: a.by.clone(),
            };
            a.rows(kind, false)
        });
        let (meta, repo, index) = (self.meta.clone(), self.name.clone(), self.index.clone());
        let d = digest.clone();
        AtomicResponse::new(Box::pin(
            async move {
                reported(
                    announce.as_ref(),
                    &outbox,
                    meta.delete_manifest(&repo, &d, &outbox).await.map_err(|e| internal("delete manifest", e)),
                )
            }
            .into_actor(self)
            .map(move |res, _, _| {
                settle(quota, -(res? as i64));
                let mut s = state.write().unwrap();
                if let Some(e) = s.manifests.remove(&digest) {
                    if let Some(b) = e.bytes {
                        index.forget_cached(b.len());
                    }
                }
                s.tags.retain(|_, e| e.digest != digest);
                Ok(())
            }),
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
        let state = self.index.repo(&self.name);
        let pointed = state.as_ref().and_then(|s| s.read().unwrap().tag(&tag).cloned());
        let Some(pointed) = pointed else {
            return AtomicResponse::new(Box::pin(fut::ready(Err(
                RegistryError::new(ErrorCode::ManifestUnknown).with_detail(format!("tag {tag} is unknown"))
            ))));
        };
        let state = state.expect("a tag implies its repository");
        let outbox = announce.as_ref().map_or_else(Vec::new, |a| {
            let kind = EventKind::TagDeleted {
                tenant: a.tenant(),
                repository: self.name.to_string(),
                tag: tag.to_string(),
                digest: pointed.to_string(),
                by: a.by.clone(),
            };
            a.rows(kind, false)
        });
        let (meta, repo) = (self.meta.clone(), self.name.clone());
        let t = tag.clone();
        AtomicResponse::new(Box::pin(
            async move {
                reported(announce.as_ref(), &outbox, meta.delete_tag(&repo, &t, &outbox).await.map_err(|e| internal("delete tag", e)))
            }
            .into_actor(self)
            .map(move |res, _, _| {
                res?;
                state.write().unwrap().tags.remove(&tag);
                Ok(())
            }),
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
        let state = self.index.repo(&self.name).unwrap_or_default();
        if msg.size.is_none() && !state.read().unwrap().blobs.contains_key(&msg.digest) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(
                RegistryError::new(ErrorCode::BlobUnknown).with_detail(msg.digest.to_string())
            ))));
        }
        // A mount of a blob the repository has: nothing to write. (An upload goes
        // on to metadata even then: its session record and pin go, and the link's
        // time is renewed for the collector.)
        if msg.size.is_some() && msg.ends_upload.is_none() && !msg.pinned && state.read().unwrap().blobs.contains_key(&msg.digest) {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        }
        let pinned = msg.pinned;
        let (ends_upload, quota, announce) = (msg.ends_upload, msg.quota, msg.announce);
        let (meta, repo) = (self.meta.clone(), self.name.clone());
        let (digest, size) = (msg.digest, msg.size);
        // A link announces the repository if it creates it, and an upload's blob.
        let outbox = match (&announce, size) {
            (Some(a), Some(size)) => {
                let mut rows = a.rows(a.repository_created(&self.name), true);
                if ends_upload.is_some() {
                    let kind = EventKind::BlobUploaded {
                        tenant: a.tenant(),
                        repository: self.name.to_string(),
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
        let d = digest.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let res = match size {
                    Some(size) => {
                        meta.link_blob(&LinkRow { repo, digest: d, size }, ends_upload.as_ref(), pinned, &outbox).await.map(|b| b as i64)
                    }
                    None => meta.unlink_blob(&repo, &d).await.map(|b| -(b as i64)),
                };
                reported(announce.as_ref(), &outbox, res).map_err(|e| match e {
                    berth_metadata::MetadataError::Collecting => {
                        RegistryError::new(ErrorCode::Unavailable).with_detail("the blob is being collected; push it again")
                    }
                    e => internal("blob link", e),
                })
            }
            .into_actor(self)
            .map(move |res, act: &mut RepoActor, _| {
                settle(quota, res?);
                // A link creates the repository (an unlink found it).
                let state = if size.is_some() { act.index.repo_or_create(&act.name) } else { state };
                let mut s = state.write().unwrap();
                match size {
                    Some(size) => s.blobs.insert(digest, size),
                    None => s.blobs.remove(&digest),
                };
                Ok(())
            }),
        ))
    }
}

/// Delete the whole repository: its tags, manifests and blob links, in one
/// metadata transaction, then its index entry (settling the tenant's ticket with
/// the bytes freed).
pub struct DeleteRepo(pub Option<Ticket>, pub Option<Announce>);
impl Message for DeleteRepo {
    type Result = Result<Removed, RegistryError>;
}

impl Handler<DeleteRepo> for RepoActor {
    type Result = AtomicResponse<Self, Result<Removed, RegistryError>>;

    fn handle(&mut self, msg: DeleteRepo, _: &mut Context<Self>) -> Self::Result {
        let (quota, announce) = (msg.0, msg.1);
        let outbox = announce.as_ref().map_or_else(Vec::new, |a| {
            a.rows(EventKind::RepositoryDeleted { tenant: a.tenant(), repository: self.name.to_string(), by: a.by.clone() }, false)
        });
        let (meta, repo, index) = (self.meta.clone(), self.name.clone(), self.index.clone());
        let name = repo.clone();
        AtomicResponse::new(Box::pin(
            async move {
                reported(announce.as_ref(), &outbox, meta.delete_repo(&repo, &outbox).await.map_err(|e| internal("delete repository", e)))
            }
            .into_actor(self)
            .map(move |res, _, _| {
                let removed = res?;
                settle(quota, -(removed.freed_bytes as i64));
                index.remove_repo(&name);
                Ok(removed)
            }),
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
        let Some(state) = self.index.repo(&self.name) else {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(None))));
        };
        // Manifest commits run in this actor too, so what the index holds now is
        // every manifest this repository has.
        let needed = {
            let s = state.read().unwrap();
            !s.blobs.contains_key(&msg.digest) || s.manifests.values().any(|m| m.row.refs.as_ref().is_none_or(|r| r.contains(&msg.digest)))
        };
        if needed || self.index.touched_since(&self.name, &msg.digest, msg.cutoff) {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(None))));
        }
        let (meta, repo, quota) = (self.meta.clone(), self.name.clone(), msg.quota);
        let (digest, cutoff) = (msg.digest, msg.cutoff);
        let d = digest.clone();
        AtomicResponse::new(Box::pin(
            async move { meta.unlink_blob_if_idle(&repo, &d, cutoff).await.map_err(|e| internal("collect link", e)) }.into_actor(self).map(
                move |res, _, _| {
                    let freed = res?;
                    if let Some(freed) = freed {
                        settle(quota, -(freed as i64));
                        state.write().unwrap().blobs.remove(&digest);
                    }
                    Ok(freed)
                },
            ),
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
