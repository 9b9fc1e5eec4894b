//! Grace-period behaviour seen from outside: who a writer waits for and who it does not.

use rcu::{Config, Domain, RcuCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[test]
fn synchronize_waits_for_an_online_reader_holding_a_guard() {
    let domain = Domain::new();
    let entered = Arc::new(Barrier::new(2));
    let released = Arc::new(AtomicBool::new(false));
    let t = {
        let (domain, entered, released) = (domain.clone(), entered.clone(), released.clone());
        std::thread::spawn(move || {
            let mut reader = domain.register();
            let guard = reader.read();
            entered.wait();
            std::thread::sleep(Duration::from_millis(100));
            released.store(true, SeqCst);
            drop(guard);
            reader.quiescent_state();
        })
    };
    entered.wait();
    domain.synchronize();
    assert!(
        released.load(SeqCst),
        "grace period ended while a reader was in its section"
    );
    t.join().unwrap();
    assert_eq!(domain.stats().grace_periods, 1);
}

#[test]
fn offline_readers_are_not_waited_for() {
    let domain = Domain::new();
    let ready = Arc::new(Barrier::new(2));
    let done = Arc::new(Barrier::new(2));
    let t = {
        let (domain, ready, done) = (domain.clone(), ready.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reader = domain.register();
            reader.offline_while(|| {
                ready.wait();
                done.wait(); // blocked "in KVM_RUN" until the writer is through
            });
        })
    };
    ready.wait();
    domain.synchronize(); // must not wait for the blocked, offline reader
    done.wait();
    t.join().unwrap();
}

#[test]
fn a_reader_going_offline_wakes_a_parked_writer() {
    let domain = Domain::new();
    let ready = Arc::new(Barrier::new(2));
    let t = {
        let (domain, ready) = (domain.clone(), ready.clone());
        std::thread::spawn(move || {
            let reader = domain.register();
            ready.wait();
            std::thread::sleep(Duration::from_millis(50)); // writer spins, then parks
            let off = reader.offline();
            std::thread::sleep(Duration::from_millis(200));
            drop(off.online().read());
        })
    };
    ready.wait();
    let start = Instant::now();
    domain.synchronize();
    // Woken by going offline (at ~50 ms), not by the thread's exit (at ~250 ms).
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    t.join().unwrap();
}

#[test]
fn a_reader_thread_waits_for_grace_periods_through_its_reader() {
    let domain = Domain::new();
    let mut reader = domain.register();
    domain.defer(|| ());
    reader.synchronize();
    reader.barrier();
    assert_eq!(domain.stats().backlog, 0);
    reader.offline_while(|| {
        domain.synchronize();
        domain.barrier();
        domain.reclaim();
    });
    reader.quiescent_state();
    let offline = reader.offline();
    domain.synchronize();
    let reader = offline.online();
    drop(reader.read());
}

#[test]
#[should_panic(expected = "may hold a read guard")]
fn domain_synchronize_on_a_thread_with_an_online_reader_panics_even_without_a_guard() {
    let domain = Domain::new();
    let _reader = domain.register();
    domain.synchronize(); // the domain cannot know that no guard is alive
}

#[test]
#[should_panic(expected = "may hold a read guard")]
fn domain_barrier_on_a_thread_with_an_online_reader_panics() {
    let domain = Domain::new();
    let _reader = domain.register();
    domain.barrier();
}

#[test]
#[should_panic(expected = "may hold a read guard")]
fn domain_reclaim_on_a_thread_with_an_online_reader_panics() {
    let domain = Domain::new();
    let _reader = domain.register();
    domain.defer(|| ());
    domain.reclaim();
}

#[test]
fn readers_of_another_domain_do_not_matter() {
    let (a, b) = (Domain::new(), Domain::new());
    let reader_of_a = a.register();
    let _guard = reader_of_a.read();
    b.synchronize();
    b.barrier();
}

#[test]
#[should_panic(expected = "would wait for itself")]
fn synchronize_under_own_guard_panics_instead_of_deadlocking() {
    let domain = Domain::new();
    let reader = domain.register();
    let _guard = reader.read();
    domain.synchronize();
}

