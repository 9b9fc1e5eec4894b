//! The control socket: `vmm run --api-sock PATH` serves JSON-lines requests that hot-plug
//! guest memory; `vmm ctl` is the client.
//!
//! Layers (Firecracker-style thin API): [`protocol`] turns a line into a [`Request`] (and
//! holds the greeting and event types); [`Vmm::execute`] has the address space validate the
//! request (one validation layer: [`AddressSpace::validate_map`] and the checks of `unmap`
//! and `protect`), applies the control server's own limits (`--max-regions`,
//! `--max-hotplug-mem`, free huge pages), calls the address space, updates the guest's mailbox
//! and publishes the event, returning a typed [`Reply`] or a [`ControlError`] whose code goes
//! on the wire; [`server`] moves lines between sockets and `execute`, greets clients and
//! delivers events ([`events`]), and never touches the address space. The reply types here and
//! in [`protocol`] are the ones `vmm ctl` ([`client`]) reads.
#![deny(unsafe_code)]

pub mod client;
pub mod events;
pub mod protocol;
pub mod server;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::devices::mailbox::Mailbox;
use crate::inject;
use crate::memory::address_space::{RegionInfo, PAGE};
use crate::memory::{AddressSpace, AsError, Backing, FaultMode, RegionKind};
use crate::vcpu::VcpuShared;
use crate::vm::VmHandle;
use protocol::{addr, named, Event, EventKind, GpaRange, MAX_BATCH};
pub use protocol::{Code, ControlError, Request};

/// The default `--client-idle-timeout`.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: &str = "5";

/// Parses `--client-idle-timeout SECONDS`: a positive number of seconds, fractions allowed.
pub fn parse_client_idle_timeout(s: &str) -> Result<Duration, String> {
    let d = crate::size::parse_timeout(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!(
            "invalid idle timeout {s:?}: must be at least 0.01 seconds"
        ));
    }
    Ok(d)
}

/// What the control server counts about its clients (shown by `stats`).
#[derive(Debug, Default)]
pub struct ClientCounters {
    /// Clients connected now.
    pub connected: AtomicU64,
    /// Clients dropped for holding a partial line past `--client-idle-timeout`.
    pub dropped_idle: AtomicU64,
    /// Clients disconnected to make room for a new one (all slots were taken).
    pub evicted: AtomicU64,
}

/// Limits of the control server.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Most hot-plugged regions at once (splits count).
    pub max_regions: usize,
    /// Most hot-plugged guest memory at once, in bytes.
    pub max_hotplug_bytes: u64,
    /// Most clients connected at once.
    pub max_clients: usize,
    /// A client holding a partial request line for this long is dropped.
    pub client_idle_timeout: Duration,
    /// vCPUs of the VM (to read the guest's results slots).
    pub vcpus: u32,
}

impl From<AsError> for ControlError {
    fn from(e: AsError) -> Self {
        let code = match e.code() {
            "invalid" => Code::Invalid,
            "overlap" => Code::Overlap,
            "not_found" => Code::NotFound,
            "limit" => Code::Limit,
            "reserved" => Code::Reserved,
            _ => Code::Internal,
        };
        ControlError::new(code, e.to_string())
    }
}

/// A region as replies and events show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionView {
    /// First address (`0x` hex on the wire).
    #[serde(with = "addr")]
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// End address, exclusive (`0x` hex on the wire).
    #[serde(with = "addr")]
    pub end: u64,
    /// KVM memslot (null while the region is served by exits).
    pub slot: Option<u32>,
    /// anon | memfd | hugetlb.
    #[serde(with = "named")]
    pub backing: Backing,
    /// boot | ram | hotplug.
    #[serde(with = "named")]
    pub kind: RegionKind,
    /// Read-only to the guest.
    pub readonly: bool,
    /// Pages populated.
    pub resident_pages: u64,
    /// Faults serviced in it.
    pub faults: u64,
}

impl From<&RegionInfo> for RegionView {
    fn from(r: &RegionInfo) -> Self {
        RegionView {
            gpa: r.gpa,
            size: r.size_bytes,
            end: r.gpa + r.size_bytes,
            slot: r.slot,
            backing: r.backing,
            kind: r.kind,
            readonly: r.readonly,
            resident_pages: r.resident_pages,
            faults: r.faults,
        }
    }
}

/// Every region of `space`, as replies show them.
fn views(space: &AddressSpace) -> Vec<RegionView> {
    space.list().iter().map(RegionView::from).collect()
}

/// What a successful request returns.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `map`: the new region.
    Mapped(RegionView),
    /// `unmap`.
    Unmapped(Unmapped),
    /// `protect`.
    Protected(Protected),
    /// `list`.
    List(Listing),
    /// `stats`.
    Stats(Box<Stats>),
    /// `stop`.
    Stopping(Stopping),
    /// `inject`.
    Injecting(Injecting),
    /// `check`.
    Check(Check),
    /// `snapshot`.
    Snapshot(SnapshotView),
    /// `subscribe` and `unsubscribe`.
    Subscribed(Subscribed),
}

/// `unmap`: the pieces removed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Unmapped {
    /// Removed pieces.
    pub removed: Vec<RegionView>,
}

/// `protect`: the pieces whose protection changed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Protected {
    /// Changed pieces.
    pub changed: Vec<RegionView>,
}

/// `list`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Listing {
    /// Every region, boot and RAM included, by address.
    pub regions: Vec<RegionView>,
    /// The mailbox generation the guest sees.
    pub generation: u64,
}

