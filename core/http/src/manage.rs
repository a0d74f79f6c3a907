//! Repository and tag management under `/api/v1/repositories`: typed request and
//! response bodies (the OpenAPI document is generated from them and from the
//! `#[utoipa::path]` of each handler), one pagination shape ([`Page`]).
//!
//! A repository name has any number of `/`-separated components, so its
//! sub-resources follow a `/-/` separator, which no name component can be:
//! `/api/v1/repositories/acme/team/app/-/tags`. A name may also be sent
//! percent-encoded (`acme%2Fteam%2Fapp`).
//!
//! Access: every call is authorized by `Auth` for the repository and action of
//! [`required`] before the service is called; listings keep only what the caller
//! may pull (or push, for `scope=mine`).

use std::collections::BTreeMap;

use berth_auth::{Action, Auth, Identity, Listed};
use berth_metadata::{RepoPatch, TagInfo};
use berth_oci::{AccountName, Digest, ErrorCode, Reference, RegistryError, RepoName, Tag};
use berth_registry::manage::{Page as ServicePage, RepoQuery, RepoSort, RepoSummary, TagStatus};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use warp::http::{Method, StatusCode};

use crate::{json_response, method_not_allowed, Reply, Request, Services};

const MAX_BODY: usize = 256 * 1024;
/// Page size when `limit` is not given, and the largest accepted.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// One page of a listing.
#[derive(Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Items matching the query in all pages.
    pub total_count: usize,
    pub limit: usize,
    pub offset: usize,
}

/// A repository with its figures.
#[derive(Serialize, ToSchema)]
pub struct Repository {
    /// Full name, `namespace/…`.
    pub name: String,
    pub namespace: String,
    /// The tenant owning the namespace.
    pub tenant: Option<String>,
    /// What `docker pull` takes: `host[:port]/name`.
    pub registry_address: String,
    pub description: String,
    pub category: String,
    pub labels: BTreeMap<String, String>,
    pub public: bool,
    pub status: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub pull_count: u64,
    pub push_count: u64,
    pub last_pulled_ms: Option<i64>,
    pub last_pushed_ms: Option<i64>,
    pub tag_count: u64,
    /// Manifests (images and indexes) stored in the repository.
    pub image_count: u64,
    /// Bytes referenced: linked blobs plus manifests.
    pub size_bytes: u64,
    pub latest_tag: Option<String>,
}

/// A tag with its manifest's facts and counters.
#[derive(Serialize, ToSchema)]
pub struct TagView {
    pub name: String,
    pub digest: String,
    pub media_type: String,
    pub manifest_size: u64,
    /// The image's bytes: manifest, config and layers; for an index, its platforms' too.
    pub size: u64,
    pub pushed_ms: i64,
    pub push_count: u64,
    pub pull_count: u64,
    pub last_pulled_ms: Option<i64>,
}

/// One platform of a multi-platform image.
#[derive(Serialize, ToSchema)]
pub struct PlatformView {
    /// The index's platform object (`os`, `architecture`, `variant`, …).
    #[schema(value_type = Object)]
    pub platform: Option<serde_json::Value>,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// A tag with its manifest: the bytes decoded, and the platforms of an index.
#[derive(Serialize, ToSchema)]
pub struct TagDetail {
    #[serde(flatten)]
    pub tag: TagView,
    /// `created` from the image's config, when it says.
    pub created: Option<String>,
    /// The manifest as stored, decoded.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    /// For a multi-platform image: each platform's manifest and size.
    pub platforms: Vec<PlatformView>,
    /// What plugin gates found when it was pushed.
    pub findings: Vec<FindingView>,
}

/// One finding of a plugin gate.
#[derive(Serialize, ToSchema)]
pub struct FindingView {
    /// The plugin instance that found it.
    pub plugin: String,
    pub rule: String,
    /// info, low, medium, high or critical.
    pub severity: String,
    pub message: String,
}

/// `POST /api/v1/repositories`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRepository {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Make it pullable anonymously (needs repository admin rights).
    #[serde(default)]
    pub public: bool,
}

/// `PATCH /api/v1/repositories/{name}`: absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRepository {
    pub description: Option<String>,
    pub category: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub public: Option<bool>,
}

