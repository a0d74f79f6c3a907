//! Per-tenant storage usage and quota limits.
//!
//! Usage is derived from references, maintained in the same transaction as the
//! references themselves: `tenant_blob:[tenant, digest]` holds a digest's size and
//! how many references the tenant's repositories hold to it (a blob link or a
//! manifest each count one). The row is created when the first reference appears
//! and deleted when the last goes, so a tenant's storage usage is the sum of its
//! rows' sizes: each digest counted once however many repositories use it, exact
//! after any interleaving (every change is one transaction), and concurrent pushes
//! of different blobs write different rows (no single counter row to contend on).

use berth_oci::AccountName;
use serde::{Deserialize, Serialize};

use crate::{one, returned, Metadata, Result};

pub(crate) const SCHEMA: &str = r#"
DEFINE TABLE IF NOT EXISTS tenant_blob SCHEMALESS;
DEFINE INDEX IF NOT EXISTS tenant_blob_tenant ON tenant_blob FIELDS tenant;
DEFINE TABLE IF NOT EXISTS tenant_quota SCHEMALESS;
DEFINE TABLE IF NOT EXISTS meta SCHEMALESS;
DEFINE INDEX IF NOT EXISTS namespace_tenant ON namespace FIELDS tenant;
"#;

/// The reference counts' version: 1 per tenant; 2 also per digest (`stored_blob`).
const USAGE_VERSION: u64 = 2;

/// Binds `$tenant`: the tenant owning `$namespace` (`''` when no tenant owns it).
pub(crate) const TENANT_OF: &str = "LET $tenant = (SELECT VALUE tenant FROM ONLY type::record('namespace', $namespace)) OR '';";

/// When `$new` (the repository did not reference `$digest` before), one more
/// reference by `$tenant` to `$digest` of `$size` bytes. Binds `$added`: the bytes
/// this adds to the tenant's usage (0 when another of its repositories already
/// references the digest).
///
/// The digest's global record (`stored_blob`, see [`crate::gc`]) gains the
/// reference too, and loses the upload's pin when `$pinned`. The whole
/// transaction fails with [`crate::MetadataError::Collecting`] if the collector
/// has marked the digest: a reference can never be added to bytes being deleted
/// (the mark and this write touch the same record, so one of them loses).
pub(crate) const REF_ADD: &str = "IF (SELECT VALUE gc FROM ONLY type::record('stored_blob', $digest)) = true { THROW 'berth:collecting'; };
     LET $added = IF $new AND !(SELECT VALUE refs FROM ONLY type::record('tenant_blob', [$tenant, $digest])) { $size } ELSE { 0 };
     IF $new {
        UPSERT type::record('tenant_blob', [$tenant, $digest]) SET tenant = $tenant, digest = $digest, size = $size, refs = (refs OR 0) + 1 RETURN NONE;
        UPSERT type::record('stored_blob', $digest) SET digest = $digest, size = $size, refs = (refs OR 0) + 1, pins = pins OR 0, gc = false RETURN NONE;
     };
     IF $pinned { UPDATE type::record('stored_blob', $digest) SET pins = math::max([(pins OR 0) - 1, 0]) RETURN NONE; };";

/// One reference fewer by `$tenant` to each digest in the array `list` (a digest
/// listed twice loses two), in the tenant's counts and the digests' global
/// records (stamped `unref_ms = $now`). Binds `$freed`: the bytes of the digests
/// whose last reference this was, which leave the tenant's usage.
pub(crate) fn ref_release(list: &str) -> String {
    format!(
        "LET $released = {list};
         FOR $d IN $released {{
            UPDATE type::record('tenant_blob', [$tenant, $d]) SET refs -= 1 RETURN NONE;
            UPDATE type::record('stored_blob', $d) SET refs -= 1, unref_ms = $now RETURN NONE;
         }};
         LET $rows = array::distinct($released).map(|$d| type::record('tenant_blob', [$tenant, $d]));
         LET $freed = math::sum((DELETE $rows WHERE refs <= 0 RETURN BEFORE).size);"
    )
}

/// A tenant's limits; `None` is "no limit of its own" (the configured default applies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    pub namespaces: Option<u64>,
    pub repositories: Option<u64>,
    pub storage_bytes: Option<u64>,
}

