//! The command line as an operator uses it: check-config and quickstart.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::process::Command;

use common::{Pki, free_port};

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
    // The missing CA file too, in the same report.
    assert!(err.contains("tls.client_ca[1].file") && err.contains("missing.pem") && err.contains("3 error(s)"), "{err}");

    // File problems alone.
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
    // Stopped even if an assertion fails first.
    let _stop = common::KillOnDrop(child.id() as i32);
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
    assert_eq!(commands.len(), 7, "check-config, ctl status and five devices: {lines:#?}");
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
        if cmd.contains(" ctl ") {
            assert!(String::from_utf8_lossy(&out.stdout).contains("generation 1"), "{cmd}: {}", String::from_utf8_lossy(&out.stdout));
        }
        if cmd.contains("--send whoami") {
            assert!(String::from_utf8_lossy(&out.stdout).contains("\"connection_id\""), "{cmd}: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
}

fn check_config(path: &std::path::Path) -> (Option<i32>, String, String, std::time::Duration) {
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("check-config").arg(path).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into(), t.elapsed())
}

fn write_config(pki: &Pki, name: &str, text: &str) -> std::path::PathBuf {
    let path = pki.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_hostile_cpu_list_is_refused_by_check_config_and_run_within_a_second() {
    let pki = Pki::new();
    let good = holdfast::pki::example_config("127.0.0.1:0", "127.0.0.1:9", "\"auto\"", "127.0.0.1:0");
    let bad = write_config(&pki, "cpus.toml", &good.replace("shards = \"auto\"", "shards = \"auto\"\ncpus = \"0-99999999999\""));
    let (code, _, err, took) = check_config(&bad);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("listen.cpus") && err.contains("out of range"), "{err}");
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).args(["run", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.cpus"));
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "run took {:?}", t.elapsed());
}

#[test]
fn cpus_that_are_offline_or_not_allowed_are_named() {
    let pki = Pki::new();
    let good = holdfast::pki::example_config("127.0.0.1:0", "127.0.0.1:9", "\"auto\"", "127.0.0.1:0");
    let offline = write_config(&pki, "offline.toml", &good.replace("shards = \"auto\"", "shards = \"auto\"\ncpus = \"0,4095\""));
    let (code, _, err, _) = check_config(&offline);
    assert_eq!(code, Some(2));
    assert!(err.contains("listen.cpus: CPU 4095 not online"), "{err}");
    // Under taskset -c 0, CPU 1 is online but not allowed, and "auto" picks
    // the allowed CPU only.
    if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) >= 2 {
        let pinned = write_config(&pki, "pinned.toml", &good.replace("shards = \"auto\"", "shards = \"auto\"\ncpus = \"0-1\""));
        let out = Command::new("taskset").args(["-c", "0", env!("CARGO_BIN_EXE_holdfast"), "check-config"]).arg(&pinned).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("listen.cpus: CPU 1 not allowed to this process") && err.contains("allowed: 0"), "{err}");
        let auto = write_config(&pki, "auto.toml", &good);
        let out = Command::new("taskset").args(["-c", "1", env!("CARGO_BIN_EXE_holdfast"), "check-config"]).arg(&auto).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 shard(s) on CPUs [1]"), "{text}");
    }
}

#[test]
fn a_server_certificate_out_of_its_dates_is_refused_and_one_near_its_end_warned_about() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    let write_cert = |name: &str, nb: time::OffsetDateTime, na: time::OffsetDateTime| {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        p.not_before = nb;
        p.not_after = na;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(pki.path().join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(pki.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        let good = holdfast::pki::example_config("127.0.0.1:0", "127.0.0.1:9", "1", "127.0.0.1:0");
        write_config(
            &pki,
            &format!("{name}.toml"),
            &good.replace("server-chain.pem", &format!("{name}.pem")).replace("server.key", &format!("{name}.key")),
        )
    };
    let day = time::Duration::days(1);
    for (name, nb, na, says) in
        [("expired", now - day * 400, now - day, "expired at"), ("future", now + day, now + day * 400, "not valid until")]
    {
        let cfg = write_cert(name, nb, na);
        let (code, _, err, _) = check_config(&cfg);
        assert_eq!(code, Some(2), "{name}: {err}");
        assert!(err.contains("tls.cert_chain") && err.contains(says), "{name}: {err}");
        let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).args(["run", "--config"]).arg(&cfg).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "run {name}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("tls.cert_chain"), "run {name}");
    }
    let soon = write_cert("soon", now - day, now + day * 10);
    let (code, out, err, _) = check_config(&soon);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("1 warning"), "{out}");
    assert!(err.contains("warning: tls.cert_chain") && err.contains("renew it"), "{err}");
}