/// `stop`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stopping {
    /// Always true.
    pub stopping: bool,
}

/// `inject`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Injecting {
    /// The step, or "off".
    #[serde(with = "protocol::inject_step")]
    pub step: Option<inject::Step>,
    /// Which call fails.
    pub nth: u64,
}

/// `subscribe` and `unsubscribe`: the event kinds this connection receives from now on.
#[derive(Debug, Serialize, Deserialize)]
pub struct Subscribed {
    /// The kinds (empty after `unsubscribe`).
    pub subscribed: Vec<EventKind>,
}

/// Most copy rounds a live snapshot makes while the guest runs.
const PRECOPY_ROUNDS: u32 = 4;
/// Pages written during a round few enough to copy in the pause without another round.
const PRECOPY_SMALL: u64 = 1024;

/// `snapshot`: what was written.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotView {
    /// The directory.
    pub dir: String,
    /// Pages written.
    pub pages: u64,
    /// Bytes of guest memory written.
    pub memory_bytes: u64,
    /// Regions.
    pub regions: usize,
    /// vCPUs.
    pub vcpus: usize,
    /// Time the vCPUs were paused, in ms.
    pub paused_ms: f64,
    /// Time until the snapshot was on disk and in place, in ms (the vCPUs go on after
    /// `paused_ms`, unless the snapshot stops the VM).
    #[serde(default)]
    pub total_ms: f64,
    /// MSRs KVM refused to read.
    pub msrs_not_saved: Vec<String>,
    /// Whether the VM was stopped after it.
    pub stopped: bool,
    /// `live`: pages copied while the guest ran, in all rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopied_pages: Option<u64>,
    /// `live`: copy rounds while the guest ran (the first copies everything, each next one
    /// what was written during the one before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_rounds: Option<u32>,
    /// `live`: pages copied again with the vCPUs paused (written, or first populated, during
    /// the first pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recopied_pages: Option<u64>,
}

/// `stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Hot-plugged regions (boot and RAM are in `totals` only).
    pub regions: Vec<RegionView>,
    /// Address-space counters.
    pub totals: Totals,
    /// VM exits by reason.
    pub exits: Exits,
    /// Grace periods.
    pub rcu: RcuStats,
    /// What the guest's `hotplug` workload reported so far.
    pub guest: GuestProgress,
    /// The mailbox generation.
    pub generation: u64,
    /// The VMM process's resident memory.
    pub host_rss_bytes: u64,
    /// vcpu | handler | kernel.
    #[serde(with = "named")]
    pub fault_mode: FaultMode,
    /// bonsai | rwlock | cow (the range map's own name).
    pub address_space: String,
    /// The control server's clients.
    pub control: ControlStats,
}

/// The control server's clients, in `stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlStats {
    /// Connected now (the one asking included).
    pub clients: u64,
    /// `--max-clients`.
    pub max_clients: usize,
    /// Dropped for holding a partial request line past `--client-idle-timeout`.
    pub clients_dropped_idle: u64,
    /// Disconnected to make room for a new client when every slot was taken.
    pub clients_evicted: u64,
    /// Connected clients that subscribed to events.
    #[serde(default)]
    pub subscribers: usize,
    /// Events not sent to a subscriber because its queue was full.
    #[serde(default)]
    pub events_dropped: u64,
}

/// Address-space totals.
#[derive(Debug, Serialize, Deserialize)]
pub struct Totals {
    /// All regions.
    pub regions: usize,
    /// Hot-plugged regions.
    pub hotplug_regions: usize,
    /// Hot-plugged bytes.
    pub hotplug_bytes: u64,
    /// Pages populated across every region.
    pub resident_pages: u64,
    /// Faults serviced.
    pub faults: u64,
    /// Pages populated by the VMM.
    pub pages_populated: u64,
    /// Populates that lost a race.
    pub populate_races: u64,
    /// 2 MiB windows filled with one zeroed huge page (`--thp`).
    #[serde(default)]
    pub huge_fills: u64,
    /// Bare `-EFAULT`s resolved by decoding.
    pub unannotated_faults: u64,
    /// Guest reads of unmapped addresses.
    pub open_bus_reads: u64,
    /// Guest writes to unmapped addresses.
    pub open_bus_writes: u64,
    /// Dropped writes to read-only regions.
    pub readonly_writes: u64,
    /// Successful maps.
    pub maps: u64,
    /// Successful unmaps.
    pub unmaps: u64,
    /// Successful protects.
    pub protects: u64,
    /// Failures while tearing down unmapped memory (logged; recovered from where possible).
    pub teardown_errors: u64,
}

/// VM exits.
#[derive(Debug, Serialize, Deserialize)]
pub struct Exits {
    /// All.
    pub total: u64,
    /// Port I/O.
    pub io: u64,
    /// MMIO.
    pub mmio: u64,
    /// `KVM_EXIT_MEMORY_FAULT`.
    pub memory_fault: u64,
    /// Bare `-EFAULT`.
    pub efault: u64,
    /// Kicks.
    pub interrupted: u64,
    /// Other.
    pub other: u64,
}

/// RCU figures.
#[derive(Debug, Serialize, Deserialize)]
pub struct RcuStats {
    /// Grace periods completed.
    pub grace_periods: u64,
    /// `synchronize()` calls.
    pub synchronize_calls: u64,
    /// Grace-period latency.
    pub grace_period_ns: Latency,
    /// Objects waiting to be freed.
    pub backlog: u64,
    /// Registered readers.
    pub readers: u64,
}

