//! A call's outbound legs: each a SIP client dialog (the INVITE we send, its answer, its BYE)
//! with an RTP port of its own on the caller's media thread, so the two can be bridged there
//! (DESIGN §8). Devices, `dial` and calls from the API all start legs this way.

use sautikit_sip::dialog::{self, Dialog, NewInvite};
use sautikit_sip::message::{self as sipmsg, response_to, with_body};
use sautikit_sip::rsip;
use sautikit_sip::rsip::headers::UntypedHeader;
use sautikit_sip::sdp;
use sautikit_sip::transaction::{Peer, Transport, TxKey};
use serde_json::json;
use tracing::{debug, warn};

use super::call::{CallMsg, CallState};
use crate::call_store::{CallAnswered, CallEnded, CallStarted, CallStatus, TimelineEntry};
use crate::media::{MediaEvent, RtpPort, StreamParams};
use crate::sip_endpoint::SipMsg;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LegState {
    /// INVITE sent, nothing heard yet.
    Calling,
    /// A provisional response came.
    Early,
    /// 2xx received and ACKed.
    Answered,
    Ended,
}

pub(super) struct Leg {
    /// What the timeline calls it (a device's credential label, a number).
    pub(super) label: String,
    pub(super) invite: rsip::Request,
    pub(super) sip_call_id: String,
    /// Where its requests go: the flow a device registered on, or the trunk.
    pub(super) target: Peer,
    pub(super) rtp: Option<RtpPort>,
    pub(super) state: LegState,
    pub(super) dialog: Option<Dialog>,
    /// The ACK of its 2xx, sent again for each 2xx retransmission.
    pub(super) ack: Option<rsip::Request>,
    /// Its final response code, once it has one.
    pub(super) final_code: Option<u16>,
    /// To be cancelled as soon as it answers provisionally (RFC 3261 §9.1: not before).
    pub(super) cancel_pending: bool,
    pub(super) cancelled: bool,
    /// What our SDP offered on it.
    pub(super) offer_sdp: String,
    /// The INVITE was sent again with credentials (a carrier's `401`/`407` is answered once).
    pub(super) authenticated: bool,
    /// A dialled party's own call record (`parent_call_id` = this call), billed at the number's
    /// outbound rate; `None` for a device rung by a number with no script.
    pub(super) record: Option<String>,
    /// That record's end is written (or on its way).
    pub(super) record_ended: bool,
    /// The record's prepaid reservation.
    pub(super) prepaid: Option<super::prepaid::Prepaid>,
}

impl CallState {
    /// The legs still on the wire, as Calls needs them to end them without this actor.
    pub(super) fn leg_snapshots(&self) -> Vec<super::LegSnapshot> {
        self.legs
            .iter()
            .filter(|l| l.state != LegState::Ended && !l.cancelled)
            .map(|l| super::LegSnapshot {
                sip_call_id: l.sip_call_id.clone(),
                target: l.target,
                invite: l.invite.clone(),
                dialog: (l.state == LegState::Answered)
                    .then(|| l.dialog.clone())
                    .flatten(),
                rtp_id: l.rtp.as_ref().map(|p| p.id),
                record_call_id: l.record.clone().filter(|_| !l.record_ended),
            })
            .collect()
    }

    /// Calls must know every leg on the wire, to end them all should this actor fail: tell it
    /// when a leg started, changed state or was sent again with credentials (a new INVITE to
    /// CANCEL). Called as soon as that happens, before anything that could fail.
    pub(super) fn report_legs(&mut self) {
        if !self.recorded || self.phase == super::call::Phase::Ended {
            return;
        }
        let now: Vec<(LegState, bool)> = self
            .legs
            .iter()
            .map(|l| {
                let state = if l.cancelled {
                    LegState::Ended
                } else {
                    l.state
                };
                (state, l.authenticated)
            })
            .collect();
        if now != self.legs_reported {
            self.legs_reported = now;
            self.snapshot();
        }
    }
}

