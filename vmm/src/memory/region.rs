//! Guest memory regions: what the address space maps guest-physical ranges to.
#![deny(unsafe_code)]

use std::ops::Range;
use std::sync::atomic::AtomicU64;

use super::host::Backing;

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
/// Regions are immutable once published in the address space, except for their counters:
/// changing anything else publishes a new `Region` (read-copy-update). Memslots are the
/// writer's business (see `address_space`): readers never need them.
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
    /// Counters.
    pub counters: RegionCounters,
}

impl Region {
    /// A new region.
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
            counters: RegionCounters::default(),
        }
    }

    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.size_bytes
    }

    /// The piece of this region covering `part` (a sub-range): same backing and protection,
    /// fresh counters. Its host memory is the same (the host mapping mirrors
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
