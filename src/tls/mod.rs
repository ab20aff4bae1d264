//! TLS termination: rustls does the handshake, holdfast's record layer the rest.
pub mod keys;
pub mod record;
