//! The HTTP front end: the OCI distribution API on warp.
//!
//! One warp filter captures every request; [`route::parse`] turns the path into a
//! typed [`route::Route`]; a thin handler per endpoint calls the
//! [`berth_registry::Registry`] service and renders the answer. Every error, from
//! parsing or from the service, is rendered once by [`error_response`] as the spec's
//! JSON with its status.
//!
//! Architecture invariants:
//! - Only this crate knows warp and HTTP headers; it builds no error JSON by hand
//!   (that is `berth_oci::RegistryError::to_json`).
//! - Domain errors are never warp rejections: handlers return `Result<Response, RegistryError>`.
//! - Request and response bodies stream; only manifests (≤ 4 MiB) are buffered.

mod api;
mod compat;
mod conn;
mod console;
mod gate;
mod gc;

/// An integrity report as the API answers it (for `berth fsck --offline`).
pub fn fsck_json(r: berth_registry::fsck::FsckReport) -> String {
    serde_json::to_string_pretty(&gc::fsck_view(r)).unwrap_or_default()
}
mod manage;
mod namespaces;
mod plugins;
mod quotas;
mod retention;
pub mod route;
pub mod tls;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use berth_auth::{Auth, Identity};
use berth_oci::manifest::{MAX_MANIFEST_BYTES, OCI_INDEX};
use berth_oci::range::{parse_content_range, ByteRange};
use berth_oci::{Digest, ErrorCode, Reference, RegistryError, RepoName, UploadId};
use berth_registry::{BlobBody, Registry};
use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use route::Route;
use tracing::Instrument;
use warp::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use warp::Filter;

pub(crate) type Reply = warp::reply::Response;
type Body = Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send>>;

const API_VERSION: &str = "registry/2.0";
/// Default and largest page sizes for listings.
const CATALOG_DEFAULT_N: usize = 1000;
const MAX_N: usize = 100_000;

/// The services the HTTP layer fronts.
#[derive(Clone)]
pub struct Services {
    pub registry: Arc<Registry>,
    pub auth: Arc<Auth>,
}

/// Requests begun and requests answered since start (an answer's streamed body
/// may still be on its way).
static BEGUN: AtomicU64 = AtomicU64::new(0);
static ANSWERED: AtomicU64 = AtomicU64::new(0);

/// `(begun, answered)` request counts: equal and unchanged over an interval means
/// no request was handled during it.
pub fn request_counts() -> (u64, u64) {
    let answered = ANSWERED.load(Ordering::Acquire);
    (BEGUN.load(Ordering::Acquire), answered)
}

struct Answered;

impl Drop for Answered {
    fn drop(&mut self) {
        ANSWERED.fetch_add(1, Ordering::AcqRel);
    }
}

/// The whole HTTP application as one warp filter.
pub fn app(services: Services) -> impl Filter<Extract = (Reply,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<conn::Peer>())
        .and(warp::body::stream().map(box_body))
        .then(move |method: Method, path: warp::path::FullPath, query: String, headers: HeaderMap, peer: Option<conn::Peer>, body: Body| {
            let services = services.clone();
            let id = BEGUN.fetch_add(1, Ordering::AcqRel);
            // Counts the request as answered however its future ends (a client
            // that goes away mid-upload drops it).
            let answered = Answered;
            async move {
                let _answered = answered;
                let started = Instant::now();
                let request_id = format!("{:x}-{id:x}", std::process::id());
                let span = tracing::info_span!("request", id = %request_id, method = %method, path = path.as_str());
                let (remote, secure) = (peer.map(|p| p.addr), peer.is_some_and(|p| p.tls));
                let req = Request { method, query, headers, remote, secure, body: Some(body) };
                let (label, mut resp) = handle(&services, path.as_str(), req).instrument(span.clone()).await;
                let h = resp.headers_mut();
                h.insert("docker-distribution-api-version", HeaderValue::from_static(API_VERSION));
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    h.insert("x-request-id", v);
                }
                let took = started.elapsed();
                services.registry.metrics().request(label, resp.status().as_u16(), took);
                span.in_scope(|| {
                    tracing::info!(route = label, status = resp.status().as_u16(), micros = took.as_micros() as u64, "served");
                });
                resp
            }
        })
}

