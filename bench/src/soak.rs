//! `hf-bench soak`: holdfast under an hour (or `--minutes`) of everything an
//! operator's day brings, sampled throughout.
//!
//! Two reference WSMs behind one holdfast; swarm processes in `soak` mode
//! (`churn`: half the devices steady, half leaving and coming back, all
//! exchanging messages); and on a schedule a live upgrade (SIGUSR2), a WSM
//! killed with SIGKILL and restarted on its port a little later, and a
//! reload (SIGHUP) with a changed blocklist. Every `--sample-secs` the node's
//! RSS, descriptors, connections and own gauges, and the devices' messages,
//! latency, cuts and losses. This module runs the schedule and keeps the
//! books; the devices are `churn`'s; the files (`bench/results/soak/<label>.json`
//! and `.svg`) and the Markdown summary `soak_chart`'s.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::churn::Tally;
use crate::report::Hist;
use crate::result::{Machine, metric_single, metric_sum};
use crate::run::{Proc, fetch_metrics, free_port, pinned, prepare_pki, sibling, wait_port};

/// holdfast's pacing in the soak, `(upgrade.moving_per_shard,
/// upstream.resume_per_sec)`: what the recorded soaks ran with
/// (bench/RESULTS.md, "Soak"); other values make a new run incomparable
/// with them.
const PACING: (u32, u32) = (256, 2000);

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct SoakArgs {
    /// Length of the run, minutes.
    #[arg(long, default_value_t = 60.0)]
    pub minutes: f64,
    /// Devices (half steady, half churning).
    #[arg(long, default_value_t = 4000)]
    pub conns: usize,
    /// Swarm processes (each with its own 127.0.0.x source addresses).
    #[arg(long, default_value_t = 2)]
    pub procs: usize,
    /// Connects per second while the devices first come (all processes).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Messages per second per device.
    #[arg(long, default_value_t = 0.5)]
    pub msg_rate: f64,
    /// Bytes of each message.
    #[arg(long, default_value_t = 256)]
    pub msg_size: usize,
    /// The longest a churning device stays before it leaves and comes back.
    #[arg(long, default_value_t = 300.0)]
    pub churn_secs: f64,
    /// Seconds between live upgrades (SIGUSR2); 0: none.
    #[arg(long, default_value_t = 300.0)]
    pub upgrade_every: f64,
    /// Seconds between WSM kills (SIGKILL, the two in turn); 0: none.
    #[arg(long, default_value_t = 420.0)]
    pub wsm_kill_every: f64,
    /// Seconds a killed WSM stays down before it is started again.
    #[arg(long, default_value_t = 30.0)]
    pub wsm_down_secs: f64,
    /// Seconds between reloads (SIGHUP with a changed blocklist); 0: none.
    #[arg(long, default_value_t = 180.0)]
    pub reload_every: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    pub sample_secs: f64,
    /// Name of the result files.
    #[arg(long, default_value = "1h")]
    pub label: String,
    /// Folder the results go to.
    #[arg(long, default_value = "bench/results/soak")]
    pub out: PathBuf,
    /// CPUs holdfast is pinned to (one shard each).
    #[arg(long, default_value = "0")]
    pub proxy_cpus: String,
    /// CPUs the swarm and the WSMs are pinned to.
    #[arg(long, default_value = "1")]
    pub client_cpus: String,
}

/// The node, once a sample.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeSample {
    pub t_secs: f64,
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    pub connections: u64,
    pub links_up: u64,
    pub tunnel_state_bytes: u64,
    pub buffers_in_use: u64,
    pub partial_bytes: u64,
    pub held_bytes: u64,
    pub streams_held: u64,
}

/// The devices, once a sample (every swarm process added up).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceSample {
    pub t_secs: f64,
    pub tally: Tally,
}

/// Something the schedule did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub t_secs: f64,
    /// upgrade | wsm-kill | wsm-start | reload
    pub what: String,
    /// How long it took (upgrade: signal until the old process was gone;
    /// reload: signal until the new generation was live).
    pub secs: Option<f64>,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakResult {
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub args: SoakArgs,
    pub node: Vec<NodeSample>,
    pub devices: Vec<DeviceSample>,
    pub events: Vec<Event>,
    pub total: Tally,
}

