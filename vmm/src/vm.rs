//! Building and running one VM: KVM, guest RAM and memslots, boot data, one thread per vCPU,
//! and the main thread that waits for the run to end and collects every vCPU.
#![deny(unsafe_code)]

use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::signal::Killable;

use crate::boot::{self, elf, BootError};
use crate::devices::Devices;
use crate::kvm::{self, KvmError};
use crate::memory::{
    self, AddressSpace, AddressSpaceKind, AsConfig, Backing, FaultMode, Limits, MemoryError,
    MemslotMode, RegionKind,
};
use crate::vcpu::{self, Diagnosis, Vcpu, VcpuOutcome, VcpuShared};

/// Where KVM may put the real-mode TSS (Intel without unrestricted guest); in the 32-bit hole.
const TSS_ADDR: usize = 0xfffb_d000;
/// How often stopping vCPUs are kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(5);
/// How long stopping vCPUs get before the VMM gives up on them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Debug)]
pub struct RunConfig {
    /// The KVM device.
    pub kvm_dev: PathBuf,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// A user's image instead of the built-in guest.
    pub kernel: Option<PathBuf>,
    /// `abi::workload` id.
    pub workload: u32,
    /// Workload parameters for the boot info.
    pub params: Vec<u64>,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// When the process started (for boot-time figures).
    pub process_start: Instant,
    /// How first touches are serviced.
    pub fault_mode: FaultMode,
    /// Pages populated per fault.
    pub fault_around: memory::FaultAround,
    /// `madvise(MADV_HUGEPAGE)` on guest RAM (`--thp`).
    pub thp: bool,
    /// The range map that holds the regions.
    pub address_space: AddressSpaceKind,
    /// What backs guest RAM (the boot area is always anonymous).
    pub ram_backing: Backing,
    /// How regions are laid onto KVM memslots.
    pub memslots: MemslotMode,
    /// Size of the hot-plug window (window mode), placed by [`hotplug_window_base`].
    pub hotplug_window: u64,
    /// Set-up steps, taken by [`Vm::build`], and threads to run beside the vCPUs, taken by
    /// [`Vm::start`].
    pub sidecars: Sidecars,
    /// Resume a snapshot instead of booting (`vmm run --restore`).
    pub restore: Option<Restore>,
    /// `vmm stress --floor`: serve the `touch` workload's sequential first touches at the floor
    /// (see [`vcpu::FloorSlice`]); `params[1]` is the pages each vCPU touches.
    pub floor: bool,
    /// The scheduling policy of the companion threads (`--control-sched`).
    pub control_sched: crate::sched::ControlSched,
}

impl RunConfig {
    /// A VM of `vcpus` vCPUs and `mem_bytes` of RAM running the built-in guest's `workload`
    /// with `params`, and everything else as `vmm run` has it by default: `/dev/kvm`, no
    /// timeout, `vcpu` mode with adaptive fault-around, Bonsai, anonymous RAM, memslot windows
    /// without a hot-plug window, no companion thread, no snapshot.
    pub fn new(workload: u32, params: Vec<u64>, vcpus: u32, mem_bytes: u64) -> Self {
        RunConfig {
            kvm_dev: PathBuf::from("/dev/kvm"),
            vcpus,
            mem_bytes,
            kernel: None,
            workload,
            params,
            timeout: None,
            process_start: Instant::now(),
            fault_mode: FaultMode::Vcpu,
            fault_around: memory::FaultAround::Adaptive,
            thp: false,
            address_space: AddressSpaceKind::Bonsai,
            ram_backing: Backing::Anon,
            memslots: MemslotMode::Window,
            hotplug_window: 0,
            sidecars: Sidecars::default(),
            restore: None,
            floor: false,
            control_sched: crate::sched::ControlSched::Auto,
        }
    }
}

/// How guest memory is brought back from a snapshot (`--restore-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    /// First touches served on the vCPU thread (userfaultfd SIGBUS mode, `UFFDIO_COPY` from a
    /// read-only mapping of the data file).
    Vcpu,
    /// First touches served by a userfaultfd handler thread.
    Handler,
    /// The data file mapped `MAP_PRIVATE` over guest memory: the host kernel's page cache
    /// takes the faults.
    Kernel,
    /// Every page copied in before the guest resumes.
    Eager,
}

impl RestoreMode {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            RestoreMode::Vcpu => "vcpu",
            RestoreMode::Handler => "handler",
            RestoreMode::Kernel => "kernel",
            RestoreMode::Eager => "eager",
        }
    }

    /// The fault mode the VM runs with.
    pub fn fault_mode(self) -> FaultMode {
        match self {
            RestoreMode::Vcpu | RestoreMode::Eager => FaultMode::Vcpu,
            RestoreMode::Handler => FaultMode::Handler,
            RestoreMode::Kernel => FaultMode::Kernel,
        }
    }
}

