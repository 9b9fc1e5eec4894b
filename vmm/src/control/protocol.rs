//! The control protocol: newline-delimited JSON. On connecting, a client first receives one
//! greeting line; then each request line gets one response line, in order; a client that
//! subscribed also receives event lines between them (docs/control.md has the schema).
//!
//! ```text
//! {"greeting":{"name":"vmm","version":"0.1.0","protocol":1,"capabilities":["map",...]}}
//! {"id":1,"op":"map","gpa":"0x100000000","size":"64M","backing":"anon"}
//! {"id":1,"ok":true,"result":{"gpa":"0x100000000","size":67108864,"slot":3,...}}
//! {"id":2,"op":"map","gpa":"0x100000000","size":"4K"}
//! {"id":2,"ok":false,"error":{"code":"overlap","message":"..."}}
//! {"event":"mapped","seq":1,"gpa":"0x100000000","size":67108864,...}
//! ```
//!
//! Every line is a serde type defined here or in the parent module ([`super::RegionView`]
//! and the other results), shared by the server and `vmm ctl`. This module turns a line into
//! a [`Request`] (or a [`ControlError`] with code `invalid`) and replies into lines; it never
//! touches the VM. Unknown ops and unknown fields are refused, sizes take `K`/`M`/`G`/`T`
//! suffixes, addresses are decimal or `0x` hex (as strings, or plain JSON integers); in
//! replies addresses are `0x` hex strings and sizes plain integers.
#![deny(unsafe_code)]

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::memory::{AddressSpaceKind, Backing, FaultMode, MemslotMode, RegionKind};

/// The longest request line accepted, newline excluded.
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// The protocol version the greeting announces. Changes that only add ops, fields, event
/// kinds or error codes keep it; anything that would break a client bumps it.
pub const PROTOCOL: u32 = 1;

/// The protocol's error codes (docs/interface.md), plus `denied` for a peer of another user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// Malformed, unaligned, out of range, unknown op.
    Invalid,
    /// Overlaps a region.
    Overlap,
    /// No region there.
    NotFound,
    /// Too many regions, too much memory, line too long, too many clients.
    Limit,
    /// Boot or device range.
    Reserved,
    /// The host failed (everything was rolled back).
    Internal,
    /// The peer is not the user running the VMM.
    Denied,
}

impl Code {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Code::Invalid => "invalid",
            Code::Overlap => "overlap",
            Code::NotFound => "not_found",
            Code::Limit => "limit",
            Code::Reserved => "reserved",
            Code::Internal => "internal",
            Code::Denied => "denied",
        }
    }
}

/// A failed request: a code and a message that names the value involved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct ControlError {
    /// The code.
    pub code: Code,
    /// What went wrong.
    pub message: String,
}

impl ControlError {
    /// A new error.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ControlError {
            code,
            message: message.into(),
        }
    }

    /// Code `invalid`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::Invalid, message)
    }
}

/// A type that travels on the wire as one of a fixed set of names.
pub trait WireName: Copy + PartialEq + 'static {
    /// Every value.
    const ALL: &'static [Self];
    /// What the values are, for error messages.
    const WHAT: &'static str;
    /// The wire name of `self`.
    fn wire_name(self) -> &'static str;
    /// The value called `s`.
    fn from_wire_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.wire_name() == s)
    }
}

impl WireName for Backing {
    const ALL: &'static [Self] = &[Backing::Anon, Backing::Memfd, Backing::Hugetlb];
    const WHAT: &'static str = "backing";
    fn wire_name(self) -> &'static str {
        self.name()
    }
}

impl WireName for RegionKind {
    const ALL: &'static [Self] = &[RegionKind::Boot, RegionKind::Ram, RegionKind::Hotplug];
    const WHAT: &'static str = "region kind";
    fn wire_name(self) -> &'static str {
        self.name()
    }
}

impl WireName for FaultMode {
    const ALL: &'static [Self] = &[FaultMode::Vcpu, FaultMode::Handler, FaultMode::Kernel];
    const WHAT: &'static str = "fault mode";
    fn wire_name(self) -> &'static str {
        self.name()
    }
}

