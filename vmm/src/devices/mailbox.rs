//! The hot-plug mailbox: a page in the boot area where the VMM publishes the list of
//! hot-plugged regions for the guest, under a sequence lock (see [`abi::Mailbox`]).
//!
//! Protocol with the guest (the `hotplug` workload):
//!
//! 1. [`Mailbox::begin`] makes `generation` odd (release) *before* the address space changes,
//!    so that a guest access that sees the change (open bus, a dropped write, a new region's
//!    memory) also sees an odd or newer generation afterwards and knows not to count it.
//! 2. The caller changes the address space.
//! 3. [`MailboxUpdate::publish`] writes the list, then (release fence) makes `generation` even.
//!
//! So whenever the generation is even, the list is exactly the address space's hot-plugged
//! regions: an address the list does not cover is a hole (open bus) for as long as the
//! generation stays the same. [`Mailbox::change`] is the one way the control server changes
//! regions, and it keeps that order for maps as well as unmaps and protects.
//!
//! The mailbox is read and written like any device's guest memory: through vm-memory's `Bytes`
//! on a [`GuardedMemory`], a view of the address space inside one short RCU read-side critical
//! section per operation (so none is held across the address-space change, whose grace period
//! would otherwise wait for it). It lives in the boot area, which is populated eagerly and
//! never demand-paged, but the view would populate it first if it were.
#![deny(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use abi::layout::MAILBOX;
use abi::{mailbox_flags, mem_kind, region_flags, Mailbox as Layout, MAILBOX_MAX_REGIONS};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{AddressSpace, GuardedMemory, RegionKind};

/// One listed region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Read-only to the guest.
    pub readonly: bool,
}

/// The VMM's side of the mailbox. Updates are serialised by an internal lock, which
/// [`begin`](Self::begin) holds until the update is published.
pub struct Mailbox {
    space: Arc<AddressSpace>,
    /// The generation last written (even when no update is under way).
    generation: Mutex<u64>,
}

/// An update under way: `generation` is odd until [`publish`](Self::publish) (or drop, which
/// republishes nothing new but makes the generation even again).
pub struct MailboxUpdate<'a> {
    mailbox: &'a Mailbox,
    generation: MutexGuard<'a, u64>,
    published: bool,
}

fn addr(offset: u64) -> GuestAddress {
    GuestAddress(MAILBOX + offset)
}

impl Mailbox {
    /// The mailbox in `space` (whose boot area must be mapped), with an empty list published.
    #[cfg(test)]
    pub fn new(space: Arc<AddressSpace>) -> Result<Self, vm_memory::GuestMemoryError> {
        Self::with_list(space, &[])
    }

    /// The mailbox in `space` with `list` published (a VM restored from a snapshot already
    /// has regions: the guest must never see a list without them).
    pub fn with_list(
        space: Arc<AddressSpace>,
        list: &[MailboxRegion],
    ) -> Result<Self, vm_memory::GuestMemoryError> {
        let m = Mailbox {
            space,
            generation: Mutex::new(0),
        };
        let current: u64 =
            m.with_mem(|mem| mem.load(addr(Layout::GENERATION_OFFSET), Ordering::Acquire))?;
        *m.lock() = current & !1;
        m.begin().publish(list)?;
        Ok(m)
    }

    /// The mailbox in `space`, listing the hot-plugged regions it has.
    pub fn listing(space: Arc<AddressSpace>) -> Result<Self, vm_memory::GuestMemoryError> {
        let list = hotplug_list(&space);
        Self::with_list(space, &list)
    }

    /// Changes the regions the guest sees inside an update: the generation goes odd before
    /// `change` runs, and even again, with the list of hot-plugged regions as they are then,
    /// after it returns (failed or not). The guest may see any part of the change while the
    /// generation is odd, and none of it at the even generation before.
    pub fn change<R>(&self, change: impl FnOnce(&AddressSpace) -> R) -> R {
        let update = self.begin();
        let r = change(&self.space);
        let _ = update.publish(&hotplug_list(&self.space));
        r
    }

