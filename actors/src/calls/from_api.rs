//! Calls placed through the API (`POST /v1/calls`, DESIGN §5): the call's first party is a leg
//! we call through the trunk — one number, or several rung at once (the first answer wins, the
//! others get CANCEL). The API wrote the call's row and reserved its first paid slice before the
//! call started. When the callee answers, its leg is the call's own party: its RTP goes to the
//! call's port, the call is `answered`, paid time runs, and the voice callback is asked for a
//! script with `Direction=outbound`, which runs exactly as for an inbound call.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tracing::info;

use super::call::{CallMsg, CallState, Phase};
use super::leg::{LegOutcome, LegPort, LegState, LegTarget};
use super::prepaid::Prepaid;
use super::trunk;
use crate::call_store::{CallStatus, NumberRoute};
use crate::callback::CallbackMethod;

/// What the API asks to be called, with the row it wrote.
#[derive(Debug, Clone)]
pub struct PlacedCall {
    pub call_id: String,
    /// The first leg's SIP Call-ID, as written in the call's row.
    pub sip_call_id: String,
    /// The `from` number's route; its `voice_callback_url` is the call's (the request's
    /// override, or the number's).
    pub route: NumberRoute,
    /// The number the callee sees.
    pub caller_id: String,
    /// E.164 numbers, rung at once.
    pub to: Vec<String>,
    pub ring_timeout: Duration,
    /// From the answer; `None`: no limit but the wallet's.
    pub time_limit: Option<Duration>,
    pub client_request_id: Option<String>,
    /// The first slice the API reserved with the row (0 for a free rate).
    pub reserved_minor: i64,
    /// Our SIP address (Via and Contact of what the call sends).
    pub local: SocketAddr,
}

/// Why the engine could not start placing a call (its row is then ended `failed` by the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlaceRefusal {
    #[error("no outbound trunk is configured")]
    NoTrunk,
    #[error("the engine is not taking calls")]
    Unavailable,
}

/// A placed call's callee legs.
pub(super) struct Placement {
    /// Leg number → the number it calls.
    legs: Vec<(u32, String)>,
    answered: Option<u32>,
    time_limit: Option<Duration>,
}

impl Placement {
    pub(super) fn rang_several(&self) -> bool {
        self.legs.len() > 1
    }
}

