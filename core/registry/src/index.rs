//! The read index: an in-memory view of repositories, tags, manifests and blob
//! links, loaded from metadata at start and changed only by the actors after
//! their metadata writes succeed.
//!
//! Reads (manifest GET, blob authorization, listings) take a read lock and never
//! touch the database or a mailbox, so a GET writes nothing and waits on no write.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use berth_metadata::{ManifestRow, Snapshot};
use berth_oci::{Digest, RepoName, Tag};
use bytes::Bytes;

/// What the registry knows about one manifest.
#[derive(Clone, Debug)]
pub struct ManifestEntry {
    pub row: ManifestRow,
    /// The manifest bytes when cached (filled on first read or on push).
    pub bytes: Option<Bytes>,
}

/// The part of a stored manifest row that reads need, as the index keeps it:
/// annotations (unbounded, at one pusher's choice) and plugin findings stay in
/// metadata and are read when asked for.
pub fn resident(mut row: ManifestRow) -> ManifestRow {
    row.annotations = None;
    row.findings = Vec::new();
    row
}

/// Where a tag points, and when it was last pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: Digest,
    pub updated_ms: i64,
}

/// One repository's state.
#[derive(Default, Debug)]
pub struct RepoState {
    pub tags: BTreeMap<Tag, TagEntry>,
    pub manifests: HashMap<Digest, ManifestEntry>,
    pub blobs: HashMap<Digest, u64>,
    /// The metadata version this state reflects (see `berth_metadata::Guard`):
    /// a change is written on the condition that the repository is still at
    /// it, and a replica compares it with the database's to know the state is
    /// current (`coherence.rs`).
    pub version: String,
}

/// A repository's figures, computed from its state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RepoStats {
    pub tag_count: u64,
    pub manifest_count: u64,
    /// Bytes the repository references: its linked blobs and its manifests.
    pub size: u64,
    /// The most recently pushed tag (the first by name among equals).
    pub latest_tag: Option<Tag>,
}

impl RepoState {
    /// The digest `tag` points at.
    pub fn tag(&self, tag: &Tag) -> Option<&Digest> {
        self.tags.get(tag).map(|e| &e.digest)
    }

    pub fn stats(&self) -> RepoStats {
        RepoStats {
            tag_count: self.tags.len() as u64,
            manifest_count: self.manifests.len() as u64,
            size: self.blobs.values().sum::<u64>() + self.manifests.values().map(|m| m.row.size).sum::<u64>(),
            // Tags iterate by name, so among equal times the first by name stays.
            latest_tag: self
                .tags
                .iter()
                .fold(None, |best: Option<(&Tag, i64)>, (t, e)| match best {
                    Some((_, ms)) if ms >= e.updated_ms => best,
                    _ => Some((t, e.updated_ms)),
                })
                .map(|(t, _)| t.clone()),
        }
    }
}

/// The whole index. Repositories are kept sorted for the catalog.
#[derive(Default)]
pub struct Index {
    repos: RwLock<BTreeMap<RepoName, Arc<RwLock<RepoState>>>>,
    cached_bytes: AtomicUsize,
    cache_budget: usize,
    /// When a client last asked for a blob of a repository (`HEAD`/`GET`): a
    /// push that found a blob present is about to reference it, so the collector
    /// leaves a blob seen within its grace period alone. Memory only; bounded by
    /// the links that exist, and pruned by the collector.
    touches: std::sync::Mutex<HashMap<(RepoName, Digest), i64>>,
}

/// Manifests larger than this are not kept in memory (read from storage instead).
const MAX_CACHED_MANIFEST: usize = 256 * 1024;

impl Index {
    pub fn from_snapshot(s: Snapshot, cache_budget: usize) -> Index {
        let index = Index { cache_budget, ..Default::default() };
        {
            let mut repos = index.repos.write().unwrap();
            let mut get = |name: &RepoName| repos.entry(name.clone()).or_default().clone();
            for head in &s.repos {
                get(&head.name).write().unwrap().version = head.version.clone();
            }
            for m in s.manifests {
                let r = get(&m.repo);
                r.write().unwrap().manifests.insert(m.digest.clone(), ManifestEntry { row: resident(m), bytes: None });
            }
            for t in s.tags {
                let r = get(&t.repo);
                r.write().unwrap().tags.insert(t.name, TagEntry { digest: t.digest, updated_ms: t.updated_ms });
            }
            for l in s.links {
                let r = get(&l.repo);
                r.write().unwrap().blobs.insert(l.digest, l.size);
            }
        }
        index
    }

