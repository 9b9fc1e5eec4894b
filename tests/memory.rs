//! End-to-end tests of demand-paged guest RAM on real KVM: the `touch` workload in every fault
//! mode and address-space implementation, with and without fault-around.

mod support;

use support::{run, stderr};

/// Runs `touch` and returns the summary line; asserts the exit status and a clean verify.
fn touch(extra: &[&str]) -> String {
    let mut args = vec!["run", "--workload", "touch", "--mem", "64M"];
    args.extend_from_slice(extra);
    let o = run(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "vmm {args:?}\nstderr:\n{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("touch: "))
        .unwrap_or_else(|| panic!("no touch summary in:\n{err}"))
        .to_owned();
    assert!(line.contains("verify ok (0 errors)"), "{line}");
    line
}

/// The number before `word` in `line` (e.g. "14336 pages").
fn number_before(line: &str, word: &str) -> u64 {
    let i = line
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in {line}"));
    line[..i]
        .trim_end()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {word:?} in {line}"))
}

#[test]
fn touch_is_clean_in_every_mode_and_address_space() {
    require_kvm!();
    for mode in ["vcpu", "handler", "kernel"] {
        for aspace in ["bonsai", "rwlock", "cow"] {
            let line = touch(&[
                "--vcpus",
                "2",
                "--fault-mode",
                mode,
                "--address-space",
                aspace,
            ]);
            let pages = number_before(&line, "pages (");
            assert!(pages > 10_000, "{line}");
            assert!(line.contains(&format!("({mode} mode)")), "{line}");
            let faults = number_before(&line, "faults serviced");
            let populated = number_before(&line, "pages populated");
            if mode == "kernel" {
                assert_eq!((faults, populated), (0, 0), "{line}");
            } else {
                // Without fault-around every touched page is one fault, populated once.
                assert_eq!(faults, pages, "{line}");
                assert_eq!(populated, pages, "{line}");
            }
        }
    }
}

#[test]
fn touch_on_one_vcpu_and_with_fault_around() {
    require_kvm!();
    for mode in ["vcpu", "handler", "kernel"] {
        touch(&["--vcpus", "1", "--fault-mode", mode]);
        let line = touch(&["--vcpus", "2", "--fault-mode", mode, "--fault-around", "16"]);
        if mode != "kernel" {
            let pages = number_before(&line, "pages (");
            let faults = number_before(&line, "faults serviced");
            // 16-page windows: about one fault per 16 pages (slices need not be aligned).
            assert!(faults * 8 <= pages, "{line}");
            assert!(number_before(&line, "pages populated") >= pages, "{line}");
        }
    }
}

#[test]
fn fault_around_must_be_a_power_of_two() {
    let o = run(&["run", "--fault-around", "3"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("power of two"), "{}", stderr(&o));
}
