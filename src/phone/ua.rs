//! The signalling of one call placed the way a carrier places it: INVITE, ACK, BYE or CANCEL,
//! over the sans-IO transaction layer. Time comes in; datagrams and events come out.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use sautikit_sip::dialog::{Dialog, NewInvite, new_invite};
use sautikit_sip::message::{self as sipmsg, reason_of, response_to};
use sautikit_sip::rsip;
use sautikit_sip::rsip::{Method, Request, Response};
use sautikit_sip::transaction::{
    Peer, Timers, TransactionLayer, Transmit, Transport, TuEvent, TxKey,
};

/// What the call is: where it goes and who it says it is from.
#[derive(Debug, Clone)]
pub struct CallPlan {
    /// The engine's SIP address; every request of the call goes there.
    pub server: SocketAddr,
    pub transport: Transport,
    /// The Request-URI and To: `sip:+2547…@host:port`.
    pub target: String,
    /// The From URI: `sip:+2547…@our-address`.
    pub from: String,
    /// Our address as the engine reaches it (Via and Contact).
    pub local: SocketAddr,
    pub sdp_offer: String,
}

/// Who ended the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    Us,
    Them,
}

/// What happened to the call, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// A provisional response (`180 Ringing`, `183 Session Progress`).
    Progress { code: u16, reason: String },
    /// `2xx`: the call is up. `call_id` is the engine's id of the call, when it sent one.
    Answered {
        code: u16,
        call_id: Option<String>,
        sdp: String,
    },
    /// A final response other than `2xx` (or a CANCEL's `487`).
    Refused {
        code: u16,
        reason: String,
        call_id: Option<String>,
    },
    /// No final response to the INVITE in time (Timer B).
    NoAnswer,
    /// A BYE ended the call.
    Ended { by: Party },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Inviting,
    Cancelling,
    Up,
    Closing,
    Over,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("not a SIP URI: {0}")]
    BadUri(String),
    #[error("the INVITE could not be sent: {0:?}")]
    Send(sautikit_sip::transaction::TxError),
}

/// One outgoing call's SIP side.
pub struct PhoneCall {
    layer: TransactionLayer,
    peer: Peer,
    local: SocketAddr,
    invite: Request,
    invite_key: TxKey,
    dialog: Option<Dialog>,
    /// The ACK for the answer, sent again for each retransmitted `2xx`.
    ack: Option<Request>,
    bye: Option<TxKey>,
    phase: Phase,
    events: VecDeque<CallEvent>,
}

impl PhoneCall {
    /// Send the INVITE.
    pub fn start(plan: &CallPlan, now: Instant) -> Result<PhoneCall, PlanError> {
        let contact = format!(
            "sip:phone@{}{}",
            plan.local,
            if plan.transport == Transport::Tcp {
                ";transport=tcp"
            } else {
                ""
            }
        );
        let via_host = plan.local.ip().to_string();
        let invite = new_invite(&NewInvite {
            target: &plan.target,
            to: &plan.target,
            from: &plan.from,
            from_display: None,
            contact: &contact,
            via_host: &via_host,
            via_port: plan.local.port(),
            transport: plan.transport,
            extra: &[("User-Agent", "sautikit-phone".to_owned())],
            sdp: &plan.sdp_offer,
            call_id: None,
        })
        .ok_or_else(|| PlanError::BadUri(plan.target.clone()))?;
        let peer = Peer {
            addr: plan.server,
            transport: plan.transport,
        };
        let mut layer = TransactionLayer::new(Timers::default());
        let invite_key = layer
            .send_request(invite.clone(), peer, now)
            .map_err(PlanError::Send)?;
        Ok(PhoneCall {
            layer,
            peer,
            local: plan.local,
            invite,
            invite_key,
            dialog: None,
            ack: None,
            bye: None,
            phase: Phase::Inviting,
            events: VecDeque::new(),
        })
    }

    /// The SIP Call-ID of the call.
    pub fn sip_call_id(&self) -> String {
        sipmsg::call_id(&self.invite).unwrap_or_default()
    }

    /// A message from the engine.
    pub fn handle_message(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) {
        let from = Peer {
            addr: from,
            transport: self.peer.transport,
        };
        self.layer.handle_datagram(bytes, from, now);
        self.drain(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.layer.handle_timeout(now);
        self.drain(now);
    }

    /// Hang up: CANCEL while the call is being set up, BYE once it is up.
    pub fn hang_up(&mut self, now: Instant) {
        match self.phase {
            Phase::Inviting => {
                let cancel = sipmsg::cancel_for(&self.invite);
                if self.layer.send_request(cancel, self.peer, now).is_ok() {
                    self.phase = Phase::Cancelling;
                }
            }
            Phase::Up => self.send_bye(now),
            Phase::Cancelling | Phase::Closing | Phase::Over => {}
        }
        self.drain(now);
    }

    /// Whether the call is over (its last events may still be waiting to be polled).
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.layer.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<CallEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.layer.poll_timeout()
    }

