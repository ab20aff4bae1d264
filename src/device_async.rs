//! An async device client: rustls driven by hand over monoio's owned-buffer
//! I/O, so thousands of devices share one thread (benchmark swarms and scale
//! tests). Never used inside holdfast itself.
//! Connects from a chosen 127.0.0.x source address (to spread over ephemeral
//! port ranges), does mutual TLS and the WebSocket upgrade, sends masked
//! frames and reads echoes.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::ws::frame::{self, Decoder, Event, op};
use base64::Engine;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::ClientConnection;
use rustls::pki_types::ServerName;

/// Why a device failed, for the error table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum ErrorKind {
    Connect,
    Tls,
    Upgrade,
    Closed,
    Timeout,
    Protocol,
}

#[derive(Debug)]
pub struct Failure(pub ErrorKind, pub String);

fn fail<E: std::fmt::Display>(k: ErrorKind) -> impl Fn(E) -> Failure {
    move |e| Failure(k, e.to_string())
}

pub struct WsClient {
    /// The close code holdfast sent, once a close frame arrived (`Some(None)`: without a code).
    pub closed_with: Option<Option<u16>>,
    tcp: TcpStream,
    tls: ClientConnection,
    dec: Decoder,
    events: std::collections::VecDeque<Event>,
    rbuf: Vec<u8>,
    mask: u32,
}

/// Connects a TCP socket from `src` (port chosen by the kernel) to `dst`.
async fn connect_from(src: Option<std::net::IpAddr>, dst: SocketAddr) -> Result<TcpStream, Failure> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(fail(ErrorKind::Connect))?;
    if let Some(ip) = src {
        // IP_BIND_ADDRESS_NO_PORT: the kernel picks the port at connect
        // time, per destination, so each source address has the full range.
        let one: nix::libc::c_int = 1;
        // SAFETY: setsockopt reads one int from a valid pointer.
        unsafe {
            nix::libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                nix::libc::IPPROTO_IP,
                24,
                &one as *const _ as *const nix::libc::c_void,
                4,
            );
        }
        s.bind(&SocketAddr::new(ip, 0).into()).map_err(fail(ErrorKind::Connect))?;
    }
    s.set_nonblocking(true).map_err(fail(ErrorKind::Connect))?;
    s.set_tcp_nodelay(true).map_err(fail(ErrorKind::Connect))?;
    match s.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(Failure(ErrorKind::Connect, e.to_string())),
    }
    let std: std::net::TcpStream = s.into();
    let tcp = TcpStream::from_std(std).map_err(fail(ErrorKind::Connect))?;
    tcp.writable(false).await.map_err(fail(ErrorKind::Connect))?;
    let mut err: nix::libc::c_int = 0;
    let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
    // SAFETY: getsockopt(SO_ERROR) writes one int into a valid pointer.
    unsafe {
        nix::libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&tcp),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_ERROR,
            &mut err as *mut _ as *mut nix::libc::c_void,
            &mut len,
        );
    }
    if err != 0 {
        return Err(Failure(ErrorKind::Connect, std::io::Error::from_raw_os_error(err).to_string()));
    }
    Ok(tcp)
}

