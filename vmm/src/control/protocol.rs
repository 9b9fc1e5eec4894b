//! The control protocol: newline-delimited JSON, one request per line, one response per line.
//!
//! ```text
//! {"id":1,"op":"map","gpa":"0x100000000","size":"64M","backing":"anon"}
//! {"id":1,"ok":true,"result":{"gpa":"0x100000000","size":67108864,"slot":3,...}}
//! {"id":2,"op":"map","gpa":"0x100000000","size":"4K"}
//! {"id":2,"ok":false,"error":{"code":"overlap","message":"..."}}
//! ```
//!
//! This module only turns a line into a [`Request`] (or a [`ControlError`] with code
//! `invalid`) and replies into lines; it never touches the VM. Every field is checked here:
//! unknown ops and unknown fields are refused, sizes take `K`/`M`/`G`/`T` suffixes, addresses
//! are decimal or `0x` hex (as strings, or plain JSON integers).
#![deny(unsafe_code)]

use serde::Serialize;
use serde_json::{Map, Value};

use crate::memory::Backing;

/// The longest request line accepted, newline excluded.
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// The protocol's error codes (docs/interface.md), plus `denied` for a peer of another user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

    /// Parses a wire name.
    #[cfg(test)]
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "invalid" => Code::Invalid,
            "overlap" => Code::Overlap,
            "not_found" => Code::NotFound,
            "limit" => Code::Limit,
            "reserved" => Code::Reserved,
            "internal" => Code::Internal,
            "denied" => Code::Denied,
            _ => return None,
        })
    }
}

/// A failed request: a code and a message that names the value involved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
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

/// One parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Map fresh memory at `[gpa, gpa + size)`.
    Map {
        /// Start.
        gpa: u64,
        /// Bytes.
        size: u64,
        /// What backs it.
        backing: Backing,
        /// Read-only to the guest.
        readonly: bool,
    },
    /// Unmap every address in `[gpa, gpa + size)`, splitting partly covered regions.
    Unmap {
        /// Start.
        gpa: u64,
        /// Bytes.
        size: u64,
    },
    /// Change the protection of `[gpa, gpa + size)` (fully mapped).
    Protect {
        /// Start.
        gpa: u64,
        /// Bytes.
        size: u64,
        /// Read-only or writable.
        readonly: bool,
    },
    /// Every region.
    List,
    /// Counters.
    Stats,
    /// Ask the guest's `hotplug` workload to finish and exit (extension).
    Stop,
    /// Compare the tree with KVM's memslots and the host mappings (extension).
    Check,
    /// Pause every vCPU, write a snapshot into `dir`, then resume (or stop with `stop`).
    Snapshot {
        /// The snapshot directory (absolute, or relative to the VMM's working directory).
        dir: String,
        /// Stop the VM once the snapshot is written.
        stop: bool,
        /// Replace an existing `dir`.
        force: bool,
    },
    /// Make the `nth` next call of `step` fail (test-only, with `VMM_FAULT_INJECT` set).
    Inject {
        /// Which call.
        step: Option<crate::inject::Step>,
        /// 1 = the next one.
        nth: u64,
    },
}

/// A line parsed as far as it goes: the id to echo (null if there is none) and the request.
#[derive(Debug)]
pub struct Parsed {
    /// The request's `id` (a number or a string), or null.
    pub id: Value,
    /// The request, or why it is not one.
    pub request: Result<Request, ControlError>,
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

fn field_u64(
    obj: &Map<String, Value>,
    name: &str,
    parse: fn(&str) -> Result<u64, String>,
) -> Result<u64, ControlError> {
    match obj.get(name) {
        None => Err(ControlError::invalid(format!("missing field {name:?}"))),
        Some(Value::String(s)) => {
            parse(s).map_err(|e| ControlError::invalid(format!("{name}: {e}")))
        }
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
            ControlError::invalid(format!("{name}: {n} is not a non-negative integer"))
        }),
        Some(other) => Err(ControlError::invalid(format!(
            "{name}: expected a string or an integer, got {}",
            kind(other)
        ))),
    }
}

