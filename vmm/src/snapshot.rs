//! Snapshots of a running VM on disk: the format, writing one atomically while the vCPUs are
//! paused, and loading and checking one for `vmm run --restore` (docs/snapshot.md).
//!
//! A snapshot is a directory:
//!
//! | file | what |
//! |---|---|
//! | `manifest.json` | format name and version, the VM's shape, every region, the files' sizes and checksums |
//! | `manifest.sum` | the checksum of `manifest.json` |
//! | `memory.img` | guest memory: each region's pages at `file_offset + (gpa - region.gpa)`; only populated pages are written, the rest are holes (a sparse file) |
//! | `pages.bin` | the index: one `(gpa, checksum)` pair of little-endian `u64`s per page held, by address |
//! | `runs.bin` | the same pages as runs: one `(first gpa, pages)` pair of little-endian `u64`s per run of adjacent pages held, by address; what a restore that does not check every page reads instead of `pages.bin` (16 bytes a run instead of 16 a page). Snapshots written before it have none, and are read through `pages.bin` |
//! | `vcpus.json` | every vCPU's KVM state |
//! | `devices.json` | the UART's state and partial lines (the mailbox and exit port keep no state outside guest memory) |
//!
//! It is written into a temporary directory next to the target and renamed at the end, so a
//! crash never leaves a directory that restore accepts.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::control::protocol::named;
use crate::devices::serial::SerialSnapshot;
use crate::kvm::state::VcpuState;
use crate::memory::address_space::PAGE;
use crate::memory::residency::Residency;
use crate::memory::snapshot::{coalesce, populated_pages};
use crate::memory::{AddressSpace, AddressSpaceKind, Backing, MemslotMode, RegionKind};

/// The format's name in the manifest.
pub const FORMAT: &str = "vmm-snapshot";
/// The format version this VMM writes and reads.
pub const VERSION: u32 = 1;

/// The files of a snapshot.
pub const MANIFEST: &str = "manifest.json";
/// The manifest's checksum.
pub const MANIFEST_SUM: &str = "manifest.sum";
/// Guest memory.
pub const MEMORY: &str = "memory.img";
/// The page index.
pub const PAGES: &str = "pages.bin";
/// The page index as runs.
pub const RUNS: &str = "runs.bin";
/// vCPU state.
pub const VCPUS: &str = "vcpus.json";
/// Device state.
pub const DEVICES: &str = "devices.json";

/// Why a snapshot could not be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The target exists.
    #[error("{0}: already exists; choose another directory or pass --force to replace it")]
    Exists(PathBuf),
    /// A file is missing.
    #[error("{dir}: not a complete snapshot: {file} is missing")]
    Missing {
        /// The snapshot.
        dir: PathBuf,
        /// The file.
        file: &'static str,
    },
    /// A file is damaged.
    #[error("{dir}: corrupt snapshot: {file}: {why}")]
    Corrupt {
        /// The snapshot.
        dir: PathBuf,
        /// The file.
        file: &'static str,
        /// What is wrong.
        why: String,
    },
    /// Another format version.
    #[error("{dir}: snapshot format version {found}; this vmm reads version {VERSION} only")]
    Version {
        /// The snapshot.
        dir: PathBuf,
        /// The version found.
        found: u32,
    },
    /// I/O.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The VM cannot be snapshotted now.
    #[error("{0}")]
    Vm(String),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A 64-bit checksum (not cryptographic): every 8-byte word is mixed in with a multiply and a
/// rotation, both bijective, so a change of any one word always changes the result.
pub fn checksum(data: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (data.len() as u64).wrapping_mul(K);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = ((h ^ u64::from_le_bytes(b)).wrapping_mul(K)).rotate_left(29);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = ((h ^ u64::from_le_bytes(b)).wrapping_mul(K)).rotate_left(29);
    }
    h ^ (h >> 31)
}

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

/// One region in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRecord {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// `boot`, `ram` or `hotplug`.
    #[serde(with = "named")]
    pub kind: RegionKind,
    /// `anon`, `memfd` or `hugetlb`.
    #[serde(with = "named")]
    pub backing: Backing,
    /// Read-only to the guest.
    pub readonly: bool,
    /// Where its pages lie in `memory.img`.
    pub file_offset: u64,
}

/// Size and checksum of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    /// Bytes.
    pub bytes: u64,
    /// [`checksum`] of its contents, hex.
    pub checksum: String,
}

/// The VM's shape: what `vmm run --restore` rebuilds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM (`--mem`).
    pub mem_bytes: u64,
    /// `abi::workload` id.
    pub workload: u32,
    /// `--address-space`: `bonsai`, `rwlock` or `cow`.
    #[serde(with = "named")]
    pub address_space: AddressSpaceKind,
    /// `--ram-backing`: `anon`, `memfd` or `hugetlb`.
    #[serde(with = "named")]
    pub ram_backing: Backing,
    /// `--memslots`: `window` or `per-region`.
    #[serde(with = "named")]
    pub memslots: MemslotMode,
    /// `--hotplug-window` (0: none).
    pub hotplug_window: u64,
    /// `--fault-around` in effect: pages, or 0 for `adaptive`.
    pub fault_around: u64,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The vmm that wrote it.
    pub written_by: String,
    /// The VM.
    pub shape: Shape,
    /// Every region, by address.
    pub regions: Vec<RegionRecord>,
    /// Pages held in `memory.img`.
    pub pages: u64,
    /// Size of `memory.img` (holes included).
    pub memory_bytes: u64,
    /// Sizes and checksums of `pages.bin`, `vcpus.json`, `devices.json` (`memory.img` is
    /// checked page by page against `pages.bin`).
    pub files: BTreeMap<String, FileSum>,
    /// MSRs KVM refused to read when the snapshot was taken (hex).
    pub msrs_not_saved: Vec<String>,
}

/// `devices.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceState {
    /// The UART.
    pub serial: SerialSnapshot,
}

/// Everything a snapshot holds, gathered while the vCPUs are paused.
pub struct Capture<'a> {
    /// Guest memory.
    pub space: &'a AddressSpace,
    /// The VM's shape.
    pub shape: Shape,
    /// vCPU states.
    pub vcpus: &'a [VcpuState],
    /// MSRs not saved.
    pub refused_msrs: &'a [u32],
    /// Devices.
    pub devices: DeviceState,
}

