//! The host side of a region's life: backing a range with host memory (and registering it
//! with userfaultfd) before it is published, and freeing it back to a hole after it was
//! unpublished and a grace period passed. These are the address space's only calls that
//! replace or free host mappings of guest memory (`MAP_FIXED`, `MADV_DONTNEED`,
//! `MADV_REMOVE`), which [`HostSpace`](crate::memory::host::HostSpace) marks `unsafe`: here
//! each call says why no thread can be using the range.
#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::Ordering::Relaxed;

use super::{AddressSpace, AsError, Backing, PAGE};
use crate::memory::host::HostAccess;

/// How a range's host memory goes back to being a hole ([`AddressSpace::teardown`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Teardown {
    /// Registered with userfaultfd.
    pub(super) demand_paged: bool,
    pub(super) backing: Backing,
    /// Read-only on the host.
    pub(super) readonly: bool,
    /// Goes back to an armed hole ([`AddressSpace::armed`]).
    pub(super) armed: bool,
}

impl AddressSpace {
    /// Maps `[gpa, gpa + size)` anonymous, read-write, registered with userfaultfd, holding no
    /// page: an armed hole. The range must be unpublished and past a grace period.
    pub(super) fn arm(&self, gpa: u64, size: u64) -> io::Result<()> {
        // Inaccessible until registered: the window's memslot covers the range, and a vCPU
        // access in between would have the kernel populate a page that then stays in the hole
        // (a guest write racing with the unmap that is making this hole would land there, and
        // be read back once the unmap had replied).
        // SAFETY: per the contract, no thread uses the range.
        unsafe { self.host.map(gpa, size, Backing::Anon, HostAccess::None) }?;
        let registered = match &self.uffd {
            Some(u) => u.register(self.host.host_addr(gpa), size),
            None => Ok(()),
        };
        if let Err(e) = registered.and_then(|()| self.host.protect(gpa, size, false)) {
            // SAFETY: as above.
            let _ = unsafe { self.host.release(gpa, size) };
            return Err(e);
        }
        Ok(())
    }

    /// Puts the hot-plug window back to `PROT_NONE` after its memslot could not be
    /// installed.
    pub(super) fn unarm_window(&self, gpa: u64, size: u64) {
        // SAFETY: nothing is published in the window yet and no vCPU reaches it (no memslot):
        // no thread uses the range.
        let _ = unsafe { self.host.release(gpa, size) };
    }

