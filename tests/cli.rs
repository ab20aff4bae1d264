//! The command line as an operator uses it: check-config and quickstart.

mod common;

use std::process::Command;

use common::Pki;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn check_config_accepts_a_good_file_and_names_every_bad_key() {
    let pki = Pki::new();
    let good = holdfast::pki::example_config("127.0.0.1:8443", "127.0.0.1:9000", "2", "127.0.0.1:9100");
    let path = pki.path().join("good.toml");
    std::fs::write(&path, &good).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("check-config").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok") && text.contains("1 blocklist"), "{text}");

    let bad = good
        .replace("addr = \"127.0.0.1:8443\"", "addr = \"not-an-address\"")
        .replace("fleet-2024.pem", "missing.pem")
        .replace("max_message_bytes = 1048576", "max_message_bytes = 0");
    let path = pki.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen.addr") && err.contains("websocket.max_message_bytes"), "{err}");

    // File problems are reported once the syntax and values are right.
    let path2 = pki.path().join("bad2.toml");
    std::fs::write(&path2, good.replace("fleet-2024.pem", "missing.pem")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("check-config").arg(&path2).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.client_ca[1].file") && err.contains("missing.pem"), "{err}");
}

#[test]
fn quickstart_round_trips_as_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .current_dir(dir.path())
        .args(["quickstart", "--check-only"])
        .args(["--port", &free_port().to_string(), "--wsm-port", &free_port().to_string(), "--metrics-port", &free_port().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("echo came back: \"hello from oven-1\""), "{stdout}");
    assert!(dir.path().join("holdfast-dev/holdfast.toml").exists());
    assert!(dir.path().join("holdfast-dev/devices/thermostat-2019.pem").exists());
}

/// Every command the serving quickstart prints works exactly as printed,
/// run by a shell from another directory, with the outcome it promises.
#[test]
fn every_command_the_quickstart_prints_runs_as_printed() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .current_dir(dir.path())
        .arg("quickstart")
        .args(["--port", &free_port().to_string(), "--wsm-port", &free_port().to_string(), "--metrics-port", &free_port().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for l in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let l = l.unwrap();
        let done = l.starts_with("Stop with Ctrl-C");
        lines.push(l);
        if done {
            break;
        }
    }
    let commands: Vec<&String> = lines.iter().filter(|l| l.starts_with("  /")).collect();
    assert_eq!(commands.len(), 6, "check-config and five devices: {lines:#?}");
    for c in commands {
        let (cmd, comment) = c.split_once('#').map(|(a, b)| (a, b.trim())).unwrap_or((c, ""));
        let out = Command::new("sh").arg("-c").arg(cmd).current_dir(elsewhere.path()).output().unwrap();
        let expect_ok = !comment.contains("refused");
        assert_eq!(
            out.status.success(),
            expect_ok,
            "{cmd}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if cmd.contains("--send whoami") {
            assert!(String::from_utf8_lossy(&out.stdout).contains("\"connection_id\""), "{cmd}: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
}
