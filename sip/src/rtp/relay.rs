//! Relaying one RTP stream into another (a B2BUA bridge) without breaking the outgoing stream.
//!
//! A leg's outgoing stream is one RTP source for its whole life: one SSRC, sequence numbers that
//! never skip, a clock that follows the wall clock. Before a bridge its frames come from the
//! pacer (prompts, ringback, silence); while bridged they are the other leg's packets. So a
//! relayed packet is not forwarded as is: [`RtpRelay`] writes it out with the leg's SSRC, the
//! leg's next sequence number and a timestamp mapped from the source's by a fixed offset — fixed
//! at the first relayed packet, and again when the source changes (a new SSRC, a restarted
//! sequence or clock) or resumes after a gap, each time starting a talkspurt (marker bit). The
//! pacer's [`RtpSender`] is the one numbering state both share, so the stream continues across
//! pacer → relay → pacer.
//!
//! Sans-IO: the caller parses with [`RtpView`] (no copy, no allocation), passes the time, and
//! gets the packet written into its own buffer.

use std::time::{Duration, Instant};

use super::{RtpError, RtpHeader, RtpSender};

/// A source that has not been heard for this long has its offset fixed afresh (from the wall
/// clock) when it comes back.
pub const RESYNC_GAP: Duration = Duration::from_secs(1);
/// Source packets this far behind the last one relayed are taken as a restarted sequence, not as
/// late packets.
const LATE_WINDOW: i16 = 64;

/// A received packet, parsed without copying or allocating: the fixed header's fields and the
/// payload (CSRCs, header extension and padding skipped, as a relay does not forward them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpView<'a> {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub payload: &'a [u8],
}

impl<'a> RtpView<'a> {
    /// Parse a packet; accepts and rejects exactly what [`RtpHeader::parse`] does.
    pub fn parse(packet: &'a [u8]) -> Result<Self, RtpError> {
        let fixed: &[u8; 12] = packet
            .get(..12)
            .and_then(|s| s.try_into().ok())
            .ok_or(RtpError::TooShort)?;
        let [b0, b1, s0, s1, t0, t1, t2, t3, c0, c1, c2, c3] = *fixed;
        let version = b0 >> 6;
        if version != 2 {
            return Err(RtpError::BadVersion(version));
        }
        let mut pos = 12 + 4 * usize::from(b0 & 0x0f);
        if packet.len() < pos {
            return Err(RtpError::TooShort);
        }
        if b0 & 0x10 != 0 {
            let words = packet
                .get(pos + 2..pos + 4)
                .map(|w| usize::from(u16::from_be_bytes([w[0], w[1]])))
                .ok_or(RtpError::TooShort)?;
            pos += 4 + 4 * words;
        }
        let mut payload = packet.get(pos..).ok_or(RtpError::TooShort)?;
        if b0 & 0x20 != 0 {
            let n = usize::from(*payload.last().ok_or(RtpError::BadPadding)?);
            if n == 0 || n > payload.len() {
                return Err(RtpError::BadPadding);
            }
            payload = &payload[..payload.len() - n];
        }
        Ok(RtpView {
            marker: b1 & 0x80 != 0,
            payload_type: b1 & 0x7f,
            sequence: u16::from_be_bytes([s0, s1]),
            timestamp: u32::from_be_bytes([t0, t1, t2, t3]),
            ssrc: u32::from_be_bytes([c0, c1, c2, c3]),
            payload,
        })
    }

    /// The fixed header as an [`RtpHeader`] (no CSRCs or extension; allocates nothing).
    pub fn header(&self) -> RtpHeader {
        RtpHeader::new(
            self.payload_type,
            self.sequence,
            self.timestamp,
            self.ssrc,
            self.marker,
        )
    }
}

/// How a relayed packet counts in the outgoing stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    /// Audio worth `samples` samples: it moves the stream's clock on, and the first one after the
    /// offset is fixed carries the marker.
    Audio { samples: u32 },
    /// An RFC 4733 telephone-event: its timestamp names the event's start, so it leaves the
    /// stream's clock alone, and its marker is the source's (it marks an event's first packet).
    Event,
}

/// The source the offset was fixed for.
#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    /// Added to the source's timestamps.
    offset: u32,
    last_seq: u16,
    /// The source timestamp that follows its last audio packet.
    next_ts: u32,
    last_at: Instant,
}

