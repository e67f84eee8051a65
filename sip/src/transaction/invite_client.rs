//! INVITE client transaction: RFC 3261 §17.1.1 with RFC 6026 §7.2 (the "Accepted" state).

use super::{INVITE_CLIENT_LIMIT, Out, Peer, TIMER_D, Timers, TuEvent, TxKey, due, earliest};
use rsip::prelude::*;
use rsip::{Header, Request, Response};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Calling,
    Proceeding,
    /// 2xx received (RFC 6026): 2xx retransmissions go to the TU, which ACKs each one.
    Accepted,
    /// Non-2xx final received and ACKed: Timer D absorbs its retransmissions.
    Completed,
    Terminated,
}

pub(crate) struct InviteClient {
    state: State,
    peer: Peer,
    timers: Timers,
    request: Request,
    bytes: Vec<u8>,
    /// The ACK for a non-2xx final, kept to answer its retransmissions.
    ack: Option<Vec<u8>>,
    /// Timer A (unreliable transports only).
    retransmit_at: Option<Instant>,
    interval: Duration,
    /// Timer B while Calling, the Proceeding guard, then Timer M or D.
    end_at: Option<Instant>,
}

impl InviteClient {
    pub fn new(
        peer: Peer,
        timers: Timers,
        request: Request,
        bytes: Vec<u8>,
        now: Instant,
        out: &mut Out,
    ) -> Self {
        out.send(peer, bytes.clone());
        let unreliable = !peer.transport.is_reliable();
        Self {
            state: State::Calling,
            peer,
            timers,
            request,
            bytes,
            ack: None,
            retransmit_at: unreliable.then(|| now + timers.t1),
            interval: timers.t1,
            end_at: Some(now + timers.t1_64()),
        }
    }

    pub fn on_response(&mut self, key: &TxKey, response: Response, now: Instant, out: &mut Out) {
        let code = response.status_code.code();
        let event = |response| TuEvent::ResponseReceived {
            key: key.clone(),
            response,
        };
        match (self.state, code) {
            (State::Calling | State::Proceeding, 100..=199) => {
                if self.state == State::Calling {
                    self.state = State::Proceeding;
                    self.retransmit_at = None;
                    self.end_at = Some(now + INVITE_CLIENT_LIMIT);
                }
                out.event(event(response));
            }
            (State::Calling | State::Proceeding | State::Accepted, 200..=299) => {
                if self.state != State::Accepted {
                    self.state = State::Accepted;
                    self.retransmit_at = None;
                    // Timer M: how long 2xx retransmissions (and forked 2xx) are passed up.
                    self.end_at = Some(now + self.timers.t1_64());
                }
                out.event(event(response));
            }
            (State::Calling | State::Proceeding, 300..=699) => {
                let ack = to_bytes_ack(&self.request, &response);
                out.send(self.peer, ack.clone());
                self.ack = Some(ack);
                self.state = State::Completed;
                self.retransmit_at = None;
                // Timer D: 32 s on unreliable transports, zero on reliable ones.
                self.end_at = Some(if self.peer.transport.is_reliable() {
                    now
                } else {
                    now + TIMER_D
                });
                out.event(event(response));
            }
            (State::Completed, 300..=699) => {
                if let Some(ack) = &self.ack {
                    out.send(self.peer, ack.clone());
                }
            }
            _ => {}
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        earliest(self.retransmit_at, self.end_at)
    }

    pub fn on_timeout(&mut self, key: &TxKey, now: Instant, out: &mut Out) {
        if due(self.end_at, now) {
            if matches!(self.state, State::Calling | State::Proceeding) {
                // Timer B (or the Proceeding guard).
                out.event(TuEvent::ClientTimeout { key: key.clone() });
            }
            self.state = State::Terminated;
            self.retransmit_at = None;
            self.end_at = None;
            return;
        }
        if due(self.retransmit_at, now) {
            out.send(self.peer, self.bytes.clone());
            // Timer A doubles without a cap; Timer B ends it after 64·T1.
            self.interval *= 2;
            self.retransmit_at = Some(now + self.interval);
        }
    }

    pub fn is_terminated(&self) -> bool {
        self.state == State::Terminated
    }
}

/// The ACK for a non-2xx final (RFC 3261 §17.1.1.3): same Request-URI, top Via, From, Call-ID,
/// CSeq number and Route as the INVITE, To from the response.
fn to_bytes_ack(invite: &Request, response: &Response) -> Vec<u8> {
    let mut headers = rsip::Headers::default();
    if let Ok(via) = invite.via_header() {
        headers.push(Header::Via(via.clone()));
    }
    headers.push(Header::MaxForwards(70u32.into()));
    for h in invite.headers.iter() {
        match h {
            Header::From(_) | Header::CallId(_) | Header::Route(_) => headers.push(h.clone()),
            _ => {}
        }
    }
    if let Ok(to) = response.to_header() {
        headers.push(Header::To(to.clone()));
    }
    let seq = crate::message::cseq(invite).map_or(1, |(n, _)| n);
    headers.push(Header::CSeq(rsip::headers::CSeq::new(format!("{seq} ACK"))));
    crate::message::to_bytes(Request {
        method: rsip::Method::Ack,
        uri: invite.uri.clone(),
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    })
}
