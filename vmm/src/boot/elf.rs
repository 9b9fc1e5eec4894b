//! Parsing and validating a static x86-64 ELF executable to load into guest RAM.
//!
//! Only what a freestanding image needs: an `ET_EXEC` ELF64 little-endian x86-64 file whose
//! `PT_LOAD` segments have identical virtual and physical addresses (the guest runs on an
//! identity map), lie inside RAM, stay clear of the boot data and the stacks, and do not
//! overlap each other; the entry point must lie in an executable segment.

use std::ops::Range;

/// Errors of ELF validation. Each names the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than an ELF header.
    #[error("not an ELF file: only {len} bytes long")]
    TooShort {
        /// File length.
        len: usize,
    },
    /// Wrong magic.
    #[error("not an ELF file: bad magic {magic:02x?}")]
    BadMagic {
        /// The first four bytes.
        magic: [u8; 4],
    },
    /// Not ELF64.
    #[error("unsupported ELF class {0} (need ELF64)")]
    NotElf64(u8),
    /// Not little-endian.
    #[error("unsupported ELF data encoding {0} (need little-endian)")]
    NotLittleEndian(u8),
    /// Not x86-64.
    #[error("unsupported ELF machine {0} (need x86-64, 62)")]
    NotX86_64(u16),
    /// Not an executable.
    #[error("unsupported ELF type {0} (need a static executable, ET_EXEC = 2)")]
    NotExec(u16),
    /// Bad program-header table.
    #[error("bad program-header table: {0}")]
    BadPhdrs(&'static str),
    /// No loadable segment.
    #[error("no PT_LOAD segment")]
    NoLoadSegments,
    /// A segment's file range is outside the file.
    #[error("segment {index}: file range {offset:#x}+{filesz:#x} is outside the {len}-byte file")]
    SegmentOutsideFile {
        /// Program header index.
        index: usize,
        /// p_offset.
        offset: u64,
        /// p_filesz.
        filesz: u64,
        /// File length.
        len: usize,
    },
    /// p_filesz > p_memsz.
    #[error("segment {index}: p_filesz {filesz:#x} exceeds p_memsz {memsz:#x}")]
    FileszOverMemsz {
        /// Program header index.
        index: usize,
        /// p_filesz.
        filesz: u64,
        /// p_memsz.
        memsz: u64,
    },
    /// vaddr != paddr.
    #[error(
        "segment {index}: p_vaddr {vaddr:#x} differs from p_paddr {paddr:#x}; the guest runs \
         on an identity map, so link the image with virtual = physical addresses"
    )]
    NotIdentity {
        /// Program header index.
        index: usize,
        /// p_vaddr.
        vaddr: u64,
        /// p_paddr.
        paddr: u64,
    },
    /// Outside guest RAM.
    #[error("segment {index}: {start:#x}..{end:#x} is not inside guest RAM")]
    OutsideRam {
        /// Program header index.
        index: usize,
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// Overlaps boot data or stacks.
    #[error(
        "segment {index}: {start:#x}..{end:#x} overlaps the VMM's {what} at \
         {reserved_start:#x}..{reserved_end:#x}"
    )]
    OverlapsReserved {
        /// Program header index.
        index: usize,
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
        /// Which reserved range.
        what: &'static str,
        /// Its start.
        reserved_start: u64,
        /// Its end.
        reserved_end: u64,
    },
    /// Two segments overlap.
    #[error("segments {a} and {b} overlap")]
    SegmentsOverlap {
        /// First program header index.
        a: usize,
        /// Second program header index.
        b: usize,
    },
    /// Entry not in an executable segment.
    #[error("entry point {0:#x} is not inside an executable PT_LOAD segment")]
    BadEntry(u64),
}

/// One segment to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub gpa: u64,
    /// Bytes of the file to copy there.
    pub file_range: Range<usize>,
    /// Size in memory (the tail past the file bytes is zero).
    pub memsz: u64,
}

/// A validated image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Entry point (guest-physical = virtual).
    pub entry: u64,
    /// Segments to load.
    pub segments: Vec<Segment>,
}

