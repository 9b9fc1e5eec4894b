//! `vmm`: a KVM virtual machine monitor.
//!
//! Exit codes: 0 success; 2 usage error; 1 any other error (one line on stderr saying what
//! failed and what to do). `vmm run` exits with the guest's own status, 1 when the guest
//! crashed (with a one-line diagnosis), 124 when it ran past `--timeout`.
//!
//! The command line only: the VMM itself is the `vmm` library (`lib.rs`).
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};

use vmm::cli::{
    parse_fault_around, AddressSpace, ControlSched, FaultMode, Memslots, Pattern, RamBacking,
};
use vmm::vm::{RunConfig, RunOutcome};
use vmm::{control, memory, size, snapshot, stress, summarize, summary, vm};

/// Exit status when the guest crashed or the VMM failed.
const EXIT_FAILURE: u8 = 1;
/// Exit status of a usage error (as clap's own).
const EXIT_USAGE: u8 = 2;
/// Exit status when the guest ran past `--timeout` (as `timeout(1)`).
const EXIT_TIMEOUT: u8 = 124;

/// A KVM virtual machine monitor whose guest memory lives in an RCU balanced tree.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, propagate_version = true)]
struct Cli {
    /// More logging on stderr (-v: info, including boot times; -vv: debug; -vvv: trace).
    /// RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the built-in guest (or --kernel ELF) on KVM and show its serial console.
    ///
    /// Serial output goes to stdout, the VMM's own messages to stderr. Exits with the guest's
    /// status; 1 when the guest crashed (triple fault, unknown port or MMIO, HLT, KVM error)
    /// or the VMM failed, with a one-line diagnosis; 124 when the guest ran past --timeout.
    Run(RunArgs),
    /// Send one request to a running VMM's control socket (`vmm run --api-sock PATH`) and
    /// print the reply; exit 0 when it succeeded, 1 otherwise.
    Ctl(control::client::CtlArgs),
    /// Fault storms under region churn: N vCPUs first-touch lazily backed RAM while a churn
    /// thread maps, unmaps, splits and protects other regions; reports faults/s, latency
    /// percentiles, exits, grace periods (text, or one JSON object with --json) and can plot.
    Stress(stress::StressArgs),
    /// Turn saved benchmark rows (JSON lines: `vmm stress --json` reports and
    /// restore-benchmark rows) into Markdown tables with best, median and target ratios, and
    /// with --plot into bar charts. Exit 1 on an unreadable file or a malformed line.
    Summarize(summarize::SummarizeArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    vcpus: u32,

    /// Guest RAM: a plain integer or with a K/M/G/T suffix (powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = size::parse_size)]
    mem: u64,

    /// Boot this static x86-64 ELF instead of the built-in guest. It is entered in 64-bit
    /// mode on an identity map with rdi = vCPU index, rsi = boot-info address (see
    /// docs/run.md); its PT_LOAD segments must lie in RAM, clear of the boot area.
    #[arg(long, value_name = "ELF")]
    kernel: Option<PathBuf>,

    /// What the guest does. hello: each vCPU prints `hello from vcpu K`, exit 0. The others
    /// are test workloads: exit (status --exit-status), spin (forever), triple-fault,
    /// bad-port, bad-mmio, hlt.
    #[arg(long, value_enum, default_value_t = Workload::Hello)]
    workload: Workload,

    /// Exit status for `--workload exit`.
    #[arg(long, value_name = "STATUS", default_value_t = 0)]
    exit_status: u8,

    /// How first touches of guest RAM are serviced: vcpu (userfaultfd SIGBUS mode, serviced
    /// on the faulting vCPU's thread), handler (userfaultfd handler thread), kernel (the host
    /// kernel's own faults).
    #[arg(long, value_enum, default_value_t = FaultMode::Vcpu)]
    fault_mode: FaultMode,

    /// Pages populated per first-touch fault (vcpu and handler modes): adaptive (a window
    /// per faulting thread that grows from 1 to 512 pages while first touches are sequential
    /// or strided and shrinks when they are not), or a fixed aligned window of PAGES (a power
    /// of two, 1 to 512). Never beyond the region, never over a present page.
    #[arg(long, value_name = "PAGES|adaptive", default_value = "adaptive", value_parser = parse_fault_around)]
    fault_around: memory::FaultAround,

    /// The order in which `--workload touch` visits each vCPU's pages: sequential, reverse,
    /// stride:N (every N-th page), random (a random permutation), hotcold (90 % of accesses
    /// to 10 % of the pages).
    #[arg(long, value_name = "PATTERN", default_value = "sequential", value_parser = Pattern::parse)]
    pattern: Pattern,

    /// Transparent huge pages on guest RAM (madvise MADV_HUGEPAGE; anon or memfd RAM): the host
    /// kernel's own best case in `--fault-mode kernel`; in `vcpu` and `handler` modes, a
    /// fault-around window that covers a whole aligned 2 MiB of anon RAM is filled with one
    /// zeroed huge page, moved in (UFFDIO_MOVE).
    #[arg(long)]
    thp: bool,

    /// Address-space implementation: bonsai (RCU balanced tree), rwlock (RwLock<BTreeMap>),
    /// cow (copy-on-write map published with arc-swap).
    #[arg(long, value_enum, default_value_t = AddressSpace::Bonsai)]
    address_space: AddressSpace,

    /// What backs guest RAM: anon, memfd, or hugetlb (2 MiB huge pages: needs that many free
    /// on the host and --mem a multiple of 2M; a first touch populates a whole huge page).
    #[arg(long, value_enum, default_value_t = RamBacking::Anon)]
    ram_backing: RamBacking,

    /// How guest memory is laid onto KVM memslots: window (a few long-lived memslots; region
    /// changes touch only the tree and the host mappings) or per-region (one memslot each).
    #[arg(long, value_enum, default_value_t = Memslots::Window)]
    memslots: Memslots,

    /// How the control socket's threads are scheduled beside the vCPUs: batch (SCHED_BATCH: a
    /// request that arrives while every CPU runs a vCPU waits for the scheduler's next pick,
    /// by the next tick, instead of preempting a vCPU; pays when vCPUs exit rarely, costs when
    /// they exit for every page, see docs/bench.md), normal, or auto (batch while the vCPUs
    /// exit under 4000 times a second each, normal otherwise).
    #[arg(long, value_enum, default_value_t = ControlSched::Auto)]
    control_sched: ControlSched,

    /// Size of the hot-plug window (window mode, with --api-sock): run-time regions must lie
    /// in [base, base + SIZE), base = max(4G, RAM's end rounded up to 1G). KVM allocates about
    /// 2.5 MiB of host memory per GiB of window on shadow-paging hosts; 0 = no hot-plug.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = size::parse_size)]
    hotplug_window: u64,

    /// Pages each vCPU touches with `--workload touch` or `pattern` (0: all RAM, split
    /// evenly). With --restore of a `pattern` guest: the pages of its slice each vCPU verifies
    /// after resuming, its working set (0: every page it wrote).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pages: u64,

    /// Verify passes of `--workload pattern` before it exits (0: until stopped, or until a
    /// snapshot with --stop); with --restore, the passes the restored guest runs from where it
    /// was before it exits (0: until stopped).
    #[arg(long, value_name = "N", default_value_t = 0)]
    passes: u64,

    /// `--workload pattern`: every verify pass also rewrites each word it checked with the
    /// next generation's value, so the guest keeps writing all of its memory (a live
    /// snapshot's hardest case); a restored guest finishes the pass it was in.
    #[arg(long)]
    rewrite: bool,

    /// Serve the control socket (JSON lines, mode 0600) at PATH: hot-plug memory with
    /// `vmm ctl` (see docs/control.md). Refuses a live socket, replaces a stale one.
    #[arg(long, value_name = "PATH", alias = "api-socket")]
    api_sock: Option<PathBuf>,

    /// Most hot-plugged regions at once, splits included (control socket).
    #[arg(long, value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..=32000))]
    max_regions: u64,

    /// Most hot-plugged guest memory at once (control socket).
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = size::parse_size)]
    max_hotplug_mem: u64,

    /// Most control clients connected at once.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_clients: u64,

    /// Drop a control client that leaves a request line incomplete for this many seconds
    /// (fractions allowed).
    #[arg(long, value_name = "SECONDS", default_value = control::DEFAULT_CLIENT_IDLE_TIMEOUT,
          value_parser = control::parse_client_idle_timeout)]
    client_idle_timeout: Duration,

    /// Stop the guest after this many seconds (fractions allowed; 0 = never).
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = size::parse_timeout)]
    timeout: Duration,

    /// Print one JSON summary object on the last line of stdout (after the guest's console):
    /// exit status, outcome and diagnosis, exits by reason, faults, and the touch summary.
    #[arg(long)]
    json: bool,

    /// The KVM device.
    #[arg(
        long,
        value_name = "PATH",
        env = "VMM_KVM_DEV",
        default_value = "/dev/kvm"
    )]
    kvm_dev: PathBuf,

    /// Resume the VM saved in DIR by `vmm ctl snapshot` instead of booting: the vCPUs,
    /// devices and regions come back as they were (the snapshot's --vcpus, --mem,
    /// --ram-backing, --memslots, --hotplug-window and --address-space apply; those flags are
    /// ignored). See docs/snapshot.md.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,

    /// How guest memory comes back with --restore: vcpu (first touches served on the vCPU
    /// thread from the snapshot), handler (a userfaultfd handler thread), kernel (the data file
    /// mapped privately: the host page cache takes the faults), eager (everything copied in
    /// before the guest resumes).
    #[arg(long, value_enum, default_value_t = RestoreModeArg::Vcpu, requires = "restore")]
    restore_mode: RestoreModeArg,

    /// How much of the snapshot --restore checks before the guest runs: full (every page
    /// against its checksum: a damaged page is refused, at the cost of reading all of
    /// memory.img first) or meta (manifest, runs.bin, vCPU and device files; pages are not read
    /// ahead, and a lazy restore starts in milliseconds).
    #[arg(long, value_enum, default_value_t = RestoreVerify::Full, requires = "restore")]
    restore_verify: RestoreVerify,

    /// With --restore: ws replays the working set a previous restore of the same snapshot
    /// recorded (its ws.bin), on a thread of its own ahead of the guest; none serves first
    /// touches only, and records the order they came in (vcpu and handler modes) into ws.bin.
    #[arg(long, value_enum, default_value_t = Prefetch::None, requires = "restore")]
    prefetch: Prefetch,
}

