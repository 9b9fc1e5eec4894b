//! End-to-end tests of `vmm run` on real KVM: the built-in guest's workloads, the exit status,
//! the diagnoses of a guest that goes wrong, `--kernel`, and the errors a user can cause.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::{run, stderr, stdout, vmm};

fn hello(vcpus: usize) {
    let n = vcpus.to_string();
    let o = run(&["run", "--vcpus", &n]);
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        stderr(&o)
    );
    let mut seen = BTreeSet::new();
    for line in out.lines() {
        let k: usize = line
            .strip_prefix("hello from vcpu ")
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("unexpected (interleaved?) line {line:?} in:\n{out}"));
        assert!(seen.insert(k), "vcpu {k} greeted twice:\n{out}");
    }
    assert_eq!(seen, (0..vcpus).collect(), "stdout:\n{out}");
    assert!(stderr(&o).is_empty(), "stderr: {}", stderr(&o));
}

#[test]
fn hello_1_vcpu() {
    require_kvm!();
    hello(1);
}

#[test]
fn hello_2_vcpus() {
    require_kvm!();
    hello(2);
}

#[test]
fn hello_4_vcpus() {
    require_kvm!();
    hello(4);
}

#[test]
fn hello_16_vcpus() {
    require_kvm!();
    hello(16);
}