/// What a tenant uses, counted from the metadata itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    pub namespaces: u64,
    pub repositories: u64,
    /// Bytes its repositories reference (blobs and manifests), each digest once.
    pub storage_bytes: u64,
}

impl Metadata {
    /// The tenant owning a namespace, if any.
    pub async fn namespace_owner(&self, namespace: &str) -> Result<Option<AccountName>> {
        let mut r = self
            .db
            .query("SELECT VALUE tenant FROM ONLY type::record('namespace', $ns)")
            .bind(("ns", namespace.to_owned()))
            .await?
            .check()?;
        one(&mut r, 0)
    }

    /// A tenant's usage as the reference counts have it.
    pub async fn tenant_usage(&self, tenant: &AccountName) -> Result<TenantUsage> {
        let mut r = self
            .db
            .query(
                "LET $ns = (SELECT VALUE name FROM namespace WHERE tenant = $t);
                 RETURN {
                    namespaces: count($ns),
                    repositories: count((SELECT VALUE name FROM repo WHERE namespace IN $ns)),
                    storage_bytes: math::sum((SELECT VALUE size FROM tenant_blob WHERE tenant = $t))
                 };",
            )
            .bind(("t", tenant.to_string()))
            .await?
            .check()?;
        Ok(returned(&mut r)?.unwrap_or_default())
    }

    /// Every tenant's storage usage (the bytes of the digests its repositories
    /// reference, each once), tenants that reference nothing left out.
    pub async fn storage_by_tenant(&self) -> Result<Vec<(AccountName, u64)>> {
        #[derive(Deserialize)]
        struct Row {
            tenant: AccountName,
            bytes: u64,
        }
        let mut r =
            self.db.query("SELECT tenant, math::sum(size) AS bytes FROM tenant_blob WHERE tenant != '' GROUP BY tenant").await?.check()?;
        let rows: Vec<Row> = crate::rows(&mut r, 0)?;
        Ok(rows.into_iter().map(|r| (r.tenant, r.bytes)).collect())
    }

    /// The repositories of a tenant's namespaces.
    pub async fn tenant_repos(&self, tenant: &AccountName) -> Result<Vec<berth_oci::RepoName>> {
        let mut r = self
            .db
            .query("SELECT VALUE name FROM repo WHERE namespace IN (SELECT VALUE name FROM namespace WHERE tenant = $t)")
            .bind(("t", tenant.to_string()))
            .await?
            .check()?;
        crate::rows(&mut r, 0)
    }

    /// A tenant's storage counted from scratch: the distinct digests its
    /// repositories link or hold as manifests. The reference counts must always
    /// agree with this (tests and `fsck` compare them).
    pub async fn recount_storage(&self, tenant: &AccountName) -> Result<u64> {
        let mut r = self
            .db
            .query(
                "LET $repos = (SELECT VALUE name FROM repo WHERE namespace IN (SELECT VALUE name FROM namespace WHERE tenant = $t));
                 LET $all = array::distinct(array::flatten([
                    (SELECT VALUE [digest, size] FROM blob_link WHERE repo IN $repos),
                    (SELECT VALUE [digest, size] FROM manifest WHERE repo IN $repos)]));
                 RETURN math::sum($all.map(|$x| $x[1]));",
            )
            .bind(("t", tenant.to_string()))
            .await?
            .check()?;
        Ok(returned(&mut r)?.unwrap_or(0))
    }

