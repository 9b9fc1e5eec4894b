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
//! It is not a win everywhere. Measured in `vmm stress` with 2 vCPUs on 2 CPUs (docs/bench.md,
//! "Companion threads that do not preempt the vCPUs"), it helps where vCPUs exit rarely (the
//! adaptive fault-around window) and hurts where they exit for every page: there a vCPU is
//! often inside its fault path, in a read-side critical section, when the batch thread finally
//! takes its CPU, and the grace period that thread then starts waits for the very vCPU it
//! displaced. So the default, [`ControlSched::Auto`], chooses by the vCPUs' exit rate
//! ([`tick`]), and its price is the tail of an operation's latency.
//!
//! The one `unsafe` block (the `sched_setscheduler` call) lives here.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

/// The scheduling policy of the VMM's companion threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControlSched {
    /// `SCHED_BATCH`: no wake-up preemption of the vCPUs.
    Batch,
    /// The policy the thread was started with (normally `SCHED_OTHER`).
    Normal,
    /// `SCHED_BATCH` while the vCPUs exit fewer than [`AUTO_BATCH_BELOW`] times a second each,
    /// `SCHED_OTHER` otherwise, decided again at each [`tick`] at most every [`AUTO_PERIOD`]
    /// (the default).
    #[default]
    Auto,
}

/// `auto`: exits per second per vCPU below which companion threads run as `SCHED_BATCH`. With
/// the adaptive fault-around window a vCPU under a fault storm exits about 800 times a second
/// here, at one page per exit about 20,000 times.
pub const AUTO_BATCH_BELOW: f64 = 4000.0;

/// `auto`: the shortest span over which the exit rate is measured.
pub const AUTO_PERIOD: Duration = Duration::from_millis(10);

/// What `auto` last decided on this thread: since when it counts, the VM's exits then, and
/// whether the thread runs as batch.
#[derive(Clone, Copy)]
struct AutoState {
    since: Instant,
    exits: u64,
    batch: bool,
}

thread_local! {
    static AUTO: Cell<Option<AutoState>> = const { Cell::new(None) };
}

/// A companion thread's check-in under `mode` before a burst of work (a churn operation, a
/// control request): with [`ControlSched::Auto`], it measures the vCPUs' exit rate since the
/// last check-in (`exits`: the VM's exits so far, over `vcpus` vCPUs) and switches the calling
/// thread between `SCHED_BATCH` and `SCHED_OTHER` when the rate crosses
/// [`AUTO_BATCH_BELOW`]. Costs a clock read unless it switches (one system call). Returns
/// whether the thread now runs as batch under `auto` (`None` for the other modes).
pub fn tick(mode: ControlSched, exits: u64, vcpus: u32) -> Option<bool> {
    if mode != ControlSched::Auto {
        return None;
    }
    let now = Instant::now();
    AUTO.with(|a| {
        let Some(s) = a.get() else {
            // The first check-in: the thread starts as it is (normal) and counts from here.
            a.set(Some(AutoState {
                since: now,
                exits,
                batch: false,
            }));
            return Some(false);
        };
        let span = now.saturating_duration_since(s.since);
        if span < AUTO_PERIOD {
            return Some(s.batch);
        }
        let per_vcpu =
            exits.saturating_sub(s.exits) as f64 / span.as_secs_f64() / f64::from(vcpus.max(1));
        let batch = per_vcpu < AUTO_BATCH_BELOW;
        if batch != s.batch {
            let policy = if batch {
                libc::SCHED_BATCH
            } else {
                libc::SCHED_OTHER
            };
            if let Err(e) = set_policy(policy) {
                tracing::debug!(error = %e, "--control-sched auto: cannot switch policy");
                return Some(s.batch);
            }
        }
        a.set(Some(AutoState {
            since: now,
            exits,
            batch,
        }));
        Some(batch)
    })
}

impl ControlSched {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ControlSched::Batch => "batch",
            ControlSched::Normal => "normal",
            ControlSched::Auto => "auto",
        }
    }

    /// Gives the calling thread this policy (threads it starts afterwards inherit it).
    /// `Normal` leaves the thread as it is, and so does `Auto` until its first switch
    /// ([`tick`]).
    pub fn apply_to_current_thread(self) -> io::Result<()> {
        match self {
            ControlSched::Batch => set_policy(libc::SCHED_BATCH),
            ControlSched::Normal | ControlSched::Auto => Ok(()),
        }
    }
}

