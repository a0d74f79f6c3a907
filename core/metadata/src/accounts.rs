//! Accounts and authorization state: tenants, users, namespaces, registry access
//! tokens, token-signing keys, casbin policy rules and repository shares.
//!
//! Secrets never reach this module in the clear: passwords arrive as argon2 PHC
//! strings and access tokens as SHA-256 hashes of their secret.

use berth_oci::{AccountName, RepoName};
use serde::{Deserialize, Serialize};

use crate::{one, returned, rows, Metadata, Result};

/// A tenant: owns namespaces and users.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TenantRow {
    pub name: AccountName,
    pub created_ms: i64,
}

/// A user account. Its roles are policy rules, not fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserRow {
    pub name: AccountName,
    /// The tenant the user belongs to; `None` for platform users (the bootstrap admin).
    pub tenant: Option<AccountName>,
    /// argon2id PHC string.
    pub password_hash: String,
    pub created_ms: i64,
}

/// A user whose credentials changed: when, and whether they are disabled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserChange {
    pub name: AccountName,
    pub changed_ms: i64,
    pub disabled: bool,
}

/// A namespace (first component of repository names) and the tenant owning it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamespaceRow {
    pub name: AccountName,
    pub tenant: AccountName,
}

/// What a stored token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// A registry access token: a password substitute for `docker login`.
    Access,
    /// An OAuth2 refresh token handed to docker as its identity token.
    Refresh,
}

/// A registry access or refresh token; the secret itself is never stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRow {
    pub id: String,
    pub user: AccountName,
    pub kind: TokenKind,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub description: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub last_used_ms: Option<i64>,
    /// What the token may be used for (`pull`, `push`, `manage`); `None`: a
    /// token issued before tokens had scopes (all of them).
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// The access token that minted this one, if a token did: revoked with it.
    #[serde(default)]
    pub parent: Option<String>,
}

/// A key that signs bearer tokens (HS256). Retired keys still verify until the
/// tokens they signed have expired.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SigningKeyRow {
    pub kid: String,
    /// The 32-byte secret, sealed with the master key (see `berth-auth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    /// Hex of the secret in the clear: rows written before keys were sealed
    /// (sealed, and this removed, at the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hex: Option<String>,
    pub created_ms: i64,
    pub retired_ms: Option<i64>,
}

/// One casbin rule: `ptype` (`p`, `g`, `g2`) and its fields.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyRuleRow {
    pub ptype: String,
    pub fields: Vec<String>,
}

/// A repository shared with another tenant; the grant itself is a policy rule,
/// this row remembers when to withdraw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShareRow {
    pub repo: RepoName,
    pub tenant: AccountName,
    pub actions: Vec<String>,
    pub expires_ms: Option<i64>,
}

/// A whole namespace shared with another tenant (every repository in it, present
/// and future); like [`ShareRow`], the grant is a policy rule (`<ns>/*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NsShareRow {
    pub namespace: AccountName,
    pub tenant: AccountName,
    pub actions: Vec<String>,
    pub expires_ms: Option<i64>,
}

/// Bookkeeping for policies-as-code: a version bumped by every change (replicas
/// poll it to reload) and the seed file's lines last applied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    pub version: u64,
    pub seed: Vec<PolicyRuleRow>,
}

pub(crate) const SCHEMA: &str = r#"
DEFINE TABLE IF NOT EXISTS tenant SCHEMALESS;
DEFINE TABLE IF NOT EXISTS user SCHEMALESS;
DEFINE INDEX IF NOT EXISTS user_changed ON user FIELDS changed_ms;
DEFINE TABLE IF NOT EXISTS namespace SCHEMALESS;
DEFINE TABLE IF NOT EXISTS token SCHEMALESS;
DEFINE INDEX IF NOT EXISTS token_user ON token FIELDS user;
DEFINE TABLE IF NOT EXISTS signing_key SCHEMALESS;
DEFINE TABLE IF NOT EXISTS policy_rule SCHEMALESS;
DEFINE TABLE IF NOT EXISTS policy_state SCHEMALESS;
DEFINE TABLE IF NOT EXISTS share SCHEMALESS;
DEFINE TABLE IF NOT EXISTS ns_share SCHEMALESS;
"#;

fn rule_key(r: &PolicyRuleRow) -> Vec<String> {
    let mut k = Vec::with_capacity(r.fields.len() + 1);
    k.push(r.ptype.clone());
    k.extend(r.fields.iter().cloned());
    k
}

