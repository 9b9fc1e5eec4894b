//! Node memory for big trees: slots in 2 MiB chunks mapped straight from the kernel and
//! advised for transparent huge pages (`MADV_HUGEPAGE`).
//!
//! A lookup in a tree of a million nodes (about 50 MB) touches some twenty nodes on as many
//! 4 KiB pages, more than the TLB holds, so every level can cost a page walk. On a host whose
//! THP mode is `madvise` (the common default) heap memory stays on 4 KiB pages; nodes in
//! advised chunks sit on 2 MiB pages, 512 times the TLB reach. (docs/range_map.md measures it.)
//!
//! The allocator is a simple slab: a chunk hands out slots first from its free list, then from
//! its untouched tail; allocation takes the lowest-addressed chunk with room, so under churn the
//! high chunks drain. A chunk whose slots have all come back is unmapped, except one kept as a
//! spare so that a tree at a chunk boundary does not map and unmap on every update. All of it
//! happens under one mutex, taken once per batch of slots, never by readers.
//!
//! Safety of unmapping: a slot comes back only when its node has been dropped after a grace
//! period (or was never published), so no reader can be looking at any slot of an empty chunk.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

/// Bytes in a chunk: one x86-64 huge page.
pub(crate) const CHUNK: usize = 2 << 20;

/// The chunks of one tree (slots of `T`'s size and alignment).
pub(crate) struct Chunks<T> {
    /// Chunks sorted by address. The mutex is not the loom shim's: no protocol step happens
    /// under it, and loom models never grow a tree to a chunk.
    state: Mutex<Vec<Chunk>>,
    /// Chunks mapped (read without the lock to skip it while there are none).
    mapped: AtomicUsize,
    _t: PhantomData<*mut T>,
}

struct Chunk {
    base: NonNull<u8>,
    /// Slots `[bump, slots)` have never been handed out.
    bump: usize,
    /// Indices of slots handed out and returned.
    free: Vec<u32>,
    /// Slots handed out and not returned.
    used: usize,
}

impl Chunk {
    fn available(&self, slots: usize) -> bool {
        !self.free.is_empty() || self.bump < slots
    }
}

// SAFETY: the chunks hold only memory (no `T` values); every access is under the mutex.
unsafe impl<T> Send for Chunks<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for Chunks<T> {}

impl<T> Chunks<T> {
    /// Slots per chunk; 0 for a `T` that chunks do not serve (zero-sized, aligned beyond a
    /// page, or so big that a chunk would hold fewer than 64), whose [`alloc`](Self::alloc)
    /// hands out nothing.
    pub(crate) const SLOTS: usize = {
        let (size, align) = (size_of::<T>(), align_of::<T>());
        if size == 0 || align > 4096 || size > CHUNK / 64 {
            0
        } else {
            CHUNK / size
        }
    };

    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(Vec::new()),
            mapped: AtomicUsize::new(0),
            _t: PhantomData,
        }
    }

    /// Bytes of chunks mapped.
    pub(crate) fn mapped_bytes(&self) -> usize {
        self.mapped.load(Relaxed) * CHUNK
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Chunk>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes up to `n` slots (uninitialised memory for one `T` each) onto `out`, in
    /// descending address order so that popping them goes upwards. Maps a chunk if none has
    /// room; pushes fewer (possibly none) only if that fails or if `SLOTS` is 0.
    pub(crate) fn alloc(&self, out: &mut Vec<*mut T>, n: usize) {
        let size = size_of::<T>();
        let slots = Self::SLOTS;
        if slots == 0 {
            return;
        }
        let mut chunks = self.lock();
        let start = out.len();
        let mut i = 0;
        while out.len() - start < n {
            while i < chunks.len() && !chunks[i].available(slots) {
                i += 1;
            }
            if i == chunks.len() {
                let Some(base) = map_chunk() else { break };
                let at = chunks.partition_point(|c| c.base < base);
                chunks.insert(
                    at,
                    Chunk {
                        base,
                        bump: 0,
                        free: Vec::new(),
                        used: 0,
                    },
                );
                self.mapped.fetch_add(1, Relaxed);
                i = at;
            }
            let c = &mut chunks[i];
            while out.len() - start < n {
                let slot = if let Some(slot) = c.free.pop() {
                    slot as usize
                } else if c.bump < slots {
                    c.bump += 1;
                    c.bump - 1
                } else {
                    break;
                };
                c.used += 1;
                // SAFETY: `slot < SLOTS` and SLOTS * size <= CHUNK: inside the chunk.
                out.push(unsafe { c.base.add(slot * size) }.as_ptr().cast());
            }
        }
        drop(chunks);
        out[start..].sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Returns each of `ptrs` that is a slot of a chunk to its chunk, and passes the others
    /// (memory from elsewhere) to `other`. Unmaps empty chunks, but one if `keep_spare`.
    ///
    /// # Safety
    ///
    /// Each pointer is owned by the caller, listed once, and holds no live `T`; a slot is not
    /// touched again after this call.
    pub(crate) unsafe fn free(
        &self,
        ptrs: &[*mut T],
        keep_spare: bool,
        mut other: impl FnMut(*mut T),
    ) {
        if self.mapped.load(Relaxed) == 0 {
            // A slot's chunk was mapped before the slot was handed out, and that happened
            // before the slot came back to us, so this load would see it; none exists.
            ptrs.iter().for_each(|&p| other(p));
            return;
        }
        let mut chunks = self.lock();
        let mut emptied = false;
        for &p in ptrs {
            let a = p.cast::<u8>();
            let i = chunks.partition_point(|c| c.base.as_ptr() <= a);
            match i.checked_sub(1).map(|i| &mut chunks[i]) {
                Some(c) if (a as usize) < c.base.as_ptr() as usize + CHUNK => {
                    let slot = (a as usize - c.base.as_ptr() as usize) / size_of::<T>();
                    c.free.push(slot as u32);
                    c.used -= 1;
                    emptied |= c.used == 0;
                }
                _ => other(p),
            }
        }
        if emptied || !keep_spare {
            let mut spare = !keep_spare;
            chunks.retain_mut(|c| {
                if c.used > 0 {
                    return true;
                }
                if !std::mem::replace(&mut spare, true) {
                    // The spare starts over from its first slot, without a free list.
                    (c.bump, c.free) = (0, Vec::new());
                    return true;
                }
                // SAFETY: no slot of `c` is handed out, so nothing refers to its memory.
                unsafe { unmap_chunk(c.base) };
                self.mapped.fetch_sub(1, Relaxed);
                false
            });
        }
    }
}

impl<T> Drop for Chunks<T> {
    fn drop(&mut self) {
        for c in self
            .state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: the owner drops its chunks only after every node in them is dropped and
            // unreachable (the tree and all its retired batches are gone).
            unsafe { unmap_chunk(c.base) };
        }
    }
}

