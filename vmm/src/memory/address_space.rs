//! The VMM's address space: guest-physical regions in a concurrent range map (the Bonsai tree
//! by default), their host memory, their KVM memslots, and the operations that change them.
//!
//! Readers (vCPU threads handling an exit, userfaultfd handler threads) look regions up under
//! an RCU read guard; writers (the control thread, the stress churn thread) are serialised by
//! one mutex and follow the ordering rules (docs/memory.md):
//!
//! - **map**: reserve host memory, register it with userfaultfd, publish the region, *then*
//!   install the memslot. A guest access that comes before the memslot exits to the VMM,
//!   finds the region and is serviced.
//! - **unmap**: unpublish (remaining pieces of split regions are published in the same
//!   store), delete the memslots, wait for a grace period (no thread can still be servicing a
//!   fault in the range), *then* unregister and free the host memory. Without the grace
//!   period a late `UFFDIO_COPY` could land in memory mapped again at the same place.
//! - **protect**: publish the region with its new protection, then swap its memslot.
//! - In window mode (`MemslotMode::Window`) run-time regions use the hot-plug window's memslot:
//!   no memslot is installed or deleted; `protect` changes the host protection instead, made
//!   writable before publishing and read-only after; KVM follows host-mapping changes through
//!   its MMU notifiers.
//!
//! Every failure rolls back: the tree, the memslots and the host mappings stay consistent.
#![deny(unsafe_code)]

mod backing;
mod dirty;

use backing::Teardown;
pub use dirty::DirtyLog;
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use rcu::baselines::AnyRangeMap;
use rcu::{ConcurrentRangeMap, Domain, RangeError, RangeValue};

use super::host::{Backing, HostSpace};
use super::region::{Region, RegionKind};
use super::residency::Residency;
use super::uffd::{Uffd, UffdMode};

/// Page size.
pub const PAGE: u64 = abi::layout::PAGE_SIZE;

/// A batched unmap ([`AddressSpace::unmap_many`]) that failed: what it did before the failure
/// (nothing, unless a host call failed part way) and the failure.
#[derive(Debug)]
pub struct PartialUnmap {
    /// The removed pieces of the ranges unmapped before the failure, in the order given.
    pub done: Vec<Vec<RegionInfo>>,
    /// What failed.
    pub error: AsError,
}

/// A region as the range map stores it: shared between the map, readers and the writer.
#[derive(Clone, Debug)]
pub struct RegionRef(pub Arc<Region>);

impl std::ops::Deref for RegionRef {
    type Target = Region;
    fn deref(&self) -> &Region {
        &self.0
    }
}

impl RangeValue for RegionRef {
    fn slice(&self, _whole: Range<u64>, part: Range<u64>) -> Self {
        RegionRef(Arc::new(self.0.slice(part)))
    }
}

/// Installs and deletes KVM memslots (the KVM VM in production; a fake in unit tests, or a
/// failing one for fault injection).
pub trait Memslots: Send + Sync {
    /// Installs memslot `slot` for `[gpa, gpa + size)` at host address `host_addr`.
    fn install(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        readonly: bool,
    ) -> io::Result<()>;
    /// Deletes memslot `slot` (KVM waits until no vCPU uses it).
    fn delete(&self, slot: u32, gpa: u64) -> io::Result<()>;
    /// How many memslots the host allows.
    fn capacity(&self) -> u32;
    /// Starts (`on`) or stops logging the guest's writes to memslot `slot`, installed as given
    /// (`KVM_MEM_LOG_DIRTY_PAGES`). Unsupported unless implemented.
    fn set_dirty_logging(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        on: bool,
    ) -> io::Result<()> {
        let _ = (slot, gpa, size, host_addr, on);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// The pages of memslot `slot` (`size` bytes) the guest wrote since logging started or
    /// since the last call, one bit per page from the slot's start (`KVM_GET_DIRTY_LOG`).
    fn dirty_log(&self, slot: u32, size: u64) -> io::Result<Vec<u64>> {
        let _ = (slot, size);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// How first touches of guest memory are serviced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// userfaultfd in SIGBUS mode: a first touch exits to the faulting vCPU's thread.
    Vcpu,
    /// userfaultfd with handler threads.
    Handler,
    /// The host kernel's own faults.
    Kernel,
}

impl FaultMode {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            FaultMode::Vcpu => "vcpu",
            FaultMode::Handler => "handler",
            FaultMode::Kernel => "kernel",
        }
    }
}

/// How guest-physical regions are laid onto KVM memslots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemslotMode {
    /// A few long-lived memslots (windows) over the host reservation: boot RAM's, installed
    /// once, and one hot-plug window. Run-time regions inside the window change only the tree
    /// and the host mappings; KVM follows the host mappings through its MMU notifiers.
    Window,
    /// One memslot per region, installed and deleted with it (the baseline).
    PerRegion,
}

impl MemslotMode {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            MemslotMode::Window => "window",
            MemslotMode::PerRegion => "per-region",
        }
    }
}

/// Limits on what may be mapped.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most regions at once.
    pub max_regions: usize,
    /// Most guest memory mapped at once, in bytes.
    pub max_bytes: u64,
}

/// Why an address-space operation failed. Each maps to a control-protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum AsError {
    /// Malformed: unaligned, empty, out of range.
    #[error("{0}")]
    Invalid(String),
    /// Overlaps an existing region.
    #[error("[{gpa:#x}, {end:#x}) overlaps region [{}, {})", fmt_hex(existing.start), fmt_hex(existing.end))]
    Overlap {
        /// Start asked for.
        gpa: u64,
        /// End asked for.
        end: u64,
        /// The region it overlaps.
        existing: Range<u64>,
    },
    /// Nothing mapped there.
    #[error("no region in [{gpa:#x}, {end:#x})")]
    NotFound {
        /// Start asked for.
        gpa: u64,
        /// End asked for.
        end: u64,
    },
    /// Over a limit.
    #[error("{0}")]
    Limit(String),
    /// The range holds boot memory or a device.
    #[error("[{gpa:#x}, {end:#x}) touches {what} memory, which cannot be changed at run time")]
    Reserved {
        /// Start asked for.
        gpa: u64,
        /// End asked for.
        end: u64,
        /// What is there.
        what: &'static str,
    },
    /// The range overlaps the 32-bit device hole.
    #[error(
        "[{gpa:#x}, {end:#x}) overlaps the device hole [{}, {})",
        fmt_hex(abi::layout::HOLE_START),
        fmt_hex(abi::layout::HOLE_END)
    )]
    DeviceHole {
        /// Start asked for.
        gpa: u64,
        /// End asked for.
        end: u64,
    },
    /// The host refused (mmap, userfaultfd, memslot); everything was rolled back.
    #[error("{what} failed: {source} (nothing was changed)")]
    Host {
        /// The step that failed.
        what: &'static str,
        /// The host's error.
        source: io::Error,
    },
}

impl AsError {
    /// The control protocol's error code.
    pub fn code(&self) -> &'static str {
        match self {
            AsError::Invalid(_) => "invalid",
            AsError::Overlap { .. } => "overlap",
            AsError::NotFound { .. } => "not_found",
            AsError::Limit(_) => "limit",
            AsError::Reserved { .. } | AsError::DeviceHole { .. } => "reserved",
            AsError::Host { .. } => "internal",
        }
    }
}

fn fmt_hex(v: u64) -> String {
    format!("{v:#x}")
}

/// The writer's own view: what is mapped and which memslot each region has. Kept under the
/// writer mutex, so that every change is planned (and validated) before anything is touched.
#[derive(Debug, Default)]
struct WriterState {
    /// start -> (end, memslot, kind, readonly, backing)
    regions: BTreeMap<u64, Planned>,
    /// How many of `regions` are run-time (hot-plugged) ones.
    hotplug_regions: usize,
    /// The hot-plug window's memslot is installed.
    window_open: bool,
    free_slots: Vec<u32>,
    next_slot: u32,
    mapped_bytes: u64,
}

#[derive(Clone, Copy, Debug)]
struct Planned {
    end: u64,
    /// Its own memslot, or (`windowed`) the hot-plug window's.
    slot: Option<u32>,
    /// Lies in the hot-plug window: no memslot of its own, ever.
    windowed: bool,
    kind: RegionKind,
    readonly: bool,
    backing: Backing,
}

impl WriterState {
    fn overlapping(&self, range: &Range<u64>) -> Vec<(u64, Planned)> {
        let mut out = Vec::new();
        if let Some((&s, p)) = self.regions.range(..range.start).next_back() {
            if p.end > range.start {
                out.push((s, *p));
            }
        }
        out.extend(
            self.regions
                .range(range.start..range.end)
                .map(|(&s, p)| (s, *p)),
        );
        out
    }

    /// Records a region (or replaces the record of one starting at the same address).
    fn insert(&mut self, start: u64, p: Planned) {
        if let Some(old) = self.regions.insert(start, p) {
            self.hotplug_regions -= usize::from(old.kind == RegionKind::Hotplug);
        }
        self.hotplug_regions += usize::from(p.kind == RegionKind::Hotplug);
    }

    /// Forgets the region starting at `start`.
    fn remove(&mut self, start: u64) {
        if let Some(old) = self.regions.remove(&start) {
            self.hotplug_regions -= usize::from(old.kind == RegionKind::Hotplug);
        }
    }

    fn alloc_slot(&mut self, capacity: u32) -> Option<u32> {
        if let Some(s) = self.free_slots.pop() {
            return Some(s);
        }
        (self.next_slot < capacity).then(|| {
            self.next_slot += 1;
            self.next_slot - 1
        })
    }

    fn slots_available(&self, capacity: u32) -> usize {
        self.free_slots.len() + (capacity.saturating_sub(self.next_slot)) as usize
    }
}

/// How many of `affected` have a memslot of their own (not the hot-plug window's).
fn own_slots(affected: &[(u64, Planned)]) -> usize {
    affected
        .iter()
        .filter(|(_, p)| p.slot.is_some() && !p.windowed)
        .count()
}

/// The pieces of the `affected` regions that stay when `range` is unmapped: each split at most
/// in two.
fn remaining_pieces(affected: &[(u64, Planned)], range: &Range<u64>) -> Vec<(Range<u64>, Planned)> {
    let mut remaining = Vec::new();
    for (s, p) in affected {
        if *s < range.start {
            remaining.push((*s..range.start, *p));
        }
        if p.end > range.end {
            remaining.push((range.end..p.end, *p));
        }
    }
    remaining
}

/// Refuses a change that touches boot memory or boot-time RAM (only run-time regions change).
fn only_hotplug(affected: &[(u64, Planned)], range: &Range<u64>) -> Result<(), AsError> {
    match affected.iter().find(|(_, p)| p.kind != RegionKind::Hotplug) {
        Some((_, p)) => Err(AsError::Reserved {
            gpa: range.start,
            end: range.end,
            what: p.kind.name(),
        }),
        None => Ok(()),
    }
}

/// Refuses a range that would cut a region anywhere but at its backing's page boundaries (a
/// hugetlb region can only be split, unmapped in part or protected in part in whole 2 MiB
/// pages: the host cannot unmap or protect part of a huge page).
fn cuts_on_page_boundaries(affected: &[(u64, Planned)], range: &Range<u64>) -> Result<(), AsError> {
    for (start, p) in affected {
        let align = p.backing.align_bytes();
        let cuts = [range.start, range.end]
            .into_iter()
            .filter(|&c| *start < c && c < p.end);
        if let Some(c) = cuts.into_iter().find(|c| c % align != 0) {
            return Err(AsError::Invalid(format!(
                "[{:#x}, {:#x}) would cut the {} region [{start:#x}, {:#x}) at {c:#x}, which is \
                 not a multiple of its page size {align:#x}",
                range.start,
                range.end,
                p.backing.name(),
                p.end
            )));
        }
    }
    Ok(())
}