/// The management API's OpenAPI 3 document (what `/api/v1/openapi.json` serves).
pub fn openapi_json() -> String {
    manage::document().to_pretty_json().unwrap_or_default()
}

/// Serve until `shutdown` resolves, then drain in-flight requests; HTTPS with `tls`.
pub async fn serve(
    services: Services,
    listener: tokio::net::TcpListener,
    tls: Option<tls::Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    conn::serve(services, listener, tls, shutdown).await;
}

pub(crate) struct Request {
    pub(crate) method: Method,
    query: String,
    headers: HeaderMap,
    pub(crate) remote: Option<std::net::SocketAddr>,
    /// Whether it came over Berth's own TLS listener.
    pub(crate) secure: bool,
    body: Option<Body>,
}

/// Decode `a=1&b=2` (form or query), `+` as space.
pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| route::percent_decode(&s.replace('+', " ")).unwrap_or_default();
            (dec(k), dec(v))
        })
        .collect()
}

/// Read a JSON body of the management APIs: a body announced with another
/// `Content-Type` is refused (415) before it is read, so no HTML form can post one.
pub(crate) async fn read_json_body(req: &mut Request, limit: usize) -> Result<Vec<u8>, RegistryError> {
    let announced = req.header("content-length").is_some_and(|l| l.trim() != "0") || req.header("transfer-encoding").is_some();
    let json = req.header("content-type").is_some_and(|ct| {
        let essence = ct.split(';').next().unwrap_or("").trim();
        essence.eq_ignore_ascii_case("application/json")
    });
    if announced && !json {
        return Err(RegistryError::new(ErrorCode::Unsupported).with_status(415).with_detail("Content-Type must be application/json"));
    }
    read_small_body(req, limit).await
}

/// Read a small body (JSON or form) fully, refusing more than `limit` bytes.
pub(crate) async fn read_small_body(req: &mut Request, limit: usize) -> Result<Vec<u8>, RegistryError> {
    let mut buf = Vec::new();
    if let Some(mut body) = req.take_body() {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| RegistryError::new(ErrorCode::InvalidRequest).with_detail(format!("reading body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Err(RegistryError::new(ErrorCode::InvalidRequest)
                    .with_status(413)
                    .with_detail(format!("body larger than {limit} bytes")));
            }
            buf.extend_from_slice(&chunk);
        }
    }
    Ok(buf)
}

impl Request {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| route::percent_decode(&v.replace('+', " ")).unwrap_or_default())
        })
    }

    pub(crate) fn params(&self) -> Vec<(String, String)> {
        parse_query(&self.query)
    }

    /// The body, or `None` when the request announced none.
    pub(crate) fn take_body(&mut self) -> Option<Body> {
        let body = self.body.take()?;
        match self.header("content-length").map(str::trim) {
            Some("0") => None,
            Some(_) => Some(body),
            None if self.header("transfer-encoding").is_some() => Some(body),
            None => None,
        }
    }
}

async fn handle(services: &Services, full_path: &str, mut req: Request) -> (&'static str, Reply) {
    let auth = &services.auth;
    let Some(path) = full_path.strip_prefix("/v2/").or_else(|| (full_path == "/v2").then_some("")) else {
        // Unauthenticated, for load balancers and orchestrators: alive, and
        // ready for requests (metadata and storage answer; not draining).
        if full_path == "/healthz" {
            return ("health", health_response(StatusCode::OK, "ok", None));
        }
        if full_path == "/readyz" {
            return match services.registry.readiness().await {
                Ok(()) => ("ready", health_response(StatusCode::OK, "ready", None)),
                Err(why) => ("ready", health_response(StatusCode::SERVICE_UNAVAILABLE, "not ready", Some(why))),
            };
        }
        if full_path == "/metrics" {
            return ("metrics", metrics(services, req).await);
        }
        if full_path == "/auth/token" {
            return ("token", gate::token_endpoint(auth, &mut req).await);
        }
        // The management surfaces: security events they cause name the client.
        if full_path == "/api/console" {
            let source = gate::source(auth, &req);
            return ("console", berth_auth::audit::SOURCE.scope(source, console::handle(services, req)).await);
        }
        if let Some(rest) = full_path.strip_prefix("/registry/v1/") {
            let source = gate::source(auth, &req);
            return ("compat", berth_auth::audit::SOURCE.scope(source, compat::handle(services, rest, req)).await);
        }
        if let Some(rest) = full_path.strip_prefix("/api/v1/") {
            let source = gate::source(auth, &req);
            return ("api", berth_auth::audit::SOURCE.scope(source, api::handle(services, rest, req)).await);
        }
        return ("none", error_response(&RegistryError::new(ErrorCode::Unsupported).with_status(404).with_detail("not found")));
    };
    let route = match route::parse(path) {
        Ok(r) => r,
        Err(e) => return ("invalid", error_response(&e)),
    };
    let label = route.label();
    let identity = match gate::authenticate(auth, &req).await {
        Ok(i) => i,
        Err(r) => return (label, gate::refusal_response(auth, &req, r)),
    };
    let grants = match gate::authorize(auth, &identity, &route, &req) {
        Ok(g) => g,
        Err(r) => return (label, gate::refusal_response(auth, &req, r)),
    };
    let ctx = Ctx { registry: &services.registry, auth, identity: &identity, grants: &grants };
    let result = dispatch(&ctx, route, req).await;
    (label, result.unwrap_or_else(|e| error_response(&e)))
}

