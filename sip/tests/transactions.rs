//! RFC 3261 §17 transaction behaviour, in simulated time.

use sautikit_sip::message::{self, response_to};
use sautikit_sip::rsip::{self, SipMessage, headers::UntypedHeader};
use sautikit_sip::transaction::{
    Peer, Timers, TransactionLayer, Transmit, Transport, TuEvent, TxKey,
};
use std::time::{Duration, Instant};

const T1: Duration = Duration::from_millis(500);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn peer(transport: Transport) -> Peer {
    Peer {
        addr: "192.0.2.10:5060".parse().expect("addr"),
        transport,
    }
}

fn request(method: &str, branch: &str, cseq_method: &str, extra: &str) -> String {
    format!(
        "{method} sip:254700000001@192.0.2.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch={branch};rport\r\n\
Max-Forwards: 70\r\n\
From: \"sipp\" <sip:sipp@192.0.2.10:5060>;tag=1234\r\n\
To: <sip:254700000001@192.0.2.1:5060>{extra}\r\n\
Call-ID: call-1@192.0.2.10\r\n\
CSeq: 1 {cseq_method}\r\n\
Contact: <sip:sipp@192.0.2.10:5060>\r\n\
Content-Length: 0\r\n\r\n"
    )
}

fn invite(branch: &str) -> String {
    request("INVITE", branch, "INVITE", "")
}

/// Items stamped with the simulated milliseconds since the start.
type Timed<T> = Vec<(u64, T)>;

struct Harness {
    layer: TransactionLayer,
    now: Instant,
    start: Instant,
}

impl Harness {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            layer: TransactionLayer::new(Timers::default()),
            now,
            start: now,
        }
    }

    fn feed(&mut self, text: &str, transport: Transport) {
        self.layer
            .handle_datagram(text.as_bytes(), peer(transport), self.now);
    }

    fn transmits(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(Transmit { bytes, .. }) = self.layer.poll_transmit() {
            out.push(String::from_utf8(bytes).expect("utf8"));
        }
        out
    }

    fn events(&mut self) -> Vec<TuEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.layer.poll_event() {
            out.push(e);
        }
        out
    }

    /// Receive the INVITE and return its key (asserting the 100 Trying).
    fn incoming_invite(&mut self, branch: &str, transport: Transport) -> (TxKey, rsip::Request) {
        self.feed(&invite(branch), transport);
        let sent = self.transmits();
        assert_eq!(sent.len(), 1);
        assert!(sent[0].starts_with("SIP/2.0 100 Trying\r\n"), "{}", sent[0]);
        match self.events().as_slice() {
            [TuEvent::RequestReceived { key, request, .. }] => (key.clone(), request.clone()),
            other => panic!("expected RequestReceived, got {other:?}"),
        }
    }

    fn respond(&mut self, key: &TxKey, req: &rsip::Request, code: u16) {
        let resp = response_to(req, code, None, Some("uas-tag"));
        self.layer.respond(key, resp, self.now).expect("respond");
    }

    /// Advance to each deadline up to `until`, recording (elapsed ms, transmits, events).
    fn run_until(&mut self, until: Duration) -> (Timed<String>, Timed<TuEvent>) {
        let (mut sent, mut events) = (Vec::new(), Vec::new());
        while let Some(at) = self.layer.poll_timeout() {
            if at > self.start + until {
                break;
            }
            assert!(at >= self.now, "deadline in the past");
            self.now = at;
            self.layer.handle_timeout(at);
            let t = (at - self.start).as_millis() as u64;
            sent.extend(self.transmits().into_iter().map(|s| (t, s)));
            events.extend(self.events().into_iter().map(|e| (t, e)));
        }
        (sent, events)
    }
}

fn times(sent: &[(u64, String)]) -> Vec<u64> {
    sent.iter().map(|(t, _)| *t).collect()
}

#[test]
fn invite_retransmissions_get_the_last_response() {
    let mut h = Harness::new();
    let (key, req) = h.incoming_invite("z9hG4bK-a", Transport::Udp);
    h.feed(&invite("z9hG4bK-a"), Transport::Udp);
    assert!(h.transmits()[0].starts_with("SIP/2.0 100 Trying"));
    h.respond(&key, &req, 180);
    assert!(h.transmits()[0].starts_with("SIP/2.0 180 Ringing"));
    h.feed(&invite("z9hG4bK-a"), Transport::Udp);
    assert!(h.transmits()[0].starts_with("SIP/2.0 180 Ringing"));
    h.respond(&key, &req, 200);
    assert!(h.transmits()[0].starts_with("SIP/2.0 200 OK"));
    h.feed(&invite("z9hG4bK-a"), Transport::Udp);
    let again = h.transmits();
    assert_eq!(again.len(), 1);
    assert!(again[0].starts_with("SIP/2.0 200 OK"));
    assert!(again[0].contains(";tag=uas-tag"));
    assert!(h.events().is_empty(), "a retransmission reached the TU");
    // A second final response is refused.
    assert!(
        h.layer
            .respond(&key, response_to(&req, 486, None, None), h.now)
            .is_err()
    );
}

