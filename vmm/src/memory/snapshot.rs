//! Guest memory and snapshots: which pages are populated on the host (`/proc/self/pagemap`),
//! copying them out while the vCPUs are paused, and the restore source that first touches
//! are served from (a read-only mapping of the snapshot's data file).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::address_space::{AddressSpace, PAGE};
use super::residency::Residency;

/// `/proc/self/pagemap` bits: page present in RAM, page swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// Calls `f` with whether each of the `pages` pages at host address `host` holds data in this
/// process: present in its page tables or swapped out. Reading the pagemap never faults the
/// pages in.
fn scan_pagemap(host: u64, pages: u64, mut f: impl FnMut(bool)) -> io::Result<()> {
    let file = File::open("/proc/self/pagemap")?;
    const CHUNK: u64 = 8192;
    let mut buf = vec![0u8; (CHUNK * 8) as usize];
    let mut done = 0;
    while done < pages {
        let n = CHUNK.min(pages - done);
        let bytes = &mut buf[..(n * 8) as usize];
        file.read_exact_at(bytes, (host / PAGE + done) * 8)?;
        for e in bytes.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            f(u64::from_le_bytes(w) & (PM_PRESENT | PM_SWAPPED) != 0);
        }
        done += n;
    }
    Ok(())
}

/// The runs of adjacent pages in `pages` (guest-physical addresses, ascending), as
/// `(first, end)` addresses, in order.
pub fn runs_of(pages: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for gpa in pages {
        match runs.last_mut() {
            Some((_, end)) if *end == gpa => *end += PAGE,
            _ => runs.push((gpa, gpa + PAGE)),
        }
    }
    runs
}

/// Which of the `pages` pages at host address `host` hold data in this process (one entry
/// per page, `true` = populated; see [`scan_pagemap`]).
pub fn populated_pages(host: u64, pages: u64) -> io::Result<Vec<bool>> {
    let mut out = Vec::with_capacity(pages as usize);
    scan_pagemap(host, pages, |p| out.push(p))?;
    Ok(out)
}

/// How many of the `pages` pages at host address `host` are populated (as
/// [`populated_pages`], without a vector).
pub fn count_populated(host: u64, pages: u64) -> io::Result<u64> {
    let mut n = 0;
    scan_pagemap(host, pages, |p| n += u64::from(p))?;
    Ok(n)
}

impl AddressSpace {
    /// Copies guest memory at `gpa` into `dst`, for a snapshot. Every page of the range must
    /// be populated (see [`populated_pages`]); the caller has paused every vCPU and holds the
    /// control lock, so nothing changes or unmaps the range meanwhile.
    pub(crate) fn copy_out(&self, gpa: u64, dst: &mut [u8]) -> io::Result<()> {
        let end = gpa
            .checked_add(dst.len() as u64)
            .filter(|&e| e <= self.host.size_bytes())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "beyond guest memory"))?;
        let _ = end;
        let src = self.host.host_addr(gpa) as *const u8;
        // SAFETY: the range lies inside the host reservation (checked above) and, per the
        // contract, is mapped with every page present (populated pages never fault, so no
        // SIGBUS from userfaultfd); the vCPUs are paused and the control lock is held, so no
        // one writes or unmaps it during the copy, and `dst` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

/// One region's data in the snapshot's data file.
#[derive(Clone, Copy, Debug)]
pub struct SourceRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where its first page lies in the data file (page-aligned).
    pub file_offset: u64,
}

/// Where guest-physical address `gpa` lies in the data file, given the `regions` laid out in
/// it (sorted by address); `None` outside every region.
fn file_offset(regions: &[SourceRegion], gpa: u64) -> Option<u64> {
    let i = regions.partition_point(|r| r.gpa <= gpa);
    let r = regions.get(i.checked_sub(1)?)?;
    (gpa < r.gpa + r.size).then(|| r.file_offset + (gpa - r.gpa))
}

