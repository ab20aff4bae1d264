//! The `holdfast` command: run the proxy, check a config, start the
//! quickstart, or act as a device.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use holdfast::config::Config;
use holdfast::device::{Device, DeviceOptions};
use holdfast::signals::{Arrived, Meaning};
use holdfast::{esay, say};

// The `system-alloc` feature leaves the system allocator in place, so heap
// profilers that hook malloc (heaptrack, massif) see every allocation.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUN_HELP: &str = "\
Signals:
  SIGTERM                   graceful stop: stop accepting, close every device (close 1001 and TLS
                            close_notify) at a random moment within [drain] stop_over_ms, exit 0
  SIGINT, SIGQUIT           (or a second SIGTERM) close every device now, still with close frames,
                            and exit 0
  SIGUSR2                   live binary upgrade: start the binary now at this path and hand it
                            every listening socket and device connection (docs/upgrade.md);
                            `holdfast upgrade` does the same and waits for the outcome
  SIGHUP                    reload: re-read the config and every file it names, apply it to every
                            shard at once, or refuse it whole (`holdfast reload` does the same and
                            prints the outcome); keys that need a restart are named, for `holdfast upgrade`
  any other signal          logged and ignored; only SIGKILL ends holdfast without its own handling

Environment:
  HOLDFAST_LOG              log filter, as --log
  HOLDFAST_LOG_FORMAT       text or json, as --log-format
  HOLDFAST_UPGRADE_EXE      binary a live upgrade starts (default: the path this process was started from)
  HOLDFAST_HOSTS            hosts-format file pinning the names in upstream.wsm (tests, air-gapped nodes)
  NOTIFY_SOCKET             set by systemd (Type=notify): READY=1 and MAINPID= are sent there
  HOLDFAST_UPGRADE_FD       set by holdfast itself for an upgrade's successor; never set it by hand";

