//! Fault servicing: what a vCPU thread (or a userfaultfd handler thread) does when the guest
//! touches memory the host has not populated, or memory without a memslot.
//!
//! Every entry point runs inside one RCU read-side critical section: the caller passes the
//! guard under which the region is looked up, and the region's host memory cannot be freed
//! before the guard is gone (unmapping waits for a grace period first). A vCPU thread fills a
//! fault-around window a chunk per critical section ([`AddressSpace::fill_windows_in_chunks`]).
//! Nothing here takes a lock or allocates.

use std::io;
use std::sync::atomic::Ordering::Relaxed;

use rcu::{ConcurrentRangeMap, ReadGuard};

use super::address_space::{AddressSpace, FaultAround, MAX_FAULT_AROUND, PAGE};
use super::host::Backing;
use super::region::Region;
use super::uffd::Populated;
use super::window;

/// 4 KiB pages per transparent huge page.
const HUGE_PAGES: u64 = 512;

thread_local! {
    /// This thread's staging area for huge-page fills (`None` if it could not be mapped).
    static HUGE_STAGE: std::cell::OnceCell<Option<super::uffd::HugeStage>> =
        const { std::cell::OnceCell::new() };
    /// The rest of this thread's last fault-around window, when it fills windows in chunks
    /// ([`AddressSpace::fill_windows_in_chunks`]).
    static DEFERRED: std::cell::RefCell<Deferred> = const {
        std::cell::RefCell::new(Deferred { owner: 0, ranges: Vec::new() })
    };
}

/// Pages a thread that fills in chunks populates per read-side critical section: 64 KiB,
/// about 20 µs of copying here, so that a grace period waits for that much at most instead of a
/// whole 2 MiB window. (Chunks of 16, 32 and 64 pages cost the same throughput in paired runs;
/// the unmap p50 beside the adaptive window was 91-98, 106-122 and 113-145 µs: docs/bench.md.)
pub const FILL_CHUNK: u64 = 16;

/// A thread's deferred fault-around: for the address space at `owner` (0: this thread does not
/// fill in chunks), page ranges `[first, end)` still to populate, and whether for writing.
struct Deferred {
    owner: usize,
    ranges: Vec<(u64, u64, bool)>,
}

/// An access the guest made that KVM handed to the VMM to complete (an MMIO exit).
#[derive(Debug)]
pub enum Access<'a> {
    /// A load: fill in the bytes.
    Read(&'a mut [u8]),
    /// A store of these bytes.
    Write(&'a [u8]),
}

/// What became of an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serviced {
    /// Completed against guest RAM (populating it first if needed).
    Ram,
    /// No region covers the address: reads see all-ones, writes are dropped.
    OpenBus,
    /// A write to a read-only region: dropped.
    ReadOnly,
}

/// What [`AddressSpace::fault_page`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// The page was missing and this call populated it: the access can now complete.
    Populated,
    /// The page was already there (or is not demand-paged): nothing to do for it.
    Present,
    /// No region covers the address: open bus.
    Hole,
    /// A write to a read-only region.
    ReadOnly,
}

/// What [`AddressSpace::ensure_present`] did about the faulting page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ensured {
    /// Known present (or not demand-paged, or no userfaultfd): nothing done.
    Present,
    /// It was missing: a fault serviced. `woken`: this call's populate covered the faulting
    /// page itself, which in handler mode also woke the thread sleeping on it; otherwise
    /// another thread populated it first (`EEXIST`).
    Serviced {
        /// The faulting page was populated (and woken) by this call.
        woken: bool,
    },
}

impl Ensured {
    fn serviced(self) -> bool {
        matches!(self, Ensured::Serviced { .. })
    }
}

/// Populating guest memory failed: the host is out of memory or the userfaultfd broke.
#[derive(Debug, thiserror::Error)]
#[error("populating guest page {gpa:#x} failed: {source}")]
pub struct FaultError {
    /// The page.
    pub gpa: u64,
    /// The kernel's error.
    #[source]
    pub source: io::Error,
}

