//! The persistence boundary for calls (DESIGN §3–§6). The service implements it with sqlx; tests
//! may implement it in memory. Every method is one database transaction: when it returns `Ok`,
//! the change (the call row, its timeline entries, its lifecycle event in the outbox and, at the
//! end, its ledger entry) is committed together.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::model::NumberStatus;
use crate::store::StorageError;

/// What the engine needs to route an INVITE for a number and to sign its callbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberRoute {
    pub number_id: String,
    pub workspace_id: String,
    /// E.164 with `+`.
    pub number: String,
    pub status: NumberStatus,
    pub voice_callback_url: Option<String>,
    pub events_url: Option<String>,
    pub inbound_per_min_minor: i64,
    pub outbound_per_min_minor: i64,
    pub currency: String,
    /// The workspace's current webhook signing secret (`whsec_…`); voice callbacks are signed
    /// with it exactly like events.
    pub webhook_secret: String,
}

/// Call statuses (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallStatus {
    Ringing,
    Answered,
    Completed,
    Failed,
    Busy,
    NoAnswer,
    Canceled,
}

impl CallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Ringing => "ringing",
            CallStatus::Answered => "answered",
            CallStatus::Completed => "completed",
            CallStatus::Failed => "failed",
            CallStatus::Busy => "busy",
            CallStatus::NoAnswer => "no_answer",
            CallStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ringing" => CallStatus::Ringing,
            "answered" => CallStatus::Answered,
            "completed" => CallStatus::Completed,
            "failed" => CallStatus::Failed,
            "busy" => CallStatus::Busy,
            "no_answer" => CallStatus::NoAnswer,
            "canceled" => CallStatus::Canceled,
            _ => return None,
        })
    }

    /// Completed, failed, busy, no_answer and canceled are final.
    pub fn is_final(self) -> bool {
        !matches!(self, CallStatus::Ringing | CallStatus::Answered)
    }
}

/// One line of a call's timeline (`GET /v1/calls/{id}/events`): SIP messages in and out,
/// callbacks with latency and outcome, actions started and finished.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineEntry {
    pub at: DateTime<Utc>,
    /// `sip.received`, `sip.sent`, `callback.succeeded`, `callback.failed`, `action.started`,
    /// `action.finished`, `call.status` …
    pub kind: String,
    /// Kind-specific detail, e.g. `{"method":"INVITE"}`, `{"status":200,"reason":"OK"}`,
    /// `{"url":…,"status_code":200,"latency_ms":12}`, `{"verb":"pause","index":0}`.
    pub detail: Value,
}

/// A new inbound (or later outbound) call, written `ringing` with `call.started`.
#[derive(Debug, Clone)]
pub struct CallStarted {
    pub call_id: String,
    pub workspace_id: String,
    pub number_id: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    pub from: String,
    pub to: String,
    /// The SIP Call-ID of the carrier leg.
    pub sip_call_id: String,
    /// The engine process that holds the call live (see `CallStore::close_orphaned_calls`).
    pub engine_id: String,
    pub started_at: DateTime<Utc>,
    pub timeline: Vec<TimelineEntry>,
    /// For a dialled party's leg: the call that dialled it (same workspace).
    pub parent_call_id: Option<String>,
}

/// The call was answered (our 200 OK was ACKed): status `answered`, `call.answered`.
#[derive(Debug, Clone)]
pub struct CallAnswered {
    pub call_id: String,
    pub answered_at: DateTime<Utc>,
    /// The number that answered, when it is not the one recorded (a placed call ringing several).
    pub to: Option<String>,
    pub timeline: Vec<TimelineEntry>,
}

/// The call ended. The store rates it (answered calls only: per second from answer, at the
/// number's per-minute rate for its direction, `money::call_cost_minor`), debits the wallet in one
/// ledger entry (`call_charge`, reference = call id) when the cost is above zero, finalises the
/// row and queues `call.completed` (status completed) or `call.failed` (every other final status).
#[derive(Debug, Clone)]
pub struct CallEnded {
    pub call_id: String,
    /// A final status.
    pub status: CallStatus,
    pub ended_at: DateTime<Utc>,
    /// Why it ended, e.g. `caller_hangup`, `engine_hangup`, `api_hangup`, `ack_timeout`,
    /// `rejected`, `canceled`.
    pub hangup_cause: Option<String>,
    /// For failures: `callback.timeout`, `callback.http_status`, `callback.invalid_json`,
    /// `callback.invalid_actions`, `callback.unreachable`, `action.not_supported`,
    /// `engine.restart`, `engine.error` …
    pub failure_reason: Option<String>,
    /// The far end's final SIP code (an outbound call's callee), when there was one.
    pub sip_status: Option<u16>,
    pub timeline: Vec<TimelineEntry>,
}

