//! The ABI shared by the built-in guest and the VMM.
//!
//! Everything the two sides must agree on lives here, so that they cannot disagree: the
//! guest-physical layout of the boot area, the port numbers of the devices, the workload ids,
//! and the `#[repr(C)]` layouts of the boot-info block, the per-vCPU results area and the
//! hot-plug mailbox. The crate is `no_std` and has no dependencies: the guest's nested cargo
//! build compiles it too.
//!
//! How a vCPU is entered (64-bit mode, paging on): `rip` = the ELF entry point,
//! `rsp` = [`stack_top`]`(index) - 8` (so the stack is aligned as after a `call`),
//! `rdi` = the vCPU index, `rsi` = [`layout::BOOT_INFO`]. In Rust terms the entry is
//! `extern "C" fn(vcpu: u64, boot_info: *const BootInfo) -> !`.
#![no_std]
#![forbid(unsafe_code)]

/// The guest-physical layout of the boot area. All addresses are identity-mapped.
pub mod layout {
    /// Size of a small page.
    pub const PAGE_SIZE: u64 = 0x1000;

    /// The GDT (null, code64, data, TSS descriptors).
    pub const GDT: u64 = 0x1000;
    /// The boot-info block ([`crate::BootInfo`]), one page.
    pub const BOOT_INFO: u64 = 0x2000;
    /// The hot-plug mailbox ([`crate::Mailbox`]), one page.
    pub const MAILBOX: u64 = 0x3000;
    /// The top-level page table (PML4).
    pub const PML4: u64 = 0x4000;
    /// The page-directory-pointer table for the first 512 GiB.
    pub const PDPT: u64 = 0x5000;
    /// Per-vCPU results ([`crate::VcpuResult`]), `MAX_VCPUS` entries (16 KiB).
    pub const RESULTS: u64 = 0x8000;
    /// Page directories used when the host has no 1 GiB pages: one page per GiB mapped.
    pub const PAGE_DIRS: u64 = 0x10000;
    /// Number of page directories at [`PAGE_DIRS`] (so 2 MiB pages map 0..64 GiB).
    pub const PAGE_DIRS_COUNT: u64 = 64;
    /// End of the boot data below the image (page tables etc.).
    pub const BOOT_DATA_END: u64 = HISTOGRAMS + MAX_VCPUS * crate::HIST_BUCKETS as u64 * 4;
    /// Per-vCPU touch-latency histograms ([`crate::HIST_BUCKETS`] `u32` counters each), right
    /// after the page directories.
    pub const HISTOGRAMS: u64 = PAGE_DIRS + PAGE_DIRS_COUNT * PAGE_SIZE;

    /// Where the built-in guest image is linked (1 MiB).
    pub const IMAGE_START: u64 = 0x10_0000;
    /// The built-in guest image must end below this (4 MiB).
    pub const IMAGE_END: u64 = 0x40_0000;

    /// Per-vCPU stacks: vCPU `k`'s stack is `[STACKS + k * STACK_SIZE, + STACK_SIZE)`.
    pub const STACKS: u64 = 0x40_0000;
    /// Size of each vCPU's stack.
    pub const STACK_SIZE: u64 = 0x4000;
    /// The most vCPUs the layout has room for (stacks, results).
    pub const MAX_VCPUS: u64 = 256;
    /// End of the boot area (8 MiB): boot data, image window and stacks all lie below.
    pub const BOOT_AREA_END: u64 = STACKS + MAX_VCPUS * STACK_SIZE;

    /// Identity-mapped guest-physical space with 1 GiB pages (the whole first PML4 entry).
    pub const IDENTITY_MAP_1G_BYTES: u64 = 512 << 30;
    /// Identity-mapped guest-physical space with 2 MiB pages (hosts without `pdpe1gb`).
    pub const IDENTITY_MAP_2M_BYTES: u64 = PAGE_DIRS_COUNT << 30;

    /// Start of the 32-bit hole (no RAM between this and 4 GiB).
    pub const HOLE_START: u64 = 0xc000_0000;
    /// End of the 32-bit hole; RAM above 3 GiB continues here.
    pub const HOLE_END: u64 = 0x1_0000_0000;
}

