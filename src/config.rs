//! Configuration: the TOML file as written, and the validated runtime config.
//!
//! Owns: parsing, defaults, and validation of every key into types that cannot
//! hold a bad value ([`Config`]). Relative paths are resolved against the
//! config file's directory. Every problem is reported with its key, all at
//! once. Never opens sockets; loading certificates (and checking the cipher
//! suite names against the crypto provider) is `tls::server`'s job. Imports
//! nothing of the proxy but `cpus` and `logging` (the filter check): the modules that use a config depend on
//! it, never the other way.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod admission;
pub mod file;

use file::ShardsFile;
pub use file::{BuffersFile, FileConfig};

/// The smallest I/O buffer: one whole TLS record (5-byte header, 2^14
/// bytes of plaintext, 2048 of expansion). The buffer pool uses it too.
pub const MIN_BUFFER: usize = 5 + (1 << 14) + 2048;

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
    /// `reload.close_spread_ms`: revoked connections close spread over this.
    pub reload_close_spread: Duration,
    /// `control.socket` (`None`: off).
    pub control_socket: Option<PathBuf>,
    /// `log.level` (`None`: as `--log` says).
    pub log_level: Option<String>,
    /// `[admission]`.
    pub admission: admission::Admission,
    /// `[drain]`.
    pub drain: admission::Drain,
}

/// Where the control socket is when `control.socket` is not set.
pub fn default_control_socket() -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several, separated by ':'; the first is ours.
        Some(d) if !d.is_empty() => {
            let d = d.to_string_lossy().split(':').next().unwrap_or("").to_string();
            PathBuf::from(d).join("control.sock")
        }
        _ => PathBuf::from("/run/holdfast/control.sock"),
    }
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub blocklist: Option<PathBuf>,
    pub labels: Option<PathBuf>,
    pub client_cas: Vec<(PathBuf, bool)>,
    pub handshake_timeout: Duration,
    pub key_update_after: u64,
    pub tls12: bool,
    pub tls13: bool,
    /// Empty = all supported suites.
    pub cipher_suites: Vec<String>,
}

impl TlsConfig {
    /// Each client CA's name for metrics and logs: its file's name.
    pub fn ca_names(&self) -> Vec<String> {
        self.client_cas
            .iter()
            .map(|(p, _)| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string()))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct WsConfig {
    pub max_request_bytes: usize,
    pub upgrade_timeout: Duration,
    pub max_message_bytes: usize,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    /// `None`: never.
    pub write_stall_timeout: Option<Duration>,
    pub forward_headers: Vec<String>,
    /// `max_age_secs` and its jitter (`None`: off).
    pub max_age: Option<admission::Age>,
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

fn ms(key: &str, v: u64, errs: &mut Vec<ConfigError>) -> Duration {
    if v == 0 {
        errs.push(err(key, "must be at least 1 (milliseconds)"));
    }
    Duration::from_millis(v)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        match Self::check(path) {
            (Some(c), errs) if errs.is_empty() => Ok(c),
            (_, errs) => Err(errs),
        }
    }

    /// Reads and validates a config file, returning every problem and,
    /// unless the file could not be read at all, the config as far as it is
    /// usable (a bad value replaced by a placeholder), so that callers can
    /// check the files it names in the same pass (`check-config` reports
    /// everything at once).
    pub fn check(path: &Path) -> (Option<Config>, Vec<ConfigError>) {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::check_on(&text, path, &crate::cpus::Facts::current()),
            Err(e) => (None, vec![err("(file)", format!("cannot read {}: {e}", path.display()))]),
        }
    }

