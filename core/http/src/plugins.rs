//! `/api/v1/plugins`: installed modules (the platform admin installs and
//! reloads them) and instances bound to a scope. Whoever administers a scope
//! manages its instances: the platform admin the platform's, a tenant's admin
//! the tenant's and its namespaces'. Others do not see them (404). Secret
//! configuration values are never shown back.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use berth_auth::Identity;
use berth_oci::{AccountName, ErrorCode, RegistryError};
use berth_plugins::{Hook, InstanceSpec, Scope};
use berth_registry::plugins::{parse_scope, Plugins};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use warp::http::{Method, StatusCode};

use crate::manage::{body, paging, query, reply, Page};
use crate::{Reply, Request, Services};

/// How a secret value is shown, and how a request keeps the stored one.
pub const MASK: &str = "********";

#[derive(Serialize, ToSchema)]
pub struct ModuleView {
    pub name: String,
    pub version: String,
    pub description: String,
    pub hooks: Vec<String>,
    /// What the module may use of the host: `log`, `http:<host>`, `read-image`, `kv`.
    pub capabilities: Vec<String>,
    /// Its configuration keys: name → `type[, required][, secret]: description`.
    pub config: BTreeMap<String, String>,
    pub memory_mib: u64,
    pub timeout_ms: u64,
    pub fail_open: bool,
}

#[derive(Serialize, ToSchema)]
pub struct RefusedModule {
    pub folder: String,
    pub error: String,
}

/// An instance's health since it was last set or enabled.
#[derive(Serialize, ToSchema)]
pub struct HealthView {
    pub calls: u64,
    pub failures: u64,
    pub timeouts: u64,
    pub consecutive_failures: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    pub logs_dropped: u64,
}

/// An instance's event queue (instances that take events).
#[derive(Serialize, ToSchema)]
pub struct QueueView {
    /// Events waiting to be delivered.
    pub depth: u64,
    /// How long the oldest waiting event has waited, in ms.
    pub lag_ms: u64,
    /// Events not queued because the queue was full (`limits.queue`).
    pub overflow: u64,
    pub delivered: u64,
    /// Failed deliveries scheduled again.
    pub retried: u64,
    /// Events given up after their last attempt, or refused by the plugin.
    pub given_up: u64,
}

/// One delivery attempt.
#[derive(Serialize, ToSchema)]
pub struct DeliveryView {
    pub event_id: String,
    /// The hook (`manifest-pushed` …).
    pub event_type: String,
    /// 1 for the first try.
    pub attempt: u32,
    pub at_ms: i64,
    /// `delivered`, `retrying` or `failed`.
    pub outcome: String,
    pub detail: Option<String>,
    pub took_ms: f64,
}

/// Query of `GET /api/v1/plugins/instances/{id}/deliveries`.
#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// 0 to 1000, default 100.
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceView {
    pub id: String,
    pub module: String,
    /// `platform`, `tenant:<name>` or `namespace:<name>`.
    pub scope: String,
    pub hooks: Vec<String>,
    /// Secret values show as `********`.
    pub config: BTreeMap<String, String>,
    pub allow_hosts: Vec<String>,
    pub enabled: bool,
    /// `on`, `off` (disabled), `tripped` (switched off after repeated
    /// failures), or `stalled` (its module is missing or refuses its config).
    pub state: String,
    /// Why it is tripped or stalled.
    pub reason: Option<String>,
    pub health: Option<HealthView>,
    pub queue: Option<QueueView>,
}

#[derive(Serialize, ToSchema)]
pub struct PluginsView {
    pub modules: Vec<ModuleView>,
    /// Module folders that did not load (platform admin only).
    pub refused: Vec<RefusedModule>,
    /// The instances the caller administers.
    pub instances: Vec<InstanceView>,
}

/// `PUT /api/v1/plugins/modules/{name}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallModule {
    /// The text of `plugin.toml`; its `name` must be the path's.
    pub manifest: String,
    /// The component (`.wasm`), base64.
    pub component_base64: String,
}

/// `PUT /api/v1/plugins/instances/{id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetInstance {
    pub module: String,
    /// `platform`, `tenant:<name>` or `namespace:<name>`.
    pub scope: String,
    pub hooks: Vec<String>,
    /// Values as strings; `********` keeps a secret's stored value.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, ToSchema)]
pub struct Reloaded {
    pub modules: Vec<String>,
    pub refused: Vec<RefusedModule>,
}

fn bad(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::InvalidRequest).with_status(400).with_detail(detail.into())
}

