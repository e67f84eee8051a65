//! The one error envelope: `{"error": {"code", "message", "request_id"}}`, for every failure,
//! including malformed JSON, unknown routes and wrong methods (DESIGN §5).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sautikit_actors::store::{ClaimError, ReleaseError, StorageError, WalletError};
use serde::Serialize;
use tracing::error;
use utoipa::ToSchema;

use crate::store::{CredentialError, NumberError};

tokio::task_local! {
    /// The id of the request being served, set by the request middleware.
    pub static REQUEST_ID: String;
}

pub fn current_request_id() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| "req_unknown".to_owned())
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// `area.reason`, stable: match on this.
    #[schema(example = "wallet.insufficient_funds")]
    pub code: String,
    /// For people; may change.
    #[schema(example = "insufficient wallet balance")]
    pub message: String,
    #[schema(example = "req_0195f3c2a1b04e5f8a9b0c1d2e3f4a5b")]
    pub request_id: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "api_key.invalid",
            "missing or invalid API key: send Authorization: Bearer sk_…",
        )
    }

    /// The database cannot be reached: `503` with `Retry-After`.
    pub fn storage_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage.unavailable",
            "the database is unavailable; retry after Retry-After seconds",
        )
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        let text = e.to_string();
        if crate::db::is_unreachable(&text) {
            tracing::warn!(error = %text, request_id = %current_request_id(), "storage unavailable");
            return Self::storage_unavailable();
        }
        error!(error = %text, request_id = %current_request_id(), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal.error",
            "internal error; retry later (quote the request_id if it persists)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorEnvelope {
            error: ErrorBody {
                code: self.code.to_owned(),
                message: self.message,
                request_id: current_request_id(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.code == "storage.unavailable" {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(STORAGE_RETRY_AFTER_SECS),
            );
        }
        response
    }
}

/// What a client is told to wait before retrying while the database is unreachable.
const STORAGE_RETRY_AFTER_SECS: &str = "1";

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        ApiError::internal(e)
    }
}

pub fn number_not_found() -> ApiError {
    ApiError::not_found("numbers.not_found", "number not found")
}

impl From<ClaimError> for ApiError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::NotFound => number_not_found(),
            ClaimError::AlreadyClaimed => ApiError::conflict(
                "numbers.already_claimed",
                "this number has already been claimed",
            ),
            // The guide's exact body.
            ClaimError::InsufficientFunds => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "wallet.insufficient_funds",
                "insufficient wallet balance",
            ),
            e @ ClaimError::CurrencyMismatch { .. } => {
                ApiError::unprocessable("wallet.currency_mismatch", e.to_string())
            }
            ClaimError::Storage(e) => ApiError::internal(e),
        }
    }
}

impl From<ReleaseError> for ApiError {
    fn from(e: ReleaseError) -> Self {
        match e {
            ReleaseError::NotFound => number_not_found(),
            ReleaseError::AlreadyReleased => {
                ApiError::conflict("numbers.released", "this number has already been released")
            }
            ReleaseError::Storage(e) => ApiError::internal(e),
        }
    }
}

impl From<WalletError> for ApiError {
    fn from(e: WalletError) -> Self {
        match e {
            WalletError::NotFound => ApiError::not_found("wallet.not_found", "wallet not found"),
            e @ WalletError::CurrencyMismatch { .. } => {
                ApiError::unprocessable("wallet.currency_mismatch", e.to_string())
            }
            e @ WalletError::BalanceLimit => {
                ApiError::unprocessable("wallet.balance_limit", e.to_string())
            }
            WalletError::Storage(e) => ApiError::internal(e),
        }
    }
}

impl From<NumberError> for ApiError {
    fn from(e: NumberError) -> Self {
        match e {
            NumberError::NotFound => number_not_found(),
            NumberError::Released => {
                ApiError::conflict("numbers.released", "this number has been released")
            }
            NumberError::Storage(e) => ApiError::internal(e),
        }
    }
}

impl From<CredentialError> for ApiError {
    fn from(e: CredentialError) -> Self {
        match e {
            CredentialError::NumberNotFound => number_not_found(),
            CredentialError::NumberReleased => {
                ApiError::conflict("numbers.released", "this number has been released")
            }
            CredentialError::NotFound => {
                ApiError::not_found("sip_credentials.not_found", "SIP credential not found")
            }
            CredentialError::Revoked => ApiError::conflict(
                "sip_credentials.revoked",
                "this SIP credential has been revoked",
            ),
            CredentialError::UsernameTaken => ApiError::internal("SIP username collision"),
            CredentialError::Storage(e) => ApiError::internal(e),
        }
    }
}
