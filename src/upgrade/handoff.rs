//! Messages of the live upgrade's private channel, and both sides of the
//! listener handoff.
//!
//! Owns: the message set and its encoding (carried by [`super::fdpass`]):
//! control messages are JSON; connection batches, the bulk of an upgrade,
//! are `C` followed by postcard, a compact binary serde format, tagged with
//! [`SNAPSHOT_FORMAT`] so that two binaries that would not understand each
//! other's snapshots refuse to upgrade instead of guessing. The sequence: the old process starts the new binary with one end of a
//! socketpair; the new one validates its config and TLS material and says
//! `Ready` (or `Failed`, and the old one carries on untouched); the old one
//! sends its listening sockets; the new one starts its shards on them and
//! says `Serving`; the old one stops accepting. Never sends secrets yet:
//! established connections stay with the old process in this stage.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use serde::{Deserialize, Serialize};

use super::fdpass;

/// The environment variable that carries the channel's descriptor number.
pub const ENV_FD: &str = "HOLDFAST_UPGRADE_FD";
/// 253 connection snapshots with certificates and partial messages fit.
const MAX_MSG: usize = 256 << 20;
/// The layout of [`super::snapshot::ConnSnapshot`] in a `Conns` batch and
/// the messages after `Serving`. Bump it whenever either changes: an old
/// process refuses a successor that reports another number (stop and start
/// instead). 2: `Adopted` progress reports. 3: session-ticket keys.
/// 4: held messages of a tunnel without a WSM.
pub const SNAPSHOT_FORMAT: u32 = 4;
/// First payload byte of a binary `Conns` batch (JSON starts with `{`).
const CONNS_TAG: u8 = b'C';

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// New -> old: config and TLS material loaded; send the listeners.
    Ready {
        pid: u32,
        shards: usize,
        /// [`SNAPSHOT_FORMAT`] of the new binary (0 if it predates the field).
        #[serde(default)]
        snapshot_format: u32,
    },
    /// New -> old: start-up failed; the old process keeps serving.
    Failed { error: String },
    /// Old -> new, with the listening sockets attached, and the session-
    /// ticket keys so that the old process's tickets resume in the new one.
    Listeners {
        count: usize,
        #[serde(default)]
        ticket_keys: Vec<crate::tls::tickets::ExportedKey>,
        /// The old process's device CA set (`DeviceVerifier::ca_digest`,
        /// hex): a successor whose CAs differ does not take the ticket
        /// keys, so no session verified under other CAs resumes.
        #[serde(default)]
        ca_digest: Option<String>,
    },
    /// New -> old: accepting on the inherited sockets.
    Serving { pid: u32, listen: String },
    /// Old -> new: established connections, their sockets attached in order.
    Conns { conns: Vec<super::snapshot::ConnSnapshot> },
    /// Old -> new: every connection has been sent; the old process exits.
    Done,
    /// New -> old: connections adopted so far that serve again (or failed
    /// to); the old process paces its releases by it.
    Adopted { total: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("the new process failed: {0}")]
    NewFailed(String),
    #[error("the new process exited before it was ready ({0})")]
    NewExited(String),
    #[error("the new process did not answer in {0:?}")]
    Timeout(Duration),
    #[error("unexpected message {0:?}")]
    Unexpected(Box<Msg>),
    #[error("channel: {0}")]
    Channel(#[from] fdpass::FdPassError),
    #[error("cannot start the new binary {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("bad message: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("bad connection batch: {0}")]
    Snapshot(String),
    #[error("the new binary speaks snapshot format {theirs}, this one {ours}: stop and start it instead of upgrading")]
    Incompatible { ours: u32, theirs: u32 },
}

/// Encodes `msg` into `out` (cleared first).
fn encode_into(msg: &Msg, mut out: Vec<u8>) -> (Vec<u8>, Result<(), HandoffError>) {
    out.clear();
    match msg {
        Msg::Conns { conns } => {
            // Room up front, so that growing does not leave copies of secrets
            // behind in freed memory (the buffer is zeroed after use).
            out.reserve(1 + conns.len() * 4096);
            out.push(CONNS_TAG);
            let empty = Vec::new();
            match postcard::to_extend(conns, out) {
                Ok(v) => (v, Ok(())),
                Err(e) => (empty, Err(HandoffError::Snapshot(e.to_string()))),
            }
        }
        other => {
            let r = serde_json::to_writer(&mut out, other).map_err(HandoffError::from);
            (out, r)
        }
    }
}

