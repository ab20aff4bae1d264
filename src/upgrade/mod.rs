//! Live binary upgrade: handing listeners and established connections,
//! with their TLS and WebSocket state, to a new process.
//!
//! Built so far: the SCM_RIGHTS transport ([`fdpass`]). The handoff protocol,
//! the trigger and adoption follow (issue 4).
pub mod fdpass;
