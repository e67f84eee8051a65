//! `POST /v1/calls` (DESIGN §5): place a call from one of the workspace's numbers through the
//! outbound trunk. Two limits are kept apart so a customer can tell them apart: a per-workspace
//! call rate (a token bucket, `429 calls.rate_limited` with `Retry-After`) and a number of live
//! placed calls (`429 calls.concurrency_exceeded`, counted in the database under the wallet's
//! lock, so a slot is free again as soon as a call's end is written, however it ended).

use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use sautikit_actors::Engine;
use sautikit_actors::call_store::{CallEnded, CallStatus, CallStore, NumberRoute};
use sautikit_actors::calls::PlacedCall;
use sautikit_actors::model::NumberStatus;
use sautikit_actors::money;
use serde::{Deserialize, Serialize};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{ApiJson, UrlProblem, check_url};
use super::middleware::Workspace;
use crate::calls_store::{NewPlacedCall, PlacedCallStart};
use crate::config::Mode;

/// Numbers one call may ring at once.
const MAX_TARGETS: usize = 10;
/// Ring time when `timeout` is not given, and the longest allowed.
const DEFAULT_TIMEOUT_SECS: i64 = 30;
const MAX_TIMEOUT_SECS: i64 = 600;
/// The longest `time_limit` (four hours).
const MAX_TIME_LIMIT_SECS: i64 = 4 * 3600;
const MAX_CLIENT_REQUEST_ID: usize = 255;

/// The limits on placing calls, per workspace.
pub struct Placing {
    per_second: f64,
    max_live: i64,
    buckets: DashMap<String, Bucket>,
}

/// A token bucket as deep as one second's worth of calls.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Placing {
    pub fn new(per_second: u32, max_live: u32) -> Self {
        Placing {
            per_second: f64::from(per_second.max(1)),
            max_live: i64::from(max_live),
            buckets: DashMap::new(),
        }
    }

    /// Take a token for one call; `Err(wait)` when there is none (how long until there is).
    fn take(&self, workspace_id: &str, now: Instant) -> Result<(), Duration> {
        let mut bucket = self
            .buckets
            .entry(workspace_id.to_owned())
            .or_insert(Bucket {
                tokens: self.per_second,
                at: now,
            });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.per_second);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

/// One number, or up to ten rung at once.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Targets {
    One(String),
    Many(Vec<String>),
}

/// What [`is_e164`] accepts.
const E164_PATTERN: &str = r"^\+[1-9][0-9]{6,14}$";

fn e164_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(E164_PATTERN))
}

impl PartialSchema for Targets {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .description(Some(
                "E.164, or an array of up to 10 rung at once (the first to answer is connected).",
            ))
            .item(e164_schema())
            .item(
                ArrayBuilder::new()
                    .items(e164_schema())
                    .min_items(Some(1))
                    .max_items(Some(MAX_TARGETS)),
            )
            .into()
    }
}

impl ToSchema for Targets {}

/// A call to place.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceCallRequest {
    /// An active number of this workspace: the call is its (billed at its outbound rate, its
    /// voice callback and events unless overridden here).
    #[schema(pattern = r"^\+[1-9][0-9]{6,14}$", example = "+254700000001")]
    pub from: String,
    // Described by `Targets`: a field description would wrap its `oneOf` in an `allOf`.
    #[schema(inline, example = "+254711000001")]
    pub to: Targets,
    /// The number the callee sees: one of this workspace's active numbers (default `from`).
    #[schema(pattern = r"^\+[1-9][0-9]{6,14}$")]
    pub caller_id: Option<String>,
    /// Where the script comes from once the callee answers (default: the number's).
    #[schema(max_length = 2048)]
    pub voice_callback_url: Option<String>,
    /// Where this call's events go (default: the number's).
    #[schema(max_length = 2048)]
    pub events_url: Option<String>,
    /// Seconds to ring, 1–600 (default 30); then `no_answer`.
    #[schema(minimum = 1, maximum = 600)]
    pub timeout: Option<i64>,
    /// Seconds the answered call may last, 1–14400 (default: as long as the wallet pays).
    #[schema(minimum = 1, maximum = 14400)]
    pub time_limit: Option<i64>,
    /// Your own id for the call, up to 255 characters: echoed in the answer, the call record,
    /// every callback (`ClientRequestId`) and every event.
    #[schema(min_length = 1, max_length = 255)]
    pub client_request_id: Option<String>,
}

/// A placed call.
#[derive(Serialize, ToSchema)]
pub struct PlacedCallView {
    #[schema(format = Uuid)]
    pub call_id: String,
    /// Always `ringing`: follow the call in its events or `GET /v1/calls/{id}`.
    #[schema(example = "ringing")]
    pub status: String,
    #[schema(min_length = 1, max_length = 255)]
    pub client_request_id: Option<String>,
}

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::unprocessable(code, message)
}