/// Snapshot data that first touches are served from: the data file, where each region's
/// pages lie at `file_offset + (gpa - region.gpa)`, and a bitmap of the pages the snapshot
/// holds. A page's bit is cleared once it has been served, or when its range is released (so
/// memory mapped again there starts from zero).
///
/// Pages are copied in (`UFFDIO_COPY`) straight from a read-only mapping of the file: one
/// copy from the page cache, where reading into a buffer first would make two (the read was
/// half of a restoring vCPU's time). The mapping's pages would count in the VMM's RSS, so they
/// are dropped (`MADV_DONTNEED`) once copies may have mapped [`DROP_SOURCE_EVERY`] bytes of
/// it (each copy counts its span rounded out to the kernel's fault-around). Only the kernel
/// reads the mapping: a file truncated under the VM makes the copy fail (`EFAULT`), never
/// raises `SIGBUS` in the VMM. Everything else (a huge page the snapshot holds only in part,
/// snapshots of a restored VM) reads the file with `pread`.
pub struct Source {
    file: File,
    /// The read-only mapping of the file (null if it could not be made: then `pread`).
    base: *const u8,
    /// Bytes of the mapping that copies may have mapped since its pages were last dropped.
    copied: AtomicU64,
    len: u64,
    regions: Vec<SourceRegion>,
    pages: Residency,
    /// Pages still to be served.
    remaining: AtomicU64,
    /// Pages served from the snapshot.
    pub served: AtomicU64,
    /// The order pages were served in, when recording a working set.
    log: Option<WsLog>,
}

/// Bytes of the source mapping that copies may have mapped between two drops of its pages
/// (see [`Source`]).
pub const DROP_SOURCE_EVERY: u64 = 8 << 20;

/// The span the kernel maps around a page it faults in from the page cache (its default
/// `fault_around_bytes`): a copy from the source mapping may map this much around each end.
const FAULT_AROUND: u64 = 64 << 10;

// SAFETY: the mapping is read-only and lives as long as the `Source`; it is only read (by the
// kernel, in `UFFDIO_COPY`) and its pages dropped (`MADV_DONTNEED`), both safe from any thread;
// the bitmap and counters are atomics.
unsafe impl Send for Source {}
// SAFETY: as above.
unsafe impl Sync for Source {}

