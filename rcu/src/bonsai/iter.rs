//! Reading one version of the tree: lookups, the in-order iterator, and the invariant checks.
//!
//! Everything here reads nodes through raw links and is `unsafe` for one reason: the nodes
//! must stay valid for the lifetime the caller gives the result (see `deref`). For readers
//! that is a read guard (a node is freed only after a grace period that began after it was
//! unpublished); for the writer it is the open transaction. That promise is made once, when a
//! [`Version`] is made from a root (`BonsaiTree::version`, `Txn::version`); its lookups and
//! iterator are then safe to call. The descents are shared by readers (acquire loads of child
//! pointers) and the writer's transaction (relaxed loads, it holds the writer lock).

use std::borrow::Borrow;
use std::cmp::Ordering as Cmp;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::Ordering::{self, Acquire, Relaxed};

use super::{Link, Node, DELTA, FRESH};

/// One version of the tree, readable for `'a`: the only way to look nodes up, so that
/// lookups and iteration need no `unsafe` of their callers. Readers make one from the root
/// they load under a read guard, the writer from its open transaction's root.
pub(super) struct Version<'a, K, V> {
    root: Link<K, V>,
    /// How child pointers are loaded: acquire for readers (pairs with the release store of
    /// the root), relaxed for the writer (it holds the writer lock).
    ord: Ordering,
    _nodes: PhantomData<&'a Node<K, V>>,
}

impl<'a, K, V> Version<'a, K, V> {
    /// # Safety
    ///
    /// Every node reachable from `root` stays valid for `'a` (see [`deref`]), and loads of
    /// child pointers with `ord` see them initialised: `Acquire` for a root loaded with
    /// acquire, `Relaxed` only for the writer's own version under the writer lock.
    #[inline]
    pub(super) unsafe fn new(root: Link<K, V>, ord: Ordering) -> Self {
        Self {
            root,
            ord,
            _nodes: PhantomData,
        }
    }

    /// The node for `key`.
    #[inline]
    pub(super) fn find<Q>(&self, key: &Q) -> Option<&'a Node<K, V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // SAFETY: the nodes under `root` stay valid for `'a` (`Version::new`).
        unsafe { find(self.root, key, self.ord) }
    }

    /// The node with the greatest key `<= key`.
    #[inline]
    pub(super) fn floor<Q>(&self, key: &Q) -> Option<&'a Node<K, V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // SAFETY: as in `find`.
        unsafe { floor(self.root, key, self.ord) }
    }

    /// The node with the least key `>= key`.
    #[inline]
    pub(super) fn ceiling<Q>(&self, key: &Q) -> Option<&'a Node<K, V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // SAFETY: as in `find`.
        unsafe { ceiling(self.root, key, self.ord) }
    }

    /// The leftmost (`right == false`) or rightmost node.
    #[inline]
    pub(super) fn extreme(&self, right: bool) -> Option<&'a Node<K, V>> {
        // SAFETY: as in `find`.
        unsafe { extreme(self.root, right, self.ord) }
    }

    /// The entries with keys `>= from` (all, for `None`), in key order.
    #[inline]
    pub(super) fn iter<Q>(&self, from: Option<&Q>) -> Iter<'a, K, V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // SAFETY: as in `find`; the iterator's items live for `'a`.
        unsafe { Iter::new(self.root, from) }
    }
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
pub(super) unsafe fn check_subtree<K: Ord, V>(
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
pub(super) unsafe fn height<K, V>(p: Link<K, V>) -> usize {
    // SAFETY: per the contract.
    match unsafe { deref(p) } {
        None => 0,
        // SAFETY: per the contract.
        Some(n) => 1 + unsafe { height(n.left.load(Relaxed)).max(height(n.right.load(Relaxed))) },
    }
}

/// An in-order iterator over one version of a [`BonsaiTree`](super::BonsaiTree) (see
/// [`BonsaiTree::iter`](super::BonsaiTree::iter)).
pub struct Iter<'g, K, V> {
    /// Nodes whose own entry and right subtree are still to be visited, innermost last.
    stack: Vec<*const Node<K, V>>,
    _guard: PhantomData<&'g (K, V)>,
}

impl<'g, K, V> Iter<'g, K, V> {
    /// # Safety
    ///
    /// As for [`Version::new`], with `'g` for `'a` (the iterator loads with acquire).
    unsafe fn new<Q>(root: Link<K, V>, from: Option<&Q>) -> Self
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
