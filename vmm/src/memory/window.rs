//! The adaptive fault-around window (`--fault-around adaptive`, the default).
//!
//! Each faulting thread (a vCPU thread in `vcpu` mode, the handler thread in `handler` mode)
//! keeps a small table of *streams*, like a hardware stride prefetcher. A stream remembers the
//! page of its last first-touch fault, the stride it has seen (the distance between its last two
//! faults, in pages, either sign), the page where its next fault is expected if the guest keeps
//! going, and its window (how many pages, one stride apart, the next fault fetches):
//!
//! - A fault exactly where a stream expected it (**a hit**) means the guest walked through
//!   everything the stream fetched last time, in the stride it predicted, and went one stride
//!   past: the window doubles, up to [`MAX_WINDOW`] pages, and the fetch covers the faulting
//!   page and the next `window - 1` pages one stride apart (clamped to the region: it never
//!   crosses a region boundary).
//! - A fault near a stream (within [`MAX_STRIDE`] pages of its last fault) but not where it was
//!   expected (**a miss**) means the prediction was wrong: the pages fetched beyond the fault
//!   went untouched as far as this stream can tell, so the window shrinks to a quarter, and
//!   the distance becomes the stride to confirm. The next fault one stride further is a hit.
//! - A fault near no stream starts a new one (in the least recently used slot) with a window
//!   of one page.
//! - A stream belongs to one region (`lo`, its first page): a fault in another region never
//!   matches it, so a scan that runs off one region's end starts afresh in the next, and a
//!   grown window never carries over to memory the guest may use differently.
//!
//! So a sequential or strided scan grows 1 → 2 → 4 → … → 512 pages per exit after two faults
//! that agree, and a random permutation stays at one page (two random faults rarely agree on a
//! stride, and a wrong guess costs one page and shrinks at once). Several streams per thread
//! let one handler thread follow several vCPUs, or a vCPU follow a few interleaved scans.
//!
//! Why not ask the host which fetched pages the guest touched? On this host there is nothing
//! to ask, per page and cheaply: guest accesses go through KVM's shadow page tables, and the
//! host PTEs that userfaultfd installs are already young and dirty; `mincore` and the
//! residency bitmap say *present*, which every fetched page is. What the VMM does see is the
//! next first-touch fault of the same stream, and that is the sample used: a fault at the
//! predicted page confirms the window, a fault anywhere else refutes it. What over-fetch costs
//! in the end is measured, not inferred: `vmm stress` reports `overfetch` (pages populated /
//! pages touched).
//!
//! The state is per thread ([`with_streams`]); it is a pure performance hint, so a table that
//! carries over between address spaces on one thread (tests) is harmless, but it is reset when
//! the address space changes anyway.

use std::cell::RefCell;

/// The largest window, in pages (one exit populates at most this many; 2 MiB of 4 KiB pages).
pub const MAX_WINDOW: u64 = 512;
/// The largest stride followed, in pages.
pub const MAX_STRIDE: u64 = 512;
/// Streams per faulting thread.
pub const STREAMS: usize = 4;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stream {
    /// Whether the slot is in use.
    live: bool,
    /// First page of the region the stream is in (streams stay inside one region).
    region: u64,
    /// Page of the last fault.
    last: u64,
    /// Pages between the last two faults (0 while unknown).
    stride: i64,
    /// Where the next fault is expected (valid when `stride != 0`).
    next: u64,
    /// Pages the next hit fetches before doubling.
    window: u64,
    /// For least-recently-used replacement.
    used: u64,
}

/// What to populate for one fault: `count` pages from `first`, `stride` pages apart (the
/// faulting page is `first`). `count` is at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetch {
    /// The faulting page.
    pub first: u64,
    /// Distance between fetched pages (±1 for a sequential run).
    pub stride: i64,
    /// Pages to fetch, the faulting page included.
    pub count: u64,
}

impl Fetch {
    /// The fetched pages as a contiguous range `[lo, hi)` when the stride is ±1.
    pub fn contiguous(&self) -> Option<(u64, u64)> {
        match self.stride {
            1 => Some((self.first, self.first + self.count)),
            -1 => Some((self.first + 1 - self.count, self.first + 1)),
            _ => None,
        }
    }

    /// The `i`-th fetched page.
    pub fn page(&self, i: u64) -> u64 {
        self.first
            .wrapping_add_signed(self.stride.wrapping_mul(i as i64))
    }
}

/// One thread's streams.
#[derive(Clone, Debug, Default)]
pub struct Streams {
    owner: usize,
    slots: [Stream; STREAMS],
    clock: u64,
}

