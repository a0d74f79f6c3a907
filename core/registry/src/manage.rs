//! Management operations on repositories and tags: explicit creation, profiles,
//! filtered and paged listings with their figures, repository delete, bulk
//! manifest deletes.
//!
//! Access is never decided here: listings take a `visible` predicate that the
//! caller built from `Auth` (what the identity may read, push, or what is
//! public), and single-repository calls are made only after the HTTP layer
//! authorized them.

use std::collections::{BTreeMap, HashMap, HashSet};

use berth_metadata::{RepoPatch, RepoProfile, TagInfo};
use berth_oci::{AccountName, Digest, ErrorCode, Reference, RegistryError, RepoName};

use crate::index::RepoStats;
use crate::{internal, name_unknown, now_ms, repo, Registry};

/// A listing that needs the profiles of at least 1/`SCAN_FRACTION` of all
/// repositories reads them in one scan instead of by name (measured at 10,000
/// repositories: a scan costs about a third of reading as many by name).
const SCAN_FRACTION: usize = 3;

/// How repository listings are ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RepoSort {
    #[default]
    Name,
    Updated,
    Pulls,
}

/// Filters, order and page of a repository listing.
#[derive(Clone, Debug, Default)]
pub struct RepoQuery {
    /// Only repositories in these namespaces (`None`: all namespaces).
    pub namespaces: Option<Vec<AccountName>>,
    /// Case-insensitive substring of the full name or the description.
    pub keyword: Option<String>,
    /// Every one of these labels must be present with this value.
    pub labels: BTreeMap<String, String>,
    pub sort: RepoSort,
    pub descending: bool,
    pub limit: usize,
    pub offset: usize,
}

/// A repository with its figures.
#[derive(Clone, Debug, PartialEq)]
pub struct RepoSummary {
    pub profile: RepoProfile,
    pub stats: RepoStats,
}

/// One page of a listing, with the number of items matching in all.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: usize,
}

/// One platform of a multi-platform image (an index's child).
#[derive(Clone, Debug, PartialEq)]
pub struct PlatformImage {
    /// The index's `platform` object (`os`, `architecture`, `variant`, …).
    pub platform: Option<serde_json::Value>,
    pub digest: Digest,
    pub media_type: String,
    /// The child's content size (manifest, config, layers) when it is stored here.
    pub size: u64,
}

/// What a management view shows of one image.
#[derive(Clone, Debug)]
pub struct ImageDetail {
    pub digest: Digest,
    pub media_type: String,
    /// The manifest bytes as stored.
    pub manifest: bytes::Bytes,
    /// For an index: its platforms.
    pub platforms: Vec<PlatformImage>,
    /// For an image: `created` from its config, when the config says.
    pub created: Option<String>,
}

/// Largest config blob read to show an image's creation time.
const MAX_CONFIG_READ: u64 = 1024 * 1024;

/// Which manifests a bulk delete removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagStatus {
    /// Manifests no tag points at (and that no index in the repository needs).
    Untagged,
    /// Manifests some tag points at, with those tags.
    Tagged,
}

fn meta_err(what: &str) -> impl FnOnce(berth_metadata::MetadataError) -> RegistryError + '_ {
    move |e| internal(what, e)
}

impl Registry {
    /// Create an empty repository; `NAME_INVALID`-style conflicts are the caller's
    /// to phrase: `false` if it already exists.
    pub async fn create_repo(
        &self,
        name: &RepoName,
        description: String,
        category: String,
        labels: BTreeMap<String, String>,
        by: &str,
    ) -> Result<bool, RegistryError> {
        let profile = RepoProfile { description, category, labels, ..RepoProfile::new(name.clone(), now_ms()) };
        self.quotas.admit_repo(name).await?;
        let announce = self.announcer(name, by).await?;
        let outbox = announce.as_ref().map_or_else(Vec::new, |a| a.rows(a.repository_created(name), false));
        let created = self.meta.create_repo(&profile, &outbox).await.map_err(meta_err("create repository"));
        if let Some(a) = &announce {
            a.committed(&outbox, created.as_ref().is_ok_and(|c| *c));
        }
        let created = created?;
        if created {
            self.index.repo_or_create(name);
        }
        Ok(created)
    }