/// GDT selectors. The VMM enters every vCPU with the kernel selectors (CPL 0); the built-in
/// guest drops to CPL 3 with the user selectors (see the guest's `_start`).
pub mod selectors {
    /// 64-bit code, DPL 0.
    pub const KERNEL_CS: u16 = 0x08;
    /// Data, DPL 0.
    pub const KERNEL_DS: u16 = 0x10;
    /// 64-bit TSS.
    pub const TSS: u16 = 0x18;
    /// 64-bit code, DPL 3 (RPL 3).
    pub const USER_CS: u16 = 0x20 | 3;
    /// Data, DPL 3 (RPL 3).
    pub const USER_DS: u16 = 0x28 | 3;
}

/// The top of vCPU `index`'s stack (exclusive).
pub const fn stack_top(index: u64) -> u64 {
    layout::STACKS + (index + 1) * layout::STACK_SIZE
}

/// Buckets of a touch-latency histogram: four per power of two of TSC cycles.
pub const HIST_BUCKETS: usize = 256;

/// The histogram bucket of `cycles`: exact below 4, then four sub-buckets per power of two
/// (at most 25% wide).
pub const fn hist_bucket(cycles: u64) -> usize {
    if cycles < 4 {
        return cycles as usize;
    }
    let e = 63 - cycles.leading_zeros() as u64;
    let sub = (cycles >> (e - 2)) & 3;
    (4 + (e - 2) * 4 + sub) as usize
}

/// The smallest cycle count that falls in bucket `b` (inverse of [`hist_bucket`]).
pub const fn hist_bucket_low(b: usize) -> u64 {
    if b < 4 {
        return b as u64;
    }
    let e = (b as u64 - 4) / 4 + 2;
    let sub = (b as u64 - 4) % 4;
    (4 | sub) << (e - 2)
}

/// The guest-physical address of vCPU `index`'s touch-latency histogram.
pub const fn hist_addr(index: u64) -> u64 {
    layout::HISTOGRAMS + index * HIST_BUCKETS as u64 * 4
}

/// The guest-physical address of vCPU `index`'s [`VcpuResult`].
pub const fn result_addr(index: u64) -> u64 {
    layout::RESULTS + index * core::mem::size_of::<VcpuResult>() as u64
}

/// I/O ports.
pub mod ports {
    /// The 16550 UART (COM1): 8 registers from here.
    pub const SERIAL: u16 = 0x3f8;
    /// Number of UART registers.
    pub const SERIAL_LEN: u16 = 8;
    /// The exit port: a write ends the run; the value written is the exit status.
    pub const EXIT: u16 = 0xf4;
    /// The park port: a write stops the writing vCPU only; the others go on.
    pub const PARK: u16 = 0xf5;
    /// The idle port: a 32-bit write makes the VMM pause the writing vCPU for that many
    /// microseconds (at most 10 ms), so that a guest with nothing to do leaves the host CPU
    /// to others (there is no timer interrupt to `hlt` for).
    pub const IDLE: u16 = 0xf6;
    /// The mark port: a write records when the writing vCPU reached a point the VMM reports
    /// on (the `pattern` workload marks the end of its first pass after a restore, when its
    /// working set is resident).
    pub const MARK: u16 = 0xf7;
}

