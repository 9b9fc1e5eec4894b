//! RCU domains: the grace-period state shared by a set of readers and writers.
//!
//! The protocol is liburcu's QSBR flavour with a 64-bit counter (so a single phase suffices):
//!
//! - `gp_ctr` is the global grace-period counter. It is odd and only ever grows, by 2, under
//!   `gp_lock`.
//! - Each registered reader has a [`Slot`] whose `ctr` is 0 while the reader is offline and
//!   otherwise a snapshot of `gp_ctr` taken at its last quiescent state (or when it came
//!   online).
//! - A grace period advances `gp_ctr` to `new` and waits until every slot holds 0 or `new`:
//!   each reader then has been offline, or announced a quiescent state after the grace period
//!   began, so no read-side section that began before it is still running.
//!
//! Read-side sections cost nothing; the fences live in `quiescent_state`, `offline` and
//! `online`, and in the writer.

use std::sync::atomic::{AtomicU64 as StatU64, Ordering::Relaxed as StatRelaxed};
use std::time::{Duration, Instant};

use crate::reclaim::Reclaim;
use crate::stall::{StallHook, StallReport, StalledReader};
use crate::stats::{AtomicHistogram, Stats};
use crate::sync::{fence, lock, spin_hint, thread, Arc, AtomicBool, AtomicU64, Mutex};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

/// How many times a waiting writer re-checks a reader before it parks.
#[cfg(not(loom))]
const SPIN_LIMIT: u32 = 1000;
#[cfg(loom)]
const SPIN_LIMIT: u32 = 1;

/// The value of `gp_ctr` before the first grace period (odd: 0 means "offline" in a slot).
const GP_CTR_INIT: u64 = 1;

/// Tuning of a [`Domain`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Bound on retired-but-not-freed objects. A thread that retires past it reclaims a batch
    /// itself (waiting for a grace period) before returning, so the backlog cannot grow
    /// without bound however fast a writer retires.
    pub max_backlog: usize,
    /// Run a background thread that reclaims retired objects in batches after grace periods.
    /// Without it, reclamation happens only through back-pressure, [`Domain::barrier`] and
    /// [`Domain::reclaim`].
    pub background_reclaim: bool,
    /// Stall warnings: a grace period that has waited this long for readers that stay online
    /// without announcing a quiescent state reports them, once, naming their threads (see
    /// [`StallReport`]; [`Domain::set_stall_hook`] says where the report goes, stderr by
    /// default) and counts a stall ([`Stats::stalls`]). It keeps waiting: the warning is a
    /// diagnosis, not a timeout. `None` turns warnings off. Default: 5 s. (Not under loom.)
    pub stall_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_backlog: 64 * 1024,
            background_reclaim: cfg!(not(loom)),
            stall_timeout: Some(Duration::from_secs(5)),
        }
    }
}

/// One reader's announcement slot, padded to its own cache lines so readers never share a line
/// with each other or with the global counter.
#[repr(align(128))]
pub(crate) struct Slot {
    /// 0 = offline; otherwise the `gp_ctr` value at the reader's last quiescent state.
    /// Written only by the owning reader (relaxed stores bracketed by SeqCst fences), read by
    /// writers in `wait_for_reader`.
    pub(crate) ctr: AtomicU64,
    /// Set when this thread retired past the backlog bound while this reader was online (it
    /// might have held a guard, so back-pressure could not wait then); the reader pays at its
    /// next quiescent state, where its `&mut` proves it holds none. Owner thread only.
    owes_backpressure: AtomicBool,
    /// The thread that owns this slot: a waiter that finds its own thread's slot online knows
    /// it might wait for itself.
    owner: thread::ThreadId,
    /// The owning thread as stall warnings name it (recorded at registration).
    #[cfg_attr(loom, allow(dead_code))] // no stall warnings under loom
    identity: StalledReader,
    /// A non-owning copy of the owning reader's `Domain` handle, so that a read guard needs
    /// one pointer (to this slot) for its domain. Only read through the owning `Reader` or
    /// its guards, which keep the reader, hence its owning `Domain`, alive; never dropped
    /// (the reader drops its own handle).
    domain: std::mem::ManuallyDrop<Domain>,
}

