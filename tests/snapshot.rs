//! End-to-end tests of snapshots (`vmm ctl snapshot`) and restore (`vmm run --restore`): the
//! `pattern` guest is snapshotted mid-run and resumed in every restore mode with its RAM
//! intact; snapshots keep hot-plugged, split and read-only regions; damaged snapshots are
//! refused before any guest instruction runs; an existing directory needs `--force`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use support::{stderr, stdout, SocketVm};

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-snapshot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

/// A VM driven through its control socket, at a socket named after `name`.
type Vm = SocketVm;

fn start(name: &str, args: &[&str]) -> Vm {
    SocketVm::start(tmp(&format!("{name}.sock")), args, &[])
}

/// Verify passes the guest has reported so far.
fn passes(vm: &Vm) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&vm.ctl_ok(&["--json", "stats"])).unwrap();
    v["result"]["guest"]["passes"].as_u64().unwrap_or(0)
}

const PATTERN: &[&str] = &[
    "--workload",
    "pattern",
    "--vcpus",
    "2",
    "--mem",
    "32M",
    "--fault-around",
    "16",
];

/// Runs the `pattern` guest until it is ready and has verified a few passes, snapshots it
/// into `dir` with `--stop`; the run must end with status 0.
fn make_snapshot(name: &str, dir: &Path) {
    let vm = start(name, PATTERN);
    vm.wait_for("ready", 2);
    let reply = vm.ctl_ok(&["snapshot", "--dir", dir.to_str().unwrap(), "--stop"]);
    assert!(reply.contains("the VM stopped"), "{reply}");
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("0 wrong words"), "{err}");
}

fn restore(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--timeout",
        "120",
    ];
    args.extend_from_slice(extra);
    support::run(&args)
}

/// A restored `pattern` guest that ran its passes and found every word right.
fn assert_restored_clean(o: &Output, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(0), "{what}: {err}");
    assert!(err.contains("0 wrong words"), "{what}: {err}");
    assert!(err.contains("2 vCPUs done (restored)"), "{what}: {err}");
}

