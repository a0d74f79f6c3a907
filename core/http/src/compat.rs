//! `/registry/v1`: the seed console's repository API, a thin adapter over the
//! same services as `/api/v1` (no second implementation). Paths name a
//! repository as `:namespace/:image` (two components); answers are
//! `{"code":0,"data":…}` with the seed's field names and RFC 3339 times, errors
//! `{"code":<HTTP status>,"message":…}`.
//!
//! - `GET    /registry/v1/tag/list/:namespace/:image`
//! - `GET    /registry/v1/manifests/:reference/:namespace/:image`
//! - `DELETE /registry/v1/manifests/:reference/:namespace/:image`
//! - `GET    /registry/v1/repositories/mine` (repositories the caller may push)
//! - `GET    /registry/v1/repositories/public` (anonymous callers too)
//! - `PATCH  /registry/v1/:namespace/:image/publicity` with `{"Publicity": 1|0}`
//!
//! `ID` is a stable number derived from the repository (and tag) name, the same
//! on every replica and across restarts.

use berth_auth::{Action, Identity, Listed};
use berth_oci::{Reference, RegistryError, RepoName};
use berth_registry::manage::{RepoQuery, RepoSummary};
use serde::{Deserialize, Serialize};
use warp::http::{Method, StatusCode};

use crate::{gate, json_response, Reply, Request, Services};

/// One record of the seed API.
#[derive(Serialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Record {
    #[serde(rename = "ID")]
    id: u64,
    namespace: String,
    image: String,
    tag: String,
    digest: String,
    size: u64,
    publicity: u8,
    pull_count: u64,
    push_count: u64,
    latest_tag: String,
    created_at: String,
    updated_at: String,
    deleted_at: Option<String>,
    /// Only on a manifest answer: the manifest itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Answer<T: Serialize> {
    code: u16,
    data: T,
}

