//! Pull counters, counted off the read path.
//!
//! A manifest `GET` adds one to a small in-memory tally ([`PullTally::count`]: a
//! map update under a mutex, no allocation beyond the key, no I/O, no mailbox).
//! The [`CounterActor`] owns the persisted counts: every `flush` interval it swaps
//! the tally out and writes it to metadata in transactions of at most
//! [`COUNTS_PER_TX`] keys ([`berth_metadata::Metadata::record_pulls`]). A
//! failed write puts the batch back, so counts wait for the database rather
//! than being lost; memory stays
//! bounded by the number of distinct (repository, tag) keys pulled in
//! the meantime, not by the number of pulls.
//!
//! Pull events for plugins ([`PullTally::announce`]) wait in the tally too, but
//! are written apart from the counts: on the delivery runtime (idle priority),
//! at most [`EVENTS_PER_TX`] outbox rows per transaction. A row costs about a
//! millisecond of CPU, and a queue with room can admit thousands in a second,
//! so on the actors thread (as before) a burst held every repository and upload
//! actor for seconds and took that CPU from requests.
//!
//! What a crash costs: the pulls of at most one flush interval, and the pull
//! events not yet written (at most a queue's worth per instance; under
//! saturation they wait for idle CPU). The tally is written on graceful
//! shutdown. Pushes are counted in the manifest commit itself.
//!
//! A pull is a manifest `GET` (as Docker Hub counts them): a `HEAD` is not, and a
//! multi-platform pull that fetches the index and then one platform's manifest
//! counts two repository pulls. A pull by tag also counts for that tag.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use berth_metadata::{Metadata, OutboxRow, PullDelta};
use berth_oci::{RepoName, Tag};

use crate::delivery::Deliveries;
use crate::now_ms;

type Key = (RepoName, Option<Tag>);

/// Pull events written per transaction (each holds the metadata store and its
/// thread for about a millisecond).
pub const EVENTS_PER_TX: usize = 128;

/// Pull counts (distinct repository and tag keys) written per transaction:
/// each key rewrites a tag and a repository record, and a transaction holds
/// what it writes in memory until it commits.
pub const COUNTS_PER_TX: usize = 1_000;

/// Pulls counted since the last flush.
pub struct PullTally {
    pending: Mutex<HashMap<Key, (u64, i64)>>,
    /// Pull events for plugins, written at the next flush (bounded by the
    /// instances' queues: each row holds a place in one).
    events: Mutex<Vec<OutboxRow>>,
    /// A writer of `events` is running.
    writing: AtomicBool,
    /// Keys per count transaction now (see `flush_counts`).
    per_tx: AtomicUsize,
    /// Held while counts are written.
    counting: tokio::sync::Mutex<()>,
    deliveries: Option<Arc<Deliveries>>,
}

impl Default for PullTally {
    fn default() -> PullTally {
        PullTally::new(None)
    }
}

impl PullTally {
    /// A tally whose pull events go to `deliveries`' queues.
    pub fn new(deliveries: Option<Arc<Deliveries>>) -> PullTally {
        PullTally {
            pending: Mutex::default(),
            events: Mutex::default(),
            writing: AtomicBool::new(false),
            per_tx: AtomicUsize::new(COUNTS_PER_TX),
            counting: tokio::sync::Mutex::new(()),
            deliveries,
        }
    }

    /// Queue pull events for the next flush.
    pub fn announce(&self, rows: Vec<OutboxRow>) {
        if !rows.is_empty() {
            self.events.lock().unwrap().extend(rows);
        }
    }

    /// Count one pull of `digest` in `repo`, by `tag` if the client named one.
    pub fn count(&self, repo: &RepoName, tag: Option<&Tag>) {
        let now = now_ms();
        let mut pending = self.pending.lock().unwrap();
        let e = pending.entry((repo.clone(), tag.cloned())).or_insert((0, now));
        e.0 += 1;
        e.1 = e.1.max(now);
    }

