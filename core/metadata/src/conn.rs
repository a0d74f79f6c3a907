//! The connection to SurrealDB. The embedded store is opened here, not by the
//! SDK's `surrealkv://` connector, because that connector leaves SurrealKV to
//! size its caches from the machine (half its memory for the block cache, up to
//! 4 GiB of write buffer): opening the datastore ourselves is the only way to
//! hand the engine the sizes from [`MetadataConfig`]. Everything else (`mem://`,
//! `ws://`) goes through the SDK's connector. Both are used through one query
//! type, [`Q`], so no other module knows which it is talking to.

use std::borrow::Cow;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use surrealdb::engine::any::{self, Any};
use surrealdb::engine::local::Db;
use surrealdb::method::{IntoVariables, Query};
use surrealdb::opt::auth::Root;
use surrealdb::opt::capabilities::Capabilities;
use surrealdb::opt::Config;
use surrealdb::{IndexedResults, Surreal};
use surrealdb_cnf::ConfigMap;
use surrealdb_engine_local::Datastore;

use crate::{MetadataConfig, MetadataError, Result};

/// Where the metadata lives, as [`MetadataConfig::target`] checked it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Target {
    /// SurrealKV in `dir`, opened in this process with these settings.
    Embedded { dir: String, sync: String, cache_bytes: u64, memtable_bytes: u64 },
    /// Anything the SDK connects to by URL (`mem://`, `ws://host:port`).
    Url(String),
}

/// Cloned by every holder of a [`crate::Metadata`], so the SDK handle is
/// shared, not cloned: each clone of a `Surreal` opens a session of its own
/// (a message to the engine, three concurrent maps, about 5 KiB), and a clone
/// per request made sessions the largest item on the heap under cold reads.
#[derive(Clone)]
pub(crate) struct Conn {
    kind: Arc<Kind>,
    gate: Arc<Gate>,
}

enum Kind {
    /// The SDK handle, and the datastore under it (to shut it down).
    Embedded(Surreal<Db>, Arc<Datastore>),
    Url(Surreal<Any>),
}

/// Closing in order: once [`Conn::shutdown`] starts, queries are refused before
/// they reach the engine, and the engine closes only when the queries already
/// running have finished (a query arriving at a closing engine is an error the
/// engine logs as such, and one cut off mid-commit is lost work).
///
/// With a metadata server the gate is also a circuit breaker: once a query has
/// failed for want of the server (cut off, restarting, not answering within
/// [`SERVER_QUERY_TIMEOUT`]), queries fail at once as unreachable (503)
/// instead of each waiting out the timeout, while one task of the gate's own
/// ([`probe`]) tries the server, at once and then every [`PROBE_PAUSE`]; its
/// first answer, or any query's, closes the breaker.
#[derive(Default)]
struct Gate {
    closing: AtomicBool,
    running: AtomicUsize,
    idle: tokio::sync::Notify,
    out_of_reach: AtomicBool,
    /// Whether the probe task runs.
    probing: AtomicBool,
    /// Queries the open breaker failed at once.
    refused: std::sync::atomic::AtomicU64,
    /// The handle the probe task queries with (a server only).
    prober: std::sync::OnceLock<Surreal<Any>>,
}

/// How often an open breaker tries the server.
const PROBE_PAUSE: Duration = Duration::from_millis(500);

impl Gate {
    /// A query failed for want of the server: open the breaker, and start the
    /// probe task unless it runs.
    fn lost(self: &Arc<Gate>) {
        if !self.out_of_reach.swap(true, Ordering::SeqCst) {
            tracing::warn!("the metadata server is out of reach: queries fail at once until it answers again");
        }
        if !self.probing.swap(true, Ordering::SeqCst) {
            tokio::spawn(probe(self.clone()));
        }
    }

    /// The server answered a query.
    fn answered(&self) {
        if self.out_of_reach.swap(false, Ordering::SeqCst) {
            tracing::info!("the metadata server answers again");
        }
    }
}