impl WireName for MemslotMode {
    const ALL: &'static [Self] = &[MemslotMode::Window, MemslotMode::PerRegion];
    const WHAT: &'static str = "memslot mode";
    fn wire_name(self) -> &'static str {
        self.name()
    }
}

impl WireName for AddressSpaceKind {
    const ALL: &'static [Self] = &AddressSpaceKind::ALL;
    const WHAT: &'static str = "address space";
    fn wire_name(self) -> &'static str {
        self.name()
    }
}

/// `#[serde(with = "named")]`: a [`WireName`] as its name.
pub mod named {
    use super::*;

    /// Serializes the name.
    pub fn serialize<T: WireName, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.wire_name())
    }

    /// Parses a name.
    pub fn deserialize<'de, T: WireName, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let s = String::deserialize(d)?;
        T::from_wire_name(&s).ok_or_else(|| {
            let names: Vec<_> = T::ALL.iter().map(|v| v.wire_name()).collect();
            serde::de::Error::custom(format!(
                "{} {s:?}: expected one of {}",
                T::WHAT,
                names.join(", ")
            ))
        })
    }
}

/// Parses a guest-physical address: decimal or `0x` hex, as a string or a JSON integer.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse().ok(),
        None => None,
    };
    r.ok_or_else(|| format!("invalid address {s:?}: expected decimal or 0x hex, like 0x100000000"))
}

/// A visitor for a `u64` given as a JSON integer or as a string that `parse` understands.
struct U64Visitor {
    expecting: &'static str,
    parse: fn(&str) -> Result<u64, String>,
}

impl serde::de::Visitor<'_> for U64Visitor {
    type Value = u64;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

/// `#[serde(with = "addr")]`: an address; `0x` hex in replies, decimal or hex (string or
/// integer) in requests.
pub mod addr {
    use super::*;

    /// Serializes `0x...`.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{v:#x}"))
    }

    /// Parses an integer or a decimal or `0x` hex string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(U64Visitor {
            expecting: "an address: a non-negative integer, or a string in decimal or 0x hex",
            parse: parse_addr,
        })
    }
}

/// `#[serde(with = "size")]`: a byte count; an integer in replies, an integer or a string
/// with a `K`/`M`/`G`/`T` suffix in requests.
pub mod size {
    use super::*;

    /// Serializes the integer.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    /// Parses an integer or a string such as `"64M"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(U64Visitor {
            expecting: "a size: a non-negative integer, or a string such as \"64M\"",
            parse: crate::size::parse_size,
        })
    }
}

/// `#[serde(with = "count")]`: an integer, or a string in decimal.
mod count {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(U64Visitor {
            expecting: "a non-negative integer",
            parse: |s| s.parse().map_err(|e| format!("{s:?}: {e}")),
        })
    }
}

/// `#[serde(with = "inject_step")]`: a fault-injection step, or `off` (`None`).
pub mod inject_step {
    use super::*;
    use crate::inject::Step;

    /// Serializes the step's name, or `off`.
    pub fn serialize<S: Serializer>(v: &Option<Step>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.map_or("off", Step::name))
    }

    /// Parses a step's name, or `off`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Step>, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "off" => Ok(None),
            other => Step::from_name(other).map(Some).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "step {s:?}: expected {} or off",
                    crate::inject::STEP_NAMES
                ))
            }),
        }
    }
}

fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Err(serde::de::Error::custom("dir: must not be empty"));
    }
    Ok(s)
}

fn anon() -> Backing {
    Backing::Anon
}

fn one() -> u64 {
    1
}

/// What a subscriber can ask for (`subscribe`'s `events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A region was mapped.
    Mapped,
    /// A range was unmapped.
    Unmapped,
    /// A range's protection changed.
    Protected,
    /// Every vCPU has ended: the run is over and the socket is about to close.
    #[value(name = "guest_exited")]
    GuestExited,
}

