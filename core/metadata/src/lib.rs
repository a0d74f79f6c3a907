//! Registry metadata over SurrealDB: repositories, manifests, tags, blob links,
//! upload sessions, and (in [`accounts`]) tenants, users, namespaces, tokens,
//! signing keys, policy rules and shares.
//!
//! [`Metadata`] is the only type that speaks SurrealQL. Rows cross its boundary as
//! plain structs of validated domain types; SurrealDB types never leave this crate.
//!
//! Architecture invariants:
//! - Every multi-record change (a manifest with its tag, a manifest delete with its
//!   tags) is one SurrealDB transaction, so no tag ever points at a missing manifest.
//! - Record ids are derived from validated names and digests (`tag:[repo, name]`),
//!   so writes are idempotent upserts.

pub mod accounts;
pub mod audit;
mod conn;
pub mod gc;
pub mod manage;
pub mod outbox;
pub mod plugins;
pub mod retention;
pub mod usage;

pub use accounts::{
    NamespaceRow, NsShareRow, PolicyRuleRow, PolicyState, ShareRow, SigningKeyRow, TenantRow, TokenKind, TokenRow, UserChange, UserRow,
};
pub use audit::AuditRow;
use berth_oci::{Digest, Reference, RepoName, Tag, UploadId};
pub use manage::{NamespacePatch, NamespaceProfile, NamespaceStats, PullDelta, Removed, RepoPatch, RepoProfile, TagInfo};
pub use outbox::{DeliveryRow, OutboxRow, Settle};
pub use plugins::{FindingRow, PluginInstanceRow};
pub use retention::{RetentionItem, RetentionPolicy, RetentionRules, RetentionRun};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use surrealdb::IndexedResults;
pub use usage::{QuotaLimits, TenantUsage};

/// Which metadata store to use, chosen by configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetadataConfig {
    /// `surrealkv://<dir>` (embedded, the default), `mem://`, or `ws://host:port`.
    pub url: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default = "default_db")]
    pub database: String,
    /// Root credentials for a SurrealDB server (`ws://`).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// The embedded store's disk sync (`surrealkv://` only): `every` (the
    /// default: a commit is acknowledged once it is on disk; concurrent commits
    /// share one sync), `never` (the OS decides; a power loss can lose
    /// acknowledged pushes), or an interval such as `1s` (at most that much).
    #[serde(default)]
    pub sync: Option<String>,
    /// The embedded store's block cache, in MiB (`surrealkv://` only; default
    /// 32). SurrealKV would otherwise take half the machine's memory less 1 GiB.
    #[serde(default)]
    pub cache_mib: Option<u64>,
    /// The embedded store's in-memory write buffer, in MiB (`surrealkv://` only;
    /// default 32): it is flushed to disk when full (a second one fills while
    /// the first is written, so up to twice this is resident), and it bounds
    /// the largest single transaction (no request writes more than a few MiB
    /// in one: repository deletes and pull counts go in parts). SurrealKV would otherwise
    /// size it by the machine's memory (1 GiB on 16–64 GiB). Each flush is a
    /// chance for SurrealKV 0.21's lock-order deadlock (see `watchdog_secs`).
    #[serde(default)]
    pub memtable_mib: Option<u64>,
    /// Exit when the metadata store has not answered a read for this long
    /// (default 60; 0: never), so a supervisor restarts Berth. SurrealKV 0.21
    /// (the embedded engine of SurrealDB 3.3) can deadlock when a memtable
    /// flush and a range read take its manifest and memtable locks in opposite
    /// orders; nothing but a restart ends that, and a restart is safe.
    #[serde(default)]
    pub watchdog_secs: Option<u64>,
    /// How long Berth waits at startup for a metadata server (`ws://`) that
    /// refuses connections, as one started with it does (default 30; 0: not
    /// at all). A server that answers with an error (wrong password) fails at once.
    #[serde(default)]
    pub connect_wait_secs: Option<u64>,
}

/// The embedded store's cache and write buffer when the config names none.
/// Measured at 1,000,000 tags (docs/PERFORMANCE.md): 32 and 32 against 64 and
/// 64 took peak RSS under cold reads from 349–394 to 263–298 MiB at the same
/// request rates, and 64 MiB write buffers showed 1 GiB transients.
pub const DEFAULT_CACHE_MIB: u64 = 32;
pub const DEFAULT_MEMTABLE_MIB: u64 = 32;
pub const DEFAULT_WATCHDOG_SECS: u64 = 60;
pub const DEFAULT_CONNECT_WAIT_SECS: u64 = 30;

impl MetadataConfig {
    /// `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> MetadataConfig {
        MetadataConfig {
            url: url.into(),
            namespace: default_ns(),
            database: default_db(),
            username: None,
            password: None,
            sync: None,
            cache_mib: None,
            memtable_mib: None,
            watchdog_secs: None,
            connect_wait_secs: None,
        }
    }

    /// How long to wait for a metadata server that is not up yet (zero for a
    /// store of this process's own).
    pub(crate) fn connect_wait(&self) -> std::time::Duration {
        let secs = if self.is_server() { self.connect_wait_secs.unwrap_or(DEFAULT_CONNECT_WAIT_SECS) } else { 0 };
        std::time::Duration::from_secs(secs)
    }

    /// A SurrealDB server (which several replicas may share), not a store of
    /// this process's own.
    pub fn is_server(&self) -> bool {
        ["ws://", "wss://", "http://", "https://"].iter().any(|p| self.url.starts_with(p))
    }

    /// Where to connect, with the embedded store's settings checked.
    fn target(&self) -> std::result::Result<conn::Target, String> {
        let embedded = self.url.strip_prefix("surrealkv://");
        if let Some(sync) = &self.sync {
            let interval_ok = |v: &str| {
                let (n, mult) = if let Some(n) = v.strip_suffix("ms") {
                    (n, 1)
                } else if let Some(n) = v.strip_suffix('s') {
                    (n, 1000)
                } else {
                    return false;
                };
                n.parse::<u64>().is_ok_and(|n| n.saturating_mul(mult) > 100)
            };
            if !(sync == "every" || sync == "never" || interval_ok(sync)) {
                return Err(format!("metadata.sync {sync:?}: every, never, or an interval over 100 ms such as 1s or 500ms"));
            }
        }
        let sizes = [("cache_mib", self.cache_mib), ("memtable_mib", self.memtable_mib)];
        for (key, mib) in sizes {
            match mib {
                Some(m) if !(4..=1 << 20).contains(&m) => return Err(format!("metadata.{key} = {m}: between 4 and 1048576 (MiB)")),
                _ => {}
            }
        }
        let Some(dir) = embedded else {
            if self.sync.is_some() || sizes.iter().any(|(_, m)| m.is_some()) {
                return Err("metadata.sync, cache_mib and memtable_mib apply to the embedded store (surrealkv://) only".into());
            }
            return Ok(conn::Target::Url(self.url.clone()));
        };
        if dir.is_empty() || dir.contains('?') {
            return Err(format!("metadata.url {:?}: surrealkv://<directory>, settings go in their own keys", self.url));
        }
        Ok(conn::Target::Embedded {
            dir: dir.to_owned(),
            sync: self.sync.clone().unwrap_or_else(|| "every".into()),
            cache_bytes: self.cache_mib.unwrap_or(DEFAULT_CACHE_MIB) << 20,
            memtable_bytes: self.memtable_mib.unwrap_or(DEFAULT_MEMTABLE_MIB) << 20,
        })
    }
}