/// `+` and 7–15 digits, the first not 0.
fn is_e164(n: &str) -> bool {
    n.strip_prefix('+').is_some_and(|d| {
        (7..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
    })
}

fn targets(to: Targets) -> Result<Vec<String>, ApiError> {
    let list = match to {
        Targets::One(n) => vec![n],
        Targets::Many(list) => list,
    };
    if list.is_empty() {
        return Err(invalid(
            "calls.invalid_to",
            "to must name at least one number",
        ));
    }
    if list.len() > MAX_TARGETS {
        return Err(invalid(
            "calls.too_many_targets",
            format!("to may ring at most {MAX_TARGETS} numbers at once"),
        ));
    }
    if let Some(bad) = list.iter().find(|n| !is_e164(n)) {
        return Err(invalid(
            "calls.invalid_to",
            format!("to must be E.164 numbers like +254711000001, not {bad:?}"),
        ));
    }
    Ok(list)
}

fn seconds(field: &str, v: Option<i64>, max: i64) -> Result<Option<Duration>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) if (1..=max).contains(&s) => Ok(Some(Duration::from_secs(s.unsigned_abs()))),
        Some(_) => Err(invalid(
            if field == "timeout" {
                "calls.invalid_timeout"
            } else {
                "calls.invalid_time_limit"
            },
            format!("{field} must be a whole number of seconds from 1 to {max}"),
        )),
    }
}

fn url(field: &str, raw: Option<String>, mode: Mode) -> Result<Option<String>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    check_url(&raw, mode).map_err(|p| match p {
        UrlProblem::Insecure => invalid(
            "calls.insecure_url",
            format!("{field} must use https:// in production"),
        ),
        p => invalid("calls.invalid_url", format!("{field} {p}")),
    })?;
    Ok(Some(raw))
}

/// The workspace's active number `n`, or `code`.
async fn own_number(
    state: &AppState,
    ws: &Workspace,
    n: &str,
    field: &str,
    code: &'static str,
) -> Result<NumberRoute, ApiError> {
    let route = if is_e164(n) {
        state.store.route_by_number(n).await?
    } else {
        None
    };
    route
        .filter(|r| r.workspace_id == ws.id && r.status == NumberStatus::Active)
        .ok_or_else(|| {
            invalid(
                code,
                format!("{field} must be an active number of this workspace, not {n:?}"),
            )
        })
}

fn too_many(code: &'static str, message: &str, retry_after: Duration) -> Response {
    let mut response = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message).into_response();
    let secs = retry_after.as_secs_f64().ceil().max(1.0);
    if let Ok(v) = HeaderValue::from_str(&format!("{secs:.0}")) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// Place a call through the outbound trunk. It rings `to` (several at once: the first to answer
/// is connected); when the callee answers, the voice callback is asked for a script with
/// `Direction=outbound`, and it runs exactly as for an inbound call. Billed per second at the
/// `from` number's outbound rate; at least one minute of balance is needed to start.
#[utoipa::path(post, path = "/v1/calls", tag = "calls", request_body = PlaceCallRequest,
    responses(
        (status = 201, body = PlacedCallView, description = "The call is ringing"),
        (status = 402, body = ErrorEnvelope, description = "`wallet.insufficient_funds`: less than one minute at the outbound rate is free"),
        (status = 422, body = ErrorEnvelope, description = "`calls.invalid_from`, `calls.invalid_to`, `calls.too_many_targets`, `calls.invalid_caller_id`, `calls.invalid_timeout`, `calls.invalid_time_limit`, `calls.invalid_url`, `calls.insecure_url`, `calls.no_voice_callback`, `calls.invalid_client_request_id`"),
        (status = 429, body = ErrorEnvelope, description = "`calls.rate_limited` (with `Retry-After`), `calls.concurrency_exceeded`"),
        (status = 503, body = ErrorEnvelope, description = "`calls.unavailable`: no outbound trunk is configured")))]