    /// Whether this process holds the repository now, without asking the
    /// database (see [`Registry::repo_exists`]): for what may be stale without
    /// harm, such as which policy decisions are worth caching.
    pub fn repo_held(&self, name: &RepoName) -> bool {
        self.index.exists(name)
    }

    /// Whether the repository exists (explicitly created or pushed to).
    pub async fn repo_exists(&self, name: &RepoName) -> Result<bool, RegistryError> {
        self.fresh(&[name]).await?;
        Ok(self.index.exists(name))
    }

    /// One repository with its figures.
    pub async fn repo_summary(&self, name: &RepoName) -> Result<RepoSummary, RegistryError> {
        let state = self.state(name).await?.ok_or_else(|| name_unknown(name))?;
        let profile = self.meta.repo_profile(name).await.map_err(meta_err("read repository"))?.ok_or_else(|| name_unknown(name))?;
        let stats = state.read().unwrap().stats();
        Ok(RepoSummary { profile, stats })
    }

    pub async fn update_repo(&self, name: &RepoName, patch: &RepoPatch) -> Result<RepoSummary, RegistryError> {
        self.meta.update_repo(name, patch, now_ms()).await.map_err(meta_err("update repository"))?.ok_or_else(|| name_unknown(name))?;
        self.repo_summary(name).await
    }

    /// The repositories a listing covers: those of the query's namespaces that
    /// `visible` admits, by name, from the read index. Synchronous, so the
    /// caller's filter may hold what it resolved once for the whole listing
    /// (the caller makes the set current first: [`Registry::fresh_catalog`]).
    pub fn repo_names(&self, q: &RepoQuery, mut visible: impl FnMut(&RepoName) -> bool) -> Vec<RepoName> {
        let in_scope = |r: &RepoName| q.namespaces.as_ref().is_none_or(|ns| ns.iter().any(|n| n.as_str() == r.namespace()));
        self.index.names_where(|r| in_scope(r) && visible(r))
    }

    /// A filtered, ordered page of `names` (from [`Registry::repo_names`]).
    ///
    /// Figures come from the read index; profiles are read from metadata for
    /// the page only, unless the query filters or sorts on them (a keyword,
    /// labels, a sort by time or pulls), when they are read for `names`, and
    /// for no other repository.
    pub async fn list_repos(&self, q: &RepoQuery, mut names: Vec<RepoName>) -> Result<Page<RepoSummary>, RegistryError> {
        let keyword = q.keyword.as_ref().map(|k| k.to_lowercase());
        let by_profile = keyword.is_some() || !q.labels.is_empty() || q.sort != RepoSort::Name;
        let (page, total) = if by_profile {
            let mut profiles = if names.len() * SCAN_FRACTION < self.index.repo_count() {
                self.profiles(&names).await?
            } else {
                // Most of the registry: one scan, then keep the listed ones.
                let listed: HashSet<&RepoName> = names.iter().collect();
                let all = self.meta.repo_profiles_in(q.namespaces.as_deref()).await.map_err(meta_err("list repositories"))?;
                all.into_iter().filter(|p| listed.contains(&p.name)).collect()
            };
            profiles.retain(|p| {
                keyword.as_ref().is_none_or(|k| p.name.as_str().contains(k.as_str()) || p.description.to_lowercase().contains(k.as_str()))
                    && q.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            });
            match q.sort {
                RepoSort::Name => profiles.sort_by(|a, b| a.name.cmp(&b.name)),
                RepoSort::Updated => profiles.sort_by(|a, b| a.updated_ms.cmp(&b.updated_ms).then_with(|| a.name.cmp(&b.name))),
                RepoSort::Pulls => profiles.sort_by(|a, b| a.pulls.cmp(&b.pulls).then_with(|| a.name.cmp(&b.name))),
            }
            if q.descending {
                profiles.reverse();
            }
            let total = profiles.len();
            (profiles.into_iter().skip(q.offset).take(q.limit).collect(), total)
        } else {
            if q.descending {
                names.reverse();
            }
            let total = names.len();
            let page: Vec<RepoName> = names.into_iter().skip(q.offset).take(q.limit).collect();
            (self.profiles(&page).await?, total)
        };
        let names: Vec<RepoName> = page.iter().map(|p| p.name.clone()).collect();
        let states = self.states(&names.iter().collect::<Vec<_>>()).await?;
        let items = page
            .into_iter()
            .zip(states)
            .map(|(profile, state)| RepoSummary { profile, stats: state.map(|s| s.read().unwrap().stats()).unwrap_or_default() })
            .collect();
        Ok(Page { items, total })
    }

