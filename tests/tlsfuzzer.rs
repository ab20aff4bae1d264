//! The TLS conformance run: tlsfuzzer's scripts for the record layer,
//! fragmentation, alerts, KeyUpdate, version negotiation, client
//! certificates, extensions, signature schemes and resumption, against the real holdfast (with the reference WSM behind
//! it) on loopback.
//!
//! tlsfuzzer (vendored under `tests/tlsfuzzer/vendor/`, its dependencies in
//! the virtualenv `target/tlsfuzzer/` that `.ci/run` makes) expects a server
//! that asks for no client certificate; `tests/tlsfuzzer/mtls.py` adds the
//! device's certificate to every full handshake. Its scripts assume an RSA
//! server certificate, so holdfast serves one made here with `openssl`.
//! Every probe must pass, except the ones listed under `allowed` with the
//! error they are allowed to end in and why (docs/conformance.md); a probe
//! that fails any other way fails this test.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// TLS 1.2 scripts: the suite holdfast offers with an RSA key, and
/// extended master secret.
const TLS12: &[&str] = &["-C", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "-M"];

/// The signature schemes holdfast's CertificateRequest lists, in its order.
const SIGALGS: &str = "ecdsa_secp384r1_sha384 ecdsa_secp256r1_sha256 ed25519 rsa_pss_rsae_sha512 rsa_pss_rsae_sha384 rsa_pss_rsae_sha256 rsa_pkcs1_sha512 rsa_pkcs1_sha384 rsa_pkcs1_sha256";

/// One script: its arguments, and the failures it may show: (a prefix of
/// the probe's name, a piece of its error).
struct Script {
    name: &'static str,
    args: &'static [&'static str],
    allowed: &'static [(&'static str, &'static str)],
}

/// rustls refuses a Finished of the wrong length with decrypt_error or
/// unexpected_message; tlsfuzzer wants decode_error.
const FINISHED_LENGTH: &[(&str, &str)] = &[
    ("empty - cipher", "received \"decrypt_error\""),
    ("padding - cipher", "received \"unexpected_message\""),
    ("padding - cipher", "received \"decrypt_error\""),
    ("truncation - cipher", "received \"decrypt_error\""),
    // A Finished longer than rustls's 64 KiB limit on a handshake message:
    // the connection ends without an alert.
    ("padding - cipher", "TLSAbruptCloseError"),
];

