// A reference loaded under a guard cannot be kept across a quiescent state: announcing one
// needs the reader mutably, and the guard (which the reference borrows) borrows it.
fn main() {
    let domain = rcu::Domain::new();
    let cell = rcu::RcuCell::new(&domain, 5u32);
    let mut reader = domain.register();
    let guard = reader.read();
    let five: &u32 = cell.load(&guard).unwrap();
    reader.quiescent_state();
    assert_eq!(*five, 5);
}
