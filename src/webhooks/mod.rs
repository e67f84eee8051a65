//! Events and webhooks (DESIGN §6): event kinds and subscription patterns, the outbox written in
//! the same transaction as the change that causes an event, and the HTTP sender.

pub mod outbox;
pub mod sender;
pub mod subscriptions;

use chrono::{DateTime, Utc};
use sautikit_actors::store::StorageError;
use serde::Serialize;
use serde_json::Value;
use sqlx::AnyConnection;

use crate::db::Backend;
use crate::time::{new_id, to_api, to_db};

/// Kinds a workspace subscription may name. Call events go to the number's `events_url`.
pub const SUBSCRIBABLE_KINDS: &[&str] = &[
    "number.provisioned",
    "number.renewed",
    "number.suspended",
    "number.reactivated",
    "number.released",
    "wallet.top_up",
    "wallet.low_balance",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// `call.*` and call kinds are delivered to the number's `events_url`, not subscriptions.
    CallEvents(String),
    Unknown(String),
}

/// `*`, `number.*`, `wallet.*` or an exact subscribable kind.
pub fn validate_pattern(p: &str) -> Result<(), PatternError> {
    if p == "call.*" || p.starts_with("call.") {
        return Err(PatternError::CallEvents(p.to_owned()));
    }
    if p == "*" || p == "number.*" || p == "wallet.*" || SUBSCRIBABLE_KINDS.contains(&p) {
        Ok(())
    } else {
        Err(PatternError::Unknown(p.to_owned()))
    }
}

pub fn pattern_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix(".*") {
        _ if pattern == "*" => true,
        Some(prefix) => kind
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.')),
        None => pattern == kind,
    }
}

/// An event about to be written with the change that causes it.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub workspace_id: String,
    pub kind: &'static str,
    pub number_id: Option<String>,
    pub call_id: Option<String>,
    pub payload: Value,
    /// Where a call event goes instead of its number's `events_url` (a per-call override).
    pub events_url: Option<String>,
}

impl EventDraft {
    /// A `number.*` event of `number`, for the workspace's subscriptions.
    pub fn for_number(
        number: &sautikit_actors::model::TenantNumber,
        kind: &'static str,
        payload: Value,
    ) -> Self {
        EventDraft {
            workspace_id: number.workspace_id.clone(),
            kind,
            number_id: Some(number.id.clone()),
            call_id: None,
            payload,
            events_url: None,
        }
    }
}

/// The envelope every delivery of an event sends, byte for byte.
#[derive(Serialize)]
struct Envelope<'a> {
    event_id: &'a str,
    event_kind: &'a str,
    workspace_id: &'a str,
    occurred_at: String,
    payload: &'a Value,
}

/// What a delivery's order is kept within: per call for call events, per number for number
/// events, per workspace for wallet events.
pub(crate) fn subject(number_id: Option<&str>, call_id: Option<&str>) -> String {
    match (call_id, number_id) {
        (Some(call), _) => format!("call:{call}"),
        (None, Some(number)) => format!("number:{number}"),
        (None, None) => "wallet".to_owned(),
    }
}