/// Address-space wide counters.
#[derive(Debug, Default)]
pub struct AsCounters {
    /// Guest reads of unmapped guest-physical addresses (answered with all-ones).
    pub open_bus_reads: AtomicU64,
    /// Guest writes to unmapped guest-physical addresses (dropped).
    pub open_bus_writes: AtomicU64,
    /// Guest writes refused because the region is read-only.
    pub readonly_writes: AtomicU64,
    /// Faults serviced (populates and completed accesses).
    pub faults: AtomicU64,
    /// Pages populated by the VMM.
    pub pages_populated: AtomicU64,
    /// Populates that found the page already there (another thread won).
    pub populate_races: AtomicU64,
    /// Whole 2 MiB of zeroes populated at once by moving in a huge page (`UFFDIO_MOVE`).
    pub huge_fills: AtomicU64,
    /// First touches reported as a bare `-EFAULT` and resolved by decoding the instruction.
    pub unannotated_faults: AtomicU64,
    /// Successful map / unmap / protect operations.
    pub maps: AtomicU64,
    /// See `maps`.
    pub unmaps: AtomicU64,
    /// See `maps`.
    pub protects: AtomicU64,
    /// Memslot ioctls (installs and deletes) the address space has made, the windows' included.
    pub memslot_changes: AtomicU64,
    /// Failures while tearing down unmapped memory (userfaultfd unregister, release of the
    /// host pages): logged, and recovered from where possible (see `teardown`).
    pub teardown_errors: AtomicU64,
}

/// A copy of [`AsCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// See [`AsCounters::open_bus_reads`].
    pub open_bus_reads: u64,
    /// See [`AsCounters::open_bus_writes`].
    pub open_bus_writes: u64,
    /// See [`AsCounters::readonly_writes`].
    pub readonly_writes: u64,
    /// See [`AsCounters::faults`].
    pub faults: u64,
    /// See [`AsCounters::pages_populated`].
    pub pages_populated: u64,
    /// See [`AsCounters::populate_races`].
    pub populate_races: u64,
    /// See [`AsCounters::huge_fills`].
    pub huge_fills: u64,
    /// See [`AsCounters::unannotated_faults`].
    pub unannotated_faults: u64,
    /// See [`AsCounters::maps`].
    pub maps: u64,
    /// See [`AsCounters::unmaps`].
    pub unmaps: u64,
    /// See [`AsCounters::protects`].
    pub protects: u64,
    /// See [`AsCounters::teardown_errors`].
    pub teardown_errors: u64,
    /// See [`AsCounters::memslot_changes`].
    pub memslot_changes: u64,
}

impl AsCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            open_bus_reads: self.open_bus_reads.load(Relaxed),
            open_bus_writes: self.open_bus_writes.load(Relaxed),
            readonly_writes: self.readonly_writes.load(Relaxed),
            faults: self.faults.load(Relaxed),
            pages_populated: self.pages_populated.load(Relaxed),
            populate_races: self.populate_races.load(Relaxed),
            huge_fills: self.huge_fills.load(Relaxed),
            unannotated_faults: self.unannotated_faults.load(Relaxed),
            maps: self.maps.load(Relaxed),
            unmaps: self.unmaps.load(Relaxed),
            protects: self.protects.load(Relaxed),
            teardown_errors: self.teardown_errors.load(Relaxed),
            memslot_changes: self.memslot_changes.load(Relaxed),
        }
    }
}

/// One region as `list` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Memslot, if installed.
    pub slot: Option<u32>,
    /// Backing.
    pub backing: Backing,
    /// Kind.
    pub kind: RegionKind,
    /// Read-only.
    pub readonly: bool,
    /// Pages known present.
    pub resident_pages: u64,
    /// Faults serviced in it.
    pub faults: u64,
}

/// The address space.
pub struct AddressSpace {
    /// First field: dropped first, so the VM (and its memslots) goes before the host memory.
    slots: Box<dyn Memslots>,
    pub(crate) domain: Domain,
    pub(crate) map: AnyRangeMap<RegionRef>,
    pub(crate) host: HostSpace,
    pub(crate) residency: Residency,
    pub(crate) uffd: Option<Uffd>,
    pub(crate) fault_mode: FaultMode,
    /// Pages populated per fault: a fixed window or the adaptive one.
    pub(crate) fault_around: FaultAround,
    /// Zeroes to populate write faults from ([`MAX_FAULT_AROUND`] pages, one huge page).
    pub(crate) zeroes: Box<[u8]>,
    /// `VMM_UFFD_ALWAYS_WAKE=1`: the handler thread's behaviour before issue 16 (wake after
    /// every fault, read the userfaultfd until `EAGAIN`), kept to measure the difference.
    pub(crate) always_wake: bool,
    /// Whether write faults in anonymous RAM fill whole aligned 2 MiB with transparent huge
    /// pages: `--thp`, on a host with THP and a kernel with `UFFDIO_MOVE` (cleared for good if
    /// the kernel refuses a move).
    pub(crate) huge_fill: std::sync::atomic::AtomicBool,
    limits: Limits,
    memslots: MemslotMode,
    /// The hot-plug window and its memslot (window mode).
    window: Option<(Range<u64>, u32)>,
    writer: Mutex<WriterState>,
    /// Counters.
    pub counters: AsCounters,
    /// The snapshot being restored, which first touches are served from (set before any
    /// vCPU runs).
    pub(crate) source: std::sync::OnceLock<super::snapshot::Source>,
    /// The snapshot data file mapped under guest RAM (`kernel` restore mode), and the length
    /// those mappings need: a guest access past a shorter file's end cannot be served.
    pub(crate) mapped_file: Mutex<Option<super::snapshot::MappedFile>>,
    /// A teardown could not put a range of the hot-plug window back to an armed hole: holes are
    /// no longer all armed, and regions there are mapped in full ([`AddressSpace::armed`]).
    window_disarmed: std::sync::atomic::AtomicBool,
    /// While a [`DirtyLog`] is open: the pages the VMM itself wrote (KVM logs the guest's).
    host_dirty: Residency,
    host_dirty_on: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("implementation", &self.map.name())
            .field("fault_mode", &self.fault_mode)
            .finish_non_exhaustive()
    }
}

/// How to build an address space.
#[derive(Clone, Debug)]
pub struct AsConfig {
    /// Which range map holds the regions.
    pub implementation: super::AddressSpaceKind,
    /// Fault mode.
    pub fault_mode: FaultMode,
    /// Fault-around window: fixed (1 = no fault-around) or adaptive.
    pub fault_around: FaultAround,
    /// Guest-physical space mirrored on the host (bytes).
    pub space_bytes: u64,
    /// Limits on run-time mapping.
    pub limits: Limits,
    /// How regions are laid onto memslots.
    pub memslots: MemslotMode,
    /// The hot-plug window (window mode; may be empty): run-time regions must lie inside it.
    pub hotplug_window: Range<u64>,
    /// Transparent huge pages on anonymous and memfd guest memory (`--thp`): the host
    /// mappings ask for them (`MADV_HUGEPAGE`), and in `vcpu` and `handler` modes a write
    /// fault whose fault-around window covers a whole aligned 2 MiB of anonymous memory
    /// fills it with one huge page.
    pub thp: bool,
}

/// The largest fault-around window.
pub const MAX_FAULT_AROUND: u64 = 512;

/// How many pages a first-touch fault populates (`--fault-around`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAround {
    /// The aligned window of this many pages (a power of two, 1 to [`MAX_FAULT_AROUND`])
    /// around the faulting page.
    Fixed(u64),
    /// A window per faulting thread and access stream that grows on sequential and strided
    /// first touches and shrinks on mispredictions (see [`super::window`]).
    Adaptive,
}

impl FaultAround {
    /// `adaptive`, or the number of pages.
    pub fn name(self) -> String {
        match self {
            FaultAround::Fixed(n) => n.to_string(),
            FaultAround::Adaptive => "adaptive".to_owned(),
        }
    }

    /// Parses `adaptive` or a power of two from 1 to [`MAX_FAULT_AROUND`].
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "adaptive" {
            return Ok(FaultAround::Adaptive);
        }
        let v: u64 = s
            .parse()
            .map_err(|_| format!("{s:?} is neither `adaptive` nor a number of pages"))?;
        if v == 0 || v > MAX_FAULT_AROUND || !v.is_power_of_two() {
            return Err(format!(
                "{v}: the fault-around window must be `adaptive` or a power of two from 1 to \
                 {MAX_FAULT_AROUND}"
            ));
        }
        Ok(FaultAround::Fixed(v))
    }
}

