//! The plugins' durable outbox and their delivery log.
//!
//! An event a plugin instance subscribed to becomes an `outbox` row
//! (`outbox:[instance, event_id]`) written **in the transaction of the change
//! it announces** (a manifest commit, a blob link, a delete, a batch of pull
//! counts): the change and its announcement land together or not at all. The
//! registry's delivery worker of each instance reads its due rows, calls the
//! plugin, and settles them ([`Metadata::outbox_settle`]): delivered rows go,
//! failed ones wait (`next_ms`) for another try, and every attempt leaves a line
//! in `plugin_delivery`, the log the management API shows.
//!
//! Where several replicas share the metadata store, one at a time delivers an
//! instance's queue: the one holding its lease ([`Metadata::outbox_lease`]).
//!
//! Invariant: an outbox row is removed only by a settlement recording that it
//! was delivered or given up, so a crash at any point redelivers (at least
//! once; receivers deduplicate by the event id) and never loses one.

use serde::{Deserialize, Serialize};

use crate::{rows, Metadata, Result};

pub(crate) const SCHEMA: &str = r#"
DEFINE TABLE IF NOT EXISTS outbox SCHEMALESS;
DEFINE INDEX IF NOT EXISTS outbox_due ON outbox FIELDS instance, next_ms;
DEFINE TABLE IF NOT EXISTS outbox_lease SCHEMALESS;
DEFINE TABLE IF NOT EXISTS job_lease SCHEMALESS;
DEFINE TABLE IF NOT EXISTS plugin_delivery SCHEMALESS;
DEFINE INDEX IF NOT EXISTS plugin_delivery_at ON plugin_delivery FIELDS instance, at_ms;
"#;

/// An event waiting to be delivered to one plugin instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxRow {
    pub instance: String,
    /// Unique per event (the same for every instance it goes to).
    pub event_id: String,
    /// When it happened.
    pub at_ms: i64,
    /// The hook it is for (`manifest-pushed` …).
    pub hook: String,
    /// The event itself, as the plugin host serializes it (opaque here).
    pub event: String,
    /// Written only if the transaction created the repository (a
    /// `repository-created` riding on a first push).
    #[serde(default)]
    pub if_new_repo: bool,
    /// Deliveries tried so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not to be tried before this time.
    pub next_ms: i64,
}

/// One delivery attempt, as the log keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRow {
    pub instance: String,
    pub event_id: String,
    pub hook: String,
    /// 1 for the first try.
    pub attempt: u32,
    pub at_ms: i64,
    /// `delivered`, `retrying` or `failed` (given up).
    pub outcome: String,
    pub detail: Option<String>,
    pub took_ms: f64,
}

/// What became of one delivery attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Settle {
    /// Delivered, or given up: the row goes.
    Done(DeliveryRow),
    /// To be tried again at `next_ms`.
    Retry(DeliveryRow, i64),
}

impl Settle {
    fn log(&self) -> &DeliveryRow {
        match self {
            Settle::Done(l) | Settle::Retry(l, _) => l,
        }
    }
}

/// The statements that add `rows`, bound as `var`, to the transaction they
/// are spliced into (after `REPO_TOUCH`, where a row may depend on
/// `$repo_new`); none when there are no rows.
pub(crate) fn add(var: &str, rows: &[OutboxRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "FOR $o IN {var} {{
            IF !$o.if_new_repo OR $repo_new {{
                CREATE type::record('outbox', [$o.instance, $o.event_id]) CONTENT $o RETURN NONE;
            }};
         }};"
    )
}

/// The rows as the query binds them.
pub(crate) fn bind(rows: &[OutboxRow]) -> Result<Vec<serde_json::Value>> {
    rows.iter().map(crate::to_value).collect()
}

/// How long an instance's queue is.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Depth {
    pub rows: u64,
    /// When the oldest waiting event happened.
    pub oldest_ms: Option<i64>,
    /// When the next row is due.
    pub next_ms: Option<i64>,
}