    /// Profiles of `names` in their order; one deleted meanwhile is left out.
    async fn profiles(&self, names: &[RepoName]) -> Result<Vec<RepoProfile>, RegistryError> {
        let mut found: HashMap<RepoName, RepoProfile> =
            self.meta.repo_profiles(names).await.map_err(meta_err("list repositories"))?.into_iter().map(|p| (p.name.clone(), p)).collect();
        Ok(names.iter().filter_map(|n| found.remove(n)).collect())
    }

    /// A page of a repository's tags (by name), filtered by a keyword.
    pub async fn list_tags(
        &self,
        repo: &RepoName,
        keyword: Option<&str>,
        limit: usize,
        offset: usize,
    ) -> Result<Page<TagInfo>, RegistryError> {
        if !self.repo_exists(repo).await? {
            return Err(name_unknown(repo));
        }
        let mut tags = self.meta.tag_infos(repo).await.map_err(meta_err("list tags"))?;
        if let Some(k) = keyword.map(str::to_lowercase) {
            tags.retain(|t| t.name.as_str().to_lowercase().contains(&k));
        }
        let total = tags.len();
        Ok(Page { items: tags.into_iter().skip(offset).take(limit).collect(), total })
    }

    /// Delete a repository with all its tags, manifests and blob links.
    pub async fn delete_repo(&self, name: &RepoName, by: &str) -> Result<berth_metadata::Removed, RegistryError> {
        if !self.repo_exists(name).await? {
            return Err(name_unknown(name));
        }
        let quota = self.quotas.reserve(name, self.quotas.op_key(), 0).await?;
        let removed = Self::ask(&self.repo_actor(name), repo::DeleteRepo(quota, self.announcer(name, by).await?)).await??;
        let removed = removed.ok_or_else(|| name_unknown(name))?;
        self.repos.lock().unwrap().remove(name);
        self.quotas.repo_gone(name).await;
        Ok(removed)
    }

