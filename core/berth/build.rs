//! Release builds on x86_64 Linux (linked by lld, Rust's default there since 1.90) place the
//! code and data `berth serve` touches from start to idle together, so fewer pages
//! of the 40 MiB of code become resident: see `startup_order.py`, which writes the
//! list. `BERTH_NO_STARTUP_ORDER=1` links without it.
//!
//! The same builds pack their relative relocations (`-z pack-relative-relocs`, DT_RELR)
//! when the C library they link against reads them (glibc 2.36 and later): the
//! position-independent binary's 1.8 MiB relocation table, read in full by the
//! dynamic loader at every start, shrinks to a few KiB, and ASLR stays.

use std::io::Read;
use std::path::PathBuf;

fn main() {
    const LIST: &str = "startup-order.txt.gz";
    println!("cargo:rerun-if-changed={LIST}");
    println!("cargo:rerun-if-env-changed=BERTH_NO_STARTUP_ORDER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let release_linux = var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if !release_linux {
        return;
    }
    // Native builds only: the binary then needs the C library it was linked on.
    if var("HOST") == var("TARGET") && glibc_reads_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if var("BERTH_NO_STARTUP_ORDER") == "1" || !links_with_lld(&var("RUSTC")) {
        return;
    }
    let mut names = String::new();
    let read = std::fs::File::open(LIST).and_then(|f| flate2::read::GzDecoder::new(f).read_to_string(&mut names));
    if let Err(e) = read {
        println!("cargo:warning=startup order list not used: {e}");
        return;
    }
    let out = PathBuf::from(var("OUT_DIR")).join("startup-order.txt");
    std::fs::write(&out, names).expect("write the startup order list to OUT_DIR");
    println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", out.display());
    // Names from an older build that the linker no longer finds are skipped.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Whether the build machine's glibc is 2.36 or later, the first to apply DT_RELR
/// relocations (a binary that has them refuses to start on an older one).
fn glibc_reads_relr() -> bool {
    // "glibc 2.36"
    matches!(version_of("getconf", "GNU_LIBC_VERSION"), Some((2, minor)) if minor >= 36)
}

/// Whether rustc links x86_64 Linux binaries with its bundled lld by default
/// (Rust 1.90 and later); older toolchains use the system `ld`, which has no
/// `--symbol-ordering-file`.
fn links_with_lld(rustc: &str) -> bool {
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    matches!(version_of(if rustc.is_empty() { "rustc" } else { rustc }, "-V"), Some((1, minor)) if minor >= 90)
}

/// Major and minor version from the second word `program arg` prints, as in
/// "glibc 2.36" or "rustc 1.95.0 (…)"; `None` if it does not run.
fn version_of(program: &str, arg: &str) -> Option<(u32, u32)> {
    let out = std::process::Command::new(program).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text.split_whitespace().nth(1)?.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Some((v.next()?, v.next()?))
}