    /// Runs `f` on a view of guest memory, inside one read-side critical section of a reader
    /// registered for the call (the caller may be about to change the address space, and a
    /// grace period must not wait for a reader this thread keeps).
    fn with_mem<R>(&self, f: impl FnOnce(&GuardedMemory<'_>) -> R) -> R {
        let reader = self.space.domain().register();
        let guard = reader.read();
        f(&GuardedMemory::new(&self.space, &guard))
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an update: the generation goes odd (release), before the caller changes memory.
    pub fn begin(&self) -> MailboxUpdate<'_> {
        let mut g = self.lock();
        *g += 1;
        // Release: pairs with the guest's acquire load of `generation` after its access.
        let _ =
            self.with_mem(|mem| mem.store(*g, addr(Layout::GENERATION_OFFSET), Ordering::Release));
        MailboxUpdate {
            mailbox: self,
            generation: g,
            published: false,
        }
    }

    /// The current generation (even unless an update is under way on another thread).
    pub fn generation(&self) -> u64 {
        self.with_mem(|mem| mem.load(addr(Layout::GENERATION_OFFSET), Ordering::Acquire))
            .unwrap_or(0)
    }

    /// Asks the guest's `hotplug` workload to stop.
    pub fn request_stop(&self) -> Result<(), vm_memory::GuestMemoryError> {
        let _g = self.lock();
        self.with_mem(|mem| {
            let flags: u32 = mem.load(addr(Layout::FLAGS_OFFSET), Ordering::Relaxed)?;
            mem.store(
                flags | mailbox_flags::STOP,
                addr(Layout::FLAGS_OFFSET),
                Ordering::Release,
            )
        })
    }

    /// Whether [`request_stop`](Self::request_stop) was called.
    #[cfg(test)]
    pub fn stop_requested(&self) -> bool {
        self.with_mem(|mem| mem.load::<u32>(addr(Layout::FLAGS_OFFSET), Ordering::Acquire))
            .is_ok_and(|f| f & mailbox_flags::STOP != 0)
    }
}

/// The hot-plugged regions of `space`, as the mailbox lists them.
fn hotplug_list(space: &AddressSpace) -> Vec<MailboxRegion> {
    space
        .list()
        .iter()
        .filter(|r| r.kind == RegionKind::Hotplug)
        .map(|r| MailboxRegion {
            gpa: r.gpa,
            size_bytes: r.size_bytes,
            readonly: r.readonly,
        })
        .collect()
}

impl MailboxUpdate<'_> {
    /// Writes `regions` (sorted; at most [`MAILBOX_MAX_REGIONS`] are listed, the rest flagged
    /// as truncated) and ends the update: the generation goes even (release).
    pub fn publish(mut self, regions: &[MailboxRegion]) -> Result<(), vm_memory::GuestMemoryError> {
        let r = self.write(regions);
        self.finish();
        r
    }

    fn write(&self, regions: &[MailboxRegion]) -> Result<(), vm_memory::GuestMemoryError> {
        self.mailbox.with_mem(|mem| Self::write_in(mem, regions))
    }

    fn write_in(
        mem: &GuardedMemory<'_>,
        regions: &[MailboxRegion],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let n = regions.len().min(MAILBOX_MAX_REGIONS);
        let mut bytes = Vec::with_capacity(n * 24);
        for r in &regions[..n] {
            bytes.extend_from_slice(&r.gpa.to_le_bytes());
            bytes.extend_from_slice(&r.size_bytes.to_le_bytes());
            bytes.extend_from_slice(&mem_kind::HOTPLUG.to_le_bytes());
            let flags = if r.readonly {
                region_flags::READONLY
            } else {
                0
            };
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        mem.write_slice(&bytes, addr(Layout::REGIONS_OFFSET))?;
        mem.store(n as u32, addr(Layout::NR_REGIONS_OFFSET), Ordering::Relaxed)?;
        let flags: u32 = mem.load(addr(Layout::FLAGS_OFFSET), Ordering::Relaxed)?;
        let flags = if regions.len() > MAILBOX_MAX_REGIONS {
            flags | mailbox_flags::TRUNCATED
        } else {
            flags & !mailbox_flags::TRUNCATED
        };
        mem.store(flags, addr(Layout::FLAGS_OFFSET), Ordering::Relaxed)
    }

    fn finish(&mut self) {
        if self.published {
            return;
        }
        self.published = true;
        *self.generation += 1;
        // The list above must be visible before the even generation: release, paired with the
        // guest's acquire load of `generation` before it copies the list.
        std::sync::atomic::fence(Ordering::Release);
        let generation = *self.generation;
        let _ = self.mailbox.with_mem(|mem| {
            mem.store(
                generation,
                addr(Layout::GENERATION_OFFSET),
                Ordering::Release,
            )
        });
    }
}

impl Drop for MailboxUpdate<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::memory::address_space::FaultMode;

