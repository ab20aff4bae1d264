//! How a device connection ends, who is to blame, and what each end means
//! for the device and for its WSM stream.
//!
//! Owns: [`End`], its blame, retry and metric label, the CLOSE a WSM is
//! sent for it (reason, code, text), and how the TLS session is closed
//! (alert, close_notify, or nothing). Never performs any of it.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use crate::blame::{Blame, Blamed};
use crate::link::codec::CloseReason;
use crate::tls::handshake::HandshakeError;
use crate::tls::record::RecordError;
use crate::ws::frame::{WsError, close};

/// How a connection ended.
#[derive(Debug)]
pub enum End {
    /// The socket failed (reset, broken pipe).
    Io(std::io::ErrorKind),
    /// The device closed TCP (or sent close_notify).
    Eof,
    Refused(Box<HandshakeError>),
    Record(RecordError),
    /// The upgrade request was refused with this status.
    BadUpgrade(u16, &'static str),
    Ws(WsError),
    /// The device sent a WebSocket close.
    DeviceClosed,
    /// The device sent TLS close_notify (without a WebSocket close): it is
    /// answered with close_notify (RFC 8446 6.1), its stream closed as
    /// "device gone".
    CloseNotify,
    NoWsm,
    WsmRefused(u16),
    WsmTimeout,
    WsmClosed,
    LinkLost,
    Idle,
    /// The device read nothing for `websocket.write_stall_timeout_secs`
    /// while holdfast had bytes for it.
    WriteStall,
    /// The shard's partial-record budget ran out and this connection held
    /// one of the oldest partial records.
    PartialEvicted,
    /// The connection moved to a new process (live upgrade).
    HandedOver,
    /// A policy change (reload, `ctl block`) no longer allows its identity.
    Revoked(crate::tls::handshake::Refusal),
    /// An operator closed it (`ctl kick`) with this code.
    Kicked(u16),
    /// Admission control answered it 503 before its tunnel opened.
    Shed(crate::admission::Shed),
    /// holdfast closed it on a schedule of its own (a drain, a graceful
    /// stop, its age, a certificate migration) with this close code.
    Paced(Paced, u16),
}

/// Why holdfast closed an established connection at a moment it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paced {
    /// `holdfast ctl drain`.
    Drain,
    /// SIGTERM: the graceful stop.
    Stop,
    /// Older than its drawn `websocket.max_age_secs`.
    Age,
    /// Made under a server certificate a reload replaced (`--migrate-over`).
    Migrate,
}

impl Paced {
    pub const ALL: [Paced; 4] = [Paced::Drain, Paced::Stop, Paced::Age, Paced::Migrate];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Paced::Drain => "drain",
            Paced::Stop => "stop",
            Paced::Age => "max_age",
            Paced::Migrate => "migrate",
        }
    }

    /// The close frame's reason text (and the WSM's CLOSE text).
    pub fn text(self) -> &'static str {
        match self {
            Paced::Drain => "node draining",
            Paced::Stop => "node stopping",
            Paced::Age => "connection age reached",
            Paced::Migrate => "server certificate rotated",
        }
    }

    pub fn index(self) -> usize {
        Paced::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::Io(e.kind())
    }
}

/// How holdfast says goodbye at the TLS level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsGoodbye {
    /// A fatal alert with this description.
    Alert(u8),
    CloseNotify,
    /// Nothing: the socket is gone, or the device already went.
    Nothing,
}

impl End {
    /// What the WSM is told in the stream's CLOSE, if it must be told:
    /// not when the WSM or its link ended the stream, nor when it moved.
    /// `device_code` is the code of the device's own close frame.
    pub fn stream_close(&self, device_code: u16) -> Option<(CloseReason, u16, String)> {
        let (code, text): (u16, String) = match self {
            End::WsmClosed | End::LinkLost | End::HandedOver => return None,
            End::DeviceClosed => (device_code, String::new()),
            End::CloseNotify => (close::GOING_AWAY, "device closed its TLS session".into()),
            End::Ws(e) => (e.code, e.reason.to_string()),
            End::Idle => (close::GOING_AWAY, "idle timeout".into()),
            End::PartialEvicted => (close::POLICY, "partial record held too long".into()),
            End::Revoked(why) => (close::POLICY, format!("device no longer allowed ({})", why.label())),
            End::Kicked(code) => (*code, "closed by the operator".into()),
            End::Paced(why, code) => (*code, why.text().into()),
            End::WriteStall => (1006, "device stopped reading".into()),
            _ => (1006, String::new()),
        };
        Some((CloseReason::DeviceGone, code, text))
    }

    /// How the TLS session is closed for this end.
    pub fn tls_goodbye(&self) -> TlsGoodbye {
        match self {
            End::Record(e) => e.alert().map_or(TlsGoodbye::Nothing, TlsGoodbye::Alert),
            End::Io(_) | End::Eof | End::HandedOver | End::WriteStall => TlsGoodbye::Nothing,
            _ => TlsGoodbye::CloseNotify,
        }
    }
}

