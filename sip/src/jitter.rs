//! A receive jitter buffer for one inbound RTP stream.
//!
//! Packets go in as they arrive ([`JitterBuffer::push`]); frames come out in timestamp order on a
//! steady playout clock ([`JitterBuffer::pop`]) a fixed delay after arrival, so reordering and
//! jitter within that delay are absorbed. Playout is continuous: when the frame due now is
//! missing, [`Frame::Lost`] says how many samples to conceal, so a recorder's timeline stays
//! aligned with the wall clock. Decoding is the caller's business (it knows the payload types);
//! telephone-events belong to the DTMF detector, not here.
//!
//! Timestamps are unwrapped to 64 bits relative to the playout position, so sequence and
//! timestamp wrap-around need no special cases. Memory is bounded by a packet count.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::rtp::RtpHeader;

/// One frame of playout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A received packet's payload, still encoded.
    Audio {
        timestamp: u32,
        payload_type: u8,
        payload: Vec<u8>,
    },
    /// Nothing arrived in time for these samples: write silence or conceal.
    Lost { samples: u32 },
}

/// Counters for logs and call-quality reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    pub received: u64,
    pub duplicates: u64,
    /// Arrived after their playout time (or overlapped what had been played) and were dropped.
    pub late: u64,
    /// Dropped because the buffer was full.
    pub overflow: u64,
    /// Frames yielded as [`Frame::Lost`].
    pub lost_frames: u64,
    /// Times the playout clock was re-anchored (new SSRC, timestamp jump, talkspurt, delay spike).
    pub resyncs: u64,
}

/// After an SSRC change, packets of the old source arriving this soon are stragglers, not a switch
/// back to it.
const STRAGGLER_WINDOW: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
struct Packet {
    seq: u16,
    timestamp: u32,
    payload_type: u8,
    payload: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct JitterBuffer {
    clock_rate: u32,
    delay: Duration,
    max_packets: usize,
    /// Packets further ahead than this (in samples) are a timestamp jump, not jitter.
    max_ahead: i64,
    /// Frame length assumed for gaps until learned from consecutive packets.
    frame_samples: u32,
    ssrc: Option<u32>,
    /// The source replaced last and when: its stragglers must not switch back to it.
    previous_ssrc: Option<(u32, Instant)>,
    /// Wall time at which the extended timestamp `.1` plays out.
    anchor: Option<(Instant, i64)>,
    /// Extended timestamp = wire timestamp + `offset` (modulo 2^32, unwrapped near `next_ts`).
    /// Extended timestamps count samples of our own output timeline, which survives resyncs.
    offset: i64,
    /// Extended timestamp of the next sample to play.
    next_ts: i64,
    /// Newest sequence number seen and its extended timestamp.
    highest: Option<(u16, i64)>,
    buffer: BTreeMap<i64, Packet>,
    stats: JitterStats,
}

impl Default for JitterBuffer {
    /// 8 kHz with a 60 ms playout delay: three 20 ms G.711 frames.
    fn default() -> Self {
        Self::new(8000, Duration::from_millis(60))
    }
}

impl JitterBuffer {
    pub fn new(clock_rate: u32, delay: Duration) -> Self {
        let clock_rate = clock_rate.max(1);
        Self {
            clock_rate,
            delay,
            // Two seconds of 20 ms frames: far more than a sane delay needs.
            max_packets: 100,
            max_ahead: i64::from(clock_rate) * 2 + samples_in(delay, clock_rate),
            frame_samples: (clock_rate / 50).max(1),
            ssrc: None,
            previous_ssrc: None,
            anchor: None,
            offset: 0,
            next_ts: 0,
            highest: None,
            buffer: BTreeMap::new(),
            stats: JitterStats::default(),
        }
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Packets waiting for playout.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// The SSRC being played, once a packet has arrived.
    pub fn ssrc(&self) -> Option<u32> {
        self.ssrc
    }

    /// Take in one received packet (its padding already stripped by [`RtpHeader::parse`]).
    pub fn push(&mut self, header: RtpHeader, payload: &[u8], now: Instant) {
        self.stats.received += 1;
        let packet = Packet {
            seq: header.sequence,
            timestamp: header.timestamp,
            payload_type: header.payload_type,
            payload: payload.to_vec(),
        };
        if self.ssrc != Some(header.ssrc) || self.anchor.is_none() {
            if self.previous_ssrc.is_some_and(|(ssrc, at)| {
                ssrc == header.ssrc && now.saturating_duration_since(at) < STRAGGLER_WINDOW
            }) {
                self.stats.late += 1;
                return;
            }
            // A new source (or the first packet): its numbering has nothing to do with the old.
            self.previous_ssrc = self.ssrc.map(|ssrc| (ssrc, now));
            self.ssrc = Some(header.ssrc);
            let ts = self.resync(header.timestamp, now);
            self.insert(ts, packet);
            return;
        }
        let ts = self.unwrap_ts(header.timestamp);
        let newer = self
            .highest
            .is_none_or(|(seq, _)| seq_newer(header.sequence, seq));
        let restart = if ts - self.next_ts > self.max_ahead {
            // The sender's clock jumped (or it restarted its numbering).
            true
        } else if ts < self.next_ts {
            // Behind the playout clock. A newer packet with nothing buffered means the stream fell
            // behind (a delay spike, a slow sender clock, a talkspurt with stale timestamps): play
            // from it on rather than drop everything. Otherwise it is a straggler.
            if !(newer && self.buffer.is_empty()) {
                self.stats.late += 1;
                return;
            }
            true
        } else {
            // A talkspurt after silence is the moment to bring the delay back to nominal without
            // audible effect (RFC 3551 §4.1); the silence before it plays as Lost either way.
            header.marker && newer && self.buffer.is_empty()
        };
        if restart {
            let ts = self.resync(header.timestamp, now);
            self.insert(ts, packet);
            return;
        }
        if self.buffer.contains_key(&ts) {
            self.stats.duplicates += 1;
            return;
        }
        self.learn_frame(header.sequence, ts, header.marker);
        self.insert(ts, packet);
    }

    /// When the next frame is due; `None` before the first packet.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due(self.next_ts)
    }