fn tmp_dir_for(dir: &Path) -> Result<PathBuf, SnapshotError> {
    let name = dir
        .file_name()
        .ok_or_else(|| SnapshotError::Vm(format!("{}: not a directory name", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Ok(parent.join(format!(
        ".{}.tmp-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Checks that `dir` may be written (before pausing anything).
pub fn check_target(dir: &Path, force: bool) -> Result<(), SnapshotError> {
    if dir.as_os_str().is_empty() {
        return Err(SnapshotError::Vm(
            "the snapshot directory must not be empty".into(),
        ));
    }
    if dir.symlink_metadata().is_ok() && !force {
        return Err(SnapshotError::Exists(dir.to_owned()));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(SnapshotError::Vm(format!(
            "{}: the parent directory does not exist",
            dir.display()
        )));
    }
    Ok(())
}

/// Creates (or truncates) `path` readable and writable by this user only: a snapshot holds
/// guest memory and register state, which other local users must not read.
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Writes `bytes` into `dir/name` (into the page cache: [`Pending::publish`] makes every file
/// durable).
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileSum, SnapshotError> {
    let path = dir.join(name);
    let mut f = create_private(&path).map_err(io_err("cannot create", &path))?;
    f.write_all(bytes).map_err(io_err("cannot write", &path))?;
    Ok(FileSum {
        bytes: bytes.len() as u64,
        checksum: hex(checksum(bytes)),
    })
}

/// Most bytes copied out of guest memory at once.
const COPY_CHUNK_PAGES: u64 = 256;

/// What [`write_memory`] wrote.
struct WrittenMemory {
    regions: Vec<RegionRecord>,
    /// The runs of pages written, as `(gpa, pages, offset in memory.img)`, by address, at most
    /// [`COPY_CHUNK_PAGES`] each: what `pages.bin` is computed from (see [`Pending::publish`]).
    chunks: Vec<(u64, u64, u64)>,
    /// `runs.bin`'s bytes.
    runs: Vec<u8>,
    /// Pages written.
    pages: u64,
    /// `memory.img`'s size.
    bytes: u64,
}

/// `memory.img` being written: the regions' layout in it, and the runs of pages copied in so
/// far.
struct MemoryImage {
    file: File,
    path: PathBuf,
    regions: Vec<RegionRecord>,
    /// The file's size.
    bytes: u64,
    /// `(gpa, pages)` copied, in the order copied (each pass by address; a page copied again
    /// by a later pass appears again).
    copied: Vec<(u64, u64)>,
}

impl MemoryImage {
    /// Lays the regions of `space` out in a new `dir/memory.img` (each at an offset aligned to
    /// its backing's page size), empty.
    fn create(space: &AddressSpace, dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(MEMORY);
        let file = create_private(&path).map_err(io_err("cannot create", &path))?;
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for r in space.list() {
            offset = offset.next_multiple_of(r.backing.align_bytes());
            regions.push(RegionRecord {
                gpa: r.gpa,
                size: r.size_bytes,
                kind: r.kind,
                backing: r.backing,
                readonly: r.readonly,
                file_offset: offset,
            });
            offset += r.size_bytes;
        }
        file.set_len(offset).map_err(io_err("cannot size", &path))?;
        Ok(MemoryImage {
            file,
            path,
            regions,
            bytes: offset,
            copied: Vec::new(),
        })
    }

    /// Copies into the file the pages that hold data (present in host memory, or still only
    /// in the snapshot this VM was restored from: not served yet by a lazy restore, or
    /// untouched under a `kernel` restore's file mapping) and that `pick(pfn, present)`
    /// selects. Returns the pages copied.
    fn copy(
        &mut self,
        space: &AddressSpace,
        mut pick: impl FnMut(u64, bool) -> bool,
    ) -> Result<u64, SnapshotError> {
        let source = space.source();
        let path = &self.path;
        let file_held = space
            .file_held()
            .map_err(io_err("cannot read the data file mapped under", path))?;
        let held = |pfn: u64| {
            source.is_some_and(|s| s.has(pfn)) || file_held.as_ref().is_some_and(|f| f.has(pfn))
        };
        let unreadable = |pfn: u64, e: String| {
            SnapshotError::Vm(format!(
                "page {:#x} of the snapshot this VM was restored from is unreadable: {e}",
                pfn * PAGE
            ))
        };
        let mut buf = vec![0u8; (COPY_CHUNK_PAGES * PAGE) as usize];
        let mut total = 0;
        for r in &self.regions {
            let npages = r.size / PAGE;
            let present = populated_pages(space.host_addr(r.gpa), npages)
                .map_err(io_err("cannot read", Path::new("/proc/self/pagemap")))?;
            let first_pfn = r.gpa / PAGE;
            let wanted = |p: u64, pick: &mut dyn FnMut(u64, bool) -> bool| {
                let here = present[p as usize];
                (here || held(first_pfn + p)) && pick(first_pfn + p, here)
            };
            let mut p = 0u64;
            while p < npages {
                let pfn = first_pfn + p;
                let here = present[p as usize];
                if !wanted(p, &mut pick) {
                    p += 1;
                    continue;
                }
                // A run of wanted pages of the same kind (in host memory, or still only in
                // the snapshot this VM was restored from).
                let mut e = p + 1;
                while e < npages
                    && e - p < COPY_CHUNK_PAGES
                    && present[e as usize] == here
                    && wanted(e, &mut pick)
                {
                    e += 1;
                }
                let n = e - p;
                let bytes = &mut buf[..(n * PAGE) as usize];
                if here {
                    space
                        .copy_out(r.gpa + p * PAGE, bytes)
                        .map_err(io_err("cannot read guest memory for", path))?;
                } else if let Some(f) = file_held.as_ref().filter(|f| f.has(pfn)) {
                    // Still the data file's page under a `kernel` restore: from the file (not
                    // through the mapping, which would raise SIGBUS if the file was cut).
                    f.read(pfn, bytes)
                        .map_err(|e| unreadable(pfn, e.to_string()))?;
                } else {
                    source
                        .ok_or_else(|| "no snapshot".to_owned())
                        .and_then(|s| {
                            s.with_data(pfn, n, |d| bytes.copy_from_slice(d))
                                .map_err(|e| e.to_string())
                        })
                        .map_err(|e| unreadable(pfn, e))?;
                }
                self.file
                    .write_all_at(bytes, r.file_offset + p * PAGE)
                    .map_err(io_err("cannot write", path))?;
                self.copied.push((pfn * PAGE, n));
                total += n;
                p = e;
            }
        }
        Ok(total)
    }

    /// The pages copied in any pass, as a bitmap by page number.
    fn copied_pages(&self) -> Residency {
        let end = self
            .regions
            .iter()
            .map(|r| r.gpa + r.size)
            .max()
            .unwrap_or(0);
        let set = Residency::new(end);
        for &(gpa, n) in &self.copied {
            set.set_range(gpa / PAGE, n);
        }
        set
    }

    /// The file is complete: its regions, page runs and chunks.
    fn finish(self) -> WrittenMemory {
        // Runs of adjacent pages held: (first gpa, pages), by address (a page copied again by
        // a later pass counts once).
        let runs = coalesce(&self.copied, usize::MAX);
        // Chunks for the page index: inside one region, at most COPY_CHUNK_PAGES each.
        let mut chunks = Vec::new();
        for &(first, n) in &runs {
            let (mut gpa, end) = (first, first + n * PAGE);
            while gpa < end {
                let Some(r) = self
                    .regions
                    .iter()
                    .find(|r| r.gpa <= gpa && gpa < r.gpa + r.size)
                else {
                    break;
                };
                let stop = end.min(r.gpa + r.size).min(gpa + COPY_CHUNK_PAGES * PAGE);
                chunks.push((gpa, (stop - gpa) / PAGE, r.file_offset + (gpa - r.gpa)));
                gpa = stop;
            }
        }
        let pages = runs.iter().map(|(_, n)| n).sum();
        WrittenMemory {
            regions: self.regions,
            chunks,
            runs: encode_runs(&runs),
            pages,
            bytes: self.bytes,
        }
    }
}

/// Writes guest memory into `memory.img` and returns the regions, the indexes and the file's
/// size.
fn write_memory(space: &AddressSpace, dir: &Path) -> Result<WrittenMemory, SnapshotError> {
    let mut image = MemoryImage::create(space, dir)?;
    image.copy(space, |_, _| true)?;
    Ok(image.finish())
}

/// Writes the snapshot into `dir` (atomically: a temporary directory renamed at the end; an
/// existing `dir` is replaced only with `force`). The caller has paused every vCPU.
pub fn write(dir: &Path, force: bool, cap: &Capture<'_>) -> Result<(u64, u64), SnapshotError> {
    write_unpublished(dir, force, cap)?.publish()
}

/// Writes the snapshot's files into a temporary directory next to `dir`, through the page
/// cache: what the guest's memory and vCPUs hold is captured when this returns, so the caller
/// may resume the vCPUs, and then [`Pending::publish`] makes it durable and renames it to
/// `dir`. (Waiting for the disk with the vCPUs paused made a 2 GiB snapshot pause the guest
/// for the whole write: 6.5-7.5 s here, where the copy alone takes about 1.5 s.)
pub fn write_unpublished(
    dir: &Path,
    force: bool,
    cap: &Capture<'_>,
) -> Result<Pending, SnapshotError> {
    check_target(dir, force)?;
    let tmp = TmpDir {
        path: tmp_dir_for(dir)?,
        keep: false,
    };
    let staged = write_into(&tmp.path, cap)?;
    Ok(Pending {
        tmp,
        dir: dir.to_owned(),
        force,
        staged,
    })
}

/// A snapshot's temporary directory, removed when dropped unless `keep` (it was renamed into
/// place).
struct TmpDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// What a snapshot still needs once the guest's state is written: the page index
/// (`pages.bin`, a checksum per page, computed from `memory.img` as written) and the manifest.
struct Staged {
    manifest: Manifest,
    chunks: Vec<(u64, u64, u64)>,
}

/// A snapshot written into its temporary directory ([`write_unpublished`]), neither durable
/// nor visible as `dir` yet. Dropped without [`publish`](Self::publish) (or if publishing
/// fails), the temporary directory is removed.
#[must_use = "a pending snapshot is removed unless it is published"]
pub struct Pending {
    tmp: TmpDir,
    dir: PathBuf,
    force: bool,
    staged: Staged,
}

impl Pending {
    /// Writes the page index (each page's checksum, read back from `memory.img` in the page
    /// cache: computing them with the vCPUs paused was a tenth of the pause) and the manifest,
    /// `fsync`s every file and the temporary directory, then renames it to the target (with
    /// `force`, an existing target is moved aside first and removed after). Returns the pages
    /// and bytes of guest memory written.
    pub fn publish(self) -> Result<(u64, u64), SnapshotError> {
        let Pending {
            mut tmp,
            dir,
            force,
            staged: Staged {
                mut manifest,
                chunks,
            },
        } = self;
        let pages = manifest.pages;
        let path = tmp.path.join(MEMORY);
        let memory = File::open(&path).map_err(io_err("cannot open", &path))?;
        let mut index = Vec::with_capacity(pages as usize * 16);
        let mut buf = vec![0u8; (COPY_CHUNK_PAGES * PAGE) as usize];
        for (gpa, n, offset) in chunks {
            let bytes = &mut buf[..(n * PAGE) as usize];
            memory
                .read_exact_at(bytes, offset)
                .map_err(io_err("cannot read", &path))?;
            for (k, page) in bytes.chunks_exact(PAGE as usize).enumerate() {
                index.extend_from_slice(&(gpa + k as u64 * PAGE).to_le_bytes());
                index.extend_from_slice(&checksum(page).to_le_bytes());
            }
        }
        manifest
            .files
            .insert(PAGES.to_owned(), write_file(&tmp.path, PAGES, &index)?);
        let m = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| SnapshotError::Vm(format!("cannot encode the manifest: {e}")))?;
        let sum = write_file(&tmp.path, MANIFEST, &m)?;
        write_file(
            &tmp.path,
            MANIFEST_SUM,
            format!("{}\n", sum.checksum).as_bytes(),
        )?;
        for e in fs::read_dir(&tmp.path).map_err(io_err("cannot read", &tmp.path))? {
            let path = e.map_err(io_err("cannot read", &tmp.path))?.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err("cannot sync", &path))?;
        }
        File::open(&tmp.path)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot sync", &tmp.path))?;
        publish(&tmp.path, &dir, force)?;
        tmp.keep = true;
        Ok((pages, pages * PAGE))
    }
}

/// Creates the snapshot's temporary directory, this user's only (like the files in it: see
/// `create_private`).
fn create_tmp(tmp: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(tmp)
        .map_err(io_err("cannot create", tmp))
}

/// Writes the guest's state into `tmp` (created here), unsynced: `memory.img`, `runs.bin`,
/// `vcpus.json` and `devices.json`; the rest is staged for [`Pending::publish`]. On an error the
/// caller removes `tmp`.
fn write_into(tmp: &Path, cap: &Capture<'_>) -> Result<Staged, SnapshotError> {
    create_tmp(tmp)?;
    let memory = write_memory(cap.space, tmp)?;
    stage(tmp, cap, memory)
}

/// Writes `runs.bin`, `vcpus.json` and `devices.json` into `tmp` beside the finished
/// `memory.img`, and stages the manifest.
fn stage(tmp: &Path, cap: &Capture<'_>, memory: WrittenMemory) -> Result<Staged, SnapshotError> {
    let WrittenMemory {
        regions,
        chunks,
        runs,
        pages,
        bytes: memory_bytes,
    } = memory;
    let mut files = BTreeMap::new();
    files.insert(RUNS.to_owned(), write_file(tmp, RUNS, &runs)?);
    let vcpus = serde_json::to_vec(cap.vcpus)
        .map_err(|e| SnapshotError::Vm(format!("cannot encode the vCPU state: {e}")))?;
    files.insert(VCPUS.to_owned(), write_file(tmp, VCPUS, &vcpus)?);
    let devices = serde_json::to_vec(&cap.devices)
        .map_err(|e| SnapshotError::Vm(format!("cannot encode the device state: {e}")))?;
    files.insert(DEVICES.to_owned(), write_file(tmp, DEVICES, &devices)?);
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        version: VERSION,
        written_by: format!("vmm {}", env!("CARGO_PKG_VERSION")),
        shape: cap.shape.clone(),
        regions,
        pages,
        memory_bytes,
        files,
        msrs_not_saved: cap.refused_msrs.iter().map(|m| format!("{m:#x}")).collect(),
    };
    Ok(Staged { manifest, chunks })
}

/// A live snapshot's first pass ([`precopy`]): guest memory copied into a temporary
/// directory while the guest ran and its writes were logged.
#[must_use = "a pre-copied snapshot is removed unless it is finished and published"]
pub struct PreCopied {
    tmp: TmpDir,
    dir: PathBuf,
    force: bool,
    image: MemoryImage,
    /// Pages copied by the first pass.
    pub pages: u64,
}

impl std::fmt::Debug for PreCopied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreCopied")
            .field("dir", &self.dir)
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

/// The first pass of a live snapshot (`vmm ctl snapshot --live`), with the vCPUs running:
/// copies every page that holds data into `memory.img` in a temporary directory next to
/// `dir`. The caller has opened a [`crate::memory::DirtyLog`] first, so that every page
/// written from then on is known; [`PreCopied::finish`] copies those again with the vCPUs
/// paused.
pub fn precopy(dir: &Path, force: bool, space: &AddressSpace) -> Result<PreCopied, SnapshotError> {
    check_target(dir, force)?;
    let tmp = TmpDir {
        path: tmp_dir_for(dir)?,
        keep: false,
    };
    create_tmp(&tmp.path)?;
    let mut image = MemoryImage::create(space, &tmp.path)?;
    let pages = image.copy(space, |_, _| true)?;
    Ok(PreCopied {
        tmp,
        dir: dir.to_owned(),
        force,
        image,
        pages,
    })
}

impl PreCopied {
    /// Copies again the pages written since the last pass (`dirty`, page numbers from the
    /// write log) and the pages that came to hold data since (populated by first touches);
    /// returns how many. With the vCPUs running this is another pre-copy round (the log keeps
    /// what they write meanwhile); with them paused, the last.
    pub fn copy_again(
        &mut self,
        space: &AddressSpace,
        dirty: &[u64],
    ) -> Result<u64, SnapshotError> {
        let copied = self.image.copied_pages();
        let written = Residency::new(copied.pages() * PAGE);
        for &pfn in dirty.iter().filter(|&&p| p < written.pages()) {
            written.set_range(pfn, 1);
        }
        self.image.copy(space, |pfn, present| {
            written.is_present(pfn) || (present && !copied.is_present(pfn))
        })
    }

    /// The last pass, with the vCPUs paused: [`copy_again`](Self::copy_again), then the rest
    /// of the guest's state. Returns the snapshot, to publish as [`write_unpublished`]'s, and
    /// the pages this pass copied.
    pub fn finish(
        mut self,
        cap: &Capture<'_>,
        dirty: &[u64],
    ) -> Result<(Pending, u64), SnapshotError> {
        let again = self.copy_again(cap.space, dirty)?;
        let staged = stage(&self.tmp.path, cap, self.image.finish())?;
        Ok((
            Pending {
                tmp: self.tmp,
                dir: self.dir,
                force: self.force,
                staged,
            },
            again,
        ))
    }
}

/// Renames the finished temporary directory to `dir` (moving an existing `dir` aside first
/// with `force`, and removing it afterwards).
fn publish(tmp: &Path, dir: &Path, force: bool) -> Result<(), SnapshotError> {
    let old = if force && dir.symlink_metadata().is_ok() {
        let aside = tmp.with_extension("old");
        fs::rename(dir, &aside).map_err(io_err("cannot move aside", dir))?;
        Some(aside)
    } else {
        None
    };
    fs::rename(tmp, dir).map_err(io_err("cannot rename the snapshot into", dir))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = File::open(parent).and_then(|d| d.sync_all());
    }
    if let Some(old) = old {
        let _ = if old.is_dir() {
            fs::remove_dir_all(&old)
        } else {
            fs::remove_file(&old)
        };
    }
    Ok(())
}

/// A snapshot read back and checked.
pub struct Loaded {
    /// The directory.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// `memory.img`, open.
    pub memory: File,
    /// The index: (gpa, checksum) of every page held, by address.
    pub pages: PageIndex,
    /// vCPU states.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DeviceState,
}

/// The page index as read: `pages.bin`'s `(gpa, checksum)` entries of 16 bytes, decoded as
/// they are walked (a copy of gigabytes' worth of entries would cost the restore
/// milliseconds), or `runs.bin`'s runs when the pages are not checked one by one.
#[derive(Debug)]
pub enum PageIndex {
    /// `pages.bin`: a `(gpa, checksum)` entry per page, by address.
    Pages(Vec<u8>),
    /// `runs.bin`: `(first gpa, end gpa)` of each run of adjacent pages, by address, and the
    /// number of pages in all.
    Runs(Vec<(u64, u64)>, usize),
}

impl PageIndex {
    /// Pages in the index.
    pub fn count(&self) -> usize {
        match self {
            PageIndex::Pages(b) => b.len() / 16,
            PageIndex::Runs(_, n) => *n,
        }
    }

    /// `(gpa, checksum)` of every page, by address: only `pages.bin` has the checksums.
    pub fn checksums(&self) -> Option<impl Iterator<Item = (u64, u64)> + '_> {
        match self {
            PageIndex::Pages(b) => Some(b.chunks_exact(16).map(pair)),
            PageIndex::Runs(..) => None,
        }
    }

    /// `(first gpa, end gpa)` of every run of adjacent pages, by address.
    pub fn runs(&self) -> Box<dyn Iterator<Item = (u64, u64)> + '_> {
        match self {
            PageIndex::Runs(r, _) => Box::new(r.iter().copied()),
            PageIndex::Pages(b) => Box::new(
                crate::memory::snapshot::runs_of(b.chunks_exact(16).map(|e| pair(e).0)).into_iter(),
            ),
        }
    }

    /// The address of every page, by address.
    pub fn gpas(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs()
            .flat_map(|(first, end)| (first..end).step_by(PAGE as usize))
    }
}

/// Encodes `runs.bin`: a `(first gpa, pages)` pair of little-endian `u64`s per run.
fn encode_runs(runs: &[(u64, u64)]) -> Vec<u8> {
    runs.iter()
        .flat_map(|&(gpa, n)| [gpa.to_le_bytes(), n.to_le_bytes()])
        .flatten()
        .collect()
}

/// Decodes `runs.bin`: `(first gpa, pages)` pairs, each run page-aligned, not empty, after the
/// one before (not touching it: the writer merges adjacent runs).
fn parse_runs(bytes: &[u8]) -> Result<PageIndex, String> {
    if bytes.len() % 16 != 0 {
        return Err(format!("{} bytes, not a whole number of runs", bytes.len()));
    }
    let mut runs = Vec::with_capacity(bytes.len() / 16);
    let mut count = 0usize;
    let mut prev_end = 0u64;
    for (first, n) in bytes.chunks_exact(16).map(pair) {
        let end = n
            .checked_mul(PAGE)
            .and_then(|len| first.checked_add(len))
            .ok_or_else(|| format!("run {first:#x} of {n} pages ends beyond 2^64"))?;
        if first % PAGE != 0 || n == 0 || (!runs.is_empty() && first <= prev_end) {
            return Err(format!(
                "run {first:#x} of {n} pages is empty, unaligned or out of order"
            ));
        }
        runs.push((first, end));
        count = usize::try_from(n)
            .ok()
            .and_then(|n| count.checked_add(n))
            .ok_or("too many pages")?;
        prev_end = end;
    }
    Ok(PageIndex::Runs(runs, count))
}

/// The two little-endian `u64`s of a 16-byte index entry.
fn pair(e: &[u8]) -> (u64, u64) {
    let (mut a, mut b) = ([0u8; 8], [0u8; 8]);
    a.copy_from_slice(&e[..8]);
    b.copy_from_slice(&e[8..16]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

/// What a failed access to the snapshot's file `name` means: a missing file, or an I/O error
/// while doing `what`.
fn file_error<'a>(
    dir: &'a Path,
    name: &'static str,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |e| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing {
            dir: dir.to_owned(),
            file: name,
        },
        _ => SnapshotError::Io {
            what,
            path: dir.join(name),
            source: e,
        },
    }
}

fn read_file(dir: &Path, name: &'static str) -> Result<Vec<u8>, SnapshotError> {
    fs::read(dir.join(name)).map_err(file_error(dir, name, "cannot read"))
}

/// How much of the memory file to check when loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Every page against its checksum, before the guest runs.
    Full,
    /// The manifest, index, vCPU and device files only (pages are not read ahead).
    Meta,
}