/// Latency percentiles.
#[derive(Debug, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: u64,
}

/// The `hotplug` workload's counters (summed over vCPUs).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestProgress {
    /// vCPUs that have finished.
    pub vcpus_done: u64,
    /// Pages written and verified (or read, for read-only regions).
    pub pages_touched: u64,
    /// Pages wrong although the mailbox did not change meanwhile.
    pub verify_errors: u64,
    /// Pages found changed by a concurrent unmap or protect (open bus or dropped write).
    pub vanished: u64,
    /// Passes over the region list.
    pub passes: u64,
    /// Lowest mailbox generation the vCPUs have acted on.
    pub generation_seen: u64,
    /// Reads of words the guest wrote in regions that were unmapped since (after the mailbox
    /// said so).
    pub unmapped_reads: u64,
    /// Of those, reads that still saw the written data: a stale mapping (must be 0).
    pub stale_reads: u64,
}

/// `check`: the address space against what KVM and the host have.
#[derive(Debug, Serialize, Deserialize)]
pub struct Check {
    /// No problem found.
    pub consistent: bool,
    /// What is wrong.
    pub problems: Vec<String>,
    /// Regions in the tree.
    pub regions: usize,
    /// Memslots KVM holds.
    pub memslots: usize,
    /// Regions without a memslot (served through exits).
    pub exit_served: usize,
    /// Failures injected so far.
    pub injected: u64,
}

/// The VMM as the control server sees it.
pub struct Vmm {
    space: Arc<AddressSpace>,
    shared: Arc<VcpuShared>,
    mailbox: Mailbox,
    cfg: Config,
    /// Serialises changes (validation against the limits, the change, the mailbox update).
    ops: Mutex<()>,
    inject: bool,
    clients: ClientCounters,
    events: events::Hub,
}

impl Vmm {
    /// The control view of a running VM. Publishes the mailbox with the run-time regions
    /// already mapped (none, except in a VM restored from a snapshot).
    pub fn new(h: &VmHandle, cfg: Config, inject: bool) -> Result<Self, String> {
        let mailbox = Mailbox::listing(Arc::clone(&h.space))
            .map_err(|e| format!("cannot write the hot-plug mailbox: {e}"))?;
        let vmm = Vmm {
            space: Arc::clone(&h.space),
            shared: Arc::clone(&h.shared),
            mailbox,
            cfg,
            ops: Mutex::new(()),
            inject,
            clients: ClientCounters::default(),
            events: events::Hub::default(),
        };
        Ok(vmm)
    }

    /// The limits.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The client counters the server keeps.
    pub fn clients(&self) -> &ClientCounters {
        &self.clients
    }

    /// The event subscribers.
    pub fn events(&self) -> &events::Hub {
        &self.events
    }

    /// Whether the test-only `inject` op is served.
    pub fn inject_enabled(&self) -> bool {
        self.inject
    }

    /// Tells subscribers that every vCPU has ended.
    pub fn publish_guest_exited(&self) {
        let guest = self.guest_progress();
        self.events
            .publish(EventKind::GuestExited, |seq| Event::GuestExited {
                seq,
                guest,
            });
    }

    /// Runs one request.
    pub fn execute(&self, req: Request) -> Result<Reply, ControlError> {
        // `--control-sched auto`: this client thread batch or not, by how often the vCPUs exit.
        self.shared.companion_tick();
        match req {
            Request::Map {
                gpa,
                size,
                backing,
                readonly,
            } => self.map(gpa, size, backing, readonly),
            Request::Unmap { gpa, size } => self.unmap(&[GpaRange { gpa, size }]),
            Request::UnmapBatch { ranges } => {
                if ranges.is_empty() {
                    return Err(ControlError::invalid(
                        "unmap_batch needs at least one range",
                    ));
                }
                if ranges.len() > MAX_BATCH {
                    return Err(ControlError::new(
                        Code::Limit,
                        format!(
                            "unmap_batch takes at most {MAX_BATCH} ranges, not {}",
                            ranges.len()
                        ),
                    ));
                }
                self.unmap(&ranges)
            }
            Request::Protect {
                gpa,
                size,
                readonly,
            } => {
                let _op = self.lock_ops();
                self.check_split_limit(&[(gpa, size)], true)?;
                let r = self
                    .mailbox
                    .change(|space| space.protect(gpa, size, readonly));
                tracing::debug!(
                    generation = self.mailbox.generation(),
                    ok = r.is_ok(),
                    "protect {gpa:#x}+{size:#x} readonly {readonly}"
                );
                let changed: Vec<RegionView> = r?.iter().map(RegionView::from).collect();
                self.events
                    .publish(EventKind::Protected, |seq| Event::Protected {
                        seq,
                        gpa,
                        size,
                        end: gpa + size,
                        readonly,
                        changed: changed.clone(),
                    });
                Ok(Reply::Protected(Protected { changed }))
            }
            Request::List {} => Ok(Reply::List(Listing {
                regions: views(&self.space),
                generation: self.mailbox.generation(),
            })),
            Request::Stats {} => Ok(Reply::Stats(Box::new(self.stats()))),
            Request::Check {} => Ok(Reply::Check(self.check())),
            Request::Stop {} => {
                self.mailbox.request_stop().map_err(|e| {
                    ControlError::new(Code::Internal, format!("cannot write the mailbox: {e}"))
                })?;
                Ok(Reply::Stopping(Stopping { stopping: true }))
            }
            Request::Subscribe { .. } | Request::Unsubscribe {} => Err(ControlError::invalid(
                "subscribe and unsubscribe are answered by the connection's server thread",
            )),
            Request::Snapshot {
                dir,
                stop,
                force,
                live,
            } => self.snapshot(&dir, stop, force, live),
            Request::Inject { step, nth } => {
                if !self.inject {
                    return Err(ControlError::invalid(format!(
                        "unknown op \"inject\" (test-only: start the VMM with {} set)",
                        inject::ENV
                    )));
                }
                inject::disarm_all();
                if let Some(s) = step {
                    inject::arm(s, nth);
                }
                Ok(Reply::Injecting(Injecting { step, nth }))
            }
        }
    }