impl Streams {
    /// Plans the fetch for a first-touch fault at page `pfn` of a region spanning pages
    /// `[lo, hi)` (`lo <= pfn < hi`), and updates the streams.
    pub fn fault(&mut self, pfn: u64, lo: u64, hi: u64) -> Fetch {
        self.clock += 1;
        let now = self.clock;
        // A hit: the page a stream expected.
        if let Some(s) = self
            .slots
            .iter_mut()
            .find(|s| s.live && s.region == lo && s.stride != 0 && s.next == pfn)
        {
            s.window = (s.window * 2).min(MAX_WINDOW);
            return Self::fetch(s, pfn, lo, hi, now);
        }
        // A miss near a stream: learn the distance as the stride to confirm; shrink.
        let near = self
            .slots
            .iter_mut()
            .filter(|s| {
                s.live && s.region == lo && s.last != pfn && s.last.abs_diff(pfn) <= MAX_STRIDE
            })
            .min_by_key(|s| s.last.abs_diff(pfn));
        if let Some(s) = near {
            s.stride = pfn as i64 - s.last as i64;
            s.window = (s.window / 4).max(1);
            // Fetch only the faulting page: the stride is a guess until the next fault.
            let w = s.window;
            s.window = 1;
            let f = Self::fetch(s, pfn, lo, hi, now);
            s.window = w;
            return f;
        }
        // A new stream, in the least recently used slot.
        let slot = self
            .slots
            .iter_mut()
            .min_by_key(|s| if s.live { s.used } else { 0 })
            .expect("STREAMS > 0");
        *slot = Stream {
            live: true,
            region: lo,
            last: pfn,
            stride: 0,
            next: 0,
            window: 1,
            used: now,
        };
        Fetch {
            first: pfn,
            stride: 1,
            count: 1,
        }
    }

    /// Fetches `s.window` pages from `pfn` one stride apart, within `[lo, hi)`, and sets
    /// where the stream expects its next fault.
    fn fetch(s: &mut Stream, pfn: u64, lo: u64, hi: u64, now: u64) -> Fetch {
        let d = s.stride;
        let step = d.unsigned_abs();
        // Pages left in the region in the stream's direction, the faulting page included.
        let room = if d > 0 {
            (hi - 1 - pfn) / step + 1
        } else {
            (pfn - lo) / step + 1
        };
        let count = s.window.min(room).max(1);
        s.last = pfn;
        s.used = now;
        let f = Fetch {
            first: pfn,
            stride: d,
            count,
        };
        s.next = f.page(count);
        f
    }

    /// The window the stream that last faulted at `pfn` will fetch on its next hit (tests).
    #[cfg(test)]
    fn window_at(&self, pfn: u64) -> Option<u64> {
        self.slots
            .iter()
            .find(|s| s.live && s.last == pfn)
            .map(|s| s.window)
    }
}

thread_local! {
    static STREAMS_OF_THIS_THREAD: RefCell<Streams> = RefCell::new(Streams::default());
}

