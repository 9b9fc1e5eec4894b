//! What `vmm stress` reports: the JSON object of docs/interface.md (plus extensions), built from
//! the runs' reports, and the human summary.
#![deny(unsafe_code)]

use std::fmt;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::churn::ChurnResult;

/// Latency percentiles of first touches, in ns.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultLatency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

/// Grace-period latency percentiles, in ns.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GraceLatency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// VM exits by reason.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ExitsByReason {
    /// Port I/O.
    pub io: u64,
    /// `KVM_EXIT_MMIO`.
    pub mmio: u64,
    /// `KVM_EXIT_MEMORY_FAULT`.
    pub memory_fault: u64,
    /// Bare `-EFAULT` from `KVM_RUN`, resolved by decoding the instruction.
    pub efault: u64,
    /// Signals.
    pub interrupted: u64,
    /// Anything else.
    pub other: u64,
}

/// Churn operations by kind, summed over runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ChurnSummary {
    /// Regions mapped.
    pub maps: u64,
    /// Whole regions unmapped.
    pub unmaps: u64,
    /// Middle parts unmapped (a region split in two).
    pub splits: u64,
    /// Protection toggles.
    pub protects: u64,
    /// Operations refused by the address space.
    pub failed: u64,
    /// Operations per second achieved.
    pub ops_per_sec: f64,
    /// Bytes populated in churn regions.
    pub populated_bytes: u64,
    /// Most churn regions mapped at once.
    pub peak_live_regions: u64,
    /// Latency of each kind of operation.
    pub op_time: super::churn::OpTimes,
    /// Each operation alone (map without populating the region), ns.
    #[serde(default)]
    pub op_latency_ns: OpLatencies,
    /// A plain anonymous `mmap` + `munmap` of each mapped region's size, untouched, timed by
    /// the churn thread in the same run, ns.
    #[serde(default)]
    pub mmap_baseline_ns: Percentiles2,
    /// Populating mapped regions, ns per 4 KiB page (not part of `op_latency_ns.map`).
    #[serde(default)]
    pub populate_ns_per_page: f64,
    /// The churn thread's time on a CPU while it churned, ns, summed over runs (`None` where
    /// the kernel does not report it: `/proc/thread-self/schedstat`).
    #[serde(default)]
    pub cpu_ns: Option<u64>,
    /// `cpu_ns` over the time it churned: the share of one CPU the churn took.
    #[serde(default)]
    pub cpu_share: Option<f64>,
    /// The churn thread's time runnable but waiting for a CPU while it churned, ns, summed
    /// over runs.
    #[serde(default)]
    pub runqueue_wait_ns: Option<u64>,
    /// The first refusal, if any.
    pub first_error: Option<String>,
}

/// p50, p99 and max of one distribution (ns).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// p50 and p99 of one distribution (ns).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles2 {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
}

impl Percentiles {
    fn of(h: &Option<Histogram<u64>>) -> Self {
        h.as_ref()
            .filter(|h| !h.is_empty())
            .map_or_else(Self::default, |h| Self {
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            })
    }
}

/// Churn operation latency by kind.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct OpLatencies {
    /// map (without populating).
    pub map: Percentiles,
    /// unmap of a whole region.
    pub unmap: Percentiles,
    /// unmap of a middle part.
    pub split: Percentiles,
    /// protect.
    pub protect: Percentiles,
}

/// Host memory around churn.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RssSummary {
    /// Process RSS when churn started (last run).
    pub before_churn_bytes: u64,
    /// Process RSS after every churn region was unmapped (last run; guest RAM touched in the
    /// meantime is still mapped, so this is higher by about the guest's pages).
    pub after_cleanup_bytes: u64,
    /// Bytes still resident in the churn area after the clean-up (most over runs; must be 0).
    pub churn_residual_bytes: u64,
}

/// `fault_around` in the JSON object: a number of pages (a fixed window), or `"adaptive"`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum FaultAroundField {
    /// A fixed window of this many pages.
    Pages(u64),
    /// `"adaptive"`.
    Named(String),
}

impl Default for FaultAroundField {
    fn default() -> Self {
        FaultAroundField::Pages(1)
    }
}

impl From<crate::memory::FaultAround> for FaultAroundField {
    fn from(f: crate::memory::FaultAround) -> Self {
        match f {
            crate::memory::FaultAround::Fixed(n) => FaultAroundField::Pages(n),
            crate::memory::FaultAround::Adaptive => FaultAroundField::Named("adaptive".into()),
        }
    }
}

