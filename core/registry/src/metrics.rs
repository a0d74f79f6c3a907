//! The registry's metrics, in the OpenMetrics text format Prometheus scrapes
//! (`GET /metrics`, platform admin). Counters are bumped where the work happens
//! (requests by the HTTP layer, collection and retention by their passes);
//! gauges are read when scraped. Tenant names appear only as labels of what
//! was reclaimed for them, which is why the endpoint is the platform admin's.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry as Exposition, Unit};

use crate::gc::GcReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActorLabel {
    actor: &'static str,
}

/// Process-wide tallies, bumped where no [`Metrics`] is at hand (the error
/// mapping, the actor mailboxes) and copied into the exposition when scraped.
static RECEIVED: AtomicU64 = AtomicU64::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);
static METADATA_FAILURES: AtomicU64 = AtomicU64::new(0);
static STORAGE_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Messages sent to actors of each kind and not yet answered (waiting in a
/// mailbox or being handled), in [`ACTOR_KINDS`] order.
static WAITING: [AtomicI64; 4] = [AtomicI64::new(0), AtomicI64::new(0), AtomicI64::new(0), AtomicI64::new(0)];
const ACTOR_KINDS: [&str; 4] = ["repository", "uploads", "quota", "other"];

/// Bytes received from a client (an upload chunk, a manifest).
pub(crate) fn received(bytes: u64) {
    RECEIVED.fetch_add(bytes, Ordering::Relaxed);
}

/// Bytes sent to a client (a blob or a range of one, as they stream; a manifest).
pub(crate) fn sent(bytes: u64) {
    SENT.fetch_add(bytes, Ordering::Relaxed);
}

/// A request that failed on the metadata store or the blob store (answered 500):
/// counted by the one function that maps such failures, from the error's type
/// (a stream of stored bytes fails with `std::io::Error`).
pub(crate) fn failure<E: 'static>() {
    use std::any::TypeId;
    let t = TypeId::of::<E>();
    if t == TypeId::of::<berth_metadata::MetadataError>() {
        METADATA_FAILURES.fetch_add(1, Ordering::Relaxed);
    } else if t == TypeId::of::<berth_storage::StorageError>() || t == TypeId::of::<std::io::Error>() {
        STORAGE_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts one message to an actor of type `A` as waiting until dropped.
pub(crate) struct Waiting(&'static AtomicI64);

impl Waiting {
    pub(crate) fn on<A>() -> Waiting {
        let name = std::any::type_name::<A>();
        let kind = if name.ends_with("RepoActor") {
            0
        } else if name.ends_with("UploadSessions") {
            1
        } else if name.ends_with("QuotaActor") {
            2
        } else {
            3
        };
        WAITING[kind].fetch_add(1, Ordering::Relaxed);
        Waiting(&WAITING[kind])
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, Ord, PartialOrd, EncodeLabelSet)]
struct InstanceLabel {
    instance: String,
}

/// One plugin instance's figures, read when scraped.
#[derive(Clone, Debug, Default)]
pub struct PluginFigures {
    pub instance: String,
    pub calls: u64,
    pub failures: u64,
    pub timeouts: u64,
    pub p99_seconds: f64,
    pub tripped: bool,
    pub queue: Option<crate::delivery::QueueStats>,
}

/// The per-instance series.
#[derive(Default)]
struct PluginSeries {
    calls: Family<InstanceLabel, Counter>,
    failures: Family<InstanceLabel, Counter>,
    timeouts: Family<InstanceLabel, Counter>,
    p99: Family<InstanceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    tripped: Family<InstanceLabel, Gauge>,
    depth: Family<InstanceLabel, Gauge>,
    lag: Family<InstanceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    overflow: Family<InstanceLabel, Counter>,
    delivered: Family<InstanceLabel, Counter>,
    retried: Family<InstanceLabel, Counter>,
    given_up: Family<InstanceLabel, Counter>,
    /// The instances that have series (removed with the instance).
    known: std::sync::Mutex<std::collections::BTreeSet<InstanceLabel>>,
}

/// Bring a counter up to `value` (a count that went back, after an instance
/// was restarted, leaves it where it is: counters only grow).
fn catch_up(c: &Counter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

/// Every metric Berth exports.
pub struct Metrics {
    exposition: Exposition,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, Histogram>,
    gc_passes: Counter,
    gc_links: Counter,
    gc_blobs: Counter,
    gc_bytes: Counter,
    gc_errors: Counter,
    gc_freed: Family<TenantLabel, Counter>,
    gc_seconds: Histogram,
    retention_runs: Counter,
    retention_deleted: Family<KindLabel, Counter>,
    retention_errors: Counter,
    repositories: Gauge,
    repo_actors: Gauge,
    states_held: Gauge,
    states_held_bytes: Gauge,
    resident: Gauge,
    received: Counter,
    sent: Counter,
    failures: Family<BackendLabel, Counter>,
    waiting: Family<ActorLabel, Gauge>,
    uploads: Gauge,
    metadata_out_of_reach: Gauge,
    metadata_refused: Counter,
    tenant_storage: Family<TenantLabel, Gauge>,
    tenant_scan: tokio::sync::Mutex<Option<TenantScan>>,
    plugins: PluginSeries,
}

/// The last per-tenant storage scan: when it finished, how long it took, what
/// it found.
struct TenantScan {
    at: Instant,
    took: Duration,
    figures: Vec<(String, u64)>,
}

/// A per-tenant scan is reused while younger than this many times its own
/// duration: scrapes spend at most about a twentieth of the time scanning,
/// however often they come and however many blobs there are.
const SCAN_SHARE: u32 = 20;

/// What a scrape reads from elsewhere in the registry.
pub(crate) struct Readings {
    pub repositories: usize,
    pub repo_actors: usize,
    /// Repository states the read index holds, and their estimated weight.
    pub states_held: (usize, usize),
    /// Upload sessions open in this process.
    pub uploads: usize,
    /// Per tenant, the bytes its repositories reference (as quotas count them).
    pub tenant_storage: Vec<(String, u64)>,
    /// The metadata server out of reach now, and the queries failed at once for it.
    pub metadata_reach: (bool, u64),
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            exposition: Exposition::with_prefix("berth"),
            requests: Family::default(),
            // 100 µs … 52 s.
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 20))),
            gc_passes: Counter::default(),
            gc_links: Counter::default(),
            gc_blobs: Counter::default(),
            gc_bytes: Counter::default(),
            gc_errors: Counter::default(),
            gc_freed: Family::default(),
            gc_seconds: Histogram::new(exponential_buckets(0.01, 4.0, 10)),
            retention_runs: Counter::default(),
            retention_deleted: Family::default(),
            retention_errors: Counter::default(),
            repositories: Gauge::default(),
            repo_actors: Gauge::default(),
            states_held: Gauge::default(),
            states_held_bytes: Gauge::default(),
            resident: Gauge::default(),
            received: Counter::default(),
            sent: Counter::default(),
            failures: Family::default(),
            waiting: Family::default(),
            uploads: Gauge::default(),
            metadata_out_of_reach: Gauge::default(),
            metadata_refused: Counter::default(),
            tenant_storage: Family::default(),
            tenant_scan: tokio::sync::Mutex::new(None),
            plugins: PluginSeries::default(),
        };
        let r = &mut m.exposition;
        r.register("http_requests", "Requests answered, by route and status", m.requests.clone());
        r.register_with_unit(
            "http_request_duration",
            "Time to answer a request (headers; bodies stream after)",
            Unit::Seconds,
            m.latency.clone(),
        );
        r.register("gc_passes", "Garbage collection passes completed (not dry runs)", m.gc_passes.clone());
        r.register("gc_links_removed", "Blob links no manifest needed, removed from their repositories", m.gc_links.clone());
        r.register("gc_blobs_deleted", "Blobs whose bytes were deleted from storage", m.gc_blobs.clone());
        r.register_with_unit("gc_reclaimed", "Storage bytes reclaimed", Unit::Bytes, m.gc_bytes.clone());
        r.register("gc_errors", "Collection steps that failed (retried by the next pass)", m.gc_errors.clone());
        r.register_with_unit("gc_tenant_freed", "Per tenant, the bytes its storage usage went down by", Unit::Bytes, m.gc_freed.clone());
        r.register_with_unit("gc_pass_duration", "Time a collection pass took", Unit::Seconds, m.gc_seconds.clone());
        r.register("retention_runs", "Retention policy runs that deleted something or failed (not dry runs)", m.retention_runs.clone());
        r.register("retention_deleted", "Tags and manifests retention policies deleted", m.retention_deleted.clone());
        r.register("retention_errors", "Retention deletions that failed", m.retention_errors.clone());
        r.register("repositories", "Repositories in the registry", m.repositories.clone());
        r.register(
            "repository_actors",
            "Repository actors running (one per repository written to, and per name being tried)",
            m.repo_actors.clone(),
        );
        r.register(
            "index_states",
            "Repository states the read index holds in memory (the rest load when asked for)",
            m.states_held.clone(),
        );
        r.register_with_unit(
            "index_states",
            "Estimated memory of the repository states held (bounded by registry.index_cache_bytes)",
            Unit::Bytes,
            m.states_held_bytes.clone(),
        );
        r.register_with_unit("process_resident_memory", "Resident memory of this process", Unit::Bytes, m.resident.clone());
        r.register_with_unit("received", "Blob and manifest bytes received from clients", Unit::Bytes, m.received.clone());
        r.register_with_unit("sent", "Blob and manifest bytes sent to clients", Unit::Bytes, m.sent.clone());
        r.register("backend_errors", "Requests failed by the metadata store or the blob store", m.failures.clone());
        r.register(
            "actor_messages_waiting",
            "Messages sent to actors and not yet answered (in a mailbox or being handled), by kind of actor",
            m.waiting.clone(),
        );
        r.register("upload_sessions", "Upload sessions open in this process", m.uploads.clone());
        r.register(
            "metadata_out_of_reach",
            "1 while the metadata server is out of reach (queries fail at once; Berth tries it every half second)",
            m.metadata_out_of_reach.clone(),
        );
        r.register("metadata_refused", "Queries failed at once because the metadata server was out of reach", m.metadata_refused.clone());
        r.register_with_unit(
            "tenant_storage",
            "Per tenant, the bytes its repositories reference (each digest once, as quotas count)",
            Unit::Bytes,
            m.tenant_storage.clone(),
        );
        let p = &m.plugins;
        r.register("plugin_calls", "Calls into a plugin instance (gates and deliveries)", p.calls.clone());
        r.register("plugin_failures", "Calls that failed (trap, timeout, memory, fuel, or an error answer)", p.failures.clone());
        r.register("plugin_timeouts", "Calls ended by their time limit", p.timeouts.clone());
        r.register_with_unit("plugin_call_p99", "99th percentile of the last 1,024 calls' time", Unit::Seconds, p.p99.clone());
        r.register("plugin_tripped", "1 while the instance is switched off by its circuit breaker", p.tripped.clone());
        r.register("plugin_queue_depth", "Events waiting in the instance's outbox", p.depth.clone());
        r.register_with_unit("plugin_queue_lag", "How long the oldest waiting event has waited", Unit::Seconds, p.lag.clone());
        r.register("plugin_events_overflow", "Events not queued because the instance's queue was full", p.overflow.clone());
        r.register("plugin_events_delivered", "Events the instance acknowledged", p.delivered.clone());
        r.register("plugin_events_retried", "Deliveries that failed and were scheduled again", p.retried.clone());
        r.register("plugin_events_given_up", "Events dropped after their last attempt or refused by the plugin", p.given_up.clone());
        m
    }
}

