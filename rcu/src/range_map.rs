//! A map of non-overlapping `[start, end)` ranges of `u64` on the [`BonsaiTree`]: the VMM's
//! guest-physical address space.
//!
//! Every operation is one Bonsai transaction, published with one store of the root, so a
//! compound change is atomic for readers. In particular [`RangeMap::remove_range`] shrinks,
//! splits and removes the ranges it covers in one new version: **a reader never sees a
//! transient hole**, every address the update does not remove is found by every lookup at
//! every instant.
//!
//! ```
//! use rcu::{Domain, RangeMap};
//!
//! let domain = Domain::new();
//! // `u64` values are offsets: slicing a range advances the offset.
//! let map: RangeMap<u64> = RangeMap::new(&domain);
//! map.insert(0x1000..0x5000, 0).unwrap();
//! let err = map.insert(0x4000..0x6000, 0).unwrap_err();
//! assert_eq!(err.to_string(), "range [0x4000, 0x6000) overlaps existing range [0x1000, 0x5000)");
//! // Punch a hole: [0x1000, 0x2000) and [0x3000, 0x5000) remain, the latter at offset 0x2000.
//! let removed = map.remove_range(0x2000..0x3000).unwrap();
//! assert_eq!(removed, [(0x2000..0x3000, 0x1000)]);
//! let reader = domain.register();
//! let guard = reader.read();
//! assert_eq!(map.get(0x3800, &guard), Some((0x3000..0x5000, &0x2000)));
//! assert_eq!(map.get(0x2800, &guard), None);
//! assert_eq!(map.len(), 2);
//! ```
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use crate::bonsai::{BonsaiTree, Txn};
use crate::{Domain, ReadGuard};

/// A value stored for a range. It says how to cut itself when the range is split.
pub trait RangeValue: Clone + Send + Sync + 'static {
    /// The value for sub-range `part` of `whole` (e.g. a region with its offset into the host
    /// mapping advanced by `part.start - whole.start`). Called by the writer only.
    fn slice(&self, whole: Range<u64>, part: Range<u64>) -> Self;
}

/// Unit values: nothing to cut.
impl RangeValue for () {
    fn slice(&self, _whole: Range<u64>, _part: Range<u64>) {}
}

/// A `u64` value is an offset (e.g. into a host mapping): a slice starting `d` bytes into the
/// whole range has offset `self + d`.
impl RangeValue for u64 {
    fn slice(&self, whole: Range<u64>, part: Range<u64>) -> u64 {
        self.wrapping_add(part.start - whole.start)
    }
}

/// Why a range-map operation failed. Messages name the ranges, in hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// The range given is empty (`start >= end`).
    Empty {
        /// The range given.
        range: Range<u64>,
    },
    /// The range given overlaps one already in the map.
    Overlap {
        /// The range given.
        range: Range<u64>,
        /// The (lowest) existing range it overlaps.
        existing: Range<u64>,
    },
    /// No range with exactly these bounds is in the map.
    NotFound {
        /// The range given.
        range: Range<u64>,
    },
}

struct Hex<'a>(&'a Range<u64>);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.0.start, self.0.end)
    }
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty { range } => write!(f, "empty range {}", Hex(range)),
            Self::Overlap { range, existing } => write!(
                f,
                "range {} overlaps existing range {}",
                Hex(range),
                Hex(existing)
            ),
            Self::NotFound { range } => write!(f, "no range {} in the map", Hex(range)),
        }
    }
}

impl std::error::Error for RangeError {}

/// A range's end and value: what the tree stores under the range's start.
#[derive(Clone, Debug)]
pub struct Entry<V> {
    end: u64,
    value: V,
}

/// A concurrent map of non-overlapping ranges: lock-free, wait-free lookups under a
/// [`ReadGuard`]; writers serialised, each operation published atomically (see the
/// [module docs](self)).
pub struct RangeMap<V: RangeValue> {
    tree: BonsaiTree<u64, Entry<V>>,
}