#[cfg(test)]
fn encode(msg: &Msg) -> Result<Vec<u8>, HandoffError> {
    let (v, r) = encode_into(msg, Vec::new());
    r.map(|()| v)
}

thread_local! {
    /// Each thread's message buffer, reused so that a stream of large batches
    /// does not map (and the kernel zero) fresh memory for every one. It is
    /// zeroed after every use: it held traffic secrets.
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Decodes one channel message (a `Conns` batch or a JSON control message).
pub fn decode(payload: &[u8]) -> Result<Msg, HandoffError> {
    match payload.split_first() {
        Some((&CONNS_TAG, rest)) => {
            postcard::from_bytes(rest).map(|conns| Msg::Conns { conns }).map_err(|e| HandoffError::Snapshot(e.to_string()))
        }
        _ => Ok(serde_json::from_slice(payload)?),
    }
}

pub fn send(ch: &UnixStream, msg: &Msg, fds: &[std::os::fd::RawFd]) -> Result<(), HandoffError> {
    let buf = BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
    let (mut payload, encoded) = encode_into(msg, buf);
    let res = encoded.and_then(|()| fdpass::send(ch, &payload, fds).map_err(HandoffError::from));
    // Connection messages carry traffic secrets.
    zeroize::Zeroize::zeroize(&mut payload);
    BUF.with(|b| *b.borrow_mut() = payload);
    res
}

pub fn recv(ch: &UnixStream) -> Result<(Msg, Vec<OwnedFd>), HandoffError> {
    let mut payload = BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
    let got = fdpass::recv_into(ch, MAX_MSG, &mut payload);
    let res = got.map_err(HandoffError::from).and_then(|fds| decode(&payload).map(|m| (m, fds)));
    zeroize::Zeroize::zeroize(&mut payload);
    BUF.with(|b| *b.borrow_mut() = payload);
    res
}

/// What an upgrade achieved, for the operator.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub new_pid: u32,
    pub listeners: usize,
    pub elapsed: Duration,
}

