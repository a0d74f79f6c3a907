//! The read index: the names of every repository, and a bounded cache of
//! repositories' states (tags, manifests, blob links) over the metadata store.
//!
//! - Every repository's **name** is held (the catalog and listings are served
//!   from memory; a name costs tens of bytes, so 100,000 repositories take a
//!   few MiB).
//! - A repository's **state** is held while it is in use: loaded whole from
//!   metadata on first use (`Metadata::repo_snapshot`, one transaction, through
//!   the repository's actor so a load never interleaves with its changes), and
//!   dropped, least recently used first, when the states held exceed their
//!   budget (`registry.index_cache_bytes`). A state someone holds a handle to
//!   is never dropped, so a request or a change works on one state throughout.
//! - Changes reach the index only from the actors, after their metadata writes
//!   succeed.
//!
//! A read of a held repository takes two read locks and never touches the
//! database or a mailbox, so a GET on the hot set writes nothing and waits on
//! no write; a read of one not held costs one metadata read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use berth_metadata::{ManifestRow, Snapshot};
use berth_oci::{Digest, RepoName, Tag};
use bytes::Bytes;

/// A repository's state as held: shared by the index and whoever works on it.
pub type Handle = Arc<RwLock<RepoState>>;

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

impl RepoState {
    /// Up to `n` tags after `last` (by name), and whether more follow.
    pub fn tags_page(&self, n: usize, last: Option<&str>) -> (Vec<Tag>, bool) {
        page(self.tags.keys(), |k| k.as_str(), n, last)
    }

    /// The state a repository's snapshot describes (`None`: it does not exist).
    pub fn from_snapshot(s: Snapshot) -> Option<RepoState> {
        let head = s.repos.into_iter().next()?;
        let mut state = RepoState { version: head.version, ..Default::default() };
        for m in s.manifests {
            state.manifests.insert(m.digest.clone(), ManifestEntry { row: resident(m), bytes: None });
        }
        for t in s.tags {
            state.tags.insert(t.name, TagEntry { digest: t.digest, updated_ms: t.updated_ms });
        }
        for l in s.links {
            state.blobs.insert(l.digest, l.size);
        }
        Some(state)
    }

    /// What holding the state costs in memory (the budget's unit), per tag,
    /// manifest row (with its references) and blob link: calibrated on the
    /// process's resident memory, not on the items' sizes. 4,245 states of 10
    /// tags, 10 manifests and 2 links took 115 MiB more than 618 did (31 KiB
    /// each, 2.4 times what the items themselves weigh: allocator pages shared
    /// with the database's short-lived allocations stay resident with them).
    fn weight(&self) -> usize {
        BASE_WEIGHT + self.tags.len() * TAG_WEIGHT + self.manifests.len() * MANIFEST_WEIGHT + self.blobs.len() * LINK_WEIGHT
    }
}

const BASE_WEIGHT: usize = 1024;
const TAG_WEIGHT: usize = 512;
const MANIFEST_WEIGHT: usize = 2560;
const LINK_WEIGHT: usize = 384;

/// A state the index holds, with when it was last used and what it weighed
/// when last weighed.
struct Held {
    state: Handle,
    used: AtomicU64,
    weight: AtomicUsize,
}