    /// Build the reference counts (per tenant and per digest) from the links and
    /// manifests, once: for a store written before they existed (a marker row
    /// records the version built).
    pub async fn ensure_usage_counted(&self) -> Result<bool> {
        let mut r = self.db.query("SELECT VALUE version FROM ONLY meta:usage").await?.check()?;
        if one::<u64>(&mut r, 0)?.is_some_and(|v| v >= USAGE_VERSION) {
            return Ok(false);
        }
        self.run(|| {
            self.db
                .query(
                    "BEGIN TRANSACTION;
                 DELETE tenant_blob RETURN NONE;
                 UPDATE stored_blob SET refs = 0 RETURN NONE;
                 FOR $r IN array::flatten([(SELECT repo, digest, size FROM blob_link), (SELECT repo, digest, size FROM manifest)]) {
                    LET $ns = (SELECT VALUE namespace FROM ONLY type::record('repo', $r.repo)) OR '';
                    LET $tenant = (SELECT VALUE tenant FROM ONLY type::record('namespace', $ns)) OR '';
                    UPSERT type::record('tenant_blob', [$tenant, $r.digest])
                        SET tenant = $tenant, digest = $r.digest, size = $r.size, refs = (refs OR 0) + 1 RETURN NONE;
                    UPSERT type::record('stored_blob', $r.digest)
                        SET digest = $r.digest, size = $r.size, refs = (refs OR 0) + 1, pins = pins OR 0, gc = false RETURN NONE;
                 };
                 UPSERT meta:usage SET version = $version RETURN NONE;
                 COMMIT TRANSACTION;",
                )
                .bind(("version", USAGE_VERSION))
        })
        .await?;
        Ok(true)
    }

    /// The limits set for a tenant (each `None` where the default applies).
    pub async fn quota_limits(&self, tenant: &AccountName) -> Result<QuotaLimits> {
        let mut r = self
            .db
            .query("SELECT namespaces, repositories, storage_bytes FROM ONLY type::record('tenant_quota', $t)")
            .bind(("t", tenant.to_string()))
            .await?
            .check()?;
        Ok(one(&mut r, 0)?.unwrap_or_default())
    }

