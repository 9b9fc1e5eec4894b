//! `vmm stress`: fault storms under region churn.
//!
//! One *run* boots the built-in guest with the `touch` workload: every vCPU first-touches its
//! own `--pages` pages of lazily backed RAM (each store timed with rdtsc into a histogram),
//! then reads them back (verify). Before any vCPU starts, `--regions` small regions are mapped
//! far above RAM, so that every lookup walks a tree of that many regions. With `--churn`, a
//! companion thread (an RCU writer, see [`churn`]) maps, unmaps, splits and protects other
//! regions, in an area above those, at that rate for as long as the guest runs.
//!
//! `--duration` repeats runs, each on a fresh VM (so every run is a new storm of first
//! touches: re-touching pages that are present would measure nothing), until that much time
//! has passed. Figures are summed over runs; `seconds` is the touching time measured by the
//! guest (per run, the slowest vCPU's touch loop; boot and verify are excluded), and
//! `faults_per_sec` is first touches per second of it.
#![deny(unsafe_code)]

pub mod churn;
pub mod report;
pub mod svg;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use crate::memory::{self, Backing};
use crate::vm::{self, RunConfig, RunOutcome, Sidecars};
use report::{Aggregate, RunFigures, StressReport};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Size of each extra region; they lie side by side (so that their host mappings merge into
/// few VMAs: a million regions would otherwise pass the host's limit on mappings).
const EXTRA_BYTES: u64 = 4 << 10;
/// Size of the churn area.
const CHURN_SPAN: u64 = GIB;
/// Most churn regions mapped at once.
const CHURN_MAX_LIVE: usize = 256;

/// `vmm stress` flags.
#[derive(Args, Debug)]
pub struct StressArgs {
    /// Number of vCPUs; each first-touches its own pages.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpus: u32,

    /// Pages each vCPU first-touches per run (guest RAM is sized to fit).
    #[arg(long, value_name = "N", default_value_t = 32768, value_parser = clap::value_parser!(u64).range(1..=(1 << 24)))]
    pub pages: u64,

    /// How first touches are serviced: vcpu (userfaultfd SIGBUS mode, on the faulting vCPU's
    /// thread), handler (userfaultfd handler thread), kernel (the host kernel's own faults).
    #[arg(long, value_enum, default_value_t = crate::cli::FaultMode::Vcpu)]
    pub fault_mode: crate::cli::FaultMode,

    /// Pages populated per fault: adaptive (grows on sequential and strided first touches,
    /// shrinks otherwise), or a fixed aligned window (a power of two, 1 to 512).
    #[arg(long, value_name = "PAGES|adaptive", default_value = "adaptive", value_parser = crate::cli::parse_fault_around)]
    pub fault_around: memory::FaultAround,

    /// The order of each vCPU's first touches: sequential, reverse, stride:N (every N-th
    /// page), random (a random permutation), hotcold (90 % of accesses to 10 % of the pages).
    #[arg(long, value_name = "PATTERN", default_value = "sequential", value_parser = crate::cli::Pattern::parse)]
    pub pattern: crate::cli::Pattern,

    /// Serve first touches at this host's floor instead of through the VMM's fault path: each
    /// vCPU thread knows the page its guest writes next and, on each bare EFAULT, populates
    /// just that page (one UFFDIO_COPY) and re-enters: no decode, no lookup. The least a VMM
    /// serving first touches on the vCPU thread must do here; `vcpu --fault-around 1` over it
    /// is what the VMM's own fault path costs. Needs --fault-mode vcpu, --fault-around 1,
    /// --pattern sequential and anon or memfd RAM.
    #[arg(long)]
    pub floor: bool,

    /// Transparent huge pages on guest RAM (madvise MADV_HUGEPAGE; anon or memfd RAM): with
    /// --fault-mode kernel, the host kernel's own best case; in vcpu and handler modes, a
    /// fault-around window that covers a whole aligned 2 MiB of anon RAM is filled with one
    /// zeroed huge page, moved in (UFFDIO_MOVE)
    #[arg(long)]
    pub thp: bool,

    /// What backs guest RAM: anon, memfd, or hugetlb (2 MiB huge pages, populated whole).
    #[arg(long, value_enum, default_value_t = crate::cli::RamBacking::Anon)]
    pub ram_backing: crate::cli::RamBacking,

    /// Address-space implementation: bonsai (RCU balanced tree), rwlock (RwLock<BTreeMap>),
    /// cow (copy-on-write map published with arc-swap).
    #[arg(long, value_enum, default_value_t = crate::cli::AddressSpace::Bonsai)]
    // This text is `--help`'s, where `RwLock<BTreeMap>` is plain text, not an HTML tag.
    #[allow(rustdoc::invalid_html_tags)]
    pub address_space: crate::cli::AddressSpace,

    /// Churn operations per second: map (2-64 pages, populated), unmap, split (unmap a
    /// middle part) and protect of regions the guest does not touch; 0 = no churn.
    #[arg(long, value_name = "OPS_PER_SEC", default_value_t = 0)]
    pub churn: u64,

    /// Whether the churn thread populates each region it maps (true: as a hot-plugged region
    /// the guest used would be, so that unmapping, splitting and protecting it have pages to
    /// free or change). false times the mapping change alone: no page to free, no TLB flush.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub churn_populate: bool,

    /// Unmaps (whole regions and middle parts) the churn thread gathers into one batched
    /// unmap (`AddressSpace::unmap_many`: one grace period, and one TLB flush for the pages of
    /// all of them where the host allows it). 1 = each unmap alone. Each range still counts
    /// as one operation of the `--churn` rate.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub churn_batch: u64,

    /// Which operations the churn thread does, comma-separated. map and unmap are always in
    /// (they make the churn); split or protect left out is never picked, and the others keep
    /// their proportions, to see what each kind of operation costs the guest.
    #[arg(long, value_name = "OPS", value_enum, value_delimiter = ',', default_values_t = [ChurnOp::Map, ChurnOp::Unmap, ChurnOp::Split, ChurnOp::Protect])]
    pub churn_ops: Vec<ChurnOp>,

    /// Extra regions mapped before the guest starts (4 KiB each, side by side at the start of
    /// the hot-plug window), so that lookups walk a real tree. Up to 1,000,000 with
    /// `--memslots window`; up to 30,000 per region (KVM's memslots).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub regions: u64,

    /// How guest memory is laid onto KVM memslots: window (the hot-plug window covers the
    /// extra regions and the churn area; churn changes no memslot) or per-region.
    #[arg(long, value_enum, default_value_t = crate::cli::Memslots::Window)]
    pub memslots: crate::cli::Memslots,

    /// How the churn thread (and the progress monitor) are scheduled beside the vCPUs: batch
    /// (SCHED_BATCH: waking for an operation or at the end of a grace period does not preempt
    /// a vCPU; pays with the adaptive window, costs at one page per exit), normal, or auto
    /// (batch while the vCPUs exit under 4000 times a second each, normal otherwise; the churn
    /// thread measures before each operation).
    #[arg(long, value_enum, default_value_t = crate::cli::ControlSched::Auto)]
    pub control_sched: crate::cli::ControlSched,

    /// Repeat runs, each on a fresh VM, until this many seconds have passed (0: one run).
    #[arg(long, value_name = "SECONDS", default_value = "0", value_parser = crate::size::parse_timeout)]
    pub duration: Duration,

    /// Print exactly one JSON object on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,

    /// Draw an SVG plot to this file (see --plot-kind).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// What --plot draws: the first-touch latency distribution, or first touches per second
    /// over time.
    #[arg(long, value_enum, default_value_t = PlotKind::Latency)]
    pub plot_kind: PlotKind,

    /// Do not run: the same as `vmm summarize FILE.jsonl [--plot FILE.svg]` (kept as an
    /// alias): a Markdown table of saved `vmm stress --json` reports and restore-benchmark rows.
    #[arg(long, value_name = "FILE.jsonl")]
    pub summarize: Option<PathBuf>,

    /// Seed of the churn thread's random choices and of the random and hotcold patterns.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Give up on a run after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = crate::size::parse_timeout)]
    pub timeout: Duration,

    /// The KVM device.
    #[arg(
        long,
        value_name = "PATH",
        env = "VMM_KVM_DEV",
        default_value = "/dev/kvm"
    )]
    pub kvm_dev: PathBuf,
}

