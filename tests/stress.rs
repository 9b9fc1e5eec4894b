//! End-to-end tests of `vmm stress`: the JSON object's fields and their consistency in every
//! fault mode and address space, with and without churn, and the human summary and plots.
//! No timing assertions: the ratios live in the bench output (docs/bench.md).

mod support;

use serde_json::Value;
use support::{run, stderr, stdout};

/// Runs `vmm stress --json` with `extra` and returns the one JSON object it printed.
fn stress_json(extra: &[&str]) -> Value {
    let mut args = vec!["stress", "--json"];
    args.extend_from_slice(extra);
    let o = run(&args);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(
        o.status.code(),
        Some(0),
        "vmm {args:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stdout:\n{out}");
    let v: Value = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(v.is_object(), "{out}");
    v
}

fn u(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path} is not an unsigned integer in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// Every field of the interface contract (docs/interface.md), with the right type, and the invariants between them.
fn check_common(v: &Value, vcpus: u64, pages_per_vcpu: u64, mode: &str, aspace: &str) {
    for key in [
        "vcpus",
        "fault_mode",
        "address_space",
        "fault_around",
        "pages",
        "faults",
        "seconds",
        "faults_per_sec",
        "fault_latency_ns",
        "exits",
        "churn_ops",
        "grace_periods",
        "grace_period_ns",
        "verify_errors",
        "open_bus_accesses",
    ] {
        assert!(v.get(key).is_some(), "{key} missing in {v}");
    }
    assert_eq!(u(v, "vcpus"), vcpus, "{v}");
    assert_eq!(v["fault_mode"], mode, "{v}");
    assert_eq!(v["address_space"], aspace, "{v}");
    let runs = u(v, "runs");
    assert!(runs >= 1, "{v}");
    assert_eq!(u(v, "pages"), vcpus * pages_per_vcpu * runs, "{v}");
    assert_eq!(u(v, "verify_errors"), 0, "{v}");
    assert_eq!(u(v, "open_bus_accesses"), 0, "{v}");
    assert!(f(v, "seconds") > 0.0, "{v}");
    // The vCPU threads' own time, where the kernel reports it: they ran, for no more than
    // the runs' wall time each.
    if support::schedstat_available() {
        let cpu = u(v, "vcpu_cpu_ns");
        assert!(cpu > 0, "{v}");
        assert!(
            cpu as f64 <= f(v, "wall_seconds") * 1e9 * vcpus as f64 * 1.01,
            "{v}"
        );
        assert!(v["vcpu_runqueue_wait_ns"].is_u64(), "{v}");
    }
    let fps = f(v, "faults_per_sec");
    assert!(fps > 0.0, "{v}");
    let expected = u(v, "pages") as f64 / f(v, "seconds");
    assert!((fps - expected).abs() <= 1e-6 * expected, "{v}");
    let (p50, p99, p999, max) = (
        u(v, "fault_latency_ns.p50"),
        u(v, "fault_latency_ns.p99"),
        u(v, "fault_latency_ns.p999"),
        u(v, "fault_latency_ns.max"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= max, "{v}");
    let (g50, g99, gmax) = (
        u(v, "grace_period_ns.p50"),
        u(v, "grace_period_ns.p99"),
        u(v, "grace_period_ns.max"),
    );
    assert!(g50 <= g99 && g99 <= gmax, "{v}");
    let by_reason: u64 = v["exits_by_reason"]
        .as_object()
        .expect("exits_by_reason")
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(by_reason, u(v, "exits"), "{v}");
    // Churn regions are given back: nothing stays resident where they were.
    assert_eq!(u(v, "rss.churn_residual_bytes"), 0, "{v}");
}

#[test]
fn every_mode_and_address_space_without_churn() {
    require_kvm!();
    for mode in ["vcpu", "handler", "kernel"] {
        for aspace in ["bonsai", "rwlock", "cow"] {
            let v = stress_json(&[
                "--vcpus",
                "2",
                "--pages",
                "1024",
                "--regions",
                "100",
                "--fault-mode",
                mode,
                "--address-space",
                aspace,
                "--fault-around",
                "1",
            ]);
            check_common(&v, 2, 1024, mode, aspace);
            // Without fault-around, every first touch is one fault.
            assert_eq!(u(&v, "faults"), u(&v, "pages"), "{v}");
            assert_eq!(u(&v, "churn_ops"), 0, "{v}");
            if mode == "vcpu" {
                // Each first touch is one exit on this host (efault, mmio or memory-fault).
                assert!(u(&v, "exits") >= u(&v, "pages"), "{v}");
            } else {
                assert!(u(&v, "exits") < 100, "{v}");
                if mode == "handler" {
                    assert_eq!(u(&v, "pages_populated"), u(&v, "pages"), "{v}");
                }
            }
        }
    }
}

#[test]
fn churn_in_every_mode_and_address_space() {
    require_kvm!();
    for mode in ["vcpu", "handler", "kernel"] {
        for aspace in ["bonsai", "rwlock", "cow"] {
            let v = stress_json(&[
                "--vcpus",
                "2",
                "--pages",
                "2048",
                "--fault-mode",
                mode,
                "--address-space",
                aspace,
                "--churn",
                "10000",
                "--duration",
                "0.3",
                "--fault-around",
                "1",
            ]);
            check_common(&v, 2, 2048, mode, aspace);
            assert_eq!(u(&v, "regions"), 1000, "{v}");
            assert!(u(&v, "churn_ops") > 0, "{v}");
            let c = &v["churn"];
            assert_eq!(
                u(c, "maps") + u(c, "unmaps") + u(c, "splits") + u(c, "protects"),
                u(&v, "churn_ops"),
                "{v}"
            );
            assert_eq!(u(c, "failed"), 0, "{v}");
            assert!(u(&v, "grace_periods") > 0, "{v}");
            if mode != "kernel" {
                assert_eq!(u(&v, "faults"), u(&v, "pages"), "{v}");
            }
        }
    }
}

#[test]
fn fault_around_cuts_faults_and_one_vcpu_works() {
    require_kvm!();
    let v = stress_json(&["--vcpus", "1", "--pages", "4096", "--fault-around", "16"]);
    check_common(&v, 1, 4096, "vcpu", "bonsai");
    // 16-page windows: about one fault per 16 pages.
    assert!(u(&v, "faults") * 8 <= u(&v, "pages"), "{v}");
    assert!(u(&v, "pages_populated") >= u(&v, "pages"), "{v}");
    assert_eq!(u(&v, "fault_around"), 16, "{v}");
}

#[test]
fn duration_repeats_runs() {
    require_kvm!();
    let v = stress_json(&["--pages", "512", "--regions", "10", "--duration", "0.5"]);
    assert!(u(&v, "runs") >= 2, "{v}");
    check_common(&v, 2, 512, "vcpu", "bonsai");
    assert!(f(&v, "wall_seconds") >= 0.5, "{v}");
}

#[test]
fn human_summary_and_plots() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("vmm-stress-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lat = dir.join("latency.svg");
    let thr = dir.join("throughput.svg");
    let o = run(&[
        "stress",
        "--pages",
        "2048",
        "--churn",
        "500",
        "--plot",
        lat.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    for needle in [
        "faults/s",
        "p99.9",
        "exits",
        "churn",
        "grace periods",
        "verify         ok (0 errors)",
        "open bus 0",
        "left resident",
    ] {
        assert!(out.contains(needle), "{needle:?} missing in:\n{out}");
    }
    // Piped: no progress bar escape codes.
    assert!(
        !out.contains('\u{1b}') && !stderr(&o).contains('\u{1b}'),
        "{out}"
    );
    let svg = std::fs::read_to_string(&lat).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    assert!(svg.contains("p50"), "{svg}");
    let o = run(&[
        "stress",
        "--pages",
        "2048",
        "--json",
        // One page per fault: a run long enough for several samples.
        "--fault-around",
        "1",
        "--plot-kind",
        "throughput",
        "--plot",
        thr.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let svg = std::fs::read_to_string(&thr).unwrap();
    assert!(svg.contains("<polyline"), "{svg}");
    // `vmm summarize` turns saved objects into the bench table (tests/summarize.rs has more).
    let jsonl = dir.join("r.jsonl");
    std::fs::write(&jsonl, stdout(&o)).unwrap();
    let bars = dir.join("bars.svg");
    let o = run(&[
        "summarize",
        jsonl.to_str().unwrap(),
        "--plot",
        bars.to_str().unwrap(),
    ]);
    let table = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        table.contains("| vcpu | sequential | bonsai | 2 | 0 | 1 |"),
        "{table}"
    );
    assert!(std::fs::read_to_string(&bars).unwrap().contains("</svg>"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_flags_are_usage_errors() {
    for bad in [
        &["stress", "--vcpus", "0"][..],
        &["stress", "--pages", "0"],
        &["stress", "--fault-around", "3"],
        &["stress", "--address-space", "list"],
        &["stress", "--duration", "-1"],
        &["stress", "--churn-batch", "0"],
        &["stress", "--churn-batch", "1025"],
        &["stress", "--churn-ops", "map,protect"],
        &["stress", "--churn-ops", "unmap"],
        &["stress", "--churn-ops", "map,unmap,dance"],
        &["stress", "--control-sched", "idle"],
        // The floor knows the next page of a sequential scan at one page per exit only.
        &["stress", "--floor"],
        &[
            "stress",
            "--floor",
            "--fault-around",
            "1",
            "--fault-mode",
            "handler",
        ],
        &[
            "stress",
            "--floor",
            "--fault-around",
            "1",
            "--pattern",
            "random",
        ],
        &[
            "stress",
            "--floor",
            "--fault-around",
            "1",
            "--ram-backing",
            "hugetlb",
        ],
    ] {
        let o = run(bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
    }
}

/// `--ram-backing hugetlb`: the report says so, the guest verifies clean, and each fault
/// populated a whole 2 MiB huge page (512 pages). Needs 4 free huge pages (`.ci/run` reserves
/// them and sets `VMM_REQUIRE_HUGETLB=1`, which turns the skip into a failure).
#[test]
fn hugetlb_ram_populates_whole_huge_pages() {
    require_kvm!();
    require_hugetlb!(4);
    let v = stress_json(&[
        "--vcpus",
        "1",
        "--pages",
        "2048",
        "--ram-backing",
        "hugetlb",
    ]);
    assert_eq!(v["ram_backing"], "hugetlb", "{v}");
    assert_eq!(u(&v, "verify_errors"), 0, "{v}");
    let (pages, faults) = (u(&v, "pages"), u(&v, "faults"));
    assert_eq!(pages % 2048, 0, "{v}");
    // 4 huge pages per run, plus any fault that lost a race.
    assert!(faults >= pages / 512 && faults < pages / 64, "{v}");
}

/// Window mode makes no memslot change after set-up, whatever the churn; per-region mode makes
/// one or more per churn operation. Both report each operation's latency, the plain
/// `mmap` + `munmap` baseline and the cost of populating, verify clean and leave nothing
/// resident in the churn area.
#[test]
fn window_mode_changes_no_memslot_under_churn() {
    require_kvm!();
    for mode in ["vcpu", "handler", "kernel"] {
        for memslots in ["window", "per-region"] {
            let v = stress_json(&[
                "--vcpus",
                "2",
                "--pages",
                "2048",
                "--churn",
                "2000",
                "--regions",
                "200",
                "--fault-mode",
                mode,
                "--memslots",
                memslots,
                // One page per exit, and runs on fresh VMs for a second: a single run can end
                // before the churn thread has unmapped anything (a kernel-mode run is over in
                // milliseconds).
                "--fault-around",
                "1",
                "--duration",
                "1",
            ]);
            let what = format!("{mode} {memslots}: {v}");
            assert_eq!(v["memslots"], memslots, "{what}");
            assert_eq!(u(&v, "verify_errors"), 0, "{what}");
            assert_eq!(u(&v, "rss.churn_residual_bytes"), 0, "{what}");
            let ops = u(&v, "churn_ops");
            assert!(ops > 0 && u(&v, "churn.unmaps") > 0, "{what}");
            let changes = u(&v, "kvm_memslot_changes");
            if memslots == "window" {
                assert_eq!(changes, 0, "{what}");
            } else {
                assert!(changes >= u(&v, "churn.maps"), "{what}");
            }
            for op in ["map", "unmap"] {
                let p50 = u(&v, &format!("churn.op_latency_ns.{op}.p50"));
                let p99 = u(&v, &format!("churn.op_latency_ns.{op}.p99"));
                let max = u(&v, &format!("churn.op_latency_ns.{op}.max"));
                assert!(0 < p50 && p50 <= p99 && p99 <= max, "{op}: {what}");
            }
            let b50 = u(&v, "churn.mmap_baseline_ns.p50");
            assert!(
                b50 > 0 && b50 <= u(&v, "churn.mmap_baseline_ns.p99"),
                "{what}"
            );
            if mode != "kernel" {
                assert!(
                    v["churn"]["populate_ns_per_page"].as_f64().unwrap() > 0.0,
                    "{what}"
                );
            }
            // The churn thread's own CPU time, where the kernel reports it: more than none,
            // at most all of the time it churned.
            if support::schedstat_available() {
                let share = v["churn"]["cpu_share"].as_f64().unwrap();
                assert!(u(&v, "churn.cpu_ns") > 0, "{what}");
                assert!(share > 0.0 && share <= 1.01, "{what}");
                assert!(v["churn"]["runqueue_wait_ns"].is_u64(), "{what}");
            } else {
                assert!(v["churn"]["cpu_share"].is_null(), "{what}");
            }
        }
    }
}

/// `--churn-populate false`: the churn thread maps, unmaps, splits and protects without
/// populating anything, and the report says so; by default it populates what it maps.
#[test]
fn churn_without_populating_times_the_mapping_change_alone() {
    require_kvm!();
    for populate in ["true", "false"] {
        let v = stress_json(&[
            "--vcpus",
            "1",
            "--pages",
            "2048",
            "--churn",
            "2000",
            "--fault-around",
            "1",
            "--duration",
            "1",
            "--churn-populate",
            populate,
        ]);
        let what = format!("--churn-populate {populate}: {v}");
        assert_eq!(
            v["churn_populate"].as_bool(),
            Some(populate == "true"),
            "{what}"
        );
        assert!(
            u(&v, "churn.maps") > 0 && u(&v, "churn.unmaps") > 0,
            "{what}"
        );
        assert_eq!(u(&v, "verify_errors"), 0, "{what}");
        assert_eq!(u(&v, "rss.churn_residual_bytes"), 0, "{what}");
        let populated = u(&v, "churn.populated_bytes");
        if populate == "true" {
            assert!(populated > 0, "{what}");
        } else {
            assert_eq!(populated, 0, "{what}");
        }
    }
}

/// `--churn-batch 16`: the churn thread's unmaps and splits go in batches, in window mode and
/// per region; the guest verifies clean, the churn area is empty afterwards, and the report
/// carries the batch size. `--churn-ops` without protect does no protect. The churn thread's
/// scheduling policy (`--control-sched`, auto by default) is in the report.
#[test]
fn batched_churn_unmaps_leave_nothing_behind() {
    require_kvm!();
    for (memslots, ops, sched) in [
        ("window", "map,unmap,split,protect", None),
        ("per-region", "map,unmap,split", Some("batch")),
    ] {
        let mut args = vec![
            "--vcpus",
            "2",
            "--pages",
            "2048",
            "--churn",
            "3000",
            "--churn-batch",
            "16",
            "--churn-ops",
            ops,
            "--memslots",
            memslots,
            "--fault-around",
            "1",
            "--duration",
            "1",
        ];
        if let Some(s) = sched {
            args.extend(["--control-sched", s]);
        }
        let v = stress_json(&args);
        let what = format!("--memslots {memslots}: {v}");
        assert_eq!(v["churn_batch"].as_u64(), Some(16), "{what}");
        assert_eq!(v["control_sched"], sched.unwrap_or("auto"), "{what}");
        let kinds: Vec<&str> = v["churn_kinds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(kinds.join(","), ops, "{what}");
        assert_eq!(
            u(&v, "churn.protects") > 0,
            ops.contains("protect"),
            "{what}"
        );
        assert!(
            u(&v, "churn.unmaps") >= 16 && u(&v, "churn.splits") > 0,
            "{what}"
        );
        assert_eq!(u(&v, "churn.failed"), 0, "{what}");
        // Verify clean, nothing left resident in the churn area, and the rest of the report.
        check_common(&v, 2, 2048, "vcpu", "bonsai");
    }
}

/// `--regions 1000000` in window mode: a million regions in the tree (4 KiB each, side by
/// side), the guest's touches verify clean.
#[test]
fn a_million_regions_in_window_mode() {
    require_kvm!();
    let v = stress_json(&[
        "--vcpus",
        "1",
        "--pages",
        "1024",
        "--regions",
        "1000000",
        "--memslots",
        "window",
    ]);
    assert_eq!(u(&v, "regions"), 1_000_000, "{v}");
    assert_eq!(u(&v, "verify_errors"), 0, "{v}");
    assert_eq!(u(&v, "kvm_memslot_changes"), 0, "{v}");
}

/// Distinct pages one vCPU of `--pages n` writes with `pattern` (as the guest counts them).
fn distinct_pages(pattern: &str, n: u64) -> u64 {
    match pattern {
        "hotcold" => (n / 10).max(1) + n / 10,
        p => match p.strip_prefix("stride:") {
            Some(s) => n.div_ceil(s.parse().unwrap()),
            None => n,
        },
    }
}

/// Every access pattern verifies every page it wrote, in every fault mode, with the adaptive
/// window (the default) and a fixed one; the JSON object names the pattern, and `overfetch`
/// is pages populated per page touched (absent in `kernel` mode).
#[test]
fn every_pattern_verifies_in_every_fault_mode() {
    require_kvm!();
    let patterns = [
        "sequential",
        "reverse",
        "stride:2",
        "stride:16",
        "random",
        "hotcold",
    ];
    for pattern in patterns {
        for mode in ["vcpu", "handler", "kernel"] {
            for fa in ["adaptive", "16"] {
                if mode == "kernel" && fa == "16" {
                    continue;
                }
                let v = stress_json(&[
                    "--pages",
                    "2048",
                    "--regions",
                    "10",
                    "--pattern",
                    pattern,
                    "--fault-mode",
                    mode,
                    "--fault-around",
                    fa,
                ]);
                let what = format!("{pattern} {mode} fault-around {fa}: {v}");
                assert_eq!(v["pattern"], pattern, "{what}");
                assert_eq!(u(&v, "verify_errors"), 0, "{what}");
                assert_eq!(u(&v, "pages"), 2 * distinct_pages(pattern, 2048), "{what}");
                if mode == "kernel" {
                    assert!(v["overfetch"].is_null(), "{what}");
                } else {
                    let o = f(&v, "overfetch");
                    let expect = u(&v, "pages_populated") as f64 / u(&v, "pages") as f64;
                    assert!((o - expect).abs() < 1e-9, "{what}");
                    assert!(o >= 1.0, "every touched page was populated: {what}");
                }
                if fa == "adaptive" {
                    assert_eq!(v["fault_around"], "adaptive", "{what}");
                }
            }
        }
    }
}

/// The adaptive window on a random permutation stays at about one page per fault: at most
/// 10 % over-fetch, and about one fault per page; on sequential and strided scans it grows:
/// few faults, nothing over-fetched. Both vCPUs' streams, in `vcpu` and `handler` mode.
#[test]
fn adaptive_window_follows_the_access_pattern() {
    require_kvm!();
    for mode in ["vcpu", "handler"] {
        let v = stress_json(&[
            "--pages",
            "8192",
            "--pattern",
            "random",
            "--fault-mode",
            mode,
        ]);
        let what = format!("{mode} random: {v}");
        assert!(f(&v, "overfetch") <= 1.1, "{what}");
        assert!(u(&v, "faults") * 10 >= u(&v, "pages") * 9, "{what}");
        for pattern in ["sequential", "reverse", "stride:2", "stride:16"] {
            let v = stress_json(&[
                "--pages",
                "8192",
                "--pattern",
                pattern,
                "--fault-mode",
                mode,
            ]);
            let what = format!("{mode} {pattern}: {v}");
            // Windows of up to 512 pages: after the ramp, one fault per 512 touched pages.
            assert!(u(&v, "faults") * 20 <= u(&v, "pages"), "{what}");
            assert!(f(&v, "overfetch") <= 1.1, "{what}");
        }
    }
}

/// The adaptive window in every address space and memslot mode, and on huge pages (where a
/// fault populates the whole 2 MiB page: the window does not apply).
#[test]
fn adaptive_window_in_every_address_space_and_memslot_mode() {
    require_kvm!();
    for aspace in ["bonsai", "rwlock", "cow"] {
        for memslots in ["window", "per-region"] {
            let v = stress_json(&[
                "--pages",
                "4096",
                "--regions",
                "10",
                "--pattern",
                "stride:16",
                "--address-space",
                aspace,
                "--memslots",
                memslots,
            ]);
            let what = format!("{aspace} {memslots}: {v}");
            assert_eq!(u(&v, "verify_errors"), 0, "{what}");
            assert!(f(&v, "overfetch") <= 1.1, "{what}");
            assert!(u(&v, "faults") * 4 <= u(&v, "pages"), "{what}");
        }
    }
}

#[test]
fn adaptive_window_on_huge_pages() {
    require_kvm!();
    require_hugetlb!(8);
    for pattern in ["sequential", "random"] {
        let v = stress_json(&[
            "--vcpus",
            "1",
            "--pages",
            "2048",
            "--regions",
            "10",
            "--ram-backing",
            "hugetlb",
            "--pattern",
            pattern,
        ]);
        let what = format!("{pattern}: {v}");
        assert_eq!(u(&v, "verify_errors"), 0, "{what}");
        // 8 MiB of RAM is 4 huge pages: one fault each, plus lost races.
        assert!(u(&v, "faults") - u(&v, "populate_races") <= 4, "{what}");
    }
}

/// `--thp` in `kernel` mode: the guest verifies; refused with hugetlb RAM.
#[test]
fn thp_in_kernel_mode() {
    require_kvm!();
    let v = stress_json(&[
        "--pages",
        "2048",
        "--regions",
        "10",
        "--fault-mode",
        "kernel",
        "--thp",
    ]);
    assert_eq!(v["thp"], true, "{v}");
    assert_eq!(u(&v, "verify_errors"), 0, "{v}");
    let o = run(&["stress", "--thp", "--ram-backing", "hugetlb"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // On a host that hands free memory back to its hypervisor, --thp says what that costs.
    let reporting = std::fs::read_to_string("/sys/module/page_reporting/parameters/reported_kib")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|kib| kib > 0);
    let o = run(&["stress", "--pages", "2048", "--regions", "10", "--thp"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).contains("free page reporting"),
        reporting,
        "{}",
        stderr(&o)
    );
}

/// `--thp` in `vcpu` and `handler` modes: a sequential scan's windows of 512 pages are filled
/// with huge pages (moved in), the guest verifies every page under churn, the churn area is
/// left empty, and patterns whose windows never cover a whole 2 MiB get no huge page.
#[test]
fn thp_fills_whole_windows_with_huge_pages_in_vcpu_and_handler_modes() {
    require_kvm!();
    for mode in ["vcpu", "handler"] {
        for pattern in ["sequential", "reverse", "random"] {
            let v = stress_json(&[
                "--vcpus",
                "2",
                "--pages",
                "8192",
                "--regions",
                "10",
                "--fault-mode",
                mode,
                "--pattern",
                pattern,
                "--churn",
                "2000",
                "--thp",
            ]);
            let what = format!("{mode} {pattern}: {v}");
            assert_eq!(v["thp"], true, "{what}");
            check_common(&v, 2, 8192, mode, "bonsai");
            let huge = u(&v, "huge_fills");
            let thp_on = support::thp_enabled();
            if pattern == "random" || !thp_on {
                // (A host with THP `never` gives no huge page: copies do the work.)
                assert_eq!(huge, 0, "{what}");
            } else {
                // 2 x 32 MiB, in 2 MiB pages, less the ramp of each vCPU's scan.
                assert!(huge >= 16, "{what}: {huge} huge fills");
                assert!(huge * 512 <= u(&v, "pages_populated"), "{what}");
            }
        }
    }
}

/// `handler` mode with `VMM_UFFD_ALWAYS_WAKE=1` (the old wake-after-every-fault behaviour,
/// kept for the comparison in docs/bench.md) still verifies, and says so in the report.
#[test]
fn handler_mode_old_wake_behaviour_still_works() {
    require_kvm!();
    for fa in ["1", "adaptive"] {
        let o = support::vmm()
            .args([
                "stress",
                "--json",
                "--pages",
                "2048",
                "--regions",
                "10",
                "--fault-mode",
                "handler",
                "--pattern",
                "random",
                "--fault-around",
                fa,
            ])
            .env("VMM_UFFD_ALWAYS_WAKE", "1")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["uffd_always_wake"], true, "{v}");
        assert_eq!(u(&v, "verify_errors"), 0, "{v}");
    }
}

/// `--floor`: every first touch is served at the floor (one exit and one populated page per
/// touched page, none through the VMM's fault path), on anon and memfd RAM, with 1 and 2
/// vCPUs, and the guest verifies every page; the report says so.
#[test]
fn the_floor_serves_every_first_touch_without_the_fault_path() {
    require_kvm!();
    for (vcpus, backing) in [("1", "anon"), ("2", "anon"), ("2", "memfd")] {
        let v = stress_json(&[
            "--floor",
            "--fault-around",
            "1",
            "--vcpus",
            vcpus,
            "--pages",
            "2048",
            "--regions",
            "10",
            "--ram-backing",
            backing,
        ]);
        let n: u64 = vcpus.parse().unwrap();
        check_common(&v, n, 2048, "vcpu", "bonsai");
        assert_eq!(v["floor"], true, "{v}");
        assert_eq!(
            u(&v, "faults"),
            0,
            "no fault went through the VMM's path: {v}"
        );
        assert_eq!(u(&v, "exits_by_reason.efault"), n * 2048, "{v}");
        assert_eq!(u(&v, "pages_populated"), n * 2048, "{v}");
    }
    // Without --floor the same run goes through the fault path, one fault per page.
    let v = stress_json(&["--fault-around", "1", "--pages", "2048", "--regions", "10"]);
    assert_eq!(v["floor"], false, "{v}");
    assert_eq!(u(&v, "faults"), 2 * 2048, "{v}");
}
