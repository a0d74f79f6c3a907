//! Delivering events to plugins, at least once, from the durable outbox.
//!
//! A change that a plugin instance subscribed to is announced by outbox rows
//! ([`berth_metadata::outbox`]) written in the change's own transaction:
//! [`Deliveries::rows`] makes them (one per subscribed instance, all with the
//! event's id) and the repository actor, the pull counters or the management
//! service hands them to metadata with the change, then calls
//! [`Deliveries::committed`].
//!
//! Each instance that takes events has a **delivery worker** (a task that owns
//! its [`Queue`]): it reads the instance's due rows, calls the plugin (up to
//! `limits.concurrency` at once), and settles them in one transaction with
//! their delivery-log lines. A failed delivery is tried again after an
//! exponential backoff (1 s, 2 s … 10 min, jittered) until `limits.max_attempts`;
//! a plugin's `failed` answer is final. A switched-off instance keeps its
//! queue; it resumes when enabled again. Where replicas share metadata, one
//! holds a queue's lease and delivers it. The worker is a tokio task rather than
//! an actix actor: plugin calls are CPU work that must not hold the actor
//! thread.
//!
//! Invariants:
//! - Nothing on the request path waits for a plugin: announcing is a counter
//!   check and a row in a transaction that runs anyway.
//! - The queue is bounded: past `limits.queue` rows, new events for that
//!   instance are not queued but counted (`overflow`), so a stuck receiver
//!   costs a bounded amount of metadata and never slows pushes or pulls.
//! - A row leaves the outbox only with a log line saying it was delivered or
//!   given up; a crash in between redelivers it (the event id lets a receiver
//!   deduplicate).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_metadata::{DeliveryRow, Metadata, OutboxRow, Settle};
use berth_plugins::{CallError, Event, EventKind, Hook, Instance, PluginHost};
use futures::StreamExt;
use serde::Serialize;

use crate::now_ms;

/// Rows read per round.
const BATCH: usize = 64;
/// How long an idle worker sleeps before it looks again (it is woken sooner
/// by new events).
const IDLE: Duration = Duration::from_secs(2);
/// Delivery-log lines kept per instance.
pub const LOG_KEPT: usize = 1000;
/// How long a queue's lease lasts; it is renewed when half has passed, and a
/// replica that died holds it no longer than this.
const LEASE_MS: i64 = 30_000;

/// One instance's queue, as its worker and the announcers share it.
pub struct Queue {
    instance: String,
    cap: AtomicU64,
    /// Rows in the outbox (counted up when announced, recounted when idle).
    pending: AtomicU64,
    /// When the oldest waiting event happened (0: none).
    oldest_ms: AtomicI64,
    overflow: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    given_up: AtomicU64,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
}

/// A queue's figures, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QueueStats {
    /// Events waiting.
    pub depth: u64,
    /// How long the oldest waiting event has waited, in ms (0: none waits).
    pub lag_ms: u64,
    /// Events not queued because the queue was full.
    pub overflow: u64,
    pub delivered: u64,
    /// Deliveries that failed and were scheduled again.
    pub retried: u64,
    /// Events dropped after their last attempt, or refused by the plugin.
    pub given_up: u64,
}

impl Queue {
    fn new(instance: &str, cap: u64) -> Queue {
        Queue {
            instance: instance.to_owned(),
            cap: AtomicU64::new(cap),
            pending: AtomicU64::new(0),
            oldest_ms: AtomicI64::new(0),
            overflow: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            given_up: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
        }
    }

    /// Take a place for one more event, or count it as overflow.
    fn admit(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        if self.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| (p < cap).then_some(p + 1)).is_ok() {
            true
        } else {
            if self.overflow.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                tracing::warn!(plugin = %self.instance, cap, "plugin event queue full; events are being dropped");
            }
            false
        }
    }

    pub fn stats(&self) -> QueueStats {
        let oldest = self.oldest_ms.load(Ordering::Relaxed);
        let depth = self.pending.load(Ordering::Relaxed);
        QueueStats {
            depth,
            lag_ms: if oldest > 0 && depth > 0 { (now_ms() - oldest).max(0) as u64 } else { 0 },
            overflow: self.overflow.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            given_up: self.given_up.load(Ordering::Relaxed),
        }
    }

    async fn wait(&self, d: Duration) {
        let _ = tokio::time::timeout(d, self.wake.notified()).await;
    }
}

