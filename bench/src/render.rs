//! Turns result files into bench/RESULTS.md tables (with holdfast / best
//! peer ratios) and SVG charts.

use std::collections::BTreeMap;
use std::path::Path;

use crate::report::{ratio_cell, ratio_higher_better, ratio_lower_better};
use crate::result::ScenarioResult;

pub fn today() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// Bytes of proxy RSS per held connection.
pub fn rss_per_conn(r: &ScenarioResult) -> f64 {
    if r.devices_ready == 0 {
        return 0.0;
    }
    (r.proxy_rss_loaded_kib.saturating_sub(r.proxy_rss_base_kib) as f64 * 1024.0) / r.devices_ready as f64
}

/// Bytes of proxy RSS per connection added after the first half: the
/// marginal cost, free of fixed costs that grow early (allocator arenas,
/// tables, TLS caches).
pub fn rss_marginal(r: &ScenarioResult) -> f64 {
    let added = r.devices_ready.saturating_sub(r.half_devices);
    if added == 0 || r.half_devices == 0 {
        return 0.0;
    }
    (r.proxy_rss_loaded_kib.saturating_sub(r.proxy_rss_half_kib) as f64 * 1024.0) / added as f64
}

pub fn sock_per_conn(r: &ScenarioResult) -> f64 {
    if r.devices_ready == 0 {
        return 0.0;
    }
    r.sock_mem_loaded_bytes.saturating_sub(r.sock_mem_base_bytes) as f64 / r.devices_ready as f64
}

pub fn handshakes_per_sec(r: &ScenarioResult) -> f64 {
    if r.swarm.elapsed_secs <= 0.0 { 0.0 } else { r.swarm.handshakes as f64 / r.swarm.elapsed_secs }
}

pub fn per_cpu_sec(count: u64, cpu: f64) -> f64 {
    if cpu <= 0.0 { 0.0 } else { count as f64 / cpu }
}

pub fn one_line(r: &ScenarioResult) -> String {
    format!(
        "{} {}: ready {} errors {} | rss/conn {:.0} B marginal {:.0} B sock/conn {:.0} B | handshakes {} ({:.0}/s, {:.0}/proxy-cpu-s) | msgs {} ({:.0}/proxy-cpu-s) p50 {} us p99 {} us | proxy cpu {:.2} s client cpu {:.2} s{}",
        r.scenario,
        r.proxy,
        r.devices_ready,
        r.swarm.error_count(),
        rss_per_conn(r),
        rss_marginal(r),
        sock_per_conn(r),
        r.swarm.handshakes,
        handshakes_per_sec(r),
        per_cpu_sec(r.swarm.handshakes, r.proxy_cpu_secs),
        r.swarm.messages,
        per_cpu_sec(r.swarm.messages, r.proxy_cpu_secs),
        r.swarm.rtt_us.p50,
        r.swarm.rtt_us.p99,
        r.proxy_cpu_secs,
        r.swarm.cpu_secs,
        r.storm_secs.map(|s| format!(" | storm back in {s:.2} s, peak rss {} KiB", r.proxy_rss_peak_kib)).unwrap_or_default()
            + &r.failover_secs
                .map(|s| format!(
                    " | failover: {} streams resumed in {s:.2} s, pause during it {}, whole run p99 {} ms",
                    r.failover_streams.unwrap_or(0),
                    pause_cell(&r.swarm.pause_window_us),
                    r.swarm.pause_us.p99 / 1000
                ))
                .unwrap_or_default()
            + &if r.scenario == "reload" {
                format!(
                    " | reload: applied in {}, every connection re-checked in {}, {} CPU s, pause during it {}, whole run p99 {} ms",
                    r.reload_apply_secs.map(|s| format!("{:.1} ms", s * 1e3)).unwrap_or_else(|| "-".into()),
                    r.reload_recheck_secs.map(|s| format!("{:.1} ms", s * 1e3)).unwrap_or_else(|| "-".into()),
                    r.reload_cpu_secs.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into()),
                    pause_cell(&r.swarm.pause_window_us),
                    r.swarm.pause_us.p99 / 1000
                )
            } else {
                String::new()
            }
            + &if r.scenario == "upgrade" {
                format!(
                    " | upgrade: {}{}, pause during it {}, whole run p99 {} ms, bytes lost {}",
                    r.upgrade_secs.map(|s| format!("{s:.3} s")).unwrap_or_else(|| "none (baseline)".into()),
                    r.upgrade_cpu_secs
                        .map(|c| format!(", {c:.3} CPU s ({:.0} us per device)", c * 1e6 / r.devices_ready.max(1) as f64))
                        .unwrap_or_default(),
                    pause_cell(&r.swarm.pause_window_us),
                    r.swarm.pause_us.p99 / 1000,
                    r.swarm.mismatched_bytes
                )
            } else {
                String::new()
            }
    )
}