/// What deleting a repository removed.
#[derive(Serialize, ToSchema)]
pub struct RepositoryDeleted {
    pub name: String,
    pub tags: u64,
    pub manifests: u64,
    pub blob_links: u64,
}

/// `POST …/-/manifests/delete`: remove manifests by tag status.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkDelete {
    /// `untagged`: every manifest no tag points at (referrers of kept manifests
    /// and children of kept indexes stay); `tagged`: every tagged manifest with
    /// its tags.
    pub status: String,
}

/// The digests a bulk delete removed.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    pub deleted: Vec<String>,
}

/// Query of `GET /api/v1/repositories`.
#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RepoListParams {
    /// `all` (default: every repository the caller may pull), `mine` (those the
    /// caller may push), `public` (anonymously pullable ones), `shared` (those
    /// other tenants shared with the caller's).
    pub scope: Option<String>,
    pub namespace: Option<String>,
    pub tenant: Option<String>,
    /// Case-insensitive part of the name or description.
    pub keyword: Option<String>,
    /// `key:value[,key:value…]`: all must match.
    pub labels: Option<String>,
    pub public: Option<bool>,
    /// `name` (default), `updated` or `pulls`.
    pub sort: Option<String>,
    /// `asc` (default) or `desc`.
    pub order: Option<String>,
    /// 0 to 1000, default 100.
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// Query of `GET …/-/tags`.
#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TagListParams {
    pub keyword: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

pub(crate) fn bad(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::InvalidRequest).with_detail(detail.into())
}

pub(crate) fn query<T: DeserializeOwned + Default>(req: &Request) -> Result<T, RegistryError> {
    serde_urlencoded::from_str(&req.query).map_err(|e| bad(format!("invalid query: {e}")))
}

pub(crate) async fn body<T: DeserializeOwned>(req: &mut Request) -> Result<T, RegistryError> {
    body_limited(req, MAX_BODY).await
}

/// [`body`] for the few requests that carry more than `MAX_BODY` (a plugin's component).
pub(crate) async fn body_limited<T: DeserializeOwned>(req: &mut Request, limit: usize) -> Result<T, RegistryError> {
    let b = crate::read_json_body(req, limit).await?;
    serde_json::from_slice(&b).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

pub(crate) fn reply<T: Serialize>(status: StatusCode, v: &T) -> Result<Reply, RegistryError> {
    Ok(json_response(status, serde_json::to_vec(v).map_err(|e| RegistryError::internal().with_detail(e.to_string()))?))
}

/// `limit` and `offset` checked: negative or oversized values are refused, not clamped.
pub(crate) fn paging(limit: Option<i64>, offset: Option<i64>) -> Result<(usize, usize), RegistryError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT as i64);
    if !(0..=MAX_LIMIT as i64).contains(&limit) {
        return Err(bad(format!("limit must be between 0 and {MAX_LIMIT}")));
    }
    let offset = offset.unwrap_or(0);
    if offset < 0 {
        return Err(bad("offset must not be negative"));
    }
    Ok((limit as usize, usize::try_from(offset).unwrap_or(usize::MAX)))
}

pub(crate) fn page<T, U>(p: ServicePage<T>, limit: usize, offset: usize, f: impl Fn(T) -> U) -> Page<U> {
    Page { items: p.items.into_iter().map(f).collect(), total_count: p.total, limit, offset }
}

/// What a management operation requires on its repository.
fn required(op: Op) -> Action {
    match op {
        Op::Get | Op::Tags | Op::Tag => Action::Pull,
        Op::Create | Op::Update => Action::Push,
        Op::Delete | Op::DeleteTag | Op::DeleteManifest | Op::BulkDelete => Action::Delete,
    }
}

#[derive(Clone, Copy)]
enum Op {
    Get,
    Create,
    Update,
    Delete,
    Tags,
    Tag,
    DeleteTag,
    DeleteManifest,
    BulkDelete,
}

fn authorize(auth: &Auth, identity: &Identity, repo: &RepoName, op: Op) -> Result<(), RegistryError> {
    crate::gate::authorize_api(auth, identity, repo, required(op))
}

