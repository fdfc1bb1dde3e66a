//! The session's decisions, one at a time, without a network.

use super::*;

#[derive(Debug, Clone, PartialEq)]
struct M(u64, Qos);

impl Queued for M {
    fn id(&self) -> u64 {
        self.0
    }
    fn qos(&self) -> Qos {
        self.1
    }
    fn set_qos(&mut self, qos: Qos) {
        self.1 = qos;
    }
    fn priority(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        10
    }
    fn expires_ms(&self) -> Option<u64> {
        None
    }
    fn max_attempts(&self) -> Option<u32> {
        None
    }
    fn attempts(&self) -> u32 {
        0
    }
    fn count_attempt(&mut self) {}
}

/// Frames as text: "P<pid>:<id>" for PUBLISH, "R<pid>" for PUBREL.
struct Text;

impl Wire<M> for Text {
    fn publish(&mut self, m: &M, pid: Option<u16>, dup: bool, out: &mut Vec<u8>) -> Result<(), DropReason> {
        out.extend(format!("P{}:{}{} ", pid.unwrap_or(0), m.0, if dup { "d" } else { "" }).into_bytes());
        Ok(())
    }
    fn pubrel(&mut self, pid: u16) -> Vec<u8> {
        format!("R{pid} ").into_bytes()
    }
    fn ping(&mut self) -> Vec<u8> {
        b"PING ".to_vec()
    }
}

fn at(t0: Instant, ms: u64) -> Now {
    Now { at: t0 + Duration::from_millis(ms), wall_ms: ms }
}

fn connected(msgs: &[M]) -> (PublishSession<M>, Instant) {
    connected_with(msgs, AckTimeout::Fixed(Duration::from_secs(5)))
}

fn connected_with(msgs: &[M], ack_timeout: AckTimeout) -> (PublishSession<M>, Instant) {
    let t0 = Instant::now();
    let cfg = SessionConfig {
        max_inflight: 10,
        keep_alive: Duration::from_secs(30),
        ack_timeout,
        refused_pause: Duration::from_secs(1),
        page: ReadLimit { count: 100, bytes: 1 << 20 },
        poison_after: 3,
    };
    let mut s = PublishSession::new(cfg, t0);
    s.handle_connack(ConnAckInfo::default(), at(t0, 0), &|_| true, &mut Text);
    let newest = [msgs.last().map_or(0, |m| m.0); PRIORITIES];
    s.handle_page(msgs.to_vec(), 0, newest[0], &|_| true);
    (s, t0)
}

fn sent(s: &mut PublishSession<M>) -> String {
    String::from_utf8(s.poll_transmit().unwrap_or_default()).expect("text")
}

fn ops(s: &mut PublishSession<M>) -> Vec<StoreOp> {
    std::iter::from_fn(|| s.poll_store()).collect()
}

#[test]
fn a_qos2_publish_leaves_only_after_its_binding_is_written() {
    let (mut s, t0) = connected(&[M(1, Qos::AtLeastOnce), M(2, Qos::ExactlyOnce), M(3, Qos::AtLeastOnce)]);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    assert_eq!(sent(&mut s), "P1:1 ", "what comes before the QoS 2 message goes out at once");
    assert_eq!(ops(&mut s), vec![StoreOp::Bind(vec![(2, Some((2, Stage::Published)))])]);
    s.fill(at(t0, 2), &|_| true, &mut Text);
    assert_eq!(sent(&mut s), "", "nothing moves while the bind is under way");
    s.handle_bound(Bound::Written { gone: vec![] }, at(t0, 50), &mut Text);
    assert_eq!(sent(&mut s), "P2:2 P3:3 ", "held packets go out in order");
}

#[test]
fn a_failed_bind_sends_nothing_it_held_and_gives_the_ids_back() {
    let (mut s, t0) = connected(&[M(1, Qos::ExactlyOnce), M(2, Qos::AtLeastOnce)]);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    ops(&mut s);
    s.handle_bound(Bound::Failed, at(t0, 50), &mut Text);
    assert_eq!(sent(&mut s), "");
    assert_eq!(s.in_flight(), 0, "packet ids are given back");
    s.fill(at(t0, 2), &|_| true, &mut Text);
    assert!(matches!(ops(&mut s).as_slice(), [StoreOp::Bind(_)]), "the messages are tried again, first");
}

