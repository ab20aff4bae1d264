//! The answers a connection gets while it is being set up: after the TLS
//! handshake, before the tunnel.
//!
//! Owns: the HTTP status and text a device is answered with when its
//! upgrade is bad or late, when no WSM is reachable, and for each way a
//! WSM can answer (or fail to answer) the stream's OPEN, together with what
//! is counted and whether the WSM's half-open stream must be closed. Never
//! performs any of it: `shard::conn` writes the response and closes.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use super::end::End;
use crate::link::codec::CloseReason;
use crate::ws::frame::close;
use crate::ws::upgrade;

/// What a refused set-up counts (shard metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupCount {
    UpgradeRejected,
    WsmUnavailable,
    WsmRefused,
    WsmOpenTimeout,
    WsmBadAccept,
    /// Admission control shed the device (503 with Retry-After).
    Shed(crate::admission::Shed),
}

/// A set-up that ends with an HTTP error response.
#[derive(Debug)]
pub struct Refuse {
    pub status: u16,
    pub reason: String,
    pub end: End,
    pub count: SetupCount,
    /// The stream to close on the link (it was opened and is still there).
    pub close_stream: Option<(CloseReason, u16, String)>,
    /// Seconds after which the device may try again (`Retry-After`).
    pub retry_after: Option<u32>,
}

impl Refuse {
    /// The response the device is sent.
    pub fn response(&self) -> Vec<u8> {
        upgrade::response_error_retry(self.status, &self.reason, self.retry_after)
    }
}

/// Admission control sheds the device: 503, come back in `retry_after` seconds.
pub fn shed(why: crate::admission::Shed, retry_after: u32) -> Refuse {
    Refuse {
        status: 503,
        reason: why.reason().into(),
        end: End::Shed(why),
        count: SetupCount::Shed(why),
        close_stream: None,
        retry_after: Some(retry_after),
    }
}

/// How the stream's OPEN was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    Accepted(Option<String>),
    Refused(u16, String),
    /// The link or the stream went away before an answer.
    Gone,
    /// No answer within `upstream.open_timeout_ms`.
    Timeout,
}

/// The upgrade request was malformed or refused (`status` from the parser).
pub fn bad_upgrade(status: u16, reason: &'static str) -> Refuse {
    Refuse {
        status,
        reason: reason.into(),
        end: End::BadUpgrade(status, reason),
        count: SetupCount::UpgradeRejected,
        close_stream: None,
        retry_after: None,
    }
}

/// No whole upgrade request within `websocket.upgrade_timeout_ms`.
pub fn upgrade_timeout() -> Refuse {
    Refuse {
        status: 408,
        reason: "no upgrade request in time".into(),
        end: End::BadUpgrade(408, "upgrade timeout"),
        count: SetupCount::UpgradeRejected,
        close_stream: None,
        retry_after: None,
    }
}

/// No link could take the stream.
pub fn no_wsm() -> Refuse {
    Refuse {
        status: 503,
        reason: "no WSM reachable".into(),
        end: End::NoWsm,
        count: SetupCount::WsmUnavailable,
        close_stream: None,
        retry_after: None,
    }
}

/// Decides on the WSM's answer to the OPEN: the subprotocol for the 101,
/// or the refusal. `offered` is what the device asked for; a WSM that
/// picks anything else (or something that is not a token, which would
/// inject headers) is refused with 502 and its stream closed.
pub fn answer_open(outcome: OpenOutcome, offered: &[String]) -> Result<Option<String>, Refuse> {
    match outcome {
        OpenOutcome::Accepted(sub) => upgrade::checked_subprotocol(offered, sub).map_err(|why| Refuse {
            status: 502,
            reason: why.into(),
            end: End::WsmRefused(502),
            count: SetupCount::WsmBadAccept,
            close_stream: Some((CloseReason::Error, close::INTERNAL, why.into())),
            retry_after: None,
        }),
        OpenOutcome::Refused(status, reason) => {
            // A WSM's status outside 4xx/5xx is no HTTP error: 403.
            let status = if (400..600).contains(&status) { status } else { 403 };
            Err(Refuse {
                status,
                reason,
                end: End::WsmRefused(status),
                count: SetupCount::WsmRefused,
                close_stream: None,
                retry_after: None,
            })
        }
        OpenOutcome::Gone => Err(Refuse {
            status: 503,
            reason: "WSM went away".into(),
            end: End::LinkLost,
            count: SetupCount::WsmUnavailable,
            close_stream: None,
            retry_after: None,
        }),
        OpenOutcome::Timeout => Err(Refuse {
            status: 504,
            reason: "WSM did not answer".into(),
            end: End::WsmTimeout,
            count: SetupCount::WsmOpenTimeout,
            close_stream: Some((CloseReason::Error, close::INTERNAL, "open timeout".into())),
            retry_after: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered() -> Vec<String> {
        vec!["v1".into(), "v2".into()]
    }

    #[test]
    fn an_accept_gives_the_subprotocol_the_device_offered() {
        assert_eq!(answer_open(OpenOutcome::Accepted(Some("v2".into())), &offered()).unwrap(), Some("v2".into()));
        assert_eq!(answer_open(OpenOutcome::Accepted(None), &offered()).unwrap(), None);
    }

    #[test]
    fn an_accept_with_a_subprotocol_not_offered_or_not_a_token_is_a_502_and_closes_the_stream() {
        for bad in ["v3", "v1\r\nSet-Cookie: x=1", "v 1"] {
            let r = answer_open(OpenOutcome::Accepted(Some(bad.into())), &offered()).unwrap_err();
            assert_eq!((r.status, r.count), (502, SetupCount::WsmBadAccept), "{bad:?}");
            assert!(matches!(r.close_stream, Some((CloseReason::Error, close::INTERNAL, _))));
            let resp = String::from_utf8(r.response()).unwrap();
            assert!(resp.starts_with("HTTP/1.1 502 "), "{resp}");
            assert!(!resp.contains("Set-Cookie"), "{resp}");
        }
    }

    #[test]
    fn a_refusal_keeps_an_http_error_status_and_replaces_anything_else_with_403() {
        let r = answer_open(OpenOutcome::Refused(429, "slow down".into()), &offered()).unwrap_err();
        assert_eq!((r.status, r.reason.as_str(), r.close_stream.is_none()), (429, "slow down", true));
        let r = answer_open(OpenOutcome::Refused(200, "ok?".into()), &offered()).unwrap_err();
        assert_eq!(r.status, 403);
        assert!(matches!(r.end, End::WsmRefused(403)));
    }

    #[test]
    fn no_answer_is_a_504_that_closes_the_stream_and_a_lost_link_a_503() {
        let r = answer_open(OpenOutcome::Timeout, &offered()).unwrap_err();
        assert_eq!((r.status, r.count), (504, SetupCount::WsmOpenTimeout));
        assert!(r.close_stream.is_some());
        let r = answer_open(OpenOutcome::Gone, &offered()).unwrap_err();
        assert_eq!((r.status, r.count), (503, SetupCount::WsmUnavailable));
        assert!(r.close_stream.is_none(), "the link already forgot the stream");
        assert_eq!(no_wsm().status, 503);
        assert_eq!(upgrade_timeout().status, 408);
        assert!(bad_upgrade(426, "version").response().starts_with(b"HTTP/1.1 426 "));
    }
}
