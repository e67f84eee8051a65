//! Prompts from URLs for the `play` verb (DESIGN §7): the [`AudioFetcher`] that downloads WAV or
//! MP3 from the customer's URL, decodes it to 8 kHz mono PCM and caches it by URL with HTTP
//! validators.
//!
//! Transport rules are those of webhooks and voice callbacks (`webhooks::sender`): rustls, and in
//! production the [`AddressPolicy`] applied to the addresses actually connected to.

use std::ffi::OsStr;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
// Used by the tests' local HTTP server.
#[cfg(test)]
use futures::future::{BoxFuture, FutureExt};
use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT, AGE, CACHE_CONTROL, CONTENT_TYPE, ETAG, HeaderMap, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED,
};
use sautikit_actors::audio::{AudioFetcher, PlayError};
use sautikit_actors::decode::decode_to_8k;
use sautikit_actors::synth::{Audio, SAMPLE_RATE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::cache::{SingleFlight, Weigh, WeightedLru, lock};
use crate::webhooks::sender::{AddressPolicy, Forbidden, GuardedResolver};

pub const USER_AGENT: &str = concat!("Sautikit-Play/", env!("CARGO_PKG_VERSION"));

/// Redirects followed per fetch. Prompts are often behind a CDN or a storage "share" link that
/// redirects once or twice; each hop goes through the same address policy.
pub const MAX_REDIRECTS: usize = 3;

/// In-memory cache budget: 64 MiB of 16-bit samples, about 70 minutes of prompts.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 64 << 20;

/// Bumped whenever the cached audio would change for the same download (decoder, resampler,
/// file layout), so stale entries are never served.
const CACHE_FORMAT: &str = "sautikit-play-v1";

/// Decoding is CPU-bound and a long file holds tens of MiB of samples until resampled: at most
/// this many decodes run at once, whatever the number of calls starting prompts.
const MAX_CONCURRENT_DECODES: usize = 2;

/// Limits on one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayLimits {
    /// Largest download; a bigger body is refused without reading the rest of it.
    pub max_bytes: u64,
    /// Deadline for one download, from connecting to the last body byte (redirects included).
    pub timeout: Duration,
    /// Longest decoded prompt. Longer audio is cut here (the first `max_seconds` are played)
    /// rather than refused, so a long hold-music file still plays.
    pub max_seconds: u32,
}

impl Default for PlayLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            timeout: Duration::from_secs(10),
            max_seconds: 600,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlayFetcherError {
    #[error("cannot build the HTTP client for play: {0}")]
    Build(#[from] reqwest::Error),
    #[error("cannot create the play cache directory {path}: {source}")]
    CacheDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The `play` fetcher.
///
/// # Fetching
///
/// `GET` with `Accept: audio/wav, audio/mpeg`, up to [`MAX_REDIRECTS`] redirects (each target's
/// address checked like the first), no cookies. The body is read in chunks and abandoned as soon
/// as it passes `max_bytes` (a larger `Content-Length` is refused before reading). Non-2xx is
/// [`PlayError::HttpStatus`]; the deadline, [`PlayError::Timeout`]; DNS or connection failures,
/// [`PlayError::Unreachable`]; an address the policy refuses, [`PlayError::Forbidden`].
///
/// # Decoding
///
/// The container is sniffed from the bytes (the `Content-Type` only breaks ties): RIFF/WAVE
/// (PCM 8/16/24/32-bit, IEEE float, µ-law, A-law, IMA/MS ADPCM) or MPEG audio (MP3, with or
/// without an ID3v2 tag). Anything else, or a WAV whose data chunk is cut short, is
/// [`PlayError::NotAudio`]. Channels are averaged to mono, converted to 16-bit and resampled to
/// 8 kHz band-limited ([`sautikit_actors::resample::to_8k_mono`]).
///
/// # Caching
///
/// Keyed by the URL (without fragment). Tiers: an LRU of entries bounded by total samples; then
/// under the cache directory, per URL, `<sha256>.wav` (the decoded 8 kHz PCM) and
/// `<sha256>.json` (URL, `ETag`, `Last-Modified`, fetch time, freshness lifetime, the WAV's
/// SHA-256), each written to a temporary file, synced and renamed. An entry is fresh for
/// `max-age` (or `s-maxage`) less the response's `Age`; a fresh entry is served with no request.
/// A stale one (or one stored without `max-age`, or with `no-cache`) is revalidated with
/// `If-None-Match` / `If-Modified-Since`; `304` reuses the audio. If revalidation cannot reach
/// the server (timeout, connection failure, 5xx), the stale audio is served and the next play
/// tries again; a 4xx drops the entry. `no-store` responses are played but not stored.
/// Concurrent fetches of one URL share a single flight, which runs as its own task so a caller
/// hanging up does not waste the work.
pub struct HttpAudioFetcher {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    limits: PlayLimits,
    cache_dir: PathBuf,
    memory: Mutex<Lru>,
    inflight: SingleFlight<String, Result<Audio, PlayError>>,
    decode_slots: Semaphore,
    requests: AtomicU64,
}

/// A redirect the policy refuses; found in reqwest's error chain.
#[derive(Debug, thiserror::Error)]
#[error("redirect to {0}, an internal address")]
struct RedirectForbidden(IpAddr);

impl HttpAudioFetcher {
    /// A fetcher caching under `cache_dir` (created if missing).
    pub fn new(
        policy: AddressPolicy,
        cache_dir: PathBuf,
        limits: PlayLimits,
    ) -> Result<Self, PlayFetcherError> {
        Self::with_memory_budget(policy, cache_dir, limits, DEFAULT_MEMORY_BUDGET_BYTES)
    }

    /// As [`new`](Self::new), with `memory_budget_bytes` of PCM kept in memory.
    pub fn with_memory_budget(
        policy: AddressPolicy,
        cache_dir: PathBuf,
        limits: PlayLimits,
        memory_budget_bytes: usize,
    ) -> Result<Self, PlayFetcherError> {
        // One process-wide crypto provider; a second install attempt is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(&cache_dir).map_err(|source| PlayFetcherError::CacheDir {
            path: cache_dir.clone(),
            source,
        })?;
        let policy = Arc::new(policy);
        let redirect_policy = policy.clone();
        let client = reqwest::Client::builder()
            .timeout(limits.timeout)
            .connect_timeout(limits.timeout)
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                // Names are checked by the resolver when connecting; IP literals never reach
                // it, so they are checked here.
                let ip = match attempt.url().host() {
                    Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
                    Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
                    _ => None,
                };
                if let Some(ip) = ip.filter(|ip| !redirect_policy.permits(*ip)) {
                    return attempt.error(RedirectForbidden(ip));
                }
                // Stopping hands the 3xx back, which is reported as its status.
                if attempt.previous().len() > MAX_REDIRECTS
                    || !matches!(attempt.url().scheme(), "http" | "https")
                {
                    return attempt.stop();
                }
                attempt.follow()
            }))
            .user_agent(USER_AGENT)
            .dns_resolver(GuardedResolver {
                policy: policy.clone(),
            })
            .build()?;
        let budget_samples = memory_budget_bytes / std::mem::size_of::<i16>();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                policy,
                limits,
                cache_dir,
                memory: Mutex::new(Lru::new(budget_samples)),
                inflight: SingleFlight::new(),
                decode_slots: Semaphore::new(MAX_CONCURRENT_DECODES),
                requests: AtomicU64::new(0),
            }),
        })
    }

    /// HTTP requests this instance sent (full and conditional), for metrics and tests.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    pub fn cache_dir(&self) -> &Path {
        &self.inner.cache_dir
    }

    pub fn limits(&self) -> PlayLimits {
        self.inner.limits
    }
}