/// How long the calling thread has run on a CPU and waited for one since it started, in ns,
/// from `/proc/thread-self/schedstat`; `None` where the kernel does not report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ThreadTimes {
    /// Time on a CPU.
    pub cpu_ns: u64,
    /// Time runnable but waiting for a CPU.
    pub wait_ns: u64,
}

impl ThreadTimes {
    /// The calling thread's times so far.
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
    }

    /// Parses a `schedstat` line: time on a CPU, time waiting, time slices.
    fn parse(line: &str) -> Option<Self> {
        let mut f = line.split_ascii_whitespace().map(str::parse::<u64>);
        Some(ThreadTimes {
            cpu_ns: f.next()?.ok()?,
            wait_ns: f.next()?.ok()?,
        })
    }

    /// What was spent from `earlier` to `self`.
    fn since(self, earlier: ThreadTimes) -> ThreadTimes {
        ThreadTimes {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
        }
    }

    /// What the calling thread has spent since it read `self` ([`now`](Self::now)).
    pub fn elapsed(self) -> Option<ThreadTimes> {
        Some(Self::now()?.since(self))
    }

    /// Adds `self` to a sum kept as two fields, as reports carry it (`None`: nothing yet).
    pub fn add_to(self, cpu_ns: &mut Option<u64>, wait_ns: &mut Option<u64>) {
        *cpu_ns.get_or_insert(0) += self.cpu_ns;
        *wait_ns.get_or_insert(0) += self.wait_ns;
    }
}

impl std::ops::AddAssign for ThreadTimes {
    fn add_assign(&mut self, o: ThreadTimes) {
        self.cpu_ns += o.cpu_ns;
        self.wait_ns += o.wait_ns;
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
        let (batch, child) = std::thread::spawn(|| {
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
        assert_eq!(child, libc::SCHED_BATCH);
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

    #[test]
    fn thread_times_count_this_threads_cpu_time_only() {
        assert_eq!(
            ThreadTimes::parse("404025073 729929 48\n"),
            Some(ThreadTimes {
                cpu_ns: 404_025_073,
                wait_ns: 729_929
            })
        );
        assert_eq!(ThreadTimes::parse("12"), None);
        assert_eq!(ThreadTimes::parse("x 1 2"), None);
        let Some(t0) = ThreadTimes::now() else {
            eprintln!("skipped: this kernel does not report /proc/thread-self/schedstat");
            return;
        };
        // Another thread busy for 100 ms is not this thread's time.
        std::thread::spawn(|| {
            let t = std::time::Instant::now();
            while t.elapsed() < Duration::from_millis(100) {
                std::hint::spin_loop();
            }
        })
        .join()
        .unwrap();
        let idle = ThreadTimes::now().unwrap().since(t0);
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(100) {
            std::hint::spin_loop();
        }
        let busy = ThreadTimes::now().unwrap().since(t0);
        assert!(idle.cpu_ns < 50_000_000, "{idle:?}");
        // 100 ms of wall time spinning is on a CPU or waiting for one.
        assert!(
            busy.cpu_ns + busy.wait_ns >= 90_000_000 && busy.cpu_ns > idle.cpu_ns,
            "{busy:?}"
        );
    }

    #[test]
    fn auto_switches_by_the_exit_rate_and_the_others_never_do() {
        std::thread::spawn(|| {
            let policy = || current_policy().unwrap();
            let before = policy();
            assert_eq!(tick(ControlSched::Normal, 0, 2), None);
            assert_eq!(tick(ControlSched::Batch, 0, 2), None);
            // First check-in: as it is.
            assert_eq!(tick(ControlSched::Auto, 0, 2), Some(false));
            assert_eq!(policy(), before);
            // 2 vCPUs, 10 exits in over 10 ms: far below the threshold.
            std::thread::sleep(AUTO_PERIOD + Duration::from_millis(2));
            assert_eq!(tick(ControlSched::Auto, 10, 2), Some(true));
            assert_eq!(policy(), libc::SCHED_BATCH);
            // Within the period nothing is measured.
            assert_eq!(tick(ControlSched::Auto, 1_000_000, 2), Some(true));
            // A million exits in about 12 ms: far above.
            std::thread::sleep(AUTO_PERIOD + Duration::from_millis(2));
            assert_eq!(tick(ControlSched::Auto, 2_000_000, 2), Some(false));
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
