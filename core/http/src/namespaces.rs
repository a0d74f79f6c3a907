//! Namespaces under `/api/v1/namespaces`: create (for a tenant), list, get with
//! figures, update, delete (refused while it holds repositories unless
//! `force=true`, which deletes them first), and a name check. Access is decided
//! by `Auth` (namespace readers are its tenant's members; changes need its
//! administrator).

use std::collections::BTreeMap;

use berth_auth::Identity;
use berth_metadata::{NamespacePatch, NamespaceProfile, NamespaceStats};
use berth_oci::{AccountName, ErrorCode, RegistryError};
use berth_registry::manage::{Page as ServicePage, RepoQuery};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use warp::http::{Method, StatusCode};

use crate::manage::{bad, body, check_labels, check_text, host, page, paging, query, reply, Page};
use crate::{method_not_allowed, Reply, Request, Services};

/// A namespace with its figures.
#[derive(Serialize, ToSchema)]
pub struct Namespace {
    pub name: String,
    pub tenant: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub project_id: String,
    /// Repositories created in it through the API start public.
    pub public_default: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub repository_count: u64,
    /// Bytes its repositories reference, each blob counted once.
    pub storage_bytes: u64,
    /// `host[:port]/namespace`.
    pub registry_address: String,
}

/// `POST /api/v1/namespaces`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNamespace {
    pub name: String,
    /// The owning tenant; defaults to the caller's.
    pub tenant: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub project_id: String,
    #[serde(default)]
    pub public_default: bool,
}

/// `PATCH /api/v1/namespaces/{name}`: absent fields stay.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateNamespace {
    pub description: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub project_id: Option<String>,
    pub public_default: Option<bool>,
}

/// The answer of a name check.
#[derive(Serialize, ToSchema)]
pub struct NameCheck {
    pub name: String,
    /// The name follows the grammar and is not reserved.
    pub valid: bool,
    /// Valid and not taken by any tenant's namespace.
    pub available: bool,
    /// Why not, when it is not available.
    pub reason: Option<String>,
}

/// What deleting a namespace removed.
#[derive(Serialize, ToSchema)]
pub struct NamespaceDeleted {
    pub name: String,
    pub repositories: Vec<String>,
}

#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NamespaceListParams {
    pub tenant: Option<String>,
    pub keyword: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NameCheckParams {
    pub name: String,
}

#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// Delete its repositories (and all their images) first.
    pub force: Option<bool>,
}

fn view(p: NamespaceProfile, st: NamespaceStats, host: &str) -> Namespace {
    Namespace {
        registry_address: format!("{host}/{}", p.name),
        name: p.name.to_string(),
        tenant: p.tenant.to_string(),
        description: p.description,
        labels: p.labels,
        project_id: p.project_id,
        public_default: p.public_default,
        created_ms: p.created_ms,
        updated_ms: p.updated_ms,
        repository_count: st.repository_count,
        storage_bytes: st.storage_bytes,
    }
}

/// Serve `/api/v1/namespaces[/…]`.
pub(crate) async fn handle(services: &Services, identity: &Identity, rest: &str, req: &mut Request) -> Result<Reply, RegistryError> {
    let rest = rest.trim_matches('/');
    let host = host(services, req);
    let m = req.method.clone();
    match (rest, &m) {
        ("", &Method::GET) => list(services, identity, query(req)?, &host).await,
        ("", &Method::POST) => create(services, identity, req, &host).await,
        ("check", &Method::GET) => check(services, query(req)?),
        ("" | "check", m) => Err(method_not_allowed(m)),
        (path, _) if path.split('/').nth(1) == Some("retention") => {
            let segs: Vec<&str> = path.split('/').collect();
            let ns: AccountName = segs[0].parse()?;
            crate::retention::handle(services, identity, berth_registry::retention::Scope::Namespace(ns), &segs[2..], req).await
        }
        (path, _) if path.split('/').nth(1) == Some("shares") => {
            let segs: Vec<&str> = path.split('/').collect();
            let ns: AccountName = segs[0].parse()?;
            match (&segs[2..], &m) {
                ([], &Method::GET) => list_shares(services, identity, &ns).await,
                ([t], &Method::GET) => get_share(services, identity, &ns, t.parse()?).await,
                ([t], &Method::PUT) => share(services, identity, &ns, t.parse()?, body(req).await?).await,
                ([t], &Method::DELETE) => unshare(services, identity, &ns, t.parse()?).await,
                ([] | [_], m) => Err(method_not_allowed(m)),
                _ => Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no such endpoint: /api/v1/namespaces/{rest}"))),
            }
        }
        (name, _) if name.contains('/') => {
            Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no such endpoint: /api/v1/namespaces/{rest}")))
        }
        (name, &Method::GET) => get(services, identity, &name.parse()?, &host).await,
        (name, &Method::PATCH) => update(services, identity, &name.parse()?, req, &host).await,
        (name, &Method::DELETE) => delete(services, identity, &name.parse()?, query(req)?).await,
        (_, m) => Err(method_not_allowed(m)),
    }
}

