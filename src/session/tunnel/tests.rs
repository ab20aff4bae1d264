//! Every transition of the tunnel core, through the in-memory harness:
//! a device, the core, its link session and a WSM, in virtual time.

use std::time::Duration;

use super::*;
use crate::link::codec::Frame;
use crate::session::harness::{self, Pair, STREAM_WINDOW};
use crate::tls::record::KEY_UPDATE_QUIET;
use crate::ws::frame::Event;

fn messages(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Message { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .collect()
}

fn texts(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .collect()
}

fn close_of(events: &[Event]) -> Option<u16> {
    events.iter().find_map(|e| match e {
        Event::Close { code, .. } => Some(code.unwrap_or(1005)),
        _ => None,
    })
}

fn stream_close(frames: &[Frame]) -> Option<(CloseReason, u16)> {
    frames.iter().find_map(|f| match f {
        Frame::Close { reason, code, .. } => Some((*reason, *code)),
        _ => None,
    })
}

#[test]
fn messages_flow_both_ways_and_stream_credit_goes_back_by_the_quarter_window() {
    let mut p = Pair::new();
    p.device_text("hello");
    p.settle();
    assert_eq!(messages(&p.wsm_got(0)), ["hello"]);
    assert!(p.counts.contains(&Count::MessageFromDevice));
    // A quarter of the stream window delivered: its credit goes back.
    let quarter = vec![b'x'; STREAM_WINDOW as usize / 4];
    p.wsm_message(&quarter);
    let got = p.device_got();
    assert_eq!(texts(&got).len(), 1);
    let credit: Vec<_> = p.wsm_got(0).into_iter().filter(|f| matches!(f, Frame::Credit { stream, .. } if *stream != 0)).collect();
    assert_eq!(credit.len(), 1, "stream credit for the delivered quarter window");
    assert!(p.end.is_none());
}

#[test]
fn a_ping_is_answered_and_a_close_is_echoed_and_passed_on_with_its_code() {
    let mut p = Pair::new();
    p.device_frame(op::PING, b"are you there");
    p.settle();
    assert!(p.device_got().iter().any(|e| matches!(e, Event::Pong(d) if d == b"are you there")));
    let mut payload = 4001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    p.device_frame(op::CLOSE, &payload);
    p.settle();
    assert!(matches!(p.end, Some(End::DeviceClosed)));
    assert_eq!(close_of(&p.device_got()), Some(4001), "the close is echoed");
    assert!(p.dev_tls_closed, "and the TLS session closed with close_notify");
    assert_eq!(stream_close(&p.wsm_got(0)), Some((CloseReason::DeviceGone, 4001)));
}

#[test]
fn an_idle_device_is_pinged_then_closed_with_1001_and_the_wsm_told() {
    let mut lim = harness::limits();
    lim.ping_interval = Some(Duration::from_secs(30));
    lim.idle_timeout = Some(Duration::from_secs(100));
    let mut p = Pair::with(lim, codec::DEFAULT_MAX_FRAME);
    p.advance(Duration::from_secs(29));
    assert!(p.device_got().is_empty());
    p.advance(Duration::from_secs(1));
    assert!(p.device_got().iter().any(|e| matches!(e, Event::Ping(_))), "a ping at the interval");
    p.advance(Duration::from_secs(29));
    assert!(p.device_got().is_empty(), "the next ping waits a whole interval");
    // The device answers, which counts as hearing from it.
    p.device_frame(op::PONG, b"");
    p.settle();
    assert!(p.end.is_none());
    p.advance(Duration::from_secs(99));
    assert!(p.end.is_none(), "idle is counted from the device's last bytes");
    p.advance(Duration::from_secs(2));
    assert!(matches!(p.end, Some(End::Idle)));
    assert_eq!(close_of(&p.device_got()), Some(close::GOING_AWAY));
    assert_eq!(stream_close(&p.wsm_got(0)), Some((CloseReason::DeviceGone, close::GOING_AWAY)));
    assert!(p.counts.contains(&Count::IdleTimeout));
}

#[test]
fn a_wsm_close_reaches_the_device_with_a_valid_code_and_no_close_goes_back() {
    let mut p = Pair::new();
    let sid = p.stream.unwrap().1;
    p.wsm_frame(0, Frame::Close { stream: sid, reason: CloseReason::WsmClosed, code: 1005, text: "x".into() });
    assert!(matches!(p.end, Some(End::WsmClosed)));
    assert_eq!(close_of(&p.device_got()), Some(close::NORMAL), "1005 may not be sent: 1000 instead");
    assert_eq!(stream_close(&p.wsm_got(0)), None);
}

#[test]
fn a_message_above_the_wsms_frame_limit_closes_only_this_device_with_1009() {
    let mut p = Pair::with(harness::limits(), 1000);
    p.device_frame(op::BINARY, &[0; 995]);
    p.settle();
    assert!(matches!(p.end, Some(End::Ws(WsError { code: close::TOO_BIG, .. }))));
    assert_eq!(close_of(&p.device_got()), Some(close::TOO_BIG));
    let got = p.wsm_got(0);
    assert!(messages(&got).is_empty(), "the WSM never sees the frame that would kill the link");
    assert_eq!(stream_close(&got), Some((CloseReason::DeviceGone, close::TOO_BIG)));
    assert!(p.links[0].session.is_up());
}

#[test]
fn bad_frames_are_closed_with_their_code() {
    // Unmasked frame from a client: 1002.
    let mut p = Pair::new();
    let mut f = Vec::new();
    frame::encode(&mut f, op::TEXT, b"x", None);
    p.device_plain(&f);
    p.settle();
    assert!(matches!(p.end, Some(End::Ws(WsError { code: close::PROTOCOL_ERROR, .. }))));
    assert_eq!(close_of(&p.device_got()), Some(close::PROTOCOL_ERROR));
    assert!(p.counts.contains(&Count::WsError(close::PROTOCOL_ERROR)));
    // Invalid UTF-8 in a text message: 1007.
    let mut p = Pair::new();
    p.device_frame(op::TEXT, &[0xff, 0xfe]);
    p.settle();
    assert_eq!(close_of(&p.device_got()), Some(close::INVALID_DATA));
}

#[test]
fn a_corrupted_record_ends_with_an_alert() {
    let mut p = Pair::new();
    p.device_text("ok");
    let n = p.to_core.len();
    p.to_core[n - 1] ^= 1;
    p.settle();
    assert!(matches!(p.end, Some(End::Record(crate::tls::record::RecordError::BadRecordMac))));
    assert!(p.dev_tls_closed, "the device gets the alert");
    assert_eq!(stream_close(&p.wsm_got(0)), Some((CloseReason::DeviceGone, 1006)));
}

#[test]
fn a_devices_close_notify_is_answered_with_close_notify_and_its_stream_closed_as_gone() {
    let mut p = Pair::new();
    p.device_text("last words");
    p.device_close_notify();
    p.settle();
    assert!(matches!(p.end, Some(End::CloseNotify)), "{:?}", p.end);
    assert!(p.dev_tls_closed, "the device gets close_notify back (RFC 8446 6.1), not a bare TCP close");
    let frames = p.wsm_got(0);
    assert_eq!(messages(&frames), ["last words"], "what came before the close_notify is delivered");
    assert_eq!(stream_close(&frames), Some((CloseReason::DeviceGone, close::GOING_AWAY)));
}

#[test]
fn a_partial_record_waits_for_the_rest() {
    let mut p = Pair::new();
    p.device_text("split");
    let rest = p.to_core.split_off(7);
    p.settle();
    assert!(p.wsm_got(0).is_empty());
    p.device_raw(&rest);
    p.settle();
    assert_eq!(messages(&p.wsm_got(0)), ["split"]);
}

#[test]
fn the_device_is_not_read_while_its_stream_has_no_credit() {
    let mut p = Pair::new();
    let (i, sid) = p.stream.unwrap();
    p.device_frame(op::BINARY, &vec![1; STREAM_WINDOW as usize]);
    p.settle();
    assert!(!p.links[i].session.may_send(sid));
    p.device_text("later");
    p.settle();
    assert!(!p.to_core.is_empty(), "no credit: the device's bytes stay unread (TCP backpressure)");
    p.wsm_frame(i, Frame::Credit { stream: sid, bytes: STREAM_WINDOW });
    assert!(p.to_core.is_empty());
    assert_eq!(messages(&p.wsm_got(i)).last().map(String::as_str), Some("later"));
}

#[test]
fn a_lost_link_holds_messages_and_a_new_wsm_gets_the_unacknowledged_first_then_the_held() {
    let mut p = Pair::new();
    p.device_text("one");
    p.device_text("two");
    p.settle();
    let sid = p.stream.unwrap().1;
    // The WSM acknowledges "one" (3 bytes) but not "two".
    p.wsm_frame(0, Frame::Credit { stream: sid, bytes: 3 });
    p.kill_link(0);
    assert!(p.core.is_held());
    assert!(p.counts.contains(&Count::StreamDetached));
    p.device_text("three");
    p.settle();
    assert!(p.end.is_none());
    let b = p.add_link(codec::DEFAULT_MAX_FRAME);
    p.advance(Duration::from_millis(250));
    let got = p.wsm_got(b);
    match &got[0] {
        Frame::Open { open, .. } => {
            assert!(open.resumed, "a resumed OPEN");
            assert_eq!(open.connection_id, p.id, "with the same connection ID");
        }
        other => panic!("expected OPEN, got {other:?}"),
    }
    assert_eq!(messages(&got), ["two", "three"], "the unacknowledged first, nothing the old WSM acknowledged");
    assert!(!p.core.is_held());
    assert!(p.counts.contains(&Count::MessagesResent(1)));
    assert!(p.counts.contains(&Count::Resumed { adopted: false }));
    let held: i64 = p.counts.iter().filter_map(|c| if let Count::HeldBytes(n) = c { Some(*n) } else { None }).sum();
    assert_eq!(held, 0, "every held byte is given back to the shard");
    // Attached again: messages flow at once.
    p.device_text("four");
    p.settle();
    assert_eq!(messages(&p.wsm_got(b)), ["four"]);
}

#[test]
fn a_held_tunnel_gives_up_with_1013_after_the_resume_time() {
    let mut p = Pair::new();
    p.kill_link(0);
    p.advance(Duration::from_secs(19));
    assert!(p.end.is_none());
    p.advance(Duration::from_secs(2));
    assert!(matches!(p.end, Some(End::NoWsm)));
    assert_eq!(close_of(&p.device_got()), Some(close::TRY_AGAIN));
    assert!(p.counts.contains(&Count::ResumeFailed { adopted: false }));
}

#[test]
fn held_bytes_are_given_back_before_the_device_sees_its_close() {
    // Each way a held tunnel ends with a close to the device.
    let give_up = |p: &mut Pair| p.advance(Duration::from_secs(21));
    let evict = |p: &mut Pair| {
        let e = p.core.evicted();
        p.end_with(e);
    };
    let idle = |p: &mut Pair| p.advance(Duration::from_secs(600));
    for (what, end) in [("give up", &give_up as &dyn Fn(&mut Pair)), ("evicted", &evict), ("idle", &idle)] {
        let mut lim = harness::limits();
        lim.resume_timeout = Duration::from_secs(if what == "idle" { 3600 } else { 20 });
        let mut p = Pair::with(lim, codec::DEFAULT_MAX_FRAME);
        p.kill_link(0);
        p.device_text("held one");
        p.device_text("held two");
        p.settle();
        assert_eq!(p.held, 16, "{what}: both held");
        end(&mut p);
        assert!(p.end.is_some(), "{what}: ended");
        assert_eq!(p.held_at_close, Some(0), "{what}: the count was back to zero when the close arrived");
        assert_eq!(p.held, 0, "{what}");
    }
}

#[test]
fn a_held_tunnel_stops_reading_at_its_bound() {
    let mut lim = harness::limits();
    lim.held_bytes_per_connection = 100;
    let mut p = Pair::with(lim, codec::DEFAULT_MAX_FRAME);
    p.kill_link(0);
    p.device_frame(op::BINARY, &[0; 100]);
    p.settle();
    assert!(!p.core.wants_read(true, true), "at its bound");
    assert!(!Pair::new().core.wants_read(false, true), "attached and without credit");
    let mut q = Pair::new();
    q.kill_link(0);
    assert!(!q.core.wants_read(true, false), "the shard's bound");
    assert!(q.core.wants_read(false, true));
}

#[test]
fn a_resumed_open_left_unanswered_is_closed_and_tried_again() {
    let mut p = Pair::new();
    p.kill_link(0);
    let b = p.add_link(codec::DEFAULT_MAX_FRAME);
    p.links[b].wsm.auto_accept = false;
    p.advance(Duration::from_millis(250));
    assert!(matches!(p.wsm_got(b).first(), Some(Frame::Open { .. })));
    p.advance(Duration::from_secs(5));
    let got = p.wsm_got(b);
    assert_eq!(stream_close(&got), Some((CloseReason::Error, close::INTERNAL)), "the stuck OPEN is closed");
    assert!(got.iter().any(|f| matches!(f, Frame::Open { .. })), "and another OPEN follows");
}

#[test]
fn a_refused_resume_is_tried_again() {
    let mut p = Pair::new();
    p.kill_link(0);
    let b = p.add_link(codec::DEFAULT_MAX_FRAME);
    p.links[b].wsm.auto_accept = false;
    p.advance(Duration::from_millis(250));
    let sid = p.stream.unwrap().1;
    assert!(p.core.is_held() && p.core.has_stream());
    p.links[b].wsm.auto_accept = true;
    p.wsm_frame(b, Frame::Refuse { stream: sid, status: 503, reason: "busy".into() });
    let opens = p.wsm_got(b).iter().filter(|f| matches!(f, Frame::Open { .. })).count();
    assert_eq!(opens, 2, "a second OPEN after the refusal");
    assert!(!p.core.is_held(), "accepted on the second OPEN");
}

#[test]
fn a_move_by_plan_quiesces_closes_as_handed_elsewhere_and_resumes_with_nothing_resent() {
    let mut p = Pair::new();
    p.device_text("before");
    p.settle();
    let b = p.add_link(codec::DEFAULT_MAX_FRAME);
    assert!(p.begin_move());
    let got = p.wsm_got(0);
    assert!(matches!(got.last(), Some(Frame::Handoff { .. })));
    assert!(!p.core.wants_read(true, true), "the device waits while the stream quiesces");
    // What the WSM sends before its ack still reaches the device.
    p.wsm_message(b"last words");
    assert_eq!(texts(&p.device_got()), ["last words"]);
    p.wsm_handoff_ack();
    assert_eq!(stream_close(&p.wsm_got(0)), Some((CloseReason::HandedElsewhere, 1000)));
    assert!(p.counts.contains(&Count::StreamMoved));
    p.settle();
    let got = p.wsm_got(b);
    assert!(matches!(got.first(), Some(Frame::Open { open, .. }) if open.resumed));
    assert!(messages(&got).is_empty(), "the old WSM processed everything: nothing is sent twice");
    assert!(!p.core.is_held());
}

#[test]
fn a_quiesce_that_is_never_acknowledged_has_a_deadline() {
    let mut p = Pair::new();
    assert!(p.begin_move());
    assert_eq!(p.core.quiesce_deadline(), Some(p.now + HANDOFF_ACK_TIMEOUT));
    assert!(p.core.deadline(p.now).unwrap() <= p.now + HANDOFF_ACK_TIMEOUT);
    let mut held = Pair::new();
    held.kill_link(0);
    assert!(!held.begin_move(), "no accepted stream, nothing to quiesce");
}

#[test]
fn a_snapshot_carries_everything_and_only_its_commit_changes_the_tunnel() {
    let mut p = Pair::new();
    p.kill_link(0);
    p.device_text("held one");
    // Half a frame: the decoder travels too.
    let mut f = Vec::new();
    frame::encode(&mut f, op::TEXT, b"half", Some([9, 9, 9, 9]));
    p.device_plain(&f[..3]);
    p.settle();
    let snap = p.core.snapshot(p.id, "127.0.0.1:4000".into(), vec![1, 2, 3], p.now);
    assert_eq!(snap.held, vec![(false, b"held one".to_vec())]);
    assert!(snap.decoder.is_some());
    assert_eq!(snap.rx, vec![1, 2, 3]);
    // Not committed: the tunnel still holds its message.
    assert!(p.core.is_held());
    // The new process adopts it and re-opens at once, held message first.
    let (_, rl) = crate::tls::record::testing::pair(crate::tls::record::Version::Tls13, crate::tls::keys::Suite::Aes128Gcm);
    let mut snap2 = snap.clone();
    let mut adopted = Tunnel::adopted(rl, &mut snap2, &Default::default(), std::rc::Rc::new(harness::limits()), p.now);
    assert!(adopted.is_held());
    assert_eq!(adopted.held_wants(p.now, false).unwrap(), HeldWants::Reopen { paced: false }, "the upgrade paced itself");
    assert_eq!(adopted.poll_action(), Some(Action::Count(Count::HeldBytes(8))));
    assert_eq!(adopted.poll_action(), Some(Action::Count(Count::Held(true))), "counted as holding");
    // Commit: the held bytes go back to this shard.
    let end = p.core.handed_over();
    assert!(matches!(end, End::HandedOver));
    assert!(p.core.poll_action() == Some(Action::Count(Count::HeldBytes(-8))));
    assert_eq!(end.stream_close(1000), None);
}

#[test]
fn an_upgrade_moves_a_held_tunnel_as_it_is() {
    let mut p = Pair::new();
    p.kill_link(0);
    assert_eq!(p.core.held_wants(p.now, true).unwrap(), HeldWants::HandOver);
}

#[test]
fn an_attached_tunnel_commits_a_handover_by_closing_its_stream_as_handed_elsewhere() {
    let mut p = Pair::new();
    let _ = p.core.snapshot(p.id, String::new(), Vec::new(), p.now);
    let end = p.core.handed_over();
    assert_eq!(p.core.poll_action(), Some(Action::CloseStream { reason: CloseReason::HandedElsewhere, code: 1000, text: String::new() }));
    assert!(matches!(end, End::HandedOver));
}

#[test]
fn eviction_closes_with_1008() {
    let mut p = Pair::new();
    let e = p.core.evicted();
    p.settle();
    assert!(matches!(e, End::PartialEvicted));
    assert_eq!(close_of(&p.device_got()), Some(close::POLICY));
}

#[test]
fn expanded_keys_are_dropped_after_a_quiet_while() {
    let mut p = Pair::new();
    p.device_text("warm");
    p.settle();
    let d = p.core.deadline(p.now).unwrap();
    assert!(d <= p.now + COOL_AFTER, "a deadline to cool the keys");
    p.advance(COOL_AFTER);
    let cooled = p.core.deadline(p.now).unwrap();
    assert!(cooled > p.now + COOL_AFTER, "then only the ping and idle deadlines remain");
    p.device_text("still works");
    p.settle();
    assert_eq!(messages(&p.wsm_got(0)), ["warm", "still works"]);
}

#[test]
fn a_paced_close_sends_its_code_and_the_wsm_hears_device_gone() {
    use crate::session::end::Paced;
    for (why, code, sent) in [(Paced::Drain, 1012, 1012), (Paced::Stop, 1001, 1001), (Paced::Age, 1001, 1001), (Paced::Migrate, 999, 1001)]
    {
        let mut p = Pair::new();
        p.device_text("before");
        p.settle();
        let e = p.core.paced(why, code);
        p.end_with(e);
        assert!(matches!(p.end, Some(End::Paced(w, c)) if w == why && c == sent), "{why:?}: {:?}", p.end);
        let got = p.device_got();
        assert_eq!(close_of(&got), Some(sent), "{why:?}: a close frame (an invalid code becomes 1001)");
        let frames = p.wsm_got(0);
        assert_eq!(messages(&frames), ["before"], "{why:?}: what the device sent went first");
        assert_eq!(stream_close(&frames), Some((CloseReason::DeviceGone, sent)), "{why:?}");
        assert_eq!(End::Paced(why, sent).tls_goodbye(), crate::session::end::TlsGoodbye::CloseNotify);
    }
}

#[test]
fn a_key_update_the_device_asked_for_is_answered_once_before_data_or_a_hand_over() {
    let mut p = Pair::new();
    for _ in 0..5 {
        p.device_key_update();
    }
    p.settle();
    assert_eq!(p.device_key_updates(), (5, 0), "the answer waits for holdfast's next data");
    p.wsm_message(b"after");
    p.settle();
    assert_eq!(p.device_key_updates(), (5, 1), "one answer for five requests, before the data");
    assert_eq!(texts(&p.dev_events), vec!["after".to_string()]);
    // A request still owed when the connection moves: answered first.
    p.device_key_update();
    p.settle();
    assert_eq!(p.device_key_updates(), (6, 1));
    p.core.answer_key_update().unwrap();
    p.settle();
    assert_eq!(p.device_key_updates(), (6, 2));
    p.core.answer_key_update().unwrap();
    p.settle();
    assert_eq!(p.device_key_updates(), (6, 2), "owed once, answered once");
}

/// A device that asks for a KeyUpdate and then waits for it (tlsfuzzer's
/// "app data split" probe) gets it once it has been quiet a while, with no
/// data of holdfast's to carry it; requests that keep coming while the
/// device talks get one answer for all.
#[test]
fn a_key_update_the_device_waits_for_is_answered_once_it_is_quiet() {
    let mut p = Pair::new();
    let t0 = p.now;
    p.device_key_update();
    p.settle();
    assert_eq!(p.core.deadline(p.now), Some(t0 + KEY_UPDATE_QUIET), "the answer's timer is the first");
    for _ in 0..3 {
        p.advance(KEY_UPDATE_QUIET / 2);
        p.device_key_update();
        p.device_text("still talking");
        p.settle();
    }
    assert_eq!(p.device_key_updates(), (4, 0), "a device that keeps talking is not answered yet");
    p.advance(KEY_UPDATE_QUIET / 2);
    assert_eq!(p.device_key_updates(), (4, 0));
    p.advance(KEY_UPDATE_QUIET / 2);
    assert_eq!(p.device_key_updates(), (4, 1), "quiet for KEY_UPDATE_QUIET: one answer");
    assert!(p.core.deadline(p.now).is_none_or(|d| d > p.now + KEY_UPDATE_QUIET), "nothing owed");
    assert_eq!(messages(&p.wsm_got(0)), ["still talking"; 3]);
    p.wsm_message(b"after");
    p.settle();
    assert_eq!(p.device_key_updates(), (4, 1), "the data owed nothing more");
    assert_eq!(texts(&p.dev_events), vec!["after".to_string()]);
}
