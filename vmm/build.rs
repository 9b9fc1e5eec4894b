//! Builds the freestanding guest (`../guest`) with a nested cargo and its own target directory,
//! and leaves it at `$OUT_DIR/guest.elf` for `include_bytes!`.
//!
//! The guest is built for the host target (the only one installed) as a static, position-
//! dependent ELF with no start files and no libc, linked by `guest/linker.ld` at 1 MiB.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf();
    let guest_dir = root.join("guest");
    let abi_dir = root.join("abi");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("guest-target");
    let linker_script = guest_dir.join("linker.ld");

    for p in [
        guest_dir.join("src"),
        guest_dir.join("Cargo.toml"),
        guest_dir.join("Cargo.lock"),
        linker_script.clone(),
        abi_dir.join("src"),
        abi_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let flags = [
        "-Crelocation-model=static".to_string(),
        "-Ctarget-feature=+crt-static".to_string(),
        "-Cpanic=abort".to_string(),
        "-Clink-arg=-nostartfiles".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static".to_string(),
        format!("-Clink-arg=-Wl,-T,{}", linker_script.display()),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        "-Clink-arg=-Wl,-z,max-page-size=4096".to_string(),
        "-Clink-arg=-Wl,--gc-sections".to_string(),
    ];

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    // Inherited settings meant for the outer build (clippy's wrapper, `--cfg loom`, a shared
    // target directory, cross-compilation settings) break or pollute the guest build.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("DEP_")
        {
            cmd.env_remove(key);
        }
    }
    for key in [
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_CRATE_NAME",
        "CARGO_MAKEFLAGS",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "RUSTC_LINKER",
    ] {
        cmd.env_remove(key);
    }

    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the guest: {e}"));
    assert!(status.success(), "building the guest failed: {status}");

    let built = target_dir.join("release").join("guest");
    let dest = out_dir.join("guest.elf");
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), dest.display()));
}
