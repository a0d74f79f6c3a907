//! The gate every request passes: authenticate from `Authorization`, authorize
//! the route centrally, and render refusals (401 with a Bearer challenge, 403,
//! 429). Also the token endpoint docker and OAuth2 clients log in through.

use berth_auth::{Action, Auth, Identity, Login, Refusal, Scope};
use berth_oci::{ErrorCode, RegistryError, RepoName};
use warp::http::{Method, StatusCode};

use crate::route::Route;
use crate::{error_response, json_response, set, Reply, Request};

/// What the central authorization decided beyond allow/deny.
#[derive(Default)]
pub struct Grants {
    /// A `?mount=&from=` whose source the caller may not read is ignored
    /// (the request falls back to a plain upload session).
    pub mount_allowed: bool,
}

/// The externally visible base URL (for the token realm).
pub(crate) fn external_base(auth: &Auth, req: &Request) -> String {
    if let Some(u) = &auth.config().external_url {
        return u.trim_end_matches('/').to_owned();
    }
    let scheme = if req.secure { "https" } else { "http" };
    let (mut proto, mut host) = (scheme.to_owned(), req.header("host").unwrap_or("localhost").to_owned());
    if auth.config().trust_proxy {
        if let Some(p) = req.header("x-forwarded-proto").and_then(|v| v.split(',').next()) {
            proto = p.trim().to_owned();
        }
        if let Some(h) = req.header("x-forwarded-host").and_then(|v| v.split(',').next()) {
            host = h.trim().to_owned();
        }
    }
    // Header values end up inside a quoted challenge: keep them to URL characters.
    let clean = |s: String| s.chars().filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\').collect::<String>();
    format!("{}://{}", clean(proto), clean(host))
}

/// What a management API 401 carries instead of a `Basic` challenge: browsers
/// prompt for, and then cache and resend, `Basic` credentials, which would make
/// the API a cross-site request target; they ignore an unknown scheme. CLIs and
/// scripts send Basic credentials without being asked.
pub(crate) const API_CHALLENGE: &str = "BerthBasic realm=\"berth\"";

