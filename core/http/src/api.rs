//! The management API (`/api/v1/…`): tenants, users, access tokens, policies,
//! repository visibility and shares. JSON in, JSON out; errors use the same
//! error table and JSON shape as the OCI API. Callers authenticate with Basic
//! (a password or a registry access token); every permission check is made by
//! [`berth_auth::Auth`], not here.

use berth_auth::policy::{export_rules, validate_rule};
use berth_auth::{Action, Auth, Identity, Principal};
use berth_metadata::{PolicyRuleRow, TokenRow};
use berth_oci::{AccountName, ErrorCode, RegistryError, RepoName};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::http::{Method, StatusCode};

use crate::manage::{body, reply};
use crate::{error_response, gate, json_response, method_not_allowed, set, Reply, Request, Services};

fn not_found(path: &str) -> RegistryError {
    RegistryError::new(ErrorCode::NotFound).with_detail(format!("no such endpoint: /api/v1/{path}"))
}

fn no_content() -> Result<Reply, RegistryError> {
    Ok(crate::no_content())
}

/// A registry access token as listed (never its secret).
#[derive(Serialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub user: String,
    /// `access` (a password for `docker login`) or `refresh` (docker's identity token).
    pub kind: &'static str,
    /// What it may be used for: `pull`, `push`, `manage`.
    pub scopes: Vec<String>,
    /// The access token that minted it (revoked with it), if any.
    pub parent: Option<String>,
    pub description: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub last_used_ms: Option<i64>,
}

/// A newly issued token: the only time its secret is shown.
#[derive(Serialize, ToSchema)]
pub struct IssuedToken {
    #[serde(flatten)]
    pub token_info: TokenView,
    /// The secret (`bt_…`): the password for `docker login`.
    pub token: String,
    /// base64 of `user:token`, the `auth` value of a docker `config.json`.
    pub docker_auth: String,
}

#[derive(Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