fn unknown(id: &str) -> RegistryError {
    RegistryError::new(ErrorCode::NotFound).with_detail(format!("no plugin instance {id}"))
}

fn plugins(services: &Services) -> Result<&Plugins, RegistryError> {
    services.registry.plugins().ok_or_else(|| {
        RegistryError::new(ErrorCode::NotFound)
            .with_status(404)
            .with_detail("plugins are disabled on this registry ([plugins] enabled = false)")
    })
}

/// Refuse unless the caller administers `scope`.
fn administer(services: &Services, identity: &Identity, scope: &Scope) -> Result<(), RegistryError> {
    let (auth, who) = (&services.auth, &identity.principal);
    let name = |n: &str| n.parse::<AccountName>();
    match scope {
        Scope::Platform => auth.require_platform_admin(who),
        Scope::Tenant(t) => auth.require_tenant_admin(who, &name(t)?),
        Scope::Namespace(n) => auth.require_namespace_admin(who, &name(n)?),
    }
}

fn view_module(m: &berth_plugins::Module) -> ModuleView {
    let mf = &m.manifest;
    let c = &mf.capabilities;
    let mut caps = vec![];
    if c.log {
        caps.push("log".to_owned());
    }
    caps.extend(c.http.iter().map(|h| format!("http:{h}")));
    if c.read_image {
        caps.push("read-image".into());
    }
    if c.kv {
        caps.push("kv".into());
    }
    let config = mf
        .config
        .iter()
        .map(|(k, s)| {
            let mut t = format!("{:?}", s.kind).to_lowercase();
            if s.required {
                t.push_str(", required");
            }
            if s.secret {
                t.push_str(", secret");
            }
            (k.clone(), if s.description.is_empty() { t } else { format!("{t}: {}", s.description) })
        })
        .collect();
    ModuleView {
        name: mf.name.clone(),
        version: mf.version.clone(),
        description: mf.description.clone(),
        hooks: mf.hooks.iter().map(|h| h.name().to_owned()).collect(),
        capabilities: caps,
        config,
        memory_mib: mf.limits.memory_mib,
        timeout_ms: mf.limits.timeout_ms,
        fail_open: mf.limits.fail_open,
    }
}

fn secret_keys(p: &Plugins, module: &str) -> BTreeSet<String> {
    p.host()
        .module(module)
        .map(|m| m.manifest.config.iter().filter(|(_, s)| s.secret).map(|(k, _)| k.clone()).collect())
        .unwrap_or_default()
}

fn view_instance(p: &Plugins, spec: &InstanceSpec, stalled: Option<&str>) -> InstanceView {
    let secrets = secret_keys(p, &spec.module);
    let config = spec.config.iter().map(|(k, v)| (k.clone(), if secrets.contains(k) { MASK.to_owned() } else { v.clone() })).collect();
    let running = p.host().instance(&spec.id).filter(|_| stalled.is_none());
    let health = running.as_ref().map(|i| i.health());
    let (state, reason) = match (stalled, &health) {
        (Some(why), _) => ("stalled", Some(why.to_owned())),
        (None, Some(h)) if h.tripped.is_some() => ("tripped", h.tripped.clone()),
        _ if !spec.enabled => ("off", None),
        _ => ("on", None),
    };
    InstanceView {
        id: spec.id.clone(),
        module: spec.module.clone(),
        scope: spec.scope.to_string(),
        hooks: spec.hooks.iter().map(|h| h.name().to_owned()).collect(),
        config,
        allow_hosts: spec.allow_hosts.clone(),
        enabled: spec.enabled,
        state: state.into(),
        reason,
        health: health.map(|h| HealthView {
            calls: h.calls,
            failures: h.failures,
            timeouts: h.timeouts,
            consecutive_failures: h.consecutive_failures,
            p50_ms: h.p50_ms,
            p99_ms: h.p99_ms,
            last_error: h.last_error,
            last_error_ms: h.last_error_ms,
            logs_dropped: h.logs_dropped,
        }),
        queue: p.deliveries().stats(&spec.id).map(|q| QueueView {
            depth: q.depth,
            lag_ms: q.lag_ms,
            overflow: q.overflow,
            delivered: q.delivered,
            retried: q.retried,
            given_up: q.given_up,
        }),
    }
}

