//! Which guest pages the VMM has populated: one bit per 4 KiB page of guest-physical space.
//!
//! A set bit means the page is present in the host mapping (the VMM populated it, or found it
//! already present). A clear bit means "maybe missing": populating it is then attempted, and
//! the kernel's `EEXIST` settles races. Bits are cleared when a range is released.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A lock-free bitmap over guest-physical pages.
pub struct Residency {
    words: Box<[AtomicU64]>,
}

impl std::fmt::Debug for Residency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Residency")
            .field("pages", &(self.words.len() * 64))
            .finish()
    }
}

const PAGE_SHIFT: u32 = 12;

impl Residency {
    /// A bitmap for `space_bytes` of guest-physical space, all clear. The memory comes from
    /// a zeroed allocation, which the allocator maps lazily: untouched parts cost nothing.
    pub fn new(space_bytes: u64) -> Self {
        let pages = space_bytes >> PAGE_SHIFT;
        let n = pages.div_ceil(64) as usize;
        let zeroed = Box::<[AtomicU64]>::new_zeroed_slice(n);
        // SAFETY: an `AtomicU64` of all-zero bits is `AtomicU64::new(0)`, a valid value; the
        // allocation is zeroed (calloc), so writing nothing keeps untouched pages unallocated.
        let words = unsafe { zeroed.assume_init() };
        Self { words }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// Whether page `pfn` (guest-physical address >> 12) is known present.
    #[inline]
    pub fn is_present(&self, pfn: u64) -> bool {
        self.words
            .get((pfn / 64) as usize)
            .is_some_and(|w| w.load(Relaxed) & (1 << (pfn % 64)) != 0)
    }

    /// Marks `[pfn, pfn + count)` present; returns how many were newly set.
    pub fn set_range(&self, pfn: u64, count: u64) -> u64 {
        self.update_range(pfn, count, true)
    }

    /// Marks `[pfn, pfn + count)` missing; returns how many were set before.
    pub fn clear_range(&self, pfn: u64, count: u64) -> u64 {
        self.update_range(pfn, count, false)
    }

    /// Counts present pages in `[pfn, pfn + count)`.
    pub fn count_range(&self, pfn: u64, count: u64) -> u64 {
        let mut n = 0;
        self.for_words(pfn, count, |w, mask| {
            n += u64::from((w.load(Relaxed) & mask).count_ones());
        });
        n
    }

    /// The first page at or after `pfn` and before `end` that is not known present.
    pub fn next_missing(&self, mut pfn: u64, end: u64) -> Option<u64> {
        while pfn < end {
            if !self.is_present(pfn) {
                return Some(pfn);
            }
            pfn += 1;
        }
        None
    }

    /// Clears every page and returns those that were set, ascending (a word at a time: a
    /// sparse bitmap of gigabytes is read in microseconds).
    pub fn take_all(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Relaxed) != 0 {
                push_set_bits(&mut out, i as u64 * 64, w.swap(0, Relaxed));
            }
        }
        out
    }

    /// The first page at or after `pfn` and before `end` that is known present (or `end`).
    pub fn next_present(&self, mut pfn: u64, end: u64) -> u64 {
        while pfn < end && !self.is_present(pfn) {
            pfn += 1;
        }
        pfn
    }

    fn update_range(&self, pfn: u64, count: u64, set: bool) -> u64 {
        let mut changed = 0;
        self.for_words(pfn, count, |w, mask| {
            let old = if set {
                w.fetch_or(mask, Relaxed)
            } else {
                w.fetch_and(!mask, Relaxed)
            };
            let flipped = if set { !old & mask } else { old & mask };
            changed += u64::from(flipped.count_ones());
        });
        changed
    }

    fn for_words(&self, pfn: u64, count: u64, mut f: impl FnMut(&AtomicU64, u64)) {
        let end = (pfn + count).min(self.pages());
        let mut p = pfn;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            f(&self.words[(p / 64) as usize], mask);
            p += n;
        }
    }
}

/// Appends `base + i` for every bit `i` set in `word`, lowest first.
pub fn push_set_bits(out: &mut Vec<u64>, base: u64, mut word: u64) {
    while word != 0 {
        out.push(base + u64::from(word.trailing_zeros()));
        word &= word - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_count_clear() {
        let r = Residency::new(1 << 30);
        assert_eq!(r.pages(), 1 << 18);
        assert_eq!(r.set_range(60, 10), 10);
        assert_eq!(r.set_range(65, 10), 5);
        assert!(r.is_present(60) && r.is_present(74) && !r.is_present(75) && !r.is_present(59));
        assert_eq!(r.count_range(0, 1000), 15);
        assert_eq!(r.next_missing(60, 100), Some(75));
        assert_eq!(r.next_present(0, 100), 60);
        assert_eq!(r.clear_range(70, 100), 5);
        assert_eq!(r.count_range(0, 1000), 10);
        assert!(!r.is_present(u64::MAX / 4096));
        r.set_range(0, 64 * 3);
        assert_eq!(r.count_range(0, 64 * 3), 64 * 3);
    }
}