/// A snapshot to resume.
pub struct Restore {
    /// The snapshot, loaded and checked.
    pub snapshot: crate::snapshot::Loaded,
    /// How guest memory comes back.
    pub mode: RestoreMode,
    /// Verify passes the `pattern` guest runs after resuming (0: until stopped).
    pub passes: u64,
    /// Pages of its slice each `pattern` vCPU verifies after resuming (0: all it wrote).
    pub pages: u64,
    /// `--prefetch ws`: the recorded working set, replayed ahead of the guest. `None`: record
    /// the order of first touches instead (lazy modes), into the snapshot's `ws.bin`.
    pub prefetch: Option<Vec<(u64, u64)>>,
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore")
            .field("dir", &self.snapshot.dir)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The `touch` workload's slice of vCPU `index` (`pages` each, 0: an equal share of RAM) as
/// the guest computes it: RAM regions in address order, page `index * per` onwards. `None` if
/// it does not lie in one region.
fn floor_slice(
    space: &AddressSpace,
    vcpus: u32,
    pages: u64,
    index: usize,
) -> Option<vcpu::FloorSlice> {
    let mut ram: Vec<_> = space
        .list()
        .into_iter()
        .filter(|r| r.kind == memory::RegionKind::Ram)
        .map(|r| (r.gpa, r.size_bytes / abi::layout::PAGE_SIZE))
        .collect();
    ram.sort_unstable();
    let share = ram.iter().map(|r| r.1).sum::<u64>() / u64::from(vcpus.max(1));
    let per = if pages == 0 { share } else { pages.min(share) };
    let mut first = index as u64 * per;
    for (gpa, n) in ram {
        if first < n {
            return (first + per <= n).then_some(vcpu::FloorSlice {
                next: gpa + first * abi::layout::PAGE_SIZE,
                end: gpa + (first + per) * abi::layout::PAGE_SIZE,
            });
        }
        first -= n;
    }
    None
}

/// Companion threads to start with the VM (see [`VmHandle`]), and set-up steps to run on the
/// address space after RAM is mapped and before any vCPU starts (`.1`, see [`Setup`]).
#[derive(Default)]
pub struct Sidecars(
    pub std::sync::Mutex<Vec<Sidecar>>,
    pub std::sync::Mutex<Vec<Setup>>,
);

impl Sidecars {
    /// Adds one.
    pub fn push(&self, s: Sidecar) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    /// Adds a set-up step (run in order, on the thread that builds the VM).
    pub fn push_setup(&self, s: Setup) {
        self.1.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    fn take(&self) -> Vec<Sidecar> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn take_setups(&self) -> Vec<Setup> {
        std::mem::take(&mut *self.1.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A set-up step: runs once guest RAM and boot data are in place and before the companion
/// threads and vCPUs start (e.g. `vmm stress` maps its `--regions` here, so that the guest's
/// first access already walks the full tree). An error stops the run.
pub type Setup = Box<dyn FnOnce(&Arc<AddressSpace>) -> Result<(), String> + Send>;

impl std::fmt::Debug for Sidecars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sidecars")
    }
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote its exit status.
    Exited(u8),
    /// Every vCPU parked without an exit status.
    AllParked,
    /// A vCPU hit something fatal.
    Fatal(Diagnosis),
    /// The timeout expired; where each vCPU was.
    TimedOut {
        /// The timeout.
        after: Duration,
        /// (vCPU, rip) of each vCPU that was still running.
        rips: Vec<(usize, u64)>,
    },
    /// A snapshot with `--stop` ended the run.
    SnapshotStopped,
    /// A vCPU could not be set up.
    SetupFailed {
        /// Which.
        vcpu: usize,
        /// Why.
        message: String,
    },
    /// The userfaultfd handler thread (`handler` mode) could not populate a page a vCPU
    /// waits for: the vCPU cannot make progress, so the run ends.
    HandlerFailed {
        /// What failed, with the guest-physical address.
        message: String,
    },
}

/// What the threads of a running VM tell the thread waiting for it.
enum ThreadEnd {
    /// A vCPU thread ended (its index, and how).
    Vcpu(usize, VcpuOutcome),
    /// The userfaultfd handler thread failed to serve a fault (it keeps running).
    HandlerFailed(String),
}

/// The result of a run with its timings.
#[derive(Debug)]
pub struct RunReport {
    /// How it ended.
    pub outcome: RunOutcome,
    /// Process start to the first complete serial line.
    pub first_line: Option<Duration>,
    /// Process start to the end of the run.
    pub total: Duration,
    /// vCPUs that did not stop within the grace period after being kicked.
    pub stuck: Vec<usize>,
    /// The fault mode in effect (after any fallback).
    pub fault_mode: FaultMode,
    /// What each vCPU's workload reported in its results slot.
    pub results: Vec<abi::VcpuResult>,
    /// Touch latencies of all vCPUs, in TSC cycles (`abi::hist_bucket` buckets).
    pub touch_histogram: Vec<u64>,
    /// The guest's TSC frequency (0 if unknown).
    pub tsc_khz: u32,
    /// The address space's counters at the end.
    pub counters: memory::address_space::CountersSnapshot,
    /// VM exits by reason.
    pub exits: vcpu::ExitCounts,
    /// The address space's RCU domain: grace periods and their latency, reclamation.
    pub rcu: rcu::Stats,
    /// Memslot ioctls the address space had made when set-up was over (before any vCPU ran):
    /// `counters.memslot_changes` minus this is what the run changed.
    pub memslot_changes_after_setup: u64,
    /// After a restore: process start to the vCPUs' start (the first guest instruction).
    pub resumed_at: Option<Duration>,
    /// After a restore: pages served from the snapshot, and pages it still held at the end.
    pub restore_pages: Option<(u64, u64)>,
    /// Per vCPU, process start to its first write to the mark port (the `pattern` guest's
    /// first pass after a restore done: its working set resident).
    pub marks: Vec<Option<Duration>>,
    /// `--prefetch ws`: pages the prefetcher populated, and process start to its end.
    pub prefetched: Option<(u64, Duration)>,
    /// After a lazy restore without prefetch: the working set recorded (runs, pages), or why
    /// it could not be written.
    pub ws_recorded: Option<Result<(u64, u64), String>>,
    /// The process's resident memory at the end of the run, before teardown.
    pub rss_bytes: u64,
    /// The process's resident memory when the vCPUs were started (after a restore: before the
    /// guest touched anything).
    pub rss_at_start_bytes: u64,
    /// The vCPU threads' time on a CPU and waiting for one, summed over the threads that
    /// ended (`None` where the kernel does not report it).
    pub vcpu_thread_times: Option<crate::sched::ThreadTimes>,
}

/// What a companion thread gets: the running VM's address space (it reads and writes guest
/// memory through it, under a read guard, with `memory::GuardedMemory`, as devices do), and a
/// flag set when the run is over (the thread must then return promptly; the run waits for it).
pub struct VmHandle {
    /// Guest memory.
    pub space: Arc<AddressSpace>,
    /// Set when the run is over.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// The vCPUs' shared state (devices, exit counters).
    pub shared: Arc<VcpuShared>,
}

/// A companion thread's body (see [`VmHandle`]).
pub type Sidecar = Box<dyn FnOnce(VmHandle) + Send>;

/// Errors before the guest runs.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot data.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// More vCPUs than allowed.
    #[error(
        "--vcpus {requested}: too many vCPUs; at most {max} here (KVM allows {kvm_max}, \
         the guest layout {layout_max})"
    )]
    TooManyVcpus {
        /// Asked for.
        requested: u32,
        /// The limit.
        max: usize,
        /// KVM's limit.
        kvm_max: usize,
        /// The layout's limit.
        layout_max: u64,
    },
    /// The kernel file cannot be read.
    #[error("--kernel {path}: cannot read it: {source}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel file is not a loadable image.
    #[error("--kernel {path}: not a loadable image: {source}")]
    BadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        source: elf::ElfError,
    },
    /// The built-in guest is broken (a build problem).
    #[error("the built-in guest image is invalid: {0}")]
    BadBuiltin(elf::ElfError),
    /// A KVM call failed while building the VM.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// What.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The hot-plug window does not fit, or would cost too much host memory.
    #[error("--hotplug-window {size}: {why}")]
    Window {
        /// The size asked for.
        size: String,
        /// Why it is refused.
        why: String,
    },
    /// Populating guest memory for the image failed.
    #[error("cannot populate guest memory for the image: {0}")]
    Populate(String),
    /// A set-up step (see [`Setup`]) failed.
    #[error("{0}")]
    Setup(String),
    /// The snapshot does not fit the VM it describes, or its memory cannot be brought back.
    #[error("--restore {dir}: {why}")]
    Restore {
        /// The snapshot.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A thread could not start.
    #[error("cannot start the userfaultfd handler thread: {0}")]
    SpawnHandler(std::io::Error),
    /// A vCPU thread could not start.
    #[error("cannot start the thread of vcpu {index}: {source}")]
    Spawn {
        /// Which vCPU.
        index: usize,
        /// Why.
        source: std::io::Error,
    },
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Ioctl { what, source })
}

/// Builds the VM, runs it to the end and reports. Serial output goes to `serial_sink`.
///
/// The three phases in one call: [`Vm::build`], [`Vm::start`] and [`RunningVm::wait`].
pub fn run(cfg: &RunConfig, serial_sink: Box<dyn Write + Send>) -> Result<RunReport, VmError> {
    Ok(Vm::build(cfg)?.start(serial_sink)?.wait())
}

/// How a VM's [`Resources`] go when they are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Teardown {
    /// Every vCPU thread has ended, or none was started: release everything, in the order of
    /// the fields of [`Resources`].
    Release,
    /// A vCPU thread did not stop within [`STOP_GRACE`] of being kicked and may still be
    /// inside `KVM_RUN`, where KVM accesses guest memory on its behalf: keep the VM and guest
    /// memory mapped until the process exits rather than unmap them under the guest. One
    /// reference to each part is leaked on purpose, so none of them is ever released.
    KeepMapped,
}

