//! The registry's metrics, in the OpenMetrics text format Prometheus scrapes
//! (`GET /metrics`, platform admin). Counters are bumped where the work happens
//! (requests by the HTTP layer, collection and retention by their passes);
//! gauges are read when scraped. Tenant names appear only as labels of what
//! was reclaimed for them, which is why the endpoint is the platform admin's.

use std::time::Duration;

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
    resident: Gauge,
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
            resident: Gauge::default(),
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
        r.register_with_unit("process_resident_memory", "Resident memory of this process", Unit::Bytes, m.resident.clone());
        m
    }
}

impl Metrics {
    /// One answered request. `route` is the router's label (`manifest_get`, `api`, …).
    pub fn request(&self, route: &'static str, status: u16, took: Duration) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
        self.latency.get_or_create(&RouteLabel { route }).observe(took.as_secs_f64());
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

    /// The exposition, gauges read now.
    pub(crate) fn render(&self, repositories: usize) -> String {
        self.repositories.set(repositories as i64);
        self.resident.set(resident_bytes() as i64);
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