impl Slot {
    /// The owning reader's domain. Valid while the owning `Reader` lives (see `domain`).
    #[inline]
    pub(crate) fn domain(&self) -> &Domain {
        &self.domain
    }
}

// SAFETY: `ctr` and `owes_backpressure` are atomic; `owner` and `identity` are immutable.
// `domain` is only used by the owning thread (through its `Reader` and guards, all `!Send`)
// and never dropped; `Domain` is `Sync` anyway.
unsafe impl Sync for Slot {}

/// The grace-period and reclamation state of a domain.
pub(crate) struct Inner {
    /// Global grace-period counter (liburcu `gp.ctr`).
    pub(crate) gp_ctr: CachePadded<AtomicU64>,
    /// The counter value of the last completed grace period (only written under `gp_lock`).
    completed: AtomicU64,
    /// Set by a writer about to park (liburcu `gp.futex == -1`); a reader that announces a
    /// quiescent state or goes offline checks it after a fence and unparks the writer.
    waiting: CachePadded<AtomicBool>,
    /// The parked writer, if any.
    waiter: Mutex<Option<thread::Thread>>,
    /// Serialises grace periods; holds a scratch list of slots reused across them.
    gp_lock: Mutex<Vec<Arc<Slot>>>,
    /// Every registered reader.
    registry: Mutex<Vec<Arc<Slot>>>,
    pub(crate) reclaim: Reclaim,
    pub(crate) config: Config,
    grace_periods: StatU64,
    synchronize_calls: StatU64,
    gp_latency: AtomicHistogram,
    /// Grace periods that issued a stall warning.
    stalls: StatU64,
    /// Where stall warnings go (`None`: stderr). Not part of the protocol, so a plain std
    /// mutex (also under loom, where warnings are off).
    stall_hook: std::sync::Mutex<Option<std::sync::Arc<StallHook>>>,
}

/// A grace period's stall warning: when it started, and when the warning is due (`None`: off,
/// or already issued).
#[cfg_attr(loom, allow(dead_code))] // no stall warnings under loom
struct StallWatch {
    start: Instant,
    due: Option<Instant>,
}

