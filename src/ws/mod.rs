//! WebSocket at the edge: the HTTP upgrade and the frame codec.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]
pub mod frame;
pub mod upgrade;
