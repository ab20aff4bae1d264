//! Both sides of a live upgrade, around a running proxy.
//!
//! Owns: on the old side, starting the successor on SIGUSR2, stopping
//! accepting, collecting the tunnels' snapshots and sockets and sending them
//! in batches of at most 253, taking everything back if the successor dies,
//! and deciding when the old process may exit; on the new side, the start-up
//! handshake (Ready, Listeners, Serving) and adopting connections until Done.
//! Never touches a connection itself: shards do, over their control channels.
#![forbid(unsafe_code)]

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::Receiver;

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
    sender: Option<Arc<Sent>>,
    /// Shards' handed-over counters when this upgrade began.
    handed_before: u64,
}

/// What the sender thread has done with the connections shards released.
#[derive(Default)]
struct Sent {
    /// Sent to the new process, or taken back after a failed send.
    settled: AtomicU64,
    sent: AtomicU64,
    /// Set when the new process is gone: take everything back instead.
    broken: AtomicBool,
}

impl Upgrader {
    pub fn new(exe: PathBuf, config: PathBuf, pid_file: Option<&Path>) -> Upgrader {
        let report = pid_file.map(report_path);
        Upgrader { exe, config, report, started: None, new_pid: 0, successor: None, channel: None, sender: None, handed_before: 0 }
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
        let outcome = handoff::hand_over_listeners(
            &self.exe,
            &self.config,
            &running.listeners,
            (running.tickets.export(), Some(crate::identity::hex(&running.generation.tls.verifier.ca_digest()))),
            Duration::from_secs(30),
        );
        let (outcome, child, ch) = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                self.write_report(&Report::failed(e.to_string(), running.connections()));
                return;
            }
        };
        let writer = match ch.try_clone() {
            Ok(w) => w,
            Err(e) => {
                // The successor serves the listeners already; it owns no
                // connection yet. Take the listeners back and stop it.
                tracing::error!(error = %e, "cannot share the upgrade channel; calling the upgrade off");
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                self.write_report(&Report::failed(e.to_string(), running.connections()));
                return;
            }
        };
        self.new_pid = outcome.new_pid;
        self.handed_before = running.handed_over();
        running.stop_accepting();
        // A fresh channel per attempt: its sender thread ends once every
        // shard has let go of the sink (upgrade done or called off).
        let (sink, moved) = crossbeam_channel::unbounded();
        let sent = Arc::new(Sent::default());
        let adopter = running.adopter();
        let s = sent.clone();
        let spawned = std::thread::Builder::new().name("holdfast-upgrade".into()).spawn(move || send_batches(writer, moved, s, adopter));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the upgrade sender; calling the upgrade off");
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            running.resume_accepting();
            self.write_report(&Report::failed(e.to_string(), running.connections()));
            return;
        }
        let flight = Arc::new(crate::shard::pace::Flight::new(running.upgrade_window));
        // The new process reports how many it has adopted; the shards hold
        // back while too many are between the two processes.
        let (reader, f) = (ch.try_clone(), flight.clone());
        let heard = reader.map_err(|e| e.to_string()).and_then(|r| {
            std::thread::Builder::new().name("holdfast-upgrade-acks".into()).spawn(move || hear_progress(r, f)).map_err(|e| e.to_string())
        });
        if let Err(e) = heard {
            tracing::warn!(error = %e, "cannot follow the new process's progress; the hand-over is paced per shard only");
            flight.adopted.store(u64::MAX / 2, Ordering::Relaxed);
        }
        running.hand_off(sink, flight);
        self.sender = Some(sent);
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

    /// Watches the successor and the hand-over; returns true when this
    /// process should exit (everything has moved).
    pub fn tick(&mut self, running: &mut Running) -> bool {
        // If the successor dies, take the listening sockets back and keep
        // every connection that had not moved yet; the sender thread gives
        // back what it still holds.
        if let Some(status) = self.successor.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            tracing::error!(%status, "the new process exited; accepting here again");
            self.write_report(&Report::failed(format!("the new process exited ({status}) during the handover"), running.connections()));
            if let Some(s) = self.sender.take() {
                s.broken.store(true, Ordering::SeqCst);
            }
            running.resume_accepting();
            self.successor = None;
            self.channel = None;
            return false;
        }
        let (Some(ch), Some(sent)) = (self.channel.as_ref(), self.sender.as_ref()) else {
            return false;
        };
        // Done when every shard has stopped accepting and let go of every
        // connection, and the sender has sent each one it was given.
        let released = running.handed_over().saturating_sub(self.handed_before);
        if running.accepting() == 0 && running.connections() == 0 && sent.settled.load(Ordering::SeqCst) >= released {
            let moved = sent.sent.load(Ordering::SeqCst);
            let _ = handoff::send(ch, &Msg::Done, &[]);
            let elapsed_ms = self.started.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
            tracing::info!(moved, elapsed_ms, "upgrade: every connection handed over; exiting");
            self.write_report(&Report {
                status: "ok".into(),
                old_pid: std::process::id(),
                new_pid: self.new_pid,
                connections_moved: moved,
                connections_kept: 0,
                elapsed_ms,
                error: None,
            });
            return true;
        }
        false
    }
}

