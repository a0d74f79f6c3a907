//! The integrity check: metadata against storage, and the reference counts
//! against a recount.
//!
//! It reports (each list capped at 1,000 entries, with the full count):
//! - **dangling** links and manifests: metadata naming bytes storage does not
//!   have, or has at another size;
//! - **tags** whose manifest is unknown;
//! - **reference counts** (per digest, and per tenant's usage) that disagree with
//!   a recount from the links and manifests;
//! - **orphans**: stored bytes with no record at all (the collector cannot see
//!   them), and digests nothing references (the collector removes them after
//!   its grace period);
//! - with `rehash`, stored bytes whose content does not match their digest.
//!
//! `repair` fixes what is safe to fix: it counts the references again, adopts
//! orphans (so the collector removes them after its grace period), and unlinks
//! links whose bytes are gone (the repository then reports the blob unknown, so
//! a client uploads it again, instead of serving an error). Manifests with
//! missing bytes and corrupt bytes are reported, never deleted.

use std::collections::{BTreeMap, HashMap};

use berth_oci::{Digest, Digester, RegistryError, RepoName};
use futures::StreamExt;
use serde::Serialize;

use crate::{internal, now_ms, repo, Registry};

/// What `fsck` found (and, with `repair`, fixed).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct FsckReport {
    pub repositories: u64,
    pub links: u64,
    pub manifests: u64,
    pub tags: u64,
    pub stored_blobs: u64,
    pub stored_bytes: u64,
    /// `repository@digest` links whose bytes are missing or of another size.
    pub dangling_links: Finding,
    /// `repository@digest` manifests whose bytes are missing.
    pub missing_manifests: Finding,
    /// `repository:tag` pointing at no known manifest.
    pub dangling_tags: Finding,
    /// `digest: recorded N, counted M`.
    pub refcount_mismatches: Finding,
    /// `tenant: recorded N bytes, counted M`.
    pub usage_mismatches: Finding,
    /// Stored bytes without a record.
    pub orphans: Finding,
    /// Digests nothing references, awaiting the collector.
    pub awaiting_collection: u64,
    /// Stored bytes that do not match their digest (with `rehash`).
    pub digest_mismatches: Finding,
    pub rehashed: bool,
    /// What `repair` did.
    pub repaired: Vec<String>,
    /// Nothing inconsistent was found (orphans and bytes awaiting the collector
    /// are not inconsistencies).
    pub clean: bool,
}

/// A list of problems, capped, with the full count.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Finding {
    pub count: u64,
    pub items: Vec<String>,
}

const CAP: usize = 1000;

impl Finding {
    fn add(&mut self, item: String) {
        self.count += 1;
        if self.items.len() < CAP {
            self.items.push(item);
        }
    }
}

