//! A real voice-callback server for tests: answers each path with a script (or a failure) and
//! records every request's form fields and signature.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct VoiceHit {
    pub path: String,
    pub fields: HashMap<String, String>,
    pub signature: String,
    pub body: String,
}

/// (status, content type, body)
type ServedFile = (u16, String, Vec<u8>);

#[derive(Clone, Default)]
pub struct VoiceServer {
    pub base: String,
    hits: Arc<Mutex<Vec<VoiceHit>>>,
    /// Scripts set by the test, by path; they take precedence over the built-in ones.
    scripts: Arc<Mutex<HashMap<String, Value>>>,
    /// Files served on GET, by path.
    files: Arc<Mutex<HashMap<String, ServedFile>>>,
}

/// What each path answers:
/// - `/pause/{secs}`: pause that long;
/// - `/hangup`: pause 1 s, then hang up;
/// - `/slow/{ms}`: wait, then a 60 s pause;
/// - `/status500`, `/notjson`, `/unknown-verb`, `/dial`, `/reject-busy`, `/reject`,
///   `/redirect` (to `/hangup`).
async fn answer(path: &str) -> Response {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let script = |v: Value| axum::Json(v).into_response();
    match parts.as_slice() {
        ["pause", secs] => {
            let secs: u64 = secs.parse().unwrap_or(1);
            script(json!({"actions": [{"pause": {"length": secs}}]}))
        }
        ["hangup"] => script(json!({"actions": [{"pause": {"length": 1}}, {"hangup": {}}]})),
        ["slow", ms] => {
            let ms: u64 = ms.parse().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            script(json!({"actions": [{"pause": {"length": 60}}]}))
        }
        ["status500"] => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        ["notjson"] => (StatusCode::OK, "<Response><Say>hi</Say></Response>").into_response(),
        ["unknown-verb"] => script(json!({"actions": [{"pause": {"length": 1}}, {"dance": {}}]})),
        // A caller id the workspace may not present.
        ["dial"] => script(
            json!({"actions": [{"dial": {"number": "+254700000002", "callerId": "+254799999999"}}]}),
        ),
        ["reject-busy"] => script(json!({"actions": [{"reject": {"reason": "busy"}}]})),
        ["reject"] => script(json!({"actions": [{"reject": {}}]})),
        ["redirect"] => script(json!({"actions": [{"redirect": {"url": "/hangup"}}]})),
        _ => (StatusCode::NOT_FOUND, "no such script").into_response(),
    }
}

async fn handle(
    State(server): State<VoiceServer>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = String::from_utf8_lossy(&body).into_owned();
    let fields = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let path = format!("/{path}");
    let scripted = server.scripts.lock().unwrap().get(&path).cloned();
    server.hits.lock().unwrap().push(VoiceHit {
        path: path.clone(),
        fields,
        signature: headers
            .get("x-sautikit-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body,
    });
    if let Some(script) = scripted {
        return axum::Json(script).into_response();
    }
    answer(&path).await
}

async fn serve_file(State(server): State<VoiceServer>, Path(path): Path<String>) -> Response {
    let file = server
        .files
        .lock()
        .unwrap()
        .get(&format!("/{path}"))
        .cloned();
    match file {
        Some((status, content_type, body)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(axum::http::header::CONTENT_TYPE, content_type)],
            body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

impl VoiceServer {
    pub async fn start() -> VoiceServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = VoiceServer {
            base: format!("http://{addr}"),
            ..VoiceServer::default()
        };
        let app = Router::new()
            .route("/{*path}", post(handle).get(serve_file))
            .with_state(server.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Answer POSTs to `path` with `script`.
    pub fn set_script(&self, path: &str, script: Value) {
        self.scripts.lock().unwrap().insert(path.to_owned(), script);
    }

    /// Serve `body` on GET `path`.
    pub fn set_file(&self, path: &str, status: u16, content_type: &str, body: Vec<u8>) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_owned(), (status, content_type.to_owned(), body));
    }

    pub fn hits(&self) -> Vec<VoiceHit> {
        self.hits.lock().unwrap().clone()
    }

    /// The form fields of the requests to `path`, once there are `n` (15 s at most).
    pub async fn posts(
        &self,
        path: &str,
        n: usize,
    ) -> Vec<std::collections::HashMap<String, String>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let hits: Vec<_> = self
                .hits()
                .into_iter()
                .filter(|h| h.path == path)
                .map(|h| h.fields)
                .collect();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} posts to {path}, got {hits:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
