//! Guest memory regions: what the address space maps guest-physical ranges to.
#![deny(unsafe_code)]

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::host::Backing;

/// No KVM memslot is installed for the region (yet, or any more).
pub const NO_SLOT: u32 = u32::MAX;

/// What a region is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// The boot area (page tables, boot info, mailbox, image, stacks): populated eagerly,
    /// never demand-paged, never unmapped by a user.
    Boot,
    /// Boot-time RAM.
    Ram,
    /// Memory mapped at run time (control socket, stress churn).
    Hotplug,
}

impl RegionKind {
    /// A short name for listings.
    pub fn name(self) -> &'static str {
        match self {
            RegionKind::Boot => "boot",
            RegionKind::Ram => "ram",
            RegionKind::Hotplug => "hotplug",
        }
    }
}

/// Per-region counters (relaxed atomics; bumped on fault paths, read by `stats`).
#[derive(Debug, Default)]
pub struct RegionCounters {
    /// Faults serviced in this region (each exit or userfault that populated or completed an
    /// access here).
    pub faults: AtomicU64,
    /// Pages this VMM populated in the region.
    pub pages_populated: AtomicU64,
    /// Guest writes refused because the region is read-only.
    pub readonly_writes: AtomicU64,
}

/// A guest-physical range backed by host memory at `HostSpace::host_addr(gpa)`.
///
/// Regions are immutable once published in the address space, except for their memslot
/// number (installed after publication) and counters. Changing anything else publishes a new
/// `Region` (read-copy-update).
#[derive(Debug)]
pub struct Region {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// What backs it.
    pub backing: Backing,
    /// Read-only to the guest.
    pub readonly: bool,
    /// What it is for.
    pub kind: RegionKind,
    /// Registered with the address space's userfaultfd (demand-paged by the VMM).
    pub demand_paged: bool,
    slot: AtomicU32,
    /// Counters.
    pub counters: RegionCounters,
}

impl Region {
    /// A new region with no memslot yet.
    pub fn new(
        gpa: u64,
        size_bytes: u64,
        backing: Backing,
        readonly: bool,
        kind: RegionKind,
        demand_paged: bool,
    ) -> Self {
        Self {
            gpa,
            size_bytes,
            backing,
            readonly,
            kind,
            demand_paged,
            slot: AtomicU32::new(NO_SLOT),
            counters: RegionCounters::default(),
        }
    }

    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.size_bytes
    }

    /// The guest-physical range.
    pub fn range(&self) -> Range<u64> {
        self.gpa..self.end()
    }

    /// The installed KVM memslot, if any.
    pub fn slot(&self) -> Option<u32> {
        match self.slot.load(Relaxed) {
            NO_SLOT => None,
            s => Some(s),
        }
    }

    /// Records the installed memslot (or `None` once deleted).
    pub fn set_slot(&self, slot: Option<u32>) {
        self.slot.store(slot.unwrap_or(NO_SLOT), Relaxed);
    }

    /// The same region, with `readonly` changed and no memslot.
    pub fn with_readonly(&self, readonly: bool) -> Self {
        let mut r = Self::new(
            self.gpa,
            self.size_bytes,
            self.backing,
            readonly,
            self.kind,
            self.demand_paged,
        );
        r.counters = RegionCounters {
            faults: AtomicU64::new(self.counters.faults.load(Relaxed)),
            pages_populated: AtomicU64::new(self.counters.pages_populated.load(Relaxed)),
            readonly_writes: AtomicU64::new(self.counters.readonly_writes.load(Relaxed)),
        };
        r
    }

    /// The piece of this region covering `part` (a sub-range): same backing and protection,
    /// no memslot, fresh counters. Its host memory is the same (the host mapping mirrors
    /// guest-physical space), so nothing is copied.
    pub fn slice(&self, part: Range<u64>) -> Self {
        debug_assert!(part.start >= self.gpa && part.end <= self.end());
        Self::new(
            part.start,
            part.end - part.start,
            self.backing,
            self.readonly,
            self.kind,
            self.demand_paged,
        )
    }
}

/// How the address space stores regions: shared, so that readers, the fault path and the
/// control thread can hold the same one.
pub type RegionRef = Arc<Region>;