impl EventKind {
    /// Every kind, in the order documented.
    pub const ALL: [EventKind; 4] = [
        EventKind::Mapped,
        EventKind::Unmapped,
        EventKind::Protected,
        EventKind::GuestExited,
    ];

    /// The bit of this kind in a set of kinds.
    pub fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// One request (the line's `op` and its fields; the `id` travels beside it, see
/// [`RequestLine`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Map fresh memory at `[gpa, gpa + size)`.
    Map {
        /// Start.
        #[serde(with = "addr")]
        gpa: u64,
        /// Bytes.
        #[serde(with = "size")]
        size: u64,
        /// What backs it.
        #[serde(with = "named", default = "anon")]
        backing: Backing,
        /// Read-only to the guest.
        #[serde(default)]
        readonly: bool,
    },
    /// Unmap every address in `[gpa, gpa + size)`, splitting partly covered regions.
    Unmap {
        /// Start.
        #[serde(with = "addr")]
        gpa: u64,
        /// Bytes.
        #[serde(with = "size")]
        size: u64,
    },
    /// Unmap several ranges as one operation (extension): each as `unmap` would, checked
    /// together first (one refused range refuses the batch and nothing changes), with one
    /// grace period and their pages freed together.
    UnmapBatch {
        /// The ranges, pairwise disjoint; at most [`MAX_BATCH`].
        ranges: Vec<GpaRange>,
    },
    /// Change the protection of `[gpa, gpa + size)` (fully mapped).
    Protect {
        /// Start.
        #[serde(with = "addr")]
        gpa: u64,
        /// Bytes.
        #[serde(with = "size")]
        size: u64,
        /// Read-only or writable.
        readonly: bool,
    },
    /// Every region.
    List {},
    /// Counters.
    Stats {},
    /// Ask the guest's `hotplug` workload to finish and exit (extension).
    Stop {},
    /// Compare the tree with KVM's memslots and the host mappings (extension).
    Check {},
    /// Pause every vCPU, write a snapshot into `dir`, then resume (or stop with `stop`).
    Snapshot {
        /// The snapshot directory (absolute, or relative to the VMM's working directory).
        #[serde(deserialize_with = "non_empty")]
        dir: String,
        /// Stop the VM once the snapshot is written.
        #[serde(default)]
        stop: bool,
        /// Replace an existing `dir`.
        #[serde(default)]
        force: bool,
        /// Copy guest memory while the guest runs, logging its writes, and pause it only to
        /// copy again what it wrote meanwhile (extension).
        #[serde(default)]
        live: bool,
    },
    /// From now on, also send this connection the events of these kinds (all when absent).
    Subscribe {
        /// The kinds wanted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        events: Option<Vec<EventKind>>,
    },
    /// Stop sending this connection events.
    Unsubscribe {},
    /// Make the `nth` next call of `step` fail (test-only, with `VMM_FAULT_INJECT` set).
    Inject {
        /// Which call.
        #[serde(with = "inject_step")]
        step: Option<crate::inject::Step>,
        /// 1 = the next one.
        #[serde(with = "count", default = "one")]
        nth: u64,
    },
}

/// The most ranges one `unmap_batch` takes.
pub const MAX_BATCH: usize = 1024;

/// A guest-physical range in a request: `{"gpa": .., "size": ..}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpaRange {
    /// Start.
    #[serde(with = "addr")]
    pub gpa: u64,
    /// Bytes.
    #[serde(with = "size")]
    pub size: u64,
}

impl Request {
    /// The op's wire name.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Map { .. } => "map",
            Request::Unmap { .. } => "unmap",
            Request::UnmapBatch { .. } => "unmap_batch",
            Request::Protect { .. } => "protect",
            Request::List {} => "list",
            Request::Stats {} => "stats",
            Request::Stop {} => "stop",
            Request::Check {} => "check",
            Request::Snapshot { .. } => "snapshot",
            Request::Subscribe { .. } => "subscribe",
            Request::Unsubscribe {} => "unsubscribe",
            Request::Inject { .. } => "inject",
        }
    }
}