/// What `--plot` draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlotKind {
    /// The first-touch latency distribution.
    Latency,
    /// First touches per second over time.
    Throughput,
}

/// Where the stress regions go in guest-physical space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// First extra region.
    pub extra_base: u64,
    /// Number of extra regions.
    pub extra_count: u64,
    /// Start of the churn area.
    pub churn_base: u64,
    /// Size of the churn area.
    pub churn_span: u64,
}

impl Layout {
    /// Plans the layout above RAM ending at `ram_top`, inside `space_bytes` of guest-physical
    /// space (the identity map): it starts where the hot-plug window does.
    pub fn new(ram_top: u64, regions: u64, space_bytes: u64) -> Result<Self, String> {
        let extra_base = vm::hotplug_window_base(ram_top);
        let churn_base = (extra_base + regions * EXTRA_BYTES + 1).next_multiple_of(GIB);
        let l = Layout {
            extra_base,
            extra_count: regions,
            churn_base,
            churn_span: CHURN_SPAN,
        };
        if churn_base + CHURN_SPAN > space_bytes {
            return Err(format!(
                "--regions {regions}: the extra regions and the churn area need guest-physical \
                 space up to {:#x}, beyond the {} GiB the guest's identity map covers; use fewer \
                 --regions or fewer pages",
                churn_base + CHURN_SPAN,
                space_bytes >> 30
            ));
        }
        Ok(l)
    }

