//! The voice callback (DESIGN §6): the engine POSTs the call's state to the customer's
//! `voice_callback_url` (or a `redirect`/`action` URL) and gets the next VoiceAction script.
//! The service implements [`CallbackClient`] with reqwest; tests may fake it.

use std::time::Duration;

use async_trait::async_trait;

use crate::voice::{Script, ScriptError};

/// The reply must come within this (DESIGN §6).
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackMethod {
    Post,
    Get,
}

/// One callback request. `fields` are sent as `application/x-www-form-urlencoded` (POST body, or
/// the query string for GET), in order: `CallId`, `NumberId`, `From`, `To`, `Direction`,
/// `CallStatus`, then step results (`Digits`, `RecordingUrl`, …).
#[derive(Debug, Clone)]
pub struct CallbackRequest {
    pub url: String,
    pub method: CallbackMethod,
    pub fields: Vec<(String, String)>,
    /// The workspace's webhook secret; the request carries `X-Sautikit-Signature` computed with
    /// `webhook::signature_header` over the exact body bytes (for GET: over the empty body).
    pub secret: String,
    /// For logs.
    pub call_id: String,
}

/// A valid script and how the request went.
#[derive(Debug, Clone)]
pub struct CallbackReply {
    pub script: Script,
    pub status_code: u16,
    pub latency_ms: u64,
}

/// Why a callback gave no usable script. `reason()` is the call's `failure_reason`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallbackFailure {
    #[error("no reply within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("the callback answered HTTP {status_code}")]
    HttpStatus { status_code: u16, latency_ms: u64 },
    #[error("the callback's reply is not JSON: {message}")]
    InvalidJson {
        status_code: u16,
        latency_ms: u64,
        message: String,
    },
    #[error("the callback's reply is not a valid VoiceAction script: {error}")]
    InvalidActions {
        status_code: u16,
        latency_ms: u64,
        error: ScriptError,
    },
    #[error("the callback could not be reached: {message}")]
    Unreachable { latency_ms: u64, message: String },
    #[error("the callback address is forbidden: {message}")]
    Forbidden { message: String },
}

impl CallbackFailure {
    pub fn reason(&self) -> &'static str {
        match self {
            CallbackFailure::Timeout { .. } => "callback.timeout",
            CallbackFailure::HttpStatus { .. } => "callback.http_status",
            CallbackFailure::InvalidJson { .. } => "callback.invalid_json",
            CallbackFailure::InvalidActions { .. } => "callback.invalid_actions",
            CallbackFailure::Unreachable { .. } => "callback.unreachable",
            CallbackFailure::Forbidden { .. } => "callback.forbidden",
        }
    }
}

#[async_trait]
pub trait CallbackClient: Send + Sync + 'static {
    /// Send the request and parse the reply with `voice::parse_script`. Never longer than
    /// `CALLBACK_TIMEOUT` in all (connect, send, read).
    async fn fetch(&self, request: CallbackRequest) -> Result<CallbackReply, CallbackFailure>;
}
