//! Calls in the database (DESIGN §4–§6): `CallStore` for the call actors, and the reads behind
//! `GET /v1/calls…`. Each trait method is one transaction: the call row, its timeline, its
//! lifecycle event in the outbox and, at the end, its ledger entry commit together.
//!
//! Money at hangup: an answered call is rated per second (rounded up) at the rate its number had
//! for its direction when the call started (snapshotted on the row). The wallet is debited in the
//! same transaction with one `call_charge` ledger row. A balance never goes below zero: when the
//! wallet holds less than the cost, what it holds is taken and `cost_minor` records what was
//! actually charged; the shortfall is kept in `uncollected_minor` and in the timeline.

use crate::db::Backend;
use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use sautikit_actors::call_store::{
    CallAnswered, CallCharged, CallEnded, CallStarted, CallStatus, CallStore, NumberRoute,
    RecordingReady, TimelineEntry, WriteReceipt,
};
use sautikit_actors::model::{LedgerKind, NumberStatus};
use sautikit_actors::money;
use sautikit_actors::store::{IdempotencyMark, StorageError};
use serde_json::{Value, json};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

use crate::group_commit;
use crate::idempotency::mark_applied;
use crate::store::{SqlStore, after_debit, get, get_opt_time, get_time, storage};
use crate::time::{new_id, to_api, to_db};
use crate::webhooks::{EventDraft, enqueue};

macro_rules! call_cols {
    () => {
        "id, workspace_id, number_id, direction, from_number, to_number, status, sip_call_id, \
         engine_id, started_at, answered_at, ended_at, duration_seconds, hangup_cause, \
         failure_reason, cost_minor, uncollected_minor, currency, rate_per_min_minor, created_at, \
         updated_at, parent_call_id, origin, client_request_id, voice_callback_url, events_url, \
         sip_status"
    };
}

// After the macro: the set-wise group commit uses it too.
mod batch;

/// A call as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub id: String,
    pub workspace_id: String,
    pub number_id: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    pub from: String,
    pub to: String,
    pub status: CallStatus,
    pub sip_call_id: String,
    pub engine_id: String,
    pub started_at: DateTime<Utc>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_seconds: i64,
    pub hangup_cause: Option<String>,
    pub failure_reason: Option<String>,
    /// What was actually debited.
    pub cost_minor: i64,
    /// Rated cost the wallet could not pay (it is never taken below zero).
    pub uncollected_minor: i64,
    pub currency: String,
    pub rate_per_min_minor: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// For a dialled party's leg: the call that dialled it.
    pub parent_call_id: Option<String>,
    /// `sip` (an INVITE, a `dial`) or `api` (`POST /v1/calls`).
    pub origin: String,
    /// The customer's own id for a call placed through the API.
    pub client_request_id: Option<String>,
    /// Per-call overrides of the number's webhooks (calls placed through the API).
    pub voice_callback_url: Option<String>,
    pub events_url: Option<String>,
    /// The far end's final SIP code, once known.
    pub sip_status: Option<i64>,
}

impl CallRecord {
    fn charged(&self) -> CallCharged {
        CallCharged {
            duration_seconds: self.duration_seconds,
            cost_minor: self.cost_minor,
            currency: self.currency.clone(),
        }
    }
}

/// One stored timeline entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineRecord {
    pub id: String,
    pub call_id: String,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub detail: Value,
}

/// `GET /v1/calls` filters and page.
#[derive(Debug, Clone, Default)]
pub struct CallFilter {
    pub number_id: Option<String>,
    pub direction: Option<String>,
    pub status: Option<CallStatus>,
    /// Only the legs dialled by this call.
    pub parent_call_id: Option<String>,
    /// Calls strictly older (by id) than this one: the cursor.
    pub before_id: Option<String>,
    pub limit: i64,
}

fn call_from_row(row: &AnyRow) -> Result<CallRecord, StorageError> {
    let status: String = get(row, "status")?;
    Ok(CallRecord {
        id: get(row, "id")?,
        workspace_id: get(row, "workspace_id")?,
        number_id: get(row, "number_id")?,
        direction: get(row, "direction")?,
        from: get(row, "from_number")?,
        to: get(row, "to_number")?,
        status: CallStatus::parse(&status)
            .ok_or_else(|| StorageError(format!("unknown call status {status:?}")))?,
        sip_call_id: get(row, "sip_call_id")?,
        engine_id: get(row, "engine_id")?,
        started_at: get_time(row, "started_at")?,
        answered_at: get_opt_time(row, "answered_at")?,
        ended_at: get_opt_time(row, "ended_at")?,
        duration_seconds: get(row, "duration_seconds")?,
        hangup_cause: get(row, "hangup_cause")?,
        failure_reason: get(row, "failure_reason")?,
        cost_minor: get(row, "cost_minor")?,
        uncollected_minor: get(row, "uncollected_minor")?,
        currency: get(row, "currency")?,
        rate_per_min_minor: get(row, "rate_per_min_minor")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
        parent_call_id: get(row, "parent_call_id")?,
        origin: get(row, "origin")?,
        client_request_id: get(row, "client_request_id")?,
        voice_callback_url: get(row, "voice_callback_url")?,
        events_url: get(row, "events_url")?,
        sip_status: get(row, "sip_status")?,
    })
}

fn timeline_from_row(row: &AnyRow) -> Result<TimelineRecord, StorageError> {
    let detail: String = get(row, "detail")?;
    Ok(TimelineRecord {
        id: get(row, "id")?,
        call_id: get(row, "call_id")?,
        at: get_time(row, "at")?,
        kind: get(row, "kind")?,
        detail: serde_json::from_str(&detail)
            .map_err(|e| StorageError(format!("bad timeline detail: {e}")))?,
    })
}

fn route_from_row(row: &AnyRow) -> Result<NumberRoute, StorageError> {
    let status: String = get(row, "status")?;
    Ok(NumberRoute {
        number_id: get(row, "id")?,
        workspace_id: get(row, "workspace_id")?,
        number: get(row, "number")?,
        status: NumberStatus::parse(&status)
            .ok_or_else(|| StorageError(format!("unknown number status {status:?}")))?,
        voice_callback_url: get(row, "voice_callback_url")?,
        events_url: get(row, "events_url")?,
        inbound_per_min_minor: get(row, "inbound_per_min_minor")?,
        outbound_per_min_minor: get(row, "outbound_per_min_minor")?,
        currency: get(row, "currency")?,
        webhook_secret: get(row, "webhook_secret")?,
    })
}

