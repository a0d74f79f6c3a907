//! Real servers for Berth's tests, started by the tests themselves.
//!
//! [`Garage`] is a single-node Garage (a distributed S3-compatible store, not
//! ours): the binary `BERTH_TEST_GARAGE` names (`.ci/run` builds it with
//! `cargo install` into a cache outside the clone), its own data folder, a
//! layout, a bucket and a key made by its CLI. [`Garage::shared`] starts one per
//! test process, on first use; it stops, and its folder is removed, when the
//! process ends, however it ends.
//!
//! A test suite runs over S3 when `BERTH_TEST_STORAGE=s3`; [`s3_wanted`] says
//! so, and refuses to go on without a Garage binary (a suite asked to run over
//! S3 must not pass by running over the filesystem).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable naming the `garage` binary.
pub const ENV_GARAGE: &str = "BERTH_TEST_GARAGE";
/// The environment variable that puts a suite's stores on S3 (`s3`) instead of
/// the filesystem (unset or `fs`).
pub const ENV_STORAGE: &str = "BERTH_TEST_STORAGE";

/// The bucket every test store lives in (each under a prefix of its own).
pub const BUCKET: &str = "berth-tests";
/// Garage's region name.
pub const REGION: &str = "garage";
/// The access key imported into every test Garage (Garage's format: `GK` and 24
/// hex digits; the secret is 64 hex digits).
const KEY_ID: &str = "GK0123456789abcdef01234567";
const SECRET: &str = "6265727468207465737473206f6e206761726167652c2061207265616c205333";
const RPC_SECRET: &str = "4265727468277320746573747320737065616b20746f204761726167652e2e2e";

/// Whether the SurrealDB server on `127.0.0.1:port` answers `GET /ready` with
/// 200: started and able to serve. A TCP connect alone is not enough: the server
/// binds before its startup work is done when that is slow, and the port may
/// belong to another process.
pub fn surreal_ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 12];
    c.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n").is_ok()
        && c.read_exact(&mut head).is_ok()
        && head.starts_with(b"HTTP/1.")
        && &head[9..12] == b"200"
}

/// Whether this run puts stores on S3. Panics when S3 is asked for and no
/// Garage binary is named.
pub fn s3_wanted() -> bool {
    match std::env::var(ENV_STORAGE).as_deref() {
        Ok("s3") => {
            assert!(std::env::var_os(ENV_GARAGE).is_some(), "{ENV_STORAGE}=s3 needs {ENV_GARAGE} (the garage binary; .ci/run builds it)");
            true
        }
        Ok("fs") | Err(_) => false,
        Ok(other) => panic!("{ENV_STORAGE}={other:?}: expected s3 or fs"),
    }
}

/// A running Garage node with one bucket and one key allowed on it.
pub struct Garage {
    child: Child,
    dir: PathBuf,
    /// The S3 endpoint, `http://<address>:<port>` (`127.0.0.1` unless started with [`Garage::start_on`]).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl Garage {
    /// The Garage of this test process, started on first use, or `None` when no
    /// binary is named (the caller skips its S3 case, saying so).
    pub fn shared() -> Option<&'static Garage> {
        static SHARED: OnceLock<Option<Garage>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let bin = std::env::var_os(ENV_GARAGE)?;
                let dir = std::env::temp_dir().join(format!("berth-garage-{}", std::process::id()));
                let g = Garage::start(Path::new(&bin), &dir);
                g.reap_with_this_process();
                Some(g)
            })
            .as_ref()
    }

    /// Start a node in `dir` (made, and owned from now on) and give it a layout,
    /// the bucket [`BUCKET`] and a key allowed to read and write it.
    pub fn start(bin: &Path, dir: &Path) -> Garage {
        Garage::start_on(bin, dir, "127.0.0.1")
    }

    /// [`Garage::start`], its S3 API on the address `ip` (for clients in other
    /// network namespaces; its own RPC and admin stay on loopback).
    pub fn start_on(bin: &Path, dir: &Path, ip: &str) -> Garage {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("garage folder");
        let [s3, rpc, admin] = free_ports();
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
                 compression_level = \"none\"\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{RPC_SECRET}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"{ip}:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.display()
            ),
        )
        .expect("garage config");
        let log = std::fs::File::create(dir.join("garage.log")).expect("garage log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("garage log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting garage ({}): {e}", bin.display()));
        let g = Garage {
            child,
            dir: dir.to_path_buf(),
            endpoint: format!("http://{ip}:{s3}"),
            bucket: BUCKET.into(),
            region: REGION.into(),
            access_key_id: KEY_ID.into(),
            secret_access_key: SECRET.into(),
        };
        let cli = |args: &[&str]| -> String {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = Command::new(bin).arg("-c").arg(&config).args(args).stdin(Stdio::null()).output().expect("garage cli");
                if out.status.success() {
                    return String::from_utf8_lossy(&out.stdout).into_owned();
                }
                // The node may not answer yet, or the layout may not have reached it.
                assert!(
                    Instant::now() < deadline,
                    "garage {}: {}\n{}\nnode log:\n{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(dir.join("garage.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let id = cli(&["node", "id", "-q"]);
        let id = id.trim().split('@').next().expect("node id").to_string();
        cli(&["layout", "assign", "-z", "dc1", "-c", "10G", &id]);
        cli(&["layout", "apply", "--version", "1"]);
        cli(&["bucket", "create", BUCKET]);
        cli(&["key", "import", "-n", "berth-tests", "--yes", KEY_ID, SECRET]);
        cli(&["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", KEY_ID]);
        g
    }

    /// Stop the node answering (SIGSTOP): the kernel still accepts connections
    /// and takes requests, and no answer comes, as from a stalled store.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Let a paused node run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{name} garage: {status}");
    }

    /// The folder holding the node's data, metadata, configuration and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kill the node and remove its folder once this process is gone (a static
    /// is never dropped): a shell, detached, waits on this process's pid.
    pub fn reap_with_this_process(&self) {
        let script = format!(
            "(while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {node} 2>/dev/null; sleep 0.2; rm -rf '{dir}') >/dev/null 2>&1 &",
            me = std::process::id(),
            node = self.child.id(),
            dir = self.dir.display()
        );
        let started = Command::new("sh").args(["-c", &script]).stdin(Stdio::null()).status().expect("garage reaper");
        assert!(started.success(), "garage reaper: {started}");
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A prefix no other store in this bucket uses, derived from `seed` (such as a
/// data folder's path), so a restarted server finds its own blobs.
pub fn prefix_for(seed: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    std::process::id().hash(&mut h);
    format!("t{:016x}", h.finish())
}

/// Ports free now, distinct (all bound at once, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<_> = (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    std::array::from_fn(|i| held[i].local_addr().expect("its address").port())
}
