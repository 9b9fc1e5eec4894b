//! End-to-end tests of the control socket: `vmm run --api-sock` driven by a real socket client
//! (and by `vmm ctl`), with the guest's `hotplug` workload following the mailbox.

#![allow(dead_code)] // not every helper of `support` is used here

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
        // The socket exists once bound (before the VM boots); connections queue until the
        // server accepts them. (Probing with a connection would count against --max-clients.)
        while !vm.sock.exists() {
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

/// Connects to the control socket. The socket file appears at `bind`, a moment before the
/// server's `listen`; a connection in between is refused, so retry for a while.
fn connect(path: &Path) -> UnixStream {
    let t0 = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && t0.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("connect to {}: {e}", path.display()),
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
        let s = connect(path);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        support::read_greeting(&s);
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

    /// Every region's `(gpa, size, slot)`: what a change that failed must leave as it was.
    fn layout(&mut self) -> Vec<(Value, Value, Value)> {
        let r = self.ok(json!({"op": "list"}));
        r["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["gpa"].clone(), r["size"].clone(), r["slot"].clone()))
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
    // The test-only op exists only with VMM_FAULT_INJECT set.
    c.err(json!({"op": "inject", "step": "mmap"}), "invalid");
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

/// Polls `stats` until `pred` holds (or fails after `secs`).
fn wait_stats(c: &mut Client, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let s = c.ok(json!({"op": "stats"}));
        if pred(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the guest and checks that the run ends with status 0 and a clean verify.
fn stop_and_verify(vm: Vm, c: &mut Client) -> String {
    c.ok(json!({"op": "stop"}));
    let sock = vm.sock.clone();
    let o = vm.wait();
    let err = support::stderr(&o);
    // Where the guest saw old data after an unmap, if it did (its console).
    let out = support::stdout(&o);
    let stale = out
        .lines()
        .filter(|l| l.contains("hotplug: stale"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(o.status.code(), Some(0), "stderr:\n{err}\n{stale}");
    let line = err
        .lines()
        .find(|l| l.starts_with("hotplug: "))
        .unwrap_or_else(|| panic!("no hotplug summary in:\n{err}"))
        .to_owned();
    assert!(line.contains("verify ok (0 errors)"), "{line}\n{stale}");
    assert!(!sock.exists(), "the socket is removed on exit");
    line
}

#[test]
fn hotplug_guest_touches_splits_and_rss_falls_after_unmap() {
    require_kvm!();
    let vm = Vm::start("hotplug", &["--workload", "hotplug", "--timeout", "120"]);
    let mut c = vm.client();
    let base = 4 * GIB;
    c.ok(map(base, "64M"));
    // The guest touches the new region: faults are serviced, pages become resident.
    let s = wait_stats(&mut c, 30, "the guest to touch the whole region", |s| {
        s["regions"][0]["resident_pages"].as_u64() == Some(64 * MIB / 4096)
    });
    let r = &s["regions"][0];
    assert!(r["faults"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["guest"]["pages_touched"].as_u64().unwrap() >= 64 * MIB / 4096,
        "{s}"
    );
    assert_eq!(s["guest"]["verify_errors"], json!(0), "{s}");
    assert!(s["exits"]["total"].as_u64().unwrap() > 0);
    assert!(s["rcu"]["grace_periods"].is_u64());
    let rss_full = vm.rss_bytes();
    // Unmap the middle: two halves remain, and the guest still finds its data there.
    c.ok(unmap(base + 16 * MIB, 32 * MIB));
    assert_eq!(
        c.hotplug_regions(),
        vec![(base, 16 * MIB), (base + 48 * MIB, 16 * MIB)]
    );
    let rss_half = vm.rss_bytes();
    // The reply came after the memory was released: RSS already fell by ~32 MiB.
    assert!(
        rss_full - rss_half > 28 * MIB,
        "RSS {rss_full} -> {rss_half} after unmapping 32 MiB of touched memory"
    );
    c.assert_consistent();
    c.ok(unmap(base, 64 * MIB));
    assert!(c.hotplug_regions().is_empty());
    let rss_empty = vm.rss_bytes();
    assert!(
        rss_full - rss_empty > 60 * MIB,
        "RSS {rss_full} -> {rss_empty} after unmapping all 64 MiB"
    );
    eprintln!(
        "RSS: {} MiB touched, {} MiB after unmapping the middle half, {} MiB after unmapping the rest",
        rss_full >> 20,
        rss_half >> 20,
        rss_empty >> 20
    );
    // A region mapped again at the same place starts from zero and is touched again.
    c.ok(map(base, "8M"));
    wait_stats(&mut c, 30, "the guest to touch the new region", |s| {
        s["regions"][0]["resident_pages"].as_u64() == Some(8 * MIB / 4096)
    });
    // Read-only: the guest reads it; nothing is written.
    c.ok(json!({"op": "protect", "gpa": format!("{base:#x}"), "size": "4M", "readonly": true}));
    c.ok(
        json!({"op": "map", "gpa": format!("{:#x}", base + GIB), "size": "4M", "backing": "memfd"}),
    );
    c.ok(json!({"op": "map", "gpa": format!("{:#x}", base + 2 * GIB), "size": "4M", "readonly": true}));
    wait_stats(&mut c, 30, "the guest to touch the memfd region", |s| {
        s["regions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["backing"] == "memfd" && r["resident_pages"].as_u64() == Some(1024))
    });
    c.assert_consistent();
    let line = stop_and_verify(vm, &mut c);
    eprintln!("{line}");
}

fn batch(ranges: &[(u64, u64)]) -> Value {
    let ranges: Vec<Value> = ranges
        .iter()
        .map(|(g, s)| json!({"gpa": format!("{g:#x}"), "size": s}))
        .collect();
    json!({"op": "unmap_batch", "ranges": ranges})
}

/// `unmap_batch` (and `vmm ctl unmap` with several ranges) under a guest touching every
/// region: a batch with any bad range is refused whole and changes nothing; a good one takes
/// out whole regions and middle parts at once, frees their memory before it replies, sends
/// one `unmapped` event per range, and the guest never reads old data from any of them.
#[test]
fn a_batched_unmap_goes_whole_or_not_at_all() {
    require_kvm!();
    let vm = Vm::start("batch", &["--workload", "hotplug", "--timeout", "120"]);
    let mut c = vm.client();
    let mut events = vm.client();
    events.ok(json!({"op": "subscribe", "events": ["unmapped"]}));
    let base = 4 * GIB;
    for i in 0..4 {
        c.ok(map(base + i * 16 * MIB, "8M"));
    }
    let s = wait_stats(&mut c, 30, "the guest to touch every region", |s| {
        s["regions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["resident_pages"].as_u64() == Some(8 * MIB / 4096))
            .count()
            == 4
    });
    assert_eq!(s["guest"]["verify_errors"], json!(0), "{s}");
    let before = c.layout();
    for (bad, code) in [
        // One range maps nothing.
        (vec![(base, 8 * MIB), (base + 8 * MIB, 4096)], "not_found"),
        // Two overlap.
        (vec![(base, 8 * MIB), (base + 4 * MIB, 8 * MIB)], "invalid"),
        // One is unaligned.
        (
            vec![(base, 8 * MIB), (base + 16 * MIB + 1, 4096)],
            "invalid",
        ),
        // One is the guest's boot RAM.
        (vec![(base, 8 * MIB), (0, 4096)], "reserved"),
        (vec![], "invalid"),
    ] {
        c.err(batch(&bad), code);
        assert_eq!(c.layout(), before, "{bad:x?} changed something");
    }
    let too_many: Vec<(u64, u64)> = (0..1025).map(|i| (base + i * 4096, 4096)).collect();
    c.err(batch(&too_many), "limit");
    assert_eq!(c.layout(), before);
    let rss_full = vm.rss_bytes();
    // Two whole regions and the middle of a third, at once.
    let r = c.ok(batch(&[
        (base, 8 * MIB),
        (base + 32 * MIB + 2 * MIB, 4 * MIB),
        (base + 48 * MIB, 8 * MIB),
    ]));
    assert_eq!(r["removed"].as_array().unwrap().len(), 3, "{r}");
    assert_eq!(
        c.hotplug_regions(),
        vec![
            (base + 16 * MIB, 8 * MIB),
            (base + 32 * MIB, 2 * MIB),
            (base + 38 * MIB, 2 * MIB)
        ]
    );
    // The reply came after the memory was freed: 20 MiB of touched pages.
    let rss_after = vm.rss_bytes();
    assert!(
        rss_full - rss_after > 18 * MIB,
        "RSS {rss_full} -> {rss_after} after unmapping 20 MiB of touched memory in one batch"
    );
    let e: Vec<Value> = (0..3).map(|_| read_event(&mut events)).collect();
    let got: Vec<(u64, u64)> = e
        .iter()
        .map(|v| (hex(&v["gpa"]), v["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (base, 8 * MIB),
            (base + 34 * MIB, 4 * MIB),
            (base + 48 * MIB, 8 * MIB)
        ]
    );
    c.assert_consistent();
    // `vmm ctl unmap` with several ranges sends one batch; a --gpa without its --size is a
    // usage error that sends nothing.
    let ctl = |args: &[&str]| support::ctl(&vm.sock, args);
    let o = ctl(&[
        "unmap",
        "--gpa",
        "0x101000000",
        "--gpa",
        "0x102000000",
        "--size",
        "2M",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", support::stderr(&o));
    assert!(support::stderr(&o).contains("one --size per --gpa"));
    let o = ctl(&[
        "unmap",
        "--gpa",
        "0x101000000",
        "--size",
        "8M",
        "--gpa",
        "0x102000000",
        "--size",
        "2M",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", support::stderr(&o));
    let out = support::stdout(&o);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(c.hotplug_regions(), vec![(base + 38 * MIB, 2 * MIB)]);
    c.assert_consistent();
    let line = stop_and_verify(vm, &mut c);
    eprintln!("{line}");
}

#[test]
fn concurrent_clients_and_hostile_ones_harm_no_one() {
    require_kvm!();
    let vm = Vm::start(
        "concurrent",
        &[
            "--workload",
            "hotplug",
            "--timeout",
            "120",
            "--max-regions",
            "64",
            // The four clients' areas reach 40 GiB.
            "--hotplug-window",
            "40G",
        ],
    );
    let sock = vm.sock.clone();
    let mut workers = Vec::new();
    // Four clients map, split, protect and unmap in their own windows while the guest faults.
    for i in 0..4u64 {
        let sock = sock.clone();
        workers.push(std::thread::spawn(move || {
            let mut c = Client::connect(&sock);
            let base = (8 + 8 * i) * GIB;
            for k in 0..25u64 {
                let gpa = base + (k % 4) * 64 * MIB;
                c.ok(map(gpa, "4M"));
                std::thread::sleep(Duration::from_millis(2));
                c.ok(
                    json!({"op": "protect", "gpa": format!("{:#x}", gpa + 3 * MIB),
                            "size": "1M", "readonly": true}),
                );
                c.ok(unmap(gpa + MIB, MIB));
                c.ok(unmap(gpa, 4 * MIB));
            }
        }));
    }
    // Hostile: half a line, then gone.
    let s2 = sock.clone();
    workers.push(std::thread::spawn(move || {
        for _ in 0..20 {
            let mut s = connect(&s2);
            s.write_all(br#"{"id":1,"op":"map","gpa":"0x1"#).unwrap();
        }
    }));
    // Hostile: a flood of garbage and a line far over the limit; the connection survives.
    let s3 = sock.clone();
    workers.push(std::thread::spawn(move || {
        let mut c = Client::connect(&s3);
        let big = vec![b'x'; 1 << 20];
        c.w.write_all(&big).unwrap();
        let v = c.send_line("");
        assert_eq!(v["error"]["code"], json!("limit"), "{v}");
        let v = c.send_line(&"[".repeat(60000));
        assert_eq!(v["error"]["code"], json!("invalid"), "{v}");
        let garbage: String = (0..2000).map(|i| format!("garbage {i}\n")).collect();
        c.w.write_all(garbage.as_bytes()).unwrap();
        for _ in 0..2000 {
            assert_eq!(c.read_reply()["error"]["code"], json!("invalid"));
        }
        c.ok(json!({"op": "list"}));
    }));
    // Hostile: asks a lot and never reads the replies.
    let s4 = sock.clone();
    workers.push(std::thread::spawn(move || {
        let mut s = connect(&s4);
        let req = "{\"id\":1,\"op\":\"stats\"}\n".repeat(5000);
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(req.as_bytes());
        std::thread::sleep(Duration::from_secs(1));
    }));
    for w in workers {
        w.join().expect("a client thread failed");
    }
    let mut c = vm.client();
    assert!(c.hotplug_regions().is_empty());
    let check = c.assert_consistent();
    // The boot area's, RAM's and the hot-plug window's: nothing left of the churn.
    assert_eq!(check["memslots"], json!(3), "{check}");
    let s = c.ok(json!({"op": "stats"}));
    assert!(s["totals"]["maps"].as_u64().unwrap() >= 100, "{s}");
    assert!(s["totals"]["faults"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["guest"]["verify_errors"], json!(0), "{s}");
    let line = stop_and_verify(vm, &mut c);
    eprintln!("{line}");
}

#[test]
fn client_and_line_limits() {
    require_kvm!();
    let vm = Vm::start(
        "limits",
        &[
            "--workload",
            "spin",
            "--timeout",
            "60",
            "--max-clients",
            "2",
            "--max-regions",
            "3",
            "--max-hotplug-mem",
            "64M",
        ],
    );
    let mut a = vm.client();
    let mut b = vm.client();
    a.ok(json!({"op": "list"}));
    std::thread::sleep(Duration::from_millis(10));
    b.ok(json!({"op": "list"}));
    // A third client is served: the one that has gone longest without a request (a) makes
    // room, and is told why.
    let mut third = vm.client();
    third.ok(json!({"op": "list"}));
    let v = a.read_reply();
    assert_eq!(v["error"]["code"], json!("limit"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-clients"),
        "{v}"
    );
    let mut rest = String::new();
    assert_eq!(a.r.read_line(&mut rest).unwrap(), 0, "a is closed: {rest}");
    b.ok(json!({"op": "list"}));
    let s = third.ok(json!({"op": "stats"}));
    assert_eq!(s["control"]["clients"], json!(2), "{s}");
    assert_eq!(s["control"]["clients_evicted"], json!(1), "{s}");
    drop(b);
    // The slot frees once the server sees the disconnect.
    let t0 = Instant::now();
    while third.ok(json!({"op": "stats"}))["control"]["clients"] != json!(1) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "b's slot stayed taken"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut a = third;
    // A line over 64 KiB is refused; the connection goes on.
    let long = format!(r#"{{"id":1,"op":"list","pad":"{}"}}"#, "x".repeat(70_000));
    let v = a.send_line(&long);
    assert_eq!(v["error"]["code"], json!("limit"), "{v}");
    a.ok(json!({"op": "list"}));
    // Regions and memory limits.
    a.ok(map(4 * GIB, "32M"));
    a.err(map(5 * GIB, "33M"), "limit");
    a.ok(map(5 * GIB, "16M"));
    a.ok(map(6 * GIB, "4M"));
    a.err(map(7 * GIB, "4K"), "limit");
    // A split that would make a fourth region is refused before anything changes.
    a.err(unmap(4 * GIB + 4 * MIB, 4096), "limit");
    a.err(
        json!({"op": "protect", "gpa": "0x100400000", "size": "4K", "readonly": true}),
        "limit",
    );
    assert_eq!(a.hotplug_regions().len(), 3);
    a.ok(unmap(4 * GIB, 32 * MIB));
    a.err(unmap(4 * GIB, 4096), "not_found");
    a.ok(unmap(5 * GIB, 2 * GIB));
    assert!(a.hotplug_regions().is_empty());
    a.assert_consistent();
}

#[test]
fn socket_is_private_to_its_user() {
    require_kvm!();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        eprintln!("skipping: needs root to run a client as another user");
        return;
    }
    let vm = Vm::start("private", &["--workload", "spin", "--timeout", "30"]);
    use std::os::unix::process::CommandExt;
    let o = support::vmm()
        .args(["ctl", "--api-sock", vm.sock.to_str().unwrap(), "list"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        support::stderr(&o).contains("ermission denied"),
        "{}",
        support::stderr(&o)
    );
    vm.client().ok(json!({"op": "list"}));
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A small seeded generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len() as u64) as usize]
    }
}

/// One generated request line: mostly plausible requests (in a small window above 4 GiB so
/// that some succeed), then mutated.
fn fuzz_line(r: &mut Rng, id: u64) -> String {
    let gpa = 4 * GIB + r.below(128) * 2 * MIB + if r.below(8) == 0 { r.below(4096) } else { 0 };
    let size = [
        "4K",
        "64K",
        "1M",
        "2M",
        "4M",
        "8M",
        "0",
        "3",
        "1G",
        "99999999T",
        "-1",
    ];
    let addr = match r.below(4) {
        0 => format!("{gpa}"),
        1 => json!(gpa).to_string(),
        _ => format!("{gpa:#x}"),
    };
    let addr =
        if addr.starts_with('"') || addr.chars().all(|c| c.is_ascii_digit()) && r.below(2) == 0 {
            addr
        } else {
            format!("\"{addr}\"")
        };
    let op = r.pick(&[
        "map",
        "unmap",
        "protect",
        "list",
        "stats",
        "map",
        "unmap",
        "check",
        "dance",
        "",
        "unmap_batch",
    ]);
    let mut line = format!(
        r#"{{"id":{id},"op":"{op}","gpa":{addr},"size":"{}""#,
        r.pick(&size)
    );
    match op {
        "map" => {
            line += &format!(
                r#","backing":"{}""#,
                r.pick(&["anon", "memfd", "anon", "hugetlb", "x"])
            )
        }
        "protect" => line += &format!(r#","readonly":{}"#, r.pick(&["true", "false", "1", "null"])),
        _ => {}
    }
    line.push('}');
    if op == "unmap_batch" {
        // Up to 4 ranges, some adjacent, some overlapping, some of them bad.
        let ranges: Vec<String> = (0..r.below(5))
            .map(|_| {
                let g = 4 * GIB + r.below(128) * 2 * MIB + r.below(4) * 512 * 1024;
                format!(r#"{{"gpa":"{g:#x}","size":"{}"}}"#, r.pick(&size))
            })
            .collect();
        line = format!(
            r#"{{"id":{id},"op":"unmap_batch","ranges":[{}]}}"#,
            ranges.join(",")
        );
    }
    if matches!(op, "list" | "stats" | "check") && r.below(2) == 0 {
        line = format!(r#"{{"id":{id},"op":"{op}"}}"#);
    }
    // Mutations.
    let mut b = line.into_bytes();
    for _ in 0..r.below(4) {
        let len = b.len() as u64;
        match r.below(9) {
            0 => b.truncate(r.below(len) as usize),
            1 => {
                let i = r.below(len + 1) as usize;
                b.insert(i, r.below(256) as u8);
            }
            2 if len > 0 => {
                let i = r.below(len) as usize;
                b[i] = r.below(256) as u8;
            }
            3 if len > 0 => {
                let i = r.below(len) as usize;
                b.remove(i);
            }
            4 => {
                let i = r.below(len + 1) as usize;
                let bits = [
                    "{",
                    "}",
                    "[",
                    "]",
                    ",",
                    ":",
                    "\"",
                    "\\u0000",
                    "1e999",
                    "-0",
                    "null",
                    "\"id\":",
                    "\"op\":\"map\"",
                    "\u{1F600}",
                ];
                let s = r.pick(&bits).as_bytes().to_vec();
                b.splice(i..i, s);
            }
            5 => b = "[".repeat(r.below(300) as usize).into_bytes(),
            6 => b.extend_from_slice(&b.clone()),
            7 => b = (0..r.below(64)).map(|_| r.below(256) as u8).collect(),
            _ => {}
        }
    }
    let mut line: String = String::from_utf8_lossy(&b)
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    if line.trim().is_empty() {
        line = "x".into();
    }
    line
}

/// Sends `lines` generated lines over `conns` connections at once (each pipelined: one thread
/// writes, one reads); every line must get exactly one well-formed reply.
fn fuzz(vm: &Vm, lines: u64, conns: u64, seed: u64) -> (u64, f64) {
    let t0 = Instant::now();
    let per = lines / conns;
    let handles: Vec<_> = (0..conns)
        .map(|k| {
            let sock = vm.sock.clone();
            std::thread::spawn(move || {
                let c = Client::connect(&sock);
                let mut w = c.w.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let mut r = Rng(seed ^ (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                    let mut buf = String::new();
                    for i in 0..per {
                        buf += &fuzz_line(&mut r, i);
                        buf.push('\n');
                        if buf.len() > 32 << 10 {
                            w.write_all(buf.as_bytes()).unwrap();
                            buf.clear();
                        }
                    }
                    w.write_all(buf.as_bytes()).unwrap();
                });
                let mut reader = c.r;
                let (mut ok, mut line) = (0u64, String::new());
                for _ in 0..per {
                    line.clear();
                    reader.read_line(&mut line).expect("a reply (no hang)");
                    let v: Value =
                        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                    match &v["ok"] {
                        Value::Bool(true) => ok += 1,
                        Value::Bool(false) => {
                            let code = v["error"]["code"].as_str().unwrap();
                            assert!(
                                ["invalid", "overlap", "not_found", "limit", "reserved"]
                                    .contains(&code),
                                "{v}"
                            );
                        }
                        _ => panic!("{v}"),
                    }
                }
                writer.join().unwrap();
                ok
            })
        })
        .collect();
    let ok = handles.into_iter().map(|h| h.join().unwrap()).sum();
    (ok, (per * conns) as f64 / t0.elapsed().as_secs_f64())
}

/// `CTL_FUZZ_LINES` (default 50,000; the documented run used 1,000,000) generated and
/// mutated lines against a live VM whose guest keeps touching whatever gets mapped.
#[test]
fn fuzzed_requests_never_hurt_the_vm() {
    require_kvm!();
    // Its hugetlb maps take huge pages: not while another test counts them.
    let _huge = huge_pages_lock();
    let lines: u64 = std::env::var("CTL_FUZZ_LINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    let vm = Vm::start(
        "fuzz",
        &[
            "--workload",
            "hotplug",
            "--timeout",
            "0",
            "--max-regions",
            "32",
            "--max-hotplug-mem",
            "128M",
        ],
    );
    let (ok, rate) = fuzz(&vm, lines, 2, 0x5eed);
    eprintln!("fuzz: {lines} lines, {ok} succeeded, {rate:.0} lines/s");
    assert!(ok > 0);
    let mut c = vm.client();
    let check = c.assert_consistent();
    let s = c.ok(json!({"op": "stats"}));
    assert_eq!(s["guest"]["verify_errors"], json!(0), "{s}");
    eprintln!(
        "fuzz: {} regions left, {} memslots; maps {}, unmaps {}, protects {}; guest {} pages, {} vanished",
        check["regions"], check["memslots"], s["totals"]["maps"], s["totals"]["unmaps"],
        s["totals"]["protects"], s["guest"]["pages_touched"], s["guest"]["vanished"]
    );
    let line = stop_and_verify(vm, &mut c);
    eprintln!("{line}");
}

/// Shared-memory regions (memfd) mapped and unmapped as fast as the socket goes, at the same
/// few addresses, while the `hotplug` guest writes them: a guest write racing with an unmap
/// must not outlive it. (Unmapping a shared region in `vcpu` mode puts the armed hole back
/// with a fresh anonymous mapping. It used to be read-write before it was registered with
/// userfaultfd, and a vCPU write in that gap was populated by the kernel and read back after
/// the unmap had replied: about 30 stale reads in 20 s of this, none with anonymous regions,
/// which stay registered.) `CTL_FLIP_SECS` sets how long (6 s by default).
#[test]
fn shared_regions_unmapped_under_guest_writes_leave_nothing_behind() {
    require_kvm!();
    let vm = Vm::start(
        "flip",
        &[
            "--workload",
            "hotplug",
            "--timeout",
            "120",
            "--max-regions",
            "32",
            "--max-hotplug-mem",
            "128M",
        ],
    );
    let mut c = vm.client();
    let mut rng = Rng(7);
    let mut live = [0u64; 16];
    let secs: u64 = std::env::var("CTL_FLIP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let t0 = Instant::now();
    let mut ops = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        let slot = rng.below(16) as usize;
        let gpa = 4 * GIB + slot as u64 * 8 * MIB;
        if live[slot] == 0 {
            let size = [2, 4, 8][rng.below(3) as usize] * MIB;
            c.ok(
                json!({"op": "map", "gpa": format!("{gpa:#x}"), "size": size, "backing": "memfd"}),
            );
            live[slot] = size;
        } else {
            c.ok(unmap(gpa, live[slot]));
            live[slot] = 0;
        }
        ops += 1;
    }
    let line = stop_and_verify(vm, &mut c);
    let checked: u64 = line
        .split(" reads after unmap")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of reads after unmap in {line}"));
    assert!(checked > 100, "{ops} maps and unmaps: {line}");
    eprintln!("{ops} maps and unmaps: {line}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `VMM_FAULT_INJECT` (test-only): `mmap`, userfaultfd registration and the memslot call fail
/// at each step of map, unmap (split) and protect; the tree, KVM's memslots and the host
/// mappings stay consistent after every step, failed maps change nothing, and nothing leaks.
#[test]
fn injected_failures_roll_back_at_every_step() {
    require_kvm!();
    let vm = Vm::start_env(
        "inject",
        // Memslot steps exist only with a memslot per region.
        &[
            "--workload",
            "hotplug",
            "--timeout",
            "120",
            "--memslots",
            "per-region",
        ],
        &[("VMM_FAULT_INJECT", "on")],
    );
    let mut c = vm.client();
    // Without the variable the op does not exist (checked in map_list_unmap_and_errors).
    c.ok(json!({"op": "inject", "step": "off"}));
    let fds = open_fds(vm.pid());
    let rss0 = vm.rss_bytes();
    let (a, b) = (4 * GIB, 5 * GIB);
    let ops = [
        map(a, "8M"),
        json!({"op": "map", "gpa": format!("{b:#x}"), "size": "8M", "backing": "memfd"}),
        unmap(a + 2 * MIB, 2 * MIB),
        json!({"op": "protect", "gpa": format!("{:#x}", b + 2 * MIB), "size": "2M", "readonly": true}),
    ];
    for step in ["mmap", "uffd", "memslot"] {
        let mut failed = 0;
        let mut exit_served = 0;
        for nth in 1..=4 {
            c.ok(json!({"op": "inject", "step": step, "nth": nth}));
            for op in &ops {
                let before = c.layout();
                let v = c.call(op.clone());
                if v["ok"] != json!(true) && v["error"]["code"] != json!("internal") {
                    // The consequence of an earlier failed map.
                    assert_eq!(
                        v["error"]["code"],
                        json!("not_found"),
                        "{step}:{nth} {op} -> {v}"
                    );
                } else if v["ok"] != json!(true) {
                    failed += 1;
                    let msg = v["error"]["message"].as_str().unwrap();
                    assert!(
                        msg.contains("injected failure") && msg.contains("nothing was changed"),
                        "{msg}"
                    );
                    assert_eq!(before, c.layout(), "a failed {op} changed the regions");
                }
                let check = c.assert_consistent();
                exit_served += check["exit_served"].as_u64().unwrap();
            }
            c.ok(json!({"op": "inject", "step": "off"}));
            // Let the guest touch what is there (split pieces without a memslot included).
            std::thread::sleep(Duration::from_millis(100));
            let _ = c.call(unmap(a, 2 * GIB));
            assert!(c.hotplug_regions().is_empty());
            let check = c.assert_consistent();
            assert_eq!(check["memslots"], json!(2), "{check}");
        }
        eprintln!("inject {step}: {failed} requests failed and rolled back, {exit_served} pieces served by exits");
        match step {
            "memslot" => {
                assert_eq!(failed, 2, "map A (1st call) and map B (2nd)");
                assert!(
                    exit_served > 0,
                    "split pieces whose memslot failed are served by exits"
                );
            }
            _ => assert_eq!(failed, 2, "{step}: fails map A (1st call) and map B (2nd)"),
        }
    }
    let check = c.ok(json!({"op": "check"}));
    assert_eq!(check["injected"].as_u64(), Some(2 + 2 + 4), "{check}");
    // A client connection's socket closes when its server thread notices the disconnect (it
    // polls): give that a moment, then every descriptor must be back to where it was.
    let settle = std::time::Instant::now() + Duration::from_secs(15);
    while open_fds(vm.pid()) != fds && std::time::Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open_fds(vm.pid()), fds, "file descriptors leaked");
    assert!(vm.rss_bytes() < rss0 + 8 * MIB, "host memory leaked");
    let line = stop_and_verify(vm, &mut c);
    eprintln!("{line}");
}

/// Teardown failures during unmap (test-only injection): a failed userfaultfd unregister and
/// a failed release of the host memory cannot be undone (the range has already left the tree
/// and KVM), so the unmap succeeds, the failure is counted, and the pages are freed anyway
/// (the release drops the registration; a failed release is replaced by discarding the pages
/// and revoking access). A refused memslot delete undoes the unmap, end to end. The same
/// range can be mapped again afterwards, and the guest verifies clean.
#[test]
fn teardown_failures_free_the_memory_and_a_refused_memslot_delete_is_undone() {
    require_kvm!();
    let vm = Vm::start_env(
        "teardown",
        // A refused memslot delete exists only with a memslot per region.
        &[
            "--workload",
            "hotplug",
            "--timeout",
            "120",
            "--memslots",
            "per-region",
        ],
        &[("VMM_FAULT_INJECT", "on")],
    );
    let mut c = vm.client();
    let rss0 = vm.rss_bytes();
    let (a, b) = (4 * GIB, 5 * GIB);
    let pages = |bytes: u64| bytes / 4096;
    let touched = |c: &mut Client, bytes: u64| {
        wait_stats(c, 30, "the guest to touch the region", |s| {
            s["regions"][0]["resident_pages"].as_u64() == Some(pages(bytes))
        })
    };
    let teardown_errors =
        |c: &mut Client| c.ok(json!({"op": "stats"}))["totals"]["teardown_errors"].clone();

    c.ok(map(a, "32M"));
    touched(&mut c, 32 * MIB);
    assert!(vm.rss_bytes() >= rss0 + 24 * MIB, "the guest touched 32M");
    // A failed unregister: the split succeeds, the failure is counted.
    c.ok(json!({"op": "inject", "step": "uffd-unregister", "nth": 1}));
    c.ok(unmap(a + 8 * MIB, 8 * MIB));
    c.assert_consistent();
    assert_eq!(teardown_errors(&mut c), json!(1));
    // A failed release: the unmap succeeds, the pages are discarded and the range made
    // inaccessible (`check` compares the tree with the process's read-write mappings).
    c.ok(json!({"op": "inject", "step": "release", "nth": 1}));
    let removed = c.ok(unmap(a, 32 * MIB));
    assert_eq!(
        removed["removed"].as_array().map(Vec::len),
        Some(2),
        "{removed}"
    );
    c.assert_consistent();
    assert_eq!(teardown_errors(&mut c), json!(2));
    assert!(c.hotplug_regions().is_empty());
    let rss = vm.rss_bytes();
    assert!(
        rss < rss0 + 8 * MIB,
        "pages not freed: RSS {rss} vs {rss0} at start"
    );

    // A refused memslot delete undoes the unmap: same regions, same memslots.
    c.ok(json!({"op": "map", "gpa": format!("{b:#x}"), "size": "8M", "backing": "memfd"}));
    touched(&mut c, 8 * MIB);
    c.ok(json!({"op": "inject", "step": "memslot-delete", "nth": 1}));
    let before = c.layout();
    let v = c.err(unmap(b + 2 * MIB, 2 * MIB), "internal");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("injected failure"), "{msg}");
    assert_eq!(before, c.layout(), "the refused unmap changed the regions");
    c.assert_consistent();
    c.ok(json!({"op": "inject", "step": "off"}));
    c.ok(unmap(b, 8 * MIB));

    // A batch whose second memslot delete is refused: the first range is gone, and the error
    // says so; the second is as it was.
    c.ok(map(a, "4M"));
    c.ok(map(b, "4M"));
    c.ok(json!({"op": "inject", "step": "memslot-delete", "nth": 2}));
    let v = c.err(batch(&[(a, 4 * MIB), (b, 4 * MIB)]), "internal");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("injected failure")
            && msg.contains("the first 1 of the 2 ranges were unmapped"),
        "{msg}"
    );
    assert_eq!(c.hotplug_regions(), vec![(b, 4 * MIB)]);
    c.assert_consistent();
    c.ok(unmap(b, 4 * MIB));

    // The range whose release failed maps again, and the guest uses it.
    c.ok(map(a, "16M"));
    touched(&mut c, 16 * MIB);
    c.ok(unmap(a, 16 * MIB));
    let check = c.assert_consistent();
    assert_eq!(check["injected"].as_u64(), Some(4), "{check}");
    let line = stop_and_verify(vm, &mut c);
    eprintln!("{line}");
}

/// Serialises the tests that take huge pages (the host's free count is global).
fn huge_pages_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// hugetlb backing in every fault mode: the guest uses the region (in `vcpu` and `handler`
/// modes the VMM populates a whole 2 MiB huge page per first touch), a cut that is not on a
/// huge-page boundary is refused and changes nothing, and unmapping part of the region gives
/// exactly that part's huge pages back to the host at once (not when the last piece goes).
/// Needs 4 free huge pages: `.ci/run` reserves them and sets `VMM_REQUIRE_HUGETLB=1`.
#[test]
fn hugetlb_regions_are_demand_paged_in_huge_pages_and_freed_in_part() {
    require_kvm!();
    let _huge = huge_pages_lock();
    require_hugetlb!(4);
    let free0 = support::free_hugepages();
    for mode in ["vcpu", "handler", "kernel"] {
        let vm = Vm::start(
            &format!("hugetlb-{mode}"),
            &[
                "--workload",
                "hotplug",
                "--fault-mode",
                mode,
                "--timeout",
                "120",
            ],
        );
        let mut c = vm.client();
        let a = 4 * GIB;
        c.ok(json!({"op": "map", "gpa": format!("{a:#x}"), "size": "8M", "backing": "hugetlb"}));
        let s = wait_stats(&mut c, 30, "the guest to touch the hugetlb region", |s| {
            s["guest"]["pages_touched"].as_u64() >= Some(8 * MIB / 4096)
        });
        assert_eq!(
            support::free_hugepages(),
            free0 - 4,
            "{mode}: 4 huge pages back the region"
        );
        if mode != "kernel" {
            // Each huge page populated once, whole: 4 faults, plus those that lost a race
            // (two vCPUs touching the same huge page at once).
            let r = &s["regions"][0];
            let (faults, races) = (
                r["faults"].as_u64().unwrap(),
                s["totals"]["populate_races"].as_u64().unwrap(),
            );
            assert_eq!(faults - races, 4, "{mode}: one fault per huge page: {s}");
            assert_eq!(s["totals"]["pages_populated"], json!(2048), "{mode}: {s}");
            assert_eq!(r["resident_pages"], json!(2048), "{mode}: {s}");
        }
        // More than the host has free: a clear error, nothing mapped.
        let too_many = (support::free_hugepages() + 1) * 2 * MIB;
        let e = c.err(
            json!({"op": "map", "gpa": format!("{:#x}", a + GIB), "size": too_many, "backing": "hugetlb"}),
            "limit",
        );
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("huge pages"),
            "{e}"
        );
        let before = c.ok(json!({"op": "list"}))["regions"].clone();
        c.err(unmap(a + 4096, 4096), "invalid");
        c.err(
            json!({"op": "protect", "gpa": format!("{a:#x}"), "size": "1M", "readonly": true}),
            "invalid",
        );
        assert_eq!(c.ok(json!({"op": "list"}))["regions"], before, "{mode}");
        c.ok(unmap(a + 2 * MIB, 2 * MIB));
        c.assert_consistent();
        assert_eq!(
            support::free_hugepages(),
            free0 - 3,
            "{mode}: the unmapped middle's huge page is free"
        );
        c.ok(unmap(a, 8 * MIB));
        assert_eq!(support::free_hugepages(), free0, "{mode}");
        let line = stop_and_verify(vm, &mut c);
        eprintln!("{mode}: {line}");
    }
}

/// Reads one line from `s` within `limit`; `None` on EOF or when nothing came in time.
fn read_line_within(s: &UnixStream, limit: Duration) -> Option<String> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(n) if n > 0 => Some(line),
        _ => None,
    }
}

/// A client that holds a partial request line past `--client-idle-timeout` is told why and
/// disconnected, even if it keeps trickling bytes (the time counts from the line's first
/// byte); a client that sends nothing at all stays; drops are counted in `stats`.
#[test]
fn clients_holding_a_partial_line_are_dropped_after_the_idle_timeout() {
    require_kvm!();
    let vm = Vm::start(
        "idle",
        &[
            "--workload",
            "spin",
            "--timeout",
            "60",
            "--client-idle-timeout",
            "1",
        ],
    );
    let mut silent = vm.client();
    silent.ok(json!({"op": "list"}));
    let mut partial = connect(&vm.sock);
    support::read_greeting(&partial);
    partial.write_all(br#"{"id":1,"op":"li"#).unwrap();
    let t0 = Instant::now();
    let mut trickle = connect(&vm.sock);
    let trickler = std::thread::spawn(move || {
        // One byte every 200 ms, never a newline: at most 5 s of it.
        for _ in 0..25 {
            if trickle.write_all(b" ").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    });
    let reply = read_line_within(&partial, Duration::from_secs(5))
        .expect("the half-line client got no reply within 5 s");
    let waited = t0.elapsed();
    let v: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["error"]["code"], json!("limit"), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--client-idle-timeout"), "{msg}");
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "dropped after {waited:?} with a 1 s timeout"
    );
    assert_eq!(
        read_line_within(&partial, Duration::from_secs(2)),
        None,
        "closed after the notice"
    );
    assert!(
        trickler.join().unwrap(),
        "a client trickling a line one byte at a time was not dropped"
    );
    // The silent client (no partial line) is still served.
    std::thread::sleep(Duration::from_millis(500));
    silent.ok(json!({"op": "list"}));
    let s = silent.ok(json!({"op": "stats"}));
    assert_eq!(s["control"]["clients_dropped_idle"], json!(2), "{s}");
    assert_eq!(s["control"]["clients"], json!(1), "{s}");
}

/// Every client slot held by connections that send half a line or nothing at all: `vmm ctl
/// check` and `vmm ctl stop` still get through at once (the longest-idle client makes room).
#[test]
fn stop_and_check_get_through_when_every_client_slot_is_held() {
    require_kvm!();
    let vm = Vm::start(
        "held",
        &[
            "--workload",
            "hotplug",
            "--timeout",
            "60",
            "--max-clients",
            "4",
        ],
    );
    // Holds a slot: sends nothing at all, or half a line after one request.
    let hold = |i: usize| {
        let mut c = vm.client();
        if i % 2 == 1 {
            c.ok(json!({"op": "list"}));
            c.w.write_all(br#"{"id":2,"op":"st"#).unwrap();
        }
        c
    };
    let mut held: Vec<Client> = (0..4).map(hold).collect();
    let sock = vm.sock.to_str().unwrap();
    let timed = |args: &[&str]| {
        let t0 = Instant::now();
        let o = support::run(args);
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{args:?} took {:?} with every slot held",
            t0.elapsed()
        );
        o
    };
    // Served (whether the address space is consistent is not this test's business).
    let o = timed(&["ctl", "--api-sock", sock, "--json", "check"]);
    let v: Value = serde_json::from_str(&support::stdout(&o)).unwrap_or(Value::Null);
    assert_eq!(v["ok"], json!(true), "{v}{}", support::stderr(&o));
    // Take the freed slot back, as a hostile client would.
    std::thread::sleep(Duration::from_millis(100));
    held.push(hold(4));
    let o = timed(&["ctl", "--api-sock", sock, "--json", "stats"]);
    assert_eq!(o.status.code(), Some(0), "{}", support::stderr(&o));
    let v: Value = serde_json::from_str(&support::stdout(&o)).unwrap();
    assert!(
        v["result"]["control"]["clients_evicted"].as_u64() >= Some(2),
        "{v}"
    );
    assert_eq!(v["result"]["control"]["max_clients"], json!(4), "{v}");
    std::thread::sleep(Duration::from_millis(100));
    held.push(hold(5));
    let o = timed(&["ctl", "--api-sock", sock, "stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", support::stderr(&o));
    // The evicted clients were told why.
    let notices = held
        .iter()
        .filter_map(|c| read_line_within(&c.w, Duration::from_millis(200)))
        .filter(|l| l.contains("\"limit\"") && l.contains("--max-clients"))
        .count();
    assert!(notices >= 3, "{notices} evicted clients got a notice");
    let o = vm.wait();
    let err = support::stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("verify ok (0 errors)"), "{err}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

/// A fresh directory under the temporary directory with `mode`.
fn test_dir(name: &str, mode: u32) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-ctl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
    d
}

/// `vmm run --api-sock` refuses (status 1, nothing created) a socket path whose directory, or
/// any directory above it, another user could change: group- or world-writable without the
/// sticky bit, owned by another user (not root), or reached through another user's symlink.
#[test]
fn run_refuses_a_socket_directory_other_users_can_change() {
    require_kvm!();
    let refused = |sock: &Path, why: &str, dir: &Path| {
        let o = support::run(&[
            "run",
            "--workload",
            "hello",
            "--timeout",
            "10",
            "--api-sock",
            sock.to_str().unwrap(),
        ]);
        let err = support::stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", sock.display());
        assert!(
            err.contains(why) && err.contains(&dir.display().to_string()),
            "{}: want {why:?} about {}: {err}",
            sock.display(),
            dir.display()
        );
        assert!(
            std::fs::symlink_metadata(sock).is_err(),
            "{} was created",
            sock.display()
        );
    };
    let open = test_dir("dir-0777", 0o777);
    refused(&open.join("sock"), "writable", &open);
    let sub = open.join("private");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
    refused(&sub.join("sock"), "writable", &open);
    let group = test_dir("dir-0770", 0o770);
    refused(&group.join("sock"), "writable", &group);
    if is_root() {
        let theirs = test_dir("dir-nobody", 0o755);
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        refused(&theirs.join("sock"), "owned by uid 65534", &theirs);
        let safe = test_dir("dir-safe", 0o700);
        let link = std::env::temp_dir().join(format!("vmm-ctl-{}-link", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&safe, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        refused(&link.join("sock"), "owned by uid 65534", &link);
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&theirs).unwrap();
        std::fs::remove_dir_all(&safe).unwrap();
    } else {
        eprintln!("skipping the other-owner cases: they need root to chown");
    }
    // Sticky and world-writable (as /tmp is): fine.
    let sticky = test_dir("dir-1777", 0o1777);
    let sock = sticky.join("sock");
    let o = support::run(&[
        "run",
        "--workload",
        "hello",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", support::stderr(&o));
    assert!(!sock.exists(), "the socket is removed on exit");
    for d in [&open, &group, &sticky] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

const FAKE_SERVER_ENV: &str = "VMM_TEST_FAKE_SERVER";

/// Not a test on its own: with `VMM_TEST_FAKE_SERVER=PATH` set (by
/// `ctl_refuses_a_server_of_another_user`, which runs this binary as another user), it
/// listens on PATH, answers the first client with a fake success, and prints how many bytes
/// the client sent.
#[test]
fn helper_fake_server() {
    let Some(path) = std::env::var_os(FAKE_SERVER_ENV) else {
        return;
    };
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let _ = s.write_all(b"{\"id\":1,\"ok\":true,\"result\":{\"stopping\":true}}\n");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    println!("FAKE-SERVER-RECEIVED {}", got.len());
}

/// `vmm ctl` checks who serves the socket (`SO_PEERCRED`): a server of another user (not
/// root) is refused before the request is sent.
#[test]
fn ctl_refuses_a_server_of_another_user() {
    if !is_root() {
        eprintln!("skipping: needs root to run a fake server as another user");
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = test_dir("fake", 0o755);
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let sock = dir.join("sock");
    let fake = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_fake_server",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FAKE_SERVER_ENV, &sock)
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the fake server did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let o = support::run(&["ctl", "--api-sock", sock.to_str().unwrap(), "stop"]);
    let fake = wait_with_timeout(fake, Duration::from_secs(10));
    let said = support::stdout(&fake);
    std::fs::remove_dir_all(&dir).unwrap();
    let err = support::stderr(&o);
    assert_eq!(o.status.code(), Some(1), "vmm ctl trusted uid 65534: {err}");
    assert!(err.contains("uid 65534"), "{err}");
    assert!(
        said.contains("FAKE-SERVER-RECEIVED 0"),
        "the request was sent: {said}{}",
        support::stderr(&fake)
    );
}

/// Reads one line from `c` and parses it as an event line.
fn read_event(c: &mut Client) -> Value {
    let v = c.read_reply();
    assert!(v["event"].is_string(), "not an event line: {v}");
    v
}

/// The greeting comes first, before the client sends anything, and lists what is served.
#[test]
fn every_connection_is_greeted_first() {
    require_kvm!();
    let vm = Vm::start("greet", &["--workload", "spin", "--timeout", "60"]);
    let s = connect(&vm.sock);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let g = support::read_greeting(&s);
    let caps = g["greeting"]["capabilities"].as_array().unwrap();
    assert!(
        !caps.contains(&json!("inject")),
        "inject without VMM_FAULT_INJECT: {g}"
    );
    // Then the usual request and reply.
    let mut c = Client {
        r: BufReader::new(s.try_clone().unwrap()),
        w: s,
        next_id: 1,
    };
    c.ok(json!({"op": "list"}));
    drop(vm);
    // With fault injection enabled, `inject` is served and listed.
    let vm = Vm::start_env(
        "greet-inject",
        &["--workload", "spin", "--timeout", "60"],
        &[("VMM_FAULT_INJECT", "on")],
    );
    let s = connect(&vm.sock);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let g = support::read_greeting(&s);
    let caps = g["greeting"]["capabilities"].as_array().unwrap();
    assert!(caps.contains(&json!("inject")), "{g}");
}

/// A server that answers the first connection on `path` with `first` (nothing if empty),
/// then reports how many bytes the client sent before closing.
fn fake_server(path: &Path, first: &'static str) -> std::thread::JoinHandle<usize> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        if first.is_empty() {
            // Say nothing, and close after a moment.
            std::thread::sleep(Duration::from_millis(200));
            return 0;
        }
        s.write_all(first.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut got);
        got.len()
    })
}

/// `vmm ctl` sends nothing to a server that does not greet, greets with another protocol, or
/// does not serve the op, and says why.
#[test]
fn ctl_refuses_a_server_that_does_not_greet_or_speaks_another_protocol() {
    let path = sock_path("fake-greet");
    let sock = path.to_str().unwrap();
    let version = env!("CARGO_PKG_VERSION");
    let other = Box::leak(
        format!(
            "{{\"greeting\":{{\"name\":\"vmm\",\"version\":\"{version}\",\"protocol\":2,\
             \"capabilities\":[\"map\",\"list\"]}}}}\n"
        )
        .into_boxed_str(),
    );
    let no_events = Box::leak(
        format!(
            "{{\"greeting\":{{\"name\":\"vmm\",\"version\":\"{version}\",\"protocol\":1,\
             \"capabilities\":[\"map\",\"list\"]}}}}\n"
        )
        .into_boxed_str(),
    );
    for (first, args, says) in [
        (
            "{\"id\":1,\"ok\":true,\"result\":{\"stopping\":true}}\n",
            &["stop"][..],
            "did not greet like a vmm control socket",
        ),
        (&*other, &["list"][..], "speaks control protocol 2"),
        (&*no_events, &["events"][..], "does not serve \"subscribe\""),
        ("", &["list"][..], "without a greeting"),
    ] {
        let server = fake_server(&path, first);
        let mut all = vec!["ctl", "--api-sock", sock];
        all.extend_from_slice(args);
        let o = support::run(&all);
        let err = support::stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert_eq!(server.join().unwrap(), 0, "{args:?}: the request was sent");
    }
    let _ = std::fs::remove_file(&path);
}

/// Subscribers receive the events of other clients' changes, in order, each kind they asked
/// for and no other; clients that did not subscribe never see an event line; `vmm ctl events`
/// prints them until the guest exits, then exits 0.
#[test]
fn subscribers_see_other_clients_changes_in_order() {
    require_kvm!();
    let vm = Vm::start("events", &["--workload", "hotplug", "--timeout", "120"]);
    let mut all = vm.client();
    let r = all.ok(json!({"op": "subscribe"}));
    assert_eq!(
        r,
        json!({"subscribed": ["mapped", "unmapped", "protected", "guest_exited"]})
    );
    let mut only_unmapped = vm.client();
    let r = only_unmapped.ok(json!({"op": "subscribe", "events": ["unmapped"]}));
    assert_eq!(r, json!({"subscribed": ["unmapped"]}));
    only_unmapped.err(json!({"op": "subscribe", "events": ["weather"]}), "invalid");
    let mut quiet = vm.client();
    quiet.ok(json!({"op": "list"}));
    // `vmm ctl events`, raw and human, as other processes.
    let sock = vm.sock.to_str().unwrap();
    let spawn_ctl = |args: &[&str]| {
        support::vmm()
            .args(["ctl", "--api-sock", sock])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let ctl_json = spawn_ctl(&["--json", "events", "--kinds", "mapped,guest_exited"]);
    let ctl_human = spawn_ctl(&["subscribe"]);
    let t0 = Instant::now();
    while quiet.ok(json!({"op": "stats"}))["control"]["subscribers"] != json!(4) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "vmm ctl events did not subscribe"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another client changes things.
    let mut c = vm.client();
    c.ok(map(4 * GIB, "8M"));
    c.ok(
        json!({"op": "protect", "gpa": format!("{:#x}", 4 * GIB + 2 * MIB), "size": "2M",
                "readonly": true}),
    );
    c.ok(unmap(4 * GIB + 4 * MIB, 2 * MIB));
    c.ok(json!({"op": "map", "gpa": "0x140000000", "size": "2M", "backing": "memfd"}));
    c.ok(unmap(4 * GIB, 8 * MIB));
    c.err(unmap(4 * GIB, 8 * MIB), "not_found");
    // Everything, in order.
    let e: Vec<Value> = (0..5).map(|_| read_event(&mut all)).collect();
    let kinds: Vec<&str> = e.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["mapped", "protected", "unmapped", "mapped", "unmapped"],
        "{e:?}"
    );
    let seqs: Vec<u64> = e.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(e[0]["gpa"], json!("0x100000000"), "{}", e[0]);
    assert_eq!(e[0]["size"], json!(8 * MIB));
    assert_eq!(e[0]["end"], json!("0x100800000"));
    assert_eq!(e[0]["kind"], json!("hotplug"));
    assert_eq!(e[0]["backing"], json!("anon"));
    assert_eq!(e[1]["gpa"], json!("0x100200000"), "{}", e[1]);
    assert_eq!(e[1]["readonly"], json!(true));
    assert_eq!(e[1]["changed"][0]["readonly"], json!(true));
    assert_eq!(e[2]["gpa"], json!("0x100400000"), "{}", e[2]);
    assert_eq!(e[2]["size"], json!(2 * MIB));
    assert_eq!(e[2]["removed"].as_array().unwrap().len(), 1);
    assert_eq!(e[3]["gpa"], json!("0x140000000"));
    assert_eq!(e[3]["backing"], json!("memfd"));
    assert_eq!(e[4]["gpa"], json!("0x100000000"));
    // The pieces left by the split and the protect.
    assert_eq!(e[4]["removed"].as_array().unwrap().len(), 3, "{}", e[4]);
    // Only the kinds asked for, with the same numbers.
    let u: Vec<Value> = (0..2).map(|_| read_event(&mut only_unmapped)).collect();
    assert_eq!(u[0]["event"], json!("unmapped"));
    assert_eq!(
        (u[0]["seq"].clone(), u[1]["seq"].clone()),
        (e[2]["seq"].clone(), e[4]["seq"].clone())
    );
    // A subscriber's own requests are answered as usual, events or not.
    all.ok(unmap(5 * GIB, 2 * MIB));
    let last = read_event(&mut all);
    assert_eq!(last["event"], json!("unmapped"), "{last}");
    assert_eq!(read_event(&mut only_unmapped), last);
    // No event line ever reaches a client that did not subscribe: its next line is the reply.
    quiet.ok(json!({"op": "list"}));
    quiet
        .w
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut extra = String::new();
    let r = quiet.r.read_line(&mut extra);
    assert!(
        r.is_err() && extra.is_empty(),
        "a non-subscriber got {extra:?}"
    );
    quiet
        .w
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Unsubscribed: no more events.
    let r = only_unmapped.ok(json!({"op": "unsubscribe"}));
    assert_eq!(r, json!({"subscribed": []}));
    // The guest's end reaches the subscribers, then the connection closes.
    quiet.ok(json!({"op": "stop"}));
    let end = read_event(&mut all);
    assert_eq!(end["event"], json!("guest_exited"), "{end}");
    assert_eq!(end["guest"]["verify_errors"], json!(0), "{end}");
    let mut rest = String::new();
    assert_eq!(
        all.r.read_line(&mut rest).unwrap(),
        0,
        "closed after: {rest}"
    );
    let mut rest = String::new();
    assert_eq!(only_unmapped.r.read_line(&mut rest).unwrap(), 0, "{rest}");
    let o = vm.wait();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j = wait_with_timeout(ctl_json, Duration::from_secs(10));
    assert_eq!(j.status.code(), Some(0), "{}", support::stderr(&j));
    let lines: Vec<Value> = support::stdout(&j)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["mapped", "mapped", "guest_exited"], "{lines:?}");
    assert_eq!(lines[0], e[0]);
    let h = wait_with_timeout(ctl_human, Duration::from_secs(10));
    assert_eq!(h.status.code(), Some(0), "{}", support::stderr(&h));
    let out = support::stdout(&h);
    assert_eq!(out.lines().count(), 7, "{out}");
    assert!(
        out.starts_with("mapped [0x100000000, 0x100800000) 8 MiB anon slot 0 read-write\n"),
        "{out}"
    );
    assert!(
        out.contains("protected [0x100200000, 0x100400000) 2 MiB read-only"),
        "{out}"
    );
    assert!(out.contains("guest exited: "), "{out}");
}

/// A subscriber that never reads does not hold up the requests of others, nor the events of
/// a subscriber that does read; its queue overflows (counted), and it is dropped like any
/// client that stops reading.
#[test]
fn a_subscriber_that_never_reads_stalls_no_one() {
    require_kvm!();
    let vm = Vm::start("slow-sub", &["--workload", "spin", "--timeout", "120"]);
    let mut slow = connect(&vm.sock);
    support::read_greeting(&slow);
    slow.write_all(b"{\"id\":1,\"op\":\"subscribe\"}\n")
        .unwrap();
    // A subscriber that reads everything, on its own thread.
    let mut reader = vm.client();
    reader.ok(json!({"op": "subscribe", "events": ["mapped", "unmapped"]}));
    const ROUNDS: u64 = 1000;
    let counter = std::thread::spawn(move || {
        let (mut seen, mut dropped, mut last) = (0u64, 0u64, 0u64);
        while seen + dropped < 2 * ROUNDS {
            let v = read_event(&mut reader);
            match v["event"].as_str().unwrap() {
                "events_dropped" => dropped += v["count"].as_u64().unwrap(),
                _ => {
                    let seq = v["seq"].as_u64().unwrap();
                    assert!(seq > last, "out of order: {seq} after {last}");
                    last = seq;
                    seen += 1;
                }
            }
        }
        (seen, dropped)
    });
    let mut c = vm.client();
    let mut slowest = Duration::ZERO;
    let t0 = Instant::now();
    for _ in 0..ROUNDS {
        for req in [map(4 * GIB, "4K"), unmap(4 * GIB, 4096)] {
            let t = Instant::now();
            c.ok(req);
            slowest = slowest.max(t.elapsed());
        }
    }
    let took = t0.elapsed();
    assert!(
        slowest < Duration::from_secs(2),
        "a request took {slowest:?} while a subscriber did not read"
    );
    let (seen, dropped) = counter.join().unwrap();
    eprintln!(
        "{} requests in {took:?}; the reading subscriber got {seen} events, {dropped} dropped",
        2 * ROUNDS
    );
    assert_eq!(seen + dropped, 2 * ROUNDS);
    let s = c.ok(json!({"op": "stats"}));
    assert!(
        s["control"]["events_dropped"].as_u64().unwrap() > 0,
        "the silent subscriber's queue never overflowed: {s}"
    );
    // It goes like any client that stops reading its lines (the 5 s write timeout).
    let t0 = Instant::now();
    while c.ok(json!({"op": "stats"}))["control"]["subscribers"] != json!(1) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the silent subscriber stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its thread ended: reading what it was sent ends at the close.
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut slow, &mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("{\"id\":1,\"ok\":true"),
        "{}",
        &text[..text.len().min(200)]
    );
    c.assert_consistent();
}

/// The scheduling policy (`/proc/PID/task/TID/stat`, field 41) of each of `pid`'s threads, by
/// thread name.
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(t.unwrap().path().join("stat")) else {
            continue;
        };
        // "TID (NAME) S ...": the name may hold spaces, the fields after it do not.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        // Field 41 is the 39th after the name's closing parenthesis (field 2).
        let policy = stat[close + 1..].split_whitespace().nth(38).unwrap();
        v.push((name, policy.parse().unwrap()));
    }
    v
}

/// With `--control-sched batch` the control socket's threads run as SCHED_BATCH beside vCPUs
/// left as they were, so that a request never preempts a vCPU; with `normal` every thread is
/// left as it was; with `auto` (the default) a client's thread turns batch at a request once
/// it has seen the vCPUs exit rarely (this guest spins without exits), and the acceptor, which
/// serves no request, stays as it was.
#[test]
fn control_threads_do_not_preempt_the_vcpus_when_asked() {
    require_kvm!();
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    for (flag, acceptor, client) in [
        (None, SCHED_OTHER, SCHED_BATCH),
        (Some("batch"), SCHED_BATCH, SCHED_BATCH),
        (Some("normal"), SCHED_OTHER, SCHED_OTHER),
    ] {
        let mut extra = vec!["--workload", "spin", "--vcpus", "2", "--timeout", "30"];
        if let Some(f) = flag {
            extra.extend(["--control-sched", f]);
        }
        let vm = Vm::start("sched", &extra);
        // A client served: its thread exists while it is connected.
        let mut c = vm.client();
        c.ok(json!({"op": "list"}));
        // `auto` measures the exit rate between two requests at least 10 ms apart.
        std::thread::sleep(Duration::from_millis(30));
        c.ok(json!({"op": "list"}));
        // The server starts before the vCPU threads: wait for both.
        let t0 = Instant::now();
        let threads = loop {
            let t = thread_policies(vm.pid());
            let vcpus = t.iter().filter(|(n, _)| n.starts_with("vcpu")).count();
            if vcpus == 2 || t0.elapsed() > Duration::from_secs(10) {
                break t;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let of = |prefix: &str| -> Vec<u32> {
            threads
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|&(_, p)| p)
                .collect()
        };
        assert_eq!(of("vcpu"), [SCHED_OTHER; 2], "{flag:?}: {threads:?}");
        assert_eq!(of("sidecar"), [acceptor], "{flag:?}: {threads:?}");
        assert_eq!(of("ctl-client"), [client], "{flag:?}: {threads:?}");
        // The main thread (the process's own name) is left as it was.
        assert!(of("vmm").iter().all(|&p| p == SCHED_OTHER), "{threads:?}");
        drop(c);
        drop(vm);
    }
}
