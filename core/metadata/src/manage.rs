//! What the management API reads and writes beyond the OCI core: repository
//! profiles (description, category, labels, creation time), pull and push
//! counters, and the per-repository and per-tag figures of listings.
//!
//! Counters: pushes are counted in the transaction that commits the manifest (so
//! they are exact); pulls arrive in batches from the registry's counter actor
//! ([`Metadata::record_pulls`]), one transaction per batch.

use std::collections::BTreeMap;

use berth_oci::{AccountName, Digest, RepoName, Tag};
use serde::{Deserialize, Serialize};

use crate::{one, returned, rows, Metadata, Result};

/// A repository as the management API shows it (without its computed figures).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepoProfile {
    pub name: RepoName,
    pub created_ms: i64,
    pub updated_ms: i64,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pulls: u64,
    #[serde(default)]
    pub pushes: u64,
    #[serde(default)]
    pub last_pulled_ms: Option<i64>,
    #[serde(default)]
    pub last_pushed_ms: Option<i64>,
}

impl RepoProfile {
    /// A new repository's profile, made at `now_ms`: no description, category
    /// or labels, nothing pulled or pushed yet.
    pub fn new(name: RepoName, now_ms: i64) -> RepoProfile {
        RepoProfile {
            name,
            created_ms: now_ms,
            updated_ms: now_ms,
            description: String::new(),
            category: String::new(),
            labels: BTreeMap::new(),
            pulls: 0,
            pushes: 0,
            last_pulled_ms: None,
            last_pushed_ms: None,
        }
    }
}

/// Fields of a repository profile to change; `None` leaves one as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RepoPatch {
    pub description: Option<String>,
    pub category: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
}

/// A tag with its manifest's facts and its counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TagInfo {
    pub name: Tag,
    pub digest: Digest,
    pub media_type: String,
    /// The manifest's own bytes.
    pub manifest_size: u64,
    /// The image's bytes: manifest, config and layers; for an index, its children's too.
    #[serde(default)]
    pub size: u64,
    /// Pushed (the tag last moved) at.
    pub pushed_ms: i64,
    #[serde(default)]
    pub pushes: u64,
    #[serde(default)]
    pub pulls: u64,
    #[serde(default)]
    pub last_pulled_ms: Option<i64>,
}

/// Pulls counted since the last batch: of a repository, and of the tag when
/// the pull named one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PullDelta {
    pub repo: RepoName,
    pub tag: Option<Tag>,
    pub count: u64,
    pub last_ms: i64,
}

/// What deleting a repository removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    pub tags: u64,
    pub manifests: u64,
    pub blob_links: u64,
    /// Bytes that left the owning tenant's usage (digests no other of its
    /// repositories references).
    #[serde(default)]
    pub freed_bytes: u64,
}

/// A namespace with its profile (the tenant mapping itself is [`crate::NamespaceRow`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamespaceProfile {
    pub name: AccountName,
    pub tenant: AccountName,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub project_id: String,
    /// Repositories created in it start public.
    #[serde(default)]
    pub public_default: bool,
    #[serde(default)]
    pub created_ms: i64,
    #[serde(default)]
    pub updated_ms: i64,
}

/// Fields of a namespace profile to change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespacePatch {
    pub description: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub project_id: Option<String>,
    pub public_default: Option<bool>,
}

/// A namespace's computed figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NamespaceStats {
    pub repository_count: u64,
    /// Bytes its repositories reference, each blob counted once.
    pub storage_bytes: u64,
}

pub(crate) const SCHEMA: &str = r#"
DEFINE INDEX IF NOT EXISTS repo_namespace ON repo FIELDS namespace;
DEFINE INDEX IF NOT EXISTS blob_link_repo ON blob_link FIELDS repo;
DEFINE TABLE IF NOT EXISTS repo_gone SCHEMALESS;
DEFINE INDEX IF NOT EXISTS repo_gone_swept ON repo_gone FIELDS swept_ms;
"#;

/// The profile's fields, with defaults for rows written before they existed.
const PROFILE: &str = "name, created_ms OR 0 AS created_ms, updated_ms OR created_ms OR 0 AS updated_ms, \
     description OR '' AS description, category OR '' AS category, labels OR {} AS labels, \
     pulls OR 0 AS pulls, pushes OR 0 AS pushes, last_pulled_ms, last_pushed_ms";

