// A reference cannot outlive the guard it was loaded under.
fn main() {
    let domain = rcu::Domain::new();
    let cell = rcu::RcuCell::new(&domain, 5u32);
    let reader = domain.register();
    let five: &u32 = {
        let guard = reader.read();
        cell.load(&guard).unwrap()
    };
    assert_eq!(*five, 5);
}
