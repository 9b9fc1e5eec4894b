// A reader thread waits for a grace period through its reader, whose `&mut` borrow proves that
// it holds no guard: waiting for itself forever does not compile.
fn main() {
    let domain = rcu::Domain::new();
    let cell = rcu::RcuCell::new(&domain, 5u32);
    let mut reader = domain.register();
    let guard = reader.read();
    let five: &u32 = cell.load(&guard).unwrap();
    reader.synchronize();
    assert_eq!(*five, 5);
}
