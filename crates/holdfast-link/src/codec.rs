//! The WSM link protocol: frame encoding and checked decoding.
//!
//! Owns: the byte layout of every link frame, as specified in
//! `docs/link-protocol.md`. Decoding never panics, rejects trailing bytes and
//! unknown types, and bounds every length by the frame length. Never does I/O
//! and never keeps per-link state (flow control lives in `link::flow`).

use crate::types::{ConnectionId, DeviceIdentity, UpgradeRequest};

/// The newest protocol version this codec speaks (holdfast offers it).
pub const VERSION: u16 = 2;
/// The oldest it still speaks: version 1 has no device labels.
pub const MIN_VERSION: u16 = 1;
/// The first version with device labels (OPEN flag 0x02, LABELS).
pub const LABELS_VERSION: u16 = 2;
/// Bytes before the payload: length (4), type (1), flags (1), stream (4).
pub const HEADER_LEN: usize = 10;
/// Frames larger than this are a protocol error unless both sides agree otherwise.
pub const DEFAULT_MAX_FRAME: u32 = 16 << 20;

/// Bytes a MESSAGE frame's length field counts besides its payload (type,
/// flags, stream ID).
pub const MESSAGE_OVERHEAD: u32 = 6;

/// The largest frame any holdfast sends: a message of the largest
/// `websocket.max_message_bytes` it allows (64 MiB) with its header. A WSM
/// that announces and accepts this never has to refuse a device message.
pub const LARGEST_FRAME: u32 = (64 << 20) + MESSAGE_OVERHEAD;

/// Whether a MESSAGE with `payload` bytes fits a peer's `max_frame`.
pub fn message_fits(payload: usize, max_frame: u32) -> bool {
    payload as u64 + MESSAGE_OVERHEAD as u64 <= max_frame as u64
}

pub mod ty {
    pub const HELLO: u8 = 0x01;
    pub const OPEN: u8 = 0x02;
    pub const ACCEPT: u8 = 0x03;
    pub const REFUSE: u8 = 0x04;
    pub const MESSAGE: u8 = 0x05;
    pub const CLOSE: u8 = 0x06;
    pub const CREDIT: u8 = 0x07;
    pub const PING: u8 = 0x08;
    pub const PONG: u8 = 0x09;
    pub const GOAWAY: u8 = 0x0a;
    pub const HANDOFF: u8 = 0x0b;
    pub const HANDOFF_ACK: u8 = 0x0c;
    /// Version 2: a stream's device labels changed.
    pub const LABELS: u8 = 0x0d;
}

/// Flag bits.
pub const FLAG_BINARY: u8 = 0x01; // MESSAGE
pub const FLAG_RESUMED: u8 = 0x01; // OPEN
/// Version 2: the OPEN ends with the device's labels.
pub const FLAG_LABELS: u8 = 0x02; // OPEN

/// Why a stream closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The device closed or its connection failed (holdfast -> WSM).
    DeviceGone = 0,
    /// The stream moved to another process or WSM; the device is still connected.
    HandedElsewhere = 1,
    /// The WSM ends the device's connection (WSM -> holdfast).
    WsmClosed = 2,
    /// A protocol or internal error ended the stream.
    Error = 3,
}

