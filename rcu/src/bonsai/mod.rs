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
use std::cmp::Ordering as Cmp;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::AtomicUsize as StatUsize;
use std::sync::atomic::Ordering::{self, Acquire, Relaxed, Release};
use std::sync::Arc as StdArc;

use crate::chunks::Chunks;
use crate::sync::{lock, AtomicPtr, Mutex, MutexGuard};
use crate::{Domain, ReadGuard};

/// Weight-balance parameter Δ: a subtree may weigh at most Δ times its sibling.
const DELTA: usize = 3;
/// Weight-balance parameter Γ: chooses a single rotation over a double one.
const GAMMA: usize = 2;
/// Top bit of `Node::size`: the node was allocated by the open transaction (not yet published).
const FRESH: usize = 1 << (usize::BITS - 1);
/// Most node allocations a tree keeps for reuse (in its pool, and again in the writer's
/// stash); about 256 KiB for `RangeMap<u64>` nodes.
pub const POOL_CAP: usize = 4096;
/// What a freed node's `size` holds just before its memory is released (debugging aid).
const POISON_SIZE: usize = 0x0bad_f00d_0bad_f00d_u64 as usize;

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

/// The subtree size of `p` (0 for null).
///
/// # Safety
///
/// `p` is null or points to a live node.
#[inline]
unsafe fn size<K, V>(p: Link<K, V>) -> usize {
    // SAFETY: per the contract.
    unsafe { p.as_ref() }.map_or(0, |n| n.size & !FRESH)
}

/// Drops a node that no reader can reach any more, without touching its children, and
/// leaves its memory allocated and uninitialised (for [`Shared::recycle`] or
/// [`dealloc_node`]).
///
/// # Safety
///
/// `p` points to an initialised node in memory from [`Stash::take`], is unreachable by readers (never published, or retired and a grace period has passed) and is
/// dropped exactly once.
unsafe fn drop_node<K, V>(p: Link<K, V>) {
    // SAFETY: per the contract the node is initialised and exclusively ours.
    let n = unsafe { &mut *p };
    // Poison what a use-after-free reader would look at first. The key and value are dropped
    // just after (test values poison themselves in their `Drop`); the links stay poisoned
    // until the memory is reused.
    // SAFETY: `n.size` is a valid, exclusively owned field.
    unsafe { ptr::write_volatile(&mut n.size, POISON_SIZE) };
    n.left.store(ptr::dangling_mut(), Relaxed);
    n.right.store(ptr::dangling_mut(), Relaxed);
    // SAFETY: initialised and dropped once (the contract); the memory is not freed.
    unsafe { ptr::drop_in_place(p) };
}

/// Node memory, uninitialised, fresh from the allocator.
fn alloc_node<K, V>() -> Link<K, V> {
    Box::into_raw(Box::<Node<K, V>>::new_uninit()).cast()
}

/// Frees node memory from [`alloc_node`] whose node was dropped ([`drop_node`]) or never
/// written.
///
/// # Safety
///
/// `p` came from [`alloc_node`], holds no live node, and is freed once.
unsafe fn dealloc_node<K, V>(p: Link<K, V>) {
    // SAFETY: allocated as a `Box` of this layout; `MaybeUninit` drops nothing.
    drop(unsafe { Box::from_raw(p.cast::<std::mem::MaybeUninit<Node<K, V>>>()) });
}

/// Node memory the writer takes from the chunks at once.
const CHUNK_REFILL: usize = 256;

/// Entries from which a tree takes node memory from chunks: a chunk's worth (never, for node
/// types that chunks do not serve).
fn chunk_threshold<K, V>() -> usize {
    match Chunks::<Node<K, V>>::SLOTS {
        0 => usize::MAX,
        slots => slots,
    }
}

/// What a tree shares with its retired batches, which may outlive it: the node counter and
/// where node memory comes from and goes back to.
///
/// Node memory comes from the allocator ([`alloc_node`]) while the tree is small. Once the
/// tree has a huge page's worth of entries it comes from [`Chunks`] (see there), and slots go
/// back to their chunk when their node is reclaimed. Once it has shrunk below a quarter of that
/// again, the writer copies it back into allocator memory (`BonsaiTree::compact`), and the
/// chunks go as their nodes are reclaimed. Allocator memory of reclaimed nodes goes to `pool`
/// for reuse while the tree is small.
struct Shared<K, V> {
    /// Nodes allocated and not yet dropped (published or awaiting reclamation).
    live: StatUsize,
    /// Allocator memory of dropped nodes (uninitialised), at most [`POOL_CAP`], for the writer
    /// to reuse.
    pool: Mutex<Vec<Link<K, V>>>,
    chunks: Chunks<Node<K, V>>,
    /// Whether new nodes come from the chunks. Written under the writer lock; read by the
    /// reclaimer to decide where memory goes (a stale value only misplaces a little of it).
    chunked: std::sync::atomic::AtomicBool,
}

