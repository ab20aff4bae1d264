//! The process's own figures, read from `/proc/self` at each scrape.
//!
//! Owns: parsing `/proc/self/stat`, `/proc/self/limits` and the
//! `/proc/self/fd` directory. Never caches: each call reads anew. Counting
//! descriptors lists `/proc/self/fd`, which costs about 0.1 µs per
//! connection on the exporter's thread, never a shard's.

/// One reading; zeros where `/proc` could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Process {
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub start_time_seconds: f64,
    pub threads: u64,
}

pub fn read() -> Process {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| boot_time(&s)).unwrap_or(0);
    let mut p = parse(&stat, &limits, boot, ticks_per_second(), page_size());
    p.open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    p
}

fn sysconf(v: nix::unistd::SysconfVar, default: u64) -> u64 {
    match nix::unistd::sysconf(v) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => default,
    }
}

fn ticks_per_second() -> u64 {
    sysconf(nix::unistd::SysconfVar::CLK_TCK, 100)
}

fn page_size() -> u64 {
    sysconf(nix::unistd::SysconfVar::PAGE_SIZE, 4096)
}

fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// Parses `/proc/self/stat` (fields after the command name, which may hold
/// spaces and parentheses) and the soft "Max open files" of `limits`.
fn parse(stat: &str, limits: &str, boot: u64, ticks: u64, page: u64) -> Process {
    let mut p = Process::default();
    if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) {
        // rest starts at field 3 (state); utime is field 14, stime 15,
        // num_threads 20, starttime 22, vsize 23, rss 24.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        p.cpu_seconds = (n(14) + n(15)) as f64 / ticks as f64;
        p.threads = n(20);
        p.start_time_seconds = boot as f64 + n(22) as f64 / ticks as f64;
        p.vsize_bytes = n(23);
        p.rss_bytes = n(24) * page;
    }
    p.max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.trim_start_matches("Max open files").split_whitespace().next())
        .and_then(|v| if v == "unlimited" { Some(u64::MAX) } else { v.parse().ok() })
        .unwrap_or(0);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_limits() {
        let stat =
            "4242 (holdfast (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 2048 18446744073709551615";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            20000                20000                files\n";
        let p = parse(stat, limits, 1_700_000_000, 100, 4096);
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.vsize_bytes, 123_456_789);
        assert_eq!(p.rss_bytes, 2048 * 4096);
        assert_eq!(p.max_fds, 20_000);
    }

    #[test]
    fn reads_this_process() {
        let p = read();
        assert!(p.open_fds > 0 && p.max_fds >= p.open_fds && p.rss_bytes > 0 && p.threads >= 1, "{p:?}");
    }
}
