//! Thin wrappers over kvm-ioctls: opening the KVM device, installing memslots, kicking vCPUs
//! out of `KVM_RUN`, and the few reads of `kvm_run` that kvm-ioctls does not decode.
//!
//! This is one of the few modules allowed `unsafe`; every block says why it is sound.

pub mod state;

use std::cell::Cell;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_run, kvm_userspace_memory_region, KVM_API_VERSION};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error(
        "cannot open {path}: it does not exist; KVM is not available on this host \
         (enable virtualisation and load the kvm_intel or kvm_amd module, or point \
         --kvm-dev/VMM_KVM_DEV at the KVM device)"
    )]
    Missing {
        /// The path tried.
        path: PathBuf,
    },
    /// The device node exists but cannot be opened.
    #[error(
        "cannot open {path}: {source}; check its permissions (run as root or join the \
         group that owns it, usually `kvm`)"
    )]
    Open {
        /// The path tried.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The path contains a NUL byte.
    #[error("invalid KVM device path {path:?}: it contains a NUL byte")]
    BadPath {
        /// The path given.
        path: PathBuf,
    },
    /// The path is not a KVM device.
    #[error("{path} is not a KVM device (KVM_GET_API_VERSION failed); point --kvm-dev/VMM_KVM_DEV at /dev/kvm")]
    NotKvm {
        /// The path.
        path: PathBuf,
    },
    /// The kernel's KVM API is not the stable one.
    #[error("{path}: KVM API version {found}, expected {expected}")]
    ApiVersion {
        /// The device.
        path: PathBuf,
        /// What the kernel reports.
        found: i32,
        /// What we need.
        expected: u32,
    },
    /// A capability we need is missing.
    #[error("KVM lacks a capability this VMM needs: {0}")]
    MissingCap(&'static str),
    /// An ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// What we were doing.
        what: &'static str,
        /// The kernel's error.
        source: kvm_ioctls::Error,
    },
    /// A saved vCPU state is malformed.
    #[error("vCPU state: {0}")]
    State(String),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// Opens the KVM device at `path` and checks the API version and the capabilities we use.
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        KvmError::BadPath {
            path: path.to_owned(),
        }
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| {
        let io = std::io::Error::from_raw_os_error(e.errno());
        if io.kind() == std::io::ErrorKind::NotFound {
            KvmError::Missing {
                path: path.to_owned(),
            }
        } else {
            KvmError::Open {
                path: path.to_owned(),
                source: io,
            }
        }
    })?;
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(KvmError::NotKvm {
            path: path.to_owned(),
        });
    }
    if version != KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion {
            path: path.to_owned(),
            found: version,
            expected: KVM_API_VERSION,
        });
    }
    for (cap, name) in [
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// The VM's memslots, as the address space installs and deletes them.
pub struct KvmMemslots {
    vm: std::sync::Arc<VmFd>,
    capacity: u32,
}

impl KvmMemslots {
    /// Memslots of `vm`; `capacity` is `KVM_CAP_NR_MEMSLOTS`.
    pub fn new(vm: std::sync::Arc<VmFd>, capacity: u32) -> Self {
        Self { vm, capacity }
    }
}

impl KvmMemslots {
    /// `KVM_SET_USER_MEMORY_REGION` for memslot `slot`: `[gpa, gpa + size)` at `host_addr`,
    /// with `flags`.
    ///
    /// # Safety
    ///
    /// `[host_addr, host_addr + size)` must stay mapped as long as the memslot exists (KVM
    /// reaches guest memory through it), or `size` is 0 (the slot is deleted).
    unsafe fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: u32,
    ) -> std::io::Result<()> {
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller's contract.
        unsafe { self.vm.set_user_memory_region(mem_region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl crate::memory::Memslots for KvmMemslots {
    fn install(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        readonly: bool,
    ) -> std::io::Result<()> {
        let flags = if readonly {
            kvm_bindings::KVM_MEM_READONLY
        } else {
            0
        };
        // SAFETY: the address space maps `host_addr..+size` before installing the memslot and
        // releases it only after deleting the memslot (and a grace period); guest memory is
        // never borrowed by a Rust object, only touched through raw host addresses.
        unsafe { self.set_region(slot, gpa, size, host_addr, flags) }
    }

    fn delete(&self, slot: u32, gpa: u64) -> std::io::Result<()> {
        // SAFETY: a zero-sized region deletes the slot; no host memory is handed to KVM.
        unsafe { self.set_region(slot, gpa, 0, 0, 0) }
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn set_dirty_logging(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        on: bool,
    ) -> std::io::Result<()> {
        let flags = if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        // SAFETY: the same slot, range and host memory as installed (see `install`); only the
        // flags change.
        unsafe { self.set_region(slot, gpa, size, host_addr, flags) }
    }

    fn dirty_log(&self, slot: u32, size: u64) -> std::io::Result<Vec<u64>> {
        self.vm
            .get_dirty_log(slot, size as usize)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's vCPU `kvm_run` mapping, for the kick signal handler. Const-initialised
    /// and without a destructor, so reading it in a signal handler allocates nothing.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was registered by `KickGuard` from this thread's own `VcpuFd`,
        // whose `kvm_run` mapping lives until the guard is dropped (which clears the pointer
        // first). A single-byte volatile store is what the KVM API prescribes for
        // `immediate_exit` from a signal handler: the next (or current) KVM_RUN returns EINTR.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler (idempotent).
pub fn install_kick_handler() -> Result<(), KvmError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(KvmError::Signal)
}

/// While alive, the kick signal sets this thread's vCPU's `immediate_exit`. The guard borrows
/// the vCPU (and gives it back through `Deref`), so the vCPU, whose `kvm_run` mapping the
/// signal handler writes, cannot be dropped or moved while it is registered.
pub struct KickGuard<'a> {
    vcpu: &'a mut VcpuFd,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl<'a> KickGuard<'a> {
    /// Registers `vcpu`'s `kvm_run` for the calling thread, for as long as the guard lives.
    pub fn register(vcpu: &'a mut VcpuFd) -> Self {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|c| c.set(run));
        KickGuard {
            vcpu,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl std::ops::Deref for KickGuard<'_> {
    type Target = VcpuFd;
    fn deref(&self) -> &VcpuFd {
        self.vcpu
    }
}

impl std::ops::DerefMut for KickGuard<'_> {
    fn deref_mut(&mut self) -> &mut VcpuFd {
        self.vcpu
    }
}

impl Drop for KickGuard<'_> {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// The sub-error and the data words of a `KVM_EXIT_INTERNAL_ERROR` exit (valid right after
/// such an exit).
pub fn internal_error_info(vcpu: &mut VcpuFd) -> (u32, Vec<u64>) {
    let run = vcpu.get_kvm_run();
    // SAFETY: the `internal` member of the `kvm_run` union is plain integers, so reading it is
    // always defined; the values are meaningful because the caller only asks after
    // `KVM_EXIT_INTERNAL_ERROR`.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    (internal.suberror, internal.data[..n].to_vec())
}

/// Completes a port or MMIO access the vCPU exited for (KVM finishes it, e.g. loads the value
/// of an `in` into `rax`, on the next `KVM_RUN`) without entering the guest: `KVM_RUN` with
/// `immediate_exit` set, which returns `EINTR` once the access is done. Call it before reading
/// the vCPU's state for a snapshot.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
    fd.set_kvm_immediate_exit(1);
    let r = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        other => other,
    }
}

/// The calling thread's pthread id (to kick it later with [`kick_thread`]).
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
}

/// Sends the kick signal to `thread`, which must be alive (the caller keeps a registry of live
/// vCPU threads under a lock that the thread takes before it exits).
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: per the contract `thread` is a live thread of this process; the kick signal's
    // handler only sets that thread's `immediate_exit`.
    let r = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if r != 0 {
        tracing::debug!(errno = r, "kick failed");
    }
}