#[test]
fn lost_ack_retransmits_2xx_then_ack_timeout() {
    let mut h = Harness::new();
    let (key, req) = h.incoming_invite("z9hG4bK-b", Transport::Udp);
    h.respond(&key, &req, 200);
    h.transmits();
    let (sent, events) = h.run_until(ms(40_000));
    // T1, 2T1, 4T1, then capped at T2 = 4 s, until 64·T1 = 32 s.
    assert_eq!(
        times(&sent),
        [
            500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
    );
    assert!(sent.iter().all(|(_, s)| s.starts_with("SIP/2.0 200 OK")));
    match events.as_slice() {
        [(32_000, TuEvent::AckTimeout { key: k })] => assert_eq!(k, &key),
        other => panic!("expected AckTimeout at 32 s, got {other:?}"),
    }
    assert!(h.layer.is_empty());
}

#[test]
fn ack_stops_2xx_retransmission() {
    let mut h = Harness::new();
    let (key, req) = h.incoming_invite("z9hG4bK-c", Transport::Udp);
    h.respond(&key, &req, 200);
    h.transmits();
    let (sent, _) = h.run_until(ms(1600));
    assert_eq!(times(&sent), [500, 1500]);
    // The ACK for a 2xx is its own transaction: new branch, To tag of the 2xx.
    h.now = h.start + ms(1700);
    h.feed(
        &request("ACK", "z9hG4bK-ack", "ACK", ";tag=uas-tag"),
        Transport::Udp,
    );
    match h.events().as_slice() {
        [TuEvent::AckReceived { request, .. }] => assert_eq!(request.method, rsip::Method::Ack),
        other => panic!("expected AckReceived, got {other:?}"),
    }
    // A late INVITE retransmission is still absorbed (RFC 6026 Accepted).
    h.feed(&invite("z9hG4bK-c"), Transport::Udp);
    assert_eq!(h.transmits().len(), 1);
    let (sent, events) = h.run_until(ms(40_000));
    assert!(sent.is_empty(), "2xx retransmitted after the ACK: {sent:?}");
    assert!(events.is_empty(), "unexpected events {events:?}");
    assert!(h.layer.is_empty());
}

#[test]
fn unmatched_ack_still_reaches_the_tu() {
    let mut h = Harness::new();
    h.feed(
        &request("ACK", "z9hG4bK-lone", "ACK", ";tag=x"),
        Transport::Udp,
    );
    assert!(h.transmits().is_empty());
    assert!(matches!(
        h.events().as_slice(),
        [TuEvent::AckReceived { .. }]
    ));
    assert!(h.layer.is_empty());
}

#[test]
fn non_2xx_final_is_retransmitted_until_ack_then_timer_i() {
    let mut h = Harness::new();
    let (key, req) = h.incoming_invite("z9hG4bK-d", Transport::Udp);
    h.respond(&key, &req, 486);
    h.transmits();
    let (sent, _) = h.run_until(ms(2000));
    assert_eq!(times(&sent), [500, 1500]);
    h.now = h.start + ms(2000);
    // ACK of a non-2xx: same branch as the INVITE; absorbed by the transaction.
    h.feed(
        &request("ACK", "z9hG4bK-d", "ACK", ";tag=uas-tag"),
        Transport::Udp,
    );
    assert!(h.events().is_empty());
    h.feed(
        &request("ACK", "z9hG4bK-d", "ACK", ";tag=uas-tag"),
        Transport::Udp,
    );
    assert!(h.events().is_empty() && h.transmits().is_empty());
    assert_eq!(h.layer.len(), 1);
    // Timer I = T4 = 5 s.
    assert_eq!(h.layer.poll_timeout(), Some(h.start + ms(7000)));
    let (sent, events) = h.run_until(ms(7000));
    assert!(sent.is_empty() && events.is_empty());
    assert!(h.layer.is_empty());
}

#[test]
fn timer_b_with_timer_a_schedule() {
    let mut h = Harness::new();
    let text = invite(&message::new_branch());
    let Ok(SipMessage::Request(req)) = message::parse(text.as_bytes()) else {
        panic!("fixture")
    };
    let key = h
        .layer
        .send_request(req, peer(Transport::Udp), h.now)
        .expect("send");
    assert_eq!(h.transmits().len(), 1);
    let (sent, events) = h.run_until(ms(40_000));
    assert_eq!(times(&sent), [500, 1500, 3500, 7500, 15500, 31500]);
    match events.as_slice() {
        [(32_000, TuEvent::ClientTimeout { key: k })] => assert_eq!(k, &key),
        other => panic!("expected ClientTimeout at 32 s, got {other:?}"),
    }
    assert!(h.layer.is_empty());
}

#[test]
fn timer_f_with_timer_e_schedule() {
    let mut h = Harness::new();
    let text = request("OPTIONS", &message::new_branch(), "OPTIONS", "");
    let Ok(SipMessage::Request(req)) = message::parse(text.as_bytes()) else {
        panic!("fixture")
    };
    let key = h
        .layer
        .send_request(req, peer(Transport::Udp), h.now)
        .expect("send");
    assert_eq!(h.transmits().len(), 1);
    let (sent, events) = h.run_until(ms(40_000));
    assert_eq!(
        times(&sent),
        [
            500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
    );
    match events.as_slice() {
        [(32_000, TuEvent::ClientTimeout { key: k })] => assert_eq!(k, &key),
        other => panic!("expected ClientTimeout at 32 s, got {other:?}"),
    }
}

#[test]
fn client_invite_non_2xx_is_acked_and_absorbed() {
    let mut h = Harness::new();
    let branch = message::new_branch();
    let text = invite(&branch);
    let Ok(SipMessage::Request(req)) = message::parse(text.as_bytes()) else {
        panic!("fixture")
    };
    let key = h
        .layer
        .send_request(req.clone(), peer(Transport::Udp), h.now)
        .expect("send");
    h.transmits();
    let ringing = response_to(&req, 180, None, Some("callee"));
    h.layer
        .handle_message(ringing.into(), peer(Transport::Udp), h.now);
    let busy = message::to_bytes(response_to(&req, 486, None, Some("callee")));
    h.layer.handle_datagram(&busy, peer(Transport::Udp), h.now);
    let acks = h.transmits();
    assert_eq!(acks.len(), 1);
    assert!(acks[0].starts_with("ACK sip:254700000001@192.0.2.1:5060 SIP/2.0\r\n"));
    assert!(acks[0].contains(&format!("branch={branch}")));
    assert!(acks[0].contains("CSeq: 1 ACK\r\n"));
    assert!(acks[0].contains(";tag=callee"));
    let codes: Vec<u16> = h
        .events()
        .into_iter()
        .map(|e| match e {
            TuEvent::ResponseReceived { key: k, response } => {
                assert_eq!(k, key);
                response.status_code.code()
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(codes, [180, 486]);
    // A retransmitted 486 is ACKed again and not passed up.
    h.layer.handle_datagram(&busy, peer(Transport::Udp), h.now);
    assert_eq!(h.transmits().len(), 1);
    assert!(h.events().is_empty());
    // Timer D (32 s) ends it.
    let _ = h.run_until(ms(32_000));
    assert!(h.layer.is_empty());
}

#[test]
fn client_invite_2xx_retransmissions_reach_the_tu() {
    let mut h = Harness::new();
    let text = invite(&message::new_branch());
    let Ok(SipMessage::Request(req)) = message::parse(text.as_bytes()) else {
        panic!("fixture")
    };
    h.layer
        .send_request(req.clone(), peer(Transport::Udp), h.now)
        .expect("send");
    let ok = message::to_bytes(response_to(&req, 200, None, Some("callee")));
    h.layer.handle_datagram(&ok, peer(Transport::Udp), h.now);
    h.layer.handle_datagram(&ok, peer(Transport::Udp), h.now);
    assert_eq!(h.events().len(), 2);
    // Only the original request went out: the ACK for a 2xx is the TU's job.
    assert_eq!(h.transmits().len(), 1);
    let (sent, _) = h.run_until(ms(40_000));
    assert!(sent.is_empty());
    assert!(h.layer.is_empty());
}

#[test]
fn cancel_before_final_response() {
    let mut h = Harness::new();
    let (key, req) = h.incoming_invite("z9hG4bK-e", Transport::Udp);
    h.feed(
        &request("CANCEL", "z9hG4bK-e", "CANCEL", ""),
        Transport::Udp,
    );
    let sent = h.transmits();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].starts_with("SIP/2.0 200 OK\r\n"));
    assert!(sent[0].contains("CSeq: 1 CANCEL\r\n"));
    match h.events().as_slice() {
        [TuEvent::CancelReceived { invite, .. }] => assert_eq!(invite, &key),
        other => panic!("expected CancelReceived, got {other:?}"),
    }
    // A retransmitted CANCEL gets the same 200 and no second event.
    h.feed(
        &request("CANCEL", "z9hG4bK-e", "CANCEL", ""),
        Transport::Udp,
    );
    assert_eq!(h.transmits().len(), 1);
    assert!(h.events().is_empty());
    h.respond(&key, &req, 487);
    assert!(h.transmits()[0].starts_with("SIP/2.0 487 Request Terminated"));
}

#[test]
fn cancel_after_2xx_only_gets_200() {
    let mut h = Harness::new();
    let (key, req) = h.incoming_invite("z9hG4bK-f", Transport::Udp);
    h.respond(&key, &req, 200);
    h.transmits();
    h.feed(
        &request("CANCEL", "z9hG4bK-f", "CANCEL", ""),
        Transport::Udp,
    );
    let sent = h.transmits();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].starts_with("SIP/2.0 200 OK\r\n"));
    assert!(sent[0].contains("CSeq: 1 CANCEL\r\n"));
    assert!(h.events().is_empty());
}

#[test]
fn unmatched_cancel_gets_481() {
    let mut h = Harness::new();
    h.feed(
        &request("CANCEL", "z9hG4bK-nothing", "CANCEL", ""),
        Transport::Udp,
    );
    let sent = h.transmits();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].starts_with("SIP/2.0 481 Call/Transaction Does Not Exist\r\n"),
        "{}",
        sent[0]
    );
    assert!(h.events().is_empty());
}

