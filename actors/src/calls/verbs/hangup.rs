//! `hangup`: end the call with a BYE. Before answer the call is answered first and then hung
//! up, as Twilio does, so the caller hears a normal clearing rather than an error.

use super::{Step, ensure_answered};
use crate::call_store::CallStatus;
use crate::calls::call::CallState;

pub(super) async fn run(call: &mut CallState) -> Step {
    if let Some(step) = ensure_answered(call).await {
        return step;
    }
    call.hang_up(CallStatus::Completed, "engine_hangup", None)
        .await;
    Step::Ended
}
