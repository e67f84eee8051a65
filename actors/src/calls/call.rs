//! The Call actor: one live call — its SIP dialog, its VoiceAction script, its media session.
//!
//! Everything slow (the voice callback) runs in a task that reports back as a message, so a
//! CANCEL, a BYE or the API's hangup is handled while a callback is outstanding.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sautikit_sip::dialog::Dialog;
use sautikit_sip::message::{self as sipmsg, response_to, with_body};
use sautikit_sip::rsip;
use sautikit_sip::rsip::headers::UntypedHeader;
use sautikit_sip::sdp;
use sautikit_sip::transaction::{Peer, Transport, TxKey};
use serde_json::json;
use tracing::{info, warn};

use super::verbs::{self, Step};
use super::{CallDeps, CallSnapshot, CallsMsg};
use crate::call_store::{
    CallAnswered, CallEnded, CallStarted, CallStatus, NumberRoute, TimelineEntry,
};
use crate::callback::{CallbackFailure, CallbackMethod, CallbackReply, CallbackRequest};
use crate::media::{MediaEvent, RtpPort, StreamParams};
use crate::model::NumberStatus;
use crate::numbers::NumbersMsg;
use crate::sip_endpoint::SipMsg;
use crate::synth::Audio;
use crate::voice::Action;

/// How long a call waits for the Numbers actor before answering 503.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);

/// The INVITE that starts a call, as the endpoint received it; for a call placed through the API,
/// where its first party is reached.
pub struct IncomingInvite {
    /// The INVITE and its server transaction; `None` for a call placed through the API (its
    /// first party is a leg we call).
    pub server: Option<InviteServer>,
    /// The first party's SIP address (the caller, or the trunk a placed call goes out through).
    pub from: Peer,
    pub sip_call_id: String,
    /// Our SIP address (Via and Contact of what we send).
    pub local: SocketAddr,
    /// A registered device's call: the credential and number it authenticated as.
    pub device: Option<crate::registrar::DeviceLogin>,
}

/// An INVITE we answer: its server transaction and the request.
pub struct InviteServer {
    pub key: TxKey,
    pub request: rsip::Request,
}

pub struct CallArgs {
    pub deps: CallDeps,
    pub endpoint: ActorRef<SipMsg>,
    pub invite: IncomingInvite,
    /// A call placed through the API: whom it calls, and how.
    pub placed: Option<Box<super::from_api::PlacedCall>>,
}