#[test]
fn a_pid_file_in_a_missing_directory_is_refused() {
    let pki = Pki::new();
    let good = holdfast::pki::example_config("127.0.0.1:0", "127.0.0.1:9", "1", "127.0.0.1:0");
    let cfg = write_config(&pki, "pid.toml", &format!("{good}\n[upgrade]\npid_file = \"no/such/dir/holdfast.pid\"\n"));
    let (code, _, err, _) = check_config(&cfg);
    assert_eq!(code, Some(2));
    assert!(err.contains("upgrade.pid_file") && err.contains("does not exist"), "{err}");
}

#[test]
fn toml_errors_name_their_key_without_internal_type_names() {
    let pki = Pki::new();
    let good = holdfast::pki::example_config("127.0.0.1:0", "127.0.0.1:9", "1", "127.0.0.1:0");
    let bad = good
        .replace("idle_timeout_secs = 600", "idle_timeout_secs = -1")
        .replace("shards = 1", "shards = true")
        .replace("links_per_shard = 1", "links_per_shard = 1\nlinks_per_shardz = 2");
    let (code, _, err, _) = check_config(&write_config(&pki, "types.toml", &bad));
    assert_eq!(code, Some(2));
    for key in ["websocket.idle_timeout_secs", "listen.shards", "upstream.links_per_shardz"] {
        assert!(err.contains(&format!("error: {key}: ")), "{key}: {err}");
    }
    assert!(err.contains("3 error(s)"), "all at once: {err}");
    for internal in ["u64", "ShardsFile", "untagged", "UpstreamFile"] {
        assert!(!err.contains(internal), "{internal}: {err}");
    }
}

fn holdfast(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn version_names_the_commit_and_the_tls_libraries() {
    let (code, out, _) = holdfast(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with(&format!("holdfast {} (commit ", env!("CARGO_PKG_VERSION"))), "{out}");
    assert!(out.contains(", rustls 0.23.") && out.contains(", ring 0.17."), "{out}");
    assert!(!out.contains("commit unknown"), "built from a git checkout: {out}");
    let (_, wsm, _) = {
        let o = Command::new(common::wsm_exe()).arg("--version").output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), ())
    };
    assert!(wsm.contains("(commit "), "{wsm}");
}

#[test]
fn run_help_lists_the_signals_and_environment() {
    let (code, out, _) = holdfast(&["run", "--help"]);
    assert_eq!(code, Some(0));
    for s in [
        "SIGTERM",
        "SIGINT",
        "SIGQUIT",
        "SIGUSR2",
        "SIGHUP",
        "SIGKILL",
        "HOLDFAST_LOG",
        "HOLDFAST_LOG_FORMAT",
        "HOLDFAST_UPGRADE_EXE",
        "HOLDFAST_HOSTS",
        "NOTIFY_SOCKET",
    ] {
        assert!(out.contains(s), "{s} missing:\n{out}");
    }
}

#[test]
fn log_filters_are_checked_and_take_per_module_directives() {
    let pki = Pki::new();
    let good = holdfast::pki::example_config("127.0.0.1:0", "127.0.0.1:9", "1", "127.0.0.1:0");
    let path = pki.path().join("log.toml");
    std::fs::write(&path, good).unwrap();
    let p = path.to_str().unwrap();
    let (code, _, err) = holdfast(&["--log", "verbose", "check-config", p]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("'verbose' is not a log level") && err.contains("error, warn, info, debug, trace"), "{err}");
    let (code, _, err) = holdfast(&["--log", "warn,holdfast::tls=debug", "check-config", p]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = holdfast(&["--log-format", "yaml", "check-config", p]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("text") && err.contains("json"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).args(["check-config", p]).env("HOLDFAST_LOG", "bogus=").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad HOLDFAST_LOG is refused too");
}

#[test]
fn an_unknown_cipher_suite_is_named_with_the_known_ones() {
    let pki = Pki::new();
    let good = holdfast::pki::example_config("127.0.0.1:0", "127.0.0.1:9", "1", "127.0.0.1:0");
    let bad = good.replace(
        "key = \"server.key\"",
        "key = \"server.key\"\ncipher_suites = [\"TLS13_AES_128_GCM_SHA256\", \"TLS_RSA_WITH_RC4_128_MD5\"]",
    );
    let (code, _, err, _) = check_config(&write_config(&pki, "suites.toml", &bad));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tls.cipher_suites[1]: unknown suite 'TLS_RSA_WITH_RC4_128_MD5'; known: TLS13_"), "{err}");
}
