//! vm-memory access to the address space: device code reads and writes guest memory through
//! vm-memory's `Bytes` on a [`GuardedMemory`], a view of the address space that lives inside
//! one RCU read-side critical section.
//!
//! Design:
//!
//! - [`GuardedMemory`] borrows the address space and a [`ReadGuard`]. It implements
//!   [`GuestMemory`] directly (so `Bytes<GuestAddress>` comes from vm-memory's blanket impl):
//!   `get_slices` looks each piece up in the range map under the guard, refuses writes to
//!   read-only regions and addresses no region covers, populates the piece's missing pages
//!   (so that a host access never raises a userfault, which in `--fault-mode vcpu` would be a
//!   SIGBUS killing the VMM), and hands out a `VolatileSlice` over the host mirror. An access
//!   spanning two regions is split at the boundary, as vm-memory does for its own collections;
//!   one that runs into a hole fails (`read_slice`/`write_slice`) or stops short (`read`/
//!   `write`). No allocation, no snapshot: one lookup per region touched.
//! - [`RegionView`] is one region seen through the guard. It implements
//!   [`GuestMemoryRegion`] (and `Bytes<MemoryRegionAddress>` itself rather than through
//!   `GuestMemoryRegionBytes`, whose methods slice the *whole* region and so would populate all
//!   of it): `get_slice(offset, count)` populates exactly `[offset, offset + count)` first.
//! - [`GuardedRegions`] is the region collection, a [`GuestMemoryBackend`]. vm-memory's
//!   `find_region` returns `Option<&Self::R>`, a reference the closure-based
//!   `ConcurrentRangeMap::lookup` cannot give out (only the Bonsai map could), so the collection
//!   is a snapshot of the regions (an `Arc` each) taken inside the critical section (walking the
//!   Bonsai tree under the guard; the lock-based baselines copy under their own lock). It is
//!   built lazily, the first time [`GuardedMemory::regions`] or `physical_memory()` asks for it,
//!   and costs one allocation and an `Arc` clone per region: the `Bytes` path never pays for it. Its accessors, like every `GuestMemoryBackend`'s, know nothing of
//!   access permissions: `Bytes` on a `RegionView` refuses writes to read-only regions, but a
//!   raw `get_slice` does not (the host mirror of a read-only region is writable; only the
//!   guest's memslot is read-only).
//!
//! Soundness: a region's host memory is released only after it is unpublished *and* a grace
//! period has passed. Any region observed while the guard is held therefore stays mapped until
//! the guard goes, and every slice, view and snapshot here borrows the guard. Raw host
//! addresses (`get_host_address`) are not offered: they would escape both the guard and the
//! populate-before-access rule.

use std::cell::OnceCell;
use std::io;
use std::iter::FusedIterator;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rcu::baselines::AnyRangeMap;
use rcu::{ConcurrentRangeMap, ReadGuard};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    AtomicAccess, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, GuestMemoryResult, GuestUsize, MemoryRegionAddress, Permissions,
    ReadVolatile, VolatileSlice, WriteVolatile,
};

use super::address_space::{AddressSpace, RegionRef};
use super::region::Region;

fn readonly_error(gpa: u64) -> GuestMemoryError {
    GuestMemoryError::IOError(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("guest-physical address {gpa:#x} lies in a read-only region"),
    ))
}

fn populate_error(e: super::FaultError) -> GuestMemoryError {
    GuestMemoryError::IOError(io::Error::other(e.to_string()))
}

