//! Configuration: the TOML file as written, and the validated runtime config.
//!
//! Owns: parsing, defaults, and validation of every key into types that cannot
//! hold a bad value ([`Config`]). Relative paths are resolved against the
//! config file's directory. Every problem is reported with its key, all at
//! once. Never opens sockets; loading certificates is `tls::server`'s job.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// One configuration problem, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub msg: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.msg)
    }
}

pub fn err(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), msg: msg.into() }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: ListenFile,
    pub tls: TlsFile,
    #[serde(default)]
    pub websocket: WebSocketFile,
    pub upstream: UpstreamFile,
    #[serde(default)]
    pub buffers: BuffersFile,
    #[serde(default)]
    pub metrics: MetricsFile,
    #[serde(default)]
    pub upgrade: UpgradeFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeFile {
    /// File holding the serving process's pid (written at start and by each
    /// successor); `holdfast upgrade --pid-file` uses it. The outcome of an
    /// upgrade is written next to it as `<pid_file>.upgrade.json`.
    pub pid_file: Option<String>,
    /// Tunnels each shard moves at once during a live upgrade. A device is
    /// not read while its tunnel moves, so this bounds every device's pause
    /// (about this many divided by the move rate) without slowing the whole.
    pub moving_per_shard: u32,
}

impl Default for UpgradeFile {
    fn default() -> Self {
        UpgradeFile { pid_file: None, moving_per_shard: 128 }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum ShardsFile {
    /// `"auto"`: one shard per CPU in `cpus` (or per online CPU).
    Auto(String),
    Count(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    /// Address devices connect to, e.g. "0.0.0.0:443". Every shard binds it
    /// with SO_REUSEPORT.
    pub addr: String,
    /// "auto" or a number of shard threads.
    #[serde(default = "default_shards")]
    pub shards: ShardsFile,
    /// CPUs to pin shards to, e.g. "0-7" or "0,2,4". Shard i runs on the
    /// i-th CPU of the list (wrapping). Default: all online CPUs.
    pub cpus: Option<String>,
    /// Listen backlog per shard socket.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
}

fn default_shards() -> ShardsFile {
    ShardsFile::Auto("auto".into())
}
fn default_backlog() -> u32 {
    4096
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM file with the server certificate, then its intermediates.
    pub cert_chain: String,
    /// PEM file with the server's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: String,
    /// Optional blocklist file (see README: fingerprints or serial:<hex>).
    pub blocklist: Option<String>,
    /// CAs that issue device certificates (at least one).
    #[serde(default)]
    pub client_ca: Vec<ClientCaFile>,
    /// Milliseconds a device has to finish the TLS handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
    /// TLS 1.3: holdfast starts a KeyUpdate after this many records under one
    /// key (0 = only when the device asks).
    #[serde(default = "default_key_update")]
    pub key_update_after_records: u64,
    /// Protocol versions offered: any of "1.2", "1.3".
    #[serde(default = "default_versions")]
    pub versions: Vec<String>,
    /// Cipher suites offered, by IANA name (e.g. "TLS13_AES_128_GCM_SHA256",
    /// "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"). Default: all AEAD
    /// suites of the enabled versions.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
}

fn default_handshake_timeout() -> u64 {
    10_000
}
fn default_key_update() -> u64 {
    1 << 24
}
fn default_versions() -> Vec<String> {
    vec!["1.3".into(), "1.2".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCaFile {
    /// PEM file with one or more CA certificates.
    pub file: String,
    /// Accept certificates under this CA even when expired or not yet valid.
    #[serde(default)]
    pub ignore_validity: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketFile {
    /// Largest HTTP upgrade request in bytes (request line and headers).
    pub max_request_bytes: usize,
    /// Milliseconds from TLS done to a complete upgrade request.
    pub upgrade_timeout_ms: u64,
    /// Largest reassembled message; larger gets close 1009.
    pub max_message_bytes: usize,
    /// Seconds without any frame from the device before it is closed (0 = never).
    pub idle_timeout_secs: u64,
    /// Seconds between server pings to an otherwise quiet device (0 = never).
    pub ping_interval_secs: u64,
    /// Request headers passed to the WSM (lowercase names).
    pub forward_headers: Vec<String>,
}

impl Default for WebSocketFile {
    fn default() -> Self {
        WebSocketFile {
            max_request_bytes: 8192,
            upgrade_timeout_ms: 10_000,
            max_message_bytes: 1 << 20,
            idle_timeout_secs: 600,
            ping_interval_secs: 0,
            forward_headers: vec!["user-agent".into(), "origin".into(), "x-device-firmware".into()],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// WSM hosts, "host:port".
    pub wsm: Vec<String>,
    /// Persistent links each shard keeps to each WSM host.
    #[serde(default = "one")]
    pub links_per_shard: u32,
    /// Name of this node in link hellos (default: the host name).
    pub node: Option<String>,
    /// Milliseconds to connect a link before retrying.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Milliseconds the WSM has to accept or refuse a new stream.
    #[serde(default = "default_open_timeout")]
    pub open_timeout_ms: u64,
    /// Bytes of messages a WSM may send on one stream before holdfast grants
    /// more credit (holdfast buffers at most this per stream).
    #[serde(default = "default_stream_window")]
    pub stream_window: u32,
    /// Milliseconds between link pings.
    #[serde(default = "default_ping")]
    pub ping_interval_ms: u64,
    /// Milliseconds between re-resolving `wsm` entries given by name; the
    /// pool follows DNS (0: resolve once, at start).
    #[serde(default = "default_dns_refresh")]
    pub dns_refresh_ms: u64,
    /// A link that has received nothing (not even a pong) for this many
    /// milliseconds is dead: its streams resume on other links.
    #[serde(default = "default_liveness")]
    pub liveness_timeout_ms: u64,
    /// Milliseconds a stream whose WSM went away may wait for another one;
    /// then its device is closed with 1013 (try again later).
    #[serde(default = "default_resume_timeout")]
    pub resume_timeout_ms: u64,
    /// Those 1013 closes are spread at random over this many milliseconds
    /// after `resume_timeout_ms`, never all at once.
    #[serde(default = "default_close_spread")]
    pub close_spread_ms: u64,
    /// Streams each shard re-opens on other WSMs per second (after a WSM
    /// died or sent goaway), so the WSMs that take them are not stormed.
    #[serde(default = "default_resume_rate")]
    pub resume_per_sec: u32,
    /// Bytes of device messages held for a stream with no WSM; beyond it
    /// holdfast stops reading the device (TCP backpressure), drops nothing.
    #[serde(default = "default_held_conn")]
    pub held_bytes_per_connection: u32,
    /// The same bound for all of one shard's streams together.
    #[serde(default = "default_held_shard")]
    pub held_bytes_per_shard: u64,
}

fn default_dns_refresh() -> u64 {
    10_000
}
fn default_liveness() -> u64 {
    15_000
}
fn default_resume_timeout() -> u64 {
    30_000
}
fn default_close_spread() -> u64 {
    10_000
}
fn default_resume_rate() -> u32 {
    2_000
}
fn default_held_conn() -> u32 {
    64 * 1024
}
fn default_held_shard() -> u64 {
    64 << 20
}

fn one() -> u32 {
    1
}
fn default_connect_timeout() -> u64 {
    2_000
}
fn default_open_timeout() -> u64 {
    5_000
}
fn default_stream_window() -> u32 {
    256 * 1024
}
fn default_ping() -> u64 {
    5_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuffersFile {
    /// I/O buffers preallocated per shard; when all are in use the shard
    /// stops reading until one is returned.
    pub per_shard: usize,
    /// Size of one buffer in bytes (at least one TLS record, 18437).
    pub size: usize,
}

impl Default for BuffersFile {
    fn default() -> Self {
        BuffersFile { per_shard: 1024, size: 20 * 1024 }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Address of the Prometheus text endpoint (GET /metrics); off if unset.
    pub addr: Option<String>,
}

/// Validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: SocketAddr,
    /// CPU of each shard, one entry per shard.
    pub shard_cpus: Vec<usize>,
    pub backlog: u32,
    pub tls: TlsConfig,
    pub ws: WsConfig,
    pub upstream: UpstreamConfig,
    pub buffers: BuffersFile,
    pub metrics: Option<SocketAddr>,
    pub pid_file: Option<PathBuf>,
    /// `upgrade.moving_per_shard`.
    pub upgrade_moving_per_shard: usize,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub blocklist: Option<PathBuf>,
    pub client_cas: Vec<(PathBuf, bool)>,
    pub handshake_timeout: Duration,
    pub key_update_after: u64,
    pub tls12: bool,
    pub tls13: bool,
    /// Empty = all supported suites.
    pub cipher_suites: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct WsConfig {
    pub max_request_bytes: usize,
    pub upgrade_timeout: Duration,
    pub max_message_bytes: usize,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    pub forward_headers: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub wsm: Vec<String>,
    pub links_per_shard: u32,
    pub node: String,
    pub connect_timeout: Duration,
    pub open_timeout: Duration,
    pub stream_window: u32,
    pub ping_interval: Duration,
    /// Zero: resolve once.
    pub dns_refresh: Duration,
    pub liveness_timeout: Duration,
    pub resume_timeout: Duration,
    pub close_spread: Duration,
    pub resume_per_sec: u32,
    pub held_bytes_per_connection: usize,
    pub held_bytes_per_shard: u64,
}

/// Parses "0-3,6,8-9" into a list of CPU numbers.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("'{x}' is not a CPU number"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part} runs backwards"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    if out.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(out)
}

fn online_cpus() -> Vec<usize> {
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (0..n).collect()
}

fn ms(key: &str, v: u64, errs: &mut Vec<ConfigError>) -> Duration {
    if v == 0 {
        errs.push(err(key, "must be greater than 0"));
    }
    Duration::from_millis(v)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![err("(file)", format!("cannot read {}: {e}", path.display()))])?;
        Self::parse(&text, path)
    }

    /// Validates config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let key = match e.span() {
                Some(span) => {
                    let line = text.as_bytes()[..span.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1;
                    format!("(line {line})")
                }
                None => "(toml)".into(),
            };
            vec![err(&key, msg)]
        })?;
        Self::validate(file, path)
    }

    pub fn validate(f: FileConfig, path: &Path) -> Result<Config, Vec<ConfigError>> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &str| {
            if Path::new(p).is_absolute() { PathBuf::from(p) } else { base.join(p) }
        };
        let mut errs = Vec::new();

        let listen = f.listen.addr.parse::<SocketAddr>().unwrap_or_else(|_| {
            errs.push(err("listen.addr", format!("'{}' is not an address like 0.0.0.0:443", f.listen.addr)));
            SocketAddr::from(([0, 0, 0, 0], 0))
        });
        let cpus = match &f.listen.cpus {
            Some(s) => parse_cpu_list(s).unwrap_or_else(|m| {
                errs.push(err("listen.cpus", m));
                online_cpus()
            }),
            None => online_cpus(),
        };
        let shards = match &f.listen.shards {
            ShardsFile::Auto(s) if s == "auto" => cpus.len(),
            ShardsFile::Auto(s) => {
                errs.push(err("listen.shards", format!("'{s}': use \"auto\" or a number")));
                1
            }
            ShardsFile::Count(0) => {
                errs.push(err("listen.shards", "must be at least 1"));
                1
            }
            ShardsFile::Count(n) if *n > 1024 => {
                errs.push(err("listen.shards", "more than 1024 shards"));
                1
            }
            ShardsFile::Count(n) => *n as usize,
        };
        let shard_cpus = (0..shards).map(|i| cpus[i % cpus.len()]).collect();

        let t = &f.tls;
        if t.client_ca.is_empty() {
            errs.push(err("tls.client_ca", "at least one [[tls.client_ca]] is required (mutual TLS)"));
        }
        let (mut tls12, mut tls13) = (false, false);
        for v in &t.versions {
            match v.as_str() {
                "1.2" => tls12 = true,
                "1.3" => tls13 = true,
                other => errs.push(err("tls.versions", format!("'{other}': only \"1.2\" and \"1.3\""))),
            }
        }
        if !tls12 && !tls13 {
            errs.push(err("tls.versions", "no protocol version enabled"));
        }
        let tls = TlsConfig {
            cert_chain: resolve(&t.cert_chain),
            key: resolve(&t.key),
            blocklist: t.blocklist.as_deref().map(resolve),
            client_cas: t.client_ca.iter().map(|c| (resolve(&c.file), c.ignore_validity)).collect(),
            handshake_timeout: ms("tls.handshake_timeout_ms", t.handshake_timeout_ms, &mut errs),
            key_update_after: t.key_update_after_records,
            tls12,
            tls13,
            cipher_suites: t.cipher_suites.clone(),
        };
        let known: Vec<String> = crate::tls::server::provider().cipher_suites.iter().map(|s| format!("{:?}", s.suite())).collect();
        for (i, name) in t.cipher_suites.iter().enumerate() {
            if !known.contains(name) {
                errs.push(err(&format!("tls.cipher_suites[{i}]"), format!("unknown suite '{name}'; known: {}", known.join(", "))));
            }
        }

        let w = &f.websocket;
        if w.max_request_bytes < 256 || w.max_request_bytes > 1 << 20 {
            errs.push(err("websocket.max_request_bytes", "must be between 256 and 1048576"));
        }
        if w.max_message_bytes == 0 || w.max_message_bytes > 64 << 20 {
            errs.push(err("websocket.max_message_bytes", "must be between 1 and 67108864"));
        }
        let secs = |v: u64| (v > 0).then(|| Duration::from_secs(v));
        let ws = WsConfig {
            max_request_bytes: w.max_request_bytes,
            upgrade_timeout: ms("websocket.upgrade_timeout_ms", w.upgrade_timeout_ms, &mut errs),
            max_message_bytes: w.max_message_bytes,
            idle_timeout: secs(w.idle_timeout_secs),
            ping_interval: secs(w.ping_interval_secs),
            forward_headers: w.forward_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        };

        let u = &f.upstream;
        if u.wsm.is_empty() {
            errs.push(err("upstream.wsm", "at least one WSM host is required"));
        }
        for (i, h) in u.wsm.iter().enumerate() {
            if h.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                errs.push(err(&format!("upstream.wsm[{i}]"), format!("'{h}' is not host:port")));
            }
        }
        if u.links_per_shard == 0 || u.links_per_shard > 64 {
            errs.push(err("upstream.links_per_shard", "must be between 1 and 64"));
        }
        if (u.stream_window as usize) < w.max_message_bytes.min(64 * 1024) {
            errs.push(err("upstream.stream_window", "must be at least 64 KiB (or max_message_bytes if smaller)"));
        }
        let node = u.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "holdfast".into())
        });
        let upstream = UpstreamConfig {
            wsm: u.wsm.clone(),
            links_per_shard: u.links_per_shard,
            node,
            connect_timeout: ms("upstream.connect_timeout_ms", u.connect_timeout_ms, &mut errs),
            open_timeout: ms("upstream.open_timeout_ms", u.open_timeout_ms, &mut errs),
            stream_window: u.stream_window,
            ping_interval: ms("upstream.ping_interval_ms", u.ping_interval_ms, &mut errs),
            dns_refresh: Duration::from_millis(u.dns_refresh_ms),
            liveness_timeout: ms("upstream.liveness_timeout_ms", u.liveness_timeout_ms, &mut errs),
            resume_timeout: ms("upstream.resume_timeout_ms", u.resume_timeout_ms, &mut errs),
            close_spread: Duration::from_millis(u.close_spread_ms),
            resume_per_sec: u.resume_per_sec,
            held_bytes_per_connection: u.held_bytes_per_connection as usize,
            held_bytes_per_shard: u.held_bytes_per_shard,
        };
        if upstream.liveness_timeout <= upstream.ping_interval {
            errs.push(err(
                "upstream.liveness_timeout_ms",
                "must be longer than upstream.ping_interval_ms (a healthy idle link answers pings)",
            ));
        }
        if u.resume_per_sec == 0 {
            errs.push(err("upstream.resume_per_sec", "must be at least 1"));
        }
        if u.held_bytes_per_connection < 1024 {
            errs.push(err("upstream.held_bytes_per_connection", "must be at least 1024"));
        }
        if u.held_bytes_per_shard < u.held_bytes_per_connection as u64 {
            errs.push(err("upstream.held_bytes_per_shard", "must be at least upstream.held_bytes_per_connection"));
        }

