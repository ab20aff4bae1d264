//! Result types and their aggregation: swarm reports (with HDR histograms
//! that merge across processes), scenario results, and ratios.

use std::collections::BTreeMap;

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use holdfast::device_async::ErrorKind;

/// A histogram in microseconds, serialized so processes can merge them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Hist {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// base64 of the HDR V2 serialization.
    pub hdr: String,
}

impl Hist {
    pub fn from(h: &Histogram<u64>) -> Hist {
        let mut buf = Vec::new();
        let _ = V2Serializer::new().serialize(h, &mut buf);
        Hist {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            hdr: base64::engine::general_purpose::STANDARD.encode(buf),
        }
    }

    pub fn histogram(&self) -> Option<Histogram<u64>> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(&self.hdr).ok()?;
        Deserializer::new().deserialize(&mut &bytes[..]).ok()
    }

    /// Merges histograms from several processes.
    pub fn merge(parts: &[Hist]) -> Hist {
        let mut total: Histogram<u64> = Histogram::new(3).expect("histogram");
        for p in parts {
            if let Some(h) = p.histogram() {
                let _ = total.add(&h);
            }
        }
        Hist::from(&total)
    }
}

/// What one swarm process reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SwarmReport {
    pub mode: String,
    pub devices: u64,
    pub handshakes: u64,
    pub resumed: u64,
    pub messages: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub first_error: Option<String>,
    pub elapsed_secs: f64,
    pub connect_us: Hist,
    pub rtt_us: Hist,
    /// Per device, its longest round trip over the whole run.
    #[serde(default)]
    pub pause_us: Hist,
    /// Per device with a round trip overlapping the event (upgrade: SIGUSR2
    /// until the old process exited; failover: kill until all resumed), the
    /// longest such round trip: the pause the event caused.
    #[serde(default)]
    pub pause_window_us: Hist,
    /// Bytes whose echo was not what was sent (lost, duplicated, reordered).
    #[serde(default)]
    pub mismatched_bytes: u64,
    pub cpu_user_secs: f64,
    pub cpu_sys_secs: f64,
    pub max_rss_kib: u64,
    /// Connection attempts refused and tried again (storm: 503 + Retry-After, resets).
    #[serde(default)]
    pub retries: u64,
    /// Drain: when each device's connection was closed (Unix ms), and the
    /// close code it got ("none": the TCP connection ended without one).
    #[serde(default)]
    pub close_ms: Vec<u64>,
    #[serde(default)]
    pub close_codes: BTreeMap<String, u64>,
}

/// All swarm processes of one run, added up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SwarmTotal {
    pub processes: usize,
    pub handshakes: u64,
    pub resumed: u64,
    pub messages: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub first_error: Option<String>,
    /// The slowest process's elapsed time.
    pub elapsed_secs: f64,
    pub connect_us: Hist,
    pub rtt_us: Hist,
    #[serde(default)]
    pub pause_us: Hist,
    #[serde(default)]
    pub pause_window_us: Hist,
    #[serde(default)]
    pub mismatched_bytes: u64,
    pub cpu_secs: f64,
    pub max_rss_kib: u64,
    #[serde(default)]
    pub retries: u64,
    #[serde(default)]
    pub close_ms: Vec<u64>,
    #[serde(default)]
    pub close_codes: BTreeMap<String, u64>,
}

