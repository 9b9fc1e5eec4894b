//! rcutorture-style stress test of the `rcu` crate.
//!
//! Reader threads continually load published objects from a few `RcuCell`s and check them,
//! holding each for a while and re-checking it, while writer threads keep replacing them
//! (`store`, `swap`, `compare_exchange`, emptying) and retiring them; a retired object's
//! destructor poisons it before its memory is released, so a reader that ever sees poison (or
//! a torn object) has been handed freed memory, and the test fails. Readers also go offline
//! and online, announce quiescent states, re-register and run grace periods themselves at
//! random points; writers also call `synchronize` and retire loose objects with `defer_drop`.
//! A small backlog bound keeps back-pressure active alongside the background thread.
//!
//! Every object is counted when built and when dropped: at the end, after `barrier()` and the
//! domain's drop, each must have been freed exactly once.
//!
//! Runs for `RCU_TORTURE_SECS` seconds (default 3):
//! `RCU_TORTURE_SECS=60 cargo test -p rcu --release --test torture -- --nocapture`.

use rcu::{Config, Domain, RcuCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const LIVE: u64 = 0x5eed_0b1e_c7ed_a11e;
const POISON: u64 = 0xdead_dead_dead_dead;
const SALT: u64 = 0x9e37_79b9_7f4a_7c15;

static BUILT: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static NEXT_GEN: AtomicU64 = AtomicU64::new(1);

/// A published object: a magic word, a generation and a check word derived from it.
#[repr(C)]
struct Obj {
    /// Kept clear of the first two words, which the allocator reuses when it frees a block.
    _pad: [u64; 2],
    magic: u64,
    generation: u64,
    check: u64,
}

impl Obj {
    fn new() -> Self {
        BUILT.fetch_add(1, Relaxed);
        let generation = NEXT_GEN.fetch_add(1, Relaxed);
        Obj {
            _pad: [0; 2],
            magic: LIVE,
            generation,
            check: generation ^ SALT,
        }
    }

    /// Panics unless the object is live and whole; returns its generation.
    fn verify(&self) -> u64 {
        // Volatile: the compiler must not assume the values it saw at construction.
        // SAFETY: `self` is a valid reference (that is what the test checks).
        let (magic, generation, check) = unsafe {
            (
                std::ptr::read_volatile(&self.magic),
                std::ptr::read_volatile(&self.generation),
                std::ptr::read_volatile(&self.check),
            )
        };
        assert_ne!(
            magic, POISON,
            "reader saw a freed object (generation {generation})"
        );
        assert_eq!(magic, LIVE, "reader saw a corrupt object");
        assert_eq!(check, generation ^ SALT, "reader saw a torn object");
        generation
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        assert_eq!(self.magic, LIVE, "object dropped twice");
        // Volatile: a store to memory about to be freed is otherwise a dead store.
        // SAFETY: `self.magic` is a valid, exclusively borrowed field.
        unsafe { std::ptr::write_volatile(&mut self.magic, POISON) };
        DROPPED.fetch_add(1, Relaxed);
    }
}

/// xorshift64*: fast, per thread, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(SALT) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % n
    }
}

fn spin(n: u64) {
    for _ in 0..n {
        std::hint::spin_loop();
    }
}

const CELLS: usize = 4;
const READERS: u64 = 3;
const WRITERS: u64 = 2;

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    quiescent_states: AtomicU64,
    offline_sections: AtomicU64,
    reregistrations: AtomicU64,
    replacements: AtomicU64,
    cas_failures: AtomicU64,
}

