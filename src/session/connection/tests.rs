//! Every set-up transition, with no sockets: the upgrade and open stages on
//! record layers with fixed keys, the handshake against a real rustls
//! client moved by hand.

#![allow(clippy::disallowed_methods)] // tests take a real `now` once

use std::io::{Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::*;
use crate::tls::keys::Suite;
use crate::tls::record::{KEY_UPDATE_QUIET, Version, testing};

const REQUEST: &[u8] = b"GET /ws?x=1 HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v1, v2\r\n\
User-Agent: oven/1\r\n\r\n";

fn limits() -> Rc<SetupLimits> {
    Rc::new(SetupLimits {
        handshake_timeout: Duration::from_secs(10),
        upgrade_timeout: Duration::from_secs(5),
        open_timeout: Duration::from_secs(3),
        max_request_bytes: 8192,
        forward_headers: vec!["user-agent".into()],
        key_update_after: 0,
    })
}

/// A connection past its handshake, and the device's end of its records.
fn upgrading(now: Instant) -> (RecordLayer, Setup) {
    let (device, core) = testing::pair(Version::Tls13, Suite::Aes128Gcm);
    let identity = holdfast_link::testing::sample_open(false).device;
    (device, Setup::after_handshake(core, identity, limits(), now))
}

fn seal(device: &mut RecordLayer, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    device.seal(plain, &mut out).unwrap();
    out
}

fn open(device: &mut RecordLayer, mut bytes: Vec<u8>) -> Vec<u8> {
    let mut plain = Vec::new();
    device.open_all(&mut bytes, &mut Vec::new(), &mut |p| plain.extend_from_slice(p)).unwrap();
    assert!(bytes.is_empty(), "whole records");
    plain
}

fn drain(s: &mut Setup) -> Vec<SetupAction> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// Feeds the whole request; the OPEN comes out for a link.
fn to_link(device: &mut RecordLayer, s: &mut Setup, now: Instant) -> Box<Open> {
    let mut buf = seal(device, REQUEST);
    s.on_bytes(now, &mut buf);
    assert!(buf.is_empty());
    let mut acts = drain(s);
    assert_eq!(acts.len(), 1);
    let Some(SetupAction::Open(o)) = acts.pop() else { panic!("an OPEN") };
    assert_eq!((s.stage(), s.wants()), (Stage::Opening, Want::Link));
    o
}

/// [`to_link`], and a link takes the OPEN.
fn to_opening(device: &mut RecordLayer, s: &mut Setup, now: Instant) -> Box<Open> {
    let o = to_link(device, s, now);
    s.on_open_sent(now, true);
    assert_eq!(s.wants(), Want::OpenAnswer);
    o
}

fn refusal(acts: &[SetupAction]) -> (SetupCount, bool, Option<&Ended>) {
    let count = acts.iter().find_map(|a| match a {
        SetupAction::Refused { count, .. } => Some(*count),
        _ => None,
    });
    let closes = acts.iter().any(|a| matches!(a, SetupAction::CloseStream { .. }));
    let ended = acts.iter().find_map(|a| match a {
        SetupAction::Ended(e) => Some(&**e),
        _ => None,
    });
    (count.expect("a refusal"), closes, ended)
}

fn written(acts: &[SetupAction]) -> Vec<u8> {
    acts.iter()
        .filter_map(|a| match a {
            SetupAction::Write(b) => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// A connection just accepted, under the dev PKI's TLS context.
fn accepted(ctx: &crate::tls::server::TlsContext, id: ConnectionId, now: Instant) -> Setup {
    let admit = Some((ctx.verifier.clone(), crate::timefmt::unix_now()));
    Setup::new(ctx.server.clone(), admit, limits(), id, "127.0.0.1:4000".parse().unwrap(), now)
}

#[test]
fn upgrade_open_accept_gives_a_101_and_the_tunnel_with_the_request_kept_for_resuming() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    assert_eq!((s.stage(), s.wants(), s.deadline()), (Stage::Upgrading, Want::Read, now + Duration::from_secs(5)));
    let o = to_opening(&mut device, &mut s, now);
    assert_eq!((o.request.path.as_str(), o.request.query.as_str()), ("/ws", "x=1"));
    assert_eq!(o.request.subprotocols, vec!["v1".to_string(), "v2".to_string()]);
    assert_eq!(o.request.headers, vec![("user-agent".to_string(), "oven/1".to_string())]);
    assert!(!o.resumed);
    assert_eq!(s.deadline(), now + Duration::from_secs(3), "the open timeout runs from the OPEN");
    s.on_open_answer(OpenOutcome::Accepted(Some("v2".into())));
    let acts = drain(&mut s);
    assert_eq!(s.stage(), Stage::Streaming);
    let resp = String::from_utf8(open(&mut device, written(&acts))).unwrap();
    assert!(resp.starts_with("HTTP/1.1 101 "), "{resp}");
    assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{resp}");
    assert!(resp.contains("Sec-WebSocket-Protocol: v2\r\n"), "{resp}");
    let Some(SetupAction::Established(r)) = acts.into_iter().last() else { panic!("established last") };
    assert_eq!(r.resume.subprotocol.as_deref(), Some("v2"));
    assert_eq!(r.resume.request.key, "", "the key is not kept");
    assert!(r.early.is_empty());
    assert_eq!(s.wants(), Want::Nothing);
}

#[test]
fn a_request_split_over_reads_and_records_and_frames_after_it_go_to_the_tunnel() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    let mut all = seal(&mut device, &REQUEST[..30]);
    all.extend(seal(&mut device, &[&REQUEST[30..], b"\x81\x80early".as_slice()].concat()));
    // Byte by byte: a partial record stays in the buffer for the next read.
    let mut buf = Vec::new();
    for (i, b) in all.iter().enumerate() {
        buf.push(*b);
        s.on_bytes(now, &mut buf);
        if i + 1 < all.len() {
            assert_eq!(s.stage(), Stage::Upgrading, "byte {i}");
            assert!(drain(&mut s).is_empty());
        }
    }
    assert!(buf.is_empty());
    assert!(matches!(drain(&mut s).as_slice(), [SetupAction::Open(_)]));
    s.on_open_sent(now, true);
    s.on_open_answer(OpenOutcome::Accepted(None));
    let Some(SetupAction::Established(r)) = drain(&mut s).pop() else { panic!() };
    assert_eq!(r.early, b"\x81\x80early");
}

#[test]
fn a_bad_upgrade_is_answered_with_its_status_and_ends() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    let mut buf = seal(&mut device, b"GET /ws HTTP/1.1\r\nHost: edge\r\n\r\n");
    s.on_bytes(now, &mut buf);
    let acts = drain(&mut s);
    let (count, closes, ended) = refusal(&acts);
    assert_eq!((count, closes), (SetupCount::UpgradeRejected, false));
    assert!(matches!(ended.unwrap().end, End::BadUpgrade(400 | 426, _)));
    assert!(ended.unwrap().rl.is_some(), "the shell says its TLS goodbye");
    let resp = String::from_utf8(open(&mut device, written(&acts))).unwrap();
    assert!(resp.starts_with("HTTP/1.1 4"), "{resp}");
    assert_eq!((s.stage(), s.wants()), (Stage::Closing, Want::Nothing));
}

#[test]
fn no_request_in_time_is_a_408_and_early_timer_calls_change_nothing() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    s.on_timeout(now + Duration::from_secs(4));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.stage(), Stage::Upgrading);
    s.on_timeout(now + Duration::from_secs(5));
    let acts = drain(&mut s);
    assert_eq!(refusal(&acts).0, SetupCount::UpgradeRejected);
    assert!(String::from_utf8(open(&mut device, written(&acts))).unwrap().starts_with("HTTP/1.1 408 "));
}

