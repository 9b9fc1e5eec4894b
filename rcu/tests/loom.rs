//! loom models of the grace-period protocol. Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p rcu --release --test loom`.
//!
//! Under `--cfg loom` the crate's atomics, fences, mutexes and park/unpark are loom's (see
//! `src/sync.rs`), the waiter spins once before parking (so every model also exercises the
//! park path and its wake-ups: a lost wake-up shows up as a loom deadlock), and there is no
//! background reclamation thread.
//!
//! Most models never touch freed memory: the protected "objects" live in a [`Heap`] of loom
//! `UnsafeCell`s that outlives the model, "freeing" one writes a poison value into it, and
//! "using" one reads it. loom tracks causality for every such access, so a reader access that
//! is not ordered before the poisoning write is reported as a causality violation even when
//! the interleaving ran it first; a read that comes after it fails the `LIVE` assertion. The
//! published pointer is modelled by an index in a loom `AtomicUsize`, stored with release and
//! loaded with acquire, exactly like `RcuCell`'s pointer.
//!
//! [`rcu_cell_retirement_against_a_late_reader`] uses a real `RcuCell` and real boxes; its
//! values keep their liveness magic away from the words the allocator reuses when it frees
//! a small block, and the reader checks that magic before touching anything else, so a
//! violation is an assertion failure rather than a wild pointer.
//!
//! Which model catches which mutation of the core is listed in `docs/rcu.md`.
#![cfg(loom)]
#![allow(clippy::undocumented_unsafe_blocks)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, Ordering::*};
use loom::sync::Arc;
use loom::thread;
use rcu::{Config, Domain, RcuCell, ReadGuard};

fn domain() -> Domain {
    Domain::with_config(Config {
        max_backlog: 1 << 20,
        background_reclaim: false,
        ..Config::default()
    })
}

const LIVE: u64 = 0x1111_1111;
const POISON: u64 = 0xdead_dead;

/// RCU-protected objects, the published index of the current one, and poison-on-free.
struct Heap {
    objs: Vec<UnsafeCell<u64>>,
    published: AtomicUsize,
}

// SAFETY: the cells are only accessed through `with`/`with_mut`, which loom checks for races;
// the point of the models is that RCU orders those accesses.
unsafe impl Sync for Heap {}
// SAFETY: as above.
unsafe impl Send for Heap {}

impl Heap {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            objs: (0..n).map(|_| UnsafeCell::new(LIVE)).collect(),
            published: AtomicUsize::new(0),
        })
    }

    /// `rcu_dereference` + use: the guard proves we are in a read-side section.
    fn read(&self, _guard: &ReadGuard<'_>) -> usize {
        let i = self.published.load(Acquire);
        let v = self.objs[i].with(|p| unsafe { *p });
        assert_eq!(v, LIVE, "object {i} read after it was freed");
        i
    }

    /// `rcu_assign_pointer`: publishes `new`, returns the unpublished index.
    fn replace(&self, new: usize) -> usize {
        self.published.swap(new, AcqRel)
    }

    /// The "free": only legal after a grace period that began after `i` was unpublished.
    fn free(&self, i: usize) {
        self.objs[i].with_mut(|p| unsafe { *p = POISON });
    }
}

/// (a) A reader going online (registration), reading, announcing a quiescent state, reading,
/// going offline and back online, and reading again, against a writer that unpublishes,
/// waits for a grace period and frees. The writer must not return from `synchronize` while a
/// read-side section that could have seen the old object is still running.
#[test]
fn reader_sections_against_synchronize() {
    loom::model(|| {
        let d = domain();
        let heap = Heap::new(2);
        let reader = {
            let (d, heap) = (d.clone(), heap.clone());
            thread::spawn(move || {
                let mut r = d.register();
                heap.read(&r.read());
                r.quiescent_state();
                heap.read(&r.read());
                r.offline_while(|| {});
                heap.read(&r.read());
            })
        };
        let old = heap.replace(1);
        d.synchronize();
        heap.free(old);
        reader.join().unwrap();
    });
}

/// (a') A reader that keeps one section open across the writer's whole grace period:
/// `synchronize` must wait (park) until the section ends and the reader announces a
/// quiescent state, and the wake-up must not be lost.
#[test]
fn synchronize_waits_for_an_open_section() {
    loom::model(|| {
        let d = domain();
        let heap = Heap::new(2);
        let reader = {
            let (d, heap) = (d.clone(), heap.clone());
            thread::spawn(move || {
                let mut r = d.register();
                {
                    let g = r.read();
                    heap.read(&g);
                    thread::yield_now();
                    heap.read(&g);
                }
                r.quiescent_state();
                // Stay registered and online, announcing nothing more: only the quiescent
                // state above may release the writer.
                thread::yield_now();
            })
        };
        let old = heap.replace(1);
        d.synchronize();
        heap.free(old);
        reader.join().unwrap();
    });
}