#[test]
fn acks_before_a_stray_still_count() {
    let (mut s, t0) = connected(&[M(1, Qos::AtLeastOnce), M(2, Qos::AtLeastOnce)]);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    sent(&mut s);
    let r = s.handle_acks([Ack::PubAck { pid: 1, code: 0 }, Ack::PubAck { pid: 99, code: 0 }], at(t0, 2));
    assert_eq!(r, Err(End::Stray { packet: "PUBACK", pid: 99, kind: "QoS 1 message" }));
    assert_eq!(ops(&mut s), vec![StoreOp::Ack(vec![1])]);
}

/// A refusal no retry changes (0x87 not authorised, Mosquitto's 0x95 too
/// large) moves the message aside as poison with its code; a passing one
/// (0x97 quota exceeded) keeps it, sent again after the pause; the
/// messages behind both go on.
#[test]
fn a_refusal_for_good_is_poison_with_its_code_and_a_passing_one_is_sent_again() {
    let msgs = [M(1, Qos::AtLeastOnce), M(2, Qos::ExactlyOnce), M(3, Qos::AtLeastOnce), M(4, Qos::AtLeastOnce)];
    let (mut s, t0) = connected(&msgs);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    ops(&mut s);
    s.handle_bound(Bound::Written { gone: vec![] }, at(t0, 2), &mut Text);
    assert_eq!(sent(&mut s), "P1:1 P2:2 P3:3 P4:4 ");
    let acks = [
        Ack::PubAck { pid: 1, code: 0x87 },
        Ack::PubRec { pid: 2, code: 0x95 },
        Ack::PubAck { pid: 3, code: 0x97 },
        Ack::PubAck { pid: 4, code: 0x10 },
    ];
    s.handle_acks(acks, at(t0, 3)).unwrap();
    assert_eq!(
        ops(&mut s),
        vec![
            StoreOp::Ack(vec![4]),
            StoreOp::Poison(1, PoisonCause::Refused(0x87)),
            StoreOp::Poison(2, PoisonCause::Refused(0x95)),
        ],
        "0x10 (no matching subscribers) is a delivery; the QoS 2 binding goes with the poison"
    );
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(events.contains(&SessionEvent::Refused(M(3, Qos::AtLeastOnce), 0x97)), "{events:?}");
    assert!(
        events.contains(&SessionEvent::Poisoned { message: M(1, Qos::AtLeastOnce), cause: PoisonCause::Refused(0x87) })
    );
    assert_eq!(s.in_flight(), 0);
    s.fill(at(t0, 500), &|_| true, &mut Text);
    assert_eq!(sent(&mut s), "", "a passing refusal waits for its pause");
    s.fill(at(t0, 1_004), &|_| true, &mut Text);
    assert_eq!(sent(&mut s), "P5:3 ", "then goes again, under a new packet id; the poison does not");
}

/// Mosquitto closes the link right after its PUBACK 0x95: with the window
/// well used, that close would halve it, as for a broker that caps
/// messages in flight. A close before anything else was acknowledged is
/// the refusal's; a later one teaches again.
#[test]
fn a_close_right_after_a_refusal_for_good_is_the_refusals() {
    let msgs: Vec<M> = (1..=12).map(|id| M(id, Qos::AtLeastOnce)).collect();
    let (mut s, t0) = connected(&msgs);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    assert_eq!(s.in_flight(), 10);
    s.handle_acks([Ack::PubAck { pid: 1, code: 0x95 }], at(t0, 2)).unwrap();
    let window = s.window_size();
    s.handle_link_lost(LinkEnd::Closed);
    assert_eq!(s.window_size(), window, "nine in flight, and the window stays");
    assert!(!std::iter::from_fn(|| s.poll_event()).any(|e| matches!(e, SessionEvent::Window(_))));
    s.handle_connack(ConnAckInfo { session_present: true, ..Default::default() }, at(t0, 3), &|_| true, &mut Text);
    s.handle_link_lost(LinkEnd::Closed);
    assert!(s.window_size() < window, "a close with nothing refused before it is the window's");
}

