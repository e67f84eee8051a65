//! INVITE server transaction: RFC 3261 §17.2.1 with RFC 6026 §7.1 (the "Accepted" state).

use super::{INVITE_SERVER_LIMIT, Out, Peer, Timers, TuEvent, TxError, TxKey, due, earliest};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Proceeding,
    /// 2xx sent (RFC 6026): retransmit it until the ACK, absorb INVITE retransmissions.
    Accepted {
        acked: bool,
    },
    /// Non-2xx final sent: Timer G retransmits it, Timer H gives up waiting for the ACK.
    Completed,
    /// ACK for the non-2xx received: Timer I absorbs ACK retransmissions.
    Confirmed,
    Terminated,
}

pub(crate) struct InviteServer {
    state: State,
    peer: Peer,
    timers: Timers,
    last_response: Vec<u8>,
    /// Timer G (and the 2xx retransmission of RFC 3261 §13.3.1.4, which follows the same rule).
    retransmit_at: Option<Instant>,
    interval: Duration,
    /// Timer H, I or L, or the TU-response guard while Proceeding.
    end_at: Option<Instant>,
}

impl InviteServer {
    /// Creates the transaction and sends `trying` (a `100 Trying`) at once: we always answer the
    /// INVITE with a final response later than 200 ms, so RFC 3261 §17.2.1 wants it.
    pub fn new(peer: Peer, timers: Timers, trying: Vec<u8>, now: Instant, out: &mut Out) -> Self {
        out.send(peer, trying.clone());
        Self {
            state: State::Proceeding,
            peer,
            timers,
            last_response: trying,
            retransmit_at: None,
            interval: timers.t1,
            end_at: Some(now + INVITE_SERVER_LIMIT),
        }
    }

    pub fn has_final(&self) -> bool {
        !matches!(self.state, State::Proceeding)
    }

    /// A retransmission of the INVITE: answer with the last response (Confirmed absorbs it).
    pub fn on_invite_retransmit(&mut self, out: &mut Out) {
        match self.state {
            State::Proceeding | State::Completed | State::Accepted { .. } => {
                out.send(self.peer, self.last_response.clone())
            }
            State::Confirmed | State::Terminated => {}
        }
    }

    /// An ACK matched this transaction. Returns `true` when it acknowledges our 2xx (then it
    /// belongs to the TU), `false` when the transaction absorbed it.
    pub fn on_ack(&mut self, now: Instant) -> bool {
        match self.state {
            State::Completed => {
                self.state = State::Confirmed;
                self.retransmit_at = None;
                // Timer I: T4 to absorb ACK retransmissions, zero on reliable transports.
                self.end_at = Some(if self.peer.transport.is_reliable() {
                    now
                } else {
                    now + self.timers.t4
                });
                false
            }
            State::Accepted { .. } => {
                // Keep absorbing INVITE retransmissions until Timer L, but stop the 2xx resends.
                self.state = State::Accepted { acked: true };
                self.retransmit_at = None;
                true
            }
            State::Proceeding | State::Confirmed | State::Terminated => false,
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
        if self.state != State::Proceeding {
            return Err(TxError::FinalAlreadySent);
        }
        out.send(self.peer, bytes.clone());
        self.last_response = bytes;
        let unreliable = !self.peer.transport.is_reliable();
        match code {
            100..=199 => {}
            200..=299 => {
                self.state = State::Accepted { acked: false };
                self.interval = self.timers.t1;
                self.retransmit_at = unreliable.then(|| now + self.interval);
                // Timer L (RFC 6026); expiring without an ACK is our Timer H → AckTimeout.
                self.end_at = Some(now + self.timers.t1_64());
            }
            _ => {
                self.state = State::Completed;
                self.interval = self.timers.t1;
                self.retransmit_at = unreliable.then(|| now + self.interval);
                self.end_at = Some(now + self.timers.t1_64());
            }
        }
        Ok(())
    }

    pub fn deadline(&self) -> Option<Instant> {
        earliest(self.retransmit_at, self.end_at)
    }

    pub fn on_timeout(&mut self, key: &TxKey, now: Instant, out: &mut Out) {
        if due(self.end_at, now) {
            match self.state {
                State::Accepted { acked: false } => {
                    tracing::debug!(?key, "2xx never acknowledged (Timer H)");
                    out.event(TuEvent::AckTimeout { key: key.clone() });
                }
                State::Completed => tracing::debug!(?key, "non-2xx never acknowledged (Timer H)"),
                State::Proceeding => {
                    tracing::warn!(?key, "TU never answered the INVITE; dropping transaction")
                }
                _ => {}
            }
            self.state = State::Terminated;
            self.retransmit_at = None;
            self.end_at = None;
            return;
        }
        if due(self.retransmit_at, now) {
            out.send(self.peer, self.last_response.clone());
            self.interval = (self.interval * 2).min(self.timers.t2);
            self.retransmit_at = Some(now + self.interval);
        }
    }

    pub fn is_terminated(&self) -> bool {
        self.state == State::Terminated
    }
}