const ROUTE_SELECT: &str = "SELECT t.id, t.workspace_id, t.number, t.status, \
     t.voice_callback_url, t.events_url, t.inbound_per_min_minor, t.outbound_per_min_minor, \
     t.currency, w.webhook_secret FROM tenant_numbers t JOIN workspaces w ON w.id = t.workspace_id";

/// Append entries in the caller's transaction, in order (UUIDv7 ids from one process are
/// monotonic, and the timeline is read in id order).
async fn insert_timeline(
    conn: &mut AnyConnection,
    call_id: &str,
    entries: &[TimelineEntry],
) -> Result<(), StorageError> {
    let rows: Vec<(&str, &TimelineEntry)> = entries.iter().map(|e| (call_id, e)).collect();
    let backend = crate::db::backend_of(conn);
    batch::insert_timelines(conn, backend, &rows).await
}

fn base_payload(c: &CallRecord) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("call_id".into(), json!(c.id));
    m.insert("number_id".into(), json!(c.number_id));
    m.insert("direction".into(), json!(c.direction));
    m.insert("from".into(), json!(c.from));
    m.insert("to".into(), json!(c.to));
    m.insert("status".into(), json!(c.status.as_str()));
    // Only a dialled leg has a parent: other calls' payloads stay as they were.
    if let Some(parent) = &c.parent_call_id {
        m.insert("parent_call_id".into(), json!(parent));
    }
    // Only a call placed through the API has these (with the customer's id, when given).
    if c.origin == "api" {
        m.insert("client_request_id".into(), json!(c.client_request_id));
    }
    if let Some(code) = c.sip_status {
        m.insert("sip_status".into(), json!(code));
    }
    m
}

fn call_event(
    c: &CallRecord,
    kind: &'static str,
    payload: serde_json::Map<String, Value>,
) -> EventDraft {
    EventDraft {
        workspace_id: c.workspace_id.clone(),
        kind,
        number_id: Some(c.number_id.clone()),
        call_id: Some(c.id.clone()),
        payload: Value::Object(payload),
        events_url: c.events_url.clone(),
    }
}

async fn enqueue_call_event(
    conn: &mut AnyConnection,
    c: &CallRecord,
    kind: &'static str,
    payload: serde_json::Map<String, Value>,
    at: DateTime<Utc>,
) -> Result<(), StorageError> {
    enqueue(conn, &call_event(c, kind, payload), at).await
}

/// `call.started` of a call just written.
fn started_event(c: &CallRecord) -> EventDraft {
    call_event(c, "call.started", base_payload(c))
}

/// `call.answered` of a call just answered.
fn answered_event(c: &CallRecord, answered_at: DateTime<Utc>) -> EventDraft {
    let mut payload = base_payload(c);
    payload.insert("answered_at".into(), json!(to_api(answered_at)));
    call_event(c, "call.answered", payload)
}

/// `call.completed` or `call.failed` of a call just ended (rated and charged).
fn ended_event(c: &CallRecord, ended_at: DateTime<Utc>) -> EventDraft {
    let mut payload = base_payload(c);
    let kind = if c.status == CallStatus::Completed {
        payload.insert("answered_at".into(), json!(c.answered_at.map(to_api)));
        payload.insert("duration_seconds".into(), json!(c.duration_seconds));
        payload.insert("ended_at".into(), json!(to_api(ended_at)));
        payload.insert("hangup_cause".into(), json!(c.hangup_cause));
        payload.insert("cost_minor".into(), json!(c.cost_minor));
        payload.insert("currency".into(), json!(c.currency));
        "call.completed"
    } else {
        payload.insert("failure_reason".into(), json!(c.failure_reason));
        payload.insert("ended_at".into(), json!(to_api(ended_at)));
        "call.failed"
    };
    call_event(c, kind, payload)
}

/// The timeline line of a rated call's charge (after `cost_minor` and `uncollected_minor` are set).
fn charged_entry(
    c: &CallRecord,
    rated: i64,
    ledger_entry_id: Option<String>,
    at: DateTime<Utc>,
) -> TimelineEntry {
    TimelineEntry {
        at,
        kind: "call.charged".to_owned(),
        detail: json!({
            "duration_seconds": c.duration_seconds,
            "rate_per_min_minor": c.rate_per_min_minor,
            "rated_minor": rated,
            "cost_minor": c.cost_minor,
            "uncollected_minor": c.uncollected_minor,
            "currency": c.currency,
            "ledger_entry_id": ledger_entry_id,
        }),
    }
}

async fn read_call(
    conn: &mut AnyConnection,
    call_id: &str,
) -> Result<Option<CallRecord>, StorageError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        call_cols!(),
        " FROM calls WHERE id = $1"
    ))
    .bind(call_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(storage)?;
    row.as_ref().map(call_from_row).transpose()
}

fn call_not_found(call_id: &str) -> StorageError {
    StorageError(format!("call {call_id} not found"))
}

fn unknown_number(call: &CallStarted) -> StorageError {
    StorageError(format!(
        "number {} not found in workspace {}",
        call.number_id, call.workspace_id
    ))
}

fn check_direction(direction: &str) -> Result<(), StorageError> {
    if direction != "inbound" && direction != "outbound" {
        return Err(StorageError(format!(
            "call direction must be inbound or outbound, got {direction:?}"
        )));
    }
    Ok(())
}

fn check_final(end: &CallEnded) -> Result<(), StorageError> {
    if !end.status.is_final() {
        return Err(StorageError(format!(
            "call_ended needs a final status, got {}",
            end.status.as_str()
        )));
    }
    Ok(())
}

/// Claims refuse a number priced in another currency than the wallet, so a mismatch is a broken
/// invariant, not a customer error: fail rather than debit the wrong unit.
fn check_currency(call: &CallRecord, wallet_currency: &str) -> Result<(), StorageError> {
    if wallet_currency != call.currency {
        return Err(StorageError(format!(
            "call {} is priced in {} but the wallet holds {wallet_currency}",
            call.id, call.currency
        )));
    }
    Ok(())
}

/// How a finalisation went.
enum Finalised {
    /// This transaction ended the call and wrote its event.
    Ended(CallCharged),
    /// It was final already; nothing was written.
    AlreadyFinal(CallCharged),
}

