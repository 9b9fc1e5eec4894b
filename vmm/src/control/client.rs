//! `vmm ctl`: sends one request to a running VMM's control socket and prints the reply.
//!
//! Before sending anything it checks who serves the socket (`SO_PEERCRED`): the server must
//! run as the same user as `vmm ctl`, or as root. Another user who could replace the socket
//! file (through a directory they can write) would otherwise receive the request and could
//! answer it with a fake success.
#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::fmt_size;
use super::protocol::parse_addr;
use super::server::{our_uid, peer_uid, trusted_owner};
use crate::size::parse_size;

/// How long to wait for a reply (an unmap waits for a grace period and frees memory).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// `vmm ctl` arguments.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The control socket of a `vmm run --api-sock PATH`.
    #[arg(long, value_name = "PATH", env = "VMM_API_SOCK", alias = "api-socket")]
    pub api_sock: PathBuf,

    /// Print the raw JSON reply line instead of a human summary.
    #[arg(long, global = true)]
    pub json: bool,

    /// The request.
    #[command(subcommand)]
    pub op: CtlOp,
}

/// One request.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlOp {
    /// Map fresh, demand-paged memory at [GPA, GPA+SIZE).
    Map {
        /// Guest-physical address: decimal or 0x hex (above guest RAM, below 64 GiB).
        #[arg(long, value_parser = parse_addr)]
        gpa: u64,
        /// Size: a plain integer or with a K/M/G/T suffix.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// What backs it: anon, memfd, or hugetlb (needs free 2 MiB huge pages; 2 MiB-aligned
        /// ranges; populated a whole huge page per fault).
        #[arg(long, default_value = "anon", value_parser = ["anon", "memfd", "hugetlb"])]
        backing: String,
        /// Map it read-only to the guest.
        #[arg(long)]
        readonly: bool,
    },
    /// Unmap every address in [GPA, GPA+SIZE); partly covered regions are split. The reply
    /// comes after the host memory is released.
    Unmap {
        /// Guest-physical address.
        #[arg(long, value_parser = parse_addr)]
        gpa: u64,
        /// Size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Make [GPA, GPA+SIZE) read-only or writable again (it must be fully mapped).
    Protect {
        /// Guest-physical address.
        #[arg(long, value_parser = parse_addr)]
        gpa: u64,
        /// Size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Read-only.
        #[arg(
            long,
            conflicts_with = "writable",
            required_unless_present = "writable"
        )]
        readonly: bool,
        /// Writable.
        #[arg(long)]
        writable: bool,
    },
    /// List every region (boot and RAM included).
    List,
    /// Residency and faults per region, open-bus accesses, exits, grace periods.
    Stats,
    /// Ask the guest's `hotplug` workload to finish its pass and exit 0.
    Stop,
    /// Check the regions against KVM's memslots and the host mappings.
    Check,
    /// Pause every vCPU, write a snapshot of the VM into DIR (atomically), then resume it, or
    /// stop it with --stop. Restore it with `vmm run --restore DIR`.
    Snapshot {
        /// The snapshot directory (must not exist unless --force).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Stop the VM once the snapshot is written.
        #[arg(long)]
        stop: bool,
        /// Replace DIR if it exists.
        #[arg(long)]
        force: bool,
    },
}

impl CtlOp {
    /// The request line (without newline).
    pub fn request(&self) -> String {
        let v = match self {
            CtlOp::Map {
                gpa,
                size,
                backing,
                readonly,
            } => json!({"id": 1, "op": "map", "gpa": format!("{gpa:#x}"), "size": size,
                        "backing": backing, "readonly": readonly}),
            CtlOp::Unmap { gpa, size } => {
                json!({"id": 1, "op": "unmap", "gpa": format!("{gpa:#x}"), "size": size})
            }
            CtlOp::Protect {
                gpa,
                size,
                readonly,
                ..
            } => json!({"id": 1, "op": "protect", "gpa": format!("{gpa:#x}"), "size": size,
                        "readonly": readonly}),
            CtlOp::List => json!({"id": 1, "op": "list"}),
            CtlOp::Stats => json!({"id": 1, "op": "stats"}),
            CtlOp::Stop => json!({"id": 1, "op": "stop"}),
            CtlOp::Check => json!({"id": 1, "op": "check"}),
            CtlOp::Snapshot { dir, stop, force } => {
                // The server resolves relative paths against its own directory: send ours.
                let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
                json!({"id": 1, "op": "snapshot", "dir": dir.to_string_lossy(), "stop": stop,
                       "force": force})
            }
        };
        v.to_string()
    }
}

