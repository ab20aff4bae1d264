//! Live binary upgrade: handing listeners and established connections,
//! with their TLS and WebSocket state, to a new process.
//!
//! Built so far: the SCM_RIGHTS transport ([`fdpass`]) and the listener
//! handoff ([`handoff`]): SIGUSR2 starts the new binary, which takes over the
//! listening sockets with no accept-queue loss. Moving established
//! connections is the next stage (issue 4); until then the old process keeps
//! serving the connections it holds and exits when they are gone.
pub mod fdpass;
pub mod handoff;
pub mod snapshot;