#[derive(Serialize, ToSchema)]
pub struct Revoked {
    pub revoked: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Me {
    pub user: String,
    pub tenant: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TenantView {
    pub name: String,
    pub created_ms: i64,
}

#[derive(Serialize, ToSchema)]
pub struct TenantList {
    pub tenants: Vec<TenantView>,
}

#[derive(Serialize, ToSchema)]
pub struct Created {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UserView {
    pub name: String,
    pub tenant: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<UserView>,
}

/// One casbin rule.
#[derive(Serialize, ToSchema)]
pub struct Rule {
    pub ptype: String,
    pub fields: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RuleList {
    pub version: u64,
    pub rules: Vec<Rule>,
}

#[derive(Serialize, ToSchema)]
pub struct CheckResult {
    pub allowed: bool,
    /// The matching rule's fields (the deny rule when a deny won).
    pub rule: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct Kid {
    pub kid: String,
}

#[derive(Serialize, ToSchema)]
pub struct Visibility {
    pub repository: String,
    pub public: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ShareView {
    pub tenant: String,
    pub actions: Vec<String>,
    pub expires_ms: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ShareList {
    pub shares: Vec<ShareView>,
}

/// A share the caller granted.
#[derive(Serialize, ToSchema)]
pub struct Granted {
    /// The repository shared (a repository share).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The namespace shared (a namespace share: every repository in it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub tenant: String,
    pub actions: Vec<String>,
    pub expires_ms: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct GrantedList {
    pub shares: Vec<Granted>,
}

#[derive(Serialize, ToSchema)]
pub struct Shared {
    pub repository: String,
    pub tenant: String,
    pub push: bool,
    pub expires_in: Option<u64>,
}

fn token_view(t: &TokenRow) -> TokenView {
    TokenView {
        id: t.id.clone(),
        user: t.user.to_string(),
        kind: match t.kind {
            berth_metadata::TokenKind::Access => "access",
            berth_metadata::TokenKind::Refresh => "refresh",
        },
        scopes: t.scopes.clone().unwrap_or_else(|| berth_auth::TOKEN_SCOPES.map(String::from).to_vec()),
        parent: t.parent.clone(),
        description: t.description.clone(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        last_used_ms: t.last_used_ms,
    }
}

fn rule(r: &PolicyRuleRow) -> Rule {
    Rule { ptype: r.ptype.clone(), fields: r.fields.clone() }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NameBody {
    name: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    name: String,
    password: String,
    /// tenant-admin, maintainer, developer or reader.
    role: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    /// The password now in use (a session someone else left open does not do).
    current_password: String,
    /// The new password (8 to 1024 characters).
    password: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisabledBody {
    disabled: bool,
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    #[serde(default)]
    description: String,
    /// Lifetime in seconds (default 12 h; a token minting a token: at most its own).
    expires_in: Option<u64>,
    /// Any of `pull`, `push`, `manage` (default: all, or the minting token's).
    scopes: Option<Vec<String>>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    ptype: String,
    fields: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    user: String,
    #[serde(default)]
    tenant: String,
    object: String,
    action: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VisibilityBody {
    public: bool,
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareBody {
    #[serde(default)]
    pub(crate) push: bool,
    /// Seconds until the share lapses.
    pub(crate) expires_in: Option<u64>,
}

/// Serve one management request.
pub async fn handle(services: &Services, path: &str, mut req: Request) -> Reply {
    let auth = &services.auth;
    if path == "openapi.json" && req.method == Method::GET {
        return crate::manage::openapi();
    }
    if let Err(e) = gate::refuse_cross_site(auth, &req) {
        return error_response(&e);
    }
    let identity = match gate::authenticate(auth, &req).await {
        Ok(i) => i,
        Err(r) => return gate::refusal_response(auth, &req, r),
    };
    // Official images are for everyone the policy lets pull them, anonymous callers included.
    if path == "official" || path.starts_with("official/") {
        return match crate::manage::official(services, &identity, path.strip_prefix("official").unwrap_or(""), &mut req).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
    }
    if let Err(e) = gate::require_basic(&identity) {
        let mut r = error_response(&e);
        set(&mut r, "www-authenticate", gate::API_CHALLENGE);
        return r;
    }
    match route(services, &identity, path, &mut req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn route(services: &Services, identity: &Identity, path: &str, req: &mut Request) -> Result<Reply, RegistryError> {
    let (auth, who) = (&*services.auth, &identity.principal);
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let m = req.method.clone();
    match (segs.as_slice(), &m) {
        (["me"], &Method::GET) => me(auth, who),
        (["registry"], &Method::GET) => crate::manage::registry_info(services, req),
        (["me", "password"], &Method::PUT) => {
            let source = gate::source(auth, req);
            change_password(auth, identity, body(req).await?, &source).await
        }
        (["users", u, "tokens"], &Method::GET) => user_tokens(auth, who, &u.parse()?).await,
        (["users", u, "tokens"], &Method::DELETE) => revoke_user_tokens(auth, who, &u.parse()?).await,
        (["users", u, "disabled"], &Method::PUT) => set_user_disabled(auth, who, &u.parse()?, body(req).await?).await,
        (["tenants"], &Method::GET) => list_tenants(auth, who).await,
        (["tenants"], &Method::POST) => create_tenant(services, who, body(req).await?).await,
        (["tenants", t, "namespaces"], &Method::POST) => add_namespace(services, who, t.parse()?, body(req).await?).await,
        (["tenants", t, "quota"], &Method::GET) => crate::quotas::get(services, identity, &t.parse()?).await,
        (["tenants", t, "quota"], &Method::PUT) => crate::quotas::set(services, identity, &t.parse()?, req).await,
        (["quotas"], &Method::GET) => crate::quotas::mine(services, identity).await,
        (["retention", "runs"], &Method::GET) => crate::retention::runs(services, identity, crate::manage::query(req)?).await,
        (["fsck"], &Method::POST) => crate::gc::fsck(services, identity, req).await,
        (["plugins", rest @ ..], _) => crate::plugins::route(services, identity, rest, req).await,
        (["gc"], &Method::GET) => crate::gc::status(services, identity),
        (["gc"], &Method::POST) => crate::gc::run(services, identity, req).await,
        (["tenants", t, "users"], &Method::POST) => create_user(auth, who, t.parse()?, body(req).await?).await,
        (["users"], &Method::GET) => list_users(auth, who).await,
        (["tokens"], &Method::GET) => list_tokens(auth, who),
        (["tokens"], &Method::POST) => issue_token(auth, identity, body(req).await?).await,
        (["tokens"], &Method::DELETE) => revoke_my_tokens(auth, who).await,
        (["tokens", id], &Method::DELETE) => revoke_token(auth, who, id).await,
        (["policies"], &Method::GET) => list_policies(auth, who, req.param("format").as_deref() == Some("csv")),
        (["policies"], &Method::POST) => add_rule(auth, who, body(req).await?).await,
        (["policies", "remove"], &Method::POST) => remove_rule(auth, who, body(req).await?).await,
        (["policies", "check"], &Method::POST) => check_policy(auth, who, body(req).await?),
        (["keys", "rotate"], &Method::POST) => rotate_key(auth, who, crate::manage::query(req)?).await,
        (["audit"], &Method::GET) => audit(auth, who, crate::manage::query(req)?).await,
        (["shares"], &Method::GET) => list_granted_shares(auth, who).await,
        ([first, ..], _) if *first == "namespaces" => {
            crate::namespaces::handle(services, identity, path.strip_prefix("namespaces").unwrap_or(""), req).await
        }
        ([first, ..], _) if *first == "repositories" && is_old_style(&segs[1..]) => repository(services, who, &segs[1..], req).await,
        ([first, ..], _) if *first == "repositories" => {
            crate::manage::handle(services, identity, path.strip_prefix("repositories").unwrap_or(""), req).await
        }
        (_, m) if known(path) => Err(method_not_allowed(m)),
        _ => Err(not_found(path)),
    }
}

fn known(path: &str) -> bool {
    let p = path.trim_end_matches('/');
    [
        "me",
        "me/password",
        "gc",
        "fsck",
        "retention/runs",
        "quotas",
        "registry",
        "shares",
        "tenants",
        "users",
        "tokens",
        "policies",
        "policies/remove",
        "policies/check",
        "keys/rotate",
        "audit",
    ]
    .contains(&p)
        || p.starts_with("tokens/")
        || p.starts_with("users/")
        || p.starts_with("tenants/")
}

/// The caller and their tenant.
#[utoipa::path(get, path = "/api/v1/me", operation_id = "getMe", tag = "accounts", responses((status = 200, body = Me)))]
fn me(auth: &Auth, who: &Principal) -> Result<Reply, RegistryError> {
    let tenant = who.user().and_then(|u| {
        auth.policy().rules().into_iter().find_map(|r| {
            (r.ptype == "g2" && r.fields[0] == u.as_str()).then(|| r.fields[1].strip_prefix("tenant:").map(str::to_owned)).flatten()
        })
    });
    reply(StatusCode::OK, &Me { user: who.subject().to_owned(), tenant })
}

/// Change the caller's password.
#[utoipa::path(put, path = "/api/v1/me/password", operation_id = "changePassword", tag = "accounts", request_body = PasswordBody,
    responses((status = 204)))]
async fn change_password(auth: &Auth, identity: &Identity, b: PasswordBody, source: &str) -> Result<Reply, RegistryError> {
    auth.change_password(identity, &b.current_password, &b.password, source).await?;
    no_content()
}

/// Every tenant (platform admin).
#[utoipa::path(get, path = "/api/v1/tenants", operation_id = "listTenants", tag = "accounts", responses((status = 200, body = TenantList)))]
async fn list_tenants(auth: &Auth, who: &Principal) -> Result<Reply, RegistryError> {
    let t = auth.tenants(who).await?;
    reply(
        StatusCode::OK,
        &TenantList { tenants: t.iter().map(|t| TenantView { name: t.name.to_string(), created_ms: t.created_ms }).collect() },
    )
}

/// Create a tenant and its namespace of the same name (platform admin).
#[utoipa::path(post, path = "/api/v1/tenants", operation_id = "createTenant", tag = "accounts", request_body = NameBody,
    responses((status = 201, body = Created), (status = 409, description = "exists")))]
async fn create_tenant(services: &Services, who: &Principal, b: NameBody) -> Result<Reply, RegistryError> {
    let name: AccountName = b.name.parse()?;
    services.auth.create_tenant(who, name.clone()).await?;
    services.registry.quotas().claimed(&name, &name);
    reply(StatusCode::CREATED, &Created { name: b.name, tenant: None, role: None })
}

/// Give a tenant another namespace (platform admin; see also `POST /api/v1/namespaces`).
#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/namespaces", operation_id = "addTenantNamespace", tag = "accounts",
    params(("tenant" = String, Path)), request_body = NameBody, responses((status = 201, body = Created)))]
async fn add_namespace(services: &Services, who: &Principal, tenant: AccountName, b: NameBody) -> Result<Reply, RegistryError> {
    let name: AccountName = b.name.parse()?;
    services.auth.require_platform_admin(who)?;
    let _admitted = services.registry.quotas().admit_namespace(&tenant).await?;
    services.auth.add_namespace(who, tenant.clone(), name.clone()).await?;
    services.registry.quotas().claimed(&name, &tenant);
    reply(StatusCode::CREATED, &Created { name: b.name, tenant: Some(tenant.to_string()), role: None })
}

/// Create a user in a tenant with a role (tenant admin).
#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/users", operation_id = "createUser", tag = "accounts",
    params(("tenant" = String, Path)), request_body = UserBody, responses((status = 201, body = Created)))]
async fn create_user(auth: &Auth, who: &Principal, tenant: AccountName, b: UserBody) -> Result<Reply, RegistryError> {
    auth.create_user(who, tenant.clone(), b.name.parse()?, &b.password, &b.role).await?;
    reply(StatusCode::CREATED, &Created { name: b.name, tenant: Some(tenant.to_string()), role: Some(b.role) })
}

/// Users the caller administers.
#[utoipa::path(get, path = "/api/v1/users", operation_id = "listUsers", tag = "accounts", responses((status = 200, body = UserList)))]
async fn list_users(auth: &Auth, who: &Principal) -> Result<Reply, RegistryError> {
    let users = auth.users(who).await?;
    let users = users.into_iter().map(|(u, t)| UserView { name: u.to_string(), tenant: t.map(|t| t.to_string()) }).collect();
    reply(StatusCode::OK, &UserList { users })
}

/// The caller's registry access tokens (all, for the platform admin).
#[utoipa::path(get, path = "/api/v1/tokens", operation_id = "listTokens", tag = "tokens", responses((status = 200, body = TokenList)))]
fn list_tokens(auth: &Auth, who: &Principal) -> Result<Reply, RegistryError> {
    reply(StatusCode::OK, &TokenList { tokens: auth.list_tokens(who).iter().map(token_view).collect() })
}

/// Issue a registry access token for `docker login` (12 h by default).
#[utoipa::path(post, path = "/api/v1/tokens", operation_id = "issueToken", tag = "tokens", request_body = TokenBody,
    responses((status = 201, body = IssuedToken)))]
async fn issue_token(auth: &Auth, identity: &Identity, b: TokenBody) -> Result<Reply, RegistryError> {
    let issued = auth.issue_access_token(identity, b.expires_in, b.description, b.scopes).await?;
    let docker_auth = berth_auth::secret::b64(&format!("{}:{}", issued.row.user, issued.token));
    let mut r = reply(StatusCode::CREATED, &IssuedToken { token_info: token_view(&issued.row), token: issued.token, docker_auth })?;
    set(&mut r, "cache-control", "no-store");
    Ok(r)
}

/// Revoke one token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", operation_id = "revokeToken", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204), (status = 404, description = "no such token of yours")))]
async fn revoke_token(auth: &Auth, who: &Principal, id: &str) -> Result<Reply, RegistryError> {
    auth.revoke_token(who, id).await?;
    no_content()
}

/// Revoke every token of the caller's own.
#[utoipa::path(delete, path = "/api/v1/tokens", operation_id = "revokeMyTokens", tag = "tokens", responses((status = 200, body = Revoked)))]
async fn revoke_my_tokens(auth: &Auth, who: &Principal) -> Result<Reply, RegistryError> {
    let me = who.user().ok_or_else(|| RegistryError::new(ErrorCode::Unauthorized))?;
    reply(StatusCode::OK, &Revoked { revoked: auth.revoke_user_tokens(who, me).await? })
}

/// A user's tokens, access and refresh (the user, their tenant's admin, the platform admin).
#[utoipa::path(get, path = "/api/v1/users/{user}/tokens", operation_id = "listUserTokens", tag = "accounts",
    params(("user" = String, Path)), responses((status = 200, body = TokenList), (status = 404, description = "no such user you administer")))]
async fn user_tokens(auth: &Auth, who: &Principal, user: &AccountName) -> Result<Reply, RegistryError> {
    reply(StatusCode::OK, &TokenList { tokens: auth.user_tokens(who, user).await?.iter().map(token_view).collect() })
}

/// Revoke every token of a user, and every token minted from them.
#[utoipa::path(delete, path = "/api/v1/users/{user}/tokens", operation_id = "revokeUserTokens", tag = "accounts",
    params(("user" = String, Path)), responses((status = 200, body = Revoked)))]
async fn revoke_user_tokens(auth: &Auth, who: &Principal, user: &AccountName) -> Result<Reply, RegistryError> {
    reply(StatusCode::OK, &Revoked { revoked: auth.revoke_user_tokens(who, user).await? })
}

/// Disable a user (every credential stops working; other replicas at their next
/// refresh, 2 s) or enable them again (their tenant's admin, the platform admin).
#[utoipa::path(put, path = "/api/v1/users/{user}/disabled", operation_id = "setUserDisabled", tag = "accounts",
    params(("user" = String, Path)), request_body = DisabledBody, responses((status = 204)))]
