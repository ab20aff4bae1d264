//! The systemd notify protocol (sd_notify), written out by hand.
//!
//! Owns: sending state lines ("READY=1", "MAINPID=<pid>", "STATUS=...") as
//! one datagram to the socket named by `NOTIFY_SOCKET` (a path, or an
//! abstract name when it starts with '@'). With `NotifyAccess=all` a live
//! upgrade's new process announces itself as the service's main process, so
//! systemd follows it instead of treating the old one's exit as a stop.
//! Does nothing when `NOTIFY_SOCKET` is unset.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` to systemd; Ok(false) when not started by systemd.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound()?;
    let addr = match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None => SocketAddr::from_pathname(&target)?,
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// This process serves: tell systemd it is ready and is the main process.
pub fn ready(status: &str) {
    let msg = format!("READY=1\nMAINPID={}\nSTATUS={status}", std::process::id());
    if let Err(e) = notify(&msg) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_fake_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        // SAFETY: tests in this binary do not read NOTIFY_SOCKET concurrently.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        ready("serving");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.contains("READY=1"), "{msg}");
        assert!(msg.contains(&format!("MAINPID={}", std::process::id())), "{msg}");
        assert!(!notify("X=1").unwrap(), "no socket, no message");
    }
}