#[test]
fn a_shed_device_gets_a_503_with_its_retry_after_and_no_stream() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    to_link(&mut device, &mut s, now);
    s.on_shed(crate::admission::Shed::QueueFull, 23);
    let acts = drain(&mut s);
    let (count, closes, ended) = refusal(&acts);
    assert_eq!((count, closes), (SetupCount::Shed(crate::admission::Shed::QueueFull), false));
    assert!(matches!(ended.unwrap().end, End::Shed(crate::admission::Shed::QueueFull)));
    let resp = String::from_utf8(open(&mut device, written(&acts))).unwrap();
    assert!(resp.starts_with("HTTP/1.1 503 ") && resp.contains("\r\nRetry-After: 23\r\n"), "{resp}");
    s.on_shed(crate::admission::Shed::Memory, 1);
    assert!(drain(&mut s).is_empty(), "once only");
}

#[test]
fn no_link_for_the_open_is_a_503_with_no_stream_to_close() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    to_link(&mut device, &mut s, now);
    s.on_open_sent(now, false);
    let acts = drain(&mut s);
    let (count, closes, ended) = refusal(&acts);
    assert_eq!((count, closes), (SetupCount::WsmUnavailable, false));
    assert!(matches!(ended.unwrap().end, End::NoWsm));
    assert!(String::from_utf8(open(&mut device, written(&acts))).unwrap().starts_with("HTTP/1.1 503 "));
}

