//! The phone's audio: a 20 ms frame of the caller's voice (a file, or silence) on every tick,
//! RFC 4733 key presses in place of voice while a key is down, and what the engine sends,
//! decoded and placed by its RTP timestamp, with prompts found by their energy. Sans-IO: the
//! driver passes packets and `now`, and sends what comes out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sautikit_sip::rtp::{RtpHeader, RtpSender, g711};
use sautikit_sip::sdp::Codec;

/// 20 ms of G.711.
const FRAME: Duration = Duration::from_millis(20);
const FRAME_SAMPLES: u32 = 160;
/// A key is held for five frames (100 ms), then its end is sent three times (RFC 4733 §2.5.1.4).
const KEY_FRAMES: u32 = 5;
const KEY_END_REPEATS: u32 = 3;
/// A frame whose mean magnitude is above this is sound (about −44 dBFS); the engine's silence
/// decodes to 0.
const SOUND_LEVEL: u32 = 200;
/// This much quiet ends a prompt; espeak-ng pauses for less between words and sentences.
const PROMPT_GAP_FRAMES: u32 = 25;
/// What is heard is kept for at most this long (an hour of 8 kHz audio is 57 MiB).
const MAX_HEARD_SAMPLES: usize = 8_000 * 3_600;

/// What the answer's SDP settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub codec: Codec,
    pub payload_type: u8,
    pub telephone_event: Option<u8>,
}

/// Things the media side noticed.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaEvent {
    /// Sound began after a quiet spell: the `n`th prompt (1-based).
    PromptStarted { n: u32 },
    /// It stopped again; `length` is from its first to its last sound.
    PromptEnded { n: u32, length: Duration },
    /// A key went out as RFC 4733 events.
    KeySent { key: char },
    /// A key could not be sent: the engine did not accept telephone-events.
    KeyNotSent { key: char },
}

struct KeyDown {
    key: char,
    code: u8,
    /// Frames of the event sent so far.
    frames: u32,
}

pub struct PhoneMedia {
    negotiated: Negotiated,
    sender: RtpSender,
    next_tick: Instant,
    voice: Vec<i16>,
    voice_at: usize,
    keys: VecDeque<(Instant, char)>,
    key: Option<KeyDown>,
    heard: Vec<i16>,
    first_timestamp: Option<(u32, u32)>,
    prompts: PromptDetector,
    events: VecDeque<MediaEvent>,
    out: VecDeque<Vec<u8>>,
    pcm: Vec<i16>,
    payload: Vec<u8>,
}

impl PhoneMedia {
    /// Media from `now` on; `voice` (8 kHz) is sent once, then silence.
    pub fn new(negotiated: Negotiated, voice: Vec<i16>, now: Instant) -> Self {
        PhoneMedia {
            negotiated,
            sender: RtpSender::new(negotiated.payload_type),
            next_tick: now,
            voice,
            voice_at: 0,
            keys: VecDeque::new(),
            key: None,
            heard: Vec::new(),
            first_timestamp: None,
            prompts: PromptDetector::default(),
            events: VecDeque::new(),
            out: VecDeque::new(),
            pcm: Vec::with_capacity(FRAME_SAMPLES as usize),
            payload: Vec::with_capacity(FRAME_SAMPLES as usize),
        }
    }

    /// Press `key` at `at` (or as soon as the key before it is done).
    pub fn press(&mut self, key: char, at: Instant) {
        self.keys.push_back((at, key));
    }

    /// A packet from the engine.
    pub fn on_packet(&mut self, packet: &[u8]) {
        let Ok((header, payload)) = RtpHeader::parse(packet) else {
            return;
        };
        if header.payload_type != self.negotiated.payload_type {
            return;
        }
        // Placed by timestamp, relative to the stream's first packet: what was heard, with
        // its gaps, in its own time. A new SSRC (the engine's next prompt source) restarts the
        // reference at the current end.
        let (ssrc, base) = match self.first_timestamp {
            Some((ssrc, base)) if ssrc == header.ssrc => (ssrc, base),
            _ => {
                let base = header
                    .timestamp
                    .wrapping_sub(u32::try_from(self.heard.len()).unwrap_or(0));
                (header.ssrc, base)
            }
        };
        self.first_timestamp = Some((ssrc, base));
        let at = header.timestamp.wrapping_sub(base) as usize;
        self.pcm.clear();
        g711::decode_into(self.negotiated.codec, payload, &mut self.pcm);
        if at + self.pcm.len() > MAX_HEARD_SAMPLES {
            return;
        }
        if self.heard.len() < at + self.pcm.len() {
            self.heard.resize(at + self.pcm.len(), 0);
        }
        self.heard[at..at + self.pcm.len()].copy_from_slice(&self.pcm);
        if let Some(event) = self.prompts.frame(&self.pcm, at) {
            self.events.push_back(event);
        }
    }

