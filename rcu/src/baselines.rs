//! The address-space implementations the Bonsai [`RangeMap`] is compared with, behind the one
//! [`ConcurrentRangeMap`] trait (feature `baselines`):
//!
//! - [`RwLockRangeMap`]: `std::sync::RwLock<BTreeMap>`, the Linux `mmap_sem` + rbtree analogue.
//!   Readers take the read lock (an atomic read-modify-write on a shared line per lookup);
//!   a writer excludes every reader while it updates.
//! - [`CowRangeMap`]: an immutable `BTreeMap` published with `arc_swap::ArcSwap` and copied
//!   whole on each update (vm-memory's `GuestMemoryAtomic`, QEMU's FlatView). Readers are
//!   cheap-ish (arc-swap's debt slots), updates cost O(n).
//! - [`AnyRangeMap`]: one of the three, chosen at run time by name
//!   (`bonsai` | `rwlock` | `cow`), so the VMM can select one with `--address-space`.
//!
//! All three share the same range logic (insert without overlap, exact remove, splitting
//! `remove_range`, `replace`, `update`), so they behave identically.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwap;

use crate::range_map::{
    store_get, store_insert, store_remove, store_remove_range, store_replace, store_update,
};
use crate::{ConcurrentRangeMap, Domain, RangeError, RangeMap, RangeValue, ReadGuard};

type Map<V> = BTreeMap<u64, (u64, V)>;

/// `RwLock<BTreeMap>`: see the [module docs](self).
#[derive(Debug, Default)]
pub struct RwLockRangeMap<V> {
    map: RwLock<Map<V>>,
}

impl<V: RangeValue> RwLockRangeMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self {
            map: RwLock::new(BTreeMap::new()),
        }
    }

    /// A map holding `ranges` (sorted or not; must not overlap).
    pub fn from_ranges(
        ranges: impl IntoIterator<Item = (Range<u64>, V)>,
    ) -> Result<Self, RangeError> {
        Ok(Self {
            map: RwLock::new(build(ranges)?),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Map<V>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Map<V>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn build<V: RangeValue>(
    ranges: impl IntoIterator<Item = (Range<u64>, V)>,
) -> Result<Map<V>, RangeError> {
    let mut m = BTreeMap::new();
    for (r, v) in ranges {
        store_insert(&mut m, r, v)?;
    }
    Ok(m)
}

fn snapshot_of<V: Clone>(m: &Map<V>) -> Vec<(Range<u64>, V)> {
    m.iter().map(|(&s, (e, v))| (s..*e, v.clone())).collect()
}

impl<V: RangeValue> ConcurrentRangeMap<V> for RwLockRangeMap<V> {
    fn name(&self) -> &'static str {
        "rwlock"
    }
    #[inline]
    fn lookup<R>(
        &self,
        _guard: &ReadGuard<'_>,
        addr: u64,
        f: impl FnOnce(Option<(Range<u64>, &V)>) -> R,
    ) -> R {
        let m = self.read();
        f(store_get(&*m, addr))
    }
    fn insert(&self, range: Range<u64>, value: V) -> Result<(), RangeError> {
        store_insert(&mut *self.write(), range, value)
    }
    fn insert_all(&self, ranges: Vec<(Range<u64>, V)>) -> Result<(), RangeError> {
        let mut m = self.write();
        let mut done: Vec<Range<u64>> = Vec::new();
        for (r, v) in ranges {
            if let Err(e) = store_insert(&mut *m, r.clone(), v) {
                for r in done {
                    let _ = store_remove(&mut *m, r);
                }
                return Err(e);
            }
            done.push(r);
        }
        Ok(())
    }
    fn remove(&self, range: Range<u64>) -> Result<V, RangeError> {
        store_remove(&mut *self.write(), range)
    }
    fn remove_range(&self, range: Range<u64>) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        store_remove_range(&mut *self.write(), range)
    }
    fn replace(&self, range: Range<u64>, value: V) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        store_replace(&mut *self.write(), range, value)
    }
    fn update(&self, range: Range<u64>, f: impl FnOnce(&V) -> V) -> Result<(), RangeError> {
        store_update(&mut *self.write(), range, f)
    }
    fn snapshot(&self) -> Vec<(Range<u64>, V)> {
        snapshot_of(&self.read())
    }
    fn len(&self) -> usize {
        self.read().len()
    }
}

