//! The storm's and the drain's own measurements: starting each proxy's
//! drain, the upstream's opens per second (from its open log), and the
//! devices' closes per second.

use std::path::Path;

use crate::peers::Proxy;
use crate::report::{ratio_cell, ratio_lower_better};
use crate::result::ScenarioResult;

/// Starts the proxy's drain over `over` seconds: holdfast's `ctl drain`,
/// HAProxy's soft stop (SIGUSR1: its config spreads closes with
/// `close-spread-time` and ends at `hard-stop-after`), nginx's graceful quit
/// (SIGQUIT: open connections end at `worker_shutdown_timeout`).
pub fn start_drain(proxy: Proxy, pid: u32, pki: &Path, over: f64) -> Result<(), String> {
    let signal = |sig| {
        // SAFETY: plain kill(2) of the benchmark's own child.
        unsafe { libc::kill(pid as i32, sig) };
        Ok(())
    };
    match proxy {
        Proxy::Holdfast => {
            let me = std::env::current_exe().map_err(|e| e.to_string())?;
            let holdfast = me.parent().map(|d| d.join("holdfast")).ok_or("no holdfast binary beside hf-bench")?;
            let out = std::process::Command::new(holdfast)
                .args(["ctl", "--socket"])
                .arg(pki.join("control.sock"))
                .args(["drain", "--over", &format!("{}ms", (over * 1000.0) as u64)])
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("ctl drain: {}", String::from_utf8_lossy(&out.stderr)));
            }
            Ok(())
        }
        Proxy::Haproxy => signal(libc::SIGUSR1),
        Proxy::Nginx => signal(libc::SIGQUIT),
    }
}

/// Opens the upstream logged from `since` (Unix ms): per second, and the
/// most in any sliding second.
pub fn opens(log: &Path, since: u64) -> (Vec<u64>, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut ms: Vec<u64> = text.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).filter(|t| *t >= since).collect();
    ms.sort_unstable();
    let peak = holdfast::wsm::openlog::peak_in(&ms, 1000) as u64;
    (per_second(&ms, since), peak)
}

/// Closes from `since` (Unix ms): per second, and when the last one was (s).
pub fn closes(close_ms: &[u64], since: u64) -> (Vec<u64>, f64) {
    let last = close_ms.iter().copied().max().unwrap_or(since);
    (per_second(close_ms, since), last.saturating_sub(since) as f64 / 1000.0)
}

/// Counts per whole second from `since`.
pub fn per_second(ms: &[u64], since: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for t in ms {
        let i = (t.saturating_sub(since) / 1000) as usize;
        if out.len() <= i {
            out.resize(i + 1, 0);
        }
        out[i] += 1;
    }
    out
}

/// The busiest second over the mean of the seconds that had any (a flat
/// drain is near 1; everything at once is the count of seconds).
pub fn flatness(per_sec: &[u64]) -> f64 {
    let busy: Vec<u64> = per_sec.iter().copied().filter(|n| *n > 0).collect();
    if busy.is_empty() {
        return 0.0;
    }
    let total: u64 = per_sec.iter().sum();
    let mean = total as f64 / per_sec.len() as f64;
    *busy.iter().max().unwrap_or(&0) as f64 / mean
}

/// The storm's table: time until all are back, the upstream's busiest
/// second, proxy CPU and peak memory, refusals retried; ratios to the best peer.
pub fn storm_table(rs: &[&ScenarioResult], hf: Option<&&ScenarioResult>, peers: &[&&ScenarioResult]) -> String {
    let mut md = String::from(
        "| proxy | limits | devices | back | failed | retried attempts | all back after | busiest upstream second | proxy CPU s | proxy peak RSS | reconnect p50 / p99 |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let lim = match (r.args.handshakes_per_sec, r.args.opens_per_sec) {
            (0, 0) => "none".to_string(),
            (h, o) => format!(
                "{} handshakes/s, {} opens/s",
                if h == 0 || r.proxy == "nginx" { "-".into() } else { h.to_string() },
                if o == 0 { "-".into() } else { o.to_string() }
            ),
        };
        md.push_str(&format!(
            "| {} | {lim} | {} | {} | {} | {} | {:.2} s | {} | {:.2} | {} MiB | {} / {} ms |\n",
            r.proxy,
            r.devices_ready,
            r.swarm.handshakes,
            r.swarm.error_count(),
            r.swarm.retries,
            r.storm_secs.unwrap_or(0.0),
            r.opens_peak.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            r.proxy_cpu_secs,
            r.proxy_rss_peak_kib / 1024,
            r.swarm.connect_us.p50 / 1000,
            r.swarm.connect_us.p99 / 1000
        ));
    }
    if let Some(h) = hf {
        let t = |r: &ScenarioResult| r.storm_secs.unwrap_or(0.0);
        let p = |r: &ScenarioResult| r.proxy_rss_peak_kib as f64;
        let c = |r: &ScenarioResult| r.proxy_cpu_secs;
        let o = |r: &ScenarioResult| r.opens_peak.unwrap_or(0) as f64;
        md.push_str(&format!(
            "\nholdfast / best peer: time until all back {}; busiest upstream second {} (lower is better: how hard the backends were hit); proxy CPU {}; peak RSS {}\n",
            ratio_cell(ratio_lower_better(t(h), &peers.iter().map(|r| t(r)).collect::<Vec<_>>())),
            ratio_cell(ratio_lower_better(o(h), &peers.iter().map(|r| o(r)).collect::<Vec<_>>())),
            ratio_cell(ratio_lower_better(c(h), &peers.iter().map(|r| c(r)).collect::<Vec<_>>())),
            ratio_cell(ratio_lower_better(p(h), &peers.iter().map(|r| p(r)).collect::<Vec<_>>())),
        ));
    }
    md
}