    /// `snapshot`: pause every vCPU, write the snapshot, resume or stop. Other control ops
    /// wait meanwhile (the ops lock), so regions cannot change under it. With `live`, guest
    /// memory is copied first with the vCPUs running and their writes logged, and the pause
    /// only copies again what was written meanwhile.
    fn snapshot(
        &self,
        dir: &str,
        stop: bool,
        force: bool,
        live: bool,
    ) -> Result<Reply, ControlError> {
        use crate::snapshot::{self, SnapshotError};
        let _op = self.lock_ops();
        let path = std::path::PathBuf::from(dir);
        let to_ctl = |e: SnapshotError| match e {
            SnapshotError::Exists(_) => ControlError::invalid(e.to_string()),
            SnapshotError::Vm(_) => ControlError::invalid(e.to_string()),
            _ => ControlError::new(Code::Internal, e.to_string()),
        };
        snapshot::check_target(&path, force).map_err(to_ctl)?;
        let started = std::time::Instant::now();
        // Live: log every write from here on, then copy with the guest running.
        let log = if live {
            Some(self.space.start_dirty_log().map_err(|e| {
                ControlError::new(
                    Code::Internal,
                    format!("cannot log the guest's writes for a live snapshot: {e}"),
                )
            })?)
        } else {
            None
        };
        let read_log = |log: &crate::memory::DirtyLog<'_>| {
            log.take().map_err(|e| {
                SnapshotError::Vm(format!("cannot read the log of the guest's writes: {e}"))
            })
        };
        // Pre-copy rounds with the guest running: the first copies everything, each next one
        // what was written during the one before, while that shrinks; what the last leaves
        // (`carry`, taken from the log but not copied yet) goes to the pass in the pause.
        let mut carry = Vec::new();
        let mut rounds = 0;
        let precopied = match &log {
            Some(log) => {
                let mut pre = snapshot::precopy(&path, force, &self.space).map_err(to_ctl)?;
                rounds = 1;
                let mut last = pre.pages;
                while rounds < PRECOPY_ROUNDS {
                    let dirty = read_log(log).map_err(to_ctl)?;
                    if dirty.len() as u64 <= PRECOPY_SMALL {
                        carry = dirty;
                        break;
                    }
                    let n = pre.copy_again(&self.space, &dirty).map_err(to_ctl)?;
                    pre.pages += n;
                    rounds += 1;
                    if n >= last {
                        // Written as fast as copied: another round would not shrink it.
                        break;
                    }
                    last = n;
                }
                Some(pre)
            }
            None => None,
        };
        let pause_started = std::time::Instant::now();
        let (paused, states) = self
            .shared
            .pause
            .pause_all(self.cfg.vcpus as usize)
            .map_err(|e| ControlError::new(Code::Internal, format!("cannot pause: {e}")))?;
        let capture = snapshot::Capture {
            space: &self.space,
            shape: self.shared.shape.clone(),
            vcpus: &states.states,
            refused_msrs: &states.refused_msrs,
            devices: snapshot::DeviceState {
                serial: self.shared.devices.serial.save(),
            },
        };
        let (mut precopied_pages, mut recopied_pages) = (None, None);
        let pending = match (precopied, &log) {
            (Some(pre), Some(log)) => {
                precopied_pages = Some(pre.pages);
                read_log(log)
                    .and_then(|mut dirty| {
                        dirty.append(&mut carry);
                        pre.finish(&capture, &dirty)
                    })
                    .map(|(pending, again)| {
                        recopied_pages = Some(again);
                        pending
                    })
            }
            _ => snapshot::write_unpublished(&path, force, &capture),
        };
        let (written, paused_ms, stopped) = if stop {
            // The run ends with the vCPUs: the snapshot must be on disk and in place before
            // they let the VMM exit.
            let written = pending.and_then(snapshot::Pending::publish);
            let paused_ms = pause_started.elapsed().as_secs_f64() * 1e3;
            let stopped = written.is_ok();
            paused.resume(stopped);
            (written, paused_ms, stopped)
        } else {
            // The guest's state is captured (in the page cache): the guest goes on while the
            // files reach the disk.
            let paused_ms = pause_started.elapsed().as_secs_f64() * 1e3;
            paused.resume(false);
            (
                pending.and_then(snapshot::Pending::publish),
                paused_ms,
                false,
            )
        };
        drop(log);
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        let (pages, memory_bytes) = written.map_err(to_ctl)?;
        Ok(Reply::Snapshot(SnapshotView {
            dir: dir.to_owned(),
            pages,
            memory_bytes,
            regions: self.space.len(),
            vcpus: states.states.len(),
            paused_ms,
            total_ms,
            msrs_not_saved: states
                .refused_msrs
                .iter()
                .map(|m| format!("{m:#x}"))
                .collect(),
            stopped,
            precopied_pages,
            precopy_rounds: (rounds > 0).then_some(rounds),
            recopied_pages,
        }))
    }

    /// `check`.
    pub fn check(&self) -> Check {
        let _op = self.lock_ops();
        check(&self.space)
    }

    fn lock_ops(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn map(
        &self,
        gpa: u64,
        size: u64,
        backing: Backing,
        readonly: bool,
    ) -> Result<Reply, ControlError> {
        let _op = self.lock_ops();
        // Alignment, range, reserved ranges, the hot-plug window, overlap: the address
        // space's checks, before the control server's own limits.
        self.space
            .validate_map(gpa, size, backing, RegionKind::Hotplug)?;
        let hot: Vec<_> = views(&self.space)
            .into_iter()
            .filter(|r| r.kind == RegionKind::Hotplug)
            .collect();
        if hot.len() >= self.cfg.max_regions {
            return Err(ControlError::new(
                Code::Limit,
                format!(
                    "at most {} hot-plugged regions may be mapped at once (--max-regions)",
                    self.cfg.max_regions
                ),
            ));
        }
        let bytes: u64 = hot.iter().map(|r| r.size).sum();
        if bytes.saturating_add(size) > self.cfg.max_hotplug_bytes {
            return Err(ControlError::new(
                Code::Limit,
                format!(
                    "mapping {} more would exceed the limit of {} of hot-plugged memory \
                     ({} mapped; --max-hotplug-mem)",
                    fmt_size(size),
                    fmt_size(self.cfg.max_hotplug_bytes),
                    fmt_size(bytes)
                ),
            ));
        }
        if backing == Backing::Hugetlb {
            hugetlb_check(size)?;
        }
        // The generation goes odd before the region is published, not after: at the even
        // generation before, the guest must find the address a hole (see devices::mailbox).
        let info = self
            .mailbox
            .change(|space| space.map(gpa, size, backing, readonly, RegionKind::Hotplug))?;
        tracing::debug!(
            generation = self.mailbox.generation(),
            "map {gpa:#x}+{size:#x} {} readonly {readonly}",
            backing.name()
        );
        let region = RegionView::from(&info);
        self.events.publish(EventKind::Mapped, |seq| Event::Mapped {
            seq,
            region: region.clone(),
        });
        Ok(Reply::Mapped(region))
    }

    /// Unmaps `ranges` as one operation (`unmap`, `unmap_batch`): one event per range, and
    /// one reply with every piece removed.
    fn unmap(&self, ranges: &[GpaRange]) -> Result<Reply, ControlError> {
        let _op = self.lock_ops();
        let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.size)).collect();
        self.check_split_limit(&pairs, false)?;
        // The generation goes odd before memory goes away (see devices::mailbox).
        let r = self.mailbox.change(|space| space.unmap_many(&pairs));
        tracing::debug!(
            generation = self.mailbox.generation(),
            ok = r.is_ok(),
            ranges = pairs.len(),
            "unmap {:#x}+{:#x}",
            pairs[0].0,
            pairs[0].1
        );
        let (done, failed) = match r {
            Ok(done) => (done, None),
            Err(p) => (p.done, Some(p.error)),
        };
        let unmapped = done.len();
        let mut all = Vec::new();
        for (&GpaRange { gpa, size }, removed) in ranges.iter().zip(done) {
            let removed: Vec<RegionView> = removed.iter().map(RegionView::from).collect();
            self.events
                .publish(EventKind::Unmapped, |seq| Event::Unmapped {
                    seq,
                    gpa,
                    size,
                    end: gpa + size,
                    removed: removed.clone(),
                });
            all.extend(removed);
        }
        if let Some(e) = failed {
            let mut e = ControlError::from(e);
            if unmapped > 0 {
                // A host failure part way: say what is already gone (their events went out).
                tracing::warn!(unmapped, of = ranges.len(), error = %e, "a batched unmap failed part way");
                e.message += &format!(
                    "; the first {unmapped} of the {} ranges were unmapped before it, the rest are as they were",
                    ranges.len()
                );
            }
            return Err(e);
        }
        Ok(Reply::Unmapped(Unmapped { removed: all }))
    }

    /// Refuses an unmap/protect whose splits would take the hot-plugged regions over the
    /// limit. Malformed ranges are left to the address space to refuse.
    fn check_split_limit(&self, ranges: &[(u64, u64)], protect: bool) -> Result<(), ControlError> {
        let hot: Vec<_> = views(&self.space)
            .into_iter()
            .filter(|r| r.kind == RegionKind::Hotplug)
            .collect();
        let mut after = hot.len();
        for &(gpa, size) in ranges {
            if size == 0 || gpa % PAGE != 0 || size % PAGE != 0 {
                continue;
            }
            let Some(end) = gpa.checked_add(size) else {
                continue;
            };
            for r in hot.iter().filter(|r| r.gpa < end && gpa < r.end) {
                let left = r.gpa < gpa;
                let right = r.end > end;
                // unmap: the region goes, its outside parts stay; protect: its inside part
                // too.
                after = (after + usize::from(left) + usize::from(right) + usize::from(protect))
                    .saturating_sub(1);
            }
        }
        if after > self.cfg.max_regions {
            return Err(ControlError::new(
                Code::Limit,
                format!(
                    "this split would leave {after} hot-plugged regions; at most {} may be mapped (--max-regions)",
                    self.cfg.max_regions
                ),
            ));
        }
        Ok(())
    }

    /// What the guest reported in its results slots, read like any device reads guest memory:
    /// through the address space, under a read guard (this thread's reader goes offline again
    /// when it returns, so the changes this thread makes can wait for grace periods).
    pub fn guest_progress(&self) -> GuestProgress {
        use vm_memory::Bytes;
        let reader = self.space.domain().register();
        let guard = reader.read();
        let mem = crate::memory::GuardedMemory::new(&self.space, &guard);
        let mut g = GuestProgress {
            generation_seen: u64::MAX,
            ..Default::default()
        };
        for i in 0..u64::from(self.cfg.vcpus) {
            // `done` first (word 0): the guest writes it last.
            let r = abi::VcpuResult::from_words(std::array::from_fn(|k| {
                mem.load::<u64>(
                    vm_memory::GuestAddress(abi::result_addr(i) + 8 * k as u64),
                    std::sync::atomic::Ordering::Acquire,
                )
                .unwrap_or(0)
            }));
            g.vcpus_done += u64::from(r.done != 0);
            g.pages_touched += r.pages;
            g.verify_errors += r.verify_errors;
            g.vanished += r.vanished();
            g.passes += r.passes();
            g.generation_seen = g.generation_seen.min(r.generation_seen());
            let (unmapped, stale) = r.unmapped_and_stale_reads();
            g.unmapped_reads += unmapped;
            g.stale_reads += stale;
        }
        if g.generation_seen == u64::MAX {
            g.generation_seen = 0;
        }
        g
    }

    fn stats(&self) -> Stats {
        let list = views(&self.space);
        let c = self.space.counters.snapshot();
        let e = self.shared.exits.snapshot();
        let r = self.space.domain().stats();
        let hot: Vec<RegionView> = list
            .iter()
            .filter(|r| r.kind == RegionKind::Hotplug)
            .cloned()
            .collect();
        let l = &r.grace_period_latency;
        Stats {
            totals: Totals {
                regions: list.len(),
                hotplug_regions: hot.len(),
                hotplug_bytes: hot.iter().map(|r| r.size).sum(),
                resident_pages: list.iter().map(|r| r.resident_pages).sum(),
                faults: c.faults,
                pages_populated: c.pages_populated,
                populate_races: c.populate_races,
                huge_fills: c.huge_fills,
                unannotated_faults: c.unannotated_faults,
                open_bus_reads: c.open_bus_reads,
                open_bus_writes: c.open_bus_writes,
                readonly_writes: c.readonly_writes,
                maps: c.maps,
                unmaps: c.unmaps,
                protects: c.protects,
                teardown_errors: c.teardown_errors,
            },
            regions: hot,
            exits: Exits {
                total: e.total(),
                io: e.io,
                mmio: e.mmio,
                memory_fault: e.memory_fault,
                efault: e.efault,
                interrupted: e.interrupted,
                other: e.other,
            },
            rcu: RcuStats {
                grace_periods: r.grace_periods,
                synchronize_calls: r.synchronize_calls,
                grace_period_ns: Latency {
                    p50: l.quantile_ns(0.5),
                    p99: l.quantile_ns(0.99),
                    max: l.max_ns(),
                    mean: l.mean_ns(),
                },
                backlog: r.backlog,
                readers: r.readers,
            },
            guest: self.guest_progress(),
            generation: self.mailbox.generation(),
            host_rss_bytes: host_rss_bytes(),
            fault_mode: self.space.fault_mode(),
            address_space: self.space.implementation().to_owned(),
            control: ControlStats {
                clients: self.clients.connected.load(Ordering::Relaxed),
                max_clients: self.cfg.max_clients,
                clients_dropped_idle: self.clients.dropped_idle.load(Ordering::Relaxed),
                clients_evicted: self.clients.evicted.load(Ordering::Relaxed),
                subscribers: self.events.subscribers(),
                events_dropped: self.events.dropped(),
            },
        }
    }
}

