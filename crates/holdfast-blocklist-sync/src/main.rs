//! `holdfast-blocklist-sync`: keeps one holdfast node's blocklist in step
//! with a fleet-wide one in Redis, and changes that fleet-wide list.
//!
//! `follow` runs beside each holdfast (one per node, like holdfast itself
//! under systemd): it subscribes to the list's change channel, reads the
//! whole set and its version, gives both to holdfast over its control
//! socket, then passes on each change (batched when they come quickly). A
//! change whose version is not the next one (a missed message), a Redis
//! reconnect, a version that moved while no message came (checked every
//! second), or a holdfast that lost the set (a restart) makes it send the
//! whole set again: a node that was away catches up. holdfast keeps these
//! entries beside its blocklist file's (both in force); the edge itself
//! never links a Redis client. `add`, `remove`, `load` and `show` change
//! or print the fleet-wide list (docs/reload.md, "A fleet-wide blocklist").
#![forbid(unsafe_code)]
#![allow(clippy::disallowed_methods)]

mod store;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use holdfast::control::{Request, client};
use holdfast::{esay, say};
use store::{Change, Keys};

#[derive(Parser)]
#[command(name = "holdfast-blocklist-sync", version = holdfast::build::LONG_VERSION, about = "Fleet-wide blocklist in Redis for holdfast nodes")]
struct Cli {
    /// The Redis holding the fleet-wide blocklist.
    #[arg(long, global = true, default_value = "redis://127.0.0.1:6379", env = "HOLDFAST_BLOCKLIST_REDIS")]
    redis: String,
    /// Key prefix of the list in Redis (`<prefix>:entries`, `:version`, `:changes`).
    #[arg(long, global = true, default_value = "holdfast:blocklist")]
    prefix: String,
    /// Log filter (as holdfast's --log).
    #[arg(long, global = true, default_value = "info", env = "HOLDFAST_LOG", value_parser = holdfast::logging::check_filter)]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Keep the local holdfast in step with the fleet-wide list (runs until stopped).
    Follow {
        #[command(flatten)]
        target: holdfast::control::cli::Target,
    },
    /// Add one entry (fingerprint or serial:<hex>) to the fleet-wide list.
    Add {
        /// The blocklist entry.
        entry: String,
    },
    /// Remove one entry from the fleet-wide list.
    Remove {
        /// The blocklist entry.
        entry: String,
    },
    /// Replace the fleet-wide list with a blocklist file's entries.
    Load {
        /// A blocklist file (the format of `[tls] blocklist`).
        file: PathBuf,
    },
    /// Print the fleet-wide list's version and size.
    Show,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    holdfast::logging::init(&cli.log, holdfast::logging::LogFormat::Text);
    let keys = Keys::new(&cli.prefix);
    let connect = || -> Result<redis::Connection, String> {
        let c = redis::Client::open(cli.redis.as_str()).map_err(|e| format!("{}: {e}", cli.redis))?;
        c.get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| format!("{}: {e}", cli.redis))
    };
    let checked = |entry: &str| {
        holdfast::tls::certmap::CertKey::parse(entry).map(|_| entry.trim().to_string()).map_err(|m| format!("'{entry}': {m}"))
    };
    let done = |r: Result<String, String>| match r {
        Ok(line) => {
            say!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            esay!("holdfast-blocklist-sync: {e}");
            std::process::ExitCode::FAILURE
        }
    };
    match &cli.cmd {
        Cmd::Follow { target } => {
            follow(&cli.redis, &keys, target);
            std::process::ExitCode::FAILURE
        }
        Cmd::Add { entry } | Cmd::Remove { entry } => {
            let add = matches!(cli.cmd, Cmd::Add { .. });
            done(checked(entry).and_then(|e| {
                let v = store::change(&mut connect()?, &keys, add, &e).map_err(|x| x.to_string())?;
                Ok(format!("{} {e}: version {v}", if add { "added" } else { "removed" }))
            }))
        }
        Cmd::Load { file } => done((|| {
            let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let mut entries = Vec::new();
            for (i, raw) in text.lines().enumerate() {
                let line = raw.split('#').next().unwrap_or("").trim();
                if !line.is_empty() {
                    entries.push(checked(line).map_err(|e| format!("{} line {}: {e}", file.display(), i + 1))?);
                }
            }
            let v = store::replace(&mut connect()?, &keys, &entries).map_err(|x| x.to_string())?;
            Ok(format!("loaded {} entries: version {v}", entries.len()))
        })()),
        Cmd::Show => done((|| {
            let (v, entries) = store::snapshot(&mut connect()?, &keys).map_err(|x| x.to_string())?;
            Ok(format!("version {v}, {} entries", entries.len()))
        })()),
    }
}