    /// Set a tenant's limits (all three at once; `None` returns one to the default).
    pub async fn set_quota_limits(&self, tenant: &AccountName, limits: &QuotaLimits) -> Result<()> {
        self.db
            .query("UPSERT type::record('tenant_quota', $t) CONTENT $limits RETURN NONE")
            .bind(("t", tenant.to_string()))
            .bind(("limits", crate::to_value(limits)?))
            .await?
            .check()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::mem;
    use crate::{LinkRow, ManifestRow, NamespaceRow};
    use berth_oci::{Digest, RepoName};

    fn manifest(repo: &RepoName, bytes: &[u8]) -> ManifestRow {
        crate::tests::row(repo, bytes)
    }

    #[tokio::test]
    async fn usage_counts_each_digest_once_per_tenant() {
        let md = mem().await;
        let acme: AccountName = "acme".parse().unwrap();
        let beta: AccountName = "beta".parse().unwrap();
        md.create_namespace(&NamespaceRow { name: acme.clone(), tenant: acme.clone() }).await.unwrap();
        md.create_namespace(&NamespaceRow { name: "tools".parse().unwrap(), tenant: acme.clone() }).await.unwrap();
        md.create_namespace(&NamespaceRow { name: beta.clone(), tenant: beta.clone() }).await.unwrap();
        let (a1, a2, b1): (RepoName, RepoName, RepoName) =
            ("acme/one".parse().unwrap(), "tools/two".parse().unwrap(), "beta/one".parse().unwrap());
        let layer = Digest::sha256(b"layer");
        let link = |repo: &RepoName, size| LinkRow { repo: repo.clone(), digest: layer.clone(), size };

        // The first reference adds the bytes; a second repository of the same
        // tenant, or the same link again, adds nothing; another tenant pays its own.
        assert_eq!(md.link_blob(&crate::Guard::any(), &link(&a1, 100), None, false, &[]).await.unwrap(), 100);
        assert_eq!(md.link_blob(&crate::Guard::any(), &link(&a1, 100), None, false, &[]).await.unwrap(), 0);
        assert_eq!(md.link_blob(&crate::Guard::any(), &link(&a2, 100), None, false, &[]).await.unwrap(), 0);
        assert_eq!(md.link_blob(&crate::Guard::any(), &link(&b1, 100), None, false, &[]).await.unwrap(), 100);
        let m = manifest(&a1, b"manifest-1");
        assert_eq!(md.commit_manifest(&crate::Guard::any(), &m, None, false, &[]).await.unwrap(), 10);
        assert_eq!(md.commit_manifest(&crate::Guard::any(), &m, None, false, &[]).await.unwrap(), 0, "a re-push adds nothing");
        let usage = md.tenant_usage(&acme).await.unwrap();
        assert_eq!(usage, TenantUsage { namespaces: 2, repositories: 2, storage_bytes: 110 });
        assert_eq!(md.recount_storage(&acme).await.unwrap(), 110);

        // Releasing: the bytes leave only with the last reference.
        assert_eq!(md.unlink_blob(&crate::Guard::any(), &a1, &layer).await.unwrap(), 0);
        assert_eq!(md.unlink_blob(&crate::Guard::any(), &a1, &layer).await.unwrap(), 0, "unlinking twice releases once");
        assert_eq!(md.delete_manifest(&crate::Guard::any(), &a1, &m.digest, &[]).await.unwrap(), 10);
        assert_eq!(md.tenant_usage(&acme).await.unwrap().storage_bytes, 100);
        let removed = md.delete_repo(&crate::Guard::any(), &a2, &[]).await.unwrap();
        assert_eq!(removed.freed_bytes, 100);
        assert_eq!(md.tenant_usage(&acme).await.unwrap().storage_bytes, 0);
        assert_eq!(md.recount_storage(&acme).await.unwrap(), 0);
        assert_eq!(md.tenant_usage(&beta).await.unwrap().storage_bytes, 100);

        // A repository holding the same digest as a link and as a manifest
        // releases both references when it goes.
        let both = manifest(&b1, b"as-both");
        md.link_blob(&crate::Guard::any(), &LinkRow { repo: b1.clone(), digest: both.digest.clone(), size: both.size }, None, false, &[])
            .await
            .unwrap();
        md.commit_manifest(&crate::Guard::any(), &both, None, false, &[]).await.unwrap();
        assert_eq!(md.tenant_usage(&beta).await.unwrap().storage_bytes, 107);
        assert_eq!(md.delete_repo(&crate::Guard::any(), &b1, &[]).await.unwrap().freed_bytes, 107);
        assert_eq!(md.tenant_usage(&beta).await.unwrap().storage_bytes, 0);
    }

    #[tokio::test]
    async fn a_repository_delete_hides_it_then_sweeps_in_parts() {
        let md = mem().await;
        let acme: AccountName = "acme".parse().unwrap();
        md.create_namespace(&NamespaceRow { name: acme.clone(), tenant: acme.clone() }).await.unwrap();
        let big: RepoName = "acme/big".parse().unwrap();
        // Seven tagged manifests and five links: four parts of two.
        let fill = |repo: RepoName, salt: &'static str| {
            let md = md.clone();
            async move {
                for i in 0..5 {
                    let link = LinkRow { repo: repo.clone(), digest: Digest::sha256(format!("{salt}-layer-{i}").as_bytes()), size: 10 };
                    md.link_blob(&crate::Guard::any(), &link, None, false, &[]).await.unwrap();
                }
                for i in 0..7 {
                    let m = manifest(&repo, format!("{salt}-manifest-{i}").as_bytes());
                    let tag = crate::TagRow {
                        repo: repo.clone(),
                        name: format!("v{i}").parse().unwrap(),
                        digest: m.digest.clone(),
                        updated_ms: 1,
                    };
                    md.commit_manifest(&crate::Guard::any(), &m, Some(&tag), false, &[]).await.unwrap();
                }
            }
        };
        fill(big.clone(), "a").await;
        let stored = md.tenant_usage(&acme).await.unwrap().storage_bytes;
        assert_eq!(stored, 5 * 10 + 7 * 12);

        // Hidden: no read finds it, its name is not listed, it is not counted;
        // its references stay until the sweep.
        assert!(md.hide_repo(&crate::Guard::any(), &big, &[]).await.unwrap());
        assert_eq!(md.repo_profile(&big).await.unwrap(), None);
        assert!(md.repo_snapshot(&big).await.unwrap().repos.is_empty());
        assert!(!md.all_repo_heads().await.unwrap().0.iter().any(|h| h.name == big));
        assert_eq!(md.tenant_usage(&acme).await.unwrap(), TenantUsage { namespaces: 1, repositories: 0, storage_bytes: stored });
        assert!(!md.hide_repo(&crate::Guard::any(), &big, &[]).await.unwrap(), "hidden once");

        let mut removed = crate::Removed::default();
        md.sweep_in_parts(&big, 2, &mut removed).await.unwrap();
        assert_eq!(removed, crate::Removed { tags: 7, manifests: 7, blob_links: 5, freed_bytes: stored });
        assert_eq!(md.tenant_usage(&acme).await.unwrap().storage_bytes, 0);
        assert_eq!(md.recount_storage(&acme).await.unwrap(), 0);
        let mut again = crate::Removed::default();
        md.sweep_in_parts(&big, 2, &mut again).await.unwrap();
        assert_eq!(again, crate::Removed::default(), "a second sweep finds nothing");

        // A push to the name while a sweep is unfinished (a crash part-way)
        // finishes the sweep first: nothing of the old repository comes back.
        fill(big.clone(), "b").await;
        assert!(md.hide_repo(&crate::Guard::any(), &big, &[]).await.unwrap());
        let fresh = LinkRow { repo: big.clone(), digest: Digest::sha256(b"fresh"), size: 3 };
        assert_eq!(md.link_blob(&crate::Guard::any(), &fresh, None, false, &[]).await.unwrap(), 3);
        let snap = md.repo_snapshot(&big).await.unwrap();
        assert_eq!((snap.repos.len(), snap.tags.len(), snap.manifests.len(), snap.links.len()), (1, 0, 0, 1));
        assert_eq!(md.tenant_usage(&acme).await.unwrap().storage_bytes, 3);
        assert_eq!(md.recount_storage(&acme).await.unwrap(), 3);

        // So does an explicit create; and the periodic sweep finishes what no
        // one else did.
        let other: RepoName = "acme/other".parse().unwrap();
        fill(other.clone(), "c").await;
        assert!(md.hide_repo(&crate::Guard::any(), &other, &[]).await.unwrap());
        assert_eq!(md.sweep_hidden(60_000).await.unwrap(), 0, "a marker swept just now is left to its sweeper");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(md.sweep_hidden(0).await.unwrap(), 1);
        assert_eq!(md.sweep_hidden(0).await.unwrap(), 0);
        assert_eq!(md.tenant_usage(&acme).await.unwrap().storage_bytes, 3);
        fill(other.clone(), "d").await;
        assert!(md.hide_repo(&crate::Guard::any(), &other, &[]).await.unwrap());
        let profile = crate::RepoProfile::new(other.clone(), 1);
        assert!(md.create_repo(&profile, &[]).await.unwrap());
        assert!(md.repo_snapshot(&other).await.unwrap().tags.is_empty());
        assert_eq!(md.recount_storage(&acme).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn counts_are_built_once_for_an_older_store() {
        let md = mem().await;
        let acme: AccountName = "acme".parse().unwrap();
        md.create_namespace(&NamespaceRow { name: acme.clone(), tenant: acme.clone() }).await.unwrap();
        let repo: RepoName = "acme/app".parse().unwrap();
        md.link_blob(&crate::Guard::any(), &LinkRow { repo: repo.clone(), digest: Digest::sha256(b"x"), size: 7 }, None, false, &[])
            .await
            .unwrap();
        md.commit_manifest(&crate::Guard::any(), &manifest(&repo, b"m"), None, false, &[]).await.unwrap();
        // As if written before the counts existed.
        md.db.query("DELETE tenant_blob; DELETE meta:usage;").await.unwrap().check().unwrap();
        assert!(md.ensure_usage_counted().await.unwrap());
        assert_eq!(md.tenant_usage(&acme).await.unwrap().storage_bytes, 8);
        assert!(!md.ensure_usage_counted().await.unwrap(), "only once");
    }

    #[tokio::test]
    async fn limits_round_trip() {
        let md = mem().await;
        let t: AccountName = "acme".parse().unwrap();
        assert_eq!(md.quota_limits(&t).await.unwrap(), QuotaLimits::default());
        let l = QuotaLimits { namespaces: Some(2), repositories: None, storage_bytes: Some(1 << 30) };
        md.set_quota_limits(&t, &l).await.unwrap();
        assert_eq!(md.quota_limits(&t).await.unwrap(), l);
    }
}
