//! Calls to a number's registered devices (DESIGN §3, §8): a number with no voice callback but
//! with registered softphones rings every one of them at once; the first to answer is bridged
//! to the caller and the others get CANCEL. The caller hears `180 Ringing` meanwhile.

use sautikit_sip::transaction::Peer;
use serde_json::json;
use tracing::{info, warn};

use super::call::{CallMsg, CallState, Phase, Waiting};
use super::leg::{LegOutcome, LegState, LegTarget};
use crate::call_store::CallStatus;
use crate::media::MediaEvent;

impl CallState {
    /// Ring every device of the number this engine can reach. False when it has none (the
    /// caller is answered as for a number with no route).
    pub(super) async fn ring_devices(&mut self) -> bool {
        let route = self.route_ref().clone();
        let bindings = match self
            .deps
            .devices
            .reachable_bindings(&route.number_id, &self.deps.engine_id, self.now())
            .await
        {
            Ok(b) => b,
            Err(e) => {
                warn!(call_id = %self.call_id, error = %e, "could not read the number's devices");
                Vec::new()
            }
        };
        if bindings.is_empty() {
            return false;
        }
        self.waiting = Waiting::Bridge;
        if let Err(reason) = self.open_caller_port().await {
            self.fail(reason).await;
            return true;
        }
        let host = self.invite.local.ip().to_string();
        let caller = if self.from.is_empty() {
            "anonymous".to_owned()
        } else {
            self.from.clone()
        };
        let from_uri =
            match sautikit_sip::rsip::Uri::try_from(format!("sip:{caller}@{host}").as_str()) {
                Ok(_) => format!("sip:{caller}@{host}"),
                Err(_) => format!("sip:anonymous@{host}"),
            };
        for b in bindings {
            let target = self.device_leg_target(&b, &host, &from_uri, &caller);
            if let Err(reason) = self.start_leg(target).await {
                self.note(
                    "device.unreachable",
                    json!({"registration_id": b.id, "reason": reason}),
                );
            }
        }
        if self.legs.is_empty() {
            self.respond_final(480, Some("Temporarily Unavailable"));
            self.finish(CallStatus::Failed, None, Some("devices.unreachable"))
                .await;
            return true;
        }
        info!(call_id = %self.call_id, number_id = %route.number_id, workspace_id = %route.workspace_id, devices = self.legs.len(), "ringing devices");
        self.respond_provisional(180, "Ringing");
        self.ring_seq += 1;
        let seq = self.ring_seq;
        let me = self.myself.clone();
        let ring = self.deps.ring_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(ring).await;
            let _ = me.cast(CallMsg::RingTimedOut { seq });
        });
        true
    }

    /// Leg `n` is a `dial`'s (it has a call record of its own), or a dial is in progress.
    fn dialled(&self, n: u32) -> bool {
        self.dial.is_some()
            || self
                .legs
                .get(n as usize)
                .is_some_and(|l| l.record.is_some())
    }

    /// A leg to registered device `b`, presenting `caller` (`from` as its URI).
    pub(super) fn device_leg_target(
        &self,
        b: &crate::registrar::Registration,
        host: &str,
        from: &str,
        caller: &str,
    ) -> LegTarget {
        LegTarget {
            label: format!("device {}", b.contact),
            uri: b.contact.clone(),
            to: format!("sip:{}@{host}", self.to),
            from: from.to_owned(),
            from_display: Some(caller.to_owned()),
            peer: Peer {
                addr: b.source,
                transport: b.transport,
            },
            extra: Vec::new(),
            record: None,
        }
    }

    /// A leg's INVITE got a response.
    pub(super) async fn on_leg_answer(&mut self, n: u32, response: &sautikit_sip::rsip::Response) {
        if self.phase == Phase::Ended {
            return;
        }
        if self.is_callee(n) {
            self.callee_response(n, response).await;
            return;
        }
        if self.dialled(n) {
            super::verbs::dial_leg_response(self, n, response).await;
            return;
        }
        let outcome = self.on_leg_response(n, response);
        self.report_legs();
        match outcome {
            LegOutcome::Nothing => {}
            LegOutcome::Ringing { .. } => {
                if self.trunk_call {
                    self.respond_provisional(180, "Ringing");
                }
            }
            LegOutcome::Answered(stream) => {
                if self.bridged.is_some() || self.phase != Phase::Ringing {
                    self.bye_leg(n);
                    return;
                }
                // The first answer wins; the rest stop ringing.
                for other in 0..self.legs.len() as u32 {
                    if other != n {
                        self.end_unanswered_leg(other);
                    }
                }
                let Some(leg_port) = self.leg_port(n) else {
                    self.bye_leg(n);
                    return;
                };
                self.deps.media.start_stream(leg_port, stream);
                if let Err(reason) = self.answer().await {
                    self.bye_leg(n);
                    self.fail(reason).await;
                    return;
                }
                if let Some(caller_port) = self.rtp.as_ref().map(|p| p.id) {
                    self.deps
                        .media
                        .bridge(caller_port, leg_port, self.deps.media_timeout);
                }
                self.bridged = Some(n);
                let label = self.legs.get(n as usize).map(|l| l.label.clone());
                self.note("call.bridged", json!({"leg": label}));
                if self.trunk_call {
                    self.start_paid_time(None);
                }
            }
            LegOutcome::Refused => {
                if self.trunk_call {
                    let code = self
                        .legs
                        .get(n as usize)
                        .and_then(|l| l.final_code)
                        .unwrap_or(500);
                    if self.phase == Phase::Ringing {
                        self.trunk_refused(code).await;
                    }
                } else {
                    self.after_leg_refusal().await;
                }
            }
        }
    }

    /// A leg's INVITE got no final response in time.
    pub(super) async fn on_leg_timeout(&mut self, n: u32) {
        if let Some(leg) = self.legs.get_mut(n as usize)
            && matches!(leg.state, LegState::Calling | LegState::Early)
        {
            leg.state = LegState::Ended;
            leg.final_code = Some(408);
            let label = leg.label.clone();
            self.close_leg_media(n);
            self.report_legs();
            self.note(
                "sip.timeout",
                json!({"leg": label, "message": "no final response to our INVITE"}),
            );
            if self.is_callee(n) {
                self.callee_gone().await;
            } else if self.dialled(n) {
                super::verbs::dial_leg_timed_out(self, n).await;
            } else if self.trunk_call {
                if self.phase == Phase::Ringing {
                    self.trunk_refused(408).await;
                }
            } else {
                self.after_leg_refusal().await;
            }
        }
    }

    fn end_unanswered_leg(&mut self, n: u32) {
        let state = self.legs.get(n as usize).map(|l| l.state);
        match state {
            Some(LegState::Calling) | Some(LegState::Early) => self.cancel_leg(n),
            Some(LegState::Answered) => self.bye_leg(n),
            _ => {}
        }
    }

    /// Every leg has refused: busy if one of them was, else no answer.
    async fn after_leg_refusal(&mut self) {
        if self.bridged.is_some() || self.phase != Phase::Ringing {
            return;
        }
        if self.legs.iter().any(|l| l.state != LegState::Ended) {
            return;
        }
        let busy = self
            .legs
            .iter()
            .any(|l| matches!(l.final_code, Some(486) | Some(600)));
        if busy {
            self.respond_final(486, Some("Busy Here"));
            self.finish(CallStatus::Busy, Some("busy"), None).await;
        } else {
            self.respond_final(480, Some("Temporarily Unavailable"));
            self.finish(CallStatus::NoAnswer, Some("no_answer"), None)
                .await;
        }
    }

    /// Nobody answered within the ring time.
    pub(super) async fn on_ring_timeout(&mut self, seq: u64) {
        if seq != self.ring_seq || self.bridged.is_some() || self.phase != Phase::Ringing {
            return;
        }
        let after = self.deps.ring_timeout.as_secs();
        self.note("devices.no_answer", json!({"after_seconds": after}));
        self.end_legs("no_answer");
        self.respond_final(480, Some("Temporarily Unavailable"));
        self.finish(CallStatus::NoAnswer, Some("no_answer"), None)
            .await;
    }

    /// A leg hung up (BYE). The bridged leg's hang-up ends the call.
    pub(super) async fn leg_hung_up(&mut self, n: u32) {
        if self.is_callee(n) {
            self.callee_hung_up(n).await;
        } else if self.dialled(n) {
            super::verbs::dial_leg_hung_up(self, n).await;
        } else if self.bridged == Some(n) {
            self.bridged = None;
            self.hang_up(CallStatus::Completed, "callee_hangup", None)
                .await;
        }
    }

    /// What a leg's media reported.
    pub(super) async fn on_leg_media(&mut self, n: u32, event: MediaEvent) {
        if self.dialled(n) {
            super::verbs::dial_leg_media(self, n, event).await;
            return;
        }
        if let MediaEvent::MediaTimeout { .. } = event
            && self.bridged == Some(n)
        {
            let label = self.legs.get(n as usize).map(|l| l.label.clone());
            self.note("media.timeout", json!({"leg": label}));
            self.bye_leg(n);
            self.bridged = None;
            self.hang_up(CallStatus::Completed, "media_timeout", None)
                .await;
        }
    }
}
