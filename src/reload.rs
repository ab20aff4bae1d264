//! Live reconfiguration, node side: a config generation, and how the next
//! one is made from the files.
//!
//! Owns: [`Generation`] (one config, its TLS context and WSM pool, whole,
//! numbered), reading and validating the config and every file it names
//! into the next generation (all or nothing: a problem anywhere refuses the
//! reload and names its key), the keys a reload cannot change (named in
//! the answer, which points to `holdfast upgrade`), what changed and so what
//! the shards must do about established connections ([`Recheck`]), and the
//! hash of the inputs. Never touches a shard or a socket: `proxy` sends a
//! generation to every shard and collects their answers.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::tls::server::TlsContext;

/// One configuration, whole: every shard runs by exactly one at a time.
pub struct Generation {
    pub number: u64,
    pub cfg: Arc<Config>,
    pub tls: TlsContext,
    /// The WSM pool's addresses for `cfg.upstream.wsm`, resolved.
    pub wsms: Vec<crate::resolve::Wsm>,
    /// SHA-256 (hex) of the config text and every file it names.
    pub hash: String,
    /// What established connections must be checked against.
    pub recheck: Recheck,
    /// Limits or timeouts changed: every tunnel takes them up at once.
    pub wake: bool,
    /// The device labels changed: these are the ones before (each open
    /// stream whose labels differ now is told, with LABELS).
    pub relabel: Option<Arc<crate::tls::labels::Labels>>,
    /// `holdfast reload --migrate-over`: connections made under an older
    /// server certificate close (1001) spread over this, for new handshakes.
    pub migrate: Option<std::time::Duration>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Generation({}, {:?})", self.number, self.recheck)
    }
}

impl Generation {
    /// The next generation when only the blocklist changed in place (`ctl
    /// block`, the fleet-wide entries): the same config and TLS context
    /// (whose verifier already holds the new list), `hash` of the inputs;
    /// established connections are checked again if entries were `added`.
    pub fn blocklist_changed(&self, hash: String, added: bool) -> Generation {
        Generation {
            number: self.number + 1,
            cfg: self.cfg.clone(),
            tls: self.tls.clone(),
            wsms: Vec::new(),
            hash,
            recheck: if added { Recheck::Blocklist } else { Recheck::Nothing },
            wake: false,
            relabel: None,
            migrate: None,
        }
    }
}

/// What a new generation asks of established connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    /// Nothing a connection was admitted by changed (a server certificate
    /// rotation, timeouts, the WSM list): no connection is looked at.
    Nothing,
    /// The blocklist changed: each identity is checked against it (and
    /// against its CA's validity rule, which did not change).
    Blocklist,
    /// The CA set changed: identities whose issuing CA group is not one of
    /// these (digests of the groups before) are verified again in full.
    Cas { before: Vec<[u8; 32]> },
}

/// A reload's result, as `holdfast reload` and `ctl status` show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub ok: bool,
    /// The generation serving after it.
    pub generation: u64,
    pub hash: String,
    /// What changed, in words (empty when nothing did).
    pub changed: Vec<String>,
    /// Keys that changed but only take effect with `holdfast upgrade`.
    pub needs_upgrade: Vec<String>,
    /// Why it was refused (each `key: problem`); empty when applied.
    pub errors: Vec<String>,
    /// When it was tried (Unix seconds).
    pub at: i64,
}

impl Outcome {
    /// A change in force (or nothing to change) as of generation `g`.
    pub fn applied(g: &Generation, changed: Vec<String>, needs_upgrade: Vec<String>, at: i64) -> Outcome {
        Outcome { ok: true, generation: g.number, hash: g.hash.clone(), changed, needs_upgrade, errors: Vec::new(), at }
    }
}