async fn set_user_disabled(auth: &Auth, who: &Principal, user: &AccountName, b: DisabledBody) -> Result<Reply, RegistryError> {
    auth.set_user_disabled(who, user, b.disabled).await?;
    no_content()
}

/// The live policy rules (platform admin); `?format=csv` for casbin CSV.
#[utoipa::path(get, path = "/api/v1/policies", operation_id = "listPolicies", tag = "policies",
    params(("format" = Option<String>, Query, description = "csv for casbin CSV")), responses((status = 200, body = RuleList)))]
fn list_policies(auth: &Auth, who: &Principal, csv: bool) -> Result<Reply, RegistryError> {
    let rules = auth.policy_rules(who)?;
    if csv {
        let mut r = json_response(StatusCode::OK, export_rules(&rules).into_bytes());
        set(&mut r, "content-type", "text/csv; charset=utf-8");
        return Ok(r);
    }
    reply(StatusCode::OK, &RuleList { version: auth.policy().version(), rules: rules.iter().map(rule).collect() })
}

/// Add a rule.
#[utoipa::path(post, path = "/api/v1/policies", operation_id = "addPolicyRule", tag = "policies", request_body = RuleBody,
    responses((status = 201, body = Rule)))]
async fn add_rule(auth: &Auth, who: &Principal, b: RuleBody) -> Result<Reply, RegistryError> {
    let r = validate_rule(&b.ptype, b.fields)?;
    auth.change_policy(who, vec![r.clone()], vec![]).await?;
    reply(StatusCode::CREATED, &rule(&r))
}

