//! The metrics endpoint as Prometheus, an OpenMetrics parser and a load
//! balancer see it, on a real holdfast with real devices.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Pki, eventually, metric, metrics, opts, start_proxy, start_wsm};
use holdfast::device::Device;

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    get_with(addr, path, "")
}

/// GET with extra header lines (each ending in \r\n).
fn get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

/// A parser of Python's prometheus_client (installed by .ci/run) reads the
/// text: `prometheus_client.openmetrics.parser` or the classic
/// `prometheus_client.parser`. Returns each family's name and type, and the
/// parser's listing for messages.
fn parse_with_python(module: &str, text: &str) -> (Vec<(String, String)>, String) {
    let script = format!(
        "import sys\nfrom {module} import text_string_to_metric_families\nfor f in text_string_to_metric_families(sys.stdin.read()):\n    print(f.name, f.type, len(f.samples))\n"
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("No module named"), "install the parser: python3 -m pip install prometheus-client ({err})");
    assert!(out.status.success(), "the OpenMetrics parser refused the exposition: {err}\n{text}");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let families = listing
        .lines()
        .map(|l| {
            let mut p = l.split(' ');
            (p.next().unwrap_or("").to_string(), p.next().unwrap_or("").to_string())
        })
        .collect();
    (families, listing)
}

#[test]
fn metrics_parse_as_openmetrics_with_every_family_contiguous() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    // Devices on both shards, under both CAs, one let in by ignore_validity.
    let mut devs = Vec::new();
    for name in ["oven-1", "oven-1", "oven-1", "thermostat-2019"] {
        let mut d = Device::connect(&opts(&pki, &proxy, name)).unwrap();
        d.send_text("hi").unwrap();
        assert_eq!(d.recv_text().unwrap(), "hi");
        devs.push(d);
    }
    assert!(Device::connect(&opts(&pki, &proxy, "rogue-1")).is_err());
    eventually(5, "the refusal to be counted", || metric(&proxy, "holdfast_handshake_refused_total", "unknown_ca") == 1);

    let (status, head, text) = get(proxy.metrics.unwrap(), "/metrics");
    assert_eq!(status, 200);
    assert!(head.contains("application/openmetrics-text"), "{head}");

    // Contiguity: once a family's samples stop, that family never comes back.
    let mut done = std::collections::HashSet::new();
    let mut current = String::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_total", "_bucket", "_count", "_sum", "_info"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n)).to_string();
        if family != current {
            assert!(done.insert(current.clone()), "{current} is split:\n{text}");
            assert!(!done.contains(&family), "{family} is split:\n{text}");
            current = family;
        }
    }

    let (families, parsed) = parse_with_python("prometheus_client.openmetrics.parser", &text);
    assert!(families.len() > 40, "{parsed}");
    assert!(!families.iter().any(|(_, t)| t == "unknown"), "untyped families: {parsed}");
    for want in [
        ("holdfast_connections_accepted", "counter"),
        ("holdfast_build", "info"),
        ("holdfast_handshake_duration_seconds", "histogram"),
        ("holdfast_wsm_open_duration_seconds", "histogram"),
        ("holdfast_server_certificate_expiry_timestamp_seconds", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("holdfast_devices_accepted", "counter"),
        ("holdfast_links_up", "gauge"),
    ] {
        assert!(families.iter().any(|(n, t)| (n.as_str(), t.as_str()) == want), "{want:?} missing: {parsed}");
    }

    // What the families say.
    assert!(text.contains(&format!("holdfast_build_info{{version=\"{}\",commit=\"", env!("CARGO_PKG_VERSION"))), "{text}");
    assert_eq!(metric(&proxy, "holdfast_devices_accepted_total", "ca=\"fleet-2024.pem\",validity=\"current\""), 3);
    assert_eq!(metric(&proxy, "holdfast_devices_accepted_total", "ca=\"fleet-2019.pem\",validity=\"ignored\""), 1);
    assert_eq!(metric(&proxy, "holdfast_handshake_duration_seconds_count", ""), 4);
    assert_eq!(metric(&proxy, "holdfast_wsm_open_duration_seconds_count", &format!("wsm=\"{}\"", wsm.addr)), 4);
    assert_eq!(metric(&proxy, "holdfast_links_up", &format!("wsm=\"{}\"", wsm.addr)), 2);
    assert_eq!(metric(&proxy, "holdfast_ws_upgrades_completed_total", ""), 4);
    let value = |name: &str| -> f64 {
        text.lines().find(|l| l.starts_with(&format!("{name} "))).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(-1.0)
    };
    // The dev PKI's server certificate ends on 2099-01-01.
    assert_eq!(value("holdfast_server_certificate_expiry_timestamp_seconds"), 4_070_908_800.0);
    let fds = value("process_open_fds");
    assert!(fds >= 4.0 && value("process_max_fds") >= fds, "{text}");
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(!text.contains("holdfast_upgrades_completed"), "renamed: it counts 101 answers, not live upgrades");

    // A client that asks for the classic text format gets it, every family
    // typed and whole for that format's parser too.
    let (status, head, classic) = get_with(proxy.metrics.unwrap(), "/metrics", "Accept: text/plain; version=0.0.4\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let (names, parsed) = parse_with_python("prometheus_client.parser", &classic);
    assert!(!names.iter().any(|(_, t)| t == "unknown" || t == "untyped"), "untyped in the classic format: {parsed}");
    let unique: std::collections::BTreeSet<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(unique.len(), names.len(), "a family appears twice: {parsed}");
    assert!(names.iter().any(|(n, t)| n == "holdfast_connections_accepted" && t == "counter"), "{parsed}");
    assert_eq!(names.len(), families.len());
    drop(devs);
}

#[test]
fn healthz_and_readyz_tell_a_load_balancer_whether_to_send_devices() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    let m = proxy.metrics.unwrap();
    assert_eq!(get(m, "/healthz").0, 200);
    eventually(10, "ready with a WSM link up", || get(m, "/readyz").0 == 200);
    // No WSM: alive, but not ready.
    drop(wsm);
    eventually(20, "not ready once no WSM link is up", || get(m, "/readyz").0 == 503);
    let (_, _, body) = get(m, "/readyz");
    assert!(body.contains("no WSM link up"), "{body}");
    assert_eq!(get(m, "/healthz").0, 200);
    assert_eq!(get(m, "/nope").0, 404);
    assert!(metrics(&proxy).ends_with("# EOF\n"));
}
