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
