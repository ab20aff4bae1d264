//! The control socket's client side (`holdfast ctl`, `holdfast reload`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Request, Response};

/// Sends one request and waits up to `timeout` for its answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!("cannot reach holdfast's control socket {}: {e} (is holdfast running, and is this its [control] socket?)", socket.display())
    })?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    // holdfast may answer (a refusal) and close before reading the request:
    // its answer is still there to read when the write fails.
    let wrote = s.write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(&s).read_line(&mut answer);
    if answer.is_empty()
        && let Err(e) = wrote
    {
        return Err(format!("{}: {e}", socket.display()));
    }
    read.map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!("no answer within {} s", timeout.as_secs()),
        _ => e.to_string(),
    })?;
    if answer.is_empty() {
        return Err("holdfast closed the control connection without an answer (is this user allowed? the service's user or root)".into());
    }
    serde_json::from_str(&answer).map_err(|e| format!("a bad answer from holdfast: {e}"))
}