pub enum CallMsg {
    /// The caller acknowledged our 2xx.
    AckReceived,
    /// The caller gave up before we answered.
    CancelReceived,
    /// Our 2xx was never acknowledged (Timer H).
    AckTimedOut,
    /// BYE, INFO, OPTIONS or a re-INVITE inside this call's dialog.
    InDialogRequest {
        key: TxKey,
        request: Box<rsip::Request>,
    },
    /// A voice callback (the first, a redirect's) came back.
    CallbackReturned {
        result: Result<CallbackReply, CallbackFailure>,
        url: String,
    },
    /// A `pause` is over.
    PauseElapsed { seq: u64 },
    /// The API hangs the call up; answered once the end is recorded.
    HangupRequested { reply: RpcReplyPort<bool> },
    /// The call's media reported something: a prompt finished, a key, a recording.
    Media(MediaEvent),
    /// Audio for a prompt (speech, a fetched file) is ready — or why it is not (the failure
    /// reason and a message for the timeline).
    PromptReady {
        seq: u64,
        result: Result<Audio, (&'static str, String)>,
    },
    /// `getDigits` waited long enough for the next key.
    DigitsTimedOut { seq: u64 },
    /// A response to the INVITE of outbound leg `leg`.
    LegResponse {
        leg: u32,
        response: Box<rsip::Response>,
    },
    /// Leg `leg`'s INVITE got no final response (Timer B), or could not be sent.
    LegTimedOut { leg: u32 },
    /// Leg `leg`'s media reported something.
    LegMedia { leg: u32, event: MediaEvent },
    /// The devices rang for the whole ring time.
    RingTimedOut { seq: u64 },
    /// A `dial`'s parties rang for its whole `timeout`.
    DialRingTimedOut { seq: u64 },
    /// A `dial`'s bridged party reached its `timeLimit`.
    DialTimeLimit { seq: u64 },
    /// Time to extend the prepaid reservation, or the paid time is over.
    PrepaidCheck { leg: Option<u32>, seq: u64 },
    /// A call placed through the API reached its `time_limit`.
    TimeLimitReached,
    /// A media stream (`stream`) started or ended.
    StreamEvent {
        sid: String,
        event: crate::streaming::SessionEvent,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// No final response sent yet.
    Ringing,
    /// 200 OK sent, ACK not yet received.
    AwaitingAck,
    Answered,
    Ended,
}

/// What the script waits for before it goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waiting {
    Nothing,
    Ack,
    Callback,
    Pause {
        seq: u64,
    },
    /// Audio for a prompt is being made.
    Prompt {
        seq: u64,
    },
    Playback {
        play_id: u64,
    },
    /// `getDigits` waits for a key.
    Digits {
        seq: u64,
    },
    Recording,
    /// The caller is connected (or being connected) to another leg: no script runs.
    Bridge,
    /// A bidirectional media stream holds the call until its socket closes.
    Stream,
}

/// Where the script goes on when a step's callback (`getDigits`, `record`) returns no actions.
pub(super) struct StepResume {
    pub(super) actions: Vec<Action>,
    pub(super) index: usize,
    pub(super) document_url: String,
}

pub struct Call;

/// The header that carries our call id on the responses to a call's INVITE.
pub const CALL_ID_HEADER: &str = "X-Sautikit-Call-Id";

pub struct CallState {
    pub(super) deps: CallDeps,
    pub(super) endpoint: ActorRef<SipMsg>,
    pub(super) invite: IncomingInvite,
    pub(super) myself: ActorRef<CallMsg>,
    pub(super) call_id: String,
    pub(super) route: Option<NumberRoute>,
    pub(super) from: String,
    pub(super) to: String,
    pub(super) local_tag: String,
    pub(super) offer: Option<sdp::SessionDescription>,
    pub(super) answer_sdp: Option<String>,
    pub(super) dialog: Option<Dialog>,
    pub(super) rtp: Option<RtpPort>,
    pub(super) phase: Phase,
    pub(super) waiting: Waiting,
    pub(super) timer_seq: u64,
    pub(super) actions: Vec<Action>,
    pub(super) index: usize,
    /// The action whose `action.started` is in the timeline: an action that waits (for the
    /// ACK, a timer) is run again when it resumes, and is started once.
    pub(super) started: Option<usize>,
    /// The URL whose reply is running: relative URLs in it resolve against it.
    pub(super) document_url: String,
    pub(super) timeline: Vec<TimelineEntry>,
    /// The call row exists.
    pub(super) recorded: bool,
    pub(super) hangup_waiters: Vec<RpcReplyPort<bool>>,
    /// How many times the prompt being loaded plays.
    pub(super) prompt_loops: u32,
    pub(super) gather: Option<verbs::Gather>,
    pub(super) recording: Option<verbs::ActiveRecording>,
    pub(super) step_resume: Option<StepResume>,
    /// The answer's write, queued and not yet known to have committed.
    pub(super) answer_receipt: Option<crate::call_store::WriteReceipt>,
    /// Outbound legs (devices rung, parties dialled), by leg number.
    pub(super) legs: Vec<super::leg::Leg>,
    /// The leg whose media is bridged to the caller's.
    pub(super) bridged: Option<u32>,
    /// Names the current ring timer (older ones are ignored).
    pub(super) ring_seq: u64,
    /// `inbound`, or `outbound` for a device's call out through the trunk.
    pub(super) direction: &'static str,
    /// The call goes out through the trunk: the carrier's answers are passed on.
    pub(super) trunk_call: bool,
    /// The paid leg's reservation (calls out through the trunk).
    pub(super) prepaid: Option<super::prepaid::Prepaid>,
    /// The legs as Calls last heard of them (see [`CallState::legs_changed`]).
    pub(super) legs_reported: Vec<(super::leg::LegState, bool)>,
    /// A `dial` in progress.
    pub(super) dial: Option<verbs::ActiveDial>,
    /// A call placed through the API: its callee's legs, before and after the answer.
    pub(super) placed: Option<super::from_api::Placement>,
    /// The customer's own id for the call (`client_request_id`), echoed in every callback.
    pub(super) client_request_id: Option<String>,
    /// The far end's final SIP code (outbound calls), recorded with the end.
    pub(super) sip_status: Option<u16>,
    /// Its media streams (`stream`), live.
    pub(super) streams: Vec<verbs::ActiveStream>,
    /// What the API asked for, until the call starts placing it.
    to_place: Option<Box<super::from_api::PlacedCall>>,
    /// Time spent waiting on the voice callback, and since when the one in flight was asked:
    /// admission control counts only the engine's own share of a setup.
    callback_waited: Duration,
    callback_since: Option<Instant>,
}

impl Actor for Call {
    type Msg = CallMsg;
    type State = CallState;
    type Arguments = CallArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(CallState {
            deps: args.deps,
            endpoint: args.endpoint,
            invite: args.invite,
            myself,
            call_id: uuid::Uuid::now_v7().to_string(),
            route: None,
            from: String::new(),
            to: String::new(),
            local_tag: sipmsg::new_tag(),
            offer: None,
            answer_sdp: None,
            dialog: None,
            rtp: None,
            phase: Phase::Ringing,
            waiting: Waiting::Nothing,
            timer_seq: 0,
            actions: Vec::new(),
            index: 0,
            started: None,
            document_url: String::new(),
            timeline: Vec::new(),
            recorded: false,
            hangup_waiters: Vec::new(),
            prompt_loops: 1,
            gather: None,
            recording: None,
            step_resume: None,
            answer_receipt: None,
            legs: Vec::new(),
            bridged: None,
            ring_seq: 0,
            direction: "inbound",
            trunk_call: false,
            prepaid: None,
            legs_reported: Vec::new(),
            dial: None,
            placed: None,
            streams: Vec::new(),
            to_place: args.placed,
            callback_waited: Duration::ZERO,
            callback_since: None,
            client_request_id: None,
            sip_status: None,
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match state.to_place.take() {
            Some(placed) => state.place(*placed).await,
            None => state.begin().await,
        }
        state.report_legs();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.phase == Phase::Ended {
            if let CallMsg::HangupRequested { reply } = message {
                let _ = reply.send(true);
            }
            return Ok(());
        }
        match message {
            CallMsg::AckReceived => state.on_ack().await,
            CallMsg::CancelReceived => state.on_cancel().await,
            CallMsg::AckTimedOut => {
                if state.phase == Phase::AwaitingAck {
                    state.note("sip.timeout", json!({"message": "no ACK for our 200 OK"}));
                    state
                        .hang_up(CallStatus::Failed, "ack_timeout", Some("sip.ack_timeout"))
                        .await;
                }
            }
            CallMsg::InDialogRequest { key, request } => state.on_in_dialog(key, *request).await,
            CallMsg::CallbackReturned { result, url } => {
                if let Some(since) = state.callback_since.take() {
                    state.callback_waited += since.elapsed();
                }
                if state.waiting == Waiting::Callback {
                    state.waiting = Waiting::Nothing;
                    state.on_callback(result, url).await;
                }
            }
            CallMsg::PauseElapsed { seq } => {
                if state.waiting == (Waiting::Pause { seq }) {
                    state.waiting = Waiting::Nothing;
                    state.action_finished("completed");
                    state.index += 1;
                    state.run().await;
                }
            }
            CallMsg::Media(event) => state.on_media(event).await,
            CallMsg::PromptReady { seq, result } => {
                if state.waiting == (Waiting::Prompt { seq }) {
                    verbs::prompt_ready(state, seq, result).await;
                }
            }
            CallMsg::DigitsTimedOut { seq } => {
                if state.waiting == (Waiting::Digits { seq }) {
                    verbs::get_digits_timed_out(state).await;
                }
            }
            CallMsg::LegResponse { leg, response } => state.on_leg_answer(leg, &response).await,
            CallMsg::LegTimedOut { leg } => state.on_leg_timeout(leg).await,
            CallMsg::LegMedia { leg, event } => state.on_leg_media(leg, event).await,
            CallMsg::RingTimedOut { seq } if state.placed.is_some() => {
                state.placed_ring_timeout(seq).await
            }
            CallMsg::RingTimedOut { seq } => state.on_ring_timeout(seq).await,
            CallMsg::TimeLimitReached => state.time_limit_reached().await,
            CallMsg::StreamEvent { sid, event } => verbs::stream_event(state, sid, event).await,
            CallMsg::DialRingTimedOut { seq } => verbs::dial_ring_timed_out(state, seq).await,
            CallMsg::DialTimeLimit { seq } => verbs::dial_time_limit_reached(state, seq).await,
            CallMsg::PrepaidCheck { leg, seq } => state.on_prepaid_check(leg, seq).await,
            CallMsg::HangupRequested { reply } => {
                state.hangup_waiters.push(reply);
                if state.phase == Phase::Ringing {
                    if state.placed.is_some() {
                        // Its callee legs get CANCEL (in `finish`) and finally say 487.
                        state.sip_status.get_or_insert(487);
                    }
                    state.respond_final(603, Some("Decline"));
                    state
                        .finish(
                            CallStatus::Canceled,
                            Some("api_hangup"),
                            Some("call.canceled"),
                        )
                        .await;
                } else {
                    state
                        .hang_up(CallStatus::Completed, "api_hangup", None)
                        .await;
                }
            }
        }
        state.report_legs();
        Ok(())
    }
}

/// Wait for a queued answer to commit; a failure is logged (the call goes on, as it would have
/// had the write been awaited).
async fn answered_committed(answer: crate::call_store::WriteReceipt, call_id: &str) {
    if let Err(e) = answer.await {
        warn!(call_id = %call_id, error = %e, "recording the answer failed");
    }
}

/// A device dialling `07…` or `01…` (Kenya's national format) means `+2547…`/`+2541…`.
fn national_to_e164(user: &str) -> String {
    match user.strip_prefix('0') {
        Some(rest) if rest.len() == 9 && rest.bytes().all(|b| b.is_ascii_digit()) => {
            format!("+254{rest}")
        }
        _ => user.to_owned(),
    }
}

/// `+254700000001`, `254700000001` and `0700…`-style users: digits with a `+` when they look
/// international; anything else as it came.
pub(super) fn normalize_number(user: &str) -> Option<String> {
    let digits = user.strip_prefix('+').unwrap_or(user);
    if digits.len() < 3 || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("+{digits}"))
}

impl CallState {
    pub(super) fn now(&self) -> DateTime<Utc> {
        self.deps.clock.now()
    }

