//! Online garbage collection, while pushes and pulls go on.
//!
//! A pass has two steps, each bounded by `registry.gc.batch`:
//! 1. **Links** no manifest needs. A repository's blob link that none of its
//!    manifests needs (as config, layer or index child) is removed once it has
//!    been unneeded for the grace period: since it was made (a push uploads its
//!    blobs before the manifest that needs them), since the last manifest that
//!    needed it was deleted, and since a client last asked for it (`HEAD`/`GET`:
//!    a push that found the blob present is about to reference it). The
//!    repository's actor re-checks against its manifests before unlinking, in the
//!    same order as manifest commits, so a manifest committed meanwhile keeps it.
//! 2. **Bytes** nothing references. A digest whose global reference count
//!    (`stored_blob`, maintained with every link and unlink) has been 0 for the
//!    grace period, with no store in progress (pin), is marked in metadata, its
//!    bytes are deleted from storage, then its record. A mark and a new reference
//!    or pin write the same record, so they never both succeed: bytes are never
//!    deleted under a reference, and a reference is never added to bytes being
//!    deleted (an upload then stores them again; a mount falls back to an upload).
//!
//! A `Periodic` actor (lib.rs) runs a pass every `registry.gc.interval_secs`; an
//! on-demand pass (`POST /api/v1/gc`, `berth gc run`) waits for a running one.
//! Each pass reports what it removed, per tenant for the usage it freed.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use berth_oci::{Digest, ErrorCode, ParsedManifest, RegistryError, RepoName};
use serde::{Deserialize, Serialize};

use crate::{internal, now_ms, repo, Registry};

/// `[registry.gc]`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Collect in the background (on-demand passes work either way).
    pub enabled: bool,
    /// Seconds between background passes.
    pub interval_secs: u64,
    /// Seconds a link or a digest must have been unneeded before it goes.
    pub grace_secs: u64,
    /// The most links, and the most digests, one pass removes.
    pub batch: usize,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig { enabled: true, interval_secs: 300, grace_secs: 3600, batch: 10_000 }
    }
}

/// What one pass removed (or, in a dry run, would remove).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GcReport {
    pub dry_run: bool,
    pub started_ms: i64,
    pub finished_ms: i64,
    /// Blob links removed from repositories.
    pub links_removed: u64,
    /// Per tenant: the bytes its usage went down by.
    pub freed_by_tenant: BTreeMap<String, u64>,
    /// Digests whose bytes were deleted from storage, and their bytes.
    pub blobs_deleted: u64,
    pub bytes_reclaimed: u64,
    /// `repository@digest` for links, `digest` for bytes (dry runs; capped at 1,000).
    pub items: Vec<String>,
    /// Steps that failed (logged); the next pass tries again.
    pub errors: u64,
}

const MAX_ITEMS: usize = 1000;

impl GcReport {
    fn note(&mut self, item: String) {
        if self.dry_run && self.items.len() < MAX_ITEMS {
            self.items.push(item);
        }
    }
}

/// Totals since start, and the last pass.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GcStatus {
    pub passes: u64,
    pub links_removed: u64,
    pub blobs_deleted: u64,
    pub bytes_reclaimed: u64,
    pub last: Option<GcReport>,
}

impl Registry {
    /// Run one collection pass now (after any pass in progress).
    pub async fn collect(&self, dry_run: bool) -> Result<GcReport, RegistryError> {
        let _one_at_a_time = self.gc_lock.lock().await;
        // At least a second: a push that found its bytes referenced relies on
        // them outliving its request (see `put_manifest`).
        let grace_ms = (self.config.gc.grace_secs.max(1) as i64).saturating_mul(1000);
        let mut report = GcReport { dry_run, started_ms: now_ms(), ..Default::default() };
        let cutoff = report.started_ms - grace_ms;
        self.index.prune_touches(cutoff);
        self.collect_links(cutoff, &mut report).await;
        self.collect_bytes(cutoff, &mut report).await?;
        report.finished_ms = now_ms();
        self.metrics.gc_pass(&report);
        if !dry_run {
            let mut st = self.gc_status.lock().unwrap();
            st.passes += 1;
            st.links_removed += report.links_removed;
            st.blobs_deleted += report.blobs_deleted;
            st.bytes_reclaimed += report.bytes_reclaimed;
            st.last = Some(report.clone());
        }
        if report.links_removed > 0 || report.blobs_deleted > 0 || report.errors > 0 {
            tracing::info!(
                dry_run,
                links = report.links_removed,
                blobs = report.blobs_deleted,
                bytes = report.bytes_reclaimed,
                errors = report.errors,
                "garbage collection pass"
            );
        }
        Ok(report)
    }

    /// Totals since start and the last pass.
    pub fn gc_status(&self) -> GcStatus {
        self.gc_status.lock().unwrap().clone()
    }

