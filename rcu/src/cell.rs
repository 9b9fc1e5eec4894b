//! Published pointers: `rcu_assign_pointer` / `rcu_dereference` with lifetimes.

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::Ordering::{AcqRel, Acquire};

use crate::sync::AtomicPtr;
use crate::{Domain, ReadGuard};

/// An RCU-published, optionally empty, heap value of type `T`.
///
/// - [`load`](Self::load) takes a read guard and returns a reference that lives no longer than
///   the guard (and the cell): one acquire load, nothing else.
/// - [`store`](Self::store), [`swap`](Self::swap) and
///   [`compare_exchange`](Self::compare_exchange) publish a new value with release ordering
///   (everything written to it before is visible to a reader that loads it) and retire the old
///   one: it is dropped after a grace period, never while a reader may still hold it.
///
/// ```
/// use rcu::{Domain, RcuCell};
///
/// let domain = Domain::new();
/// let cell = RcuCell::new(&domain, vec![1, 2, 3]);
/// let reader = domain.register();
/// let guard = reader.read();
/// let old = cell.load(&guard).unwrap();
/// cell.store(Some(vec![4]));            // `old` stays valid while `guard` lives
/// assert_eq!(old, &[1, 2, 3]);
/// assert_eq!(cell.load(&guard).unwrap(), &[4]);
/// ```
pub struct RcuCell<T: Send + Sync + 'static> {
    ptr: AtomicPtr<T>,
    domain: Domain,
    _owns: PhantomData<Box<T>>,
}

// The cell hands `&T` to readers on other threads (`T: Sync`) and drops `T` on the
// reclamation thread (`T: Send`); `AtomicPtr` already makes it `Send + Sync`, and the bounds on
// the struct keep every instance within them.

fn into_raw<T>(value: Option<T>) -> *mut T {
    value.map_or(ptr::null_mut(), |v| Box::into_raw(Box::new(v)))
}

impl<T: Send + Sync + 'static> RcuCell<T> {
    /// A cell in `domain` holding `value`.
    pub fn new(domain: &Domain, value: T) -> Self {
        Self::from_option(domain, Some(value))
    }

    /// An empty cell in `domain`.
    pub fn empty(domain: &Domain) -> Self {
        Self::from_option(domain, None)
    }

    fn from_option(domain: &Domain, value: Option<T>) -> Self {
        Self {
            ptr: AtomicPtr::new(into_raw(value)),
            domain: domain.clone(),
            _owns: PhantomData,
        }
    }

    /// The domain whose grace periods protect this cell's values.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Loads the current value (`rcu_dereference`). The reference lives as long as the guard.
    ///
    /// # Panics
    ///
    /// If `guard` belongs to another domain: its reader would not hold off this cell's
    /// reclamation.
    #[inline]
    pub fn load<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Option<&'g T> {
        assert!(
            guard.domain().same_as(&self.domain),
            "RcuCell::load with a guard of another domain"
        );
        // Acquire pairs with the release in `swap_raw`: the value's contents are visible.
        let p = self.ptr.load(Acquire);
        // SAFETY: `p` is null or came from `Box::into_raw` in a store to this cell. A value is
        // freed only by `Drop` of the cell (impossible while `&'g self` is borrowed) or after
        // a grace period that began after it was unpublished; `guard` proves this thread's
        // reader is online and has not passed a quiescent state since the load (quiescent
        // states need `&mut Reader`, which the guard's borrow excludes), so that grace period
        // cannot end before 'g does.
        unsafe { p.as_ref() }
    }

    /// Publishes `value` (`rcu_assign_pointer`) and retires the previous value.
    pub fn store(&self, value: Option<T>) {
        let old = self.swap_raw(into_raw(value));
        self.retire(old);
    }

    /// Publishes `value` and returns the previous one, which stays readable for as long as
    /// `guard` lives and is freed after a grace period.
    pub fn swap<'g>(&'g self, value: Option<T>, guard: &'g ReadGuard<'_>) -> Option<&'g T> {
        assert!(
            guard.domain().same_as(&self.domain),
            "RcuCell::swap with a guard of another domain"
        );
        let old = self.swap_raw(into_raw(value));
        self.retire(old);
        // SAFETY: `old` was published in this cell and has just been queued for freeing after
        // a grace period, which cannot end while `guard` (an online reader of this domain,
        // held for 'g) lives, as in `load`.
        unsafe { old.as_ref() }
    }

    /// Publishes `new` only if the cell still holds `current` (compared by address; `None`
    /// for empty). On success the old value is retired; on failure `new` is handed back.
    pub fn compare_exchange(&self, current: Option<&T>, new: Option<T>) -> Result<(), Option<T>> {
        let cur = current.map_or(ptr::null_mut(), |r| r as *const T as *mut T);
        let new_ptr = into_raw(new);
        match self.ptr.compare_exchange(cur, new_ptr, AcqRel, Acquire) {
            Ok(old) => {
                self.retire(old);
                Ok(())
            }
            Err(_) => {
                // SAFETY: `new_ptr` came from `into_raw` just above and was never published.
                Err(unsafe { take(new_ptr) })
            }
        }
    }

    /// Exclusive access: no reader can be looking when the cell is borrowed mutably.
    pub fn get_mut(&mut self) -> Option<&mut T> {
        let p = self.ptr.load(std::sync::atomic::Ordering::Relaxed);
        // SAFETY: `&mut self` excludes every `load` (they borrow the cell) and every store; the
        // pointer is null or owned by the cell.
        unsafe { p.as_mut() }
    }

    fn swap_raw(&self, new: *mut T) -> *mut T {
        // Release publishes the new value's contents (pairs with the acquire in `load`);
        // acquire orders our later retirement after the previous publisher's writes.
        self.ptr.swap(new, AcqRel)
    }

    fn retire(&self, old: *mut T) {
        // SAFETY: `old` was the published value and is unpublished now (swapped out), so no
        // new reader can reach it; the box is rebuilt once, and its drop (which frees the heap
        // allocation readers may still point into: the value is not moved) is deferred past a
        // grace period.
        if let Some(b) = unsafe { take_box(old) } {
            self.domain.defer_drop(b);
        }
    }
}

/// Takes ownership of the value behind `p` (null gives `None`).
///
/// # Safety
///
/// `p` is null or came from `Box::into_raw`, and nobody else will take it.
unsafe fn take<T>(p: *mut T) -> Option<T> {
    // SAFETY: per the contract.
    unsafe { take_box(p) }.map(|b| *b)
}

/// Rebuilds the box behind `p` (null gives `None`) without moving the value.
///
/// # Safety
///
/// As for [`take`].
unsafe fn take_box<T>(p: *mut T) -> Option<Box<T>> {
    // SAFETY: per the contract.
    (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
}

impl<T: Send + Sync + 'static> Drop for RcuCell<T> {
    fn drop(&mut self) {
        // No reader can hold a reference: every `load` borrows the cell.
        // SAFETY: the pointer is null or owned by the cell; `&mut self` is exclusive.
        drop(unsafe {
            take_box(
                self.ptr
                    .swap(ptr::null_mut(), std::sync::atomic::Ordering::Relaxed),
            )
        });
    }
}

impl<T: Send + Sync + std::fmt::Debug + 'static> std::fmt::Debug for RcuCell<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcuCell").finish_non_exhaustive()
    }
}
