//! Request context (id, log span, metrics), bearer authentication and `Idempotency-Key`.

use std::time::{Duration, Instant};

use axum::body::{Body, to_bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tracing::{Instrument, info_span, warn};

use super::AppState;
use super::error::{ApiError, REQUEST_ID};
use super::extract::{MAX_BODY_BYTES, too_large};
use crate::idempotency::{IdempotencyBegin, with_request_key};
use crate::secrets;
use sautikit_actors::store::IdempotencyMark;

/// How long a resolved API key is trusted without asking the database again.
const AUTH_CACHE_TTL: Duration = Duration::from_secs(30);
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The workspace the caller's API key belongs to.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub id: String,
}

/// Outermost layer: a request id for logs, the error envelope and the `X-Request-Id` header.
pub async fn request_context(req: Request, next: Next) -> Response {
    let request_id = format!("req_{}", uuid::Uuid::now_v7().simple());
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = info_span!(
        "http",
        request_id = %request_id,
        method = %method,
        route = %route,
        workspace_id = tracing::field::Empty
    );
    let started = Instant::now();
    let mut resp = REQUEST_ID
        .scope(request_id.clone(), next.run(req))
        .instrument(span.clone())
        .await;
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "request"
        )
    });
    let labels = [
        ("method", method.to_string()),
        ("route", route),
        ("status", status.to_string()),
    ];
    metrics::counter!("sautikit_http_requests_total", &labels).increment(1);
    metrics::histogram!("sautikit_http_request_duration_seconds", &labels)
        .record(elapsed.as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Resolves `Authorization: Bearer sk_…` to a [`Workspace`], then applies `Idempotency-Key`.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // Known to be down: answer now rather than after the pool's acquire timeout.
    if state.store.db().health.is_down() {
        return ApiError::storage_unavailable().into_response();
    }
    let workspace = match resolve_workspace(&state, req.headers()).await {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    tracing::Span::current().record("workspace_id", workspace.id.as_str());
    req.extensions_mut().insert(workspace.clone());
    let key = req.headers().get(IDEMPOTENCY_HEADER).cloned();
    match key {
        Some(key) if req.method() == Method::POST => {
            idempotent(&state, &workspace, key, req, next).await
        }
        _ => next.run(req).await,
    }
}

async fn resolve_workspace(state: &AppState, headers: &HeaderMap) -> Result<Workspace, ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| secrets::is_well_formed_api_key(k))
        .ok_or_else(ApiError::unauthorized)?;
    let hash = secrets::hash_api_key(key);
    if let Some(hit) = state.auth_cache.get(&hash)
        && hit.1.elapsed() < AUTH_CACHE_TTL
    {
        return Ok(Workspace { id: hit.0.clone() });
    }
    let workspace_id = state
        .store
        .workspace_for_key_hash(&hash)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    state
        .auth_cache
        .insert(hash, (workspace_id.clone(), Instant::now()));
    Ok(Workspace { id: workspace_id })
}

/// DESIGN §5: the response to a POST is kept 24 h per (workspace, key, body hash). A replay gets
/// it again with `Idempotent-Replay: true`; the same key with another body is a 409.
async fn idempotent(
    state: &AppState,
    workspace: &Workspace,
    key: HeaderValue,
    req: Request,
    next: Next,
) -> Response {
    let key = match key.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => {
            k.to_owned()
        }
        _ => {
            return ApiError::bad_request(
                "idempotency.invalid_key",
                "Idempotency-Key must be 1 to 255 printable ASCII characters",
            )
            .into_response();
        }
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_BODY_BYTES).await else {
        return too_large().into_response();
    };
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str().as_bytes());
    hasher.update(b" ");
    hasher.update(parts.uri.path().as_bytes());
    hasher.update(b"\n");
    hasher.update(&bytes);
    let request_hash = hex::encode(hasher.finalize());

    let begin = state
        .store
        .idempotency_begin(&workspace.id, &key, &request_hash, state.clock.now())
        .await;
    match begin {
        Err(e) => return ApiError::from(e).into_response(),
        Ok(IdempotencyBegin::Conflict) => {
            return ApiError::conflict(
                "idempotency.conflict",
                "this Idempotency-Key was used with a different request",
            )
            .into_response();
        }
        Ok(IdempotencyBegin::InProgress) => {
            return ApiError::conflict(
                "idempotency.in_progress",
                "a request with this Idempotency-Key is still being processed",
            )
            .into_response();
        }
        Ok(IdempotencyBegin::ResponseLost) => {
            return ApiError::conflict(
                "idempotency.response_lost",
                "the request with this Idempotency-Key took effect, but its response was lost; \
                 look the result up rather than retrying",
            )
            .into_response();
        }
        Ok(IdempotencyBegin::Replay { status, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            return (
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::HeaderName::from_static("idempotent-replay"), "true"),
                ],
                body,
            )
                .into_response();
        }
        Ok(IdempotencyBegin::Fresh) => {}
    }

    let mark = IdempotencyMark {
        workspace_id: workspace.id.clone(),
        key: key.clone(),
    };
    let resp = with_request_key(
        mark,
        next.run(Request::from_parts(parts, Body::from(bytes))),
    )
    .await;
    let (parts, body) = resp.into_parts();
    let body = match to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            let _ = state.store.idempotency_forget(&workspace.id, &key).await;
            return ApiError::internal(e).into_response();
        }
    };
    // Our own failures and rate limits are not remembered: they say "try again later", and the
    // client's retry must get a real second attempt — unless the request's change was committed
    // before it failed: then its response is kept like any other, and a retry gets it.
    let retryable = parts.status.is_server_error() || parts.status == StatusCode::TOO_MANY_REQUESTS;
    let forgotten = if retryable {
        state.store.idempotency_forget(&workspace.id, &key).await
    } else {
        Ok(false)
    };
    let outcome = match forgotten {
        Ok(true) => Ok(()),
        Ok(false) => {
            state
                .store
                .idempotency_finish(
                    &workspace.id,
                    &key,
                    parts.status.as_u16(),
                    &String::from_utf8_lossy(&body),
                )
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        warn!(error = %e, "could not record the idempotent response");
    }
    Response::from_parts(parts, Body::from(body))
}
