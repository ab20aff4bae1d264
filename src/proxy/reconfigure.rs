//! Changing a running proxy's configuration: a reload from the files, and
//! an operator's block or unblock of one device.
//!
//! Owns: preparing the next generation (`reload::prepare`), sending it to
//! every shard and waiting until each has switched, keeping the node's
//! view (current generation, last outcome, metrics, ticket keys, log
//! filter) in step, and editing the blocklist file for `ctl block` /
//! `unblock` (written whole to a temporary file and renamed over, so a
//! reader sees the old file or the new one, never half). Never decides
//! what a connection does about a change: each shard re-checks its own.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::Running;
use crate::metrics::NodeMetrics;
use crate::reload::{Generation, Outcome};
use crate::shard::Control;
use crate::tls::blocklist::Blocklist;
use crate::tls::certmap::CertKey;

/// How long a reload waits for every shard to switch.
const SWITCH_WAIT: Duration = Duration::from_secs(10);

/// Puts a generation's facts into the node's metrics.
pub(super) fn publish(node: &NodeMetrics, g: &Generation) {
    node.config_generation.store(g.number, Relaxed);
    node.blocklist_entries.store(g.tls.verifier.blocklist().len() as u64, Relaxed);
    node.server_cert_not_after.store(g.tls.server_not_after, Relaxed);
}

/// `ctl block` or `ctl unblock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockChange {
    Block,
    Unblock,
}

impl Running {
    /// Re-reads the config and every file it names; applies it to every
    /// shard at one generation boundary, or refuses it whole.
    pub fn reload(&mut self) -> Outcome {
        self.reload_with(None)
    }

    /// As [`Running::reload`]; with `migrate`, connections made under a
    /// server certificate older than the one serving after the reload
    /// close (1001) spread over `migrate`, so their devices reconnect and
    /// get the new one (`holdfast reload --migrate-over`).
    pub fn reload_with(&mut self, migrate: Option<std::time::Duration>) -> Outcome {
        let at = crate::timefmt::unix_now();
        let path = self.generation.cfg.path.clone();
        let node = self.sources.node.clone();
        node.last_reload_timestamp.store(at, Relaxed);
        // Reading and checking the files (a million-entry blocklist takes
        // half a second) happens on a background thread: shards pinned to
        // the same CPUs never wait for it.
        let prepared = std::thread::scope(|s| {
            let (current, file) = (&self.generation, &self.file_blocklist);
            let path = &path;
            s.spawn(move || {
                crate::background_thread();
                crate::reload::prepare(path, current, file)
            })
            .join()
        });
        let prepared = match prepared {
            Ok(p) => p,
            Err(_) => Err(vec![crate::config::err("(reload)", "internal error while reading the config")]),
        };
        let out = match prepared {
            Err(errs) => {
                let errors: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
                tracing::error!(errors = %errors.join("; "), "reload refused: nothing changed, the running config stays");
                Outcome {
                    ok: false,
                    generation: self.generation.number,
                    hash: self.generation.hash.clone(),
                    changed: Vec::new(),
                    needs_upgrade: Vec::new(),
                    errors,
                    at,
                }
            }
            Ok((g, changed, fixed)) if changed.is_empty() && g.hash == self.generation.hash && migrate.is_none() => {
                tracing::info!("reload: nothing changed");
                Outcome::applied(&self.generation, changed, fixed, at)
            }
            Ok((mut g, mut changed, fixed)) => {
                if let Some(over) = migrate {
                    g.migrate = Some(over);
                    changed.push(format!("connections under older server certificates migrate over {} ms", over.as_millis()));
                }
                self.file_blocklist = g.tls.verifier.blocklist();
                if let Some((_, keys)) = &self.shared {
                    g.tls.verifier.set_blocklist(self.file_blocklist.union(keys));
                }
                for w in &g.tls.warnings {
                    tracing::warn!(key = %w.key, "{}", w.msg);
                }
                let log_changed = g.cfg.log_level != self.generation.cfg.log_level;
                let g = self.switch(g);
                if log_changed {
                    let spec = g.cfg.log_level.clone().unwrap_or_else(|| self.base_log.clone());
                    if let Err(e) = crate::logging::set_filter(&spec) {
                        tracing::warn!(error = %e, "the log filter could not be changed");
                    }
                }
                if !fixed.is_empty() {
                    tracing::warn!(keys = %fixed.join(", "), "changed keys that a reload cannot apply: they take effect with `holdfast upgrade`, which keeps every connection");
                }
                tracing::info!(generation = g.number, changed = %changed.join(", "), hash = %g.hash, "reloaded");
                Outcome::applied(&g, changed, fixed, at)
            }
        };
        node.last_reload_success.store(u64::from(out.ok), Relaxed);
        self.last_reload = Some(out.clone());
        out
    }

