//! loom models of the grace-period protocol. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p rcu --release --test loom`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering::SeqCst};
use loom::sync::Arc;
use rcu::{Config, Domain, RcuCell};

fn domain() -> Domain {
    Domain::with_config(Config {
        max_backlog: 1 << 20,
        background_reclaim: false,
    })
}

/// A value that records whether it has been dropped; the flag outlives the value.
struct Token(Arc<AtomicBool>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.store(false, SeqCst);
    }
}

/// Retirement against a late reader: a reader that loaded the old value before the writer
/// replaced it must never see it freed while its guard lives.
#[test]
fn retired_value_is_not_freed_under_a_reader() {
    loom::model(|| {
        let d = domain();
        let alive = Arc::new(AtomicBool::new(true));
        let cell = Arc::new(RcuCell::new(&d, Token(alive.clone())));
        let reader = {
            let (d, cell) = (d.clone(), cell.clone());
            loom::thread::spawn(move || {
                let mut r = d.register();
                {
                    let g = r.read();
                    if let Some(t) = cell.load(&g) {
                        assert!(t.0.load(SeqCst), "read a freed value");
                    }
                }
                r.quiescent_state();
            })
        };
        cell.store(Some(Token(Arc::new(AtomicBool::new(true)))));
        d.reclaim();
        reader.join().unwrap();
    });
}
