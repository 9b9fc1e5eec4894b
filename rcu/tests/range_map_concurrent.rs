//! Concurrent tests of the range map: "no transient hole" and no use-after-free.
//!
//! Layout: `SLOTS` slots of 16 pages each. A splitter thread keeps punching a hole into the
//! middle of each slot's range (`remove_range`, which splits it in two), or trimming its first
//! page, and merging it back (`replace` of the whole, one transaction). A churn thread inserts
//! and removes unrelated ranges in between, forcing rotations all over the tree. Readers on
//! every core probe the addresses the writers never remove and must find them every time,
//! with a value that is intact (not poisoned by a free) and consistent with the range found.
//! Afterwards, with the readers gone, the tree's node count is back to its length.
//!
//! Duration per implementation: `RANGE_MAP_STRESS_MS` (default 2500 ms for `bonsai`, a fifth
//! of that for each baseline).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcu::{ConcurrentRangeMap, Domain, RangeMap, RangeValue};

const MAGIC: u64 = 0x5afe_5afe_5afe_5afe;
const POISON: u64 = 0xdead_dead_dead_dead;
const PAGE: u64 = 0x1000;
const SLOT: u64 = 16 * PAGE;
const SLOTS: u64 = 64;
/// Churn ranges live above the slots.
const CHURN_BASE: u64 = SLOTS * SLOT;

/// A region-like value: `offset` is where the range starts within its slot's "host mapping".
#[derive(Clone, Debug)]
struct Probe {
    magic: u64,
    slot: u64,
    offset: u64,
}

impl Probe {
    fn whole(slot: u64) -> Self {
        Self {
            magic: MAGIC,
            slot,
            offset: 0,
        }
    }
}