impl Metrics {
    /// One answered request. `route` is the router's label (`manifest_get`, `api`, …).
    pub fn request(&self, route: &'static str, status: u16, took: Duration) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
        self.latency.get_or_create(&RouteLabel { route }).observe(took.as_secs_f64());
    }

    /// Per-tenant storage: from `scan` (one pass over the reference counts),
    /// or the last scan's figures while it is recent for its cost (see
    /// [`SCAN_SHARE`]) or when `scan` fails. One scan at a time.
    pub(crate) async fn tenant_storage<F>(&self, scan: F) -> Vec<(String, u64)>
    where
        F: std::future::Future<Output = Option<Vec<(String, u64)>>>,
    {
        let mut last = self.tenant_scan.lock().await;
        if let Some(l) = last.as_ref().filter(|l| l.at.elapsed() < l.took * SCAN_SHARE) {
            return l.figures.clone();
        }
        let started = Instant::now();
        match scan.await {
            Some(figures) => {
                *last = Some(TenantScan { at: Instant::now(), took: started.elapsed(), figures: figures.clone() });
                figures
            }
            None => last.as_ref().map(|l| l.figures.clone()).unwrap_or_default(),
        }
    }

    pub(crate) fn gc_pass(&self, r: &GcReport) {
        if r.dry_run {
            return;
        }
        self.gc_passes.inc();
        self.gc_links.inc_by(r.links_removed);
        self.gc_blobs.inc_by(r.blobs_deleted);
        self.gc_bytes.inc_by(r.bytes_reclaimed);
        self.gc_errors.inc_by(r.errors);
        for (tenant, bytes) in &r.freed_by_tenant {
            self.gc_freed.get_or_create(&TenantLabel { tenant: tenant.clone() }).inc_by(*bytes);
        }
        self.gc_seconds.observe((r.finished_ms - r.started_ms).max(0) as f64 / 1000.0);
    }

