// The closure form of going offline needs the reader mutably: no reference survives it.
fn main() {
    let domain = rcu::Domain::new();
    let cell = rcu::RcuCell::new(&domain, 5u32);
    let mut reader = domain.register();
    let guard = reader.read();
    let five: &u32 = cell.load(&guard).unwrap();
    reader.offline_while(|| std::thread::sleep(std::time::Duration::from_millis(1)));
    assert_eq!(*five, 5);
}
