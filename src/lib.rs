//! holdfast: an io_uring edge proxy that holds long-lived device WebSockets
//! over mutual TLS and tunnels them to WSM hosts over multiplexed links.
pub mod config;
pub mod identity;
pub mod link;
pub mod tls;
pub mod ws;
pub mod shard {
    pub mod pool;
}
