//! Webhook HTTP transport: reqwest with a 10 s deadline, no redirects, and in production a
//! resolver that refuses loopback, private, link-local and unspecified addresses unless an
//! operator allowed them (on-premise receivers).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sautikit_actors::webhook::{SendResult, SignedRequest, WebhookSender};

pub use sautikit_actors::webhook::DELIVERY_TIMEOUT;
/// We read (and ignore) at most this much of a receiver's answer.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

pub const USER_AGENT: &str = concat!("Sautikit-Webhooks/", env!("CARGO_PKG_VERSION"));

/// Which destination addresses deliveries may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Refuse internal addresses (production mode).
    pub refuse_internal: bool,
    /// Internal ranges allowed anyway.
    pub allow: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.refuse_internal || !is_internal(ip) || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// Loopback, private, link-local, unspecified, shared (CGNAT), multicast and broadcast.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
        }
    }
}

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
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(Forbidden(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

pub struct HttpSender {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    /// Parsed URLs and their literal-address verdicts: a handful of receivers get most requests,
    /// so each URL is parsed once, not once per delivery.
    targets: Mutex<HashMap<String, Arc<Target>>>,
}

struct Target {
    url: Option<reqwest::Url>,
    forbidden: Option<String>,
}

/// Parsed URLs kept at most; the cache starts over when it is full.
const MAX_TARGETS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

impl HttpSender {
    pub fn new(policy: AddressPolicy) -> Result<HttpSender, SenderError> {
        // One process-wide crypto provider; a second install attempt is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .timeout(DELIVERY_TIMEOUT)
            .connect_timeout(DELIVERY_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .pool_max_idle_per_host(256)
            .dns_resolver(GuardedResolver {
                policy: policy.clone(),
            })
            .build()?;
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
        let parsed = url::Url::parse(url).ok();
        let t = Arc::new(Target {
            forbidden: parsed.as_ref().and_then(|u| self.literal_forbidden(u)),
            url: parsed,
        });
        if targets.len() >= MAX_TARGETS {
            targets.clear();
        }
        targets.insert(url.to_owned(), t.clone());
        t
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
}

fn describe(e: &reqwest::Error) -> (String, bool) {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(f) = s.downcast_ref::<Forbidden>() {
            return (f.to_string(), true);
        }
        source = s.source();
    }
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
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
        let target = self.target(&r.url);
        if let Some(error) = &target.forbidden {
            return SendResult {
                status_code: None,
                error: Some(error.clone()),
                forbidden: true,
                latency_ms: 0,
            };
        }
        let request = match &target.url {
            Some(url) => self.client.post(url.clone()),
            // Unparseable: reqwest reports why.
            None => self.client.post(&r.url),
        };
        let sent = request
            .timeout(r.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Sautikit-Signature", &r.signature)
            .header("X-Sautikit-Event-Id", &r.event_id)
            .header("X-Sautikit-Event-Kind", &r.event_kind)
            .body(r.body)
            .send()
            .await;
        match sent {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                // Drain a bounded amount so the connection can be reused.
                let mut seen = 0usize;
                while let Ok(Some(chunk)) = resp.chunk().await {
                    seen += chunk.len();
                    if seen > MAX_RESPONSE_BYTES {
                        break;
                    }
                }
                SendResult {
                    status_code: Some(status),
                    error: None,
                    forbidden: false,
                    latency_ms: elapsed(started),
                }
            }
            Err(e) => {
                let (error, forbidden) = describe(&e);
                SendResult {
                    status_code: None,
                    error: Some(error),
                    forbidden,
                    latency_ms: elapsed(started),
                }
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
