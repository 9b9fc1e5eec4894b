// A read guard belongs to its thread's reader: it cannot move to another thread.
fn main() {
    let domain = rcu::Domain::new();
    let reader = domain.register();
    let guard = reader.read();
    std::thread::scope(|s| {
        s.spawn(move || drop(guard));
    });
}
