//! Unit tests of the tree, its node memory and its chunks.
#![deny(unsafe_code)]

use super::*;
use crate::chunks::Chunks;

#[test]
fn insert_remove_balance() {
    let d = Domain::new();
    let t = BonsaiTree::new(&d);
    for i in 0..1000u32 {
        t.insert(i, i * 2);
        t.check_invariants().unwrap();
    }
    assert_eq!(t.len(), 1000);
    assert!(t.height() <= 2 * 10 + 2, "height {}", t.height());
    let r = d.register();
    {
        let g = r.read();
        assert_eq!(t.get(&500, &g), Some(&1000));
        assert_eq!(t.iter(&g).count(), 1000);
        assert_eq!(t.iter_from(&990, &g).count(), 10);
    }
    for i in (0..1000u32).step_by(3) {
        assert_eq!(t.remove(&i), Some(i * 2));
        t.check_invariants().unwrap();
    }
    drop(r);
    d.barrier();
    assert_eq!(t.live_nodes(), t.len());
}

#[test]
fn aborted_transaction_changes_nothing() {
    let d = Domain::new();
    let t = BonsaiTree::from_sorted(&d, (0..100u32).map(|i| (i, i)));
    let r: Result<(), ()> = t.try_update(|txn| {
        txn.insert(1000, 0);
        txn.remove(&5);
        Err(())
    });
    assert!(r.is_err());
    t.check_invariants().unwrap();
    assert_eq!(t.len(), 100);
    assert_eq!(t.live_nodes(), 100);
}

#[test]
fn reclaimed_node_memory_is_reused_and_the_pool_is_bounded() {
    // No background thread: nodes are reclaimed only at `barrier`.
    let d = Domain::with_config(crate::Config {
        max_backlog: 1 << 20,
        background_reclaim: false,
        ..crate::Config::default()
    });
    let token = StdArc::new(());
    let t = BonsaiTree::from_sorted(&d, (0..1000u32).map(|i| (i, token.clone())));
    // Each replacement copies a root-to-leaf path: ~10 nodes retired per update.
    for i in 0..1000 {
        t.insert(i, token.clone());
    }
    assert_eq!(
        t.pooled_nodes(),
        0,
        "nothing is reclaimed before a grace period"
    );
    d.barrier();
    assert_eq!(t.live_nodes(), 1000);
    // The values of reclaimed nodes were dropped even though their memory was kept.
    assert_eq!(StdArc::strong_count(&token), 1 + 1000);
    // More than POOL_CAP nodes were reclaimed; the pool keeps POOL_CAP, frees the rest.
    assert_eq!(t.pooled_nodes(), POOL_CAP);
    // The next update takes its nodes from the pool, not from the allocator.
    t.insert(5000, token.clone());
    let used = POOL_CAP - t.pooled_nodes();
    assert!((1..=2 * t.height()).contains(&used), "{used} nodes taken");
    // Endless churn keeps the kept memory bounded.
    for round in 0..5 {
        for i in 0..1000 {
            t.insert(i, token.clone());
            t.remove(&(5000 + round));
            t.insert(5001 + round, token.clone());
        }
        d.barrier();
        assert!(t.pooled_nodes() <= 2 * POOL_CAP, "{}", t.pooled_nodes());
    }
    t.check_invariants().unwrap();
    assert_eq!(t.live_nodes(), t.len());
    assert_eq!(StdArc::strong_count(&token), 1 + t.len());
    // A tree dropped while a batch still waits: the batch frees into the pool it shares.
    t.insert(7, token.clone());
    drop(t);
    d.barrier();
    assert_eq!(StdArc::strong_count(&token), 1);
}

#[test]
fn node_types_chunks_do_not_serve_stay_on_the_heap() {
    #[derive(Clone, Debug, PartialEq)]
    #[repr(align(8192))]
    struct Page(u64);
    assert_eq!(chunk_threshold::<u64, Page>(), usize::MAX);
    let d = Domain::new();
    let t = BonsaiTree::from_sorted(&d, (0..100u64).map(|i| (i, Page(i))));
    t.insert(1000, Page(1000));
    let reader = d.register();
    let guard = reader.read();
    assert_eq!(t.get(&1000, &guard), Some(&Page(1000)));
    assert_eq!(
        t.get(&7, &guard).map(|p| p as *const Page as usize % 8192),
        Some(0)
    );
    assert_eq!(t.chunk_bytes(), 0);
}

