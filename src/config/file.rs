//! The config file as written: one serde struct per table, a doc comment on
//! every key, defaults, and reading TOML text into them with every problem
//! named by its key path.
//!
//! Owns: the file's shape (which keys exist, their types and defaults) and
//! turning serde's and the TOML parser's complaints into [`ConfigError`]s
//! that name the key (`websocket.idle_timeout_secs`), say what is allowed,
//! and never show a Rust type name; all of them at once, not the first
//! only. Never checks values against each other or the machine: that is
//! validation's job (`config.rs`). Required keys are `Option` here so that
//! a missing one is reported by validation together with everything else.

use serde::Deserialize;

use super::{ConfigError, err};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: ListenFile,
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default)]
    pub websocket: WebSocketFile,
    #[serde(default)]
    pub upstream: UpstreamFile,
    #[serde(default)]
    pub buffers: BuffersFile,
    #[serde(default)]
    pub metrics: MetricsFile,
    #[serde(default)]
    pub upgrade: UpgradeFile,
    #[serde(default)]
    pub reload: ReloadFile,
    #[serde(default)]
    pub control: ControlFile,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub admission: super::admission::AdmissionFile,
    #[serde(default)]
    pub drain: super::admission::DrainFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadFile {
    /// After a reload (or `holdfast ctl block`) that makes established
    /// devices no longer allowed, each is closed (1008) at a random moment
    /// within this many milliseconds, never all at once.
    pub close_spread_ms: u64,
}