    /// Add a timeline line; written with the next change of the call.
    pub(super) fn note(&mut self, kind: &str, detail: serde_json::Value) {
        let at = self.now();
        self.timeline.push(TimelineEntry {
            at,
            kind: kind.to_owned(),
            detail,
        });
    }

    async fn begin(&mut self) {
        let Some(server) = &self.invite.server else {
            return;
        };
        let user = sipmsg::request_user(&server.request).unwrap_or_default();
        let from_user = sipmsg::from_user(&server.request).unwrap_or_default();
        self.from = normalize_number(&from_user).unwrap_or(from_user);
        let user = match &self.invite.device {
            // A device presents only its number, and may dial in the national format.
            Some(login) => {
                self.from = login.number.clone();
                national_to_e164(&user)
            }
            None => user,
        };
        let transport = match self.invite.from.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        self.note(
            "sip.received",
            json!({"method": "INVITE", "from": self.from, "to": user, "source": self.invite.from.addr.to_string(), "transport": transport}),
        );
        let Some(number) = normalize_number(&user) else {
            self.respond_final(404, Some("Not Found"));
            self.stop_unrecorded();
            return;
        };
        self.to = number.clone();
        let Ok(route) = self.lookup_route(number).await else {
            return;
        };
        let route = match route {
            Some(r) if r.status != NumberStatus::Released => r,
            _ if self.invite.device.is_some() => {
                // Not one of our numbers: out through the trunk.
                self.call_out().await;
                return;
            }
            _ => {
                info!(number = %self.to, "INVITE for a number nobody has claimed");
                self.respond_final(404, Some("Not Found"));
                self.stop_unrecorded();
                return;
            }
        };
        if route.status == NumberStatus::Suspended {
            info!(number_id = %route.number_id, workspace_id = %route.workspace_id, "INVITE for a suspended number");
            self.respond_final(403, Some("Forbidden"));
            self.stop_unrecorded();
            return;
        }
        let callback_url = route.voice_callback_url.clone();
        self.route = Some(route);
        if !self.record_started().await {
            return;
        }
        info!(call_id = %self.call_id, number_id = %self.route_ref().number_id, workspace_id = %self.route_ref().workspace_id, "inbound call");
        let Some(url) = callback_url else {
            // No script: the number's registered devices, if it has any.
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
            if !self.ring_devices().await {
                self.respond_final(480, Some("Temporarily Unavailable"));
                self.finish(CallStatus::Failed, None, Some("routing.no_voice_callback"))
                    .await;
            }
            return;
        };
        // The offer is checked before the callback: a call we could not answer costs the customer
        // no request.
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
        self.fetch(url, CallbackMethod::Post, Vec::new());
    }

