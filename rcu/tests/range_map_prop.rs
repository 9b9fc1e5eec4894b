//! Property tests: the Bonsai tree against `BTreeMap`, and the range map (and, with feature
//! `baselines`, the `rwlock` and `cow` maps) against a brute-force model. The tree's
//! invariants (order, sizes, weight balance) are checked after every operation.

use std::collections::BTreeMap;
use std::ops::Range;

use proptest::prelude::*;
use rcu::{BonsaiTree, Domain, RangeError, RangeMap};

#[derive(Clone, Debug)]
enum TreeOp {
    Insert(u16, u32),
    Remove(u16),
    /// Several inserts/removes in one transaction.
    Batch(Vec<(bool, u16, u32)>),
    /// A transaction that is aborted after doing some work.
    Aborted(Vec<(bool, u16, u32)>),
    Get(u16),
    Floor(u16),
    Ceiling(u16),
    Iterate,
}

fn tree_op() -> impl Strategy<Value = TreeOp> {
    let key = 0u16..200;
    let batch = prop::collection::vec((any::<bool>(), 0u16..200, any::<u32>()), 0..12);
    prop_oneof![
        6 => (key.clone(), any::<u32>()).prop_map(|(k, v)| TreeOp::Insert(k, v)),
        4 => key.clone().prop_map(TreeOp::Remove),
        2 => batch.clone().prop_map(TreeOp::Batch),
        1 => batch.prop_map(TreeOp::Aborted),
        2 => key.clone().prop_map(TreeOp::Get),
        2 => key.clone().prop_map(TreeOp::Floor),
        1 => key.prop_map(TreeOp::Ceiling),
        1 => Just(TreeOp::Iterate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn bonsai_tree_matches_btreemap(ops in prop::collection::vec(tree_op(), 1..120)) {
        let domain = Domain::new();
        let tree: BonsaiTree<u16, u32> = BonsaiTree::new(&domain);
        let mut model: BTreeMap<u16, u32> = BTreeMap::new();
        let reader = domain.register();
        // An iterator over the initial (empty) version, and one over a later version, must
        // keep yielding their snapshots whatever happens afterwards.
        let guard = reader.read();
        let mut snapshot_iter = None;
        let mut snapshot_model = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                TreeOp::Insert(k, v) => prop_assert_eq!(tree.insert(k, v), model.insert(k, v)),
                TreeOp::Remove(k) => prop_assert_eq!(tree.remove(&k), model.remove(&k)),
                TreeOp::Batch(b) => {
                    let got: Vec<Option<u32>> = tree.update(|txn| {
                        b.iter()
                            .map(|&(ins, k, v)| if ins { txn.insert(k, v) } else { txn.remove(&k) })
                            .collect()
                    });
                    let want: Vec<Option<u32>> = b
                        .iter()
                        .map(|&(ins, k, v)| if ins { model.insert(k, v) } else { model.remove(&k) })
                        .collect();
                    prop_assert_eq!(got, want);
                }
                TreeOp::Aborted(b) => {
                    let r: Result<(), ()> = tree.try_update(|txn| {
                        for &(ins, k, v) in &b {
                            if ins { txn.insert(k, v); } else { txn.remove(&k); }
                        }
                        Err(())
                    });
                    prop_assert!(r.is_err());
                }
                TreeOp::Get(k) => prop_assert_eq!(tree.get(&k, &guard), model.get(&k)),
                TreeOp::Floor(k) => {
                    prop_assert_eq!(tree.floor(&k, &guard), model.range(..=k).next_back())
                }
                TreeOp::Ceiling(k) => {
                    prop_assert_eq!(tree.ceiling(&k, &guard), model.range(k..).next())
                }
                TreeOp::Iterate => {
                    let got: Vec<_> = tree.iter(&guard).collect();
                    let want: Vec<_> = model.iter().collect();
                    prop_assert_eq!(got, want);
                    prop_assert_eq!(tree.first(&guard), model.first_key_value());
                    prop_assert_eq!(tree.last(&guard), model.last_key_value());
                }
            }
            if let Err(e) = tree.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
            prop_assert_eq!(tree.len(), model.len());
            if i == 10 {
                snapshot_iter = Some(tree.iter(&guard));
                snapshot_model = model.iter().map(|(&k, &v)| (k, v)).collect();
            }
        }
        if let Some(it) = snapshot_iter {
            let got: Vec<(u16, u32)> = it.map(|(&k, &v)| (k, v)).collect();
            prop_assert_eq!(got, snapshot_model);
        }
        drop(guard);
        drop(reader);
        domain.barrier();
        prop_assert_eq!(tree.live_nodes(), tree.len());
    }
}