/// Adds up the nth sample of every process.
pub fn merge_samples(per_proc: &[Vec<Tally>], t0_ms: u64) -> Vec<DeviceSample> {
    let n = per_proc.iter().map(Vec::len).min().unwrap_or(0);
    (0..n)
        .map(|k| {
            let parts: Vec<&Tally> = per_proc.iter().map(|v| &v[k]).collect();
            DeviceSample { t_secs: parts[0].at_ms.saturating_sub(t0_ms) as f64 / 1000.0, tally: add(&parts) }
        })
        .collect()
}

/// Several processes' tallies as one.
pub fn add(parts: &[&Tally]) -> Tally {
    let mut t = Tally {
        at_ms: parts.iter().map(|p| p.at_ms).max().unwrap_or(0),
        rtt_us: Hist::merge(&parts.iter().map(|p| p.rtt_us.clone()).collect::<Vec<_>>()),
        ..Tally::default()
    };
    for p in parts {
        t.absorb(p);
    }
    t
}

fn pid_of(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// Gone, or a zombie nobody reaped yet.
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) == Some("Z"),
    }
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) of the soak's own holdfast process.
    unsafe { libc::kill(pid as i32, sig) };
}

fn node_sample(t: f64, pid: u32, metrics_port: u16) -> NodeSample {
    let m = fetch_metrics(metrics_port).unwrap_or_default();
    NodeSample {
        t_secs: t,
        pid,
        rss_kib: crate::run::rss_kib(&[pid]),
        fds: fds(pid),
        connections: metric_sum(&m, "holdfast_connections_active"),
        links_up: metric_sum(&m, "holdfast_links_up"),
        tunnel_state_bytes: metric_sum(&m, "holdfast_tunnel_state_bytes"),
        buffers_in_use: metric_sum(&m, "holdfast_buffers_in_use"),
        partial_bytes: metric_sum(&m, "holdfast_partial_bytes"),
        held_bytes: metric_sum(&m, "holdfast_held_bytes"),
        streams_held: metric_sum(&m, "holdfast_streams_held"),
    }
}

/// The reload's change: the dev PKI's blocklist plus, every other time,
/// `extra` fingerprints of no device.
fn write_blocklist(pki: &Path, base: &str, round: u64, extra: u64) -> Result<(), String> {
    let mut list = base.to_string();
    if round % 2 == 1 {
        for i in 0..extra {
            list.push_str(&holdfast::identity::hex(&holdfast::identity::sha256(&(round * 1_000_000 + i).to_be_bytes())));
            list.push('\n');
        }
    }
    std::fs::write(pki.join("blocklist.txt"), list).map_err(|e| e.to_string())
}

struct Wsm {
    addr: String,
    node: String,
    cpus: Vec<usize>,
    proc: Option<Proc>,
}

impl Wsm {
    fn start(&mut self) -> Result<(), String> {
        let mut c = pinned(&sibling("holdfast-wsm"), &self.cpus);
        c.args(["--listen", &self.addr, "--log", "warn", "--node", &self.node]);
        self.proc = Some(Proc(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| format!("{}: {e}", self.node))?));
        let port = self.addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        wait_port(port, 10)
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.0.kill();
            let _ = p.0.wait();
        }
    }
}

/// When the next of each scheduled thing is due (seconds from the start).
struct Schedule {
    upgrade: f64,
    kill: f64,
    restart: Option<f64>,
    reload: f64,
}

fn next_after(every: f64, now: f64) -> f64 {
    if every <= 0.0 { f64::INFINITY } else { ((now / every).floor() + 1.0) * every }
}

/// Runs the soak; the caller writes its files (`soak_chart::write`).
pub fn run(a: &SoakArgs) -> Result<SoakResult, String> {
    let work = std::env::temp_dir().join(format!("hf-soak-{}", std::process::id()));
    let pki = work.join("pki");
    prepare_pki(&pki)?;
    let res = soak(a, &pki, &work);
    let _ = std::fs::remove_dir_all(&work);
    res
}