/// What the `hotplug` workload reported, for the end-of-run line.
#[derive(Debug, Default)]
pub struct HotplugSummary {
    /// vCPUs that reported.
    pub vcpus: usize,
    /// Of those, finished.
    pub vcpus_done: usize,
    /// Pages touched.
    pub pages: u64,
    /// Verify errors.
    pub verify_errors: u64,
    /// Pages that vanished under the guest (open bus, dropped writes) during a change.
    pub vanished: u64,
    /// Passes.
    pub passes: u64,
    /// Reads of unmapped words after the unmap finished.
    pub unmapped_reads: u64,
    /// Of those, reads that saw the old data (must be 0).
    pub stale_reads: u64,
}

/// Sums the `hotplug` workload's results slots.
pub fn hotplug_summary(results: &[abi::VcpuResult]) -> HotplugSummary {
    let mut s = HotplugSummary {
        vcpus: results.len(),
        ..Default::default()
    };
    for r in results {
        s.vcpus_done += usize::from(r.done != 0);
        s.pages += r.pages;
        s.verify_errors += r.verify_errors;
        s.vanished += r.vanished();
        s.passes += r.passes();
        let (unmapped, stale) = r.unmapped_and_stale_reads();
        s.unmapped_reads += unmapped;
        s.stale_reads += stale;
    }
    s
}

