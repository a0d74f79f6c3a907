//! HTTPS on the main listener (`[tls]`): certificates made by openssl for the
//! test, checked by every client (reqwest, curl, skopeo); HTTP/2 and HTTP/1.1;
//! the token realm on https; a renewed certificate served without a restart;
//! bad files refused at start with the file named.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl must be installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A certificate authority in `dir/<name>-ca.{crt,key}`; returns the
/// certificate's path.
fn authority(dir: &Path, name: &str) -> PathBuf {
    let subject = format!("/CN=Berth test CA {name}");
    let (crt, key) = (format!("{name}-ca.crt"), format!("{name}-ca.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            &key,
            "-out",
            &crt,
        ],
    );
    dir.join(crt)
}

/// A server certificate for 127.0.0.1 and localhost issued by `ca`, in
/// `dir/<name>.{crt,key}`; returns (certificate, key).
fn issue(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    let (crt, key, csr, ext) = (format!("{name}.crt"), format!("{name}.key"), format!("{name}.csr"), format!("{name}.ext"));
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    let (ca_crt, ca_key) = (format!("{ca}-ca.crt"), format!("{ca}-ca.key"));
    // Serials of their own (tests issue from one authority at once).
    let serial = format!("0x{}", &sha256(format!("{name} {:?}", Instant::now()).as_bytes())[7..23]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
    (dir.join(crt), dir.join(key))
}

/// This test binary's authority, trusted by the harness's clients.
struct Pki {
    _dir: TempDir,
    ca: PathBuf,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = TempDir::new("pki");
        let ca = authority(dir.path(), "one");
        trust(&std::fs::read(&ca).unwrap());
        Pki { _dir: dir, ca }
    })
}

/// A server with TLS: its certificate files are copied into `dir` (so a test
/// may replace them).
fn tls_server(dir: &TempDir) -> (Server, PathBuf, PathBuf) {
    let pki = pki();
    let (crt, key) = issue(pki.ca.parent().unwrap(), "one", &format!("server-{}", dir.path().file_name().unwrap().to_str().unwrap()));
    let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(crt, &c).unwrap();
    std::fs::copy(key, &k).unwrap();
    let env = [("BERTH_TLS_CERTIFICATE", c.to_str().unwrap()), ("BERTH_TLS_KEY", k.to_str().unwrap())];
    let s = Server::start_in(&dir.path().join("data"), &env);
    assert!(s.base.starts_with("https://"), "{}", s.base);
    (s, c, k)
}

