//! The management API (`/api/v1/…`): tenants, users, access tokens, policies,
//! repository visibility and shares. JSON in, JSON out; errors use the same
//! error table and JSON shape as the OCI API. Callers authenticate with Basic
//! (a password or a registry access token); every permission check is made by
//! [`berth_auth::Auth`], not here.

use berth_auth::policy::{export_rules, validate_rule};
use berth_auth::{Action, Credential, Identity, Principal};
use berth_metadata::{PolicyRuleRow, TokenRow};
use berth_oci::{AccountName, ErrorCode, RegistryError, RepoName};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use warp::http::{Method, StatusCode};

use crate::{error_response, gate, json_response, method_not_allowed, read_small_body, set, Reply, Request, Services};

const MAX_BODY: usize = 256 * 1024;

fn not_found(path: &str) -> RegistryError {
    RegistryError::new(ErrorCode::NotFound).with_detail(format!("no such endpoint: /api/v1/{path}"))
}

fn ok(v: serde_json::Value) -> Result<Reply, RegistryError> {
    Ok(json_response(StatusCode::OK, serde_json::to_vec(&v).expect("json")))
}

fn no_content() -> Result<Reply, RegistryError> {
    Ok(crate::no_content())
}

async fn body<T: DeserializeOwned>(req: &mut Request) -> Result<T, RegistryError> {
    let b = read_small_body(req, MAX_BODY).await?;
    serde_json::from_slice(&b).map_err(|e| RegistryError::new(ErrorCode::InvalidRequest).with_detail(format!("invalid JSON body: {e}")))
}

fn token_json(t: &TokenRow) -> serde_json::Value {
    json!({
        "id": t.id,
        "user": t.user,
        "description": t.description,
        "created_ms": t.created_ms,
        "expires_ms": t.expires_ms,
        "last_used_ms": t.last_used_ms,
    })
}

