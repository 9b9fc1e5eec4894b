//! Guest memory: the plan of guest-physical RAM ranges for a given size, the address space
//! that maps regions onto host memory and KVM memslots (`address_space`), and fault servicing.
//!
//! Guest-physical space is mirrored by one host reservation (`host`); a region is memory over
//! part of it (anonymous, memfd or hugetlb), which costs nothing until touched and is already
//! zero. A hole is `PROT_NONE`, except in the hot-plug window in `vcpu` fault mode, where holes
//! are armed: read-write, registered with userfaultfd, holding no page, so that mapping an
//! anonymous region there is only a publication in the tree (`docs/memory.md`, "Armed holes").
//! The boot area `[0, BOOT_AREA_END)` is its own region, populated eagerly; the rest of RAM is
//! demand-paged.
#![deny(unsafe_code)]

pub mod address_space;
#[allow(unsafe_code)]
pub mod fault;
#[allow(unsafe_code)]
pub mod guest;
#[allow(unsafe_code)]
pub mod host;
pub mod region;
#[allow(unsafe_code)]
pub mod residency;
#[allow(unsafe_code)]
pub mod snapshot;
#[allow(unsafe_code)]
pub mod uffd;
pub mod window;

pub use address_space::{
    AddressSpace, AsConfig, AsError, DirtyLog, FaultAround, FaultMode, Limits, MemslotMode,
    Memslots, PartialUnmap,
};
pub use fault::{Access, FaultError, PageState, Serviced};
pub use guest::GuardedMemory;
pub use host::Backing;
pub use region::RegionKind;

use abi::layout::{BOOT_AREA_END, HOLE_END, HOLE_START, PAGE_SIZE};
use abi::mem_kind;
use vm_memory::GuestAddress;

/// Which concurrent range map holds the address space's regions (`--address-space`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpaceKind {
    /// The RCU Bonsai tree: lookups take no lock.
    Bonsai,
    /// `RwLock<BTreeMap>` (a baseline).
    Rwlock,
    /// A copy-on-write `BTreeMap` published with `arc-swap` (a baseline).
    Cow,
}

impl AddressSpaceKind {
    /// Every implementation.
    pub const ALL: [Self; 3] = [Self::Bonsai, Self::Rwlock, Self::Cow];

    /// The command-line name, which is also the range map's own name
    /// (`rcu::baselines::IMPLEMENTATIONS`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bonsai => "bonsai",
            Self::Rwlock => "rwlock",
            Self::Cow => "cow",
        }
    }

    /// The implementation called `s`.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// The least RAM a VM may have.
pub const MIN_MEM_BYTES: u64 = 16 << 20;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Less than the minimum.
    #[error(
        "--mem {size}: too little memory; the guest needs at least {min} (boot area plus room \
         for workloads)",
        size = fmt_size(*.size_bytes), min = fmt_size(MIN_MEM_BYTES)
    )]
    TooLittle {
        /// Requested size.
        size_bytes: u64,
    },
    /// More than the identity map covers.
    #[error(
        "--mem {size}: too much memory; guest RAM would end at {top:#x}, beyond the \
         {map} of guest-physical space the boot page tables identity-map; use at most {max}",
        size = fmt_size(*.size_bytes), map = fmt_size(*.identity_map_bytes), max = fmt_size(*.max_bytes)
    )]
    TooMuch {
        /// Requested size.
        size_bytes: u64,
        /// Where RAM would end.
        top: u64,
        /// The identity-mapped range.
        identity_map_bytes: u64,
        /// The largest size that fits.
        max_bytes: u64,
    },
    /// Not a multiple of the page size.
    #[error("--mem {size_bytes}: not a multiple of 4K")]
    Unaligned {
        /// Requested size.
        size_bytes: u64,
    },
    /// The address space could not map guest memory.
    #[error("cannot set up guest memory: {0}")]
    Space(#[from] AsError),
}

/// One planned guest-physical RAM range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// First guest-physical address.
    pub start: GuestAddress,
    /// Size in bytes.
    pub size_bytes: u64,
    /// One of `abi::mem_kind`.
    pub kind: u32,
}