/// The SHA-256 (hex) of the config text and the files it names.
pub fn hash_inputs(cfg: &Config) -> String {
    let mut all = std::fs::read(&cfg.path).unwrap_or_default();
    let t = &cfg.tls;
    let mut files = vec![t.cert_chain.clone(), t.key.clone()];
    files.extend(t.client_cas.iter().map(|(p, _)| p.clone()));
    files.extend(t.blocklist.clone());
    files.extend(t.labels.clone());
    for f in files {
        all.extend_from_slice(f.to_string_lossy().as_bytes());
        all.push(0);
        all.extend_from_slice(&crate::identity::sha256(&std::fs::read(&f).unwrap_or_default()));
    }
    crate::identity::sha256(&all).iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys a running holdfast cannot change in place (they are its
/// sockets, threads and memory) that differ between `old` and `new`.
pub fn needs_upgrade(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    let mut differ = |key: &str, d: bool| {
        if d {
            v.push(key.to_string());
        }
    };
    differ("listen.addr", old.listen != new.listen);
    differ("listen.shards / listen.cpus", old.shard_cpus != new.shard_cpus);
    differ("listen.backlog", old.backlog != new.backlog);
    differ(
        "buffers",
        (old.buffers.per_shard, old.buffers.size, old.buffers.partial_bytes_per_shard)
            != (new.buffers.per_shard, new.buffers.size, new.buffers.partial_bytes_per_shard),
    );
    differ("metrics.addr", old.metrics != new.metrics);
    differ("upgrade.pid_file", old.pid_file != new.pid_file);
    differ("control.socket", old.control_socket != new.control_socket);
    differ("websocket.max_message_bytes", old.ws.max_message_bytes != new.ws.max_message_bytes);
    differ("upstream.stream_window", old.upstream.stream_window != new.upstream.stream_window);
    differ("upstream.node", old.upstream.node != new.upstream.node);
    v
}

/// Reads the config at `path` and every file it names into the generation
/// after `current`. Refused whole (every problem, each naming its key) if
/// anything is wrong. Keys that cannot change in place keep `current`'s
/// values in the new generation and are listed in the second value.
/// `file_blocklist` is the blocklist the running generation read from its
/// file (the verifier may hold more: a fleet-wide follower's entries).
pub fn prepare(
    path: &Path,
    current: &Generation,
    file_blocklist: &crate::tls::blocklist::Blocklist,
) -> Result<(Generation, Vec<String>, Vec<String>), Vec<ConfigError>> {
    let (cfg, mut errs) = Config::check(path);
    let Some(mut cfg) = cfg else { return Err(errs) };
    if !errs.iter().any(|e| e.key.starts_with("tls")) {
        match TlsContext::load_next(&cfg.tls, &current.tls) {
            Ok(tls) if errs.is_empty() => {
                let fixed = needs_upgrade(&current.cfg, &cfg);
                keep_fixed(&mut cfg, &current.cfg);
                let blocklist_changed = *tls.verifier.blocklist() != *file_blocklist;
                let mut changed = describe(&current.cfg, &current.tls, &cfg, &tls);
                if blocklist_changed {
                    changed.push("blocklist".into());
                }
                let recheck = if !tls.same_cas(&current.tls) {
                    Recheck::Cas { before: current.tls.verifier.group_digests() }
                } else if blocklist_changed {
                    Recheck::Blocklist
                } else {
                    Recheck::Nothing
                };
                let wake = limits_differ(&current.cfg, &cfg);
                let hash = hash_inputs(&cfg);
                let relabel = (*current.tls.labels != *tls.labels).then(|| current.tls.labels.clone());
                let g = Generation {
                    number: current.number + 1,
                    cfg: Arc::new(cfg),
                    tls,
                    wsms: Vec::new(),
                    hash,
                    recheck,
                    wake,
                    relabel,
                    migrate: None,
                };
                return Ok((g, changed, fixed));
            }
            Ok(_) => {}
            Err(more) => errs.extend(more),
        }
    }
    Err(errs)
}

/// The keys a reload cannot change stay as they are.
fn keep_fixed(new: &mut Config, old: &Config) {
    new.listen = old.listen;
    new.shard_cpus = old.shard_cpus.clone();
    new.backlog = old.backlog;
    new.buffers = old.buffers.clone();
    new.metrics = old.metrics;
    new.pid_file = old.pid_file.clone();
    new.control_socket = old.control_socket.clone();
    new.ws.max_message_bytes = old.ws.max_message_bytes;
    new.upstream.stream_window = old.upstream.stream_window;
    new.upstream.node = old.upstream.node.clone();
}

/// Whether anything a tunnel or set-up decides by changed.
fn limits_differ(a: &Config, b: &Config) -> bool {
    let (w, v) = (&a.ws, &b.ws);
    let (u, t) = (&a.upstream, &b.upstream);
    (w.idle_timeout, w.ping_interval, w.write_stall_timeout) != (v.idle_timeout, v.ping_interval, v.write_stall_timeout)
        || (u.resume_timeout, u.open_timeout, u.held_bytes_per_connection)
            != (t.resume_timeout, t.open_timeout, t.held_bytes_per_connection)
}

/// What changed, in words, for the log and the reload's answer.
fn describe(a: &Config, at: &TlsContext, b: &Config, bt: &TlsContext) -> Vec<String> {
    let mut v = Vec::new();
    let mut note = |d: bool, what: &str| {
        if d {
            v.push(what.to_string());
        }
    };
    note(at.server_fingerprint != bt.server_fingerprint, "server certificate");
    note(!at.same_cas(bt), "client CAs");
    note(*at.labels != *bt.labels, "device labels");
    note((a.tls.tls12, a.tls.tls13, &a.tls.cipher_suites) != (b.tls.tls12, b.tls.tls13, &b.tls.cipher_suites), "TLS versions or suites");
    note(a.upstream.wsm != b.upstream.wsm || a.upstream.links_per_shard != b.upstream.links_per_shard, "WSM hosts");
    note(a.log_level != b.log_level, "log level");
    note(a.admission != b.admission, "admission limits");
    note(a.drain != b.drain, "drain.stop_over_ms");
    note(a.ws.max_age != b.ws.max_age, "connection age");
    note(limits_differ(a, b), "connection timeouts and limits");
    note(
        (a.tls.handshake_timeout, a.ws.upgrade_timeout, a.ws.max_request_bytes, &a.ws.forward_headers, a.tls.key_update_after)
            != (b.tls.handshake_timeout, b.ws.upgrade_timeout, b.ws.max_request_bytes, &b.ws.forward_headers, b.tls.key_update_after),
        "set-up timeouts and limits",
    );
    note(
        (a.upstream.connect_timeout, a.upstream.ping_interval, a.upstream.liveness_timeout, a.upstream.dns_refresh)
            != (b.upstream.connect_timeout, b.upstream.ping_interval, b.upstream.liveness_timeout, b.upstream.dns_refresh),
        "link timeouts",
    );
    note(
        (
            a.upstream.resume_per_sec,
            a.upstream.close_spread,
            a.upstream.held_bytes_per_shard,
            a.reload_close_spread,
            a.upgrade_moving_per_shard,
        ) != (
            b.upstream.resume_per_sec,
            b.upstream.close_spread,
            b.upstream.held_bytes_per_shard,
            b.reload_close_spread,
            b.upgrade_moving_per_shard,
        ),
        "rates and spreads",
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        let facts = crate::cpus::Facts { online: vec![0, 1], allowed: vec![0, 1] };
        Config::parse_on(text, Path::new("/etc/holdfast/holdfast.toml"), &facts).unwrap()
    }

    const BASE: &str = "[listen]\naddr = \"127.0.0.1:8443\"\nshards = 2\n[tls]\ncert_chain = \"c.pem\"\nkey = \"k.pem\"\n\
                        [[tls.client_ca]]\nfile = \"ca.pem\"\n[upstream]\nwsm = [\"127.0.0.1:9000\"]\n";

    #[test]
    fn keys_a_reload_cannot_change_are_named_and_kept() {
        let old = cfg(BASE);
        let changed = BASE.replace("8443", "9443").replace("shards = 2", "shards = 1") + "[websocket]\nidle_timeout_secs = 5\n";
        let mut new = cfg(&changed);
        let fixed = needs_upgrade(&old, &new);
        assert_eq!(fixed, vec!["listen.addr", "listen.shards / listen.cpus"]);
        keep_fixed(&mut new, &old);
        assert_eq!(new.listen, old.listen);
        assert_eq!(new.shard_cpus, old.shard_cpus);
        assert_eq!(new.ws.idle_timeout, Some(std::time::Duration::from_secs(5)), "what can change does");
        assert!(needs_upgrade(&old, &new).is_empty());
    }

    #[test]
    fn only_what_tunnels_decide_by_wakes_them() {
        let old = cfg(BASE);
        assert!(!limits_differ(&old, &cfg(&(BASE.to_string() + "[reload]\nclose_spread_ms = 5\n"))));
        assert!(limits_differ(&old, &cfg(&(BASE.to_string() + "[websocket]\nping_interval_secs = 7\n"))));
        assert!(limits_differ(&old, &cfg(&BASE.replace("[upstream]\n", "[upstream]\nresume_timeout_ms = 1234\n"))));
    }
}
