//! Authentication and authorization for Berth.
//!
//! [`Auth`] answers two questions for every request, centrally, before a handler
//! runs: *who is this* ([`Auth::authenticate`]: anonymous, Basic with a password or
//! a registry access token, or a Bearer token this registry signed) and *may they
//! do this* ([`Auth::authorize`]: the casbin [`policy::Policy`] decides, and a
//! bearer token additionally limits what its `access` claim lists).
//!
//! It also owns the account lifecycle: tenants and their namespaces, users with
//! argon2id passwords, registry access tokens (through [`tokens::TokenActor`]),
//! signing-key rotation, public repositories and cross-tenant shares — the last
//! two are nothing but policy rules.
//!
//! Architecture invariants:
//! - No secret is stored or logged in the clear: passwords are argon2id hashes,
//!   tokens are SHA-256 hashes compared in constant time.
//! - Every authorization decision goes through [`policy::Policy::check`]; nothing
//!   else in Berth decides access.
//! - This crate knows nothing of HTTP; it returns [`Refusal`]s the HTTP layer renders.

pub mod audit;
pub mod identity;
pub mod limiter;
pub mod policy;
pub mod rules;
pub mod secret;
pub mod tokens;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::{Actor, Addr};
use actix_rt::ArbiterHandle;
use base64::Engine;
use berth_metadata::{
    Metadata, NamespacePatch, NamespaceProfile, NamespaceRow, NamespaceStats, NsShareRow, PolicyRuleRow, ShareRow, SigningKeyRow,
    TenantRow, TokenKind, TokenRow, UserRow,
};
use berth_oci::{AccountName, ErrorCode, RegistryError, RepoName};
use serde::Deserialize;

pub use identity::{Action, Credential, Grant, Identity, Principal, Scope, TOKEN_SCOPES};
pub use policy::Decision;

/// What a listing learns of one repository ([`Auth::listing`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Listed {
    pub allowed: bool,
    pub public: bool,
}
use secret::{Claims, KeyRing};
use tokens::{TokenActor, TokenView};

/// The casbin domain of platform-wide objects (no tenant can be called "").
pub const PLATFORM_DOMAIN: &str = "";
/// The bootstrap administrator.
pub const ADMIN_USER: &str = "admin";

/// Tenant roles a user can be given.
pub const ROLES: [&str; 4] = ["tenant-admin", "maintainer", "developer", "reader"];

/// Authentication and authorization settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The URL clients reach Berth at (e.g. `https://registry.example.com`); the
    /// token realm is built from it. Unset: taken from the request's Host.
    pub external_url: Option<String>,
    /// Behind a reverse proxy: take the scheme and host from `X-Forwarded-Proto`
    /// and `X-Forwarded-Host`, and the client's address from `X-Forwarded-For`
    /// (see [`AuthConfig::trusted_proxies`]).
    pub trust_proxy: bool,
    /// The proxies' networks (e.g. `10.0.0.0/8`). The client is the right-most
    /// `X-Forwarded-For` hop not in them, provided the connection itself comes
    /// from one; a client cannot choose its address by sending the header. Empty:
    /// the connection's peer is the one proxy, and the hop it appended is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The `service` of the token challenge and the audience of bearer tokens.
    pub service: String,
    /// Lifetime of bearer tokens from `/auth/token`.
    pub bearer_ttl_secs: u64,
    /// Default and largest lifetime of registry access tokens.
    pub access_token_default_secs: u64,
    pub access_token_max_secs: u64,
    /// Lifetime of refresh tokens (docker's identity token).
    pub refresh_token_secs: u64,
    /// Directory holding `model.conf` and `policy.csv`; unset: the built-in defaults.
    pub policy_dir: Option<PathBuf>,
    /// Failed logins a (user, source) pair makes before each further one waits
    /// (5 s, doubling); a source gets ten times as many across all users.
    pub login_max_failures: u32,
    /// The longest such wait, and how long after its last failure a count is kept.
    pub login_window_secs: u64,
    /// Password of the bootstrap `admin` (also `BERTH_ADMIN_PASSWORD`); when
    /// unset on first start, one is generated and printed once.
    pub admin_password: Option<String>,
    /// How often policy, shares, signing keys and tokens are refreshed.
    pub refresh_secs: u64,
    /// How long the security audit log keeps its events.
    pub audit_keep_days: u64,
    /// How far clocks may be apart: bearer tokens are accepted this long past
    /// their expiry, and a retired signing key verifies this much longer.
    pub clock_skew_secs: u64,
    /// The file holding the master key that seals signing keys in the database
    /// (64 hex digits; also `BERTH_MASTER_KEY_FILE`). Every replica needs the
    /// same. Unset with the embedded store: `<data_dir>/master.key`, generated
    /// on first start.
    pub master_key_file: Option<PathBuf>,
    /// Live access tokens one user may hold (a further one is refused), and
    /// refresh tokens (a further one retires their oldest).
    pub max_tokens_per_user: usize,
    /// Generate the master key file when it is missing (the embedded default).
    #[serde(skip)]
    pub generate_master_key: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            external_url: None,
            trust_proxy: false,
            trusted_proxies: Vec::new(),
            service: "berth".into(),
            bearer_ttl_secs: 300,
            access_token_default_secs: 12 * 3600,
            access_token_max_secs: 30 * 24 * 3600,
            refresh_token_secs: 7 * 24 * 3600,
            policy_dir: None,
            login_max_failures: 5,
            login_window_secs: 300,
            admin_password: None,
            refresh_secs: 2,
            audit_keep_days: 90,
            clock_skew_secs: 30,
            master_key_file: None,
            max_tokens_per_user: 100,
            generate_master_key: false,
        }
    }
}

impl AuthConfig {
    /// The client's address: the connection's `peer`, or behind trusted proxies
    /// the right-most hop of `X-Forwarded-For` (comma-separated, each header's
    /// values in order) that is not a trusted proxy.
    pub fn client_address<'a>(&self, peer: Option<IpAddr>, forwarded_for: impl DoubleEndedIterator<Item = &'a str>) -> Option<IpAddr> {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|n| n.contains(ip));
        let mut client = peer?;
        if !self.trust_proxy || !(self.trusted_proxies.is_empty() || trusted(&client)) {
            return Some(client);
        }
        for (i, hop) in forwarded_for.rev().flat_map(|h| h.rsplit(',')).enumerate() {
            // Past the first hop, only a trusted proxy's word is taken.
            if i > 0 && !trusted(&client) {
                break;
            }
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => client = ip,
                Err(_) => break,
            }
        }
        Some(client)
    }
}

/// Why a request is refused; the HTTP layer renders each kind.
#[derive(Debug)]
pub enum Refusal {
    /// 401 with a `WWW-Authenticate: Bearer` challenge for `scope`.
    Challenge { error: RegistryError, scope: Option<String> },
    /// 403: authenticated, but policy says no.
    Denied(RegistryError),
    /// 429 with `Retry-After`.
    Throttled { error: RegistryError, retry_after_secs: u64 },
    /// Any other error (bad request, internal).
    Error(RegistryError),
}