impl CallState {
    /// Ring the callee(s) through the trunk, offering the call's own port.
    pub(super) async fn place(&mut self, p: PlacedCall) {
        self.call_id = p.call_id.clone();
        self.direction = "outbound";
        self.from = p.caller_id.clone();
        self.to = p.to.first().cloned().unwrap_or_default();
        self.client_request_id = p.client_request_id.clone();
        self.recorded = true;
        if p.reserved_minor > 0 {
            self.prepaid = Some(Prepaid::reserved(
                &p.call_id,
                &p.route.workspace_id,
                p.route.outbound_per_min_minor,
                p.reserved_minor,
            ));
        }
        self.placed = Some(Placement {
            legs: Vec::new(),
            answered: None,
            time_limit: p.time_limit,
        });
        self.route = Some(p.route.clone());
        self.snapshot();
        info!(call_id = %self.call_id, number_id = %p.route.number_id, workspace_id = %p.route.workspace_id, to = ?p.to, "placing a call from the API");
        let Some(trunk) = self.deps.trunk.clone() else {
            self.finish(CallStatus::Failed, None, Some("trunk.not_configured"))
                .await;
            return;
        };
        if let Err(reason) = self.open_caller_port().await {
            self.finish(CallStatus::Failed, None, Some(reason)).await;
            return;
        }
        let host = p.local.ip().to_string();
        let caller = format!("sip:{}@{host}", p.caller_id);
        for (i, to) in p.to.iter().enumerate() {
            let target = LegTarget {
                label: to.clone(),
                uri: trunk.uri(to),
                to: trunk.uri(to),
                from: caller.clone(),
                from_display: Some(p.caller_id.clone()),
                peer: trunk.peer,
                extra: vec![("P-Asserted-Identity", format!("<{caller}>"))],
                record: None,
            };
            let sip_call_id = (i == 0).then_some(p.sip_call_id.as_str());
            match self
                .place_leg_on(target, LegPort::Caller, sip_call_id)
                .await
            {
                Ok(n) => {
                    if let Some(placed) = self.placed.as_mut() {
                        placed.legs.push((n, to.clone()));
                    }
                }
                Err(reason) => self.note(
                    "call.not_placed",
                    json!({"to": to, "reason": format!("{reason:?}")}),
                ),
            }
        }
        if self.placed.as_ref().is_none_or(|p| p.legs.is_empty()) {
            self.finish(CallStatus::Failed, None, Some("sip.not_placed"))
                .await;
            return;
        }
        self.ring_seq += 1;
        let seq = self.ring_seq;
        let me = self.myself.clone();
        let ring = p.ring_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(ring).await;
            let _ = me.cast(CallMsg::RingTimedOut { seq });
        });
    }

    /// Leg `n` is one of a placed call's callee legs.
    pub(super) fn is_callee(&self, n: u32) -> bool {
        self.placed
            .as_ref()
            .is_some_and(|p| p.legs.iter().any(|(leg, _)| *leg == n))
    }

    /// A response to a callee leg's INVITE.
    pub(super) async fn callee_response(
        &mut self,
        n: u32,
        response: &sautikit_sip::rsip::Response,
    ) {
        let outcome = self.on_leg_response(n, response);
        self.report_legs();
        match outcome {
            LegOutcome::Nothing | LegOutcome::Ringing { .. } => {}
            LegOutcome::Answered(stream) => self.callee_answered(n, stream).await,
            LegOutcome::Refused => self.callee_gone().await,
        }
    }

    /// The first callee to answer is the call's party; the others stop ringing.
    async fn callee_answered(&mut self, n: u32, stream: crate::media::StreamParams) {
        let answered_before = self.placed.as_ref().and_then(|p| p.answered).is_some();
        let Some(port) = self.rtp.as_ref().map(|p| p.id) else {
            self.bye_leg(n);
            return;
        };
        if answered_before || self.phase != Phase::Ringing {
            self.bye_leg(n);
            return;
        }
        let (others, to, time_limit) = match self.placed.as_mut() {
            Some(p) => {
                p.answered = Some(n);
                let others: Vec<u32> = p.legs.iter().map(|(l, _)| *l).filter(|l| *l != n).collect();
                let to = p.legs.iter().find(|(l, _)| *l == n).map(|(_, t)| t.clone());
                (others, to, p.time_limit)
            }
            None => return,
        };
        for other in others {
            self.cancel_leg(other);
        }
        if let Some(to) = to {
            self.to = to;
        }
        self.sip_status = self.legs.get(n as usize).and_then(|l| l.final_code);
        self.deps.media.start_stream(port, stream);
        self.note("call.answered", json!({"leg": self.to}));
        self.mark_answered();
        self.start_paid_time(None);
        if let Some(limit) = time_limit {
            let me = self.myself.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                let _ = me.cast(CallMsg::TimeLimitReached);
            });
        }
        match self.route_ref().voice_callback_url.clone() {
            Some(url) => self.fetch(url, CallbackMethod::Post, Vec::new()),
            None => {
                self.hang_up(
                    CallStatus::Failed,
                    "engine_hangup",
                    Some("routing.no_voice_callback"),
                )
                .await
            }
        }
    }

    /// A callee leg refused or timed out: once none is left ringing, the call ends with the
    /// carrier's answer (busy before any other).
    pub(super) async fn callee_gone(&mut self) {
        let Some(placed) = self.placed.as_ref() else {
            return;
        };
        if placed.answered.is_some() || self.phase != Phase::Ringing {
            return;
        }
        let legs: Vec<u32> = placed.legs.iter().map(|(l, _)| *l).collect();
        let states: Vec<(LegState, Option<u16>)> = legs
            .iter()
            .filter_map(|&n| self.legs.get(n as usize).map(|l| (l.state, l.final_code)))
            .collect();
        if states.iter().any(|(s, _)| *s != LegState::Ended) {
            return;
        }
        let codes: Vec<u16> = states.iter().filter_map(|(_, c)| *c).collect();
        let code = codes
            .iter()
            .copied()
            .find(|c| matches!(c, 486 | 600))
            .or_else(|| codes.last().copied())
            .unwrap_or(500);
        let (status, failure) = trunk::refusal(code);
        self.sip_status = Some(code);
        let cause = match status {
            CallStatus::Busy => Some("busy"),
            CallStatus::NoAnswer => Some("no_answer"),
            _ => None,
        };
        self.finish(status, cause, failure.as_deref()).await;
    }

    /// The callee hung up: the call is over.
    pub(super) async fn callee_hung_up(&mut self, n: u32) {
        if self.placed.as_ref().and_then(|p| p.answered) == Some(n) {
            self.hang_up(CallStatus::Completed, "callee_hangup", None)
                .await;
        }
    }

    /// Nobody answered within the ring time: CANCEL, `no_answer`.
    pub(super) async fn placed_ring_timeout(&mut self, seq: u64) {
        if seq != self.ring_seq || self.phase != Phase::Ringing {
            return;
        }
        self.note("call.no_answer", json!({"to": self.to}));
        self.sip_status = Some(487);
        self.finish(CallStatus::NoAnswer, Some("no_answer"), None)
            .await;
    }

    /// The call reached its `time_limit` (set once, at the answer).
    pub(super) async fn time_limit_reached(&mut self) {
        if self.phase == Phase::Ended {
            return;
        }
        self.note("call.time_limit", json!({}));
        self.hang_up(CallStatus::Completed, "time_limit", None)
            .await;
    }
}
