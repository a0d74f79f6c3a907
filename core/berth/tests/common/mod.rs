//! Test harness: runs the real `berth` binary on a loopback port with a temporary
//! data directory, and small helpers to drive the OCI API.
#![allow(dead_code)]

pub mod receiver;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sha2::{Digest as _, Sha256};

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("berth-it-{tag}-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    h.finish()
}

/// A running `berth serve`.
pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub addr: String,
    pub data: PathBuf,
    /// Where its blobs are: the filesystem under `data`, or S3 on the test
    /// process's Garage when `BERTH_TEST_STORAGE=s3` (see [`s3_config`]).
    pub storage: berth_storage::StorageConfig,
}

/// Under `BERTH_TEST_STORAGE=s3`, the configuration a server on `data` runs
/// with: `env`'s `BERTH_CONFIG` file (if any) with a `[storage]` section on the
/// test process's Garage, under a prefix derived from `data` (so a restart on
/// the same folder finds its blobs), written beside Garage's own files. `None`
/// when the suite runs on the filesystem, or the file chooses its storage itself.
fn s3_config(data: &Path, env: &[(&str, &str)]) -> Option<(PathBuf, berth_storage::StorageConfig)> {
    if !berth_testkit::s3_wanted() {
        return None;
    }
    let g = berth_testkit::Garage::shared().expect("a Garage for BERTH_TEST_STORAGE=s3");
    let mut text = match env.iter().find(|(k, _)| *k == "BERTH_CONFIG") {
        Some((_, path)) => std::fs::read_to_string(path).unwrap(),
        None => String::new(),
    };
    if text.contains("[storage]") {
        return None;
    }
    let prefix = berth_testkit::prefix_for(&data.to_string_lossy());
    let storage = berth_storage::StorageConfig::S3 {
        bucket: g.bucket.clone(),
        endpoint: Some(g.endpoint.clone()),
        region: Some(g.region.clone()),
        root: Some(format!("/{prefix}/")),
        access_key_id: Some(g.access_key_id.clone()),
        secret_access_key: Some(g.secret_access_key.clone()),
        request_timeout_secs: 60,
    };
    #[derive(serde::Serialize)]
    struct File<'a> {
        storage: &'a berth_storage::StorageConfig,
    }
    text = format!("{}\n{text}", toml::to_string(&File { storage: &storage }).unwrap());
    let path = g.dir().join(format!("{prefix}.toml"));
    std::fs::write(&path, text).unwrap();
    Some((path, storage))
}

impl Server {
    /// Start on a free port with the given data dir and extra environment.
    pub fn start_in(data: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_at(data, "127.0.0.1:0", env)
    }

    pub fn start_at(data: &Path, listen: &str, env: &[(&str, &str)]) -> Server {
        Self::start_with(data, listen, env, |_| {})
    }

    /// As [`Server::start_at`], with the command adjusted last by `adjust`
    /// (its working directory, an environment variable removed).
    pub fn start_with(data: &Path, listen: &str, env: &[(&str, &str)], adjust: impl FnOnce(&mut Command)) -> Server {
        let mut cmd = berth_command();
        cmd.args(["serve", "--listen", listen, "--data-dir"])
            .arg(data)
            .env("BERTH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd.env("BERTH_LOG", "warn");
        cmd.env("BERTH_ADMIN_PASSWORD", ADMIN_PASSWORD);
        // The repository's own policies, wherever the test runs from.
        cmd.env("BERTH_POLICY_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let storage = match s3_config(data, env) {
            Some((file, storage)) => {
                cmd.env("BERTH_CONFIG", file);
                storage
            }
            None => berth_storage::StorageConfig::fs(data.join("blobs").to_string_lossy()),
        };
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("spawn berth");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read banner");
        let base = line.trim().strip_prefix("berth listening on ").unwrap_or_else(|| panic!("unexpected banner {line:?}")).to_string();
        let addr = base.trim_start_matches("http://").trim_start_matches("https://").to_string();
        Server { child: Some(child), base, addr, data: data.to_path_buf(), storage }
    }

    /// The server's blob store, opened beside it (to look at what it stored).
    pub async fn blob_store(&self) -> berth_storage::BlobStore {
        berth_storage::BlobStore::open(&self.storage).await.unwrap()
    }

    /// How many uploads have staging data in its store.
    pub async fn staged_uploads(&self) -> usize {
        self.blob_store().await.staged_uploads().await.unwrap().len()
    }

    /// Whether its store holds the blob `digest`.
    pub async fn has_blob(&self, digest: &str) -> bool {
        self.blob_store().await.stat_blob(&digest.parse().unwrap()).await.unwrap().is_some()
    }

    /// Start with `toml` as its configuration file (`<dir>/berth.toml`), data in `<dir>/data`.
    pub fn start_configured(dir: &TempDir, toml: &str) -> Server {
        let cfg = dir.path().join("berth.toml");
        std::fs::write(&cfg, toml).unwrap();
        Self::start_in(&dir.path().join("data"), &[("BERTH_CONFIG", cfg.to_str().unwrap())])
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Send SIGTERM without waiting (see [`Server::stop`]).
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            unsafe_kill(c.id());
        }
    }