    /// Send every frame due by `now`. After a stall, frames older than 60 ms are skipped, not
    /// sent in a burst.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now.saturating_duration_since(self.next_tick) > 3 * FRAME {
            let behind = now.duration_since(self.next_tick).as_micros() / FRAME.as_micros();
            self.next_tick += FRAME * u32::try_from(behind).unwrap_or(u32::MAX).saturating_sub(3);
        }
        while self.next_tick <= now {
            let tick = self.next_tick;
            self.tick(tick);
            self.next_tick += FRAME;
        }
    }

    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    pub fn poll_packet(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MediaEvent> {
        self.events.pop_front()
    }

    /// Whether keys are still waiting to go out.
    pub fn keys_pending(&self) -> bool {
        self.key.is_some() || !self.keys.is_empty()
    }

    /// Everything heard so far, 8 kHz.
    pub fn heard(&self) -> &[i16] {
        &self.heard
    }

    /// The prompt being heard when the call ended is over too.
    pub fn finish(&mut self) {
        if let Some(event) = self.prompts.end() {
            self.events.push_back(event);
        }
    }

    fn tick(&mut self, now: Instant) {
        if self.key.is_none()
            && let Some(&(at, key)) = self.keys.front()
            && at <= now
        {
            self.keys.pop_front();
            match (
                self.negotiated.telephone_event,
                sautikit_sip::dtmf::key_event(key),
            ) {
                (Some(_), Some(code)) => {
                    self.sender.start_talkspurt();
                    self.key = Some(KeyDown {
                        key,
                        code,
                        frames: 0,
                    });
                }
                _ => self.events.push_back(MediaEvent::KeyNotSent { key }),
            }
        }
        let mut packet = Vec::with_capacity(12 + FRAME_SAMPLES as usize);
        if let (Some(down), Some(te)) = (self.key.as_mut(), self.negotiated.telephone_event) {
            down.frames += 1;
            let end = down.frames >= KEY_FRAMES;
            let duration = down.frames.min(KEY_FRAMES) * FRAME_SAMPLES;
            let payload = [
                down.code,
                if end { 0x80 } else { 0 } | 10,
                (duration >> 8) as u8,
                duration as u8,
            ];
            let last = down.frames >= KEY_FRAMES + KEY_END_REPEATS - 1;
            // Every packet of an event carries its start's timestamp; the audio after it goes
            // on from where the event's time ends.
            let samples = if last { down.frames * FRAME_SAMPLES } else { 0 };
            self.sender.packet_with(te, &payload, samples, &mut packet);
            if last {
                self.events.push_back(MediaEvent::KeySent { key: down.key });
                self.key = None;
                self.sender.start_talkspurt();
            }
        } else {
            self.pcm.clear();
            let end = (self.voice_at + FRAME_SAMPLES as usize).min(self.voice.len());
            self.pcm.extend_from_slice(&self.voice[self.voice_at..end]);
            self.voice_at = end;
            self.pcm.resize(FRAME_SAMPLES as usize, 0);
            self.payload.clear();
            g711::encode_into(self.negotiated.codec, &self.pcm, &mut self.payload);
            self.sender
                .next_packet(&self.payload, FRAME_SAMPLES, &mut packet);
        }
        self.out.push_back(packet);
    }
}

/// Finds prompts in what is heard: sound after at least [`PROMPT_GAP_FRAMES`] of quiet.
#[derive(Debug, Default)]
struct PromptDetector {
    count: u32,
    /// The current prompt's first and last sound, in samples.
    current: Option<(usize, usize)>,
    quiet_frames: u32,
}

impl PromptDetector {
    fn frame(&mut self, pcm: &[i16], at: usize) -> Option<MediaEvent> {
        let level = if pcm.is_empty() {
            0
        } else {
            pcm.iter().map(|s| u32::from(s.unsigned_abs())).sum::<u32>() / pcm.len() as u32
        };
        if level > SOUND_LEVEL {
            self.quiet_frames = 0;
            match self.current.as_mut() {
                Some((_, last)) => {
                    *last = at + pcm.len();
                    None
                }
                None => {
                    self.count += 1;
                    self.current = Some((at, at + pcm.len()));
                    Some(MediaEvent::PromptStarted { n: self.count })
                }
            }
        } else {
            self.quiet_frames += 1;
            if self.quiet_frames >= PROMPT_GAP_FRAMES {
                self.end()
            } else {
                None
            }
        }
    }

