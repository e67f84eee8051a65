//! Nothing a peer sends may panic the SIP stack: mutated real messages through the parser, the
//! TCP framer and the transaction layer (with timers running), plus proptest on raw bytes.

use proptest::prelude::*;
use sautikit_sip::message::{self, response_to};
use sautikit_sip::rtp::RtpHeader;
use sautikit_sip::sdp;
use sautikit_sip::stream::StreamFramer;
use sautikit_sip::transaction::{Peer, Timers, TransactionLayer, Transport, TuEvent};
use std::time::{Duration, Instant};

const SDP: &str = "v=0\r\n\
o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 6000 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n";

/// Messages as sipp's built-in uac/uas scenarios send them, plus a REGISTER and an OPTIONS ping.
fn corpus() -> Vec<String> {
    let invite = format!(
        "INVITE sip:254700000001@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n\
From: sipp <sip:sipp@127.0.0.1:5061>;tag=4242SIPpTag001\r\n\
To: 254700000001 <sip:254700000001@127.0.0.1:5060>\r\n\
Call-ID: 1-4242@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: sip:sipp@127.0.0.1:5061\r\n\
Max-Forwards: 70\r\n\
Subject: Performance Test\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
        SDP.len()
    );
    let ack = "ACK sip:254700000001@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-5\r\n\
From: sipp <sip:sipp@127.0.0.1:5061>;tag=4242SIPpTag001\r\n\
To: 254700000001 <sip:254700000001@127.0.0.1:5060>;tag=abc\r\n\
Call-ID: 1-4242@127.0.0.1\r\n\
CSeq: 1 ACK\r\n\
Contact: sip:sipp@127.0.0.1:5061\r\n\
Max-Forwards: 70\r\n\
Subject: Performance Test\r\n\
Content-Length: 0\r\n\r\n"
        .to_string();
    let bye = ack
        .replace("ACK sip:", "BYE sip:")
        .replace("CSeq: 1 ACK", "CSeq: 2 BYE")
        .replace("-1-5", "-1-7");
    let cancel = "CANCEL sip:254700000001@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n\
From: sipp <sip:sipp@127.0.0.1:5061>;tag=4242SIPpTag001\r\n\
To: 254700000001 <sip:254700000001@127.0.0.1:5060>\r\n\
Call-ID: 1-4242@127.0.0.1\r\n\
CSeq: 1 CANCEL\r\n\
Max-Forwards: 70\r\n\
Content-Length: 0\r\n\r\n"
        .to_string();
    let options = "OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n\
v: SIP/2.0/TCP 10.1.2.3:41234;rport;branch=z9hG4bKPjx1\r\n\
Max-Forwards: 70\r\n\
f: \"Ping, Inc\" <sip:ping@10.1.2.3>;tag=p1\r\n\
t: <sip:127.0.0.1>\r\n\
i: ping-1\r\n\
CSeq: 99 OPTIONS\r\n\
Accept: application/sdp\r\n\
l: 0\r\n\r\n"
        .to_string();
    let register = "REGISTER sip:example.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bKreg1;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:ts_0a1b2c3d@example.test>;tag=r1\r\n\
To: <sip:ts_0a1b2c3d@example.test>\r\n\
Call-ID: reg-1\r\n\
CSeq: 2 REGISTER\r\n\
Contact: <sip:ts_0a1b2c3d@10.1.2.3:5060;ob>;expires=300\r\n\
Authorization: Digest username=\"ts_0a1b2c3d\", realm=\"ws_1\", nonce=\"abc\", uri=\"sip:example.test\", response=\"0123456789abcdef0123456789abcdef\", algorithm=MD5, qop=auth, nc=00000001, cnonce=\"xyz\"\r\n\
Content-Length: 0\r\n\r\n"
        .to_string();
    let ok = format!(
        "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKout1\r\n\
From: <sip:sautikit@127.0.0.1>;tag=me\r\n\
To: <sip:254700000002@127.0.0.1:5061>;tag=you\r\n\
Call-ID: out-1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:127.0.0.1:5061;transport=UDP>\r\n\
Record-Route: <sip:proxy.test;lr>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
        SDP.len()
    );
    vec![invite, ack, bye, cancel, options, register, ok]
}