// SAFETY: the pool and the chunks hold only uninitialised memory (no `K` or `V`), owned by
// them alone; it is freed by whichever thread drops `Shared` or returns memory.
unsafe impl<K, V> Send for Shared<K, V> {}
// SAFETY: as for `Send`; the pool and the chunks are behind mutexes.
unsafe impl<K, V> Sync for Shared<K, V> {}

impl<K, V> Shared<K, V> {
    fn new() -> Self {
        Self {
            live: StatUsize::new(0),
            pool: Mutex::new(Vec::new()),
            chunks: Chunks::new(),
            chunked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn chunked(&self) -> bool {
        self.chunked.load(Relaxed)
    }

    /// Returns the memory of `nodes` (dropped, see [`drop_node`]): slots to their chunks;
    /// allocator memory to the pool, up to [`POOL_CAP`] and while the tree is small, or else
    /// to the allocator.
    ///
    /// # Safety
    ///
    /// Each of `nodes` came from [`Stash::take`], holds no live node, is listed once, and is
    /// owned by the caller.
    unsafe fn recycle(&self, nodes: &[Link<K, V>]) {
        let mut pool = lock(&self.pool);
        let chunked = self.chunked();
        // SAFETY: the contract; memory that is not a slot came from `alloc_node`.
        unsafe {
            self.chunks.free(nodes, chunked, |p| {
                if !chunked && pool.len() < POOL_CAP {
                    pool.push(p);
                } else {
                    dealloc_node(p);
                }
            })
        };
    }

    /// Returns the memory of `nodes` (dropped) to its chunk or to the allocator.
    ///
    /// # Safety
    ///
    /// As for [`recycle`](Self::recycle).
    unsafe fn dealloc(&self, nodes: &[Link<K, V>]) {
        // SAFETY: the contract; memory that is not a slot came from `alloc_node`.
        unsafe { self.chunks.free(nodes, self.chunked(), |p| dealloc_node(p)) };
    }
}

impl<K, V> Drop for Shared<K, V> {
    fn drop(&mut self) {
        let pool = std::mem::take(&mut *lock(&self.pool));
        // SAFETY: pooled memory holds no node and is owned by the pool alone.
        unsafe { self.dealloc(&pool) };
    }
}

/// Nodes replaced by one transaction, retired together with one `defer_drop`.
struct Retired<K, V> {
    nodes: Vec<Link<K, V>>,
    shared: StdArc<Shared<K, V>>,
}

// SAFETY: a `Retired` owns its nodes exclusively (they are unreachable from the tree and are
// freed only by this value's drop); freeing one drops a `K` and a `V`, which are `Send`.
unsafe impl<K: Send, V: Send> Send for Retired<K, V> {}

impl<K, V> Drop for Retired<K, V> {
    fn drop(&mut self) {
        for &p in &self.nodes {
            // SAFETY: each node was unpublished by the transaction that retired it, which
            // happened before `defer_drop`; we run after a grace period, and each node is in
            // exactly one batch.
            unsafe { drop_node(p) };
        }
        self.shared.live.fetch_sub(self.nodes.len(), Relaxed);
        // SAFETY: dropped just above, each listed once, and this batch owned them.
        unsafe { self.shared.recycle(&self.nodes) };
    }
}

/// Writer-side scratch space, reused across transactions; the mutex around it is the writer
/// lock.
struct Scratch<K, V> {
    /// Every node allocated by the open transaction.
    fresh: Vec<Link<K, V>>,
    /// Fresh nodes the open transaction removed again (a subset of `fresh`).
    dead: Vec<Link<K, V>>,
    /// Node memory for the writer's next allocations.
    stash: Stash<K, V>,
}

/// Node memory (uninitialised) for the writer's next allocations, taken from the pool in one
/// swap or from the chunks in batches, so that the writer takes a lock once per refill, not
/// once per node. Emptied by the tree's `Drop` (it cannot return memory on its own).
struct Stash<K, V>(Vec<Link<K, V>>);

impl<K, V> Stash<K, V> {
    /// Memory for one node of a tree of about `entries`: from the stash, refilled from the
    /// pool or the chunks, or from the allocator.
    fn take(&mut self, shared: &Shared<K, V>, entries: usize) -> Link<K, V> {
        if let Some(p) = self.0.pop() {
            return p;
        }
        {
            let mut pool = lock(&shared.pool);
            if !pool.is_empty() {
                std::mem::swap(&mut self.0, &mut *pool);
            }
        }
        if self.0.is_empty() && !shared.chunked() && entries >= chunk_threshold::<K, V>() {
            // Written under the writer lock (every caller holds it).
            shared.chunked.store(true, Relaxed);
        }
        if self.0.is_empty() && shared.chunked() {
            shared.chunks.alloc(&mut self.0, CHUNK_REFILL);
        }
        self.0.pop().unwrap_or_else(alloc_node)
    }

    /// Returns everything stashed (to the chunks or the allocator).
    fn release(&mut self, shared: &Shared<K, V>) {
        let stash = std::mem::take(&mut self.0);
        // SAFETY: stashed memory holds no node and is the stash's alone.
        unsafe { shared.dealloc(&stash) };
    }

    /// Keeps the memory of a dropped node for the writer's next allocation (or returns it if
    /// the stash is full).
    ///
    /// # Safety
    ///
    /// `p` came from [`take`](Self::take), holds no live node and is owned by the caller.
    unsafe fn keep(&mut self, p: Link<K, V>, shared: &Shared<K, V>) {
        if self.0.len() < POOL_CAP {
            self.0.push(p);
        } else {
            // SAFETY: the contract.
            unsafe { shared.dealloc(&[p]) };
        }
    }
}

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
                stash: Stash(Vec::new()),
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

    #[inline]
    fn load_root(&self, guard: &ReadGuard<'_>) -> Link<K, V> {
        assert!(
            guard.domain().same_as(&self.domain),
            "BonsaiTree read with a guard of another domain"
        );
        // Acquire pairs with the release store in `Txn::commit`: the nodes of the version
        // (and, through earlier publications, every node it shares) are fully visible.
        self.root.load(Acquire)
    }

    /// The value for `key`.
    #[inline]
    pub fn get<'g, Q>(&'g self, key: &Q, guard: &'g ReadGuard<'_>) -> Option<&'g V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let root = self.load_root(guard);
        // SAFETY: `root` is the published root; see `deref`.
        unsafe { find(root, key, Acquire) }.map(|n| &n.value)
    }

    /// The entry with the greatest key `<= key`.
    #[inline]
    pub fn floor<'g, Q>(&'g self, key: &Q, guard: &'g ReadGuard<'_>) -> Option<(&'g K, &'g V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let root = self.load_root(guard);
        // SAFETY: `root` is the published root; see `deref`.
        unsafe { floor(root, key, Acquire) }.map(|n| (&n.key, &n.value))
    }

    /// The entry with the least key `>= key`.
    pub fn ceiling<'g, Q>(&'g self, key: &Q, guard: &'g ReadGuard<'_>) -> Option<(&'g K, &'g V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let root = self.load_root(guard);
        // SAFETY: `root` is the published root; see `deref`.
        unsafe { ceiling(root, key, Acquire) }.map(|n| (&n.key, &n.value))
    }

    /// The entry with the least key.
    pub fn first<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Option<(&'g K, &'g V)> {
        let root = self.load_root(guard);
        // SAFETY: `root` is the published root; see `deref`.
        unsafe { extreme(root, false, Acquire) }.map(|n| (&n.key, &n.value))
    }

    /// The entry with the greatest key.
    pub fn last<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Option<(&'g K, &'g V)> {
        let root = self.load_root(guard);
        // SAFETY: `root` is the published root; see `deref`.
        unsafe { extreme(root, true, Acquire) }.map(|n| (&n.key, &n.value))
    }

    /// All entries in key order, from one consistent version (the root is loaded once).
    pub fn iter<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Iter<'g, K, V> {
        let root = self.load_root(guard);
        Iter::new(root, None::<&K>)
    }

    /// Entries with keys `>= from` in key order, from one consistent version.
    pub fn iter_from<'g, Q>(&'g self, from: &Q, guard: &'g ReadGuard<'_>) -> Iter<'g, K, V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let root = self.load_root(guard);
        Iter::new(root, Some(from))
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
        let stash = lock(&self.writer).stash.0.len();
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

    /// Moves a tree that has shrunk out of its chunks: one transaction copies every entry
    /// into allocator memory (a balanced tree built in O(n)) and retires every old node, so
    /// that the chunks empty and are unmapped after the grace period. Runs when a tree whose
    /// nodes live in chunks falls below a quarter of a chunk's worth of entries: at most once
    /// per that many removals, so O(1) amortised per update.
    fn compact(&self) {
        let mut txn = Txn::begin(self);
        if !self.shared.chunked() {
            return; // another writer got here first
        }
        self.shared.chunked.store(false, Relaxed);
        let scratch = &mut *txn.scratch;
        debug_assert!(scratch.fresh.is_empty());
        scratch.stash.release(&self.shared);
        // SAFETY: the transaction's nodes stay valid while it is borrowed (see `deref`).
        let entries: Vec<(K, V)> = Iter::new(txn.root, None::<&K>)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Published (the transaction has allocated nothing): retire them all.
        // SAFETY: the version's nodes stay valid while the transaction is borrowed.
        unsafe { each_node(txn.root, |p| txn.retired.push(p)) };
        let n = entries.len();
        txn.root = build_balanced(n, &mut entries.into_iter(), &mut || {
            let p = scratch.stash.take(&self.shared, 0);
            scratch.fresh.push(p);
            p
        });
        if let Some(retired) = txn.commit() {
            self.domain.defer_drop(retired);
        }
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
        let mut dropped = Vec::new();
        let mut freed = 0;
        // SAFETY: the live version is exclusively ours (see above); `each_node` reads a
        // node's children before handing it over, so it may be dropped there.
        unsafe {
            each_node(self.root.load(Relaxed), |p| {
                drop_node(p);
                dropped.push(p);
                freed += 1;
                if dropped.len() == 1024 {
                    // Dropped just above, each once; memory from `Stash::take`.
                    self.shared.dealloc(&dropped);
                    dropped.clear();
                }
            });
            // As above, the last batch.
            self.shared.dealloc(&dropped);
        }
        self.shared.live.fetch_sub(freed, Relaxed);
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

/// Calls `f` on every node of the tree under `root`, each once, after reading its children
/// (so `f` may drop or free it).
///
/// # Safety
///
/// The nodes under `root` stay valid until `f` is called on them, and nothing else changes
/// their links meanwhile.
unsafe fn each_node<K, V>(root: Link<K, V>, mut f: impl FnMut(Link<K, V>)) {
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        // SAFETY: per the contract, `p` is null or a valid node not yet handed to `f`.
        if let Some(n) = unsafe { p.as_ref() } {
            stack.push(n.left.load(Relaxed));
            stack.push(n.right.load(Relaxed));
            f(p);
        }
    }
}

