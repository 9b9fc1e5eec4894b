//! Stall warnings: a grace period held up by a reader that stays online without announcing
//! quiescent states says so, once, naming the reader's thread.

use rcu::{Config, Domain, StallReport};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// A domain with the given stall timeout whose stall reports are collected.
fn watched_domain(stall_timeout: Option<Duration>) -> (Domain, Arc<Mutex<Vec<StallReport>>>) {
    let domain = Domain::with_config(Config {
        stall_timeout,
        ..Config::default()
    });
    let reports = Arc::new(Mutex::new(Vec::new()));
    let r = reports.clone();
    domain.set_stall_hook(move |report| r.lock().unwrap().push(report.clone()));
    (domain, reports)
}

/// Spawns a thread named `name` that registers a reader, stays online without announcing a
/// quiescent state until `until` returns true (or 5 s pass), then announces one. Returns once
/// the reader is registered.
fn stuck_reader(
    domain: &Domain,
    name: &str,
    until: impl Fn() -> bool + Send + 'static,
) -> std::thread::JoinHandle<ThreadId> {
    let registered = Arc::new(Barrier::new(2));
    let t = {
        let (domain, registered) = (domain.clone(), registered.clone());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut reader = domain.register();
                registered.wait();
                let start = Instant::now();
                while !until() && start.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                reader.quiescent_state();
                std::thread::current().id()
            })
            .unwrap()
    };
    registered.wait();
    t
}

// Issue 15: a reader that stays online without announcing quiescent states used to hold up
// every grace period silently.
#[test]
fn a_stalled_grace_period_names_the_reader_holding_it_up_once() {
    let (domain, reports) = watched_domain(Some(Duration::from_millis(50)));
    let seen = reports.clone();
    // Holds the grace period until it has been reported (a while longer, to show the report
    // is not repeated).
    let reader = stuck_reader(&domain, "stuck-reader", move || {
        !seen.lock().unwrap().is_empty() && {
            std::thread::sleep(Duration::from_millis(200));
            true
        }
    });
    let start = Instant::now();
    domain.synchronize();
    let waited = start.elapsed();
    let id = reader.join().unwrap();

    assert_eq!(domain.stats().stalls, 1, "{:?}", domain.stats());
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1, "once per grace period: {reports:?}");
    let report = &reports[0];
    assert!(
        report.waited >= Duration::from_millis(50) && report.waited <= waited,
        "{report:?} after {waited:?}"
    );
    assert_eq!(report.readers.len(), 1, "{report:?}");
    assert_eq!(
        report.readers[0].thread_name.as_deref(),
        Some("stuck-reader")
    );
    assert_eq!(report.readers[0].thread_id, id);
    assert!(report.readers[0].tid > 0);
    let text = report.to_string();
    assert!(
        text.contains("\"stuck-reader\"") && text.contains(&format!("{id:?}")),
        "{text}"
    );

    // A grace period that nobody holds up reports nothing.
    domain.synchronize();
    assert_eq!(domain.stats().stalls, 1);
}

#[test]
fn a_stall_report_names_every_reader_still_holding_the_grace_period_up() {
    let (domain, reports) = watched_domain(Some(Duration::from_millis(50)));
    let (a, b) = (reports.clone(), reports.clone());
    let first = stuck_reader(&domain, "stuck-a", move || !a.lock().unwrap().is_empty());
    let second = stuck_reader(&domain, "stuck-b", move || !b.lock().unwrap().is_empty());
    domain.synchronize();
    first.join().unwrap();
    second.join().unwrap();
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let mut names: Vec<_> = reports[0]
        .readers
        .iter()
        .map(|r| r.thread_name.clone().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["stuck-a", "stuck-b"]);
    assert_eq!(domain.stats().stalls, 1);
}

#[test]
fn stall_warnings_can_be_turned_off() {
    assert_eq!(
        Config::default().stall_timeout,
        Some(Duration::from_secs(5))
    );
    let (domain, reports) = watched_domain(None);
    let start = Instant::now();
    let reader = stuck_reader(&domain, "slow-reader", move || {
        start.elapsed() > Duration::from_millis(200)
    });
    domain.synchronize();
    reader.join().unwrap();
    assert!(reports.lock().unwrap().is_empty());
    assert_eq!(domain.stats().stalls, 0);
}

#[test]
fn a_panicking_stall_hook_does_not_break_the_grace_period() {
    let domain = Domain::with_config(Config {
        stall_timeout: Some(Duration::from_millis(20)),
        ..Config::default()
    });
    domain.set_stall_hook(|_| panic!("the stall hook panics"));
    let d = domain.clone();
    let reader = stuck_reader(&domain, "stuck-reader", move || d.stats().stalls > 0);
    domain.synchronize();
    reader.join().unwrap();
    assert_eq!(domain.stats().stalls, 1);
    // The waiter's wake-up still works: the next stalled grace period ends when its reader
    // announces a quiescent state, well before the 5 s the stuck reader gives up after.
    let d = domain.clone();
    let reader = stuck_reader(&domain, "stuck-again", move || d.stats().stalls > 1);
    let start = Instant::now();
    domain.synchronize();
    reader.join().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(domain.stats().stalls, 2);
}