/// Namespaces the caller may see (its tenant's; all for the platform admin).
#[utoipa::path(operation_id = "listNamespaces", get, path = "/api/v1/namespaces", params(NamespaceListParams), tag = "namespaces",
    responses((status = 200, body = Page<Namespace>)))]
async fn list(services: &Services, identity: &Identity, p: NamespaceListParams, host: &str) -> Result<Reply, RegistryError> {
    let (limit, offset) = paging(p.limit, p.offset)?;
    let tenant: Option<AccountName> = p.tenant.as_deref().map(str::parse).transpose()?;
    if let Some(k) = &p.keyword {
        check_text("keyword", k, 256)?;
    }
    let keyword = p.keyword.map(|k| k.to_lowercase());
    let mut all = services.auth.visible_namespaces(&identity.principal).await?;
    all.retain(|n| {
        tenant.as_ref().is_none_or(|t| &n.tenant == t)
            && keyword.as_ref().is_none_or(|k| n.name.as_str().contains(k.as_str()) || n.description.to_lowercase().contains(k.as_str()))
    });
    let total = all.len();
    let mut items = Vec::new();
    for n in all.into_iter().skip(offset).take(limit) {
        let st = services.auth.namespace_stats(&n.name).await?;
        items.push((n, st));
    }
    reply(StatusCode::OK, &page(ServicePage { items, total }, limit, offset, |(n, st)| view(n, st, host)))
}

/// Create a namespace for a tenant.
#[utoipa::path(operation_id = "createNamespace", post, path = "/api/v1/namespaces", request_body = CreateNamespace, tag = "namespaces",
    responses((status = 201, body = Namespace), (status = 409, description = "taken")))]
async fn create(services: &Services, identity: &Identity, req: &mut Request, host: &str) -> Result<Reply, RegistryError> {
    let b: CreateNamespace = body(req).await?;
    let name: AccountName = b.name.parse()?;
    let tenant: AccountName = match b.tenant {
        Some(t) => t.parse()?,
        None => services.auth.tenant_of_user(&identity.principal).await?.ok_or_else(|| bad("tenant is required for a platform user"))?,
    };
    check_text("description", &b.description, 4096)?;
    check_text("project_id", &b.project_id, 128)?;
    check_labels(&b.labels)?;
    let now = crate::now_ms();
    let p = NamespaceProfile {
        name: name.clone(),
        tenant,
        description: b.description,
        labels: b.labels,
        project_id: b.project_id,
        public_default: b.public_default,
        created_ms: now,
        updated_ms: now,
    };
    services.auth.require_tenant_admin(&identity.principal, &p.tenant)?;
    let _admitted = services.registry.quotas().admit_namespace(&p.tenant).await?;
    let tenant = p.tenant.clone();
    services.auth.create_namespace(&identity.principal, p).await?;
    services.registry.quotas().claimed(&name, &tenant);
    let (p, st) = services.auth.namespace(&identity.principal, &name).await?;
    reply(StatusCode::CREATED, &view(p, st, host))
}