    fn drain(&mut self, now: Instant) {
        while let Some(event) = self.layer.poll_event() {
            match event {
                TuEvent::ResponseReceived { key, response } => {
                    if key == self.invite_key {
                        self.on_invite_response(&response, now);
                    } else if Some(&key) == self.bye.as_ref() && response.status_code.code() >= 200
                    {
                        self.end(Party::Us);
                    }
                }
                TuEvent::RequestReceived { key, request, .. } => {
                    self.on_request(&key, &request, now);
                }
                TuEvent::ClientTimeout { key } => {
                    if key == self.invite_key && matches!(self.phase, Phase::Inviting) {
                        self.events.push_back(CallEvent::NoAnswer);
                        self.phase = Phase::Over;
                    } else if Some(&key) == self.bye.as_ref() {
                        self.end(Party::Us);
                    }
                }
                TuEvent::AckReceived { .. }
                | TuEvent::CancelReceived { .. }
                | TuEvent::AckTimeout { .. } => {}
            }
        }
    }

    fn on_invite_response(&mut self, response: &Response, now: Instant) {
        let code = response.status_code.code();
        let call_id = header_value(response, sautikit_actors::calls::CALL_ID_HEADER);
        match code {
            100 => {}
            101..=199 => {
                if self.phase == Phase::Inviting {
                    self.events.push_back(CallEvent::Progress {
                        code,
                        reason: reason_of(&response.status_code),
                    });
                }
            }
            200..=299 => {
                if let Some(ack) = &self.ack {
                    // A retransmitted 2xx: our ACK was lost.
                    self.layer.send_ack(ack.clone(), self.peer);
                    return;
                }
                let Ok(mut dialog) = Dialog::uac(&self.invite, response) else {
                    return;
                };
                let cseq = sipmsg::cseq(&self.invite).map_or(1, |(n, _)| n);
                let host = self.local.ip().to_string();
                let ack = dialog.ack(cseq, &host, self.local.port(), self.peer.transport);
                self.layer.send_ack(ack.clone(), self.peer);
                self.ack = Some(ack);
                dialog.local_cseq = dialog.local_cseq.max(cseq);
                self.dialog = Some(dialog);
                let sdp = String::from_utf8_lossy(&response.body).into_owned();
                self.events
                    .push_back(CallEvent::Answered { code, call_id, sdp });
                let cancelled = self.phase == Phase::Cancelling;
                self.phase = Phase::Up;
                if cancelled {
                    // The answer crossed our CANCEL: the call is up, so it ends with a BYE.
                    self.send_bye(now);
                }
            }
            _ => {
                if matches!(self.phase, Phase::Inviting | Phase::Cancelling) {
                    self.events.push_back(CallEvent::Refused {
                        code,
                        reason: reason_of(&response.status_code),
                        call_id,
                    });
                    self.phase = Phase::Over;
                }
            }
        }
    }

    fn send_bye(&mut self, now: Instant) {
        if let Some(dialog) = self.dialog.as_mut() {
            let host = self.local.ip().to_string();
            let bye = dialog.bye(&host, self.local.port(), self.peer.transport);
            if let Ok(key) = self.layer.send_request(bye, self.peer, now) {
                self.bye = Some(key);
                self.phase = Phase::Closing;
            }
        }
    }

    fn on_request(&mut self, key: &TxKey, request: &Request, now: Instant) {
        let in_dialog = self.dialog.as_ref().is_some_and(|d| d.matches(request));
        let code = match request.method {
            Method::Bye if in_dialog => 200,
            Method::Bye => 481,
            // Keepalives and in-dialog INFO (keys sent that way) are simply accepted.
            Method::Options | Method::Info if in_dialog || request.method == Method::Options => 200,
            // A re-INVITE (a session refresh) keeps the media as it is.
            Method::Invite if in_dialog => 488,
            _ => 501,
        };
        let response = response_to(request, code, None, None);
        let _ = self.layer.respond(key, response, now);
        if request.method == Method::Bye && in_dialog {
            self.end(Party::Them);
        }
    }

    fn end(&mut self, by: Party) {
        if self.phase != Phase::Over {
            self.phase = Phase::Over;
            self.events.push_back(CallEvent::Ended { by });
        }
    }
}

