//! `play`: a WAV or MP3 file from a URL (relative to the script's own URL), played `loop` times.

use serde_json::json;

use super::prompt::{self, Prompt};
use super::{Step, ensure_answered};
use crate::calls::call::CallState;
use crate::voice::{Play, resolve_url};

pub(super) async fn run(call: &mut CallState, play: &Play) -> Step {
    if let Some(step) = ensure_answered(call).await {
        return step;
    }
    match resolve_url(&call.document_url, &play.url) {
        Ok(url) => {
            prompt::start(call, Prompt::File(url), play.loop_count);
            Step::Wait
        }
        Err(e) => {
            call.note(
                "action.failed",
                json!({"verb": "play", "error": e.to_string()}),
            );
            call.fail("play.bad_url").await;
            Step::Ended
        }
    }
}