#[test]
fn an_unanswered_open_is_a_504_that_closes_the_stream_and_a_bad_accept_a_502() {
    let now = Instant::now();
    // Each case: what happens to the OPEN, what is counted, whether the
    // WSM's stream is closed, and the response's start.
    type Case<'a> = (&'a dyn Fn(&mut Setup), SetupCount, bool, &'a str);
    let cases: [Case; 3] = [
        (&|s| s.on_timeout(now + Duration::from_secs(3)), SetupCount::WsmOpenTimeout, true, "HTTP/1.1 504 "),
        (&|s| s.on_open_answer(OpenOutcome::Accepted(Some("v1\r\nSet-Cookie: x".into()))), SetupCount::WsmBadAccept, true, "HTTP/1.1 502 "),
        (&|s| s.on_open_answer(OpenOutcome::Refused(429, "slow down".into())), SetupCount::WsmRefused, false, "HTTP/1.1 429 "),
    ];
    for (answer, count, closes, status) in cases {
        let (mut device, mut s) = upgrading(now);
        to_opening(&mut device, &mut s, now);
        answer(&mut s);
        let acts = drain(&mut s);
        assert_eq!((refusal(&acts).0, refusal(&acts).1), (count, closes), "{status}");
        let resp = String::from_utf8(open(&mut device, written(&acts))).unwrap();
        assert!(resp.starts_with(status) && !resp.contains("Set-Cookie"), "{resp}");
    }
}

#[test]
fn a_101_that_cannot_be_written_closes_the_stream_as_device_gone() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    to_opening(&mut device, &mut s, now);
    s.on_open_answer(OpenOutcome::Accepted(None));
    assert!(matches!(s.poll_action(), Some(SetupAction::Write(_))));
    s.on_io_error(End::DeviceClosed);
    let acts = drain(&mut s);
    assert!(matches!(
        acts.as_slice(),
        [SetupAction::CloseStream { reason: CloseReason::DeviceGone, code: 1006, .. }, SetupAction::Ended(_)]
    ));
    let SetupAction::Ended(e) = &acts[1] else { unreachable!() };
    assert!(matches!(e.end, End::DeviceClosed) && e.rl.is_some());
}