/// Changes coming within this long of each other go to holdfast together.
const BATCH: Duration = Duration::from_millis(20);

fn follow(url: &str, keys: &Keys, target: &holdfast::control::cli::Target) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match follow_once(url, keys, target) {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, "following the fleet blocklist: trying again");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Sends a request to holdfast; an error answer is an `Err`.
fn tell(target: &holdfast::control::cli::Target, req: &Request) -> Result<holdfast::control::Response, String> {
    let socket = target.socket()?;
    let r = client::call(&socket, req, Duration::from_secs(target.timeout))?;
    if r.ok { Ok(r) } else { Err(r.error.unwrap_or_else(|| "refused".into())) }
}

/// The shared version holdfast has now (`None`: it has none, e.g. it restarted).
fn holdfast_version(target: &holdfast::control::cli::Target) -> Result<Option<u64>, String> {
    let r = tell(target, &Request::Status)?;
    Ok(r.status.and_then(|s| s.shared_blocklist).map(|s| s.version))
}

fn push_all(target: &holdfast::control::cli::Target, conn: &mut redis::Connection, keys: &Keys) -> Result<u64, String> {
    let (v, entries) = store::snapshot(conn, keys).map_err(|e| e.to_string())?;
    let n = entries.len();
    tell(target, &Request::SharedBlocklist { version: v, base: None, entries: Some(entries), add: Vec::new(), remove: Vec::new() })?;
    tracing::info!(version = v, entries = n, "holdfast has the whole fleet blocklist");
    Ok(v)
}

fn follow_once(url: &str, keys: &Keys, target: &holdfast::control::cli::Target) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut sub = client.get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
    let mut pubsub = sub.as_pubsub();
    // Subscribed before the snapshot is read: no change falls between.
    pubsub.subscribe(&keys.channel).map_err(|e| e.to_string())?;
    pubsub.set_read_timeout(Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
    let mut v = push_all(target, &mut conn, keys)?;
    let mut last_check = Instant::now();
    loop {
        // One change, then whatever follows it closely, as one step each.
        let mut pending: Vec<Change> = Vec::new();
        match pubsub.get_message() {
            Ok(m) => {
                let text: String = m.get_payload().map_err(|e| e.to_string())?;
                pending.extend(Change::parse(&text));
                pubsub.set_read_timeout(Some(BATCH)).map_err(|e| e.to_string())?;
                while pending.len() < 1000 {
                    match pubsub.get_message() {
                        Ok(m) => pending.extend(m.get_payload::<String>().ok().and_then(|t| Change::parse(&t))),
                        Err(e) if e.is_timeout() => break,
                        Err(e) => return Err(e.to_string()),
                    }
                }
                pubsub.set_read_timeout(Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e.to_string()),
        }
        pending.retain(|c| c.version > v);
        pending.sort_by_key(|c| c.version);
        let in_order = pending.iter().enumerate().all(|(i, c)| c.version == v + 1 + i as u64 && c.entry.is_some());
        if !pending.is_empty() && in_order {
            let (mut add, mut remove) = (Vec::new(), Vec::new());
            for c in &pending {
                if let Some((a, e)) = &c.entry {
                    add.retain(|x| x != e);
                    remove.retain(|x| x != e);
                    if *a { add.push(e.clone()) } else { remove.push(e.clone()) }
                }
            }
            // Several versions in one step, from `v` to the last.
            let last = pending.last().map_or(v, |c| c.version);
            match tell(target, &Request::SharedBlocklist { version: last, base: Some(v), entries: None, add, remove }) {
                Ok(_) => v = last,
                Err(e) if e.starts_with("gap") => v = push_all(target, &mut conn, keys)?,
                Err(e) => return Err(e),
            }
        } else if !pending.is_empty() {
            // A gap, or the whole set replaced: read it again.
            v = push_all(target, &mut conn, keys)?;
        }
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            let in_redis = store::version(&mut conn, keys).map_err(|e| e.to_string())?;
            let here = holdfast_version(target)?;
            if in_redis != v || here != Some(v) {
                tracing::info!(redis = in_redis, holdfast = ?here, had = v, "out of step: sending the whole set");
                v = push_all(target, &mut conn, keys)?;
            }
        }
    }
}