impl From<RegistryError> for Refusal {
    fn from(e: RegistryError) -> Self {
        Refusal::Error(e)
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> RegistryError {
    tracing::error!(error = %e, "{what} failed");
    RegistryError::internal().with_detail(format!("{what} failed"))
}

fn unauthorized(detail: &str) -> Refusal {
    Refusal::Challenge { error: RegistryError::new(ErrorCode::Unauthorized).with_detail(detail.to_owned()), scope: None }
}

fn denied(detail: String) -> RegistryError {
    RegistryError::new(ErrorCode::Denied).with_detail(detail)
}

/// A bearer token issued by `/auth/token`.
pub struct BearerToken {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: i64,
    pub refresh_token: Option<String>,
}

/// What the token endpoint was given to prove identity.
pub enum Login<'a> {
    Anonymous,
    Password { user: &'a str, secret: &'a str },
    Refresh { token: &'a str },
}

/// The service.
pub struct Auth {
    meta: Metadata,
    config: AuthConfig,
    policy: policy::Policy,
    keys: KeyRing,
    /// When the last reload of the keys for a token signed with a key this
    /// replica did not know began (see [`Auth::verify_bearer`]).
    keys_reloaded: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    master: secret::MasterKey,
    tokens: TokenView,
    token_actor: Addr<TokenActor>,
    namespaces: RwLock<HashMap<String, AccountName>>,
    limiter: limiter::Limiter,
    audit: audit::Audit,
    /// Recently verified Basic credentials (hash of `user:secret` → user, expiry),
    /// so simple clients sending Basic on every request do not pay argon2 each time.
    verified: Mutex<HashMap<String, (AccountName, i64)>>,
    /// When [`Auth::refresh`] last asked which users' credentials changed.
    users_checked_ms: std::sync::atomic::AtomicI64,
    /// Users whose credentials ever changed: when last (the password epoch
    /// bearer tokens minted from a password carry), and whether disabled.
    changed: RwLock<HashMap<AccountName, (i64, bool)>>,
    /// Bounds concurrent argon2 verifications (each takes ~19 MiB and tens of ms of
    /// a core) to the core count, so a burst of logins neither exhausts memory nor
    /// starves request handling, and a burst with one credential hashes it once.
    hashing: tokio::sync::Semaphore,
    /// The bootstrap admin password, when it was generated on this start.
    pub generated_admin_password: Option<String>,
    /// Whether a repository exists (decisions about others are not cached).
    repo_exists: RepoProbe,
}

/// Answers whether a repository exists (the registry's index).
pub type RepoProbe = Box<dyn Fn(&RepoName) -> bool + Send + Sync>;

const VERIFIED_TTL_MS: i64 = 60_000;
/// How far replicas' clocks may disagree on when a credential changed.
const CLOCK_SKEW_MS: i64 = 10_000;
/// The least time between two reloads of the signing keys for tokens signed
/// with a key this replica does not know.
const UNKNOWN_KEY_RELOAD: Duration = Duration::from_secs(1);

impl Auth {
    /// Load keys, policy, namespaces and tokens; create the bootstrap admin on
    /// first start; start the token actor on `arbiter` and the refresh loop.
    pub async fn open(meta: Metadata, config: AuthConfig, arbiter: &ArbiterHandle, repo_exists: RepoProbe) -> Result<Arc<Auth>, String> {
        let policy = policy::Policy::open(meta.clone(), config.policy_dir.clone()).await?;
        policy.upgrade_push_shares().await?;
        let master = match &config.master_key_file {
            Some(path) => secret::MasterKey::load(path, config.generate_master_key)?,
            None => return Err("no master key: set [auth] master_key_file (BERTH_MASTER_KEY_FILE), the same file on every replica".into()),
        };
        let keys = load_keys(&meta, &master, config.generate_master_key).await?;
        let generated_admin_password = bootstrap_admin(&meta, config.admin_password.as_deref()).await?;
        let now = tokens::now_ms();
        let view: TokenView = Arc::new(RwLock::new(
            meta.tokens()
                .await
                .map_err(|e| format!("loading tokens: {e}"))?
                .into_iter()
                .filter(|t| t.expires_ms > now)
                .map(|t| (t.id.clone(), t))
                .collect(),
        ));
        let (m, v) = (meta.clone(), view.clone());
        let sweep = Duration::from_secs(config.refresh_secs.max(1) * 15);
        let token_actor = TokenActor::start_in_arbiter(arbiter, move |_| TokenActor::new(m, v, sweep));
        let limiter = limiter::Limiter::new(config.login_max_failures, Duration::from_secs(config.login_window_secs));
        let audit = audit::Audit::start(meta.clone(), Duration::from_secs(config.audit_keep_days.max(1) * 86_400));
        let changed = meta
            .users_changed_since(0)
            .await
            .map_err(|e| format!("loading users: {e}"))?
            .into_iter()
            .map(|c| (c.name, (c.changed_ms, c.disabled)))
            .collect();
        let auth = Arc::new(Auth {
            meta,
            config,
            policy,
            keys,
            keys_reloaded: tokio::sync::Mutex::new(None),
            master,
            tokens: view,
            token_actor,
            namespaces: RwLock::new(HashMap::new()),
            limiter,
            audit,
            verified: Mutex::new(HashMap::new()),
            users_checked_ms: std::sync::atomic::AtomicI64::new(now),
            changed: RwLock::new(changed),
            hashing: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
            generated_admin_password,
            repo_exists,
        });
        auth.refresh_namespaces().await.map_err(|e| e.to_string())?;
        let weak = Arc::downgrade(&auth);
        let every = Duration::from_secs(auth.config.refresh_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(auth) = weak.upgrade() else { break };
                auth.refresh().await;
            }
        });
        Ok(auth)
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Store the audit events still queued (at shutdown, before the metadata store closes).
    pub async fn close(&self) {
        self.audit.close().await;
    }

    pub fn policy(&self) -> &policy::Policy {
        &self.policy
    }

    /// One refresh tick: policy from the store and the seed file, expired
    /// shares, namespaces and signing keys from other replicas.
    pub async fn refresh(&self) {
        if let Err(e) = self.policy.poll().await {
            tracing::warn!(error = %e, "policy refresh");
        }
        if let Err(e) = self.expire_shares().await {
            tracing::warn!(error = %e.detail_or_message(), "share expiry");
        }
        if let Err(e) = self.refresh_namespaces().await {
            tracing::warn!(error = %e.detail_or_message(), "namespace refresh");
        }
        // Credentials other replicas changed: verified passwords of those users
        // are checked again (a changed password stops working within a tick).
        let since = self.users_checked_ms.swap(tokens::now_ms(), std::sync::atomic::Ordering::Relaxed);
        match self.meta.users_changed_since(since - CLOCK_SKEW_MS).await {
            Ok(users) if !users.is_empty() => {
                self.verified.lock().unwrap().retain(|_, (u, _)| !users.iter().any(|c| c.name == *u));
                let mut changed = self.changed.write().unwrap();
                for c in users {
                    changed.insert(c.name, (c.changed_ms, c.disabled));
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "user changes refresh");
                self.users_checked_ms.store(since, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.reload_keys().await;
    }

    /// The signing keys from the store: other replicas' rotations and retirements.
    async fn reload_keys(&self) {
        match self.meta.signing_keys().await {
            Ok(rows) => {
                let keys = self.verifying_keys(rows);
                if keys.is_empty() {
                    tracing::error!("no signing key can be opened with this master key; keeping the keys loaded before");
                } else {
                    self.keys.replace(keys);
                }
            }
            Err(e) => tracing::warn!(error = %e, "signing keys refresh"),
        }
    }

    /// Verify a bearer token. Over a shared store, one signed with a key this
    /// replica does not know may come from another replica that has just created or
    /// rotated its key (replicas starting together each create one; a rotation
    /// signs at once with the new key): the keys are reloaded then, before the next
    /// refresh tick, and the token checked again. Such reloads run one at a time,
    /// at least [`UNKNOWN_KEY_RELOAD`] apart, and a token that arrived before one
    /// began is checked against it: made-up key ids wait, but cannot load the store
    /// with more than one small query a second.
    async fn verify_bearer(&self, token: &str) -> Result<Claims, secret::JwtError> {
        let verify = || self.keys.verify(token, &self.config.service, now_secs(), self.config.clock_skew_secs as i64);
        match verify() {
            // Alone on an embedded store, every key was made here and is known.
            Err(secret::JwtError::UnknownKey) if self.meta.is_shared() => {
                let arrived = tokio::time::Instant::now();
                let mut last = self.keys_reloaded.lock().await;
                if last.is_none_or(|began| began < arrived) {
                    if let Some(began) = *last {
                        tokio::time::sleep_until(began + UNKNOWN_KEY_RELOAD).await;
                    }
                    *last = Some(tokio::time::Instant::now());
                    self.reload_keys().await;
                }
                drop(last);
                verify()
            }
            r => r,
        }
    }

    /// The keys that verify now, current last: the current one and those
    /// retired less than the longest bearer lifetime (plus clock skew) ago. A
    /// key retired longer ago, or dropped by an emergency rotation, verifies
    /// nothing on any node from its next refresh.
    fn verifying_keys(&self, mut rows: Vec<SigningKeyRow>) -> Vec<(String, Vec<u8>)> {
        let window_ms = (self.config.bearer_ttl_secs + self.config.clock_skew_secs) as i64 * 1000;
        let now = tokens::now_ms();
        rows.retain(|k| k.retired_ms.is_none_or(|r| r + window_ms > now));
        rows.sort_by_key(|k| (k.retired_ms.is_none(), k.created_ms));
        rows.into_iter()
            .filter_map(|k| {
                let secret = k.sealed.as_deref().and_then(|s| self.master.open(&k.kid, s));
                if secret.is_none() {
                    tracing::warn!(kid = %k.kid, "a signing key cannot be opened with this master key");
                }
                secret.map(|s| (k.kid, s))
            })
            .collect()
    }

    async fn refresh_namespaces(&self) -> Result<(), RegistryError> {
        let rows = self.meta.namespaces().await.map_err(|e| internal("loading namespaces", e))?;
        *self.namespaces.write().unwrap() = rows.into_iter().map(|n| (n.name.to_string(), n.tenant)).collect();
        Ok(())
    }

    /// The tenant owning a repository's namespace, if any.
    pub fn tenant_of(&self, repo: &RepoName) -> Option<AccountName> {
        self.namespaces.read().unwrap().get(repo.namespace()).cloned()
    }

    /// The namespaces a tenant owns.
    pub fn namespaces_of(&self, tenant: &AccountName) -> Vec<AccountName> {
        let ns = self.namespaces.read().unwrap();
        let mut out: Vec<AccountName> = ns.iter().filter(|(_, t)| *t == tenant).filter_map(|(n, _)| n.parse().ok()).collect();
        out.sort();
        out
    }

    fn domain_of(&self, repo: &RepoName) -> String {
        self.tenant_of(repo).map(|t| t.to_string()).unwrap_or_default()
    }

    // ----- authentication -----

    /// Authenticate a request from its `Authorization` header and source address.
    pub async fn authenticate(&self, authorization: Option<&str>, source: &str) -> Result<Identity, Refusal> {
        let Some(h) = authorization else { return Ok(Identity::anonymous()) };
        let (scheme, value) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let (user, secret) = decode_basic(value.trim()).ok_or_else(|| unauthorized("malformed Basic credentials"))?;
                let (user, credential) = self.login(&user, &secret, source).await?;
                Ok(Identity { principal: Principal::User(user), credential })
            }
            "bearer" => {
                let claims = self.verify_bearer(value.trim()).await.map_err(|e| {
                    // One answer for every failed check: which one failed (format,
                    // key id, signature, lifetime, audience) would guide a forger.
                    tracing::debug!(reason = %e, source, "bearer token refused");
                    unauthorized("invalid or expired bearer token")
                })?;
                if let Some(tid) = &claims.tid {
                    if !self.token_known(tid).await {
                        return Err(unauthorized("the access token behind this bearer token was revoked or expired"));
                    }
                }
                let principal = if claims.sub.is_empty() {
                    Principal::Anonymous
                } else {
                    let user: AccountName = claims.sub.parse().map_err(|_| unauthorized("invalid bearer token subject"))?;
                    let (epoch, disabled) = self.user_state(&user);
                    if disabled {
                        return Err(unauthorized("the user is disabled"));
                    }
                    // Minted from a password that has changed since.
                    if claims.pe.is_some_and(|pe| pe != epoch) {
                        return Err(unauthorized("the password this bearer token was issued for has changed"));
                    }
                    Principal::User(user)
                };
                Ok(Identity { principal, credential: Credential::Bearer(claims.access) })
            }
            _ => Err(unauthorized("unsupported Authorization scheme (use Basic or Bearer)")),
        }
    }

    /// Check a user name with a password or a registry access token. Failed
    /// password logins slow further attempts from their source ([`limiter`]);
    /// a valid access token is never held back by them (its 256 random bits
    /// cannot be guessed, so throttling protects nothing there).
    pub async fn login(&self, user: &str, secret: &str, source: &str) -> Result<(AccountName, Credential), Refusal> {
        let source = limiter::Source::parse(source);
        let name = user.parse::<AccountName>().ok();
        let throttled = |wait: u64| Refusal::Throttled {
            error: RegistryError::new(ErrorCode::TooManyRequests).with_detail("too many failed logins; try again later"),
            retry_after_secs: wait,
        };
        let fail = || {
            self.limiter.fail(name.as_ref(), &source);
            self.audit.record("login-failed", Some(user), Some(&source.to_string()), None, None);
            unauthorized("invalid username or password")
        };
        if tokens::split(secret).is_some() {
            if let Some(name) = &name {
                if let Some(row) = self.validate_token(secret, TokenKind::Access).await.filter(|r| r.user == *name) {
                    if self.user_state(name).1 {
                        return Err(unauthorized("the user is disabled"));
                    }
                    self.token_actor.do_send(tokens::Touch(row.id.clone()));
                    self.limiter.succeed(name, &source);
                    let scopes = row.scopes.clone().unwrap_or_else(|| TOKEN_SCOPES.map(String::from).to_vec());
                    return Ok((name.clone(), Credential::AccessToken { id: row.id, scopes, expires_ms: row.expires_ms }));
                }
            }
            self.limiter.check(name.as_ref(), &source).map_err(throttled)?;
            return Err(fail());
        }
        self.limiter.check(name.as_ref(), &source).map_err(throttled)?;
        let Some(name) = name.clone() else { return Err(fail()) };
        if self.user_state(&name).1 {
            return Err(unauthorized("the user is disabled"));
        }
        let key = secret::sha256_hex(format!("{user}\0{secret}").as_bytes());
        if let Some(u) = self.recently_verified(&key) {
            return Ok((u, Credential::Password));
        }
        let _permit = self.hashing.acquire().await.map_err(|e| Refusal::Error(internal("login", e)))?;
        // Another request may have verified the same credential while this one waited.
        if let Some(u) = self.recently_verified(&key) {
            return Ok((u, Credential::Password));
        }
        let now = tokens::now_ms();
        let row = self.meta.user(&name).await.map_err(|e| Refusal::Error(internal("loading user", e)))?;
        // Unknown users still pay for a hash, so timing does not reveal who exists.
        let phc = row.as_ref().map(|r| r.password_hash.clone()).unwrap_or_else(|| DUMMY_HASH.clone());
        let pw = secret.to_owned();
        let ok = tokio::task::spawn_blocking(move || secret::verify_password(&pw, &phc)).await.unwrap_or(false);
        if !(ok && row.is_some()) {
            return Err(fail());
        }
        self.limiter.succeed(&name, &source);
        self.audit.record("login", Some(name.as_str()), Some(&source.to_string()), None, Some("password".into()));
        let mut v = self.verified.lock().unwrap();
        if v.len() > 10_000 {
            v.retain(|_, (_, until)| *until > now);
        }
        v.insert(key, (name.clone(), now + VERIFIED_TTL_MS));
        Ok((name, Credential::Password))
    }

    /// A user's password epoch (when their credentials last changed; 0 if
    /// never) and whether they are disabled, as this node last heard.
    fn user_state(&self, user: &AccountName) -> (i64, bool) {
        self.changed.read().unwrap().get(user).copied().unwrap_or((0, false))
    }

    fn recently_verified(&self, key: &str) -> Option<AccountName> {
        let now = tokens::now_ms();
        self.verified.lock().unwrap().get(key).filter(|(_, until)| *until > now).map(|(u, _)| u.clone())
    }

    // ----- authorization -----

    /// The policy decision for a principal, action and repository.
    pub fn decide(&self, principal: &Principal, repo: &RepoName, action: Action) -> Decision {
        self.policy.check_object(principal.subject(), &self.domain_of(repo), repo.as_str(), action.as_str(), || (self.repo_exists)(repo))
    }

    /// Whether `identity` may do `action` on `repo` (policy and token scope).
    pub fn can(&self, identity: &Identity, repo: &RepoName, action: Action) -> bool {
        identity.credential_allows(repo, action) && self.decide(&identity.principal, repo, action).allowed
    }

    /// The catalog filter: a repository belongs in the caller's catalog when
    /// policy lets them pull it, once the credential may list the catalog at all
    /// (a bearer token's catalog grant lists every repository its user may pull,
    /// not only those its repository grants name). The caller's roles are
    /// resolved once for the whole listing, which `list` makes.
    pub fn catalog<T>(&self, identity: &Identity, list: impl FnOnce(&mut dyn FnMut(&RepoName) -> bool) -> T) -> T {
        if !identity.may_list_catalog() {
            return list(&mut |_| false);
        }
        let namespaces = self.namespaces.read().unwrap();
        self.policy.for_subject(identity.principal.subject(), |check| {
            list(&mut |repo: &RepoName| {
                let domain = namespaces.get(repo.namespace()).map_or("", |t| t.as_str());
                check(domain, repo.as_str(), Action::Pull.as_str())
            })
        })
    }

    /// A listing's filter: for each repository, whether `identity` may do
    /// `action` on it (policy and credential, as [`Auth::can`]) and whether it
    /// is public (as [`Auth::is_public`]). The caller's roles are resolved and
    /// the public rules gathered once for the whole listing, which `list` makes.
    pub fn listing<T>(&self, identity: &Identity, action: Action, list: impl FnOnce(&mut dyn FnMut(&RepoName) -> Listed) -> T) -> T {
        let namespaces = self.namespaces.read().unwrap();
        let public = self.policy.public_objects();
        self.policy.for_subject(identity.principal.subject(), |check| {
            list(&mut |repo: &RepoName| {
                let domain = namespaces.get(repo.namespace()).map_or("", |t| t.as_str());
                Listed {
                    allowed: identity.credential_allows(repo, action) && check(domain, repo.as_str(), action.as_str()),
                    public: !domain.is_empty() && public.get(repo.as_str()).is_some_and(|ds| ds.iter().any(|d| d == domain)),
                }
            })
        })
    }

    /// Allow, or say how to refuse: anonymous callers and bearer tokens lacking
    /// the scope get a challenge (so clients fetch a token), authenticated users
    /// whom policy refuses get 403.
    pub fn authorize(&self, identity: &Identity, repo: &RepoName, action: Action) -> Result<(), Refusal> {
        let policy_ok = self.decide(&identity.principal, repo, action).allowed;
        if policy_ok && identity.credential_allows(repo, action) {
            return Ok(());
        }
        let scope = Some(identity::challenge_scope(repo, action));
        match (&identity.principal, policy_ok) {
            (Principal::User(u), false) => Err(Refusal::Denied(denied(format!("{u} may not {action} {repo}")))),
            _ => Err(Refusal::Challenge {
                error: RegistryError::new(ErrorCode::Unauthorized).with_detail(format!("authentication required to {action} {repo}")),
                scope,
            }),
        }
    }

    /// Refuse unless `who` is a platform administrator.
    pub fn require_platform_admin(&self, who: &Principal) -> Result<(), RegistryError> {
        if self.policy.check(who.subject(), PLATFORM_DOMAIN, "*", "admin").allowed {
            Ok(())
        } else {
            Err(denied("platform administrator required".into()))
        }
    }

    /// Refuse unless `who` may see a tenant's own figures (its quotas): any member
    /// of it, or a platform administrator. Others are refused like an unknown tenant.
    pub fn require_tenant_member(&self, who: &Principal, tenant: &AccountName) -> Result<(), RegistryError> {
        if self.policy.check(who.subject(), tenant.as_str(), tenant.as_str(), "pull").allowed {
            Ok(())
        } else {
            Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no tenant {tenant}")))
        }
    }

    /// Refuse unless `who` administers `tenant` (or the platform).
    pub fn require_tenant_admin(&self, who: &Principal, tenant: &AccountName) -> Result<(), RegistryError> {
        if self.policy.check(who.subject(), tenant.as_str(), tenant.as_str(), "admin").allowed {
            Ok(())
        } else {
            Err(denied(format!("administrator of tenant {tenant} required")))
        }
    }

    fn require_repo_admin(&self, who: &Principal, repo: &RepoName) -> Result<AccountName, RegistryError> {
        let tenant = self
            .tenant_of(repo)
            .ok_or_else(|| RegistryError::new(ErrorCode::NameUnknown).with_detail(format!("no tenant owns the namespace of {repo}")))?;
        if self.decide(who, repo, Action::Admin).allowed {
            Ok(tenant)
        } else {
            Err(denied(format!("administrator of {repo} required")))
        }
    }

    /// Whether the token `id` exists: held here, or (with a metadata server
    /// shared by replicas) issued by another replica since the last refresh.
    async fn token_known(&self, id: &str) -> bool {
        if self.tokens.read().unwrap().contains_key(id) {
            return true;
        }
        if !self.meta.is_shared() {
            return false;
        }
        match self.meta.token(id).await {
            Ok(Some(row)) => {
                self.tokens.write().unwrap().entry(row.id.clone()).or_insert(row);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "looking up a token failed");
                false
            }
        }
    }

    /// A presented token checked against the tokens held here; with a
    /// metadata server shared by replicas, one not held yet (issued by another
    /// replica since the last refresh) is looked up there before it is refused.
    async fn validate_token(&self, token: &str, kind: TokenKind) -> Option<TokenRow> {
        let now = tokens::now_ms();
        if let Some(row) = tokens::validate(&self.tokens, token, kind, now) {
            return Some(row);
        }
        let (id, _) = tokens::split(token)?;
        if self.tokens.read().unwrap().contains_key(id) || !self.token_known(id).await {
            return None;
        }
        tokens::validate(&self.tokens, token, kind, now)
    }

    // ----- the token endpoint -----

    /// Issue a bearer token for the requested scopes, each cut down to what the
    /// policy allows the caller (docker's token flow and OAuth2's password and
    /// refresh_token grants).
    pub async fn token(&self, login: Login<'_>, scopes: &[Scope], offline: bool, source: &str) -> Result<BearerToken, Refusal> {
        let all = || TOKEN_SCOPES.map(String::from).to_vec();
        // What the bearer token may carry at most: the scopes and lifetime of the
        // credential behind it, the token it dies with (`tid`), or the password
        // epoch it dies with (`pe`).
        let (principal, allowed, cap_ms, tid, pe, parent) = match login {
            Login::Anonymous => (Principal::Anonymous, all(), None, None, None, None),
            Login::Password { user, secret } => match self.login(user, secret, source).await? {
                (u, Credential::AccessToken { id, scopes, expires_ms }) => {
                    (Principal::User(u), scopes, Some(expires_ms), Some(id.clone()), None, Some(id))
                }
                (u, _) => {
                    let epoch = self.user_state(&u).0;
                    (Principal::User(u), all(), None, None, Some(epoch), None)
                }
            },
            Login::Refresh { token } => match self.validate_token(token, TokenKind::Refresh).await {
                Some(row) if !self.user_state(&row.user).1 => {
                    self.token_actor.do_send(tokens::Touch(row.id.clone()));
                    let pe = row.parent.is_none().then(|| self.user_state(&row.user).0);
                    (Principal::User(row.user), row.scopes.unwrap_or_else(all), Some(row.expires_ms), Some(row.id), pe, row.parent)
                }
                _ => return Err(unauthorized("invalid or expired refresh token")),
            },
        };
        let mut access = Vec::new();
        for s in scopes {
            match s {
                Scope::Repository(repo, actions) => {
                    let granted: Vec<String> = actions
                        .iter()
                        .filter(|a| allowed.iter().any(|s| s == identity::scope_for(**a)))
                        .filter(|a| self.decide(&principal, repo, **a).allowed)
                        .map(|a| a.as_str().to_owned())
                        .collect();
                    access.push(Grant { kind: "repository".into(), name: repo.to_string(), actions: granted });
                }
                Scope::Catalog if principal != Principal::Anonymous && allowed.iter().any(|s| s == "pull") => {
                    access.push(Grant { kind: "registry".into(), name: "catalog".into(), actions: vec!["*".into()] });
                }
                Scope::Catalog => {}
            }
        }
        let now = now_secs();
        // Never outliving the credential it was minted from.
        let exp = (now + self.config.bearer_ttl_secs.max(1) as i64).min(cap_ms.map_or(i64::MAX, |ms| ms / 1000));
        let claims = Claims {
            iss: "berth".into(),
            sub: principal.user().map(|u| u.to_string()).unwrap_or_default(),
            aud: self.config.service.clone(),
            exp,
            nbf: now,
            iat: now,
            jti: secret::random_token(12),
            access,
            tid,
            pe,
        };
        let refresh_token = match (&principal, offline) {
            (Principal::User(u), true) => {
                // Each `docker login` makes one: past the cap the oldest retire.
                let mut refresh: Vec<(i64, String)> = self
                    .tokens
                    .read()
                    .unwrap()
                    .values()
                    .filter(|t| &t.user == u && t.kind == TokenKind::Refresh)
                    .map(|t| (t.created_ms, t.id.clone()))
                    .collect();
                refresh.sort();
                let excess = (refresh.len() + 1).saturating_sub(self.config.max_tokens_per_user.max(1));
                self.revoke_ids(refresh.into_iter().take(excess).map(|(_, id)| id).collect()).await?;
                let life = (Duration::from_secs(self.config.refresh_token_secs), cap_ms);
                let issued =
                    self.issue(u.clone(), TokenKind::Refresh, life, "refresh token".into(), allowed.clone(), parent.clone()).await?;
                let origin = parent.as_deref().map_or("a password".to_owned(), |p| format!("access token {p}"));
                self.audit.record(
                    "token-issued",
                    Some(u.as_str()),
                    Some(source),
                    Some(issued.row.id.clone()),
                    Some(format!("refresh token from {origin}")),
                );
                Some(issued.token)
            }
            _ => None,
        };
        Ok(BearerToken { token: self.keys.sign(&claims), expires_in: (exp - now).max(0) as u64, issued_at: now, refresh_token })
    }

    async fn issue(
        &self,
        user: AccountName,
        kind: TokenKind,
        (ttl, not_after): (Duration, Option<i64>),
        description: String,
        scopes: Vec<String>,
        parent: Option<String>,
    ) -> Result<tokens::Issued, RegistryError> {
        self.token_actor
            .send(tokens::Issue { user, kind, ttl, not_after, description, scopes, parent })
            .await
            .map_err(|e| internal("token actor", e))?
            .map_err(|e| internal("issuing token", e))
    }

    // ----- registry access tokens -----

    /// Issue a registry access token for the caller (default 12 h, capped).
    pub async fn issue_access_token(
        &self,
        identity: &Identity,
        ttl_secs: Option<u64>,
        description: String,
        scopes: Option<Vec<String>>,
    ) -> Result<tokens::Issued, RegistryError> {
        let who = &identity.principal;
        let user = who.user().ok_or_else(|| RegistryError::new(ErrorCode::Unauthorized).with_detail("log in to issue tokens"))?;
        let invalid = |m: String| RegistryError::new(ErrorCode::InvalidRequest).with_detail(m);
        let ttl = ttl_secs.unwrap_or(self.config.access_token_default_secs);
        if ttl == 0 || ttl > self.config.access_token_max_secs {
            return Err(invalid(format!("token lifetime must be 1 to {} seconds", self.config.access_token_max_secs)));
        }
        if description.len() > 256 {
            return Err(invalid("description longer than 256 characters".into()));
        }
        let scopes = match scopes {
            Some(s) if s.is_empty() => return Err(invalid("scopes: at least one of pull, push, manage".into())),
            Some(s) => {
                if let Some(bad) = s.iter().find(|x| !TOKEN_SCOPES.contains(&x.as_str())) {
                    return Err(invalid(format!("unknown scope {bad:?} (pull, push, manage)")));
                }
                TOKEN_SCOPES.iter().filter(|t| s.iter().any(|x| x == *t)).map(|t| t.to_string()).collect()
            }
            None => match &identity.credential {
                Credential::AccessToken { scopes, .. } => scopes.clone(),
                _ => TOKEN_SCOPES.map(String::from).to_vec(),
            },
        };
        let expires_ms = tokens::now_ms() + ttl as i64 * 1000;
        let (mut parent, mut not_after) = (None, None);
        // A token mints only what it has, for no longer than it lives.
        if let Credential::AccessToken { id, scopes: mine, expires_ms: until } = &identity.credential {
            if let Some(extra) = scopes.iter().find(|s| !mine.contains(s)) {
                return Err(denied(format!("this access token cannot grant the scope {extra:?} it does not have")));
            }
            if expires_ms > *until && ttl_secs.is_some() {
                return Err(invalid("a token cannot mint a token that outlives it".into()));
            }
            (parent, not_after) = (Some(id.clone()), Some(*until));
        }
        let live = self.tokens.read().unwrap().values().filter(|t| &t.user == user && t.kind == TokenKind::Access).count();
        if live >= self.config.max_tokens_per_user {
            return Err(RegistryError::new(ErrorCode::TooManyRequests).with_detail(format!(
                "{live} live access tokens (auth.max_tokens_per_user); revoke some first (berth token list, berth token revoke ID)"
            )));
        }
        let detail = format!("access token [{}], {ttl} s", scopes.join(" "));
        let life = (Duration::from_secs(ttl), not_after);
        let issued = self.issue(user.clone(), TokenKind::Access, life, description, scopes, parent).await?;
        self.audit.record("token-issued", Some(user.as_str()), None, Some(issued.row.id.clone()), Some(detail));
        Ok(issued)
    }

    /// The caller's access tokens (never their secrets).
    pub fn list_tokens(&self, who: &Principal) -> Vec<TokenRow> {
        let Some(user) = who.user() else { return Vec::new() };
        let mut rows: Vec<TokenRow> = self.tokens.read().unwrap().values().filter(|t| &t.user == user).cloned().collect();
        rows.sort_by_key(|t| t.created_ms);
        rows
    }

    /// Revoke one of the caller's tokens (a platform admin may revoke any).
    pub async fn revoke_token(&self, who: &Principal, id: &str) -> Result<(), RegistryError> {
        let owner = self.tokens.read().unwrap().get(id).map(|t| t.user.clone());
        let not_found = || RegistryError::new(ErrorCode::NotFound).with_detail(format!("no token {id:?}"));
        let owner = owner.ok_or_else(not_found)?;
        if who.user() != Some(&owner) && self.require_platform_admin(who).is_err() {
            return Err(not_found());
        }
        self.token_actor
            .send(tokens::Revoke(vec![id.to_owned()]))
            .await
            .map_err(|e| internal("token actor", e))?
            .map_err(|e| internal("revoking token", e))?;
        self.audit.record("token-revoked", who.user().map(|u| u.as_str()), None, Some(id.to_owned()), Some(format!("of {owner}")));
        Ok(())
    }

    // ----- tenants and users -----

    pub async fn create_tenant(&self, who: &Principal, name: AccountName) -> Result<(), RegistryError> {
        self.require_platform_admin(who)?;
        let created = self
            .meta
            .create_tenant(&TenantRow { name: name.clone(), created_ms: tokens::now_ms() })
            .await
            .map_err(|e| internal("creating tenant", e))?;
        if !created {
            return Err(RegistryError::new(ErrorCode::Conflict).with_detail(format!("tenant or namespace {name} exists")));
        }
        self.claimed(&name).await?;
        self.refresh_namespaces().await
    }

    /// Whether a tenant exists.
    pub async fn tenant_exists(&self, tenant: &AccountName) -> Result<bool, RegistryError> {
        Ok(self.meta.tenants().await.map_err(|e| internal("listing tenants", e))?.iter().any(|t| &t.name == tenant))
    }

    pub async fn tenants(&self, who: &Principal) -> Result<Vec<TenantRow>, RegistryError> {
        self.require_platform_admin(who)?;
        self.meta.tenants().await.map_err(|e| internal("listing tenants", e))
    }

    /// A namespace just got its tenant: if it already holds repositories (pushed
    /// while nobody owned it), their bytes now count for that tenant.
    async fn claimed(&self, ns: &AccountName) -> Result<(), RegistryError> {
        let stats = self.meta.namespace_stats(ns).await.map_err(|e| internal("namespace figures", e))?;
        if stats.repository_count > 0 {
            self.meta.recount_references().await.map_err(|e| internal("recount references", e))?;
            tracing::info!(namespace = %ns, repositories = stats.repository_count, "namespace claimed with repositories: references counted again");
        }
        Ok(())
    }

    /// Give a tenant another namespace (platform admin).
    pub async fn add_namespace(&self, who: &Principal, tenant: AccountName, ns: AccountName) -> Result<(), RegistryError> {
        self.require_platform_admin(who)?;
        if !self.meta.tenants().await.map_err(|e| internal("listing tenants", e))?.iter().any(|t| t.name == tenant) {
            return Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no tenant {tenant}")));
        }
        let created =
            self.meta.create_namespace(&NamespaceRow { name: ns.clone(), tenant }).await.map_err(|e| internal("creating namespace", e))?;
        if !created {
            return Err(RegistryError::new(ErrorCode::Conflict).with_detail(format!("namespace {ns} is taken")));
        }
        self.claimed(&ns).await?;
        self.refresh_namespaces().await
    }

    // ----- namespaces with profiles -----

    /// Whether `who` may see a namespace: a member of its tenant (any role) or a
    /// platform admin. Public repositories and shares do not reveal the namespace.
    pub fn namespace_readable(&self, who: &Principal, ns: &AccountName) -> bool {
        self.namespace_decision(who, ns, Action::Pull)
    }

    fn namespace_decision(&self, who: &Principal, ns: &AccountName, action: Action) -> bool {
        let Some(tenant) = self.namespaces.read().unwrap().get(ns.as_str()).cloned() else { return false };
        // The object is the bare namespace name: role rules (`*`) cover it; the
        // repository rules of public repositories and shares (`acme/app`) do not.
        self.policy.check(who.subject(), tenant.as_str(), ns.as_str(), action.as_str()).allowed
    }

    /// Refuse unless `who` administers the namespace (its tenant's admin, or the
    /// platform admin); an unknown namespace is refused the same way.
    pub fn require_namespace_admin(&self, who: &Principal, ns: &AccountName) -> Result<(), RegistryError> {
        if self.namespace_decision(who, ns, Action::Admin) {
            Ok(())
        } else {
            Err(denied(format!("administrator of namespace {ns} required")))
        }
    }

    /// Create a namespace for a tenant (that tenant's admin, or the platform admin).
    pub async fn create_namespace(&self, who: &Principal, p: NamespaceProfile) -> Result<(), RegistryError> {
        self.require_tenant_admin(who, &p.tenant)?;
        if !self.meta.tenants().await.map_err(|e| internal("listing tenants", e))?.iter().any(|t| t.name == p.tenant) {
            return Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no tenant {}", p.tenant)));
        }
        if !self.meta.create_namespace_profile(&p).await.map_err(|e| internal("creating namespace", e))? {
            return Err(RegistryError::new(ErrorCode::Conflict).with_detail(format!("namespace {} is taken", p.name)));
        }
        self.claimed(&p.name).await?;
        self.refresh_namespaces().await
    }

    /// The namespaces `who` may see, with their profiles.
    pub async fn visible_namespaces(&self, who: &Principal) -> Result<Vec<NamespaceProfile>, RegistryError> {
        let all = self.meta.namespace_profiles().await.map_err(|e| internal("listing namespaces", e))?;
        Ok(all.into_iter().filter(|n| self.namespace_readable(who, &n.name)).collect())
    }

    /// One namespace `who` may see, with its figures; unknown and unreadable
    /// namespaces are refused alike (no existence leak).
    pub async fn namespace(&self, who: &Principal, ns: &AccountName) -> Result<(NamespaceProfile, NamespaceStats), RegistryError> {
        let unknown = || RegistryError::new(ErrorCode::NotFound).with_detail(format!("no namespace {ns}"));
        if !self.namespace_readable(who, ns) {
            return Err(unknown());
        }
        let p = self.meta.namespace_profile(ns).await.map_err(|e| internal("reading namespace", e))?.ok_or_else(unknown)?;
        let st = self.namespace_stats(ns).await?;
        Ok((p, st))
    }

    pub async fn namespace_stats(&self, ns: &AccountName) -> Result<NamespaceStats, RegistryError> {
        self.meta.namespace_stats(ns).await.map_err(|e| internal("namespace figures", e))
    }

    pub async fn update_namespace(
        &self,
        who: &Principal,
        ns: &AccountName,
        patch: &NamespacePatch,
    ) -> Result<NamespaceProfile, RegistryError> {
        self.require_namespace_admin(who, ns)?;
        self.meta
            .update_namespace(ns, patch, tokens::now_ms())
            .await
            .map_err(|e| internal("updating namespace", e))?
            .ok_or_else(|| RegistryError::new(ErrorCode::NotFound).with_detail(format!("no namespace {ns}")))
    }

    /// Forget an emptied namespace (the caller deleted its repositories). A
    /// tenant's own namespace goes only with the tenant.
    pub async fn delete_namespace(&self, who: &Principal, ns: &AccountName) -> Result<(), RegistryError> {
        self.require_namespace_admin(who, ns)?;
        if self.tenant_of_namespace(ns).as_ref() == Some(ns) {
            return Err(RegistryError::new(ErrorCode::InvalidRequest).with_detail(format!("{ns} is its tenant's own namespace")));
        }
        // Its shares go with it: a later namespace of the same name starts unshared.
        if let Some(owner) = self.tenant_of_namespace(ns) {
            let rows = self.meta.ns_shares().await.map_err(|e| internal("listing shares", e))?;
            for s in rows.into_iter().filter(|s| &s.namespace == ns) {
                self.withdraw_ns_share(&owner, ns, &s.tenant).await?;
            }
        }
        self.meta.delete_namespace(ns).await.map_err(|e| internal("deleting namespace", e))?;
        self.refresh_namespaces().await
    }

    /// Whether repositories created in `ns` through the API start public.
    pub async fn namespace_public_default(&self, ns: &AccountName) -> Result<bool, RegistryError> {
        Ok(self.meta.namespace_profile(ns).await.map_err(|e| internal("reading namespace", e))?.is_some_and(|p| p.public_default))
    }

    /// The tenant a user belongs to (`None` for platform users).
    pub async fn tenant_of_user(&self, who: &Principal) -> Result<Option<AccountName>, RegistryError> {
        let Some(user) = who.user() else { return Ok(None) };
        Ok(self.meta.user(user).await.map_err(|e| internal("reading user", e))?.and_then(|u| u.tenant))
    }

    pub fn tenant_of_namespace(&self, ns: &AccountName) -> Option<AccountName> {
        self.namespaces.read().unwrap().get(ns.as_str()).cloned()
    }

    /// Create a user in a tenant with one of [`ROLES`] (tenant admin).
    pub async fn create_user(
        &self,
        who: &Principal,
        tenant: AccountName,
        name: AccountName,
        password: &str,
        role: &str,
    ) -> Result<(), RegistryError> {
        self.require_tenant_admin(who, &tenant)?;
        if !ROLES.contains(&role) {
            return Err(RegistryError::new(ErrorCode::InvalidRequest).with_detail(format!("role must be one of {}", ROLES.join(", "))));
        }
        check_password(password)?;
        if !self.meta.tenants().await.map_err(|e| internal("listing tenants", e))?.iter().any(|t| t.name == tenant) {
            return Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no tenant {tenant}")));
        }
        let pw = password.to_owned();
        let hash = tokio::task::spawn_blocking(move || secret::hash_password(&pw)).await.map_err(|e| internal("hashing", e))?;
        let row = UserRow { name: name.clone(), tenant: Some(tenant.clone()), password_hash: hash, created_ms: tokens::now_ms() };
        if !self.meta.create_user(&row).await.map_err(|e| internal("creating user", e))? {
            return Err(RegistryError::new(ErrorCode::Conflict).with_detail(format!("user {name} exists")));
        }
        let rules = [
            PolicyRuleRow { ptype: "g".into(), fields: vec![name.to_string(), format!("role:{role}"), tenant.to_string()] },
            PolicyRuleRow { ptype: "g2".into(), fields: vec![name.to_string(), format!("tenant:{tenant}")] },
        ];
        self.policy.change(&rules, &[]).await.map_err(|e| internal("granting role", e))?;
        self.audit.record(
            "user-created",
            who.user().map(|u| u.as_str()),
            None,
            Some(name.to_string()),
            Some(format!("{role} of {tenant}")),
        );
        Ok(())
    }

    /// Users visible to the caller: all for a platform admin, else the caller's tenant's.
    pub async fn users(&self, who: &Principal) -> Result<Vec<(AccountName, Option<AccountName>)>, RegistryError> {
        let rows = self.meta.users().await.map_err(|e| internal("listing users", e))?;
        let all = self.require_platform_admin(who).is_ok();
        Ok(rows
            .into_iter()
            .filter(|u| all || u.tenant.as_ref().is_some_and(|t| self.require_tenant_admin(who, t).is_ok()))
            .map(|u| (u.name, u.tenant))
            .collect())
    }

    /// Change the caller's own password.
    pub async fn change_password(&self, identity: &Identity, current: &str, password: &str, source: &str) -> Result<(), RegistryError> {
        let user = identity.principal.user().ok_or_else(|| RegistryError::new(ErrorCode::Unauthorized))?;
        if identity.credential != Credential::Password {
            return Err(denied("changing the password needs a password login, not a token".into()));
        }
        check_password(password)?;
        // The current password, again: a session someone else left open does not do.
        let row = self
            .meta
            .user(user)
            .await
            .map_err(|e| internal("loading user", e))?
            .ok_or_else(|| RegistryError::new(ErrorCode::NotFound).with_detail("no such user"))?;
        let (pw, phc) = (current.to_owned(), row.password_hash);
        if !tokio::task::spawn_blocking(move || secret::verify_password(&pw, &phc)).await.unwrap_or(false) {
            self.limiter.fail(Some(user), &limiter::Source::parse(source));
            self.audit.record("login-failed", Some(user.as_str()), Some(source), None, Some("wrong current password".into()));
            return Err(denied("the current password is wrong".into()));
        }
        let pw = password.to_owned();
        let hash = tokio::task::spawn_blocking(move || secret::hash_password(&pw)).await.map_err(|e| internal("hashing", e))?;
        let when = self.meta.set_password(user, &hash).await.map_err(|e| internal("setting password", e))?;
        self.credentials_changed(user, when, false);
        // Refresh tokens die with the password; bearer tokens minted from it
        // carry the old epoch and are refused.
        let refresh: Vec<String> = self
            .tokens
            .read()
            .unwrap()
            .values()
            .filter(|t| &t.user == user && t.kind == TokenKind::Refresh)
            .map(|t| t.id.clone())
            .collect();
        self.revoke_ids(refresh).await?;
        self.audit.record("password-changed", Some(user.as_str()), None, Some(user.to_string()), None);
        Ok(())
    }

    /// This node learns at once what other nodes learn at their next refresh
    /// (the same stored time: it is the password epoch tokens carry).
    fn credentials_changed(&self, user: &AccountName, when: i64, disabled: bool) {
        self.verified.lock().unwrap().retain(|_, (u, _)| u != user);
        self.changed.write().unwrap().insert(user.clone(), (when, disabled));
    }

    async fn revoke_ids(&self, ids: Vec<String>) -> Result<usize, RegistryError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.token_actor
            .send(tokens::Revoke(ids))
            .await
            .map_err(|e| internal("token actor", e))?
            .map_err(|e| internal("revoking tokens", e))
    }