impl Default for ReloadFile {
    fn default() -> Self {
        ReloadFile { close_spread_ms: 10_000 }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// The operators' control socket (`holdfast ctl`, `holdfast reload`).
    /// Default: `control.sock` in `$RUNTIME_DIRECTORY` (systemd's
    /// `RuntimeDirectory=`), else `/run/holdfast/control.sock`. `"off"`: none.
    pub socket: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// Log filter, as `--log` (which it overrides when set); changes on reload.
    pub level: Option<String>,
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
#[serde(untagged, expecting = "\"auto\" or a number of shards from 1 to 1024")]
pub enum ShardsFile {
    /// `"auto"`: one shard per CPU in `cpus` (or per online CPU).
    Auto(String),
    Count(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    /// Address devices connect to, e.g. "0.0.0.0:443". Every shard binds it
    /// with SO_REUSEPORT. Required.
    pub addr: Option<String>,
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

impl Default for ListenFile {
    fn default() -> Self {
        ListenFile { addr: None, shards: default_shards(), cpus: None, backlog: default_backlog() }
    }
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
    /// PEM file with the server certificate, then its intermediates. Required.
    pub cert_chain: Option<String>,
    /// PEM file with the server's private key (PKCS#8, SEC1 or PKCS#1). Required.
    pub key: Option<String>,
    /// Optional blocklist file (see README: fingerprints or serial:<hex>).
    pub blocklist: Option<String>,
    /// Optional device labels file (TOML: device key = [labels]), sent to
    /// the WSM in each stream's OPEN (`docs/reload.md`).
    pub labels: Option<String>,
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

impl Default for TlsFile {
    fn default() -> Self {
        TlsFile {
            cert_chain: None,
            key: None,
            blocklist: None,
            labels: None,
            client_ca: Vec::new(),
            handshake_timeout_ms: default_handshake_timeout(),
            key_update_after_records: default_key_update(),
            versions: default_versions(),
            cipher_suites: Vec::new(),
        }
    }
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
    /// PEM file with one or more CA certificates. Required.
    pub file: Option<String>,
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
    /// Seconds a device may go without reading while holdfast has bytes for
    /// it; then it is closed (0 = never). Bounds what a device that stopped
    /// reading holds: its stream's window and one I/O buffer.
    pub write_stall_timeout_secs: u64,
    /// Request headers passed to the WSM (lowercase names).
    pub forward_headers: Vec<String>,
    /// Seconds after which a connection is closed with 1001 so that its
    /// device reconnects (0 = never): each connection draws its own age
    /// from `max_age_secs` to `max_age_secs + max_age_jitter_secs`, so the
    /// reconnects after a scale-out or a policy change spread evenly.
    pub max_age_secs: u64,
    pub max_age_jitter_secs: u64,
}

impl Default for WebSocketFile {
    fn default() -> Self {
        WebSocketFile {
            max_request_bytes: 8192,
            upgrade_timeout_ms: 10_000,
            max_message_bytes: 1 << 20,
            idle_timeout_secs: 600,
            ping_interval_secs: 0,
            write_stall_timeout_secs: 120,
            forward_headers: vec!["user-agent".into(), "origin".into(), "x-device-firmware".into()],
            max_age_secs: 0,
            max_age_jitter_secs: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// WSM hosts, "host:port" (at least one).
    #[serde(default)]
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

impl Default for UpstreamFile {
    fn default() -> Self {
        UpstreamFile {
            wsm: Vec::new(),
            links_per_shard: one(),
            node: None,
            connect_timeout_ms: default_connect_timeout(),
            open_timeout_ms: default_open_timeout(),
            stream_window: default_stream_window(),
            ping_interval_ms: default_ping(),
            dns_refresh_ms: default_dns_refresh(),
            liveness_timeout_ms: default_liveness(),
            resume_timeout_ms: default_resume_timeout(),
            close_spread_ms: default_close_spread(),
            resume_per_sec: default_resume_rate(),
            held_bytes_per_connection: default_held_conn(),
            held_bytes_per_shard: default_held_shard(),
        }
    }
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
    /// Bytes of partial TLS records a shard keeps for connections that wait
    /// for the rest (off the pool, so they pin no buffer). Past it, the
    /// oldest holders are closed (1008, counted).
    pub partial_bytes_per_shard: u64,
}

impl Default for BuffersFile {
    fn default() -> Self {
        BuffersFile { per_shard: 1024, size: 20 * 1024, partial_bytes_per_shard: 64 << 20 }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Address of the Prometheus text endpoint (GET /metrics); off if unset.
    pub addr: Option<String>,
}

/// Reads config text. Returns the file (when its shape is usable at all)
/// and every problem found, each named by its key. A value of the wrong
/// type or an unknown key is reported and left out, so the rest is still
/// read and checked (a left-out key takes its default, or is reported
/// missing by validation).
pub fn read(text: &str) -> (Option<FileConfig>, Vec<ConfigError>) {
    let mut doc: toml::Table = match text.parse::<toml::Table>() {
        Ok(t) => t,
        Err(e) => return (None, vec![syntax_error(text, &e)]),
    };
    let mut errs = Vec::new();
    // Each round reports one problem and removes the key; a file has far
    // fewer keys than this.
    for _ in 0..4096 {
        match serde_path_to_error::deserialize::<_, FileConfig>(toml::Value::Table(doc.clone())) {
            Ok(f) => return (Some(f), errs),
            Err(e) => {
                let mut path: Vec<Seg> = e.path().iter().filter_map(Seg::from_serde).collect();
                let raw = e.inner().message().to_string();
                // serde names an unknown key in its message, not its path.
                if let Some(name) = unknown_key(&raw)
                    && path.last() != Some(&Seg::Key(name.clone()))
                {
                    path.push(Seg::Key(name));
                }
                errs.push(err(&key_path(&path), humanize(&raw)));
                if path.is_empty() || !remove(&mut doc, &path) {
                    return (None, errs);
                }
            }
        }
    }
    (None, errs)
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn from_serde(s: &serde_path_to_error::Segment) -> Option<Seg> {
        match s {
            serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => None,
        }
    }
}

/// `tls.client_ca[1].file`.
fn key_path(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    if s.is_empty() { "(file)".into() } else { s }
}

/// Removes the value at `path`; false if there was none.
fn remove(doc: &mut toml::Table, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut here: &mut toml::Value = match parents.first() {
        Some(Seg::Key(k)) => match doc.get_mut(k) {
            Some(v) => v,
            None => return false,
        },
        Some(Seg::Index(_)) => return false,
        None => {
            return match last {
                Seg::Key(k) => doc.remove(k).is_some(),
                Seg::Index(_) => false,
            };
        }
    };
    for seg in &parents[1..] {
        let next = match (seg, here) {
            (Seg::Key(k), toml::Value::Table(t)) => t.get_mut(k),
            (Seg::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(v) => here = v,
            None => return false,
        }
    }
    match (last, here) {
        (Seg::Key(k), toml::Value::Table(t)) => t.remove(k).is_some(),
        (Seg::Index(i), toml::Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

fn unknown_key(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest.split_once('`')?.0.to_string())
}

/// serde's message in an operator's words: no Rust type names.
fn humanize(msg: &str) -> String {
    if let Some(name) = unknown_key(msg) {
        let known = msg.split_once(", expected one of ").or_else(|| msg.split_once(", expected ")).map(|(_, k)| k.replace('`', ""));
        return match known {
            Some(k) => format!("unknown key '{name}'; the keys allowed here are: {k}"),
            None => format!("unknown key '{name}'; this table takes no keys"),
        };
    }
    match msg.rsplit_once(", expected ") {
        Some((got, expected)) => {
            let got = got.trim_start_matches("invalid type: ").trim_start_matches("invalid value: ").replace('`', "");
            format!("{got} is not allowed here; expected {}", expected_text(expected))
        }
        None => msg.to_string(),
    }
}

fn expected_text(e: &str) -> String {
    let range = |max: u64| format!("a whole number from 0 to {max}");
    match e {
        "u8" => range(u8::MAX as u64),
        "u16" => range(u16::MAX as u64),
        "u32" => range(u32::MAX as u64),
        "u64" | "usize" => range(u64::MAX),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a string" | "a borrowed string" => "a string in double quotes".into(),
        "a sequence" => "a list, e.g. [\"a\", \"b\"]".into(),
        s if s.starts_with("struct ") || s.starts_with("a map") => "a table (a [section], or { key = value, ... })".into(),
        s if s.starts_with("enum ") || s.starts_with("variant ") => "one of the documented values".into(),
        other => other.to_string(),
    }
}

/// A TOML syntax error, named by the key on (or the table above) the line
/// where it happened.
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return err("(file)", format!("not valid TOML: {msg}"));
    };
    let upto = &text[..span.start.min(text.len())];
    let line = upto.matches('\n').count() + 1;
    let col = upto.len() - upto.rfind('\n').map_or(0, |i| i + 1) + 1;
    let key = key_at_line(text, line).unwrap_or_else(|| "(file)".into());
    err(&key, format!("line {line}, column {col}: not valid TOML: {msg}"))
}

/// The key path a line of TOML text belongs to: the last `[table]` header
/// above it, plus the key the line assigns, if any. A best effort for
/// naming syntax errors; never used to read values.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    for l in text.lines().take(line.saturating_sub(1)) {
        let t = l.trim();
        if t.starts_with('[') {
            table = t.trim_start_matches('[').split(']').next().unwrap_or("").trim().to_string();
        }
    }
    let here = text.lines().nth(line.saturating_sub(1)).unwrap_or("").trim();
    let key = here.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string()).filter(|k| !k.is_empty() && !k.starts_with('['));
    match (table.is_empty(), key) {
        (_, None) if here.starts_with('[') => Some(here.trim_start_matches('[').split(']').next().unwrap_or("").trim().to_string()),
        (true, None) => None,
        (false, None) => Some(table),
        (true, Some(k)) => Some(k),
        (false, Some(k)) => Some(format!("{table}.{k}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<(String, String)> {
        read(text).1.into_iter().map(|e| (e.key, e.msg)).collect()
    }

    #[test]
    fn a_wrong_type_names_its_key_and_what_is_allowed() {
        let e = keys("[websocket]\nidle_timeout_secs = -1\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, "websocket.idle_timeout_secs");
        assert!(e[0].1.contains("-1") && e[0].1.contains("whole number from 0"), "{e:?}");
        assert!(!e[0].1.contains("u64"), "{e:?}");
    }

    #[test]
    fn shards_says_what_it_takes_without_a_type_name() {
        let e = keys("[listen]\nshards = true\n");
        assert_eq!(e[0].0, "listen.shards", "{e:?}");
        assert!(e[0].1.contains("\"auto\" or a number of shards"), "{e:?}");
        assert!(!e[0].1.contains("ShardsFile") && !e[0].1.contains("untagged"), "{e:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[listen]\nshardz = 2\nbacklog = \"x\"\n[websocket]\nidle_timeout_secs = -1\nping_interval_secs = true\n[[tls.client_ca]]\nfile = 5\n[bogus]\n";
        let (f, e) = read(text);
        let ks: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "listen.shardz",
            "listen.backlog",
            "websocket.idle_timeout_secs",
            "websocket.ping_interval_secs",
            "tls.client_ca[0].file",
            "bogus",
        ] {
            assert!(ks.contains(&k), "{k} missing from {ks:?}");
        }
        assert_eq!(e.len(), 6, "{e:?}");
        assert!(f.is_some(), "the rest is still read");
        let shardz = e.iter().find(|e| e.key == "listen.shardz").unwrap();
        assert!(shardz.msg.contains("unknown key 'shardz'") && shardz.msg.contains("addr"), "{shardz:?}");
    }

    #[test]
    fn syntax_errors_name_the_key_and_line() {
        let e = keys("[listen]\naddr = \"127.0.0.1:1\"\n[websocket]\nidle_timeout_secs = 12x\n");
        assert_eq!(e[0].0, "websocket.idle_timeout_secs", "{e:?}");
        assert!(e[0].1.contains("line 4"), "{e:?}");
        let e = keys("[listen]\naddr = 1\naddr = 2\n");
        assert_eq!(e[0].0, "listen.addr", "{e:?}");
    }

    #[test]
    fn key_paths() {
        assert_eq!(
            key_path(&[Seg::Key("tls".into()), Seg::Key("client_ca".into()), Seg::Index(1), Seg::Key("file".into())]),
            "tls.client_ca[1].file"
        );
        assert_eq!(key_path(&[]), "(file)");
    }
}