    /// What a manifest needs in its repository, read from its bytes when the
    /// row predates the recorded list (and then recorded).
    async fn manifest_refs(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Digest>, RegistryError> {
        let (body, _) = self.read_manifest(repo, &berth_oci::Reference::Digest(digest.clone()), true).await?;
        let parsed = ParsedManifest::parse(&body.bytes, Some(&body.media_type))?;
        let refs: Vec<Digest> = parsed.required_blobs().chain(parsed.required_manifests()).cloned().collect();
        if let Err(e) = self.meta.set_manifest_refs(repo, digest, &refs).await {
            tracing::warn!(%repo, %digest, error = %e, "recording a manifest's references failed");
        } else if let Some(state) = self.index.held(repo) {
            if let Some(m) = state.write().unwrap().manifests.get_mut(digest) {
                m.row.refs = Some(refs.clone());
            }
        }
        Ok(refs)
    }

    /// The links of `repo` that none of its manifests needs.
    pub(crate) async fn unneeded_links(&self, repo: &RepoName) -> Result<Vec<Digest>, RegistryError> {
        let Some(state) = self.peek(repo).await? else { return Ok(vec![]) };
        let (mut needed, unknown, links): (HashSet<Digest>, Vec<Digest>, Vec<Digest>) = {
            let s = state.read().unwrap();
            let mut needed = HashSet::new();
            let mut unknown = vec![];
            for (d, m) in &s.manifests {
                match &m.row.refs {
                    Some(refs) => needed.extend(refs.iter().cloned()),
                    None => unknown.push(d.clone()),
                }
            }
            (needed, unknown, s.blobs.keys().cloned().collect())
        };
        if links.iter().all(|d| needed.contains(d)) {
            return Ok(vec![]);
        }
        for d in unknown {
            match self.manifest_refs(repo, &d).await {
                Ok(refs) => needed.extend(refs),
                // Deleted meanwhile: it needs nothing any more.
                Err(e) if e.code() == ErrorCode::ManifestUnknown || e.code() == ErrorCode::NameUnknown => {}
                Err(e) => return Err(e),
            }
        }
        Ok(links.into_iter().filter(|d| !needed.contains(d)).collect())
    }

    async fn collect_links(&self, cutoff: i64, report: &mut GcReport) {
        let mut budget = self.config.gc.batch;
        for repo in self.index.repo_names() {
            if budget == 0 {
                break;
            }
            let unneeded = match self.unneeded_links(&repo).await {
                Ok(u) if u.is_empty() => continue,
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(%repo, error = %e.detail_or_message(), "collector: reading manifests failed");
                    report.errors += 1;
                    continue;
                }
            };
            let ages = match self.meta.link_ages(&repo).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(%repo, error = %e, "collector: reading links failed");
                    report.errors += 1;
                    continue;
                }
            };
            let unneeded: HashSet<Digest> = unneeded.into_iter().collect();
            for age in ages.into_iter().filter(|a| unneeded.contains(&a.digest)) {
                if budget == 0 {
                    break;
                }
                if age.linked_ms.max(age.released_ms) >= cutoff || self.index.touched_since(&repo, &age.digest, cutoff) {
                    continue;
                }
                budget -= 1;
                if report.dry_run {
                    report.links_removed += 1;
                    report.note(format!("{repo}@{}", age.digest));
                    continue;
                }
                let quota = match self.quotas.reserve(&repo, self.quotas.op_key(), 0).await {
                    Ok(q) => q,
                    Err(e) => {
                        tracing::warn!(%repo, error = %e.detail_or_message(), "collector: quota");
                        report.errors += 1;
                        continue;
                    }
                };
                let msg = repo::Collect { digest: age.digest.clone(), cutoff, quota };
                match Self::ask(&self.repo_actor(&repo), msg).await {
                    Ok(Ok(Some(freed))) => {
                        report.links_removed += 1;
                        if let Ok(Some(t)) = self.quotas.owner(&repo).await {
                            *report.freed_by_tenant.entry(t.to_string()).or_default() += freed;
                        }
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) | Err(e) => {
                        tracing::warn!(%repo, digest = %age.digest, error = %e.detail_or_message(), "collector: unlinking failed");
                        report.errors += 1;
                    }
                }
            }
        }
    }

    async fn collect_bytes(&self, cutoff: i64, report: &mut GcReport) -> Result<(), RegistryError> {
        let candidates = self.meta.unreferenced_blobs(cutoff, self.config.gc.batch).await.map_err(|e| internal("list unreferenced", e))?;
        for c in candidates {
            if report.dry_run {
                report.blobs_deleted += 1;
                report.bytes_reclaimed += c.size;
                report.note(c.digest.to_string());
                continue;
            }
            match self.meta.mark_collecting(&c.digest, cutoff).await {
                Ok(true) => {}
                Ok(false) => continue, // referenced or pinned meanwhile
                Err(e) => {
                    tracing::warn!(digest = %c.digest, error = %e, "collector: marking failed");
                    report.errors += 1;
                    continue;
                }
            }
            if let Err(e) = self.store.delete_blob(&c.digest).await {
                // The mark stays: the next pass tries again, and nothing can
                // reference the digest meanwhile.
                tracing::warn!(digest = %c.digest, error = %e, "collector: deleting bytes failed");
                report.errors += 1;
                continue;
            }
            if let Err(e) = self.meta.forget_blob(&c.digest).await {
                tracing::warn!(digest = %c.digest, error = %e, "collector: forgetting a collected digest failed");
                report.errors += 1;
                continue;
            }
            report.blobs_deleted += 1;
            report.bytes_reclaimed += c.size;
        }
        Ok(())
    }

    /// Pin `digest` before its bytes are stored; waits out a collection of the
    /// same digest in progress (it deletes the old bytes, then we store ours).
    pub(crate) async fn pin(&self, digest: &Digest) -> Result<(), RegistryError> {
        for _ in 0..200 {
            match self.meta.pin_blob(digest).await {
                Ok(true) => return Ok(()),
                Ok(false) => tokio::time::sleep(Duration::from_millis(25)).await,
                Err(e) => return Err(internal("pin blob", e)),
            }
        }
        Err(RegistryError::new(ErrorCode::Unavailable).with_detail(format!("{digest} is being collected; try again")))
    }

    /// Release a pin after a store that failed before the link.
    pub(crate) async fn unpin(&self, digest: &Digest) {
        if let Err(e) = self.meta.unpin_blob(digest).await {
            tracing::warn!(%digest, error = %e, "releasing a pin failed (it goes stale in an hour)");
        }
    }
}
