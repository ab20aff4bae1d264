//! The sans-io core of a device connection.
//!
//! Owns: every protocol decision about one device connection: its set-up
//! stages, handshaking -> upgrading -> opening ([`connection`]), how it ends
//! and who is to blame ([`end`]), the set-up answers (HTTP statuses for a
//! refused upgrade or a WSM's answer, [`setup`]), the established
//! tunnel ([`tunnel`]) and what it keeps to resume its stream ([`resume`]). Fed bytes, link events and `now`; returns actions.
//! Never does I/O and never reads the clock: `shard` (the io_uring shell)
//! performs what it asks.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

pub mod connection;
pub mod end;
#[cfg(test)]
pub mod harness;
pub mod resume;
pub mod setup;
pub mod tunnel;

pub use end::End;