    /// Guest-physical address of extra region `i`.
    pub fn extra(&self, i: u64) -> u64 {
        self.extra_base + i * EXTRA_BYTES
    }

    /// The hot-plug window that covers the extra regions and the churn area, in bytes.
    pub fn window_bytes(&self) -> u64 {
        self.churn_base + self.churn_span - self.extra_base
    }
}

/// Guest RAM for `vcpus` x `pages`: the boot area plus the pages, in 2 MiB steps.
fn mem_bytes(vcpus: u32, pages: u64) -> u64 {
    (abi::layout::BOOT_AREA_END + u64::from(vcpus) * pages * 4096)
        .next_multiple_of(2 * MIB)
        .max(memory::MIN_MEM_BYTES)
}

/// Where guest RAM of `mem` bytes ends in guest-physical space (above the 32-bit hole).
fn ram_top(mem: u64) -> u64 {
    if mem > abi::layout::HOLE_START {
        mem + (abi::layout::HOLE_END - abi::layout::HOLE_START)
    } else {
        mem
    }
}

/// Guest RAM pages (page numbers) of a VM with `mem` bytes: below the 32-bit hole after the
/// boot area, and above it.
fn ram_pages(mem: u64) -> [(u64, u64); 2] {
    use abi::layout::{BOOT_AREA_END, HOLE_END, HOLE_START};
    let low_end = mem.min(HOLE_START);
    let high = mem.saturating_sub(HOLE_START);
    [
        (BOOT_AREA_END / 4096, (low_end - BOOT_AREA_END) / 4096),
        (HOLE_END / 4096, high / 4096),
    ]
}

