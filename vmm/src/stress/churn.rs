//! The churn thread of `vmm stress`: an RCU writer that maps, unmaps, splits and protects
//! regions the guest never touches, at a given rate, through the same `AddressSpace`
//! operations the control socket uses (so with the ordering rules of docs/memory.md: publish before the
//! memslot, grace period before `munmap`).
//!
//! It keeps its own list of what it mapped. When the run is over (`VmHandle::stop`) it unmaps
//! everything it still has and measures what the host kept: process RSS before churn and
//! after the clean-up, and the resident bytes left in the churn area (read from
//! `/proc/self/smaps`; it must be 0).
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::address_space::PAGE;
use crate::memory::{AddressSpace, AsError, Backing, FaultMode, RegionKind};

/// Each churn region lives in its own slot of this size (so regions never collide).
pub const SLOT_BYTES: u64 = 64 * PAGE;
/// Pages of the largest churn region.
const MAX_REGION_PAGES: u64 = 64;
/// Pages of the smallest churn region.
const MIN_REGION_PAGES: u64 = 2;
/// If the thread falls this far behind its schedule, it drops the backlog instead of
/// bursting to catch up.
const MAX_LAG: Duration = Duration::from_millis(50);

/// What the churn thread does.
#[derive(Clone, Debug)]
pub struct ChurnConfig {
    /// Operations per second (> 0).
    pub ops_per_sec: u64,
    /// First guest-physical address of the churn area.
    pub base: u64,
    /// Size of the churn area (a multiple of [`SLOT_BYTES`]).
    pub span_bytes: u64,
    /// Most regions the thread keeps mapped at once.
    pub max_live: usize,
    /// Seed of its random choices.
    pub seed: u64,
    /// Populate each mapped region (`--churn-populate`).
    pub populate: bool,
    /// Unmaps gathered into one batched unmap (`--churn-batch`; 1 = each alone).
    pub batch: usize,
    /// Split regions (`--churn-ops`; else splits are never picked).
    pub split: bool,
    /// Protect regions (`--churn-ops`; else protects are never picked).
    pub protect: bool,
}

/// What the churn thread did (one run).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnResult {
    /// Regions mapped.
    pub maps: u64,
    /// Whole regions unmapped (during the run, not counting the final clean-up).
    pub unmaps: u64,
    /// Middle parts unmapped, splitting a region in two.
    pub splits: u64,
    /// Protection toggles (read-only / writable).
    pub protects: u64,
    /// Operations the address space refused (counted, not retried).
    pub failed: u64,
    /// Seconds the thread churned (until the run was over).
    pub seconds: f64,
    /// Bytes the thread populated in the regions it mapped (so that unmapping has memory to
    /// free).
    pub populated_bytes: u64,
    /// Most regions it had mapped at once.
    pub peak_live_regions: u64,
    /// Regions unmapped in the final clean-up.
    pub cleanup_unmaps: u64,
    /// Process RSS when churn started (bytes).
    pub rss_before_bytes: u64,
    /// Process RSS after the clean-up (bytes).
    pub rss_after_bytes: u64,
    /// Bytes still resident in the churn area after the clean-up (must be 0).
    pub residual_bytes: u64,
    /// Time spent in each kind of operation (map includes populating the region).
    pub op_time: OpTimes,
    /// Each operation alone (map without populating), in ns, by kind.
    #[serde(skip)]
    pub op_latency: OpHistograms,
    /// A plain anonymous `mmap` + `munmap` of each mapped region's size, untouched, in ns.
    #[serde(skip)]
    pub mmap_baseline: Option<hdrhistogram::Histogram<u64>>,
    /// Time spent populating mapped regions, ns (see `populated_bytes`).
    pub populate_ns: u64,
    /// The thread's time on a CPU and waiting for one while it churned (`None` where the
    /// kernel does not report them).
    pub thread_times: Option<crate::sched::ThreadTimes>,
    /// The first refusal, if any.
    pub first_error: Option<String>,
}

