//! Retention policies over the management API: a repository's
//! (`/api/v1/repositories/{name}/-/retention[/run]`) and a namespace's
//! (`/api/v1/namespaces/{ns}/retention[/run]`), and the audit records of runs
//! (`/api/v1/retention/runs`). Reading a policy takes pull (a repository) or
//! membership (a namespace); setting, removing or running one takes delete (a
//! repository) or the namespace's administrator, as `Auth` decides.

use berth_auth::{Action, Identity};
use berth_metadata::{RetentionPolicy, RetentionRules, RetentionRun};
use berth_oci::{AccountName, ErrorCode, RegistryError, RepoName};
use berth_registry::retention::{check_rules, human_secs, Scope};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use warp::http::{Method, StatusCode};

use crate::manage::{bad, body, reply};
use crate::{method_not_allowed, Reply, Request, Services};

/// A policy as set: a duration is a number and a unit (`45s`, `30m`, `12h`, `90d`, `2w`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionBody {
    /// Keep the N most recently pushed tags.
    pub keep_last: Option<u32>,
    /// Tags matching any of these globs (`*`, `?`) are always kept, e.g. `latest`, `v*`.
    #[serde(default)]
    pub keep_patterns: Vec<String>,
    /// Delete tags neither pulled nor pushed for this long (with `keep_last`:
    /// only those outside the newest N).
    pub unpulled_for: Option<String>,
    /// Delete untagged manifests older than this.
    pub untagged_older_than: Option<String>,
    /// Run on the schedule (default true); a disabled policy still runs on demand.
    #[serde(default = "enabled_default")]
    pub enabled: bool,
}

fn enabled_default() -> bool {
    true
}

/// A stored policy.
#[derive(Serialize, ToSchema)]
pub struct RetentionView {
    /// `repo:<name>` or `ns:<namespace>`.
    pub scope: String,
    pub keep_last: Option<u32>,
    pub keep_patterns: Vec<String>,
    pub unpulled_for: Option<String>,
    pub untagged_older_than: Option<String>,
    pub enabled: bool,
    pub updated_ms: i64,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RetentionRunBody {
    /// List what would be deleted; delete nothing.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Serialize, ToSchema)]
pub struct RetentionItemView {
    pub repository: String,
    /// `tag` or `manifest`.
    pub kind: String,
    /// The tag, or the manifest's digest.
    pub name: String,
    pub reason: String,
}

/// One run: what it deleted (a dry run: would delete) and why.
#[derive(Serialize, ToSchema)]
pub struct RetentionRunView {
    pub scope: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub dry_run: bool,
    /// The user who ran it, or `schedule`.
    pub by: String,
    pub items: Vec<RetentionItemView>,
    pub errors: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RetentionRunList {
    pub runs: Vec<RetentionRunView>,
}

#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsParams {
    pub repository: Option<String>,
    pub namespace: Option<String>,
    /// At most this many runs, newest first (1–1000, default 100).
    pub limit: Option<i64>,
}

/// `45s`, `30m`, `12h`, `90d`, `2w` → seconds.
pub(crate) fn parse_duration(what: &str, s: &str) -> Result<u64, RegistryError> {
    let err = || bad(format!("{what} {s:?}: a whole number and a unit, s, m, h, d or w (e.g. 90d), up to 100 years"));
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (n, unit) = s.split_at(unit_at);
    let n: u64 = n.parse().map_err(|_| err())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(err()),
    };
    let secs = n.checked_mul(mult).ok_or_else(err)?;
    if secs == 0 || secs > 100 * 365 * 86_400 {
        return Err(err());
    }
    Ok(secs)
}

fn view(p: RetentionPolicy) -> RetentionView {
    RetentionView {
        scope: p.scope,
        keep_last: p.rules.keep_last,
        keep_patterns: p.rules.keep_patterns,
        unpulled_for: p.rules.unpulled_for_secs.map(human_secs),
        untagged_older_than: p.rules.untagged_older_than_secs.map(human_secs),
        enabled: p.enabled,
        updated_ms: p.updated_ms,
    }
}

fn run_view(r: RetentionRun) -> RetentionRunView {
    RetentionRunView {
        scope: r.scope,
        started_ms: r.started_ms,
        finished_ms: r.finished_ms,
        dry_run: r.dry_run,
        by: r.by,
        items: r
            .items
            .into_iter()
            .map(|i| RetentionItemView { repository: i.repository, kind: i.kind, name: i.name, reason: i.reason })
            .collect(),
        errors: r.errors,
    }
}

fn not_set(scope: &Scope) -> RegistryError {
    RegistryError::new(ErrorCode::NotFound).with_detail(format!("no retention policy for {}", scope.key()))
}

/// Who may read, and who may change or run, a scope's policy.
fn authorize(services: &Services, identity: &Identity, scope: &Scope, change: bool) -> Result<(), RegistryError> {
    match scope {
        Scope::Repository(r) => crate::gate::authorize_api(&services.auth, identity, r, if change { Action::Delete } else { Action::Pull }),
        Scope::Namespace(ns) if change => services.auth.require_namespace_admin(&identity.principal, ns),
        Scope::Namespace(ns) => {
            if services.auth.namespace_readable(&identity.principal, ns) {
                Ok(())
            } else {
                Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no namespace {ns}")))
            }
        }
    }
}

/// Serve a scope's `retention[/run]` (`rest` follows `retention`).
pub(crate) async fn handle(
    services: &Services,
    identity: &Identity,
    scope: Scope,
    rest: &[&str],
    req: &mut Request,
) -> Result<Reply, RegistryError> {
    let m = req.method.clone();
    match (rest, &m) {
        ([], &Method::GET) => get(services, identity, &scope).await,
        ([], &Method::PUT) => set(services, identity, &scope, body(req).await?).await,
        ([], &Method::DELETE) => remove(services, identity, &scope).await,
        (["run"], &Method::POST) => run(services, identity, &scope, body(req).await?).await,
        ([] | ["run"], m) => Err(method_not_allowed(m)),
        _ => Err(RegistryError::new(ErrorCode::NotFound).with_detail(format!("no such endpoint: …/retention/{}", rest.join("/")))),
    }
}

/// A repository's (or namespace's) retention policy.
#[utoipa::path(get, path = "/api/v1/repositories/{name}/-/retention", operation_id = "getRetention", tag = "retention",
    params(("name" = String, Path)), responses((status = 200, body = RetentionView), (status = 404, description = "none set")))]
