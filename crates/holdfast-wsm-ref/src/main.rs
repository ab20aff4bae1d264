//! `holdfast-wsm`: the reference WSM. Echoes every message; answers the
//! text `whoami` with the stream's identity as JSON. SIGTERM (or SIGINT)
//! drains it: GOAWAY on every link, so holdfast moves its streams to other
//! WSMs, and exit 0 once none is left (or after `--drain-timeout`). A second
//! signal exits at once. Devices holdfast labels `quarantine` may only send
//! the message types `--quarantine-allow` names.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;

mod redis_store;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "holdfast-wsm", version = holdfast::build::LONG_VERSION, about = "Reference WSM for holdfast: echo and whoami")]
struct Cli {
    /// Address holdfast's links connect to.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Name sent in link hellos.
    #[arg(long, default_value = "holdfast-wsm")]
    node: String,
    /// Log filter: a level (error, warn, info, debug, trace, off) or
    /// per-module directives, e.g. "warn,holdfast::wsm=debug".
    #[arg(long, default_value = "info", env = "HOLDFAST_LOG", value_parser = holdfast::logging::check_filter)]
    log: String,
    /// Log line format: text, or json (one object a line).
    #[arg(long, value_enum, default_value = "text", env = "HOLDFAST_LOG_FORMAT")]
    log_format: holdfast::logging::LogFormat,
    /// Seconds a drain may take before the process exits regardless.
    #[arg(long, default_value_t = 60)]
    drain_timeout: u64,
    /// Where sessions and presence live: `memory` (this instance only) or a
    /// Redis URL (`redis://127.0.0.1:6379`), shared by every instance.
    #[arg(long, default_value = "memory")]
    store: String,
    /// Milliseconds between presence refreshes of the devices held here.
    #[arg(long, default_value_t = 1000)]
    presence_interval_ms: u64,
    /// Milliseconds a presence key lives without a refresh (longer than the
    /// interval, so a hiccup does not make devices flicker offline).
    #[arg(long, default_value_t = 3000)]
    presence_ttl_ms: u64,
    /// Message types (a JSON text message's "type") a device that holdfast
    /// labels `quarantine` may send, comma-separated; its other messages
    /// are answered {"error":"quarantined"} and not processed (`whoami` is
    /// always answered).
    #[arg(long, value_delimiter = ',', default_value = "firmware_status,firmware_request")]
    quarantine_allow: Vec<String>,
    /// The newest link protocol version to speak (1: as a WSM from before
    /// device labels; holdfast falls back to it).
    #[arg(long, default_value_t = holdfast::link::codec::VERSION)]
    max_version: u16,
    /// Append a line per stream opened (`<unix ms> <new|resumed> <connection
    /// id>`) to this file: how fast holdfast asked this WSM to take devices.
    #[arg(long)]
    open_log: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    holdfast::logging::init(&cli.log, cli.log_format);
    // Its maps grow by doubling; with huge pages each growth first-touches
    // megabytes at once and stalls every stream on the link meanwhile.
    holdfast::no_huge_pages();
    // Every terminating signal is blocked in every thread and arrives here;
    // SIGTERM, SIGINT and SIGQUIT drain, the rest are logged and ignored.
    let signals = holdfast::signals::take_over();
    let next_stop = move || loop {
        match signals.recv() {
            Ok(sig) if matches!(sig.meaning(), holdfast::signals::Meaning::Stop | holdfast::signals::Meaning::StopNow) => return Some(sig),
            Ok(sig) => tracing::warn!(signal = %sig, "signal ignored"),
            Err(_) => return None,
        }
    };
    if cli.presence_ttl_ms <= cli.presence_interval_ms {
        holdfast::esay!("holdfast-wsm: --presence-ttl-ms must be longer than --presence-interval-ms");
        return std::process::ExitCode::from(2);
    }
    let store: Arc<dyn holdfast_wsm::state::Store> = if cli.store == "memory" {
        Arc::new(holdfast_wsm::state::Memory::default())
    } else {
        match redis_store::Redis::connect(&cli.store) {
            Ok(r) => r,
            Err(e) => {
                holdfast::esay!("holdfast-wsm: store: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    };
    let ttl = std::time::Duration::from_millis(cli.presence_ttl_ms);
    let echo = holdfast_wsm::echo::Echo::with_store(store.clone(), ttl);
    holdfast_wsm::state::heartbeat(store, echo.held.clone(), std::time::Duration::from_millis(cli.presence_interval_ms), ttl);
    // `whoami` stays open to a quarantined device: it shows the labels.
    let app = holdfast_wsm::quarantine::Quarantine::new(echo, cli.quarantine_allow.clone()).allow_texts(["whoami".to_string()]);
    let app: Arc<dyn holdfast_wsm::App> = match &cli.open_log {
        Some(p) => match holdfast_wsm::openlog::OpenLog::create(app, p) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                holdfast::esay!("holdfast-wsm: --open-log {}: {e}", p.display());
                return std::process::ExitCode::from(2);
            }
        },
        None => Arc::new(app),
    };
    let server = match holdfast_wsm::Server::bind(cli.listen, app, cli.node) {
        Ok(s) => s.with_max_version(cli.max_version),
        Err(e) => {
            holdfast::esay!("holdfast-wsm: cannot listen on {}: {e}", cli.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    match server.local_addr() {
        Ok(a) => holdfast::say!("holdfast-wsm listening on {a}"),
        Err(e) => holdfast::esay!("holdfast-wsm: {e}"),
    }
    let drain = server.drain_handle();
    std::thread::spawn(move || {
        if let Err(e) = server.serve() {
            holdfast::esay!("holdfast-wsm: {e}");
            std::process::exit(1);
        }
    });
    let Some(sig) = next_stop() else {
        return std::process::ExitCode::FAILURE;
    };
    tracing::info!(signal = %sig, streams = drain.streams(), "draining: asking holdfast to move every stream elsewhere");
    drain.start();
    // A second signal ends the drain at once.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = next_stop();
        let _ = tx.send(());
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(cli.drain_timeout);
    // Give every link a moment to send its GOAWAY before counting down.
    std::thread::sleep(std::time::Duration::from_millis(200));
    while drain.streams() > 0 && std::time::Instant::now() < deadline && rx.try_recv().is_err() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left = drain.streams();
    if left > 0 {
        tracing::warn!(streams = left, "drain ended with streams still open");
    } else {
        tracing::info!("drained: no stream left");
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_has_help() {
        holdfast::cli_help::assert_all_documented(&<super::Cli as clap::CommandFactory>::command());
    }
}