/// Where a new leg goes.
pub(super) struct LegTarget {
    pub(super) label: String,
    /// The Request-URI.
    pub(super) uri: String,
    /// The To URI.
    pub(super) to: String,
    /// The From URI and display name.
    pub(super) from: String,
    pub(super) from_display: Option<String>,
    pub(super) peer: Peer,
    pub(super) extra: Vec<(&'static str, String)>,
    /// Give the leg a call record of its own (from, to), paid through the prepaid module.
    pub(super) record: Option<(String, String)>,
}

/// The RTP port a leg's offer names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LegPort {
    /// One of its own beside the caller's, bridged to it on answer (devices, `dial`).
    Own,
    /// The call's own port: the leg is the call's first party (a call placed through the API).
    Caller,
}

/// Why a leg was not placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LegRefusal {
    /// The wallet cannot pay its first slice.
    InsufficientFunds,
    /// Anything else: no port, a target we cannot write an INVITE to, storage.
    Failed(&'static str),
}

impl CallState {
    /// Open a port beside the caller's, offer it, and send the INVITE. The leg's responses come
    /// back as `LegResponse`.
    pub(super) async fn start_leg(&mut self, t: LegTarget) -> Result<u32, &'static str> {
        self.place_leg(t).await.map_err(|r| match r {
            LegRefusal::InsufficientFunds => "wallet.insufficient_funds",
            LegRefusal::Failed(reason) => reason,
        })
    }

    /// [`CallState::start_leg`], telling a wallet that cannot pay from other failures.
    pub(super) async fn place_leg(&mut self, t: LegTarget) -> Result<u32, LegRefusal> {
        self.place_leg_on(t, LegPort::Own, None).await
    }

    /// Place a leg whose offer names `port`, with `sip_call_id` as its Call-ID (a fresh one when
    /// `None`).
    pub(super) async fn place_leg_on(
        &mut self,
        t: LegTarget,
        port: LegPort,
        sip_call_id: Option<&str>,
    ) -> Result<u32, LegRefusal> {
        let n = u32::try_from(self.legs.len()).map_err(|_| LegRefusal::Failed("leg.too_many"))?;
        let caller = self
            .rtp
            .as_ref()
            .map(|p| (p.id, p.local.port()))
            .ok_or(LegRefusal::Failed("media.no_port"))?;
        let port = match port {
            LegPort::Caller => None,
            LegPort::Own => {
                let me = self.myself.clone();
                let events: crate::media::MediaEvents =
                    std::sync::Arc::new(move |event: MediaEvent| {
                        let _ = me.cast(CallMsg::LegMedia { leg: n, event });
                    });
                let opened = self
                    .deps
                    .media
                    .open_beside(caller.0, events)
                    .await
                    .map_err(|_| LegRefusal::Failed("media.no_port"))?;
                Some(opened)
            }
        };
        let close = |call: &CallState, port: &Option<RtpPort>| {
            if let Some(p) = port {
                call.deps.media.close(p.id);
            }
        };
        let local = self.invite.local;
        let session_id = u64::from(n) + 1_000 + u64::from(local.port());
        let offered = port.as_ref().map_or(caller.1, |p| p.local.port());
        let offer_sdp = sdp::offer(self.deps.media_ip, offered, session_id);
        let contact = self.our_contact(t.peer.transport);
        let extra: Vec<(&str, String)> = t.extra.iter().map(|(k, v)| (*k, v.clone())).collect();
        let Some(invite) = dialog::new_invite(&NewInvite {
            target: &t.uri,
            to: &t.to,
            from: &t.from,
            from_display: t.from_display.as_deref(),
            contact: &contact,
            via_host: &local.ip().to_string(),
            via_port: local.port(),
            transport: t.peer.transport,
            extra: &extra,
            sdp: &offer_sdp,
            call_id: sip_call_id,
        }) else {
            close(self, &port);
            return Err(LegRefusal::Failed("sip.bad_target"));
        };
        let Some(sip_call_id) = sipmsg::call_id(&invite) else {
            close(self, &port);
            return Err(LegRefusal::Failed("sip.bad_target"));
        };
        let (record, prepaid) = match &t.record {
            Some((from, to)) => match self.record_leg(&sip_call_id, from, to).await {
                Ok(paid) => paid,
                Err(refusal) => {
                    close(self, &port);
                    return Err(refusal);
                }
            },
            None => (None, None),
        };
        self.note(
            "sip.sent",
            json!({"leg": t.label, "method": "INVITE", "to": t.uri, "destination": t.peer.addr.to_string()}),
        );
        self.endpoint
            .cast(SipMsg::SendInvite {
                request: Box::new(invite.clone()),
                to: t.peer,
                call: self.myself.clone(),
                leg: n,
            })
            .map_err(|_| LegRefusal::Failed("sip.endpoint_gone"))?;
        self.legs.push(Leg {
            label: t.label,
            invite,
            sip_call_id,
            target: t.peer,
            rtp: port,
            state: LegState::Calling,
            dialog: None,
            ack: None,
            final_code: None,
            cancel_pending: false,
            cancelled: false,
            offer_sdp,
            authenticated: false,
            record,
            record_ended: false,
            prepaid,
        });
        self.report_legs();
        Ok(n)
    }

    /// Write a dialled party's call record and reserve its first slice. A wallet that cannot pay
    /// leaves the record `failed` (`wallet.insufficient_funds`) and the leg unplaced.
    async fn record_leg(
        &mut self,
        sip_call_id: &str,
        from: &str,
        to: &str,
    ) -> Result<(Option<String>, Option<super::prepaid::Prepaid>), LegRefusal> {
        let route = self.route_ref().clone();
        let call_id = uuid::Uuid::now_v7().to_string();
        let now = self.now();
        let started = CallStarted {
            call_id: call_id.clone(),
            workspace_id: route.workspace_id.clone(),
            number_id: route.number_id.clone(),
            direction: "outbound".into(),
            from: from.to_owned(),
            to: to.to_owned(),
            sip_call_id: sip_call_id.to_owned(),
            engine_id: self.deps.engine_id.clone(),
            started_at: now,
            timeline: vec![TimelineEntry {
                at: now,
                kind: "dial.leg".into(),
                detail: json!({"parent_call_id": self.call_id, "to": to}),
            }],
            parent_call_id: Some(self.call_id.clone()),
        };
        if let Err(e) = self.deps.store.call_started(started).await {
            warn!(call_id = %self.call_id, error = %e, "recording a dialled leg failed");
            // Its record may have committed unseen: Calls ends it if it did.
            super::end_if_started(&self.deps.calls, call_id, now, Vec::new());
            return Err(LegRefusal::Failed("engine.error"));
        }
        match self
            .reserve_first_slice(&call_id, &route.workspace_id, route.outbound_per_min_minor)
            .await
        {
            Ok(paid) => Ok((Some(call_id), paid)),
            Err(refusal) => {
                let (failure, result) = match refusal {
                    super::prepaid::PrepaidRefusal::InsufficientFunds => {
                        ("wallet.insufficient_funds", LegRefusal::InsufficientFunds)
                    }
                    super::prepaid::PrepaidRefusal::Storage => {
                        ("engine.error", LegRefusal::Failed("engine.error"))
                    }
                };
                write_leg_end(
                    self,
                    CallEnded {
                        call_id,
                        status: CallStatus::Failed,
                        ended_at: now,
                        hangup_cause: None,
                        failure_reason: Some(failure.into()),
                        sip_status: None,
                        timeline: Vec::new(),
                    },
                );
                Err(result)
            }
        }
    }

    /// End leg `n`'s call record (once): `status` and why. Answered legs are billed by the store
    /// from their answer; refused ones cost nothing.
    pub(super) fn end_leg_record(
        &mut self,
        n: u32,
        status: CallStatus,
        hangup_cause: Option<&str>,
        failure_reason: Option<&str>,
    ) {
        let now = self.now();
        let Some(leg) = self.legs.get_mut(n as usize) else {
            return;
        };
        if leg.record_ended {
            return;
        }
        let Some(call_id) = leg.record.clone() else {
            return;
        };
        leg.record_ended = true;
        leg.prepaid = None;
        let code = leg.final_code;
        write_leg_end(
            self,
            CallEnded {
                call_id,
                status,
                ended_at: now,
                hangup_cause: hangup_cause.map(str::to_owned),
                failure_reason: failure_reason.map(str::to_owned),
                // A party cancelled before it answered finally says 487.
                sip_status: code.or((status == CallStatus::Canceled).then_some(487)),
                timeline: vec![TimelineEntry {
                    at: now,
                    kind: "call.ended".into(),
                    detail: json!({"status": status.as_str(), "sip_status": code, "hangup_cause": hangup_cause}),
                }],
            },
        );
    }

    /// Leg `n` answered and is the one kept: its record is `answered` (billing runs from now).
    pub(super) fn leg_record_answered(&mut self, n: u32) {
        let Some(call_id) = self.legs.get(n as usize).and_then(|l| l.record.clone()) else {
            return;
        };
        let receipt = self.deps.store.queue_call_answered(CallAnswered {
            call_id: call_id.clone(),
            answered_at: self.now(),
            to: None,
            timeline: Vec::new(),
        });
        tokio::spawn(async move {
            if let Err(e) = receipt.await {
                warn!(call_id = %call_id, error = %e, "recording a dialled leg's answer failed");
            }
        });
    }

    /// Our Contact for requests and answers over `transport`.
    pub(super) fn our_contact(&self, transport: Transport) -> String {
        format!(
            "sip:{}@{}{}",
            self.to.trim_start_matches('+'),
            self.invite.local,
            if transport == Transport::Tcp {
                ";transport=tcp"
            } else {
                ""
            }
        )
    }

    /// Stop a leg that has not answered: CANCEL once it has answered provisionally.
    pub(super) fn cancel_leg(&mut self, n: u32) {
        let Some(leg) = self.legs.get_mut(n as usize) else {
            return;
        };
        match leg.state {
            LegState::Early if !leg.cancelled => {
                leg.cancelled = true;
                let cancel = sipmsg::cancel_for(&leg.invite);
                let label = leg.label.clone();
                let target = leg.target;
                let _ = self.endpoint.cast(SipMsg::SendRequest {
                    request: cancel,
                    to: target,
                    call_id: self.call_id.clone(),
                });
                self.note("sip.sent", json!({"leg": label, "method": "CANCEL"}));
            }
            LegState::Calling => leg.cancel_pending = true,
            _ => {}
        }
    }

    /// Hang up an answered leg.
    pub(super) fn bye_leg(&mut self, n: u32) {
        let local = self.invite.local;
        let Some(leg) = self.legs.get_mut(n as usize) else {
            return;
        };
        if leg.state != LegState::Answered {
            return;
        }
        leg.state = LegState::Ended;
        let transport = leg.target.transport;
        let target = leg.target;
        let label = leg.label.clone();
        if let Some(dialog) = leg.dialog.as_mut() {
            let bye = dialog.bye(&local.ip().to_string(), local.port(), transport);
            let _ = self.endpoint.cast(SipMsg::SendRequest {
                request: bye,
                to: target,
                call_id: self.call_id.clone(),
            });
            self.note("sip.sent", json!({"leg": label, "method": "BYE"}));
        }
        self.close_leg_media(n);
    }

    /// Leg `n`'s RTP port, while it has one.
    pub(super) fn leg_port(&self, n: u32) -> Option<u64> {
        self.legs.get(n as usize)?.rtp.as_ref().map(|p| p.id)
    }

    pub(super) fn close_leg_media(&mut self, n: u32) {
        if let Some(port) = self.legs.get_mut(n as usize).and_then(|l| l.rtp.take()) {
            self.deps.media.close(port.id);
        }
    }

    /// End every leg: BYE the answered, CANCEL the ringing (the call is ending, for
    /// `cause`). Their records end with them: answered ones `completed`, the others `canceled`.
    pub(super) fn end_legs(&mut self, cause: &str) {
        for n in 0..self.legs.len() as u32 {
            let state = self.legs.get(n as usize).map(|l| l.state);
            match state {
                Some(LegState::Answered) => {
                    self.bye_leg(n);
                    self.end_leg_record(n, CallStatus::Completed, Some(cause), None);
                }
                Some(LegState::Early) => self.cancel_leg(n),
                Some(LegState::Calling) => {
                    // No provisional yet: CANCEL all the same, as the call will not be here to
                    // send it later; a UA that has not seen the INVITE answers 481.
                    if let Some(leg) = self.legs.get_mut(n as usize) {
                        leg.state = LegState::Early;
                    }
                    self.cancel_leg(n);
                }
                _ => {}
            }
            self.end_leg_record(n, CallStatus::Canceled, Some(cause), None);
            self.close_leg_media(n);
        }
    }

    /// A response to a leg's INVITE. Returns the 2xx's negotiated stream when this is the first
    /// answer of a leg the call still wants.
    pub(super) fn on_leg_response(&mut self, n: u32, response: &rsip::Response) -> LegOutcome {
        let code = response.status_code.code();
        let local = self.invite.local;
        let media_ip = self.deps.media_ip;
        let Some(leg) = self.legs.get_mut(n as usize) else {
            return LegOutcome::Nothing;
        };
        if code == 100 {
            return LegOutcome::Nothing;
        }
        let label = leg.label.clone();
        if (200..300).contains(&code) && leg.state == LegState::Answered {
            // A retransmitted 2xx: our ACK was lost.
            if let Some(ack) = leg.ack.clone() {
                let _ = self.endpoint.cast(SipMsg::SendAck {
                    request: Box::new(ack),
                    to: leg.target,
                });
            }
            return LegOutcome::Nothing;
        }
        if leg.state == LegState::Ended {
            return LegOutcome::Nothing;
        }
        self.timeline_leg_response(&label, code, response);
        let Some(leg) = self.legs.get_mut(n as usize) else {
            return LegOutcome::Nothing;
        };
        if code < 200 {
            if leg.state == LegState::Calling {
                leg.state = LegState::Early;
                if leg.cancel_pending {
                    self.cancel_leg(n);
                }
            }
            // Early media (`183` with SDP): where the party's ringback or announcement comes from.
            let early = std::str::from_utf8(&response.body)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .and_then(|text| sdp::parse(text).ok())
                .and_then(|answer| sdp::answer(&answer, media_ip, 0, 0).ok())
                .and_then(|a| StreamParams::negotiated(&a));
            return LegOutcome::Ringing { code, early };
        }
        if matches!(code, 401 | 407) && !leg.authenticated && self.answer_challenge(n, response) {
            return LegOutcome::Nothing;
        }
        let Some(leg) = self.legs.get_mut(n as usize) else {
            return LegOutcome::Nothing;
        };
        if code >= 300 {
            leg.state = LegState::Ended;
            leg.final_code = Some(code);
            self.close_leg_media(n);
            return LegOutcome::Refused;
        }
        // 2xx: ACK it whatever we do with it next.
        let dialog = match Dialog::uac(&leg.invite, response) {
            Ok(d) => d,
            Err(e) => {
                warn!(call_id = %self.call_id, error = %e, "a leg's 2xx starts no dialog");
                leg.state = LegState::Ended;
                leg.final_code = Some(code);
                self.close_leg_media(n);
                return LegOutcome::Refused;
            }
        };
        let cseq = sipmsg::cseq(&leg.invite).map_or(1, |(c, _)| c);
        let ack = dialog.ack(
            cseq,
            &local.ip().to_string(),
            local.port(),
            leg.target.transport,
        );
        let _ = self.endpoint.cast(SipMsg::SendAck {
            request: Box::new(ack.clone()),
            to: leg.target,
        });
        leg.ack = Some(ack);
        leg.dialog = Some(dialog);
        leg.state = LegState::Answered;
        leg.final_code = Some(code);
        let wanted = !leg.cancelled && !leg.cancel_pending;
        let stream = std::str::from_utf8(&response.body)
            .ok()
            .and_then(|text| sdp::parse(text).ok())
            .and_then(|answer| sdp::answer(&answer, media_ip, 0, 0).ok());
        match (wanted, stream) {
            (true, Some(answer)) => match StreamParams::negotiated(&answer) {
                Some(stream) => LegOutcome::Answered(stream),
                None => {
                    debug!(call_id = %self.call_id, "leg answered with no RTP address");
                    self.bye_leg(n);
                    LegOutcome::Refused
                }
            },
            (true, None) => {
                self.note(
                    "sdp.rejected",
                    json!({"leg": label, "message": "the answer's SDP is not usable"}),
                );
                self.bye_leg(n);
                LegOutcome::Refused
            }
            (false, _) => {
                // Answered after we gave up on it (another leg won, the caller left).
                self.bye_leg(n);
                LegOutcome::Nothing
            }
        }
    }

    /// Send leg `n`'s INVITE again with our trunk credentials answering `response`'s challenge.
    /// False when there is nothing to answer it with.
    fn answer_challenge(&mut self, n: u32, response: &rsip::Response) -> bool {
        let Some(trunk) = self.deps.trunk.clone() else {
            return false;
        };
        let (Some(user), Some(password)) = (trunk.username, trunk.password) else {
            return false;
        };
        let proxy = response.status_code.code() == 407;
        let wanted = if proxy {
            "proxy-authenticate"
        } else {
            "www-authenticate"
        };
        // The first challenge we can answer (a carrier may offer SHA-256 and MD5).
        let challenges: Vec<String> = response
            .headers
            .iter()
            .filter_map(|h| {
                let text = h.to_string();
                let (name, value) = text.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case(wanted)
                    .then(|| value.trim().to_owned())
            })
            .collect();
        let Some(leg) = self.legs.get_mut(n as usize) else {
            return false;
        };
        let uri = leg.invite.uri.to_string();
        let cnonce = sipmsg::new_tag();
        let Some(authorization) = challenges.iter().find_map(|c| {
            sautikit_sip::auth::answer_challenge(c, "INVITE", &uri, &user, &password, &cnonce).ok()
        }) else {
            return false;
        };
        let mut invite = leg.invite.clone();
        let seq = sipmsg::cseq(&invite).map_or(1, |(c, _)| c) + 1;
        let local = self.invite.local;
        invite.headers.retain(|h| {
            !matches!(
                h,
                rsip::Header::Via(_)
                    | rsip::Header::CSeq(_)
                    | rsip::Header::Authorization(_)
                    | rsip::Header::ProxyAuthorization(_)
            )
        });
        let via = format!(
            "SIP/2.0/{} {}:{};branch={};rport",
            leg.target.transport.via_token(),
            local.ip(),
            local.port(),
            sipmsg::new_branch()
        );
        let mut headers = rsip::Headers::default();
        headers.push(rsip::Header::Via(rsip::headers::Via::new(via)));
        for h in invite.headers.iter() {
            headers.push(h.clone());
        }
        headers.push(rsip::Header::CSeq(rsip::headers::CSeq::new(format!(
            "{seq} INVITE"
        ))));
        headers.push(if proxy {
            rsip::Header::ProxyAuthorization(rsip::headers::ProxyAuthorization::new(authorization))
        } else {
            rsip::Header::Authorization(rsip::headers::Authorization::new(authorization))
        });
        invite.headers = headers;
        leg.invite = invite.clone();
        leg.authenticated = true;
        leg.state = LegState::Calling;
        let target = leg.target;
        let label = leg.label.clone();
        self.note(
            "sip.sent",
            json!({"leg": label, "method": "INVITE", "authenticated": true}),
        );
        self.endpoint
            .cast(SipMsg::SendInvite {
                request: Box::new(invite),
                to: target,
                call: self.myself.clone(),
                leg: n,
            })
            .is_ok()
    }

    fn timeline_leg_response(&mut self, label: &str, code: u16, response: &rsip::Response) {
        self.note(
            "sip.received",
            json!({"leg": label, "status": code, "reason": sipmsg::reason_of(&response.status_code)}),
        );
    }

    /// Which leg a request's SIP Call-ID belongs to.
    pub(super) fn leg_of(&self, request: &rsip::Request) -> Option<u32> {
        let id = sipmsg::call_id(request)?;
        self.legs
            .iter()
            .position(|l| l.sip_call_id == id)
            .and_then(|n| u32::try_from(n).ok())
    }

    /// A request inside a leg's dialog: BYE ends the leg (and the call, if it was bridged);
    /// a re-INVITE (hold, refresh) is answered without touching the other leg.
    pub(super) async fn on_leg_request(&mut self, n: u32, key: TxKey, request: rsip::Request) {
        let media_ip = self.deps.media_ip;
        let caller_port = self.rtp.as_ref().map_or(0, |p| p.local.port());
        let Some(leg) = self.legs.get_mut(n as usize) else {
            return;
        };
        let label = leg.label.clone();
        let method = request.method;
        let answered = leg.state == LegState::Answered;
        let (code, body) = match method {
            rsip::Method::Bye if answered => (200, None),
            rsip::Method::Info | rsip::Method::Options if answered => (200, None),
            rsip::Method::Invite if answered => {
                let port = leg.rtp.as_ref().map_or(caller_port, |p| p.local.port());
                let sdp = std::str::from_utf8(&request.body)
                    .ok()
                    .filter(|t| !t.trim().is_empty())
                    .and_then(|t| sdp::parse(t).ok())
                    .and_then(|offer| {
                        sdp::answer(&offer, media_ip, port, 2_000 + u64::from(n)).ok()
                    })
                    .map(|a| a.sdp)
                    .unwrap_or_else(|| leg.offer_sdp.clone());
                (200, Some(sdp))
            }
            _ => (481, None),
        };
        let tag = leg
            .dialog
            .as_ref()
            .map(|d| d.local_tag.clone())
            .unwrap_or_else(sipmsg::new_tag);
        let mut response = response_to(&request, code, None, Some(&tag));
        if let Some(sdp) = body {
            response = with_body(response, "application/sdp", sdp.into_bytes());
        }
        let _ = self.endpoint.cast(SipMsg::Respond {
            key,
            response,
            outside: None,
        });
        self.note(
            "sip.received",
            json!({"leg": label, "method": method.to_string()}),
        );
        self.note(
            "sip.sent",
            json!({"leg": label, "status": code, "method": method.to_string()}),
        );
        if method == rsip::Method::Bye && code == 200 {
            if let Some(leg) = self.legs.get_mut(n as usize) {
                leg.state = LegState::Ended;
            }
            self.end_leg_record(n, CallStatus::Completed, Some("callee_hangup"), None);
            self.close_leg_media(n);
            self.leg_hung_up(n).await;
        }
    }
}

/// What a leg's response means for its call.
pub(super) enum LegOutcome {
    Nothing,
    /// A provisional response (`code`), with the party's early media if it offered some.
    Ringing {
        code: u16,
        early: Option<StreamParams>,
    },
    /// The leg answered with this stream.
    Answered(StreamParams),
    /// A final refusal, or an answer we could not use.
    Refused,
}

/// Write a leg's end off the actor; one the database refuses goes to Calls, which writes it
/// again until it is written (it carries the charge and frees the reservation).
fn write_leg_end(call: &CallState, end: CallEnded) {
    let store = call.deps.store.clone();
    let calls = call.deps.calls.clone();
    tokio::spawn(async move {
        if let Err(e) = store.call_ended(end.clone()).await {
            warn!(call_id = %end.call_id, error = %e, "recording a dialled leg's end failed");
            super::end_later(&calls, end);
        }
    });
}
