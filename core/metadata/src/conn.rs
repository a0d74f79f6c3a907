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

#[derive(Clone)]
pub(crate) enum Conn {
    /// The SDK handle, and the datastore under it (to shut it down).
    Embedded(Surreal<Db>, std::sync::Arc<Datastore>),
    Url(Surreal<Any>),
}

/// A query on either connection: `bind` it, then await it.
pub(crate) enum Q<'a> {
    Embedded(Query<'a, Db>),
    Url(Query<'a, Any>),
}

impl Conn {
    pub(crate) async fn open(target: Target, config: &MetadataConfig) -> Result<Conn> {
        let conn = match target {
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
                Conn::Embedded(Surreal::<Db>::unstable_from_datastore(ds.clone(), None).await?, ds)
            }
            Target::Url(url) => {
                // Berth runs no live queries: without their notification channel the
                // embedded engine does not preallocate its 15,000 slots (2 MiB, touched).
                let engine = Config::new().capabilities(Capabilities::new().with_live_query_notifications(false));
                let db = any::connect((url.as_str(), engine)).await?;
                if let (Some(username), Some(password)) = (&config.username, &config.password) {
                    db.signin(Root { username: username.clone(), password: password.clone() }).await?;
                }
                Conn::Url(db)
            }
        };
        match &conn {
            Conn::Embedded(db, _) => db.use_ns(&config.namespace).use_db(&config.database).await?,
            Conn::Url(db) => db.use_ns(&config.namespace).use_db(&config.database).await?,
        };
        Ok(conn)
    }

    /// Stop the embedded store's maintenance tasks and close its engine (every
    /// commit is already durable; this leaves no flush or compaction cut off).
    pub(crate) async fn shutdown(&self) {
        if let Conn::Embedded(_, ds) = self {
            if let Err(e) = ds.shutdown().await {
                tracing::warn!(error = %e, "closing the embedded metadata store");
            }
        }
    }

    pub(crate) fn query<'a>(&'a self, sql: impl Into<Cow<'a, str>>) -> Q<'a> {
        match self {
            Conn::Embedded(db, _) => Q::Embedded(db.query(sql)),
            Conn::Url(db) => Q::Url(db.query(sql)),
        }
    }
}

impl<'a> Q<'a> {
    /// Another statement in the same request.
    pub(crate) fn query(self, sql: impl Into<Cow<'a, str>>) -> Self {
        match self {
            Q::Embedded(q) => Q::Embedded(q.query(sql)),
            Q::Url(q) => Q::Url(q.query(sql)),
        }
    }

    pub(crate) fn bind(self, vars: impl IntoVariables) -> Self {
        match self {
            Q::Embedded(q) => Q::Embedded(q.bind(vars)),
            Q::Url(q) => Q::Url(q.bind(vars)),
        }
    }
}

impl<'a> IntoFuture for Q<'a> {
    type Output = surrealdb::Result<IndexedResults>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        match self {
            Q::Embedded(q) => q.into_future(),
            Q::Url(q) => q.into_future(),
        }
    }
}