/// Workload ids, as stored in [`BootInfo::workload`].
pub mod workload {
    /// Each vCPU prints `hello from vcpu K`; the guest exits 0.
    pub const HELLO: u32 = 0;
    /// Each vCPU writes a per-page pattern to its slice of RAM, then verifies it; it reports
    /// in its [`crate::VcpuResult`] and histogram. `params[1]`: pages per vCPU (0: all RAM,
    /// split evenly); `params[2]`: rounds (0 = 1): later rounds rewrite and re-verify the same
    /// pages, whose first touch is already done.
    pub const TOUCH: u32 = 1;
    /// Follow the hot-plug [`crate::Mailbox`]: each vCPU writes a per-page pattern into the
    /// pages of listed regions (its share: pages `k mod nr_vcpus == vcpu`), reads it back, and
    /// tolerates regions that vanish under it (open bus) or turn read-only. It runs until the
    /// mailbox's [`crate::mailbox_flags::STOP`] flag, then reports in its
    /// [`crate::VcpuResult`] (`pages`: pages touched, `verify_errors`: pages wrong although
    /// the mailbox did not change meanwhile, and the words of [`crate::result_words`]:
    /// [`VANISHED`](crate::result_words::VANISHED) pages found changed by a concurrent
    /// unmap/protect, [`PASSES`](crate::result_words::PASSES),
    /// [`GENERATION_SEEN`](crate::result_words::GENERATION_SEEN) the last mailbox generation
    /// seen, [`UNMAPPED_READS`](crate::result_words::UNMAPPED_READS) reads of unmapped words
    /// after the unmap finished and how many of them still saw the written data (must be 0));
    /// it updates the slot after every pass, `done` last. The last vCPU to stop exits 0.
    pub const HOTPLUG: u32 = 2;
    /// vCPU 0 exits at once with status `params[0]`.
    pub const EXIT: u32 = 3;
    /// Every vCPU spins forever (for `--timeout`).
    pub const SPIN: u32 = 4;
    /// vCPU 0 raises an exception with no IDT: a triple fault.
    pub const TRIPLE_FAULT: u32 = 5;
    /// vCPU 0 writes to an I/O port no device owns.
    pub const BAD_PORT: u32 = 6;
    /// vCPU 0 writes to a guest-physical address outside RAM.
    pub const BAD_MMIO: u32 = 7;
    /// vCPU 0 executes `hlt` with interrupts off.
    pub const HLT: u32 = 8;
    /// Every vCPU first-touches the same `params[1]` pages at once (each writes its own word
    /// of each page), then verifies every vCPU's words: races on one page populate it once.
    pub const RACE: u32 = 9;
    /// Every vCPU does `lock xadd` of 1 on the first word of the same `params[1]` fresh pages
    /// at once; vCPU 0 then counts pages whose word is not the vCPU count (lost updates, in
    /// `verify_errors`): measures whether first touches keep locked operations atomic.
    pub const XADD: u32 = 10;
    /// Each vCPU writes [`crate::pattern_word`] over every word of its slice of RAM (pages
    /// `[k * per, (k + 1) * per)` of the RAM entries, `per` = `params[PATTERN_PAGES]` or all
    /// RAM split evenly), sets the [`READY`](crate::result_words::READY) word of its
    /// [`crate::VcpuResult`] and prints `pattern: vcpu K ready`, then runs verify passes over
    /// its slice in a loop, updating its slot after each (`pages`, `verify_errors`,
    /// [`PASSES`](crate::result_words::PASSES)). It stops after
    /// `params[PATTERN_PASSES]` passes (0: never), or at the mailbox's STOP flag; the last vCPU
    /// to stop exits 0 if no vCPU found a wrong word, 1 otherwise. After each pass it re-reads
    /// `params[PATTERN_RESUME_GEN]` (and before every page): when the VMM changed it (a restore
    /// from a snapshot), the vCPU drops the pass it was in and runs `params[PATTERN_RESUME_PASSES]`
    /// passes (0: forever) over the first `params[PATTERN_RESUME_PAGES]` pages of its slice (0:
    /// all), timing the first read of each page in the first of them into its touch-latency
    /// histogram, and writes 1 to [`crate::ports::MARK`] when that first pass is done.
    pub const PATTERN: u32 = 11;
}

/// `BootInfo::params` indices of the `pattern` workload.
pub mod pattern_params {
    /// Pages per vCPU (0: all RAM split evenly).
    pub const PAGES: usize = 1;
    /// Verify passes before exiting (0: until stopped).
    pub const PASSES: usize = 2;
    /// Changed by the VMM on every restore (the guest re-reads it after each pass).
    pub const RESUME_GEN: usize = 3;
    /// Passes to run after a restore (0: until stopped).
    pub const RESUME_PASSES: usize = 4;
    /// Pages of its slice each vCPU verifies after a restore (0: all it wrote): the restored
    /// guest's working set.
    pub const RESUME_PAGES: usize = 5;
    /// Non-zero: every pass also rewrites each word it verified with the next generation's
    /// value ([`super::rewritten_word`]), so the guest keeps writing all its memory (what a
    /// live snapshot must catch). A restore then finishes the pass it was in, over every page.
    pub const REWRITE: usize = 6;
}

/// The word the `pattern` workload keeps at guest-physical address `addr` (8-aligned): a
/// function of the address alone, never zero, different in every word.
pub const fn pattern_word(addr: u64) -> u64 {
    (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (addr >> 12).rotate_left(40)) | 1
}