#[async_trait]
impl AudioFetcher for HttpAudioFetcher {
    async fn fetch(&self, url: &str) -> Result<Audio, PlayError> {
        let key = cache_url(url)?;
        if let Some(message) = self.inner.literal_forbidden(&key) {
            return Err(PlayError::Forbidden { message });
        }
        let now = unix_now();
        if let Some(audio) = lock(&self.inner.memory).get_fresh(&key, now) {
            metrics::counter!("sautikit_play_requests_total", "source" => "memory").increment(1);
            return Ok(audio);
        }
        let flight = self.inner.inflight.join(
            key.clone(),
            // No second look at memory: a new flight starts there, and a stale entry is the
            // flight's to revalidate.
            || None,
            || self.inner.clone().fill(key.clone()),
            |e| {
                Err(PlayError::Unreachable {
                    message: format!("play fetch task failed: {e}"),
                })
            },
        );
        let result = flight.await;
        if let Err(e) = &result {
            tracing::info!(url = %key, reason = e.reason(), error = %e, "play fetch failed");
        }
        result
    }
}

/// The cache key and request URL: absolute http(s), without the fragment (never sent anyway).
fn cache_url(url: &str) -> Result<String, PlayError> {
    let mut parsed = url::Url::parse(url).map_err(|e| PlayError::Unreachable {
        message: format!("invalid audio URL: {e}"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(PlayError::Unreachable {
            message: format!("invalid audio URL: {} is not http(s)", parsed.scheme()),
        });
    }
    parsed.set_fragment(None);
    Ok(parsed.into())
}

/// What the server answered.
enum Download {
    NotModified(HeaderMap),
    Body { headers: HeaderMap, bytes: Vec<u8> },
}

impl Inner {
    /// reqwest does not resolve IP literals, so the policy is checked here for those.
    fn literal_forbidden(&self, url: &str) -> Option<String> {
        let parsed = url::Url::parse(url).ok()?;
        let ip = match parsed.host()? {
            url::Host::Ipv4(v4) => IpAddr::V4(v4),
            url::Host::Ipv6(v6) => IpAddr::V6(v6),
            url::Host::Domain(_) => return None,
        };
        (!self.policy.permits(ip)).then(|| format!("{ip} is an internal address"))
    }

    /// One flight: memory or disk if fresh, else a (conditional) download. The result is in
    /// memory before the flight leaves the in-flight map.
    async fn fill(self: Arc<Self>, key: String) -> Result<Audio, PlayError> {
        let now = unix_now();
        let mut cached = lock(&self.memory).get(&key);
        if cached.is_none() {
            cached = self.read_disk(&key).await;
        }
        if let Some(entry) = &cached
            && entry.meta.is_fresh(now)
        {
            metrics::counter!("sautikit_play_requests_total", "source" => "disk").increment(1);
            lock(&self.memory).insert(key, entry.clone());
            return Ok(entry.audio.clone());
        }

        let downloaded = self
            .download(&key, cached.as_ref().map(|entry| &entry.meta))
            .await;
        match (downloaded, cached) {
            (Ok(Download::NotModified(headers)), Some(entry)) => {
                metrics::counter!("sautikit_play_requests_total", "source" => "revalidated")
                    .increment(1);
                let meta = entry.meta.revalidated(&headers, unix_now());
                let entry = Arc::new(Entry {
                    audio: entry.audio.clone(),
                    meta,
                });
                self.write_meta(&key, &entry.meta).await;
                lock(&self.memory).insert(key, entry.clone());
                Ok(entry.audio.clone())
            }
            (Ok(Download::NotModified(_)), None) => Err(PlayError::HttpStatus {
                // We sent no validators, so a 304 is the server's error.
                status_code: StatusCode::NOT_MODIFIED.as_u16(),
            }),
            (Ok(Download::Body { headers, bytes }), _) => {
                metrics::counter!("sautikit_play_requests_total", "source" => "download")
                    .increment(1);
                let audio = self.decode(bytes, &headers).await?;
                let directives = CacheDirectives::parse(&headers);
                if directives.no_store {
                    self.forget(&key).await;
                    return Ok(audio);
                }
                let meta = Meta::from_response(&key, &headers, &directives, unix_now(), &audio);
                let entry = Arc::new(Entry { audio, meta });
                self.write_entry(&key, &entry).await;
                lock(&self.memory).insert(key, entry.clone());
                Ok(entry.audio.clone())
            }
            (Err(e), Some(entry)) if serves_stale(&e) => {
                // Playing last known audio beats failing the call over a flaky origin; the
                // entry stays stale, so the next play tries the server again.
                tracing::warn!(url = %key, error = %e, "play: revalidation failed, serving the cached audio");
                metrics::counter!("sautikit_play_requests_total", "source" => "stale").increment(1);
                lock(&self.memory).insert(key, entry.clone());
                Ok(entry.audio.clone())
            }
            (Err(e), cached) => {
                if cached.is_some() {
                    // The resource is gone or refused: do not keep playing it.
                    self.forget(&key).await;
                }
                metrics::counter!("sautikit_play_failures_total", "reason" => e.reason())
                    .increment(1);
                Err(e)
            }
        }
    }

    /// The HTTP exchange, under the whole-download deadline.
    async fn download(&self, url: &str, validators: Option<&Meta>) -> Result<Download, PlayError> {
        let timeout = self.limits.timeout;
        match tokio::time::timeout(timeout, self.exchange(url, validators)).await {
            Ok(result) => result,
            Err(_) => Err(PlayError::Timeout {
                timeout_ms: millis(timeout),
            }),
        }
    }

    async fn exchange(&self, url: &str, validators: Option<&Meta>) -> Result<Download, PlayError> {
        let mut request = self
            .client
            .get(url)
            .header(ACCEPT, "audio/wav, audio/x-wav, audio/mpeg, audio/*;q=0.5");
        if let Some(meta) = validators {
            if let Some(etag) = &meta.etag {
                request = request.header(IF_NONE_MATCH, etag);
            }
            if let Some(last_modified) = &meta.last_modified {
                request = request.header(IF_MODIFIED_SINCE, last_modified);
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED && validators.is_some() {
            return Ok(Download::NotModified(response.headers().clone()));
        }
        if !status.is_success() {
            return Err(PlayError::HttpStatus {
                status_code: status.as_u16(),
            });
        }
        let limit = self.limits.max_bytes;
        let too_large = PlayError::TooLarge { limit_bytes: limit };
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(too_large);
        }
        let headers = response.headers().clone();
        let mut bytes = Vec::with_capacity(
            response
                .content_length()
                .map_or(64 << 10, |n| n as usize)
                .min(limit as usize),
        );
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(&e))? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                // Dropping the response closes the connection: the rest is never read.
                return Err(too_large);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Download::Body { headers, bytes })
    }

    /// Sorts a transport error into the play failure kinds.
    fn transport(&self, e: &reqwest::Error) -> PlayError {
        let mut source: Option<&dyn std::error::Error> = Some(e);
        while let Some(s) = source {
            if let Some(Forbidden(host)) = s.downcast_ref::<Forbidden>() {
                return PlayError::Forbidden {
                    message: format!("{host} resolves only to internal addresses"),
                };
            }
            if let Some(refused) = s.downcast_ref::<RedirectForbidden>() {
                return PlayError::Forbidden {
                    message: refused.to_string(),
                };
            }
            source = s.source();
        }
        if e.is_timeout() {
            return PlayError::Timeout {
                timeout_ms: millis(self.limits.timeout),
            };
        }
        // reqwest's Display is terse ("error sending request"); the cause is in the chain.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        PlayError::Unreachable { message }
    }

    async fn decode(&self, bytes: Vec<u8>, headers: &HeaderMap) -> Result<Audio, PlayError> {
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let max_seconds = self.limits.max_seconds;
        // The semaphore is never closed, so acquiring only waits.
        let _slot = self.decode_slots.acquire().await.ok();
        let samples = tokio::task::spawn_blocking(move || {
            decode_to_8k(&bytes, content_type.as_deref(), max_seconds)
        })
        .await
        .map_err(|e| PlayError::NotAudio {
            message: format!("decoder task failed: {e}"),
        })??;
        Ok(Audio::from(samples))
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        let mut hasher = Sha256::new();
        hasher.update(CACHE_FORMAT.as_bytes());
        hasher.update([0]);
        hasher.update(key.as_bytes());
        let name = hex::encode(hasher.finalize());
        (
            self.cache_dir.join(format!("{name}.wav")),
            self.cache_dir.join(format!("{name}.json")),
        )
    }

    /// The disk entry for `key`, if whole and consistent; anything unusable is deleted.
    async fn read_disk(&self, key: &str) -> Option<Arc<Entry>> {
        let (wav_path, meta_path) = self.paths(key);
        let owned_key = key.to_owned();
        let read = tokio::task::spawn_blocking(move || -> Result<Option<Entry>, String> {
            let meta = match std::fs::read(&meta_path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            let meta: Meta = serde_json::from_slice(&meta).map_err(|e| e.to_string())?;
            if meta.url != owned_key {
                return Err("entry is for another URL".into());
            }
            let wav = std::fs::read(&wav_path).map_err(|e| e.to_string())?;
            // The hash ties the two files together: a crash between writing a new WAV and its
            // metadata cannot pair audio with another version's validators.
            if hex::encode(Sha256::digest(&wav)) != meta.wav_sha256 {
                return Err("audio does not match its metadata".into());
            }
            let samples = parse_cache_wav(&wav)?;
            Ok(Some(Entry {
                audio: Audio::from(samples),
                meta,
            }))
        })
        .await;
        match read {
            Ok(Ok(entry)) => entry.map(Arc::new),
            Ok(Err(e)) => {
                // A corrupt entry is dropped and fetched again rather than failing the call.
                tracing::warn!(url = %key, error = %e, "discarding unreadable play cache entry");
                self.forget(key).await;
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "play cache reader task failed");
                None
            }
        }
    }

    /// Drops `key` from both tiers.
    async fn forget(&self, key: &str) {
        lock(&self.memory).remove(key);
        let (wav_path, meta_path) = self.paths(key);
        // Metadata first: without it the WAV is never read.
        let _ = tokio::fs::remove_file(&meta_path).await;
        let _ = tokio::fs::remove_file(&wav_path).await;
    }

    /// Writes audio then metadata. Failures are logged: serving the prompt matters more than
    /// caching it.
    async fn write_entry(&self, key: &str, entry: &Arc<Entry>) {
        let (wav_path, meta_path) = self.paths(key);
        let dir = self.cache_dir.clone();
        let entry = entry.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let wav = encode_wav(&entry.audio.samples);
            write_atomic(&dir, &wav_path, &wav)?;
            write_atomic(&dir, &meta_path, &serde_json::to_vec_pretty(&entry.meta)?)
        })
        .await;
        log_write(written);
    }

    /// After a 304: only the metadata changes.
    async fn write_meta(&self, key: &str, meta: &Meta) {
        let (_, meta_path) = self.paths(key);
        let dir = self.cache_dir.clone();
        let meta = meta.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            write_atomic(&dir, &meta_path, &serde_json::to_vec_pretty(&meta)?)
        })
        .await;
        log_write(written);
    }
}

