//! DTMF reception: RFC 4733 telephone-events in RTP, and SIP INFO bodies.
//!
//! An RFC 4733 event is named by its RTP timestamp (the moment it began): the sender repeats
//! packets with a growing duration while the key is held, then sends the final packet, with the
//! E bit, typically three times. [`DtmfDetector`] reports each event once: on its first end
//! packet, or, when every end packet was lost, as soon as a later event begins or after a quiet
//! [`DtmfDetector::poll_timeout`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::rtp::RtpHeader;

/// One key press.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfDigit {
    /// `'0'`–`'9'`, `'*'`, `'#'` or `'A'`–`'D'`.
    pub key: char,
    /// How long the key was held, as far as the packets told.
    pub duration_ms: u32,
    /// RTP timestamp of the event's start.
    pub timestamp: u32,
    /// Whether an end packet was seen; `false` when reported by timeout or a following event.
    pub ended: bool,
}

/// With no packet of an unfinished event for this long, its end packets are taken as lost.
/// Senders refresh a held key every 50 ms (RFC 4733 §2.5.1.2), so this is ten missed updates.
pub const DEFAULT_END_TIMEOUT: Duration = Duration::from_millis(500);

/// How many reported events are remembered, to ignore their late retransmissions.
const REMEMBERED: usize = 16;

#[derive(Debug, Clone)]
struct Event {
    ssrc: u32,
    timestamp: u32,
    code: u8,
    duration: u16,
    last_seen: Instant,
}

/// Detects key presses in one stream's RFC 4733 packets. Sans-IO: time is passed in.
#[derive(Debug, Clone)]
pub struct DtmfDetector {
    payload_type: u8,
    clock_rate: u32,
    end_timeout: Duration,
    /// The event in progress, not yet reported.
    current: Option<Event>,
    /// (SSRC, timestamp) of recently reported events.
    reported: VecDeque<(u32, u32)>,
    /// Digits found but not yet handed out (one packet can finish one event and carry another).
    ready: VecDeque<DtmfDigit>,
    last_now: Option<Instant>,
}

impl DtmfDetector {
    /// For the telephone-event payload type and clock rate negotiated in SDP (usually 101/8000).
    pub fn new(payload_type: u8, clock_rate: u32) -> Self {
        Self {
            payload_type: payload_type & 0x7f,
            clock_rate: clock_rate.max(1),
            end_timeout: DEFAULT_END_TIMEOUT,
            current: None,
            reported: VecDeque::with_capacity(REMEMBERED),
            ready: VecDeque::new(),
            last_now: None,
        }
    }

    pub fn with_end_timeout(mut self, timeout: Duration) -> Self {
        self.end_timeout = timeout;
        self
    }

    pub fn payload_type(&self) -> u8 {
        self.payload_type
    }

    /// Feed one received RTP packet (any payload type; others are ignored). Returns a digit when
    /// this packet completes one; call [`DtmfDetector::poll`] too, as a packet can complete two.
    pub fn push(&mut self, header: &RtpHeader, payload: &[u8], now: Instant) -> Option<DtmfDigit> {
        self.last_now = Some(now);
        if header.payload_type == self.payload_type {
            self.handle(header, payload, now);
        }
        self.ready.pop_front()
    }

    /// A digit whose end packets were lost once its timeout has passed, or one still queued.
    pub fn poll(&mut self, now: Instant) -> Option<DtmfDigit> {
        self.last_now = Some(now);
        if self.ready.is_empty()
            && self
                .current
                .as_ref()
                .is_some_and(|e| now >= e.last_seen + self.end_timeout)
        {
            self.finish(false);
        }
        self.ready.pop_front()
    }