/// The word a rewriting `pattern` guest ([`pattern_params::REWRITE`]) keeps at `addr` after
/// `generation` rewrites: [`pattern_word`] at generation 0, a different word at each next one.
pub const fn rewritten_word(addr: u64, generation: u64) -> u64 {
    pattern_word(addr) ^ (generation.wrapping_mul(0xd6e8_feb8_6659_fd93) << 1)
}

/// Access patterns of the `touch` workload: `params[3]` of [`workload::TOUCH`], with
/// `params[4]` its argument and `params[5]` a seed. Every pattern writes each page it visits and
/// then verifies every page it wrote; `VcpuResult::pages` counts distinct pages written.
pub mod pattern {
    /// Pages 0, 1, 2, … of the vCPU's slice (the default).
    pub const SEQUENTIAL: u64 = 0;
    /// The last page of the slice first, then down to page 0.
    pub const REVERSE: u64 = 1;
    /// Pages 0, N, 2N, … (`params[4]` = N ≥ 1): every N-th page only.
    pub const STRIDE: u64 = 2;
    /// Every page of the slice once, in the order of a random permutation (a Feistel network
    /// over the page indices, keyed by the seed and the vCPU).
    pub const RANDOM: u64 = 3;
    /// As many accesses as pages; 90 % of them go to the first 10 % of the slice (the hot
    /// pages, visited over and over in a random order), the other 10 % to distinct cold pages
    /// (in a random order).
    pub const HOTCOLD: u64 = 4;
}

/// `BootInfo::magic`: "VMMBOOT1" little-endian.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"VMMBOOT1");
/// `BootInfo::version`.
pub const BOOT_VERSION: u32 = 1;
/// Room for memory-map entries in the boot info.
pub const MAX_MEM_REGIONS: usize = 16;
/// Room for workload parameters in the boot info.
pub const MAX_PARAMS: usize = 8;

/// Kinds of memory-map entry.
pub mod mem_kind {
    /// Boot area: boot data, image and stacks; not for workloads.
    pub const BOOT: u32 = 1;
    /// Ordinary RAM, free for workloads.
    pub const RAM: u32 = 2;
    /// Memory hot-plugged at run time (only in the [`crate::Mailbox`]).
    pub const HOTPLUG: u32 = 3;
}

/// Bits of [`MemRegion::reserved`] in [`Mailbox`] entries.
pub mod region_flags {
    /// The guest may read but not write the region (writes are dropped by the VMM).
    pub const READONLY: u32 = 1;
}

/// Bits of [`Mailbox::flags`].
pub mod mailbox_flags {
    /// The VMM asks the `hotplug` workload to finish its pass, report, and exit.
    pub const STOP: u32 = 1;
    /// More regions are mapped than [`crate::MAILBOX_MAX_REGIONS`]: the list holds the first.
    pub const TRUNCATED: u32 = 2;
}

/// One memory-map entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    /// First guest-physical address.
    pub start: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// One of [`mem_kind`].
    pub kind: u32,
    /// Zero in the boot info; [`region_flags`] in the [`Mailbox`].
    pub reserved: u32,
}

/// The boot-info block at [`layout::BOOT_INFO`], written by the VMM before any vCPU runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// One of [`workload`].
    pub workload: u32,
    /// Number of valid entries in `mem_regions`.
    pub nr_mem_regions: u32,
    /// Workload parameters (for `EXIT`: `params[0]` is the status).
    pub params: [u64; MAX_PARAMS],
    /// The memory map, sorted by address.
    pub mem_regions: [MemRegion; MAX_MEM_REGIONS],
}

impl BootInfo {
    /// Size of the encoded block in bytes.
    pub const SIZE: usize = core::mem::size_of::<BootInfo>();
    /// Offset of `params` in the block (guest-physical `BOOT_INFO + PARAMS_OFFSET`).
    pub const PARAMS_OFFSET: u64 = 24;

    /// An empty boot info for `nr_vcpus` running `workload`.
    pub const fn new(nr_vcpus: u32, workload: u32) -> Self {
        BootInfo {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            nr_vcpus,
            workload,
            nr_mem_regions: 0,
            params: [0; MAX_PARAMS],
            mem_regions: [MemRegion {
                start: 0,
                size_bytes: 0,
                kind: 0,
                reserved: 0,
            }; MAX_MEM_REGIONS],
        }
    }