    /// Backs `[gpa, gpa + size)` with fresh host memory of `how.backing` (read-only on the
    /// host if `how.readonly`: in the window the guest sees it through the window memslot, so
    /// the host protection is what stops its writes) and registers it with userfaultfd if
    /// `how.demand_paged`; `windowed`: the range lies in the hot-plug window. On a failure
    /// nothing stays mapped, and the error says which step failed.
    pub(super) fn back(
        &self,
        gpa: u64,
        size: u64,
        how: Teardown,
        windowed: bool,
    ) -> Result<(), AsError> {
        let Teardown {
            demand_paged,
            backing,
            readonly: host_readonly,
            armed,
        } = how;
        if armed && backing == Backing::Anon {
            // An armed hole already is what an anonymous region needs: nothing to map or
            // register. A read-only one only loses write access.
            if host_readonly {
                let done = crate::inject::hit(crate::inject::Step::Mprotect)
                    .and_then(|()| self.host.protect(gpa, size, true));
                if let Err(source) = done {
                    return Err(AsError::Host {
                        what: "changing the host protection of guest memory",
                        source,
                    });
                }
            }
            return Ok(());
        }
        // Back to a hole, after a failure below: armed again, or `PROT_NONE`.
        let hole = || {
            let r = if armed {
                self.arm(gpa, size)
            } else {
                // SAFETY: the range is not published yet: no thread uses it.
                unsafe { self.host.release(gpa, size) }
            };
            if let Err(e) = r {
                tracing::error!(gpa, size, error = %e, "putting a hole back after a failed map failed");
            }
        };
        // In the hot-plug window, whose memslot lets vCPUs reach the range before it is
        // published, memory to be registered with userfaultfd is mapped inaccessible and opened
        // only once registered (see `HostSpace::map`): an access in between is then a fault the
        // VMM answers as open bus, not a page the kernel fills behind its back. Elsewhere (no
        // memslot yet, or nothing to register) it is mapped read-write at once.
        let uffd = self.uffd.as_ref().filter(|_| demand_paged);
        let closed = windowed && uffd.is_some();
        let access = if closed {
            HostAccess::None
        } else {
            HostAccess::ReadWrite
        };
        let mapped = crate::inject::hit(crate::inject::Step::Mmap)
            // SAFETY: the range is not published yet (the caller publishes it after this
            // returns), so no thread uses it, and no Rust reference into it exists.
            .and_then(|()| unsafe { self.host.map(gpa, size, backing, access) });
        if let Err(source) = mapped {
            if backing == Backing::Hugetlb && source.raw_os_error() == Some(libc::ENOMEM) {
                // The huge pages were taken between the caller's check and our reservation.
                return Err(AsError::Limit(format!(
                    "not enough free 2 MiB huge pages for {size:#x} bytes of hugetlb memory \
                     (reserve some with `echo N > /proc/sys/vm/nr_hugepages`)"
                )));
            }
            return Err(AsError::Host {
                what: "mapping host memory",
                source,
            });
        }
        if let Some(u) = uffd {
            let registered = crate::inject::hit(crate::inject::Step::Uffd)
                .and_then(|()| u.register(self.host.host_addr(gpa), size));
            if let Err(source) = registered {
                hole();
                return Err(AsError::Host {
                    what: "registering guest memory with userfaultfd",
                    source,
                });
            }
        }
        if closed || host_readonly {
            if let Err(source) = self.host.protect(gpa, size, host_readonly) {
                hole();
                return Err(AsError::Host {
                    what: "changing the host protection of guest memory",
                    source,
                });
            }
        }
        Ok(())
    }

    /// Frees the host memory of `[gpa, gpa + size)`, unpublished and past a grace period, and
    /// makes it a hole again: armed (`how.armed`), else `PROT_NONE`.
    pub(super) fn teardown(&self, gpa: u64, size: u64, how: Teardown) {
        // Nothing here can be undone (the range is already out of the tree and of KVM), so a
        // failure is logged, counted and recovered from as far as it can be.
        if how.armed {
            self.teardown_armed(gpa, size, how);
        } else {
            self.teardown_to_none(gpa, size, how.demand_paged);
        }
        self.forget_pages(gpa, size);
    }

    /// [`teardown`](Self::teardown) of many ranges, unpublished and past one grace period.
    /// Ranges that go back to an armed hole and only need their pages dropped (anonymous,
    /// read-write) are freed together, with one TLB flush where the host allows it
    /// ([`HostSpace::zap_anon_many`](crate::memory::host::HostSpace::zap_anon_many)); the
    /// others, and all of them if that fails, one by one as `teardown` does.
    pub(super) fn teardown_many(&self, items: &[(u64, u64, Teardown)]) {
        let (together, alone): (Vec<_>, Vec<_>) = items
            .iter()
            .partition(|(_, _, how)| how.armed && how.backing == Backing::Anon && !how.readonly);
        let mut one_by_one = alone;
        if together.len() > 1 {
            let ranges: Vec<(u64, u64)> = together.iter().map(|&&(g, s, _)| (g, s)).collect();
            let done = crate::inject::hit(crate::inject::Step::Release).and_then(|()| {
                // SAFETY: every range is unpublished and a grace period has passed (the
                // caller's contract): no thread uses them; each is anonymous memory.
                unsafe { self.host.zap_anon_many(&ranges) }
            });
            match done {
                Ok(_) => {
                    for &&(gpa, size, _) in &together {
                        self.forget_pages(gpa, size);
                    }
                }
                Err(error) => {
                    self.counters.teardown_errors.fetch_add(1, Relaxed);
                    tracing::warn!(ranges = ranges.len(), %error, "freeing unmapped guest memory in one batch failed; freeing it range by range");
                    one_by_one.extend(together);
                }
            }
        } else {
            one_by_one.extend(together);
        }
        for &(gpa, size, how) in one_by_one {
            self.teardown(gpa, size, how);
        }
    }

