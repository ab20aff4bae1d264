//! Device labels (issue 12): the labels file reaches the WSM in the OPEN and,
//! after a reload, as LABELS on streams already open; the reference WSM
//! restricts a `quarantine` device to the message types it allows; a WSM
//! that speaks only link protocol version 1 still serves every device.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use common::*;
use holdfast::device::Device;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn fingerprint(pki: &Pki, device: &str) -> String {
    let der = CertificateDer::from_pem_file(pki.path().join(format!("devices/{device}.pem"))).unwrap();
    holdfast::identity::hex(&holdfast::identity::sha256(der.as_ref()))
}

fn whoami_labels(d: &mut Device) -> Vec<String> {
    d.send_text("whoami").unwrap();
    let w: serde_json::Value = serde_json::from_str(&d.recv_text().unwrap()).unwrap();
    w["labels"].as_array().map(|a| a.iter().map(|l| l.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

fn say(d: &mut Device, msg: &str) -> String {
    d.send_text(msg).unwrap();
    d.recv_text().unwrap()
}

const TELEMETRY: &str = r#"{"type":"telemetry","t":21.5}"#;
const FIRMWARE: &str = r#"{"type":"firmware_status","v":"4.2"}"#;

fn proxy_with_labels(pki: &Pki, wsm: std::net::SocketAddr) -> Proc {
    start_proxy_full(pki, &[wsm], 1, "labels = \"labels.toml\"", "", "", &[])
}

#[test]
fn a_quarantined_device_may_send_only_allowed_types_and_a_reload_lifts_or_sets_it_without_a_reconnect() {
    let pki = Pki::new();
    let labels = pki.path().join("labels.toml");
    std::fs::write(&labels, format!("\"{}\" = [\"quarantine\"]\n", fingerprint(&pki, "oven-1"))).unwrap();
    let wsm = start_wsm_args(pki.path(), "wsm-a", &["--quarantine-allow", "firmware_status"]);
    let proxy = proxy_with_labels(&pki, wsm.addr);
    let mut oven = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    let mut thermo = Device::connect(&opts(&pki, &proxy, "thermostat-2019")).unwrap();
    assert_eq!(whoami_labels(&mut oven), vec!["quarantine"], "the OPEN carried the labels");
    assert!(whoami_labels(&mut thermo).is_empty());
    let refused = say(&mut oven, TELEMETRY);
    assert!(refused.contains("\"quarantined\"") && refused.contains("telemetry"), "{refused}");
    assert_eq!(say(&mut oven, FIRMWARE), FIRMWARE, "an allowed type passes");
    assert_eq!(say(&mut thermo, TELEMETRY), TELEMETRY, "other devices are not touched");

    // The quarantine moves from oven-1 to the thermostat; SIGHUP.
    std::fs::write(&labels, format!("\"{}\" = [\"quarantine\"]\n", fingerprint(&pki, "thermostat-2019"))).unwrap();
    kill(Pid::from_raw(proxy.child.id() as i32), Signal::SIGHUP).unwrap();
    eventually(10, "the new labels reach the WSM", || whoami_labels(&mut oven).is_empty());
    assert_eq!(say(&mut oven, TELEMETRY), TELEMETRY, "lifted, on the same connection");
    assert_eq!(whoami_labels(&mut thermo), vec!["quarantine"]);
    assert!(say(&mut thermo, TELEMETRY).contains("quarantined"), "set, on the same connection");
    assert_eq!(metric(&proxy, "holdfast_connections_accepted_total", ""), 2, "no device reconnected");
    drop(wsm);
}

#[test]
fn a_version_1_wsm_is_spoken_to_in_version_1_and_gets_no_labels() {
    let pki = Pki::new();
    std::fs::write(pki.path().join("labels.toml"), format!("\"{}\" = [\"quarantine\"]\n", fingerprint(&pki, "oven-1"))).unwrap();
    let wsm = start_wsm_args(pki.path(), "wsm-old", &["--max-version", "1", "--quarantine-allow", "firmware_status"]);
    let proxy = proxy_with_labels(&pki, wsm.addr);
    let mut oven = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    assert!(whoami_labels(&mut oven).is_empty(), "version 1 has no labels");
    assert_eq!(say(&mut oven, TELEMETRY), TELEMETRY);
    let log = std::fs::read_to_string(&proxy.stderr_log).unwrap();
    assert!(log.contains("offering the one before"), "holdfast fell back: {log}");
    assert_eq!(metric(&proxy, "holdfast_links_up", ""), 1);
}

#[test]
fn a_bad_labels_file_is_refused_with_its_key() {
    let pki = Pki::new();
    std::fs::write(pki.path().join("labels.toml"), "\"serial:1f\" = [\"Not A Label\"]\n").unwrap();
    let cfg = pki.path().join("bad.toml");
    let good = holdfast::pki::example_config("127.0.0.1:0", "127.0.0.1:9", "1", "127.0.0.1:0");
    std::fs::write(&cfg, good.replace("blocklist = \"blocklist.txt\"", "blocklist = \"blocklist.txt\"\nlabels = \"labels.toml\"")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("check-config").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("tls.labels") && err.contains("not a label"), "{err}");
}
