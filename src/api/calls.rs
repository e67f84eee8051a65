//! Call records, their timelines, and hanging up a live call (DESIGN §5).

use axum::Extension;
use axum::extract::{OriginalUri, Path, State};
use axum::response::IntoResponse;
use sautikit_actors::call_store::CallStatus;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{ApiQuery, Page, PageParams, parse_id};
use super::middleware::Workspace;
use crate::calls_store::{CallFilter, CallRecord, TimelineRecord, to_api_millis};
use crate::time::to_api;

/// A timeline is short and read whole far more often than paged.
const TIMELINE_DEFAULT_LIMIT: i64 = 100;

/// A call record. Timestamps are to the second; `null` where not (yet) known.
#[derive(Serialize, ToSchema)]
pub struct CallView {
    pub id: String,
    pub number_id: String,
    /// `inbound` or `outbound`.
    #[schema(example = "inbound")]
    pub direction: String,
    /// `ringing`, `answered`, `completed`, `failed`, `busy`, `no_answer` or `canceled`.
    #[schema(example = "completed")]
    pub status: String,
    #[schema(example = "+254711000000")]
    pub from: String,
    #[schema(example = "+254700000001")]
    pub to: String,
    #[schema(example = "2026-06-27T12:00:00Z")]
    pub started_at: String,
    pub answered_at: Option<String>,
    pub ended_at: Option<String>,
    /// Whole seconds from answer to end, rounded up; 0 until the call has ended and for calls
    /// never answered.
    #[schema(example = 62)]
    pub duration_seconds: i64,
    /// Why it ended, e.g. `caller_hangup`, `engine_hangup`, `api_hangup`.
    pub hangup_cause: Option<String>,
    /// For failed calls, e.g. `callback.timeout`, `engine.restart`.
    pub failure_reason: Option<String>,
    /// What the call cost, debited from the wallet at hangup (minor units). A wallet is never
    /// taken below zero: if it held less than the rated cost, this is what it held.
    #[schema(example = 310)]
    pub cost_minor: i64,
    #[schema(example = "KES")]
    pub currency: String,
}

impl From<CallRecord> for CallView {
    fn from(c: CallRecord) -> Self {
        CallView {
            id: c.id,
            number_id: c.number_id,
            direction: c.direction,
            status: c.status.as_str().to_owned(),
            from: c.from,
            to: c.to,
            started_at: to_api(c.started_at),
            answered_at: c.answered_at.map(to_api),
            ended_at: c.ended_at.map(to_api),
            duration_seconds: c.duration_seconds,
            hangup_cause: c.hangup_cause,
            failure_reason: c.failure_reason,
            cost_minor: c.cost_minor,
            currency: c.currency,
        }
    }
}

/// One timeline entry: a SIP message, a callback, an action, a status change or the charge.
#[derive(Serialize, ToSchema)]
pub struct TimelineView {
    pub id: String,
    /// RFC 3339 UTC with milliseconds (entries of one second stay apart).
    #[schema(example = "2026-06-27T12:00:00.123Z")]
    pub at: String,
    /// `sip.received`, `sip.sent`, `callback.succeeded`, `callback.failed`, `action.started`,
    /// `action.finished`, `call.status`, `call.charged` …
    #[schema(example = "sip.received")]
    pub kind: String,
    /// Kind-specific, e.g. `{"method":"INVITE"}`.
    #[schema(value_type = Object, example = json!({"method": "INVITE"}))]
    pub detail: Value,
}

impl From<TimelineRecord> for TimelineView {
    fn from(t: TimelineRecord) -> Self {
        TimelineView {
            id: t.id,
            at: to_api_millis(t.at),
            kind: t.kind,
            detail: t.detail,
        }
    }
}

pub fn call_not_found() -> ApiError {
    ApiError::not_found("calls.not_found", "call not found")
}

fn invalid_query(message: &str) -> ApiError {
    ApiError::bad_request("request.invalid_query", message.to_owned())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallsQuery {
    /// Only calls of this number (its id).
    pub number_id: Option<String>,
    /// `inbound` or `outbound`.
    pub direction: Option<String>,
    /// `ringing`, `answered`, `completed`, `failed`, `busy`, `no_answer` or `canceled`.
    pub status: Option<String>,
    /// Page size, 1–100 (default 25).
    pub limit: Option<i64>,
    /// Opaque: the value from the previous page's `Link: <…>; rel="next"`.
    pub cursor: Option<String>,
}

/// The workspace's calls, newest first.
#[utoipa::path(get, path = "/v1/calls", tag = "calls", params(CallsQuery),
    responses(
        (status = 200, body = [CallView], description = "A page; `Link: <…>; rel=\"next\"` when there is more"),
        (status = 400, body = ErrorEnvelope, description = "`request.invalid_query`"),
        (status = 401, body = ErrorEnvelope)))]
