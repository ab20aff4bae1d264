//! WebSocket frames (RFC 6455 section 5): a streaming decoder and an encoder.
//!
//! Owns: frame headers, masking, fragmentation and message reassembly up to a
//! limit, control frames, close payloads, UTF-8 checks for text. Decoding
//! never panics and yields only messages that were sent whole. Errors carry
//! the close code to send (1002, 1007, 1009). Never does I/O and never decides
//! what to do with a message.

/// Opcodes.
pub mod op {
    pub const CONT: u8 = 0;
    pub const TEXT: u8 = 1;
    pub const BINARY: u8 = 2;
    pub const CLOSE: u8 = 8;
    pub const PING: u8 = 9;
    pub const PONG: u8 = 10;
}

/// Close codes holdfast uses.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN: u16 = 1013;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("websocket error {code}: {reason}")]
pub struct WsError {
    /// Close code to send the peer.
    pub code: u16,
    pub reason: &'static str,
}

const fn proto(reason: &'static str) -> WsError {
    WsError { code: close::PROTOCOL_ERROR, reason }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message {
        text: bool,
        data: Vec<u8>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// The peer's close frame; `code` is `None` when it carried no payload.
    Close {
        code: Option<u16>,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Frame {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    remaining: u64,
    /// Bytes of payload already read (for the mask offset).
    pos: u64,
}

/// The most a decoder reserves for a message before its bytes arrive.
const INITIAL_RESERVE: usize = 4096;

/// Streaming decoder for one direction of one connection. Its state is
/// plain serializable data (a live upgrade moves it, partial frame and
/// partial message included, to the new process).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Decoder {
    max_message: usize,
    /// Server side: frames must be masked. Client side: must not be.
    expect_masked: bool,
    hdr: [u8; 14],
    hdr_len: usize,
    frame: Option<Frame>,
    /// Data message being assembled: (is text, bytes so far).
    msg: Option<(bool, Vec<u8>)>,
    ctrl: Vec<u8>,
    closed: bool,
}

fn header_len(b0: u8, b1: u8) -> usize {
    let _ = b0;
    2 + match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    } + if b1 & 0x80 != 0 { 4 } else { 0 }
}

/// Close codes an endpoint may put on the wire: RFC 6455's, the three IANA
/// registered since (1012 service restart, 1013 try again later, 1014 bad
/// gateway), and the ranges for libraries and applications.
pub fn valid_close_code(c: u16) -> bool {
    matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl Decoder {
    pub fn new(max_message: usize, expect_masked: bool) -> Self {
        Decoder { max_message, expect_masked, hdr: [0; 14], hdr_len: 0, frame: None, msg: None, ctrl: Vec::new(), closed: false }
    }

    /// True while a message or frame is partly received.
    pub fn in_progress(&self) -> bool {
        self.hdr_len > 0 || self.frame.is_some() || self.msg.is_some()
    }

    /// Whether the state is one `feed` can leave behind (a decoder rebuilt
    /// from a live-upgrade snapshot is checked before it is fed).
    pub fn consistent(&self) -> bool {
        // A header is started as soon as it is whole.
        let hdr_ok = self.hdr_len < 2 || self.hdr_len < header_len(self.hdr[0], self.hdr[1]);
        let msg_len = self.msg.as_ref().map_or(0, |m| m.1.len() as u64);
        let frame_ok = match &self.frame {
            None => true,
            Some(_) if self.hdr_len != 0 => false,
            Some(f) => match f.opcode {
                op::CLOSE | op::PING | op::PONG => f.fin && f.remaining + (self.ctrl.len() as u64) <= 125,
                op::TEXT | op::BINARY | op::CONT => self.msg.is_some() && msg_len.saturating_add(f.remaining) <= self.max_message as u64,
                _ => false,
            },
        };
        hdr_ok && frame_ok && self.ctrl.len() <= 125 && msg_len <= self.max_message as u64
    }

    /// Bytes held for partial messages (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.msg.as_ref().map_or(0, |m| m.1.capacity()) + self.ctrl.capacity()
    }

    /// Consumes all of `input`, pushing complete events. After an error the
    /// decoder must not be fed again (the connection is closing).
    pub fn feed(&mut self, mut input: &[u8], events: &mut Vec<Event>) -> Result<(), WsError> {
        if !self.consistent() {
            // Only a decoder rebuilt from a corrupt snapshot gets here.
            return Err(WsError { code: close::INTERNAL, reason: "corrupt frame decoder state" });
        }
        while !input.is_empty() {
            if self.closed {
                return Err(proto("data after close frame"));
            }
            match self.frame.as_mut() {
                None => {
                    let need = if self.hdr_len < 2 { 2 } else { header_len(self.hdr[0], self.hdr[1]) };
                    let take = (need - self.hdr_len).min(input.len());
                    self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&input[..take]);
                    self.hdr_len += take;
                    input = &input[take..];
                    if self.hdr_len == need && (need > 2 || self.hdr_len == 2 && header_len(self.hdr[0], self.hdr[1]) == 2) {
                        self.start_frame(events)?;
                    }
                }
                Some(f) => {
                    let n = (f.remaining.min(input.len() as u64)) as usize;
                    let (chunk, rest) = input.split_at(n);
                    input = rest;
                    let dst = if f.opcode >= op::CLOSE { &mut self.ctrl } else { &mut self.msg.as_mut().ok_or(proto("no message"))?.1 };
                    let start = dst.len();
                    dst.extend_from_slice(chunk);
                    if let Some(mask) = f.mask {
                        for (i, b) in dst[start..].iter_mut().enumerate() {
                            *b ^= mask[((f.pos as usize) + i) & 3];
                        }
                    }
                    f.pos += n as u64;
                    f.remaining -= n as u64;
                    // Text fails at its first invalid byte, not at the end
                    // of the message (RFC 6455 8.1: fail fast).
                    if f.opcode < op::CLOSE
                        && let Some((true, data)) = &self.msg
                        && !utf8_so_far(data, start)
                    {
                        return Err(WsError { code: close::INVALID_DATA, reason: "text message is not UTF-8" });
                    }
                    if f.remaining == 0 {
                        self.end_frame(events)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, events: &mut Vec<Event>) -> Result<(), WsError> {
        let h = self.hdr;
        self.hdr_len = 0;
        let (fin, rsv, opcode) = (h[0] & 0x80 != 0, h[0] & 0x70, h[0] & 0x0f);
        let masked = h[1] & 0x80 != 0;
        if rsv != 0 {
            return Err(proto("reserved bits set"));
        }
        if masked != self.expect_masked {
            return Err(proto(if self.expect_masked { "client frames must be masked" } else { "server frames must not be masked" }));
        }
        let (len, at) = match h[1] & 0x7f {
            126 => {
                let l = u16::from_be_bytes([h[2], h[3]]) as u64;
                if l < 126 {
                    return Err(proto("non-minimal length"));
                }
                (l, 4)
            }
            127 => {
                let l = u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]);
                if l >> 63 != 0 || l <= 0xffff {
                    return Err(proto("bad 64-bit length"));
                }
                (l, 10)
            }
            l => (l as u64, 2),
        };
        let mask = masked.then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        match opcode {
            op::CLOSE | op::PING | op::PONG => {
                if !fin {
                    return Err(proto("fragmented control frame"));
                }
                if len > 125 {
                    return Err(proto("control frame longer than 125 bytes"));
                }
                self.ctrl.clear();
            }
            op::TEXT | op::BINARY => {
                if self.msg.is_some() {
                    return Err(proto("new message before the last one finished"));
                }
                if len > self.max_message as u64 {
                    return Err(WsError { code: close::TOO_BIG, reason: "message too big" });
                }
                // Room grows as the payload arrives: a header alone (a
                // device that declares 64 MiB and sends nothing) costs no
                // more than this.
                self.msg = Some((opcode == op::TEXT, Vec::with_capacity((len as usize).min(INITIAL_RESERVE))));
            }
            op::CONT => {
                let Some((_, m)) = &self.msg else {
                    return Err(proto("continuation without a message"));
                };
                if m.len() as u64 + len > self.max_message as u64 {
                    return Err(WsError { code: close::TOO_BIG, reason: "message too big" });
                }
            }
            _ => return Err(proto("unknown opcode")),
        }
        self.frame = Some(Frame { fin, opcode, mask, remaining: len, pos: 0 });
        if len == 0 {
            self.end_frame(events)?;
        }
        Ok(())
    }

    fn end_frame(&mut self, events: &mut Vec<Event>) -> Result<(), WsError> {
        let Some(f) = self.frame.take() else {
            return Ok(());
        };
        match f.opcode {
            op::PING => events.push(Event::Ping(std::mem::take(&mut self.ctrl))),
            op::PONG => events.push(Event::Pong(std::mem::take(&mut self.ctrl))),
            op::CLOSE => {
                let p = std::mem::take(&mut self.ctrl);
                self.closed = true;
                let ev = match p.len() {
                    0 => Event::Close { code: None, reason: String::new() },
                    1 => return Err(proto("close payload of one byte")),
                    _ => {
                        let code = u16::from_be_bytes([p[0], p[1]]);
                        if !valid_close_code(code) {
                            return Err(proto("invalid close code"));
                        }
                        let reason = String::from_utf8(p[2..].to_vec())
                            .map_err(|_| WsError { code: close::INVALID_DATA, reason: "close reason is not UTF-8" })?;
                        Event::Close { code: Some(code), reason }
                    }
                };
                events.push(ev);
            }
            _ if f.fin => {
                if let Some((text, data)) = self.msg.take() {
                    if text && std::str::from_utf8(&data).is_err() {
                        return Err(WsError { code: close::INVALID_DATA, reason: "text message is not UTF-8" });
                    }
                    events.push(Event::Message { text, data });
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Whether `data`, whose first `checked` bytes were valid UTF-8 but for an
/// unfinished last character, still is, with an unfinished last character
/// allowed (the rest of the message may complete it). Only what follows
/// the last character boundary before `checked` is looked at again.
fn utf8_so_far(data: &[u8], checked: usize) -> bool {
    let mut from = checked.min(data.len());
    // Back to the start of a character: at most three continuation bytes.
    let mut back = 0;
    while from > 0 && back < 3 && data[from - 1] & 0xc0 == 0x80 {
        from -= 1;
        back += 1;
    }
    if from > 0 && data[from - 1] >= 0xc0 {
        from -= 1;
    }
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => true,
        // Invalid only if a bad byte shows; an unfinished last character may still be completed.
        Err(e) => e.error_len().is_none(),
    }
}

/// Appends one frame. `mask` is required for client frames, absent for server frames.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i & 3]));
        }
        None => out.extend_from_slice(payload),
    }
}

/// Appends a close frame with a code and reason (reason cut to fit 125 bytes).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: Option<[u8; 4]>) {
    let mut p = code.to_be_bytes().to_vec();
    let mut r = reason;
    while r.len() > 123 {
        let mut cut = 123;
        while !r.is_char_boundary(cut) {
            cut -= 1;
        }
        r = &r[..cut];
    }
    p.extend_from_slice(r.as_bytes());
    encode(out, op::CLOSE, &p, mask);
}

/// Frame overhead for a payload of `len` bytes (server side, unmasked).
pub fn header_size(len: usize) -> usize {
    match len {
        n if n < 126 => 2,
        n if n <= 0xffff => 4,
        _ => 10,
    }
}

#[cfg(test)]
mod tests;