#[test]
fn non_invite_server_absorbs_retransmissions_and_timer_j() {
    let mut h = Harness::new();
    let text = request("OPTIONS", "z9hG4bK-g", "OPTIONS", "");
    h.feed(&text, Transport::Udp);
    assert!(h.transmits().is_empty());
    let (key, req) = match h.events().as_slice() {
        [TuEvent::RequestReceived { key, request, .. }] => (key.clone(), request.clone()),
        other => panic!("expected RequestReceived, got {other:?}"),
    };
    // In Trying a retransmission is absorbed silently.
    h.feed(&text, Transport::Udp);
    assert!(h.transmits().is_empty() && h.events().is_empty());
    h.respond(&key, &req, 200);
    assert_eq!(h.transmits().len(), 1);
    h.feed(&text, Transport::Udp);
    let again = h.transmits();
    assert_eq!(again.len(), 1);
    assert!(again[0].starts_with("SIP/2.0 200 OK"));
    assert!(h.events().is_empty());
    // Timer J = 64·T1.
    assert_eq!(h.layer.poll_timeout(), Some(h.start + 64 * T1));
    let (sent, events) = h.run_until(ms(40_000));
    assert!(sent.is_empty() && events.is_empty());
    assert!(h.layer.is_empty());
}

#[test]
fn tcp_has_no_retransmissions_and_zero_linger() {
    let mut h = Harness::new();
    // Server INVITE, non-2xx: no Timer G, and Timer I = 0 after the ACK.
    let (key, req) = h.incoming_invite("z9hG4bK-h", Transport::Tcp);
    h.respond(&key, &req, 486);
    assert_eq!(h.transmits().len(), 1);
    h.feed(
        &request("ACK", "z9hG4bK-h", "ACK", ";tag=uas-tag"),
        Transport::Tcp,
    );
    let (sent, _) = h.run_until(ms(0));
    assert!(sent.is_empty());
    assert!(h.layer.is_empty());

    // Server INVITE, 2xx: not retransmitted over TCP; still times out without an ACK.
    let (key, req) = h.incoming_invite("z9hG4bK-i", Transport::Tcp);
    h.respond(&key, &req, 200);
    assert_eq!(h.transmits().len(), 1);
    let (sent, events) = h.run_until(ms(40_000));
    assert!(sent.is_empty());
    assert!(matches!(
        events.as_slice(),
        [(_, TuEvent::AckTimeout { .. })]
    ));

    // Client INVITE: no Timer A, Timer B still fires.
    let mut h = Harness::new();
    let text = invite(&message::new_branch());
    let Ok(SipMessage::Request(req)) = message::parse(text.as_bytes()) else {
        panic!("fixture")
    };
    h.layer
        .send_request(req, peer(Transport::Tcp), h.now)
        .expect("send");
    assert_eq!(h.transmits().len(), 1);
    let (sent, events) = h.run_until(ms(40_000));
    assert!(sent.is_empty());
    assert!(matches!(
        events.as_slice(),
        [(32_000, TuEvent::ClientTimeout { .. })]
    ));

    // Non-INVITE server: Timer J = 0.
    let mut h = Harness::new();
    h.feed(
        &request("OPTIONS", "z9hG4bK-j", "OPTIONS", ""),
        Transport::Tcp,
    );
    let (key, req) = match h.events().as_slice() {
        [TuEvent::RequestReceived { key, request, .. }] => (key.clone(), request.clone()),
        other => panic!("{other:?}"),
    };
    h.respond(&key, &req, 200);
    h.run_until(ms(0));
    assert!(h.layer.is_empty());
}