impl std::fmt::Display for HotplugSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hotplug: {} pages touched, {} vanished under a change, {} reads after unmap ({} stale), {} passes, {}/{} vcpus done, {}",
            self.pages,
            self.vanished,
            self.unmapped_reads,
            self.stale_reads,
            self.passes,
            self.vcpus_done,
            self.vcpus,
            if self.verify_errors == 0 && self.stale_reads == 0 {
                "verify ok (0 errors)".to_owned()
            } else {
                format!(
                    "VERIFY FAILED ({} errors, {} stale reads)",
                    self.verify_errors, self.stale_reads
                )
            }
        )
    }
}

/// hugetlb needs free 2 MiB pages on the host (a clear error beats a SIGBUS on first touch).
fn hugetlb_check(size: u64) -> Result<(), ControlError> {
    let free = crate::memory::host::free_huge_pages();
    let need = size / (2 << 20);
    if free < need {
        return Err(ControlError::new(
            Code::Limit,
            format!(
                "hugetlb backing needs {need} free 2 MiB huge pages; the host has {free} \
                 (reserve some with `echo N > /proc/sys/vm/nr_hugepages`, or use backing anon or memfd)"
            ),
        ));
    }
    Ok(())
}

/// The process's resident set (`/proc/self/statm`).
pub fn host_rss_bytes() -> u64 {
    crate::memory::host::rss_bytes()
}

