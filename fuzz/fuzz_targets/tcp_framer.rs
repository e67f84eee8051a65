//! A TCP byte stream, arriving in pieces, into the framer, and each framed message into the
//! transaction layer over TCP. The first byte picks where the stream is cut, so the fuzzer also
//! explores messages split across reads. Framing must not depend on how the bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_sip::message;
use sautikit_sip::stream::StreamFramer;
use sautikit_sip::transaction::{Peer, Timers, TransactionLayer, Transport, TuEvent};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Every message the framer yields, and whether it failed, feeding `chunk` bytes at a time.
fn frame(data: &[u8], chunk: usize) -> (Vec<Vec<u8>>, bool) {
    let mut framer = StreamFramer::new();
    let mut framed = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        framer.push(piece);
        while let Some(next) = framer.next_message() {
            match next {
                Ok(m) => framed.push(m),
                Err(e) => {
                    let _ = e.status();
                    let _ = framer.failed_head();
                    return (framed, true);
                }
            }
        }
    }
    (framed, framer.has_failed())
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else {
        return;
    };
    let (whole, whole_failed) = frame(data, data.len());
    let (pieces, pieces_failed) = frame(data, usize::from(cut) + 1);
    if !whole_failed && !pieces_failed {
        assert_eq!(whole, pieces, "framing depends on how the bytes arrive");
    }

    let now = Instant::now();
    let peer = Peer {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 5061)),
        transport: Transport::Tcp,
    };
    let mut layer = TransactionLayer::new(Timers::default());
    for bytes in &whole {
        layer.handle_datagram(bytes, peer, now);
    }
    while let Some(ev) = layer.poll_event() {
        if let TuEvent::RequestReceived { key, request, .. } = ev {
            let resp = message::response_to(&request, 486, None, Some("fuzz"));
            let _ = layer.respond(&key, resp, now);
        }
    }
    while layer.poll_transmit().is_some() {}
    layer.handle_timeout(now + Duration::from_secs(600));
    assert!(layer.is_empty());
});