impl AddressSpace {
    /// Completes an MMIO exit at `gpa`: the guest touched a page that is not populated yet
    /// (userfaultfd SIGBUS mode), or an address without a memslot (a region being published
    /// or split, or no region at all).
    pub fn complete_mmio(
        &self,
        guard: &ReadGuard<'_>,
        gpa: u64,
        access: Access<'_>,
    ) -> Result<Serviced, FaultError> {
        // MMIO accesses are at most 8 bytes, but may straddle a page (and so a region)
        // boundary: complete each page's part on its own.
        let len = match &access {
            Access::Read(d) => d.len(),
            Access::Write(d) => d.len(),
        } as u64;
        let mut outcome = Serviced::Ram;
        let mut done = 0u64;
        let mut access = access;
        while done < len {
            let addr = gpa + done;
            let chunk = (PAGE - addr % PAGE).min(len - done);
            let r = match &mut access {
                Access::Read(d) => self.complete_chunk(
                    guard,
                    addr,
                    ChunkAccess::Read(&mut d[done as usize..(done + chunk) as usize]),
                )?,
                Access::Write(d) => self.complete_chunk(
                    guard,
                    addr,
                    ChunkAccess::Write(&d[done as usize..(done + chunk) as usize]),
                )?,
            };
            if r != Serviced::Ram {
                outcome = r;
            }
            done += chunk;
        }
        Ok(outcome)
    }

    fn complete_chunk(
        &self,
        guard: &ReadGuard<'_>,
        gpa: u64,
        access: ChunkAccess<'_>,
    ) -> Result<Serviced, FaultError> {
        self.map.lookup(guard, gpa, |hit| {
            let Some((_, region)) = hit else {
                match access {
                    ChunkAccess::Read(d) => {
                        d.fill(0xff);
                        self.counters.open_bus_reads.fetch_add(1, Relaxed);
                    }
                    ChunkAccess::Write(_) => {
                        self.counters.open_bus_writes.fetch_add(1, Relaxed);
                    }
                }
                return Ok(Serviced::OpenBus);
            };
            let write = matches!(access, ChunkAccess::Write(_));
            if write && region.readonly {
                region.counters.readonly_writes.fetch_add(1, Relaxed);
                self.counters.readonly_writes.fetch_add(1, Relaxed);
                return Ok(Serviced::ReadOnly);
            }
            if self.ensure_present(region, gpa, write)?.serviced() {
                region.counters.faults.fetch_add(1, Relaxed);
                self.counters.faults.fetch_add(1, Relaxed);
            }
            match access {
                ChunkAccess::Read(d) => self.read_present(gpa, d),
                ChunkAccess::Write(d) => self.write_present(gpa, d),
            }
            Ok(Serviced::Ram)
        })
    }

    /// What a fault resolver finds at the page of `gpa` for an access (`write` or not), with
    /// the page populated (and its fault-around window) where a region covers it and the access
    /// is allowed. The caller holds `guard`.
    pub fn fault_page(
        &self,
        guard: &ReadGuard<'_>,
        gpa: u64,
        write: bool,
    ) -> Result<PageState, FaultError> {
        self.map.lookup(guard, gpa, |hit| {
            let Some((_, region)) = hit else {
                return Ok(PageState::Hole);
            };
            if write && region.readonly {
                return Ok(PageState::ReadOnly);
            }
            if self.ensure_present(region, gpa, write)?.serviced() {
                region.counters.faults.fetch_add(1, Relaxed);
                self.counters.faults.fetch_add(1, Relaxed);
                Ok(PageState::Populated)
            } else {
                Ok(PageState::Present)
            }
        })
    }

    /// Populates the page of `gpa` for a fault (see [`fault_page`](Self::fault_page)): `None` if no region covers
    /// `gpa`, else the region's backing and how populating went.
    fn fault_in(
        &self,
        guard: &ReadGuard<'_>,
        gpa: u64,
        write: bool,
    ) -> Option<(Backing, Result<Ensured, FaultError>)> {
        self.map.lookup(guard, gpa, |hit| {
            let (_, region) = hit?;
            let populated = self.ensure_present(region, gpa, write).inspect(|e| {
                if e.serviced() {
                    region.counters.faults.fetch_add(1, Relaxed);
                    self.counters.faults.fetch_add(1, Relaxed);
                }
            });
            Some((region.backing, populated))
        })
    }