impl RangeValue for Probe {
    fn slice(&self, whole: Range<u64>, part: Range<u64>) -> Self {
        assert_eq!(self.magic, MAGIC, "writer sliced a poisoned value");
        Self {
            magic: MAGIC,
            slot: self.slot,
            offset: self.offset + (part.start - whole.start),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Poison before the memory is released, so a reader that still looks sees it.
        // SAFETY: `self.magic` is a valid field of a live value.
        unsafe { std::ptr::write_volatile(&mut self.magic, POISON) };
    }
}

fn slot_range(k: u64) -> Range<u64> {
    k * SLOT..(k + 1) * SLOT
}

/// The parts of slot `k` the writers never remove: pages 1..4 and 8..16.
fn stable_addr(k: u64, i: u64) -> u64 {
    let page = if i % 2 == 0 { 1 + i % 3 } else { 8 + i % 8 };
    k * SLOT + page * PAGE + (i * 8) % PAGE
}

fn duration(baseline: bool) -> Duration {
    let ms: u64 = std::env::var("RANGE_MAP_STRESS_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2500);
    Duration::from_millis(if baseline { ms / 5 } else { ms })
}

struct Report {
    lookups: u64,
    splits: u64,
}

/// What the churn writer does.
#[derive(Clone, Copy)]
enum Churn {
    /// Up to 200 of 4096 one-page ranges at a time, inserted and removed at random.
    Random,
    /// Waves: inserts `size` one-page ranges, then removes them all, again and again (a big
    /// tree's node memory comes from chunks that fill and empty). The run lasts until at
    /// least `min` waves are done.
    Waves { size: u64, min: u64 },
}

/// Maps every slot whole. Callers do this before any reader starts: the stable addresses are
/// guaranteed only from then on.
fn fill_slots<M: ConcurrentRangeMap<Probe>>(map: &M) {
    for k in 0..SLOTS {
        map.insert(slot_range(k), Probe::whole(k)).unwrap();
    }
}

/// Runs the readers and writers against `map` (its slots filled, see [`fill_slots`]) for
/// `dur`. Panics on any miss or bad value.
fn stress<M: ConcurrentRangeMap<Probe> + 'static>(
    domain: &Domain,
    map: Arc<M>,
    dur: Duration,
    churn: Churn,
) -> Report {
    assert_eq!(map.len(), SLOTS as usize, "fill_slots first");
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let splits = Arc::new(AtomicU64::new(0));
    let readers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let mut threads = Vec::new();
    for t in 0..readers as u64 {
        let (domain, map, stop, lookups) =
            (domain.clone(), map.clone(), stop.clone(), lookups.clone());
        threads.push(std::thread::spawn(move || {
            let mut reader = domain.register();
            let mut i = t * 7919;
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                for _ in 0..64 {
                    i = i.wrapping_add(1);
                    let k = (i * 31) % SLOTS;
                    let addr = stable_addr(k, i);
                    let guard = reader.read();
                    map.lookup(&guard, addr, |found| {
                        let Some((r, v)) = found else {
                            panic!("transient hole: {addr:#x} (slot {k}) not found")
                        };
                        assert_eq!(v.magic, MAGIC, "read a freed value at {addr:#x}");
                        assert!(r.contains(&addr), "{r:x?} does not contain {addr:#x}");
                        assert_eq!(v.slot, k, "wrong value for {addr:#x}");
                        assert_eq!(r.start - v.offset, k * SLOT, "offset inconsistent");
                    });
                    n += 1;
                }
                if n % 4096 == 0 {
                    // A consistent snapshot: sorted, disjoint, covers every stable page.
                    let snap = map.snapshot();
                    assert!(snap.windows(2).all(|w| w[0].0.end <= w[1].0.start));
                    for k in 0..SLOTS {
                        for page in [1, 3, 8, 15] {
                            let a = k * SLOT + page * PAGE;
                            assert!(
                                snap.iter().any(|(r, v)| r.contains(&a) && v.magic == MAGIC),
                                "snapshot lacks {a:#x}"
                            );
                        }
                    }
                }
                reader.quiescent_state();
            }
            lookups.fetch_add(n, Relaxed);
        }));
    }
    // The splitter.
    {
        let (map, stop, splits) = (map.clone(), stop.clone(), splits.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                i += 1;
                let k = (i * 13) % SLOTS;
                let s = k * SLOT;
                let removed = if i % 3 == 0 {
                    // Trim the first page (shrink from the left).
                    map.remove_range(s..s + PAGE).unwrap()
                } else {
                    // Punch a hole in the middle (split in two).
                    map.remove_range(s + 4 * PAGE..s + 8 * PAGE).unwrap()
                };
                assert_eq!(removed.len(), 1);
                assert_eq!(removed[0].1.slot, k);
                // Merge back, one transaction.
                let pieces = map.replace(slot_range(k), Probe::whole(k)).unwrap();
                assert_eq!(pieces.len(), if i % 3 == 0 { 1 } else { 2 });
                splits.fetch_add(1, Relaxed);
            }
        }));
    }
    // The churn writer: unrelated ranges come and go, rebalancing the tree.
    let waves = Arc::new(AtomicU64::new(0));
    if let Churn::Waves { size: n, .. } = churn {
        let (map, stop, waves) = (map.clone(), stop.clone(), waves.clone());
        threads.push(std::thread::spawn(move || {
            let page = |i: u64| CHURN_BASE + i * PAGE..CHURN_BASE + (i + 1) * PAGE;
            while !stop.load(Relaxed) {
                let mut inserted = 0;
                while inserted < n && !stop.load(Relaxed) {
                    map.insert(page(inserted), Probe::whole(u64::MAX)).unwrap();
                    inserted += 1;
                }
                for i in 0..inserted {
                    map.remove(page(i)).unwrap();
                }
                waves.fetch_add(1, Relaxed);
            }
        }));
    } else {
        let (map, stop) = (map.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut live = Vec::new();
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                i += 1;
                let start = CHURN_BASE + ((i * 2_654_435_761) % 4096) * PAGE;
                let r = start..start + PAGE;
                if map.insert(r.clone(), Probe::whole(u64::MAX)).is_ok() {
                    live.push(r);
                }
                if live.len() > 200 {
                    let r = live.swap_remove((i as usize * 7) % live.len());
                    map.remove(r).unwrap();
                }
            }
            for r in live {
                map.remove(r).unwrap();
            }
        }));
    }
    std::thread::sleep(dur);
    if let Churn::Waves { min, .. } = churn {
        let deadline = Instant::now() + Duration::from_secs(120);
        while waves.load(Relaxed) < min {
            assert!(
                Instant::now() < deadline,
                "{min} waves did not finish in 120 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    stop.store(true, Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(map.len(), SLOTS as usize);
    Report {
        lookups: lookups.load(Relaxed),
        splits: splits.load(Relaxed),
    }
}

#[test]
fn bonsai_split_never_leaves_a_hole_and_memory_returns_to_baseline() {
    let domain = Domain::new();
    let map = Arc::new(RangeMap::<Probe>::new(&domain));
    fill_slots(&*map);
    let dur = duration(false);
    let start = Instant::now();
    let report = stress(&domain, map.clone(), dur, Churn::Random);
    eprintln!(
        "bonsai: {} lookups, {} split+merge cycles in {:?}, {} grace periods",
        report.lookups,
        report.splits,
        start.elapsed(),
        domain.stats().grace_periods
    );
    assert!(report.lookups > 0 && report.splits > 0);
    map.check_invariants().unwrap();
    domain.barrier();
    assert_eq!(map.live_nodes(), map.len(), "nodes leaked or not yet freed");
    assert_eq!(domain.stats().backlog, 0);
}

#[cfg(feature = "baselines")]
#[test]
fn baselines_split_never_leaves_a_hole() {
    use rcu::baselines::{AnyRangeMap, IMPLEMENTATIONS};
    let domain = Domain::new();
    for name in IMPLEMENTATIONS.iter().filter(|n| **n != "bonsai") {
        let map = Arc::new(AnyRangeMap::<Probe>::new(name, &domain).unwrap());
        fill_slots(&*map);
        let report = stress(&domain, map, duration(true), Churn::Random);
        eprintln!(
            "{name}: {} lookups, {} splits",
            report.lookups, report.splits
        );
        assert!(report.lookups > 0 && report.splits > 0);
    }
}

/// A tree big enough to take its node memory from huge-page chunks: waves of ranges grow the
/// tree into chunks and shrink it out of them again (copied back to allocator memory), so
/// chunks are mapped and unmapped while readers descend. Readers must never miss, see poison
/// or fault on an unmapped chunk.
#[test]
fn bonsai_chunks_come_and_go_under_readers() {
    const CHUNK: usize = 2 << 20;
    let domain = Domain::new();
    let map = Arc::new(RangeMap::<Probe>::new(&domain));
    // Before the holder starts: its first round looks up slots the map must already hold.
    fill_slots(&*map);
    let stop = Arc::new(AtomicBool::new(false));
    // Samples the mapped chunk bytes: the peak, and how often it fell (chunks unmapped).
    let sampler = {
        let (map, stop) = (map.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut peak, mut last, mut falls) = (0, 0, 0);
            while !stop.load(Relaxed) {
                let now = map.tree().chunk_bytes();
                peak = usize::max(peak, now);
                falls += usize::from(now < last);
                last = now;
                std::thread::sleep(Duration::from_millis(1));
            }
            (peak, falls)
        })
    };
    // A reader that holds references across many lookups and a pause, and checks them before
    // its quiescent state: nodes must outlive every reference taken before they were retired,
    // including those of a whole tree copied out of its chunks.
    let holder = {
        let (domain, map, stop) = (domain.clone(), map.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reader = domain.register();
            let mut rounds = 0u64;
            while !stop.load(Relaxed) {
                let guard = reader.read();
                let held: Vec<&Probe> = (0..SLOTS)
                    .map(|k| {
                        let addr = stable_addr(k, rounds + k);
                        map.get(addr, &guard)
                            .unwrap_or_else(|| {
                                panic!("transient hole at {addr:#x} (slot {k}, round {rounds})")
                            })
                            .1
                    })
                    .collect();
                let pause = Instant::now();
                while pause.elapsed() < Duration::from_micros(50) {
                    std::hint::spin_loop();
                }
                for (k, v) in (0..SLOTS).zip(held) {
                    assert_eq!(v.magic, MAGIC, "a value held under the guard was freed");
                    assert_eq!(v.slot, k);
                }
                drop(guard);
                reader.quiescent_state();
                rounds += 1;
            }
            rounds
        })
    };
    let dur = duration(false);
    let report = stress(
        &domain,
        map.clone(),
        dur,
        Churn::Waves {
            size: 50_000,
            min: 2,
        },
    );
    stop.store(true, Relaxed);
    let (peak, falls) = sampler.join().unwrap();
    let rounds = holder.join().unwrap();
    eprintln!(
        "bonsai (chunks): {} lookups, {} split+merge cycles, {rounds} held rounds, chunk bytes peak {peak}, fell {falls} times",
        report.lookups, report.splits
    );
    assert!(rounds > 0);
    assert!(report.lookups > 0 && report.splits > 0);
    assert!(peak >= CHUNK, "peak {peak}: the waves never used chunks");
    assert!(falls > 0, "no chunk was unmapped during the run");
    map.check_invariants().unwrap();
    domain.barrier();
    assert_eq!(map.live_nodes(), map.len(), "nodes leaked or not yet freed");
    // Back to 64 ranges: the tree was copied out of its chunks, and they are all gone.
    assert_eq!(map.tree().chunk_bytes(), 0);
}