impl fmt::Display for FaultAroundField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultAroundField::Pages(n) => write!(f, "{n}"),
            FaultAroundField::Named(s) => f.write_str(s),
        }
    }
}

fn sequential() -> String {
    "sequential".to_owned()
}

fn anon() -> String {
    "anon".to_owned()
}

fn yes() -> bool {
    true
}

fn normal() -> String {
    "normal".to_owned()
}

fn one() -> u64 {
    1
}

fn all_churn_ops() -> Vec<String> {
    ["map", "unmap", "split", "protect"]
        .map(String::from)
        .to_vec()
}

/// The `--json` object. The first fields, in order, are the contract's (docs/interface.md);
/// the rest extend it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StressReport {
    /// vCPUs.
    pub vcpus: u32,
    /// The fault mode in effect (after any fallback).
    pub fault_mode: String,
    /// The address-space implementation.
    pub address_space: String,
    /// Fault-around window: pages, or `"adaptive"`.
    pub fault_around: FaultAroundField,
    /// Pages first-touched, over all runs.
    pub pages: u64,
    /// Faults the VMM serviced (`vcpu`/`handler`); in `kernel` mode, first touches.
    pub faults: u64,
    /// Seconds spent first-touching (guest TSC: per run, the slowest vCPU's touch loop),
    /// summed over runs.
    pub seconds: f64,
    /// First touches per second: `pages / seconds`.
    pub faults_per_sec: f64,
    /// First-touch latency, guest-measured (rdtsc around each store).
    pub fault_latency_ns: FaultLatency,
    /// VM exits, all reasons.
    pub exits: u64,
    /// Churn operations done.
    pub churn_ops: u64,
    /// RCU grace periods completed.
    pub grace_periods: u64,
    /// Their latency.
    pub grace_period_ns: GraceLatency,
    /// Pages the guest found with wrong contents.
    pub verify_errors: u64,
    /// Guest accesses to unmapped guest-physical addresses.
    pub open_bus_accesses: u64,
    // ---- extensions ----
    /// The fault mode asked for.
    pub fault_mode_requested: String,
    /// What backs guest RAM: anon, memfd or hugetlb (absent in reports from before the flag:
    /// anon).
    #[serde(default = "anon")]
    pub ram_backing: String,
    /// `--churn`: churn operations per second asked for.
    pub churn_rate: u64,
    /// `--churn-populate`: whether the churn thread populated the regions it mapped.
    #[serde(default = "yes")]
    pub churn_populate: bool,
    /// `--churn-batch`: unmaps gathered into one batched unmap (absent in reports from before
    /// the flag: 1).
    #[serde(default = "one")]
    pub churn_batch: u64,
    /// `--churn-ops`: the kinds of churn operation done (absent in reports from before the
    /// flag: all four).
    #[serde(default = "all_churn_ops")]
    pub churn_kinds: Vec<String>,
    /// `--control-sched`: the churn thread's scheduling policy, `auto`, `batch` or `normal`
    /// (absent in reports from before the flag, which ran normal).
    #[serde(default = "normal")]
    pub control_sched: String,
    /// `--regions`: extra regions mapped up front.
    pub regions: u64,
    /// Runs (fresh VMs) done.
    pub runs: u64,
    /// Wall-clock seconds of the whole command.
    pub wall_seconds: f64,
    /// Guest RAM pages the VMM populated (with fault-around, more than it serviced faults;
    /// churn regions' pages are in `churn.populated_bytes`).
    pub pages_populated: u64,
    /// Populates that found the page already present.
    pub populate_races: u64,
    /// `--thp` in `vcpu` and `handler` modes: whole 2 MiB of guest RAM filled with one zeroed
    /// huge page (moved in) instead of 512 copies of zeroes.
    #[serde(default)]
    pub huge_fills: u64,
    /// Guest writes to read-only memory (dropped).
    pub readonly_writes: u64,
    /// Exits by reason.
    pub exits_by_reason: ExitsByReason,
    /// `synchronize()` calls (grace periods requested, including shared ones).
    pub synchronize_calls: u64,
    /// Churn by kind.
    pub churn: ChurnSummary,
    /// Host memory.
    pub rss: RssSummary,
    /// The TSC frequency used to convert guest cycles (kHz).
    pub tsc_khz: u32,
    /// `--memslots`: `window` or `per-region` (absent in reports from before the flag:
    /// per-region).
    #[serde(default = "per_region")]
    pub memslots: String,
    /// KVM memslot ioctls (installs and deletes) made after set-up, over all runs: 0 in
    /// window mode.
    #[serde(default)]
    pub kvm_memslot_changes: u64,
    /// `--pattern`: the order of the guest's first touches (absent in reports from before the
    /// flag: sequential).
    #[serde(default = "sequential")]
    pub pattern: String,
    /// `pages_populated / pages`: how many pages the VMM populated per page the guest
    /// touched (1.0: nothing fetched in vain); `null` in `kernel` mode, where the VMM does
    /// not populate.
    #[serde(default)]
    pub overfetch: Option<f64>,
    /// `--thp`: guest RAM advised for transparent huge pages.
    #[serde(default)]
    pub thp: bool,
    /// `handler` mode with `VMM_UFFD_ALWAYS_WAKE=1`: the handler thread as before issue 16
    /// (a `UFFDIO_WAKE` after every fault, reads until `EAGAIN`), for comparison.
    #[serde(default)]
    pub uffd_always_wake: bool,
    /// `--floor`: first touches served at the host's floor, not by the VMM's fault path.
    #[serde(default)]
    pub floor: bool,
    /// The vCPU threads' time on a CPU, ns, summed over threads and runs (`None` where the
    /// kernel does not report it: `/proc/thread-self/schedstat`).
    #[serde(default)]
    pub vcpu_cpu_ns: Option<u64>,
    /// The vCPU threads' time runnable but waiting for a CPU, ns, summed likewise: what
    /// other threads (the VMM's own companions or the host's) took from them.
    #[serde(default)]
    pub vcpu_runqueue_wait_ns: Option<u64>,
}