/// Reads and checks the snapshot in `dir`. Nothing of the VM exists yet: any error here means
/// no guest instruction runs.
pub fn load(dir: &Path, verify: Verify) -> Result<Loaded, SnapshotError> {
    let corrupt = |file: &'static str, why: String| SnapshotError::Corrupt {
        dir: dir.to_owned(),
        file,
        why,
    };
    if !dir.is_dir() {
        return Err(SnapshotError::Vm(format!(
            "{}: no such snapshot directory",
            dir.display()
        )));
    }
    let m = read_file(dir, MANIFEST)?;
    let value: serde_json::Value =
        serde_json::from_slice(&m).map_err(|e| corrupt(MANIFEST, format!("not JSON: {e}")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(corrupt(MANIFEST, format!("not a {FORMAT} manifest")));
    }
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    match version {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(SnapshotError::Version {
                dir: dir.to_owned(),
                found: u32::try_from(v).unwrap_or(u32::MAX),
            })
        }
        None => return Err(corrupt(MANIFEST, "no format version".into())),
    }
    let sum = read_file(dir, MANIFEST_SUM)?;
    if String::from_utf8_lossy(&sum).trim() != hex(checksum(&m)) {
        return Err(corrupt(
            MANIFEST,
            format!("checksum mismatch (against {MANIFEST_SUM})"),
        ));
    }
    let manifest: Manifest =
        serde_json::from_value(value).map_err(|e| corrupt(MANIFEST, e.to_string()))?;
    let checked = |name: &'static str| -> Result<Vec<u8>, SnapshotError> {
        let bytes = read_file(dir, name)?;
        let want = manifest
            .files
            .get(name)
            .ok_or_else(|| corrupt(MANIFEST, format!("does not list {name}")))?;
        if bytes.len() as u64 != want.bytes {
            return Err(corrupt(
                name,
                format!("{} bytes, the manifest says {}", bytes.len(), want.bytes),
            ));
        }
        if hex(checksum(&bytes)) != want.checksum {
            return Err(corrupt(name, "checksum mismatch".into()));
        }
        Ok(bytes)
    };
    // `pages.bin` is read whole only where its checksums are needed (every page checked) or
    // there is no `runs.bin` (a snapshot written before it); otherwise only its size is
    // checked, and the runs are read: 16 bytes a run instead of 16 a page, milliseconds less
    // before the guest runs at gigabytes of snapshot.
    let with_runs = manifest.files.contains_key(RUNS);
    let read_runs = || -> Result<PageIndex, SnapshotError> {
        parse_runs(&checked(RUNS)?).map_err(|why| corrupt(RUNS, why))
    };
    let pages = if verify == Verify::Meta && with_runs {
        let want = manifest
            .files
            .get(PAGES)
            .ok_or_else(|| corrupt(MANIFEST, format!("does not list {PAGES}")))?;
        let len = fs::metadata(dir.join(PAGES))
            .map_err(file_error(dir, PAGES, "cannot read"))?
            .len();
        if len != want.bytes || len != manifest.pages.saturating_mul(16) {
            return Err(corrupt(
                PAGES,
                format!("{len} bytes, the manifest says {}", want.bytes),
            ));
        }
        read_runs()?
    } else {
        let index = checked(PAGES)?;
        if index.len() % 16 != 0 {
            return Err(corrupt(PAGES, "not a whole number of entries".into()));
        }
        let pages = PageIndex::Pages(index);
        if with_runs && !read_runs()?.runs().eq(pages.runs()) {
            return Err(corrupt(
                RUNS,
                format!("does not list the pages {PAGES} does"),
            ));
        }
        pages
    };
    let vcpus: Vec<VcpuState> =
        serde_json::from_slice(&checked(VCPUS)?).map_err(|e| corrupt(VCPUS, e.to_string()))?;
    let devices: DeviceState =
        serde_json::from_slice(&checked(DEVICES)?).map_err(|e| corrupt(DEVICES, e.to_string()))?;
    if vcpus.len() != manifest.shape.vcpus as usize {
        return Err(corrupt(
            VCPUS,
            format!(
                "{} vCPUs, the manifest says {}",
                vcpus.len(),
                manifest.shape.vcpus
            ),
        ));
    }
    if pages.count() as u64 != manifest.pages {
        let file = if matches!(pages, PageIndex::Runs(..)) {
            RUNS
        } else {
            PAGES
        };
        return Err(corrupt(file, "wrong size for the number of pages".into()));
    }
    check_layout(&manifest, &pages).map_err(|why| corrupt(MANIFEST, why))?;
    let path = dir.join(MEMORY);
    let memory = File::open(&path).map_err(file_error(dir, MEMORY, "cannot open"))?;
    let len = memory
        .metadata()
        .map_err(io_err("cannot read", &path))?
        .len();
    if len != manifest.memory_bytes {
        return Err(corrupt(
            MEMORY,
            format!("{len} bytes, the manifest says {}", manifest.memory_bytes),
        ));
    }
    let loaded = Loaded {
        dir: dir.to_owned(),
        manifest,
        memory,
        pages,
        vcpus,
        devices,
    };
    if verify == Verify::Full {
        loaded.verify_pages()?;
    }
    Ok(loaded)
}