/// Maps a `CHUNK`-aligned, `CHUNK`-long anonymous region advised for huge pages.
fn map_chunk() -> Option<NonNull<u8>> {
    let len = 2 * CHUNK;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(CHUNK);
    let (head, tail) = (aligned - start, start + len - (aligned + CHUNK));
    // SAFETY: both trims lie inside the mapping just made, outside `[aligned, aligned+CHUNK)`;
    // the advice only concerns memory we own. Failures leave a bigger mapping or no advice,
    // both harmless.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + CHUNK) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, CHUNK, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8)
}

/// Unmaps a chunk from [`map_chunk`].
///
/// # Safety
///
/// Nothing refers to the chunk's memory any more.
unsafe fn unmap_chunk(base: NonNull<u8>) {
    // SAFETY: per the contract, and `base` is a whole mapping of `CHUNK` bytes.
    unsafe { libc::munmap(base.as_ptr().cast(), CHUNK) };
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn types_chunks_do_not_serve_get_no_slots() {
        #[repr(align(8192))]
        struct OverAligned(#[allow(dead_code)] u8);
        type Huge = [u8; CHUNK / 32];
        assert_eq!(Chunks::<OverAligned>::SLOTS, 0);
        assert_eq!(Chunks::<Huge>::SLOTS, 0);
        assert_eq!(Chunks::<()>::SLOTS, 0);
        let chunks = Chunks::<Huge>::new();
        let mut got = Vec::new();
        chunks.alloc(&mut got, 10);
        assert!(got.is_empty());
        assert_eq!(chunks.mapped_bytes(), 0);
        assert_eq!(Chunks::<[u8; CHUNK / 64]>::SLOTS, 64);
    }

    #[test]
    fn slots_are_handed_out_once_and_empty_chunks_are_unmapped_but_one() {
        type Slot = [u64; 8]; // 64 bytes
        let chunks = Chunks::<Slot>::new();
        let slots = Chunks::<Slot>::SLOTS;
        assert_eq!(slots, CHUNK / 64);
        let mut got = Vec::new();
        chunks.alloc(&mut got, 2 * slots + 10);
        assert_eq!(got.len(), 2 * slots + 10);
        assert_eq!(chunks.mapped_bytes(), 3 * CHUNK);
        assert!(got.windows(2).all(|w| w[0] > w[1]), "descending");
        let mut sorted = got.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), got.len(), "no slot twice");
        for &p in &got {
            assert_eq!(p as usize % align_of::<Slot>(), 0);
            // SAFETY: each slot is ours and sized for a `Slot`.
            unsafe { p.write([p as u64; 8]) };
        }
        for &p in &got {
            // SAFETY: written just above.
            assert_eq!(unsafe { p.read() }, [p as u64; 8], "slots overlap");
        }
        // Memory from elsewhere is passed through.
        let mut foreign = Slot::default();
        let mut passed = Vec::new();
        // SAFETY: the slots are ours, listed once; `foreign` is not a slot.
        unsafe { chunks.free(&[&mut foreign as *mut Slot], true, |p| passed.push(p)) };
        assert_eq!(passed, [&mut foreign as *mut Slot]);
        // Free all but one slot of the lowest chunk: the two others empty; one is kept.
        let lowest = *got.last().unwrap();
        let rest: Vec<_> = got.iter().copied().filter(|&p| p != lowest).collect();
        // SAFETY: as above.
        unsafe { chunks.free(&rest, true, |_| panic!("a slot was not recognised")) };
        assert_eq!(chunks.mapped_bytes(), 2 * CHUNK);
        // Reuse comes from the lowest chunk first.
        let mut again = Vec::new();
        chunks.alloc(&mut again, 3);
        assert!(again
            .iter()
            .all(|&p| (p as usize) / CHUNK == lowest as usize / CHUNK));
        again.push(lowest);
        // SAFETY: as above.
        unsafe { chunks.free(&again, true, |_| panic!("a slot was not recognised")) };
        assert_eq!(
            chunks.mapped_bytes(),
            CHUNK,
            "one empty chunk stays as a spare"
        );
        // SAFETY: nothing is returned.
        unsafe { chunks.free(&[], false, |_| unreachable!()) };
        assert_eq!(
            chunks.mapped_bytes(),
            0,
            "no spare is kept when asked not to"
        );
    }
}