    #[test]
    fn sequence_lock_and_list() {
        let space = Arc::new(crate::memory::guest::tests::test_space(
            FaultMode::Vcpu,
            "bonsai",
        ));
        let m = Mailbox::new(space).unwrap();
        assert_eq!(m.generation(), 2);
        let u = m.begin();
        assert_eq!(m.generation(), 3, "odd while the change is under way");
        u.publish(&[
            MailboxRegion {
                gpa: 1 << 32,
                size_bytes: 1 << 20,
                readonly: false,
            },
            MailboxRegion {
                gpa: 2 << 32,
                size_bytes: 2 << 20,
                readonly: true,
            },
        ])
        .unwrap();
        assert_eq!(m.generation(), 4);
        let mut buf = [0u8; 64];
        m.with_mem(|mem| mem.read_slice(&mut buf, GuestAddress(MAILBOX)))
            .unwrap();
        assert_eq!(u32::from_le_bytes(buf[8..12].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(buf[16..24].try_into().unwrap()), 1 << 32);
        assert_eq!(u64::from_le_bytes(buf[24..32].try_into().unwrap()), 1 << 20);
        assert_eq!(
            u32::from_le_bytes(buf[32..36].try_into().unwrap()),
            mem_kind::HOTPLUG
        );
        assert_eq!(u32::from_le_bytes(buf[60..64].try_into().unwrap()), 1);
        // An abandoned update still ends even.
        drop(m.begin());
        assert_eq!(m.generation(), 6);
        // Too many regions: the list is cut and flagged.
        let many = vec![
            MailboxRegion {
                gpa: 0,
                size_bytes: 4096,
                readonly: false
            };
            MAILBOX_MAX_REGIONS + 3
        ];
        m.begin().publish(&many).unwrap();
        let flags: u32 = m
            .with_mem(|mem| mem.load(addr(12), Ordering::Relaxed))
            .unwrap();
        assert_eq!(flags, mailbox_flags::TRUNCATED);
        m.request_stop().unwrap();
        assert!(m.stop_requested());
        m.begin().publish(&[]).unwrap();
        assert!(m.stop_requested(), "publishing keeps the stop flag");
    }

    /// What the guest relies on: at an even generation that stays the same across its reads,
    /// the list is exactly the hot-plugged regions in the tree. A reader polls both while
    /// regions come and go through [`Mailbox::change`]; a map published before the generation
    /// went odd (as maps once were) shows as a region in the tree that the list lacks.
    #[test]
    fn at_an_even_generation_the_list_is_the_tree() {
        use crate::memory::{Backing, RegionKind};
        use std::sync::atomic::AtomicBool;

        let space = Arc::new(crate::memory::guest::tests::test_space(
            FaultMode::Vcpu,
            "bonsai",
        ));
        let m = Mailbox::listing(Arc::clone(&space)).unwrap();
        let nr_listed = |m: &Mailbox| -> u32 {
            m.with_mem(|mem| mem.load(addr(Layout::NR_REGIONS_OFFSET), Ordering::Acquire))
                .unwrap()
        };
        // The boot area is in the tree but not listed.
        assert_eq!(space.len(), nr_listed(&m) as usize + 1);
        let done = AtomicBool::new(false);
        let (checked, wrong) = std::thread::scope(|t| {
            let poller = t.spawn(|| {
                let (mut checked, mut wrong) = (0u64, 0u64);
                while !done.load(Ordering::Relaxed) {
                    let g = m.generation();
                    if g & 1 == 1 {
                        continue;
                    }
                    let (in_tree, listed) = (space.len(), nr_listed(&m) as usize + 1);
                    if m.generation() == g {
                        checked += 1;
                        wrong += u64::from(in_tree != listed);
                    }
                }
                (checked, wrong)
            });
            let gpa = 24 << 20;
            for _ in 0..2000 {
                m.change(|s| s.map(gpa, 1 << 20, Backing::Anon, false, RegionKind::Hotplug))
                    .unwrap();
                m.change(|s| s.unmap(gpa, 1 << 20)).unwrap();
            }
            done.store(true, Ordering::Relaxed);
            poller.join().unwrap()
        });
        assert!(checked > 0);
        assert_eq!(
            wrong, 0,
            "{wrong} of {checked} checks saw the tree and the list differ"
        );
    }
}
