//! The Grafana dashboard and the Prometheus alert rules: valid, tested with
//! promtool, and naming only metrics a live holdfast exposes.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Pki, metrics, start_proxy, start_wsm};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring")
}

/// Metric names in PromQL text: holdfast_* and process_* identifiers.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let rest = &expr[i..];
        let starts = (rest.starts_with("holdfast_") || rest.starts_with("process_"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
        if starts {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            out.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

fn promtool() -> &'static str {
    let ok = Command::new("promtool").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "promtool is missing: apt-get install prometheus (.ci/run installs it)");
    "promtool"
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let p = promtool();
    let out = Command::new(p).args(["check", "rules"]).arg(dir().join("alerts.yml")).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let out = Command::new(p).args(["test", "rules", "alerts.test.yml"]).current_dir(dir()).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let rules = std::fs::read_to_string(dir().join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir().join("alerts.test.yml")).unwrap();
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {alert}")), "{alert} has no promtool unit test");
    }
    for needed in ["Certificate", "WsmLink", "Refusals", "FileDescriptors", "BufferPool"] {
        assert!(rules.contains(&format!("alert: Holdfast{needed}")), "{needed}");
    }
}

#[test]
fn every_metric_the_dashboard_and_alerts_use_exists() {
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("grafana-dashboard.json")).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 12, "{}", panels.len());
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            used.extend(names_in(t["expr"].as_str().unwrap()));
        }
    }
    let rules = std::fs::read_to_string(dir().join("alerts.yml")).unwrap();
    let code: String = rules.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    used.extend(names_in(&code));

    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    common::eventually(10, "links up", || common::metric(&proxy, "holdfast_links_up", "") == 2);
    let text = metrics(&proxy);
    let exposed: BTreeSet<String> =
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(|l| l.split(['{', ' ']).next().unwrap().to_string()).collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "used by monitoring/ but not exposed: {missing:?}");
    assert!(used.len() >= 20, "{used:?}");
}
