//! Range-map benchmarks: the Bonsai `RangeMap` against `BTreeMap` (unsynchronised),
//! `RwLock<BTreeMap>`, the arc-swap copy-on-write map, `crossbeam_skiplist::SkipMap` and
//! `scc::TreeIndex`, at 100, 10k and 1M ranges. One run:
//!
//! ```text
//! cargo bench -p rcu --features baselines --bench range_map -- --warm-up-time 1 --measurement-time 2
//! ```
//!
//! 1. `lookup_1thread/*`: the range containing a random (mapped) address, one thread.
//! 2. `lookup_with_writer/*`: the same lookups while another thread keeps splitting a random
//!    range (punching a hole in its middle) and merging it back. The reader announces a
//!    quiescent state after every lookup (one VM exit = one read-side section). The reader
//!    runs on the first CPU of the process's affinity mask, the writer on the second
//!    (checked); the writer starts before the measurement and runs through all its samples.
//!    `bonsai` uses a domain with the background reclaim thread (a third thread, free to run
//!    on either CPU); `bonsai_writer_reclaims` one without it, where the writer frees its own
//!    garbage every 1024 retirements, as the `RwLock` writer does.
//!    With `RANGE_MAP_BENCH_WRITER_RATE=N` every writer paces itself to N updates a second
//!    (busy-waiting in between, so its core stays as busy), for comparisons at one writer rate
//!    instead of each writer's own maximum (an RwLock writer, whose readers wait for it, runs
//!    3-4x faster than a Bonsai writer beside the same reader).
//!    With `RANGE_MAP_BENCH_SEPARATE_WRITER=1` the writer updates a map of its own instead
//!    (a diagnostic: what the reader loses to a busy neighbour core alone), and with
//!    `RANGE_MAP_BENCH_NO_PIN=1` the scheduler places the threads (as it does a VMM's).
//! 3. `update/*`: one split or merge (alternating) of a random range, no readers.
//! 4. Memory per range, printed first (`memory: ...`), from a counting global allocator, plus
//!    the huge-page chunks a big Bonsai tree maps for its nodes (outside that allocator), and
//!    how much of them the kernel backs with transparent huge pages.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use rcu::baselines::{AnyRangeMap, CowRangeMap, RwLockRangeMap};
use rcu::{ConcurrentRangeMap, Domain, RangeMap};