const SCRIPTS: &[Script] = &[
    // holdfast answers any number of KeyUpdate requests with one, before
    // its next data (RFC 8446 4.6.3).
    Script { name: "test-tls13-keyupdate.py", args: &["--coalescing"], allowed: &[] },
    Script {
        name: "test-tls13-record-layer-limits.py",
        args: &[],
        allowed: &[("max size payload (2**14) of Finished msg", "received \"decrypt_error\"")],
    },
    Script { name: "test-tls13-zero-length-data.py", args: &[], allowed: &[] },
    Script { name: "test-tls13-record-padding.py", args: &[], allowed: &[] },
    // During the handshake rustls ends the connection over a record of
    // content type 0 without an alert.
    Script {
        name: "test-tls13-zero-content-type.py",
        args: &[],
        allowed: &[
            ("zero content type during handshake", "TLSAbruptCloseError"),
            ("zero content type with padding during handshake", "TLSAbruptCloseError"),
        ],
    },
    Script { name: "test-tls13-unencrypted-alert.py", args: &[], allowed: &[] },
    // A zero-length alert record: decode_error (its length is wrong, RFC 8446
    // 6.2), from rustls during the handshake and from holdfast's record layer
    // after it; tlsfuzzer wants unexpected_message.
    Script { name: "test-tls13-empty-alert.py", args: &[], allowed: &[("empty alert with", "received \"decode_error\"")] },
    // "After NewSessionTicket" waits for a ticket its ClientHello gives no
    // psk_key_exchange_modes for: none is due (RFC 8446 4.2.9).
    Script { name: "test-tls13-connection-abort.py", args: &["-e", "After NewSessionTicket"], allowed: &[] },
    // A fallback to TLS 1.1 is refused with protocol_version (RFC 8996).
    Script {
        name: "test-tls13-version-negotiation.py",
        args: TLS12,
        allowed: &[("fallback from TLS 1.8 to 1.1", "Alert(fatal, protocol_version)")],
    },
    Script { name: "test-tls13-legacy-version.py", args: &[], allowed: &[] },
    Script { name: "test-tls13-finished.py", args: &["-n", "0"], allowed: FINISHED_LENGTH },
    Script { name: "test-tls13-ccs.py", args: &[], allowed: &[] },
    // rustls drops every change_cipher_spec record during the handshake
    // ("MUST simply drop it", RFC 8446 5); tlsfuzzer wants an alert after
    // the second, and times out waiting.
    Script {
        name: "test-tls13-multiple-ccs-messages.py",
        args: &[],
        allowed: &[
            ("CH and multiple CCS Messages in one TCP packet", "Timeout"),
            ("multiple CCS Messages in one TCP packet", "Timeout"),
            ("second CCS before client finished", "Timeout"),
        ],
    },
    // rustls answers a ClientHello with supported_groups but no key_share
    // with handshake_failure; RFC 8446 9.2 says missing_extension.
    Script {
        name: "test-tls13-keyshare-omitted.py",
        args: &[],
        allowed: &[("key_share extension omitted", "received \"handshake_failure\"")],
    },
    // Client certificates: every CertificateVerify signature the device's
    // P-256 key can make is taken, every other refused. A P-256 key signing
    // as ecdsa_secp384r1_sha384 gets decrypt_error (the signature does not
    // verify, RFC 8446 4.4.3) where tlsfuzzer wants illegal_parameter.
    // "check sigalgs in cert request" finishes with no certificate, which
    // holdfast refuses (certificate_required) by design.
    Script {
        name: "test-tls13-ecdsa-in-certificate-verify.py",
        args: &["-s", SIGALGS, "-e", "check sigalgs in cert request"],
        allowed: &[("check ecdsa_secp384r1_sha384 signature is refused", "received \"decrypt_error\"")],
    },
    Script { name: "test-tls13-hrr.py", args: &[], allowed: &[] },
    Script { name: "test-tls13-invalid-ciphers.py", args: &[], allowed: &[] },
    // A ClientHello of 64 KiB and more: rustls's limit on a handshake
    // message (decode_error); devices send a few hundred bytes.
    Script {
        name: "test-record-layer-fragmentation.py",
        args: TLS12,
        allowed: &[("maximum size: max fragment - 65381B extension", "Alert(fatal, decode_error)")],
    },
    Script { name: "test-zero-length-data.py", args: TLS12, allowed: &[] },
    Script { name: "test-invalid-content-type.py", args: TLS12, allowed: &[] },
    Script { name: "test-connection-abort.py", args: TLS12, allowed: &[] },
    Script { name: "test-version-numbers.py", args: TLS12, allowed: &[] },
    Script { name: "test-tls13-conversation.py", args: &[], allowed: &[] },
    Script { name: "test-tls13-count-tickets.py", args: &[], allowed: &[] },
    Script { name: "test-tls13-nociphers.py", args: &[], allowed: &[] },
    Script { name: "test-tls13-no-unknown-groups.py", args: &[], allowed: &[] },
    // Every probe, not a random 20 ("-n 0"). The script's "unassigned" ids
    // include assigned extensions whose empty or random payload is
    // malformed, which rustls parses and refuses with decode_error
    // (rightly): ec_point_formats 11, encrypt_then_mac 22,
    // extended_master_secret 23, compress_certificate 27, ticket_request
    // 58, ech_outer_extensions 0xfd00, encrypted_client_hello 0xfe0d.
    Script {
        name: "test-tls13-large-number-of-extensions.py",
        args: &["-n", "0", "--exc", "11", "--exc", "22", "--exc", "23", "--exc", "27", "--exc", "58", "--exc", "64768", "--exc", "65037"],
        allowed: &[],
    },
    // Every probe ("-n 0"). 32,715 signature schemes make a ClientHello
    // over rustls's 64 KiB limit on a handshake message (decode_error), as
    // in record-layer-fragmentation above.
    Script {
        name: "test-tls13-signature-algorithms.py",
        args: &["-n", "0"],
        allowed: &[
            ("tolerance 32715 methods", "Alert(fatal, decode_error)"),
            ("duplicated 32715 non-rsa schemes", "Alert(fatal, decode_error)"),
            ("32715 invalid schemes", "Alert(fatal, decode_error)"),
        ],
    },
    // rustls resumes only with (EC)DHE (psk_dhe_ke, RFC 8446 4.2.9 lets the
    // server choose): a client offering psk_ke alone gets no ticket.
    Script {
        name: "test-tls13-session-resumption.py",
        args: &["-d", "--tls1.2-cipher", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "-M"],
        allowed: &[("session resumption - PSK_ONLY", "Unexpected message from peer: ApplicationData")],
    },
    // A plaintext Finished after the handshake keys are in use fails
    // deprotection: rustls says bad_record_mac (RFC 8446 5.2), tlsfuzzer
    // wants unexpected_message.
    Script {
        name: "test-tls13-finished-plaintext.py",
        args: &[],
        allowed: &[("Unencrypted Finished message", "received \"bad_record_mac\"")],
    },
];

/// What one probe of a run came to.
#[derive(Debug, PartialEq)]
struct Failure {
    probe: String,
    error: String,
}

