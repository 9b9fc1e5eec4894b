//! First touches on hosts that do not say where they happened.
//!
//! With userfaultfd in SIGBUS mode, a guest's first touch of a missing page makes `KVM_RUN`
//! fail. Some hosts turn that into `KVM_EXIT_MMIO` at the faulting address (the access is
//! emulated), some into `KVM_EXIT_MEMORY_FAULT` with the address; others (measured here: the
//! `kvm_pvm` module, shadow paging) just return `-EFAULT` with no address at all. For those,
//! the vCPU thread works the address out itself: it decodes the instruction at `rip` (iced-x86),
//! computes every memory operand's address from the registers, translates each through the
//! guest's page tables (`KVM_TRANSLATE`), populates what is missing, and re-enters; the
//! instruction then re-executes. Instruction fetches and implicit stack accesses count too.
//!
//! Every vCPU ioctl costs a `vcpu_load`/`vcpu_put` (MSR reads and CR4 writes that trap to the
//! outer hypervisor when KVM is nested: about as much as the fault itself), so the fast path
//! makes none beyond `KVM_RUN`:
//!
//! - the registers come from `kvm_run`'s synced-register area (`KVM_CAP_SYNC_REGS`, filled by
//!   the same `KVM_RUN` that failed) instead of `KVM_GET_REGS`/`KVM_GET_SREGS`;
//! - while CR3 points at the VMM's own boot page tables, which identity-map guest-physical
//!   space, a linear address is taken as its guest-physical address without `KVM_TRANSLATE`.
//!
//! A guest that rewrote those tables in place would make the guess wrong: then the guessed
//! pages are present (or were just populated) but the fault repeats, and the next attempt,
//! finding nothing to populate, translates every address properly. So a wrong guess costs an
//! extra round trip, never a wrong result.
#![deny(unsafe_code)]

use iced_x86::{
    Decoder, DecoderOptions, Instruction, InstructionInfoFactory, MemorySize, Mnemonic, OpAccess,
    OpKind, Register,
};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use crate::memory::address_space::PAGE;
use crate::memory::{Access, FaultError, PageState};
use crate::vcpu::{GuardedSpace, GuestMemoryExits};

/// The legacy area plus the header of an XSAVE image: what every XSAVE-family instruction
/// touches whatever features it saves.
const XSAVE_MIN_BYTES: u64 = 576;

/// Why a bare `-EFAULT` (or an emulation failure) could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum EfaultError {
    /// Reading the registers failed.
    #[error("{what} failed: {source}")]
    Registers {
        /// The ioctl.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// `KVM_TRANSLATE` failed.
    #[error("KVM_TRANSLATE of guest address {linear:#x} failed: {source}")]
    Translate {
        /// The linear address.
        linear: u64,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The guest's page tables do not map an address the instruction uses.
    #[error("guest address {linear:#x} is not mapped by the guest's page tables")]
    NotMapped {
        /// The linear address.
        linear: u64,
    },
    /// The instruction itself lies where no region is.
    #[error("the instruction at rip {rip:#x} lies at gpa {gpa:#x}, which no region covers")]
    FetchFromHole {
        /// Where the vCPU is.
        rip: u64,
        /// The instruction's guest-physical address.
        gpa: u64,
    },
    /// The bytes at `rip` are no instruction.
    #[error("cannot decode the instruction at rip {rip:#x}: {bytes:02x?}")]
    Decode {
        /// Where the vCPU is.
        rip: u64,
        /// What is there.
        bytes: [u8; 15],
    },
    /// Populating a page failed on the host.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// The instruction touches a hole or writes a read-only page, and is not one the VMM
    /// completes itself.
    #[error(
        "cannot complete {instruction}: it {what} gpa {gpa:#x}, and the VMM completes only \
         plain loads and stores (MOV, MOVZX, MOVSX, and string LODS, STOS, MOVS) there"
    )]
    Unemulated {
        /// The instruction, as `describe` gives it.
        instruction: String,
        /// "touches (no region covers it)" or "writes read-only".
        what: &'static str,
        /// The page.
        gpa: u64,
    },
    /// Writing the registers back failed.
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
}

