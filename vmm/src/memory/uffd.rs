//! userfaultfd: the few operations the fault path needs, written against the kernel's UAPI
//! (`linux/userfaultfd.h`) by hand. The `userfaultfd` crate would need libclang at build time
//! for its bindings; the five structures below are all we use.
//!
//! Every `unsafe` block of the fault path's kernel interface lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFDIO: u64 = 0xAA;
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = iowr(0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_MOVE: u64 = iowr(0x05, std::mem::size_of::<UffdioMove>());

/// Missing-page faults raise SIGBUS in the faulting thread instead of waiting for a handler
/// (for KVM: `KVM_RUN` returns to the vCPU thread instead of blocking in the kernel).
const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
/// `UFFDIO_MOVE` (Linux 6.8 and later): pages of another anonymous mapping moved into the
/// registered range, a transparent huge page as one PMD when both ends are 2 MiB aligned.
const UFFD_FEATURE_MOVE: u64 = 1 << 16;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `UFFDIO_COPY_MODE_DONTWAKE` / `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
const MODE_DONTWAKE: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// `struct uffd_msg` (32 bytes), page-fault view.
#[repr(C)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

/// How a userfaultfd reports missing pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdMode {
    /// The faulting thread gets SIGBUS (for a vCPU: a VM exit) instead of blocking.
    Sigbus,
    /// The faulting thread blocks until a handler thread reads the event and populates.
    Handler,
}

/// The outcome of populating a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Populated {
    /// This call populated the whole range.
    Done,
    /// Some page of the range was already present (another thread won the race, or a page
    /// was populated earlier); `bytes` were populated before it.
    AlreadyPresent {
        /// Bytes populated by this call before the present page.
        bytes: u64,
    },
    /// The kernel populated (and, in handler mode, woke) the first `bytes` and stopped
    /// (`EAGAIN` with progress: it met a present page, or the mapping changed); the rest is
    /// for the caller to retry.
    Partial {
        /// Bytes populated by this call.
        bytes: u64,
    },
}

/// A page fault read from a handler-mode userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting host virtual address.
    pub host_addr: u64,
    /// Whether the access was a write.
    pub write: bool,
}

/// A userfaultfd file descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    mode: UffdMode,
    source: &'static str,
    /// Whether the kernel accepted `UFFD_FEATURE_MOVE`.
    can_move: bool,
}

/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)`, on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

/// A new userfaultfd: through `/dev/userfaultfd` where this process may open it (which works
/// when `vm.unprivileged_userfaultfd` is 0, for users given access to the device), else through
/// the `userfaultfd` syscall (root, or unprivileged userfaultfd allowed).
fn open_userfaultfd() -> io::Result<(OwnedFd, &'static str)> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if let Ok(dev) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
    {
        // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags and returns a new fd or
        // -1; it touches no memory of ours.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if fd >= 0 {
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            return Ok((
                unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
                "/dev/userfaultfd",
            ));
        }
    }
    // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok((
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
        "the userfaultfd syscall",
    ))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd (non-blocking, close-on-exec) and negotiates the API for `mode`.
    pub fn new(mode: UffdMode) -> io::Result<Self> {
        let features = match mode {
            UffdMode::Sigbus => UFFD_FEATURE_SIGBUS,
            UffdMode::Handler => 0,
        };
        // With `UFFDIO_MOVE` where the kernel has it; a kernel that does not know the feature
        // refuses the handshake (EINVAL), and a descriptor takes one handshake only, so the
        // fallback is a new descriptor without it.
        let (fd, source) = open_userfaultfd()?;
        if api_handshake(&fd, features | UFFD_FEATURE_MOVE).is_ok() {
            return Ok(Self {
                fd,
                mode,
                source,
                can_move: true,
            });
        }
        let (fd, source) = open_userfaultfd()?;
        api_handshake(&fd, features)?;
        Ok(Self {
            fd,
            mode,
            source,
            can_move: false,
        })
    }

    /// Whether [`fill_huge_zeroed`](Self::fill_huge_zeroed) can work (the kernel has
    /// `UFFDIO_MOVE`).
    pub fn can_move(&self) -> bool {
        self.can_move
    }

    /// Populates the 2 MiB at `host_addr` (2 MiB aligned, missing pages of an anonymous
    /// private registered range) with zeroes, on a transparent huge page where the host can
    /// give one: `stage` is populated for writing (the kernel allocates and zeroes a huge page
    /// there when it has one, else 4 KiB pages) and its pages are moved into place
    /// (`UFFDIO_MOVE`: one PMD for a huge page whose destination has no page table yet,
    /// page by page otherwise). Whatever the move left behind in `stage` is dropped, so the
    /// next fill starts from nothing.
    pub fn fill_huge_zeroed(&self, stage: &HugeStage, host_addr: u64) -> io::Result<Populated> {
        // SAFETY: `stage` owns a private anonymous mapping of HUGE bytes that no Rust
        // reference points into; populating it only allocates zeroed pages there.
        check(unsafe {
            libc::madvise(
                stage.addr as *mut libc::c_void,
                HUGE as usize,
                libc::MADV_POPULATE_WRITE,
            )
        })?;
        let mut m = UffdioMove {
            dst: host_addr,
            src: stage.addr,
            len: HUGE,
            mode: self.dontwake(),
            moved: 0,
        };
        // SAFETY: UFFDIO_MOVE reads and writes a `struct uffdio_move`. It takes pages out of
        // `stage`'s mapping (ours, unreferenced) and the kernel checks that the destination
        // lies in a range registered here and never replaces a present page (EEXIST).
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_MOVE as _, &mut m) };
        let out = populated(r, m.moved);
        // A huge page moved whole leaves the stage empty, and this is a no-op. One split on
        // the way (the destination had a page table) leaves a page table in the stage, which
        // would make every later fill there 4 KiB pages: dropping it (and any page the move
        // left) keeps the next fill huge.
        stage.clear();
        out
    }

    /// How faults are reported: `SIGBUS` to the faulting thread, or events a handler reads.
    pub fn mode(&self) -> UffdMode {
        self.mode
    }

    /// How the descriptor was created: `/dev/userfaultfd` or the `userfaultfd` syscall.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Reports missing pages in `[host_addr, host_addr + len)` (page-aligned, inside an
    /// anonymous or shmem mapping of this process) through this descriptor.
    pub fn register(&self, host_addr: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: host_addr,
                len,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`. The kernel
        // validates the range against this process's mappings; no memory of ours is touched.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })
    }

    /// Stops reporting faults in the range.
    pub fn unregister(&self, host_addr: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange {
            start: host_addr,
            len,
        };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) })
    }

    /// Wakes threads blocked on faults in the range (handler mode).
    pub fn wake(&self, host_addr: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange {
            start: host_addr,
            len,
        };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) })
    }

    fn dontwake(&self) -> u64 {
        match self.mode {
            // Nobody sleeps on a SIGBUS-mode descriptor.
            UffdMode::Sigbus => MODE_DONTWAKE,
            UffdMode::Handler => 0,
        }
    }

    /// Maps the zero page over the missing pages `[host_addr, host_addr + len)` atomically.
    pub fn zeropage(&self, host_addr: u64, len: u64) -> io::Result<Populated> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: host_addr,
                len,
            },
            mode: self.dontwake(),
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage`; the kernel
        // checks that the range lies in a registered area and never overwrites present pages.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
        populated(r, z.zeropage)
    }

    /// Copies `len` bytes from `src` into the missing pages at `host_addr`, atomically with
    /// respect to other threads touching them.
    pub fn copy(&self, host_addr: u64, src: &[u8]) -> io::Result<Populated> {
        let mut c = UffdioCopy {
            dst: host_addr,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: self.dontwake(),
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `src.len()` bytes from `src` (a live slice) and writes a
        // `struct uffdio_copy`; the destination is checked by the kernel to lie in a
        // registered area, and present pages are never overwritten (EEXIST).
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        populated(r, c.copy)
    }

    /// [`copy`](Self::copy) from memory that is not a Rust slice: `len` bytes at `src`.
    ///
    /// # Safety
    ///
    /// `[src, src + len)` must lie in a readable mapping of this process for the duration of
    /// the call (the kernel reads it; if a page there cannot be read, for example a file
    /// mapping beyond a truncated file's end, the call fails with `EFAULT`, with no signal).
    pub unsafe fn copy_from_raw(
        &self,
        host_addr: u64,
        src: *const u8,
        len: u64,
    ) -> io::Result<Populated> {
        let mut c = UffdioCopy {
            dst: host_addr,
            src: src as u64,
            len,
            mode: self.dontwake(),
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (readable, per the contract) and
        // writes a `struct uffdio_copy`; the destination is checked by the kernel as above.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        populated(r, c.copy)
    }

    /// Reads the next page-fault event, if any (handler mode; the descriptor is
    /// non-blocking: poll it first). Events other than page faults are skipped.
    pub fn read_fault(&self) -> io::Result<Option<PageFault>> {
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
        // SAFETY: reads at most `size_of::<UffdMsg>()` bytes into `msg`'s storage.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msg.as_mut_ptr().cast(),
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            };
        }
        if n as usize != std::mem::size_of::<UffdMsg>() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short uffd_msg",
            ));
        }
        // SAFETY: the kernel filled the whole message (checked just above); every bit
        // pattern is a valid `UffdMsg` (plain integers).
        let msg = unsafe { msg.assume_init() };
        if msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        Ok(Some(PageFault {
            host_addr: msg.address,
            write: msg.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
        }))
    }
}

