//! Turning the configured WSM entries into addresses, again and again.
//!
//! Owns: resolving `upstream.wsm` entries (`ip:port` or `name:port`) into the
//! set of WSM addresses, and a thread that re-resolves them every
//! `upstream.dns_refresh_ms` and tells the shards when the set changes, so a
//! WSM pool behind a DNS name can grow or shrink without touching holdfast:
//! shards open links to new addresses, and move the streams off addresses
//! that are gone (by plan, as for a goaway) before closing those links. A
//! name that fails to resolve keeps its last addresses (a DNS outage must
//! not empty the pool). `HOLDFAST_HOSTS`, if set, names a hosts-format file
//! consulted before the system resolver (for tests, and for pinning names
//! by hand). Never connects anywhere itself.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// One WSM: the entry it came from (for logs) and its address.
pub type Wsm = (String, SocketAddr);

/// The environment variable naming an override hosts file.
pub const HOSTS_ENV: &str = "HOLDFAST_HOSTS";

/// Resolves every entry; an entry that fails keeps `previous` addresses.
pub fn resolve_all(entries: &[String], previous: &[Wsm]) -> Vec<Wsm> {
    let hosts = std::env::var_os(HOSTS_ENV).and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    let mut out: BTreeMap<SocketAddr, String> = BTreeMap::new();
    for e in entries {
        match resolve_one(e, &hosts) {
            Ok(addrs) => {
                for a in addrs {
                    out.entry(a).or_insert_with(|| e.clone());
                }
            }
            Err(err) => {
                tracing::warn!(wsm = %e, error = %err, "cannot resolve; keeping its last addresses");
                for (name, a) in previous.iter().filter(|(n, _)| n == e) {
                    out.entry(*a).or_insert_with(|| name.clone());
                }
            }
        }
    }
    out.into_iter().map(|(a, n)| (n, a)).collect()
}

fn resolve_one(entry: &str, hosts: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = entry.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let (name, port) = entry.rsplit_once(':').ok_or("not host:port")?;
    let port: u16 = port.parse().map_err(|_| "bad port")?;
    let pinned: Vec<SocketAddr> = hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ip: std::net::IpAddr = f.next()?.parse().ok()?;
            f.any(|n| n.eq_ignore_ascii_case(name)).then_some(SocketAddr::new(ip, port))
        })
        .collect();
    if !pinned.is_empty() {
        return Ok(pinned);
    }
    let addrs: Vec<SocketAddr> = entry.to_socket_addrs().map_err(|e| e.to_string())?.collect();
    if addrs.is_empty() { Err("no address".into()) } else { Ok(addrs) }
}

/// Re-resolves `entries` every `every` and calls `changed` with the new set
/// whenever it differs. Runs on its own thread (resolving blocks).
/// The WSM pool as the resolver thread keeps it: the configured entries,
/// how often to resolve them again (zero: never), and their addresses
/// now. A reload replaces the entries and the interval.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    pub entries: Vec<String>,
    pub every: Duration,
    pub current: Vec<Wsm>,
}

pub type SharedPool = std::sync::Arc<std::sync::Mutex<Pool>>;

/// Re-resolves the pool's entries every `every` on a thread of its own and
/// calls `changed` with the new addresses when they change. Resolving
/// happens outside the lock (it may block); a result for entries that a
/// reload replaced meanwhile is dropped.
pub fn refresh(pool: SharedPool, changed: impl Fn(Vec<Wsm>) + Send + 'static) {
    let _ = std::thread::Builder::new().name("holdfast-resolve".into()).spawn(move || {
        loop {
            let (entries, every, current) = {
                let p = pool.lock().unwrap_or_else(|e| e.into_inner());
                (p.entries.clone(), p.every, p.current.clone())
            };
            if every.is_zero() {
                std::thread::sleep(Duration::from_secs(1)); // off until a reload sets it
                continue;
            }
            std::thread::sleep(every);
            let now = resolve_all(&entries, &current);
            let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
            if p.entries != entries || now == p.current {
                continue;
            }
            tracing::info!(before = p.current.len(), after = now.len(), "WSM addresses changed");
            p.current = now.clone();
            // Told under the lock, so a reload's pool and this change
            // reach the shards in the order they were made.
            changed(now);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_addresses_and_pinned_names() {
        let hosts = "# comment\n10.0.0.5 wsm.pool other\n10.0.0.6 wsm.pool\n::1 v6.pool\n";
        assert_eq!(resolve_one("127.0.0.1:9000", hosts).unwrap(), vec!["127.0.0.1:9000".parse().unwrap()]);
        let p = resolve_one("wsm.pool:9000", hosts).unwrap();
        assert_eq!(p, vec!["10.0.0.5:9000".parse().unwrap(), "10.0.0.6:9000".parse().unwrap()]);
        assert_eq!(resolve_one("v6.pool:1", hosts).unwrap(), vec!["[::1]:1".parse().unwrap()]);
        assert!(resolve_one("nohost", hosts).is_err());
        assert!(resolve_one("x:port", hosts).is_err());
    }

    #[test]
    fn a_failing_name_keeps_its_last_addresses() {
        // (A bad port fails before any DNS query, so the test needs no network.)
        let prev = vec![("gone.invalid:99999".to_string(), "10.1.1.1:9000".parse().unwrap())];
        let now = resolve_all(&["gone.invalid:99999".into(), "127.0.0.1:9001".into()], &prev);
        assert_eq!(now.len(), 2);
        assert!(now.contains(&prev[0]));
    }
}