/// Runs `vmm ctl`; returns the exit status.
pub fn run(args: &CtlArgs) -> u8 {
    let line = args.op.request();
    let reply = match exchange(args, &line) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm ctl: {e}");
            return 1;
        }
    };
    let v: Value = match serde_json::from_str(&reply) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm ctl: the VMM sent a reply that is not JSON ({e}): {reply}");
            return 1;
        }
    };
    let ok = v["ok"] == Value::Bool(true);
    // `check` succeeds as a request even when it finds problems; the exit status says which.
    let inconsistent = args.op == CtlOp::Check && v["result"]["consistent"] != Value::Bool(true);
    if args.json {
        println!("{}", reply.trim_end());
    } else if ok {
        print!("{}", human(&args.op, &v["result"]));
    } else {
        eprintln!(
            "vmm ctl: {} failed ({}): {}",
            op_name(&args.op),
            v["error"]["code"].as_str().unwrap_or("?"),
            v["error"]["message"].as_str().unwrap_or("?")
        );
    }
    if ok && !inconsistent {
        0
    } else {
        1
    }
}

fn op_name(op: &CtlOp) -> &'static str {
    match op {
        CtlOp::Map { .. } => "map",
        CtlOp::Unmap { .. } => "unmap",
        CtlOp::Protect { .. } => "protect",
        CtlOp::List => "list",
        CtlOp::Stats => "stats",
        CtlOp::Stop => "stop",
        CtlOp::Check => "check",
        CtlOp::Snapshot { .. } => "snapshot",
    }
}