impl WsClient {
    pub async fn connect(
        config: Arc<rustls::ClientConfig>,
        src: Option<std::net::IpAddr>,
        dst: SocketAddr,
        path: &str,
    ) -> Result<WsClient, Failure> {
        let tcp = connect_from(src, dst).await?;
        let name = ServerName::try_from("localhost").map_err(fail(ErrorKind::Tls))?;
        let tls = ClientConnection::new(config, name).map_err(fail(ErrorKind::Tls))?;
        let mut c = WsClient {
            closed_with: None,
            tcp,
            tls,
            dec: Decoder::new(16 << 20, false),
            events: Default::default(),
            rbuf: Vec::with_capacity(16 * 1024),
            mask: 0x9e37_79b9,
        };
        while c.tls.is_handshaking() {
            c.flush().await?;
            if c.tls.is_handshaking() {
                c.fill(ErrorKind::Tls).await?;
            }
        }
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        c.tls.writer().write_all(req.as_bytes()).map_err(fail(ErrorKind::Upgrade))?;
        c.flush().await?;
        let mut head = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            match c.tls.reader().read(&mut chunk) {
                Ok(0) => return Err(Failure(ErrorKind::Upgrade, "closed during upgrade".into())),
                Ok(n) => head.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => c.fill(ErrorKind::Upgrade).await?,
                Err(e) => return Err(Failure(ErrorKind::Upgrade, e.to_string())),
            }
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                if !head.starts_with(b"HTTP/1.1 101") {
                    // The status line, and when to come back if it says.
                    let text = String::from_utf8_lossy(&head[..end]).into_owned();
                    let mut lines = text.split("\r\n");
                    let mut line = lines.next().unwrap_or("").to_string();
                    if let Some(r) = lines.find(|l| l.to_ascii_lowercase().starts_with("retry-after:")) {
                        line.push_str("; ");
                        line.push_str(r);
                    }
                    return Err(Failure(ErrorKind::Upgrade, line));
                }
                let rest = head[end + 4..].to_vec();
                let mut ev = Vec::new();
                c.dec.feed(&rest, &mut ev).map_err(fail(ErrorKind::Protocol))?;
                c.events.extend(ev);
                return Ok(c);
            }
        }
    }

    /// Whether rustls resumed a session for this connection.
    pub fn resumed(&self) -> bool {
        matches!(self.tls.handshake_kind(), Some(rustls::HandshakeKind::Resumed))
    }

    async fn flush(&mut self) -> Result<(), Failure> {
        while self.tls.wants_write() {
            let mut out = Vec::new();
            self.tls.write_tls(&mut out).map_err(fail(ErrorKind::Tls))?;
            let (r, _) = self.tcp.write_all(out).await;
            r.map_err(fail(ErrorKind::Closed))?;
        }
        Ok(())
    }

    async fn fill(&mut self, kind: ErrorKind) -> Result<(), Failure> {
        let mut buf = std::mem::take(&mut self.rbuf);
        buf.clear();
        let (r, b) = self.tcp.read(buf).await;
        buf = b;
        let n = r.map_err(fail(ErrorKind::Closed))?;
        if n == 0 {
            self.rbuf = buf;
            return Err(Failure(ErrorKind::Closed, "peer closed".into()));
        }
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            self.tls.read_tls(&mut rd).map_err(fail(kind))?;
            self.tls.process_new_packets().map_err(fail(kind))?;
        }
        self.rbuf = buf;
        Ok(())
    }

    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<(), Failure> {
        self.mask = self.mask.rotate_left(5) ^ 0x5bd1_e995;
        let mut f = Vec::with_capacity(payload.len() + 14);
        frame::encode(&mut f, opcode, payload, Some(self.mask.to_be_bytes()));
        self.tls.writer().write_all(&f).map_err(fail(ErrorKind::Tls))?;
        self.flush().await
    }

    /// Next data message (pings answered).
    pub async fn recv(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            while let Some(ev) = self.events.pop_front() {
                match ev {
                    Event::Message { data, .. } => return Ok(data),
                    Event::Ping(p) => self.send(op::PONG, &p).await?,
                    Event::Pong(_) => {}
                    Event::Close { code, .. } => {
                        self.closed_with = Some(code);
                        return Err(Failure(ErrorKind::Closed, format!("close {code:?}")));
                    }
                }
            }
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                match self.tls.reader().read(&mut chunk) {
                    // close_notify: but first what arrived before it (a close frame).
                    Ok(0) if !self.events.is_empty() => break,
                    Ok(0) => return Err(Failure(ErrorKind::Closed, "TLS closed".into())),
                    Ok(n) => {
                        let mut ev = Vec::new();
                        self.dec.feed(&chunk[..n], &mut ev).map_err(fail(ErrorKind::Protocol))?;
                        self.events.extend(ev);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(Failure(ErrorKind::Closed, e.to_string())),
                }
            }
            if self.events.is_empty() {
                self.fill(ErrorKind::Closed).await?;
            }
        }
    }

    /// Sends a close frame and close_notify, then drops the socket.
    pub async fn close(mut self) {
        let _ = self.send(op::CLOSE, &1000u16.to_be_bytes()).await;
        self.tls.send_close_notify();
        let _ = self.flush().await;
    }
}