    /// The version of the repository's state held here (`None`: not held).
    pub fn version(&self, name: &RepoName) -> Option<String> {
        self.repo(name).map(|r| r.read().unwrap().version.clone())
    }

    /// Put a repository's state as metadata holds it (`s`: its snapshot, with
    /// no head when it does not exist) in place of what is held: in place, so
    /// a handle taken before sees the new state. Cached manifest bytes stay for
    /// the manifests that remain (a digest names the same bytes).
    pub fn install(&self, name: &RepoName, s: Snapshot) {
        let Some(head) = s.repos.into_iter().next() else {
            self.remove_repo(name);
            return;
        };
        let mut fresh = RepoState { version: head.version, ..Default::default() };
        for m in s.manifests {
            fresh.manifests.insert(m.digest.clone(), ManifestEntry { row: resident(m), bytes: None });
        }
        for t in s.tags {
            fresh.tags.insert(t.name, TagEntry { digest: t.digest, updated_ms: t.updated_ms });
        }
        for l in s.links {
            fresh.blobs.insert(l.digest, l.size);
        }
        let state = self.repo_or_create(name);
        let mut held = state.write().unwrap();
        let mut dropped = 0;
        for (digest, old) in held.manifests.drain() {
            match (fresh.manifests.get_mut(&digest), old.bytes) {
                (Some(e), Some(b)) => e.bytes = Some(b),
                (None, Some(b)) => dropped += b.len(),
                _ => {}
            }
        }
        self.forget_cached(dropped);
        *held = fresh;
    }

    /// The repository's state, if it exists.
    pub fn repo(&self, name: &RepoName) -> Option<Arc<RwLock<RepoState>>> {
        self.repos.read().unwrap().get(name).cloned()
    }

    /// The repository's state, created empty if needed.
    pub fn repo_or_create(&self, name: &RepoName) -> Arc<RwLock<RepoState>> {
        if let Some(r) = self.repo(name) {
            return r;
        }
        self.repos.write().unwrap().entry(name.clone()).or_default().clone()
    }

    /// Forget a deleted repository (and the manifest bytes it had cached).
    pub fn remove_repo(&self, name: &RepoName) {
        let Some(state) = self.repos.write().unwrap().remove(name) else {
            return;
        };
        let cached: usize = state.read().unwrap().manifests.values().filter_map(|e| e.bytes.as_ref().map(|b| b.len())).sum();
        self.forget_cached(cached);
    }

    /// Note that a client asked for `digest` in `repo`.
    pub fn touch(&self, repo: &RepoName, digest: &Digest, now_ms: i64) {
        self.touches.lock().unwrap().insert((repo.clone(), digest.clone()), now_ms);
    }

    /// Whether a client asked for `digest` in `repo` at or after `since_ms`.
    pub fn touched_since(&self, repo: &RepoName, digest: &Digest, since_ms: i64) -> bool {
        self.touches.lock().unwrap().get(&(repo.clone(), digest.clone())).is_some_and(|t| *t >= since_ms)
    }

    /// Forget touches older than `before_ms`.
    pub fn prune_touches(&self, before_ms: i64) {
        self.touches.lock().unwrap().retain(|_, t| *t >= before_ms);
    }

    /// Every repository's name.
    pub fn repo_count(&self) -> usize {
        self.repos.read().unwrap().len()
    }

    pub fn repo_names(&self) -> Vec<RepoName> {
        self.repos.read().unwrap().keys().cloned().collect()
    }

    /// Size of a blob linked into `repo`.
    pub fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Option<u64> {
        self.repo(repo)?.read().unwrap().blobs.get(digest).copied()
    }

    /// The repositories `keep` admits, by name.
    pub fn names_where(&self, mut keep: impl FnMut(&RepoName) -> bool) -> Vec<RepoName> {
        self.repos.read().unwrap().keys().filter(|r| keep(r)).cloned().collect()
    }

    /// Figures of each repository that exists, in the order given (`None` for one that does not).
    pub fn stats(&self, names: &[RepoName]) -> Vec<Option<RepoStats>> {
        names.iter().map(|n| self.repo(n).map(|r| r.read().unwrap().stats())).collect()
    }