async fn get(services: &Services, identity: &Identity, scope: &Scope) -> Result<Reply, RegistryError> {
    authorize(services, identity, scope, false)?;
    let p = services.registry.retention_policy(scope).await?.ok_or_else(|| not_set(scope))?;
    reply(StatusCode::OK, &view(p))
}

/// Set (replace) a retention policy.
#[utoipa::path(put, path = "/api/v1/repositories/{name}/-/retention", operation_id = "setRetention", tag = "retention",
    params(("name" = String, Path)), request_body = RetentionBody, responses((status = 200, body = RetentionView)))]
async fn set(services: &Services, identity: &Identity, scope: &Scope, b: RetentionBody) -> Result<Reply, RegistryError> {
    authorize(services, identity, scope, true)?;
    let rules = RetentionRules {
        keep_last: b.keep_last,
        keep_patterns: b.keep_patterns,
        unpulled_for_secs: b.unpulled_for.as_deref().map(|s| parse_duration("unpulled_for", s)).transpose()?,
        untagged_older_than_secs: b.untagged_older_than.as_deref().map(|s| parse_duration("untagged_older_than", s)).transpose()?,
    };
    check_rules(&rules)?;
    if let Scope::Repository(r) = scope {
        if !services.registry.repo_exists(r).await? {
            return Err(RegistryError::new(ErrorCode::NameUnknown).with_detail(format!("repository {r} is unknown")));
        }
    }
    let p = services.registry.set_retention_policy(scope, rules, b.enabled).await?;
    reply(StatusCode::OK, &view(p))
}

/// Remove a retention policy.
#[utoipa::path(delete, path = "/api/v1/repositories/{name}/-/retention", operation_id = "deleteRetention", tag = "retention",
    params(("name" = String, Path)), responses((status = 204), (status = 404, description = "none set")))]
async fn remove(services: &Services, identity: &Identity, scope: &Scope) -> Result<Reply, RegistryError> {
    authorize(services, identity, scope, true)?;
    if !services.registry.delete_retention_policy(scope).await? {
        return Err(not_set(scope));
    }
    Ok(crate::no_content())
}

/// Run a retention policy now (or list what it would delete), leaving an audit record.
#[utoipa::path(post, path = "/api/v1/repositories/{name}/-/retention/run", operation_id = "runRetention", tag = "retention",
    params(("name" = String, Path)), request_body = RetentionRunBody, responses((status = 200, body = RetentionRunView)))]