/// What resolving an unannotated `-EFAULT` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Pages the instruction touches that were missing and are now populated.
    pub populated: u64,
    /// Pages the instruction touches, in all.
    pub pages: u64,
    /// The first page it touches that no region covers, if any.
    pub hole: Option<u64>,
    /// The first read-only page it writes, if any.
    pub readonly: Option<u64>,
    /// The instruction, for diagnoses: mnemonic and bytes.
    pub instruction: String,
    /// The VMM completed the instruction itself (it touched a hole or wrote a read-only
    /// page): registers and `rip` are updated, the guest goes on after it.
    pub emulated: bool,
}

impl Resolved {
    /// Why nothing could be done for the instruction (when `populated` is 0), in words.
    pub fn stuck_reason(&self) -> String {
        let what = match (self.hole, self.readonly) {
            (Some(gpa), _) => format!("it touches gpa {gpa:#x}, which no region covers"),
            (None, Some(gpa)) => format!("it writes gpa {gpa:#x}, which is read-only"),
            (None, None) => format!(
                "all {} pages it touches are present, so the fault is not one a first touch \
                 explains",
                self.pages
            ),
        };
        format!("cannot complete {}: {what}", self.instruction)
    }
}

fn reg_value(reg: Register, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<u64> {
    use Register::*;
    let full = reg.full_register();
    let v = match full {
        RAX => regs.rax,
        RBX => regs.rbx,
        RCX => regs.rcx,
        RDX => regs.rdx,
        RSI => regs.rsi,
        RDI => regs.rdi,
        RSP => regs.rsp,
        RBP => regs.rbp,
        R8 => regs.r8,
        R9 => regs.r9,
        R10 => regs.r10,
        R11 => regs.r11,
        R12 => regs.r12,
        R13 => regs.r13,
        R14 => regs.r14,
        R15 => regs.r15,
        RIP => regs.rip,
        ES => sregs.es.base,
        CS => sregs.cs.base,
        SS => sregs.ss.base,
        DS => sregs.ds.base,
        FS => sregs.fs.base,
        GS => sregs.gs.base,
        _ => return Option::None,
    };
    let bits = reg.size() * 8;
    Some(if bits >= 64 || reg.is_segment_register() {
        v
    } else {
        v & ((1u64 << bits) - 1)
    })
}

/// Element `index` (of `size` bytes) of vector register `reg`, from a standard-format XSAVE
/// image (`KVM_GET_XSAVE`): XMM0-15 in the legacy area, the upper halves of YMM0-15 in the
/// AVX component. ZMM registers and XMM16-31 are not read (`None`).
fn vector_element(xsave: &[u8], reg: Register, index: usize, size: usize) -> Option<u64> {
    const XMM_OFFSET: usize = 160;
    const YMM_HI_OFFSET: usize = 576;
    let n = reg.number();
    if !(reg.is_xmm() || reg.is_ymm()) || n >= 16 || !(size == 4 || size == 8) {
        return None;
    }
    let at = index * size;
    let lane = if at < 16 {
        XMM_OFFSET + 16 * n + at
    } else if reg.is_ymm() && at + size <= 32 {
        YMM_HI_OFFSET + 16 * n + (at - 16)
    } else {
        return None;
    };
    let bytes = xsave.get(lane..lane + size)?;
    let mut v = [0u8; 8];
    v[..size].copy_from_slice(bytes);
    Some(u64::from_le_bytes(v))
}

fn translate(fd: &VcpuFd, linear: u64) -> Result<u64, EfaultError> {
    let t = fd
        .translate_gva(linear)
        .map_err(|source| EfaultError::Translate { linear, source })?;
    if t.valid == 0 {
        return Err(EfaultError::NotMapped { linear });
    }
    Ok(t.physical_address)
}

/// How a vCPU resolves bare `-EFAULT`s (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolver {
    /// `kvm_run` carries the registers after each exit (`KVM_CAP_SYNC_REGS`, enabled).
    pub sync_regs: bool,
    /// The VMM's boot page tables (CR3 value) ...
    pub identity_cr3: u64,
    /// ... identity-map `[0, identity_limit)`.
    pub identity_limit: u64,
    /// The largest XSAVE image the guest's CPU can write (CPUID leaf 0xD, ECX): the footprint
    /// of an XSAVE-family instruction, which the decoder cannot size.
    pub xsave_bytes: u64,
}

