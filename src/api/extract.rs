//! Extractors whose rejections use the error envelope, and cursor pagination.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;

use super::error::ApiError;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// JSON body; malformed JSON is 400, a valid document of the wrong shape 422, a missing
/// `Content-Type: application/json` 415, an oversized body 413.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::JsonDataError(e) => {
            ApiError::unprocessable("request.invalid_body", e.body_text())
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::bad_request("request.malformed_json", e.body_text())
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "request.unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        other => ApiError::bad_request("request.invalid_body", other.body_text()),
    }
}

pub fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request.too_large",
        format!("request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// Query string; a bad one is 400 `request.invalid_query`.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => Err(ApiError::bad_request(
                "request.invalid_query",
                e.body_text(),
            )),
            Err(e) => Err(ApiError::bad_request(
                "request.invalid_query",
                e.body_text(),
            )),
        }
    }
}

/// `limit` and `cursor`, shared by every list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 1–100 (default 25).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Opaque: the value from the previous page's `Link: <…>; rel="next"`.
    pub cursor: Option<String>,
}

pub const DEFAULT_LIMIT: i64 = 25;
pub const MAX_LIMIT: i64 = 100;

impl PageParams {
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(l) if (1..=MAX_LIMIT).contains(&l) => Ok(l),
            Some(_) => Err(ApiError::bad_request(
                "request.invalid_query",
                format!("limit must be between 1 and {MAX_LIMIT}"),
            )),
        }
    }

    /// The decoded cursor (the sort key of the last item already seen).
    pub fn after(&self) -> Result<Option<String>, ApiError> {
        let Some(c) = &self.cursor else {
            return Ok(None);
        };
        URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("request.invalid_query", "invalid cursor"))
    }
}

/// A page of a list: a bare JSON array, and a `Link: <…>; rel="next"` header when there is more.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// `rows` was fetched with `limit + 1`; the extra row only says that another page exists.
    pub fn from_rows<R>(
        mut rows: Vec<R>,
        limit: i64,
        uri: &Uri,
        key: impl Fn(&R) -> String,
        map: impl Fn(R) -> T,
    ) -> Page<T> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|last| next_link(uri, &key(last)))
        } else {
            None
        };
        Page {
            items: rows.into_iter().map(map).collect(),
            next,
        }
    }
}

fn next_link(uri: &Uri, last_key: &str) -> String {
    let cursor = URL_SAFE_NO_PAD.encode(last_key);
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if k != "cursor" {
            q.append_pair(&k, &v);
        }
    }
    q.append_pair("cursor", &cursor);
    format!("<{}?{}>; rel=\"next\"", uri.path(), q.finish())
}

impl<T: serde::Serialize> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        let mut resp = axum::Json(self.items).into_response();
        if let Some(link) = self.next.and_then(|l| HeaderValue::from_str(&l).ok()) {
            resp.headers_mut().insert(header::LINK, link);
        }
        resp
    }
}

/// Ids in paths are UUIDs; anything else is refused before touching the database.
pub fn parse_id(raw: &str, what: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| {
            ApiError::bad_request(
                "request.invalid_id",
                format!("{what} must be a UUID, got {raw:?}"),
            )
        })
}

/// A JSON body that may be left out entirely (an empty body means "all defaults").
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large()
                } else {
                    ApiError::bad_request("request.invalid_body", r.body_text())
                }
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        if !is_json {
            return Err(json_rejection(JsonRejection::MissingJsonContentType(
                Default::default(),
            )));
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(&mut de)
            .map(|v| OptionalJson(Some(v)))
            .map_err(|e| {
                if e.inner().is_data() {
                    ApiError::unprocessable(
                        "request.invalid_body",
                        format!("{}: {}", e.path(), e.inner()),
                    )
                } else {
                    ApiError::bad_request("request.malformed_json", e.inner().to_string())
                }
            })
    }
}

const MAX_URL_LEN: usize = 2048;

/// Why a webhook or callback URL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    #[error("must be an absolute http(s) URL with a host")]
    Invalid,
    #[error("must be at most 2048 characters")]
    TooLong,
    #[error("must use https:// in production")]
    Insecure,
}

/// Absolute `http(s)://` with a host; `https://` only in production.
pub fn check_url(raw: &str, mode: crate::config::Mode) -> Result<(), UrlProblem> {
    if raw.len() > MAX_URL_LEN {
        return Err(UrlProblem::TooLong);
    }
    let url = url::Url::parse(raw).map_err(|_| UrlProblem::Invalid)?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(UrlProblem::Invalid);
    }
    if mode == crate::config::Mode::Production && url.scheme() != "https" {
        return Err(UrlProblem::Insecure);
    }
    Ok(())
}

/// ISO 3166-1 alpha-2, upper case (`KE`).
pub fn is_country_code(c: &str) -> bool {
    c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase())
}
