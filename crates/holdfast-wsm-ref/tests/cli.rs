//! The reference WSM binary starts, says where it listens, and stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn it_listens_and_drains_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast-wsm"))
        .args(["--listen", "127.0.0.1:0", "--node", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("holdfast-wsm listening on 127.0.0.1:"), "{line}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success(), "a drain with no stream exits 0 at once");
}

#[test]
fn an_unreachable_store_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast-wsm"))
        .args(["--listen", "127.0.0.1:0", "--store", "redis://127.0.0.1:1/0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("store"), "{}", String::from_utf8_lossy(&out.stderr));
}
