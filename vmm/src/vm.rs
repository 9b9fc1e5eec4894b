//! Building and running one VM: KVM, guest RAM and memslots, boot data, one thread per vCPU,
//! and the main thread that waits for the run to end and collects every vCPU.
#![deny(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::signal::Killable;

use crate::boot::{self, elf, BootError};
use crate::devices::Devices;
use crate::kvm::{self, KvmError};
use crate::memory::{self, MemoryError};
use crate::vcpu::{self, Diagnosis, Vcpu, VcpuOutcome, VcpuShared};

/// Where KVM may put the real-mode TSS (Intel without unrestricted guest); in the 32-bit hole.
const TSS_ADDR: usize = 0xfffb_d000;
/// How often stopping vCPUs are kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(5);
/// How long stopping vCPUs get before the VMM gives up on them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Clone, Debug)]
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
    /// A vCPU could not be set up.
    SetupFailed {
        /// Which.
        vcpu: usize,
        /// Why.
        message: String,
    },
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
}

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
pub fn run(cfg: &RunConfig, serial_sink: Box<dyn Write + Send>) -> Result<RunReport, VmError> {
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

    // Declared before the VM so that it is dropped after it: memslots point into it.
    let guest_mem = memory::create(&ranges)?;
    let vm = ioctl("KVM_CREATE_VM", kvm_fd.create_vm())?;
    ioctl("KVM_SET_TSS_ADDR", vm.set_tss_address(TSS_ADDR))?;
    for (slot, region) in guest_mem.iter().enumerate() {
        kvm::add_memslot(&vm, slot as u32, region)?;
    }
    let info = boot::boot_info(cfg.vcpus, cfg.workload, &cfg.params, &ranges)?;
    boot::write_boot_data(&guest_mem, one_gig, &info)?;
    boot::load_image(&guest_mem, &image, image_bytes)?;
    tracing::debug!(
        one_gig_pages = one_gig,
        entry = format_args!("{:#x}", image.entry),
        regions = guest_mem.num_regions(),
        "guest memory and boot data ready"
    );

    kvm::install_kick_handler()?;
    let shared = Arc::new(VcpuShared {
        devices: Devices::new(cfg.vcpus as usize, serial_sink),
        ram: ranges.clone(),
        stop: std::sync::atomic::AtomicBool::new(false),
    });
    let cpuid = Arc::new(cpuid);
    let (tx, rx) = mpsc::channel::<(usize, VcpuOutcome)>();
    let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(cfg.vcpus as usize);
    let run_start = Instant::now();
    for index in 0..cfg.vcpus as usize {
        let fd = match vm.create_vcpu(index as u64) {
            Ok(fd) => fd,
            Err(source) => {
                stop_all(&shared, &handles, &[]);
                return Err(VmError::Ioctl {
                    what: "KVM_CREATE_VCPU",
                    source,
                });
            }
        };
        let vcpu = Vcpu {
            index,
            fd,
            entry: image.entry,
        };
        let (thread_shared, cpuid, tx) = (Arc::clone(&shared), Arc::clone(&cpuid), tx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let _span = tracing::debug_span!("vcpu", index).entered();
                let outcome = vcpu::run_vcpu(vcpu, &cpuid, &thread_shared);
                tracing::debug!(?outcome, "vcpu thread done");
                // The receiver outlives every vCPU thread unless the VMM gave up on it.
                let _ = tx.send((index, outcome));
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(source) => {
                stop_all(&shared, &handles, &[]);
                return Err(VmError::Spawn { index, source });
            }
        }
    }
    drop(tx);

    let n = handles.len();
    let mut outcomes: Vec<Option<VcpuOutcome>> = vec![None; n];
    let mut decided: Option<RunOutcome> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut pending = n;
    let mut stuck = Vec::new();
    let deadline = cfg.timeout.map(|t| run_start + t);
    while pending > 0 {
        let wait = match (stopping_since, deadline) {
            (Some(_), _) => KICK_INTERVAL,
            (None, Some(d)) => d.saturating_duration_since(Instant::now()),
            (None, None) => Duration::from_secs(3600),
        };
        match rx.recv_timeout(wait) {
            Ok((index, outcome)) => {
                pending -= 1;
                if decided.is_none() {
                    decided = match &outcome {
                        VcpuOutcome::Exited(status) => Some(RunOutcome::Exited(*status)),
                        VcpuOutcome::Fatal(d) => Some(RunOutcome::Fatal(d.clone())),
                        VcpuOutcome::SetupFailed(message) => Some(RunOutcome::SetupFailed {
                            vcpu: index,
                            message: message.clone(),
                        }),
                        VcpuOutcome::Parked | VcpuOutcome::Kicked { .. } => None,
                    };
                    if decided.is_some() {
                        stopping_since = Some(Instant::now());
                        stop_all(&shared, &handles, &outcomes);
                    }
                }
                outcomes[index] = Some(outcome);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => match stopping_since {
                Some(since) if since.elapsed() > STOP_GRACE => {
                    stuck = (0..n).filter(|&i| outcomes[i].is_none()).collect();
                    break;
                }
                Some(_) => stop_all(&shared, &handles, &outcomes),
                None => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        decided = Some(RunOutcome::TimedOut {
                            after: cfg.timeout.unwrap_or_default(),
                            rips: Vec::new(),
                        });
                        stopping_since = Some(Instant::now());
                        stop_all(&shared, &handles, &outcomes);
                    }
                }
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    shared.devices.serial.flush_partial();

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

    if stuck.is_empty() {
        for h in handles {
            // A vCPU thread that panicked has already been accounted as missing.
            let _ = h.join();
        }
        drop(vm);
        drop(guest_mem);
    } else {
        // A vCPU that never stopped may still be inside KVM_RUN: keep its memory mapped
        // until the process exits rather than unmap it under the guest.
        std::mem::forget(guest_mem);
        std::mem::forget(vm);
    }
    Ok(RunReport {
        outcome,
        first_line,
        total: cfg.process_start.elapsed(),
        stuck,
    })
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
