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

#[derive(Clone, Default)]
pub struct VoiceServer {
    pub base: String,
    hits: Arc<Mutex<Vec<VoiceHit>>>,
}

/// What each path answers:
/// - `/pause/{secs}`: pause that long;
/// - `/hangup`: pause 1 s, then hang up;
/// - `/slow/{ms}`: wait, then a 60 s pause;
/// - `/status500`, `/notjson`, `/unknown-verb`, `/say`, `/reject-busy`, `/reject`,
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
        ["say"] => script(json!({"actions": [{"say": {"text": "Hello"}}]})),
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
    answer(&path).await
}

impl VoiceServer {
    pub async fn start() -> VoiceServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = VoiceServer {
            base: format!("http://{addr}"),
            hits: Arc::default(),
        };
        let app = Router::new()
            .route("/{*path}", post(handle))
            .with_state(server.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn hits(&self) -> Vec<VoiceHit> {
        self.hits.lock().unwrap().clone()
    }
}