    /// The route of a number; `Err` when it could not be had (answered `503` already).
    pub(super) async fn lookup_route(&mut self, number: String) -> Result<Option<NumberRoute>, ()> {
        let Some(numbers) = ActorRef::<NumbersMsg>::where_is(self.deps.numbers.clone()) else {
            warn!(sip_call_id = %self.invite.sip_call_id, "Numbers actor not running");
            self.respond_with(503, Some("Service Unavailable"), &[("Retry-After", "5")]);
            self.stop_unrecorded();
            return Err(());
        };
        match ractor::call_t!(
            numbers,
            |reply| NumbersMsg::RouteRequested { number, reply },
            ROUTE_TIMEOUT.as_millis() as u64
        ) {
            Ok(Ok(route)) => Ok(route),
            Ok(Err(e)) => {
                warn!(sip_call_id = %self.invite.sip_call_id, error = %e, "route look-up failed");
                self.respond_with(503, Some("Service Unavailable"), &[("Retry-After", "5")]);
                self.stop_unrecorded();
                Err(())
            }
            Err(e) => {
                warn!(sip_call_id = %self.invite.sip_call_id, error = %e, "Numbers actor unavailable");
                self.respond_with(503, Some("Service Unavailable"), &[("Retry-After", "5")]);
                self.stop_unrecorded();
                Err(())
            }
        }
    }

    pub(super) fn check_offer(&self) -> Result<sdp::SessionDescription, String> {
        let Some(server) = &self.invite.server else {
            return Err("the call has no INVITE of its own".into());
        };
        let body = &server.request.body;
        if body.is_empty() {
            return Err("the INVITE carries no SDP offer".into());
        }
        let text = std::str::from_utf8(body).map_err(|_| "the SDP offer is not UTF-8")?;
        let offer = sdp::parse(text).map_err(|e| e.to_string())?;
        sdp::answer(&offer, self.deps.media_ip, 0, 0).map_err(|e| e.to_string())?;
        Ok(offer)
    }

    pub(super) fn route_ref(&self) -> &NumberRoute {
        // Only called once the route is known.
        self.route
            .as_ref()
            .unwrap_or_else(|| unreachable!("route is set before the call is recorded"))
    }

    /// Write the call row (`ringing`) with `call.started`; false if that failed (answered 503).
    pub(super) async fn record_started(&mut self) -> bool {
        let route = self.route_ref().clone();
        let started = CallStarted {
            call_id: self.call_id.clone(),
            workspace_id: route.workspace_id.clone(),
            number_id: route.number_id.clone(),
            direction: self.direction.into(),
            from: self.from.clone(),
            to: self.to.clone(),
            sip_call_id: self.invite.sip_call_id.clone(),
            engine_id: self.deps.engine_id.clone(),
            started_at: self
                .timeline
                .first()
                .map(|t| t.at)
                .unwrap_or_else(|| self.now()),
            timeline: std::mem::take(&mut self.timeline),
            parent_call_id: None,
        };
        match self.deps.store.call_started(started).await {
            Ok(()) => {
                self.recorded = true;
                self.snapshot();
                true
            }
            Err(e) => {
                warn!(error = %e, "recording a new call failed");
                self.respond_with(503, Some("Service Unavailable"), &[("Retry-After", "5")]);
                self.end_if_started();
                self.stop_unrecorded();
                false
            }
        }
    }

    /// Tell Calls what this call has on the wire.
    pub(super) fn snapshot(&self) {
        let Some(route) = &self.route else { return };
        let Some(calls) = ActorRef::<CallsMsg>::where_is(self.deps.calls.clone()) else {
            return;
        };
        let _ = calls.cast(CallsMsg::Snapshot {
            actor: self.myself.clone(),
            snapshot: Box::new(CallSnapshot {
                call_id: self.call_id.clone(),
                workspace_id: route.workspace_id.clone(),
                sip_call_id: self.invite.sip_call_id.clone(),
                endpoint: self.endpoint.clone(),
                invite: self
                    .invite
                    .server
                    .as_ref()
                    .map(|s| (s.key.clone(), s.request.clone())),
                peer: self.invite.from,
                local: self.invite.local,
                final_sent: self.phase != Phase::Ringing,
                dialog: self.dialog.clone(),
                rtp_id: self.rtp.as_ref().map(|p| p.id),
                legs: self.leg_snapshots(),
            }),
        });
    }