/// Old side: starts `exe` and hands it the listening sockets. On any error
/// the new process is killed and the old one is unchanged.
pub fn hand_over_listeners(
    exe: &Path,
    config: &Path,
    listeners: &[OwnedFd],
    (ticket_keys, ca_digest): (Vec<crate::tls::tickets::ExportedKey>, Option<String>),
    timeout: Duration,
) -> Result<(Outcome, Child, UnixStream), HandoffError> {
    let start = Instant::now();
    let (ours, theirs) = UnixStream::pair().map_err(|e| HandoffError::Channel(e.into()))?;
    let their_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg("--config").arg(config).env(ENV_FD, their_fd.to_string());
    // The child inherits the channel because its end loses close-on-exec
    // here, in the parent, just for the spawn (holdfast starts no other
    // process). Not in a `pre_exec` hook: with one, std forks a copy of this
    // whole process (page tables of every connection's memory, marked
    // copy-on-write, and 15,000 descriptors) where without one it uses
    // posix_spawn, which shares the memory until exec. The fork stalled
    // every device of the old process for 30-40 ms at the upgrade's start.
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| HandoffError::Channel(fdpass::FdPassError::Sys(e)))?;
    let mut child = cmd.spawn().map_err(|e| HandoffError::Spawn(exe.display().to_string(), e))?;
    drop(theirs);
    let fail = |child: &mut Child, e: HandoffError| {
        let _ = child.kill();
        let _ = child.wait();
        e
    };
    let _ = ours.set_read_timeout(Some(timeout));
    let reply = |child: &mut Child| -> Result<Msg, HandoffError> {
        match recv(&ours) {
            Ok((m, _)) => Ok(m),
            Err(HandoffError::Channel(fdpass::FdPassError::Closed)) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(HandoffError::NewExited(status))
            }
            Err(HandoffError::Channel(fdpass::FdPassError::Io(e))) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(HandoffError::Timeout(timeout))
            }
            Err(HandoffError::Channel(fdpass::FdPassError::Sys(nix::Error::EAGAIN))) => Err(HandoffError::Timeout(timeout)),
            Err(e) => Err(e),
        }
    };
    let new_pid = match reply(&mut child) {
        Ok(Msg::Ready { snapshot_format, .. }) if snapshot_format != SNAPSHOT_FORMAT => {
            return Err(fail(&mut child, HandoffError::Incompatible { ours: SNAPSHOT_FORMAT, theirs: snapshot_format }));
        }
        Ok(Msg::Ready { pid, .. }) => pid,
        Ok(Msg::Failed { error }) => {
            let _ = child.wait();
            return Err(HandoffError::NewFailed(error));
        }
        Ok(other) => return Err(fail(&mut child, HandoffError::Unexpected(Box::new(other)))),
        Err(e) => return Err(fail(&mut child, e)),
    };
    let fds: Vec<_> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    if let Err(e) = send(&ours, &Msg::Listeners { count: fds.len(), ticket_keys, ca_digest }, &fds) {
        return Err(fail(&mut child, e));
    }
    match reply(&mut child) {
        Ok(Msg::Serving { .. }) => {
            let _ = ours.set_read_timeout(None);
            Ok((Outcome { new_pid, listeners: fds.len(), elapsed: start.elapsed() }, child, ours))
        }
        Ok(Msg::Failed { error }) => {
            let _ = child.wait();
            Err(HandoffError::NewFailed(error))
        }
        Ok(other) => Err(fail(&mut child, HandoffError::Unexpected(Box::new(other)))),
        Err(e) => Err(fail(&mut child, e)),
    }
}

