//! End-to-end tests of the control socket: `vmm run --api-sock` driven by a real socket client
//! (and by `vmm ctl`), with the guest's `hotplug` workload following the mailbox.

#![allow(dead_code)] // helpers used by tests added in later steps

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A running `vmm run --api-sock`.
struct Vm {
    child: Option<Child>,
    sock: PathBuf,
}

fn sock_path(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-ctl-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

impl Vm {
    fn start(name: &str, extra: &[&str]) -> Vm {
        Self::start_env(name, extra, &[])
    }

    fn start_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Vm {
        let sock = sock_path(name);
        let mut cmd = support::vmm();
        cmd.args(["run", "--api-sock"])
            .arg(&sock)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot run vmm");
        let vm = Vm {
            child: Some(child),
            sock,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&vm.sock).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the control socket did not appear"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        vm
    }

    fn client(&self) -> Client {
        Client::connect(&self.sock)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn rss_bytes(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for the VMM to exit.
    fn wait(mut self) -> Output {
        let child = self.child.take().unwrap();
        let t0 = Instant::now();
        let out = wait_with_timeout(child, Duration::from_secs(30));
        assert!(t0.elapsed() < Duration::from_secs(30), "vmm did not exit");
        out
    }
}

fn wait_with_timeout(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A line-oriented socket client.
struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            next_id: 1,
        }
    }

    fn send_line(&mut self, line: &str) -> Value {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        self.read_reply()
    }

    fn read_reply(&mut self) -> Value {
        let mut reply = String::new();
        self.r.read_line(&mut reply).expect("reply");
        assert!(reply.ends_with('\n'), "no full reply line: {reply:?}");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply}"))
    }

    /// Sends `req` with a fresh id; returns the reply after checking the id.
    fn call(&mut self, mut req: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        req["id"] = json!(id);
        let v = self.send_line(&req.to_string());
        assert_eq!(v["id"], json!(id), "{v}");
        v
    }

    fn ok(&mut self, req: Value) -> Value {
        let v = self.call(req.clone());
        assert_eq!(v["ok"], json!(true), "{req} -> {v}");
        v["result"].clone()
    }

    fn err(&mut self, req: Value, code: &str) -> Value {
        let v = self.call(req.clone());
        assert_eq!(v["ok"], json!(false), "{req} -> {v}");
        assert_eq!(v["error"]["code"], json!(code), "{req} -> {v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5, "{v}");
        v
    }

    fn hotplug_regions(&mut self) -> Vec<(u64, u64)> {
        let r = self.ok(json!({"op": "list"}));
        r["regions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == "hotplug")
            .map(|r| (hex(&r["gpa"]), r["size"].as_u64().unwrap()))
            .collect()
    }

    fn assert_consistent(&mut self) -> Value {
        let c = self.ok(json!({"op": "check"}));
        assert_eq!(c["consistent"], json!(true), "{c}");
        c
    }
}

fn hex(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

fn map(gpa: u64, size: &str) -> Value {
    json!({"op": "map", "gpa": format!("{gpa:#x}"), "size": size, "backing": "anon"})
}

fn unmap(gpa: u64, size: u64) -> Value {
    json!({"op": "unmap", "gpa": format!("{gpa:#x}"), "size": size})
}

#[test]
fn map_list_unmap_and_errors() {
    require_kvm!();
    let vm = Vm::start("basic", &["--workload", "spin", "--timeout", "60"]);
    let mode = std::fs::metadata(&vm.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut c = vm.client();
    let r = c.ok(map(4 * GIB, "64M"));
    assert_eq!(r["gpa"], json!("0x100000000"));
    assert_eq!(r["size"], json!(64 * MIB));
    assert!(r["slot"].as_u64().is_some(), "{r}");
    c.err(map(4 * GIB + 32 * MIB, "64M"), "overlap");
    c.err(map(8 * GIB + 1, "4K"), "invalid");
    c.err(map(16 * MIB, "4K"), "reserved");
    c.err(map(0, "4K"), "reserved");
    c.err(map(0xd000_0000, "4K"), "reserved");
    c.err(map(64 * GIB, "4K"), "invalid");
    c.err(json!({"op": "dance"}), "invalid");
    c.err(unmap(16 * MIB, 4096), "reserved");
    c.err(unmap(32 * GIB, 4096), "not_found");
    let v = c.send_line("{not json");
    assert_eq!(v["id"], Value::Null);
    assert_eq!(v["error"]["code"], json!("invalid"));
    let v = c.send_line(r#"{"op":"list"}"#);
    assert_eq!(v["id"], Value::Null);
    assert_eq!(v["error"]["code"], json!("invalid"));
    assert_eq!(c.hotplug_regions(), vec![(4 * GIB, 64 * MIB)]);
    // Unmap the middle: two halves remain, each with a memslot.
    let r = c.ok(unmap(4 * GIB + 16 * MIB, 16 * MIB));
    assert_eq!(r["removed"][0]["size"], json!(16 * MIB));
    assert_eq!(
        c.hotplug_regions(),
        vec![(4 * GIB, 16 * MIB), (4 * GIB + 32 * MIB, 32 * MIB)]
    );
    c.assert_consistent();
    c.ok(unmap(4 * GIB, 64 * MIB));
    assert!(c.hotplug_regions().is_empty());
    c.assert_consistent();
    // `vmm ctl` against the same socket.
    let sock = vm.sock.to_str().unwrap();
    let o = support::run(&[
        "ctl",
        "--api-sock",
        sock,
        "map",
        "--gpa",
        "0x200000000",
        "--size",
        "2M",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", support::stderr(&o));
    assert!(support::stdout(&o).contains("mapped [0x200000000, 0x200200000)"));
    let o = support::run(&[
        "ctl",
        "--api-sock",
        sock,
        "map",
        "--gpa",
        "0x200000000",
        "--size",
        "2M",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        support::stderr(&o).contains("(overlap)"),
        "{}",
        support::stderr(&o)
    );
    let o = support::run(&["ctl", "--api-sock", sock, "--json", "list"]);
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_str(&support::stdout(&o)).unwrap();
    assert_eq!(v["ok"], json!(true));
    let o = support::run(&["ctl", "--api-sock", sock, "stats"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        support::stdout(&o).contains("grace periods:"),
        "{}",
        support::stdout(&o)
    );
    // A second VMM on the live socket is refused.
    let o = support::run(&["run", "--api-sock", sock, "--timeout", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(support::stderr(&o).contains("another process is listening"));
    drop(vm);
}

#[test]
fn stale_socket_is_replaced_and_removed_on_exit() {
    require_kvm!();
    let sock = sock_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let o = support::run(&[
        "run",
        "--workload",
        "hello",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", support::stderr(&o));
    assert!(!sock.exists(), "the socket is removed on exit");
    let o = support::run(&["ctl", "--api-sock", sock.to_str().unwrap(), "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(support::stderr(&o).contains("cannot connect"));
}
