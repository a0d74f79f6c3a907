//! Pull counters, counted off the read path.
//!
//! A manifest `GET` adds one to a small in-memory tally ([`PullTally::count`]: a
//! map update under a mutex, no allocation beyond the key, no I/O, no mailbox).
//! The [`CounterActor`] owns the persisted counts: every `flush` interval it swaps
//! the tally out and writes it to metadata as one transaction
//! ([`berth_metadata::Metadata::record_pulls`]). A failed write puts the batch
//! back, so counts wait for the database rather than being lost; memory stays
//! bounded by the number of distinct (repository, tag, manifest) keys pulled in
//! the meantime, not by the number of pulls.
//!
//! Pull events for plugins ride on the same batches ([`PullTally::announce`]),
//! written in the counts' transaction.
//!
//! What a crash costs: the pulls (and pull events) of at most one flush
//! interval (the tally is written on graceful shutdown). Pushes are counted in the manifest commit itself.
//!
//! A pull is a manifest `GET` (as Docker Hub counts them): a `HEAD` is not, and a
//! multi-platform pull that fetches the index and then one platform's manifest
//! counts two repository pulls. A pull by tag also counts for that tag.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use berth_metadata::{Metadata, OutboxRow, PullDelta};
use berth_oci::{Digest, RepoName, Tag};

use crate::delivery::Deliveries;
use crate::now_ms;

type Key = (RepoName, Option<Tag>, Digest);

/// Pulls counted since the last flush.
#[derive(Default)]
pub struct PullTally {
    pending: Mutex<HashMap<Key, (u64, i64)>>,
    /// Pull events for plugins, written with the next batch of counts (bounded
    /// by the instances' queues: each row holds a place in one).
    events: Mutex<Vec<OutboxRow>>,
    deliveries: Option<Arc<Deliveries>>,
}

impl PullTally {
    /// A tally whose pull events go to `deliveries`' queues.
    pub fn new(deliveries: Option<Arc<Deliveries>>) -> PullTally {
        PullTally { deliveries, ..PullTally::default() }
    }

    /// Queue pull events for the next flush.
    pub fn announce(&self, rows: Vec<OutboxRow>) {
        if !rows.is_empty() {
            self.events.lock().unwrap().extend(rows);
        }
    }

    /// Count one pull of `digest` in `repo`, by `tag` if the client named one.
    pub fn count(&self, repo: &RepoName, tag: Option<&Tag>, digest: &Digest) {
        let now = now_ms();
        let mut pending = self.pending.lock().unwrap();
        let e = pending.entry((repo.clone(), tag.cloned(), digest.clone())).or_insert((0, now));
        e.0 += 1;
        e.1 = e.1.max(now);
    }

    fn take(&self) -> Vec<PullDelta> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        pending.into_iter().map(|((repo, tag, digest), (count, last_ms))| PullDelta { repo, tag, digest, count, last_ms }).collect()
    }

    fn put_back(&self, batch: Vec<PullDelta>) {
        let mut pending = self.pending.lock().unwrap();
        for d in batch {
            let e = pending.entry((d.repo, d.tag, d.digest)).or_insert((0, d.last_ms));
            e.0 += d.count;
            e.1 = e.1.max(d.last_ms);
        }
    }

    /// Write what was counted; on failure the batch goes back for the next try.
    pub async fn flush(&self, meta: &Metadata) -> bool {
        let batch = self.take();
        let mut events = std::mem::take(&mut *self.events.lock().unwrap());
        if let Some(d) = &self.deliveries {
            events.retain(|r| d.has_queue(&r.instance));
        }
        if batch.is_empty() && events.is_empty() {
            return true;
        }
        match meta.record_pulls(&batch, &events).await {
            Ok(()) => {
                if let Some(d) = &self.deliveries {
                    d.committed(&events, true);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, keys = batch.len(), events = events.len(), "writing pull counters failed; kept for the next flush");
                self.put_back(batch);
                self.events.lock().unwrap().splice(0..0, events);
                false
            }
        }
    }
}

/// Flushes the tally on an interval; one flush at a time.
pub struct CounterActor {
    pub tally: Arc<PullTally>,
    pub meta: Metadata,
    pub every: Duration,
    pub busy: bool,
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
            ctx.spawn(async move { tally.flush(&meta).await }.into_actor(act).map(|_, act, _| act.busy = false));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_aggregates_by_key_and_puts_back() {
        let t = PullTally::default();
        let repo: RepoName = "a/b".parse().unwrap();
        let tag: Tag = "v1".parse().unwrap();
        let d = Digest::sha256(b"m");
        for _ in 0..3 {
            t.count(&repo, Some(&tag), &d);
        }
        t.count(&repo, None, &d);
        let mut batch = t.take();
        batch.sort_by_key(|d| d.count);
        assert_eq!(batch.iter().map(|d| (d.tag.is_some(), d.count)).collect::<Vec<_>>(), [(false, 1), (true, 3)]);
        assert!(t.take().is_empty());
        t.put_back(batch);
        t.count(&repo, None, &d);
        let mut again = t.take();
        again.sort_by_key(|d| d.count);
        assert_eq!(again.iter().map(|d| d.count).collect::<Vec<_>>(), [2, 3]);
    }
}
