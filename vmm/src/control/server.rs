//! The control socket server: one acceptor thread (the companion thread) and one thread per
//! client, bounded by `--max-clients`.
//!
//! - The socket is created with mode 0600 (under a umask, then chmod'ed again). A path that
//!   is a live socket (something answers `connect`) is refused; a stale one (connection
//!   refused) is replaced; anything else at the path is left alone and refused. The socket is
//!   removed when the server stops (if it is still ours).
//! - Each peer's uid (`SO_PEERCRED`) must be the VMM's effective uid; others get one
//!   `denied` reply and are disconnected.
//! - A client thread reads lines of at most 64 KiB, answers each in order, and never lets one
//!   client block another except while an address-space change runs (those are serialised by
//!   the address space). A line over the limit gets a `limit` reply and is skipped; a client
//!   that disconnects mid-line or stops reading its replies (5 s write timeout) is dropped.
//!   Handler threads never hold RCU read guards: they are writers.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::protocol::{self, Code, ControlError, MAX_LINE_BYTES};
use super::Vmm;

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// A client that does not take its replies for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the socket cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves the path.
    #[error("--api-sock {0}: another process is listening on this socket; stop it or choose another path")]
    Live(PathBuf),
    /// Something that is not a socket is there.
    #[error("--api-sock {0}: exists and is not a socket; remove it or choose another path")]
    NotSocket(PathBuf),
    /// The host refused.
    #[error("--api-sock {path}: cannot {what}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// A bound control socket; removes its file when dropped (if the file is still this socket).
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
    /// (dev, ino) of the socket file, to recognise it at removal.
    id: (u64, u64),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Creates the control socket at `path` (see the module docs).
pub fn bind(path: &Path) -> Result<Listener, ServerError> {
    let io_err = |what, source| ServerError::Io {
        path: path.to_owned(),
        what,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::Live(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("--api-sock {}: replacing a stale socket", path.display());
                std::fs::remove_file(path).map_err(|e| io_err("remove the stale socket", e))?;
            }
            Err(e) => return Err(io_err("probe the existing socket", e)),
        },
        Ok(_) => return Err(ServerError::NotSocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect the path", e)),
    }
    // SAFETY: umask only changes the process's file-creation mask; it is restored right after
    // the bind. No other thread creates files at this point (the VM is not running yet).
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let inner = bound.map_err(|e| io_err("bind the socket", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err("set the socket's mode to 0600", e))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| io_err("inspect the socket", e))?;
    remove_on_fatal_signals(path);
    Ok(Listener {
        inner,
        path: path.to_owned(),
        id: (m.dev(), m.ino()),
    })
}

/// The socket path for the signal handler (set once, by the first bound listener).
static SIGNAL_UNLINK: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();

extern "C" fn unlink_and_die(sig: libc::c_int) {
    if let Some(p) = SIGNAL_UNLINK.get() {
        // SAFETY: unlink, signal and raise are async-signal-safe; `p` is a NUL-terminated
        // string that lives for the rest of the process.
        unsafe { libc::unlink(p.as_ptr()) };
    }
    // SAFETY: as above; the default action then ends the process as if we had not caught it.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Removes the socket file when SIGINT, SIGTERM or SIGHUP ends the process (which otherwise
/// dies with the default action, leaving a stale socket that the next start would replace).
fn remove_on_fatal_signals(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    if SIGNAL_UNLINK.set(c).is_err() {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only makes async-signal-safe calls.
        unsafe { libc::signal(sig, unlink_and_die as *const () as libc::sighandler_t) };
    }
}

/// The uid of the process at the other end of `s`.
fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a `ucred` of `len` bytes; both point at live locals.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a peer with `peer` uid may talk to a VMM running as `ours`.
pub fn peer_allowed(peer: u32, ours: u32) -> bool {
    peer == ours
}

fn our_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    r > 0
}

fn send(stream: &mut UnixStream, line: &str) -> io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    stream.write_all(&buf)
}