impl SwarmTotal {
    pub fn of(reports: &[SwarmReport]) -> SwarmTotal {
        let mut errors = BTreeMap::new();
        for r in reports {
            for (k, v) in &r.errors {
                *errors.entry(*k).or_insert(0) += v;
            }
        }
        SwarmTotal {
            processes: reports.len(),
            handshakes: reports.iter().map(|r| r.handshakes).sum(),
            resumed: reports.iter().map(|r| r.resumed).sum(),
            messages: reports.iter().map(|r| r.messages).sum(),
            errors,
            first_error: reports.iter().find_map(|r| r.first_error.clone()),
            elapsed_secs: reports.iter().map(|r| r.elapsed_secs).fold(0.0, f64::max),
            connect_us: Hist::merge(&reports.iter().map(|r| r.connect_us.clone()).collect::<Vec<_>>()),
            rtt_us: Hist::merge(&reports.iter().map(|r| r.rtt_us.clone()).collect::<Vec<_>>()),
            pause_us: Hist::merge(&reports.iter().map(|r| r.pause_us.clone()).collect::<Vec<_>>()),
            pause_window_us: Hist::merge(&reports.iter().map(|r| r.pause_window_us.clone()).collect::<Vec<_>>()),
            mismatched_bytes: reports.iter().map(|r| r.mismatched_bytes).sum(),
            cpu_secs: reports.iter().map(|r| r.cpu_user_secs + r.cpu_sys_secs).sum(),
            max_rss_kib: reports.iter().map(|r| r.max_rss_kib).max().unwrap_or(0),
            retries: reports.iter().map(|r| r.retries).sum(),
            close_ms: {
                let mut v: Vec<u64> = reports.iter().flat_map(|r| r.close_ms.iter().copied()).collect();
                v.sort_unstable();
                v
            },
            close_codes: {
                let mut m = BTreeMap::new();
                for r in reports {
                    for (k, v) in &r.close_codes {
                        *m.entry(k.clone()).or_insert(0) += v;
                    }
                }
                m
            },
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A ratio as a table cell (bold), or n/a.
pub fn ratio_cell(r: Option<f64>) -> String {
    r.map(|x| format!("**{x:.2}x**")).unwrap_or_else(|| "n/a".into())
}

/// holdfast's figure over the best peer's, where lower is better (memory, latency).
pub fn ratio_lower_better(holdfast: f64, peers: &[f64]) -> Option<f64> {
    let best = peers.iter().copied().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
    (best.is_finite() && holdfast > 0.0).then(|| holdfast / best)
}

/// holdfast's figure over the best peer's, where higher is better (rates).
pub fn ratio_higher_better(holdfast: f64, peers: &[f64]) -> Option<f64> {
    let best = peers.iter().copied().fold(0.0, f64::max);
    (best > 0.0).then(|| holdfast / best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(values: &[u64], errors: &[(ErrorKind, u64)]) -> SwarmReport {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in values {
            h.record(*v).unwrap();
        }
        SwarmReport {
            mode: "message".into(),
            devices: 10,
            handshakes: values.len() as u64,
            resumed: 1,
            messages: values.len() as u64,
            errors: errors.iter().copied().collect(),
            first_error: errors.first().map(|e| format!("{:?}", e.0)),
            elapsed_secs: values.len() as f64,
            connect_us: Hist::from(&h),
            rtt_us: Hist::from(&h),
            pause_us: Hist::from(&h),
            pause_window_us: Hist::from(&h),
            mismatched_bytes: 0,
            cpu_user_secs: 1.0,
            cpu_sys_secs: 0.5,
            max_rss_kib: 100 * values.len() as u64,
            retries: 0,
            close_ms: Vec::new(),
            close_codes: BTreeMap::new(),
        }
    }

    #[test]
    fn histograms_merge_across_processes() {
        let a = report(&[100, 200, 300], &[]);
        let b = report(&[1000; 97], &[(ErrorKind::Tls, 2)]);
        let t = SwarmTotal::of(&[a, b]);
        assert_eq!(t.rtt_us.count, 100);
        assert_eq!(t.messages, 100);
        assert!(t.rtt_us.p50 >= 999 && t.rtt_us.p50 <= 1001, "{}", t.rtt_us.p50);
        assert!(t.rtt_us.p99 >= 999);
        assert_eq!(t.errors.get(&ErrorKind::Tls), Some(&2));
        assert_eq!(t.error_count(), 2);
        assert_eq!(t.elapsed_secs, 97.0, "the slowest process");
        assert_eq!(t.cpu_secs, 3.0);
        assert_eq!(t.max_rss_kib, 9700);
    }

    #[test]
    fn report_roundtrips_as_json() {
        let r = report(&[5, 6, 7], &[(ErrorKind::Connect, 1)]);
        let j = serde_json::to_string(&r).unwrap();
        let back: SwarmReport = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.rtt_us.histogram().unwrap().len(), 3);
    }

    #[test]
    fn ratios_pick_the_best_peer() {
        assert_eq!(ratio_lower_better(1.0, &[4.0, 2.0]), Some(0.5));
        assert_eq!(ratio_higher_better(3.0, &[1.0, 2.0]), Some(1.5));
        assert_eq!(ratio_higher_better(3.0, &[]), None);
        assert_eq!(ratio_lower_better(1.0, &[0.0]), None);
    }
}