impl<V: RangeValue> fmt::Debug for RangeMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeMap")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl<V: RangeValue> RangeMap<V> {
    /// An empty map whose retired nodes are reclaimed through `domain`.
    pub fn new(domain: &Domain) -> Self {
        Self {
            tree: BonsaiTree::new(domain),
        }
    }

    /// A map built in O(n) (perfectly balanced) from ranges sorted by start.
    pub fn from_sorted(
        domain: &Domain,
        ranges: impl IntoIterator<Item = (Range<u64>, V)>,
    ) -> Result<Self, RangeError> {
        let mut entries = Vec::new();
        let mut prev: Option<Range<u64>> = None;
        for (range, value) in ranges {
            check_range(&range)?;
            if let Some(p) = &prev {
                if range.start < p.end {
                    return Err(RangeError::Overlap {
                        range,
                        existing: p.clone(),
                    });
                }
            }
            prev = Some(range.clone());
            entries.push((
                range.start,
                Entry {
                    end: range.end,
                    value,
                },
            ));
        }
        Ok(Self {
            tree: BonsaiTree::from_sorted(domain, entries),
        })
    }

    /// The domain whose grace periods protect this map's readers.
    pub fn domain(&self) -> &Domain {
        self.tree.domain()
    }

    /// The range containing `addr`, and its value.
    #[inline]
    pub fn get<'g>(&'g self, addr: u64, guard: &'g ReadGuard<'_>) -> Option<(Range<u64>, &'g V)> {
        let (&start, e) = self.tree.floor(&addr, guard)?;
        (addr < e.end).then_some((start..e.end, &e.value))
    }

    /// All ranges in order, from one consistent version.
    pub fn iter<'g>(
        &'g self,
        guard: &'g ReadGuard<'_>,
    ) -> impl Iterator<Item = (Range<u64>, &'g V)> + 'g {
        self.tree.iter(guard).map(|(&s, e)| (s..e.end, &e.value))
    }

    /// The ranges that overlap `range`, in order, from one consistent version.
    pub fn overlapping<'g>(
        &'g self,
        range: Range<u64>,
        guard: &'g ReadGuard<'_>,
    ) -> impl Iterator<Item = (Range<u64>, &'g V)> + 'g {
        let from = match self.tree.floor(&range.start, guard) {
            Some((&s, e)) if e.end > range.start => s,
            _ => range.start,
        };
        let end = range.end;
        self.tree
            .iter_from(&from, guard)
            .map(|(&s, e)| (s..e.end, &e.value))
            .take_while(move |(r, _)| r.start < end)
    }

    /// The lowest range.
    pub fn first<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Option<(Range<u64>, &'g V)> {
        self.tree.first(guard).map(|(&s, e)| (s..e.end, &e.value))
    }

    /// The highest range.
    pub fn last<'g>(&'g self, guard: &'g ReadGuard<'_>) -> Option<(Range<u64>, &'g V)> {
        self.tree.last(guard).map(|(&s, e)| (s..e.end, &e.value))
    }

    /// Ranges in the published version.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether the published version is empty.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// A copy of every range and value of the current version, taken under the writer lock
    /// (no guard needed; for control paths, not fast paths).
    pub fn snapshot(&self) -> Vec<(Range<u64>, V)> {
        self.tree.update(|txn| {
            txn.iter()
                .map(|(&s, e)| (s..e.end, e.value.clone()))
                .collect()
        })
    }

    /// Inserts `range` if it overlaps nothing.
    pub fn insert(&self, range: Range<u64>, value: V) -> Result<(), RangeError> {
        self.transaction(|t| t.insert(range, value))
    }

    /// Removes the range with exactly these bounds; returns its value.
    pub fn remove(&self, range: Range<u64>) -> Result<V, RangeError> {
        self.transaction(|t| t.remove(range))
    }

    /// Removes every address in `range`: ranges inside it go, ranges partly covered shrink
    /// or split in two (values cut with [`RangeValue::slice`]). Returns the removed pieces in
    /// order, so the caller can tear them down after a grace period; empty if `range` covered
    /// nothing. Atomic for readers: addresses outside `range` never disappear.
    pub fn remove_range(&self, range: Range<u64>) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        self.transaction(|t| t.remove_range(range))
    }

    /// Removes everything in `range` (as [`remove_range`](Self::remove_range)) and inserts
    /// `range` with `value`, atomically: e.g. merges the pieces of a split range back.
    pub fn replace(&self, range: Range<u64>, value: V) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        self.transaction(|t| t.replace(range, value))
    }

    /// Replaces the value of the range with exactly these bounds by `f(old)` (a copy,
    /// published atomically).
    pub fn update(&self, range: Range<u64>, f: impl FnOnce(&V) -> V) -> Result<(), RangeError> {
        self.transaction(|t| t.update(range, f))
    }

    /// Runs several operations as one transaction: all published with one store, or none if
    /// `f` returns an error.
    pub fn transaction<R, E>(
        &self,
        f: impl FnOnce(&mut RangeTxn<'_, '_, V>) -> Result<R, E>,
    ) -> Result<R, E> {
        self.tree.try_update(|txn| f(&mut RangeTxn { txn }))
    }

    /// Nodes allocated and not yet freed (see [`BonsaiTree::live_nodes`]).
    pub fn live_nodes(&self) -> usize {
        self.tree.live_nodes()
    }

    /// The tree's invariants plus non-overlap of the ranges (test and debugging helper, O(n)).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.tree.check_invariants()?;
        let mut prev_end = None;
        for (r, _) in self.snapshot() {
            if r.start >= r.end {
                return Err(format!("empty range {}", Hex(&r)));
            }
            if prev_end.is_some_and(|e| r.start < e) {
                return Err(format!("range {} overlaps its predecessor", Hex(&r)));
            }
            prev_end = Some(r.end);
        }
        Ok(())
    }

    /// The underlying tree.
    pub fn tree(&self) -> &BonsaiTree<u64, Entry<V>> {
        &self.tree
    }
}