/// Connects, retrying for up to a second while the connection is refused: a VMM that has just
/// started has bound its socket (the file exists) an instant before it listens on it.
fn connect(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let t0 = std::time::Instant::now();
    loop {
        match UnixStream::connect(path) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && t0.elapsed() < std::time::Duration::from_secs(1) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Whether a server running as `peer` may be sent the requests of a client running as `ours`:
/// the same user, or root.
pub fn server_trusted(peer: u32, ours: u32) -> bool {
    trusted_owner(peer, ours)
}

fn exchange(args: &CtlArgs, line: &str) -> Result<String, String> {
    let path = args.api_sock.display();
    let mut s = connect(&args.api_sock).map_err(|e| {
        format!("cannot connect to {path}: {e}; is `vmm run --api-sock {path}` running?")
    })?;
    let ours = our_uid();
    match peer_uid(&s) {
        Ok(p) if server_trusted(p, ours) => {}
        Ok(p) => {
            return Err(format!(
                "{path} is served by a process of uid {p}, not by you (uid {ours}) or root; \
                 refusing to send the request (another user may have replaced the socket: \
                 check who can write to its directory)"
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot tell who serves {path} (SO_PEERCRED: {e}); refusing to send the request"
            ))
        }
    }
    let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
    let sent = s.write_all(format!("{line}\n").as_bytes());
    let mut reply = String::new();
    let read = BufReader::new(&s).read_line(&mut reply);
    // A server that refuses the connection (too many clients, another user) may have replied
    // and closed it before the request was written: its reply says why.
    match (sent, read) {
        (_, Ok(_)) if !reply.is_empty() => Ok(reply),
        (Err(e), _) => Err(format!("cannot send the request to {path}: {e}")),
        (Ok(()), Err(e)) => Err(format!("no reply from {path}: {e}")),
        (Ok(()), Ok(_)) => Err(format!("{path} closed the connection without replying")),
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn region_line(r: &Value) -> String {
    format!(
        "[{}, {}) {} {} slot {} {}{}",
        s(&r["gpa"]),
        s(&r["end"]),
        fmt_size(n(&r["size"])),
        s(&r["backing"]),
        r["slot"].as_u64().map_or("-".into(), |x| x.to_string()),
        if r["readonly"] == Value::Bool(true) {
            "read-only"
        } else {
            "read-write"
        },
        match n(&r["resident_pages"]) {
            0 => String::new(),
            p => format!(", {p} pages resident, {} faults", n(&r["faults"])),
        }
    )
}

/// The human summary of a successful reply.
pub fn human(op: &CtlOp, r: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    match op {
        CtlOp::Map { .. } => out += &format!("mapped {}\n", region_line(r)),
        CtlOp::Unmap { .. } => {
            for p in r["removed"].as_array().unwrap_or(&empty) {
                out += &format!("unmapped {}\n", region_line(p));
            }
        }
        CtlOp::Protect { .. } => {
            for p in r["changed"].as_array().unwrap_or(&empty) {
                out += &format!("now {}\n", region_line(p));
            }
        }
        CtlOp::List => {
            out += &format!(
                "{:<14} {:<14} {:>10} {:>5} {:<8} {:<8} {:<3} {:>9} {:>8}\n",
                "GPA", "END", "SIZE", "SLOT", "BACKING", "KIND", "RO", "RESIDENT", "FAULTS"
            );
            for p in r["regions"].as_array().unwrap_or(&empty) {
                out += &format!(
                    "{:<14} {:<14} {:>10} {:>5} {:<8} {:<8} {:<3} {:>9} {:>8}\n",
                    s(&p["gpa"]),
                    s(&p["end"]),
                    fmt_size(n(&p["size"])),
                    p["slot"].as_u64().map_or("-".into(), |x| x.to_string()),
                    s(&p["backing"]),
                    s(&p["kind"]),
                    if p["readonly"] == Value::Bool(true) {
                        "yes"
                    } else {
                        "no"
                    },
                    n(&p["resident_pages"]),
                    n(&p["faults"]),
                );
            }
        }
        CtlOp::Stats => {
            let t = &r["totals"];
            let e = &r["exits"];
            let g = &r["guest"];
            let rcu = &r["rcu"];
            out += &format!(
                "regions: {} ({} hot-plugged, {}), {} pages resident; host RSS {}\n",
                n(&t["regions"]),
                n(&t["hotplug_regions"]),
                fmt_size(n(&t["hotplug_bytes"])),
                n(&t["resident_pages"]),
                fmt_size(n(&r["host_rss_bytes"]) & !0xfff),
            );
            for p in r["regions"].as_array().unwrap_or(&empty) {
                out += &format!("  {}\n", region_line(p));
            }
            out += &format!(
                "faults: {} serviced, {} pages populated ({} fault mode, {} address space)\n",
                n(&t["faults"]),
                n(&t["pages_populated"]),
                s(&r["fault_mode"]),
                s(&r["address_space"])
            );
            out += &format!(
                "open bus: {} reads, {} writes; read-only writes dropped: {}\n",
                n(&t["open_bus_reads"]),
                n(&t["open_bus_writes"]),
                n(&t["readonly_writes"])
            );
            out += &format!(
                "exits: {} (io {}, mmio {}, memory-fault {}, efault {}, interrupted {}, other {})\n",
                n(&e["total"]),
                n(&e["io"]),
                n(&e["mmio"]),
                n(&e["memory_fault"]),
                n(&e["efault"]),
                n(&e["interrupted"]),
                n(&e["other"])
            );
            out += &format!(
                "grace periods: {} (p50 {} ns, p99 {} ns, max {} ns)\n",
                n(&rcu["grace_periods"]),
                n(&rcu["grace_period_ns"]["p50"]),
                n(&rcu["grace_period_ns"]["p99"]),
                n(&rcu["grace_period_ns"]["max"])
            );
            out += &format!(
                "guest: {} pages touched, {} verify errors, {} vanished, {} passes, mailbox generation {} (seen {})\n",
                n(&g["pages_touched"]),
                n(&g["verify_errors"]),
                n(&g["vanished"]),
                n(&g["passes"]),
                n(&r["generation"]),
                n(&g["generation_seen"])
            );
            let c = &r["control"];
            out += &format!(
                "control clients: {} connected (at most {}), {} dropped idle, {} evicted to make room\n",
                n(&c["clients"]),
                n(&c["max_clients"]),
                n(&c["clients_dropped_idle"]),
                n(&c["clients_evicted"])
            );
        }
        CtlOp::Stop => out += "the guest was asked to stop\n",
        CtlOp::Snapshot { .. } => {
            out += &format!(
                "snapshot {}: {} pages ({} bytes) of guest memory, {} regions, {} vCPUs; vCPUs paused {:.1} ms{}\n",
                s(&r["dir"]),
                n(&r["pages"]),
                n(&r["memory_bytes"]),
                n(&r["regions"]),
                n(&r["vcpus"]),
                r["paused_ms"].as_f64().unwrap_or(0.0),
                if r["stopped"] == Value::Bool(true) { "; the VM stopped" } else { "" }
            );
        }
        CtlOp::Check => {
            if r["consistent"] == Value::Bool(true) {
                out += &format!(
                    "consistent: {} regions, {} memslots, {} served by exits\n",
                    n(&r["regions"]),
                    n(&r["memslots"]),
                    n(&r["exit_served"])
                );
            } else {
                out += "INCONSISTENT:\n";
                for p in r["problems"].as_array().unwrap_or(&empty) {
                    out += &format!("  {}\n", s(p));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_of_the_same_user_or_root_are_trusted() {
        assert!(server_trusted(1000, 1000));
        assert!(server_trusted(0, 1000));
        assert!(server_trusted(0, 0));
        assert!(!server_trusted(65534, 1000));
        assert!(!server_trusted(65534, 0));
        assert!(!server_trusted(1000, 0));
    }
}
