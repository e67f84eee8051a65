//! Tones and silence: the beep before a recording, and the energy detector that ends a
//! recording after enough trailing silence.

use std::time::Duration;

/// Default silence threshold: quieter than speech at any sane level, louder than line noise.
pub const DEFAULT_SILENCE_DBFS: f32 = -45.0;

/// Length of the fades at either end of a beep, so it starts and stops without a click.
const FADE_MS: u32 = 5;

/// A sine of `freq_hz` lasting `duration_ms`, peaking at `amplitude` (a fraction of full scale,
/// clamped to 0–1), with 5 ms linear fades in and out.
pub fn beep(freq_hz: f32, duration_ms: u32, sample_rate: u32, amplitude: f32) -> Vec<i16> {
    let n = (u64::from(duration_ms) * u64::from(sample_rate) / 1000) as usize;
    // Short beeps fade over at most half their length each way.
    let fade = ((FADE_MS * sample_rate / 1000) as usize).min(n / 2).max(1);
    let peak = f64::from(amplitude.clamp(0.0, 1.0)) * f64::from(i16::MAX);
    let step = std::f64::consts::TAU * f64::from(freq_hz) / f64::from(sample_rate.max(1));
    (0..n)
        .map(|i| {
            let edge = i.min(n - 1 - i);
            let gain = if edge < fade {
                edge as f64 / fade as f64
            } else {
                1.0
            };
            (peak * gain * (step * i as f64).sin()).round() as i16
        })
        .collect()
}

/// The ringing tone's frequency: ITU-T E.180 §2.3 recommends 400–450 Hz, 425 Hz preferred,
/// which is the frequency of Kenya's national tones.
pub const RINGBACK_HZ: f32 = 425.0;
/// Its cadence, within E.180's recommended ringing-tone range (0.67–1.5 s on, 3–5 s off).
pub const RINGBACK_ON_MS: u32 = 1_000;
pub const RINGBACK_OFF_MS: u32 = 4_000;

/// One period of the ringing tone the caller hears while a dialled party rings: 425 Hz for 1 s,
/// then 4 s of silence. Looped, it is the familiar "ring … ring".
pub fn ringback(sample_rate: u32) -> Vec<i16> {
    // About -13 dBFS peak: as loud as a network tone, well below speech peaks.
    let mut samples = beep(RINGBACK_HZ, RINGBACK_ON_MS, sample_rate, 0.22);
    let silence = (u64::from(RINGBACK_OFF_MS) * u64::from(sample_rate) / 1000) as usize;
    samples.resize(samples.len() + silence, 0);
    samples
}

/// RMS level of `samples` in dBFS (0 for a full-scale square wave, about -3 for a full-scale
/// sine); `-inf` for digital silence or no samples.
pub fn rms_dbfs(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return f32::NEG_INFINITY;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    let rms = (sum / samples.len() as f64).sqrt();
    (20.0 * (rms / 32768.0).log10()) as f32
}

/// Tracks trailing silence in a stream of samples, 20 ms at a time.
#[derive(Debug, Clone)]
pub struct SilenceDetector {
    sample_rate: u32,
    threshold_dbfs: f32,
    frame_len: usize,
    /// Samples of a frame not yet complete.
    partial: Vec<i16>,
    silent_samples: u64,
    heard_sound: bool,
    last_silent: bool,
}

impl SilenceDetector {
    /// Frames whose RMS level is below `threshold_dbfs` count as silence.
    pub fn new(sample_rate: u32, threshold_dbfs: f32) -> Self {
        let sample_rate = sample_rate.max(1);
        let frame_len = (sample_rate / 50).max(1) as usize;
        Self {
            sample_rate,
            threshold_dbfs,
            frame_len,
            partial: Vec::with_capacity(frame_len),
            silent_samples: 0,
            heard_sound: false,
            last_silent: false,
        }
    }

    /// Feed samples; returns whether the stream is silent now (its latest complete 20 ms frame
    /// was below the threshold).
    pub fn push(&mut self, mut samples: &[i16]) -> bool {
        while !samples.is_empty() {
            let take = (self.frame_len - self.partial.len()).min(samples.len());
            let (head, rest) = samples.split_at(take);
            self.partial.extend_from_slice(head);
            samples = rest;
            if self.partial.len() == self.frame_len {
                let silent = rms_dbfs(&self.partial) < self.threshold_dbfs;
                if silent {
                    self.silent_samples += self.frame_len as u64;
                } else {
                    self.silent_samples = 0;
                    self.heard_sound = true;
                }
                self.last_silent = silent;
                self.partial.clear();
            }
        }
        self.last_silent
    }

    /// Count `samples` of missing audio (lost packets, no media at all) as silence.
    pub fn push_silence(&mut self, samples: u32) -> bool {
        // Digital silence is what a recorder writes for such gaps.
        let zeros = vec![0i16; samples as usize];
        self.push(&zeros)
    }

