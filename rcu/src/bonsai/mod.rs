//! The Bonsai tree: an RCU weight-balanced binary search tree (Clements, Kaashoek, Zeldovich,
//! "Scalable Address Spaces Using RCU Balanced Trees", ASPLOS 2012).
//!
//! # Design
//!
//! - **Readers** load the root once with an acquire load and descend with acquire loads of
//!   child pointers: no lock, no retry, no atomic read-modify-write. References they get are
//!   tied to their [`ReadGuard`], so they cannot outlive the read-side critical section.
//! - **Writers** are serialised by a mutex and never modify a node that a reader can reach.
//!   Every update copies the path from the root to the changed nodes (rotations operate on the
//!   copies), so one update allocates O(log n) nodes. All the changes of one transaction
//!   ([`BonsaiTree::update`]) build one new version, which becomes visible with a *single*
//!   release store of the root pointer: a reader sees the whole transaction or none of it.
//!   (The paper publishes single-key updates with a store into an existing node's child
//!   pointer where rebalancing stops; compound updates such as a range split must be atomic,
//!   so we always copy up to the root — O(log n) either way.)
//! - A node allocated by the open transaction is *fresh*: no reader can see it, so the writer
//!   mutates it in place (a second change on the same path, or a rotation over it, allocates
//!   nothing). Fresh nodes that the transaction itself discards are freed at commit, never
//!   having been visible. Published nodes the transaction replaces are collected in one `Vec`
//!   and retired with a single [`Domain::defer_drop`] per transaction, freed after a grace
//!   period. Nodes do not own their children (raw pointers, no drop glue), so freeing a
//!   retired node frees that node only; the tree's own `Drop` frees the live version.
//! - **Node memory is recycled**: after its grace period a retired node's key and value are
//!   dropped and its memory goes to a small per-tree pool (at most [`POOL_CAP`] nodes; the
//!   rest is freed) from which the writer allocates. Under a steady writer the reclaiming
//!   thread then frees nothing and the writer allocates nothing. With the allocator doing
//!   both across threads (a `free` of nodes another thread allocated, under the allocator's
//!   arena lock), a steady writer managed 2.5–4x fewer updates a second and concurrent
//!   lookups at 10k–1M entries took 2.4–4x longer (docs/range_map.md).
//! - **Big trees live on huge pages**: once a tree has a 2 MiB page's worth of entries (about
//!   44k for `RangeMap<u64>`), new nodes come from 2 MiB chunks mapped for it and advised for
//!   transparent huge pages (`crate::chunks`), so that a lookup's twenty-odd nodes do not each
//!   cost a TLB miss; a reclaimed node's slot goes back to its chunk, and an empty chunk is
//!   unmapped (one is kept as a spare). A tree that shrinks below a quarter of that is copied
//!   back into allocator memory in one transaction, and its chunks go after the grace period.
//!   At 1M entries this made lookups 1.15–1.4x faster in A/B runs (docs/range_map.md).
//! - **Balance**: weight-balanced (Nievergelt–Reingold, Adams) with weight = size + 1 and
//!   parameters (Δ, Γ) = (3, 2), the integer pair Hirai and Yamamoto ("Balancing
//!   weight-balanced trees", JFP 2011) proved correct for single insertions and deletions with
//!   one single or double rotation per level. Height ≤ log₍₄⁄₃₎(n + 1) ≈ 2.4 log₂ n, in
//!   practice close to log₂ n.
//!
//! # Layout
//!
//! This file holds the tree type, its public operations and the node type. The rest, and
//! every `unsafe` block but the few here (the type's `Send`/`Sync`, the read guard's
//! promise that makes a readable version, the invariant checks and `Drop`), is in three
//! private submodules:
//!
//! - `alloc`: node memory. Where a node's memory comes from (the global allocator, the
//!   writer's stash, the pool, huge-page chunks) and where it goes when the node is dropped;
//!   retired batches and what they free after the grace period; freeing the live version.
//! - `iter`: reading one version: the descents (`find`, the branch-free `floor`, `ceiling`,
//!   `extreme`), the iterator, and the invariant checks; `Version`, a root readable for a
//!   lifetime, through which readers and the writer look nodes up without `unsafe`.
//! - `txn`: the writer's transaction: path copying, rebalancing, fresh nodes written in place,
//!   commit and abort, and compaction out of the chunks.
//!
//! The unit tests are in `tests` (no `unsafe`: `#![deny(unsafe_code)]`).
//!
//! ```
//! use rcu::{BonsaiTree, Domain};
//!
//! let domain = Domain::new();
//! let tree = BonsaiTree::new(&domain);
//! tree.insert(2u64, "two");
//! tree.update(|txn| {
//!     txn.insert(1, "one");
//!     txn.insert(3, "three");
//!     txn.remove(&2);
//! }); // readers see either {2} or {1, 3}, never a mix
//! let reader = domain.register();
//! let guard = reader.read();
//! assert_eq!(tree.get(&1, &guard), Some(&"one"));
//! assert_eq!(tree.floor(&2, &guard), Some((&1, &"one")));
//! let keys: Vec<u64> = tree.iter(&guard).map(|(k, _)| *k).collect();
//! assert_eq!(keys, [1, 3]);
//! ```

