//! Real clients against the real binary: skopeo (always) and the docker engine
//! (when `BERTH_TEST_DOCKER=1`, as `.ci/run` sets on machines with an engine).

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

fn image(layout: &Path, arch: &str, layers: usize, seed: u64) -> (String, usize) {
    let mut descs = vec![];
    for i in 0..layers {
        // Real gzip, so clients do not recompress (which would change digests).
        let (d, n) = put_blob(layout, &gzip(&bytes(seed * 100 + i as u64, 20_000 + i * 777)));
        descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}));
    }
    let diff_ids: Vec<_> = descs.iter().map(|d| d["digest"].clone()).collect();
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
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello from berth\n").unwrap();
    std::fs::write(root.join("blob.bin"), bytes(42, 2_000_000)).unwrap();
    let tar = dir.path().join("rootfs.tar");
    run("tar", &["-C", root.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
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
