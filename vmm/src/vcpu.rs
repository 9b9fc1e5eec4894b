//! vCPU threads: the run loop, exit decoding and the diagnosis of a guest that went wrong.
//!
//! The loop is `loop { check stop; vcpu.run(); handle_exit(..) }`. `KVM_RUN` is one clearly
//! delimited call (`run_once`), made with the thread's RCU reader offline
//! (`reader.offline_while`); each handled exit is one read-side critical section, so an exit
//! is the vCPU's quiescent state. A fault-around window bigger than
//! [`crate::memory::fault::FILL_CHUNK`] pages is filled a chunk per critical section: the
//! faulting page's chunk under the exit's guard, the rest after it, with a quiescent state
//! between chunks, before the guest runs again. Exit handling is the pure function [`handle_exit`], which
//! decides every exit; faults KVM did not locate go to the resolver (`crate::efault`).
#![deny(unsafe_code)]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{Devices, PioOutcome};
use crate::kvm::{self, KickGuard};
use crate::memory::{Access, AddressSpace, FaultError, PageState, Serviced};

/// An exit, decoded into our own terms (so that [`handle_exit`] can be tested without KVM).
#[derive(Debug)]
pub enum ExitEvent<'a> {
    /// `in` from a port.
    IoIn {
        /// The port.
        port: u16,
        /// To fill in.
        data: &'a mut [u8],
    },
    /// `out` to a port.
    IoOut {
        /// The port.
        port: u16,
        /// What was written.
        data: &'a [u8],
    },
    /// A read from a guest-physical address with no memslot.
    MmioRead {
        /// The address.
        gpa: u64,
        /// To fill in.
        data: &'a mut [u8],
    },
    /// A write to a guest-physical address with no memslot.
    MmioWrite {
        /// The address.
        gpa: u64,
        /// What was written.
        data: &'a [u8],
    },
    /// KVM could not fault a page in (`KVM_EXIT_MEMORY_FAULT`, on hosts that annotate
    /// failed guest memory accesses): populate it and re-enter, the access is re-executed.
    MemoryFault {
        /// The guest-physical address.
        gpa: u64,
        /// Size of the range.
        size: u64,
    },
    /// A fault KVM did not locate: `KVM_RUN` failed with a bare `EFAULT`, or KVM's emulator
    /// failed (it could not fetch or access a page that is not populated yet).
    Unlocated {
        /// What KVM reported, for the diagnosis.
        cause: &'static str,
        /// KVM's data words (emulation failures).
        data: Vec<u64>,
    },
    /// `hlt` (there is no in-kernel irqchip, so nothing can wake the vCPU).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// KVM could not emulate something.
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// KVM's data words.
        data: Vec<u64>,
    },
    /// `KVM_RUN` itself failed (other than `EINTR`/`EAGAIN` and a bare `EFAULT`).
    RunFailed {
        /// errno.
        errno: i32,
    },
    /// VM entry failed.
    FailEntry {
        /// Hardware reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// A system event (reset, shutdown, crash).
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*`.
        kind: u32,
    },
    /// Interrupted by a signal.
    Interrupted,
    /// Anything else.
    Other {
        /// Name of the exit.
        name: String,
    },
}

impl<'a> From<VcpuExit<'a>> for ExitEvent<'a> {
    fn from(exit: VcpuExit<'a>) -> Self {
        match exit {
            VcpuExit::IoIn(port, data) => ExitEvent::IoIn { port, data },
            VcpuExit::IoOut(port, data) => ExitEvent::IoOut { port, data },
            VcpuExit::MmioRead(gpa, data) => ExitEvent::MmioRead { gpa, data },
            VcpuExit::MmioWrite(gpa, data) => ExitEvent::MmioWrite { gpa, data },
            VcpuExit::MemoryFault { gpa, size, .. } => ExitEvent::MemoryFault { gpa, size },
            VcpuExit::Hlt => ExitEvent::Hlt,
            VcpuExit::Shutdown => ExitEvent::Shutdown,
            // The sub-error is filled in by the caller, which can read kvm_run.
            VcpuExit::InternalError => ExitEvent::InternalError {
                suberror: 0,
                data: Vec::new(),
            },
            VcpuExit::FailEntry(reason, cpu) => ExitEvent::FailEntry { reason, cpu },
            VcpuExit::SystemEvent(kind, _) => ExitEvent::SystemEvent { kind },
            VcpuExit::Intr => ExitEvent::Interrupted,
            other => ExitEvent::Other {
                name: format!("{other:?}"),
            },
        }
    }
}

/// Why a vCPU cannot go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FatalExit {
    /// KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// `out` to a port no device owns.
    UnknownPortWrite {
        /// The port.
        port: u16,
        /// Access width.
        size: usize,
        /// The value.
        value: u64,
    },
    /// `in` from a port no device owns.
    UnknownPortRead {
        /// The port.
        port: u16,
        /// Access width.
        size: usize,
    },
    /// Servicing a guest memory access failed on the host (out of memory, broken
    /// userfaultfd).
    FaultFailed {
        /// The guest-physical address.
        gpa: u64,
        /// What failed.
        message: String,
    },
    /// `hlt`.
    Halted,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError {
        /// The sub-error.
        suberror: u32,
        /// KVM's data words.
        data: Vec<u64>,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// Hardware reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent {
        /// The event type.
        kind: u32,
    },
    /// Any exit we do not handle.
    Unexpected {
        /// Its name.
        name: String,
    },
    /// `KVM_RUN` failed with a bare `EFAULT`, or KVM's emulator failed, and the VMM could not
    /// complete the instruction.
    Unresolved {
        /// What KVM reported.
        cause: &'static str,
        /// What the VMM found, naming the instruction and the address.
        message: String,
    },
    /// KVM_RUN itself failed.
    RunFailed {
        /// errno.
        errno: i32,
    },
}

fn le_value(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

impl fmt::Display for FatalExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FatalExit::TripleFault => write!(f, "guest triple-faulted (KVM_EXIT_SHUTDOWN)"),
            FatalExit::UnknownPortWrite { port, size, value } => write!(
                f,
                "guest wrote {value:#x} ({size}-byte) to unknown I/O port {port:#x} (KVM_EXIT_IO)"
            ),
            FatalExit::UnknownPortRead { port, size } => write!(
                f,
                "guest read ({size}-byte) from unknown I/O port {port:#x} (KVM_EXIT_IO)"
            ),
            FatalExit::FaultFailed { gpa, message } => write!(
                f,
                "servicing a guest access to gpa {gpa:#x} failed: {message} (KVM_EXIT_MMIO)"
            ),
            FatalExit::Halted => write!(
                f,
                "guest halted (KVM_EXIT_HLT); there are no interrupts to wake it"
            ),
            FatalExit::InternalError { suberror, data } => {
                let what = match suberror {
                    1 => " (instruction emulation failed)",
                    2 => " (simultaneous exceptions)",
                    3 => " (delivery event failed)",
                    _ => "",
                };
                write!(
                    f,
                    "KVM internal error, suberror {suberror}{what} data={data:x?} \
                     (KVM_EXIT_INTERNAL_ERROR)"
                )
            }
            FatalExit::FailEntry { reason, cpu } => write!(
                f,
                "VM entry failed, hardware reason {reason:#x} on host cpu {cpu} \
                 (KVM_EXIT_FAIL_ENTRY)"
            ),
            FatalExit::SystemEvent { kind } => {
                write!(f, "guest system event {kind} (KVM_EXIT_SYSTEM_EVENT)")
            }
            FatalExit::Unexpected { name } => write!(f, "unexpected exit {name}"),
            FatalExit::Unresolved { cause, message } => write!(f, "{cause}: {message}"),
            FatalExit::RunFailed { errno } => write!(
                f,
                "KVM_RUN failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

/// What handling one exit decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEmulation {
    /// Go on running.
    Handled,
    /// A signal interrupted `KVM_RUN`: check whether to stop, then go on.
    Interrupted,
    /// This vCPU is done; the others go on.
    Parked,
    /// The guest ended the run with this status.
    Stopped(u8),
    /// The guest did something we cannot continue from.
    Fatal(FatalExit),
    /// KVM did not say what the guest touched: the instruction at `rip` must be examined
    /// (see `efault`): populated for, or completed by the VMM. Carries the cause and KVM's
    /// data words for the diagnosis.
    Resolve(&'static str, Vec<u64>),
}

/// Decides what an exit means. Pure apart from the device side effects: no vCPU needed.
pub fn handle_exit(
    exit: ExitEvent<'_>,
    vcpu: usize,
    devices: &Devices,
    mem: &dyn GuestMemoryExits,
) -> VcpuEmulation {
    match exit {
        ExitEvent::IoOut { port, data } => match devices.pio_write(vcpu, port, data) {
            PioOutcome::Handled => VcpuEmulation::Handled,
            PioOutcome::Exit(status) => VcpuEmulation::Stopped(status),
            PioOutcome::Park => VcpuEmulation::Parked,
            PioOutcome::Unknown => VcpuEmulation::Fatal(FatalExit::UnknownPortWrite {
                port,
                size: data.len(),
                value: le_value(data),
            }),
        },
        ExitEvent::IoIn { port, data } => match devices.pio_read(port, data) {
            PioOutcome::Handled => VcpuEmulation::Handled,
            PioOutcome::Exit(status) => VcpuEmulation::Stopped(status),
            PioOutcome::Park => VcpuEmulation::Parked,
            PioOutcome::Unknown => VcpuEmulation::Fatal(FatalExit::UnknownPortRead {
                port,
                size: data.len(),
            }),
        },
        ExitEvent::MmioRead { gpa, data } => fault_outcome(gpa, mem.mmio(gpa, Access::Read(data))),
        ExitEvent::MmioWrite { gpa, data } => {
            fault_outcome(gpa, mem.mmio(gpa, Access::Write(data)))
        }
        // The flags say nothing of the access's direction (`KVM_MEMORY_EXIT_FLAG_PRIVATE` is
        // about guest_memfd): populate for reading (a later write takes the host's ordinary
        // copy-on-write fault, not a userfault). If that populated nothing, the access was to
        // a hole or a write to read-only memory: the instruction must be completed by the VMM.
        ExitEvent::MemoryFault { gpa, size } => match mem.memory_fault(gpa, size) {
            Ok(true) => VcpuEmulation::Handled,
            Ok(false) => VcpuEmulation::Resolve(CAUSE_MEMORY_FAULT, Vec::new()),
            Err(e) => VcpuEmulation::Fatal(FatalExit::FaultFailed {
                gpa,
                message: e.to_string(),
            }),
        },
        ExitEvent::Unlocated { cause, data } => VcpuEmulation::Resolve(cause, data),
        ExitEvent::Hlt => VcpuEmulation::Fatal(FatalExit::Halted),
        ExitEvent::Shutdown => VcpuEmulation::Fatal(FatalExit::TripleFault),
        ExitEvent::InternalError { suberror, data } => {
            VcpuEmulation::Fatal(FatalExit::InternalError { suberror, data })
        }
        ExitEvent::RunFailed { errno } => VcpuEmulation::Fatal(FatalExit::RunFailed { errno }),
        ExitEvent::FailEntry { reason, cpu } => {
            VcpuEmulation::Fatal(FatalExit::FailEntry { reason, cpu })
        }
        ExitEvent::SystemEvent { kind } => VcpuEmulation::Fatal(FatalExit::SystemEvent { kind }),
        ExitEvent::Interrupted => VcpuEmulation::Interrupted,
        ExitEvent::Other { name } => VcpuEmulation::Fatal(FatalExit::Unexpected { name }),
    }
}

/// How the vCPU loop reaches guest memory when an exit needs it: the address space under
/// the read guard of the exit being handled (a trait so that `handle_exit` is testable
/// without KVM).
pub trait GuestMemoryExits {
    /// Completes an MMIO exit (a first touch, an access without a memslot, or open bus).
    fn mmio(&self, gpa: u64, access: Access<'_>) -> Result<Serviced, FaultError>;
    /// Populates `[gpa, gpa + size)` after `KVM_EXIT_MEMORY_FAULT`; whether any page was
    /// populated (`false`: a hole, or pages already there).
    fn memory_fault(&self, gpa: u64, size: u64) -> Result<bool, FaultError>;
}

/// The view of guest memory an exit is handled with: the address space under the exit's read
/// guard (one exit, one read-side critical section), the same view devices use.
pub type GuardedSpace<'a> = crate::memory::GuardedMemory<'a>;

impl GuestMemoryExits for crate::memory::GuardedMemory<'_> {
    fn mmio(&self, gpa: u64, access: Access<'_>) -> Result<Serviced, FaultError> {
        self.complete(gpa, access)
    }
    fn memory_fault(&self, gpa: u64, size: u64) -> Result<bool, FaultError> {
        let page = crate::memory::address_space::PAGE;
        let mut populated = false;
        let mut at = gpa & !(page - 1);
        while at < gpa.saturating_add(size.max(1)) {
            populated |= self.fault_page(at, false)? == PageState::Populated;
            at += page;
        }
        Ok(populated)
    }
}

/// The one place MMIO outcomes are decided: RAM and open bus go on (open bus is counted and
/// logged by the address space); a host failure is fatal.
fn fault_outcome(gpa: u64, r: Result<Serviced, FaultError>) -> VcpuEmulation {
    match r {
        Ok(Serviced::OpenBus) => {
            tracing::debug!(gpa = format_args!("{gpa:#x}"), "open-bus access");
            VcpuEmulation::Handled
        }
        Ok(_) => VcpuEmulation::Handled,
        Err(e) => VcpuEmulation::Fatal(FatalExit::FaultFailed {
            gpa,
            message: e.to_string(),
        }),
    }
}

/// Registers that explain where a vCPU was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegsSnapshot {
    /// rip.
    pub rip: u64,
    /// rsp.
    pub rsp: u64,
    /// rflags.
    pub rflags: u64,
    /// cr0.
    pub cr0: u64,
    /// cr2 (last page-fault address).
    pub cr2: u64,
    /// cr3.
    pub cr3: u64,
    /// cr4.
    pub cr4: u64,
    /// efer.
    pub efer: u64,
}

impl RegsSnapshot {
    /// Reads the registers of `vcpu` (zeros where the read fails).
    pub fn read(vcpu: &VcpuFd) -> Self {
        let mut s = RegsSnapshot::default();
        if let Ok(r) = vcpu.get_regs() {
            s.rip = r.rip;
            s.rsp = r.rsp;
            s.rflags = r.rflags;
        }
        if let Ok(sr) = vcpu.get_sregs() {
            s.cr0 = sr.cr0;
            s.cr2 = sr.cr2;
            s.cr3 = sr.cr3;
            s.cr4 = sr.cr4;
            s.efer = sr.efer;
        }
        s
    }
}

impl fmt::Display for RegsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip, self.rsp, self.rflags, self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )
    }
}

/// A fatal exit with where it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    /// vCPU index.
    pub vcpu: usize,
    /// What went wrong.
    pub exit: FatalExit,
    /// Where.
    pub regs: RegsSnapshot,
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vcpu {}: {} at {}", self.vcpu, self.exit, self.regs)
    }
}

/// How a vCPU thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuOutcome {
    /// The guest wrote the exit port.
    Exited(u8),
    /// The guest parked this vCPU.
    Parked,
    /// The VMM stopped it (another vCPU ended the run, or the timeout); `rip` is where it was.
    Kicked {
        /// Where the vCPU was.
        rip: u64,
    },
    /// The guest did something fatal.
    Fatal(Diagnosis),
    /// Setting the vCPU up failed.
    SetupFailed(String),
    /// A snapshot with `--stop` ended the run.
    SnapshotStopped,
}

/// State shared by all vCPU threads of a VM.
pub struct VcpuShared {
    /// The devices.
    pub devices: Devices,
    /// Guest memory.
    pub space: Arc<AddressSpace>,
    /// Set (before kicking) when every vCPU must stop.
    pub stop: AtomicBool,
    /// Exits by reason, across vCPUs.
    pub exits: ExitCounters,
    /// Pausing every vCPU for a snapshot.
    pub pause: PauseCtl,
    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs a snapshot saves.
    pub msr_indices: Vec<u32>,
    /// The size of the XSAVE image KVM reads and writes for these vCPUs (see
    /// [`crate::kvm::state::xsave_image_bytes`]).
    pub xsave_image_bytes: usize,
    /// The VM's shape, as a snapshot records it.
    pub shape: crate::snapshot::Shape,
    /// When the first vCPU, its state set up, went to enter the guest for the first time.
    pub first_entry: std::sync::OnceLock<std::time::Instant>,
    /// The companion threads' scheduling policy (`--control-sched`).
    pub control_sched: crate::sched::ControlSched,
    /// The vCPU threads' time on a CPU and waiting for one, summed as each thread ends
    /// (`None` until one has, or where the kernel does not report it).
    pub thread_times: std::sync::Mutex<Option<crate::sched::ThreadTimes>>,
}

impl VcpuShared {
    /// Adds an ended vCPU thread's times to [`thread_times`](Self::thread_times).
    pub fn add_thread_times(&self, t: crate::sched::ThreadTimes) {
        let mut sum = self
            .thread_times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *sum.get_or_insert_with(Default::default) += t;
    }

    /// A companion thread's check-in before a burst of work (see [`crate::sched::tick`]).
    pub fn companion_tick(&self) {
        crate::sched::tick(
            self.control_sched,
            self.exits.snapshot().total(),
            self.shape.vcpus,
        );
    }
}

/// The vCPUs paused for a snapshot: each one's state (in vCPU order) and the MSRs KVM refused
/// to read.
#[derive(Debug)]
pub struct Paused {
    /// Every vCPU's state.
    pub states: Vec<crate::kvm::state::VcpuState>,
    /// MSR indices some vCPU could not read.
    pub refused_msrs: Vec<u32>,
}

/// Pauses every vCPU between two `KVM_RUN`s and holds it there (for a snapshot).
///
/// The controller sets `requested` (under the lock) and kicks each live vCPU thread out of
/// `KVM_RUN`; each vCPU, at the top of its loop, completes a pending port or MMIO access
/// (`KVM_RUN` with `immediate_exit`), saves its state, hands it over and waits for the next
/// epoch, which [`PauseGuard::resume`] starts, saying whether to go on or stop.
#[derive(Default)]
pub struct PauseCtl {
    requested: AtomicBool,
    inner: Mutex<PauseInner>,
    cv: Condvar,
    /// One pause at a time.
    one: Mutex<()>,
}

/// What a paused vCPU hands over: its state and the MSRs KVM refused to read, or why it
/// could not.
type Saved = Result<(crate::kvm::state::VcpuState, Vec<u32>), String>;

/// Where a vCPU thread is.
#[derive(Clone, Copy, Default)]
enum ThreadState {
    /// Not started yet.
    #[default]
    NotStarted,
    /// Running (it can be kicked).
    Live(libc::pthread_t),
    /// Ended.
    Ended,
}

#[derive(Default)]
struct PauseInner {
    /// Each vCPU's thread.
    threads: Vec<ThreadState>,
    /// What each paused vCPU handed over.
    saved: Vec<Option<Saved>>,
    epoch: u64,
    stop: bool,
}

/// How long a pause waits for every vCPU to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often stragglers are kicked again while pausing.
const PAUSE_KICK: Duration = Duration::from_millis(5);

/// While held, the vCPUs stay paused; [`PauseGuard::resume`] releases them.
pub struct PauseGuard<'a> {
    ctl: &'a PauseCtl,
    _one: MutexGuard<'a, ()>,
    released: bool,
}

impl PauseGuard<'_> {
    /// Lets the vCPUs go on (`stop` false) or makes every one end its run (`stop` true).
    pub fn resume(mut self, stop: bool) {
        self.ctl.release(stop);
        self.released = true;
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.ctl.release(false);
        }
    }
}

impl PauseCtl {
    fn lock(&self) -> MutexGuard<'_, PauseInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPU `index` runs on the calling thread from now on.
    fn register(&self, index: usize) {
        let mut g = self.lock();
        if g.threads.len() <= index {
            g.threads.resize(index + 1, ThreadState::NotStarted);
            g.saved.resize_with(index + 1, || None);
        }
        g.threads[index] = ThreadState::Live(crate::kvm::current_thread());
        drop(g);
        self.cv.notify_all();
    }

    /// vCPU `index`'s thread is about to end.
    fn unregister(&self, index: usize) {
        let mut g = self.lock();
        if let Some(t) = g.threads.get_mut(index) {
            *t = ThreadState::Ended;
        }
        drop(g);
        self.cv.notify_all();
    }

    /// Pauses every vCPU of `nr_vcpus` and collects its state. Fails (with every vCPU going on)
    /// if a vCPU has ended, or does not stop in time, or cannot be read.
    pub fn pause_all(&self, nr_vcpus: usize) -> Result<(PauseGuard<'_>, Paused), String> {
        let one = self.one.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = self.lock();
        g.saved.iter_mut().for_each(|s| *s = None);
        self.requested.store(true, Ordering::Release);
        let guard = PauseGuard {
            ctl: self,
            _one: one,
            released: false,
        };
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let mut missing = Vec::new();
            for i in 0..nr_vcpus {
                let state = g.threads.get(i).copied().unwrap_or_default();
                match (state, g.saved.get(i)) {
                    (_, Some(Some(_))) => {}
                    (ThreadState::Live(t), _) => {
                        missing.push(i);
                        crate::kvm::kick_thread(t);
                    }
                    // It will see the request when it starts.
                    (ThreadState::NotStarted, _) => missing.push(i),
                    (ThreadState::Ended, _) => {
                        drop(g);
                        return Err(format!(
                            "vcpu {i} has stopped (it parked or exited): a snapshot needs every vCPU"
                        ));
                    }
                }
            }
            if missing.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                drop(g);
                return Err(format!(
                    "vcpus {missing:?} did not stop within {} s",
                    PAUSE_TIMEOUT.as_secs()
                ));
            }
            g = self
                .cv
                .wait_timeout(g, PAUSE_KICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut states = Vec::with_capacity(nr_vcpus);
        let mut refused_msrs: Vec<u32> = Vec::new();
        for i in 0..nr_vcpus {
            match g.saved[i].take() {
                Some(Ok((st, refused))) => {
                    states.push(st);
                    for m in refused {
                        if !refused_msrs.contains(&m) {
                            refused_msrs.push(m);
                        }
                    }
                }
                Some(Err(e)) => {
                    drop(g);
                    return Err(format!("vcpu {i}: cannot read its state: {e}"));
                }
                None => {
                    drop(g);
                    return Err(format!("vcpu {i}: no state"));
                }
            }
        }
        drop(g);
        Ok((
            guard,
            Paused {
                states,
                refused_msrs,
            },
        ))
    }

    fn release(&self, stop: bool) {
        let mut g = self.lock();
        self.requested.store(false, Ordering::Release);
        g.stop = stop;
        g.epoch += 1;
        g.saved.iter_mut().for_each(|s| *s = None);
        drop(g);
        self.cv.notify_all();
    }

    /// Called by vCPU `index` at the top of its loop when a pause is requested: completes a
    /// pending access, hands over its state and waits until resumed. Returns true if the run
    /// must end.
    fn hold(&self, index: usize, fd: &mut VcpuFd, shared: &VcpuShared) -> bool {
        let saved = crate::kvm::complete_pending_io(fd)
            .map_err(|e| format!("completing the pending access failed: {e}"))
            .and_then(|()| {
                crate::kvm::state::VcpuState::save(
                    fd,
                    &shared.msr_indices,
                    shared.xsave_image_bytes,
                )
                .map_err(|e| e.to_string())
            });
        let mut g = self.lock();
        if !self.requested.load(Ordering::Acquire) {
            return false;
        }
        let epoch = g.epoch;
        if let Some(s) = g.saved.get_mut(index) {
            *s = Some(saved);
        }
        self.cv.notify_all();
        while g.epoch == epoch {
            if shared.stop.load(Ordering::Acquire) {
                return true;
            }
            g = self
                .cv
                .wait_timeout(g, PAUSE_KICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.stop
    }
}

/// Unregisters a vCPU thread from [`PauseCtl`] when it ends, however it ends.
struct Registered<'a>(&'a PauseCtl, usize);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.unregister(self.1);
    }
}

/// VM exits handled, by reason (relaxed counters).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port I/O (serial, exit port).
    pub io: AtomicU64,
    /// `KVM_EXIT_MMIO` (first touches on hosts that emulate them, accesses without a
    /// memslot, open bus).
    pub mmio: AtomicU64,
    /// `KVM_EXIT_MEMORY_FAULT`.
    pub memory_fault: AtomicU64,
    /// Bare `-EFAULT` from `KVM_RUN` resolved by decoding the instruction.
    pub efault: AtomicU64,
    /// Signals (kicks).
    pub interrupted: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
}

/// A copy of [`ExitCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// See [`ExitCounters::io`].
    pub io: u64,
    /// See [`ExitCounters::mmio`].
    pub mmio: u64,
    /// See [`ExitCounters::memory_fault`].
    pub memory_fault: u64,
    /// See [`ExitCounters::efault`].
    pub efault: u64,
    /// See [`ExitCounters::interrupted`].
    pub interrupted: u64,
    /// See [`ExitCounters::other`].
    pub other: u64,
}

