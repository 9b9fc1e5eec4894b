//! End-to-end tests of the memslot window (`--memslots window`, the default): regions mapped,
//! split, protected and unmapped at run time change only the tree and the host mappings, and
//! the guest never sees memory that was unmapped once the unmap has finished.

mod support;

use std::time::Duration;

use support::SocketVm;

/// A `hotplug` guest on 2 vCPUs driven through its control socket.
struct Vm(SocketVm);

impl Vm {
    fn start(name: &str, extra: &[&str]) -> Vm {
        Self::start_env(name, extra, &[])
    }

    fn start_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Vm {
        let sock =
            std::env::temp_dir().join(format!("vmm-window-{}-{name}.sock", std::process::id()));
        let mut args = vec!["--workload", "hotplug", "--vcpus", "2"];
        args.extend_from_slice(extra);
        Vm(SocketVm::start(sock, &args, env))
    }

    /// Runs `vmm ctl OP ARGS...`: (exit status, stdout, stderr).
    fn ctl_run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let o = self.0.ctl(args);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// `vmm ctl OP ARGS...`; panics unless it succeeds. Returns stdout.
    fn ctl(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl_run(args);
        assert_eq!(code, Some(0), "vmm ctl {args:?}: {out} {err}");
        out
    }

    /// `vmm ctl OP ARGS...` that must fail; returns stdout and stderr.
    fn ctl_fails(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl_run(args);
        assert_eq!(code, Some(1), "vmm ctl {args:?} should fail: {out}{err}");
        out + &err
    }

    /// Sends one raw request line and returns the reply line.
    fn raw(&self, line: &str) -> String {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.0.sock).unwrap();
        support::read_greeting(&s);
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        reply
    }

    /// Stops the guest; returns (exit status, stderr).
    fn stop(self) -> (Option<i32>, String) {
        self.ctl(&["stop"]);
        self.0.wait()
    }
}

/// The number before `what` in `text` ("... 12 reads after unmap (0 stale) ...").
fn number_before(text: &str, what: &str) -> u64 {
    let at = text
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} not in {text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|w| w.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no number before {what:?} in {text}"))
}

/// Maps, splits, protects and unmaps regions over and over while the `hotplug` guest writes
/// and reads them. After each unmap has replied (and the mailbox says so), the guest reads
/// back words it wrote there: each must be open bus, never the old data. In both memslot
/// modes and every fault mode: no stale read, no verify error, `check` consistent, and in
/// window mode no memslot beyond the window's.
#[test]
fn unmapped_memory_is_never_seen_again_after_the_reply() {
    require_kvm!();
    for memslots in ["window", "per-region"] {
        for mode in ["vcpu", "handler", "kernel"] {
            let vm = Vm::start(
                &format!("{memslots}-{mode}"),
                &["--memslots", memslots, "--fault-mode", mode],
            );
            for round in 0..8u64 {
                let base = 0x1_0000_0000u64 + round % 2 * (256 << 20);
                let gpa = |off: u64| format!("{:#x}", base + off);
                vm.ctl(&["map", "--gpa", &gpa(0), "--size", "64M"]);
                std::thread::sleep(Duration::from_millis(40));
                vm.ctl(&["unmap", "--gpa", &gpa(16 << 20), "--size", "16M"]);
                vm.ctl(&["protect", "--gpa", &gpa(0), "--size", "8M", "--readonly"]);
                std::thread::sleep(Duration::from_millis(40));
                vm.ctl(&["unmap", "--gpa", &gpa(0), "--size", "64M"]);
                let check = vm.ctl(&["check"]);
                assert!(
                    check.starts_with("consistent"),
                    "{memslots} {mode}: {check}"
                );
                if memslots == "window" {
                    assert!(check.contains(" 3 memslots"), "{memslots} {mode}: {check}");
                }
            }
            let (code, err) = vm.stop();
            let what = format!("--memslots {memslots} --fault-mode {mode}: {err}");
            assert_eq!(code, Some(0), "{what}");
            assert!(err.contains("verify ok (0 errors)"), "{what}");
            assert_eq!(number_before(&err, "stale)"), 0, "{what}");
            assert!(number_before(&err, "reads after unmap") > 0, "{what}");
        }
    }
}

/// A region outside the hot-plug window is refused with a message naming the window, and
/// `--hotplug-window 0` refuses every run-time map; nothing changes.
#[test]
fn maps_outside_the_window_are_refused() {
    require_kvm!();
    let vm = Vm::start("outside", &["--hotplug-window", "1G"]);
    let text = vm.ctl_fails(&["map", "--gpa", "0x140000000", "--size", "4M"]);
    assert!(
        text.contains("outside the hot-plug window [0x100000000, 0x140000000)"),
        "{text}"
    );
    vm.ctl(&["map", "--gpa", "0x13fc00000", "--size", "4M"]);
    assert!(vm.ctl(&["check"]).starts_with("consistent"));
    let (code, err) = vm.stop();
    assert_eq!(code, Some(0), "{err}");
}

/// In the window, `protect` changes the host protection: when that fails (fault injection of
/// the `mprotect` step), the change is undone whole: the tree, the host mappings and the
/// guest's view stay as they were, in both directions.
#[test]
fn a_failed_host_protection_change_is_rolled_back() {
    require_kvm!();
    let vm = Vm::start_env("mprotect", &[], &[("VMM_FAULT_INJECT", "on")]);
    vm.ctl(&["map", "--gpa", "0x100000000", "--size", "8M"]);
    // The layout columns of `list` (resident pages and fault counts move with the guest).
    let layout = || -> Vec<String> {
        vm.ctl(&["list"])
            .lines()
            .map(|l| l.split_whitespace().take(7).collect::<Vec<_>>().join(" "))
            .collect()
    };
    for readonly in [true, false] {
        let before = layout();
        let reply = vm.raw(r#"{"id":1,"op":"inject","step":"mprotect"}"#);
        assert!(reply.contains(r#""ok":true"#), "{reply}");
        let mut args = vec!["protect", "--gpa", "0x100200000", "--size", "2M"];
        args.push(if readonly { "--readonly" } else { "--writable" });
        let err = vm.ctl_fails(&args);
        assert!(err.contains("changing the host protection"), "{err}");
        assert_eq!(layout(), before, "readonly={readonly}: nothing changed");
        assert!(vm.ctl(&["check"]).starts_with("consistent"));
        let reply = vm.raw(r#"{"id":2,"op":"inject","step":"off"}"#);
        assert!(reply.contains(r#""ok":true"#), "{reply}");
        // Now for real, so that the next round undoes a change back to writable.
        if readonly {
            vm.ctl(&[
                "protect",
                "--gpa",
                "0x100000000",
                "--size",
                "8M",
                "--readonly",
            ]);
        }
    }
    let (code, err) = vm.stop();
    assert_eq!(code, Some(0), "{err}");
}
