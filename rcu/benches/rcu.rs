//! Costs of the QSBR domain against the usual alternatives.
//!
//! `cargo bench -p rcu --bench rcu -- --warm-up-time 1 --measurement-time 2`
//!
//! - `read_side/*`: entering and leaving a read-side section (and one load through an
//!   `RcuCell`) vs `crossbeam_epoch::pin()` and the read locks of `std` and `parking_lot`;
//! - `quiescent_state`: announcing one when no grace period is pending (the common case);
//! - `synchronize/N_readers`: a grace period with N other online readers announcing quiescent
//!   states in a loop on other threads;
//! - `retire/defer_drop`: retiring small boxes (objects/s), background reclamation on.
//!
//! `RCU_BENCH_CALLGRIND=N` instead runs each read-side loop N times and exits, for
//! `valgrind --tool=callgrind --toggle-collect='*callgrind_*'` instruction counts (see
//! docs/rcu.md).

use criterion::{Criterion, Throughput};
use rcu::{Domain, RcuCell};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

fn read_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_side");
    let domain = Domain::new();
    let cell = RcuCell::new(&domain, 42u64);
    let reader = domain.register();
    g.bench_function("rcu_read_guard", |b| {
        b.iter(|| {
            let guard = reader.read();
            black_box(&guard);
        })
    });
    g.bench_function("rcu_read_guard_and_load", |b| {
        b.iter(|| {
            let guard = reader.read();
            black_box(*cell.load(&guard).unwrap());
        })
    });
    g.bench_function("crossbeam_epoch_pin", |b| {
        b.iter(|| {
            let guard = crossbeam_epoch::pin();
            black_box(&guard);
        })
    });
    let std_lock = std::sync::RwLock::new(42u64);
    g.bench_function("std_rwlock_read", |b| {
        b.iter(|| black_box(*std_lock.read().unwrap()))
    });
    let pl_lock = parking_lot::RwLock::new(42u64);
    g.bench_function("parking_lot_rwlock_read", |b| {
        b.iter(|| black_box(*pl_lock.read()))
    });
    g.finish();
}

fn quiescent_state(c: &mut Criterion) {
    let domain = Domain::new();
    let mut reader = domain.register();
    c.bench_function("quiescent_state", |b| b.iter(|| reader.quiescent_state()));
}

/// Other threads that stay online and announce quiescent states in a loop.
struct BusyReaders {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyReaders {
    fn start(domain: &Domain, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (domain, stop) = (domain.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reader = domain.register();
                    while !stop.load(Relaxed) {
                        for _ in 0..64 {
                            let guard = reader.read();
                            black_box(&guard);
                            drop(guard);
                            reader.quiescent_state();
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for BusyReaders {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn synchronize(c: &mut Criterion) {
    let mut g = c.benchmark_group("synchronize");
    for n in [0, 1, 2] {
        let domain = Domain::new();
        let _readers = BusyReaders::start(&domain, n);
        g.bench_function(format!("{n}_readers"), |b| b.iter(|| domain.synchronize()));
    }
    g.finish();
}

fn retire(c: &mut Criterion) {
    let mut g = c.benchmark_group("retire");
    g.throughput(Throughput::Elements(1));
    let domain = Domain::new();
    g.bench_function("defer_drop", |b| {
        b.iter(|| domain.defer_drop(Box::new(black_box(7u64))))
    });
    domain.barrier();
    g.finish();
}

#[inline(never)]
fn callgrind_rcu_read_guard_and_load(reader: &rcu::Reader, cell: &RcuCell<u64>, n: u64) -> u64 {
    let mut sum = 0;
    for _ in 0..n {
        let guard = reader.read();
        sum += *cell.load(black_box(&guard)).unwrap();
    }
    sum
}

#[inline(never)]
fn callgrind_rcu_read_guard(reader: &rcu::Reader, n: u64) {
    for _ in 0..n {
        let guard = reader.read();
        black_box(&guard);
    }
}

#[inline(never)]
fn callgrind_crossbeam_epoch_pin(n: u64) {
    for _ in 0..n {
        let guard = crossbeam_epoch::pin();
        black_box(&guard);
    }
}

#[inline(never)]
fn callgrind_quiescent_state(reader: &mut rcu::Reader, n: u64) {
    for _ in 0..n {
        reader.quiescent_state();
    }
}

fn main() {
    if let Some(n) = std::env::var("RCU_BENCH_CALLGRIND")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        let domain = Domain::new();
        let cell = RcuCell::new(&domain, 1u64);
        let mut reader = domain.register();
        callgrind_rcu_read_guard(&reader, n);
        black_box(callgrind_rcu_read_guard_and_load(&reader, &cell, n));
        callgrind_crossbeam_epoch_pin(n);
        callgrind_quiescent_state(&mut reader, n);
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    read_side(&mut c);
    quiescent_state(&mut c);
    synchronize(&mut c);
    retire(&mut c);
    c.final_summary();
}