/// The failed probes of a script's output, each with the first error line
/// printed under it; and the TOTAL it reports.
fn failures(out: &str) -> (Vec<Failure>, Option<u64>) {
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut current: Option<String> = None;
    let mut failed = Vec::new();
    let mut in_failed = false;
    let mut total = None;
    for line in out.lines() {
        if in_failed {
            match line.strip_prefix('\t') {
                Some(n) => failed.push(n.trim_matches('\'').to_string()),
                None => in_failed = false,
            }
            continue;
        }
        if let Some(n) = line.strip_suffix(" ...") {
            current = Some(n.trim_matches('"').split("\" repeat").next().unwrap_or(n).to_string());
        } else if line == "FAILED:" {
            in_failed = true;
        } else if let Some(t) = line.strip_prefix("TOTAL: ") {
            total = t.trim().parse().ok();
        } else if (line.starts_with("AssertionError") || line.contains("Error:") || line.contains("Error()"))
            && let Some(c) = current.take()
        {
            errors.push((c, line.to_string()));
        }
    }
    let list = failed
        .into_iter()
        .map(|probe| {
            let error = errors.iter().rev().find(|(p, _)| *p == probe).map(|(_, e)| e.clone()).unwrap_or_default();
            Failure { probe, error }
        })
        .collect();
    (list, total)
}

fn allowed(s: &Script, f: &Failure) -> bool {
    s.allowed.iter().any(|(prefix, err)| f.probe.starts_with(prefix) && f.error.contains(err))
}

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tlsfuzzer/bin/python");
    assert!(
        p.exists(),
        "{} is missing: python3 -m venv target/tlsfuzzer && target/tlsfuzzer/bin/pip install tlslite-ng==0.9.0b2 ecdsa (.ci/run does this)",
        p.display()
    );
    p
}

/// An RSA server certificate for localhost in place of the dev PKI's ECDSA one.
fn rsa_server_cert(pki: &Pki) {
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout"])
        .arg(pki.path().join("server.key"))
        .arg("-out")
        .arg(pki.path().join("server-chain.pem"))
        .output()
        .expect("openssl (Debian package openssl; .ci/run installs it)");
    assert!(st.status.success(), "openssl: {}", String::from_utf8_lossy(&st.stderr));
}

fn run(py: &Path, pki: &Pki, port: u16, s: &Script) -> (String, Vec<Failure>, Option<u64>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tlsfuzzer");
    let device = |ext: &str| pki.path().join(format!("devices/oven-1.{ext}"));
    let mut c = Command::new(py);
    c.env("PYTHONPATH", root.join("vendor")).arg(root.join("mtls.py"));
    c.arg("--key").arg(device("key")).arg("--cert").arg(device("pem")).arg(s.name);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(s.args);
    if s.name == "test-tls13-ecdsa-in-certificate-verify.py" {
        c.arg("-k").arg(device("key")).arg("-c").arg(device("pem"));
    }
    let out = c.output().expect("tlsfuzzer");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let (f, total) = failures(&text);
    (text, f, total)
}

#[test]
fn tlsfuzzer_scripts_pass_against_holdfast_with_client_certificates() {
    let py = python();
    let pki = Pki::new();
    rsa_server_cert(&pki);
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    let port = proxy.addr.port();
    // Two at a time (two cores): the even-numbered scripts and the odd.
    let results: Vec<_> = std::thread::scope(|sc| {
        let halves: Vec<_> = (0..2)
            .map(|k| {
                let (py, pki) = (&py, &pki);
                sc.spawn(move || SCRIPTS.iter().skip(k).step_by(2).map(|s| (s, run(py, pki, port, s))).collect::<Vec<_>>())
            })
            .collect();
        halves.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut problems = Vec::new();
    let mut table = String::new();
    for (s, (text, fails, total)) in &results {
        let Some(total) = total else {
            problems.push(format!("{}: no summary; output:\n{text}", s.name));
            continue;
        };
        let (ok, bad): (Vec<&Failure>, Vec<&Failure>) = fails.iter().partition(|f| allowed(s, f));
        table.push_str(&format!("{}: {} probes, {} allowed failures, {} others\n", s.name, total, ok.len(), bad.len()));
        for f in bad {
            problems.push(format!("{}: '{}' failed: {}", s.name, f.probe, f.error));
        }
    }
    eprintln!("{table}");
    assert!(problems.is_empty(), "{}\n\n{table}", problems.join("\n"));
    drop((proxy, wsm));
}

#[test]
fn failed_probes_are_read_with_their_errors() {
    let out = "sanity ...\nOK\n\n\"After X\" repeat 3...\nnot this\nempty alert with 2 bytes ...\nError encountered\nTraceback\nAssertionError: Expected alert description \"unexpected_message\" does not match received \"decode_error\"\n\nTOTAL: 10\nFAILED:\n\t'empty alert with 2 bytes'\n";
    let (f, total) = failures(out);
    assert_eq!(total, Some(10));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].probe, "empty alert with 2 bytes");
    assert!(f[0].error.contains("received \"decode_error\""));
    let s = &SCRIPTS.iter().find(|s| s.name == "test-tls13-empty-alert.py").unwrap();
    assert!(allowed(s, &f[0]));
    let other = Failure { probe: "empty alert with 2 bytes".into(), error: "Timeout".into() };
    assert!(!allowed(s, &other), "the same probe failing another way is not allowed");
}
