//! Inventory browsing, claims, tenant numbers and routing.

use axum::Extension;
use axum::extract::{OriginalUri, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use sautikit_actors::model::{NumberStatus, TenantNumber};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorEnvelope, number_not_found};
use super::extract::{
    ApiJson, ApiQuery, Page, PageParams, UrlProblem, check_url, is_country_code, parse_id,
};
use super::middleware::Workspace;
use crate::config::Mode;
use crate::store::{InventoryFilter, InventoryNumber, RoutingChange};
use crate::time::to_api;

/// An available number in the inventory (the guide's shape).
#[derive(Serialize, ToSchema)]
pub struct InventoryItem {
    #[schema(format = Uuid, example = "01900000-0000-7000-8000-000000000001")]
    pub id: String,
    #[schema(example = "+254700000001")]
    pub number: String,
    #[schema(example = "KE")]
    pub country: String,
    pub capabilities: Vec<String>,
    #[schema(example = 10000)]
    pub monthly_price_minor: i64,
    #[schema(example = 0)]
    pub inbound_per_min_minor: i64,
    #[schema(example = 300)]
    pub outbound_per_min_minor: i64,
    #[schema(example = "KES")]
    pub currency: String,
}

impl From<InventoryNumber> for InventoryItem {
    fn from(n: InventoryNumber) -> Self {
        InventoryItem {
            id: n.id,
            number: n.number,
            country: n.country,
            capabilities: n.capabilities,
            monthly_price_minor: n.monthly_price_minor,
            inbound_per_min_minor: n.inbound_per_min_minor,
            outbound_per_min_minor: n.outbound_per_min_minor,
            currency: n.currency,
        }
    }
}

/// The body of a successful claim (the guide's shape).
#[derive(Serialize, ToSchema)]
pub struct ClaimedNumber {
    #[schema(format = Uuid)]
    pub id: String,
    pub number: String,
    #[schema(example = "active")]
    pub status: String,
    pub currency: String,
    pub monthly_price_minor: i64,
    #[schema(example = "2026-06-27T12:00:00Z")]
    pub created_at: String,
}

/// A number owned by the workspace, with its routing.
#[derive(Serialize, ToSchema)]
pub struct NumberView {
    #[schema(format = Uuid)]
    pub id: String,
    pub number: String,
    #[schema(value_type = super::schema::NumberStatus, inline)]
    pub status: String,
    pub capabilities: Vec<String>,
    pub currency: String,
    pub monthly_price_minor: i64,
    pub inbound_per_min_minor: i64,
    pub outbound_per_min_minor: i64,
    pub voice_callback_url: Option<String>,
    pub events_url: Option<String>,
    /// When the next month's rental is debited (on the claim's day of the month). For a
    /// suspended number: the renewal that could not be paid.
    pub next_renewal_at: String,
    pub created_at: String,
    pub updated_at: String,
    pub released_at: Option<String>,
    /// When a renewal could not be paid. A suspended number takes no calls; a top-up that can
    /// pay renews it, and it is released if still unpaid `SAUTIKIT_SUSPENDED_RELEASE_DAYS` later.
    pub suspended_at: Option<String>,
}

