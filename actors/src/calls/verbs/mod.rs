//! Executing VoiceAction verbs on a live call, one verb per file. Parsing and validation are in
//! `crate::voice`; here each verb acts on the call's SIP dialog and media.

mod hangup;
mod pause;
mod redirect;
mod reject;
mod unsupported;

use super::call::CallState;
use crate::voice::Action;

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
        Action::Say(_)
        | Action::Play(_)
        | Action::GetDigits(_)
        | Action::Record(_)
        | Action::Dial(_) => unsupported::run(call, action.verb()).await,
    }
}

/// Actions that need media answer first; the script resumes with the same action on ACK.
/// `None`: answered, go ahead.
async fn ensure_answered(call: &mut CallState) -> Option<Step> {
    use super::call::{Phase, Waiting};
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