/// Try the server while the breaker is open; any answer that is not a
/// connection failure (an error from the server is an answer) closes it.
async fn probe(gate: Arc<Gate>) {
    loop {
        // At once first: a blip (one connection reset) closes it again within a round trip.
        while gate.out_of_reach.load(Ordering::SeqCst) && !gate.closing.load(Ordering::SeqCst) {
            let Some(db) = gate.prober.get() else {
                gate.answered();
                break;
            };
            match tokio::time::timeout(SERVER_QUERY_TIMEOUT, db.query("RETURN 1")).await {
                Ok(Err(e)) if e.is_connection() => tokio::time::sleep(PROBE_PAUSE).await,
                Ok(_) => gate.answered(),
                Err(_) => tokio::time::sleep(PROBE_PAUSE).await,
            }
        }
        gate.probing.store(false, Ordering::SeqCst);
        // A query may have opened the breaker again after the loop saw it
        // closed and before `probing` was given back: then it found this task
        // running and started none.
        if !gate.out_of_reach.load(Ordering::SeqCst) || gate.closing.load(Ordering::SeqCst) || gate.probing.swap(true, Ordering::SeqCst) {
            return;
        }
    }
}

/// A handle of each embedded store closed by [`Conn::shutdown`] (see there).
static KEPT: std::sync::Mutex<Vec<Surreal<Db>>> = std::sync::Mutex::new(Vec::new());

/// How long closing waits for running queries.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// How long a query to a metadata server may take before it fails as a
/// connection error (the request waiting on it then answers 503).
const SERVER_QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// What a query sent after closing began answers.
pub(crate) const CLOSED: &str = "the metadata store is closed (Berth is shutting down)";

/// What a query answers while the breaker is open.
const OUT_OF_REACH: &str = "the metadata server is out of reach (tried again every half second)";

/// A query on either connection: `bind` it, then await it.
pub(crate) struct Q<'a> {
    kind: QKind<'a>,
    gate: &'a Arc<Gate>,
}

enum QKind<'a> {
    Embedded(Query<'a, Db>),
    Url(Query<'a, Any>),
}

/// One running query, counted until dropped.
struct Running<'a>(&'a Gate);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.closing.load(Ordering::SeqCst) {
            self.0.idle.notify_waiters();
        }
    }
}

impl Conn {
    pub(crate) async fn open(target: Target, config: &MetadataConfig) -> Result<Conn> {
        let kind = match target {
            Target::Embedded { dir, sync, cache_bytes, memtable_bytes } => {
                let settings = ConfigMap::empty()
                    .with_key_value("datastore_sync", sync)
                    .with_key_value("surrealkv_block_cache_capacity", cache_bytes.to_string())
                    .with_key_value("surrealkv_max_memtable_size", memtable_bytes.to_string());
                let failed = |e: &dyn std::fmt::Display| MetadataError::Open(format!("opening the embedded store in {dir}: {e}"));
                // As the SDK's own connector does: maintenance tasks start only
                // after the version check, so a new store gets its version key first.
                let ds = Datastore::builder()
                    .with_config(settings)
                    .without_maintenance_tasks()
                    .build_with_path(&format!("surrealkv://{dir}"))
                    .await
                    .map_err(|e| failed(&e))?;
                ds.check_version().await.map_err(|e| failed(&e))?;
                ds.bootstrap().await.map_err(|e| failed(&e))?;
                ds.start_maintenance_tasks();
                // No notification channel: Berth runs no live queries.
                Kind::Embedded(Surreal::<Db>::unstable_from_datastore(ds.clone(), None).await?, ds)
            }
            Target::Url(url) => {
                // Berth runs no live queries: without their notification channel the
                // embedded engine does not preallocate its 15,000 slots (2 MiB, touched).
                let engine = Config::new().capabilities(Capabilities::new().with_live_query_notifications(false));
                let db = connect_waiting(&url, engine, config.connect_wait()).await?;
                if let (Some(username), Some(password)) = (&config.username, &config.password) {
                    db.signin(Root { username: username.clone(), password: password.clone() }).await?;
                }
                Kind::Url(db)
            }
        };
        match &kind {
            Kind::Embedded(db, _) => db.use_ns(&config.namespace).use_db(&config.database).await?,
            Kind::Url(db) => db.use_ns(&config.namespace).use_db(&config.database).await?,
        };
        let gate = Arc::new(Gate::default());
        if let Kind::Url(db) = &kind {
            let _ = gate.prober.set(db.clone());
        }
        Ok(Conn { kind: Arc::new(kind), gate })
    }

