//! Arbitrary bytes into the SIP parser, the TCP framer and the transaction layer (timers run out
//! afterwards), plus the SDP and RTP parsers. Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_sip::message;
use sautikit_sip::rtp::RtpHeader;
use sautikit_sip::sdp;
use sautikit_sip::stream::StreamFramer;
use sautikit_sip::transaction::{Peer, Timers, TransactionLayer, Transport, TuEvent};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = message::parse(data) {
        let _ = message::call_id(&msg);
        let _ = message::cseq(&msg);
        let _ = message::top_via_branch(&msg);
        let _ = message::contact_uri(&msg);
        if let Ok(text) = std::str::from_utf8(msg.body())
            && let Ok(offer) = sdp::parse(text)
        {
            let _ = sdp::answer(&offer, Ipv4Addr::LOCALHOST.into(), 4000, 1);
        }
    }
    let _ = RtpHeader::parse(data);

    let mut framer = StreamFramer::new();
    framer.push(data);
    let mut framed = Vec::new();
    while let Some(Ok(m)) = framer.next_message() {
        framed.push(m);
    }

    let now = Instant::now();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 5061));
    for (transport, inputs) in [
        (Transport::Udp, vec![data.to_vec()]),
        (Transport::Tcp, framed),
    ] {
        let mut layer = TransactionLayer::new(Timers::default());
        let peer = Peer { addr, transport };
        for bytes in inputs {
            // Twice: the second is a retransmission.
            layer.handle_datagram(&bytes, peer, now);
            layer.handle_datagram(&bytes, peer, now);
        }
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
    }
});
