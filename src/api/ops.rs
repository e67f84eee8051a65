//! Health, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};

#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
    pub version: String,
}

/// Liveness and database reachability.
#[utoipa::path(get, path = "/healthz", tag = "ops", security(()),
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let db = state.store.db();
    let ok = !db.health.is_down() && sqlx::query("SELECT 1").execute(&db.read).await.is_ok();
    let body = axum::Json(Health {
        status: if ok { "ok" } else { "database_unreachable" }.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "ops", security(()),
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "ops", security(()),
    responses((status = 200, content_type = "application/json", body = Object),
        (status = 500, body = ErrorEnvelope, description = "`internal.error`")))]
pub async fn openapi(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let doc = state
        .openapi
        .get()
        .ok_or_else(|| ApiError::internal("OpenAPI document not built"))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], doc.clone()))
}