/// Remove a rule.
#[utoipa::path(post, path = "/api/v1/policies/remove", operation_id = "removePolicyRule", tag = "policies", request_body = RuleBody,
    responses((status = 204), (status = 404, description = "no such rule")))]
async fn remove_rule(auth: &Auth, who: &Principal, b: RuleBody) -> Result<Reply, RegistryError> {
    let r = validate_rule(&b.ptype, b.fields)?;
    if !auth.policy_rules(who)?.contains(&r) {
        return Err(RegistryError::new(ErrorCode::NotFound).with_detail("no such rule"));
    }
    auth.change_policy(who, vec![], vec![r]).await?;
    no_content()
}

/// Decide one request against the live policy.
#[utoipa::path(post, path = "/api/v1/policies/check", operation_id = "checkPolicy", tag = "policies", request_body = CheckBody,
    responses((status = 200, body = CheckResult)))]
fn check_policy(auth: &Auth, who: &Principal, b: CheckBody) -> Result<Reply, RegistryError> {
    let action: Action = b.action.parse()?;
    let d = auth.check_policy(who, &b.user, &b.tenant, &b.object, action)?;
    reply(StatusCode::OK, &CheckResult { allowed: d.allowed, rule: d.rule })
}

#[derive(Deserialize, utoipa::IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RotateParams {
    /// An emergency rotation (a leaked key): every older key stops verifying at
    /// once (here; on other replicas at their next refresh), so every bearer
    /// token issued before is refused.
    pub now: Option<bool>,
}

