//! CPU lists: parsing the operator's `listen.cpus`, and the CPUs this
//! process may actually run shards on.
//!
//! Owns: the bounded parser of "0-3,6" lists (a hostile range can neither
//! hang nor exhaust memory), and reading which CPUs are online
//! (`/sys/devices/system/cpu/online`) and allowed to this process
//! (`sched_getaffinity`, so `taskset` and systemd's `CPUAffinity=` are
//! honoured). Never pins anything: shards pin themselves.
#![forbid(unsafe_code)]

/// Highest CPU number accepted (the kernel's largest `NR_CPUS` is 8192).
pub const MAX_CPU: usize = 8191;

/// Parses "0-3,6,8-9" into a sorted list of distinct CPU numbers, each at
/// most [`MAX_CPU`].
pub fn parse_list(s: &str) -> Result<Vec<usize>, String> {
    let mut seen = vec![false; MAX_CPU + 1];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |x: &str| match x.trim().parse::<u64>() {
            Ok(n) if n <= MAX_CPU as u64 => Ok(n as usize),
            Ok(_) => Err(format!("CPU '{}' is out of range: CPU numbers go from 0 to {MAX_CPU}", x.trim())),
            Err(_) => Err(format!("'{}' is not a CPU number; write a list like \"0-3,6\"", x.trim())),
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part} runs backwards; write it as {b}-{a}"));
                }
                seen[a..=b].iter_mut().for_each(|x| *x = true);
            }
            None => seen[num(part)?] = true,
        }
    }
    let out: Vec<usize> = seen.iter().enumerate().filter(|(_, on)| **on).map(|(i, _)| i).collect();
    if out.is_empty() {
        return Err("empty CPU list; write a list like \"0-3,6\"".into());
    }
    Ok(out)
}

/// Formats CPU numbers back as a compact list ("0-3,6").
pub fn format_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    out.join(",")
}

/// The CPUs of this machine and process that shards may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub online: Vec<usize>,
    pub allowed: Vec<usize>,
}

impl Facts {
    /// Read from the running system.
    pub fn current() -> Facts {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok().and_then(|s| parse_list(s.trim()).ok());
        let allowed = allowed_now();
        let online = online.unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            (0..n).collect()
        });
        let allowed = allowed.unwrap_or_else(|| online.clone());
        Facts { online, allowed }
    }

    /// What is wrong with pinning shards to `list`: CPUs that are not
    /// online, and CPUs online but not allowed to this process (one message
    /// each, naming the CPUs and what would do).
    pub fn refuse(&self, list: &[usize]) -> Vec<String> {
        let offline: Vec<usize> = list.iter().copied().filter(|c| !self.online.contains(c)).collect();
        let barred: Vec<usize> = list.iter().copied().filter(|c| self.online.contains(c) && !self.allowed.contains(c)).collect();
        let mut out = Vec::new();
        if !offline.is_empty() {
            out.push(format!("CPU {} not online (online: {})", format_list(&offline), format_list(&self.online)));
        }
        if !barred.is_empty() {
            out.push(format!(
                "CPU {} not allowed to this process (taskset, cgroup cpuset or CPUAffinity=); allowed: {}",
                format_list(&barred),
                format_list(&self.allowed)
            ));
        }
        out
    }

    /// CPUs both online and allowed: what `shards = "auto"` uses.
    pub fn usable(&self) -> Vec<usize> {
        self.allowed.iter().copied().filter(|c| self.online.contains(c)).collect()
    }
}

fn allowed_now() -> Option<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let v: Vec<usize> = (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect();
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_sorted_and_distinct() {
        assert_eq!(parse_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_list("5,0-1,1").unwrap(), vec![0, 1, 5]);
        assert!(parse_list("3-1").unwrap_err().contains("backwards"));
        assert!(parse_list("a").unwrap_err().contains("not a CPU number"));
        assert!(parse_list("").unwrap_err().contains("empty"));
    }

    #[test]
    fn hostile_ranges_are_refused_without_expanding_them() {
        assert!(parse_list("0-99999999999").unwrap_err().contains("out of range"));
        assert!(parse_list("0-18446744073709551616").is_err());
        assert!(parse_list("8192").is_err());
        assert_eq!(parse_list("0-8191").unwrap().len(), 8192);
    }

    #[test]
    fn formats_back() {
        assert_eq!(format_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(format_list(&[1]), "1");
    }

    #[test]
    fn offline_and_barred_cpus_are_named_separately() {
        let f = Facts { online: vec![0, 1, 2, 3], allowed: vec![1, 2] };
        assert!(f.refuse(&[1, 2]).is_empty());
        let r = f.refuse(&[0, 1, 7]);
        assert_eq!(r.len(), 2);
        assert!(r[0].starts_with("CPU 7 not online (online: 0-3)"), "{r:?}");
        assert!(r[1].starts_with("CPU 0 not allowed") && r[1].ends_with("allowed: 1-2"), "{r:?}");
    }

    #[test]
    fn usable_is_online_and_allowed() {
        let f = Facts { online: vec![0, 1, 2, 3], allowed: vec![1, 3, 5] };
        assert_eq!(f.usable(), vec![1, 3]);
        let now = Facts::current();
        assert!(!now.usable().is_empty());
    }
}
