//! `dial`, until outbound calls exist: the call fails with `action.not_supported`, and the
//! timeline names the verb.

use serde_json::json;

use super::Step;
use crate::calls::call::CallState;

pub(super) async fn run(call: &mut CallState, verb: &str) -> Step {
    call.note(
        "action.failed",
        json!({"verb": verb, "reason": "action.not_supported", "message": format!("{verb} is not supported yet")}),
    );
    call.fail("action.not_supported").await;
    Step::Ended
}