    /// Callback fields of DESIGN §6, then the step's own.
    pub(super) fn fields(&self, extra: Vec<(String, String)>) -> Vec<(String, String)> {
        let route = self.route_ref();
        let status = match self.phase {
            Phase::Ringing => "ringing",
            _ => "answered",
        };
        let mut f = vec![
            ("CallId".to_owned(), self.call_id.clone()),
            ("NumberId".to_owned(), route.number_id.clone()),
            ("From".to_owned(), self.from.clone()),
            ("To".to_owned(), self.to.clone()),
            ("Direction".to_owned(), self.direction.to_owned()),
            ("CallStatus".to_owned(), status.to_owned()),
        ];
        if let Some(id) = &self.client_request_id {
            f.push(("ClientRequestId".to_owned(), id.clone()));
        }
        f.extend(extra);
        f
    }

    /// Ask the customer's server for a script; the answer comes back as `CallbackReturned`.
    pub(super) fn fetch(
        &mut self,
        url: String,
        method: CallbackMethod,
        extra: Vec<(String, String)>,
    ) {
        let request = CallbackRequest {
            url: url.clone(),
            method,
            fields: self.fields(extra),
            secret: self.route_ref().webhook_secret.clone(),
            call_id: self.call_id.clone(),
        };
        self.waiting = Waiting::Callback;
        self.callback_since = Some(Instant::now());
        let client = self.deps.callback.clone();
        let me = self.myself.clone();
        let answer = self.answer_receipt.take();
        let call_id = self.call_id.clone();
        tokio::spawn(async move {
            if let Some(answer) = answer {
                answered_committed(answer, &call_id).await;
            }
            let result = client.fetch(request).await;
            // The call may have ended meanwhile (CANCEL, BYE): then nobody listens.
            let _ = me.cast(CallMsg::CallbackReturned { result, url });
        });
    }

    async fn on_callback(&mut self, result: Result<CallbackReply, CallbackFailure>, url: String) {
        match result {
            Ok(reply) => {
                self.note(
                    "callback.succeeded",
                    json!({"url": url, "status_code": reply.status_code, "latency_ms": reply.latency_ms, "actions": reply.script.actions.len()}),
                );
                if let Some(resume) = self.step_resume.take()
                    && reply.script.actions.is_empty()
                {
                    // A step's callback with nothing to say: the script goes on (jambonz).
                    self.actions = resume.actions;
                    self.index = resume.index;
                    self.started = Some(resume.index);
                    self.document_url = resume.document_url;
                    self.action_finished("completed");
                    self.index += 1;
                } else {
                    if !self.actions.is_empty() {
                        // The step (or redirect) that asked is done; its reply replaces the rest.
                        self.action_finished("completed");
                    }
                    self.actions = reply.script.actions;
                    self.index = 0;
                    self.started = None;
                    self.document_url = url;
                }
                self.run().await;
            }
            Err(failure) => {
                let (status_code, latency_ms) = match &failure {
                    CallbackFailure::HttpStatus {
                        status_code,
                        latency_ms,
                    }
                    | CallbackFailure::InvalidJson {
                        status_code,
                        latency_ms,
                        ..
                    }
                    | CallbackFailure::InvalidActions {
                        status_code,
                        latency_ms,
                        ..
                    } => (Some(*status_code), Some(*latency_ms)),
                    CallbackFailure::Unreachable { latency_ms, .. } => (None, Some(*latency_ms)),
                    CallbackFailure::Timeout { timeout_ms } => (None, Some(*timeout_ms)),
                    CallbackFailure::Forbidden { .. } => (None, None),
                };
                self.note(
                    "callback.failed",
                    json!({"url": url, "reason": failure.reason(), "status_code": status_code, "latency_ms": latency_ms, "error": failure.to_string()}),
                );
                self.fail(failure.reason()).await;
            }
        }
    }

    /// Run the script from `index` until an action waits or the call ends.
    pub(super) async fn run(&mut self) {
        while self.phase != Phase::Ended && self.waiting == Waiting::Nothing {
            let Some(action) = self.actions.get(self.index).cloned() else {
                self.note("script.ended", json!({"actions": self.actions.len()}));
                self.hang_up(CallStatus::Completed, "engine_hangup", None)
                    .await;
                return;
            };
            match verbs::execute(self, &action).await {
                Step::Next => {
                    self.action_finished("completed");
                    self.index += 1;
                }
                Step::Wait | Step::Ended => return,
            }
        }
    }

    pub(super) fn action_started(&mut self, verb: &str) {
        let index = self.index;
        if self.started.replace(index) == Some(index) {
            return;
        }
        self.note("action.started", json!({"index": index, "verb": verb}));
    }

    pub(super) fn action_finished(&mut self, outcome: &str) {
        let index = self.index;
        let verb = self.actions.get(index).map(|a| a.verb()).unwrap_or("");
        self.note(
            "action.finished",
            json!({"index": index, "verb": verb, "outcome": outcome}),
        );
    }