/// What came last decides: a refusal for good after an acknowledgement in
/// the same read explains the close; an acknowledgement after it does not.
#[test]
fn a_close_is_the_refusals_only_when_nothing_was_taken_after_it() {
    for (acks, explained) in [
        ([Ack::PubAck { pid: 1, code: 0 }, Ack::PubAck { pid: 2, code: 0x87 }], true),
        ([Ack::PubAck { pid: 1, code: 0x87 }, Ack::PubAck { pid: 2, code: 0 }], false),
    ] {
        let msgs: Vec<M> = (1..=12).map(|id| M(id, Qos::AtLeastOnce)).collect();
        let (mut s, t0) = connected(&msgs);
        s.fill(at(t0, 1), &|_| true, &mut Text);
        s.handle_acks(acks, at(t0, 2)).unwrap();
        let window = s.window_size();
        s.handle_link_lost(LinkEnd::Closed);
        assert_eq!(s.window_size() == window, explained, "{acks:?}");
    }
}

/// Mosquitto may close the link before its PUBACK 0x95 leaves: the close
/// halves the window, and the message, on the wire again, is refused for
/// good on the next link. That refusal explains the close: the window
/// comes back.
#[test]
fn a_refusal_for_good_of_a_suspect_gives_the_window_back() {
    let msgs: Vec<M> = (1..=12).map(|id| M(id, Qos::AtLeastOnce)).collect();
    let (mut s, t0) = connected(&msgs);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    let window = s.window_size();
    s.handle_link_lost(LinkEnd::Closed);
    assert!(s.window_size() < window, "ten in flight at a close: halved");
    s.handle_connack(ConnAckInfo { session_present: true, ..Default::default() }, at(t0, 2), &|_| true, &mut Text);
    std::iter::from_fn(|| s.poll_event()).for_each(drop);
    s.handle_acks([Ack::PubAck { pid: 1, code: 0x95 }], at(t0, 3)).unwrap();
    assert_eq!(s.window_size(), window);
    assert!(std::iter::from_fn(|| s.poll_event()).any(|e| e == SessionEvent::WindowRestored(window)));
}

/// A QoS 1 and a QoS 2 message in flight (its binding written), then the
/// link lost.
fn in_flight_then_lost() -> (PublishSession<M>, Instant) {
    let (mut s, t0) = connected(&[M(1, Qos::AtLeastOnce), M(2, Qos::ExactlyOnce)]);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    ops(&mut s);
    s.handle_bound(Bound::Written { gone: vec![] }, at(t0, 50), &mut Text);
    sent(&mut s);
    s.handle_link_lost(LinkEnd::Closed);
    (s, t0)
}

#[test]
fn a_kept_session_resends_and_a_lost_one_clears_bindings_first() {
    let (mut s, t0) = in_flight_then_lost();
    let kept = ConnAckInfo { session_present: true, reconnect: true, ..ConnAckInfo::default() };
    assert_eq!(s.handle_connack(kept, at(t0, 10), &|_| true, &mut Text).resent, 2);
    assert_eq!(sent(&mut s), "P1:1d P2:2d ");
    s.handle_link_lost(LinkEnd::Closed);
    let lost = ConnAckInfo { session_present: false, reconnect: true, ..ConnAckInfo::default() };
    s.handle_connack(lost, at(t0, 20), &|_| true, &mut Text);
    assert_eq!(ops(&mut s), vec![StoreOp::Bind(vec![(2, None)])], "the stale binding is cleared first");
    assert_eq!(s.in_flight(), 2, "the old window stands until the clear is written");
    s.handle_bound(Bound::Written { gone: vec![] }, at(t0, 50), &mut Text);
    assert_eq!(s.in_flight(), 0);
    assert!(std::iter::from_fn(|| s.poll_event()).any(|e| e == SessionEvent::SessionLost { in_flight: 2 }));
}

#[test]
fn the_ack_timeout_ends_the_link_only_with_messages_in_flight() {
    let (mut s, t0) = connected(&[M(1, Qos::AtLeastOnce)]);
    assert_eq!(s.handle_timeout(at(t0, 6_000), &mut Text), Ok(()), "nothing in flight, nothing to time out");
    s.fill(at(t0, 6_000), &|_| true, &mut Text);
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(11_000)));
    assert_eq!(s.handle_timeout(at(t0, 11_000), &mut Text), Err(End::AckTimeout));
}