/// What the store made of an ended call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallCharged {
    pub duration_seconds: i64,
    pub cost_minor: i64,
    pub currency: String,
}

/// A finished `record`: the WAV file is complete on disk; the store writes the `recordings` row,
/// the timeline and `call.recording.ready` together.
#[derive(Debug, Clone)]
pub struct RecordingReady {
    pub recording_id: String,
    pub call_id: String,
    /// Path of the WAV file relative to the data directory (e.g.
    /// `recordings/<call_id>/<recording_id>.wav`).
    pub path: String,
    pub duration_ms: u64,
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
    pub timeline: Vec<TimelineEntry>,
}

/// The result of a write queued by [`CallStore::queue_call_answered`], once it has committed.
pub type WriteReceipt =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StorageError>> + Send>>;

#[async_trait]
pub trait CallStore: Send + Sync + 'static {
    /// Record a finished recording of a call (row, timeline, `call.recording.ready` with
    /// `call_id, recording_id, duration_seconds, size_bytes, download_url`).
    async fn recording_ready(&self, recording: RecordingReady) -> Result<(), StorageError>;

    /// Whether the store can be reached, as far as it knows without asking: a new call is
    /// refused at once while it cannot.
    fn reachable(&self) -> bool {
        true
    }

    /// The live (not released) tenant number with this E.164 number (with `+`), if any.
    async fn route_by_number(&self, number: &str) -> Result<Option<NumberRoute>, StorageError>;

    /// The same by tenant number id (used to refresh a cached route).
    async fn route_by_id(&self, number_id: &str) -> Result<Option<NumberRoute>, StorageError>;

    /// Insert the call row (`ringing`), its timeline so far and `call.started`. A caller awaits it
    /// before writing anything else of the call: a store may commit starts apart from (and side
    /// by side with) other writes, and keeps each call's order only from that.
    async fn call_started(&self, call: CallStarted) -> Result<(), StorageError>;

    /// Mark it answered, append the timeline, queue `call.answered`.
    async fn call_answered(&self, call: CallAnswered) -> Result<(), StorageError> {
        self.queue_call_answered(call).await
    }

    /// The same, queued before this returns (behind the call's earlier queued writes, ahead of
    /// its later ones; its start has committed already) and committed in the background; the receipt gives the result. A call goes on
    /// while its answer commits: the BYE that follows an ACK at once is answered at once, and
    /// the call's media stops then rather than a commit later.
    fn queue_call_answered(&self, call: CallAnswered) -> WriteReceipt;

    /// Finalise, rate and debit, append the timeline, queue `call.completed` or `call.failed`.
    /// Idempotent: a call that is already final is left alone and its charge returned.
    async fn call_ended(&self, call: CallEnded) -> Result<CallCharged, StorageError>;

    /// End a call whose start was written but not confirmed: the write failed, yet it may have
    /// committed all the same (the connection died between the commit and its answer). As
    /// [`CallStore::call_ended`] when the row is there; `Ok(None)` when it is not, as the start
    /// never committed (and never will: the connection that carried it is gone).
    async fn call_ended_if_started(
        &self,
        call: CallEnded,
    ) -> Result<Option<CallCharged>, StorageError>;

    /// Append timeline entries of a live call between lifecycle changes.
    async fn append_timeline(
        &self,
        call_id: &str,
        entries: Vec<TimelineEntry>,
    ) -> Result<(), StorageError>;

    /// Reserve up to `want_minor` more of the workspace's balance for the live call `call_id`, if
    /// at least `at_least_minor` of it is free (its balance less every open reservation of the
    /// wallet, so concurrent calls share it). Returns the call's whole reservation afterwards, or
    /// `None` when nothing was reserved (too little free, or the call is no longer live). The
    /// reservation ends with the call: [`CallStore::call_ended`] releases it in the transaction
    /// that charges the call, never more than was reserved.
    async fn reserve(
        &self,
        call_id: &str,
        workspace_id: &str,
        want_minor: i64,
        at_least_minor: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, StorageError>;

    /// Record that engine process `engine_id` is alive at `now` (called every few seconds).
    async fn engine_heartbeat(
        &self,
        engine_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StorageError>;

    /// Calls still `ringing` or `answered` whose engine is not `this_engine` and whose engine's
    /// last heartbeat is older than `stale_before` (or that engine never beat) were live in a
    /// process that died: close each as `failed` with `failure_reason: "engine.restart"` (rated
    /// if it had been answered, up to `now`), with its `call.failed` event and a timeline entry.
    /// Called at start (SQLite passes `stale_before = now`: one process owns the file) and then
    /// periodically. Returns how many were closed.
    async fn close_orphaned_calls(
        &self,
        now: DateTime<Utc>,
        this_engine: &str,
        stale_before: DateTime<Utc>,
    ) -> Result<u64, StorageError>;
}