/// New side: the channel from the old process, if this process was started
/// by an upgrade (the variable is removed so a later upgrade starts clean).
pub fn inherited_channel() -> Option<UnixStream> {
    let fd: i32 = std::env::var(ENV_FD).ok()?.parse().ok()?;
    // SAFETY: only called once, at start-up, before any other code could
    // have taken this descriptor; it was left open for us by the old process.
    unsafe { std::env::remove_var(ENV_FD) };
    let ch = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // Close-on-exec again, so the next upgrade's child does not inherit it.
    let _ = nix::fcntl::fcntl(&ch, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    Some(ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_roundtrip_with_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send(&a, &Msg::Listeners { count: 1, ticket_keys: Vec::new(), ca_digest: None }, &[l.as_raw_fd()]).unwrap();
        let (m, fds) = recv(&b).unwrap();
        assert!(matches!(m, Msg::Listeners { count: 1, .. }));
        let inherited = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(inherited.local_addr().unwrap(), l.local_addr().unwrap());
        let j = serde_json::to_string(&Msg::Ready { pid: 7, shards: 2, snapshot_format: 1 }).unwrap();
        assert_eq!(j, r#"{"type":"ready","pid":7,"shards":2,"snapshot_format":1}"#);
        let old: Msg = serde_json::from_str(r#"{"type":"ready","pid":7,"shards":2}"#).unwrap();
        assert!(matches!(old, Msg::Ready { snapshot_format: 0, .. }));
    }

    fn snapshot(id: u128) -> crate::upgrade::snapshot::ConnSnapshot {
        use crate::tls::record::{DirectionState, RecordState, Version};
        let dir = |seq| DirectionState {
            secret: crate::tls::keys::Secret::new(&[7; 32]).unwrap(),
            key: crate::tls::keys::Key::new(&[9; 16]).unwrap(),
            iv: [3; 12],
            seq,
        };
        let mut decoder = crate::ws::frame::Decoder::new(1 << 20, true);
        let mut events = Vec::new();
        // A masked text frame header announcing 5 bytes, and 2 of them.
        decoder.feed(&[0x81, 0x85, 1, 2, 3, 4, b'h' ^ 1, b'e' ^ 2], &mut events).unwrap();
        assert!(events.is_empty() && decoder.in_progress());
        crate::upgrade::snapshot::ConnSnapshot {
            id: crate::identity::ConnectionId(id),
            addr: "127.0.0.1:40000".into(),
            record: RecordState {
                version: Version::Tls13,
                suite: crate::tls::keys::Suite::Aes128Gcm,
                rx: dir(5),
                tx: dir(u64::MAX - 1),
                received_close_notify: false,
                sent_close_notify: false,
                key_update_after: 1000,
                handshake_buf: vec![4, 0],
            },
            decoder: Some(decoder),
            max_message: 1 << 20,
            rx: vec![0x17, 0x03, 0x03, 0x00],
            resume: crate::upgrade::snapshot::Resume {
                chain: vec![vec![0x30; 700], vec![0x30; 800]],
                request: crate::ws::upgrade::UpgradeRequest { path: "/d".into(), ..Default::default() },
                subprotocol: Some("v1".into()),
            },
            idle_ms: 1234,
            held: vec![(false, b"held".to_vec())],
        }
    }

    #[test]
    fn connection_batches_are_binary_and_roundtrip_with_their_sockets() {
        let (a, b) = UnixStream::pair().unwrap();
        let socks: Vec<_> = (0..3).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let conns: Vec<_> = (0..3).map(|i| snapshot(u128::MAX - i)).collect();
        let payload = encode(&Msg::Conns { conns: conns.clone() }).unwrap();
        assert_eq!(payload[0], b'C');
        // The certificates (1,500 bytes each) plus a few hundred bytes of state.
        assert!(payload.len() < 3 * (1500 + 300), "compact: {} bytes for three", payload.len());
        let raw: Vec<_> = socks.iter().map(|s| s.as_raw_fd()).collect();
        send(&a, &Msg::Conns { conns: conns.clone() }, &raw).unwrap();
        let (m, fds) = recv(&b).unwrap();
        let Msg::Conns { conns: got } = m else { panic!("not a batch") };
        assert_eq!(fds.len(), 3);
        for (g, c) in got.iter().zip(&conns) {
            assert_eq!(g.id, c.id);
            assert_eq!(g.record.tx.seq, c.record.tx.seq);
            assert_eq!(g.record.rx.secret, c.record.rx.secret);
            assert_eq!(g.decoder, c.decoder);
            assert_eq!(g.rx, c.rx);
            assert_eq!(g.resume, c.resume);
            assert_eq!(g.idle_ms, 1234);
        }
        // A damaged batch is an error, not a panic or a partial adoption.
        assert!(matches!(decode(&payload[..payload.len() / 2]), Err(HandoffError::Snapshot(_))));
    }

    #[test]
    fn a_new_binary_that_exits_is_reported_and_nothing_changes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fds = vec![OwnedFd::from(l.try_clone().unwrap())];
        let e =
            hand_over_listeners(Path::new("/bin/false"), Path::new("/nonexistent.toml"), &fds, (Vec::new(), None), Duration::from_secs(5))
                .unwrap_err();
        assert!(matches!(e, HandoffError::NewExited(_)), "{e}");
        // The old listener is untouched.
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(l.accept().is_ok());
    }

    #[test]
    fn a_silent_new_binary_times_out_and_is_killed() {
        // A binary that takes its arguments and then says nothing: the old
        // side must give up at its timeout and kill it (not wait for it).
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let exe = dir.path().join("silent");
        std::fs::write(&exe, format!("#!/bin/sh\necho $$ > {}\nexec sleep 30\n", pid_file.display())).unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let fds: Vec<OwnedFd> = Vec::new();
        let start = Instant::now();
        let e = hand_over_listeners(&exe, Path::new("unused.toml"), &fds, (Vec::new(), None), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, HandoffError::Timeout(_)), "the timeout path, not an early exit: {e}");
        assert!(start.elapsed() >= Duration::from_millis(300), "gave up before its timeout");
        assert!(start.elapsed() < Duration::from_secs(5), "waited for the child instead of killing it");
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the silent child was killed and reaped");
    }
}
