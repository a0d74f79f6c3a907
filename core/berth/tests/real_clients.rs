//! Real clients against the real binary: skopeo and podman (always), the docker
//! engine (when `BERTH_TEST_DOCKER=1`) and containerd's `ctr` (when
//! `BERTH_TEST_CONTAINERD` names a containerd socket); `.ci/run` sets both on
//! machines with a docker engine.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::json;

/// Write `data` as a blob of an OCI layout; returns (digest, size).
fn put_blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let d = sha256(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(d.trim_start_matches("sha256:")), data).unwrap();
    (d, data.len())
}

/// An image whose layers are real gzipped tars and whose config names their
/// uncompressed digests, so clients that unpack (containerd, podman) check them.
fn image(layout: &Path, arch: &str, layers: usize, seed: u64) -> (String, usize) {
    let mut descs = vec![];
    let mut diff_ids = vec![];
    for i in 0..layers {
        let tar = tar_of(&format!("layer-{i}.bin"), &bytes(seed * 100 + i as u64, 20_000 + i * 777));
        diff_ids.push(sha256(&tar));
        // Real gzip, so clients do not recompress (which would change digests).
        let (d, n) = put_blob(layout, &gzip(&tar));
        descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {}
    }))
    .unwrap();
    let (cd, cn) = put_blob(layout, &config);
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": descs
    }))
    .unwrap();
    put_blob(layout, &m)
}