// ---- counting allocator (for the memory figures only; a relaxed flag check otherwise) ----

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            ALLOCATED.fetch_add(layout.size(), Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if COUNTING.load(Relaxed) {
            ALLOCATED.fetch_sub(layout.size(), Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated by `f`'s result (requested sizes, not allocator rounding).
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    ALLOCATED.store(0, Relaxed);
    COUNTING.store(true, Relaxed);
    let t = f();
    COUNTING.store(false, Relaxed);
    (t, ALLOCATED.load(Relaxed))
}

// ---- workload ----

const SIZES: [u64; 3] = [100, 10_000, 1_000_000];
/// Range `i` is `[i * STRIDE, i * STRIDE + LEN)`: 2 MiB ranges 4 MiB apart.
const STRIDE: u64 = 4 << 20;
const LEN: u64 = 2 << 20;
const PAGE: u64 = 4096;

fn ranges(n: u64) -> impl Iterator<Item = (std::ops::Range<u64>, u64)> {
    (0..n).map(|i| (i * STRIDE..i * STRIDE + LEN, i * LEN))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const PROBES: usize = 4096;

/// Random addresses inside mapped ranges, avoiding the middle pages the writer unmaps.
fn probes(n: u64) -> Vec<u64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n);
    (0..PROBES)
        .map(|_| {
            let i = rng.next() % n;
            let off = rng.next() % (LEN / 2 - PAGE);
            i * STRIDE
                + if off < LEN / 4 - PAGE {
                    off
                } else {
                    off + LEN / 2 + PAGE
                }
        })
        .collect()
}

/// Split (unmap the middle half) or merge back (replace the whole) range `i`.
fn split_or_merge<M: ConcurrentRangeMap<u64>>(m: &M, i: u64, split: bool) {
    let s = i * STRIDE;
    if split {
        let _ = black_box(m.remove_range(s + LEN / 4..s + 3 * LEN / 4));
    } else {
        let _ = black_box(m.replace(s..s + LEN, i * LEN));
    }
}

fn build(name: &str, domain: &Domain, n: u64) -> AnyRangeMap<u64> {
    match name {
        "bonsai" => AnyRangeMap::Bonsai(RangeMap::from_sorted(domain, ranges(n)).unwrap()),
        "rwlock" => AnyRangeMap::RwLock(RwLockRangeMap::from_ranges(ranges(n)).unwrap()),
        "cow" => AnyRangeMap::Cow(CowRangeMap::from_ranges(ranges(n)).unwrap()),
        _ => unreachable!(),
    }
}

fn btree(n: u64) -> BTreeMap<u64, (u64, u64)> {
    ranges(n).map(|(r, v)| (r.start, (r.end, v))).collect()
}

fn skipmap(n: u64) -> crossbeam_skiplist::SkipMap<u64, (u64, u64)> {
    let m = crossbeam_skiplist::SkipMap::new();
    for (r, v) in ranges(n) {
        m.insert(r.start, (r.end, v));
    }
    m
}

/// Keyed by range *end*: `TreeIndex` has no floor query or reverse iteration, but the first
/// range whose end is above the address contains it if it starts at or below it.
fn scc_tree(n: u64) -> scc::TreeIndex<u64, (u64, u64)> {
    let m = scc::TreeIndex::new();
    for (r, v) in ranges(n) {
        let _ = m.insert(r.end, (r.start, v));
    }
    m
}

#[inline]
fn btree_get(m: &BTreeMap<u64, (u64, u64)>, a: u64) -> Option<u64> {
    let (_, &(end, v)) = m.range(..=a).next_back()?;
    (a < end).then_some(v)
}

#[inline]
fn skip_get(m: &crossbeam_skiplist::SkipMap<u64, (u64, u64)>, a: u64) -> Option<u64> {
    let e = m.upper_bound(Bound::Included(&a))?;
    let &(end, v) = e.value();
    (a < end).then_some(v)
}

#[inline]
fn scc_get(m: &scc::TreeIndex<u64, (u64, u64)>, a: u64, g: &scc::ebr::Guard) -> Option<u64> {
    let (_, &(start, v)) = m.range((Bound::Excluded(a), Bound::Unbounded), g).next()?;
    (start <= a).then_some(v)
}

/// The process's `AnonHugePages` in KiB (transparent huge pages in use), if readable.
fn anon_huge_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = s.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn memory_report() {
    for n in SIZES {
        let d = Domain::new();
        let huge_before = anon_huge_kib();
        let (bonsai, b) = measure(|| RangeMap::from_sorted(&d, ranges(n)).unwrap());
        // A big tree's nodes live in huge-page chunks mapped outside the global allocator.
        let chunks = bonsai.tree().chunk_bytes();
        let b = b + chunks;
        if chunks > 0 {
            let huge = huge_before
                .zip(anon_huge_kib())
                .map_or("unknown".into(), |(a, z)| {
                    format!("{} MiB", z.saturating_sub(a) / 1024)
                });
            println!(
                "memory: n={n} bonsai nodes in huge-page chunks: {} MiB mapped, {huge} of it on transparent huge pages",
                chunks >> 20
            );
        }
        // Built by n inserts too (path copying leaves no garbage once reclaimed).
        let (bt, t) = measure(|| btree(n));
        let (sk, s) = measure(|| skipmap(n));
        let (sc, c) = measure(|| scc_tree(n));
        let per = |x: usize| x as f64 / n as f64;
        println!(
            "memory: n={n} bytes/range bonsai={:.1} btreemap={:.1} skipmap={:.1} scc_treeindex={:.1} (bonsai/btreemap {:.2}x)",
            per(b),
            per(t),
            per(s),
            per(c),
            b as f64 / t as f64
        );
        drop((bonsai, bt, sk, sc));
    }
}

fn lookup_1thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_1thread");
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        let p = probes(n);
        let d = Domain::new();
        let reader = d.register();
        {
            let m = RangeMap::from_sorted(&d, ranges(n)).unwrap();
            let mut i = 0;
            g.bench_function(BenchmarkId::new("bonsai", n), |b| {
                b.iter(|| {
                    i = (i + 1) % PROBES;
                    let guard = reader.read();
                    black_box(m.get(p[i], &guard).map(|(_, v)| *v))
                })
            });
        }
        {
            let m = btree(n);
            let mut i = 0;
            g.bench_function(BenchmarkId::new("btreemap", n), |b| {
                b.iter(|| {
                    i = (i + 1) % PROBES;
                    black_box(btree_get(&m, p[i]))
                })
            });
        }
        for name in ["rwlock", "cow"] {
            let m = build(name, &d, n);
            let mut i = 0;
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    i = (i + 1) % PROBES;
                    let guard = reader.read();
                    black_box(m.lookup(&guard, p[i], |e| e.map(|(_, v)| *v)))
                })
            });
        }
        {
            let m = skipmap(n);
            let mut i = 0;
            g.bench_function(BenchmarkId::new("skipmap", n), |b| {
                b.iter(|| {
                    i = (i + 1) % PROBES;
                    black_box(skip_get(&m, p[i]))
                })
            });
        }
        {
            let m = scc_tree(n);
            let mut i = 0;
            g.bench_function(BenchmarkId::new("scc_treeindex", n), |b| {
                b.iter(|| {
                    i = (i + 1) % PROBES;
                    let guard = scc::ebr::Guard::new();
                    black_box(scc_get(&m, p[i], &guard))
                })
            });
        }
    }
    g.finish();
}