#[test]
fn concurrent_synchronize_callers_share_grace_periods() {
    let domain = Domain::new();
    // A reader that announces quiescent states only every 20 ms keeps grace periods long.
    let stop = Arc::new(AtomicBool::new(false));
    let r = {
        let (domain, stop) = (domain.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reader = domain.register();
            while !stop.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                reader.quiescent_state();
            }
        })
    };
    let callers = 8;
    let start = Arc::new(Barrier::new(callers));
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let (domain, start) = (domain.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                domain.synchronize();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    stop.store(true, SeqCst);
    r.join().unwrap();
    let s = domain.stats();
    assert_eq!(s.synchronize_calls, callers as u64);
    assert!(
        s.grace_periods <= 3,
        "{callers} callers ran {} grace periods",
        s.grace_periods
    );
}

#[test]
fn deferred_callbacks_run_after_barrier_and_domain_drop_frees_the_rest() {
    let ran = Arc::new(AtomicUsize::new(0));
    let domain = Domain::new();
    for _ in 0..100 {
        let ran = ran.clone();
        domain.defer(move || {
            ran.fetch_add(1, SeqCst);
        });
    }
    domain.barrier();
    assert_eq!(ran.load(SeqCst), 100);
    let s = domain.stats();
    assert_eq!((s.retired, s.freed, s.backlog), (100, 100, 0));

    let quiet = Domain::with_config(Config {
        background_reclaim: false,
        ..Config::default()
    });
    for _ in 0..10 {
        let ran = ran.clone();
        quiet.defer(move || {
            ran.fetch_add(1, SeqCst);
        });
    }
    assert_eq!(ran.load(SeqCst), 100, "nothing runs without a grace period");
    drop(quiet);
    assert_eq!(
        ran.load(SeqCst),
        110,
        "dropping the domain runs what was left"
    );
}

#[test]
fn backlog_is_bounded_by_back_pressure() {
    let domain = Domain::with_config(Config {
        max_backlog: 64,
        background_reclaim: false,
        ..Config::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let r = {
        let (domain, stop) = (domain.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reader = domain.register();
            while !stop.load(SeqCst) {
                reader.quiescent_state();
                std::thread::yield_now();
            }
        })
    };
    let cell = RcuCell::new(&domain, 0usize);
    for i in 0..10_000 {
        cell.store(Some(i));
        assert!(domain.stats().backlog <= 64);
    }
    stop.store(true, SeqCst);
    r.join().unwrap();
    assert!(domain.stats().backpressure_stalls > 0);
    domain.barrier();
    assert_eq!(domain.stats().backlog, 0);
}

/// Runs `f` on a new thread and reports whether it returned within `limit` (a deadlocked `f`
/// is left behind, blocked, and the test fails instead of hanging).
fn finishes_within(limit: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(limit).is_ok()
}

/// Starts a writer whose grace period waits for the calling thread's online reader, and
/// returns once that writer holds the grace-period lock and is waiting.
fn writer_waiting_for_me(domain: &Domain) -> std::thread::JoinHandle<()> {
    let d = domain.clone();
    let w = std::thread::spawn(move || d.synchronize());
    let start = Instant::now();
    while domain.stats().synchronize_calls == 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(20)); // past its counter flip, spinning or parked
    w
}

// Regression: a reader thread (online, no guard) calling `synchronize` while another
// writer's grace period waits for it used to block on the grace-period lock while still
// online: a deadlock.
#[test]
fn synchronize_from_an_online_reader_while_another_grace_period_waits_for_it() {
    let domain = Domain::new();
    let d = domain.clone();
    assert!(finishes_within(Duration::from_secs(5), move || {
        let mut reader = d.register();
        let w = writer_waiting_for_me(&d);
        reader.synchronize();
        w.join().unwrap();
    }));
}

