//! A vCPU's initial state: CPUID, long-mode segments and control registers, SSE-ready FPU, and
//! the entry registers (`rip`, `rsp`, `rdi` = index, `rsi` = boot info).

use abi::layout::{BOOT_INFO, GDT, PML4};
use abi::selectors;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;

use super::{gdt_entry, GDT_ENTRIES};
use crate::kvm::KvmError;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// CPUID leaf 0x8000_0001 EDX bit 26: 1 GiB pages.
pub fn has_1g_pages(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0)
}

/// The supported CPUID adjusted for vCPU `index`: APIC ids and the hypervisor bit.
pub fn cpuid_for(supported: &CpuId, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((index & 0xff) << 24);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    cpuid
}

fn segment(selector: u16) -> kvm_segment {
    let table_index = selector >> 3;
    let (flags, base, raw_limit) = GDT_ENTRIES[usize::from(table_index)];
    let entry = gdt_entry(flags, base, raw_limit);
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The largest XSAVE image the CPU can write, for every feature it supports (CPUID leaf 0xD,
/// sub-leaf 0, ECX); 0 without XSAVE.
pub fn xsave_max_bytes(cpuid: &CpuId) -> u64 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| u64::from(e.ecx))
}

/// Long-mode special registers: flat segments from the GDT, paging on the boot page tables,
/// SSE enabled (CR0.MP, no CR0.EM, CR4.OSFXSR|OSXMMEXCPT), no IDT.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(selectors::KERNEL_CS);
    let data = segment(selectors::KERNEL_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(selectors::TSS);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = (sregs.cr0 & !(CR0_EM | CR0_CD | CR0_NW))
        | CR0_PE
        | CR0_MP
        | CR0_ET
        | CR0_NE
        | CR0_WP
        | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The entry registers of vCPU `index`.
pub fn entry_regs(index: u32, entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        // As if the entry had been `call`ed: rsp + 8 is 16-byte aligned.
        rsp: abi::stack_top(u64::from(index)) - 8,
        rdi: u64::from(index),
        rsi: BOOT_INFO,
        rflags: 0x2,
        ..Default::default()
    }
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    r.map_err(|source| KvmError::Ioctl { what, source })
}

/// Puts vCPU `index` at `entry` in 64-bit mode with its own stack.
pub fn configure(
    vcpu: &VcpuFd,
    index: u32,
    entry: u64,
    supported_cpuid: &CpuId,
) -> Result<(), KvmError> {
    ioctl(
        "KVM_SET_CPUID2",
        vcpu.set_cpuid2(&cpuid_for(supported_cpuid, index)),
    )?;
    let sregs = ioctl("KVM_GET_SREGS", vcpu.get_sregs())?;
    ioctl("KVM_SET_SREGS", vcpu.set_sregs(&long_mode_sregs(sregs)))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    ioctl("KVM_SET_FPU", vcpu.set_fpu(&fpu))?;
    ioctl("KVM_SET_REGS", vcpu.set_regs(&entry_regs(index, entry)))
}

/// Puts vCPU `index` back into a saved state: the same CPUID as [`configure`] gives it, then
/// every register of `state` (`xsave_bytes`: the XSAVE image size of this VM, see
/// [`crate::kvm::state::xsave_image_bytes`]). MSRs KVM refuses are skipped and logged.
pub fn restore(
    vcpu: &VcpuFd,
    index: u32,
    supported_cpuid: &CpuId,
    state: &crate::kvm::state::VcpuState,
    xsave_bytes: usize,
) -> Result<(), KvmError> {
    ioctl(
        "KVM_SET_CPUID2",
        vcpu.set_cpuid2(&cpuid_for(supported_cpuid, index)),
    )?;
    let refused = state.restore(vcpu, xsave_bytes)?;
    if !refused.is_empty() {
        tracing::info!(
            vcpu = index,
            msrs = ?refused.iter().map(|m| format!("{m:#x}")).collect::<Vec<_>>(),
            "restore: KVM refused these MSRs; skipped"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_segments() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.db, 0);
        assert_eq!(s.cs.type_, 0xb);
        assert_eq!(s.ds.selector, 0x10);
        assert_eq!(s.ds.type_, 3);
        assert_eq!(s.ds.limit, 0xffff_ffff);
        assert_eq!(s.tr.type_, 0xb);
        assert_eq!(s.tr.s, 0);
        assert_eq!(s.cr0 & CR0_EM, 0);
        assert_ne!(s.cr4 & CR4_OSFXSR, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn entry_registers() {
        let r = entry_regs(3, 0x10_0000);
        assert_eq!(r.rdi, 3);
        assert_eq!(r.rsi, BOOT_INFO);
        assert_eq!((r.rsp + 8) % 16, 0);
        assert_eq!(r.rsp + 8, abi::stack_top(3));
    }
}