/// The whole index.
pub struct Index {
    /// Every repository that exists, sorted for the catalog.
    names: RwLock<BTreeSet<RepoName>>,
    /// The states held (a bounded cache: see the module's notes).
    held: RwLock<HashMap<RepoName, Held>>,
    /// What the states held weigh (as last weighed).
    held_bytes: AtomicUsize,
    state_budget: usize,
    /// Ticks at every load and every eviction: a state's `used` is the tick of
    /// its last use, so the least recently used go first.
    clock: AtomicU64,
    cached_bytes: AtomicUsize,
    cache_budget: usize,
    /// When a client last asked for a blob of a repository (`HEAD`/`GET`): a
    /// push that found a blob present is about to reference it, so the collector
    /// leaves a blob seen within its grace period alone. Memory only; bounded by
    /// the links that exist, and pruned by the collector.
    touches: std::sync::Mutex<HashMap<(RepoName, Digest), i64>>,
    /// Hashes of repositories recently read while their state was not held,
    /// direct-mapped (see [`Index::read_again`]).
    missed: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

/// How many reads of repositories not held [`Index::read_again`] remembers
/// (at most; two names sharing a slot forget each other): 32 KiB.
const MISSED_SLOTS: usize = 4096;

/// Manifests larger than this are not kept in memory (read from storage instead).
const MAX_CACHED_MANIFEST: usize = 256 * 1024;

impl Index {
    /// An index of the repositories `names`, holding no state yet; states held
    /// weigh at most `state_budget` bytes (beyond the ones in use) and cached
    /// manifest bytes take at most `cache_budget`.
    pub fn new(names: impl IntoIterator<Item = RepoName>, state_budget: usize, cache_budget: usize) -> Index {
        Index {
            names: RwLock::new(names.into_iter().collect()),
            held: RwLock::default(),
            held_bytes: AtomicUsize::new(0),
            state_budget,
            clock: AtomicU64::new(1),
            cached_bytes: AtomicUsize::new(0),
            cache_budget,
            touches: Default::default(),
            missed: (0..MISSED_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: Default::default(),
        }
    }

    /// Whether a read of `name`, whose state is not held, should load it:
    /// only if the repository was read while not held recently (among the
    /// last few thousand such reads). A repository read once is served by
    /// point reads and holds nothing; one read again is held. So a pass over
    /// many repositories does not push the ones in use out, and a cold read
    /// costs two records, not the whole repository.
    pub fn read_again(&self, name: &RepoName) -> bool {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(name) | 1;
        let slot = &self.missed[(h >> 1) as usize % MISSED_SLOTS];
        slot.swap(h, Ordering::Relaxed) == h
    }

    /// Whether the repository exists (as far as this process knows: see `coherence.rs`).
    pub fn exists(&self, name: &RepoName) -> bool {
        self.names.read().unwrap().contains(name)
    }

    /// The repository's state if it is held (noted as used).
    pub fn held(&self, name: &RepoName) -> Option<Handle> {
        let held = self.held.read().unwrap();
        let h = held.get(name)?;
        let now = self.clock.load(Ordering::Relaxed);
        // Stored only when it changes, so a hot state's line is not written by every read.
        if h.used.load(Ordering::Relaxed) != now {
            h.used.store(now, Ordering::Relaxed);
        }
        Some(h.state.clone())
    }

    /// The version of the repository's state held here (`None`: not held).
    pub fn version(&self, name: &RepoName) -> Option<String> {
        self.held.read().unwrap().get(name).map(|h| h.state.read().unwrap().version.clone())
    }

    /// How many repository states are held, and what they weigh.
    pub fn held_figures(&self) -> (usize, usize) {
        (self.held.read().unwrap().len(), self.held_bytes.load(Ordering::Relaxed))
    }

    /// Put a repository's state as metadata holds it (`s`: its snapshot, with
    /// no head when it does not exist) in place of what is held: in place, so
    /// a handle taken before sees the new state. Cached manifest bytes stay for
    /// the manifests that remain (a digest names the same bytes). Answers the
    /// state now held.
    pub fn install(&self, name: &RepoName, s: Snapshot) -> Option<Handle> {
        let Some(mut fresh) = RepoState::from_snapshot(s) else {
            self.remove_repo(name);
            return None;
        };
        self.add_name(name);
        let weight = fresh.weight();
        let handle = {
            let mut held = self.held.write().unwrap();
            let tick = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
            match held.get(name) {
                Some(h) => {
                    let mut state = h.state.write().unwrap();
                    let mut dropped = 0;
                    for (digest, old) in state.manifests.drain() {
                        match (fresh.manifests.get_mut(&digest), old.bytes) {
                            (Some(e), Some(b)) => e.bytes = Some(b),
                            (None, Some(b)) => dropped += b.len(),
                            _ => {}
                        }
                    }
                    self.forget_cached(dropped);
                    *state = fresh;
                    drop(state);
                    h.used.store(tick, Ordering::Relaxed);
                    self.reweigh(h, weight);
                    h.state.clone()
                }
                None => {
                    let state = Arc::new(RwLock::new(fresh));
                    let h = Held { state: state.clone(), used: AtomicU64::new(tick), weight: AtomicUsize::new(weight) };
                    held.insert(name.clone(), h);
                    self.held_bytes.fetch_add(weight, Ordering::Relaxed);
                    state
                }
            }
        };
        self.trim();
        Some(handle)
    }

    /// The repository's state, made (empty, and named) if it does not exist:
    /// for the change that creates it.
    pub fn repo_or_create(&self, name: &RepoName) -> Handle {
        if let Some(h) = self.held(name) {
            return h;
        }
        self.add_name(name);
        let handle = {
            let mut held = self.held.write().unwrap();
            let tick = self.clock.load(Ordering::Relaxed);
            let h = held.entry(name.clone()).or_insert_with(|| {
                let state = RepoState::default();
                let weight = state.weight();
                self.held_bytes.fetch_add(weight, Ordering::Relaxed);
                Held { state: Arc::new(RwLock::new(state)), used: AtomicU64::new(tick), weight: AtomicUsize::new(weight) }
            });
            h.state.clone()
        };
        self.trim();
        handle
    }

    /// A change grew or shrank the repository's state: weigh it again (and
    /// drop other states if the budget is exceeded). Called with no state lock held.
    pub fn changed(&self, name: &RepoName) {
        {
            let held = self.held.read().unwrap();
            let Some(h) = held.get(name) else { return };
            let weight = h.state.read().unwrap().weight();
            self.reweigh(h, weight);
        }
        self.trim();
    }

    /// Record what a held state weighs now.
    fn reweigh(&self, h: &Held, weight: usize) {
        let before = h.weight.swap(weight, Ordering::Relaxed);
        self.held_bytes.fetch_add(weight, Ordering::Relaxed);
        self.held_bytes.fetch_sub(before, Ordering::Relaxed);
    }

    /// Know `name` as a repository (the write lock only when it is new: every
    /// load passes here, and every request's existence check reads the set).
    pub fn add_name(&self, name: &RepoName) {
        if !self.names.read().unwrap().contains(name) {
            self.names.write().unwrap().insert(name.clone());
        }
    }

    /// Drop the least recently used states nobody holds until what stays
    /// weighs three quarters of the budget (a quarter of headroom, so passes
    /// are rare), if the budget is exceeded.
    fn trim(&self) {
        if self.held_bytes.load(Ordering::Relaxed) <= self.state_budget {
            return;
        }
        let mut held = self.held.write().unwrap();
        let mut total = held.values().map(|h| h.weight.load(Ordering::Relaxed)).sum::<usize>();
        self.held_bytes.store(total, Ordering::Relaxed);
        if total <= self.state_budget {
            return;
        }
        let target = self.state_budget / 4 * 3;
        let mut idle: Vec<(u64, RepoName)> = held
            .iter()
            .filter(|(_, h)| Arc::strong_count(&h.state) == 1)
            .map(|(n, h)| (h.used.load(Ordering::Relaxed), n.clone()))
            .collect();
        idle.sort_unstable();
        let mut freed_cache = 0;
        for (_, name) in idle {
            if total <= target {
                break;
            }
            if let Some(h) = held.remove(&name) {
                total -= h.weight.load(Ordering::Relaxed);
                freed_cache += cached_in(&h.state.read().unwrap());
            }
        }
        self.held_bytes.store(total, Ordering::Relaxed);
        self.clock.fetch_add(1, Ordering::Relaxed);
        self.forget_cached(freed_cache);
    }

    /// Forget a deleted repository (and the manifest bytes it had cached).
    pub fn remove_repo(&self, name: &RepoName) {
        self.names.write().unwrap().remove(name);
        let Some(h) = self.held.write().unwrap().remove(name) else {
            return;
        };
        self.held_bytes.fetch_sub(h.weight.load(Ordering::Relaxed), Ordering::Relaxed);
        self.forget_cached(cached_in(&h.state.read().unwrap()));
    }

    /// Make the set of names `now` (another replica made or deleted
    /// repositories): names added hold no state until used; those gone go
    /// with their state.
    pub fn set_names(&self, now: BTreeSet<RepoName>) {
        let gone: Vec<RepoName> = self.names.read().unwrap().difference(&now).cloned().collect();
        for name in &gone {
            self.remove_repo(name);
        }
        *self.names.write().unwrap() = now;
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

    /// How many repositories exist.
    pub fn repo_count(&self) -> usize {
        self.names.read().unwrap().len()
    }

    /// Every repository's name.
    pub fn repo_names(&self) -> Vec<RepoName> {
        self.names.read().unwrap().iter().cloned().collect()
    }

    /// The repositories `keep` admits, by name.
    pub fn names_where(&self, mut keep: impl FnMut(&RepoName) -> bool) -> Vec<RepoName> {
        self.names.read().unwrap().iter().filter(|r| keep(r)).cloned().collect()
    }

    /// Up to `n` repositories after `last` that are `visible`, and whether more
    /// follow: the scan starts after `last` (no repository before it is looked at).
    pub fn catalog(&self, n: usize, last: Option<&str>, mut visible: impl FnMut(&RepoName) -> bool) -> (Vec<RepoName>, bool) {
        use std::ops::Bound;
        let names = self.names.read().unwrap();
        let from = last.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = names.range::<str, _>((from, Bound::Unbounded)).filter(|r| visible(r));
        let out: Vec<RepoName> = it.by_ref().take(n).cloned().collect();
        let more = it.next().is_some();
        (out, more)
    }

    /// Keep manifest bytes in memory if the budget allows (and the
    /// repository's state is held).
    pub fn cache_manifest_bytes(&self, repo: &RepoName, digest: &Digest, bytes: &Bytes) {
        if bytes.len() > MAX_CACHED_MANIFEST {
            return;
        }
        if self.cached_bytes.fetch_add(bytes.len(), Ordering::Relaxed) + bytes.len() > self.cache_budget {
            self.cached_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
            return;
        }
        let Some(r) = self.held(repo) else {
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

/// The manifest bytes a state has cached.
fn cached_in(s: &RepoState) -> usize {
    s.manifests.values().filter_map(|e| e.bytes.as_ref().map(|b| b.len())).sum()
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

    fn names(list: &[&str]) -> Vec<RepoName> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn pagination() {
        let idx = Index::new(names(&["a", "b/c", "b/d", "e"]), 1 << 20, 1 << 20);
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
        // Names exist without a state held.
        assert!(idx.exists(&"b/c".parse().unwrap()) && idx.held(&"b/c".parse().unwrap()).is_none());
        assert_eq!(idx.held_figures().0, 0);
    }

    /// A repository loaded again replaces what was held, in place (a handle
    /// taken before sees it), keeps the cached bytes of manifests that stay,
    /// and gives back the budget of those that went; loaded as absent, it goes.
    #[test]
    fn installing_a_repository_replaces_its_state_in_place() {
        let app: RepoName = "acme/app".parse().unwrap();
        let (kept, gone, new) = (row(&app, b"kept", 0), row(&app, b"gone!", 0), row(&app, b"new", 0));
        let idx = Index::new([], 1 << 20, 1 << 20);
        let first = Snapshot { repos: vec![head("acme/app")], manifests: vec![kept.clone(), gone.clone()], ..Default::default() };
        let held = idx.install(&app, first).unwrap();
        assert!(idx.exists(&app));
        idx.cache_manifest_bytes(&app, &kept.digest, &Bytes::from_static(b"kept"));
        idx.cache_manifest_bytes(&app, &gone.digest, &Bytes::from_static(b"gone!"));
        assert_eq!(idx.cached_bytes.load(Ordering::Relaxed), 9);
        let tag = TagRow { repo: app.clone(), name: "v1".parse().unwrap(), digest: new.digest.clone(), updated_ms: 5 };
        let fresh = Snapshot {
            repos: vec![RepoHead { name: app.clone(), version: "v2".into() }],
            manifests: vec![kept.clone(), new.clone()],
            tags: vec![tag],
            links: vec![],
        };
        assert!(Arc::ptr_eq(&idx.install(&app, fresh).unwrap(), &held));
        {
            let s = held.read().unwrap();
            assert_eq!(s.version, "v2");
            assert_eq!(s.tag(&"v1".parse().unwrap()), Some(&new.digest));
            assert_eq!(s.manifests[&kept.digest].bytes.as_deref(), Some(&b"kept"[..]));
            assert!(s.manifests[&new.digest].bytes.is_none() && !s.manifests.contains_key(&gone.digest));
        }
        assert_eq!(idx.cached_bytes.load(Ordering::Relaxed), 4);
        assert_eq!(idx.version(&app).as_deref(), Some("v2"));
        assert!(idx.install(&app, Snapshot::default()).is_none());
        assert!(idx.held(&app).is_none() && idx.version(&app).is_none() && !idx.exists(&app));
        assert_eq!(idx.cached_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(idx.held_figures(), (0, 0));
    }

    /// States beyond the budget go, least recently used first, with their
    /// cached bytes; a state someone holds a handle to stays whatever its age;
    /// names stay.
    #[test]
    fn states_beyond_the_budget_go_least_recently_used_first() {
        let one = RepoState::default().weight() + MANIFEST_WEIGHT;
        let idx = Index::new([], 10 * one, 1 << 20);
        let load = |i: usize| {
            let name: RepoName = format!("acme/r{i}").parse().unwrap();
            let m = row(&name, format!("m{i:02}").as_bytes(), 0);
            let s = Snapshot { repos: vec![head(name.as_str())], manifests: vec![m.clone()], ..Default::default() };
            let handle = idx.install(&name, s).unwrap();
            idx.cache_manifest_bytes(&name, &m.digest, &Bytes::from(format!("m{i:02}")));
            (name, handle)
        };
        let (pinned_name, pinned) = load(0);
        let (hot, h) = load(1);
        drop(h);
        for i in 2..10 {
            load(i);
        }
        assert_eq!(idx.held_figures(), (10, 10 * one));
        // Used: stays ahead of those loaded after it.
        assert!(idx.held(&hot).is_some());
        load(10);
        let (count, bytes) = idx.held_figures();
        assert!(bytes <= 10 * one / 4 * 3, "{bytes} bytes held after trimming");
        assert_eq!(count, bytes / one);
        assert!(idx.held(&pinned_name).is_some_and(|h| Arc::ptr_eq(&h, &pinned)), "a state in use was dropped");
        assert!(idx.held(&hot).is_some(), "the most recently used was dropped before older ones");
        assert!(idx.held(&"acme/r10".parse().unwrap()).is_some(), "the state just loaded was dropped");
        assert!(idx.held(&"acme/r2".parse().unwrap()).is_none(), "the least recently used stayed");
        // Cached bytes went with their states (3 bytes each).
        assert_eq!(idx.cached_bytes.load(Ordering::Relaxed), 3 * count);
        // Every name is still known.
        assert_eq!(idx.repo_count(), 11);
        // A state that grows is weighed again.
        pinned.write().unwrap().blobs.insert(Digest::sha256(b"layer"), 10);
        idx.changed(&pinned_name);
        assert_eq!(idx.held_figures().1, bytes + LINK_WEIGHT);
    }

    /// A repository is loaded on its second read while not held, not its
    /// first; reads of thousands of others in between make it forget.
    #[test]
    fn a_state_is_loaded_on_a_repository_read_again() {
        let idx = Index::new([], 1 << 20, 1 << 20);
        let name = |i: usize| -> RepoName { format!("acme/r{i}").parse().unwrap() };
        assert!(!idx.read_again(&name(0)));
        assert!(!idx.read_again(&name(1)));
        assert!(idx.read_again(&name(0)));
        assert!(idx.read_again(&name(1)));
        // A pass over many others: most of those are read once, so few load.
        let loaded = (2..8 * MISSED_SLOTS).filter(|i| idx.read_again(&name(*i))).count();
        assert_eq!(loaded, 0, "repositories read once were loaded");
        // ... and the two read before are forgotten (or nearly all of such).
        let remembered = (0..2).filter(|i| idx.read_again(&name(*i))).count();
        assert!(remembered <= 1, "{remembered} of 2 remembered after {} other reads", 8 * MISSED_SLOTS);
    }

    #[test]
    fn figures_follow_the_state() {
        let app: RepoName = "acme/app".parse().unwrap();
        let (m1, m2) = (row(&app, b"one", 1000), row(&app, b"two!", 1000));
        let tag = |name: &str, m: &ManifestRow, ms| TagRow {
            repo: app.clone(),
            name: name.parse().unwrap(),
            digest: m.digest.clone(),
            updated_ms: ms,
        };
        let s = Snapshot {
            repos: vec![head("acme/app")],
            tags: vec![tag("v1", &m1, 10), tag("v2", &m2, 30), tag("b", &m2, 30), tag("old", &m1, 5)],
            manifests: vec![m1.clone(), m2.clone()],
            links: vec![LinkRow { repo: app.clone(), digest: Digest::sha256(b"layer"), size: 100 }],
        };
        let state = RepoState::from_snapshot(s).unwrap();
        // Size: links and manifests' own bytes; the latest tag is the first by
        // name among the most recently pushed.
        let want = RepoStats { tag_count: 4, manifest_count: 2, size: 100 + 3 + 4, latest_tag: Some("b".parse().unwrap()) };
        assert_eq!(state.stats(), want);
        assert_eq!(RepoState::default().stats(), RepoStats::default());
        let (page, more) = state.tags_page(2, Some("b"));
        assert_eq!(page.iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["old", "v1"]);
        assert!(more);

        let mut state = state;
        state.tags.insert("v1".parse().unwrap(), TagEntry { digest: m1.digest.clone(), updated_ms: 31 });
        assert_eq!(state.stats().latest_tag, Some("v1".parse().unwrap()));
        assert_eq!(state.tag(&"v2".parse().unwrap()), Some(&m2.digest));
    }
}