use std::borrow::Borrow;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::AtomicUsize as StatUsize;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc as StdArc;

use crate::sync::{lock, AtomicPtr, Mutex};
use crate::{Domain, ReadGuard};

mod alloc;
mod iter;
#[cfg(all(test, not(loom)))]
mod tests;
mod txn;

use alloc::{build_balanced, chunk_threshold, free_version, Scratch, Shared, Stash};
pub use iter::Iter;
use iter::{check_subtree, height, Version};
pub use txn::Txn;

/// Weight-balance parameter Δ: a subtree may weigh at most Δ times its sibling.
const DELTA: usize = 3;
/// Weight-balance parameter Γ: chooses a single rotation over a double one.
const GAMMA: usize = 2;
/// Top bit of `Node::size`: the node was allocated by the open transaction (not yet published).
const FRESH: usize = 1 << (usize::BITS - 1);
/// Most node allocations a tree keeps for reuse (in its pool, and again in the writer's
/// stash); about 256 KiB for `RangeMap<u64>` nodes.
pub const POOL_CAP: usize = 4096;

struct Node<K, V> {
    key: K,
    value: V,
    /// Nodes in this subtree, with [`FRESH`] or-ed in while the node is unpublished. Written
    /// only while the node is fresh (exclusively the writer's).
    size: usize,
    /// Child pointers. Written only while the node is fresh; published by the release store of
    /// the root. Readers load them with acquire (pairs with that release through the chain of
    /// publications).
    left: AtomicPtr<Node<K, V>>,
    right: AtomicPtr<Node<K, V>>,
}

type Link<K, V> = *mut Node<K, V>;

/// A concurrent ordered map with wait-free, lock-free readers (see the [module docs](self)).
///
/// Lookups take a [`ReadGuard`] of the tree's domain and return references that live as long
/// as the guard. Updates ([`insert`](Self::insert), [`remove`](Self::remove),
/// [`update`](Self::update)) serialise on a writer lock and publish with one release store.
pub struct BonsaiTree<K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    root: AtomicPtr<Node<K, V>>,
    domain: Domain,
    writer: Mutex<Scratch<K, V>>,
    /// Entries in the last published version (for `len` without a guard).
    len: StatUsize,
    shared: StdArc<Shared<K, V>>,
    _owns: PhantomData<(K, V)>,
}

// SAFETY: readers on any thread get `&K`/`&V` (`Sync`); keys and values are dropped on the
// reclamation thread or wherever the tree is dropped (`Send`). The raw pointers in `Scratch`
// are only touched under the writer lock, and nodes are shared read-only once published.
unsafe impl<K, V> Send for BonsaiTree<K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
}
// SAFETY: as for `Send`.
unsafe impl<K, V> Sync for BonsaiTree<K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
}