impl From<TenantNumber> for NumberView {
    fn from(n: TenantNumber) -> Self {
        NumberView {
            id: n.id,
            number: n.number,
            status: n.status.as_str().to_owned(),
            capabilities: n.capabilities,
            currency: n.currency,
            monthly_price_minor: n.monthly_price_minor,
            inbound_per_min_minor: n.inbound_per_min_minor,
            outbound_per_min_minor: n.outbound_per_min_minor,
            voice_callback_url: n.voice_callback_url,
            events_url: n.events_url,
            next_renewal_at: to_api(n.next_renewal_at),
            created_at: to_api(n.created_at),
            updated_at: to_api(n.updated_at),
            released_at: n.released_at.map(to_api),
            suspended_at: n.suspended_at.map(to_api),
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AvailableQuery {
    /// ISO 3166-1 alpha-2, e.g. `KE`.
    #[param(pattern = "^[A-Z]{2}$")]
    pub country: Option<String>,
    /// ISO 4217, e.g. `KES`.
    #[param(value_type = Option<super::schema::Currency>, inline)]
    pub currency: Option<String>,
    #[param(value_type = Option<super::schema::Capability>, inline)]
    pub capability: Option<String>,
    /// Digits the number must contain (a leading `+` is ignored).
    #[param(pattern = r"^\+?[0-9]{1,15}$")]
    pub contains: Option<String>,
    /// Page size, 1–100 (default 25).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// Browse available numbers, ordered by number.
#[utoipa::path(get, path = "/v1/numbers/available", tag = "numbers",
    params(AvailableQuery),
    responses(
        (status = 200, body = [InventoryItem], description = "A page; `Link: <…>; rel=\"next\"` when there is more"),
        (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope)))]
pub async fn list_available(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    ApiQuery(q): ApiQuery<AvailableQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let invalid = |m: &str| ApiError::bad_request("request.invalid_query", m.to_owned());
    if let Some(c) = &q.country
        && !is_country_code(c)
    {
        return Err(invalid(
            "country must be an ISO 3166-1 alpha-2 code such as KE",
        ));
    }
    if let Some(c) = &q.currency {
        sautikit_actors::money::parse_currency(c).map_err(|e| invalid(&e.to_string()))?;
    }
    if let Some(c) = &q.capability
        && c != "voice"
        && c != "sms"
    {
        return Err(invalid("capability must be voice or sms"));
    }
    if let Some(d) = &q.contains {
        let digits = d.trim_start_matches('+');
        if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("contains must be 1 to 15 digits"));
        }
    }
    let rows = state
        .store
        .list_available(&InventoryFilter {
            country: q.country,
            currency: q.currency,
            capability: q.capability,
            contains: q.contains.map(|d| d.trim_start_matches('+').to_owned()),
            after_number: page.after()?,
            limit: limit + 1,
        })
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |n| n.number.clone(),
        InventoryItem::from,
    ))
}

/// Claim an available number: the first month is debited at once.
#[utoipa::path(post, path = "/v1/numbers/{inventory_id}/claim", tag = "numbers",
    params(("inventory_id" = uuid::Uuid, Path, description = "The inventory row's id")),
    responses(
        (status = 201, body = ClaimedNumber),
        (status = 402, body = ErrorEnvelope, description = "`wallet.insufficient_funds`"),
        (status = 404, body = ErrorEnvelope, description = "`numbers.not_found`"),
        (status = 409, body = ErrorEnvelope, description = "`numbers.already_claimed`")))]
pub async fn claim(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(inventory_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let inventory_id = parse_id(&inventory_id, "inventory id")?;
    let n = state
        .engine
        .claim_number(&ws.id, &inventory_id, crate::idempotency::request_key())
        .await?;
    metrics::counter!("sautikit_numbers_claimed_total").increment(1);
    Ok((
        StatusCode::CREATED,
        axum::Json(ClaimedNumber {
            id: n.id,
            number: n.number,
            status: n.status.as_str().to_owned(),
            currency: n.currency,
            monthly_price_minor: n.monthly_price_minor,
            created_at: to_api(n.created_at),
        }),
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NumbersQuery {
    #[param(value_type = Option<super::schema::NumberStatus>, inline)]
    pub status: Option<String>,
    /// Page size, 1–100 (default 25).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// The workspace's numbers, newest first.
#[utoipa::path(get, path = "/v1/numbers", tag = "numbers", params(NumbersQuery),
    responses((status = 200, body = [NumberView]), (status = 401, body = ErrorEnvelope)))]
pub async fn list_numbers(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    OriginalUri(uri): OriginalUri,
    ApiQuery(q): ApiQuery<NumbersQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            NumberStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "request.invalid_query",
                    "status must be active, suspended or released",
                )
            })
        })
        .transpose()?;
    let after = page.after()?;
    let rows = state
        .store
        .list_numbers(&ws.id, status, after.as_deref(), limit + 1)
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |n| n.id.clone(),
        NumberView::from,
    ))
}