/// Rotate the bearer-token signing key (platform admin). Older keys verify
/// until the tokens they signed expire, unless `now`.
#[utoipa::path(post, path = "/api/v1/keys/rotate", operation_id = "rotateSigningKey", tag = "policies", params(RotateParams),
    responses((status = 200, body = Kid)))]
async fn rotate_key(auth: &Auth, who: &Principal, p: RotateParams) -> Result<Reply, RegistryError> {
    reply(StatusCode::OK, &Kid { kid: auth.rotate_signing_key(who, p.now.unwrap_or(false)).await? })
}

/// One security event of the audit log.
#[derive(Serialize, ToSchema)]
pub struct AuditEvent {
    /// When (milliseconds since the epoch).
    pub ms: i64,
    /// `login`, `login-failed`, `token-issued`, `token-revoked`, `password-changed`,
    /// `user-created`, `policy-changed`, `share-changed`, `visibility-changed`, `key-rotated`.
    pub action: String,
    /// The acting user, or the name a failed login tried.
    pub actor: Option<String>,
    /// The client's address.
    pub source: Option<String>,
    /// What it was done to (a token id, a user, a repository).
    pub target: Option<String>,
    pub detail: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditList {
    pub events: Vec<AuditEvent>,
}

#[derive(Deserialize, utoipa::IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Events at or after this time (ms since the epoch; default: the last 24 hours).
    pub since_ms: Option<i64>,
    /// Only this action.
    pub action: Option<String>,
    /// At most this many, newest first (1–1000, default 100).
    pub limit: Option<i64>,
}