/// Every instance's queue and worker.
pub struct Deliveries {
    host: Arc<PluginHost>,
    meta: Metadata,
    /// This process, as a lease holder.
    holder: Arc<str>,
    queues: Mutex<BTreeMap<String, Arc<Queue>>>,
}

impl Deliveries {
    pub fn new(host: Arc<PluginHost>, meta: Metadata) -> Deliveries {
        let holder = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()).into();
        Deliveries { host, meta, holder, queues: Mutex::new(BTreeMap::new()) }
    }

    /// Start a worker for every instance that takes events and has none, and
    /// stop those of instances gone (their rows went with them).
    pub fn sync(&self) {
        let wanted: BTreeMap<String, u64> = self
            .host
            .instances()
            .into_iter()
            .filter(|i| i.spec.hooks.iter().any(|h| *h != Hook::Gate))
            .map(|i| (i.spec.id.clone(), i.module.manifest.limits.queue))
            .collect();
        let mut queues = self.queues.lock().unwrap();
        queues.retain(|id, q| {
            let keep = wanted.contains_key(id);
            if !keep {
                q.stop.store(true, Ordering::Release);
                q.wake.notify_one();
            }
            keep
        });
        for (id, cap) in wanted {
            let q = queues.entry(id).or_insert_with_key(|id| {
                let q = Arc::new(Queue::new(id, cap));
                background().spawn(work(q.clone(), self.host.clone(), self.meta.clone(), self.holder.clone()));
                q
            });
            q.cap.store(cap, Ordering::Relaxed);
            // An instance enabled again resumes at once.
            q.wake.notify_one();
        }
    }

    /// Stop every worker (graceful shutdown; what is queued stays queued).
    pub fn stop(&self) {
        for q in self.queues.lock().unwrap().values() {
            q.stop.store(true, Ordering::Release);
            q.wake.notify_one();
        }
    }

    pub fn stats(&self, instance: &str) -> Option<QueueStats> {
        self.queues.lock().unwrap().get(instance).map(|q| q.stats())
    }

    pub fn all_stats(&self) -> Vec<(String, QueueStats)> {
        self.queues.lock().unwrap().iter().map(|(id, q)| (id.clone(), q.stats())).collect()
    }

    /// Whether any instance takes events at all.
    pub fn any_queue(&self) -> bool {
        !self.queues.lock().unwrap().is_empty()
    }

    /// Whether any instance takes `hook` (a cheap check for the read path).
    pub fn wanted(&self, hook: Hook) -> bool {
        self.host.takes(hook)
    }

    /// The outbox rows announcing `kind`: one per instance subscribed to it
    /// whose queue has room. `tenant`: the owner of the repository's namespace.
    /// `if_new_repo`: written only if the transaction creates the repository.
    pub fn rows(&self, kind: EventKind, tenant: Option<&str>, if_new_repo: bool) -> Vec<OutboxRow> {
        let hook = kind.hook();
        let namespace = kind.place().1.split('/').next().unwrap_or_default().to_owned();
        let subscribed = self.host.subscribed(hook, tenant, &namespace);
        if subscribed.is_empty() {
            return vec![];
        }
        // Places first: an event no queue has room for costs a counter, no more.
        let admitted: Vec<Arc<Queue>> = {
            let queues = self.queues.lock().unwrap();
            subscribed.iter().filter_map(|inst| queues.get(&inst.spec.id)).filter(|q| q.admit()).cloned().collect()
        };
        if admitted.is_empty() {
            return vec![];
        }
        let event = Event::new(kind);
        let text = serde_json::to_string(&event).expect("an event serializes");
        admitted
            .iter()
            .map(|q| OutboxRow {
                instance: q.instance.clone(),
                event_id: event.id.clone(),
                at_ms: event.at_ms,
                hook: hook.name().to_owned(),
                event: text.clone(),
                if_new_repo,
                attempts: 0,
                next_ms: event.at_ms,
            })
            .collect()
    }

    /// Whether `instance` has a queue (rows made for an instance removed since
    /// are not written).
    pub fn has_queue(&self, instance: &str) -> bool {
        self.queues.lock().unwrap().contains_key(instance)
    }

    /// The transaction carrying `rows` committed (wake their workers) or did
    /// not (give their places back).
    pub fn committed(&self, rows: &[OutboxRow], ok: bool) {
        if rows.is_empty() {
            return;
        }
        let queues = self.queues.lock().unwrap();
        for r in rows {
            if let Some(q) = queues.get(&r.instance) {
                if ok {
                    let _ = q.oldest_ms.compare_exchange(0, r.at_ms, Ordering::AcqRel, Ordering::Relaxed);
                    q.wake.notify_one();
                } else {
                    let _ = q.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| Some(p.saturating_sub(1)));
                }
            }
        }
    }
}