fn field_bool(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ControlError> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ControlError::invalid(format!(
            "{name}: expected true or false, got {}",
            kind(other)
        ))),
    }
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

/// Parses one request line (without its newline).
pub fn parse_line(line: &[u8]) -> Parsed {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Parsed {
                id: Value::Null,
                request: Err(ControlError::invalid(format!("not a JSON request: {e}"))),
            }
        }
    };
    let Value::Object(obj) = value else {
        return Parsed {
            id: Value::Null,
            request: Err(ControlError::invalid(format!(
                "a request is a JSON object, got {}",
                kind(&value)
            ))),
        };
    };
    let id = match obj.get("id") {
        Some(v @ (Value::Number(_) | Value::String(_))) => v.clone(),
        Some(other) => {
            return Parsed {
                id: Value::Null,
                request: Err(ControlError::invalid(format!(
                    "\"id\" must be a number or a string, got {}",
                    kind(other)
                ))),
            }
        }
        None => {
            return Parsed {
                id: Value::Null,
                request: Err(ControlError::invalid("missing field \"id\"")),
            }
        }
    };
    let request = parse_request(&obj);
    Parsed { id, request }
}

fn parse_request(obj: &Map<String, Value>) -> Result<Request, ControlError> {
    let op = match obj.get("op") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(ControlError::invalid(format!(
                "\"op\" must be a string, got {}",
                kind(other)
            )))
        }
        None => return Err(ControlError::invalid("missing field \"op\"")),
    };
    let allowed: &[&str] = match op {
        "map" => &["gpa", "size", "backing", "readonly"],
        "unmap" => &["gpa", "size"],
        "protect" => &["gpa", "size", "readonly"],
        "list" | "stats" | "stop" | "check" => &[],
        "inject" => &["step", "nth"],
        "snapshot" => &["dir", "stop", "force"],
        _ => {
            return Err(ControlError::invalid(format!(
                "unknown op {op:?}; expected map, unmap, protect, list, stats, stop, check or \
                 snapshot"
            )))
        }
    };
    if let Some(k) = obj
        .keys()
        .find(|k| *k != "id" && *k != "op" && !allowed.contains(&k.as_str()))
    {
        return Err(ControlError::invalid(format!(
            "op {op:?} takes no field {k:?}"
        )));
    }
    let gpa = || field_u64(obj, "gpa", parse_addr);
    let size = || field_u64(obj, "size", crate::size::parse_size);
    Ok(match op {
        "map" => {
            let backing = match obj.get("backing") {
                None => Backing::Anon,
                Some(Value::String(s)) => Backing::from_name(s).ok_or_else(|| {
                    ControlError::invalid(format!("backing {s:?}: expected anon, memfd or hugetlb"))
                })?,
                Some(other) => {
                    return Err(ControlError::invalid(format!(
                        "backing: expected a string, got {}",
                        kind(other)
                    )))
                }
            };
            Request::Map {
                gpa: gpa()?,
                size: size()?,
                backing,
                readonly: field_bool(obj, "readonly")?.unwrap_or(false),
            }
        }
        "unmap" => Request::Unmap {
            gpa: gpa()?,
            size: size()?,
        },
        "protect" => Request::Protect {
            gpa: gpa()?,
            size: size()?,
            readonly: field_bool(obj, "readonly")?
                .ok_or_else(|| ControlError::invalid("missing field \"readonly\""))?,
        },
        "list" => Request::List,
        "stats" => Request::Stats,
        "stop" => Request::Stop,
        "check" => Request::Check,
        "snapshot" => Request::Snapshot {
            dir: match obj.get("dir") {
                Some(Value::String(d)) if !d.is_empty() => d.clone(),
                Some(Value::String(_)) => {
                    return Err(ControlError::invalid("dir: must not be empty"))
                }
                Some(other) => {
                    return Err(ControlError::invalid(format!(
                        "dir: expected a string, got {}",
                        kind(other)
                    )))
                }
                None => return Err(ControlError::invalid("missing field \"dir\"")),
            },
            stop: field_bool(obj, "stop")?.unwrap_or(false),
            force: field_bool(obj, "force")?.unwrap_or(false),
        },
        "inject" => {
            let step = match obj.get("step") {
                Some(Value::String(s)) => match s.as_str() {
                    "off" => None,
                    other => match crate::inject::Step::from_name(other) {
                        Some(step) => Some(step),
                        None => {
                            return Err(ControlError::invalid(format!(
                                "step {s:?}: expected {} or off",
                                crate::inject::STEP_NAMES
                            )))
                        }
                    },
                },
                _ => return Err(ControlError::invalid("missing string field \"step\"")),
            };
            let nth = match obj.get("nth") {
                None => 1,
                Some(_) => field_u64(obj, "nth", |s| s.parse().map_err(|e| format!("{e}")))?,
            };
            Request::Inject { step, nth }
        }
        _ => unreachable!("ops are matched above"),
    })
}