fn log_write(written: Result<std::io::Result<()>, tokio::task::JoinError>) {
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot write play cache entry"),
        Err(e) => tracing::warn!(error = %e, "play cache writer task failed"),
    }
}

/// Failures after which a stale entry is still played: the origin is down or overloaded, not
/// saying the resource changed or went away.
fn serves_stale(e: &PlayError) -> bool {
    match e {
        PlayError::Timeout { .. } | PlayError::Unreachable { .. } => true,
        PlayError::HttpStatus { status_code } => *status_code >= 500,
        _ => false,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Cache entries and HTTP freshness

struct Entry {
    audio: Audio,
    meta: Meta,
}

/// What the `.json` file beside a cached WAV holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
    /// Unix seconds of the download or the last successful revalidation.
    fetched_at: u64,
    /// Seconds the entry stays fresh after `fetched_at` (max-age less the response's Age);
    /// `None`: revalidate on every play.
    max_age: Option<u64>,
    /// SHA-256 (hex) of the `.wav` file.
    wav_sha256: String,
}

impl Meta {
    fn from_response(
        url: &str,
        headers: &HeaderMap,
        directives: &CacheDirectives,
        now: u64,
        audio: &Audio,
    ) -> Self {
        Meta {
            url: url.to_owned(),
            etag: header_str(headers, ETAG),
            last_modified: header_str(headers, LAST_MODIFIED),
            fetched_at: now,
            max_age: directives.lifetime(headers),
            wav_sha256: hex::encode(Sha256::digest(encode_wav(&audio.samples))),
        }
    }

    /// After a 304, whose headers update the stored ones (RFC 9111 §4.3.4).
    fn revalidated(&self, headers: &HeaderMap, now: u64) -> Self {
        let directives = CacheDirectives::parse(headers);
        Meta {
            url: self.url.clone(),
            etag: header_str(headers, ETAG).or_else(|| self.etag.clone()),
            last_modified: header_str(headers, LAST_MODIFIED)
                .or_else(|| self.last_modified.clone()),
            fetched_at: now,
            max_age: directives.lifetime(headers),
            wav_sha256: self.wav_sha256.clone(),
        }
    }

    fn is_fresh(&self, now: u64) -> bool {
        self.max_age
            .is_some_and(|max_age| now < self.fetched_at.saturating_add(max_age))
    }
}

fn header_str(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// The `Cache-Control` directives that matter to us.
#[derive(Debug, Default, PartialEq, Eq)]
struct CacheDirectives {
    no_store: bool,
    no_cache: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
}

impl CacheDirectives {
    fn parse(headers: &HeaderMap) -> Self {
        let mut d = CacheDirectives::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((name, arg)) => (name, Some(arg.trim().trim_matches('"'))),
                    None => (directive, None),
                };
                let seconds = arg.and_then(|a| a.parse::<u64>().ok());
                match name.trim().to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "max-age" => d.max_age = seconds.or(Some(0)),
                    // We are a shared cache (one copy serves every call), so s-maxage wins.
                    "s-maxage" => d.s_maxage = seconds.or(Some(0)),
                    _ => {}
                }
            }
        }
        d
    }

    /// Remaining freshness at download time.
    fn lifetime(&self, headers: &HeaderMap) -> Option<u64> {
        if self.no_cache {
            return None;
        }
        let age = header_str(headers, AGE)
            .and_then(|a| a.parse::<u64>().ok())
            .unwrap_or(0);
        self.s_maxage
            .or(self.max_age)
            .map(|max_age| max_age.saturating_sub(age))
    }
}