/// Serves clients until `stop` is set; then waits for the client threads and removes the
/// socket.
pub fn serve(listener: Listener, vmm: &Arc<Vmm>, stop: &AtomicBool) {
    let max_clients = vmm.config().max_clients;
    let active = Arc::new(AtomicUsize::new(0));
    let stop_clients = Arc::new(AtomicBool::new(false));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let uid = our_uid();
    let _ = listener.inner.set_nonblocking(true);
    tracing::info!(path = %listener.path.display(), "control socket ready");
    while !stop.load(Ordering::Acquire) {
        if !wait_readable(&listener.inner, POLL) {
            continue;
        }
        let mut stream = match listener.inner.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a control connection failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        match peer_uid(&stream) {
            Ok(p) if peer_allowed(p, uid) => {}
            Ok(p) => {
                tracing::warn!(peer_uid = p, "refused a control client of another user");
                let e = ControlError::new(
                    Code::Denied,
                    format!("uid {p} may not control this VMM (it runs as uid {uid})"),
                );
                let _ = send(&mut stream, &protocol::err_line(&Value::Null, &e));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; refusing the client");
                continue;
            }
        }
        if active.load(Ordering::Acquire) >= max_clients {
            let e = ControlError::new(
                Code::Limit,
                format!("too many clients: at most {max_clients} at once (--max-clients)"),
            );
            let _ = send(&mut stream, &protocol::err_line(&Value::Null, &e));
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (vmm, active2, stop2) = (
            Arc::clone(vmm),
            Arc::clone(&active),
            Arc::clone(&stop_clients),
        );
        let spawned = std::thread::Builder::new()
            .name("ctl-client".into())
            .spawn(move || {
                client_loop(stream, &vmm, &stop2);
                active2.fetch_sub(1, Ordering::AcqRel);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                active.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(error = %e, "cannot start a control client thread");
            }
        }
    }
    stop_clients.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    drop(listener);
}

/// Reads request lines from one client and answers each, in order.
fn client_loop(mut stream: UnixStream, vmm: &Vmm, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 << 10];
    // Skipping the rest of an over-long line.
    let mut discarding = false;
    while !stop.load(Ordering::Acquire) {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return, // EOF: a partial line is dropped unanswered
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        let mut data = &chunk[..n];
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n');
            let (part, rest, complete) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if discarding {
                discarding = !complete;
                continue;
            }
            buf.extend_from_slice(part);
            if buf.len() > MAX_LINE_BYTES {
                buf.clear();
                discarding = !complete;
                let e = ControlError::new(
                    Code::Limit,
                    format!("request line longer than {MAX_LINE_BYTES} bytes; skipped"),
                );
                if send(&mut stream, &protocol::err_line(&Value::Null, &e)).is_err() {
                    return;
                }
                continue;
            }
            if !complete {
                break;
            }
            let line = std::mem::take(&mut buf);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = answer(vmm, line);
            if send(&mut stream, &reply).is_err() {
                return;
            }
        }
    }
}

/// The reply line for one request line.
pub fn answer(vmm: &Vmm, line: &[u8]) -> String {
    let parsed = protocol::parse_line(line);
    let result = parsed.request.and_then(|req| {
        // A panic in a handler would be a bug; it must still not take the VMM down.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vmm.execute(req))).unwrap_or_else(
            |_| {
                Err(ControlError::new(
                    Code::Internal,
                    "the request handler panicked (a VMM bug); please report it",
                ))
            },
        )
    });
    match result {
        Ok(reply) => protocol::ok_line(&parsed.id, &reply),
        Err(e) => protocol::err_line(&parsed.id, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-ctl-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    #[test]
    fn socket_file_lifecycle() {
        let p = tmp("life");
        let l = bind(&p).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // Live: refused.
        assert!(matches!(bind(&p), Err(ServerError::Live(_))));
        drop(l);
        assert!(!p.exists(), "removed on drop");
        // Stale: replaced.
        let stale = UnixListener::bind(&p).unwrap();
        drop(stale);
        assert!(p.exists());
        let l = bind(&p).unwrap();
        drop(l);
        // Not a socket: left alone.
        std::fs::write(&p, b"keep me").unwrap();
        assert!(matches!(bind(&p), Err(ServerError::NotSocket(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_replaced_socket_file_is_not_removed() {
        let p = tmp("replaced");
        let l = bind(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"someone else's").unwrap();
        drop(l);
        assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn peers_of_other_users_are_refused() {
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(0, 1000));
        assert!(!peer_allowed(1000, 0));
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), our_uid());
    }
}
