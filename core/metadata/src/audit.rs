//! The security audit log: who did what, from where, and how it ended (logins
//! and their failures, access tokens issued and revoked, password changes,
//! policy and share changes, users created and deleted, signing-key rotation).
//! Rows are appended in batches and kept for a window; never a secret.

use serde::{Deserialize, Serialize};

use crate::{rows, Metadata, Result};

pub(crate) const SCHEMA: &str = r#"
DEFINE TABLE IF NOT EXISTS audit SCHEMALESS;
DEFINE INDEX IF NOT EXISTS audit_ms ON audit FIELDS ms;
"#;

/// One security event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    /// When (milliseconds since the epoch).
    pub ms: i64,
    /// What happened: `login`, `login-failed`, `token-issued`, `token-revoked`,
    /// `password-changed`, `policy-changed`, `share-changed`, `user-created`,
    /// `user-deleted`, `key-rotated`, …
    pub action: String,
    /// Who: the acting user (or the user name a failed login tried), if any.
    pub actor: Option<String>,
    /// From where: the client's address, if known.
    pub source: Option<String>,
    /// What it was done to (a token id, a user, a repository, a rule).
    pub target: Option<String>,
    /// A short description (never a secret).
    pub detail: Option<String>,
}

impl Metadata {
    /// Append events (one transaction).
    pub async fn append_audit(&self, events: &[AuditRow]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let rows = events.iter().map(crate::to_value).collect::<Result<Vec<_>>>()?;
        self.run(|| self.db.query("INSERT INTO audit $rows RETURN NONE").bind(("rows", rows.clone()))).await?;
        Ok(())
    }

    /// Events at or after `since_ms`, newest first, at most `limit`, optionally of one action.
    pub async fn audit_since(&self, since_ms: i64, action: Option<&str>, limit: usize) -> Result<Vec<AuditRow>> {
        let filter = if action.is_some() { "AND action = $action" } else { "" };
        let mut r = self
            .db
            .query(format!(
                "SELECT ms, action, actor, source, target, detail FROM audit WHERE ms >= $since {filter} ORDER BY ms DESC LIMIT $limit"
            ))
            .bind(("since", since_ms))
            .bind(("action", action.map(str::to_owned)))
            .bind(("limit", limit as i64))
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    /// Forget events older than `before_ms`.
    pub async fn prune_audit(&self, before_ms: i64) -> Result<()> {
        self.db.query("DELETE audit WHERE ms < $before RETURN NONE").bind(("before", before_ms)).await?.check()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ms: i64, action: &str) -> AuditRow {
        AuditRow { ms, action: action.into(), actor: Some("mia".into()), source: Some("10.0.0.1".into()), target: None, detail: None }
    }

    #[tokio::test]
    async fn appended_listed_newest_first_and_pruned() {
        let md = crate::tests::mem().await;
        md.append_audit(&[ev(1_000, "login"), ev(2_000, "login-failed"), ev(3_000, "login")]).await.unwrap();
        md.append_audit(&[]).await.unwrap();
        let all = md.audit_since(0, None, 10).await.unwrap();
        assert_eq!(all.iter().map(|e| e.ms).collect::<Vec<_>>(), [3_000, 2_000, 1_000]);
        assert_eq!(all[1], ev(2_000, "login-failed"));
        assert_eq!(md.audit_since(1_500, Some("login"), 10).await.unwrap().len(), 1);
        assert_eq!(md.audit_since(0, None, 2).await.unwrap().len(), 2);
        md.prune_audit(2_500).await.unwrap();
        assert_eq!(md.audit_since(0, None, 10).await.unwrap(), [ev(3_000, "login")]);
    }
}