#[test]
fn a_running_guest_is_snapshotted_and_restored_in_every_mode() {
    require_kvm!();
    let snap = tmp("mid-run");
    let last = tmp("mid-run-last");
    let vm = start("mid-run", PATTERN);
    vm.wait_for("ready", 2);
    let before = passes(&vm);
    // Without --stop the guest goes on after the snapshot.
    let reply = vm.ctl_ok(&["snapshot", "--dir", snap.to_str().unwrap()]);
    assert!(reply.contains("2 vCPUs"), "{reply}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes(&vm) <= before + 2 {
        assert!(
            Instant::now() < deadline,
            "the guest stopped after the snapshot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.ctl_ok(&["snapshot", "--dir", last.to_str().unwrap(), "--stop"]);
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("0 wrong words"), "{err}");
    for file in [
        "manifest.json",
        "manifest.sum",
        "memory.img",
        "pages.bin",
        "runs.bin",
        "vcpus.json",
        "devices.json",
    ] {
        assert!(snap.join(file).is_file(), "{file} missing");
        // Guest memory and register state are this user's only.
        let mode = std::fs::metadata(snap.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file}: mode {mode:o}");
    }
    let mode = std::fs::metadata(&snap).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the snapshot directory: mode {mode:o}");
    for mode in ["vcpu", "handler", "kernel", "eager"] {
        let o = restore(&snap, &["--restore-mode", mode, "--passes", "2"]);
        assert_restored_clean(&o, mode);
        // Every page the guest wrote came back from the snapshot in the lazy modes.
        if mode == "vcpu" || mode == "handler" {
            assert!(
                stderr(&o).contains("pages served from the snapshot"),
                "{}",
                stderr(&o)
            );
        }
    }
    // The same snapshot again, and without reading every page ahead.
    let o = restore(&snap, &["--passes", "1", "--restore-verify", "meta"]);
    assert_restored_clean(&o, "second vcpu restore");
    // The one taken with --stop resumes as well.
    let o = restore(&last, &["--passes", "1"]);
    assert_restored_clean(&o, "snapshot with --stop");
    for d in [snap, last] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_restored_guest_can_be_snapshotted_again() {
    require_kvm!();
    let first = tmp("chain-1");
    make_snapshot("chain", &first);
    // Restore, with the guest reading one page per vCPU, so that nearly all of its memory is
    // still only in the first snapshot (not served yet by a lazy restore; under the data
    // file's mapping, untouched, in `kernel` mode); snapshot that, plainly and live, and
    // restore it reading everything.
    for mode in ["vcpu", "handler", "kernel"] {
        for live in [false, true] {
            let name = format!("chain-{mode}-{live}");
            let second = tmp(&name);
            let vm = start(
                &name,
                &[
                    "--restore",
                    first.to_str().unwrap(),
                    "--restore-mode",
                    mode,
                    "--pages",
                    "1",
                ],
            );
            let mut args = vec!["snapshot", "--stop", "--dir", second.to_str().unwrap()];
            if live {
                args.push("--live");
            }
            vm.ctl_ok(&args);
            let (status, err) = vm.wait();
            assert_eq!(status, Some(0), "{name}: {err}");
            let o = restore(&second, &["--passes", "2"]);
            assert_restored_clean(
                &o,
                &format!("snapshot of a VM restored in {mode} mode, live {live}"),
            );
            let _ = std::fs::remove_dir_all(second);
        }
    }
    let _ = std::fs::remove_dir_all(first);
}

#[test]
fn hot_plugged_split_and_read_only_regions_come_back() {
    require_kvm!();
    let snap = tmp("regions");
    let vm = start(
        "regions",
        &["--workload", "hotplug", "--vcpus", "2", "--mem", "32M"],
    );
    vm.ctl_ok(&["map", "--gpa", "0x100000000", "--size", "16M"]);
    vm.ctl_ok(&["unmap", "--gpa", "0x100400000", "--size", "4M"]);
    vm.ctl_ok(&[
        "map",
        "--gpa",
        "0x102000000",
        "--size",
        "4M",
        "--backing",
        "memfd",
    ]);
    vm.ctl_ok(&[
        "protect",
        "--gpa",
        "0x102000000",
        "--size",
        "4M",
        "--readonly",
    ]);
    // Let the guest touch what is mapped.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value = serde_json::from_str(&vm.ctl_ok(&["--json", "stats"])).unwrap();
        if v["result"]["guest"]["pages_touched"].as_u64().unwrap_or(0) >= 1024 {
            break;
        }
        assert!(Instant::now() < deadline, "the guest touched nothing: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = vm.ctl_ok(&["--json", "list"]);
    vm.ctl_ok(&["snapshot", "--dir", snap.to_str().unwrap(), "--stop"]);
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    let manifest = std::fs::read_to_string(snap.join("manifest.json")).unwrap();
    assert_eq!(manifest.matches("\"hotplug\"").count(), 3, "{manifest}");

    let vm = start("regions-restored", &["--restore", snap.to_str().unwrap()]);
    let after = vm.ctl_ok(&["--json", "list"]);
    let regions = |s: &str| -> Vec<(String, String, bool)> {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["result"]["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["gpa"].as_str().unwrap_or_default().to_owned(),
                    r["size"].to_string(),
                    r["readonly"].as_bool().unwrap_or(false),
                )
            })
            .collect()
    };
    assert_eq!(regions(&before), regions(&after), "{before}\n{after}");
    assert!(after.contains("\"readonly\":true"), "{after}");
    vm.ctl_ok(&["check"]);
    // A restored region unmapped and mapped again starts from zero, not from the snapshot:
    // the guest reads the first contents of the words it wrote before the snapshot and saw
    // unmapped since (a stale one fails the run).
    let stats = || -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&vm.ctl_ok(&["--json", "stats"])).unwrap()
            ["result"]
            .clone()
    };
    let settled = |what: &str, more: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = stats();
            if s["guest"]["generation_seen"] == s["generation"] && more(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let reads = |s: &serde_json::Value| s["guest"]["unmapped_reads"].as_u64().unwrap();
    let before = reads(&settled("the guest never saw the restored list", &|_| true));
    vm.ctl_ok(&["unmap", "--gpa", "0x100000000", "--size", "4M"]);
    let after = reads(&settled("the guest never saw the unmap", &|_| true));
    assert!(
        after > before,
        "the guest read back nothing after the unmap"
    );
    vm.ctl_ok(&["map", "--gpa", "0x100000000", "--size", "4M"]);
    settled(
        "the guest never read the new region's first contents",
        &|s| reads(s) >= after + (after - before),
    );
    // The guest goes on over the restored regions and stops cleanly.
    vm.ctl_ok(&["stop"]);
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("verify ok (0 errors)"), "{err}");
    assert!(err.contains("(0 stale)"), "{err}");
    let _ = std::fs::remove_dir_all(snap);
}