impl Drop for Source {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: `base..base+len` is the mapping made in `open`, unmapped once here.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
        }
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("len", &self.len)
            .field("regions", &self.regions.len())
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Serves from `file` (the data file, `len` bytes); `regions` sorted by address; `runs`:
    /// the pages the snapshot holds, as `(first, end)` guest-physical addresses of runs of
    /// adjacent pages, ascending; `space_bytes`: guest-physical space.
    /// Every page must lie inside a region and inside the file. With `record`, the runs of
    /// pages served are logged in order ([`Source::working_set`]).
    pub fn open(
        file: File,
        len: u64,
        regions: Vec<SourceRegion>,
        runs: impl IntoIterator<Item = (u64, u64)>,
        space_bytes: u64,
        record: bool,
    ) -> io::Result<Self> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let base = if len == 0 {
            std::ptr::null()
        } else {
            // SAFETY: a new read-only private mapping of the file; the kernel picks the place.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                std::ptr::null()
            } else {
                p as *const u8
            }
        };
        let mut s = Source {
            file,
            base,
            copied: AtomicU64::new(0),
            len,
            regions,
            pages: Residency::new(space_bytes),
            remaining: AtomicU64::new(0),
            served: AtomicU64::new(0),
            log: None,
        };
        let check = |s: &Source, gpa: u64| match s.offset_of(gpa) {
            Some(off) if off + PAGE <= len => Ok(()),
            _ => Err(bad(format!("page {gpa:#x} lies outside the data file"))),
        };
        // Runs of adjacent pages at once: setting bits one by one costs milliseconds at
        // gigabytes of snapshot. A run whose ends lie in one region, at the right distance in
        // the file, lies in the file throughout.
        let mut held = 0;
        for (first, end) in runs {
            check(&s, first)?;
            check(&s, end - PAGE)?;
            let n = (end - first) / PAGE;
            if s.offset_of(end - PAGE) != s.offset_of(first).map(|o| o + (n - 1) * PAGE) {
                for gpa in (first..end).step_by(PAGE as usize) {
                    check(&s, gpa)?;
                }
            }
            held += s.pages.set_range(first / PAGE, n);
        }
        if record {
            s.log = Some(WsLog::new(held as usize));
        }
        s.remaining.store(held, Relaxed);
        Ok(s)
    }

    fn offset_of(&self, gpa: u64) -> Option<u64> {
        file_offset(&self.regions, gpa)
    }

    /// Whether the snapshot holds page `pfn` (and it has not been served yet).
    #[inline]
    pub fn has(&self, pfn: u64) -> bool {
        self.pages.is_present(pfn)
    }

    /// Pages not served yet.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Relaxed)
    }

    /// Where pages `[pfn, pfn + n)` start in the data file: they must all lie in one region
    /// (so contiguous in the file) and inside the file.
    fn run_offset(&self, pfn: u64, n: u64) -> io::Result<u64> {
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the snapshot's data file does not hold this page",
            )
        };
        let off = self.offset_of(pfn * PAGE).ok_or_else(bad)?;
        let last = self.offset_of((pfn + n - 1) * PAGE).ok_or_else(bad)?;
        if last != off + (n - 1) * PAGE || last + PAGE > self.len {
            return Err(bad());
        }
        Ok(off)
    }

    /// Calls `f` with the snapshot's data for pages `[pfn, pfn + n)` (all held by the
    /// snapshot and in one region, so contiguous in the file), read into this thread's buffer.
    pub fn with_data<R>(&self, pfn: u64, n: u64, f: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let off = self.run_offset(pfn, n)?;
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            let bytes = (n * PAGE) as usize;
            if b.len() < bytes {
                b.resize(bytes, 0);
            }
            self.file
                .read_exact_at(&mut b[..bytes], off)
                .map_err(|e| self.explain(e, off + bytes as u64))?;
            Ok(f(&b[..bytes]))
        })
    }

    /// Copies the snapshot's pages `[pfn, pfn + n)` (held by the snapshot, in one region) into
    /// guest memory at host address `host` (`UFFDIO_COPY`).
    pub fn copy_to(
        &self,
        uffd: &super::uffd::Uffd,
        host: u64,
        pfn: u64,
        n: u64,
    ) -> io::Result<super::uffd::Populated> {
        if self.base.is_null() {
            return self.with_data(pfn, n, |d| uffd.copy(host, d))?;
        }
        let off = self.run_offset(pfn, n)?;
        // SAFETY: `[off, off + n pages)` lies inside the mapping (checked), which lives as long
        // as `self`; only the kernel reads it, and a page it cannot read fails the call.
        let r = unsafe { uffd.copy_from_raw(host, self.base.add(off as usize), n * PAGE) };
        let bytes = n * PAGE;
        let r = r.map_err(|e| self.explain(e, off + bytes));
        // What the copy may have mapped: the kernel maps the page cache's pages around each
        // page it faults in (fault-around, 64 KiB by default), so a copy of one page can map
        // sixteen.
        let span = (off + bytes).next_multiple_of(FAULT_AROUND) - off / FAULT_AROUND * FAULT_AROUND;
        if self.copied.fetch_add(span, Relaxed) + span >= DROP_SOURCE_EVERY {
            self.copied.store(0, Relaxed);
            // SAFETY: the mapping is a read-only private view of the file that nothing
            // writes: dropping its pages loses nothing (a later read maps the page cache's
            // page again), also under another thread's copy.
            unsafe {
                libc::madvise(
                    self.base as *mut libc::c_void,
                    self.len as usize,
                    libc::MADV_DONTNEED,
                )
            };
        }
        r
    }

    /// Names the cause of a failed read of the data file up to byte `end`, when it is that
    /// the file is now shorter than that (truncated under the VM: the mapping's pages past
    /// its end cannot be read, and a `pread` comes back short).
    fn explain(&self, e: io::Error, end: u64) -> io::Error {
        match cut_short(&self.file, end) {
            Some(len) => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the snapshot's data file is now {len} bytes, short of the {end} this page \
                     needs: it was truncated while the restore was reading it ({e})"
                ),
            ),
            None => e,
        }
    }

    /// Forgets pages `[pfn, pfn + n)`: served, or their memory released.
    pub fn forget(&self, pfn: u64, n: u64) -> u64 {
        let k = self.pages.clear_range(pfn, n);
        self.remaining.fetch_sub(k, Relaxed);
        k
    }

    /// Pages `[pfn, pfn + n)` were just populated from the snapshot: forgets them, counts
    /// them and, when recording, logs the run. `extra` more pages after them are forgotten
    /// but not counted (found already present).
    pub fn served_run(&self, pfn: u64, n: u64, extra: u64) {
        self.forget(pfn, n + extra);
        if n == 0 {
            return;
        }
        self.served.fetch_add(n, Relaxed);
        if let Some(log) = &self.log {
            log.push(pfn, n);
        }
    }

    /// The huge page of pages `[pfn, pfn + n)` was just populated from the snapshot, which held
    /// `held` of them (the others were zero): forgets them all, counts the held ones and, when
    /// recording, logs the whole huge page (a prefetch populates it whole).
    pub fn served_huge(&self, pfn: u64, n: u64, held: u64) {
        self.forget(pfn, n);
        self.served.fetch_add(held, Relaxed);
        if let Some(log) = &self.log {
            log.push(pfn, n);
        }
    }

    /// The runs of pages served so far, in the order they were served, as `(gpa, pages)`
    /// (empty when not recording), coalesced: within each window of [`WS_REORDER`] runs
    /// served one after the other, runs are sorted by address and adjacent ones merged. The
    /// order survives at that grain, and vCPUs that each stream through their own memory, a
    /// page per fault, interleaved, give a few long runs instead of one per page (which a
    /// prefetcher would copy a page per call, and a restore would read before the guest runs).
    pub fn working_set(&self) -> Vec<(u64, u64)> {
        let runs = self.log.as_ref().map_or_else(Vec::new, WsLog::runs);
        coalesce(&runs, WS_REORDER)
    }
}