/// Pads and aligns a value to 128 bytes (two cache lines, which covers adjacent-line prefetch).
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl Inner {
    fn new(config: Config) -> Self {
        Self {
            gp_ctr: CachePadded(AtomicU64::new(GP_CTR_INIT)),
            completed: AtomicU64::new(GP_CTR_INIT),
            waiting: CachePadded(AtomicBool::new(false)),
            waiter: Mutex::new(None),
            gp_lock: Mutex::new(Vec::new()),
            registry: Mutex::new(Vec::new()),
            reclaim: Reclaim::new(),
            config,
            grace_periods: StatU64::new(0),
            synchronize_calls: StatU64::new(0),
            gp_latency: AtomicHistogram::new(),
            stalls: StatU64::new(0),
            stall_hook: std::sync::Mutex::new(None),
        }
    }

    /// Adds a slot, offline, to the registry. `domain` must be the handle owned by the slot's
    /// `Reader`, which must outlive every use of [`Slot::domain`].
    pub(crate) fn register_slot(&self, domain: &Domain) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            ctr: AtomicU64::new(0),
            owes_backpressure: AtomicBool::new(false),
            owner: thread::current().id(),
            identity: StalledReader::current(),
            // SAFETY: a bitwise copy that is never dropped, so it takes no reference count;
            // the reader's own handle keeps the domain alive while the copy is used.
            domain: std::mem::ManuallyDrop::new(unsafe { std::ptr::read(domain) }),
        });
        lock(&self.registry).push(slot.clone());
        slot
    }

    /// Removes an (offline) slot from the registry.
    pub(crate) fn unregister_slot(&self, slot: &Arc<Slot>) {
        let mut reg = lock(&self.registry);
        if let Some(i) = reg.iter().position(|s| Arc::ptr_eq(s, slot)) {
            reg.swap_remove(i);
        }
    }

    /// The reader side of a quiescent state (liburcu `rcu_quiescent_state`).
    #[inline]
    pub(crate) fn quiescent_state(&self, slot: &Slot) {
        let gp = self.gp_ctr.load(Relaxed);
        let owes = slot.owes_backpressure.load(Relaxed);
        if gp == slot.ctr.load(Relaxed) {
            // No grace period started since our last announcement: nothing to tell anyone.
            if owes {
                self.pay_backpressure(slot);
            }
            return;
        }
        // Every read-side access before this point completes before the announcement
        // (pairs with the writer's fence after it reads our slot).
        fence(SeqCst);
        slot.ctr.store(gp, Relaxed);
        // The announcement is visible before we read `waiting` (pairs with the writer's fence
        // between setting `waiting` and re-reading our slot) and before any later read-side
        // access (pairs with the writer's fence between its unpublish and its counter flip).
        fence(SeqCst);
        self.wake_up_gp();
        if owes {
            self.pay_backpressure(slot);
        }
    }

    /// Back-pressure deferred from a retirement while this reader was online (see
    /// `Slot::owes_backpressure`). Called from the reader's quiescent state, which holds the
    /// `Reader` mutably: no guard of it is alive, so it may go offline and wait.
    #[cold]
    #[inline(never)]
    fn pay_backpressure(&self, slot: &Slot) {
        /// Brings the slot back online when dropped, so that nothing unwinding out of the
        /// payment (a callback's panic, were one to escape the batch) leaves the reader
        /// offline: its caller may catch the panic and keep reading, and grace periods would
        /// not wait for that reader's guards.
        struct BackOnline<'a>(&'a Inner, &'a Slot);
        impl Drop for BackOnline<'_> {
            fn drop(&mut self) {
                self.0.thread_online(self.1);
            }
        }
        slot.owes_backpressure.store(false, Relaxed);
        self.thread_offline(slot);
        let _online = BackOnline(self, slot);
        // Another reader of this domain on this thread may hold a guard: then it waits for
        // that reader's quiescent state (which owes too).
        if !self.this_thread_has_an_online_reader() {
            self.reclaim.apply_backpressure(self);
        }
    }

    /// Marks the calling thread's online readers of this domain as owing back-pressure (they
    /// pay at their next quiescent state). Returns whether there were any: if so, the caller
    /// must not wait now (one of them may hold a guard).
    pub(crate) fn defer_backpressure_to_own_readers(&self) -> bool {
        self.for_own_online_slots(|s| s.owes_backpressure.store(true, Relaxed))
    }

    /// Runs `f` on each of the calling thread's online slots of this domain; returns whether
    /// there was any. (`ctr` and `owes_backpressure` of our own slots only change on this
    /// thread: the loads are exact.)
    fn for_own_online_slots(&self, mut f: impl FnMut(&Slot)) -> bool {
        let me = thread::current().id();
        let mut any = false;
        for s in lock(&self.registry).iter() {
            if s.owner == me && s.ctr.load(Relaxed) != 0 {
                f(s);
                any = true;
            }
        }
        any
    }

    /// The reader goes offline (liburcu `rcu_thread_offline`).
    #[inline]
    pub(crate) fn thread_offline(&self, slot: &Slot) {
        // Read-side accesses complete before we stop being waited for.
        fence(SeqCst);
        slot.ctr.store(0, Relaxed);
        // Offline state visible before we read `waiting` (pairs as in `quiescent_state`).
        fence(SeqCst);
        self.wake_up_gp();
    }

    /// The reader comes back online (liburcu `rcu_thread_online`).
    #[inline]
    pub(crate) fn thread_online(&self, slot: &Slot) {
        slot.ctr.store(self.gp_ctr.load(Relaxed), Relaxed);
        // Online state visible before any read-side access: a writer that then reads our slot
        // as offline ordered its unpublish before our loads (pairs with the writer's fence
        // after its counter flip).
        fence(SeqCst);
    }

    /// Whether the calling thread has a reader of this domain that is online. Such a reader
    /// may hold a read guard (which the domain cannot know: guards cost nothing and keep no
    /// count), so nothing on this thread may wait for a grace period.
    pub(crate) fn this_thread_has_an_online_reader(&self) -> bool {
        self.for_own_online_slots(|_| {})
    }

    /// Panics if the calling thread has an online reader of this domain (see
    /// [`this_thread_has_an_online_reader`](Self::this_thread_has_an_online_reader)): `what`
    /// would wait for a grace period, which might wait for a guard of its own caller forever.
    pub(crate) fn assert_no_online_reader_here(&self, what: &str) {
        if self.this_thread_has_an_online_reader() {
            panic!(
                "rcu: {what} called on a thread whose reader of the same domain is online: it \
                 may hold a read guard, and the grace period would wait for itself forever. \
                 Call it on the reader (`Reader::synchronize`, `Reader::barrier`, whose `&mut` \
                 borrow proves no guard is alive) or inside `Reader::offline_while`"
            );
        }
    }

    #[inline]
    fn wake_up_gp(&self) {
        if self.waiting.load(Relaxed) {
            self.waiting.store(false, Relaxed);
            if let Some(t) = lock(&self.waiter).as_ref() {
                t.unpark();
            }
        }
    }

    /// Waits for a grace period: returns once every reader that was online when this call
    /// began has passed a quiescent state or gone offline. Concurrent callers share grace
    /// periods.
    pub(crate) fn synchronize(&self) {
        self.synchronize_calls.fetch_add(1, StatRelaxed);
        // The caller's unpublish stores are ordered before we sample the counter.
        fence(SeqCst);
        let entry = self.gp_ctr.load(Relaxed);
        let mut scratch = lock(&self.gp_lock);
        // A grace period that began after our entry (its counter exceeds `entry`) and has
        // completed serves us too. `completed` is only written under `gp_lock`, which we hold.
        if self.completed.load(Relaxed) >= entry + 2 {
            // Order the caller's subsequent frees after the readers' accesses (the grace
            // period's writer fenced after seeing them; `gp_lock` carries that to us).
            fence(SeqCst);
            return;
        }
        let start = Instant::now();
        let new = self.gp_ctr.load(Relaxed) + 2;
        self.gp_ctr.store(new, Relaxed);
        // The flip is visible before we read any slot (pairs with the fences in
        // `quiescent_state`/`thread_online`).
        fence(SeqCst);

        scratch.clear();
        scratch.extend(lock(&self.registry).iter().cloned());
        let me = thread::current().id();
        let mut stall = StallWatch {
            start,
            due: self.config.stall_timeout.and_then(|t| start.checked_add(t)),
        };
        for i in 0..scratch.len() {
            self.wait_for_reader(&scratch[i..], new, me, &mut stall);
        }
        scratch.clear();
        // Every reader access that preceded a quiescent state we observed happens before the
        // caller's frees (pairs with the readers' fence before their announcement).
        fence(SeqCst);
        self.completed.store(new, Relaxed);
        self.grace_periods.fetch_add(1, StatRelaxed);
        self.gp_latency.record(start.elapsed());
    }

    /// Waits until `slots[0]` is quiescent for the grace period `new` (the rest of `slots`,
    /// still to be waited for, are named in a stall warning).
    fn wait_for_reader(
        &self,
        slots: &[Arc<Slot>],
        new: u64,
        me: thread::ThreadId,
        stall: &mut StallWatch,
    ) {
        let slot = &*slots[0];
        let quiescent = |v: u64| v == 0 || v == new;
        let mut spins = 0u32;
        loop {
            if quiescent(slot.ctr.load(Relaxed)) {
                break;
            }
            if slot.owner == me {
                // Unreachable: every caller checked `assert_no_online_reader_here` first, and
                // only this thread changes its own slot. Waiting would never end.
                panic!(
                    "rcu: a grace period found its own thread's reader online: it would wait \
                     for itself forever"
                );
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                spin_hint();
                continue;
            }
            // Park: publish that we wait, then re-check (a reader either sees `waiting` after
            // its announcement, or we see its announcement here).
            {
                let mut w = lock(&self.waiter);
                if w.is_none() {
                    *w = Some(thread::current());
                }
            }
            self.waiting.store(true, Relaxed);
            fence(SeqCst);
            if quiescent(slot.ctr.load(Relaxed)) {
                break;
            }
            self.park(slots, new, stall);
        }
        if spins >= SPIN_LIMIT {
            self.waiting.store(false, Relaxed);
            *lock(&self.waiter) = None;
        }
    }

    /// Parks the waiting writer until a reader wakes it, or until its stall warning is due
    /// (then issues it, once per grace period, and returns to let the caller re-check).
    #[cfg(not(loom))]
    fn park(&self, slots: &[Arc<Slot>], new: u64, stall: &mut StallWatch) {
        let Some(due) = stall.due else {
            thread::park();
            return;
        };
        let now = Instant::now();
        if now < due {
            thread::park_timeout(due - now);
        } else if self.report_stall(slots, new, now - stall.start) {
            stall.due = None;
        }
    }

    /// Under loom: no timeouts, no stall warnings.
    #[cfg(loom)]
    fn park(&self, _slots: &[Arc<Slot>], _new: u64, _stall: &mut StallWatch) {
        thread::park();
    }

    /// Issues the stall warning of a grace period `new` still waiting for `slots[0]` after
    /// `waited`, naming every reader in `slots` (the ones still to be waited for) that is
    /// online and has not announced a quiescent state since it began. Returns whether there
    /// was any (the first may have just announced one).
    #[cfg(not(loom))]
    #[cold]
    fn report_stall(&self, slots: &[Arc<Slot>], new: u64, waited: Duration) -> bool {
        let readers: Vec<StalledReader> = slots
            .iter()
            .filter(|s| {
                let v = s.ctr.load(Relaxed);
                v != 0 && v != new
            })
            .map(|s| s.identity.clone())
            .collect();
        if readers.is_empty() {
            return false;
        }
        self.stalls.fetch_add(1, StatRelaxed);
        let report = StallReport { waited, readers };
        let hook = self
            .stall_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The hook is the user's code (and `eprintln!` panics if stderr fails): nothing may
        // unwind out of a grace period, which would leave this thread registered as the
        // parked waiter and the grace period half done.
        crate::sync::contain_panic(|| match hook {
            Some(hook) => hook(&report),
            None => eprintln!("{report}"),
        });
        true
    }

    pub(crate) fn stats(&self) -> Stats {
        let counts = self.reclaim.counts();
        let (retired, freed) = (counts.retired, counts.freed);
        Stats {
            grace_periods: self.grace_periods.load(StatRelaxed),
            grace_period_latency: self.gp_latency.snapshot(),
            synchronize_calls: self.synchronize_calls.load(StatRelaxed),
            retired,
            freed,
            backlog: retired.saturating_sub(freed),
            backpressure_stalls: counts.stalls,
            readers: lock(&self.registry).len() as u64,
            callback_panics: counts.panics,
            stalls: self.stalls.load(StatRelaxed),
        }
    }
}

