//! The control socket server: one acceptor thread (the companion thread) and one thread per
//! client, at most `--max-clients` at once.
//!
//! - Before anything is created, every directory on the way to the socket must be one that
//!   only root and the VMM's user can change ([`check_socket_dir`]); otherwise another user
//!   could rename the socket and bind their own in its place.
//! - The socket file has mode 0600 from the start: the socket's inode gets that mode
//!   (`fchmod` on the descriptor) before `bind` creates the file from it (less the umask).
//!   Nothing is chmod'ed by path afterwards (that would follow a symlink put there), and the
//!   process-wide umask is not touched. A path that is a live socket (something answers
//!   `connect`) is refused; a stale one (connection refused) is replaced; anything else at
//!   the path is left alone and refused. The socket is removed when the server stops (if it
//!   is still ours).
//! - Each peer's uid (`SO_PEERCRED`) must be the VMM's effective uid; others get one
//!   `denied` reply and are disconnected. Every other connection is greeted at once with one
//!   line ([`Greeting`]: version, protocol, capabilities), before anything else it receives.
//! - A client that sent `subscribe` also receives event lines ([`super::events`]), written by
//!   its own thread between replies, so a slow subscriber never holds up anyone else.
//! - A client thread reads lines of at most 64 KiB, answers each in order, and never lets one
//!   client block another except while an address-space change runs (those are serialised by
//!   the address space). A line over the limit gets a `limit` reply and is skipped; a client
//!   that disconnects mid-line or stops reading its replies (5 s write timeout) is dropped. A
//!   client whose request line stays incomplete for `--client-idle-timeout` (counted from the
//!   line's first byte) gets a `limit` notice and is dropped. Handler threads never hold RCU
//!   read guards: they are writers.
//! - When every slot is taken, a new connection makes room: the client that has gone longest
//!   without a complete request line, preferring one with no request under way, gets a
//!   `limit` notice and is disconnected (one with a request under way first gets its reply).
//!   So a new client, `vmm ctl stop` included, is always served, whatever the connections
//!   already there do.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::events::{self, Subscriber};
use super::protocol::{self, Code, ControlError, Greeting, Request, MAX_LINE_BYTES};
use super::{Reply, Subscribed, Vmm};

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// A client that does not take its replies for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the notice to a client being disconnected may take to send.
const NOTICE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a new client waits for an evicted one to go (a request under way is answered
/// first, and the reply may take up to [`WRITE_TIMEOUT`] to send).
const EVICT_WAIT: Duration = Duration::from_secs(10);
/// The socket file's mode.
const SOCKET_MODE: libc::mode_t = 0o600;

/// Why the socket cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves the path.
    #[error("--api-sock {0}: another process is listening on this socket; stop it or choose another path")]
    Live(PathBuf),
    /// Something that is not a socket is there.
    #[error("--api-sock {0}: exists and is not a socket; remove it or choose another path")]
    NotSocket(PathBuf),
    /// A directory (or symbolic link) on the way to the socket can be changed by another user.
    #[error(
        "--api-sock {path}: {dir} {why}, so another user could replace the socket; \
         use a directory that only you or root can change (such as $XDG_RUNTIME_DIR, or a \
         private directory under /tmp)"
    )]
    UnsafeDir {
        /// The socket path.
        path: PathBuf,
        /// The directory or link at fault.
        dir: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The new socket file is not what was asked for (it is removed).
    #[error("--api-sock {path}: the new socket {why}; removed it")]
    BadSocket {
        /// The socket path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
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

/// Whether a file owned by `owner` is safe for a VMM running as `uid` to rely on: only its
/// owner and root can change it.
pub fn trusted_owner(owner: u32, uid: u32) -> bool {
    owner == 0 || owner == uid
}

/// What makes a directory unsafe to hold the socket of a VMM running as `uid`, if anything:
/// another owner than root or `uid`, or group- or world-writable without the sticky bit
/// (which keeps others from renaming or removing entries they do not own).
fn dir_problem(m: &std::fs::Metadata, uid: u32) -> Option<String> {
    let mode = m.mode();
    if !m.is_dir() {
        Some("is not a directory".into())
    } else if !trusted_owner(m.uid(), uid) {
        Some(format!("is owned by uid {}", m.uid()))
    } else if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        let who = if mode & 0o002 != 0 {
            "every user"
        } else {
            "its group"
        };
        Some(format!(
            "is writable by {who} (mode {:04o}) without the sticky bit",
            mode & 0o7777
        ))
    } else {
        None
    }
}

/// Checks that only root and `uid` can change the way to `sock` (in the manner of OpenSSH's
/// `safe_path`): for every directory on the path as given, and on the same path with symbolic
/// links resolved, the directory and each one above it passes `dir_problem`, and a symbolic
/// link on the way is owned by root or `uid` (even in a sticky directory, a link's owner can
/// replace it). A relative path is taken from the current directory.
pub fn check_socket_dir(sock: &Path, uid: u32) -> Result<(), ServerError> {
    let io_err = |what, source| ServerError::Io {
        path: sock.to_owned(),
        what,
        source,
    };
    let parent = match sock.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let parent = if parent.is_absolute() {
        parent
    } else {
        std::env::current_dir()
            .map_err(|e| io_err("find the current directory", e))?
            .join(parent)
    };
    let unsafe_dir = |dir: &Path, why: String| ServerError::UnsafeDir {
        path: sock.to_owned(),
        dir: dir.to_owned(),
        why,
    };
    let mut checked = HashSet::new();
    let given: Vec<&Path> = parent.ancestors().collect();
    for q in given.into_iter().rev() {
        let lm = std::fs::symlink_metadata(q)
            .map_err(|e| io_err("inspect a directory on the way to the socket", e))?;
        if lm.file_type().is_symlink() && !trusted_owner(lm.uid(), uid) {
            return Err(unsafe_dir(
                q,
                format!("is a symbolic link owned by uid {}", lm.uid()),
            ));
        }
        let real = std::fs::canonicalize(q)
            .map_err(|e| io_err("resolve a directory on the way to the socket", e))?;
        let chain: Vec<&Path> = real.ancestors().collect();
        for d in chain.into_iter().rev() {
            if !checked.insert(d.to_owned()) {
                continue;
            }
            let m = std::fs::metadata(d)
                .map_err(|e| io_err("inspect a directory on the way to the socket", e))?;
            if let Some(why) = dir_problem(&m, uid) {
                return Err(unsafe_dir(d, why));
            }
        }
    }
    Ok(())
}

/// Creates the control socket at `path` (see the module docs).
pub fn bind(path: &Path) -> Result<Listener, ServerError> {
    let io_err = |what, source| ServerError::Io {
        path: path.to_owned(),
        what,
        source,
    };
    let uid = our_uid();
    check_socket_dir(path, uid)?;
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
    let inner = bind_private(path).map_err(|e| io_err("bind the socket", e))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| io_err("inspect the socket", e))?;
    let why = if !m.file_type().is_socket() {
        Some("is not a socket".to_owned())
    } else if m.uid() != uid {
        Some(format!("is owned by uid {}, not {uid}", m.uid()))
    } else if m.mode() & 0o7777 & !SOCKET_MODE != 0 {
        Some(format!(
            "has mode {:04o}, not {SOCKET_MODE:04o}",
            m.mode() & 0o7777
        ))
    } else {
        None
    };
    if let Some(why) = why {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
        return Err(ServerError::BadSocket {
            path: path.to_owned(),
            why,
        });
    }
    remove_on_fatal_signals(path);
    Ok(Listener {
        inner,
        path: path.to_owned(),
        id: (m.dev(), m.ino()),
    })
}

