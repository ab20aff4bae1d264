//! Runs one scenario against each proxy with the same client and the same
//! core budget, and writes one JSON result per proxy.
//!
//! On this 2-core machine the proxy (all its threads or workers) is pinned to
//! `--proxy-cpus` and everything else (swarm processes, the echo upstream or
//! reference WSM) to `--client-cpus`.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::peers::{self, Proxy};
use crate::report::{SwarmReport, SwarmTotal};
pub use crate::result::{Machine, RunArgs, ScenarioResult, metric_sum};
use crate::swarm::wall_us;

pub fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let mut lim: libc::rlimit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    Machine { nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), kernel, cpu, fd_limit: lim.rlim_cur }
}

pub fn parse_cpus(s: &str) -> Vec<usize> {
    holdfast::cpus::parse_list(s).unwrap_or_else(|_| vec![0])
}

/// A command pinned to some CPUs.
pub(crate) fn pinned(program: &Path, cpus: &[usize]) -> Command {
    let mut c = Command::new(program);
    let cpus = cpus.to_vec();
    // SAFETY: sched_setaffinity on the child between fork and exec touches
    // only the child; it allocates nothing.
    unsafe {
        c.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in &cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
    c
}

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: sending SIGTERM to our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn lines_of(child: &mut Child, tag: usize, tx: std::sync::mpsc::Sender<(usize, String)>) {
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((tag, l)).is_err() {
                    return;
                }
            }
        });
    }
}

pub(crate) fn first_line_with(rx: &Receiver<(usize, String)>, prefix: &str, secs: u64) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, l)) if l.starts_with(prefix) => return Ok(l),
            Ok(_) => {}
            Err(_) => return Err(format!("no '{prefix}' line in {secs} s")),
        }
    }
}

/// holdfast's Prometheus text.
pub(crate) fn fetch_metrics(port: u16) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// Tells every swarm process when the event (upgrade, failover) was, so it
/// can report each device's longest round trip overlapping it.
fn tell_window(swarm: &mut [(Proc, ChildStdin)], start_us: u64, end_us: u64) {
    for (_, s) in swarm.iter_mut() {
        let _ = writeln!(s, "WINDOW {start_us} {end_us}");
        let _ = s.flush();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(18443)
}

/// The pid and all descendants (nginx workers).
pub(crate) fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|x| x.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

pub fn cpu_secs(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            // After the comm field: state is [0], utime [11], stime [12].
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick)
        })
        .sum()
}

/// Kernel TCP memory in bytes, from /proc/net/sockstat ("TCP: ... mem N" in pages).
pub fn sock_mem_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    parse_sockstat_mem(&s) * 4096
}

pub fn parse_sockstat_mem(s: &str) -> u64 {
    s.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter().position(|x| *x == "mem").and_then(|i| w.get(i + 1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Installs a peer from Debian's packages if its binary is missing.
pub fn ensure_installed(p: Proxy) -> Result<PathBuf, String> {
    let bin = PathBuf::from(format!("/usr/sbin/{}", p.name()));
    if bin.exists() {
        return Ok(bin);
    }
    let Some(pkg) = p.package() else {
        return Err("no package".into());
    };
    eprintln!("installing {pkg} from Debian's packages");
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", pkg])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| e.to_string())?;
    // The package starts a system service on its default port; stop it.
    let _ = Command::new("sh").arg("-c").arg(format!("service {} stop >/dev/null 2>&1; pkill -x {} || true", p.name(), p.name())).status();
    if st.success() && bin.exists() { Ok(bin) } else { Err(format!("could not install {pkg}")) }
}

/// Distinct device certificates the swarm presents (in turn).
const FLEET: usize = 256;

/// Writes the PEM bundles peers want next to the dev PKI.
pub(crate) fn prepare_pki(dir: &Path) -> Result<(), String> {
    // Devices present distinct certificates, as a real fleet does.
    holdfast::pki::generate_with_fleet(dir, FLEET)?;
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).map_err(|e| e.to_string());
    std::fs::write(dir.join("device-cas.pem"), read("fleet-2024.pem")? + &read("fleet-2019.pem")?).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("haproxy-server.pem"), read("server-chain.pem")? + &read("server.key")?).map_err(|e| e.to_string())?;
    Ok(())
}

pub(crate) fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.parent().map(|d| d.join(name)).unwrap_or_else(|| PathBuf::from(name))
}

pub(crate) fn wait_port(port: u16, secs: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on port {port}"))
}