/// Runs served in a row that [`Source::working_set`] sorts and merges as one window.
pub const WS_REORDER: usize = 1024;

/// Within each window of `window` runs, sorts `runs` by address and merges adjacent or
/// overlapping ones.
pub fn coalesce(runs: &[(u64, u64)], window: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for chunk in runs.chunks(window.max(1)) {
        let mut c = chunk.to_vec();
        c.sort_unstable();
        let mut cur: Option<(u64, u64)> = None;
        for (gpa, n) in c {
            let end = gpa + n * PAGE;
            cur = match cur {
                Some((s, e)) if gpa <= e => Some((s, e.max(end))),
                Some((s, e)) => {
                    out.push((s, (e - s) / PAGE));
                    Some((gpa, end))
                }
                None => Some((gpa, end)),
            };
        }
        if let Some((s, e)) = cur {
            out.push((s, (e - s) / PAGE));
        }
    }
    out
}

/// An append-only log of served runs, written by any fault-servicing thread without a lock:
/// one `fetch_add` for the slot, one store. Its capacity is the snapshot's page count, which
/// bounds the runs (each serves at least one page, once).
struct WsLog {
    entries: Box<[AtomicU64]>,
    len: std::sync::atomic::AtomicUsize,
}

impl WsLog {
    /// Pages per entry at most (16 bits of the packed entry).
    const MAX_RUN: u64 = 0xffff;

