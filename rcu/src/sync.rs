#![allow(unused_imports)] // the shim offers what the crate's modules may need
//! The synchronisation primitives the protocol uses, swapped for loom's under `--cfg loom` so
//! the model checker sees every atomic access, fence, lock and park of the grace-period protocol.
//!
//! Statistics counters do not go through this shim: they take no part in the protocol.
#![deny(unsafe_code)]

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(loom)]
pub(crate) use loom::thread;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::thread;

/// Locks `m`, ignoring poisoning: every structure behind these mutexes stays consistent across
/// a panic (each critical section either completes its update or changes nothing), so a panic
/// in one thread must not turn into panics in every other.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f`, containing a panic (already reported by the panic hook); returns whether it
/// panicked. A panic payload whose own drop panics is leaked rather than let escape.
///
/// For code that runs on a thread that did not call it and must not unwind for it (deferred
/// callbacks, stall hooks). `AssertUnwindSafe`: `f` is consumed, so nothing of it is seen
/// broken afterwards; whatever it shares with others is its owner's business, as with any
/// panic caught at a thread boundary.
pub(crate) fn contain_panic(f: impl FnOnce()) -> bool {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => false,
        Err(payload) => {
            if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(again);
            }
            true
        }
    }
}

/// A busy-wait hint (loom: a yield, so the model makes progress).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
