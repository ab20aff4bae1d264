//! Live binary upgrade: handing listeners and established connections,
//! with their TLS and WebSocket state, to a new process.
//!
//! [`fdpass`] carries descriptors, [`handoff`] the messages and the listener
//! handoff, [`snapshot`] a connection's state, and [`coordinator`] runs both
//! sides around a running proxy. See `docs/upgrade.md`.
pub mod coordinator;
pub mod fdpass;
pub mod handoff;
pub mod notify;
pub mod snapshot;