fn per_region() -> String {
    "per-region".to_owned()
}

/// One finished run, as the driver hands it over.
#[derive(Debug, Default)]
pub struct RunFigures {
    /// Pages the guest first-touched.
    pub pages: u64,
    /// VMM-serviced faults.
    pub vmm_faults: u64,
    /// Touch seconds (the slowest vCPU).
    pub touch_seconds: f64,
    /// Guest histogram (cycles buckets).
    pub histogram: Vec<u64>,
    /// Guest TSC kHz.
    pub tsc_khz: u32,
    /// Verify errors.
    pub verify_errors: u64,
    /// Counters.
    pub counters: crate::memory::address_space::CountersSnapshot,
    /// Exits.
    pub exits: crate::vcpu::ExitCounts,
    /// RCU statistics.
    pub rcu: Option<rcu::Stats>,
    /// Churn.
    pub churn: Option<ChurnResult>,
    /// Memslot ioctls after set-up.
    pub memslot_changes: u64,
    /// The fault mode in effect.
    pub fault_mode: &'static str,
    /// The vCPU threads' time on a CPU and waiting for one.
    pub vcpu_thread_times: Option<crate::sched::ThreadTimes>,
}

/// Accumulates runs into a [`StressReport`].
pub struct Aggregate {
    report: StressReport,
    latency: Histogram<u64>,
    grace: Histogram<u64>,
    churn_seconds: f64,
    op_latency: super::churn::OpHistograms,
    mmap_baseline: Option<Histogram<u64>>,
    populate_ns: u64,
}

fn new_hist() -> Histogram<u64> {
    // 3 significant digits, auto-resizing: any ns value fits.
    let mut h = Histogram::new(3).expect("3 significant figures is a valid precision");
    h.auto(true);
    h
}

impl Aggregate {
    /// Starts with the settings of the report filled in.
    pub fn new(base: StressReport) -> Self {
        Self {
            report: base,
            latency: new_hist(),
            grace: new_hist(),
            churn_seconds: 0.0,
            op_latency: Default::default(),
            mmap_baseline: None,
            populate_ns: 0,
        }
    }