/// A writer transaction on a [`RangeMap`] (see [`RangeMap::transaction`]).
pub struct RangeTxn<'a, 't, V: RangeValue> {
    txn: &'a mut Txn<'t, u64, Entry<V>>,
}

impl<V: RangeValue> RangeTxn<'_, '_, V> {
    /// The range containing `addr` in the version being built.
    pub fn get(&self, addr: u64) -> Option<(Range<u64>, &V)> {
        store_get(&*self.txn, addr)
    }

    /// Ranges in the version being built.
    pub fn len(&self) -> usize {
        self.txn.len()
    }

    /// Whether the version being built is empty.
    pub fn is_empty(&self) -> bool {
        self.txn.is_empty()
    }

    /// See [`RangeMap::insert`].
    pub fn insert(&mut self, range: Range<u64>, value: V) -> Result<(), RangeError> {
        store_insert(&mut *self.txn, range, value)
    }

    /// See [`RangeMap::remove`].
    pub fn remove(&mut self, range: Range<u64>) -> Result<V, RangeError> {
        store_remove(&mut *self.txn, range)
    }

    /// See [`RangeMap::remove_range`].
    pub fn remove_range(&mut self, range: Range<u64>) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        store_remove_range(&mut *self.txn, range)
    }

    /// See [`RangeMap::replace`].
    pub fn replace(
        &mut self,
        range: Range<u64>,
        value: V,
    ) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        store_replace(&mut *self.txn, range, value)
    }

    /// See [`RangeMap::update`].
    pub fn update(&mut self, range: Range<u64>, f: impl FnOnce(&V) -> V) -> Result<(), RangeError> {
        store_update(&mut *self.txn, range, f)
    }
}

/// The three address-space implementations behind one interface, shaped for the VMM's fault
/// path: every reader is a registered RCU reader holding a [`ReadGuard`]. The baselines
/// (`rcu::baselines`, feature `baselines`) ignore the guard and take their own lock or
/// snapshot inside [`lookup`](Self::lookup).
pub trait ConcurrentRangeMap<V: RangeValue>: Send + Sync {
    /// The implementation's name (`bonsai`, `rwlock`, `cow`).
    fn name(&self) -> &'static str;
    /// Calls `f` with the range containing `addr` and its value (or `None`).
    fn lookup<R>(
        &self,
        guard: &ReadGuard<'_>,
        addr: u64,
        f: impl FnOnce(Option<(Range<u64>, &V)>) -> R,
    ) -> R;
    /// See [`RangeMap::insert`].
    fn insert(&self, range: Range<u64>, value: V) -> Result<(), RangeError>;
    /// Inserts every range, all or none (on an overlap nothing is inserted), in one update
    /// where the implementation can (for bulk set-up: the copy-on-write map copies once, not
    /// once per range).
    fn insert_all(&self, ranges: Vec<(Range<u64>, V)>) -> Result<(), RangeError>;
    /// See [`RangeMap::remove`].
    fn remove(&self, range: Range<u64>) -> Result<V, RangeError>;
    /// See [`RangeMap::remove_range`].
    fn remove_range(&self, range: Range<u64>) -> Result<Vec<(Range<u64>, V)>, RangeError>;
    /// See [`RangeMap::replace`].
    fn replace(&self, range: Range<u64>, value: V) -> Result<Vec<(Range<u64>, V)>, RangeError>;
    /// See [`RangeMap::update`].
    fn update(&self, range: Range<u64>, f: impl FnOnce(&V) -> V) -> Result<(), RangeError>;
    /// A copy of every range and value, in order, from one consistent version.
    fn snapshot(&self) -> Vec<(Range<u64>, V)>;
    /// Number of ranges.
    fn len(&self) -> usize;
    /// Whether there are no ranges.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V: RangeValue> ConcurrentRangeMap<V> for RangeMap<V> {
    fn name(&self) -> &'static str {
        "bonsai"
    }
    #[inline]
    fn lookup<R>(
        &self,
        guard: &ReadGuard<'_>,
        addr: u64,
        f: impl FnOnce(Option<(Range<u64>, &V)>) -> R,
    ) -> R {
        f(self.get(addr, guard))
    }
    fn insert(&self, range: Range<u64>, value: V) -> Result<(), RangeError> {
        RangeMap::insert(self, range, value)
    }
    fn insert_all(&self, ranges: Vec<(Range<u64>, V)>) -> Result<(), RangeError> {
        self.transaction(|t| ranges.into_iter().try_for_each(|(r, v)| t.insert(r, v)))
    }
    fn remove(&self, range: Range<u64>) -> Result<V, RangeError> {
        RangeMap::remove(self, range)
    }
    fn remove_range(&self, range: Range<u64>) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        RangeMap::remove_range(self, range)
    }
    fn replace(&self, range: Range<u64>, value: V) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        RangeMap::replace(self, range, value)
    }
    fn update(&self, range: Range<u64>, f: impl FnOnce(&V) -> V) -> Result<(), RangeError> {
        RangeMap::update(self, range, f)
    }
    fn snapshot(&self) -> Vec<(Range<u64>, V)> {
        RangeMap::snapshot(self)
    }
    fn len(&self) -> usize {
        RangeMap::len(self)
    }
}