pub(crate) fn host(services: &Services, req: &Request) -> String {
    let base = crate::gate::external_base(&services.auth, req);
    base.split_once("://").map(|(_, h)| h.to_owned()).unwrap_or(base)
}

fn repository(services: &Services, host: &str, s: RepoSummary) -> Repository {
    let (p, st) = (s.profile, s.stats);
    Repository {
        registry_address: format!("{host}/{}", p.name),
        namespace: p.name.namespace().to_owned(),
        tenant: services.auth.tenant_of(&p.name).map(|t| t.to_string()),
        public: services.auth.is_public(&p.name),
        status: "active".into(),
        name: p.name.to_string(),
        description: p.description,
        category: p.category,
        labels: p.labels,
        created_ms: p.created_ms,
        updated_ms: p.updated_ms,
        pull_count: p.pulls,
        push_count: p.pushes,
        last_pulled_ms: p.last_pulled_ms,
        last_pushed_ms: p.last_pushed_ms,
        tag_count: st.tag_count,
        image_count: st.manifest_count,
        size_bytes: st.size,
        latest_tag: st.latest_tag.map(|t| t.to_string()),
    }
}

fn tag_view(t: TagInfo) -> TagView {
    TagView {
        name: t.name.to_string(),
        digest: t.digest.to_string(),
        media_type: t.media_type,
        manifest_size: t.manifest_size,
        size: t.size.max(t.manifest_size),
        pushed_ms: t.pushed_ms,
        push_count: t.pushes,
        pull_count: t.pulls,
        last_pulled_ms: t.last_pulled_ms,
    }
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, RegistryError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once(':').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| bad(format!("label {p:?} is not key:value"))))
        .collect()
}

pub(crate) fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    if labels.len() > 64 {
        return Err(bad("at most 64 labels"));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty() && k.len() <= 128 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !key_ok || v.len() > 256 {
            return Err(bad(format!("label {k:?}: keys are 1-128 of [A-Za-z0-9-_./], values at most 256 bytes")));
        }
    }
    Ok(())
}

pub(crate) fn check_text(what: &str, s: &str, max: usize) -> Result<(), RegistryError> {
    if s.len() > max {
        return Err(bad(format!("{what} is longer than {max} bytes")));
    }
    Ok(())
}

/// Serve `/api/v1/repositories[/…]` (`rest` is what follows `repositories`).
pub(crate) async fn handle(services: &Services, identity: &Identity, rest: &str, req: &mut Request) -> Result<Reply, RegistryError> {
    let rest = rest.trim_matches('/');
    let m = req.method.clone();
    // Nothing borrowed from the request lives across an await (its body is not Sync).
    let host = host(services, req);
    if rest.is_empty() {
        return match m {
            Method::GET => list(services, identity, query(req)?, &host).await,
            Method::POST => create(services, identity, req, &host).await,
            m => Err(method_not_allowed(&m)),
        };
    }
    if rest == "-/check" {
        return match m {
            Method::GET => check_name(services, identity, query(req)?).await,
            m => Err(method_not_allowed(&m)),
        };
    }
    let (name, sub) = match rest.split_once("/-/") {
        Some((n, s)) => (n, Some(s)),
        None => (rest.strip_suffix("/-").unwrap_or(rest), None),
    };
    let repo: RepoName = crate::route::percent_decode(name).ok_or_else(|| bad("bad percent-encoding in the name"))?.parse()?;
    let sub: Vec<&str> = sub.map(|s| s.split('/').collect()).unwrap_or_default();
    match (sub.as_slice(), &m) {
        ([], &Method::GET) => get(services, identity, &repo, &host).await,
        ([], &Method::PATCH) => update(services, identity, &repo, req, &host).await,
        ([], &Method::DELETE) => delete(services, identity, &repo).await,
        (["tags"], &Method::GET) => tags(services, identity, &repo, query(req)?).await,
        (["tags", t], &Method::GET) => tag(services, identity, &repo, t.parse()?).await,
        (["tags", t], &Method::DELETE) => delete_tag(services, identity, &repo, t.parse()?).await,
        (["manifests", d], &Method::DELETE) => {
            let d = crate::route::percent_decode(d).ok_or_else(|| bad("bad percent-encoding in the digest"))?;
            delete_manifest(services, identity, &repo, d.parse()?).await
        }
        (["manifests", "delete"], &Method::POST) => bulk_delete(services, identity, &repo, req).await,
        (["retention", rest @ ..], _) => {
            crate::retention::handle(services, identity, berth_registry::retention::Scope::Repository(repo), rest, req).await
        }
        ([] | ["tags"] | ["tags", _] | ["manifests", _], m) => Err(method_not_allowed(m)),
        _ => Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no such endpoint: /api/v1/repositories/{rest}"))),
    }
}