/// The body of `/healthz` and `/readyz`.
#[derive(serde::Serialize)]
struct HealthBody {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

fn health_response(status: StatusCode, word: &'static str, reason: Option<&'static str>) -> Reply {
    json_response(status, serde_json::to_vec(&HealthBody { status: word, reason }).expect("json"))
}

/// `GET /metrics`: the OpenMetrics exposition, for the platform admin (a
/// Prometheus `basic_auth` with an access token): tenant names are among its labels.
async fn metrics(services: &Services, req: Request) -> Reply {
    if req.method != Method::GET {
        return error_response(&method_not_allowed(&req.method));
    }
    let identity = match gate::authenticate(&services.auth, &req).await {
        Ok(i) => i,
        Err(r) => return gate::refusal_response(&services.auth, &req, r),
    };
    let allowed = gate::require_basic(&identity).and_then(|()| services.auth.require_platform_admin(&identity.principal));
    if let Err(e) = allowed {
        let mut r = error_response(&e);
        if e.code() == ErrorCode::Unauthorized {
            set(&mut r, "www-authenticate", gate::API_CHALLENGE);
        }
        return r;
    }
    let mut r = json_response(StatusCode::OK, services.registry.metrics_text().await.into_bytes());
    set(&mut r, "content-type", berth_registry::metrics::CONTENT_TYPE);
    r
}

/// What a handler may use: the registry, and the already-made access decisions.
struct Ctx<'a> {
    registry: &'a Registry,
    auth: &'a Auth,
    identity: &'a Identity,
    grants: &'a gate::Grants,
}

pub(crate) fn method_not_allowed(m: &Method) -> RegistryError {
    RegistryError::new(ErrorCode::Unsupported).with_status(405).with_detail(format!("method {m} not allowed here"))
}