    /// Makes the page of `gpa` present: with userfaultfd, populates the fault-around
    /// window's missing pages (never beyond the region, never over a present page, never
    /// for writing in a read-only region): the aligned window of a fixed size, or what this
    /// thread's access stream predicts (adaptive, [`window`]). In a hugetlb region, the whole
    /// huge page (the window does not apply).
    fn ensure_present(
        &self,
        region: &Region,
        gpa: u64,
        write: bool,
    ) -> Result<Ensured, FaultError> {
        let pfn = gpa / PAGE;
        if !region.demand_paged || self.residency.is_present(pfn) {
            return Ok(Ensured::Present);
        }
        let Some(uffd) = &self.uffd else {
            return Ok(Ensured::Present);
        };
        if region.backing == Backing::Hugetlb {
            let n = self.populate_huge_page(uffd, gpa)?;
            region.counters.pages_populated.fetch_add(n, Relaxed);
            return Ok(Ensured::Serviced { woken: n > 0 });
        }
        // Pages of a read-only region map the zero page (a read): never a private copy.
        let write = write && !region.readonly;
        let (lo, hi) = (region.gpa / PAGE, region.end() / PAGE);
        let huge = region.backing == Backing::Anon;
        let (n, woken) = match self.fault_around {
            FaultAround::Fixed(win) => {
                let first = (pfn & !(win - 1)).max(lo);
                let end = ((pfn | (win - 1)) + 1).min(hi);
                self.populate_window(uffd, first, end, write, pfn, huge)?
            }
            FaultAround::Adaptive => {
                let fetch =
                    window::with_streams(self as *const Self as usize, |s| s.fault(pfn, lo, hi));
                match fetch.contiguous() {
                    Some((first, end)) => {
                        self.populate_window(uffd, first, end, write, pfn, huge)?
                    }
                    None => {
                        // A stride: each page on its own (populating the gaps would cost a
                        // page each, for pages the guest skips).
                        let (mut n, mut woken) = (0, false);
                        for i in 0..fetch.count {
                            let p = fetch.page(i);
                            let (k, w) = self.populate_pages(uffd, p, p + 1, write, pfn, false)?;
                            n += k;
                            woken |= w;
                        }
                        (n, woken)
                    }
                }
            }
        };
        region.counters.pages_populated.fetch_add(n, Relaxed);
        Ok(Ensured::Serviced { woken })
    }