    /// The user whose tokens or state `who` administers: themselves, their
    /// tenant's admin, or the platform admin; others see no such user.
    async fn administered_user(&self, who: &Principal, user: &AccountName) -> Result<UserRow, RegistryError> {
        let not_found = || RegistryError::new(ErrorCode::NotFound).with_detail(format!("no user {user}"));
        let row = self.meta.user(user).await.map_err(|e| internal("loading user", e))?.ok_or_else(not_found)?;
        let ok = who.user() == Some(user)
            || self.require_platform_admin(who).is_ok()
            || row.tenant.as_ref().is_some_and(|t| self.require_tenant_admin(who, t).is_ok());
        if !ok {
            return Err(not_found());
        }
        Ok(row)
    }

    /// A user's tokens, access and refresh (their tenant's admin, the platform admin).
    pub async fn user_tokens(&self, who: &Principal, user: &AccountName) -> Result<Vec<TokenRow>, RegistryError> {
        self.administered_user(who, user).await?;
        let mut rows: Vec<TokenRow> = self.tokens.read().unwrap().values().filter(|t| &t.user == user).cloned().collect();
        rows.sort_by_key(|t| t.created_ms);
        Ok(rows)
    }

    /// Revoke every token of a user (their tenant's admin, the platform admin).
    pub async fn revoke_user_tokens(&self, who: &Principal, user: &AccountName) -> Result<Vec<String>, RegistryError> {
        let ids: Vec<String> = self.user_tokens(who, user).await?.into_iter().map(|t| t.id).collect();
        self.revoke_ids(ids.clone()).await?;
        self.audit.record(
            "token-revoked",
            who.user().map(|u| u.as_str()),
            None,
            Some(user.to_string()),
            Some(format!("all {} tokens", ids.len())),
        );
        Ok(ids)
    }