/// Runs `f` on this thread's streams for the address space identified by `owner` (its
/// address), resetting them when the thread moves to another address space.
pub fn with_streams<R>(owner: usize, f: impl FnOnce(&mut Streams) -> R) -> R {
    STREAMS_OF_THIS_THREAD.with(|s| {
        let mut s = s.borrow_mut();
        if s.owner != owner {
            *s = Streams {
                owner,
                ..Streams::default()
            };
        }
        f(&mut s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds faults of a guest that touches `order` (pages), skipping pages a fetch already
    /// populated, as the real fault path does; returns (faults, pages populated).
    fn drive(order: impl Iterator<Item = u64>, lo: u64, hi: u64) -> (u64, u64, Streams) {
        let mut s = Streams::default();
        let mut present = std::collections::HashSet::new();
        let (mut faults, mut populated) = (0, 0);
        for p in order {
            if present.contains(&p) {
                continue;
            }
            faults += 1;
            let f = s.fault(p, lo, hi);
            assert_eq!(f.first, p);
            for i in 0..f.count {
                let q = f.page(i);
                assert!((lo..hi).contains(&q), "{q} outside [{lo}, {hi})");
                if present.insert(q) {
                    populated += 1;
                }
            }
        }
        (faults, populated, s)
    }

    #[test]
    fn grows_to_512_on_a_sequential_scan() {
        let mut s = Streams::default();
        let mut windows = Vec::new();
        let mut p = 1000;
        while p < 1000 + 8192 {
            let f = s.fault(p, 0, 1 << 20);
            windows.push(f.count);
            p += f.count;
        }
        assert_eq!(
            &windows[..12],
            &[1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 512]
        );
        let (faults, populated, _) = drive(0..32768, 0, 32768);
        assert_eq!(populated, 32768, "no over-fetch inside the region");
        assert!(faults < 32768 / 512 + 16, "{faults} faults");
    }

    #[test]
    fn grows_on_a_reverse_scan_and_on_strides() {
        let (faults, populated, _) = drive((0..32768).rev(), 0, 32768);
        assert_eq!(populated, 32768);
        assert!(faults < 32768 / 512 + 16, "{faults} faults");
        for stride in [2u64, 16, 100] {
            let n = 32768 / stride;
            let (faults, populated, _) = drive((0..n).map(|i| i * stride), 0, 32768);
            // Only the strided pages are fetched (the last window may run past the scan).
            assert!(populated <= n + MAX_WINDOW, "stride {stride}: {populated}");
            assert!(
                faults <= n / 512 + 12,
                "stride {stride}: {faults} faults for {n} pages"
            );
        }
    }

    /// A random permutation (a Feistel network over the page indices, as the guest's).
    fn permutation(n: u64, key: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        let mut x = key | 1;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    #[test]
    fn stays_at_one_page_on_random_access() {
        let order = permutation(32768, 7);
        let (faults, populated, _) = drive(order.into_iter(), 0, 32768);
        assert!(
            populated as f64 <= faults as f64 * 1.01,
            "{populated} pages for {faults} faults"
        );
        assert!(faults >= 32768 * 99 / 100, "{faults}");
    }

    #[test]
    fn shrinks_when_a_grown_stream_misses() {
        let mut s = Streams::default();
        let mut p = 0;
        for _ in 0..12 {
            p += s.fault(p, 0, 1 << 20).count;
        }
        assert_eq!(s.window_at(p - 512), Some(512));
        // The guest jumps back a little (not where the stream expected): quarter the window,
        // and fetch just the faulting page.
        let f = s.fault(p - 700, 0, 1 << 20);
        assert_eq!(f.count, 1);
        assert_eq!(s.window_at(p - 700), Some(128));
        let f = s.fault(p - 900, 0, 1 << 20);
        assert_eq!(f.count, 1);
        assert_eq!(s.window_at(p - 900), Some(32));
        // Random faults far away start new streams of one page each.
        for q in [5_000_000u64, 9_000_000, 2_000_000, 7_000_000] {
            assert_eq!(s.fault(q, 0, 1 << 40).count, 1);
        }
    }

    #[test]
    fn never_crosses_the_region() {
        let mut s = Streams::default();
        let (lo, hi) = (100, 200);
        let mut p = lo;
        let mut total = 0;
        while p < hi {
            let f = s.fault(p, lo, hi);
            let (a, b) = f.contiguous().unwrap();
            assert!(lo <= a && b <= hi, "[{a}, {b})");
            total += f.count;
            p = b;
        }
        assert_eq!(total, hi - lo);
        // Backwards from the top, with a stride: never below `lo`.
        let mut s = Streams::default();
        for p in [199, 196, 193, 190] {
            let f = s.fault(p, lo, hi);
            for i in 0..f.count {
                assert!(f.page(i) >= lo && f.page(i) < hi);
            }
        }
        let f = s.fault(187, 150, 190);
        assert!(f.count >= 1 && f.page(f.count - 1) >= 150, "{f:?}");
    }

    #[test]
    fn a_stream_stays_in_its_region() {
        let mut s = Streams::default();
        let mut p = 0;
        while p < 512 {
            p += s.fault(p, 0, 512).count;
        }
        // The next region starts where the stream expected its next fault: a new stream.
        assert_eq!(s.fault(512, 512, 1024).count, 1);
        assert_eq!(s.fault(528, 512, 1024).count, 1);
        assert_eq!(s.fault(544, 512, 1024).count, 2);
    }

    #[test]
    fn follows_two_interleaved_streams() {
        // A handler thread sees two vCPUs' sequential scans interleaved.
        let a = 0..16384u64;
        let b = 16384..32768u64;
        let order: Vec<u64> = a.zip(b).flat_map(|(x, y)| [x, y]).collect();
        let (faults, populated, _) = drive(order.into_iter(), 0, 32768);
        assert_eq!(populated, 32768);
        assert!(faults < 2 * (16384 / 512 + 16), "{faults}");
    }

    #[test]
    fn state_is_per_thread_and_per_space() {
        with_streams(1, |s| {
            s.fault(10, 0, 100);
            s.fault(11, 0, 100);
        });
        assert_eq!(with_streams(1, |s| s.fault(12, 0, 100).count), 2);
        // Another address space on this thread starts afresh.
        assert_eq!(with_streams(2, |s| s.fault(13, 0, 100).count), 1);
        std::thread::spawn(|| assert_eq!(with_streams(1, |s| s.fault(14, 0, 100).count), 1))
            .join()
            .unwrap();
    }
}