// ---- The range logic, written once over a minimal sorted store so that the Bonsai map and
// the baselines behave identically (the proptest oracle is an independent brute-force model).

/// A sorted map from range start to (end, value), as the range logic needs it.
pub(crate) trait RangeStore<V> {
    /// The entry with the greatest start `<= addr`: (start, end, value).
    fn floor_entry(&self, addr: u64) -> Option<(u64, u64, &V)>;
    /// The entry with the least start `>= addr`.
    fn ceiling_entry(&self, addr: u64) -> Option<(u64, u64, &V)>;
    /// Inserts or replaces the entry at `start`.
    fn put(&mut self, start: u64, end: u64, value: V);
    /// Removes the entry at `start`, returning (end, value).
    fn take(&mut self, start: u64) -> Option<(u64, V)>;
}

impl<V: RangeValue> RangeStore<V> for Txn<'_, u64, Entry<V>> {
    fn floor_entry(&self, addr: u64) -> Option<(u64, u64, &V)> {
        self.floor(&addr).map(|(&s, e)| (s, e.end, &e.value))
    }
    fn ceiling_entry(&self, addr: u64) -> Option<(u64, u64, &V)> {
        self.ceiling(&addr).map(|(&s, e)| (s, e.end, &e.value))
    }
    fn put(&mut self, start: u64, end: u64, value: V) {
        self.insert(start, Entry { end, value });
    }
    fn take(&mut self, start: u64) -> Option<(u64, V)> {
        self.remove(&start).map(|e| (e.end, e.value))
    }
}

impl<V> RangeStore<V> for BTreeMap<u64, (u64, V)> {
    fn floor_entry(&self, addr: u64) -> Option<(u64, u64, &V)> {
        self.range(..=addr)
            .next_back()
            .map(|(&s, (e, v))| (s, *e, v))
    }
    fn ceiling_entry(&self, addr: u64) -> Option<(u64, u64, &V)> {
        self.range(addr..).next().map(|(&s, (e, v))| (s, *e, v))
    }
    fn put(&mut self, start: u64, end: u64, value: V) {
        BTreeMap::insert(self, start, (end, value));
    }
    fn take(&mut self, start: u64) -> Option<(u64, V)> {
        BTreeMap::remove(self, &start)
    }
}

pub(crate) fn check_range(range: &Range<u64>) -> Result<(), RangeError> {
    if range.start >= range.end {
        return Err(RangeError::Empty {
            range: range.clone(),
        });
    }
    Ok(())
}

#[inline]
pub(crate) fn store_get<V, S: RangeStore<V> + ?Sized>(
    s: &S,
    addr: u64,
) -> Option<(Range<u64>, &V)> {
    let (start, end, v) = s.floor_entry(addr)?;
    (addr < end).then_some((start..end, v))
}

/// The lowest existing range overlapping `range` (non-empty).
fn store_overlap<V, S: RangeStore<V> + ?Sized>(s: &S, range: &Range<u64>) -> Option<Range<u64>> {
    if let Some((start, end, _)) = s.floor_entry(range.start) {
        if end > range.start {
            return Some(start..end);
        }
    }
    match s.ceiling_entry(range.start) {
        Some((start, end, _)) if start < range.end => Some(start..end),
        _ => None,
    }
}