    /// The little-endian bytes of this block exactly as laid out by `#[repr(C)]`
    /// (the struct has no padding: every field is naturally aligned).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let mut w = Writer {
            buf: &mut out,
            pos: 0,
        };
        w.u64(self.magic);
        w.u32(self.version);
        w.u32(self.nr_vcpus);
        w.u32(self.workload);
        w.u32(self.nr_mem_regions);
        for p in self.params {
            w.u64(p);
        }
        for r in self.mem_regions {
            w.u64(r.start);
            w.u64(r.size_bytes);
            w.u32(r.kind);
            w.u32(r.reserved);
        }
        out
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
}

/// One vCPU's results slot at [`result_addr`]: written by the guest, read by the VMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuResult {
    /// Nonzero once the vCPU has finished its workload.
    pub done: u64,
    /// Pages touched.
    pub pages: u64,
    /// Pages whose content was wrong on verification.
    pub verify_errors: u64,
    /// Total time spent touching, in TSC cycles.
    pub touch_cycles: u64,
    /// Words whose meaning depends on the workload: read them through the accessors
    /// ([`VcpuResult::passes`], [`VcpuResult::vanished`], ...); the guest writes them at the
    /// offsets of [`result_words`].
    pub reserved: [u64; 4],
}

/// Offsets of the 64-bit words of a [`VcpuResult`] slot (in words from [`result_addr`]), as
/// the guest writes them and the VMM reads them.
pub mod result_words {
    /// `done`: nonzero once the vCPU has finished (written last, after a release fence).
    pub const DONE: usize = 0;
    /// `pages`.
    pub const PAGES: usize = 1;
    /// `verify_errors`.
    pub const VERIFY_ERRORS: usize = 2;
    /// `touch_cycles`.
    pub const TOUCH_CYCLES: usize = 3;
    /// `pattern`: nonzero once the vCPU has written its slice (`reserved[0]`).
    pub const READY: usize = 4;
    /// `hotplug`: pages found changed by a concurrent unmap or protect (`reserved[0]`).
    pub const VANISHED: usize = 4;
    /// `hotplug` and `pattern`: verify passes done (`reserved[1]`).
    pub const PASSES: usize = 5;
    /// `hotplug`: the last mailbox generation the vCPU acted on (`reserved[2]`).
    pub const GENERATION_SEEN: usize = 6;
    /// `hotplug`: reads of words in regions unmapped since (high 32 bits) and how many of them
    /// still saw the written data (low 32 bits), packed by
    /// [`crate::VcpuResult::pack_unmapped_reads`] (`reserved[3]`).
    pub const UNMAPPED_READS: usize = 7;
    /// Words in a slot.
    pub const COUNT: usize = 8;
}

impl VcpuResult {
    /// The slot from its words, in [`result_words`] order.
    pub const fn from_words(w: [u64; result_words::COUNT]) -> Self {
        VcpuResult {
            done: w[result_words::DONE],
            pages: w[result_words::PAGES],
            verify_errors: w[result_words::VERIFY_ERRORS],
            touch_cycles: w[result_words::TOUCH_CYCLES],
            reserved: [
                w[result_words::READY],
                w[result_words::PASSES],
                w[result_words::GENERATION_SEEN],
                w[result_words::UNMAPPED_READS],
            ],
        }
    }

    /// The word at offset `word` of [`result_words`].
    pub const fn word(&self, word: usize) -> u64 {
        match word {
            result_words::DONE => self.done,
            result_words::PAGES => self.pages,
            result_words::VERIFY_ERRORS => self.verify_errors,
            result_words::TOUCH_CYCLES => self.touch_cycles,
            _ => self.reserved[word - result_words::READY],
        }
    }

    /// `pattern`: the vCPU has written its slice.
    pub const fn ready(&self) -> bool {
        self.word(result_words::READY) != 0
    }

    /// `hotplug`: pages found changed by a concurrent unmap or protect.
    pub const fn vanished(&self) -> u64 {
        self.word(result_words::VANISHED)
    }

    /// `hotplug` and `pattern`: verify passes done.
    pub const fn passes(&self) -> u64 {
        self.word(result_words::PASSES)
    }

