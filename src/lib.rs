//! holdfast: an io_uring edge proxy that holds long-lived device WebSockets
//! over mutual TLS and tunnels them to WSM hosts over multiplexed links.
pub mod config;
pub mod device;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod shard;
pub mod tls;
pub mod ws;
pub mod wsm;