fn header_value(response: &Response, name: &str) -> Option<String> {
    response.headers.iter().find_map(|h| match h {
        rsip::Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(v.trim().to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn plan() -> CallPlan {
        CallPlan {
            server: "127.0.0.1:5060".parse().unwrap(),
            transport: Transport::Udp,
            target: "sip:+254700000001@127.0.0.1:5060".into(),
            from: "sip:+254711000002@127.0.0.1:40000".into(),
            local: "127.0.0.1:40000".parse().unwrap(),
            sdp_offer: "v=0\r\n".into(),
        }
    }

    fn sent(call: &mut PhoneCall) -> Vec<String> {
        std::iter::from_fn(|| call.poll_transmit())
            .map(|t| String::from_utf8_lossy(&t.bytes).into_owned())
            .collect()
    }

    /// The engine's answer to the INVITE just sent.
    fn answer_to(invite: &str, code: u16, extra: &str) -> Vec<u8> {
        let Ok(rsip::SipMessage::Request(req)) = sipmsg::parse(invite.as_bytes()) else {
            panic!("an INVITE: {invite}");
        };
        let mut text = String::from_utf8(sipmsg::to_bytes(response_to(
            &req,
            code,
            None,
            Some("engine-tag"),
        )))
        .unwrap();
        let at = text.find("Content-Length").unwrap();
        text.insert_str(at, extra);
        text.into_bytes()
    }

    #[test]
    fn an_answered_call_is_acked_and_ends_with_the_engines_bye() {
        let t0 = Instant::now();
        let mut call = PhoneCall::start(&plan(), t0).unwrap();
        let out = sent(&mut call);
        assert_eq!(out.len(), 1);
        assert!(out[0].starts_with("INVITE sip:+254700000001@127.0.0.1:5060 SIP/2.0"));
        let server: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        call.handle_message(
            &answer_to(&out[0], 180, "X-Sautikit-Call-Id: call_1\r\n"),
            server,
            t0,
        );
        assert_eq!(
            call.poll_event(),
            Some(CallEvent::Progress {
                code: 180,
                reason: "Ringing".into()
            })
        );
        let ok = answer_to(
            &out[0],
            200,
            "Contact: <sip:engine@127.0.0.1:5060>\r\nX-Sautikit-Call-Id: call_1\r\n",
        );
        call.handle_message(&ok, server, t0);
        let Some(CallEvent::Answered { code, call_id, .. }) = call.poll_event() else {
            panic!("answered");
        };
        assert_eq!((code, call_id.as_deref()), (200, Some("call_1")));
        let acks = sent(&mut call);
        assert!(
            acks[0].starts_with("ACK sip:engine@127.0.0.1:5060"),
            "{acks:?}"
        );
        // A retransmitted 200 is ACKed again and is not a second answer.
        call.handle_message(&ok, server, t0 + Duration::from_millis(500));
        assert_eq!(sent(&mut call).len(), 1);
        assert_eq!(call.poll_event(), None);
        // The engine hangs up.
        let bye = format!(
            "BYE sip:phone@127.0.0.1:40000 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKbye1\r\n\
             From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n",
            header_line(&acks[0], "To"),
            header_line(&acks[0], "From"),
            call.sip_call_id()
        );
        call.handle_message(bye.as_bytes(), server, t0 + Duration::from_secs(3));
        assert!(sent(&mut call)[0].starts_with("SIP/2.0 200"));
        assert_eq!(
            call.poll_event(),
            Some(CallEvent::Ended { by: Party::Them })
        );
        assert!(call.is_over());
    }

    #[test]
    fn a_refusal_and_a_silent_engine_end_the_call() {
        let t0 = Instant::now();
        let server: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        let mut call = PhoneCall::start(&plan(), t0).unwrap();
        let out = sent(&mut call);
        call.handle_message(&answer_to(&out[0], 503, "Retry-After: 1\r\n"), server, t0);
        assert_eq!(
            call.poll_event(),
            Some(CallEvent::Refused {
                code: 503,
                reason: "Service Unavailable".into(),
                call_id: None
            })
        );
        assert!(
            sent(&mut call)[0].starts_with("ACK "),
            "the layer ACKs a non-2xx"
        );

        let mut call = PhoneCall::start(&plan(), t0).unwrap();
        let mut now = t0;
        while !call.is_over() {
            now = call.poll_timeout().expect("Timer A/B");
            call.handle_timeout(now);
        }
        assert_eq!(call.poll_event(), Some(CallEvent::NoAnswer));
        assert!(now - t0 >= Duration::from_secs(32));
    }

    fn header_line(msg: &str, name: &str) -> String {
        msg.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_default()
            .to_owned()
    }
}