pub async fn place_call(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    ApiJson(body): ApiJson<PlaceCallRequest>,
) -> Result<Response, ApiError> {
    let to = targets(body.to)?;
    let ring_timeout = seconds("timeout", body.timeout, MAX_TIMEOUT_SECS)?
        .unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT_SECS.unsigned_abs()));
    let time_limit = seconds("time_limit", body.time_limit, MAX_TIME_LIMIT_SECS)?;
    let voice_override = url("voice_callback_url", body.voice_callback_url, state.mode)?;
    let events_override = url("events_url", body.events_url, state.mode)?;
    if let Some(id) = &body.client_request_id
        && (id.is_empty() || id.chars().count() > MAX_CLIENT_REQUEST_ID)
    {
        return Err(invalid(
            "calls.invalid_client_request_id",
            format!("client_request_id must be 1 to {MAX_CLIENT_REQUEST_ID} characters"),
        ));
    }
    let (Some(local), Some(engine_id)) = (state.engine.sip_addr(), state.engine.engine_id()) else {
        return Err(unavailable());
    };
    if !state.engine.can_place_calls() {
        return Err(unavailable());
    }
    let mut route = own_number(&state, &ws, &body.from, "from", "calls.invalid_from").await?;
    let caller_id = match body.caller_id {
        Some(c) if c != route.number => {
            own_number(&state, &ws, &c, "caller_id", "calls.invalid_caller_id")
                .await?
                .number
        }
        _ => route.number.clone(),
    };
    route.voice_callback_url = voice_override.clone().or(route.voice_callback_url);
    if route.voice_callback_url.is_none() {
        return Err(invalid(
            "calls.no_voice_callback",
            "the number has no voice_callback_url: set its routing or give voice_callback_url",
        ));
    }
    if let Err(wait) = state.placing.take(&ws.id, Instant::now()) {
        metrics::counter!("sautikit_calls_refused_total", "reason" => "rate_limited").increment(1);
        return Ok(too_many(
            "calls.rate_limited",
            "too many calls placed per second; retry after Retry-After seconds",
            wait,
        ));
    }
    let call_id = uuid::Uuid::now_v7().to_string();
    let sip_call_id = Engine::new_sip_call_id();
    let new = NewPlacedCall {
        call_id: call_id.clone(),
        workspace_id: ws.id.clone(),
        number_id: route.number_id.clone(),
        from: caller_id.clone(),
        to: to[0].clone(),
        sip_call_id: sip_call_id.clone(),
        engine_id: engine_id.to_owned(),
        started_at: state.clock.now(),
        client_request_id: body.client_request_id.clone(),
        voice_callback_url: voice_override,
        events_url: events_override,
        slice_minor: money::prepaid_slice_minor(route.outbound_per_min_minor),
        max_live: state.placing.max_live,
        idempotency: crate::idempotency::request_key(),
    };
    let writing = Instant::now();
    let written = match state.store.start_placed_call(&new).await {
        Ok(written) => written,
        Err(e) => {
            // The row (and its reservation) may have committed unseen: the engine ends it if so.
            state.engine.end_if_started(call_id, state.clock.now());
            return Err(e.into());
        }
    };
    tracing::debug!(call_id = %call_id, workspace_id = %ws.id, ms = writing.elapsed().as_secs_f64() * 1e3, "placed call written");
    let reserved_minor = match written {
        PlacedCallStart::Written { reserved_minor } => reserved_minor,
        PlacedCallStart::InsufficientFunds => {
            return Err(ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "wallet.insufficient_funds",
                "the wallet holds less than one minute at the number's outbound rate",
            ));
        }
        PlacedCallStart::ConcurrencyExceeded => {
            metrics::counter!("sautikit_calls_refused_total", "reason" => "concurrency")
                .increment(1);
            return Ok(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "calls.concurrency_exceeded",
                format!(
                    "the workspace already has {} live calls placed through the API",
                    state.placing.max_live
                ),
            )
            .into_response());
        }
    };
    let placed = PlacedCall {
        call_id: call_id.clone(),
        sip_call_id,
        route,
        caller_id,
        to,
        ring_timeout,
        time_limit,
        client_request_id: body.client_request_id.clone(),
        reserved_minor,
        local,
    };
    let started = match state.engine.place_call(placed).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(refusal)) => Err(refusal.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(reason) = started {
        // The row is written: end it, which frees its reservation and slot.
        tracing::warn!(call_id = %call_id, workspace_id = %ws.id, error = %reason, "a placed call could not start");
        let end = CallEnded {
            call_id,
            status: CallStatus::Failed,
            ended_at: state.clock.now(),
            hangup_cause: None,
            failure_reason: Some("engine.unavailable".into()),
            sip_status: None,
            timeline: Vec::new(),
        };
        if let Err(e) = state.store.call_ended(end.clone()).await {
            // Never left open holding its reservation: the engine writes it once it can.
            state.engine.end_later(end);
            return Err(e.into());
        }
        return Err(unavailable());
    }
    metrics::counter!("sautikit_calls_placed_total").increment(1);
    Ok((
        StatusCode::CREATED,
        axum::Json(PlacedCallView {
            call_id,
            status: "ringing".into(),
            client_request_id: body.client_request_id,
        }),
    )
        .into_response())
}

fn unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "calls.unavailable",
        "calls cannot be placed: no outbound trunk is configured (SAUTIKIT_OUTBOUND_TRUNK)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_one_seconds_worth_and_refills() {
        let p = Placing::new(10, 100);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(p.take("ws", t0).is_ok());
        }
        let wait = p
            .take("ws", t0)
            .expect_err("the eleventh call in a second waits");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another workspace has its own bucket.
        assert!(p.take("other", t0).is_ok());
        assert!(p.take("ws", t0 + Duration::from_millis(100)).is_ok());
        assert!(p.take("ws", t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn targets_are_e164() {
        assert!(is_e164("+254711000001"));
        assert!(!is_e164("254711000001"));
        assert!(!is_e164("+0711000001"));
        assert!(!is_e164("sip:alice@10.0.0.1"));
        assert!(!is_e164("+25471100000123456"));
    }
}