    /// The next frame if it is due by `now`. Call until `None`: after a late wake-up several are.
    pub fn pop(&mut self, now: Instant) -> Option<Frame> {
        if now < self.due(self.next_ts)? {
            return None;
        }
        // Drop packets overlapping what has already played (a frame-size change mid-stream).
        while let Some(entry) = self.buffer.first_entry() {
            if *entry.key() >= self.next_ts {
                break;
            }
            entry.remove();
            self.stats.late += 1;
        }
        let first = self.buffer.first_key_value().map(|(&ts, _)| ts);
        if let Some(ts) = first.filter(|&ts| ts == self.next_ts) {
            let packet = self.buffer.remove(&ts)?;
            // The frame lasts until the next packet's timestamp when that one is its successor.
            let duration = self
                .buffer
                .first_key_value()
                .and_then(|(&next, p)| {
                    let d = next - ts;
                    (p.seq == packet.seq.wrapping_add(1) && d > 0 && d <= self.max_frame())
                        .then_some(d)
                })
                .unwrap_or(i64::from(self.frame_samples));
            self.next_ts += duration;
            return Some(Frame::Audio {
                timestamp: packet.timestamp,
                payload_type: packet.payload_type,
                payload: packet.payload,
            });
        }
        let frame = i64::from(self.frame_samples);
        let samples = first.map_or(frame, |ts| (ts - self.next_ts).clamp(1, frame));
        self.next_ts += samples;
        self.stats.lost_frames += 1;
        Some(Frame::Lost {
            samples: samples as u32,
        })
    }