    /// What the address space knows of the pages of a range that went: not resident, and
    /// nothing left to restore into them.
    fn forget_pages(&self, gpa: u64, size: u64) {
        self.residency.clear_range(gpa / PAGE, size / PAGE);
        if let Some(src) = self.source.get() {
            src.forget(gpa / PAGE, size / PAGE);
        }
    }

    /// [`teardown`](Self::teardown) to an armed hole: an anonymous region's pages are dropped
    /// in place (its mapping and registration are the hole's already); a file-backed one's are
    /// punched out and the hole mapped over it. No userfaultfd unregistration: in `SIGBUS` mode
    /// no thread waits on a fault that it would have to wake.
    fn teardown_armed(&self, gpa: u64, size: u64, how: Teardown) {
        let done = crate::inject::hit(crate::inject::Step::Release).and_then(|()| {
            // SAFETY: the range is unpublished and a grace period has passed (the caller's
            // contract): no thread uses it.
            unsafe { self.host.zap(gpa, size) }?;
            match (how.backing, how.readonly) {
                (Backing::Anon, false) => Ok(()),
                (Backing::Anon, true) => self.host.protect(gpa, size, false),
                _ => self.arm(gpa, size),
            }
        });
        if let Err(error) = done {
            self.counters.teardown_errors.fetch_add(1, Relaxed);
            match self.arm(gpa, size) {
                Ok(()) => {
                    tracing::warn!(gpa, size, %error, "freeing unmapped guest memory in place failed; the range was mapped afresh instead")
                }
                Err(e) => {
                    // The range is left `PROT_NONE` (or as it was): holes are no longer all
                    // armed, so from now on every region in the window is mapped and
                    // registered in full.
                    self.window_disarmed.store(true, Relaxed);
                    tracing::error!(gpa, size, %error, arm_error = %e, "freeing unmapped guest memory failed twice; holes in the hot-plug window are no longer kept armed");
                    self.teardown_to_none(gpa, size, how.demand_paged);
                }
            }
        }
    }

    /// [`teardown`](Self::teardown) to a `PROT_NONE` hole.
    fn teardown_to_none(&self, gpa: u64, size: u64, demand_paged: bool) {
        if demand_paged {
            if let Some(u) = &self.uffd {
                let unregistered = crate::inject::hit(crate::inject::Step::UffdUnregister)
                    .and_then(|()| u.unregister(self.host.host_addr(gpa), size));
                if let Err(error) = unregistered {
                    // Harmless: replacing the mapping below drops its registration with it.
                    self.counters.teardown_errors.fetch_add(1, Relaxed);
                    tracing::warn!(gpa, size, %error, "unregistering unmapped guest memory from userfaultfd failed; releasing the memory drops the registration anyway");
                }
            }
        }
        let released = crate::inject::hit(crate::inject::Step::Release)
            // SAFETY: the range is unpublished and a grace period has passed (the caller's
            // contract): no thread uses it.
            .and_then(|()| unsafe { self.host.release(gpa, size) });
        if let Err(error) = released {
            self.counters.teardown_errors.fetch_add(1, Relaxed);
            // SAFETY: as above.
            match unsafe { self.host.discard(gpa, size) } {
                Ok(()) => {
                    tracing::warn!(gpa, size, %error, "releasing unmapped guest memory failed; its pages were discarded and the range made inaccessible instead")
                }
                Err(e) => {
                    tracing::error!(gpa, size, %error, discard_error = %e, "releasing unmapped guest memory failed, and discarding its pages too: they stay allocated until the range is mapped again")
                }
            }
        }
    }
}