pub fn run(args: RunArgs) -> Result<(), String> {
    let work = std::env::temp_dir().join(format!("hf-bench-{}", std::process::id()));
    let pki = work.join("pki");
    prepare_pki(&pki)?;
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    for name in &args.proxies {
        let proxy = Proxy::parse(name).ok_or(format!("unknown proxy {name}"))?;
        if matches!(args.scenario.as_str(), "upgrade" | "failover" | "reload") && proxy != Proxy::Holdfast {
            eprintln!("{name}: no live upgrade or WSM failover of established connections; skipped");
            continue;
        }
        let r = run_one(proxy, &args, &pki, &work.join(name))?;
        let label = if args.label.is_empty() { String::new() } else { format!("-{}", args.label) };
        let path = args.out.join(format!("{}{label}-{}.json", args.scenario, proxy.name()));
        if proxy == Proxy::Holdfast && args.proxy_log != "warn" {
            let _ = std::fs::copy(work.join(name).join("proxy.log"), args.out.join(format!("{}{label}-holdfast.log", args.scenario)));
        }
        std::fs::write(&path, serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        eprintln!("{}", crate::render::one_line(&r));
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Starts `procs` swarm processes sharing `conns` devices against `target`,
/// each pinned to `cpus` with two 127.0.x.y source addresses of its own and
/// the dev PKI's fleet; `args` adds the mode and its settings. Their stdout
/// lines go to `tx`, tagged with the process's index.
pub(crate) fn spawn_swarm(
    pki: &Path,
    target: &str,
    (conns, procs): (usize, usize),
    cpus: &[usize],
    tx: &std::sync::mpsc::Sender<(usize, String)>,
    args: impl Fn(&mut Command),
) -> Result<Vec<(Proc, ChildStdin)>, String> {
    let per = conns.div_ceil(procs.max(1));
    let mut swarm = Vec::new();
    for i in 0..procs.max(1) {
        let n = per.min(conns.saturating_sub(i * per));
        if n == 0 {
            break;
        }
        let srcs = format!("127.0.{}.{},127.0.{}.{}", 1 + i / 100, 2 + 2 * (i % 100), 1 + i / 100, 3 + 2 * (i % 100));
        let mut c = pinned(&std::env::current_exe().map_err(|e| e.to_string())?, cpus);
        c.arg("swarm").args(["--target", target, "--conns", &n.to_string(), "--src", &srcs]);
        c.arg("--ca").arg(pki.join("server-ca.pem"));
        c.arg("--cert").arg(pki.join("devices/oven-1.pem")).arg("--key").arg(pki.join("devices/oven-1.key"));
        c.arg("--fleet").arg(pki.join("devices/fleet"));
        args(&mut c);
        let mut ch = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().map_err(|e| format!("swarm: {e}"))?;
        lines_of(&mut ch, i, tx.clone());
        let stdin = ch.stdin.take().ok_or("swarm stdin")?;
        swarm.push((Proc(ch), stdin));
    }
    Ok(swarm)
}

fn run_one(proxy: Proxy, a: &RunArgs, pki: &Path, work: &Path) -> Result<ScenarioResult, String> {
    std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
    let m = machine();
    let (pcpus, ccpus) = (parse_cpus(&a.proxy_cpus), parse_cpus(&a.client_cpus));
    let (tx, rx) = channel();
    // Upstream: the reference WSM behind holdfast, a plain echo behind peers.
    let mut up = match proxy {
        Proxy::Holdfast => {
            let mut c = pinned(&sibling("holdfast-wsm"), &ccpus);
            c.args(["--listen", "127.0.0.1:0", "--log", "warn", "--open-log"]).arg(work.join("opens.log"));
            c
        }
        _ => {
            let mut c = pinned(&std::env::current_exe().map_err(|e| e.to_string())?, &ccpus);
            c.args(["echo", "--listen", "127.0.0.1:0", "--open-log"]).arg(work.join("opens.log"));
            c
        }
    };
    let mut up = up.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().map_err(|e| format!("upstream: {e}"))?;
    lines_of(&mut up, usize::MAX, tx.clone());
    let up = Proc(up);
    let line = first_line_with(&rx, "", 10)?;
    let up_addr: SocketAddr = line.rsplit(' ').next().and_then(|x| x.parse().ok()).ok_or(format!("upstream said {line}"))?;
    // Failover: a second WSM instance, started once every device is on the
    // first, so that all of the first one's streams move when it dies.
    let mut wsms = vec![up_addr.to_string()];
    let second_addr = format!("127.0.0.1:{}", free_port());
    if a.scenario == "failover" {
        wsms.push(second_addr.clone());
    }
    let mut second = None;
    let port = free_port();
    let maxconn = peers::peer_maxconn(m.fd_limit);
    let threads = pcpus.len();
    let mut metrics_port = None;
    let limits = peers::Limits {
        handshakes_per_sec: a.handshakes_per_sec,
        opens_per_sec: a.opens_per_sec,
        drain_over: (a.scenario == "drain").then_some(a.drain_over),
    };
    let mut cmd = match proxy {
        Proxy::Holdfast => {
            let mp = free_port();
            metrics_port = Some(mp);
            let cfg = work.join("holdfast.toml");
            let cpus = a.proxy_cpus.clone();
            std::fs::write(
                &cfg,
                peers::holdfast_config(pki, port, &wsms, threads, &cpus, mp, (a.moving_per_shard, a.resume_per_sec), &limits),
            )
            .map_err(|e| e.to_string())?;
            let mut c = pinned(&sibling("holdfast"), &pcpus);
            c.args(["run", "--log", &a.proxy_log, "--config"]).arg(&cfg);
            c
        }
        Proxy::Haproxy => {
            let bin = ensure_installed(proxy)?;
            let cfg = work.join("haproxy.cfg");
            std::fs::write(&cfg, peers::haproxy_config(pki, port, &up_addr.to_string(), threads, maxconn, &limits))
                .map_err(|e| e.to_string())?;
            let mut c = pinned(&bin, &pcpus);
            c.args(["-db", "-f"]).arg(&cfg);
            c
        }
        Proxy::Nginx => {
            let bin = ensure_installed(proxy)?;
            let cfg = work.join("nginx.conf");
            std::fs::write(&cfg, peers::nginx_config(pki, work, port, &up_addr.to_string(), threads, maxconn, &limits))
                .map_err(|e| e.to_string())?;
            let mut c = pinned(&bin, &pcpus);
            c.arg("-p").arg(work).arg("-c").arg(&cfg);
            c
        }
    };
    let log = std::fs::File::create(work.join("proxy.log")).map_err(|e| e.to_string())?;
    let child = cmd.stdout(Stdio::null()).stderr(log).spawn().map_err(|e| format!("{}: {e}", proxy.name()))?;
    let proxy_pid = child.id();
    let mut proxy_proc = Proc(child);
    wait_port(port, 15)
        .map_err(|e| format!("{}: {e}; log: {}", proxy.name(), std::fs::read_to_string(work.join("proxy.log")).unwrap_or_default()))?;
    std::thread::sleep(Duration::from_millis(500));
    let pids = || family(proxy_pid);
    let rss_base = rss_kib(&pids());
    let sock_base = sock_mem_bytes();

    // The swarm: `procs` processes, each with two source addresses of its own.
    let swarm_mode = if a.scenario == "failover" || a.scenario == "reload" { "upgrade" } else { a.scenario.as_str() };
    let target = format!("127.0.0.1:{port}");
    let mut swarm = spawn_swarm(pki, &target, (a.conns, a.procs), &ccpus, &tx, |c| {
        c.args(["--mode", swarm_mode, "--rate", &(a.rate / a.procs.max(1) as u32).to_string(), "--tls", &a.tls]).args([
            "--msg-size",
            &a.msg_size.to_string(),
            "--msg-rate",
            &a.msg_rate.to_string(),
            "--duration",
            &a.duration.to_string(),
        ]);
        if a.resume {
            c.arg("--resume");
        }
    })?;
    let nproc = swarm.len();
    let connect_timeout = 60 + (a.conns as u64 / a.rate.max(1) as u64);
    let go = |swarm: &mut Vec<(Proc, ChildStdin)>| {
        for (_, s) in swarm.iter_mut() {
            let _ = writeln!(s, "go");
            let _ = s.flush();
        }
    };
    let (mut half_devices, mut rss_half) = (0u64, 0u64);
    // Idle means quiet: past holdfast's 2 s key cooling (after which a quiet
    // tunnel also gives up its task), so every connection is measured idle.
    let settle = Duration::from_millis(if a.scenario == "idle" { 3000 } else { 1000 });
    if a.scenario == "idle" {
        for _ in 0..nproc {
            let l = first_line_with(&rx, "HALF", connect_timeout)?;
            half_devices += l.split_whitespace().nth(1).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        }
        std::thread::sleep(settle);
        rss_half = rss_kib(&pids());
        go(&mut swarm);
    }
    let mut ready = 0u64;
    for _ in 0..nproc {
        let l = first_line_with(&rx, "READY", connect_timeout)?;
        ready += l.split_whitespace().nth(1).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    }
    std::thread::sleep(settle);
    let rss_loaded = rss_kib(&pids());
    let sock_loaded = sock_mem_bytes();
    let holdfast_metrics = metrics_port.and_then(fetch_metrics);
    let cpu0 = cpu_secs(&pids());
    let mut peak = rss_loaded;
    go(&mut swarm);
    let mut storm_secs = None;
    let mut upgrade_secs = None;
    let mut upgrade_cpu_secs = None;
    let mut old_cpu = 0.0f64;
    let (mut failover_secs, mut failover_streams) = (None, None);
    let mut up = Some(up);
    if a.scenario == "failover" {
        let mp = metrics_port.ok_or("failover needs holdfast's metrics")?;
        let count = |name: &str| fetch_metrics(mp).map(|t| metric_sum(&t, name)).unwrap_or(0);
        let mut c = pinned(&sibling("holdfast-wsm"), &ccpus);
        c.args(["--listen", &second_addr, "--log", "warn", "--node", "wsm-b"]);
        second = Some(Proc(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| format!("second WSM: {e}"))?));
        let deadline = Instant::now() + Duration::from_secs(20);
        while count("holdfast_links_up") < 2 * threads as u64 {
            if Instant::now() > deadline {
                return Err("failover: the second WSM's links did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs_f64(a.duration / 3.0));
        let (before_detached, before_resumed) = (count("holdfast_streams_detached_total"), count("holdfast_streams_resumed_total"));
        let t = Instant::now();
        let killed_at = wall_us();
        // SIGKILL: the first WSM dies without a word.
        if let Some(mut p) = up.take() {
            let _ = p.0.kill();
            let _ = p.0.wait();
        }
        let deadline = t + Duration::from_secs(120);
        loop {
            let detached = count("holdfast_streams_detached_total") - before_detached;
            let resumed = count("holdfast_streams_resumed_total") - before_resumed;
            let failed = count("holdfast_streams_resume_failed_total");
            if detached > 0 && resumed + failed >= detached {
                failover_secs = Some(t.elapsed().as_secs_f64());
                failover_streams = Some(resumed);
                tell_window(&mut swarm, killed_at, wall_us());
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("failover: {resumed} of {detached} streams resumed in 120 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if a.scenario == "upgrade" {
        std::thread::sleep(Duration::from_secs_f64(a.duration / 3.0));
        if a.no_signal {
            // The baseline's window: the same moment, one second long.
            let start = wall_us();
            std::thread::sleep(Duration::from_secs(1));
            tell_window(&mut swarm, start, wall_us());
        } else {
            let t = Instant::now();
            let start = wall_us();
            let old_at_signal = cpu_secs(&[proxy_pid]);
            let pid_file = pki.join("holdfast.pid");
            let successor =
                || std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()).filter(|&p| p != proxy_pid);
            // SAFETY: signalling our own child.
            unsafe { libc::kill(proxy_pid as i32, libc::SIGUSR2) };
            let deadline = t + Duration::from_secs(120);
            let mut new_cpu = 0.0f64;
            while proxy_proc.0.try_wait().map(|s| s.is_none()).unwrap_or(false) && Instant::now() < deadline {
                // The old process's CPU time, read until it is gone (to within 5 ms).
                old_cpu = old_cpu.max(cpu_secs(&[proxy_pid]));
                if let Some(n) = successor() {
                    new_cpu = new_cpu.max(cpu_secs(&[n]));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            upgrade_secs = Some(t.elapsed().as_secs_f64());
            if let Some(n) = successor() {
                new_cpu = new_cpu.max(cpu_secs(&[n]));
            }
            upgrade_cpu_secs = Some(old_cpu - old_at_signal + new_cpu);
            tell_window(&mut swarm, start, wall_us());
        }
    }
    let (mut reload_apply_secs, mut reload_recheck_secs, mut reload_cpu_secs) = (None, None, None);
    if a.scenario == "reload" {
        let mp = metrics_port.ok_or("reload needs holdfast's metrics")?;
        std::thread::sleep(Duration::from_secs_f64(a.duration / 3.0));
        let text = || fetch_metrics(mp).unwrap_or_default();
        let before = text();
        let gen0 = crate::result::metric_single(&before, "holdfast_config_generation").unwrap_or(0.0);
        let checked0 = metric_sum(&before, "holdfast_identities_rechecked_total");
        write_reload_change(work, a.reload_blocklist)?;
        let t = Instant::now();
        let start = wall_us();
        let cpu_before = cpu_secs(&[proxy_pid]);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(proxy_pid as i32, libc::SIGHUP) };
        let deadline = t + Duration::from_secs(60);
        loop {
            let m = text();
            if reload_apply_secs.is_none() && crate::result::metric_single(&m, "holdfast_config_generation").unwrap_or(0.0) > gen0 {
                reload_apply_secs = Some(t.elapsed().as_secs_f64());
            }
            if reload_apply_secs.is_some() && metric_sum(&m, "holdfast_identities_rechecked_total") - checked0 >= ready {
                reload_recheck_secs = Some(t.elapsed().as_secs_f64());
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("reload: not applied and re-checked within 60 s; log in {}", work.join("proxy.log").display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        reload_cpu_secs = Some(cpu_secs(&[proxy_pid]) - cpu_before);
        // The window the devices' pauses are measured over: at least a second.
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
        tell_window(&mut swarm, start, wall_us());
    }
    // Storm and drain: when they began (Unix ms), for the upstream's open
    // log and the devices' close times.
    let (mut storm_start_ms, mut drain_start_ms) = (None, None);
    if a.scenario == "drain" {
        drain_start_ms = Some(wall_us() / 1000);
        let t = Instant::now();
        crate::departures::start_drain(proxy, proxy_pid, pki, a.drain_over)?;
        let mut done = 0;
        let deadline = t + Duration::from_secs_f64(a.drain_over + 60.0);
        while done < nproc && Instant::now() < deadline {
            peak = peak.max(rss_kib(&pids()));
            if let Ok((_, l)) = rx.recv_timeout(Duration::from_millis(50))
                && l.starts_with("BACK")
            {
                done += 1;
            }
        }
        go(&mut swarm);
    }
    if a.scenario == "storm" {
        storm_start_ms = Some(wall_us() / 1000);
        let t = Instant::now();
        let mut back = 0;
        let deadline = t + Duration::from_secs(connect_timeout);
        while back < nproc && Instant::now() < deadline {
            peak = peak.max(rss_kib(&pids()));
            if let Ok((_, l)) = rx.recv_timeout(Duration::from_millis(50))
                && l.starts_with("BACK")
            {
                back += 1;
            }
        }
        storm_secs = Some(t.elapsed().as_secs_f64());
        peak = peak.max(rss_kib(&pids()));
        go(&mut swarm);
    }
    let mut reports = Vec::new();
    let report_deadline = Instant::now() + Duration::from_secs_f64(a.duration + connect_timeout as f64);
    while reports.len() < nproc {
        let left = report_deadline.saturating_duration_since(Instant::now());
        peak = peak.max(rss_kib(&pids()));
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok((_, l)) if l.starts_with("REPORT ") => {
                reports.push(serde_json::from_str::<SwarmReport>(&l[7..]).map_err(|e| e.to_string())?);
            }
            Ok(_) => {}
            Err(_) if Instant::now() >= report_deadline => {
                return Err("swarm did not report".into());
            }
            Err(_) => {}
        }
    }
    // After an upgrade the proxy is the new process (not our child): its
    // CPU time, plus what the old one had used when it exited.
    let cpu1 = match (upgrade_secs, std::fs::read_to_string(pki.join("holdfast.pid")).ok().and_then(|p| p.trim().parse::<u32>().ok())) {
        (Some(_), Some(new)) => old_cpu + cpu_secs(&[new]),
        _ => cpu_secs(&pids()),
    };
    drop(swarm);
    let swarm_total = SwarmTotal::of(&reports);
    let (opens_per_sec, opens_peak) = match storm_start_ms {
        Some(since) => {
            let (per, peak) = crate::departures::opens(&work.join("opens.log"), since);
            (Some(per), Some(peak))
        }
        None => (None, None),
    };
    let (closes_per_sec, drain_secs) = match drain_start_ms {
        Some(since) => {
            let (per, secs) = crate::departures::closes(&swarm_total.close_ms, since);
            (Some(per), Some(secs))
        }
        None => (None, None),
    };
    if a.scenario == "upgrade" {
        // The new process is not our child: stop it through its pid file.
        if let Some(pid) = std::fs::read_to_string(pki.join("holdfast.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: plain kill(2) of the benchmark's own proxy.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    drop(proxy_proc);
    drop(up);
    drop(second);
    Ok(ScenarioResult {
        proxy: proxy.name().into(),
        scenario: a.scenario.clone(),
        label: a.label.clone(),
        date: crate::render::today(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: m,
        args: a.clone(),
        devices_ready: ready,
        swarm: swarm_total,
        proxy_rss_base_kib: rss_base,
        half_devices,
        proxy_rss_half_kib: rss_half,
        proxy_rss_loaded_kib: rss_loaded,
        proxy_rss_peak_kib: peak,
        proxy_cpu_secs: cpu1 - cpu0,
        sock_mem_base_bytes: sock_base,
        sock_mem_loaded_bytes: sock_loaded,
        storm_secs,
        opens_per_sec,
        opens_peak,
        drain_secs,
        closes_per_sec,
        upgrade_secs,
        upgrade_cpu_secs,
        reload_apply_secs,
        reload_recheck_secs,
        reload_cpu_secs,
        failover_secs,
        failover_streams,
        holdfast_metrics,
    })
}

/// The reload scenario's change: a rotated server certificate (from a new
/// CA; connected devices keep theirs) and a blocklist of `entries`
/// fingerprints of no connected device, written beside the config, which
/// is rewritten to name them.
fn write_reload_change(work: &Path, entries: usize) -> Result<(), String> {
    use holdfast::pki::{Validity, make_ca, make_leaf};
    let io = |x: std::io::Error| x.to_string();
    let ca = make_ca("hf-bench rotated server CA").map_err(|x| x.to_string())?;
    let leaf =
        make_leaf(&ca, "localhost", vec!["localhost".into(), "127.0.0.1".into()], true, Validity::Current, 7).map_err(|x| x.to_string())?;
    std::fs::write(work.join("rotated-chain.pem"), format!("{}{}", leaf.cert_pem, ca.pem)).map_err(io)?;
    std::fs::write(work.join("rotated.key"), &leaf.key_pem).map_err(io)?;
    let mut list = String::with_capacity(entries * 65);
    for i in 0..entries as u64 {
        list.push_str(&holdfast::identity::hex(&holdfast::identity::sha256(&i.to_be_bytes())));
        list.push('\n');
    }
    std::fs::write(work.join("reload-blocklist.txt"), list).map_err(io)?;
    let cfg = work.join("holdfast.toml");
    let text = std::fs::read_to_string(&cfg).map_err(io)?;
    let mut out = String::new();
    for l in text.lines() {
        let l = if l.starts_with("cert_chain = ") {
            format!("cert_chain = \"{}\"", work.join("rotated-chain.pem").display())
        } else if l.starts_with("key = ") {
            format!("key = \"{}\"", work.join("rotated.key").display())
        } else if l.starts_with("blocklist = ") {
            format!("blocklist = \"{}\"", work.join("reload-blocklist.txt").display())
        } else {
            l.to_string()
        };
        out.push_str(&l);
        out.push('\n');
    }
    std::fs::write(&cfg, out).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn metric_sums_over_shards() {
        let t =
            "# TYPE x gauge\nholdfast_tunnel_state_bytes{shard=\"0\"} 100\nholdfast_tunnel_state_bytes{shard=\"1\"} 50\nother{a=\"b\"} 7\n";
        assert_eq!(metric_sum(t, "holdfast_tunnel_state_bytes"), 150);
    }

    #[test]
    fn sockstat_mem_is_parsed() {
        let s = "sockets: used 300\nTCP: inuse 12 orphan 0 tw 3 alloc 20 mem 57\nUDP: inuse 1 mem 2\n";
        assert_eq!(parse_sockstat_mem(s), 57);
        assert_eq!(parse_sockstat_mem("nothing"), 0);
    }

    #[test]
    fn run_arguments_parse_with_defaults() {
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: RunArgs,
        }
        let t = T::parse_from(["x", "--scenario", "idle", "--proxies", "holdfast,nginx", "--conns", "500"]);
        assert_eq!(t.a.proxies, vec!["holdfast", "nginx"]);
        assert_eq!(t.a.conns, 500);
        assert_eq!(t.a.procs, 2);
        assert_eq!(t.a.proxy_cpus, "0");
        assert_eq!(parse_cpus("0-1"), vec![0, 1]);
    }

    #[test]
    fn own_process_is_measurable() {
        let me = std::process::id();
        assert!(rss_kib(&[me]) > 0);
        assert!(cpu_secs(&[me]) >= 0.0);
        assert!(family(me).contains(&me));
    }
}
