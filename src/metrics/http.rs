//! The metrics endpoint: `GET /metrics`, `/healthz` and `/readyz` on a
//! thread of its own.
//!
//! Owns: the listening socket (SO_REUSEPORT, so a live upgrade's successor
//! binds the same address while the old process still answers), a minimal
//! HTTP/1.1 exchange per connection, the format a scraper's `Accept` asks
//! for, and the meaning of health and readiness. Never touches a shard: it reads atomics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;

use super::export::{self, Sources};

/// `/healthz`: every shard thread is running.
pub fn healthy(src: &Sources) -> Result<(), String> {
    let dead: Vec<usize> = src.shards.iter().enumerate().filter(|(_, m)| !m.alive.load(Relaxed)).map(|(i, _)| i).collect();
    if dead.is_empty() { Ok(()) } else { Err(format!("shard(s) {dead:?} stopped")) }
}

/// `/readyz`: alive, every shard accepting, and at least one WSM link up
/// (a load balancer should send devices only to a node that can serve
/// them; during a live upgrade the old process stops being ready).
pub fn ready(src: &Sources) -> Result<(), String> {
    healthy(src)?;
    let idle: Vec<usize> = src.shards.iter().enumerate().filter(|(_, m)| m.accept_loops.load(Relaxed) == 0).map(|(i, _)| i).collect();
    if !idle.is_empty() {
        return Err(format!("shard(s) {idle:?} not accepting"));
    }
    if src.shards.iter().map(|m| m.links_up()).sum::<u64>() == 0 {
        return Err("no WSM link up".into());
    }
    Ok(())
}

/// Serves on its own thread; returns the bound address.
pub fn serve(addr: SocketAddr, src: Sources) -> std::io::Result<SocketAddr> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(64)?;
    let listener: TcpListener = sock.into();
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("holdfast-metrics".into()).spawn(move || {
        for s in listener.incoming().flatten() {
            answer(s, &src);
        }
    })?;
    Ok(local)
}

fn answer(mut s: TcpStream, src: &Sources) {
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(std::time::Duration::from_secs(10)));
    let mut req = [0u8; 2048];
    let mut n = 0;
    // Read until the end of the request head (or the buffer is full).
    while n < req.len() {
        match s.read(&mut req[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        if req[..n].windows(4).any(|w| w == b"\r\n\r\n") || req[..n].windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&req[..n]);
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let accept = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("accept").then(|| v.trim())
    });
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") if export::wants_prometheus_text(accept) => {
            ("200 OK", export::CONTENT_TYPE_TEXT, export::render_prometheus_text(src))
        }
        ("GET" | "HEAD", "/metrics") => ("200 OK", export::CONTENT_TYPE, export::render(src)),
        ("GET" | "HEAD", "/healthz") => match healthy(src) {
            Ok(()) => ("200 OK", "text/plain", "ok\n".into()),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        ("GET" | "HEAD", "/readyz") => match ready(src) {
            Ok(()) => ("200 OK", "text/plain", "ready\n".into()),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("not ready: {e}\n")),
        },
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found: try /metrics, /healthz or /readyz\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET and HEAD\n".into()),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = s.write_all(body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{NodeMetrics, ShardMetrics};
    use std::sync::Arc;

    #[test]
    fn ready_needs_every_shard_accepting_and_a_link() {
        let a = Arc::new(ShardMetrics::new(&[]));
        let b = Arc::new(ShardMetrics::new(&[]));
        let src = Sources { shards: vec![a.clone(), b.clone()], node: Arc::new(NodeMetrics::default()) };
        assert!(healthy(&src).is_ok());
        assert!(ready(&src).unwrap_err().contains("not accepting"));
        ShardMetrics::inc(&a.accept_loops);
        ShardMetrics::inc(&b.accept_loops);
        assert_eq!(ready(&src).unwrap_err(), "no WSM link up");
        let link = b.wsm("127.0.0.1:9000");
        ShardMetrics::inc(&link.links_up);
        assert!(ready(&src).is_ok());
        drop(crate::metrics::AliveGuard(b));
        assert!(healthy(&src).unwrap_err().contains("[1]"));
        assert!(ready(&src).is_err());
    }
}
