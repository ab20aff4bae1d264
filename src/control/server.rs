//! The control socket's server side: a thread that accepts operators.
//!
//! Owns: the Unix socket (made beside its final path and renamed over it,
//! so a live upgrade's successor takes the path over without a gap, mode
//! 0600 in a directory it creates 0700 if missing), the peer check (the
//! peer's uid from SO_PEERCRED must be this process's or root's: anyone
//! else is refused and counted in the log), reading one bounded request
//! line with a deadline, and passing it to the serve loop with a channel
//! for the answer. Never acts on a request itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::{Request, Response};

/// The longest request line read (a whole fleet blocklist of a million
/// entries is about 70 MB of JSON; only root or the service's user get
/// this far).
const MAX_REQUEST: u64 = 256 << 20;
/// Operators served at once; more get "busy".
const MAX_CLIENTS: usize = 16;
/// How long the serve loop may take to answer (a reload, a wide query).
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// A request waiting for the serve loop, with where its answer goes.
pub type Pending = (Request, Sender<Response>);

/// The bound socket: its path and the inode it has there (to tell whether
/// another process took the path over).
pub struct ControlServer {
    pub path: PathBuf,
    inode: u64,
}

impl ControlServer {
    /// Binds `path` and serves it on a thread; requests arrive on the
    /// returned channel.
    pub fn start(path: &Path) -> std::io::Result<(ControlServer, Receiver<Pending>)> {
        let (tx, rx) = crossbeam_channel::bounded(MAX_CLIENTS);
        let (listener, inode) = bind(path)?;
        let busy = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new().name("holdfast-control".into()).spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = reply(&conn, &Response::failed("busy: too many control connections at once"));
                    continue;
                }
                let (tx, busy) = (tx.clone(), busy.clone());
                let _ = std::thread::Builder::new().name("holdfast-ctl-conn".into()).spawn(move || {
                    serve_one(conn, &tx);
                    busy.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })?;
        Ok((ControlServer { path: path.to_path_buf(), inode }, rx))
    }

    /// Whether the path still names this server's socket (a live
    /// upgrade's successor renames its own over it).
    pub fn owns_path(&self) -> bool {
        std::fs::symlink_metadata(&self.path).map(|m| m.ino() == self.inode).unwrap_or(false)
    }
}

/// Binds a socket beside `path` (mode 0600) and renames it over `path`.
fn bind(path: &Path) -> std::io::Result<(UnixListener, u64)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "control.sock".into());
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    let inode = std::fs::symlink_metadata(path)?.ino();
    Ok((listener, inode))
}

/// Whether the peer may use the socket: this process's user or root.
fn allowed(conn: &UnixStream) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(conn, PeerCredentials).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!("uid {} (pid {}) is neither root nor this service's user (uid {me})", cred.uid(), cred.pid()))
    }
}

fn serve_one(conn: UnixStream, tx: &Sender<Pending>) {
    if let Err(why) = allowed(&conn) {
        tracing::warn!(why = %why, "control socket: refused a peer");
        let _ = reply(&conn, &Response::failed("not allowed: only root or the service's user may use the control socket"));
        return;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line);
    let answer = match read {
        Err(e) => Response::failed(format!("reading the request: {e}")),
        Ok(_) if !line.ends_with('\n') => Response::failed(format!("a request is one JSON line of at most {MAX_REQUEST} bytes")),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::failed(format!("not a request: {e}")),
            Ok(req) => {
                let (rtx, rrx) = crossbeam_channel::bounded(1);
                match tx.send_timeout((req, rtx), Duration::from_secs(5)) {
                    Err(_) => Response::failed("holdfast is not taking requests (stopping?)"),
                    Ok(()) => rrx.recv_timeout(ANSWER_WAIT).unwrap_or_else(|_| Response::failed("no answer in time")),
                }
            }
        },
    };
    let _ = reply(&conn, &answer);
}

fn reply(mut conn: &UnixStream, r: &Response) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    b.push(b'\n');
    conn.write_all(&b)
}