/// Builds a perfectly balanced tree of the next `n` entries (published: not fresh), with node
/// memory from `alloc`.
fn build_balanced<K, V>(
    n: usize,
    it: &mut impl Iterator<Item = (K, V)>,
    alloc: &mut impl FnMut() -> Link<K, V>,
) -> Link<K, V> {
    if n == 0 {
        return ptr::null_mut();
    }
    let left_n = n / 2;
    let left = build_balanced(left_n, it, alloc);
    let (key, value) = it.next().expect("counted entries");
    let right = build_balanced(n - left_n - 1, it, alloc);
    let p = alloc();
    // SAFETY: fresh memory for one node.
    unsafe {
        p.write(Node {
            key,
            value,
            size: n,
            left: AtomicPtr::new(left),
            right: AtomicPtr::new(right),
        })
    };
    p
}

/// Dereferences a node reached from a root the caller may read.
///
/// # Safety
///
/// `p` is null or a node reachable from a root that stays valid for `'a`: a published root
/// loaded under a read guard (nodes are retired only after being unpublished and freed only
/// after a grace period, which cannot end while the guard lives), or a transaction's root
/// while the transaction is borrowed.
#[inline]
unsafe fn deref<'a, K, V>(p: Link<K, V>) -> Option<&'a Node<K, V>> {
    // SAFETY: per the contract.
    unsafe { p.as_ref() }
}