/// Refuse what a browser sends on another site's behalf to the management APIs:
/// a state-changing request marked `Sec-Fetch-Site: cross-site`, or whose
/// `Origin` is not this registry's own. Safe methods pass (no CORS headers are
/// ever sent, so another site cannot read the answer).
pub(crate) fn refuse_cross_site(auth: &Auth, req: &Request) -> Result<(), RegistryError> {
    if matches!(req.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let refused = |why: &str| Err(RegistryError::new(ErrorCode::Denied).with_detail(format!("cross-site request refused: {why}")));
    if req.header("sec-fetch-site").is_some_and(|v| v.eq_ignore_ascii_case("cross-site")) {
        return refused("Sec-Fetch-Site is cross-site");
    }
    if let Some(origin) = req.header("origin") {
        let own = external_base(auth, req);
        if !origin.trim_end_matches('/').eq_ignore_ascii_case(&own) {
            return refused("Origin is not this registry");
        }
    }
    Ok(())
}

/// The management surfaces take Basic credentials (a password or a registry
/// access token), never anonymous calls or bearer tokens; the refusal is a 401
/// to be sent with [`API_CHALLENGE`].
pub(crate) fn require_basic(identity: &Identity) -> Result<(), RegistryError> {
    if identity.principal == berth_auth::Principal::Anonymous || matches!(identity.credential, berth_auth::Credential::Bearer(_)) {
        return Err(RegistryError::new(ErrorCode::Unauthorized).with_detail("use Basic credentials: a password or a registry access token"));
    }
    if !identity.credential.has_scope("manage") {
        return Err(RegistryError::new(ErrorCode::Denied).with_detail("this access token's scopes do not include manage"));
    }
    Ok(())
}

/// Authorize a management call on a repository: the same decision as the OCI
/// API's, as an error the management surfaces render in their own shape.
pub(crate) fn authorize_api(auth: &Auth, identity: &Identity, repo: &RepoName, action: Action) -> Result<(), RegistryError> {
    auth.authorize(identity, repo, action).map_err(|r| match r {
        Refusal::Challenge { error, .. } | Refusal::Denied(error) | Refusal::Error(error) | Refusal::Throttled { error, .. } => error,
    })
}

/// The caller's address for throttling (behind trusted proxies, the right-most
/// `X-Forwarded-For` hop that is not one of them: [`berth_auth::AuthConfig::client_address`]).
pub fn source(auth: &Auth, req: &Request) -> String {
    let hops = req.headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    auth.config().client_address(req.remote.map(|a| a.ip()), hops).map(|ip| ip.to_string()).unwrap_or_default()
}

/// Render a refusal.
pub fn refusal_response(auth: &Auth, req: &Request, r: Refusal) -> Reply {
    match r {
        Refusal::Challenge { error, scope } => {
            let mut resp = error_response(&error);
            let mut c = format!("Bearer realm=\"{}/auth/token\",service=\"{}\"", external_base(auth, req), auth.config().service);
            if let Some(s) = scope {
                c.push_str(&format!(",scope=\"{s}\""));
            }
            set(&mut resp, "www-authenticate", c);
            resp
        }
        Refusal::Denied(e) | Refusal::Error(e) => error_response(&e),
        Refusal::Throttled { error, retry_after_secs } => {
            let mut resp = error_response(&error);
            set(&mut resp, "retry-after", retry_after_secs.to_string());
            resp
        }
    }
}

/// Authenticate the request. The future owns what it needs from the request
/// (a request body is not `Sync`, so it must not be borrowed across the await).
pub fn authenticate<'a>(auth: &'a Auth, req: &Request) -> impl std::future::Future<Output = Result<Identity, Refusal>> + Send + 'a {
    let header = req.header("authorization").map(str::to_owned);
    let src = source(auth, req);
    async move { auth.authenticate(header.as_deref(), &src).await }
}

/// The action a route needs, on which repository.
fn requirement(route: &Route, method: &Method) -> Option<(RepoName, Action)> {
    let action = |read: bool| if read { Action::Pull } else { Action::Push };
    let read = matches!(*method, Method::GET | Method::HEAD);
    match route {
        Route::Base | Route::Catalog => None,
        Route::Tags(r) | Route::Referrers(r, _) => Some((r.clone(), Action::Pull)),
        Route::Manifest(r, _) | Route::BadReference(r, _) | Route::Blob(r, _) if *method == Method::DELETE => {
            Some((r.clone(), Action::Delete))
        }
        Route::Manifest(r, _) | Route::BadReference(r, _) | Route::Blob(r, _) => Some((r.clone(), action(read))),
        Route::Uploads(r) | Route::Upload(r, _) => Some((r.clone(), Action::Push)),
    }
}

/// Authorize a `/v2/` route for an authenticated identity.
pub fn authorize(auth: &Auth, identity: &Identity, route: &Route, req: &Request) -> Result<Grants, Refusal> {
    let mut grants = Grants::default();
    match route {
        // `/v2/` answers 200 only to authenticated callers: that 401 is how docker
        // learns where to log in.
        Route::Base if identity.principal == berth_auth::Principal::Anonymous => {
            return Err(Refusal::Challenge {
                error: RegistryError::new(ErrorCode::Unauthorized).with_detail("authentication required"),
                scope: None,
            })
        }
        // The catalog needs a credential that may list it; anonymous callers and
        // bearer tokens without the grant are challenged for its scope (public
        // repositories stay listed for anyone at /registry/v1/repositories/public).
        Route::Catalog if !identity.may_list_catalog() => {
            return Err(Refusal::Challenge {
                error: RegistryError::new(ErrorCode::Unauthorized).with_detail("authentication required to list the catalog"),
                scope: Some("registry:catalog:*".into()),
            })
        }
        _ => {}
    }
    if let Some((repo, action)) = requirement(route, &req.method) {
        auth.authorize(identity, &repo, action)?;
    }
    if let Route::Uploads(_) = route {
        if let Some(from) = req.param("from").and_then(|f| f.parse::<RepoName>().ok()) {
            grants.mount_allowed = auth.can(identity, &from, Action::Pull);
        }
    }
    Ok(grants)
}