/// A request line as `vmm ctl` writes it: the id beside the op and its fields.
#[derive(Debug, Serialize)]
pub struct RequestLine<'a> {
    /// Echoed in the reply.
    pub id: u64,
    /// The op and its fields.
    #[serde(flatten)]
    pub request: &'a Request,
}

/// A line parsed as far as it goes: the id to echo (null if there is none) and the request.
#[derive(Debug)]
pub struct Parsed {
    /// The request's `id` (a number or a string), or null.
    pub id: Value,
    /// The request, or why it is not one.
    pub request: Result<Request, ControlError>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses one request line (without its newline). The `id` is taken out first, so that a
/// request that is wrong in any other way is still answered with its id.
pub fn parse_line(line: &[u8]) -> Parsed {
    let fail = |id, message: String| Parsed {
        id,
        request: Err(ControlError::invalid(message)),
    };
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return fail(Value::Null, format!("not a JSON request: {e}")),
    };
    let Value::Object(mut obj) = value else {
        return fail(
            Value::Null,
            format!("a request is a JSON object, got {}", kind(&value)),
        );
    };
    let id = match obj.remove("id") {
        Some(v @ (Value::Number(_) | Value::String(_))) => v,
        Some(other) => {
            return fail(
                Value::Null,
                format!("\"id\" must be a number or a string, got {}", kind(&other)),
            )
        }
        None => return fail(Value::Null, "missing field \"id\"".into()),
    };
    let request = parse_request(obj);
    Parsed { id, request }
}

fn parse_request(obj: Map<String, Value>) -> Result<Request, ControlError> {
    let op = match obj.get("op") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ControlError::invalid(format!(
                "\"op\" must be a string, got {}",
                kind(other)
            )))
        }
        None => return Err(ControlError::invalid("missing field \"op\"")),
    };
    // `inject` is parsed like any op (and refused later unless fault injection is on), but
    // not advertised.
    if !OPS.contains(&op.as_str()) && op != "inject" {
        return Err(ControlError::invalid(format!(
            "unknown op {op:?}; expected one of {}",
            OPS.join(", ")
        )));
    }
    Request::deserialize(Value::Object(obj))
        .map_err(|e| ControlError::invalid(format!("op {op:?}: {e}")))
}

/// The ops every server serves, as the greeting lists them.
pub const OPS: [&str; 11] = [
    "map",
    "unmap",
    "unmap_batch",
    "protect",
    "list",
    "stats",
    "check",
    "stop",
    "snapshot",
    "subscribe",
    "unsubscribe",
];

/// A response line: `{"id":..,"ok":true,"result":..}` or `{"id":..,"ok":false,"error":..}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response<T> {
    /// The request's id, or null.
    pub id: Value,
    /// Whether the request succeeded.
    pub ok: bool,
    /// What it returned (when `ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    /// Why it failed (when not `ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ControlError>,
}

/// The line (without newline) answering request `id` with `result`.
pub fn ok_line<T: Serialize>(id: &Value, result: &T) -> String {
    serde_json::to_string(&Response {
        id: id.clone(),
        ok: true,
        result: Some(result),
        error: None,
    })
    .unwrap_or_else(|e| {
        err_line(
            id,
            &ControlError::new(Code::Internal, format!("cannot encode the reply: {e}")),
        )
    })
}

/// The line (without newline) answering request `id` with `err`.
pub fn err_line(id: &Value, err: &ControlError) -> String {
    serde_json::to_string(&Response::<()> {
        id: id.clone(),
        ok: false,
        result: None,
        error: Some(err.clone()),
    })
    .unwrap_or_else(|_| {
        r#"{"id":null,"ok":false,"error":{"code":"internal","message":"cannot encode the reply"}}"#
            .to_owned()
    })
}

/// The first line on every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// Who is speaking.
    pub greeting: GreetingBody,
}

/// What the greeting says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreetingBody {
    /// `vmm`.
    pub name: String,
    /// The VMM's version.
    pub version: String,
    /// [`PROTOCOL`].
    pub protocol: u32,
    /// The ops this server serves, and `events` (it sends events to subscribers).
    pub capabilities: Vec<String>,
}

