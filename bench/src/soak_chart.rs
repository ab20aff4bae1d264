//! The soak's chart (SVG) and its Markdown summary for `bench/RESULTS.md`.
//! Reads a [`SoakResult`]; computes nothing the run did not record.

use std::collections::BTreeMap;

use crate::soak::{Event, SoakResult};

/// Writes `<out>/<label>.json` and `.svg`; prints the Markdown summary.
pub fn write(r: &SoakResult) -> Result<(), String> {
    std::fs::create_dir_all(&r.args.out).map_err(|e| e.to_string())?;
    let name = r.args.out.join(&r.args.label);
    std::fs::write(name.with_extension("json"), serde_json::to_string_pretty(r).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    std::fs::write(name.with_extension("svg"), svg(r)).map_err(|e| e.to_string())?;
    print!("{}", markdown(r, &format!("results/soak/{}.svg", r.args.label)));
    Ok(())
}

/// Per holdfast process (a live upgrade starts the next), its highest RSS
/// sampled and the connections it held then: (pid, KiB, connections).
pub fn peak_per_process(r: &SoakResult) -> Vec<(u32, u64, u64)> {
    let mut order: Vec<u32> = Vec::new();
    let mut peak: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for s in r.node.iter().filter(|s| s.pid != 0 && s.rss_kib > 0 && s.connections > 0) {
        if !order.contains(&s.pid) {
            order.push(s.pid);
        }
        let e = peak.entry(s.pid).or_default();
        if s.rss_kib > e.0 {
            *e = (s.rss_kib, s.connections);
        }
    }
    order.iter().map(|p| (*p, peak[p].0, peak[p].1)).collect()
}

fn count(events: &[Event], what: &str) -> (usize, usize, f64) {
    let of: Vec<&Event> = events.iter().filter(|e| e.what == what).collect();
    let worst = of.iter().filter_map(|e| e.secs).fold(0.0, f64::max);
    (of.iter().filter(|e| e.ok).count(), of.len(), worst)
}

pub fn markdown(r: &SoakResult, svg_name: &str) -> String {
    let t = &r.total;
    let (up_ok, ups, up_worst) = count(&r.events, "upgrade");
    let (kills, _, _) = count(&r.events, "wsm-kill");
    let (re_ok, res, re_worst) = count(&r.events, "reload");
    let peaks = peak_per_process(r);
    let mib = |k: u64| k as f64 / 1024.0;
    let peak_list = peaks.iter().map(|(_, k, _)| format!("{:.0}", mib(*k))).collect::<Vec<_>>().join(", ");
    let per_conn = peaks.iter().filter(|p| p.2 > 0).map(|(_, k, c)| *k as f64 * 1024.0 / *c as f64).collect::<Vec<_>>();
    let (fmin, fmax) = r.node.iter().fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s.fds), hi.max(s.fds)));
    let overhead = |s: &crate::soak::NodeSample| s.fds as i64 - s.connections as i64;
    let (first, last) = (r.node.iter().find(|s| s.connections > 0), r.node.last());
    let worst_p99 = r.devices.iter().map(|d| d.tally.rtt_us.p99).max().unwrap_or(0);
    let mut md = format!(
        "### Soak: {} minutes, {} devices ({})\n\n`{}` ({}; {} cores, {})\n\n![soak]({svg_name})\n\n| | |\n|---|---|\n",
        r.args.minutes, r.args.conns, r.args.label, r.command, r.date, r.machine.nproc, r.machine.kernel
    );
    let mut row = |k: &str, v: String| md.push_str(&format!("| {k} | {v} |\n"));
    row("messages echoed", t.messages.to_string());
    row("messages lost (no echo, or a different one)", t.lost.to_string());
    row("connections cut (not ended by the device)", t.cut.to_string());
    row("handshakes / clean leaves (churn) / failed connects", format!("{} / {} / {}", t.connects, t.left, t.failed_connects));
    row("live upgrades (ok / done), slowest", format!("{up_ok} / {ups}, {up_worst:.1} s"));
    row("WSMs killed (SIGKILL) and restarted", kills.to_string());
    row("reloads (ok / done), slowest", format!("{re_ok} / {res}, {re_worst:.2} s"));
    row(
        "round trip p50 / p99 / p99.9 / max",
        format!(
            "{:.1} / {:.1} / {:.1} / {:.0} ms",
            t.rtt_us.p50 as f64 / 1e3,
            t.rtt_us.p99 as f64 / 1e3,
            t.rtt_us.p999 as f64 / 1e3,
            t.rtt_us.max as f64 / 1e3
        ),
    );
    row("worst sample's p99", format!("{:.1} ms", worst_p99 as f64 / 1e3));
    row("peak RSS of each process (MiB, one per upgrade)", peak_list);
    if let (Some(lo), Some(hi)) = (per_conn.iter().cloned().reduce(f64::min), per_conn.iter().cloned().reduce(f64::max)) {
        row("RSS per connection at each process's peak", format!("{:.1} to {:.1} KiB", lo / 1024.0, hi / 1024.0));
    }
    row("descriptors (min / max)", format!("{fmin} / {fmax}"));
    if let (Some(f), Some(l)) = (first, last) {
        row("descriptors beyond connections (first / last sample)", format!("{} / {}", overhead(f), overhead(l)));
        row(
            "partial-record, held and buffer-pool bytes (last sample)",
            format!("{} / {} / {} buffers lent", l.partial_bytes, l.held_bytes, l.buffers_in_use),
        );
    }
    if let Some(p) = &t.first_problem {
        row("first problem a device saw", format!("`{}`", p.replace('|', "/")));
    }
    md.push('\n');
    md
}