/// What the VM's threads use, and the one place where it is released (or, with
/// [`Teardown::KeepMapped`], deliberately kept). Fields drop in declaration order, once every
/// thread that uses them has been joined ([`RunningVm`] declares this field last):
///
/// 1. the vCPUs' shared state (devices, counters);
/// 2. the vm-memory view of the boot area and RAM (it owns no mapping);
/// 3. this VM fd reference;
/// 4. the address space, whose own fields drop memslots first (they hold the last reference
///    to the VM fd: KVM destroys the VM and its memslots when it closes), then the regions,
///    then host memory.
///
/// Each vCPU fd belongs to its thread and is closed when the thread ends, before any of this.
struct Resources {
    /// The vCPUs' shared state; it holds a reference to the address space. Set by
    /// [`Vm::start`].
    shared: Option<Arc<VcpuShared>>,
    /// The VM.
    vm: Arc<kvm_ioctls::VmFd>,
    /// Guest memory.
    space: Arc<AddressSpace>,
    /// Release or keep.
    teardown: Teardown,
}

impl Drop for Resources {
    fn drop(&mut self) {
        if self.teardown == Teardown::KeepMapped {
            // See `Teardown::KeepMapped`: these references are never dropped, so the VM, its
            // memslots and guest memory stay until the process exits.
            std::mem::forget((
                self.shared.clone(),
                Arc::clone(&self.vm),
                Arc::clone(&self.space),
            ));
        }
    }
}

/// A VM built and ready to run (phase 1 of 3): the KVM VM, guest memory mapped and the boot
/// data written (or a snapshot's memory restored), the set-up steps of
/// [`RunConfig::sidecars`] done. No thread of its own runs yet. [`Vm::start`] starts it;
/// dropping it releases everything.
///
/// Teardown follows from the types: the vCPU threads are joined first (each vCPU fd closes
/// with its thread), then go the devices, the VM fd, and the address space, which releases
/// the memslots (with the last reference to the VM fd: KVM destroys the VM when it closes),
/// then the regions, then host memory. If a vCPU did not stop within 2 s of being kicked, it
/// may still be inside `KVM_RUN`: the VM and guest memory are then kept mapped until the
/// process exits, never unmapped under it ([`RunReport::stuck`] names such vCPUs).
pub struct Vm<'a> {
    cfg: &'a RunConfig,
    cpuid: kvm_bindings::CpuId,
    one_gig: bool,
    xsave_bytes: u64,
    entry: u64,
    msr_indices: Vec<u32>,
    fault_mode: FaultMode,
    memslot_changes_after_setup: u64,
    res: Resources,
}

impl std::fmt::Debug for Vm<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.cfg.vcpus)
            .field("fault_mode", &self.fault_mode)
            .field("space", &self.res.space)
            .finish_non_exhaustive()
    }
}

