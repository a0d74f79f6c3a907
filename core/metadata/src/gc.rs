//! What the garbage collector needs from metadata: one record per stored digest
//! with its reference count, pins and collection mark.
//!
//! `stored_blob:[digest]` `{ digest, size, refs, pins, pinned_ms, unref_ms, gc }`:
//! - `refs`: blob links plus manifest rows, in every repository, that name the
//!   digest; changed in the same transaction as the references (see
//!   [`crate::usage`]), stamped `unref_ms` when one goes.
//! - `pins`: stores in progress. Bytes are pinned *before* they are written to
//!   storage ([`Metadata::pin_blob`]) and the pin is released by the transaction
//!   that links them (or by [`Metadata::unpin_blob`] when the store failed). A pin
//!   older than [`STALE_PIN_MS`] belongs to a process that died mid-store.
//! - `gc`: set by the collector ([`Metadata::mark_collecting`]) only while `refs`
//!   is 0, no live pin is held and the grace period has passed; while set, pins
//!   and new references are refused. The collector then deletes the bytes and the
//!   record ([`Metadata::forget_blob`]).
//!
//! Each of these steps writes the digest's one record, and SurrealDB lets only one
//! of two conflicting writers of a record commit; so a reference or pin and a
//! mark never both succeed against the same state: bytes a reference points at
//! are never deleted, and bytes being deleted never gain a reference.

use berth_oci::{Digest, RepoName};
use serde::Deserialize;

use crate::{now_ms, returned, rows, Metadata, Result};

pub(crate) const SCHEMA: &str = r#"
DEFINE TABLE IF NOT EXISTS stored_blob SCHEMALESS;
DEFINE INDEX IF NOT EXISTS stored_blob_refs ON stored_blob FIELDS refs;
"#;

/// A pin older than this is a store that never finished (its process died).
pub const STALE_PIN_MS: i64 = 3600 * 1000;

/// A digest nothing references any more.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Unreferenced {
    pub digest: Digest,
    pub size: u64,
}

/// One digest's references: counted from links and manifests, and as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct Census {
    pub digest: Digest,
    pub counted: i64,
    /// `None`: no record (bytes stored before records existed, or never stored).
    pub recorded: Option<i64>,
    /// Marked by the collector.
    pub marked: bool,
}

/// A blob link with its times.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct LinkAge {
    pub digest: Digest,
    pub size: u64,
    /// When the link was made (0: before this was recorded).
    pub linked_ms: i64,
    /// When a manifest that needed it was deleted (0: never).
    pub released_ms: i64,
}

impl Metadata {
    /// Pin `digest` before its bytes are stored, so the collector leaves them
    /// alone until they are linked. `false`: the collector is deleting it right
    /// now; store again a moment later.
    pub async fn pin_blob(&self, digest: &Digest) -> Result<bool> {
        let _turn = self.digest_turn(digest).await;
        let mut r = self
            .run(|| {
                self.db
                    .query(
                        "BEGIN TRANSACTION;
                 IF (SELECT VALUE gc FROM ONLY type::record('stored_blob', $digest)) = true { RETURN false; };
                 UPSERT type::record('stored_blob', $digest)
                    SET digest = $digest, refs = refs OR 0, size = size OR 0, pins = (pins OR 0) + 1, pinned_ms = $now, gc = false RETURN NONE;
                 RETURN true;
                 COMMIT TRANSACTION;",
                    )
                    .bind(("digest", digest.to_string()))
                    .bind(("now", now_ms()))
            })
            .await?;
        Ok(returned::<bool>(&mut r)?.unwrap_or(false))
    }

    /// Release a pin whose store failed before the bytes were linked.
    pub async fn unpin_blob(&self, digest: &Digest) -> Result<()> {
        let _turn = self.digest_turn(digest).await;
        self.run(|| {
            self.db
                .query("UPDATE type::record('stored_blob', $digest) SET pins = math::max([(pins OR 0) - 1, 0]) RETURN NONE")
                .bind(("digest", digest.to_string()))
        })
        .await?;
        Ok(())
    }