    fn take(&self) -> Vec<PullDelta> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        pending.into_iter().map(|((repo, tag), (count, last_ms))| PullDelta { repo, tag, count, last_ms }).collect()
    }

    fn put_back(&self, batch: Vec<PullDelta>) {
        let mut pending = self.pending.lock().unwrap();
        for d in batch {
            let e = pending.entry((d.repo, d.tag)).or_insert((0, d.last_ms));
            e.0 += d.count;
            e.1 = e.1.max(d.last_ms);
        }
    }

    /// Write what was counted and the pull events waiting; what fails is kept
    /// for the next try. A writer of events already running is waited for (up
    /// to 10 s), so a graceful stop leaves no event behind.
    pub async fn flush(&self, meta: &Metadata) -> bool {
        let counted = self.flush_counts(meta).await;
        for _ in 0..1000 {
            if !self.writing.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.flush_events(meta).await && counted
    }

    /// Write the counts, at most [`COUNTS_PER_TX`] keys per transaction; on
    /// failure what was not written goes back.
    ///
    /// Pushes write the same repository records. A transaction of many keys
    /// that keeps losing to them (past the metadata crate's retries) is split:
    /// a quarter the size, down to one key, for this flush and the next ones,
    /// growing back by half after each flush written whole. Without that, a
    /// registry pushed to across many repositories never wrote its counts
    /// (every flush failed, each try costing a full transaction's work).
    async fn flush_counts(&self, meta: &Metadata) -> bool {
        // One writer at a time: the last flush at shutdown waits for an
        // interval's flush still running, and writes what that one put back.
        let _one = self.counting.lock().await;
        let mut batch = self.take();
        let mut per_tx = self.per_tx.load(Ordering::Relaxed).clamp(1, COUNTS_PER_TX);
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(per_tx));
            match meta.record_pulls(&batch, &[]).await {
                Ok(()) => batch = rest,
                Err(e) if e.is_conflict() && per_tx > 1 => {
                    per_tx = (per_tx / 4).max(1);
                    tracing::debug!(keys_per_tx = per_tx, "pull counts conflicted with other writes; smaller transactions");
                    batch.extend(rest);
                }
                Err(e) => {
                    tracing::warn!(error = %e, keys = batch.len() + rest.len(), "writing pull counters failed; kept for the next flush");
                    self.per_tx.store(per_tx, Ordering::Relaxed);
                    self.put_back(batch);
                    self.put_back(rest);
                    return false;
                }
            }
        }
        self.per_tx.store((per_tx + per_tx / 2 + 1).min(COUNTS_PER_TX), Ordering::Relaxed);
        true
    }

    /// Write the waiting pull events, [`EVENTS_PER_TX`] per transaction, one
    /// writer at a time; on failure the rest waits for the next flush.
    async fn flush_events(&self, meta: &Metadata) -> bool {
        if self.writing.swap(true, Ordering::AcqRel) {
            return true;
        }
        let ok = loop {
            let mut chunk: Vec<OutboxRow> = {
                let mut events = self.events.lock().unwrap();
                let n = events.len().min(EVENTS_PER_TX);
                events.drain(..n).collect()
            };
            if chunk.is_empty() {
                break true;
            }
            if let Some(d) = &self.deliveries {
                chunk.retain(|r| d.has_queue(&r.instance));
            }
            match meta.record_pulls(&[], &chunk).await {
                Ok(()) => {
                    if let Some(d) = &self.deliveries {
                        d.committed(&chunk, true);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = chunk.len(), "writing pull events failed; kept for the next flush");
                    self.events.lock().unwrap().splice(0..0, chunk);
                    break false;
                }
            }
        };
        self.writing.store(false, Ordering::Release);
        ok
    }
}

/// Flushes the tally on an interval; one flush at a time.
pub struct CounterActor {
    pub tally: Arc<PullTally>,
    pub meta: Metadata,
    pub every: Duration,
    pub busy: bool,
    /// Where the counts' transaction runs (the request runtime): the actors
    /// share one thread, and a flush of many counts done there held up every
    /// repository's loads behind it (cold reads' p99 of hundreds of ms).
    pub runtime: tokio::runtime::Handle,
}

