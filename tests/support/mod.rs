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

/// Free 2 MiB huge pages on the host (0 if the kernel has none configured).
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether `need` free huge pages are there for a hugetlb test. Returns false (after saying
/// why) when they are not; with `VMM_REQUIRE_HUGETLB` set (as `.ci/run` does, after reserving
/// them) that is a failure instead.
pub fn hugetlb_available(need: u64) -> bool {
    let free = free_hugepages();
    if free >= need {
        return true;
    }
    let why = format!(
        "{free} free 2 MiB huge pages, {need} needed (echo 16 > /proc/sys/vm/nr_hugepages)"
    );
    assert!(
        std::env::var_os("VMM_REQUIRE_HUGETLB").is_none(),
        "VMM_REQUIRE_HUGETLB is set but the test cannot run: {why}"
    );
    eprintln!("skipped: {why}");
    false
}

/// Skips the calling test (returns from it) unless `$need` huge pages are free; see
/// [`hugetlb_available`].
#[macro_export]
macro_rules! require_hugetlb {
    ($need:expr) => {
        if !$crate::support::hugetlb_available($need) {
            return;
        }
    };
}
