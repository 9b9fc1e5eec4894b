//! Writer transactions: every update builds a new version by copying the path from the root
//! to the change (rebalancing on the copies) and publishes it with one release store of the
//! root.
//!
//! The transaction writes only *fresh* nodes, which it allocated and no reader can reach;
//! published nodes it replaces are collected and retired together after the commit. The
//! `unsafe` blocks here read nodes of the version being built and write fresh ones; node
//! memory itself is managed in `alloc`.

use std::borrow::Borrow;
use std::cmp::Ordering as Cmp;
use std::ptr;
use std::sync::atomic::Ordering::{Relaxed, Release};

use super::alloc::{build_balanced, each_node, Retired, Scratch};
use super::iter::{Iter, Version};
use super::{BonsaiTree, Link, Node, DELTA, FRESH, GAMMA};
use crate::sync::{lock, AtomicPtr, MutexGuard};

/// The subtree size of `p` (0 for null).
///
/// # Safety
///
/// `p` is null or points to a live node.
#[inline]
pub(super) unsafe fn size<K, V>(p: Link<K, V>) -> usize {
    // SAFETY: per the contract.
    unsafe { p.as_ref() }.map_or(0, |n| n.size & !FRESH)
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
    pub(super) fn begin(tree: &'t BonsaiTree<K, V>) -> Self {
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
    pub(super) fn commit(mut self) -> Option<Retired<K, V>> {
        self.committed = true;
        let scratch = &mut *self.scratch;
        for &p in &scratch.fresh {
            // SAFETY: fresh nodes (live or dead) are allocated and exclusively ours.
            unsafe { (*p).size &= !FRESH };
        }
        // SAFETY: `discard` puts in `dead` only fresh nodes (never published), and a node
        // leaves the version being built only once.
        let allocated = unsafe { scratch.commit(&self.tree.shared) };
        self.tree.shared.live.fetch_add(allocated, Relaxed);
        if self.root != self.tree.root.load(Relaxed) {
            // The one publication of the transaction. Release: every node of the new version
            // (written above or by earlier writers) is visible to a reader whose acquire load
            // of the root sees this pointer.
            self.tree.root.store(self.root, Release);
        }
        self.tree.len.store(self.len, Relaxed);
        let nodes = std::mem::take(&mut self.retired);
        // SAFETY: the root store above unpublished them (a node goes to `retired` when it
        // leaves the version being built, once, and only if it is not fresh, i.e. it was
        // published); their memory came from the stash; the caller hands the batch to
        // `defer_drop`.
        (!nodes.is_empty()).then(|| unsafe { Retired::new(nodes, self.tree.shared.clone()) })
    }

    /// The version being built, readable while the transaction is borrowed.
    fn version(&self) -> Version<'_, K, V> {
        // SAFETY: the version's nodes are freed only after the transaction ends (published
        // nodes it replaced are retired at commit; fresh ones it discarded are dropped at
        // commit or abort), which cannot happen while it is borrowed; fresh nodes are
        // modified only through `&mut self`. Under the writer lock every node is visible to
        // relaxed loads (the previous writer's stores happen-before our lock acquisition).
        unsafe { Version::new(self.root, Relaxed) }
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
        self.version().find(key).map(|n| &n.value)
    }

    /// The entry with the greatest key `<= key` in the version being built.
    pub fn floor<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.version().floor(key).map(|n| (&n.key, &n.value))
    }

    /// The entry with the least key `>= key` in the version being built.
    pub fn ceiling<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.version().ceiling(key).map(|n| (&n.key, &n.value))
    }

    /// The first entry of the version being built.
    pub fn first(&self) -> Option<(&K, &V)> {
        self.version().extreme(false).map(|n| (&n.key, &n.value))
    }

    /// The last entry of the version being built.
    pub fn last(&self) -> Option<(&K, &V)> {
        self.version().extreme(true).map(|n| (&n.key, &n.value))
    }

    /// The entries of the version being built, in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        self.version().iter(None::<&K>)
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
        let node = Node {
            key,
            value,
            size: size | FRESH,
            left: AtomicPtr::new(left),
            right: AtomicPtr::new(right),
        };
        self.scratch.alloc(&self.tree.shared, self.len, node)
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
        // SAFETY: nothing the transaction allocated was published, and `alloc` lists each
        // node once.
        unsafe { self.scratch.abort(&self.tree.shared) };
    }
}

impl<K, V> BonsaiTree<K, V>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Moves a tree that has shrunk out of its chunks: one transaction copies every entry
    /// into allocator memory (a balanced tree built in O(n)) and retires every old node, so
    /// that the chunks empty and are unmapped after the grace period. Runs when a tree whose
    /// nodes live in chunks falls below a quarter of a chunk's worth of entries: at most once
    /// per that many removals, so O(1) amortised per update.
    pub(super) fn compact(&self) {
        let mut txn = Txn::begin(self);
        if !self.shared.chunked() {
            return; // another writer got here first
        }
        self.shared.chunked.store(false, Relaxed);
        debug_assert!(txn.scratch.fresh.is_empty());
        txn.scratch.stash.release(&self.shared);
        let entries: Vec<(K, V)> = txn
            .version()
            .iter(None::<&K>)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Published (the transaction has allocated nothing): retire them all.
        // SAFETY: the version's nodes stay valid while the transaction is borrowed.
        unsafe { each_node(txn.root, |p| txn.retired.push(p)) };
        let n = entries.len();
        let scratch = &mut *txn.scratch;
        txn.root = build_balanced(n, &mut entries.into_iter(), &mut || {
            let p = scratch.stash.take(&self.shared, 0);
            scratch.fresh.push(p);
            p
        });
        if let Some(retired) = txn.commit() {
            self.domain.defer_drop(retired);
        }
    }
}