fn default_ns() -> String {
    "berth".into()
}
fn default_db() -> String {
    "registry".into()
}

/// A metadata failure (always an internal error to the caller).
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("surrealdb: {0}")]
    Db(#[from] surrealdb::Error),
    #[error("corrupt metadata row: {0}")]
    Corrupt(String),
    /// The digest is being deleted by the collector: a reference to it cannot be
    /// added now (the caller stores the bytes again, or retries).
    #[error("the blob is being collected")]
    Collecting,
    /// The repository changed since its writer last read it (another replica
    /// wrote it): the change was not made; read the repository again and retry.
    #[error("the repository changed meanwhile")]
    Stale,
    /// A delete of the repository is still removing what it held (see
    /// [`Metadata::hide_repo`]): it cannot be made again until that ends.
    #[error("a delete of the repository is still finishing")]
    Deleting,
    /// The change is larger than one transaction may be: the embedded store's
    /// write buffer (`metadata.memtable_mib`) bounds what one transaction writes.
    #[error("the change is larger than the metadata write buffer allows (metadata.memtable_mib)")]
    TooLarge,
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Open(String),
}

pub type Result<T> = std::result::Result<T, MetadataError>;

impl MetadataError {
    /// The store could not be reached (a server cut off, or not answering in
    /// time): the request may succeed later, unlike a failed query.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, MetadataError::Db(e) if e.is_connection())
    }

    /// An optimistic transaction lost to a concurrent one ("can be retried").
    pub fn is_conflict(&self) -> bool {
        matches!(self, MetadataError::Db(e) if matches!(e.query_details(), Some(surrealdb::types::QueryError::TransactionConflict)))
    }
}

/// A manifest's facts, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestRow {
    pub repo: RepoName,
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub artifact_type: Option<String>,
    pub subject: Option<Digest>,
    /// Annotations (for the referrers listing). Not loaded into the read index,
    /// where one pusher's large annotations would stay resident: read with
    /// [`Metadata::referrer_annotations`].
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
    pub created_ms: i64,
    /// Bytes the image takes: the manifest, its config and layers (each once),
    /// and for an index its children's content sizes. Rows written before this
    /// field existed read as the manifest's own size.
    #[serde(default)]
    pub content_size: u64,
    /// The digests this manifest needs in its repository: its config, layers and
    /// (an index) children. `None` for rows written before it was recorded (the
    /// collector then reads the manifest itself).
    #[serde(default)]
    pub refs: Option<Vec<Digest>>,
    /// What plugin gates found when it was pushed (replaced by each push of
    /// it). Not loaded into the read index: read with `manifest_findings`.
    #[serde(default)]
    pub findings: Vec<FindingRow>,
}

/// A tag, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TagRow {
    pub repo: RepoName,
    pub name: Tag,
    pub digest: Digest,
    pub updated_ms: i64,
}

/// A blob linked into a repository (the only way a repository can serve a blob).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkRow {
    pub repo: RepoName,
    pub digest: Digest,
    pub size: u64,
}

/// An upload session, persisted after every chunk so it survives restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadRow {
    pub id: UploadId,
    pub repo: RepoName,
    pub offset: u64,
    /// Hex of the saved hasher state ([`berth_oci::Digester::save`]).
    pub hash_state: String,
    /// The storage crate's staging record, as JSON.
    pub staging: serde_json::Value,
    pub started_ms: i64,
    pub updated_ms: i64,
    /// Who opened it (sessions count against their user's cap); `None` for
    /// sessions opened before sessions had owners.
    #[serde(default)]
    pub owner: Option<String>,
}

/// What a manifest read needs of a manifest row ([`Metadata::manifest_head`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHead {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// A repository's name and version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoHead {
    pub name: RepoName,
    /// Changed by every transaction that changes the repository's tags,
    /// manifests or blob links (a fresh random value each time, so a repository
    /// deleted and made again never repeats one); `""` before its first change.
    pub version: String,
}

/// The condition and the effect of a change to one repository: it is made only
/// if the repository is still at the version its writer last read (`""` for one
/// that does not exist), and it moves the repository to a new version. A change
/// whose repository moved meanwhile fails with [`MetadataError::Stale`] and
/// changes nothing. Several replicas writing one repository are serialized this
/// way, by the database.
#[derive(Clone, Debug)]
pub struct Guard {
    expect: Option<String>,
    next: String,
}

impl Guard {
    /// A change made only if the repository is at `version`.
    pub fn at(version: &str) -> Guard {
        Guard { expect: Some(version.to_owned()), next: uuid::Uuid::new_v4().simple().to_string() }
    }

    /// A change made whatever the repository's version (the only writer, or a
    /// change that does not depend on what the repository holds).
    pub fn any() -> Guard {
        Guard { expect: None, next: uuid::Uuid::new_v4().simple().to_string() }
    }

    /// Whether the change may make the repository (it is not known to exist).
    pub(crate) fn may_create(&self) -> bool {
        self.expect.as_deref().is_none_or(str::is_empty)
    }

    /// The version the repository has after the change.
    pub fn next(&self) -> &str {
        &self.next
    }

    /// Binds `$check`, `$expect` and `$next` for [`REPO_GUARD`] and the version updates.
    pub(crate) fn bind<'a>(&self, q: conn::Q<'a>) -> conn::Q<'a> {
        q.bind(("check", self.expect.is_some())).bind(("expect", self.expect.clone().unwrap_or_default())).bind(("next", self.next.clone()))
    }
}

/// Refuses the transaction when `$repo` is not at `$expect` (see [`Guard`]).
pub(crate) const REPO_GUARD: &str =
    "IF $check AND ((SELECT VALUE version FROM ONLY type::record('repo', $repo)) OR '') != $expect { THROW 'berth:stale'; };";

/// Moves `$repo` (which exists) to the version `$next`.
pub(crate) const REPO_BUMP: &str = "UPDATE type::record('repo', $repo) SET version = $next RETURN NONE;";

/// Moves the set of repositories to a new version (`$next`): written when a
/// repository record is made or deleted, so replicas see a catalog change with
/// one read.
pub(crate) const CATALOG_BUMP: &str = "UPSERT meta:catalog SET version = $next RETURN NONE;";

/// What the read index holds of a repository (from [`Metadata::repo_snapshot`]).
#[derive(Default, Debug)]
pub struct Snapshot {
    pub repos: Vec<RepoHead>,
    pub manifests: Vec<ManifestRow>,
    pub tags: Vec<TagRow>,
    pub links: Vec<LinkRow>,
}

/// Creates the repository record on first use (implicit creation by a push),
/// marks it updated and moves it to the guard's version; binds `$repo`,
/// `$namespace`, `$now`, and the guard's (see [`Guard::bind`]). Refuses
/// ([`MetadataError::Deleting`]) while a delete of the name is still sweeping.
const REPO_TOUCH: &str = "LET $repo_new = !(SELECT VALUE name FROM ONLY type::record('repo', $repo)); \
     IF $repo_new AND (SELECT VALUE repo FROM ONLY type::record('repo_gone', $repo)) { THROW 'berth:deleting'; }; \
     UPSERT type::record('repo', $repo) SET name = $repo, namespace = $namespace, \
     created_ms = created_ms OR $now, updated_ms = $now, version = $next RETURN NONE; \
     IF $repo_new { UPSERT meta:catalog SET version = $next RETURN NONE; };";