/// We are the endpoint, not a proxy: `Max-Forwards: 0` is processed (RFC 4475's zeromf).
#[test]
fn max_forwards_zero_is_processed() {
    let mut h = Harness::new();
    let text = invite("z9hG4bK-k").replace("Max-Forwards: 70", "Max-Forwards: 0");
    h.feed(&text, Transport::Udp);
    let sent = h.transmits();
    assert!(
        sent.iter().all(|s| !s.starts_with("SIP/2.0 483 ")),
        "{sent:?}"
    );
    assert!(matches!(
        h.events().as_slice(),
        [TuEvent::RequestReceived { .. }]
    ));
}

#[test]
fn malformed_requests_get_400_when_headers_are_recoverable() {
    let mut h = Harness::new();
    // rsip cannot parse this Request-URI; Via/From/To/Call-ID/CSeq are intact.
    let text = invite("z9hG4bK-m").replace(
        "INVITE sip:254700000001@192.0.2.1:5060 SIP/2.0",
        "INVITE sip:@@@:::bad uri SIP/2.0",
    );
    h.feed(&text, Transport::Udp);
    let sent = h.transmits();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].starts_with("SIP/2.0 400 "), "{}", sent[0]);
    assert!(sent[0].contains("Call-ID: call-1@192.0.2.10\r\n"));
    assert!(sent[0].contains("Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-m;rport\r\n"));
    assert!(sent[0].contains("CSeq: 1 INVITE\r\n"));
    assert!(message::parse(sent[0].as_bytes()).is_ok(), "{}", sent[0]);

    // Parses, but CSeq method and request method disagree.
    let text = request("OPTIONS", "z9hG4bK-n", "INVITE", "");
    h.feed(&text, Transport::Udp);
    let sent = h.transmits();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].starts_with("SIP/2.0 400 "), "{}", sent[0]);

    // No Call-ID: answered from what there is (Via and CSeq), and nothing reaches the TU.
    let text = invite("z9hG4bK-o").replace("Call-ID: call-1@192.0.2.10\r\n", "");
    h.feed(&text, Transport::Udp);
    let sent = h.transmits();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0].starts_with("SIP/2.0 400 Missing Call-ID"),
        "{}",
        sent[0]
    );
    assert!(h.events().is_empty());
    assert!(h.layer.is_empty());
    // No Via: nowhere to answer.
    let text = invite("z9hG4bK-q").replace(
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-q;rport\r\n",
        "",
    );
    h.feed(&text, Transport::Udp);
    assert!(h.transmits().is_empty());
    assert!(h.events().is_empty());

    // An unknown method gets 501.
    let text = request("FROB", "z9hG4bK-p", "FROB", "");
    h.feed(&text, Transport::Udp);
    let sent = h.transmits();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].starts_with("SIP/2.0 501 "), "{}", sent[0]);
}

