//! holdfast: an io_uring edge proxy that holds long-lived device WebSockets
//! over mutual TLS and tunnels them to WSM hosts over multiplexed links.
pub mod config;
pub mod device;
pub mod device_async;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod shard;
pub mod tls;
pub mod upgrade;
pub mod ws;
pub mod wsm;

/// Sets up logging to stderr at `level` (error, warn, info, debug, trace);
/// plain text when stderr is not a terminal.
pub fn init_log(level: &str) {
    let level = level.parse().unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
