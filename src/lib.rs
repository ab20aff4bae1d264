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
pub mod resolve;
pub mod shard;
pub mod tls;
pub mod upgrade;
pub mod ws;
pub mod wsm;

/// Turns transparent huge pages off for this process and the processes it
/// starts (a live upgrade's successor). holdfast's memory is many small
/// per-connection objects: a 2 MiB page saves little TLB work there, costs
/// RSS, and the first touch of each one is slow (on a virtual machine
/// measured at 0.5 GB/s against 2.5 GB/s for 4 KiB pages). A successor
/// touches all of its memory while it adopts connections, so with huge
/// pages a 15,000-connection upgrade took 1.1-1.3 s with a p99 device pause
/// of 45-50 ms, and without them 0.67-0.80 s and 18-34 ms (bench/RESULTS.md).
pub fn no_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers.
    let r = unsafe { nix::libc::prctl(nix::libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot turn transparent huge pages off");
    }
}

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
