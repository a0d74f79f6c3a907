//! Replicas over one metadata server: keeping this process's read index as
//! current as the database.
//!
//! Every change to a repository moves its version in the same transaction
//! (`berth_metadata::Guard`), and every change is made on the condition that
//! the repository is still at the version its writer read, so two replicas
//! writing one repository are serialized by the database: the loser reloads
//! the repository and tries again (`repo.rs`).
//!
//! Reads are made current by a **read barrier**: a request for a repository
//! waits for one query of the versions of the repositories asked for, sent
//! after it arrived; a repository whose version differs from the one held is
//! loaded again (in one transaction) before the request goes on. Requests that
//! arrive while a query is out wait for the next one, which answers all of
//! them, so the database sees one small query per round trip however many
//! requests there are. A tag moved or deleted through any replica, and
//! acknowledged, is therefore never served as it was by another one.
//!
//! The set of repositories (the catalog, listings) has a version of its own,
//! moved when a repository is made or deleted; when it moved, the names are
//! read again.
//!
//! With an embedded store the process is the only writer (the store is locked
//! to it), the index is current by construction, and none of this runs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use berth_metadata::Metadata;
use berth_oci::{ErrorCode, RegistryError, RepoName};
use tokio::sync::oneshot;

use crate::index::{Handle, Index};

pub(crate) struct Coherence {
    meta: Metadata,
    index: Arc<Index>,
    /// Where the barrier's queries run (the request runtime).
    runtime: tokio::runtime::Handle,
    pending: Mutex<Pending>,
    /// The version of the set of repositories the index holds.
    catalog: Mutex<String>,
}

/// What waits for the next query.
#[derive(Default)]
struct Pending {
    names: HashSet<RepoName>,
    catalog: bool,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// A query is out (its task sends the next one when it is answered).
    running: bool,
}

impl Coherence {
    /// `catalog`: the version of the set of repositories, read before the
    /// index was loaded (so a change made meanwhile is seen as one).
    pub fn new(meta: Metadata, index: Arc<Index>, catalog: String) -> Coherence {
        Coherence {
            meta,
            index,
            runtime: tokio::runtime::Handle::current(),
            pending: Mutex::new(Pending::default()),
            catalog: Mutex::new(catalog),
        }
    }

    /// Whether reads need the barrier (other processes write the store).
    pub fn shared(&self) -> bool {
        self.meta.is_shared()
    }

    /// Return once the index holds `names` (and with `catalog`, the set of
    /// repositories) as the database held them at some moment after this was
    /// called. At once with an embedded store.
    pub async fn fresh(self: &Arc<Self>, names: &[&RepoName], catalog: bool) -> Result<(), RegistryError> {
        if !self.shared() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut p = self.pending.lock().unwrap();
            p.names.extend(names.iter().map(|n| (*n).clone()));
            p.catalog |= catalog;
            p.waiters.push(tx);
            !std::mem::replace(&mut p.running, true)
        };
        if start {
            let this = self.clone();
            self.runtime.spawn(async move { this.rounds().await });
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(unavailable(&e)),
            Err(_) => Err(unavailable("the read barrier stopped")),
        }
    }

    /// Load `name` again from metadata, whatever version is held (a write
    /// found the repository moved, or its state is not held): the state now
    /// held, `None` if it does not exist.
    ///
    /// The read runs on the request runtime, not on the caller's: the actors
    /// share one thread, where loads of many repositories at once would take
    /// turns on one core.
    pub async fn reload(&self, name: &RepoName) -> Result<Option<Handle>, RegistryError> {
        let (meta, n) = (self.meta.clone(), name.clone());
        let read = self.runtime.spawn(async move { meta.repo_snapshot(&n).await });
        let s = read.await.map_err(|e| crate::internal("reload repository", e))?.map_err(|e| crate::internal("reload repository", e))?;
        Ok(self.index.install(name, s))
    }

    /// The repository's state, loaded when not held (`None`: it does not
    /// exist). Only the repository's actor calls this, so a load never
    /// interleaves with its changes.
    pub async fn resident(&self, name: &RepoName) -> Result<Option<Handle>, RegistryError> {
        if let Some(h) = self.index.held(name) {
            return Ok(Some(h));
        }
        if !self.index.exists(name) {
            return Ok(None);
        }
        self.reload(name).await
    }

    /// Answer what is pending, one query per round, until nothing is.
    async fn rounds(self: Arc<Self>) {
        loop {
            let (names, catalog, waiters) = {
                let mut p = self.pending.lock().unwrap();
                if p.waiters.is_empty() {
                    p.running = false;
                    return;
                }
                (std::mem::take(&mut p.names), std::mem::take(&mut p.catalog), std::mem::take(&mut p.waiters))
            };
            let outcome = self.round(names.into_iter().collect(), catalog).await.map_err(|e| e.to_string());
            if let Err(e) = &outcome {
                tracing::warn!(error = %e, "read barrier: metadata unreachable");
            }
            for w in waiters {
                let _ = w.send(outcome.clone());
            }
        }
    }

    async fn round(&self, names: Vec<RepoName>, catalog: bool) -> Result<(), berth_metadata::MetadataError> {
        let (heads, set_version) = self.meta.repo_heads(&names).await?;
        let remote: HashMap<&RepoName, &str> = heads.iter().map(|h| (&h.name, h.version.as_str())).collect();
        for name in &names {
            match (self.index.version(name), remote.get(name).copied()) {
                (Some(held), Some(now)) if held == now => {}
                // Changed or deleted elsewhere: load it again (or drop it).
                (Some(_), _) => {
                    self.index.install(name, self.meta.repo_snapshot(name).await?);
                }
                // Not held: its state is read when the request needs it.
                (None, Some(_)) => self.index.add_name(name),
                (None, None) if self.index.exists(name) => self.index.remove_repo(name),
                (None, None) => {}
            }
        }
        if catalog && *self.catalog.lock().unwrap() != set_version {
            // Repositories were made or deleted: take the names (a state is
            // loaded when its repository is asked for).
            let (all, set_version) = self.meta.all_repo_heads().await?;
            self.index.set_names(all.into_iter().map(|h| h.name).collect());
            *self.catalog.lock().unwrap() = set_version;
        }
        Ok(())
    }
}

fn unavailable(detail: &str) -> RegistryError {
    RegistryError::new(ErrorCode::Unavailable).with_detail(format!("metadata unreachable, try again: {detail}"))
}
