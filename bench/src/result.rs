//! What a benchmark run is asked to do and what it found: the arguments and
//! result records written to `bench/results/*.json`, and reading holdfast's
//! metrics text. Shared by `run` (which makes them) and `render` (which
//! reads them); depends on neither.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::report::SwarmTotal;

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct RunArgs {
    /// Scenario: idle, handshake, message, storm, upgrade or failover.
    #[arg(long)]
    pub scenario: String,
    /// Proxies to run the scenario against, comma separated (holdfast, haproxy, nginx).
    #[arg(long, value_delimiter = ',', default_value = "holdfast,haproxy,nginx")]
    pub proxies: Vec<String>,
    /// Devices (idle, message, storm) or concurrent handshakers (handshake).
    #[arg(long, default_value_t = 2000)]
    pub conns: usize,
    /// Swarm processes (each gets its own 127.0.0.x source addresses).
    #[arg(long, default_value_t = 2)]
    pub procs: usize,
    /// TLS version the devices use: "1.3" or "1.2".
    #[arg(long, default_value = "1.3")]
    pub tls: String,
    /// Resume TLS sessions (tickets) on reconnects.
    #[arg(long)]
    pub resume: bool,
    /// Connections per second while connecting (0 = all at once).
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// Bytes of each device message.
    #[arg(long, default_value_t = 64)]
    pub msg_size: usize,
    /// Messages per second per device (message scenario; 0 = closed loop).
    #[arg(long, default_value_t = 1.0)]
    pub msg_rate: f64,
    /// Seconds of the measured phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// CPUs the proxy is pinned to (taskset list).
    #[arg(long, default_value = "0")]
    pub proxy_cpus: String,
    /// CPUs the swarm processes are pinned to (taskset list).
    #[arg(long, default_value = "1")]
    pub client_cpus: String,
    /// Where result JSON files go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// A label added to the result file name (e.g. "tls12", "64b").
    #[arg(long, default_value = "")]
    pub label: String,
    /// Upgrade scenario without the SIGUSR2: the same load's own pauses, to
    /// compare the upgrade's with.
    #[arg(long)]
    #[serde(default)]
    pub no_signal: bool,
    /// holdfast's `upstream.resume_per_sec` (streams re-opened per second per shard).
    #[arg(long, default_value_t = 2000)]
    #[serde(default = "default_resume_rate")]
    pub resume_per_sec: u32,
    /// holdfast's `upgrade.moving_per_shard` (tunnels moving at once per shard).
    #[arg(long, default_value_t = 128)]
    #[serde(default = "default_moving")]
    pub moving_per_shard: u32,
    /// Reload scenario: blocklist entries the reload brings (none of them a
    /// connected device, so every connection is checked and none closed).
    #[arg(long, default_value_t = 10_000)]
    #[serde(default)]
    pub reload_blocklist: usize,
    /// holdfast's log level; its log is kept as `<out>/<scenario>[-label]-holdfast.log`.
    #[arg(long, default_value = "warn")]
    #[serde(default = "default_log")]
    pub proxy_log: String,
    /// Storm: TLS handshakes each proxy starts per second (holdfast
    /// `admission.handshakes_per_sec`, HAProxy `maxsslrate`; nginx has no
    /// equivalent). 0: no limit.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub handshakes_per_sec: u32,
    /// Storm: streams (upstream connections) opened per second (holdfast
    /// `admission.wsm_opens_per_sec`, HAProxy `rate-limit sessions`, nginx
    /// `limit_req` with a burst queue). 0: no limit.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub opens_per_sec: u32,
    /// Drain: the window, seconds (holdfast `ctl drain --over`, HAProxy
    /// soft-stop with `close-spread-time` and `hard-stop-after`, nginx
    /// graceful quit with `worker_shutdown_timeout`).
    #[arg(long, default_value_t = 30.0)]
    #[serde(default)]
    pub drain_over: f64,
}

/// What runs recorded before the field existed used (holdfast's default then).
fn default_moving() -> u32 {
    256
}

fn default_resume_rate() -> u32 {
    2000
}

fn default_log() -> String {
    "warn".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub fd_limit: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub proxy: String,
    pub scenario: String,
    pub label: String,
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub args: RunArgs,
    pub devices_ready: u64,
    pub swarm: SwarmTotal,
    pub proxy_rss_base_kib: u64,
    /// Idle scenario: devices and RSS when half of them were connected.
    #[serde(default)]
    pub half_devices: u64,
    #[serde(default)]
    pub proxy_rss_half_kib: u64,
    pub proxy_rss_loaded_kib: u64,
    pub proxy_rss_peak_kib: u64,
    /// Proxy CPU seconds during the measured phase.
    pub proxy_cpu_secs: f64,
    pub sock_mem_base_bytes: u64,
    pub sock_mem_loaded_bytes: u64,
    /// Time until all devices were back (storm), seconds.
    pub storm_secs: Option<f64>,
    /// Storm: opens the upstream saw in each second from the storm's start,
    /// and the most in any sliding second.
    #[serde(default)]
    pub opens_per_sec: Option<Vec<u64>>,
    #[serde(default)]
    pub opens_peak: Option<u64>,
    /// Drain: seconds from the drain's start until the last device was closed.
    #[serde(default)]
    pub drain_secs: Option<f64>,
    /// Drain: closes in each second from the drain's start.
    #[serde(default)]
    pub closes_per_sec: Option<Vec<u64>>,
    /// Upgrade scenario: SIGUSR2 until the old process exited, seconds.
    #[serde(default)]
    pub upgrade_secs: Option<f64>,
    /// Upgrade scenario: CPU seconds both processes used from SIGUSR2 until
    /// the old one exited (the hand-over's cost, with the traffic meanwhile).
    #[serde(default)]
    pub upgrade_cpu_secs: Option<f64>,
    /// Reload scenario: SIGHUP until every shard runs the new generation,
    /// until every connection was checked against it, and holdfast's CPU
    /// seconds over that time.
    #[serde(default)]
    pub reload_apply_secs: Option<f64>,
    #[serde(default)]
    pub reload_recheck_secs: Option<f64>,
    #[serde(default)]
    pub reload_cpu_secs: Option<f64>,
    /// Failover scenario: from killing one WSM until every one of its
    /// streams was resumed on the other, seconds; and how many resumed.
    #[serde(default)]
    pub failover_secs: Option<f64>,
    #[serde(default)]
    pub failover_streams: Option<u64>,
    /// holdfast only: its metrics text while the devices were connected.
    pub holdfast_metrics: Option<String>,
}

/// A metric without labels in a Prometheus/OpenMetrics text.
pub fn metric_single(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
}

/// Sum of a metric over all its series in a Prometheus/OpenMetrics text.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}
