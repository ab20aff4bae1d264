//! WebSocket at the edge: the HTTP upgrade and the frame codec.
pub mod frame;
pub mod upgrade;
