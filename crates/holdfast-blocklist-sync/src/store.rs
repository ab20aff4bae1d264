//! The fleet blocklist in Redis: its key layout and the commands on it.
//!
//! Owns: the layout (`<prefix>:entries`, a set of blocklist entries as the
//! file writes them; `<prefix>:version`, an integer raised by every change;
//! `<prefix>:changes`, the channel each change is published on as
//! `<version> +<entry>` or `<version> -<entry>`), the atomic change (one
//! Lua script: change the set, raise the version, publish, so no reader
//! can see a version without its change or a change out of order), and
//! reading a consistent snapshot (the set and its version in one script).
//! Never talks to holdfast.

use redis::Connection;

/// The keys of one fleet blocklist.
#[derive(Debug, Clone)]
pub struct Keys {
    pub entries: String,
    pub version: String,
    pub channel: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { entries: format!("{prefix}:entries"), version: format!("{prefix}:version"), channel: format!("{prefix}:changes") }
    }
}

/// Adds (`+`) or removes (`-`) one entry; returns the version it made (the
/// version stays, and nothing is published, if the set did not change).
const CHANGE: &str = r"
local changed
if ARGV[1] == '+' then changed = redis.call('SADD', KEYS[1], ARGV[2]) else changed = redis.call('SREM', KEYS[1], ARGV[2]) end
if changed == 0 then return tonumber(redis.call('GET', KEYS[2]) or '0') end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], v .. ' ' .. ARGV[1] .. ARGV[2])
return v
";

/// Replaces the whole set; returns the new version. Published as
/// `<version> *`: every follower reads the snapshot again.
const REPLACE: &str = r"
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 5000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 4999, #ARGV)))
end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], v .. ' *')
return v
";

/// The set and its version, read together.
const SNAPSHOT: &str = r"
return { tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('SMEMBERS', KEYS[1]) }
";

pub fn change(c: &mut Connection, k: &Keys, add: bool, entry: &str) -> redis::RedisResult<u64> {
    let script = redis::Script::new(CHANGE);
    let mut inv = script.key(&k.entries);
    inv.key(&k.version).key(&k.channel).arg(if add { "+" } else { "-" }).arg(entry);
    inv.invoke(c)
}

pub fn replace(c: &mut Connection, k: &Keys, entries: &[String]) -> redis::RedisResult<u64> {
    if entries.is_empty() {
        // SADD needs at least one member: an empty set is a DEL.
        let script = redis::Script::new(
            "redis.call('DEL', KEYS[1]) local v = redis.call('INCR', KEYS[2]) redis.call('PUBLISH', KEYS[3], v .. ' *') return v",
        );
        let mut inv = script.key(&k.entries);
        inv.key(&k.version).key(&k.channel);
        return inv.invoke(c);
    }
    let script = redis::Script::new(REPLACE);
    let mut inv = script.key(&k.entries);
    inv.key(&k.version).key(&k.channel);
    for e in entries {
        inv.arg(e);
    }
    inv.invoke(c)
}

pub fn snapshot(c: &mut Connection, k: &Keys) -> redis::RedisResult<(u64, Vec<String>)> {
    let script = redis::Script::new(SNAPSHOT);
    let mut inv = script.key(&k.entries);
    inv.key(&k.version);
    inv.invoke(c)
}

pub fn version(c: &mut Connection, k: &Keys) -> redis::RedisResult<u64> {
    let v: Option<u64> = redis::cmd("GET").arg(&k.version).query(c)?;
    Ok(v.unwrap_or(0))
}

/// One published change: its version, and the entry added or removed
/// (`None`: the whole set was replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub version: u64,
    pub entry: Option<(bool, String)>,
}

impl Change {
    pub fn parse(msg: &str) -> Option<Change> {
        let (v, rest) = msg.split_once(' ')?;
        let version = v.parse().ok()?;
        let entry = match rest.as_bytes().first()? {
            b'*' => None,
            b'+' => Some((true, rest[1..].to_string())),
            b'-' => Some((false, rest[1..].to_string())),
            _ => return None,
        };
        Some(Change { version, entry })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_parse() {
        assert_eq!(Change::parse("7 +serial:1f"), Some(Change { version: 7, entry: Some((true, "serial:1f".into())) }));
        assert_eq!(Change::parse("8 -ab"), Some(Change { version: 8, entry: Some((false, "ab".into())) }));
        assert_eq!(Change::parse("9 *"), Some(Change { version: 9, entry: None }));
        assert_eq!(Change::parse("x +a"), None);
        assert_eq!(Change::parse("1 ?a"), None);
        assert_eq!(Change::parse("1"), None);
    }
}