pub(crate) fn store_insert<V, S: RangeStore<V> + ?Sized>(
    s: &mut S,
    range: Range<u64>,
    value: V,
) -> Result<(), RangeError> {
    check_range(&range)?;
    if let Some(existing) = store_overlap(s, &range) {
        return Err(RangeError::Overlap { range, existing });
    }
    s.put(range.start, range.end, value);
    Ok(())
}

pub(crate) fn store_remove<V, S: RangeStore<V> + ?Sized>(
    s: &mut S,
    range: Range<u64>,
) -> Result<V, RangeError> {
    check_range(&range)?;
    match s.floor_entry(range.start) {
        Some((start, end, _)) if start == range.start && end == range.end => {
            Ok(s.take(start).expect("entry just found").1)
        }
        _ => Err(RangeError::NotFound { range }),
    }
}

pub(crate) fn store_update<V: Clone, S: RangeStore<V> + ?Sized>(
    s: &mut S,
    range: Range<u64>,
    f: impl FnOnce(&V) -> V,
) -> Result<(), RangeError> {
    check_range(&range)?;
    match s.floor_entry(range.start) {
        Some((start, end, v)) if start == range.start && end == range.end => {
            let new = f(v);
            s.put(start, end, new);
            Ok(())
        }
        _ => Err(RangeError::NotFound { range }),
    }
}

pub(crate) fn store_remove_range<V: RangeValue, S: RangeStore<V> + ?Sized>(
    s: &mut S,
    range: Range<u64>,
) -> Result<Vec<(Range<u64>, V)>, RangeError> {
    check_range(&range)?;
    let mut removed = Vec::new();
    // Start from the range containing `range.start`, if any, else the first one after it.
    let mut cursor = match s.floor_entry(range.start) {
        Some((start, end, _)) if end > range.start => start,
        _ => range.start,
    };
    while let Some((start, end, v)) = s.ceiling_entry(cursor) {
        if start >= range.end {
            break;
        }
        let v = v.clone();
        let whole = start..end;
        s.take(start);
        if start < range.start {
            s.put(
                start,
                range.start,
                v.slice(whole.clone(), start..range.start),
            );
        }
        if end > range.end {
            s.put(range.end, end, v.slice(whole.clone(), range.end..end));
        }
        let piece = start.max(range.start)..end.min(range.end);
        let piece_value = if piece == whole {
            v
        } else {
            v.slice(whole, piece.clone())
        };
        removed.push((piece, piece_value));
        if end >= range.end {
            break;
        }
        cursor = end;
    }
    Ok(removed)
}

pub(crate) fn store_replace<V: RangeValue, S: RangeStore<V> + ?Sized>(
    s: &mut S,
    range: Range<u64>,
    value: V,
) -> Result<Vec<(Range<u64>, V)>, RangeError> {
    let removed = store_remove_range(s, range.clone())?;
    s.put(range.start, range.end, value);
    Ok(removed)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn split_and_merge() {
        let d = Domain::new();
        let m: RangeMap<u64> = RangeMap::new(&d);
        m.insert(0..100, 1000).unwrap();
        m.insert(200..300, 2000).unwrap();
        assert_eq!(
            m.insert(50..60, 0),
            Err(RangeError::Overlap {
                range: 50..60,
                existing: 0..100
            })
        );
        assert_eq!(
            m.insert(150..250, 0).unwrap_err().to_string(),
            "range [0x96, 0xfa) overlaps existing range [0xc8, 0x12c)"
        );
        let removed = m.remove_range(50..250).unwrap();
        assert_eq!(removed, [(50..100, 1050), (200..250, 2000)]);
        assert_eq!(m.snapshot(), [(0..50, 1000), (250..300, 2050)]);
        assert_eq!(m.remove_range(10..20).unwrap(), [(10..20, 1010)]);
        assert_eq!(
            m.snapshot(),
            [(0..10, 1000), (20..50, 1020), (250..300, 2050)]
        );
        let gone = m.replace(0..300, 7).unwrap();
        assert_eq!(gone.len(), 3);
        assert_eq!(m.snapshot(), [(0..300, 7)]);
        assert_eq!(
            m.remove(0..299),
            Err(RangeError::NotFound { range: 0..299 })
        );
        m.update(0..300, |v| v + 1).unwrap();
        assert_eq!(m.remove(0..300), Ok(8));
        assert!(m.is_empty());
        m.check_invariants().unwrap();
    }
}
