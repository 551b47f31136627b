//! Builds the guest init (boot/guest-init, package `tvix-boot-guest-init`) as a static
//! x86_64 binary and leaves it at `$OUT_DIR/tvix-boot-guest-init`, where
//! src/initrd.rs embeds it with `include_bytes!`: tvix-boot then needs no
//! init file installed next to it.
//!
//! The init is built by a nested `cargo build`, because Cargo (stable) cannot
//! express "this package's binary, for another target and with other
//! RUSTFLAGS, as a build input" (that is the unstable artifact-dependencies
//! feature). The nested build:
//! - uses its own `--target-dir` under OUT_DIR, so it never waits on the lock
//!   the outer build holds on its target dir;
//! - links statically (`+crt-static`, non-PIE) — the initrd has no libc to load;
//! - uses the `guest-init` profile (size-optimised, LTO, panic=abort; root
//!   Cargo.toml);
//! - runs `--locked` (it shares the workspace's Cargo.lock, which it must not
//!   rewrite under the outer build) and `--offline` when the outer build is
//!   offline (CARGO_NET_OFFLINE; tvix-boot depends on the init's library, so
//!   the outer build has already fetched everything the init needs);
//! - drops the outer build's compiler wrappers and flags (clippy's
//!   RUSTC_WORKSPACE_WRAPPER, RUSTFLAGS, ...), which are for tvix-boot, not
//!   for the guest.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const INIT_PACKAGE: &str = "tvix-boot-guest-init";
/// The guest is x86_64 whatever the host's default target is.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const PROFILE: &str = "guest-init";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("boot/ lives inside the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    // tvix-boot's own binaries, not the init: relative relocations packed (DT_RELR). A
    // position-independent tvix-boot has some 17,000 of them; as RELA entries they are
    // 400 KiB that the dynamic loader, or a static-pie's start code, reads at every
    // start, in time before `main` and in resident memory; packed, about 5 KiB. GNU ld
    // 2.38+ and glibc 2.36+ (at run time, for a dynamic build) know them.
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }

    for input in [
        "boot/guest-init/src",
        "boot/guest-init/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!(
            "cargo::rerun-if-changed={}",
            workspace.join(input).display()
        );
    }
    println!("cargo::rerun-if-env-changed=CARGO_NET_OFFLINE");

    let target_dir = out_dir.join("init-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&workspace)
        .arg("build")
        .args(["--package", INIT_PACKAGE, "--bin", INIT_PACKAGE])
        .args(["--profile", PROFILE, "--target", GUEST_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--locked");
    if env::var("CARGO_NET_OFFLINE").is_ok_and(|v| v == "true" || v == "1") {
        cmd.arg("--offline");
    }
    // The outer build's settings are for tvix-boot; the guest gets its own.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    // crt-static: the initrd has no libc to load. relocation-model=static: a
    // plain (non-PIE) static executable is ~40 KB smaller and skips
    // self-relocation at start; ASLR buys nothing in a throwaway guest's PID 1.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Ctarget-feature=+crt-static", "-Crelocation-model=static"].join("\x1f"),
    );
    // A build script's stdout is read as cargo directives; keep the nested
    // build's chatter on stderr.
    cmd.stdout(std::io::stderr());

    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run {} to build {INIT_PACKAGE}: {e}",
            Path::new(&cargo).display()
        )
    });
    if !status.success() {
        panic!(
            "building the guest init ({INIT_PACKAGE}, static, {GUEST_TARGET}) failed with {status}; \
             its output is above"
        );
    }

    let built = target_dir
        .join(GUEST_TARGET)
        .join(PROFILE)
        .join(INIT_PACKAGE);
    let dest = out_dir.join(INIT_PACKAGE);
    std::fs::copy(&built, &dest).unwrap_or_else(|e| {
        panic!(
            "cannot copy the built init {} to {}: {e}",
            built.display(),
            dest.display()
        )
    });
}