impl Metadata {
    // ----- tenants, users, namespaces -----

    /// Create a tenant and its namespace of the same name, atomically. `false`
    /// if the tenant (or a namespace of that name) already exists.
    pub async fn create_tenant(&self, t: &TenantRow) -> Result<bool> {
        let row = crate::to_value(t)?;
        let mut r = self.run(|| {
            self.db
            .query(
                "BEGIN TRANSACTION;
                 LET $taken = (SELECT VALUE name FROM ONLY type::record('tenant', $name)) OR (SELECT VALUE name FROM ONLY type::record('namespace', $name));
                 IF $taken { RETURN false; };
                 CREATE type::record('tenant', $name) CONTENT $row RETURN NONE;
                 CREATE type::record('namespace', $name) CONTENT { name: $name, tenant: $name } RETURN NONE;
                 RETURN true;
                 COMMIT TRANSACTION;",
            )
            .bind(("name", t.name.to_string()))
            .bind(("row", row.clone()))
            })
            .await?;
        Ok(returned::<bool>(&mut r)?.unwrap_or(false))
    }

    pub async fn tenants(&self) -> Result<Vec<TenantRow>> {
        let mut r = self.db.query("SELECT name, created_ms FROM tenant ORDER BY name").await?.check()?;
        rows(&mut r, 0)
    }

    /// Create `table:name` with `row` unless it exists; `false` if it did.
    pub(crate) async fn create_if_absent(&self, table: &'static str, name: &str, row: serde_json::Value) -> Result<bool> {
        self.create_announcing(table, name, row, &[], "").await
    }

    /// [`Metadata::create_if_absent`], writing `outbox` (the events announcing
    /// the creation) and running `also` (which may use `$next`, a fresh
    /// version) only if it created the record.
    pub(crate) async fn create_announcing(
        &self,
        table: &'static str,
        name: &str,
        row: serde_json::Value,
        outbox: &[crate::OutboxRow],
        also: &str,
    ) -> Result<bool> {
        let sql = format!(
            "BEGIN TRANSACTION;
             IF (SELECT VALUE name FROM ONLY type::record($table, $name)) {{ RETURN false; }};
             CREATE type::record($table, $name) CONTENT $row RETURN NONE;
             {also}
             {}
             RETURN true;
             COMMIT TRANSACTION;",
            crate::outbox::add("$outbox", outbox)
        );
        let outbox = crate::outbox::bind(outbox)?;
        let _catalog = self.catalog_turn(!also.is_empty()).await;
        let mut r = self
            .run(|| {
                crate::Guard::any()
                    .bind(self.db.query(sql.as_str()))
                    .bind(("table", table))
                    .bind(("name", name.to_string()))
                    .bind(("row", row.clone()))
                    .bind(("outbox", outbox.clone()))
            })
            .await?;
        Ok(returned::<bool>(&mut r)?.unwrap_or(false))
    }

    /// Create a user; `false` if the name is taken.
    pub async fn create_user(&self, u: &UserRow) -> Result<bool> {
        self.create_if_absent("user", u.name.as_str(), crate::to_value(u)?).await
    }

    /// Set a password; answers the time recorded as the credentials' change.
    pub async fn set_password(&self, user: &AccountName, password_hash: &str) -> Result<i64> {
        let now = crate::now_ms();
        self.db
            .query("UPDATE type::record('user', $name) SET password_hash = $h, changed_ms = $now RETURN NONE")
            .bind(("name", user.to_string()))
            .bind(("h", password_hash.to_owned()))
            .bind(("now", now))
            .await?
            .check()?;
        Ok(now)
    }

    /// Users whose credentials changed at or after `since_ms` (other replicas
    /// drop what they cached about them); from 0, every user ever changed.
    pub async fn users_changed_since(&self, since_ms: i64) -> Result<Vec<UserChange>> {
        let mut r = self
            .db
            .query("SELECT name, changed_ms, disabled = true AS disabled FROM user WHERE changed_ms >= $since")
            .bind(("since", since_ms))
            .await?
            .check()?;
        crate::rows(&mut r, 0)
    }

