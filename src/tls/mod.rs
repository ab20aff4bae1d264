//! TLS termination: rustls does the handshake, holdfast's record layer the rest.
#![forbid(unsafe_code)]
pub mod blocklist;
pub mod certmap;
pub mod handshake;
pub mod hello;
pub mod keys;
pub mod labels;
pub mod record;
pub mod refusal;
pub mod server;
pub mod tickets;
pub mod verify;
