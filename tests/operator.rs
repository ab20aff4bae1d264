//! What an operator does to a running holdfast by hand: signals, a second
//! start by mistake, a closed stdout. None of it may drop a device.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Pki, eventually, free_port, metric, opts, start_holdfast_config, start_wsm};
use holdfast::device::Device;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A config on fixed ports (a second instance must find them taken).
fn fixed_config(pki: &Pki, wsm: std::net::SocketAddr) -> (std::path::PathBuf, u16, u16) {
    let (port, mport) = (free_port(), free_port());
    let text = holdfast::pki::example_config(&format!("127.0.0.1:{port}"), &wsm.to_string(), "2", &format!("127.0.0.1:{mport}"));
    let path = pki.path().join(format!("fixed-{port}.toml"));
    std::fs::write(&path, text).unwrap();
    (path, port, mport)
}

fn round_trip(d: &mut Device, text: &str) {
    d.send_text(text).unwrap();
    assert_eq!(d.recv_text().unwrap(), text);
}

#[test]
fn a_second_instance_is_refused_and_the_first_keeps_serving() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let (cfg, port, mport) = fixed_config(&pki, wsm.addr);
    let first = start_holdfast_config(&pki, &cfg, &[]);
    let mut dev = Device::connect(&opts(&pki, &first, "oven-1")).unwrap();
    round_trip(&mut dev, "before");

    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).args(["run", "--config"]).arg(&cfg).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second instance started: {err}");
    assert!(err.contains(&format!("listen.addr: 127.0.0.1:{port} is already in use")) && err.contains("holdfast upgrade"), "{err}");

    // Only the listen address taken: the metrics port is checked too.
    let other = pki.path().join("other.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{}", free_port()));
    std::fs::write(&other, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).args(["run", "--config"]).arg(&other).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("metrics.addr: 127.0.0.1:{mport} is already in use")), "{err}");

    round_trip(&mut dev, "after");
    assert_eq!(metric(&first, "holdfast_connections_active", ""), 1);
    let mut fresh = Device::connect(&opts(&pki, &first, "oven-1")).unwrap();
    round_trip(&mut fresh, "new device, first instance");
}