/// A slice of `len` bytes of guest memory at `gpa`, in `region`, populated first.
///
/// The caller holds (through `'a`) the read guard under which it found `region`, and
/// `[gpa, gpa + len)` lies inside `region`.
fn slice<'a>(
    space: &'a AddressSpace,
    region: &Region,
    gpa: u64,
    len: usize,
    write: bool,
) -> GuestMemoryResult<VolatileSlice<'a>> {
    debug_assert!(gpa >= region.gpa && gpa + len as u64 <= region.end());
    space
        .populate_in_region(region, gpa, len as u64, write)
        .map_err(populate_error)?;
    if write {
        space.host_wrote(gpa, len as u64);
    }
    let host = space.host_addr(gpa) as *mut u8;
    // SAFETY: `[host, host + len)` is the host mirror of part of `region`, which was found
    // under a read guard that outlives `'a`: its memory stays mapped (read-write on the host)
    // until a grace period after it is unpublished, which cannot end while the guard is held.
    // Every page of it is present (just populated, or not demand-paged), so no access through
    // the slice raises a userfault. The guest may access the same memory concurrently; the
    // slice only ever uses volatile accesses, as `VolatileSlice::new` requires.
    Ok(unsafe { VolatileSlice::new(host, len) })
}

/// The address space seen from inside one RCU read-side critical section, for vm-memory's
/// `Bytes` (see the module documentation).
pub struct GuardedMemory<'g> {
    space: &'g AddressSpace,
    guard: &'g ReadGuard<'g>,
    regions: OnceCell<GuardedRegions<'g>>,
}

impl std::fmt::Debug for GuardedMemory<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedMemory")
            .field("space", self.space)
            .finish_non_exhaustive()
    }
}

impl<'g> GuardedMemory<'g> {
    /// The address space seen.
    pub fn space(&self) -> &'g AddressSpace {
        self.space
    }

    /// Populates the page of `gpa` if a region covers it, the access is allowed and the VMM
    /// has not populated it yet; says which of these it found (a vCPU's fault).
    pub fn fault_page(
        &self,
        gpa: u64,
        write: bool,
    ) -> Result<super::fault::PageState, super::fault::FaultError> {
        self.space.fault_page(self.guard, gpa, write)
    }

    /// Completes an access the guest could not make itself (an MMIO exit, a fault in a hole or
    /// on read-only memory): RAM is populated and accessed, a hole is open bus.
    pub fn complete(
        &self,
        gpa: u64,
        access: super::fault::Access<'_>,
    ) -> Result<super::fault::Serviced, super::fault::FaultError> {
        self.space.complete_mmio(self.guard, gpa, access)
    }

    /// Reads guest memory that is present (populating it first if needed); a hole reads as
    /// all-ones.
    pub fn read_guest(
        &self,
        gpa: u64,
        dst: &mut [u8],
    ) -> Result<super::fault::Serviced, super::fault::FaultError> {
        self.complete(gpa, super::fault::Access::Read(dst))
    }
}

impl<'g> GuardedMemory<'g> {
    /// A view of `space` valid while `guard` (a guard of a reader of `space`'s domain) is held.
    pub fn new(space: &'g AddressSpace, guard: &'g ReadGuard<'g>) -> Self {
        Self {
            space,
            guard,
            regions: OnceCell::new(),
        }
    }

    /// The region collection (a snapshot under the guard, built on first use).
    pub fn regions(&self) -> &GuardedRegions<'g> {
        self.regions.get_or_init(|| {
            let view = |r: &RegionRef| RegionView {
                space: self.space,
                region: Arc::clone(&r.0),
            };
            let regions = match &self.space.map {
                // Walked under our guard: `snapshot` would take the Bonsai writer lock, and a
                // writer holding it may be waiting for a grace period, i.e. for our guard.
                AnyRangeMap::Bonsai(m) => m.iter(self.guard).map(|(_, r)| view(r)).collect(),
                // The baselines ignore RCU guards; their snapshots take only their own locks,
                // which no writer holds while waiting for a grace period.
                other => other.snapshot().iter().map(|(_, r)| view(r)).collect(),
            };
            GuardedRegions { regions }
        })
    }

    /// Looks up the region at `gpa` and calls `f` with it and the bytes left in it from `gpa`.
    fn with_region<R>(&self, gpa: u64, f: impl FnOnce(Option<(&Region, u64)>) -> R) -> R {
        self.space.map.lookup(self.guard, gpa, |hit| {
            f(hit.map(|(range, r)| (&*r.0, range.end - gpa)))
        })
    }
}