/// What a transaction answers about usage: bytes added to or freed from a tenant's.
#[derive(Deserialize)]
struct Bytes {
    bytes: u64,
    #[serde(default)]
    removed: bool,
}

use usage::{REF_ADD, TENANT_OF};

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

const SCHEMA: &str = r#"
DEFINE TABLE IF NOT EXISTS repo SCHEMALESS;
DEFINE TABLE IF NOT EXISTS manifest SCHEMALESS;
DEFINE INDEX IF NOT EXISTS manifest_repo ON manifest FIELDS repo;
DEFINE INDEX IF NOT EXISTS manifest_subject ON manifest FIELDS repo, subject;
DEFINE TABLE IF NOT EXISTS tag SCHEMALESS;
DEFINE INDEX IF NOT EXISTS tag_repo ON tag FIELDS repo, name UNIQUE;
DEFINE INDEX IF NOT EXISTS tag_digest ON tag FIELDS repo, digest;
DEFINE TABLE IF NOT EXISTS blob_link SCHEMALESS;
DEFINE INDEX IF NOT EXISTS blob_link_digest ON blob_link FIELDS digest;
DEFINE INDEX IF NOT EXISTS blob_link_repo ON blob_link FIELDS repo;
DEFINE TABLE IF NOT EXISTS upload SCHEMALESS;
"#;

/// The metadata store.
#[derive(Clone)]
pub struct Metadata {
    pub(crate) db: conn::Conn,
    /// Transactions that write one digest's records (its reference counts, pins,
    /// collection mark) queue here by digest, so concurrent pushes of one popular
    /// blob into many repositories take turns in this process instead of failing
    /// each other's optimistic transactions (other replicas' still conflict, and
    /// are retried).
    stripes: std::sync::Arc<[tokio::sync::Mutex<()>]>,
    /// Transactions that may make or delete a repository (and so move the
    /// set's version, one record for all) take turns here in this process:
    /// many first pushes at once would otherwise fail each other's optimistic
    /// transactions on that record past their retries.
    catalog: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// A server that other processes (replicas) may write too.
    shared: bool,
}

const STRIPES: usize = 64;

impl Metadata {
    /// Connect (or open the embedded store) and make sure the schema exists.
    pub async fn connect(config: &MetadataConfig) -> Result<Self> {
        let target = config.target().map_err(MetadataError::Config)?;
        // Processes that start together against one server (replicas, or test
        // processes each with a database of their own) define the same namespace
        // and tables at once; the losers' conflicts are retried like any other.
        let mut pause = std::time::Duration::from_millis(5);
        let db = loop {
            match conn::Conn::open(target.clone(), config).await {
                Err(e) if e.is_conflict() && pause < std::time::Duration::from_secs(2) => {
                    tokio::time::sleep(pause.mul_f64(0.5 + jitter())).await;
                    pause *= 2;
                }
                r => break r?,
            }
        };
        let md = Metadata {
            db,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            catalog: Default::default(),
            shared: config.is_server(),
        };
        for schema in [
            SCHEMA,
            accounts::SCHEMA,
            manage::SCHEMA,
            usage::SCHEMA,
            gc::SCHEMA,
            retention::SCHEMA,
            plugins::SCHEMA,
            outbox::SCHEMA,
            audit::SCHEMA,
        ] {
            md.run(|| md.db.query(schema)).await?;
        }
        if md.ensure_usage_counted().await? {
            tracing::info!("per-tenant storage usage counted from the existing links and manifests");
        }
        Ok(md)
    }

    /// With a metadata server: whether it is out of reach now (queries fail at
    /// once while a background task tries it; `conn.rs`), and how many queries
    /// that has failed at once since the start.
    pub fn reach(&self) -> (bool, u64) {
        self.db.reach()
    }

    /// Whether other processes (replicas) may write this store: a SurrealDB
    /// server. An embedded store belongs to one process (it holds the lock).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Close the embedded store cleanly (graceful shutdown, after the last request).
    pub async fn shutdown(&self) {
        self.db.shutdown().await;
    }

    /// A read that goes to the storage engine (the watchdog's probe).
    pub async fn ping(&self) -> Result<()> {
        self.db.query("SELECT VALUE version FROM ONLY meta:usage").await?.check()?;
        Ok(())
    }

    /// The annotations of the manifests in `repo` whose subject is `subject`, by digest.
    pub async fn referrer_annotations(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<std::collections::HashMap<Digest, std::collections::BTreeMap<String, String>>> {
        #[derive(Deserialize)]
        struct Row {
            digest: Digest,
            annotations: Option<std::collections::BTreeMap<String, String>>,
        }
        let mut r = self
            .db
            .query("SELECT digest, annotations FROM manifest WHERE repo = $repo AND subject = $subject AND annotations != NONE")
            .bind(("repo", repo.to_string()))
            .bind(("subject", subject.to_string()))
            .await?
            .check()?;
        Ok(rows::<Row>(&mut r, 0)?.into_iter().filter_map(|row| Some((row.digest, row.annotations?))).collect())
    }

    /// Load every repository, manifest, tag and blob link (for tests: the
    /// registry loads one repository at a time, `repo_snapshot`).
    #[cfg(test)]
    pub(crate) async fn snapshot(&self) -> Result<Snapshot> {
        let mut r = self
            .db
            .query("SELECT name, version OR '' AS version FROM repo")
            .query("SELECT repo, digest, media_type, size, artifact_type, subject, created_ms, content_size OR size AS content_size, refs FROM manifest")
            .query("SELECT repo, name, digest, updated_ms FROM tag")
            .query("SELECT repo, digest, size FROM blob_link")
            .await?
            .check()?;
        Ok(Snapshot { repos: rows(&mut r, 0)?, manifests: rows(&mut r, 1)?, tags: rows(&mut r, 2)?, links: rows(&mut r, 3)? })
    }

    /// One repository's version, manifests, tags and blob links, read in one
    /// transaction (so they agree with the version); `repos` is empty when it
    /// does not exist.
    pub async fn repo_snapshot(&self, repo: &RepoName) -> Result<Snapshot> {
        #[derive(Deserialize)]
        struct Read {
            head: Option<RepoHead>,
            manifests: Vec<ManifestRow>,
            tags: Vec<TagRow>,
            links: Vec<LinkRow>,
        }
        let sql = "BEGIN TRANSACTION;
             RETURN {
                head: (SELECT name, version OR '' AS version FROM ONLY type::record('repo', $repo)),
                manifests: (SELECT repo, digest, media_type, size, artifact_type, subject, created_ms, content_size OR size AS content_size, refs
                    FROM manifest WHERE repo = $repo),
                tags: (SELECT repo, name, digest, updated_ms FROM tag WHERE repo = $repo),
                links: (SELECT repo, digest, size FROM blob_link WHERE repo = $repo)
             };
             COMMIT TRANSACTION;";
        let mut r = self.run(|| self.db.query(sql).bind(("repo", repo.to_string()))).await?;
        let read = returned::<Read>(&mut r)?.ok_or_else(|| MetadataError::Corrupt("repository read answered nothing".into()))?;
        Ok(Snapshot { repos: read.head.into_iter().collect(), manifests: read.manifests, tags: read.tags, links: read.links })
    }

    /// Where `reference` points in `repo` (a tag's manifest, or a manifest by
    /// digest): its digest, media type and size, by record id (a tag and a
    /// manifest row, none of the repository's other records). `None`: no such
    /// tag or manifest. For a read of a repository whose state is not held.
    pub async fn manifest_head(&self, repo: &RepoName, reference: &Reference) -> Result<Option<ManifestHead>> {
        const FIELDS: &str = "SELECT digest, media_type, size FROM ONLY type::record('manifest', [$repo, $digest])";
        let q = match reference {
            Reference::Tag(t) => self
                .db
                .query(format!(
                    "LET $digest = (SELECT VALUE digest FROM ONLY type::record('tag', [$repo, $tag]));
                     RETURN IF $digest = NONE {{ NONE }} ELSE {{ ({FIELDS}) }};"
                ))
                .bind(("tag", t.to_string())),
            Reference::Digest(d) => self.db.query(FIELDS).bind(("digest", d.to_string())),
        };
        let mut r = q.bind(("repo", repo.to_string())).await?.check()?;
        returned(&mut r)
    }

    /// The versions of those of `names` that exist, and the version of the set
    /// of repositories (changed whenever one is made or deleted), in one read.
    pub async fn repo_heads(&self, names: &[RepoName]) -> Result<(Vec<RepoHead>, String)> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut r = self
            .db
            .query("SELECT name, version OR '' AS version FROM $names.map(|$n| type::record('repo', $n)) WHERE name != NONE")
            .query("SELECT VALUE version FROM ONLY meta:catalog")
            .bind(("names", names))
            .await?
            .check()?;
        let heads = rows(&mut r, 0)?;
        Ok((heads, one::<String>(&mut r, 1)?.unwrap_or_default()))
    }