impl Greeting {
    /// This VMM's greeting; `inject` is listed only when fault injection is enabled.
    pub fn new(inject: bool) -> Self {
        let mut capabilities: Vec<String> = OPS.into_iter().map(str::to_owned).collect();
        if inject {
            capabilities.push("inject".into());
        }
        capabilities.push("events".into());
        Greeting {
            greeting: GreetingBody {
                name: "vmm".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: PROTOCOL,
                capabilities,
            },
        }
    }

    /// The line (without newline).
    pub fn line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// An event line, sent to the clients that subscribed to its kind. `seq` numbers every event
/// the server made, so a subscriber filtering kinds sees gaps, and one that fell behind
/// learns how many it missed from `events_dropped`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A region was mapped: the region, as `map` returned it.
    Mapped {
        /// Event number.
        seq: u64,
        /// The new region.
        #[serde(flatten)]
        region: super::RegionView,
    },
    /// `[gpa, end)` was unmapped: the pieces removed, as `unmap` returned them.
    Unmapped {
        /// Event number.
        seq: u64,
        /// Start of the range.
        #[serde(with = "addr")]
        gpa: u64,
        /// Bytes.
        size: u64,
        /// End of the range, exclusive.
        #[serde(with = "addr")]
        end: u64,
        /// The pieces removed.
        removed: Vec<super::RegionView>,
    },
    /// `[gpa, end)` became read-only or writable: the pieces changed, as `protect` returned
    /// them.
    Protected {
        /// Event number.
        seq: u64,
        /// Start of the range.
        #[serde(with = "addr")]
        gpa: u64,
        /// Bytes.
        size: u64,
        /// End of the range, exclusive.
        #[serde(with = "addr")]
        end: u64,
        /// The new protection.
        readonly: bool,
        /// The pieces changed.
        changed: Vec<super::RegionView>,
    },
    /// Every vCPU has ended (the guest exited or crashed, the run timed out or stopped after
    /// a snapshot): the last event; the server then closes the connection.
    GuestExited {
        /// Event number.
        seq: u64,
        /// What the guest's `hotplug` workload had reported.
        guest: super::GuestProgress,
    },
    /// This subscriber's queue was full: `count` events were not sent to it.
    EventsDropped {
        /// Events lost.
        count: u64,
    },
}

impl Event {
    /// The line (without newline).
    pub fn line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(s: &str) -> Result<Request, ControlError> {
        parse_line(s.as_bytes()).request
    }

