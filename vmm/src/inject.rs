//! Test-only fault injection, and a record of the memslots installed in KVM.
//!
//! **Test-only.** With `VMM_FAULT_INJECT` set in the environment of `vmm run --api-sock`, the
//! control server enables fault injection when it starts (after the boot-time memory is
//! mapped) and accepts the `inject` op. The variable's value arms failures at once:
//! `step:N[,step:N...]` makes the `N`th call of `step` after start-up fail, where `step` is
//!
//! - `mmap`: mapping a run-time region's host memory,
//! - `uffd`: registering it with userfaultfd,
//! - `memslot`: installing a KVM memslot (a new region, a split piece, a protection change),
//! - `memslot-delete`: deleting a KVM memslot (unmap, split, protection change); the change is
//!   then undone,
//! - `uffd-unregister`: unregistering unmapped memory from userfaultfd (harmless: the release
//!   that follows drops the registration),
//! - `release`: giving unmapped memory back to the reservation (the pages are then discarded
//!   in place and the range made inaccessible).
//!
//! An empty value or `on` enables the `inject` op without arming anything. Without the
//! variable every hook is one relaxed load of a flag that is false.
//!
//! [`RecordingMemslots`] wraps the VM's memslots and records every successful install and
//! delete, so that the control server's `check` op can compare the address space with what
//! KVM was told (KVM has no call that lists memslots).
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::memory::Memslots;

/// A step that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Host `mmap` of a region.
    Mmap = 0,
    /// userfaultfd registration.
    Uffd = 1,
    /// Installing a KVM memslot.
    Memslot = 2,
    /// Deleting a KVM memslot (unmap, split, protect).
    MemslotDelete = 3,
    /// userfaultfd unregistration of unmapped memory.
    UffdUnregister = 4,
    /// Releasing unmapped host memory.
    Release = 5,
    /// Changing the host protection of a region in the hot-plug window (`protect`).
    Mprotect = 6,
}

impl Step {
    /// The name in `VMM_FAULT_INJECT` and the `inject` op.
    pub fn name(self) -> &'static str {
        match self {
            Step::Mmap => "mmap",
            Step::Uffd => "uffd",
            Step::Memslot => "memslot",
            Step::MemslotDelete => "memslot-delete",
            Step::UffdUnregister => "uffd-unregister",
            Step::Release => "release",
            Step::Mprotect => "mprotect",
        }
    }

    /// The step called `s`, if any.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "mmap" => Step::Mmap,
            "uffd" => Step::Uffd,
            "memslot" => Step::Memslot,
            "memslot-delete" => Step::MemslotDelete,
            "uffd-unregister" => Step::UffdUnregister,
            "release" => Step::Release,
            "mprotect" => Step::Mprotect,
            _ => return None,
        })
    }
}

/// Every step's name, for messages.
pub const STEP_NAMES: &str =
    "mmap, uffd, memslot, memslot-delete, uffd-unregister, release, mprotect";

/// The environment variable.
pub const ENV: &str = "VMM_FAULT_INJECT";

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Per step: 0 = not armed; n = the n-th next call fails.
static COUNTDOWN: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
static INJECTED: AtomicU64 = AtomicU64::new(0);

/// Parses a `VMM_FAULT_INJECT` value.
pub fn parse(spec: &str) -> Result<Vec<(Step, u64)>, String> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "on" {
        return Ok(Vec::new());
    }
    spec.split(',')
        .map(|part| {
            let (step, n) = part.split_once(':').unwrap_or((part, "1"));
            let step = Step::from_name(step.trim())
                .ok_or_else(|| format!("{ENV}: unknown step {step:?} (expected {})", STEP_NAMES))?;
            let n: u64 = n
                .trim()
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{ENV}: {part:?}: N must be a positive integer"))?;
            Ok((step, n))
        })
        .collect()
}

/// Enables injection if `VMM_FAULT_INJECT` is set (and arms what it says). Returns whether
/// injection is enabled.
pub fn enable_from_env() -> Result<bool, String> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(false);
    };
    for (step, n) in parse(&spec)? {
        arm(step, n);
    }
    ENABLED.store(true, Relaxed);
    tracing::warn!("{ENV} is set: test-only fault injection is enabled");
    Ok(true)
}

/// Makes the `nth` next call of `step` fail (0 disarms).
pub fn arm(step: Step, nth: u64) {
    COUNTDOWN[step as usize].store(nth, Relaxed);
}

/// Disarms every step.
pub fn disarm_all() {
    for c in &COUNTDOWN {
        c.store(0, Relaxed);
    }
}

/// Failures injected so far.
pub fn injected() -> u64 {
    INJECTED.load(Relaxed)
}

/// The hook: fails if `step` is armed and this is the call it was armed for.
#[inline]
pub fn hit(step: Step) -> io::Result<()> {
    if !ENABLED.load(Relaxed) {
        return Ok(());
    }
    let c = &COUNTDOWN[step as usize];
    let fire = c
        .fetch_update(Relaxed, Relaxed, |n| (n > 0).then(|| n - 1))
        .is_ok_and(|n| n == 1);
    if fire {
        INJECTED.fetch_add(1, Relaxed);
        tracing::warn!(step = step.name(), "injecting a failure ({ENV})");
        return Err(io::Error::other(format!(
            "injected failure of {} ({ENV})",
            step.name()
        )));
    }
    Ok(())
}

/// One memslot as KVM was told: (gpa, size, readonly).
pub type SlotRecord = (u64, u64, bool);

static KVM_SLOTS: Mutex<BTreeMap<u32, SlotRecord>> = Mutex::new(BTreeMap::new());

/// The memslots installed in KVM and not deleted, by slot (one VM per process).
pub fn kvm_slots() -> BTreeMap<u32, SlotRecord> {
    KVM_SLOTS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Memslots that record what they did (and fail when the `memslot` step is armed).
pub struct RecordingMemslots<M>(pub M);

impl<M: Memslots> Memslots for RecordingMemslots<M> {
    fn install(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        readonly: bool,
    ) -> io::Result<()> {
        hit(Step::Memslot)?;
        self.0.install(slot, gpa, size, host_addr, readonly)?;
        KVM_SLOTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot, (gpa, size, readonly));
        Ok(())
    }

    fn delete(&self, slot: u32, gpa: u64) -> io::Result<()> {
        self.0.delete(slot, gpa)?;
        KVM_SLOTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
        Ok(())
    }

    fn capacity(&self) -> u32 {
        self.0.capacity()
    }

    fn set_dirty_logging(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        on: bool,
    ) -> io::Result<()> {
        self.0.set_dirty_logging(slot, gpa, size, host_addr, on)
    }

    fn dirty_log(&self, slot: u32, size: u64) -> io::Result<Vec<u64>> {
        self.0.dirty_log(slot, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse(""), Ok(vec![]));
        assert_eq!(parse("on"), Ok(vec![]));
        assert_eq!(
            parse("mmap:2,memslot"),
            Ok(vec![(Step::Mmap, 2), (Step::Memslot, 1)])
        );
        assert!(parse("mmap:0").is_err());
        assert!(parse("disk:1").is_err());
    }
}
