//! The built-in guest: a freestanding x86-64 program the VMM enters directly in 64-bit mode.
//!
//! Every vCPU starts at `_start` (CPL 0) with `rdi` = its index and `rsi` = the boot-info block
//! (see the `abi` crate); paging, the GDT, SSE and the stack are already set up by the VMM.
//! `_start` does the only privileged work (the `hlt` test workload), then drops to CPL 3 with
//! IOPL 3 (port I/O still allowed) and calls [`guest_main`]. The Rust code runs at CPL 3
//! because some KVM hosts (PVM, which runs guests under shadow paging in hardware ring 3)
//! emulate every x87/SSE instruction executed at guest CPL 0, and their emulator lacks most of
//! them; at CPL 3 SSE runs natively everywhere. There is no IDT: any exception triple-faults,
//! which the VMM reports.
#![no_std]
#![no_main]

use abi::{ports, result_words, selectors, workload, BootInfo};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

/// vCPUs that have finished the `hello` workload.
static DONE: AtomicU32 = AtomicU32::new(0);

// The CPL-0 entry of every vCPU. rdi = vCPU index, rsi = boot info, rsp = 16n - 8.
global_asm!(
    ".section .text._start, \"ax\"",
    ".globl _start",
    "_start:",
    // vCPU 0 of the `hlt` workload halts with interrupts off, at CPL 0 where hlt is allowed.
    "    test rdi, rdi",
    "    jnz 2f",
    "    cmp dword ptr [rsi + {workload_off}], {hlt}",
    "    jne 2f",
    "    cli",
    "    hlt",
    // Drop to CPL 3 on the same stack with IOPL 3, as if `guest_main` had been called.
    "2:  mov rax, rsp",
    "    push {user_ds}",
    "    push rax",
    "    push 0x3002",
    "    push {user_cs}",
    "    lea rax, [rip + {main}]",
    "    push rax",
    "    iretq",
    workload_off = const core::mem::offset_of!(BootInfo, workload),
    hlt = const workload::HLT,
    user_ds = const selectors::USER_DS,
    user_cs = const selectors::USER_CS,
    main = sym guest_main,
);

/// The CPL-3 entry of every vCPU, reached from `_start`.
///
/// # Safety
///
/// Entered only from `_start`, with `boot_info` pointing at a valid [`BootInfo`].
pub unsafe extern "C" fn guest_main(vcpu: u64, boot_info: *const BootInfo) -> ! {
    // SAFETY: the VMM wrote a valid BootInfo at this identity-mapped address before starting
    // any vCPU, and nobody writes it afterwards.
    let info = unsafe { core::ptr::read_volatile(boot_info) };
    let first = vcpu == 0;
    match info.workload {
        workload::HELLO => hello(vcpu, info.nr_vcpus),
        workload::EXIT if first => exit(info.params[0] as u32),
        workload::SPIN => loop {
            core::hint::spin_loop();
        },
        workload::TRIPLE_FAULT if first => {
            // SAFETY: deliberately raises #UD; with no IDT that becomes a triple fault.
            unsafe { asm!("ud2", options(noreturn)) }
        }
        workload::BAD_PORT if first => {
            outb(0x1234, 0x42);
            exit(0)
        }
        workload::BAD_MMIO if first => {
            // SAFETY: the address lies in the 32-bit hole, identity-mapped but not RAM: the
            // accesses exit to the VMM, which answers them as open bus (writes dropped, reads
            // all-ones) and lets the guest go on, which is what this workload tests.
            unsafe { core::ptr::write_volatile(0xd000_0000 as *mut u32, 0xdead_beef) };
            // SAFETY: as above.
            let v = unsafe { core::ptr::read_volatile(0xd000_0000 as *const u32) };
            exit(if v == 0xffff_ffff { 0 } else { 1 })
        }
        workload::TOUCH => touch(vcpu, &info),
        workload::RACE => race(vcpu, &info),
        workload::XADD => xadd(vcpu, &info),
        workload::HOTPLUG => hotplug(vcpu, &info),
        workload::PATTERN => pattern_workload(vcpu, &info, boot_info),
        workload::EXIT | workload::TRIPLE_FAULT | workload::BAD_PORT => park(),
        // vCPU 0 of `hlt` halted in `_start`; if it ever gets here, the test has failed.
        workload::HLT if first => exit(3),
        workload::BAD_MMIO | workload::HLT => park(),
        _ => {
            puts(b"guest: unknown workload\n");
            exit(2)
        }
    }
}