/// The instances stored, running or stalled, with why the stalled ones are.
fn all_instances(p: &Plugins) -> Vec<(InstanceSpec, Option<String>)> {
    let mut out: Vec<(InstanceSpec, Option<String>)> = p.host().instances().iter().map(|i| (i.spec.clone(), None)).collect();
    out.extend(p.stalled().into_iter().map(|(s, why)| (s, Some(why))));
    out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    out
}

pub(crate) async fn route(services: &Services, identity: &Identity, segs: &[&str], req: &mut Request) -> Result<Reply, RegistryError> {
    let m = req.method.clone();
    match (segs, &m) {
        ([], &Method::GET) => list(services, identity),
        (["reload"], &Method::POST) => reload(services, identity).await,
        (["modules", name], &Method::PUT) => install(services, identity, name, req).await,
        (["instances", id], &Method::GET) => get(services, identity, id),
        (["instances", id], &Method::PUT) => set(services, identity, id, req).await,
        (["instances", id], &Method::DELETE) => delete(services, identity, id).await,
        (["instances", id, "deliveries"], &Method::GET) => deliveries(services, identity, id, query(req)?).await,
        _ => Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no such endpoint: /api/v1/plugins/{}", segs.join("/")))),
    }
}

/// Modules, and the instances the caller administers.
#[utoipa::path(get, path = "/api/v1/plugins", operation_id = "listPlugins", tag = "plugins", responses((status = 200, body = PluginsView)))]
fn list(services: &Services, identity: &Identity) -> Result<Reply, RegistryError> {
    let p = plugins(services)?;
    let admin = services.auth.require_platform_admin(&identity.principal).is_ok();
    let instances = all_instances(p)
        .into_iter()
        .filter(|(s, _)| administer(services, identity, &s.scope).is_ok())
        .map(|(s, why)| view_instance(p, &s, why.as_deref()))
        .collect();
    let refused = if admin { p.refused().into_iter().map(|(folder, error)| RefusedModule { folder, error }).collect() } else { vec![] };
    let modules = p.host().modules().iter().map(|m| view_module(m)).collect();
    reply(StatusCode::OK, &PluginsView { modules, refused, instances })
}

/// Load every module folder again and restart every instance (platform admin).
#[utoipa::path(post, path = "/api/v1/plugins/reload", operation_id = "reloadPlugins", tag = "plugins", responses((status = 200, body = Reloaded)))]
async fn reload(services: &Services, identity: &Identity) -> Result<Reply, RegistryError> {
    services.auth.require_platform_admin(&identity.principal)?;
    let p = plugins(services)?;
    let refused = p.reload().await.map_err(|e| RegistryError::internal().with_detail(e))?;
    reply(
        StatusCode::OK,
        &Reloaded {
            modules: p.host().modules().iter().map(|m| m.manifest.name.clone()).collect(),
            refused: refused.into_iter().map(|(folder, error)| RefusedModule { folder, error }).collect(),
        },
    )
}

/// Install (or upgrade) a module (platform admin).
#[utoipa::path(put, path = "/api/v1/plugins/modules/{name}", operation_id = "installPlugin", tag = "plugins", request_body = InstallModule,
    params(("name" = String, Path)), responses((status = 200, body = ModuleView)))]
async fn install(services: &Services, identity: &Identity, name: &str, req: &mut Request) -> Result<Reply, RegistryError> {
    services.auth.require_platform_admin(&identity.principal)?;
    let p = plugins(services)?;
    let b: InstallModule = crate::manage::body_limited(req, berth_registry::plugins::MAX_COMPONENT_BYTES * 4 / 3 + 1024 * 1024).await?;
    let manifest = berth_plugins::PluginManifest::parse(&b.manifest).map_err(|e| bad(format!("plugin.toml: {e}")))?;
    if manifest.name != name {
        return Err(bad(format!("plugin.toml names {:?}, the path {name:?}", manifest.name)));
    }
    let component =
        base64::engine::general_purpose::STANDARD.decode(b.component_base64.trim()).map_err(|e| bad(format!("component_base64: {e}")))?;
    let module = p.install(&b.manifest, &component).await.map_err(bad)?;
    reply(StatusCode::OK, &view_module(&module))
}

#[utoipa::path(get, path = "/api/v1/plugins/instances/{id}", operation_id = "getPluginInstance", tag = "plugins",
    params(("id" = String, Path)), responses((status = 200, body = InstanceView)))]
fn get(services: &Services, identity: &Identity, id: &str) -> Result<Reply, RegistryError> {
    let p = plugins(services)?;
    let (spec, why) = all_instances(p).into_iter().find(|(s, _)| s.id == id).ok_or_else(|| unknown(id))?;
    administer(services, identity, &spec.scope).map_err(|_| unknown(id))?;
    reply(StatusCode::OK, &view_instance(p, &spec, why.as_deref()))
}