// Regression: the same for `barrier()` (and `reclaim()`), which queue on the reclamation lock
// held by a drainer that waits for this reader.
#[test]
fn barrier_from_an_online_reader_while_a_drainer_waits_for_it() {
    let domain = Domain::with_config(Config {
        max_backlog: 1 << 20,
        background_reclaim: false,
        ..Config::default()
    });
    let d = domain.clone();
    assert!(finishes_within(Duration::from_secs(5), move || {
        let mut reader = d.register();
        d.defer(|| ());
        let drainer = {
            let d = d.clone();
            std::thread::spawn(move || {
                d.reclaim();
            })
        };
        std::thread::sleep(Duration::from_millis(50)); // drainer holds the lock, waits for us
        d.defer(|| ());
        reader.barrier();
        assert_eq!(reader.offline_while(|| d.reclaim()), 0);
        drainer.join().unwrap();
    }));
    assert_eq!(domain.stats().backlog, 0);
}

// Regression: back-pressure reached by a thread that holds a read guard (a `swap` or a
// `compare_exchange`, which need one) used to panic "would wait for itself". Now, on any thread
// with an online reader of the domain, guard or not, it is put off to that reader's next
// quiescent state.
#[test]
fn retiring_past_the_bound_under_a_guard_defers_back_pressure() {
    let domain = Domain::with_config(Config {
        max_backlog: 4,
        background_reclaim: false,
        ..Config::default()
    });
    let cell = RcuCell::new(&domain, 0u64);
    let mut reader = domain.register();
    {
        let guard = reader.read();
        for i in 1..=10 {
            let cur = cell.load(&guard);
            assert_eq!(cell.compare_exchange(cur, Some(i)), Ok(()));
            assert_eq!(cell.swap(Some(i), &guard), Some(&i));
        }
        assert_eq!(domain.stats().backpressure_stalls, 0);
        assert_eq!(domain.stats().backlog, 20);
    }
    // The reader pays at its quiescent state, where `&mut` proves it holds no guard.
    reader.quiescent_state();
    let s = domain.stats();
    assert_eq!((s.backpressure_stalls, s.backlog), (1, 0));
    reader.quiescent_state(); // paid: nothing owed any more
    assert_eq!(domain.stats().backpressure_stalls, 1);
    for i in 0..4 {
        cell.store(Some(100 + i)); // online, past the bound at the 4th: owed again
    }
    reader.offline_while(|| cell.store(Some(99))); // offline: applies at once
    let s = domain.stats();
    assert_eq!((s.backpressure_stalls, s.backlog), (2, 0));
    reader.quiescent_state(); // what was owed was paid by then: nothing to wait for
    assert_eq!(domain.stats().backpressure_stalls, 2);
}

/// A thread that reads and retires, announcing quiescent states as it goes, keeps the backlog
/// bounded: what it could not pay while online (it might have held a guard), it pays at its
/// next quiescent state.
#[test]
fn a_reader_thread_that_retires_keeps_the_backlog_bounded() {
    let domain = Domain::with_config(Config {
        max_backlog: 64,
        background_reclaim: false,
        ..Config::default()
    });
    let cell = RcuCell::new(&domain, 0u64);
    let mut reader = domain.register();
    let mut peak = 0;
    for i in 1..=10_000u64 {
        {
            let guard = reader.read();
            let cur = cell.load(&guard).copied();
            assert_eq!(cur, Some(i - 1));
            cell.store(Some(i));
        }
        if i % 8 == 0 {
            reader.quiescent_state();
        }
        peak = peak.max(domain.stats().backlog);
    }
    assert!(peak <= 64 + 8, "backlog reached {peak}");
    assert!(domain.stats().backpressure_stalls > 0);
}

// `mem::forget` of an offline reader leaks the reader, offline: grace periods never wait for
// it, and nothing can read through it (`Reader::offline` takes the reader by value; an
// `Offline` guard borrowing it could be leaked while the reader kept reading, offline).
#[test]
fn a_leaked_offline_reader_stays_offline() {
    let domain = Domain::new();
    let reader = domain.register();
    std::mem::forget(reader.offline());
    let d = domain.clone();
    assert!(finishes_within(Duration::from_secs(5), move || {
        d.synchronize();
        d.barrier();
    }));
    domain.synchronize(); // this thread's only reader is offline: no panic
    assert_eq!(domain.stats().readers, 1, "leaked, so still registered");
}