impl<'a> Vm<'a> {
    /// Builds the VM `cfg` describes: opens KVM, creates the VM, maps guest memory, writes the
    /// boot data and the image (or brings a snapshot's memory back), and runs the set-up steps.
    pub fn build(cfg: &'a RunConfig) -> Result<Self, VmError> {
        let kvm_fd = kvm::open(&cfg.kvm_dev)?;
        let kvm_max = kvm_fd.get_max_vcpus();
        let max = kvm_max.min(abi::layout::MAX_VCPUS as usize);
        if cfg.vcpus as usize > max {
            return Err(VmError::TooManyVcpus {
                requested: cfg.vcpus,
                max,
                kvm_max,
                layout_max: abi::layout::MAX_VCPUS,
            });
        }
        let cpuid = ioctl(
            "KVM_GET_SUPPORTED_CPUID",
            kvm_fd.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        let one_gig = boot::regs::has_1g_pages(&cpuid);
        let xsave_bytes = boot::regs::xsave_max_bytes(&cpuid);
        let ranges = memory::plan(cfg.mem_bytes, boot::identity_map_bytes(one_gig))?;

        let kernel_bytes;
        let image_bytes: &[u8] = match &cfg.kernel {
            Some(path) => {
                kernel_bytes = std::fs::read(path).map_err(|source| VmError::ReadKernel {
                    path: path.clone(),
                    source,
                })?;
                &kernel_bytes
            }
            None => boot::BUILTIN_GUEST,
        };
        let ram: Vec<_> = ranges.iter().map(|r| r.start.0..r.end()).collect();
        let reserved = boot::reserved_ranges();
        let placement = elf::Placement {
            ram: &ram,
            reserved: &reserved,
        };
        let image = elf::parse(image_bytes, &placement).map_err(|source| match &cfg.kernel {
            Some(path) => VmError::BadKernel {
                path: path.clone(),
                source,
            },
            None => VmError::BadBuiltin(source),
        })?;

        let msr_indices = kvm_fd
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let vm = Arc::new(ioctl("KVM_CREATE_VM", kvm_fd.create_vm())?);
        ioctl("KVM_SET_TSS_ADDR", vm.set_tss_address(TSS_ADDR))?;
        disable_slot_zap_all(&vm);
        let fault_mode = match &cfg.restore {
            // Lazy restore needs userfaultfd as asked; falling back would lose the data.
            Some(r) => r.mode.fault_mode(),
            None => probe_fault_mode(cfg.fault_mode),
        };
        let nr_slots = u32::try_from(kvm_fd.get_nr_memslots()).unwrap_or(u32::MAX);
        let domain = rcu::Domain::new();
        let space_bytes = boot::identity_map_bytes(one_gig);
        let ram_top = ranges.iter().map(|r| r.end()).max().unwrap_or(0);
        let window = match cfg.memslots {
            MemslotMode::Window => hotplug_window(cfg.hotplug_window, ram_top, space_bytes)?,
            MemslotMode::PerRegion => 0..0,
        };
        // In window mode regions are not bounded by memslots; per region, leave some for RAM.
        let max_regions = match cfg.memslots {
            MemslotMode::Window => MAX_WINDOW_REGIONS,
            MemslotMode::PerRegion => (nr_slots as usize).saturating_sub(64).max(1),
        };
        let space = Arc::new(
            AddressSpace::new(
                &domain,
                &AsConfig {
                    implementation: cfg.address_space,
                    fault_mode,
                    fault_around: cfg.fault_around,
                    space_bytes,
                    limits: Limits {
                        max_regions,
                        max_bytes: space_bytes,
                    },
                    memslots: cfg.memslots,
                    hotplug_window: window,
                    thp: cfg.thp,
                },
                Box::new(crate::inject::RecordingMemslots(kvm::KvmMemslots::new(
                    Arc::clone(&vm),
                    nr_slots,
                ))),
            )
            .map_err(MemoryError::from)?,
        );
        for r in &ranges {
            let (kind, backing) = if r.kind == abi::mem_kind::BOOT {
                (RegionKind::Boot, Backing::Anon)
            } else {
                (RegionKind::Ram, cfg.ram_backing)
            };
            space
                .map(r.start.0, r.size_bytes, backing, false, kind)
                .map_err(MemoryError::from)?;
        }
        let phase = |what: &str| {
            tracing::debug!(
                ms = cfg.process_start.elapsed().as_secs_f64() * 1e3,
                "set-up: {what}"
            )
        };
        phase("address space and RAM mapped");
        if let Some(r) = &cfg.restore {
            restore_regions(&space, r, &ranges)?;
        }
        // A user's image may load into demand-paged RAM: populate those pages before writing.
        for seg in image.segments.iter().filter(|_| cfg.restore.is_none()) {
            let start = seg.gpa.max(abi::layout::BOOT_AREA_END);
            let end = seg.gpa + seg.memsz.max(seg.file_range.len() as u64);
            if end > start {
                space
                    .populate_range(start, end - start)
                    .map_err(|e| VmError::Populate(e.to_string()))?;
            }
        }
        {
            // Boot data, the image and a snapshot's boot area are written like any device
            // writes guest memory: through the address space, under a read guard (a page not
            // populated yet is populated, never faulted on). The reader goes when the block
            // ends, before anything on this thread waits for a grace period.
            let reader = space.domain().register();
            let guard = reader.read();
            let mem = memory::GuardedMemory::new(&space, &guard);
            match &cfg.restore {
                None => {
                    let info = boot::boot_info(cfg.vcpus, cfg.workload, &cfg.params, &ranges)?;
                    boot::write_boot_data(&mem, one_gig, &info)?;
                    boot::load_image(&mem, &image, image_bytes)?;
                }
                Some(r) => restore_memory(&space, &mem, r)?,
            }
        }
        phase("guest memory written or restored");
        tracing::debug!(
            one_gig_pages = one_gig,
            entry = format_args!("{:#x}", image.entry),
            regions = space.len(),
            fault_mode = fault_mode.name(),
            fault_around = %cfg.fault_around.name(),
            address_space = space.implementation(),
            memslots = space.memslot_mode().name(),
            hotplug_window = ?space.hotplug_window(),
            "guest memory and boot data ready"
        );
        if let Some(u) = space.uffd() {
            tracing::info!("userfaultfd created through {}", u.source());
        }
        for setup in cfg.sidecars.take_setups() {
            setup(&space).map_err(VmError::Setup)?;
        }
        let memslot_changes_after_setup = space.counters.snapshot().memslot_changes;
        Ok(Vm {
            cfg,
            cpuid,
            one_gig,
            xsave_bytes,
            entry: image.entry,
            msr_indices,
            fault_mode,
            memslot_changes_after_setup,
            res: Resources {
                shared: None,
                vm,
                space,
                teardown: Teardown::Release,
            },
        })
    }

    /// Guest memory.
    pub fn address_space(&self) -> &Arc<AddressSpace> {
        &self.res.space
    }

    /// The fault mode in effect (after any fallback the host forced).
    pub fn fault_mode(&self) -> FaultMode {
        self.fault_mode
    }

    /// Starts the VM (phase 2 of 3): the userfaultfd handler thread (`handler` mode), the
    /// companion threads of [`RunConfig::sidecars`], one thread per vCPU and, with
    /// `--prefetch ws`, the prefetcher. Serial output goes to `serial_sink`.
    ///
    /// On an error, whatever was started is stopped and joined before it returns.
    pub fn start(self, serial_sink: Box<dyn Write + Send>) -> Result<RunningVm<'a>, VmError> {
        let Vm {
            cfg,
            cpuid,
            one_gig,
            xsave_bytes,
            entry,
            msr_indices,
            fault_mode,
            memslot_changes_after_setup,
            mut res,
        } = self;
        let space = Arc::clone(&res.space);
        kvm::install_kick_handler()?;
        let shared = Arc::new(VcpuShared {
            devices: Devices::new(cfg.vcpus as usize, serial_sink),
            space: Arc::clone(&space),
            stop: AtomicBool::new(false),
            exits: vcpu::ExitCounters::default(),
            pause: vcpu::PauseCtl::default(),
            msr_indices,
            xsave_image_bytes: kvm::state::xsave_image_bytes(&res.vm),
            first_entry: std::sync::OnceLock::new(),
            control_sched: cfg.control_sched,
            thread_times: Default::default(),
            shape: crate::snapshot::Shape {
                vcpus: cfg.vcpus,
                mem_bytes: cfg.mem_bytes,
                workload: cfg.workload,
                address_space: cfg.address_space,
                ram_backing: cfg.ram_backing,
                memslots: cfg.memslots,
                hotplug_window: cfg.hotplug_window,
                fault_around: match cfg.fault_around {
                    memory::FaultAround::Fixed(n) => n,
                    memory::FaultAround::Adaptive => 0,
                },
            },
        });
        res.shared = Some(Arc::clone(&shared));
        let (tx, rx) = mpsc::channel::<ThreadEnd>();
        // From here on, dropping `running` (on an error) stops and joins what was started.
        let mut running = RunningVm {
            cfg,
            shared: Arc::clone(&shared),
            vcpus: Vec::with_capacity(cfg.vcpus as usize),
            rx,
            handler: None,
            sidecar_stop: Arc::new(AtomicBool::new(false)),
            sidecars: Vec::new(),
            prefetch_stop: Arc::new(AtomicBool::new(false)),
            prefetcher: None,
            run_start: Instant::now(),
            tsc_khz: 0,
            fault_mode,
            memslot_changes_after_setup,
            rss_at_start_bytes: 0,
            waited: false,
            res,
        };
        if fault_mode == FaultMode::Handler {
            running.handler = Some(spawn_uffd_handler(&space, tx.clone())?);
        }
        if let Some(r) = &cfg.restore {
            shared
                .devices
                .serial
                .restore(&r.snapshot.devices.serial)
                .map_err(|why| VmError::Restore {
                    dir: r.snapshot.dir.clone(),
                    why,
                })?;
        }
        // Companion threads (control socket server, stress churn) get the running VM, and the
        // scheduling policy asked for (`crate::sched`).
        let sched = cfg.control_sched;
        for (i, sidecar) in cfg.sidecars.take().into_iter().enumerate() {
            let handle = VmHandle {
                space: Arc::clone(&space),
                stop: Arc::clone(&running.sidecar_stop),
                shared: Arc::clone(&shared),
            };
            match std::thread::Builder::new()
                .name(format!("sidecar{i}"))
                .spawn(move || {
                    if let Err(e) = sched.apply_to_current_thread() {
                        tracing::warn!(error = %e, policy = sched.name(), "cannot set the scheduling policy of a companion thread");
                    }
                    sidecar(handle)
                })
            {
                Ok(h) => running.sidecars.push(h),
                Err(e) => tracing::error!(error = %e, "cannot start a companion thread"),
            }
        }
        let cpuid = Arc::new(cpuid);
        running.run_start = Instant::now();
        let vm = Arc::clone(&running.res.vm);
        for index in 0..cfg.vcpus as usize {
            let fd = vm
                .create_vcpu(index as u64)
                .map_err(|source| VmError::Ioctl {
                    what: "KVM_CREATE_VCPU",
                    source,
                })?;
            if index == 0 {
                running.tsc_khz = fd.get_tsc_khz().unwrap_or(0);
            }
            let vcpu = Vcpu {
                index,
                fd,
                entry,
                resolver: crate::efault::Resolver {
                    sync_regs: vm.check_extension(kvm_ioctls::Cap::SyncRegs),
                    identity_cr3: abi::layout::PML4,
                    identity_limit: boot::identity_map_bytes(one_gig),
                    xsave_bytes,
                },
                restore: cfg
                    .restore
                    .as_ref()
                    .and_then(|r| r.snapshot.vcpus.get(index))
                    .map(|st| Arc::new(st.clone())),
                floor: if cfg.floor {
                    let pages = cfg.params.get(1).copied().unwrap_or(0);
                    Some(floor_slice(&space, cfg.vcpus, pages, index).ok_or_else(|| {
                        VmError::Setup(format!(
                            "--floor: vCPU {index}'s pages do not lie in one RAM region"
                        ))
                    })?)
                } else {
                    None
                },
            };
            let (thread_shared, cpuid, tx) = (Arc::clone(&shared), Arc::clone(&cpuid), tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let _span = tracing::debug_span!("vcpu", index).entered();
                    let t0 = crate::sched::ThreadTimes::now();
                    let outcome = vcpu::run_vcpu(vcpu, &cpuid, &thread_shared);
                    // Before the outcome goes: the report is built once every vCPU has sent one.
                    if let Some(t) = t0.and_then(crate::sched::ThreadTimes::elapsed) {
                        thread_shared.add_thread_times(t);
                    }
                    tracing::debug!(?outcome, "vcpu thread done");
                    // The receiver outlives every vCPU thread unless the VMM gave up on it.
                    let _ = tx.send(ThreadEnd::Vcpu(index, outcome));
                })
                .map_err(|source| VmError::Spawn { index, source })?;
            running.vcpus.push(h);
        }
        drop(tx);
        running.rss_at_start_bytes = memory::host::rss_bytes();
        // `--prefetch ws`: the recorded working set, replayed ahead of the vCPUs.
        running.prefetcher = cfg
            .restore
            .as_ref()
            .and_then(|r| r.prefetch.clone())
            .and_then(|runs| {
                let (space, stop) = (Arc::clone(&space), Arc::clone(&running.prefetch_stop));
                let start = cfg.process_start;
                std::thread::Builder::new()
                    .name("prefetch".into())
                    .spawn(move || {
                        let r = space.prefetch(&runs, &stop);
                        (r, start.elapsed())
                    })
                    .inspect_err(
                        |e| tracing::error!(error = %e, "cannot start the prefetch thread"),
                    )
                    .ok()
            });
        if let Some(r) = &cfg.restore {
            tracing::info!(
                mode = r.mode.name(),
                "restore: vCPUs started {:.2} ms after process start",
                cfg.process_start.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(running)
    }
}

/// The prefetch thread's result: pages populated, and when it ended (since process start).
type Prefetched = (Result<u64, memory::FaultError>, Duration);

/// A running VM (phase 2 of 3): its vCPU and companion threads run. [`RunningVm::wait`]
/// waits for the run to end and reports. Dropping it without waiting stops the vCPUs (kicked
/// out of `KVM_RUN`, with the same grace period), joins every thread and releases the VM.
pub struct RunningVm<'a> {
    cfg: &'a RunConfig,
    shared: Arc<VcpuShared>,
    /// The vCPU threads, by index.
    vcpus: Vec<JoinHandle<()>>,
    /// Each vCPU thread's outcome, sent as it ends.
    rx: mpsc::Receiver<ThreadEnd>,
    /// The userfaultfd handler thread and its stop flag (`handler` mode).
    handler: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    sidecar_stop: Arc<AtomicBool>,
    sidecars: Vec<JoinHandle<()>>,
    prefetch_stop: Arc<AtomicBool>,
    prefetcher: Option<JoinHandle<Prefetched>>,
    /// When the vCPUs were started (`--timeout` counts from here).
    run_start: Instant,
    tsc_khz: u32,
    fault_mode: FaultMode,
    memslot_changes_after_setup: u64,
    rss_at_start_bytes: u64,
    /// [`RunningVm::wait`] collected every thread.
    waited: bool,
    /// Last: released (or kept) once every thread above is joined.
    res: Resources,
}