    /// Refuse further queries, wait (up to [`CLOSE_WAIT`]) for the running ones,
    /// then stop the embedded store's maintenance tasks and close its engine
    /// (every commit is already durable; this leaves no flush or compaction cut off).
    pub(crate) async fn shutdown(&self) {
        let gate = &self.gate;
        gate.closing.store(true, Ordering::SeqCst);
        let waited = tokio::time::timeout(CLOSE_WAIT, async {
            loop {
                let idle = gate.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if gate.running.load(Ordering::SeqCst) == 0 {
                    break;
                }
                idle.await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(queries = gate.running.load(Ordering::SeqCst), "closing the metadata store with queries still running");
        }
        if let Kind::Embedded(db, ds) = &*self.kind {
            if let Err(e) = ds.shutdown().await {
                tracing::warn!(error = %e, "closing the embedded metadata store");
            }
            // The SDK's engine shuts its datastore down again when the last
            // handle goes; a second pass finds the engine closed and logs its
            // refused node update as an error. One handle is kept until the
            // process ends, so the closing here is the only one.
            KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(db.clone());
        }
    }

    /// Whether the breaker is open (a metadata server out of reach), and how
    /// many queries it has failed at once so far.
    pub(crate) fn reach(&self) -> (bool, u64) {
        (self.gate.out_of_reach.load(Ordering::SeqCst), self.gate.refused.load(Ordering::Relaxed))
    }

    pub(crate) fn query<'a>(&'a self, sql: impl Into<Cow<'a, str>>) -> Q<'a> {
        let kind = match &*self.kind {
            Kind::Embedded(db, _) => QKind::Embedded(db.query(sql)),
            Kind::Url(db) => QKind::Url(db.query(sql)),
        };
        Q { kind, gate: &self.gate }
    }
}

/// Connect to `url`; a server that refuses the connection (not up yet: a
/// replica started with its database, or before it) is tried again every
/// half second for up to `wait`, with a line in the log every 5 s.
async fn connect_waiting(url: &str, engine: Config, wait: Duration) -> Result<Surreal<Any>> {
    let started = std::time::Instant::now();
    let mut said = None::<std::time::Instant>;
    loop {
        match any::connect((url, engine.clone())).await {
            Ok(db) => return Ok(db),
            Err(e) if started.elapsed() < wait => {
                if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    tracing::warn!(%url, error = %e, left_secs = (wait - started.elapsed()).as_secs(), "waiting for the metadata server");
                    said = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl<'a> Q<'a> {
    /// Another statement in the same request.
    pub(crate) fn query(self, sql: impl Into<Cow<'a, str>>) -> Self {
        let kind = match self.kind {
            QKind::Embedded(q) => QKind::Embedded(q.query(sql)),
            QKind::Url(q) => QKind::Url(q.query(sql)),
        };
        Q { kind, gate: self.gate }
    }

    pub(crate) fn bind(self, vars: impl IntoVariables) -> Self {
        let kind = match self.kind {
            QKind::Embedded(q) => QKind::Embedded(q.bind(vars)),
            QKind::Url(q) => QKind::Url(q.bind(vars)),
        };
        Q { kind, gate: self.gate }
    }
}

impl<'a> IntoFuture for Q<'a> {
    type Output = surrealdb::Result<IndexedResults>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let gate = self.gate;
        // Counted before the closing flag is read: closing sets the flag, then
        // reads the count, so a query either sees the flag or is waited for.
        gate.running.fetch_add(1, Ordering::SeqCst);
        let running = Running(gate);
        if gate.closing.load(Ordering::SeqCst) {
            drop(running);
            return Box::pin(std::future::ready(Err(surrealdb::Error::connection(CLOSED.to_owned(), None))));
        }
        let remote = matches!(self.kind, QKind::Url(_));
        let query = match self.kind {
            QKind::Embedded(q) => q.into_future(),
            QKind::Url(q) => q.into_future(),
        };
        Box::pin(async move {
            let _running = running;
            if !remote {
                return query.await;
            }
            if gate.out_of_reach.load(Ordering::SeqCst) {
                gate.refused.fetch_add(1, Ordering::Relaxed);
                return Err(surrealdb::Error::connection(OUT_OF_REACH.to_owned(), None));
            }
            // A server that stopped answering (cut off, overloaded, a
            // connection being re-established) fails the query, rather than
            // holding the request that waits on it.
            let r = match tokio::time::timeout(SERVER_QUERY_TIMEOUT, query).await {
                Ok(r) => r,
                Err(_) => Err(surrealdb::Error::connection(
                    format!("the metadata server did not answer within {} s", SERVER_QUERY_TIMEOUT.as_secs()),
                    None,
                )),
            };
            match &r {
                Err(e) if e.is_connection() => gate.lost(),
                _ => gate.answered(),
            }
            r
        })
    }
}
