//! Sample-rate conversion to the media path's 8 kHz, shared by `say` (espeak-ng's 22.05 kHz) and
//! `play` (whatever rate the customer's file has).

use crate::synth::SAMPLE_RATE;
use rubato::audioadapter_buffers::number_to_float::InterleavedNumbers;
use rubato::{Fft, FixedSync, Resampler};

/// Input rates accepted: telephone audio up to studio rates. Outside this a "rate" is almost
/// certainly a corrupt header, and rubato's FFT sizes grow with the rate.
pub const MIN_RATE: u32 = 1_000;
pub const MAX_RATE: u32 = 384_000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ResampleError {
    #[error("unsupported sample rate {0} Hz (expected {MIN_RATE}..={MAX_RATE})")]
    Rate(u32),
    #[error("resampler: {0}")]
    Resampler(String),
}

/// Band-limited conversion of mono 16-bit PCM at `rate_in` to 8 kHz with rubato's synchronous FFT
/// resampler, whose anti-aliasing filter removes everything above the new Nyquist frequency before
/// decimating. The output is trimmed of the resampler's delay, so it lines up with the input.
pub fn to_8k_mono(samples: &[i16], rate_in: u32) -> Result<Vec<i16>, ResampleError> {
    if rate_in == SAMPLE_RATE {
        return Ok(samples.to_vec());
    }
    if !(MIN_RATE..=MAX_RATE).contains(&rate_in) {
        return Err(ResampleError::Rate(rate_in));
    }
    let rubato = |e: &dyn std::fmt::Display| ResampleError::Resampler(e.to_string());
    let mut resampler = Fft::<f32>::new(
        rate_in as usize,
        SAMPLE_RATE as usize,
        1024,
        1,
        FixedSync::Both,
    )
    .map_err(|e| rubato(&e))?;
    // Reads the i16 samples as f32 (scaled by 1/32768) on the fly: no float copy of a long input.
    let adapter = InterleavedNumbers::<&[i16], f32>::new(samples, 1, samples.len())
        .map_err(|e| rubato(&e))?;
    let output = resampler
        .process_all(&adapter, samples.len(), None)
        .map_err(|e| rubato(&e))?;
    Ok(output
        .take_data()
        .into_iter()
        // Filtering can overshoot full scale slightly: clip rather than wrap.
        .map(|x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let one_second: Vec<i16> = (0..44_100)
            .map(|i| ((i as f64 * 440.0 * std::f64::consts::TAU / 44_100.0).sin() * 8000.0) as i16)
            .collect();
        let out = to_8k_mono(&one_second, 44_100).expect("resample");
        assert!((7990..=8010).contains(&out.len()), "{}", out.len());
        assert_eq!(
            to_8k_mono(&[1, 2, 3], 8000).expect("same rate"),
            vec![1, 2, 3]
        );
        assert!(matches!(
            to_8k_mono(&[0; 10], 0),
            Err(ResampleError::Rate(0))
        ));
        assert!(matches!(
            to_8k_mono(&[0; 10], 1_000_000),
            Err(ResampleError::Rate(_))
        ));
    }
}
