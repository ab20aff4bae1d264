//! holdfast: an io_uring edge proxy that holds long-lived device WebSockets
//! over mutual TLS and tunnels them to WSM hosts over multiplexed links.
// The shell reads the clock; the core modules deny it (clippy.toml).
#![allow(clippy::disallowed_methods)]

pub use holdfast_link::blame;
pub mod admission;
pub mod config;
pub mod control;
pub mod cpus;
pub mod device;
pub mod device_async;
pub mod identity;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod reload;
pub mod resolve;
pub mod session;
pub mod shard;
pub mod signals;
pub mod timefmt;
pub mod tls;
pub mod upgrade;
pub mod ws;
pub use holdfast_wsm as wsm;

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

/// Lowers the calling thread's priority (nice 10): where it competes with a
/// busy shard for a CPU it gets about a tenth of it, so work done on it (a
/// reload parsing a million-entry blocklist) takes little from the shard,
/// yet still finishes (SCHED_IDLE would starve it on a saturated node).
/// Per thread on Linux.
pub fn background_thread() {
    // SAFETY: gettid and setpriority take and return plain integers.
    let r = unsafe {
        let tid = nix::libc::syscall(nix::libc::SYS_gettid) as nix::libc::id_t;
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid, 10)
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower this thread's priority");
    }
}

/// Build facts, for `--version` and `holdfast_build_info`.
pub mod build {
    pub const VERSION: &str = env!("CARGO_PKG_VERSION");
    /// Git commit of the checkout it was built from ("-dirty" if modified).
    pub const COMMIT: &str = env!("HOLDFAST_COMMIT");
    pub const RUSTLS: &str = env!("HOLDFAST_RUSTLS_VERSION");
    pub const RING: &str = env!("HOLDFAST_RING_VERSION");
    /// What `--version` prints after the program name.
    pub const LONG_VERSION: &str = concat!(
        env!("CARGO_PKG_VERSION"),
        " (commit ",
        env!("HOLDFAST_COMMIT"),
        ", rustls ",
        env!("HOLDFAST_RUSTLS_VERSION"),
        ", ring ",
        env!("HOLDFAST_RING_VERSION"),
        ")"
    );
}

/// Writes a line to stdout, ignoring a closed stdout (`holdfast run | true`,
/// or a live upgrade's successor whose inherited stdout is gone): output is
/// for people, and its loss must never stop the proxy.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
}

/// As [`say`], to stderr.
pub fn esay(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stderr().lock();
    let _ = out.write_fmt(line).and_then(|()| out.write_all(b"\n"));
}

/// `eprintln!` that never panics on a closed stderr (see [`say`]).
#[macro_export]
macro_rules! esay {
    ($($t:tt)*) => { $crate::esay(format_args!($($t)*)) };
}

/// `println!` that never panics on a closed stdout (see [`say`]).
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::say(format_args!($($t)*)) };
}

/// A check for the command-line tools' own tests: every subcommand and every
/// flag or argument has help text (clap's `--version`/`--help` aside).
#[doc(hidden)]
pub mod cli_help {
    pub fn assert_all_documented(cmd: &clap::Command) {
        let mut missing = Vec::new();
        walk(cmd, cmd.get_name().to_string(), &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }

    fn walk(cmd: &clap::Command, path: String, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} --{id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                missing.push(format!("{path} {}", sub.get_name()));
            }
            walk(sub, format!("{path} {}", sub.get_name()), missing);
        }
    }
}
