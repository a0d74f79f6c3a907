//! `/api/v1/quotas` and `/api/v1/tenants/{tenant}/quota`: describe a tenant's
//! limits and usage (any member of the tenant), set its own limits (platform
//! admin). Enforcement is the registry's quota actor's; access is `Auth`'s.

use berth_auth::Identity;
use berth_metadata::QuotaLimits;
use berth_oci::{AccountName, ErrorCode, RegistryError};
use berth_registry::quota::QuotaReport;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::http::StatusCode;

use crate::manage::{body, reply};
use crate::{Reply, Request, Services};

/// One limited resource.
#[derive(Serialize, ToSchema)]
pub struct QuotaItem {
    /// `namespaces`, `repositories` or `storage_bytes`.
    pub resource: String,
    /// The limit in force; `null`: unlimited.
    pub limit: Option<u64>,
    pub used: u64,
    /// Where the limit comes from: `tenant` (set for this tenant), `default`
    /// (the registry's configuration) or `none` (unlimited).
    pub source: String,
}

/// A tenant's quotas (JD Cloud's describeQuotas).
#[derive(Serialize, ToSchema)]
pub struct QuotaView {
    pub tenant: String,
    pub quotas: Vec<QuotaItem>,
    /// Bytes reserved by pushes in progress (counted against the storage limit
    /// until they complete or are abandoned).
    pub reserved_bytes: u64,
}

/// A tenant's own limits; a missing or `null` field returns that limit to the
/// registry's default.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaBody {
    #[serde(default)]
    pub namespaces: Option<u64>,
    #[serde(default)]
    pub repositories: Option<u64>,
    #[serde(default)]
    pub storage_bytes: Option<u64>,
}

/// The largest limit accepted (2^53: exact in every JSON and SurrealDB number type).
const MAX_LIMIT: u64 = 1 << 53;

fn view(r: QuotaReport) -> QuotaView {
    let item = |resource: &str, limit: Option<u64>, own: Option<u64>, used: u64| QuotaItem {
        resource: resource.into(),
        limit,
        used,
        source: match (own, limit) {
            (Some(_), _) => "tenant",
            (None, Some(_)) => "default",
            (None, None) => "none",
        }
        .into(),
    };
    QuotaView {
        tenant: r.tenant.to_string(),
        quotas: vec![
            item("namespaces", r.limits.namespaces, r.own.namespaces, r.usage.namespaces),
            item("repositories", r.limits.repositories, r.own.repositories, r.usage.repositories),
            item("storage_bytes", r.limits.storage_bytes, r.own.storage_bytes, r.usage.storage_bytes),
        ],
        reserved_bytes: r.reserved_bytes,
    }
}

/// The caller's tenant's quotas.
#[utoipa::path(get, path = "/api/v1/quotas", operation_id = "describeMyQuotas", tag = "quotas",
    responses((status = 200, body = QuotaView), (status = 400, description = "the caller belongs to no tenant")))]
pub(crate) async fn mine(services: &Services, identity: &Identity) -> Result<Reply, RegistryError> {
    let tenant = services.auth.tenant_of_user(&identity.principal).await?.ok_or_else(|| {
        RegistryError::new(ErrorCode::InvalidRequest)
            .with_detail("the caller belongs to no tenant; a platform user asks /api/v1/tenants/{tenant}/quota")
    })?;
    get(services, identity, &tenant).await
}

/// A tenant's quotas: limits, usage, reservations.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/quota", operation_id = "describeQuotas", tag = "quotas",
    params(("tenant" = String, Path)), responses((status = 200, body = QuotaView), (status = 404, description = "unknown or not visible")))]
pub(crate) async fn get(services: &Services, identity: &Identity, tenant: &AccountName) -> Result<Reply, RegistryError> {
    services.auth.require_tenant_member(&identity.principal, tenant)?;
    if !services.auth.tenant_exists(tenant).await? {
        return Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no tenant {tenant}")));
    }
    reply(StatusCode::OK, &view(services.registry.quotas().describe(tenant).await?))
}

/// Set a tenant's own limits (platform admin).
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/quota", operation_id = "setQuotas", tag = "quotas",
    params(("tenant" = String, Path)), request_body = QuotaBody, responses((status = 200, body = QuotaView)))]
pub(crate) async fn set(services: &Services, identity: &Identity, tenant: &AccountName, req: &mut Request) -> Result<Reply, RegistryError> {
    services.auth.require_platform_admin(&identity.principal)?;
    let b: QuotaBody = body(req).await?;
    if !services.auth.tenant_exists(tenant).await? {
        return Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no tenant {tenant}")));
    }
    for (field, v) in [("namespaces", b.namespaces), ("repositories", b.repositories), ("storage_bytes", b.storage_bytes)] {
        if v.is_some_and(|v| v > MAX_LIMIT) {
            return Err(RegistryError::new(ErrorCode::InvalidRequest).with_detail(format!("{field} must be at most {MAX_LIMIT}")));
        }
    }
    let own = QuotaLimits { namespaces: b.namespaces, repositories: b.repositories, storage_bytes: b.storage_bytes };
    reply(StatusCode::OK, &view(services.registry.quotas().set_limits(tenant, own).await?))
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(mine, get, set), components(schemas(QuotaView, QuotaItem, QuotaBody)))]
pub struct QuotaDoc;