    fn end(&mut self) -> Option<MediaEvent> {
        let (first, last) = self.current.take()?;
        Some(MediaEvent::PromptEnded {
            n: self.count,
            length: Duration::from_micros((last - first) as u64 * 125),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PCMU: Negotiated = Negotiated {
        codec: Codec::Pcmu,
        payload_type: 0,
        telephone_event: Some(101),
    };

    fn packet(seq: u16, ts: u32, pcm: &[i16]) -> Vec<u8> {
        let mut out = Vec::new();
        RtpHeader::new(0, seq, ts, 7, false).write(&mut out);
        let mut payload = Vec::new();
        g711::encode_into(Codec::Pcmu, pcm, &mut payload);
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn frames_go_out_every_20_ms_and_a_key_replaces_the_voice() {
        let t0 = Instant::now();
        let voice = vec![1000i16; 800];
        let mut media = PhoneMedia::new(PCMU, voice, t0);
        media.press('5', t0 + Duration::from_millis(40));
        for ms in (0..=300).step_by(10) {
            media.handle_timeout(t0 + Duration::from_millis(ms));
        }
        let sent: Vec<(RtpHeader, Vec<u8>)> = std::iter::from_fn(|| media.poll_packet())
            .map(|p| {
                let (h, payload) = RtpHeader::parse(&p).unwrap();
                (h, payload.to_vec())
            })
            .collect();
        // Ticks at 0, 20, …, 300 ms.
        assert_eq!(sent.len(), 16);
        // After a stall, the frames more than 60 ms late are skipped rather than burst.
        media.handle_timeout(t0 + Duration::from_millis(1_000));
        assert_eq!(std::iter::from_fn(|| media.poll_packet()).count(), 4);
        assert_eq!(media.poll_timeout(), t0 + Duration::from_millis(1_020));
        let events: Vec<&(RtpHeader, Vec<u8>)> =
            sent.iter().filter(|(h, _)| h.payload_type == 101).collect();
        assert_eq!(events.len(), 7, "four updates, then the end three times");
        assert!(events[0].0.marker);
        assert!(
            events
                .iter()
                .all(|(h, _)| h.timestamp == events[0].0.timestamp)
        );
        let durations: Vec<u16> = events
            .iter()
            .map(|(_, p)| u16::from_be_bytes([p[2], p[3]]))
            .collect();
        assert_eq!(durations, [160, 320, 480, 640, 800, 800, 800]);
        assert_eq!(events[4].1[1] & 0x80, 0x80, "the fifth is an end");
        assert_eq!(events[0].1[0], 5);
        // The audio after the key goes on from the event's end, numbered on.
        let after = &sent[9];
        assert_eq!(after.0.payload_type, 0);
        assert_eq!(
            after.0.timestamp,
            events[0].0.timestamp.wrapping_add(7 * 160)
        );
        assert!(
            sent.windows(2)
                .all(|w| w[1].0.sequence == w[0].0.sequence.wrapping_add(1))
        );
        assert_eq!(media.poll_event(), Some(MediaEvent::KeySent { key: '5' }));
    }

    #[test]
    fn prompts_are_found_by_sound_after_quiet_and_placed_by_timestamp() {
        let t0 = Instant::now();
        let mut media = PhoneMedia::new(PCMU, Vec::new(), t0);
        let loud = [3000i16; 160];
        let quiet = [0i16; 160];
        let mut seq = 0;
        let mut feed = |media: &mut PhoneMedia, frames: u32, pcm: &[i16], ts: &mut u32| {
            for _ in 0..frames {
                media.on_packet(&packet(seq, *ts, pcm));
                seq += 1;
                *ts += 160;
            }
        };
        let mut ts = 1_000;
        feed(&mut media, 10, &quiet, &mut ts);
        feed(&mut media, 50, &loud, &mut ts);
        feed(&mut media, 30, &quiet, &mut ts);
        // A lost stretch of 5 frames is silence in what was heard.
        ts += 5 * 160;
        feed(&mut media, 10, &loud, &mut ts);
        media.finish();
        let events: Vec<MediaEvent> = std::iter::from_fn(|| media.poll_event()).collect();
        assert_eq!(
            events,
            [
                MediaEvent::PromptStarted { n: 1 },
                MediaEvent::PromptEnded {
                    n: 1,
                    length: Duration::from_secs(1)
                },
                MediaEvent::PromptStarted { n: 2 },
                MediaEvent::PromptEnded {
                    n: 2,
                    length: Duration::from_millis(200)
                },
            ]
        );
        assert_eq!(media.heard().len(), 105 * 160);
        assert!(media.heard()[95 * 160 - 1] == 0 && media.heard()[95 * 160] != 0);
    }

    #[test]
    fn without_telephone_events_a_key_is_reported_unsent() {
        let t0 = Instant::now();
        let mut media = PhoneMedia::new(
            Negotiated {
                telephone_event: None,
                ..PCMU
            },
            Vec::new(),
            t0,
        );
        media.press('1', t0);
        media.handle_timeout(t0);
        assert_eq!(
            media.poll_event(),
            Some(MediaEvent::KeyNotSent { key: '1' })
        );
        assert!(!media.keys_pending());
    }
}
