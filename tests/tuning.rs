//! `tuning/holdfast-tune` on a fake /proc tree (and read-only on this
//! machine), and the tuning docs against the sysctl file.
#![allow(clippy::disallowed_methods)] // tests read the clock

use std::path::{Path, PathBuf};
use std::process::Command;

fn tool() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/holdfast-tune")
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("python3").arg(tool()).args(args).output().expect("python3");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A tree with the kernel defaults of a fresh Debian node.
fn fake_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let put = |p: &str, v: &str| {
        let f = root.path().join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, format!("{v}\n")).unwrap();
    };
    for (k, v) in [
        ("net/core/somaxconn", "4096"),
        ("net/ipv4/tcp_max_syn_backlog", "2048"),
        ("net/ipv4/tcp_syncookies", "1"),
        ("net/core/netdev_max_backlog", "1000"),
        ("fs/nr_open", "1048576"),
        ("fs/file-max", "9223372036854775807"),
        ("net/ipv4/ip_local_port_range", "32768\t60999"),
        ("net/ipv4/tcp_rmem", "4096\t131072\t6291456"),
        ("net/ipv4/tcp_wmem", "4096\t16384\t4194304"),
        ("net/ipv4/tcp_mem", "190000\t253000\t380000"),
        ("net/core/rmem_max", "212992"),
        ("net/core/wmem_max", "212992"),
        ("kernel/io_uring_disabled", "2"),
        ("kernel/osrelease", "6.1.0-18-amd64"),
    ] {
        put(&format!("proc/sys/{k}"), v);
    }
    put("proc/meminfo", "MemTotal:       67108864 kB\nMemFree:        60000000 kB");
    put(
        "proc/self/limits",
        "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files",
    );
    put("sys/devices/system/cpu/online", "0-31");
    root
}

