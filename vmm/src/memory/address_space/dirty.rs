//! Logging what is written to guest memory while the guest runs, for a live snapshot
//! (`vmm ctl snapshot --live`): the guest's writes through KVM's dirty log
//! (`KVM_MEM_LOG_DIRTY_PAGES` on every writable memslot), the VMM's own writes (devices,
//! completed accesses) in a bitmap of its own, since KVM sees only the guest's.
//!
//! Pages the VMM populates (first touches, `UFFDIO_COPY`) are neither: a live snapshot finds
//! them by comparing what is present at its end with what it copied (see `snapshot.rs`).
//!
//! The regions must not change while a log is open (a memslot installed meanwhile would not
//! log): the control server holds its ops lock for the whole snapshot.

use std::io;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::{AddressSpace, AsError, PAGE};
use crate::memory::residency::push_set_bits;

/// An open write log; dropping it stops logging.
pub struct DirtyLog<'a> {
    space: &'a AddressSpace,
    /// Memslots that log: `(slot, gpa, size)`.
    slots: Vec<(u32, u64, u64)>,
}

impl std::fmt::Debug for DirtyLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl AddressSpace {
    /// The writable memslots: `(slot, gpa, size)` (the hot-plug window's if open, and every
    /// region's own).
    fn writable_slots(&self) -> Vec<(u32, u64, u64)> {
        let w = self.writer();
        let mut slots: Vec<(u32, u64, u64)> = w
            .regions
            .iter()
            .filter(|(_, p)| !p.windowed && !p.readonly)
            .filter_map(|(&s, p)| p.slot.map(|slot| (slot, s, p.end - s)))
            .collect();
        if let (Some((r, slot)), true) = (&self.window, w.window_open) {
            slots.push((*slot, r.start, r.end - r.start));
        }
        slots
    }

    /// Starts logging every write to guest memory, the guest's and the VMM's. Fails (and
    /// logs nothing) if KVM cannot log a memslot.
    pub fn start_dirty_log(&self) -> Result<DirtyLog<'_>, AsError> {
        let mut log = DirtyLog {
            space: self,
            slots: Vec::new(),
        };
        // The VMM's own writes first: none may fall between the two.
        self.host_dirty_on.store(true, Release);
        for (slot, gpa, size) in self.writable_slots() {
            self.counters.memslot_changes.fetch_add(1, Relaxed);
            self.slots
                .set_dirty_logging(slot, gpa, size, self.host.host_addr(gpa), true)
                .map_err(|source| AsError::Host {
                    what: "starting KVM's dirty log on a memslot",
                    source,
                })?;
            log.slots.push((slot, gpa, size));
        }
        Ok(log)
    }

    /// Records the VMM's own write of `[gpa, gpa + len)` while a log is open.
    #[inline]
    pub(crate) fn host_wrote(&self, gpa: u64, len: u64) {
        if len > 0 && self.host_dirty_on.load(Acquire) {
            let first = gpa / PAGE;
            self.host_dirty
                .set_range(first, (gpa + len).div_ceil(PAGE) - first);
        }
    }
}

impl DirtyLog<'_> {
    /// The pages written since the log was opened or last taken (guest-physical page
    /// numbers, ascending, each once), and clears the log. Call it with the vCPUs paused for
    /// a consistent set.
    pub fn take(&self) -> io::Result<Vec<u64>> {
        let space = self.space;
        let mut pfns = Vec::new();
        for &(slot, gpa, size) in &self.slots {
            let bitmap = space.slots.dirty_log(slot, size)?;
            let first = gpa / PAGE;
            for (i, &word) in bitmap.iter().enumerate() {
                push_set_bits(&mut pfns, first + i as u64 * 64, word);
            }
        }
        pfns.extend(space.host_dirty.take_all());
        pfns.sort_unstable();
        pfns.dedup();
        Ok(pfns)
    }
}