/// Where a loaded image may go: inside `ram`, outside every range of `reserved`.
pub struct Placement<'a> {
    /// Guest RAM ranges `[start, end)`.
    pub ram: &'a [Range<u64>],
    /// Ranges the VMM owns, with names for messages.
    pub reserved: &'a [(&'static str, Range<u64>)],
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const MAX_PHDRS: usize = 256;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Parses and validates `bytes`.
pub fn parse(bytes: &[u8], placement: &Placement<'_>) -> Result<Image, ElfError> {
    if bytes.len() < EHDR_SIZE {
        return Err(ElfError::TooShort { len: bytes.len() });
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != *b"\x7fELF" {
        return Err(ElfError::BadMagic { magic });
    }
    if bytes[4] != 2 {
        return Err(ElfError::NotElf64(bytes[4]));
    }
    if bytes[5] != 1 {
        return Err(ElfError::NotLittleEndian(bytes[5]));
    }
    let e_type = u16_at(bytes, 16);
    let e_machine = u16_at(bytes, 18);
    if e_machine != 62 {
        return Err(ElfError::NotX86_64(e_machine));
    }
    if e_type != 2 {
        return Err(ElfError::NotExec(e_type));
    }
    let entry = u64_at(bytes, 24);
    let phoff = u64_at(bytes, 32);
    let phentsize = usize::from(u16_at(bytes, 54));
    let phnum = usize::from(u16_at(bytes, 56));
    if phnum == 0 {
        return Err(ElfError::NoLoadSegments);
    }
    if phentsize != PHDR_SIZE {
        return Err(ElfError::BadPhdrs("e_phentsize is not 56"));
    }
    if phnum > MAX_PHDRS {
        return Err(ElfError::BadPhdrs("more than 256 program headers"));
    }
    let table_end = usize::try_from(phoff)
        .ok()
        .and_then(|o| o.checked_add(phnum * PHDR_SIZE));
    let phoff = match table_end {
        Some(end) if end <= bytes.len() => phoff as usize,
        _ => return Err(ElfError::BadPhdrs("table lies outside the file")),
    };

    let mut segments: Vec<(usize, Segment, bool)> = Vec::new();
    for index in 0..phnum {
        let ph = &bytes[phoff + index * PHDR_SIZE..phoff + (index + 1) * PHDR_SIZE];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let flags = u32_at(ph, 4);
        let offset = u64_at(ph, 8);
        let vaddr = u64_at(ph, 16);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(ElfError::FileszOverMemsz {
                index,
                filesz,
                memsz,
            });
        }
        let file_end = offset.checked_add(filesz);
        let file_range = match file_end {
            Some(end) if end <= bytes.len() as u64 => offset as usize..end as usize,
            _ => {
                return Err(ElfError::SegmentOutsideFile {
                    index,
                    offset,
                    filesz,
                    len: bytes.len(),
                })
            }
        };
        if vaddr != paddr {
            return Err(ElfError::NotIdentity {
                index,
                vaddr,
                paddr,
            });
        }
        let start = paddr;
        let end = match paddr.checked_add(memsz) {
            Some(end) => end,
            None => {
                return Err(ElfError::OutsideRam {
                    index,
                    start,
                    end: u64::MAX,
                })
            }
        };
        if !placement
            .ram
            .iter()
            .any(|r| start >= r.start && end <= r.end)
        {
            return Err(ElfError::OutsideRam { index, start, end });
        }
        for (what, r) in placement.reserved {
            if start < r.end && r.start < end {
                return Err(ElfError::OverlapsReserved {
                    index,
                    start,
                    end,
                    what,
                    reserved_start: r.start,
                    reserved_end: r.end,
                });
            }
        }
        for (other, seg, _) in &segments {
            if start < seg.gpa + seg.memsz && seg.gpa < end {
                return Err(ElfError::SegmentsOverlap {
                    a: *other,
                    b: index,
                });
            }
        }
        segments.push((
            index,
            Segment {
                gpa: paddr,
                file_range,
                memsz,
            },
            flags & PF_X != 0,
        ));
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadSegments);
    }
    if !segments
        .iter()
        .any(|(_, s, x)| *x && entry >= s.gpa && entry < s.gpa + s.memsz)
    {
        return Err(ElfError::BadEntry(entry));
    }
    Ok(Image {
        entry,
        segments: segments.into_iter().map(|(_, s, _)| s).collect(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 x86-64 executable with the given (vaddr, paddr, filesz, memsz,
    /// flags) segments.
    pub(crate) fn build_elf(entry: u64, segs: &[(u64, u64, u64, u64, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE + segs.len() * PHDR_SIZE];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let mut data_off = b.len() as u64;
        let mut data = Vec::new();
        for (i, &(vaddr, paddr, filesz, memsz, flags)) in segs.iter().enumerate() {
            let o = EHDR_SIZE + i * PHDR_SIZE;
            b[o..o + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            b[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&data_off.to_le_bytes());
            b[o + 16..o + 24].copy_from_slice(&vaddr.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&paddr.to_le_bytes());
            b[o + 32..o + 40].copy_from_slice(&filesz.to_le_bytes());
            b[o + 40..o + 48].copy_from_slice(&memsz.to_le_bytes());
            data.extend(std::iter::repeat_n(0x90u8, filesz as usize));
            data_off += filesz;
        }
        b.extend(data);
        b
    }

    #[allow(clippy::single_range_in_vec_init)]
    const RAM: &[Range<u64>] = &[0..0x1000_0000];
    const RESERVED: &[(&str, Range<u64>)] = &[
        ("boot data", 0..0x10_0000),
        ("vCPU stacks", 0x40_0000..0x80_0000),
    ];
    fn place() -> Placement<'static> {
        Placement {
            ram: RAM,
            reserved: RESERVED,
        }
    }

    #[test]
    fn accepts_a_good_image() {
        let elf = build_elf(
            0x10_0000,
            &[
                (0x10_0000, 0x10_0000, 0x100, 0x100, 5),
                (0x10_1000, 0x10_1000, 0x10, 0x2000, 6),
            ],
        );
        let img = parse(&elf, &place()).unwrap();
        assert_eq!(img.entry, 0x10_0000);
        assert_eq!(img.segments.len(), 2);
        assert_eq!(img.segments[1].memsz, 0x2000);
    }

    #[test]
    fn rejects_bad_files() {
        let p = place();
        assert_eq!(parse(b"hello", &p), Err(ElfError::TooShort { len: 5 }));
        assert!(matches!(
            parse(&[0u8; 100], &p),
            Err(ElfError::BadMagic { .. })
        ));
        let good = build_elf(0x10_0000, &[(0x10_0000, 0x10_0000, 0x10, 0x10, 5)]);

        let mut e = good.clone();
        e[4] = 1;
        assert_eq!(parse(&e, &p), Err(ElfError::NotElf64(1)));
        let mut e = good.clone();
        e[18] = 3;
        e[19] = 0;
        assert_eq!(parse(&e, &p), Err(ElfError::NotX86_64(3)));
        let mut e = good.clone();
        e[16] = 3;
        assert_eq!(parse(&e, &p), Err(ElfError::NotExec(3)));
        let mut e = good.clone();
        e.truncate(EHDR_SIZE + 10);
        assert!(matches!(parse(&e, &p), Err(ElfError::BadPhdrs(_))));
        let mut e = good.clone();
        e.truncate(e.len() - 1);
        assert!(matches!(
            parse(&e, &p),
            Err(ElfError::SegmentOutsideFile { .. })
        ));
    }

    #[test]
    fn rejects_bad_placement() {
        let p = place();
        let e = build_elf(0x1000, &[(0x1000, 0x1000, 0x10, 0x10, 5)]);
        assert!(matches!(
            parse(&e, &p),
            Err(ElfError::OverlapsReserved {
                what: "boot data",
                ..
            })
        ));
        let e = build_elf(0x3f_f000, &[(0x3f_f000, 0x3f_f000, 0x10, 0x2000, 5)]);
        assert!(matches!(
            parse(&e, &p),
            Err(ElfError::OverlapsReserved {
                what: "vCPU stacks",
                ..
            })
        ));
        let e = build_elf(0x2000_0000, &[(0x2000_0000, 0x2000_0000, 0x10, 0x10, 5)]);
        assert!(matches!(parse(&e, &p), Err(ElfError::OutsideRam { .. })));
        let e = build_elf(
            0xffff_ffff_8100_0000,
            &[(0xffff_ffff_8100_0000, 0x100_0000, 0x10, 0x10, 5)],
        );
        assert!(matches!(parse(&e, &p), Err(ElfError::NotIdentity { .. })));
        let e = build_elf(u64::MAX - 4, &[(u64::MAX - 4, u64::MAX - 4, 0, 0x10, 5)]);
        assert!(matches!(parse(&e, &p), Err(ElfError::OutsideRam { .. })));
        let e = build_elf(
            0x10_0000,
            &[
                (0x10_0000, 0x10_0000, 0x10, 0x2000, 5),
                (0x10_1000, 0x10_1000, 0x10, 0x10, 6),
            ],
        );
        assert_eq!(parse(&e, &p), Err(ElfError::SegmentsOverlap { a: 0, b: 1 }));
        let e = build_elf(0x10_0000, &[(0x10_0000, 0x10_0000, 0x10, 0x10, 6)]);
        assert_eq!(parse(&e, &p), Err(ElfError::BadEntry(0x10_0000)));
        let e = build_elf(0x10_0000, &[(0x10_0000, 0x10_0000, 0x20, 0x10, 5)]);
        assert!(matches!(
            parse(&e, &p),
            Err(ElfError::FileszOverMemsz { .. })
        ));
        let e = build_elf(0x10_0000, &[]);
        assert_eq!(parse(&e, &p), Err(ElfError::NoLoadSegments));
    }
}