impl AddressSpace {
    /// A new, empty address space.
    pub fn new(domain: &Domain, cfg: &AsConfig, slots: Box<dyn Memslots>) -> Result<Self, AsError> {
        let map = AnyRangeMap::new(cfg.implementation.name(), domain)
            .map_err(|e| AsError::Invalid(e.to_string()))?;
        if let FaultAround::Fixed(n) = cfg.fault_around {
            if n == 0 || n > MAX_FAULT_AROUND || !n.is_power_of_two() {
                return Err(AsError::Invalid(format!(
                    "--fault-around {n}: must be a power of two from 1 to {MAX_FAULT_AROUND}"
                )));
            }
        }
        let mut host = HostSpace::reserve(cfg.space_bytes).map_err(|source| AsError::Host {
            what: "reserving host address space for guest memory",
            source,
        })?;
        host.set_thp(cfg.thp);
        if cfg.thp {
            static WARNED: std::sync::Once = std::sync::Once::new();
            if let Some(kib) = super::host::free_page_reporting_kib() {
                WARNED.call_once(|| {
                    tracing::warn!(
                        reported_kib = kib,
                        "--thp: this host hands free memory back to its hypervisor (free page \
                         reporting), so its free huge pages are usually cold and first touches \
                         can be slower than without --thp (docs/bench.md, \"Huge-page fills\")"
                    )
                });
            }
        }
        let uffd = match cfg.fault_mode {
            FaultMode::Kernel => None,
            FaultMode::Vcpu => Some(Uffd::new(UffdMode::Sigbus)),
            FaultMode::Handler => Some(Uffd::new(UffdMode::Handler)),
        }
        .transpose()
        .map_err(|source| AsError::Host {
            what: "opening a userfaultfd",
            source,
        })?;
        let window = Self::plan_window(cfg, &host, slots.as_ref())?;
        // Huge-page fills need THP from the host and `UFFDIO_MOVE` from the kernel.
        let huge_fill =
            cfg.thp && super::host::thp_enabled() && uffd.as_ref().is_some_and(Uffd::can_move);
        Ok(Self {
            domain: domain.clone(),
            map,
            residency: Residency::new(cfg.space_bytes),
            host,
            uffd,
            fault_mode: cfg.fault_mode,
            fault_around: cfg.fault_around,
            // Enough for the largest fault-around run or one 2 MiB huge page (untouched: it
            // costs address space, not memory).
            zeroes: vec![
                0u8;
                (MAX_FAULT_AROUND * PAGE).max(Backing::Hugetlb.align_bytes()) as usize
            ]
            .into_boxed_slice(),
            always_wake: std::env::var_os("VMM_UFFD_ALWAYS_WAKE").is_some_and(|v| v == "1"),
            huge_fill: std::sync::atomic::AtomicBool::new(huge_fill),
            slots,
            limits: cfg.limits,
            memslots: cfg.memslots,
            window: window.clone(),
            writer: Mutex::new(WriterState {
                // Slot 0 is the window's.
                next_slot: u32::from(window.is_some()),
                ..WriterState::default()
            }),
            counters: AsCounters::default(),
            source: std::sync::OnceLock::new(),
            mapped_file: Mutex::new(None),
            // `VMM_PROT_NONE_HOLES=1`: holes go back to PROT_NONE as in the other modes (the
            // baseline the armed holes are measured against, `scripts/bench-ab.sh`).
            window_disarmed: std::sync::atomic::AtomicBool::new(
                std::env::var_os("VMM_PROT_NONE_HOLES").is_some_and(|v| v == "1"),
            ),
            host_dirty: Residency::new(cfg.space_bytes),
            host_dirty_on: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The hot-plug window (memslot 0), checked, in window mode with a non-empty window. Its
    /// memslot is installed when the first region is mapped into it ([`Self::open_window`]):
    /// a VM that never hot-plugs pays neither the memslot's creation nor KVM's metadata.
    fn plan_window(
        cfg: &AsConfig,
        host: &HostSpace,
        slots: &dyn Memslots,
    ) -> Result<Option<(Range<u64>, u32)>, AsError> {
        let w = &cfg.hotplug_window;
        if cfg.memslots != MemslotMode::Window || w.is_empty() {
            return Ok(None);
        }
        let align = Backing::Hugetlb.align_bytes();
        if w.start % align != 0 || w.end % align != 0 || w.end > cfg.space_bytes {
            return Err(AsError::Invalid(format!(
                "the hot-plug window [{:#x}, {:#x}) must be 2 MiB aligned and lie within the \
                 {:#x} bytes of guest-physical space",
                w.start, w.end, cfg.space_bytes
            )));
        }
        let _ = (host, slots);
        Ok(Some((w.clone(), 0)))
    }

    /// Installs the hot-plug window's memslot over the `PROT_NONE` reservation if it is not
    /// there yet (window mode): from then on every region mapped into the window is reachable
    /// by the guest as soon as its host mapping exists.
    pub fn open_window(&self) -> Result<(), AsError> {
        let mut w = self.writer();
        self.ensure_window(&mut w)
    }

    fn ensure_window(&self, w: &mut WriterState) -> Result<(), AsError> {
        let Some((r, slot)) = &self.window else {
            return Ok(());
        };
        if w.window_open {
            return Ok(());
        }
        if self.armed() {
            self.arm(r.start, r.end - r.start)
                .map_err(|source| AsError::Host {
                    what: "arming the hot-plug window (read-write, registered with userfaultfd)",
                    source,
                })?;
        }
        if let Err(source) = self.install_slot(*slot, r.start, r.end - r.start, false) {
            self.unarm_window(r.start, r.end - r.start);
            return Err(AsError::Host {
                what: "installing the hot-plug window's KVM memslot",
                source,
            });
        }
        w.window_open = true;
        Ok(())
    }

    /// Whether holes in the hot-plug window stay mapped read-write and registered with
    /// userfaultfd (armed) instead of going back to `PROT_NONE`: in window mode, with faults
    /// served on the vCPU threads (userfaultfd in `SIGBUS` mode). A guest access to an armed
    /// hole is a missing-page fault that no thread waits on: `KVM_RUN` fails with `EFAULT`, the
    /// VMM finds no region and completes the access as open bus, exactly as for `PROT_NONE`.
    /// Nothing else can populate such a page (every populate goes through a published
    /// region), so an anonymous read-write region needs no host call to map, and one `madvise`
    /// to unmap: no `mmap`, no userfaultfd (un)registration, no write hold of the process's
    /// `mmap_lock` that would stall every vCPU's own faults. With a handler thread a fault in a
    /// hole would wait for it forever, and without userfaultfd it would be filled with zeroes
    /// by the host kernel: those modes keep holes `PROT_NONE`.
    pub fn armed(&self) -> bool {
        self.window.is_some()
            && self
                .uffd
                .as_ref()
                .is_some_and(|u| u.mode() == UffdMode::Sigbus)
            && !self.window_disarmed.load(Relaxed)
    }

    /// How regions are laid onto memslots.
    pub fn memslot_mode(&self) -> MemslotMode {
        self.memslots
    }

    /// The hot-plug window, in window mode, once its memslot is installed.
    pub fn hotplug_window(&self) -> Option<Range<u64>> {
        let open = self.writer().window_open;
        self.window
            .as_ref()
            .filter(|_| open)
            .map(|(r, _)| r.clone())
    }

    /// Whether a region of `kind` at `range` lies in the hot-plug window (so it needs no
    /// memslot); an error for a run-time region that window mode cannot place.
    fn windowed(&self, kind: RegionKind, range: &Range<u64>) -> Result<bool, AsError> {
        if kind != RegionKind::Hotplug || self.memslots != MemslotMode::Window {
            return Ok(false);
        }
        match &self.window {
            Some((w, _)) if w.start <= range.start && range.end <= w.end => Ok(true),
            Some((w, _)) => Err(AsError::Invalid(format!(
                "[{:#x}, {:#x}) lies outside the hot-plug window [{:#x}, {:#x}); map inside it, \
                 or start the VM with a larger --hotplug-window",
                range.start, range.end, w.start, w.end
            ))),
            None => Err(AsError::Invalid(
                "this VM has no hot-plug window (--hotplug-window 0): nothing can be mapped at \
                 run time"
                    .into(),
            )),
        }
    }

    fn install_slot(&self, slot: u32, gpa: u64, size: u64, readonly: bool) -> io::Result<()> {
        self.counters.memslot_changes.fetch_add(1, Relaxed);
        self.slots
            .install(slot, gpa, size, self.host.host_addr(gpa), readonly)
    }

    fn delete_slot(&self, slot: u32, gpa: u64) -> io::Result<()> {
        self.counters.memslot_changes.fetch_add(1, Relaxed);
        self.slots.delete(slot, gpa)
    }

    /// The RCU domain readers of this address space register with.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The implementation's name.
    pub fn implementation(&self) -> &'static str {
        self.map.name()
    }

    /// The fault mode.
    pub fn fault_mode(&self) -> FaultMode {
        self.fault_mode
    }

    /// The host address of a guest-physical address.
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.host.host_addr(gpa)
    }

    /// The userfaultfd, in fault modes that have one.
    pub fn uffd(&self) -> Option<&Uffd> {
        self.uffd.as_ref()
    }

    /// Whether the VMM knows the page of `gpa` to be present.
    #[cfg(test)]
    pub fn is_resident(&self, gpa: u64) -> bool {
        self.residency.is_present(gpa / PAGE)
    }

    /// The mirrored host space.
    pub fn host(&self) -> &HostSpace {
        &self.host
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hugetlb-backed parts of `range`, from the writer's view (writer side only).
    pub(crate) fn hugetlb_parts(&self, range: &Range<u64>) -> Vec<Range<u64>> {
        self.writer()
            .overlapping(range)
            .into_iter()
            .filter(|(_, p)| p.backing == Backing::Hugetlb)
            .map(|(s, p)| s.max(range.start)..p.end.min(range.end))
            .collect()
    }

    fn validate(&self, gpa: u64, size: u64, align: u64) -> Result<Range<u64>, AsError> {
        if size == 0 {
            return Err(AsError::Invalid("size must not be 0".into()));
        }
        if gpa % align != 0 || size % align != 0 {
            return Err(AsError::Invalid(format!(
                "gpa {gpa:#x} and size {size:#x} must be multiples of {align:#x}"
            )));
        }
        let end = gpa
            .checked_add(size)
            .filter(|&e| e <= self.host.size_bytes())
            .ok_or_else(|| {
                AsError::Invalid(format!(
                    "[{gpa:#x}, {:#x}) lies beyond the guest-physical space ({:#x} bytes)",
                    gpa.saturating_add(size),
                    self.host.size_bytes()
                ))
            })?;
        Ok(gpa..end)
    }

    /// Where a map of `[gpa, gpa + size)` may go, checked without changing anything (the
    /// checks [`Self::map`] makes first, and in the same order): alignment to the backing's
    /// page size and range; for a run-time region, no boot memory, boot RAM or device hole
    /// (`reserved`) and inside the hot-plug window in window mode; no overlap. Callers with
    /// limits of their own (the control server) validate here before applying them.
    pub fn validate_map(
        &self,
        gpa: u64,
        size: u64,
        backing: Backing,
        kind: RegionKind,
    ) -> Result<(), AsError> {
        let range = self.validate(gpa, size, backing.align_bytes())?;
        self.check_map(&self.writer(), kind, &range).map(|_| ())
    }

    /// The checks of a map after [`Self::validate`]; returns whether the region goes in the
    /// hot-plug window.
    fn check_map(
        &self,
        w: &WriterState,
        kind: RegionKind,
        range: &Range<u64>,
    ) -> Result<bool, AsError> {
        let overlapping = w.overlapping(range);
        if kind == RegionKind::Hotplug {
            only_hotplug(&overlapping, range)?;
            use abi::layout::{HOLE_END, HOLE_START};
            if range.start < HOLE_END && HOLE_START < range.end {
                return Err(AsError::DeviceHole {
                    gpa: range.start,
                    end: range.end,
                });
            }
        }
        let windowed = self.windowed(kind, range)?;
        if let Some((s, p)) = overlapping.first() {
            return Err(AsError::Overlap {
                gpa: range.start,
                end: range.end,
                existing: *s..p.end,
            });
        }
        Ok(windowed)
    }

    /// Maps `[gpa, gpa + size)` with fresh zero memory. Boot-time regions (`kind` Boot/Ram)
    /// bypass the run-time limits.
    pub fn map(
        &self,
        gpa: u64,
        size: u64,
        backing: Backing,
        readonly: bool,
        kind: RegionKind,
    ) -> Result<RegionInfo, AsError> {
        let range = self.validate(gpa, size, backing.align_bytes())?;
        let mut w = self.writer();
        let windowed = self.check_map(&w, kind, &range)?;
        if kind == RegionKind::Hotplug {
            let hotplugged = w.hotplug_regions;
            if hotplugged >= self.limits.max_regions {
                return Err(AsError::Limit(format!(
                    "at most {} run-time regions may be mapped at once",
                    self.limits.max_regions
                )));
            }
            if w.mapped_bytes + size > self.limits.max_bytes {
                return Err(AsError::Limit(format!(
                    "mapping {size:#x} more bytes would exceed the limit of {:#x} bytes of guest memory",
                    self.limits.max_bytes
                )));
            }
        }
        let capacity = self.slots.capacity();
        // A region in the hot-plug window uses the window's memslot; others get their own.
        let (slot, own_slot) = match &self.window {
            Some((_, window_slot)) if windowed => (*window_slot, None),
            _ => match w.alloc_slot(capacity) {
                Some(slot) => (slot, Some(slot)),
                None => {
                    return Err(AsError::Limit(format!(
                        "all {capacity} KVM memslots are in use"
                    )))
                }
            },
        };
        let free_own = |w: &mut WriterState| w.free_slots.extend(own_slot);
        if windowed {
            self.ensure_window(&mut w)?;
        }
        let demand_paged = self.uffd.is_some() && kind != RegionKind::Boot;
        let how = Teardown {
            demand_paged,
            backing,
            readonly: windowed && readonly,
            armed: windowed && self.armed(),
        };
        // 1-2. Host memory and its userfaultfd registration.
        if let Err(e) = self.back(gpa, size, how, windowed) {
            free_own(&mut w);
            return Err(e);
        }
        let region = RegionRef(Arc::new(Region::new(
            gpa,
            size,
            backing,
            readonly,
            kind,
            demand_paged,
        )));
        // 3. Publish: from here on a guest access finds the region.
        if let Err(e) = self.map.insert(range.clone(), region.clone()) {
            self.teardown(gpa, size, how);
            free_own(&mut w);
            return Err(match e {
                RangeError::Overlap { existing, .. } => AsError::Overlap {
                    gpa,
                    end: range.end,
                    existing,
                },
                other => AsError::Invalid(other.to_string()),
            });
        }
        // 4. The memslot, last: until it is there, guest accesses exit and are serviced.
        //    (In the window, KVM already has one, and sees the new host mapping on its own.)
        if own_slot.is_some() {
            if let Err(source) = self.install_slot(slot, gpa, size, readonly) {
                let _ = self.map.remove(range);
                // No thread may still be servicing a fault in it when its memory goes.
                self.domain.synchronize();
                self.teardown(gpa, size, how);
                free_own(&mut w);
                return Err(AsError::Host {
                    what: "installing the KVM memslot",
                    source,
                });
            }
        }
        w.insert(
            gpa,
            Planned {
                end: range.end,
                slot: Some(slot),
                windowed,
                kind,
                readonly,
                backing,
            },
        );
        if kind == RegionKind::Hotplug {
            w.mapped_bytes += size;
        }
        self.counters.maps.fetch_add(1, Relaxed);
        Ok(self.info(gpa, size, Some(slot), backing, kind, readonly, 0))
    }

    /// Maps many writable run-time regions of `backing` at once (`(gpa, size)` each, sorted,
    /// not overlapping one another), published in one update: for set-up (`vmm stress
    /// --regions`), where a copy-on-write map would otherwise copy itself once per region. All
    /// or nothing. Per region (or outside the hot-plug window) it maps them one by one.
    pub fn map_all(&self, regions: &[(u64, u64)], backing: Backing) -> Result<(), AsError> {
        let kind = RegionKind::Hotplug;
        let windowed = regions.iter().try_fold(true, |all, &(gpa, size)| {
            let range = self.validate(gpa, size, backing.align_bytes())?;
            Ok::<bool, AsError>(all && self.windowed(kind, &range)?)
        })?;
        let Some((_, window_slot)) = self.window.clone().filter(|_| windowed) else {
            for &(gpa, size) in regions {
                self.map(gpa, size, backing, false, kind)?;
            }
            return Ok(());
        };
        let mut w = self.writer();
        self.ensure_window(&mut w)?;
        let total: u64 = regions.iter().map(|r| r.1).sum();
        if w.hotplug_regions + regions.len() > self.limits.max_regions
            || w.mapped_bytes + total > self.limits.max_bytes
        {
            return Err(AsError::Limit(format!(
                "{} more run-time regions ({total:#x} bytes) would pass the limits",
                regions.len()
            )));
        }
        let demand_paged = self.uffd.is_some();
        let mut done: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
        let how = Teardown {
            demand_paged,
            backing,
            readonly: false,
            armed: self.armed(),
        };
        let undo = |done: &[(u64, u64)]| {
            for &(gpa, size) in done {
                self.teardown(gpa, size, how);
            }
        };
        let mut values = Vec::with_capacity(regions.len());
        for &(gpa, size) in regions {
            let end = gpa + size;
            if let Some((s, p)) = w.overlapping(&(gpa..end)).first() {
                undo(&done);
                return Err(AsError::Overlap {
                    gpa,
                    end,
                    existing: *s..p.end,
                });
            }
            // Every region here lies in the window (checked above).
            if let Err(e) = self.back(gpa, size, how, true) {
                undo(&done);
                return Err(e);
            }
            done.push((gpa, size));
            let region = Region::new(gpa, size, backing, false, kind, demand_paged);
            values.push((gpa..end, RegionRef(Arc::new(region))));
        }
        if let Err(e) = self.map.insert_all(values) {
            undo(&done);
            return Err(AsError::Invalid(e.to_string()));
        }
        for &(gpa, size) in regions {
            w.insert(
                gpa,
                Planned {
                    end: gpa + size,
                    slot: Some(window_slot),
                    windowed: true,
                    kind,
                    readonly: false,
                    backing,
                },
            );
        }
        w.mapped_bytes += total;
        self.counters.maps.fetch_add(regions.len() as u64, Relaxed);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn info(
        &self,
        gpa: u64,
        size: u64,
        slot: Option<u32>,
        backing: Backing,
        kind: RegionKind,
        readonly: bool,
        faults: u64,
    ) -> RegionInfo {
        RegionInfo {
            gpa,
            size_bytes: size,
            slot,
            backing,
            kind,
            readonly,
            resident_pages: self.residency.count_range(gpa / PAGE, size / PAGE),
            faults,
        }
    }

    /// Unmaps every address in `[gpa, gpa + size)`: regions inside go, regions partly covered
    /// are split, and what remains of them stays accessible to the guest at every instant.
    /// Returns the removed pieces; host memory is released before it returns.
    pub fn unmap(&self, gpa: u64, size: u64) -> Result<Vec<RegionInfo>, AsError> {
        let mut removed = self.unmap_many(&[(gpa, size)]).map_err(|p| p.error)?;
        Ok(removed.pop().unwrap_or_default())
    }

    /// Unmaps several ranges as one operation, each as [`unmap`](Self::unmap) would, with one
    /// grace period for all of them and their pages freed together (one TLB flush where the
    /// host allows it, `HostSpace::zap_anon_many`). The ranges must not overlap one another.
    /// Every range is checked before anything changes: if one is refused, none is unmapped
    /// (`PartialUnmap::done` is empty). Only a host call failing part way, deleting a KVM
    /// memslot in per-region mode, can leave the ranges before it unmapped (their pieces in
    /// `done`) and the rest as they were. Returns the removed pieces of each range, in the
    /// order given.
    pub fn unmap_many(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<RegionInfo>>, PartialUnmap> {
        self.unmap_batch(ranges).map_err(|error| PartialUnmap {
            done: Vec::new(),
            error,
        })?
    }

    /// [`unmap_many`](Self::unmap_many): its checks fail with the outer error, a failure part
    /// way with the inner one.
    fn unmap_batch(
        &self,
        ranges: &[(u64, u64)],
    ) -> Result<Result<Vec<Vec<RegionInfo>>, PartialUnmap>, AsError> {
        let mut checked = Vec::with_capacity(ranges.len());
        for &(gpa, size) in ranges {
            checked.push(self.validate(gpa, size, PAGE)?);
        }
        let mut sorted: Vec<&Range<u64>> = checked.iter().collect();
        sorted.sort_by_key(|r| r.start);
        if let Some(w) = sorted.windows(2).find(|w| w[1].start < w[0].end) {
            return Err(AsError::Invalid(format!(
                "the ranges [{:#x}, {:#x}) and [{:#x}, {:#x}) overlap",
                w[0].start, w[0].end, w[1].start, w[1].end
            )));
        }
        let mut w = self.writer();
        // Everything that does not depend on the ranges before it, for every range first:
        // the ranges are disjoint, so what each covers is the same before and after the
        // others go.
        let mut needed = 0usize;
        let mut freed = 0usize;
        for range in &checked {
            let affected = w.overlapping(range);
            if affected.is_empty() {
                return Err(AsError::NotFound {
                    gpa: range.start,
                    end: range.end,
                });
            }
            only_hotplug(&affected, range)?;
            cuts_on_page_boundaries(&affected, range)?;
            // The affected regions' own slots are freed first, so this many are needed beyond
            // them (pieces in the hot-plug window need none).
            freed += own_slots(&affected);
            needed += remaining_pieces(&affected, range)
                .iter()
                .filter(|(_, p)| !p.windowed)
                .count();
        }
        if needed > freed + w.slots_available(self.slots.capacity()) {
            return Err(AsError::Limit(format!(
                "splitting needs {} more KVM memslots than are free",
                needed - freed
            )));
        }
        let mut unpublished = Vec::with_capacity(checked.len());
        let mut failed = None;
        for range in &checked {
            match self.unpublish_range(&mut w, range) {
                Ok(removed) => unpublished.push(removed),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Grace period: no vCPU or handler thread is still servicing a fault in the ranges.
        if !unpublished.is_empty() {
            self.domain.synchronize();
        }
        // Only now: free the host memory, all of it together.
        let mut out = Vec::with_capacity(unpublished.len());
        let mut teardowns = Vec::new();
        for removed in unpublished {
            let mut infos = Vec::with_capacity(removed.len());
            for (r, region) in removed {
                let len = r.end - r.start;
                let faults = region.counters.faults.load(Relaxed);
                infos.push(self.info(
                    r.start,
                    len,
                    None,
                    region.backing,
                    region.kind,
                    region.readonly,
                    faults,
                ));
                // (A run-time region outside the window cannot exist in window mode.)
                let windowed = self.windowed(region.kind, &r).unwrap_or(false);
                let how = Teardown {
                    demand_paged: region.demand_paged,
                    backing: region.backing,
                    readonly: windowed && region.readonly,
                    armed: windowed && self.armed(),
                };
                teardowns.push((r.start, len, how));
                w.mapped_bytes = w.mapped_bytes.saturating_sub(len);
            }
            self.counters.unmaps.fetch_add(1, Relaxed);
            out.push(infos);
        }
        self.teardown_many(&teardowns);
        Ok(match failed {
            Some(error) => Err(PartialUnmap { done: out, error }),
            None => Ok(out),
        })
    }

    /// Steps 1 and 2 of an unmap of `range`: takes it out of the tree (the pieces of partly
    /// covered regions published in the same store) and out of KVM's memslots. Returns what
    /// was removed; its host memory is still there, for after a grace period.
    fn unpublish_range(
        &self,
        w: &mut WriterState,
        range: &Range<u64>,
    ) -> Result<Vec<(Range<u64>, RegionRef)>, AsError> {
        let affected = w.overlapping(range);
        if affected.is_empty() {
            return Err(AsError::NotFound {
                gpa: range.start,
                end: range.end,
            });
        }
        let remaining = remaining_pieces(&affected, range);
        // 1. Unpublish, with the remaining pieces published in the same store.
        let removed = match self.map.remove_range(range.clone()) {
            Ok(r) => r,
            Err(e) => return Err(AsError::Invalid(e.to_string())),
        };
        // 2. Memslots: delete the affected regions' (KVM waits for vCPUs in guest mode);
        //    install slots for the remaining pieces. Between the two, their accesses exit and
        //    are serviced through the tree.
        self.delete_slots_or_restore(w, &affected)?;
        for (r, p) in remaining {
            self.install_piece(w, r, p);
        }
        Ok(removed)
    }

    /// Installs a memslot for a piece left by a split or a protection change and records the
    /// piece. A piece whose memslot cannot be installed stays mapped and published, served
    /// through VM exits (every access finds it in the tree).
    fn install_piece(&self, w: &mut WriterState, r: Range<u64>, p: Planned) -> Option<u32> {
        if p.windowed {
            // The window's memslot covers it already.
            w.insert(r.start, Planned { end: r.end, ..p });
            return p.slot;
        }
        let capacity = self.slots.capacity();
        let slot = w.alloc_slot(capacity).and_then(|slot| {
            let size = r.end - r.start;
            match self.install_slot(slot, r.start, size, p.readonly) {
                Ok(()) => Some(slot),
                Err(e) => {
                    tracing::warn!(slot, gpa = r.start, error = %e, "installing a memslot for a piece failed; it is served by exits");
                    w.free_slots.push(slot);
                    None
                }
            }
        });
        w.insert(
            r.start,
            Planned {
                end: r.end,
                slot,
                ..p
            },
        );
        slot
    }

    /// Deletes the memslots of the `affected` regions (whose change is already published) and
    /// forgets them. If KVM refuses one, the change is undone instead: the original regions are
    /// published again and the memslots already deleted are installed again, so the tree, the
    /// memslots and the host mappings are as before, and the error says what failed. (Nothing
    /// has been released yet: host memory goes only after the grace period that follows.)
    fn delete_slots_or_restore(
        &self,
        w: &mut WriterState,
        affected: &[(u64, Planned)],
    ) -> Result<(), AsError> {
        let mut deleted: Vec<(u64, Planned, u32)> = Vec::new();
        for (s, p) in affected {
            let Some(slot) = p.slot.filter(|_| !p.windowed) else {
                continue;
            };
            let r = crate::inject::hit(crate::inject::Step::MemslotDelete)
                .and_then(|()| self.delete_slot(slot, *s));
            if let Err(source) = r {
                self.republish(affected);
                for (s, p, slot) in deleted {
                    let size = p.end - s;
                    if let Err(e) = self.install_slot(slot, s, size, p.readonly) {
                        // The region stays mapped and is served through exits.
                        tracing::warn!(slot, gpa = s, error = %e, "re-installing a memslot failed; the region is served by exits");
                        w.free_slots.push(slot);
                        if let Some(e) = w.regions.get_mut(&s) {
                            e.slot = None;
                        }
                    }
                }
                return Err(AsError::Host {
                    what: "deleting a KVM memslot",
                    source,
                });
            }
            deleted.push((*s, *p, slot));
        }
        for (s, p) in affected {
            w.remove(*s);
            if let Some(slot) = p.slot.filter(|_| !p.windowed) {
                w.free_slots.push(slot);
            }
        }
        Ok(())
    }

    /// Makes `[gpa, gpa + size)` read-only (or writable again). The range must be fully
    /// mapped by run-time regions; partly covered regions are split.
    pub fn protect(&self, gpa: u64, size: u64, readonly: bool) -> Result<Vec<RegionInfo>, AsError> {
        let range = self.validate(gpa, size, PAGE)?;
        let mut w = self.writer();
        let affected = w.overlapping(&range);
        // Fully covered, no gaps.
        let mut cursor = range.start;
        for (s, p) in &affected {
            if *s > cursor {
                break;
            }
            cursor = cursor.max(p.end);
        }
        if affected.is_empty() || cursor < range.end {
            return Err(AsError::NotFound {
                gpa,
                end: range.end,
            });
        }
        only_hotplug(&affected, &range)?;
        cuts_on_page_boundaries(&affected, &range)?;
        // New pieces: outside parts keep their protection, inside parts get the new one.
        let mut pieces = Vec::new();
        for (s, p) in &affected {
            let inner = (*s).max(range.start)..p.end.min(range.end);
            if *s < inner.start {
                pieces.push((*s..inner.start, *p));
            }
            pieces.push((inner.clone(), Planned { readonly, ..*p }));
            if p.end > inner.end {
                pieces.push((inner.end..p.end, *p));
            }
        }
        let capacity = self.slots.capacity();
        let freed = own_slots(&affected);
        let needed = pieces.iter().filter(|(_, p)| !p.windowed).count();
        if needed > freed + w.slots_available(capacity) {
            return Err(AsError::Limit(
                "not enough free KVM memslots to split the range".into(),
            ));
        }
        // In the hot-plug window the host protection is what the guest sees. Ordered so that
        // the tree never calls a page writable that the host refuses to write (a guest write
        // there would fault with nothing to explain it): made writable on the host before
        // the tree says so, read-only on the host after.
        let windowed: Vec<(Range<u64>, bool)> = affected
            .iter()
            .filter(|(_, p)| p.windowed)
            .map(|(s, p)| ((*s).max(range.start)..p.end.min(range.end), p.readonly))
            .collect();
        if !readonly {
            self.protect_host(&windowed, false)?;
        }
        // 1. Publish the new protection (one store for the whole change).
        let published = self.map_transaction_protect(&affected, &range, readonly);
        if let Err(e) = published {
            if !readonly {
                self.restore_host_protection(&windowed);
            }
            return Err(AsError::Invalid(e.to_string()));
        }
        if readonly {
            if let Err(e) = self.protect_host(&windowed, true) {
                self.republish(&affected);
                return Err(e);
            }
        }
        // 2. Swap memslots (regions with their own).
        self.delete_slots_or_restore(&mut w, &affected)?;
        let mut out = Vec::new();
        for (r, p) in pieces {
            let slot = self.install_piece(&mut w, r.clone(), p);
            if r.start >= range.start && r.end <= range.end {
                let len = r.end - r.start;
                out.push(self.info(r.start, len, slot, p.backing, p.kind, p.readonly, 0));
            }
        }
        self.counters.protects.fetch_add(1, Relaxed);
        Ok(out)
    }

    /// Sets the host protection of the windowed `parts` (each with its protection before);
    /// on a failure, puts back the parts already changed and says what failed.
    fn protect_host(&self, parts: &[(Range<u64>, bool)], readonly: bool) -> Result<(), AsError> {
        for (i, (r, _)) in parts.iter().enumerate() {
            let done = crate::inject::hit(crate::inject::Step::Mprotect)
                .and_then(|()| self.host.protect(r.start, r.end - r.start, readonly));
            if let Err(source) = done {
                self.restore_host_protection(&parts[..i]);
                return Err(AsError::Host {
                    what: "changing the host protection of guest memory",
                    source,
                });
            }
        }
        Ok(())
    }

    /// Puts the windowed `parts` back to their protection before a failed change.
    fn restore_host_protection(&self, parts: &[(Range<u64>, bool)]) {
        for (r, was_readonly) in parts {
            if let Err(e) = self.host.protect(r.start, r.end - r.start, *was_readonly) {
                tracing::error!(gpa = r.start, error = %e, "restoring the host protection of guest memory failed");
            }
        }
    }

    /// Publishes the `affected` regions again as they were (undoing a published change).
    fn republish(&self, affected: &[(u64, Planned)]) {
        for (s, p) in affected {
            let demand_paged = self.uffd.is_some() && p.kind != RegionKind::Boot;
            let original = Region::new(*s, p.end - s, p.backing, p.readonly, p.kind, demand_paged);
            if let Err(e) = self.map.replace(*s..p.end, RegionRef(Arc::new(original))) {
                tracing::error!(gpa = s, error = %e, "re-publishing a region after a failed change failed");
            }
        }
    }

    fn map_transaction_protect(
        &self,
        affected: &[(u64, Planned)],
        range: &Range<u64>,
        readonly: bool,
    ) -> Result<(), RangeError> {
        // Each covered part is replaced by a copy with the new protection; the parts outside
        // are cut off the old value by `replace` (sliced), all in one publication per region.
        for (s, p) in affected {
            let inner = (*s).max(range.start)..p.end.min(range.end);
            let demand_paged = self.uffd.is_some() && p.kind != RegionKind::Boot;
            let new = Region::new(
                inner.start,
                inner.end - inner.start,
                p.backing,
                readonly,
                p.kind,
                demand_paged,
            );
            self.map.replace(inner, RegionRef(Arc::new(new)))?;
        }
        Ok(())
    }

    /// Every region, in order, with its memslot and residency.
    pub fn list(&self) -> Vec<RegionInfo> {
        let w = self.writer();
        let snapshot = self.map.snapshot();
        snapshot
            .into_iter()
            .map(|(r, region)| {
                let slot = w.regions.get(&r.start).and_then(|p| p.slot);
                self.info(
                    r.start,
                    r.end - r.start,
                    slot,
                    region.backing,
                    region.kind,
                    region.readonly,
                    region.counters.faults.load(Relaxed),
                )
            })
            .collect()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no region is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::fault::{Access, PageState, Serviced};
    use std::sync::atomic::AtomicBool;

    /// Memslots that KVM would have: recorded, optionally failing.
    #[derive(Default)]
    struct FakeSlots {
        installed: Mutex<BTreeMap<u32, (u64, u64, bool)>>,
        fail_install: AtomicBool,
        fail_delete: AtomicBool,
        /// Refuse to delete the memslot of the region at this address.
        fail_delete_at: Mutex<Option<u64>>,
    }

    impl Memslots for Arc<FakeSlots> {
        fn install(&self, slot: u32, gpa: u64, size: u64, _host: u64, ro: bool) -> io::Result<()> {
            if self.fail_install.load(Relaxed) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.installed.lock().unwrap().insert(slot, (gpa, size, ro));
            Ok(())
        }
        fn delete(&self, slot: u32, gpa: u64) -> io::Result<()> {
            if self.fail_delete.load(Relaxed) || *self.fail_delete_at.lock().unwrap() == Some(gpa) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.installed.lock().unwrap().remove(&slot);
            Ok(())
        }
        fn capacity(&self) -> u32 {
            8
        }
    }

    fn space(mode: FaultMode, implementation: &str) -> (AddressSpace, Arc<FakeSlots>) {
        let slots = Arc::new(FakeSlots::default());
        let cfg = AsConfig {
            implementation: super::super::AddressSpaceKind::from_name(implementation).unwrap(),
            fault_mode: mode,
            fault_around: FaultAround::Fixed(4),
            space_bytes: 1 << 30,
            limits: Limits {
                max_regions: 5,
                max_bytes: 256 << 20,
            },
            memslots: MemslotMode::PerRegion,
            hotplug_window: 0..0,
            thp: false,
        };
        let s = AddressSpace::new(&Domain::new(), &cfg, Box::new(slots.clone())).unwrap();
        (s, slots)
    }

    /// An address space in window mode, its hot-plug window [16M, 512M).
    fn window_space(mode: FaultMode) -> (AddressSpace, Arc<FakeSlots>) {
        window_space_with(mode, FaultAround::Fixed(4), false)
    }

    fn window_space_with(
        mode: FaultMode,
        fault_around: FaultAround,
        thp: bool,
    ) -> (AddressSpace, Arc<FakeSlots>) {
        let slots = Arc::new(FakeSlots::default());
        let cfg = AsConfig {
            implementation: super::super::AddressSpaceKind::Bonsai,
            fault_mode: mode,
            fault_around,
            space_bytes: 1 << 30,
            limits: Limits {
                max_regions: 100,
                max_bytes: 256 << 20,
            },
            memslots: MemslotMode::Window,
            hotplug_window: 16 * MB..512 * MB,
            thp,
        };
        let s = AddressSpace::new(&Domain::new(), &cfg, Box::new(slots.clone())).unwrap();
        (s, slots)
    }

    /// The host protection (`rwxp` column of /proc/self/maps) at host address `addr`.
    fn host_prot(addr: u64) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for l in maps.lines() {
            let (range, rest) = l.split_once(' ').unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            if a <= addr && addr < b {
                return rest[..4].to_owned();
            }
        }
        "unmapped".into()
    }

    /// A batched unmap refuses as a whole (overlapping ranges, one range that maps nothing,
    /// a reserved region) and then changes nothing; otherwise it takes out every range as
    /// `unmap` would, splits included, frees every page (freed together or one by one, by
    /// backing) and leaves the holes as `unmap` leaves them.
    #[test]
    fn a_batched_unmap_takes_every_range_or_none() {
        for mode in [FaultMode::Vcpu, FaultMode::Handler, FaultMode::Kernel] {
            for per_region in [false, true] {
                let (s, _slots) = if per_region {
                    space(mode, "bonsai")
                } else {
                    window_space(mode)
                };
                let what = format!("{mode:?} per-region {per_region}");
                for i in [0, 1, 2, 4, 5u64] {
                    let backing = if i == 5 {
                        Backing::Memfd
                    } else {
                        Backing::Anon
                    };
                    s.map(
                        16 * MB + i * 2 * MB,
                        MB,
                        backing,
                        i == 4,
                        RegionKind::Hotplug,
                    )
                    .unwrap();
                    s.populate_range(16 * MB + i * 2 * MB, MB).unwrap();
                }
                let before: Vec<_> = s.list().iter().map(|r| (r.gpa, r.size_bytes)).collect();
                for bad in [
                    vec![(16 * MB, MB), (16 * MB + PAGE, PAGE)],
                    vec![(16 * MB, MB), (17 * MB, MB)],
                    vec![(16 * MB, MB), (18 * MB, MB + 1)],
                ] {
                    assert!(s.unmap_many(&bad).is_err(), "{what}: {bad:x?}");
                    let now: Vec<_> = s.list().iter().map(|r| (r.gpa, r.size_bytes)).collect();
                    assert_eq!(now, before, "{what}: a refused batch changes nothing");
                }
                // Whole regions (anonymous, read-only, memfd) and a middle part.
                let removed = s
                    .unmap_many(&[
                        (16 * MB, MB),
                        (24 * MB, MB),
                        (26 * MB, MB),
                        (18 * MB, MB),
                        (20 * MB + PAGE, 2 * PAGE),
                    ])
                    .unwrap();
                let got: Vec<Vec<(u64, u64)>> = removed
                    .iter()
                    .map(|v| v.iter().map(|r| (r.gpa, r.size_bytes)).collect())
                    .collect();
                assert_eq!(
                    got,
                    vec![
                        vec![(16 * MB, MB)],
                        vec![(24 * MB, MB)],
                        vec![(26 * MB, MB)],
                        vec![(18 * MB, MB)],
                        vec![(20 * MB + PAGE, 2 * PAGE)],
                    ],
                    "{what}"
                );
                let left: Vec<_> = s.list().iter().map(|r| (r.gpa, r.size_bytes)).collect();
                assert_eq!(
                    left,
                    vec![(20 * MB, PAGE), (20 * MB + 3 * PAGE, MB - 3 * PAGE)],
                    "{what}"
                );
                for (gpa, len) in [
                    (16 * MB, 4 * MB),
                    (20 * MB + PAGE, 2 * PAGE),
                    (24 * MB, 4 * MB),
                ] {
                    let populated =
                        crate::memory::snapshot::count_populated(s.host_addr(gpa), len / PAGE);
                    if mode != FaultMode::Kernel {
                        assert_eq!(populated.unwrap(), 0, "{what}: freed at {gpa:#x}");
                    }
                }
                let hole = if per_region || mode != FaultMode::Vcpu {
                    "---p"
                } else {
                    "rw-p"
                };
                for gpa in [16 * MB, 24 * MB, 26 * MB] {
                    assert_eq!(host_prot(s.host_addr(gpa)), hole, "{what} at {gpa:#x}");
                }
                // The pieces left keep their data.
                let kept =
                    crate::memory::snapshot::count_populated(s.host_addr(20 * MB), 1).unwrap();
                if mode != FaultMode::Kernel {
                    assert_eq!(kept, 1, "{what}");
                }
                s.unmap_many(&[(20 * MB, 4 * MB)]).unwrap();
                assert!(s.list().is_empty(), "{what}");
                assert_eq!(s.counters.snapshot().teardown_errors, 0, "{what}");
            }
        }
    }

    #[test]
    fn window_mode_changes_no_memslot_after_the_window() {
        for mode in [FaultMode::Vcpu, FaultMode::Handler, FaultMode::Kernel] {
            let (s, slots) = window_space(mode);
            let window = || slots.installed.lock().unwrap().clone();
            assert!(
                window().is_empty(),
                "the window's memslot comes with the first region"
            );
            assert_eq!(s.hotplug_window(), None);
            let info = s
                .map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap();
            assert_eq!(info.slot, Some(0), "the window's memslot");
            assert_eq!(window().get(&0), Some(&(16 * MB, 496 * MB, false)));
            assert_eq!(s.hotplug_window(), Some(16 * MB..512 * MB));
            assert_eq!(s.counters.snapshot().memslot_changes, 1);
            let e = s
                .map(8 * MB, MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap_err();
            assert_eq!(e.code(), "invalid");
            assert!(e.to_string().contains("outside the hot-plug window"), "{e}");
            let host = |gpa: u64| host_prot(s.host_addr(gpa));
            assert_eq!(host(17 * MB), "rw-p");
            // Protect the middle: the host mapping turns read-only, nothing else moves.
            let changed = s.protect(17 * MB, MB, true).unwrap();
            assert!(changed[0].readonly);
            assert_eq!(host(17 * MB), "r--p");
            assert_eq!(host(16 * MB), "rw-p");
            let reader = s.domain().register();
            {
                let g = reader.read();
                assert_eq!(
                    s.complete_mmio(&g, 17 * MB, Access::Write(&[1])).unwrap(),
                    Serviced::ReadOnly
                );
                s.complete_mmio(&g, 18 * MB + 8, Access::Write(&[7]))
                    .unwrap();
                assert_eq!(
                    s.fault_page(&g, 17 * MB, true).unwrap(),
                    PageState::ReadOnly
                );
                assert_eq!(s.fault_page(&g, 64 * MB, false).unwrap(), PageState::Hole);
            }
            drop(reader);
            // Split: the middle goes back to being a hole, both sides stay. Holes are armed
            // (read-write, registered with userfaultfd, empty) in vcpu mode, PROT_NONE else.
            let hole = if mode == FaultMode::Vcpu {
                "rw-p"
            } else {
                "---p"
            };
            assert_eq!(s.armed(), mode == FaultMode::Vcpu);
            s.unmap(18 * MB, MB).unwrap();
            assert_eq!(host(18 * MB), hole);
            assert_eq!(host(19 * MB), "rw-p");
            let ranges: Vec<_> = s
                .list()
                .iter()
                .map(|r| (r.gpa, r.size_bytes, r.slot))
                .collect();
            assert_eq!(
                ranges,
                vec![
                    (16 * MB, MB, Some(0)),
                    (17 * MB, MB, Some(0)),
                    (19 * MB, MB, Some(0))
                ]
            );
            s.protect(16 * MB, 2 * MB, false).unwrap();
            assert_eq!(host(17 * MB), "rw-p");
            s.unmap(16 * MB, 4 * MB).unwrap();
            assert!(s.list().is_empty());
            assert_eq!(host(16 * MB), hole);
            let populated =
                crate::memory::snapshot::count_populated(s.host_addr(16 * MB), 4 * MB / PAGE);
            assert_eq!(populated.unwrap(), 0, "{mode:?}: unmapped pages are freed");
            assert_eq!(window().len(), 1, "{mode:?}: only the window");
            assert_eq!(s.counters.snapshot().memslot_changes, 1, "{mode:?}");
        }
    }

    #[test]
    fn map_all_publishes_every_region_or_none() {
        for imp in ["bonsai", "rwlock", "cow"] {
            let slots = Arc::new(FakeSlots::default());
            let cfg = AsConfig {
                implementation: super::super::AddressSpaceKind::from_name(imp).unwrap(),
                fault_mode: FaultMode::Vcpu,
                fault_around: FaultAround::Fixed(1),
                space_bytes: 1 << 30,
                limits: Limits {
                    max_regions: 1000,
                    max_bytes: 256 << 20,
                },
                memslots: MemslotMode::Window,
                hotplug_window: 16 * MB..512 * MB,
                thp: false,
            };
            let s = AddressSpace::new(&Domain::new(), &cfg, Box::new(slots.clone())).unwrap();
            let regions: Vec<(u64, u64)> = (0..100).map(|i| (16 * MB + i * PAGE, PAGE)).collect();
            s.map_all(&regions, Backing::Anon).unwrap();
            assert_eq!(s.len(), 100, "{imp}");
            // One overlapping the first batch: nothing of the second is published.
            let second: Vec<(u64, u64)> = (0..10)
                .map(|i| (32 * MB + i * PAGE, PAGE))
                .chain([(16 * MB, PAGE)])
                .collect();
            assert_eq!(
                s.map_all(&second, Backing::Anon).unwrap_err().code(),
                "overlap"
            );
            assert_eq!(s.len(), 100, "{imp}");
            // Rolled back to a hole: armed in vcpu mode (read-write, empty), nothing published.
            assert_eq!(
                host_prot(s.host_addr(32 * MB)),
                "rw-p",
                "{imp}: rolled back"
            );
            let reader = s.domain().register();
            assert_eq!(
                s.fault_page(&reader.read(), 32 * MB, false).unwrap(),
                PageState::Hole,
                "{imp}"
            );
            drop(reader);
            s.unmap(16 * MB, 100 * PAGE).unwrap();
            assert_eq!(s.len(), 0);
            assert_eq!(
                s.counters.snapshot().memslot_changes,
                1,
                "{imp}: only the window"
            );
        }
    }

    #[test]
    fn window_mode_refuses_a_window_outside_the_space() {
        let cfg = AsConfig {
            implementation: super::super::AddressSpaceKind::Bonsai,
            fault_mode: FaultMode::Kernel,
            fault_around: FaultAround::Fixed(1),
            space_bytes: 1 << 30,
            limits: Limits {
                max_regions: 1,
                max_bytes: 1 << 30,
            },
            memslots: MemslotMode::Window,
            hotplug_window: 512 * MB..2048 * MB,
            thp: false,
        };
        let slots = Arc::new(FakeSlots::default());
        let e = AddressSpace::new(&Domain::new(), &cfg, Box::new(slots.clone())).unwrap_err();
        assert_eq!(e.code(), "invalid");
        assert!(slots.installed.lock().unwrap().is_empty());
    }

    const MB: u64 = 1 << 20;

    #[test]
    fn map_touch_split_unmap_in_every_mode_and_implementation() {
        for mode in [FaultMode::Vcpu, FaultMode::Handler, FaultMode::Kernel] {
            for imp in ["bonsai", "rwlock", "cow"] {
                let (s, slots) = space(mode, imp);
                let info = s
                    .map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
                    .unwrap();
                assert_eq!(info.slot, Some(0));
                let mut reader = s.domain().register();
                {
                    let g = reader.read();
                    // Writes populate (with fault-around) and land; reads see them.
                    for page in 0..8u64 {
                        let gpa = 16 * MB + page * PAGE + 8;
                        let v = (page as u32 + 1).to_le_bytes();
                        assert_eq!(
                            s.complete_mmio(&g, gpa, Access::Write(&v)).unwrap(),
                            Serviced::Ram
                        );
                    }
                    let mut b = [0u8; 4];
                    s.complete_mmio(&g, 16 * MB + 3 * PAGE + 8, Access::Read(&mut b))
                        .unwrap();
                    assert_eq!(u32::from_le_bytes(b), 4, "{mode:?} {imp}");
                    // An access straddling a page boundary.
                    s.complete_mmio(&g, 16 * MB + 9 * PAGE - 2, Access::Write(&[1, 2, 3, 4]))
                        .unwrap();
                    let mut b = [0u8; 4];
                    s.complete_mmio(&g, 16 * MB + 9 * PAGE - 2, Access::Read(&mut b))
                        .unwrap();
                    assert_eq!(b, [1, 2, 3, 4]);
                }
                reader.quiescent_state();
                if mode != FaultMode::Kernel {
                    let c = s.counters.snapshot();
                    // 10 pages touched, populated in aligned windows of 4: pages 0-3, 4-7, 8-11.
                    assert_eq!(c.pages_populated, 12, "{mode:?} {imp}");
                    assert_eq!(c.faults, 3, "{mode:?} {imp}");
                }
                // Unmap the middle: two pieces remain, each with its own memslot, data intact.
                let removed = reader.offline_while(|| s.unmap(17 * MB, MB)).unwrap();
                assert_eq!(removed.len(), 1);
                assert_eq!((removed[0].gpa, removed[0].size_bytes), (17 * MB, MB));
                let list = s.list();
                let ranges: Vec<_> = list.iter().map(|r| (r.gpa, r.size_bytes)).collect();
                assert_eq!(ranges, vec![(16 * MB, MB), (18 * MB, 2 * MB)]);
                assert!(list.iter().all(|r| r.slot.is_some()));
                assert_eq!(slots.installed.lock().unwrap().len(), 2);
                {
                    let g = reader.read();
                    let mut b = [0u8; 4];
                    s.complete_mmio(&g, 16 * MB + 3 * PAGE + 8, Access::Read(&mut b))
                        .unwrap();
                    assert_eq!(u32::from_le_bytes(b), 4, "data kept across the split");
                    let mut b = [0u8; 4];
                    assert_eq!(
                        s.complete_mmio(&g, 17 * MB, Access::Read(&mut b)).unwrap(),
                        Serviced::OpenBus
                    );
                    assert_eq!(b, [0xff; 4]);
                }
                reader.quiescent_state();
                let removed = reader.offline_while(|| s.unmap(16 * MB, 4 * MB)).unwrap();
                assert_eq!(removed.len(), 2);
                assert!(s.list().is_empty());
                assert!(slots.installed.lock().unwrap().is_empty());
            }
        }
    }

    /// The adaptive window in the real fault path (userfaultfd, SIGBUS mode): a sequential
    /// scan takes a few faults and populates exactly what it touches, never the next region;
    /// a strided scan populates only its pages; a read-only region's pages are populated for
    /// reading only; a hugetlb region takes one fault per huge page.
    #[test]
    fn adaptive_window_in_the_fault_path() {
        let slots = Arc::new(FakeSlots::default());
        let cfg = AsConfig {
            implementation: super::super::AddressSpaceKind::Bonsai,
            fault_mode: FaultMode::Vcpu,
            fault_around: FaultAround::Adaptive,
            space_bytes: 1 << 30,
            limits: Limits {
                max_regions: 8,
                max_bytes: 256 << 20,
            },
            memslots: MemslotMode::PerRegion,
            hotplug_window: 0..0,
            thp: false,
        };
        let s = AddressSpace::new(&Domain::new(), &cfg, Box::new(slots)).unwrap();
        for gpa in [16 * MB, 18 * MB, 20 * MB] {
            s.map(gpa, 2 * MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap();
        }
        s.map(22 * MB, 2 * MB, Backing::Anon, true, RegionKind::Hotplug)
            .unwrap();
        let mut reader = s.domain().register();
        let resident = |gpa: u64| {
            s.list()
                .iter()
                .find(|r| r.gpa == gpa)
                .map_or(0, |r| r.resident_pages)
        };
        {
            let g = reader.read();
            // Sequential over the whole first region (512 pages).
            for page in 0..512u64 {
                let gpa = 16 * MB + page * PAGE;
                s.complete_mmio(&g, gpa, Access::Write(&[1])).unwrap();
            }
        }
        let c = s.counters.snapshot();
        assert!(c.faults <= 12, "{c:?}");
        assert_eq!(c.pages_populated, 512, "{c:?}");
        assert_eq!(resident(18 * MB), 0, "never into the next region");
        {
            let g = reader.read();
            // Every 16th page of the second region.
            for page in (0..512u64).step_by(16) {
                s.complete_mmio(&g, 18 * MB + page * PAGE, Access::Write(&[2]))
                    .unwrap();
            }
        }
        let c2 = s.counters.snapshot();
        assert!(c2.faults - c.faults <= 8, "{c2:?}");
        assert_eq!(resident(18 * MB), 32, "only the strided pages");
        // A random order in the third region: one page per fault.
        {
            let g = reader.read();
            let mut x = 12345u64;
            for _ in 0..64 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let page = (x >> 33) % 512;
                s.complete_mmio(&g, 20 * MB + page * PAGE, Access::Write(&[3]))
                    .unwrap();
            }
        }
        let c3 = s.counters.snapshot();
        let (faults, populated) = (
            c3.faults - c2.faults,
            c3.pages_populated - c2.pages_populated,
        );
        assert!(populated <= faults + 4, "about one page per fault: {c3:?}");
        assert!(resident(20 * MB) <= 64 + 4);
        // The read-only region: writes are refused before anything is populated; reads
        // sequentially fetch windows of zero pages.
        {
            let g = reader.read();
            assert_eq!(
                s.fault_page(&g, 22 * MB, true).unwrap(),
                PageState::ReadOnly
            );
            assert_eq!(resident(22 * MB), 0);
            for page in 0..512u64 {
                let mut b = [7u8; 1];
                s.complete_mmio(&g, 22 * MB + page * PAGE, Access::Read(&mut b))
                    .unwrap();
                assert_eq!(b, [0]);
            }
        }
        assert_eq!(resident(22 * MB), 512);
        let c4 = s.counters.snapshot();
        assert!(c4.faults - c3.faults <= 12, "{c4:?}");
        reader.quiescent_state();
        // hugetlb: one fault per 2 MiB page, whatever the window.
        if super::super::host::free_huge_pages() >= 2 {
            s.map(
                64 * MB,
                4 * MB,
                Backing::Hugetlb,
                false,
                RegionKind::Hotplug,
            )
            .unwrap();
            {
                let g = reader.read();
                for page in 0..1024u64 {
                    s.complete_mmio(&g, 64 * MB + page * PAGE, Access::Write(&[4]))
                        .unwrap();
                }
            }
            let c5 = s.counters.snapshot();
            assert_eq!(c5.faults - c4.faults, 2, "{c5:?}");
            assert_eq!(c5.pages_populated - c4.pages_populated, 1024, "{c5:?}");
            reader.quiescent_state();
        } else {
            assert!(
                std::env::var_os("VMM_REQUIRE_HUGETLB").is_none(),
                "VMM_REQUIRE_HUGETLB is set but fewer than 2 huge pages are free"
            );
            eprintln!("skipped the hugetlb part: fewer than 2 free 2 MiB huge pages");
        }
    }

    #[test]
    fn run_time_maps_keep_off_boot_memory_and_the_device_hole() {
        let slots = Arc::new(FakeSlots::default());
        let cfg = AsConfig {
            implementation: super::super::AddressSpaceKind::Bonsai,
            fault_mode: FaultMode::Kernel,
            fault_around: FaultAround::Fixed(1),
            space_bytes: 8 << 30,
            limits: Limits {
                max_regions: 5,
                max_bytes: 256 << 20,
            },
            memslots: MemslotMode::PerRegion,
            hotplug_window: 0..0,
            thp: false,
        };
        let s = AddressSpace::new(&Domain::new(), &cfg, Box::new(slots)).unwrap();
        s.map(0, 8 * MB, Backing::Anon, false, RegionKind::Boot)
            .unwrap();
        s.map(8 * MB, 8 * MB, Backing::Anon, false, RegionKind::Ram)
            .unwrap();
        let hot = |gpa, size| s.validate_map(gpa, size, Backing::Anon, RegionKind::Hotplug);
        for (gpa, what) in [(0, "boot"), (12 * MB, "ram"), (15 * MB, "ram")] {
            let e = hot(gpa, 2 * MB).unwrap_err();
            assert_eq!(e.code(), "reserved", "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        let e = hot(0xbfff_f000, 2 * PAGE).unwrap_err();
        assert_eq!(e.code(), "reserved");
        assert!(
            e.to_string()
                .contains("device hole [0xc0000000, 0x100000000)"),
            "{e}"
        );
        assert_eq!(hot(0xd000_0000, PAGE).unwrap_err().code(), "reserved");
        assert_eq!(hot(16 * MB + 1, PAGE).unwrap_err().code(), "invalid");
        assert_eq!(hot(16 * MB, 0).unwrap_err().code(), "invalid");
        assert_eq!(hot(8 << 30, PAGE).unwrap_err().code(), "invalid");
        assert_eq!(
            s.validate_map(16 * MB, MB, Backing::Hugetlb, RegionKind::Hotplug)
                .unwrap_err()
                .code(),
            "invalid"
        );
        hot(1 << 32, 4 * MB).unwrap();
        s.map(1 << 32, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap();
        assert_eq!(hot((1 << 32) + MB, PAGE).unwrap_err().code(), "overlap");
        // Boot-time regions are laid out by the VMM itself and may go anywhere free.
        s.validate_map(0xc000_0000, PAGE, Backing::Anon, RegionKind::Ram)
            .unwrap();
    }

    #[test]
    fn bad_requests_change_nothing() {
        let (s, slots) = space(FaultMode::Vcpu, "bonsai");
        s.map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap();
        let before = s.list();
        let e = s
            .map(18 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap_err();
        assert_eq!(e.code(), "overlap");
        assert!(e.to_string().contains("0x1000000"), "{e}");
        assert_eq!(
            s.map(18 * MB + 1, PAGE, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap_err()
                .code(),
            "invalid"
        );
        assert_eq!(
            s.map(64 * MB, 0, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap_err()
                .code(),
            "invalid"
        );
        assert_eq!(
            s.map(1 << 30, PAGE, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap_err()
                .code(),
            "invalid"
        );
        assert_eq!(
            s.map(64 * MB, 512 * MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap_err()
                .code(),
            "limit"
        );
        assert_eq!(s.unmap(64 * MB, PAGE).unwrap_err().code(), "not_found");
        assert_eq!(s.unmap(16 * MB + 1, PAGE).unwrap_err().code(), "invalid");
        assert_eq!(
            s.protect(15 * MB, 2 * MB, true).unwrap_err().code(),
            "not_found"
        );
        s.map(0, MB, Backing::Anon, false, RegionKind::Boot)
            .unwrap();
        assert_eq!(s.unmap(0, PAGE).unwrap_err().code(), "reserved");
        // A memslot failure rolls everything back.
        slots.fail_install.store(true, Relaxed);
        let e = s
            .map(64 * MB, MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap_err();
        assert_eq!(e.code(), "internal");
        slots.fail_install.store(false, Relaxed);
        let mut after = s.list();
        after.retain(|r| r.kind != RegionKind::Boot);
        assert_eq!(after, before);
        // And the range is usable again.
        s.map(64 * MB, MB, Backing::Memfd, false, RegionKind::Hotplug)
            .unwrap();
        // Region limit: 5 run-time regions.
        for i in 0..3 {
            s.map(
                (100 + i) * MB,
                MB,
                Backing::Anon,
                false,
                RegionKind::Hotplug,
            )
            .unwrap();
        }
        assert_eq!(
            s.map(200 * MB, MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap_err()
                .code(),
            "limit"
        );
    }

    #[test]
    fn a_refused_memslot_delete_undoes_unmap_and_protect() {
        let (s, slots) = space(FaultMode::Vcpu, "bonsai");
        s.map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap();
        s.map(20 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap();
        {
            let reader = s.domain().register();
            let g = reader.read();
            s.complete_mmio(&g, 17 * MB, Access::Write(&[42])).unwrap();
        }
        // Per-region fault counters of a re-published region start again from zero.
        let list = || {
            let mut l = s.list();
            l.iter_mut().for_each(|r| r.faults = 0);
            l
        };
        let before = list();
        let slots_before = slots.installed.lock().unwrap().clone();
        slots.fail_delete.store(true, Relaxed);
        // A split of one region, an unmap across two, and a protection change all fail...
        for r in [
            s.unmap(17 * MB, MB),
            s.unmap(18 * MB, 4 * MB),
            s.protect(17 * MB, MB, true),
        ] {
            let e = r.unwrap_err();
            assert_eq!(e.code(), "internal");
            assert!(e.to_string().contains("deleting a KVM memslot"), "{e}");
            // ...and leave the tree, the memslots and the memory as they were.
            assert_eq!(list(), before);
            assert_eq!(*slots.installed.lock().unwrap(), slots_before);
        }
        slots.fail_delete.store(false, Relaxed);
        let reader = s.domain().register();
        {
            let g = reader.read();
            let mut b = [0u8];
            s.complete_mmio(&g, 17 * MB, Access::Read(&mut b)).unwrap();
            assert_eq!(b, [42], "the data survived the undone changes");
        }
        drop(reader);
        assert_eq!(s.unmap(17 * MB, MB).unwrap().len(), 1);
        assert_eq!(s.list().len(), 3);
    }

    /// A batched unmap whose second memslot delete is refused: the first range is unmapped
    /// and its memory freed (and says so), the second is as it was.
    #[test]
    fn a_batched_unmap_refused_part_way_says_what_went() {
        let (s, slots) = space(FaultMode::Vcpu, "bonsai");
        for gpa in [16 * MB, 20 * MB] {
            s.map(gpa, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap();
            s.populate_range(gpa, 4 * MB).unwrap();
        }
        *slots.fail_delete_at.lock().unwrap() = Some(20 * MB);
        let p = s
            .unmap_many(&[(16 * MB, 4 * MB), (20 * MB, 4 * MB)])
            .unwrap_err();
        assert_eq!(p.error.code(), "internal", "{}", p.error);
        assert_eq!(p.done.len(), 1);
        assert_eq!(
            (p.done[0][0].gpa, p.done[0][0].size_bytes),
            (16 * MB, 4 * MB)
        );
        let left: Vec<_> = s.list().iter().map(|r| (r.gpa, r.size_bytes)).collect();
        assert_eq!(left, vec![(20 * MB, 4 * MB)]);
        assert_eq!(slots.installed.lock().unwrap().len(), 1);
        let populated = |gpa| {
            crate::memory::snapshot::count_populated(s.host_addr(gpa), 4 * MB / PAGE).unwrap()
        };
        assert_eq!(
            populated(16 * MB),
            0,
            "the unmapped range's memory is freed"
        );
        assert_eq!(
            populated(20 * MB),
            4 * MB / PAGE,
            "the other keeps its pages"
        );
        *slots.fail_delete_at.lock().unwrap() = None;
        s.unmap_many(&[(20 * MB, 4 * MB)]).unwrap();
        assert!(s.list().is_empty());
    }

    #[test]
    fn protect_drops_writes_and_splits() {
        let (s, slots) = space(FaultMode::Vcpu, "bonsai");
        s.map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap();
        let changed = s.protect(17 * MB, MB, true).unwrap();
        assert_eq!(changed.len(), 1);
        assert!(changed[0].readonly);
        let list = s.list();
        assert_eq!(list.len(), 3);
        assert_eq!(list.iter().filter(|r| r.readonly).count(), 1);
        let ro: Vec<_> = slots
            .installed
            .lock()
            .unwrap()
            .values()
            .filter(|v| v.2)
            .cloned()
            .collect();
        assert_eq!(ro, vec![(17 * MB, MB, true)]);
        let reader = s.domain().register();
        let g = reader.read();
        assert_eq!(
            s.complete_mmio(&g, 17 * MB, Access::Write(&[1])).unwrap(),
            Serviced::ReadOnly
        );
        let mut b = [9u8];
        s.complete_mmio(&g, 17 * MB, Access::Read(&mut b)).unwrap();
        assert_eq!(b, [0], "the dropped write left the zero page");
        assert_eq!(
            s.complete_mmio(&g, 16 * MB, Access::Write(&[1])).unwrap(),
            Serviced::Ram
        );
        assert_eq!(s.counters.snapshot().readonly_writes, 1);
        drop(g);
        drop(reader);
        s.protect(16 * MB, 4 * MB, false).unwrap();
        assert!(s.list().iter().all(|r| !r.readonly));
    }

    /// A snapshot data file for the region [16M, 20M): page `i` filled with byte `i + 1`,
    /// every page held except those in `holes`.
    fn snapshot_source(holes: &[u64], record: bool) -> super::super::snapshot::Source {
        use std::io::Write;
        let pages = 4 * MB / PAGE;
        let mut f = tempfile_in_tmp();
        for i in 0..pages {
            f.write_all(&vec![(i + 1) as u8; PAGE as usize]).unwrap();
        }
        let held: Vec<u64> = (0..pages)
            .filter(|i| !holes.contains(i))
            .map(|i| 16 * MB + i * PAGE)
            .collect();
        super::super::snapshot::Source::open(
            f,
            4 * MB,
            vec![super::super::snapshot::SourceRegion {
                gpa: 16 * MB,
                size: 4 * MB,
                file_offset: 0,
            }],
            super::super::snapshot::runs_of(held),
            1 << 30,
            record,
        )
        .unwrap()
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "vmm-source-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn read_byte(s: &AddressSpace, gpa: u64) -> u8 {
        let reader = s.domain().register();
        let g = reader.read();
        let mut b = [0u8];
        s.complete_mmio(&g, gpa, Access::Read(&mut b)).unwrap();
        b[0]
    }

    #[test]
    fn prefetch_never_overwrites_a_written_page_nor_serves_one_twice() {
        for mode in [FaultMode::Vcpu, FaultMode::Handler] {
            let (s, _) = space(mode, "bonsai");
            s.map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap();
            // Page 9 is a hole in the snapshot: zero-fill on demand, never prefetched.
            s.set_source(snapshot_source(&[9], true)).unwrap();
            let held = s.source().unwrap().remaining();
            assert_eq!(held, 4 * MB / PAGE - 1);
            // The guest writes page 5 first (its fault-around window, pages 4..8, comes
            // from the snapshot), then the working set is prefetched over it.
            {
                let reader = s.domain().register();
                let g = reader.read();
                s.complete_mmio(&g, 16 * MB + 5 * PAGE, Access::Write(&[0xab]))
                    .unwrap();
            }
            let stop = AtomicBool::new(false);
            let got = s.prefetch(&[(16 * MB, 16), (16 * MB + 100 * PAGE, 2)], &stop);
            // Pages 0..16 but 4..8 (present) and 9 (not held), and 100..102.
            assert_eq!(got.unwrap(), 16 - 4 - 1 + 2, "{mode:?}");
            assert_eq!(read_byte(&s, 16 * MB + 5 * PAGE), 0xab, "written page kept");
            assert_eq!(
                read_byte(&s, 16 * MB + 5 * PAGE + 1),
                6,
                "rest of it from the snapshot"
            );
            for i in [0u64, 3, 8, 10, 15, 100, 101] {
                assert_eq!(read_byte(&s, 16 * MB + i * PAGE), (i + 1) as u8, "page {i}");
            }
            assert_eq!(read_byte(&s, 16 * MB + 9 * PAGE), 0, "a hole reads zero");
            let src = s.source().unwrap();
            let served = src.served.load(Relaxed);
            assert_eq!(served, 4 + 11 + 2, "{mode:?}");
            assert_eq!(served + src.remaining(), held);
            // Recorded (coalesced): every page served, the hole and the gap left out.
            let ws = src.working_set();
            assert_eq!(
                ws,
                vec![
                    (16 * MB, 9),
                    (16 * MB + 10 * PAGE, 6),
                    (16 * MB + 100 * PAGE, 2)
                ]
            );
            assert_eq!(ws.iter().map(|r| r.1).sum::<u64>(), served);
        }
    }

    #[test]
    fn prefetch_races_with_faulting_threads_and_every_page_is_served_once() {
        let (s, _) = space(FaultMode::Vcpu, "bonsai");
        s.map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap();
        s.set_source(snapshot_source(&[], true)).unwrap();
        let pages = 4 * MB / PAGE;
        // The working set: every page, backwards in runs of 3, against readers going forwards
        // and in a stride.
        let runs: Vec<(u64, u64)> = (0..pages)
            .rev()
            .step_by(3)
            .map(|i| (16 * MB + i.saturating_sub(2) * PAGE, i.min(2) + 1))
            .collect();
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| s.prefetch(&runs, &stop).unwrap());
            for t in 0..3u64 {
                let s = &s;
                sc.spawn(move || {
                    let reader = s.domain().register();
                    for k in 0..pages {
                        let i = (k * (2 * t + 1) + t) % pages;
                        let g = reader.read();
                        s.fault_page(&g, 16 * MB + i * PAGE, t == 1).unwrap();
                    }
                });
            }
        });
        let src = s.source().unwrap();
        assert_eq!(
            src.served.load(Relaxed),
            pages,
            "every page served exactly once"
        );
        assert_eq!(src.remaining(), 0);
        let ws = src.working_set();
        assert_eq!(ws.iter().map(|r| r.1).sum::<u64>(), pages);
        let mut seen = vec![false; pages as usize];
        for (gpa, n) in ws {
            for p in (gpa - 16 * MB) / PAGE..(gpa - 16 * MB) / PAGE + n {
                assert!(!seen[p as usize], "page {p} served twice");
                seen[p as usize] = true;
            }
        }
        for i in 0..pages {
            assert_eq!(
                read_byte(&s, 16 * MB + i * PAGE + 7),
                (i + 1) as u8,
                "page {i}"
            );
        }
    }

    #[test]
    fn armed_holes_hold_no_page_and_a_region_mapped_again_starts_from_zero() {
        let (s, _) = window_space(FaultMode::Vcpu);
        assert!(s.armed());
        let host = |gpa: u64| host_prot(s.host_addr(gpa));
        // A reader per access: the thread must be offline when it unmaps.
        let read = |gpa: u64| {
            let reader = s.domain().register();
            let mut b = [0u8];
            let served = s
                .complete_mmio(&reader.read(), gpa, Access::Read(&mut b))
                .unwrap();
            (served, b[0])
        };
        let write = |gpa: u64, v: u8| {
            let reader = s.domain().register();
            let served = s
                .complete_mmio(&reader.read(), gpa, Access::Write(&[v]))
                .unwrap();
            served
        };
        for backing in [Backing::Anon, Backing::Memfd] {
            s.map(16 * MB, 4 * MB, backing, false, RegionKind::Hotplug)
                .unwrap();
            // The rest of the window is an armed hole: mapped, but open bus and empty.
            assert_eq!(host(64 * MB), "rw-p");
            assert_eq!(read(64 * MB), (Serviced::OpenBus, 0xff));
            assert_eq!(write(64 * MB, 9), Serviced::OpenBus);
            assert_eq!(
                crate::memory::snapshot::count_populated(s.host_addr(64 * MB), 1).unwrap(),
                0,
                "an open-bus access populates nothing"
            );
            assert_eq!(write(17 * MB, 0xab), Serviced::Ram);
            assert_eq!(read(17 * MB), (Serviced::Ram, 0xab));
            s.protect(18 * MB, MB, true).unwrap();
            assert_eq!(
                host(18 * MB),
                if backing == Backing::Anon {
                    "r--p"
                } else {
                    "r--s"
                }
            );
            s.unmap(16 * MB, 4 * MB).unwrap();
            assert_eq!(host(17 * MB), "rw-p", "{backing:?}: back to an armed hole");
            assert_eq!(
                host(18 * MB),
                "rw-p",
                "{backing:?}: read-only region unmapped"
            );
            assert_eq!(
                crate::memory::snapshot::count_populated(s.host_addr(16 * MB), 4 * MB / PAGE)
                    .unwrap(),
                0,
                "{backing:?}: freed"
            );
            assert_eq!(read(17 * MB), (Serviced::OpenBus, 0xff));
            // Mapped again: fresh zero memory, never the old page.
            s.map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
                .unwrap();
            assert_eq!(read(17 * MB), (Serviced::Ram, 0), "{backing:?}");
            s.unmap(16 * MB, 4 * MB).unwrap();
        }
    }

    /// `AnonHugePages` of the mapping that holds host address `addr`, in KiB.
    fn anon_huge_kib(addr: u64) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in smaps.lines() {
            if let Some((range, _)) = l.split_once(' ').filter(|(r, _)| r.contains('-')) {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
                    {
                        inside = a <= addr && addr < b;
                        continue;
                    }
                }
            }
            if let Some(v) = l.strip_prefix("AnonHugePages:").filter(|_| inside) {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        0
    }

    /// A thread that fills windows in chunks (a vCPU thread) populates the chunk around the
    /// faulting page under the fault's guard and the rest of the window afterwards, a chunk per
    /// read-side critical section; what was unmapped in between is not filled, and the guest
    /// finds every other page of the window zero. A thread that does not (this test's other
    /// faults, the handler thread) fills the window whole.
    #[test]
    fn a_window_is_filled_a_chunk_per_critical_section_on_a_thread_that_asks() {
        use super::super::fault::FILL_CHUNK;
        let (s, _) = window_space_with(FaultMode::Vcpu, FaultAround::Fixed(512), false);
        s.map(16 * MB, 4 * MB, Backing::Anon, false, RegionKind::Hotplug)
            .unwrap();
        let populated = || s.counters.snapshot().pages_populated;
        let resident = |gpa: u64, len: u64| {
            crate::memory::snapshot::count_populated(s.host_addr(gpa), len / PAGE).unwrap()
        };
        let chunked = std::thread::scope(|t| {
            t.spawn(|| {
                s.fill_windows_in_chunks();
                let mut reader = s.domain().register();
                // A write at page 5 past 17 MiB: the 2 MiB window [16M, 18M), chunk [17M, 17M + 256K).
                let guard = reader.read();
                let got = s.complete_mmio(&guard, 17 * MB + 5 * PAGE, Access::Write(&[0xcd]));
                drop(guard);
                assert_eq!(got.unwrap(), Serviced::Ram);
                let first = populated();
                let chunk = resident(17 * MB, FILL_CHUNK * PAGE);
                // The upper half of what is still to fill goes before the rest is filled.
                reader
                    .offline_while(|| s.unmap(17 * MB + 512 * 1024, 512 * 1024))
                    .unwrap();
                let rest = s.finish_deferred_fills(&mut reader);
                // Nothing left to do.
                assert_eq!(s.finish_deferred_fills(&mut reader), 0);
                (first, chunk, rest)
            })
            .join()
            .unwrap()
        });
        let (first, chunk, rest) = chunked;
        assert_eq!(
            first, FILL_CHUNK,
            "the faulting page's chunk under its guard"
        );
        assert_eq!(chunk, FILL_CHUNK);
        assert_eq!(
            rest,
            512 - FILL_CHUNK - 128,
            "the window but the unmapped 512 KiB"
        );
        assert_eq!(resident(16 * MB, MB), 256);
        assert_eq!(resident(17 * MB, 512 * 1024), 128);
        assert_eq!(
            resident(17 * MB + 512 * 1024, 512 * 1024),
            0,
            "unmapped meanwhile"
        );
        let reader = s.domain().register();
        let read = |gpa: u64| {
            let mut b = [0u8];
            s.complete_mmio(&reader.read(), gpa, Access::Read(&mut b))
                .unwrap();
            b[0]
        };
        assert_eq!(read(17 * MB + 5 * PAGE), 0xcd);
        assert_eq!(read(16 * MB), 0);
        assert_eq!(read(17 * MB + 400 * 1024), 0);
        // This thread fills whole windows: a fault in [18M, 20M) populates all 512 pages.
        let before = populated();
        assert_eq!(
            s.complete_mmio(&reader.read(), 19 * MB, Access::Write(&[1]))
                .unwrap(),
            Serviced::Ram
        );
        assert_eq!(populated() - before, 512);
        drop(reader);
        s.unmap(16 * MB, 512 * 1024 * 3).unwrap();
        s.unmap(18 * MB, 2 * MB).unwrap();
    }

    /// With `--thp`, a write fault whose window covers a whole aligned 2 MiB of anonymous
    /// memory gets one zeroed huge page (moved in, in both userfaultfd modes): every page reads
    /// zero but the one written, an unmap frees it all, and the region mapped again starts
    /// from zero. A window that covers part of a 2 MiB, memfd memory, and `--thp` off get
    /// copies of zeroes, as before.
    #[test]
    fn thp_fills_a_whole_aligned_window_with_one_zeroed_huge_page() {
        for mode in [FaultMode::Vcpu, FaultMode::Handler] {
            for (thp, backing) in [
                (true, Backing::Anon),
                (true, Backing::Memfd),
                (false, Backing::Anon),
            ] {
                let (s, _) = window_space_with(mode, FaultAround::Fixed(512), thp);
                if !s.uffd.as_ref().unwrap().can_move() {
                    eprintln!("skipped: this kernel has no UFFDIO_MOVE (Linux 6.8 and later)");
                    return;
                }
                let what = format!("{mode:?} thp {thp} {backing:?}");
                let access = |gpa: u64, a: Access<'_>| {
                    let reader = s.domain().register();
                    let served = s.complete_mmio(&reader.read(), gpa, a).unwrap();
                    served
                };
                let read = |gpa: u64| {
                    let mut b = [0u8];
                    assert_eq!(access(gpa, Access::Read(&mut b)), Serviced::Ram, "{what}");
                    b[0]
                };
                s.map(16 * MB, 4 * MB, backing, false, RegionKind::Hotplug)
                    .unwrap();
                assert_eq!(access(17 * MB + 5, Access::Write(&[0xab])), Serviced::Ram);
                let huge = thp && backing == Backing::Anon && super::super::host::thp_enabled();
                let c = s.counters.snapshot();
                assert_eq!(c.huge_fills, u64::from(huge), "{what}");
                assert_eq!(c.pages_populated, 512, "{what}: the aligned 2 MiB window");
                assert_eq!(read(17 * MB + 5), 0xab, "{what}");
                for gpa in [16 * MB, 17 * MB - PAGE, 18 * MB - 1] {
                    assert_eq!(read(gpa), 0, "{what}: {gpa:#x}");
                }
                if huge {
                    assert_eq!(
                        anon_huge_kib(s.host_addr(16 * MB)),
                        2048,
                        "{what}: one transparent huge page"
                    );
                }
                s.unmap(16 * MB, 4 * MB).unwrap();
                assert_eq!(
                    crate::memory::snapshot::count_populated(s.host_addr(16 * MB), 4 * MB / PAGE)
                        .unwrap(),
                    0,
                    "{what}: freed"
                );
                s.map(16 * MB, 4 * MB, backing, false, RegionKind::Hotplug)
                    .unwrap();
                assert_eq!(read(17 * MB + 5), 0, "{what}: mapped again, from zero");
                assert_eq!(access(19 * MB, Access::Write(&[1])), Serviced::Ram);
                assert_eq!(read(19 * MB), 1, "{what}");
                assert_eq!(
                    s.counters.snapshot().huge_fills,
                    if huge { 2 } else { 0 },
                    "{what}: filled huge again after the unmap"
                );
                s.unmap(16 * MB, 4 * MB).unwrap();
            }
        }
    }
}