    pub(crate) fn retention_run(&self, run: &berth_metadata::RetentionRun) {
        if run.dry_run || (run.items.is_empty() && run.errors.is_empty()) {
            return;
        }
        self.retention_runs.inc();
        for it in &run.items {
            self.retention_deleted.get_or_create(&KindLabel { kind: it.kind.clone() }).inc();
        }
        self.retention_errors.inc_by(run.errors.len() as u64);
    }

    /// Bring the per-instance series up to date (before a scrape).
    pub(crate) fn plugin_figures(&self, figures: &[PluginFigures]) {
        let p = &self.plugins;
        let mut known = p.known.lock().unwrap();
        let now: std::collections::BTreeSet<InstanceLabel> =
            figures.iter().map(|f| InstanceLabel { instance: f.instance.clone() }).collect();
        for gone in known.difference(&now) {
            for fam in [&p.calls, &p.failures, &p.timeouts, &p.overflow, &p.delivered, &p.retried, &p.given_up] {
                fam.remove(gone);
            }
            p.p99.remove(gone);
            p.lag.remove(gone);
            p.tripped.remove(gone);
            p.depth.remove(gone);
        }
        *known = now;
        for f in figures {
            let l = InstanceLabel { instance: f.instance.clone() };
            catch_up(&p.calls.get_or_create(&l), f.calls);
            catch_up(&p.failures.get_or_create(&l), f.failures);
            catch_up(&p.timeouts.get_or_create(&l), f.timeouts);
            p.p99.get_or_create(&l).set(f.p99_seconds);
            p.tripped.get_or_create(&l).set(i64::from(f.tripped));
            if let Some(q) = &f.queue {
                p.depth.get_or_create(&l).set(q.depth as i64);
                p.lag.get_or_create(&l).set(q.lag_ms as f64 / 1000.0);
                catch_up(&p.overflow.get_or_create(&l), q.overflow);
                catch_up(&p.delivered.get_or_create(&l), q.delivered);
                catch_up(&p.retried.get_or_create(&l), q.retried);
                catch_up(&p.given_up.get_or_create(&l), q.given_up);
            }
        }
    }