impl Registry {
    /// Check metadata against storage and the reference counts against a
    /// recount; with `repair`, fix what is safe to fix. Runs while the registry
    /// serves (a push in flight may show as a transient difference: run again).
    pub async fn fsck(&self, repair: bool, rehash: bool) -> Result<FsckReport, RegistryError> {
        let _no_collection_meanwhile = self.gc_lock.lock().await;
        let started = now_ms();
        let mut rep = FsckReport { rehashed: rehash, ..Default::default() };
        let stored: HashMap<Digest, (u64, i64)> =
            self.store.list_blobs().await.map_err(|e| internal("list stored blobs", e))?.into_iter().map(|(d, n, t)| (d, (n, t))).collect();
        rep.stored_blobs = stored.len() as u64;
        rep.stored_bytes = stored.values().map(|(n, _)| n).sum();

        // Metadata against storage, repository by repository.
        let mut dangling: Vec<(RepoName, Digest)> = vec![];
        for repo in self.index.repo_names() {
            let Some(state) = self.peek(&repo).await? else { continue };
            rep.repositories += 1;
            let s = state.read().unwrap();
            for (d, size) in &s.blobs {
                rep.links += 1;
                match stored.get(d) {
                    Some((n, _)) if n == size => {}
                    Some((n, _)) => {
                        rep.dangling_links.add(format!("{repo}@{d}: {n} bytes stored, {size} recorded"));
                        dangling.push((repo.clone(), d.clone()));
                    }
                    None => {
                        rep.dangling_links.add(format!("{repo}@{d}: no bytes"));
                        dangling.push((repo.clone(), d.clone()));
                    }
                }
            }
            for (d, m) in &s.manifests {
                rep.manifests += 1;
                if stored.get(d).is_none_or(|(n, _)| *n != m.row.size) {
                    rep.missing_manifests.add(format!("{repo}@{d}"));
                }
            }
            for (t, e) in &s.tags {
                let d = &e.digest;
                rep.tags += 1;
                if !s.manifests.contains_key(d) {
                    rep.dangling_tags.add(format!("{repo}:{t} → {d}"));
                }
            }
        }

        // Reference counts against a recount.
        let census = self.meta.reference_census().await.map_err(|e| internal("count references", e))?;
        let mut recorded: HashMap<Digest, i64> = HashMap::new();
        for c in &census {
            if c.recorded.unwrap_or(0) != c.counted {
                rep.refcount_mismatches.add(format!("{}: recorded {}, counted {}", c.digest, c.recorded.unwrap_or(0), c.counted));
            }
            if let Some(r) = c.recorded {
                recorded.insert(c.digest.clone(), r);
            }
            if c.counted == 0 && c.recorded.is_some() {
                rep.awaiting_collection += 1;
            }
        }
        let tenants = self.meta.tenants().await.map_err(|e| internal("list tenants", e))?;
        for t in &tenants {
            let usage = self.meta.tenant_usage(&t.name).await.map_err(|e| internal("tenant usage", e))?;
            let counted = self.meta.recount_storage(&t.name).await.map_err(|e| internal("recount usage", e))?;
            if usage.storage_bytes != counted {
                rep.usage_mismatches.add(format!("{}: recorded {} bytes, counted {counted}", t.name, usage.storage_bytes));
            }
        }
        let mut orphans: BTreeMap<Digest, (u64, i64)> = BTreeMap::new();
        for (d, (n, t)) in &stored {
            if !recorded.contains_key(d) {
                rep.orphans.add(format!("{d} ({n} bytes)"));
                orphans.insert(d.clone(), (*n, *t));
            }
        }

        if rehash {
            for (d, (size, _)) in &stored {
                match self.rehash(d, *size).await {
                    Ok(actual) if &actual == d => {}
                    Ok(actual) => rep.digest_mismatches.add(format!("{d}: content hashes to {actual}")),
                    Err(e) => rep.digest_mismatches.add(format!("{d}: unreadable ({})", e.detail_or_message())),
                }
            }
        }

        if repair {
            for (repo, d) in dangling {
                let quota = self.quotas.reserve(&repo, self.quotas.op_key(), 0).await?;
                let msg = repo::Link { digest: d.clone(), size: None, ends_upload: None, quota, pinned: false, announce: None };
                match Self::ask(&self.repo_actor(&repo), msg).await? {
                    Ok(()) => rep.repaired.push(format!("unlinked {repo}@{d} (its bytes are gone; clients upload it again)")),
                    Err(e) => rep.repaired.push(format!("could not unlink {repo}@{d}: {}", e.detail_or_message())),
                }
            }
            if rep.refcount_mismatches.count > 0 || rep.usage_mismatches.count > 0 || !rep.repaired.is_empty() {
                self.meta.recount_references().await.map_err(|e| internal("recount references", e))?;
                rep.repaired.push("counted every reference again (per digest and per tenant)".into());
            }
            for (d, (n, t)) in &orphans {
                self.meta.adopt_blob(d, *n, *t).await.map_err(|e| internal("adopt orphan", e))?;
            }
            if !orphans.is_empty() {
                rep.repaired.push(format!("adopted {} orphaned blobs (the collector removes them after its grace period)", orphans.len()));
            }
        }
        rep.clean = rep.dangling_links.count == 0
            && rep.missing_manifests.count == 0
            && rep.dangling_tags.count == 0
            && rep.refcount_mismatches.count == 0
            && rep.usage_mismatches.count == 0
            && rep.digest_mismatches.count == 0;
        tracing::info!(clean = rep.clean, repair, rehash, took_ms = now_ms() - started, "fsck");
        Ok(rep)
    }

    async fn rehash(&self, d: &Digest, size: u64) -> Result<Digest, RegistryError> {
        let mut h = Digester::new(d.algorithm());
        let mut s = self.store.read_blob(d, size, None).await.map_err(|e| internal("read blob", e))?;
        while let Some(chunk) = s.next().await {
            h.update(&chunk.map_err(|e| internal("read blob", e))?);
        }
        Ok(h.finish())
    }
}