/// Rewrites one source's packets onto one outgoing stream (one per direction of a bridge). See
/// the module documentation.
#[derive(Debug, Clone)]
pub struct RtpRelay {
    clock_rate: u32,
    source: Option<Source>,
    /// The outgoing clock: timestamp `.1` is due at `.0`. Set while relaying.
    clock: Option<(Instant, u32)>,
}

impl RtpRelay {
    /// For a stream whose clock runs at `clock_rate` Hz (8000 for G.711).
    pub fn new(clock_rate: u32) -> Self {
        Self {
            clock_rate: clock_rate.max(1),
            source: None,
            clock: None,
        }
    }

    /// Whether relayed packets own the stream (between [`RtpRelay::start`] and
    /// [`RtpRelay::stop`]).
    pub fn is_active(&self) -> bool {
        self.clock.is_some()
    }

    /// Relayed packets take the stream over from the pacer at `now`: the next one continues
    /// `sender`'s numbering (its next sequence number, its next timestamp plus the time that
    /// passes until that packet), with the marker set.
    pub fn start(&mut self, sender: &mut RtpSender, now: Instant) {
        self.source = None;
        self.clock = Some((now, sender.timestamp));
        sender.start_talkspurt();
    }

    /// The pacer takes the stream back at `now`: its clock moves on by the time since the last
    /// relayed packet (a source that fell silent left a gap in time, not in the timestamps), and
    /// its next packet starts a talkspurt.
    pub fn stop(&mut self, sender: &mut RtpSender, now: Instant) {
        if let Some(clock) = self.clock.take() {
            sender.timestamp = self.clock_at(clock, now);
        }
        self.source = None;
        sender.start_talkspurt();
    }

    /// Write `src` as the stream's next packet into `buf` (cleared first): payload type
    /// `payload_type`, each payload byte replaced through `map` when one is given (G.711 µ-law ↔
    /// A-law). Returns `false`, writing nothing, for a packet older than one already relayed
    /// (late or duplicated: relaying it under a newer sequence number would play it out of
    /// order).
    #[allow(clippy::too_many_arguments)]
    pub fn relay(
        &mut self,
        sender: &mut RtpSender,
        src: &RtpView<'_>,
        payload_type: u8,
        kind: RelayKind,
        map: Option<&[u8; 256]>,
        now: Instant,
        buf: &mut Vec<u8>,
    ) -> bool {
        let refix = match &self.source {
            None => true,
            Some(s) if s.ssrc != src.ssrc => true,
            Some(s) => {
                let behind = src.sequence.wrapping_sub(s.last_seq) as i16;
                if behind <= 0 && behind > -LATE_WINDOW {
                    return false;
                }
                let jump = src.timestamp.wrapping_sub(s.next_ts) as i32;
                behind <= -LATE_WINDOW
                    || now.saturating_duration_since(s.last_at) > RESYNC_GAP
                    || (matches!(kind, RelayKind::Audio { .. })
                        && jump.unsigned_abs() > self.samples(RESYNC_GAP))
            }
        };
        if refix {
            let clock = self.clock.unwrap_or((now, sender.timestamp));
            let mut out_ts = self.clock_at(clock, now);
            if kind == RelayKind::Event
                && let Some(d) = src.payload.get(2..4)
            {
                // The event began this long ago.
                out_ts = out_ts.wrapping_sub(u32::from(u16::from_be_bytes([d[0], d[1]])));
            }
            self.source = Some(Source {
                ssrc: src.ssrc,
                offset: out_ts.wrapping_sub(src.timestamp),
                last_seq: src.sequence,
                next_ts: src.timestamp,
                last_at: now,
            });
            sender.start_talkspurt();
        }
        let Some(source) = self.source.as_mut() else {
            return false;
        };
        let ts = src.timestamp.wrapping_add(source.offset);
        let marker = match kind {
            RelayKind::Audio { .. } => sender.marker_next || src.marker,
            RelayKind::Event => src.marker,
        };
        buf.clear();
        buf.push(0x80);
        buf.push((u8::from(marker) << 7) | (payload_type & 0x7f));
        buf.extend_from_slice(&sender.seq.to_be_bytes());
        buf.extend_from_slice(&ts.to_be_bytes());
        buf.extend_from_slice(&sender.ssrc.to_be_bytes());
        match map {
            Some(map) => buf.extend(src.payload.iter().map(|&b| map[usize::from(b)])),
            None => buf.extend_from_slice(src.payload),
        }
        sender.seq = sender.seq.wrapping_add(1);
        source.last_seq = src.sequence;
        source.last_at = now;
        if let RelayKind::Audio { samples } = kind {
            source.next_ts = src.timestamp.wrapping_add(samples);
            sender.marker_next = false;
            sender.timestamp = ts.wrapping_add(samples);
            let due = now + Duration::from_secs(u64::from(samples)) / self.clock_rate;
            self.clock = Some((due, sender.timestamp));
        }
        true
    }