        if f.buffers.size < crate::shard::pool::MIN_BUFFER {
            errs.push(err("buffers.size", format!("must be at least {} (one TLS record)", crate::shard::pool::MIN_BUFFER)));
        }
        if f.buffers.per_shard < 16 {
            errs.push(err("buffers.per_shard", "must be at least 16"));
        }
        let metrics = f
            .metrics
            .addr
            .as_deref()
            .and_then(|a| a.parse().map_err(|_| errs.push(err("metrics.addr", format!("'{a}' is not an address")))).ok());

        if !(1..=65_536).contains(&f.upgrade.moving_per_shard) {
            errs.push(err("upgrade.moving_per_shard", "must be between 1 and 65536"));
        }

        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Config {
            path: path.to_path_buf(),
            listen,
            shard_cpus,
            backlog: f.listen.backlog,
            tls,
            ws,
            upstream,
            buffers: f.buffers,
            metrics,
            pid_file: f.upgrade.pid_file.as_deref().map(resolve),
            upgrade_moving_per_shard: f.upgrade.moving_per_shard as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[listen]
addr = "127.0.0.1:8443"
shards = 2
cpus = "0-1"
[tls]
cert_chain = "server-chain.pem"
key = "/abs/server.key"
[[tls.client_ca]]
file = "fleet-2019.pem"
ignore_validity = true
[upstream]
wsm = ["127.0.0.1:9000"]
"#;

    #[test]
    fn good_config_resolves_paths_and_shards() {
        let c = Config::parse(GOOD, Path::new("/etc/holdfast/holdfast.toml")).unwrap();
        assert_eq!(c.shard_cpus, vec![0, 1]);
        assert_eq!(c.tls.cert_chain, PathBuf::from("/etc/holdfast/server-chain.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/abs/server.key"));
        assert_eq!(c.tls.client_cas, vec![(PathBuf::from("/etc/holdfast/fleet-2019.pem"), true)]);
        assert!(c.tls.tls12 && c.tls.tls13);
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let bad = GOOD.replace("127.0.0.1:8443", "nope").replace("shards = 2", "shards = 0").replace("[\"127.0.0.1:9000\"]", "[\"x\"]");
        let errs = Config::parse(&bad, Path::new("/x.toml")).unwrap_err();
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["listen.addr", "listen.shards", "upstream.wsm[0]"]);
    }

    #[test]
    fn upgrade_pacing_defaults_and_is_checked() {
        assert_eq!(Config::parse(GOOD, Path::new("/x.toml")).unwrap().upgrade_moving_per_shard, 128);
        let set = format!("{GOOD}\n[upgrade]\nmoving_per_shard = 64\n");
        assert_eq!(Config::parse(&set, Path::new("/x.toml")).unwrap().upgrade_moving_per_shard, 64);
        let bad = format!("{GOOD}\n[upgrade]\nmoving_per_shard = 0\n");
        let errs = Config::parse(&bad, Path::new("/x.toml")).unwrap_err();
        assert_eq!(errs[0].key, "upgrade.moving_per_shard");
    }

    #[test]
    fn unknown_key_is_named() {
        let bad = GOOD.replace("shards = 2", "shardz = 2");
        let errs = Config::parse(&bad, Path::new("/x.toml")).unwrap_err();
        assert!(errs[0].msg.contains("shardz"), "{errs:?}");
        assert_eq!(errs[0].key, "(line 4)");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
    }
}