/// # Safety
///
/// As for [`deref`], for every node reachable from `root`.
#[inline]
unsafe fn find<'a, K: Borrow<Q>, V, Q: Ord + ?Sized>(
    root: Link<K, V>,
    key: &Q,
    ord: Ordering,
) -> Option<&'a Node<K, V>> {
    let mut p = root;
    // SAFETY: per the contract, for each node on the path.
    while let Some(n) = unsafe { deref(p) } {
        p = match key.cmp(n.key.borrow()) {
            Cmp::Less => n.left.load(ord),
            Cmp::Greater => n.right.load(ord),
            Cmp::Equal => return Some(n),
        };
    }
    None
}

/// # Safety
///
/// As for [`deref`], for every node reachable from `root`.
#[inline]
unsafe fn floor<'a, K: Borrow<Q>, V, Q: Ord + ?Sized>(
    root: Link<K, V>,
    key: &Q,
    ord: Ordering,
) -> Option<&'a Node<K, V>> {
    // Branch-free descent (the comparison selects, it does not jump): a random address is an
    // unpredictable branch at every level, so this trades mispredictions for a data
    // dependency. An exact hit descends on to a leaf (every key in the right subtree is
    // greater, so `best` stays put).
    let mut p = root;
    let mut best: *const Node<K, V> = ptr::null();
    // SAFETY: per the contract, for each node on the path.
    while let Some(n) = unsafe { deref(p) } {
        let go_right = key >= n.key.borrow();
        best = if go_right { n } else { best };
        p = if go_right { &n.right } else { &n.left }.load(ord);
    }
    // SAFETY: `best` is null or a node on the path.
    unsafe { best.as_ref() }
}

