//! A small device client: mutual TLS with a client certificate, the
//! WebSocket upgrade, then masked frames. Used by `holdfast device`, the
//! quickstart and the tests. Blocking I/O; never used inside holdfast itself.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::ws::frame::{self, Decoder, Event, op};
use crate::ws::upgrade;

#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub addr: SocketAddr,
    pub server_name: String,
    /// PEM file with the CA that signed holdfast's server certificate.
    pub server_ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub path: String,
    pub subprotocols: Vec<String>,
    /// "1.2", "1.3" or None for either.
    pub version: Option<String>,
    /// Restrict to one suite by rustls name, e.g. "TLS13_AES_256_GCM_SHA384".
    pub suite: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Setup(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("server answered HTTP {0}")]
    Http(u16),
    #[error("bad handshake response: {0}")]
    BadResponse(String),
    #[error("websocket: {0}")]
    Ws(String),
}

pub struct Device {
    tls: StreamOwned<ClientConnection, TcpStream>,
    dec: Decoder,
    events: std::collections::VecDeque<Event>,
    pub subprotocol: Option<String>,
    mask_seed: u32,
}

/// The rustls client configuration of a device: its certificate and key,
/// the CA of holdfast's server certificate, and the version and suite asked
/// for (also used by the async client's swarms and tests).
pub fn client_config(o: &DeviceOptions) -> Result<ClientConfig, DeviceError> {
    let setup = |m: String| DeviceError::Setup(m);
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(name) = &o.suite {
        provider.cipher_suites.retain(|s| format!("{:?}", s.suite()) == *name);
        if provider.cipher_suites.is_empty() {
            return Err(setup(format!("unknown suite {name}")));
        }
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match o.version.as_deref() {
        Some("1.2") => vec![&rustls::version::TLS12],
        Some("1.3") => vec![&rustls::version::TLS13],
        _ => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&o.server_ca).map_err(|e| setup(format!("{}: {e}", o.server_ca.display())))? {
        roots.add(c.map_err(|e| setup(e.to_string()))?).map_err(|e| setup(e.to_string()))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&o.cert)
        .map_err(|e| setup(format!("{}: {e}", o.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| setup(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&o.key).map_err(|e| setup(format!("{}: {e}", o.key.display())))?;
    ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&versions)
        .map_err(|e| setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| setup(e.to_string()))
}

/// A mutual-TLS stream to holdfast with the handshake done, before any
/// WebSocket bytes (tests use it to send malformed requests).
pub fn tls_stream(o: &DeviceOptions) -> Result<StreamOwned<ClientConnection, TcpStream>, DeviceError> {
    tls_stream_with(o, Arc::new(client_config(o)?))
}

/// As [`tls_stream`] with a given client configuration (one shared by
/// several connections keeps their session tickets, so they can resume).
pub fn tls_stream_with(o: &DeviceOptions, config: Arc<ClientConfig>) -> Result<StreamOwned<ClientConnection, TcpStream>, DeviceError> {
    let tcp = TcpStream::connect_timeout(&o.addr, o.timeout)?;
    tls_stream_on(o, config, tcp)
}

/// As [`tls_stream_with`] on a TCP connection the caller made (e.g. with
/// a small receive buffer, for a device that reads slowly).
pub fn tls_stream_on(
    o: &DeviceOptions,
    config: Arc<ClientConfig>,
    tcp: TcpStream,
) -> Result<StreamOwned<ClientConnection, TcpStream>, DeviceError> {
    let name = ServerName::try_from(o.server_name.clone()).map_err(|e| DeviceError::Setup(e.to_string()))?;
    let conn = ClientConnection::new(config, name).map_err(|e| DeviceError::Setup(e.to_string()))?;
    tcp.set_read_timeout(Some(o.timeout))?;
    tcp.set_nodelay(true)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

impl Device {
    /// Connects, completes mutual TLS and the WebSocket upgrade.
    pub fn connect(o: &DeviceOptions) -> Result<Device, DeviceError> {
        Device::connect_with(o, Arc::new(client_config(o)?))
    }

    /// As [`Device::connect`] with a shared client configuration.
    pub fn connect_with(o: &DeviceOptions, config: Arc<ClientConfig>) -> Result<Device, DeviceError> {
        let tcp = TcpStream::connect_timeout(&o.addr, o.timeout)?;
        Device::connect_on(o, config, tcp)
    }

    /// As [`Device::connect_with`] on a TCP connection the caller made.
    pub fn connect_on(o: &DeviceOptions, config: Arc<ClientConfig>, tcp: TcpStream) -> Result<Device, DeviceError> {
        let mut tls = tls_stream_on(o, config, tcp)?;
        let mut key = [0u8; 20];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| DeviceError::Setup("no randomness".into()))?;
        let seed = u32::from_be_bytes([key[16], key[17], key[18], key[19]]);
        let key = &key[..16];
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: holdfast-device\r\n",
            o.path, o.server_name
        );
        if !o.subprotocols.is_empty() {
            req.push_str(&format!("Sec-WebSocket-Protocol: {}\r\n", o.subprotocols.join(", ")));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes())?;
        let resp = read_response(&mut tls)?;
        if resp.status != 101 {
            return Err(DeviceError::Http(resp.status));
        }
        if resp.header("sec-websocket-accept") != Some(upgrade::accept_key(&key).as_str()) {
            return Err(DeviceError::BadResponse("wrong Sec-WebSocket-Accept".into()));
        }
        let subprotocol = resp.header("sec-websocket-protocol").map(str::to_string);
        let rest = resp.rest;
        let mut d = Device { tls, dec: Decoder::new(64 << 20, false), events: Default::default(), subprotocol, mask_seed: seed | 1 };
        if !rest.is_empty() {
            let mut ev = Vec::new();
            d.dec.feed(&rest, &mut ev).map_err(|e| DeviceError::Ws(e.to_string()))?;
            d.events.extend(ev);
        }
        Ok(d)
    }

    /// Whether the TLS handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// The negotiated TLS version and suite, e.g. ("TLSv1_3", "TLS13_AES_128_GCM_SHA256").
    pub fn tls_info(&self) -> (String, String) {
        let c = &self.tls.conn;
        (format!("{:?}", c.protocol_version()), c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default())
    }

    fn mask(&mut self) -> [u8; 4] {
        self.mask_seed ^= self.mask_seed << 13;
        self.mask_seed ^= self.mask_seed >> 17;
        self.mask_seed ^= self.mask_seed << 5;
        self.mask_seed.to_be_bytes()
    }

    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), DeviceError> {
        let mut f = Vec::new();
        let m = self.mask();
        frame::encode(&mut f, opcode, payload, Some(m));
        self.tls.write_all(&f)?;
        Ok(())
    }

    pub fn send_text(&mut self, s: &str) -> Result<(), DeviceError> {
        self.send_frame(op::TEXT, s.as_bytes())
    }

    pub fn send_binary(&mut self, b: &[u8]) -> Result<(), DeviceError> {
        self.send_frame(op::BINARY, b)
    }

    /// Seals `plain` into TLS records but writes only the first `cut` bytes
    /// of ciphertext; returns the rest for [`Device::send_ciphertext`]
    /// (tests of a record split across a live upgrade).
    pub fn send_partial_record(&mut self, plain: &[u8], cut: usize) -> Result<Vec<u8>, DeviceError> {
        self.tls.flush()?;
        self.tls.conn.writer().write_all(plain)?;
        let mut ct = Vec::new();
        while self.tls.conn.wants_write() {
            self.tls.conn.write_tls(&mut ct)?;
        }
        let cut = cut.min(ct.len());
        self.tls.sock.write_all(&ct[..cut])?;
        Ok(ct[cut..].to_vec())
    }

    pub fn send_ciphertext(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        self.tls.sock.write_all(bytes)?;
        Ok(())
    }

    /// A masked frame as bytes (to split it by hand).
    pub fn masked_frame(&mut self, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        let m = self.mask();
        frame::encode(&mut f, opcode, payload, Some(m));
        f
    }

    /// Writes raw bytes inside TLS (for tests of malformed frames).
    pub fn send_raw(&mut self, b: &[u8]) -> Result<(), DeviceError> {
        self.tls.write_all(b)?;
        Ok(())
    }

    pub fn close(&mut self, code: u16) -> Result<(), DeviceError> {
        let mut f = Vec::new();
        let m = self.mask();
        frame::encode_close(&mut f, code, "", Some(m));
        self.tls.write_all(&f)?;
        Ok(())
    }

    /// Starts a TLS 1.3 KeyUpdate from the device side.
    pub fn key_update(&mut self) -> Result<(), DeviceError> {
        self.tls.conn.refresh_traffic_keys().map_err(|e| DeviceError::Setup(e.to_string()))?;
        self.tls.flush()?;
        Ok(())
    }

    /// Next event from the server (messages, pings, close).
    pub fn recv(&mut self) -> Result<Event, DeviceError> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(e);
            }
            let mut buf = [0u8; 16384];
            let n = self.tls.read(&mut buf)?;
            if n == 0 {
                return Err(DeviceError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let mut ev = Vec::new();
            self.dec.feed(&buf[..n], &mut ev).map_err(|e| DeviceError::Ws(e.to_string()))?;
            self.events.extend(ev);
        }
    }

    /// Next data message, answering pings on the way.
    pub fn recv_message(&mut self) -> Result<(bool, Vec<u8>), DeviceError> {
        loop {
            match self.recv()? {
                Event::Message { text, data } => return Ok((text, data)),
                Event::Ping(p) => self.send_frame(op::PONG, &p)?,
                Event::Pong(_) => {}
                Event::Close { code, reason } => {
                    return Err(DeviceError::Ws(format!("closed by server: {code:?} {reason}")));
                }
            }
        }
    }

    pub fn recv_text(&mut self) -> Result<String, DeviceError> {
        let (_, d) = self.recv_message()?;
        String::from_utf8(d).map_err(|e| DeviceError::Ws(e.to_string()))
    }

    /// Waits for the server's close frame and returns its code.
    pub fn recv_close(&mut self) -> Result<Option<u16>, DeviceError> {
        loop {
            match self.recv()? {
                Event::Close { code, .. } => return Ok(code),
                _ => continue,
            }
        }
    }
}

/// An HTTP response head, and the bytes that followed it.
pub struct HttpResponse {
    pub status: u16,
    /// Lowercase names.
    pub headers: Vec<(String, String)>,
    pub rest: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Reads an HTTP response head from a stream (through TLS).
pub fn read_response<S: Read>(s: &mut S) -> Result<HttpResponse, DeviceError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(DeviceError::BadResponse("connection closed before a response".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(used)) => {
                let headers =
                    resp.headers.iter().map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned())).collect();
                return Ok(HttpResponse { status: resp.code.unwrap_or(0), headers, rest: buf[used..].to_vec() });
            }
            Ok(httparse::Status::Partial) if buf.len() < 16384 => continue,
            _ => return Err(DeviceError::BadResponse("malformed HTTP response".into())),
        }
    }
}
