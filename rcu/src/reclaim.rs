//! Deferred reclamation (`call_rcu`): retired objects wait in a FIFO queue and are freed in
//! batches after a grace period, by whichever thread drains the queue: the background thread,
//! a retiring thread that hit the backlog bound (back-pressure), a reader paying put-off
//! back-pressure at its quiescent state, or a `barrier()`/`reclaim()` caller. A callback's
//! panic is contained where it ran and counted: it never unwinds into the draining thread.
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicU64 as StatU64,
    Ordering::{Acquire, Relaxed, Release},
};

use crate::domain::Inner;
use crate::sync::{contain_panic, lock, Arc, AtomicBool, Condvar, Mutex};

type Deferred = Box<dyn FnOnce() + Send>;

/// The background thread starts a grace period once this many callbacks are queued (or half
/// of `max_backlog`, if smaller)...
#[cfg(not(loom))]
const BATCH_TARGET: usize = 1024;
/// ...or once the first of them has waited this long. Each batch wakes the thread twice (the
/// first callback, then the deadline), and on a host whose CPUs are all busy running vCPUs
/// every wake-up preempts one: at 1 ms, a writer retiring once a millisecond (churn at 1000
/// region updates/s) cost about 1,500 more context switches a second than at 10 ms (`perf stat
/// -e context-switches` on `vmm stress --churn 1000`). liburcu's `call_rcu` thread also waits
/// about 10 ms between batches. The backlog bound still caps what waits.
#[cfg(not(loom))]
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

#[cfg(not(loom))]
std::thread_local! {
    /// The domains (`Reclaim` addresses) whose deferred callbacks this thread is running,
    /// innermost last: a callback that retires more objects into, or drains, the same domain
    /// must not block on (or re-enter) its reclamation.
    static IN_RECLAIM: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}
#[cfg(loom)]
loom::thread_local! {
    static IN_RECLAIM: std::cell::RefCell<Vec<usize>> = std::cell::RefCell::new(Vec::new());
}

pub(crate) struct Reclaim {
    /// Retired callbacks, oldest first, the count ever pushed and how many of those were
    /// pushed by this domain's callbacks (under the same lock, so `barrier` reads exact
    /// targets).
    queue: Mutex<Queue>,
    /// Wakes the background thread.
    work: Condvar,
    /// Serialises draining so that callbacks run in FIFO order and `freed` counts a prefix.
    free_lock: Mutex<()>,
    shutdown: AtomicBool,
    freed: StatU64,
    stalls: StatU64,
    /// Callbacks that panicked (contained by `run`).
    panics: StatU64,
}

/// The reclamation counters, for `Stats`.
pub(crate) struct Counts {
    pub(crate) retired: u64,
    pub(crate) freed: u64,
    pub(crate) stalls: u64,
    pub(crate) panics: u64,
}

struct Queue {
    items: VecDeque<Deferred>,
    pushed: u64,
    /// Pushes made from inside one of this domain's callbacks, on its thread.
    nested: u64,
}

struct CountOnDrop<'a>(&'a StatU64, u64);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(self.1, Release);
    }
}

/// Marks this thread as running `Reclaim`'s callbacks (see `IN_RECLAIM`).
struct ReclaimScope;

impl ReclaimScope {
    fn enter(reclaim: &Reclaim) -> Self {
        IN_RECLAIM.with(|s| s.borrow_mut().push(reclaim.id()));
        ReclaimScope
    }
}

impl Drop for ReclaimScope {
    fn drop(&mut self) {
        IN_RECLAIM.with(|s| s.borrow_mut().pop());
    }
}

