//! loom model of the Bonsai tree's publication and retirement against a concurrent reader.
//! Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p rcu --release --test loom_bonsai`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering::Relaxed};
use loom::sync::Arc;
use rcu::{BonsaiTree, Config, Domain};

fn domain() -> Domain {
    Domain::with_config(Config {
        max_backlog: 1 << 20,
        background_reclaim: false,
        ..Config::default()
    })
}

/// Liveness flags, one per value ever created; they outlive the values.
struct Flags {
    next: std::sync::atomic::AtomicUsize,
    alive: Vec<AtomicBool>,
}

/// A value whose every copy has its own liveness flag: set (relaxed) when the copy is made,
/// cleared when it is dropped, i.e. when the node holding it is freed.
struct Tok {
    idx: usize,
    flags: std::sync::Arc<Flags>,
}

impl Tok {
    fn new(flags: &std::sync::Arc<Flags>) -> Self {
        let idx = flags
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Relaxed: only the publication of the node that holds this value can make the store
        // visible to the reader.
        flags.alive[idx].store(true, Relaxed);
        Self {
            idx,
            flags: flags.clone(),
        }
    }

    fn check(&self) {
        assert!(
            self.flags.alive[self.idx].load(Relaxed),
            "reader saw a value that is not (yet, or any more) alive"
        );
    }
}

impl Clone for Tok {
    fn clone(&self) -> Self {
        Tok::new(&self.flags)
    }
}

impl Drop for Tok {
    fn drop(&mut self) {
        self.flags.alive[self.idx].store(false, Relaxed);
    }
}

/// A writer replaces the tree {1, 2} by {2, 3} in one transaction (a new root copy, a new
/// leaf, two nodes retired) and reclaims; a reader iterates concurrently. The reader must see
/// exactly the old or the new version, with every value initialised and not freed.
#[test]
fn publish_and_retire_against_a_reader() {
    loom::model(|| {
        let d = domain();
        let flags = std::sync::Arc::new(Flags {
            next: std::sync::atomic::AtomicUsize::new(0),
            alive: (0..16).map(|_| AtomicBool::new(false)).collect(),
        });
        let tree = Arc::new(BonsaiTree::from_sorted(
            &d,
            [(1u32, Tok::new(&flags)), (2, Tok::new(&flags))],
        ));
        let reader = {
            let (d, tree) = (d.clone(), tree.clone());
            loom::thread::spawn(move || {
                let mut r = d.register();
                {
                    let g = r.read();
                    let mut keys = Vec::new();
                    for (k, v) in tree.iter(&g) {
                        v.check();
                        keys.push(*k);
                    }
                    assert!(keys == [1, 2] || keys == [2, 3], "mixed version: {keys:?}");
                }
                r.quiescent_state();
            })
        };
        let t3 = Tok::new(&flags);
        tree.update(|txn| {
            txn.remove(&1);
            txn.insert(3, t3);
        });
        d.reclaim();
        reader.join().unwrap();
        assert_eq!(tree.live_nodes(), 2);
    });
}