fn sysctl(root: &Path, key: &str) -> String {
    std::fs::read_to_string(root.join("proc/sys").join(key.replace('.', "/"))).unwrap().split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn check_lists_every_difference_and_changes_nothing() {
    let root = fake_root();
    let r = root.path().to_str().unwrap();
    let before = sysctl(root.path(), "net.core.somaxconn");
    let (code, out, err) = run(&["check", "--root", r]);
    assert_eq!(code, 1, "{out}{err}");
    for line in [
        "net.core.somaxconn: 4096, recommended at least 65535",
        "net.ipv4.tcp_max_syn_backlog: 2048, recommended at least 65535",
        "net.core.netdev_max_backlog: 1000, recommended at least 16384",
        "fs.nr_open: 1048576, recommended at least 4194304",
        "net.ipv4.ip_local_port_range: 32768 60999, recommended at least 10240-65535",
        "net.ipv4.tcp_rmem: 4096 131072 6291456, recommended 4096 16384 4194304",
        // tcp_mem follows the node's 64 GiB: 4, 6 and 8 GiB in pages.
        "net.ipv4.tcp_mem: 190000 253000 380000, recommended at least 1048576 1572864 2097152",
        "net.core.rmem_max: 212992, recommended at least 4194304",
        "kernel.io_uring_disabled: 2, recommended 0",
    ] {
        assert!(out.contains(line), "missing «{line}» in:\n{out}");
    }
    // Already good enough: not listed.
    for fine in ["fs.file-max", "tcp_syncookies", "tcp_wmem", "nf_conntrack"] {
        assert!(!out.contains(fine), "{fine} listed:\n{out}");
    }
    assert_eq!(sysctl(root.path(), "net.core.somaxconn"), before, "check wrote something");
}

#[test]
fn check_knows_descriptors_conntrack_and_old_kernels() {
    let root = fake_root();
    std::fs::write(root.path().join("proc/sys/kernel/osrelease"), "5.4.0-150-generic\n").unwrap();
    std::fs::create_dir_all(root.path().join("proc/sys/net/netfilter")).unwrap();
    std::fs::write(root.path().join("proc/sys/net/netfilter/nf_conntrack_max"), "262144\n").unwrap();
    let (code, out, _) = run(&["check", "--root", root.path().to_str().unwrap(), "--devices", "2500000"]);
    assert_eq!(code, 1);
    assert!(out.contains("kernel: 5.4.0-150-generic, recommended 5.10 or newer"), "{out}");
    assert!(out.contains("open files (this shell's RLIMIT_NOFILE): 1024, recommended at least 2629096"), "{out}");
    assert!(out.contains("fs.nr_open for 2500000 devices: 1048576, recommended at least 2629096"), "{out}");
    assert!(out.contains("net.netfilter.nf_conntrack_max for 2500000 devices: 262144, recommended at least 5000000"), "{out}");
}

#[test]
fn apply_raises_what_is_low_keeps_what_is_higher_and_then_check_passes() {
    let root = fake_root();
    let r = root.path().to_str().unwrap();
    std::fs::write(root.path().join("proc/sys/net/core/netdev_max_backlog"), "50000\n").unwrap();
    let (code, out, err) = run(&["apply", "--root", r, "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would set net.core.somaxconn: 4096 -> 65535"), "{out}");
    assert_eq!(sysctl(root.path(), "net.core.somaxconn"), "4096", "a dry run wrote");

    let (code, out, err) = run(&["apply", "--root", r]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(sysctl(root.path(), "net.core.somaxconn"), "65535");
    assert_eq!(sysctl(root.path(), "net.ipv4.ip_local_port_range"), "10240 65535");
    assert_eq!(sysctl(root.path(), "net.ipv4.tcp_rmem"), "4096 16384 4194304");
    assert_eq!(sysctl(root.path(), "net.ipv4.tcp_mem"), "1048576 1572864 2097152");
    assert_eq!(sysctl(root.path(), "kernel.io_uring_disabled"), "0");
    assert_eq!(sysctl(root.path(), "net.core.netdev_max_backlog"), "50000", "a higher value was lowered");
    assert_eq!(sysctl(root.path(), "fs.file-max"), "9223372036854775807");
    let installed = std::fs::read_to_string(root.path().join("etc/sysctl.d/90-holdfast.conf")).unwrap();
    assert_eq!(installed, std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/sysctl.d/90-holdfast.conf")).unwrap());

    let (code, out, _) = run(&["check", "--root", r]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("matches every recommendation"), "{out}");
}

#[test]
fn recommend_sizes_a_node_from_the_measured_figures() {
    let (code, out, err) =
        run(&["recommend", "--devices", "2500000", "--cpus", "32", "--memory-gib", "64", "--handshakes-per-sec", "20000"]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "shards = 10",
        "cpus = \"1-10\"",
        "per_shard = 2500",
        "LimitNOFILE=2629096",
        "CPUAffinity=1-10",
        "net.ipv4.tcp_mem = 1048576 1572864 2097152",
        "3.1 KB per idle device",
        "2900 per core measured",
    ] {
        assert!(out.contains(line), "missing «{line}»:\n{out}");
    }
    assert!(!out.contains("warning"), "{out}");
    // Steady message load adds cores: 20000/(2900*0.7) + 100000/(19000*0.7) = 9.9 + 7.5.
    let (_, out, _) = run(&[
        "recommend",
        "--devices",
        "2500000",
        "--cpus",
        "32",
        "--memory-gib",
        "64",
        "--handshakes-per-sec",
        "20000",
        "--messages-per-sec",
        "100000",
    ]);
    assert!(out.contains("shards = 18") && out.contains("7.5 core(s) for 100000 device messages/s"), "{out}");
    // Too small a node is said so.
    let (code, out, _) = run(&["recommend", "--devices", "2500000", "--cpus", "2", "--memory-gib", "8"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("warning: this node has 2 CPU(s), 5 shard(s) needed") && out.contains("warning: this node has 8.0 GiB of RAM"),
        "{out}"
    );
    let (code, _, err) = run(&["recommend", "--devices", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn check_and_recommend_work_on_this_machine() {
    let (code, out, err) = run(&["check"]);
    assert!(code == 0 || code == 1, "{out}{err}");
    assert!(out.starts_with("holdfast-tune check:") && err.is_empty(), "{out}{err}");
    let (code, out, err) = run(&["recommend", "--devices", "15000"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("shards = ") && out.contains("LimitNOFILE="), "{out}");
}

/// Every setting of the sysctl file has its value and reason in the README.
#[test]
fn the_readme_gives_every_setting_with_its_reason() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning");
    let conf = std::fs::read_to_string(dir.join("sysctl.d/90-holdfast.conf")).unwrap();
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let mut n = 0;
    for line in conf.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let key = line.split('=').next().unwrap().trim().trim_start_matches('-');
        // The row whose first cell names the key (in full, or by its last
        // part beside its twin: "`net.ipv4.tcp_rmem`, `tcp_wmem`").
        let short = format!("`{}`", key.rsplit('.').next().unwrap());
        let row = readme.lines().find(|l| {
            let first = l.split('|').nth(1).unwrap_or("");
            l.starts_with('|') && (first.contains(&format!("`{key}`")) || first.contains(&short))
        });
        let row = row.unwrap_or_else(|| panic!("{key} has no row in tuning/README.md"));
        assert!(row.split('|').filter(|c| !c.trim().is_empty()).count() >= 3, "{key}: value and reason: {row}");
        n += 1;
    }
    assert!(n >= 14, "{n}");
    for topic in ["Minimum 5.10", "LimitMEMLOCK", "RPS", "XPS", "Isolating shard cores", "Sizing a node", "fs.nr_open"] {
        assert!(readme.contains(topic), "{topic}");
    }
}
