//! How the VMM's companion threads are scheduled beside its vCPUs (`--control-sched`).
//!
//! The control socket's threads and `vmm stress`'s churn thread sleep most of the time and wake
//! for short bursts: a request, a churn operation, a grace period that ends. Under the normal
//! policy each wake-up preempts the vCPU running on that CPU at once. On a host with as many
//! busy vCPUs as CPUs, that is a guest exit, a context switch and a re-entry for every burst,
//! and a vCPU preempted inside its fault path holds up the grace period its preemptor then
//! waits for. `SCHED_BATCH` keeps the thread's fair share of CPU time but drops the wake-up
//! preemption: the thread runs when the scheduler next picks it (by the next tick at most), so
//! its bursts come together and the vCPUs keep their CPUs in between. It needs no privilege.
//!
//! It is not the default because it is not a win everywhere. Measured in `vmm stress` with 2
//! vCPUs on 2 CPUs (docs/bench.md, "Companion threads that do not preempt the vCPUs"), it
//! helps where vCPUs exit rarely (the adaptive fault-around window) and hurts where they exit
//! for every page: there a vCPU is often inside its fault path, in a read-side critical
//! section, when the batch thread finally takes its CPU, and the grace period that thread
//! then starts waits for the very vCPU it displaced.
//!
//! The one `unsafe` block (the `sched_setscheduler` call) lives here.
#![allow(unsafe_code)]

use std::io;

/// The scheduling policy of the VMM's companion threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControlSched {
    /// `SCHED_BATCH`: no wake-up preemption of the vCPUs.
    Batch,
    /// The policy the thread was started with (normally `SCHED_OTHER`; the default).
    #[default]
    Normal,
}

impl ControlSched {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ControlSched::Batch => "batch",
            ControlSched::Normal => "normal",
        }
    }

    /// Gives the calling thread this policy (threads it starts afterwards inherit it).
    /// `Normal` leaves the thread as it is.
    pub fn apply_to_current_thread(self) -> io::Result<()> {
        match self {
            ControlSched::Batch => set_policy(libc::SCHED_BATCH),
            ControlSched::Normal => Ok(()),
        }
    }
}

/// The calling thread's scheduling policy (`libc::SCHED_*`).
pub fn current_policy() -> io::Result<i32> {
    // SAFETY: `sched_getscheduler` takes a thread id (0: the caller) and touches no memory.
    let r = unsafe { libc::sched_getscheduler(0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_policy(policy: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid `sched_param` that outlives the call, which only reads it;
    // thread id 0 is the calling thread. Priority 0 is the only one the non-real-time policies
    // take.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_set_on_the_calling_thread_only_and_normal_changes_nothing() {
        let before = current_policy().unwrap();
        let (batch, normal) = std::thread::spawn(|| {
            ControlSched::Batch.apply_to_current_thread().unwrap();
            let batch = current_policy().unwrap();
            // A thread started by a batch thread inherits the policy.
            let child = std::thread::spawn(|| current_policy().unwrap())
                .join()
                .unwrap();
            assert_eq!(child, libc::SCHED_BATCH);
            (batch, child)
        })
        .join()
        .unwrap();
        assert_eq!(batch, libc::SCHED_BATCH);
        assert_eq!(normal, libc::SCHED_BATCH);
        // The spawning thread kept its own.
        assert_eq!(current_policy().unwrap(), before);
        let other = std::thread::spawn(|| {
            ControlSched::Normal.apply_to_current_thread().unwrap();
            current_policy().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(other, before);
    }
}