// ---- range map ------------------------------------------------------------------------

/// The brute-force model: a sorted list of (range, offset) with `u64` offset values.
#[derive(Default, Debug)]
struct Model(Vec<(Range<u64>, u64)>);

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl Model {
    fn insert(&mut self, r: Range<u64>, v: u64) -> Result<(), RangeError> {
        if r.start >= r.end {
            return Err(RangeError::Empty { range: r });
        }
        if let Some((e, _)) = self.0.iter().find(|(e, _)| overlaps(e, &r)) {
            return Err(RangeError::Overlap {
                range: r,
                existing: e.clone(),
            });
        }
        self.0.push((r, v));
        self.0.sort_by_key(|(r, _)| r.start);
        Ok(())
    }

    fn remove(&mut self, r: Range<u64>) -> Result<u64, RangeError> {
        if r.start >= r.end {
            return Err(RangeError::Empty { range: r });
        }
        match self.0.iter().position(|(e, _)| *e == r) {
            Some(i) => Ok(self.0.remove(i).1),
            None => Err(RangeError::NotFound { range: r }),
        }
    }

    fn remove_range(&mut self, r: Range<u64>) -> Result<Vec<(Range<u64>, u64)>, RangeError> {
        if r.start >= r.end {
            return Err(RangeError::Empty { range: r });
        }
        let mut kept = Vec::new();
        let mut removed = Vec::new();
        for (e, v) in self.0.drain(..) {
            if !overlaps(&e, &r) {
                kept.push((e, v));
                continue;
            }
            if e.start < r.start {
                kept.push((e.start..r.start, v));
            }
            if e.end > r.end {
                kept.push((r.end..e.end, v + (r.end - e.start)));
            }
            let lo = e.start.max(r.start);
            removed.push((lo..e.end.min(r.end), v + (lo - e.start)));
        }
        kept.sort_by_key(|(r, _)| r.start);
        self.0 = kept;
        Ok(removed)
    }

    fn get(&self, addr: u64) -> Option<(Range<u64>, u64)> {
        self.0.iter().find(|(r, _)| r.contains(&addr)).cloned()
    }
}

#[derive(Clone, Debug)]
enum MapOp {
    Insert(Range<u64>, u64),
    /// Remove an existing range (by index, modulo the length) or, if `None`, a random one.
    Remove(Option<usize>, Range<u64>),
    RemoveRange(Range<u64>),
    Replace(Range<u64>, u64),
    Update(usize),
    Lookup(u64),
    Iterate,
}

const SPACE: u64 = 256;

fn range() -> impl Strategy<Value = Range<u64>> {
    // Mostly valid, some empty or inverted.
    (0..SPACE, 0u64..40)
        .prop_map(|(s, len)| s..(s + len).saturating_sub(if len == 0 { 1 } else { 0 }))
}

fn map_op() -> impl Strategy<Value = MapOp> {
    prop_oneof![
        6 => (range(), 0u64..1 << 40).prop_map(|(r, v)| MapOp::Insert(r, v)),
        2 => (prop::option::of(any::<usize>()), range()).prop_map(|(i, r)| MapOp::Remove(i, r)),
        4 => range().prop_map(MapOp::RemoveRange),
        1 => (range(), 0u64..1 << 40).prop_map(|(r, v)| MapOp::Replace(r, v)),
        1 => any::<usize>().prop_map(MapOp::Update),
        4 => (0..SPACE + 10).prop_map(MapOp::Lookup),
        1 => Just(MapOp::Iterate),
    ]
}

