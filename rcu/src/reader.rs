//! Reader handles, read guards and offline sections.
#![deny(unsafe_code)]

use std::marker::PhantomData;

use crate::domain::{Domain, Slot};
use crate::sync::Arc;

/// A registered reader: one thread's membership in a [`Domain`].
///
/// Obtained from [`Domain::register`]. It is `!Send` and `!Sync`: the QSBR announcement slot
/// belongs to one thread. Dropping it goes offline and unregisters, also while unwinding.
///
/// The lifetimes carry the RCU rules:
/// - [`read`](Self::read) borrows the reader shared and returns a [`ReadGuard`]; references
///   loaded under the guard are bound to it;
/// - [`quiescent_state`](Self::quiescent_state), [`offline_while`](Self::offline_while),
///   [`synchronize`](Self::synchronize) and [`barrier`](Self::barrier) borrow the reader
///   mutably, and [`offline`](Self::offline) consumes it, so none of them can be called while
///   any guard, and hence any reference obtained under one, is alive.
///
/// Guard-freedom is thus proved at compile time, and read-side sections need no run-time
/// bookkeeping at all. What the compiler cannot see, a [`Domain::synchronize`] (or `barrier`,
/// `reclaim`) on a thread whose reader of the same domain is online, panics rather than risk
/// waiting for a guard of its own caller.
///
/// A reference kept across a quiescent state does not compile:
///
/// ```compile_fail,E0502
/// let domain = rcu::Domain::new();
/// let cell = rcu::RcuCell::new(&domain, 5u32);
/// let mut reader = domain.register();
/// let guard = reader.read();
/// let five: &u32 = cell.load(&guard).unwrap();
/// reader.quiescent_state(); // error: `reader` is borrowed by `guard`
/// assert_eq!(*five, 5);
/// ```
///
/// Nor does one kept across an offline section:
///
/// ```compile_fail,E0502
/// let domain = rcu::Domain::new();
/// let cell = rcu::RcuCell::new(&domain, 5u32);
/// let mut reader = domain.register();
/// let guard = reader.read();
/// let five = cell.load(&guard).unwrap();
/// reader.offline_while(|| ()); // error: `reader` is borrowed by `guard`
/// assert_eq!(*five, 5);
/// ```
///
/// A reader handle cannot be sent to another thread:
///
/// ```compile_fail,E0277
/// let domain = rcu::Domain::new();
/// let reader = domain.register();
/// std::thread::spawn(move || drop(reader)); // error: `Reader` is not `Send`
/// ```
pub struct Reader {
    domain: Domain,
    slot: Arc<Slot>,
    /// `!Send + !Sync`.
    _not_send: PhantomData<*const ()>,
}

impl Reader {
    pub(crate) fn new(domain: Domain) -> Self {
        let slot = domain.inner().register_slot(&domain);
        domain.inner().thread_online(&slot);
        Self {
            domain,
            slot,
            _not_send: PhantomData,
        }
    }