    /// Blocks (or unblocks) one blocklist entry (a SHA-256 fingerprint or
    /// `serial:<hex>`): written to the blocklist file first, so a later
    /// reload agrees, then in force for every handshake, and (for a block)
    /// every established connection it matches closed within the spread.
    pub fn block(&mut self, entry: &str, change: BlockChange) -> Result<Outcome, String> {
        let at = crate::timefmt::unix_now();
        let one = CertKey::parse(entry).map_err(|m| format!("'{}': {m}", entry.trim()))?;
        let path = self
            .generation
            .cfg
            .tls
            .blocklist
            .clone()
            .ok_or("tls.blocklist is not set: name a blocklist file in the config (and reload) to block devices by command")?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let same = |line: &str| !line.trim().is_empty() && CertKey::parse(line).is_ok_and(|k| k == one);
        let present = text.lines().any(|l| same(l.split('#').next().unwrap_or("")));
        let new_text = match (change, present) {
            (BlockChange::Block, true) | (BlockChange::Unblock, false) => None,
            (BlockChange::Block, false) => {
                let mut t = text.clone();
                if !t.is_empty() && !t.ends_with('\n') {
                    t.push('\n');
                }
                t.push_str(entry.trim());
                t.push('\n');
                Some(t)
            }
            (BlockChange::Unblock, true) => {
                Some(text.lines().filter(|l| !same(l.split('#').next().unwrap_or(""))).map(|l| format!("{l}\n")).collect())
            }
        };
        let Some(new_text) = new_text else {
            let what = if change == BlockChange::Block { "already blocked" } else { "not in the blocklist" };
            return Ok(Outcome::applied(&self.generation, vec![format!("nothing: {what}")], Vec::new(), at));
        };
        let bl = Blocklist::parse(&new_text).map_err(|e| format!("{}: {e}", path.display()))?;
        write_atomically(&path, new_text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
        // In force for handshakes on every shard at once (they share the verifier).
        self.file_blocklist = Arc::new(bl);
        self.apply_blocklist();
        let hash = crate::reload::hash_inputs(&self.generation.cfg);
        let g = self.switch(self.generation.blocklist_changed(hash, change == BlockChange::Block));
        let verb = if change == BlockChange::Block { "blocked" } else { "unblocked" };
        tracing::info!(entry = %entry.trim(), generation = g.number, "{verb} by the operator");
        Ok(Outcome::applied(&g, vec![format!("{verb} {}", entry.trim())], Vec::new(), at))
    }

    /// Puts the file's entries and the shared ones in force for handshakes.
    fn apply_blocklist(&self) {
        let bl = match &self.shared {
            Some((_, keys)) => self.file_blocklist.union(keys),
            None => (*self.file_blocklist).clone(),
        };
        self.generation.tls.verifier.set_blocklist(bl);
    }

    /// The fleet-wide entries from the follower: the whole set at
    /// `version` (`entries`), or one step to `version`, `add` and `remove`
    /// on top of `base` (refused if this node does not have `base`: the
    /// follower then sends the whole set). Entries it adds close matching
    /// connections within the spread, as a block does.
    pub fn shared_blocklist(
        &mut self,
        version: u64,
        base: Option<u64>,
        entries: Option<Vec<String>>,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<Outcome, String> {
        let parse = |v: &[String]| -> Result<Vec<CertKey>, String> {
            v.iter().map(|e| CertKey::parse(e).map_err(|m| format!("'{e}': {m}"))).collect()
        };
        // Sets, not scans: a whole fleet list is a million entries.
        let before: std::collections::HashSet<CertKey> = self.shared.as_ref().map(|(_, k)| k.iter().cloned().collect()).unwrap_or_default();
        let after = match entries {
            Some(all) => parse(&all)?,
            None => {
                let have = self.shared.as_ref().map(|(v, _)| *v);
                if base.is_none() || have != base {
                    let have = have.map_or("none".into(), |v| v.to_string());
                    return Err(format!("gap: this node has shared version {have}, the step is from {base:?} to {version}"));
                }
                let (add, remove) = (parse(&add)?, parse(&remove)?);
                let remove: std::collections::HashSet<&CertKey> = remove.iter().collect();
                let mut k: Vec<CertKey> = before.iter().filter(|k| !remove.contains(k)).cloned().collect();
                k.extend(add);
                k
            }
        };
        let added = after.iter().any(|k| !before.contains(k));
        self.shared = Some((version, after));
        self.apply_blocklist();
        let g = self.switch(self.generation.blocklist_changed(self.generation.hash.clone(), added));
        tracing::info!(version, generation = g.number, entries = self.shared.as_ref().map_or(0, |s| s.1.len()), "shared blocklist updated");
        Ok(Outcome::applied(&g, vec![format!("shared blocklist version {version}")], Vec::new(), crate::timefmt::unix_now()))
    }

    /// Sends `g` (its WSM pool resolved here) to every shard and waits
    /// until each has switched; then it is the node's generation.
    fn switch(&mut self, mut g: Generation) -> Arc<Generation> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.entries != g.cfg.upstream.wsm {
            let now = crate::resolve::resolve_all(&g.cfg.upstream.wsm, &pool.current);
            pool.entries = g.cfg.upstream.wsm.clone();
            pool.current = now;
        }
        pool.every = g.cfg.upstream.dns_refresh;
        g.wsms = pool.current.clone();
        let g = Arc::new(g);
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut sent = 0;
        for s in &self.shards {
            if s.ctl.send(Control::Reload(g.clone(), tx.clone())).is_ok() {
                sent += 1;
            }
        }
        // Under the pool's lock: a DNS change cannot reach a shard between.
        let deadline = std::time::Instant::now() + SWITCH_WAIT;
        for _ in 0..sent {
            if rx.recv_deadline(deadline).is_err() {
                tracing::error!(generation = g.number, "a shard did not switch to the new generation in time");
                break;
            }
        }
        drop(pool);
        self.tickets = g.tls.tickets.clone();
        self.generation = g.clone();
        publish(&self.sources.node, &g);
        g
    }
}

/// Writes `bytes` to a temporary file beside `path`, flushes it to disk
/// and renames it over `path`.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "blocklist".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // Keep the file's mode (a blocklist may be group-readable on purpose).
    if let Ok(m) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, m.permissions());
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