impl std::fmt::Debug for RunningVm<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.vcpus.len())
            .field("fault_mode", &self.fault_mode)
            .field("space", &self.res.space)
            .finish_non_exhaustive()
    }
}

/// How the vCPU threads ended.
struct VcpusEnded {
    /// The outcome that decided the run, if one did.
    decided: Option<RunOutcome>,
    /// Each vCPU's outcome (`None`: it never reported).
    outcomes: Vec<Option<VcpuOutcome>>,
    /// vCPUs that did not stop within [`STOP_GRACE`] of being kicked.
    stuck: Vec<usize>,
}

impl<'a> RunningVm<'a> {
    /// The vCPUs' shared state (devices, exit counters, pausing).
    pub fn shared(&self) -> &Arc<VcpuShared> {
        &self.shared
    }

    /// Waits for the run to end (phase 3 of 3): the guest exits, a vCPU hits something fatal,
    /// every vCPU parks, a snapshot stops the VM, or `--timeout` passes (then the vCPUs are
    /// kicked out of `KVM_RUN`). Then stops the companion threads, reads the guest's results
    /// and tears the VM down (see [`Vm`]).
    pub fn wait(mut self) -> RunReport {
        let mut report = self.collect();
        let process_start = self.cfg.process_start;
        // Every thread is joined (or, a vCPU stuck, given up on): release the VM now, so that
        // `total` counts the teardown as it always has.
        drop(self);
        report.total = process_start.elapsed();
        report
    }