#[test]
fn a_failed_write_of_a_refusal_changes_nothing_and_a_device_that_closes_ends_it() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    s.on_timeout(now + Duration::from_secs(5));
    assert!(matches!(s.poll_action(), Some(SetupAction::Refused { .. })));
    assert!(matches!(s.poll_action(), Some(SetupAction::Write(_))));
    s.on_io_error(End::DeviceClosed);
    assert!(matches!(drain(&mut s).as_slice(), [SetupAction::Ended(e)] if matches!(e.end, End::BadUpgrade(408, _))));

    let (mut device2, mut s) = upgrading(now);
    let mut buf = seal(&mut device2, b"GET /ws HT");
    device2.close_notify(&mut buf).unwrap();
    s.on_bytes(now, &mut buf);
    // close_notify during the upgrade: answered with close_notify (the rl is kept for it).
    assert!(matches!(drain(&mut s).as_slice(), [SetupAction::Ended(e)] if matches!(e.end, End::CloseNotify) && e.rl.is_some()));
    let _ = &mut device;
}

#[test]
fn a_broken_record_ends_set_up_with_the_record_error() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    let mut buf = seal(&mut device, REQUEST);
    let last = buf.len() - 1;
    buf[last] ^= 1;
    s.on_bytes(now, &mut buf);
    assert!(matches!(drain(&mut s).as_slice(), [SetupAction::Ended(e)] if matches!(e.end, End::Record(_))));
}

/// The real handshake: a rustls client, the bytes moved by hand; the stages
/// go forward one by one and never back.
#[test]
fn a_real_handshake_then_upgrade_walks_the_stages_forward() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = crate::tls::handshake::tests::setup(dir.path());
    let mut c = crate::tls::handshake::tests::client(dir.path(), "oven-1", "TLS13_AES_128_GCM_SHA256");
    let now = Instant::now();
    let mut s = accepted(&ctx, ConnectionId(7), now);
    assert_eq!((s.stage(), s.wants(), s.deadline()), (Stage::Handshaking, Want::Read, now + Duration::from_secs(10)));
    let mut stages = vec![s.stage()];
    let mut chain = None;
    let mut sent_request = false;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !c.is_handshaking() && !sent_request {
            c.writer().write_all(REQUEST).unwrap();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            sent_request = true;
        }
        if !buf.is_empty() {
            s.on_bytes(now, &mut buf);
        }
        while let Some(a) = s.poll_action() {
            match a {
                SetupAction::Write(b) => {
                    c.read_tls(&mut b.as_slice()).unwrap();
                    c.process_new_packets().unwrap();
                }
                SetupAction::Handshaken(ch) => chain = Some(ch),
                SetupAction::Open(o) => {
                    assert_eq!(o.device.subject, "O=Acme Devices, CN=oven-1");
                    assert_eq!(o.connection_id, ConnectionId(7));
                    s.on_open_sent(now, true);
                    s.on_open_answer(OpenOutcome::Accepted(None));
                }
                SetupAction::Established(_) => {}
                _ => panic!("unexpected action"),
            }
        }
        if stages.last() != Some(&s.stage()) {
            stages.push(s.stage());
        }
        if s.stage() == Stage::Streaming {
            break;
        }
    }
    assert_eq!((stages.first(), stages.last()), (Some(&Stage::Handshaking), Some(&Stage::Streaming)), "{stages:?}");
    assert!(stages.windows(2).all(|w| w[0] < w[1]), "forward only: {stages:?}");
    assert_eq!(chain.expect("handshaken").len(), 1);
    let mut resp = String::new();
    c.reader().read_to_string(&mut resp).ok();
    assert!(resp.starts_with("HTTP/1.1 101 "), "{resp}");
}

#[test]
fn a_handshake_that_does_not_finish_in_time_is_refused_as_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = crate::tls::handshake::tests::setup(dir.path());
    let now = Instant::now();
    let mut s = accepted(&ctx, ConnectionId(8), now);
    let mut buf = b"\x16\x03\x01\x00".to_vec(); // a record header's start, then nothing
    s.on_bytes(now, &mut buf);
    assert!(drain(&mut s).is_empty());
    s.on_timeout(now + Duration::from_secs(10));
    let acts = drain(&mut s);
    let [SetupAction::Ended(e)] = acts.as_slice() else { panic!() };
    assert!(matches!(&e.end, End::Refused(h) if h.reason == Refusal::Timeout) && e.rl.is_none());
}

