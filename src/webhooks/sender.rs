//! Webhook HTTP transport: hyper's pooled client with a 10 s deadline, no redirects, and in
//! production a resolver that refuses loopback, private, link-local and unspecified addresses
//! unless an operator allowed them (on-premise receivers). The reqwest resolver here serves the
//! other outbound clients that take customer URLs (voice callbacks, `play`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT as USER_AGENT_HEADER};
use http::{Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use percent_encoding::percent_decode_str;
use reqwest::dns::{Addrs, Resolve, Resolving};
use sautikit_actors::webhook::{SendResult, SignedRequest, WebhookSender};

pub use sautikit_actors::address::{AddressPolicy, is_internal};
pub use sautikit_actors::webhook::DELIVERY_TIMEOUT;
/// We read (and ignore) at most this much of a receiver's answer.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

pub const USER_AGENT: &str = concat!("Sautikit-Webhooks/", env!("CARGO_PKG_VERSION"));

/// A name refused by [`GuardedResolver`] (the host name is the field), found in reqwest's error
/// chain to tell a policy refusal from a DNS failure.
#[derive(Debug, thiserror::Error)]
#[error("address.forbidden: {0} resolves only to internal addresses")]
pub(crate) struct Forbidden(pub(crate) String);

/// DNS through the OS, keeping only permitted addresses: the check happens on the addresses we
/// connect to, so a name cannot pass the check and then resolve elsewhere. Shared by every
/// outbound client that takes customer URLs (webhooks, voice callbacks, `play`).
pub(crate) struct GuardedResolver {
    pub(crate) policy: Arc<AddressPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = permitted_addrs(&policy, host).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The OS's addresses for `host` that `policy` permits; [`Forbidden`] when it permits none.
async fn permitted_addrs(
    policy: &AddressPolicy,
    host: String,
) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
        .await?
        .filter(|a| policy.permits(a.ip()))
        .collect();
    if addrs.is_empty() {
        return Err(Box::new(Forbidden(host)));
    }
    Ok(addrs)
}

/// Webhook requests go straight through hyper's pooled client: reqwest's per-request work (URL
/// re-parsing, redirect policy, header maps, boxed futures) was a tenth of a delivery's CPU, and a
/// webhook needs none of it. The same rules hold: 10 s deadline, redirects not followed (a 3xx is
/// just a failed attempt), any 2xx acknowledges, production address rules on every address we
/// connect to, the `User-Agent`, HTTP/1.1 or HTTP/2 over TLS with the platform's roots.
pub struct HttpSender {
    client: Client<HttpsConnector<HttpConnector<HyperResolver>>, Full<Bytes>>,
    policy: Arc<AddressPolicy>,
    /// Parsed URLs and their literal-address verdicts: a handful of receivers get most requests,
    /// so each URL is parsed once, not once per delivery.
    targets: Mutex<HashMap<String, Arc<Target>>>,
}

struct Target {
    uri: Result<Uri, String>,
    /// `Authorization` for a URL with `user:password@`.
    authorization: Option<HeaderValue>,
    forbidden: Option<String>,
}

/// Parsed URLs kept at most; the cache starts over when it is full.
const MAX_TARGETS: usize = 4096;
/// Idle connections kept per receiver (a little above the Events actor's concurrency).
const MAX_IDLE_PER_HOST: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// [`GuardedResolver`]'s rule for hyper's connector: DNS through the OS, only permitted addresses.
#[derive(Clone)]
struct HyperResolver {
    policy: Arc<AddressPolicy>,
}

impl tower::Service<Name> for HyperResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move { Ok(permitted_addrs(&policy, host).await?.into_iter()) })
    }
}