#[test]
fn respond_to_unknown_key_is_an_error() {
    let mut h = Harness::new();
    let (key, req) = h.incoming_invite("z9hG4bK-q", Transport::Tcp);
    h.respond(&key, &req, 603);
    h.feed(
        &request("ACK", "z9hG4bK-q", "ACK", ";tag=uas-tag"),
        Transport::Tcp,
    );
    h.run_until(ms(0));
    assert!(
        h.layer
            .respond(&key, response_to(&req, 200, None, None), h.now)
            .is_err()
    );
}

#[test]
fn hundred_thousand_transactions() {
    let mut layer = TransactionLayer::new(Timers::default());
    let start = Instant::now();
    let p = peer(Transport::Udp);
    let text = request("OPTIONS", "z9hG4bK-x", "OPTIONS", "");
    let Ok(SipMessage::Request(template)) = message::parse(text.as_bytes()) else {
        panic!("fixture")
    };
    let resp = response_to(&template, 200, None, Some("t"));
    for i in 0..100_000u32 {
        let now = start + Duration::from_micros(u64::from(i));
        let mut req = template.clone();
        req.headers
            .unique_push(rsip::Header::Via(rsip::headers::Via::new(format!(
                "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-{i}"
            ))));
        layer.handle_message(req.into(), p, now);
        let Some(TuEvent::RequestReceived { key, .. }) = layer.poll_event() else {
            panic!("no event")
        };
        layer.respond(&key, resp.clone(), now).expect("respond");
        while layer.poll_transmit().is_some() {}
    }
    assert_eq!(layer.len(), 100_000);
    layer.handle_timeout(start + ms(16_000));
    assert_eq!(layer.len(), 100_000);
    layer.handle_timeout(start + ms(33_000));
    assert!(layer.is_empty());
    assert_eq!(layer.poll_timeout(), None);
}