async fn run(services: &Services, identity: &Identity, scope: &Scope, b: RetentionRunBody) -> Result<Reply, RegistryError> {
    authorize(services, identity, scope, true)?;
    let p = services.registry.retention_policy(scope).await?.ok_or_else(|| not_set(scope))?;
    let by = identity.principal.subject().to_owned();
    reply(StatusCode::OK, &run_view(services.registry.run_retention(scope, &p.rules, &by, b.dry_run).await?))
}

/// The audit records of retention runs, newest first: of a repository (its
/// own policy's runs and what its namespace's deleted in it), of a namespace, or
/// (platform admin) all.
#[utoipa::path(get, path = "/api/v1/retention/runs", operation_id = "listRetentionRuns", tag = "retention", params(RunsParams),
    responses((status = 200, body = RetentionRunList)))]
pub(crate) async fn runs(services: &Services, identity: &Identity, p: RunsParams) -> Result<Reply, RegistryError> {
    let limit = match p.limit {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(n) => return Err(bad(format!("limit {n}: 1 to 1000"))),
    };
    let all = services.registry.retention_runs().await?;
    let runs: Vec<RetentionRunView> = match (p.repository, p.namespace) {
        (Some(_), Some(_)) => return Err(bad("give repository or namespace, not both")),
        (Some(r), None) => {
            let repo: RepoName = r.parse()?;
            authorize(services, identity, &Scope::Repository(repo.clone()), false)?;
            let (own, ns) = (Scope::Repository(repo.clone()).key(), format!("ns:{}", repo.namespace()));
            all.into_iter()
                .filter(|r| r.scope == own || r.scope == ns)
                .map(|mut r| {
                    r.items.retain(|i| i.repository == repo.as_str());
                    r.errors.retain(|e| e.starts_with(&format!("{repo} ")) || e.starts_with(&format!("{repo}:")));
                    r
                })
                .filter(|r| r.scope == own || !r.items.is_empty() || !r.errors.is_empty())
                .take(limit)
                .map(run_view)
                .collect()
        }
        (None, Some(n)) => {
            let ns: AccountName = n.parse()?;
            authorize(services, identity, &Scope::Namespace(ns.clone()), false)?;
            let prefix = format!("repo:{ns}/");
            all.into_iter().filter(|r| r.scope == format!("ns:{ns}") || r.scope.starts_with(&prefix)).take(limit).map(run_view).collect()
        }
        (None, None) => {
            services.auth.require_platform_admin(&identity.principal)?;
            all.into_iter().take(limit).map(run_view).collect()
        }
    };
    reply(StatusCode::OK, &RetentionRunList { runs })
}

/// A namespace's retention policy (for each of its repositories without one of their own).
#[utoipa::path(get, path = "/api/v1/namespaces/{ns}/retention", operation_id = "getNamespaceRetention", tag = "retention",
    params(("ns" = String, Path)), responses((status = 200, body = RetentionView), (status = 404, description = "none set")))]
#[allow(dead_code)]
fn ns_get() {}

/// Set (replace) a namespace's retention policy.
#[utoipa::path(put, path = "/api/v1/namespaces/{ns}/retention", operation_id = "setNamespaceRetention", tag = "retention",
    params(("ns" = String, Path)), request_body = RetentionBody, responses((status = 200, body = RetentionView)))]
#[allow(dead_code)]
fn ns_set() {}

/// Remove a namespace's retention policy.
#[utoipa::path(delete, path = "/api/v1/namespaces/{ns}/retention", operation_id = "deleteNamespaceRetention", tag = "retention",
    params(("ns" = String, Path)), responses((status = 204), (status = 404, description = "none set")))]
#[allow(dead_code)]
fn ns_remove() {}

/// Run a namespace's retention policy now (or list what it would delete).
#[utoipa::path(post, path = "/api/v1/namespaces/{ns}/retention/run", operation_id = "runNamespaceRetention", tag = "retention",
    params(("ns" = String, Path)), request_body = RetentionRunBody, responses((status = 200, body = RetentionRunView)))]
#[allow(dead_code)]
fn ns_run() {}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(get, set, remove, run, runs, ns_get, ns_set, ns_remove, ns_run),
    components(schemas(RetentionBody, RetentionView, RetentionRunBody, RetentionRunView, RetentionItemView, RetentionRunList))
)]
pub struct RetentionDoc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_duration("x", "2w").unwrap(), 14 * 86_400);
        assert_eq!(parse_duration("x", "45s").unwrap(), 45);
        for bad in ["", "d", "10", "10y", "-1d", "0s", "1.5h", "99999999999999999999d", "6000w"] {
            assert!(parse_duration("x", bad).is_err(), "{bad}");
        }
    }
}