    /// The domain this reader belongs to.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Enters a read-side critical section. Costs nothing: no atomic read-modify-write, no
    /// fence, no store (QSBR). The section ends at the next quiescent state, which the borrow
    /// checker places after the guard's last use, so the guard needs no bookkeeping of its own.
    #[inline]
    pub fn read(&self) -> ReadGuard<'_> {
        ReadGuard {
            slot: &self.slot,
            _reader: PhantomData,
            _not_send: PhantomData,
        }
    }

    /// Announces a quiescent state: this thread holds no reference to RCU-protected data. A
    /// waiting writer may proceed past this reader. Cheap when no grace period is pending (two
    /// relaxed loads); otherwise a store between two fences.
    #[inline]
    pub fn quiescent_state(&mut self) {
        self.domain.inner().quiescent_state(&self.slot);
    }

    /// Goes offline, consuming the reader; [`OfflineReader::online`] gives it back. Grace
    /// periods do not wait for an offline reader, so it may block for as long as it likes.
    ///
    /// The reader is taken by value so that no read guard can exist while it is offline,
    /// whatever the caller does with the returned handle: leaking it (`mem::forget`) leaks
    /// the reader, harmlessly offline; dropping it unregisters the reader. For the common
    /// shape, an offline stretch inside a function that keeps the reader, see
    /// [`offline_while`](Self::offline_while).
    ///
    /// ```
    /// let domain = rcu::Domain::new();
    /// let reader = domain.register();
    /// let offline = reader.offline();
    /// domain.synchronize(); // does not wait for this thread, nor panic
    /// let reader = offline.online();
    /// drop(reader.read());
    /// ```
    pub fn offline(self) -> OfflineReader {
        self.domain.inner().thread_offline(&self.slot);
        OfflineReader { reader: self }
    }

    /// Runs `f` offline and comes back online, on every path out (errors, and panics while
    /// unwinding, included): grace periods stop waiting for this thread while it blocks in
    /// `f` (in `KVM_RUN`, `poll`, a sleep). Going offline is a store between two fences;
    /// coming back online is a store and one fence.
    ///
    /// ```
    /// let domain = rcu::Domain::new();
    /// let mut reader = domain.register();
    /// let slept = reader.offline_while(|| {
    ///     std::thread::sleep(std::time::Duration::from_millis(1));
    ///     true
    /// });
    /// assert!(slept);
    /// ```
    pub fn offline_while<R>(&mut self, f: impl FnOnce() -> R) -> R {
        /// Brings the reader back online when dropped. Private, so it cannot be leaked: the
        /// `&mut` borrow that keeps guards away lasts until it has run.
        struct BackOnline<'a>(&'a Reader);
        impl Drop for BackOnline<'_> {
            fn drop(&mut self) {
                self.0.domain.inner().thread_online(&self.0.slot);
            }
        }
        self.domain.inner().thread_offline(&self.slot);
        let _online = BackOnline(self);
        f()
    }

    /// Waits for a grace period from a reader thread: the `&mut` borrow proves that this
    /// reader holds no guard, so it goes offline for the wait and cannot wait for itself.
    /// ([`Domain::synchronize`] panics on a thread whose reader of the domain is online.)
    ///
    /// Calling it while a guard is alive does not compile:
    ///
    /// ```compile_fail,E0502
    /// let domain = rcu::Domain::new();
    /// let mut reader = domain.register();
    /// let guard = reader.read();
    /// reader.synchronize(); // error: `reader` is borrowed by `guard`
    /// drop(guard);
    /// ```
    pub fn synchronize(&mut self) {
        let domain = self.domain.clone();
        self.offline_while(|| domain.synchronize());
    }

    /// Waits until everything retired in this domain so far has been freed, and what those
    /// callbacks retire in turn (see [`Domain::barrier`]), offline meanwhile, like
    /// [`synchronize`](Self::synchronize).
    pub fn barrier(&mut self) {
        let domain = self.domain.clone();
        self.offline_while(|| domain.barrier());
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Offline first (wakes a writer waiting for us), then leave the registry.
        self.domain.inner().thread_offline(&self.slot);
        self.domain.inner().unregister_slot(&self.slot);
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// A read-side critical section of one [`Reader`]. References loaded under it (from an
/// [`RcuCell`](crate::RcuCell) or any structure built on one) live at most as long as it.
///
/// A guard cannot be sent to another thread:
///
/// ```compile_fail,E0277
/// let domain = rcu::Domain::new();
/// let reader = domain.register();
/// let guard = reader.read();
/// std::thread::scope(|s| {
///     s.spawn(move || drop(guard)); // error: `ReadGuard` is not `Send`
/// });
/// ```
///
/// and a reference cannot escape its guard:
///
/// ```compile_fail,E0597
/// let domain = rcu::Domain::new();
/// let cell = rcu::RcuCell::new(&domain, 5u32);
/// let reader = domain.register();
/// let five: &u32 = {
///     let guard = reader.read();
///     cell.load(&guard).unwrap() // error: `guard` does not live long enough
/// };
/// assert_eq!(*five, 5);
/// ```
pub struct ReadGuard<'r> {
    /// The reader's slot, for (its copy of) the domain handle: [`domain`](Self::domain) is one
    /// load. Borrowed from the `Reader`, which therefore stays alive and in place for `'r`.
    slot: &'r Slot,
    /// The guard borrows its reader (shared): `quiescent_state`, `offline_while`,
    /// `synchronize` and `offline` cannot run while it lives, and the reader (hence the domain handle the slot copies) outlives it.
    _reader: PhantomData<&'r Reader>,
    /// `!Send + !Sync`.
    _not_send: PhantomData<*const ()>,
}

impl ReadGuard<'_> {
    /// The domain this guard protects reads in.
    #[inline]
    pub fn domain(&self) -> &Domain {
        self.slot.domain()
    }
}

/// Dropping a guard does nothing at run time; it is there so that a section lasts to the end
/// of the guard's scope (or its explicit `drop`), like any RAII guard, rather than ending
/// silently at the guard's last use.
impl Drop for ReadGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {}
}

impl std::fmt::Debug for ReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard").finish_non_exhaustive()
    }
}

/// A [`Reader`] that is offline (see [`Reader::offline`]): grace periods do not wait for it.
/// [`online`](Self::online) brings it back; dropping it unregisters the reader. `!Send`, like
/// the reader it holds.
#[must_use = "dropping an offline reader unregisters it; call `online()` to read again"]
pub struct OfflineReader {
    reader: Reader,
}

impl OfflineReader {
    /// Comes back online (a store and one fence) and returns the reader.
    pub fn online(self) -> Reader {
        let reader = self.reader;
        reader.domain.inner().thread_online(&reader.slot);
        reader
    }

    /// The domain the reader belongs to.
    pub fn domain(&self) -> &Domain {
        &self.reader.domain
    }
}

impl std::fmt::Debug for OfflineReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfflineReader")
            .field("domain", &self.reader.domain)
            .finish_non_exhaustive()
    }
}
