//! Call records, their timelines, their recordings, and hanging up a live call (DESIGN §5).

use axum::Extension;
use axum::body::Body;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use sautikit_actors::call_store::CallStatus;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{ApiQuery, Page, PageParams, parse_id};
use super::middleware::Workspace;
use crate::calls_store::{CallFilter, CallRecord, TimelineRecord, to_api_millis};
use crate::recordings::{self, RecordingFileError, RecordingRecord};
use crate::time::to_api;

/// A timeline is short and read whole far more often than paged.
const TIMELINE_DEFAULT_LIMIT: i64 = 100;

/// A call record. Timestamps are to the second; `null` where not (yet) known.
#[derive(Serialize, ToSchema)]
pub struct CallView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub number_id: String,
    #[schema(value_type = super::schema::Direction, inline, example = "inbound")]
    pub direction: String,
    #[schema(value_type = super::schema::CallStatus, inline, example = "completed")]
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
    /// For a dialled party's leg: the call that dialled it; `null` otherwise.
    #[schema(format = Uuid)]
    pub parent_call_id: Option<String>,
    /// For a call placed through the API: the `client_request_id` it was given (or `null`).
    /// Absent on other calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<Option<String>>,
    /// The far end's final SIP code for outbound calls (200 once answered, 486 busy, 487
    /// cancelled, …); `null` until known and for inbound calls.
    #[schema(example = 200)]
    pub sip_status: Option<i64>,
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
            parent_call_id: c.parent_call_id,
            client_request_id: (c.origin == "api").then_some(c.client_request_id),
            sip_status: c.sip_status,
        }
    }
}

/// One timeline entry: a SIP message, a callback, an action, a status change or the charge.
#[derive(Serialize, ToSchema)]
pub struct TimelineView {
    #[schema(format = Uuid)]
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

/// The workspace's call; another workspace's call is a 404 like an unknown one.
async fn owned_call(state: &AppState, ws: &Workspace, id: &str) -> Result<CallRecord, ApiError> {
    state
        .store
        .get_call(&ws.id, id)
        .await?
        .ok_or_else(call_not_found)
}

fn invalid_query(message: &str) -> ApiError {
    ApiError::bad_request("request.invalid_query", message.to_owned())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallsQuery {
    /// Only calls of this number (its id).
    #[param(format = Uuid)]
    pub number_id: Option<String>,
    #[param(value_type = Option<super::schema::Direction>, inline)]
    pub direction: Option<String>,
    #[param(value_type = Option<super::schema::CallStatus>, inline)]
    pub status: Option<String>,
    /// Only the legs dialled by this call (its id).
    #[param(format = Uuid)]
    pub parent_call_id: Option<String>,
    /// Page size, 1–100 (default 25).
    #[param(minimum = 1, maximum = 100)]
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
    let parent_call_id = q
        .parent_call_id
        .as_deref()
        .map(|p| {
            parse_id(p, "parent_call_id")
                .map_err(|_| invalid_query("parent_call_id must be a UUID"))
        })
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
                parent_call_id,
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
    params(("id" = uuid::Uuid, Path, description = "The call's id")),
    responses((status = 200, body = CallView),
        (status = 400, body = ErrorEnvelope, description = "`request.invalid_id`"),
        (status = 404, body = ErrorEnvelope, description = "`calls.not_found`")))]
pub async fn get_call(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
) -> Result<axum::Json<CallView>, ApiError> {
    let id = parse_id(&id, "call id")?;
    let c = owned_call(&state, &ws, &id).await?;
    Ok(axum::Json(c.into()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TimelineQuery {
    /// Page size, 1–100 (default 100 here: a timeline is usually read whole).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Opaque: the value from the previous page's `Link: <…>; rel="next"`.
    pub cursor: Option<String>,
}

/// A call's timeline, OLDEST first (it is a timeline, unlike the newest-first lists): SIP
/// messages in and out, callbacks with latency and outcome, actions, status changes and the
/// charge. `limit` defaults to 100 here; the next page is in `Link: <…>; rel="next"`.
#[utoipa::path(get, path = "/v1/calls/{id}/events", tag = "calls",
    params(("id" = uuid::Uuid, Path, description = "The call's id"), TimelineQuery),
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
    owned_call(&state, &ws, &id).await?;
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
    params(("id" = uuid::Uuid, Path, description = "The call's id")),
    responses((status = 200, body = CallView, description = "The call's final record: the call was hung up, or had already ended (hanging up is idempotent)"),
        (status = 400, body = ErrorEnvelope, description = "`request.invalid_id`"),
        (status = 404, body = ErrorEnvelope, description = "`calls.not_found`"),
        (status = 409, body = ErrorEnvelope, description = "`calls.not_live`: the call is live but held by another engine process")))]
pub async fn hangup(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
) -> Result<axum::Json<CallView>, ApiError> {
    let id = parse_id(&id, "call id")?;
    let before = owned_call(&state, &ws, &id).await?;
    if before.status.is_final() {
        // Idempotent: a call that has ended is hung up; its record says how it ended.
        return Ok(axum::Json(before.into()));
    }
    let ended_here = state.engine.hangup_call(&ws.id, &id).await?;
    let after = owned_call(&state, &ws, &id).await?;
    if ended_here || after.status.is_final() {
        // Hung up here, or it ended on its own between our read and the engine's answer.
        return Ok(axum::Json(after.into()));
    }
    Err(ApiError::conflict(
        "calls.not_live",
        "the call is live but held by another engine process; send the hangup to that process \
         or retry",
    ))
}

fn recording_not_found() -> ApiError {
    ApiError::not_found("recordings.not_found", "recording not found")
}

/// A call's recording, without its file.
#[derive(Serialize, ToSchema)]
pub struct RecordingView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub call_id: String,
    /// Rounded to the nearest second, at least 1 for any recording with sound.
    #[schema(example = 14)]
    pub duration_seconds: i64,
    /// Size of the WAV file (8 kHz, 16-bit mono PCM).
    #[schema(example = 224_044)]
    pub size_bytes: i64,
    #[schema(example = "2026-06-27T12:00:00Z")]
    pub created_at: String,
    /// Where the WAV is served (with this API key):
    /// `<public URL>/v1/calls/{call_id}/recording?recording_id={id}`.
    pub download_url: String,
}

impl RecordingView {
    fn new(r: RecordingRecord, state: &AppState) -> Self {
        RecordingView {
            download_url: state.store.recording_download_url(&r.call_id, &r.id),
            duration_seconds: recordings::duration_seconds(r.duration_ms),
            id: r.id,
            call_id: r.call_id,
            size_bytes: r.size_bytes,
            created_at: to_api(r.created_at),
        }
    }
}

/// A WAV file (8 kHz, 16-bit mono PCM), for the OpenAPI document.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct WavFile(pub Vec<u8>);

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RecordingQuery {
    /// A recording of this call (its id); default: the most recent one.
    #[param(format = Uuid)]
    pub recording_id: Option<String>,
}

/// The WAV of a call's recording: the most recent one, or the one named by `recording_id`.
#[utoipa::path(get, path = "/v1/calls/{id}/recording", tag = "calls",
    params(("id" = uuid::Uuid, Path, description = "The call's id"), RecordingQuery),
    responses(
        (status = 200, content_type = "audio/wav", body = inline(WavFile),
            description = "The WAV file, with `Content-Length` and `Content-Disposition: inline; filename=\"<recording_id>.wav\"`"),
        (status = 400, body = ErrorEnvelope, description = "`request.invalid_id`"),
        (status = 404, body = ErrorEnvelope, description = "`calls.not_found`, `recordings.not_found`")))]
