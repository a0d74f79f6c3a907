//! Retention policies (per repository or per namespace) and the audit record of
//! what their runs deleted. The rules themselves are evaluated by the registry.

use serde::{Deserialize, Serialize};

use crate::{now_ms, one, rows, Metadata, Result};

pub(crate) const SCHEMA: &str = r#"
DEFINE TABLE IF NOT EXISTS retention SCHEMALESS;
DEFINE TABLE IF NOT EXISTS retention_run SCHEMALESS;
DEFINE INDEX IF NOT EXISTS retention_run_scope ON retention_run FIELDS scope, started_ms;
"#;

/// A retention policy's rules. A repository's own policy wins over its
/// namespace's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionRules {
    /// Keep the N most recently pushed tags.
    pub keep_last: Option<u32>,
    /// Tags matching any of these glob patterns (`*`, `?`) are always kept.
    #[serde(default)]
    pub keep_patterns: Vec<String>,
    /// Delete tags neither pulled nor pushed for this long.
    pub unpulled_for_secs: Option<u64>,
    /// Delete untagged manifests created longer ago than this.
    pub untagged_older_than_secs: Option<u64>,
}

/// A stored policy: its scope (`repo:<name>` or `ns:<namespace>`) and rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub scope: String,
    #[serde(flatten)]
    pub rules: RetentionRules,
    pub enabled: bool,
    pub updated_ms: i64,
}

/// One thing a run deleted (or, dry, would delete), and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionItem {
    pub repository: String,
    /// `tag` or `manifest`.
    pub kind: String,
    /// The tag name or the manifest digest.
    pub name: String,
    pub reason: String,
}

/// The audit record of one run of one policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetentionRun {
    pub scope: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub dry_run: bool,
    /// Who ran it: a user, or `schedule`.
    pub by: String,
    pub items: Vec<RetentionItem>,
    #[serde(default)]
    pub errors: Vec<String>,
}

impl Metadata {
    pub async fn put_retention(&self, p: &RetentionPolicy) -> Result<()> {
        self.db
            .query("UPSERT type::record('retention', $scope) CONTENT $row RETURN NONE")
            .bind(("scope", p.scope.clone()))
            .bind(("row", crate::to_value(p)?))
            .await?
            .check()?;
        Ok(())
    }

    pub async fn retention(&self, scope: &str) -> Result<Option<RetentionPolicy>> {
        let mut r = self
            .db
            .query("SELECT * OMIT id FROM ONLY type::record('retention', $scope)")
            .bind(("scope", scope.to_owned()))
            .await?
            .check()?;
        one(&mut r, 0)
    }

    /// `true` if there was one.
    pub async fn delete_retention(&self, scope: &str) -> Result<bool> {
        let mut r =
            self.db.query("DELETE type::record('retention', $scope) RETURN BEFORE").bind(("scope", scope.to_owned())).await?.check()?;
        let gone: Vec<serde_json::Value> = rows(&mut r, 0)?;
        Ok(!gone.is_empty())
    }

    pub async fn retention_policies(&self) -> Result<Vec<RetentionPolicy>> {
        let mut r = self.db.query("SELECT * OMIT id FROM retention ORDER BY scope").await?.check()?;
        rows(&mut r, 0)
    }

    /// Record a run (its audit record).
    pub async fn record_retention_run(&self, run: &RetentionRun) -> Result<()> {
        self.db.query("CREATE retention_run CONTENT $row RETURN NONE").bind(("row", crate::to_value(run)?)).await?.check()?;
        Ok(())
    }

    /// The latest runs, newest first, of the given scopes (all when `None`).
    pub async fn retention_runs(&self, scopes: Option<&[String]>, limit: usize) -> Result<Vec<RetentionRun>> {
        let mut r = match scopes {
            None => {
                self.db
                    .query("SELECT * OMIT id FROM retention_run ORDER BY started_ms DESC LIMIT $limit")
                    .bind(("limit", limit as i64))
                    .await?
            }
            Some(s) => {
                self.db
                    .query("SELECT * OMIT id FROM retention_run WHERE scope IN $scopes ORDER BY started_ms DESC LIMIT $limit")
                    .bind(("scopes", s.to_vec()))
                    .bind(("limit", limit as i64))
                    .await?
            }
        }
        .check()?;
        rows(&mut r, 0)
    }

    /// Forget runs older than `before_ms` (the audit log's retention).
    pub async fn prune_retention_runs(&self, before_ms: i64) -> Result<()> {
        self.db.query("DELETE retention_run WHERE started_ms < $before RETURN NONE").bind(("before", before_ms)).await?.check()?;
        Ok(())
    }
}

/// Now, for callers stamping policies.
pub fn stamp() -> i64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::mem;

    #[tokio::test]
    async fn policies_and_runs_round_trip() {
        let md = mem().await;
        let p = RetentionPolicy {
            scope: "repo:acme/app".into(),
            rules: RetentionRules {
                keep_last: Some(3),
                keep_patterns: vec!["latest".into(), "v*".into()],
                unpulled_for_secs: None,
                untagged_older_than_secs: Some(86400),
            },
            enabled: true,
            updated_ms: 5,
        };
        md.put_retention(&p).await.unwrap();
        assert_eq!(md.retention("repo:acme/app").await.unwrap(), Some(p.clone()));
        assert_eq!(md.retention_policies().await.unwrap(), vec![p.clone()]);
        let run = RetentionRun {
            scope: p.scope.clone(),
            started_ms: 10,
            finished_ms: 11,
            dry_run: false,
            by: "schedule".into(),
            items: vec![RetentionItem { repository: "acme/app".into(), kind: "tag".into(), name: "old".into(), reason: "r".into() }],
            errors: vec![],
        };
        md.record_retention_run(&run).await.unwrap();
        assert_eq!(md.retention_runs(Some(std::slice::from_ref(&p.scope)), 10).await.unwrap(), vec![run.clone()]);
        assert!(md.retention_runs(Some(&["ns:other".into()]), 10).await.unwrap().is_empty());
        md.prune_retention_runs(11).await.unwrap();
        assert!(md.retention_runs(None, 10).await.unwrap().is_empty());
        assert!(md.delete_retention("repo:acme/app").await.unwrap());
        assert!(!md.delete_retention("repo:acme/app").await.unwrap());
    }
}
