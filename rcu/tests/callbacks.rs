//! Deferred callbacks: where they run, what their panics do, and what `barrier` waits for.

use rcu::{Config, Domain, RcuCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A domain without a background thread (callbacks run only where the test drains).
fn quiet_domain(max_backlog: usize) -> Domain {
    Domain::with_config(Config {
        max_backlog,
        background_reclaim: false,
        ..Config::default()
    })
}

/// A value that records its drop.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// Polls `done` for up to `limit`; returns whether it became true.
fn becomes_true_within(limit: Duration, done: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    done()
}

// Regression (issue 15): a reader paying put-off back-pressure at its quiescent state goes
// offline to wait for a grace period and run a batch of callbacks. A callback that panicked
// there unwound past the way back online: a caller that caught the panic kept a reader that
// was offline but could still `read()`, so another thread's grace period did not wait for its
// guard and freed an object that guard still borrowed.
#[test]
fn a_callback_panicking_while_a_reader_pays_back_pressure_leaves_the_reader_online() {
    let domain = quiet_domain(2);
    let freed = Arc::new(AtomicBool::new(false));
    let cell = Arc::new(RcuCell::new(&domain, DropFlag(freed.clone())));
    let mut reader = domain.register();
    domain.defer(|| panic!("a deferred callback panics"));
    domain.defer(|| ()); // at the bound, with this thread's reader online: owed
                         // Pays: offline, grace period, the batch (whose first callback panics), back online.
    let _ = catch_unwind(AssertUnwindSafe(|| reader.quiescent_state()));

    let guard = reader.read();
    let _seen: &DropFlag = cell.load(&guard).unwrap();
    let writer = {
        let (domain, cell) = (domain.clone(), cell.clone());
        std::thread::spawn(move || {
            cell.store(Some(DropFlag(Arc::new(AtomicBool::new(false)))));
            domain.synchronize();
            domain.barrier(); // frees the value the guard still borrows, unless it waited
        })
    };
    assert!(
        !becomes_true_within(Duration::from_millis(300), || writer.is_finished()),
        "a grace period ended while this thread's reader held a guard: the reader was offline"
    );
    assert!(
        !freed.load(SeqCst),
        "the value was freed under a live guard"
    );
    drop(guard);
    // Offline (no guard left): the writer's grace periods may end.
    reader.offline_while(|| writer.join()).unwrap();
    assert!(
        freed.load(SeqCst),
        "the replaced value is freed after the grace period"
    );
}

/// What the callbacks of [`three_callbacks`] did.
#[derive(Default)]
struct Outcome {
    /// The two well-behaved callbacks that ran.
    ran: AtomicUsize,
    /// Whether what the panicking callback captured was dropped.
    captured_dropped: Arc<AtomicBool>,
}

/// Defers three callbacks: one that counts, one that panics (after capturing a value that
/// records its drop), one that counts.
fn three_callbacks(domain: &Domain, outcome: &Arc<Outcome>) {
    let o = outcome.clone();
    domain.defer(move || {
        o.ran.fetch_add(1, SeqCst);
    });
    let captured = DropFlag(outcome.captured_dropped.clone());
    domain.defer(move || {
        let _captured = &captured;
        panic!("a deferred callback panics");
    });
    let o = outcome.clone();
    domain.defer(move || {
        o.ran.fetch_add(1, SeqCst);
    });
}

/// Checks that the three callbacks ran (or, for the panicking one, ran and was dropped) and
/// that one panic was counted.
fn check(domain: &Domain, outcome: &Outcome, path: &str) {
    assert_eq!(
        outcome.ran.load(SeqCst),
        2,
        "{path}: the rest of the batch ran"
    );
    assert!(
        outcome.captured_dropped.load(SeqCst),
        "{path}: what the panicking callback captured was dropped"
    );
    let s = domain.stats();
    assert_eq!(s.callback_panics, 1, "{path}: {s:?}");
    assert_eq!((s.retired, s.freed, s.backlog), (3, 3, 0), "{path}: {s:?}");
}

/// Runs `drain` (which must run the three callbacks) and fails if a panic escapes it.
fn contained(path: &str, drain: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(drain)).is_err() {
        panic!("{path}: a deferred callback's panic unwound into the thread draining the queue");
    }
}