/// End a live call inside the caller's transaction: the conditional update (only from ringing or
/// answered) comes first, so it also locks the row and a second ender finds it final; then rate,
/// debit, timeline and event.
async fn finalise_in_tx(
    conn: &mut AnyConnection,
    end: &CallEnded,
) -> Result<Finalised, StorageError> {
    check_final(end)?;
    let ts = to_db(end.ended_at);
    let row = sqlx::query(concat!(
        "UPDATE calls SET status = $1, ended_at = $2, hangup_cause = $3, failure_reason = $4, \
         updated_at = $2, sip_status = COALESCE(CAST($6 AS BIGINT), sip_status) \
         WHERE id = $5 AND status IN ('ringing', 'answered') RETURNING ",
        call_cols!()
    ))
    .bind(end.status.as_str())
    .bind(&ts)
    .bind(&end.hangup_cause)
    .bind(&end.failure_reason)
    .bind(&end.call_id)
    .bind(end.sip_status.map(i64::from))
    .fetch_optional(&mut *conn)
    .await
    .map_err(storage)?;
    let Some(row) = row else {
        let stored = read_call(conn, &end.call_id)
            .await?
            .ok_or_else(|| call_not_found(&end.call_id))?;
        return Ok(Finalised::AlreadyFinal(stored.charged()));
    };
    let mut call = call_from_row(&row)?;
    let reserved = release_reservations(conn, std::slice::from_ref(&call.id)).await?;

    call.duration_seconds = call
        .answered_at
        .map(|a| money::billable_seconds(a, end.ended_at))
        .unwrap_or(0);
    let rated = money::reserved_charge_minor(
        money::call_cost_minor(call.duration_seconds, call.rate_per_min_minor),
        reserved.get(&call.id).copied(),
    );
    let mut timeline = end.timeline.clone();
    if rated > 0 {
        let (charged, ledger_entry_id) = debit_for_call(conn, &call, rated, end.ended_at).await?;
        call.cost_minor = charged;
        call.uncollected_minor = rated - charged;
        timeline.push(charged_entry(&call, rated, ledger_entry_id, end.ended_at));
        sqlx::query(
            "UPDATE calls SET duration_seconds = $1, cost_minor = $2, uncollected_minor = $3 \
             WHERE id = $4",
        )
        .bind(call.duration_seconds)
        .bind(call.cost_minor)
        .bind(call.uncollected_minor)
        .bind(&call.id)
        .execute(&mut *conn)
        .await
        .map_err(storage)?;
    } else if call.duration_seconds > 0 {
        sqlx::query("UPDATE calls SET duration_seconds = $1 WHERE id = $2")
            .bind(call.duration_seconds)
            .bind(&call.id)
            .execute(&mut *conn)
            .await
            .map_err(storage)?;
    }
    insert_timeline(conn, &call.id, &timeline).await?;
    enqueue(conn, &ended_event(&call, end.ended_at), end.ended_at).await?;
    Ok(Finalised::Ended(call.charged()))
}

/// End the prepaid reservations of these calls (they are ending in this transaction); returns
/// what each had reserved. Calls without one are simply absent.
pub(crate) async fn release_reservations(
    conn: &mut AnyConnection,
    call_ids: &[String],
) -> Result<HashMap<String, i64>, StorageError> {
    let backend = crate::db::backend_of(conn);
    let mut out = HashMap::new();
    for chunk in crate::sql::pow2_chunks(call_ids, 128) {
        let sql = format!(
            "DELETE FROM call_reservations WHERE call_id IN {} RETURNING call_id, amount_minor",
            crate::sql::in_list(backend, chunk.len())
        );
        // Safe: `sql` is built only from placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(id.clone());
        }
        for row in q.fetch_all(&mut *conn).await.map_err(storage)? {
            out.insert(get(&row, "call_id")?, get(&row, "amount_minor")?);
        }
    }
    Ok(out)
}

