//! Both sides of a live upgrade, around a running proxy.
//!
//! Owns: on the old side, starting the successor on SIGUSR2, stopping
//! accepting, collecting the tunnels' snapshots and sockets and sending them
//! in batches of at most 253, taking everything back if the successor dies,
//! and deciding when the old process may exit; on the new side, the start-up
//! handshake (Ready, Listeners, Serving) and adopting connections until Done.
//! Never touches a connection itself: shards do, over their control channels.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::fdpass::MAX_FDS;
use super::handoff::{self, Msg};
use crate::config::Config;
use crate::proxy::{self, Running};
use crate::shard::Handed;

/// The old side: one per running process.
pub struct Upgrader {
    exe: PathBuf,
    config: PathBuf,
    /// Where the outcome is written for `holdfast upgrade` (if configured).
    report: Option<PathBuf>,
    started: Option<std::time::Instant>,
    new_pid: u32,
    successor: Option<Child>,
    channel: Option<UnixStream>,
    sink: Sender<Handed>,
    moved: Receiver<Handed>,
    sent: u64,
}

impl Upgrader {
    pub fn new(exe: PathBuf, config: PathBuf, pid_file: Option<&Path>) -> Upgrader {
        let (sink, moved) = crossbeam_channel::unbounded();
        let report = pid_file.map(report_path);
        Upgrader { exe, config, report, started: None, new_pid: 0, successor: None, channel: None, sink, moved, sent: 0 }
    }

    fn write_report(&self, r: &Report) {
        if let Some(path) = &self.report {
            let tmp = path.with_extension("tmp");
            let ok =
                serde_json::to_vec_pretty(r).ok().and_then(|b| std::fs::write(&tmp, b).ok()).and_then(|_| std::fs::rename(&tmp, path).ok());
            if ok.is_none() {
                tracing::warn!(path = %path.display(), "cannot write the upgrade report");
            }
        }
    }

    /// Whether connections are being handed over (the successor is serving).
    pub fn in_progress(&self) -> bool {
        self.successor.is_some()
    }

    /// How often [`Upgrader::tick`] should run.
    pub fn interval(&self) -> Duration {
        if self.in_progress() { Duration::from_millis(5) } else { Duration::from_millis(500) }
    }

    /// SIGUSR2: start the successor and hand it the listeners, then the
    /// connections. On failure nothing changes here.
    pub fn start(&mut self, running: &mut Running) {
        if self.in_progress() {
            tracing::warn!("upgrade already under way");
            return;
        }
        tracing::info!(exe = %self.exe.display(), "upgrade requested");
        self.started = Some(std::time::Instant::now());
        match handoff::hand_over_listeners(&self.exe, &self.config, &running.listeners, Duration::from_secs(30)) {
            Ok((outcome, child, ch)) => {
                self.new_pid = outcome.new_pid;
                running.stop_accepting();
                running.hand_off(self.sink.clone());
                self.successor = Some(child);
                self.channel = Some(ch);
                tracing::info!(
                    new_pid = outcome.new_pid,
                    listeners = outcome.listeners,
                    elapsed_ms = outcome.elapsed.as_millis() as u64,
                    connections = running.connections(),
                    "upgrade: listeners handed over; moving connections"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                self.write_report(&Report::failed(e.to_string(), running.connections()));
            }
        }
    }

    /// Moves what is ready; returns true when this process should exit.
    pub fn tick(&mut self, running: &mut Running) -> bool {
        // If the successor dies, take the listening sockets back and keep
        // every connection that had already let go here.
        if let Some(status) = self.successor.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            tracing::error!(%status, "the new process exited; accepting here again");
            self.write_report(&Report::failed(format!("the new process exited ({status}) during the handover"), running.connections()));
            running.resume_accepting();
            self.successor = None;
            self.channel = None;
        }
        let Some(ch) = self.channel.as_ref() else {
            let back: Vec<_> = self.moved.try_iter().collect();
            if !back.is_empty() {
                tracing::warn!(connections = back.len(), "re-adopting connections the failed upgrade had released");
                running.adopter().adopt(back);
            }
            return false;
        };
        loop {
            let batch: Vec<Handed> = self.moved.try_iter().take(MAX_FDS).collect();
            if batch.is_empty() {
                break;
            }
            let (conns, fds): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let msg = Msg::Conns { conns };
            match handoff::send(ch, &msg, &raw) {
                Ok(()) => self.sent += fds.len() as u64,
                Err(e) => {
                    tracing::error!(error = %e, connections = fds.len(), "could not send connections; keeping them here");
                    if let Msg::Conns { conns } = msg {
                        running.adopter().adopt(conns.into_iter().zip(fds).collect());
                    }
                }
            }
        }
        if running.accepting() == 0 && running.connections() == 0 && self.moved.is_empty() {
            let _ = handoff::send(ch, &Msg::Done, &[]);
            let elapsed_ms = self.started.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
            tracing::info!(moved = self.sent, elapsed_ms, "upgrade: every connection handed over; exiting");
            self.write_report(&Report {
                status: "ok".into(),
                old_pid: std::process::id(),
                new_pid: self.new_pid,
                connections_moved: self.sent,
                connections_kept: 0,
                elapsed_ms,
                error: None,
            });
            return true;
        }
        false
    }
}