impl Metadata {
    /// Create an empty repository explicitly; `false` if it exists. `outbox`:
    /// the events announcing it, written only if it was created.
    pub async fn create_repo(&self, p: &RepoProfile, outbox: &[crate::OutboxRow]) -> Result<bool> {
        // Not while a delete of the name is still sweeping (see `hide_repo`).
        let also = format!(
            "IF (SELECT VALUE repo FROM ONLY type::record('repo_gone', $name)) {{ THROW 'berth:deleting'; }}; {}",
            crate::CATALOG_BUMP
        );
        let row = profile_row(p)?;
        self.after_sweep(&p.name, || self.create_announcing("repo", p.name.as_str(), row.clone(), outbox, &also)).await
    }

    pub async fn repo_profile(&self, name: &RepoName) -> Result<Option<RepoProfile>> {
        let mut r = self
            .db
            .query(format!("SELECT {PROFILE} FROM ONLY type::record('repo', $name)"))
            .bind(("name", name.to_string()))
            .await?
            .check()?;
        one(&mut r, 0)
    }

    /// Profiles of every repository, or of those in the given namespaces: one
    /// scan, cheaper per repository than reading by name when a listing needs
    /// most of them.
    pub async fn repo_profiles_in(&self, namespaces: Option<&[AccountName]>) -> Result<Vec<RepoProfile>> {
        let mut r = match namespaces {
            None => self.db.query(format!("SELECT {PROFILE} FROM repo")).await?,
            Some(ns) => {
                let ns: Vec<String> = ns.iter().map(|n| n.to_string()).collect();
                self.db.query(format!("SELECT {PROFILE} FROM repo WHERE namespace IN $ns")).bind(("ns", ns)).await?
            }
        }
        .check()?;
        rows(&mut r, 0)
    }