async fn dispatch(ctx: &Ctx<'_>, route: Route, mut req: Request) -> Result<Reply, RegistryError> {
    let registry = ctx.registry;
    let m = req.method.clone();
    match (route, m) {
        (Route::Base, Method::GET | Method::HEAD) => Ok(json_response(StatusCode::OK, b"{}".to_vec())),
        (Route::Catalog, Method::GET) => catalog(ctx, page_params(&req, CATALOG_DEFAULT_N)?).await,
        (Route::Tags(repo), Method::GET) => tags(registry, &repo, page_params(&req, MAX_N)?).await,
        (Route::BadReference(_, e), Method::GET | Method::HEAD | Method::DELETE) => {
            Err(RegistryError::new(ErrorCode::ManifestUnknown).with_detail(e.detail_or_message()))
        }
        // Digest-shaped: the digest's own error (malformed, or an algorithm Berth does not support).
        (Route::BadReference(_, e), Method::PUT) if matches!(e.code(), ErrorCode::DigestInvalid | ErrorCode::Unsupported) => Err(e),
        (Route::BadReference(_, e), Method::PUT) => Err(RegistryError::new(ErrorCode::TagInvalid).with_detail(e.detail_or_message())),
        (Route::Manifest(repo, r), Method::GET) => get_manifest(registry, &repo, &r, true, ctx.identity.principal.subject()).await,
        (Route::Manifest(repo, r), Method::HEAD) => get_manifest(registry, &repo, &r, false, ctx.identity.principal.subject()).await,
        (Route::Manifest(repo, r), Method::PUT) => put_manifest(registry, &repo, &r, &mut req, ctx.identity.principal.subject()).await,
        (Route::Manifest(repo, r), Method::DELETE) => {
            registry.delete_manifest(&repo, &r, ctx.identity.principal.subject()).await?;
            Ok(empty(StatusCode::ACCEPTED))
        }
        (Route::Blob(repo, d), Method::GET) => get_blob(registry, &repo, &d, req.header("range").map(str::to_owned), true).await,
        (Route::Blob(repo, d), Method::HEAD) => get_blob(registry, &repo, &d, req.header("range").map(str::to_owned), false).await,
        (Route::Blob(repo, d), Method::DELETE) => {
            registry.delete_blob(&repo, &d).await?;
            Ok(empty(StatusCode::ACCEPTED))
        }
        (Route::Uploads(repo), Method::POST) => {
            start_upload(registry, &repo, ctx.grants.mount_allowed, &mut req, ctx.identity.principal.subject()).await
        }
        (Route::Upload(repo, id), Method::PATCH) => patch_upload(registry, &repo, &id, &mut req).await,
        (Route::Upload(repo, id), Method::PUT) => put_upload(registry, &repo, &id, &mut req, ctx.identity.principal.subject()).await,
        (Route::Upload(repo, id), Method::GET) => {
            let offset = registry.upload_status(&repo, &id).await?;
            Ok(upload_accepted(StatusCode::NO_CONTENT, &repo, &id, offset))
        }
        (Route::Upload(repo, id), Method::DELETE) => {
            registry.cancel_upload(&repo, &id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::Referrers(repo, d), Method::GET) => referrers(registry, &repo, &d, req.param("artifactType")).await,
        (_, m) => Err(method_not_allowed(&m)),
    }
}

// ----- rendering -----

/// The one place an error becomes a response.
pub(crate) fn error_response(e: &RegistryError) -> Reply {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, e.to_json())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(crate) fn no_content() -> Reply {
    let mut r = json_response(StatusCode::NO_CONTENT, Vec::new());
    r.headers_mut().remove("content-type");
    r
}

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Reply {
    let len = body.len();
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

fn empty(status: StatusCode) -> Reply {
    let mut r = Response::new(Bytes::new().into());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    r
}

pub(crate) fn set(r: &mut Reply, name: &'static str, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        r.headers_mut().insert(name, v);
    }
}

// ----- listings -----

fn page_params(req: &Request, default_n: usize) -> Result<(usize, Option<String>), RegistryError> {
    let n = match req.param("n") {
        None => default_n,
        Some(s) => s.parse::<usize>().map_err(|_| {
            RegistryError::new(ErrorCode::PaginationInvalid).with_detail(format!("n must be a non-negative integer, got {s:?}"))
        })?,
    };
    Ok((n.min(MAX_N), req.param("last")))
}

fn link_next(path: &str, n: usize, last: Option<&str>) -> Option<String> {
    let last = last?;
    Some(format!("<{path}?n={n}&last={last}>; rel=\"next\""))
}

/// `(n, last)`: the page asked for ([`page_params`]).
async fn catalog(ctx: &Ctx<'_>, (n, last): (usize, Option<String>)) -> Result<Reply, RegistryError> {
    ctx.registry.fresh_catalog().await?;
    // Only what the caller may pull is listed.
    let (repos, more) = ctx.auth.catalog(ctx.identity, |visible| ctx.registry.catalog(n, last.as_deref(), visible));
    let body = serde_json::json!({ "repositories": repos });
    let mut r = json_response(StatusCode::OK, serde_json::to_vec(&body).expect("json"));
    if more {
        if let Some(l) = link_next("/v2/_catalog", n, repos.last().map(|r| r.as_str())) {
            set(&mut r, "link", l);
        }
    }
    Ok(r)
}

async fn tags(registry: &Registry, repo: &RepoName, (n, last): (usize, Option<String>)) -> Result<Reply, RegistryError> {
    let (tags, more) = registry.tags(repo, n, last.as_deref()).await?;
    let body = serde_json::json!({ "name": repo, "tags": tags });
    let mut r = json_response(StatusCode::OK, serde_json::to_vec(&body).expect("json"));
    if more {
        if let Some(l) = link_next(&format!("/v2/{repo}/tags/list"), n, tags.last().map(|t| t.as_str())) {
            set(&mut r, "link", l);
        }
    }
    Ok(r)
}

async fn referrers(registry: &Registry, repo: &RepoName, digest: &Digest, filter: Option<String>) -> Result<Reply, RegistryError> {
    let filter = filter.filter(|s| !s.is_empty());
    let manifests = registry.referrers(repo, digest, filter.as_deref()).await?;
    let body = serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let mut r = json_response(StatusCode::OK, serde_json::to_vec(&body).expect("json"));
    set(&mut r, "content-type", OCI_INDEX);
    if filter.is_some() {
        set(&mut r, "oci-filters-applied", "artifactType");
    }
    Ok(r)
}

// ----- manifests -----

async fn get_manifest(
    registry: &Registry,
    repo: &RepoName,
    reference: &Reference,
    body: bool,
    puller: &str,
) -> Result<Reply, RegistryError> {
    let (m, size) = registry.get_manifest(repo, reference, body, puller).await?;
    let mut r = Response::new(if body { m.bytes.into() } else { Bytes::new().into() });
    set(&mut r, "content-type", &m.media_type);
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    set(&mut r, "docker-content-digest", m.digest.to_string());
    set(&mut r, "etag", format!("\"{}\"", m.digest));
    Ok(r)
}

async fn put_manifest(
    registry: &Registry,
    repo: &RepoName,
    reference: &Reference,
    req: &mut Request,
    pusher: &str,
) -> Result<Reply, RegistryError> {
    let too_big = || {
        RegistryError::new(ErrorCode::ManifestInvalid)
            .with_status(413)
            .with_detail(format!("manifest exceeds the {MAX_MANIFEST_BYTES} byte limit"))
    };
    // An oversize body is drained (up to a bound) so the client reliably reads
    // the 413 instead of a reset connection.
    const DRAIN_LIMIT: u64 = 4 * MAX_MANIFEST_BYTES as u64;
    if let Some(len) = req.header("content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
        if len > DRAIN_LIMIT {
            return Err(too_big());
        }
    }
    let mut buf = Vec::new();
    let mut oversize = false;
    let mut seen = 0u64;
    if let Some(mut body) = req.take_body() {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| RegistryError::new(ErrorCode::ManifestInvalid).with_detail(format!("reading body: {e}")))?;
            seen += chunk.len() as u64;
            if oversize || buf.len() + chunk.len() > MAX_MANIFEST_BYTES {
                oversize = true;
                buf = Vec::new();
                if seen > DRAIN_LIMIT {
                    break;
                }
                continue;
            }
            buf.extend_from_slice(&chunk);
        }
    }
    if oversize {
        return Err(too_big());
    }
    let content_type = req.header("content-type").map(str::to_owned);
    let put = registry.put_manifest(repo, reference, content_type.as_deref(), Bytes::from(buf), pusher).await?;
    let mut r = empty(StatusCode::CREATED);
    set(&mut r, "location", format!("/v2/{repo}/manifests/{}", put.digest));
    set(&mut r, "docker-content-digest", put.digest.to_string());
    if let Some(s) = put.subject {
        set(&mut r, "oci-subject", s.to_string());
    }
    Ok(r)
}

