//! End-to-end tests of `vmm summarize` (and its alias `vmm stress --summarize`): saved
//! benchmark rows in, Markdown tables and bar charts out. No KVM needed.
//!
//! `data/summarize.jsonl` holds real rows taken from docs/: two `vmm stress --json` reports
//! (docs/bench-results.jsonl) and four restore-benchmark rows (docs/restore-results.jsonl).

mod support;

use std::path::{Path, PathBuf};

use support::{run, stderr, stdout};

/// The fixture: 2 stress reports, then 4 restore rows.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/summarize.jsonl")
}

/// A fresh directory for this test's files.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-summarize-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn both_kinds_of_rows_make_their_tables_and_plots() {
    let dir = temp_dir("tables");
    let plot = dir.join("bars.svg");
    let o = run(&[
        "summarize",
        fixture().to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    let t = stdout(&o);
    // The stress table: one row per configuration, then the targets.
    assert!(t.starts_with("| fault mode | pattern |"), "{t}");
    for row in [
        "| vcpu | sequential | bonsai | 1 | 0 | 1 | 27122 | 27122 | 33.5 µs | 53.6 µs | 67.0 µs | 1.00 | n/a | 0 | 106 | 255 ns | 0 |",
        "| vcpu | sequential | bonsai | 1 | 1000 | 1 | 26362 | 26362 | 33.5 µs | 53.6 µs | 80.4 µs | 1.00 | n/a | 954 | 2093 | 8191 ns | 0 |",
        "| `vcpu` / `kernel` (bonsai, no churn) | not measured | 0.8 | |",
    ] {
        assert!(t.contains(row), "missing {row:?} in\n{t}");
    }
    // Then, after a blank line, the restore table and its targets.
    let restore = t
        .find("\n\n| RAM | working set |")
        .expect("the restore table");
    assert!(t.find("| fault mode |").unwrap() < restore, "{t}");
    for row in [
        "| 64M | 10 % | vcpu | adaptive | none | 6.3 | 12.1 | 73 | 63109 | 1.43 |",
        "| 64M | 10 % | eager | - | none | 40.0 | 42.1 | 295 | 11044 | 10.01 |",
        "| 64M, 10 % working set: time to resident, `vcpu` / `handler` (adaptive, no prefetch) | ≤ 0.5 | 0.91 (12.1 / 13.3 ms) |",
        "| 64M, 10 % working set: time to resident, `vcpu` + `--prefetch ws` / `eager` | ≤ 0.5 | 0.35 (14.8 / 42.1 ms) |",
        "| runs with a wrong word or a failure | 0 | 0 of 4 |",
    ] {
        assert!(t.contains(row), "missing {row:?} in\n{t}");
    }
    // The stress bars at --plot, the restore bars per guest size beside it.
    for svg in [plot.clone(), dir.join("bars-64M.svg")] {
        let s = std::fs::read_to_string(&svg).unwrap_or_else(|e| panic!("{}: {e}", svg.display()));
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "{s}"
        );
    }

    // The alias prints the same.
    let alias = run(&["stress", "--summarize", fixture().to_str().unwrap()]);
    assert_eq!(alias.status.code(), Some(0), "{}", stderr(&alias));
    assert_eq!(stdout(&alias), t);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_malformed_line_is_a_clear_error_with_status_1() {
    let dir = temp_dir("malformed");
    let good = std::fs::read_to_string(fixture()).unwrap();
    for (name, bad, what) in [
        (
            "truncated",
            "{\"vcpus\":1,\"fault_mode\":",
            "line 7: not JSON",
        ),
        (
            "not-a-report",
            "{\"vcpus\":\"two\"}",
            "line 7: neither a `vmm stress --json` report nor a restore-benchmark row",
        ),
        (
            "bad-restore-row",
            "{\"bench\":\"restore\",\"size\":\"64M\"}",
            "line 7: not a restore-benchmark row",
        ),
    ] {
        let f = dir.join(format!("{name}.jsonl"));
        std::fs::write(&f, format!("{good}{bad}\n")).unwrap();
        for args in [
            &["summarize", f.to_str().unwrap()][..],
            &["stress", "--summarize", f.to_str().unwrap()],
        ] {
            let o = run(args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert!(
                stdout(&o).is_empty(),
                "{args:?}: no partial table: {}",
                stdout(&o)
            );
            assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
            assert!(
                err.contains(f.to_str().unwrap()),
                "{args:?}: names the file: {err}"
            );
            assert!(err.contains(what), "{args:?}: {err}");
            assert!(
                err.starts_with(if args[0] == "summarize" {
                    "vmm summarize: "
                } else {
                    "vmm stress: --summarize: "
                }),
                "{err}"
            );
        }
    }
    // A file that is not there: status 1 too; no file at all: a usage error.
    let o = run(&["summarize", dir.join("absent.jsonl").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot read it"), "{}", stderr(&o));
    assert_eq!(run(&["summarize"]).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}