    fn insert(&mut self, ts: i64, packet: Packet) {
        if self.buffer.len() >= self.max_packets {
            self.stats.overflow += 1;
            return;
        }
        if self
            .highest
            .is_none_or(|(seq, _)| seq_newer(packet.seq, seq))
        {
            self.highest = Some((packet.seq, ts));
        }
        self.buffer.insert(ts, packet);
    }

    /// Learn the frame length from two consecutive packets, so gaps are concealed in the
    /// sender's own frame size (10, 20, 30 ms…).
    fn learn_frame(&mut self, seq: u16, ts: i64, marker: bool) {
        if marker {
            return; // the timestamp gap before a talkspurt is silence, not a frame
        }
        if let Some((hseq, hts)) = self.highest {
            let d = ts - hts;
            if hseq.wrapping_add(1) == seq && d > 0 && d <= self.max_frame() {
                self.frame_samples = d as u32;
            }
        }
    }

    /// Restart playout with the packet stamped `wire_ts`, due one delay from `now`, and return its
    /// extended timestamp. The wall time between the old playout position and the new start plays
    /// as Lost, keeping the output continuous; packets still buffered play first.
    fn resync(&mut self, wire_ts: u32, now: Instant) -> i64 {
        let start = now + self.delay;
        let ts = match self.due(self.next_ts) {
            None => {
                self.next_ts = 0;
                self.anchor = Some((start, 0));
                0
            }
            Some(old_due) => {
                self.stats.resyncs += 1;
                let gap = start
                    .checked_duration_since(old_due)
                    .map_or(0, |d| samples_in(d, self.clock_rate))
                    .min(self.max_ahead);
                let mut ts = self.next_ts + gap;
                // What is still buffered from before plays out first.
                if let Some((&last, _)) = self.buffer.last_key_value() {
                    ts = ts.max(last + i64::from(self.frame_samples));
                }
                let at = self.due(ts).map_or(start, |d| d.max(start));
                self.anchor = Some((at, ts));
                ts
            }
        };
        self.offset = ts - i64::from(wire_ts);
        self.highest = None;
        ts
    }

    /// Extended timestamp of a wire timestamp: the one nearest the playout position.
    fn unwrap_ts(&self, wire_ts: u32) -> i64 {
        let reference = (self.next_ts - self.offset) as u32;
        self.next_ts + i64::from(wire_ts.wrapping_sub(reference) as i32)
    }

    /// Wall time at which extended timestamp `ts` plays; `None` before the first packet.
    fn due(&self, ts: i64) -> Option<Instant> {
        let (at, anchor_ts) = self.anchor?;
        let d = ts - anchor_ts;
        let span = samples_to_duration(d.unsigned_abs(), self.clock_rate);
        Some(if d >= 0 {
            at + span
        } else {
            at.checked_sub(span).unwrap_or(at)
        })
    }

