//! holdfast's record layer against an independent TLS stack: OpenSSL, driven
//! through Python's ssl module, for every suite and both protocol versions.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::process::Command;

use common::*;

fn openssl_device(pki: &Pki, proxy: &Proc, version: &str, cipher: Option<&str>) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/openssl_device.py");
    let p = |f: &str| pki.path().join(f).display().to_string();
    let mut cmd = Command::new("python3");
    cmd.arg(script).args([
        "127.0.0.1",
        &proxy.addr.port().to_string(),
        &p("server-ca.pem"),
        &p("devices/oven-1.pem"),
        &p("devices/oven-1.key"),
        version,
    ]);
    if let Some(c) = cipher {
        cmd.arg(c);
    }
    let out = cmd.output().expect("python3 runs");
    assert!(out.status.success(), "openssl device failed ({version} {cipher:?}): {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(v: &serde_json::Value, version: &str, cipher: &str) {
    assert_eq!(v["version"], version, "{v}");
    assert_eq!(v["cipher"], cipher, "{v}");
    assert_eq!(v["text"], v["sent_text"], "{v}");
    assert_eq!(v["binary_ok"], true, "{v}");
    assert_eq!(v["close_code"], 1000, "{v}");
}

#[test]
fn openssl_tls13_every_suite() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    // OpenSSL picks its favourite TLS 1.3 suite; make holdfast offer one at a time.
    for (rustls_name, openssl_name) in [
        ("TLS13_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"),
        ("TLS13_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"),
        ("TLS13_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256"),
    ] {
        let proxy = start_proxy(&pki, &[wsm.addr], 1, &format!("cipher_suites = [\"{rustls_name}\"]\nversions = [\"1.3\"]"), "");
        check(&openssl_device(&pki, &proxy, "1.3", None), "TLSv1.3", openssl_name);
    }
}

#[test]
fn openssl_tls12_every_suite() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    for cipher in ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"] {
        check(&openssl_device(&pki, &proxy, "1.2", Some(cipher)), "TLSv1.2", cipher);
    }
}