/// Whether a name could be a new namespace, and if not, why.
#[utoipa::path(operation_id = "checkNamespaceName", get, path = "/api/v1/namespaces/check", params(NameCheckParams), tag = "namespaces", responses((status = 200, body = NameCheck)))]
fn check(services: &Services, p: NameCheckParams) -> Result<Reply, RegistryError> {
    let c = match p.name.parse::<AccountName>() {
        Err(e) => NameCheck { name: p.name, valid: false, available: false, reason: Some(e.detail_or_message()) },
        Ok(n) if services.auth.tenant_of_namespace(&n).is_some() => {
            NameCheck { name: p.name, valid: true, available: false, reason: Some("the name is taken".into()) }
        }
        Ok(_) => NameCheck { name: p.name, valid: true, available: true, reason: None },
    };
    reply(StatusCode::OK, &c)
}

/// One namespace with its figures.
#[utoipa::path(operation_id = "getNamespace", get, path = "/api/v1/namespaces/{name}", params(("name" = String, Path)), tag = "namespaces",
    responses((status = 200, body = Namespace), (status = 404, description = "unknown or not visible")))]
async fn get(services: &Services, identity: &Identity, name: &AccountName, host: &str) -> Result<Reply, RegistryError> {
    let (p, st) = services.auth.namespace(&identity.principal, name).await?;
    reply(StatusCode::OK, &view(p, st, host))
}

/// Change a namespace's profile.
#[utoipa::path(operation_id = "updateNamespace", patch, path = "/api/v1/namespaces/{name}", params(("name" = String, Path)), request_body = UpdateNamespace,
    tag = "namespaces", responses((status = 200, body = Namespace)))]
async fn update(
    services: &Services,
    identity: &Identity,
    name: &AccountName,
    req: &mut Request,
    host: &str,
) -> Result<Reply, RegistryError> {
    let b: UpdateNamespace = body(req).await?;
    if let Some(d) = &b.description {
        check_text("description", d, 4096)?;
    }
    if let Some(p) = &b.project_id {
        check_text("project_id", p, 128)?;
    }
    if let Some(l) = &b.labels {
        check_labels(l)?;
    }
    let patch = NamespacePatch { description: b.description, labels: b.labels, project_id: b.project_id, public_default: b.public_default };
    services.auth.update_namespace(&identity.principal, name, &patch).await?;
    let (p, st) = services.auth.namespace(&identity.principal, name).await?;
    reply(StatusCode::OK, &view(p, st, host))
}

/// Delete a namespace; with `force=true` its repositories go first.
#[utoipa::path(operation_id = "deleteNamespace", delete, path = "/api/v1/namespaces/{name}", params(("name" = String, Path), DeleteParams), tag = "namespaces",
    responses((status = 200, body = NamespaceDeleted), (status = 409, description = "not empty")))]
async fn delete(services: &Services, identity: &Identity, name: &AccountName, p: DeleteParams) -> Result<Reply, RegistryError> {
    services.auth.require_namespace_admin(&identity.principal, name)?;
    if services.auth.tenant_of_namespace(name).as_ref() == Some(name) {
        return Err(bad(format!("{name} is its tenant's own namespace; it goes with the tenant")));
    }
    let q = RepoQuery { namespaces: Some(vec![name.clone()]), limit: usize::MAX, ..Default::default() };
    services.registry.fresh_catalog().await?;
    let repos = services.registry.list_repos(&q, services.registry.repo_names(&q, |_| true)).await?.items;
    if !repos.is_empty() && !p.force.unwrap_or(false) {
        return Err(RegistryError::new(ErrorCode::Conflict)
            .with_detail(format!("namespace {name} holds {} repositories; delete them or pass force=true", repos.len())));
    }
    let mut deleted = Vec::new();
    for r in repos {
        let repo = r.profile.name;
        services.registry.delete_repo(&repo, identity.principal.subject()).await?;
        services.auth.repo_deleted(&repo).await?;
        deleted.push(repo.to_string());
    }
    services.auth.delete_namespace(&identity.principal, name).await?;
    reply(StatusCode::OK, &NamespaceDeleted { name: name.to_string(), repositories: deleted })
}