/// Mean and largest latency of one kind of operation.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct OpTime {
    /// Operations timed.
    pub count: u64,
    /// Their total, ns.
    pub total_ns: u64,
    /// The slowest, ns.
    pub max_ns: u64,
}

impl OpTime {
    fn add(&mut self, d: Duration) {
        let ns = d.as_nanos() as u64;
        self.count += 1;
        self.total_ns += ns;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Merges another run's.
    pub fn merge(&mut self, o: &OpTime) {
        self.count += o.count;
        self.total_ns += o.total_ns;
        self.max_ns = self.max_ns.max(o.max_ns);
    }

    /// Mean, ns.
    pub fn mean_ns(&self) -> u64 {
        self.total_ns.checked_div(self.count).unwrap_or(0)
    }
}

/// Latency distributions of the churn operations by kind (ns; `None` until one is recorded).
#[derive(Clone, Debug, Default)]
pub struct OpHistograms {
    /// map alone.
    pub map: Option<hdrhistogram::Histogram<u64>>,
    /// unmap of a whole region.
    pub unmap: Option<hdrhistogram::Histogram<u64>>,
    /// unmap of a middle part.
    pub split: Option<hdrhistogram::Histogram<u64>>,
    /// protect.
    pub protect: Option<hdrhistogram::Histogram<u64>>,
}

/// Records `d` (ns) in `h`, creating it on first use.
pub fn record(h: &mut Option<hdrhistogram::Histogram<u64>>, d: Duration) {
    let h = h.get_or_insert_with(|| {
        let mut h = hdrhistogram::Histogram::new(3).expect("3 significant figures is valid");
        h.auto(true);
        h
    });
    let _ = h.record((d.as_nanos() as u64).max(1));
}

/// Merges `from` into `into`.
pub fn merge_hist(
    into: &mut Option<hdrhistogram::Histogram<u64>>,
    from: &Option<hdrhistogram::Histogram<u64>>,
) {
    if let Some(f) = from {
        match into {
            Some(i) => {
                let _ = i.add(f);
            }
            None => *into = Some(f.clone()),
        }
    }
}

impl OpHistograms {
    /// Merges another run's.
    pub fn merge(&mut self, o: &OpHistograms) {
        merge_hist(&mut self.map, &o.map);
        merge_hist(&mut self.unmap, &o.unmap);
        merge_hist(&mut self.split, &o.split);
        merge_hist(&mut self.protect, &o.protect);
    }
}

/// Latency of the churn operations by kind.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct OpTimes {
    /// map (+ populate).
    pub map: OpTime,
    /// unmap of a whole region.
    pub unmap: OpTime,
    /// unmap of a middle part.
    pub split: OpTime,
    /// protect.
    pub protect: OpTime,
}

impl OpTimes {
    /// Merges another run's.
    pub fn merge(&mut self, o: &OpTimes) {
        self.map.merge(&o.map);
        self.unmap.merge(&o.unmap);
        self.split.merge(&o.split);
        self.protect.merge(&o.protect);
    }
}

impl ChurnResult {
    /// Operations done (map, unmap, split, protect).
    pub fn ops(&self) -> u64 {
        self.maps + self.unmaps + self.splits + self.protects
    }
}

/// Shared between the churn thread and the driver.
#[derive(Debug, Default)]
pub struct ChurnShared {
    /// Operations done so far (for the progress bar).
    pub ops: AtomicU64,
    /// The result, once the thread is done.
    pub result: Mutex<Option<ChurnResult>>,
}

/// An unmap waiting for its batch: a whole region, or the middle part of one (a split).
#[derive(Clone, Copy, Debug)]
struct Pending {
    gpa: u64,
    size: u64,
    split: bool,
}

#[derive(Clone, Copy, Debug)]
struct Live {
    gpa: u64,
    size: u64,
    readonly: bool,
}

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

pub use crate::memory::host::rss_bytes;

