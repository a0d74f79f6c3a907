//! Registry access tokens and refresh tokens: one actor owns their lifecycle
//! (issue, revoke, expiry sweep, last-use bookkeeping); requests validate against
//! a shared read view without a mailbox round trip.
//!
//! A token reads `bt_<id>_<secret>`. Only the SHA-256 of the secret is stored and
//! it is compared in constant time. Revocation removes the token from the view
//! before the actor answers, so it takes effect on this node at once; other
//! replicas drop it at their next refresh from the store.
//!
//! Issue, revoke and sweep are atomic responses: the actor handles nothing else
//! until one has finished, so a sweep that reloads the view from the store can
//! never resurrect a token whose revocation is still being written.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use berth_metadata::{Metadata, TokenKind, TokenRow};
use berth_oci::AccountName;

use crate::secret::{ct_eq, random_token, sha256_hex};

pub const PREFIX: &str = "bt_";

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The read side, shared with request handlers.
pub type TokenView = Arc<RwLock<HashMap<String, TokenRow>>>;

/// Split `bt_<id>_<secret>`.
pub fn split(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty()).then_some((id, secret))
}

/// Validate a presented token against the view; `kind` must match.
pub fn validate(view: &TokenView, token: &str, kind: TokenKind, now: i64) -> Option<TokenRow> {
    let (id, secret) = split(token)?;
    let row = view.read().unwrap().get(id).cloned()?;
    let ok = row.kind == kind && row.expires_ms > now && ct_eq(&sha256_hex(secret.as_bytes()), &row.secret_sha256);
    ok.then_some(row)
}

pub struct TokenActor {
    meta: Metadata,
    view: TokenView,
    touched: HashMap<String, i64>,
    sweep_every: Duration,
}

impl TokenActor {
    pub fn new(meta: Metadata, view: TokenView, sweep_every: Duration) -> Self {
        TokenActor { meta, view, touched: HashMap::new(), sweep_every }
    }
}

impl Actor for TokenActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.sweep_every, |_, ctx| ctx.notify(Sweep));
    }
}

/// A newly issued token: the secret is returned once and never again.
#[derive(Clone, Debug)]
pub struct Issued {
    pub row: TokenRow,
    pub token: String,
}

#[derive(Message)]
#[rtype(result = "Result<Issued, String>")]
pub struct Issue {
    pub user: AccountName,
    pub kind: TokenKind,
    pub ttl: Duration,
    /// A time it may not outlive (the credential minting it).
    pub not_after: Option<i64>,
    pub description: String,
    pub scopes: Vec<String>,
    /// The access token minting this one (revoked with it).
    pub parent: Option<String>,
}

impl Handler<Issue> for TokenActor {
    type Result = AtomicResponse<Self, Result<Issued, String>>;

    fn handle(&mut self, m: Issue, _: &mut Self::Context) -> Self::Result {
        let (meta, view) = (self.meta.clone(), self.view.clone());
        AtomicResponse::new(Box::pin(
            async move {
                let id = {
                    let mut b = [0u8; 8];
                    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
                    hex::encode(b)
                };
                let secret = random_token(32);
                let now = now_ms();
                let row = TokenRow {
                    id: id.clone(),
                    user: m.user,
                    kind: m.kind,
                    secret_sha256: sha256_hex(secret.as_bytes()),
                    description: m.description,
                    created_ms: now,
                    expires_ms: (now + m.ttl.as_millis() as i64).min(m.not_after.unwrap_or(i64::MAX)),
                    last_used_ms: None,
                    scopes: Some(m.scopes),
                    parent: m.parent,
                };
                // Persist first: a token the store does not know cannot survive a restart.
                meta.put_token(&row).await.map_err(|e| e.to_string())?;
                view.write().unwrap().insert(id.clone(), row.clone());
                Ok(Issued { row, token: format!("{PREFIX}{id}_{secret}") })
            }
            .into_actor(self),
        ))
    }
}

/// Revoke tokens by id (returns how many existed).
#[derive(Message)]
#[rtype(result = "Result<usize, String>")]
pub struct Revoke(pub Vec<String>);

impl Handler<Revoke> for TokenActor {
    type Result = AtomicResponse<Self, Result<usize, String>>;