/// TLS for our outgoing connections (webhooks, media streams): the platform's certificate
/// verifier, ring as the crypto provider.
pub fn tls_client_config() -> Result<rustls::ClientConfig, SenderError> {
    // One process-wide crypto provider; a second install attempt is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

impl HttpSender {
    pub fn new(policy: AddressPolicy) -> Result<HttpSender, SenderError> {
        let tls = tls_client_config()?;
        let policy = Arc::new(policy);
        let mut http = HttpConnector::new_with_resolver(HyperResolver {
            policy: policy.clone(),
        });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(DELIVERY_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(HttpSender {
            client,
            policy,
            targets: Mutex::default(),
        })
    }

    fn target(&self, url: &str) -> Arc<Target> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = targets.get(url) {
            return t.clone();
        }
        let t = Arc::new(self.parse(url));
        if targets.len() >= MAX_TARGETS {
            targets.clear();
        }
        targets.insert(url.to_owned(), t.clone());
        t
    }

    fn parse(&self, url: &str) -> Target {
        let invalid = |e: &dyn std::fmt::Display| Target {
            uri: Err(format!("request: invalid URL {url:?}: {e}")),
            authorization: None,
            forbidden: None,
        };
        let mut parsed = match url::Url::parse(url) {
            Ok(u) => u,
            Err(e) => return invalid(&e),
        };
        if !matches!(parsed.scheme(), "http" | "https") {
            return invalid(&"not an http(s) URL");
        }
        let forbidden = self.literal_forbidden(&parsed);
        let authorization = (!parsed.username().is_empty() || parsed.password().is_some())
            .then(|| {
                let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
                let user = decode(parsed.username());
                let password = parsed.password().map(decode).unwrap_or_default();
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                HeaderValue::from_str(&format!("Basic {token}")).ok()
            })
            .flatten();
        // The request line carries neither credentials nor a fragment.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        parsed.set_fragment(None);
        match parsed.as_str().parse::<Uri>() {
            Ok(uri) => Target {
                uri: Ok(uri),
                authorization,
                forbidden,
            },
            Err(e) => invalid(&e),
        }
    }

    fn literal_forbidden(&self, parsed: &url::Url) -> Option<String> {
        let ip = match parsed.host()? {
            url::Host::Ipv4(v4) => IpAddr::V4(v4),
            url::Host::Ipv6(v6) => IpAddr::V6(v6),
            url::Host::Domain(_) => return None,
        };
        (!self.policy.permits(ip))
            .then(|| format!("address.forbidden: {ip} is an internal address"))
    }

    /// Send, then read (and ignore) at most [`MAX_RESPONSE_BYTES`] of the answer, so the
    /// connection can be reused.
    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<u16, Failure> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(Failure::Client)?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                seen += data.len();
                if seen > MAX_RESPONSE_BYTES {
                    break;
                }
            }
        }
        Ok(status)
    }
}

enum Failure {
    Client(hyper_util::client::legacy::Error),
    Timeout,
}

/// The attempt's `error` text, and whether the address policy refused it.
fn describe(failure: &Failure) -> (String, bool) {
    let e = match failure {
        Failure::Timeout => return ("timeout: no answer within the deadline".to_owned(), false),
        Failure::Client(e) => e,
    };
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(f) = s.downcast_ref::<Forbidden>() {
            return (f.to_string(), true);
        }
        source = s.source();
    }
    let kind = if e.is_connect() { "connect" } else { "request" };
    let mut msg = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    (msg, false)
}

#[async_trait]
impl WebhookSender for HttpSender {
    async fn send(&self, r: SignedRequest) -> SendResult {
        let started = Instant::now();
        let elapsed = |t: Instant| i64::try_from(t.elapsed().as_millis()).unwrap_or(i64::MAX);
        let failed = |error: String, forbidden: bool, latency_ms: i64| SendResult {
            status_code: None,
            error: Some(error),
            forbidden,
            latency_ms,
        };
        let target = self.target(&r.url);
        if let Some(error) = &target.forbidden {
            return failed(error.clone(), true, 0);
        }
        let uri = match &target.uri {
            Ok(uri) => uri.clone(),
            Err(e) => return failed(e.clone(), false, 0),
        };
        let mut builder = Request::post(uri)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT))
            .header("X-Sautikit-Signature", r.signature)
            .header("X-Sautikit-Event-Id", r.event_id)
            .header("X-Sautikit-Event-Kind", r.event_kind);
        if let Some(auth) = &target.authorization {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        let request = match builder.body(Full::new(Bytes::from(r.body))) {
            Ok(request) => request,
            Err(e) => return failed(format!("request: {e}"), false, 0),
        };
        let outcome = tokio::time::timeout(r.timeout, self.exchange(request))
            .await
            .unwrap_or(Err(Failure::Timeout));
        match outcome {
            Ok(status) => SendResult {
                status_code: Some(status),
                error: None,
                forbidden: false,
                latency_ms: elapsed(started),
            },
            Err(failure) => {
                let (error, forbidden) = describe(&failure);
                failed(error, forbidden, elapsed(started))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "41.90.64.1", "2001:4860:4860::8888"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
        let p = AddressPolicy {
            refuse_internal: true,
            allow: vec!["10.0.0.0/8".parse().expect("net")],
        };
        assert!(p.permits("10.9.9.9".parse().expect("ip")));
        assert!(!p.permits("192.168.0.1".parse().expect("ip")));
        assert!(AddressPolicy::default().permits("127.0.0.1".parse().expect("ip")));
    }
}
