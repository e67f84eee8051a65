//! Workspace webhook subscriptions, the delivery log, redelivery and the signing secret.

use axum::Extension;
use axum::extract::{OriginalUri, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{ApiJson, ApiQuery, Page, PageParams, UrlProblem, check_url, parse_id};
use super::middleware::Workspace;
use crate::time::to_api;
use crate::webhooks::outbox::{DeliveryFilter, DeliveryRecord, RedeliverError};
use crate::webhooks::subscriptions::{Subscription, SubscriptionError};
use crate::webhooks::{PatternError, validate_pattern};

const MAX_PATTERNS: usize = 20;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    #[schema(max_length = 2048, example = "https://crm.example.com/sautikit")]
    pub url: String,
    /// `*`, `number.*`, `wallet.*`, or exact kinds (`number.provisioned`, `number.renewed`,
    /// `number.suspended`, `number.reactivated`, `number.released`, `wallet.top_up`,
    /// `wallet.low_balance`). Call events go to each number's `events_url`.
    #[schema(value_type = Vec<super::schema::EventPattern>, inline, min_items = 1, max_items = 20, example = json!(["number.*", "wallet.low_balance"]))]
    pub events: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SubscriptionView {
    #[schema(format = Uuid)]
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    #[schema(value_type = super::schema::SubscriptionStatus, inline)]
    pub status: String,
    pub created_at: String,
    pub deleted_at: Option<String>,
}

impl From<Subscription> for SubscriptionView {
    fn from(s: Subscription) -> Self {
        SubscriptionView {
            id: s.id,
            url: s.url,
            events: s.events,
            status: s.status,
            created_at: to_api(s.created_at),
            deleted_at: s.deleted_at.map(to_api),
        }
    }
}

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> Self {
        match e {
            SubscriptionError::NotFound => {
                ApiError::not_found("webhooks.not_found", "webhook subscription not found")
            }
            e @ SubscriptionError::TooMany => {
                ApiError::unprocessable("webhooks.limit_reached", e.to_string())
            }
            SubscriptionError::Storage(e) => ApiError::internal(e),
        }
    }
}

/// Subscribe a URL to number and wallet events.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = CreateSubscription,
    responses((status = 201, body = SubscriptionView),
        (status = 422, body = ErrorEnvelope, description = "`webhooks.invalid_url`, `webhooks.insecure_url`, `webhooks.event_unsupported`, `webhooks.event_unknown`")))]
pub async fn create(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    ApiJson(body): ApiJson<CreateSubscription>,
) -> Result<impl IntoResponse, ApiError> {
    check_url(&body.url, state.mode).map_err(|p| match p {
        UrlProblem::Insecure => {
            ApiError::unprocessable("webhooks.insecure_url", format!("url {p}"))
        }
        p => ApiError::unprocessable("webhooks.invalid_url", format!("url {p}")),
    })?;
    if body.events.is_empty() || body.events.len() > MAX_PATTERNS {
        return Err(ApiError::unprocessable(
            "webhooks.events_invalid",
            format!("events must list 1 to {MAX_PATTERNS} event kinds or patterns"),
        ));
    }
    let mut events: Vec<String> = Vec::new();
    for p in &body.events {
        validate_pattern(p).map_err(|e| match e {
            PatternError::CallEvents(p) => ApiError::unprocessable(
                "webhooks.event_unsupported",
                format!(
                    "{p:?}: call events are delivered to each number's events_url, \
                     not to workspace webhooks"
                ),
            ),
            PatternError::Unknown(p) => ApiError::unprocessable(
                "webhooks.event_unknown",
                format!(
                    "{p:?} is not an event kind; use *, number.*, wallet.* or one of {}",
                    crate::webhooks::SUBSCRIBABLE_KINDS.join(", ")
                ),
            ),
        })?;
        if !events.contains(p) {
            events.push(p.clone());
        }
    }
    let s = state
        .store
        .create_subscription(&ws.id, &body.url, &events, state.clock.now())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(SubscriptionView::from(s))))
}

/// Active subscriptions, newest first.
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", params(PageParams),
    responses((status = 200, body = [SubscriptionView])))]
pub async fn list(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    OriginalUri(uri): OriginalUri,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = page.limit()?;
    let after = page.after()?;
    let rows = state
        .store
        .list_subscriptions(&ws.id, after.as_deref(), limit + 1)
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |s| s.id.clone(),
        SubscriptionView::from,
    ))
}

/// Delete a subscription; its undelivered events are canceled.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = SubscriptionView), (status = 404, body = ErrorEnvelope)))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
) -> Result<axum::Json<SubscriptionView>, ApiError> {
    let id = parse_id(&id, "webhook id")?;
    let s = state
        .store
        .delete_subscription(&ws.id, &id, state.clock.now())
        .await?;
    Ok(axum::Json(s.into()))
}