    fn handle(&mut self, m: Revoke, _: &mut Self::Context) -> Self::Result {
        // With every token minted from them, and from those, and so on.
        let ids = {
            let v = self.view.read().unwrap();
            // Who minted what, in one pass over the view.
            let mut minted: HashMap<&str, Vec<&str>> = HashMap::new();
            for t in v.values() {
                if let Some(p) = &t.parent {
                    minted.entry(p.as_str()).or_default().push(t.id.as_str());
                }
            }
            let mut ids = m.0.clone();
            let mut i = 0;
            while i < ids.len() {
                if let Some(children) = minted.remove(ids[i].as_str()) {
                    ids.extend(children.into_iter().map(str::to_owned));
                }
                i += 1;
            }
            ids
        };
        // Out of the view first: from this moment the token no longer validates here.
        let n = {
            let mut v = self.view.write().unwrap();
            ids.iter().filter(|id| v.remove(id.as_str()).is_some()).count()
        };
        for id in &ids {
            self.touched.remove(id);
        }
        let m = Revoke(ids);
        let meta = self.meta.clone();
        AtomicResponse::new(Box::pin(
            async move {
                meta.delete_tokens(&m.0).await.map_err(|e| e.to_string())?;
                Ok(n)
            }
            .into_actor(self),
        ))
    }
}

/// A token was used (fire and forget; persisted in batches by the sweep).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Touch(pub String);

impl Handler<Touch> for TokenActor {
    type Result = ();
    fn handle(&mut self, m: Touch, _: &mut Self::Context) {
        let now = now_ms();
        if let Some(row) = self.view.write().unwrap().get_mut(&m.0) {
            row.last_used_ms = Some(now);
            self.touched.insert(m.0, now);
        }
    }
}

/// Expire tokens, flush last-use times, and pick up tokens issued or revoked on
/// other replicas.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sweep;

impl Handler<Sweep> for TokenActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Sweep, _: &mut Self::Context) -> Self::Result {
        let now = now_ms();
        let expired: Vec<String> = {
            let mut v = self.view.write().unwrap();
            let ids: Vec<String> = v.values().filter(|r| r.expires_ms <= now).map(|r| r.id.clone()).collect();
            for id in &ids {
                v.remove(id);
            }
            ids
        };
        let touched: Vec<(String, i64)> = self.touched.drain().collect();
        let (meta, view) = (self.meta.clone(), self.view.clone());
        AtomicResponse::new(Box::pin(
            async move {
                if let Err(e) = meta.delete_tokens(&expired).await {
                    tracing::warn!(error = %e, "deleting expired tokens");
                }
                if !expired.is_empty() {
                    tracing::info!(count = expired.len(), "expired tokens swept");
                }
                if let Err(e) = meta.touch_tokens(&touched).await {
                    tracing::warn!(error = %e, "recording token use");
                }
                match meta.tokens().await {
                    Ok(rows) => {
                        let mut v = view.write().unwrap();
                        let last_used: HashMap<String, i64> =
                            v.values().filter_map(|r| r.last_used_ms.map(|t| (r.id.clone(), t))).collect();
                        v.clear();
                        for mut r in rows.into_iter().filter(|r| r.expires_ms > now) {
                            if let Some(t) = last_used.get(&r.id) {
                                r.last_used_ms = r.last_used_ms.max(Some(*t));
                            }
                            v.insert(r.id.clone(), r);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "refreshing tokens"),
                }
            }
            .into_actor(self),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_format() {
        assert_eq!(split("bt_0123456789abcdef_secret"), Some(("0123456789abcdef", "secret")));
        for bad in ["", "bt_", "bt_0123_x", "xx_0123456789abcdef_s", "bt_0123456789abcdef_", "bt_0123456789abcdeg_s"] {
            assert_eq!(split(bad), None, "{bad}");
        }
    }

    #[test]
    fn validation_checks_secret_kind_and_expiry() {
        let view: TokenView = Default::default();
        let row = TokenRow {
            id: "0123456789abcdef".into(),
            user: "alice".parse().unwrap(),
            kind: TokenKind::Access,
            secret_sha256: sha256_hex(b"s3cret"),
            description: String::new(),
            created_ms: 0,
            expires_ms: 100,
            last_used_ms: None,
            scopes: None,
            parent: None,
        };
        view.write().unwrap().insert(row.id.clone(), row);
        assert!(validate(&view, "bt_0123456789abcdef_s3cret", TokenKind::Access, 50).is_some());
        assert!(validate(&view, "bt_0123456789abcdef_s3creT", TokenKind::Access, 50).is_none());
        assert!(validate(&view, "bt_0123456789abcdef_s3cret", TokenKind::Refresh, 50).is_none());
        assert!(validate(&view, "bt_0123456789abcdef_s3cret", TokenKind::Access, 100).is_none());
        assert!(validate(&view, "bt_fedcba9876543210_s3cret", TokenKind::Access, 50).is_none());
    }
}