fn rule_json(r: &PolicyRuleRow) -> serde_json::Value {
    json!({"ptype": r.ptype, "fields": r.fields})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameBody {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    name: String,
    password: String,
    role: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    password: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    #[serde(default)]
    description: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleBody {
    ptype: String,
    fields: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    user: String,
    #[serde(default)]
    tenant: String,
    object: String,
    action: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VisibilityBody {
    public: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ShareBody {
    #[serde(default)]
    push: bool,
    expires_in: Option<u64>,
}

/// Serve one management request.
pub async fn handle(services: &Services, path: &str, mut req: Request) -> Reply {
    let auth = &services.auth;
    if path == "openapi.json" && req.method == Method::GET {
        return crate::manage::openapi();
    }
    let identity = match gate::authenticate(auth, &req).await {
        Ok(i) => i,
        Err(r) => return gate::refusal_response(auth, &req, r),
    };
    if matches!(identity.credential, Credential::Bearer(_)) || identity.principal == Principal::Anonymous {
        let mut r = error_response(
            &RegistryError::new(ErrorCode::Unauthorized).with_detail("use Basic credentials: a password or a registry access token"),
        );
        set(&mut r, "www-authenticate", "Basic realm=\"berth\"");
        return r;
    }
    match route(services, &identity, path, &mut req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn route(services: &Services, identity: &Identity, path: &str, req: &mut Request) -> Result<Reply, RegistryError> {
    let auth = &services.auth;
    let who = &identity.principal;
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let m = req.method.clone();
    match (segs.as_slice(), &m) {
        (["me"], &Method::GET) => {
            let tenant = who.user().and_then(|u| {
                auth.policy().rules().into_iter().find_map(|r| {
                    (r.ptype == "g2" && r.fields[0] == u.as_str()).then(|| r.fields[1].strip_prefix("tenant:").map(str::to_owned)).flatten()
                })
            });
            ok(json!({"user": who.subject(), "tenant": tenant}))
        }
        (["registry"], &Method::GET) => crate::manage::registry_info(services, req),
        (["me", "password"], &Method::PUT) => {
            let b: PasswordBody = body(req).await?;
            auth.change_password(who, &b.password).await?;
            no_content()
        }
        (["tenants"], &Method::GET) => {
            let t = auth.tenants(who).await?;
            ok(json!({"tenants": t.iter().map(|t| json!({"name": t.name, "created_ms": t.created_ms})).collect::<Vec<_>>()}))
        }
        (["tenants"], &Method::POST) => {
            let b: NameBody = body(req).await?;
            auth.create_tenant(who, b.name.parse()?).await?;
            Ok(json_response(StatusCode::CREATED, serde_json::to_vec(&json!({"name": b.name})).expect("json")))
        }
        (["tenants", t, "namespaces"], &Method::POST) => {
            let tenant: AccountName = t.parse()?;
            let b: NameBody = body(req).await?;
            auth.add_namespace(who, tenant, b.name.parse()?).await?;
            Ok(json_response(StatusCode::CREATED, serde_json::to_vec(&json!({"name": b.name, "tenant": t})).expect("json")))
        }
        (["tenants", t, "users"], &Method::POST) => {
            let tenant: AccountName = t.parse()?;
            let b: UserBody = body(req).await?;
            auth.create_user(who, tenant, b.name.parse()?, &b.password, &b.role).await?;
            Ok(json_response(StatusCode::CREATED, serde_json::to_vec(&json!({"name": b.name, "tenant": t, "role": b.role})).expect("json")))
        }
        (["users"], &Method::GET) => {
            let users = auth.users(who).await?;
            ok(json!({"users": users.iter().map(|(u, t)| json!({"name": u, "tenant": t})).collect::<Vec<_>>()}))
        }
        (["tokens"], &Method::GET) => ok(json!({"tokens": auth.list_tokens(who).iter().map(token_json).collect::<Vec<_>>()})),
        (["tokens"], &Method::POST) => {
            let b: TokenBody = body(req).await?;
            let issued = auth.issue_access_token(who, b.expires_in, b.description).await?;
            let mut v = token_json(&issued.row);
            v["token"] = json!(issued.token);
            // What `docker login` needs, and the `auth` value of a docker config.json.
            v["docker_auth"] = json!(berth_auth::secret::b64(&format!("{}:{}", issued.row.user, issued.token)));
            let mut r = json_response(StatusCode::CREATED, serde_json::to_vec(&v).expect("json"));
            set(&mut r, "cache-control", "no-store");
            Ok(r)
        }
        (["tokens", id], &Method::DELETE) => {
            auth.revoke_token(who, id).await?;
            no_content()
        }
        (["policies"], &Method::GET) => {
            let rules = auth.policy_rules(who)?;
            if req.param("format").as_deref() == Some("csv") {
                let mut r = json_response(StatusCode::OK, export_rules(&rules).into_bytes());
                set(&mut r, "content-type", "text/csv; charset=utf-8");
                return Ok(r);
            }
            ok(json!({"version": auth.policy().version(), "rules": rules.iter().map(rule_json).collect::<Vec<_>>()}))
        }
        (["policies"], &Method::POST) => {
            let b: RuleBody = body(req).await?;
            let rule = validate_rule(&b.ptype, b.fields)?;
            auth.change_policy(who, vec![rule.clone()], vec![]).await?;
            Ok(json_response(StatusCode::CREATED, serde_json::to_vec(&rule_json(&rule)).expect("json")))
        }
        (["policies", "remove"], &Method::POST) => {
            let b: RuleBody = body(req).await?;
            let rule = validate_rule(&b.ptype, b.fields)?;
            if !auth.policy_rules(who)?.contains(&rule) {
                return Err(RegistryError::new(ErrorCode::NotFound).with_detail("no such rule"));
            }
            auth.change_policy(who, vec![], vec![rule]).await?;
            no_content()
        }
        (["policies", "check"], &Method::POST) => {
            let b: CheckBody = body(req).await?;
            let action: Action = b.action.parse()?;
            let d = auth.check_policy(who, &b.user, &b.tenant, &b.object, action)?;
            ok(json!({"allowed": d.allowed, "rule": d.rule}))
        }
        (["keys", "rotate"], &Method::POST) => ok(json!({"kid": auth.rotate_signing_key(who).await?})),
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
    ["me", "me/password", "registry", "tenants", "users", "tokens", "policies", "policies/remove", "policies/check", "keys/rotate"]
        .contains(&p)
        || p.starts_with("tokens/")
        || p.starts_with("tenants/")
}

/// `…/visibility` and `…/shares[/<tenant>]` without the `/-/` separator of the
/// repository endpoints (see `manage`).
fn is_old_style(segs: &[&str]) -> bool {
    !segs.contains(&"-") && (segs.last() == Some(&"visibility") || segs.iter().rev().take(2).any(|s| *s == "shares"))
}

/// `/api/v1/repositories/<name…>/visibility` and `/…/shares[/<tenant>]`; the
/// name has any number of components, so it is read up to the keyword.
async fn repository(services: &Services, who: &Principal, segs: &[&str], req: &mut Request) -> Result<Reply, RegistryError> {
    let auth = &services.auth;
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
        (["visibility"], &Method::GET) => ok(json!({"repository": repo, "public": auth.is_public(&repo)})),
        (["visibility"], &Method::PUT) => {
            let b: VisibilityBody = body(req).await?;
            auth.set_public(who, &repo, b.public).await?;
            ok(json!({"repository": repo, "public": b.public}))
        }
        (["shares"], &Method::GET) => {
            let shares = auth.shares(who, &repo).await?;
            ok(
                json!({"shares": shares.iter().map(|s| json!({"tenant": s.tenant, "actions": s.actions, "expires_ms": s.expires_ms})).collect::<Vec<_>>()}),
            )
        }
        (["shares", t], &Method::PUT) => {
            let tenant: AccountName = t.parse()?;
            let b: ShareBody = body(req).await?;
            auth.share(who, &repo, tenant, b.push, b.expires_in).await?;
            ok(json!({"repository": repo, "tenant": t, "push": b.push, "expires_in": b.expires_in}))
        }
        (["shares", t], &Method::DELETE) => {
            auth.unshare(who, &repo, t.parse()?).await?;
            no_content()
        }
        (_, m) => Err(method_not_allowed(m)),
    }
}
