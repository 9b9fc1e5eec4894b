//! `vmm ctl`: sends one request to a running VMM's control socket and prints the reply, or
//! (`vmm ctl events`) subscribes and prints events as they come.
//!
//! Before sending anything it checks who serves the socket (`SO_PEERCRED`): the server must
//! run as the same user as `vmm ctl`, or as root. Another user who could replace the socket
//! file (through a directory they can write) would otherwise receive the request and could
//! answer it with a fake success. Then it reads the server's greeting and checks that it
//! speaks [`PROTOCOL`] and serves the op. Requests and replies are the serde types the server
//! uses ([`Request`], [`Response`], the result types of the parent module).
#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::fmt_size;
use super::protocol::{
    parse_addr, Event, EventKind, GpaRange, Greeting, Request, RequestLine, Response, WireName,
    PROTOCOL,
};
use super::server::{our_uid, peer_uid, trusted_owner};
use super::{Check, Listing, Protected, RegionView, SnapshotView, Stats, Subscribed, Unmapped};
use crate::memory::Backing;
use crate::size::parse_size;

/// How long to wait for a reply (an unmap waits for a grace period and frees memory).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the greeting (a server whose client slots are all busy may take up
/// to 10 s to make room first).
const GREETING_TIMEOUT: Duration = Duration::from_secs(15);

/// `vmm ctl` arguments.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The control socket of a `vmm run --api-sock PATH`.
    #[arg(long, value_name = "PATH", env = "VMM_API_SOCK", alias = "api-socket")]
    pub api_sock: PathBuf,

    /// Print the raw JSON reply line (or event lines) instead of a human summary.
    #[arg(long, global = true)]
    pub json: bool,

    /// The request.
    #[command(subcommand)]
    pub op: CtlOp,
}

fn parse_backing(s: &str) -> Result<Backing, String> {
    Backing::from_wire_name(s).ok_or_else(|| format!("{s:?}: expected anon, memfd or hugetlb"))
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
        #[arg(long, default_value = "anon", value_parser = parse_backing)]
        backing: Backing,
        /// Map it read-only to the guest.
        #[arg(long)]
        readonly: bool,
    },
    /// Unmap every address in [GPA, GPA+SIZE); partly covered regions are split. The reply
    /// comes after the host memory is released. Several --gpa/--size pairs unmap their ranges
    /// as one operation (`unmap_batch`): all or none, one grace period, pages freed together.
    Unmap {
        /// Guest-physical address (repeat it, with --size, for several ranges).
        #[arg(long, value_parser = parse_addr, required = true)]
        gpa: Vec<u64>,
        /// Size (one per --gpa, in the same order).
        #[arg(long, value_parser = parse_size, required = true)]
        size: Vec<u64>,
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
        /// Copy guest memory while the guest runs (KVM logs its writes), and pause it only
        /// to copy again the pages it wrote meanwhile.
        #[arg(long)]
        live: bool,
    },
    /// Subscribe, and print each event (a region mapped, unmapped or protected; the guest's
    /// end) as it happens, until the VM's run ends (exit 0) or Ctrl-C.
    #[command(alias = "subscribe")]
    Events {
        /// Only these kinds, comma-separated (default: all).
        #[arg(long, value_delimiter = ',', value_name = "KINDS")]
        kinds: Vec<EventKind>,
    },
}

impl CtlOp {
    /// The request this op sends.
    pub fn request(&self) -> Request {
        match self {
            CtlOp::Map {
                gpa,
                size,
                backing,
                readonly,
            } => Request::Map {
                gpa: *gpa,
                size: *size,
                backing: *backing,
                readonly: *readonly,
            },
            CtlOp::Unmap { gpa, size } if gpa.len() == 1 && size.len() == 1 => Request::Unmap {
                gpa: gpa[0],
                size: size[0],
            },
            CtlOp::Unmap { gpa, size } => Request::UnmapBatch {
                ranges: gpa
                    .iter()
                    .zip(size)
                    .map(|(&gpa, &size)| GpaRange { gpa, size })
                    .collect(),
            },
            CtlOp::Protect {
                gpa,
                size,
                readonly,
                ..
            } => Request::Protect {
                gpa: *gpa,
                size: *size,
                readonly: *readonly,
            },
            CtlOp::List => Request::List {},
            CtlOp::Stats => Request::Stats {},
            CtlOp::Stop => Request::Stop {},
            CtlOp::Check => Request::Check {},
            CtlOp::Snapshot {
                dir,
                stop,
                force,
                live,
            } => {
                // The server resolves relative paths against its own directory: send ours.
                let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
                Request::Snapshot {
                    dir: dir.to_string_lossy().into_owned(),
                    stop: *stop,
                    force: *force,
                    live: *live,
                }
            }
            CtlOp::Events { kinds } => Request::Subscribe {
                events: (!kinds.is_empty()).then(|| kinds.clone()),
            },
        }
    }
}