impl Blamed for End {
    fn blame(&self) -> Blame {
        match self {
            End::Io(_)
            | End::Eof
            | End::Refused(_)
            | End::BadUpgrade(..)
            | End::Ws(_)
            | End::DeviceClosed
            | End::CloseNotify
            | End::Idle => Blame::Device,
            End::WriteStall | End::PartialEvicted => Blame::Device,
            End::Record(e) => e.blame(),
            End::NoWsm | End::WsmRefused(_) | End::WsmTimeout | End::WsmClosed | End::LinkLost => Blame::Wsm,
            End::HandedOver => Blame::Internal,
            // Its certificate is no longer allowed; an operator's kick is the operator's.
            End::Revoked(_) => Blame::Device,
            End::Kicked(_) | End::Paced(..) => Blame::Config,
            // The node is full or busy: its capacity, not the device.
            End::Shed(_) => Blame::Internal,
        }
    }

    fn retry_helps(&self) -> bool {
        match self {
            // Same certificate, same refusal; same request, same answer.
            End::Refused(e) => matches!(e.reason, crate::tls::handshake::Refusal::Timeout),
            End::BadUpgrade(status, _) => *status == 408,
            End::WsmRefused(status) => *status >= 500,
            // Refused again at the handshake, until the policy changes back.
            End::Revoked(_) => false,
            _ => true,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            End::Io(_) => "io",
            End::Eof => "eof",
            End::Refused(_) => "refused",
            End::Record(_) => "tls_record",
            End::BadUpgrade(..) => "bad_upgrade",
            End::Ws(_) => "websocket",
            End::DeviceClosed => "device_closed",
            End::CloseNotify => "close_notify",
            End::NoWsm => "no_wsm",
            End::WsmRefused(_) => "wsm_refused",
            End::WsmTimeout => "wsm_timeout",
            End::WsmClosed => "wsm_closed",
            End::LinkLost => "link_lost",
            End::Idle => "idle",
            End::WriteStall => "write_stall",
            End::PartialEvicted => "partial_evicted",
            End::HandedOver => "handed_over",
            End::Revoked(_) => "revoked",
            End::Kicked(_) => "kicked",
            End::Shed(_) => "shed",
            End::Paced(..) => "paced",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wsm_hears_of_ends_it_did_not_cause() {
        assert_eq!(End::DeviceClosed.stream_close(4000), Some((CloseReason::DeviceGone, 4000, String::new())));
        assert_eq!(End::Idle.stream_close(1005).map(|c| c.1), Some(close::GOING_AWAY));
        let ws = End::Ws(WsError { code: close::TOO_BIG, reason: "too big" });
        assert_eq!(ws.stream_close(1005), Some((CloseReason::DeviceGone, close::TOO_BIG, "too big".into())));
        assert_eq!(End::Paced(Paced::Stop, 1001).stream_close(1000), Some((CloseReason::DeviceGone, 1001, "node stopping".into())));
        assert_eq!(End::Paced(Paced::Drain, 1012).tls_goodbye(), TlsGoodbye::CloseNotify);
        for quiet in [End::WsmClosed, End::LinkLost, End::HandedOver] {
            assert_eq!(quiet.stream_close(1000), None, "{quiet:?}");
        }
    }

    #[test]
    fn tls_goodbye_follows_the_end() {
        assert_eq!(End::Record(RecordError::BadRecordMac).tls_goodbye(), TlsGoodbye::Alert(20));
        assert_eq!(End::Record(RecordError::PeerAlert(40)).tls_goodbye(), TlsGoodbye::Nothing);
        assert_eq!(End::Eof.tls_goodbye(), TlsGoodbye::Nothing);
        assert_eq!(End::WriteStall.tls_goodbye(), TlsGoodbye::Nothing, "a device that does not read gets nothing more");
        assert_eq!(End::Idle.tls_goodbye(), TlsGoodbye::CloseNotify);
        assert_eq!(End::CloseNotify.tls_goodbye(), TlsGoodbye::CloseNotify, "a device's close_notify is answered with one (RFC 8446 6.1)");
        assert_eq!(
            End::CloseNotify.stream_close(1005),
            Some((CloseReason::DeviceGone, close::GOING_AWAY, "device closed its TLS session".into()))
        );
    }

    #[test]
    fn blame_and_retry() {
        assert_eq!(End::WsmTimeout.blame(), Blame::Wsm);
        assert_eq!(End::Ws(WsError { code: 1002, reason: "x" }).blame(), Blame::Device);
        assert!(!End::WsmRefused(403).retry_helps());
        assert!(End::WsmRefused(503).retry_helps());
        assert!(!End::BadUpgrade(400, "x").retry_helps());
    }
}