macro_rules! insert_event {
    () => {
        "INSERT INTO events (id, workspace_id, event_kind, number_id, call_id, occurred_at, body, \
         events_url) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    };
}
/// What follows an event insert on PostgreSQL: the new rows also enter `event_queue` (0008), in
/// the same statement.
macro_rules! into_queue {
    () => {
        " RETURNING seq, id) INSERT INTO event_queue (seq, event_id) SELECT seq, id FROM e"
    };
}
const INSERT_EVENT_SQLITE: &str = insert_event!();
const INSERT_EVENT_POSTGRES: &str = concat!("WITH e AS (", insert_event!(), into_queue!());

fn queued_insert(backend: Backend, insert: &str) -> String {
    match backend {
        Backend::Sqlite => insert.to_owned(),
        Backend::Postgres => format!(concat!("WITH e AS ({}", into_queue!()), insert),
    }
}

/// Write the event into the outbox, inside the caller's transaction. Who receives it is decided
/// later, in batches, by the Events actor (`outbox::expand_events`): the transaction that makes
/// the change pays for one insert statement and nothing else (on PostgreSQL it also fills the
/// event's queue row).
pub async fn enqueue(
    conn: &mut AnyConnection,
    draft: &EventDraft,
    now: DateTime<Utc>,
) -> Result<(), StorageError> {
    let (event_id, body) = event_row(draft, now)?;
    let sql = match crate::db::backend_of(conn) {
        Backend::Sqlite => INSERT_EVENT_SQLITE,
        Backend::Postgres => INSERT_EVENT_POSTGRES,
    };
    sqlx::query(sql)
        .bind(&event_id)
        .bind(&draft.workspace_id)
        .bind(draft.kind)
        .bind(&draft.number_id)
        .bind(&draft.call_id)
        .bind(to_db(now))
        .bind(&body)
        .bind(&draft.events_url)
        .execute(&mut *conn)
        .await
        .map_err(|e| StorageError(e.to_string()))?;
    Ok(())
}

/// Events per multi-row INSERT, at most (8 values each).
const ENQUEUE_CHUNK: usize = 128;

/// Queue several events in the caller's transaction with multi-row INSERTs, in the given order
/// (their ids, and on PostgreSQL their `seq`, follow it), exactly as `enqueue` one by one would.
pub async fn enqueue_all(
    conn: &mut AnyConnection,
    backend: Backend,
    events: &[(EventDraft, DateTime<Utc>)],
) -> Result<(), StorageError> {
    for chunk in crate::sql::pow2_chunks(events, ENQUEUE_CHUNK) {
        let sql = queued_insert(
            backend,
            &format!(
                "INSERT INTO events (id, workspace_id, event_kind, number_id, call_id, \
                 occurred_at, body, events_url) VALUES {}",
                crate::sql::value_rows(backend, chunk.len(), 8)
            ),
        );
        // Safe: `sql` is built only from placeholders; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (draft, at) in chunk {
            let (event_id, body) = event_row(draft, *at)?;
            q = q
                .bind(event_id)
                .bind(draft.workspace_id.clone())
                .bind(draft.kind)
                .bind(draft.number_id.clone())
                .bind(draft.call_id.clone())
                .bind(to_db(*at))
                .bind(body)
                .bind(draft.events_url.clone());
        }
        q.execute(&mut *conn)
            .await
            .map_err(|e| StorageError(e.to_string()))?;
    }
    Ok(())
}

/// A new event's id and the envelope its deliveries send.
fn event_row(draft: &EventDraft, now: DateTime<Utc>) -> Result<(String, String), StorageError> {
    let event_id = new_id();
    let body = serde_json::to_string(&Envelope {
        event_id: &event_id,
        event_kind: draft.kind,
        workspace_id: &draft.workspace_id,
        occurred_at: to_api(now),
        payload: &draft.payload,
    })
    .map_err(|e| StorageError(e.to_string()))?;
    Ok((event_id, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "wallet.top_up"));
        assert!(pattern_matches("number.*", "number.released"));
        assert!(!pattern_matches("number.*", "numbers.x"));
        assert!(!pattern_matches("number.*", "wallet.top_up"));
        assert!(pattern_matches("wallet.low_balance", "wallet.low_balance"));
        assert!(!pattern_matches("wallet.low_balance", "wallet.top_up"));
        assert_eq!(
            validate_pattern("call.*"),
            Err(PatternError::CallEvents("call.*".into()))
        );
        assert!(matches!(
            validate_pattern("call.completed"),
            Err(PatternError::CallEvents(_))
        ));
        assert!(matches!(
            validate_pattern("number.foo"),
            Err(PatternError::Unknown(_))
        ));
        assert!(matches!(
            validate_pattern(""),
            Err(PatternError::Unknown(_))
        ));
        assert_eq!(validate_pattern("wallet.*"), Ok(()));
    }
}