/// `--prefetch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Prefetch {
    None,
    Ws,
}

/// `--restore-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RestoreModeArg {
    Vcpu,
    Handler,
    Kernel,
    Eager,
}

/// `--restore-verify`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RestoreVerify {
    Full,
    Meta,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Hello,
    Touch,
    Hotplug,
    Exit,
    Spin,
    TripleFault,
    BadPort,
    BadMmio,
    Hlt,
    Race,
    Xadd,
    Pattern,
}

impl Workload {
    fn id(self) -> Option<u32> {
        use abi::workload as w;
        Some(match self {
            Workload::Hello => w::HELLO,
            Workload::Touch => w::TOUCH,
            Workload::Hotplug => w::HOTPLUG,
            Workload::Exit => w::EXIT,
            Workload::Spin => w::SPIN,
            Workload::TripleFault => w::TRIPLE_FAULT,
            Workload::BadPort => w::BAD_PORT,
            Workload::BadMmio => w::BAD_MMIO,
            Workload::Hlt => w::HLT,
            Workload::Race => w::RACE,
            Workload::Xadd => w::XADD,
            Workload::Pattern => w::PATTERN,
        })
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Run(args) => ExitCode::from(cmd_run(args, process_start)),
        Command::Ctl(args) => ExitCode::from(control::client::run(&args)),
        Command::Stress(args) => ExitCode::from(stress::cmd_stress(args, process_start)),
        Command::Summarize(args) => ExitCode::from(summarize::cmd_summarize(&args)),
    }
}