// Issue 15: a callback runs on whichever thread drains the queue. Its panic must not unwind
// into that thread, which did not call it (a writer, a reader at its quiescent state, a
// `barrier()` caller); it is contained and counted, and the rest of the batch runs, on every
// draining path.
#[test]
fn a_panicking_callback_is_contained_and_counted_on_every_draining_path() {
    // `Domain::reclaim`.
    let (d, o) = (quiet_domain(1 << 20), Arc::new(Outcome::default()));
    three_callbacks(&d, &o);
    contained("reclaim", || assert_eq!(d.reclaim(), 3));
    check(&d, &o, "reclaim");

    // `Domain::barrier`.
    let (d, o) = (quiet_domain(1 << 20), Arc::new(Outcome::default()));
    three_callbacks(&d, &o);
    contained("barrier", || d.barrier());
    check(&d, &o, "barrier");

    // `Reader::barrier` (offline meanwhile).
    let (d, o) = (quiet_domain(1 << 20), Arc::new(Outcome::default()));
    let mut reader = d.register();
    three_callbacks(&d, &o);
    contained("Reader::barrier", || reader.barrier());
    check(&d, &o, "Reader::barrier");
    drop(reader);

    // Back-pressure on a writer thread (no reader): the third retirement reaches the bound.
    let (d, o) = (quiet_domain(3), Arc::new(Outcome::default()));
    contained("writer back-pressure", || three_callbacks(&d, &o));
    check(&d, &o, "writer back-pressure");
    assert_eq!(d.stats().backpressure_stalls, 1);

    // Back-pressure put off to a reader, paid at its quiescent state.
    let (d, o) = (quiet_domain(3), Arc::new(Outcome::default()));
    let mut reader = d.register();
    three_callbacks(&d, &o); // online: owed
    assert_eq!(o.ran.load(SeqCst), 0);
    contained("reader back-pressure", || reader.quiescent_state());
    check(&d, &o, "reader back-pressure");
    drop(reader);

    // The background thread (it always contained them; now it counts them too).
    let d = Domain::new();
    let o = Arc::new(Outcome::default());
    three_callbacks(&d, &o);
    assert!(
        becomes_true_within(Duration::from_secs(10), || d.stats().freed == 3),
        "the background thread ran the batch"
    );
    check(&d, &o, "background thread");

    // The domain's drop runs what is left, on the thread that drops it.
    let (d, o) = (quiet_domain(1 << 20), Arc::new(Outcome::default()));
    three_callbacks(&d, &o);
    contained("domain drop", || drop(d));
    assert_eq!(o.ran.load(SeqCst), 2, "domain drop: the rest ran");
    assert!(o.captured_dropped.load(SeqCst), "domain drop: dropped");
}

/// Defers a chain of `depth` callbacks, each deferring the next from inside itself; each adds
/// one to `ran`.
fn chain(domain: &Domain, depth: usize, ran: &Arc<AtomicUsize>) {
    if depth == 0 {
        return;
    }
    let (d, ran) = (domain.clone(), ran.clone());
    domain.defer(move || {
        ran.fetch_add(1, SeqCst);
        chain(&d, depth - 1, &ran);
    });
}

// Issue 15: `barrier()` waits for what callbacks retire while it waits, transitively (liburcu's
// `rcu_barrier` does not): one call is enough to tear down a structure whose callbacks free
// further parts through the domain.
#[test]
fn barrier_waits_for_callbacks_queued_by_callbacks() {
    let domain = quiet_domain(1 << 20);
    let ran = Arc::new(AtomicUsize::new(0));
    chain(&domain, 5, &ran);
    domain.barrier();
    assert_eq!(ran.load(SeqCst), 5, "one barrier ran the whole chain");
    let s = domain.stats();
    assert_eq!((s.retired, s.freed, s.backlog), (5, 5, 0));

    // The same through a reader, with the background thread draining concurrently.
    let domain = Domain::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let mut reader = domain.register();
    for _ in 0..10 {
        chain(&domain, 5, &ran);
    }
    reader.barrier();
    assert_eq!(ran.load(SeqCst), 50);
    assert_eq!(domain.stats().backlog, 0);
}

std::thread_local! {
    /// A reader a deferred callback registers on whatever thread runs it, and leaves there.
    static LEFT_BEHIND: std::cell::RefCell<Option<rcu::Reader>> =
        const { std::cell::RefCell::new(None) };
}

// Issue 15: a callback that registers a thread-local reader of its domain on the background
// thread (and leaves it there, online) held up every later grace period forever, silently:
// the background thread never announces quiescent states. The thread now notices after the
// batch and stops, and its thread-locals (the reader among them) drop.
#[test]
fn a_callback_leaving_a_reader_online_on_the_background_thread_stops_the_thread() {
    let domain = Domain::new();
    let d = domain.clone();
    domain.defer(move || LEFT_BEHIND.with(|r| *r.borrow_mut() = Some(d.register())));
    assert!(
        becomes_true_within(Duration::from_secs(10), || domain.stats().freed == 1),
        "the background thread ran the callback"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let domain = domain.clone();
        std::thread::spawn(move || {
            domain.synchronize();
            let _ = tx.send(());
        });
    }
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "a grace period waited for the reader left on the background thread"
    );
    assert!(becomes_true_within(Duration::from_secs(5), || domain
        .stats()
        .readers
        == 0));
    // Reclamation goes on without the background thread.
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    domain.defer(move || {
        r.fetch_add(1, SeqCst);
    });
    domain.barrier();
    assert_eq!(ran.load(SeqCst), 1);
}