    /// The floor of a first touch (`vmm stress --floor`): populates the 4 KiB page of `gpa`
    /// with zeroes for writing and marks it resident, with nothing of the fault path around it:
    /// no lookup, no fault-around, no snapshot source. The caller (a vCPU thread that knows the
    /// page its guest touches next) holds a read guard under which `gpa`'s region is an
    /// anonymous or memfd RAM region. Returns `Ok(false)` when the page was present already, or
    /// when there is no userfaultfd (the fault was about something else).
    pub fn populate_floor_page(
        &self,
        _guard: &ReadGuard<'_>,
        gpa: u64,
    ) -> Result<bool, FaultError> {
        let Some(uffd) = &self.uffd else {
            return Ok(false);
        };
        let page = gpa & !(PAGE - 1);
        match uffd.copy(self.host.host_addr(page), &self.zeroes[..PAGE as usize]) {
            Ok(Populated::Done) => {
                self.residency.set_range(page / PAGE, 1);
                // Not a fault of the VMM's path: `faults` stays what that path served.
                self.counters.pages_populated.fetch_add(1, Relaxed);
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(source) => Err(FaultError { gpa: page, source }),
        }
    }

    /// Populates the 2 MiB huge page of `gpa` (hugetlb backing: userfaultfd works in whole huge
    /// pages there, and has no zero-page ioctl) with zeroes, unless it is known present;
    /// returns how many 4 KiB pages this call populated (0 if another thread won).
    fn populate_huge_page(&self, uffd: &super::uffd::Uffd, gpa: u64) -> Result<u64, FaultError> {
        let huge = Backing::Hugetlb.align_bytes();
        let start = gpa & !(huge - 1);
        let (first, n) = (start / PAGE, huge / PAGE);
        if self.residency.is_present(first) {
            return Ok(0);
        }
        // From the snapshot being restored, if it holds any of the huge page's 4 KiB pages:
        // all of them (the common case) in one copy straight from the data file; some of
        // them through a buffer, the others zero.
        let source = self.source.get();
        let held = source.map_or(0, |src| (first..first + n).filter(|&p| src.has(p)).count());
        let host = self.host.host_addr(start);
        let r = match source {
            Some(src) if held as u64 == n => src.copy_to(uffd, host, first, n),
            Some(src) if held > 0 => {
                let mut buf = vec![0u8; huge as usize];
                let held_gpas = (first..first + n).filter(|&p| src.has(p)).map(|p| p * PAGE);
                for (gpa, end) in super::snapshot::runs_of(held_gpas) {
                    let at = (gpa - start) as usize;
                    src.with_data(gpa / PAGE, (end - gpa) / PAGE, |d| {
                        buf[at..at + d.len()].copy_from_slice(d)
                    })
                    .map_err(|source| FaultError { gpa, source })?;
                }
                uffd.copy(host, &buf)
            }
            _ => uffd.copy(host, &self.zeroes[..huge as usize]),
        };
        if let (Some(src), Ok(Populated::Done), true) = (source, &r, held > 0) {
            src.served_huge(first, n, held as u64);
        }
        match r {
            Ok(Populated::Done) => {
                self.residency.set_range(first, n);
                self.counters.pages_populated.fetch_add(n, Relaxed);
                Ok(n)
            }
            Ok(Populated::AlreadyPresent { .. } | Populated::Partial { .. }) => {
                self.residency.set_range(first, n);
                self.counters.populate_races.fetch_add(1, Relaxed);
                Ok(0)
            }
            Err(source) => Err(FaultError { gpa: start, source }),
        }
    }

    /// [`populate_huge_page`](Self::populate_huge_page) for every huge page that `range`
    /// touches; returns how many 4 KiB pages were populated.
    fn populate_huge_pages(
        &self,
        uffd: &super::uffd::Uffd,
        range: std::ops::Range<u64>,
    ) -> Result<u64, FaultError> {
        let huge = Backing::Hugetlb.align_bytes();
        let mut populated = 0;
        let mut at = range.start & !(huge - 1);
        while at < range.end {
            populated += self.populate_huge_page(uffd, at)?;
            at += huge;
        }
        Ok(populated)
    }

    /// Populates the fault-around window `[first, end)` for a fault at page `target`: all of it,
    /// or, on a thread that fills in chunks ([`fill_windows_in_chunks`](Self::fill_windows_in_chunks)),
    /// the [`FILL_CHUNK`] pages around `target` now and the rest at
    /// [`finish_deferred_fills`](Self::finish_deferred_fills). A window that a huge page can
    /// fill is filled whole (one move).
    fn populate_window(
        &self,
        uffd: &super::uffd::Uffd,
        first: u64,
        end: u64,
        write: bool,
        target: u64,
        huge: bool,
    ) -> Result<(u64, bool), FaultError> {
        let whole = end - first <= FILL_CHUNK
            || (huge && self.huge_fill.load(Relaxed))
            || !DEFERRED.with(|d| d.borrow().owner == self as *const Self as usize);
        if whole {
            return self.populate_pages(uffd, first, end, write, target, huge);
        }
        let c0 = (target & !(FILL_CHUNK - 1)).max(first);
        let c1 = (c0 + FILL_CHUNK).min(end);
        let r = self.populate_pages(uffd, c0, c1, write, target, false)?;
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            // After the chunk first (where a forward scan goes next), then before it.
            for (a, b) in [(c1, end), (first, c0)] {
                if a < b {
                    d.ranges.push((a, b, write));
                }
            }
        });
        Ok(r)
    }

    /// Makes the calling thread fill fault-around windows in chunks of [`FILL_CHUNK`] pages,
    /// one read-side critical section each: a fault populates the chunk around its page, and
    /// [`finish_deferred_fills`](Self::finish_deferred_fills) the rest, with a quiescent state
    /// between chunks. A vCPU thread calls it once; it calls `finish_deferred_fills` after
    /// every exit it handled, before it runs the guest again, so the guest finds the whole
    /// window populated as before, and an `unmap` waits for one chunk instead of a window.
    pub fn fill_windows_in_chunks(&self) {
        DEFERRED.with(|d| {
            *d.borrow_mut() = Deferred {
                owner: self as *const Self as usize,
                // Two ranges per fault at most, and an exit makes few faults: no allocation on
                // the fault path after this one.
                ranges: Vec::with_capacity(8),
            }
        });
    }

    /// Populates what this thread's last faults deferred ([`fill_windows_in_chunks`](Self::fill_windows_in_chunks)),
    /// [`FILL_CHUNK`] pages per read-side critical section of `reader` (which holds no guard:
    /// it is borrowed mutably), announcing a quiescent state after each. Each chunk looks its
    /// region up again and is populated as any host access to it would be
    /// ([`populate_in_region`](Self::populate_in_region)): a region unmapped, split or made
    /// read-only meanwhile is filled as it is now, or not at all. A page that cannot be populated is left to the guest's own
    /// fault, which reports it. Returns the pages populated.
    pub fn finish_deferred_fills(&self, reader: &mut rcu::Reader) -> u64 {
        // Only a fault with userfaultfd defers anything.
        let mut populated = 0;
        while let Some((mut p, end, write)) = DEFERRED.with(|d| d.borrow_mut().ranges.pop()) {
            while p < end {
                let guard = reader.read();
                let next = self.map.lookup(&guard, p * PAGE, |hit| {
                    let Some((_, region)) = hit else {
                        // Unmapped meanwhile: nothing to fill up to the next chunk.
                        return (p + FILL_CHUNK).min(end);
                    };
                    let stop = (p + FILL_CHUNK).min(end).min(region.end() / PAGE);
                    let w = write && !region.readonly;
                    let len = (stop - p) * PAGE;
                    if let Ok(n) = self.populate_in_region(region, p * PAGE, len, w) {
                        populated += n;
                    }
                    stop.max(p + 1)
                });
                drop(guard);
                reader.quiescent_state();
                p = next;
            }
        }
        populated
    }

    /// Populates every page of `[first, end)` (page numbers) not known present, in runs of at
    /// most [`MAX_FAULT_AROUND`] pages, with zeroes; returns how many this call populated, and
    /// whether page `target` was among them. With `huge` (the pages are anonymous private
    /// RAM), whole aligned 2 MiB of zeroes are filled with a transparent huge page where
    /// `--thp` allows it.
    fn populate_pages(
        &self,
        uffd: &super::uffd::Uffd,
        first: u64,
        end: u64,
        write: bool,
        target: u64,
        huge: bool,
    ) -> Result<(u64, bool), FaultError> {
        let huge = huge && self.huge_fill.load(Relaxed);
        let max_run = MAX_FAULT_AROUND;
        let mut populated = 0;
        let mut woken = false;
        let mut p = first;
        while let Some(start) = self.residency.next_missing(p, end) {
            let run_end = self.residency.next_present(start, end).min(start + max_run);
            let mut s = start;
            let source = self.source.get();
            while s < run_end {
                // Pages a snapshot being restored holds come from it; the others are zero.
                let (sub_end, from) = match source {
                    Some(src) => {
                        let held = src.has(s);
                        let mut e = s + 1;
                        while e < run_end && src.has(e) == held {
                            e += 1;
                        }
                        (e, held.then_some(src))
                    }
                    None => (run_end, None),
                };
                let host = self.host.host_addr(s * PAGE);
                // Write faults get private zeroed pages at once (no copy-on-write fault
                // later): a transparent huge page for a whole aligned 2 MiB of anonymous RAM
                // where the host has one, else copies of zeroes (stopping at the next 2 MiB
                // boundary, so that a huge fill can start there). Read faults map the shared
                // zero page.
                let (sub_end, r) = match from {
                    Some(src) => (sub_end, src.copy_to(uffd, host, s, sub_end - s)),
                    None if write => {
                        let huge_end = (s | (HUGE_PAGES - 1)) + 1;
                        match self.fill_huge(uffd, huge && sub_end >= huge_end, s, host) {
                            Some(r) => (huge_end, r),
                            None => {
                                let e = if huge && huge_end < sub_end {
                                    huge_end
                                } else {
                                    sub_end
                                };
                                let bytes = ((e - s) * PAGE) as usize;
                                (e, uffd.copy(host, &self.zeroes[..bytes]))
                            }
                        }
                    }
                    None => (sub_end, uffd.zeropage(host, (sub_end - s) * PAGE)),
                };
                match r {
                    Ok(Populated::Done) => {
                        let n = sub_end - s;
                        self.residency.set_range(s, n);
                        if let Some(src) = from {
                            src.served_run(s, n, 0);
                        }
                        populated += n;
                        woken |= (s..sub_end).contains(&target);
                        s = sub_end;
                    }
                    Ok(Populated::AlreadyPresent { bytes }) => {
                        // `bytes` were populated; the page after them was already there.
                        let n = bytes / PAGE;
                        self.residency.set_range(s, n + 1);
                        if let Some(src) = from {
                            src.served_run(s, n, 1);
                        }
                        populated += n;
                        woken |= (s..s + n).contains(&target);
                        self.counters.populate_races.fetch_add(1, Relaxed);
                        s += n + 1;
                    }
                    Ok(Populated::Partial { bytes }) => {
                        // `bytes` were populated; retry the rest (a present page next is then
                        // `EEXIST`, above).
                        let n = (bytes / PAGE).max(1).min(run_end - s);
                        self.residency.set_range(s, n);
                        if let Some(src) = from {
                            src.served_run(s, (bytes / PAGE).min(n), 0);
                        }
                        populated += n;
                        woken |= (s..s + n).contains(&target);
                        s += n;
                    }
                    Err(source) => {
                        return Err(FaultError {
                            gpa: s * PAGE,
                            source,
                        })
                    }
                }
            }
            p = run_end;
        }
        self.counters.pages_populated.fetch_add(populated, Relaxed);
        Ok((populated, woken))
    }

    /// Fills the 2 MiB at page `s` (aligned, all missing) with a zeroed transparent huge page
    /// ([`Uffd::fill_huge_zeroed`](super::uffd::Uffd::fill_huge_zeroed)) from this thread's
    /// stage, if `want` and `s` is aligned; `None` when it did not try (or the kernel refused
    /// the calls, which turns huge fills off for the address space: copies do the work).
    fn fill_huge(
        &self,
        uffd: &super::uffd::Uffd,
        want: bool,
        s: u64,
        host: u64,
    ) -> Option<io::Result<Populated>> {
        if !want || s % HUGE_PAGES != 0 {
            return None;
        }
        let r = HUGE_STAGE.with(|stage| {
            let stage = stage.get_or_init(|| super::uffd::HugeStage::new().ok());
            stage.as_ref().map(|st| uffd.fill_huge_zeroed(st, host))
        })?;
        match r {
            Ok(p) => {
                if p == Populated::Done {
                    self.counters.huge_fills.fetch_add(1, Relaxed);
                }
                Some(Ok(p))
            }
            Err(e) => {
                // A kernel without the calls (or refusing them here) turns huge fills off; a
                // passing failure (no memory for a huge page, a page being migrated) leaves
                // this 2 MiB to copies.
                let refused = matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EINVAL | libc::ENOTTY | libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP
                    )
                );
                if refused && self.huge_fill.swap(false, Relaxed) {
                    tracing::warn!(
                        "huge-page fills of first touches are off: the kernel refused one ({e}); \
                         zeroes are copied instead"
                    );
                }
                None
            }
        }
    }

    /// Populates `[gpa, gpa + len)` ahead of any guest access (writer side, e.g. before the
    /// boot code writes a user's image into demand-paged RAM). A no-op without userfaultfd.
    pub fn populate_range(&self, gpa: u64, len: u64) -> Result<(), FaultError> {
        let Some(uffd) = &self.uffd else {
            return Ok(());
        };
        // Huge pages where the range lies in hugetlb regions (populated whole), 4 KiB pages
        // elsewhere (the huge ones are then known present and skipped).
        for part in self.hugetlb_parts(&(gpa..gpa + len)) {
            self.populate_huge_pages(uffd, part)?;
        }
        let end = (gpa + len).div_ceil(PAGE);
        self.populate_pages(uffd, gpa / PAGE, end, true, u64::MAX, false)
            .map(|_| ())
    }

    /// Populates the pages of `[gpa, gpa + len)` (clamped to `region`) that the VMM has not
    /// populated yet, so that a host access to them cannot raise a userfault (SIGBUS in vCPU
    /// mode). A no-op for regions that are not demand-paged and without userfaultfd. The
    /// caller holds the read guard under which it found `region`. Returns the pages populated.
    pub(crate) fn populate_in_region(
        &self,
        region: &Region,
        gpa: u64,
        len: u64,
        write: bool,
    ) -> Result<u64, FaultError> {
        if !region.demand_paged || len == 0 {
            return Ok(0);
        }
        let Some(uffd) = &self.uffd else {
            return Ok(0);
        };
        let first = gpa.max(region.gpa) / PAGE;
        let end = gpa.saturating_add(len).min(region.end()).div_ceil(PAGE);
        if first >= end || self.residency.next_missing(first, end).is_none() {
            return Ok(0);
        }
        let n = if region.backing == Backing::Hugetlb {
            self.populate_huge_pages(uffd, first * PAGE..end * PAGE)?
        } else {
            self.populate_pages(uffd, first, end, write, u64::MAX, false)?
                .0
        };
        region.counters.pages_populated.fetch_add(n, Relaxed);
        Ok(n)
    }

    /// Services one fault read from the userfaultfd by a handler thread: the faulting thread
    /// sleeps in the kernel until the page is populated (and woken).
    pub fn handle_userfault(
        &self,
        guard: &ReadGuard<'_>,
        host_addr: u64,
        write: bool,
    ) -> Result<(), FaultError> {
        let Some(gpa) = self.host.gpa_of(host_addr) else {
            return Ok(());
        };
        let hit = self.fault_in(guard, gpa, write);
        if hit.is_none() {
            // No region covers the page any more: it is being unmapped (unpublished, its
            // memory released only after a grace period, which waits for this thread's
            // guard). The faulting thread may be a vCPU inside KVM's page-fault path, holding
            // the KVM SRCU read lock that a memslot deletion waits for: woken without a page it
            // would fault again, for as long as the range stays registered, and the deletion
            // would never finish. Give it a zero page (a whole huge page where only that
            // works) so that its access completes before the memory goes; if the range is no
            // longer registered, the kernel refuses and nothing happens.
            if let Some(u) = &self.uffd {
                let page = host_addr & !(PAGE - 1);
                if u.zeropage(page, PAGE).is_err() {
                    let huge = Backing::Hugetlb.align_bytes();
                    let _ = u.copy(host_addr & !(huge - 1), &self.zeroes[..huge as usize]);
                }
            }
        }
        // A copy or zero-page ioctl without DONTWAKE (handler mode) wakes the threads sleeping
        // on the pages it populated, so when this call populated the faulting page, the
        // sleeper is awake already and a `UFFDIO_WAKE` would be a wasted ioctl. Wake it
        // ourselves only where nothing else did: a page another thread populated first (or
        // known present), a region that went away under the fault (it is being unmapped), or
        // a failed populate; otherwise the faulting thread would sleep in the kernel for good.
        // Woken, it retries the access. The span is the region's page: a whole huge page in a
        // hugetlb region. (`VMM_UFFD_ALWAYS_WAKE=1` wakes after every fault, as before.)
        let woken = matches!(&hit, Some((_, Ok(Ensured::Serviced { woken: true }))));
        if self.always_wake || !woken {
            if let Some(u) = &self.uffd {
                let span = hit
                    .as_ref()
                    .map_or(PAGE, |(backing, _)| backing.align_bytes());
                let _ = u.wake(host_addr & !(span - 1), span);
            }
        }
        hit.map_or(Ok(()), |(_, populated)| populated.map(|_| ()))
    }

    fn read_present(&self, gpa: u64, dst: &mut [u8]) {
        #[allow(unsafe_code)]
        // SAFETY: the caller found `gpa`'s region under a read guard that is still held, so
        // its host memory stays mapped until the guard goes (unmapping waits for a grace
        // period); the page is present: `ensure_present` populated it (or the region is not
        // demand-paged and the kernel faults it in).
        unsafe {
            self.host.read(gpa, dst)
        }
    }

    fn write_present(&self, gpa: u64, src: &[u8]) {
        self.host_wrote(gpa, src.len() as u64);
        #[allow(unsafe_code)]
        // SAFETY: as in `read_present`; the region is writable (checked by the caller).
        unsafe {
            self.host.write(gpa, src)
        }
    }
}

