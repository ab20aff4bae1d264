//! Live upgrade by SIGUSR2, stage one: the listening sockets move to a new
//! process with no refused connection; the old process keeps the
//! connections it holds and exits when they are gone; a failed upgrade
//! leaves the old process serving.

mod common;

use std::time::{Duration, Instant};

use common::*;
use holdfast::device::Device;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Kills a process we did not spawn directly (the new holdfast) at the end.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(200));
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

fn echo(d: &mut Device, m: &str) {
    d.send_text(m).unwrap();
    assert_eq!(d.recv_text().unwrap(), m);
}

/// Waits for a "holdfast ready" line from a process other than `old`.
fn new_ready_pid(p: &Proc, old: u32, secs: u64) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(l) = p.lines.recv_timeout(Duration::from_millis(100))
            && let Some(pid) =
                l.strip_prefix("holdfast ready on ").and_then(|r| r.rsplit("pid=").next()).and_then(|x| x.trim().parse::<i32>().ok())
            && pid as u32 != old
        {
            return pid;
        }
    }
    panic!("no ready line from a new process; log: {}", std::fs::read_to_string(&p.stderr_log).unwrap_or_default());
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

#[test]
fn sigusr2_hands_the_listeners_to_a_new_process() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let mut proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    let old = proxy.child.id();
    let mut held = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut held, "before");

    // Devices keep connecting while the upgrade runs: none may be refused.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (o, s2) = (opts(&pki, &proxy, "oven-1"), stop.clone());
    let hammer = std::thread::spawn(move || {
        let mut n = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let mut d = Device::connect(&o).expect("a connection during the upgrade failed");
            d.send_text("during").unwrap();
            assert_eq!(d.recv_text().unwrap(), "during");
            n += 1;
        }
        n
    });
    std::thread::sleep(Duration::from_millis(200));
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let _guard = KillOnDrop(new);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let connected = hammer.join().expect("no connection failed during the upgrade");
    assert!(connected > 0);

    // The held device still works, served by the old process, which stays up for it.
    echo(&mut held, "after");
    assert!(alive(old as i32));
    let mut fresh = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut fresh, "new process");
    held.close(1000).unwrap();
    drop(held);
    // With its last connection gone the old process exits 0.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = proxy.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "old process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // The new process serves on its own, and can be upgraded again.
    echo(&mut fresh, "still here");
    let mut later = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut later, "later");
    kill(Pid::from_raw(new), Signal::SIGUSR2).unwrap();
    let newer = new_ready_pid(&proxy, new as u32, 20);
    let _guard2 = KillOnDrop(newer);
    let mut last = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut last, "second upgrade");
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let old = proxy.child.id();
    let config = proxy.config.clone().unwrap();
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("shards = 1", "shards = 0")).unwrap();
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    eventually(10, "the failure to be logged", || {
        std::fs::read_to_string(&proxy.stderr_log).unwrap_or_default().contains("upgrade failed")
    });
    let log = std::fs::read_to_string(&proxy.stderr_log).unwrap();
    assert!(log.contains("listen.shards"), "the reason is reported: {log}");
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut d, "old still serves");
    // Fixed config: the next attempt works.
    std::fs::write(&config, good).unwrap();
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let _guard = KillOnDrop(new);
    let mut e = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut e, "after the second attempt");
    echo(&mut d, "held by the old one");
}

#[test]
fn if_the_new_process_dies_the_old_one_accepts_again() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    let old = proxy.child.id();
    let mut held = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    eventually(10, "the old process to stop accepting", || {
        std::fs::read_to_string(&proxy.stderr_log).unwrap_or_default().contains("stopped accepting")
    });
    kill(Pid::from_raw(new), Signal::SIGKILL).unwrap();
    eventually(10, "the old process to accept again", || {
        std::fs::read_to_string(&proxy.stderr_log).unwrap_or_default().contains("accepting again")
    });
    for i in 0..8 {
        let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
        echo(&mut d, &format!("back to the old process {i}"));
    }
    echo(&mut held, "held throughout");
    assert!(alive(old as i32));
}
