//! Non-INVITE client transaction: RFC 3261 §17.1.2.

use super::{Out, Peer, Timers, TuEvent, TxKey, due, earliest};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

pub(crate) struct NonInviteClient {
    state: State,
    peer: Peer,
    timers: Timers,
    request: Vec<u8>,
    /// Timer E (unreliable transports only).
    retransmit_at: Option<Instant>,
    interval: Duration,
    /// Timer F, then Timer K once Completed.
    end_at: Option<Instant>,
}

impl NonInviteClient {
    pub fn new(peer: Peer, timers: Timers, request: Vec<u8>, now: Instant, out: &mut Out) -> Self {
        out.send(peer, request.clone());
        let unreliable = !peer.transport.is_reliable();
        Self {
            state: State::Trying,
            peer,
            timers,
            request,
            retransmit_at: unreliable.then(|| now + timers.t1),
            interval: timers.t1,
            end_at: Some(now + timers.t1_64()),
        }
    }

    pub fn on_response(
        &mut self,
        key: &TxKey,
        response: rsip::Response,
        now: Instant,
        out: &mut Out,
    ) {
        let code = response.status_code.code();
        match (self.state, code) {
            (State::Trying | State::Proceeding, 100..=199) => {
                self.state = State::Proceeding;
                out.event(TuEvent::ResponseReceived {
                    key: key.clone(),
                    response,
                });
            }
            (State::Trying | State::Proceeding, 200..=699) => {
                self.state = State::Completed;
                self.retransmit_at = None;
                // Timer K: T4 to absorb response retransmissions, zero on reliable transports.
                self.end_at = Some(if self.peer.transport.is_reliable() {
                    now
                } else {
                    now + self.timers.t4
                });
                out.event(TuEvent::ResponseReceived {
                    key: key.clone(),
                    response,
                });
            }
            // Retransmissions of the final response, or nonsense status codes: absorbed.
            _ => {}
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        earliest(self.retransmit_at, self.end_at)
    }

    pub fn on_timeout(&mut self, key: &TxKey, now: Instant, out: &mut Out) {
        if due(self.end_at, now) {
            if self.state != State::Completed {
                // Timer F.
                out.event(TuEvent::ClientTimeout { key: key.clone() });
            }
            self.state = State::Terminated;
            self.retransmit_at = None;
            self.end_at = None;
            return;
        }
        if due(self.retransmit_at, now) {
            out.send(self.peer, self.request.clone());
            // Timer E doubles up to T2 while Trying; in Proceeding it stays at T2.
            self.interval = match self.state {
                State::Trying => (self.interval * 2).min(self.timers.t2),
                _ => self.timers.t2,
            };
            self.retransmit_at = Some(now + self.interval);
        }
    }

    pub fn is_terminated(&self) -> bool {
        self.state == State::Terminated
    }
}