// ---------------------------------------------------------------------------------------------
// Cache files

/// A canonical 44-byte-header WAV of 8 kHz 16-bit mono PCM: what the cache stores, and playable
/// by anything for inspection.
fn encode_wav(samples: &[i16]) -> Vec<u8> {
    sautikit_sip::wav::encode_pcm16(SAMPLE_RATE, samples)
}

/// Reads back exactly what [`encode_wav`] writes.
fn parse_cache_wav(bytes: &[u8]) -> Result<Vec<i16>, String> {
    let header = encode_wav(&[]);
    let expected_data = bytes.len().saturating_sub(44);
    // Everything but the two size fields must match the canonical header.
    if bytes.len() < 44
        || bytes[0..4] != header[0..4]
        || bytes[8..40] != header[8..40]
        || u32::from_le_bytes([bytes[40], bytes[41], bytes[42], bytes[43]]) as usize
            != expected_data
    {
        return Err("not a play cache WAV".into());
    }
    let samples: Vec<i16> = bytes[44..]
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    if samples.is_empty() {
        return Err("no samples".into());
    }
    Ok(samples)
}

/// Temporary file in the same directory, fsync, rename: readers see the old file or the new one,
/// never half of one, even across a crash.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().and_then(OsStr::to_str).unwrap_or("entry");
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// ---------------------------------------------------------------------------------------------
// In-memory LRU: the TTS cache's, keyed by URL, with entries that carry their freshness

type Lru = WeightedLru<String, Arc<Entry>>;

/// An entry weighs its samples, so the budget bounds memory whatever the prompts' lengths.
impl Weigh for Entry {
    fn weight(&self) -> usize {
        self.audio.len()
    }
}

