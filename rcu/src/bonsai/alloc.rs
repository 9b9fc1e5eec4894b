//! Node memory: where a node's memory comes from, and where it goes once the node is dropped.
//!
//! A node's memory is always in exactly one place: a published version, the open
//! transaction's fresh list, a retired batch ([`Retired`]) waiting for its grace period, the
//! writer's [`Stash`], the tree's pool ([`Shared::pool`]), or back in its chunk or the global
//! allocator. Moving it between those places, dropping a node in place ([`drop_node`]) and
//! walking a version to hand every node over ([`each_node`]) are the `unsafe` operations on
//! node memory; what keeps a node from being freed while a reader can reach it is the grace
//! period that [`Retired`] waits for (it is dropped by `Domain::defer_drop`).

use std::ptr;
use std::sync::atomic::AtomicUsize as StatUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc as StdArc;

use super::{Link, Node, POOL_CAP};
use crate::chunks::Chunks;
use crate::sync::{lock, AtomicPtr, Mutex};

/// What a freed node's `size` holds just before its memory is released (debugging aid).
const POISON_SIZE: usize = 0x0bad_f00d_0bad_f00d_u64 as usize;

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
pub(super) fn chunk_threshold<K, V>() -> usize {
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
pub(super) struct Shared<K, V> {
    /// Nodes allocated and not yet dropped (published or awaiting reclamation).
    pub(super) live: StatUsize,
    /// Allocator memory of dropped nodes (uninitialised), at most [`POOL_CAP`], for the writer
    /// to reuse.
    pub(super) pool: Mutex<Vec<Link<K, V>>>,
    pub(super) chunks: Chunks<Node<K, V>>,
    /// Whether new nodes come from the chunks. Written under the writer lock; read by the
    /// reclaimer to decide where memory goes (a stale value only misplaces a little of it).
    pub(super) chunked: std::sync::atomic::AtomicBool,
}

// SAFETY: the pool and the chunks hold only uninitialised memory (no `K` or `V`), owned by
// them alone; it is freed by whichever thread drops `Shared` or returns memory.
unsafe impl<K, V> Send for Shared<K, V> {}
// SAFETY: as for `Send`; the pool and the chunks are behind mutexes.
unsafe impl<K, V> Sync for Shared<K, V> {}

impl<K, V> Shared<K, V> {
    pub(super) fn new() -> Self {
        Self {
            live: StatUsize::new(0),
            pool: Mutex::new(Vec::new()),
            chunks: Chunks::new(),
            chunked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(super) fn chunked(&self) -> bool {
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
    pub(super) unsafe fn recycle(&self, nodes: &[Link<K, V>]) {
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
    pub(super) unsafe fn dealloc(&self, nodes: &[Link<K, V>]) {
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
pub(super) struct Retired<K, V> {
    nodes: Vec<Link<K, V>>,
    shared: StdArc<Shared<K, V>>,
}

impl<K, V> Retired<K, V> {
    /// A batch that drops `nodes` and returns their memory when it is dropped.
    ///
    /// # Safety
    ///
    /// Each of `nodes` has been unpublished (the root that no longer reaches it is stored),
    /// is in no other batch, and holds a node in memory from [`Stash::take`]; the batch is
    /// dropped only after a grace period that begins after now (it goes to
    /// `Domain::defer_drop`).
    pub(super) unsafe fn new(nodes: Vec<Link<K, V>>, shared: StdArc<Shared<K, V>>) -> Self {
        Self { nodes, shared }
    }
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
pub(super) struct Scratch<K, V> {
    /// Every node allocated by the open transaction.
    pub(super) fresh: Vec<Link<K, V>>,
    /// Fresh nodes the open transaction removed again (a subset of `fresh`).
    pub(super) dead: Vec<Link<K, V>>,
    /// Node memory for the writer's next allocations.
    pub(super) stash: Stash<K, V>,
}

impl<K, V> Scratch<K, V> {
    /// Writes `node` into memory for one node of a tree of about `entries` and lists it as
    /// fresh.
    pub(super) fn alloc(
        &mut self,
        shared: &Shared<K, V>,
        entries: usize,
        node: Node<K, V>,
    ) -> Link<K, V> {
        let p = self.stash.take(shared, entries);
        // SAFETY: `take` returns memory for one node that holds none and is ours alone.
        unsafe { p.write(node) };
        self.fresh.push(p);
        p
    }

    /// At commit: drops the dead nodes, keeps their memory for reuse, and empties both lists;
    /// returns how many fresh nodes stay (are now published).
    ///
    /// # Safety
    ///
    /// Every node in `dead` was allocated by the open transaction (is in `fresh`), was removed
    /// from its version before it was ever published, and is listed once.
    pub(super) unsafe fn commit(&mut self, shared: &Shared<K, V>) -> usize {
        for &p in &self.dead {
            // SAFETY: a dead node was allocated by this transaction and removed from its
            // version before it was ever published; it is in `dead` once. Dropped, its
            // memory is ours to reuse.
            unsafe {
                drop_node(p);
                self.stash.keep(p, shared);
            }
        }
        let allocated = self.fresh.len() - self.dead.len();
        self.fresh.clear();
        self.dead.clear();
        allocated
    }

    /// On abort: drops every node the open transaction allocated, keeps their memory for
    /// reuse, and empties both lists.
    ///
    /// # Safety
    ///
    /// No node in `fresh` was ever published, and each is listed once.
    pub(super) unsafe fn abort(&mut self, shared: &Shared<K, V>) {
        for &p in &self.fresh {
            // SAFETY: allocated by this transaction, never published, listed once.
            unsafe {
                drop_node(p);
                self.stash.keep(p, shared);
            }
        }
        self.fresh.clear();
        self.dead.clear();
    }
}

/// Node memory (uninitialised) for the writer's next allocations, taken from the pool in one
/// swap or from the chunks in batches, so that the writer takes a lock once per refill, not
/// once per node. Emptied by the tree's `Drop` (it cannot return memory on its own).
pub(super) struct Stash<K, V>(Vec<Link<K, V>>);

impl<K, V> Stash<K, V> {
    pub(super) fn new() -> Self {
        Self(Vec::new())
    }

    /// Node allocations held.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Memory for one node of a tree of about `entries`: from the stash, refilled from the
    /// pool or the chunks, or from the allocator.
    pub(super) fn take(&mut self, shared: &Shared<K, V>, entries: usize) -> Link<K, V> {
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
    pub(super) fn release(&mut self, shared: &Shared<K, V>) {
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
    pub(super) unsafe fn keep(&mut self, p: Link<K, V>, shared: &Shared<K, V>) {
        if self.0.len() < POOL_CAP {
            self.0.push(p);
        } else {
            // SAFETY: the contract.
            unsafe { shared.dealloc(&[p]) };
        }
    }
}

/// Calls `f` on every node of the tree under `root`, each once, after reading its children
/// (so `f` may drop or free it).
///
/// # Safety
///
/// The nodes under `root` stay valid until `f` is called on them, and nothing else changes
/// their links meanwhile.
pub(super) unsafe fn each_node<K, V>(root: Link<K, V>, mut f: impl FnMut(Link<K, V>)) {
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
pub(super) fn build_balanced<K, V>(
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

/// Drops every node of the version under `root` and frees their memory (to their chunks or
/// the allocator); updates the live-node count.
///
/// # Safety
///
/// The version is exclusively the caller's: no reader can reach it and no transaction is
/// open; its nodes' memory came from [`Stash::take`].
pub(super) unsafe fn free_version<K, V>(root: Link<K, V>, shared: &Shared<K, V>) {
    let mut dropped = Vec::new();
    let mut freed = 0;
    // SAFETY: the live version is exclusively ours (see above); `each_node` reads a
    // node's children before handing it over, so it may be dropped there.
    unsafe {
        each_node(root, |p| {
            drop_node(p);
            dropped.push(p);
            freed += 1;
            if dropped.len() == 1024 {
                // Dropped just above, each once; memory from `Stash::take`.
                shared.dealloc(&dropped);
                dropped.clear();
            }
        });
        // As above, the last batch.
        shared.dealloc(&dropped);
    }
    shared.live.fetch_sub(freed, Relaxed);
}