impl AddressSpace {
    /// Replays a recorded working set (`runs` of `(gpa, pages)`, in order) ahead of the guest,
    /// on the calling thread (`--prefetch ws`): pages the snapshot being restored still holds
    /// are populated from it, in the same calls the fault path uses, so a page is never
    /// populated twice (the residency bitmap and `UFFDIO_COPY`'s `EEXIST` decide the races) and
    /// a page the guest has written is never overwritten. Pages the snapshot does not hold, or
    /// no longer holds, are left to the guest's first touch. Without userfaultfd (`kernel`
    /// restore mode) the runs are read in from the page cache (`MADV_POPULATE_READ`). Stops
    /// early when `stop` is set. Returns the pages populated (read in, without userfaultfd).
    pub fn prefetch(
        &self,
        runs: &[(u64, u64)],
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<u64, FaultError> {
        let Some(src) = self.source.get() else {
            let mut read = 0;
            if self.uffd.is_none() {
                for &(gpa, n) in runs {
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    self.host
                        .populate_read(gpa, n * PAGE)
                        .map_err(|source| FaultError { gpa, source })?;
                    read += n;
                }
            }
            return Ok(read);
        };
        let Some(uffd) = &self.uffd else {
            return Ok(0);
        };
        let mut reader = self.domain().register();
        let mut populated = 0;
        for &(gpa, n) in runs {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            let guard = reader.read();
            populated += self.map.lookup(&guard, gpa, |hit| {
                let Some((_, region)) = hit.filter(|(_, r)| r.demand_paged) else {
                    return Ok(0);
                };
                let end = gpa.saturating_add(n * PAGE).min(region.end());
                if region.backing == Backing::Hugetlb {
                    let k = self.populate_huge_pages(uffd, gpa..end)?;
                    region.counters.pages_populated.fetch_add(k, Relaxed);
                    return Ok(k);
                }
                let (mut p, end) = (gpa / PAGE, end / PAGE);
                let mut k = 0;
                while p < end {
                    if !src.has(p) {
                        p += 1;
                        continue;
                    }
                    let mut e = p + 1;
                    while e < end && src.has(e) {
                        e += 1;
                    }
                    k += self.populate_pages(uffd, p, e, true, u64::MAX, false)?.0;
                    p = e;
                }
                region.counters.pages_populated.fetch_add(k, Relaxed);
                Ok::<u64, FaultError>(k)
            })?;
            drop(guard);
            reader.quiescent_state();
        }
        Ok(populated)
    }
}

enum ChunkAccess<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// The userfaultfd handler thread (`--fault-mode handler`, the Firecracker / QEMU postcopy
/// design): an RCU reader, offline while it sleeps in `poll`, each batch of faults one
/// read-side critical section. Runs until `stop` is set. A fault it cannot serve (the page
/// cannot be populated) is passed to `failed`, and the faulting thread is woken to retry: the
/// owner of the thread decides whether the run goes on (the VM ends it).
pub fn handler_loop(
    space: &AddressSpace,
    stop: &std::sync::atomic::AtomicBool,
    mut failed: impl FnMut(&FaultError),
) {
    let Some(uffd) = space.uffd() else {
        return;
    };
    let mut reader = space.domain().register();
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let ready = reader.offline_while(|| uffd.poll(50));
        match ready {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::error!(error = %e, "polling the userfaultfd failed; handler thread stops");
                return;
            }
        }
        let guard = reader.read();
        let mut serve = |f: &super::uffd::PageFault| {
            if let Err(e) = space.handle_userfault(&guard, f.host_addr, f.write) {
                tracing::debug!(error = %e, "servicing a userfault failed");
                failed(&e);
            }
        };
        if space.always_wake {
            // As before issue 16: one event per read, until the read says `EAGAIN`.
            loop {
                match uffd.read_fault() {
                    Ok(Some(f)) => serve(&f),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the userfaultfd failed");
                        break;
                    }
                }
            }
        } else {
            // Every pending event in one read; a short read means the queue is empty, so go
            // back to `poll` rather than read again for an `EAGAIN`.
            let mut batch = [super::uffd::PageFault {
                host_addr: 0,
                write: false,
            }; super::uffd::READ_BATCH];
            loop {
                match uffd.read_faults(&mut batch) {
                    Ok((kept, events)) => {
                        batch[..kept].iter().for_each(&mut serve);
                        if events < super::uffd::READ_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the userfaultfd failed");
                        break;
                    }
                }
            }
        }
        drop(guard);
        reader.quiescent_state();
    }
}
