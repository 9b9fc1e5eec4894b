// Nor across an offline section: going offline needs the reader mutably too.
fn main() {
    let domain = rcu::Domain::new();
    let cell = rcu::RcuCell::new(&domain, 5u32);
    let mut reader = domain.register();
    let guard = reader.read();
    let five: &u32 = cell.load(&guard).unwrap();
    let offline = reader.offline();
    assert_eq!(*five, 5);
    drop(offline);
}