/// An RCU domain: a grace-period counter, its registered readers and its reclamation queue.
///
/// `Domain` is a cheap handle (clone it freely); the domain lives while any handle, reader or
/// [`RcuCell`](crate::RcuCell) of it does. When the last one goes, everything still retired is
/// freed at once (no reader can exist any more).
///
/// ```
/// use rcu::{Domain, RcuCell};
///
/// let domain = Domain::new();
/// let config = RcuCell::new(&domain, String::from("v1"));
/// let mut reader = domain.register();
/// {
///     let guard = reader.read();
///     assert_eq!(config.load(&guard).map(String::as_str), Some("v1"));
/// }
/// config.store(Some(String::from("v2"))); // "v1" is freed after a grace period
/// reader.barrier(); // wait (offline) until "v1" is freed
/// assert_eq!(domain.stats().freed, 1);
/// // `domain.barrier()` here would panic: this thread's reader is online, and the domain
/// // cannot know whether it holds a guard.
/// ```
#[derive(Clone)]
pub struct Domain {
    handle: Arc<Handle>,
}

struct Handle {
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.reclaim.shut_down();
        let joined = lock(&self.thread).take();
        if let Some(t) = joined {
            // The last handle may be dropped by a destructor the reclaim thread runs: never
            // join ourselves.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Default for Domain {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("id", &Arc::as_ptr(&self.handle.inner))
            .finish_non_exhaustive()
    }
}

