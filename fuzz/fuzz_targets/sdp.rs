//! An SDP offer into the parser and, when it parses, into our answer; the answer we write must
//! parse back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_sip::sdp;
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(offer) = sdp::parse(text) else {
        return;
    };
    for m in &offer.media {
        let _ = m.payload_types().count();
    }
    if let Ok(answer) = sdp::answer(&offer, Ipv4Addr::LOCALHOST.into(), 4000, 1) {
        assert!(
            sdp::parse(&answer.sdp).is_ok(),
            "our answer does not parse: {}",
            answer.sdp
        );
    }
});
