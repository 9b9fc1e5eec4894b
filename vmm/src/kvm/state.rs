//! A vCPU's KVM state for snapshots: read it from a stopped vCPU, write it into a fresh one.
//!
//! What is kept: general registers, special registers, the legacy FPU image, XSAVE, XCRs,
//! every MSR of `KVM_GET_MSR_INDEX_LIST` that the vCPU lets us read, vCPU events (pending
//! exceptions, NMI and interrupt shadow) and debug registers. There is no in-kernel irqchip,
//! so there is no LAPIC state to keep.
//!
//! `KVM_GET_MSRS` and `KVM_SET_MSRS` stop at the first MSR they refuse (for instance KVM's
//! poll-control MSR 0x4b564d06 without its CPUID bit): both are driven one refusal at a time,
//! and the refused indices are reported rather than failing the whole operation.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::KvmError;

/// The legacy FPU image (`kvm_fpu` has no serde support in kvm-bindings).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    /// x87 registers, 16 bytes each.
    pub fpr: Vec<Vec<u8>>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers, 16 bytes each.
    pub xmm: Vec<Vec<u8>>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr.iter().map(|r| r.to_vec()).collect(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.iter().map(|r| r.to_vec()).collect(),
            mxcsr: f.mxcsr,
        }
    }
}

impl Fpu {
    fn to_kvm(&self) -> Result<kvm_fpu, String> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return Err("FPU image: wrong number of registers".into());
        }
        for (dst, src) in f.fpr.iter_mut().zip(&self.fpr) {
            if src.len() != dst.len() {
                return Err("FPU image: an x87 register is not 16 bytes".into());
            }
            dst.copy_from_slice(src);
        }
        for (dst, src) in f.xmm.iter_mut().zip(&self.xmm) {
            if src.len() != dst.len() {
                return Err("FPU image: an XMM register is not 16 bytes".into());
            }
            dst.copy_from_slice(src);
        }
        Ok(f)
    }
}

/// Everything KVM keeps for one vCPU that a resumed guest needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU image.
    pub fpu: Fpu,
    /// XSAVE area (4 KiB, as 1024 words), if the host has XSAVE.
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers, if the host has them.
    pub xcrs: Option<kvm_xcrs>,
    /// MSRs read: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending events.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    r.map_err(|source| KvmError::Ioctl { what, source })
}

/// Reads (or writes) `indices` through `op`, which handles a prefix and returns how many it
/// handled; an MSR it refuses is skipped and reported. Returns the handled entries and the
/// refused indices.
fn msrs_one_refusal_at_a_time(
    entries: &[kvm_msr_entry],
    mut op: impl FnMut(&Msrs) -> Result<(usize, Msrs), kvm_ioctls::Error>,
) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), KvmError> {
    let mut done = Vec::with_capacity(entries.len());
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let batch = Msrs::from_entries(rest).map_err(|_| KvmError::Ioctl {
            what: "building an MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let (n, out) = ioctl("KVM_GET/SET_MSRS", op(&batch))?;
        let n = n.min(rest.len());
        done.extend_from_slice(&out.as_slice()[..n]);
        if n < rest.len() {
            refused.push(rest[n].index);
        }
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok((done, refused))
}

impl VcpuState {
    /// Reads the state of a vCPU that is outside `KVM_RUN` (with any pending port or MMIO
    /// access already completed). `msr_indices` is `KVM_GET_MSR_INDEX_LIST`. Returns the
    /// state and the MSRs KVM refused to read.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<(Self, Vec<u32>), KvmError> {
        let regs = ioctl("KVM_GET_REGS", fd.get_regs())?;
        let sregs = ioctl("KVM_GET_SREGS", fd.get_sregs())?;
        let fpu = Fpu::from(&ioctl("KVM_GET_FPU", fd.get_fpu())?);
        let xsave = fd.get_xsave().ok().map(|x| x.region.to_vec());
        let xcrs = fd.get_xcrs().ok();
        let events = ioctl("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?;
        let debugregs = ioctl("KVM_GET_DEBUGREGS", fd.get_debug_regs())?;
        let wanted: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let (read, refused) = msrs_one_refusal_at_a_time(&wanted, |batch| {
            let mut b = batch.clone();
            fd.get_msrs(&mut b).map(|n| (n, b))
        })?;
        Ok((
            VcpuState {
                regs,
                sregs,
                fpu,
                xsave,
                xcrs,
                msrs: read.iter().map(|e| (e.index, e.data)).collect(),
                events,
                debugregs,
            },
            refused,
        ))
    }

    /// Writes the state into `fd`, whose CPUID is already set. Returns the MSRs KVM refused
    /// (the others are set).
    pub fn restore(&self, fd: &VcpuFd) -> Result<Vec<u32>, KvmError> {
        ioctl("KVM_SET_SREGS", fd.set_sregs(&self.sregs))?;
        ioctl("KVM_SET_REGS", fd.set_regs(&self.regs))?;
        let fpu = self.fpu.to_kvm().map_err(KvmError::State)?;
        ioctl("KVM_SET_FPU", fd.set_fpu(&fpu))?;
        if let Some(xcrs) = &self.xcrs {
            ioctl("KVM_SET_XCRS", fd.set_xcrs(xcrs))?;
        }
        if let Some(words) = &self.xsave {
            let mut xsave = kvm_xsave::default();
            if words.len() != xsave.region.len() {
                return Err(KvmError::State(format!(
                    "XSAVE area of {} words, expected {}",
                    words.len(),
                    xsave.region.len()
                )));
            }
            xsave.region.copy_from_slice(words);
            // SAFETY: `kvm_xsave` is the legacy 4 KiB image that KVM_GET_XSAVE filled on the
            // same kind of host; the kernel reads exactly `size_of::<kvm_xsave>()` bytes.
            ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(&xsave) })?;
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let (_, refused) = msrs_one_refusal_at_a_time(&entries, |batch| {
            fd.set_msrs(batch).map(|n| (n, batch.clone()))
        })?;
        ioctl("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&self.events))?;
        ioctl("KVM_SET_DEBUGREGS", fd.set_debug_regs(&self.debugregs))?;
        Ok(refused)
    }
}
