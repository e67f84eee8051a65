//! `pause`: answer if needed, then silence (the media engine sends it) for `length` seconds.

use std::time::Duration;

use super::{Step, ensure_answered};
use crate::calls::call::{CallMsg, CallState, Waiting};
use crate::voice::Pause;

pub(super) async fn run(call: &mut CallState, pause: &Pause) -> Step {
    if let Some(step) = ensure_answered(call).await {
        return step;
    }
    if pause.length_seconds == 0 {
        return Step::Next;
    }
    call.timer_seq += 1;
    let seq = call.timer_seq;
    call.waiting = Waiting::Pause { seq };
    call.myself.send_after(
        Duration::from_secs(u64::from(pause.length_seconds)),
        move || CallMsg::PauseElapsed { seq },
    );
    Step::Wait
}
