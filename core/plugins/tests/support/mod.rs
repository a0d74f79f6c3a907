//! Builds the components in `plugins/` (the real plugins and the test
//! fixtures) for wasm32-wasip2, once per test process, and installs them into
//! plugin directories the way an operator would: `plugin.toml` beside the
//! component, pinned by its sha256. Shared by the host's tests and the server's.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The repository's root.
fn root() -> PathBuf {
    let mut p = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !(p.join("plugins/Cargo.toml").is_file() && p.join("sdk/wit").is_dir()) {
        assert!(p.pop(), "no plugins/Cargo.toml above {}", env!("CARGO_MANIFEST_DIR"));
    }
    p
}

/// The directory holding `<crate>.wasm` for every crate of `plugins/`.
pub fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("wasm-plugins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(root().join("plugins/Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .output()
            .expect("running cargo to build plugins/");
        assert!(
            out.status.success(),
            "building plugins/ for wasm32-wasip2 failed (rustup target add wasm32-wasip2):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("wasm32-wasip2/release")
    })
}

/// Install `crate_name`'s component into `plugins_dir/<name>/` with a
/// `plugin.toml` made of `name`, `extra` (hooks, capabilities, config, limits)
/// and the component's real sha256. Answers the module's directory.
pub fn install(plugins_dir: &Path, crate_name: &str, name: &str, extra: &str) -> PathBuf {
    let wasm = std::fs::read(built().join(format!("{crate_name}.wasm"))).unwrap();
    let dir = plugins_dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plugin.wasm"), &wasm).unwrap();
    let sha = hex::encode(Sha256::digest(&wasm));
    std::fs::write(
        dir.join("plugin.toml"),
        format!("name = \"{name}\"\nversion = \"0.1.0\"\nfile = \"plugin.wasm\"\nsha256 = \"{sha}\"\n{extra}"),
    )
    .unwrap();
    dir
}
