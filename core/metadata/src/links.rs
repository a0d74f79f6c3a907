//! Blob links, grouped: the links that wait while one transaction runs go
//! together in the next.
//!
//! A pushed blob ends in a link (the repository may now serve it). On
//! SurrealDB 3 a link is a dozen record operations, and each transaction pays
//! a fixed part on top (its begin, commit and sync, and the statements that
//! only set variables), so many pushes at once spend about half their
//! metadata CPU on that part (docs/PERFORMANCE.md, "What a push costs in
//! metadata"). Here links queue in the process, and one task at a time takes
//! what has queued (up to [`GROUP`] links, at most one per repository) into
//! one transaction: alone when no other waits, so a lone push waits for
//! nothing.
//!
//! Each link in a group keeps its own condition (its repository's version,
//! [`Guard`]) and its own answer (the bytes its tenant's usage grew by). When
//! a group fails as a whole (one link's repository moved, its digest is being
//! collected, its repository is still being deleted, or anything else), each
//! of its links runs again alone, in its caller's task, and so gets the answer
//! it would have had without the group.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use berth_oci::UploadId;
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::usage::{REF_ADD, TENANT_OF};
use crate::{now_ms, outbox, returned, stripe_of, Guard, LinkRow, Metadata, MetadataError, OutboxRow, Result, REPO_GUARD, REPO_TOUCH};

/// The most links one transaction takes. Each statement of a transaction
/// costs more as its writes grow (SurrealDB copies the write set at each),
/// so larger groups gain less: per link, in CPU, 8 cost 0.49 ms, 16 cost
/// 0.54, 32 cost 0.64, alone 0.70 (`examples/txcost.rs`, 2026-12-07).
const GROUP: usize = 8;

/// One link to make.
#[derive(Clone)]
struct Link {
    guard: Guard,
    row: LinkRow,
    ends_upload: Option<UploadId>,
    pinned: bool,
    outbox: Vec<OutboxRow>,
}

/// A link that waits for its group, and where its answer goes: `None` when it
/// must run alone (its group failed as a whole).
struct Waiting {
    link: Link,
    answer: oneshot::Sender<Option<Result<u64>>>,
}

/// The links waiting in this process, and whether a task is running groups.
#[derive(Default)]
pub(crate) struct Queue {
    waiting: VecDeque<Waiting>,
    running: bool,
    /// Groups run, and the links they held, since the start.
    groups: u64,
    grouped: u64,
}

/// Ends a task's run of groups if the task is dropped before its queue is
/// empty (its runtime shutting down): the next link starts another, and those
/// that waited get no answer, so they run alone.
struct Running {
    queue: Arc<Mutex<Queue>>,
    armed: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.armed {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.running = false;
            q.waiting.clear();
        }
    }
}

