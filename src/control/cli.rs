//! `holdfast ctl` and `holdfast reload`: the commands, and how answers are
//! printed (for people, or `--json`).
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::time::Duration;

use super::{Filter, Request, Response, client};
use crate::{esay, say};

/// Where the control socket is.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The control socket (default: the config's `[control] socket`).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// The running instance's config file, to find its control socket.
    #[arg(long, short, global = true, default_value = "/etc/holdfast/holdfast.toml")]
    pub config: PathBuf,
    /// Seconds to wait for the answer.
    #[arg(long, global = true, default_value_t = 60)]
    pub timeout: u64,
}

impl Target {
    /// The socket path: given, or the one the config names.
    pub fn socket(&self) -> Result<PathBuf, String> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        match crate::config::Config::check(&self.config) {
            (Some(c), _) => c.control_socket.ok_or_else(|| format!("{}: control.socket is \"off\"", self.config.display())),
            (None, errs) => {
                Err(format!("{}: {}", self.config.display(), errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")))
            }
        }
    }
}

/// The operators' commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCmd {
    /// Version, uptime, config generation and hash, last reload, connections, links, held streams.
    Status {
        /// Print the answer as JSON (schema: docs/control.md).
        #[arg(long)]
        json: bool,
    },
    /// Re-read the config and every file it names; print the outcome (non-zero if refused).
    Reload {
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        /// After a server certificate rotation: close (1001) the connections
        /// made under an older certificate at random moments within this
        /// window (e.g. 30m), so their devices reconnect and get the new one.
        #[arg(long, value_parser = parse_duration)]
        migrate_over: Option<Duration>,
    },
    /// Stop accepting (listeners closed), then close every connection with a
    /// WebSocket close frame and TLS close_notify at a random moment within
    /// the window; `--cancel` stops it and accepts again.
    Drain {
        /// The window, e.g. 90s, 30m, 2h (a number alone is seconds).
        #[arg(long, value_parser = parse_duration, required_unless_present = "cancel")]
        over: Option<Duration>,
        /// The close code devices get: 1001 (going away) or 1012 (service restart).
        #[arg(long, default_value_t = 1001)]
        code: u16,
        /// Stop the drain under way: the connections not yet closed stay and
        /// the node accepts again.
        #[arg(long, conflicts_with_all = ["over"])]
        cancel: bool,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Block a device: a SHA-256 fingerprint (64 hex digits) or serial:<hex>.
    /// Applied at once, written to the blocklist file, matching devices closed within the spread.
    Block {
        /// The blocklist entry.
        entry: String,
    },
    /// Remove a blocklist entry (as given to `block`).
    Unblock {
        /// The blocklist entry.
        entry: String,
    },
    /// Count the connections that match, and list a sample.
    Connections {
        /// Only devices of this CA (its file name as configured, e.g. fleet-2024.pem).
        #[arg(long)]
        ca: Option<String>,
        /// Only the device with this SHA-256 fingerprint.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Only devices with this serial (hex).
        #[arg(long)]
        serial: Option<String>,
        /// Only devices whose subject contains this.
        #[arg(long)]
        subject: Option<String>,
        /// Only devices on this WSM (host as configured, or address).
        #[arg(long)]
        wsm: Option<String>,
        /// How many to list.
        #[arg(long, default_value_t = 20)]
        sample: usize,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Close one connection (by its ID, as `connections` lists it) with a WebSocket close code.
    Kick {
        /// The connection ID (32 hex digits).
        id: String,
        /// The close code the device gets.
        #[arg(long, default_value_t = 1008)]
        code: u16,
    },
}

/// Runs one command; the process's exit status (0 done, 1 refused or failed).
pub fn run(target: &Target, cmd: &CtlCmd) -> u8 {
    let socket = match target.socket() {
        Ok(s) => s,
        Err(e) => {
            esay!("holdfast ctl: {e}");
            return 1;
        }
    };
    let (req, json) = match cmd.clone() {
        CtlCmd::Status { json } => (Request::Status, json),
        CtlCmd::Reload { json, migrate_over } => {
            (Request::Reload { migrate_over_ms: migrate_over.map(|d| d.as_millis().min(u64::MAX as u128) as u64) }, json)
        }
        CtlCmd::Drain { over, code, cancel, json } => {
            (Request::Drain { over_ms: over.map(|d| d.as_millis().min(u64::MAX as u128) as u64).unwrap_or(0), code, cancel }, json)
        }
        CtlCmd::Block { entry } => (Request::Block { entry }, false),
        CtlCmd::Unblock { entry } => (Request::Unblock { entry }, false),
        CtlCmd::Connections { ca, fingerprint, serial, subject, wsm, sample, json } => {
            (Request::Connections { filter: Filter { ca, fingerprint, serial, subject, wsm }, sample }, json)
        }
        CtlCmd::Kick { id, code } => (Request::Kick { id, code }, false),
    };
    let r = match client::call(&socket, &req, Duration::from_secs(target.timeout)) {
        Ok(r) => r,
        Err(e) => {
            esay!("holdfast ctl: {e}");
            return 1;
        }
    };
    if json {
        say!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        print(&r);
    }
    u8::from(!r.ok)
}

fn print(r: &Response) {
    if let Some(o) = &r.outcome {
        if o.ok {
            let what = if o.changed.is_empty() { "nothing changed".to_string() } else { o.changed.join(", ") };
            say!("applied: generation {} ({what}); config hash {}", o.generation, &o.hash[..o.hash.len().min(16)]);
            if !o.needs_upgrade.is_empty() {
                say!("not applied, needs `holdfast upgrade` (which keeps every connection): {}", o.needs_upgrade.join(", "));
            }
        } else {
            esay!("refused: nothing changed, generation {} keeps serving", o.generation);
            for e in &o.errors {
                esay!("  error: {e}");
            }
        }
        return;
    }
    if !r.ok {
        esay!("holdfast ctl: {}", r.error.as_deref().unwrap_or("failed"));
        return;
    }
    if let Some(s) = &r.status {
        say!("holdfast {} pid {} up {} s", s.version, s.pid, s.uptime_secs);
        say!("config {} generation {} hash {}", s.config_path, s.generation, &s.config_hash[..s.config_hash.len().min(16)]);
        match &s.last_reload {
            Some(o) if o.ok => say!("last reload: applied (generation {}) at {}", o.generation, crate::timefmt::rfc3339(o.at)),
            Some(o) => say!("last reload: REFUSED at {}: {}", crate::timefmt::rfc3339(o.at), o.errors.join("; ")),
            None => say!("last reload: none"),
        }
        say!(
            "connections {} ({}), handshakes {}/s, held streams {}, blocklist {} entries, revocations pending {}{}",
            s.connections,
            s.shards.iter().map(|h| format!("shard {}: {}", h.index, h.connections)).collect::<Vec<_>>().join(", "),
            s.handshakes_per_sec,
            s.held_streams,
            s.blocklist_entries,
            s.revocations_pending,
            if s.upgrade_in_progress { ", live upgrade under way" } else { "" }
        );
        for w in &s.wsms {
            say!("wsm {} {} ({}/{} links)", w.wsm, w.state, w.links_up, w.links_expected);
        }
        let a = &s.admission;
        let lim = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        say!(
            "admission: handshakes/s {} (in progress {} of {}), connections {} of {}, memory MiB {}, WSM opens/s {} ({} waiting, queue {}); deferred accepts {}, shed {}",
            lim(a.handshakes_per_sec.map(u64::from)),
            a.handshaking,
            lim(a.max_handshaking.map(u64::from)),
            a.connections,
            lim(a.max_connections),
            lim(a.max_memory_mb),
            lim(a.wsm_opens_per_sec.map(u64::from)),
            a.waiting_for_open,
            a.wsm_open_queue,
            a.accepts_deferred_total,
            a.shed_total.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        );
        if let Some(d) = &s.drain {
            say!(
                "DRAINING ({}): close {} over {} ms, {} ms left; {} of {} connections left",
                d.reason,
                d.code,
                d.over_ms,
                d.remaining_ms,
                d.connections_left,
                d.connections_at_start
            );
        }
        return;
    }
    if let Some(c) = &r.connections {
        say!("{} connection(s) match", c.count);
        for s in &c.sample {
            say!("{} shard {} {} serial {} ca {} wsm {} sha256 {}", s.id, s.shard, s.subject, s.serial, s.ca, s.wsm, s.fingerprint);
        }
        return;
    }
    if let Some(d) = &r.drain {
        say!(
            "draining: not accepting; {} connection(s) close with {} at random moments over {} ms ({} left)",
            d.connections_at_start,
            d.code,
            d.over_ms,
            d.connections_left
        );
        return;
    }
    if r.kicked == Some(true) {
        say!("closing it");
        return;
    }
    say!("ok");
}

/// A duration as an operator writes it: `90s`, `30m`, `2h`, `1500ms`, or
/// a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 90s, 30m, 2h)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" | "mins" => n * 60.0,
        "h" | "hour" | "hours" => n * 3600.0,
        "d" | "day" | "days" => n * 86_400.0,
        u => return Err(format!("'{u}' is not a unit: use ms, s, m, h or d")),
    };
    if !secs.is_finite() || !(0.0..=7.0 * 86_400.0).contains(&secs) {
        return Err(format!("'{s}': at most a week"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("30d").is_err(), "more than a week");
        assert!(parse_duration("").is_err());
    }
}
