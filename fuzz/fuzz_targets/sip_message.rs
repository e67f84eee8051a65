//! One datagram into everything a SIP request or response meets on our UDP listener: the parser,
//! the RFC 3261 §8.2 checks, the header accessors, the REGISTER reader, and the transaction layer
//! (the message twice, as a retransmission; requests answered; every timer run out). Any panic,
//! or a transaction still alive after its timers, is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_sip::rsip::SipMessage;
use sautikit_sip::transaction::{Peer, Timers, TransactionLayer, Transport, TuEvent};
use sautikit_sip::{message, registrar, uas};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

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