// ----- blobs -----

/// Adapts a `Send` stream to the `Sync` bound warp's streaming body asks for; the
/// stream is only ever polled through `&mut`, so the mutex is never contended.
struct SyncStream(std::sync::Mutex<berth_registry::ByteStream>);

impl Stream for SyncStream {
    type Item = std::io::Result<Bytes>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut().0.get_mut() {
            Ok(s) => s.as_mut().poll_next(cx),
            Err(_) => Poll::Ready(None),
        }
    }
}

async fn get_blob(
    registry: &Registry,
    repo: &RepoName,
    digest: &Digest,
    range: Option<String>,
    body: bool,
) -> Result<Reply, RegistryError> {
    let BlobBody { size, range, stream } = match registry.get_blob(repo, digest, range.as_deref(), body).await {
        Ok(b) => b,
        Err(e) if e.code() == ErrorCode::RangeInvalid => {
            let mut r = error_response(&e);
            if let Ok(size) = registry.stat_blob(repo, digest).await {
                set(&mut r, "content-range", format!("bytes */{size}"));
            }
            return Ok(r);
        }
        Err(e) => return Err(e),
    };
    let mut r = match stream {
        Some(s) => warp::reply::Reply::into_response(warp::reply::stream(SyncStream(std::sync::Mutex::new(s)))),
        None => Response::new(Bytes::new().into()),
    };
    let len = match range {
        Some(rg) => {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            set(&mut r, "content-range", format!("bytes {}-{}/{size}", rg.start, rg.end));
            rg.len()
        }
        None => size,
    };
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    set(&mut r, "content-type", "application/octet-stream");
    set(&mut r, "accept-ranges", "bytes");
    set(&mut r, "docker-content-digest", digest.to_string());
    set(&mut r, "etag", format!("\"{digest}\""));
    set(&mut r, "cache-control", "max-age=31536000");
    Ok(r)
}

