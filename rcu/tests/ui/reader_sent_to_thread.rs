// A reader handle is one thread's QSBR slot: it cannot move to another thread.
fn main() {
    let domain = rcu::Domain::new();
    let reader = domain.register();
    std::thread::spawn(move || drop(reader));
}