/// The old side's progress reader: records how many connections the new
/// process has adopted. Ends when the channel closes.
fn hear_progress(ch: UnixStream, flight: Arc<crate::shard::pace::Flight>) {
    loop {
        match handoff::recv(&ch) {
            Ok((Msg::Adopted { total }, _)) => flight.adopted.store(total, Ordering::Relaxed),
            Ok((m, _)) => tracing::warn!(msg = ?std::mem::discriminant(&m), "unexpected message from the new process"),
            Err(_) => return,
        }
    }
}

/// The old side's sender thread: sends connections as shards release them,
/// up to 253 per message, with no batching delay. If a send fails (the new
/// process is gone) it gives that batch, and everything after it, back to
/// this process's shards.
fn send_batches(ch: UnixStream, moved: Receiver<Handed>, sent: Arc<Sent>, adopter: proxy::Adopter) {
    while let Ok(first) = moved.recv() {
        let mut batch = vec![first];
        batch.extend(moved.try_iter().take(MAX_FDS - 1));
        let n = batch.len() as u64;
        if sent.broken.load(Ordering::SeqCst) {
            tracing::warn!(connections = n, "re-adopting connections the failed upgrade had released");
            adopter.adopt(batch);
            sent.settled.fetch_add(n, Ordering::SeqCst);
            continue;
        }
        let (conns, fds): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let msg = Msg::Conns { conns };
        match handoff::send(&ch, &msg, &raw) {
            Ok(()) => {
                sent.sent.fetch_add(n, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::error!(error = %e, connections = n, "could not send connections; keeping them here");
                sent.broken.store(true, Ordering::SeqCst);
                if let Msg::Conns { conns } = msg {
                    adopter.adopt(conns.into_iter().zip(fds).collect());
                }
            }
        }
        sent.settled.fetch_add(n, Ordering::SeqCst);
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
    let ours = match crate::tls::server::TlsContext::load(&cfg.tls) {
        Ok(t) => crate::identity::hex(&t.verifier.ca_digest()),
        Err(es) => return Err(failed(es.iter().map(|e| e.to_string()).collect())),
    };
    let pid = std::process::id();
    handoff::send(&ch, &Msg::Ready { pid, shards: cfg.shard_cpus.len(), snapshot_format: handoff::SNAPSHOT_FORMAT }, &[])
        .map_err(|e| vec![e.to_string()])?;
    let (fds, tickets) = match handoff::recv(&ch) {
        Ok((Msg::Listeners { count, ticket_keys, ca_digest }, fds)) if count == fds.len() => {
            // The predecessor's ticket keys: its devices' tickets resume
            // here, unless this config trusts other device CAs.
            let tickets = match crate::tls::tickets::Ticketer::import(&ticket_keys) {
                Ok(_) if ca_digest.as_ref().is_some_and(|d| *d != ours) => {
                    tracing::info!("the device CAs changed with this upgrade: new session-ticket keys, earlier sessions do not resume");
                    None
                }
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "no session-ticket keys from the old process; its tickets will not resume here");
                    None
                }
            };
            (fds, tickets)
        }
        Ok((m, _)) => return Err(failed(vec![format!("unexpected message {:?}", std::mem::discriminant(&m))])),
        Err(e) => return Err(failed(vec![e.to_string()])),
    };
    let running = proxy::start_with(cfg, proxy::Listeners::Inherited(fds), tickets).map_err(failed)?;
    let _ = handoff::send(&ch, &Msg::Serving { pid, listen: running.listen.to_string() }, &[]);
    // Progress goes back so the old process can pace itself.
    let finished = Arc::new(AtomicBool::new(false));
    match ch.try_clone() {
        Ok(w) => {
            let shards: Vec<_> = running.shards.iter().map(|s| s.metrics.clone()).collect();
            let f = finished.clone();
            let _ = std::thread::Builder::new().name("holdfast-adopt-acks".into()).spawn(move || report_progress(w, shards, f));
        }
        Err(e) => tracing::warn!(error = %e, "cannot report adoption progress to the old process"),
    }
    // Established connections follow, in batches, until Done.
    let adopter = running.adopter();
    let _ = std::thread::Builder::new().name("holdfast-adopt".into()).spawn(move || {
        let mut adopted = 0usize;
        let _finish = SetOnDrop(finished);
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

/// Sets the flag when dropped (a thread's end, however it ends).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// New side: tells the old process, every millisecond while it changes,
/// how many adopted connections serve again (or failed to). Ends once
/// adoption has finished or the old process is gone.
fn report_progress(ch: UnixStream, shards: Vec<Arc<crate::metrics::ShardMetrics>>, finished: Arc<AtomicBool>) {
    let mut told = 0;
    while !finished.load(Ordering::SeqCst) {
        let total: u64 = shards
            .iter()
            .map(|m| m.connections_resumed_total.load(Ordering::Relaxed) + m.connections_resume_failed_total.load(Ordering::Relaxed))
            .sum();
        if total != told {
            if handoff::send(&ch, &Msg::Adopted { total }, &[]).is_err() {
                return;
            }
            told = total;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
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