/// Compares the tree with the memslots KVM was given and the host mappings: every region has
/// its own memslot as KVM holds it, or lies in the hot-plug window whose memslot KVM holds;
/// KVM holds no other memslot; and inside the host reservation exactly the regions are
/// mapped readable (so no mapping the guest can reach lies outside a published region) and
/// exactly the writable ones writable (a read-only region in the window is read-only on the
/// host too: that is what stops the guest's writes).
fn check(space: &AddressSpace) -> Check {
    let list = space.list();
    let kvm = inject::kvm_slots();
    let window = space.hotplug_window();
    let window_slot = window.as_ref().map(|_| 0u32);
    let mut problems = Vec::new();
    let mut seen = BTreeMap::new();
    let mut exit_served = 0;
    let mut prev_end = 0;
    let windowed = |r: &RegionInfo| {
        r.slot.is_some()
            && r.slot == window_slot
            && window
                .as_ref()
                .is_some_and(|w| w.start <= r.gpa && r.gpa + r.size_bytes <= w.end)
    };
    if let (Some(w), Some(s)) = (&window, window_slot) {
        match kvm.get(&s) {
            Some(&(g, sz, false)) if (g, sz) == (w.start, w.end - w.start) => {}
            other => problems.push(format!(
                "the hot-plug window [{:#x}, {:#x}) should be memslot {s}, which KVM holds as {other:x?}",
                w.start, w.end
            )),
        }
        seen.insert(s, w.start);
    }
    for r in &list {
        if r.gpa < prev_end {
            problems.push(format!("region {:#x} overlaps the one before it", r.gpa));
        }
        prev_end = r.gpa + r.size_bytes;
        if windowed(r) {
            continue;
        }
        match r.slot {
            None => exit_served += 1,
            Some(s) => {
                if seen.insert(s, r.gpa).is_some() {
                    problems.push(format!("memslot {s} is used by two regions"));
                }
                match kvm.get(&s) {
                    Some(&(g, sz, ro)) if (g, sz, ro) == (r.gpa, r.size_bytes, r.readonly) => {}
                    Some(k) => problems.push(format!(
                        "region {:#x}+{:#x} ro={} has memslot {s}, which KVM holds as {:#x}+{:#x} ro={}",
                        r.gpa, r.size_bytes, r.readonly, k.0, k.1, k.2
                    )),
                    None => problems.push(format!(
                        "region {:#x} has memslot {s}, which KVM does not hold",
                        r.gpa
                    )),
                }
            }
        }
    }
    for (s, k) in &kvm {
        if !seen.contains_key(s) {
            problems.push(format!(
                "KVM holds memslot {s} ({:#x}+{:#x}) that no region has",
                k.0, k.1
            ));
        }
    }
    // Host mappings, inside the reservation.
    let base = space.host_addr(0);
    let limit = base + space.host().size_bytes();
    let as_host = |rs: &mut dyn Iterator<Item = &RegionInfo>| {
        merge(rs.map(|r| (base + r.gpa, base + r.gpa + r.size_bytes)))
    };
    let want_readable = as_host(&mut list.iter());
    let want_writable = as_host(&mut list.iter().filter(|r| !(r.readonly && windowed(r))));
    match std::fs::read_to_string("/proc/self/maps") {
        Ok(maps) => {
            let mapped = |prefix: &str| {
                merge(maps.lines().filter_map(|l| {
                    let (range, rest) = l.split_once(' ')?;
                    let (a, b) = range.split_once('-')?;
                    let (a, b) = (
                        u64::from_str_radix(a, 16).ok()?,
                        u64::from_str_radix(b, 16).ok()?,
                    );
                    (rest.starts_with(prefix) && a < limit && base < b)
                        .then(|| (a.max(base), b.min(limit)))
                }))
            };
            let fmt = |v: &[(u64, u64)]| {
                v.iter()
                    .take(8)
                    .map(|(a, b)| format!("[{:#x}, {:#x})", a - base, b - base))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let (mut have_r, mut have_w) = (mapped("r"), mapped("rw"));
            // Armed holes (vcpu fault mode, window mode): the hot-plug window outside its
            // regions stays mapped read-write, registered with userfaultfd, and must hold no
            // page: a guest access there is a fault the VMM completes as open bus.
            if let Some(w) = window.as_ref().filter(|_| space.armed()) {
                let holes = subtract(&[(base + w.start, base + w.end)], &want_readable);
                let armed = userfaultfd_ranges(base, limit);
                match armed {
                    Ok(armed) if contains(&armed, &holes) && contains(&have_w, &holes) => {}
                    Ok(_) => problems.push(format!(
                        "holes of the hot-plug window {} are not all read-write and registered with userfaultfd",
                        fmt(&holes)
                    )),
                    Err(e) => problems.push(format!("cannot read /proc/self/smaps: {e}")),
                }
                for &(a, b) in &holes {
                    match crate::memory::snapshot::count_populated(a, (b - a) / 4096) {
                        Ok(0) => {}
                        Ok(n) => problems.push(format!(
                            "{n} pages are populated in the hole [{:#x}, {:#x}) of the hot-plug window",
                            a - base,
                            b - base
                        )),
                        Err(e) => problems.push(format!("cannot read /proc/self/pagemap: {e}")),
                    }
                }
                have_r = subtract(&have_r, &holes);
                have_w = subtract(&have_w, &holes);
            }
            for (what, have, want) in [
                ("readable", have_r, &want_readable),
                ("writable", have_w, &want_writable),
            ] {
                if have != *want {
                    problems.push(format!(
                        "{what} host mappings (as guest-physical) {} differ from the regions {}",
                        fmt(&have),
                        fmt(want)
                    ));
                }
            }
        }
        Err(e) => problems.push(format!("cannot read /proc/self/maps: {e}")),
    }
    Check {
        consistent: problems.is_empty(),
        problems,
        regions: list.len(),
        memslots: kvm.len(),
        exit_served,
        injected: inject::injected(),
    }
}

/// The parts of the sorted, disjoint ranges `a` outside the sorted, disjoint ranges `b`.
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(mut s, e) in a {
        for &(bs, be) in b {
            if be <= s || bs >= e {
                continue;
            }
            if bs > s {
                out.push((s, bs));
            }
            s = s.max(be);
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// Whether the sorted, disjoint ranges `outer` cover every range of `inner`.
fn contains(outer: &[(u64, u64)], inner: &[(u64, u64)]) -> bool {
    subtract(inner, &merge(outer.iter().copied())).is_empty()
}

/// The process's mappings in `[base, limit)` registered with userfaultfd for missing pages
/// (`um` in their `VmFlags`, /proc/self/smaps), merged.
fn userfaultfd_ranges(base: u64, limit: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut out = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for l in smaps.lines() {
        if let Some(flags) = l.strip_prefix("VmFlags:") {
            if let Some((a, b)) = cur.take() {
                if flags.split_whitespace().any(|f| f == "um") && a < limit && base < b {
                    out.push((a.max(base), b.min(limit)));
                }
            }
            continue;
        }
        let Some((range, _)) = l.split_once(' ') else {
            continue;
        };
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                cur = Some((a, b));
            }
        }
    }
    Ok(merge(out.into_iter()))
}

fn merge(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<_> = ranges.collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

pub use crate::size::fmt_units as fmt_size;

/// The companion-thread body for `vmm run --api-sock`: serves `listener` until the run ends.
pub fn sidecar(listener: server::Listener, cfg: Config) -> crate::vm::Sidecar {
    Box::new(move |h: VmHandle| {
        let inject = match inject::enable_from_env() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("vmm: {e}");
                false
            }
        };
        let vmm = match Vmm::new(&h, cfg, inject) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                eprintln!("vmm: control socket disabled: {e}");
                return;
            }
        };
        server::serve(listener, &vmm, &h.stop);
    })
}