    /// `hotplug`: the last mailbox generation the vCPU acted on.
    pub const fn generation_seen(&self) -> u64 {
        self.word(result_words::GENERATION_SEEN)
    }

    /// `hotplug`: (reads of words in regions unmapped since, how many of them still saw the
    /// written data; must be 0).
    pub const fn unmapped_and_stale_reads(&self) -> (u64, u64) {
        let w = self.word(result_words::UNMAPPED_READS);
        (w >> 32, w & 0xffff_ffff)
    }

    /// The [`result_words::UNMAPPED_READS`] word: `unmapped` reads in the high 32 bits, `stale`
    /// ones (capped at `u32::MAX`) in the low 32 bits.
    pub const fn pack_unmapped_reads(unmapped: u64, stale: u64) -> u64 {
        let stale = if stale > u32::MAX as u64 {
            u32::MAX as u64
        } else {
            stale
        };
        (unmapped << 32) | stale
    }
}

/// Room for regions in the mailbox.
pub const MAILBOX_MAX_REGIONS: usize = 160;

/// The hot-plug mailbox at [`layout::MAILBOX`], a sequence lock written by the VMM only.
///
/// Before a change that can take memory away (unmap, protect) the VMM makes `generation` odd
/// (release store), then changes the address space, writes the new list, and makes
/// `generation` even again (release store, after a fence). The guest reads `generation`
/// (acquire; retries while odd), copies the list, and reads `generation` again: equal means a
/// consistent copy. A guest access whose result surprised it (all-ones from open bus, a
/// dropped write) is a real error only if `generation` was the same even value before the
/// access and after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mailbox {
    /// Sequence number: odd while a change is under way, even when the list is valid.
    pub generation: u64,
    /// Number of valid entries in `regions`.
    pub nr_regions: u32,
    /// [`mailbox_flags`].
    pub flags: u32,
    /// Hot-plugged regions, sorted by address ([`mem_kind::HOTPLUG`], [`region_flags`]).
    pub regions: [MemRegion; MAILBOX_MAX_REGIONS],
}

impl Mailbox {
    /// Byte offset of `generation`.
    pub const GENERATION_OFFSET: u64 = 0;
    /// Byte offset of `nr_regions`.
    pub const NR_REGIONS_OFFSET: u64 = 8;
    /// Byte offset of `flags`.
    pub const FLAGS_OFFSET: u64 = 12;
    /// Byte offset of `regions`.
    pub const REGIONS_OFFSET: u64 = 16;
}