    /// The outgoing timestamp due at `now`, from `clock` (never earlier than the clock's).
    fn clock_at(&self, clock: (Instant, u32), now: Instant) -> u32 {
        clock
            .1
            .wrapping_add(self.samples(now.saturating_duration_since(clock.0)))
    }

    /// Samples in `d` (modulo 2³², as timestamps wrap).
    fn samples(&self, d: Duration) -> u32 {
        (d.as_nanos() * u128::from(self.clock_rate) / 1_000_000_000) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::g711;
    use crate::sdp::Codec;

    fn packet(pt: u8, seq: u16, ts: u32, ssrc: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        RtpHeader::new(pt, seq, ts, ssrc, marker).write(&mut buf);
        buf.extend_from_slice(payload);
        buf
    }

    /// Relay one audio packet; the parsed output, or `None` when dropped.
    fn relay_audio(
        relay: &mut RtpRelay,
        sender: &mut RtpSender,
        (seq, ts, ssrc, marker): (u16, u32, u32, bool),
        now: Instant,
    ) -> Option<(RtpHeader, Vec<u8>)> {
        let p = packet(0, seq, ts, ssrc, marker, &[0xff; 160]);
        let src = RtpView::parse(&p).expect("parse");
        let mut out = Vec::with_capacity(256);
        relay
            .relay(
                sender,
                &src,
                0,
                RelayKind::Audio { samples: 160 },
                None,
                now,
                &mut out,
            )
            .then(|| {
                let (h, p) = RtpHeader::parse(&out).expect("parse out");
                (h, p.to_vec())
            })
    }

    fn pace(sender: &mut RtpSender) -> RtpHeader {
        let mut buf = Vec::new();
        sender.next_packet(&[0xff; 160], 160, &mut buf);
        RtpHeader::parse(&buf).expect("parse").0
    }

    const MS20: Duration = Duration::from_millis(20);

    #[test]
    fn view_parses_like_the_header_parser() {
        let mut h = RtpHeader::new(96, 7, 99, 5, true);
        h.csrcs = vec![1, 2];
        h.extension = Some(crate::rtp::RtpExtension {
            profile: 0xbede,
            data: vec![1, 2, 3, 4, 5],
        });
        let mut buf = Vec::new();
        h.write(&mut buf);
        buf.extend_from_slice(&[9, 8, 7]);
        let (full, payload) = RtpHeader::parse(&buf).expect("parse");
        let view = RtpView::parse(&buf).expect("view");
        assert_eq!(view.payload, payload);
        assert_eq!(view.payload, [9, 8, 7]);
        assert_eq!(
            (
                view.marker,
                view.payload_type,
                view.sequence,
                view.timestamp,
                view.ssrc
            ),
            (
                full.marker,
                full.payload_type,
                full.sequence,
                full.timestamp,
                full.ssrc
            )
        );
        // Same verdicts on broken packets, and on every truncation of a good one.
        for bad in [
            &[0x80u8; 5][..],
            &[0x40; 12],
            &[0x84, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
        ] {
            assert_eq!(
                RtpView::parse(bad).map(|_| ()),
                RtpHeader::parse(bad).map(|_| ())
            );
        }
        for n in 0..buf.len() {
            assert_eq!(
                RtpView::parse(&buf[..n]).map(|v| v.payload),
                RtpHeader::parse(&buf[..n]).map(|(_, p)| p),
                "truncated to {n}"
            );
        }
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn view_agrees_with_the_header_parser(
                head in proptest::collection::vec(any::<u8>(), 0..40),
                version_two in any::<bool>(),
                tail in proptest::collection::vec(any::<u8>(), 0..40),
            ) {
                let mut packet = head;
                if version_two && let Some(b0) = packet.first_mut() {
                    *b0 = (*b0 & 0x3f) | 0x80;
                }
                packet.extend_from_slice(&tail);
                let view = RtpView::parse(&packet);
                let full = RtpHeader::parse(&packet);
                match (view, full) {
                    (Ok(v), Ok((h, payload))) => {
                        prop_assert_eq!(v.payload, payload);
                        prop_assert_eq!(v.header(), RtpHeader {
                            padding: false,
                            csrcs: Vec::new(),
                            extension: None,
                            ..h
                        });
                    }
                    (Err(a), Err(b)) => prop_assert_eq!(a, b),
                    (v, f) => prop_assert!(false, "view {:?}, header {:?}", v, f),
                }
            }
        }
    }

    #[test]
    fn sequence_continues_across_pacer_relay_pacer() {
        let t0 = Instant::now();
        let mut sender = RtpSender::new(0);
        sender.seq = u16::MAX - 2;
        let mut relay = RtpRelay::new(8000);
        let first = pace(&mut sender);
        let second = pace(&mut sender);
        assert!(first.marker && !second.marker);

        // Bridged: the source's own numbering is replaced by the stream's.
        relay.start(&mut sender, t0);
        let mut seqs = vec![first.sequence, second.sequence];
        let mut stamps = vec![first.timestamp, second.timestamp];
        for k in 0..5u32 {
            let (h, _) = relay_audio(
                &mut relay,
                &mut sender,
                (1000 + k as u16, 50_000 + 160 * k, 0xabc, k == 0),
                t0 + MS20 * k,
            )
            .expect("relayed");
            assert_eq!(h.ssrc, sender.ssrc);
            assert_eq!(h.marker, k == 0, "marker only on the first relayed packet");
            seqs.push(h.sequence);
            stamps.push(h.timestamp);
        }
        // Unbridged: the pacer carries on, a talkspurt starting.
        relay.stop(&mut sender, t0 + MS20 * 5);
        let back = pace(&mut sender);
        assert!(back.marker);
        seqs.push(back.sequence);
        stamps.push(back.timestamp);
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0].wrapping_add(1), "sequence {seqs:?}");
        }
        // Right after the switch, the first relayed packet takes the pacer's next timestamp, and
        // every packet is 160 samples after the one before.
        for w in stamps.windows(2) {
            assert_eq!(w[1].wrapping_sub(w[0]), 160, "timestamps {stamps:?}");
        }
    }

    /// A party packetizing at 30 ms (sip-tester's g711a.pcap: 240-byte PCMA payloads, marker on
    /// the first) relayed to a PCMU leg: every packet goes out, whole and transcoded, numbered on
    /// from the stream's own sequence, its clock 240 samples a packet, one talkspurt.
    #[test]
    fn thirty_millisecond_packets_are_all_relayed() {
        let t0 = Instant::now();
        let mut sender = RtpSender::new(0);
        let mut relay = RtpRelay::new(8000);
        relay.start(&mut sender, t0);
        let map = g711::transcode_table(Codec::Pcma, Codec::Pcmu);
        let audio: Vec<u8> = (0..240).map(|i| i as u8).collect();
        let ms30 = Duration::from_millis(30);
        let mut out = Vec::new();
        let mut got = Vec::new();
        for k in 0..236u16 {
            let p = packet(
                8,
                59_133 + k,
                240 * (u32::from(k) + 1),
                0xdee0_ee8f,
                k == 0,
                &audio,
            );
            assert!(
                relay.relay(
                    &mut sender,
                    &RtpView::parse(&p).expect("parse"),
                    0,
                    RelayKind::Audio { samples: 240 },
                    map,
                    t0 + ms30 * u32::from(k),
                    &mut out,
                ),
                "packet {k} relayed"
            );
            let (h, payload) = RtpHeader::parse(&out).expect("parse out");
            assert_eq!((h.payload_type, h.ssrc), (0, sender.ssrc));
            assert_eq!(payload.len(), 240);
            assert_eq!(payload[7], g711::ulaw::encode(g711::alaw::decode(7)));
            got.push(h);
        }
        assert!(got[0].marker && got[1..].iter().all(|h| !h.marker));
        for w in got.windows(2) {
            assert_eq!(w[1].sequence, w[0].sequence.wrapping_add(1));
            assert_eq!(w[1].timestamp.wrapping_sub(w[0].timestamp), 240);
        }
    }

    #[test]
    fn timestamps_follow_the_source_and_the_wall_clock() {
        let t0 = Instant::now();
        let mut sender = RtpSender::new(0);
        let mut relay = RtpRelay::new(8000);
        relay.start(&mut sender, t0);
        let base = sender.timestamp;
        // The first packet arrives 100 ms after the bridge: 800 samples of time went by.
        let (h, _) = relay_audio(
            &mut relay,
            &mut sender,
            (1, u32::MAX - 100, 7, false),
            t0 + Duration::from_millis(100),
        )
        .expect("relayed");
        assert_eq!(h.timestamp, base.wrapping_add(800));
        assert!(h.marker);
        // The source skips 40 ms (silence suppression, a lost packet): so does the stream; the
        // source's own marker passes.
        let (h2, _) = relay_audio(
            &mut relay,
            &mut sender,
            (2, (u32::MAX - 100).wrapping_add(480), 7, true),
            t0 + Duration::from_millis(160),
        )
        .expect("relayed");
        assert_eq!(h2.timestamp.wrapping_sub(h.timestamp), 480);
        assert!(h2.marker);
        assert_eq!(h2.sequence, h.sequence.wrapping_add(1));

        // A late (reordered) or duplicated packet is dropped and costs no sequence number.
        assert!(
            relay_audio(
                &mut relay,
                &mut sender,
                (1, u32::MAX - 100, 7, false),
                t0 + Duration::from_millis(161)
            )
            .is_none()
        );
        let (h3, _) = relay_audio(
            &mut relay,
            &mut sender,
            (3, (u32::MAX - 100).wrapping_add(640), 7, false),
            t0 + Duration::from_millis(180),
        )
        .expect("relayed");
        assert_eq!(h3.sequence, h2.sequence.wrapping_add(1));
        assert_eq!(h3.timestamp.wrapping_sub(h2.timestamp), 160);
        assert!(!h3.marker);

        // A source that jumps its clock without a pause is re-anchored on the wall clock.
        let (h4, _) = relay_audio(
            &mut relay,
            &mut sender,
            (4, 12345, 7, false),
            t0 + Duration::from_millis(200),
        )
        .expect("relayed");
        assert_eq!(h4.timestamp.wrapping_sub(h3.timestamp), 160);
        assert!(h4.marker);
    }

    #[test]
    fn a_new_source_or_a_pause_refixes_the_offset() {
        let t0 = Instant::now();
        let mut sender = RtpSender::new(0);
        let mut relay = RtpRelay::new(8000);
        relay.start(&mut sender, t0);
        let (a, _) = relay_audio(&mut relay, &mut sender, (10, 1000, 1, false), t0).expect("a");
        // Another SSRC 20 ms later, with an unrelated clock and sequence: the stream goes on
        // where it was, a talkspurt starting, keeping its own SSRC.
        let (b, _) = relay_audio(
            &mut relay,
            &mut sender,
            (60_000, 9_000_000, 2, false),
            t0 + MS20,
        )
        .expect("b");
        assert_eq!(b.ssrc, a.ssrc);
        assert_eq!(b.sequence, a.sequence.wrapping_add(1));
        assert_eq!(b.timestamp.wrapping_sub(a.timestamp), 160);
        assert!(b.marker);
        let (c, _) = relay_audio(
            &mut relay,
            &mut sender,
            (60_001, 9_000_160, 2, false),
            t0 + MS20 * 2,
        )
        .expect("c");
        assert!(!c.marker);
        assert_eq!(c.timestamp.wrapping_sub(b.timestamp), 160);
        // Five seconds of nothing, then the source resumes with a clock that stood still: the
        // stream's clock moved on with the wall clock.
        let (d, _) = relay_audio(
            &mut relay,
            &mut sender,
            (60_002, 9_000_320, 2, false),
            t0 + MS20 * 3 + Duration::from_secs(5),
        )
        .expect("d");
        assert!(d.marker);
        assert_eq!(d.timestamp.wrapping_sub(c.timestamp), 160 + 5 * 8000);
        // A restarted sequence (far behind) is a new start, not a late packet.
        let (e, _) = relay_audio(
            &mut relay,
            &mut sender,
            (59_002, 9_000_480, 2, false),
            t0 + MS20 * 4 + Duration::from_secs(5),
        )
        .expect("e");
        assert_eq!(e.sequence, d.sequence.wrapping_add(1));
        assert!(e.marker);
    }

    #[test]
    fn events_keep_their_timestamp_and_marker_and_transcoding_maps_bytes() {
        let t0 = Instant::now();
        let mut sender = RtpSender::new(8);
        let mut relay = RtpRelay::new(8000);
        relay.start(&mut sender, t0);
        let audio: Vec<u8> = (0..160).map(|i| i as u8).collect();
        let p = packet(0, 5, 800, 3, false, &audio);
        let map = g711::transcode_table(Codec::Pcmu, Codec::Pcma);
        let mut out = Vec::new();
        let kind = RelayKind::Audio { samples: 160 };
        assert!(relay.relay(
            &mut sender,
            &RtpView::parse(&p).expect("parse"),
            8,
            kind,
            map,
            t0,
            &mut out
        ));
        let (a, payload) = RtpHeader::parse(&out).expect("parse");
        let (a, payload) = (a, payload.to_vec());
        assert_eq!(a.payload_type, 8);
        for (x, y) in audio.iter().zip(&payload) {
            assert_eq!(*y, g711::alaw::encode(g711::ulaw::decode(*x)));
        }
        // An event that began with the next audio packet: marked (by its source), named by its
        // start, repeated with the same timestamp; the audio marker is not spent on it.
        let mut stamps = Vec::new();
        for (i, (marker, end)) in [(true, false), (false, false), (false, true)]
            .into_iter()
            .enumerate()
        {
            let ev = [5u8, if end { 0x8a } else { 0x0a }, 0, 80 * (i as u8 + 1)];
            let p = packet(101, 6 + i as u16, 960, 3, marker, &ev);
            assert!(relay.relay(
                &mut sender,
                &RtpView::parse(&p).expect("parse"),
                96,
                RelayKind::Event,
                None,
                t0 + MS20 * (i as u32 + 1),
                &mut out
            ));
            let (h, payload) = RtpHeader::parse(&out).expect("parse");
            assert_eq!((h.payload_type, h.marker), (96, marker));
            assert_eq!(payload, ev);
            assert_eq!(h.sequence, a.sequence.wrapping_add(1 + i as u16));
            stamps.push(h.timestamp);
        }
        assert_eq!(stamps, vec![a.timestamp.wrapping_add(160); 3]);
        // Audio after the event: its clock was not moved by the events.
        let p = packet(0, 9, 960 + 480, 3, false, &audio);
        assert!(relay.relay(
            &mut sender,
            &RtpView::parse(&p).expect("parse"),
            8,
            kind,
            map,
            t0 + MS20 * 4,
            &mut out
        ));
        let (h, _) = RtpHeader::parse(&out).expect("parse");
        assert_eq!(h.timestamp.wrapping_sub(a.timestamp), 640);
        assert!(!h.marker);
    }

    #[test]
    fn the_first_packet_may_be_an_event() {
        let t0 = Instant::now();
        let mut sender = RtpSender::new(0);
        let mut relay = RtpRelay::new(8000);
        relay.start(&mut sender, t0);
        let base = sender.timestamp;
        // Mid-event (already 400 samples long): its start lies 400 samples back.
        let p = packet(101, 1, 5000, 9, false, &[1, 0x0a, 0x01, 0x90]);
        let mut out = Vec::new();
        assert!(relay.relay(
            &mut sender,
            &RtpView::parse(&p).expect("parse"),
            101,
            RelayKind::Event,
            None,
            t0,
            &mut out
        ));
        let (h, _) = RtpHeader::parse(&out).expect("parse");
        assert_eq!(h.timestamp, base.wrapping_sub(400));
        assert!(!h.marker);
        // The audio that follows starts the talkspurt.
        let (a, _) =
            relay_audio(&mut relay, &mut sender, (2, 5400, 9, false), t0 + MS20).expect("audio");
        assert!(a.marker);
        assert_eq!(a.timestamp, base);
    }
}
