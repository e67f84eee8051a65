//! Devices registered with a number's SIP credentials (RFC 3261 §10 bindings).

use axum::Extension;
use axum::extract::{OriginalUri, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{ApiQuery, Page, PageParams, parse_id};
use super::middleware::Workspace;
use crate::registrations::RegistrationRow;
use crate::time::to_api;

/// One registered device.
#[derive(Serialize, ToSchema)]
pub struct RegistrationView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub number_id: String,
    /// The Contact URI the device registered.
    #[schema(example = "sip:ts_7f3a92b4@192.168.1.20:5062;transport=udp")]
    pub contact: String,
    /// Where its REGISTER came from (`ip:port`): calls to the device go there.
    #[schema(example = "203.0.113.7:40112")]
    pub source: String,
    #[schema(value_type = super::schema::Transport, inline)]
    pub transport: String,
    pub user_agent: Option<String>,
    #[schema(format = Uuid)]
    pub credential_id: String,
    pub credential_label: String,
    pub expires_at: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<RegistrationRow> for RegistrationView {
    fn from(r: RegistrationRow) -> Self {
        let g = r.registration;
        RegistrationView {
            id: g.id,
            number_id: g.number_id,
            contact: g.contact,
            source: g.source.to_string(),
            transport: match g.transport {
                sautikit_sip::transaction::Transport::Udp => "udp",
                sautikit_sip::transaction::Transport::Tcp => "tcp",
            }
            .to_owned(),
            user_agent: g.user_agent,
            credential_id: g.credential_id,
            credential_label: r.credential_label,
            expires_at: to_api(g.expires_at),
            created_at: to_api(r.created_at),
            updated_at: to_api(g.updated_at),
        }
    }
}

fn number_not_found() -> ApiError {
    ApiError::not_found("numbers.not_found", "number not found")
}

/// The number's current registrations, newest first.
#[utoipa::path(get, path = "/v1/numbers/{id}/registrations", tag = "registrations",
    params(("id" = uuid::Uuid, Path, description = "The number's id"), PageParams),
    responses((status = 200, body = [RegistrationView]), (status = 404, body = ErrorEnvelope)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(number_id): Path<String>,
    OriginalUri(uri): OriginalUri,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<impl IntoResponse, ApiError> {
    let number_id = parse_id(&number_id, "number id")?;
    let limit = page.limit()?;
    let after = page.after()?;
    let rows = state
        .store
        .list_registrations(
            &ws.id,
            &number_id,
            after.as_deref(),
            limit + 1,
            state.clock.now(),
        )
        .await?
        .ok_or_else(number_not_found)?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |r| r.registration.id.clone(),
        RegistrationView::from,
    ))
}

/// Remove a registration: calls stop reaching that device until it registers again.
#[utoipa::path(delete, path = "/v1/numbers/{id}/registrations/{reg_id}", tag = "registrations",
    params(("id" = uuid::Uuid, Path), ("reg_id" = uuid::Uuid, Path)),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorEnvelope)))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path((number_id, reg_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let number_id = parse_id(&number_id, "number id")?;
    let reg_id = parse_id(&reg_id, "registration id")?;
    if state
        .store
        .delete_registration(&ws.id, &number_id, &reg_id)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "registrations.not_found",
            "registration not found",
        ))
    }
}
