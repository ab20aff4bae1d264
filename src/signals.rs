//! Process signals: every signal whose default action would end the process
//! is taken over, so that nothing but SIGKILL (and a real crash) ends
//! holdfast without its own handling.
//!
//! Owns: blocking those signals in the calling thread and in every thread
//! started after it, one thread that waits for them, and the decision what
//! each one means ([`Meaning`]). Never acts on a signal itself: the caller
//! (the serve loop) does. Fault signals raised by the kernel for a real
//! crash (SIGSEGV and friends from a bad access) still end the process, as
//! they must: the kernel delivers those whatever the mask; only the same
//! signals sent from outside with `kill` are caught and ignored.

use nix::libc;

/// What holdfast does on a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// SIGTERM: the graceful stop: stop accepting, close every device (1001)
    /// spread over `drain.stop_over_ms`, exit 0.
    Stop,
    /// SIGINT, SIGQUIT (or a second SIGTERM): close every device now, each
    /// still with a close frame and close_notify, and exit 0.
    StopNow,
    /// SIGUSR2: live binary upgrade (`docs/upgrade.md`).
    Upgrade,
    /// SIGHUP: the operator's reload. Live reload is not built yet, so it is
    /// logged and ignored; it never ends the process.
    Reload,
    /// Anything else that would have ended the process by default (SIGUSR1,
    /// SIGALRM, SIGPWR, real-time signals, a `kill -SEGV` from outside, ...):
    /// logged and ignored.
    Ignore,
}

/// A signal that arrived, by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrived(pub i32);

impl Arrived {
    pub fn meaning(self) -> Meaning {
        match self.0 {
            libc::SIGTERM => Meaning::Stop,
            libc::SIGINT | libc::SIGQUIT => Meaning::StopNow,
            libc::SIGUSR2 => Meaning::Upgrade,
            libc::SIGHUP => Meaning::Reload,
            _ => Meaning::Ignore,
        }
    }

    /// The signal's name, e.g. "SIGHUP" or "SIGRTMIN+3".
    pub fn name(self) -> String {
        let rtmin = libc::SIGRTMIN();
        if self.0 >= rtmin && self.0 <= libc::SIGRTMAX() {
            return format!("SIGRTMIN+{}", self.0 - rtmin);
        }
        match nix::sys::signal::Signal::try_from(self.0) {
            Ok(s) => s.as_str().to_string(),
            Err(_) => format!("signal {}", self.0),
        }
    }
}

impl std::fmt::Display for Arrived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Signals whose default action ends the process (signal(7)), other than
/// SIGKILL (which cannot be caught) and SIGPIPE (ignored by the Rust runtime,
/// so a closed peer or stdout is an error return, never a death).
fn terminating() -> Vec<i32> {
    let mut v = vec![
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGSYS,
        libc::SIGTRAP,
        libc::SIGABRT,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
    ];
    v.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    v
}

fn set_of(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks every terminating signal in this thread and every thread it starts
/// later, and forwards each arrival from one waiting thread to the returned
/// channel. Call it first in `main`, before any thread starts.
pub fn take_over() -> crossbeam_channel::Receiver<Arrived> {
    let set = set_of(&terminating());
    // SAFETY: pthread_sigmask reads the set we own; a null old-set is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let _ = std::thread::Builder::new().name("holdfast-signals".into()).spawn(move || {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait reads the set we own and writes one int.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r != 0 {
                continue;
            }
            if tx.send(Arrived(sig)).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meanings() {
        assert_eq!(Arrived(libc::SIGTERM).meaning(), Meaning::Stop);
        assert_eq!(Arrived(libc::SIGQUIT).meaning(), Meaning::StopNow);
        assert_eq!(Arrived(libc::SIGINT).meaning(), Meaning::StopNow);
        assert_eq!(Arrived(libc::SIGUSR2).meaning(), Meaning::Upgrade);
        assert_eq!(Arrived(libc::SIGHUP).meaning(), Meaning::Reload);
        assert_eq!(Arrived(libc::SIGUSR1).meaning(), Meaning::Ignore);
        assert_eq!(Arrived(libc::SIGRTMIN() + 2).meaning(), Meaning::Ignore);
    }

    #[test]
    fn names() {
        assert_eq!(Arrived(libc::SIGHUP).name(), "SIGHUP");
        assert_eq!(Arrived(libc::SIGRTMIN() + 3).name(), "SIGRTMIN+3");
    }

    #[test]
    fn every_catchable_terminating_signal_is_taken_over() {
        let all = terminating();
        for s in [libc::SIGHUP, libc::SIGUSR1, libc::SIGALRM, libc::SIGPWR, libc::SIGRTMAX()] {
            assert!(all.contains(&s), "{s}");
        }
        assert!(!all.contains(&libc::SIGKILL) && !all.contains(&libc::SIGSTOP));
    }
}