#[test]
fn a_malformed_client_hello_is_refused_with_an_alert() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = crate::tls::handshake::tests::setup(dir.path());
    let now = Instant::now();
    let mut s = accepted(&ctx, ConnectionId(9), now);
    let mut buf = b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff".to_vec(); // a ClientHello that is cut short
    s.on_bytes(now, &mut buf);
    let acts = drain(&mut s);
    assert!(matches!(acts.first(), Some(SetupAction::Write(alert)) if alert[0] == 21), "an alert record first");
    assert!(matches!(acts.last(), Some(SetupAction::Ended(e)) if matches!(e.end, End::Refused(_))));
    assert_eq!(s.stage(), Stage::Closing);
}

/// RFC 8446 4.6.3: a KeyUpdate request is answered while the device waits,
/// not only once holdfast has data to send. A device that sent half its
/// upgrade request and a KeyUpdate, then waited for the answer before
/// sending the rest, got it only with the upgrade timeout's 408.
#[test]
fn key_update_requested_mid_upgrade_is_answered_once_the_device_is_quiet() {
    let t0 = Instant::now();
    let (mut device, mut s) = upgrading(t0);
    let stage_deadline = s.deadline();
    let mut buf = seal(&mut device, &REQUEST[..3]);
    device.send_key_update(true, &mut buf).unwrap();
    s.on_bytes(t0, &mut buf);
    assert!(buf.is_empty());
    assert!(written(&drain(&mut s)).is_empty(), "a burst may bring more requests: not yet");
    // More requests while the device is still talking: one answer for all.
    let t1 = t0 + KEY_UPDATE_QUIET / 2;
    let mut buf = Vec::new();
    device.send_key_update(true, &mut buf).unwrap();
    device.send_key_update(true, &mut buf).unwrap();
    s.on_bytes(t1, &mut buf);
    assert_eq!(s.deadline(), t1 + KEY_UPDATE_QUIET, "due once the device has been quiet");
    s.on_timeout(t1 + KEY_UPDATE_QUIET / 2);
    assert!(drain(&mut s).is_empty(), "early: nothing");
    s.on_timeout(t1 + KEY_UPDATE_QUIET);
    assert_eq!(s.stage(), Stage::Upgrading, "the upgrade goes on");
    assert_eq!(s.deadline(), stage_deadline, "nothing owed: the upgrade timeout again");
    let answer = written(&drain(&mut s));
    assert_eq!(open(&mut device, answer), b"", "a KeyUpdate, no data");
    assert_eq!(device.key_updates(), (3, 1), "one answer for three requests");
    // The rest of the request, under the device's newest key, opens the stream.
    let mut buf = seal(&mut device, &REQUEST[3..]);
    s.on_bytes(t1 + KEY_UPDATE_QUIET, &mut buf);
    assert!(drain(&mut s).iter().any(|a| matches!(a, SetupAction::Open(_))));
}

/// Requests followed by the whole upgrade request in one burst: the answer
/// goes out before the 101 (holdfast's first data), not on a timer.
#[test]
fn key_update_before_the_request_is_answered_before_the_101() {
    let now = Instant::now();
    let (mut device, mut s) = upgrading(now);
    let mut buf = Vec::new();
    device.send_key_update(true, &mut buf).unwrap();
    buf.extend(seal(&mut device, REQUEST));
    s.on_bytes(now, &mut buf);
    assert!(drain(&mut s).iter().any(|a| matches!(a, SetupAction::Open(_))));
    s.on_open_sent(now, true);
    assert_eq!(s.deadline(), now + Duration::from_secs(3), "no KeyUpdate timer outside the upgrade stage");
    s.on_open_answer(OpenOutcome::Accepted(None));
    let resp = String::from_utf8(open(&mut device, written(&drain(&mut s)))).unwrap();
    assert!(resp.starts_with("HTTP/1.1 101 "), "{resp}");
    assert_eq!(device.key_updates(), (1, 1), "answered first, in the same write");
}
