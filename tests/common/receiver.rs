//! A real HTTP webhook receiver for tests: records every request and answers as told.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;
use tokio::sync::Notify;

#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub event_id: String,
    pub event_kind: String,
    pub signature: String,
    pub content_type: String,
    pub user_agent: String,
    pub body: String,
    /// The status it was answered with (`None`: held, then `503`).
    pub answered: Option<u16>,
}

impl Hit {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

/// How to answer: given the hit and how many times this event id was seen before it.
pub type Behaviour = Arc<dyn Fn(&Hit, usize) -> Answer + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Status(u16),
    /// Hold the request until the receiver's behaviour changes (then answer 503).
    Stall,
}

struct Inner {
    hits: Mutex<Vec<Hit>>,
    seen: Mutex<HashMap<String, usize>>,
    behaviour: Mutex<Behaviour>,
    changed: Notify,
    released: Notify,
}

#[derive(Clone)]
pub struct Receiver {
    pub base: String,
    inner: Arc<Inner>,
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let hit = Hit {
        path: uri.path().to_owned(),
        event_id: h("x-sautikit-event-id"),
        event_kind: h("x-sautikit-event-kind"),
        signature: h("x-sautikit-signature"),
        content_type: h("content-type"),
        user_agent: h("user-agent"),
        body: String::from_utf8_lossy(&body).into_owned(),
        answered: None,
    };
    let nth = {
        let mut seen = inner.seen.lock().expect("lock");
        let n = seen.entry(hit.event_id.clone()).or_default();
        *n += 1;
        *n - 1
    };
    let behaviour = inner.behaviour.lock().expect("lock").clone();
    let answer = behaviour(&hit, nth);
    let mut hit = hit;
    if let Answer::Status(s) = answer {
        hit.answered = Some(s);
    }
    inner.hits.lock().expect("lock").push(hit);
    inner.changed.notify_waiters();
    match answer {
        Answer::Status(s) => StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Answer::Stall => {
            inner.released.notified().await;
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Receiver {
        let inner = Arc::new(Inner {
            hits: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
            behaviour: Mutex::new(behaviour),
            changed: Notify::new(),
            released: Notify::new(),
        });
        let app = Router::new()
            .route("/{*path}", post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            base: format!("http://{addr}"),
            inner,
        }
    }

    pub async fn ok() -> Receiver {
        Self::start(Arc::new(|_, _| Answer::Status(200))).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        *self.inner.behaviour.lock().expect("lock") = b;
        self.inner.released.notify_waiters();
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.inner.hits.lock().expect("lock").clone()
    }

    /// Waits until `pred` holds for the hits so far (no sleeping: woken by each new hit).
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            let hits = self.hits();
            if pred(&hits) {
                return hits;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let hits = self.hits();
                if pred(&hits) {
                    return hits;
                }
                panic!(
                    "receiver condition not met within {timeout:?}; {} hits: {:?}",
                    hits.len(),
                    hits.iter().map(|h| &h.event_kind).collect::<Vec<_>>()
                );
            }
        }
    }
}