    /// Disable a user (every credential of theirs stops working: here at once,
    /// on other replicas at their next refresh), or enable them again.
    pub async fn set_user_disabled(&self, who: &Principal, user: &AccountName, disabled: bool) -> Result<(), RegistryError> {
        self.administered_user(who, user).await?;
        if who.user() == Some(user) {
            return Err(RegistryError::new(ErrorCode::InvalidRequest).with_detail("you cannot disable yourself"));
        }
        let when = self
            .meta
            .set_user_disabled(user, disabled)
            .await
            .map_err(|e| internal("disabling user", e))?
            .ok_or_else(|| RegistryError::new(ErrorCode::NotFound).with_detail(format!("no user {user}")))?;
        self.credentials_changed(user, when, disabled);
        let what = if disabled { "user-disabled" } else { "user-enabled" };
        self.audit.record(what, who.user().map(|u| u.as_str()), None, Some(user.to_string()), None);
        Ok(())
    }

    // ----- public repositories and shares (policy rules) -----

    fn public_rule(tenant: &AccountName, repo: &RepoName) -> PolicyRuleRow {
        PolicyRuleRow { ptype: "p".into(), fields: vec!["*".into(), tenant.to_string(), repo.to_string(), "pull".into(), "allow".into()] }
    }

    /// The rules granting tenant `with` `actions` on `object` (a repository, or
    /// `<ns>/*` for a whole namespace) of `owner`'s: pull to all of `with`'s
    /// members, push only to those who may push in their own tenant.
    fn grant_rules(owner: &AccountName, object: &str, with: &AccountName, actions: &[String]) -> Vec<PolicyRuleRow> {
        actions
            .iter()
            .map(|a| {
                let subject = if a == "pull" { format!("tenant:{with}") } else { policy::pushers_group(with.as_str()) };
                PolicyRuleRow { ptype: "p".into(), fields: vec![subject, owner.to_string(), object.to_owned(), a.clone(), "allow".into()] }
            })
            .collect()
    }

