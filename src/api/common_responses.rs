//! The answers that layers and extractors give on behalf of many operations (authentication,
//! `Idempotency-Key`, the JSON body, path ids, the query string, storage failures), added to each
//! operation's OpenAPI entry from what the operation takes, so no handler has to repeat them and
//! none can forget one.

use axum::http::StatusCode;
use utoipa::openapi::path::{HttpMethod, Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder};

use super::extract::MAX_BODY_BYTES;

/// Adds the answers of the authentication and idempotency layers (`authed`) and of the
/// extractors to every operation of `doc`.
pub fn add(doc: &mut OpenApi, authed: bool) {
    for item in doc.paths.paths.values_mut() {
        for (method, op) in [
            (HttpMethod::Get, item.get.as_mut()),
            (HttpMethod::Post, item.post.as_mut()),
            (HttpMethod::Put, item.put.as_mut()),
            (HttpMethod::Patch, item.patch.as_mut()),
            (HttpMethod::Delete, item.delete.as_mut()),
        ] {
            if let Some(op) = op {
                add_to(op, method, authed);
            }
        }
    }
}

fn add_to(op: &mut Operation, method: HttpMethod, authed: bool) {
    // OpenAPI 3.1 requires a description on every response.
    for (status, response) in &mut op.responses.responses {
        if let RefOr::T(r) = response
            && r.description.is_empty()
        {
            r.description = status
                .parse::<StatusCode>()
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Response")
                .to_owned();
        }
    }
    let has_in = |place: ParameterIn| {
        op.parameters
            .iter()
            .flatten()
            .any(|p| matches!(p, RefOr::T(p) if p.parameter_in == place))
    };
    let (has_path, has_query) = (has_in(ParameterIn::Path), has_in(ParameterIn::Query));
    let has_body = op.request_body.is_some();

    if authed {
        error(op, 401, "`api_key.invalid`: missing or unknown API key");
        if matches!(method, HttpMethod::Post) {
            idempotency_key(op);
            error(op, 400, "`idempotency.invalid_key`");
            error(
                op,
                409,
                "`idempotency.conflict`: the key was used with another request; \
                 `idempotency.in_progress`: the first request with it is still running; \
                 `idempotency.response_lost`: the first request took effect but its response \
                 was lost",
            );
            error(op, 413, "`request.too_large`");
        }
        error(op, 500, "`internal.error`");
        error(
            op,
            503,
            "`storage.unavailable`: the database cannot be reached; retry after `Retry-After` seconds",
        );
    }
    if has_body {
        error(
            op,
            400,
            "`request.malformed_json`: the body is not JSON; `request.invalid_body`",
        );
        error(
            op,
            413,
            &format!("`request.too_large`: the body is over {MAX_BODY_BYTES} bytes"),
        );
        error(
            op,
            415,
            "`request.unsupported_media_type`: send `Content-Type: application/json`",
        );
        error(
            op,
            422,
            "`request.invalid_body`: a field is missing, unknown or of the wrong type",
        );
    }
    if has_path {
        error(
            op,
            400,
            "`request.invalid_id`: an id in the path is not a UUID",
        );
        error(op, 404, "Not found (or another workspace's)");
    }
    if has_query {
        error(op, 400, "`request.invalid_query`");
    }
}

/// Lists `status` with the error envelope; a status already listed keeps its own description,
/// with these codes added when it does not name them yet.
fn error(op: &mut Operation, status: u16, description: &str) {
    let key = status.to_string();
    match op.responses.responses.get_mut(&key) {
        Some(RefOr::T(existing)) if existing.description.is_empty() => {
            existing.description = description.to_owned();
        }
        Some(RefOr::T(existing)) => {
            let codes: Vec<&str> = description
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|code| !existing.description.contains(code))
                .collect();
            if !codes.is_empty() {
                let also = codes
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                existing.description = format!("{}; also {also}", existing.description);
            }
        }
        Some(RefOr::Ref(_)) => {}
        None => {
            let response = ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
                        .build(),
                )
                .build();
            op.responses.responses.insert(key, RefOr::T(response));
        }
    }
}

/// POSTs take `Idempotency-Key` (DESIGN §5).
fn idempotency_key(op: &mut Operation) {
    let header = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "Replays of this request with the same key and body get the first answer again \
             (with `Idempotent-Replay: true`) for 24 hours",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255))
                .pattern(Some("^[!-~]+$")),
        ))
        .build();
    op.parameters
        .get_or_insert_with(Vec::new)
        .push(RefOr::T(header));
}
