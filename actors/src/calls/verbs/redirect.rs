//! `redirect`: fetch a new script from `url` (relative to the current document) and run it
//! instead of the rest of this one.

use serde_json::json;

use super::Step;
use crate::calls::call::CallState;
use crate::voice::{Redirect, resolve_url};

pub(super) async fn run(call: &mut CallState, redirect: &Redirect) -> Step {
    let url = match resolve_url(&call.document_url, &redirect.url) {
        Ok(u) => u,
        Err(e) => {
            call.note(
                "action.failed",
                json!({"verb": "redirect", "error": e.to_string()}),
            );
            call.fail("callback.invalid_actions").await;
            return Step::Ended;
        }
    };
    call.fetch(url, redirect.method, Vec::new());
    Step::Wait
}