/// The security audit log, newest first (platform admin).
#[utoipa::path(get, path = "/api/v1/audit", operation_id = "listAuditEvents", tag = "accounts", params(AuditParams),
    responses((status = 200, body = AuditList), (status = 403, description = "platform admin only")))]
async fn audit(auth: &Auth, who: &Principal, p: AuditParams) -> Result<Reply, RegistryError> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(RegistryError::new(ErrorCode::InvalidRequest).with_detail("limit must be 1 to 1000"));
    }
    if p.action.as_ref().is_some_and(|a| a.len() > 64 || !a.chars().all(|c| c.is_ascii_lowercase() || c == '-')) {
        return Err(RegistryError::new(ErrorCode::InvalidRequest).with_detail("action: lowercase letters and dashes"));
    }
    let rows = auth.audit_events(who, p.since_ms, p.action.as_deref(), limit as usize).await?;
    let events = rows
        .into_iter()
        .map(|r| AuditEvent { ms: r.ms, action: r.action, actor: r.actor, source: r.source, target: r.target, detail: r.detail })
        .collect();
    reply(StatusCode::OK, &AuditList { events })
}

/// `…/visibility` and `…/shares[/<tenant>]` without the `/-/` separator of the
/// repository endpoints (see `manage`).
fn is_old_style(segs: &[&str]) -> bool {
    !segs.contains(&"-") && (segs.last() == Some(&"visibility") || segs.iter().rev().take(2).any(|s| *s == "shares"))
}