#[test]
fn the_adaptive_ack_timeout_follows_the_round_trips_measured() {
    let (mut s, t0) = connected_with(&qos1(1..=2_000), AckTimeout::DEFAULT);
    assert_eq!(s.ack_timeout(), Duration::from_secs(1), "before any sample");
    // 2 ms round trips: one message timed at a time, the floor rules.
    for n in 0..100u64 {
        s.fill(at(t0, 10 * n), &|_| true, &mut Text);
        let _ = sent(&mut s);
        let pids: Vec<u16> = s.window.entries().map(|(pid, _)| pid).collect();
        s.handle_acks(pids.into_iter().map(|pid| Ack::PubAck { pid, code: 0 }), at(t0, 10 * n + 2)).unwrap();
    }
    let (mean, _) = s.round_trip().expect("sampled");
    assert_eq!(mean, Duration::from_millis(2));
    assert_eq!(s.ack_timeout(), Duration::from_millis(750));
    // Silence after a send: the link ends one timeout after the last
    // progress, not 15 s later.
    s.fill(at(t0, 2_000), &|_| true, &mut Text);
    assert_eq!(s.handle_timeout(at(t0, 2_749), &mut Text), Ok(()));
    assert_eq!(s.handle_timeout(at(t0, 2_750), &mut Text), Err(End::AckTimeout));
    assert_eq!(s.ack_timeout(), Duration::from_millis(1_500), "the next link waits twice as long");
    s.handle_link_lost(LinkEnd::Ended(End::AckTimeout));
    reconnect(&mut s, at(t0, 3_000), true);
    s.handle_round_trip(Duration::from_millis(2));
    assert_eq!(s.ack_timeout(), Duration::from_millis(1_500), "a CONNACK does not end the backoff");
    let pids: Vec<u16> = s.window.entries().map(|(pid, _)| pid).collect();
    s.handle_acks(pids.into_iter().map(|pid| Ack::PubAck { pid, code: 0 }), at(t0, 3_010)).unwrap();
    assert_eq!(s.ack_timeout(), Duration::from_millis(750), "an acknowledged message does");
}

#[test]
fn a_slow_link_raises_its_own_ack_timeout() {
    let (mut s, t0) = connected_with(&qos1(1..=400), AckTimeout::DEFAULT);
    s.handle_round_trip(Duration::from_millis(400));
    // Acknowledgements 600 to 900 ms after the send: the timeout grows past
    // them and never fires.
    let mut t = 0;
    for n in 0..30u64 {
        s.fill(at(t0, t), &|_| true, &mut Text);
        let _ = sent(&mut s);
        t += 600 + 100 * (n % 4);
        assert_eq!(s.handle_timeout(at(t0, t), &mut Text), Ok(()), "no false alarm at {t} ms");
        let pids: Vec<u16> = s.window.entries().map(|(pid, _)| pid).collect();
        s.handle_acks(pids.into_iter().map(|pid| Ack::PubAck { pid, code: 0 }), at(t0, t)).unwrap();
    }
    assert!(s.ack_timeout() > Duration::from_millis(900), "{:?}", s.ack_timeout());
}

#[test]
fn the_ack_timer_stands_still_while_a_binding_is_written() {
    let (mut s, t0) = connected_with(&[M(1, Qos::AtLeastOnce), M(2, Qos::ExactlyOnce)], AckTimeout::DEFAULT);
    s.fill(at(t0, 0), &|_| true, &mut Text);
    assert!(matches!(ops(&mut s).as_slice(), [StoreOp::Bind(_)]));
    // The disk took 3 s: the broker still has its whole timeout after it.
    s.handle_bound(Bound::Written { gone: vec![] }, at(t0, 3_000), &mut Text);
    assert_eq!(s.handle_timeout(at(t0, 3_900), &mut Text), Ok(()));
    assert_eq!(s.handle_timeout(at(t0, 4_000), &mut Text), Err(End::AckTimeout));
}

#[test]
fn nothing_times_out_while_disconnected() {
    let (mut s, t0) = connected(&[M(1, Qos::AtLeastOnce)]);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    s.handle_link_lost(LinkEnd::Closed);
    assert_eq!(s.handle_timeout(at(t0, 60_000), &mut Text), Ok(()), "no link to end before the next CONNACK");
    assert_eq!(s.poll_transmit(), None);
}

/// Encodes only first sends: a resend cannot be encoded (the broker's
/// maximum packet size shrank).
struct NoResend;