    /// Profiles of the named repositories that exist, in no particular order.
    pub async fn repo_profiles(&self, names: &[RepoName]) -> Result<Vec<RepoProfile>> {
        if names.is_empty() {
            return Ok(vec![]);
        }
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut r = self
            .db
            .query(format!("SELECT {PROFILE} FROM $names.map(|$n| type::record('repo', $n)) WHERE name != NONE"))
            .bind(("names", names))
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    /// Change a repository's description, category or labels; `None` if it does not exist.
    pub async fn update_repo(&self, name: &RepoName, patch: &RepoPatch, now_ms: i64) -> Result<Option<RepoProfile>> {
        let mut fields = serde_json::Map::new();
        if let Some(d) = &patch.description {
            fields.insert("description".into(), d.clone().into());
        }
        if let Some(c) = &patch.category {
            fields.insert("category".into(), c.clone().into());
        }
        if let Some(l) = &patch.labels {
            fields.insert("labels".into(), json(l)?);
        }
        if !self.patch_record("repo", name.as_str(), fields, now_ms).await? {
            return Ok(None);
        }
        self.repo_profile(name).await
    }

    /// Every tag of a repository with its manifest's facts and counters, by name.
    pub async fn tag_infos(&self, repo: &RepoName) -> Result<Vec<TagInfo>> {
        let mut r = self
            .db
            .query(
                "SELECT name, digest, updated_ms AS pushed_ms, pushes OR 0 AS pushes, pulls OR 0 AS pulls, last_pulled_ms,
                        type::record('manifest', [repo, digest]).media_type AS media_type,
                        type::record('manifest', [repo, digest]).size AS manifest_size,
                        type::record('manifest', [repo, digest]).content_size OR type::record('manifest', [repo, digest]).size AS size
                 FROM tag WHERE repo = $repo ORDER BY name",
            )
            .bind(("repo", repo.to_string()))
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    /// Add a batch of counted pulls to their repositories and tags: one
    /// transaction. Tags deleted in the meantime are skipped (`UPDATE` creates
    /// nothing). Manifest rows are not written: nothing reads a pull count by
    /// digest, and a manifest row is the largest record a pull would rewrite.
    /// `outbox`: the pull events of the batch, written with it.
    pub async fn record_pulls(&self, batch: &[PullDelta], outbox: &[crate::OutboxRow]) -> Result<()> {
        if batch.is_empty() && outbox.is_empty() {
            return Ok(());
        }
        let announce = crate::outbox::add("$outbox", outbox);
        let outbox = crate::outbox::bind(outbox)?;
        let rows: Vec<serde_json::Value> = batch
            .iter()
            .map(|d| serde_json::to_value(d).map_err(|e| crate::MetadataError::Corrupt(e.to_string())))
            .collect::<Result<_>>()?;
        let sql = format!(
            "BEGIN TRANSACTION;
                 FOR $d IN $batch {{
                    UPDATE type::record('repo', $d.repo) SET pulls = (pulls OR 0) + $d.count,
                        last_pulled_ms = math::max([last_pulled_ms OR 0, $d.last_ms]) RETURN NONE;
                    IF $d.tag != NONE AND $d.tag != NULL {{
                        UPDATE type::record('tag', [$d.repo, $d.tag]) SET pulls = (pulls OR 0) + $d.count,
                            last_pulled_ms = math::max([last_pulled_ms OR 0, $d.last_ms]) RETURN NONE;
                    }};
                 }};
                 {announce}
                 COMMIT TRANSACTION;"
        );
        self.run(|| self.db.query(sql.as_str()).bind(("batch", rows.clone())).bind(("outbox", outbox.clone()))).await?;
        Ok(())
    }

    /// Delete a repository with every tag, manifest and blob link it has:
    /// [`Metadata::hide_repo`], then [`Metadata::sweep_repo`].
    pub async fn delete_repo(&self, guard: &crate::Guard, name: &RepoName, outbox: &[crate::OutboxRow]) -> Result<Removed> {
        let mut removed = Removed::default();
        if self.hide_repo(guard, name, outbox).await? {
            self.sweep_repo(name, &mut removed).await?;
        }
        Ok(removed)
    }

    /// The first step of a repository delete, one small transaction whatever
    /// the repository holds: its record and shares go (so no read finds it, and
    /// the catalog moves), its deletion is announced, and a marker
    /// (`repo_gone:⟨name⟩`, with the owning tenant) stays until
    /// [`Metadata::sweep_repo`] has removed what it held. While the marker
    /// stays, nothing makes a repository of that name again: a write that would
    /// finishes the sweep first. `false`: there is no such repository (and
    /// nothing was written).
    pub async fn hide_repo(&self, guard: &crate::Guard, name: &RepoName, outbox: &[crate::OutboxRow]) -> Result<bool> {
        let sql = format!(
            "BEGIN TRANSACTION;
             {}
             IF !(SELECT VALUE name FROM ONLY type::record('repo', $repo)) {{ RETURN false; }};
             {}
             {}
             {}
             DELETE type::record('repo', $repo) RETURN NONE;
             DELETE share WHERE repo = $repo RETURN NONE;
             UPSERT type::record('repo_gone', $repo) SET repo = $repo, tenant = $tenant, since_ms = $now, swept_ms = $now RETURN NONE;
             RETURN true;
             COMMIT TRANSACTION;",
            crate::REPO_GUARD,
            crate::CATALOG_BUMP,
            crate::outbox::add("$outbox", outbox),
            crate::usage::TENANT_OF,
        );
        let outbox = crate::outbox::bind(outbox)?;
        let _catalog = self.catalog_turn(true).await;
        let mut r = self
            .run(|| {
                guard
                    .bind(self.db.query(sql.as_str()))
                    .bind(("repo", name.to_string()))
                    .bind(("namespace", name.namespace().to_string()))
                    .bind(("now", crate::now_ms()))
                    .bind(("outbox", outbox.clone()))
            })
            .await?;
        Ok(returned::<bool>(&mut r)?.unwrap_or(false))
    }

    /// Remove what a hidden repository held ([`Metadata::hide_repo`]), in
    /// transactions of at most [`SWEEP_PART`] tags, manifests and links each
    /// (one transaction for all would be bounded by the write buffer: about
    /// 2.6 KiB per tag), releasing the tenant's references as it goes; the last
    /// part removes the marker. Answers what it removed (nothing if the marker
    /// is gone), added to `total` part by part (so a sweep that fails
    /// part-way still tells what it did). Safe to run again after a crash, and
    /// beside another sweep of the same repository (every part writes the
    /// marker, so two parts conflict and one is retried).
    pub async fn sweep_repo(&self, name: &RepoName, total: &mut Removed) -> Result<()> {
        self.sweep_in_parts(name, SWEEP_PART, total).await
    }

    pub(crate) async fn sweep_in_parts(&self, name: &RepoName, part: usize, total: &mut Removed) -> Result<()> {
        #[derive(Deserialize)]
        struct Part {
            #[serde(flatten)]
            removed: Removed,
            done: bool,
        }
        let sql = format!(
            "BEGIN TRANSACTION;
             LET $gone = (SELECT tenant FROM ONLY type::record('repo_gone', $repo));
             IF !$gone {{ RETURN {{ tags: 0, manifests: 0, blob_links: 0, freed_bytes: 0, done: true }}; }};
             LET $tenant = $gone.tenant;
             LET $t = SELECT VALUE id FROM tag WHERE repo = $repo LIMIT $part;
             LET $m = SELECT VALUE id FROM manifest WHERE repo = $repo LIMIT $part;
             LET $l = SELECT VALUE id FROM blob_link WHERE repo = $repo LIMIT $part;
             DELETE $t RETURN NONE;
             LET $manifests = (DELETE $m RETURN BEFORE).digest;
             LET $links = (DELETE $l RETURN BEFORE).digest;
             LET $done = count($t) < $part AND count($m) < $part AND count($l) < $part;
             IF $done {{ DELETE type::record('repo_gone', $repo) RETURN NONE; }}
             ELSE {{ UPDATE type::record('repo_gone', $repo) SET swept_ms = $now RETURN NONE; }};
             {}
             RETURN {{ tags: count($t), manifests: count($manifests), blob_links: count($links), freed_bytes: $freed, done: $done }};
             COMMIT TRANSACTION;",
            // Not array::concat: it refuses an output over 1 MiB of values.
            crate::usage::ref_release("array::flatten([$manifests, $links])")
        );
        loop {
            let mut r = self
                .run(|| self.db.query(sql.as_str()).bind(("repo", name.to_string())).bind(("part", part)).bind(("now", crate::now_ms())))
                .await?;
            let Some(p) = returned::<Part>(&mut r)? else { return Ok(()) };
            total.tags += p.removed.tags;
            total.manifests += p.removed.manifests;
            total.blob_links += p.removed.blob_links;
            total.freed_bytes += p.removed.freed_bytes;
            if p.done {
                return Ok(());
            }
        }
    }

    /// Finish the repository deletes that stopped part-way (a crash, or a
    /// sweep that failed): every marker not swept for `idle_ms`. Answers how
    /// many repositories it finished.
    pub async fn sweep_hidden(&self, idle_ms: i64) -> Result<usize> {
        let mut r = self
            .db
            .query("SELECT VALUE repo FROM repo_gone WHERE swept_ms < $before LIMIT 100")
            .bind(("before", crate::now_ms() - idle_ms))
            .await?
            .check()?;
        let names: Vec<RepoName> = rows(&mut r, 0)?;
        for name in &names {
            let mut removed = Removed::default();
            self.sweep_repo(name, &mut removed).await?;
            tracing::info!(repository = %name, tags = removed.tags, manifests = removed.manifests, "finished deleting a repository");
        }
        Ok(names.len())
    }
}

/// The most tags, manifests and blob links one transaction of a repository
/// delete removes (each kind): about 2.6 MiB of writes per thousand tags.
pub const SWEEP_PART: usize = 1_000;

const NS_PROFILE: &str = "name, tenant, description OR '' AS description, labels OR {} AS labels, project_id OR '' AS project_id, \
     public_default OR false AS public_default, created_ms OR 0 AS created_ms, updated_ms OR created_ms OR 0 AS updated_ms";

impl Metadata {
    /// Create a namespace for a tenant with its profile; `false` if the name is
    /// taken (by a namespace or a tenant's own).
    pub async fn create_namespace_profile(&self, p: &NamespaceProfile) -> Result<bool> {
        self.create_if_absent("namespace", p.name.as_str(), crate::to_value(p)?).await
    }

    pub async fn namespace_profiles(&self) -> Result<Vec<NamespaceProfile>> {
        let mut r = self.db.query(format!("SELECT {NS_PROFILE} FROM namespace ORDER BY name")).await?.check()?;
        rows(&mut r, 0)
    }

    pub async fn namespace_profile(&self, name: &AccountName) -> Result<Option<NamespaceProfile>> {
        let mut r = self
            .db
            .query(format!("SELECT {NS_PROFILE} FROM ONLY type::record('namespace', $name)"))
            .bind(("name", name.to_string()))
            .await?
            .check()?;
        one(&mut r, 0)
    }

    /// Change a namespace's profile; `None` if it does not exist.
    pub async fn update_namespace(&self, name: &AccountName, patch: &NamespacePatch, now_ms: i64) -> Result<Option<NamespaceProfile>> {
        let mut fields = serde_json::Map::new();
        if let Some(d) = &patch.description {
            fields.insert("description".into(), d.clone().into());
        }
        if let Some(l) = &patch.labels {
            fields.insert("labels".into(), json(l)?);
        }
        if let Some(p) = &patch.project_id {
            fields.insert("project_id".into(), p.clone().into());
        }
        if let Some(p) = patch.public_default {
            fields.insert("public_default".into(), p.into());
        }
        if !self.patch_record("namespace", name.as_str(), fields, now_ms).await? {
            return Ok(None);
        }
        self.namespace_profile(name).await
    }

    /// Set `fields` (each replaced whole) on `table:name` and stamp `updated_ms`,
    /// in one transaction; `false` if there is no such record.
    async fn patch_record(
        &self,
        table: &'static str,
        name: &str,
        mut fields: serde_json::Map<String, serde_json::Value>,
        now_ms: i64,
    ) -> Result<bool> {
        fields.insert("updated_ms".into(), now_ms.into());
        // The keys are this crate's own field names, never input.
        let sets: Vec<String> = fields.keys().map(|k| format!("{k} = $fields.{k}")).collect();
        let fields = serde_json::Value::Object(fields);
        let sql = format!(
            "BEGIN TRANSACTION;
             IF !(SELECT VALUE name FROM ONLY type::record($table, $name)) {{ RETURN false; }};
             UPDATE type::record($table, $name) SET {} RETURN NONE;
             RETURN true;
             COMMIT TRANSACTION;",
            sets.join(", ")
        );
        let mut r = self
            .run(|| self.db.query(sql.as_str()).bind(("table", table)).bind(("name", name.to_owned())).bind(("fields", fields.clone())))
            .await?;
        Ok(returned::<bool>(&mut r)?.unwrap_or(false))
    }

    /// Repository count and bytes referenced (each blob once) of a namespace.
    pub async fn namespace_stats(&self, name: &AccountName) -> Result<NamespaceStats> {
        let mut r = self
            .db
            .query(
                "LET $repos = (SELECT VALUE name FROM repo WHERE namespace = $ns);
                 LET $blobs = array::distinct((SELECT VALUE [digest, size] FROM blob_link WHERE repo IN $repos));
                 RETURN {
                    repository_count: count($repos),
                    storage_bytes: math::sum($blobs.map(|$b| $b[1])) + math::sum((SELECT VALUE size FROM manifest WHERE repo IN $repos))
                 };",
            )
            .bind(("ns", name.to_string()))
            .await?
            .check()?;
        Ok(returned::<NamespaceStats>(&mut r)?.unwrap_or_default())
    }

    /// Remove an empty namespace's record (its repositories were deleted first).
    pub async fn delete_namespace(&self, name: &AccountName) -> Result<()> {
        self.db.query("DELETE type::record('namespace', $name) RETURN NONE").bind(("name", name.to_string())).await?.check()?;
        Ok(())
    }
}

fn json<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| crate::MetadataError::Corrupt(e.to_string()))
}