/// List repositories the caller may see, filtered, sorted and paged.
#[utoipa::path(operation_id = "listRepositories", get, path = "/api/v1/repositories", params(RepoListParams), tag = "repositories",
    responses((status = 200, body = Page<Repository>), (status = 400, description = "bad query")))]
async fn list(services: &Services, identity: &Identity, p: RepoListParams, host: &str) -> Result<Reply, RegistryError> {
    let (limit, offset) = paging(p.limit, p.offset)?;
    let auth = &services.auth;
    let mut namespaces: Option<Vec<AccountName>> = None;
    if let Some(ns) = &p.namespace {
        namespaces = Some(vec![ns.parse()?]);
    }
    if let Some(t) = &p.tenant {
        let owned = auth.namespaces_of(&t.parse()?);
        namespaces = Some(match namespaces {
            Some(ns) => ns.into_iter().filter(|n| owned.contains(n)).collect(),
            None => owned,
        });
    }
    let sort = match p.sort.as_deref() {
        None | Some("name") => RepoSort::Name,
        Some("updated") => RepoSort::Updated,
        Some("pulls") => RepoSort::Pulls,
        Some(s) => return Err(bad(format!("sort {s:?}: use name, updated or pulls"))),
    };
    let descending = match p.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(bad(format!("order {o:?}: use asc or desc"))),
    };
    let scope = p.scope.as_deref().unwrap_or("all");
    let action = match scope {
        "all" | "public" | "shared" => Action::Pull,
        "mine" => Action::Push,
        s => return Err(bad(format!("scope {s:?}: use all, mine, public or shared"))),
    };
    let (shared, shared_ns): (std::collections::HashSet<RepoName>, std::collections::HashSet<String>) = if scope == "shared" {
        (
            services.auth.shared_with(&identity.principal).await?.into_iter().map(|s| s.repo).collect(),
            services.auth.namespaces_shared_with(&identity.principal).await?.into_iter().map(|s| s.namespace.to_string()).collect(),
        )
    } else {
        Default::default()
    };
    if let Some(k) = &p.keyword {
        check_text("keyword", k, 256)?;
    }
    let q = RepoQuery {
        namespaces,
        keyword: p.keyword.clone(),
        labels: p.labels.as_deref().map(parse_labels).transpose()?.unwrap_or_default(),
        sort,
        descending,
        limit,
        offset,
    };
    services.registry.fresh_catalog().await?;
    let names = auth.listing(identity, action, |seen| {
        services.registry.repo_names(&q, |r| {
            let Listed { allowed, public } = seen(r);
            allowed
                && (scope != "public" || public)
                && (scope != "shared" || shared.contains(r) || shared_ns.contains(r.namespace()))
                && p.public.is_none_or(|want| want == public)
        })
    });
    let found = services.registry.list_repos(&q, names).await?;
    reply(StatusCode::OK, &page(found, limit, offset, |s| repository(services, host, s)))
}

/// Create an empty repository (a push creates one implicitly too).
#[utoipa::path(operation_id = "createRepository", post, path = "/api/v1/repositories", request_body = CreateRepository, tag = "repositories",
    responses((status = 201, body = Repository), (status = 409, description = "exists"), (status = 400, description = "invalid name or body")))]
