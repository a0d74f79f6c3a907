//! `POST /api/console`: the action-style console API, a thin adapter over the
//! same services as `/api/v1`. The body names an `Action` and its parameters
//! with the console's field names; the answer carries `RetCode` (0 on success),
//! `Message` on failure, and `TotalCount` / `Infos` for the describe actions.
//!
//! Its words map onto Berth's: a "container image repository" is a Berth
//! namespace (its `ContainerImageRepositoryID` is the namespace name), a
//! "container image" is a repository in it, `CompanyID` is the tenant's numeric
//! id (stable, derived from its name), `Region` the region this Berth serves
//! (`registry.region`, default `local`): another region is refused.
//!
//! Access is decided by `Auth` exactly as for the `/api/v1` calls these map to.

use std::collections::BTreeMap;

use berth_auth::{Action, Identity};
use berth_metadata::{NamespacePatch, NamespaceProfile};
use berth_oci::{AccountName, ErrorCode, Reference, RegistryError, RepoName, Tag};
use berth_registry::manage::RepoQuery;
use serde::{Deserialize, Serialize};
use warp::http::{Method, StatusCode};

use crate::compat::rfc3339;
use crate::{gate, json_response, Reply, Request, Services};

/// A console key/value tag (a Berth label).
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct KeyValue {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: String,
}

/// Every parameter any of the actions takes; each action reads its own.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct Params {
    action: String,
    name: Option<String>,
    remark: Option<String>,
    region: Option<String>,
    #[serde(rename = "ProjectID")]
    project_id: Option<String>,
    #[serde(rename = "CompanyID")]
    company_id: Option<u64>,
    tag_key_value_pairs: Option<Vec<KeyValue>>,
    public: Option<bool>,
    #[serde(rename = "ContainerImageRepositoryID")]
    repository_id: Option<String>,
    delete_all_images: Option<bool>,
    #[serde(rename = "ProjectIDs")]
    project_ids: Option<Vec<String>>,
    keyword: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    container_image_name: Option<String>,
    tag_name: Option<String>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    ret_code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    infos: Option<Vec<serde_json::Value>>,
    #[serde(rename = "ContainerImageRepositoryID", skip_serializing_if = "Option::is_none")]
    repository_id: Option<String>,
}

/// A namespace as the console shows a "container image repository".
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RepositoryInfo {
    #[serde(rename = "ContainerImageRepositoryID")]
    id: String,
    name: String,
    remark: String,
    region: String,
    #[serde(rename = "CompanyID")]
    company_id: u64,
    #[serde(rename = "ProjectID")]
    project_id: String,
    create_time: String,
    update_time: String,
    tags: Vec<KeyValue>,
    public: bool,
    container_image_numbers: u64,
    status: String,
    image_pull_numbers: u64,
    registry_address: String,
    storage_bytes: u64,
}

/// A repository as the console shows a "container image".
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ImageInfo {
    name: String,
    create_time: String,
    container_image_pull_numbers: u64,
    latest_tag: String,
    full_name: String,
    size: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct TagInfo {
    tag_name: String,
    create_time: String,
    container_image_tag_digest: String,
    size: u64,
    pull_count: u64,
}

/// The tenant's numeric id: stable (derived from its name), below 2^31.
pub(crate) fn company_id(tenant: &AccountName) -> u64 {
    crate::compat::stable_id(tenant.as_str()) & 0x7fff_ffff
}

fn bad(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::InvalidRequest).with_detail(detail.into())
}

fn labels(pairs: Option<Vec<KeyValue>>) -> Result<Option<BTreeMap<String, String>>, RegistryError> {
    let Some(pairs) = pairs else { return Ok(None) };
    let map: BTreeMap<String, String> = pairs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    crate::manage::check_labels(&map)?;
    Ok(Some(map))
}

fn answer(status: StatusCode, a: &Answer) -> Reply {
    json_response(status, serde_json::to_vec(a).unwrap_or_default())
}

/// Serve `POST /api/console`.
pub(crate) async fn handle(services: &Services, mut req: Request) -> Reply {
    let identity = match gate::authenticate(&services.auth, &req).await {
        Ok(i) => i,
        Err(r) => return gate::refusal_response(&services.auth, &req, r),
    };
    let fail = |action: String, e: RegistryError| {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = Some(format!("{}: {}", e.code().code(), e.detail_or_message()));
        answer(status, &Answer { ret_code: status.as_u16(), message, action, ..Default::default() })
    };
    if let Err(e) = gate::refuse_cross_site(&services.auth, &req) {
        return fail(String::new(), e);
    }
    if req.method != Method::POST {
        return fail(String::new(), crate::method_not_allowed(&req.method));
    }
    if let Err(e) = gate::require_basic(&identity) {
        let mut r = fail(String::new(), e);
        crate::set(&mut r, "www-authenticate", crate::gate::API_CHALLENGE);
        return r;
    }
    let body = match crate::read_json_body(&mut req, 256 * 1024).await {
        Ok(b) => b,
        Err(e) => return fail(String::new(), e),
    };
    let host = crate::manage::host(services, &req);
    let params: Params = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return fail(String::new(), bad(format!("invalid body: {e}"))),
    };
    let action = params.action.clone();
    match run(services, &identity, params, &host).await {
        Ok(mut a) => {
            a.action = format!("{action}Response");
            answer(StatusCode::OK, &a)
        }
        Err(e) => fail(format!("{action}Response"), e),
    }
}