    /// Disable (or enable again) a user: every credential of theirs stops
    /// working. Answers the time recorded as the change (`None`: no such user).
    pub async fn set_user_disabled(&self, user: &AccountName, disabled: bool) -> Result<Option<i64>> {
        let now = crate::now_ms();
        let mut r = self
            .db
            .query("UPDATE type::record('user', $name) SET disabled = $d, changed_ms = $now RETURN VALUE name")
            .bind(("name", user.to_string()))
            .bind(("d", disabled))
            .bind(("now", now))
            .await?
            .check()?;
        let names: Vec<String> = crate::rows(&mut r, 0)?;
        Ok((!names.is_empty()).then_some(now))
    }

    pub async fn user(&self, name: &AccountName) -> Result<Option<UserRow>> {
        let mut r = self
            .db
            .query("SELECT name, tenant, password_hash, created_ms FROM ONLY type::record('user', $name)")
            .bind(("name", name.to_string()))
            .await?
            .check()?;
        one(&mut r, 0)
    }

    pub async fn users(&self) -> Result<Vec<UserRow>> {
        let mut r = self.db.query("SELECT name, tenant, password_hash, created_ms FROM user ORDER BY name").await?.check()?;
        rows(&mut r, 0)
    }

    pub async fn delete_user(&self, name: &AccountName) -> Result<()> {
        self.run(|| {
            self.db
                .query(
                    "BEGIN TRANSACTION;
                 DELETE token WHERE user = $name RETURN NONE;
                 DELETE type::record('user', $name) RETURN NONE;
                 COMMIT TRANSACTION;",
                )
                .bind(("name", name.to_string()))
        })
        .await?;
        Ok(())
    }

    /// Assign a namespace to a tenant; `false` if it is already owned.
    pub async fn create_namespace(&self, ns: &NamespaceRow) -> Result<bool> {
        self.create_if_absent("namespace", ns.name.as_str(), crate::to_value(ns)?).await
    }

    pub async fn namespaces(&self) -> Result<Vec<NamespaceRow>> {
        let mut r = self.db.query("SELECT name, tenant FROM namespace").await?.check()?;
        rows(&mut r, 0)
    }

    // ----- tokens -----