    fn new(capacity: usize) -> Self {
        let zeroed = Box::<[AtomicU64]>::new_zeroed_slice(capacity);
        WsLog {
            // SAFETY: all-zero bytes are a valid `AtomicU64` (it has the in-memory
            // representation of a `u64`). Allocated zeroed, the slots cost no page until used.
            entries: unsafe { zeroed.assume_init() },
            len: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn push(&self, mut pfn: u64, mut n: u64) {
        while n > 0 {
            let k = n.min(Self::MAX_RUN);
            let i = self.len.fetch_add(1, Relaxed);
            if let Some(e) = self.entries.get(i) {
                e.store(pfn << 16 | k, Relaxed);
            }
            pfn += k;
            n -= k;
        }
    }

    fn runs(&self) -> Vec<(u64, u64)> {
        let n = self.len.load(Relaxed).min(self.entries.len());
        self.entries[..n]
            .iter()
            .map(|e| e.load(Relaxed))
            // A slot claimed but not stored yet (read while faults are still served).
            .filter(|&v| v != 0)
            .map(|v| ((v >> 16) * PAGE, v & Self::MAX_RUN))
            .collect()
    }
}

impl AddressSpace {
    /// Serves first touches from `src` from now on (before any vCPU runs). Fails if a source
    /// is already set.
    pub fn set_source(&self, src: Source) -> Result<(), String> {
        self.source
            .set(src)
            .map_err(|_| "a restore source is already set".to_owned())
    }

    /// The snapshot being restored, if any.
    pub fn source(&self) -> Option<&Source> {
        self.source.get()
    }
}

impl AddressSpace {
    /// Maps `size` bytes of `file` from `offset` privately over the host memory of the region
    /// at `gpa` (`--restore-mode kernel`): the host kernel then serves first touches from the
    /// page cache (holes in the sparse file read as zeroes) and copies a page on its first
    /// write. Before any vCPU runs; the region must have just been mapped.
    pub fn map_snapshot_file(
        &self,
        gpa: u64,
        size: u64,
        file: &File,
        offset: u64,
        readonly: bool,
    ) -> io::Result<()> {
        if gpa
            .checked_add(size)
            .is_none_or(|end| end > self.host.size_bytes())
            || gpa % PAGE != 0
            || size % PAGE != 0
            || offset % PAGE != 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside guest memory or unaligned",
            ));
        }
        // In window mode a read-only region is read-only on the host too (see `map`).
        let host_readonly = readonly && self.hotplug_window().is_some_and(|w| w.contains(&gpa));
        let prot = if host_readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        let addr = self.host.host_addr(gpa);
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: `addr..addr+size` lies inside the host reservation (checked above) and is
        // the region's own host memory, which no vCPU has run against yet and no Rust object
        // borrows; MAP_FIXED replaces exactly that range.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                size as usize,
                prot,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut mapped = self.mapped_file.lock().unwrap_or_else(|e| e.into_inner());
        let region = SourceRegion {
            gpa,
            size,
            file_offset: offset,
        };
        match &mut *mapped {
            Some(m) => {
                m.needed = m.needed.max(offset + size);
                m.regions.push(region);
            }
            None => {
                *mapped = Some(MappedFile {
                    file: file.try_clone()?,
                    needed: offset + size,
                    regions: vec![region],
                })
            }
        }
        Ok(())
    }

    /// `kernel` restore mode: the pages that still read from the snapshot data file mapped
    /// under guest memory (those it holds data for; the guest has not written them, so
    /// they are not private pages of their own), to be read from the file when they are not
    /// present (see [`FileHeld`]). `None` in the other modes.
    pub(crate) fn file_held(&self) -> io::Result<Option<FileHeld>> {
        let mapped = self.mapped_file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = mapped.as_ref() else {
            return Ok(None);
        };
        let mut regions = m.regions.clone();
        regions.sort_by_key(|r| r.gpa);
        Ok(Some(FileHeld {
            extents: data_extents(&m.file)?,
            file: m.file.try_clone()?,
            regions,
        }))
    }

    /// Why guest memory cannot be served, when the reason is that a snapshot data file mapped
    /// under it (`kernel` restore mode) is now shorter than the mappings need: it was
    /// truncated under the VM, and the page cache has no page past its end.
    pub fn mapped_file_cut_short(&self) -> Option<String> {
        let mapped = self.mapped_file.lock().unwrap_or_else(|e| e.into_inner());
        let MappedFile { file, needed, .. } = mapped.as_ref()?;
        let len = cut_short(file, *needed)?;
        Some(format!(
            "the snapshot's data file is now {len} bytes, short of the {needed} mapped under \
             guest memory: it was truncated under the VM"
        ))
    }
}