impl<K, V> BonsaiTree<K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// An empty tree whose retired nodes are reclaimed through `domain`.
    pub fn new(domain: &Domain) -> Self {
        Self {
            root: AtomicPtr::new(ptr::null_mut()),
            domain: domain.clone(),
            writer: Mutex::new(Scratch {
                fresh: Vec::new(),
                dead: Vec::new(),
                stash: Stash::new(),
            }),
            len: StatUsize::new(0),
            shared: StdArc::new(Shared::new()),
            _owns: PhantomData,
        }
    }

    /// A perfectly balanced tree built in O(n) from entries in strictly increasing key order.
    ///
    /// # Panics
    ///
    /// If the keys are not strictly increasing.
    pub fn from_sorted(domain: &Domain, entries: impl IntoIterator<Item = (K, V)>) -> Self {
        let entries: Vec<(K, V)> = entries.into_iter().collect();
        assert!(
            entries.windows(2).all(|w| w[0].0 < w[1].0),
            "BonsaiTree::from_sorted: keys not strictly increasing"
        );
        let n = entries.len();
        let tree = Self::new(domain);
        let mut it = entries.into_iter();
        let root = {
            let stash = &mut lock(&tree.writer).stash;
            build_balanced(n, &mut it, &mut || stash.take(&tree.shared, n))
        };
        tree.root.store(root, Release);
        tree.len.store(n, Relaxed);
        tree.shared.live.store(n, Relaxed);
        tree
    }

    /// The domain whose grace periods protect this tree's readers.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The published version, readable while `guard` lives.
    #[inline]
    fn version<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Version<'g, K, V> {
        assert!(
            guard.domain().same_as(&self.domain),
            "BonsaiTree read with a guard of another domain"
        );
        // Acquire pairs with the release store in `Txn::commit`: the nodes of the version
        // (and, through earlier publications, every node it shares) are fully visible.
        let root = self.root.load(Acquire);
        // SAFETY: `root` is the published root, loaded with acquire under a guard of the
        // tree's domain: its nodes are retired only after being unpublished, and freed only
        // after a grace period, which cannot end while the guard lives; readers load child
        // pointers with acquire.
        unsafe { Version::new(root, Acquire) }
    }

    /// The value for `key`.
    #[inline]
    pub fn get<'g, Q>(&'g self, key: &Q, guard: &'g ReadGuard<'_>) -> Option<&'g V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.version(guard).find(key).map(|n| &n.value)
    }

    /// The entry with the greatest key `<= key`.
    #[inline]
    pub fn floor<'g, Q>(&'g self, key: &Q, guard: &'g ReadGuard<'_>) -> Option<(&'g K, &'g V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.version(guard).floor(key).map(|n| (&n.key, &n.value))
    }

    /// The entry with the least key `>= key`.
    pub fn ceiling<'g, Q>(&'g self, key: &Q, guard: &'g ReadGuard<'_>) -> Option<(&'g K, &'g V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.version(guard).ceiling(key).map(|n| (&n.key, &n.value))
    }

    /// The entry with the least key.
    pub fn first<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Option<(&'g K, &'g V)> {
        self.version(guard)
            .extreme(false)
            .map(|n| (&n.key, &n.value))
    }

    /// The entry with the greatest key.
    pub fn last<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Option<(&'g K, &'g V)> {
        self.version(guard)
            .extreme(true)
            .map(|n| (&n.key, &n.value))
    }

    /// All entries in key order, from one consistent version (the root is loaded once).
    pub fn iter<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Iter<'g, K, V> {
        self.version(guard).iter(None::<&K>)
    }

    /// Entries with keys `>= from` in key order, from one consistent version.
    pub fn iter_from<'g, Q>(&'g self, from: &Q, guard: &'g ReadGuard<'_>) -> Iter<'g, K, V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.version(guard).iter(Some(from))
    }

    /// Entries in the published version (a counter updated at each commit).
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    /// Whether the published version is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Nodes allocated and not yet freed: the live version plus retired nodes still waiting
    /// for a grace period. After [`Domain::barrier`] with no update in flight it equals
    /// [`len`](Self::len).
    pub fn live_nodes(&self) -> usize {
        self.shared.live.load(Relaxed)
    }

    /// Bytes mapped for node memory in huge-page chunks (0 until the tree has a huge page's
    /// worth of nodes, 2 MiB each; see the [module docs](self)). The memory of smaller trees
    /// comes from the global allocator.
    pub fn chunk_bytes(&self) -> usize {
        self.shared.chunks.mapped_bytes()
    }

    /// Node allocations kept for reuse (memory of reclaimed nodes, no entries): at most
    /// 2 × [`POOL_CAP`]. Takes the writer lock.
    pub fn pooled_nodes(&self) -> usize {
        let stash = lock(&self.writer).stash.len();
        stash + lock(&self.shared.pool).len()
    }

    /// Inserts or replaces; returns the previous value. One transaction.
    pub fn insert(&self, key: K, value: V) -> Option<V> {
        self.update(|txn| txn.insert(key, value))
    }

    /// Removes `key`; returns its value. One transaction.
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.update(|txn| txn.remove(key))
    }

    /// Runs `f` on a writer transaction and publishes everything it did with one release
    /// store of the root: readers see all of it or none of it. Replaced nodes are retired
    /// with one [`Domain::defer_drop`]. If `f` panics nothing is published.
    ///
    /// Do not call this while holding a read guard of the tree's domain on this thread if the
    /// domain's backlog may be full: back-pressure would wait for a grace period.
    pub fn update<R>(&self, f: impl FnOnce(&mut Txn<'_, K, V>) -> R) -> R {
        match self.try_update(|txn| Ok::<R, Infallible>(f(txn))) {
            Ok(r) => r,
            Err(e) => match e {},
        }
    }

    /// Like [`update`](Self::update), but an `Err` from `f` aborts the transaction: nothing
    /// it did is published, and the tree is as before.
    pub fn try_update<R, E>(
        &self,
        f: impl FnOnce(&mut Txn<'_, K, V>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut txn = Txn::begin(self);
        let r = f(&mut txn)?;
        if let Some(retired) = txn.commit() {
            // After the writer lock is released: a back-pressure stall holds up no writer.
            self.domain.defer_drop(retired);
        }
        if self.shared.chunked() && self.len() < chunk_threshold::<K, V>() / 4 {
            self.compact();
        }
        Ok(r)
    }

    /// Checks the tree's invariants on the published version: strict key order, subtree
    /// sizes, weight balance (Δ = 3, Γ = 2 on weights size + 1), no node left marked fresh,
    /// and the length counter. A test and debugging helper: O(n), takes the writer lock.
    pub fn check_invariants(&self) -> Result<(), String> {
        let _w = lock(&self.writer);
        let root = self.root.load(Acquire);
        // SAFETY: under the writer lock the published version cannot be retired.
        let n = unsafe { check_subtree(root, None, None) }?;
        let len = self.len.load(Relaxed);
        if n != len {
            return Err(format!("tree has {n} nodes, length counter says {len}"));
        }
        Ok(())
    }

    /// The height of the published tree (0 when empty). O(n); for tests and benchmarks.
    pub fn height(&self) -> usize {
        let _w = lock(&self.writer);
        // SAFETY: under the writer lock the published version cannot be retired.
        unsafe { height(self.root.load(Acquire)) }
    }
}

impl<K, V> Drop for BonsaiTree<K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        // `&mut self`: no reader holds a reference (reads borrow the tree) and no transaction
        // is open. Retired nodes are not reachable from the root and are freed by their batch.
        // SAFETY: so the live version is exclusively ours; its memory came from the stash.
        unsafe { free_version(self.root.load(Relaxed), &self.shared) };
        lock(&self.writer).stash.release(&self.shared);
    }
}

impl<K, V> std::fmt::Debug for BonsaiTree<K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BonsaiTree")
            .field("len", &self.len())
            .field("live_nodes", &self.live_nodes())
            .finish_non_exhaustive()
    }
}