    /// Every repository's name and version, and the version of the set.
    pub async fn all_repo_heads(&self) -> Result<(Vec<RepoHead>, String)> {
        let mut r = self
            .db
            .query("BEGIN TRANSACTION")
            // Pairs, not objects: rows as objects (a map each, in the engine's
            // values and again in JSON) took 90 MiB of heap at a start over
            // 100,000 repositories (heap profile, 2026-12-06).
            .query("SELECT VALUE [name, version OR ''] FROM repo")
            .query("SELECT VALUE version FROM ONLY meta:catalog")
            .query("COMMIT TRANSACTION")
            .await?
            .check()?;
        let heads = rows::<(RepoName, String)>(&mut r, 1)?.into_iter().map(|(name, version)| RepoHead { name, version }).collect();
        Ok((heads, one::<String>(&mut r, 2)?.unwrap_or_default()))
    }

    /// Link a verified blob into a repository (creating the repository record); when
    /// the blob is the result of an upload session, that session's record goes in
    /// the same transaction. Answers the bytes the owning tenant's usage grew by
    /// (0 when the link existed or another of its repositories holds the blob).
    ///
    /// `pinned`: the bytes were pinned ([`Metadata::pin_blob`]) before they were
    /// stored, and this link releases the pin. `outbox`: the events announcing it
    /// ([`outbox`]), written with it.
    pub async fn link_blob(
        &self,
        guard: &Guard,
        link: &LinkRow,
        ends_upload: Option<&UploadId>,
        pinned: bool,
        outbox: &[OutboxRow],
    ) -> Result<u64> {
        self.after_sweep(&link.repo, || self.link_blob_once(guard, link, ends_upload, pinned, outbox)).await
    }

    /// Run `change`, which may make `repo`; if a delete of that name is still
    /// sweeping, finish the sweep here and run it once more.
    async fn after_sweep<T, F: std::future::Future<Output = Result<T>>>(&self, repo: &RepoName, change: impl Fn() -> F) -> Result<T> {
        match change().await {
            Err(MetadataError::Deleting) => {
                self.sweep_repo(repo, &mut Default::default()).await?;
                change().await
            }
            res => res,
        }
    }

    async fn link_blob_once(
        &self,
        guard: &Guard,
        link: &LinkRow,
        ends_upload: Option<&UploadId>,
        pinned: bool,
        outbox: &[OutboxRow],
    ) -> Result<u64> {
        let end = if ends_upload.is_some() { "DELETE type::record('upload', $upload) RETURN NONE;" } else { "" };
        let announce = outbox::add("$outbox", outbox);
        let outbox = outbox::bind(outbox)?;
        let sql = format!(
            "BEGIN TRANSACTION;
             {REPO_GUARD}
             {REPO_TOUCH}
             {announce}
             {TENANT_OF}
             LET $new = !(SELECT VALUE digest FROM ONLY type::record('blob_link', [$repo, $digest]));
             {REF_ADD}
             IF $new {{ CREATE type::record('blob_link', [$repo, $digest]) CONTENT {{ repo: $repo, digest: $digest, size: $size, linked_ms: $now }} RETURN NONE; }}
             ELSE {{ UPDATE type::record('blob_link', [$repo, $digest]) SET linked_ms = $now RETURN NONE; }};
             {end}
             RETURN {{ bytes: $added }};
             COMMIT TRANSACTION;"
        );
        let _turn = self.digest_turn(&link.digest).await;
        let _catalog = self.catalog_turn(guard.may_create()).await;
        let mut r = self
            .run(|| {
                guard
                    .bind(self.db.query(sql.as_str()))
                    .bind(("upload", ends_upload.map(|u| u.to_string()).unwrap_or_default()))
                    .bind(("repo", link.repo.to_string()))
                    .bind(("namespace", link.repo.namespace().to_string()))
                    .bind(("now", now_ms()))
                    .bind(("digest", link.digest.to_string()))
                    .bind(("size", link.size))
                    .bind(("pinned", pinned))
                    .bind(("outbox", outbox.clone()))
            })
            .await?;
        Ok(returned::<Bytes>(&mut r)?.map_or(0, |b| b.bytes))
    }

    /// Remove a blob link; answers the bytes the owning tenant's usage shrank by
    /// (the blob's size when no other of its repositories references it).
    pub async fn unlink_blob(&self, guard: &Guard, repo: &RepoName, digest: &Digest) -> Result<u64> {
        Ok(self.unlink_blob_if_idle(guard, repo, digest, i64::MAX).await?.unwrap_or(0))
    }

    /// Remove a blob link only if it was made, and last released by a manifest,
    /// before `cutoff_ms` (the collector's grace). `None`: it was not removed.
    pub async fn unlink_blob_if_idle(&self, guard: &Guard, repo: &RepoName, digest: &Digest, cutoff_ms: i64) -> Result<Option<u64>> {
        let sql = format!(
            "BEGIN TRANSACTION;
             {REPO_GUARD}
             {TENANT_OF}
             LET $had = (DELETE type::record('blob_link', [$repo, $digest])
                WHERE (linked_ms OR 0) < $cutoff AND (released_ms OR 0) < $cutoff RETURN BEFORE);
             IF count($had) > 0 {{ {REPO_BUMP} }};
             {}
             RETURN {{ bytes: $freed, removed: count($had) > 0 }};
             COMMIT TRANSACTION;",
            usage::ref_release("$had.digest")
        );
        let _turn = self.digest_turn(digest).await;
        let mut r = self
            .run(|| {
                guard
                    .bind(self.db.query(sql.as_str()))
                    .bind(("repo", repo.to_string()))
                    .bind(("namespace", repo.namespace().to_string()))
                    .bind(("digest", digest.to_string()))
                    .bind(("now", now_ms()))
                    .bind(("cutoff", cutoff_ms))
            })
            .await?;
        Ok(returned::<Bytes>(&mut r)?.filter(|b| b.removed).map(|b| b.bytes))
    }