pub async fn list_calls(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    OriginalUri(uri): OriginalUri,
    ApiQuery(q): ApiQuery<CallsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let number_id = q
        .number_id
        .as_deref()
        .map(|n| parse_id(n, "number_id").map_err(|_| invalid_query("number_id must be a UUID")))
        .transpose()?;
    if let Some(d) = &q.direction
        && d != "inbound"
        && d != "outbound"
    {
        return Err(invalid_query("direction must be inbound or outbound"));
    }
    let status = q
        .status
        .as_deref()
        .map(|s| {
            CallStatus::parse(s).ok_or_else(|| {
                invalid_query(
                    "status must be ringing, answered, completed, failed, busy, no_answer or \
                     canceled",
                )
            })
        })
        .transpose()?;
    let rows = state
        .store
        .list_calls(
            &ws.id,
            &CallFilter {
                number_id,
                direction: q.direction,
                status,
                before_id: page.after()?,
                limit: limit + 1,
            },
        )
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |c| c.id.clone(),
        CallView::from,
    ))
}

/// One call.
#[utoipa::path(get, path = "/v1/calls/{id}", tag = "calls",
    params(("id" = String, Path, description = "The call's id")),
    responses((status = 200, body = CallView),
        (status = 400, body = ErrorEnvelope, description = "`request.invalid_id`"),
        (status = 404, body = ErrorEnvelope, description = "`calls.not_found`")))]
pub async fn get_call(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
) -> Result<axum::Json<CallView>, ApiError> {
    let id = parse_id(&id, "call id")?;
    let c = state
        .store
        .get_call(&ws.id, &id)
        .await?
        .ok_or_else(call_not_found)?;
    Ok(axum::Json(c.into()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TimelineQuery {
    /// Page size, 1–100 (default 100 here: a timeline is usually read whole).
    pub limit: Option<i64>,
    /// Opaque: the value from the previous page's `Link: <…>; rel="next"`.
    pub cursor: Option<String>,
}

/// A call's timeline, OLDEST first (it is a timeline, unlike the newest-first lists): SIP
/// messages in and out, callbacks with latency and outcome, actions, status changes and the
/// charge. `limit` defaults to 100 here; the next page is in `Link: <…>; rel="next"`.
#[utoipa::path(get, path = "/v1/calls/{id}/events", tag = "calls",
    params(("id" = String, Path, description = "The call's id"), TimelineQuery),
    responses((status = 200, body = [TimelineView]),
        (status = 400, body = ErrorEnvelope, description = "`request.invalid_id`, `request.invalid_query`"),
        (status = 404, body = ErrorEnvelope, description = "`calls.not_found`")))]
pub async fn call_events(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    OriginalUri(uri): OriginalUri,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<TimelineQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id, "call id")?;
    let page = PageParams {
        limit: Some(q.limit.unwrap_or(TIMELINE_DEFAULT_LIMIT)),
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let after = page.after()?;
    // The call must be this workspace's: another workspace's call is a 404 like any other.
    state
        .store
        .get_call(&ws.id, &id)
        .await?
        .ok_or_else(call_not_found)?;
    let rows = state
        .store
        .list_call_timeline(&id, after.as_deref(), limit + 1)
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |t| t.id.clone(),
        TimelineView::from,
    ))
}

/// Hang up a live call. Answers once the call has ended and its final record (with its charge)
/// is committed.
#[utoipa::path(post, path = "/v1/calls/{id}/hangup", tag = "calls",
    params(("id" = String, Path, description = "The call's id")),
    responses((status = 200, body = CallView, description = "The call's final record"),
        (status = 400, body = ErrorEnvelope, description = "`request.invalid_id`"),
        (status = 404, body = ErrorEnvelope, description = "`calls.not_found`"),
        (status = 409, body = ErrorEnvelope, description = "`calls.not_live`: the call has already ended, or it is held by another engine process")))]
pub async fn hangup(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
) -> Result<axum::Json<CallView>, ApiError> {
    let id = parse_id(&id, "call id")?;
    let before = state
        .store
        .get_call(&ws.id, &id)
        .await?
        .ok_or_else(call_not_found)?;
    if before.status.is_final() {
        return Err(already_ended(&before));
    }
    let ended_here = state.engine.hangup_call(&ws.id, &id).await?;
    let after = state
        .store
        .get_call(&ws.id, &id)
        .await?
        .ok_or_else(call_not_found)?;
    if ended_here {
        return Ok(axum::Json(after.into()));
    }
    if after.status.is_final() {
        // It ended on its own between our read and the engine's answer.
        return Err(already_ended(&after));
    }
    Err(ApiError::conflict(
        "calls.not_live",
        "the call is live but held by another engine process; send the hangup to that process \
         or retry",
    ))
}

fn already_ended(c: &CallRecord) -> ApiError {
    ApiError::conflict(
        "calls.not_live",
        format!(
            "the call has already ended (status {}); only a live call can be hung up",
            c.status.as_str()
        ),
    )
}