    /// Receives every vCPU's outcome; the first decisive one (or the timeout, or `stop_now`)
    /// makes the others stop, kicked every [`KICK_INTERVAL`] for up to [`STOP_GRACE`].
    fn await_vcpus(&mut self, stop_now: bool) -> VcpusEnded {
        let n = self.vcpus.len();
        let mut outcomes: Vec<Option<VcpuOutcome>> = vec![None; n];
        let mut decided: Option<RunOutcome> = None;
        let mut stopping_since: Option<Instant> = None;
        let mut pending = n;
        let mut stuck = Vec::new();
        let deadline = self.cfg.timeout.map(|t| self.run_start + t);
        if stop_now {
            stopping_since = Some(Instant::now());
            stop_all(&self.shared, &self.vcpus, &outcomes);
        }
        while pending > 0 {
            let wait = match (stopping_since, deadline) {
                (Some(_), _) => KICK_INTERVAL,
                (None, Some(d)) => d.saturating_duration_since(Instant::now()),
                (None, None) => Duration::from_secs(3600),
            };
            match self.rx.recv_timeout(wait) {
                Ok(ThreadEnd::HandlerFailed(message)) => {
                    if decided.is_none() {
                        decided = Some(RunOutcome::HandlerFailed { message });
                        if stopping_since.is_none() {
                            stopping_since = Some(Instant::now());
                            stop_all(&self.shared, &self.vcpus, &outcomes);
                        }
                    }
                }
                Ok(ThreadEnd::Vcpu(index, outcome)) => {
                    pending -= 1;
                    if decided.is_none() {
                        decided = match &outcome {
                            VcpuOutcome::Exited(status) => Some(RunOutcome::Exited(*status)),
                            VcpuOutcome::Fatal(d) => Some(RunOutcome::Fatal(d.clone())),
                            VcpuOutcome::SetupFailed(message) => Some(RunOutcome::SetupFailed {
                                vcpu: index,
                                message: message.clone(),
                            }),
                            VcpuOutcome::SnapshotStopped => Some(RunOutcome::SnapshotStopped),
                            VcpuOutcome::Parked | VcpuOutcome::Kicked { .. } => None,
                        };
                        if decided.is_some() && stopping_since.is_none() {
                            stopping_since = Some(Instant::now());
                            stop_all(&self.shared, &self.vcpus, &outcomes);
                        }
                    }
                    if let Some(slot) = outcomes.get_mut(index) {
                        *slot = Some(outcome);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => match stopping_since {
                    Some(since) if since.elapsed() > STOP_GRACE => {
                        stuck = (0..n).filter(|&i| outcomes[i].is_none()).collect();
                        break;
                    }
                    Some(_) => stop_all(&self.shared, &self.vcpus, &outcomes),
                    None => {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            decided = Some(RunOutcome::TimedOut {
                                after: self.cfg.timeout.unwrap_or_default(),
                                rips: Vec::new(),
                            });
                            stopping_since = Some(Instant::now());
                            stop_all(&self.shared, &self.vcpus, &outcomes);
                        }
                    }
                },
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        VcpusEnded {
            decided,
            outcomes,
            stuck,
        }
    }

    /// Stops the prefetcher, returning what it did.
    fn stop_prefetcher(&mut self) -> Option<(u64, Duration)> {
        self.prefetch_stop.store(true, Ordering::Release);
        self.prefetcher.take().and_then(|h| match h.join() {
            Ok((Ok(pages), at)) => Some((pages, at)),
            Ok((Err(e), _)) => {
                tracing::error!(error = %e, "prefetching the working set failed");
                None
            }
            Err(_) => None,
        })
    }

    /// Stops and joins the userfaultfd handler and the companion threads.
    fn stop_companions(&mut self) {
        if let Some((stop, h)) = self.handler.take() {
            stop.store(true, Ordering::Release);
            let _ = h.join();
        }
        self.sidecar_stop.store(true, Ordering::Release);
        for h in self.sidecars.drain(..) {
            let _ = h.join();
        }
    }

    /// Joins every vCPU thread, or, when some did not stop, keeps the VM and guest memory
    /// mapped for them ([`Teardown::KeepMapped`]).
    fn join_vcpus(&mut self, stuck: &[usize]) {
        if stuck.is_empty() {
            for h in self.vcpus.drain(..) {
                // A vCPU thread that panicked has already been accounted as missing.
                let _ = h.join();
            }
        } else {
            self.res.teardown = Teardown::KeepMapped;
        }
    }

    /// Waits for the vCPUs, stops the other threads and gathers the report (`total` is set by
    /// [`RunningVm::wait`], after teardown).
    fn collect(&mut self) -> RunReport {
        let cfg = self.cfg;
        let VcpusEnded {
            decided,
            outcomes,
            stuck,
        } = self.await_vcpus(false);
        self.waited = true;
        let shared = Arc::clone(&self.shared);
        let space = Arc::clone(&self.res.space);
        shared.devices.serial.flush_partial();
        let prefetched = self.stop_prefetcher();
        let marks = shared
            .devices
            .marks()
            .into_iter()
            .map(|m| m.map(|t| t.saturating_duration_since(cfg.process_start)))
            .collect();
        let rss_bytes = memory::host::rss_bytes();
        self.stop_companions();
        let exits = shared.exits.snapshot();
        let rcu = space.domain().stats();
        // The report is read like any device reads guest memory: through the address space,
        // under a read guard (the results live in the boot area, which is never demand-paged).
        let (results, touch_histogram) = {
            let reader = space.domain().register();
            let guard = reader.read();
            let mem = memory::GuardedMemory::new(&space, &guard);
            (
                read_results(&mem, cfg.vcpus),
                read_histograms(&mem, cfg.vcpus),
            )
        };
        let counters = space.counters.snapshot();
        let restore_pages = space
            .source()
            .map(|src| (src.served.load(Ordering::Relaxed), src.remaining()));
        // A lazy restore without prefetch records the order of first touches for the next one,
        // unless the run failed: a working set cut short by a fatal error or a timeout would
        // replace a good one.
        let failed = matches!(
            decided,
            Some(
                RunOutcome::Fatal(_)
                    | RunOutcome::TimedOut { .. }
                    | RunOutcome::SetupFailed { .. }
                    | RunOutcome::HandlerFailed { .. }
            )
        );
        let ws_recorded = match (&cfg.restore, space.source()) {
            (Some(r), Some(src))
                if !failed && r.prefetch.is_none() && r.mode != RestoreMode::Eager =>
            {
                let runs = src.working_set();
                let pages = runs.iter().map(|r| r.1).sum();
                Some(
                    crate::snapshot::write_working_set(&r.snapshot.dir, &runs)
                        .map(|()| (runs.len() as u64, pages))
                        .map_err(|e| e.to_string()),
                )
            }
            _ => None,
        };

        let outcome = match decided {
            Some(RunOutcome::TimedOut { after, .. }) => RunOutcome::TimedOut {
                after,
                rips: outcomes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, o)| match o {
                        Some(VcpuOutcome::Kicked { rip }) => Some((i, *rip)),
                        _ => None,
                    })
                    .collect(),
            },
            Some(o) => o,
            None => RunOutcome::AllParked,
        };
        let first_line = shared
            .devices
            .serial
            .first_line_at()
            .map(|t| t.saturating_duration_since(cfg.process_start));
        self.join_vcpus(&stuck);
        RunReport {
            outcome,
            first_line,
            total: Duration::ZERO,
            stuck,
            fault_mode: self.fault_mode,
            results,
            touch_histogram,
            tsc_khz: self.tsc_khz,
            counters,
            exits,
            rcu,
            memslot_changes_after_setup: self.memslot_changes_after_setup,
            // The first vCPU's first entry into the guest (its state set up), not when its
            // thread was started.
            resumed_at: cfg.restore.as_ref().and(
                self.shared
                    .first_entry
                    .get()
                    .map(|t| t.saturating_duration_since(cfg.process_start)),
            ),
            restore_pages,
            marks,
            prefetched,
            ws_recorded,
            rss_bytes,
            rss_at_start_bytes: self.rss_at_start_bytes,
            vcpu_thread_times: *self
                .shared
                .thread_times
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }
}

impl Drop for RunningVm<'_> {
    fn drop(&mut self) {
        if self.waited {
            return;
        }
        // Started but not waited for (an error while starting, or the caller let go of it):
        // stop every vCPU now, then every other thread.
        let ended = self.await_vcpus(true);
        self.shared.devices.serial.flush_partial();
        let _ = self.stop_prefetcher();
        self.stop_companions();
        self.join_vcpus(&ended.stuck);
    }
}

/// Maps the snapshot's run-time regions (boot and RAM regions were mapped from the plan, which
/// must match the snapshot's).
fn restore_regions(
    space: &AddressSpace,
    r: &Restore,
    ranges: &[memory::RamRange],
) -> Result<(), VmError> {
    let err = |why: String| VmError::Restore {
        dir: r.snapshot.dir.clone(),
        why,
    };
    let regions = &r.snapshot.manifest.regions;
    let fixed: Vec<_> = regions
        .iter()
        .filter(|g| g.kind != RegionKind::Hotplug)
        .collect();
    let planned: Vec<_> = ranges.iter().map(|p| (p.start.0, p.size_bytes)).collect();
    let recorded: Vec<_> = fixed.iter().map(|g| (g.gpa, g.size)).collect();
    if planned != recorded {
        return Err(err(format!(
            "its boot and RAM regions {recorded:x?} are not the ones {} of RAM gives {planned:x?}",
            memory::fmt_size(r.snapshot.manifest.shape.mem_bytes)
        )));
    }
    for g in regions.iter().filter(|g| g.kind == RegionKind::Hotplug) {
        space
            .map(g.gpa, g.size, g.backing, g.readonly, RegionKind::Hotplug)
            .map_err(|e| err(format!("cannot map the region at {:#x}: {e}", g.gpa)))?;
    }
    Ok(())
}

/// Brings guest memory back: the boot area is written at once; the other regions' pages are
/// served from the snapshot on first touch (`vcpu`, `handler`), mapped from it (`kernel`) or
/// copied in now (`eager`). Then tells the guest it was restored (the `pattern` resume words).
fn restore_memory(
    space: &AddressSpace,
    guest_mem: &memory::GuardedMemory<'_>,
    r: &Restore,
) -> Result<(), VmError> {
    use vm_memory::{Bytes, GuestAddress};
    let snap = &r.snapshot;
    let err = |why: String| VmError::Restore {
        dir: snap.dir.clone(),
        why,
    };
    let boot_end = abi::layout::BOOT_AREA_END;
    let mut buf = vec![0u8; memory::address_space::PAGE as usize];
    for gpa in snap.pages.gpas().take_while(|g| *g < boot_end) {
        let off = snap
            .file_offset(gpa)
            .ok_or_else(|| err(format!("page {gpa:#x} lies in no region")))?;
        std::os::unix::fs::FileExt::read_exact_at(&snap.memory, &mut buf, off)
            .map_err(|e| err(format!("cannot read page {gpa:#x}: {e}")))?;
        guest_mem
            .write_slice(&buf, GuestAddress(gpa))
            .map_err(|e| err(format!("cannot write page {gpa:#x}: {e}")))?;
    }
    // Runs of adjacent pages held above the boot area.
    let lazy = || {
        snap.pages
            .runs()
            .filter(move |&(_, end)| end > boot_end)
            .map(move |(first, end)| (first.max(boot_end), end))
    };
    let file = snap
        .memory
        .try_clone()
        .map_err(|e| err(format!("cannot reopen memory.img: {e}")))?;
    if r.mode == RestoreMode::Kernel {
        for g in snap
            .manifest
            .regions
            .iter()
            .filter(|g| g.kind != RegionKind::Boot)
        {
            space
                .map_snapshot_file(g.gpa, g.size, &file, g.file_offset, g.readonly)
                .map_err(|e| err(format!("cannot map memory.img at {:#x}: {e}", g.gpa)))?;
        }
    } else {
        let regions = snap
            .manifest
            .regions
            .iter()
            .map(|g| memory::snapshot::SourceRegion {
                gpa: g.gpa,
                size: g.size,
                file_offset: g.file_offset,
            })
            .collect();
        let source = memory::snapshot::Source::open(
            file,
            snap.manifest.memory_bytes,
            regions,
            lazy(),
            space.host().size_bytes(),
            r.prefetch.is_none() && matches!(r.mode, RestoreMode::Vcpu | RestoreMode::Handler),
        )
        .map_err(|e| err(format!("cannot map memory.img: {e}")))?;
        space.set_source(source).map_err(err)?;
        if r.mode == RestoreMode::Eager {
            let started = Instant::now();
            // Runs of adjacent pages, each copied in with one call.
            let mut pages = 0u64;
            for (first, end) in lazy() {
                pages += (end - first) / memory::address_space::PAGE;
                space
                    .populate_range(first, end - first)
                    .map_err(|e| err(format!("cannot copy guest memory in: {e}")))?;
            }
            tracing::info!(
                pages,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "restore: every page copied in (eager)"
            );
        }
    }
    // The `pattern` guest re-reads these after every pass: a new generation, and how many
    // passes to run from here.
    use abi::pattern_params as pp;
    let word = |i: usize| {
        GuestAddress(abi::layout::BOOT_INFO + abi::BootInfo::PARAMS_OFFSET + 8 * i as u64)
    };
    let generation: u64 = guest_mem
        .read_obj(word(pp::RESUME_GEN))
        .map_err(|e| err(format!("cannot read the boot info: {e}")))?;
    guest_mem
        .write_obj(r.passes, word(pp::RESUME_PASSES))
        .and_then(|()| guest_mem.write_obj(r.pages, word(pp::RESUME_PAGES)))
        .and_then(|()| guest_mem.write_obj(generation.wrapping_add(1).max(1), word(pp::RESUME_GEN)))
        .map_err(|e| err(format!("cannot write the boot info: {e}")))?;
    // Touch latencies from here on are the restored guest's.
    let hist_bytes = vec![0u8; abi::HIST_BUCKETS * 4 * abi::layout::MAX_VCPUS as usize];
    guest_mem
        .write_slice(&hist_bytes, GuestAddress(abi::layout::HISTOGRAMS))
        .map_err(|e| err(format!("cannot clear the latency histograms: {e}")))?;
    Ok(())
}

/// Most regions an address space holds in window mode (the tree's own bound is far higher).
pub const MAX_WINDOW_REGIONS: usize = 4 << 20;

/// KVM's metadata for a memslot, in bytes per 4 KiB page, on hosts that shadow the guest's
/// page tables (`kvm_pvm`, or no EPT/NPT): an 8-byte reverse map entry per page, a 2-byte
/// write-tracking count, and a little for the 2 MiB and 1 GiB levels. Measured here: 2.57 MiB
/// per GiB of memslot (docs/memory.md). Hosts with EPT/NPT allocate the reverse maps only
/// once a shadow page table is needed.
pub const KVM_BYTES_PER_PAGE: u64 = 10;

/// The largest share of host RAM a hot-plug window's KVM metadata may take: 1/32 (about 3 %).
pub const WINDOW_HOST_SHARE: u64 = 32;

/// Where the hot-plug window starts: above RAM and the 32-bit hole, on a 1 GiB boundary.
pub fn hotplug_window_base(ram_top: u64) -> u64 {
    abi::layout::HOLE_END.max(ram_top.next_multiple_of(1 << 30))
}

/// Estimated host memory KVM allocates for a memslot of `bytes` (see [`KVM_BYTES_PER_PAGE`]).
pub fn window_cost_bytes(bytes: u64) -> u64 {
    bytes / abi::layout::PAGE_SIZE * KVM_BYTES_PER_PAGE
}

/// The hot-plug window of `size` bytes for RAM ending at `ram_top`, checked against the
/// guest-physical space and the host's RAM.
fn hotplug_window(size: u64, ram_top: u64, space_bytes: u64) -> Result<Range<u64>, VmError> {
    let host_ram = host_ram_bytes();
    check_window(size, ram_top, space_bytes, host_ram).map_err(|why| VmError::Window {
        size: memory::fmt_size(size),
        why,
    })
}

/// The checks of the hot-plug window (`--hotplug-window`), with the host's RAM given.
pub fn check_window(
    size: u64,
    ram_top: u64,
    space_bytes: u64,
    host_ram: u64,
) -> Result<Range<u64>, String> {
    if size == 0 {
        return Ok(0..0);
    }
    if size % (2 << 20) != 0 {
        return Err("must be a multiple of 2M".into());
    }
    let base = hotplug_window_base(ram_top);
    let end = base.saturating_add(size);
    if end > space_bytes {
        return Err(format!(
            "the window would end at {end:#x}, beyond the {} of guest-physical space the boot \
             page tables map; use at most {}",
            memory::fmt_size(space_bytes),
            memory::fmt_size(space_bytes.saturating_sub(base))
        ));
    }
    let cost = window_cost_bytes(size);
    if host_ram > 0 && cost > host_ram / WINDOW_HOST_SHARE {
        return Err(format!(
            "KVM would allocate about {} of host memory for it, over 1/{WINDOW_HOST_SHARE} of \
             the host's {}; use a smaller window",
            crate::size::fmt_bytes(cost),
            crate::size::fmt_bytes(host_ram)
        ));
    }
    Ok(base..end)
}

/// The host's RAM (`MemTotal`), 0 if unknown.
fn host_ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Asks KVM to zap only a deleted memslot's mappings rather than every shadow page of the VM
/// (`KVM_X86_QUIRK_SLOT_ZAP_ALL` off, Linux 6.12+). With the quirk on, each unmap, split or
/// protect of any region throws away the guest's whole shadow MMU, and every vCPU then faults
/// its working set back in. Hosts without the control keep the old behaviour.
fn disable_slot_zap_all(vm: &kvm_ioctls::VmFd) {
    use kvm_bindings::{KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL};
    let supported = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_DISABLE_QUIRKS2));
    if supported <= 0 || (supported as u64) & u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL) == 0 {
        tracing::debug!("KVM cannot limit memslot deletion to the slot's mappings");
        return;
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_DISABLE_QUIRKS2,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL);
    if let Err(e) = vm.enable_cap(&cap) {
        tracing::debug!(error = %e, "disabling KVM_X86_QUIRK_SLOT_ZAP_ALL failed");
    }
}