/// Collects the guest's serial output (shown if a run fails).
#[derive(Clone, Default)]
struct SerialBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SerialBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < 64 << 10 {
            v.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Progress shown on a terminal (hidden otherwise).
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(args: &StressArgs) -> Self {
        let visible =
            !args.json && std::io::stderr().is_terminal() && std::io::stdout().is_terminal();
        let bar = if !visible {
            indicatif::ProgressBar::hidden()
        } else if args.duration.is_zero() {
            let b = indicatif::ProgressBar::new(u64::from(args.vcpus) * args.pages);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} pages {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            let b = indicatif::ProgressBar::new(args.duration.as_millis() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {percent}% of --duration {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        };
        bar.enable_steady_tick(Duration::from_millis(100));
        Self { bar }
    }
}

/// `--churn-ops`: one kind of churn operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ChurnOp {
    /// Map a region (2-64 pages).
    Map,
    /// Unmap a whole region.
    Unmap,
    /// Unmap a middle part of a region, leaving two.
    Split,
    /// Make a region read-only, or writable again.
    Protect,
}

/// Samples of one run: (seconds since the command started, pages first-touched so far).
type Samples = Arc<Mutex<Vec<(f64, u64)>>>;

/// Runs `vmm stress`; returns the exit status.
pub fn cmd_stress(args: StressArgs, process_start: Instant) -> u8 {
    if let Some(path) = &args.summarize {
        return crate::summarize::run(path, args.plot.as_deref(), "vmm stress: --summarize");
    }
    if args.thp && args.ram_backing == crate::cli::RamBacking::Hugetlb {
        eprintln!(
            "vmm stress: --thp is for anonymous or memfd RAM; hugetlb RAM is on huge pages already"
        );
        return 2;
    }
    if args.floor
        && (args.fault_mode != crate::cli::FaultMode::Vcpu
            || args.fault_around != memory::FaultAround::Fixed(1)
            || args.pattern != crate::cli::Pattern::Sequential
            || args.ram_backing == crate::cli::RamBacking::Hugetlb
            || args.thp)
    {
        eprintln!(
            "vmm stress: --floor needs --fault-mode vcpu --fault-around 1 --pattern sequential on anon or memfd RAM without --thp (it knows each vCPU's next page only for a sequential scan, one page per exit)"
        );
        return 2;
    }
    if !(args.churn_ops.contains(&ChurnOp::Map) && args.churn_ops.contains(&ChurnOp::Unmap)) {
        eprintln!("vmm stress: --churn-ops must include map and unmap (they make the churn)");
        return 2;
    }
    let started = Instant::now();
    let mut agg = Aggregate::new(StressReport {
        vcpus: args.vcpus,
        fault_mode: args.fault_mode_name().to_owned(),
        fault_mode_requested: args.fault_mode_name().to_owned(),
        ram_backing: memory::Backing::from(args.ram_backing).name().to_owned(),
        memslots: memory::MemslotMode::from(args.memslots).name().to_owned(),
        address_space: memory::AddressSpaceKind::from(args.address_space)
            .name()
            .to_owned(),
        fault_around: args.fault_around.into(),
        pattern: args.pattern.name(),
        thp: args.thp,
        floor: args.floor,
        uffd_always_wake: args.fault_mode == crate::cli::FaultMode::Handler
            && std::env::var_os("VMM_UFFD_ALWAYS_WAKE").is_some_and(|v| v == "1"),
        churn_rate: args.churn,
        churn_populate: args.churn_populate,
        churn_batch: args.churn_batch,
        control_sched: crate::sched::ControlSched::from(args.control_sched)
            .name()
            .to_owned(),
        // In the order of their declaration, by their names on the command line.
        churn_kinds: ChurnOp::value_variants()
            .iter()
            .filter(|o| args.churn_ops.contains(o))
            .filter_map(|o| o.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect(),
        regions: args.regions,
        ..Default::default()
    });
    let progress = Progress::new(&args);
    let mut series: Vec<Vec<(f64, u64)>> = Vec::new();
    loop {
        let samples: Samples = Arc::default();
        let figures = match run_once(&args, process_start, started, &progress, &samples) {
            Ok(f) => f,
            Err(e) => {
                progress.bar.finish_and_clear();
                eprintln!("vmm stress: {e}");
                return 1;
            }
        };
        agg.add(&figures);
        series.push(std::mem::take(
            &mut *samples.lock().unwrap_or_else(|e| e.into_inner()),
        ));
        if started.elapsed() >= args.duration {
            break;
        }
    }
    progress.bar.finish_and_clear();
    let report = agg.finish(started.elapsed().as_secs_f64());
    if args.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("vmm stress: cannot encode the report as JSON: {e}");
                return 1;
            }
        }
    } else {
        println!("{report}");
    }
    if let Some(path) = &args.plot {
        let subtitle = format!(
            "{} vCPUs x {} pages, {}, {} mode, fault-around {}, {}, {} regions, churn {}/s; {} run(s)",
            report.vcpus,
            args.pages,
            report.pattern,
            report.fault_mode,
            report.fault_around,
            report.address_space,
            report.regions,
            report.churn_rate,
            report.runs
        );
        let svg = match args.plot_kind {
            PlotKind::Latency => {
                svg::latency_svg(agg.latency(), "vmm stress: first-touch latency", &subtitle)
            }
            PlotKind::Throughput => {
                svg::throughput_svg(&series, "vmm stress: first touches per second", &subtitle)
            }
        };
        if let Err(e) = std::fs::write(path, svg) {
            eprintln!(
                "vmm stress: --plot {}: cannot write it: {e}",
                path.display()
            );
            return 1;
        }
    }
    if report.rss.churn_residual_bytes > 0 {
        eprintln!(
            "vmm stress: warning: {} bytes stayed resident in the churn area after every churn region was unmapped",
            report.rss.churn_residual_bytes
        );
    }
    if report.verify_errors > 0 {
        eprintln!(
            "vmm stress: the guest found {} pages with wrong contents",
            report.verify_errors
        );
        return 1;
    }
    0
}