    /// Up to `n` repositories after `last` that are `visible`, and whether more
    /// follow: the scan starts after `last` (no repository before it is looked at).
    pub fn catalog(&self, n: usize, last: Option<&str>, mut visible: impl FnMut(&RepoName) -> bool) -> (Vec<RepoName>, bool) {
        use std::ops::Bound;
        let repos = self.repos.read().unwrap();
        let from = last.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = repos.range::<str, _>((from, Bound::Unbounded)).map(|(k, _)| k).filter(|r| visible(r));
        let out: Vec<RepoName> = it.by_ref().take(n).cloned().collect();
        let more = it.next().is_some();
        (out, more)
    }

    /// Up to `n` tags of `repo` after `last`, and whether more follow.
    pub fn tags(&self, repo: &RepoName, n: usize, last: Option<&str>) -> Option<(Vec<Tag>, bool)> {
        let r = self.repo(repo)?;
        let state = r.read().unwrap();
        Some(page(state.tags.keys(), |k| k.as_str(), n, last))
    }

    /// Keep manifest bytes in memory if the budget allows.
    pub fn cache_manifest_bytes(&self, repo: &RepoName, digest: &Digest, bytes: &Bytes) {
        if bytes.len() > MAX_CACHED_MANIFEST {
            return;
        }
        if self.cached_bytes.fetch_add(bytes.len(), Ordering::Relaxed) + bytes.len() > self.cache_budget {
            self.cached_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
            return;
        }
        let Some(r) = self.repo(repo) else {
            self.cached_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
            return;
        };
        let mut state = r.write().unwrap();
        match state.manifests.get_mut(digest) {
            Some(e) if e.bytes.is_none() => e.bytes = Some(bytes.clone()),
            _ => {
                self.cached_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
            }
        }
    }

    /// Account for a cached manifest that was dropped.
    pub fn forget_cached(&self, len: usize) {
        self.cached_bytes.fetch_sub(len, Ordering::Relaxed);
    }
}