#[cfg(test)]
mod tests {
    use super::protocol::WireName;
    use super::*;

    #[test]
    fn sizes_and_merging() {
        assert_eq!(fmt_size(64 << 20), "64 MiB");
        assert_eq!(fmt_size(4096), "4 KiB");
        assert_eq!(fmt_size(4097), "4097 B");
        assert_eq!(
            merge([(5, 6), (0, 2), (2, 3), (1, 2)].into_iter()),
            vec![(0, 3), (5, 6)]
        );
    }

    #[test]
    fn region_views_carry_the_enums() {
        let info = RegionInfo {
            gpa: 0x80_0000,
            size_bytes: 0x80_0000,
            slot: Some(1),
            backing: Backing::Memfd,
            kind: RegionKind::Ram,
            readonly: false,
            resident_pages: 0,
            faults: 0,
        };
        let v = RegionView::from(&info);
        assert_eq!(
            (v.kind, v.backing, v.end),
            (RegionKind::Ram, Backing::Memfd, 0x100_0000)
        );
        let line = serde_json::to_string(&v).unwrap();
        assert_eq!(
            line,
            r#"{"gpa":"0x800000","size":8388608,"end":"0x1000000","slot":1,"backing":"memfd","kind":"ram","readonly":false,"resident_pages":0,"faults":0}"#
        );
        assert_eq!(serde_json::from_str::<RegionView>(&line).unwrap(), v);
        for k in [RegionKind::Boot, RegionKind::Ram, RegionKind::Hotplug] {
            assert_eq!(RegionKind::from_wire_name(k.name()), Some(k));
        }
    }

    #[test]
    fn idle_timeouts() {
        assert_eq!(
            parse_client_idle_timeout(DEFAULT_CLIENT_IDLE_TIMEOUT),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(
            parse_client_idle_timeout("0.5"),
            Ok(Duration::from_millis(500))
        );
        for bad in ["0", "0.001", "-1", "soon", "inf"] {
            assert!(parse_client_idle_timeout(bad).is_err(), "{bad}");
        }
    }
}