/// What an upgrade did, written for `holdfast upgrade` next to the pid file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// "ok" or "failed".
    pub status: String,
    pub old_pid: u32,
    pub new_pid: u32,
    pub connections_moved: u64,
    /// Connections still held by the old process (after a failure).
    pub connections_kept: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

impl Report {
    fn failed(error: String, kept: u64) -> Report {
        Report {
            status: "failed".into(),
            old_pid: std::process::id(),
            new_pid: 0,
            connections_moved: 0,
            connections_kept: kept,
            elapsed_ms: 0,
            error: Some(error),
        }
    }
}

/// `<pid_file>.upgrade.json`.
pub fn report_path(pid_file: &Path) -> PathBuf {
    let mut s = pid_file.as_os_str().to_owned();
    s.push(".upgrade.json");
    PathBuf::from(s)
}

/// Writes this process's pid (atomically).
pub fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(tmp, path)
}

/// `holdfast upgrade`: signals the process in `pid_file` and waits for the
/// outcome report. Returns the report, or why there is none.
pub fn request(pid_file: &Path, timeout: Duration) -> Result<Report, String> {
    let text = std::fs::read_to_string(pid_file).map_err(|e| format!("{}: {e}", pid_file.display()))?;
    let pid: i32 = text.trim().parse().map_err(|_| format!("{}: not a pid", pid_file.display()))?;
    let report = report_path(pid_file);
    let _ = std::fs::remove_file(&report);
    let target = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGUSR2).map_err(|e| format!("cannot signal pid {pid}: {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(b) = std::fs::read(&report) {
            return serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", report.display()));
        }
        if nix::sys::signal::kill(target, None).is_err() {
            // Exited: give the report a moment to appear (it is written first).
            std::thread::sleep(Duration::from_millis(100));
            return std::fs::read(&report)
                .map_err(|_| format!("pid {pid} exited without a report"))
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("no outcome from pid {pid} within {timeout:?}"))
}

/// The new side: started by an upgrade with `ch`, take over the listeners
/// and then the connections. Errors are also reported to the old process.
pub fn take_over(ch: UnixStream, cfg: Config) -> Result<Running, Vec<String>> {
    let failed = |errs: Vec<String>| {
        let _ = handoff::send(&ch, &Msg::Failed { error: errs.join("; ") }, &[]);
        errs
    };
    if let Err(es) = crate::tls::server::TlsContext::load(&cfg.tls) {
        return Err(failed(es.iter().map(|e| e.to_string()).collect()));
    }
    let pid = std::process::id();
    handoff::send(&ch, &Msg::Ready { pid, shards: cfg.shard_cpus.len() }, &[]).map_err(|e| vec![e.to_string()])?;
    let fds = match handoff::recv(&ch) {
        Ok((Msg::Listeners { count }, fds)) if count == fds.len() => fds,
        Ok((m, _)) => return Err(failed(vec![format!("unexpected message {:?}", std::mem::discriminant(&m))])),
        Err(e) => return Err(failed(vec![e.to_string()])),
    };
    let running = proxy::start_with(cfg, proxy::Listeners::Inherited(fds)).map_err(failed)?;
    let _ = handoff::send(&ch, &Msg::Serving { pid, listen: running.listen.to_string() }, &[]);
    // Established connections follow, in batches, until Done.
    let adopter = running.adopter();
    let _ = std::thread::Builder::new().name("holdfast-adopt".into()).spawn(move || {
        let mut adopted = 0usize;
        loop {
            match handoff::recv(&ch) {
                Ok((Msg::Conns { conns }, fds)) if conns.len() == fds.len() => {
                    adopted += conns.len();
                    adopter.adopt(conns.into_iter().zip(fds).collect());
                }
                Ok((Msg::Done, _)) => {
                    tracing::info!(adopted, "upgrade: every connection taken over");
                    return;
                }
                Ok((m, _)) => tracing::error!(msg = ?std::mem::discriminant(&m), "unexpected upgrade message"),
                Err(e) => {
                    tracing::warn!(error = %e, adopted, "upgrade channel closed");
                    return;
                }
            }
        }
    });
    Ok(running)
}

/// The binary an upgrade starts: `HOLDFAST_UPGRADE_EXE` if set (a new
/// version installed under another path), else the path this process was
/// started from (taken at start-up, before an operator replaces the file).
pub fn own_exe() -> PathBuf {
    if let Some(p) = std::env::var_os("HOLDFAST_UPGRADE_EXE") {
        return PathBuf::from(p);
    }
    std::env::current_exe().unwrap_or_else(|_| Path::new("holdfast").to_path_buf())
}