async fn create(services: &Services, identity: &Identity, req: &mut Request, host: &str) -> Result<Reply, RegistryError> {
    let b: CreateRepository = body(req).await?;
    let repo: RepoName = b.name.parse()?;
    authorize(&services.auth, identity, &repo, Op::Create)?;
    if services.auth.tenant_of(&repo).is_none() {
        return Err(RegistryError::new(ErrorCode::NameInvalid).with_detail(format!("no tenant owns the namespace {}", repo.namespace())));
    }
    check_text("description", &b.description, 4096)?;
    check_text("category", &b.category, 128)?;
    check_labels(&b.labels)?;
    if !services.registry.create_repo(&repo, b.description, b.category, b.labels, identity.principal.subject()).await? {
        return Err(RegistryError::new(ErrorCode::Conflict).with_detail(format!("repository {repo} exists")));
    }
    let ns: AccountName = repo.namespace().parse()?;
    if b.public || services.auth.namespace_public_default(&ns).await? {
        services.auth.set_public(&identity.principal, &repo, true).await?;
    }
    let s = services.registry.repo_summary(&repo).await?;
    reply(StatusCode::CREATED, &repository(services, host, s))
}

/// One repository with its figures.
#[utoipa::path(operation_id = "getRepository", get, path = "/api/v1/repositories/{name}", tag = "repositories",
    params(("name" = String, Path, description = "full repository name; its `/` may be sent as is")),
    responses((status = 200, body = Repository), (status = 404, description = "unknown")))]
async fn get(services: &Services, identity: &Identity, repo: &RepoName, host: &str) -> Result<Reply, RegistryError> {
    authorize(&services.auth, identity, repo, Op::Get)?;
    let s = services.registry.repo_summary(repo).await?;
    reply(StatusCode::OK, &repository(services, host, s))
}

/// Change description, category, labels or visibility.
#[utoipa::path(operation_id = "updateRepository", patch, path = "/api/v1/repositories/{name}", request_body = UpdateRepository, tag = "repositories",
    params(("name" = String, Path)), responses((status = 200, body = Repository)))]
async fn update(services: &Services, identity: &Identity, repo: &RepoName, req: &mut Request, host: &str) -> Result<Reply, RegistryError> {
    let b: UpdateRepository = body(req).await?;
    authorize(&services.auth, identity, repo, Op::Update)?;
    if let Some(d) = &b.description {
        check_text("description", d, 4096)?;
    }
    if let Some(c) = &b.category {
        check_text("category", c, 128)?;
    }
    if let Some(l) = &b.labels {
        check_labels(l)?;
    }
    if !services.registry.repo_exists(repo).await? {
        return Err(RegistryError::new(ErrorCode::NameUnknown).with_detail(format!("repository {repo} is unknown")));
    }
    if let Some(public) = b.public {
        services.auth.set_public(&identity.principal, repo, public).await?;
    }
    let patch = RepoPatch { description: b.description, category: b.category, labels: b.labels };
    let s = services.registry.update_repo(repo, &patch).await?;
    reply(StatusCode::OK, &repository(services, host, s))
}

/// Delete a repository with all its tags and manifests.
#[utoipa::path(operation_id = "deleteRepository", delete, path = "/api/v1/repositories/{name}", tag = "repositories",
    params(("name" = String, Path)), responses((status = 200, body = RepositoryDeleted)))]
async fn delete(services: &Services, identity: &Identity, repo: &RepoName) -> Result<Reply, RegistryError> {
    authorize(&services.auth, identity, repo, Op::Delete)?;
    let removed = services.registry.delete_repo(repo, identity.principal.subject()).await?;
    services.auth.repo_deleted(repo).await?;
    let r = RepositoryDeleted { name: repo.to_string(), tags: removed.tags, manifests: removed.manifests, blob_links: removed.blob_links };
    reply(StatusCode::OK, &r)
}

/// A page of a repository's tags, by name.
#[utoipa::path(operation_id = "listTags", get, path = "/api/v1/repositories/{name}/-/tags", params(("name" = String, Path), TagListParams), tag = "repositories",
    responses((status = 200, body = Page<TagView>)))]