    fn share_rules(owner: &AccountName, repo: &RepoName, with: &AccountName, actions: &[String]) -> Vec<PolicyRuleRow> {
        Self::grant_rules(owner, repo.as_str(), with, actions)
    }

    fn ns_share_rules(owner: &AccountName, ns: &AccountName, with: &AccountName, actions: &[String]) -> Vec<PolicyRuleRow> {
        Self::grant_rules(owner, &format!("{ns}/*"), with, actions)
    }

    /// What a share grants and until when: checked before anything changes.
    async fn share_terms(
        &self,
        owner: &AccountName,
        with: &AccountName,
        push: bool,
        expires_in_secs: Option<u64>,
    ) -> Result<(Vec<String>, Option<i64>), RegistryError> {
        if with == owner {
            return Err(RegistryError::new(ErrorCode::InvalidRequest).with_detail("it is already visible to its own tenant"));
        }
        if !self.tenant_exists(with).await? {
            return Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no tenant {with}")));
        }
        let actions: Vec<String> = if push { vec!["pull".into(), "push".into()] } else { vec!["pull".into()] };
        // Bounded before any arithmetic: a lifetime of any size from the wire can
        // neither overflow nor wrap into the past.
        const MAX_SHARE_SECS: u64 = 10 * 365 * 24 * 3600;
        if let Some(s) = expires_in_secs.filter(|s| *s == 0 || *s > MAX_SHARE_SECS) {
            return Err(RegistryError::new(ErrorCode::InvalidRequest)
                .with_detail(format!("expires_in must be 1 to {MAX_SHARE_SECS} seconds, not {s}")));
        }
        Ok((actions, expires_in_secs.map(|s| tokens::now_ms().saturating_add((s as i64).saturating_mul(1000)))))
    }

