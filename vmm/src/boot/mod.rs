//! Booting straight into 64-bit mode: the guest image, identity-mapping page tables, the GDT,
//! the boot-info block, and each vCPU's registers and CPUID.
//!
//! The guest-physical layout is `abi::layout` (shared with the guest); everything here is
//! written through vm-memory's `Bytes` API.
#![deny(unsafe_code)]

pub mod elf;
pub mod regs;

use std::ops::Range;

use abi::layout::{
    BOOT_AREA_END, BOOT_DATA_END, GDT, IDENTITY_MAP_1G_BYTES, IDENTITY_MAP_2M_BYTES, IMAGE_START,
    PAGE_DIRS, PAGE_DIRS_COUNT, PDPT, PML4, STACKS,
};
use abi::{BootInfo, MemRegion, MAX_MEM_REGIONS, MAX_PARAMS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::memory::RamRange;

/// The built-in guest image, built by `build.rs` from `guest/`.
pub static BUILTIN_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// Errors of boot-data setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A write into guest memory failed.
    #[error("cannot write {what} at gpa {gpa:#x}: {source}")]
    Write {
        /// What.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// Why.
        source: GuestMemoryError,
    },
    /// Too many RAM ranges for the boot info.
    #[error("{0} memory ranges do not fit the boot info's memory map")]
    TooManyRanges(usize),
}

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
/// Every entry: present, writable, user-accessible (the built-in guest runs at CPL 3).
const PTE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

/// How much guest-physical space the boot page tables identity-map.
pub fn identity_map_bytes(one_gig_pages: bool) -> u64 {
    if one_gig_pages {
        IDENTITY_MAP_1G_BYTES
    } else {
        IDENTITY_MAP_2M_BYTES
    }
}

/// The ranges of the boot area a loaded image must stay clear of.
pub fn reserved_ranges() -> [(&'static str, Range<u64>); 2] {
    [
        ("boot data", 0..IMAGE_START),
        ("vCPU stacks", STACKS..BOOT_AREA_END),
    ]
}

/// The page tables as (gpa, bytes) blocks: PML4, PDPT, and with 2 MiB pages the page
/// directories. They identity-map `identity_map_bytes(one_gig_pages)` of guest-physical space,
/// whether RAM is there or not, so hot-plugged memory needs no page-table update.
pub fn page_tables(one_gig_pages: bool) -> Vec<(u64, Vec<u8>)> {
    let entries = |f: &dyn Fn(u64) -> u64, n: u64| -> Vec<u8> {
        (0..n).flat_map(|i| f(i).to_le_bytes()).collect()
    };
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT | PTE_FLAGS).to_le_bytes());
    let mut out = vec![(PML4, pml4)];
    if one_gig_pages {
        out.push((PDPT, entries(&|i| (i << 30) | PTE_FLAGS | PTE_HUGE, 512)));
    } else {
        let mut pdpt = entries(&|i| (PAGE_DIRS + i * 4096) | PTE_FLAGS, PAGE_DIRS_COUNT);
        pdpt.resize(4096, 0);
        out.push((PDPT, pdpt));
        out.push((
            PAGE_DIRS,
            entries(&|i| (i << 21) | PTE_FLAGS | PTE_HUGE, PAGE_DIRS_COUNT * 512),
        ));
    }
    out
}

/// GDT descriptor (flags, base, limit), indexed by selector / 8 (see `abi::selectors`):
/// null, kernel code64, kernel data, TSS, user code64, user data.
pub const GDT_ENTRIES: [(u16, u32, u32); 6] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
    (0xa0fb, 0, 0xfffff),
    (0xc0f3, 0, 0xfffff),
];

/// Encodes one GDT descriptor from its flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot-info block for this VM.
pub fn boot_info(
    nr_vcpus: u32,
    workload: u32,
    params: &[u64],
    ranges: &[RamRange],
) -> Result<BootInfo, BootError> {
    if ranges.len() > MAX_MEM_REGIONS {
        return Err(BootError::TooManyRanges(ranges.len()));
    }
    let mut info = BootInfo::new(nr_vcpus, workload);
    for (slot, p) in info.params.iter_mut().zip(params.iter().take(MAX_PARAMS)) {
        *slot = *p;
    }
    info.nr_mem_regions = ranges.len() as u32;
    for (slot, r) in info.mem_regions.iter_mut().zip(ranges) {
        *slot = MemRegion {
            start: r.start.0,
            size_bytes: r.size_bytes,
            kind: r.kind,
            reserved: 0,
        };
    }
    Ok(info)
}

fn write(
    mem: &impl Bytes<GuestAddress, E = GuestMemoryError>,
    what: &'static str,
    gpa: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|source| BootError::Write { what, gpa, source })
}