impl ExitCounts {
    /// All exits.
    pub fn total(&self) -> u64 {
        self.io + self.mmio + self.memory_fault + self.efault + self.interrupted + self.other
    }
}

impl ExitCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> ExitCounts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExitCounts {
            io: r(&self.io),
            mmio: r(&self.mmio),
            memory_fault: r(&self.memory_fault),
            efault: r(&self.efault),
            interrupted: r(&self.interrupted),
            other: r(&self.other),
        }
    }

    fn count(&self, exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        let c = match exit {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => &self.io,
            Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => &self.mmio,
            Ok(VcpuExit::MemoryFault { .. }) => &self.memory_fault,
            Err(e) if e.errno() == libc::EFAULT => &self.efault,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => &self.interrupted,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything one vCPU thread needs.
pub struct Vcpu {
    /// Index (= APIC id).
    pub index: usize,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Entry point.
    pub entry: u64,
    /// How bare `-EFAULT`s are resolved (registers synced through `kvm_run`, identity map).
    pub resolver: crate::efault::Resolver,
    /// The state to resume from (a restored snapshot) instead of the entry point.
    pub restore: Option<Arc<crate::kvm::state::VcpuState>>,
    /// `vmm stress --floor`: the pages this vCPU's guest first-touches, in order.
    pub floor: Option<FloorSlice>,
}

/// The floor of a first touch on this host (`vmm stress --floor`): the `touch` workload's
/// sequential slice of one vCPU, `[next, end)` (guest-physical, in one RAM region), which it
/// writes page by page. Each bare `EFAULT` then populates page `next` and re-enters at once:
/// no decode, no lookup, no fault-around. That is the least any VMM serving first touches on
/// the vCPU thread must do here, so `vcpu` mode's rate over this one says what the VMM's own
/// fault path costs. It is only meant for that workload, whose other memory is populated before
/// it starts: a bare `EFAULT` on another page would populate the next page of the slice instead
/// and retry, and go the usual way only once the slice is all present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloorSlice {
    /// The page the guest touches next.
    pub next: u64,
    /// The end of the slice.
    pub end: u64,
}

/// Consecutive unresolved faults without progress before the vCPU gives up ...
const MAX_STALLED_FAULTS: u32 = 16;
/// ... once they have gone on for this long (a change of the address space in progress
/// resolves itself well within it).
const MIN_STALL: std::time::Duration = std::time::Duration::from_millis(200);
const CAUSE_EFAULT: &str = "KVM_RUN failed with EFAULT (no address reported)";
const CAUSE_EMULATION: &str = "KVM's instruction emulator failed (KVM_EXIT_INTERNAL_ERROR)";
const CAUSE_MEMORY_FAULT: &str =
    "KVM_EXIT_MEMORY_FAULT on a page that is present, or that no region covers";

/// Faults without progress in a row, and since when.
type Stall = Option<(u32, std::time::Instant)>;

/// Resolves a fault KVM did not locate (a bare `EFAULT`, or an emulation failure) by decoding
/// the instruction at `rip` (see `efault`). Progress means pages were really populated; a fault
/// that repeats without progress (another vCPU may have populated the page first) is retried a
/// few times, then ends the vCPU with a diagnosis that names the instruction and the address.
/// `Err` carries the fatal outcome when the instruction could not even be examined.
fn resolve_fault(
    resolver: &crate::efault::Resolver,
    fd: &VcpuFd,
    mem: &GuardedSpace<'_>,
    stalled: &mut Stall,
    cause: &'static str,
) -> Result<VcpuEmulation, VcpuEmulation> {
    let fatal = |message: String| VcpuEmulation::Fatal(FatalExit::Unresolved { cause, message });
    match resolver.resolve(fd, mem) {
        Ok(r) if r.populated > 0 || r.emulated => {
            *stalled = None;
            mem.space()
                .counters
                .unannotated_faults
                .fetch_add(1, Ordering::Relaxed);
            Ok(VcpuEmulation::Handled)
        }
        Ok(r) => {
            let (count, since) = stalled.get_or_insert_with(|| (0, std::time::Instant::now()));
            *count += 1;
            if *count < MAX_STALLED_FAULTS || since.elapsed() < MIN_STALL {
                // Another vCPU may have populated the page first: retry.
                Ok(VcpuEmulation::Handled)
            } else {
                // A `kernel`-mode restore whose data file was cut short: the pages look
                // present (mapped), but the page cache has nothing past the file's end.
                let why = match mem.space().mapped_file_cut_short() {
                    Some(cut) => format!("cannot complete {}: {cut}", r.instruction),
                    None => r.stuck_reason(),
                };
                Err(fatal(why))
            }
        }
        Err(e) => Err(fatal(e.to_string())),
    }
}

/// One `KVM_RUN`: the only place the thread is inside the guest.
fn run_once(fd: &mut VcpuFd) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
    fd.run()
}

