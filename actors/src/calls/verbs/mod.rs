//! Executing VoiceAction verbs on a live call, one verb per file. Parsing and validation are in
//! `crate::voice`; here each verb acts on the call's SIP dialog and media.

mod dial;
mod get_digits;
mod hangup;
mod pause;
mod play;
mod prompt;
mod record;
mod redirect;
mod reject;
mod say;
mod stream;

pub(super) use dial::ActiveDial;
pub(super) use dial::{
    leg_hung_up as dial_leg_hung_up, leg_media as dial_leg_media,
    leg_response as dial_leg_response, leg_timed_out as dial_leg_timed_out,
    ring_timed_out as dial_ring_timed_out, time_limit_reached as dial_time_limit_reached,
};
pub(super) use get_digits::Gather;
pub(super) use record::ActiveRecording;
pub(super) use stream::ActiveStream;
pub(super) use stream::{call_ended as streams_call_ended, event as stream_event};

use serde_json::json;

use super::call::{CallState, StepResume, Waiting};
use crate::callback::CallbackMethod;
use crate::media::RecordingOutcome;
use crate::synth::Audio;
use crate::voice::{Action, resolve_url};

/// What the script does after an action.
pub(super) enum Step {
    /// Go on with the next action.
    Next,
    /// The action waits for a message (ACK, timer, callback); `run` resumes the script then.
    Wait,
    /// The call is over.
    Ended,
}

pub(super) async fn execute(call: &mut CallState, action: &Action) -> Step {
    call.action_started(action.verb());
    match action {
        Action::Pause(p) => pause::run(call, p).await,
        Action::Hangup => hangup::run(call).await,
        Action::Reject(r) => reject::run(call, r).await,
        Action::Redirect(r) => redirect::run(call, r).await,
        Action::Say(s) => say::run(call, s).await,
        Action::Play(p) => play::run(call, p).await,
        Action::GetDigits(g) => get_digits::run(call, g).await,
        Action::Record(r) => record::run(call, r).await,
        Action::Dial(d) => dial::run(call, d).await,
        Action::Stream(st) => stream::run(call, st).await,
        Action::StopStream => stream::stop(call),
    }
}

/// A prompt's audio is ready: play it; or end the call with why it is not.
pub(super) async fn prompt_ready(
    call: &mut CallState,
    _seq: u64,
    result: Result<Audio, (&'static str, String)>,
) {
    match result {
        Ok(audio) => {
            let loops = call.prompt_loops;
            prompt::play(call, audio, loops);
        }
        Err((reason, message)) => {
            call.note(
                "action.failed",
                json!({"reason": reason, "message": message}),
            );
            call.fail(reason).await;
        }
    }
}

/// What was playing has finished: the owner (a nested prompt, the record beep, a `say` or
/// `play` action) goes on.
pub(super) async fn playback_finished(call: &mut CallState, interrupted: bool) {
    if call.gather.is_some() {
        get_digits::prompt_finished(call).await;
    } else if call.recording.is_some() {
        record::start(call);
    } else if !interrupted {
        call.action_finished("completed");
        call.index += 1;
        call.run().await;
    }
}

pub(super) async fn get_digits_timed_out(call: &mut CallState) {
    get_digits::timed_out(call).await;
}

/// A key: input for `getDigits`, or a finish key for `record` (from SIP INFO).
pub(super) async fn digit(call: &mut CallState, key: char, _source: &str) {
    stream::digit(call, key);
    if call.gather.is_some() {
        get_digits::digit(call, key).await;
    } else if record::is_recording(call) {
        record::digit(call, key);
    }
}

pub(super) async fn recording_finished(call: &mut CallState, outcome: RecordingOutcome) {
    record::finished(call, outcome).await;
}

/// The call ends while a recording runs: keep what was recorded.
pub(super) async fn recording_interrupted(call: &mut CallState) {
    record::interrupted(call).await;
}

/// The call ends while it dials: the result still goes out.
pub(super) fn dial_interrupted(call: &mut CallState) {
    dial::interrupted(call);
}

/// A dialled leg's time is up (`timeLimit`, its paid time): it ends, the script goes on.
pub(super) async fn dial_leg_cut(call: &mut CallState, n: u32, cause: &str) {
    dial::leg_cut(call, n, cause).await;
}

/// Post a step's result (`Digits`, `Recording…`) to `action` (relative to the script's URL) or
/// the voice callback; a non-empty reply replaces the rest of the script, an empty one goes on.
pub(super) async fn post_step(
    call: &mut CallState,
    action: Option<&str>,
    fields: Vec<(String, String)>,
) {
    let url = match action {
        Some(a) => resolve_url(&call.document_url, a).map_err(|e| e.to_string()),
        None => call
            .route
            .as_ref()
            .and_then(|r| r.voice_callback_url.clone())
            .ok_or_else(|| "the number has no voice callback".to_owned()),
    };
    let url = match url {
        Ok(u) => u,
        Err(e) => {
            call.note("action.failed", json!({"error": e}));
            call.fail("callback.invalid_actions").await;
            return;
        }
    };
    call.step_resume = Some(StepResume {
        actions: call.actions.clone(),
        index: call.index,
        document_url: call.document_url.clone(),
    });
    call.fetch(url, CallbackMethod::Post, fields);
}

/// Actions that need media answer first; the script resumes with the same action on ACK.
/// `None`: answered, go ahead.
async fn ensure_answered(call: &mut CallState) -> Option<Step> {
    use super::call::Phase;
    match call.phase {
        Phase::Answered => None,
        Phase::AwaitingAck => {
            call.waiting = Waiting::Ack;
            Some(Step::Wait)
        }
        Phase::Ringing => match call.answer().await {
            Ok(()) => {
                call.waiting = Waiting::Ack;
                Some(Step::Wait)
            }
            Err(reason) => {
                call.fail(reason).await;
                Some(Step::Ended)
            }
        },
        Phase::Ended => Some(Step::Ended),
    }
}