async fn tags(services: &Services, identity: &Identity, repo: &RepoName, p: TagListParams) -> Result<Reply, RegistryError> {
    let (limit, offset) = paging(p.limit, p.offset)?;
    authorize(&services.auth, identity, repo, Op::Tags)?;
    if let Some(k) = &p.keyword {
        check_text("keyword", k, 256)?;
    }
    let found = services.registry.list_tags(repo, p.keyword.as_deref(), limit, offset).await?;
    reply(StatusCode::OK, &page(found, limit, offset, tag_view))
}

/// One tag.
#[utoipa::path(operation_id = "getTag", get, path = "/api/v1/repositories/{name}/-/tags/{tag}", params(("name" = String, Path), ("tag" = String, Path)),
    tag = "repositories", responses((status = 200, body = TagDetail), (status = 404, description = "unknown tag")))]
async fn tag(services: &Services, identity: &Identity, repo: &RepoName, tag: Tag) -> Result<Reply, RegistryError> {
    authorize(&services.auth, identity, repo, Op::Tag)?;
    let found = services.registry.list_tags(repo, None, usize::MAX, 0).await?;
    let t = found
        .items
        .into_iter()
        .find(|t| t.name == tag)
        .ok_or_else(|| RegistryError::new(ErrorCode::ManifestUnknown).with_detail(format!("tag {tag} is unknown")))?;
    let d = services.registry.image_detail(repo, &Reference::Digest(t.digest.clone())).await?;
    let manifest = serde_json::from_slice(&d.manifest).map_err(|e| RegistryError::internal().with_detail(e.to_string()))?;
    let platforms = d
        .platforms
        .into_iter()
        .map(|p| PlatformView { platform: p.platform, digest: p.digest.to_string(), media_type: p.media_type, size: p.size })
        .collect();
    let findings = services
        .registry
        .findings(repo, &t.digest)
        .await?
        .into_iter()
        .map(|f| FindingView { plugin: f.plugin, rule: f.rule, severity: f.severity, message: f.message })
        .collect();
    reply(StatusCode::OK, &TagDetail { tag: tag_view(t), created: d.created, manifest, platforms, findings })
}

/// Delete a tag (its manifest stays).
#[utoipa::path(operation_id = "deleteTag", delete, path = "/api/v1/repositories/{name}/-/tags/{tag}", params(("name" = String, Path), ("tag" = String, Path)),
    tag = "repositories", responses((status = 204)))]
async fn delete_tag(services: &Services, identity: &Identity, repo: &RepoName, tag: Tag) -> Result<Reply, RegistryError> {
    authorize(&services.auth, identity, repo, Op::DeleteTag)?;
    services.registry.delete_manifest(repo, &Reference::Tag(tag), identity.principal.subject()).await?;
    Ok(crate::no_content())
}

/// Delete a manifest by digest, with every tag pointing at it.
#[utoipa::path(operation_id = "deleteManifest", delete, path = "/api/v1/repositories/{name}/-/manifests/{digest}", params(("name" = String, Path), ("digest" = String, Path)),
    tag = "repositories", responses((status = 204)))]
async fn delete_manifest(services: &Services, identity: &Identity, repo: &RepoName, digest: Digest) -> Result<Reply, RegistryError> {
    authorize(&services.auth, identity, repo, Op::DeleteManifest)?;
    services.registry.delete_manifest(repo, &Reference::Digest(digest), identity.principal.subject()).await?;
    Ok(crate::no_content())
}

/// Delete every untagged (or every tagged) manifest of a repository.
#[utoipa::path(operation_id = "deleteManifestsByStatus", post, path = "/api/v1/repositories/{name}/-/manifests/delete", request_body = BulkDelete, params(("name" = String, Path)),
    tag = "repositories", responses((status = 200, body = Deleted)))]
async fn bulk_delete(services: &Services, identity: &Identity, repo: &RepoName, req: &mut Request) -> Result<Reply, RegistryError> {
    let b: BulkDelete = body(req).await?;
    let status = match b.status.as_str() {
        "untagged" => TagStatus::Untagged,
        "tagged" => TagStatus::Tagged,
        s => return Err(bad(format!("status {s:?}: use untagged or tagged"))),
    };
    authorize(&services.auth, identity, repo, Op::BulkDelete)?;
    let deleted = services.registry.delete_by_status(repo, status, identity.principal.subject()).await?;
    reply(StatusCode::OK, &Deleted { deleted: deleted.iter().map(|d| d.to_string()).collect() })
}