/// The line (without newline) answering request `id` with `result`.
pub fn ok_line<T: Serialize>(id: &Value, result: &T) -> String {
    #[derive(Serialize)]
    struct Ok<'a, T> {
        id: &'a Value,
        ok: bool,
        result: &'a T,
    }
    serde_json::to_string(&Ok {
        id,
        ok: true,
        result,
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
    #[derive(Serialize)]
    struct Error<'a> {
        code: &'static str,
        message: &'a str,
    }
    #[derive(Serialize)]
    struct Err<'a> {
        id: &'a Value,
        ok: bool,
        error: Error<'a>,
    }
    serde_json::to_string(&Err {
        id,
        ok: false,
        error: Error {
            code: err.code.name(),
            message: &err.message,
        },
    })
    .unwrap_or_else(|_| {
        r#"{"id":null,"ok":false,"error":{"code":"internal","message":"cannot encode the reply"}}"#
            .to_owned()
    })
}

/// Formats an address for replies.
pub fn hex(v: u64) -> String {
    format!("{v:#x}")
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
            req(r#"{"id":3,"op":"protect","gpa":"0x1000","size":"4K","readonly":false}"#),
            Ok(Request::Protect {
                gpa: 0x1000,
                size: 4096,
                readonly: false
            })
        );
        for (s, r) in [
            ("list", Request::List),
            ("stats", Request::Stats),
            ("stop", Request::Stop),
        ] {
            assert_eq!(req(&format!(r#"{{"id":1,"op":"{s}"}}"#)), Ok(r));
        }
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
                r#"{"id":7,"op":"protect","gpa":"0x1000","size":"4K"}"#,
                serde_json::json!(7),
            ),
            (
                r#"{"id":"a","op":"map","gpa":"0x1000","size":"99999999999T"}"#,
                serde_json::json!("a"),
            ),
        ] {
            let p = parse_line(line.as_bytes());
            assert_eq!(p.id, id, "{line}");
            let e = p.request.expect_err(line);
            assert_eq!(e.code, Code::Invalid, "{line}: {e}");
            assert!(!e.message.is_empty());
        }
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
                    gpa: hex(1 << 32),
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
            assert_eq!(Code::from_name(c.name()), Some(c));
        }
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
            let line = serde_json::json!({"id": 9, "op": "map", "gpa": hex(gpa), "size": size.to_string(),
                                          "backing": backing, "readonly": ro}).to_string();
            prop_assert_eq!(parse_line(line.as_bytes()).request, Ok(Request::Map {
                gpa, size, backing: Backing::from_name(backing).unwrap(), readonly: ro }));
        }
    }
}