#[derive(Parser)]
#[command(
    name = "holdfast",
    version = holdfast::build::LONG_VERSION,
    about = "io_uring edge proxy that holds device WebSockets over mutual TLS"
)]
struct Cli {
    /// Log filter: a level (error, warn, info, debug, trace, off) or per-module
    /// directives, e.g. "warn,holdfast::shard=debug".
    #[arg(long, global = true, default_value = "info", env = "HOLDFAST_LOG", value_parser = holdfast::logging::check_filter)]
    log: String,
    /// Log line format: text for people, json (one object a line) for log shippers.
    #[arg(long, global = true, value_enum, default_value = "text", env = "HOLDFAST_LOG_FORMAT")]
    log_format: holdfast::logging::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy with a config file.
    #[command(after_long_help = RUN_HELP, after_help = "Signals and environment variables: see --help.")]
    Run {
        /// The TOML config file (see README: Configuration).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file (and the files it names) and explain every error.
    CheckConfig {
        /// The TOML config file to check.
        file: PathBuf,
    },
    /// Make a dev PKI and config, start the reference WSM and the proxy on loopback.
    Quickstart {
        /// Where to write certificates and the example config.
        #[arg(long, default_value = "holdfast-dev")]
        dir: PathBuf,
        /// Port devices connect to (on 127.0.0.1).
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Port of the reference WSM (on 127.0.0.1).
        #[arg(long, default_value_t = 9000)]
        wsm_port: u16,
        /// Port of the metrics endpoint (on 127.0.0.1).
        #[arg(long, default_value_t = 9100)]
        metrics_port: u16,
        /// Exit after the self-check instead of serving.
        #[arg(long)]
        check_only: bool,
        /// Also write this many distinct device certificates,
        /// devices/fleet/NNNNN.{pem,key} (for load tests).
        #[arg(long, default_value_t = 0)]
        fleet: usize,
    },
    /// Live-upgrade the running holdfast (found by its pid file) to the
    /// binary now at its path, and print the outcome.
    Upgrade {
        /// The `[upgrade] pid_file` of the running instance.
        #[arg(long)]
        pid_file: PathBuf,
        /// Seconds to wait for the outcome.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Reload the running holdfast's config (and every file it names) and
    /// print the outcome; exits non-zero if it was refused. Same as SIGHUP
    /// and `holdfast ctl reload`.
    Reload {
        #[command(flatten)]
        target: holdfast::control::cli::Target,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        /// After a server certificate rotation: close (1001) the connections
        /// made under an older certificate at random moments within this
        /// window (e.g. 30m), so their devices reconnect and get the new one.
        #[arg(long, value_parser = holdfast::control::cli::parse_duration)]
        migrate_over: Option<Duration>,
    },
    /// Operate a running holdfast through its control socket.
    Ctl {
        #[command(flatten)]
        target: holdfast::control::cli::Target,
        #[command(subcommand)]
        cmd: holdfast::control::cli::CtlCmd,
    },
    /// Connect as a device, send messages and print the replies.
    Device {
        /// Address of holdfast.
        #[arg(long, default_value = "127.0.0.1:8443")]
        addr: SocketAddr,
        /// Server name to send (SNI) and to check holdfast's certificate against.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// CA that signed holdfast's server certificate.
        #[arg(long)]
        ca: PathBuf,
        /// The device's certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// The device's private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// Request path of the WebSocket upgrade.
        #[arg(long, default_value = "/")]
        path: String,
        /// "1.2" or "1.3" (default: either).
        #[arg(long)]
        tls_version: Option<String>,
        /// Text message to send (repeatable); each reply is printed.
        #[arg(long)]
        send: Vec<String>,
        /// Start a TLS 1.3 KeyUpdate before sending.
        #[arg(long)]
        key_update: bool,
    },
}

fn main() -> ExitCode {
    holdfast::no_huge_pages();
    let cli = Cli::parse();
    holdfast::logging::init(&cli.log, cli.log_format);
    match cli.cmd {
        Cmd::Run { config } => run(config, &cli.log),
        Cmd::Reload { target, json, migrate_over } => {
            ExitCode::from(holdfast::control::cli::run(&target, &holdfast::control::cli::CtlCmd::Reload { json, migrate_over }))
        }
        Cmd::Ctl { target, cmd } => ExitCode::from(holdfast::control::cli::run(&target, &cmd)),
        Cmd::CheckConfig { file } => check_config(file),
        Cmd::Upgrade { pid_file, timeout } => match holdfast::upgrade::coordinator::request(&pid_file, Duration::from_secs(timeout)) {
            Ok(r) if r.status == "ok" => {
                say!("upgraded: pid {} -> pid {}, {} connections moved in {} ms", r.old_pid, r.new_pid, r.connections_moved, r.elapsed_ms);
                ExitCode::SUCCESS
            }
            Ok(r) => {
                esay!(
                    "upgrade failed: {}; pid {} keeps serving {} connections",
                    r.error.unwrap_or_default(),
                    r.old_pid,
                    r.connections_kept
                );
                ExitCode::FAILURE
            }
            Err(e) => {
                esay!("upgrade: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Quickstart { dir, port, wsm_port, metrics_port, check_only, fleet } => {
            quickstart(dir, port, wsm_port, metrics_port, check_only, fleet)
        }
        Cmd::Device { addr, server_name, ca, cert, key, path, tls_version, send, key_update } => {
            let o = DeviceOptions {
                addr,
                server_name,
                server_ca: ca,
                cert,
                key,
                path,
                subprotocols: vec![],
                version: tls_version,
                suite: None,
                timeout: Duration::from_secs(10),
            };
            device(&o, &send, key_update)
        }
    }
}

fn print_errors(what: &str, errs: &[String]) -> ExitCode {
    esay!("{what}: {} error(s)", errs.len());
    for e in errs {
        esay!("  error: {e}");
    }
    ExitCode::from(2)
}

/// The config and every file it names (certificates, keys, CAs, blocklist),
/// checked in one pass so that every problem is reported at once.
fn load_checked(path: &std::path::Path) -> Result<(Config, holdfast::tls::server::TlsContext), Vec<String>> {
    let (cfg, mut errs) = Config::check(path);
    if let Some(cfg) = cfg {
        // The TLS files can be checked when their keys themselves are right.
        if !errs.iter().any(|e| e.key.starts_with("tls")) {
            match holdfast::tls::server::TlsContext::load(&cfg.tls) {
                Ok(tls) if errs.is_empty() => return Ok((cfg, tls)),
                Ok(_) => {}
                Err(more) => errs.extend(more),
            }
        }
    }
    Err(errs.iter().map(|e| e.to_string()).collect())
}

fn load_strings(path: &std::path::Path) -> Result<Config, Vec<String>> {
    load_checked(path).map(|(c, _)| c)
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    load_strings(path).map_err(|es| print_errors(&path.display().to_string(), &es))
}

type Signals = crossbeam_channel::Receiver<Arrived>;

fn announce(running: &holdfast::proxy::Running, shards: usize) {
    let metrics = running.metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    say!("holdfast ready on {} shards={shards} metrics={metrics} pid={}", running.listen, std::process::id());
}

/// Serves until SIGINT/SIGTERM; SIGUSR2 starts a live upgrade
/// (`docs/upgrade.md`), after which this process exits once every
/// connection has moved; SIGHUP and the control socket reload.
type Control = (holdfast::control::server::ControlServer, crossbeam_channel::Receiver<holdfast::control::server::Pending>);

/// Binds the control socket (a failure is logged: the proxy serves anyway).
fn start_control(path: &std::path::Path) -> Option<Control> {
    match holdfast::control::server::ControlServer::start(path) {
        Ok((server, rx)) => {
            tracing::info!(socket = %path.display(), "control socket ready");
            Some((server, rx))
        }
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "no control socket (holdfast ctl and holdfast reload will not reach this instance; SIGHUP still reloads)");
            None
        }
    }
}

fn serve(
    mut running: holdfast::proxy::Running,
    mut control: Option<Control>,
    config: &std::path::Path,
    exe: &std::path::Path,
    signals: Signals,
) -> ExitCode {
    let pid_file = running.pid_file.clone();
    let mut upgrader = holdfast::upgrade::coordinator::Upgrader::new(exe.to_path_buf(), config.to_path_buf(), pid_file.as_deref());
    let never = crossbeam_channel::never();
    let mut rate = holdfast::control::handle::Rate::default();
    let mut was_upgrading = false;
    let mut stopping = Stopping::default();
    loop {
        let requests = control.as_ref().map(|(_, rx)| rx).unwrap_or(&never);
        let tick = if stopping.since.is_some() { upgrader.interval().min(Duration::from_millis(20)) } else { upgrader.interval() };
        crossbeam_channel::select! {
            recv(signals) -> sig => match sig {
                Ok(sig) => match sig.meaning() {
                    Meaning::Upgrade if stopping.since.is_some() => tracing::warn!(signal = %sig, "stopping: no upgrade now"),
                    Meaning::Upgrade if running.is_draining() => tracing::warn!(signal = %sig, "a drain is under way: no upgrade (cancel it with `holdfast ctl drain --cancel`)"),
                    Meaning::Upgrade => upgrader.start(&mut running),
                    Meaning::Stop if stopping.since.is_none() => stopping.gently(&mut running, &sig),
                    Meaning::Stop | Meaning::StopNow => stopping.now(&mut running, &sig),
                    Meaning::Reload if upgrader.in_progress() => {
                        tracing::warn!(signal = %sig, "a live upgrade is under way: not reloading (reload when it is done)")
                    }
                    Meaning::Reload => {
                        tracing::info!(signal = %sig, "reloading");
                        let _ = running.reload();
                    }
                    Meaning::Ignore => tracing::warn!(signal = %sig, "signal ignored; still serving"),
                },
                Err(_) => break,
            },
            recv(requests) -> req => {
                if let Ok((req, answer)) = req {
                    let r = holdfast::control::handle::handle(req, &mut running, &rate, upgrader.in_progress());
                    let _ = answer.send(r);
                }
            },
            default(tick) => {
                if upgrader.tick(&mut running) {
                    break;
                }
            },
        }
        if stopping.done(&mut running) {
            break;
        }
        rate.sample(&running);
        // A successor that took the control socket's path over and then
        // failed leaves it to a dead socket: take it back.
        let upgrading = upgrader.in_progress();
        if was_upgrading && !upgrading && control.as_ref().is_some_and(|(c, _)| !c.owns_path()) {
            let path = control.as_ref().map(|(c, _)| c.path.clone());
            control = path.and_then(|p| start_control(&p)).or(control);
        }
        was_upgrading = upgrading;
    }
    running.shutdown();
    ExitCode::SUCCESS
}

/// The graceful stop (SIGTERM) and the quick one (SIGINT, SIGQUIT, a
/// second SIGTERM): every device is closed with a close frame and
/// close_notify, spread over `drain.stop_over_ms` or at once; the process
/// exits when none is left (or, at the latest, a few seconds after the
/// window, when whatever is still setting up is closed).
#[derive(Default)]
struct Stopping {
    since: Option<std::time::Instant>,
    /// When what is left is closed at once, then when the process exits anyway.
    give_up: Option<std::time::Instant>,
    forced: bool,
}

/// How long after its window a stop waits for the last connections.
const STOP_GRACE: Duration = Duration::from_secs(5);

impl Stopping {
    fn gently(&mut self, running: &mut holdfast::proxy::Running, sig: &Arrived) {
        let over = running.generation.cfg.drain.stop_over;
        tracing::info!(signal = %sig, over_ms = over.as_millis() as u64, connections = running.connections(), "stopping: every device gets close 1001 at a random moment of the window (a second SIGTERM, or SIGINT, closes the rest at once)");
        running.drain(over, holdfast::ws::frame::close::GOING_AWAY, holdfast::session::end::Paced::Stop);
        let now = std::time::Instant::now();
        self.since = Some(now);
        self.give_up = Some(now + over + STOP_GRACE);
    }

    fn now(&mut self, running: &mut holdfast::proxy::Running, sig: &Arrived) {
        tracing::info!(signal = %sig, connections = running.connections(), "stopping now: closing every device at once, each with a close frame");
        running.drain(Duration::ZERO, holdfast::ws::frame::close::GOING_AWAY, holdfast::session::end::Paced::Stop);
        let now = std::time::Instant::now();
        self.since.get_or_insert(now);
        self.give_up = Some(now + STOP_GRACE);
        self.forced = true;
    }

    /// Whether the process may exit now.
    fn done(&mut self, running: &mut holdfast::proxy::Running) -> bool {
        let (Some(since), Some(give_up)) = (self.since, self.give_up) else { return false };
        let left = running.connections();
        if left == 0 {
            tracing::info!(elapsed_ms = since.elapsed().as_millis() as u64, "stopped: every device was closed");
            return true;
        }
        if std::time::Instant::now() < give_up {
            return false;
        }
        if !self.forced {
            tracing::warn!(connections = left, "the stop window is over: closing what is left at once");
            running.drain(Duration::ZERO, holdfast::ws::frame::close::GOING_AWAY, holdfast::session::end::Paced::Stop);
            self.give_up = Some(std::time::Instant::now() + STOP_GRACE);
            self.forced = true;
            return false;
        }
        tracing::warn!(connections = left, "stopping with connections still setting up");
        true
    }
}

fn run(config: PathBuf, log: &str) -> ExitCode {
    // The binary at the path this process was started from: an operator
    // replaces the file, then signals.
    let exe = holdfast::upgrade::coordinator::own_exe();
    let signals = holdfast::signals::take_over();
    let channel = holdfast::upgrade::handoff::inherited_channel();
    let cfg = match load_strings(&config) {
        Ok(c) => c,
        Err(es) => {
            if let Some(ch) = &channel {
                let msg = holdfast::upgrade::handoff::Msg::Failed { error: es.join("; ") };
                let _ = holdfast::upgrade::handoff::send(ch, &msg, &[]);
            }
            return print_errors(&config.display().to_string(), &es);
        }
    };
    if let Some(level) = &cfg.log_level
        && let Err(e) = holdfast::logging::set_filter(level)
    {
        tracing::warn!(error = %e, "log.level not applied");
    }
    let shards = cfg.shard_cpus.len();
    let mut running = match channel {
        Some(ch) => match holdfast::upgrade::coordinator::take_over(ch, cfg) {
            Ok(r) => r,
            Err(es) => return print_errors("holdfast (upgrade) could not start", &es),
        },
        None => match holdfast::proxy::start(cfg) {
            Ok(r) => r,
            Err(es) => return print_errors("holdfast could not start", &es),
        },
    };
    running.base_log = log.to_string();
    // Bound before "ready": `holdfast ctl` works as soon as the proxy serves.
    let control = running.generation.cfg.control_socket.clone().and_then(|p| start_control(&p));
    announce(&running, shards);
    holdfast::upgrade::notify::ready(&format!("serving on {} with {shards} shards", running.listen));
    if let Some(p) = &running.pid_file
        && let Err(e) = holdfast::upgrade::coordinator::write_pid_file(p)
    {
        tracing::warn!(path = %p.display(), error = %e, "cannot write the pid file");
    }
    serve(running, control, &config, &exe, signals)
}

fn check_config(file: PathBuf) -> ExitCode {
    let (cfg, tls) = match load_checked(&file) {
        Ok(both) => both,
        Err(es) => return print_errors(&file.display().to_string(), &es),
    };
    for w in &tls.warnings {
        esay!("  warning: {w}");
    }
    let warned = if tls.warnings.is_empty() { String::new() } else { format!(" with {} warning(s)", tls.warnings.len()) };
    say!("{}: ok{warned}", file.display());
    say!("  listen {} with {} shard(s) on CPUs {:?}", cfg.listen, cfg.shard_cpus.len(), cfg.shard_cpus);
    say!("  {} device CA file(s), {} blocklist entr(y/ies)", cfg.tls.client_cas.len(), tls.verifier.blocklist().len());
    say!("  WSM hosts {:?}, {} link(s) per shard each", cfg.upstream.wsm, cfg.upstream.links_per_shard);
    ExitCode::SUCCESS
}

/// `p` as one shell word: bare when it holds only safe characters, else in
/// single quotes.
fn shell_quote(p: &std::path::Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=@%,".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn device(o: &DeviceOptions, send: &[String], key_update: bool) -> ExitCode {
    let mut d = match Device::connect(o) {
        Ok(d) => d,
        Err(e) => {
            esay!("device: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (v, s) = d.tls_info();
    esay!("device: connected ({v}, {s}); WebSocket open");
    if key_update && let Err(e) = d.key_update() {
        esay!("device: key update: {e}");
        return ExitCode::FAILURE;
    }
    for m in send {
        let r = d.send_text(m).and_then(|_| d.recv_text());
        match r {
            Ok(reply) => say!("{reply}"),
            Err(e) => {
                esay!("device: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let _ = d.close(1000);
    let _ = d.recv_close();
    ExitCode::SUCCESS
}

fn quickstart(dir: PathBuf, port: u16, wsm_port: u16, metrics_port: u16, check_only: bool, fleet: usize) -> ExitCode {
    let signals = holdfast::signals::take_over();
    if let Err(e) = holdfast::pki::generate_with_fleet(&dir, fleet) {
        esay!("quickstart: cannot write the dev PKI to {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let wsm_addr: SocketAddr = ([127, 0, 0, 1], wsm_port).into();
    let server = match holdfast::wsm::Server::bind(wsm_addr, Arc::new(holdfast::wsm::echo::Echo::default()), "quickstart-wsm".into()) {
        Ok(s) => s,
        Err(e) => {
            esay!("quickstart: reference WSM cannot listen on {wsm_addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    std::thread::spawn(move || server.serve());
    let listen = format!("127.0.0.1:{port}");
    let text = holdfast::pki::example_config(&listen, &wsm_addr.to_string(), "2", &format!("127.0.0.1:{metrics_port}"));
    let cfg_path = dir.join("holdfast.toml");
    if let Err(e) = std::fs::write(&cfg_path, text) {
        esay!("quickstart: {e}");
        return ExitCode::FAILURE;
    }
    let cfg = match load(&cfg_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let running = match holdfast::proxy::start(cfg) {
        Ok(r) => r,
        Err(es) => return print_errors("holdfast could not start", &es),
    };
    // Every printed command runs as printed, from any directory: this very
    // binary by its absolute path, files by theirs.
    let me = shell_quote(&std::env::current_exe().unwrap_or_else(|_| PathBuf::from("holdfast")));
    let abs = std::path::absolute(&dir).unwrap_or_else(|_| dir.clone());
    let file = |rel: &str| shell_quote(&abs.join(rel));
    let dev = |name: &str| {
        format!(
            "{me} device --addr {listen} --ca {} --cert {} --key {}",
            file("server-ca.pem"),
            file(&format!("devices/{name}.pem")),
            file(&format!("devices/{name}.key"))
        )
    };
    // Self-check: one device round trip through the proxy and the WSM.
    let o = DeviceOptions {
        addr: running.listen,
        server_name: "localhost".into(),
        server_ca: dir.join("server-ca.pem"),
        cert: dir.join("devices/oven-1.pem"),
        key: dir.join("devices/oven-1.key"),
        path: "/".into(),
        subprotocols: vec![],
        version: None,
        suite: None,
        timeout: Duration::from_secs(10),
    };
    let check = Device::connect(&o).and_then(|mut dv| {
        dv.send_text("hello from oven-1")?;
        let echo = dv.recv_text()?;
        let _ = dv.close(1000);
        Ok(echo)
    });
    match check {
        Ok(echo) => say!("self-check: device oven-1 sent \"hello from oven-1\", echo came back: \"{echo}\""),
        Err(e) => {
            esay!("self-check failed: {e}");
            running.shutdown();
            return ExitCode::FAILURE;
        }
    }
    say!(
        "\nholdfast quickstart is running:\n  proxy        {listen} (mutual TLS, 2 shards)\n  reference WSM {wsm_addr}\n  metrics      http://127.0.0.1:{metrics_port}/metrics\n  config       {}\n\nCheck the config:\n  {me} check-config {}\n\nOperate it:\n  {me} ctl --config {} status\n\nConnect as a device:\n  {} --send whoami --send hello\n  {} --send whoami     # expired cert, CA with ignore_validity: accepted\n  {} --send hi         # expired cert, strict CA: refused\n  {} --send hi         # blocklisted: refused\n  {} --send hi         # unknown CA: refused\n\n{}",
        file("holdfast.toml"),
        file("holdfast.toml"),
        file("holdfast.toml"),
        dev("oven-1"),
        dev("thermostat-2019"),
        dev("hood-expired"),
        dev("fridge-blocked"),
        dev("rogue-1"),
        if check_only { "--check-only: stopping now." } else { "Stop with Ctrl-C." },
    );
    if check_only {
        running.shutdown();
        return ExitCode::SUCCESS;
    }
    // SIGINT, SIGTERM or SIGQUIT stops it; SIGHUP and `holdfast ctl` work
    // as for `holdfast run`; everything else is ignored (upgrades are for
    // `holdfast run`).
    let control = running.generation.cfg.control_socket.clone().and_then(|p| start_control(&p));
    let mut running = running;
    let never = crossbeam_channel::never();
    let requests = control.as_ref().map(|(_, rx)| rx).unwrap_or(&never);
    let mut rate = holdfast::control::handle::Rate::default();
    loop {
        crossbeam_channel::select! {
            recv(signals) -> sig => match sig {
                Ok(sig) if matches!(sig.meaning(), Meaning::Stop | Meaning::StopNow) => {
                    // A dev tool: close every device at once, with close frames.
                    let mut stopping = Stopping::default();
                    stopping.now(&mut running, &sig);
                    while !stopping.done(&mut running) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    break;
                }
                Ok(sig) if sig.meaning() == Meaning::Reload => {
                    let _ = running.reload();
                }
                Ok(sig) => tracing::warn!(signal = %sig, "signal ignored by the quickstart; Ctrl-C stops it"),
                Err(_) => break,
            },
            recv(requests) -> req => {
                if let Ok((req, answer)) = req {
                    let _ = answer.send(holdfast::control::handle::handle(req, &mut running, &rate, false));
                }
            },
            default(Duration::from_millis(500)) => {},
        }
        rate.sample(&running);
    }
    running.shutdown();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_has_help() {
        holdfast::cli_help::assert_all_documented(&<super::Cli as clap::CommandFactory>::command());
    }
}