/// `/api/v1/repositories/<name…>/visibility` and `/…/shares[/<tenant>]`; the
/// name has any number of components, so it is read up to the keyword.
async fn repository(services: &Services, who: &Principal, segs: &[&str], req: &mut Request) -> Result<Reply, RegistryError> {
    let auth = &*services.auth;
    let path = segs.join("/");
    let (name, tail): (String, Vec<&str>) = if let Some(i) = segs.iter().rposition(|s| *s == "shares") {
        (segs[..i].join("/"), segs[i..].to_vec())
    } else if segs.last() == Some(&"visibility") {
        (segs[..segs.len() - 1].join("/"), vec!["visibility"])
    } else {
        return Err(not_found(&format!("repositories/{path}")));
    };
    let repo: RepoName = name.parse()?;
    let m = req.method.clone();
    match (tail.as_slice(), &m) {
        (["visibility"], &Method::GET) => {
            reply(StatusCode::OK, &Visibility { repository: repo.to_string(), public: auth.is_public(&repo) })
        }
        (["visibility"], &Method::PUT) => set_visibility(auth, who, &repo, body(req).await?).await,
        (["shares"], &Method::GET) => list_shares(auth, who, &repo).await,
        (["shares", t], &Method::GET) => get_share(auth, who, &repo, t.parse()?).await,
        (["shares", t], &Method::PUT) => share(auth, who, &repo, t.parse()?, body(req).await?).await,
        (["shares", t], &Method::DELETE) => unshare(auth, who, &repo, t.parse()?).await,
        (_, m) => Err(method_not_allowed(m)),
    }
}

/// Make a repository public (anonymous pull) or private (repository admin).
#[utoipa::path(put, path = "/api/v1/repositories/{name}/visibility", operation_id = "setVisibility", tag = "repositories",
    params(("name" = String, Path)), request_body = VisibilityBody, responses((status = 200, body = Visibility)))]
async fn set_visibility(auth: &Auth, who: &Principal, repo: &RepoName, b: VisibilityBody) -> Result<Reply, RegistryError> {
    auth.set_public(who, repo, b.public).await?;
    reply(StatusCode::OK, &Visibility { repository: repo.to_string(), public: b.public })
}

/// The tenants a repository is shared with (repository admin).
#[utoipa::path(get, path = "/api/v1/repositories/{name}/shares", operation_id = "listShares", tag = "repositories",
    params(("name" = String, Path)), responses((status = 200, body = ShareList)))]
async fn list_shares(auth: &Auth, who: &Principal, repo: &RepoName) -> Result<Reply, RegistryError> {
    let shares = auth.shares(who, repo).await?;
    let shares =
        shares.into_iter().map(|s| ShareView { tenant: s.tenant.to_string(), actions: s.actions, expires_ms: s.expires_ms }).collect();
    reply(StatusCode::OK, &ShareList { shares })
}

/// Every share the caller granted (of the repositories and namespaces they administer).
#[utoipa::path(get, path = "/api/v1/shares", operation_id = "listGrantedShares", tag = "repositories",
    responses((status = 200, body = GrantedList)))]
