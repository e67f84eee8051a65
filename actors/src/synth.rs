//! Text to speech, as the `say` verb sees it (DESIGN §8).
//!
//! The Call actor asks a [`Synthesizer`] for a prompt and gets back telephone-band PCM that the
//! media session encodes to G.711 frame by frame. The real implementation (espeak-ng behind a disk
//! cache) lives in the service crate; this crate only declares the contract, so actor tests can use
//! an in-memory fake.

use std::sync::Arc;
use std::time::Duration;

/// Sample rate of [`Audio`]: G.711's 8 kHz, so no resampling happens on the media path.
pub const SAMPLE_RATE: u32 = 8000;

/// The longest `say` text accepted, in characters (Twilio's `<Say>` limit). Validators can reject
/// longer text up front; synthesizers refuse it too, since it bounds synthesis time and memory.
pub const MAX_TEXT_CHARS: usize = 4096;

/// 8 kHz, 16-bit signed, mono PCM.
///
/// The samples sit behind an `Arc` so that many calls playing the same cached prompt share one
/// buffer: cloning is a reference-count bump.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Arc<[i16]>,
}

impl Audio {
    /// Wraps samples that are already at [`SAMPLE_RATE`].
    pub fn new(samples: impl Into<Arc<[i16]>>) -> Self {
        Self {
            samples: samples.into(),
        }
    }

    /// Playing time at [`SAMPLE_RATE`].
    pub fn duration(&self) -> Duration {
        // 1 / 8000 s is exactly 125 µs, so this is exact with no float rounding.
        Duration::from_micros(self.samples.len() as u64 * (1_000_000 / SAMPLE_RATE as u64))
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of samples (8000 per second).
    pub fn len(&self) -> usize {
        self.samples.len()
    }
}

impl From<Vec<i16>> for Audio {
    fn from(samples: Vec<i16>) -> Self {
        Self::new(samples)
    }
}

/// What to say and how: the `say` verb's `text`, `voice` and `language` attributes, as given.
///
/// Interpreting `voice` and `language` is the synthesizer's business (each engine has its own
/// voices); it answers [`SynthError::UnknownVoice`] / [`SynthError::UnknownLanguage`] for values
/// it cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpeechRequest {
    pub text: String,
    pub voice: Option<String>,
    /// BCP-47, e.g. `en-US`, `sw-KE`.
    pub language: Option<String>,
}

impl SpeechRequest {
    /// A request with the engine's default voice and language.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            voice: None,
            language: None,
        }
    }

    pub fn with_voice(mut self, voice: impl Into<String>) -> Self {
        self.voice = Some(voice.into());
        self
    }

    pub fn with_language(mut self, language: impl Into<String>) -> Self {
        self.language = Some(language.into());
        self
    }
}

/// Why a prompt could not be produced. `Clone` so that one failed synthesis can be reported to
/// every call that was waiting on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SynthError {
    #[error("say text is empty")]
    EmptyText,
    #[error("unknown voice {0:?}")]
    UnknownVoice(String),
    #[error("unknown language {0:?}")]
    UnknownLanguage(String),
    #[error("speech synthesis failed: {0}")]
    Failed(String),
}

/// Turns text into telephone-band audio. Implementations cache: the same request is expected to be
/// cheap the second time, since IVR prompts repeat on every call.
#[async_trait::async_trait]
pub trait Synthesizer: Send + Sync + 'static {
    async fn synthesize(&self, request: &SpeechRequest) -> Result<Audio, SynthError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_is_exact_at_8k() {
        let audio = Audio::from(vec![0i16; 12_000]);
        assert_eq!(audio.duration(), Duration::from_millis(1500));
        assert!(!audio.is_empty());
        assert!(Audio::from(Vec::new()).is_empty());
    }

    #[test]
    fn clones_share_samples() {
        let a = Audio::from(vec![1i16, 2, 3]);
        let b = a.clone();
        assert!(Arc::ptr_eq(&a.samples, &b.samples));
        assert_eq!(a, b);
    }
}