    /// Up to `limit` digests nothing references, unreferenced since before
    /// `cutoff_ms` (marked ones first, so an interrupted collection finishes).
    pub async fn unreferenced_blobs(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<Unreferenced>> {
        let mut r = self
            .db
            .query(
                "SELECT digest, size OR 0 AS size, gc OR false AS gc FROM stored_blob
                 WHERE refs <= 0 AND (unref_ms OR 0) < $cutoff ORDER BY gc DESC LIMIT $limit",
            )
            .bind(("cutoff", cutoff_ms))
            .bind(("limit", limit as i64))
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    /// Mark `digest` for collection if it is still unreferenced, unreferenced
    /// since before `cutoff_ms`, and holds no live pin. `true`: marked; delete its
    /// bytes, then [`Metadata::forget_blob`].
    pub async fn mark_collecting(&self, digest: &Digest, cutoff_ms: i64) -> Result<bool> {
        let _turn = self.digest_turn(digest).await;
        let mut r = self
            .run(|| {
                self.db
                    .query(
                        "UPDATE type::record('stored_blob', $digest) SET gc = true
                         WHERE refs <= 0 AND (unref_ms OR 0) < $cutoff AND ((pins OR 0) <= 0 OR (pinned_ms OR 0) < $stale)
                         RETURN VALUE digest",
                    )
                    .bind(("digest", digest.to_string()))
                    .bind(("cutoff", cutoff_ms))
                    .bind(("stale", now_ms() - STALE_PIN_MS))
            })
            .await?;
        let marked: Vec<String> = rows(&mut r, 0)?;
        Ok(!marked.is_empty())
    }

    /// Forget a collected digest (its bytes are gone).
    pub async fn forget_blob(&self, digest: &Digest) -> Result<()> {
        let _turn = self.digest_turn(digest).await;
        self.run(|| {
            self.db.query("DELETE type::record('stored_blob', $digest) WHERE gc = true RETURN NONE").bind(("digest", digest.to_string()))
        })
        .await?;
        Ok(())
    }

    /// Whether a digest has a record at all (bytes in storage without one were
    /// stored before records existed, or by a store that died before pinning).
    pub async fn blob_known(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let ids: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
        let mut r = self.db.query("SELECT VALUE digest FROM stored_blob WHERE digest IN $ids").bind(("ids", ids)).await?.check()?;
        rows(&mut r, 0)
    }

    /// Record a digest found in storage without a record, as unreferenced since
    /// `since_ms` (its file's time), so the collector treats it like any other.
    pub async fn adopt_blob(&self, digest: &Digest, size: u64, since_ms: i64) -> Result<()> {
        self.run(|| {
            self.db
                .query(
                    "IF !(SELECT VALUE digest FROM ONLY type::record('stored_blob', $digest)) {
                        CREATE type::record('stored_blob', $digest)
                            CONTENT { digest: $digest, size: $size, refs: 0, pins: 0, unref_ms: $since, gc: false } RETURN NONE;
                     };",
                )
                .bind(("digest", digest.to_string()))
                .bind(("size", size))
                .bind(("since", since_ms))
        })
        .await?;
        Ok(())
    }

    /// Every blob link of a repository with its times.
    pub async fn link_ages(&self, repo: &RepoName) -> Result<Vec<LinkAge>> {
        let mut r = self
            .db
            .query("SELECT digest, size, linked_ms OR 0 AS linked_ms, released_ms OR 0 AS released_ms FROM blob_link WHERE repo = $repo")
            .bind(("repo", repo.to_string()))
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    /// Record what a manifest written before `refs` existed needs.
    pub async fn set_manifest_refs(&self, repo: &RepoName, digest: &Digest, refs: &[Digest]) -> Result<()> {
        let refs: Vec<String> = refs.iter().map(|d| d.to_string()).collect();
        self.db
            .query("UPDATE type::record('manifest', [$repo, $digest]) SET refs = $refs RETURN NONE")
            .bind(("repo", repo.to_string()))
            .bind(("digest", digest.to_string()))
            .bind(("refs", refs))
            .await?
            .check()?;
        Ok(())
    }

    /// For `fsck`: every digest's recorded count (and mark), and its references
    /// counted from the links and manifests themselves.
    pub async fn reference_census(&self) -> Result<Vec<Census>> {
        let mut r = self
            .db
            .query(
                "SELECT digest, count() AS n FROM blob_link GROUP BY digest;
                 SELECT digest, count() AS n FROM manifest GROUP BY digest;
                 SELECT digest, refs OR 0 AS refs, gc OR false AS gc FROM stored_blob;",
            )
            .await?
            .check()?;
        #[derive(Deserialize)]
        struct N {
            digest: Digest,
            n: i64,
        }
        #[derive(Deserialize)]
        struct S {
            digest: Digest,
            refs: i64,
            gc: bool,
        }
        let (links, manifests, stored): (Vec<N>, Vec<N>, Vec<S>) = (rows(&mut r, 0)?, rows(&mut r, 1)?, rows(&mut r, 2)?);
        let mut by: std::collections::BTreeMap<Digest, Census> = std::collections::BTreeMap::new();
        for n in links.into_iter().chain(manifests) {
            by.entry(n.digest.clone()).or_insert(Census { digest: n.digest, counted: 0, recorded: None, marked: false }).counted += n.n;
        }
        for s in stored {
            let e = by.entry(s.digest.clone()).or_insert(Census { digest: s.digest, counted: 0, recorded: None, marked: false });
            e.recorded = Some(s.refs);
            e.marked = s.gc;
        }
        Ok(by.into_values().collect())
    }

    /// Count every reference again, per digest and per tenant, from the links
    /// and manifests (`fsck --repair`): one transaction.
    pub async fn recount_references(&self) -> Result<()> {
        self.db.query("DELETE meta:usage").await?.check()?;
        self.ensure_usage_counted().await?;
        Ok(())
    }

    /// The global reference count of a digest (tests and `fsck` compare it with a
    /// recount).
    pub async fn blob_refs(&self, digest: &Digest) -> Result<Option<i64>> {
        let mut r = self
            .db
            .query("SELECT VALUE refs FROM ONLY type::record('stored_blob', $digest)")
            .bind(("digest", digest.to_string()))
            .await?
            .check()?;
        crate::one(&mut r, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::mem;
    use crate::LinkRow;

    #[tokio::test]
    async fn a_pin_or_a_reference_and_a_mark_exclude_each_other() {
        let md = mem().await;
        let repo: RepoName = "acme/app".parse().unwrap();
        let d = Digest::sha256(b"layer");
        let link = LinkRow { repo: repo.clone(), digest: d.clone(), size: 5 };
        let later = now_ms() + 1000;

        // Pinned: not collectable; linked: not collectable.
        assert!(md.pin_blob(&d).await.unwrap());
        assert!(!md.mark_collecting(&d, later).await.unwrap(), "a pinned blob is not marked");
        md.link_blob(&crate::Guard::any(), &link, None, true, &[]).await.unwrap();
        assert_eq!(md.blob_refs(&d).await.unwrap(), Some(1));
        assert!(!md.mark_collecting(&d, later).await.unwrap(), "a referenced blob is not marked");

        // Unreferenced: collectable once the grace has passed, not before.
        md.unlink_blob(&crate::Guard::any(), &repo, &d).await.unwrap();
        assert_eq!(md.blob_refs(&d).await.unwrap(), Some(0));
        assert!(!md.mark_collecting(&d, now_ms() - 60_000).await.unwrap(), "within the grace period");
        assert_eq!(md.unreferenced_blobs(later, 10).await.unwrap(), vec![Unreferenced { digest: d.clone(), size: 5 }]);
        assert!(md.mark_collecting(&d, later).await.unwrap());

        // Marked: pins and references are refused until it is forgotten.
        assert!(!md.pin_blob(&d).await.unwrap());
        assert!(matches!(md.link_blob(&crate::Guard::any(), &link, None, false, &[]).await, Err(crate::MetadataError::Collecting)));
        md.forget_blob(&d).await.unwrap();
        assert!(md.pin_blob(&d).await.unwrap());
        md.link_blob(&crate::Guard::any(), &link, None, true, &[]).await.unwrap();
        assert_eq!(md.blob_refs(&d).await.unwrap(), Some(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_pins_and_marks_never_both_win() {
        let md = mem().await;
        for round in 0..40u32 {
            let d = Digest::sha256(format!("blob-{round}").as_bytes());
            // An unreferenced record, past its grace.
            md.adopt_blob(&d, 1, 0).await.unwrap();
            let (a, b) = (md.clone(), md.clone());
            let (da, db) = (d.clone(), d.clone());
            let pin = tokio::spawn(async move { a.pin_blob(&da).await.unwrap() });
            let mark = tokio::spawn(async move { b.mark_collecting(&db, now_ms()).await.unwrap() });
            let (pinned, marked) = (pin.await.unwrap(), mark.await.unwrap());
            assert!(pinned != marked, "round {round}: pinned {pinned}, marked {marked}");
        }
    }

    #[tokio::test]
    async fn the_census_finds_wrong_counts_and_a_recount_fixes_them() {
        let md = mem().await;
        let d = Digest::sha256(b"counted");
        for repo in ["acme/a", "acme/b"] {
            md.link_blob(&crate::Guard::any(), &LinkRow { repo: repo.parse().unwrap(), digest: d.clone(), size: 7 }, None, false, &[])
                .await
                .unwrap();
        }
        let ok = |c: &Vec<Census>| c.iter().all(|c| c.recorded == Some(c.counted));
        assert!(ok(&md.reference_census().await.unwrap()));
        md.db.query("UPDATE type::record('stored_blob', $d) SET refs = 5").bind(("d", d.to_string())).await.unwrap().check().unwrap();
        let census = md.reference_census().await.unwrap();
        assert_eq!(census, vec![Census { digest: d.clone(), counted: 2, recorded: Some(5), marked: false }]);
        md.recount_references().await.unwrap();
        assert!(ok(&md.reference_census().await.unwrap()));
        assert_eq!(md.blob_refs(&d).await.unwrap(), Some(2));
    }

    #[tokio::test]
    async fn stale_pins_do_not_keep_bytes_forever() {
        let md = mem().await;
        let d = Digest::sha256(b"abandoned");
        assert!(md.pin_blob(&d).await.unwrap());
        md.db.query("UPDATE type::record('stored_blob', $d) SET pinned_ms = 0").bind(("d", d.to_string())).await.unwrap().check().unwrap();
        assert!(md.mark_collecting(&d, now_ms() + 1).await.unwrap());
    }
}