/// (b) Retirement against a late reader: the writer unpublishes, retires the object with
/// `defer` and runs reclamation (`reclaim`: a grace period, then the callbacks); the reader
/// reads once, announces a quiescent state and reads again.
#[test]
fn deferred_free_against_a_late_reader() {
    loom::model(|| {
        let d = domain();
        let heap = Heap::new(2);
        let reader = {
            let (d, heap) = (d.clone(), heap.clone());
            thread::spawn(move || {
                let mut r = d.register();
                heap.read(&r.read());
                r.quiescent_state();
                heap.read(&r.read());
            })
        };
        let old = heap.replace(1);
        {
            let heap = heap.clone();
            d.defer(move || heap.free(old));
        }
        d.reclaim();
        reader.join().unwrap();
        d.barrier();
        assert_eq!(d.stats().backlog, 0);
    });
}

/// A value whose liveness magic sits past the two words glibc's allocator overwrites when it
/// frees a small block, so reading it after a premature free sees `POISON`, and the reader
/// checks it before following any pointer.
#[repr(C)]
struct Val {
    _allocator_words: [u64; 2],
    magic: u64,
}

impl Val {
    fn new() -> Self {
        Val {
            _allocator_words: [0; 2],
            magic: LIVE,
        }
    }
}

impl Drop for Val {
    fn drop(&mut self) {
        assert_eq!(self.magic, LIVE, "value dropped twice");
        // Volatile: a store to memory about to be freed is otherwise a dead store.
        unsafe { std::ptr::write_volatile(&mut self.magic, POISON) };
    }
}

/// (b') The same with a real `RcuCell` (its swap, its boxes, its `defer_drop`): a reader that
/// loaded the old value before the writer replaced it must never see it freed while its guard
/// lives.
#[test]
fn rcu_cell_retirement_against_a_late_reader() {
    loom::model(|| {
        let d = domain();
        let cell = Arc::new(RcuCell::new(&d, Val::new()));
        let reader = {
            let (d, cell) = (d.clone(), cell.clone());
            thread::spawn(move || {
                let mut r = d.register();
                {
                    let g = r.read();
                    let v = cell.load(&g).unwrap();
                    thread::yield_now();
                    // Volatile: read it now, not when the compiler finds convenient.
                    let magic = unsafe { std::ptr::read_volatile(&v.magic) };
                    assert_eq!(magic, LIVE, "read a freed value");
                }
                r.quiescent_state();
            })
        };
        cell.store(Some(Val::new()));
        d.reclaim();
        reader.join().unwrap();
    });
}

/// (c) Two concurrent `synchronize` callers, each retiring its own unpublished object, and a
/// reader. The callers may share a grace period, but each must return only after a grace
/// period that began after its own unpublish.
#[test]
fn concurrent_synchronize_callers_and_a_reader() {
    loom::model(|| {
        let d = domain();
        let heap = Heap::new(3);
        let reader = {
            let (d, heap) = (d.clone(), heap.clone());
            thread::spawn(move || {
                let mut r = d.register();
                heap.read(&r.read());
                r.quiescent_state();
                heap.read(&r.read());
            })
        };
        let other_writer = {
            let (d, heap) = (d.clone(), heap.clone());
            thread::spawn(move || {
                let old = heap.replace(2);
                d.synchronize();
                heap.free(old);
            })
        };
        let old = heap.replace(1);
        d.synchronize();
        heap.free(old);
        other_writer.join().unwrap();
        reader.join().unwrap();
        let s = d.stats();
        assert_eq!(s.synchronize_calls, 2);
        assert!(s.grace_periods <= 2);
    });
}

/// (d) A reader unregistering (dropping its handle) at the end of a section while a writer
/// waits for it: the writer must neither miss the section nor hang.
#[test]
fn reader_unregistering_while_a_writer_waits() {
    loom::model(|| {
        let d = domain();
        let heap = Heap::new(2);
        let reader = {
            let (d, heap) = (d.clone(), heap.clone());
            thread::spawn(move || {
                let r = d.register();
                {
                    let g = r.read();
                    heap.read(&g);
                    thread::yield_now();
                    heap.read(&g);
                }
                drop(r);
            })
        };
        let old = heap.replace(1);
        d.synchronize();
        heap.free(old);
        reader.join().unwrap();
        assert_eq!(d.stats().readers, 0);
    });
}
/// The frame of the back-pressure models (e) and (g): a domain whose backlog bound is one
/// callback, a reader thread running `reader` (with its own handles to the domain and the
/// heap), and this thread draining concurrently. Afterwards nothing is left queued and at most
/// one stall happened: one, unless the concurrent `reclaim` emptied the queue between the
/// push and the back-pressure's re-check.
fn back_pressure_model(reader: fn(Domain, Arc<Heap>)) {
    loom::model(move || {
        let d = Domain::with_config(Config {
            max_backlog: 1,
            background_reclaim: false,
            ..Config::default()
        });
        let heap = Heap::new(2);
        let reader = {
            let (d, heap) = (d.clone(), heap.clone());
            thread::spawn(move || reader(d, heap))
        };
        d.reclaim();
        reader.join().unwrap();
        d.barrier();
        let s = d.stats();
        assert_eq!(s.backlog, 0);
        assert!(s.backpressure_stalls <= 1);
    });
}