/// The registers an instruction's addresses are computed from.
struct Regs {
    regs: kvm_regs,
    sregs: kvm_sregs,
}

impl Resolver {
    /// Works out which pages the instruction at `rip` touches and populates the missing ones,
    /// guessing translations while the guest runs on the VMM's identity map, and translating
    /// properly when the guess made no progress (or does not apply).
    pub fn resolve(&self, fd: &VcpuFd, mem: &GuardedSpace<'_>) -> Result<Resolved, EfaultError> {
        let (regs, sregs) = if self.sync_regs {
            let s = fd.sync_regs();
            (s.regs, s.sregs)
        } else {
            let regs = fd.get_regs().map_err(|source| EfaultError::Registers {
                what: "KVM_GET_REGS",
                source,
            })?;
            let sregs = fd.get_sregs().map_err(|source| EfaultError::Registers {
                what: "KVM_GET_SREGS",
                source,
            })?;
            (regs, sregs)
        };
        let r = Regs { regs, sregs };
        const CR0_PG: u64 = 1 << 31;
        const EFER_LMA: u64 = 1 << 10;
        let identity = sregs.cr3 & !0xfff == self.identity_cr3
            && sregs.cr0 & CR0_PG != 0
            && sregs.efer & EFER_LMA != 0;
        if identity {
            let limit = self.identity_limit;
            let guess = |linear: u64| -> Result<u64, EfaultError> {
                if linear < limit {
                    Ok(linear)
                } else {
                    translate(fd, linear)
                }
            };
            // A decoding or translation failure under the guess is retried properly too.
            if let Ok(res) = self.resolve_with(&guess, fd, &r, mem, false) {
                if res.populated > 0 {
                    return Ok(res);
                }
            }
        }
        self.resolve_with(&|linear| translate(fd, linear), fd, &r, mem, true)
    }