    fn max_frame(&self) -> i64 {
        // 120 ms: larger "frames" are silence (DTX) between packets, concealed as Lost.
        i64::from(self.clock_rate) * 120 / 1000
    }
}

/// Whether sequence number `a` comes after `b`, modulo wrap-around (RFC 3550 §A.1).
fn seq_newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

fn samples_in(d: Duration, clock_rate: u32) -> i64 {
    i64::try_from(d.as_nanos() * u128::from(clock_rate) / 1_000_000_000).unwrap_or(i64::MAX)
}

fn samples_to_duration(samples: u64, clock_rate: u32) -> Duration {
    let rate = u64::from(clock_rate.max(1));
    Duration::from_secs(samples / rate)
        + Duration::from_nanos(samples % rate * 1_000_000_000 / rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSRC: u32 = 0x1234_5678;

    /// A packet arriving at `at_ms`.
    #[derive(Clone)]
    struct Arrival {
        at_ms: u64,
        header: RtpHeader,
        payload: Vec<u8>,
    }

    fn arrival(at_ms: u64, seq: u16, ts: u32) -> Arrival {
        arrival_from(at_ms, SSRC, seq, ts, false)
    }

    fn arrival_from(at_ms: u64, ssrc: u32, seq: u16, ts: u32, marker: bool) -> Arrival {
        Arrival {
            at_ms,
            header: RtpHeader::new(0, seq, ts, ssrc, marker),
            // The payload names the packet so the tests can see which one played.
            payload: vec![seq as u8; 160],
        }
    }

    /// A well-behaved 20 ms stream: packet `k` of `n` sent at `20k` ms.
    fn stream(n: u16, seq0: u16, ts0: u32) -> Vec<Arrival> {
        (0..n)
            .map(|k| {
                arrival(
                    u64::from(k) * 20,
                    seq0.wrapping_add(k),
                    ts0.wrapping_add(u32::from(k) * 160),
                )
            })
            .collect()
    }

    /// Drive the buffer millisecond by millisecond up to `until_ms`; frames with when they came.
    fn run(jb: &mut JitterBuffer, mut arrivals: Vec<Arrival>, until_ms: u64) -> Vec<(u64, Frame)> {
        let t0 = Instant::now();
        arrivals.sort_by_key(|a| a.at_ms);
        let mut arrivals = arrivals.into_iter().peekable();
        let mut out = Vec::new();
        for ms in 0..=until_ms {
            let now = t0 + Duration::from_millis(ms);
            while let Some(a) = arrivals.next_if(|a| a.at_ms == ms) {
                jb.push(a.header, &a.payload, now);
            }
            if let Some(due) = jb.poll_timeout() {
                // Waking exactly at the deadline must be enough.
                assert!(due + Duration::from_millis(1) > now || jb.pop(now).is_some());
            }
            while let Some(f) = jb.pop(now) {
                out.push((ms, f));
            }
        }
        out
    }

    /// Sequence of what played, `Some(first payload byte)` or `None` for a lost 160-sample frame,
    /// up to the last audio frame.
    fn played(frames: &[(u64, Frame)]) -> Vec<Option<u8>> {
        let mut v: Vec<Option<u8>> = frames
            .iter()
            .map(|(_, f)| match f {
                Frame::Audio { payload, .. } => payload.first().copied(),
                Frame::Lost { samples } => {
                    assert_eq!(*samples, 160);
                    None
                }
            })
            .collect();
        while v.last() == Some(&None) {
            v.pop();
        }
        v
    }

    #[test]
    fn in_order_after_the_delay() {
        let mut jb = JitterBuffer::default();
        assert_eq!(jb.poll_timeout(), None);
        let out = run(&mut jb, stream(5, 10, 1000), 200);
        assert_eq!(
            played(&out),
            [Some(10), Some(11), Some(12), Some(13), Some(14)]
        );
        // 60 ms playout delay, then one frame every 20 ms.
        let times: Vec<u64> = out.iter().take(5).map(|(t, _)| *t).collect();
        assert_eq!(times, [60, 80, 100, 120, 140]);
        match &out[0].1 {
            Frame::Audio {
                timestamp,
                payload_type,
                payload,
            } => {
                assert_eq!((*timestamp, *payload_type, payload.len()), (1000, 0, 160));
            }
            f => panic!("unexpected {f:?}"),
        }
        // Afterwards playout goes on with Lost frames so a recorder's timeline stays continuous.
        assert!(matches!(
            out.last(),
            Some((200, Frame::Lost { samples: 160 }))
        ));
        assert_eq!(jb.stats().received, 5);
        assert_eq!(jb.stats().late, 0);
    }

    #[test]
    fn reordered_by_one_and_two() {
        let mut s = stream(6, 0, 0);
        s[1].at_ms = 45; // packet 1 overtaken by packet 2
        let out = run(&mut JitterBuffer::default(), s, 300);
        assert_eq!(played(&out), (0..6).map(Some).collect::<Vec<_>>());

        let mut s = stream(6, 0, 0);
        s[1].at_ms = 65; // packet 1 overtaken by packets 2 and 3
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 300);
        assert_eq!(played(&out), (0..6).map(Some).collect::<Vec<_>>());
        assert_eq!(jb.stats().late, 0);
    }

    #[test]
    fn duplicates_play_once() {
        let mut s = stream(4, 0, 0);
        let mut dup = s[1].clone();
        dup.at_ms = 30;
        s.push(dup);
        // And a copy of packet 0 long after it played.
        let mut late = s[0].clone();
        late.at_ms = 150;
        s.push(late);
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 300);
        assert_eq!(played(&out), [Some(0), Some(1), Some(2), Some(3)]);
        assert_eq!(jb.stats().duplicates, 1);
        assert_eq!(jb.stats().late, 1);
    }