/// The snapshot data file mapped under guest memory (`kernel` restore mode), the length those
/// mappings need, and the regions mapped.
#[derive(Debug)]
pub struct MappedFile {
    file: File,
    needed: u64,
    regions: Vec<SourceRegion>,
}

/// The pages of a `kernel`-restored VM that read from the snapshot data file mapped under
/// them: in a file-mapped region, at a file offset that holds data (the file is sparse: holes
/// are pages the snapshot did not hold, which read as zeroes). A snapshot of such a VM must
/// copy them even when they are not present: the guest has not touched them since the
/// restore, and they hold its data all the same.
pub(crate) struct FileHeld {
    file: File,
    regions: Vec<SourceRegion>,
    /// `[start, end)` file offsets that hold data, ascending.
    extents: Vec<(u64, u64)>,
}

impl FileHeld {
    fn offset_of(&self, pfn: u64) -> Option<u64> {
        file_offset(&self.regions, pfn * PAGE)
    }

    /// Whether page `pfn` reads data from the file (when not present).
    pub(crate) fn has(&self, pfn: u64) -> bool {
        self.offset_of(pfn).is_some_and(|off| {
            let i = self.extents.partition_point(|&(s, _)| s <= off);
            i > 0 && off < self.extents[i - 1].1
        })
    }

    /// Reads pages `[pfn, pfn + dst.len() / PAGE)` (in one file-mapped region) from the file.
    pub(crate) fn read(&self, pfn: u64, dst: &mut [u8]) -> io::Result<()> {
        let off = self.offset_of(pfn).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the page lies in no file-mapped region",
            )
        })?;
        self.file.read_exact_at(dst, off)
    }
}

/// The `[start, end)` byte ranges of `file` that hold data (`SEEK_DATA` / `SEEK_HOLE`).
fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at: libc::off_t = 0;
    loop {
        // SAFETY: lseek on a descriptor this `File` owns; it moves only the file position,
        // which nothing else relies on (every read of the file is positioned).
        let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(out)
            } else {
                Err(e)
            };
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((start as u64, end as u64));
        at = end;
    }
}

/// The length of a snapshot's data file, if it is now shorter than `needed` bytes: truncated
/// under the VM that reads it.
fn cut_short(file: &File, needed: u64) -> Option<u64> {
    file.metadata()
        .ok()
        .map(|m| m.len())
        .filter(|&len| len < needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_streams_coalesce_within_a_window() {
        // Two vCPUs streaming through their own pages, a page per fault, interleaved.
        let runs: Vec<(u64, u64)> = (0..8)
            .flat_map(|i| [(i * PAGE, 1), ((100 + i) * PAGE, 1)])
            .collect();
        assert_eq!(coalesce(&runs, 16), vec![(0, 8), (100 * PAGE, 8)]);
        // The window keeps the coarse order: the second half comes after the first.
        assert_eq!(
            coalesce(&runs, 8),
            vec![(0, 4), (100 * PAGE, 4), (4 * PAGE, 4), (104 * PAGE, 4)]
        );
        // Overlaps and duplicates merge; gaps stay.
        assert_eq!(
            coalesce(&[(0, 4), (2 * PAGE, 4), (10 * PAGE, 1)], 8),
            vec![(0, 6), (10 * PAGE, 1)]
        );
        assert!(coalesce(&[], 8).is_empty());
    }
}