/// # Safety
///
/// As for [`deref`], for every node reachable from `root`.
unsafe fn ceiling<'a, K: Borrow<Q>, V, Q: Ord + ?Sized>(
    root: Link<K, V>,
    key: &Q,
    ord: Ordering,
) -> Option<&'a Node<K, V>> {
    let mut p = root;
    let mut best = None;
    // SAFETY: per the contract, for each node on the path.
    while let Some(n) = unsafe { deref(p) } {
        p = match key.cmp(n.key.borrow()) {
            Cmp::Less => {
                best = Some(n);
                n.left.load(ord)
            }
            Cmp::Greater => n.right.load(ord),
            Cmp::Equal => return Some(n),
        };
    }
    best
}

/// The leftmost (`right == false`) or rightmost node.
///
/// # Safety
///
/// As for [`deref`], for every node reachable from `root`.
unsafe fn extreme<'a, K, V>(
    root: Link<K, V>,
    right: bool,
    ord: Ordering,
) -> Option<&'a Node<K, V>> {
    // SAFETY: per the contract.
    let mut n = unsafe { deref(root) }?;
    loop {
        let next = if right { &n.right } else { &n.left }.load(ord);
        // SAFETY: per the contract.
        match unsafe { deref(next) } {
            Some(c) => n = c,
            None => return Some(n),
        }
    }
}

/// # Safety
///
/// Every node reachable from `p` is live and not concurrently modified.
unsafe fn check_subtree<K: Ord, V>(
    p: Link<K, V>,
    lo: Option<&K>,
    hi: Option<&K>,
) -> Result<usize, String> {
    // SAFETY: per the contract.
    let Some(n) = (unsafe { deref(p) }) else {
        return Ok(0);
    };
    if n.size & FRESH != 0 {
        return Err("published node still marked fresh".into());
    }
    if lo.is_some_and(|lo| n.key <= *lo) || hi.is_some_and(|hi| n.key >= *hi) {
        return Err("keys out of order".into());
    }
    // SAFETY: per the contract.
    let l = unsafe { check_subtree(n.left.load(Relaxed), lo, Some(&n.key)) }?;
    // SAFETY: per the contract.
    let r = unsafe { check_subtree(n.right.load(Relaxed), Some(&n.key), hi) }?;
    if n.size != l + r + 1 {
        return Err(format!("size {} != {l} + {r} + 1", n.size));
    }
    let (wl, wr) = (l + 1, r + 1);
    if wl > DELTA * wr || wr > DELTA * wl {
        return Err(format!("unbalanced: subtree sizes {l} and {r}"));
    }
    Ok(n.size)
}

/// # Safety
///
/// As for [`check_subtree`].
unsafe fn height<K, V>(p: Link<K, V>) -> usize {
    // SAFETY: per the contract.
    match unsafe { deref(p) } {
        None => 0,
        // SAFETY: per the contract.
        Some(n) => 1 + unsafe { height(n.left.load(Relaxed)).max(height(n.right.load(Relaxed))) },
    }
}

/// An in-order iterator over one version of a [`BonsaiTree`] (see [`BonsaiTree::iter`]).
pub struct Iter<'g, K, V> {
    /// Nodes whose own entry and right subtree are still to be visited, innermost last.
    stack: Vec<*const Node<K, V>>,
    _guard: PhantomData<&'g (K, V)>,
}

impl<'g, K, V> Iter<'g, K, V> {
    fn new<Q>(root: Link<K, V>, from: Option<&Q>) -> Self
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let mut it = Self {
            stack: Vec::with_capacity(48),
            _guard: PhantomData,
        };
        match from {
            None => it.push_left(root),
            Some(from) => {
                let mut p = root;
                // SAFETY: `root` was loaded under the guard that 'g borrows (see `deref`).
                while let Some(n) = unsafe { deref(p) } {
                    if from <= n.key.borrow() {
                        it.stack.push(n);
                        p = n.left.load(Acquire);
                    } else {
                        p = n.right.load(Acquire);
                    }
                }
            }
        }
        it
    }

    fn push_left(&mut self, mut p: Link<K, V>) {
        // SAFETY: `p` is reachable from the root loaded under the guard 'g borrows.
        while let Some(n) = unsafe { deref(p) } {
            self.stack.push(n);
            p = n.left.load(Acquire);
        }
    }
}