impl Reclaim {
    pub(crate) fn new() -> Self {
        Self {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                pushed: 0,
                nested: 0,
            }),
            work: Condvar::new(),
            free_lock: Mutex::new(()),
            shutdown: AtomicBool::new(false),
            freed: StatU64::new(0),
            stalls: StatU64::new(0),
            panics: StatU64::new(0),
        }
    }

    fn id(&self) -> usize {
        self as *const Self as usize
    }

    /// Whether the calling thread is running one of this domain's deferred callbacks.
    fn in_callback(&self) -> bool {
        let id = self.id();
        IN_RECLAIM.with(|s| s.borrow().contains(&id))
    }

    pub(crate) fn counts(&self) -> Counts {
        Counts {
            retired: lock(&self.queue).pushed,
            freed: self.freed.load(Relaxed),
            stalls: self.stalls.load(Relaxed),
            panics: self.panics.load(Relaxed),
        }
    }

    /// Runs one deferred callback, containing its panic: a callback runs on whichever thread
    /// drains the queue, which did not call it and must not unwind for it (a reader at its
    /// quiescent state, a writer under back-pressure, a `barrier()` caller). The panic hook
    /// has already reported the panic; it is counted, and the caller goes on with the batch.
    fn run(&self, f: Deferred) {
        if contain_panic(f) {
            self.panics.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn push(&self, inner: &Inner, f: Deferred) {
        let in_callback = self.in_callback();
        let len = {
            let mut q = lock(&self.queue);
            q.items.push_back(f);
            q.pushed += 1;
            q.nested += u64::from(in_callback);
            q.items.len()
        };
        if len >= inner.config.max_backlog
            && !in_callback
            && !inner.defer_backpressure_to_own_readers()
        {
            // Back-pressure: the retiring thread pays for the grace period itself. Not from a
            // callback (it would wait for its own batch); on a thread with an online reader
            // (whose grace period might wait for its guard), at that reader's next quiescent
            // state: see `Domain::defer`.
            self.apply_backpressure(inner);
        } else if len == 1 || len % 256 == 0 {
            self.work.notify_one();
        }
    }

    /// Back-pressure: if the backlog is (still) at the bound, waits for a grace period and
    /// runs the queued callbacks on the calling thread, which has no online reader of this
    /// domain.
    pub(crate) fn apply_backpressure(&self, inner: &Inner) {
        if lock(&self.queue).items.len() >= inner.config.max_backlog {
            self.stalls.fetch_add(1, Relaxed);
            self.drain(inner);
        }
    }

    /// Waits for a grace period and runs every callback queued before it began. Returns how
    /// many ran (0, doing nothing, when called from one of this domain's callbacks).
    ///
    /// # Panics
    ///
    /// If the calling thread has an online reader of this domain.
    pub(crate) fn drain(&self, inner: &Inner) -> usize {
        if self.in_callback() {
            // We hold `free_lock` further up this very stack.
            return 0;
        }
        // No reader of this thread is online: the holder of `free_lock`, waiting in a grace
        // period, cannot be waiting for us.
        inner.assert_no_online_reader_here("a grace-period wait (barrier, reclaim)");
        let _serial = lock(&self.free_lock);
        let n = lock(&self.queue).items.len();
        if n == 0 {
            return 0;
        }
        // Everything among the first `n` was unpublished before it was queued, and queued
        // before this grace period began.
        inner.synchronize();
        let batch: Vec<Deferred> = lock(&self.queue).items.drain(..n).collect();
        // Counted on every way out (callbacks' panics are contained by `run`; this covers
        // anything else), so `barrier` cannot wait forever. Release: `barrier` acquires it,
        // so a barrier that returns without draining itself still sees everything these
        // callbacks did.
        let _count = CountOnDrop(&self.freed, n as u64);
        let _scope = ReclaimScope::enter(self);
        for f in batch {
            self.run(f);
        }
        n
    }

    pub(crate) fn barrier(&self, inner: &Inner) {
        assert!(
            !self.in_callback(),
            "rcu: barrier() called from a deferred callback of the same domain would wait for \
             itself forever"
        );
        inner.assert_no_online_reader_here("Domain::barrier()");
        let (mut target, mut nested) = {
            let q = lock(&self.queue);
            (q.pushed, q.nested)
        };
        loop {
            // Acquire pairs with the release in `CountOnDrop`: the callbacks' effects are
            // visible, their pushes to the queue included.
            while self.freed.load(Acquire) < target {
                self.drain(inner);
            }
            // Every callback up to `target` has returned. If none of this domain's callbacks
            // queued anything since `nested` was read, nothing they queued is left to wait
            // for; otherwise wait for everything queued so far (what callbacks queued, and
            // whatever others queued meanwhile) and look again.
            let q = lock(&self.queue);
            if q.nested == nested {
                return;
            }
            (target, nested) = (q.pushed, q.nested);
        }
    }

    pub(crate) fn shut_down(&self) {
        self.shutdown
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _q = lock(&self.queue);
        self.work.notify_all();
    }

    #[cfg(not(loom))]
    pub(crate) fn spawn_thread(inner: &Arc<Inner>) -> Option<std::thread::JoinHandle<()>> {
        let inner = inner.clone();
        std::thread::Builder::new()
            .name("rcu-reclaim".into())
            .spawn(move || inner.reclaim.thread_main(&inner))
            .ok()
    }

    #[cfg(loom)]
    pub(crate) fn spawn_thread(_inner: &Arc<Inner>) -> Option<std::thread::JoinHandle<()>> {
        None
    }

    #[cfg(not(loom))]
    fn thread_main(&self, inner: &Inner) {
        use std::sync::atomic::Ordering::Relaxed as R;
        loop {
            {
                let mut q = lock(&self.queue);
                while q.items.is_empty() && !self.shutdown.load(R) {
                    q = self.work.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            }
            if self.shutdown.load(R) {
                return;
            }
            // Adaptive batching: let retirements accumulate so that one grace period serves a
            // batch, until the batch is big enough or the oldest item has waited long enough.
            // Each grace period costs every online reader two fences (and possibly a wake-up
            // of a parked waiter) and this thread a wait, so under a steady writer fewer,
            // larger batches are cheaper for everyone. Memory stays bounded: a retiring
            // thread applies back-pressure at `max_backlog` whatever we do here.
            let target = (inner.config.max_backlog / 2).clamp(1, BATCH_TARGET);
            let deadline = std::time::Instant::now() + BATCH_WAIT;
            {
                let mut q = lock(&self.queue);
                while q.items.len() < target && !self.shutdown.load(R) {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    q = self
                        .work
                        .wait_timeout(q, deadline - now)
                        .map(|(q, _)| q)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            }
            // Callbacks' panics are contained in `drain`; this keeps the thread alive whatever
            // else might unwind out of it.
            contain_panic(|| {
                self.drain(inner);
            });
            if inner.this_thread_has_an_online_reader() {
                // A callback registered a reader of this domain on this thread and left it
                // online. It never announces a quiescent state, so every grace period would
                // wait for it forever, and this thread could not wait for one again (it would
                // wait for itself). Stop: the thread's thread-locals, where such a reader
                // usually lives, drop with it.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "rcu: a deferred callback left a reader of its domain online on the \
                     background reclamation thread; the thread stops (reclamation goes on \
                     through back-pressure, barrier() and reclaim())"
                );
                return;
            }
        }
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        // The domain is going away: no reader can exist any more (readers keep the domain
        // alive), so everything still retired can run now.
        let q = std::mem::take(&mut lock(&self.queue).items);
        let _scope = ReclaimScope::enter(self);
        for f in q {
            self.run(f);
        }
    }
}
