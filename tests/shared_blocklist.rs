//! A fleet-wide blocklist in Redis (issue 12): two holdfast nodes, each with
//! its follower (`holdfast-blocklist-sync follow`), agree within a second
//! on every change; a node whose follower was away catches up when it comes
//! back; the file's entries stay in force beside the shared ones.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use holdfast::device::Device;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn fingerprint(pki: &Pki, device: &str) -> String {
    let der = CertificateDer::from_pem_file(pki.path().join(format!("devices/{device}.pem"))).unwrap();
    holdfast::identity::hex(&holdfast::identity::sha256(der.as_ref()))
}

struct Follower(Child);

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn follow(redis: &RedisServer, proxy: &Proc, prefix: &str) -> Follower {
    let log = std::fs::File::create(proxy.stderr_log.with_extension("sync.log")).unwrap();
    let child = Command::new(blocklist_sync_exe())
        .args(["--redis", &redis.url, "--prefix", prefix, "follow", "--config"])
        .arg(proxy.config.as_ref().unwrap())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Follower(child)
}

fn fleet(redis: &RedisServer, prefix: &str, args: &[&str]) -> String {
    let out = Command::new(blocklist_sync_exe()).args(["--redis", &redis.url, "--prefix", prefix]).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shared_version(proxy: &Proc) -> Option<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["ctl", "--config"])
        .arg(proxy.config.as_ref().unwrap())
        .args(["status", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["status"]["shared_blocklist"]["version"].as_u64()
}

/// Waits for the device's close (1008) and says how long after `from` it came.
fn closed_1008(d: &mut Device, from: Instant) -> Duration {
    let code = d.recv_close().unwrap();
    assert_eq!(code, Some(1008));
    from.elapsed()
}

#[test]
fn two_nodes_agree_on_the_fleet_blocklist_and_a_node_that_was_away_catches_up() {
    let pki = Pki::new();
    let redis = start_redis(pki.path());
    let prefix = "test:blocklist";
    let wsm = start_wsm(pki.path(), "wsm-a");
    let tables = "[reload]\nclose_spread_ms = 500";
    let extra = Extra { tables, ..Extra::default() };
    let a = start_proxy_extra(&pki, &[wsm.addr], 1, &extra, &[]);
    let b = start_proxy_extra(&pki, &[wsm.addr], 1, &extra, &[]);
    fleet(&redis, prefix, &["add", &format!("serial:{}", "ffff01")]);
    let fa = follow(&redis, &a, prefix);
    let mut fb = follow(&redis, &b, prefix);
    eventually(10, "both nodes have the fleet list", || shared_version(&a) == Some(1) && shared_version(&b) == Some(1));

    // oven-1 on both nodes; blocking it fleet-wide closes both within a second (plus the spread).
    let mut on_a = Device::connect(&opts(&pki, &a, "oven-1")).unwrap();
    let mut on_b = Device::connect(&opts(&pki, &b, "oven-1")).unwrap();
    let t = Instant::now();
    let out = fleet(&redis, prefix, &["add", &fingerprint(&pki, "oven-1")]);
    assert!(out.contains("version 2"), "{out}");
    let (da, db) = (closed_1008(&mut on_a, t), closed_1008(&mut on_b, t));
    assert!(da < Duration::from_millis(1500) && db < Duration::from_millis(1500), "{da:?} {db:?}");
    assert!(Device::connect(&opts(&pki, &a, "oven-1")).is_err(), "refused at the handshake too");
    // The file's own entry (fridge-blocked) is still refused beside the shared ones.
    assert!(Device::connect(&opts(&pki, &a, "fridge-blocked")).is_err());

    // b's follower is away while two changes are made; when it is back, b catches up.
    drop(fb);
    let mut thermo_b = Device::connect(&opts(&pki, &b, "thermostat-2019")).unwrap();
    fleet(&redis, prefix, &["remove", &fingerprint(&pki, "oven-1")]);
    fleet(&redis, prefix, &["add", &fingerprint(&pki, "thermostat-2019")]);
    eventually(10, "a follows at once", || shared_version(&a) == Some(4));
    assert_eq!(shared_version(&b), Some(2), "b missed them");
    let t = Instant::now();
    fb = follow(&redis, &b, prefix);
    eventually(10, "b catches up", || shared_version(&b) == Some(4));
    closed_1008(&mut thermo_b, t);
    assert!(Device::connect(&opts(&pki, &b, "oven-1")).is_ok(), "unblocked fleet-wide");

    // A restarted holdfast (it lost the set) gets the whole list again.
    let a2 = start_proxy_extra(&pki, &[wsm.addr], 1, &extra, &[]);
    let fa2 = follow(&redis, &a2, prefix);
    eventually(10, "a new node gets the list", || shared_version(&a2) == Some(4));
    assert!(Device::connect(&opts(&pki, &a2, "thermostat-2019")).is_err());
    drop((fa, fb, fa2));
}