/// Copy-on-write `BTreeMap` published with `ArcSwap`: see the [module docs](self).
#[derive(Debug)]
pub struct CowRangeMap<V> {
    map: ArcSwap<Map<V>>,
    /// Serialises writers (each copies the current map, changes the copy, publishes it).
    writer: Mutex<()>,
}

impl<V: RangeValue> Default for CowRangeMap<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: RangeValue> CowRangeMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self {
            map: ArcSwap::from_pointee(BTreeMap::new()),
            writer: Mutex::new(()),
        }
    }

    /// A map holding `ranges` (must not overlap).
    pub fn from_ranges(
        ranges: impl IntoIterator<Item = (Range<u64>, V)>,
    ) -> Result<Self, RangeError> {
        Ok(Self {
            map: ArcSwap::from_pointee(build(ranges)?),
            writer: Mutex::new(()),
        })
    }

    /// Copies the current map, applies `f` to the copy and publishes it if `f` succeeds.
    fn modify<R>(
        &self,
        f: impl FnOnce(&mut Map<V>) -> Result<R, RangeError>,
    ) -> Result<R, RangeError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut copy = Map::clone(&self.map.load());
        let r = f(&mut copy)?;
        // The old map is freed when its last reader's `Guard`/`Arc` goes.
        self.map.store(Arc::new(copy));
        Ok(r)
    }
}

impl<V: RangeValue> ConcurrentRangeMap<V> for CowRangeMap<V> {
    fn name(&self) -> &'static str {
        "cow"
    }
    #[inline]
    fn lookup<R>(
        &self,
        _guard: &ReadGuard<'_>,
        addr: u64,
        f: impl FnOnce(Option<(Range<u64>, &V)>) -> R,
    ) -> R {
        let m = self.map.load();
        f(store_get(&**m, addr))
    }
    fn insert(&self, range: Range<u64>, value: V) -> Result<(), RangeError> {
        self.modify(|m| store_insert(m, range, value))
    }
    fn insert_all(&self, ranges: Vec<(Range<u64>, V)>) -> Result<(), RangeError> {
        // `modify` publishes nothing when the closure fails.
        self.modify(|m| {
            ranges
                .into_iter()
                .try_for_each(|(r, v)| store_insert(m, r, v))
        })
    }
    fn remove(&self, range: Range<u64>) -> Result<V, RangeError> {
        self.modify(|m| store_remove(m, range))
    }
    fn remove_range(&self, range: Range<u64>) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        self.modify(|m| store_remove_range(m, range))
    }
    fn replace(&self, range: Range<u64>, value: V) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        self.modify(|m| store_replace(m, range, value))
    }
    fn update(&self, range: Range<u64>, f: impl FnOnce(&V) -> V) -> Result<(), RangeError> {
        self.modify(|m| store_update(m, range, f))
    }
    fn snapshot(&self) -> Vec<(Range<u64>, V)> {
        snapshot_of(&self.map.load())
    }
    fn len(&self) -> usize {
        self.map.load().len()
    }
}

/// The names [`AnyRangeMap::new`] accepts.
pub const IMPLEMENTATIONS: [&str; 3] = ["bonsai", "rwlock", "cow"];

/// An address-space implementation chosen at run time (see the [module docs](self)).
#[derive(Debug)]
pub enum AnyRangeMap<V: RangeValue> {
    /// The RCU Bonsai range map.
    Bonsai(RangeMap<V>),
    /// `RwLock<BTreeMap>`.
    RwLock(RwLockRangeMap<V>),
    /// Copy-on-write `BTreeMap` behind `ArcSwap`.
    Cow(CowRangeMap<V>),
}

/// [`AnyRangeMap::new`] was given a name it does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownImplementation(pub String);

impl std::fmt::Display for UnknownImplementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown address-space implementation {:?} (expected one of: {})",
            self.0,
            IMPLEMENTATIONS.join(", ")
        )
    }
}

impl std::error::Error for UnknownImplementation {}