    /// Adds one run.
    pub fn add(&mut self, f: &RunFigures) {
        let r = &mut self.report;
        r.runs += 1;
        r.fault_mode = f.fault_mode.to_owned();
        r.pages += f.pages;
        r.faults += if f.fault_mode == "kernel" {
            f.pages
        } else {
            f.vmm_faults
        };
        r.seconds += f.touch_seconds;
        r.tsc_khz = f.tsc_khz;
        if f.tsc_khz > 0 {
            for (b, &n) in f.histogram.iter().enumerate() {
                if n > 0 {
                    let ns = cycles_to_ns(abi::hist_bucket_low(b), f.tsc_khz).max(1);
                    let _ = self.latency.record_n(ns, n);
                }
            }
        }
        r.verify_errors += f.verify_errors;
        r.kvm_memslot_changes += f.memslot_changes;
        if let Some(t) = f.vcpu_thread_times {
            t.add_to(&mut r.vcpu_cpu_ns, &mut r.vcpu_runqueue_wait_ns);
        }
        let c = &f.counters;
        r.open_bus_accesses += c.open_bus_reads + c.open_bus_writes;
        // Guest RAM only: the churn thread's populates are counted in `churn`.
        let churn_pages = f.churn.as_ref().map_or(0, |c| c.populated_bytes / 4096);
        r.pages_populated += c.pages_populated.saturating_sub(churn_pages);
        r.populate_races += c.populate_races;
        r.huge_fills += c.huge_fills;
        r.readonly_writes += c.readonly_writes;
        let e = &f.exits;
        r.exits += e.total();
        let x = &mut r.exits_by_reason;
        x.io += e.io;
        x.mmio += e.mmio;
        x.memory_fault += e.memory_fault;
        x.efault += e.efault;
        x.interrupted += e.interrupted;
        x.other += e.other;
        if let Some(s) = &f.rcu {
            r.grace_periods += s.grace_periods;
            r.synchronize_calls += s.synchronize_calls;
            // Rebuild the samples (at the histogram's resolution) from its quantiles, so that
            // runs merge into one distribution.
            let h = &s.grace_period_latency;
            let n = h.count();
            let step = (n / 20_000).max(1);
            let mut i = 0;
            while i < n {
                let q = (i as f64 + 0.5) / n as f64;
                let _ = self
                    .grace
                    .record_n(h.quantile_ns(q).max(1), step.min(n - i));
                i += step;
            }
        }
        if let Some(c) = &f.churn {
            let s = &mut r.churn;
            s.maps += c.maps;
            s.unmaps += c.unmaps;
            s.splits += c.splits;
            s.protects += c.protects;
            s.failed += c.failed;
            s.populated_bytes += c.populated_bytes;
            s.peak_live_regions = s.peak_live_regions.max(c.peak_live_regions);
            s.op_time.merge(&c.op_time);
            self.op_latency.merge(&c.op_latency);
            super::churn::merge_hist(&mut self.mmap_baseline, &c.mmap_baseline);
            self.populate_ns += c.populate_ns;
            if let Some(t) = c.thread_times {
                t.add_to(&mut s.cpu_ns, &mut s.runqueue_wait_ns);
            }
            if s.first_error.is_none() {
                s.first_error.clone_from(&c.first_error);
            }
            r.churn_ops += c.ops();
            self.churn_seconds += c.seconds;
            r.rss.before_churn_bytes = c.rss_before_bytes;
            r.rss.after_cleanup_bytes = c.rss_after_bytes;
            r.rss.churn_residual_bytes = r.rss.churn_residual_bytes.max(c.residual_bytes);
        }
    }

    /// The latency histogram so far (ns).
    pub fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }

    /// The final report.
    pub fn finish(&self, wall_seconds: f64) -> StressReport {
        let mut r = self.report.clone();
        r.wall_seconds = wall_seconds;
        r.faults_per_sec = if r.seconds > 0.0 {
            r.pages as f64 / r.seconds
        } else {
            0.0
        };
        let l = &self.latency;
        if !l.is_empty() {
            r.fault_latency_ns = FaultLatency {
                p50: l.value_at_quantile(0.5),
                p99: l.value_at_quantile(0.99),
                p999: l.value_at_quantile(0.999),
                max: l.max(),
            };
        }
        let g = &self.grace;
        if !g.is_empty() {
            r.grace_period_ns = GraceLatency {
                p50: g.value_at_quantile(0.5),
                p99: g.value_at_quantile(0.99),
                max: g.max(),
            };
        }
        if self.churn_seconds > 0.0 {
            r.churn.ops_per_sec = r.churn_ops as f64 / self.churn_seconds;
            r.churn.cpu_share = r
                .churn
                .cpu_ns
                .map(|ns| ns as f64 / 1e9 / self.churn_seconds);
        }
        let o = &self.op_latency;
        r.churn.op_latency_ns = OpLatencies {
            map: Percentiles::of(&o.map),
            unmap: Percentiles::of(&o.unmap),
            split: Percentiles::of(&o.split),
            protect: Percentiles::of(&o.protect),
        };
        let b = Percentiles::of(&self.mmap_baseline);
        r.churn.mmap_baseline_ns = Percentiles2 {
            p50: b.p50,
            p99: b.p99,
        };
        r.overfetch = (r.fault_mode != "kernel" && r.pages > 0)
            .then(|| r.pages_populated as f64 / r.pages as f64);
        let pages = r.churn.populated_bytes / 4096;
        if pages > 0 {
            r.churn.populate_ns_per_page = self.populate_ns as f64 / pages as f64;
        }
        r
    }
}

