//! Per-number SIP credentials: the password is shown once, kept as Argon2id plus digest HA1.

use axum::Extension;
use axum::extract::{OriginalUri, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{ApiQuery, OptionalJson, Page, PageParams, parse_id};
use super::middleware::Workspace;
use crate::secrets::{self, StoredSipSecret};
use crate::store::{CredentialError, SipCredential};
use crate::time::{new_id, to_api};

const MAX_LABEL_LEN: usize = 64;
/// Fresh usernames are 32 random bits; a clash is rare, several in a row impossible in practice.
const USERNAME_ATTEMPTS: usize = 5;

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateCredentialRequest {
    /// At most 64 printable characters.
    #[schema(max_length = 64, example = "main-agent")]
    pub label: Option<String>,
}

/// A credential with its password: returned only by create and rotate (the guide's shape).
#[derive(Serialize, ToSchema)]
pub struct CredentialWithPassword {
    #[schema(format = Uuid)]
    pub id: String,
    pub label: String,
    #[schema(example = "ts_7f3a92b4")]
    pub username: String,
    /// Shown once. Sautikit keeps only hashes of it.
    pub password: String,
    #[schema(value_type = super::schema::CredentialStatus, inline, example = "active")]
    pub status: String,
}

/// A credential as listed: never a password.
#[derive(Serialize, ToSchema)]
pub struct CredentialView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub number_id: String,
    pub label: String,
    pub username: String,
    #[schema(value_type = super::schema::CredentialStatus, inline)]
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
    pub revoked_at: Option<String>,
}

impl From<SipCredential> for CredentialView {
    fn from(c: SipCredential) -> Self {
        CredentialView {
            id: c.id,
            number_id: c.number_id,
            label: c.label,
            username: c.username,
            status: c.status,
            created_at: to_api(c.created_at),
            updated_at: to_api(c.updated_at),
            revoked_at: c.revoked_at.map(to_api),
        }
    }
}

fn with_password(c: SipCredential, password: String) -> CredentialWithPassword {
    CredentialWithPassword {
        id: c.id,
        label: c.label,
        username: c.username,
        password,
        status: c.status,
    }
}

/// Argon2id is deliberately slow: keep it off the async workers.
async fn hash_off_runtime(
    username: String,
    realm: String,
    password: String,
) -> Result<StoredSipSecret, ApiError> {
    tokio::task::spawn_blocking(move || secrets::hash_sip_password(&username, &realm, &password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

/// Create a SIP credential for a softphone to register this number.
#[utoipa::path(post, path = "/v1/numbers/{id}/sip-credentials", tag = "sip-credentials",
    params(("id" = uuid::Uuid, Path, description = "The number's id")),
    request_body = CreateCredentialRequest,
    responses((status = 201, body = CredentialWithPassword), (status = 404, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope, description = "`numbers.released`"),
        (status = 422, body = ErrorEnvelope)))]
pub async fn create(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path(number_id): Path<String>,
    OptionalJson(body): OptionalJson<CreateCredentialRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let number_id = parse_id(&number_id, "number id")?;
    let label = body.and_then(|b| b.label).unwrap_or_default();
    if label.chars().count() > MAX_LABEL_LEN || label.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "sip_credentials.invalid_label",
            format!("label must be at most {MAX_LABEL_LEN} printable characters"),
        ));
    }
    // Fail fast (before the expensive hash) when the number is missing or released.
    match state.store.get_number(&ws.id, &number_id).await? {
        None => return Err(CredentialError::NumberNotFound.into()),
        Some(n) if n.status == sautikit_actors::model::NumberStatus::Released => {
            return Err(CredentialError::NumberReleased.into());
        }
        Some(_) => {}
    }
    let password = secrets::new_sip_password();
    let id = new_id();
    for _ in 0..USERNAME_ATTEMPTS {
        let username = secrets::new_sip_username();
        // The digest realm is the workspace id (DESIGN §8).
        let secret = hash_off_runtime(username.clone(), ws.id.clone(), password.clone()).await?;
        match state
            .store
            .create_sip_credential(
                &id,
                &ws.id,
                &number_id,
                &label,
                &username,
                &secret,
                state.clock.now(),
            )
            .await
        {
            Ok(c) => {
                return Ok((StatusCode::CREATED, axum::Json(with_password(c, password))));
            }
            Err(CredentialError::UsernameTaken) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal("could not find a free SIP username"))
}

/// The number's SIP credentials, newest first (passwords are never shown again).
#[utoipa::path(get, path = "/v1/numbers/{id}/sip-credentials", tag = "sip-credentials",
    params(("id" = uuid::Uuid, Path), PageParams),
    responses((status = 200, body = [CredentialView]), (status = 404, body = ErrorEnvelope)))]
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
        .list_sip_credentials(&ws.id, &number_id, after.as_deref(), limit + 1)
        .await?;
    Ok(Page::from_rows(
        rows,
        limit,
        &uri,
        |c| c.id.clone(),
        CredentialView::from,
    ))
}

/// A new password for the same username; the old one stops working at once.
#[utoipa::path(post, path = "/v1/numbers/{id}/sip-credentials/{cred_id}/rotate",
    tag = "sip-credentials",
    params(("id" = uuid::Uuid, Path), ("cred_id" = uuid::Uuid, Path)),
    responses((status = 200, body = CredentialWithPassword), (status = 404, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope, description = "`sip_credentials.revoked`")))]
pub async fn rotate(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path((number_id, cred_id)): Path<(String, String)>,
) -> Result<axum::Json<CredentialWithPassword>, ApiError> {
    let number_id = parse_id(&number_id, "number id")?;
    let cred_id = parse_id(&cred_id, "credential id")?;
    let cred = state
        .store
        .get_sip_credential(&ws.id, &number_id, &cred_id)
        .await?
        .ok_or(CredentialError::NotFound)?;
    if cred.status != "active" {
        return Err(CredentialError::Revoked.into());
    }
    let password = secrets::new_sip_password();
    let secret = hash_off_runtime(cred.username.clone(), ws.id.clone(), password.clone()).await?;
    let cred = state
        .store
        .rotate_sip_credential(&ws.id, &number_id, &cred_id, &secret, state.clock.now())
        .await?;
    Ok(axum::Json(with_password(cred, password)))
}

/// Revoke a credential: registrations with it stop.
#[utoipa::path(delete, path = "/v1/numbers/{id}/sip-credentials/{cred_id}",
    tag = "sip-credentials",
    params(("id" = uuid::Uuid, Path), ("cred_id" = uuid::Uuid, Path)),
    responses((status = 200, body = CredentialView), (status = 404, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope, description = "`sip_credentials.revoked`")))]
pub async fn revoke(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    Path((number_id, cred_id)): Path<(String, String)>,
) -> Result<axum::Json<CredentialView>, ApiError> {
    let number_id = parse_id(&number_id, "number id")?;
    let cred_id = parse_id(&cred_id, "credential id")?;
    let cred = state
        .store
        .revoke_sip_credential(&ws.id, &number_id, &cred_id, state.clock.now())
        .await?;
    Ok(axum::Json(cred.into()))
}