impl StressArgs {
    fn fault_mode_name(&self) -> &'static str {
        memory::FaultMode::from(self.fault_mode).name()
    }
}

/// One run on a fresh VM.
fn run_once(
    args: &StressArgs,
    process_start: Instant,
    started: Instant,
    progress: &Progress,
    samples: &Samples,
) -> Result<RunFigures, String> {
    let mem = mem_bytes(args.vcpus, args.pages);
    let top = ram_top(mem);
    let regions = args.regions;
    let sidecars = Sidecars::default();
    sidecars.push_setup(Box::new(move |space| {
        let l = Layout::new(top, regions, space.host().size_bytes())?;
        // The window's memslot now, as part of set-up, even without extra regions.
        space.open_window().map_err(|e| e.to_string())?;
        let extras: Vec<(u64, u64)> = (0..l.extra_count)
            .map(|i| (l.extra(i), EXTRA_BYTES))
            .collect();
        space
            .map_all(&extras, Backing::Anon)
            .map_err(|e| format!("mapping the {regions} extra regions (--regions): {e}"))
    }));
    let churn_shared = churn::new_shared();
    if args.churn > 0 {
        let shared = Arc::clone(&churn_shared);
        let (rate, seed, populate) = (args.churn, args.seed, args.churn_populate);
        let batch = args.churn_batch as usize;
        let (split, protect) = (
            args.churn_ops.contains(&ChurnOp::Split),
            args.churn_ops.contains(&ChurnOp::Protect),
        );
        sidecars.push(Box::new(move |h: vm::VmHandle| {
            let Ok(l) = Layout::new(top, regions, h.space.host().size_bytes()) else {
                return;
            };
            let cfg = churn::ChurnConfig {
                ops_per_sec: rate,
                base: l.churn_base,
                span_bytes: l.churn_span,
                max_live: CHURN_MAX_LIVE,
                seed,
                populate,
                batch,
                split,
                protect,
            };
            churn::run(&h.space, &cfg, &h.stop, &shared, &h.shared);
        }));
    }
    // The monitor: samples progress for the bar and the throughput plot.
    {
        let samples = Arc::clone(samples);
        let bar = progress.bar.clone();
        let churn_ops = Arc::clone(&churn_shared);
        let by_duration = !args.duration.is_zero();
        let ram = ram_pages(mem);
        sidecars.push(Box::new(move |h: vm::VmHandle| {
            let uffd = h.space.uffd().is_some();
            let rss0 = churn::rss_bytes();
            while !h.stop.load(Ordering::Acquire) {
                // `--control-sched auto`, as for the churn thread.
                h.shared.companion_tick();
                // Guest RAM pages the VMM populated (not churn regions'); without userfaultfd
                // the VMM does not know, and the process's RSS growth stands in.
                let pages = if uffd {
                    ram.iter()
                        .map(|&(first, n)| h.space.residency.count_range(first, n))
                        .sum()
                } else {
                    churn::rss_bytes().saturating_sub(rss0) / 4096
                };
                let t = started.elapsed().as_secs_f64();
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((t, pages));
                if by_duration {
                    bar.set_position(started.elapsed().as_millis() as u64);
                } else {
                    bar.set_position(pages);
                }
                bar.set_message(format!(
                    "{} churn ops",
                    churn_ops.ops.load(Ordering::Relaxed)
                ));
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    let serial = SerialBuf::default();
    let cfg = RunConfig {
        kvm_dev: args.kvm_dev.clone(),
        vcpus: args.vcpus,
        mem_bytes: mem,
        kernel: None,
        workload: abi::workload::TOUCH,
        params: {
            let [pattern, arg, seed] = args.pattern.params(args.seed);
            vec![0, args.pages, 1, pattern, arg, seed]
        },
        timeout: (!args.timeout.is_zero()).then_some(args.timeout),
        process_start,
        fault_mode: args.fault_mode.into(),
        fault_around: args.fault_around,
        thp: args.thp,
        address_space: args.address_space.into(),
        ram_backing: args.ram_backing.into(),
        memslots: args.memslots.into(),
        hotplug_window: Layout::new(top, regions, u64::MAX)?.window_bytes(),
        sidecars,
        restore: None,
        floor: args.floor,
        control_sched: args.control_sched.into(),
    };
    let report = vm::run(&cfg, Box::new(serial.clone())).map_err(|e| e.to_string())?;
    let console = || {
        let v = serial.0.lock().unwrap_or_else(|e| e.into_inner());
        let s = String::from_utf8_lossy(&v).trim().to_owned();
        if s.is_empty() {
            String::new()
        } else {
            format!("; guest console: {s}")
        }
    };
    match &report.outcome {
        RunOutcome::Exited(0) | RunOutcome::SnapshotStopped => {}
        RunOutcome::Exited(s) => {
            return Err(format!("the guest exited with status {s}{}", console()))
        }
        RunOutcome::Fatal(d) => return Err(format!("{d}{}", console())),
        RunOutcome::TimedOut { after, .. } => {
            return Err(format!(
                "the run did not finish within --timeout {} s",
                after.as_secs_f64()
            ))
        }
        RunOutcome::SetupFailed { vcpu, message } => {
            return Err(format!("vcpu {vcpu}: setup failed: {message}"))
        }
        RunOutcome::HandlerFailed { message } => {
            return Err(format!(
                "the userfaultfd handler could not serve a guest access: {message}"
            ))
        }
        RunOutcome::AllParked => {
            return Err(format!("every vCPU parked without finishing{}", console()))
        }
    }
    let done: Vec<_> = report.results.iter().filter(|r| r.done != 0).collect();
    if done.len() != report.results.len() {
        return Err(format!(
            "only {} of {} vCPUs finished the touch workload",
            done.len(),
            report.results.len()
        ));
    }
    let max_cycles = done.iter().map(|r| r.touch_cycles).max().unwrap_or(0);
    let touch_seconds = if report.tsc_khz > 0 {
        max_cycles as f64 / (f64::from(report.tsc_khz) * 1e3)
    } else {
        // Unknown TSC rate: fall back to the whole run, boot included.
        report.total.as_secs_f64()
    };
    let churn = (args.churn > 0).then(|| {
        churn_shared
            .result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    });
    Ok(RunFigures {
        pages: done.iter().map(|r| r.pages).sum(),
        vmm_faults: report.counters.faults,
        touch_seconds,
        histogram: report.touch_histogram.clone(),
        tsc_khz: report.tsc_khz,
        verify_errors: done.iter().map(|r| r.verify_errors).sum(),
        counters: report.counters,
        exits: report.exits,
        rcu: Some(report.rcu.clone()),
        churn,
        memslot_changes: report
            .counters
            .memslot_changes
            .saturating_sub(report.memslot_changes_after_setup),
        fault_mode: report.fault_mode.name(),
        vcpu_thread_times: report.vcpu_thread_times,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_stays_inside_the_identity_map() {
        let l = Layout::new(256 * MIB, 1000, 64 * GIB).unwrap();
        assert_eq!(l.extra_base, 4 * GIB, "at the hot-plug window's base");
        assert_eq!(l.extra(999), 4 * GIB + 999 * 4096);
        assert_eq!(l.churn_base, 5 * GIB);
        assert_eq!(l.window_bytes(), 2 * GIB);
        let big = Layout::new(40 * GIB, 1000, 64 * GIB).unwrap();
        assert_eq!(big.extra_base, 40 * GIB);
        let million = Layout::new(256 * MIB, 1_000_000, 64 * GIB).unwrap();
        assert_eq!(
            million.churn_base,
            8 * GIB,
            "a million 4 KiB regions take 3.8 GiB"
        );
        assert!(Layout::new(63 * GIB, 1000, 64 * GIB).is_err());
        assert!(Layout::new(256 * MIB, 0, 64 * GIB).is_ok());
    }

    #[test]
    fn memory_fits_the_pages() {
        assert_eq!(mem_bytes(2, 32768), 264 * MIB);
        assert_eq!(mem_bytes(1, 1), memory::MIN_MEM_BYTES);
        assert_eq!(ram_top(4 * GIB), 5 * GIB);
        let [low, high] = ram_pages(4 * GIB);
        assert_eq!(low, (2048, (3 * GIB - 8 * MIB) / 4096));
        assert_eq!(high, (4 * GIB / 4096, GIB / 4096));
        assert_eq!(ram_pages(264 * MIB)[1].1, 0);
    }
}