    /// Make a repository public (anonymous pull) or private again.
    pub async fn set_public(&self, who: &Principal, repo: &RepoName, public: bool) -> Result<(), RegistryError> {
        let tenant = self.require_repo_admin(who, repo)?;
        let rule = Self::public_rule(&tenant, repo);
        let (add, remove) = if public { (vec![rule], vec![]) } else { (vec![], vec![rule]) };
        self.policy.change(&add, &remove).await.map_err(|e| internal("changing visibility", e))?;
        let what = if public { "public" } else { "private" };
        self.audit.record("visibility-changed", who.user().map(|u| u.as_str()), None, Some(repo.to_string()), Some(what.into()));
        Ok(())
    }

    /// A repository was deleted (its deletion was authorized by the caller): its
    /// public rule and shares go with it, so a later repository of the same name
    /// starts private and unshared.
    pub async fn repo_deleted(&self, repo: &RepoName) -> Result<(), RegistryError> {
        let Some(owner) = self.tenant_of(repo) else { return Ok(()) };
        let mut remove = vec![Self::public_rule(&owner, repo)];
        let shares = self.meta.shares().await.map_err(|e| internal("listing shares", e))?;
        let shares: Vec<ShareRow> = shares.into_iter().filter(|s| &s.repo == repo).collect();
        for s in &shares {
            remove.extend(Self::share_rules(&owner, repo, &s.tenant, &["pull".into(), "push".into()]));
        }
        let present = self.policy.rules();
        remove.retain(|r| present.contains(r));
        if !remove.is_empty() {
            self.policy.change(&[], &remove).await.map_err(|e| internal("forgetting repository rules", e))?;
        }
        for s in shares {
            self.meta.delete_share(repo, &s.tenant).await.map_err(|e| internal("deleting share", e))?;
        }
        Ok(())
    }