/// Memory stays bounded under endless churn: without any reader, the live node count never
/// exceeds the tree plus what the domain's backlog bound allows, and drops back to the
/// tree's size after a barrier.
#[test]
fn bonsai_memory_is_bounded_under_churn() {
    let domain = Domain::with_config(rcu::Config {
        max_backlog: 256,
        ..rcu::Config::default()
    });
    let map = RangeMap::<Probe>::new(&domain);
    for k in 0..SLOTS {
        map.insert(slot_range(k), Probe::whole(k)).unwrap();
    }
    let mut peak = 0;
    for i in 0..20_000u64 {
        let k = i % SLOTS;
        let s = k * SLOT;
        map.remove_range(s + 4 * PAGE..s + 8 * PAGE).unwrap();
        map.replace(slot_range(k), Probe::whole(k)).unwrap();
        peak = peak.max(map.live_nodes());
    }
    domain.barrier();
    assert_eq!(map.live_nodes(), map.len());
    // Each transaction retires O(log n) nodes in one batch; at most `max_backlog` batches
    // wait (plus one in the reclaimer's hands), so the peak is bounded.
    assert!(peak < 64 + 2 * 257 * 40, "peak {peak} live nodes");
    eprintln!("peak live nodes under churn: {peak} (tree: {})", map.len());
}