    /// Store a manifest and, if given, point a tag at it: one transaction.
    /// Answers the bytes the owning tenant's usage grew by (the manifest's size
    /// when none of its repositories held it yet).
    /// `pinned`: its bytes were pinned before they were stored, and the commit
    /// releases the pin.
    pub async fn commit_manifest(
        &self,
        guard: &Guard,
        m: &ManifestRow,
        tag: Option<&TagRow>,
        pinned: bool,
        outbox: &[OutboxRow],
    ) -> Result<u64> {
        Ok(self.commit_manifests(guard, &[(m.clone(), tag.cloned(), pinned)], &[outbox.to_vec()]).await?.first().copied().unwrap_or(0))
    }

    /// Several manifest commits of one repository, in order, as one transaction
    /// (group commit: what queued while the previous commit ran). Answers, per
    /// commit, the bytes the tenant's usage grew by. `outboxes[i]`: the events
    /// announcing commit `i` (missing: none).
    pub async fn commit_manifests(
        &self,
        guard: &Guard,
        batch: &[(ManifestRow, Option<TagRow>, bool)],
        outboxes: &[Vec<OutboxRow>],
    ) -> Result<Vec<u64>> {
        let Some((first, _, _)) = batch.first() else { return Ok(vec![]) };
        self.after_sweep(&first.repo, || self.commit_manifests_once(guard, batch, outboxes)).await
    }

    async fn commit_manifests_once(
        &self,
        guard: &Guard,
        batch: &[(ManifestRow, Option<TagRow>, bool)],
        outboxes: &[Vec<OutboxRow>],
    ) -> Result<Vec<u64>> {
        let Some((first, _, _)) = batch.first() else { return Ok(vec![]) };
        let repo = first.repo.clone();
        let mut sql = format!("BEGIN TRANSACTION; {REPO_GUARD} {TENANT_OF}");
        for (i, (_, tag, _)) in batch.iter().enumerate() {
            // Each commit rebinds the fragments' variables to its own values.
            sql.push_str(&format!(
                "LET $digest = $digest_{i}; LET $size = $size_{i}; LET $pinned = $pinned_{i};
                 {REPO_TOUCH}
                 {}
                 LET $new = !(SELECT VALUE digest FROM ONLY type::record('manifest', [$repo, $digest]));
                 {REF_ADD}
                 LET $added_{i} = $added;
                 UPDATE type::record('repo', $repo) SET pushes = (pushes OR 0) + 1, last_pushed_ms = $now RETURN NONE;
                 UPSERT type::record('manifest', [$repo, $digest]) MERGE $manifest_{i} RETURN NONE;",
                outbox::add(&format!("$outbox_{i}"), outboxes.get(i).map_or(&[][..], Vec::as_slice))
            ));
            if tag.is_some() {
                sql.push_str(&format!(
                    "UPSERT type::record('tag', [$repo, $tag_name_{i}]) MERGE $tag_{i} RETURN NONE;
                     UPDATE type::record('tag', [$repo, $tag_name_{i}]) SET pushes = (pushes OR 0) + 1 RETURN NONE;"
                ));
            }
        }
        let added: Vec<String> = (0..batch.len()).map(|i| format!("$added_{i}")).collect();
        sql.push_str(&format!("RETURN {{ added: [{}] }}; COMMIT TRANSACTION;", added.join(", ")));
        let mut values = Vec::with_capacity(batch.len());
        for (i, (m, tag, _)) in batch.iter().enumerate() {
            debug_assert_eq!(m.repo, repo, "one repository per batch");
            let announce = outboxes.get(i).map(|o| outbox::bind(o)).transpose()?.unwrap_or_default();
            values.push((to_value(m)?, tag.as_ref().map(to_value).transpose()?, announce));
        }
        let now = now_ms();
        // Each digest's turn, taken in one order so batches never wait on each other in a circle.
        let mut stripes: Vec<usize> = batch.iter().map(|(m, _, _)| stripe_of(&m.digest)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut _turns = Vec::with_capacity(stripes.len());
        for i in stripes {
            _turns.push(self.stripes[i].lock().await);
        }
        let _catalog = self.catalog_turn(guard.may_create()).await;
        let mut r = self
            .run(|| {
                let mut q = guard
                    .bind(self.db.query(sql.as_str()))
                    .bind(("repo", repo.to_string()))
                    .bind(("namespace", repo.namespace().to_string()))
                    .bind(("now", now));
                for (i, ((m, tag, pinned), (manifest, tag_row, announce))) in batch.iter().zip(&values).enumerate() {
                    q = q
                        .bind((format!("digest_{i}"), m.digest.to_string()))
                        .bind((format!("size_{i}"), m.size))
                        .bind((format!("pinned_{i}"), *pinned))
                        .bind((format!("manifest_{i}"), manifest.clone()))
                        .bind((format!("outbox_{i}"), announce.clone()));
                    if let (Some(t), Some(row)) = (tag, tag_row) {
                        q = q.bind((format!("tag_name_{i}"), t.name.to_string())).bind((format!("tag_{i}"), row.clone()));
                    }
                }
                q
            })
            .await?;
        #[derive(Deserialize)]
        struct Added {
            added: Vec<u64>,
        }
        Ok(returned::<Added>(&mut r)?.map(|a| a.added).unwrap_or_else(|| vec![0; batch.len()]))
    }

    /// Delete a manifest and every tag that points at it: one transaction.
    /// Answers the bytes the owning tenant's usage shrank by.
    pub async fn delete_manifest(&self, guard: &Guard, repo: &RepoName, digest: &Digest, outbox: &[OutboxRow]) -> Result<u64> {
        let announce = outbox::add("$outbox", outbox);
        let outbox = outbox::bind(outbox)?;
        let sql = format!(
            "BEGIN TRANSACTION;
             {REPO_GUARD}
             {REPO_BUMP}
             {announce}
             {TENANT_OF}
             DELETE tag WHERE repo = $repo AND digest = $digest RETURN NONE;
             LET $had = (DELETE type::record('manifest', [$repo, $digest]) RETURN BEFORE);
             -- What it needed is no longer needed by it: the collector's grace starts now.
             FOR $d IN array::flatten($had.refs OR []) {{
                UPDATE type::record('blob_link', [$repo, $d]) SET released_ms = $now RETURN NONE;
             }};
             {}
             RETURN {{ bytes: $freed }};
             COMMIT TRANSACTION;",
            usage::ref_release("$had.digest")
        );
        let _turn = self.digest_turn(digest).await;
        let mut r = self
            .run(|| {
                guard
                    .bind(self.db.query(sql.as_str()))
                    .bind(("repo", repo.to_string()))
                    .bind(("namespace", repo.namespace().to_string()))
                    .bind(("digest", digest.to_string()))
                    .bind(("now", now_ms()))
                    .bind(("outbox", outbox.clone()))
            })
            .await?;
        Ok(returned::<Bytes>(&mut r)?.map_or(0, |b| b.bytes))
    }

    /// Delete one tag (and write the events announcing it).
    pub async fn delete_tag(&self, guard: &Guard, repo: &RepoName, tag: &Tag, outbox: &[OutboxRow]) -> Result<()> {
        let sql = format!(
            "BEGIN TRANSACTION; {REPO_GUARD} {REPO_BUMP} DELETE type::record('tag', [$repo, $tag]) RETURN NONE; {} COMMIT TRANSACTION;",
            outbox::add("$outbox", outbox)
        );
        let outbox = outbox::bind(outbox)?;
        self.run(|| {
            guard
                .bind(self.db.query(sql.as_str()))
                .bind(("repo", repo.to_string()))
                .bind(("tag", tag.to_string()))
                .bind(("outbox", outbox.clone()))
        })
        .await?;
        Ok(())
    }

    /// Create or update an upload session.
    pub async fn put_upload(&self, u: &UploadRow) -> Result<()> {
        self.db
            .query("UPSERT type::record('upload', $id) CONTENT $row RETURN NONE")
            .bind(("id", u.id.to_string()))
            .bind(("row", to_value(u)?))
            .await?
            .check()?;
        Ok(())
    }

    /// Lease an upload session to one writer among replicas: answers its
    /// state if no other writer holds it (or the other's lease ran out by
    /// `now_ms`), marking it held by `token` until `until_ms`; `None` if it is
    /// held, or gone.
    pub async fn lease_upload(&self, id: &UploadId, token: &str, now_ms: i64, until_ms: i64) -> Result<Option<UploadRow>> {
        let mut r = self
            .db
            .query(
                "UPDATE type::record('upload', $id) SET lease = $holder, lease_until = $until WHERE (lease_until OR 0) < $now
                 RETURN id_str AS id, repo, offset, hash_state, staging, started_ms, updated_ms, owner",
            )
            .bind(("id", id.to_string()))
            .bind(("holder", token.to_owned()))
            .bind(("now", now_ms))
            .bind(("until", until_ms))
            .await?
            .check()?;
        Ok(rows::<UploadRow>(&mut r, 0)?.into_iter().next())
    }

    /// Give back a lease taken with [`Metadata::lease_upload`]: with the
    /// session's new state (`Some`), written only if `token` still holds it,
    /// or as it was. `false`: the lease was lost (it ran out and another
    /// writer took it), and nothing was written.
    pub async fn release_upload(&self, id: &UploadId, token: &str, updated: Option<&UploadRow>) -> Result<bool> {
        let q = match updated {
            Some(u) => self
                .db
                .query("UPDATE type::record('upload', $id) CONTENT $row WHERE lease = $holder RETURN VALUE offset")
                .bind(("row", to_value(u)?)),
            None => self
                .db
                .query("UPDATE type::record('upload', $id) SET lease = NONE, lease_until = NONE WHERE lease = $holder RETURN VALUE offset"),
        };
        let mut r = q.bind(("id", id.to_string())).bind(("holder", token.to_owned())).await?.check()?;
        let done: Vec<serde_json::Value> = rows(&mut r, 0)?;
        Ok(!done.is_empty())
    }

    /// Fetch an upload session.
    pub async fn get_upload(&self, id: &UploadId) -> Result<Option<UploadRow>> {
        let mut r = self
            .db
            .query("SELECT id_str AS id, repo, offset, hash_state, staging, started_ms, updated_ms, owner FROM ONLY type::record('upload', $id)")
            .bind(("id", id.to_string()))
            .await?
            .check()?;
        one(&mut r, 0)
    }

    /// Delete an upload session.
    pub async fn delete_upload(&self, id: &UploadId) -> Result<()> {
        self.db.query("DELETE type::record('upload', $id) RETURN NONE").bind(("id", id.to_string())).await?.check()?;
        Ok(())
    }

    /// Upload sessions not touched since `before_ms`.
    pub async fn stale_uploads(&self, before_ms: i64) -> Result<Vec<UploadRow>> {
        let mut r = self
            .db
            .query("SELECT id_str AS id, repo, offset, hash_state, staging, started_ms, updated_ms, owner FROM upload WHERE updated_ms < $before")
            .bind(("before", before_ms))
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    /// All upload session ids (to find staging data that no session owns).
    pub async fn upload_ids(&self) -> Result<Vec<UploadId>> {
        let mut r = self.db.query("SELECT VALUE id_str FROM upload").await?.check()?;
        rows(&mut r, 0)
    }
}

impl Metadata {
    /// The turn of a transaction that makes or deletes a repository (`when`),
    /// taken after any digest's turn.
    pub(crate) async fn catalog_turn(&self, when: bool) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if when {
            Some(self.catalog.lock().await)
        } else {
            None
        }
    }

    /// The queue for transactions that write `digest`'s records.
    pub(crate) async fn digest_turn(&self, digest: &Digest) -> tokio::sync::MutexGuard<'_, ()> {
        self.stripes[stripe_of(digest)].lock().await
    }