    pub fn is_public(&self, repo: &RepoName) -> bool {
        self.tenant_of(repo).is_some_and(|t| self.policy.has_rule(&Self::public_rule(&t, repo)))
    }

    /// Share a repository with another tenant for pull or pull+push, optionally until a time.
    pub async fn share(
        &self,
        who: &Principal,
        repo: &RepoName,
        with: AccountName,
        push: bool,
        expires_in_secs: Option<u64>,
    ) -> Result<(), RegistryError> {
        let owner = self.require_repo_admin(who, repo)?;
        let (actions, expires_ms) = self.share_terms(&owner, &with, push, expires_in_secs).await?;
        self.audit_share(who, repo.as_str(), &with, &actions, expires_ms);
        // Replace any earlier share with this tenant.
        let old = Self::share_rules(&owner, repo, &with, &["pull".into(), "push".into()]);
        let new = Self::share_rules(&owner, repo, &with, &actions);
        self.meta
            .put_share(&ShareRow { repo: repo.clone(), tenant: with, actions, expires_ms })
            .await
            .map_err(|e| internal("storing share", e))?;
        let remove: Vec<PolicyRuleRow> = old.into_iter().filter(|r| !new.contains(r)).collect();
        self.policy.change(&new, &remove).await.map_err(|e| internal("sharing", e))
    }

    pub async fn unshare(&self, who: &Principal, repo: &RepoName, with: AccountName) -> Result<(), RegistryError> {
        let owner = self.require_repo_admin(who, repo)?;
        self.withdraw_share(&owner, repo, &with).await?;
        self.audit_share(who, repo.as_str(), &with, &[], None);
        Ok(())
    }

    async fn withdraw_share(&self, owner: &AccountName, repo: &RepoName, with: &AccountName) -> Result<(), RegistryError> {
        let rules = Self::share_rules(owner, repo, with, &["pull".into(), "push".into()]);
        self.policy.change(&[], &rules).await.map_err(|e| internal("withdrawing share", e))?;
        self.meta.delete_share(repo, with).await.map_err(|e| internal("deleting share", e))
    }

    /// Share a whole namespace (every repository in it, present and future) with
    /// another tenant for pull or pull+push, optionally until a time (namespace admin).
    pub async fn share_namespace(
        &self,
        who: &Principal,
        ns: &AccountName,
        with: AccountName,
        push: bool,
        expires_in_secs: Option<u64>,
    ) -> Result<(), RegistryError> {
        self.require_namespace_admin(who, ns)?;
        let owner = self.tenant_of_namespace(ns).ok_or_else(|| denied(format!("administrator of namespace {ns} required")))?;
        let (actions, expires_ms) = self.share_terms(&owner, &with, push, expires_in_secs).await?;
        self.audit_share(who, &format!("{ns}/*"), &with, &actions, expires_ms);
        let old = Self::ns_share_rules(&owner, ns, &with, &["pull".into(), "push".into()]);
        let new = Self::ns_share_rules(&owner, ns, &with, &actions);
        self.meta
            .put_ns_share(&NsShareRow { namespace: ns.clone(), tenant: with, actions, expires_ms })
            .await
            .map_err(|e| internal("storing share", e))?;
        let remove: Vec<PolicyRuleRow> = old.into_iter().filter(|r| !new.contains(r)).collect();
        self.policy.change(&new, &remove).await.map_err(|e| internal("sharing", e))
    }

    pub async fn unshare_namespace(&self, who: &Principal, ns: &AccountName, with: AccountName) -> Result<(), RegistryError> {
        self.require_namespace_admin(who, ns)?;
        let owner = self.tenant_of_namespace(ns).ok_or_else(|| denied(format!("administrator of namespace {ns} required")))?;
        self.withdraw_ns_share(&owner, ns, &with).await?;
        self.audit_share(who, &format!("{ns}/*"), &with, &[], None);
        Ok(())
    }

    fn audit_share(&self, who: &Principal, object: &str, with: &AccountName, actions: &[String], expires_ms: Option<i64>) {
        let detail = match (actions.is_empty(), expires_ms) {
            (true, _) => format!("withdrawn from {with}"),
            (false, None) => format!("{} to {with}", actions.join("+")),
            (false, Some(ms)) => format!("{} to {with} until {ms}", actions.join("+")),
        };
        self.audit.record("share-changed", who.user().map(|u| u.as_str()), None, Some(object.to_owned()), Some(detail));
    }

    async fn withdraw_ns_share(&self, owner: &AccountName, ns: &AccountName, with: &AccountName) -> Result<(), RegistryError> {
        let rules = Self::ns_share_rules(owner, ns, with, &["pull".into(), "push".into()]);
        self.policy.change(&[], &rules).await.map_err(|e| internal("withdrawing share", e))?;
        self.meta.delete_ns_share(ns, with).await.map_err(|e| internal("deleting share", e))
    }

    /// The tenants a namespace is shared with (namespace admin).
    pub async fn namespace_shares(&self, who: &Principal, ns: &AccountName) -> Result<Vec<NsShareRow>, RegistryError> {
        self.require_namespace_admin(who, ns)?;
        let rows = self.meta.ns_shares().await.map_err(|e| internal("listing shares", e))?;
        Ok(rows.into_iter().filter(|s| &s.namespace == ns).collect())
    }

    /// Every namespace share of a namespace the caller administers.
    pub async fn ns_shares_granted(&self, who: &Principal) -> Result<Vec<NsShareRow>, RegistryError> {
        let rows = self.meta.ns_shares().await.map_err(|e| internal("listing shares", e))?;
        Ok(rows.into_iter().filter(|s| self.namespace_decision(who, &s.namespace, Action::Admin)).collect())
    }

    /// Namespaces other tenants shared with the caller's tenant (still in force).
    pub async fn namespaces_shared_with(&self, who: &Principal) -> Result<Vec<NsShareRow>, RegistryError> {
        let Some(tenant) = self.tenant_of_user(who).await? else { return Ok(vec![]) };
        let now = tokens::now_ms();
        let rows = self.meta.ns_shares().await.map_err(|e| internal("listing shares", e))?;
        Ok(rows.into_iter().filter(|s| s.tenant == tenant && s.expires_ms.is_none_or(|t| t > now)).collect())
    }

    pub async fn shares(&self, who: &Principal, repo: &RepoName) -> Result<Vec<ShareRow>, RegistryError> {
        self.require_repo_admin(who, repo)?;
        let rows = self.meta.shares().await.map_err(|e| internal("listing shares", e))?;
        Ok(rows.into_iter().filter(|s| &s.repo == repo).collect())
    }

    /// Every share of a repository the caller administers (the shares they granted).
    pub async fn shares_granted(&self, who: &Principal) -> Result<Vec<ShareRow>, RegistryError> {
        let rows = self.meta.shares().await.map_err(|e| internal("listing shares", e))?;
        Ok(rows.into_iter().filter(|s| self.decide(who, &s.repo, Action::Admin).allowed).collect())
    }

    /// Repositories other tenants shared with the caller's tenant (still in force).
    pub async fn shared_with(&self, who: &Principal) -> Result<Vec<ShareRow>, RegistryError> {
        let Some(tenant) = self.tenant_of_user(who).await? else { return Ok(vec![]) };
        let now = tokens::now_ms();
        let rows = self.meta.shares().await.map_err(|e| internal("listing shares", e))?;
        Ok(rows.into_iter().filter(|s| s.tenant == tenant && s.expires_ms.is_none_or(|t| t > now)).collect())
    }

    async fn expire_shares(&self) -> Result<(), RegistryError> {
        let now = tokens::now_ms();
        let rows = self.meta.shares().await.map_err(|e| internal("listing shares", e))?;
        for s in rows.into_iter().filter(|s| s.expires_ms.is_some_and(|t| t <= now)) {
            if let Some(owner) = self.tenant_of(&s.repo) {
                self.withdraw_share(&owner, &s.repo, &s.tenant).await?;
                tracing::info!(repo = %s.repo, tenant = %s.tenant, "share expired");
            }
        }
        let rows = self.meta.ns_shares().await.map_err(|e| internal("listing shares", e))?;
        for s in rows.into_iter().filter(|s| s.expires_ms.is_some_and(|t| t <= now)) {
            if let Some(owner) = self.tenant_of_namespace(&s.namespace) {
                self.withdraw_ns_share(&owner, &s.namespace, &s.tenant).await?;
                tracing::info!(namespace = %s.namespace, tenant = %s.tenant, "namespace share expired");
            }
        }
        Ok(())
    }

    // ----- policy administration (platform admin) -----

    pub fn policy_rules(&self, who: &Principal) -> Result<Vec<PolicyRuleRow>, RegistryError> {
        self.require_platform_admin(who)?;
        Ok(self.policy.rules())
    }

    pub async fn change_policy(&self, who: &Principal, add: Vec<PolicyRuleRow>, remove: Vec<PolicyRuleRow>) -> Result<(), RegistryError> {
        self.require_platform_admin(who)?;
        self.policy.change(&add, &remove).await.map_err(|e| internal("changing policy", e))?;
        let rules = |sign: char, rs: &[PolicyRuleRow]| {
            rs.iter().map(move |r| format!("{sign} {}, {}", r.ptype, r.fields.join(", "))).collect::<Vec<_>>()
        };
        let mut detail = rules('+', &add);
        detail.extend(rules('-', &remove));
        let detail = detail.join("; ").chars().take(2_000).collect::<String>();
        self.audit.record("policy-changed", who.user().map(|u| u.as_str()), None, None, Some(detail));
        Ok(())
    }