/// Applies `ops` to `map` (through the shared trait) and to the model, comparing every
/// result and the full contents after every operation.
fn run_against_model<M: rcu::ConcurrentRangeMap<u64>>(
    map: &M,
    guard_of: &rcu::Reader,
    ops: &[MapOp],
    check: impl Fn() -> Result<(), String>,
) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    for op in ops {
        match op.clone() {
            MapOp::Insert(r, v) => prop_assert_eq!(map.insert(r.clone(), v), model.insert(r, v)),
            MapOp::Remove(i, r) => {
                let r = match i {
                    Some(i) if !model.0.is_empty() => model.0[i % model.0.len()].0.clone(),
                    _ => r,
                };
                prop_assert_eq!(map.remove(r.clone()), model.remove(r));
            }
            MapOp::RemoveRange(r) => {
                prop_assert_eq!(map.remove_range(r.clone()), model.remove_range(r))
            }
            MapOp::Replace(r, v) => {
                let want = model.remove_range(r.clone()).inspect(|_| {
                    model.insert(r.clone(), v).unwrap();
                });
                prop_assert_eq!(map.replace(r, v), want);
            }
            MapOp::Update(i) => {
                if !model.0.is_empty() {
                    let i = i % model.0.len();
                    let r = model.0[i].0.clone();
                    model.0[i].1 ^= 1;
                    prop_assert_eq!(map.update(r, |v| v ^ 1), Ok(()));
                }
            }
            MapOp::Lookup(a) => {
                let g = guard_of.read();
                let got = map.lookup(&g, a, |e| e.map(|(r, v)| (r, *v)));
                prop_assert_eq!(got, model.get(a));
            }
            MapOp::Iterate => {}
        }
        prop_assert_eq!(map.snapshot(), model.0.clone());
        prop_assert_eq!(map.len(), model.0.len());
        if let Err(e) = check() {
            return Err(TestCaseError::fail(e));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn range_map_matches_model(ops in prop::collection::vec(map_op(), 1..80)) {
        let domain = Domain::new();
        let reader = domain.register();
        let map: RangeMap<u64> = RangeMap::new(&domain);
        run_against_model(&map, &reader, &ops, || map.check_invariants())?;
        // Reader-side views agree with the snapshot.
        let g = reader.read();
        let snap = map.snapshot();
        let it: Vec<_> = map.iter(&g).map(|(r, v)| (r, *v)).collect();
        prop_assert_eq!(&it, &snap);
        prop_assert_eq!(map.first(&g).map(|(r, v)| (r, *v)), snap.first().cloned());
        prop_assert_eq!(map.last(&g).map(|(r, v)| (r, *v)), snap.last().cloned());
        let probe = 40..120;
        let ov: Vec<_> = map.overlapping(probe.clone(), &g).map(|(r, v)| (r, *v)).collect();
        let want: Vec<_> = snap.iter().filter(|(r, _)| overlaps(r, &probe)).cloned().collect();
        prop_assert_eq!(ov, want);
        drop(g);
        drop(reader);
        domain.barrier();
        prop_assert_eq!(map.live_nodes(), map.len());
    }

    #[test]
    fn range_map_transaction_is_all_or_nothing(
        ops in prop::collection::vec((range(), 0u64..100), 1..10),
    ) {
        let domain = Domain::new();
        let map: RangeMap<u64> = RangeMap::new(&domain);
        map.insert(100..150, 7).unwrap();
        let before = map.snapshot();
        // Insert everything; any overlap aborts the whole transaction.
        let r = map.transaction(|t| {
            for (r, v) in &ops {
                t.insert(r.clone(), *v)?;
            }
            Ok::<_, RangeError>(())
        });
        if r.is_err() {
            prop_assert_eq!(map.snapshot(), before);
        } else {
            prop_assert_eq!(map.len(), 1 + ops.len());
        }
        if let Err(e) = map.check_invariants() {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[cfg(feature = "baselines")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn baselines_match_model(ops in prop::collection::vec(map_op(), 1..60)) {
        let domain = Domain::new();
        let reader = domain.register();
        for name in rcu::baselines::IMPLEMENTATIONS {
            let map: rcu::baselines::AnyRangeMap<u64> =
                rcu::baselines::AnyRangeMap::new(name, &domain).unwrap();
            run_against_model(&map, &reader, &ops, || Ok(()))?;
        }
    }
}

#[test]
fn from_sorted_builds_a_balanced_map() {
    let domain = Domain::new();
    let map =
        RangeMap::from_sorted(&domain, (0..10_000u64).map(|i| (i * 10..i * 10 + 5, i))).unwrap();
    map.check_invariants().unwrap();
    assert_eq!(map.tree().height(), 14);
    let reader = domain.register();
    let g = reader.read();
    assert_eq!(map.get(12_343, &g), Some((12_340..12_345, &1234)));
    assert_eq!(map.get(12_346, &g), None);
    assert!(matches!(
        RangeMap::from_sorted(&domain, [(0..10, 0u64), (5..20, 0)]),
        Err(RangeError::Overlap { .. })
    ));
}
