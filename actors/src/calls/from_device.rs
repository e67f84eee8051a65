//! Calls from registered devices (DESIGN §8): a device that authenticated as a credential of one
//! number calls out with that number's identity. A call to one of our own numbers is taken as an
//! inbound call to it (see `Call::begin`); anything else goes out through the trunk, paid from the
//! wallet through the prepaid module (`prepaid.rs`).

use serde_json::json;
use tracing::info;

use super::call::{CallState, Waiting};
use super::leg::LegTarget;
use super::prepaid::PrepaidRefusal;
use super::trunk;
use crate::call_store::CallStatus;
use crate::model::NumberStatus;

impl CallState {
    /// Out through the trunk, from the device's number to `self.to`.
    pub(super) async fn call_out(&mut self) {
        let Some(login) = self.invite.device.clone() else {
            return;
        };
        let Ok(route) = self.lookup_route(login.number.clone()).await else {
            return;
        };
        let route = match route {
            Some(r) if r.status == NumberStatus::Active => r,
            _ => {
                self.respond_final(403, Some("Forbidden"));
                self.stop_unrecorded();
                return;
            }
        };
        self.direction = "outbound";
        self.route = Some(route.clone());
        if !self.record_started().await {
            return;
        }
        info!(call_id = %self.call_id, number_id = %route.number_id, workspace_id = %route.workspace_id, to = %self.to, "device call out");
        let Some(trunk) = self.deps.trunk.clone() else {
            self.respond_final(503, Some("Service Unavailable"));
            self.finish(CallStatus::Failed, None, Some("trunk.not_configured"))
                .await;
            return;
        };
        match self.check_offer() {
            Ok(offer) => self.offer = Some(offer),
            Err(reason) => {
                self.note("sdp.rejected", json!({"message": reason}));
                self.respond_final(488, Some("Not Acceptable Here"));
                self.finish(CallStatus::Failed, None, Some("sdp.no_common_codec"))
                    .await;
                return;
            }
        }
        let call_id = self.call_id.clone();
        match self
            .reserve_first_slice(&call_id, &route.workspace_id, route.outbound_per_min_minor)
            .await
        {
            Ok(paid) => self.prepaid = paid,
            Err(PrepaidRefusal::InsufficientFunds) => {
                self.respond_final(402, Some("Payment Required"));
                self.finish(CallStatus::Failed, None, Some("wallet.insufficient_funds"))
                    .await;
                return;
            }
            Err(PrepaidRefusal::Storage) => {
                self.fail("engine.error").await;
                return;
            }
        }
        self.trunk_call = true;
        self.waiting = Waiting::Bridge;
        if let Err(reason) = self.open_caller_port().await {
            self.fail(reason).await;
            return;
        }
        let host = self.invite.local.ip().to_string();
        let caller = format!("sip:{}@{host}", login.number);
        let target = LegTarget {
            label: "trunk".into(),
            uri: trunk.uri(&self.to),
            to: trunk.uri(&self.to),
            from: caller.clone(),
            from_display: Some(login.number.clone()),
            peer: trunk.peer,
            extra: vec![("P-Asserted-Identity", format!("<{caller}>"))],
            record: None,
        };
        if let Err(reason) = self.start_leg(target).await {
            self.fail(reason).await;
        }
    }

    /// The trunk refused: the device gets the carrier's code, the call its status.
    pub(super) async fn trunk_refused(&mut self, code: u16) {
        let (status, failure) = trunk::refusal(code);
        // A challenge we could not answer is ours to explain, not the device's to retry.
        let passed = if matches!(code, 401 | 407) { 503 } else { code };
        self.respond_final(passed, None);
        let cause = match status {
            CallStatus::Busy => Some("busy"),
            CallStatus::NoAnswer => Some("no_answer"),
            _ => None,
        };
        self.finish(status, cause, failure.as_deref()).await;
    }
}