fn profile_row(p: &RepoProfile) -> Result<serde_json::Value> {
    let mut v = crate::to_value(p)?;
    v["namespace"] = serde_json::Value::String(p.name.namespace().to_string());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LinkRow, ManifestRow, TagRow};

    fn manifest(repo: &RepoName, bytes: &[u8]) -> ManifestRow {
        ManifestRow {
            repo: repo.clone(),
            digest: Digest::sha256(bytes),
            media_type: berth_oci::manifest::OCI_MANIFEST.into(),
            size: bytes.len() as u64,
            artifact_type: None,
            subject: None,
            annotations: None,
            created_ms: 1,
            content_size: bytes.len() as u64,
            refs: Some(vec![]),
            findings: vec![],
        }
    }

    #[tokio::test]
    async fn profiles_counters_stats() {
        let md = crate::tests::mem().await;
        let app: RepoName = "acme/app".parse().unwrap();
        let empty: RepoName = "acme/empty".parse().unwrap();
        let other: RepoName = "beta/x".parse().unwrap();
        let p = RepoProfile {
            description: "d".into(),
            category: "c".into(),
            labels: [("team".to_string(), "core".to_string())].into(),
            ..RepoProfile::new(empty.clone(), 5)
        };
        assert!(md.create_repo(&p, &[]).await.unwrap());
        assert!(!md.create_repo(&p, &[]).await.unwrap());
        assert_eq!(md.repo_profile(&empty).await.unwrap(), Some(p.clone()));

        // Pushes: two manifests, the tag moved once; a blob link.
        let m1 = manifest(&app, b"one");
        let m2 = manifest(&app, b"two!");
        let t = |d: &Digest, ms| TagRow { repo: app.clone(), name: "v1".parse().unwrap(), digest: d.clone(), updated_ms: ms };
        md.commit_manifest(&crate::Guard::any(), &m1, Some(&t(&m1.digest, 10)), false, &[]).await.unwrap();
        md.commit_manifest(&crate::Guard::any(), &m2, Some(&t(&m2.digest, 11)), false, &[]).await.unwrap();
        md.link_blob(&crate::Guard::any(), &LinkRow { repo: app.clone(), digest: Digest::sha256(b"layer"), size: 100 }, None, false, &[])
            .await
            .unwrap();
        md.commit_manifest(&crate::Guard::any(), &manifest(&other, b"x"), None, false, &[]).await.unwrap();

        let prof = md.repo_profile(&app).await.unwrap().unwrap();
        assert_eq!((prof.pushes, prof.pulls), (2, 0));
        assert!(prof.created_ms > 0 && prof.last_pushed_ms.is_some(), "{prof:?}");

        md.record_pulls(
            &[
                PullDelta { repo: app.clone(), tag: Some("v1".parse().unwrap()), count: 3, last_ms: 50 },
                PullDelta { repo: app.clone(), tag: None, count: 1, last_ms: 40 },
                // A tag deleted since is skipped, not created.
                PullDelta { repo: app.clone(), tag: Some("gone".parse().unwrap()), count: 1, last_ms: 45 },
            ],
            &[],
        )
        .await
        .unwrap();
        let prof = md.repo_profile(&app).await.unwrap().unwrap();
        assert_eq!((prof.pulls, prof.last_pulled_ms), (5, Some(50)));
        let tags = md.tag_infos(&app).await.unwrap();
        assert_eq!(tags.len(), 1, "{tags:?}");
        assert_eq!((tags[0].pushes, tags[0].pulls, tags[0].last_pulled_ms), (2, 3, Some(50)));
        assert_eq!((tags[0].digest.clone(), tags[0].manifest_size), (m2.digest.clone(), 4));

        // Profiles by name: one that does not exist is left out.
        let none: RepoName = "acme/none".parse().unwrap();
        let mut names: Vec<String> =
            md.repo_profiles(&[empty.clone(), none, app.clone()]).await.unwrap().into_iter().map(|p| p.name.to_string()).collect();
        names.sort();
        assert_eq!(names, ["acme/app", "acme/empty"]);
        assert_eq!(md.repo_profiles(std::slice::from_ref(&empty)).await.unwrap(), std::slice::from_ref(&p));
        assert!(md.repo_profiles(&[]).await.unwrap().is_empty());
        let acme: AccountName = "acme".parse().unwrap();
        let mut names: Vec<String> = md.repo_profiles_in(Some(&[acme])).await.unwrap().into_iter().map(|p| p.name.to_string()).collect();
        names.sort();
        assert_eq!(names, ["acme/app", "acme/empty"]);
        assert_eq!(md.repo_profiles_in(None).await.unwrap().len(), 3);

        let patch = RepoPatch { description: Some("new".into()), ..Default::default() };
        let updated = md.update_repo(&empty, &patch, 99).await.unwrap().unwrap();
        assert_eq!((updated.description.as_str(), updated.category.as_str(), updated.updated_ms), ("new", "c", 99));
        assert_eq!(md.update_repo(&"acme/none".parse().unwrap(), &patch, 1).await.unwrap(), None);

        let ns = md.namespace_stats(&"acme".parse().unwrap()).await.unwrap();
        assert_eq!(ns, NamespaceStats { repository_count: 2, storage_bytes: 100 + 3 + 4 });

        let removed = md.delete_repo(&crate::Guard::any(), &app, &[]).await.unwrap();
        assert_eq!((removed.tags, removed.manifests, removed.blob_links), (1, 2, 1));
        assert_eq!(md.repo_profile(&app).await.unwrap(), None);
        assert!(md.tag_infos(&app).await.unwrap().is_empty());
    }
}

