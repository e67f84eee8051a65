//! `reject`: refuse the call before answer — `486 Busy Here` (status `busy`) or `603 Decline`
//! (status `failed`, `call.rejected`). After answer there is nothing to reject: it hangs up.

use serde_json::json;

use super::Step;
use crate::call_store::CallStatus;
use crate::calls::call::{CallState, Phase};
use crate::voice::{Reject, RejectReason};

pub(super) async fn run(call: &mut CallState, reject: &Reject) -> Step {
    if call.phase != Phase::Ringing {
        call.note(
            "action.ignored",
            json!({"verb": "reject", "message": "the call is already answered; hanging up"}),
        );
        call.hang_up(CallStatus::Completed, "engine_hangup", None)
            .await;
        return Step::Ended;
    }
    match reject.reason {
        RejectReason::Busy => {
            call.respond_final(486, Some("Busy Here"));
            call.finish(CallStatus::Busy, Some("rejected"), Some("call.busy"))
                .await;
        }
        RejectReason::Rejected => {
            call.respond_final(603, Some("Decline"));
            call.finish(CallStatus::Failed, Some("rejected"), Some("call.rejected"))
                .await;
        }
    }
    Step::Ended
}