/// Bytes resident in host virtual memory `[start, end)`, summed over the mappings of
/// `/proc/self/smaps` that intersect it (each counted in proportion to the overlap when it
/// extends beyond). `None` if smaps cannot be read.
pub fn resident_in(start: u64, end: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut total = 0u64;
    let mut cur: Option<(u64, u64)> = None;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Rss:") {
            if let Some((s, e)) = cur {
                let kb: u64 = rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                let (lo, hi) = (s.max(start), e.min(end));
                if hi > lo {
                    // A mapping wholly inside counts whole; one that sticks out, pro rata.
                    total += (kb * 1024).min(hi - lo);
                }
            }
            continue;
        }
        let Some(range) = line.split_whitespace().next() else {
            continue;
        };
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                cur = Some((a, b));
            }
        }
    }
    Some(total)
}

/// The churn loop: runs until `stop`, then cleans up and stores its result in `shared`.
pub fn run(
    space: &AddressSpace,
    cfg: &ChurnConfig,
    stop: &std::sync::atomic::AtomicBool,
    shared: &ChurnShared,
    vm: &crate::vcpu::VcpuShared,
) {
    let mut res = ChurnResult {
        rss_before_bytes: rss_bytes(),
        ..Default::default()
    };
    let slots = cfg.span_bytes / SLOT_BYTES;
    let mut free: Vec<u64> = (0..slots).collect();
    // Pieces of live regions per slot: a slot is free again when its last piece goes.
    let mut pieces = vec![0u32; slots as usize];
    let mut live: Vec<Live> = Vec::new();
    let mut rng = Rng(cfg.seed.max(1) ^ 0x9e37_79b9_7f4a_7c15);
    let populate = cfg.populate && space.fault_mode() != FaultMode::Kernel;
    let interval = Duration::from_secs_f64(1.0 / cfg.ops_per_sec.max(1) as f64);
    let start = Instant::now();
    let times0 = crate::sched::ThreadTimes::now();
    let mut next = start;
    let note = |res: &mut ChurnResult, e: String| {
        res.failed += 1;
        if res.first_error.is_none() {
            res.first_error = Some(e);
        }
    };
    let slot_of = |gpa: u64| ((gpa - cfg.base) / SLOT_BYTES) as usize;
    // Unmaps waiting to go in one batch (`cfg.batch` > 1). Their ranges are already out of
    // `live`, so nothing else picks them, and their slots stay taken until they are done.
    let mut pending: Vec<Pending> = Vec::new();
    let flush = |pending: &mut Vec<Pending>,
                 res: &mut ChurnResult,
                 pieces: &mut Vec<u32>,
                 free: &mut Vec<u64>| {
        if pending.is_empty() {
            return;
        }
        let ranges: Vec<(u64, u64)> = pending.iter().map(|p| (p.gpa, p.size)).collect();
        let (batch_time, outcomes) = unmap_ranges(space, &ranges);
        // Each range's share of the batch.
        let share = batch_time / ranges.len() as u32;
        for (p, r) in pending.drain(..).zip(outcomes) {
            if let Err(e) = r {
                note(res, e.to_string());
                continue;
            }
            if p.split {
                res.splits += 1;
                record(&mut res.op_latency.split, share);
                res.op_time.split.add(share);
            } else {
                res.unmaps += 1;
                record(&mut res.op_latency.unmap, share);
                res.op_time.unmap.add(share);
                drop_piece(pieces, free, slot_of(p.gpa));
            }
        }
    };
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
            continue;
        }
        next += interval;
        if now.saturating_duration_since(next) > MAX_LAG {
            next = now;
        }
        // `--control-sched auto`: batch or not, by how often the vCPUs exit.
        vm.companion_tick();
        // Pick an operation: map while there is little, unmap when there is a lot. Weights
        // of map, unmap, split, protect; kinds left out (`--churn-ops`) are never picked, and
        // the others keep their proportions.
        let (split, protect) = (u64::from(cfg.split), u64::from(cfg.protect));
        let weights = if live.is_empty() || (!free.is_empty() && live.len() < 4) {
            [1, 0, 0, 0]
        } else if live.len() >= cfg.max_live || free.is_empty() {
            [0, 50, 0, 50 * protect]
        } else {
            [35, 25, 20 * split, 20 * protect]
        };
        let mut roll = rng.below(weights.iter().sum());
        let mut op = 0;
        while roll >= weights[op] {
            roll -= weights[op];
            op += 1;
        }
        let t0 = Instant::now();
        match op {
            0 if !free.is_empty() => {
                let slot = free.swap_remove(rng.below(free.len() as u64) as usize);
                let pages = MIN_REGION_PAGES + rng.below(MAX_REGION_PAGES - MIN_REGION_PAGES + 1);
                let gpa = cfg.base + slot * SLOT_BYTES;
                let size = pages * PAGE;
                match space.map(gpa, size, Backing::Anon, false, RegionKind::Hotplug) {
                    Ok(_) => {
                        record(&mut res.op_latency.map, t0.elapsed());
                        res.maps += 1;
                        pieces[slot as usize] = 1;
                        live.push(Live {
                            gpa,
                            size,
                            readonly: false,
                        });
                        res.peak_live_regions = res.peak_live_regions.max(live.len() as u64);
                        // Give the region memory, as a hot-plugged region the guest used
                        // would have, so that unmapping it has something to free.
                        if populate {
                            let p0 = Instant::now();
                            match space.populate_range(gpa, size) {
                                Ok(()) => {
                                    res.populated_bytes += size;
                                    res.populate_ns += p0.elapsed().as_nanos() as u64;
                                }
                                Err(e) => note(&mut res, e.to_string()),
                            }
                        }
                        res.op_time.map.add(t0.elapsed());
                        // The baseline: what the host's own mmap + munmap of this size costs.
                        match crate::memory::host::time_anon_mmap(size) {
                            Ok(d) => record(&mut res.mmap_baseline, d),
                            Err(e) => note(&mut res, e.to_string()),
                        }
                    }
                    Err(e) => {
                        free.push(slot);
                        note(&mut res, e.to_string());
                    }
                }
            }
            1 => {
                let i = rng.below(live.len() as u64) as usize;
                let r = live.swap_remove(i);
                if cfg.batch > 1 {
                    pending.push(Pending {
                        gpa: r.gpa,
                        size: r.size,
                        split: false,
                    });
                    if pending.len() >= cfg.batch {
                        flush(&mut pending, &mut res, &mut pieces, &mut free);
                    }
                } else {
                    match space.unmap(r.gpa, r.size) {
                        Ok(_) => {
                            res.unmaps += 1;
                            record(&mut res.op_latency.unmap, t0.elapsed());
                            res.op_time.unmap.add(t0.elapsed());
                            drop_piece(&mut pieces, &mut free, slot_of(r.gpa));
                        }
                        Err(e) => {
                            live.push(r);
                            note(&mut res, e.to_string());
                        }
                    }
                }
            }
            2 => {
                let i = rng.below(live.len() as u64) as usize;
                let r = live[i];
                let pages = r.size / PAGE;
                if pages < 3 {
                    continue;
                }
                // Unmap [a, b) pages, 1 <= a < b <= pages - 1: two pieces remain.
                let a = 1 + rng.below(pages - 2);
                let b = a + 1 + rng.below(pages - 1 - a);
                let (gpa, size) = (r.gpa + a * PAGE, (b - a) * PAGE);
                if cfg.batch > 1 {
                    // The middle goes with the batch; the two pieces are live at once.
                    pending.push(Pending {
                        gpa,
                        size,
                        split: true,
                    });
                } else {
                    match space.unmap(gpa, size) {
                        Ok(_) => {
                            res.splits += 1;
                            record(&mut res.op_latency.split, t0.elapsed());
                            res.op_time.split.add(t0.elapsed());
                        }
                        Err(e) => {
                            note(&mut res, e.to_string());
                            continue;
                        }
                    }
                }
                live[i].size = a * PAGE;
                live.push(Live {
                    gpa: r.gpa + b * PAGE,
                    size: r.size - b * PAGE,
                    readonly: r.readonly,
                });
                pieces[slot_of(r.gpa)] += 1;
                res.peak_live_regions = res.peak_live_regions.max(live.len() as u64);
                if cfg.batch > 1 && pending.len() >= cfg.batch {
                    flush(&mut pending, &mut res, &mut pieces, &mut free);
                }
            }
            3 => {
                let i = rng.below(live.len() as u64) as usize;
                let r = live[i];
                match space.protect(r.gpa, r.size, !r.readonly) {
                    Ok(_) => {
                        res.protects += 1;
                        record(&mut res.op_latency.protect, t0.elapsed());
                        res.op_time.protect.add(t0.elapsed());
                        live[i].readonly = !r.readonly;
                    }
                    Err(e) => note(&mut res, e.to_string()),
                }
            }
            _ => continue,
        }
        shared.ops.store(res.ops(), Ordering::Relaxed);
    }
    flush(&mut pending, &mut res, &mut pieces, &mut free);
    res.seconds = start.elapsed().as_secs_f64();
    res.thread_times = times0.and_then(crate::sched::ThreadTimes::elapsed);
    // Clean up: everything this thread mapped goes, and its memory with it.
    for chunk in live.chunks(cfg.batch.max(1)) {
        let ranges: Vec<(u64, u64)> = chunk.iter().map(|r| (r.gpa, r.size)).collect();
        for r in unmap_ranges(space, &ranges).1 {
            match r {
                Ok(()) => res.cleanup_unmaps += 1,
                Err(e) => note(&mut res, e.to_string()),
            }
        }
    }
    live.clear();
    res.rss_after_bytes = rss_bytes();
    let host_start = space.host_addr(cfg.base);
    res.residual_bytes = resident_in(host_start, host_start + cfg.span_bytes).unwrap_or(0);
    *shared.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(res);
}