    /// How long the stream has been silent, in complete frames.
    pub fn silent_for(&self) -> Duration {
        let rate = u64::from(self.sample_rate);
        Duration::from_secs(self.silent_samples / rate)
            + Duration::from_nanos(self.silent_samples % rate * 1_000_000_000 / rate)
    }

    /// Whether any frame so far was above the threshold.
    pub fn heard_sound(&self) -> bool {
        self.heard_sound
    }

    /// Start over, as for a new recording.
    pub fn reset(&mut self) {
        self.partial.clear();
        self.silent_samples = 0;
        self.heard_sound = false;
        self.last_silent = false;
    }
}

impl Default for SilenceDetector {
    /// 8 kHz, −45 dBFS.
    fn default() -> Self {
        Self::new(8000, DEFAULT_SILENCE_DBFS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ringback_is_one_second_of_425_hz_then_four_of_silence() {
        let r = ringback(8000);
        assert_eq!(r.len(), 40_000);
        let tone = &r[..8000];
        assert!(rms_dbfs(tone) > -20.0, "tone {}", rms_dbfs(tone));
        assert!(r[8000..].iter().all(|&s| s == 0));
        // 425 cycles in a second: count upward zero crossings.
        let crossings = tone.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
        assert!((423..=426).contains(&crossings), "{crossings}");
    }

    #[test]
    fn beep_is_a_faded_sine() {
        let b = beep(1000.0, 100, 8000, 0.5);
        assert_eq!(b.len(), 800);
        // Starts and ends at zero, no click.
        assert_eq!(b[0], 0);
        assert!(b[799].abs() < 200, "{}", b[799]);
        // Peak near half scale; none of the first 40 samples (the fade) reach it.
        let peak = b.iter().map(|s| s.unsigned_abs()).max().unwrap();
        assert!((16000..=16384).contains(&peak), "{peak}");
        assert!(b[..20].iter().all(|s| s.unsigned_abs() < 8200));
        // 1 kHz at 8 kHz: 8 samples a period, so 200 sign changes in 100 ms.
        let signs: Vec<bool> = b.iter().filter(|&&s| s != 0).map(|&s| s > 0).collect();
        let crossings = signs.windows(2).filter(|w| w[0] != w[1]).count();
        assert!((190..=200).contains(&crossings), "{crossings}");
        // The sustained part sits at a sine's -3 dB below its peak: -9 dBFS for half scale.
        let level = rms_dbfs(&b[40..760]);
        assert!((level + 9.0).abs() < 0.2, "{level}");
        assert_eq!(beep(440.0, 0, 8000, 1.0), Vec::<i16>::new());
        assert_eq!(beep(440.0, 1, 8000, 1.0).len(), 8);
        assert!(beep(440.0, 100, 8000, 7.0).iter().all(|&s| s > i16::MIN));
    }

    #[test]
    fn levels() {
        assert_eq!(rms_dbfs(&[]), f32::NEG_INFINITY);
        assert_eq!(rms_dbfs(&[0; 160]), f32::NEG_INFINITY);
        assert!(rms_dbfs(&[i16::MIN; 160]).abs() < 0.001);
        // ±58 is about -55 dBFS: quiet line noise.
        let noise: Vec<i16> = (0..160)
            .map(|i| if i % 2 == 0 { 58 } else { -58 })
            .collect();
        assert!((rms_dbfs(&noise) + 55.0).abs() < 0.1);
    }

    #[test]
    fn trailing_silence_is_measured() {
        let mut d = SilenceDetector::default();
        assert_eq!(d.silent_for(), Duration::ZERO);
        let speech = beep(400.0, 200, 8000, 0.3);
        let quiet: Vec<i16> = (0..800)
            .map(|i| if i % 2 == 0 { 30 } else { -30 })
            .collect();
        // Initial silence counts too (a caller who never speaks).
        assert!(d.push(&quiet));
        assert_eq!(d.silent_for(), Duration::from_millis(100));
        assert!(!d.heard_sound());
        assert!(!d.push(&speech));
        assert!(d.heard_sound());
        assert_eq!(d.silent_for(), Duration::ZERO);
        // Fed in odd-sized pieces, silence accrues by whole 20 ms frames.
        for chunk in quiet.chunks(7) {
            d.push(chunk);
        }
        assert_eq!(d.silent_for(), Duration::from_millis(100));
        assert!(d.push_silence(8000 * 3));
        assert_eq!(d.silent_for(), Duration::from_millis(3100));
        // Speech resets it.
        assert!(!d.push(&speech[..160]));
        assert_eq!(d.silent_for(), Duration::ZERO);
        d.reset();
        assert!(!d.heard_sound());
    }
}
