//! The workspace wallet, its ledger, and top-ups.

use axum::Extension;
use axum::extract::{OriginalUri, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use sautikit_actors::model::{LedgerEntry, LedgerKind};
use sautikit_actors::money;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{ApiJson, ApiQuery, Page, PageParams};
use super::middleware::Workspace;
use crate::config::Mode;
use crate::store::Wallet;
use crate::time::to_api;

#[derive(Serialize, ToSchema)]
pub struct WalletView {
    #[schema(example = 100000)]
    pub balance_minor: i64,
    #[schema(example = "KES")]
    pub currency: String,
    pub low_balance_threshold_minor: i64,
}

impl From<Wallet> for WalletView {
    fn from(w: Wallet) -> Self {
        WalletView {
            balance_minor: w.balance_minor,
            currency: w.currency,
            low_balance_threshold_minor: w.low_balance_threshold_minor,
        }
    }
}

fn wallet_not_found() -> ApiError {
    ApiError::not_found("wallet.not_found", "wallet not found")
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WalletUpdate {
    /// A debit that takes the balance below this fires `wallet.low_balance` (once per crossing).
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64, example = 20000)]
    pub low_balance_threshold_minor: i64,
}

/// Set the low-balance threshold.
#[utoipa::path(patch, path = "/v1/wallet", tag = "wallet", request_body = WalletUpdate,
    responses((status = 200, body = WalletView), (status = 422, body = ErrorEnvelope)))]
pub async fn update_wallet(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    ApiJson(body): ApiJson<WalletUpdate>,
) -> Result<axum::Json<WalletView>, ApiError> {
    if !(0..=money::MAX_BALANCE_MINOR).contains(&body.low_balance_threshold_minor) {
        return Err(ApiError::unprocessable(
            "wallet.invalid_threshold",
            "low_balance_threshold_minor must be between 0 and the wallet limit",
        ));
    }
    let w = state
        .store
        .set_low_balance_threshold(&ws.id, body.low_balance_threshold_minor, state.clock.now())
        .await?
        .ok_or_else(wallet_not_found)?;
    Ok(axum::Json(w.into()))
}

/// The wallet's balance (minor units).
#[utoipa::path(get, path = "/v1/wallet", tag = "wallet",
    responses((status = 200, body = WalletView), (status = 401, body = ErrorEnvelope)))]
pub async fn get_wallet(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
) -> Result<axum::Json<WalletView>, ApiError> {
    let w = state
        .store
        .get_wallet(&ws.id)
        .await?
        .ok_or_else(wallet_not_found)?;
    Ok(axum::Json(w.into()))
}

/// One ledger row: a signed amount and the balance right after it.
#[derive(Serialize, ToSchema)]
pub struct LedgerView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(value_type = super::schema::LedgerKind, inline)]
    pub kind: String,
    /// Positive for credits, negative for debits.
    pub amount_minor: i64,
    pub balance_after_minor: i64,
    pub currency: String,
    /// What the entry is for: a number id, a top-up reference, …
    pub reference: Option<String>,
    pub created_at: String,
    /// A `number_rental`'s month: from `period_start` (inclusive) to `period_end`.
    pub period_start: Option<String>,
    pub period_end: Option<String>,
}

impl From<LedgerEntry> for LedgerView {
    fn from(e: LedgerEntry) -> Self {
        LedgerView {
            id: e.id,
            kind: e.kind.as_str().to_owned(),
            amount_minor: e.amount_minor,
            balance_after_minor: e.balance_after_minor,
            currency: e.currency,
            reference: e.reference,
            created_at: to_api(e.created_at),
            period_start: e.period.map(|p| to_api(p.0)),
            period_end: e.period.map(|p| to_api(p.1)),
        }
    }
}

/// The ledger, newest first.
#[utoipa::path(get, path = "/v1/wallet/transactions", tag = "wallet", params(PageParams),
    responses((status = 200, body = [LedgerView]), (status = 401, body = ErrorEnvelope)))]
pub async fn transactions(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    OriginalUri(uri): OriginalUri,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = page.limit()?;
    let after = page.after()?;
    let rows = state
        .store
        .list_ledger(&ws.id, after.as_deref(), limit + 1)
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |e| e.id.clone(),
        LedgerView::from,
    ))
}

/// A top-up: `provider` `test` is for dev mode only; `currency` is the wallet's.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUpRequest {
    #[schema(value_type = super::schema::TopUpProvider, inline)]
    pub provider: String,
    #[schema(minimum = 1, maximum = 1_000_000_000_i64, example = 50000)]
    pub amount_minor: i64,
    #[schema(value_type = super::schema::Currency, inline, example = "KES")]
    pub currency: String,
}

#[derive(Serialize, ToSchema)]
pub struct TopUpView {
    /// The ledger entry's id.
    #[schema(format = Uuid)]
    pub id: String,
    pub provider: String,
    pub amount_minor: i64,
    pub currency: String,
    #[schema(example = "succeeded")]
    pub status: String,
    /// The balance after the top-up and the renewals it paid.
    pub balance_minor: i64,
    /// Suspended numbers this top-up renewed, oldest suspension first (each with a
    /// `number_rental` ledger row and a `number.reactivated` event).
    #[schema(value_type = Vec<String>)]
    pub reactivated_number_ids: Vec<String>,
    pub created_at: String,
}

/// Add money to the wallet.
#[utoipa::path(post, path = "/v1/topups", tag = "wallet", request_body = TopUpRequest,
    responses((status = 201, body = TopUpView),
        (status = 403, body = ErrorEnvelope, description = "`topups.provider_forbidden` (test provider in production)"),
        (status = 422, body = ErrorEnvelope)))]
pub async fn topup(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    ApiJson(body): ApiJson<TopUpRequest>,
) -> Result<impl IntoResponse, ApiError> {
    if body.provider != "test" {
        return Err(ApiError::unprocessable(
            "topups.provider_unsupported",
            "provider must be \"test\"",
        ));
    }
    if state.mode == Mode::Production {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "topups.provider_forbidden",
            "the test provider is only available in dev mode",
        ));
    }
    let currency = money::parse_currency(&body.currency)
        .map_err(|e| ApiError::unprocessable("currency.unsupported", e.to_string()))?;
    let amount = money::validate_credit(body.amount_minor)
        .map_err(|e| ApiError::unprocessable("topups.invalid_amount", e.to_string()))?;
    let credited = state
        .engine
        .credit_wallet(
            &ws.id,
            amount,
            currency,
            LedgerKind::TopUp,
            Some("provider:test".to_owned()),
            crate::idempotency::request_key(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TopUpView {
            id: credited.entry.id,
            provider: body.provider,
            amount_minor: credited.entry.amount_minor,
            currency: credited.entry.currency,
            status: "succeeded".to_owned(),
            balance_minor: credited.balance_minor,
            reactivated_number_ids: credited.reactivated.into_iter().map(|n| n.id).collect(),
            created_at: to_api(credited.entry.created_at),
        }),
    ))
}
