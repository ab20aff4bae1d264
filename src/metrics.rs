//! Per-shard counters and the Prometheus text endpoint.
//!
//! Owns: one block of relaxed atomic counters per shard (each written only by
//! its shard's thread, read by the exporter), and rendering them as
//! Prometheus text with a `shard` label. Never blocks a shard: the exporter
//! runs on its own thread and only loads atomics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::tls::handshake::Refusal;

macro_rules! counters {
    ($( $name:ident : $kind:literal, $help:literal; )*) => {
        #[derive(Default, Debug)]
        pub struct ShardMetrics {
            $( pub $name: AtomicU64, )*
            /// Handshake refusals, indexed like `Refusal::ALL`.
            pub refused: [AtomicU64; 6],
            /// WebSocket closes holdfast sent for bad device input, by close code.
            pub ws_closed_1002: AtomicU64,
            pub ws_closed_1007: AtomicU64,
            pub ws_closed_1009: AtomicU64,
        }

        impl ShardMetrics {
            fn render_into(&self, shard: usize, out: &mut Vec<(String, &'static str, &'static str, u64)>) {
                $( out.push((format!("holdfast_{}{{shard=\"{shard}\"}}", stringify!($name)), $kind, $help, self.$name.load(Relaxed))); )*
                for (i, r) in Refusal::ALL.iter().enumerate() {
                    out.push((format!("holdfast_handshake_refused_total{{shard=\"{shard}\",reason=\"{}\"}}", r.label()), "counter", "TLS handshakes refused, by reason", self.refused[i].load(Relaxed)));
                }
                for (code, c) in [(1002, &self.ws_closed_1002), (1007, &self.ws_closed_1007), (1009, &self.ws_closed_1009)] {
                    out.push((format!("holdfast_ws_error_closes_total{{shard=\"{shard}\",code=\"{code}\"}}"), "counter", "WebSocket connections closed for bad device input, by close code", c.load(Relaxed)));
                }
            }
        }
    };
}

counters! {
    connections_accepted_total: "counter", "TCP connections accepted";
    connections_active: "gauge", "device connections currently held";
    connections_handed_over_total: "counter", "connections moved to a new process by a live upgrade";
    connections_adopted_total: "counter", "connections taken over from the previous process by a live upgrade";
    connections_resumed_total: "counter", "adopted connections serving again (stream re-opened on a WSM)";
    connections_resume_failed_total: "counter", "adopted connections that could not re-open a stream (closed with 1013)";
    handshakes_completed_total: "counter", "mutual TLS handshakes completed";
    upgrades_completed_total: "counter", "WebSocket upgrades answered 101";
    upgrades_rejected_total: "counter", "upgrade requests answered 4xx";
    wsm_unavailable_total: "counter", "devices answered 503 because no WSM link was up";
    wsm_refused_total: "counter", "streams refused by a WSM";
    wsm_open_timeouts_total: "counter", "streams the WSM did not answer in time";
    messages_from_devices_total: "counter", "WebSocket messages forwarded to WSMs";
    messages_to_devices_total: "counter", "WebSocket messages delivered to devices";
    tls_record_errors_total: "counter", "connections closed for a bad TLS record";
    key_updates_sent_total: "counter", "TLS 1.3 KeyUpdates sent by holdfast";
    key_updates_received_total: "counter", "TLS 1.3 KeyUpdates received from devices";
    idle_timeouts_total: "counter", "connections closed for inactivity";
    links_up: "gauge", "WSM links currently up";
    link_connects_total: "counter", "WSM link connections established";
    link_liveness_failures_total: "counter", "WSM links failed because nothing arrived within the liveness timeout";
    streams_detached_total: "counter", "streams whose WSM went away (link lost or goaway), to be resumed elsewhere";
    streams_moved_total: "counter", "streams moved off a WSM that sent goaway (HANDOFF, ack, close)";
    streams_resumed_total: "counter", "detached streams re-opened on another WSM with their held messages sent";
    streams_resume_failed_total: "counter", "detached streams no WSM took within resume_timeout (device closed with 1013)";
    messages_resent_total: "counter", "device messages sent again after their WSM died before acknowledging them";
    held_bytes: "gauge", "bytes of device messages held for streams without a WSM";
    link_failures_total: "counter", "WSM link connection attempts or links that failed";
    pool_exhausted_total: "counter", "times a connection waited for an I/O buffer";
    buffers_in_use: "gauge", "I/O buffers currently lent out";
    accept_loops: "gauge", "listening sockets this shard is accepting on";
    tunnel_state_bytes: "gauge", "bytes of per-connection state held by established tunnels (Tunnel, StreamShared, key material; not runtime or kernel)";
}

impl ShardMetrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Relaxed);
    }

    pub fn refusal(&self, r: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|x| *x == r) {
            Self::inc(&self.refused[i]);
        }
    }

    pub fn ws_error(&self, code: u16) {
        match code {
            1002 => Self::inc(&self.ws_closed_1002),
            1007 => Self::inc(&self.ws_closed_1007),
            1009 => Self::inc(&self.ws_closed_1009),
            _ => {}
        }
    }
}

/// Renders all shards as Prometheus text.
pub fn render(shards: &[Arc<ShardMetrics>]) -> String {
    let mut rows = Vec::new();
    for (i, m) in shards.iter().enumerate() {
        m.render_into(i, &mut rows);
    }
    let mut out = String::new();
    let mut last = String::new();
    for (series, kind, help, v) in rows {
        let name = series.split('{').next().unwrap_or("").to_string();
        if name != last && !out.contains(&format!("# TYPE {name} ")) {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        }
        out.push_str(&format!("{series} {v}\n"));
        last = name;
    }
    out
}

/// Serves GET /metrics on its own thread.
pub fn serve(addr: SocketAddr, shards: Vec<Arc<ShardMetrics>>) -> std::io::Result<SocketAddr> {
    // SO_REUSEPORT: during a live upgrade the new process binds the same
    // address while the old one still serves it.
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(64)?;
    let listener: TcpListener = sock.into();
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("holdfast-metrics".into()).spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut req = [0u8; 1024];
            let n = s.read(&mut req).unwrap_or(0);
            let ok = req[..n].starts_with(b"GET /metrics");
            let (status, body) = if ok { ("200 OK", render(&shards)) } else { ("404 Not Found", "not found\n".to_string()) };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_series_with_one_header_each() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        ShardMetrics::inc(&a.connections_accepted_total);
        b.refusal(Refusal::Blocked);
        let text = render(&[a, b]);
        assert!(text.contains("holdfast_connections_accepted_total{shard=\"0\"} 1\n"));
        assert!(text.contains("holdfast_handshake_refused_total{shard=\"1\",reason=\"blocked\"} 1\n"));
        assert_eq!(text.matches("# TYPE holdfast_connections_accepted_total counter").count(), 1);
    }
}
