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

use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use crate::memory::address_space::PAGE;
use crate::vcpu::GuardedSpace;

/// What resolving an unannotated `-EFAULT` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// Pages the instruction touches that were missing and are now populated.
    pub populated: u64,
    /// Pages the instruction touches, in all.
    pub pages: u64,
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

fn translate(fd: &VcpuFd, linear: u64) -> Result<u64, String> {
    let t = fd
        .translate_gva(linear)
        .map_err(|e| format!("KVM_TRANSLATE of {linear:#x} failed: {e}"))?;
    if t.valid == 0 {
        return Err(format!(
            "guest address {linear:#x} is not mapped by the guest's page tables"
        ));
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
}

impl Resolver {
    /// Works out which pages the instruction at `rip` touches and populates the missing ones,
    /// guessing translations while the guest runs on the VMM's identity map, and translating
    /// properly when the guess made no progress (or does not apply).
    pub fn resolve(&self, fd: &VcpuFd, mem: &GuardedSpace<'_, '_>) -> Result<Resolved, String> {
        let (regs, sregs) = if self.sync_regs {
            let s = fd.sync_regs();
            (s.regs, s.sregs)
        } else {
            let regs = fd
                .get_regs()
                .map_err(|e| format!("KVM_GET_REGS failed: {e}"))?;
            let sregs = fd
                .get_sregs()
                .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
            (regs, sregs)
        };
        const CR0_PG: u64 = 1 << 31;
        const EFER_LMA: u64 = 1 << 10;
        let identity = sregs.cr3 & !0xfff == self.identity_cr3
            && sregs.cr0 & CR0_PG != 0
            && sregs.efer & EFER_LMA != 0;
        if identity {
            let limit = self.identity_limit;
            let guess = |linear: u64| -> Result<u64, String> {
                if linear < limit {
                    Ok(linear)
                } else {
                    translate(fd, linear)
                }
            };
            // A decoding or translation failure under the guess is retried properly too.
            if let Ok(r) = resolve_with(&guess, &regs, &sregs, mem) {
                if r.populated > 0 {
                    return Ok(r);
                }
            }
        }
        resolve_with(&|linear| translate(fd, linear), &regs, &sregs, mem)
    }
}

/// [`Resolver::resolve`] with a given translation of linear to guest-physical addresses.
fn resolve_with(
    translate: &dyn Fn(u64) -> Result<u64, String>,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    mem: &GuardedSpace<'_, '_>,
) -> Result<Resolved, String> {
    let mut out = Resolved {
        populated: 0,
        pages: 0,
    };
    let touch = |linear: u64, len: u64, write: bool, out: &mut Resolved| -> Result<(), String> {
        let last = linear.wrapping_add(len.max(1) - 1);
        let mut page = linear & !(PAGE - 1);
        loop {
            let gpa = translate(page.max(linear))? & !(PAGE - 1);
            out.pages += 1;
            if mem
                .populate_if_missing(gpa, write)
                .map_err(|e| e.to_string())?
            {
                out.populated += 1;
            }
            if page >= (last & !(PAGE - 1)) {
                break;
            }
            page += PAGE;
        }
        Ok(())
    };
    // The instruction itself (at most 15 bytes, maybe across a page boundary).
    let rip = sregs.cs.base.wrapping_add(regs.rip);
    touch(rip, 15, false, &mut out)?;
    let mut bytes = [0u8; 15];
    let first = (PAGE - rip % PAGE).min(15) as usize;
    mem.read_guest(translate(rip)?, &mut bytes[..first])
        .map_err(|e| e.to_string())?;
    if first < 15 {
        let next = rip + first as u64;
        mem.read_guest(translate(next)?, &mut bytes[first..])
            .map_err(|e| e.to_string())?;
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
        return Err(format!(
            "cannot decode the instruction at rip {:#x}: {bytes:02x?}",
            regs.rip
        ));
    }
    // One factory per vCPU thread: creating one allocates, and this is the fault path.
    FACTORY.with_borrow_mut(|factory| {
        let info = factory.info(&instr);
        for m in info.used_memory() {
            let Some(va) = m.virtual_address(0, |reg, _, _| reg_value(reg, regs, sregs)) else {
                continue;
            };
            let size = m.memory_size().size() as u64;
            let write = matches!(
                m.access(),
                OpAccess::Write
                    | OpAccess::ReadWrite
                    | OpAccess::CondWrite
                    | OpAccess::ReadCondWrite
            );
            touch(va, size.max(1), write, &mut out)?;
        }
        Ok(out)
    })
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
}