    #[test]
    fn a_lost_packet_is_a_gap_of_its_length() {
        let mut s = stream(5, 0, 0);
        s.remove(2);
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 300);
        assert_eq!(played(&out), [Some(0), Some(1), None, Some(3), Some(4)]);
        assert!(matches!(out[2], (100, Frame::Lost { samples: 160 })));
        assert_eq!(jb.stats().lost_frames as usize, out.len() - 4);
    }

    #[test]
    fn gaps_follow_the_senders_frame_size() {
        // 30 ms frames: 240 samples each.
        let mut s: Vec<Arrival> = (0..5u16)
            .map(|k| arrival(u64::from(k) * 30, k, u32::from(k) * 240))
            .collect();
        s.remove(3);
        let out = run(&mut JitterBuffer::default(), s, 400);
        let kinds: Vec<String> = out
            .iter()
            .take(5)
            .map(|(_, f)| match f {
                Frame::Audio { payload, .. } => format!("a{}", payload[0]),
                Frame::Lost { samples } => format!("l{samples}"),
            })
            .collect();
        assert_eq!(kinds, ["a0", "a1", "a2", "l240", "a4"]);
    }

    #[test]
    fn sequence_and_timestamp_wrap_around() {
        let mut s = stream(8, 65532, u32::MAX - 479);
        s.swap(3, 4); // reorder across the sequence wrap
        s[3].at_ms = 60;
        s[4].at_ms = 61;
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 400);
        let seqs: Vec<u16> = (0..8u16).map(|k| 65532u16.wrapping_add(k)).collect();
        assert_eq!(
            played(&out),
            seqs.iter().map(|s| Some(*s as u8)).collect::<Vec<_>>()
        );
        let ts: Vec<u32> = out
            .iter()
            .filter_map(|(_, f)| match f {
                Frame::Audio { timestamp, .. } => Some(*timestamp),
                Frame::Lost { .. } => None,
            })
            .collect();
        assert_eq!(&ts[2..5], [u32::MAX - 159, 0, 160]);
        assert_eq!(jb.stats().late + jb.stats().resyncs, 0);
    }

    #[test]
    fn an_ssrc_change_restarts_the_stream() {
        let mut s = stream(3, 100, 5000);
        // A new source, unrelated numbering, right after the old one.
        for k in 0..3u16 {
            s.push(arrival_from(
                60 + u64::from(k) * 20,
                0xbeef,
                7 + k,
                900_000 + u32::from(k) * 160,
                k == 0,
            ));
        }
        // A straggler of the old source does not switch back to it.
        s.push(arrival(70, 103, 5480));
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 400);
        let audio: Vec<u8> = out
            .iter()
            .filter_map(|(_, f)| match f {
                Frame::Audio { payload, .. } => payload.first().copied(),
                Frame::Lost { .. } => None,
            })
            .collect();
        assert_eq!(audio, [100, 101, 102, 7, 8, 9]);
        assert_eq!(jb.ssrc(), Some(0xbeef));
        assert_eq!(out[3].0, 120);
        assert_eq!(jb.stats().late, 1);
        // The output timeline stays continuous: one frame per 20 ms of wall time, no pile-up.
        for w in out.windows(2) {
            assert!(w[1].0 >= w[0].0);
        }
        let samples: u64 = out.iter().map(|(_, f)| frame_samples(f)).sum();
        assert_eq!(samples, (400 - 60) / 20 * 160 + 160);
    }

    fn frame_samples(f: &Frame) -> u64 {
        match f {
            Frame::Audio { payload, .. } => payload.len() as u64,
            Frame::Lost { samples } => u64::from(*samples),
        }
    }

    #[test]
    fn late_beyond_the_window_is_dropped() {
        let mut s = stream(6, 0, 0);
        s[2].at_ms = 150; // due at 100 ms
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 300);
        assert_eq!(
            played(&out),
            [Some(0), Some(1), None, Some(3), Some(4), Some(5)]
        );
        assert_eq!(jb.stats().late, 1);
    }

    #[test]
    fn a_talkspurt_after_silence_keeps_the_timeline() {
        // 3 frames, 1 s of silence suppressed (timestamps jump 8000 + 480), then a marked
        // talkspurt arriving 40 ms later than the old clock expected.
        let mut s = stream(3, 0, 0);
        for k in 0..3u16 {
            let mut a = arrival_from(
                1100 + u64::from(k) * 20,
                SSRC,
                3 + k,
                8480 + u32::from(k) * 160,
                k == 0,
            );
            a.payload = vec![3 + k as u8; 160];
            s.push(a);
        }
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 1400);
        let audio: Vec<(u64, u8)> = out
            .iter()
            .filter_map(|(t, f)| match f {
                Frame::Audio { payload, .. } => payload.first().map(|b| (*t, *b)),
                Frame::Lost { .. } => None,
            })
            .collect();
        assert_eq!(
            audio,
            [(60, 0), (80, 1), (100, 2), (1160, 3), (1180, 4), (1200, 5)]
        );
        // Everything up to the talkspurt is accounted for in samples, wall-clock aligned.
        let before: u64 = out
            .iter()
            .filter(|(t, _)| *t < 1160)
            .map(|(_, f)| frame_samples(f))
            .sum();
        assert_eq!(before, (1160 - 60) * 8);
    }

    #[test]
    fn a_delay_spike_loses_nothing_once_it_arrives() {
        // The network stalls for 150 ms, then delivers the backlog (packets 3..=9) in a burst.
        let mut s = stream(12, 0, 0);
        for a in s.iter_mut().skip(3).take(7) {
            a.at_ms = 210;
        }
        s[10].at_ms = 230;
        s[11].at_ms = 250;
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 600);
        let audio: Vec<u8> = out
            .iter()
            .filter_map(|(_, f)| match f {
                Frame::Audio { payload, .. } => payload.first().copied(),
                Frame::Lost { .. } => None,
            })
            .collect();
        assert_eq!(audio, (0..12).collect::<Vec<_>>());
        assert_eq!(jb.stats().late, 0);
        assert_eq!(jb.stats().resyncs, 1);
    }

    #[test]
    fn a_timestamp_jump_resyncs() {
        let mut s = stream(3, 0, 0);
        s.push(arrival(60, 3, 3_000_000)); // no marker, far ahead
        s.push(arrival(80, 4, 3_000_160));
        let mut jb = JitterBuffer::default();
        let out = run(&mut jb, s, 300);
        let audio: Vec<(u64, u8)> = out
            .iter()
            .filter_map(|(t, f)| match f {
                Frame::Audio { payload, .. } => payload.first().map(|b| (*t, *b)),
                Frame::Lost { .. } => None,
            })
            .collect();
        // The old timeline's buffered tail plays, then the new one, one delay after it arrived.
        assert_eq!(audio, [(60, 0), (80, 1), (100, 2), (120, 3), (140, 4)]);
        assert_eq!(jb.stats().resyncs, 1);
    }

    #[test]
    fn memory_is_bounded() {
        let mut jb = JitterBuffer::default();
        let now = Instant::now();
        for k in 0..1000u16 {
            jb.push(
                RtpHeader::new(0, k, u32::from(k), SSRC, false),
                &[0; 160],
                now,
            );
        }
        assert!(jb.len() <= 100);
        assert!(jb.stats().overflow > 0);
    }
}