/// A listening Unix socket at `path` whose file has mode [`SOCKET_MODE`] (less the umask)
/// from the moment it exists: Linux creates the file of a bound socket with the mode of the
/// socket's own inode, which `fchmod` on the descriptor sets before `bind`.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be 1 to {} bytes long, without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: socket takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on a descriptor we own; no pointers.
    if unsafe { libc::fchmod(fd.as_raw_fd(), SOCKET_MODE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr` is a live sockaddr_un, and `len` (the path, its NUL and the family
    // field) does not exceed its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own; no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
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

/// The uid of the process at the other end of `s` (for a client: the process that made the
/// server's socket listen).
pub fn peer_uid(s: &UnixStream) -> io::Result<u32> {
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

/// The process's effective uid.
pub fn our_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    wait_either(fd, None::<&UnixStream>, timeout).0
}

/// Waits until `a` or `b` (if any) is readable (or hung up), or `timeout` passes; says which.
fn wait_either(a: &impl AsRawFd, b: Option<&impl AsRawFd>, timeout: Duration) -> (bool, bool) {
    let fd = |f: Option<libc::c_int>| libc::pollfd {
        fd: f.unwrap_or(-1),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut p = [fd(Some(a.as_raw_fd())), fd(b.map(AsRawFd::as_raw_fd))];
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: two valid pollfds (a negative fd is ignored) for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), 2, ms) };
    let ready = |p: &libc::pollfd| r > 0 && p.revents != 0;
    (ready(&p[0]), ready(&p[1]))
}

fn send(mut stream: &UnixStream, line: &str) -> io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    stream.write_all(&buf)
}

/// One connected client, as the acceptor sees it.
#[derive(Debug)]
struct Slot {
    /// A second handle on the client's socket, to wake its thread when it is evicted.
    stream: UnixStream,
    /// When the client last sent a complete request line (or connected), in ns since the
    /// server started.
    last_request_ns: AtomicU64,
    /// A request of this client is being answered.
    busy: AtomicBool,
    /// The client is to go, to make room for a new one (after the reply under way, if any).
    evict: AtomicBool,
    /// The client subscribed to events (it goes last when room is made).
    subscribed: AtomicBool,
}

/// A client's slot and thread.
struct Running {
    slot: Arc<Slot>,
    thread: JoinHandle<()>,
}

/// A client as eviction weighs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    /// Already asked to go.
    leaving: bool,
    /// A request of it is being answered.
    busy: bool,
    /// It subscribed to events (and so may well send nothing for a long time).
    subscribed: bool,
    /// When it last sent a complete request line (or connected).
    last_request_ns: u64,
}

/// Which client makes room for a new one: of those not already leaving, one with no request
/// under way if there is one, then one that has not subscribed to events, and of those the
/// one that has gone longest without a complete request (the first connected, on a tie).
fn pick_victim(clients: &[Candidate]) -> Option<usize> {
    clients
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.leaving)
        .min_by_key(|(_, c)| (c.busy, c.subscribed, c.last_request_ns))
        .map(|(i, _)| i)
}

fn ns_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Serves clients until `stop` is set; then waits for the client threads and removes the
/// socket.
pub fn serve(listener: Listener, vmm: &Arc<Vmm>, stop: &AtomicBool) {
    let max_clients = vmm.config().max_clients;
    let epoch = Instant::now();
    let stop_clients = Arc::new(AtomicBool::new(false));
    let mut clients: Vec<Running> = Vec::new();
    let uid = our_uid();
    let greeting = Greeting::new(vmm.inject_enabled()).line();
    let _ = listener.inner.set_nonblocking(true);
    tracing::info!(path = %listener.path.display(), "control socket ready");
    while !stop.load(Ordering::Acquire) {
        if !wait_readable(&listener.inner, POLL) {
            continue;
        }
        let stream = match listener.inner.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a control connection failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        clients.retain(|c| !c.thread.is_finished());
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
                let _ = send(&stream, &protocol::err_line(&Value::Null, &e));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; refusing the client");
                continue;
            }
        }
        // The greeting comes first, at once: a fresh connection's buffer has room for it.
        if send(&stream, &greeting).is_err() {
            continue;
        }
        if clients.len() >= max_clients && !make_room(&mut clients, vmm, stop) {
            let e = ControlError::new(
                Code::Limit,
                format!(
                    "too many clients: all {max_clients} slots stayed busy answering requests \
                     (--max-clients)"
                ),
            );
            let _ = send(&stream, &protocol::err_line(&Value::Null, &e));
            continue;
        }
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot duplicate a control connection");
                continue;
            }
        };
        let slot = Arc::new(Slot {
            stream: handle,
            last_request_ns: AtomicU64::new(ns_since(epoch)),
            busy: AtomicBool::new(false),
            evict: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
        });
        vmm.clients().connected.fetch_add(1, Ordering::Relaxed);
        let (vmm2, slot2, stop2) = (
            Arc::clone(vmm),
            Arc::clone(&slot),
            Arc::clone(&stop_clients),
        );
        let spawned = std::thread::Builder::new()
            .name("ctl-client".into())
            .spawn(move || {
                client_loop(&stream, &vmm2, &slot2, epoch, &stop2);
                vmm2.clients().connected.fetch_sub(1, Ordering::Relaxed);
                // The slot holds a second handle: make sure the peer sees the end now.
                let _ = stream.shutdown(Shutdown::Both);
            });
        match spawned {
            Ok(thread) => clients.push(Running { slot, thread }),
            Err(e) => {
                vmm.clients().connected.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot start a control client thread");
            }
        }
    }
    // Every vCPU has ended: tell the subscribers (their threads send it before they go).
    vmm.publish_guest_exited();
    stop_clients.store(true, Ordering::Release);
    for c in clients {
        let _ = c.thread.join();
    }
    drop(listener);
}

/// Makes room for a new client when every slot is taken: asks the client [`pick_victim`]
/// chooses to go, and waits until a slot is free. False if none came free within
/// [`EVICT_WAIT`] or the server is stopping.
fn make_room(clients: &mut Vec<Running>, vmm: &Vmm, stop: &AtomicBool) -> bool {
    let max = vmm.config().max_clients;
    let seen: Vec<Candidate> = clients
        .iter()
        .map(|c| Candidate {
            leaving: c.slot.evict.load(Ordering::Acquire),
            busy: c.slot.busy.load(Ordering::Acquire),
            subscribed: c.slot.subscribed.load(Ordering::Acquire),
            last_request_ns: c.slot.last_request_ns.load(Ordering::Acquire),
        })
        .collect();
    let leaving = seen.iter().filter(|c| c.leaving).count();
    if clients.len() - leaving >= max {
        if let Some(i) = pick_victim(&seen) {
            let slot = &clients[i].slot;
            slot.evict.store(true, Ordering::Release);
            // Wakes its thread at once if it waits for a line; a request under way is still
            // answered (the thread looks at `evict` after each reply).
            let _ = slot.stream.shutdown(Shutdown::Read);
            vmm.clients().evicted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                busy = seen[i].busy,
                "all {max} control client slots in use: disconnecting the longest-idle client"
            );
        }
    }
    let deadline = Instant::now() + EVICT_WAIT;
    loop {
        clients.retain(|c| !c.thread.is_finished());
        if clients.len() < max {
            return true;
        }
        if stop.load(Ordering::Acquire) || Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Tells a client why it is being disconnected (best effort: it may not be reading).
fn farewell(stream: &UnixStream, message: String) {
    let _ = stream.set_write_timeout(Some(NOTICE_TIMEOUT));
    let e = ControlError::new(Code::Limit, message);
    let _ = send(stream, &protocol::err_line(&Value::Null, &e));
}

fn evicted(stream: &UnixStream, vmm: &Vmm) {
    farewell(
        stream,
        format!(
            "disconnected to make room for a new client: all {} client slots were in use and \
             this connection had gone longest without a request (--max-clients)",
            vmm.config().max_clients
        ),
    );
}

/// What one connection holds beyond its socket.
#[derive(Default)]
struct Conn {
    /// Its event queue, once it subscribed.
    sub: Option<Arc<Subscriber>>,
}

impl Conn {
    /// Writes the events queued for this connection, if any.
    fn flush_events(&self, stream: &UnixStream) -> io::Result<()> {
        let Some(sub) = &self.sub else {
            return Ok(());
        };
        let lines = sub.take();
        if lines.is_empty() {
            return Ok(());
        }
        let mut buf = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in &lines {
            buf.push_str(l);
            buf.push('\n');
        }
        let mut w = stream;
        w.write_all(buf.as_bytes())
    }
}

/// Reads request lines from one client and answers each, in order; between replies, writes
/// the events queued for it.
fn client_loop(stream: &UnixStream, vmm: &Vmm, slot: &Slot, epoch: Instant, stop: &AtomicBool) {
    let mut conn = Conn::default();
    serve_client(stream, vmm, slot, epoch, stop, &mut conn);
    // The run is over (or the client is going): what was queued still goes out, briefly.
    if stop.load(Ordering::Acquire) {
        let _ = stream.set_write_timeout(Some(NOTICE_TIMEOUT));
        let _ = conn.flush_events(stream);
    }
}

fn serve_client(
    mut stream: &UnixStream,
    vmm: &Vmm,
    slot: &Slot,
    epoch: Instant,
    stop: &AtomicBool,
    conn: &mut Conn,
) {
    let idle_timeout = vmm.config().client_idle_timeout;
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 << 10];
    // Skipping the rest of an over-long line.
    let mut discarding = false;
    // When the line being read began (None between lines).
    let mut line_started: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        if slot.evict.load(Ordering::Acquire) {
            return evicted(stream, vmm);
        }
        let (readable, _) = wait_either(stream, conn.sub.as_ref().map(|s| s.wake()), POLL);
        if conn.flush_events(stream).is_err() {
            return;
        }
        let n = if !readable {
            0
        } else {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    if slot.evict.load(Ordering::Acquire) {
                        evicted(stream, vmm);
                    }
                    return; // EOF: a partial line is dropped unanswered
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    0
                }
                Err(_) => return,
            }
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
                if complete {
                    line_started = None;
                }
                continue;
            }
            buf.extend_from_slice(part);
            if buf.len() > MAX_LINE_BYTES {
                buf.clear();
                discarding = !complete;
                if complete {
                    line_started = None;
                }
                let e = ControlError::new(
                    Code::Limit,
                    format!("request line longer than {MAX_LINE_BYTES} bytes; skipped"),
                );
                if send(stream, &protocol::err_line(&Value::Null, &e)).is_err() {
                    return;
                }
                continue;
            }
            if !complete {
                break;
            }
            line_started = None;
            let line = std::mem::take(&mut buf);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            slot.last_request_ns
                .store(ns_since(epoch), Ordering::Release);
            slot.busy.store(true, Ordering::Release);
            let reply = answer(vmm, line, conn);
            slot.subscribed.store(conn.sub.is_some(), Ordering::Release);
            let sent = send(stream, &reply);
            slot.busy.store(false, Ordering::Release);
            if sent.is_err() || conn.flush_events(stream).is_err() {
                return;
            }
            if slot.evict.load(Ordering::Acquire) {
                return evicted(stream, vmm);
            }
        }
        if buf.is_empty() && !discarding {
            line_started = None;
        } else if line_started.is_none() {
            line_started = Some(Instant::now());
        }
        // Looked at only after a read, so every byte the client had sent by now was seen.
        if line_started.is_some_and(|t| t.elapsed() >= idle_timeout) {
            vmm.clients().dropped_idle.fetch_add(1, Ordering::Relaxed);
            tracing::info!("dropped a control client that left a request line incomplete");
            let secs = idle_timeout.as_secs_f64();
            farewell(
                stream,
                format!(
                    "request line not completed within {secs} s; disconnected \
                     (--client-idle-timeout)"
                ),
            );
            return;
        }
    }
}

/// `subscribe` and `unsubscribe`: this connection's share of the event hub.
fn subscription(vmm: &Vmm, req: &Request, conn: &mut Conn) -> Result<Reply, ControlError> {
    let bits = match req {
        Request::Subscribe { events } => events::kind_bits(events.as_deref()),
        _ => 0,
    };
    match (&conn.sub, bits) {
        (_, 0) => conn.sub = None,
        (Some(s), _) => s.set_kinds(bits),
        (None, _) => {
            conn.sub = Some(vmm.events().subscribe(bits).map_err(|e| {
                ControlError::new(Code::Internal, format!("cannot subscribe: {e}"))
            })?);
        }
    }
    Ok(Reply::Subscribed(Subscribed {
        subscribed: events::kinds_of(bits),
    }))
}

/// The reply line for one request line of the connection `conn`.
fn answer(vmm: &Vmm, line: &[u8], conn: &mut Conn) -> String {
    let parsed = protocol::parse_line(line);
    let result = parsed.request.and_then(|req| {
        // A panic in a handler would be a bug; it must still not take the VMM down.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match req {
            Request::Subscribe { .. } | Request::Unsubscribe {} => subscription(vmm, &req, conn),
            req => vmm.execute(req),
        }))
        .unwrap_or_else(|_| {
            Err(ControlError::new(
                Code::Internal,
                "the request handler panicked (a VMM bug); please report it",
            ))
        })
    });
    match result {
        Ok(reply) => protocol::ok_line(&parsed.id, &reply),
        Err(e) => protocol::err_line(&parsed.id, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
    fn the_longest_idle_client_without_a_request_under_way_makes_room() {
        let c = |leaving, busy, last_request_ns| Candidate {
            leaving,
            busy,
            subscribed: false,
            last_request_ns,
        };
        assert_eq!(pick_victim(&[]), None);
        assert_eq!(pick_victim(&[c(true, false, 1)]), None);
        assert_eq!(
            pick_victim(&[c(false, false, 5), c(false, false, 3), c(false, false, 4)]),
            Some(1)
        );
        // Busy ones only when every other is leaving or busy too.
        assert_eq!(
            pick_victim(&[c(false, true, 1), c(false, false, 9), c(true, false, 0)]),
            Some(1)
        );
        assert_eq!(
            pick_victim(&[c(false, true, 7), c(false, true, 2)]),
            Some(1)
        );
        // Ties: the first connected.
        assert_eq!(
            pick_victim(&[c(false, false, 3), c(false, false, 3)]),
            Some(0)
        );
        // Subscribers go after every other idle client.
        let sub = Candidate {
            subscribed: true,
            ..c(false, false, 1)
        };
        assert_eq!(pick_victim(&[sub, c(false, false, 9)]), Some(1));
        assert_eq!(pick_victim(&[sub, c(false, true, 0)]), Some(0));
    }

    fn dir(name: &str, mode: u32) -> PathBuf {
        let d = tmp(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    #[test]
    fn socket_directories_others_can_change_are_refused() {
        let uid = our_uid();
        let open = dir("open", 0o777);
        let sub = open.join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        for (sock, bad) in [
            (open.join("s"), &open),
            (sub.join("s"), &open),
            (sub.join("..").join("sub").join("s"), &open),
        ] {
            match check_socket_dir(&sock, uid) {
                Err(ServerError::UnsafeDir { dir, why, .. }) => {
                    assert_eq!(&dir, bad, "{}", sock.display());
                    assert!(why.contains("writable by every user"), "{why}");
                }
                r => panic!("{}: {r:?}", sock.display()),
            }
            assert!(matches!(bind(&sock), Err(ServerError::UnsafeDir { .. })));
            assert!(std::fs::symlink_metadata(&sock).is_err(), "created");
        }
        let group = dir("group", 0o770);
        let e = check_socket_dir(&group.join("s"), uid).unwrap_err();
        assert!(e.to_string().contains("writable by its group"), "{e}");
        // Sticky: fine (as /tmp), and a private directory under it too.
        let sticky = dir("sticky", 0o1777);
        check_socket_dir(&sticky.join("s"), uid).unwrap();
        let private = dir("private", 0o700);
        check_socket_dir(&private.join("s"), uid).unwrap();
        // Owners: root and the VMM's user only (the end-to-end test chowns to check the rest).
        assert!(trusted_owner(0, 1000) && trusted_owner(1000, 1000) && trusted_owner(0, 0));
        assert!(!trusted_owner(65534, 1000) && !trusted_owner(65534, 0));
        let m = std::fs::metadata(&private).unwrap();
        assert!(dir_problem(&m, uid).is_none());
        if m.uid() != 0 {
            let e = dir_problem(&m, m.uid() + 1).unwrap();
            assert!(e.contains("owned by uid"), "{e}");
        }
        let file = private.join("f");
        std::fs::write(&file, b"").unwrap();
        let e = check_socket_dir(&file.join("s"), uid).unwrap_err();
        assert!(
            matches!(e, ServerError::Io { .. } | ServerError::UnsafeDir { .. }),
            "{e}"
        );
        for d in [&open, &group, &sticky, &private] {
            std::fs::remove_dir_all(d).unwrap();
        }
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