    /// Run a query, built afresh by `build` for each try, and check every
    /// statement. SurrealDB's transactions are optimistic: of two that write the
    /// same record at once, the loser fails with a conflict that "can be
    /// retried". Such a transaction is run again (up to 16 tries, pausing about
    /// 1, 2, 4 … 50 ms, jittered); any other failure is returned at once.
    pub(crate) async fn run<'a>(&'a self, build: impl Fn() -> conn::Q<'a>) -> Result<IndexedResults> {
        let mut pause = std::time::Duration::from_millis(1);
        for attempt in 1.. {
            let mut r = build().await?;
            let errors = r.take_errors();
            if errors.is_empty() {
                return Ok(r);
            }
            if errors.values().any(|e| e.to_string().contains("berth:collecting")) {
                return Err(MetadataError::Collecting);
            }
            if errors.values().any(|e| e.to_string().contains("berth:stale")) {
                return Err(MetadataError::Stale);
            }
            if errors.values().any(|e| e.to_string().contains("berth:deleting")) {
                return Err(MetadataError::Deleting);
            }
            if errors.values().any(|e| e.to_string().contains("arena is full")) {
                return Err(MetadataError::TooLarge);
            }
            let retryable = errors.values().any(|e| matches!(e.query_details(), Some(surrealdb::types::QueryError::TransactionConflict)));
            if !retryable || attempt >= 16 {
                // The statement that failed, rather than the ones cancelled with it.
                let mut errors: Vec<(usize, surrealdb::Error)> = errors.into_iter().collect();
                errors.sort_by_key(|(i, e)| (e.to_string().contains("not executed due to a failed transaction"), *i));
                return Err(errors.remove(0).1.into());
            }
            tracing::debug!(attempt, "metadata transaction conflicted; retrying");
            // Jittered, so writers that conflicted once do not meet again in step.
            tokio::time::sleep(pause.mul_f64(0.5 + jitter())).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(50));
        }
        unreachable!("the loop returns")
    }
}

fn stripe_of(digest: &Digest) -> usize {
    digest.hex().as_bytes().iter().take(8).fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(*b as usize)) % STRIPES
}

/// A number in [0, 1) that differs from call to call.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The rows a statement returned, decoded through serde into our own (validated)
/// types: SurrealDB's value types stay inside this crate.
pub(crate) fn rows<T: DeserializeOwned>(r: &mut IndexedResults, statement: usize) -> Result<Vec<T>> {
    let values: Vec<serde_json::Value> = r.take(statement)?;
    values.into_iter().map(decode).collect()
}

/// The single value (`SELECT … FROM ONLY`, `RETURN`) a statement returned, if any.
pub(crate) fn one<T: DeserializeOwned>(r: &mut IndexedResults, statement: usize) -> Result<Option<T>> {
    let value: Option<serde_json::Value> = r.take(statement)?;
    value.filter(|v| !v.is_null()).map(decode).transpose()
}