    /// Answer with our SDP; the script goes on when the ACK comes.
    pub(super) async fn answer(&mut self) -> Result<(), &'static str> {
        let Some(offer) = self.offer.as_ref() else {
            return Err("sdp.no_offer");
        };
        let me = self.myself.clone();
        let events: crate::media::MediaEvents = std::sync::Arc::new(move |e: MediaEvent| {
            let _ = me.cast(CallMsg::Media(e));
        });
        let contact = format!(
            "sip:{}@{}{}",
            self.to.trim_start_matches('+'),
            self.invite.local,
            if self.invite.from.transport == Transport::Tcp {
                ";transport=tcp"
            } else {
                ""
            }
        );
        let contact_uri = rsip::Uri::try_from(contact.as_str()).map_err(|_| "sip.bad_contact")?;
        let Some(server) = &self.invite.server else {
            return Err("sip.no_invite");
        };
        let mut response = response_to(&server.request, 200, Some("OK"), Some(&self.local_tag));
        self.with_call_id(&mut response);
        response
            .headers
            .push(rsip::Header::Contact(rsip::headers::Contact::new(format!(
                "<{contact}>"
            ))));
        response.headers.push(rsip::Header::Other(
            "Allow".into(),
            crate::sip_endpoint::ALLOW.into(),
        ));
        let dialog = Dialog::uas(&server.request, &self.local_tag, contact_uri)
            .map_err(|_| "sip.bad_dialog")?;
        let key = server.key.clone();
        // Everything that can fail without a port is done: a port opened now is closed again if
        // the answer cannot be made. A call that rang devices opened its port already.
        let port = match self.rtp.take() {
            Some(port) => port,
            None => self
                .deps
                .media
                .open(events)
                .await
                .map_err(|_| "media.no_port")?,
        };
        let session_id = self.sdp_session_id();
        let answer = match sdp::answer(offer, self.deps.media_ip, port.local.port(), session_id) {
            Ok(answer) => answer,
            Err(_) => {
                self.deps.media.close(port.id);
                return Err("sdp.no_common_codec");
            }
        };
        let response = with_body(response, "application/sdp", answer.sdp.clone().into_bytes());
        let port_id = port.id;
        // From here the call's end closes the port, whatever fails.
        self.rtp = Some(port);
        if let Some(stream) = StreamParams::negotiated(&answer) {
            self.deps.media.start_stream(port_id, stream);
        }
        self.endpoint
            .cast(SipMsg::Respond {
                key,
                response,
                outside: self.setup_outside(),
            })
            .map_err(|_| "sip.endpoint_gone")?;
        self.note(
            "sip.sent",
            json!({"status": 200, "reason": "OK", "codec": answer.codec.name()}),
        );
        self.answer_sdp = Some(answer.sdp);
        self.dialog = Some(dialog);
        self.phase = Phase::AwaitingAck;
        self.snapshot();
        Ok(())
    }

    /// Our SDP's session id: the same in a `183` and the `200` that follows it.
    fn sdp_session_id(&self) -> u64 {
        u64::from_str_radix(&self.local_tag[..self.local_tag.len().min(12)], 16).unwrap_or(1)
    }

