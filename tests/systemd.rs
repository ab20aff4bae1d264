//! The systemd unit: systemd-analyze accepts it (no warning either), and it
//! checks the config before every start.
#![allow(clippy::disallowed_methods)] // tests read the clock

use std::path::Path;
use std::process::Command;

fn unit() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/holdfast.service")).unwrap()
}

#[test]
fn the_unit_passes_systemd_analyze_verify_without_a_warning() {
    let ok = Command::new("systemd-analyze").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "systemd-analyze is missing: apt-get install systemd (.ci/run installs it)");
    let dir = tempfile::tempdir().unwrap();
    // The unit names the installed binary; point it at the one just built.
    let text = unit().replace("/usr/local/bin/holdfast", env!("CARGO_BIN_EXE_holdfast"));
    let path = dir.path().join("holdfast.service");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.trim().is_empty(), "systemd-analyze warns: {err}");
}

#[test]
fn every_start_checks_the_config_it_runs() {
    let u = unit();
    let line = |key: &str| u.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}")).to_string();
    let start = line("ExecStart=");
    let pre = line("ExecStartPre=");
    let config = start.split("--config ").nth(1).unwrap().trim();
    assert_eq!(pre, format!("ExecStartPre=/usr/local/bin/holdfast check-config {config}"));
    assert!(u.contains("LimitNOFILE=") && u.contains("LimitMEMLOCK=infinity"));
}

#[test]
fn reload_is_the_config_reload_of_the_running_config() {
    let u = unit();
    let line = |key: &str| u.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}")).to_string();
    let config = line("ExecStart=").split("--config ").nth(1).unwrap().trim().to_string();
    let reload = line("ExecReload=");
    assert!(reload.starts_with("ExecReload=/usr/local/bin/holdfast reload --config "), "{reload}");
    assert!(reload.contains(&config), "reloads the config it runs: {reload}");
    assert!(!reload.contains("upgrade"), "a reload is not a binary upgrade");
}

#[test]
fn the_blocklist_follower_unit_passes_systemd_analyze_verify_too() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/holdfast-blocklist-sync.service")).unwrap();
    // The unit names the installed binary; any executable stands in for it here.
    let text = text.replace("/usr/local/bin/holdfast-blocklist-sync", env!("CARGO_BIN_EXE_holdfast"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holdfast-blocklist-sync.service");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The only complaint allowed: holdfast.service itself is not installed here.
    let other: Vec<&str> = err.lines().filter(|l| !l.contains("holdfast.service")).collect();
    assert!(other.is_empty(), "systemd-analyze warns: {err}");
}

#[test]
fn a_stop_has_time_for_the_whole_graceful_drain() {
    let u = unit();
    let secs: u64 = u
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec is set (the default 90 s would not follow stop_over_ms)")
        .trim()
        .parse()
        .unwrap();
    let stop_over = holdfast::config::admission::DrainFile::default().stop_over_ms / 1000;
    // The window, then up to 5 s for the last connections, then the exit.
    assert!(secs > stop_over + 5, "TimeoutStopSec={secs} is not longer than drain.stop_over_ms ({stop_over} s) and its grace");
    assert!(!u.contains("KillSignal="), "systemctl stop must send SIGTERM, the graceful stop");
}