/// A namespace shared with a tenant: every repository in it, present and future.
#[derive(Serialize, ToSchema)]
pub struct NamespaceShare {
    pub namespace: String,
    pub tenant: String,
    /// `pull`, or `pull` and `push`.
    pub actions: Vec<String>,
    /// When the share lapses (ms since the epoch); `null`: never.
    pub expires_ms: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct NamespaceShareList {
    pub shares: Vec<NamespaceShare>,
}

fn share_view(s: berth_metadata::NsShareRow) -> NamespaceShare {
    NamespaceShare { namespace: s.namespace.to_string(), tenant: s.tenant.to_string(), actions: s.actions, expires_ms: s.expires_ms }
}

/// The tenants a namespace is shared with (namespace admin).
#[utoipa::path(operation_id = "listNamespaceShares", get, path = "/api/v1/namespaces/{name}/shares", params(("name" = String, Path)),
    tag = "namespaces", responses((status = 200, body = NamespaceShareList)))]
async fn list_shares(services: &Services, identity: &Identity, ns: &AccountName) -> Result<Reply, RegistryError> {
    let shares = services.auth.namespace_shares(&identity.principal, ns).await?.into_iter().map(share_view).collect();
    reply(StatusCode::OK, &NamespaceShareList { shares })
}

/// Whether a namespace is shared with a tenant (404 if not).
#[utoipa::path(operation_id = "getNamespaceShare", get, path = "/api/v1/namespaces/{name}/shares/{tenant}",
    params(("name" = String, Path), ("tenant" = String, Path)), tag = "namespaces",
    responses((status = 200, body = NamespaceShare), (status = 404, description = "not shared")))]
async fn get_share(services: &Services, identity: &Identity, ns: &AccountName, tenant: AccountName) -> Result<Reply, RegistryError> {
    let found = services.auth.namespace_shares(&identity.principal, ns).await?.into_iter().find(|s| s.tenant == tenant);
    let s = found.ok_or_else(|| RegistryError::new(ErrorCode::NotFound).with_detail(format!("{ns} is not shared with {tenant}")))?;
    reply(StatusCode::OK, &share_view(s))
}

/// Share every repository of a namespace, present and future, with another
/// tenant for pull (or pull and push), optionally until a time; replaces an
/// earlier share with that tenant.
#[utoipa::path(operation_id = "shareNamespace", put, path = "/api/v1/namespaces/{name}/shares/{tenant}",
    params(("name" = String, Path), ("tenant" = String, Path)), request_body = crate::api::ShareBody, tag = "namespaces",
    responses((status = 200, body = NamespaceShare)))]
async fn share(
    services: &Services,
    identity: &Identity,
    ns: &AccountName,
    tenant: AccountName,
    b: crate::api::ShareBody,
) -> Result<Reply, RegistryError> {
    services.auth.share_namespace(&identity.principal, ns, tenant.clone(), b.push, b.expires_in).await?;
    let found = services.auth.namespace_shares(&identity.principal, ns).await?.into_iter().find(|s| s.tenant == tenant);
    let s = found.ok_or_else(|| RegistryError::internal().with_detail("share not stored"))?;
    reply(StatusCode::OK, &share_view(s))
}

/// Withdraw a namespace share.
#[utoipa::path(operation_id = "unshareNamespace", delete, path = "/api/v1/namespaces/{name}/shares/{tenant}",
    params(("name" = String, Path), ("tenant" = String, Path)), tag = "namespaces", responses((status = 204)))]
async fn unshare(services: &Services, identity: &Identity, ns: &AccountName, tenant: AccountName) -> Result<Reply, RegistryError> {
    services.auth.unshare_namespace(&identity.principal, ns, tenant).await?;
    Ok(crate::no_content())
}

/// The namespace routes, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list, create, check, get, update, delete, list_shares, get_share, share, unshare),
    components(schemas(Namespace, CreateNamespace, UpdateNamespace, NameCheck, NamespaceDeleted, NamespaceShare, NamespaceShareList))
)]
pub struct NamespaceDoc;