/// Unmaps `ranges` as one batch and, after a failure part way, the ranges the batch did not
/// take one by one. Returns how long the batch itself took and each range's outcome, in order.
fn unmap_ranges(
    space: &AddressSpace,
    ranges: &[(u64, u64)],
) -> (Duration, Vec<Result<(), AsError>>) {
    let t0 = Instant::now();
    let took = match space.unmap_many(ranges) {
        Ok(_) => ranges.len(),
        Err(partial) => partial.done.len(),
    };
    let batch_time = t0.elapsed();
    let outcomes = ranges
        .iter()
        .enumerate()
        .map(|(i, &(gpa, size))| {
            if i < took {
                Ok(())
            } else {
                space.unmap(gpa, size).map(drop)
            }
        })
        .collect();
    (batch_time, outcomes)
}

/// One piece of a region in slot `s` is gone: the slot is free again when it was the last.
fn drop_piece(pieces: &mut [u32], free: &mut Vec<u64>, s: usize) {
    pieces[s] -= 1;
    if pieces[s] == 0 {
        free.push(s as u64);
    }
}

/// Shares of the churn state for a run.
pub fn new_shared() -> Arc<ChurnShared> {
    Arc::new(ChurnShared::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_bounded() {
        let mut a = Rng(7);
        let mut b = Rng(7);
        for _ in 0..100 {
            let x = a.below(10);
            assert_eq!(x, b.below(10));
            assert!(x < 10);
        }
    }

    #[test]
    fn rss_and_smaps_are_readable() {
        assert!(rss_bytes() > 0);
        let v: Vec<u8> = vec![1; 1 << 20];
        let p = v.as_ptr() as u64;
        let r = resident_in(p, p + (1 << 20)).unwrap();
        assert!(r >= 512 << 10, "{r}");
        assert_eq!(resident_in(0, 4096), Some(0));
    }
}