async fn list_granted_shares(auth: &Auth, who: &Principal) -> Result<Reply, RegistryError> {
    let rows = auth.shares_granted(who).await?;
    let mut shares: Vec<Granted> = rows
        .into_iter()
        .map(|s| Granted {
            repository: Some(s.repo.to_string()),
            namespace: None,
            tenant: s.tenant.to_string(),
            actions: s.actions,
            expires_ms: s.expires_ms,
        })
        .collect();
    shares.extend(auth.ns_shares_granted(who).await?.into_iter().map(|s| Granted {
        repository: None,
        namespace: Some(s.namespace.to_string()),
        tenant: s.tenant.to_string(),
        actions: s.actions,
        expires_ms: s.expires_ms,
    }));
    reply(StatusCode::OK, &GrantedList { shares })
}

/// Whether a repository is shared with a tenant (404 if not).
#[utoipa::path(get, path = "/api/v1/repositories/{name}/shares/{tenant}", operation_id = "getShare", tag = "repositories",
    params(("name" = String, Path), ("tenant" = String, Path)), responses((status = 200, body = ShareView), (status = 404, description = "not shared")))]
async fn get_share(auth: &Auth, who: &Principal, repo: &RepoName, tenant: AccountName) -> Result<Reply, RegistryError> {
    let found = auth.shares(who, repo).await?.into_iter().find(|s| s.tenant == tenant);
    let s = found.ok_or_else(|| RegistryError::new(ErrorCode::NotFound).with_detail(format!("{repo} is not shared with {tenant}")))?;
    reply(StatusCode::OK, &ShareView { tenant: s.tenant.to_string(), actions: s.actions, expires_ms: s.expires_ms })
}

/// Share a repository with another tenant for pull (or pull and push), optionally until a time.
#[utoipa::path(put, path = "/api/v1/repositories/{name}/shares/{tenant}", operation_id = "shareRepository", tag = "repositories",
    params(("name" = String, Path), ("tenant" = String, Path)), request_body = ShareBody, responses((status = 200, body = Shared)))]
async fn share(auth: &Auth, who: &Principal, repo: &RepoName, tenant: AccountName, b: ShareBody) -> Result<Reply, RegistryError> {
    auth.share(who, repo, tenant.clone(), b.push, b.expires_in).await?;
    reply(StatusCode::OK, &Shared { repository: repo.to_string(), tenant: tenant.to_string(), push: b.push, expires_in: b.expires_in })
}

/// Withdraw a share.
#[utoipa::path(delete, path = "/api/v1/repositories/{name}/shares/{tenant}", operation_id = "unshareRepository", tag = "repositories",
    params(("name" = String, Path), ("tenant" = String, Path)), responses((status = 204)))]
async fn unshare(auth: &Auth, who: &Principal, repo: &RepoName, tenant: AccountName) -> Result<Reply, RegistryError> {
    auth.unshare(who, repo, tenant).await?;
    no_content()
}

/// The account, token and policy routes, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        me,
        change_password,
        list_tenants,
        create_tenant,
        add_namespace,
        create_user,
        list_users,
        list_tokens,
        issue_token,
        revoke_token,
        revoke_my_tokens,
        user_tokens,
        revoke_user_tokens,
        set_user_disabled,
        list_policies,
        add_rule,
        remove_rule,
        check_policy,
        rotate_key,
        audit,
        set_visibility,
        list_shares,
        share,
        unshare
    ),
    components(schemas(
        TokenView,
        IssuedToken,
        TokenList,
        Revoked,
        Me,
        TenantView,
        TenantList,
        Created,
        UserView,
        UserList,
        Rule,
        RuleList,
        CheckResult,
        Kid,
        AuditEvent,
        AuditList,
        Visibility,
        ShareView,
        ShareList,
        Shared,
        NameBody,
        UserBody,
        PasswordBody,
        DisabledBody,
        TokenBody,
        RuleBody,
        CheckBody,
        VisibilityBody,
        ShareBody
    ))
)]
pub struct AccountDoc;
