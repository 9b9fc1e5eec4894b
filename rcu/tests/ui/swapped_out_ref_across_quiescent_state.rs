// The old value handed back by `swap` is bound to the guard like a loaded one.
fn main() {
    let domain = rcu::Domain::new();
    let cell = rcu::RcuCell::new(&domain, 5u32);
    let mut reader = domain.register();
    let guard = reader.read();
    let old: &u32 = cell.swap(Some(6), &guard).unwrap();
    reader.quiescent_state();
    assert_eq!(*old, 5);
}
