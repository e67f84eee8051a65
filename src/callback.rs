//! The voice callback over HTTP (DESIGN §6): a signed form POST (or GET) to the customer's URL,
//! whose reply must be a valid VoiceAction script within 10 s.
//!
//! Same transport rules as webhook deliveries (`webhooks::sender`): rustls, no redirects, and in
//! production the [`AddressPolicy`] applied to the addresses we actually connect to.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use sautikit_actors::callback::{
    CALLBACK_TIMEOUT, CallbackClient, CallbackFailure, CallbackMethod, CallbackReply,
    CallbackRequest,
};
use sautikit_actors::voice::{ScriptError, script_from_value};
use sautikit_actors::webhook::signature_header;
use url::form_urlencoded;

use crate::webhooks::sender::{AddressPolicy, Forbidden, GuardedResolver};

pub const USER_AGENT: &str = concat!("Sautikit-Voice/", env!("CARGO_PKG_VERSION"));

/// Largest reply we read. 50 actions fit easily; anything bigger is not a script we want.
pub const MAX_REPLY_BYTES: usize = 256 * 1024;

const FORM: &str = "application/x-www-form-urlencoded";

#[derive(Debug, thiserror::Error)]
pub enum CallbackClientError {
    #[error("cannot build the HTTP client for voice callbacks: {0}")]
    Build(#[from] reqwest::Error),
}

/// One pooled client for every call's callbacks.
pub struct HttpCallbackClient {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    timeout: Duration,
}

impl HttpCallbackClient {
    /// `timeout` is the whole deadline (connect, send, read); it is capped at
    /// [`CALLBACK_TIMEOUT`], and tests pass less.
    pub fn new(
        policy: AddressPolicy,
        timeout: Duration,
    ) -> Result<HttpCallbackClient, CallbackClientError> {
        // One process-wide crypto provider; a second install attempt is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let timeout = timeout.min(CALLBACK_TIMEOUT);
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect would bypass the literal-address check and is not part of the contract.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .dns_resolver(GuardedResolver {
                policy: policy.clone(),
            })
            .build()?;
        Ok(HttpCallbackClient {
            client,
            policy,
            timeout,
        })
    }

    /// reqwest does not resolve IP literals, so the policy is checked here for those.
    fn literal_forbidden(&self, url: &url::Url) -> Option<String> {
        let ip = match url.host()? {
            url::Host::Ipv4(v4) => IpAddr::V4(v4),
            url::Host::Ipv6(v6) => IpAddr::V6(v6),
            url::Host::Domain(_) => return None,
        };
        (!self.policy.permits(ip)).then(|| format!("{ip} is an internal address"))
    }

    async fn exchange(
        &self,
        request: CallbackRequest,
        started: Instant,
    ) -> Result<CallbackReply, CallbackFailure> {
        let latency = || elapsed_ms(started);
        let mut url = url::Url::parse(&request.url).map_err(|e| CallbackFailure::Unreachable {
            latency_ms: 0,
            message: format!("invalid callback URL: {e}"),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CallbackFailure::Unreachable {
                latency_ms: 0,
                message: format!("invalid callback URL: {} is not http(s)", url.scheme()),
            });
        }
        if let Some(message) = self.literal_forbidden(&url) {
            return Err(CallbackFailure::Forbidden { message });
        }
        let pairs = request.fields.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let (builder, body) = match request.method {
            CallbackMethod::Post => {
                let body = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(pairs)
                    .finish();
                (
                    self.client.post(url).header(CONTENT_TYPE, FORM),
                    body.into_bytes(),
                )
            }
            CallbackMethod::Get => {
                // Appended after any query the customer put in the URL; the signature then
                // covers the empty body.
                if !request.fields.is_empty() {
                    url.query_pairs_mut().extend_pairs(pairs);
                }
                (self.client.get(url), Vec::new())
            }
        };
        let signature = signature_header(&request.secret, &body, chrono::Utc::now().timestamp());
        let mut builder = builder
            .header(ACCEPT, "application/json")
            .header("X-Sautikit-Signature", signature)
            .header("X-Sautikit-Call-Id", &request.call_id);
        if !body.is_empty() {
            builder = builder.body(body);
        }
        let mut resp = builder
            .send()
            .await
            .map_err(|e| failure(&e, started, self.timeout))?;
        let status_code = resp.status().as_u16();
        if !resp.status().is_success() {
            return Err(CallbackFailure::HttpStatus {
                status_code,
                latency_ms: latency(),
            });
        }
        let too_big = || CallbackFailure::InvalidActions {
            status_code,
            latency_ms: latency(),
            // Not "invalid JSON": it may well be JSON, it is just more than a script can be.
            error: ScriptError {
                path: "$".into(),
                message: format!("the reply is larger than {MAX_REPLY_BYTES} bytes"),
            },
        };
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_REPLY_BYTES as u64)
        {
            return Err(too_big());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| failure(&e, started, self.timeout))?
        {
            if body.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        let latency_ms = latency();
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| CallbackFailure::InvalidJson {
                status_code,
                latency_ms,
                message: e.to_string(),
            })?;
        let script =
            script_from_value(&value).map_err(|error| CallbackFailure::InvalidActions {
                status_code,
                latency_ms,
                error,
            })?;
        Ok(CallbackReply {
            script,
            status_code,
            latency_ms,
        })
    }
}