#[cfg(test)]
mod namespace_tests {
    use super::*;

    #[tokio::test]
    async fn namespace_profiles_round_trip() {
        let md = crate::tests::mem().await;
        let p = NamespaceProfile {
            name: "team".parse().unwrap(),
            tenant: "acme".parse().unwrap(),
            description: "the team".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            project_id: "p-1".into(),
            public_default: true,
            created_ms: 3,
            updated_ms: 3,
        };
        assert!(md.create_namespace_profile(&p).await.unwrap());
        assert!(!md.create_namespace_profile(&p).await.unwrap());
        assert_eq!(md.namespace_profile(&p.name).await.unwrap(), Some(p.clone()));
        // The tenant mapping sees it like any namespace.
        assert!(md.namespaces().await.unwrap().iter().any(|n| n.name == p.name && n.tenant == p.tenant));
        let patch = NamespacePatch { public_default: Some(false), ..Default::default() };
        let u = md.update_namespace(&p.name, &patch, 9).await.unwrap().unwrap();
        assert_eq!((u.public_default, u.description.as_str(), u.updated_ms), (false, "the team", 9));
        assert_eq!(md.namespace_stats(&p.name).await.unwrap(), NamespaceStats::default());
        md.delete_namespace(&p.name).await.unwrap();
        assert_eq!(md.namespace_profile(&p.name).await.unwrap(), None);
        assert_eq!(md.update_namespace(&p.name, &patch, 10).await.unwrap(), None);
    }
}