    #[test]
    fn the_interface_examples() {
        let p =
            parse_line(br#"{"id":1,"op":"map","gpa":"0x100000000","size":"64M","backing":"anon"}"#);
        assert_eq!(p.id, serde_json::json!(1));
        assert_eq!(
            p.request,
            Ok(Request::Map {
                gpa: 1 << 32,
                size: 64 << 20,
                backing: Backing::Anon,
                readonly: false
            })
        );
        assert_eq!(
            req(
                r#"{"id":2,"op":"map","gpa":4294967296,"size":4096,"readonly":true,"backing":"memfd"}"#
            ),
            Ok(Request::Map {
                gpa: 1 << 32,
                size: 4096,
                backing: Backing::Memfd,
                readonly: true
            })
        );
        assert_eq!(
            req(r#"{"id":"x","op":"unmap","gpa":"4294967296","size":"1G"}"#),
            Ok(Request::Unmap {
                gpa: 1 << 32,
                size: 1 << 30
            })
        );
        assert_eq!(
            req(
                r#"{"id":4,"op":"unmap_batch","ranges":[{"gpa":"0x100000000","size":"4K"},{"gpa":4294975488,"size":8192}]}"#
            ),
            Ok(Request::UnmapBatch {
                ranges: vec![
                    GpaRange {
                        gpa: 1 << 32,
                        size: 4096
                    },
                    GpaRange {
                        gpa: (1 << 32) + 8192,
                        size: 8192
                    }
                ]
            })
        );
        for bad in [
            r#"{"id":4,"op":"unmap_batch"}"#,
            r#"{"id":4,"op":"unmap_batch","ranges":{"gpa":0,"size":4096}}"#,
            r#"{"id":4,"op":"unmap_batch","ranges":[{"gpa":0}]}"#,
            r#"{"id":4,"op":"unmap_batch","ranges":[{"gpa":0,"size":4096,"readonly":true}]}"#,
        ] {
            assert_eq!(req(bad).unwrap_err().code, Code::Invalid, "{bad}");
        }
        assert_eq!(
            req(r#"{"id":3,"op":"protect","gpa":"0x1000","size":"4K","readonly":false}"#),
            Ok(Request::Protect {
                gpa: 0x1000,
                size: 4096,
                readonly: false
            })
        );
        for (s, r) in [
            ("list", Request::List {}),
            ("stats", Request::Stats {}),
            ("stop", Request::Stop {}),
            ("check", Request::Check {}),
            ("unsubscribe", Request::Unsubscribe {}),
            ("subscribe", Request::Subscribe { events: None }),
        ] {
            assert_eq!(req(&format!(r#"{{"id":1,"op":"{s}"}}"#)), Ok(r));
        }
        assert_eq!(
            req(r#"{"id":1,"op":"subscribe","events":["mapped","guest_exited"]}"#),
            Ok(Request::Subscribe {
                events: Some(vec![EventKind::Mapped, EventKind::GuestExited])
            })
        );
        assert_eq!(
            req(r#"{"id":1,"op":"snapshot","dir":"/x"}"#),
            Ok(Request::Snapshot {
                dir: "/x".into(),
                stop: false,
                force: false,
                live: false
            })
        );
        assert_eq!(
            req(r#"{"id":1,"op":"inject","step":"mmap","nth":"2"}"#),
            Ok(Request::Inject {
                step: Some(crate::inject::Step::Mmap),
                nth: 2
            })
        );
        assert_eq!(
            req(r#"{"id":1,"op":"inject","step":"off"}"#),
            Ok(Request::Inject { step: None, nth: 1 })
        );
    }

    #[test]
    fn malformed_requests_are_invalid_and_keep_their_id_when_they_have_one() {
        for (line, id) in [
            ("", Value::Null),
            ("not json", Value::Null),
            ("[1,2]", Value::Null),
            (r#"{"op":"list"}"#, Value::Null),
            (r#"{"id":null,"op":"list"}"#, Value::Null),
            (r#"{"id":[1],"op":"list"}"#, Value::Null),
            (r#"{"id":7}"#, serde_json::json!(7)),
            (r#"{"id":7,"op":"dance"}"#, serde_json::json!(7)),
            (r#"{"id":7,"op":5}"#, serde_json::json!(7)),
            (r#"{"id":7,"op":"list","gpa":"0"}"#, serde_json::json!(7)),
            (r#"{"id":7,"op":"stop","now":true}"#, serde_json::json!(7)),
            (
                r#"{"id":7,"op":"map","gpa":"0x1g","size":"4K"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"map","gpa":"0x","size":"4K"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"map","gpa":-4096,"size":"4K"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"map","gpa":1.5,"size":"4K"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"map","gpa":"0x1000","size":"4Q"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"map","gpa":"0x1000"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"map","gpa":"0x1000","size":"4K","backing":"gold"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"map","gpa":"0x1000","size":"4K","readonly":"yes"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"map","gpa":"0x1000","size":"4K","pad":1}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"protect","gpa":"0x1000","size":"4K"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":"a","op":"map","gpa":"0x1000","size":"99999999999T"}"#,
                serde_json::json!("a"),
            ),
            (r#"{"id":7,"op":"snapshot","dir":""}"#, serde_json::json!(7)),
            (r#"{"id":7,"op":"snapshot"}"#, serde_json::json!(7)),
            (
                r#"{"id":7,"op":"subscribe","events":["weather"]}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"subscribe","events":"mapped"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":7,"op":"inject","step":"everything"}"#,
                serde_json::json!(7),
            ),
        ] {
            let p = parse_line(line.as_bytes());
            assert_eq!(p.id, id, "{line}");
            let e = p.request.expect_err(line);
            assert_eq!(e.code, Code::Invalid, "{line}: {e}");
            assert!(!e.message.is_empty());
        }
        // The messages name what is wrong.
        let msg = |l: &str| req(l).unwrap_err().message;
        let m = msg(r#"{"id":7,"op":"dance"}"#);
        assert!(
            m.contains("unknown op \"dance\"") && !m.contains("inject"),
            "{m}"
        );
        // Every op the greeting lists parses (given its fields).
        for op in OPS {
            let m = msg(&format!(r#"{{"id":7,"op":"{op}","bogus":1}}"#));
            assert!(m.contains("bogus"), "{op}: {m}");
        }
        assert!(msg(r#"{"id":7,"op":"list","gpa":"0"}"#).contains("gpa"));
        assert!(msg(r#"{"id":7,"op":"map","gpa":"0x1g","size":"4K"}"#).contains("0x1g"));
        assert!(
            msg(r#"{"id":7,"op":"map","gpa":"0x1000","size":"4K","backing":"gold"}"#)
                .contains("anon, memfd, hugetlb")
        );
        assert!(msg(r#"{"id":7,"op":"protect","gpa":"0x1000","size":"4K"}"#).contains("readonly"));
    }

    #[test]
    fn replies() {
        let id = serde_json::json!(1);
        #[derive(Serialize)]
        struct R {
            gpa: String,
            size: u64,
            slot: u32,
        }
        assert_eq!(
            ok_line(
                &id,
                &R {
                    gpa: format!("{:#x}", 1u64 << 32),
                    size: 64 << 20,
                    slot: 3
                }
            ),
            r#"{"id":1,"ok":true,"result":{"gpa":"0x100000000","size":67108864,"slot":3}}"#
        );
        assert_eq!(
            err_line(&Value::Null, &ControlError::new(Code::Overlap, "x \"y\"")),
            r#"{"id":null,"ok":false,"error":{"code":"overlap","message":"x \"y\""}}"#
        );
        for c in [
            Code::Invalid,
            Code::Overlap,
            Code::NotFound,
            Code::Limit,
            Code::Reserved,
            Code::Internal,
            Code::Denied,
        ] {
            let wire = serde_json::to_string(&c).unwrap();
            assert_eq!(wire, format!("\"{}\"", c.name()));
            assert_eq!(serde_json::from_str::<Code>(&wire).unwrap(), c);
        }
        let r: Response<Value> = serde_json::from_str(&err_line(
            &serde_json::json!("a"),
            &ControlError::new(Code::NotFound, "gone"),
        ))
        .unwrap();
        assert!(!r.ok && r.result.is_none());
        assert_eq!(r.error, Some(ControlError::new(Code::NotFound, "gone")));
    }

    #[test]
    fn requests_round_trip_through_their_lines() {
        for r in [
            Request::Map {
                gpa: 1 << 32,
                size: 64 << 20,
                backing: Backing::Hugetlb,
                readonly: true,
            },
            Request::Unmap { gpa: 5, size: 4096 },
            Request::Protect {
                gpa: 1 << 33,
                size: 1 << 21,
                readonly: false,
            },
            Request::List {},
            Request::Stats {},
            Request::Stop {},
            Request::Check {},
            Request::Snapshot {
                dir: "/tmp/s".into(),
                stop: true,
                force: false,
                live: true,
            },
            Request::Subscribe { events: None },
            Request::Subscribe {
                events: Some(vec![EventKind::Unmapped]),
            },
            Request::Unsubscribe {},
            Request::Inject {
                step: Some(crate::inject::Step::Release),
                nth: 3,
            },
        ] {
            let line = serde_json::to_string(&RequestLine { id: 9, request: &r }).unwrap();
            assert!(line.starts_with(r#"{"id":9,"op":""#), "{line}");
            let p = parse_line(line.as_bytes());
            assert_eq!(p.id, serde_json::json!(9));
            assert_eq!(p.request, Ok(r.clone()), "{line}");
            assert!(line.contains(&format!(r#""op":"{}""#, r.op())), "{line}");
        }
        let line = serde_json::to_string(&RequestLine {
            id: 1,
            request: &Request::Map {
                gpa: 1 << 32,
                size: 4096,
                backing: Backing::Anon,
                readonly: false,
            },
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"id":1,"op":"map","gpa":"0x100000000","size":4096,"backing":"anon","readonly":false}"#
        );
    }

    #[test]
    fn the_greeting_lists_what_is_served() {
        let g = Greeting::new(false);
        let line = g.line();
        assert!(
            line.starts_with(r#"{"greeting":{"name":"vmm","version":""#),
            "{line}"
        );
        let back: Greeting = serde_json::from_str(&line).unwrap();
        assert_eq!(back, g);
        assert_eq!(back.greeting.protocol, PROTOCOL);
        let caps = &back.greeting.capabilities;
        for op in [
            "map",
            "unmap",
            "unmap_batch",
            "protect",
            "list",
            "stats",
            "check",
            "stop",
            "snapshot",
        ] {
            assert!(caps.iter().any(|c| c == op), "{op}: {line}");
        }
        assert!(caps.iter().any(|c| c == "events"));
        assert!(!caps.iter().any(|c| c == "inject"));
        assert!(Greeting::new(true)
            .greeting
            .capabilities
            .iter()
            .any(|c| c == "inject"));
    }

    #[test]
    fn event_lines() {
        let region = super::super::RegionView {
            gpa: 1 << 32,
            size: 4096,
            end: (1 << 32) + 4096,
            slot: Some(0),
            backing: Backing::Memfd,
            kind: RegionKind::Hotplug,
            readonly: false,
            resident_pages: 0,
            faults: 0,
        };
        let e = Event::Mapped {
            seq: 4,
            region: region.clone(),
        };
        assert_eq!(
            e.line(),
            r#"{"event":"mapped","seq":4,"gpa":"0x100000000","size":4096,"end":"0x100001000","slot":0,"backing":"memfd","kind":"hotplug","readonly":false,"resident_pages":0,"faults":0}"#
        );
        let u = Event::Unmapped {
            seq: 5,
            gpa: 1 << 32,
            size: 4096,
            end: (1 << 32) + 4096,
            removed: vec![region],
        };
        for e in [
            e,
            u,
            Event::EventsDropped { count: 3 },
            Event::GuestExited {
                seq: 9,
                guest: Default::default(),
            },
        ] {
            let back: Event = serde_json::from_str(&e.line()).unwrap();
            assert_eq!(back, e);
        }
        assert_eq!(
            Event::EventsDropped { count: 3 }.line(),
            r#"{"event":"events_dropped","count":3}"#
        );
        assert_eq!(EventKind::ALL.len(), 4);
        let bits: u32 = EventKind::ALL.iter().map(|k| k.bit()).sum();
        assert_eq!(bits, 0b1111);
    }

    proptest! {
        #[test]
        fn addresses_round_trip(v: u64) {
            prop_assert_eq!(parse_addr(&v.to_string()), Ok(v));
            prop_assert_eq!(parse_addr(&format!("{v:#x}")), Ok(v));
            prop_assert_eq!(parse_addr(&format!("{v:#X}").replacen("0X", "0x", 1)), Ok(v));
        }

        #[test]
        fn any_bytes_parse_without_panicking(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_line(&line);
        }

        #[test]
        fn map_requests_round_trip(gpa: u64, size: u64, ro: bool, b in 0..3usize) {
            let backing = ["anon", "memfd", "hugetlb"][b];
            let line = serde_json::json!({"id": 9, "op": "map", "gpa": format!("{gpa:#x}"), "size": size.to_string(),
                                          "backing": backing, "readonly": ro}).to_string();
            prop_assert_eq!(parse_line(line.as_bytes()).request, Ok(Request::Map {
                gpa, size, backing: Backing::from_name(backing).unwrap(), readonly: ro }));
        }
    }
}