    /// [`Resolver::resolve`] with a given translation of linear to guest-physical addresses.
    /// With `complete`, an instruction that populated nothing but touches a hole or writes
    /// a read-only page is completed by the VMM ([`emulate`]).
    fn resolve_with(
        &self,
        translate: &dyn Fn(u64) -> Result<u64, EfaultError>,
        fd: &VcpuFd,
        r: &Regs,
        mem: &GuardedSpace<'_>,
        complete: bool,
    ) -> Result<Resolved, EfaultError> {
        let (regs, sregs) = (&r.regs, &r.sregs);
        let mut out = Resolved {
            populated: 0,
            pages: 0,
            hole: None,
            readonly: None,
            instruction: String::new(),
            emulated: false,
        };
        // `optional` parts (beyond what the instruction surely touches) are populated where a
        // region covers them, and ignored where none does.
        let touch = |linear: u64,
                     len: u64,
                     write: bool,
                     optional: bool,
                     out: &mut Resolved|
         -> Result<(), EfaultError> {
            let last = linear.wrapping_add(len.max(1) - 1);
            let mut page = linear & !(PAGE - 1);
            loop {
                let gpa = translate(page.max(linear))? & !(PAGE - 1);
                out.pages += 1;
                match mem.fault_page(gpa, write)? {
                    PageState::Populated => out.populated += 1,
                    PageState::Present => {}
                    PageState::Hole if optional => {}
                    PageState::Hole => {
                        out.hole.get_or_insert(gpa);
                    }
                    PageState::ReadOnly => {
                        out.readonly.get_or_insert(gpa);
                    }
                }
                if page >= (last & !(PAGE - 1)) {
                    break;
                }
                page += PAGE;
            }
            Ok(())
        };
        // The instruction itself: its first page, and the next one if it may run into it.
        let rip = sregs.cs.base.wrapping_add(regs.rip);
        let rip_gpa = translate(rip)?;
        if mem.fault_page(rip_gpa & !(PAGE - 1), false)? == PageState::Hole {
            return Err(EfaultError::FetchFromHole {
                rip: regs.rip,
                gpa: rip_gpa,
            });
        }
        let mut bytes = [0u8; 15];
        let first = (PAGE - rip % PAGE).min(15) as usize;
        mem.read_guest(rip_gpa, &mut bytes[..first])?;
        if first < 15 {
            // An open-bus next page reads as all-ones: decoding then fails if it matters.
            let next = rip + first as u64;
            touch(next, 1, false, true, &mut out)?;
            mem.read_guest(translate(next)?, &mut bytes[first..])?;
        }
        let bitness = if sregs.cs.l != 0 {
            64
        } else if sregs.cs.db != 0 {
            32
        } else {
            16
        };
        let mut decoder = Decoder::with_ip(bitness, &bytes, regs.rip, DecoderOptions::NONE);
        let instr = decoder.decode();
        if instr.is_invalid() {
            return Err(EfaultError::Decode {
                rip: regs.rip,
                bytes,
            });
        }
        out.instruction = describe(&instr, &bytes);
        // A gather or scatter's addresses come from a vector register: read them only then.
        let xsave = if instr.is_vsib() {
            fd.get_xsave().ok().map(|x| {
                x.region
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect::<Vec<u8>>()
            })
        } else {
            None
        };
        // One factory per vCPU thread: creating one allocates, and this is the fault path.
        FACTORY.with_borrow_mut(|factory| {
            let info = factory.info(&instr);
            for m in info.used_memory() {
                let write = matches!(
                    m.access(),
                    OpAccess::Write
                        | OpAccess::ReadWrite
                        | OpAccess::CondWrite
                        | OpAccess::ReadCondWrite
                );
                let value = |reg: Register, index: usize, size: usize| {
                    if reg.is_vector_register() {
                        vector_element(xsave.as_deref()?, reg, index, size)
                    } else {
                        reg_value(reg, regs, sregs)
                    }
                };
                let size = m.memory_size().size() as u64;
                if m.vsib_size() != 0 {
                    // One element per index lane; masked-off lanes may point anywhere, so
                    // every element is optional.
                    let lanes = (m.index().size() / m.vsib_size() as usize).max(1);
                    for lane in 0..lanes {
                        if let Some(va) = m.virtual_address(lane, value) {
                            touch(va, size.max(1), write, true, &mut out)?;
                        }
                    }
                    continue;
                }
                let Some(va) = m.virtual_address(0, value) else {
                    continue;
                };
                if matches!(m.memory_size(), MemorySize::Xsave | MemorySize::Xsave64) {
                    // The decoder cannot size an XSAVE image: its legacy area and header are
                    // always touched, the rest up to the largest image the CPU can write.
                    touch(va, XSAVE_MIN_BYTES, write, false, &mut out)?;
                    let rest = self.xsave_bytes.saturating_sub(XSAVE_MIN_BYTES);
                    if rest > 0 {
                        touch(va + XSAVE_MIN_BYTES, rest, write, true, &mut out)?;
                    }
                    continue;
                }
                // A REP string instruction's operands come unsized: the element that faulted
                // is the one at rsi/rdi now, of the instruction's operand size.
                let size = if size == 0 {
                    instr.memory_size().size() as u64
                } else {
                    size
                };
                touch(va, size.max(1), write, false, &mut out)?;
            }
            Ok::<(), EfaultError>(())
        })?;
        let special = out
            .hole
            .map(|g| (g, "touches (no region covers it)"))
            .or(out.readonly.map(|g| (g, "writes read-only")));
        if let (true, 0, Some((gpa, what))) = (complete, out.populated, special) {
            let mut regs = *regs;
            let done = emulate(&instr, &mut regs, sregs, translate, mem)?;
            if !done {
                return Err(EfaultError::Unemulated {
                    instruction: out.instruction,
                    what,
                    gpa,
                });
            }
            fd.set_regs(&regs).map_err(EfaultError::SetRegs)?;
            out.emulated = true;
        }
        Ok(out)
    }
}