impl CloseReason {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => CloseReason::DeviceGone,
            1 => CloseReason::HandedElsewhere,
            2 => CloseReason::WsmClosed,
            3 => CloseReason::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// 0 = holdfast, 1 = WSM.
    pub role: u8,
    pub node: String,
    pub shard: u16,
    /// Credit (bytes) the sender grants the peer on each new stream.
    pub stream_window: u32,
    /// Credit (bytes) the sender grants the peer for the whole link.
    pub link_window: u32,
    /// Largest frame the sender accepts.
    pub max_frame: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub resumed: bool,
    pub connection_id: ConnectionId,
    pub device: DeviceIdentity,
    pub request: UpgradeRequest,
    /// The device's labels (e.g. `quarantine`), version 2 only: encoded
    /// (with flag 0x02) only when not empty.
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Open {
        stream: u32,
        open: Box<Open>,
    },
    Accept {
        stream: u32,
        subprotocol: Option<String>,
    },
    Refuse {
        stream: u32,
        status: u16,
        reason: String,
    },
    Message {
        stream: u32,
        binary: bool,
        data: Vec<u8>,
    },
    Close {
        stream: u32,
        reason: CloseReason,
        code: u16,
        text: String,
    },
    /// `stream == 0` grants link-level credit.
    Credit {
        stream: u32,
        bytes: u32,
    },
    Ping(u64),
    Pong(u64),
    GoAway {
        code: u8,
        text: String,
    },
    /// holdfast -> WSM: stop sending on this stream; answer `HandoffAck`
    /// after the last MESSAGE for it (the stream is about to move).
    Handoff {
        stream: u32,
    },
    /// WSM -> holdfast: nothing more will be sent on this stream.
    HandoffAck {
        stream: u32,
    },
    /// holdfast -> WSM, version 2: the device's labels are now these
    /// (replacing those of its OPEN or an earlier LABELS).
    Labels {
        stream: u32,
        labels: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u32),
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("stream id {0} not allowed for this frame type")]
    BadStream(u32),
}