/// A tar archive holding one file, the same bytes for the same input.
fn tar_of(name: &str, data: &[u8]) -> Vec<u8> {
    let dir = TempDir::new("tar");
    std::fs::write(dir.path().join(name), data).unwrap();
    let out = Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(dir.path())
        .args(["-cf", "-", name])
        .output()
        .expect("tar");
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn write_layout(layout: &Path, top: serde_json::Value) {
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").args(args).output().expect("skopeo must be installed (apt-get install skopeo)");
    assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The digest of the manifest an OCI layout's index.json points at.
fn layout_top(layout: &Path) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    v["manifests"][0]["digest"].as_str().unwrap().to_string()
}

fn blob_files(layout: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(layout.join("blobs/sha256")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn skopeo_round_trips_image_and_multi_arch_index() {
    let dir = TempDir::new("skopeo");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    // A developer of tenant "skopeo" logs in with a registry access token.
    let token = block_on(tenant_user_token(&s, "skopeo", "sam", "developer"));
    let authfile = dir.path().join("auth.json");
    let authfile = authfile.to_str().unwrap();
    skopeo(&["login", "--tls-verify=false", "--authfile", authfile, "-u", "sam", "-p", &token, &s.addr]);

    // A three-layer image.
    let src = dir.path().join("src-image");
    std::fs::create_dir_all(&src).unwrap();
    let (md, mn) = image(&src, "amd64", 3, 1);
    write_layout(
        &src,
        json!({"mediaType": OCI_MANIFEST, "digest": md, "size": mn,
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}),
    );
    let dest = format!("docker://{}/skopeo/image:v1", s.addr);
    skopeo(&["copy", "--authfile", authfile, "--dest-tls-verify=false", &format!("oci:{}:v1", src.display()), &dest]);
    let back = dir.path().join("back-image");
    skopeo(&["copy", "--authfile", authfile, "--src-tls-verify=false", &dest, &format!("oci:{}:v1", back.display())]);
    assert_eq!(layout_top(&back), md, "manifest digest survives the round trip");
    assert_eq!(blob_files(&back), blob_files(&src), "every blob comes back byte-identical");
    let raw = skopeo(&["inspect", "--authfile", authfile, "--tls-verify=false", "--raw", &dest]);
    assert_eq!(sha256(raw.as_bytes()), md);
    // skopeo's pulls (the copy back, the inspect) were counted, off the GET path.
    block_on(async {
        for _ in 0..150 {
            let t: serde_json::Value =
                client().get(s.url("/api/v1/repositories/skopeo/image/-/tags/v1")).send().await.unwrap().json().await.unwrap();
            assert_eq!(t["push_count"], 1, "{t}");
            if t["pull_count"].as_u64().unwrap() >= 2 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("skopeo's pulls were not counted within 15 s");
    });

    // Private by default: an anonymous client is refused; public after the switch.
    let anon = dir.path().join("anon.json");
    std::fs::write(&anon, "{}").unwrap();
    let anon = anon.to_str().unwrap();
    let out = Command::new("skopeo").args(["inspect", "--authfile", anon, "--tls-verify=false", "--raw", &dest]).output().unwrap();
    assert!(!out.status.success(), "anonymous pull of a private repository must fail");
    block_on(async {
        let r = client().put(s.url("/api/v1/repositories/skopeo/image/visibility")).json(&json!({"public": true})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    });
    let raw = skopeo(&["inspect", "--authfile", anon, "--tls-verify=false", "--raw", &dest]);
    assert_eq!(sha256(raw.as_bytes()), md, "anonymous pull of a public repository");

    // A multi-arch index of two images.
    let src = dir.path().join("src-index");
    std::fs::create_dir_all(&src).unwrap();
    let (a, an) = image(&src, "amd64", 2, 2);
    let (b, bn) = image(&src, "arm64", 2, 3);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": a, "size": an, "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": b, "size": bn, "platform": {"architecture": "arm64", "os": "linux"}}
        ]
    }))
    .unwrap();
    let (id, idn) = put_blob(&src, &index);
    write_layout(
        &src,
        json!({"mediaType": OCI_INDEX, "digest": id, "size": idn,
        "annotations": {"org.opencontainers.image.ref.name": "multi"}}),
    );
    let dest = format!("docker://{}/skopeo/multi:latest", s.addr);
    skopeo(&["copy", "--authfile", authfile, "--all", "--dest-tls-verify=false", &format!("oci:{}:multi", src.display()), &dest]);
    let back = dir.path().join("back-index");
    skopeo(&["copy", "--authfile", authfile, "--all", "--src-tls-verify=false", &dest, &format!("oci:{}:multi", back.display())]);
    assert_eq!(layout_top(&back), id, "index digest survives the round trip");
    assert_eq!(blob_files(&back), blob_files(&src));

    let tags = skopeo(&["list-tags", "--authfile", authfile, "--tls-verify=false", &format!("docker://{}/skopeo/image", s.addr)]);
    let v: serde_json::Value = serde_json::from_str(&tags).unwrap();
    assert_eq!(v["Tags"], json!(["v1"]));
}

#[test]
fn docker_engine_push_and_pull() {
    if std::env::var("BERTH_TEST_DOCKER").as_deref() != Ok("1") {
        eprintln!("docker_engine_push_and_pull: set BERTH_TEST_DOCKER=1 to run against the local docker engine");
        return;
    }
    let dir = TempDir::new("docker");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let tar = rootfs_tar(dir.path());
    let image = format!("{}/docker/e2e:v1", s.addr);
    // docker login with a registry access token, into a private docker config.
    let token = block_on(tenant_user_token(&s, "docker", "dan", "maintainer"));
    let cfg = dir.path().join("docker-config");
    std::fs::create_dir_all(&cfg).unwrap();
    let env = [("DOCKER_CONFIG", cfg.to_str().unwrap())];
    run_in("docker", &["login", "-u", "dan", "--password-stdin", &s.addr], &env, Some(&token));
    run("docker", &["import", tar.to_str().unwrap(), &image]);
    run_in("docker", &["push", &image], &env, None);
    let pushed_id = run("docker", &["image", "inspect", "--format", "{{.Id}}", &image]);
    run("docker", &["rmi", &image]);
    run_in("docker", &["pull", &image], &env, None);
    let pulled_id = run("docker", &["image", "inspect", "--format", "{{.Id}}", &image]);
    assert_eq!(pushed_id, pulled_id);
    run("docker", &["rmi", &image]);
    // Without credentials the private image cannot be pulled.
    let anon_cfg = dir.path().join("docker-anon");
    std::fs::create_dir_all(&anon_cfg).unwrap();
    let out = Command::new("docker").args(["pull", &image]).env("DOCKER_CONFIG", &anon_cfg).output().unwrap();
    assert!(!out.status.success(), "anonymous docker pull of a private image must fail");
    run_in("docker", &["logout", &s.addr], &env, None);
}

/// containerd, the runtime under Kubernetes nodes, through its own client `ctr`
/// (containerd's resolver, pusher and authorizer, not containers/image like
/// skopeo and podman): an image imported from an OCI archive is pushed with a
/// registry access token (containerd asks the token endpoint with an OAuth2
/// password grant), removed, then pulled and unpacked by tag and by digest;
/// unpacking checks every layer against the config's diff_ids. Needs a running
/// containerd: `BERTH_TEST_CONTAINERD` names its socket (`.ci/run` sets it to
/// the docker engine's containerd where one answers).
#[test]
fn containerd_push_and_pull() {
    let Ok(socket) = std::env::var("BERTH_TEST_CONTAINERD") else {
        eprintln!("containerd_push_and_pull: set BERTH_TEST_CONTAINERD to a containerd socket to run it");
        return;
    };
    let dir = TempDir::new("containerd");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let token = block_on(tenant_user_token(&s, "ctr", "cara", "developer"));
    let user = format!("cara:{token}");
    // A namespace of the test's own in the shared containerd, removed at the end.
    let ctr = Ctr { socket, namespace: dir.path().file_name().unwrap().to_str().unwrap().to_string() };

    let layout = dir.path().join("layout");
    let (md, mn) = image(&layout, "amd64", 2, 7);
    write_layout(
        &layout,
        json!({"mediaType": OCI_MANIFEST, "digest": md, "size": mn,
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}),
    );
    let archive = dir.path().join("image.tar");
    run("tar", &["-C", layout.to_str().unwrap(), "-cf", archive.to_str().unwrap(), "."]);
    let name = format!("{}/ctr/app", s.addr);
    let v1 = format!("{name}:v1");
    ctr.run(&["images", "import", "--no-unpack", "--base-name", &name, archive.to_str().unwrap()]);
    assert_eq!(ctr.digest(&v1), md, "imported as built");
    ctr.run(&["images", "push", "--plain-http", "-u", &user, &v1]);
    // A second tag of the same image: containerd finds every blob present.
    let v2 = format!("{name}:v2");
    ctr.run(&["images", "tag", &v1, &v2]);
    ctr.run(&["images", "push", "--plain-http", "-u", &user, &v2]);
    ctr.remove_images();
    assert_eq!(ctr.run(&["content", "ls", "-q"]), "", "the namespace holds no content before the pull");

    ctr.run(&["images", "pull", "--plain-http", "-u", &user, "--snapshotter", "native", &v1]);
    assert_eq!(ctr.digest(&v1), md, "the manifest comes back byte-identical");
    let by_digest = format!("{name}@{md}");
    ctr.run(&["images", "pull", "--plain-http", "-u", &user, "--snapshotter", "native", &by_digest]);
    assert_eq!(ctr.digest(&by_digest), md);
    block_on(async {
        let tags: serde_json::Value = client().get(s.url("/v2/ctr/app/tags/list")).send().await.unwrap().json().await.unwrap();
        assert_eq!(tags["tags"], json!(["v1", "v2"]));
    });

    // Without credentials the private image cannot be pulled.
    ctr.remove_images();
    let out = ctr.command(&["images", "pull", "--plain-http", "--snapshotter", "native", &v1]).output().unwrap();
    assert!(!out.status.success(), "anonymous containerd pull of a private image must fail");
}

/// `ctr` in one containerd namespace; the namespace goes with it.
struct Ctr {
    socket: String,
    namespace: String,
}

impl Ctr {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.args(["--address", &self.socket, "--namespace", &self.namespace]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("ctr must be installed (it comes with containerd)");
        assert!(out.status.success(), "ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The manifest digest containerd holds for an image name.
    fn digest(&self, image: &str) -> String {
        let list = self.run(&["images", "ls"]);
        let line = list.lines().find(|l| l.split_whitespace().next() == Some(image));
        let line = line.unwrap_or_else(|| panic!("{image} not in {list}"));
        line.split_whitespace().find(|f| f.starts_with("sha256:")).unwrap().to_string()
    }

    fn remove_images(&self) {
        let names = self.run(&["images", "ls", "-q"]);
        for name in names.lines() {
            self.run(&["images", "rm", "--sync", name]);
        }
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        let names = self.command(&["images", "ls", "-q"]).output().map(|o| String::from_utf8_lossy(&o.stdout).to_string());
        for name in names.unwrap_or_default().lines() {
            let _ = self.command(&["images", "rm", "--sync", name]).output();
        }
        let _ = Command::new("ctr").args(["--address", &self.socket, "namespaces", "rm", &self.namespace]).output();
    }
}

/// podman, from its own image store: an image imported from a root file
/// system tar is pushed with a registry access token, removed, pulled back with
/// the same image ID, then pushed as a manifest list and read back from Berth.
#[test]
fn podman_push_and_pull() {
    let dir = TempDir::new("podman");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let token = block_on(tenant_user_token(&s, "podman", "pat", "developer"));
    let store = dir.path().join("store");
    let auth = dir.path().join("auth.json");
    let auth = auth.to_str().unwrap();
    // An image store of the test's own (vfs needs no mounts), no events journal.
    let root = store.join("root");
    // podman takes a run root of at most 50 characters: a folder of its own.
    let runroot = TempDir::new("p");
    let runroot = runroot.path();
    let global =
        ["--root", root.to_str().unwrap(), "--runroot", runroot.to_str().unwrap(), "--storage-driver", "vfs", "--events-backend", "none"];
    let podman = |args: &[&str], stdin: Option<&str>| run_in("podman", &[&global[..], args].concat(), &[], stdin);
    let tar = rootfs_tar(dir.path());
    let image = format!("{}/podman/e2e:v1", s.addr);
    podman(&["login", "--tls-verify=false", "--authfile", auth, "-u", "pat", "--password-stdin", &s.addr], Some(&token));
    podman(&["import", tar.to_str().unwrap(), &image], None);
    podman(&["push", "--tls-verify=false", "--authfile", auth, &image], None);
    let pushed_id = podman(&["image", "inspect", "--format", "{{.Id}}", &image], None);
    podman(&["rmi", &image], None);
    podman(&["pull", "--tls-verify=false", "--authfile", auth, &image], None);
    assert_eq!(podman(&["image", "inspect", "--format", "{{.Id}}", &image], None), pushed_id);

    // A manifest list of that image, pushed with its image.
    let list = format!("{}/podman/list:v1", s.addr);
    podman(&["manifest", "create", "local-list"], None);
    podman(&["manifest", "add", "local-list", &format!("containers-storage:{image}")], None);
    podman(&["manifest", "push", "--all", "--tls-verify=false", "--authfile", auth, "local-list", &format!("docker://{list}")], None);
    block_on(async {
        let accept = format!("{OCI_INDEX}, application/vnd.docker.distribution.manifest.list.v2+json");
        let r = client().get(s.url("/v2/podman/list/manifests/v1")).header("Accept", accept).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let remote: serde_json::Value = r.json().await.unwrap();
        let listed = remote["manifests"].as_array().unwrap();
        assert_eq!(listed.len(), 1, "{remote}");
        let digest = listed[0]["digest"].as_str().unwrap();
        let r = client().get(s.url(&format!("/v2/podman/list/manifests/{digest}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "the list's image is in the list's repository");
    });
    podman(&["logout", "--authfile", auth, &s.addr], None);
    // Without credentials the private image cannot be pulled.
    podman(&["rmi", &image], None);
    let out = Command::new("podman").args(global).args(["pull", "--tls-verify=false", "--authfile", auth, &image]).output().unwrap();
    assert!(!out.status.success(), "anonymous podman pull of a private image must fail");
}

/// ORAS's Python client (oras-py, the ORAS project's SDK; `tests/clients/oras_client.py`
/// drives it): artifacts of any media type, monolithic and chunked uploads, a
/// referrer pushed with a subject, pulled back byte for byte; then Berth's
/// referrers API lists that referrer. `BERTH_TEST_ORAS_PYTHON` names a Python
/// that has oras-py (`.ci/run` sets its venv's).
#[test]
fn oras_artifacts_and_referrers() {
    let Ok(python) = std::env::var("BERTH_TEST_ORAS_PYTHON") else {
        eprintln!("oras_artifacts_and_referrers: set BERTH_TEST_ORAS_PYTHON to a Python with oras-py to run it");
        return;
    };
    let dir = TempDir::new("oras");
    let s = Server::start_in(&dir.path().join("data"), &[]);
    let token = block_on(tenant_user_token(&s, "oras", "olga", "developer"));
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/clients/oras_client.py");
    let out = run_in(
        &python,
        &[script, &s.addr, "oras/artifacts", "olga", &token, work.to_str().unwrap()],
        &[("HOME", work.to_str().unwrap())],
        None,
    );
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(pushed["tags"], json!(["sig", "v1"]));
    let (artifact, referrer) = (pushed["artifact"].as_str().unwrap(), pushed["referrer"].as_str().unwrap());
    block_on(async {
        let c = client();
        let r = c.get(s.url(&format!("/v2/oras/artifacts/manifests/{artifact}"))).header("Accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"].to_str().unwrap(), pushed["artifact_size"].to_string());
        let m: serde_json::Value = r.json().await.unwrap();
        assert_eq!(m["config"]["mediaType"], "application/vnd.example.model.config.v1+json");
        assert_eq!(m["layers"][0]["mediaType"], "application/vnd.example.model");
        let r = c.get(s.url(&format!("/v2/oras/artifacts/referrers/{artifact}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let index: serde_json::Value = r.json().await.unwrap();
        let listed = index["manifests"].as_array().unwrap();
        assert_eq!(listed.len(), 1, "{index}");
        assert_eq!(listed[0]["digest"], referrer);
        // With no artifactType of its own, a referrer's type is its config's.
        let r = c.get(s.url(&format!("/v2/oras/artifacts/manifests/{referrer}"))).header("Accept", OCI_MANIFEST).send().await.unwrap();
        let sig: serde_json::Value = r.json().await.unwrap();
        assert_eq!(sig["subject"]["digest"], artifact);
        assert_eq!(listed[0]["artifactType"], sig["config"]["mediaType"], "{index}");
        let r = c.get(s.url(&format!("/v2/oras/artifacts/referrers/{artifact}?artifactType=application/vnd.other"))).send().await.unwrap();
        let index: serde_json::Value = r.json().await.unwrap();
        assert_eq!(index["manifests"], json!([]), "filtered by artifactType");
    });
}

/// A root file system tar of two files (one of 2 MB), as `docker import` takes.
fn rootfs_tar(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello from berth\n").unwrap();
    std::fs::write(root.join("blob.bin"), bytes(42, 2_000_000)).unwrap();
    let tar = dir.join("rootfs.tar");
    run("tar", &["-C", root.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    tar
}

fn run(cmd: &str, args: &[&str]) -> String {
    run_in(cmd, args, &[], None)
}

fn run_in(cmd: &str, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut c = Command::new(cmd);
    c.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