/// "p50 / p99 / max ms (devices)" of a pause histogram.
fn pause_cell(p: &crate::report::Hist) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!("{:.1} / {:.1} / {:.1} ms ({})", p.p50 as f64 / 1000.0, p.p99 as f64 / 1000.0, p.max as f64 / 1000.0, p.count)
}

/// p50, p99 and max of each run's longest round trip per device during the
/// event (over the whole run where no window was reported), in ms.
fn pause_bars(rs: &[&ScenarioResult]) -> Vec<(String, f64)> {
    rs.iter()
        .flat_map(|r| {
            let p = if r.swarm.pause_window_us.count > 0 { &r.swarm.pause_window_us } else { &r.swarm.pause_us };
            [
                (format!("{} p50", r.proxy), p.p50 as f64 / 1000.0),
                (format!("{} p99", r.proxy), p.p99 as f64 / 1000.0),
                (format!("{} max", r.proxy), p.max as f64 / 1000.0),
            ]
        })
        .collect()
}

/// A horizontal bar chart, one bar per (label, value).
pub fn bar_svg(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let (w, row, left) = (640.0, 34.0, 150.0);
    let h = 60.0 + row * bars.len() as f64;
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13"><rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{title}</text>"#
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let bw = (w - left - 120.0) * v / max;
        let color = if label.starts_with("holdfast") { "#2b7a78" } else { "#9aa5b1" };
        s.push_str(&format!(r#"<text x="10" y="{}">{label}</text><rect x="{left}" y="{y}" width="{bw:.1}" height="22" fill="{color}"/><text x="{:.1}" y="{}">{v:.0} {unit}</text>"#, y + 16.0, left + bw + 6.0, y + 16.0));
    }
    s.push_str("</svg>\n");
    s
}

fn group(results: &[ScenarioResult]) -> BTreeMap<(String, String), Vec<&ScenarioResult>> {
    let mut g: BTreeMap<(String, String), Vec<&ScenarioResult>> = BTreeMap::new();
    for r in results {
        g.entry((r.scenario.clone(), r.label.clone())).or_default().push(r);
    }
    for v in g.values_mut() {
        v.sort_by_key(|r| match r.proxy.as_str() {
            "holdfast" => 0,
            "haproxy" => 1,
            _ => 2,
        });
    }
    g
}

/// Renders the results section of RESULTS.md and writes SVG charts to `dir`.
pub fn render(results: &[ScenarioResult], dir: &Path) -> Result<String, String> {
    let mut md = String::new();
    for ((scenario, label), rs) in group(results) {
        let title = if label.is_empty() { scenario.clone() } else { format!("{scenario} ({label})") };
        let hf = rs.iter().find(|r| r.proxy == "holdfast");
        let peers: Vec<&&ScenarioResult> = rs.iter().filter(|r| r.proxy != "holdfast").collect();
        let first = rs[0];
        md.push_str(&format!(
            "\n### {title}\n\n`{}`  \n{}; {} CPUs, kernel {}, {}; fd limit {}\n\n",
            first.command, first.date, first.machine.nproc, first.machine.kernel, first.machine.cpu, first.machine.fd_limit
        ));
        let file = format!("{scenario}{}.svg", if label.is_empty() { String::new() } else { format!("-{label}") });
        match scenario.as_str() {
            "idle" => {
                md.push_str("| proxy | devices | errors | RSS at start | RSS loaded | RSS growth / conn (average) | RSS / conn, second half (marginal) | kernel TCP mem / conn | swarm CPU s | swarm max RSS |\n|---|---|---|---|---|---|---|---|---|---|\n");
                for r in &rs {
                    md.push_str(&format!(
                        "| {} | {} | {} | {} MiB | {} MiB | {:.0} B | {:.0} B | {:.0} B | {:.1} | {} MiB |\n",
                        r.proxy,
                        r.devices_ready,
                        r.swarm.error_count(),
                        r.proxy_rss_base_kib / 1024,
                        r.proxy_rss_loaded_kib / 1024,
                        rss_per_conn(r),
                        rss_marginal(r),
                        sock_per_conn(r),
                        r.swarm.cpu_secs,
                        r.swarm.max_rss_kib / 1024
                    ));
                }
                if let Some(text) = hf.and_then(|h| h.holdfast_metrics.as_deref()) {
                    let state = crate::result::metric_sum(text, "holdfast_tunnel_state_bytes");
                    let active = crate::result::metric_sum(text, "holdfast_connections_active").max(1);
                    let bufs = crate::result::metric_sum(text, "holdfast_buffers_in_use");
                    md.push_str(&format!("\nholdfast's own accounting while loaded: {active} connections, {} B of tunnel state each (Tunnel, StreamShared, key material), {bufs} I/O buffers lent out.\n", state / active));
                }
                if let Some(h) = hf {
                    md.push_str(&format!(
                        "\nholdfast / best peer, RSS per connection (lower is better): average {}, marginal {}\n",
                        ratio_cell(ratio_lower_better(rss_per_conn(h), &peers.iter().map(|r| rss_per_conn(r)).collect::<Vec<_>>())),
                        ratio_cell(ratio_lower_better(rss_marginal(h), &peers.iter().map(|r| rss_marginal(r)).collect::<Vec<_>>()))
                    ));
                }
                let mut bars: Vec<(String, f64)> = Vec::new();
                for r in &rs {
                    bars.push((format!("{} average", r.proxy), rss_per_conn(r)));
                    bars.push((format!("{} marginal", r.proxy), rss_marginal(r)));
                }
                std::fs::write(dir.join(&file), bar_svg("Proxy RSS per idle mTLS WebSocket connection", "B", &bars))
                    .map_err(|e| e.to_string())?;
            }
            "handshake" => {
                md.push_str("| proxy | handshakes | resumed | errors | per second | proxy CPU used | per proxy CPU-second | connect p50 / p99 |\n|---|---|---|---|---|---|---|---|\n");
                for r in &rs {
                    md.push_str(&format!(
                        "| {} | {} | {} | {} | {:.0} | {:.0}% | {:.0} | {} / {} us |\n",
                        r.proxy,
                        r.swarm.handshakes,
                        r.swarm.resumed,
                        r.swarm.error_count(),
                        handshakes_per_sec(r),
                        100.0 * r.proxy_cpu_secs / r.swarm.elapsed_secs.max(1e-9),
                        per_cpu_sec(r.swarm.handshakes, r.proxy_cpu_secs),
                        r.swarm.connect_us.p50,
                        r.swarm.connect_us.p99
                    ));
                }
                if let Some(h) = hf {
                    let v = |r: &ScenarioResult| per_cpu_sec(r.swarm.handshakes, r.proxy_cpu_secs);
                    md.push_str(&format!(
                        "\nholdfast / best peer, handshakes per proxy CPU-second (higher is better): {}\n",
                        ratio_cell(ratio_higher_better(v(h), &peers.iter().map(|r| v(r)).collect::<Vec<_>>()))
                    ));
                }
                let bars: Vec<(String, f64)> =
                    rs.iter().map(|r| (r.proxy.clone(), per_cpu_sec(r.swarm.handshakes, r.proxy_cpu_secs))).collect();
                std::fs::write(dir.join(&file), bar_svg("Full mTLS handshakes per proxy CPU-second", "/s", &bars))
                    .map_err(|e| e.to_string())?;
            }
            "message" => {
                md.push_str("| proxy | devices | messages | errors | msgs/s | proxy CPU ms / 1000 msgs | msgs per proxy CPU-s | RTT p50 | p99 | p99.9 |\n|---|---|---|---|---|---|---|---|---|---|\n");
                for r in &rs {
                    let mps = r.swarm.messages as f64 / r.swarm.elapsed_secs.max(1e-9);
                    md.push_str(&format!(
                        "| {} | {} | {} | {} | {:.0} | {:.1} | {:.0} | {} us | {} us | {} us |\n",
                        r.proxy,
                        r.devices_ready,
                        r.swarm.messages,
                        r.swarm.error_count(),
                        mps,
                        1e6 * r.proxy_cpu_secs / (r.swarm.messages.max(1) as f64),
                        per_cpu_sec(r.swarm.messages, r.proxy_cpu_secs),
                        r.swarm.rtt_us.p50,
                        r.swarm.rtt_us.p99,
                        r.swarm.rtt_us.p999
                    ));
                }
                if let Some(h) = hf {
                    let v = |r: &ScenarioResult| per_cpu_sec(r.swarm.messages, r.proxy_cpu_secs);
                    let p99 = |r: &ScenarioResult| r.swarm.rtt_us.p99 as f64;
                    md.push_str(&format!(
                        "\nholdfast / best peer: messages per proxy CPU-second (higher is better) {}; p99 latency (lower is better) {}\n",
                        ratio_cell(ratio_higher_better(v(h), &peers.iter().map(|r| v(r)).collect::<Vec<_>>())),
                        ratio_cell(ratio_lower_better(p99(h), &peers.iter().map(|r| p99(r)).collect::<Vec<_>>()))
                    ));
                }
                let mut bars = Vec::new();
                for r in &rs {
                    bars.push((format!("{} p50", r.proxy), r.swarm.rtt_us.p50 as f64));
                    bars.push((format!("{} p99", r.proxy), r.swarm.rtt_us.p99 as f64));
                    bars.push((format!("{} p99.9", r.proxy), r.swarm.rtt_us.p999 as f64));
                }
                std::fs::write(dir.join(&file), bar_svg("Message round trip through the proxy", "us", &bars)).map_err(|e| e.to_string())?;
            }
            "reload" => {
                md.push_str("| proxy | devices | messages | errors | SIGHUP until every shard switched | until every connection was re-checked | CPU meanwhile | pause during the reload p50 / p99 / max | RTT p99 |\n|---|---|---|---|---|---|---|---|---|\n");
                for r in &rs {
                    md.push_str(&format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} ms |\n",
                        r.proxy,
                        r.devices_ready,
                        r.swarm.messages,
                        r.swarm.error_count(),
                        r.reload_apply_secs.map(|s| format!("{:.1} ms", s * 1e3)).unwrap_or_else(|| "-".into()),
                        r.reload_recheck_secs.map(|s| format!("{:.1} ms", s * 1e3)).unwrap_or_else(|| "-".into()),
                        r.reload_cpu_secs.map(|c| format!("{c:.3} s")).unwrap_or_else(|| "-".into()),
                        pause_cell(&r.swarm.pause_window_us),
                        r.swarm.rtt_us.p99 as f64 / 1000.0
                    ));
                }
                let bars = pause_bars(&rs);
                std::fs::write(dir.join(&file), bar_svg("Live reload: longest round trip per device", "ms", &bars))
                    .map_err(|e| e.to_string())?;
            }
            "upgrade" => {
                md.push_str("| proxy | devices | messages | errors | bytes lost or out of order | SIGUSR2 until the old process exited | CPU of both processes meanwhile | pause during the upgrade p50 / p99 / max (devices that talked) | longest round trip over the whole run p50 / p99 / max | RTT p99 |\n|---|---|---|---|---|---|---|---|---|---|\n");
                for r in &rs {
                    md.push_str(&format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} ms |\n",
                        r.proxy,
                        r.devices_ready,
                        r.swarm.messages,
                        r.swarm.error_count(),
                        r.swarm.mismatched_bytes,
                        r.upgrade_secs
                            .map(|s| format!("{s:.2} s"))
                            .unwrap_or_else(|| "no upgrade (baseline: a 1 s window at the same moment)".into()),
                        r.upgrade_cpu_secs.map(|c| format!("{c:.2} s")).unwrap_or_else(|| "-".into()),
                        pause_cell(&r.swarm.pause_window_us),
                        pause_cell(&r.swarm.pause_us),
                        r.swarm.rtt_us.p99 as f64 / 1000.0
                    ));
                }
                let bars = pause_bars(&rs);
                std::fs::write(dir.join(&file), bar_svg("Live upgrade: longest round trip per device", "ms", &bars))
                    .map_err(|e| e.to_string())?;
            }
            "failover" => {
                md.push_str("| proxy | devices | messages | errors | bytes lost or out of order | streams resumed | WSM killed until all resumed | pause during the failover p50 / p99 / max (devices that talked) | longest round trip over the whole run p50 / p99 / max |\n|---|---|---|---|---|---|---|---|---|\n");
                for r in &rs {
                    md.push_str(&format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                        r.proxy,
                        r.devices_ready,
                        r.swarm.messages,
                        r.swarm.error_count(),
                        r.swarm.mismatched_bytes,
                        r.failover_streams.unwrap_or(0),
                        r.failover_secs.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "-".into()),
                        pause_cell(&r.swarm.pause_window_us),
                        pause_cell(&r.swarm.pause_us),
                    ));
                }
                let bars = pause_bars(&rs);
                std::fs::write(dir.join(&file), bar_svg("WSM failover: longest round trip per device", "ms", &bars))
                    .map_err(|e| e.to_string())?;
            }
            "storm" => {
                md.push_str(&crate::departures::storm_table(&rs, hf, &peers));
                let bars: Vec<(String, f64)> = rs.iter().map(|r| (r.proxy.clone(), r.storm_secs.unwrap_or(0.0) * 1000.0)).collect();
                std::fs::write(dir.join(&file), bar_svg("Reconnect storm: time until every device is back", "ms", &bars))
                    .map_err(|e| e.to_string())?;
                if rs.iter().any(|r| r.opens_per_sec.is_some()) {
                    let series: Vec<(String, Vec<u64>)> =
                        rs.iter().map(|r| (r.proxy.clone(), r.opens_per_sec.clone().unwrap_or_default())).collect();
                    let f = file.replace(".svg", "-opens.svg");
                    std::fs::write(
                        dir.join(&f),
                        crate::departures::line_svg("Reconnect storm: upstream opens per second", "opens/s", &series),
                    )
                    .map_err(|e| e.to_string())?;
                    md.push_str(&format!("\n![{title}: upstream opens per second](results/{f})\n"));
                }
            }
            "drain" => {
                md.push_str(&crate::departures::drain_table(&rs));
                let series: Vec<(String, Vec<u64>)> =
                    rs.iter().map(|r| (r.proxy.clone(), r.closes_per_sec.clone().unwrap_or_default())).collect();
                std::fs::write(
                    dir.join(&file),
                    crate::departures::line_svg("Drain: device connections closed per second", "closes/s", &series),
                )
                .map_err(|e| e.to_string())?;
            }
            _ => {}
        }
        for r in &rs {
            if let Some(e) = &r.swarm.first_error {
                md.push_str(&format!("\n{}: first error: `{}`\n", r.proxy, e.replace('`', "'")));
            }
        }
        md.push_str(&format!("\n![{title}](results/{file})\n"));
    }
    Ok(md)
}

pub fn load(dir: &Path) -> Result<Vec<ScenarioResult>, String> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.path().extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(e.path()).map_err(|x| x.to_string())?;
            out.push(serde_json::from_str(&text).map_err(|x| format!("{}: {x}", e.path().display()))?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_scales_bars_and_marks_holdfast() {
        let s = bar_svg("t", "B", &[("holdfast".into(), 50.0), ("nginx".into(), 100.0)]);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("#2b7a78") && s.contains("#9aa5b1"));
        assert!(s.contains("width=\"185.0\"") && s.contains("width=\"370.0\""), "{s}");
    }
}