#[test]
fn torture() {
    let secs: u64 = std::env::var("RCU_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let domain = Domain::with_config(Config {
        max_backlog: 512,
        background_reclaim: true,
        ..Config::default()
    });
    let cells: Arc<Vec<RcuCell<Obj>>> = Arc::new(
        (0..CELLS)
            .map(|_| RcuCell::new(&domain, Obj::new()))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let start = Arc::new(Barrier::new((READERS + WRITERS + 1) as usize));

    let mut threads = Vec::new();
    for id in 0..READERS {
        let (domain, cells, stop, counts, start) = (
            domain.clone(),
            cells.clone(),
            stop.clone(),
            counts.clone(),
            start.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(id + 1);
            let mut reader = domain.register();
            start.wait();
            while !stop.load(Relaxed) {
                match rng.below(100) {
                    // A read-side section over several cells, holding each object a while
                    // and checking it again before the section ends.
                    0..=79 => {
                        let guard = reader.read();
                        let mut held = Vec::with_capacity(CELLS);
                        for _ in 0..1 + rng.below(CELLS as u64) {
                            let cell = &cells[rng.below(CELLS as u64) as usize];
                            if let Some(obj) = cell.load(&guard) {
                                held.push((obj, obj.verify()));
                            }
                            spin(rng.below(200));
                        }
                        if rng.below(8) == 0 {
                            std::thread::yield_now(); // preempted inside the section
                        }
                        for (obj, generation) in held {
                            assert_eq!(obj.verify(), generation, "object changed under a guard");
                        }
                        counts.reads.fetch_add(1, Relaxed);
                    }
                    80..=91 => {
                        reader.quiescent_state();
                        counts.quiescent_states.fetch_add(1, Relaxed);
                    }
                    92..=96 => {
                        let micros = rng.below(50);
                        reader.offline_while(|| std::thread::sleep(Duration::from_micros(micros)));
                        counts.offline_sections.fetch_add(1, Relaxed);
                    }
                    97 => reader.synchronize(),
                    _ => {
                        drop(reader);
                        reader = domain.register();
                        counts.reregistrations.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    for id in 0..WRITERS {
        let (domain, cells, stop, counts, start) = (
            domain.clone(),
            cells.clone(),
            stop.clone(),
            counts.clone(),
            start.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(100 + id);
            // Writers are readers too (swap and compare_exchange need a guard).
            let mut reader = domain.register();
            start.wait();
            while !stop.load(Relaxed) {
                let cell = &cells[rng.below(CELLS as u64) as usize];
                match rng.below(100) {
                    0..=39 => cell.store(Some(Obj::new())),
                    40..=59 => {
                        let guard = reader.read();
                        if let Some(old) = cell.swap(Some(Obj::new()), &guard) {
                            old.verify(); // still readable under our guard
                        }
                    }
                    60..=84 => {
                        let guard = reader.read();
                        let current = cell.load(&guard);
                        if let Some(c) = current {
                            c.verify();
                        }
                        if let Err(rejected) = cell.compare_exchange(current, Some(Obj::new())) {
                            counts.cas_failures.fetch_add(1, Relaxed);
                            drop(rejected); // never published: dropped at once
                        }
                    }
                    85..=89 => cell.store(None),
                    90..=94 => domain.defer_drop(Obj::new()),
                    95..=96 => reader.offline_while(|| domain.synchronize()),
                    _ => reader.synchronize(),
                }
                counts.replacements.fetch_add(1, Relaxed);
                if rng.below(4) == 0 {
                    reader.quiescent_state();
                }
            }
        }));
    }

    start.wait();
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = began.elapsed();

    domain.barrier();
    let s = domain.stats();
    assert_eq!(s.backlog, 0);
    assert_eq!(s.retired, s.freed);
    assert_eq!(s.readers, 0);
    drop(cells);
    drop(domain);
    let (built, dropped) = (BUILT.load(SeqCst), DROPPED.load(SeqCst));
    assert_eq!(
        built, dropped,
        "{built} objects built, {dropped} dropped (each exactly once)"
    );
    eprintln!(
        "torture: {:.1}s, {} read sections, {} quiescent states, {} offline sections, \
         {} re-registrations, {} writer operations ({} CAS failures), {} objects freed, \
         {} grace periods ({} synchronize calls, p50 {} us, max {} us), {} back-pressure \
         stalls",
        elapsed.as_secs_f64(),
        counts.reads.load(Relaxed),
        counts.quiescent_states.load(Relaxed),
        counts.offline_sections.load(Relaxed),
        counts.reregistrations.load(Relaxed),
        counts.replacements.load(Relaxed),
        counts.cas_failures.load(Relaxed),
        dropped,
        s.grace_periods,
        s.synchronize_calls,
        s.grace_period_latency.quantile_ns(0.5) / 1000,
        s.grace_period_latency.max_ns() / 1000,
        s.backpressure_stalls,
    );
}