impl RamRange {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start.0 + self.size_bytes
    }
}

/// Plans the RAM ranges for `size_bytes` of RAM: the boot area, RAM up to the 32-bit hole,
/// and the rest above 4 GiB. Every range must lie below `identity_map_bytes`.
pub fn plan(size_bytes: u64, identity_map_bytes: u64) -> Result<Vec<RamRange>, MemoryError> {
    if size_bytes < MIN_MEM_BYTES {
        return Err(MemoryError::TooLittle { size_bytes });
    }
    if size_bytes % PAGE_SIZE != 0 {
        return Err(MemoryError::Unaligned { size_bytes });
    }
    let hole = HOLE_END - HOLE_START;
    let top = if size_bytes > HOLE_START {
        size_bytes.saturating_add(hole)
    } else {
        size_bytes
    };
    if top > identity_map_bytes {
        return Err(MemoryError::TooMuch {
            size_bytes,
            top,
            identity_map_bytes,
            max_bytes: identity_map_bytes - hole,
        });
    }
    let mut ranges = vec![RamRange {
        start: GuestAddress(0),
        size_bytes: BOOT_AREA_END,
        kind: mem_kind::BOOT,
    }];
    let low_end = size_bytes.min(HOLE_START);
    ranges.push(RamRange {
        start: GuestAddress(BOOT_AREA_END),
        size_bytes: low_end - BOOT_AREA_END,
        kind: mem_kind::RAM,
    });
    if size_bytes > HOLE_START {
        ranges.push(RamRange {
            start: GuestAddress(HOLE_END),
            size_bytes: size_bytes - HOLE_START,
            kind: mem_kind::RAM,
        });
    }
    Ok(ranges)
}

pub use crate::size::fmt_size;

#[cfg(test)]
mod tests {
    use super::*;
    use abi::layout::{IDENTITY_MAP_1G_BYTES, IDENTITY_MAP_2M_BYTES};

    #[test]
    fn address_space_kinds_are_the_range_maps_names() {
        let names: Vec<_> = AddressSpaceKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names, rcu::baselines::IMPLEMENTATIONS);
        for k in AddressSpaceKind::ALL {
            assert_eq!(AddressSpaceKind::from_name(k.name()), Some(k));
        }
        assert_eq!(AddressSpaceKind::from_name("btree"), None);
    }

    #[test]
    fn small_vm_is_boot_area_plus_low_ram() {
        let r = plan(256 << 20, IDENTITY_MAP_1G_BYTES).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].start.0, 0);
        assert_eq!(r[0].end(), BOOT_AREA_END);
        assert_eq!(r[1].start.0, BOOT_AREA_END);
        assert_eq!(r[1].end(), 256 << 20);
    }

    #[test]
    fn big_vm_skips_the_hole() {
        let r = plan(4 << 30, IDENTITY_MAP_1G_BYTES).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].end(), HOLE_START);
        assert_eq!(r[2].start.0, HOLE_END);
        assert_eq!(r[2].size_bytes, 1 << 30);
    }

    #[test]
    fn limits() {
        assert!(matches!(
            plan(1 << 20, IDENTITY_MAP_1G_BYTES),
            Err(MemoryError::TooLittle { .. })
        ));
        assert!(matches!(
            plan((16 << 20) + 1, IDENTITY_MAP_1G_BYTES),
            Err(MemoryError::Unaligned { .. })
        ));
        let e = plan(64 << 30, IDENTITY_MAP_2M_BYTES).unwrap_err();
        assert!(e.to_string().contains("use at most 63G"), "{e}");
        assert!(plan(63 << 30, IDENTITY_MAP_2M_BYTES).is_ok());
        assert!(plan(511 << 30, IDENTITY_MAP_1G_BYTES).is_ok());
        assert!(plan(!0xfff, IDENTITY_MAP_1G_BYTES).is_err());
    }

    #[test]
    fn sizes_format() {
        assert_eq!(fmt_size(256 << 20), "256M");
        assert_eq!(fmt_size(3 << 30), "3G");
        assert_eq!(fmt_size(1000), "1000");
    }
}
