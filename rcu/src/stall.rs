//! Stall warnings: what a grace period that waits too long reports, and to whom.

use std::time::Duration;

/// A registered reader as a stall warning names it: the thread it was registered on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StalledReader {
    /// The thread's name, if it has one (`std::thread::Builder::name`).
    pub thread_name: Option<String>,
    /// The thread's Rust id.
    pub thread_id: std::thread::ThreadId,
    /// The thread's kernel id (`gettid`), as `top -H`, `ps -L` and debuggers show it.
    pub tid: i32,
}

impl StalledReader {
    /// The calling thread.
    pub(crate) fn current() -> Self {
        let thread = std::thread::current();
        Self {
            thread_name: thread.name().map(String::from),
            thread_id: thread.id(),
            // SAFETY: `gettid` has no preconditions and cannot fail.
            tid: unsafe { libc::gettid() },
        }
    }
}

impl std::fmt::Display for StalledReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.thread_name {
            Some(name) => write!(f, "thread {name:?}")?,
            None => f.write_str("unnamed thread")?,
        }
        write!(f, " ({:?}, tid {})", self.thread_id, self.tid)
    }
}

/// A stall warning: a grace period has waited longer than
/// [`Config::stall_timeout`](crate::Config::stall_timeout) for readers that stay online
/// without announcing a quiescent state. Issued once per grace period, to the hook set with
/// [`Domain::set_stall_hook`](crate::Domain::set_stall_hook) (by default, a line on stderr);
/// its `Display` is that line.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StallReport {
    /// How long the grace period had been waiting.
    pub waited: Duration,
    /// The readers it was still waiting for, in registration order (at least one).
    pub readers: Vec<StalledReader>,
}

impl std::fmt::Display for StallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rcu: grace period stalled for {:.3?}, waiting for {} reader(s) online without a \
             quiescent state: ",
            self.waited,
            self.readers.len()
        )?;
        for (i, r) in self.readers.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Where stall warnings go.
pub(crate) type StallHook = dyn Fn(&StallReport) + Send + Sync;