/// Most elements of a REP string instruction completed per exit: the guest re-executes the
/// instruction for the rest (with rcx, rsi and rdi advanced), natively where memory allows.
const MAX_EMULATED_ELEMENTS: u64 = 4096;

/// Completes `instr` against the address space (open bus reads all-ones, drops writes to
/// holes and to read-only regions, counting each), writing its results to `regs` and
/// advancing `rip`. Returns false, changing nothing, for an instruction it does not complete.
fn emulate(
    instr: &Instruction,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    translate: &dyn Fn(u64) -> Result<u64, EfaultError>,
    mem: &GuardedSpace<'_>,
) -> Result<bool, EfaultError> {
    use Mnemonic::*;
    let seg_base = |seg: Register| reg_value(seg, regs, sregs).unwrap_or(0);
    match instr.mnemonic() {
        Mov | Movzx | Movsx | Movsxd => {
            let (k0, k1) = (instr.op0_kind(), instr.op1_kind());
            let linear = |regs: &kvm_regs| {
                instr.virtual_address(if k0 == OpKind::Memory { 0 } else { 1 }, 0, |r, _, _| {
                    reg_value(r, regs, sregs)
                })
            };
            let Some(va) = linear(regs) else {
                return Ok(false);
            };
            let size = instr.memory_size().size();
            if !(1..=8).contains(&size) {
                return Ok(false);
            }
            if k0 == OpKind::Memory {
                // A store: of a register or an immediate.
                let value = match k1 {
                    OpKind::Register => match reg_value(instr.op1_register(), regs, sregs) {
                        Some(v) => v,
                        None => return Ok(false),
                    },
                    OpKind::Immediate8
                    | OpKind::Immediate16
                    | OpKind::Immediate32
                    | OpKind::Immediate8to64
                    | OpKind::Immediate32to64
                    | OpKind::Immediate64 => instr.immediate(1),
                    _ => return Ok(false),
                };
                if instr.mnemonic() != Mov {
                    return Ok(false);
                }
                access(va, &value.to_le_bytes()[..size], None, translate, mem)?;
            } else if k1 == OpKind::Memory && k0 == OpKind::Register {
                let dst = instr.op0_register();
                if !dst.is_gpr() {
                    return Ok(false);
                }
                let mut buf = [0u8; 8];
                access(va, &[], Some(&mut buf[..size]), translate, mem)?;
                let raw = u64::from_le_bytes(buf);
                let value = match instr.mnemonic() {
                    Movsx | Movsxd => sign_extend(raw, size),
                    _ => raw,
                };
                set_reg(regs, dst, value);
            } else {
                return Ok(false);
            }
            regs.rip = instr.next_ip();
            Ok(true)
        }
        Stosb | Stosw | Stosd | Stosq | Lodsb | Lodsw | Lodsd | Lodsq | Movsb | Movsw | Movsd
        | Movsq => {
            let size = instr.memory_size().size() as u64;
            // The string forms with 64-bit addressing only (`movsd` is also an SSE move, whose
            // operands are a register and plain memory).
            let string64 = (0..instr.op_count())
                .any(|i| matches!(instr.op_kind(i), OpKind::MemoryESRDI | OpKind::MemorySegRSI));
            let narrower = (0..instr.op_count()).any(|i| {
                matches!(
                    instr.op_kind(i),
                    OpKind::MemoryESEDI
                        | OpKind::MemoryESDI
                        | OpKind::MemorySegESI
                        | OpKind::MemorySegSI
                )
            });
            if !string64 || narrower || !(1..=8).contains(&size) {
                return Ok(false);
            }
            let rep = instr.has_rep_prefix() || instr.has_repe_prefix();
            let backwards = regs.rflags & (1 << 10) != 0;
            let step = |v: u64| {
                if backwards {
                    v.wrapping_sub(size)
                } else {
                    v.wrapping_add(size)
                }
            };
            let total = if rep { regs.rcx } else { 1 };
            let n = total.min(MAX_EMULATED_ELEMENTS);
            let acc = Register::RAX;
            let src_base = seg_base(instr.memory_segment());
            let stores = matches!(
                instr.mnemonic(),
                Stosb | Stosw | Stosd | Stosq | Movsb | Movsw | Movsd | Movsq
            );
            let loads_src = matches!(
                instr.mnemonic(),
                Lodsb | Lodsw | Lodsd | Lodsq | Movsb | Movsw | Movsd | Movsq
            );
            for _ in 0..n {
                let mut buf = [0u8; 8];
                if loads_src {
                    let va = src_base.wrapping_add(regs.rsi);
                    access(va, &[], Some(&mut buf[..size as usize]), translate, mem)?;
                    regs.rsi = step(regs.rsi);
                } else {
                    buf = regs.rax.to_le_bytes();
                }
                if stores {
                    let va = sregs.es.base.wrapping_add(regs.rdi);
                    access(va, &buf[..size as usize], None, translate, mem)?;
                    regs.rdi = step(regs.rdi);
                } else {
                    let reg = match size {
                        1 => Register::AL,
                        2 => Register::AX,
                        4 => Register::EAX,
                        _ => acc,
                    };
                    set_reg(regs, reg, u64::from_le_bytes(buf));
                }
            }
            if rep {
                regs.rcx -= n;
            }
            if regs.rcx == 0 || !rep {
                regs.rip = instr.next_ip();
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// One access of at most 8 bytes at linear address `va`: a store of `src`, or a load into
/// `dst`; split at a page boundary (each page translated on its own).
fn access(
    va: u64,
    src: &[u8],
    dst: Option<&mut [u8]>,
    translate: &dyn Fn(u64) -> Result<u64, EfaultError>,
    mem: &GuardedSpace<'_>,
) -> Result<(), EfaultError> {
    let len = dst.as_ref().map_or(src.len(), |d| d.len()) as u64;
    let first = (PAGE - va % PAGE).min(len);
    let parts = [(va, 0, first), (va.wrapping_add(first), first, len - first)];
    match dst {
        Some(d) => {
            for (at, off, n) in parts.into_iter().filter(|p| p.2 > 0) {
                let (off, n) = (off as usize, n as usize);
                mem.mmio(translate(at)?, Access::Read(&mut d[off..off + n]))?;
            }
        }
        None => {
            for (at, off, n) in parts.into_iter().filter(|p| p.2 > 0) {
                let (off, n) = (off as usize, n as usize);
                mem.mmio(translate(at)?, Access::Write(&src[off..off + n]))?;
            }
        }
    }
    Ok(())
}

fn sign_extend(v: u64, size: usize) -> u64 {
    let shift = 64 - 8 * size as u32;
    (((v << shift) as i64) >> shift) as u64
}

/// Writes `value` to general-purpose register `reg` as the CPU would: a 32-bit write clears
/// the upper half, 8- and 16-bit writes keep the other bits (AH..BH are bits 8-15).
fn set_reg(regs: &mut kvm_regs, reg: Register, value: u64) {
    use Register::*;
    let slot = match reg.full_register() {
        RAX => &mut regs.rax,
        RBX => &mut regs.rbx,
        RCX => &mut regs.rcx,
        RDX => &mut regs.rdx,
        RSI => &mut regs.rsi,
        RDI => &mut regs.rdi,
        RSP => &mut regs.rsp,
        RBP => &mut regs.rbp,
        R8 => &mut regs.r8,
        R9 => &mut regs.r9,
        R10 => &mut regs.r10,
        R11 => &mut regs.r11,
        R12 => &mut regs.r12,
        R13 => &mut regs.r13,
        R14 => &mut regs.r14,
        R15 => &mut regs.r15,
        _ => return,
    };
    *slot = match (reg.size(), reg) {
        (8, _) => value,
        (4, _) => value & 0xffff_ffff,
        (2, _) => (*slot & !0xffff) | (value & 0xffff),
        (1, AH | CH | DH | BH) => (*slot & !0xff00) | ((value & 0xff) << 8),
        _ => (*slot & !0xff) | (value & 0xff),
    };
}

/// The instruction's mnemonic and bytes, for diagnoses.
fn describe(instr: &Instruction, bytes: &[u8; 15]) -> String {
    let len = instr.len().min(15);
    let hex: Vec<String> = bytes[..len].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "`{}` at rip {:#x} (bytes {})",
        format!("{:?}", instr.mnemonic()).to_lowercase(),
        instr.ip(),
        hex.join(" ")
    )
}

thread_local! {
    static FACTORY: std::cell::RefCell<InstructionInfoFactory> =
        std::cell::RefCell::new(InstructionInfoFactory::new());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_values_are_sized() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.fs.base = 0x7000;
        assert_eq!(
            reg_value(Register::RAX, &regs, &sregs),
            Some(0x1122_3344_5566_7788)
        );
        assert_eq!(reg_value(Register::EAX, &regs, &sregs), Some(0x5566_7788));
        assert_eq!(reg_value(Register::AX, &regs, &sregs), Some(0x7788));
        assert_eq!(reg_value(Register::FS, &regs, &sregs), Some(0x7000));
        assert_eq!(reg_value(Register::XMM0, &regs, &sregs), None);
    }

    #[test]
    fn operands_of_a_store_and_a_push() {
        // mov [rax+rbx*8+0x10], rcx ; then push rdx
        let code = [0x48, 0x89, 0x4c, 0xd8, 0x10, 0x52];
        let regs = kvm_regs {
            rax: 0x10_0000,
            rbx: 2,
            rsp: 0x40_0000,
            ..Default::default()
        };
        let sregs = kvm_sregs::default();
        let mut d = Decoder::with_ip(64, &code, 0x1000, DecoderOptions::NONE);
        let mut f = InstructionInfoFactory::new();
        let i = d.decode();
        let m = f.info(&i).used_memory().to_vec();
        let va: Vec<_> = m
            .iter()
            .filter_map(|m| m.virtual_address(0, |r, _, _| reg_value(r, &regs, &sregs)))
            .collect();
        assert_eq!(va, vec![0x10_0000 + 16 + 0x10]);
        assert_eq!(m[0].access(), OpAccess::Write);
        let i = d.decode();
        let m = f.info(&i).used_memory().to_vec();
        let va = m[0].virtual_address(0, |r, _, _| reg_value(r, &regs, &sregs));
        assert_eq!(va, Some(0x40_0000 - 8), "push writes below rsp");
    }

    /// The footprint the decoder gives each class of instruction whose memory use is unusual:
    /// every class below has the size the CPU really touches, except the XSAVE family (0: the
    /// resolver sizes it from CPUID), REP string instructions (0: the resolver takes one
    /// element, the one that faulted, from the instruction's own operand size) and gathers (a
    /// vector index: the resolver reads the lanes).
    #[test]
    fn decoder_footprints_of_unusual_instructions() {
        type Footprint = &'static [(u64, OpAccess)];
        let cases: &[(&[u8], Footprint)] = &[
            (&[0x0f, 0xae, 0x07], &[(512, OpAccess::Write)]), // fxsave [rdi]
            (&[0x0f, 0xae, 0x0f], &[(512, OpAccess::Read)]),  // fxrstor [rdi]
            (&[0x0f, 0xae, 0x27], &[(0, OpAccess::ReadWrite)]), // xsave [rdi]
            (
                &[0x66, 0x0f, 0x38, 0xf8, 0x07],
                &[(64, OpAccess::Read), (64, OpAccess::Write)],
            ), // movdir64b rax, [rdi]
            (&[0xc8, 0x10, 0x00, 0x00], &[(8, OpAccess::Write)]), // enter 16, 0
            (&[0xc9], &[(8, OpAccess::Read)]),                // leave
            (&[0x48, 0xcf], &[(8, OpAccess::Read); 5]),       // iretq: 5 pops
            (
                &[0xff, 0x1f],
                &[
                    (6, OpAccess::Read),
                    (4, OpAccess::Write),
                    (4, OpAccess::Write),
                ],
            ), // call far m16:32
            (
                &[0xf3, 0xa4],
                &[(0, OpAccess::CondRead), (0, OpAccess::CondWrite)],
            ), // rep movsb
        ];
        let mut f = InstructionInfoFactory::new();
        for (code, want) in cases {
            let i = Decoder::with_ip(64, code, 0x1000, DecoderOptions::NONE).decode();
            assert!(!i.is_invalid(), "{code:02x?}");
            let mut got: Vec<(u64, OpAccess)> = f
                .info(&i)
                .used_memory()
                .iter()
                .map(|m| (m.memory_size().size() as u64, m.access()))
                .collect();
            got.sort_by_key(|(s, a)| (*s, *a as u8));
            let mut want = want.to_vec();
            want.sort_by_key(|(s, a)| (*s, *a as u8));
            assert_eq!(got, want, "{:?} {code:02x?}", i.mnemonic());
        }
    }

    #[test]
    fn rep_string_elements_are_sized_by_the_instruction() {
        // rep movsq: the operands are unsized, the instruction's memory size is a qword.
        let i = Decoder::with_ip(64, &[0xf3, 0x48, 0xa5], 0x1000, DecoderOptions::NONE).decode();
        assert_eq!(i.memory_size().size(), 8);
    }

    #[test]
    fn gather_lanes_come_from_the_xsave_image() {
        let mut xsave = vec![0u8; 4096];
        // xmm1 = dwords 0, 1024, 2048, 3072; the upper half of ymm1 = 4096 .. 7168.
        for lane in 0..4u32 {
            let at = 160 + 16 + 4 * lane as usize;
            xsave[at..at + 4].copy_from_slice(&(lane * 1024).to_le_bytes());
            let hi = 576 + 16 + 4 * lane as usize;
            xsave[hi..hi + 4].copy_from_slice(&((lane + 4) * 1024).to_le_bytes());
        }
        for lane in 0..8 {
            assert_eq!(
                vector_element(&xsave, Register::YMM1, lane, 4),
                Some(lane as u64 * 1024)
            );
        }
        assert_eq!(
            vector_element(&xsave, Register::XMM1, 5, 4),
            None,
            "xmm has 4 lanes"
        );
        assert_eq!(vector_element(&xsave, Register::ZMM1, 0, 4), None);
        // vpgatherdd ymm0, [rax + ymm1*4], ymm2: 8 lanes of 4-byte indices.
        let code = [0xc4, 0xe2, 0x6d, 0x90, 0x04, 0x88];
        let i = Decoder::with_ip(64, &code, 0x1000, DecoderOptions::NONE).decode();
        let mut f = InstructionInfoFactory::new();
        let m = f.info(&i).used_memory()[0];
        assert_eq!(m.index(), Register::YMM1);
        assert_eq!(m.index().size() / m.vsib_size() as usize, 8);
        let regs = kvm_regs {
            rax: 0x200_0000,
            ..Default::default()
        };
        let sregs = kvm_sregs::default();
        let va: Vec<u64> = (0..8)
            .filter_map(|lane| {
                m.virtual_address(lane, |r, idx, size| {
                    if r.is_vector_register() {
                        vector_element(&xsave, r, idx, size)
                    } else {
                        reg_value(r, &regs, &sregs)
                    }
                })
            })
            .collect();
        assert_eq!(
            va,
            (0..8).map(|p| 0x200_0000 + p * 4096).collect::<Vec<_>>()
        );
    }
}