impl<V: RangeValue> AnyRangeMap<V> {
    /// An empty map of the implementation `name` (`bonsai` | `rwlock` | `cow`). `domain` is
    /// used by `bonsai` only.
    pub fn new(name: &str, domain: &Domain) -> Result<Self, UnknownImplementation> {
        Ok(match name {
            "bonsai" => Self::Bonsai(RangeMap::new(domain)),
            "rwlock" => Self::RwLock(RwLockRangeMap::new()),
            "cow" => Self::Cow(CowRangeMap::new()),
            _ => return Err(UnknownImplementation(name.to_string())),
        })
    }
}

macro_rules! dispatch {
    ($self:ident, $m:ident => $e:expr) => {
        match $self {
            AnyRangeMap::Bonsai($m) => $e,
            AnyRangeMap::RwLock($m) => $e,
            AnyRangeMap::Cow($m) => $e,
        }
    };
}

impl<V: RangeValue> ConcurrentRangeMap<V> for AnyRangeMap<V> {
    fn name(&self) -> &'static str {
        dispatch!(self, m => m.name())
    }
    #[inline]
    fn lookup<R>(
        &self,
        guard: &ReadGuard<'_>,
        addr: u64,
        f: impl FnOnce(Option<(Range<u64>, &V)>) -> R,
    ) -> R {
        dispatch!(self, m => m.lookup(guard, addr, f))
    }
    fn insert(&self, range: Range<u64>, value: V) -> Result<(), RangeError> {
        dispatch!(self, m => ConcurrentRangeMap::insert(m, range, value))
    }
    fn insert_all(&self, ranges: Vec<(Range<u64>, V)>) -> Result<(), RangeError> {
        dispatch!(self, m => ConcurrentRangeMap::insert_all(m, ranges))
    }
    fn remove(&self, range: Range<u64>) -> Result<V, RangeError> {
        dispatch!(self, m => ConcurrentRangeMap::remove(m, range))
    }
    fn remove_range(&self, range: Range<u64>) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        dispatch!(self, m => ConcurrentRangeMap::remove_range(m, range))
    }
    fn replace(&self, range: Range<u64>, value: V) -> Result<Vec<(Range<u64>, V)>, RangeError> {
        dispatch!(self, m => ConcurrentRangeMap::replace(m, range, value))
    }
    fn update(&self, range: Range<u64>, f: impl FnOnce(&V) -> V) -> Result<(), RangeError> {
        dispatch!(self, m => ConcurrentRangeMap::update(m, range, f))
    }
    fn snapshot(&self) -> Vec<(Range<u64>, V)> {
        dispatch!(self, m => ConcurrentRangeMap::snapshot(m))
    }
    fn len(&self) -> usize {
        dispatch!(self, m => ConcurrentRangeMap::len(m))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn all_three_agree() {
        let d = Domain::new();
        let reader = d.register();
        for name in IMPLEMENTATIONS {
            let m: AnyRangeMap<u64> = AnyRangeMap::new(name, &d).unwrap();
            assert_eq!(m.name(), name);
            m.insert(0x1000..0x4000, 0).unwrap();
            assert_eq!(
                m.insert(0x3000..0x5000, 0),
                Err(RangeError::Overlap {
                    range: 0x3000..0x5000,
                    existing: 0x1000..0x4000
                })
            );
            assert_eq!(
                m.remove_range(0x2000..0x3000).unwrap(),
                [(0x2000..0x3000, 0x1000)]
            );
            let g = reader.read();
            assert_eq!(
                m.lookup(&g, 0x3800, |r| r.map(|(r, v)| (r, *v))),
                Some((0x3000..0x4000, 0x2000))
            );
            assert!(m.lookup(&g, 0x2800, |r| r.is_none()));
            drop(g);
            assert_eq!(m.len(), 2);
            m.replace(0x1000..0x4000, 5).unwrap();
            assert_eq!(m.snapshot(), [(0x1000..0x4000, 5)]);
        }
        assert!(AnyRangeMap::<u64>::new("btree", &d)
            .unwrap_err()
            .to_string()
            .contains("bonsai, rwlock, cow"));
    }
}
