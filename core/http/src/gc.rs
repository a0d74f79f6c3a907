//! `/api/v1/gc`: the collector's status, and a pass on demand (platform admin).

use std::collections::BTreeMap;

use berth_auth::Identity;
use berth_oci::RegistryError;
use berth_registry::gc::{GcReport, GcStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::http::StatusCode;

use crate::manage::{body, reply};
use crate::{Reply, Request, Services};

/// What one collection pass removed (a dry run: would remove).
#[derive(Serialize, ToSchema)]
pub struct GcPass {
    pub dry_run: bool,
    pub started_ms: i64,
    pub finished_ms: i64,
    /// Blob links no manifest needed, removed from their repositories.
    pub links_removed: u64,
    /// Per tenant, the bytes its storage usage went down by.
    pub freed_by_tenant: BTreeMap<String, u64>,
    /// Digests whose bytes were deleted from storage.
    pub blobs_deleted: u64,
    pub bytes_reclaimed: u64,
    /// In a dry run, what would go: `repository@digest` (a link) or `digest` (bytes).
    pub items: Vec<String>,
    /// Steps that failed (logged); the next pass tries them again.
    pub errors: u64,
}

/// The collector's settings, totals since start and last pass.
#[derive(Serialize, ToSchema)]
pub struct GcView {
    pub enabled: bool,
    pub interval_secs: u64,
    pub grace_secs: u64,
    pub passes: u64,
    pub links_removed: u64,
    pub blobs_deleted: u64,
    pub bytes_reclaimed: u64,
    pub last: Option<GcPass>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct GcRun {
    /// Report what would go without removing anything.
    #[serde(default)]
    pub dry_run: bool,
}

fn pass(r: GcReport) -> GcPass {
    GcPass {
        dry_run: r.dry_run,
        started_ms: r.started_ms,
        finished_ms: r.finished_ms,
        links_removed: r.links_removed,
        freed_by_tenant: r.freed_by_tenant,
        blobs_deleted: r.blobs_deleted,
        bytes_reclaimed: r.bytes_reclaimed,
        items: r.items,
        errors: r.errors,
    }
}

/// The collector's status.
#[utoipa::path(get, path = "/api/v1/gc", operation_id = "gcStatus", tag = "storage", responses((status = 200, body = GcView)))]
pub(crate) fn status(services: &Services, identity: &Identity) -> Result<Reply, RegistryError> {
    services.auth.require_platform_admin(&identity.principal)?;
    let c = services.registry.config().gc;
    let GcStatus { passes, links_removed, blobs_deleted, bytes_reclaimed, last } = services.registry.gc_status();
    let v = GcView {
        enabled: c.enabled,
        interval_secs: c.interval_secs,
        grace_secs: c.grace_secs,
        passes,
        links_removed,
        blobs_deleted,
        bytes_reclaimed,
        last: last.map(pass),
    };
    reply(StatusCode::OK, &v)
}

/// Run a collection pass now (after one in progress) and answer what it removed.
#[utoipa::path(post, path = "/api/v1/gc", operation_id = "gcRun", tag = "storage", request_body = GcRun, responses((status = 200, body = GcPass)))]
pub(crate) async fn run(services: &Services, identity: &Identity, req: &mut Request) -> Result<Reply, RegistryError> {
    services.auth.require_platform_admin(&identity.principal)?;
    let b: GcRun = body(req).await?;
    reply(StatusCode::OK, &pass(services.registry.collect(b.dry_run).await?))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct FsckRun {
    /// Fix what is safe to fix: recount references, adopt orphans, unlink links
    /// whose bytes are gone.
    #[serde(default)]
    pub repair: bool,
    /// Hash every stored blob again and compare it with its digest (reads everything).
    #[serde(default)]
    pub rehash: bool,
}

/// A list of problems (at most 1,000 shown) and how many there are.
#[derive(Serialize, ToSchema)]
pub struct FsckFinding {
    pub count: u64,
    pub items: Vec<String>,
}

/// What the integrity check found (and repaired).
#[derive(Serialize, ToSchema)]
pub struct FsckView {
    pub clean: bool,
    pub repositories: u64,
    pub links: u64,
    pub manifests: u64,
    pub tags: u64,
    pub stored_blobs: u64,
    pub stored_bytes: u64,
    pub dangling_links: FsckFinding,
    pub missing_manifests: FsckFinding,
    pub dangling_tags: FsckFinding,
    pub refcount_mismatches: FsckFinding,
    pub usage_mismatches: FsckFinding,
    pub orphans: FsckFinding,
    pub awaiting_collection: u64,
    pub digest_mismatches: FsckFinding,
    pub rehashed: bool,
    pub repaired: Vec<String>,
}

pub fn fsck_view(r: berth_registry::fsck::FsckReport) -> FsckView {
    let f = |x: berth_registry::fsck::Finding| FsckFinding { count: x.count, items: x.items };
    FsckView {
        clean: r.clean,
        repositories: r.repositories,
        links: r.links,
        manifests: r.manifests,
        tags: r.tags,
        stored_blobs: r.stored_blobs,
        stored_bytes: r.stored_bytes,
        dangling_links: f(r.dangling_links),
        missing_manifests: f(r.missing_manifests),
        dangling_tags: f(r.dangling_tags),
        refcount_mismatches: f(r.refcount_mismatches),
        usage_mismatches: f(r.usage_mismatches),
        orphans: f(r.orphans),
        awaiting_collection: r.awaiting_collection,
        digest_mismatches: f(r.digest_mismatches),
        rehashed: r.rehashed,
        repaired: r.repaired,
    }
}

/// Check metadata against storage and the reference counts against a recount
/// (platform admin); with `repair`, fix what is safe to fix.
#[utoipa::path(post, path = "/api/v1/fsck", operation_id = "fsck", tag = "storage", request_body = FsckRun, responses((status = 200, body = FsckView)))]
pub(crate) async fn fsck(services: &Services, identity: &Identity, req: &mut Request) -> Result<Reply, RegistryError> {
    services.auth.require_platform_admin(&identity.principal)?;
    let b: FsckRun = body(req).await?;
    reply(StatusCode::OK, &fsck_view(services.registry.fsck(b.repair, b.rehash).await?))
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(status, run, fsck), components(schemas(GcView, GcPass, GcRun, FsckRun, FsckView, FsckFinding)))]
pub struct GcDoc;