/// Regions sorted, non-overlapping, page-aligned, inside the file; pages sorted and inside
/// regions.
fn check_layout(m: &Manifest, pages: &PageIndex) -> Result<(), String> {
    let mut end = 0u64;
    let mut file_end = 0u64;
    for r in &m.regions {
        if r.gpa % PAGE != 0 || r.size % PAGE != 0 || r.size == 0 || r.file_offset % PAGE != 0 {
            return Err(format!(
                "region {:#x}+{:#x} is not page-aligned",
                r.gpa, r.size
            ));
        }
        if r.gpa < end || r.file_offset < file_end {
            return Err(format!("region {:#x} overlaps the one before", r.gpa));
        }
        end = r.gpa.checked_add(r.size).ok_or("region beyond 2^64")?;
        file_end = r
            .file_offset
            .checked_add(r.size)
            .ok_or("file beyond 2^64")?;
    }
    if file_end > m.memory_bytes {
        return Err("regions lie beyond memory.img".into());
    }
    // Pages sorted (checked here for `pages.bin`; `runs.bin`'s order was checked as it was
    // read), each in a region.
    if let Some(entries) = pages.checksums() {
        let mut prev: Option<u64> = None;
        for (gpa, _) in entries {
            if gpa % PAGE != 0 || prev.is_some_and(|p| gpa <= p) {
                return Err(format!("page {gpa:#x} out of order in the index"));
            }
            prev = Some(gpa);
        }
    }
    let mut ri = 0usize;
    for (first, end) in pages.runs() {
        let mut at = first;
        while at < end {
            while ri < m.regions.len() && m.regions[ri].gpa + m.regions[ri].size <= at {
                ri += 1;
            }
            match m.regions.get(ri) {
                Some(r) if r.gpa <= at => at = end.min(r.gpa + r.size),
                _ => return Err(format!("page {at:#x} lies in no region")),
            }
        }
    }
    Ok(())
}