#[async_trait]
impl CallbackClient for HttpCallbackClient {
    async fn fetch(&self, request: CallbackRequest) -> Result<CallbackReply, CallbackFailure> {
        let started = Instant::now();
        let call_id = request.call_id.clone();
        let url = request.url.clone();
        // reqwest's own timeout already spans connect to end of body; this outer deadline also
        // bounds DNS and anything else, so the trait's promise holds whatever the transport does.
        let result = match tokio::time::timeout(self.timeout, self.exchange(request, started)).await
        {
            Ok(result) => result,
            Err(_) => Err(CallbackFailure::Timeout {
                timeout_ms: millis(self.timeout),
            }),
        };
        match &result {
            Ok(reply) => tracing::debug!(
                call_id,
                url,
                status = reply.status_code,
                latency_ms = reply.latency_ms,
                actions = reply.script.actions.len(),
                "voice callback answered"
            ),
            Err(e) => {
                tracing::info!(call_id, url, reason = e.reason(), error = %e, "voice callback failed")
            }
        }
        result
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn elapsed_ms(started: Instant) -> u64 {
    millis(started.elapsed())
}

/// Sort a transport error into the callback failure kinds.
fn failure(e: &reqwest::Error, started: Instant, timeout: Duration) -> CallbackFailure {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(Forbidden(host)) = s.downcast_ref::<Forbidden>() {
            return CallbackFailure::Forbidden {
                message: format!("{host} resolves only to internal addresses"),
            };
        }
        source = s.source();
    }
    if e.is_timeout() {
        return CallbackFailure::Timeout {
            timeout_ms: millis(timeout),
        };
    }
    // reqwest's Display is terse ("error sending request"); the cause is in the chain.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    CallbackFailure::Unreachable {
        latency_ms: elapsed_ms(started),
        message,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::extract::{RawQuery, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::any;
    use hmac::{Hmac, KeyInit, Mac};
    use sautikit_actors::voice::{Action, Say};
    use sha2::Sha256;

    use super::*;

    /// What the test receiver saw.
    #[derive(Default, Clone)]
    struct Seen {
        method: String,
        headers: HeaderMap,
        query: Option<String>,
        body: Vec<u8>,
    }

    type Reply = Arc<dyn Fn() -> Response + Send + Sync>;

    #[derive(Clone)]
    struct Receiver {
        seen: Arc<Mutex<Vec<Seen>>>,
        reply: Reply,
        delay: Duration,
    }

    async fn handle(
        State(r): State<Receiver>,
        method: axum::http::Method,
        headers: HeaderMap,
        RawQuery(query): RawQuery,
        body: Bytes,
    ) -> Response {
        if let Ok(mut seen) = r.seen.lock() {
            seen.push(Seen {
                method: method.to_string(),
                headers,
                query,
                body: body.to_vec(),
            });
        }
        tokio::time::sleep(r.delay).await;
        (r.reply)()
    }

    /// A receiver on 127.0.0.1 answering every request with `reply` after `delay`.
    async fn serve(
        reply: impl Fn() -> Response + Send + Sync + 'static,
        delay: Duration,
    ) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Receiver {
            seen: seen.clone(),
            reply: Arc::new(reply),
            delay,
        };
        let app = Router::new()
            .route("/{*path}", any(handle))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}"), seen)
    }

