//! The HTTP API (DESIGN §5): axum routes, with the OpenAPI document generated from the same
//! route table so it cannot drift from what is served.

pub mod calls;
mod common_responses;
pub mod credentials;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod numbers;
pub mod ops;
pub mod placing;
pub mod registrations;
pub mod schema;
pub mod usage;
pub mod wallet;
pub mod webhooks;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::{from_fn, from_fn_with_state};
use dashmap::DashMap;
use metrics_exporter_prometheus::PrometheusHandle;
use sautikit_actors::Engine;
use sautikit_actors::clock::Clock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::error::ApiError;
use crate::config::Mode;
use crate::store::SqlStore;

#[derive(Clone)]
pub struct AppState {
    pub store: SqlStore,
    pub engine: Arc<Engine>,
    pub clock: Arc<dyn Clock>,
    pub mode: Mode,
    pub metrics: PrometheusHandle,
    /// SHA-256 of an API key → (workspace id, when it was looked up).
    pub auth_cache: Arc<DashMap<String, (String, Instant)>>,
    pub openapi: Arc<OnceLock<String>>,
    /// Limits on placing calls through the API.
    pub placing: Arc<placing::Placing>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sautikit API",
        description = "Programmable voice for Africa: numbers, wallets, SIP credentials. \
                       Errors are always `{\"error\": {\"code\", \"message\", \"request_id\"}}`. \
                       Lists are bare arrays, newest first, with `Link: <…>; rel=\"next\"`. \
                       POSTs accept `Idempotency-Key`."
    ),
    components(schemas(error::ErrorEnvelope)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("sk_…")
                    .build(),
            ),
        );
    }
}

/// Every route, its middleware, and the OpenAPI document describing them.
pub fn router(state: AppState) -> Router {
    let mut authed = OpenApiRouter::new()
        .routes(routes!(numbers::list_available))
        .routes(routes!(numbers::claim))
        .routes(routes!(numbers::list_numbers))
        .routes(routes!(numbers::get_number, numbers::release_number))
        .routes(routes!(numbers::update_routing))
        .routes(routes!(credentials::create, credentials::list))
        .routes(routes!(credentials::rotate))
        .routes(routes!(credentials::revoke))
        .routes(routes!(registrations::list))
        .routes(routes!(registrations::delete))
        .routes(routes!(wallet::get_wallet, wallet::update_wallet))
        .routes(routes!(wallet::transactions))
        .routes(routes!(wallet::topup))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::delete))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(webhooks::redeliver))
        .routes(routes!(webhooks::rotate_secret))
        .routes(routes!(usage::usage))
        .routes(routes!(usage::call_stats))
        .routes(routes!(calls::list_calls, placing::place_call))
        .routes(routes!(calls::get_call))
        .routes(routes!(calls::call_events))
        .routes(routes!(calls::hangup))
        .routes(routes!(calls::get_recording))
        .routes(routes!(calls::list_recordings))
        .route_layer(from_fn_with_state(state.clone(), middleware::authenticate));
    common_responses::add(authed.get_openapi_mut(), true);
    let mut open = OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi));
    common_responses::add(open.get_openapi_mut(), false);
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(authed)
        .merge(open)
        .split_for_parts();
    // `serde_json` cannot fail on utoipa's document; an empty one would still be served.
    let _ = state
        .openapi
        .set(serde_json::to_string_pretty(&doc).unwrap_or_default());
    router
        .fallback(|| async {
            ApiError::not_found("route.not_found", "no such route; see /v1/openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method.not_allowed",
                "this route does not accept that method; see /v1/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(from_fn(middleware::request_context))
        .with_state(state)
}