    /// The security audit log since `since_ms` (default: the last 24 hours),
    /// newest first (platform admin).
    pub async fn audit_events(
        &self,
        who: &Principal,
        since_ms: Option<i64>,
        action: Option<&str>,
        limit: usize,
    ) -> Result<Vec<berth_metadata::AuditRow>, RegistryError> {
        self.require_platform_admin(who)?;
        let since = since_ms.unwrap_or_else(|| tokens::now_ms() - 86_400_000);
        self.meta.audit_since(since, action, limit).await.map_err(|e| internal("reading the audit log", e))
    }

    /// Decide an arbitrary request (for `berth policy check`).
    pub fn check_policy(&self, who: &Principal, sub: &str, dom: &str, obj: &str, act: Action) -> Result<Decision, RegistryError> {
        self.require_platform_admin(who)?;
        Ok(self.policy.check(sub, dom, obj, act.as_str()))
    }

    /// Start signing with a new key. The old one verifies until every token
    /// it signed has expired (the bearer lifetime plus clock skew), on every
    /// node without a restart; with `immediately` (a leaked key) it and every
    /// other retired key stop verifying at once here, and at the next refresh
    /// (2 s) on other nodes.
    pub async fn rotate_signing_key(&self, who: &Principal, immediately: bool) -> Result<String, RegistryError> {
        self.require_platform_admin(who)?;
        let kid = rotate_key(&self.meta, &self.master).await.map_err(|e| internal("rotating key", e))?;
        let window_ms = (self.config.bearer_ttl_secs + self.config.clock_skew_secs) as i64 * 1000;
        let before = if immediately { i64::MAX } else { tokens::now_ms() - window_ms };
        self.meta.prune_signing_keys(before).await.map_err(|e| internal("dropping retired keys", e))?;
        self.refresh().await;
        let how = if immediately { "old keys dropped at once" } else { "old keys retire after the bearer lifetime" };
        self.audit.record("key-rotated", who.user().map(|u| u.as_str()), None, Some(kid.clone()), Some(how.into()));
        Ok(kid)
    }

    /// The key ids that verify bearer tokens on this node.
    pub fn verifying_kids(&self) -> Vec<String> {
        self.keys.kids()
    }
}

fn now_secs() -> i64 {
    tokens::now_ms() / 1000
}

fn check_password(p: &str) -> Result<(), RegistryError> {
    if p.chars().count() < 8 || p.len() > 1024 {
        return Err(RegistryError::new(ErrorCode::InvalidRequest).with_detail("password must be 8 to 1024 characters"));
    }
    Ok(())
}

/// Decode `base64(user:secret)`.
pub fn decode_basic(v: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD.decode(v).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| secret::hash_password("berth-dummy-password"));

async fn rotate_key(meta: &Metadata, master: &secret::MasterKey) -> Result<String, String> {
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    let kid = secret::random_token(9);
    let sealed = master.seal(&kid, &secret);
    let row = SigningKeyRow { kid: kid.clone(), sealed: Some(sealed), secret_hex: None, created_ms: tokens::now_ms(), retired_ms: None };
    meta.rotate_signing_key(&row).await.map_err(|e| e.to_string())?;
    Ok(kid)
}

/// The signing keys at start: keys stored in the clear by earlier versions are
/// sealed first. A current key that this master key cannot open (a lost master
/// key, or another replica's) stops the start rather than signing with a key
/// the others cannot verify; on one machine (`alone`: the embedded store, with
/// the key file beside it) no one else verifies, so the keys are replaced
/// instead and only the bearer tokens issued before (minutes long) are lost.
async fn load_keys(meta: &Metadata, master: &secret::MasterKey, alone: bool) -> Result<KeyRing, String> {
    let failed = |e: berth_metadata::MetadataError| format!("loading signing keys: {e}");
    let mut rows = meta.signing_keys().await.map_err(failed)?;
    for k in &rows {
        if let (None, Some(hex_secret)) = (&k.sealed, &k.secret_hex) {
            let secret = hex::decode(hex_secret).map_err(|_| format!("signing key {}: not hex", k.kid))?;
            meta.seal_signing_key(&k.kid, &master.seal(&k.kid, &secret)).await.map_err(failed)?;
            tracing::info!(kid = %k.kid, "signing key sealed with the master key");
        }
    }
    if !rows.iter().any(|k| k.retired_ms.is_none()) {
        rotate_key(meta, master).await?;
    }
    rows = meta.signing_keys().await.map_err(failed)?;
    let current_opens =
        rows.iter().filter(|k| k.retired_ms.is_none()).all(|k| k.sealed.as_deref().and_then(|s| master.open(&k.kid, s)).is_some());
    if !current_opens && alone {
        tracing::warn!(
            "the signing keys cannot be opened with this master key (a new one?): replacing them; bearer tokens issued before are refused"
        );
        rotate_key(meta, master).await?;
        meta.prune_signing_keys(i64::MAX).await.map_err(failed)?;
        rows = meta.signing_keys().await.map_err(failed)?;
    }
    // Current key last.
    rows.sort_by_key(|k| (k.retired_ms.is_none(), k.created_ms));
    let mut keys = Vec::new();
    for k in rows {
        match k.sealed.as_deref().and_then(|s| master.open(&k.kid, s)) {
            Some(secret) => keys.push((k.kid, secret)),
            None if k.retired_ms.is_none() => {
                return Err(format!(
                    "the current signing key {} cannot be opened with this master key: every replica needs the same master key file",
                    k.kid
                ))
            }
            None => tracing::warn!(kid = %k.kid, "a retired signing key cannot be opened with this master key"),
        }
    }
    Ok(KeyRing::new(keys))
}

/// Create the platform admin on first start; returns the password if generated.
async fn bootstrap_admin(meta: &Metadata, configured: Option<&str>) -> Result<Option<String>, String> {
    let name: AccountName = ADMIN_USER.parse().expect("valid name");
    match meta.user(&name).await.map_err(|e| e.to_string())? {
        Some(row) => {
            // A configured password wins (recovery): re-hash when it changed.
            if let Some(pw) = configured {
                let (pw, phc) = (pw.to_owned(), row.password_hash.clone());
                let same = tokio::task::spawn_blocking(move || secret::verify_password(&pw, &phc)).await.unwrap_or(false);
                if !same {
                    let pw = configured.unwrap().to_owned();
                    let hash = tokio::task::spawn_blocking(move || secret::hash_password(&pw)).await.map_err(|e| e.to_string())?;
                    meta.set_password(&name, &hash).await.map_err(|e| e.to_string())?;
                    tracing::info!("admin password reset from configuration");
                }
            }
            Ok(None)
        }
        None => {
            let (pw, generated) = match configured {
                Some(p) => (p.to_owned(), None),
                None => {
                    let p = secret::random_password();
                    (p.clone(), Some(p))
                }
            };
            let hash = tokio::task::spawn_blocking(move || secret::hash_password(&pw)).await.map_err(|e| e.to_string())?;
            let row = UserRow { name, tenant: None, password_hash: hash, created_ms: tokens::now_ms() };
            // Replicas starting together over one database race here: one
            // creates the admin, and only its password (if generated) is told.
            if !meta.create_user(&row).await.map_err(|e| e.to_string())? {
                tracing::info!("the platform admin user 'admin' was created by another replica");
                return Ok(None);
            }
            tracing::info!("created the platform admin user 'admin'");
            Ok(generated)
        }
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(c: &AuthConfig, peer: &str, xff: &[&str]) -> IpAddr {
        c.client_address(Some(ip(peer)), xff.iter().copied()).unwrap()
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop() {
        let mut c = AuthConfig::default();
        assert_eq!(client(&c, "10.0.0.5", &["6.6.6.6"]), ip("10.0.0.5"), "no proxy trusted: the header is ignored");
        c.trust_proxy = true;
        // One proxy (the peer): the hop it appended, never the client-supplied first one.
        assert_eq!(client(&c, "10.0.0.5", &["6.6.6.6, 1.2.3.4"]), ip("1.2.3.4"));
        assert_eq!(client(&c, "10.0.0.5", &[]), ip("10.0.0.5"));
        c.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert_eq!(client(&c, "10.0.0.5", &["6.6.6.6, 1.2.3.4, 10.1.1.1"]), ip("1.2.3.4"), "two proxies in the list");
        assert_eq!(client(&c, "10.0.0.5", &["6.6.6.6", "1.2.3.4, 10.1.1.1"]), ip("1.2.3.4"), "headers in order");
        assert_eq!(client(&c, "10.0.0.5", &["10.2.2.2, 10.1.1.1"]), ip("10.2.2.2"), "all proxies: the left-most");
        assert_eq!(client(&c, "10.0.0.5", &["6.6.6.6, garbage"]), ip("10.0.0.5"), "an unparseable hop ends the walk");
        assert_eq!(client(&c, "8.8.8.8", &["1.2.3.4"]), ip("8.8.8.8"), "a peer that is no proxy: header ignored");
        assert_eq!(client(&c, "fd00::1", &["2001:db8::7"]), ip("2001:db8::7"));
    }
}

#[cfg(test)]
mod bootstrap_tests {
    use super::*;

    /// Replicas starting together over one database: one creates the admin,
    /// and only that one tells a generated password, which is the one that works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_replica_that_created_the_admin_tells_its_password() {
        let meta = Metadata::connect(&berth_metadata::MetadataConfig::new("mem://")).await.unwrap();
        let (a, b) = tokio::join!(bootstrap_admin(&meta, None), bootstrap_admin(&meta, None));
        let told: Vec<String> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
        assert_eq!(told.len(), 1, "passwords told: {told:?}");
        let admin = meta.user(&ADMIN_USER.parse().unwrap()).await.unwrap().unwrap();
        assert!(secret::verify_password(&told[0], &admin.password_hash), "the password told does not open the admin");
    }
}
