//! Dropping a tree gives back every byte its nodes took: a counting global allocator sees the
//! heap back at its level from before the tree was built. (One test in this binary, so no
//! other test allocates meanwhile.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use rcu::{BonsaiTree, Config, Domain};

struct Counting;
static NET: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        NET.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NET.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn dropping_a_tree_frees_all_its_node_memory() {
    // No reclaim thread: nothing allocates behind the test's back.
    let d = Domain::with_config(Config {
        max_backlog: 1 << 20,
        background_reclaim: false,
        ..Config::default()
    });
    // Built, updated (allocator memory, the pool and the writer's stash in use), then dropped
    // with a retired batch still waiting.
    let cycle = |n: u64| {
        let t = BonsaiTree::from_sorted(&d, (0..n).map(|i| (2 * i, i)));
        for i in 0..n {
            t.insert(2 * i + 1, i);
        }
        d.barrier();
        t.insert(0, 1);
        drop(t);
        d.barrier();
    };
    // Once first, so that the domain's own queues reach the capacity they keep.
    cycle(5000);
    let before = NET.load(Relaxed);
    for n in [1, 100, 5000] {
        cycle(n);
        let leaked = NET.load(Relaxed) - before;
        assert!(leaked <= 0, "n = {n}: {leaked} bytes not given back");
    }
}