/// Writes the GDT, the page tables and the boot info into guest memory.
pub fn write_boot_data(
    mem: &impl Bytes<GuestAddress, E = GuestMemoryError>,
    one_gig_pages: bool,
    info: &BootInfo,
) -> Result<(), BootError> {
    let gdt: Vec<u8> = GDT_ENTRIES
        .iter()
        .flat_map(|&(f, b, l)| gdt_entry(f, b, l).to_le_bytes())
        .collect();
    write(mem, "GDT", GDT, &gdt)?;
    for (gpa, bytes) in page_tables(one_gig_pages) {
        debug_assert!(gpa + bytes.len() as u64 <= BOOT_DATA_END);
        write(mem, "page tables", gpa, &bytes)?;
    }
    write(mem, "boot info", abi::layout::BOOT_INFO, &info.to_bytes())
}

/// Copies a validated image's segments into guest memory. The tails past the file bytes are
/// left alone: guest RAM is fresh anonymous memory, already zero.
pub fn load_image(
    mem: &impl Bytes<GuestAddress, E = GuestMemoryError>,
    image: &elf::Image,
    bytes: &[u8],
) -> Result<(), BootError> {
    for seg in &image.segments {
        write(mem, "guest image", seg.gpa, &bytes[seg.file_range.clone()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    fn pte(blocks: &[(u64, Vec<u8>)], table: u64, index: u64) -> u64 {
        for (gpa, b) in blocks {
            let o = table + index * 8;
            if o >= *gpa && o + 8 <= gpa + b.len() as u64 {
                let off = (o - gpa) as usize;
                return u64::from_le_bytes(b[off..off + 8].try_into().unwrap());
            }
        }
        panic!("no table at {table:#x}");
    }

    /// Walks the tables like the MMU for a 4-level identity map.
    fn translate(blocks: &[(u64, Vec<u8>)], va: u64) -> Option<u64> {
        let e4 = pte(blocks, PML4, (va >> 39) & 511);
        if e4 & PTE_PRESENT == 0 {
            return None;
        }
        let e3 = pte(blocks, e4 & !0xfff, (va >> 30) & 511);
        if e3 & PTE_PRESENT == 0 {
            return None;
        }
        if e3 & PTE_HUGE != 0 {
            return Some((e3 & 0x000f_ffff_c000_0000) | (va & 0x3fff_ffff));
        }
        let e2 = pte(blocks, e3 & !0xfff, (va >> 21) & 511);
        if e2 & PTE_PRESENT == 0 {
            return None;
        }
        assert!(e2 & PTE_HUGE != 0);
        assert!(e2 & PTE_USER != 0);
        Some((e2 & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
    }

    #[test]
    fn page_tables_identity_map() {
        for one_gig in [true, false] {
            let t = page_tables(one_gig);
            let limit = identity_map_bytes(one_gig);
            for va in [0, 0x1234, 0x10_0000, 0xd000_0000, 5 << 30, limit - 1] {
                assert_eq!(translate(&t, va), Some(va), "one_gig={one_gig} va={va:#x}");
            }
            for (gpa, b) in &t {
                assert!(gpa + b.len() as u64 <= BOOT_DATA_END);
            }
        }
        assert_eq!(translate(&page_tables(false), 64 << 30), None);
    }

    #[test]
    fn gdt_descriptors() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(
            GDT_ENTRIES[usize::from(abi::selectors::USER_CS >> 3)].0 & 0x60,
            0x60
        );
        assert_eq!(
            GDT_ENTRIES[usize::from(abi::selectors::USER_DS >> 3)].0 & 0x60,
            0x60
        );
    }

    #[test]
    fn boot_info_memory_map() {
        let ranges = memory::plan(256 << 20, IDENTITY_MAP_1G_BYTES).unwrap();
        let info = boot_info(4, abi::workload::EXIT, &[7], &ranges).unwrap();
        assert_eq!(info.nr_vcpus, 4);
        assert_eq!(info.params[0], 7);
        assert_eq!(info.nr_mem_regions, 2);
        assert_eq!(info.mem_regions[1].start, BOOT_AREA_END);
        assert_eq!(info.mem_regions[1].kind, abi::mem_kind::RAM);
    }

    #[test]
    fn builtin_guest_is_a_valid_image() {
        #[allow(clippy::single_range_in_vec_init)]
        let ram = vec![0..(256u64 << 20)];
        let reserved = reserved_ranges();
        let img = elf::parse(
            BUILTIN_GUEST,
            &elf::Placement {
                ram: &ram,
                reserved: &reserved,
            },
        )
        .unwrap();
        assert_eq!(img.entry, IMAGE_START);
        for s in &img.segments {
            assert!(s.gpa + s.memsz <= abi::layout::IMAGE_END);
        }
    }
}
