//! Non-INVITE server transaction: RFC 3261 §17.2.2.

use super::{Out, Peer, Timers, TxError, TxKey, due};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

pub(crate) struct NonInviteServer {
    state: State,
    peer: Peer,
    timers: Timers,
    last_response: Vec<u8>,
    /// Timer J once Completed; before that a guard of 64·T1 for a TU that never answers (the
    /// client gave up by then: Timer F).
    end_at: Option<Instant>,
}

impl NonInviteServer {
    pub fn new(peer: Peer, timers: Timers, now: Instant) -> Self {
        Self {
            state: State::Trying,
            peer,
            timers,
            last_response: Vec::new(),
            end_at: Some(now + timers.t1_64()),
        }
    }

    /// A retransmission of the request: Trying absorbs it, later states resend the last response.
    pub fn on_retransmit(&mut self, out: &mut Out) {
        match self.state {
            State::Proceeding | State::Completed => out.send(self.peer, self.last_response.clone()),
            State::Trying | State::Terminated => {}
        }
    }

    pub fn respond(
        &mut self,
        code: u16,
        bytes: Vec<u8>,
        now: Instant,
        out: &mut Out,
    ) -> Result<(), TxError> {
        if !(100..=699).contains(&code) {
            return Err(TxError::InvalidStatus(code));
        }
        if matches!(self.state, State::Completed | State::Terminated) {
            return Err(TxError::FinalAlreadySent);
        }
        out.send(self.peer, bytes.clone());
        self.last_response = bytes;
        if code >= 200 {
            self.state = State::Completed;
            // Timer J: 64·T1 to absorb retransmissions, zero on reliable transports.
            self.end_at = Some(if self.peer.transport.is_reliable() {
                now
            } else {
                now + self.timers.t1_64()
            });
        } else {
            self.state = State::Proceeding;
        }
        Ok(())
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.end_at
    }

    pub fn on_timeout(&mut self, key: &TxKey, now: Instant) {
        if due(self.end_at, now) {
            if self.state != State::Completed {
                tracing::warn!(?key, "TU never answered the request; dropping transaction");
            }
            self.state = State::Terminated;
            self.end_at = None;
        }
    }

    pub fn is_terminated(&self) -> bool {
        self.state == State::Terminated
    }
}