/// Debit up to `rated` from the call's wallet with one `call_charge` ledger row; returns what was
/// taken and the ledger entry (none when the wallet was empty).
async fn debit_for_call(
    conn: &mut AnyConnection,
    call: &CallRecord,
    rated: i64,
    now: DateTime<Utc>,
) -> Result<(i64, Option<String>), StorageError> {
    let ts = to_db(now);
    // A no-op write first: it locks the wallet row (PostgreSQL) so the balance read here is the
    // one the debit below applies to, even with other processes debiting the same wallet.
    let wallet = sqlx::query(
        "UPDATE wallets SET updated_at = $1 WHERE workspace_id = $2 \
         RETURNING balance_minor, currency",
    )
    .bind(&ts)
    .bind(&call.workspace_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(storage)?
    .ok_or_else(|| StorageError(format!("workspace {} has no wallet", call.workspace_id)))?;
    let currency: String = get(&wallet, "currency")?;
    check_currency(call, &currency)?;
    let balance: i64 = get(&wallet, "balance_minor")?;
    let charge = money::collectable_minor(rated, balance);
    if charge == 0 {
        return Ok((0, None));
    }
    let after = sqlx::query(
        "UPDATE wallets SET balance_minor = balance_minor - $1, updated_at = $2 \
         WHERE workspace_id = $3 AND balance_minor >= $1 \
         RETURNING balance_minor, low_balance_threshold_minor, low_balance_alerted",
    )
    .bind(charge)
    .bind(&ts)
    .bind(&call.workspace_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(storage)?
    .ok_or_else(|| StorageError("wallet balance changed under its row lock".into()))?;
    let balance_after: i64 = get(&after, "balance_minor")?;
    let entry_id = new_id();
    sqlx::query(
        "INSERT INTO ledger_entries (id, workspace_id, kind, amount_minor, balance_after_minor, \
         currency, reference, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&entry_id)
    .bind(&call.workspace_id)
    .bind(LedgerKind::CallCharge.as_str())
    .bind(-charge)
    .bind(balance_after)
    .bind(&call.currency)
    .bind(&call.id)
    .bind(&ts)
    .execute(&mut *conn)
    .await
    .map_err(storage)?;
    after_debit(conn, &call.workspace_id, &after, &call.currency, now).await?;
    Ok((charge, Some(entry_id)))
}

/// One change to a call, as the call actors send them.
#[derive(Debug, Clone)]
pub enum CallWrite {
    Started(CallStarted),
    Answered(CallAnswered),
    Ended(CallEnded),
    Timeline {
        call_id: String,
        entries: Vec<TimelineEntry>,
    },
    /// A finished recording, with its download URL (fixed when the event is written).
    Recording {
        recording: RecordingReady,
        download_url: String,
    },
    /// A call placed through the API: written only if the wallet and the workspace's limit of
    /// live placed calls allow it.
    Placed(Box<NewPlacedCall>),
}

/// What a write did.
#[derive(Debug, Clone)]
pub enum Written {
    Ended(CallCharged),
    Placed(PlacedCallStart),
    Other,
}

/// Apply one write inside the caller's transaction. `Ok(true)` in the second field: it queued an
/// event (the Events actor is told after the commit).
async fn apply_in_tx(
    conn: &mut AnyConnection,
    write: &CallWrite,
) -> Result<(Written, bool), StorageError> {
    match write {
        CallWrite::Started(c) => started_in_tx(conn, c).await.map(|e| (Written::Other, e)),
        CallWrite::Answered(c) => answered_in_tx(conn, c).await.map(|e| (Written::Other, e)),
        CallWrite::Ended(c) => match finalise_in_tx(conn, c).await? {
            Finalised::Ended(charged) => Ok((Written::Ended(charged), true)),
            Finalised::AlreadyFinal(charged) => Ok((Written::Ended(charged), false)),
        },
        CallWrite::Timeline { call_id, entries } => {
            insert_timeline(conn, call_id, entries).await?;
            Ok((Written::Other, false))
        }
        CallWrite::Recording {
            recording,
            download_url,
        } => recording_in_tx(conn, recording, download_url)
            .await
            .map(|e| (Written::Other, e)),
        CallWrite::Placed(c) => {
            let placed = placed_in_tx(conn, c).await?;
            let event = matches!(placed, PlacedCallStart::Written { .. });
            Ok((Written::Placed(placed), event))
        }
    }
}

/// Insert a finished recording's row (in its call's workspace and number), its timeline and
/// `call.recording.ready`. A repeat of a recording that committed is a no-op; an unknown call is
/// an error.
async fn recording_in_tx(
    conn: &mut AnyConnection,
    r: &RecordingReady,
    download_url: &str,
) -> Result<bool, StorageError> {
    let call = read_call(conn, &r.call_id)
        .await?
        .ok_or_else(|| call_not_found(&r.call_id))?;
    if !crate::recordings::insert_in_tx(conn, &call, r).await? {
        return Ok(false);
    }
    insert_timeline(conn, &call.id, &r.timeline).await?;
    let (ms, size) = crate::recordings::stored_sizes(r)?;
    let payload = crate::recordings::ready_payload(r, ms, size, download_url);
    enqueue_call_event(conn, &call, "call.recording.ready", payload, r.created_at).await?;
    Ok(true)
}

/// Insert the call row (`ringing`), its timeline and `call.started`. A repeat of a start that
/// committed is a no-op; an unknown number is an error.
async fn started_in_tx(conn: &mut AnyConnection, call: &CallStarted) -> Result<bool, StorageError> {
    check_direction(&call.direction)?;
    let ts = to_db(call.started_at);
    // The rate and currency are copied from the number as it is now: the call is billed at
    // the price in force when it started.
    let row = sqlx::query(concat!(
        "INSERT INTO calls (id, workspace_id, number_id, direction, from_number, to_number, \
         status, sip_call_id, engine_id, started_at, currency, rate_per_min_minor, \
         created_at, updated_at, parent_call_id) \
         SELECT $1, $2, $3, $4, $5, $6, 'ringing', $7, $8, $9, currency, \
           CASE WHEN $4 = 'inbound' THEN inbound_per_min_minor ELSE outbound_per_min_minor END, \
           $9, $9, $10 \
         FROM tenant_numbers WHERE id = $3 AND workspace_id = $2 \
         ON CONFLICT (id) DO NOTHING RETURNING ",
        call_cols!()
    ))
    .bind(&call.call_id)
    .bind(&call.workspace_id)
    .bind(&call.number_id)
    .bind(&call.direction)
    .bind(&call.from)
    .bind(&call.to)
    .bind(&call.sip_call_id)
    .bind(&call.engine_id)
    .bind(&ts)
    .bind(&call.parent_call_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(storage)?;
    let Some(row) = row else {
        // Either a retry of a start that did commit (nothing more to do) or an unknown number.
        return if read_call(conn, &call.call_id).await?.is_some() {
            Ok(false)
        } else {
            Err(unknown_number(call))
        };
    };
    let stored = call_from_row(&row)?;
    insert_timeline(conn, &stored.id, &call.timeline).await?;
    enqueue(conn, &started_event(&stored), call.started_at).await?;
    Ok(true)
}

/// Mark a ringing call answered with `call.answered`; a repeat changes nothing.
async fn answered_in_tx(
    conn: &mut AnyConnection,
    call: &CallAnswered,
) -> Result<bool, StorageError> {
    let ts = to_db(call.answered_at);
    let row = sqlx::query(concat!(
        "UPDATE calls SET status = 'answered', answered_at = $1, updated_at = $1, \
         to_number = COALESCE($3, to_number) WHERE id = $2 AND status = 'ringing' RETURNING ",
        call_cols!()
    ))
    .bind(&ts)
    .bind(&call.call_id)
    .bind(&call.to)
    .fetch_optional(&mut *conn)
    .await
    .map_err(storage)?;
    let Some(row) = row else {
        // Answered (or ended) already: a repeat changes nothing.
        return if read_call(conn, &call.call_id).await?.is_some() {
            Ok(false)
        } else {
            Err(call_not_found(&call.call_id))
        };
    };
    let stored = call_from_row(&row)?;
    insert_timeline(conn, &stored.id, &call.timeline).await?;
    enqueue(
        conn,
        &answered_event(&stored, call.answered_at),
        call.answered_at,
    )
    .await?;
    Ok(true)
}

/// Attempts for a write that keeps losing deadlocks before it reports a storage failure.
const WRITE_ATTEMPTS: usize = 5;

/// PostgreSQL's deadlock victim (40P01) or serialization failure (40001). The code is gone once the
/// error is a `StorageError`, so this matches PostgreSQL's fixed message texts.
pub(crate) fn is_transient(e: &StorageError) -> bool {
    e.0.contains("deadlock detected") || e.0.contains("could not serialize access")
}

/// Writes waiting for the group commit, each with who waits for its result.
type Pending = group_commit::Pending<CallWrite, Result<Written, StorageError>>;

/// Call writes as a group-commit lane commits them.
struct CallCommits(SqlStore);

impl group_commit::Committer for CallCommits {
    type Write = CallWrite;
    type Output = Result<Written, StorageError>;

    async fn commit(&self, batch: &mut Vec<Pending>) {
        self.0.commit_batch(batch).await;
    }

    /// A placed call's API request waits on its write, and the trunk's INVITE on its answer.
    fn urgent(&self, write: &CallWrite) -> bool {
        matches!(write, CallWrite::Placed(_))
    }
}

/// Most writes committed together.
const GROUP_MAX: usize = 256;

/// Shortest time between the starts of two group commits. Every commit writes each B-tree page
/// it touched to the WAL again (the same few tail pages of the calls, timeline and event
/// tables), so at hundreds of writes a second fewer, larger commits cost less: at 500 calls/s
/// a 5 ms gap took the engine from 1.20 to 1.07 cores (the SQLite thread from about 42 % to
/// 31 %) and the median answer from 4–6 to 8.5 ms. A write that finds the writer idle for
/// longer than the gap commits at once.
const COMMIT_GAP: std::time::Duration = std::time::Duration::from_millis(5);

/// Group commit for call writes. Thousands of calls a second each change their row three times;
/// one transaction per change would queue them all behind SQLite's single writer (and a commit
/// each on PostgreSQL). A writer task takes whatever has queued while its last batch ran and
/// commits it in one transaction, each write applied in arrival order exactly as if alone. If the
/// batch fails, each write is retried in its own transaction, so one bad write fails only itself.
///
/// On PostgreSQL a call's start has a lane of its own. The start is the one write a caller waits
/// for before it hears anything (DESIGN §3: the row exists before the voice callback), and
/// PostgreSQL takes transactions side by side, so it need not queue behind a batch of answers and
/// ends (a dozen round trips, with wallet locks). Order per call still holds: the Call actor
/// awaits its start before it queues anything else of that call. The starts lane keeps no gap
/// between batches: PostgreSQL's WAL logs rows, not whole pages, so [`COMMIT_GAP`]'s saving does
/// not apply, and this wait is what the caller hears (at 1,000 calls/s the median answer went from
/// 8 to 5 ms for 0.06 more cores). SQLite has one writer however many lanes ask, so there all
/// writes share one lane.
#[derive(Clone)]
pub struct CallWriter {
    tx: mpsc::UnboundedSender<Pending>,
    starts: Option<mpsc::UnboundedSender<Pending>>,
}

impl CallWriter {
    fn start(store: SqlStore) -> CallWriter {
        let starts = (store.db().backend == Backend::Postgres)
            .then(|| Self::lane(store.clone(), std::time::Duration::ZERO));
        CallWriter {
            tx: Self::lane(store, COMMIT_GAP),
            starts,
        }
    }

    /// One group-commit lane for call writes, starting batches at least `gap` apart.
    fn lane(store: SqlStore, gap: std::time::Duration) -> mpsc::UnboundedSender<Pending> {
        group_commit::lane(CallCommits(store), gap, GROUP_MAX)
    }

    fn queue(
        &self,
        write: CallWrite,
        reply: oneshot::Sender<Result<Written, StorageError>>,
    ) -> bool {
        let lane = match (&write, &self.starts) {
            (CallWrite::Started(_) | CallWrite::Placed(_), Some(starts)) => starts,
            _ => &self.tx,
        };
        lane.send((write, reply)).is_ok()
    }
}

impl SqlStore {
    async fn write_call(&self, write: CallWrite) -> Result<Written, StorageError> {
        self.queue_write(write)?.await
    }

    /// Hand a write to the group commit; it is in line (after every write queued before it)
    /// when this returns, and the future gives its result once committed.
    fn queue_write(
        &self,
        write: CallWrite,
    ) -> Result<impl Future<Output = Result<Written, StorageError>> + Send + 'static, StorageError>
    {
        let writer = self
            .call_writer
            .get_or_init(|| CallWriter::start(self.clone()));
        let (reply, rx) = oneshot::channel();
        if !writer.queue(write, reply) {
            return Err(StorageError("the call writer stopped".into()));
        }
        Ok(async move {
            rx.await
                .map_err(|_| StorageError("the call writer dropped a write".into()))?
        })
    }

    async fn commit_batch(&self, batch: &mut Vec<Pending>) {
        if batch.len() > 1 || batch::applies(batch) {
            match self.try_batch(batch).await {
                Ok(results) => {
                    for ((_, reply), r) in batch.drain(..).zip(results) {
                        let _ = reply.send(Ok(r));
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, writes = batch.len(), "group commit of call writes failed; writing one by one");
                }
            }
        }
        for (write, reply) in batch.drain(..) {
            let _ = reply.send(self.write_alone(&write).await);
        }
    }

    async fn try_batch(&self, batch: &[Pending]) -> Result<Vec<Written>, StorageError> {
        let began = std::time::Instant::now();
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        let opened = began.elapsed();
        let (results, events) = if batch::applies(batch) {
            batch::apply(&mut tx, self.db().backend, batch).await?
        } else {
            let mut results = Vec::with_capacity(batch.len());
            let mut events = false;
            for (write, _) in batch {
                let (written, event) = apply_in_tx(&mut tx, write).await?;
                events |= event;
                results.push(written);
            }
            (results, events)
        };
        let applied = began.elapsed();
        tx.commit().await.map_err(storage)?;
        tracing::debug!(
            writes = batch.len(),
            placed = batch
                .iter()
                .filter(|(w, _)| matches!(w, CallWrite::Placed(_)))
                .count(),
            begin_ms = opened.as_secs_f64() * 1e3,
            apply_ms = (applied - opened).as_secs_f64() * 1e3,
            commit_ms = (began.elapsed() - applied).as_secs_f64() * 1e3,
            "call writes committed"
        );
        if events {
            self.events_committed();
        }
        Ok(results)
    }

    /// One write in its own transaction. On PostgreSQL, two processes ending calls of one wallet
    /// can deadlock (call row, then wallet row, in different orders across their groups); the
    /// victim wrote nothing and runs again.
    async fn write_alone(&self, write: &CallWrite) -> Result<Written, StorageError> {
        let mut attempt = 1;
        loop {
            match self.write_alone_once(write).await {
                Err(e) if attempt < WRITE_ATTEMPTS && is_transient(&e) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(5 * attempt as u64)).await;
                }
                other => return other,
            }
        }
    }

    async fn write_alone_once(&self, write: &CallWrite) -> Result<Written, StorageError> {
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        let (written, event) = match apply_in_tx(&mut tx, write).await {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        tx.commit().await.map_err(storage)?;
        if event {
            self.events_committed();
        }
        Ok(written)
    }
}

/// `+254700000001`; a number given without `+` is taken as E.164 digits.
fn e164(number: &str) -> String {
    let n = number.trim();
    if n.starts_with('+') {
        n.to_owned()
    } else {
        format!("+{n}")
    }
}

/// A bind value for the list query assembled from static fragments.
enum Arg {
    Text(String),
    Int(i64),
}

impl SqlStore {
    /// A workspace's calls, newest first. Each filter combination is its own statement text, so
    /// PostgreSQL plans each with the index that fits it.
    pub async fn list_calls(
        &self,
        workspace_id: &str,
        f: &CallFilter,
    ) -> Result<Vec<CallRecord>, StorageError> {
        let mut sql = String::from(concat!(
            "SELECT ",
            call_cols!(),
            " FROM calls WHERE workspace_id = $1"
        ));
        let mut args = vec![Arg::Text(workspace_id.to_owned())];
        let mut push = |clause: &str, arg: Arg, sql: &mut String| {
            args.push(arg);
            sql.push_str(&clause.replace("$?", &format!("${}", args.len())));
        };
        if let Some(n) = &f.number_id {
            push(" AND number_id = $?", Arg::Text(n.clone()), &mut sql);
        }
        if let Some(d) = &f.direction {
            push(" AND direction = $?", Arg::Text(d.clone()), &mut sql);
        }
        if let Some(p) = &f.parent_call_id {
            push(" AND parent_call_id = $?", Arg::Text(p.clone()), &mut sql);
        }
        if let Some(s) = f.status {
            push(
                " AND status = $?",
                Arg::Text(s.as_str().to_owned()),
                &mut sql,
            );
        }
        if let Some(b) = &f.before_id {
            push(" AND id < $?", Arg::Text(b.clone()), &mut sql);
        }
        push(" ORDER BY id DESC LIMIT $?", Arg::Int(f.limit), &mut sql);
        // Safe: `sql` is built only from the static fragments above; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for a in args {
            q = match a {
                Arg::Text(s) => q.bind(s),
                Arg::Int(i) => q.bind(i),
            };
        }
        let rows = q.fetch_all(&self.db().read).await.map_err(storage)?;
        rows.iter().map(call_from_row).collect()
    }

    /// One call of this workspace.
    pub async fn get_call(
        &self,
        workspace_id: &str,
        call_id: &str,
    ) -> Result<Option<CallRecord>, StorageError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            call_cols!(),
            " FROM calls WHERE id = $1 AND workspace_id = $2"
        ))
        .bind(call_id)
        .bind(workspace_id)
        .fetch_optional(&self.db().read)
        .await
        .map_err(storage)?;
        row.as_ref().map(call_from_row).transpose()
    }

    /// A call's timeline, oldest first, after the entry `after_id` (the cursor). The caller has
    /// checked that the call belongs to the workspace.
    pub async fn list_call_timeline(
        &self,
        call_id: &str,
        after_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TimelineRecord>, StorageError> {
        let rows = sqlx::query(
            "SELECT id, call_id, at, kind, detail FROM call_timeline \
             WHERE call_id = $1 AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3",
        )
        .bind(call_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.db().read)
        .await
        .map_err(storage)?;
        rows.iter().map(timeline_from_row).collect()
    }
}