/// xorshift64*: deterministic, dependency-free, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NUMBERS: &[&str] = &[
    "99999999999999999999999",
    "4294967296",
    "4294967295",
    "-1",
    "",
    "0",
    "1e3",
    "0x10",
    " 12 34",
    "18446744073709551616",
];

fn mutate(rng: &mut Rng, msg: &[u8]) -> Vec<u8> {
    let mut m = msg.to_vec();
    for _ in 0..=rng.below(3) {
        let lines: Vec<&[u8]> = m.split(|&b| b == b'\n').collect();
        m = match rng.below(9) {
            // Byte flips.
            0 => {
                let mut v = m.clone();
                for _ in 0..=rng.below(4) {
                    let i = rng.below(v.len());
                    if let Some(b) = v.get_mut(i) {
                        *b = rng.next() as u8;
                    }
                }
                v
            }
            // Truncation.
            1 => m[..rng.below(m.len() + 1)].to_vec(),
            // Duplicate a line.
            2 => {
                let i = rng.below(lines.len());
                let mut out: Vec<&[u8]> = lines.clone();
                out.insert(i, lines[i]);
                out.join(&b'\n')
            }
            // Delete a line.
            3 => {
                let mut out = lines.clone();
                if !out.is_empty() {
                    out.remove(rng.below(lines.len()));
                }
                out.join(&b'\n')
            }
            // Numeric overflow in CSeq / Content-Length / Max-Forwards.
            4 => {
                let text = String::from_utf8_lossy(&m).into_owned();
                let n = rng.pick(NUMBERS);
                let text = match rng.below(3) {
                    0 => replace_value(&text, "CSeq: ", &format!("{n} INVITE")),
                    1 => replace_value(&text, "Content-Length: ", n),
                    _ => replace_value(&text, "Max-Forwards: ", n),
                };
                text.into_bytes()
            }
            // Insert random bytes.
            5 => {
                let mut v = m.clone();
                let at = rng.below(v.len() + 1);
                let junk: Vec<u8> = (0..rng.below(16) + 1).map(|_| rng.next() as u8).collect();
                v.splice(at..at, junk);
                v
            }
            // CRLF → LF, or strip the blank line.
            6 => {
                let text = String::from_utf8_lossy(&m).into_owned();
                if rng.below(2) == 0 {
                    text.replace("\r\n", "\n").into_bytes()
                } else {
                    text.replacen("\r\n\r\n", "\r\n", 1).into_bytes()
                }
            }
            // Swap the method or status line.
            7 => {
                let text = String::from_utf8_lossy(&m).into_owned();
                let starts = [
                    "INVITE",
                    "ACK",
                    "BYE",
                    "CANCEL",
                    "SIP/2.0 180",
                    "SIP/2.0 487",
                    "FOO",
                    "",
                    "SIP/3.0",
                    "sip:",
                ];
                let start = rng.pick(&starts);
                match text.split_once(' ') {
                    Some((_, rest)) => format!("{start} {rest}").into_bytes(),
                    None => text.into_bytes(),
                }
            }
            // Very long header value.
            _ => {
                let text = String::from_utf8_lossy(&m).into_owned();
                let long = "a".repeat(rng.below(70_000));
                text.replacen("Call-ID: ", &format!("Call-ID: {long}"), 1)
                    .into_bytes()
            }
        };
    }
    m
}

fn replace_value(text: &str, prefix: &str, value: &str) -> String {
    let Some(start) = text.find(prefix) else {
        return text.to_string();
    };
    let from = start + prefix.len();
    let end = text[from..].find("\r\n").map_or(text.len(), |e| from + e);
    format!("{}{}{}", &text[..from], value, &text[end..])
}