    /// `183 Session Progress` with our SDP, before answering: the caller hears what its port
    /// is sent (a dialled party's early media, a ringback tone). The `200` carries the same SDP.
    pub(super) async fn early_answer(&mut self) -> Result<(), &'static str> {
        if self.phase != Phase::Ringing {
            return Ok(());
        }
        self.open_caller_port().await?;
        let offer = self.offer.as_ref().ok_or("sdp.no_offer")?;
        let port = self.rtp.as_ref().ok_or("media.no_port")?;
        let answer = sdp::answer(
            offer,
            self.deps.media_ip,
            port.local.port(),
            self.sdp_session_id(),
        )
        .map_err(|_| "sdp.no_common_codec")?;
        if let Some(stream) = StreamParams::negotiated(&answer) {
            self.deps.media.start_stream(port.id, stream);
        }
        let server = self.invite.server.as_ref().ok_or("sip.no_invite")?;
        let response = response_to(
            &server.request,
            183,
            Some("Session Progress"),
            Some(&self.local_tag),
        );
        let response = with_body(response, "application/sdp", answer.sdp.into_bytes());
        self.endpoint
            .cast(SipMsg::Respond {
                key: server.key.clone(),
                response,
                outside: None,
            })
            .map_err(|_| "sip.endpoint_gone")?;
        self.note(
            "sip.sent",
            json!({"status": 183, "reason": "Session Progress"}),
        );
        Ok(())
    }

    /// Open the caller's RTP port before answering (legs open theirs beside it). The call's
    /// end closes it.
    pub(super) async fn open_caller_port(&mut self) -> Result<(), &'static str> {
        if self.rtp.is_some() {
            return Ok(());
        }
        let me = self.myself.clone();
        let events: crate::media::MediaEvents = std::sync::Arc::new(move |e: MediaEvent| {
            let _ = me.cast(CallMsg::Media(e));
        });
        let port = self
            .deps
            .media
            .open(events)
            .await
            .map_err(|_| "media.no_port")?;
        self.rtp = Some(port);
        Ok(())
    }

    async fn on_media(&mut self, event: MediaEvent) {
        match event {
            MediaEvent::MediaTimeout { .. } => {
                if self.bridged.is_some() {
                    self.note("media.timeout", json!({"leg": "caller"}));
                    self.hang_up(CallStatus::Completed, "media_timeout", None)
                        .await;
                }
            }
            MediaEvent::PlaybackFinished {
                play_id,
                interrupted,
            } => {
                if self.waiting == (Waiting::Playback { play_id }) {
                    self.waiting = Waiting::Nothing;
                    verbs::playback_finished(self, interrupted).await;
                }
            }
            MediaEvent::Digit { key } => self.on_digit(key, "rfc4733").await,
            MediaEvent::RemoteMediaStarted => {}
            MediaEvent::RecordingFinished(outcome) => {
                if self.waiting == Waiting::Recording {
                    self.waiting = Waiting::Nothing;
                    verbs::recording_finished(self, outcome).await;
                }
            }
        }
    }

    async fn on_digit(&mut self, key: char, source: &str) {
        self.note(
            "dtmf.received",
            json!({"key": key.to_string(), "source": source}),
        );
        verbs::digit(self, key, source).await;
    }

    async fn on_ack(&mut self) {
        if self.phase != Phase::AwaitingAck {
            return;
        }
        self.note("sip.received", json!({"method": "ACK"}));
        self.mark_answered();
        if self.waiting == Waiting::Ack {
            self.waiting = Waiting::Nothing;
            self.run().await;
        }
    }

    /// Our 200 was taken: status `answered`, `call.answered`; billing runs from now.
    pub(super) fn mark_answered(&mut self) {
        self.phase = Phase::Answered;
        let answered = CallAnswered {
            call_id: self.call_id.clone(),
            answered_at: self.now(),
            // A placed call that rang several numbers is to the one that answered.
            to: self
                .placed
                .as_ref()
                .filter(|p| p.rang_several())
                .map(|_| self.to.clone()),
            timeline: std::mem::take(&mut self.timeline),
        };
        // Not awaited here: the end, if it comes next, is queued behind it and commits with or
        // after it. The next callback waits for it, so the customer never reads the call as
        // `ringing` once it has been asked about it as answered.
        self.answer_receipt = Some(self.deps.store.queue_call_answered(answered));
    }

    async fn on_cancel(&mut self) {
        self.note("sip.received", json!({"method": "CANCEL"}));
        if self.phase != Phase::Ringing {
            return;
        }
        self.respond_final(487, Some("Request Terminated"));
        self.finish(
            CallStatus::Canceled,
            Some("caller_cancel"),
            Some("call.canceled"),
        )
        .await;
    }

    async fn on_in_dialog(&mut self, key: TxKey, request: rsip::Request) {
        if let Some(leg) = self.leg_of(&request) {
            self.on_leg_request(leg, key, request).await;
            return;
        }
        let method = request.method.to_string();
        self.note("sip.received", json!({"method": method}));
        let info_digit = (request.method == rsip::Method::Info)
            .then(|| {
                let content_type = request
                    .headers
                    .iter()
                    .find_map(|h| match h {
                        rsip::Header::ContentType(c) => Some(c.to_string()),
                        _ => None,
                    })
                    .unwrap_or_default();
                let content_type = content_type
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
                    .unwrap_or(content_type);
                sautikit_sip::dtmf::parse_info(&content_type, &request.body)
            })
            .flatten();
        let (code, body) = match request.method {
            rsip::Method::Bye if self.phase != Phase::Ringing => (200, None),
            rsip::Method::Bye => (481, None),
            rsip::Method::Info | rsip::Method::Options => (200, None),
            // A session refresh: our session is unchanged, so is our answer.
            rsip::Method::Invite if self.phase == Phase::Answered => (200, self.answer_sdp.clone()),
            rsip::Method::Invite => (491, None),
            _ => (405, None),
        };
        let mut response = response_to(&request, code, None, Some(&self.local_tag));
        if let Some(sdp) = body {
            response = with_body(response, "application/sdp", sdp.into_bytes());
        }
        let _ = self.endpoint.cast(SipMsg::Respond {
            key,
            response,
            outside: None,
        });
        self.note("sip.sent", json!({"status": code, "method": method}));
        if let Some(digit) = info_digit {
            self.on_digit(digit, "sip_info").await;
        }
        if request.method == rsip::Method::Bye && code == 200 {
            if self.phase == Phase::AwaitingAck {
                // The caller got our 200 (it sends BYE in the dialog it made): its ACK was lost
                // or overtaken. The call was answered.
                self.mark_answered();
            }
            self.finish(CallStatus::Completed, Some("caller_hangup"), None)
                .await;
        }
    }

    /// A provisional answer to the INVITE (`180 Ringing` while devices ring).
    pub(super) fn respond_provisional(&mut self, code: u16, reason: &str) {
        let Some(server) = self
            .invite
            .server
            .as_ref()
            .filter(|_| self.phase == Phase::Ringing)
        else {
            return;
        };
        let mut response = response_to(&server.request, code, Some(reason), Some(&self.local_tag));
        self.with_call_id(&mut response);
        let _ = self.endpoint.cast(SipMsg::Respond {
            key: server.key.clone(),
            response,
            outside: None,
        });
        self.note("sip.sent", json!({"status": code, "reason": reason}));
    }

    /// The call's id on the responses to its INVITE once its record exists, so that whoever
    /// called (a carrier's logs, `sautikit phone`) can look the call up.
    fn with_call_id(&self, response: &mut rsip::Response) {
        if self.recorded {
            response.headers.push(rsip::Header::Other(
                CALL_ID_HEADER.into(),
                self.call_id.clone(),
            ));
        }
    }

    /// For the final answer to the INVITE: how long its setup waited outside the engine (the
    /// voice callback), or `None` when it waited on a party we called (devices, `dial`).
    fn setup_outside(&self) -> Option<Duration> {
        self.legs.is_empty().then_some(self.callback_waited)
    }

    /// A final non-2xx answer to the INVITE.
    pub(super) fn respond_final(&mut self, code: u16, reason: Option<&str>) {
        self.respond_with(code, reason, &[]);
    }

    fn respond_with(&mut self, code: u16, reason: Option<&str>, extra: &[(&str, &str)]) {
        // A call placed through the API has no INVITE to answer: it ends (`finish`) all the same.
        let Some(server) = self
            .invite
            .server
            .as_ref()
            .filter(|_| self.phase == Phase::Ringing)
        else {
            return;
        };
        let mut response = response_to(&server.request, code, reason, Some(&self.local_tag));
        self.with_call_id(&mut response);
        for (name, value) in extra {
            response
                .headers
                .push(rsip::Header::Other((*name).to_owned(), (*value).to_owned()));
        }
        let _ = self.endpoint.cast(SipMsg::Respond {
            key: server.key.clone(),
            response,
            outside: self.setup_outside(),
        });
        self.note("sip.sent", json!({"status": code, "reason": reason}));
        self.phase = Phase::AwaitingAck;
        // A final non-2xx ends the call; `finish` runs next.
    }

    /// End a call that failed: `500` before answer, BYE after.
    pub(super) async fn fail(&mut self, failure_reason: &str) {
        if self.phase == Phase::Ringing {
            self.respond_final(500, Some("Server Internal Error"));
            self.finish(CallStatus::Failed, None, Some(failure_reason))
                .await;
        } else {
            self.hang_up(CallStatus::Failed, "engine_hangup", Some(failure_reason))
                .await;
        }
    }

    /// BYE (answered) and finish.
    pub(super) async fn hang_up(
        &mut self,
        status: CallStatus,
        cause: &str,
        failure_reason: Option<&str>,
    ) {
        if let Some(dialog) = self.dialog.as_mut() {
            let bye = dialog.bye(
                &self.invite.local.ip().to_string(),
                self.invite.local.port(),
                self.invite.from.transport,
            );
            let _ = self.endpoint.cast(SipMsg::SendRequest {
                request: bye,
                to: self.invite.from,
                call_id: self.call_id.clone(),
            });
            self.note("sip.sent", json!({"method": "BYE"}));
        }
        self.finish(status, Some(cause), failure_reason).await;
    }

    /// Free the media, write the end (rated, debited, event queued), leave.
    pub(super) async fn finish(
        &mut self,
        status: CallStatus,
        hangup_cause: Option<&str>,
        failure_reason: Option<&str>,
    ) {
        if self.phase == Phase::Ended {
            return;
        }
        self.phase = Phase::Ended;
        verbs::recording_interrupted(self).await;
        verbs::dial_interrupted(self);
        verbs::streams_call_ended(self);
        self.end_legs(hangup_cause.unwrap_or("engine_hangup"));
        if let Some(port) = self.rtp.take() {
            self.deps.media.close(port.id);
        }
        self.note(
            "call.ended",
            json!({"status": status.as_str(), "hangup_cause": hangup_cause, "failure_reason": failure_reason}),
        );
        let end = CallEnded {
            call_id: self.call_id.clone(),
            status,
            ended_at: self.now(),
            hangup_cause: hangup_cause.map(str::to_owned),
            failure_reason: failure_reason.map(str::to_owned),
            sip_status: self.sip_status,
            timeline: std::mem::take(&mut self.timeline),
        };
        // The end carries the money: retry a failing database a few times, then hand the end
        // to Calls, which keeps writing it until it is written.
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=4 {
            match self.deps.store.call_ended(end.clone()).await {
                Ok(charged) => {
                    info!(call_id = %self.call_id, status = status.as_str(), duration_seconds = charged.duration_seconds, cost_minor = charged.cost_minor, "call ended");
                    break;
                }
                Err(e) if attempt < 4 => {
                    warn!(call_id = %self.call_id, error = %e, attempt, "recording the end failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                }
                Err(e) => {
                    warn!(call_id = %self.call_id, error = %e, "recording the end failed");
                    super::end_later(&self.deps.calls, end.clone());
                }
            }
        }
        if let Some(answer) = self.answer_receipt.take() {
            // Queued before the end, so settled by now: only its failure is left to report.
            answered_committed(answer, &self.call_id).await;
        }
        for w in self.hangup_waiters.drain(..) {
            let _ = w.send(true);
        }
        self.leave();
    }

    /// The start's write failed but may have committed unseen: Calls ends the call if it did.
    fn end_if_started(&mut self) {
        let timeline = std::mem::take(&mut self.timeline);
        super::end_if_started(&self.deps.calls, self.call_id.clone(), self.now(), timeline);
    }

    /// Answered without a call row (unknown number, storage down): nothing to record.
    pub(super) fn stop_unrecorded(&mut self) {
        self.phase = Phase::Ended;
        self.leave();
    }

    fn leave(&mut self) {
        let _ = self.endpoint.cast(SipMsg::DialogEnded {
            sip_call_id: self.invite.sip_call_id.clone(),
        });
        for leg in &self.legs {
            let _ = self.endpoint.cast(SipMsg::DialogEnded {
                sip_call_id: leg.sip_call_id.clone(),
            });
        }
        self.myself.stop(None);
    }
}