/// Guest TSC cycles to ns.
pub fn cycles_to_ns(cycles: u64, tsc_khz: u32) -> u64 {
    if tsc_khz == 0 {
        return 0;
    }
    (u128::from(cycles) * 1_000_000 / u128::from(tsc_khz)) as u64
}

/// A duration in ns, human-readable.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

pub use crate::size::fmt_bytes;

impl fmt::Display for StressReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self;
        let mode = if r.fault_mode == r.fault_mode_requested {
            r.fault_mode.clone()
        } else {
            format!(
                "{} (fell back from {})",
                r.fault_mode, r.fault_mode_requested
            )
        };
        writeln!(
            f,
            "vmm stress: {} vCPUs, pattern {}, fault mode {mode}{}, fault-around {}, address space {}, {} RAM, {} extra regions, churn {} ops/s: {} run{} in {:.2} s",
            r.vcpus,
            r.pattern,
            match (r.thp, r.floor) {
                (true, _) => " (THP)",
                (false, true) => " at the floor (no fault path)",
                _ => "",
            },
            r.fault_around,
            r.address_space,
            if r.ram_backing.is_empty() { "anon" } else { &r.ram_backing },
            r.regions,
            r.churn_rate,
            r.runs,
            if r.runs == 1 { "" } else { "s" },
            r.wall_seconds
        )?;
        writeln!(
            f,
            "  first touches  {} pages in {:.3} s of touching: {:.0} faults/s ({} faults serviced by the VMM, {} pages populated{}, overfetch {}, {} populate races)",
            r.pages, r.seconds, r.faults_per_sec,
            if r.fault_mode == "kernel" { 0 } else { r.faults },
            r.pages_populated,
            if r.huge_fills > 0 {
                format!(" ({} of them in {} huge pages)", r.huge_fills * 512, r.huge_fills)
            } else {
                String::new()
            },
            r.overfetch.map_or_else(|| "n/a".to_owned(), |o| format!("{o:.3}")),
            r.populate_races
        )?;
        let l = &r.fault_latency_ns;
        writeln!(
            f,
            "  fault latency  p50 {}, p99 {}, p99.9 {}, max {} (guest rdtsc around each first store)",
            fmt_ns(l.p50),
            fmt_ns(l.p99),
            fmt_ns(l.p999),
            fmt_ns(l.max)
        )?;
        let x = &r.exits_by_reason;
        let mut parts = Vec::new();
        for (name, n) in [
            ("efault", x.efault),
            ("mmio", x.mmio),
            ("memory-fault", x.memory_fault),
            ("io", x.io),
            ("interrupted", x.interrupted),
            ("other", x.other),
        ] {
            if n > 0 {
                parts.push(format!("{name} {n}"));
            }
        }
        writeln!(
            f,
            "  exits          {} ({}; {:.2} per page)",
            r.exits,
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(", ")
            },
            if r.pages > 0 {
                r.exits as f64 / r.pages as f64
            } else {
                0.0
            }
        )?;
        if let (Some(cpu), Some(wait)) = (r.vcpu_cpu_ns, r.vcpu_runqueue_wait_ns) {
            writeln!(
                f,
                "  vCPU threads   {} on a CPU, {} waiting for one ({:.1} % of their runnable time)",
                fmt_ns(cpu),
                fmt_ns(wait),
                if cpu + wait > 0 {
                    wait as f64 * 100.0 / (cpu + wait) as f64
                } else {
                    0.0
                }
            )?;
        }
        let c = &r.churn;
        if r.churn_rate > 0 {
            writeln!(
                f,
                "  churn          {} ops at {:.0} ops/s ({} maps, {} unmaps, {} splits, {} protects; {} refused{}); peak {} churn regions",
                r.churn_ops,
                c.ops_per_sec,
                c.maps,
                c.unmaps,
                c.splits,
                c.protects,
                c.failed,
                c.first_error
                    .as_ref()
                    .map(|e| format!(", first: {e}"))
                    .unwrap_or_default(),
                c.peak_live_regions
            )?;
            let t = &c.op_time;
            writeln!(
                f,
                "  churn op time  mean (max): map+populate {} ({}), unmap {} ({}), split {} ({}), protect {} ({})",
                fmt_ns(t.map.mean_ns()),
                fmt_ns(t.map.max_ns),
                fmt_ns(t.unmap.mean_ns()),
                fmt_ns(t.unmap.max_ns),
                fmt_ns(t.split.mean_ns()),
                fmt_ns(t.split.max_ns),
                fmt_ns(t.protect.mean_ns()),
                fmt_ns(t.protect.max_ns)
            )?;
            if let (Some(cpu), Some(share), Some(wait)) =
                (c.cpu_ns, c.cpu_share, c.runqueue_wait_ns)
            {
                writeln!(
                    f,
                    "  churn thread   {} on a CPU ({:.1} % of one), {} waiting for one",
                    fmt_ns(cpu),
                    share * 100.0,
                    fmt_ns(wait)
                )?;
            }
        } else {
            writeln!(f, "  churn          none (--churn 0)")?;
        }
        let g = &r.grace_period_ns;
        writeln!(
            f,
            "  grace periods  {} ({} synchronize calls): p50 {}, p99 {}, max {}",
            r.grace_periods,
            r.synchronize_calls,
            fmt_ns(g.p50),
            fmt_ns(g.p99),
            fmt_ns(g.max)
        )?;
        if r.churn_rate > 0 {
            writeln!(
                f,
                "  host memory    RSS {} when churn started, {} after unmapping every churn region; {} populated in churn regions, {} left resident in the churn area",
                fmt_bytes(r.rss.before_churn_bytes),
                fmt_bytes(r.rss.after_cleanup_bytes),
                fmt_bytes(c.populated_bytes),
                fmt_bytes(r.rss.churn_residual_bytes)
            )?;
        }
        write!(
            f,
            "  verify         {}; open bus {} accesses",
            if r.verify_errors == 0 {
                "ok (0 errors)".to_string()
            } else {
                format!("FAILED ({} pages wrong)", r.verify_errors)
            },
            r.open_bus_accesses
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_sums_runs_and_orders_percentiles() {
        let mut a = Aggregate::new(StressReport {
            vcpus: 2,
            fault_mode_requested: "vcpu".into(),
            ..Default::default()
        });
        let mut hist = vec![0u64; abi::HIST_BUCKETS];
        hist[abi::hist_bucket(10_000)] = 99;
        hist[abi::hist_bucket(1_000_000)] = 1;
        let run = RunFigures {
            pages: 100,
            vmm_faults: 100,
            touch_seconds: 0.5,
            histogram: hist,
            tsc_khz: 1_000_000,
            fault_mode: "vcpu",
            vcpu_thread_times: Some(crate::sched::ThreadTimes {
                cpu_ns: 300,
                wait_ns: 100,
            }),
            ..Default::default()
        };
        a.add(&run);
        a.add(&run);
        let r = a.finish(2.0);
        assert_eq!((r.pages, r.faults, r.runs), (200, 200, 2));
        assert_eq!(
            (r.vcpu_cpu_ns, r.vcpu_runqueue_wait_ns),
            (Some(600), Some(200))
        );
        assert!((r.faults_per_sec - 200.0).abs() < 1e-9);
        let l = r.fault_latency_ns;
        assert!(
            l.p50 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
            "{l:?}"
        );
        // Bucket lower bounds: at most 25% under the sample.
        assert!((7_500..=10_010).contains(&l.p50), "{l:?}");
        assert!(l.max >= 900_000, "{l:?}");
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.starts_with("{\"vcpus\":2,\"fault_mode\":\"vcpu\""),
            "{json}"
        );
        let back: StressReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let text = r.to_string();
        assert!(text.contains("faults/s"), "{text}");
        assert!(
            text.contains("vCPU threads   600 ns on a CPU, 200 ns waiting for one (25.0 %"),
            "{text}"
        );
    }

    #[test]
    fn kernel_mode_counts_first_touches() {
        let mut a = Aggregate::new(StressReport::default());
        a.add(&RunFigures {
            pages: 7,
            vmm_faults: 0,
            fault_mode: "kernel",
            ..Default::default()
        });
        assert_eq!(a.finish(1.0).faults, 7);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_ns(999), "999 ns");
        assert_eq!(fmt_ns(46_900), "46.9 µs");
        assert_eq!(fmt_bytes(3 << 20), "3.0 MiB");
    }
}