    /// Stop with SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id());
            let status = c.wait().unwrap();
            assert!(status.success(), "berth exited with {status}");
        }
    }
}

fn unsafe_kill(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `berth` binary with only what the test sets: the runner's own `BERTH_*`
/// variables (CI exports `BERTH_TEST_*`, which `serve` would refuse) stay out.
pub fn berth_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BERTH_")) {
        cmd.env_remove(k);
    }
    cmd
}

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// The bootstrap admin's password in tests.
pub const ADMIN_PASSWORD: &str = "admin-test-password";

pub fn basic(user: &str, secret: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}")))
}

/// A client that authenticates as the platform admin (Basic) on every request.
pub fn client() -> reqwest::Client {
    client_as("admin", ADMIN_PASSWORD)
}

/// A client that authenticates as `user` with `secret` (password or access token).
pub fn client_as(user: &str, secret: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, basic(user, secret).parse().unwrap());
    client_builder().default_headers(h).build().unwrap()
}

/// A client that sends no credentials.
pub fn anon_client() -> reqwest::Client {
    client_builder().build().unwrap()
}

static TRUSTED_CA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Clients made from now on also trust the certificate authority `ca_pem` (for
/// servers started with TLS). Once per test binary.
pub fn trust(ca_pem: &[u8]) {
    TRUSTED_CA.set(ca_pem.to_vec()).expect("trust() once per test binary");
}

fn client_builder() -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    match TRUSTED_CA.get() {
        Some(pem) => b.add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap()),
        None => b,
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Assert a response is a spec error with `status` and `code`.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str, what: &str) {
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "{what}: status (body {text})");
    if status == 405 || got == 404 && text.is_empty() {
        return;
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
    assert_eq!(v["errors"][0]["code"], code, "{what}: {text}");
    assert!(v["errors"][0]["message"].is_string(), "{what}: {text}");
}

/// Monolithic blob upload; returns the digest.
pub async fn push_blob(c: &reqwest::Client, s: &Server, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    let r = c
        .post(s.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "push blob");
    d
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An OCI image manifest over the given config and layers.
pub fn image_manifest(config: (&str, usize), layers: &[(&str, usize)], extra: serde_json::Value) -> Vec<u8> {
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers.iter().map(|(d, n)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n
        })).collect::<Vec<_>>(),
    });
    if let (Some(obj), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            obj.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&m).unwrap()
}

/// Push config + layers + manifest under `reference`; returns the manifest digest.
pub async fn push_image(c: &reqwest::Client, s: &Server, repo: &str, reference: &str, seed: u64, extra: serde_json::Value) -> String {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let cd = push_blob(c, s, repo, &config).await;
    let layer = bytes(seed, 1000 + seed as usize);
    let ld = push_blob(c, s, repo, &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], extra);
    put_manifest(c, s, repo, reference, OCI_MANIFEST, &m).await
}

pub async fn put_manifest(c: &reqwest::Client, s: &Server, repo: &str, reference: &str, ct: &str, body: &[u8]) -> String {
    let r = c.put(s.url(&format!("/v2/{repo}/manifests/{reference}"))).header("content-type", ct).body(body.to_vec()).send().await.unwrap();
    let status = r.status();
    let digest = r.headers().get("docker-content-digest").map(|v| v.to_str().unwrap().to_string());
    assert_eq!(status, 201, "put manifest: {}", r.text().await.unwrap());
    let d = digest.unwrap();
    assert_eq!(d, sha256(body));
    d
}

/// As admin: create `tenant` (if new) and a user in it with `role`; then, as that
/// user, issue a registry access token. Returns the token.
pub async fn tenant_user_token(s: &Server, tenant: &str, user: &str, role: &str) -> String {
    let admin = client();
    let r = admin.post(s.url("/api/v1/tenants")).json(&serde_json::json!({"name": tenant})).send().await.unwrap();
    assert!(r.status() == 201 || r.status() == 409, "create tenant: {}", r.text().await.unwrap());
    let password = format!("{user}-password");
    let r = admin
        .post(s.url(&format!("/api/v1/tenants/{tenant}/users")))
        .json(&serde_json::json!({"name": user, "password": password, "role": role}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "create user: {}", r.text().await.unwrap());
    let r =
        client_as(user, &password).post(s.url("/api/v1/tokens")).json(&serde_json::json!({"description": "test"})).send().await.unwrap();
    assert_eq!(r.status(), 201, "issue token");
    let v: serde_json::Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// One sample of `GET /metrics` (as the platform admin): `series` is the name
/// with its labels as exposed, e.g. `berth_gc_passes_total`.
pub async fn metric(s: &Server, series: &str) -> f64 {
    let text = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let line = text
        .lines()
        .find(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Run the `berth` CLI against `s` as the platform admin (no stored
/// credentials: they would live in `scratch`): exit code and stdout + stderr.
pub fn admin_cli(s: &Server, scratch: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env("BERTH_SERVER", &s.base)
        .env("BERTH_USER", "admin")
        .env("BERTH_PASSWORD", ADMIN_PASSWORD)
        .env("BERTH_CREDENTIALS", scratch.join("none.json"))
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}