/// Copies the snapshot at `from` into a fresh directory.
fn copy_snapshot(from: &Path, name: &str) -> PathBuf {
    let to = tmp(name);
    std::fs::create_dir(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

#[test]
fn damaged_snapshots_are_refused_before_the_guest_runs() {
    require_kvm!();
    let good = tmp("damaged-good");
    make_snapshot("damaged", &good);
    // The first page held in RAM (above the 8 MiB boot area), from the index.
    let index = std::fs::read(good.join("pages.bin")).unwrap();
    let ram_page = index
        .chunks_exact(16)
        .map(|e| u64::from_le_bytes(e[..8].try_into().unwrap()))
        .find(|&g| g >= 8 << 20)
        .unwrap();
    type Damage = Box<dyn Fn(&Path)>;
    // Each case with the default `--restore-verify full` (every page checked) unless named
    // `meta-...`: then with `meta`, which reads runs.bin instead of pages.bin.
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "missing-vcpus",
            Box::new(|d| std::fs::remove_file(d.join("vcpus.json")).unwrap()),
            "vcpus.json is missing",
        ),
        (
            "missing-memory",
            Box::new(|d| std::fs::remove_file(d.join("memory.img")).unwrap()),
            "memory.img is missing",
        ),
        (
            "missing-manifest",
            Box::new(|d| std::fs::remove_file(d.join("manifest.json")).unwrap()),
            "manifest.json is missing",
        ),
        (
            "wrong-version",
            Box::new(|d| {
                let m = std::fs::read_to_string(d.join("manifest.json")).unwrap();
                std::fs::write(
                    d.join("manifest.json"),
                    m.replace("\"version\": 1,", "\"version\": 999,"),
                )
                .unwrap();
            }),
            "format version 999",
        ),
        (
            "edited-manifest",
            Box::new(|d| {
                let m = std::fs::read_to_string(d.join("manifest.json")).unwrap();
                std::fs::write(
                    d.join("manifest.json"),
                    m.replace("\"vcpus\": 2", "\"vcpus\": 3"),
                )
                .unwrap();
            }),
            "checksum mismatch",
        ),
        (
            "corrupt-vcpus",
            Box::new(|d| flip_byte(&d.join("vcpus.json"), 100)),
            "vcpus.json",
        ),
        (
            "truncated-index",
            Box::new(|d| truncate_by(&d.join("pages.bin"), 16)),
            "pages.bin",
        ),
        (
            "meta-truncated-index",
            Box::new(|d| truncate_by(&d.join("pages.bin"), 16)),
            "pages.bin",
        ),
        (
            "meta-missing-index",
            Box::new(|d| std::fs::remove_file(d.join("pages.bin")).unwrap()),
            "pages.bin is missing",
        ),
        (
            "corrupt-runs",
            Box::new(|d| flip_byte(&d.join("runs.bin"), 3)),
            "runs.bin",
        ),
        (
            "meta-corrupt-runs",
            Box::new(|d| flip_byte(&d.join("runs.bin"), 3)),
            "runs.bin",
        ),
        (
            "meta-missing-runs",
            Box::new(|d| std::fs::remove_file(d.join("runs.bin")).unwrap()),
            "runs.bin is missing",
        ),
        (
            "truncated-memory",
            Box::new(|d| truncate_by(&d.join("memory.img"), 4096)),
            "memory.img",
        ),
        (
            "corrupt-memory",
            Box::new(move |d| flip_byte(&d.join("memory.img"), ram_page + 8)),
            "does not match its checksum",
        ),
        (
            "not-a-snapshot",
            Box::new(|d| {
                std::fs::remove_dir_all(d).unwrap();
                std::fs::create_dir(d).unwrap();
            }),
            "manifest.json is missing",
        ),
    ];
    for (name, damage, want) in cases {
        let dir = copy_snapshot(&good, name);
        damage(&dir);
        let verify = if name.starts_with("meta-") {
            "meta"
        } else {
            "full"
        };
        let o = restore(&dir, &["--passes", "1", "--restore-verify", verify]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(want), "{name}: expected {want:?} in {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
        assert!(err.starts_with("vmm: --restore: "), "{name}: {err}");
        // No vCPU ran: nothing resumed, nothing on the console.
        assert!(!err.contains("resumed"), "{name}: {err}");
        assert!(stdout(&o).is_empty(), "{name}: {}", stdout(&o));
        let _ = std::fs::remove_dir_all(dir);
    }
    // A directory that does not exist.
    let o = restore(&tmp("nowhere"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no such snapshot directory"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(good);
}

fn flip_byte(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

fn truncate_by(path: &Path, n: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - n).unwrap();
}

#[test]
fn an_existing_directory_is_refused_without_force() {
    require_kvm!();
    let dir = tmp("exists");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep"), b"x").unwrap();
    let vm = start("exists", PATTERN);
    vm.wait_for("ready", 2);
    let o = vm.ctl(&["snapshot", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o) + &stdout(&o);
    assert!(err.contains("already exists"), "{err}");
    assert!(
        dir.join("keep").exists(),
        "the existing directory was touched"
    );
    // With --force it is replaced, and no temporary directory is left next to it.
    vm.ctl_ok(&[
        "snapshot",
        "--dir",
        dir.to_str().unwrap(),
        "--force",
        "--stop",
    ]);
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    assert!(!dir.join("keep").exists());
    assert!(dir.join("manifest.json").exists());
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&format!(".{name}.tmp"))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let o = restore(&dir, &["--passes", "1"]);
    assert_restored_clean(&o, "forced snapshot");
    let _ = std::fs::remove_dir_all(dir);
}

/// The `"restore"` object of `vmm run --json`'s summary line (the last line of stdout).
fn restore_json(o: &Output) -> serde_json::Value {
    let out = stdout(o);
    let line = out.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}): {out}\n{}", stderr(o)));
    v["restore"].clone()
}

#[test]
fn a_recorded_working_set_is_prefetched_and_no_page_is_served_twice() {
    require_kvm!();
    let snap = tmp("ws");
    make_snapshot("ws", &snap);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snap.join("manifest.json")).unwrap())
            .unwrap();
    let held = manifest["pages"].as_u64().unwrap();
    // Restore without prefetch: the guest verifies 500 pages per vCPU, and the order of its
    // first touches is recorded (one page per fault: exactly what it read, plus any page of
    // RAM its own code touches).
    let o = restore(
        &snap,
        &[
            "--pages",
            "500",
            "--passes",
            "1",
            "--fault-around",
            "1",
            "--json",
        ],
    );
    assert_restored_clean(&o, "recording");
    let r = restore_json(&o);
    assert_eq!(r["pages_touched"], 1000, "{r}");
    let recorded = r["ws_recorded_pages"].as_u64().unwrap();
    assert!((1000..1016).contains(&recorded), "{r}");
    assert!(r["ws_resident_ms"].as_f64().unwrap() > r["resumed_ms"].as_f64().unwrap());
    assert!(
        stderr(&o).contains("working set recorded"),
        "{}",
        stderr(&o)
    );
    assert!(snap.join("ws.bin").exists());
    // Lazily restored pages: served + still held at the end, the same in every run.
    let lazy = r["pages_served"].as_u64().unwrap() + r["pages_never_touched"].as_u64().unwrap();
    assert!(lazy > 0 && lazy <= held, "{r}");
    for mode in ["vcpu", "handler", "kernel"] {
        let o = restore(
            &snap,
            &[
                "--restore-mode",
                mode,
                "--prefetch",
                "ws",
                "--pages",
                "500",
                "--passes",
                "2",
                "--json",
            ],
        );
        assert_restored_clean(&o, mode);
        let r = restore_json(&o);
        assert!(r["prefetched_pages"].as_u64().is_some(), "{mode}: {r}");
        assert!(
            r["ws_recorded_pages"].is_null(),
            "a prefetching run records nothing"
        );
        if mode != "kernel" {
            // Every page populated came from the snapshot once: served + still held = held.
            let served = r["pages_served"].as_u64().unwrap();
            assert_eq!(
                served + r["pages_never_touched"].as_u64().unwrap(),
                lazy,
                "{r}"
            );
            assert_eq!(
                r["pages_populated"].as_u64().unwrap(),
                served,
                "{mode}: {r}"
            );
            assert!(served >= 1000, "{mode}: {r}");
        }
    }
    // The working set file is checked like the rest of the snapshot.
    let ws = snap.join("ws.bin");
    let good = std::fs::read(&ws).unwrap();
    let mut bad = good.clone();
    bad[20] ^= 1;
    std::fs::write(&ws, &bad).unwrap();
    let o = restore(&snap, &["--prefetch", "ws", "--passes", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ws.bin: checksum mismatch"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).is_empty(), "the guest ran: {}", stdout(&o));
    std::fs::remove_file(&ws).unwrap();
    let o = restore(&snap, &["--prefetch", "ws", "--passes", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no working set recorded"),
        "{}",
        stderr(&o)
    );
    let o = restore(&snap, &["--prefetch", "ws", "--restore-mode", "eager"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(snap);
}

#[test]
fn snapshots_taken_while_another_client_hot_plugs_restore_clean() {
    require_kvm!();
    let snaps: Vec<PathBuf> = (0..3).map(|i| tmp(&format!("busy-{i}"))).collect();
    let vm = start(
        "busy",
        &["--workload", "hotplug", "--vcpus", "2", "--mem", "32M"],
    );
    let done = std::sync::atomic::AtomicBool::new(false);
    let changes = std::thread::scope(|sc| {
        let churn = sc.spawn(|| {
            // Map, split, protect and unmap 2 MiB regions in eight slots, round and round.
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let gpa = 0x1_0000_0000u64 + (n % 8) * (4 << 20);
                let at = format!("{gpa:#x}");
                vm.ctl_ok(&["map", "--gpa", &at, "--size", "2M"]);
                vm.ctl_ok(&[
                    "unmap",
                    "--gpa",
                    &format!("{:#x}", gpa + (1 << 20)),
                    "--size",
                    "4K",
                ]);
                vm.ctl_ok(&["protect", "--gpa", &at, "--size", "1M", "--readonly"]);
                // The previous round's pieces go: two slots are live at most.
                if n > 0 {
                    let prev = 0x1_0000_0000u64 + ((n - 1) % 8) * (4 << 20);
                    vm.ctl_ok(&["unmap", "--gpa", &format!("{prev:#x}"), "--size", "2M"]);
                }
                n += 1;
            }
            n
        });
        for (i, d) in snaps.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(150 + 100 * i as u64));
            let reply = vm.ctl_ok(&["snapshot", "--dir", d.to_str().unwrap()]);
            assert!(reply.contains("vCPUs paused"), "{reply}");
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        churn.join().unwrap()
    });
    assert!(
        changes >= 3,
        "the other client made {changes} rounds of changes"
    );
    vm.ctl_ok(&["check"]);
    vm.ctl_ok(&["stop"]);
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    for (i, d) in snaps.iter().enumerate() {
        // Each snapshot holds a consistent layout: it restores, `check` agrees with KVM and
        // the host mappings, and the guest goes on over it and stops clean.
        let vm = start(
            &format!("busy-restored-{i}"),
            &["--restore", d.to_str().unwrap()],
        );
        let check = vm.ctl_ok(&["check"]);
        assert!(check.contains("consistent"), "{check}");
        vm.ctl_ok(&["stop"]);
        let (status, err) = vm.wait();
        assert_eq!(status, Some(0), "snapshot {i}: {err}");
        assert!(err.contains("verify ok (0 errors)"), "snapshot {i}: {err}");
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_data_file_truncated_under_a_lazy_restore_ends_the_run_with_a_diagnosis() {
    require_kvm!();
    // Big enough that the first pass, a page per fault, takes a good while after the control
    // socket answers (about a second here; the truncation comes within a few milliseconds).
    let snap = tmp("truncated-live");
    let vm = start(
        "truncated-live-src",
        &[
            "--workload",
            "pattern",
            "--vcpus",
            "2",
            "--mem",
            "256M",
            "--fault-around",
            "16",
        ],
    );
    vm.wait_for("ready", 2);
    vm.ctl_ok(&["snapshot", "--dir", snap.to_str().unwrap(), "--stop"]);
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    for mode in ["vcpu", "handler"] {
        let dir = copy_snapshot(&snap, &format!("truncated-live-{mode}"));
        let vm = SocketVm::start(
            tmp(&format!("truncated-live-{mode}.sock")),
            &[
                "--restore",
                dir.to_str().unwrap(),
                "--restore-mode",
                mode,
                "--fault-around",
                "1",
                "--passes",
                "1",
            ],
            &[],
        );
        // The socket answers once the vCPUs run; cut the data file under them.
        vm.ctl_ok(&["stats"]);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory.img"))
            .unwrap();
        f.set_len(4096).unwrap();
        let t = Instant::now();
        let (status, err) = vm.wait();
        assert!(
            !err.contains("2 vCPUs done"),
            "{mode}: the restore served every page before the file was cut: {err}"
        );
        assert_eq!(status, Some(1), "{mode}: {err}");
        assert!(
            err.contains("truncated while the restore was reading it"),
            "{mode}: {err}"
        );
        // Not a timeout: the run ends as soon as a vCPU cannot be served.
        assert!(t.elapsed() < Duration::from_secs(30), "{mode}: {err}");
        // A run that failed records no working set (it would replace a good one).
        assert!(!dir.join("ws.bin").exists(), "{mode}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&snap);
}

/// A snapshot written before `runs.bin` existed (the file gone and the manifest not listing
/// it) is read through `pages.bin`, with and without checking every page.
#[test]
fn a_snapshot_without_runs_restores_through_the_page_index() {
    require_kvm!();
    let snap = tmp("no-runs");
    make_snapshot("no-runs", &snap);
    let runs = std::fs::read(snap.join("runs.bin")).unwrap();
    let pages = std::fs::metadata(snap.join("pages.bin")).unwrap().len();
    // Adjacent pages make few runs: 16 bytes a run against 16 a page.
    assert!(
        runs.len() % 16 == 0 && (runs.len() as u64) < pages / 8,
        "{} vs {pages}",
        runs.len()
    );
    std::fs::remove_file(snap.join("runs.bin")).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert!(m["files"]
        .as_object_mut()
        .unwrap()
        .remove("runs.bin")
        .is_some());
    let bytes = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(snap.join("manifest.json"), &bytes).unwrap();
    std::fs::write(
        snap.join("manifest.sum"),
        format!("{:016x}\n", vmm::snapshot::checksum(&bytes)),
    )
    .unwrap();
    for verify in ["meta", "full"] {
        let o = restore(&snap, &["--passes", "1", "--restore-verify", verify]);
        assert_restored_clean(&o, verify);
    }
    let _ = std::fs::remove_dir_all(snap);
}

/// Guest RAM on 2 MiB huge pages: the snapshot restores in every mode, a lazy restore serves
/// (and records) whole huge pages, and the recorded working set is replayed by a prefetch.
#[test]
fn a_hugetlb_guest_is_restored_in_huge_pages_and_its_working_set_replayed() {
    require_kvm!();
    require_hugetlb!(8);
    let snap = tmp("hugetlb");
    let vm = start(
        "hugetlb",
        &[
            "--workload",
            "pattern",
            "--vcpus",
            "2",
            "--mem",
            "16M",
            "--ram-backing",
            "hugetlb",
        ],
    );
    vm.wait_for("ready", 2);
    let reply = vm.ctl_ok(&["snapshot", "--dir", snap.to_str().unwrap(), "--stop"]);
    assert!(reply.contains("the VM stopped"), "{reply}");
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    for mode in ["vcpu", "handler", "kernel", "eager"] {
        let o = restore(&snap, &["--restore-mode", mode, "--passes", "1"]);
        assert_restored_clean(&o, mode);
    }
    // A lazy restore reading 300 pages per vCPU records the huge pages it served, whole.
    let o = restore(&snap, &["--pages", "300", "--passes", "1", "--json"]);
    assert_restored_clean(&o, "recording");
    let r = restore_json(&o);
    let recorded = r["ws_recorded_pages"].as_u64().unwrap();
    assert!(recorded >= 600 && recorded % 512 == 0, "{r}");
    let lazy = r["pages_served"].as_u64().unwrap() + r["pages_never_touched"].as_u64().unwrap();
    for mode in ["vcpu", "handler", "kernel"] {
        let o = restore(
            &snap,
            &[
                "--restore-mode",
                mode,
                "--prefetch",
                "ws",
                "--pages",
                "300",
                "--passes",
                "1",
                "--json",
            ],
        );
        assert_restored_clean(&o, mode);
        let r = restore_json(&o);
        // The lazy modes' prefetcher races the vCPUs for the few huge pages (either may
        // serve each); in `kernel` mode it reads in recorded runs, whole huge pages, until the
        // run ends (a guest that finishes its pass first can stop it before its first run).
        let prefetched = r["prefetched_pages"].as_u64().unwrap();
        if mode == "kernel" {
            assert!(
                prefetched % 512 == 0 && prefetched <= recorded,
                "{mode}: {r}"
            );
        } else {
            let served = r["pages_served"].as_u64().unwrap();
            assert_eq!(
                served + r["pages_never_touched"].as_u64().unwrap(),
                lazy,
                "{mode}: {r}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(snap);
}

/// `snapshot --live` of a guest that rewrites all of its memory in every pass: memory is
/// copied while the guest runs, the pages it wrote meanwhile again in the pause, and every
/// restore finds every word of the generation the guest's registers expect.
#[test]
fn a_live_snapshot_of_a_guest_rewriting_its_memory_restores_clean() {
    require_kvm!();
    let o = support::run(&["run", "--rewrite"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--rewrite without pattern: {}",
        stderr(&o)
    );
    let vm = start(
        "live",
        &[
            "--workload",
            "pattern",
            "--rewrite",
            "--vcpus",
            "2",
            "--mem",
            "32M",
        ],
    );
    vm.wait_for("ready", 2);
    let (plain, live, stopped) = (tmp("live-plain"), tmp("live"), tmp("live-stop"));
    vm.ctl_ok(&["snapshot", "--dir", plain.to_str().unwrap()]);
    let reply: serde_json::Value = serde_json::from_str(&vm.ctl_ok(&[
        "--json",
        "snapshot",
        "--dir",
        live.to_str().unwrap(),
        "--live",
    ]))
    .unwrap();
    let r = &reply["result"];
    let (pages, pre, rounds, again) = (
        r["pages"].as_u64().unwrap(),
        r["precopied_pages"].as_u64().unwrap(),
        r["precopy_rounds"].as_u64().unwrap(),
        r["recopied_pages"].as_u64().unwrap(),
    );
    // The guest's slices (6144 pages in all) were copied while it ran, and the pages it
    // rewrote meanwhile were copied again: in later rounds, or in the pause (which of the
    // two depends on when the host schedules the vCPUs).
    assert!((1..=4).contains(&rounds), "{reply}");
    assert!(pre >= 6144 && pre <= rounds * pages, "{reply}");
    assert!(again <= pages, "{reply}");
    assert!(pre > pages || again > 0, "{reply}");
    let p0 = passes(&vm);
    let reply = vm.ctl_ok(&[
        "snapshot",
        "--dir",
        stopped.to_str().unwrap(),
        "--live",
        "--stop",
    ]);
    assert!(
        reply.contains("live:") && reply.contains("the VM stopped"),
        "{reply}"
    );
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("0 wrong words"), "{err}");
    assert!(p0 > 0, "the guest rewrote its memory between snapshots");
    for dir in [&plain, &live, &stopped] {
        for mode in ["vcpu", "handler", "kernel", "eager"] {
            let o = restore(dir, &["--restore-mode", mode, "--passes", "2"]);
            assert_restored_clean(&o, &format!("{} {mode}", dir.display()));
        }
    }
    for d in [plain, live, stopped] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A guest whose RAM was filled with huge pages (`--thp`: the `pattern` workload writes its
/// slices in order, so its windows grow to whole 2 MiB) is snapshotted live (KVM's dirty log
/// over huge mappings) and stopped, and both snapshots restore clean, with and without
/// `--thp` on the restored VM.
#[test]
fn a_guest_on_huge_page_fills_is_snapshotted_live_and_restored_clean() {
    require_kvm!();
    let vm = start(
        "thp",
        &[
            "--workload",
            "pattern",
            "--rewrite",
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--thp",
        ],
    );
    vm.wait_for("ready", 2);
    let stats: serde_json::Value = serde_json::from_str(&vm.ctl_ok(&["--json", "stats"])).unwrap();
    let huge = stats["result"]["totals"]["huge_fills"].as_u64().unwrap();
    let thp_on = support::thp_enabled();
    assert_eq!(
        huge > 0,
        thp_on,
        "the pattern guest's RAM came in huge pages where the host has THP: {stats}"
    );
    let (live, stopped) = (tmp("thp-live"), tmp("thp-stop"));
    vm.ctl_ok(&["snapshot", "--dir", live.to_str().unwrap(), "--live"]);
    vm.ctl_ok(&["snapshot", "--dir", stopped.to_str().unwrap(), "--stop"]);
    let (status, err) = vm.wait();
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("0 wrong words"), "{err}");
    for dir in [&live, &stopped] {
        for extra in [
            &["--restore-mode", "vcpu"][..],
            &["--restore-mode", "handler", "--thp"],
        ] {
            let mut args = vec!["--passes", "2"];
            args.extend_from_slice(extra);
            let o = restore(dir, &args);
            assert_restored_clean(&o, &format!("{} {extra:?}", dir.display()));
        }
    }
    for d in [live, stopped] {
        let _ = std::fs::remove_dir_all(d);
    }
}