#[test]
fn layer_can_move_between_threads() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<TransactionLayer>();
    assert_send::<TuEvent>();
    assert_send::<sautikit_sip::dialog::Dialog>();
}

#[test]
fn ack_for_non_2xx_with_its_own_branch_is_absorbed() {
    let mut h = Harness::new();
    let (key, req) = h.incoming_invite("z9hG4bK-r", Transport::Udp);
    h.respond(&key, &req, 404);
    h.transmits();
    // Some UAs give this ACK a new branch; the dialog identifiers still tie it to the INVITE.
    h.feed(
        &request("ACK", "z9hG4bK-other", "ACK", ";tag=uas-tag"),
        Transport::Udp,
    );
    assert!(h.events().is_empty());
    let (sent, _) = h.run_until(ms(40_000));
    assert!(sent.is_empty(), "404 retransmitted after the ACK: {sent:?}");
    assert!(h.layer.is_empty());
}

/// Shedding load: a new INVITE is answered statelessly, with every Via in order, the From,
/// Call-ID and CSeq as sent, a To tag added and the extra header; anything else is left to the
/// transaction layer.
#[test]
fn a_new_invite_can_be_refused_statelessly_and_nothing_else_is() {
    use sautikit_sip::transaction::refuse_new_invite;
    let inv = invite("z9hG4bKshed").replace(
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKshed;rport\r\n",
        "v: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKshed;rport\r\nVia: SIP/2.0/UDP 192.0.2.99;branch=z9hG4bKup\r\n",
    );
    let out = refuse_new_invite(
        inv.as_bytes(),
        (503, "Service Unavailable"),
        &[("Retry-After", "1")],
    )
    .expect("a new INVITE is refused");
    let text = String::from_utf8(out).expect("utf-8");
    let SipMessage::Response(r) = SipMessage::try_from(text.as_str()).expect("parses") else {
        panic!("not a response: {text}");
    };
    assert_eq!(r.status_code.code(), 503);
    assert!(text.contains("Retry-After: 1\r\n"), "{text}");
    let vias: Vec<&str> = text.lines().filter(|l| l.starts_with("Via: ")).collect();
    assert_eq!(vias.len(), 2, "{text}");
    assert!(vias[0].contains("z9hG4bKshed") && vias[1].contains("z9hG4bKup"));
    assert!(message::to_tag(&r).is_some(), "{text}");
    assert_eq!(message::call_id(&r).as_deref(), Some("call-1@192.0.2.10"));
    assert!(text.contains("CSeq: 1 INVITE\r\n"));

    // In-dialog (To tagged), other methods, ACK and responses are not refused so.
    let re_invite = request("INVITE", "z9hG4bKre", "INVITE", ";tag=ours");
    let options = request("OPTIONS", "z9hG4bKo", "OPTIONS", "");
    let ack = request("ACK", "z9hG4bKa", "ACK", ";tag=ours");
    let response = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.10\r\n\r\n";
    for m in [re_invite.as_str(), options.as_str(), ack.as_str(), response] {
        assert!(
            refuse_new_invite(m.as_bytes(), (503, "Service Unavailable"), &[]).is_none(),
            "{m}"
        );
    }
}