const _: () = assert!(BootInfo::SIZE <= layout::PAGE_SIZE as usize);
const _: () = assert!(core::mem::size_of::<Mailbox>() <= layout::PAGE_SIZE as usize);
const _: () = assert!(core::mem::size_of::<VcpuResult>() == 64);
const _: () = assert!(result_addr(layout::MAX_VCPUS) <= layout::PAGE_DIRS);
const _: () = assert!(layout::BOOT_DATA_END <= layout::IMAGE_START);
const _: () = assert!(layout::BOOT_AREA_END == 0x80_0000);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn histogram_buckets_invert() {
        for v in [0u64, 1, 3, 4, 5, 7, 8, 100, 1000, 12345, 1 << 40, u64::MAX] {
            let b = hist_bucket(v);
            assert!(b < HIST_BUCKETS);
            assert!(hist_bucket_low(b) <= v, "{v}");
            // Bucket 251 (u64::MAX's) is the last one in use.
            if b < 251 {
                assert!(hist_bucket_low(b + 1) > v, "{v}");
            }
        }
        for b in 0..252 {
            assert_eq!(hist_bucket(hist_bucket_low(b)), b);
        }
    }

    #[test]
    fn boot_info_layout_is_fixed() {
        assert_eq!(offset_of!(BootInfo, magic), 0);
        assert_eq!(offset_of!(BootInfo, version), 8);
        assert_eq!(offset_of!(BootInfo, nr_vcpus), 12);
        assert_eq!(offset_of!(BootInfo, workload), 16);
        assert_eq!(offset_of!(BootInfo, nr_mem_regions), 20);
        assert_eq!(offset_of!(BootInfo, params), 24);
        assert_eq!(BootInfo::PARAMS_OFFSET, 24);
        assert_eq!(offset_of!(BootInfo, mem_regions), 24 + 8 * MAX_PARAMS);
        assert_eq!(core::mem::size_of::<MemRegion>(), 24);
        assert_eq!(BootInfo::SIZE, 24 + 8 * MAX_PARAMS + 24 * MAX_MEM_REGIONS);
    }

    #[test]
    fn to_bytes_matches_repr_c_offsets() {
        let mut b = BootInfo::new(3, workload::EXIT);
        b.params[1] = 0x1122_3344_5566_7788;
        b.nr_mem_regions = 1;
        b.mem_regions[2] = MemRegion {
            start: 0xabc,
            size_bytes: 0x1000,
            kind: mem_kind::RAM,
            reserved: 0,
        };
        let bytes = b.to_bytes();
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(u64_at(offset_of!(BootInfo, magic)), BOOT_MAGIC);
        assert_eq!(u32_at(offset_of!(BootInfo, nr_vcpus)), 3);
        assert_eq!(u32_at(offset_of!(BootInfo, workload)), workload::EXIT);
        assert_eq!(
            u64_at(offset_of!(BootInfo, params) + 8),
            0x1122_3344_5566_7788
        );
        let r2 = offset_of!(BootInfo, mem_regions) + 2 * 24;
        assert_eq!(u64_at(r2), 0xabc);
        assert_eq!(u64_at(r2 + 8), 0x1000);
        assert_eq!(u32_at(r2 + 16), mem_kind::RAM);
    }

    #[test]
    fn mailbox_layout_is_fixed() {
        assert_eq!(
            offset_of!(Mailbox, generation) as u64,
            Mailbox::GENERATION_OFFSET
        );
        assert_eq!(
            offset_of!(Mailbox, nr_regions) as u64,
            Mailbox::NR_REGIONS_OFFSET
        );
        assert_eq!(offset_of!(Mailbox, flags) as u64, Mailbox::FLAGS_OFFSET);
        assert_eq!(offset_of!(Mailbox, regions) as u64, Mailbox::REGIONS_OFFSET);
    }

    #[test]
    fn result_words_match_the_layout() {
        use result_words as w;
        assert_eq!(offset_of!(VcpuResult, done), 8 * w::DONE);
        assert_eq!(offset_of!(VcpuResult, pages), 8 * w::PAGES);
        assert_eq!(offset_of!(VcpuResult, verify_errors), 8 * w::VERIFY_ERRORS);
        assert_eq!(offset_of!(VcpuResult, touch_cycles), 8 * w::TOUCH_CYCLES);
        assert_eq!(offset_of!(VcpuResult, reserved), 8 * w::READY);
        assert_eq!(offset_of!(VcpuResult, reserved), 8 * w::VANISHED);
        assert_eq!(offset_of!(VcpuResult, reserved) + 8, 8 * w::PASSES);
        assert_eq!(
            offset_of!(VcpuResult, reserved) + 16,
            8 * w::GENERATION_SEEN
        );
        assert_eq!(offset_of!(VcpuResult, reserved) + 24, 8 * w::UNMAPPED_READS);
        assert_eq!(core::mem::size_of::<VcpuResult>(), 8 * w::COUNT);
        let r =
            VcpuResult::from_words([1, 2, 3, 4, 5, 6, 7, VcpuResult::pack_unmapped_reads(9, 2)]);
        assert_eq!(
            (r.done, r.pages, r.verify_errors, r.touch_cycles),
            (1, 2, 3, 4)
        );
        assert_eq!((r.vanished(), r.passes(), r.generation_seen()), (5, 6, 7));
        assert!(r.ready());
        assert_eq!(r.unmapped_and_stale_reads(), (9, 2));
        for k in 0..w::COUNT {
            assert_eq!(
                VcpuResult::from_words(core::array::from_fn(|i| i as u64 * 10)).word(k),
                k as u64 * 10
            );
        }
        assert_eq!(
            VcpuResult::pack_unmapped_reads(1, u64::MAX),
            (1 << 32) | 0xffff_ffff
        );
    }

    #[test]
    fn stacks_fit_the_boot_area() {
        assert_eq!(stack_top(layout::MAX_VCPUS - 1), layout::BOOT_AREA_END);
        assert_eq!(stack_top(0), layout::STACKS + layout::STACK_SIZE);
    }
}
