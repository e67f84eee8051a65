//! `say`: speech from the synthesizer (espeak-ng, cached), played `loop` times.

use super::prompt::{self, Prompt};
use super::{Step, ensure_answered};
use crate::calls::call::CallState;
use crate::synth::SpeechRequest;
use crate::voice::Say;

pub(super) async fn run(call: &mut CallState, say: &Say) -> Step {
    if let Some(step) = ensure_answered(call).await {
        return step;
    }
    prompt::start(call, Prompt::Speech(speech(say)), say.loop_count);
    Step::Wait
}

pub(super) fn speech(say: &Say) -> SpeechRequest {
    SpeechRequest {
        text: say.text.clone(),
        voice: say.voice.clone(),
        language: say.language.clone(),
    }
}
