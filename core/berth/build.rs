//! Release builds on x86_64 Linux pack their relative relocations
//! (`-z pack-relative-relocs`, DT_RELR) when the C library they link against reads
//! them (glibc 2.36 and later): the position-independent binary's 1.8 MiB
//! relocation table, read in full by the dynamic loader at every start, shrinks to a
//! few KiB, and ASLR stays.

fn main() {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let release_linux = var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    // Native builds only: the binary then needs the C library it was linked on.
    if release_linux && var("HOST") == var("TARGET") && glibc_reads_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the build machine's glibc is 2.36 or later, the first to apply DT_RELR
/// relocations (a binary that has them refuses to start on an older one).
fn glibc_reads_relr() -> bool {
    // "glibc 2.36"
    let Ok(out) = std::process::Command::new("getconf").arg("GNU_LIBC_VERSION").output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text.split_whitespace().nth(1).unwrap_or("").split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    matches!((v.next(), v.next()), (Some(2), Some(minor)) if minor >= 36)
}