impl Metadata {
    /// Link a verified blob into a repository (creating the repository record); when
    /// the blob is the result of an upload session, that session's record goes in
    /// the same transaction. Answers the bytes the owning tenant's usage grew by
    /// (0 when the link existed or another of its repositories holds the blob).
    ///
    /// `pinned`: the bytes were pinned ([`Metadata::pin_blob`]) before they were
    /// stored, and this link releases the pin. `outbox`: the events announcing it
    /// ([`outbox`]), written with it.
    ///
    /// Links made at once in this process share transactions (see the module's
    /// documentation); each still succeeds or fails on its own.
    pub async fn link_blob(
        &self,
        guard: &Guard,
        link: &LinkRow,
        ends_upload: Option<&UploadId>,
        pinned: bool,
        outbox: &[OutboxRow],
    ) -> Result<u64> {
        let link = Link { guard: guard.clone(), row: link.clone(), ends_upload: ends_upload.cloned(), pinned, outbox: outbox.to_vec() };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (answer, answered) = oneshot::channel();
            let start = {
                let mut q = self.links.lock().unwrap_or_else(|e| e.into_inner());
                q.waiting.push_back(Waiting { link: link.clone(), answer });
                !std::mem::replace(&mut q.running, true)
            };
            if start {
                let md = self.clone();
                runtime.spawn(async move { md.run_groups().await });
            }
            if let Ok(Some(res)) = answered.await {
                return res;
            }
        }
        self.after_sweep(&link.row.repo, || self.link_group(std::slice::from_ref(&link))).await.map(|added| added[0])
    }

    /// How many groups of links have run, and how many links they held.
    pub fn link_groups(&self) -> (u64, u64) {
        let q = self.links.lock().unwrap_or_else(|e| e.into_inner());
        (q.groups, q.grouped)
    }

    /// Run groups until none waits.
    async fn run_groups(self) {
        let mut running = Running { queue: self.links.clone(), armed: true };
        loop {
            let group = {
                let mut q = self.links.lock().unwrap_or_else(|e| e.into_inner());
                let group = take_group(&mut q.waiting);
                if group.is_empty() {
                    q.running = false;
                    running.armed = false;
                    return;
                }
                q.groups += 1;
                q.grouped += group.len() as u64;
                group
            };
            let links: Vec<Link> = group.iter().map(|w| w.link.clone()).collect();
            match self.link_group(&links).await {
                Ok(added) => {
                    for (w, added) in group.into_iter().zip(added) {
                        let _ = w.answer.send(Some(Ok(added)));
                    }
                }
                // Alone, the failure is its own, except a repository still
                // being deleted: the caller finishes that sweep itself.
                Err(e) if group.len() == 1 && !matches!(e, MetadataError::Deleting) => {
                    let _ = group.into_iter().next().map(|w| w.answer.send(Some(Err(e))));
                }
                Err(e) => {
                    tracing::debug!(links = group.len(), error = %e, "a group of blob links failed; each runs alone");
                    for w in group {
                        let _ = w.answer.send(None);
                    }
                }
            }
        }
    }

    /// Make `links` (at most one per repository) in one transaction; answers
    /// each one's bytes added to its tenant's usage.
    async fn link_group(&self, links: &[Link]) -> Result<Vec<u64>> {
        // Alone, a link's values are bound under the fragments' own names;
        // in a group, under numbered names that each link rebinds in turn.
        let alone = links.len() == 1;
        let name = |n: &str, i: usize| if alone { n.to_owned() } else { format!("{n}_{i}") };
        let mut sql = String::from("BEGIN TRANSACTION;");
        for (i, l) in links.iter().enumerate() {
            if !alone {
                sql.push_str(&format!(
                    "LET $repo = $repo_{i}; LET $namespace = $namespace_{i}; LET $digest = $digest_{i}; LET $size = $size_{i};
                     LET $pinned = $pinned_{i}; LET $check = $check_{i}; LET $expect = $expect_{i}; LET $next = $next_{i};"
                ));
                if l.ends_upload.is_some() {
                    sql.push_str(&format!("LET $upload = $upload_{i};"));
                }
            }
            let end = if l.ends_upload.is_some() { "DELETE type::record('upload', $upload) RETURN NONE;" } else { "" };
            sql.push_str(&format!(
                "{REPO_GUARD}
                 {REPO_TOUCH}
                 {}
                 {TENANT_OF}
                 LET $new = !(SELECT VALUE digest FROM ONLY type::record('blob_link', [$repo, $digest]));
                 {REF_ADD}
                 IF $new {{ CREATE type::record('blob_link', [$repo, $digest]) CONTENT {{ repo: $repo, digest: $digest, size: $size, linked_ms: $now }} RETURN NONE; }}
                 ELSE {{ UPDATE type::record('blob_link', [$repo, $digest]) SET linked_ms = $now RETURN NONE; }};
                 {end}
                 LET $added_{i} = $added;",
                outbox::add(&format!("${}", name("outbox", i)), &l.outbox)
            ));
        }
        let added: Vec<String> = (0..links.len()).map(|i| format!("$added_{i}")).collect();
        sql.push_str(&format!("RETURN {{ added: [{}] }}; COMMIT TRANSACTION;", added.join(", ")));
        let outboxes = links.iter().map(|l| outbox::bind(&l.outbox)).collect::<Result<Vec<_>>>()?;
        let now = now_ms();
        // Each digest's turn, taken in one order so groups never wait on each
        // other in a circle; then the catalog's if any link may make its repository.
        let stripes: BTreeSet<usize> = links.iter().map(|l| stripe_of(&l.row.digest)).collect();
        let mut _turns = Vec::with_capacity(stripes.len());
        for i in stripes {
            _turns.push(self.stripes[i].lock().await);
        }
        let _catalog = self.catalog_turn(links.iter().any(|l| l.guard.may_create())).await;
        let mut r = self
            .run(|| {
                let mut q = self.db.query(sql.as_str()).bind(("now", now));
                for (i, (l, announce)) in links.iter().zip(&outboxes).enumerate() {
                    q = if alone { l.guard.bind(q) } else { l.guard.bind_as(q, i) }
                        .bind((name("repo", i), l.row.repo.to_string()))
                        .bind((name("namespace", i), l.row.repo.namespace().to_string()))
                        .bind((name("digest", i), l.row.digest.to_string()))
                        .bind((name("size", i), l.row.size))
                        .bind((name("pinned", i), l.pinned));
                    if let Some(u) = &l.ends_upload {
                        q = q.bind((name("upload", i), u.to_string()));
                    }
                    if !announce.is_empty() {
                        q = q.bind((name("outbox", i), announce.clone()));
                    }
                }
                q
            })
            .await?;
        #[derive(Deserialize)]
        struct Added {
            added: Vec<u64>,
        }
        let added = returned::<Added>(&mut r)?.map(|a| a.added).unwrap_or_default();
        if added.len() != links.len() {
            return Err(MetadataError::Corrupt(format!("a group of {} links answered {} sizes", links.len(), added.len())));
        }
        Ok(added)
    }
}

