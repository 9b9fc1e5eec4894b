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
    kvm_xsave, Msrs, Xsave,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
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
    /// XSAVE image, as 32-bit words, if the host has XSAVE: the legacy 4 KiB (1024 words), or
    /// as large as `KVM_CAP_XSAVE2` says (dynamically enabled state such as AMX tiles makes it
    /// larger), read with `KVM_GET_XSAVE2`.
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

/// The legacy XSAVE image, `struct kvm_xsave`, in bytes.
const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_xsave>();
/// ... and in words.
const XSAVE_LEGACY_WORDS: usize = XSAVE_LEGACY_BYTES / 4;

/// The size, in bytes, of the XSAVE image KVM reads and writes for a vCPU of `vm`: what
/// `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` says (Linux 5.17 on; more than 4 KiB once the process
/// has permitted guests dynamic state such as AMX tiles), else the legacy 4 KiB; 0 if the host
/// has no `KVM_GET_XSAVE` at all.
pub fn xsave_image_bytes(vm: &VmFd) -> usize {
    if !vm.check_extension(Cap::Xsave) {
        return 0;
    }
    usize::try_from(vm.check_extension_int(Cap::Xsave2))
        .unwrap_or(0)
        .max(XSAVE_LEGACY_BYTES)
}

/// Checks that a saved XSAVE image of `words` fits the image of `host_bytes` this host's KVM
/// takes, and is at least the legacy 4 KiB.
fn check_xsave_fits(words: usize, host_bytes: usize) -> Result<(), KvmError> {
    let bytes = words * 4;
    if words < XSAVE_LEGACY_WORDS {
        return Err(KvmError::State(format!(
            "XSAVE image of {bytes} bytes, shorter than the legacy {XSAVE_LEGACY_BYTES}"
        )));
    }
    if bytes > host_bytes.max(XSAVE_LEGACY_BYTES) {
        return Err(KvmError::State(format!(
            "the saved XSAVE image is {bytes} bytes, but this host's KVM takes at most \
             {host_bytes} (KVM_CAP_XSAVE2): the state was saved with features this host does \
             not offer guests (such as AMX tiles)"
        )));
    }
    Ok(())
}

/// An `Xsave` of `bytes` (more than the legacy 4 KiB), zeroed.
fn xsave2_buffer(bytes: usize) -> Result<Xsave, KvmError> {
    let extra = (bytes - XSAVE_LEGACY_BYTES).div_ceil(4);
    Xsave::new(extra)
        .map_err(|e| KvmError::State(format!("an XSAVE buffer of {bytes} bytes: {e:?}")))
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
    /// access already completed). `msr_indices` is `KVM_GET_MSR_INDEX_LIST`; `xsave_bytes` is
    /// [`xsave_image_bytes`] of its VM. Returns the state and the MSRs KVM refused to read.
    pub fn save(
        fd: &VcpuFd,
        msr_indices: &[u32],
        xsave_bytes: usize,
    ) -> Result<(Self, Vec<u32>), KvmError> {
        let regs = ioctl("KVM_GET_REGS", fd.get_regs())?;
        let sregs = ioctl("KVM_GET_SREGS", fd.get_sregs())?;
        let fpu = Fpu::from(&ioctl("KVM_GET_FPU", fd.get_fpu())?);
        let xsave = match xsave_bytes {
            0 => None,
            n if n <= XSAVE_LEGACY_BYTES => {
                Some(ioctl("KVM_GET_XSAVE", fd.get_xsave())?.region.to_vec())
            }
            n => {
                // KVM_GET_XSAVE refuses an image larger than 4 KiB: read the whole one.
                let mut x = xsave2_buffer(n)?;
                // SAFETY: `x` holds `n` bytes, the size KVM_CAP_XSAVE2 gives for this VM's
                // vCPUs, which is what KVM_GET_XSAVE2 writes.
                ioctl("KVM_GET_XSAVE2", unsafe { fd.get_xsave2(&mut x) })?;
                let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
                words.extend_from_slice(x.as_slice());
                Some(words)
            }
        };
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

    /// Writes the state into `fd`, whose CPUID is already set; `xsave_bytes` is
    /// [`xsave_image_bytes`] of its VM. Returns the MSRs KVM refused (the others are set).
    pub fn restore(&self, fd: &VcpuFd, xsave_bytes: usize) -> Result<Vec<u32>, KvmError> {
        if let Some(words) = &self.xsave {
            // Before anything is written: a state this host cannot take changes nothing.
            check_xsave_fits(words.len(), xsave_bytes)?;
        }
        ioctl("KVM_SET_SREGS", fd.set_sregs(&self.sregs))?;
        ioctl("KVM_SET_REGS", fd.set_regs(&self.regs))?;
        let fpu = self.fpu.to_kvm().map_err(KvmError::State)?;
        ioctl("KVM_SET_FPU", fd.set_fpu(&fpu))?;
        if let Some(xcrs) = &self.xcrs {
            ioctl("KVM_SET_XCRS", fd.set_xcrs(xcrs))?;
        }
        if let Some(words) = &self.xsave {
            let (legacy, extra) = words.split_at(XSAVE_LEGACY_WORDS);
            if xsave_bytes > XSAVE_LEGACY_BYTES {
                // KVM_SET_XSAVE reads the whole image KVM_CAP_XSAVE2 gives, more than 4 KiB:
                // a buffer of that size, the saved words first, zeroes after them (a
                // component the image does not hold is off in its XSTATE_BV header).
                let mut x = xsave2_buffer(xsave_bytes)?;
                // SAFETY: only `xsave.region` is written, not the length the wrapper keeps.
                unsafe { x.as_mut_fam_struct() }
                    .xsave
                    .region
                    .copy_from_slice(legacy);
                x.as_mut_slice()[..extra.len()].copy_from_slice(extra);
                // SAFETY: `x` holds `xsave_bytes`, the size KVM_CAP_XSAVE2 gives for this
                // VM's vCPUs, which is what KVM_SET_XSAVE reads.
                ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave2(&x) })?;
            } else {
                let mut xsave = kvm_xsave::default();
                xsave.region.copy_from_slice(legacy);
                // SAFETY: KVM_CAP_XSAVE2 says KVM reads the legacy 4 KiB image (or the host
                // predates it, and reads exactly that), which `xsave` is.
                ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(&xsave) })?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xsave_image_must_fit_the_hosts() {
        // The legacy image on a legacy host, and on a host that takes more (zeroes after it).
        assert!(check_xsave_fits(XSAVE_LEGACY_WORDS, XSAVE_LEGACY_BYTES).is_ok());
        assert!(check_xsave_fits(XSAVE_LEGACY_WORDS, 11008).is_ok());
        // An AMX-sized image (11008 bytes) on a host that takes it, and on one that does not.
        assert!(check_xsave_fits(11008 / 4, 11008).is_ok());
        let e = check_xsave_fits(11008 / 4, XSAVE_LEGACY_BYTES).unwrap_err();
        assert!(e.to_string().contains("11008 bytes"), "{e}");
        assert!(e.to_string().contains("KVM_CAP_XSAVE2"), "{e}");
        // Shorter than the legacy image: damaged.
        assert!(check_xsave_fits(XSAVE_LEGACY_WORDS - 1, 11008).is_err());
    }

    #[test]
    fn an_xsave2_buffer_holds_the_whole_image() {
        let x = xsave2_buffer(11008).unwrap();
        let words = x.as_fam_struct_ref().xsave.region.len() + x.as_slice().len();
        assert_eq!(words * 4, 11008);
    }
}
