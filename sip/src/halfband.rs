//! 8 kHz ↔ 16 kHz for media streams that speak 16-bit PCM at 16 kHz (`audio/l16;rate=16000`):
//! doubling and halving the rate through one half-band low-pass filter (a Blackman-windowed
//! sinc), streaming — each keeps the samples the next chunk's first outputs need, so audio split
//! into chunks of any size comes out as if it had been converted whole.

/// Taps of the half-band filter (odd; every other tap but the centre is zero).
const TAPS: usize = 31;

/// The filter, normalised for unity gain at DC (at the higher rate).
fn taps() -> [f32; TAPS] {
    let mut h = [0f32; TAPS];
    let mid = (TAPS / 2) as f32;
    let mut sum = 0f32;
    for (i, tap) in h.iter_mut().enumerate() {
        let n = i as f32 - mid;
        // Cut-off at a quarter of the higher rate: the lower rate's Nyquist frequency.
        let sinc = if n == 0.0 {
            0.5
        } else {
            (std::f32::consts::PI * n / 2.0).sin() / (std::f32::consts::PI * n)
        };
        let x = i as f32 / (TAPS - 1) as f32;
        let window = 0.42 - 0.5 * (2.0 * std::f32::consts::PI * x).cos()
            + 0.08 * (4.0 * std::f32::consts::PI * x).cos();
        *tap = sinc * window;
        sum += *tap;
    }
    for tap in &mut h {
        *tap /= sum;
    }
    h
}

fn clamp(x: f32) -> i16 {
    x.round().clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16
}

/// 8 kHz in, 16 kHz out (twice as many samples).
#[derive(Debug, Clone)]
pub struct Upsampler {
    h: [f32; TAPS],
    /// The last input samples at the higher rate (zeros stuffed between them).
    history: Vec<f32>,
}

impl Default for Upsampler {
    fn default() -> Self {
        Upsampler {
            h: taps(),
            history: vec![0.0; TAPS - 1],
        }
    }
}

impl Upsampler {
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        out.clear();
        for &s in input {
            for stuffed in [f32::from(s) * 2.0, 0.0] {
                self.history.push(stuffed);
                let start = self.history.len() - TAPS;
                let window = &self.history[start..];
                out.push(clamp(window.iter().zip(&self.h).map(|(x, h)| x * h).sum()));
            }
        }
        let keep = self.history.len() - (TAPS - 1);
        self.history.drain(..keep);
    }
}

/// 16 kHz in, 8 kHz out (half as many samples; an odd sample waits for the next chunk).
#[derive(Debug, Clone)]
pub struct Downsampler {
    h: [f32; TAPS],
    history: Vec<f32>,
    /// Samples taken since the last output (outputs are every other input).
    phase: usize,
}

impl Default for Downsampler {
    fn default() -> Self {
        Downsampler {
            h: taps(),
            history: vec![0.0; TAPS - 1],
            phase: 0,
        }
    }
}

impl Downsampler {
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        out.clear();
        for &s in input {
            self.history.push(f32::from(s));
            self.phase += 1;
            if self.phase == 2 {
                self.phase = 0;
                let start = self.history.len() - TAPS;
                let window = &self.history[start..];
                out.push(clamp(window.iter().zip(&self.h).map(|(x, h)| x * h).sum()));
            }
        }
        let keep = self.history.len() - (TAPS - 1);
        self.history.drain(..keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: f32, freq: f32, n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| (8000.0 * (2.0 * std::f32::consts::PI * freq * i as f32 / rate).sin()) as i16)
            .collect()
    }

    fn rms(s: &[i16]) -> f32 {
        (s.iter().map(|&x| f32::from(x).powi(2)).sum::<f32>() / s.len() as f32).sqrt()
    }

    #[test]
    fn a_tone_keeps_its_level_up_and_down() {
        let tone = sine(8000.0, 440.0, 8000);
        let mut up = Upsampler::default();
        let mut wide = Vec::new();
        up.process(&tone, &mut wide);
        assert_eq!(wide.len(), 16000);
        let mut down = Downsampler::default();
        let mut back = Vec::new();
        down.process(&wide, &mut back);
        assert_eq!(back.len(), 8000);
        // Past the filters' delay the level is kept within 5 %.
        let (a, b) = (rms(&tone[100..]), rms(&back[100..]));
        assert!((b / a - 1.0).abs() < 0.05, "{a} vs {b}");
        assert!((rms(&wide[200..]) / a - 1.0).abs() < 0.05);
    }

    #[test]
    fn what_the_lower_rate_cannot_carry_is_filtered_out() {
        // 6 kHz at 16 kHz is above 8 kHz's Nyquist frequency: it must not alias into the band.
        let high = sine(16000.0, 6000.0, 16000);
        let mut out = Vec::new();
        Downsampler::default().process(&high, &mut out);
        assert!(rms(&out[100..]) < 0.02 * rms(&high), "{}", rms(&out[100..]));
    }

    #[test]
    fn chunks_of_any_size_convert_as_the_whole() {
        let tone = sine(16000.0, 1000.0, 3200);
        let mut whole = Vec::new();
        Downsampler::default().process(&tone, &mut whole);
        let mut d = Downsampler::default();
        let mut pieces = Vec::new();
        let mut out = Vec::new();
        for chunk in tone.chunks(37) {
            d.process(chunk, &mut out);
            pieces.extend_from_slice(&out);
        }
        assert_eq!(pieces, whole);
        let mut u = Upsampler::default();
        let (mut whole_up, mut pieces_up) = (Vec::new(), Vec::new());
        Upsampler::default().process(&whole, &mut whole_up);
        for chunk in whole.chunks(13) {
            u.process(chunk, &mut out);
            pieces_up.extend_from_slice(&out);
        }
        assert_eq!(pieces_up, whole_up);
    }
}