/// A checked view of untrusted bytes.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LinkError> {
        if self.b.len() < n {
            return Err(LinkError::Malformed(self.what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, LinkError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, LinkError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, LinkError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, LinkError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self) -> Result<String, LinkError> {
        let n = self.u16()? as usize;
        let what = self.what;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| LinkError::Malformed(what))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, LinkError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn strs(&mut self) -> Result<Vec<String>, LinkError> {
        let n = self.u16()?;
        (0..n).map(|_| self.str()).collect()
    }
    fn end(&self) -> Result<(), LinkError> {
        if self.b.is_empty() { Ok(()) } else { Err(LinkError::Malformed(self.what)) }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Strings are at most 65535 bytes; longer ones are cut at a char boundary.
    let mut end = s.len().min(0xffff);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn put_strs<'a>(out: &mut Vec<u8>, v: impl ExactSizeIterator<Item = &'a str>) {
    out.extend_from_slice(&(v.len().min(0xffff) as u16).to_be_bytes());
    for s in v.take(0xffff) {
        put_str(out, s);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Writes a frame header; returns the offset of the length field to patch.
fn begin(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, ty, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    at
}

fn finish(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends just the header of a MESSAGE frame whose `len` payload bytes the
/// caller appends next (saves a copy on the hot path).
pub fn message_header(out: &mut Vec<u8>, stream: u32, binary: bool, len: usize) {
    out.extend_from_slice(&((len + 6) as u32).to_be_bytes());
    out.extend_from_slice(&[ty::MESSAGE, if binary { FLAG_BINARY } else { 0 }]);
    out.extend_from_slice(&stream.to_be_bytes());
}

impl Frame {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello(h) => {
                let at = begin(out, ty::HELLO, 0, 0);
                out.extend_from_slice(&h.version.to_be_bytes());
                out.push(h.role);
                put_str(out, &h.node);
                out.extend_from_slice(&h.shard.to_be_bytes());
                out.extend_from_slice(&h.stream_window.to_be_bytes());
                out.extend_from_slice(&h.link_window.to_be_bytes());
                out.extend_from_slice(&h.max_frame.to_be_bytes());
                finish(out, at);
            }
            Frame::Open { stream, open } => {
                let flags = if open.resumed { FLAG_RESUMED } else { 0 } | if open.labels.is_empty() { 0 } else { FLAG_LABELS };
                let at = begin(out, ty::OPEN, flags, *stream);
                out.extend_from_slice(&open.connection_id.0.to_be_bytes());
                let d = &open.device;
                put_str(out, &d.addr);
                put_str(out, &d.subject);
                put_str(out, &d.issuer);
                put_str(out, &d.serial);
                out.extend_from_slice(&d.fingerprint);
                put_strs(out, d.sans.iter().map(String::as_str));
                out.extend_from_slice(&(d.chain.len().min(0xffff) as u16).to_be_bytes());
                for c in d.chain.iter().take(0xffff) {
                    put_bytes(out, c);
                }
                let r = &open.request;
                put_str(out, &r.path);
                put_str(out, &r.query);
                out.extend_from_slice(&(r.headers.len().min(0xffff) as u16).to_be_bytes());
                for (k, v) in r.headers.iter().take(0xffff) {
                    put_str(out, k);
                    put_str(out, v);
                }
                put_strs(out, r.subprotocols.iter().map(String::as_str));
                if !open.labels.is_empty() {
                    put_strs(out, open.labels.iter().map(String::as_str));
                }
                finish(out, at);
            }
            Frame::Labels { stream, labels } => {
                let at = begin(out, ty::LABELS, 0, *stream);
                put_strs(out, labels.iter().map(String::as_str));
                finish(out, at);
            }
            Frame::Accept { stream, subprotocol } => {
                let at = begin(out, ty::ACCEPT, 0, *stream);
                put_str(out, subprotocol.as_deref().unwrap_or(""));
                finish(out, at);
            }
            Frame::Refuse { stream, status, reason } => {
                let at = begin(out, ty::REFUSE, 0, *stream);
                out.extend_from_slice(&status.to_be_bytes());
                put_str(out, reason);
                finish(out, at);
            }
            Frame::Message { stream, binary, data } => {
                message_header(out, *stream, *binary, data.len());
                out.extend_from_slice(data);
            }
            Frame::Close { stream, reason, code, text } => {
                let at = begin(out, ty::CLOSE, 0, *stream);
                out.push(*reason as u8);
                out.extend_from_slice(&code.to_be_bytes());
                put_str(out, text);
                finish(out, at);
            }
            Frame::Credit { stream, bytes } => {
                let at = begin(out, ty::CREDIT, 0, *stream);
                out.extend_from_slice(&bytes.to_be_bytes());
                finish(out, at);
            }
            Frame::Ping(v) | Frame::Pong(v) => {
                let t = if matches!(self, Frame::Ping(_)) { ty::PING } else { ty::PONG };
                let at = begin(out, t, 0, 0);
                out.extend_from_slice(&v.to_be_bytes());
                finish(out, at);
            }
            Frame::Handoff { stream } => {
                let at = begin(out, ty::HANDOFF, 0, *stream);
                finish(out, at);
            }
            Frame::HandoffAck { stream } => {
                let at = begin(out, ty::HANDOFF_ACK, 0, *stream);
                finish(out, at);
            }
            Frame::GoAway { code, text } => {
                let at = begin(out, ty::GOAWAY, 0, 0);
                out.push(*code);
                put_str(out, text);
                finish(out, at);
            }
        }
    }

    /// Decodes the first frame of `buf`. `Ok(None)`: incomplete. On success,
    /// returns the frame and the bytes it took.
    pub fn decode(buf: &[u8], max_frame: u32) -> Result<Option<(Frame, usize)>, LinkError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if len > max_frame {
            return Err(LinkError::TooLarge(len));
        }
        if len < 6 {
            return Err(LinkError::Malformed("header"));
        }
        let total = 4 + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let (t, flags) = (buf[4], buf[5]);
        let stream = u32::from_be_bytes([buf[6], buf[7], buf[8], buf[9]]);
        let payload = &buf[HEADER_LEN..total];
        Ok(Some((Self::decode_payload(t, flags, stream, payload)?, total)))
    }

    fn decode_payload(t: u8, flags: u8, stream: u32, p: &[u8]) -> Result<Frame, LinkError> {
        let link_level = matches!(t, ty::HELLO | ty::PING | ty::PONG | ty::GOAWAY);
        let stream_level =
            matches!(t, ty::OPEN | ty::ACCEPT | ty::REFUSE | ty::MESSAGE | ty::CLOSE | ty::HANDOFF | ty::HANDOFF_ACK | ty::LABELS);
        if (link_level && stream != 0) || (stream_level && stream == 0) {
            return Err(LinkError::BadStream(stream));
        }
        let name = match t {
            ty::HELLO => "HELLO",
            ty::OPEN => "OPEN",
            ty::ACCEPT => "ACCEPT",
            ty::REFUSE => "REFUSE",
            ty::MESSAGE => "MESSAGE",
            ty::CLOSE => "CLOSE",
            ty::CREDIT => "CREDIT",
            ty::PING => "PING",
            ty::PONG => "PONG",
            ty::GOAWAY => "GOAWAY",
            ty::HANDOFF => "HANDOFF",
            ty::HANDOFF_ACK => "HANDOFF_ACK",
            ty::LABELS => "LABELS",
            other => return Err(LinkError::UnknownType(other)),
        };
        let allowed = match t {
            ty::OPEN => FLAG_RESUMED | FLAG_LABELS,
            ty::MESSAGE => FLAG_BINARY,
            _ => 0,
        };
        if flags & !allowed != 0 {
            return Err(LinkError::Malformed(name));
        }
        let mut r = Reader { b: p, what: name };
        let f = match t {
            ty::HELLO => Frame::Hello(Hello {
                version: r.u16()?,
                role: r.u8()?,
                node: r.str()?,
                shard: r.u16()?,
                stream_window: r.u32()?,
                link_window: r.u32()?,
                max_frame: r.u32()?,
            }),
            ty::OPEN => {
                let mut id = [0u8; 16];
                id.copy_from_slice(r.take(16)?);
                let addr = r.str()?;
                let subject = r.str()?;
                let issuer = r.str()?;
                let serial = r.str()?;
                let mut fingerprint = [0u8; 32];
                fingerprint.copy_from_slice(r.take(32)?);
                let sans = r.strs()?;
                let n = r.u16()?;
                let chain = (0..n).map(|_| r.bytes()).collect::<Result<_, _>>()?;
                let path = r.str()?;
                let query = r.str()?;
                let n = r.u16()?;
                let headers = (0..n).map(|_| Ok((r.str()?, r.str()?))).collect::<Result<_, LinkError>>()?;
                let subprotocols = r.strs()?;
                // The flag means "labels follow": an empty list would have
                // two encodings, so it is malformed (the encoder never sends it).
                let labels = if flags & FLAG_LABELS != 0 { r.strs()? } else { Vec::new() };
                if flags & FLAG_LABELS != 0 && labels.is_empty() {
                    return Err(LinkError::Malformed("OPEN"));
                }
                Frame::Open {
                    stream,
                    open: Box::new(Open {
                        resumed: flags & FLAG_RESUMED != 0,
                        connection_id: ConnectionId(u128::from_be_bytes(id)),
                        device: DeviceIdentity { subject, issuer, serial, sans, fingerprint, chain, addr },
                        request: UpgradeRequest { path, query, headers, subprotocols, key: String::new() },
                        labels,
                    }),
                }
            }
            ty::ACCEPT => {
                let s = r.str()?;
                Frame::Accept { stream, subprotocol: (!s.is_empty()).then_some(s) }
            }
            ty::REFUSE => Frame::Refuse { stream, status: r.u16()?, reason: r.str()? },
            ty::MESSAGE => {
                let data = r.take(p.len())?.to_vec();
                Frame::Message { stream, binary: flags & FLAG_BINARY != 0, data }
            }
            ty::CLOSE => {
                let reason = CloseReason::from_u8(r.u8()?).ok_or(LinkError::Malformed("CLOSE"))?;
                Frame::Close { stream, reason, code: r.u16()?, text: r.str()? }
            }
            ty::CREDIT => Frame::Credit { stream, bytes: r.u32()? },
            ty::PING => Frame::Ping(r.u64()?),
            ty::PONG => Frame::Pong(r.u64()?),
            ty::HANDOFF => Frame::Handoff { stream },
            ty::HANDOFF_ACK => Frame::HandoffAck { stream },
            ty::LABELS => Frame::Labels { stream, labels: r.strs()? },
            _ => Frame::GoAway { code: r.u8()?, text: r.str()? },
        };
        r.end()?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests;
