//! Shared helpers of the end-to-end tests: the KVM gate and running the real `vmm` binary.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Whether KVM tests can run here. Returns false (after saying why) only when `/dev/kvm` does
/// not exist; with `VMM_REQUIRE_KVM=1` that is a failure instead. A `/dev/kvm` that exists but
/// cannot be opened is always a failure.
pub fn kvm_available() -> bool {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("/dev/kvm does not exist, and VMM_REQUIRE_KVM=1 forbids skipping KVM tests");
        }
        eprintln!("skipping: /dev/kvm does not exist (set VMM_REQUIRE_KVM=1 to fail instead)");
        return false;
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        panic!("/dev/kvm exists but cannot be opened: {e}");
    }
    true
}

/// Skips the calling test (returns from it) when KVM is unavailable; see [`kvm_available`].
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::support::kvm_available() {
            return;
        }
    };
}

/// The `vmm` binary under test.
pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.env_remove("VMM_KVM_DEV").env_remove("RUST_LOG");
    c
}

/// Runs `vmm` with `args`.
pub fn run(args: &[&str]) -> Output {
    vmm()
        .args(args)
        .output()
        .expect("cannot run the vmm binary")
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
