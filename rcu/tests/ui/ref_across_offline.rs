// Nor across an offline stretch: going offline takes the reader by value (or, for
// `offline_while`, mutably), and the guard (which the reference borrows) borrows it.
fn main() {
    let domain = rcu::Domain::new();
    let cell = rcu::RcuCell::new(&domain, 5u32);
    let reader = domain.register();
    let guard = reader.read();
    let five: &u32 = cell.load(&guard).unwrap();
    let offline = reader.offline();
    assert_eq!(*five, 5);
    drop(offline);
}