/// The process's CPU affinity mask as it was before any pinning, or `None` (no pinning) if it
/// holds fewer than 2 CPUs or `RANGE_MAP_BENCH_NO_PIN` is set.
fn pinning() -> Option<&'static libc::cpu_set_t> {
    // Read once, before the first pin: a thread's mask is what later queries see, on it and
    // on every thread it spawns. (Counting CPUs with `available_parallelism` on each call,
    // which follows that mask, once made the writer skip its own pinning after the reader's
    // and time-share the reader's CPU, which halved every "pinned" figure.)
    static INITIAL: std::sync::OnceLock<libc::cpu_set_t> = std::sync::OnceLock::new();
    let set = INITIAL.get_or_init(|| {
        // SAFETY: `cpu_set_t` is plain data (all-zero is the empty set) and
        // `sched_getaffinity(0, ..)` writes the calling thread's mask into it; on failure it
        // stays empty, which disables pinning.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
            set
        }
    });
    // SAFETY: `CPU_COUNT` only reads the set.
    let n = unsafe { libc::CPU_COUNT(set) };
    (n >= 2 && std::env::var_os("RANGE_MAP_BENCH_NO_PIN").is_none()).then_some(set)
}

/// The CPU the calling thread runs on.
fn current_cpu() -> i32 {
    // SAFETY: `sched_getcpu` takes no arguments and only returns a number.
    unsafe { libc::sched_getcpu() }
}

/// Updates per second every writer paces itself to (`RANGE_MAP_BENCH_WRITER_RATE`), if set.
fn writer_rate() -> Option<f64> {
    let v = std::env::var("RANGE_MAP_BENCH_WRITER_RATE").ok()?;
    let rate: f64 = v
        .parse()
        .unwrap_or_else(|_| panic!("RANGE_MAP_BENCH_WRITER_RATE={v:?}: not a number"));
    assert!(rate > 0.0, "RANGE_MAP_BENCH_WRITER_RATE must be positive");
    Some(rate)
}

/// Pins the calling thread to the `k`-th CPU of the process's initial mask (the reader to the
/// first, the writer to the second), or (`None`) gives it the whole initial mask back. Does
/// nothing without [`pinning`]. Pinned, the lookups-with-a-writer benchmarks measure the maps,
/// not whether the scheduler happened to put both threads on one core (on a 2-core host it
/// often did, for seconds).
fn pin(k: Option<usize>) {
    let Some(initial) = pinning() else { return };
    // SAFETY: `cpu_set_t` is plain data, CPU_ISSET/CPU_SET only touch the sets inside their
    // bounds (`c < CPU_SETSIZE`), and `sched_setaffinity(0, ..)` reads the set we pass for the
    // calling thread; a failure leaves the affinity unchanged (and the writer's check in
    // `Writer::start` then reports it).
    unsafe {
        let set = match k {
            Some(k) => {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                let cpu = (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, initial))
                    .nth(k)
                    .expect("pinning() checked that there are 2 CPUs");
                libc::CPU_SET(cpu, &mut set);
                set
            }
            None => *initial,
        };
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A writer thread on the second CPU (see [`pin`]) that splits and merges random ranges until
/// stopped. It runs through every sample of a benchmark (warm-up included), so each measured
/// lookup shares the map with a writer that is already going.
///
/// It is started before anything is measured, and `start` waits until it has moved itself to
/// its CPU: a thread inherits its parent's affinity, so a writer spawned by the pinned reader
/// first has to take the reader's CPU from it. Spawning one per sample, as this bench once
/// did, charged the reader for that and left short samples with no writer at all, which made
/// the pinned `RwLock` figures look 10x better than they are.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
    started: Instant,
}

impl Writer {
    fn start(write: impl Fn(u64, bool) + Send + 'static, n: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, running) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin(Some(1));
                let _ = ready.send(current_cpu());
                let mut rng = Rng(12345);
                let mut ops = 0u64;
                let rate = writer_rate();
                let begun = Instant::now();
                while !stop.load(Relaxed) {
                    let i = rng.next() % n;
                    write(i, true);
                    write(i, false);
                    ops += 2;
                    if let Some(rate) = rate {
                        // Ahead of schedule: busy-wait until the next update is due.
                        while ops as f64 > rate * begun.elapsed().as_secs_f64()
                            && !stop.load(Relaxed)
                        {
                            std::hint::spin_loop();
                        }
                    }
                }
                ops
            })
        };
        // Blocks (off the reader's CPU) until the writer runs where it belongs.
        let cpu = running.recv().expect("writer thread died");
        assert!(
            pinning().is_none() || cpu != current_cpu(),
            "the writer runs on the reader's CPU {cpu}: pinning failed"
        );
        Writer {
            stop,
            thread,
            started: Instant::now(),
        }
    }

    /// Stops the writer; returns its updates per second over its whole run.
    fn stop(self) -> f64 {
        self.stop.store(true, Relaxed);
        let ops = self.thread.join().expect("writer thread panicked");
        ops as f64 / self.started.elapsed().as_secs_f64()
    }
}

