//! Shared helpers of the end-to-end tests: the KVM gate and running the real `vmm` binary.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Whether KVM tests can run here. Returns false (after saying why) only when `/dev/kvm` does
/// not exist; with `VMM_REQUIRE_KVM=1` that is a failure instead. A `/dev/kvm` that exists but
/// cannot be opened is always a failure.
pub fn kvm_available() -> bool {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("/dev/kvm does not exist, and VMM_REQUIRE_KVM=1 forbids skipping KVM tests");
        }
        eprintln!("skipping: /dev/kvm does not exist (set VMM_REQUIRE_KVM=1 to fail instead)");
        return false;
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        panic!("/dev/kvm exists but cannot be opened: {e}");
    }
    true
}

/// Skips the calling test (returns from it) when KVM is unavailable; see [`kvm_available`].
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::support::kvm_available() {
            return;
        }
    };
}

/// The `vmm` binary under test.
pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.env_remove("VMM_KVM_DEV").env_remove("RUST_LOG");
    c
}

/// Runs `vmm` with `args`.
pub fn run(args: &[&str]) -> Output {
    vmm()
        .args(args)
        .output()
        .expect("cannot run the vmm binary")
}

/// `vmm ctl --api-sock SOCK ARGS...`.
pub fn ctl(sock: &Path, args: &[&str]) -> Output {
    vmm()
        .arg("ctl")
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .output()
        .expect("cannot run the vmm binary")
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Free 2 MiB huge pages on the host (0 if the kernel has none configured).
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the host gives transparent huge pages to mappings that ask for them (its setting
/// is not `never`): where it does not, `--thp` fills nothing with huge pages.
pub fn thp_enabled() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
}

/// Whether the kernel reports each thread's time on a CPU and waiting for one
/// (`/proc/thread-self/schedstat`), which `vmm stress` reports then.
pub fn schedstat_available() -> bool {
    std::path::Path::new("/proc/thread-self/schedstat").exists()
}

/// Whether `need` free huge pages are there for a hugetlb test. Returns false (after saying
/// why) when they are not; with `VMM_REQUIRE_HUGETLB` set (as `.ci/run` does, after reserving
/// them) that is a failure instead.
pub fn hugetlb_available(need: u64) -> bool {
    let free = free_hugepages();
    if free >= need {
        return true;
    }
    let why = format!(
        "{free} free 2 MiB huge pages, {need} needed (echo 16 > /proc/sys/vm/nr_hugepages)"
    );
    assert!(
        std::env::var_os("VMM_REQUIRE_HUGETLB").is_none(),
        "VMM_REQUIRE_HUGETLB is set but the test cannot run: {why}"
    );
    eprintln!("skipped: {why}");
    false
}

/// Skips the calling test (returns from it) unless `$need` huge pages are free; see
/// [`hugetlb_available`].
#[macro_export]
macro_rules! require_hugetlb {
    ($need:expr) => {
        if !$crate::support::hugetlb_available($need) {
            return;
        }
    };
}

/// A static ELF with one `PT_LOAD` (RWX) per `(address, code)` segment, entered at `entry`.
pub fn elf(entry: u64, segments: &[(u64, &[u8])]) -> Vec<u8> {
    let header = 64 + 56 * segments.len();
    let mut b = vec![0u8; 64];
    b[0..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELF64
    b[5] = 1; // little-endian
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&entry.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
    let mut offset = header as u64;
    for (addr, code) in segments {
        let mut ph = [0u8; 56];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[16..24].copy_from_slice(&addr.to_le_bytes());
        ph[24..32].copy_from_slice(&addr.to_le_bytes());
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b.extend_from_slice(&ph);
        offset += code.len() as u64;
    }
    for (_, code) in segments {
        b.extend_from_slice(code);
    }
    b
}

/// A running `vmm run --api-sock SOCK ...` whose serial output is collected, for the tests
/// that drive a VM through its control socket. Killed (and its socket removed) when dropped.
pub struct SocketVm {
    child: std::process::Child,
    /// The control socket.
    pub sock: std::path::PathBuf,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl SocketVm {
    /// Starts `vmm run --timeout 120 --api-sock SOCK ARGS...` with `env` set, and waits for the
    /// socket to appear.
    pub fn start(sock: std::path::PathBuf, args: &[&str], env: &[(&str, &str)]) -> SocketVm {
        use std::io::BufRead;
        use std::process::Stdio;
        use std::time::{Duration, Instant};
        let _ = std::fs::remove_file(&sock);
        let mut all = vec![
            "run",
            "--timeout",
            "120",
            "--api-sock",
            sock.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let mut child = vmm()
            .args(&all)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run the vmm binary");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (o, pipe) = (std::sync::Arc::clone(&out), child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut o = o.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "the control socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        SocketVm { child, sock, out }
    }

    /// Waits until the serial console shows `n` lines containing `what`.
    pub fn wait_for(&self, what: &str, n: usize) {
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.out.lock().unwrap().matches(what).count();
            if seen >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} x {what:?} never appeared: {}",
                self.out.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `vmm ctl ARGS...` against this VM.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.sock, args)
    }

    /// `vmm ctl ARGS...`, which must succeed; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "vmm ctl {args:?}: {} {}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// Waits for the process to end; returns (exit status, stderr).
    pub fn wait(mut self) -> (Option<i32>, String) {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).unwrap();
        }
        let status = self.child.wait().unwrap();
        (status.code(), err)
    }
}

impl Drop for SocketVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Reads the greeting a control socket sends first and checks it (one JSON line with the
/// protocol version and capabilities). Reads byte by byte, so that nothing after the greeting
/// is taken from the socket. Returns the greeting.
pub fn read_greeting(mut s: &std::os::unix::net::UnixStream) -> serde_json::Value {
    use std::io::Read;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        assert_eq!(
            s.read(&mut b).expect("the greeting"),
            1,
            "the connection closed before the greeting: {}",
            String::from_utf8_lossy(&line)
        );
        line.push(b[0]);
    }
    let v: serde_json::Value = serde_json::from_slice(&line)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&line)));
    let g = &v["greeting"];
    assert_eq!(g["name"], "vmm", "{v}");
    assert_eq!(g["protocol"], 1, "{v}");
    assert_eq!(g["version"], env!("CARGO_PKG_VERSION"), "{v}");
    let caps: Vec<&str> = g["capabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("no capabilities: {v}"))
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for op in [
        "map",
        "unmap",
        "protect",
        "list",
        "stats",
        "check",
        "stop",
        "snapshot",
        "subscribe",
        "events",
    ] {
        assert!(caps.contains(&op), "{op} missing from the greeting: {v}");
    }
    v
}
