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
        CtlCmd::Reload { json } => (Request::Reload, json),
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
        return;
    }
    if let Some(c) = &r.connections {
        say!("{} connection(s) match", c.count);
        for s in &c.sample {
            say!("{} shard {} {} serial {} ca {} wsm {} sha256 {}", s.id, s.shard, s.subject, s.serial, s.ca, s.wsm, s.fingerprint);
        }
        return;
    }
    if r.kicked == Some(true) {
        say!("closing it");
        return;
    }
    say!("ok");
}
