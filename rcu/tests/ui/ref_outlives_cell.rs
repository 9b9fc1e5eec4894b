// Nor the cell it was loaded from: dropping the cell frees its current value at once.
fn main() {
    let domain = rcu::Domain::new();
    let reader = domain.register();
    let guard = reader.read();
    let cell = rcu::RcuCell::new(&domain, 5u32);
    let five: &u32 = cell.load(&guard).unwrap();
    drop(cell);
    assert_eq!(*five, 5);
}