/// Most events [`Uffd::read_faults`] reads at once.
pub const READ_BATCH: usize = 16;

impl Uffd {
    /// Reads the pending events with one `read` (at most [`READ_BATCH`]; handler mode, the
    /// descriptor is non-blocking: poll it first), keeping the page faults in `out`. Returns
    /// (page faults kept, events read): fewer events than [`READ_BATCH`] means the queue was
    /// empty, so the caller need not read again (and be answered `EAGAIN`).
    pub fn read_faults(&self, out: &mut [PageFault; READ_BATCH]) -> io::Result<(usize, usize)> {
        let mut msgs = [const { std::mem::MaybeUninit::<UffdMsg>::uninit() }; READ_BATCH];
        let size = std::mem::size_of::<UffdMsg>();
        // SAFETY: reads at most `READ_BATCH * size_of::<UffdMsg>()` bytes into `msgs`, an
        // array of exactly that many bytes (MaybeUninit<T> has T's layout).
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                READ_BATCH * size,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok((0, 0)),
                _ => Err(e),
            };
        }
        let n = n as usize;
        if n % size != 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short uffd_msg",
            ));
        }
        let events = n / size;
        let mut kept = 0;
        for m in &msgs[..events] {
            // SAFETY: the kernel filled the first `events` whole messages (checked above);
            // every bit pattern is a valid `UffdMsg` (plain integers).
            let msg = unsafe { m.assume_init_read() };
            if msg.event == UFFD_EVENT_PAGEFAULT {
                out[kept] = PageFault {
                    host_addr: msg.address,
                    write: msg.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                };
                kept += 1;
            }
        }
        Ok((kept, events))
    }

    /// Waits up to `timeout_ms` for an event; returns whether one is ready.
    pub fn poll(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(r > 0 && pfd.revents & libc::POLLIN != 0)
    }
}