/// Timeline timestamps keep milliseconds: callbacks and SIP messages of one second must stay
/// distinguishable (call records show whole seconds, as the rest of the API).
pub fn to_api_millis(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[async_trait]
impl CallStore for SqlStore {
    fn reachable(&self) -> bool {
        !self.db().health.is_down()
    }

    async fn route_by_number(&self, number: &str) -> Result<Option<NumberRoute>, StorageError> {
        let sql = format!("{ROUTE_SELECT} WHERE t.number = $1 AND t.status <> 'released'");
        // Safe: a constant plus a constant.
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(e164(number))
            .fetch_optional(&self.db().read)
            .await
            .map_err(storage)?;
        row.as_ref().map(route_from_row).transpose()
    }

    async fn route_by_id(&self, number_id: &str) -> Result<Option<NumberRoute>, StorageError> {
        let sql = format!("{ROUTE_SELECT} WHERE t.id = $1 AND t.status <> 'released'");
        // Safe: a constant plus a constant.
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(number_id)
            .fetch_optional(&self.db().read)
            .await
            .map_err(storage)?;
        row.as_ref().map(route_from_row).transpose()
    }

    async fn recording_ready(&self, recording: RecordingReady) -> Result<(), StorageError> {
        let download_url = self.recording_download_url(&recording.call_id, &recording.recording_id);
        self.write_call(CallWrite::Recording {
            recording,
            download_url,
        })
        .await
        .map(|_| ())
    }

    async fn call_started(&self, call: CallStarted) -> Result<(), StorageError> {
        self.write_call(CallWrite::Started(call)).await.map(|_| ())
    }

    fn queue_call_answered(&self, call: CallAnswered) -> WriteReceipt {
        match self.queue_write(CallWrite::Answered(call)) {
            Ok(written) => Box::pin(async move { written.await.map(|_| ()) }),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    async fn call_ended(&self, call: CallEnded) -> Result<CallCharged, StorageError> {
        match self.write_call(CallWrite::Ended(call)).await? {
            Written::Ended(charged) => Ok(charged),
            Written::Other | Written::Placed(_) => {
                Err(StorageError("call end was not recorded".into()))
            }
        }
    }

    async fn call_ended_if_started(
        &self,
        call: CallEnded,
    ) -> Result<Option<CallCharged>, StorageError> {
        let started = sqlx::query("SELECT 1 FROM calls WHERE id = $1")
            .bind(&call.call_id)
            .fetch_optional(&self.db().read)
            .await
            .map_err(storage)?
            .is_some();
        if !started {
            return Ok(None);
        }
        self.call_ended(call).await.map(Some)
    }

    async fn append_timeline(
        &self,
        call_id: &str,
        entries: Vec<TimelineEntry>,
    ) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write_call(CallWrite::Timeline {
            call_id: call_id.to_owned(),
            entries,
        })
        .await
        .map(|_| ())
    }

    async fn reserve(
        &self,
        call_id: &str,
        workspace_id: &str,
        want_minor: i64,
        at_least_minor: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, StorageError> {
        let ts = to_db(now);
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        // Lock the call first, as its end does (call, then reservation, then wallet): a call that
        // ends meanwhile either ends first (and is not live here) or waits for this to commit
        // (and releases what it reserved). A reservation of an ended call would hold the balance
        // for good.
        let live = sqlx::query(
            "UPDATE calls SET updated_at = updated_at \
             WHERE id = $1 AND status IN ('ringing', 'answered') RETURNING id",
        )
        .bind(call_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(storage)?;
        if live.is_none() {
            return Ok(None);
        }
        // Then the wallet's reservations: no other reservation of this wallet is taken between
        // the read below and the write that relies on it.
        lock_reservations(&mut tx, workspace_id).await?;
        let wallet = sqlx::query(
            "SELECT (SELECT balance_minor FROM wallets WHERE workspace_id = $1) AS balance, \
                    (SELECT CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) \
                       FROM call_reservations WHERE workspace_id = $1) AS held, \
                    (SELECT CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) \
                       FROM call_reservations WHERE workspace_id = $1 AND call_id = $2) AS mine",
        )
        .bind(workspace_id)
        .bind(call_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(storage)?;
        let balance: i64 = get::<Option<i64>>(&wallet, "balance")?
            .ok_or_else(|| StorageError(format!("workspace {workspace_id} has no wallet")))?;
        let (held, mine): (i64, i64) = (get(&wallet, "held")?, get(&wallet, "mine")?);
        let Some(take) = money::reservation_take(want_minor, at_least_minor, balance - held) else {
            return Ok(None);
        };
        let done = sqlx::query(
            "INSERT INTO call_reservations (call_id, workspace_id, amount_minor, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (call_id) DO UPDATE SET \
             amount_minor = call_reservations.amount_minor + excluded.amount_minor, \
             updated_at = excluded.updated_at",
        )
        .bind(call_id)
        .bind(workspace_id)
        .bind(take)
        .bind(&ts)
        .execute(&mut *tx)
        .await
        .map_err(storage)?
        .rows_affected();
        if done != 1 {
            return Err(StorageError(format!(
                "reserving for call {call_id} wrote {done} rows"
            )));
        }
        tx.commit().await.map_err(storage)?;
        Ok(Some(mine + take))
    }

    async fn engine_heartbeat(
        &self,
        engine_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO engines (id, heartbeat_at) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(engine_id)
        .bind(to_db(now))
        .execute(&self.db().write)
        .await
        .map_err(storage)?;
        Ok(())
    }

    async fn close_orphaned_calls(
        &self,
        now: DateTime<Utc>,
        this_engine: &str,
        stale_before: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        // Every few seconds in every engine, and almost always nothing to close: look first
        // without taking the writer (on SQLite, holding it stalls every call write).
        let orphan = sqlx::query(ORPHANED_CALLS)
            .bind(this_engine)
            .bind(to_db(stale_before))
            .fetch_optional(&self.db().read)
            .await
            .map_err(storage)?;
        if orphan.is_none() {
            return Ok(0);
        }
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        let mut rows = Vec::new();
        for row in sqlx::query(ORPHANED_CALLS)
            .bind(this_engine)
            .bind(to_db(stale_before))
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?
        {
            rows.push((get::<String>(&row, "id")?, row));
        }
        // Id order keeps lock order the same in every process that closes the same calls.
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut closed = 0u64;
        for (_, row) in &rows {
            let call_id: String = get(row, "id")?;
            let engine_id: String = get(row, "engine_id")?;
            // The call was last known alive at its engine's last heartbeat: it is rated up to
            // then, not through the time the engine was down (at most one beat is not billed).
            let started_at = get_time(row, "started_at")?;
            let ended_at = get_opt_time(row, "heartbeat_at")?
                .unwrap_or(started_at)
                .clamp(started_at, now.max(started_at));
            let end = CallEnded {
                call_id,
                status: CallStatus::Failed,
                ended_at,
                hangup_cause: None,
                failure_reason: Some("engine.restart".to_owned()),
                sip_status: None,
                timeline: vec![TimelineEntry {
                    at: now,
                    kind: "call.status".to_owned(),
                    detail: json!({
                        "status": "failed",
                        "failure_reason": "engine.restart",
                        "engine_id": engine_id,
                        "closed_by": this_engine,
                    }),
                }],
            };
            if let Finalised::Ended(_) = finalise_in_tx(&mut tx, &end).await? {
                closed += 1;
            }
        }
        tx.commit().await.map_err(storage)?;
        if closed > 0 {
            self.events_committed();
        }
        Ok(closed)
    }
}

/// Live calls of engines other than `$1` whose last heartbeat is older than `$2` (or missing).
/// The status predicate matches the partial index `calls_live`; no `ORDER BY`, which would take
/// SQLite's planner to a scan of every call in id order (57 ms at 200,000 calls).
const ORPHANED_CALLS: &str = "SELECT c.id, c.engine_id, c.started_at, e.heartbeat_at FROM calls c \
     LEFT JOIN engines e ON e.id = c.engine_id \
     WHERE c.status IN ('ringing', 'answered') AND c.engine_id <> $1 \
       AND (e.heartbeat_at IS NULL OR e.heartbeat_at < $2)";

/// A call placed through the API, as its row is first written.
#[derive(Debug, Clone)]
pub struct NewPlacedCall {
    pub call_id: String,
    pub workspace_id: String,
    pub number_id: String,
    /// The number the callee sees.
    pub from: String,
    /// The (first) number called.
    pub to: String,
    pub sip_call_id: String,
    pub engine_id: String,
    pub started_at: DateTime<Utc>,
    pub client_request_id: Option<String>,
    pub voice_callback_url: Option<String>,
    pub events_url: Option<String>,
    /// The first paid slice to reserve (0 for a free rate).
    pub slice_minor: i64,
    /// Live calls placed through the API that the workspace may hold.
    pub max_live: i64,
    /// The request's `Idempotency-Key`, marked applied with the call's row.
    pub idempotency: Option<IdempotencyMark>,
}

/// What writing a placed call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacedCallStart {
    /// The row is written (`ringing`, `call.started` queued) with its first slice reserved.
    Written { reserved_minor: i64 },
    /// The wallet's free balance is less than the first slice: nothing was written.
    InsufficientFunds,
    /// The workspace holds `max_live` live calls placed through the API: nothing was written.
    ConcurrencyExceeded,
}

impl SqlStore {
    /// Write a call placed through the API: its row, its first slice's reservation and
    /// `call.started` — or nothing, when the wallet cannot pay the first slice or the workspace
    /// is at its limit of live placed calls. It commits with the other call writes (see
    /// [`CallWriter`]): under load, placed calls of one workspace are counted and reserved a
    /// batch at a time, under one lock of the wallet's row and one commit.
    pub async fn start_placed_call(
        &self,
        c: &NewPlacedCall,
    ) -> Result<PlacedCallStart, StorageError> {
        match self
            .write_call(CallWrite::Placed(Box::new(c.clone())))
            .await?
        {
            Written::Placed(placed) => Ok(placed),
            _ => Err(StorageError(
                "a placed call got another write's result".into(),
            )),
        }
    }
}

/// Serialise the transactions that reserve from a workspace's wallet (placing a call, a call's
/// slices), until the caller's transaction ends. Reserving checks `balance - held` and then adds
/// to `held`; two reservers must not both rely on one read. Ends and debits need not wait: a call
/// is charged at most what it reserved and its reservation goes with the charge, in one
/// transaction, so an end never lowers `balance - held`, and the reader reads both in one
/// statement (one snapshot). So on PostgreSQL reservers take a transaction-scoped advisory lock
/// of their own instead of the wallet's row, which the ends' group commit holds from its debits
/// to its commit. SQLite's one writer serialises everything already; the row lock there only
/// checks that the wallet exists.
async fn lock_reservations(
    conn: &mut AnyConnection,
    workspace_id: &str,
) -> Result<(), StorageError> {
    let sql = match crate::db::backend_of(conn) {
        Backend::Postgres => "SELECT pg_advisory_xact_lock(hashtextextended($1, 4475))",
        Backend::Sqlite => "UPDATE wallets SET updated_at = updated_at WHERE workspace_id = $1",
    };
    sqlx::query(sql)
        .bind(workspace_id)
        .execute(&mut *conn)
        .await
        .map_err(storage)?;
    Ok(())
}

/// The workspace's wallet as placing calls sees it, its reservations locked (see
/// [`lock_reservations`]) for the rest of the transaction.
struct PlacingWallet {
    /// Balance less live reservations.
    free: i64,
    /// Live calls placed through the API.
    live: i64,
}

impl PlacingWallet {
    /// Take the wallet's reservation lock, then read what placing a call checks.
    async fn lock(conn: &mut AnyConnection, workspace_id: &str) -> Result<Self, StorageError> {
        lock_reservations(conn, workspace_id).await?;
        let row = sqlx::query(
            "SELECT (SELECT balance_minor FROM wallets WHERE workspace_id = $1) AS balance, \
                    (SELECT CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) \
                       FROM call_reservations WHERE workspace_id = $1) AS held, \
                    (SELECT CAST(COUNT(*) AS BIGINT) FROM calls WHERE workspace_id = $1 \
                       AND origin = 'api' AND status IN ('ringing', 'answered')) AS live",
        )
        .bind(workspace_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(storage)?;
        let balance: i64 = get::<Option<i64>>(&row, "balance")?
            .ok_or_else(|| StorageError(format!("workspace {workspace_id} has no wallet")))?;
        Ok(PlacingWallet {
            free: balance - get::<i64>(&row, "held")?,
            live: get(&row, "live")?,
        })
    }

    /// Take a slot and the first slice for `c`, or say why not.
    fn admit(&mut self, c: &NewPlacedCall) -> Option<PlacedCallStart> {
        if self.live >= c.max_live {
            return Some(PlacedCallStart::ConcurrencyExceeded);
        }
        if c.slice_minor > 0 && self.free < c.slice_minor {
            return Some(PlacedCallStart::InsufficientFunds);
        }
        self.live += 1;
        self.free -= c.slice_minor;
        None
    }
}

/// `call.created`, the first line of a placed call's timeline.
fn placed_entry(c: &NewPlacedCall) -> TimelineEntry {
    TimelineEntry {
        at: c.started_at,
        kind: "call.created".into(),
        detail: json!({"by": "api", "from": c.from, "to": c.to, "reserved_minor": c.slice_minor}),
    }
}

/// Write one placed call in the caller's transaction (see [`SqlStore::start_placed_call`]).
async fn placed_in_tx(
    conn: &mut AnyConnection,
    c: &NewPlacedCall,
) -> Result<PlacedCallStart, StorageError> {
    let mut wallet = PlacingWallet::lock(conn, &c.workspace_id).await?;
    if let Some(refused) = wallet.admit(c) {
        return Ok(refused);
    }
    let backend = crate::db::backend_of(conn);
    let stored = batch::insert_placed(conn, backend, &[c])
        .await?
        .pop()
        .ok_or_else(|| StorageError(format!("number {} is not the workspace's", c.number_id)))?;
    insert_timeline(conn, &stored.id, &[placed_entry(c)]).await?;
    enqueue(conn, &started_event(&stored), c.started_at).await?;
    mark_applied(conn, c.idempotency.as_ref(), c.started_at).await?;
    Ok(PlacedCallStart::Written {
        reserved_minor: c.slice_minor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orphan check runs every few seconds in every engine: on SQLite it must read the
    /// partial index of live calls, not every call ever made (a scan in id order for an
    /// `ORDER BY`, 57 ms at 200,000 calls).
    #[tokio::test]
    async fn the_orphan_check_reads_only_live_calls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::db::Db::connect(&format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("o.db").display()
        ))
        .await
        .expect("connect");
        db.migrate().await.expect("migrate");
        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {ORPHANED_CALLS}"
        )))
        .bind("me")
        .bind("2026-01-01T00:00:00Z")
        .fetch_all(&db.read)
        .await
        .expect("plan")
        .iter()
        .map(|row| sqlx::Row::try_get::<String, _>(row, "detail").expect("detail"))
        .collect();
        assert!(
            plan.iter().any(|d| d.contains("USING INDEX calls_live")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|d| d.contains("TEMP B-TREE")), "{plan:?}");
        db.close().await;
    }
}