// Regression: `reclaim()` from inside a deferred callback used to self-deadlock on the
// reclamation lock; `barrier()` there now panics with a message instead.
#[test]
fn reclaim_and_barrier_from_a_deferred_callback() {
    let domain = Domain::new();
    let results = Arc::new(std::sync::Mutex::new(None));
    {
        let (d, results) = (domain.clone(), results.clone());
        domain.defer(move || {
            let reclaimed = d.reclaim();
            let barrier = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.barrier()));
            let msg = barrier
                .err()
                .map(|e| match e.downcast::<String>() {
                    Ok(s) => *s,
                    Err(e) => e
                        .downcast::<&str>()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                })
                .unwrap_or_default();
            *results.lock().unwrap() = Some((reclaimed, msg));
        });
    }
    let d = domain.clone();
    assert!(finishes_within(Duration::from_secs(5), move || d.barrier()));
    let (reclaimed, msg) = results.lock().unwrap().take().unwrap();
    assert_eq!(reclaimed, 0);
    assert!(msg.contains("would wait for itself"), "{msg}");
}

#[test]
fn a_reader_dropped_while_unwinding_unregisters_and_stops_holding_grace_periods() {
    let domain = Domain::new();
    let d = domain.clone();
    let r = std::thread::spawn(move || {
        let reader = d.register();
        let _guard = reader.read();
        panic!("reader thread panics inside a read-side section");
    })
    .join();
    assert!(r.is_err(), "the thread panicked");
    assert_eq!(
        domain.stats().readers,
        0,
        "the reader unregistered while unwinding"
    );
    // A grace period would hang if the dead reader were still online.
    assert!(finishes_within(Duration::from_secs(5), {
        let d = domain.clone();
        move || d.synchronize()
    }));
}

#[test]
fn defer_from_inside_a_deferred_callback_runs_too() {
    let domain = Domain::new();
    let ran = Arc::new(AtomicUsize::new(0));
    {
        let (d, ran) = (domain.clone(), ran.clone());
        domain.defer(move || {
            let ran2 = ran.clone();
            d.defer(move || {
                ran2.fetch_add(10, SeqCst);
            });
            ran.fetch_add(1, SeqCst);
        });
    }
    domain.barrier(); // runs the first callback, then the second, which it queued
    assert_eq!(ran.load(SeqCst), 11);
}

#[test]
fn the_global_domain_is_one_domain() {
    let a = Domain::global();
    let b = Domain::global();
    assert!(a.same_as(b));
    assert!(!a.same_as(&Domain::new()));
    let cell = RcuCell::new(a, 7u32);
    let reader = b.register();
    assert_eq!(cell.load(&reader.read()), Some(&7));
}

#[test]
fn stats_count_what_happened() {
    let domain = Domain::with_config(Config {
        background_reclaim: false,
        ..Config::default()
    });
    let before = domain.stats();
    assert_eq!(
        (
            before.grace_periods,
            before.retired,
            before.freed,
            before.readers
        ),
        (0, 0, 0, 0)
    );
    let reader = domain.register();
    assert_eq!(domain.stats().readers, 1);
    let cell = RcuCell::new(&domain, 1u32);
    for v in 2..=5 {
        cell.store(Some(v));
    }
    let s = domain.stats();
    assert_eq!((s.retired, s.freed, s.backlog), (4, 0, 4));
    drop(reader);
    domain.synchronize();
    domain.synchronize();
    assert_eq!(domain.reclaim(), 4);
    let s = domain.stats();
    assert_eq!((s.retired, s.freed, s.backlog, s.readers), (4, 4, 0, 0));
    assert!(s.grace_periods >= 2, "{s:?}");
    assert!(s.synchronize_calls >= 3, "{s:?}");
    assert_eq!(s.grace_period_latency.count(), s.grace_periods);
    let h = &s.grace_period_latency;
    assert!(h.quantile_ns(0.5) <= h.quantile_ns(0.99) && h.quantile_ns(0.99) <= h.max_ns());
}