/// Keys of a sorted map strictly after `last` (lexically), at most `n`.
fn page<'a, K: Clone + 'a>(keys: impl Iterator<Item = &'a K>, as_str: impl Fn(&K) -> &str, n: usize, last: Option<&str>) -> (Vec<K>, bool) {
    let mut it = keys.filter(|k| last.is_none_or(|l| as_str(k) > l));
    let out: Vec<K> = it.by_ref().take(n).cloned().collect();
    let more = it.next().is_some();
    (out, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_metadata::{LinkRow, RepoHead, TagRow};

    fn head(name: &str) -> RepoHead {
        RepoHead { name: name.parse().unwrap(), version: String::new() }
    }

    /// A manifest row of `repo` over `body`, taking `content_size` bytes.
    fn row(repo: &RepoName, body: &[u8], content_size: u64) -> ManifestRow {
        ManifestRow {
            repo: repo.clone(),
            digest: Digest::sha256(body),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: body.len() as u64,
            artifact_type: None,
            subject: None,
            annotations: None,
            created_ms: 1,
            content_size,
            refs: None,
            findings: vec![],
        }
    }

    #[test]
    fn pagination() {
        let s = Snapshot { repos: ["a", "b/c", "b/d", "e"].iter().map(|s| head(s)).collect(), ..Default::default() };
        let idx = Index::from_snapshot(s, 1 << 20);
        let (p, more) = idx.catalog(2, None, |_| true);
        assert_eq!(p.iter().map(|r| r.as_str()).collect::<Vec<_>>(), ["a", "b/c"]);
        assert!(more);
        let (p, more) = idx.catalog(2, Some("b/c"), |_| true);
        assert_eq!(p.iter().map(|r| r.as_str()).collect::<Vec<_>>(), ["b/d", "e"]);
        assert!(!more);
        let (p, more) = idx.catalog(10, Some("zzz"), |_| true);
        assert!(p.is_empty() && !more);
        // A page after `last` looks at nothing before it (the filter is a policy
        // decision per repository): a deep page costs what it lists.
        let mut asked = Vec::new();
        let (p, _) = idx.catalog(1, Some("b/c"), |r| {
            asked.push(r.to_string());
            true
        });
        assert_eq!(p.iter().map(|r| r.as_str()).collect::<Vec<_>>(), ["b/d"]);
        assert_eq!(asked, ["b/d", "e"]);
    }

    /// A repository loaded again replaces what was held, in place (a handle
    /// taken before sees it), keeps the cached bytes of manifests that stay,
    /// and gives back the budget of those that went; loaded as absent, it goes.
    #[test]
    fn installing_a_repository_replaces_its_state_in_place() {
        let app: RepoName = "acme/app".parse().unwrap();
        let (kept, gone, new) = (row(&app, b"kept", 0), row(&app, b"gone!", 0), row(&app, b"new", 0));
        let idx = Index::from_snapshot(
            Snapshot { repos: vec![head("acme/app")], manifests: vec![kept.clone(), gone.clone()], ..Default::default() },
            1 << 20,
        );
        idx.cache_manifest_bytes(&app, &kept.digest, &Bytes::from_static(b"kept"));
        idx.cache_manifest_bytes(&app, &gone.digest, &Bytes::from_static(b"gone!"));
        assert_eq!(idx.cached_bytes.load(Ordering::Relaxed), 9);
        let held = idx.repo(&app).unwrap();
        let tag = TagRow { repo: app.clone(), name: "v1".parse().unwrap(), digest: new.digest.clone(), updated_ms: 5 };
        let fresh = Snapshot {
            repos: vec![RepoHead { name: app.clone(), version: "v2".into() }],
            manifests: vec![kept.clone(), new.clone()],
            tags: vec![tag],
            links: vec![],
        };
        idx.install(&app, fresh);
        {
            let s = held.read().unwrap();
            assert_eq!(s.version, "v2");
            assert_eq!(s.tag(&"v1".parse().unwrap()), Some(&new.digest));
            assert_eq!(s.manifests[&kept.digest].bytes.as_deref(), Some(&b"kept"[..]));
            assert!(s.manifests[&new.digest].bytes.is_none() && !s.manifests.contains_key(&gone.digest));
        }
        assert_eq!(idx.cached_bytes.load(Ordering::Relaxed), 4);
        assert_eq!(idx.version(&app).as_deref(), Some("v2"));
        idx.install(&app, Snapshot::default());
        assert!(idx.repo(&app).is_none() && idx.version(&app).is_none());
        assert_eq!(idx.cached_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn figures_follow_the_state() {
        let app: RepoName = "acme/app".parse().unwrap();
        let empty: RepoName = "acme/empty".parse().unwrap();
        let (m1, m2) = (row(&app, b"one", 1000), row(&app, b"two!", 1000));
        let tag = |name: &str, m: &ManifestRow, ms| TagRow {
            repo: app.clone(),
            name: name.parse().unwrap(),
            digest: m.digest.clone(),
            updated_ms: ms,
        };
        let s = Snapshot {
            repos: vec![head("acme/app"), head("acme/empty")],
            tags: vec![tag("v1", &m1, 10), tag("v2", &m2, 30), tag("b", &m2, 30), tag("old", &m1, 5)],
            manifests: vec![m1.clone(), m2.clone()],
            links: vec![LinkRow { repo: app.clone(), digest: Digest::sha256(b"layer"), size: 100 }],
        };
        let idx = Index::from_snapshot(s, 1 << 20);
        let none: RepoName = "acme/none".parse().unwrap();
        let stats = idx.stats(&[app.clone(), empty, none]);
        // Size: links and manifests' own bytes; the latest tag is the first by
        // name among the most recently pushed.
        let want = RepoStats { tag_count: 4, manifest_count: 2, size: 100 + 3 + 4, latest_tag: Some("b".parse().unwrap()) };
        assert_eq!(stats, [Some(want), Some(RepoStats::default()), None]);

        let state = idx.repo(&app).unwrap();
        state.write().unwrap().tags.insert("v1".parse().unwrap(), TagEntry { digest: m1.digest.clone(), updated_ms: 31 });
        assert_eq!(state.read().unwrap().stats().latest_tag, Some("v1".parse().unwrap()));
        assert_eq!(state.read().unwrap().tag(&"v2".parse().unwrap()), Some(&m2.digest));
        assert_eq!(idx.names_where(|r| r.as_str().ends_with("app")), [app]);
    }
}