fn api_handshake(fd: &OwnedFd, features: u64) -> io::Result<()> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) })
}

/// The size of a transparent huge page on x86-64.
const HUGE: u64 = 2 << 20;

/// A 2 MiB aligned private anonymous mapping that asks for transparent huge pages
/// (`MADV_HUGEPAGE`): where [`Uffd::fill_huge_zeroed`] has the kernel zero a huge page before
/// moving it into guest RAM. Empty between fills.
#[derive(Debug)]
pub struct HugeStage {
    addr: u64,
}

impl HugeStage {
    /// Maps a new stage.
    pub fn new() -> io::Result<Self> {
        let addr = super::host::map_aligned(HUGE, HUGE, libc::PROT_READ | libc::PROT_WRITE)?;
        let stage = Self { addr };
        // SAFETY: advice on the stage's own mapping.
        check(unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                HUGE as usize,
                libc::MADV_HUGEPAGE,
            )
        })?;
        Ok(stage)
    }

    /// Drops whatever pages the stage holds.
    fn clear(&self) {
        // SAFETY: the stage's own mapping, which nothing references.
        unsafe {
            libc::madvise(
                self.addr as *mut libc::c_void,
                HUGE as usize,
                libc::MADV_DONTNEED,
            );
        }
    }
}

impl Drop for HugeStage {
    fn drop(&mut self) {
        // SAFETY: the stage owns `[addr, addr + HUGE)`; nothing refers to it any more.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, HUGE as usize);
        }
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn populated(ret: libc::c_int, done: i64) -> io::Result<Populated> {
    if ret == 0 {
        return Ok(Populated::Done);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EAGAIN) && done > 0 {
        return Ok(Populated::Partial { bytes: done as u64 });
    }
    if e.raw_os_error() == Some(libc::EEXIST) {
        // The kernel reports the bytes done before the present page as a non-negative
        // count, or -EEXIST when it was the first page.
        return Ok(Populated::AlreadyPresent {
            bytes: done.max(0) as u64,
        });
    }
    Err(e)
}

#[cfg(test)]
mod tests {

    /// The device is tried first: where this process can open `/dev/userfaultfd`, the
    /// descriptor comes from it (so `vm.unprivileged_userfaultfd=0` does not matter).
    #[test]
    fn userfaultfd_comes_from_the_device_where_it_can_be_opened() {
        let can_open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .is_ok();
        let u = Uffd::new(UffdMode::Handler).unwrap();
        if can_open {
            assert_eq!(u.source(), "/dev/userfaultfd");
        } else {
            assert_eq!(u.source(), "the userfaultfd syscall");
        }
    }

    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_uapi() {
        // Values from linux/userfaultfd.h on x86-64.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }
}