    /// Delete every untagged manifest, or every tagged one with its tags; answers
    /// the digests removed. An untagged manifest that an index of the repository
    /// still lists is kept (deleting it would break that index).
    pub async fn delete_by_status(&self, repo: &RepoName, status: TagStatus, by: &str) -> Result<Vec<Digest>, RegistryError> {
        let state = self.state(repo).await?.ok_or_else(|| name_unknown(repo))?;
        let candidates: Vec<Digest> = {
            let s = state.read().unwrap();
            let tagged: HashSet<&Digest> = s.tags.values().map(|e| &e.digest).collect();
            let mut going: HashSet<&Digest> = s.manifests.keys().filter(|d| tagged.contains(d) == (status == TagStatus::Tagged)).collect();
            if status == TagStatus::Untagged {
                // Referrers (signatures, SBOMs) of a manifest that stays stay with it,
                // and so do theirs.
                loop {
                    let keep: Vec<&Digest> = going
                        .iter()
                        .filter(|d| {
                            s.manifests[**d].row.subject.as_ref().is_some_and(|sub| s.manifests.contains_key(sub) && !going.contains(sub))
                        })
                        .copied()
                        .collect();
                    if keep.is_empty() {
                        break;
                    }
                    for d in keep {
                        going.remove(d);
                    }
                }
            }
            let mut c: Vec<Digest> = going.into_iter().cloned().collect();
            c.sort();
            c
        };
        let mut children = HashSet::new();
        if status == TagStatus::Untagged {
            // Children of the manifests that stay are needed by them.
            for d in self.index_children(repo, &candidates).await? {
                children.insert(d);
            }
        }
        let mut deleted = Vec::new();
        for d in candidates.into_iter().filter(|d| !children.contains(d)) {
            match self.delete_manifest(repo, &Reference::Digest(d.clone()), by).await {
                Ok(()) => deleted.push(d),
                // Deleted meanwhile by someone else: not ours to report.
                Err(e) if e.code() == ErrorCode::ManifestUnknown => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// An image's manifest with its platform breakdown (an index) or creation
    /// time (an image); reading it is not a pull.
    pub async fn image_detail(&self, repo: &RepoName, reference: &Reference) -> Result<ImageDetail, RegistryError> {
        let (body, _) = self.read_manifest(repo, reference, true).await?;
        let parsed = berth_oci::ParsedManifest::parse(&body.bytes, Some(&body.media_type))?;
        let mut platforms = Vec::new();
        let mut created = None;
        if parsed.config.is_none()
            && !parsed.references.is_empty()
            && parsed.references.iter().all(|d| berth_oci::manifest::is_manifest_media_type(&d.media_type))
        {
            let state = self.state(repo).await?.ok_or_else(|| name_unknown(repo))?;
            let s = state.read().unwrap();
            for d in &parsed.references {
                let size = s.manifests.get(&d.digest).map(|m| m.row.content_size.max(m.row.size)).unwrap_or(d.size);
                platforms.push(PlatformImage {
                    platform: d.platform.clone(),
                    digest: d.digest.clone(),
                    media_type: d.media_type.clone(),
                    size,
                });
            }
        } else if let Some(config) = &parsed.config {
            let linked = self.state(repo).await?.and_then(|s| s.read().unwrap().blobs.get(&config.digest).copied());
            let readable = linked.filter(|size| *size <= MAX_CONFIG_READ && config.media_type.contains("config"));
            if let Some(size) = readable {
                if let Ok(bytes) = self.store.read_blob_bytes(&config.digest, size).await {
                    created = serde_json::from_slice::<serde_json::Value>(&bytes)
                        .ok()
                        .and_then(|v| v.get("created").and_then(|c| c.as_str()).map(str::to_owned));
                }
            }
        }
        Ok(ImageDetail { digest: body.digest, media_type: body.media_type, manifest: body.bytes, platforms, created })
    }

    /// Digests that the index manifests of `repo` which are not in `going` list.
    pub(crate) async fn index_children(&self, repo: &RepoName, going: &[Digest]) -> Result<Vec<Digest>, RegistryError> {
        let state = self.state(repo).await?.ok_or_else(|| name_unknown(repo))?;
        let indexes: Vec<(Digest, u64)> = {
            let s = state.read().unwrap();
            s.manifests
                .values()
                .filter(|e| {
                    berth_oci::manifest::essence(&e.row.media_type) == berth_oci::manifest::OCI_INDEX
                        || berth_oci::manifest::essence(&e.row.media_type) == berth_oci::manifest::DOCKER_MANIFEST_LIST
                })
                .filter(|e| !going.contains(&e.row.digest))
                .map(|e| (e.row.digest.clone(), e.row.size))
                .collect()
        };
        let mut out = Vec::new();
        for (d, size) in indexes {
            let bytes = self.store.read_blob_bytes(&d, size).await.map_err(|e| internal("read index manifest", e))?;
            let parsed = berth_oci::ParsedManifest::parse(&bytes, None)?;
            out.extend(parsed.required_manifests().cloned());
        }
        Ok(out)
    }
}