impl Wire<M> for NoResend {
    fn publish(&mut self, m: &M, pid: Option<u16>, dup: bool, out: &mut Vec<u8>) -> Result<(), DropReason> {
        if dup {
            Err(DropReason::TooLarge)
        } else {
            Text.publish(m, pid, dup, out)
        }
    }
    fn pubrel(&mut self, pid: u16) -> Vec<u8> {
        Text.pubrel(pid)
    }
    fn ping(&mut self) -> Vec<u8> {
        Text.ping()
    }
}

#[test]
fn a_qos2_message_that_cannot_be_resent_keeps_its_packet_id() {
    let (mut s, t0) = in_flight_then_lost();
    let kept = ConnAckInfo { session_present: true, reconnect: true, ..ConnAckInfo::default() };
    s.handle_connack(kept, at(t0, 10), &|_| true, &mut NoResend);
    assert_eq!(ops(&mut s), vec![StoreOp::Drop(vec![1], DropReason::TooLarge)], "QoS 1 leaves, counted");
    assert_eq!(s.in_flight(), 1, "the QoS 2 exchange keeps its id: the broker may hold it");
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(events.contains(&SessionEvent::Stranded { id: 2, reason: DropReason::TooLarge }), "{events:?}");
}

fn qos1(ids: std::ops::RangeInclusive<u64>) -> Vec<M> {
    ids.map(|i| M(i, Qos::AtLeastOnce)).collect()
}

fn reconnect(s: &mut PublishSession<M>, t: Now, present: bool) {
    let info = ConnAckInfo { session_present: present, reconnect: true, ..ConnAckInfo::default() };
    s.handle_connack(info, t, &|_| true, &mut Text);
}

#[test]
fn a_broker_that_closes_a_full_window_halves_it_and_acknowledgements_grow_it_back() {
    let (mut s, t0) = connected(&qos1(1..=30));
    s.fill(at(t0, 1), &|_| true, &mut Text);
    assert_eq!(s.in_flight(), 10);
    s.handle_link_lost(LinkEnd::Closed);
    assert_eq!(s.window_size(), 5, "a close with the window full halves it");
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    let change = WindowChange { from: 10, to: 5, in_flight: 10, ceiling: Some(9) };
    assert!(events.contains(&SessionEvent::Window(change)), "{events:?}");
    reconnect(&mut s, at(t0, 10), true);
    assert_eq!(s.in_flight(), 5, "a kept session resends only what the smaller window holds");
    // Five acknowledgements (one window's worth): one more in flight.
    let acks: Vec<Ack> = (1..=5).map(|pid| Ack::PubAck { pid, code: 0 }).collect();
    s.handle_acks(acks, at(t0, 11)).unwrap();
    assert_eq!(s.window_size(), 6);
}

#[test]
fn a_failure_with_few_in_flight_teaches_nothing_but_the_same_ones_twice_do() {
    let (mut s, t0) = connected(&qos1(1..=3));
    s.fill(at(t0, 1), &|_| true, &mut Text);
    s.handle_link_lost(LinkEnd::Closed);
    assert_eq!(s.window_size(), 10, "3 of 10 in flight: a broker restart, not a limit");
    reconnect(&mut s, at(t0, 10), true);
    s.handle_link_lost(LinkEnd::Closed);
    assert_eq!(s.window_size(), 1, "the same messages in flight at two failures in a row: narrowed down");
}

#[test]
fn a_message_alone_in_flight_at_every_failure_is_moved_aside_and_the_rest_go_on() {
    let (mut s, t0) = connected(&qos1(1..=4));
    s.start_window(1);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    assert_eq!(sent(&mut s), "P1:1 ");
    for n in 1..=3u64 {
        s.handle_link_lost(LinkEnd::Closed);
        if n < 3 {
            assert!(ops(&mut s).is_empty(), "{n} failure(s): not yet poison");
            reconnect(&mut s, at(t0, 10 * n), true);
            assert_eq!(sent(&mut s), "P1:1d ");
        }
    }
    assert_eq!(ops(&mut s), vec![StoreOp::Poison(1, PoisonCause::Closed(3))]);
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(
        events.contains(&SessionEvent::Poisoned { message: M(1, Qos::AtLeastOnce), cause: PoisonCause::Closed(3) }),
        "{events:?}"
    );
    assert_eq!(s.in_flight(), 0);
    reconnect(&mut s, at(t0, 40), true);
    // The outbox no longer holds message 1 (moved aside): a read after the
    // reconnect's rewind brings the others.
    s.handle_page(qos1(2..=4), 0, 4, &|_| true);
    s.fill(at(t0, 41), &|_| true, &mut Text);
    assert_eq!(sent(&mut s), "P2:2 ", "the window of 1 goes on with the next message");
}