    pub async fn put_token(&self, t: &TokenRow) -> Result<()> {
        self.db
            .query("UPSERT type::record('token', $id) CONTENT $row RETURN NONE")
            .bind(("id", t.id.clone()))
            .bind(("row", crate::to_value(t)?))
            .await?
            .check()?;
        Ok(())
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        let mut r = self
            .db
            .query("SELECT id_str AS id, user, kind, secret_sha256, description, created_ms, expires_ms, last_used_ms, scopes, parent FROM token")
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    /// One token by id (a replica checking a token another one issued since its last refresh).
    pub async fn token(&self, id: &str) -> Result<Option<TokenRow>> {
        let mut r = self
            .db
            .query(
                "SELECT id_str AS id, user, kind, secret_sha256, description, created_ms, expires_ms, last_used_ms, scopes, parent
                 FROM ONLY type::record('token', $id)",
            )
            .bind(("id", id.to_owned()))
            .await?
            .check()?;
        crate::one(&mut r, 0)
    }

    pub async fn delete_tokens(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.db.query("FOR $id IN $ids { DELETE type::record('token', $id) RETURN NONE; }").bind(("ids", ids.to_vec())).await?.check()?;
        Ok(())
    }

    /// Record last-use times in one statement (the token actor batches them).
    pub async fn touch_tokens(&self, used: &[(String, i64)]) -> Result<()> {
        if used.is_empty() {
            return Ok(());
        }
        let rows: Vec<serde_json::Value> = used.iter().map(|(id, ms)| serde_json::json!({"id": id, "ms": ms})).collect();
        self.db
            .query("FOR $u IN $rows { UPDATE type::record('token', $u.id) SET last_used_ms = $u.ms RETURN NONE; }")
            .bind(("rows", rows.clone()))
            .await?
            .check()?;
        Ok(())
    }

    // ----- signing keys -----

    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>> {
        let mut r =
            self.db.query("SELECT kid, sealed, secret_hex, created_ms, retired_ms FROM signing_key ORDER BY created_ms").await?.check()?;
        rows(&mut r, 0)
    }

    /// Add a new current key and retire every other one, atomically.
    pub async fn rotate_signing_key(&self, k: &SigningKeyRow) -> Result<()> {
        let row = crate::to_value(k)?;
        self.run(|| {
            self.db
                .query(
                    "BEGIN TRANSACTION;
                 UPDATE signing_key SET retired_ms = $now WHERE retired_ms = NONE OR retired_ms = NULL RETURN NONE;
                 CREATE type::record('signing_key', $kid) CONTENT $row RETURN NONE;
                 COMMIT TRANSACTION;",
                )
                .bind(("now", k.created_ms))
                .bind(("kid", k.kid.clone()))
                .bind(("row", row.clone()))
        })
        .await?;
        Ok(())
    }

    /// Store a key's sealed secret in place of its clear one.
    pub async fn seal_signing_key(&self, kid: &str, sealed: &str) -> Result<()> {
        self.db
            .query("UPDATE type::record('signing_key', $kid) SET sealed = $sealed, secret_hex = NONE RETURN NONE")
            .bind(("kid", kid.to_owned()))
            .bind(("sealed", sealed.to_owned()))
            .await?
            .check()?;
        Ok(())
    }

    /// Forget keys retired before `before_ms` (every token they signed has expired).
    pub async fn prune_signing_keys(&self, before_ms: i64) -> Result<()> {
        self.db
            .query("DELETE signing_key WHERE retired_ms != NONE AND retired_ms != NULL AND retired_ms < $before RETURN NONE")
            .bind(("before", before_ms))
            .await?
            .check()?;
        Ok(())
    }

    // ----- policy rules -----

    pub async fn policy_rules(&self) -> Result<Vec<PolicyRuleRow>> {
        let mut r = self.db.query("SELECT ptype, fields FROM policy_rule").await?.check()?;
        let mut rules: Vec<PolicyRuleRow> = rows(&mut r, 0)?;
        rules.sort();
        Ok(rules)
    }

    /// Add and remove rules and bump the policy version, in one transaction.
    pub async fn change_policy(&self, add: &[PolicyRuleRow], remove: &[PolicyRuleRow], seed: Option<&[PolicyRuleRow]>) -> Result<u64> {
        let add: Vec<serde_json::Value> = add.iter().map(|r| serde_json::json!({"key": rule_key(r), "row": r})).collect();
        let remove: Vec<Vec<String>> = remove.iter().map(rule_key).collect();
        let mut sql = String::from(
            "BEGIN TRANSACTION;
             FOR $k IN $remove { DELETE type::record('policy_rule', $k) RETURN NONE; };
             FOR $a IN $add { UPSERT type::record('policy_rule', $a.key) CONTENT $a.row RETURN NONE; };
             UPSERT policy_state:current SET version = (version OR 0) + 1 RETURN NONE;",
        );
        if seed.is_some() {
            sql.push_str("UPSERT policy_state:current SET seed = $seed RETURN NONE;");
        }
        sql.push_str("RETURN (SELECT VALUE version FROM ONLY policy_state:current); COMMIT TRANSACTION;");
        let seed = seed.map(|s| serde_json::to_value(s).map_err(|e| crate::MetadataError::Corrupt(e.to_string()))).transpose()?;
        let mut r = self
            .run(|| {
                let q = self.db.query(sql.as_str()).bind(("add", add.clone())).bind(("remove", remove.clone()));
                match &seed {
                    Some(seed) => q.bind(("seed", seed.clone())),
                    None => q,
                }
            })
            .await?;
        Ok(returned::<u64>(&mut r)?.unwrap_or(0))
    }

    pub async fn policy_state(&self) -> Result<PolicyState> {
        let mut r = self.db.query("SELECT version, seed OR [] AS seed FROM ONLY policy_state:current").await?.check()?;
        Ok(one::<PolicyState>(&mut r, 0)?.unwrap_or_default())
    }

    // ----- shares -----

    pub async fn put_share(&self, s: &ShareRow) -> Result<()> {
        self.db
            .query("UPSERT type::record('share', [$repo, $tenant]) CONTENT $row RETURN NONE")
            .bind(("repo", s.repo.to_string()))
            .bind(("tenant", s.tenant.to_string()))
            .bind(("row", crate::to_value(s)?))
            .await?
            .check()?;
        Ok(())
    }

    pub async fn delete_share(&self, repo: &RepoName, tenant: &AccountName) -> Result<()> {
        self.db
            .query("DELETE type::record('share', [$repo, $tenant]) RETURN NONE")
            .bind(("repo", repo.to_string()))
            .bind(("tenant", tenant.to_string()))
            .await?
            .check()?;
        Ok(())
    }

    pub async fn shares(&self) -> Result<Vec<ShareRow>> {
        let mut r = self.db.query("SELECT repo, tenant, actions, expires_ms FROM share").await?.check()?;
        rows(&mut r, 0)
    }

    pub async fn put_ns_share(&self, s: &NsShareRow) -> Result<()> {
        self.db
            .query("UPSERT type::record('ns_share', [$ns, $tenant]) CONTENT $row RETURN NONE")
            .bind(("ns", s.namespace.to_string()))
            .bind(("tenant", s.tenant.to_string()))
            .bind(("row", crate::to_value(s)?))
            .await?
            .check()?;
        Ok(())
    }

    pub async fn delete_ns_share(&self, ns: &AccountName, tenant: &AccountName) -> Result<()> {
        self.db
            .query("DELETE type::record('ns_share', [$ns, $tenant]) RETURN NONE")
            .bind(("ns", ns.to_string()))
            .bind(("tenant", tenant.to_string()))
            .await?
            .check()?;
        Ok(())
    }

    pub async fn ns_shares(&self) -> Result<Vec<NsShareRow>> {
        let mut r = self.db.query("SELECT namespace, tenant, actions, expires_ms FROM ns_share").await?.check()?;
        rows(&mut r, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tenants_users_tokens_policy() {
        let md = crate::tests::mem().await;
        let acme: AccountName = "acme".parse().unwrap();
        assert!(md.create_tenant(&TenantRow { name: acme.clone(), created_ms: 1 }).await.unwrap());
        assert!(!md.create_tenant(&TenantRow { name: acme.clone(), created_ms: 2 }).await.unwrap());
        assert_eq!(md.namespaces().await.unwrap(), vec![NamespaceRow { name: acme.clone(), tenant: acme.clone() }]);
        // A namespace already owned cannot be claimed by another tenant.
        let other: AccountName = "other".parse().unwrap();
        assert!(!md.create_namespace(&NamespaceRow { name: acme.clone(), tenant: other }).await.unwrap());

        let alice =
            UserRow { name: "alice".parse().unwrap(), tenant: Some(acme.clone()), password_hash: "$argon2id$x".into(), created_ms: 3 };
        assert!(md.create_user(&alice).await.unwrap());
        assert!(!md.create_user(&alice).await.unwrap());
        assert_eq!(md.user(&alice.name).await.unwrap(), Some(alice.clone()));

        let t = TokenRow {
            id: "tok1".into(),
            user: alice.name.clone(),
            kind: TokenKind::Access,
            secret_sha256: "ab".into(),
            description: "ci".into(),
            created_ms: 1,
            expires_ms: 10,
            last_used_ms: None,
            scopes: Some(vec!["pull".into()]),
            parent: Some("0123456789abcdef".into()),
        };
        md.put_token(&t).await.unwrap();
        md.touch_tokens(&[("tok1".into(), 5)]).await.unwrap();
        assert_eq!(md.tokens().await.unwrap()[0], TokenRow { last_used_ms: Some(5), ..t.clone() });
        assert!(md.users_changed_since(0).await.unwrap().is_empty());
        let when = md.set_user_disabled(&alice.name, true).await.unwrap().unwrap();
        assert_eq!(md.set_user_disabled(&"nobody".parse().unwrap(), true).await.unwrap(), None);
        let changed = md.users_changed_since(0).await.unwrap();
        assert_eq!(changed, [UserChange { name: alice.name.clone(), changed_ms: when, disabled: true }]);
        md.delete_tokens(&["tok1".into()]).await.unwrap();
        assert!(md.tokens().await.unwrap().is_empty());

        let rule =
            PolicyRuleRow { ptype: "p".into(), fields: vec!["role:reader".into(), "*".into(), "*".into(), "pull".into(), "allow".into()] };
        let v1 = md.change_policy(std::slice::from_ref(&rule), &[], Some(std::slice::from_ref(&rule))).await.unwrap();
        let v2 = md.change_policy(std::slice::from_ref(&rule), &[], None).await.unwrap();
        assert_eq!(v2, v1 + 1);
        assert_eq!(md.policy_rules().await.unwrap(), vec![rule.clone()]);
        assert_eq!(md.policy_state().await.unwrap().seed, vec![rule.clone()]);
        md.change_policy(&[], &[rule], None).await.unwrap();
        assert!(md.policy_rules().await.unwrap().is_empty());
    }
}