#[derive(Serialize)]
struct Failure {
    code: u16,
    message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publicity {
    #[serde(rename = "Publicity")]
    publicity: u8,
}

fn ok<T: Serialize>(data: T) -> Reply {
    json_response(StatusCode::OK, serde_json::to_vec(&Answer { code: 0, data }).unwrap_or_default())
}

fn fail(e: &RegistryError) -> Reply {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = format!("{}: {}", e.code().code(), e.detail_or_message());
    json_response(status, serde_json::to_vec(&Failure { code: status.as_u16(), message }).unwrap_or_default())
}

fn bad(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(berth_oci::ErrorCode::InvalidRequest).with_detail(detail.into())
}

/// FNV-1a, cut to 53 bits so JSON numbers hold it exactly.
pub(crate) fn stable_id(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h & ((1 << 53) - 1)
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
pub(crate) fn rfc3339(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn repo_name(ns: &str, image: &str) -> Result<RepoName, RegistryError> {
    format!("{ns}/{image}").parse()
}

fn record(services: &Services, s: &RepoSummary) -> Record {
    let p = &s.profile;
    let latest = s.stats.latest_tag.as_ref().map(|t| t.to_string()).unwrap_or_default();
    Record {
        id: stable_id(p.name.as_str()),
        namespace: p.name.namespace().to_owned(),
        image: p.name.as_str()[p.name.namespace().len() + 1..].to_owned(),
        tag: latest.clone(),
        size: s.stats.size,
        publicity: u8::from(services.auth.is_public(&p.name)),
        pull_count: p.pulls,
        push_count: p.pushes,
        latest_tag: latest,
        created_at: rfc3339(p.created_ms),
        updated_at: rfc3339(p.updated_ms),
        ..Default::default()
    }
}

fn authorize(services: &Services, identity: &Identity, repo: &RepoName, action: Action) -> Result<(), RegistryError> {
    gate::authorize_api(&services.auth, identity, repo, action)
}

/// Serve `/registry/v1/…` (`path` is what follows it).
pub(crate) async fn handle(services: &Services, path: &str, mut req: Request) -> Reply {
    if let Err(e) = gate::refuse_cross_site(&services.auth, &req) {
        return fail(&e);
    }
    let identity = match gate::authenticate(&services.auth, &req).await {
        Ok(i) => i,
        Err(r) => return gate::refusal_response(&services.auth, &req, r),
    };
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let anonymous_ok = segs == ["repositories", "public"] && req.method == Method::GET;
    if let Err(e) = gate::require_basic(&identity) {
        if !anonymous_ok {
            let mut r = fail(&e);
            crate::set(&mut r, "www-authenticate", crate::gate::API_CHALLENGE);
            return r;
        }
    }
    match serve(services, &identity, &segs, &mut req).await {
        Ok(r) => r,
        Err(e) => fail(&e),
    }
}

async fn serve(services: &Services, identity: &Identity, segs: &[&str], req: &mut Request) -> Result<Reply, RegistryError> {
    let registry = &services.registry;
    let m = req.method.clone();
    match (segs, &m) {
        (["tag", "list", ns, image], &Method::GET) => {
            let repo = repo_name(ns, image)?;
            authorize(services, identity, &repo, Action::Pull)?;
            let tags = registry.list_tags(&repo, None, usize::MAX, 0).await?.items;
            let summary = registry.repo_summary(&repo).await?;
            let base = record(services, &summary);
            let data: Vec<Record> = tags
                .into_iter()
                .map(|t| Record {
                    id: stable_id(&format!("{repo}:{}", t.name)),
                    tag: t.name.to_string(),
                    digest: t.digest.to_string(),
                    size: t.manifest_size,
                    pull_count: t.pulls,
                    push_count: t.pushes,
                    created_at: rfc3339(t.pushed_ms),
                    updated_at: rfc3339(t.pushed_ms),
                    namespace: base.namespace.clone(),
                    image: base.image.clone(),
                    publicity: base.publicity,
                    latest_tag: base.latest_tag.clone(),
                    ..Default::default()
                })
                .collect();
            Ok(ok(data))
        }
        (["manifests", reference, ns, image], &Method::GET) => {
            let repo = repo_name(ns, image)?;
            let reference: Reference = crate::route::percent_decode(reference).ok_or_else(|| bad("bad percent-encoding"))?.parse()?;
            authorize(services, identity, &repo, Action::Pull)?;
            let (body, size) = registry.read_manifest(&repo, &reference, true).await?;
            let summary = registry.repo_summary(&repo).await?;
            let mut r = record(services, &summary);
            r.id = stable_id(&format!("{repo}@{}", body.digest));
            r.tag = match &reference {
                Reference::Tag(t) => t.to_string(),
                Reference::Digest(_) => String::new(),
            };
            r.digest = body.digest.to_string();
            r.size = size;
            r.manifest = Some(serde_json::from_slice(&body.bytes).map_err(|e| RegistryError::internal().with_detail(e.to_string()))?);
            Ok(ok(r))
        }
        (["manifests", reference, ns, image], &Method::DELETE) => {
            let repo = repo_name(ns, image)?;
            let reference: Reference = crate::route::percent_decode(reference).ok_or_else(|| bad("bad percent-encoding"))?.parse()?;
            authorize(services, identity, &repo, Action::Delete)?;
            registry.delete_manifest(&repo, &reference, identity.principal.subject()).await?;
            Ok(ok(serde_json::Value::Null))
        }
        (["repositories", scope @ ("mine" | "public")], &Method::GET) => {
            let action = if *scope == "mine" { Action::Push } else { Action::Pull };
            let public_only = *scope == "public";
            let q = RepoQuery { limit: usize::MAX, ..Default::default() };
            let auth = &services.auth;
            registry.fresh_catalog().await?;
            let names = auth.listing(identity, action, |seen| {
                registry.repo_names(&q, |r| {
                    let Listed { allowed, public } = seen(r);
                    if public_only {
                        public
                    } else {
                        allowed
                    }
                })
            });
            let found = registry.list_repos(&q, names).await?;
            Ok(ok(found.items.iter().map(|s| record(services, s)).collect::<Vec<_>>()))
        }
        ([ns, image, "publicity"], &Method::PATCH) => {
            let repo = repo_name(ns, image)?;
            let b = crate::read_json_body(req, 4096).await?;
            let p: Publicity = serde_json::from_slice(&b).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
            if p.publicity > 1 {
                return Err(bad("Publicity must be 0 or 1"));
            }
            if !registry.repo_exists(&repo).await? {
                authorize(services, identity, &repo, Action::Pull)?;
                return Err(RegistryError::new(berth_oci::ErrorCode::NameUnknown).with_detail(format!("repository {repo} is unknown")));
            }
            services.auth.set_public(&identity.principal, &repo, p.publicity == 1).await?;
            let summary = registry.repo_summary(&repo).await?;
            Ok(ok(record(services, &summary)))
        }
        (["tag", "list", ..] | ["manifests", ..] | ["repositories", ..] | [_, _, "publicity"], m) => Err(crate::method_not_allowed(m)),
        _ => {
            Err(RegistryError::new(berth_oci::ErrorCode::NotFound)
                .with_detail(format!("no such endpoint: /registry/v1/{}", segs.join("/"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_083_200_000), "2026-12-01T00:00:00.000Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn ids_are_stable_and_json_safe() {
        assert_eq!(stable_id("acme/app"), stable_id("acme/app"));
        assert_ne!(stable_id("acme/app"), stable_id("acme/app:v1"));
        assert!(stable_id("x") < (1 << 53));
    }
}