#[test]
fn https_serves_the_registry_over_http2_and_http11_with_an_https_realm() {
    let dir = TempDir::new("https");
    let (s, _, _) = tls_server(&dir);
    let token = block_on(tenant_user_token(&s, "tls", "tina", "developer"));
    block_on(async {
        // HTTP/2 by ALPN; the challenge's realm is this listener's https URL.
        let r = anon_client().get(s.url("/v2/")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
        assert!(challenge.contains(&format!("realm=\"https://{}/auth/token\"", s.addr)), "{challenge}");
        // The docker token flow over it, then a push and a pull.
        let c = client_as("tina", &token);
        let digest = push_image(&c, &s, "tls/app", "v1", 5, serde_json::json!({})).await;
        let r = c.get(s.url("/v2/tls/app/manifests/v1")).header("Accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
        // HTTP/1.1 as well.
        let old = reqwest::Client::builder()
            .http1_only()
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&pki().ca).unwrap()).unwrap())
            .build()
            .unwrap();
        let r = old.get(s.url("/v2/")).send().await.unwrap();
        assert_eq!((r.status().as_u16(), r.version()), (401, reqwest::Version::HTTP_11));
        // Plain HTTP to the TLS port gets no answer, and the listener goes on.
        assert!(anon_client().get(format!("http://{}/v2/", s.addr)).send().await.is_err());
        assert_eq!(anon_client().get(s.url("/healthz")).send().await.unwrap().status(), 200);
    });

    // curl over HTTP/2 (the host comes in :authority, not Host): the same realm.
    let out = Command::new("curl")
        .args(["-sS", "--http2", "-o", "/dev/null", "-D", "-", "--cacert", pki().ca.to_str().unwrap(), &s.url("/v2/")])
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.starts_with("http/2 401"), "{head}");
    assert!(head.contains(&format!("realm=\"https://{}/auth/token\"", s.addr)), "{head}");

    // skopeo, verifying the certificate against the test's authority: a pull
    // of what was pushed and a push of it under another tag.
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&pki().ca, certs.join("ca.crt")).unwrap();
    let creds = format!("tina:{token}");
    let layout = dir.path().join("layout");
    let skopeo = |args: &[&str]| {
        let out = Command::new("skopeo").args(args).output().expect("skopeo");
        assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (from, to) = (format!("docker://{}/tls/app:v1", s.addr), format!("docker://{}/tls/app:copy", s.addr));
    let cert_dir = certs.to_str().unwrap();
    skopeo(&["copy", "--src-cert-dir", cert_dir, "--src-creds", &creds, &from, &format!("oci:{}:v1", layout.display())]);
    skopeo(&["copy", "--dest-cert-dir", cert_dir, "--dest-creds", &creds, &format!("oci:{}:v1", layout.display()), &to]);
    block_on(async {
        let tags: serde_json::Value = client().get(s.url("/v2/tls/app/tags/list")).send().await.unwrap().json().await.unwrap();
        assert_eq!(tags["tags"], serde_json::json!(["copy", "v1"]));
    });
    // Without the authority skopeo refuses the certificate.
    let out = Command::new("skopeo").args(["inspect", "--creds", &creds, &from]).output().unwrap();
    assert!(!out.status.success(), "skopeo must not accept a certificate it cannot verify");

    // The admin CLI: the system's authorities, or the one SSL_CERT_FILE names.
    let cli = |ca: Option<&Path>| {
        let mut berth = berth_command();
        berth.env_remove("SSL_CERT_FILE");
        if let Some(ca) = ca {
            berth.env("SSL_CERT_FILE", ca);
        }
        berth.args(["repo", "list"]).env("BERTH_SERVER", &s.base).env("BERTH_USER", "admin").env("BERTH_PASSWORD", ADMIN_PASSWORD);
        berth.env("BERTH_CREDENTIALS", dir.path().join("none.json")).output().unwrap()
    };
    let out = cli(Some(&pki().ca));
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("tls/app"), "{out:?}");
    assert!(!cli(None).status.success(), "the CLI must not accept a certificate it cannot verify");
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let dir = TempDir::new("renew");
    let (s, crt, key) = tls_server(&dir);
    // A new authority and a certificate from it, written the way renewals are:
    // beside the old files, then renamed over them.
    let ca_two = authority(dir.path(), "two");
    let (new_crt, new_key) = issue(dir.path(), "two", "renewed");
    let trusting = |ca: &Path| {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
            .build()
            .unwrap()
    };
    let (old_ca, new_ca) = (trusting(&pki().ca), trusting(&ca_two));
    block_on(async {
        assert_eq!(old_ca.get(s.url("/healthz")).send().await.unwrap().status(), 200);
        assert!(new_ca.get(s.url("/healthz")).send().await.is_err(), "not yet the new authority's");
    });
    std::fs::copy(&new_key, dir.path().join("next.key")).unwrap();
    std::fs::copy(&new_crt, dir.path().join("next.crt")).unwrap();
    std::fs::rename(dir.path().join("next.key"), &key).unwrap();
    std::fs::rename(dir.path().join("next.crt"), &crt).unwrap();
    block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while new_ca.get(s.url("/healthz")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the renewed certificate was not served within 60 s");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // New connections get the new certificate.
        assert!(trusting(&pki().ca).get(s.url("/healthz")).send().await.is_err(), "the old certificate is gone");
    });

    // A certificate whose key is another's: logged, and the one in use stays.
    let (_, other_key) = issue(dir.path(), "two", "other");
    std::fs::copy(&other_key, dir.path().join("next.key")).unwrap();
    std::fs::rename(dir.path().join("next.key"), &key).unwrap();
    std::thread::sleep(Duration::from_secs(12)); // two looks at the files and more
    block_on(async {
        let r = trusting(&ca_two).get(s.url("/healthz")).send().await;
        assert_eq!(r.expect("still served with the renewed certificate").status(), 200);
    });
}

#[test]
fn bad_certificate_files_stop_the_start_with_the_file_named() {
    let dir = TempDir::new("badtls");
    let pki = pki();
    let (crt, _) = issue(pki.ca.parent().unwrap(), "one", "bad-a");
    let (_, other_key) = issue(pki.ca.parent().unwrap(), "one", "bad-b");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let start = |c: &Path, k: &Path| {
        let out = berth_command()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("BERTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("BERTH_TLS_CERTIFICATE", c)
            .env("BERTH_TLS_KEY", k)
            .output()
            .unwrap();
        assert!(!out.status.success(), "berth started with {c:?} and {k:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = start(&missing, &other_key);
    assert!(err.contains("TLS certificate") && err.contains("missing.pem"), "{err}");
    let err = start(&garbage, &other_key);
    assert!(err.contains("no CERTIFICATE") && err.contains("garbage.pem"), "{err}");
    let err = start(&crt, &garbage);
    assert!(err.contains("TLS key") && err.contains("garbage.pem"), "{err}");
    let err = start(&crt, &other_key);
    assert!(err.contains("TLS key") && err.contains("bad-b.key"), "a key that is not the certificate's: {err}");
}