/// One number with its routing and renewal date.
#[utoipa::path(get, path = "/v1/numbers/{id}", tag = "numbers",
    params(("id" = uuid::Uuid, Path, description = "The number's id (from the claim)")),
    responses((status = 200, body = NumberView), (status = 404, body = ErrorEnvelope)))]
pub async fn get_number(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
) -> Result<axum::Json<NumberView>, ApiError> {
    let id = parse_id(&id, "number id")?;
    let n = state
        .store
        .get_number(&ws.id, &id)
        .await?
        .ok_or_else(number_not_found)?;
    Ok(axum::Json(n.into()))
}

/// Release a number: renewals stop at once, its SIP credentials are revoked, and it returns to
/// the inventory. The current month is not refunded: the rental already paid runs to its end
/// unused.
#[utoipa::path(delete, path = "/v1/numbers/{id}", tag = "numbers",
    params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = NumberView), (status = 404, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope, description = "`numbers.released`")))]
pub async fn release_number(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
) -> Result<axum::Json<NumberView>, ApiError> {
    let id = parse_id(&id, "number id")?;
    let n = state.engine.release_number(&ws.id, &id).await?;
    // Calls to it must stop being routed at once, not when the cached route expires.
    state.engine.number_changed(&n.id);
    Ok(axum::Json(n.into()))
}

/// A routing change. Omit a field to keep it; `null` clears it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutingRequest {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 2048, example = "https://ivr.example.com/voice")]
    pub voice_callback_url: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 2048, example = "https://ivr.example.com/events")]
    pub events_url: Option<Option<String>>,
}

/// Distinguishes a field given as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

fn validate_url(field: &str, raw: &str, mode: Mode) -> Result<String, ApiError> {
    check_url(raw, mode).map_err(|p| match p {
        UrlProblem::Insecure => ApiError::unprocessable(
            "routing.insecure_url",
            format!("{field} must use https:// in production"),
        ),
        p => ApiError::unprocessable("routing.invalid_url", format!("{field} {p}")),
    })?;
    Ok(raw.to_owned())
}

/// Set where calls to this number are delivered.
#[utoipa::path(patch, path = "/v1/numbers/{id}/routing", tag = "numbers",
    params(("id" = uuid::Uuid, Path)), request_body = RoutingRequest,
    responses((status = 200, body = NumberView), (status = 404, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope, description = "`numbers.released`"),
        (status = 422, body = ErrorEnvelope, description = "`routing.invalid_url`, `routing.insecure_url`, `routing.empty`")))]
pub async fn update_routing(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RoutingRequest>,
) -> Result<axum::Json<NumberView>, ApiError> {
    let id = parse_id(&id, "number id")?;
    if body.voice_callback_url.is_none() && body.events_url.is_none() {
        return Err(ApiError::unprocessable(
            "routing.empty",
            "give voice_callback_url, events_url or both",
        ));
    }
    let check = |field: &str, v: Option<Option<String>>| -> Result<_, ApiError> {
        v.map(|inner| {
            inner
                .map(|u| validate_url(field, &u, state.mode))
                .transpose()
        })
        .transpose()
    };
    let change = RoutingChange {
        voice_callback_url: check("voice_callback_url", body.voice_callback_url)?,
        events_url: check("events_url", body.events_url)?,
    };
    let n = state
        .store
        .update_routing(&ws.id, &id, &change, state.clock.now())
        .await?;
    state.engine.number_changed(&n.id);
    Ok(axum::Json(n.into()))
}