/// The next group: the longest-waiting links, up to [`GROUP`], one per
/// repository (a repository's later links wait for the next group, in order).
fn take_group(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut group = Vec::new();
    let mut repos = HashSet::new();
    let mut left = VecDeque::with_capacity(waiting.len());
    while let Some(w) = waiting.pop_front() {
        if group.len() < GROUP && repos.insert(w.link.row.repo.clone()) {
            group.push(w);
        } else {
            left.push_back(w);
        }
    }
    *waiting = left;
    group
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::mem;
    use crate::NamespaceRow;
    use berth_oci::{AccountName, Digest, RepoName};

    /// Links of one tenant into `n` repositories at once, every third of the
    /// digest `shared` (100 bytes), the others their own (`100 + i` bytes);
    /// answers each link's result.
    async fn at_once(md: &Metadata, n: usize, guard: impl Fn(usize) -> Guard) -> Vec<Result<u64>> {
        let links: Vec<_> = (0..n)
            .map(|i| {
                let (digest, size) = match i % 3 {
                    0 => (Digest::sha256(b"shared"), 100),
                    _ => (Digest::sha256(format!("own-{i}").as_bytes()), 100 + i as u64),
                };
                let row = LinkRow { repo: format!("acme/r{i}").parse().unwrap(), digest, size };
                let (md, guard) = (md.clone(), guard(i));
                async move { md.link_blob(&guard, &row, None, false, &[]).await }
            })
            .collect();
        // Polled together on the test's one thread: all queue before the first group runs.
        futures::future::join_all(links).await
    }

    #[tokio::test]
    async fn links_made_at_once_share_transactions_and_answer_each_its_own() {
        let md = mem().await;
        let acme: AccountName = "acme".parse().unwrap();
        md.create_namespace(&NamespaceRow { name: acme.clone(), tenant: acme.clone() }).await.unwrap();

        let answers: Vec<u64> = at_once(&md, 40, |_| Guard::at("")).await.into_iter().map(|r| r.unwrap()).collect();
        let (groups, grouped) = md.link_groups();
        assert_eq!(grouped, 40);
        assert!(groups <= 40u64.div_ceil(GROUP as u64) + 1, "40 links at once ran as {groups} groups");
        // The shared digest is paid for once (by whichever link came first), the others each.
        let own: u64 = (0..40).filter(|i| i % 3 != 0).map(|i| 100 + i as u64).sum();
        assert_eq!(answers[0], 100, "the first link of the shared digest adds it");
        assert!((1..40).filter(|i| i % 3 == 0).all(|i| answers[i] == 0), "later links of it add nothing: {answers:?}");
        assert_eq!(answers.iter().sum::<u64>(), own + 100);
        assert_eq!(md.tenant_usage(&acme).await.unwrap().storage_bytes, own + 100);
        assert_eq!(md.recount_storage(&acme).await.unwrap(), own + 100);
        assert_eq!(md.blob_refs(&Digest::sha256(b"shared")).await.unwrap(), Some(14));
        let (heads, _) = md.all_repo_heads().await.unwrap();
        assert_eq!(heads.len(), 40);
    }

    /// A link whose repository moved fails alone; the others of its group are made.
    #[tokio::test]
    async fn a_stale_link_fails_alone_and_its_group_is_made() {
        let md = mem().await;
        let acme: AccountName = "acme".parse().unwrap();
        md.create_namespace(&NamespaceRow { name: acme.clone(), tenant: acme.clone() }).await.unwrap();
        let first = Guard::at("");
        let seven: RepoName = "acme/r7".parse().unwrap();
        md.link_blob(&first, &LinkRow { repo: seven.clone(), digest: Digest::sha256(b"before"), size: 1 }, None, false, &[]).await.unwrap();

        // r7 is at first.next(); its link below expects it not to exist.
        let answers = at_once(&md, 12, |_| Guard::at("")).await;
        for (i, a) in answers.iter().enumerate() {
            match i {
                7 => assert!(matches!(a, Err(MetadataError::Stale)), "r7's link: {:?}", a.as_ref().map_err(|e| e.to_string())),
                _ => assert!(a.is_ok(), "link {i}: {:?}", a.as_ref().map_err(|e| e.to_string())),
            }
        }
        let (heads, _) = md.repo_heads(std::slice::from_ref(&seven)).await.unwrap();
        assert_eq!(heads[0].version, first.next(), "the stale link left r7 as it was");
        assert_eq!(md.blob_refs(&Digest::sha256(b"own-7")).await.unwrap(), None);
        assert_eq!(md.blob_refs(&Digest::sha256(b"own-8")).await.unwrap(), Some(1));
        let own: u64 = (0..12).filter(|i| i % 3 != 0 && *i != 7).map(|i| 100 + i as u64).sum();
        assert_eq!(md.recount_storage(&acme).await.unwrap(), own + 100 + 1);
        assert_eq!(md.tenant_usage(&acme).await.unwrap().storage_bytes, own + 100 + 1);
    }

    /// A link of a digest the collector has marked fails alone (`Collecting`).
    #[tokio::test]
    async fn a_link_to_a_collected_digest_fails_alone() {
        let md = mem().await;
        let marked = Digest::sha256(b"own-4");
        md.adopt_blob(&marked, 104, 0).await.unwrap();
        assert!(md.mark_collecting(&marked, now_ms() + 1000).await.unwrap());
        let answers = at_once(&md, 6, |_| Guard::any()).await;
        for (i, a) in answers.iter().enumerate() {
            match i {
                4 => assert!(matches!(a, Err(MetadataError::Collecting)), "the marked digest's link"),
                _ => assert!(a.is_ok(), "link {i}"),
            }
        }
        assert_eq!(md.blob_refs(&marked).await.unwrap(), Some(0));
        assert_eq!(md.blob_refs(&Digest::sha256(b"own-5")).await.unwrap(), Some(1));
    }
}