impl Actor for CounterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.every, |act, ctx| {
            if act.busy {
                return;
            }
            act.busy = true;
            let (tally, meta) = (act.tally.clone(), act.meta.clone());
            // Events on the delivery runtime, off this thread; at most one writer.
            if !tally.events.lock().unwrap().is_empty() {
                let (events, events_meta) = (tally.clone(), meta.clone());
                crate::delivery::background().spawn(async move { events.flush_events(&events_meta).await });
            }
            let written = act.runtime.spawn(async move { tally.flush_counts(&meta).await });
            ctx.spawn(async move { written.await.is_ok() }.into_actor(act).map(|_, act, _| act.busy = false));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize) -> OutboxRow {
        OutboxRow {
            instance: "hook".into(),
            event_id: format!("e{i:05}"),
            at_ms: i as i64,
            hook: "manifest-pulled".into(),
            event: "{}".into(),
            if_new_repo: false,
            attempts: 0,
            next_ms: i as i64,
        }
    }

    #[tokio::test]
    async fn pull_events_are_written_in_bounded_transactions_apart_from_the_counts() {
        let meta = Metadata::connect(&berth_metadata::MetadataConfig::new("mem://")).await.unwrap();
        let t = PullTally::default();
        let n = EVENTS_PER_TX * 2 + 5;
        t.announce((0..n).map(event).collect());
        // Counts alone leave the events waiting.
        assert!(t.flush_counts(&meta).await);
        assert_eq!(meta.outbox_depth("hook").await.unwrap().rows, 0);
        assert_eq!(t.events.lock().unwrap().len(), n);
        // A second writer while one runs writes nothing and waits for none.
        t.writing.store(true, Ordering::Release);
        assert!(t.flush_events(&meta).await);
        assert_eq!(t.events.lock().unwrap().len(), n);
        t.writing.store(false, Ordering::Release);
        assert!(t.flush(&meta).await);
        assert_eq!(meta.outbox_depth("hook").await.unwrap().rows, n as u64, "every chunk written");
        assert!(t.events.lock().unwrap().is_empty());
        assert!(!t.writing.load(Ordering::Acquire));
        // A chunk that fails goes back to the front, in order, with what follows it.
        t.announce(vec![event(0), event(n + 1)]);
        assert!(!t.flush_events(&meta).await, "event e00000 is already in the outbox");
        let left: Vec<String> = t.events.lock().unwrap().iter().map(|r| r.event_id.clone()).collect();
        assert_eq!(left, ["e00000".to_string(), format!("e{:05}", n + 1)]);
        assert!(!t.writing.load(Ordering::Acquire), "a failed writer lets the next one run");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_are_written_while_other_writes_hit_their_repositories() {
        let meta = Metadata::connect(&berth_metadata::MetadataConfig::new("mem://")).await.unwrap();
        let repos: Vec<RepoName> = (0..50).map(|i| format!("acme/r{i:02}").parse().unwrap()).collect();
        for name in &repos {
            let p = berth_metadata::RepoProfile::new(name.clone(), 1);
            assert!(meta.create_repo(&p, &[]).await.unwrap());
        }
        // Another writer rewrites the same repository records without pause,
        // as pushes across many repositories do.
        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let (meta, repos, stop) = (meta.clone(), repos.clone(), stop.clone());
            tokio::spawn(async move {
                let mut written = 0u64;
                for i in 0usize.. {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let d = PullDelta { repo: repos[i % repos.len()].clone(), tag: None, count: 1, last_ms: 1 };
                    if meta.record_pulls(&[d], &[]).await.is_ok() {
                        written += 1;
                    }
                }
                written
            })
        };
        // A full transaction's worth of keys, spread over those repositories.
        let t = PullTally::default();
        for r in &repos {
            for n in 0..COUNTS_PER_TX / repos.len() {
                t.count(r, Some(&format!("t{n}").parse().unwrap()));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let flushed = t.flush_counts(&meta).await;
        stop.store(true, Ordering::Release);
        let others = other.await.unwrap();
        assert!(flushed, "the flush lost to the other writes");
        assert!(t.take().is_empty(), "nothing left over");
        let mut total = 0;
        for r in &repos {
            total += meta.repo_profile(r).await.unwrap().unwrap().pulls;
        }
        assert_eq!(total, COUNTS_PER_TX as u64 + others, "every count written once");
    }

    #[test]
    fn tally_aggregates_by_key_and_puts_back() {
        let t = PullTally::default();
        let repo: RepoName = "a/b".parse().unwrap();
        let tag: Tag = "v1".parse().unwrap();
        for _ in 0..3 {
            t.count(&repo, Some(&tag));
        }
        t.count(&repo, None);
        let mut batch = t.take();
        batch.sort_by_key(|d| d.count);
        assert_eq!(batch.iter().map(|d| (d.tag.is_some(), d.count)).collect::<Vec<_>>(), [(false, 1), (true, 3)]);
        assert!(t.take().is_empty());
        t.put_back(batch);
        t.count(&repo, None);
        let mut again = t.take();
        again.sort_by_key(|d| d.count);
        assert_eq!(again.iter().map(|d| d.count).collect::<Vec<_>>(), [2, 3]);
    }
}
