//! Authentication end to end: the docker token flow, OAuth2 grants, registry
//! access tokens (issue, list, use, revoke), refused credentials, login
//! throttling, and policy administration through the `berth` CLI with hot reload.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Poll `path` with `c` (POST when `post`) until it answers `want` (up to 10 s).
async fn eventually(c: &reqwest::Client, url: String, post: bool, want: u16) -> bool {
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rq = if post { c.post(&url) } else { c.get(&url) };
        if rq.send().await.unwrap().status() == want {
            return true;
        }
    }
    false
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

async fn token_for(s: &Server, auth: Option<&str>, scope: &str) -> (u16, serde_json::Value) {
    let mut rq = anon_client().get(s.url(&format!("/auth/token?service=berth&scope={scope}")));
    if let Some(a) = auth {
        rq = rq.header("authorization", a);
    }
    let r = rq.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(json!(null)))
}

#[tokio::test]
async fn docker_token_flow_and_scopes() {
    let dir = TempDir::new("auth-flow");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    tenant_user_token(&s, "acme", "mia", "maintainer").await;
    tenant_user_token(&s, "acme", "rea", "reader").await;

    // The challenge docker follows.
    let r = anon_client().get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert_eq!(challenge, format!("Bearer realm=\"{}/auth/token\",service=\"berth\"", s.base));
    let r = anon_client().post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let c = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(c.ends_with(",scope=\"repository:acme/app:pull,push\""), "{c}");
    // Behind a proxy with an external URL the realm follows it.
    let dir2 = TempDir::new("auth-flow-ext");
    let s2 = Server::start_in(&dir2.path().join("data"), &[("BERTH_EXTERNAL_URL", "https://registry.example.com")]);
    let r = anon_client().get(s2.url("/v2/")).send().await.unwrap();
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer realm=\"https://registry.example.com/auth/token\""));

    // A token for pull+push, as mia: granted both; as rea: only pull.
    let mia = basic("mia", "mia-password");
    let (code, v) = token_for(&s, Some(&mia), "repository:acme/app:pull,push").await;
    assert_eq!(code, 200);
    let mia_token = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["access_token"], v["token"]);
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    let mia_c = |t: &str| {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("authorization", bearer(t).parse().unwrap());
        reqwest::Client::builder().default_headers(h).build().unwrap()
    };
    let d = push_blob(&mia_c(&mia_token), &s, "acme/app", b"layer").await;
    let r = mia_c(&mia_token).get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Rotating the signing key keeps issued tokens valid; new ones use the new key.
    let r = client().post(s.url("/api/v1/keys/rotate")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mia_c(&mia_token).get(s.url("/v2/")).send().await.unwrap().status(), 200);
    let (_, v) = token_for(&s, Some(&mia), "repository:acme/app:pull").await;
    let rotated = v["token"].as_str().unwrap().to_string();
    assert_ne!(rotated.split('.').next(), mia_token.split('.').next(), "a new key id in the header");
    assert_eq!(mia_c(&rotated).get(s.url("/v2/")).send().await.unwrap().status(), 200);
    // The token names acme/app only: another repository asks for a new token.
    let r = mia_c(&mia_token).get(s.url("/v2/acme/other/tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("scope=\"repository:acme/other:pull\""));

    let (_, v) = token_for(&s, Some(&basic("rea", "rea-password")), "repository:acme/app:pull,push").await;
    let rea_token = v["token"].as_str().unwrap().to_string();
    let r = mia_c(&rea_token).get(s.url(&format!("/v2/acme/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = mia_c(&rea_token).post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 403, "policy refuses the reader push");

    // Anonymous tokens carry nothing for a private repository.
    let (code, v) = token_for(&s, None, "repository:acme/app:pull").await;
    assert_eq!(code, 200);
    let r = mia_c(v["token"].as_str().unwrap()).get(s.url(&format!("/v2/acme/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // Forged, truncated and foreign tokens.
    let mut forged = mia_token.clone();
    forged.pop();
    forged.push(if mia_token.ends_with('A') { 'B' } else { 'A' });
    for bad in [forged.as_str(), "a.b.c", "not-a-jwt", &mia_token[..mia_token.len() / 2]] {
        expect_error(mia_c(bad).get(s.url("/v2/")).send().await.unwrap(), 401, "UNAUTHORIZED", bad).await;
    }
    // A token from another Berth (another signing key) is refused.
    let (_, v) = token_for(&s2, Some(&basic("admin", ADMIN_PASSWORD)), "repository:acme/app:pull").await;
    expect_error(mia_c(v["token"].as_str().unwrap()).get(s.url("/v2/")).send().await.unwrap(), 401, "UNAUTHORIZED", "foreign").await;

    // OAuth2: password grant with a refresh token, then the refresh grant.
    let r = anon_client()
        .post(s.url("/auth/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "mia"),
            ("password", "mia-password"),
            ("service", "berth"),
            ("scope", "repository:acme/app:pull"),
            ("access_type", "offline"),
            ("client_id", "test"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    let r = anon_client()
        .post(s.url("/auth/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("service", "berth"),
            ("scope", "repository:acme/app:pull"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let r = mia_c(v["access_token"].as_str().unwrap()).get(s.url(&format!("/v2/acme/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A refresh token is not a password, and bad grants are clear 4xx.
    let r = anon_client()
        .post(s.url("/auth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "bt_0123456789abcdef_nope")])
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "UNAUTHORIZED", "bad refresh").await;
    let r = anon_client().post(s.url("/auth/token")).form(&[("grant_type", "magic")]).send().await.unwrap();
    expect_error(r, 400, "INVALID_REQUEST", "bad grant").await;
    let (code, _) = token_for(&s, Some(&mia), "repository:ACME:pull").await;
    assert_eq!(code, 400);
    let r = anon_client().get(s.url("/auth/token?service=other")).send().await.unwrap();
    expect_error(r, 400, "INVALID_REQUEST", "wrong service").await;

    // An emergency rotation (`berth rotate-key --now`): every token signed before
    // it is refused at once, tokens issued after work.
    let (_, v) = token_for(&s, Some(&mia), "repository:acme/app:pull").await;
    let before = v["token"].as_str().unwrap().to_string();
    assert_eq!(mia_c(&before).get(s.url("/v2/")).send().await.unwrap().status(), 200);
    let (ok, out) = berth_cli(&s, &["rotate-key", "--now"]);
    assert!(ok, "{out}");
    expect_error(mia_c(&before).get(s.url("/v2/")).send().await.unwrap(), 401, "UNAUTHORIZED", "signed by a dropped key").await;
    expect_error(mia_c(&rotated).get(s.url("/v2/")).send().await.unwrap(), 401, "UNAUTHORIZED", "every older key").await;
    let (_, v) = token_for(&s, Some(&mia), "repository:acme/app:pull").await;
    assert_eq!(mia_c(v["token"].as_str().unwrap()).get(s.url("/v2/")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn access_tokens_lifecycle_and_refused_credentials() {
    let dir = TempDir::new("auth-tokens");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let token = tenant_user_token(&s, "acme", "mia", "maintainer").await;
    let mia_pw = client_as("mia", "mia-password");

    // Listed without the secret; default lifetime 12 h.
    let v: serde_json::Value = mia_pw.get(s.url("/api/v1/tokens")).send().await.unwrap().json().await.unwrap();
    let list = v["tokens"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].get("token").is_none() && !v.to_string().contains(&token[20..]));
    let lifetime = list[0]["expires_ms"].as_i64().unwrap() - list[0]["created_ms"].as_i64().unwrap();
    assert_eq!(lifetime, 12 * 3600 * 1000);
    let id = list[0]["id"].as_str().unwrap().to_string();
    // The docker_auth form decodes to user:token.
    let r = mia_pw.post(s.url("/api/v1/tokens")).json(&json!({"expires_in": 60, "description": "ci"})).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(v["docker_auth"].as_str().unwrap()).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), format!("mia:{}", v["token"].as_str().unwrap()));
    let r = mia_pw.post(s.url("/api/v1/tokens")).json(&json!({"expires_in": 10_000_000_000u64})).send().await.unwrap();
    expect_error(r, 400, "INVALID_REQUEST", "too long").await;

    // The token works for Basic, and for the token endpoint; then it is revoked.
    let mia_tok = client_as("mia", &token);
    push_blob(&mia_tok, &s, "acme/app", b"x").await;
    let (code, v) = token_for(&s, Some(&basic("mia", &token)), "repository:acme/app:pull").await;
    assert_eq!(code, 200);
    let minted = v["token"].as_str().unwrap().to_string();
    let bearer_c = {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("authorization", bearer(&minted).parse().unwrap());
        reqwest::Client::builder().default_headers(h).build().unwrap()
    };
    assert_eq!(bearer_c.get(s.url("/v2/acme/app/tags/list")).send().await.unwrap().status(), 200);
    // Another user may not revoke it (and cannot tell it exists).
    tenant_user_token(&s, "beta", "bob", "developer").await;
    let r = client_as("bob", "bob-password").delete(s.url(&format!("/api/v1/tokens/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = mia_pw.delete(s.url(&format!("/api/v1/tokens/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 204);
    // Immediately refused, and so is the bearer token minted from it.
    expect_error(mia_tok.get(s.url("/v2/acme/app/tags/list")).send().await.unwrap(), 401, "UNAUTHORIZED", "revoked").await;
    expect_error(bearer_c.get(s.url("/v2/acme/app/tags/list")).send().await.unwrap(), 401, "UNAUTHORIZED", "minted").await;
    // A token is bound to its user.
    let token2 = tenant_user_token(&s, "acme", "dev", "developer").await;
    expect_error(client_as("mia", &token2).get(s.url("/v2/")).send().await.unwrap(), 401, "UNAUTHORIZED", "other user's token").await;

    // Malformed Authorization headers.
    for h in ["Basic !!!", "Basic", "Foo bar", "Bearer", "Basic bWlh"] {
        let r = anon_client().get(s.url("/v2/")).header("authorization", h).send().await.unwrap();
        expect_error(r, 401, "UNAUTHORIZED", h).await;
    }
    // The management API wants credentials.
    let r = anon_client().get(s.url("/api/v1/tokens")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Repeated failed logins are throttled (per user, and per source).
    let mut last = 0;
    for _ in 0..8 {
        last = client_as("dev", "wrong-password").get(s.url("/v2/")).send().await.unwrap().status().as_u16();
    }
    assert_eq!(last, 429);
    let r = client_as("dev", "wrong-password").get(s.url("/v2/")).send().await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    expect_error(r, 429, "TOOMANYREQUESTS", "throttled").await;
}

fn berth_cli(s: &Server, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env("BERTH_SERVER", &s.base)
        .env("BERTH_USER", "admin")
        .env("BERTH_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn policy_cli_hot_reload_and_expiring_shares() {
    let dir = TempDir::new("auth-policy");
    // A private copy of the policies, to edit while Berth runs.
    let pol = dir.path().join("policies");
    std::fs::create_dir_all(&pol).unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies");
    for f in ["model.conf", "policy.csv"] {
        std::fs::copy(format!("{src}/{f}"), pol.join(f)).unwrap();
    }
    let s = Server::start_in(&dir.path().join("data"), &[("BERTH_POLICY_DIR", pol.to_str().unwrap())]);
    let token = tenant_user_token(&s, "acme", "mia", "maintainer").await;
    let mia = client_as("mia", &token);
    push_blob(&mia, &s, "acme/app", b"one").await;

    let (ok, out) = berth_cli(&s, &["policy", "check", "--user", "mia", "--tenant", "acme", "--object", "acme/app", "--action", "push"]);
    assert!(ok && out.starts_with("allow (rule: role:maintainer, *, *, push, allow)"), "{out}");
    let (ok, out) = berth_cli(&s, &["policy", "check", "--user", "mia", "--tenant", "acme", "--object", "acme/app", "--action", "admin"]);
    assert!(!ok && out.starts_with("deny"), "{out}");

    // An explicit deny added through the CLI wins at once, without a restart.
    let deny = ["p", "mia", "acme", "acme/app", "push", "deny"];
    let (ok, out) = berth_cli(&s, &[&["policy", "add"][..], &deny[..]].concat());
    assert!(ok, "{out}");
    let r = mia.post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let (_, out) = berth_cli(&s, &["policy", "export"]);
    assert!(out.contains("p, mia, acme, acme/app, push, deny"), "{out}");
    let (ok, _) = berth_cli(&s, &[&["policy", "remove"][..], &deny[..]].concat());
    assert!(ok);
    let r = mia.post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let (ok, out) = berth_cli(&s, &["policy", "add", "p", "mia", "acme", "acme/app", "fly", "allow"]);
    assert!(!ok && out.contains("INVALID_REQUEST"), "{out}");

    // Editing policy.csv reloads it while Berth runs.
    let mut text = std::fs::read_to_string(pol.join("policy.csv")).unwrap();
    text.push_str("p, mia, acme, acme/frozen, push, deny\n");
    std::fs::write(pol.join("policy.csv"), &text).unwrap();
    assert!(eventually(&mia, s.url("/v2/acme/frozen/blobs/uploads/"), true, 403).await, "the edited policy file took effect");
    // Removing the line withdraws the rule again.
    std::fs::write(pol.join("policy.csv"), text.replace("p, mia, acme, acme/frozen, push, deny\n", "")).unwrap();
    assert!(eventually(&mia, s.url("/v2/acme/frozen/blobs/uploads/"), true, 202).await, "the removed line was withdrawn");

    // A share that expires stops working without a restart.
    let bob_token = tenant_user_token(&s, "beta", "bob", "developer").await;
    let bob = client_as("bob", &bob_token);
    assert_eq!(bob.get(s.url("/v2/acme/app/tags/list")).send().await.unwrap().status(), 403);
    let (ok, out) = berth_cli(&s, &["repo", "share", "acme/app", "--tenant", "beta", "--expires-in", "2"]);
    assert!(ok, "{out}");
    assert_eq!(bob.get(s.url("/v2/acme/app/tags/list")).send().await.unwrap().status(), 200);
    assert!(eventually(&bob, s.url("/v2/acme/app/tags/list"), false, 403).await, "the share expired");
    // Non-admins cannot administer policies.
    let r = mia.get(s.url("/api/v1/policies")).send().await.unwrap();
    assert_eq!(r.status(), 403);
}

#[test]
fn policy_test_tables_run_offline() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["policy", "test", &format!("{root}/policies/tests/default.csv"), "--policy-dir", &format!("{root}/policies")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(", 0 failed"), "{text}");
    // A wrong expectation fails the run.
    let dir = TempDir::new("policy-table");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "anonymous, acme, acme/app, push, allow\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["policy", "test", bad.to_str().unwrap(), "--policy-dir", &format!("{root}/policies")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));
}

fn from(ip: [u8; 4], user: &str, secret: &str, forwarded_for: Option<&str>) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, basic(user, secret).parse().unwrap());
    if let Some(f) = forwarded_for {
        h.insert("x-forwarded-for", f.parse().unwrap());
    }
    reqwest::Client::builder().local_address(std::net::IpAddr::from(ip)).default_headers(h).build().unwrap()
}

async fn status(c: reqwest::Client, s: &Server) -> u16 {
    c.get(s.url("/v2/")).send().await.unwrap().status().as_u16()
}

/// Failed logins slow their (user, source) pair, and a source that sprays many
/// users; they never lock the user out from elsewhere, and never hold back a
/// valid access token. The source is the connection's peer address.
#[tokio::test]
async fn failed_logins_slow_their_source_never_the_user_elsewhere() {
    let dir = TempDir::new("auth-source");
    let s = Server::start_in(dir.path(), &[]);
    let token = tenant_user_token(&s, "acme", "mia", "developer").await;
    for _ in 0..6 {
        let code = status(from([127, 0, 0, 2], "mia", "wrong", None), &s).await;
        assert!(matches!(code, 401 | 429), "{code}");
    }
    let r = from([127, 0, 0, 2], "mia", "mia-password", None).get(s.url("/v2/")).send().await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    expect_error(r, 429, "TOOMANYREQUESTS", "the pair that failed waits").await;
    assert_eq!(status(from([127, 0, 0, 3], "mia", "mia-password", None), &s).await, 200, "mia from another source is not locked out");
    assert_eq!(status(from([127, 0, 0, 2], "mia", &token, None), &s).await, 200, "a valid access token is never held back");
    assert_eq!(status(from([127, 0, 0, 2], "admin", ADMIN_PASSWORD, None), &s).await, 200, "another user from that source");
    // Spraying: one failure each for 50 (unknown) users; no pair is slowed,
    // the source is, for every user.
    for i in 0..50 {
        let code = status(from([127, 0, 0, 4], &format!("nobody{i}"), "wrong", None), &s).await;
        assert!(matches!(code, 401 | 429), "{code}");
    }
    let r = from([127, 0, 0, 4], "admin", ADMIN_PASSWORD, None).get(s.url("/v2/")).send().await.unwrap();
    expect_error(r, 429, "TOOMANYREQUESTS", "the spraying source waits").await;
    assert_eq!(status(from([127, 0, 0, 5], "admin", ADMIN_PASSWORD, None), &s).await, 200);
    // Without trust_proxy a client's X-Forwarded-For means nothing.
    for i in 0..6 {
        status(from([127, 0, 0, 6], "admin", "wrong", Some(&format!("10.0.0.{i}"))), &s).await;
    }
    assert_eq!(status(from([127, 0, 0, 6], "admin", ADMIN_PASSWORD, Some("10.9.9.9")), &s).await, 429, "the header changed nothing");
}

/// Behind a trusted proxy the client is the hop the proxy appended (the
/// right-most not in trusted_proxies), never the first one a client supplies.
#[tokio::test]
async fn a_spoofed_forwarded_for_is_ignored() {
    let dir = TempDir::new("auth-proxy");
    let s = Server::start_configured(&dir, "[auth]\ntrust_proxy = true\ntrusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]\n");
    tenant_user_token(&s, "acme", "dev", "developer").await;
    // The client 203.0.113.9 (through the proxies 10.1.1.1 and the peer) makes up
    // a new first hop on each try.
    for i in 0..6 {
        let code = status(from([127, 0, 0, 2], "dev", "wrong", Some(&format!("198.51.100.{i}, 203.0.113.9, 10.1.1.1"))), &s).await;
        assert!(matches!(code, 401 | 429), "{code}");
    }
    let code = status(from([127, 0, 0, 2], "dev", "dev-password", Some("198.51.100.77, 203.0.113.9, 10.1.1.1")), &s).await;
    assert_eq!(code, 429, "its failures counted against 203.0.113.9 whatever it claimed");
    let code = status(from([127, 0, 0, 2], "dev", "dev-password", Some("203.0.113.10, 10.1.1.1")), &s).await;
    assert_eq!(code, 200, "another client behind the same proxy is not slowed");
}

/// A `policies/` folder in the working directory of a start is not used unless
/// configured: the built-in policy decides.
#[tokio::test]
async fn a_policies_folder_in_the_working_directory_is_not_picked_up() {
    let dir = TempDir::new("auth-cwd");
    let cwd = dir.path().join("cwd");
    std::fs::create_dir_all(cwd.join("policies")).unwrap();
    std::fs::write(cwd.join("policies/model.conf"), include_str!("../../../policies/model.conf")).unwrap();
    std::fs::write(cwd.join("policies/policy.csv"), "p, *, *, *, *, allow\n").unwrap();
    let s = Server::start_with(&dir.path().join("data"), "127.0.0.1:0", &[], |cmd| {
        cmd.current_dir(&cwd).env_remove("BERTH_POLICY_DIR");
    });
    let r = anon_client().post(s.url("/v2/anyone/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 401, "anonymous push stays refused");
}

/// The catalog through docker's token flow: an anonymous catalog is challenged
/// for `registry:catalog:*`; a token with that grant lists every repository its
/// user may pull (not only those the token names), one without it is challenged.
#[tokio::test]
async fn catalog_with_docker_token_auth() {
    let dir = TempDir::new("catalog-token");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let token = tenant_user_token(&s, "acme", "cat", "developer").await;
    let c = client_as("cat", &token);
    push_image(&c, &s, "acme/one", "v1", 1, json!({})).await;
    push_image(&c, &s, "acme/two", "v1", 2, json!({})).await;
    let other = tenant_user_token(&s, "beta", "bee", "developer").await;
    push_image(&client_as("bee", &other), &s, "beta/hidden", "v1", 3, json!({})).await;

    let r = anon_client().get(s.url("/v2/_catalog")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.contains("scope=\"registry:catalog:*\""), "{challenge}");

    // What a client that authenticates only when challenged does next.
    let basic = basic("cat", &token);
    let (code, v) = token_for(&s, Some(&basic), "registry:catalog:*").await;
    assert_eq!(code, 200);
    let with_grant = v["token"].as_str().unwrap().to_owned();
    let r = anon_client().get(s.url("/v2/_catalog")).header("authorization", bearer(&with_grant)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["acme/one", "acme/two"]));

    // A token for one repository only does not list the catalog.
    let (_, v) = token_for(&s, Some(&basic), "repository:acme/one:pull").await;
    let repo_only = v["token"].as_str().unwrap().to_owned();
    let r = anon_client().get(s.url("/v2/_catalog")).header("authorization", bearer(&repo_only)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // An anonymous token request never gets the grant.
    let (_, v) = token_for(&s, None, "registry:catalog:*").await;
    let anon = v["token"].as_str().unwrap().to_owned();
    let r = anon_client().get(s.url("/v2/_catalog")).header("authorization", bearer(&anon)).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

/// A refused bearer token says only that it was refused: which check failed
/// (format, key, signature, lifetime) would guide a forger.
#[tokio::test]
async fn refused_bearer_tokens_all_read_alike() {
    let dir = TempDir::new("bearer-detail");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let token = tenant_user_token(&s, "acme", "ann", "developer").await;
    let (_, v) = token_for(&s, Some(&basic("ann", &token)), "repository:acme/app:pull").await;
    let good = v["token"].as_str().unwrap().to_owned();
    assert_eq!(anon_client().get(s.url("/v2/")).header("authorization", bearer(&good)).send().await.unwrap().status(), 200);
    let (head, sig) = good.rsplit_once('.').unwrap();
    let flipped = format!("{head}.{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
    let mut parts: Vec<&str> = good.split('.').collect();
    parts[1] = "eyJzdWIiOiJhZG1pbiJ9"; // {"sub":"admin"}, with the original signature
    let swapped = parts.join(".");
    let mut details = std::collections::BTreeSet::new();
    for t in ["garbage", "a.b.c", flipped.as_str(), swapped.as_str()] {
        let r = anon_client().get(s.url("/v2/")).header("authorization", bearer(t)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{t}");
        let v: serde_json::Value = r.json().await.unwrap();
        details.insert(v["errors"][0]["detail"].to_string());
    }
    assert_eq!(details.len(), 1, "{details:?}");
}

/// Security events land in the audit log with who, from where and what (never
/// a secret), for the platform admin alone.
#[tokio::test]
async fn security_events_are_in_the_audit_log() {
    let dir = TempDir::new("audit");
    let s = Server::start_in(dir.path(), &[]);
    let token = tenant_user_token(&s, "acme", "mia", "tenant-admin").await;
    assert_eq!(status(from([127, 0, 0, 7], "mia", "wrong-password", None), &s).await, 401);
    let mia = client_as("mia", &token);
    push_image(&mia, &s, "acme/app", "v1", 1, json!({})).await;
    let r = mia.put(s.url("/api/v1/repositories/acme/app/visibility")).json(&json!({"public": true})).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = client_as("mia", "mia-password")
        .put(s.url("/api/v1/me/password"))
        .json(&json!({"current_password": "mia-password", "password": "mia-new-password"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let tokens: serde_json::Value = mia.get(s.url("/api/v1/tokens")).send().await.unwrap().json().await.unwrap();
    let id = tokens["tokens"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(client().delete(s.url(&format!("/api/v1/tokens/{id}"))).send().await.unwrap().status(), 204);
    let r = client_as("mia", "mia-new-password").get(s.url("/api/v1/audit")).send().await.unwrap();
    expect_error(r, 403, "DENIED", "a tenant admin does not read the audit log").await;

    let want = ["user-created", "login", "token-issued", "login-failed", "visibility-changed", "password-changed", "token-revoked"];
    let mut events = serde_json::Value::Null;
    for _ in 0..50 {
        events = client().get(s.url("/api/v1/audit")).send().await.unwrap().json().await.unwrap();
        let seen = |a: &str| events["events"].as_array().unwrap().iter().any(|e| e["action"] == a);
        if want.iter().all(|a| seen(a)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let list = events["events"].as_array().unwrap();
    let find = |action: &str| list.iter().find(|e| e["action"] == action).unwrap_or_else(|| panic!("no {action} in {events}"));
    let failed = find("login-failed");
    assert_eq!((failed["actor"].as_str(), failed["source"].as_str()), (Some("mia"), Some("127.0.0.7")));
    assert_eq!(find("token-issued")["target"], id.as_str());
    assert_eq!((find("token-revoked")["target"].as_str(), find("token-revoked")["actor"].as_str()), (Some(id.as_str()), Some("admin")));
    assert_eq!(find("visibility-changed")["target"], "acme/app");
    assert_eq!(find("password-changed")["source"], "127.0.0.1");
    let text = events.to_string();
    for secret in ["wrong-password", "mia-new-password", "mia-password", token.as_str()] {
        assert!(!text.contains(secret), "the audit log holds a secret");
    }
    let filtered: serde_json::Value = client().get(s.url("/api/v1/audit?action=login-failed")).send().await.unwrap().json().await.unwrap();
    assert!(filtered["events"].as_array().unwrap().iter().all(|e| e["action"] == "login-failed"));
    let r = client().get(s.url("/api/v1/audit?limit=0")).send().await.unwrap();
    expect_error(r, 400, "INVALID_REQUEST", "limit out of range").await;
    let r = client().get(s.url("/api/v1/audit?bogus=1")).send().await.unwrap();
    assert_eq!(r.status(), 400, "unknown query parameter");
    let (ok, out) = berth_cli(&s, &["audit", "--action", "login-failed", "--since-secs", "600"]);
    assert!(ok && out.contains("login-failed") && out.contains("127.0.0.7"), "{out}");
}

/// Signing keys are sealed with `<data_dir>/master.key`. Started with another
/// master key (the file lost), a single-machine Berth cannot open them, replaces
/// them, and refuses the bearer tokens signed before; passwords and access
/// tokens are unaffected.
#[tokio::test]
async fn a_lost_master_key_costs_only_bearer_tokens() {
    let dir = TempDir::new("master-key");
    let data = dir.path().join("data");
    let mut s = Server::start_in(&data, &[]);
    let key_file = data.join("master.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(key.trim().len(), 64, "{key:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    let token = tenant_user_token(&s, "acme", "mia", "developer").await;
    let (_, v) = token_for(&s, Some(&basic("mia", &token)), "repository:acme/app:pull").await;
    let bearer_token = v["token"].as_str().unwrap().to_owned();
    let with = |t: &str| reqwest::Client::new().get(s.url("/v2/")).bearer_auth(t.to_owned());
    assert_eq!(with(&bearer_token).send().await.unwrap().status(), 200);
    s.stop();
    std::fs::remove_file(&key_file).unwrap();
    let s = Server::start_in(&data, &[]);
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), key, "a new master key");
    let with = |t: &str| reqwest::Client::new().get(s.url("/v2/")).bearer_auth(t.to_owned());
    expect_error(with(&bearer_token).send().await.unwrap(), 401, "UNAUTHORIZED", "signed with a replaced key").await;
    assert_eq!(client_as("mia", &token).get(s.url("/v2/")).send().await.unwrap().status(), 200);
    let (_, v) = token_for(&s, Some(&basic("mia", &token)), "repository:acme/app:pull").await;
    assert_eq!(with(v["token"].as_str().unwrap()).send().await.unwrap().status(), 200);
}

/// Credentials carry their kind and scopes: a token cannot change the password
/// or mint more than it has or for longer than it lives; what a token minted
/// dies with it; a password change kills what was minted from the password;
/// admins list, revoke and disable.
#[tokio::test]
async fn credentials_carry_their_kind_and_scopes() {
    let dir = TempDir::new("credentials");
    let s = Server::start_in(dir.path(), &[]);
    let t = tenant_user_token(&s, "acme", "mia", "developer").await;
    let pw = client_as("mia", "mia-password");
    let tok = client_as("mia", &t);
    let digest = push_image(&tok, &s, "acme/app", "v1", 1, json!({})).await;
    let api = |p: &str| s.url(&format!("/api/v1/{p}"));
    let change = |current: &str| json!({"current_password": current, "password": "mia-second-password"});

    // A token is not the password.
    let r = tok.put(api("me/password")).json(&change("mia-password")).send().await.unwrap();
    expect_error(r, 403, "DENIED", "a token changes no password").await;
    // It mints only what it has, never outliving itself.
    let r = tok.post(api("tokens")).json(&json!({"expires_in": 2_000_000})).send().await.unwrap();
    expect_error(r, 400, "INVALID_REQUEST", "outliving its parent").await;
    let r = tok.post(api("tokens")).json(&json!({"scopes": ["pull"], "description": "ci"})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let child: serde_json::Value = r.json().await.unwrap();
    let parent_id = child["parent"].as_str().unwrap().to_owned();
    let mine: serde_json::Value = pw.get(api("tokens")).send().await.unwrap().json().await.unwrap();
    let parent = mine["tokens"].as_array().unwrap().iter().find(|x| x["id"] == parent_id.as_str()).unwrap().clone();
    assert!(child["expires_ms"].as_i64() <= parent["expires_ms"].as_i64(), "{child} {parent}");
    assert_eq!(child["scopes"], json!(["pull"]));
    let pull_only = client_as("mia", child["token"].as_str().unwrap());
    let r = pull_only.get(s.url("/v2/acme/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200, "pull is in its scopes");
    let code = pull_only.post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap().status().as_u16();
    assert!(code == 401 || code == 403, "push is not: {code}");
    let r = pull_only.get(api("tokens")).send().await.unwrap();
    expect_error(r, 403, "DENIED", "manage is not").await;
    let (_, v) = token_for(&s, Some(&basic("mia", child["token"].as_str().unwrap())), "repository:acme/app:pull,push").await;
    let bearer_from_child = v["token"].as_str().unwrap().to_owned();
    let with = |b: &str| reqwest::Client::new().get(s.url("/v2/acme/app/tags/list")).bearer_auth(b.to_owned());
    assert_eq!(with(&bearer_from_child).send().await.unwrap().status(), 200);
    // A refresh token minted through the token: listed, bound to it.
    let r = anon_client()
        .post(s.url("/auth/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "mia"),
            ("password", t.as_str()),
            ("service", "berth"),
            ("access_type", "offline"),
        ])
        .send()
        .await
        .unwrap();
    let refresh = r.json::<serde_json::Value>().await.unwrap()["refresh_token"].as_str().unwrap().to_owned();
    let mine: serde_json::Value = pw.get(api("tokens")).send().await.unwrap().json().await.unwrap();
    assert!(mine["tokens"].as_array().unwrap().iter().any(|x| x["kind"] == "refresh" && x["parent"] == parent_id.as_str()), "{mine}");
    let refresh_grant = || {
        anon_client().post(s.url("/auth/token")).form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("service", "berth"),
        ])
    };
    assert_eq!(refresh_grant().send().await.unwrap().status(), 200);

    // Revoked: everything it minted dies with it.
    assert_eq!(pw.delete(api(&format!("tokens/{parent_id}"))).send().await.unwrap().status(), 204);
    assert_eq!(pull_only.get(s.url("/v2/")).send().await.unwrap().status(), 401, "the child token");
    assert_eq!(with(&bearer_from_child).send().await.unwrap().status(), 401, "the bearer token minted by the child");
    assert_eq!(refresh_grant().send().await.unwrap().status(), 401, "the refresh token");
    let left: serde_json::Value = pw.get(api("tokens")).send().await.unwrap().json().await.unwrap();
    assert!(left["tokens"].as_array().unwrap().is_empty(), "{left}");

    // A password change needs the current password, and kills what the old one minted.
    let (_, v) = token_for(&s, Some(&basic("mia", "mia-password")), "repository:acme/app:pull").await;
    let from_password = v["token"].as_str().unwrap().to_owned();
    assert_eq!(with(&from_password).send().await.unwrap().status(), 200);
    let r = pw.put(api("me/password")).json(&change("not-the-password")).send().await.unwrap();
    expect_error(r, 403, "DENIED", "wrong current password").await;
    assert_eq!(pw.put(api("me/password")).json(&change("mia-password")).send().await.unwrap().status(), 204);
    assert_eq!(with(&from_password).send().await.unwrap().status(), 401, "a bearer token from the old password");
    assert_eq!(pw.get(s.url("/v2/")).send().await.unwrap().status(), 401, "the old password");
    let pw = client_as("mia", "mia-second-password");
    assert_eq!(pw.get(s.url("/v2/")).send().await.unwrap().status(), 200);
    // One from the new password carries the stored epoch: it survives the
    // refresh (every 2 s) that reads the change back from the store.
    let (_, v) = token_for(&s, Some(&basic("mia", "mia-second-password")), "repository:acme/app:pull").await;
    let from_new = v["token"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(with(&from_new).send().await.unwrap().status(), 200, "a bearer token from the new password");

    // Admins: list, revoke all, disable. Another tenant's admin sees no such user.
    let t2 = pw.post(api("tokens")).json(&json!({})).send().await.unwrap().json::<serde_json::Value>().await.unwrap();
    let t2 = client_as("mia", t2["token"].as_str().unwrap());
    let listed: serde_json::Value = client().get(api("users/mia/tokens")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 1, "{listed}");
    let other = client_as("bob", &tenant_user_token(&s, "beta", "bob", "tenant-admin").await);
    expect_error(other.get(api("users/mia/tokens")).send().await.unwrap(), 404, "NOT_FOUND", "another tenant's user").await;
    expect_error(other.put(api("users/mia/disabled")).json(&json!({"disabled": true})).send().await.unwrap(), 404, "NOT_FOUND", "x").await;
    let (_, v) = token_for(&s, Some(&basic("mia", "mia-second-password")), "repository:acme/app:pull").await;
    let bearer = v["token"].as_str().unwrap().to_owned();
    assert_eq!(client().put(api("users/mia/disabled")).json(&json!({"disabled": true})).send().await.unwrap().status(), 204);
    assert_eq!(pw.get(s.url("/v2/")).send().await.unwrap().status(), 401, "disabled: the password");
    assert_eq!(t2.get(s.url("/v2/")).send().await.unwrap().status(), 401, "disabled: an access token");
    assert_eq!(with(&bearer).send().await.unwrap().status(), 401, "disabled: a bearer token");
    assert_eq!(client().put(api("users/mia/disabled")).json(&json!({"disabled": false})).send().await.unwrap().status(), 204);
    assert_eq!(t2.get(s.url("/v2/")).send().await.unwrap().status(), 200, "enabled again");
    // Bad input: clear 4xx.
    expect_error(client().get(api("users/Not!A!Name/tokens")).send().await.unwrap(), 400, "NAME_INVALID", "bad user name").await;
    expect_error(client().get(api("users/nobody/tokens")).send().await.unwrap(), 404, "NOT_FOUND", "unknown user").await;
    let r = client().put(api("users/mia/disabled")).json(&json!({"disabled": "yes"})).send().await.unwrap();
    assert_eq!(r.status(), 400, "wrong type");
    let r = client().put(api("users/admin/disabled")).json(&json!({"disabled": true})).send().await.unwrap();
    expect_error(r, 400, "INVALID_REQUEST", "disabling yourself").await;
    for scopes in [json!([]), json!(["bogus"]), json!("pull")] {
        let r = pw.post(api("tokens")).json(&json!({ "scopes": scopes })).send().await.unwrap();
        assert_eq!(r.status(), 400, "scopes {scopes}");
    }
    let r = client().delete(api("users/mia/tokens")).send().await.unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["revoked"].as_array().unwrap().len(), 1);
    assert_eq!(t2.get(s.url("/v2/")).send().await.unwrap().status(), 401, "revoked by the admin");
    let _ = digest;
}

/// One user cannot hold unbounded tokens: past `auth.max_tokens_per_user` a new
/// access token is refused (429), and a new refresh token (each `docker login`)
/// retires the oldest.
#[tokio::test]
async fn live_tokens_per_user_are_capped() {
    let dir = TempDir::new("token-cap");
    let s = Server::start_configured(&dir, "[auth]\nmax_tokens_per_user = 2\n");
    tenant_user_token(&s, "acme", "mia", "developer").await;
    let pw = client_as("mia", "mia-password");
    assert_eq!(pw.post(s.url("/api/v1/tokens")).json(&json!({})).send().await.unwrap().status(), 201);
    let r = pw.post(s.url("/api/v1/tokens")).json(&json!({})).send().await.unwrap();
    expect_error(r, 429, "TOOMANYREQUESTS", "a third access token").await;
    let url = s.url("/auth/token");
    let login = || {
        let url = url.clone();
        async move {
            let form = [
                ("grant_type", "password"),
                ("username", "mia"),
                ("password", "mia-password"),
                ("service", "berth"),
                ("access_type", "offline"),
            ];
            let r = anon_client().post(url).form(&form).send().await.unwrap();
            r.json::<serde_json::Value>().await.unwrap()["refresh_token"].as_str().unwrap().to_owned()
        }
    };
    let grant = |t: String| {
        let url = url.clone();
        async move {
            let form = [("grant_type", "refresh_token"), ("refresh_token", t.as_str()), ("service", "berth")];
            anon_client().post(url).form(&form).send().await.unwrap().status().as_u16()
        }
    };
    let (first, second, third) = (login().await, login().await, login().await);
    assert_eq!(grant(first).await, 401, "the oldest refresh token retired");
    assert_eq!((grant(second).await, grant(third).await), (200, 200));
}