impl Loaded {
    /// Where page `gpa` lies in `memory.img`.
    pub fn file_offset(&self, gpa: u64) -> Option<u64> {
        let rs = &self.manifest.regions;
        let i = rs.partition_point(|r| r.gpa <= gpa).checked_sub(1)?;
        let r = &rs[i];
        (gpa < r.gpa + r.size).then(|| r.file_offset + (gpa - r.gpa))
    }

    /// Reads every page held and compares it with its checksum: the index split between the
    /// host's CPUs, runs of adjacent pages read with one call each (up to 1 MiB).
    pub fn verify_pages(&self) -> Result<(), SnapshotError> {
        let started = Instant::now();
        let PageIndex::Pages(index) = &self.pages else {
            return Err(SnapshotError::Vm(
                "the page checksums were not read (loaded without checking every page)".into(),
            ));
        };
        let entries = index.len() / 16;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let per = entries.div_ceil(threads).max(1);
        let results: Vec<Result<(), SnapshotError>> = std::thread::scope(|s| {
            let parts: Vec<_> = index[..entries * 16]
                .chunks(per * 16)
                .map(|part| s.spawn(move || self.verify_part(part)))
                .collect();
            parts
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SnapshotError::Vm("a page-checking thread panicked".into()))
                    })
                })
                .collect()
        });
        // The first damaged page by address (parts are in address order).
        results.into_iter().collect::<Result<(), _>>()?;
        tracing::info!(
            pages = entries,
            threads,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "restore: every page of the snapshot checked"
        );
        Ok(())
    }

    /// Checks the pages of `part`, a slice of `pages.bin`'s entries.
    fn verify_part(&self, part: &[u8]) -> Result<(), SnapshotError> {
        const RUN_PAGES: usize = 256;
        let entry = |i: usize| pair(&part[i * 16..i * 16 + 16]);
        let n = part.len() / 16;
        let mut buf = vec![0u8; RUN_PAGES * PAGE as usize];
        let mut i = 0;
        while i < n {
            let (gpa, _) = entry(i);
            let off = self
                .file_offset(gpa)
                .ok_or_else(|| SnapshotError::Corrupt {
                    dir: self.dir.clone(),
                    file: PAGES,
                    why: format!("page {gpa:#x} lies in no region"),
                })?;
            // Adjacent pages that lie one after the other in the file too (one region).
            let mut k = 1;
            while i + k < n
                && k < RUN_PAGES
                && entry(i + k).0 == gpa + k as u64 * PAGE
                && self.file_offset(gpa + k as u64 * PAGE) == Some(off + k as u64 * PAGE)
            {
                k += 1;
            }
            let bytes = &mut buf[..k * PAGE as usize];
            self.memory
                .read_exact_at(bytes, off)
                .map_err(io_err("cannot read", &self.dir.join(MEMORY)))?;
            for (j, page) in bytes.chunks_exact(PAGE as usize).enumerate() {
                let (gpa, sum) = entry(i + j);
                if checksum(page) != sum {
                    return Err(SnapshotError::Corrupt {
                        dir: self.dir.clone(),
                        file: MEMORY,
                        why: format!("page {gpa:#x} does not match its checksum"),
                    });
                }
            }
            i += k;
        }
        Ok(())
    }
}

