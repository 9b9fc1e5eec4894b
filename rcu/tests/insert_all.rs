//! `ConcurrentRangeMap::insert_all`: every range or none, in each implementation.
#![cfg(all(feature = "baselines", not(loom)))]

use rcu::baselines::AnyRangeMap;
use rcu::{ConcurrentRangeMap, Domain};

#[test]
fn insert_all_is_all_or_nothing_in_every_implementation() {
    let domain = Domain::new();
    for name in ["bonsai", "rwlock", "cow"] {
        let m: AnyRangeMap<u64> = AnyRangeMap::new(name, &domain).unwrap();
        m.insert_all((0..1000u64).map(|i| (i * 10..i * 10 + 5, i)).collect())
            .unwrap();
        assert_eq!(m.len(), 1000, "{name}");
        // The last of these overlaps [50, 55): none of them may stay.
        let bad = vec![(20_000..20_010, 1), (30_000..30_010, 2), (52..53, 3)];
        assert!(m.insert_all(bad).is_err(), "{name}");
        assert_eq!(m.len(), 1000, "{name}");
        let snap = m.snapshot();
        assert_eq!(snap[7], (70..75, 7), "{name}");
        assert!(snap.iter().all(|(r, _)| r.end <= 10_000), "{name}");
    }
}