#[derive(Serialize, ToSchema)]
pub struct AttemptJson {
    pub attempt: i64,
    pub attempted_at: String,
    /// The receiver's HTTP status; absent when no response came.
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    /// `timeout: …`, `connect: …`, `address.forbidden: …`
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub event_id: String,
    pub event_kind: String,
    /// Absent for call events sent to a number's `events_url`.
    #[schema(format = Uuid)]
    pub subscription_id: Option<String>,
    pub url: String,
    #[schema(format = Uuid)]
    pub number_id: Option<String>,
    #[schema(format = Uuid)]
    pub call_id: Option<String>,
    #[schema(value_type = super::schema::DeliveryStatus, inline)]
    pub status: String,
    pub attempt_count: i64,
    pub next_attempt_at: Option<String>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
    pub attempts: Vec<AttemptJson>,
}

impl From<DeliveryRecord> for DeliveryView {
    fn from(d: DeliveryRecord) -> Self {
        DeliveryView {
            id: d.id,
            event_id: d.event_id,
            event_kind: d.event_kind,
            subscription_id: d.subscription_id,
            url: d.url,
            number_id: d.number_id,
            call_id: d.call_id,
            status: d.status,
            attempt_count: d.attempt_count,
            next_attempt_at: d.next_attempt_at.map(to_api),
            last_status_code: d.last_status_code,
            last_error: d.last_error,
            created_at: to_api(d.created_at),
            delivered_at: d.delivered_at.map(to_api),
            attempts: d
                .attempts
                .into_iter()
                .map(|a| AttemptJson {
                    attempt: a.attempt,
                    attempted_at: to_api(a.attempted_at),
                    status_code: a.status_code,
                    latency_ms: a.latency_ms,
                    error: a.error,
                })
                .collect(),
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    pub event_kind: Option<String>,
    #[param(value_type = Option<super::schema::DeliveryStatus>, inline)]
    pub status: Option<String>,
    #[param(format = Uuid)]
    pub call_id: Option<String>,
    #[param(format = Uuid)]
    pub number_id: Option<String>,
    /// Page size, 1–100 (default 25).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// Every delivery with its attempts, newest first.
#[utoipa::path(get, path = "/v1/webhooks/deliveries", tag = "webhooks", params(DeliveriesQuery),
    responses((status = 200, body = [DeliveryView]), (status = 400, body = ErrorEnvelope)))]
pub async fn deliveries(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    OriginalUri(uri): OriginalUri,
    ApiQuery(q): ApiQuery<DeliveriesQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    if let Some(s) = &q.status
        && !["pending", "succeeded", "dead_letter", "canceled"].contains(&s.as_str())
    {
        return Err(ApiError::bad_request(
            "request.invalid_query",
            "status must be pending, succeeded, dead_letter or canceled",
        ));
    }
    let ids = |v: Option<String>, what: &str| v.map(|v| parse_id(&v, what)).transpose();
    let rows = state
        .store
        .list_deliveries(
            &ws.id,
            &DeliveryFilter {
                id: None,
                event_kind: q.event_kind,
                status: q.status,
                call_id: ids(q.call_id, "call_id")?,
                number_id: ids(q.number_id, "number_id")?,
                before_id: page.after()?,
                limit: limit + 1,
            },
        )
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |d| d.id.clone(),
        DeliveryView::from,
    ))
}

/// Queue a new attempt now, also for a dead letter.
#[utoipa::path(post, path = "/v1/webhooks/deliveries/{id}/redeliver", tag = "webhooks",
    params(("id" = uuid::Uuid, Path)),
    responses((status = 202, body = DeliveryView), (status = 404, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope, description = "`webhooks.delivery_canceled`")))]
pub async fn redeliver(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id, "delivery id")?;
    let d = state
        .store
        .redeliver(&ws.id, &id, state.clock.now())
        .await
        .map_err(|e| match e {
            RedeliverError::NotFound => {
                ApiError::not_found("webhooks.delivery_not_found", "delivery not found")
            }
            e @ RedeliverError::Canceled => {
                ApiError::conflict("webhooks.delivery_canceled", e.to_string())
            }
            RedeliverError::Storage(e) => ApiError::internal(e),
        })?;
    Ok((StatusCode::ACCEPTED, axum::Json(DeliveryView::from(d))))
}

#[derive(Serialize, ToSchema)]
pub struct SecretView {
    /// Shown once; deliveries from now on are signed with it.
    pub webhook_secret: String,
}

/// Replace the workspace's signing secret.
#[utoipa::path(post, path = "/v1/webhooks/secret/rotate", tag = "webhooks",
    responses((status = 200, body = SecretView)))]
pub async fn rotate_secret(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
) -> Result<axum::Json<SecretView>, ApiError> {
    let webhook_secret = state.store.rotate_webhook_secret(&ws.id).await?;
    Ok(axum::Json(SecretView { webhook_secret }))
}