pub async fn get_recording(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<RecordingQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "call id")?;
    let recording_id = q
        .recording_id
        .as_deref()
        .map(|r| parse_id(r, "recording_id"))
        .transpose()?;
    // Another workspace's call is a 404 like any other, whatever its recordings.
    owned_call(&state, &ws, &id).await?;
    let rec = state
        .store
        .get_call_recording(&id, recording_id.as_deref())
        .await?
        .ok_or_else(recording_not_found)?;
    let config = state
        .store
        .recordings_config()
        .ok_or_else(|| ApiError::internal("recordings are not configured"))?;
    let opened = match recordings::open_recording(&config.data_dir, &rec.path).await {
        Ok(f) => f,
        Err(RecordingFileError::Missing(path)) => {
            // The row outlived its file (removed by hand or a lost disk): nothing to serve.
            tracing::warn!(recording_id = %rec.id, path = %path.display(), "recording file is missing");
            return Err(ApiError::not_found(
                "recordings.not_found",
                "the recording's file is no longer available",
            ));
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("audio/wav")),
        (header::CONTENT_LENGTH, HeaderValue::from(opened.len)),
        (
            header::CONTENT_DISPOSITION,
            // The id is a UUID: always a valid header value.
            HeaderValue::from_str(&format!("inline; filename=\"{}.wav\"", rec.id))
                .map_err(ApiError::internal)?,
        ),
    ];
    let body = Body::from_stream(recordings::file_stream(opened.file));
    Ok((headers, body).into_response())
}

/// A call's recordings, newest first (a call may record several times). Each has the
/// `download_url` of its WAV.
#[utoipa::path(get, path = "/v1/calls/{id}/recordings", tag = "calls",
    params(("id" = uuid::Uuid, Path, description = "The call's id"), PageParams),
    responses((status = 200, body = [RecordingView], description = "A page; `Link: <…>; rel=\"next\"` when there is more"),
        (status = 400, body = ErrorEnvelope, description = "`request.invalid_id`, `request.invalid_query`"),
        (status = 404, body = ErrorEnvelope, description = "`calls.not_found`")))]
pub async fn list_recordings(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    OriginalUri(uri): OriginalUri,
    Path(id): Path<String>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id, "call id")?;
    let limit = page.limit()?;
    let before = page.after()?;
    owned_call(&state, &ws, &id).await?;
    let rows = state
        .store
        .list_call_recordings(&id, before.as_deref(), limit + 1)
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |r| r.id.clone(),
        |r| RecordingView::new(r, &state),
    ))
}