impl<'g> GuestMemory for GuardedMemory<'g> {
    type PhysicalMemory = GuardedRegions<'g>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let mut gpa = addr.0;
        let mut left = count as u64;
        while left > 0 {
            let step = self.with_region(gpa, |hit| match hit {
                Some((r, avail)) if !(access.has_write() && r.readonly) => Some(avail.min(left)),
                _ => None,
            });
            let Some(step) = step else { return false };
            left -= step;
            gpa += step;
        }
        true
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        Ok(Slices {
            mem: self,
            gpa: addr.0,
            count,
            write: access.has_write(),
        })
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        Some(self.regions())
    }
}

/// The pieces of one access, region by region (see [`GuardedMemory`]'s `get_slices`).
struct Slices<'a, 'g> {
    mem: &'a GuardedMemory<'g>,
    gpa: u64,
    count: usize,
    write: bool,
}

impl<'a> Iterator for Slices<'a, '_> {
    type Item = GuestMemoryResult<VolatileSlice<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.count == 0 {
            return None;
        }
        let (gpa, write, space) = (self.gpa, self.write, self.mem.space);
        let r = self.mem.with_region(gpa, |hit| {
            let Some((region, avail)) = hit else {
                return Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa)));
            };
            if write && region.readonly {
                return Err(readonly_error(gpa));
            }
            let len = avail.min(self.count as u64) as usize;
            slice(space, region, gpa, len, write)
        });
        match &r {
            Ok(s) => {
                self.count -= s.len();
                self.gpa += s.len() as u64;
            }
            // Fused: nothing after an error.
            Err(_) => self.count = 0,
        }
        Some(r)
    }
}

impl FusedIterator for Slices<'_, '_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for Slices<'a, '_> {}

/// One region seen through a read guard: vm-memory's [`GuestMemoryRegion`], with every access
/// populating the pages it touches first.
#[derive(Debug)]
pub struct RegionView<'g> {
    space: &'g AddressSpace,
    region: Arc<Region>,
}

impl RegionView<'_> {
    /// A populated slice of `count` bytes at `offset`, checked against the region's bounds and,
    /// for writes, its protection.
    fn checked_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
        write: bool,
    ) -> GuestMemoryResult<VolatileSlice<'_>> {
        offset
            .0
            .checked_add(count as u64)
            .filter(|&e| e <= self.region.size_bytes)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        let gpa = self.region.gpa + offset.0;
        if write && self.region.readonly {
            return Err(readonly_error(gpa));
        }
        slice(self.space, &self.region, gpa, count, write)
    }

    /// The bytes from `offset` to the end of the region, at most `want`.
    fn avail(&self, offset: MemoryRegionAddress, want: usize) -> GuestMemoryResult<usize> {
        if offset.0 >= self.region.size_bytes {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        Ok((self.region.size_bytes - offset.0).min(want as u64) as usize)
    }
}

impl GuestMemoryRegion for RegionView<'_> {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.region.size_bytes
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.region.gpa)
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GuestMemoryResult<VolatileSlice<'_, BS<'_, ()>>> {
        // Unknown access: writable regions get private pages (no copy-on-write later),
        // read-only ones the zero page.
        self.checked_slice(offset, count, !self.region.readonly)
    }
}