impl Metadata {
    /// Up to `limit` of `instance`'s rows due by `now_ms`, oldest due first.
    pub async fn outbox_due(&self, instance: &str, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>> {
        let mut r = self
            .db
            .query(
                "SELECT instance, event_id, at_ms, hook, event, if_new_repo OR false AS if_new_repo, attempts OR 0 AS attempts, next_ms
                 FROM outbox WHERE instance = $i AND next_ms <= $now ORDER BY next_ms, event_id LIMIT $n",
            )
            .bind(("i", instance.to_owned()))
            .bind(("now", now_ms))
            .bind(("n", limit as i64))
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    /// The length of `instance`'s queue, its oldest event and its next due time.
    pub async fn outbox_depth(&self, instance: &str) -> Result<Depth> {
        let mut r = self
            .db
            .query(
                "SELECT count() AS rows, math::min(at_ms) AS oldest_ms, math::min(next_ms) AS next_ms
                 FROM outbox WHERE instance = $i GROUP ALL",
            )
            .bind(("i", instance.to_owned()))
            .await?
            .check()?;
        Ok(rows::<Depth>(&mut r, 0)?.into_iter().next().unwrap_or_default())
    }

    /// Record what became of a batch of attempts, and log each: one transaction.
    pub async fn outbox_settle(&self, instance: &str, settled: &[Settle]) -> Result<()> {
        if settled.is_empty() {
            return Ok(());
        }
        #[derive(Serialize)]
        struct S {
            event_id: String,
            done: bool,
            next_ms: i64,
            attempts: u32,
            log: serde_json::Value,
        }
        let batch: Vec<S> = settled
            .iter()
            .map(|s| {
                Ok(S {
                    event_id: s.log().event_id.clone(),
                    done: matches!(s, Settle::Done(_)),
                    next_ms: if let Settle::Retry(_, n) = s { *n } else { 0 },
                    attempts: s.log().attempt,
                    log: crate::to_value(s.log())?,
                })
            })
            .collect::<Result<_>>()?;
        let batch = serde_json::to_value(&batch).map_err(|e| crate::MetadataError::Corrupt(e.to_string()))?;
        self.run(|| {
            self.db
                .query(
                    "BEGIN TRANSACTION;
                     FOR $s IN $batch {
                        IF $s.done {
                            DELETE type::record('outbox', [$i, $s.event_id]) RETURN NONE;
                        } ELSE {
                            UPDATE type::record('outbox', [$i, $s.event_id]) SET attempts = $s.attempts, next_ms = $s.next_ms RETURN NONE;
                        };
                        CREATE type::record('plugin_delivery', [$i, $s.log.at_ms, $s.event_id, $s.attempts]) CONTENT $s.log RETURN NONE;
                     };
                     COMMIT TRANSACTION;",
                )
                .bind(("i", instance.to_owned()))
                .bind(("batch", batch.clone()))
        })
        .await?;
        Ok(())
    }

    /// Take or renew the lease on `instance`'s queue for `holder` (a process)
    /// until `now_ms + ttl_ms`; `false` while another holder's lease runs.
    pub async fn outbox_lease(&self, instance: &str, holder: &str, now_ms: i64, ttl_ms: i64) -> Result<bool> {
        self.lease_in("outbox_lease", instance, holder, now_ms, ttl_ms).await
    }

    /// Take or renew the lease on a background job (the collector, retention)
    /// that one replica at a time runs, as [`Metadata::outbox_lease`] does for a queue.
    pub async fn job_lease(&self, job: &str, holder: &str, now_ms: i64, ttl_ms: i64) -> Result<bool> {
        self.lease_in("job_lease", job, holder, now_ms, ttl_ms).await
    }

    async fn lease_in(&self, table: &'static str, key: &str, holder: &str, now_ms: i64, ttl_ms: i64) -> Result<bool> {
        let mut r = self
            .run(|| {
                self.db
                    .query(
                        "BEGIN TRANSACTION;
                         LET $l = (SELECT holder, until FROM ONLY type::record($table, $i));
                         IF $l != NONE AND $l.holder != $h AND $l.until > $now { RETURN false; };
                         UPSERT type::record($table, $i) CONTENT { holder: $h, until: $now + $ttl } RETURN NONE;
                         RETURN true;
                         COMMIT TRANSACTION;",
                    )
                    .bind(("table", table))
                    .bind(("i", key.to_owned()))
                    .bind(("h", holder.to_owned()))
                    .bind(("now", now_ms))
                    .bind(("ttl", ttl_ms))
            })
            .await?;
        Ok(crate::returned::<bool>(&mut r)?.unwrap_or(false))
    }

    /// A page of `instance`'s delivery log, newest first, and its length.
    pub async fn plugin_deliveries(&self, instance: &str, limit: usize, offset: usize) -> Result<(Vec<DeliveryRow>, u64)> {
        let mut r = self
            .db
            .query(
                "SELECT instance, event_id, hook, attempt, at_ms, outcome, detail, took_ms FROM plugin_delivery
                 WHERE instance = $i ORDER BY at_ms DESC, event_id DESC, attempt DESC LIMIT $n START $o",
            )
            .query("SELECT count() AS n FROM plugin_delivery WHERE instance = $i GROUP ALL")
            .bind(("i", instance.to_owned()))
            .bind(("n", limit as i64))
            .bind(("o", offset as i64))
            .await?
            .check()?;
        #[derive(Deserialize)]
        struct N {
            n: u64,
        }
        let items = rows(&mut r, 0)?;
        let total = rows::<N>(&mut r, 1)?.into_iter().next().map_or(0, |n| n.n);
        Ok((items, total))
    }

    /// Keep the newest `keep` lines of `instance`'s delivery log.
    pub async fn prune_deliveries(&self, instance: &str, keep: usize) -> Result<()> {
        self.db
            .query(
                "LET $cut = (SELECT VALUE at_ms FROM plugin_delivery WHERE instance = $i ORDER BY at_ms DESC LIMIT 1 START $keep)[0];
                 IF $cut != NONE { DELETE plugin_delivery WHERE instance = $i AND at_ms <= $cut RETURN NONE; };",
            )
            .bind(("i", instance.to_owned()))
            .bind(("keep", keep as i64))
            .await?
            .check()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{mem, row};

    fn ev(instance: &str, id: &str, at: i64) -> OutboxRow {
        OutboxRow {
            instance: instance.into(),
            event_id: id.into(),
            at_ms: at,
            hook: "manifest-pushed".into(),
            event: "{}".into(),
            if_new_repo: false,
            attempts: 0,
            next_ms: at,
        }
    }

    fn log(instance: &str, id: &str, attempt: u32, at: i64, outcome: &str) -> DeliveryRow {
        DeliveryRow {
            instance: instance.into(),
            event_id: id.into(),
            hook: "manifest-pushed".into(),
            attempt,
            at_ms: at,
            outcome: outcome.into(),
            detail: None,
            took_ms: 1.5,
        }
    }

    #[tokio::test]
    async fn events_ride_on_their_change_and_settle() {
        let md = mem().await;
        let repo: berth_oci::RepoName = "acme/app".parse().unwrap();
        let m = row(&repo, b"m");
        // A first push: the repository-created row goes in, since the commit created it.
        let mut created = ev("hook", "e0", 5);
        created.if_new_repo = true;
        let rows = vec![created.clone(), ev("hook", "e1", 10), ev("other", "e1", 10)];
        md.commit_manifests(&crate::Guard::any(), &[(m.clone(), None, false)], &[rows]).await.unwrap();
        assert_eq!(md.outbox_depth("hook").await.unwrap(), Depth { rows: 2, oldest_ms: Some(5), next_ms: Some(5) });
        // The second push of it: the repository exists, so no repository-created.
        let mut again = created.clone();
        again.event_id = "e2".into();
        md.commit_manifests(&crate::Guard::any(), &[(m.clone(), None, false)], &[vec![again]]).await.unwrap();
        assert_eq!(md.outbox_depth("hook").await.unwrap().rows, 2);

        let due = md.outbox_due("hook", 100, 10).await.unwrap();
        assert_eq!(due.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>(), ["e0", "e1"]);
        assert_eq!(due[0], created);
        md.outbox_settle(
            "hook",
            &[Settle::Done(log("hook", "e0", 1, 20, "delivered")), Settle::Retry(log("hook", "e1", 1, 21, "retrying"), 500)],
        )
        .await
        .unwrap();
        assert_eq!(md.outbox_depth("hook").await.unwrap(), Depth { rows: 1, oldest_ms: Some(10), next_ms: Some(500) });
        assert!(md.outbox_due("hook", 499, 10).await.unwrap().is_empty(), "not due before its time");
        let later = md.outbox_due("hook", 500, 10).await.unwrap();
        assert_eq!((later.len(), later[0].attempts), (1, 1));
        md.outbox_settle("hook", &[Settle::Done(log("hook", "e1", 2, 600, "delivered"))]).await.unwrap();
        assert_eq!(md.outbox_depth("hook").await.unwrap(), Depth::default());
        assert_eq!(md.outbox_depth("other").await.unwrap().rows, 1, "another instance's queue is its own");

        let (items, total) = md.plugin_deliveries("hook", 2, 0).await.unwrap();
        assert_eq!(total, 3);
        assert_eq!(items, vec![log("hook", "e1", 2, 600, "delivered"), log("hook", "e1", 1, 21, "retrying")]);
        md.prune_deliveries("hook", 1).await.unwrap();
        assert_eq!(md.plugin_deliveries("hook", 10, 0).await.unwrap().1, 1);
    }

    #[tokio::test]
    async fn one_holder_at_a_time_delivers_a_queue() {
        let md = mem().await;
        assert!(md.outbox_lease("hook", "r1", 1000, 100).await.unwrap());
        assert!(!md.outbox_lease("hook", "r2", 1050, 100).await.unwrap(), "r1's lease runs");
        assert!(md.outbox_lease("other", "r2", 1050, 100).await.unwrap(), "another queue's lease is its own");
        assert!(md.outbox_lease("hook", "r1", 1090, 100).await.unwrap(), "renewed by its holder");
        assert!(!md.outbox_lease("hook", "r2", 1150, 100).await.unwrap(), "renewed until 1190");
        assert!(md.outbox_lease("hook", "r2", 1191, 100).await.unwrap(), "taken over once it ran out");
        assert!(!md.outbox_lease("hook", "r1", 1200, 100).await.unwrap());
        // Jobs' leases are apart from queues'.
        assert!(md.job_lease("hook", "r3", 1200, 100).await.unwrap());
        assert!(!md.job_lease("hook", "r1", 1250, 100).await.unwrap());
    }

    #[tokio::test]
    async fn a_failed_change_writes_no_event() {
        let md = mem().await;
        let repo: berth_oci::RepoName = "acme/app".parse().unwrap();
        let m = row(&repo, b"m");
        let e = ev("hook", "e1", 10);
        md.commit_manifests(&crate::Guard::any(), &[(m.clone(), None, false)], &[vec![e.clone()]]).await.unwrap();
        // The same event id again makes the transaction fail: nothing of it stays.
        let other = row(&repo, b"n");
        assert!(md.commit_manifests(&crate::Guard::any(), &[(other.clone(), None, false)], &[vec![e]]).await.is_err());
        assert_eq!(md.outbox_depth("hook").await.unwrap().rows, 1);
        assert!(md.snapshot().await.unwrap().manifests.iter().all(|r| r.digest != other.digest));
    }
}