    fn json(body: &'static str) -> impl Fn() -> Response + Send + Sync + 'static {
        move || ([(CONTENT_TYPE, "application/json")], body).into_response()
    }

    fn client(timeout: Duration) -> HttpCallbackClient {
        HttpCallbackClient::new(AddressPolicy::default(), timeout).expect("client")
    }

    fn request(url: String, method: CallbackMethod) -> CallbackRequest {
        CallbackRequest {
            url,
            method,
            fields: vec![
                ("CallId".into(), "call_1".into()),
                ("From".into(), "+254700000001".into()),
                ("To".into(), "+254711000000".into()),
                ("Digits".into(), "12#".into()),
                ("Note".into(), "a b&c=d".into()),
            ],
            secret: "whsec_test".into(),
            call_id: "call_1".into(),
        }
    }

    /// Recompute the signature as a customer would: HMAC-SHA256 over body + "." + t.
    fn verify(header: &str, secret: &str, body: &[u8]) {
        let parts: HashMap<&str, &str> = header
            .split(',')
            .filter_map(|p| p.split_once('='))
            .collect();
        let t = parts["t"];
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("key");
        mac.update(body);
        mac.update(b".");
        mac.update(t.as_bytes());
        assert_eq!(parts["v1"], hex::encode(mac.finalize().into_bytes()));
        let t: i64 = t.parse().expect("t");
        assert!((chrono::Utc::now().timestamp() - t).abs() < 60);
    }

    const SCRIPT: &str = r#"{"actions": [{"say": {"text": "Karibu"}}, {"hangup": {}}]}"#;

    #[tokio::test]
    async fn post_round_trip_is_signed_form() {
        let (base, seen) = serve(json(SCRIPT), Duration::ZERO).await;
        let reply = client(CALLBACK_TIMEOUT)
            .fetch(request(format!("{base}/voice"), CallbackMethod::Post))
            .await
            .expect("reply");
        assert_eq!(reply.status_code, 200);
        assert_eq!(
            reply.script.actions,
            vec![
                Action::Say(Say {
                    text: "Karibu".into(),
                    voice: None,
                    language: None,
                    loop_count: 1
                }),
                Action::Hangup
            ]
        );
        let seen = seen.lock().expect("lock")[0].clone();
        assert_eq!(seen.method, "POST");
        let body = String::from_utf8(seen.body.clone()).expect("utf8");
        assert_eq!(
            body,
            "CallId=call_1&From=%2B254700000001&To=%2B254711000000&Digits=12%23&Note=a+b%26c%3Dd"
        );
        let fields: Vec<(String, String)> =
            form_urlencoded::parse(&seen.body).into_owned().collect();
        assert_eq!(fields, request(String::new(), CallbackMethod::Post).fields);
        let h = |name: &str| {
            seen.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(h("content-type"), FORM);
        assert_eq!(h("accept"), "application/json");
        assert_eq!(h("user-agent"), USER_AGENT);
        assert!(h("user-agent").starts_with("Sautikit-Voice/"));
        assert_eq!(h("x-sautikit-call-id"), "call_1");
        verify(&h("x-sautikit-signature"), "whsec_test", &seen.body);
    }

    #[tokio::test]
    async fn get_puts_fields_in_the_query() {
        let (base, seen) = serve(json(r#"{"actions": []}"#), Duration::ZERO).await;
        let reply = client(CALLBACK_TIMEOUT)
            .fetch(request(format!("{base}/voice?step=2"), CallbackMethod::Get))
            .await
            .expect("reply");
        assert!(reply.script.actions.is_empty());
        let seen = seen.lock().expect("lock")[0].clone();
        assert_eq!(seen.method, "GET");
        assert!(seen.body.is_empty());
        assert_eq!(
            seen.query.as_deref(),
            Some(
                "step=2&CallId=call_1&From=%2B254700000001&To=%2B254711000000&Digits=12%23&Note=a+b%26c%3Dd"
            )
        );
        let sig = seen
            .headers
            .get("x-sautikit-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        verify(&sig, "whsec_test", b"");
    }

    #[tokio::test]
    async fn non_2xx_is_http_status() {
        let (base, _) = serve(
            || (StatusCode::INTERNAL_SERVER_ERROR, SCRIPT).into_response(),
            Duration::ZERO,
        )
        .await;
        let e = client(CALLBACK_TIMEOUT)
            .fetch(request(format!("{base}/v"), CallbackMethod::Post))
            .await
            .expect_err("500");
        assert!(
            matches!(
                e,
                CallbackFailure::HttpStatus {
                    status_code: 500,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.reason(), "callback.http_status");

        // Redirects are not followed.
        let (base, _) = serve(
            || (StatusCode::FOUND, [("location", "/elsewhere")]).into_response(),
            Duration::ZERO,
        )
        .await;
        let e = client(CALLBACK_TIMEOUT)
            .fetch(request(format!("{base}/v"), CallbackMethod::Post))
            .await
            .expect_err("302");
        assert!(
            matches!(
                e,
                CallbackFailure::HttpStatus {
                    status_code: 302,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn non_json_is_invalid_json() {
        let (base, _) = serve(
            || "<Response><Say>hi</Say></Response>".into_response(),
            Duration::ZERO,
        )
        .await;
        let e = client(CALLBACK_TIMEOUT)
            .fetch(request(format!("{base}/v"), CallbackMethod::Post))
            .await
            .expect_err("xml");
        assert!(
            matches!(
                e,
                CallbackFailure::InvalidJson {
                    status_code: 200,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.reason(), "callback.invalid_json");
    }

    #[tokio::test]
    async fn invalid_script_is_invalid_actions_with_the_path() {
        let (base, _) = serve(
            json(r#"{"actions": [{"say": {"text": "hi"}}, {"dance": {}}]}"#),
            Duration::ZERO,
        )
        .await;
        let e = client(CALLBACK_TIMEOUT)
            .fetch(request(format!("{base}/v"), CallbackMethod::Post))
            .await
            .expect_err("unknown verb");
        match &e {
            CallbackFailure::InvalidActions {
                error, status_code, ..
            } => {
                assert_eq!(*status_code, 200);
                assert_eq!(error.to_string(), r#"actions[1]: unknown verb "dance""#);
            }
            other => panic!("expected InvalidActions, got {other:?}"),
        }
        assert_eq!(e.reason(), "callback.invalid_actions");
    }

    #[tokio::test]
    async fn oversized_reply_is_refused() {
        let (base, _) = serve(
            || {
                let big = format!(
                    r#"{{"actions": [{{"say": {{"text": "{}"}}}}]}}"#,
                    "a".repeat(MAX_REPLY_BYTES)
                );
                // Streamed, so there is no Content-Length and the reading loop must stop it.
                let chunks = big
                    .into_bytes()
                    .chunks(8192)
                    .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                    .collect::<Vec<_>>();
                Body::from_stream(futures::stream::iter(chunks)).into_response()
            },
            Duration::ZERO,
        )
        .await;
        let e = client(CALLBACK_TIMEOUT)
            .fetch(request(format!("{base}/v"), CallbackMethod::Post))
            .await
            .expect_err("too big");
        match e {
            CallbackFailure::InvalidActions { error, .. } => assert_eq!(error.path, "$"),
            other => panic!("expected InvalidActions, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn slow_receiver_is_timeout() {
        let (base, _) = serve(json(SCRIPT), Duration::from_secs(3)).await;
        let started = Instant::now();
        let e = client(Duration::from_millis(300))
            .fetch(request(format!("{base}/v"), CallbackMethod::Post))
            .await
            .expect_err("slow");
        assert!(
            matches!(e, CallbackFailure::Timeout { timeout_ms: 300 }),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn slow_body_is_timeout() {
        // Headers at once, then a body that never finishes: the deadline covers reading too.
        let (base, _) = serve(
            || {
                let stream = futures::stream::unfold(0u8, |n| async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), n))
                });
                Body::from_stream(stream).into_response()
            },
            Duration::ZERO,
        )
        .await;
        let started = Instant::now();
        let e = client(Duration::from_millis(300))
            .fetch(request(format!("{base}/v"), CallbackMethod::Post))
            .await
            .expect_err("trickle");
        assert!(matches!(e, CallbackFailure::Timeout { .. }), "{e:?}");
        assert!(started.elapsed() < Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn closed_port_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let e = client(CALLBACK_TIMEOUT)
            .fetch(request(format!("http://{addr}/v"), CallbackMethod::Post))
            .await
            .expect_err("closed");
        assert!(matches!(e, CallbackFailure::Unreachable { .. }), "{e:?}");
        assert_eq!(e.reason(), "callback.unreachable");
    }

    #[tokio::test]
    async fn production_policy_forbids_internal_addresses() {
        let (base, seen) = serve(json(SCRIPT), Duration::ZERO).await;
        let port = base.rsplit(':').next().unwrap_or_default().to_owned();
        let strict = HttpCallbackClient::new(
            AddressPolicy {
                refuse_internal: true,
                allow: vec![],
            },
            CALLBACK_TIMEOUT,
        )
        .expect("client");
        for url in [
            format!("{base}/v"),
            format!("http://localhost:{port}/v"),
            format!("http://[::1]:{port}/v"),
        ] {
            let e = strict
                .fetch(request(url.clone(), CallbackMethod::Post))
                .await
                .expect_err("forbidden");
            assert!(
                matches!(e, CallbackFailure::Forbidden { .. }),
                "{url}: {e:?}"
            );
            assert_eq!(e.reason(), "callback.forbidden");
        }
        assert!(seen.lock().expect("lock").is_empty(), "nothing was sent");

        // An operator-allowed range is reachable again.
        let allowed = HttpCallbackClient::new(
            AddressPolicy {
                refuse_internal: true,
                allow: vec!["127.0.0.0/8".parse().expect("net")],
            },
            CALLBACK_TIMEOUT,
        )
        .expect("client");
        allowed
            .fetch(request(format!("{base}/v"), CallbackMethod::Post))
            .await
            .expect("allowed");
    }

    #[tokio::test]
    async fn bad_urls_are_unreachable() {
        for url in ["not a url", "ftp://example.com/x"] {
            let e = client(CALLBACK_TIMEOUT)
                .fetch(request(url.into(), CallbackMethod::Post))
                .await
                .expect_err("bad url");
            assert!(
                matches!(e, CallbackFailure::Unreachable { .. }),
                "{url}: {e:?}"
            );
        }
    }
}