/// Set an instance: bind a module to a scope with its configuration and hooks.
/// Setting it again (or enabling it) starts it afresh.
#[utoipa::path(put, path = "/api/v1/plugins/instances/{id}", operation_id = "setPluginInstance", tag = "plugins", request_body = SetInstance,
    params(("id" = String, Path)), responses((status = 200, body = InstanceView)))]
async fn set(services: &Services, identity: &Identity, id: &str, req: &mut Request) -> Result<Reply, RegistryError> {
    let p = plugins(services)?;
    let b: SetInstance = body(req).await?;
    let scope = parse_scope(&b.scope).map_err(bad)?;
    administer(services, identity, &scope)?;
    let existing = p.instance_spec(id);
    if let Some(old) = &existing {
        // Moving an instance takes the right to manage it where it was, too
        // (refused like an unknown one, so other scopes' ids are not revealed).
        administer(services, identity, &old.scope).map_err(|_| bad(format!("the id {id} is taken")))?;
    }
    if let Scope::Namespace(ns) = &scope {
        let known = ns.parse::<AccountName>().ok().and_then(|n| services.auth.tenant_of_namespace(&n)).is_some();
        if !known {
            return Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no namespace {ns}")));
        }
    }
    let hooks = b.hooks.iter().map(|h| h.parse::<Hook>()).collect::<Result<BTreeSet<Hook>, String>>().map_err(bad)?;
    let mut config = b.config;
    let secrets = secret_keys(p, &b.module);
    for (k, v) in config.iter_mut() {
        if v == MASK && secrets.contains(k) {
            match existing.as_ref().and_then(|o| (o.module == b.module).then(|| o.config.get(k)).flatten()) {
                Some(stored) => *v = stored.clone(),
                None => return Err(bad(format!("config {k}: {MASK} keeps a stored secret, and there is none"))),
            }
        }
    }
    let spec = InstanceSpec { id: id.to_owned(), module: b.module, scope, hooks, config, allow_hosts: b.allow_hosts, enabled: b.enabled };
    p.set_instance(spec.clone(), identity.principal.subject()).await?;
    reply(StatusCode::OK, &view_instance(p, &spec, None))
}

#[utoipa::path(delete, path = "/api/v1/plugins/instances/{id}", operation_id = "deletePluginInstance", tag = "plugins",
    params(("id" = String, Path)), responses((status = 204)))]
async fn delete(services: &Services, identity: &Identity, id: &str) -> Result<Reply, RegistryError> {
    let p = plugins(services)?;
    let spec = p.instance_spec(id).ok_or_else(|| unknown(id))?;
    administer(services, identity, &spec.scope).map_err(|_| unknown(id))?;
    p.delete_instance(id).await?;
    Ok(crate::no_content())
}

/// The instance's delivery log (newest first; the last 1,000 attempts are kept).
#[utoipa::path(get, path = "/api/v1/plugins/instances/{id}/deliveries", operation_id = "listPluginDeliveries", tag = "plugins",
    params(("id" = String, Path), DeliveryParams), responses((status = 200, body = Page<DeliveryView>)))]
async fn deliveries(services: &Services, identity: &Identity, id: &str, q: DeliveryParams) -> Result<Reply, RegistryError> {
    let p = plugins(services)?;
    let spec = p.instance_spec(id).ok_or_else(|| unknown(id))?;
    administer(services, identity, &spec.scope).map_err(|_| unknown(id))?;
    let (limit, offset) = paging(q.limit, q.offset)?;
    let (rows, total) = p.deliveries_log(id, limit, offset).await?;
    let items = rows
        .into_iter()
        .map(|r| DeliveryView {
            event_id: r.event_id,
            event_type: r.hook,
            attempt: r.attempt,
            at_ms: r.at_ms,
            outcome: r.outcome,
            detail: r.detail,
            took_ms: r.took_ms,
        })
        .collect();
    reply(StatusCode::OK, &Page { items, total_count: total as usize, limit, offset })
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list, reload, install, get, set, delete, deliveries),
    components(schemas(
        PluginsView,
        ModuleView,
        RefusedModule,
        InstanceView,
        HealthView,
        QueueView,
        DeliveryView,
        InstallModule,
        SetInstance,
        Reloaded
    ))
)]
pub struct PluginDoc;
