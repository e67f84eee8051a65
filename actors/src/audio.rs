//! Prompts from URLs, as the `play` verb sees them (DESIGN §7). The service implements
//! [`AudioFetcher`] (HTTP fetch with size and time limits, WAV/MP3 decoding, resampling to
//! 8 kHz, a cache keyed by URL with HTTP validators); actor tests may fake it.

use async_trait::async_trait;

use crate::synth::Audio;

/// Why a `play` URL gave no audio. `reason()` is the call's `failure_reason`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlayError {
    #[error("the audio URL answered HTTP {status_code}")]
    HttpStatus { status_code: u16 },
    #[error("the audio is larger than {limit_bytes} bytes")]
    TooLarge { limit_bytes: u64 },
    #[error("the URL did not return WAV or MP3 audio: {message}")]
    NotAudio { message: String },
    #[error("the audio did not arrive within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("the audio URL could not be reached: {message}")]
    Unreachable { message: String },
    #[error("the audio address is forbidden: {message}")]
    Forbidden { message: String },
}

impl PlayError {
    pub fn reason(&self) -> &'static str {
        match self {
            PlayError::HttpStatus { .. } => "play.http_status",
            PlayError::TooLarge { .. } => "play.too_large",
            PlayError::NotAudio { .. } => "play.not_audio",
            PlayError::Timeout { .. } => "play.timeout",
            PlayError::Unreachable { .. } => "play.unreachable",
            PlayError::Forbidden { .. } => "play.forbidden",
        }
    }
}

#[async_trait]
pub trait AudioFetcher: Send + Sync + 'static {
    /// The audio at `url` (absolute http(s)), decoded to 8 kHz mono PCM.
    async fn fetch(&self, url: &str) -> Result<Audio, PlayError>;
}
