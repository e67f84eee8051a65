//! Webhook rules shared by every sender: the signature (DESIGN §6), the retry schedule, and the
//! outbox and transport traits the Events actor works through.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::store::StorageError;

/// A receiver must acknowledge within this (DESIGN §6).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts before a delivery becomes a dead letter.
pub const MAX_ATTEMPTS: i64 = 8;

/// Base delay before attempt n+1 after attempt n failed (n = 1..7): immediately, then 30 s, 2 min,
/// 10 min, 30 min, 2 h, 6 h, 24 h.
const RETRY_BASE_SECS: [u64; 7] = [30, 120, 600, 1800, 7200, 21_600, 86_400];

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, body + "." + t)>`: body first, then ".", then
/// t, which is exactly what the guide's Express handler recomputes.
pub fn signature_header(secret: &str, body: &[u8], t: i64) -> String {
    format!("t={t},v1={}", signature_hex(secret, body, t))
}

pub fn signature_hex(secret: &str, body: &[u8], t: i64) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    mac.update(b".");
    mac.update(t.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// When to try again after `attempts_done` failed attempts, or `None` for a dead letter.
///
/// Full jitter: a uniformly spread point in `[0, base]`, scaled by `scale` (tests shrink the
/// schedule). The jitter is derived from the delivery id, so it is spread across deliveries but
/// reproducible for one.
pub fn retry_delay(
    delivery_id: &str,
    attempts_done: i64,
    max_attempts: i64,
    scale: f64,
) -> Option<Duration> {
    if attempts_done >= max_attempts {
        return None;
    }
    let idx = usize::try_from(attempts_done - 1).ok()?;
    let base = *RETRY_BASE_SECS.get(idx.min(RETRY_BASE_SECS.len() - 1))?;
    let jitter = unit_hash(delivery_id, attempts_done);
    Some(Duration::from_secs_f64(
        base as f64 * scale.max(0.0) * jitter,
    ))
}

/// A number in [0, 1) from FNV-1a over the id and attempt number.
fn unit_hash(id: &str, attempt: i64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes().chain(attempt.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A delivery taken from the outbox for one attempt, with what is needed to send it.
#[derive(Debug, Clone)]
pub struct LeasedDelivery {
    pub id: String,
    pub event_id: String,
    pub event_kind: String,
    pub ordering_key: String,
    pub url: String,
    /// The exact JSON envelope, fixed when the event was written.
    pub body: String,
    /// The workspace's current signing secret.
    pub secret: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub lease_until: DateTime<Utc>,
    /// Set when the delivery is not in the outbox table yet (only its event is): the outbox
    /// writes it together with its first attempt, or as pending if it is released unattempted.
    pub unwritten: Option<Arc<Unwritten>>,
}

/// What the outbox needs to write a delivery that so far exists only in the leasing process.
#[derive(Debug, Clone)]
pub struct Unwritten {
    pub event_id: String,
    pub workspace_id: String,
    pub subscription_id: Option<String>,
    pub url: String,
    pub ordering_key: String,
    pub event_kind: String,
    pub number_id: Option<String>,
    pub call_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The event's claimed row in the PostgreSQL outbox's queue, deleted when this delivery is
    /// written (SQLite keeps its claims in the process instead).
    pub queue_seq: Option<i64>,
}

/// What the receiver (or the network) said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendResult {
    pub status_code: Option<u16>,
    pub error: Option<String>,
    /// The URL resolves to an address deliveries may not go to (production URL safety): retrying
    /// cannot help.
    pub forbidden: bool,
    pub latency_ms: i64,
}

impl SendResult {
    pub fn acknowledged(&self) -> bool {
        !self.forbidden && self.status_code.is_some_and(|s| (200..300).contains(&s))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Succeeded,
    RetryAt(DateTime<Utc>),
    DeadLetter,
}

/// One finished attempt and what follows from it.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: String,
    /// 1-based number of this attempt.
    pub attempt: i64,
    pub attempted_at: DateTime<Utc>,
    pub result: SendResult,
    pub resolution: Resolution,
    pub max_attempts: i64,
    /// Where it went: a retried delivery that succeeds there brings the receiver's other
    /// waiting deliveries forward.
    pub url: String,
    /// The delivery is not in the outbox table yet (see [`LeasedDelivery::unwritten`]).
    pub unwritten: Option<Arc<Unwritten>>,
}

pub fn resolve(
    d: &LeasedDelivery,
    attempted_at: DateTime<Utc>,
    result: SendResult,
    retry_scale: f64,
) -> AttemptRecord {
    let attempt = d.attempts + 1;
    let resolution = if result.acknowledged() {
        Resolution::Succeeded
    } else if result.forbidden {
        Resolution::DeadLetter
    } else {
        match retry_delay(&d.id, attempt, d.max_attempts, retry_scale) {
            Some(delay) => Resolution::RetryAt(
                attempted_at + chrono::Duration::from_std(delay).unwrap_or_default(),
            ),
            None => Resolution::DeadLetter,
        }
    };
    AttemptRecord {
        delivery_id: d.id.clone(),
        attempt,
        attempted_at,
        result,
        resolution,
        max_attempts: d.max_attempts,
        url: d.url.clone(),
        unwritten: d.unwritten.clone(),
    }
}

/// The durable outbox, as the Events actor sees it.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Lease up to `limit` due deliveries that are at the head of their ordering key (every
    /// earlier pending delivery of the key is in the same batch), oldest first.
    async fn lease_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<LeasedDelivery>, StorageError>;

    /// Write finished attempts, and drop the leases of deliveries that were not attempted (an
    /// unwritten one is written as pending).
    async fn record(
        &self,
        attempts: &[AttemptRecord],
        released: &[LeasedDelivery],
    ) -> Result<(), StorageError>;

    /// The leasing actor (re)starts and holds nothing: leases taken before belong to nobody.
    async fn forget_leases(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

/// One signed POST.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub url: String,
    /// At most the delivery timeout, and never past the delivery's lease.
    pub timeout: Duration,
    pub body: String,
    pub signature: String,
    pub event_id: String,
    pub event_kind: String,
}

#[async_trait]
pub trait WebhookSender: Send + Sync + 'static {
    async fn send(&self, request: SignedRequest) -> SendResult;
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently with
    // `printf '%s' "$body.$t" | openssl dgst -sha256 -hmac "$secret"` (also in the README).
    #[test]
    fn signature_matches_published_vectors() {
        assert_eq!(
            signature_header("whsec_test", br#"{"a":1}"#, 1_700_000_000),
            "t=1700000000,v1=be53e6c28964200faf43dcaaccd83cb10e6a71a48f3c3f0ac5208386a65a8ab3"
        );
        assert_eq!(
            signature_header(
                "whsec_example",
                br#"{"event_id":"01900000-0000-7000-8000-0000000000e1","event_kind":"number.provisioned"}"#,
                1_782_561_600
            ),
            "t=1782561600,v1=b78b723d153aecc63d8827de88aa1b4ddd6b07ca81354f59025238041ce28a58"
        );
    }

    #[test]
    fn schedule_is_bounded_and_ends_in_dead_letter() {
        for attempt in 1..MAX_ATTEMPTS {
            let d = retry_delay("d1", attempt, MAX_ATTEMPTS, 1.0).expect("retry");
            assert!(d <= Duration::from_secs(RETRY_BASE_SECS[attempt as usize - 1]));
        }
        assert_eq!(retry_delay("d1", MAX_ATTEMPTS, MAX_ATTEMPTS, 1.0), None);
        let spread: std::collections::HashSet<u128> = (0..50)
            .map(|i| {
                retry_delay(&format!("d{i}"), 1, MAX_ATTEMPTS, 1.0)
                    .unwrap_or_default()
                    .as_millis()
            })
            .collect();
        assert!(spread.len() > 40, "jitter spreads retries");
        assert!(
            retry_delay("d1", 3, MAX_ATTEMPTS, 0.001).unwrap_or_default()
                <= Duration::from_millis(600)
        );
    }
}
