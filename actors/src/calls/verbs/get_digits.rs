//! `getDigits`: play the nested prompts, collect keys (RFC 4733 or SIP INFO), and post them as
//! `Digits` to `action` (or the voice callback). The first key stops the prompts (barge-in);
//! `finishOnKey` ends input and is not part of it; `numDigits` ends it when reached; `timeout`
//! seconds without a key ends it after the prompts. No input: the script goes on.

use std::time::Duration;

use serde_json::json;

use super::prompt::{self, Prompt};
use super::{Step, ensure_answered, post_step};
use crate::calls::call::{CallMsg, CallState, Waiting};
use crate::voice::{Action, GetDigits, resolve_url};

/// A `getDigits` in progress.
pub(in crate::calls) struct Gather {
    spec: GetDigits,
    digits: String,
    /// The next nested prompt to play.
    next_prompt: usize,
    /// A nested prompt is loading or playing.
    prompting: bool,
}

pub(super) async fn run(call: &mut CallState, spec: &GetDigits) -> Step {
    if let Some(step) = ensure_answered(call).await {
        return step;
    }
    call.gather = Some(Gather {
        spec: spec.clone(),
        digits: String::new(),
        next_prompt: 0,
        prompting: false,
    });
    next_prompt(call).await
}

/// Play the next nested prompt, or wait for keys once they are all played.
async fn next_prompt(call: &mut CallState) -> Step {
    let Some(g) = call.gather.as_mut() else {
        return Step::Next;
    };
    let nested = g.spec.nested.get(g.next_prompt).cloned();
    g.next_prompt += 1;
    match nested {
        Some(Action::Say(say)) => {
            g.prompting = true;
            prompt::start(
                call,
                Prompt::Speech(super::say::speech(&say)),
                say.loop_count,
            );
            Step::Wait
        }
        Some(Action::Play(play)) => match resolve_url(&call.document_url, &play.url) {
            Ok(url) => {
                g.prompting = true;
                prompt::start(call, Prompt::File(url), play.loop_count);
                Step::Wait
            }
            Err(e) => {
                call.note(
                    "action.failed",
                    json!({"verb": "getDigits", "error": e.to_string()}),
                );
                call.fail("play.bad_url").await;
                Step::Ended
            }
        },
        // Validation allows only say and play; anything else is skipped.
        Some(_) => Box::pin(next_prompt(call)).await,
        None => {
            g.prompting = false;
            arm_timer(call);
            Step::Wait
        }
    }
}

/// Wait `timeout` for the next key.
fn arm_timer(call: &mut CallState) {
    let Some(g) = call.gather.as_ref() else {
        return;
    };
    let timeout = Duration::from_secs(u64::from(g.spec.timeout_seconds.max(1)));
    call.timer_seq += 1;
    let seq = call.timer_seq;
    call.waiting = Waiting::Digits { seq };
    call.myself
        .send_after(timeout, move || CallMsg::DigitsTimedOut { seq });
}

/// A nested prompt finished playing (or was cut short by a key, which already moved on).
pub(super) async fn prompt_finished(call: &mut CallState) {
    if call.gather.as_ref().is_some_and(|g| g.prompting) {
        if let super::Step::Wait = next_prompt(call).await {
            return;
        }
        call.run().await;
    }
}

/// A key arrived while collecting.
pub(super) async fn digit(call: &mut CallState, key: char) {
    let Some(g) = call.gather.as_mut() else {
        return;
    };
    if g.prompting {
        // Barge-in: the caller knows what to press; stop talking.
        g.prompting = false;
        g.next_prompt = g.spec.nested.len();
        if let Some(port) = call.rtp.as_ref() {
            call.deps.media.stop_playback(port.id);
        }
    }
    if g.spec.finish_on_key == Some(key) {
        return complete(call).await;
    }
    g.digits.push(key);
    let enough = g.spec.num_digits > 0 && g.digits.chars().count() >= g.spec.num_digits as usize;
    if enough {
        complete(call).await;
    } else {
        arm_timer(call);
    }
}

pub(super) async fn timed_out(call: &mut CallState) {
    complete(call).await;
}

/// Input is over: post it, or go on without it.
async fn complete(call: &mut CallState) {
    let Some(g) = call.gather.take() else {
        return;
    };
    call.waiting = Waiting::Nothing;
    if g.digits.is_empty() {
        call.note("digits.none", json!({}));
        call.action_finished("no_input");
        call.index += 1;
        call.run().await;
        return;
    }
    call.note("digits.collected", json!({"digits": g.digits}));
    post_step(
        call,
        g.spec.action.as_deref(),
        vec![("Digits".into(), g.digits)],
    )
    .await;
}