/// A drain's busiest second over its mean, the mean taken over the window
/// (or over the seconds the drain took, if longer).
fn drain_flatness(r: &ScenarioResult) -> f64 {
    let mut per = r.closes_per_sec.clone().unwrap_or_default();
    per.resize(per.len().max(r.args.drain_over.ceil() as usize), 0);
    flatness(&per)
}

/// The drain's table: how the closes spread over the window.
pub fn drain_table(rs: &[&ScenarioResult]) -> String {
    let mut md = String::from(
        "| proxy | devices | closed | close codes | last close after | window | busiest second / mean (flat = 1) | busiest second |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let per = r.closes_per_sec.clone().unwrap_or_default();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} s | {:.0} s | {:.2} | {} |\n",
            r.proxy,
            r.devices_ready,
            r.swarm.close_ms.len(),
            r.swarm.close_codes.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "),
            r.drain_secs.unwrap_or(0.0),
            r.args.drain_over,
            drain_flatness(r),
            per.iter().max().copied().unwrap_or(0)
        ));
    }
    if let Some(h) = rs.iter().find(|r| r.proxy == "holdfast") {
        let peers: Vec<f64> = rs.iter().filter(|r| r.proxy != "holdfast").map(|r| drain_flatness(r)).collect();
        md.push_str(&format!(
            "\nholdfast / best peer: busiest second over the mean (lower is better, 1 is flat) {}\n",
            ratio_cell(ratio_lower_better(drain_flatness(h), &peers))
        ));
    }
    md
}

/// A line chart of per-second counts, one line per (label, series).
pub fn line_svg(title: &str, unit: &str, series: &[(String, Vec<u64>)]) -> String {
    let (w, h, left, top, bottom) = (720.0, 320.0, 60.0, 40.0, 40.0);
    let len = series.iter().map(|s| s.1.len()).max().unwrap_or(0).max(2);
    let max = series.iter().flat_map(|s| s.1.iter()).copied().max().unwrap_or(1).max(1) as f64;
    let x = |i: usize| left + (w - left - 130.0) * i as f64 / (len - 1) as f64;
    let y = |v: u64| top + (h - top - bottom) * (1.0 - v as f64 / max);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{title}</text>"#
    );
    s.push_str(&format!(
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/><text x="5" y="{}">{max:.0}</text><text x="5" y="{}">0</text><text x="{}" y="{}">{} s</text><text x="{left}" y="{}">{unit}, per second from the start</text>"#,
        h - bottom,
        w - 130.0,
        h - bottom,
        h - bottom,
        top + 4.0,
        h - bottom,
        w - 160.0,
        h - bottom + 16.0,
        len - 1,
        h - 8.0
    ));
    let colors = ["#2b7a78", "#c0392b", "#7f8c8d", "#8e44ad"];
    for (k, (label, v)) in series.iter().enumerate() {
        let color = if label.starts_with("holdfast") { colors[0] } else { colors[1 + (k % 3)] };
        let pts: Vec<String> = v.iter().enumerate().map(|(i, n)| format!("{:.1},{:.1}", x(i), y(*n))).collect();
        s.push_str(&format!(r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, pts.join(" ")));
        s.push_str(&format!(r#"<text x="{}" y="{}" fill="{color}">{label}</text>"#, w - 120.0, top + 16.0 * (k as f64 + 1.0)));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_count_from_the_start_and_flatness_is_peak_over_mean() {
        assert_eq!(per_second(&[1000, 1500, 2999, 4000], 1000), vec![2, 1, 0, 1]);
        assert_eq!(closes(&[1000, 3500], 1000), (vec![1, 0, 1], 2.5));
        assert!((flatness(&[10, 10, 10]) - 1.0).abs() < 1e-9);
        assert!((flatness(&[0, 0, 30]) - 3.0).abs() < 1e-9, "all in the last second of three");
        assert_eq!(flatness(&[]), 0.0);
    }
}