#[test]
fn sighup_and_every_other_stray_signal_leave_every_device_connected() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let (cfg, _, _) = fixed_config(&pki, wsm.addr);
    let mut proxy = start_holdfast_config(&pki, &cfg, &[]);
    let mut devs: Vec<Device> = (0..3).map(|_| Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap()).collect();
    let pid = Pid::from_raw(proxy.child.id() as i32);
    let rt = nix::libc::SIGRTMIN();
    let stray = [
        nix::libc::SIGHUP,
        nix::libc::SIGUSR1,
        nix::libc::SIGALRM,
        nix::libc::SIGVTALRM,
        nix::libc::SIGPROF,
        nix::libc::SIGIO,
        nix::libc::SIGPWR,
        nix::libc::SIGXCPU,
        nix::libc::SIGXFSZ,
        nix::libc::SIGPIPE,
        nix::libc::SIGSTKFLT,
        nix::libc::SIGTRAP,
        nix::libc::SIGSYS,
        rt + 1,
        nix::libc::SIGRTMAX(),
    ];
    for sig in stray {
        // SAFETY: kill(2) takes plain integers (libc, for real-time signal numbers).
        assert_eq!(unsafe { nix::libc::kill(pid.as_raw(), sig) }, 0);
        for (i, d) in devs.iter_mut().enumerate() {
            round_trip(d, &format!("after signal {sig}, device {i}"));
        }
        assert!(proxy.child.try_wait().unwrap().is_none(), "signal {sig} ended holdfast");
    }
    let log = || std::fs::read_to_string(&proxy.stderr_log).unwrap();
    // All but SIGPIPE, which the Rust runtime ignores outright.
    eventually(10, "every signal to be logged", || log().matches("signal=").count() >= stray.len() - 1);
    let log = log();
    assert!(log.contains("signal=SIGHUP") && log.contains("reload: nothing changed"), "SIGHUP reloads, changing nothing here: {log}");
    assert!(log.contains("signal=SIGUSR1") && log.contains("signal ignored"), "{log}");
    assert!(log.contains("signal=SIGRTMIN+1"), "{log}");
    assert_eq!(metric(&proxy, "holdfast_connections_active", ""), 3);

    // SIGQUIT is a stop (at once, like SIGINT): exit 0.
    kill(pid, Signal::SIGQUIT).unwrap();
    let mut status = None;
    eventually(10, "holdfast to stop on SIGQUIT", || {
        status = proxy.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
}

#[test]
fn a_closed_stdout_does_not_stop_holdfast() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let (cfg, port, _) = fixed_config(&pki, wsm.addr);
    // `holdfast run | true`: the reader is gone before holdfast says "ready".
    let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stop = common::KillOnDrop(child.id() as i32);
    drop(child.stdout.take());
    let mut o = holdfast::device::DeviceOptions { addr: ([127, 0, 0, 1], port).into(), ..opts_for(&pki) };
    o.timeout = Duration::from_secs(5);
    let mut dev = None;
    eventually(20, "holdfast to serve with its stdout closed", || {
        assert!(child.try_wait().unwrap().is_none(), "holdfast died with a closed stdout");
        dev = Device::connect(&o).ok();
        dev.is_some()
    });
    let mut dev = dev.unwrap();
    round_trip(&mut dev, "stdout is gone");
    assert!(child.try_wait().unwrap().is_none());
    // With no device left, the graceful stop has nothing to wait for.
    drop(dev);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

fn opts_for(pki: &Pki) -> holdfast::device::DeviceOptions {
    holdfast::device::DeviceOptions {
        addr: ([127, 0, 0, 1], 0).into(),
        server_name: "localhost".into(),
        server_ca: pki.path().join("server-ca.pem"),
        cert: pki.path().join("devices/oven-1.pem"),
        key: pki.path().join("devices/oven-1.key"),
        path: "/".into(),
        subprotocols: vec![],
        version: None,
        suite: None,
        timeout: Duration::from_secs(10),
    }
}

/// A refused device is logged with what an operator searches for: its
/// subject, serial, fingerprint, issuing CA, address and dates in RFC 3339;
/// here as JSON lines (`--log-format json`), as a log shipper reads them.
#[test]
fn refusals_are_logged_with_the_device_certificate_as_json() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = common::start_proxy_env(&pki, &[wsm.addr], 1, "", "", &[("HOLDFAST_LOG_FORMAT", "json"), ("HOLDFAST_LOG", "info")]);
    for name in ["hood-expired", "fridge-blocked", "rogue-1"] {
        assert!(Device::connect(&opts(&pki, &proxy, name)).is_err(), "{name} got in");
    }
    eventually(10, "three refusals", || metric(&proxy, "holdfast_handshake_refused_total", "") == 3);
    // Counted at the refusal, logged as the connection closes: wait for the log.
    let logged = || std::fs::read_to_string(&proxy.stderr_log).unwrap().matches("handshake refused").count();
    eventually(10, "three refusal log lines", || logged() == 3);
    let lines = std::fs::read_to_string(&proxy.stderr_log).unwrap();
    let refusals: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["message"] == "handshake refused")
        .collect();
    assert_eq!(refusals.len(), 3, "{lines}");
    for (name, reason, issuer, ca) in [
        ("hood-expired", "expired", "Fleet 2024 CA", "fleet-2024.pem"),
        ("fridge-blocked", "blocked", "Fleet 2024 CA", "fleet-2024.pem"),
        ("rogue-1", "unknown_ca", "Rogue CA", "none"),
    ] {
        let der = CertificateDer::from_pem_file(pki.path().join(format!("devices/{name}.pem"))).unwrap();
        let fp = holdfast::identity::hex(&holdfast::identity::sha256(der.as_ref()));
        let v = refusals.iter().find(|v| v["sha256"] == fp.as_str()).unwrap_or_else(|| panic!("{name} ({fp}) not logged: {lines}"));
        assert_eq!(v["reason"], reason, "{v}");
        assert!(v["subject"].as_str().unwrap().contains(&format!("CN={name}")), "{v}");
        assert!(v["issuer"].as_str().unwrap().contains(issuer), "{v}");
        assert_eq!(v["ca"], ca, "the configured CA file: {v}");
        assert!(!v["serial"].as_str().unwrap().is_empty(), "{v}");
        assert!(v["device"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
        for date in ["not_before", "not_after"] {
            let d = v[date].as_str().unwrap();
            assert!(d.len() == 20 && d.ends_with('Z') && d.as_bytes()[10] == b'T', "{date} not RFC 3339: {v}");
        }
        let text = v.to_string().to_lowercase();
        assert!(!text.contains("private") && !text.contains("secret"), "{v}");
    }
    let expired = refusals.iter().find(|v| v["reason"] == "expired").unwrap();
    assert_eq!(expired["not_after"], "2021-01-01T00:00:00Z");
}