/// The run-state machine of one vCPU thread.
pub fn run_vcpu(mut vcpu: Vcpu, cpuid: &CpuId, shared: &Arc<VcpuShared>) -> VcpuOutcome {
    let set_up = match &vcpu.restore {
        None => crate::boot::regs::configure(&vcpu.fd, vcpu.index as u32, vcpu.entry, cpuid),
        Some(state) => crate::boot::regs::restore(
            &vcpu.fd,
            vcpu.index as u32,
            cpuid,
            state,
            shared.xsave_image_bytes,
        ),
    };
    if let Err(e) = set_up {
        return VcpuOutcome::SetupFailed(e.to_string());
    }
    shared.pause.register(vcpu.index);
    let _registered = Registered(&shared.pause, vcpu.index);
    // From here on the vCPU is reached through its kick registration, which borrows it: the
    // registration cannot outlive the vCPU's `kvm_run` mapping (it would not compile).
    let mut fd = KickGuard::register(&mut vcpu.fd);
    if vcpu.resolver.sync_regs {
        // Every exit then brings the registers along (read by `efault` without an ioctl).
        fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        fd.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
    }
    let index = vcpu.index;
    // This thread is an RCU reader of the address space: offline while inside the guest, online
    // while it handles an exit; each handled exit is one read-side critical section, and going
    // offline again for the next KVM_RUN is its quiescent state.
    let mut reader = shared.space.domain().register();
    // Fault-around windows are filled a chunk per read-side critical section (the rest after
    // the exit's guard is gone, below), so that an unmap waits for one chunk, not a window.
    // `VMM_FILL_WHOLE_WINDOWS=1` keeps a window in one section: the baseline.
    if std::env::var_os("VMM_FILL_WHOLE_WINDOWS").is_none_or(|v| v != "1") {
        shared.space.fill_windows_in_chunks();
    }
    let mut stalled: Stall = None;
    // Set up, about to run the guest: the first vCPU here marks the guest's first instruction.
    shared.first_entry.get_or_init(std::time::Instant::now);
    loop {
        // Pairs with the Release store in `Vm::stop_all`, made before the kick signal: either
        // we see `stop` here, or the signal's `immediate_exit` makes the next KVM_RUN return.
        if shared.stop.load(Ordering::Acquire) {
            let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
            return VcpuOutcome::Kicked { rip };
        }
        if shared.pause.requested.load(Ordering::Acquire) {
            let pause = &shared.pause;
            if reader.offline_while(|| pause.hold(index, &mut fd, shared))
                && !shared.stop.load(Ordering::Acquire)
            {
                return VcpuOutcome::SnapshotStopped;
            }
            continue;
        }
        let exit = reader.offline_while(|| run_once(&mut fd));
        shared.exits.count(&exit);
        if let (Some(floor), Err(e)) = (vcpu.floor.as_mut(), &exit) {
            if e.errno() == libc::EFAULT && floor.next < floor.end {
                let guard = reader.read();
                if let Ok(true) = shared.space.populate_floor_page(&guard, floor.next) {
                    floor.next += abi::layout::PAGE_SIZE;
                    continue;
                }
            }
        }
        let guard = reader.read();
        let mem = GuardedSpace::new(&shared.space, &guard);
        let event = match exit {
            Ok(VcpuExit::InternalError) => {
                let (suberror, data) = kvm::internal_error_info(&mut fd);
                if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    // KVM's emulator (which runs CPL-0 code on some hosts) could not fetch or
                    // access a page that is not populated yet: like a bare EFAULT.
                    ExitEvent::Unlocated {
                        cause: CAUSE_EMULATION,
                        data,
                    }
                } else {
                    ExitEvent::InternalError { suberror, data }
                }
            }
            Ok(exit) => ExitEvent::from(exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ExitEvent::Interrupted
            }
            // A first touch on a host that does not report the address (see `efault`).
            Err(e) if e.errno() == libc::EFAULT => ExitEvent::Unlocated {
                cause: CAUSE_EFAULT,
                data: Vec::new(),
            },
            Err(e) => ExitEvent::RunFailed { errno: e.errno() },
        };
        let emulation = match handle_exit(event, index, &shared.devices, &mem) {
            VcpuEmulation::Resolve(cause, data) => {
                match resolve_fault(&vcpu.resolver, &fd, &mem, &mut stalled, cause) {
                    Ok(e) => e,
                    Err(VcpuEmulation::Fatal(FatalExit::Unresolved { cause, message }))
                        if !data.is_empty() =>
                    {
                        VcpuEmulation::Fatal(FatalExit::Unresolved {
                            cause,
                            message: format!("{message}; KVM's data words {data:x?}"),
                        })
                    }
                    Err(e) => e,
                }
            }
            other => other,
        };
        drop(guard);
        shared.space.finish_deferred_fills(&mut reader);
        match emulation {
            VcpuEmulation::Handled => {}
            VcpuEmulation::Interrupted => fd.set_kvm_immediate_exit(0),
            VcpuEmulation::Parked => return VcpuOutcome::Parked,
            VcpuEmulation::Stopped(status) => return VcpuOutcome::Exited(status),
            VcpuEmulation::Fatal(exit) => {
                return VcpuOutcome::Fatal(Diagnosis {
                    vcpu: index,
                    exit,
                    regs: RegsSnapshot::read(&fd),
                })
            }
            // `resolve_fault` never asks to resolve again; were it to, stop with what is known.
            VcpuEmulation::Resolve(cause, _) => {
                return VcpuOutcome::Fatal(Diagnosis {
                    vcpu: index,
                    exit: FatalExit::Unresolved {
                        cause,
                        message: "the fault could not be resolved".into(),
                    },
                    regs: RegsSnapshot::read(&fd),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::tests::Recorder;
    use abi::ports;

    fn devices() -> (Devices, Recorder) {
        let rec = Recorder::default();
        (Devices::new(2, Box::new(rec.clone())), rec)
    }

    /// Guest memory with nothing mapped: every access is open bus, or fails on the host.
    struct FakeMem {
        fail: bool,
    }

    impl GuestMemoryExits for FakeMem {
        fn mmio(&self, gpa: u64, access: Access<'_>) -> Result<Serviced, FaultError> {
            if self.fail {
                return Err(FaultError {
                    gpa,
                    source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                });
            }
            if let Access::Read(d) = access {
                d.fill(0xff);
            }
            Ok(Serviced::OpenBus)
        }
        fn memory_fault(&self, _gpa: u64, _size: u64) -> Result<bool, FaultError> {
            Ok(!self.fail)
        }
    }

    fn ram() -> FakeMem {
        FakeMem { fail: false }
    }

    #[test]
    fn serial_and_exit_ports() {
        let (d, rec) = devices();
        for &b in b"hi\n" {
            let e = ExitEvent::IoOut {
                port: ports::SERIAL,
                data: &[b],
            };
            assert_eq!(handle_exit(e, 1, &d, &ram()), VcpuEmulation::Handled);
        }
        let e = ExitEvent::IoOut {
            port: ports::SERIAL,
            data: b"string I/O\n",
        };
        assert_eq!(handle_exit(e, 0, &d, &ram()), VcpuEmulation::Handled);
        assert_eq!(
            rec.0.lock().unwrap().clone(),
            vec![b"hi\n".to_vec(), b"string I/O\n".to_vec()]
        );
        let e = ExitEvent::IoOut {
            port: ports::EXIT,
            data: &[5, 0, 0, 0],
        };
        assert_eq!(handle_exit(e, 0, &d, &ram()), VcpuEmulation::Stopped(5));
        let e = ExitEvent::IoOut {
            port: ports::PARK,
            data: &[0],
        };
        assert_eq!(handle_exit(e, 0, &d, &ram()), VcpuEmulation::Parked);
        let mut lsr = [0u8];
        let e = ExitEvent::IoIn {
            port: ports::SERIAL + 5,
            data: &mut lsr,
        };
        assert_eq!(handle_exit(e, 0, &d, &ram()), VcpuEmulation::Handled);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn fatal_exits() {
        let (d, _) = devices();
        let r = ram();
        let e = ExitEvent::IoOut {
            port: 0x1234,
            data: &[0x42],
        };
        assert_eq!(
            handle_exit(e, 0, &d, &r),
            VcpuEmulation::Fatal(FatalExit::UnknownPortWrite {
                port: 0x1234,
                size: 1,
                value: 0x42
            })
        );
        let mut buf = [0u8; 2];
        let e = ExitEvent::IoIn {
            port: 0x60,
            data: &mut buf,
        };
        assert!(matches!(
            handle_exit(e, 0, &d, &r),
            VcpuEmulation::Fatal(FatalExit::UnknownPortRead {
                port: 0x60,
                size: 2
            })
        ));
        let e = ExitEvent::MmioWrite {
            gpa: 0xd000_0000,
            data: &[0xef, 0xbe, 0xad, 0xde],
        };
        assert_eq!(
            handle_exit(e, 0, &d, &r),
            VcpuEmulation::Handled,
            "open bus goes on"
        );
        let mut buf = [0u8; 4];
        let e = ExitEvent::MmioRead {
            gpa: 0xd000_0000,
            data: &mut buf,
        };
        assert_eq!(handle_exit(e, 0, &d, &r), VcpuEmulation::Handled);
        assert_eq!(buf, [0xff; 4], "open-bus reads are all-ones");
        let failing = FakeMem { fail: true };
        let e = ExitEvent::MmioWrite {
            gpa: 0x100_0000,
            data: &[1],
        };
        let VcpuEmulation::Fatal(f) = handle_exit(e, 0, &d, &failing) else {
            panic!("a host failure servicing an access must be fatal")
        };
        assert!(f.to_string().contains("gpa 0x1000000"), "{f}");
        let e = ExitEvent::MemoryFault {
            gpa: 0x100_0000,
            size: 4096,
        };
        assert_eq!(handle_exit(e, 0, &d, &r), VcpuEmulation::Handled);
        assert_eq!(
            handle_exit(ExitEvent::Shutdown, 0, &d, &r),
            VcpuEmulation::Fatal(FatalExit::TripleFault)
        );
        assert_eq!(
            handle_exit(ExitEvent::Hlt, 0, &d, &r),
            VcpuEmulation::Fatal(FatalExit::Halted)
        );
        assert_eq!(
            handle_exit(ExitEvent::Interrupted, 0, &d, &r),
            VcpuEmulation::Interrupted
        );
    }

    /// Faults KVM did not locate, and memory faults that populated nothing (a hole, or a
    /// write to read-only memory), go to the instruction resolver.
    #[test]
    fn unlocated_faults_are_resolved() {
        let (d, _) = devices();
        let e = ExitEvent::Unlocated {
            cause: CAUSE_EFAULT,
            data: vec![],
        };
        assert_eq!(
            handle_exit(e, 0, &d, &ram()),
            VcpuEmulation::Resolve(CAUSE_EFAULT, vec![])
        );
        // FakeMem with `fail` populates nothing: as for a hole.
        let hole = FakeMem { fail: true };
        let e = ExitEvent::MemoryFault {
            gpa: 0x1000,
            size: 8,
        };
        assert_eq!(
            handle_exit(e, 0, &d, &hole),
            VcpuEmulation::Resolve(CAUSE_MEMORY_FAULT, vec![])
        );
        let e = ExitEvent::RunFailed { errno: libc::EBADF };
        assert_eq!(
            handle_exit(e, 0, &d, &ram()),
            VcpuEmulation::Fatal(FatalExit::RunFailed { errno: libc::EBADF })
        );
    }

    #[test]
    fn diagnosis_line() {
        let d = Diagnosis {
            vcpu: 1,
            exit: FatalExit::TripleFault,
            regs: RegsSnapshot {
                rip: 0x100010,
                cr3: 0x4000,
                ..Default::default()
            },
        };
        let s = d.to_string();
        assert!(s.starts_with("vcpu 1: guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip=0x100010"));
        assert!(s.contains("cr3=0x4000"));
        assert!(!s.contains('\n'));
    }
}
