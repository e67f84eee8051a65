//! One datagram into everything a SIP request or response meets on our UDP listener: the parser,
//! the RFC 3261 §8.2 checks, the header accessors, the REGISTER reader, and the transaction layer
//! (the message twice, as a retransmission; requests answered; responses matched against an
//! INVITE and a BYE of our own; every timer run out). Any panic,
//! or a transaction still alive after its timers, is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_sip::rsip::SipMessage;
use sautikit_sip::transaction::{Peer, Timers, TransactionLayer, Transport, TuEvent};
use sautikit_sip::{message, registrar, uas};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const CLIENT_REQUESTS: [&str; 2] = [
    "INVITE sip:+254711000001@127.0.0.1:5061 SIP/2.0\r\n\
     Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-fuzz-invite\r\n\
     From: <sip:+254700000001@127.0.0.1>;tag=fuzz\r\n\
     To: <sip:+254711000001@127.0.0.1:5061>\r\n\
     Call-ID: fuzz-client@127.0.0.1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n\
     Contact: <sip:127.0.0.1:5060>\r\nContent-Length: 0\r\n\r\n",
    "BYE sip:+254711000001@127.0.0.1:5061 SIP/2.0\r\n\
     Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-fuzz-bye\r\n\
     From: <sip:+254700000001@127.0.0.1>;tag=fuzz\r\n\
     To: <sip:+254711000001@127.0.0.1:5061>;tag=far\r\n\
     Call-ID: fuzz-client@127.0.0.1\r\nCSeq: 2 BYE\r\nMax-Forwards: 70\r\n\
     Content-Length: 0\r\n\r\n",
];

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = message::parse(data) {
        let _ = message::call_id(&msg);
        let _ = message::cseq(&msg);
        let _ = message::top_via_branch(&msg);
        let _ = message::contact_uri(&msg);
        let _ = message::from_user(&msg);
        if let SipMessage::Request(req) = &msg {
            let _ = uas::malformed(req);
            let _ = uas::refusal(req);
            let _ = message::request_user(req);
            let _ = message::max_forwards(req);
            let _ = registrar::parse_register(req);
        }
    }

    let now = Instant::now();
    let peer = Peer {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 5061)),
        transport: Transport::Udp,
    };
    let mut layer = TransactionLayer::new(Timers::default());
    // Our own client transactions (an INVITE to a trunk, a BYE), so that responses carrying
    // their branches (as the seeds' do) reach the client state machines rather than being dropped.
    for request in CLIENT_REQUESTS {
        if let Ok(SipMessage::Request(req)) = message::parse(request.as_bytes()) {
            let _ = layer.send_request(req, peer, now);
        }
    }
    assert_eq!(
        layer.len(),
        CLIENT_REQUESTS.len(),
        "the client requests did not start"
    );
    layer.handle_datagram(data, peer, now);
    layer.handle_datagram(data, peer, now);
    while let Some(ev) = layer.poll_event() {
        if let TuEvent::RequestReceived { key, request, .. } = ev {
            let resp = message::response_to(&request, 200, None, Some("fuzz"));
            let _ = layer.respond(&key, resp, now);
        }
    }
    while layer.poll_transmit().is_some() {}
    layer.handle_timeout(now + Duration::from_secs(1));
    layer.handle_timeout(now + Duration::from_secs(600));
    assert!(layer.is_empty());
});