fn cmd_run(args: RunArgs, process_start: Instant) -> u8 {
    let Some(workload) = args.workload.id() else {
        eprintln!(
            "vmm: --workload {}: not implemented yet; use hello",
            args.workload
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default()
        );
        return EXIT_FAILURE;
    };
    if args.rewrite && (workload != abi::workload::PATTERN || args.restore.is_some()) {
        eprintln!(
            "vmm: --rewrite is for a fresh --workload pattern guest (a restored one keeps what it was started with)"
        );
        return EXIT_USAGE;
    }
    if args.thp && args.ram_backing == RamBacking::Hugetlb {
        eprintln!("vmm: --thp is for anonymous or memfd RAM; hugetlb RAM is on huge pages already");
        return EXIT_USAGE;
    }
    if args.ram_backing == RamBacking::Hugetlb && args.mem % (2 << 20) != 0 {
        eprintln!(
            "vmm: --ram-backing hugetlb needs --mem to be a multiple of 2M (got {} bytes)",
            args.mem
        );
        return EXIT_USAGE;
    }
    let restore = match &args.restore {
        None => None,
        Some(dir) => {
            let verify = match args.restore_verify {
                RestoreVerify::Full => snapshot::Verify::Full,
                RestoreVerify::Meta => snapshot::Verify::Meta,
            };
            if args.prefetch == Prefetch::Ws && args.restore_mode == RestoreModeArg::Eager {
                eprintln!("vmm: --prefetch ws is for the lazy restore modes (vcpu, handler, kernel): eager copies everything in before the guest runs");
                return EXIT_USAGE;
            }
            let loaded = snapshot::load(dir, verify).and_then(|s| {
                let prefetch = match args.prefetch {
                    Prefetch::Ws => Some(snapshot::read_working_set(&s)?),
                    Prefetch::None => None,
                };
                Ok((s, prefetch))
            });
            tracing::debug!(
                ms = process_start.elapsed().as_secs_f64() * 1e3,
                "set-up: snapshot loaded and checked"
            );
            match loaded {
                Ok((s, prefetch)) => Some(vm::Restore {
                    snapshot: s,
                    mode: match args.restore_mode {
                        RestoreModeArg::Vcpu => vm::RestoreMode::Vcpu,
                        RestoreModeArg::Handler => vm::RestoreMode::Handler,
                        RestoreModeArg::Kernel => vm::RestoreMode::Kernel,
                        RestoreModeArg::Eager => vm::RestoreMode::Eager,
                    },
                    passes: args.passes,
                    pages: args.pages,
                    prefetch,
                }),
                Err(e) => {
                    eprintln!("vmm: --restore: {e}");
                    return EXIT_FAILURE;
                }
            }
        }
    };
    let sidecars = vm::Sidecars::default();
    if let Some(sock) = &args.api_sock {
        // Bound before the VM is built, so that a live socket refuses the start at once.
        let listener = match control::server::bind(sock) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("vmm: {e}");
                return EXIT_FAILURE;
            }
        };
        sidecars.push(control::sidecar(
            listener,
            control::Config {
                max_regions: args.max_regions as usize,
                max_hotplug_bytes: args.max_hotplug_mem,
                max_clients: args.max_clients as usize,
                client_idle_timeout: args.client_idle_timeout,
                vcpus: restore
                    .as_ref()
                    .map_or(args.vcpus, |r| r.snapshot.manifest.shape.vcpus),
            },
        ));
    }
    let shape = restore.as_ref().map(|r| r.snapshot.manifest.shape.clone());
    let cfg = RunConfig {
        kvm_dev: args.kvm_dev,
        vcpus: shape.as_ref().map_or(args.vcpus, |s| s.vcpus),
        mem_bytes: shape.as_ref().map_or(args.mem, |s| s.mem_bytes),
        kernel: args.kernel,
        workload: shape.as_ref().map_or(workload, |s| s.workload),
        params: {
            // params[2]: `touch` rounds (0 = 1) or `pattern` passes. The access pattern comes
            // after it, for `touch` only: `pattern` keeps params[3..] for the words a restore
            // changes (`abi::pattern_params`).
            let mut p = vec![u64::from(args.exit_status), args.pages, args.passes];
            if shape.is_none() && workload != abi::workload::PATTERN {
                p.extend(args.pattern.params(1));
            }
            if shape.is_none() && workload == abi::workload::PATTERN && args.rewrite {
                use abi::pattern_params as pp;
                p.resize(pp::REWRITE + 1, 0);
                p[pp::REWRITE] = 1;
            }
            p
        },
        timeout: (!args.timeout.is_zero()).then_some(args.timeout),
        process_start,
        fault_mode: args.fault_mode.into(),
        fault_around: args.fault_around,
        thp: args.thp,
        address_space: shape
            .as_ref()
            .map_or(args.address_space.into(), |s| s.address_space),
        ram_backing: shape
            .as_ref()
            .map_or(args.ram_backing.into(), |s| s.ram_backing),
        memslots: shape.as_ref().map_or(args.memslots.into(), |s| s.memslots),
        // Only a VM with a control socket can map memory at run time: others need no window.
        // A restored VM gets the window its snapshot's regions lie in.
        hotplug_window: match &shape {
            Some(s) => s.hotplug_window,
            None if args.api_sock.is_some() => args.hotplug_window,
            None => 0,
        },
        sidecars,
        restore,
        floor: false,
        control_sched: args.control_sched.into(),
    };
    let pattern = cfg.workload == abi::workload::PATTERN;
    let restored = cfg.restore.is_some();
    let json_summary = args.json;
    let ws_pages = args.pages;
    let hotplug = cfg.workload == abi::workload::HOTPLUG;
    let touch = matches!(
        args.workload,
        Workload::Touch | Workload::Race | Workload::Xadd
    );
    let label = match args.workload {
        Workload::Race => "race",
        Workload::Xadd => "xadd",
        _ => "touch",
    };
    let report = match vm::run(&cfg, Box::new(std::io::stdout())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm: {e}");
            return EXIT_FAILURE;
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    match report.first_line {
        Some(t) => tracing::info!(
            "boot: first serial line {:.2} ms after process start; run ended after {:.2} ms",
            ms(t),
            ms(report.total)
        ),
        None => tracing::info!(
            "boot: no serial line; run ended {:.2} ms after process start",
            ms(report.total)
        ),
    }
    if !report.stuck.is_empty() {
        eprintln!(
            "vmm: warning: vcpus {:?} did not stop within 2 s of being kicked",
            report.stuck
        );
    }
    let (e, g) = (report.exits, &report.rcu);
    tracing::info!(
        "exits: {} (io {}, mmio {}, memory-fault {}, efault {}, interrupted {}, other {}); rcu: {} grace periods, p99 {} ns",
        e.total(), e.io, e.mmio, e.memory_fault, e.efault, e.interrupted, e.other,
        g.grace_periods, g.grace_period_latency.quantile_ns(0.99)
    );
    let c = report.counters;
    if c.open_bus_reads + c.open_bus_writes > 0 {
        eprintln!(
            "vmm: open bus: {} reads, {} writes of unmapped guest-physical addresses",
            c.open_bus_reads, c.open_bus_writes
        );
    }
    if c.readonly_writes > 0 {
        eprintln!(
            "vmm: {} guest writes to read-only memory were dropped",
            c.readonly_writes
        );
    }
    let mut touch_failed = false;
    let mut touch_json = serde_json::Value::Null;
    let mut restore_json = serde_json::Value::Null;
    if let Some(at) = report.resumed_at {
        let r = summary::RestoreSummary::new(&report, at, ws_pages);
        eprintln!("{r}");
        restore_json = r.json();
    }
    if pattern {
        let passes: u64 = report.results.iter().map(|r| r.passes()).sum();
        let errors: u64 = report.results.iter().map(|r| r.verify_errors).sum();
        let done = report.results.iter().filter(|r| r.done != 0).count();
        eprintln!(
            "pattern: {} vCPUs, {} pages each, {passes} verify passes in all, {errors} wrong words, {done} vCPUs done{}",
            report.results.len(),
            report.results.first().map_or(0, |r| r.pages),
            if restored { " (restored)" } else { "" }
        );
        touch_failed = errors > 0;
    }
    if hotplug {
        let s = control::hotplug_summary(&report.results);
        eprintln!("{s}");
        touch_failed = s.verify_errors > 0 || s.stale_reads > 0;
    }
    if touch && matches!(report.outcome, RunOutcome::Exited(0)) {
        let s = summary::TouchSummary::new(&report, label);
        eprintln!("{s}");
        touch_failed = s.verify_errors > 0 || s.vcpus_done < report.results.len();
        touch_json = serde_json::json!({
            "workload": label, "vcpus_done": s.vcpus_done, "pages": s.pages,
            "verify_errors": s.verify_errors, "faults": s.faults,
            "pages_populated": s.pages_populated, "populate_races": s.populate_races,
            "latency_ns": s.latency_ns.map(|[p50, p99, p999, max]| serde_json::json!(
                {"p50": p50, "p99": p99, "p999": p999, "max": max})),
        });
    }
    // `--json`: one object on the last line of stdout, after the guest's console.
    let summary_json = json_summary.then(|| {
        let (outcome, diagnosis) = match &report.outcome {
            RunOutcome::Exited(_) => ("exited", None),
            RunOutcome::AllParked => ("all_parked", None),
            RunOutcome::SnapshotStopped => ("snapshot_stopped", None),
            RunOutcome::Fatal(d) => ("fatal", Some(d.to_string())),
            RunOutcome::TimedOut { .. } => ("timed_out", None),
            RunOutcome::SetupFailed { message, .. } => ("setup_failed", Some(message.clone())),
            RunOutcome::HandlerFailed { message } => ("handler_failed", Some(message.clone())),
        };
        let e = report.exits;
        serde_json::json!({
            "outcome": outcome,
            "diagnosis": diagnosis,
            "fault_mode": report.fault_mode.name(),
            "exits": {"total": e.total(), "io": e.io, "mmio": e.mmio,
                      "memory_fault": e.memory_fault, "efault": e.efault,
                      "interrupted": e.interrupted, "other": e.other},
            "faults": {"serviced": c.faults, "unannotated": c.unannotated_faults,
                       "pages_populated": c.pages_populated,
                       "populate_races": c.populate_races,
                       "huge_fills": c.huge_fills,
                       "open_bus_reads": c.open_bus_reads,
                       "open_bus_writes": c.open_bus_writes,
                       "readonly_writes": c.readonly_writes},
            "touch": touch_json,
            "restore": restore_json,
            "first_line_ms": report.first_line.map(ms),
            "total_ms": ms(report.total),
        })
    });
    let status = match report.outcome {
        RunOutcome::Exited(0) if touch_failed => EXIT_FAILURE,
        RunOutcome::SnapshotStopped if touch_failed => EXIT_FAILURE,
        RunOutcome::SnapshotStopped => {
            eprintln!("vmm: the VM stopped after a snapshot (vmm ctl snapshot --stop)");
            0
        }
        RunOutcome::Exited(status) => status,
        RunOutcome::AllParked => {
            tracing::info!("every vCPU parked without an exit status: exiting 0");
            0
        }
        RunOutcome::Fatal(d) => {
            eprintln!("vmm: {d}");
            EXIT_FAILURE
        }
        RunOutcome::TimedOut { after, rips } => {
            let mut where_ = rips
                .iter()
                .take(8)
                .map(|(i, rip)| format!("vcpu {i} rip={rip:#x}"))
                .collect::<Vec<_>>()
                .join(", ");
            if rips.len() > 8 {
                where_.push_str(&format!(", and {} more", rips.len() - 8));
            }
            eprintln!(
                "vmm: timeout: guest still running after {} s (--timeout); stopped it: {where_}",
                after.as_secs_f64()
            );
            EXIT_TIMEOUT
        }
        RunOutcome::SetupFailed { vcpu, message } => {
            eprintln!("vmm: vcpu {vcpu}: setup failed: {message}");
            EXIT_FAILURE
        }
        RunOutcome::HandlerFailed { message } => {
            eprintln!("vmm: the userfaultfd handler could not serve a guest access: {message}");
            EXIT_FAILURE
        }
    };
    if let Some(mut j) = summary_json {
        j["status"] = status.into();
        println!("{j}");
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli = Cli::try_parse_from(["vmm", "run"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.vcpus, 2);
        assert_eq!(a.mem, 256 << 20);
        assert_eq!(a.workload, Workload::Hello);
        assert_eq!(a.fault_mode, FaultMode::Vcpu);
        assert_eq!(a.fault_around, memory::FaultAround::Adaptive);
        assert_eq!(a.pattern, Pattern::Sequential);
        assert!(!a.thp);
        assert_eq!(a.address_space, AddressSpace::Bonsai);
        assert_eq!(a.timeout, Duration::from_secs(60));
    }

    #[test]
    fn run_flags() {
        let cli = Cli::try_parse_from([
            "vmm",
            "run",
            "--vcpus",
            "4",
            "--mem",
            "1G",
            "--workload",
            "triple-fault",
            "--fault-mode",
            "handler",
            "--fault-around",
            "16",
            "--address-space",
            "cow",
            "--api-sock",
            "/tmp/s",
            "--timeout",
            "0.5",
            "-v",
        ])
        .unwrap();
        assert_eq!(cli.verbose, 1);
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.vcpus, 4);
        assert_eq!(a.mem, 1 << 30);
        assert_eq!(a.workload, Workload::TripleFault);
        assert_eq!(a.timeout, Duration::from_millis(500));
        for bad in [
            &["vmm", "run", "--vcpus", "0"][..],
            &["vmm", "run", "--mem", "lots"],
            &["vmm", "run", "--workload", "dance"],
            &["vmm", "run", "--fault-around", "0"],
            &["vmm", "run", "--fault-around", "3"],
            &["vmm", "run", "--fault-around", "1024"],
            &["vmm", "run", "--fault-around", "adaptivе"],
            &["vmm", "run", "--pattern", "stride:0"],
            &["vmm", "run", "--pattern", "stride:"],
            &["vmm", "run", "--pattern", "zigzag"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let Command::Run(a) = Cli::try_parse_from([
            "vmm",
            "run",
            "--fault-around",
            "16",
            "--pattern",
            "stride:16",
            "--thp",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        assert_eq!(a.fault_around, memory::FaultAround::Fixed(16));
        assert_eq!(a.pattern, Pattern::Stride(16));
        assert_eq!(a.pattern.name(), "stride:16");
        assert!(a.thp);
        for p in ["sequential", "reverse", "random", "hotcold", "stride:2"] {
            assert_eq!(Pattern::parse(p).unwrap().name(), p);
        }
    }
}