/// Three panels over the run's minutes: RSS, descriptors and connections,
/// round trips (p99 and max, log scale); the events as vertical lines.
pub fn svg(r: &SoakResult) -> String {
    let (w, ph, left, top, gap) = (900.0, 170.0, 70.0, 40.0, 40.0);
    let h = top + 3.0 * (ph + gap);
    let end = r.node.last().map_or(1.0, |s| s.t_secs).max(1.0);
    let x = |t: f64| left + (w - left - 150.0) * t / end;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">Soak: {} min, {} devices, upgrades, WSM kills and reloads</text>"#,
        r.args.minutes, r.args.conns
    );
    let panel = |k: usize| top + k as f64 * (ph + gap);
    for (k, title) in
        ["holdfast RSS, MiB", "descriptors (teal), connections (grey)", "round trip p99 (teal), max (red), ms, log"].iter().enumerate()
    {
        let y0 = panel(k);
        s.push_str(&format!(
            r#"<line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{left}" y1="{y0}" x2="{left}" y2="{b}" stroke="black"/><text x="{left}" y="{t}">{title}</text>"#,
            b = y0 + ph,
            r = w - 150.0,
            t = y0 - 6.0
        ));
    }
    s.push_str(&format!(r#"<text x="{}" y="{}">{:.0} min</text>"#, w - 145.0, panel(2) + ph + 4.0, end / 60.0));
    for e in &r.events {
        let color = match e.what.as_str() {
            "upgrade" => "#2980b9",
            "wsm-kill" => "#c0392b",
            "wsm-start" => "#e67e22",
            _ => "#95a5a6",
        };
        s.push_str(&format!(
            r#"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="{color}" stroke-dasharray="3,3"/>"#,
            x(e.t_secs),
            top,
            panel(2) + ph
        ));
    }
    for (k, (label, color)) in
        [("upgrade", "#2980b9"), ("WSM killed", "#c0392b"), ("WSM started", "#e67e22"), ("reload", "#95a5a6")].iter().enumerate()
    {
        s.push_str(&format!(r#"<text x="{}" y="{}" fill="{color}">{label}</text>"#, w - 140.0, top + 16.0 * (k as f64 + 1.0)));
    }
    let mut line = |k: usize, pts: &[(f64, f64)], max: f64, color: &str, log: bool| {
        let y0 = panel(k);
        let y = |v: f64| {
            let f = if log { (v.max(0.1) / 0.1).log10() / (max / 0.1).log10().max(1e-9) } else { v / max.max(1e-9) };
            y0 + ph * (1.0 - f.clamp(0.0, 1.0))
        };
        let p: Vec<String> = pts.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
        s.push_str(&format!(r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, p.join(" ")));
    };
    let rss: Vec<(f64, f64)> = r.node.iter().filter(|n| n.rss_kib > 0).map(|n| (n.t_secs, n.rss_kib as f64 / 1024.0)).collect();
    let rss_max = rss.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    line(0, &rss, rss_max, "#2b7a78", false);
    let fds: Vec<(f64, f64)> = r.node.iter().map(|n| (n.t_secs, n.fds as f64)).collect();
    let conns: Vec<(f64, f64)> = r.node.iter().map(|n| (n.t_secs, n.connections as f64)).collect();
    let f_max = fds.iter().chain(conns.iter()).map(|p| p.1).fold(1.0, f64::max) * 1.1;
    line(1, &fds, f_max, "#2b7a78", false);
    line(1, &conns, f_max, "#7f8c8d", false);
    let p99: Vec<(f64, f64)> = r.devices.iter().map(|d| (d.t_secs, d.tally.rtt_us.p99 as f64 / 1e3)).collect();
    let mx: Vec<(f64, f64)> = r.devices.iter().map(|d| (d.t_secs, d.tally.rtt_us.max as f64 / 1e3)).collect();
    let l_max = mx.iter().map(|p| p.1).fold(1.0, f64::max) * 1.5;
    line(2, &p99, l_max, "#2b7a78", true);
    line(2, &mx, l_max, "#c0392b", true);
    for (k, max, unit) in [(0, rss_max, "MiB"), (1, f_max, ""), (2, l_max, "ms")] {
        s.push_str(&format!(r#"<text x="5" y="{}">{max:.0} {unit}</text>"#, panel(k) + 4.0));
        let lo = if k == 2 { "0.1" } else { "0" };
        s.push_str(&format!(r#"<text x="5" y="{}">{lo}</text>"#, panel(k) + ph));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::churn::Tally;
    use crate::soak::{DeviceSample, NodeSample, SoakArgs};

    fn result() -> SoakResult {
        let n = |t, pid, rss_kib, connections| NodeSample {
            t_secs: t,
            pid,
            rss_kib,
            fds: connections + 20,
            connections,
            ..NodeSample::default()
        };
        let args = <SoakArgs as clap::FromArgMatches>::from_arg_matches(
            &<SoakArgs as clap::Args>::augment_args(clap::Command::new("t")).get_matches_from(["t"]),
        )
        .unwrap();
        SoakResult {
            date: "2026-12-02".into(),
            command: "hf-bench soak".into(),
            machine: crate::run::machine(),
            args,
            node: vec![n(0.0, 7, 10_240, 0), n(10.0, 7, 20_480, 100), n(20.0, 9, 15_360, 100), n(30.0, 9, 18_432, 90)],
            devices: vec![DeviceSample { t_secs: 10.0, tally: Tally { messages: 5, ..Tally::default() } }],
            events: vec![
                Event { t_secs: 15.0, what: "upgrade".into(), secs: Some(1.5), ok: true, detail: String::new() },
                Event { t_secs: 25.0, what: "reload".into(), secs: Some(0.2), ok: false, detail: String::new() },
            ],
            total: Tally { messages: 5, ..Tally::default() },
        }
    }

    #[test]
    fn each_process_has_its_own_peak() {
        assert_eq!(peak_per_process(&result()), vec![(7, 20_480, 100), (9, 18_432, 90)]);
    }

    #[test]
    fn the_summary_counts_events_and_the_chart_marks_them() {
        let r = result();
        let md = markdown(&r, "x.svg");
        assert!(md.contains("| live upgrades (ok / done), slowest | 1 / 1, 1.5 s |"), "{md}");
        assert!(md.contains("| reloads (ok / done), slowest | 0 / 1, 0.20 s |"), "{md}");
        assert!(md.contains("| peak RSS of each process (MiB, one per upgrade) | 20, 18 |"), "{md}");
        assert!(md.contains("| descriptors beyond connections (first / last sample) | 20 / 20 |"), "{md}");
        let s = svg(&r);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("stroke-dasharray").count(), 2, "one line per event");
    }
}
