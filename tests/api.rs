//! The `vmm` library on real KVM, without the binary: a VM built, started and waited for
//! through `vmm::vm::Vm`, its report, and its teardown (every file descriptor and thread it
//! opened is gone when it is dropped, waited for or not).

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm::cli::Pattern;
use vmm::memory::{FaultMode, RegionKind};
use vmm::vm::{RunConfig, RunOutcome, Vm, VmError};

/// One VM at a time: the teardown checks count the process's file descriptors and threads.
fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest's serial console, kept in memory.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// What `vmm run --workload W --vcpus N` builds, with `params` as the CLI sets them.
fn config(workload: u32, vcpus: u32, pages: u64) -> RunConfig {
    let mut params = vec![0, pages, 0];
    params.extend(Pattern::Sequential.params(1));
    RunConfig {
        timeout: Some(Duration::from_secs(30)),
        ..RunConfig::new(workload, params, vcpus, 64 << 20)
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The VMM's own threads (vCPUs, userfaultfd handler, companions, prefetcher), by name: the
/// test harness starts and ends threads of its own meanwhile.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| {
            let name = name.trim_end();
            ["vcpu", "sidecar", "uffd-handler", "prefetch"]
                .iter()
                .any(|p| name.starts_with(p))
        })
        .count()
}

/// The process's descriptors and the VMM's threads come back to `before` (a thread ends a
/// moment after it is joined: give it that moment).
fn assert_released(before: (usize, usize), what: &str) {
    let settle = Instant::now() + Duration::from_secs(2);
    while (open_fds(), threads()) != before && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        (open_fds(), threads()),
        before,
        "{what}: (file descriptors, VMM threads) not released"
    );
}

#[test]
fn hello_built_started_and_waited_for_through_the_library() {
    require_kvm!();
    let _one = serial();
    let before = (open_fds(), threads());
    let cfg = config(abi::workload::HELLO, 2, 0);
    let vm = Vm::build(&cfg).expect("build");
    // Built: RAM and the boot area are mapped, no vCPU runs yet.
    let kinds: Vec<_> = vm.address_space().list().iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [RegionKind::Boot, RegionKind::Ram]);
    let console = Console::default();
    let running = vm.start(Box::new(console.clone())).expect("start");
    let report = running.wait();
    assert_eq!(report.outcome, RunOutcome::Exited(0), "{report:?}");
    assert!(report.stuck.is_empty(), "{report:?}");
    let mut lines: Vec<_> = console.text().lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, ["hello from vcpu 0", "hello from vcpu 1"]);
    assert!(report.first_line.is_some_and(|t| t <= report.total));
    assert!(report.exits.io > 0, "{:?}", report.exits);
    assert_eq!(report.results.len(), 2);
    assert_released(before, "hello");
}

#[test]
fn touch_reports_every_page_verified() {
    require_kvm!();
    let _one = serial();
    let before = (open_fds(), threads());
    let pages = 1024;
    let cfg = config(abi::workload::TOUCH, 2, pages);
    let report = vmm::vm::run(&cfg, Box::new(Console::default())).expect("run");
    assert_eq!(report.outcome, RunOutcome::Exited(0), "{report:?}");
    for (i, r) in report.results.iter().enumerate() {
        assert_ne!(r.done, 0, "vcpu {i} did not finish: {r:?}");
        assert_eq!(r.pages, pages, "vcpu {i}");
        assert_eq!(r.verify_errors, 0, "vcpu {i}");
    }
    // Every first touch was served by the VMM (vcpu mode): at least the pages touched.
    assert_eq!(report.fault_mode, FaultMode::Vcpu);
    assert!(
        report.counters.pages_populated >= 2 * pages,
        "{:?}",
        report.counters
    );
    assert_eq!(
        report.touch_histogram.iter().sum::<u64>(),
        2 * pages,
        "one latency sample per page touched"
    );
    assert_released(before, "touch");
}

#[test]
fn a_running_vm_dropped_without_waiting_stops_and_releases_everything() {
    require_kvm!();
    let _one = serial();
    let before = (open_fds(), threads());
    let mut cfg = config(abi::workload::SPIN, 2, 0);
    cfg.timeout = None;
    let console = Console::default();
    let running = Vm::build(&cfg)
        .expect("build")
        .start(Box::new(console))
        .expect("start");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(threads(), before.1 + 2, "both vCPU threads run");
    assert!(open_fds() > before.0, "the VM's descriptors are open");
    let t = Instant::now();
    drop(running);
    // Kicked out of KVM_RUN at once, not after the 2 s grace period.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_released(before, "spin, dropped");
}

#[test]
fn build_errors_are_errors_and_release_everything() {
    require_kvm!();
    let _one = serial();
    let before = (open_fds(), threads());
    let mut cfg = config(abi::workload::HELLO, 100_000, 0);
    match Vm::build(&cfg) {
        Err(VmError::TooManyVcpus { requested, .. }) => assert_eq!(requested, 100_000),
        other => panic!("{other:?}"),
    }
    cfg.vcpus = 1;
    cfg.sidecars
        .push_setup(Box::new(|_space| Err("refused by the test".into())));
    match Vm::build(&cfg) {
        Err(VmError::Setup(why)) => assert_eq!(why, "refused by the test"),
        other => panic!("{other:?}"),
    }
    cfg.kvm_dev = PathBuf::from("/nonexistent/kvm");
    assert!(matches!(Vm::build(&cfg), Err(VmError::Kvm(_))));
    assert_released(before, "failed builds");
}
