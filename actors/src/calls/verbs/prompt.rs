//! What `say`, `play` and `getDigits`' nested prompts share: make the audio off the actor (speech
//! synthesis, a download), then play it on the call's RTP stream and wait for it to end.

use serde_json::json;

use crate::calls::call::{CallMsg, CallState, Waiting};
use crate::synth::{Audio, SpeechRequest};

/// Where a prompt's audio comes from.
pub(in crate::calls) enum Prompt {
    Speech(SpeechRequest),
    /// An absolute URL.
    File(String),
}

/// Start making the prompt's audio; `PromptReady` comes back, then it plays `loops` times.
pub(in crate::calls) fn start(call: &mut CallState, prompt: Prompt, loops: u32) {
    call.timer_seq += 1;
    let seq = call.timer_seq;
    call.waiting = Waiting::Prompt { seq };
    call.prompt_loops = loops.max(1);
    let me = call.myself.clone();
    match prompt {
        Prompt::Speech(request) => {
            let synth = call.deps.synth.clone();
            tokio::spawn(async move {
                let result = synth
                    .synthesize(&request)
                    .await
                    .map_err(|e| ("tts.failed", e.to_string()));
                let _ = me.cast(CallMsg::PromptReady { seq, result });
            });
        }
        Prompt::File(url) => {
            let audio = call.deps.audio.clone();
            tokio::spawn(async move {
                let result = audio
                    .fetch(&url)
                    .await
                    .map_err(|e| (e.reason(), e.to_string()));
                let _ = me.cast(CallMsg::PromptReady { seq, result });
            });
        }
    }
}

/// Play audio that is ready; `PlaybackFinished` resumes the owner.
pub(in crate::calls) fn play(call: &mut CallState, audio: Audio, loops: u32) {
    call.timer_seq += 1;
    let play_id = call.timer_seq;
    let Some(stream) = call.rtp.as_ref().map(|p| p.id) else {
        return;
    };
    call.note(
        "media.playing",
        json!({"duration_ms": audio.duration().as_millis() as u64, "loops": loops}),
    );
    call.deps.media.play(stream, play_id, audio, loops);
    call.waiting = Waiting::Playback { play_id };
}