#[test]
fn silence_and_our_own_ends_never_make_poison() {
    let (mut s, t0) = connected(&qos1(1..=2));
    s.start_window(1);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    for (n, end) in
        [LinkEnd::Ended(End::DeadLink), LinkEnd::Ours, LinkEnd::Ended(End::AckTimeout)].into_iter().enumerate()
    {
        s.handle_link_lost(end);
        reconnect(&mut s, at(t0, 10 * n as u64 + 10), true);
    }
    s.handle_link_lost(LinkEnd::Ended(End::AckTimeout));
    assert!(ops(&mut s).is_empty(), "a dead link, our stop and an ack timeout with the broker silent say nothing");
    assert_eq!(s.in_flight(), 1);
}

#[test]
fn an_ack_timeout_while_the_broker_answers_pings_counts_against_the_message() {
    let (mut s, t0) = connected(&qos1(1..=1));
    s.fill(at(t0, 1), &|_| true, &mut Text);
    for n in 0..3u64 {
        let base = 20_000 * n;
        s.handle_received(at(t0, base + 2_000)); // a PINGRESP, after the send
        s.handle_link_lost(LinkEnd::Ended(End::AckTimeout));
        if n < 2 {
            reconnect(&mut s, at(t0, base + 10_000), true);
        }
    }
    assert_eq!(ops(&mut s), vec![StoreOp::Poison(1, PoisonCause::Closed(3))]);
}

#[test]
fn the_window_never_grows_back_past_what_the_broker_closed_on() {
    let (mut s, t0) = connected(&qos1(1..=200));
    s.start_window(4);
    s.fill(at(t0, 1), &|_| true, &mut Text);
    assert_eq!(s.in_flight(), 4);
    s.handle_link_lost(LinkEnd::Closed);
    assert_eq!((s.window_size(), s.window_ceiling()), (2, Some(3)));
    reconnect(&mut s, at(t0, 10), true);
    // Plenty of acknowledgements: it grows to 3 and stops there.
    for n in 0..60u64 {
        s.fill(at(t0, 11 + n), &|_| true, &mut Text);
        let _ = sent(&mut s);
        let pids: Vec<u16> = s.window.entries().map(|(pid, _)| pid).collect();
        s.handle_acks(pids.into_iter().map(|pid| Ack::PubAck { pid, code: 0 }), at(t0, 11 + n)).unwrap();
    }
    assert_eq!(s.window_size(), 3, "grown back to one less than what the broker closed on");
}