fn lookup_with_writer(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_with_writer");
    g.throughput(Throughput::Elements(1));
    pin(Some(0)); // the reader (this thread); undone at the end of the group
    let separate_writer = std::env::var_os("RANGE_MAP_BENCH_SEPARATE_WRITER").is_some();
    for n in SIZES {
        let p = probes(n);
        // The reclaim thread is spawned by `Domain::new`: unpinned for that moment, so that it
        // gets the process's whole mask, not the reader's CPU (threads inherit the affinity of
        // the thread that spawns them; until 2026-11-24 the reclaimer was stuck on the
        // reader's CPU this way).
        pin(None);
        let d = Domain::new();
        pin(Some(0));
        // The same Bonsai map in a domain without the background reclaim thread: the writer
        // frees its own garbage (back-pressure every 1024 retirements), so on 2 cores the
        // reader keeps a core to itself instead of sharing it with the reclaimer.
        let d_wr = Domain::with_config(rcu::Config {
            max_backlog: 1024,
            background_reclaim: false,
            ..rcu::Config::default()
        });
        for name in ["bonsai", "bonsai_writer_reclaims", "rwlock", "cow"] {
            let (m, d) = if name == "bonsai_writer_reclaims" {
                (Arc::new(build("bonsai", &d_wr, n)), &d_wr)
            } else {
                (Arc::new(build(name, &d, n)), &d)
            };
            // Diagnostic: the writer updates its own copy of the map (same kind, same domain),
            // so the reader sees only the interference of a busy core next door, no sharing.
            let mw = if separate_writer {
                Arc::new(build(
                    if name == "rwlock" { "rwlock" } else { "bonsai" },
                    d,
                    n,
                ))
            } else {
                m.clone()
            };
            let writer = Writer::start(move |i, split| split_or_merge(&*mw, i, split), n);
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter_custom(|iters| {
                    let mut reader = d.register();
                    let t = Instant::now();
                    for k in 0..iters as usize {
                        {
                            let guard = reader.read();
                            let hit = m.lookup(&guard, p[k % PROBES], |e| e.is_some());
                            assert!(hit, "transient hole");
                        }
                        reader.quiescent_state();
                    }
                    t.elapsed()
                })
            });
            println!(
                "writer: {name} n={n}: {:.0} updates/s while the reader ran",
                writer.stop()
            );
        }
        // SkipMap: the writer cannot split atomically (remove, then insert the pieces), so
        // readers can miss: counted, not asserted.
        {
            let m = Arc::new(skipmap(n));
            let writer = Writer::start(
                {
                    let m = m.clone();
                    move |i, split| {
                        let s = i * STRIDE;
                        m.remove(&s);
                        if split {
                            m.insert(s, (s + LEN / 4, i * LEN));
                            m.insert(s + 3 * LEN / 4, (s + LEN, i * LEN + 3 * LEN / 4));
                        } else {
                            m.remove(&(s + 3 * LEN / 4));
                            m.insert(s, (s + LEN, i * LEN));
                        }
                    }
                },
                n,
            );
            let mut missed = 0u64;
            g.bench_function(BenchmarkId::new("skipmap_nonatomic", n), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for k in 0..iters as usize {
                        missed += skip_get(&m, p[k % PROBES]).is_none() as u64;
                    }
                    t.elapsed()
                })
            });
            writer.stop();
            println!(
                "skipmap_nonatomic n={n}: {} lookups missed a mapped address (transient holes)",
                missed
            );
        }
    }
    g.finish();
    pin(None);
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update");
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        let d = Domain::new();
        for name in ["bonsai", "rwlock", "cow"] {
            if name == "cow" && n > 10_000 {
                continue; // ~0.1 s per update: the point is made at 10k
            }
            let m = build(name, &d, n);
            let mut rng = Rng(777);
            let mut pending: Option<u64> = None;
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| match pending.take() {
                    Some(i) => split_or_merge(&m, i, false),
                    None => {
                        let i = rng.next() % n;
                        split_or_merge(&m, i, true);
                        pending = Some(i);
                    }
                })
            });
        }
        d.barrier();
    }
    g.finish();
}

criterion_group!(benches, lookup_1thread, lookup_with_writer, update);

fn main() {
    memory_report();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