fn soak(a: &SoakArgs, pki: &Path, work: &Path) -> Result<SoakResult, String> {
    let (pcpus, ccpus) = (crate::run::parse_cpus(&a.proxy_cpus), crate::run::parse_cpus(&a.client_cpus));
    let mut wsms: Vec<Wsm> = ["wsm-a", "wsm-b"]
        .iter()
        .map(|n| Wsm { addr: format!("127.0.0.1:{}", free_port()), node: n.to_string(), cpus: ccpus.clone(), proc: None })
        .collect();
    for w in &mut wsms {
        w.start()?;
    }
    let base_blocklist = std::fs::read_to_string(pki.join("blocklist.txt")).map_err(|e| e.to_string())?;
    let (port, mp) = (free_port(), free_port());
    let cfg = work.join("holdfast.toml");
    let addrs: Vec<String> = wsms.iter().map(|w| w.addr.clone()).collect();
    let limits = crate::peers::Limits { handshakes_per_sec: 0, opens_per_sec: 0, drain_over: None };
    std::fs::write(&cfg, crate::peers::holdfast_config(pki, port, &addrs, pcpus.len(), &a.proxy_cpus, mp, PACING, &limits))
        .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(work.join("proxy.log")).map_err(|e| e.to_string())?;
    let mut c = pinned(&sibling("holdfast"), &pcpus);
    c.args(["run", "--log", "warn", "--config"]).arg(&cfg);
    let first = Proc(c.stdout(Stdio::null()).stderr(log).spawn().map_err(|e| format!("holdfast: {e}"))?);
    let pid_file = pki.join("holdfast.pid");
    wait_port(port, 15)?;
    let mut first = Some(first);

    let (tx, rx) = channel();
    let target = format!("127.0.0.1:{port}");
    let mut swarm = crate::run::spawn_swarm(pki, &target, (a.conns, a.procs), &ccpus, &tx, |c| {
        c.args(["--mode", "soak", "--rate", &(a.rate / a.procs.max(1) as u32).to_string(), "--msg-size", &a.msg_size.to_string()])
            .args(["--msg-rate", &a.msg_rate.to_string(), "--duration", &(a.minutes * 60.0).to_string()])
            .args(["--churn-secs", &a.churn_secs.to_string(), "--sample-secs", &a.sample_secs.to_string()]);
    })?;
    let nproc = swarm.len();
    for _ in 0..nproc {
        crate::run::first_line_with(&rx, "READY", 30)?;
    }
    let t0 = Instant::now();
    let t0_ms = crate::swarm::wall_us() / 1000;
    for (_, s) in swarm.iter_mut() {
        let _ = writeln!(s, "go");
        let _ = s.flush();
    }
    let now = || t0.elapsed().as_secs_f64();
    let total_secs = a.minutes * 60.0;
    let mut sched = Schedule {
        upgrade: next_after(a.upgrade_every, 0.0),
        kill: next_after(a.wsm_kill_every, 0.0),
        restart: None,
        reload: next_after(a.reload_every, 0.0),
    };
    let (mut node, mut events) = (Vec::new(), Vec::new());
    let mut per_proc: Vec<Vec<Tally>> = vec![Vec::new(); nproc];
    let mut reports: Vec<Option<Tally>> = vec![None; nproc];
    let mut next_sample = 0.0;
    let (mut kills, mut reloads) = (0usize, 0u64);
    let gen_of = || fetch_metrics(mp).and_then(|m| metric_single(&m, "holdfast_config_generation")).unwrap_or(0.0);
    // The swarm's lines: waits up to `wait` for one, then takes all there are.
    let drain_lines = |per_proc: &mut Vec<Vec<Tally>>, reports: &mut Vec<Option<Tally>>, wait: Duration| {
        let mut next = rx.recv_timeout(wait).ok();
        while let Some((i, l)) = next {
            if let Some(j) = l.strip_prefix("SAMPLE ")
                && let Ok(t) = serde_json::from_str::<Tally>(j)
            {
                per_proc[i].push(t);
            } else if let Some(j) = l.strip_prefix("REPORT ")
                && let Ok(t) = serde_json::from_str::<Tally>(j)
            {
                reports[i] = Some(t);
            }
            next = rx.try_recv().ok();
        }
    };
    while now() < total_secs {
        drain_lines(&mut per_proc, &mut reports, Duration::from_millis(100));
        let t = now();
        let pid = pid_of(&pid_file).unwrap_or(0);
        if t >= next_sample {
            node.push(node_sample(t, pid, mp));
            next_sample += a.sample_secs;
        }
        if let Some(r) = sched.restart
            && t >= r
        {
            let w = &mut wsms[kills % 2];
            let res = w.start();
            events.push(Event { t_secs: t, what: "wsm-start".into(), secs: None, ok: res.is_ok(), detail: w.node.clone() });
            sched.restart = None;
        } else if t >= sched.kill && sched.restart.is_none() {
            kills += 1;
            let w = &mut wsms[kills % 2];
            w.kill();
            events.push(Event { t_secs: t, what: "wsm-kill".into(), secs: None, ok: true, detail: w.node.clone() });
            sched.restart = Some(t + a.wsm_down_secs);
            sched.kill = next_after(a.wsm_kill_every, t);
        } else if t >= sched.reload {
            reloads += 1;
            write_blocklist(pki, &base_blocklist, reloads, 5000)?;
            let g0 = gen_of();
            let s = Instant::now();
            signal(pid, libc::SIGHUP);
            let mut ok = false;
            while s.elapsed() < Duration::from_secs(30) {
                if gen_of() > g0 {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let detail = if reloads % 2 == 1 { "blocklist + 5000" } else { "blocklist - 5000" };
            events.push(Event { t_secs: t, what: "reload".into(), secs: Some(s.elapsed().as_secs_f64()), ok, detail: detail.into() });
            sched.reload = next_after(a.reload_every, now());
        } else if t >= sched.upgrade {
            let s = Instant::now();
            signal(pid, libc::SIGUSR2);
            let mut ok = false;
            while s.elapsed() < Duration::from_secs(120) {
                if let Some(p) = first.as_mut() {
                    let _ = p.0.try_wait();
                }
                if pid_of(&pid_file).is_some_and(|p| p != pid) && gone(pid) {
                    ok = true;
                    break;
                }
                drain_lines(&mut per_proc, &mut reports, Duration::from_millis(20));
            }
            if ok && first.as_ref().is_some_and(|p| p.0.id() == pid) {
                // Reaped already (try_wait): nothing left for its drop to stop.
                std::mem::forget(first.take());
            }
            let detail = format!("{pid} -> {}", pid_of(&pid_file).unwrap_or(0));
            events.push(Event { t_secs: t, what: "upgrade".into(), secs: Some(s.elapsed().as_secs_f64()), ok, detail });
            sched.upgrade = next_after(a.upgrade_every, now());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while reports.iter().any(Option::is_none) && Instant::now() < deadline {
        drain_lines(&mut per_proc, &mut reports, Duration::from_millis(200));
    }
    node.push(node_sample(now(), pid_of(&pid_file).unwrap_or(0), mp));
    drop(swarm);
    if let Some(p) = pid_of(&pid_file) {
        signal(p, libc::SIGINT);
        let s = Instant::now();
        while !gone(p) && s.elapsed() < Duration::from_secs(10) {
            if let Some(f) = first.as_mut() {
                let _ = f.0.try_wait();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(first);
    for w in &mut wsms {
        w.kill();
    }
    let reports: Vec<Tally> = reports.into_iter().collect::<Option<_>>().ok_or("a swarm process did not report")?;
    Ok(SoakResult {
        date: crate::render::today(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: crate::run::machine(),
        args: a.clone(),
        node,
        devices: merge_samples(&per_proc, t0_ms),
        events,
        total: add(&reports.iter().collect::<Vec<_>>()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_fall_on_multiples_and_zero_means_never() {
        assert_eq!(next_after(300.0, 0.0), 300.0);
        assert_eq!(next_after(300.0, 300.5), 600.0);
        assert!(next_after(0.0, 10.0).is_infinite());
    }

    #[test]
    fn the_nth_samples_of_every_process_add_up() {
        let t = |at_ms, messages, lost| Tally { at_ms, messages, lost, ..Tally::default() };
        let per = vec![vec![t(11_000, 5, 0), t(21_000, 7, 1)], vec![t(11_010, 3, 0)]];
        let m = merge_samples(&per, 1_000);
        assert_eq!(m.len(), 1, "only samples every process has");
        assert_eq!((m[0].t_secs, m[0].tally.messages, m[0].tally.at_ms), (10.0, 8, 11_010));
    }

    #[test]
    fn a_missing_process_is_gone_and_this_one_is_not() {
        assert!(!gone(std::process::id()));
        assert!(gone(u32::MAX - 1));
        assert!(fds(std::process::id()) > 0);
    }
}