#[test]
fn ten_thousand_mutated_messages_do_not_panic() {
    let corpus = corpus();
    for msg in &corpus {
        assert!(
            message::parse(msg.as_bytes()).is_ok(),
            "corpus must parse: {msg}"
        );
    }
    let mut rng = Rng(0x5EED_0F5A_0717);
    let start = Instant::now();
    let mut now = start;
    let mut udp = TransactionLayer::new(Timers::default());
    let mut tcp = TransactionLayer::new(Timers::default());
    let udp_peer = Peer {
        addr: "127.0.0.1:5061".parse().expect("addr"),
        transport: Transport::Udp,
    };
    let tcp_peer = Peer {
        transport: Transport::Tcp,
        ..udp_peer
    };
    let mut framer = StreamFramer::new();
    let (mut parsed, mut answered) = (0u32, 0u32);
    for i in 0..10_000u32 {
        let base = rng.pick(&corpus).clone();
        let bytes = mutate(&mut rng, base.as_bytes());

        if let Ok(msg) = message::parse(&bytes) {
            parsed += 1;
            // Accessors on whatever survived parsing.
            let _ = (
                message::call_id(&msg),
                message::from_tag(&msg),
                message::to_tag(&msg),
                message::cseq(&msg),
                message::top_via_branch(&msg),
                message::from_user(&msg),
                message::contact_uri(&msg),
            );
            if let Ok(body) = std::str::from_utf8(msg.body())
                && let Ok(offer) = sdp::parse(body)
            {
                let _ = sdp::answer(&offer, "127.0.0.1".parse().expect("ip"), 4000, 1);
            }
            if let sautikit_sip::rsip::SipMessage::Request(req) = &msg {
                let _ = message::request_user(req);
                let _ = message::max_forwards(req);
                let _ = message::to_bytes(response_to(req, 200, None, Some("t")));
                let _ =
                    sautikit_sip::dialog::Dialog::uas(req, "t", sautikit_sip::rsip::Uri::default())
                        .map(|mut d| d.bye("127.0.0.1", 5060, Transport::Udp));
            }
        }

        // The TCP framer gets the stream in random chunks; reset it after an error, as the
        // driver would close and reopen the connection.
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let n = rng.below(rest.len()) + 1;
            framer.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(r) = framer.next_message() {
                if let Ok(m) = r {
                    tcp.handle_datagram(&m, tcp_peer, now);
                }
            }
            if framer.has_failed() {
                framer = StreamFramer::new();
            }
        }

        udp.handle_datagram(&bytes, udp_peer, now);
        for layer in [&mut udp, &mut tcp] {
            while let Some(ev) = layer.poll_event() {
                if let TuEvent::RequestReceived { key, request, .. } = ev {
                    let code = [180u16, 200, 486][i as usize % 3];
                    if layer
                        .respond(&key, response_to(&request, code, None, Some("t")), now)
                        .is_ok()
                    {
                        answered += 1;
                    }
                }
            }
            while layer.poll_transmit().is_some() {}
        }

        now += Duration::from_millis(rng.below(400) as u64);
        udp.handle_timeout(now);
        tcp.handle_timeout(now);
    }
    eprintln!("parsed {parsed}, answered {answered}");
    // Run every remaining timer out: all transactions must end.
    now += Duration::from_secs(7 * 60);
    udp.handle_timeout(now);
    tcp.handle_timeout(now);
    assert!(udp.is_empty() && tcp.is_empty());
    // The mutations must leave a fair share of messages valid, or the layer was barely exercised.
    assert!(parsed > 2_000, "only {parsed} mutated messages parsed");
    assert!(answered > 200, "only {answered} requests reached the TU");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = message::parse(&bytes);
        let mut framer = StreamFramer::new();
        framer.push(&bytes);
        while let Some(Ok(_)) = framer.next_message() {}
        let _ = RtpHeader::parse(&bytes);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = sdp::parse(text);
        }
        let mut layer = TransactionLayer::new(Timers::default());
        let now = Instant::now();
        let peer = Peer { addr: "127.0.0.1:5061".parse().expect("addr"), transport: Transport::Udp };
        layer.handle_datagram(&bytes, peer, now);
        layer.handle_timeout(now + Duration::from_secs(600));
    }

    #[test]
    fn sip_shaped_text_does_not_panic(
        method in "(INVITE|ACK|BYE|CANCEL|OPTIONS|[A-Z]{1,8})",
        uri in "[a-z:@0-9.;=<>\"]{0,40}",
        headers in proptest::collection::vec(("[A-Za-z-]{1,14}", "[ -~]{0,60}"), 0..12),
        body in "[ -~\r\n]{0,100}",
    ) {
        let mut text = format!("{method} {uri} SIP/2.0\r\n");
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text.push_str(&body);
        let _ = message::parse(text.as_bytes());
        let mut layer = TransactionLayer::new(Timers::default());
        let now = Instant::now();
        let peer = Peer { addr: "127.0.0.1:5061".parse().expect("addr"), transport: Transport::Udp };
        layer.handle_datagram(text.as_bytes(), peer, now);
        layer.handle_timeout(now + Duration::from_secs(600));
    }
}