/// What a transaction `RETURN`ed. SurrealDB 3 answers for `BEGIN` and `COMMIT` too,
/// and a `RETURN` ends the transaction early (committing what ran before it), so
/// the value sits at no fixed index: it is the last statement result that is not
/// NONE. Transactions read this way make every other statement `RETURN NONE`.
pub(crate) fn returned<T: DeserializeOwned>(r: &mut IndexedResults) -> Result<Option<T>> {
    for i in (0..r.num_statements()).rev() {
        let value: Option<serde_json::Value> = r.take(i)?;
        match value {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::Array(a)) if a.is_empty() => continue,
            Some(v) => return decode(v).map(Some),
        }
    }
    Ok(None)
}

fn decode<T: DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| MetadataError::Corrupt(e.to_string()))
}

pub(crate) fn to_value<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(v).map_err(|e| MetadataError::Corrupt(e.to_string()))?;
    // Keep the upload id as a plain field: SurrealDB reserves `id` for the record id.
    if let Some(obj) = v.as_object_mut() {
        if let Some(id) = obj.remove("id") {
            obj.insert("id_str".into(), id);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty store: embedded in memory, or with
    /// `BERTH_TEST_METADATA=server` a database of its own on a SurrealDB
    /// server (the binary `BERTH_TEST_SURREAL` names, started once per test
    /// process): one suite, both kinds of store.
    pub(crate) async fn mem() -> Metadata {
        if std::env::var("BERTH_TEST_METADATA").as_deref() == Ok("server") {
            let mut c = MetadataConfig::new(server::url());
            c.database = format!("t{}", server::next());
            c.username = Some("root".into());
            c.password = Some("root".into());
            return Metadata::connect(&c).await.unwrap();
        }
        Metadata::connect(&MetadataConfig::new("mem://")).await.unwrap()
    }

    mod server {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;

        static COUNT: AtomicU64 = AtomicU64::new(0);

        pub fn next() -> u64 {
            COUNT.fetch_add(1, Ordering::Relaxed)
        }

        /// The server's `ws://` address. It is started by a thread that lives
        /// as long as the test process, and dies with it (parent-death signal).
        pub fn url() -> String {
            static URL: OnceLock<String> = OnceLock::new();
            URL.get_or_init(|| {
                let bin = std::env::var("BERTH_TEST_SURREAL")
                    .expect("BERTH_TEST_METADATA=server needs BERTH_TEST_SURREAL (the surreal binary; .ci/run builds it)");
                let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    use std::os::unix::process::CommandExt;
                    let mut cmd = std::process::Command::new(bin);
                    cmd.args([
                        "start",
                        "--user",
                        "root",
                        "--pass",
                        "root",
                        "--bind",
                        &format!("127.0.0.1:{port}"),
                        "--log",
                        "warn",
                        "memory",
                    ])
                    .stdout(std::process::Stdio::null());
                    // SAFETY: prctl is async-signal-safe; it only asks for SIGKILL when this thread's process dies.
                    unsafe {
                        cmd.pre_exec(|| {
                            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                            Ok(())
                        });
                    }
                    let mut child = cmd.spawn().expect("starting the SurrealDB server");
                    let _ = tx.send(());
                    let _ = child.wait();
                });
                rx.recv().unwrap();
                // Ready, not only listening: the server binds before its
                // startup work is done when that is slow.
                for _ in 0..600 {
                    if berth_testkit::surreal_ready(port) {
                        return format!("ws://127.0.0.1:{port}");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                panic!("the SurrealDB server was not ready on {port} within 30 s");
            })
            .clone()
        }
    }

    pub(crate) fn row(repo: &RepoName, bytes: &[u8]) -> ManifestRow {
        ManifestRow {
            repo: repo.clone(),
            digest: Digest::sha256(bytes),
            media_type: berth_oci::manifest::OCI_MANIFEST.into(),
            size: bytes.len() as u64,
            artifact_type: Some("application/x".into()),
            subject: None,
            annotations: None,
            created_ms: 1,
            content_size: bytes.len() as u64,
            refs: Some(vec![]),
            findings: vec![],
        }
    }

    #[test]
    fn embedded_settings_are_checked() {
        let c = |url: &str, sync: Option<&str>, cache_mib: Option<u64>| {
            MetadataConfig { sync: sync.map(Into::into), cache_mib, ..MetadataConfig::new(url) }.target()
        };
        let embedded = |dir: &str, sync: &str, cache_bytes: u64| conn::Target::Embedded {
            dir: dir.into(),
            sync: sync.into(),
            cache_bytes,
            memtable_bytes: DEFAULT_MEMTABLE_MIB << 20,
        };
        assert_eq!(c("surrealkv:///d", None, None).unwrap(), embedded("/d", "every", DEFAULT_CACHE_MIB << 20));
        assert_eq!(c("surrealkv:///d", Some("500ms"), Some(8)).unwrap(), embedded("/d", "500ms", 8 << 20));
        assert_eq!(c("ws://host:8000", None, None).unwrap(), conn::Target::Url("ws://host:8000".into()));
        assert!(c("surrealkv:///d", Some("50ms"), None).is_err());
        assert!(c("surrealkv:///d", Some("always"), None).is_err());
        assert!(c("surrealkv:///d", None, Some(1)).is_err());
        assert!(c("surrealkv:///d?sync=never", None, None).is_err());
        assert!(c("ws://host:8000", Some("never"), None).is_err());
        assert!(c("ws://host:8000", None, Some(64)).is_err());
    }

    #[tokio::test]
    async fn manifests_tags_links_round_trip() {
        let md = mem().await;
        let repo: RepoName = "acme/app".parse().unwrap();
        let m = row(&repo, b"m1");
        let tag = TagRow { repo: repo.clone(), name: "v1".parse().unwrap(), digest: m.digest.clone(), updated_ms: 2 };
        md.commit_manifest(&crate::Guard::any(), &m, Some(&tag), false, &[]).await.unwrap();
        md.link_blob(&crate::Guard::any(), &LinkRow { repo: repo.clone(), digest: Digest::sha256(b"b"), size: 1 }, None, false, &[])
            .await
            .unwrap();
        let s = md.snapshot().await.unwrap();
        assert_eq!(s.repos.iter().map(|h| &h.name).collect::<Vec<_>>(), [&repo]);
        assert_eq!(s.manifests, vec![m.clone()]);
        assert_eq!(s.tags, vec![tag.clone()]);
        assert_eq!(s.links.len(), 1);

        // Deleting the manifest removes its tags in the same transaction.
        md.delete_manifest(&crate::Guard::any(), &repo, &m.digest, &[]).await.unwrap();
        let s = md.snapshot().await.unwrap();
        assert!(s.manifests.is_empty() && s.tags.is_empty());
    }

    /// A manifest read by record id answers what the repository holds now: a
    /// tag's manifest, a manifest by digest, nothing for an unknown tag, an
    /// unknown digest, a tag of another repository, or a deleted manifest.
    #[tokio::test]
    async fn a_manifest_is_read_by_tag_or_digest_alone() {
        let md = mem().await;
        let (repo, other): (RepoName, RepoName) = ("acme/app".parse().unwrap(), "acme/other".parse().unwrap());
        let (m1, m2) = (row(&repo, b"m1"), row(&repo, b"m2-longer"));
        let at =
            |m: &ManifestRow, t: &str| TagRow { repo: m.repo.clone(), name: t.parse().unwrap(), digest: m.digest.clone(), updated_ms: 2 };
        md.commit_manifest(&crate::Guard::any(), &m1, Some(&at(&m1, "v1")), false, &[]).await.unwrap();
        md.commit_manifest(&crate::Guard::any(), &m2, Some(&at(&m2, "v2")), false, &[]).await.unwrap();
        let head = |m: &ManifestRow| Some(ManifestHead { digest: m.digest.clone(), media_type: m.media_type.clone(), size: m.size });
        let tag = |t: &str| Reference::Tag(t.parse().unwrap());
        assert_eq!(md.manifest_head(&repo, &tag("v1")).await.unwrap(), head(&m1));
        assert_eq!(md.manifest_head(&repo, &tag("v2")).await.unwrap(), head(&m2));
        assert_eq!(md.manifest_head(&repo, &Reference::Digest(m2.digest.clone())).await.unwrap(), head(&m2));
        assert_eq!(md.manifest_head(&repo, &tag("v3")).await.unwrap(), None);
        assert_eq!(md.manifest_head(&repo, &Reference::Digest(Digest::sha256(b"none"))).await.unwrap(), None);
        assert_eq!(md.manifest_head(&other, &tag("v1")).await.unwrap(), None);
        assert_eq!(md.manifest_head(&other, &Reference::Digest(m1.digest.clone())).await.unwrap(), None);
        // A tag moved answers its new manifest; a manifest deleted, nothing.
        md.commit_manifest(&crate::Guard::any(), &m2, Some(&at(&m2, "v1")), false, &[]).await.unwrap();
        assert_eq!(md.manifest_head(&repo, &tag("v1")).await.unwrap(), head(&m2));
        md.delete_manifest(&crate::Guard::any(), &repo, &m2.digest, &[]).await.unwrap();
        assert_eq!(md.manifest_head(&repo, &tag("v1")).await.unwrap(), None);
        assert_eq!(md.manifest_head(&repo, &Reference::Digest(m2.digest.clone())).await.unwrap(), None);
        assert_eq!(md.manifest_head(&repo, &Reference::Digest(m1.digest.clone())).await.unwrap(), head(&m1));
    }

    /// Every change to a repository is conditional on the version its writer
    /// read and moves it to a new one; a change made on an older version is
    /// refused whole (`Stale`), and the set of repositories has a version of
    /// its own that moves when one is made or deleted.
    #[tokio::test]
    async fn changes_are_conditional_on_the_repository_version() {
        let md = mem().await;
        let repo: RepoName = "acme/app".parse().unwrap();
        let heads = |md: &Metadata| {
            let md = md.clone();
            let repo = repo.clone();
            async move { md.repo_heads(&[repo]).await.unwrap() }
        };
        let (none, catalog0) = heads(&md).await;
        assert!(none.is_empty());

        let m1 = row(&repo, b"m1");
        let first = Guard::at("");
        md.commit_manifest(&first, &m1, None, false, &[]).await.unwrap();
        let (h, catalog1) = heads(&md).await;
        assert_eq!(h, [RepoHead { name: repo.clone(), version: first.next().into() }]);
        assert_ne!(catalog1, catalog0, "a new repository moves the catalog");

        // A writer that read the repository before that commit is refused, and
        // its change (a tag, a link, a delete) leaves nothing.
        let m2 = row(&repo, b"m2");
        let tag = TagRow { repo: repo.clone(), name: "v2".parse().unwrap(), digest: m2.digest.clone(), updated_ms: 2 };
        let late = md.commit_manifest(&Guard::at(""), &m2, Some(&tag), false, &[]).await;
        assert!(matches!(late, Err(MetadataError::Stale)), "{late:?}");
        let link = LinkRow { repo: repo.clone(), digest: Digest::sha256(b"b"), size: 1 };
        assert!(matches!(md.link_blob(&Guard::at("old"), &link, None, false, &[]).await, Err(MetadataError::Stale)));
        assert!(matches!(md.delete_manifest(&Guard::at(""), &repo, &m1.digest, &[]).await, Err(MetadataError::Stale)));
        let s = md.repo_snapshot(&repo).await.unwrap();
        assert_eq!((s.manifests.len(), s.tags.len(), s.links.len()), (1, 0, 0));
        assert_eq!(s.repos[0].version, first.next());

        // At the version it read, the change is made; each moves the version.
        let second = Guard::at(first.next());
        md.commit_manifest(&second, &m2, Some(&tag), false, &[]).await.unwrap();
        let third = Guard::at(second.next());
        md.delete_tag(&third, &repo, &tag.name, &[]).await.unwrap();
        let (h, catalog2) = heads(&md).await;
        assert_eq!(h[0].version, third.next());
        assert_eq!(catalog2, catalog1, "changes inside a repository leave the catalog");

        // Deleted, the repository has no version; the catalog moves again.
        md.delete_repo(&Guard::at(third.next()), &repo, &[]).await.unwrap();
        let (h, catalog3) = heads(&md).await;
        assert!(h.is_empty());
        assert_ne!(catalog3, catalog2);
        assert!(md.repo_snapshot(&repo).await.unwrap().repos.is_empty());
        let (all, catalog) = md.all_repo_heads().await.unwrap();
        assert!(all.is_empty() && catalog == catalog3);
    }

    #[tokio::test]
    async fn a_batch_of_commits_is_one_transaction_in_order() {
        let md = mem().await;
        let repo: RepoName = "acme/app".parse().unwrap();
        let (a, b) = (row(&repo, b"ma"), row(&repo, b"mbb"));
        let tag = |d: &Digest| Some(TagRow { repo: repo.clone(), name: "latest".parse().unwrap(), digest: d.clone(), updated_ms: 1 });
        let added = md
            .commit_manifests(
                &crate::Guard::any(),
                &[(a.clone(), tag(&a.digest), false), (b.clone(), tag(&b.digest), false), (a.clone(), None, false)],
                &[],
            )
            .await
            .unwrap();
        assert_eq!(added, vec![2, 3, 0], "each digest counted once");
        let s = md.snapshot().await.unwrap();
        assert_eq!(s.manifests.len(), 2);
        assert_eq!(s.tags.len(), 1);
        assert_eq!(s.tags[0].digest, b.digest, "the later commit moved the tag last");
        assert_eq!(md.repo_profile(&repo).await.unwrap().unwrap().pushes, 3);
    }

    #[tokio::test]
    async fn uploads_round_trip() {
        let md = mem().await;
        let u = UploadRow {
            id: UploadId::random(),
            repo: "a/b".parse().unwrap(),
            offset: 10,
            hash_state: "01ab".into(),
            staging: serde_json::json!({"generation": 0, "parts": [0, 5]}),
            started_ms: 5,
            updated_ms: 6,
            owner: Some("mia".into()),
        };
        md.put_upload(&u).await.unwrap();
        assert_eq!(md.get_upload(&u.id).await.unwrap(), Some(u.clone()));
        assert_eq!(md.upload_ids().await.unwrap(), vec![u.id]);
        assert_eq!(md.stale_uploads(7).await.unwrap(), vec![u.clone()]);
        assert!(md.stale_uploads(6).await.unwrap().is_empty());
        md.delete_upload(&u.id).await.unwrap();
        assert_eq!(md.get_upload(&u.id).await.unwrap(), None);
        // The link that completes an upload removes its record in the same transaction.
        md.put_upload(&u).await.unwrap();
        let link = LinkRow { repo: u.repo.clone(), digest: Digest::sha256(b"done"), size: 4 };
        md.link_blob(&crate::Guard::any(), &link, Some(&u.id), false, &[]).await.unwrap();
        assert_eq!(md.get_upload(&u.id).await.unwrap(), None);
        assert!(md.snapshot().await.unwrap().links.iter().any(|l| l.digest == link.digest));
    }
}