    /// When [`DtmfDetector::poll`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.ready.is_empty() {
            return self.last_now;
        }
        self.current
            .as_ref()
            .map(|e| e.last_seen + self.end_timeout)
    }

    fn handle(&mut self, header: &RtpHeader, payload: &[u8], now: Instant) {
        // Event (8 bits), E|R|volume (8 bits), duration (16 bits). Only the first block matters:
        // further blocks in one packet are earlier events' redundant ends (RFC 4733 §2.5.1.5).
        let Some(&[code, flags, d0, d1]) =
            payload.get(..4).and_then(|b| <&[u8; 4]>::try_from(b).ok())
        else {
            return;
        };
        let end = flags & 0x80 != 0;
        let duration = u16::from_be_bytes([d0, d1]);
        let id = (header.ssrc, header.timestamp);

        if let Some(ev) = self
            .current
            .as_mut()
            .filter(|e| (e.ssrc, e.timestamp) == id)
        {
            ev.duration = ev.duration.max(duration);
            ev.last_seen = now;
            if end {
                self.finish(true);
            }
            return;
        }
        if self.reported.contains(&id) {
            // A retransmitted end packet, or a late update, of a digit already reported. A marked
            // start packet, though, is the same capture replayed (SIPp's play_pcap_audio sends a
            // recording unchanged, so "11" repeats the timestamps): a new key press.
            if !header.marker || end {
                return;
            }
            self.reported.retain(|r| *r != id);
        }
        // A new event: the one in progress ended with its end packets lost.
        if self.current.is_some() {
            self.finish(false);
        }
        if code > 15 {
            return; // not a DTMF key (RFC 4733 §3.2: tones and line events)
        }
        self.current = Some(Event {
            ssrc: header.ssrc,
            timestamp: header.timestamp,
            code,
            duration,
            last_seen: now,
        });
        if end {
            self.finish(true);
        }
    }

    /// Report the event in progress.
    fn finish(&mut self, ended: bool) {
        let Some(ev) = self.current.take() else {
            return;
        };
        if self.reported.len() >= REMEMBERED {
            self.reported.pop_front();
        }
        self.reported.push_back((ev.ssrc, ev.timestamp));
        if let Some(key) = event_key(ev.code) {
            self.ready.push_back(DtmfDigit {
                key,
                duration_ms: u32::try_from(
                    u64::from(ev.duration) * 1000 / u64::from(self.clock_rate),
                )
                .unwrap_or(u32::MAX),
                timestamp: ev.timestamp,
                ended,
            });
        }
    }
}

/// The key of an RFC 4733 DTMF event code (0–15).
pub fn event_key(code: u8) -> Option<char> {
    match code {
        0..=9 => Some(char::from(b'0' + code)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + code - 12)),
        _ => None,
    }
}