async fn run(services: &Services, identity: &Identity, p: Params, host: &str) -> Result<Answer, RegistryError> {
    let region = &services.registry.config().region;
    if let Some(r) = &p.region {
        if r != region {
            return Err(bad(format!("region {r:?} is not served here; this registry serves {region:?}")));
        }
    }
    let who = &identity.principal;
    let auth = &services.auth;
    let namespace = |p: &Params| -> Result<AccountName, RegistryError> {
        p.repository_id.as_deref().or(p.name.as_deref()).ok_or_else(|| bad("ContainerImageRepositoryID (or Name) is required"))?.parse()
    };
    let image = |p: &Params, ns: &AccountName| -> Result<RepoName, RegistryError> {
        let name = p.container_image_name.as_deref().ok_or_else(|| bad("ContainerImageName is required"))?;
        format!("{ns}/{name}").parse()
    };
    let (limit, offset) = crate::manage::paging(p.limit, p.offset)?;
    match p.action.as_str() {
        "CreateContainerImageRepository" => {
            let name: AccountName = p.name.as_deref().ok_or_else(|| bad("Name is required"))?.parse()?;
            let tenant = match p.company_id {
                Some(id) => auth
                    .tenant_of_user(who)
                    .await?
                    .filter(|t| company_id(t) == id)
                    .ok_or_else(|| bad(format!("CompanyID {id} is not yours")))?,
                None => auth.tenant_of_user(who).await?.ok_or_else(|| bad("CompanyID is required for a platform user"))?,
            };
            let now = crate::now_ms();
            let profile = NamespaceProfile {
                name: name.clone(),
                tenant,
                description: p.remark.unwrap_or_default(),
                labels: labels(p.tag_key_value_pairs)?.unwrap_or_default(),
                project_id: p.project_id.unwrap_or_default(),
                public_default: p.public.unwrap_or(false),
                created_ms: now,
                updated_ms: now,
            };
            crate::manage::check_text("Remark", &profile.description, 4096)?;
            auth.create_namespace(who, profile).await?;
            Ok(Answer { repository_id: Some(name.to_string()), ..Default::default() })
        }
        "UpdateContainerImageRepository" => {
            let ns = namespace(&p)?;
            let patch = NamespacePatch {
                description: p.remark,
                labels: labels(p.tag_key_value_pairs)?,
                project_id: p.project_id,
                public_default: p.public,
            };
            auth.update_namespace(who, &ns, &patch).await?;
            Ok(Answer { repository_id: Some(ns.to_string()), ..Default::default() })
        }
        "DeleteContainerImageRepository" => {
            let ns = namespace(&p)?;
            auth.require_namespace_admin(who, &ns)?;
            let q = RepoQuery { namespaces: Some(vec![ns.clone()]), limit: usize::MAX, ..Default::default() };
            services.registry.fresh_catalog().await?;
            let repos = services.registry.list_repos(&q, services.registry.repo_names(&q, |_| true)).await?.items;
            if !repos.is_empty() && !p.delete_all_images.unwrap_or(false) {
                return Err(RegistryError::new(ErrorCode::Conflict)
                    .with_detail(format!("{ns} holds {} images; pass DeleteAllImages to delete them", repos.len())));
            }
            if auth.tenant_of_namespace(&ns).as_ref() == Some(&ns) {
                return Err(bad(format!("{ns} is its tenant's own namespace")));
            }
            for r in repos {
                services.registry.delete_repo(&r.profile.name, identity.principal.subject()).await?;
                auth.repo_deleted(&r.profile.name).await?;
            }
            auth.delete_namespace(who, &ns).await?;
            Ok(Answer::default())
        }
        "DescribeContainerImageRepository" => {
            let mut all = auth.visible_namespaces(who).await?;
            let keyword = p.keyword.as_deref().map(str::to_lowercase);
            let only: Option<AccountName> = p.repository_id.as_deref().map(str::parse).transpose()?;
            all.retain(|n| {
                only.as_ref().is_none_or(|o| &n.name == o)
                    && p.project_ids.as_ref().is_none_or(|ids| ids.contains(&n.project_id))
                    && keyword
                        .as_ref()
                        .is_none_or(|k| n.name.as_str().contains(k.as_str()) || n.description.to_lowercase().contains(k.as_str()))
            });
            let total = all.len();
            let mut infos = Vec::new();
            for n in all.into_iter().skip(offset).take(limit) {
                let st = auth.namespace_stats(&n.name).await?;
                let q = RepoQuery { namespaces: Some(vec![n.name.clone()]), limit: usize::MAX, ..Default::default() };
                services.registry.fresh_catalog().await?;
                let pulls: u64 = services
                    .registry
                    .list_repos(&q, services.registry.repo_names(&q, |_| true))
                    .await?
                    .items
                    .iter()
                    .map(|r| r.profile.pulls)
                    .sum();
                let info = RepositoryInfo {
                    id: n.name.to_string(),
                    name: n.name.to_string(),
                    remark: n.description,
                    region: region.clone(),
                    company_id: company_id(&n.tenant),
                    project_id: n.project_id,
                    create_time: rfc3339(n.created_ms),
                    update_time: rfc3339(n.updated_ms),
                    tags: n.labels.into_iter().map(|(key, value)| KeyValue { key, value }).collect(),
                    public: n.public_default,
                    container_image_numbers: st.repository_count,
                    status: "active".into(),
                    image_pull_numbers: pulls,
                    registry_address: format!("{host}/{}", n.name),
                    storage_bytes: st.storage_bytes,
                };
                infos.push(serde_json::to_value(info).unwrap_or_default());
            }
            Ok(Answer { total_count: Some(total), infos: Some(infos), ..Default::default() })
        }
        "DescribeContainerImage" => {
            let ns = namespace(&p)?;
            if !auth.namespace_readable(who, &ns) {
                return Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no namespace {ns}")));
            }
            let q = RepoQuery { namespaces: Some(vec![ns]), keyword: p.keyword.clone(), limit, offset, ..Default::default() };
            services.registry.fresh_catalog().await?;
            let names = auth.listing(identity, Action::Pull, |seen| services.registry.repo_names(&q, |r| seen(r).allowed));
            let found = services.registry.list_repos(&q, names).await?;
            let infos = found
                .items
                .into_iter()
                .map(|s| {
                    let full = s.profile.name.to_string();
                    let info = ImageInfo {
                        name: full[s.profile.name.namespace().len() + 1..].to_owned(),
                        create_time: rfc3339(s.profile.created_ms),
                        container_image_pull_numbers: s.profile.pulls,
                        latest_tag: s.stats.latest_tag.map(|t| t.to_string()).unwrap_or_default(),
                        full_name: format!("{host}/{full}"),
                        size: s.stats.size,
                    };
                    serde_json::to_value(info).unwrap_or_default()
                })
                .collect();
            Ok(Answer { total_count: Some(found.total), infos: Some(infos), ..Default::default() })
        }
        "DeleteContainerImage" => {
            let repo = image(&p, &namespace(&p)?)?;
            gate::authorize_api(auth, identity, &repo, Action::Delete)?;
            services.registry.delete_repo(&repo, identity.principal.subject()).await?;
            auth.repo_deleted(&repo).await?;
            Ok(Answer::default())
        }
        "DescribeContainerImageTag" => {
            let repo = image(&p, &namespace(&p)?)?;
            gate::authorize_api(auth, identity, &repo, Action::Pull)?;
            let found = services.registry.list_tags(&repo, p.keyword.as_deref(), limit, offset).await?;
            let infos = found
                .items
                .into_iter()
                .map(|t| {
                    let info = TagInfo {
                        tag_name: t.name.to_string(),
                        create_time: rfc3339(t.pushed_ms),
                        container_image_tag_digest: t.digest.to_string(),
                        size: t.manifest_size,
                        pull_count: t.pulls,
                    };
                    serde_json::to_value(info).unwrap_or_default()
                })
                .collect();
            Ok(Answer { total_count: Some(found.total), infos: Some(infos), ..Default::default() })
        }
        "DeleteContainerImageTag" => {
            let repo = image(&p, &namespace(&p)?)?;
            let tag: Tag = p.tag_name.as_deref().ok_or_else(|| bad("TagName is required"))?.parse()?;
            gate::authorize_api(auth, identity, &repo, Action::Delete)?;
            services.registry.delete_manifest(&repo, &Reference::Tag(tag), identity.principal.subject()).await?;
            Ok(Answer::default())
        }
        "" => Err(bad("Action is required")),
        other => Err(bad(format!("unknown Action {other:?}"))),
    }
}
