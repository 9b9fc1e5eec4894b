// An offline reader cannot read: `offline` consumed the reader, and only `online` gives it
// back. (Leaking the offline handle leaks the reader, offline, instead of leaving it readable.)
fn main() {
    let domain = rcu::Domain::new();
    let reader = domain.register();
    let offline = reader.offline();
    let guard = reader.read();
    drop(guard);
    std::mem::forget(offline);
}
