//! Host virtual memory for the guest: one reservation that mirrors guest-physical space.
//!
//! Guest-physical address `gpa` lives at host address `base + gpa`, always. The reservation is
//! `PROT_NONE` and `MAP_NORESERVE` (it costs address space only); mapping a region replaces
//! part of it (`MAP_FIXED`) with real memory, and releasing the region puts the reservation
//! back, which frees the pages. So a host address never needs a lookup to find its
//! guest-physical address (the userfaultfd handler thread relies on that), and a range freed
//! by one region can only ever be reused for the same guest-physical range, after the grace
//! period that unmapping waits for.
//!
//! Every `unsafe` block that maps or touches guest memory from the host side lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What backs a region's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory.
    Anon,
    /// A `memfd` (shared memory; could be handed to another process).
    Memfd,
    /// A `memfd` on hugetlbfs with 2 MiB pages (needs pages reserved in
    /// `/proc/sys/vm/nr_hugepages`).
    Hugetlb,
}

impl Backing {
    /// The name used on the command line and in the control protocol.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anon => "anon",
            Backing::Memfd => "memfd",
            Backing::Hugetlb => "hugetlb",
        }
    }

    /// Parses a protocol name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "anon" => Some(Backing::Anon),
            "memfd" => Some(Backing::Memfd),
            "hugetlb" => Some(Backing::Hugetlb),
            _ => None,
        }
    }

    /// The alignment a region of this backing needs, in bytes.
    pub fn align_bytes(self) -> u64 {
        match self {
            Backing::Hugetlb => 2 << 20,
            _ => 4 << 10,
        }
    }
}

/// 2 MiB huge pages the host has free and not yet promised to a mapping (free minus reserved).
pub fn free_huge_pages() -> u64 {
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

/// How a fresh mapping of guest memory starts out ([`HostSpace::map`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostAccess {
    /// Readable and writable at once.
    ReadWrite,
    /// `PROT_NONE` until [`HostSpace::protect`] opens it: registered with userfaultfd first.
    None,
}

/// Set once `process_madvise(MADV_DONTNEED)` was refused: [`HostSpace::zap_anon_many`] then
/// goes one range at a time.
static BATCH_ZAP_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A pidfd of this process, opened once (`None` if the host refuses, or batches were refused).
fn self_pidfd() -> Option<libc::c_int> {
    static PIDFD: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    if BATCH_ZAP_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    PIDFD
        .get_or_init(|| {
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
            // SAFETY: a fresh descriptor that nothing else owns.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
        })
        .as_ref()
        .map(|fd| fd.as_raw_fd())
}

/// Whether the host gives transparent huge pages to mappings that ask for them: its
/// `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise` (not `never`, and
/// the file exists).
pub fn thp_enabled() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
}

/// Whether this host hands free memory back to a hypervisor of its own (free page reporting,
/// as a guest with `virtio_balloon` does): how much it has reported, in KiB, if any. Free huge
/// pages are then usually cold, backed again as they are zeroed.
pub fn free_page_reporting_kib() -> Option<u64> {
    std::fs::read_to_string("/sys/module/page_reporting/parameters/reported_kib")
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&kib| kib > 0)
}

/// Maps `len` bytes of private anonymous memory (`MAP_NORESERVE`, protection `prot`) at an
/// address the kernel picks, aligned to `align` (a power of two), and returns that address.
pub(crate) fn map_aligned(len: u64, align: u64, prot: libc::c_int) -> io::Result<u64> {
    let total = len + align;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = p as u64;
    let base = (start + align - 1) & !(align - 1);
    // Trim the slack before and after the aligned range.
    // SAFETY: both ranges lie inside the mapping just made and nothing refers to them.
    unsafe {
        if base > start {
            libc::munmap(p, (base - start) as usize);
        }
        let tail = start + total - (base + len);
        if tail > 0 {
            libc::munmap((base + len) as *mut libc::c_void, tail as usize);
        }
    }
    Ok(base)
}