    /// The exposition, gauges read now.
    pub(crate) fn render(&self, now: Readings) -> String {
        self.repositories.set(now.repositories as i64);
        self.repo_actors.set(now.repo_actors as i64);
        self.states_held.set(now.states_held.0 as i64);
        self.states_held_bytes.set(now.states_held.1 as i64);
        self.resident.set(resident_bytes() as i64);
        self.uploads.set(now.uploads as i64);
        self.metadata_out_of_reach.set(now.metadata_reach.0 as i64);
        catch_up(&self.metadata_refused, now.metadata_reach.1);
        catch_up(&self.received, RECEIVED.load(Ordering::Relaxed));
        catch_up(&self.sent, SENT.load(Ordering::Relaxed));
        catch_up(&self.failures.get_or_create(&BackendLabel { backend: "metadata" }), METADATA_FAILURES.load(Ordering::Relaxed));
        catch_up(&self.failures.get_or_create(&BackendLabel { backend: "storage" }), STORAGE_FAILURES.load(Ordering::Relaxed));
        for (kind, n) in ACTOR_KINDS.iter().zip(&WAITING) {
            self.waiting.get_or_create(&ActorLabel { actor: kind }).set(n.load(Ordering::Relaxed));
        }
        self.tenant_storage.clear();
        for (tenant, bytes) in now.tenant_storage {
            self.tenant_storage.get_or_create(&TenantLabel { tenant }).set(bytes as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.exposition);
        out
    }
}

/// Resident set size from /proc (0 where there is none).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// The content type of [`crate::Registry::metrics_text`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