/// The RFC 4733 event code of a key (`'a'`–`'d'` accepted too).
pub fn key_event(key: char) -> Option<u8> {
    match key.to_ascii_uppercase() {
        c @ '0'..='9' => Some(c as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        c @ 'A'..='D' => Some(c as u8 - b'A' + 12),
        _ => None,
    }
}

/// The key in a SIP INFO body: `application/dtmf-relay` (`Signal=5` / `Duration=160` lines,
/// keys case-insensitive, spaces allowed) or `application/dtmf` (the body is the key). Event
/// numbers 10–15 are accepted for `*`, `#`, `A`–`D`, as some gateways send them.
pub fn parse_info(content_type: &str, body: &[u8]) -> Option<char> {
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    let body = std::str::from_utf8(body).ok()?;
    if media_type.eq_ignore_ascii_case("application/dtmf-relay") {
        body.lines().find_map(|line| {
            let (name, value) = line.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("signal")
                .then(|| info_key(value))
                .flatten()
        })
    } else if media_type.eq_ignore_ascii_case("application/dtmf") {
        info_key(body)
    } else {
        None
    }
}

fn info_key(value: &str) -> Option<char> {
    let value = value.trim();
    let mut chars = value.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => key_event(c).and_then(event_key),
        _ => value
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= 15)
            .and_then(event_key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT: u8 = 101;
    const SSRC: u32 = 0x0e05_384e;

    /// Packets of one key press as a typical sender makes them: a marked start, updates every
    /// 20 ms, three end packets. Returns (ms offset, header, payload).
    fn press(
        code: u8,
        seq0: u16,
        ts: u32,
        updates: u16,
        at_ms: u64,
    ) -> Vec<(u64, RtpHeader, Vec<u8>)> {
        let mut v = Vec::new();
        for k in 0..updates {
            let d = (k + 1) * 160;
            v.push((
                at_ms + u64::from(k) * 20,
                RtpHeader::new(PT, seq0 + k, ts, SSRC, k == 0),
                vec![code, 10, (d >> 8) as u8, d as u8],
            ));
        }
        let d = (updates + 1) * 160;
        for r in 0..3u16 {
            v.push((
                at_ms + u64::from(updates) * 20,
                RtpHeader::new(PT, seq0 + updates + r, ts, SSRC, false),
                vec![code, 0x80 | 10, (d >> 8) as u8, d as u8],
            ));
        }
        v
    }

    fn feed(
        det: &mut DtmfDetector,
        t0: Instant,
        packets: &[(u64, RtpHeader, Vec<u8>)],
    ) -> Vec<(u64, DtmfDigit)> {
        let mut out = Vec::new();
        for (ms, h, p) in packets {
            let now = t0 + Duration::from_millis(*ms);
            if let Some(d) = det.push(h, p, now) {
                out.push((*ms, d));
            }
            while let Some(d) = det.poll(now) {
                out.push((*ms, d));
            }
        }
        out
    }

    #[test]
    fn one_press_is_one_digit_on_the_first_end_packet() {
        let mut det = DtmfDetector::new(PT, 8000);
        let t0 = Instant::now();
        let out = feed(&mut det, t0, &press(1, 1000, 5000, 6, 0));
        assert_eq!(
            out,
            [(
                120,
                DtmfDigit {
                    key: '1',
                    duration_ms: 140,
                    timestamp: 5000,
                    ended: true
                }
            )]
        );
        assert_eq!(det.poll_timeout(), None);
        assert_eq!(det.poll(t0 + Duration::from_secs(10)), None);
    }

    #[test]
    fn the_same_key_twice_is_two_digits() {
        let mut det = DtmfDetector::new(PT, 8000);
        let mut packets = press(1, 0, 8000, 5, 0);
        packets.extend(press(1, 8, 8000 + 2400, 5, 300));
        let keys: Vec<char> = feed(&mut det, Instant::now(), &packets)
            .iter()
            .map(|(_, d)| d.key)
            .collect();
        assert_eq!(keys, ['1', '1']);
    }

    #[test]
    fn duplicated_packets_count_once() {
        let mut det = DtmfDetector::new(PT, 8000);
        let mut packets = Vec::new();
        for p in press(5, 0, 1234, 4, 0) {
            packets.push(p.clone());
            packets.push(p);
        }
        let out = feed(&mut det, Instant::now(), &packets);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.key, '5');
    }

    #[test]
    fn lost_end_packets_report_on_timeout() {
        let mut det = DtmfDetector::new(PT, 8000);
        let t0 = Instant::now();
        let packets: Vec<_> = press(9, 0, 0, 6, 0)
            .into_iter()
            .filter(|(_, _, p)| p[1] & 0x80 == 0)
            .collect();
        assert!(feed(&mut det, t0, &packets).is_empty());
        // Last update at 100 ms: due 500 ms later.
        let due = t0 + Duration::from_millis(600);
        assert_eq!(det.poll_timeout(), Some(due));
        assert_eq!(det.poll(due - Duration::from_millis(1)), None);
        let d = det.poll(due).expect("digit");
        assert_eq!((d.key, d.duration_ms, d.ended), ('9', 120, false));
        assert_eq!(det.poll_timeout(), None);
        // The end packets turning up late change nothing.
        let late: Vec<_> = press(9, 0, 0, 6, 0)
            .into_iter()
            .filter(|(_, _, p)| p[1] & 0x80 != 0)
            .collect();
        assert!(feed(&mut det, t0 + Duration::from_secs(1), &late).is_empty());
    }

    #[test]
    fn lost_end_packets_report_when_the_next_event_begins() {
        let mut det = DtmfDetector::new(PT, 8000);
        let mut packets: Vec<_> = press(4, 0, 0, 3, 0)
            .into_iter()
            .filter(|(_, _, p)| p[1] & 0x80 == 0)
            .collect();
        packets.extend(press(2, 3, 1600, 3, 120));
        let out = feed(&mut det, Instant::now(), &packets);
        let got: Vec<(u64, char, bool)> = out.iter().map(|(t, d)| (*t, d.key, d.ended)).collect();
        assert_eq!(got, [(120, '4', false), (180, '2', true)]);
    }

    #[test]
    fn only_end_packets_still_make_a_digit() {
        let mut det = DtmfDetector::new(PT, 8000);
        let packets: Vec<_> = press(11, 0, 77, 4, 0)
            .into_iter()
            .filter(|(_, _, p)| p[1] & 0x80 != 0)
            .collect();
        let out = feed(&mut det, Instant::now(), &packets);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.key, '#');
    }

    #[test]
    fn ignores_other_payloads_non_dtmf_events_and_runts() {
        let mut det = DtmfDetector::new(PT, 8000);
        let now = Instant::now();
        let audio = RtpHeader::new(0, 1, 0, SSRC, false);
        assert_eq!(det.push(&audio, &[0x80, 0x80, 0, 160], now), None);
        let h = RtpHeader::new(PT, 2, 160, SSRC, true);
        assert_eq!(det.push(&h, &[1, 0x80], now), None);
        // Event 16 (a tone, not a key) with its end bit.
        assert_eq!(det.push(&h, &[16, 0x80, 0, 160], now), None);
        assert_eq!(det.poll_timeout(), None);
        // Volume is ignored.
        let h = RtpHeader::new(PT, 3, 320, SSRC, true);
        let d = det.push(&h, &[0xd - 1, 0x80 | 63, 0, 160], now);
        assert_eq!(d.map(|d| d.key), Some('A'));
    }

    #[test]
    fn info_bodies() {
        assert_eq!(
            parse_info("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n"),
            Some('5')
        );
        assert_eq!(
            parse_info(
                "Application/DTMF-Relay; charset=utf-8",
                b"signal= *\r\nduration= 250"
            ),
            Some('*')
        );
        assert_eq!(
            parse_info("application/dtmf-relay", b"Duration=100\nSIGNAL = #\n"),
            Some('#')
        );
        assert_eq!(
            parse_info("application/dtmf-relay", b"Signal=11"),
            Some('#')
        );
        assert_eq!(parse_info("application/dtmf-relay", b"Signal=d"), Some('D'));
        assert_eq!(parse_info("application/dtmf-relay", b"Duration=160"), None);
        assert_eq!(parse_info("application/dtmf-relay", b"Signal=X"), None);
        assert_eq!(parse_info("application/dtmf-relay", b"Signal=16"), None);
        assert_eq!(parse_info("application/dtmf-relay", &[0xff, 0xfe]), None);
        assert_eq!(parse_info("application/dtmf", b"5"), Some('5'));
        assert_eq!(parse_info("application/dtmf", b" 7\r\n"), Some('7'));
        assert_eq!(parse_info("application/dtmf", b"55"), None);
        assert_eq!(parse_info("text/plain", b"5"), None);
    }

    #[test]
    fn keys_and_codes_round_trip() {
        for code in 0..16 {
            assert_eq!(event_key(code).and_then(key_event), Some(code));
        }
        assert_eq!(event_key(16), None);
        assert_eq!(key_event('x'), None);
    }

    /// RTP packets of a pcap capture (Ethernet/IPv4/UDP) with their capture times.
    fn pcap_rtp(bytes: &[u8]) -> Vec<(Duration, Vec<u8>)> {
        let magic: [u8; 4] = bytes[..4].try_into().expect("pcap header");
        let (le, nanos) = match magic {
            [0xd4, 0xc3, 0xb2, 0xa1] => (true, false),
            [0xa1, 0xb2, 0xc3, 0xd4] => (false, false),
            [0x4d, 0x3c, 0xb2, 0xa1] => (true, true),
            [0xa1, 0xb2, 0x3c, 0x4d] => (false, true),
            m => panic!("not a pcap file: {m:02x?}"),
        };
        let u32_at = |b: &[u8], at: usize| {
            let w: [u8; 4] = b[at..at + 4].try_into().expect("u32");
            if le {
                u32::from_le_bytes(w)
            } else {
                u32::from_be_bytes(w)
            }
        };
        assert_eq!(u32_at(bytes, 20), 1, "link type must be Ethernet");
        let mut out = Vec::new();
        let mut pos = 24;
        while pos + 16 <= bytes.len() {
            let secs = u64::from(u32_at(bytes, pos));
            let frac = u64::from(u32_at(bytes, pos + 4));
            let incl = u32_at(bytes, pos + 8) as usize;
            let frame = &bytes[pos + 16..pos + 16 + incl];
            pos += 16 + incl;
            let at = Duration::from_secs(secs)
                + if nanos {
                    Duration::from_nanos(frac)
                } else {
                    Duration::from_micros(frac)
                };
            assert_eq!(frame[12..14], [0x08, 0x00], "IPv4 only");
            let ip = &frame[14..];
            assert_eq!(ip[9], 17, "UDP only");
            let udp = &ip[usize::from(ip[0] & 0x0f) * 4..];
            let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
            out.push((at, udp[8..udp_len].to_vec()));
        }
        out
    }

    const SIPP_CAPTURES: &str = "/usr/share/sip-tester";

    /// The telephone-event captures SIPp plays with `play_pcap_audio`: PT 101, a marked start
    /// packet, six updates 20 ms apart, and three identical end packets (same sequence number)
    /// at 140 ms reporting a duration of 2240 samples.
    #[test]
    fn sipp_captures_yield_their_digit_once() {
        let dir = std::path::Path::new(SIPP_CAPTURES);
        if !dir.is_dir() {
            eprintln!("{SIPP_CAPTURES} missing (sip-tester not installed): skipping");
            return;
        }
        let names = [
            ("0", '0'),
            ("1", '1'),
            ("2", '2'),
            ("3", '3'),
            ("4", '4'),
            ("5", '5'),
            ("6", '6'),
            ("7", '7'),
            ("8", '8'),
            ("9", '9'),
            ("star", '*'),
            ("pound", '#'),
        ];
        let t0 = Instant::now();
        // One detector hearing all the captures in a row, as one SIPp call playing them would,
        // followed by "1" again (the same capture, so the same RTP timestamps).
        let mut all = DtmfDetector::new(PT, 8000);
        let mut heard = String::new();
        let mut offset = Duration::ZERO;
        let sequence = names.iter().chain(std::iter::once(&("1", '1')));
        for (name, key) in sequence {
            let path = dir.join(format!("dtmf_2833_{name}.pcap"));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let packets = pcap_rtp(&bytes);
            assert_eq!(packets.len(), 10, "{name}");
            let first = packets[0].0;
            let mut single = DtmfDetector::new(PT, 8000);
            let mut digits = Vec::new();
            for (at, rtp) in &packets {
                let (h, payload) = RtpHeader::parse(rtp).expect("RTP");
                assert_eq!(h.payload_type, PT);
                let now = t0 + offset + (*at - first);
                digits.extend(single.push(&h, payload, now));
                digits.extend(single.poll(now));
                heard.extend(all.push(&h, payload, now).map(|d| d.key));
            }
            // Nothing more, however long we wait.
            let later = t0 + offset + Duration::from_secs(5);
            digits.extend(single.poll(later));
            assert_eq!(digits.len(), 1, "{name}: {digits:?}");
            let d = digits[0];
            assert_eq!((d.key, d.ended, d.duration_ms), (*key, true, 280), "{name}");
            offset += Duration::from_secs(1);
            heard.extend(all.poll(t0 + offset).map(|d| d.key));
        }
        assert_eq!(heard, "0123456789*#1");
    }
}