/// The host-side reservation mirroring guest-physical space.
#[derive(Debug)]
pub struct HostSpace {
    base: u64,
    size_bytes: u64,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`) on every anonymous or memfd mapping
    /// made here (`--thp`).
    thp: bool,
}

// The reservation is plain address space; the addresses are only handed to the kernel or
// touched through the checked accessors below.

fn mmap_fixed(
    addr: u64,
    len: u64,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
) -> io::Result<()> {
    // SAFETY: MAP_FIXED replaces whatever is mapped at `[addr, addr + len)`. Callers only pass
    // ranges inside our own reservation (checked by `HostSpace::check`), which no Rust object
    // borrows: guest memory is reached only through raw host addresses.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl HostSpace {
    /// Reserves `size_bytes` of host address space (1 GiB aligned, so that huge pages line up
    /// with guest-physical ones).
    pub fn reserve(size_bytes: u64) -> io::Result<Self> {
        let base = map_aligned(size_bytes, 1 << 30, libc::PROT_NONE)?;
        Ok(Self {
            base,
            size_bytes,
            thp: false,
        })
    }

    /// The host address of guest-physical address `gpa`.
    #[inline]
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.base + gpa
    }

    /// The guest-physical address of host address `host`, if it lies in the reservation.
    #[inline]
    pub fn gpa_of(&self, host: u64) -> Option<u64> {
        host.checked_sub(self.base).filter(|&g| g < self.size_bytes)
    }

    /// Size of the mirrored guest-physical space.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn check(&self, gpa: u64, len: u64) -> io::Result<()> {
        let ok = len > 0
            && gpa % 4096 == 0
            && len % 4096 == 0
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.size_bytes);
        if ok {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("gpa {gpa:#x} size {len:#x} is not a page-aligned range of the host reservation"),
            ))
        }
    }

    /// Backs `[gpa, gpa + len)` with fresh, zero, lazily allocated memory, replacing whatever
    /// was mapped there (`MAP_FIXED`), accessible at once or not at all (`access`). Returns the
    /// memfd for shared backings.
    ///
    /// A mapping that is to be registered with userfaultfd starts [`HostAccess::None`] and is
    /// opened ([`protect`](Self::protect)) only once registered: between a read-write `mmap`
    /// and the registration, a vCPU's access through the hot-plug window's memslot would make
    /// the kernel populate the page itself, and a guest write would land there and stay.
    ///
    /// # Safety
    ///
    /// No thread may be using the range: it is not published (no guest access and no VMM
    /// thread can reach it through the address space), or a grace period has passed since it
    /// was unpublished; no Rust reference into it exists.
    pub unsafe fn map(
        &self,
        gpa: u64,
        len: u64,
        backing: Backing,
        access: HostAccess,
    ) -> io::Result<Option<OwnedFd>> {
        self.check(gpa, len)?;
        let rw = match access {
            HostAccess::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
            HostAccess::None => libc::PROT_NONE,
        };
        let addr = self.host_addr(gpa);
        match backing {
            Backing::Anon => {
                mmap_fixed(
                    addr,
                    len,
                    rw,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                )?;
                self.advise_thp(gpa, len)?;
                Ok(None)
            }
            Backing::Memfd | Backing::Hugetlb => {
                if gpa % backing.align_bytes() != 0 || len % backing.align_bytes() != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{} backing needs {:#x}-aligned ranges",
                            backing.name(),
                            backing.align_bytes()
                        ),
                    ));
                }
                let mut flags = libc::MFD_CLOEXEC;
                if backing == Backing::Hugetlb {
                    flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
                }
                // SAFETY: memfd_create takes a NUL-terminated name and flags; returns a new fd.
                let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), flags) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `fd` is fresh and owned by nothing else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: ftruncate on our own fd.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                // hugetlb without MAP_NORESERVE: the huge pages are reserved here (ENOMEM if
                // there are not enough), so no first touch can find none left.
                let noreserve = if backing == Backing::Hugetlb {
                    0
                } else {
                    libc::MAP_NORESERVE
                };
                mmap_fixed(addr, len, rw, libc::MAP_SHARED | noreserve, fd.as_raw_fd())?;
                if backing == Backing::Memfd {
                    self.advise_thp(gpa, len)?;
                }
                Ok(Some(fd))
            }
        }
    }

    /// Makes `[gpa, gpa + len)` (mapped) read-only or read-write on the host. In window mode
    /// this is how the guest's view changes: KVM's MMU notifier drops its mappings of the
    /// range, and a guest write to a read-only range then fails (`EFAULT`) instead of landing.
    pub fn protect(&self, gpa: u64, len: u64, readonly: bool) -> io::Result<()> {
        self.check(gpa, len)?;
        let prot = if readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: the range lies inside our reservation (checked), which no Rust object
        // borrows; mprotect only changes access rights (host code reads or writes guest memory
        // through `read`/`write` and vm-memory slices, which never write read-only regions).
        if unsafe { libc::mprotect(self.host_addr(gpa) as *mut libc::c_void, len as usize, prot) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives `[gpa, gpa + len)` back to the reservation: its pages are freed.
    ///
    /// A shared backing (memfd, hugetlb) is a file that other pieces of the same region may
    /// still map: replacing the mapping alone would leave its pages allocated in the file
    /// until the last piece goes, so they are punched out of it first (`MADV_REMOVE`).
    ///
    /// # Safety
    ///
    /// As for [`map`](Self::map): only after a grace period, when no thread can still be
    /// touching the range.
    pub unsafe fn release(&self, gpa: u64, len: u64) -> io::Result<()> {
        self.check(gpa, len)?;
        self.punch_out(gpa, len)?;
        mmap_fixed(
            self.host_addr(gpa),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )
    }

    /// Frees the pages of `[gpa, gpa + len)` in place: punched out of a memfd, dropped from a
    /// private mapping (`MADV_DONTNEED`), which keeps its protection and its userfaultfd
    /// registration, so the next access to a page is a missing-page fault again. KVM's MMU
    /// notifier drops its mappings of the range before this returns.
    ///
    /// # Safety
    ///
    /// As for [`map`](Self::map): only after a grace period, when no thread can still be
    /// touching the range.
    pub unsafe fn zap(&self, gpa: u64, len: u64) -> io::Result<()> {
        self.check(gpa, len)?;
        self.punch_out(gpa, len)?;
        self.drop_pages(gpa, len)
    }

    /// `madvise(MADV_DONTNEED)` of `[gpa, gpa + len)`: drops the pages a private mapping holds
    /// there (and a shared mapping's view of its file's), keeping the mapping. Callers have
    /// checked the range and waited for a grace period, so nothing uses it.
    fn drop_pages(&self, gpa: u64, len: u64) -> io::Result<()> {
        // SAFETY: the range lies inside our reservation (checked by the callers), which no
        // Rust object borrows, and nothing uses it any more. MADV_DONTNEED only drops pages.
        if unsafe {
            libc::madvise(
                self.host_addr(gpa) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// [`zap`](Self::zap) of many ranges of private anonymous memory at once, with one TLB
    /// flush for all of them where the host allows it: one `process_madvise(MADV_DONTNEED)`
    /// over the whole list (the kernel gathers the ranges' pages and flushes the TLBs of the
    /// process's CPUs once, where one `madvise` per range flushes per range: with vCPU threads
    /// running, each flush is an IPI into a running guest). Where `process_madvise` cannot do
    /// it (older kernels refuse `MADV_DONTNEED` there), the ranges it did not reach are
    /// zapped one by one. Returns how many host calls it made.
    ///
    /// # Safety
    ///
    /// As for [`zap`](Self::zap), for every range, each of which must be private anonymous
    /// memory (no file pages to punch out).
    pub unsafe fn zap_anon_many(&self, ranges: &[(u64, u64)]) -> io::Result<usize> {
        for &(gpa, len) in ranges {
            self.check(gpa, len)?;
        }
        let mut calls = 0;
        let mut done = 0;
        if let Some(pidfd) = self_pidfd() {
            // UIO_MAXIOV: the most iovecs one call takes.
            for chunk in ranges.chunks(1024) {
                let iov: Vec<libc::iovec> = chunk
                    .iter()
                    .map(|&(gpa, len)| libc::iovec {
                        iov_base: self.host_addr(gpa) as *mut libc::c_void,
                        iov_len: len as usize,
                    })
                    .collect();
                // SAFETY: every range lies inside our reservation (checked above) and, per
                // the contract, nothing uses it; MADV_DONTNEED only drops the pages of the
                // caller's own private mappings (the pidfd is this process's), which keep
                // their protection and userfaultfd registration. `iov` outlives the call.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        pidfd,
                        iov.as_ptr(),
                        iov.len(),
                        libc::MADV_DONTNEED,
                        0u32,
                    )
                };
                calls += 1;
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)
                    ) {
                        // This kernel does not do it: one range at a time from now on.
                        BATCH_ZAP_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(error = %e, "process_madvise(MADV_DONTNEED) refused; unmapped memory is freed one range at a time from now on");
                    }
                    break;
                }
                // It may stop short: count the ranges it covered whole.
                let mut advised = r as u64;
                let mut whole = 0;
                for &(_, len) in chunk {
                    if advised < len {
                        break;
                    }
                    advised -= len;
                    whole += 1;
                }
                done += whole;
                if whole < chunk.len() {
                    break;
                }
            }
        }
        for &(gpa, len) in &ranges[done..] {
            calls += 1;
            self.drop_pages(gpa, len)?;
        }
        Ok(calls)
    }

    /// The fallback when [`release`](Self::release) fails: frees the pages of
    /// `[gpa, gpa + len)` in place (punched out of a memfd, dropped from a private mapping) and
    /// takes every access right away, leaving the mapping itself where it is.
    ///
    /// # Safety
    ///
    /// As for [`map`](Self::map): only after a grace period, like `release`.
    pub unsafe fn discard(&self, gpa: u64, len: u64) -> io::Result<()> {
        self.check(gpa, len)?;
        // Best effort: what it cannot punch out, DONTNEED below still drops from this mapping.
        let _ = self.punch_out(gpa, len);
        self.drop_pages(gpa, len)?;
        let addr = self.host_addr(gpa) as *mut libc::c_void;
        // SAFETY: the range lies inside our reservation (checked), which no Rust object
        // borrows; mprotect only changes the access rights.
        if unsafe { libc::mprotect(addr, len as usize, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Has every later anonymous or memfd [`map`](Self::map) ask for transparent huge pages.
    pub fn set_thp(&mut self, on: bool) {
        self.thp = on;
    }

    /// [`advise_hugepage`](Self::advise_hugepage) if [`set_thp`](Self::set_thp) asked for it.
    fn advise_thp(&self, gpa: u64, len: u64) -> io::Result<()> {
        if self.thp {
            self.advise_hugepage(gpa, len)
        } else {
            Ok(())
        }
    }

    /// Asks the host kernel for transparent huge pages on `[gpa, gpa + len)`
    /// (`madvise(MADV_HUGEPAGE)`, `--thp`): its own first-touch faults then populate a whole
    /// 2 MiB page where the range covers one (the reservation is 1 GiB aligned), and a
    /// fault in a 2 MiB that holds no page yet reaches userfaultfd without the kernel making
    /// a page table there, so that a huge page can be moved in whole.
    pub fn advise_hugepage(&self, gpa: u64, len: u64) -> io::Result<()> {
        self.check(gpa, len)?;
        let addr = self.host_addr(gpa) as *mut libc::c_void;
        // SAFETY: the range lies inside our reservation (checked); MADV_HUGEPAGE only sets a
        // flag on the mappings there, changing neither their contents nor their rights.
        if unsafe { libc::madvise(addr, len as usize, libc::MADV_HUGEPAGE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Populates `[gpa, gpa + len)` for reading, as reads would (`madvise(MADV_POPULATE_READ)`):
    /// a file mapping's pages come in from the page cache, mapped read-only (a later write
    /// copies the page). `--restore-mode kernel --prefetch ws`. Never on userfaultfd-registered
    /// memory (the call would wait on the VMM's own fault servicing).
    pub fn populate_read(&self, gpa: u64, len: u64) -> io::Result<()> {
        self.check(gpa, len)?;
        let addr = self.host_addr(gpa) as *mut libc::c_void;
        // SAFETY: the range lies inside our reservation (checked); populating for reading maps
        // the pages a read would map and changes neither contents nor rights.
        if unsafe { libc::madvise(addr, len as usize, libc::MADV_POPULATE_READ) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Frees a shared backing's (memfd, hugetlb) pages of `[gpa, gpa + len)` in its file
    /// (`MADV_REMOVE`), so that they go now rather than with the file's last mapping. A
    /// private mapping has no file: nothing to do there (the kernel says EINVAL).
    fn punch_out(&self, gpa: u64, len: u64) -> io::Result<()> {
        // SAFETY: callers checked that the range lies inside our reservation, which no Rust
        // object borrows, and waited for a grace period, so nothing touches it any more.
        // MADV_REMOVE only frees the backing file's pages of the range.
        let removed = unsafe {
            libc::madvise(
                self.host_addr(gpa) as *mut libc::c_void,
                len as usize,
                libc::MADV_REMOVE,
            )
        };
        if removed != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes of guest memory at `gpa` into `dst`.
    ///
    /// # Safety
    ///
    /// The range must be mapped and every page of it present (populated, or not registered
    /// with a SIGBUS-mode userfaultfd), and must stay so for the duration of the call (the
    /// caller holds the read guard under which it found the region).
    pub unsafe fn read(&self, gpa: u64, dst: &mut [u8]) {
        let src = self.host_addr(gpa) as *const u8;
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: per the contract the source is mapped, readable and present; guest
            // memory may change concurrently (the guest writes it), so copy with volatile reads.
            *b = unsafe { std::ptr::read_volatile(src.add(i)) };
        }
    }

    /// Copies `src` into guest memory at `gpa`.
    ///
    /// # Safety
    ///
    /// As for [`read`](Self::read), and the range must be writable.
    pub unsafe fn write(&self, gpa: u64, src: &[u8]) {
        let dst = self.host_addr(gpa) as *mut u8;
        for (i, &b) in src.iter().enumerate() {
            // SAFETY: per the contract the destination is mapped, writable and present.
            unsafe { std::ptr::write_volatile(dst.add(i), b) };
        }
    }
}

/// The process's resident set size in bytes (from `/proc/self/statm`), 0 if unreadable.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * abi::layout::PAGE_SIZE)
}

/// Times a plain anonymous `mmap` of `len` bytes (`MAP_NORESERVE`, untouched) and its
/// `munmap`: the baseline a region update is compared with (`vmm stress`).
pub fn time_anon_mmap(len: u64) -> io::Result<std::time::Duration> {
    let t0 = std::time::Instant::now();
    // SAFETY: a fresh anonymous mapping at an address the kernel picks, unmapped right after;
    // nothing refers to it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        libc::munmap(p, len as usize);
    }
    Ok(t0.elapsed())
}

impl Drop for HostSpace {
    fn drop(&mut self) {
        // SAFETY: the whole reservation is ours; the VM (and so every vCPU and memslot that
        // could refer to it) is gone before the address space that owns this is dropped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size_bytes as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_touch_release() {
        let hs = HostSpace::reserve(1 << 30).unwrap();
        assert_eq!(hs.host_addr(0) % (1 << 30), 0);
        // SAFETY: the test owns this reservation; nothing else uses the range.
        unsafe { hs.map(0x10000, 0x4000, Backing::Anon, HostAccess::ReadWrite) }.unwrap();
        // SAFETY: just mapped, anonymous, not registered with userfaultfd.
        unsafe {
            hs.write(0x10008, &[1, 2, 3]);
            let mut b = [0u8; 4];
            hs.read(0x10007, &mut b);
            assert_eq!(b, [0, 1, 2, 3]);
        }
        // SAFETY: the test owns this reservation; nothing else uses the range.
        unsafe { hs.release(0x10000, 0x4000) }.unwrap();
        // SAFETY: the test owns this reservation; nothing else uses the range.
        unsafe { hs.map(0x10000, 0x4000, Backing::Memfd, HostAccess::ReadWrite) }.unwrap();
        let mut b = [9u8; 4];
        // SAFETY: just mapped again.
        unsafe { hs.read(0x10007, &mut b) };
        assert_eq!(b, [0; 4], "released memory comes back zeroed");
        assert_eq!(hs.gpa_of(hs.host_addr(0x1234)), Some(0x1234));
        assert_eq!(hs.gpa_of(hs.host_addr(0) - 1), None);
    }

    /// Bytes allocated to a memfd (its blocks).
    fn allocated(fd: &OwnedFd) -> u64 {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a `struct stat` for our own open fd.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) }, 0);
        // SAFETY: fstat succeeded, so it filled `st`.
        let st = unsafe { st.assume_init() };
        st.st_blocks as u64 * 512
    }

    /// Releasing part of a shared region frees that part's pages in the file, although the
    /// rest of the region still maps it (they used to stay allocated until the last piece
    /// went).
    fn release_frees_file_pages(backing: Backing, page: u64) {
        let hs = HostSpace::reserve(1 << 30).unwrap();
        let (gpa, len) = (16 << 20, 4 * page);
        // SAFETY: the test owns this reservation; nothing else uses the range.
        let fd = unsafe { hs.map(gpa, len, backing, HostAccess::ReadWrite) }
            .unwrap()
            .expect("shared backings have a file");
        for p in 0..4 {
            // SAFETY: just mapped read-write, not registered with userfaultfd.
            unsafe { hs.write(gpa + p * page, &[1]) };
        }
        assert_eq!(allocated(&fd), len, "{backing:?}: every page touched");
        // SAFETY: the test owns this reservation; nothing else uses the range.
        unsafe { hs.release(gpa + page, 2 * page) }.unwrap();
        assert_eq!(
            allocated(&fd),
            2 * page,
            "{backing:?}: the released middle is freed"
        );
        let mut b = [0u8];
        // SAFETY: the pieces around the released middle are still mapped.
        unsafe { hs.read(gpa + 3 * page, &mut b) };
        assert_eq!(b, [1], "{backing:?}: the rest keeps its data");
        // SAFETY: the test owns this reservation; nothing else uses the range.
        unsafe { hs.release(gpa, page) }.unwrap();
        // SAFETY: the test owns this reservation; nothing else uses the range.
        unsafe { hs.release(gpa + 3 * page, page) }.unwrap();
        assert_eq!(allocated(&fd), 0);
    }

    /// Many anonymous ranges are freed in one `process_madvise` call where the kernel takes
    /// it, or one `madvise` each once the host has refused it; either way every page goes and
    /// the mappings stay.
    #[test]
    fn zapping_many_ranges_frees_them_in_one_call_or_one_by_one() {
        use std::sync::atomic::Ordering::Relaxed;
        let hs = HostSpace::reserve(1 << 30).unwrap();
        let ranges: Vec<(u64, u64)> = (0..8).map(|i| (16 << 20 | i << 21, 16 << 12)).collect();
        let one_call = self_pidfd().is_some();
        for refused in [false, true] {
            for &(gpa, len) in &ranges {
                // SAFETY: the test owns this reservation; nothing else uses the range.
                unsafe { hs.map(gpa, len, Backing::Anon, HostAccess::ReadWrite) }.unwrap();
                for p in (0..len).step_by(4096) {
                    // SAFETY: just mapped read-write, not registered with userfaultfd.
                    unsafe { hs.write(gpa + p, &[1]) };
                }
            }
            let populated =
                |gpa| crate::memory::snapshot::count_populated(hs.host_addr(gpa), 16).unwrap();
            assert_eq!(populated(ranges[3].0), 16);
            if refused {
                BATCH_ZAP_REFUSED.store(true, Relaxed);
            }
            // SAFETY: the test owns this reservation; nothing else uses the ranges.
            let calls = unsafe { hs.zap_anon_many(&ranges) }.unwrap();
            // An older kernel refuses the batch (one call) and it goes range by range.
            let refused_by_host = BATCH_ZAP_REFUSED.swap(false, Relaxed) && !refused;
            let expected = match (refused, refused_by_host) {
                (true, _) => ranges.len(),
                (false, true) => ranges.len() + 1,
                (false, false) if one_call => 1,
                (false, false) => ranges.len(),
            };
            assert_eq!(calls, expected, "refused {refused}");
            for &(gpa, _) in &ranges {
                assert_eq!(populated(gpa), 0, "refused {refused}: {gpa:#x} freed");
            }
            let mut b = [9u8];
            // SAFETY: still mapped read-write (its pages were dropped, not the mapping).
            unsafe { hs.read(ranges[0].0, &mut b) };
            assert_eq!(b, [0]);
        }
    }

    #[test]
    fn release_frees_memfd_pages_of_a_partly_released_region() {
        release_frees_file_pages(Backing::Memfd, 4096);
    }

    /// Needs 4 free 2 MiB huge pages: `.ci/run` reserves them and sets `VMM_REQUIRE_HUGETLB=1`,
    /// which turns the skip into a failure.
    #[test]
    fn release_frees_hugetlb_pages_of_a_partly_released_region() {
        let free = free_huge_pages();
        if free < 4 {
            let why = format!(
                "{free} free 2 MiB huge pages, 4 needed (echo 8 > /proc/sys/vm/nr_hugepages)"
            );
            assert!(
                std::env::var_os("VMM_REQUIRE_HUGETLB").is_none(),
                "VMM_REQUIRE_HUGETLB is set but the test cannot run: {why}"
            );
            eprintln!("skipped: {why}");
            return;
        }
        release_frees_file_pages(Backing::Hugetlb, 2 << 20);
    }

    #[test]
    fn rejects_ranges_outside_or_unaligned() {
        let hs = HostSpace::reserve(1 << 30).unwrap();
        // SAFETY: the test owns this reservation; nothing else uses the range.
        assert!(unsafe { hs.map(0x10001, 0x1000, Backing::Anon, HostAccess::ReadWrite) }.is_err());
        // SAFETY: the test owns this reservation; nothing else uses the range.
        assert!(unsafe { hs.map(1 << 30, 0x1000, Backing::Anon, HostAccess::ReadWrite) }.is_err());
        // SAFETY: the test owns this reservation; nothing else uses the range.
        assert!(unsafe { hs.map(0, 0, Backing::Anon, HostAccess::ReadWrite) }.is_err());
        // SAFETY: the test owns this reservation; nothing else uses the range.
        assert!(unsafe { hs.map(0x1000, 0x1000, Backing::Memfd, HostAccess::ReadWrite) }.is_ok());
        let rw = HostAccess::ReadWrite;
        // SAFETY: the test owns this reservation; nothing else uses the range.
        assert!(unsafe { hs.map(0x1000, 0x1000, Backing::Hugetlb, rw) }.is_err());
    }
}