#[cfg(test)]
mod conflict_tests {
    use super::*;
    use crate::{ManifestRow, PolicyRuleRow, TagRow};

    /// Transactions that write the same records at once (the policy version, a
    /// repository's counters) all succeed: the losers of a conflict are retried.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_transactions_on_one_record_all_land() {
        let md = crate::tests::mem().await;
        let policy = (0..16).map(|i| {
            let md = md.clone();
            tokio::spawn(async move {
                let rule = PolicyRuleRow {
                    ptype: "p".into(),
                    fields: vec![format!("u{i}"), "*".into(), "*".into(), "pull".into(), "allow".into()],
                };
                md.change_policy(&[rule], &[], None).await
            })
        });
        let repo: RepoName = "acme/app".parse().unwrap();
        let pushes = (0..16).map(|i| {
            let (md, repo) = (md.clone(), repo.clone());
            tokio::spawn(async move {
                let bytes = format!("m{i}");
                let m = ManifestRow {
                    repo: repo.clone(),
                    digest: Digest::sha256(bytes.as_bytes()),
                    media_type: berth_oci::manifest::OCI_MANIFEST.into(),
                    size: 2,
                    artifact_type: None,
                    subject: None,
                    annotations: None,
                    created_ms: 1,
                    content_size: 2,
                    refs: Some(vec![]),
                    findings: vec![],
                };
                let t = TagRow { repo: repo.clone(), name: "latest".parse().unwrap(), digest: m.digest.clone(), updated_ms: i };
                md.commit_manifest(&crate::Guard::any(), &m, Some(&t), false, &[]).await?;
                let d = PullDelta { repo, tag: Some("latest".parse().unwrap()), count: 1, last_ms: i };
                md.record_pulls(&[d], &[]).await
            })
        });
        let policy: Vec<_> = policy.collect();
        let pushes: Vec<_> = pushes.collect();
        for h in policy {
            h.await.unwrap().unwrap();
        }
        for h in pushes {
            h.await.unwrap().unwrap();
        }
        assert_eq!(md.policy_rules().await.unwrap().len(), 16);
        assert_eq!(md.policy_state().await.unwrap().version, 16);
        let p = md.repo_profile(&repo).await.unwrap().unwrap();
        assert_eq!((p.pushes, p.pulls), (16, 16));
    }
}