impl Bytes<MemoryRegionAddress> for RegionView<'_> {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> GuestMemoryResult<usize> {
        let n = self.avail(addr, buf.len())?;
        Ok(self.checked_slice(addr, n, true)?.write(&buf[..n], 0)?)
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> GuestMemoryResult<usize> {
        let n = self.avail(addr, buf.len())?;
        Ok(self.checked_slice(addr, n, false)?.read(&mut buf[..n], 0)?)
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> GuestMemoryResult<()> {
        Ok(self
            .checked_slice(addr, buf.len(), true)?
            .write_slice(buf, 0)?)
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> GuestMemoryResult<()> {
        Ok(self
            .checked_slice(addr, buf.len(), false)?
            .read_slice(buf, 0)?)
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> GuestMemoryResult<usize> {
        let n = self.avail(addr, count)?;
        Ok(self
            .checked_slice(addr, n, true)?
            .read_volatile_from(0, src, n)?)
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> GuestMemoryResult<()> {
        Ok(self
            .checked_slice(addr, count, true)?
            .read_exact_volatile_from(0, src, count)?)
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> GuestMemoryResult<usize> {
        let n = self.avail(addr, count)?;
        Ok(self
            .checked_slice(addr, n, false)?
            .write_volatile_to(0, dst, n)?)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> GuestMemoryResult<()> {
        Ok(self
            .checked_slice(addr, count, false)?
            .write_all_volatile_to(0, dst, count)?)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> GuestMemoryResult<()> {
        Ok(self
            .checked_slice(addr, std::mem::size_of::<T>(), true)?
            .store(val, 0, order)?)
    }

    fn load<T: AtomicAccess>(
        &self,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> GuestMemoryResult<T> {
        Ok(self
            .checked_slice(addr, std::mem::size_of::<T>(), false)?
            .load(0, order)?)
    }
}

/// The regions of the address space as of some instant inside the read-side critical section:
/// vm-memory's [`GuestMemoryBackend`] (see the module documentation for what it does not
/// enforce).
#[derive(Debug)]
pub struct GuardedRegions<'g> {
    /// Sorted by address, disjoint.
    regions: Vec<RegionView<'g>>,
}

impl<'g> GuestMemoryBackend for GuardedRegions<'g> {
    type R = RegionView<'g>;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&RegionView<'g>> {
        let i = self.regions.partition_point(|r| r.region.end() <= addr.0);
        self.regions.get(i).filter(|r| r.region.gpa <= addr.0)
    }

    fn iter(&self) -> impl Iterator<Item = &RegionView<'g>> {
        self.regions.iter()
    }

    /// Whether `[base, base + len)` is covered by regions, without populating anything
    /// (vm-memory's default would build, and so populate, the slices).
    fn check_range(&self, base: GuestAddress, len: usize) -> bool {
        let mut gpa = base.0;
        let Some(end) = gpa.checked_add(len as u64) else {
            return false;
        };
        while gpa < end {
            match self.find_region(GuestAddress(gpa)) {
                Some(r) => gpa = r.region.end(),
                None => return false,
            }
        }
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::address_space::{AsConfig, FaultMode, Limits, Memslots, PAGE};
    use crate::memory::{Backing, RegionKind};
    use rcu::Domain;

    struct NoSlots;

    impl Memslots for NoSlots {
        fn install(&self, _: u32, _: u64, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn delete(&self, _: u32, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn capacity(&self) -> u32 {
            32
        }
    }

    const MB: u64 = 1 << 20;

    /// An address space over fake memslots with the boot area mapped (eagerly backed, as in
    /// a run), for device tests.
    pub(crate) fn test_space(mode: FaultMode, implementation: &str) -> AddressSpace {
        let s = space(mode, implementation);
        s.map(
            0,
            abi::layout::BOOT_AREA_END,
            Backing::Anon,
            false,
            RegionKind::Boot,
        )
        .unwrap();
        s
    }

    fn space(mode: FaultMode, implementation: &str) -> AddressSpace {
        let cfg = AsConfig {
            implementation: crate::memory::AddressSpaceKind::from_name(implementation).unwrap(),
            fault_mode: mode,
            fault_around: crate::memory::address_space::FaultAround::Fixed(4),
            space_bytes: 1 << 30,
            limits: Limits {
                max_regions: 8,
                max_bytes: 256 << 20,
            },
            memslots: crate::memory::MemslotMode::PerRegion,
            hotplug_window: 0..0,
            thp: false,
        };
        let s = AddressSpace::new(&Domain::new(), &cfg, Box::new(NoSlots)).unwrap();
        // Two adjacent demand-paged regions, a hole, a third one.
        for gpa in [16 * MB, 17 * MB, 20 * MB] {
            s.map(gpa, MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap();
        }
        s
    }

    #[test]
    fn bytes_across_pages_and_regions_in_every_mode_and_implementation() {
        for mode in [FaultMode::Vcpu, FaultMode::Handler, FaultMode::Kernel] {
            for imp in ["bonsai", "rwlock", "cow"] {
                let s = space(mode, imp);
                let reader = s.domain().register();
                let guard = reader.read();
                let mem = GuardedMemory::new(&s, &guard);
                // An object straddling a page boundary.
                let a = GuestAddress(16 * MB + PAGE - 4);
                mem.write_obj(0x1122_3344_5566_7788u64, a).unwrap();
                assert_eq!(mem.read_obj::<u64>(a).unwrap(), 0x1122_3344_5566_7788);
                assert_eq!(
                    mem.read_obj::<u32>(GuestAddress(16 * MB + PAGE)).unwrap(),
                    0x1122_3344
                );
                // A slice straddling two adjacent regions: split at the boundary, both halves land.
                let b = GuestAddress(17 * MB - 3);
                mem.write_slice(&[1, 2, 3, 4, 5, 6], b).unwrap();
                let mut got = [0u8; 6];
                mem.read_slice(&mut got, b).unwrap();
                assert_eq!(got, [1, 2, 3, 4, 5, 6], "{mode:?} {imp}");
                assert_eq!(mem.read_obj::<u8>(GuestAddress(17 * MB)).unwrap(), 4);
                // The same through the guest-side path agrees.
                let mut raw = [0u8; 6];
                s.complete_mmio(&guard, b.0, crate::memory::Access::Read(&mut raw))
                    .unwrap();
                assert_eq!(raw, got);
                // Running off a region into a hole: the slice calls fail, `write` stops short.
                let end = GuestAddress(18 * MB - 4);
                assert!(matches!(
                    mem.write_slice(&[9; 8], end),
                    Err(GuestMemoryError::PartialBuffer {
                        expected: 8,
                        completed: 4
                    })
                ));
                assert_eq!(mem.write(&[7; 8], end).unwrap(), 4);
                assert_eq!(mem.read_obj::<u32>(end).unwrap(), 0x0707_0707);
                assert!(mem.read_obj::<u64>(end).is_err());
                assert!(mem.check_range(
                    GuestAddress(16 * MB),
                    2 * MB as usize,
                    Permissions::ReadWrite
                ));
                assert!(!mem.check_range(end, 8, Permissions::Read));
                // Unmapped addresses.
                assert!(matches!(
                    mem.read_obj::<u64>(GuestAddress(64 * MB)),
                    Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(a))) if a == 64 * MB
                ));
                assert!(mem.write_obj(1u32, GuestAddress(19 * MB)).is_err());
                assert!(mem.write_obj(1u32, GuestAddress(1 << 40)).is_err());
                assert!(!mem.check_range(GuestAddress(19 * MB), 1, Permissions::Read));
            }
        }
    }

    #[test]
    fn vcpu_mode_populates_before_touching() {
        // In SIGBUS mode a host access to a missing page of a registered region kills the
        // process: every access below would, without populating first.
        let s = space(FaultMode::Vcpu, "bonsai");
        let reader = s.domain().register();
        let guard = reader.read();
        let mem = GuardedMemory::new(&s, &guard);
        let gpa = 20 * MB + 7 * PAGE + 100;
        assert!(!s.is_resident(gpa));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(gpa)).unwrap(), 0);
        assert!(s.is_resident(gpa));
        // A write spanning three pages, none resident yet.
        let w = 20 * MB + 9 * PAGE - 8;
        let buf: Vec<u8> = (0..(PAGE + 16) as usize).map(|i| i as u8).collect();
        assert!(!s.is_resident(w) && !s.is_resident(w + PAGE) && !s.is_resident(w + 2 * PAGE));
        mem.write_slice(&buf, GuestAddress(w)).unwrap();
        let mut back = vec![0u8; buf.len()];
        mem.read_slice(&mut back, GuestAddress(w)).unwrap();
        assert_eq!(back, buf);
        // Only the touched pages were populated: no fault-around beyond them, no whole region.
        let c = s.counters.snapshot();
        assert_eq!(c.pages_populated, 4, "{c:?}");
        // Through the region collection (vm-memory's GuestMemoryBackend) too.
        let regions = mem.physical_memory().unwrap();
        assert_eq!(regions.num_regions(), 3);
        let (r, off) = regions
            .to_region_addr(GuestAddress(20 * MB + 40 * PAGE))
            .unwrap();
        assert_eq!(r.start_addr(), GuestAddress(20 * MB));
        assert_eq!(r.len(), MB);
        r.write_obj(0xabcdu16, off).unwrap();
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(20 * MB + 40 * PAGE))
                .unwrap(),
            0xabcd
        );
        assert!(
            r.read_obj::<u64>(MemoryRegionAddress(MB - 4)).is_err(),
            "past the region"
        );
        assert!(regions.find_region(GuestAddress(19 * MB)).is_none());
        assert!(GuestMemoryBackend::check_range(
            regions,
            GuestAddress(16 * MB),
            2 * MB as usize
        ));
        assert!(!GuestMemoryBackend::check_range(
            regions,
            GuestAddress(16 * MB),
            3 * MB as usize
        ));
        assert!(!s.is_resident(21 * MB - PAGE), "checking populates nothing");
        assert!(regions.find_region(GuestAddress(18 * MB - 1)).is_some());
        // Backend-level access splits across adjacent regions as well.
        regions
            .write_slice(&[5; 8], GuestAddress(17 * MB - 4))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(17 * MB - 4)).unwrap(),
            0x0505_0505_0505_0505
        );
        assert_eq!(s.counters.snapshot().pages_populated, 7);
    }

    #[test]
    fn read_only_regions_refuse_writes() {
        for mode in [FaultMode::Vcpu, FaultMode::Kernel] {
            let s = space(mode, "bonsai");
            s.protect(17 * MB, MB, true).unwrap();
            let reader = s.domain().register();
            let guard = reader.read();
            let mem = GuardedMemory::new(&s, &guard);
            let ro = GuestAddress(17 * MB + 8);
            let e = mem.write_obj(1u64, ro).unwrap_err();
            assert!(e.to_string().contains("read-only"), "{e}");
            assert!(mem.store(1u32, ro, Ordering::Release).is_err());
            assert_eq!(mem.read_obj::<u64>(ro).unwrap(), 0, "nothing was written");
            assert!(mem.check_range(ro, 8, Permissions::Read));
            assert!(!mem.check_range(ro, 8, Permissions::Write));
            // A write from the writable neighbour into the read-only region: the writable part
            // lands, the rest is refused.
            let edge = GuestAddress(17 * MB - 4);
            assert!(mem.write_slice(&[3; 8], edge).is_err());
            assert_eq!(mem.write(&[3; 8], edge).unwrap(), 4);
            assert_eq!(mem.read_obj::<u64>(edge).unwrap(), 0x0303_0303);
            // Region views refuse too.
            let regions = mem.regions();
            let r = regions.find_region(ro).unwrap();
            assert!(r.write_obj(1u8, MemoryRegionAddress(8)).is_err());
            assert_eq!(r.read_obj::<u8>(MemoryRegionAddress(8)).unwrap(), 0);
        }
    }
}