/// `GET|POST /auth/token`: docker's token flow (GET with Basic) and OAuth2
/// (`grant_type=password|refresh_token`, form-encoded POST).
pub async fn token_endpoint(auth: &Auth, req: &mut Request) -> Reply {
    match token_inner(auth, req).await {
        Ok(r) => r,
        Err(refusal) => refusal_response(auth, req, refusal),
    }
}

fn invalid(detail: &str) -> Refusal {
    Refusal::Error(RegistryError::new(ErrorCode::InvalidRequest).with_detail(detail.to_owned()))
}

async fn token_inner(auth: &Auth, req: &mut Request) -> Result<Reply, Refusal> {
    let src = source(auth, req);
    let (params, oauth) = match req.method {
        Method::GET => (req.params(), false),
        Method::POST => {
            let body = crate::read_small_body(req, 64 * 1024).await.map_err(Refusal::Error)?;
            let text = String::from_utf8(body).map_err(|_| invalid("form body is not UTF-8"))?;
            (crate::parse_query(&text), true)
        }
        _ => return Err(Refusal::Error(crate::method_not_allowed(&req.method))),
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if let Some(service) = get("service") {
        if service != auth.config().service {
            return Err(invalid(&format!("unknown service {service:?}")));
        }
    }
    let mut scopes = Vec::new();
    for (k, v) in &params {
        if k == "scope" {
            // OAuth2 separates scopes with spaces; docker repeats the parameter.
            for s in v.split(' ').filter(|s| !s.is_empty()) {
                scopes.push(s.parse::<Scope>().map_err(Refusal::Error)?);
            }
        }
    }
    let basic = req.header("authorization").and_then(|h| {
        let (scheme, v) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then(|| berth_auth::decode_basic(v.trim()))
    });
    let token = if oauth {
        match get("grant_type") {
            Some("password") => {
                let (u, p) = (get("username").unwrap_or(""), get("password").unwrap_or(""));
                let offline = get("access_type") == Some("offline");
                auth.token(Login::Password { user: u, secret: p }, &scopes, offline, &src).await?
            }
            Some("refresh_token") => {
                let t = get("refresh_token").ok_or_else(|| invalid("refresh_token is required"))?;
                auth.token(Login::Refresh { token: t }, &scopes, false, &src).await?
            }
            _ => return Err(invalid("grant_type must be password or refresh_token")),
        }
    } else {
        let offline = get("offline_token") == Some("true");
        match basic {
            Some(Some((u, p))) => auth.token(Login::Password { user: &u, secret: &p }, &scopes, offline, &src).await?,
            Some(None) => {
                return Err(Refusal::Challenge {
                    error: RegistryError::new(ErrorCode::Unauthorized).with_detail("malformed Basic credentials"),
                    scope: None,
                })
            }
            None => auth.token(Login::Anonymous, &scopes, false, &src).await?,
        }
    };
    let issued_at = chrono_like(token.issued_at);
    let mut body = serde_json::json!({
        "token": token.token,
        "access_token": token.token,
        "expires_in": token.expires_in,
        "issued_at": issued_at,
    });
    if let Some(r) = token.refresh_token {
        body["refresh_token"] = serde_json::Value::String(r);
    }
    let mut resp = json_response(StatusCode::OK, serde_json::to_vec(&body).expect("json"));
    set(&mut resp, "cache-control", "no-store");
    Ok(resp)
}

/// RFC 3339 UTC time from Unix seconds (no date library needed for this one use).
fn chrono_like(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::chrono_like(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::chrono_like(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(super::chrono_like(951_782_400), "2000-02-29T00:00:00Z");
    }
}