/// Query of the repository name check.
#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NameParam {
    pub name: String,
}

/// Whether a repository name can be used, and if not, why.
#[derive(Serialize, ToSchema)]
pub struct RepoNameCheck {
    pub name: String,
    /// Follows the distribution-spec grammar and Berth's limits.
    pub valid: bool,
    /// The caller may push to it (its namespace is owned by a tenant that lets them).
    pub pushable: bool,
    /// A repository of that name exists and the caller may see it.
    pub exists: bool,
    pub reason: Option<String>,
}

/// Check a repository name: grammar, ownership of its namespace, existence.
#[utoipa::path(get, path = "/api/v1/repositories/-/check", params(NameParam), operation_id = "checkRepositoryName", tag = "repositories",
    responses((status = 200, body = RepoNameCheck)))]
async fn check_name(services: &Services, identity: &Identity, p: NameParam) -> Result<Reply, RegistryError> {
    let c = match p.name.parse::<RepoName>() {
        Err(e) => RepoNameCheck { name: p.name, valid: false, pushable: false, exists: false, reason: Some(e.detail_or_message()) },
        Ok(repo) => {
            let owned = services.auth.tenant_of(&repo).is_some();
            let pushable = owned && services.auth.can(identity, &repo, Action::Push);
            let exists = services.registry.repo_exists(&repo).await? && services.auth.can(identity, &repo, Action::Pull);
            let reason = if !owned {
                Some(format!("no tenant owns the namespace {}", repo.namespace()))
            } else if !pushable {
                Some(format!("you may not push to {repo}"))
            } else {
                None
            };
            RepoNameCheck { name: p.name, valid: true, pushable, exists, reason }
        }
    };
    reply(StatusCode::OK, &c)
}

/// Serve `/api/v1/official[/{name}[/versions]]`: the repositories of the
/// platform's official namespace, each as the caller's pull rights allow.
pub(crate) async fn official(services: &Services, identity: &Identity, rest: &str, req: &mut Request) -> Result<Reply, RegistryError> {
    if req.method != Method::GET {
        return Err(method_not_allowed(&req.method));
    }
    let host = host(services, req);
    let ns = &services.registry.config().official_namespace;
    let segs: Vec<&str> = rest.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        [] => official_list(services, identity, ns, query(req)?, &host).await,
        [.., "versions"] if segs.len() > 1 => {
            let repo: RepoName = format!("{ns}/{}", segs[..segs.len() - 1].join("/")).parse()?;
            official_versions(services, identity, &repo, query(req)?).await
        }
        _ => official_detail(services, identity, &format!("{ns}/{}", segs.join("/")).parse()?, &host).await,
    }
}

/// The official repositories (those of the platform's official namespace).
#[utoipa::path(get, path = "/api/v1/official", params(TagListParams), operation_id = "listOfficialImages", tag = "official",
    responses((status = 200, body = Page<Repository>)))]
async fn official_list(services: &Services, identity: &Identity, ns: &str, p: TagListParams, host: &str) -> Result<Reply, RegistryError> {
    let (limit, offset) = paging(p.limit, p.offset)?;
    let q = RepoQuery { namespaces: Some(vec![ns.parse()?]), keyword: p.keyword, limit, offset, ..Default::default() };
    services.registry.fresh_catalog().await?;
    let names = services.auth.listing(identity, Action::Pull, |seen| services.registry.repo_names(&q, |r| seen(r).allowed));
    let found = services.registry.list_repos(&q, names).await?;
    reply(StatusCode::OK, &page(found, limit, offset, |s| repository(services, host, s)))
}

/// One official repository (`alpine` for `library/alpine`).
#[utoipa::path(get, path = "/api/v1/official/{name}", params(("name" = String, Path)), operation_id = "getOfficialImage", tag = "official",
    responses((status = 200, body = Repository)))]
async fn official_detail(services: &Services, identity: &Identity, repo: &RepoName, host: &str) -> Result<Reply, RegistryError> {
    get(services, identity, repo, host).await
}