fn upload_accepted(status: StatusCode, repo: &RepoName, id: &UploadId, offset: u64) -> Reply {
    let mut r = empty(status);
    set(&mut r, "location", format!("/v2/{repo}/blobs/uploads/{id}"));
    set(&mut r, "range", format!("0-{}", offset.saturating_sub(1)));
    set(&mut r, "docker-upload-uuid", id.to_string());
    r
}

fn blob_created(repo: &RepoName, digest: &Digest) -> Reply {
    let mut r = empty(StatusCode::CREATED);
    set(&mut r, "location", format!("/v2/{repo}/blobs/{digest}"));
    set(&mut r, "docker-content-digest", digest.to_string());
    r
}

fn digest_param(req: &Request) -> Result<Option<Digest>, RegistryError> {
    req.param("digest").map(|d| d.parse()).transpose()
}

fn empty_body() -> Body {
    Box::pin(futures::stream::empty())
}

async fn start_upload(
    registry: &Registry,
    repo: &RepoName,
    mount_allowed: bool,
    req: &mut Request,
    by: &str,
) -> Result<Reply, RegistryError> {
    if let Some(mount) = req.param("mount") {
        let digest: Digest = mount.parse()?;
        // A source the caller may not read is never mounted from: plain session instead.
        if let Some(from) = req.param("from").filter(|_| mount_allowed) {
            // An unparsable or unknown source is simply not mountable.
            if let Ok(from) = from.parse::<RepoName>() {
                if registry.mount_blob(repo, &digest, &from, by).await? {
                    return Ok(blob_created(repo, &digest));
                }
            }
        }
    } else if let Some(digest) = digest_param(req)? {
        let body = req.take_body().unwrap_or_else(empty_body);
        registry.upload_monolithic(repo, &digest, body, by).await?;
        return Ok(blob_created(repo, &digest));
    }
    let id = registry.start_upload(repo, by).await?;
    Ok(upload_accepted(StatusCode::ACCEPTED, repo, &id, 0))
}

async fn patch_upload(registry: &Registry, repo: &RepoName, id: &UploadId, req: &mut Request) -> Result<Reply, RegistryError> {
    let range = content_range(req)?;
    let body = req.take_body().unwrap_or_else(empty_body);
    let offset = registry.upload_chunk(repo, id, range, body).await?;
    Ok(upload_accepted(StatusCode::ACCEPTED, repo, id, offset))
}

async fn put_upload(registry: &Registry, repo: &RepoName, id: &UploadId, req: &mut Request, by: &str) -> Result<Reply, RegistryError> {
    let digest = digest_param(req)?
        .ok_or_else(|| RegistryError::new(ErrorCode::DigestInvalid).with_detail("the digest query parameter is required"))?;
    let range = content_range(req)?;
    let body = req.take_body();
    registry.finish_upload(repo, id, &digest, range, body, by).await?;
    Ok(blob_created(repo, &digest))
}

/// The upload chunk's `Content-Range` (`start-end`), if the request has one.
fn content_range(req: &Request) -> Result<Option<ByteRange>, RegistryError> {
    req.header("content-range").map(parse_content_range).transpose()
}

fn box_body<S, B>(s: S) -> Body
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf,
{
    Box::pin(s.map(|r| r.map(|mut b| b.copy_to_bytes(b.remaining()))))
}