#[test]
fn compaction_keeps_what_a_held_guard_reached_until_the_grace_period() {
    let slots = Chunks::<Node<u64, StdArc<()>>>::SLOTS;
    // Background reclamation on: nothing but the guard holds the old nodes back.
    let d = Domain::new();
    let token = StdArc::new(());
    let n = slots as u64 + 100;
    let t = BonsaiTree::from_sorted(&d, (0..n).map(|i| (i, token.clone())));
    assert!(t.chunk_bytes() > 0);
    let keep = slots as u64 / 4 - 1;
    let reader = d.register();
    let guard = reader.read();
    let held: Vec<&StdArc<()>> = (0..keep).map(|i| t.get(&i, &guard).unwrap()).collect();
    // One transaction shrinks the tree below a quarter chunk: the update retires the
    // removed nodes, and compaction copies the rest out of the chunks and retires them all.
    t.update(|txn| (keep..n).for_each(|i| _ = txn.remove(&i)));
    assert_eq!(t.len(), keep as usize);
    // A fresh lookup sees the copy, complete: every kept key, none in chunk memory.
    for i in 0..keep {
        let v = t
            .get(&i, &guard)
            .expect("a kept key is missing after compaction");
        assert!(!ptr::eq(v, held[i as usize]), "key {i} not copied");
    }
    // Nothing the guard could reach is dropped or unmapped while it lives. The old version
    // (n nodes, in the removal's batch and the compaction's, each batch far more than the
    // path copies the removal made) and the copy (keep nodes) all hold a token.
    let tokens = StdArc::strong_count(&token);
    assert!(tokens >= 1 + n as usize + keep as usize, "{tokens} tokens");
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        StdArc::strong_count(&token),
        tokens,
        "reclaimed under a read guard"
    );
    assert!(t.chunk_bytes() > 0, "chunks unmapped under a read guard");
    assert!(held.iter().all(|v| StdArc::ptr_eq(v, &token)));
    drop(guard);
    drop(reader);
    d.barrier();
    assert_eq!(StdArc::strong_count(&token), 1 + keep as usize);
    assert_eq!(t.chunk_bytes(), 0);
    assert_eq!(t.live_nodes(), t.len());
    t.check_invariants().unwrap();
}

#[test]
fn big_trees_take_node_memory_from_chunks_and_give_it_back() {
    const CHUNK: usize = crate::chunks::CHUNK;
    let slots = Chunks::<Node<u64, StdArc<()>>>::SLOTS;
    let d = Domain::with_config(crate::Config {
        max_backlog: 1 << 20,
        background_reclaim: false,
        ..crate::Config::default()
    });
    let token = StdArc::new(());
    // Built in one go: in chunks from the start, as many as the nodes need.
    let n = 2 * slots as u64 + 100;
    let t = BonsaiTree::from_sorted(&d, (0..n).map(|i| (2 * i, token.clone())));
    assert_eq!(t.chunk_bytes(), 3 * CHUNK);
    t.check_invariants().unwrap();
    drop(t);
    assert_eq!(StdArc::strong_count(&token), 1);

    // Updates with a grace period every 1024 (each update retires ~20 nodes; garbage
    // takes memory too, and would otherwise fill chunks of its own).
    let t = BonsaiTree::new(&d);
    let mut updates = 0;
    type Tree = BonsaiTree<u64, StdArc<()>>;
    let mut update = |f: &mut dyn FnMut(&Tree)| {
        f(&t);
        updates += 1;
        if updates % 1024 == 0 {
            d.barrier();
        }
    };
    // Grown by inserts: allocator memory while small, chunks from a huge page's worth on.
    for i in 0..slots as u64 - 1 {
        update(&mut |t| _ = t.insert(i, token.clone()));
    }
    d.barrier();
    assert_eq!(t.chunk_bytes(), 0, "a small tree maps no chunk");
    for i in slots as u64..3 * slots as u64 {
        update(&mut |t| _ = t.insert(i, token.clone()));
    }
    d.barrier();
    let grown = t.chunk_bytes();
    assert!((2 * CHUNK..=4 * CHUNK).contains(&grown), "{grown} bytes");
    // Churn reuses slots: no more chunks.
    for round in 0..3 {
        for i in (round..3 * slots as u64).step_by(7) {
            update(&mut |t| _ = t.insert(i, token.clone()));
        }
    }
    d.barrier();
    assert_eq!(t.chunk_bytes(), grown, "churn mapped more chunks");
    // Shrunk below a quarter chunk's worth: copied back into allocator memory, and every
    // chunk is unmapped once the old nodes are reclaimed.
    let keep = slots as u64 / 4 - 1;
    for i in keep..3 * slots as u64 {
        update(&mut |t| _ = t.remove(&i));
    }
    d.barrier();
    assert_eq!(t.len(), keep as usize);
    assert_eq!(t.live_nodes(), t.len());
    assert_eq!(t.chunk_bytes(), 0);
    assert_eq!(StdArc::strong_count(&token), 1 + t.len());
    t.check_invariants().unwrap();
    assert!(t.iter(&d.register().read()).map(|(k, _)| *k).eq(0..keep));
    // And it grows into chunks again.
    for i in 0..=slots as u64 {
        t.insert(i, token.clone());
    }
    d.barrier();
    t.check_invariants().unwrap();
    assert!(t.chunk_bytes() > 0);
    assert_eq!(StdArc::strong_count(&token), 2 + slots);
    // A tree dropped while a batch still waits: the batch returns its slots to the
    // chunks it shares, which go when the batch does.
    t.insert(0, token.clone());
    drop(t);
    d.barrier();
    assert_eq!(StdArc::strong_count(&token), 1);
}