impl<'g, K: 'g, V: 'g> Iterator for Iter<'g, K, V> {
    type Item = (&'g K, &'g V);

    fn next(&mut self) -> Option<Self::Item> {
        let p = self.stack.pop()?;
        // SAFETY: `p` is reachable from the root loaded under the guard 'g borrows.
        let n: &'g Node<K, V> = unsafe { &*p };
        self.push_left(n.right.load(Acquire));
        Some((&n.key, &n.value))
    }
}

/// A writer transaction on a [`BonsaiTree`] (see [`BonsaiTree::update`]). Holds the writer
/// lock. Reads through it see the transaction's own changes.
pub struct Txn<'t, K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    tree: &'t BonsaiTree<K, V>,
    scratch: MutexGuard<'t, Scratch<K, V>>,
    /// The root of the version being built.
    root: Link<K, V>,
    /// Entries in the version being built.
    len: usize,
    /// Published nodes this transaction replaced.
    retired: Vec<Link<K, V>>,
    committed: bool,
}

impl<'t, K, V> Txn<'t, K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn begin(tree: &'t BonsaiTree<K, V>) -> Self {
        let scratch = lock(&tree.writer);
        debug_assert!(scratch.fresh.is_empty() && scratch.dead.is_empty());
        Self {
            tree,
            scratch,
            // Under the writer lock nobody else publishes; relaxed suffices (the previous
            // writer's stores happen-before our lock acquisition).
            root: tree.root.load(Relaxed),
            len: tree.len.load(Relaxed),
            retired: Vec::new(),
            committed: false,
        }
    }

    /// Publishes the version built; returns the batch to retire, if any.
    fn commit(mut self) -> Option<Retired<K, V>> {
        self.committed = true;
        let scratch = &mut *self.scratch;
        for &p in &scratch.fresh {
            // SAFETY: fresh nodes (live or dead) are allocated and exclusively ours.
            unsafe { (*p).size &= !FRESH };
        }
        for &p in &scratch.dead {
            // SAFETY: a dead node was allocated by this transaction and removed from its
            // version before it was ever published; it is in `dead` once. Dropped, its
            // memory is ours to reuse.
            unsafe {
                drop_node(p);
                scratch.stash.keep(p, &self.tree.shared);
            }
        }
        let allocated = scratch.fresh.len() - scratch.dead.len();
        scratch.fresh.clear();
        scratch.dead.clear();
        self.tree.shared.live.fetch_add(allocated, Relaxed);
        if self.root != self.tree.root.load(Relaxed) {
            // The one publication of the transaction. Release: every node of the new version
            // (written above or by earlier writers) is visible to a reader whose acquire load
            // of the root sees this pointer.
            self.tree.root.store(self.root, Release);
        }
        self.tree.len.store(self.len, Relaxed);
        let nodes = std::mem::take(&mut self.retired);
        (!nodes.is_empty()).then(|| Retired {
            nodes,
            shared: self.tree.shared.clone(),
        })
    }

    /// Entries in the version being built.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the version being built is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value for `key` in the version being built.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // SAFETY: the transaction's nodes stay valid while it is borrowed (see `deref`).
        unsafe { find(self.root, key, Relaxed) }.map(|n| &n.value)
    }

    /// The entry with the greatest key `<= key` in the version being built.
    pub fn floor<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // SAFETY: as in `get`.
        unsafe { floor(self.root, key, Relaxed) }.map(|n| (&n.key, &n.value))
    }

    /// The entry with the least key `>= key` in the version being built.
    pub fn ceiling<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // SAFETY: as in `get`.
        unsafe { ceiling(self.root, key, Relaxed) }.map(|n| (&n.key, &n.value))
    }

    /// The first entry of the version being built.
    pub fn first(&self) -> Option<(&K, &V)> {
        // SAFETY: as in `get`.
        unsafe { extreme(self.root, false, Relaxed) }.map(|n| (&n.key, &n.value))
    }

    /// The last entry of the version being built.
    pub fn last(&self) -> Option<(&K, &V)> {
        // SAFETY: as in `get`.
        unsafe { extreme(self.root, true, Relaxed) }.map(|n| (&n.key, &n.value))
    }

    /// The entries of the version being built, in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter::new(self.root, None::<&K>)
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let (root, old) = self.ins(self.root, key, value);
        self.root = root;
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`; returns its value.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (root, old) = self.rem(self.root, key);
        self.root = root;
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    // ---- node plumbing. Every `Link` below is null or a live node of the version being built
    // (published nodes it shares, or fresh ones); only fresh nodes are written.

    fn alloc(&mut self, key: K, value: V, left: Link<K, V>, right: Link<K, V>) -> Link<K, V> {
        // SAFETY: children are null or live nodes of the version being built.
        let size = 1 + unsafe { size(left) + size(right) };
        let p = self.scratch.stash.take(&self.tree.shared, self.len);
        // SAFETY: `take` returns memory for one node that holds none and is ours alone.
        unsafe {
            p.write(Node {
                key,
                value,
                size: size | FRESH,
                left: AtomicPtr::new(left),
                right: AtomicPtr::new(right),
            })
        };
        self.scratch.fresh.push(p);
        p
    }

    #[inline]
    fn is_fresh(p: Link<K, V>) -> bool {
        // SAFETY: `p` is a live node (non-null by the callers' contract).
        unsafe { (*p).size & FRESH != 0 }
    }

    #[inline]
    fn children(p: Link<K, V>) -> (Link<K, V>, Link<K, V>) {
        // SAFETY: `p` is a live node.
        let n = unsafe { &*p };
        (n.left.load(Relaxed), n.right.load(Relaxed))
    }

    #[inline]
    fn left(p: Link<K, V>) -> Link<K, V> {
        Self::children(p).0
    }

    #[inline]
    fn right(p: Link<K, V>) -> Link<K, V> {
        Self::children(p).1
    }

    /// Sets a fresh node's children and recomputes its size.
    #[inline]
    fn set(p: Link<K, V>, left: Link<K, V>, right: Link<K, V>) {
        debug_assert!(Self::is_fresh(p));
        // SAFETY: `p` is fresh: unreachable by readers and exclusively the writer's. The
        // stores are relaxed: the release store of the root publishes them.
        unsafe {
            (*p).left.store(left, Relaxed);
            (*p).right.store(right, Relaxed);
            (*p).size = (1 + size(left) + size(right)) | FRESH;
        }
    }

    /// A writable version of `p`: `p` itself if fresh, else a fresh copy (and `p` is retired).
    fn cow(&mut self, p: Link<K, V>) -> Link<K, V> {
        if Self::is_fresh(p) {
            return p;
        }
        // SAFETY: `p` is a live published node; we only read it.
        let n = unsafe { &*p };
        let (l, r) = (n.left.load(Relaxed), n.right.load(Relaxed));
        let c = self.alloc(n.key.clone(), n.value.clone(), l, r);
        self.retired.push(p);
        c
    }

    /// `p` leaves the version being built for good.
    fn discard(&mut self, p: Link<K, V>) {
        if Self::is_fresh(p) {
            self.scratch.dead.push(p);
        } else {
            self.retired.push(p);
        }
    }

    /// Restores the weight balance at fresh node `t`, whose subtrees changed by at most one
    /// insertion or deletion since they were balanced; returns the subtree's new root.
    fn balance(&mut self, t: Link<K, V>) -> Link<K, V> {
        let (l, r) = Self::children(t);
        // SAFETY: live nodes or null.
        let (wl, wr) = unsafe { (size(l) + 1, size(r) + 1) };
        if wr > DELTA * wl {
            let (rl, rr) = Self::children(r);
            // SAFETY: live nodes or null.
            if unsafe { size(rl) + 1 < GAMMA * (size(rr) + 1) } {
                // Single left rotation.
                let r = self.cow(r);
                Self::set(t, l, rl);
                Self::set(r, t, rr);
                r
            } else {
                // Double rotation: rl becomes the root.
                let r = self.cow(r);
                let rl = self.cow(rl);
                let (rll, rlr) = Self::children(rl);
                Self::set(t, l, rll);
                Self::set(r, rlr, rr);
                Self::set(rl, t, r);
                rl
            }
        } else if wl > DELTA * wr {
            let (ll, lr) = Self::children(l);
            // SAFETY: live nodes or null.
            if unsafe { size(lr) + 1 < GAMMA * (size(ll) + 1) } {
                let l = self.cow(l);
                Self::set(t, lr, r);
                Self::set(l, ll, t);
                l
            } else {
                let l = self.cow(l);
                let lr = self.cow(lr);
                let (lrl, lrr) = Self::children(lr);
                Self::set(t, lrr, r);
                Self::set(l, ll, lrl);
                Self::set(lr, l, t);
                lr
            }
        } else {
            Self::set(t, l, r);
            t
        }
    }

    fn ins(&mut self, t: Link<K, V>, key: K, value: V) -> (Link<K, V>, Option<V>) {
        if t.is_null() {
            return (
                self.alloc(key, value, ptr::null_mut(), ptr::null_mut()),
                None,
            );
        }
        let (l, r) = Self::children(t);
        // SAFETY: `t` is live; the borrow ends before `t` is written.
        let ord = key.cmp(unsafe { &(*t).key });
        match ord {
            Cmp::Less => {
                let (nl, old) = self.ins(l, key, value);
                let t = self.cow(t);
                Self::set(t, nl, Self::right(t));
                (self.balance(t), old)
            }
            Cmp::Greater => {
                let (nr, old) = self.ins(r, key, value);
                let t = self.cow(t);
                Self::set(t, Self::left(t), nr);
                (self.balance(t), old)
            }
            Cmp::Equal => {
                if Self::is_fresh(t) {
                    // SAFETY: fresh: exclusively ours.
                    let old = std::mem::replace(unsafe { &mut (*t).value }, value);
                    (t, Some(old))
                } else {
                    // SAFETY: `t` is live; we only read it.
                    let old = unsafe { (*t).value.clone() };
                    let c = self.alloc(key, value, l, r);
                    self.retired.push(t);
                    (c, Some(old))
                }
            }
        }
    }

    fn rem<Q>(&mut self, t: Link<K, V>, key: &Q) -> (Link<K, V>, Option<V>)
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        if t.is_null() {
            return (t, None);
        }
        let (l, r) = Self::children(t);
        // SAFETY: `t` is live; the borrow ends before `t` is written.
        let ord = key.cmp(unsafe { (*t).key.borrow() });
        match ord {
            Cmp::Less => {
                let (nl, old) = self.rem(l, key);
                if old.is_none() {
                    return (t, None);
                }
                let t = self.cow(t);
                Self::set(t, nl, r);
                (self.balance(t), old)
            }
            Cmp::Greater => {
                let (nr, old) = self.rem(r, key);
                if old.is_none() {
                    return (t, None);
                }
                let t = self.cow(t);
                Self::set(t, l, nr);
                (self.balance(t), old)
            }
            Cmp::Equal => {
                // SAFETY: `t` is live until the transaction ends (dead or retired).
                let old = unsafe { (*t).value.clone() };
                self.discard(t);
                (self.glue(l, r), Some(old))
            }
        }
    }

    /// Joins two subtrees that were siblings (balanced against each other), all keys of `l`
    /// below all keys of `r`.
    fn glue(&mut self, l: Link<K, V>, r: Link<K, V>) -> Link<K, V> {
        if l.is_null() {
            return r;
        }
        if r.is_null() {
            return l;
        }
        // SAFETY: live nodes.
        if unsafe { size(l) > size(r) } {
            let (nl, m) = self.remove_extreme(l, true);
            let m = self.cow(m);
            Self::set(m, nl, r);
            self.balance(m)
        } else {
            let (nr, m) = self.remove_extreme(r, false);
            let m = self.cow(m);
            Self::set(m, l, nr);
            self.balance(m)
        }
    }

    /// Detaches the maximum (`max`) or minimum node of non-empty subtree `t`; returns the
    /// remaining subtree and the detached node (still allocated, its links stale).
    fn remove_extreme(&mut self, t: Link<K, V>, max: bool) -> (Link<K, V>, Link<K, V>) {
        let (l, r) = Self::children(t);
        if max {
            if r.is_null() {
                return (l, t);
            }
            let (nr, m) = self.remove_extreme(r, true);
            let t = self.cow(t);
            Self::set(t, l, nr);
            (self.balance(t), m)
        } else {
            if l.is_null() {
                return (r, t);
            }
            let (nl, m) = self.remove_extreme(l, false);
            let t = self.cow(t);
            Self::set(t, nl, r);
            (self.balance(t), m)
        }
    }
}

impl<K, V> Drop for Txn<'_, K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Aborted (an `Err` or a panic): nothing was published. Free every node the
        // transaction allocated; the published version, retired list included, is untouched.
        let scratch = &mut *self.scratch;
        for &p in &scratch.fresh {
            // SAFETY: allocated by this transaction, never published, listed once.
            unsafe {
                drop_node(p);
                scratch.stash.keep(p, &self.tree.shared);
            }
        }
        scratch.fresh.clear();
        scratch.dead.clear();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

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
}