/// Runs `vmm ctl`; returns the exit status.
pub fn run(args: &CtlArgs) -> u8 {
    if let CtlOp::Unmap { gpa, size } = &args.op {
        if gpa.len() != size.len() {
            eprintln!(
                "vmm ctl: unmap takes one --size per --gpa ({} --gpa, {} --size)",
                gpa.len(),
                size.len()
            );
            return 2;
        }
    }
    let request = args.op.request();
    let mut conn = match Conn::open(args, request.op()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm ctl: {e}");
            return 1;
        }
    };
    let reply = match conn.exchange(&request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm ctl: {e}");
            return 1;
        }
    };
    let v: Response<Value> = match serde_json::from_str(&reply) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm ctl: the VMM sent a reply that is not a response line ({e}): {reply}");
            return 1;
        }
    };
    let op = request.op();
    let result = match (v.ok, v.result, v.error) {
        (true, Some(result), _) => result,
        (_, _, error) => {
            let (code, message) =
                error.map_or(("?", "?".to_owned()), |e| (e.code.name(), e.message));
            if args.json {
                println!("{}", reply.trim_end());
            } else {
                eprintln!("vmm ctl: {op} failed ({code}): {message}");
            }
            return 1;
        }
    };
    if let CtlOp::Events { .. } = args.op {
        return events(args, conn, &result);
    }
    let summary = match human(&args.op, result) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "vmm ctl: the VMM's reply to {op} is not what this vmm ctl expects ({e}): {reply}"
            );
            return 1;
        }
    };
    if args.json {
        println!("{}", reply.trim_end());
    } else {
        print!("{}", summary.text);
    }
    // `check` succeeds as a request even when it finds problems; the exit status says which.
    u8::from(!summary.ok)
}

/// `vmm ctl events` after the `subscribe` reply: prints event lines until the connection
/// closes.
fn events(args: &CtlArgs, mut conn: Conn, result: &Value) -> u8 {
    if let Ok(s) = serde_json::from_value::<Subscribed>(result.clone()) {
        let kinds: Vec<String> = s
            .subscribed
            .iter()
            .map(|k| {
                serde_json::to_value(k)
                    .map_or_else(|_| "?".into(), |v| v.as_str().unwrap_or("?").to_owned())
            })
            .collect();
        eprintln!(
            "vmm ctl: subscribed to {}; waiting for events (Ctrl-C to stop)",
            kinds.join(", ")
        );
    }
    let _ = conn.stream.set_read_timeout(None);
    let mut line = String::new();
    loop {
        line.clear();
        match conn.reader.read_line(&mut line) {
            Ok(0) => return 0,
            Ok(_) => {}
            Err(e) => {
                eprintln!("vmm ctl: reading events: {e}");
                return 1;
            }
        }
        let text = line.trim_end();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(text) {
            Ok(ev) => {
                if args.json {
                    println!("{text}");
                } else {
                    println!("{}", human_event(&ev));
                }
            }
            Err(_) => {
                // Not an event: the server's notice before it closes (evicted, idle).
                match serde_json::from_str::<Response<Value>>(text) {
                    Ok(Response { error: Some(e), .. }) => {
                        eprintln!(
                            "vmm ctl: the VMM ended the subscription ({}): {}",
                            e.code.name(),
                            e.message
                        );
                    }
                    _ => eprintln!("vmm ctl: not an event line: {text}"),
                }
                return 1;
            }
        }
    }
}