    /// Validates config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
        Self::parse_on(text, path, &crate::cpus::Facts::current())
    }

    /// As [`Config::parse`], against the given CPU facts (tests).
    pub fn parse_on(text: &str, path: &Path, cpus: &crate::cpus::Facts) -> Result<Config, Vec<ConfigError>> {
        match Self::check_on(text, path, cpus) {
            (Some(c), errs) if errs.is_empty() => Ok(c),
            (_, errs) => Err(errs),
        }
    }

    /// As [`Config::check`], for text.
    pub fn check_on(text: &str, path: &Path, cpus: &crate::cpus::Facts) -> (Option<Config>, Vec<ConfigError>) {
        let (file, mut errs) = file::read(text);
        let Some(file) = file else {
            return (None, errs);
        };
        let (config, more) = Self::build(file, path, cpus);
        // A key left out for its bad type may be reported again as missing;
        // once is enough.
        let more: Vec<ConfigError> =
            more.into_iter().filter(|m| !m.msg.starts_with("required") || !errs.iter().any(|e| e.key == m.key)).collect();
        errs.extend(more);
        (Some(config), errs)
    }

    pub fn validate(f: FileConfig, path: &Path) -> Result<Config, Vec<ConfigError>> {
        Self::validate_on(f, path, &crate::cpus::Facts::current())
    }

    pub fn validate_on(f: FileConfig, path: &Path, facts: &crate::cpus::Facts) -> Result<Config, Vec<ConfigError>> {
        match Self::build(f, path, facts) {
            (c, errs) if errs.is_empty() => Ok(c),
            (_, errs) => Err(errs),
        }
    }

    /// The runtime config and every problem found; where a value is bad
    /// the config holds a placeholder, so it is usable only for checking.
    fn build(f: FileConfig, path: &Path, facts: &crate::cpus::Facts) -> (Config, Vec<ConfigError>) {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &str| {
            if Path::new(p).is_absolute() { PathBuf::from(p) } else { base.join(p) }
        };
        let mut errs = Vec::new();

        let required = |errs: &mut Vec<ConfigError>, key: &str, what: &str| errs.push(err(key, format!("required: {what}")));
        let listen = match &f.listen.addr {
            Some(a) => a.parse::<SocketAddr>().unwrap_or_else(|_| {
                errs.push(err("listen.addr", format!("'{a}' is not an address; write ip:port, e.g. \"0.0.0.0:443\" or \"[::]:443\"")));
                SocketAddr::from(([0, 0, 0, 0], 0))
            }),
            None => {
                required(&mut errs, "listen.addr", "the address devices connect to, e.g. \"0.0.0.0:443\"");
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        };
        let usable = facts.usable();
        let cpus = match &f.listen.cpus {
            Some(s) => match crate::cpus::parse_list(s) {
                Ok(list) => {
                    errs.extend(facts.refuse(&list).into_iter().map(|m| err("listen.cpus", m)));
                    list
                }
                Err(m) => {
                    errs.push(err("listen.cpus", m));
                    usable.clone()
                }
            },
            None => usable.clone(),
        };
        let cpus = if cpus.is_empty() { vec![0] } else { cpus };
        let shards = match &f.listen.shards {
            ShardsFile::Auto(s) if s == "auto" => cpus.len(),
            ShardsFile::Auto(s) => {
                errs.push(err("listen.shards", format!("'{s}': use \"auto\" or a number of shards from 1 to 1024")));
                1
            }
            ShardsFile::Count(0) => {
                errs.push(err("listen.shards", "0 shards: use \"auto\" or a number of shards from 1 to 1024"));
                1
            }
            ShardsFile::Count(n) if *n > 1024 => {
                errs.push(err("listen.shards", format!("{n} shards: at most 1024")));
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
        if t.cert_chain.is_none() {
            required(&mut errs, "tls.cert_chain", "a PEM file with the server certificate, then its intermediates");
        }
        if t.key.is_none() {
            required(&mut errs, "tls.key", "a PEM file with the server's private key");
        }
        for (i, c) in t.client_ca.iter().enumerate() {
            if c.file.is_none() {
                required(&mut errs, &format!("tls.client_ca[{i}].file"), "a PEM file with the CA certificates");
            }
        }
        let tls = TlsConfig {
            cert_chain: resolve(t.cert_chain.as_deref().unwrap_or("")),
            key: resolve(t.key.as_deref().unwrap_or("")),
            blocklist: t.blocklist.as_deref().map(resolve),
            labels: t.labels.as_deref().map(resolve),
            client_cas: t.client_ca.iter().filter_map(|c| Some((resolve(c.file.as_deref()?), c.ignore_validity))).collect(),
            handshake_timeout: ms("tls.handshake_timeout_ms", t.handshake_timeout_ms, &mut errs),
            key_update_after: t.key_update_after_records,
            tls12,
            tls13,
            cipher_suites: t.cipher_suites.clone(),
        };

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
            write_stall_timeout: secs(w.write_stall_timeout_secs),
            forward_headers: w.forward_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            max_age: admission::age(w.max_age_secs, w.max_age_jitter_secs, &mut errs),
        };

        let u = &f.upstream;
        if u.wsm.is_empty() {
            errs.push(err("upstream.wsm", "required: at least one WSM host, e.g. [\"10.0.0.5:9000\"]"));
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

        if f.buffers.size < MIN_BUFFER {
            errs.push(err("buffers.size", format!("must be at least {} (one TLS record)", MIN_BUFFER)));
        }
        if f.buffers.partial_bytes_per_shard < MIN_BUFFER as u64 {
            errs.push(err("buffers.partial_bytes_per_shard", format!("must be at least {} (one TLS record)", MIN_BUFFER)));
        }
        if f.buffers.per_shard < 16 {
            errs.push(err("buffers.per_shard", "must be at least 16"));
        }
        let metrics = f
            .metrics
            .addr
            .as_deref()
            .and_then(|a| a.parse().map_err(|_| errs.push(err("metrics.addr", format!("'{a}' is not an address")))).ok());

        let pid_file = f.upgrade.pid_file.as_deref().map(resolve);
        if let Some(p) = &pid_file {
            match p.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) if !dir.is_dir() => errs.push(err(
                    "upgrade.pid_file",
                    format!("directory {} does not exist (create it, or with systemd use RuntimeDirectory=)", dir.display()),
                )),
                _ => {}
            }
            if p.is_dir() {
                errs.push(err("upgrade.pid_file", format!("{} is a directory; name a file in it", p.display())));
            }
        }
        if !(1..=65_536).contains(&f.upgrade.moving_per_shard) {
            errs.push(err("upgrade.moving_per_shard", "must be between 1 and 65536"));
        }

        let control_socket = match f.control.socket.as_deref() {
            Some("off") => None,
            Some("") => {
                errs.push(err("control.socket", "empty: name a path, or \"off\""));
                None
            }
            Some(p) => Some(resolve(p)),
            None => Some(default_control_socket()),
        };
        if let Some(l) = &f.log.level
            && let Err(m) = crate::logging::check_filter(l)
        {
            errs.push(err("log.level", m));
        }
        if f.reload.close_spread_ms > 24 * 3_600_000 {
            errs.push(err("reload.close_spread_ms", "at most one day (86400000)"));
        }

        let config = Config {
            path: path.to_path_buf(),
            listen,
            shard_cpus,
            backlog: f.listen.backlog,
            tls,
            ws,
            upstream,
            buffers: f.buffers,
            metrics,
            pid_file,
            upgrade_moving_per_shard: f.upgrade.moving_per_shard as usize,
            reload_close_spread: Duration::from_millis(f.reload.close_spread_ms),
            control_socket,
            log_level: f.log.level.clone(),
            admission: admission::admission(&f.admission, &mut errs),
            drain: admission::drain(&f.drain, &mut errs),
        };
        (config, errs)
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
        let c = Config::parse_on(GOOD, Path::new("/etc/holdfast/holdfast.toml"), &two_cpus()).unwrap();
        assert_eq!(c.shard_cpus, vec![0, 1]);
        assert_eq!(c.tls.cert_chain, PathBuf::from("/etc/holdfast/server-chain.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/abs/server.key"));
        assert_eq!(c.tls.client_cas, vec![(PathBuf::from("/etc/holdfast/fleet-2019.pem"), true)]);
        assert!(c.tls.tls12 && c.tls.tls13);
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let bad = GOOD.replace("127.0.0.1:8443", "nope").replace("shards = 2", "shards = 0").replace("[\"127.0.0.1:9000\"]", "[\"x\"]");
        let errs = Config::parse_on(&bad, Path::new("/x.toml"), &two_cpus()).unwrap_err();
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["listen.addr", "listen.shards", "upstream.wsm[0]"]);
    }

    #[test]
    fn upgrade_pacing_defaults_and_is_checked() {
        assert_eq!(Config::parse_on(GOOD, Path::new("/x.toml"), &two_cpus()).unwrap().upgrade_moving_per_shard, 128);
        let set = format!("{GOOD}\n[upgrade]\nmoving_per_shard = 64\n");
        assert_eq!(Config::parse_on(&set, Path::new("/x.toml"), &two_cpus()).unwrap().upgrade_moving_per_shard, 64);
        let bad = format!("{GOOD}\n[upgrade]\nmoving_per_shard = 0\n");
        let errs = Config::parse_on(&bad, Path::new("/x.toml"), &two_cpus()).unwrap_err();
        assert_eq!(errs[0].key, "upgrade.moving_per_shard");
    }

    #[test]
    fn unknown_key_is_named() {
        let bad = GOOD.replace("shards = 2", "shardz = 2");
        let errs = Config::parse_on(&bad, Path::new("/x.toml"), &two_cpus()).unwrap_err();
        assert_eq!(errs[0].key, "listen.shardz", "{errs:?}");
        assert!(errs[0].msg.contains("unknown key 'shardz'"), "{errs:?}");
    }

    fn two_cpus() -> crate::cpus::Facts {
        crate::cpus::Facts { online: vec![0, 1], allowed: vec![0, 1] }
    }

    #[test]
    fn a_hostile_cpu_list_is_refused_without_expanding_it() {
        let bad = GOOD.replace("cpus = \"0-1\"", "cpus = \"0-99999999999\"");
        let errs = Config::parse_on(&bad, Path::new("/x.toml"), &two_cpus()).unwrap_err();
        assert_eq!(errs[0].key, "listen.cpus");
        assert!(errs[0].msg.contains("out of range"), "{errs:?}");
    }

    #[test]
    fn cpus_must_be_online_and_allowed() {
        let facts = crate::cpus::Facts { online: vec![0, 1, 2, 3], allowed: vec![1, 2] };
        let bad = GOOD.replace("cpus = \"0-1\"", "cpus = \"0-1,7\"");
        let errs = Config::parse_on(&bad, Path::new("/x.toml"), &facts).unwrap_err();
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs[0].starts_with("listen.cpus: CPU 7 not online (online: 0-3)"), "{msgs:?}");
        assert!(msgs[1].starts_with("listen.cpus: CPU 0 not allowed") && msgs[1].contains("allowed: 1-2"), "{msgs:?}");
    }

    #[test]
    fn auto_shards_use_the_allowed_cpus() {
        let facts = crate::cpus::Facts { online: vec![0, 1, 2, 3], allowed: vec![1, 3] };
        let auto = GOOD.replace("shards = 2\ncpus = \"0-1\"\n", "");
        let c = Config::parse_on(&auto, Path::new("/x.toml"), &facts).unwrap();
        assert_eq!(c.shard_cpus, vec![1, 3]);
    }

    #[test]
    fn a_pid_file_needs_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ok = format!("{GOOD}\n[upgrade]\npid_file = \"{}/holdfast.pid\"\n", dir.path().display());
        assert!(Config::parse_on(&ok, Path::new("/x.toml"), &two_cpus()).is_ok());
        let bad = format!("{GOOD}\n[upgrade]\npid_file = \"{}/nope/holdfast.pid\"\n", dir.path().display());
        let errs = Config::parse_on(&bad, Path::new("/x.toml"), &two_cpus()).unwrap_err();
        assert_eq!(errs[0].key, "upgrade.pid_file");
        assert!(errs[0].msg.contains("does not exist"), "{errs:?}");
    }

    #[test]
    fn missing_required_keys_are_all_named() {
        let errs = Config::parse_on("[tls]\n[[tls.client_ca]]\n", Path::new("/x.toml"), &two_cpus()).unwrap_err();
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["listen.addr", "tls.cert_chain", "tls.key", "tls.client_ca[0].file", "upstream.wsm"], "{errs:?}");
        assert!(errs.iter().all(|e| e.msg.starts_with("required")), "{errs:?}");
    }

    #[test]
    fn type_and_value_errors_come_together() {
        let bad = format!("{GOOD}\n[websocket]\nidle_timeout_secs = -1\nmax_message_bytes = 0\n").replace("shards = 2", "shards = 0");
        let errs = Config::parse_on(&bad, Path::new("/x.toml"), &two_cpus()).unwrap_err();
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["websocket.idle_timeout_secs", "listen.shards", "websocket.max_message_bytes"], "{errs:?}");
    }
}