#[test]
fn default_run_is_hello_on_2_vcpus() {
    require_kvm!();
    let o = run(&["run"]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(
        out.contains("hello from vcpu 0") && out.contains("hello from vcpu 1"),
        "{out}"
    );
}

#[test]
fn exit_status_is_the_guests() {
    require_kvm!();
    for status in ["0", "3", "42", "255"] {
        let o = run(&[
            "run",
            "--vcpus",
            "2",
            "--workload",
            "exit",
            "--exit-status",
            status,
        ]);
        assert_eq!(
            o.status.code(),
            Some(status.parse().unwrap()),
            "stderr: {}",
            stderr(&o)
        );
    }
}

/// The diagnosis is one line on stderr naming the vCPU, what happened and the registers.
fn assert_diagnosis(o: &std::process::Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "want one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
}

#[test]
fn triple_fault_is_diagnosed() {
    require_kvm!();
    let o = run(&["run", "--vcpus", "2", "--workload", "triple-fault"]);
    assert_diagnosis(
        &o,
        1,
        &[
            "vmm: vcpu 0: guest triple-faulted (KVM_EXIT_SHUTDOWN)",
            "rip=0x",
            "cr3=0x4000",
            "efer=",
        ],
    );
}

#[test]
fn unknown_port_is_diagnosed() {
    require_kvm!();
    let o = run(&["run", "--vcpus", "2", "--workload", "bad-port"]);
    assert_diagnosis(
        &o,
        1,
        &["vcpu 0:", "unknown I/O port 0x1234", "0x42", "rip=0x"],
    );
}

#[test]
fn unmapped_mmio_is_open_bus_and_the_guest_goes_on() {
    require_kvm!();
    // The guest writes to and reads from a hole in guest-physical space, and exits 0 only if
    // the read saw all-ones.
    let o = run(&["run", "--vcpus", "1", "--workload", "bad-mmio"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(
        stderr(&o).contains("open bus: 1 reads, 1 writes"),
        "stderr: {}",
        stderr(&o)
    );
}

#[test]
fn hlt_is_diagnosed() {
    require_kvm!();
    let o = run(&["run", "--vcpus", "2", "--workload", "hlt"]);
    assert_diagnosis(&o, 1, &["vcpu 0:", "KVM_EXIT_HLT", "rip=0x"]);
}

#[test]
fn spinning_guest_is_stopped_by_timeout() {
    require_kvm!();
    let start = Instant::now();
    let o = run(&[
        "run",
        "--vcpus",
        "4",
        "--workload",
        "spin",
        "--timeout",
        "0.5",
    ]);
    let took = start.elapsed();
    assert_diagnosis(
        &o,
        124,
        &["timeout", "0.5 s", "vcpu 0 rip=0x", "vcpu 3 rip=0x"],
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(took >= Duration::from_millis(500), "took {took:?}");
}

#[test]
fn missing_kvm_device_is_a_clear_error() {
    // Needs no KVM: the device is never opened.
    let o = run(&["run", "--kvm-dev", "/nonexistent/kvm"]);
    assert_diagnosis(&o, 1, &["/nonexistent/kvm", "does not exist", "KVM"]);
    let o = vmm()
        .args(["run"])
        .env("VMM_KVM_DEV", "/nonexistent/kvm2")
        .output()
        .unwrap();
    assert_diagnosis(&o, 1, &["/nonexistent/kvm2", "does not exist"]);
}

#[test]
fn unopenable_kvm_device_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("vmm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dev = dir.join("not-kvm");
    std::fs::write(&dev, b"").unwrap();
    let o = run(&["run", "--kvm-dev", dev.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    // As root opening works but it is no KVM device; otherwise opening fails. Either way: one
    // line naming the path, status 1.
    assert_diagnosis(&o, 1, &[dev.to_str().unwrap()]);
}

#[test]
fn user_errors_are_one_line_with_status_1() {
    require_kvm!();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--vcpus", "100000"], "too many vCPUs"),
        (&["run", "--mem", "1M"], "too little memory"),
        (&["run", "--mem", "100T"], "too much memory"),
        (&["run", "--mem", "16781313"], "multiple of 4K"),
        (
            &["run", "--kernel", "/nonexistent/kernel"],
            "cannot read it",
        ),
    ];
    for (args, needle) in cases {
        let o = run(args);
        assert_diagnosis(&o, 1, &[needle]);
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["run", "--vcpus", "0"][..],
        &["run", "--mem", "lots"],
        &["run", "--workload", "dance"],
        &["run", "--bogus"],
        &["frobnicate"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn help_documents_run() {
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("run"));
    let o = run(&["run", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let h = stdout(&o);
    for flag in [
        "--vcpus",
        "--mem",
        "--kernel",
        "--workload",
        "--fault-mode",
        "--fault-around",
        "--address-space",
        "--api-sock",
        "--timeout",
        "--kvm-dev",
        "VMM_KVM_DEV",
    ] {
        assert!(h.contains(flag), "{flag} missing from run --help");
    }
}

#[test]
fn verbose_reports_boot_times() {
    require_kvm!();
    let o = run(&["run", "-v", "--vcpus", "2"]);
    assert_eq!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(
        err.contains("first serial line") && err.contains("ms after process start"),
        "{err}"
    );
}

/// A minimal static ELF: `code` loaded and entered at 0x100000.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    support::elf(0x10_0000, &[(0x10_0000, code)])
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn user_kernel_boots_and_sets_the_status() {
    require_kvm!();
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
        0xb0, b'K',                         // mov al, 'K'
        0xee,                               // out dx, al
        0xb0, b'\n',                        // mov al, '\n'
        0xee,                               // out dx, al
        0x48, 0x85, 0xff,                   // test rdi, rdi   (vCPU index)
        0x75, 0x0b,                         // jnz park
        0x66, 0xba, 0xf4, 0x00,             // mov dx, 0xf4
        0xb8, 0x05, 0x00, 0x00, 0x00,       // mov eax, 5
        0xef,                               // out dx, eax
        0xeb, 0xfe,                         // jmp $
        0x66, 0xba, 0xf5, 0x00,             // park: mov dx, 0xf5
        0xee,                               // out dx, al
        0xeb, 0xfe,                         // jmp $
    ];
    let path = temp_file("kernel.elf", &tiny_elf(&code));
    let o = run(&["run", "--vcpus", "1", "--kernel", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(o.status.code(), Some(5), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "K\n");
}

#[test]
fn bad_kernel_files_are_rejected_clearly() {
    require_kvm!();
    let not_elf = temp_file("not-elf", &[b'x'; 200]);
    let mut low = tiny_elf(&[0xeb, 0xfe]);
    low[64 + 16..64 + 24].copy_from_slice(&0x1000u64.to_le_bytes());
    low[64 + 24..64 + 32].copy_from_slice(&0x1000u64.to_le_bytes());
    low[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
    let low = temp_file("low.elf", &low);
    let mut arm = tiny_elf(&[0xeb, 0xfe]);
    arm[18..20].copy_from_slice(&183u16.to_le_bytes());
    let arm = temp_file("arm.elf", &arm);
    for (path, needle) in [
        (&not_elf, "bad magic"),
        (&low, "overlaps the VMM's boot data"),
        (&arm, "need x86-64"),
    ] {
        let o = run(&["run", "--kernel", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(path);
        assert_diagnosis(&o, 1, &["--kernel", "not a loadable image", needle]);
    }
}

#[test]
fn partial_lines_are_flushed_when_every_vcpu_parks() {
    require_kvm!();
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'x',             // mov al, 'x'
        0xee,                   // out dx, al     (no newline)
        0x66, 0xba, 0xf5, 0x00, // mov dx, 0xf5
        0xee,                   // out dx, al     (park)
        0xeb, 0xfe,             // jmp $
    ];
    let path = temp_file("park.elf", &tiny_elf(&code));
    let o = run(&["run", "--vcpus", "3", "--kernel", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "x\nx\nx\n");
}

/// `vmm run --json`: one JSON object on the last line of stdout, after the guest's console,
/// with the exit status, the outcome and diagnosis, exits and faults, and the touch summary.
#[test]
fn run_json_summarises_the_run_on_the_last_line() {
    require_kvm!();
    let o = run(&["run", "--vcpus", "2", "--workload", "touch", "--json"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let last = out.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["status"], 0, "{v}");
    assert_eq!(v["outcome"], "exited", "{v}");
    assert!(v["diagnosis"].is_null(), "{v}");
    assert!(v["touch"]["pages"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["touch"]["verify_errors"], 0, "{v}");
    assert_eq!(v["touch"]["vcpus_done"], 2, "{v}");
    assert!(
        v["faults"]["pages_populated"].as_u64().unwrap() >= v["touch"]["pages"].as_u64().unwrap(),
        "{v}"
    );
    assert!(v["exits"]["total"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(
        v["faults"]["huge_fills"], 0,
        "no huge page without --thp: {v}"
    );

    // With --thp the touch workload's sequential slices are filled a huge page per 2 MiB
    // window once the adaptive window has grown, and still verify.
    let o = run(&[
        "run",
        "--vcpus",
        "2",
        "--workload",
        "touch",
        "--thp",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let v: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["touch"]["verify_errors"], 0, "{v}");
    let thp_on = support::thp_enabled();
    assert_eq!(
        v["faults"]["huge_fills"].as_u64().unwrap() > 0,
        thp_on,
        "huge fills where the host has THP: {v}"
    );

    let o = run(&[
        "run",
        "--vcpus",
        "1",
        "--workload",
        "triple-fault",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["status"], 1, "{v}");
    assert_eq!(v["outcome"], "fatal", "{v}");
    assert!(
        v["diagnosis"].as_str().unwrap().contains("triple-faulted"),
        "{v}"
    );
}