impl Domain {
    /// A new domain with the default [`Config`].
    pub fn new() -> Self {
        Self::with_config(Config::default())
    }

    /// A new domain with the given tuning.
    pub fn with_config(config: Config) -> Self {
        let background = config.background_reclaim;
        let inner = Arc::new(Inner::new(config));
        let thread = if background {
            Reclaim::spawn_thread(&inner)
        } else {
            None
        };
        Self {
            handle: Arc::new(Handle {
                inner,
                thread: Mutex::new(thread),
            }),
        }
    }

    /// The process-wide default domain.
    #[cfg(not(loom))]
    pub fn global() -> &'static Domain {
        static GLOBAL: std::sync::OnceLock<Domain> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(Domain::new)
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    /// Whether `self` and `other` are handles to the same domain.
    pub fn same_as(&self, other: &Domain) -> bool {
        // One `Handle` per domain (clones share it), so comparing handles is comparing domains,
        // one dependent load cheaper on each side (this check is on `RcuCell::load`'s path).
        Arc::ptr_eq(&self.handle, &other.handle)
    }

    /// Registers the calling thread as a reader and brings it online. The handle is `!Send`:
    /// it stays on this thread, and unregisters (going offline first) when dropped, also
    /// during a panic's unwinding.
    pub fn register(&self) -> crate::Reader {
        crate::Reader::new(self.clone())
    }