impl Drop for DirtyLog<'_> {
    fn drop(&mut self) {
        let space = self.space;
        for &(slot, gpa, size) in &self.slots {
            space.counters.memslot_changes.fetch_add(1, Relaxed);
            if let Err(e) =
                space
                    .slots
                    .set_dirty_logging(slot, gpa, size, space.host.host_addr(gpa), false)
            {
                tracing::warn!(slot, gpa, error = %e, "stopping KVM's dirty log on a memslot failed");
            }
        }
        space.host_dirty_on.store(false, Release);
        space.host_dirty.take_all();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use rcu::Domain;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::{AsConfig, FaultAround, FaultMode, Limits, Memslots};
    use super::*;
    use crate::memory::guest::GuardedMemory;
    use crate::memory::{Access, Backing, MemslotMode, RegionKind};

    const MB: u64 = 1 << 20;

    /// Memslots that log when asked, with dirty bits the test sets as the guest would.
    #[derive(Default)]
    struct LoggingSlots {
        installed: Mutex<BTreeMap<u32, (u64, u64)>>,
        logging: Mutex<BTreeSet<u32>>,
        /// Guest-written page offsets per slot, as KVM would log them.
        guest_wrote: Mutex<BTreeMap<u32, Vec<u64>>>,
    }

    impl Memslots for Arc<LoggingSlots> {
        fn install(&self, slot: u32, gpa: u64, size: u64, _: u64, _: bool) -> io::Result<()> {
            self.installed.lock().unwrap().insert(slot, (gpa, size));
            Ok(())
        }
        fn delete(&self, slot: u32, _: u64) -> io::Result<()> {
            self.installed.lock().unwrap().remove(&slot);
            Ok(())
        }
        fn capacity(&self) -> u32 {
            8
        }
        fn set_dirty_logging(
            &self,
            slot: u32,
            gpa: u64,
            size: u64,
            _: u64,
            on: bool,
        ) -> io::Result<()> {
            assert_eq!(
                self.installed.lock().unwrap().get(&slot),
                Some(&(gpa, size))
            );
            let mut l = self.logging.lock().unwrap();
            if on {
                l.insert(slot);
            } else {
                l.remove(&slot);
            }
            Ok(())
        }
        fn dirty_log(&self, slot: u32, size: u64) -> io::Result<Vec<u64>> {
            assert!(
                self.logging.lock().unwrap().contains(&slot),
                "slot {slot} does not log"
            );
            let mut bitmap = vec![0u64; (size / PAGE).div_ceil(64) as usize];
            for p in self
                .guest_wrote
                .lock()
                .unwrap()
                .remove(&slot)
                .unwrap_or_default()
            {
                bitmap[(p / 64) as usize] |= 1 << (p % 64);
            }
            Ok(bitmap)
        }
    }

    #[test]
    fn the_log_holds_the_guests_writes_and_the_vmms_own_until_taken() {
        let slots = Arc::new(LoggingSlots::default());
        let cfg = AsConfig {
            implementation: crate::memory::AddressSpaceKind::Bonsai,
            fault_mode: FaultMode::Kernel,
            fault_around: FaultAround::Fixed(1),
            space_bytes: 1 << 30,
            limits: Limits {
                max_regions: 8,
                max_bytes: 256 << 20,
            },
            memslots: MemslotMode::PerRegion,
            hotplug_window: 0..0,
            thp: false,
        };
        let s = AddressSpace::new(&Domain::new(), &cfg, Box::new(slots.clone())).unwrap();
        s.map(16 * MB, MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap();
        s.map(32 * MB, MB, Backing::Anon, true, RegionKind::Hotplug)
            .unwrap();
        let installed = slots.installed.lock().unwrap().clone();
        let slot_of = |gpa| *installed.iter().find(|(_, v)| v.0 == gpa).unwrap().0;
        let (rw, ro) = (slot_of(16 * MB), slot_of(32 * MB));
        let reader = s.domain().register();
        // Nothing is recorded before the log opens.
        {
            let guard = reader.read();
            GuardedMemory::new(&s, &guard)
                .write_obj(1u64, GuestAddress(16 * MB))
                .unwrap();
        }
        let log = s.start_dirty_log().unwrap();
        // Only writable memslots log (the guest cannot write a read-only one).
        assert_eq!(*slots.logging.lock().unwrap(), BTreeSet::from([rw]));
        assert_ne!(rw, ro);
        assert_eq!(log.take().unwrap(), Vec::<u64>::new());
        // The guest writes pages 3 and 200 of the region; the VMM writes a word straddling
        // pages 9 and 10 (vm-memory's path) and completes a guest access to page 7.
        slots.guest_wrote.lock().unwrap().insert(rw, vec![3, 200]);
        {
            let guard = reader.read();
            GuardedMemory::new(&s, &guard)
                .write_obj(7u64, GuestAddress(16 * MB + 10 * PAGE - 4))
                .unwrap();
            s.complete_mmio(&guard, 16 * MB + 7 * PAGE, Access::Write(&[1, 2]))
                .unwrap();
            // Reads are not writes.
            let mut b = [0u8; 8];
            GuardedMemory::new(&s, &guard)
                .read_slice(&mut b, GuestAddress(16 * MB + 50 * PAGE))
                .unwrap();
        }
        let first = 16 * MB / PAGE;
        assert_eq!(
            log.take().unwrap(),
            [3, 7, 9, 10, 200].map(|p| first + p).to_vec()
        );
        // Taking clears it.
        assert_eq!(log.take().unwrap(), Vec::<u64>::new());
        drop(log);
        assert!(slots.logging.lock().unwrap().is_empty());
        // Closed: the VMM's writes are no longer recorded.
        {
            let guard = reader.read();
            GuardedMemory::new(&s, &guard)
                .write_obj(2u64, GuestAddress(16 * MB))
                .unwrap();
        }
        assert!(s.host_dirty.take_all().is_empty());
    }
}