/// Makes every vCPU that has not finished leave `KVM_RUN` and stop.
fn stop_all(shared: &VcpuShared, handles: &[JoinHandle<()>], outcomes: &[Option<VcpuOutcome>]) {
    // Pairs with the Acquire load at the top of the vCPU loop.
    shared.stop.store(true, Ordering::Release);
    for (i, h) in handles.iter().enumerate() {
        if outcomes.get(i).is_some_and(Option::is_some) || h.is_finished() {
            continue;
        }
        if let Err(e) = h.kill(kvm::kick_signal()) {
            tracing::debug!(vcpu = i, "kick failed: {e}");
        }
    }
}

/// Picks the fault mode the host can do: `vcpu` needs userfaultfd's SIGBUS feature, `handler`
/// plain userfaultfd. Falls back (with a message) rather than failing.
fn probe_fault_mode(wanted: FaultMode) -> FaultMode {
    use crate::memory::uffd::{Uffd, UffdMode};
    let mut mode = wanted;
    if mode == FaultMode::Vcpu {
        if let Err(e) = Uffd::new(UffdMode::Sigbus) {
            eprintln!(
                "vmm: --fault-mode vcpu needs userfaultfd with UFFD_FEATURE_SIGBUS, which this host refuses ({e}); falling back to --fault-mode handler"
            );
            mode = FaultMode::Handler;
        }
    }
    if mode == FaultMode::Handler {
        if let Err(e) = Uffd::new(UffdMode::Handler) {
            eprintln!(
                "vmm: userfaultfd is not available here ({e}; as non-root set vm.unprivileged_userfaultfd=1); falling back to --fault-mode kernel"
            );
            mode = FaultMode::Kernel;
        }
    }
    tracing::debug!(wanted = wanted.name(), using = mode.name(), "fault mode");
    mode
}