/// The working-set file a restore records next to the snapshot: the runs of pages served from
/// the snapshot, in the order the guest first touched them (`--prefetch ws` replays it).
pub const WORKING_SET: &str = "ws.bin";

/// `ws.bin` starts with these 8 bytes; then the number of runs, the runs (`gpa`, pages: two
/// little-endian `u64`s each), and the checksum of everything before it.
const WS_MAGIC: &[u8; 8] = b"VMMWS\0\0\x01";

/// Writes the working set `runs` into `dir/ws.bin`, atomically (a temporary file renamed over
/// it), replacing the one there.
pub fn write_working_set(dir: &Path, runs: &[(u64, u64)]) -> Result<(), SnapshotError> {
    let mut bytes = Vec::with_capacity(24 + runs.len() * 16);
    bytes.extend_from_slice(WS_MAGIC);
    bytes.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for &(gpa, n) in runs {
        bytes.extend_from_slice(&gpa.to_le_bytes());
        bytes.extend_from_slice(&n.to_le_bytes());
    }
    let sum = checksum(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    let tmp = dir.join(format!(".{WORKING_SET}.tmp-{}", std::process::id()));
    let path = dir.join(WORKING_SET);
    let written = create_private(&tmp)
        .and_then(|f| {
            f.write_all_at(&bytes, 0)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(SnapshotError::Io {
            what: "cannot write",
            path,
            source: e,
        });
    }
    Ok(())
}

/// Reads `dir/ws.bin`: the runs, each checked to lie inside a region of the snapshot.
pub fn read_working_set(snap: &Loaded) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let dir = &snap.dir;
    let path = dir.join(WORKING_SET);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Vm(format!(
                "{}: no working set recorded ({WORKING_SET} is missing): restore once with \
                 --prefetch none, and let the guest run, to record one",
                dir.display()
            )))
        }
        Err(e) => return Err(io_err("cannot read", &path)(e)),
    };
    let corrupt = |why: String| SnapshotError::Corrupt {
        dir: dir.clone(),
        file: WORKING_SET,
        why,
    };
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    if bytes.len() < 24 || &bytes[..8] != WS_MAGIC {
        return Err(corrupt("not a working-set file".into()));
    }
    let n = word(8);
    if n.checked_mul(16).and_then(|b| b.checked_add(24)) != Some(bytes.len() as u64) {
        return Err(corrupt(format!("{} bytes for {n} runs", bytes.len())));
    }
    let end = bytes.len() - 8;
    if checksum(&bytes[..end]) != word(end) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let regions = &snap.manifest.regions;
    (0..n as usize)
        .map(|i| {
            let (gpa, pages) = (word(16 + 16 * i), word(24 + 16 * i));
            let inside = gpa % PAGE == 0
                && pages > 0
                && pages
                    .checked_mul(PAGE)
                    .and_then(|b| gpa.checked_add(b))
                    .is_some_and(|e| {
                        let k = regions.partition_point(|r| r.gpa <= gpa);
                        k > 0 && e <= regions[k - 1].gpa + regions[k - 1].size
                    });
            if inside {
                Ok((gpa, pages))
            } else {
                Err(corrupt(format!(
                    "run {i} ({gpa:#x}, {pages} pages) lies outside the snapshot's regions"
                )))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_index_matches_the_page_index_and_refuses_bad_runs() {
        // Pages 0-2 and 5 of a region at 1 MiB, as pages.bin and as runs.bin.
        let gpas = [0u64, 1, 2, 5].map(|p| (1 << 20) + p * PAGE);
        let pages = PageIndex::Pages(
            gpas.iter()
                .flat_map(|&g| [g.to_le_bytes(), 7u64.to_le_bytes()])
                .flatten()
                .collect(),
        );
        let runs = parse_runs(&encode_runs(&[(1 << 20, 3), ((1 << 20) + 5 * PAGE, 1)])).unwrap();
        assert_eq!(runs.count(), 4);
        assert!(runs.runs().eq(pages.runs()));
        assert!(runs.gpas().eq(gpas.iter().copied()));
        assert!(runs.checksums().is_none() && pages.checksums().is_some());
        for bad in [
            vec![(1 << 20, 0)],                        // empty
            vec![((1 << 20) + 8, 1)],                  // unaligned
            vec![(2 << 20, 1), (1 << 20, 1)],          // out of order
            vec![(1 << 20, 2), ((1 << 20) + PAGE, 1)], // overlapping
            vec![(1 << 20, 1), ((1 << 20) + PAGE, 1)], // touching: the writer merges those
            vec![(u64::MAX - PAGE + 1, 2)],            // beyond 2^64
        ] {
            assert!(parse_runs(&encode_runs(&bad)).is_err(), "{bad:?}");
        }
        assert!(parse_runs(&[0u8; 15]).is_err());
    }

    proptest::proptest! {
        /// Any set of pages, written both ways, reads back the same through either index;
        /// any bytes at all are refused or read without panicking.
        #[test]
        fn both_indexes_list_the_same_pages(
            set in proptest::collection::btree_set(0u64..4096, 0..300),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
        ) {
            let gpas: Vec<u64> = set.iter().map(|p| p * PAGE).collect();
            let pages = PageIndex::Pages(
                gpas.iter().flat_map(|&g| [g.to_le_bytes(), 0u64.to_le_bytes()]).flatten().collect(),
            );
            let runs: Vec<(u64, u64)> = pages.runs().map(|(f, e)| (f, (e - f) / PAGE)).collect();
            let parsed = parse_runs(&encode_runs(&runs)).unwrap();
            proptest::prop_assert_eq!(parsed.count(), gpas.len());
            proptest::prop_assert!(parsed.gpas().eq(gpas.iter().copied()));
            proptest::prop_assert!(parsed.runs().eq(pages.runs()));
            let _ = parse_runs(&noise);
        }
    }

    #[test]
    fn checksum_sees_every_word() {
        let a = vec![7u8; 4096];
        let base = checksum(&a);
        for i in [0usize, 1, 8, 4095] {
            let mut b = a.clone();
            b[i] ^= 1;
            assert_ne!(checksum(&b), base, "byte {i}");
        }
        assert_ne!(checksum(&[]), checksum(&[0]));
        assert_ne!(checksum(&[0; 8]), checksum(&[0; 16]));
    }

    /// `manifest.json` as written before its regions and shape carried enums: it must still
    /// load, and writing it again must give the same bytes (its checksum is on disk).
    const MANIFEST_V1: &str = r#"{
  "format": "vmm-snapshot",
  "version": 1,
  "written_by": "vmm 0.1.0",
  "shape": {
    "vcpus": 2,
    "mem_bytes": 67108864,
    "workload": 11,
    "address_space": "bonsai",
    "ram_backing": "anon",
    "memslots": "window",
    "hotplug_window": 17179869184,
    "fault_around": 0
  },
  "regions": [
    {
      "gpa": 0,
      "size": 8388608,
      "kind": "boot",
      "backing": "anon",
      "readonly": false,
      "file_offset": 0
    },
    {
      "gpa": 8388608,
      "size": 58720256,
      "kind": "ram",
      "backing": "anon",
      "readonly": false,
      "file_offset": 8388608
    },
    {
      "gpa": 4294967296,
      "size": 2097152,
      "kind": "hotplug",
      "backing": "memfd",
      "readonly": false,
      "file_offset": 67108864
    }
  ],
  "pages": 14415,
  "memory_bytes": 69206016,
  "files": {
    "devices.json": {
      "bytes": 87,
      "checksum": "9a6695f07da63dad"
    },
    "pages.bin": {
      "bytes": 230640,
      "checksum": "9e99a78c56714506"
    },
    "vcpus.json": {
      "bytes": 11548,
      "checksum": "fc971eef88b13c95"
    }
  },
  "msrs_not_saved": []
}"#;

    #[test]
    fn manifests_written_with_string_names_load_into_enums_and_write_back_identical() {
        let m: Manifest = serde_json::from_str(MANIFEST_V1).unwrap();
        assert_eq!(m.shape.address_space, AddressSpaceKind::Bonsai);
        assert_eq!(m.shape.ram_backing, Backing::Anon);
        assert_eq!(m.shape.memslots, MemslotMode::Window);
        let kinds: Vec<_> = m.regions.iter().map(|r| (r.kind, r.backing)).collect();
        assert_eq!(
            kinds,
            [
                (RegionKind::Boot, Backing::Anon),
                (RegionKind::Ram, Backing::Anon),
                (RegionKind::Hotplug, Backing::Memfd)
            ]
        );
        let again = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(String::from_utf8(again).unwrap(), MANIFEST_V1);
        // Every name of every enum survives the trip.
        let mut m2 = m.clone();
        m2.shape.address_space = AddressSpaceKind::Cow;
        m2.shape.ram_backing = Backing::Hugetlb;
        m2.shape.memslots = MemslotMode::PerRegion;
        let text = serde_json::to_string(&m2).unwrap();
        for name in [r#""cow""#, r#""hugetlb""#, r#""per-region""#] {
            assert!(text.contains(name), "{name} in {text}");
        }
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back.shape, m2.shape);
    }

    #[test]
    fn unknown_names_in_a_manifest_are_refused_with_the_names_known() {
        for (from, to, want) in [
            (
                r#""kind": "hotplug""#,
                r#""kind": "rom""#,
                "region kind \"rom\": expected one of boot, ram, hotplug",
            ),
            (
                r#""backing": "memfd""#,
                r#""backing": "shm""#,
                "backing \"shm\": expected one of anon, memfd, hugetlb",
            ),
            (
                r#""memslots": "window""#,
                r#""memslots": "Window""#,
                "memslot mode \"Window\": expected one of window, per-region",
            ),
            (
                r#""address_space": "bonsai""#,
                r#""address_space": "btree""#,
                "address space \"btree\": expected one of bonsai, rwlock, cow",
            ),
        ] {
            let text = MANIFEST_V1.replacen(from, to, 1);
            assert_ne!(text, MANIFEST_V1);
            let e = serde_json::from_str::<Manifest>(&text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