impl Lru {
    /// The audio if the entry is still fresh; a stale entry stays for revalidation.
    fn get_fresh(&mut self, key: &str, now: u64) -> Option<Audio> {
        self.get(key)
            .filter(|entry| entry.meta.is_fresh(now))
            .map(|entry| entry.audio.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use axum::Router;
    use axum::body::Body;
    use axum::extract::State;
    use axum::http::{HeaderMap as AxumHeaders, HeaderValue, Uri};
    use axum::response::{IntoResponse, Response};
    use axum::routing::any;
    use base64::Engine as _;

    use super::*;

    // ---- a local HTTP server

    type Reply = Arc<dyn Fn(AxumHeaders, String) -> BoxFuture<'static, Response> + Send + Sync>;

    #[derive(Clone)]
    struct Origin {
        hits: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<AxumHeaders>>>,
        reply: Reply,
    }

    impl Origin {
        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn last_headers(&self) -> AxumHeaders {
            lock(&self.seen).last().cloned().unwrap_or_default()
        }
    }

    async fn handle(State(o): State<Origin>, uri: Uri, headers: AxumHeaders) -> Response {
        o.hits.fetch_add(1, Ordering::SeqCst);
        lock(&o.seen).push(headers.clone());
        (o.reply)(headers, uri.path().to_owned()).await
    }

    /// Serves `reply` on 127.0.0.1; returns the base URL (no trailing slash).
    async fn origin_async<F>(reply: F) -> (String, Origin)
    where
        F: Fn(AxumHeaders, String) -> BoxFuture<'static, Response> + Send + Sync + 'static,
    {
        let origin = Origin {
            hits: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
            reply: Arc::new(reply),
        };
        let app = Router::new()
            .route("/{*path}", any(handle))
            .with_state(origin.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}"), origin)
    }

    async fn origin<F>(reply: F) -> (String, Origin)
    where
        F: Fn(AxumHeaders, String) -> Response + Send + Sync + 'static,
    {
        origin_async(move |h, p| {
            let r = reply(h, p);
            async move { r }.boxed()
        })
        .await
    }

    fn audio_response(content_type: &'static str, body: Vec<u8>) -> Response {
        ([(CONTENT_TYPE, content_type)], body).into_response()
    }

    fn fetcher(dir: &Path) -> HttpAudioFetcher {
        fetcher_with(dir, AddressPolicy::default(), PlayLimits::default())
    }

    fn fetcher_with(dir: &Path, policy: AddressPolicy, limits: PlayLimits) -> HttpAudioFetcher {
        HttpAudioFetcher::new(policy, dir.join("play-cache"), limits).expect("fetcher")
    }

    // ---- test audio

    fn sine(rate: u32, seconds: f64, freq: f64, amplitude: f64) -> Vec<f64> {
        let n = (f64::from(rate) * seconds) as usize;
        (0..n)
            .map(|i| (i as f64 * freq * std::f64::consts::TAU / f64::from(rate)).sin() * amplitude)
            .collect()
    }

    /// A WAV with `channels` copies of each frame, encoded by `sample`.
    fn wav(
        tag: u16,
        channels: u16,
        rate: u32,
        bits: u16,
        frames: &[f64],
        sample: impl Fn(f64) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut data = Vec::new();
        for &x in frames {
            for _ in 0..channels {
                data.extend(sample(x));
            }
        }
        let block_align = channels * bits / 8;
        let mut fmt = Vec::new();
        fmt.extend_from_slice(&tag.to_le_bytes());
        fmt.extend_from_slice(&channels.to_le_bytes());
        fmt.extend_from_slice(&rate.to_le_bytes());
        fmt.extend_from_slice(&(rate * u32::from(block_align)).to_le_bytes());
        fmt.extend_from_slice(&block_align.to_le_bytes());
        fmt.extend_from_slice(&bits.to_le_bytes());
        if tag != 1 {
            fmt.extend_from_slice(&0u16.to_le_bytes()); // cbSize
        }
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&((4 + 8 + fmt.len() + 8 + data.len()) as u32).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
        out.extend_from_slice(&fmt);
        out.extend_from_slice(b"data");
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&data);
        out
    }

    fn pcm16(x: f64) -> Vec<u8> {
        ((x * 32767.0) as i16).to_le_bytes().to_vec()
    }

    /// One second of 440 Hz at 44.1 kHz, 16-bit stereo.
    fn tone_wav() -> Vec<u8> {
        wav(1, 2, 44_100, 16, &sine(44_100, 1.0, 440.0, 0.5), pcm16)
    }

    /// Goertzel power of `freq` in 8 kHz samples, normalised by length.
    fn power(samples: &[i16], freq: f64) -> f64 {
        let coeff = 2.0 * (std::f64::consts::TAU * freq / f64::from(SAMPLE_RATE)).cos();
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for &x in samples {
            let s0 = f64::from(x) + coeff * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        (s1 * s1 + s2 * s2 - coeff * s1 * s2) / samples.len() as f64
    }

    /// 440 Hz dominates its neighbours and harmonics by a wide margin.
    fn assert_440(samples: &[i16], what: &str) {
        let p440 = power(samples, 440.0);
        for other in [220.0, 350.0, 530.0, 880.0, 1320.0, 3000.0] {
            let p = power(samples, other);
            assert!(
                p440 > 100.0 * p,
                "{what}: 440 Hz {p440:.0} vs {other} Hz {p:.0}"
            );
        }
        let zero_crossings = samples
            .windows(2)
            .filter(|w| (w[0] < 0) != (w[1] < 0))
            .count() as f64;
        let expected = 2.0 * 440.0 * samples.len() as f64 / f64::from(SAMPLE_RATE);
        assert!(
            (zero_crossings - expected).abs() < expected * 0.05,
            "{what}: {zero_crossings} zero crossings, expected about {expected}"
        );
    }

    /// 0.5 s of 440 Hz, 16 kHz mono, 24 kbit/s MPEG-2 layer III. Made with
    /// `sox -n -r 16000 -c 1 -b 16 tone.wav synth 0.5 sine 440 vol 0.5` and
    /// `lame --quiet -b 24 --resample 16 --noreplaygain -t tone.wav tone.mp3` (Debian's lame).
    const TONE_MP3_BASE64: &[&str] = &[
        "//M4xAAVSIaYF1gQAH/clDluW5bW2vuW5bvv+5DDFSMsg1BOYRmMYKGXERUSIWIzh3IcllgWHAwMDAwfeIAQBDLh/lN3L9IY",
        "4DfpDHAb+GOn3ZQEwffD4IHMBn+7p/y4Pg+qfggwwwgFAAEq//M4xAkXKT7EV5mgAo1//7hRH6/0ogBORgcCOY9VYJ/C9Ygi",
        "LlAwB8NDNAAFwdMiOULmGWJn/IqRUyLxe/8okVIqZF4vf/mJdLqSRkj/BURBUFWf5YKgqIgqCv/5YKhotf//9sRbYwAEAKWW",
        "//M4xAsWuHosAd94ADQAAYCCAoGA6gfxgnoCoYJ8DxmGhEJZqYQ14cNuRrGMKjNxiEgZyYWEKMmAVhJJgjwDeYCAASjoAsDg",
        "B5dSWpNmV67///////9o7////+ragAAAmU3a/n/WZyW2MYJM//M4xA8WqHYyMtf6ZNJzNwjRazAOwLYwHYFvMEzEQDHCqxYz",
        "xEWUMD8BPTIcQjbCLzK8yTJkJjCwBQgFkRWbRSYqnqPpW1EBfs6Pu9CN3VT/9Cv2Ud3/2U2AAADuf/z/5/138YOt0gAECA4Y",
        "//M4xBMVkHY+NO/4gC4fmHA8GOp6mh1mGLGt/Bl4weMYLeCimwWOcs4RnNEGVQiECBJNkjjw5KKc5J/uR/2df8lf/LbU/de7",
        "ou/o6v3t6WvV+SoZIEFgG0YOgMLD6CjfMuAUNSw1O5BuM83B//M4xBsTgH4sAJd+RPg4C4DmMNVBQTA+QakwGQTkMAVBthEA",
        "0jIBEOABKfzP30ilHe7//7e////0///7f//0aP//+lWGMADMmONKuNVLN30MBcAxTAsQYowbASVMmNuhzUWBfswY8E0MciRN",
        "//M4xCwTOHosANf6ZM3ADLxFjKgPTDUDgMDpepesLm5Vi//////////7P//+Lv//+ULHDggOGgSSGDrJm04YDiCGmBpBAxg5",
        "ot6ZIBw5ml8j1JhQwUMbCLcc63WaAHWZlBQYfgGGBQJAOmou//M4xD4UyHYoAN/6ZLduMH8yx3/+1P///q/+j0bX/V5/9NX5",
        "GBuwgoBzgYMQ4ezGwFjLkPTUogDuVVzPHC/03/cIFMNeBdjBFAbIwLkTfMA6BszACgGYVAISAAITvZg4cPyC/z///u////0/",
        "//M4xEkTaH4sAJd+RP+r//9K///5UraAQhkCJplpsYhxtJgOIFkYGkC0mD7iHhlcFawa5CLBGD2Aeph+ZBtFuJlWnpk2JBhc",
        "CpgaABfFg0hoKW07+v/////9P/+//3f+qv//+nYIPAYQKmAE//M4xFoToHosANf6ZGIE4x2LMBIA7jAjwdEwTwUwMYnzXjM+",
        "BuoweEItNRUZOMH8M5SSMtwRCBwFgjGgAVjZY/krw/////////+v///1Vf//+PpuDIkZBByY3AQ9asy0F41HL87Yg4ztVNgN",
        "//M4xGoTCHosAN/6ZPXAvAw10GnMErBuTBABMgwFsGoMArAYwIAQCMAHS0ZG1iHJHe7/7fr2fb/////////W/+/8ytICBzHk",
        "DTqjbPTo3DAggJ0wPEFCMIyD1TMB5482YoT3MI/ArAQfJrn6//M4xHwTuH4sANd+YEZKK8ZGCiYUgwYEAGgCYjLqtNZ7///v",
        "/+xX/6r///fRbYJABzAFwAswBwA0MAyANjAXABowMkFtMGBCETD+RVUxRiZLMJXDyzAMQGQwLgBUMELAOTAogIcwK4CIMA+A",
        "//M4xIwSMH4sANf6ZCowCgAOUfSHTXAuT4+qAFVzlwukC3AGAwHA4HAwA//80BIEq/1+aFYBEkD82lZaAC0oFJrgaEKCyUkw",
        "gVjJoAKRgHhgLAPdrAbJcCSsDXiQMWT/8L9ANAAugIQhdX/+//M4xKIUEH40AV9gACbxZweoLQOaJ3//xIxQQbYKwLhD1xaf",
        "//xkhBAZ4doncckehZBAv///yEGbICSY5hFiQIORUiZFCLf////mhfNTcwNjRM1N0DY0TPU6bktoFLIkTVoQqCLyEUs0ikqh",
        "//M4xLAnKyc7H5qgDtVISVDGlkQmMBM1UBOBRWQzwp4K+KC5BOQUcCnRRXBnhRwKdFBeDPCjsf8F//hDe/0FN/8gr/+Kb/8C",
        "n/+IL/+FDf/oKb/wgpVMQU1FMy4xMDBVVVVVVVVVVVVVVVVV//M4xHIW0JKsP8kYA1VVVVVVVVVVVVVVVVVVVVVVVVVVVVVV",
        "VVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVV",
    ];

    fn tone_mp3() -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(TONE_MP3_BASE64.concat())
            .expect("fixture")
    }

    /// An ID3v2.3 tag with a title, as most MP3s in the wild start.
    fn id3_tag() -> Vec<u8> {
        let mut frame = b"TIT2".to_vec();
        let text = b"\x00Tone";
        frame.extend_from_slice(&(text.len() as u32).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(text);
        let size = frame.len() as u32; // < 128: the syncsafe encoding is the plain byte
        let mut tag = b"ID3\x03\x00\x00".to_vec();
        tag.extend_from_slice(&[0, 0, 0, size as u8]);
        tag.extend(frame);
        tag
    }

    // ---- decoding

    #[tokio::test]
    async fn stereo_44k_wav_is_8k_mono_440hz() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, _) = origin(|_, _| audio_response("audio/wav", tone_wav())).await;
        let audio = fetcher(dir.path())
            .fetch(&format!("{base}/tone.wav"))
            .await
            .expect("audio");
        assert!(
            (7_950..=8_050).contains(&audio.len()),
            "{} samples",
            audio.len()
        );
        assert_440(&audio.samples, "44.1 kHz stereo WAV");
        // Half scale in, about half scale out: no gain change from mixing or resampling.
        let peak = audio
            .samples
            .iter()
            .map(|s| s.unsigned_abs())
            .max()
            .unwrap_or(0);
        assert!((15_000..=17_500).contains(&peak), "peak {peak}");
    }