/// Starts the userfaultfd handler thread (`--fault-mode handler`): an RCU reader that is
/// offline while it waits in `poll`, and services each fault under a read guard. Its first
/// failure to serve a fault is sent on `tx`, which ends the run.
fn spawn_uffd_handler(
    space: &Arc<AddressSpace>,
    tx: mpsc::Sender<ThreadEnd>,
) -> Result<(Arc<std::sync::atomic::AtomicBool>, JoinHandle<()>), VmError> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (space, stop2) = (Arc::clone(space), Arc::clone(&stop));
    let h = std::thread::Builder::new()
        .name("uffd-handler".into())
        .spawn(move || {
            let mut reported = false;
            memory::fault::handler_loop(&space, &stop2, |e| {
                if !std::mem::replace(&mut reported, true) {
                    let _ = tx.send(ThreadEnd::HandlerFailed(e.to_string()));
                }
            })
        })
        .map_err(VmError::SpawnHandler)?;
    Ok((stop, h))
}

/// Reads every vCPU's results slot.
fn read_results(mem: &impl vm_memory::GuestMemory, vcpus: u32) -> Vec<abi::VcpuResult> {
    use vm_memory::Bytes;
    (0..u64::from(vcpus))
        .map(|i| {
            abi::VcpuResult::from_words(std::array::from_fn(|k| {
                mem.read_obj::<u64>(vm_memory::GuestAddress(abi::result_addr(i) + 8 * k as u64))
                    .unwrap_or(0)
            }))
        })
        .collect()
}

/// Sums every vCPU's touch-latency histogram.
fn read_histograms(mem: &impl vm_memory::GuestMemory, vcpus: u32) -> Vec<u64> {
    use vm_memory::Bytes;
    let mut total = vec![0u64; abi::HIST_BUCKETS];
    for i in 0..u64::from(vcpus) {
        for (b, t) in total.iter_mut().enumerate() {
            let a = vm_memory::GuestAddress(abi::hist_addr(i) + 4 * b as u64);
            *t += u64::from(mem.read_obj::<u32>(a).unwrap_or(0));
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Whether KVM tests can run: false (after saying why) only where `/dev/kvm` does not
    /// exist, and then a failure with `VMM_REQUIRE_KVM=1` (as `tests/support`).
    fn kvm_available() -> bool {
        if std::path::Path::new("/dev/kvm").exists() {
            return true;
        }
        assert_ne!(
            std::env::var("VMM_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "/dev/kvm does not exist, and VMM_REQUIRE_KVM=1 forbids skipping KVM tests"
        );
        eprintln!("skipping: /dev/kvm does not exist (set VMM_REQUIRE_KVM=1 to fail instead)");
        false
    }

    fn small_vm_config() -> RunConfig {
        RunConfig {
            fault_mode: FaultMode::Kernel,
            fault_around: memory::FaultAround::Fixed(1),
            ..RunConfig::new(abi::workload::HELLO, Vec::new(), 1, memory::MIN_MEM_BYTES)
        }
    }

    #[test]
    fn teardown_releases_or_deliberately_keeps_the_vm_and_its_memory() {
        if !kvm_available() {
            return;
        }
        let cfg = small_vm_config();
        // Release: once the Vm is dropped, nothing holds the address space or the VM fd.
        let vm = Vm::build(&cfg).unwrap();
        let (space, fd) = (Arc::downgrade(&vm.res.space), Arc::downgrade(&vm.res.vm));
        assert_eq!(vm.res.teardown, Teardown::Release);
        drop(vm);
        assert!(space.upgrade().is_none() && fd.upgrade().is_none());
        // KeepMapped (a vCPU stuck in KVM_RUN): both stay, with guest memory mapped.
        let mut vm = Vm::build(&cfg).unwrap();
        vm.res.teardown = Teardown::KeepMapped;
        let (space, fd) = (Arc::downgrade(&vm.res.space), Arc::downgrade(&vm.res.vm));
        drop(vm);
        let space = space.upgrade().expect("the address space was kept");
        assert!(fd.upgrade().is_some(), "the VM fd was kept");
        assert_eq!(space.len(), 2, "boot area and RAM still mapped");
    }

    #[test]
    fn hotplug_window_placement_and_cost() {
        // Above RAM and the 32-bit hole, on a GiB boundary.
        assert_eq!(
            check_window(16 * GIB, 256 << 20, 512 * GIB, 24 * GIB),
            Ok(4 * GIB..20 * GIB)
        );
        assert_eq!(
            check_window(GIB, 5 * GIB + 1, 512 * GIB, 24 * GIB),
            Ok(6 * GIB..7 * GIB)
        );
        assert_eq!(
            check_window(0, 0, 64 * GIB, 24 * GIB),
            Ok(0..0),
            "no window"
        );
        let e = check_window(GIB + 4096, 0, 64 * GIB, 24 * GIB).unwrap_err();
        assert!(e.contains("multiple of 2M"), "{e}");
        let e = check_window(61 * GIB, 0, 64 * GIB, 24 * GIB).unwrap_err();
        assert!(e.contains("use at most 60G"), "{e}");
        // 64 GiB of window costs about 160 MiB of KVM metadata: over 1/32 of a 4 GiB host.
        assert_eq!(window_cost_bytes(GIB), 2_621_440);
        let e = check_window(64 * GIB, 0, 512 * GIB, 4 * GIB).unwrap_err();
        assert!(e.contains("over 1/32 of the host's 4.00 GiB"), "{e}");
        assert!(check_window(64 * GIB, 0, 512 * GIB, 24 * GIB).is_ok());
    }
}