/// The runtime delivery workers run on: one thread scheduled `SCHED_IDLE`
/// (Linux), so deliveries take only the CPU that requests leave: all of it when
/// the registry is idle, next to none when requests keep every core busy (then
/// queues fill and overflow, visibly, rather than pulls slowing down). Gates
/// stay on the request's own runtime: a push waits for them.
pub(crate) fn background() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("berth-deliver")
            .on_thread_start(|| {
                // SAFETY: sched_setscheduler on the calling thread (pid 0) with a
                // valid parameter; SCHED_IDLE needs no privilege.
                #[cfg(target_os = "linux")]
                unsafe {
                    let param = libc::sched_param { sched_priority: 0 };
                    if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                    }
                }
            })
            .enable_all()
            .build()
            .expect("the delivery runtime")
    })
}

/// The delay before attempt `attempt + 1`: 1 s doubling to 10 min, ±25 %
/// (spread by the event id, so a burst of failures does not retry in step).
fn backoff_ms(attempt: u32, event_id: &str) -> i64 {
    let base = 1000i64.saturating_mul(1 << attempt.saturating_sub(1).min(20)).min(600_000);
    let spread = event_id.bytes().fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64)) % 501;
    base * (750 + spread as i64) / 1000
}

/// One instance's worker: deliver what is due, settle it, sleep until more is.
/// It delivers only while it holds the queue's lease (other replicas' workers
/// wait, and take over when a holder stops renewing).
async fn work(q: Arc<Queue>, host: Arc<PluginHost>, meta: Metadata, holder: Arc<str>) {
    let mut rounds = 0u64;
    let mut lease_until = 0i64;
    while !q.stop.load(Ordering::Acquire) {
        let Some(inst) = host.instance(&q.instance).filter(|i| i.is_on()) else {
            q.wait(IDLE).await;
            continue;
        };
        let now = now_ms();
        if now > lease_until - LEASE_MS / 2 {
            match meta.outbox_lease(&q.instance, &holder, now, LEASE_MS).await {
                Ok(true) => lease_until = now + LEASE_MS,
                Ok(false) => {
                    // Another replica delivers; the queue's figures still come
                    // from the shared outbox (so its bound is the whole queue's).
                    lease_until = 0;
                    if let Ok(d) = meta.outbox_depth(&q.instance).await {
                        q.pending.store(d.rows, Ordering::Relaxed);
                        q.oldest_ms.store(d.oldest_ms.unwrap_or(0), Ordering::Relaxed);
                    }
                    q.wait(IDLE).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(plugin = %q.instance, error = %e, "taking the plugin queue's lease failed");
                    q.wait(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let due = match meta.outbox_due(&q.instance, now, BATCH).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(plugin = %q.instance, error = %e, "reading the plugin outbox failed");
                q.wait(Duration::from_secs(1)).await;
                continue;
            }
        };
        if due.is_empty() {
            // Recount (announced rows of transactions that failed, or rows of
            // an earlier run) and sleep until the next row is due.
            match meta.outbox_depth(&q.instance).await {
                Ok(d) => {
                    q.pending.store(d.rows, Ordering::Relaxed);
                    q.oldest_ms.store(d.oldest_ms.unwrap_or(0), Ordering::Relaxed);
                    let until = d.next_ms.map_or(IDLE, |n| Duration::from_millis((n - now).clamp(10, IDLE.as_millis() as i64) as u64));
                    q.wait(until).await;
                }
                Err(_) => q.wait(Duration::from_secs(1)).await,
            }
            continue;
        }
        if let Some(oldest) = due.iter().map(|r| r.at_ms).min() {
            let _ = q.oldest_ms.fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| (o == 0 || oldest < o).then_some(oldest));
        }
        let limits = inst.module.manifest.limits.clone();
        let settled: Vec<Settle> = futures::stream::iter(due)
            .map(|row| deliver(&host, &inst, row, limits.max_attempts))
            .buffer_unordered(limits.concurrency.max(1) as usize)
            .filter_map(futures::future::ready)
            .collect()
            .await;
        if settled.is_empty() {
            // The instance was switched off mid-round: nothing was tried.
            continue;
        }
        // Settled durably, or tried again next round (delivered twice at worst).
        let mut tries = 0;
        while let Err(e) = meta.outbox_settle(&q.instance, &settled).await {
            tries += 1;
            tracing::warn!(plugin = %q.instance, error = %e, "recording plugin deliveries failed");
            if tries >= 5 || q.stop.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * tries)).await;
        }
        if tries >= 5 {
            continue;
        }
        for s in &settled {
            match s {
                Settle::Done(l) => {
                    let _ = q.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| Some(p.saturating_sub(1)));
                    if l.outcome == "delivered" { &q.delivered } else { &q.given_up }.fetch_add(1, Ordering::Relaxed);
                }
                Settle::Retry(..) => {
                    q.retried.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if q.pending.load(Ordering::Relaxed) == 0 {
            q.oldest_ms.store(0, Ordering::Relaxed);
        }
        rounds += 1;
        if rounds.is_multiple_of(64) {
            if let Err(e) = meta.prune_deliveries(&q.instance, LOG_KEPT).await {
                tracing::warn!(plugin = %q.instance, error = %e, "pruning the plugin delivery log failed");
            }
        }
    }
}

/// Deliver one row; `None` when it was not tried (the instance is switched off).
async fn deliver(host: &PluginHost, inst: &Instance, row: OutboxRow, max_attempts: u32) -> Option<Settle> {
    let attempt = row.attempts + 1;
    let started = Instant::now();
    let log = |outcome: &str, detail: Option<String>| DeliveryRow {
        instance: row.instance.clone(),
        event_id: row.event_id.clone(),
        hook: row.hook.clone(),
        attempt,
        at_ms: now_ms(),
        outcome: outcome.to_owned(),
        detail,
        took_ms: started.elapsed().as_secs_f64() * 1000.0,
    };
    let event: Event = match serde_json::from_str(&row.event) {
        Ok(e) => e,
        Err(e) => return Some(Settle::Done(log("failed", Some(format!("unreadable event: {e}"))))),
    };
    match host.notify(inst, &event).await {
        Ok(()) => Some(Settle::Done(log("delivered", None))),
        Err(CallError::Tripped(_)) => None,
        // The plugin's own verdict that retrying cannot help.
        Err(e @ CallError::Failed(_)) => Some(Settle::Done(log("failed", Some(e.to_string())))),
        Err(e) if attempt >= max_attempts => {
            Some(Settle::Done(log("failed", Some(format!("given up after {attempt} attempts; the last: {e}")))))
        }
        Err(e) => Some(Settle::Retry(log("retrying", Some(e.to_string())), now_ms() + backoff_ms(attempt, &row.event_id))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_ten_minutes_and_spreads() {
        let b: Vec<i64> = (1..=12).map(|a| backoff_ms(a, "e")).collect();
        for (i, w) in b.windows(2).enumerate().take(9) {
            assert!(w[1] > w[0], "attempt {} → {}: {b:?}", i + 1, i + 2);
        }
        assert!((750..=1250).contains(&b[0]), "{b:?}");
        assert!(b[11] <= 750_000 && b[11] >= 450_000, "{b:?}");
        assert_ne!(backoff_ms(3, "a"), backoff_ms(3, "b"), "spread by event");
    }

    #[test]
    fn a_full_queue_counts_overflow() {
        let q = Queue::new("i", 2);
        assert!(q.admit() && q.admit());
        assert!(!q.admit());
        assert_eq!((q.stats().depth, q.stats().overflow), (2, 1));
    }
}