/// (e) Back-pressure on a reader thread: a reader that retires past the backlog bound inside
/// `offline_while` (back-pressure applies only where no reader of the thread is online) must
/// not deadlock with another thread already draining, which may have begun its grace period
/// while this reader was still online and reading.
#[test]
fn back_pressure_on_a_reader_thread_does_not_deadlock() {
    back_pressure_model(|d, heap| {
        let mut r = d.register();
        heap.read(&r.read());
        let old = heap.replace(1);
        let h = heap.clone();
        r.offline_while(|| d.defer(move || h.free(old))); // hits the bound: drains
        r.quiescent_state();
    });
}

/// (g) Back-pressure put off to a reader's quiescent state: a reader retires past the bound
/// while online (it may hold a guard, so the retirement cannot wait), then announces a
/// quiescent state, which pays: it goes offline and drains, freeing what it retired, while
/// another thread drains concurrently. The free must come after the reader's read (a
/// causality violation otherwise), and nothing deadlocks.
#[test]
fn back_pressure_put_off_to_the_readers_quiescent_state() {
    back_pressure_model(|d, heap| {
        let mut r = d.register();
        let old = {
            let g = r.read();
            heap.read(&g);
            heap.replace(1)
        };
        let h = heap.clone();
        d.defer(move || h.free(old)); // past the bound, online: owed
        r.quiescent_state(); // pays (unless the other drainer took the batch)
    });
}

/// (f) The waiter's wake-up: the reader reads, then keeps announcing quiescent states (the
/// fast path, which wakes nobody, once it has caught up) until the writer is through. The
/// writer, parked after one spin, must be woken by the announcement's slow path: if it is
/// not, the model livelocks and loom reports it.
#[test]
fn quiescent_state_wakes_a_parked_writer() {
    loom::model(|| {
        let d = domain();
        let heap = Heap::new(2);
        let done = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (d, heap, done) = (d.clone(), heap.clone(), done.clone());
            thread::spawn(move || {
                let mut r = d.register();
                heap.read(&r.read());
                while !done.load(Acquire) {
                    r.quiescent_state();
                    thread::yield_now();
                }
            })
        };
        let old = heap.replace(1);
        d.synchronize();
        heap.free(old);
        done.store(true, Release);
        reader.join().unwrap();
    });
}

/// The panic message of the callbacks that panic on purpose in these models.
const MODEL_PANIC: &str = "a deferred callback panics (on purpose)";

/// Keeps the panic hook quiet about [`MODEL_PANIC`] (loom runs a model thousands of times);
/// every other panic is reported as usual.
fn quiet_model_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&MODEL_PANIC) {
                default(info);
            }
        }));
    });
}

/// (h) A reader pays put-off back-pressure at its quiescent state and the batch it runs holds
/// a callback that panics; whatever reaches the reader (nothing: callbacks' panics are
/// contained) is caught, and it reads on. It must be back online by then: a writer that
/// unpublishes, waits for a grace period and frees concurrently must not free what it reads
/// (a causality violation if the reader were left offline).
#[test]
fn a_panicking_callback_during_back_pressure_leaves_the_reader_online() {
    quiet_model_panics();
    loom::model(|| {
        let d = Domain::with_config(Config {
            max_backlog: 1,
            background_reclaim: false,
            ..Config::default()
        });
        let heap = Heap::new(2);
        let reader = {
            let (d, heap) = (d.clone(), heap.clone());
            thread::spawn(move || {
                let mut r = d.register();
                d.defer(|| std::panic::panic_any(MODEL_PANIC)); // at the bound, online: owed
                let paid = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    r.quiescent_state() // pays: offline, grace period, the batch, online
                }));
                heap.read(&r.read());
                paid.is_ok()
            })
        };
        let old = heap.replace(1);
        d.synchronize();
        heap.free(old);
        assert!(
            reader.join().unwrap(),
            "the callback's panic reached the reader"
        );
        let s = d.stats();
        assert_eq!((s.callback_panics, s.backlog), (1, 0));
    });
}