    /// Waits until every reader that was online when this call began has passed a quiescent
    /// state or gone offline. Concurrent callers share grace periods: N threads calling at
    /// once cost at most two grace periods, not N.
    ///
    /// The writer spins briefly and then parks; a reader that announces a quiescent state,
    /// goes offline or unregisters wakes it.
    ///
    /// # Panics
    ///
    /// If the calling thread has a reader of this domain that is online: that reader may hold
    /// a read guard, and the grace period would wait for it, that is, for itself, forever.
    /// From a reader thread, call [`Reader::synchronize`](crate::Reader::synchronize), whose
    /// `&mut` borrow proves at compile time that no guard is alive, or call this inside
    /// [`Reader::offline_while`](crate::Reader::offline_while).
    pub fn synchronize(&self) {
        self.inner()
            .assert_no_online_reader_here("Domain::synchronize()");
        self.inner().synchronize();
    }

    /// Runs `f` after a grace period (`call_rcu`). Callbacks run in batches, in the order they
    /// were deferred, on whichever thread drains the queue next:
    ///
    /// - the background reclamation thread ([`Config::background_reclaim`]);
    /// - a thread calling [`barrier`](Self::barrier), [`reclaim`](Self::reclaim) or
    ///   [`Reader::barrier`](crate::Reader::barrier);
    /// - a thread whose retirement reaches [`Config::max_backlog`] (back-pressure, below);
    /// - a reader paying put-off back-pressure in
    ///   [`Reader::quiescent_state`](crate::Reader::quiescent_state) (offline meanwhile).
    ///
    /// So `f` may run on any thread that uses this domain, in the middle of that thread's
    /// retirement or quiescent state, and must not assume which.
    ///
    /// A panic in `f` is contained where it ran: the panic hook reports it as usual,
    /// [`Stats::callback_panics`](crate::Stats::callback_panics) counts it, what `f` captured
    /// is dropped, the rest of the batch runs, and the thread that was draining carries on as
    /// if `f` had returned. It never unwinds into that thread.
    ///
    /// `f` must not:
    ///
    /// - leave a reader of this domain registered and online on its thread (say, a lazily
    ///   created thread-local `Reader`): that thread holds up every later grace period (the
    ///   stall warning, see [`Config::stall_timeout`], names it). The background thread
    ///   notices after the batch and stops, which drops its thread-locals;
    /// - wait for this domain's reclamation: [`barrier`](Self::barrier) panics there and
    ///   [`reclaim`](Self::reclaim) returns 0 at once ([`synchronize`](Self::synchronize)
    ///   works, but holds up the rest of the batch and the thread it runs on);
    /// - take a lock that a thread of this domain may hold while it retires, announces a
    ///   quiescent state or calls `barrier`/`reclaim`: `f` may run on that very thread, under
    ///   that lock;
    /// - block for long, for the same reason.
    ///
    /// Back-pressure: if the backlog has reached [`Config::max_backlog`], the calling thread
    /// first waits for a grace period and runs a batch itself. Where waiting now might wait
    /// for the caller itself, it is put off: on a thread with an online reader of this domain
    /// (which may hold a read guard), that reader pays at its next
    /// [`quiescent_state`](crate::Reader::quiescent_state) (whose `&mut` proves it holds
    /// none); in a deferred callback of this domain, the next retirement outside one pays.
    pub fn defer<F: FnOnce() + Send + 'static>(&self, f: F) {
        self.inner().reclaim.push(self.inner(), Box::new(f));
    }

    /// Drops `value` after a grace period: the way to retire an object that readers may still
    /// be looking at. Same batching and back-pressure as [`defer`](Self::defer).
    pub fn defer_drop<T: Send + 'static>(&self, value: T) {
        self.defer(move || drop(value));
    }

    /// Waits until everything retired before this call has been freed (`rcu_barrier`), and
    /// with it everything those callbacks retired into this domain (from inside, on their own
    /// thread), transitively: when it returns, every callback deferred before the call has
    /// run, and so has every callback deferred by one of those, and so on. (liburcu's
    /// `rcu_barrier` does not wait for callbacks queued by callbacks.) A chain of callbacks
    /// that never ends, each deferring the next, keeps it waiting for as long as it goes on;
    /// stop the chain first. Retirements from other threads during the call may or may not be
    /// covered.
    ///
    /// # Panics
    ///
    /// If the calling thread has an online reader of this domain (as
    /// [`synchronize`](Self::synchronize); use [`Reader::barrier`](crate::Reader::barrier)),
    /// or if called from one of this domain's deferred callbacks: either might wait for itself
    /// forever.
    pub fn barrier(&self) {
        self.inner().reclaim.barrier(self.inner());
    }

    /// Frees what was retired so far after one grace period, on the calling thread, and
    /// returns how many objects that was. Useful without a background thread. Called from one
    /// of this domain's deferred callbacks, it does nothing and returns 0.
    ///
    /// # Panics
    ///
    /// If the calling thread has an online reader of this domain (see
    /// [`barrier`](Self::barrier)).
    pub fn reclaim(&self) -> usize {
        self.inner().reclaim.drain(self.inner())
    }

    /// Sends this domain's stall warnings (see [`Config::stall_timeout`]) to `hook` instead of
    /// stderr, replacing any hook set before.
    ///
    /// The hook runs on the thread whose grace period stalled, while it holds the domain's
    /// grace-period lock: it must not wait for a grace period of this domain (`synchronize`,
    /// `barrier`, `reclaim`), and should return promptly. A panic in it is contained.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// let domain = rcu::Domain::new();
    /// let last = Arc::new(Mutex::new(None::<String>));
    /// let l = last.clone();
    /// domain.set_stall_hook(move |report| *l.lock().unwrap() = Some(report.to_string()));
    /// ```
    pub fn set_stall_hook(&self, hook: impl Fn(&StallReport) + Send + Sync + 'static) {
        *self
            .inner()
            .stall_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(hook));
    }

    /// A snapshot of the domain's statistics.
    pub fn stats(&self) -> Stats {
        self.inner().stats()
    }
}
