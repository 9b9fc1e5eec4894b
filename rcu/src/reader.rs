//! Reader handles, read guards and offline sections.

use std::marker::PhantomData;

use crate::domain::{Domain, Slot, OFFLINE};
use crate::sync::Arc;

/// A registered reader: one thread's membership in a [`Domain`].
///
/// Obtained from [`Domain::register`]. It is `!Send` and `!Sync`: the QSBR announcement slot
/// belongs to one thread. Dropping it goes offline and unregisters, also while unwinding.
///
/// The lifetimes carry the RCU rules:
/// - [`read`](Self::read) borrows the reader shared and returns a [`ReadGuard`]; references
///   loaded under the guard are bound to it;
/// - [`quiescent_state`](Self::quiescent_state) and [`offline`](Self::offline) borrow the
///   reader mutably, so they cannot be called while any guard, and hence any reference
///   obtained under one, is alive.
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

    /// Enters a read-side critical section. Costs no atomic read-modify-write and no fence
    /// (QSBR): the section ends at the next quiescent state, which the borrow checker places
    /// after the guard's last use.
    #[inline]
    pub fn read(&self) -> ReadGuard<'_> {
        let slot: &Slot = &self.slot;
        // Count the guard; the offline bit is the word's sign bit, so the increment's sign
        // flag is the leaked-`Offline` check (`inc` + `js`).
        let state = slot.state.get().wrapping_add(1);
        slot.state.set(state);
        if state & OFFLINE != 0 {
            // Only possible if an `Offline` guard was leaked (`mem::forget`): its borrow has
            // ended without bringing us back online. Reading offline would let grace periods
            // ignore this section. (Online, with its fence, before the guard is returned.)
            self.come_back_online();
        }
        ReadGuard {
            slot,
            _reader: PhantomData,
            _not_send: PhantomData,
        }
    }

    #[cold]
    #[inline(never)]
    fn come_back_online(&self) {
        self.domain.inner().thread_online(&self.slot);
    }

    /// Announces a quiescent state: this thread holds no reference to RCU-protected data. A
    /// waiting writer may proceed past this reader. Cheap when no grace period is pending (two
    /// relaxed loads); otherwise a store between two fences.
    #[inline]
    pub fn quiescent_state(&mut self) {
        self.domain.inner().quiescent_state(&self.slot);
    }

    /// Goes offline until the returned guard is dropped: grace periods stop waiting for this
    /// thread while it blocks (in `KVM_RUN`, `poll`, a sleep). Coming back online is one store
    /// and one fence, and happens on every path out, errors and panics included. If the guard
    /// is leaked (`mem::forget`), the next [`read`](Self::read) or
    /// [`quiescent_state`](Self::quiescent_state) brings the reader back online.
    pub fn offline(&mut self) -> Offline<'_> {
        self.domain.inner().thread_offline(&self.slot);
        Offline { reader: self }
    }

    /// Runs `f` offline (see [`offline`](Self::offline)) and comes back online.
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
        let _offline = self.offline();
        f()
    }

    /// Waits for a grace period from a reader thread: goes offline for the wait, so it cannot
    /// wait for itself.
    pub fn synchronize(&mut self) {
        let domain = self.domain.clone();
        self.offline_while(|| domain.synchronize());
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
    /// The reader's slot: its guard count and (a copy of) its domain handle, one pointer so
    /// that leaving the section is one load and one decrement. Borrowed from the `Reader`,
    /// which therefore stays alive and in place for `'r`.
    slot: &'r Slot,
    /// The guard borrows its reader (shared): `quiescent_state`/`offline` cannot run while it
    /// lives, and the reader (hence the domain handle the slot copies) outlives it.
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

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let s = &self.slot.state;
        s.set(s.get().wrapping_sub(1));
    }
}

impl std::fmt::Debug for ReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard").finish_non_exhaustive()
    }
}

/// An offline section of a [`Reader`] (see [`Reader::offline`]); back online when dropped.
#[must_use = "the reader comes back online as soon as this guard is dropped"]
pub struct Offline<'r> {
    reader: &'r mut Reader,
}

impl Drop for Offline<'_> {
    fn drop(&mut self) {
        self.reader.domain.inner().thread_online(&self.reader.slot);
    }
}