/// Each vCPU prints its line; the last one to finish ends the run with status 0.
fn hello(vcpu: u64, nr_vcpus: u32) -> ! {
    let mut line = [0u8; 40];
    let prefix = b"hello from vcpu ";
    line[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len() + fmt_u64(vcpu, &mut line[prefix.len()..]);
    line[len] = b'\n';
    len += 1;
    puts(&line[..len]);
    if DONE.fetch_add(1, Ordering::AcqRel) + 1 == nr_vcpus {
        exit(0)
    }
    park()
}

/// Writes `v` in decimal to the start of `out`, returning the number of digits.
/// The pattern vCPU `vcpu` writes into page `index` of its slice.
fn pattern(vcpu: u64, index: u64) -> u64 {
    (vcpu << 48) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the time-stamp counter; CR4.TSD is clear, so CPL 3 may.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The guest-physical address of RAM page `n` (counting pages of the RAM entries of the
/// memory map in order), if there is one.
fn ram_page(info: &BootInfo, mut n: u64) -> Option<u64> {
    for r in &info.mem_regions[..info.nr_mem_regions as usize] {
        if r.kind != abi::mem_kind::RAM {
            continue;
        }
        let pages = r.size_bytes / abi::layout::PAGE_SIZE;
        if n < pages {
            return Some(r.start + n * abi::layout::PAGE_SIZE);
        }
        n -= pages;
    }
    None
}

/// The splitmix64 finalizer: a cheap, well-mixed hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A random permutation of `[0, n)` without any table: a 4-round Feistel network over the
/// smallest even number of bits that covers `n`, walked until it lands below `n` (cycle
/// walking keeps it a bijection; at most 4x the domain, so under 4 steps on average).
#[derive(Clone, Copy)]
struct Permutation {
    n: u64,
    half: u32,
    keys: [u64; 4],
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Self {
        let bits = 64 - n.max(2).wrapping_sub(1).leading_zeros();
        let mut keys = [0; 4];
        let mut k = seed;
        for key in &mut keys {
            k = mix(k.wrapping_add(0x9e37_79b9_7f4a_7c15));
            *key = k;
        }
        Permutation {
            n,
            half: bits.div_ceil(2),
            keys,
        }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half) - 1;
        let (mut l, mut r) = (x >> self.half, x & mask);
        for k in self.keys {
            let t = l ^ (mix(r ^ k) & mask);
            l = r;
            r = t;
        }
        (l << self.half) | r
    }

    /// The `i`-th element (`i < n`).
    fn at(&self, i: u64) -> u64 {
        let mut x = self.feistel(i);
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }
}

/// The order in which `touch` visits the `n` pages of a vCPU's slice (`abi::pattern`).
struct Order {
    kind: u64,
    n: u64,
    stride: u64,
    /// `random`: the whole slice; `hotcold`: the hot pages.
    perm: Permutation,
    /// `hotcold`: pages `[0, hot)` are hot.
    hot: u64,
    /// `hotcold`: the cold pages `[hot, n)`.
    cold: Permutation,
}

impl Order {
    fn new(kind: u64, n: u64, arg: u64, seed: u64) -> Self {
        let hot = (n / 10).max(1).min(n);
        Order {
            kind,
            n,
            stride: arg.max(1),
            perm: Permutation::new(
                if kind == abi::pattern::HOTCOLD {
                    hot
                } else {
                    n
                },
                seed,
            ),
            hot,
            cold: Permutation::new(n - hot, seed ^ 0x5555_5555),
        }
    }

    /// Accesses in one pass.
    fn accesses(&self) -> u64 {
        match self.kind {
            abi::pattern::STRIDE => self.n.div_ceil(self.stride),
            _ => self.n,
        }
    }

    /// Distinct pages one pass writes.
    fn distinct(&self) -> u64 {
        match self.kind {
            abi::pattern::STRIDE => self.accesses(),
            abi::pattern::HOTCOLD if self.n > 0 => self.hot + self.n / 10,
            _ => self.n,
        }
    }

    /// Access `j`: the page index in the slice, and whether this is the page's first visit
    /// in the pass.
    fn at(&self, j: u64) -> (u64, bool) {
        match self.kind {
            abi::pattern::REVERSE => (self.n - 1 - j, true),
            abi::pattern::STRIDE => (j * self.stride, true),
            abi::pattern::RANDOM => (self.perm.at(j), true),
            abi::pattern::HOTCOLD => {
                // Every 10th access goes to a new cold page; the others cycle over the hot
                // pages (in a random order), so 90 % of accesses land on 10 % of the pages.
                if j % 10 == 9 {
                    (self.hot + self.cold.at(j / 10), true)
                } else {
                    let k = j - j / 10;
                    (self.perm.at(k % self.hot), k < self.hot)
                }
            }
            _ => (j, true),
        }
    }
}

/// Pages of RAM in each vCPU's slice: `asked` (0: all RAM, split evenly), at most an even
/// share.
fn pages_per_vcpu(info: &BootInfo, asked: u64) -> u64 {
    let ram_pages: u64 = info.mem_regions[..info.nr_mem_regions as usize]
        .iter()
        .filter(|r| r.kind == abi::mem_kind::RAM)
        .map(|r| r.size_bytes / abi::layout::PAGE_SIZE)
        .sum();
    let share = ram_pages / u64::from(info.nr_vcpus);
    match asked {
        0 => share,
        p => p.min(share),
    }
}

/// `touch`: write a per-page pattern over this vCPU's slice of RAM in the order of
/// `--pattern` (each page's first write its first touch), timing each write with rdtsc into
/// the histogram (first visits only), then read back every page written.
fn touch(vcpu: u64, info: &BootInfo) -> ! {
    let per = pages_per_vcpu(info, info.params[1]);
    let rounds = info.params[2].max(1);
    let kind = info.params[3];
    if kind > abi::pattern::HOTCOLD {
        puts(b"guest: unknown touch pattern\n");
        exit(2)
    }
    let order = Order::new(
        kind,
        per,
        info.params[4],
        mix(info.params[5] ^ (vcpu << 32)),
    );
    let hist = abi::hist_addr(vcpu) as *mut u32;
    let first = vcpu * per;
    let mut cycles = 0u64;
    let mut errors = 0u64;
    for round in 0..rounds {
        for j in 0..order.accesses() {
            let (i, first_visit) = order.at(j);
            let Some(page) = ram_page(info, first + i) else {
                break;
            };
            // A different word of each page, so that a page mapped at the wrong place shows.
            let addr = (page + (i % 512) * 8) as *mut u64;
            let t0 = rdtsc();
            // SAFETY: `addr` is inside RAM from the memory map, identity-mapped, and inside
            // this vCPU's slice: no other vCPU writes it.
            unsafe { core::ptr::write_volatile(addr, pattern(vcpu, i) ^ round) };
            let dt = rdtsc().wrapping_sub(t0);
            if round == 0 {
                cycles += dt;
                if first_visit {
                    let b = abi::hist_bucket(dt);
                    // SAFETY: this vCPU's histogram in the boot area, written by it alone.
                    unsafe {
                        let p = hist.add(b);
                        core::ptr::write_volatile(p, core::ptr::read_volatile(p) + 1);
                    }
                }
            }
        }
        // Every page written, once each (a page's first visit).
        for j in 0..order.accesses() {
            let (i, first_visit) = order.at(j);
            if !first_visit {
                continue;
            }
            let Some(page) = ram_page(info, first + i) else {
                break;
            };
            let addr = (page + (i % 512) * 8) as *const u64;
            // SAFETY: as above.
            if unsafe { core::ptr::read_volatile(addr) } != pattern(vcpu, i) ^ round {
                errors += 1;
            }
        }
    }
    report(vcpu, info.nr_vcpus, order.distinct(), errors, cycles)
}

static ARRIVED: AtomicU32 = AtomicU32::new(0);

/// Waits until every vCPU has called this `round`-th time (rounds count from 1).
fn barrier(nr_vcpus: u32, round: u32) {
    ARRIVED.fetch_add(1, Ordering::AcqRel);
    while ARRIVED.load(Ordering::Acquire) < nr_vcpus * round {
        core::hint::spin_loop();
    }
}

/// Writes this vCPU's result slot (`done` last) and ends the run when every vCPU is done.
fn report(vcpu: u64, nr_vcpus: u32, pages: u64, errors: u64, cycles: u64) -> ! {
    let result = abi::result_addr(vcpu) as *mut u64;
    // SAFETY: this vCPU's results slot in the boot area; `done` is written last.
    unsafe {
        core::ptr::write_volatile(result.add(result_words::PAGES), pages);
        core::ptr::write_volatile(result.add(result_words::VERIFY_ERRORS), errors);
        core::ptr::write_volatile(result.add(result_words::TOUCH_CYCLES), cycles);
        core::sync::atomic::fence(Ordering::Release);
        core::ptr::write_volatile(result.add(result_words::DONE), 1);
    }
    if DONE.fetch_add(1, Ordering::AcqRel) + 1 == nr_vcpus {
        exit(0)
    }
    park()
}

/// `race`: every vCPU first-touches the same pages at the same time.
fn race(vcpu: u64, info: &BootInfo) -> ! {
    let pages = info.params[1].max(1);
    barrier(info.nr_vcpus, 1);
    for i in 0..pages {
        let Some(page) = ram_page(info, i) else { break };
        // SAFETY: RAM from the memory map; each vCPU writes only its own word of the page.
        unsafe { core::ptr::write_volatile((page + vcpu * 8) as *mut u64, pattern(vcpu, i)) };
    }
    barrier(info.nr_vcpus, 2);
    let mut errors = 0;
    for i in 0..pages {
        let Some(page) = ram_page(info, i) else { break };
        for v in 0..u64::from(info.nr_vcpus) {
            // SAFETY: as above; all writes finished before the barrier.
            if unsafe { core::ptr::read_volatile((page + v * 8) as *const u64) } != pattern(v, i) {
                errors += 1;
            }
        }
    }
    report(vcpu, info.nr_vcpus, pages, errors, 0)
}

/// `xadd`: every vCPU does `lock xadd` on the same never-touched words at the same time.
fn xadd(vcpu: u64, info: &BootInfo) -> ! {
    let pages = info.params[1].max(1);
    barrier(info.nr_vcpus, 1);
    for i in 0..pages {
        let Some(page) = ram_page(info, i) else { break };
        // SAFETY: RAM from the memory map; every vCPU adds atomically to the same word.
        unsafe {
            asm!("lock xadd qword ptr [{p}], {v}", p = in(reg) page, v = inout(reg) 1u64 => _,
                 options(nostack))
        };
    }
    barrier(info.nr_vcpus, 2);
    let mut lost = 0;
    if vcpu == 0 {
        for i in 0..pages {
            let Some(page) = ram_page(info, i) else { break };
            // SAFETY: as above; all additions finished before the barrier.
            let v = unsafe { core::ptr::read_volatile(page as *const u64) };
            lost += u64::from(info.nr_vcpus).saturating_sub(v);
        }
    }
    report(vcpu, info.nr_vcpus, pages, lost, 0)
}

/// One hot-plugged region as this vCPU follows it.
#[derive(Clone, Copy)]
struct Plugged {
    start: u64,
    size: u64,
    /// `abi::region_flags`.
    flags: u32,
    /// The next page of this vCPU's share to touch (share index, not page index).
    next: u64,
}

/// Word addresses this vCPU wrote and then saw unmapped (read as open bus at an even mailbox
/// generation, by [`check_gone`]): if a region covers one again, it is a new one, and its
/// first contents there must be zero, not the old word. Keeps the last [`Gone::LEN`].
struct Gone {
    addrs: [u64; Gone::LEN],
    next: usize,
}

impl Gone {
    const LEN: usize = 64;

    fn push(&mut self, addr: u64) {
        if !self.addrs.contains(&addr) {
            self.addrs[self.next] = addr;
            self.next = (self.next + 1) % Self::LEN;
        }
    }

    /// Forgets `addr`; says whether it was there.
    fn take(&mut self, addr: u64) -> bool {
        match self.addrs.iter().position(|&a| a == addr) {
            Some(i) => {
                self.addrs[i] = 0;
                true
            }
            None => false,
        }
    }
}

/// Pages each vCPU touches per pass before it looks at the mailbox again.
const HOTPLUG_PAGES_PER_PASS: u64 = 256;

fn mailbox_generation() -> u64 {
    // SAFETY: the mailbox page is in the identity-mapped boot area; the VMM writes the
    // generation with release stores, and this acquire load pairs with them.
    let g = unsafe {
        core::ptr::read_volatile(
            (abi::layout::MAILBOX + abi::Mailbox::GENERATION_OFFSET) as *const u64,
        )
    };
    core::sync::atomic::fence(Ordering::Acquire);
    g
}

fn mailbox_flags() -> u32 {
    // SAFETY: as in `mailbox_generation`.
    unsafe {
        core::ptr::read_volatile((abi::layout::MAILBOX + abi::Mailbox::FLAGS_OFFSET) as *const u32)
    }
}

/// Copies the mailbox's region list into `out` if generation `g` is still current at the
/// end; returns the number of entries.
fn mailbox_list(g: u64, out: &mut [Plugged; abi::MAILBOX_MAX_REGIONS]) -> Option<usize> {
    let base = abi::layout::MAILBOX;
    // SAFETY: the mailbox page (see `mailbox_generation`); plain volatile reads of a list the
    // VMM does not change while the generation stays `g`.
    let n =
        unsafe { core::ptr::read_volatile((base + abi::Mailbox::NR_REGIONS_OFFSET) as *const u32) }
            as usize;
    let n = n.min(abi::MAILBOX_MAX_REGIONS);
    for (i, e) in out.iter_mut().take(n).enumerate() {
        let at = base + abi::Mailbox::REGIONS_OFFSET + i as u64 * 24;
        // SAFETY: as above; entry `i < MAILBOX_MAX_REGIONS` lies inside the mailbox page.
        unsafe {
            e.start = core::ptr::read_volatile(at as *const u64);
            e.size = core::ptr::read_volatile((at + 8) as *const u64);
            e.flags = core::ptr::read_volatile((at + 20) as *const u32);
        }
        e.next = 0;
    }
    (mailbox_generation() == g).then_some(n)
}

/// The word of page `p` of a region at `start` that `hotplug` writes.
fn word_of(start: u64, p: u64) -> u64 {
    start + p * abi::layout::PAGE_SIZE + (p % 512) * 8
}

/// What `hotplug` writes at `addr`.
fn hotplug_pattern(addr: u64) -> u64 {
    addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// After the mailbox moved to generation `g` (`fresh`), reads back one word this vCPU wrote in
/// up to 8 pages spread over its share of every region of `old` and in the last page it wrote
/// there, where `fresh` no longer
/// covers them: unmapping has finished, so each must read as open bus (all ones), never as what
/// was written (the old page still reachable) nor as anything else (a region the list does not
/// show yet: the VMM makes the generation odd before it maps, too). A read is counted only if
/// the generation is still `g` after it (a later change could legitimately bring the address
/// back), and not at all when the list was cut short (`TRUNCATED`: an address it lacks may be
/// mapped). Returns (checks, stale reads).
fn check_gone(
    g: u64,
    old: &[Plugged],
    fresh: &[Plugged],
    vcpu: u64,
    nr: u64,
    gone: &mut Gone,
) -> (u64, u64) {
    let (mut checks, mut stale) = (0, 0);
    if mailbox_flags() & abi::mailbox_flags::TRUNCATED != 0 {
        return (0, 0);
    }
    for r in old
        .iter()
        .filter(|r| r.flags & abi::region_flags::READONLY == 0)
    {
        // Up to 8 pages spread over what this vCPU touched, and the last one it wrote (the
        // write most likely to have raced with the unmap).
        let samples = r.next.min(8);
        for j in 0..=samples {
            let k = if j < samples {
                j * r.next / samples
            } else if r.next > 8 {
                r.next - 1
            } else {
                break;
            };
            let addr = word_of(r.start, k * nr + vcpu);
            if fresh
                .iter()
                .any(|f| f.start <= addr && addr < f.start + f.size)
            {
                continue;
            }
            // SAFETY: an identity-mapped guest-physical address that no region covers now: the
            // VMM answers the read (open bus).
            let got = unsafe { core::ptr::read_volatile(addr as *const u64) };
            if mailbox_generation() != g {
                return (checks, stale);
            }
            checks += 1;
            if got != u64::MAX {
                stale += 1;
                report_stale(b"stale read", vcpu, g, addr, got, (b"old region", r));
            } else {
                gone.push(addr);
            }
        }
    }
    (checks, stale)
}

/// Says on the console where a stale read was (the run fails on it anyway): `what` it was,
/// the vCPU, the mailbox generation, the address, what it read (whether it is this vCPU's own
/// pattern there: the old page), and the region the list had there (`region`: "old region"
/// for a read after an unmap, "new region" for the first contents of a region mapped again).
fn report_stale(what: &[u8], vcpu: u64, g: u64, addr: u64, got: u64, region: (&[u8], &Plugged)) {
    // Labels (at most 100 bytes) and eight numbers of at most 20 digits each, and a newline.
    let mut line = [0u8; 288];
    let mut len = 0;
    let (name, r) = region;
    for (label, v) in [
        (&b"hotplug: "[..], None),
        (what, None),
        (b": vcpu ", Some(vcpu)),
        (b" generation ", Some(g)),
        (b" gpa ", Some(addr)),
        (b" read ", Some(got)),
        (b" own ", Some(u64::from(got == hotplug_pattern(addr)))),
        (b" in ", None),
        (name, None),
        (b" at ", Some(r.start)),
        (b" size ", Some(r.size)),
        (b" flags ", Some(u64::from(r.flags))),
    ] {
        line[len..len + label.len()].copy_from_slice(label);
        len += label.len();
        if let Some(v) = v {
            len += fmt_u64(v, &mut line[len..]);
        }
    }
    line[len] = b'\n';
    puts(&line[..len + 1]);
}

/// `hotplug`: follow the mailbox; write a per-address pattern into this vCPU's share of each
/// listed region's pages (the first touch of each is a fault the VMM services), read it back,
/// and tell a real error from memory that a concurrent unmap or protect took away: a surprise
/// counts as an error only if the mailbox generation was the same (even) value before the
/// write and after the read. Runs until the mailbox's STOP flag, reporting after every pass.
fn hotplug(vcpu: u64, info: &BootInfo) -> ! {
    const EMPTY: Plugged = Plugged {
        start: 0,
        size: 0,
        flags: 0,
        next: 0,
    };
    let nr = u64::from(info.nr_vcpus);
    let mut list = [EMPTY; abi::MAILBOX_MAX_REGIONS];
    let mut fresh = [EMPTY; abi::MAILBOX_MAX_REGIONS];
    let mut n = 0usize;
    let mut seen = 0u64;
    let (mut touched, mut errors, mut vanished, mut passes) = (0u64, 0u64, 0u64, 0u64);
    let (mut checks, mut stale) = (0u64, 0u64);
    let mut gone = Gone {
        addrs: [0; Gone::LEN],
        next: 0,
    };
    // Whatever a region's start, only this vCPU writes a word that it writes: page `p` of a
    // region is vCPU `p mod nr`'s and its word lies at `(p mod 512) * 8`, so two regions
    // whose pages put the same word in the same place agree on `p mod 512`, and so on the
    // owner, when `nr` divides 512. With other counts the first-contents check is skipped.
    let exclusive_words = 512 % nr == 0;
    let result = abi::result_addr(vcpu) as *mut u64;
    while mailbox_flags() & abi::mailbox_flags::STOP == 0 {
        let g = mailbox_generation();
        if g == 0 || g & 1 == 1 {
            core::hint::spin_loop();
            continue;
        }
        if g != seen {
            let Some(m) = mailbox_list(g, &mut fresh) else {
                continue;
            };
            let (c, st) = check_gone(g, &list[..n], &fresh[..m], vcpu, nr, &mut gone);
            checks += c;
            stale += st;
            // Keep the progress of regions that are still listed unchanged.
            for f in fresh.iter_mut().take(m) {
                if let Some(old) = list[..n]
                    .iter()
                    .find(|o| o.start == f.start && o.size == f.size && o.flags == f.flags)
                {
                    f.next = old.next;
                }
            }
            list[..m].copy_from_slice(&fresh[..m]);
            n = m;
            seen = g;
        }
        let mut budget = HOTPLUG_PAGES_PER_PASS;
        'regions: for r in list[..n].iter_mut() {
            let pages = r.size / abi::layout::PAGE_SIZE;
            let share = pages / nr + u64::from(pages % nr > vcpu);
            while r.next < share && budget > 0 {
                let p = r.next * nr + vcpu;
                let addr = word_of(r.start, p);
                if mailbox_generation() != seen {
                    break 'regions;
                }
                if r.flags & abi::region_flags::READONLY != 0 {
                    // SAFETY: a listed hot-plugged region, identity-mapped; if it vanished
                    // meanwhile the read is answered by the VMM (open bus).
                    let _ = unsafe { core::ptr::read_volatile(addr as *const u64) };
                } else {
                    let want = hotplug_pattern(addr);
                    if gone.take(addr) && exclusive_words {
                        // This vCPU wrote here, then saw it unmapped: the region here now is
                        // a new one, and nothing but this vCPU writes this word of it.
                        // SAFETY: as below.
                        let first = unsafe { core::ptr::read_volatile(addr as *const u64) };
                        if mailbox_generation() != seen {
                            break 'regions;
                        }
                        checks += 1;
                        if first != 0 {
                            stale += 1;
                            report_stale(
                                b"stale contents",
                                vcpu,
                                seen,
                                addr,
                                first,
                                (b"new region", &*r),
                            );
                        }
                    }
                    // SAFETY: as above; only this vCPU writes its share of the region.
                    let got = unsafe {
                        core::ptr::write_volatile(addr as *mut u64, want);
                        core::ptr::read_volatile(addr as *const u64)
                    };
                    if got != want {
                        if mailbox_generation() == seen {
                            errors += 1;
                        } else {
                            vanished += 1;
                            break 'regions;
                        }
                    }
                }
                touched += 1;
                r.next += 1;
                budget -= 1;
            }
        }
        passes += 1;
        // SAFETY: this vCPU's results slot in the boot area, written by it alone.
        unsafe {
            core::ptr::write_volatile(result.add(result_words::PAGES), touched);
            core::ptr::write_volatile(result.add(result_words::VERIFY_ERRORS), errors);
            core::ptr::write_volatile(result.add(result_words::VANISHED), vanished);
            core::ptr::write_volatile(result.add(result_words::PASSES), passes);
            core::ptr::write_volatile(result.add(result_words::GENERATION_SEEN), seen);
            core::ptr::write_volatile(
                result.add(result_words::UNMAPPED_READS),
                abi::VcpuResult::pack_unmapped_reads(checks, stale),
            );
        }
        if budget == HOTPLUG_PAGES_PER_PASS {
            // Nothing to do: leave the host CPU to others for a millisecond.
            // SAFETY: see `outb`.
            unsafe {
                asm!("out dx, eax", in("dx") ports::IDLE, in("eax") 1000u32, options(nomem, nostack))
            };
        }
    }
    // SAFETY: as above; `done` last.
    unsafe {
        core::sync::atomic::fence(Ordering::Release);
        core::ptr::write_volatile(result.add(result_words::DONE), 1);
    }
    if DONE.fetch_add(1, Ordering::AcqRel) + 1 == info.nr_vcpus {
        exit(0)
    }
    park()
}

/// vCPUs of `pattern` that have finished, and the wrong words they found.
static PATTERN_DONE: AtomicU32 = AtomicU32::new(0);
static PATTERN_ERRORS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Reads `params[i]` of the boot info afresh (the VMM changes the resume words on restore).
fn boot_param(boot_info: *const BootInfo, i: usize) -> u64 {
    let at = boot_info as u64 + BootInfo::PARAMS_OFFSET + 8 * i as u64;
    // SAFETY: the boot info page is identity-mapped in the boot area; the VMM writes these
    // words only while every vCPU is stopped (before a restored guest resumes).
    unsafe { core::ptr::read_volatile(at as *const u64) }
}

/// `pattern`: write [`abi::pattern_word`] over every word of this vCPU's slice of RAM, say
/// ready, then verify the slice in passes until told to stop (see `abi::workload::PATTERN`).
// A restore changes `limit` inside the pass that uses it as a bound, and then starts the next
// pass (`continue 'passes`), which takes the new bound.
#[allow(clippy::mut_range_bound)]
fn pattern_workload(vcpu: u64, info: &BootInfo, boot_info: *const BootInfo) -> ! {
    use abi::pattern_params as pp;
    let per = pages_per_vcpu(info, info.params[pp::PAGES]);
    let first = vcpu * per;
    let words = abi::layout::PAGE_SIZE / 8;
    for i in 0..per {
        let Some(page) = ram_page(info, first + i) else {
            break;
        };
        for w in 0..words {
            let addr = page + w * 8;
            // SAFETY: RAM from the memory map, identity-mapped, in this vCPU's slice: no other
            // vCPU writes it.
            unsafe { core::ptr::write_volatile(addr as *mut u64, abi::pattern_word(addr)) };
        }
    }
    let result = abi::result_addr(vcpu) as *mut u64;
    // SAFETY: this vCPU's results slot in the boot area, written by it alone.
    unsafe {
        core::ptr::write_volatile(result.add(result_words::PAGES), per);
        core::ptr::write_volatile(result.add(result_words::READY), 1);
    }
    let mut line = [0u8; 48];
    let prefix = b"pattern: vcpu ";
    line[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len() + fmt_u64(vcpu, &mut line[prefix.len()..]);
    let suffix = b" ready\n";
    line[len..len + suffix.len()].copy_from_slice(suffix);
    len += suffix.len();
    puts(&line[..len]);
    // A fresh boot leaves the word 0; every restore makes it larger.
    let mut resume_gen = 0;
    let mut remaining = info.params[pp::PASSES];
    // Pages verified per pass: all written, or after a restore the working set it asks for.
    let mut limit = per;
    // The first pass after a restore times each page's first read and ends with a mark.
    let mut timing = false;
    let hist = abi::hist_addr(vcpu) as *mut u32;
    let (mut errors, mut passes) = (0u64, 0u64);
    // Rewriting: the generation every page of the slice holds before this pass rewrites it.
    let rewrite = info.params[pp::REWRITE] != 0;
    let mut generation = 0u64;
    'passes: loop {
        for i in 0..limit {
            let Some(page) = ram_page(info, first + i) else {
                break;
            };
            if boot_param(boot_info, pp::RESUME_GEN) != resume_gen {
                // Restored from a snapshot: drop this pass; the VMM says what to run from here.
                // (A rewriting pass cannot be dropped: the pages before this one hold the next
                // generation already. It goes on, over every page.)
                resume_gen = boot_param(boot_info, pp::RESUME_GEN);
                remaining = boot_param(boot_info, pp::RESUME_PASSES);
                timing = true;
                if !rewrite {
                    limit = match boot_param(boot_info, pp::RESUME_PAGES) {
                        0 => per,
                        n => n.min(per),
                    };
                    continue 'passes;
                }
            }
            for w in 0..words {
                let addr = page + w * 8;
                let t0 = if timing && w == 0 { rdtsc() } else { 0 };
                // SAFETY: as above.
                let v = unsafe { core::ptr::read_volatile(addr as *const u64) };
                if timing && w == 0 {
                    let b = abi::hist_bucket(rdtsc().wrapping_sub(t0));
                    // SAFETY: this vCPU's histogram in the boot area, written by it alone.
                    unsafe {
                        let p = hist.add(b);
                        core::ptr::write_volatile(p, core::ptr::read_volatile(p) + 1);
                    }
                }
                let want = if rewrite {
                    abi::rewritten_word(addr, generation)
                } else {
                    abi::pattern_word(addr)
                };
                if v != want {
                    errors += 1;
                }
                if rewrite {
                    // SAFETY: as above.
                    unsafe {
                        core::ptr::write_volatile(
                            addr as *mut u64,
                            abi::rewritten_word(addr, generation + 1),
                        )
                    };
                }
            }
        }
        if rewrite {
            generation += 1;
        }
        passes += 1;
        // SAFETY: as above.
        unsafe {
            core::ptr::write_volatile(result.add(result_words::VERIFY_ERRORS), errors);
            core::ptr::write_volatile(result.add(result_words::PASSES), passes);
        }
        if timing {
            timing = false;
            // SAFETY: see `outb`.
            unsafe {
                asm!("out dx, al", in("dx") ports::MARK, in("al") 1u8, options(nomem, nostack))
            };
        }
        if remaining > 0 {
            remaining -= 1;
            if remaining == 0 {
                break;
            }
        }
        if mailbox_flags() & abi::mailbox_flags::STOP != 0 {
            break;
        }
    }
    PATTERN_ERRORS.fetch_add(errors, Ordering::AcqRel);
    // SAFETY: as above; `done` last.
    unsafe {
        core::sync::atomic::fence(Ordering::Release);
        core::ptr::write_volatile(result.add(result_words::DONE), 1);
    }
    if PATTERN_DONE.fetch_add(1, Ordering::AcqRel) + 1 == info.nr_vcpus {
        exit(u32::from(PATTERN_ERRORS.load(Ordering::Acquire) != 0))
    }
    park()
}

fn fmt_u64(mut v: u64, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = digits[n - 1 - i];
    }
    n
}

/// Writes bytes to the UART's transmit register with one `rep outsb` (one VM exit per call
/// rather than one per byte). The VMM's UART is always ready, so the line status register is
/// not polled.
fn puts(s: &[u8]) {
    // SAFETY: reads `s.len()` bytes of `s` and writes them to the UART port; touches no other
    // memory. The direction flag is clear (the ABI guarantees it at function boundaries).
    unsafe {
        asm!("rep outsb", in("dx") ports::SERIAL, inout("rsi") s.as_ptr() => _,
             inout("rcx") s.len() => _, options(nostack, preserves_flags, readonly))
    };
}

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O only exits to the VMM; it touches no guest memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// Ends the whole run with `status`.
fn exit(status: u32) -> ! {
    // SAFETY: see `outb`.
    unsafe { asm!("out dx, eax", in("dx") ports::EXIT, in("eax") status, options(nomem, nostack)) };
    park()
}

/// Stops this vCPU; the others go on.
fn park() -> ! {
    loop {
        outb(ports::PARK, 0);
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    puts(b"guest: panic\n");
    exit(101)
}

// The freestanding image has no libc: provide the memory routines the compiler may call.
// They use `rep movsb`/`rep stosb` so that the compiler cannot turn them back into calls.

/// # Safety
///
/// `dst` and `src` valid for `n` bytes, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
///
/// `dst` and `src` valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst is below src or the ranges are disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copy backwards (direction flag set, then cleared) for an overlapping dst > src.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack))
    };
    dst
}

/// # Safety
///
/// `dst` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
///
/// `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and the caller guarantees both ranges are valid for `n` bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
///
/// As [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
