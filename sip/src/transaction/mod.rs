//! RFC 3261 §17 transactions (with the RFC 6026 "Accepted" states), one machine per file, and the
//! [`TransactionLayer`] that routes messages and timers to them.
//!
//! Each machine is sans-IO: it is fed messages and `now`, writes what to send and what to tell the
//! TU into an [`Out`], and reports its next deadline. The layer keeps the machines in a map and
//! their deadlines in a min-heap, so one timer tick costs O(log n) per due transaction.

mod invite_client;
mod invite_server;
mod layer;
mod non_invite_client;
mod non_invite_server;

pub use layer::{
    TransactionLayer, error_response, error_response_with, new_invite_identity, refuse_new_invite,
};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// Reliable transports carry no retransmissions and zero the "linger" timers I, J, K, D.
    pub fn is_reliable(self) -> bool {
        matches!(self, Transport::Tcp)
    }

    /// The token used in a Via header.
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub addr: SocketAddr,
    pub transport: Transport,
}

#[derive(Debug, Clone)]
pub struct Transmit {
    pub to: Peer,
    pub bytes: Vec<u8>,
}

/// Identifies a transaction: the Via branch, the method (ACK folded into INVITE, as RFC 3261
/// §17.2.3 matches it), and for server transactions the Via sent-by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxKey {
    branch: String,
    method: String,
    sent_by: String,
    server: bool,
}

impl TxKey {
    pub(crate) fn server(branch: &str, method: &rsip::Method, sent_by: &str) -> Self {
        Self {
            branch: branch.to_string(),
            method: key_method(method),
            sent_by: sent_by.to_string(),
            server: true,
        }
    }

    pub(crate) fn client(branch: &str, method: &rsip::Method) -> Self {
        Self {
            branch: branch.to_string(),
            method: key_method(method),
            sent_by: String::new(),
            server: false,
        }
    }

    pub fn branch(&self) -> &str {
        &self.branch
    }

    /// The transaction's method (INVITE for the ACK of a non-2xx).
    pub fn method(&self) -> Option<rsip::Method> {
        self.method.parse().ok()
    }

    pub fn is_server(&self) -> bool {
        self.server
    }
}

impl std::fmt::Display for TxKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = if self.server { "server" } else { "client" };
        write!(f, "{role} {} {}", self.method, self.branch)
    }
}

fn key_method(method: &rsip::Method) -> String {
    match method {
        rsip::Method::Ack => "INVITE".to_string(),
        m => m.to_string(),
    }
}

/// RFC 3261 timer base values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl Timers {
    /// 64·T1: Timers B, F, H, J, L, M.
    pub fn t1_64(&self) -> Duration {
        self.t1.saturating_mul(64)
    }
}

/// Timer D: at least 32 s on unreliable transports (RFC 3261 §17.1.1.2), independent of T1.
pub(crate) const TIMER_D: Duration = Duration::from_secs(32);

/// How long a server transaction may wait for the TU's final response before it is dropped. RFC
/// 3261 sets no limit, but without one a TU bug would leak memory; ringing longer than this is not
/// a real call.
pub(crate) const INVITE_SERVER_LIMIT: Duration = Duration::from_secs(6 * 60);

/// How long an INVITE client transaction waits in Proceeding for a final response before it
/// reports a timeout (the role Timer C plays in proxies, RFC 3261 §16.6).
pub(crate) const INVITE_CLIENT_LIMIT: Duration = Duration::from_secs(6 * 60);

#[derive(Clone)]
pub enum TuEvent {
    /// A new request (not a retransmission, not ACK, not CANCEL). For INVITE the layer has already
    /// sent `100 Trying`.
    RequestReceived {
        key: TxKey,
        request: rsip::Request,
        from: Peer,
    },
    /// An ACK for a 2xx (end-to-end, not part of the INVITE transaction); the layer stops
    /// retransmitting that 2xx. Retransmitted ACKs are reported again: the TU must be idempotent.
    AckReceived { request: rsip::Request, from: Peer },
    /// A CANCEL matched an INVITE server transaction still without a final response. The layer has
    /// already answered the CANCEL `200`; the TU should answer the INVITE `487`.
    CancelReceived { invite: TxKey, from: Peer },
    /// A response for a client transaction we started (provisional and final; for INVITE client
    /// also 2xx retransmissions, so the TU can re-ACK).
    ResponseReceived {
        key: TxKey,
        response: rsip::Response,
    },
    /// Timer B or F fired (or the transport failed) for a client transaction.
    ClientTimeout { key: TxKey },
    /// Timer H: our 2xx to an INVITE was never ACKed (the TU then sends BYE).
    AckTimeout { key: TxKey },
}

impl std::fmt::Debug for TuEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Requests and responses print as SIP text, which is what one wants to read in a log.
        match self {
            TuEvent::RequestReceived { key, request, from } => f
                .debug_struct("RequestReceived")
                .field("key", key)
                .field("method", &request.method)
                .field("from", from)
                .finish(),
            TuEvent::AckReceived { request, from } => f
                .debug_struct("AckReceived")
                .field("cseq", &crate::message::cseq(request))
                .field("from", from)
                .finish(),
            TuEvent::CancelReceived { invite, from } => f
                .debug_struct("CancelReceived")
                .field("invite", invite)
                .field("from", from)
                .finish(),
            TuEvent::ResponseReceived { key, response } => f
                .debug_struct("ResponseReceived")
                .field("key", key)
                .field("status", &response.status_code.code())
                .finish(),
            TuEvent::ClientTimeout { key } => {
                f.debug_struct("ClientTimeout").field("key", key).finish()
            }
            TuEvent::AckTimeout { key } => f.debug_struct("AckTimeout").field("key", key).finish(),
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TxError {
    #[error("no such transaction")]
    NotFound,
    #[error("not a server transaction")]
    NotServer,
    #[error("a final response was already sent")]
    FinalAlreadySent,
    #[error("invalid status code {0}")]
    InvalidStatus(u16),
    #[error("request has no top Via with an RFC 3261 branch")]
    MissingBranch,
    #[error("an ACK is not a transaction; use send_ack")]
    AckIsNotATransaction,
    #[error("a transaction with this branch and method already exists")]
    Duplicate,
}

/// What machines produce, drained by the layer's `poll_transmit` / `poll_event`.
#[derive(Default)]
pub(crate) struct Out {
    pub transmits: VecDeque<Transmit>,
    pub events: VecDeque<TuEvent>,
}

impl Out {
    pub fn send(&mut self, to: Peer, bytes: Vec<u8>) {
        self.transmits.push_back(Transmit { to, bytes });
    }

    pub fn event(&mut self, e: TuEvent) {
        self.events.push_back(e);
    }
}

/// Earliest of two optional deadlines.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Whether an optional deadline has passed.
pub(crate) fn due(at: Option<Instant>, now: Instant) -> bool {
    at.is_some_and(|t| t <= now)
}