    #[test]
    fn wav_encodings() {
        let frames = sine(16_000, 0.5, 440.0, 0.5);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "8-bit",
                wav(1, 1, 16_000, 8, &frames, |x| {
                    vec![((x * 127.0) + 128.0) as u8]
                }),
            ),
            (
                "16-bit 8 kHz",
                wav(1, 1, 8_000, 16, &sine(8_000, 0.5, 440.0, 0.5), pcm16),
            ),
            (
                "24-bit",
                wav(1, 2, 16_000, 24, &frames, |x| {
                    ((x * 8_388_607.0) as i32).to_le_bytes()[..3].to_vec()
                }),
            ),
            (
                "32-bit",
                wav(1, 1, 16_000, 32, &frames, |x| {
                    ((x * 2_147_483_647.0) as i32).to_le_bytes().to_vec()
                }),
            ),
            (
                "float",
                wav(3, 1, 16_000, 32, &frames, |x| {
                    (x as f32).to_le_bytes().to_vec()
                }),
            ),
            (
                "mu-law",
                wav(7, 1, 16_000, 8, &frames, |x| {
                    vec![sautikit_sip::rtp::g711::ulaw::encode((x * 32767.0) as i16)]
                }),
            ),
            (
                "A-law",
                wav(6, 1, 16_000, 8, &frames, |x| {
                    vec![sautikit_sip::rtp::g711::alaw::encode((x * 32767.0) as i16)]
                }),
            ),
        ];
        for (name, bytes) in cases {
            let out = decode_to_8k(&bytes, None, 600).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                (3_950..=4_050).contains(&out.len()),
                "{name}: {} samples",
                out.len()
            );
            assert_440(&out, name);
        }
    }

    #[tokio::test]
    async fn mp3_with_and_without_id3_tag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, _) = origin(|_, path| {
            let mut body = if path == "/tagged.mp3" {
                id3_tag()
            } else {
                Vec::new()
            };
            body.extend(tone_mp3());
            // A wrong Content-Type: the bytes decide.
            audio_response("application/octet-stream", body)
        })
        .await;
        let f = fetcher(dir.path());
        for path in ["/tone.mp3", "/tagged.mp3"] {
            let audio = f.fetch(&format!("{base}{path}")).await.expect(path);
            // 0.5 s plus the encoder's delay and padding (no gapless info: `lame -t`).
            assert!(
                (3_900..=5_000).contains(&audio.len()),
                "{path}: {} samples",
                audio.len()
            );
            assert_440(&audio.samples[600..3_600], path);
        }
    }

    #[tokio::test]
    async fn long_audio_is_cut_at_max_seconds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = wav(1, 1, 8_000, 16, &sine(8_000, 3.0, 440.0, 0.5), pcm16);
        let (base, _) = origin(move |_, _| audio_response("audio/wav", body.clone())).await;
        let limits = PlayLimits {
            max_seconds: 1,
            ..PlayLimits::default()
        };
        let f = fetcher_with(dir.path(), AddressPolicy::default(), limits);
        let audio = f.fetch(&format!("{base}/long.wav")).await.expect("audio");
        assert_eq!(audio.len(), 8_000);
    }

    #[tokio::test]
    async fn not_audio() {
        let dir = tempfile::tempdir().expect("tempdir");
        let whole = tone_wav();
        let truncated = whole[..whole.len() / 2].to_vec();
        let (base, _) = origin(move |_, path| match path.as_str() {
            "/page" => (
                [(CONTENT_TYPE, "text/html; charset=utf-8")],
                "<!DOCTYPE html><html><body>Not found, sorry</body></html>",
            )
                .into_response(),
            "/text" => ([(CONTENT_TYPE, "audio/mpeg")], "just some words").into_response(),
            "/empty" => audio_response("audio/wav", Vec::new()),
            "/truncated.wav" => audio_response("audio/wav", truncated.clone()),
            "/header-only.mp3" => audio_response("audio/mpeg", id3_tag()),
            _ => audio_response("audio/ogg", b"OggS\x00\x02rest".to_vec()),
        })
        .await;
        let f = fetcher(dir.path());
        for (path, needle) in [
            ("/page", "HTML"),
            ("/text", "text"),
            ("/empty", "empty"),
            ("/truncated.wav", "truncated"),
            ("/header-only.mp3", "MP3"),
            ("/x.ogg", "Ogg"),
        ] {
            let e = f.fetch(&format!("{base}{path}")).await.expect_err(path);
            assert!(matches!(e, PlayError::NotAudio { .. }), "{path}: {e:?}");
            assert_eq!(e.reason(), "play.not_audio");
            assert!(e.to_string().contains(needle), "{path}: {e}");
        }
    }

    // ---- HTTP failures

    #[tokio::test]
    async fn http_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, _) = origin(|_, _| (StatusCode::NOT_FOUND, "gone").into_response()).await;
        let e = fetcher(dir.path())
            .fetch(&format!("{base}/missing.wav"))
            .await
            .expect_err("404");
        assert!(
            matches!(e, PlayError::HttpStatus { status_code: 404 }),
            "{e:?}"
        );
    }

    /// An endless body of zeros that counts what the server produced.
    fn endless(produced: Arc<AtomicUsize>) -> Body {
        let chunk = vec![0u8; 64 << 10];
        Body::from_stream(futures::stream::repeat_with(move || {
            produced.fetch_add(chunk.len(), Ordering::SeqCst);
            Ok::<_, std::io::Error>(chunk.clone())
        }))
    }

    #[tokio::test]
    async fn too_large_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let produced = Arc::new(AtomicUsize::new(0));
        let counter = produced.clone();
        let (base, _) = origin(move |_, path| {
            let body = endless(counter.clone());
            if path == "/declared.wav" {
                // Refused on the header alone.
                return (
                    [
                        (CONTENT_TYPE, "audio/wav"),
                        (axum::http::header::CONTENT_LENGTH, "1073741824"),
                    ],
                    body,
                )
                    .into_response();
            }
            ([(CONTENT_TYPE, "audio/wav")], body).into_response()
        })
        .await;
        let limits = PlayLimits {
            max_bytes: 1 << 20,
            ..PlayLimits::default()
        };
        let f = fetcher_with(dir.path(), AddressPolicy::default(), limits);
        for path in ["/declared.wav", "/endless.wav"] {
            let e = f.fetch(&format!("{base}{path}")).await.expect_err(path);
            assert!(
                matches!(e, PlayError::TooLarge { limit_bytes } if limit_bytes == 1 << 20),
                "{path}: {e:?}"
            );
        }
        // The client hung up: the server produced the limit plus what socket buffers hold, not
        // the endless rest.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = produced.load(Ordering::SeqCst);
        assert!(sent < 32 << 20, "server produced {sent} bytes");
    }

    #[tokio::test]
    async fn slow_server_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, _) = origin_async(|_, path| {
            async move {
                if path == "/slow-headers.wav" {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    return audio_response("audio/wav", tone_wav());
                }
                // Headers at once, then a trickle that would take seconds.
                let body = Body::from_stream(futures::stream::unfold(0u32, |n| async move {
                    if n >= 50 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::io::Error>(vec![0u8; 100]), n + 1))
                }));
                ([(CONTENT_TYPE, "audio/wav")], body).into_response()
            }
            .boxed()
        })
        .await;
        let limits = PlayLimits {
            timeout: Duration::from_millis(400),
            ..PlayLimits::default()
        };
        let f = fetcher_with(dir.path(), AddressPolicy::default(), limits);
        for path in ["/slow-headers.wav", "/trickle.wav"] {
            let started = std::time::Instant::now();
            let e = f.fetch(&format!("{base}{path}")).await.expect_err(path);
            assert!(
                matches!(e, PlayError::Timeout { timeout_ms: 400 }),
                "{path}: {e:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(2), "{path}");
        }
    }

    #[tokio::test]
    async fn unreachable_and_invalid_urls() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A port nobody listens on: bind, note it, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let f = fetcher(dir.path());
        let e = f
            .fetch(&format!("http://127.0.0.1:{port}/x.wav"))
            .await
            .expect_err("refused");
        assert!(matches!(e, PlayError::Unreachable { .. }), "{e:?}");
        for url in ["ftp://example.com/x.wav", "not a url"] {
            let e = f.fetch(url).await.expect_err(url);
            assert!(matches!(e, PlayError::Unreachable { .. }), "{url}: {e:?}");
        }
    }

    #[tokio::test]
    async fn production_policy_refuses_internal_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, o) = origin(|_, _| audio_response("audio/wav", tone_wav())).await;
        let production = AddressPolicy {
            refuse_internal: true,
            allow: Vec::new(),
        };
        let f = fetcher_with(dir.path(), production, PlayLimits::default());
        let port = base.rsplit(':').next().unwrap_or_default();
        // The literal is checked up front, the name by the resolver when connecting.
        for url in [
            format!("{base}/tone.wav"),
            format!("http://localhost:{port}/tone.wav"),
        ] {
            let e = f.fetch(&url).await.expect_err(&url);
            assert!(matches!(e, PlayError::Forbidden { .. }), "{url}: {e:?}");
            assert_eq!(e.reason(), "play.forbidden");
        }
        assert_eq!(o.hits(), 0);
    }

    #[tokio::test]
    async fn redirects_are_followed_within_the_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, o) = origin(|_, path| {
            let to = match path.as_str() {
                "/old.wav" => "/tone.wav",
                "/internal.wav" => "http://10.0.0.1/tone.wav",
                "/loop.wav" => "/loop.wav",
                _ => return audio_response("audio/wav", tone_wav()),
            };
            (StatusCode::FOUND, [(axum::http::header::LOCATION, to)]).into_response()
        })
        .await;
        // Production, with loopback allowed as an operator would allow an on-premise origin.
        let policy = AddressPolicy {
            refuse_internal: true,
            allow: vec!["127.0.0.0/8".parse().expect("net")],
        };
        let f = fetcher_with(dir.path(), policy, PlayLimits::default());
        let audio = f
            .fetch(&format!("{base}/old.wav"))
            .await
            .expect("redirected");
        assert!((7_950..=8_050).contains(&audio.len()));
        // Refused before any connection to 10.0.0.1 is attempted.
        let e = f
            .fetch(&format!("{base}/internal.wav"))
            .await
            .expect_err("internal");
        assert!(matches!(e, PlayError::Forbidden { .. }), "{e:?}");
        let before = o.hits();
        let e = f
            .fetch(&format!("{base}/loop.wav"))
            .await
            .expect_err("loop");
        assert!(
            matches!(e, PlayError::HttpStatus { status_code: 302 }),
            "{e:?}"
        );
        assert_eq!(o.hits() - before, MAX_REDIRECTS + 1);
    }

    // ---- caching

    #[tokio::test]
    async fn fresh_entries_cost_no_request_in_memory_or_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, o) = origin(|_, _| {
            (
                [
                    (CONTENT_TYPE, "audio/wav"),
                    (CACHE_CONTROL, "public, max-age=3600"),
                ],
                tone_wav(),
            )
                .into_response()
        })
        .await;
        let url = format!("{base}/tone.wav#fragment-ignored");
        let f = fetcher(dir.path());
        let first = f.fetch(&url).await.expect("first");
        let second = f.fetch(&format!("{base}/tone.wav")).await.expect("second");
        assert_eq!(o.hits(), 1);
        assert!(
            Arc::ptr_eq(&first.samples, &second.samples),
            "shared buffer"
        );
        // A new process: the disk tier answers.
        let restarted = fetcher(dir.path());
        let third = restarted.fetch(&url).await.expect("third");
        assert_eq!(o.hits(), 1);
        assert_eq!(restarted.requests(), 0);
        assert_eq!(third.samples, first.samples);
        // Exactly one WAV and its metadata, no temporary files left.
        let mut names: Vec<String> = std::fs::read_dir(f.cache_dir())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            names[0].ends_with(".json") && names[1].ends_with(".wav"),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn stale_entries_are_revalidated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, o) = origin(|headers, _| {
            if headers.get(IF_NONE_MATCH) == Some(&HeaderValue::from_static("\"v1\"")) {
                return (StatusCode::NOT_MODIFIED, [(ETAG, "\"v1\"")]).into_response();
            }
            (
                [
                    (CONTENT_TYPE, "audio/wav"),
                    (ETAG, "\"v1\""),
                    (LAST_MODIFIED, "Tue, 01 Apr 2025 10:00:00 GMT"),
                    (CACHE_CONTROL, "no-cache"),
                ],
                tone_wav(),
            )
                .into_response()
        })
        .await;
        let url = format!("{base}/tone.wav");
        let f = fetcher(dir.path());
        let first = f.fetch(&url).await.expect("first");
        let second = f.fetch(&url).await.expect("second");
        assert_eq!(o.hits(), 2);
        let sent = o.last_headers();
        assert_eq!(
            sent.get(IF_NONE_MATCH).map(|v| v.as_bytes()),
            Some(&b"\"v1\""[..])
        );
        assert_eq!(
            sent.get(IF_MODIFIED_SINCE).map(|v| v.as_bytes()),
            Some(&b"Tue, 01 Apr 2025 10:00:00 GMT"[..])
        );
        assert!(Arc::ptr_eq(&first.samples, &second.samples));
        // From disk in a new process: still a conditional request, still no body.
        let restarted = fetcher(dir.path());
        let third = restarted.fetch(&url).await.expect("third");
        assert_eq!(o.hits(), 3);
        assert!(o.last_headers().get(IF_NONE_MATCH).is_some());
        assert_eq!(third.samples, first.samples);
    }

    #[tokio::test]
    async fn changed_resource_replaces_entry_and_outage_serves_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let version = Arc::new(AtomicUsize::new(1));
        let v = version.clone();
        let (base, _) = origin(move |_, _| match v.load(Ordering::SeqCst) {
            1 => ([(ETAG, "\"v1\"")], tone_wav()).into_response(),
            2 => {
                let short = wav(1, 1, 8_000, 16, &sine(8_000, 0.25, 440.0, 0.5), pcm16);
                ([(ETAG, "\"v2\"")], short).into_response()
            }
            3 => (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
            _ => (StatusCode::GONE, "gone").into_response(),
        })
        .await;
        let url = format!("{base}/tone.wav");
        let f = fetcher(dir.path());
        assert!(f.fetch(&url).await.expect("v1").len() > 7_900);
        version.store(2, Ordering::SeqCst);
        assert_eq!(f.fetch(&url).await.expect("v2").len(), 2_000);
        version.store(3, Ordering::SeqCst);
        assert_eq!(f.fetch(&url).await.expect("stale").len(), 2_000);
        version.store(4, Ordering::SeqCst);
        let e = f.fetch(&url).await.expect_err("gone");
        assert!(
            matches!(e, PlayError::HttpStatus { status_code: 410 }),
            "{e:?}"
        );
        // The entry went with the resource.
        assert_eq!(std::fs::read_dir(f.cache_dir()).expect("dir").count(), 0);
    }

    #[tokio::test]
    async fn concurrent_fetches_share_one_download() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, o) = origin_async(|_, _| {
            async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                audio_response("audio/wav", tone_wav())
            }
            .boxed()
        })
        .await;
        let f = Arc::new(fetcher(dir.path()));
        let url = format!("{base}/tone.wav");
        let results = futures::future::join_all((0..8).map(|_| {
            let f = f.clone();
            let url = url.clone();
            async move { f.fetch(&url).await }
        }))
        .await;
        assert_eq!(o.hits(), 1);
        for r in results {
            assert!(r.expect("audio").len() > 7_900);
        }
    }

    #[tokio::test]
    async fn corrupt_disk_entry_is_refetched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, o) =
            origin(|_, _| ([(CACHE_CONTROL, "max-age=3600")], tone_wav()).into_response()).await;
        let url = format!("{base}/tone.wav");
        let f = fetcher(dir.path());
        f.fetch(&url).await.expect("first");
        for entry in std::fs::read_dir(f.cache_dir()).expect("dir").flatten() {
            if entry.path().extension() == Some(OsStr::new("wav")) {
                std::fs::write(entry.path(), b"RIFF garbage").expect("corrupt");
            }
        }
        let restarted = fetcher(dir.path());
        assert!(restarted.fetch(&url).await.expect("refetched").len() > 7_900);
        assert_eq!(o.hits(), 2);
    }

    #[test]
    fn cache_control() {
        let parse = |v: &str, age: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(CACHE_CONTROL, v.parse().expect("value"));
            if let Some(age) = age {
                h.insert(AGE, age.parse().expect("age"));
            }
            let d = CacheDirectives::parse(&h);
            (d.no_store, d.lifetime(&h))
        };
        assert_eq!(parse("max-age=60", None), (false, Some(60)));
        assert_eq!(
            parse("public, max-age=\"60\"", Some("20")),
            (false, Some(40))
        );
        assert_eq!(parse("max-age=60, s-maxage=600", None), (false, Some(600)));
        assert_eq!(parse("max-age=60", Some("100")), (false, Some(0)));
        assert_eq!(parse("no-cache, max-age=60", None), (false, None));
        assert_eq!(parse("No-Store", None), (true, None));
        assert_eq!(parse("private", None), (false, None));
    }

    #[test]
    fn lru_evicts_least_recently_used_by_samples() {
        let entry = |n: usize| {
            Arc::new(Entry {
                audio: Audio::from(vec![0i16; n]),
                meta: Meta {
                    url: String::new(),
                    etag: None,
                    last_modified: None,
                    fetched_at: 0,
                    max_age: None,
                    wav_sha256: String::new(),
                },
            })
        };
        let mut lru = Lru::new(10);
        lru.insert("a".into(), entry(4));
        lru.insert("b".into(), entry(4));
        assert!(lru.get("a").is_some()); // b is now the oldest
        lru.insert("c".into(), entry(4));
        assert!(lru.get("b").is_none());
        assert!(lru.get("a").is_some() && lru.get("c").is_some());
        assert_eq!(lru.used_samples, 8);
        lru.insert("d".into(), entry(11)); // larger than the budget: not kept
        assert!(lru.get("d").is_none());
        assert_eq!(lru.used_samples, 8);
    }
}
