//! RTP packets into the header parsers (the media path's and the relay's, which must agree) and
//! the RFC 4733 telephone-event detector, fed as a stream: the input is cut into packets by a
//! length byte before each.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_sip::dtmf::{self, DtmfDetector};
use sautikit_sip::rtp::{RtpHeader, RtpView};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut detector = DtmfDetector::new(101, 8000);
    let mut rest = data;
    let mut at = start;
    while let Some((&len, tail)) = rest.split_first() {
        let (packet, next) = tail.split_at(usize::from(len).min(tail.len()));
        rest = next;
        at += Duration::from_millis(20);

        let parsed = RtpHeader::parse(packet);
        let view = RtpView::parse(packet);
        assert_eq!(parsed.is_ok(), view.is_ok(), "the two RTP parsers disagree");
        if let (Ok((header, payload)), Ok(view)) = (parsed, view) {
            // The relay's view carries the fixed header only (it forwards no CSRCs or
            // extension).
            let fixed = RtpHeader::new(
                header.payload_type,
                header.sequence,
                header.timestamp,
                header.ssrc,
                header.marker,
            );
            assert_eq!(view.header(), fixed);
            assert_eq!(view.payload, payload);
            if let Some(digit) = detector.push(&header, payload, at) {
                let _ = dtmf::key_event(digit.key);
            }
        }
        while detector.poll(at).is_some() {}
        let _ = detector.poll_timeout();
    }
    while detector.poll(at + Duration::from_secs(10)).is_some() {}
    let _ = dtmf::parse_info("application/dtmf-relay", data);
    let _ = dtmf::parse_info("application/dtmf", data);
});