/// The versions (tags) of an official repository.
#[utoipa::path(get, path = "/api/v1/official/{name}/versions", params(("name" = String, Path), TagListParams),
    operation_id = "listOfficialImageVersions", tag = "official", responses((status = 200, body = Page<TagView>)))]
async fn official_versions(services: &Services, identity: &Identity, repo: &RepoName, p: TagListParams) -> Result<Reply, RegistryError> {
    tags(services, identity, repo, p).await
}

/// Where clients reach this registry.
#[derive(Serialize, ToSchema)]
pub struct RegistryInfo {
    /// What `docker login` and image names take: `host[:port]`.
    pub registry_address: String,
    /// What a docker daemon lists in `registry-mirrors`, when one is configured.
    pub mirror_address: Option<String>,
    /// The region this registry serves.
    pub region: String,
}

/// The registry and mirror addresses.
#[utoipa::path(get, path = "/api/v1/registry", operation_id = "getRegistryInfo", tag = "registry",
    responses((status = 200, body = RegistryInfo)))]
pub(crate) fn registry_info(services: &Services, req: &Request) -> Result<Reply, RegistryError> {
    let c = services.registry.config();
    reply(
        StatusCode::OK,
        &RegistryInfo { registry_address: host(services, req), mirror_address: c.mirror_url.clone(), region: c.region.clone() },
    )
}

/// The OpenAPI document of the management API.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Berth management API", description = "Errors: `{\"errors\":[{\"code\",\"message\",\"detail\"}]}`. \
        Authentication: HTTP Basic with a password or a registry access token."),
    paths(list, create, get, update, delete, tags, tag, delete_tag, delete_manifest, bulk_delete, registry_info, check_name, official_list, official_detail, official_versions),
    components(schemas(TagDetail, FindingView, PlatformView, RepoNameCheck, RegistryInfo, Repository, TagView, CreateRepository, UpdateRepository, RepositoryDeleted, BulkDelete, Deleted)),
    modifiers(&BasicAuth),
    security(("basic" = []))
)]
pub struct ApiDoc;

struct BasicAuth;

impl utoipa::Modify for BasicAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("basic", SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)));
    }
}

/// The whole management API's OpenAPI document.
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::namespaces::NamespaceDoc::openapi());
    doc.merge(crate::api::AccountDoc::openapi());
    doc.merge(crate::quotas::QuotaDoc::openapi());
    doc.merge(crate::gc::GcDoc::openapi());
    doc.merge(crate::retention::RetentionDoc::openapi());
    doc.merge(crate::plugins::PluginDoc::openapi());
    doc
}

/// `GET /api/v1/openapi.json`.
pub(crate) fn openapi() -> Reply {
    json_response(StatusCode::OK, document().to_json().unwrap_or_default().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_refuses_what_it_cannot_serve() {
        assert_eq!(paging(None, None).unwrap(), (DEFAULT_LIMIT, 0));
        assert_eq!(paging(Some(0), Some(5)).unwrap(), (0, 5));
        assert!(paging(Some(-1), None).is_err());
        assert!(paging(Some(MAX_LIMIT as i64 + 1), None).is_err());
        assert!(paging(None, Some(-3)).is_err());
    }

    #[test]
    fn labels_parse_and_validate() {
        assert_eq!(parse_labels("a:1,b:x:y").unwrap(), [("a".into(), "1".into()), ("b".into(), "x:y".into())].into());
        assert!(parse_labels("novalue").is_err());
        assert!(check_labels(&[("bad key".into(), "v".into())].into()).is_err());
        assert!(check_labels(&[("team".into(), "core".into())].into()).is_ok());
    }

    #[test]
    fn openapi_document_lists_every_route() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for p in [
            "/api/v1/repositories",
            "/api/v1/repositories/{name}",
            "/api/v1/repositories/{name}/-/tags",
            "/api/v1/repositories/{name}/-/manifests/delete",
        ] {
            assert!(doc["paths"][p].is_object(), "{p} missing");
        }
        assert!(doc["components"]["schemas"]["Repository"]["properties"]["pull_count"].is_object());
    }
}