#[test]
fn the_read_want_names_each_priority_s_cursor_and_whether_the_queue_has_room_for_it() {
    // A page of 100: the lowest priority is read while fewer than 50 wait,
    // the others while fewer than 200 do.
    let msgs: Vec<M> = (1..=60).map(|i| M(i, Qos::AtLeastOnce)).collect();
    let (s, _) = connected(&msgs);
    let w = s.read_want().expect("room for the higher priorities");
    assert_eq!(w.after, [60, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(w.room, [false, true, true, true, true, true, true, true, true, true]);
    let newest = |n: &[u64]| std::array::from_fn(|p| n.get(p).copied().unwrap_or(0));
    assert_eq!(w.pick(&newest(&[90])), None, "no room for the lowest");
    assert_eq!(w.pick(&newest(&[90, 0, 5, 3])), Some((3, 0)), "the highest with something unread");
    assert_eq!(s.next_read(&newest(&[90, 0, 5])), Some((2, 0)));
    let (s, _) = connected(&msgs[..10]);
    let w = s.read_want().unwrap();
    assert_eq!(w.room, [true; PRIORITIES]);
    assert_eq!(w.pick(&newest(&[10])), None, "all read");
    assert_eq!(w.pick(&newest(&[11])), Some((0, 10)));
}

#[test]
fn reading_ahead_stops_at_the_page_s_bytes_as_well_as_its_count() {
    // Messages of 10 bytes, pages of 100 messages or 200 bytes: the lowest
    // priority is read while less than 100 bytes wait, the others while
    // less than 400 do, whatever the count.
    let t0 = Instant::now();
    let cfg = SessionConfig {
        max_inflight: 10,
        keep_alive: Duration::from_secs(30),
        ack_timeout: AckTimeout::Fixed(Duration::from_secs(5)),
        refused_pause: Duration::from_secs(1),
        page: ReadLimit { count: 100, bytes: 200 },
        poison_after: 3,
    };
    let mut s = PublishSession::new(cfg, t0);
    s.handle_connack(ConnAckInfo::default(), at(t0, 0), &|_| true, &mut Text);
    let page = |from: u64, n: u64| (from..from + n).map(|i| M(i, Qos::AtLeastOnce)).collect::<Vec<_>>();
    s.handle_page(page(1, 9), 0, 9, &|_| true);
    assert_eq!(s.read_want().unwrap().room, [true; PRIORITIES], "90 bytes wait");
    s.handle_page(page(10, 1), 0, 10, &|_| true);
    let w = s.read_want().unwrap();
    assert!(!w.room[0] && w.room[1..].iter().all(|r| *r), "100 bytes wait, in 10 messages");
    s.handle_page(page(11, 30), 0, 40, &|_| true);
    assert_eq!(s.read_want(), None, "400 bytes wait, in 40 messages: no room for any priority");
    // What leaves the queue for the wire makes room again.
    s.fill(at(t0, 1), &|_| true, &mut Text);
    assert!(s.read_want().unwrap().room[1], "10 sent: 300 bytes wait");
}

#[test]
fn a_page_ends_at_its_count_or_at_the_message_that_reaches_its_bytes_and_is_never_empty() {
    let page = |limit: ReadLimit, sizes: &[u64]| {
        let mut within = limit.cut();
        sizes.iter().take_while(|s| within(**s)).count()
    };
    let sizes = [10, 20, 30, 40];
    assert_eq!(page(ReadLimit::messages(3), &sizes), 3);
    assert_eq!(page(ReadLimit { count: 10, bytes: 30 }, &sizes), 2, "10 + 20 reach 30");
    assert_eq!(page(ReadLimit { count: 10, bytes: 31 }, &sizes), 3);
    assert_eq!(page(ReadLimit { count: 10, bytes: 0 }, &sizes), 1, "one message at least");
    assert_eq!(page(ReadLimit { count: 0, bytes: 100 }, &sizes), 0, "as SQL's LIMIT 0");
    assert_eq!(page(ReadLimit { count: 10, bytes: 5 }, &[u64::MAX, 1]), 1);
    assert_eq!(page(ReadLimit { count: 10, bytes: 5 }, &[u64::MAX, u64::MAX]), 1, "no overflow");
}

/// The PUBLISHes in `text` ("P<pid>:<id>" each), acknowledged: their ids.
fn ack_sent(s: &mut PublishSession<M>, text: &str, t: Now) -> Vec<u64> {
    let sent: Vec<(u16, u64)> = text
        .split_whitespace()
        .filter_map(|p| p.strip_prefix('P')?.trim_end_matches('d').split_once(':'))
        .map(|(pid, id)| (pid.parse().unwrap(), id.parse().unwrap()))
        .collect();
    s.handle_acks(sent.iter().map(|(pid, _)| Ack::PubAck { pid: *pid, code: 0 }).collect::<Vec<_>>(), t).unwrap();
    sent.into_iter().map(|(_, id)| id).collect()
}

fn ceilings_held(s: &mut PublishSession<M>) -> Vec<u16> {
    let held = std::iter::from_fn(|| s.poll_event()).filter_map(|e| match e {
        SessionEvent::CeilingHeld(c) => Some(c),
        _ => None,
    });
    held.collect()
}

/// Thirty messages queued, the window of ten full, then the link closed.
fn full_window_closed() -> (PublishSession<M>, Instant) {
    let (mut s, t0) = connected(&qos1(1..=30));
    s.fill(at(t0, 1), &|_| true, &mut Text);
    sent(&mut s);
    s.handle_link_lost(LinkEnd::Closed);
    (s, t0)
}

/// A ceiling is said to hold (the driver writes it down for the next run
/// then) only once every message in flight at the close went through: not
/// at the close itself.
#[test]
fn a_ceiling_holds_once_the_messages_of_the_close_went_through() {
    let (mut s, t0) = full_window_closed();
    assert_eq!(s.window_ceiling(), Some(9));
    assert_eq!(ceilings_held(&mut s), Vec::<u16>::new(), "not at the close");
    reconnect(&mut s, at(t0, 10), true);
    // The kept session resends the five the smaller window holds; the
    // reconnect's read brings the rest.
    s.handle_page(qos1(6..=30), 0, 30, &|_| true);
    let mut acked = Vec::new();
    for n in 0..10u64 {
        let text = sent(&mut s);
        acked.extend(ack_sent(&mut s, &text, at(t0, 11 + n)));
        let held = ceilings_held(&mut s);
        if (1..=10).all(|id| acked.contains(&id)) {
            assert_eq!(held, vec![9], "said once the ten of the close went through (acked {acked:?})");
            return;
        }
        assert_eq!(held, Vec::<u16>::new(), "acked {acked:?}");
        s.fill(at(t0, 11 + n), &|_| true, &mut Text);
    }
    panic!("the ten messages of the close never went through: {acked:?}");
}

/// A poison message narrows the window down to one, teaching a ceiling of
/// one on its way: it never holds (a run that ended during the chase
/// remembered it, and every later run to that broker kept one message in
/// flight), and once the message is moved aside the window is back.
#[test]
fn a_poison_chase_never_holds_a_ceiling() {
    let (mut s, t0) = connected(&qos1(1..=30));
    s.fill(at(t0, 1), &|_| true, &mut Text);
    sent(&mut s);
    let mut events = Vec::new();
    for n in 1..=10u64 {
        // The broker closes the link on message 1 each time, before it
        // acknowledges anything.
        s.handle_link_lost(LinkEnd::Closed);
        events.extend(std::iter::from_fn(|| s.poll_event()));
        if ops(&mut s).contains(&StoreOp::Poison(1, PoisonCause::Closed(3))) {
            break;
        }
        reconnect(&mut s, at(t0, 10 * n), true);
        sent(&mut s);
    }
    assert!(events.iter().any(|e| matches!(e, SessionEvent::Window(WindowChange { to: 1, .. }))), "{events:?}");
    assert!(events.contains(&SessionEvent::WindowRestored(10)), "{events:?}");
    reconnect(&mut s, at(t0, 200), true);
    s.handle_page(qos1(2..=30), 0, 30, &|_| true);
    for n in 0..40u64 {
        s.fill(at(t0, 201 + n), &|_| true, &mut Text);
        let text = sent(&mut s);
        ack_sent(&mut s, &text, at(t0, 201 + n));
        events.extend(std::iter::from_fn(|| s.poll_event()));
    }
    assert!(!events.iter().any(|e| matches!(e, SessionEvent::CeilingHeld(_))), "{events:?}");
    assert_eq!(s.window_ceiling(), None);
}

/// A suspect that leaves without an acknowledgement (here taken over by
/// another broker of a failover set; a poison message with a retry budget
/// or a deadline leaves as spent before it is isolated) ends the chase:
/// the window and its ceiling go back, and what the chase taught never
/// holds (it did: a ceiling of one, remembered for every later run).
#[test]
fn a_suspect_that_leaves_unacknowledged_gives_the_window_back() {
    let (mut s, t0) = full_window_closed();
    reconnect(&mut s, at(t0, 10), true);
    sent(&mut s);
    s.handle_link_lost(LinkEnd::Closed);
    assert!(s.window_size() < 5 && s.window_ceiling() < Some(9), "narrowed down twice");
    let mut events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    let info = ConnAckInfo { session_present: true, reconnect: true, ..ConnAckInfo::default() };
    s.handle_connack(info, at(t0, 20), &|m: &M| m.0 != 1, &mut Text);
    events.extend(std::iter::from_fn(|| s.poll_event()));
    assert!(events.contains(&SessionEvent::WindowRestored(10)), "{events:?}");
    assert_eq!((s.window_size(), s.window_ceiling()), (10, None));
    s.handle_page(qos1(2..=30), 0, 30, &|m: &M| m.0 != 1);
    for n in 0..40u64 {
        s.fill(at(t0, 21 + n), &|m: &M| m.0 != 1, &mut Text);
        let text = sent(&mut s);
        ack_sent(&mut s, &text, at(t0, 21 + n));
        events.extend(std::iter::from_fn(|| s.poll_event()));
    }
    assert!(!events.iter().any(|e| matches!(e, SessionEvent::CeilingHeld(_))), "{events:?}");
}