/// One event as a line of text.
pub fn human_event(ev: &Event) -> String {
    match ev {
        Event::Mapped { region, .. } => format!("mapped {}", region_line(region)),
        Event::Unmapped {
            gpa,
            size,
            end,
            removed,
            ..
        } => format!(
            "unmapped [{gpa:#x}, {end:#x}) {}: {} region piece(s) removed",
            fmt_size(*size),
            removed.len()
        ),
        Event::Protected {
            gpa,
            size,
            end,
            readonly,
            changed,
            ..
        } => format!(
            "protected [{gpa:#x}, {end:#x}) {} {}: {} region piece(s) changed",
            fmt_size(*size),
            if *readonly { "read-only" } else { "read-write" },
            changed.len()
        ),
        Event::GuestExited { guest, .. } => format!(
            "guest exited: {} pages touched, {} verify errors, {} vCPUs done",
            guest.pages_touched, guest.verify_errors, guest.vcpus_done
        ),
        Event::EventsDropped { count } => {
            format!("{count} events dropped (this client read them too slowly)")
        }
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

/// A connection whose greeting was read and checked.
struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    path: String,
    /// The server refused the connection instead of greeting (another user, no free slot):
    /// its reply line, which answers the request.
    refused: Option<String>,
}

impl Conn {
    /// Connects, checks who serves the socket, reads the greeting and checks that the server
    /// speaks [`PROTOCOL`] and serves `op`.
    fn open(args: &CtlArgs, op: &str) -> Result<Conn, String> {
        let path = args.api_sock.display().to_string();
        let s = connect(&args.api_sock).map_err(|e| {
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
        let _ = s.set_read_timeout(Some(GREETING_TIMEOUT));
        let reader = BufReader::new(
            s.try_clone()
                .map_err(|e| format!("cannot use the connection to {path}: {e}"))?,
        );
        let mut conn = Conn {
            stream: s,
            reader,
            path,
            refused: None,
        };
        let first = conn.read_line().map_err(|e| match e {
            None => format!(
                "{} closed the connection without a greeting; is it a vmm control socket?",
                conn.path
            ),
            Some(e) => format!(
                "{} sent no greeting ({e}, waited {} s); is it a vmm control socket?",
                conn.path,
                GREETING_TIMEOUT.as_secs()
            ),
        })?;
        match check_greeting(&first, op) {
            Ok(()) => {}
            Err(GreetingError::Refused) => conn.refused = Some(first),
            Err(GreetingError::Bad(why)) => {
                return Err(format!(
                    "{}: {why}; refusing to send the request",
                    conn.path
                ))
            }
        }
        Ok(conn)
    }

    /// Reads one line: `Err(None)` at end of stream.
    fn read_line(&mut self) -> Result<String, Option<std::io::Error>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(None),
            Ok(_) => Ok(line),
            Err(e) => Err(Some(e)),
        }
    }

    /// Sends `request` and returns the reply line.
    fn exchange(&mut self, request: &Request) -> Result<String, String> {
        if let Some(r) = self.refused.take() {
            return Ok(r);
        }
        let line = serde_json::to_string(&RequestLine { id: 1, request })
            .map_err(|e| format!("cannot encode the request: {e}"))?;
        let path = self.path.clone();
        let _ = self.stream.set_read_timeout(Some(REPLY_TIMEOUT));
        let sent = self.stream.write_all(format!("{line}\n").as_bytes());
        let read = self.read_line();
        // A server that drops the connection (it is stopping, or evicted us) may have said
        // why before the request was written: that line says so.
        match (sent, read) {
            (_, Ok(reply)) => Ok(reply),
            (Err(e), _) => Err(format!("cannot send the request to {path}: {e}")),
            (Ok(()), Err(Some(e))) => Err(format!("no reply from {path}: {e}")),
            (Ok(()), Err(None)) => Err(format!("{path} closed the connection without replying")),
        }
    }
}

/// Why a first line is not the greeting wanted.
#[derive(Debug, PartialEq, Eq)]
enum GreetingError {
    /// A response line instead (the server refused the connection): it answers the request.
    Refused,
    /// Not a greeting, another protocol, or the op is not served.
    Bad(String),
}

/// Checks the server's first line: a greeting of [`PROTOCOL`] whose capabilities include `op`.
fn check_greeting(line: &str, op: &str) -> Result<(), GreetingError> {
    let text = line.trim_end();
    let g = match serde_json::from_str::<Greeting>(text) {
        Ok(g) => g.greeting,
        Err(_) => {
            return match serde_json::from_str::<Response<Value>>(text) {
                Ok(r) if !r.ok && r.error.is_some() => Err(GreetingError::Refused),
                _ => Err(GreetingError::Bad(format!(
                    "the server did not greet like a vmm control socket (its first line: {})",
                    text.chars().take(200).collect::<String>()
                ))),
            }
        }
    };
    if g.protocol != PROTOCOL {
        return Err(GreetingError::Bad(format!(
            "the server ({} {}) speaks control protocol {}; this vmm ctl ({}) speaks protocol \
             {PROTOCOL}: use the vmm ctl of the VMM's version",
            g.name,
            g.version,
            g.protocol,
            env!("CARGO_PKG_VERSION")
        )));
    }
    if !g.capabilities.iter().any(|c| c == op) {
        return Err(GreetingError::Bad(format!(
            "the server ({} {}) does not serve {op:?} (it serves {})",
            g.name,
            g.version,
            g.capabilities.join(", ")
        )));
    }
    Ok(())
}

fn region_line(r: &RegionView) -> String {
    format!(
        "[{:#x}, {:#x}) {} {} slot {} {}{}",
        r.gpa,
        r.end,
        fmt_size(r.size),
        r.backing.name(),
        r.slot.map_or("-".into(), |x| x.to_string()),
        if r.readonly {
            "read-only"
        } else {
            "read-write"
        },
        match r.resident_pages {
            0 => String::new(),
            p => format!(", {p} pages resident, {} faults", r.faults),
        }
    )
}

/// The human summary of a successful reply, and whether `vmm ctl` succeeds (a `check` that
/// found problems does not).
pub struct Summary {
    /// The text.
    pub text: String,
    /// Exit 0.
    pub ok: bool,
}

fn decode<T: DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// The human summary of the result `r` of a successful `op`.
pub fn human(op: &CtlOp, r: Value) -> Result<Summary, String> {
    let mut out = String::new();
    let mut ok = true;
    match op {
        CtlOp::Map { .. } => out += &format!("mapped {}\n", region_line(&decode(r)?)),
        CtlOp::Unmap { .. } => {
            for p in decode::<Unmapped>(r)?.removed {
                out += &format!("unmapped {}\n", region_line(&p));
            }
        }
        CtlOp::Protect { .. } => {
            for p in decode::<Protected>(r)?.changed {
                out += &format!("now {}\n", region_line(&p));
            }
        }
        CtlOp::List => {
            out += &format!(
                "{:<14} {:<14} {:>10} {:>5} {:<8} {:<8} {:<3} {:>9} {:>8}\n",
                "GPA", "END", "SIZE", "SLOT", "BACKING", "KIND", "RO", "RESIDENT", "FAULTS"
            );
            for p in decode::<Listing>(r)?.regions {
                out += &format!(
                    "{:<14} {:<14} {:>10} {:>5} {:<8} {:<8} {:<3} {:>9} {:>8}\n",
                    format!("{:#x}", p.gpa),
                    format!("{:#x}", p.end),
                    fmt_size(p.size),
                    p.slot.map_or("-".into(), |x| x.to_string()),
                    p.backing.name(),
                    p.kind.name(),
                    if p.readonly { "yes" } else { "no" },
                    p.resident_pages,
                    p.faults,
                );
            }
        }
        CtlOp::Stats => {
            let r: Stats = decode(r)?;
            let (t, e, g, rcu, c) = (&r.totals, &r.exits, &r.guest, &r.rcu, &r.control);
            out += &format!(
                "regions: {} ({} hot-plugged, {}), {} pages resident; host RSS {}\n",
                t.regions,
                t.hotplug_regions,
                fmt_size(t.hotplug_bytes),
                t.resident_pages,
                fmt_size(r.host_rss_bytes & !0xfff),
            );
            for p in &r.regions {
                out += &format!("  {}\n", region_line(p));
            }
            out += &format!(
                "faults: {} serviced, {} pages populated ({} fault mode, {} address space)\n",
                t.faults,
                t.pages_populated,
                r.fault_mode.name(),
                r.address_space
            );
            out += &format!(
                "open bus: {} reads, {} writes; read-only writes dropped: {}\n",
                t.open_bus_reads, t.open_bus_writes, t.readonly_writes
            );
            out += &format!(
                "exits: {} (io {}, mmio {}, memory-fault {}, efault {}, interrupted {}, other {})\n",
                e.total, e.io, e.mmio, e.memory_fault, e.efault, e.interrupted, e.other
            );
            out += &format!(
                "grace periods: {} (p50 {} ns, p99 {} ns, max {} ns)\n",
                rcu.grace_periods,
                rcu.grace_period_ns.p50,
                rcu.grace_period_ns.p99,
                rcu.grace_period_ns.max
            );
            out += &format!(
                "guest: {} pages touched, {} verify errors, {} vanished, {} passes, mailbox generation {} (seen {})\n",
                g.pages_touched, g.verify_errors, g.vanished, g.passes, r.generation, g.generation_seen
            );
            out += &format!(
                "control clients: {} connected (at most {}), {} dropped idle, {} evicted to make room; {} subscribed to events, {} events dropped\n",
                c.clients,
                c.max_clients,
                c.clients_dropped_idle,
                c.clients_evicted,
                c.subscribers,
                c.events_dropped
            );
        }
        CtlOp::Stop => out += "the guest was asked to stop\n",
        CtlOp::Snapshot { .. } => {
            let r: SnapshotView = decode(r)?;
            let live = match (r.precopied_pages, r.recopied_pages) {
                (Some(pre), Some(again)) => {
                    let rounds = r.precopy_rounds.unwrap_or(1);
                    format!(
                        " (live: {pre} pages copied while the guest ran, in {rounds} round{}; {again} again in the pause)",
                        if rounds == 1 { "" } else { "s" }
                    )
                }
                _ => String::new(),
            };
            out += &format!(
                "snapshot {}: {} pages ({} bytes) of guest memory, {} regions, {} vCPUs; vCPUs paused {:.1} ms{live}, on disk after {:.1} ms{}\n",
                r.dir,
                r.pages,
                r.memory_bytes,
                r.regions,
                r.vcpus,
                r.paused_ms,
                r.total_ms,
                if r.stopped { "; the VM stopped" } else { "" }
            );
        }
        CtlOp::Check => {
            let r: Check = decode(r)?;
            ok = r.consistent;
            if r.consistent {
                out += &format!(
                    "consistent: {} regions, {} memslots, {} served by exits\n",
                    r.regions, r.memslots, r.exit_served
                );
            } else {
                out += "INCONSISTENT:\n";
                for p in &r.problems {
                    out += &format!("  {p}\n");
                }
            }
        }
        CtlOp::Events { .. } => {
            let r: Subscribed = decode(r)?;
            out += &format!("subscribed to {} event kinds\n", r.subscribed.len());
        }
    }
    Ok(Summary { text: out, ok })
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

    #[test]
    fn greetings_are_checked() {
        let line = Greeting::new(false).line();
        assert_eq!(check_greeting(&line, "map"), Ok(()));
        assert_eq!(check_greeting(&format!("{line}\n"), "subscribe"), Ok(()));
        let Err(GreetingError::Bad(why)) = check_greeting(&line, "inject") else {
            panic!("inject is not served without VMM_FAULT_INJECT");
        };
        assert!(why.contains("does not serve \"inject\""), "{why}");
        let mut g = Greeting::new(false);
        g.greeting.protocol = 2;
        let Err(GreetingError::Bad(why)) = check_greeting(&g.line(), "map") else {
            panic!("protocol 2 accepted");
        };
        assert!(why.contains("speaks control protocol 2"), "{why}");
        let refusal = r#"{"id":null,"ok":false,"error":{"code":"denied","message":"no"}}"#;
        assert_eq!(check_greeting(refusal, "map"), Err(GreetingError::Refused));
        for bad in [
            r#"{"id":1,"ok":true,"result":{"stopping":true}}"#,
            "hello",
            "",
        ] {
            let Err(GreetingError::Bad(why)) = check_greeting(bad, "stop") else {
                panic!("{bad:?} accepted as a greeting");
            };
            assert!(why.contains("did not greet"), "{why}");
        }
    }

    #[test]
    fn requests_of_every_op() {
        let map = CtlOp::Map {
            gpa: 1 << 32,
            size: 2 << 20,
            backing: Backing::Memfd,
            readonly: true,
        };
        assert_eq!(
            serde_json::to_string(&RequestLine {
                id: 1,
                request: &map.request()
            })
            .unwrap(),
            r#"{"id":1,"op":"map","gpa":"0x100000000","size":2097152,"backing":"memfd","readonly":true}"#
        );
        assert_eq!(CtlOp::Events { kinds: vec![] }.request().op(), "subscribe");
        assert_eq!(
            CtlOp::Events {
                kinds: vec![EventKind::Mapped]
            }
            .request(),
            Request::Subscribe {
                events: Some(vec![EventKind::Mapped])
            }
        );
    }
}
