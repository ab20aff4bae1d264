//! Messages of the live upgrade's private channel, and both sides of the
//! listener handoff.
//!
//! Owns: the message set (JSON payloads carried by [`super::fdpass`]) and
//! the sequence: the old process starts the new binary with one end of a
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

use serde::{Deserialize, Serialize};

use super::fdpass;

/// The environment variable that carries the channel's descriptor number.
pub const ENV_FD: &str = "HOLDFAST_UPGRADE_FD";
/// 253 connection snapshots with certificates and partial messages fit.
const MAX_MSG: usize = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// New -> old: config and TLS material loaded; send the listeners.
    Ready { pid: u32, shards: usize },
    /// New -> old: start-up failed; the old process keeps serving.
    Failed { error: String },
    /// Old -> new, with the listening sockets attached.
    Listeners { count: usize },
    /// New -> old: accepting on the inherited sockets.
    Serving { pid: u32, listen: String },
    /// Old -> new: established connections, their sockets attached in order.
    Conns { conns: Vec<super::snapshot::ConnSnapshot> },
    /// Old -> new: every connection has been sent; the old process exits.
    Done,
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
}

pub fn send(ch: &UnixStream, msg: &Msg, fds: &[std::os::fd::RawFd]) -> Result<(), HandoffError> {
    let mut payload = serde_json::to_vec(msg)?;
    let res = fdpass::send(ch, &payload, fds);
    // Connection messages carry traffic secrets.
    zeroize::Zeroize::zeroize(&mut payload);
    res?;
    Ok(())
}

pub fn recv(ch: &UnixStream) -> Result<(Msg, Vec<OwnedFd>), HandoffError> {
    let (mut payload, fds) = fdpass::recv(ch, MAX_MSG)?;
    let msg = serde_json::from_slice(&payload);
    zeroize::Zeroize::zeroize(&mut payload);
    Ok((msg?, fds))
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
    timeout: Duration,
) -> Result<(Outcome, Child, UnixStream), HandoffError> {
    let start = Instant::now();
    let (ours, theirs) = UnixStream::pair().map_err(|e| HandoffError::Channel(e.into()))?;
    let their_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg("--config").arg(config).env(ENV_FD, their_fd.to_string());
    // SAFETY: between fork and exec we only clear close-on-exec on the
    // channel's descriptor (async-signal-safe fcntl).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if nix::libc::fcntl(their_fd, nix::libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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
        Ok(Msg::Ready { pid, .. }) => pid,
        Ok(Msg::Failed { error }) => {
            let _ = child.wait();
            return Err(HandoffError::NewFailed(error));
        }
        Ok(other) => return Err(fail(&mut child, HandoffError::Unexpected(Box::new(other)))),
        Err(e) => return Err(fail(&mut child, e)),
    };
    let fds: Vec<_> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    if let Err(e) = send(&ours, &Msg::Listeners { count: fds.len() }, &fds) {
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
        send(&a, &Msg::Listeners { count: 1 }, &[l.as_raw_fd()]).unwrap();
        let (m, fds) = recv(&b).unwrap();
        assert!(matches!(m, Msg::Listeners { count: 1 }));
        let inherited = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(inherited.local_addr().unwrap(), l.local_addr().unwrap());
        let j = serde_json::to_string(&Msg::Ready { pid: 7, shards: 2 }).unwrap();
        assert_eq!(j, r#"{"type":"ready","pid":7,"shards":2}"#);
    }

    #[test]
    fn a_new_binary_that_exits_is_reported_and_nothing_changes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fds = vec![OwnedFd::from(l.try_clone().unwrap())];
        let e = hand_over_listeners(Path::new("/bin/false"), Path::new("/nonexistent.toml"), &fds, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, HandoffError::NewExited(_)), "{e}");
        // The old listener is untouched.
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(l.accept().is_ok());
    }

    #[test]
    fn a_silent_new_binary_times_out_and_is_killed() {
        let fds: Vec<OwnedFd> = Vec::new();
        let start = Instant::now();
        let e = hand_over_listeners(Path::new("/bin/sleep"), Path::new("30"), &fds, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, HandoffError::Timeout(_) | HandoffError::NewExited(_)), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
