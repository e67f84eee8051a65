//! Server side of SIP digest authentication (RFC 3261 §22, RFC 7616, RFC 8760) for the registrar
//! and for INVITEs from devices.
//!
//! The pieces, all sans-IO (time is always passed in):
//!
//! * [`parse_authorization`] reads an `Authorization` / `Proxy-Authorization` value into
//!   [`DigestCredentials`], keeping the `uri=` text raw because the response hash covers its exact
//!   bytes. It is strict about syntax, bounded ([`MAX_AUTHORIZATION_LEN`]) and never panics, since
//!   it sees attacker input before anything is authenticated.
//! * [`verify`] recomputes the response from the stored HA1 (see [`crate::digest`]) and compares
//!   in constant time.
//! * [`challenges`] writes the `WWW-Authenticate` / `Proxy-Authenticate` values. SHA-256 comes
//!   first: RFC 8760 §2.4 says challenges go most preferred first and a client uses the first one
//!   it supports, so SHA-256-capable devices use it and MD5-only devices still find MD5.
//! * [`NonceKey`] mints and checks **stateless** nonces: issue time and randomness, MACed with
//!   HMAC-SHA256 under a server secret that the caller keeps in the database. No nonce table is
//!   needed, so a nonce survives a restart and is accepted by any engine sharing the secret.
//! * [`NonceCounts`] guards against replays the way Kamailio's `nonce_count` does: per engine, the
//!   highest `nc` seen for each nonce, forgotten once the nonce is past its lifetime (after which
//!   [`NonceKey::check`] calls it stale anyway). A replay sent to a *different* engine within the
//!   lifetime is not caught; that is the price of not sharing state between engines.
//! * [`FailureLimiter`] bans a source, or locks a username, after too many failures in a window,
//!   with bounded memory so spoofed floods cannot exhaust it.
//!
//! Credentials without `qop` (the RFC 2069 form) have no `nc`, so nothing stops their replay
//! within the nonce lifetime. [`verify`] still computes them correctly, but callers should refuse
//! them (`creds.nc == None`) and only challenge with `qop="auth"`, which is all [`challenges`]
//! offers. Every client we care about (baresip, linphone, Zoiper, SIPp, desk phones) sends
//! `qop=auth` when offered.

use crate::digest::{self, Algorithm, ResponseInput};
use hmac::digest::Key;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Longest `Authorization` value we parse. Real ones are 250–400 bytes; refusing more keeps a
/// hostile header cheap.
pub const MAX_AUTHORIZATION_LEN: usize = 4096;

/// Parsed `Authorization` / `Proxy-Authorization` header value (the part after the header name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestCredentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    /// The raw text of `uri=` exactly as sent (verify against it; never re-print a parsed URI).
    pub uri: String,
    pub response: String,
    /// `algorithm=`; absent means MD5 (RFC 3261 §20.7).
    pub algorithm: Algorithm,
    /// `Some((nc_raw_text, cnonce))` when qop=auth; None for the RFC 2069 form.
    pub qop_auth: Option<(String, String)>,
    /// nc parsed from 8 hex digits (None without qop).
    pub nc: Option<u32>,
    pub opaque: Option<String>,
}

/// Why an `Authorization` value was refused. Strings carried here come from the client and are
/// clipped to 64 bytes so they are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthParseError {
    #[error("authorization scheme is not Digest")]
    NotDigest,
    #[error("malformed Digest authorization: {0}")]
    Malformed(&'static str),
    #[error("Digest authorization lacks the {0} parameter")]
    MissingParam(&'static str),
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("unsupported qop {0:?}")]
    UnsupportedQop(String),
    #[error("duplicate Digest parameter {0}")]
    DuplicateParam(String),
}

/// Parse an `Authorization` / `Proxy-Authorization` header value.
///
/// Accepts the RFC 3261 grammar with the usual leniencies: scheme, parameter names and the
/// `algorithm` / `qop` tokens are case-insensitive, and any value may be a token or a
/// quoted-string (clients disagree on quoting `qop` and `algorithm`). Unknown parameters are
/// ignored; a known one given twice is an error, so there is never a question of which one the
/// response was computed over.
pub fn parse_authorization(value: &str) -> Result<DigestCredentials, AuthParseError> {
    parse_params(value)?.finish()
}

/// The parameters of a `Digest` header value (credentials or a challenge).
fn parse_params(value: &str) -> Result<Params, AuthParseError> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(AuthParseError::Malformed("header value too long"));
    }
    let mut c = Cursor { s: value, i: 0 };
    c.skip_lws();
    if !c.token().eq_ignore_ascii_case("digest") {
        return Err(AuthParseError::NotDigest);
    }
    let before = c.i;
    c.skip_lws();
    let mut p = Params::default();
    if !c.at_end() {
        if c.i == before {
            return Err(AuthParseError::Malformed(
                "expected whitespace after Digest",
            ));
        }
        loop {
            let name = c.token();
            if name.is_empty() {
                return Err(AuthParseError::Malformed("expected parameter name"));
            }
            c.skip_lws();
            if c.bump() != Some(b'=') {
                return Err(AuthParseError::Malformed(
                    "expected '=' after parameter name",
                ));
            }
            c.skip_lws();
            let value = if c.peek() == Some(b'"') {
                Cow::Owned(c.quoted()?)
            } else {
                let t = c.token();
                if t.is_empty() {
                    return Err(AuthParseError::Malformed("expected parameter value"));
                }
                Cow::Borrowed(t)
            };
            p.set(name, value)?;
            c.skip_lws();
            match c.bump() {
                None => break,
                Some(b',') => c.skip_lws(),
                Some(_) => {
                    return Err(AuthParseError::Malformed("expected ',' between parameters"));
                }
            }
        }
    }
    Ok(p)
}

/// Our answer to a server's challenge (`WWW-Authenticate` or `Proxy-Authenticate` value), as a
/// UAC that holds the password: an `Authorization` value for `method uri`, with `qop=auth` and
/// nonce count 1 when the challenge offers it.
pub fn answer_challenge(
    challenge: &str,
    method: &str,
    uri: &str,
    username: &str,
    password: &str,
    cnonce: &str,
) -> Result<String, AuthParseError> {
    let p = parse_params(challenge)?;
    let realm = p.realm.ok_or(AuthParseError::MissingParam("realm"))?;
    let nonce = p.nonce.ok_or(AuthParseError::MissingParam("nonce"))?;
    // A quoted-pair can smuggle a control character into a value. We could not echo it as
    // received (`quote` drops them so a header is never split), and a response computed over a
    // value we then send differently never verifies: refuse the challenge instead.
    let echoed = [Some(&realm), Some(&nonce), p.opaque.as_ref()];
    if echoed
        .into_iter()
        .flatten()
        .any(|v| v.chars().any(|c| c.is_control() && c != '\t'))
    {
        return Err(AuthParseError::Malformed("control character in challenge"));
    }
    let algorithm = match p.algorithm.as_deref() {
        None => Algorithm::Md5,
        Some(a) => {
            Algorithm::from_token(a).ok_or_else(|| AuthParseError::UnsupportedAlgorithm(clip(a)))?
        }
    };
    let qop_auth = p
        .qop
        .as_deref()
        .is_some_and(|q| q.split(',').any(|t| t.trim().eq_ignore_ascii_case("auth")));
    let ha1 = crate::digest::ha1(algorithm, username, &realm, password);
    let nc = "00000001";
    let response = crate::digest::expected_response(&crate::digest::ResponseInput {
        algorithm,
        ha1: &ha1,
        method,
        uri,
        nonce: &nonce,
        qop_auth: qop_auth.then_some((nc, cnonce)),
    });
    let mut out = format!(
        "Digest username={}, realm={}, nonce={}, uri={}, response=\"{response}\", algorithm={}",
        quote(username),
        quote(&realm),
        quote(&nonce),
        quote(uri),
        algorithm.token()
    );
    if qop_auth {
        out.push_str(&format!(", qop=auth, nc={nc}, cnonce={}", quote(cnonce)));
    }
    if let Some(opaque) = p.opaque {
        out.push_str(&format!(", opaque={}", quote(&opaque)));
    }
    Ok(out)
}

/// Token characters per RFC 3261 §25.1.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

fn is_wsp(b: Option<&u8>) -> bool {
    matches!(b, Some(b' ' | b'\t'))
}

struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.s.as_bytes()
    }

    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.i).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    /// LWS = [*WSP CRLF] 1*WSP: a CRLF only counts when a space or tab follows (a fold).
    fn skip_lws(&mut self) {
        let b = self.bytes();
        loop {
            if is_wsp(b.get(self.i)) {
                self.i += 1;
            } else if b.get(self.i) == Some(&b'\r')
                && b.get(self.i + 1) == Some(&b'\n')
                && is_wsp(b.get(self.i + 2))
            {
                self.i += 3;
            } else {
                break;
            }
        }
    }

    /// A possibly empty run of token characters.
    fn token(&mut self) -> &'a str {
        let start = self.i;
        while self.peek().is_some_and(is_token_char) {
            self.i += 1;
        }
        // Token characters are ASCII, so both ends are char boundaries; `get` keeps it panic-free.
        self.s.get(start..self.i).unwrap_or("")
    }

    /// A quoted-string starting at the opening quote, unescaped. A fold inside it loses its CRLF
    /// and keeps the whitespace.
    fn quoted(&mut self) -> Result<String, AuthParseError> {
        let b = self.bytes();
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match b.get(self.i).copied() {
                None => return Err(AuthParseError::Malformed("unterminated quoted string")),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => match b.get(self.i + 1).copied() {
                    Some(e) if e.is_ascii() && e != b'\r' && e != b'\n' => {
                        out.push(e);
                        self.i += 2;
                    }
                    _ => return Err(AuthParseError::Malformed("bad escape in quoted string")),
                },
                Some(b'\r') => {
                    if b.get(self.i + 1) == Some(&b'\n') && is_wsp(b.get(self.i + 2)) {
                        self.i += 2;
                    } else {
                        return Err(AuthParseError::Malformed("line break in quoted string"));
                    }
                }
                Some(x) if (x < 0x20 && x != b'\t') || x == 0x7f => {
                    return Err(AuthParseError::Malformed(
                        "control character in quoted string",
                    ));
                }
                Some(x) => {
                    out.push(x);
                    self.i += 1;
                }
            }
        }
        // Only ASCII bytes were dropped from valid UTF-8, so this cannot fail; map it anyway.
        String::from_utf8(out).map_err(|_| AuthParseError::Malformed("invalid UTF-8"))
    }
}

#[derive(Default)]
struct Params {
    username: Option<String>,
    realm: Option<String>,
    nonce: Option<String>,
    uri: Option<String>,
    response: Option<String>,
    algorithm: Option<String>,
    qop: Option<String>,
    nc: Option<String>,
    cnonce: Option<String>,
    opaque: Option<String>,
}

impl Params {
    fn set(&mut self, name: &str, value: Cow<'_, str>) -> Result<(), AuthParseError> {
        let slot = match name.to_ascii_lowercase().as_str() {
            "username" => &mut self.username,
            "realm" => &mut self.realm,
            "nonce" => &mut self.nonce,
            "uri" => &mut self.uri,
            "response" => &mut self.response,
            "algorithm" => &mut self.algorithm,
            "qop" => &mut self.qop,
            "nc" => &mut self.nc,
            "cnonce" => &mut self.cnonce,
            "opaque" => &mut self.opaque,
            _ => return Ok(()),
        };
        if slot.is_some() {
            return Err(AuthParseError::DuplicateParam(clip(
                &name.to_ascii_lowercase(),
            )));
        }
        *slot = Some(value.into_owned());
        Ok(())
    }

    fn finish(self) -> Result<DigestCredentials, AuthParseError> {
        use AuthParseError::{Malformed, MissingParam};
        let username = self.username.ok_or(MissingParam("username"))?;
        let realm = self.realm.ok_or(MissingParam("realm"))?;
        let nonce = self.nonce.ok_or(MissingParam("nonce"))?;
        let uri = self.uri.ok_or(MissingParam("uri"))?;
        let response = self.response.ok_or(MissingParam("response"))?;

        let algorithm = match self.algorithm.as_deref() {
            None => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("MD5") => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("SHA-256") => Algorithm::Sha256,
            Some(a) => return Err(AuthParseError::UnsupportedAlgorithm(clip(a))),
        };

        let (qop_auth, nc) = match self.qop.as_deref() {
            // RFC 2069 form; a stray nc/cnonce without qop takes no part in the hash.
            None => (None, None),
            Some(q) if q.eq_ignore_ascii_case("auth") => {
                let nc_raw = self.nc.ok_or(MissingParam("nc"))?;
                let cnonce = self.cnonce.ok_or(MissingParam("cnonce"))?;
                // Check the digits ourselves: from_str_radix would also take a leading '+'.
                if nc_raw.len() != 8 || !nc_raw.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Malformed("nc must be 8 hex digits"));
                }
                let nc = u32::from_str_radix(&nc_raw, 16)
                    .map_err(|_| Malformed("nc must be 8 hex digits"))?;
                if cnonce.is_empty() {
                    return Err(Malformed("empty cnonce"));
                }
                (Some((nc_raw, cnonce)), Some(nc))
            }
            Some(q) => return Err(AuthParseError::UnsupportedQop(clip(q))),
        };

        let want = match algorithm {
            Algorithm::Md5 => 32,
            Algorithm::Sha256 => 64,
        };
        if response.len() != want || !response.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Malformed(
                "response is not a hex digest of the algorithm's length",
            ));
        }

        Ok(DigestCredentials {
            username,
            realm,
            nonce,
            uri,
            response,
            algorithm,
            qop_auth,
            nc,
            opaque: self.opaque,
        })
    }
}

/// Client text in an error, cut to 64 bytes on a char boundary.
fn clip(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Verify credentials against the stored HA1 for their algorithm (constant time).
///
/// Checks only the response hash: the caller checks the realm, the nonce ([`NonceKey::check`]),
/// the nc ([`NonceCounts::accept`]) and that `uri` matches the request.
pub fn verify(creds: &DigestCredentials, method: &str, ha1: &str) -> bool {
    let expected = digest::expected_response(&ResponseInput {
        algorithm: creds.algorithm,
        ha1,
        method,
        uri: &creds.uri,
        nonce: &creds.nonce,
        qop_auth: creds
            .qop_auth
            .as_ref()
            .map(|(nc, cnonce)| (nc.as_str(), cnonce.as_str())),
    });
    digest::digests_equal(&expected, &creds.response)
}

/// The two challenge header values, SHA-256 first then MD5 (RFC 8760 §2.4: most preferred first),
/// each: `Digest realm="<realm>", nonce="<nonce>", algorithm=SHA-256, qop="auth"` and with
/// `, stale=true` appended when stale.
pub fn challenges(realm: &str, nonce: &str, stale: bool) -> [String; 2] {
    [Algorithm::Sha256, Algorithm::Md5].map(|alg| challenge(alg, realm, nonce, stale))
}

/// One challenge header value for `algorithm`. A server that offers several sends one header
/// each, most preferred first.
pub fn challenge(algorithm: Algorithm, realm: &str, nonce: &str, stale: bool) -> String {
    {
        let alg = algorithm;
        let mut v = format!(
            "Digest realm={}, nonce={}, algorithm={}, qop=\"auth\"",
            quote(realm),
            quote(nonce),
            alg.token()
        );
        if stale {
            v.push_str(", stale=true");
        }
        v
    }
}

/// A quoted-string. `"` and `\` are escaped; control characters are dropped, since a quoted-pair
/// cannot carry CR or LF and letting them through would split the header.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' | '\\' => {
                out.push('\\');
                out.push(ch);
            }
            '\t' => out.push(ch),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// How long a minted nonce is accepted.
pub const NONCE_LIFETIME_SECS: u64 = 300;
/// How far in the future a nonce's issue time may be (clock skew between engines).
const NONCE_FUTURE_SKEW_SECS: u64 = 30;
const NONCE_TAG_LEN: usize = 16;
/// 8-byte time ‖ 12 random bytes ‖ 16-byte tag.
const NONCE_BYTES: usize = 8 + 12 + NONCE_TAG_LEN;

type HmacSha256 = Hmac<Sha256>;

/// Server secret (kept in the database by the caller, so a restart or another engine accepts the nonces).
#[derive(Clone)]
pub struct NonceKey {
    secret: [u8; 32],
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

impl NonceKey {
    pub fn new(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    fn mac(&self, time_and_random: &[u8]) -> HmacSha256 {
        // HMAC zero-pads a short key to the block size, so passing the padded block is the same
        // as HMAC with the 32-byte secret, without `new_from_slice`'s impossible error.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.secret);
        let mut mac = <HmacSha256 as KeyInit>::new(&Key::<HmacSha256>::from(block));
        mac.update(time_and_random);
        mac
    }

    /// `issued_unix` = current unix time in seconds; `random` = fresh random bytes from the caller.
    ///
    /// The nonce is 72 lowercase hex digits: big-endian issue time ‖ random ‖ the first 16 bytes
    /// of HMAC-SHA256(key, time ‖ random). Hex needs no escaping inside a quoted-string.
    pub fn mint(&self, issued_unix: u64, random: [u8; 12]) -> String {
        let mut raw = [0u8; NONCE_BYTES];
        raw[..8].copy_from_slice(&issued_unix.to_be_bytes());
        raw[8..20].copy_from_slice(&random);
        let tag = self.mac(&raw[..20]).finalize().into_bytes();
        raw[20..].copy_from_slice(&tag[..NONCE_TAG_LEN]);
        hex::encode(raw)
    }

    /// Classify a nonce a client sent back. Only lowercase hex is accepted, so each nonce has
    /// exactly one spelling (which [`NonceCounts`] relies on).
    pub fn check(&self, nonce: &str, now_unix: u64) -> NonceState {
        if nonce.len() != NONCE_BYTES * 2
            || !nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return NonceState::Invalid;
        }
        let mut raw = [0u8; NONCE_BYTES];
        if hex::decode_to_slice(nonce, &mut raw).is_err() {
            return NonceState::Invalid;
        }
        if self
            .mac(&raw[..20])
            .verify_truncated_left(&raw[20..])
            .is_err()
        {
            return NonceState::Invalid;
        }
        let mut time = [0u8; 8];
        time.copy_from_slice(&raw[..8]);
        let issued_unix = u64::from_be_bytes(time);
        if issued_unix > now_unix.saturating_add(NONCE_FUTURE_SKEW_SECS) {
            NonceState::Invalid
        } else if now_unix.saturating_sub(issued_unix) > NONCE_LIFETIME_SECS {
            NonceState::Stale
        } else {
            NonceState::Valid { issued_unix }
        }
    }
}

/// What [`NonceKey::check`] made of a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceState {
    /// Ours and within its lifetime.
    Valid { issued_unix: u64 },
    /// Ours but expired: challenge again with `stale=true` so the client retries without asking
    /// the user for a password.
    Stale,
    /// Not ours (bad MAC, wrong key, garbled) or issued implausibly far in the future.
    Invalid,
}

fn nonce_expired(issued_unix: u64, now_unix: u64) -> bool {
    now_unix.saturating_sub(issued_unix) > NONCE_LIFETIME_SECS
}

/// Default cap on nonces tracked by [`NonceCounts`].
pub const MAX_TRACKED_NONCES: usize = 100_000;

/// Highest `nc` seen per nonce; an nc that does not rise is a replay. Entries are forgotten once their nonce is past its lifetime, so memory is bounded by the nonces issued in 300 s.
///
/// Call [`accept`](Self::accept) only after [`verify`] succeeded, so that only clients that know
/// the password create entries. As a further bound the table holds at most
/// [`MAX_TRACKED_NONCES`]; past that the oldest entry is evicted and every unknown nonce issued
/// no later than it is refused from then on (the client is simply challenged again), so eviction
/// never reopens a replay.
#[derive(Debug)]
pub struct NonceCounts {
    highest: HashMap<String, (u64, u32)>,
    by_issue: BTreeSet<(u64, String)>,
    max_tracked: usize,
    /// Unknown nonces issued at or before this were possibly evicted; refuse them.
    evicted_through: Option<u64>,
}

impl Default for NonceCounts {
    fn default() -> Self {
        Self::new()
    }
}

impl NonceCounts {
    pub fn new() -> Self {
        Self::with_max_tracked(MAX_TRACKED_NONCES)
    }

    /// As [`new`](Self::new) with a different cap (at least 1).
    pub fn with_max_tracked(max_tracked: usize) -> Self {
        Self {
            highest: HashMap::new(),
            by_issue: BTreeSet::new(),
            max_tracked: max_tracked.max(1),
            evicted_through: None,
        }
    }

    /// True (and remembered) when `nc` is above every nc seen with this nonce. `issued_unix` comes from NonceState::Valid.
    ///
    /// The first nc of a nonce must be at least 1 (clients start at `00000001`).
    pub fn accept(&mut self, nonce: &str, issued_unix: u64, nc: u32, now_unix: u64) -> bool {
        if nonce_expired(issued_unix, now_unix) || nc == 0 {
            return false;
        }
        if let Some((_, highest)) = self.highest.get_mut(nonce) {
            if nc > *highest {
                *highest = nc;
                return true;
            }
            return false;
        }
        if self.evicted_through.is_some_and(|t| issued_unix <= t) {
            return false;
        }
        if self.highest.len() >= self.max_tracked {
            self.forget_expired(now_unix);
        }
        while self.highest.len() >= self.max_tracked {
            // Evict only an entry strictly older than this nonce; otherwise this one would be the
            // oldest, so refuse it instead (nothing is recorded, so nothing can be replayed).
            match self.by_issue.first() {
                Some((t, _)) if *t < issued_unix => {}
                _ => return false,
            }
            if let Some((t, old)) = self.by_issue.pop_first() {
                self.highest.remove(&old);
                self.evicted_through = Some(self.evicted_through.map_or(t, |e| e.max(t)));
            }
        }
        self.highest.insert(nonce.to_string(), (issued_unix, nc));
        self.by_issue.insert((issued_unix, nonce.to_string()));
        true
    }

    pub fn forget_expired(&mut self, now_unix: u64) {
        while let Some((t, _)) = self.by_issue.first() {
            if !nonce_expired(*t, now_unix) {
                break;
            }
            if let Some((_, nonce)) = self.by_issue.pop_first() {
                self.highest.remove(&nonce);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.highest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.highest.is_empty()
    }
}

/// Thresholds for [`FailureLimiter`], applied separately per source and per username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureLimits {
    /// Failures within `window` that start a ban.
    pub max_failures: u32,
    /// A fixed window, starting at a key's first failure.
    pub window: Duration,
    pub ban: Duration,
}

impl Default for FailureLimits {
    fn default() -> Self {
        Self {
            max_failures: 20,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
        }
    }
}

/// Default cap on keys tracked by a [`FailureLimiter`], per table (sources, usernames).
pub const MAX_TRACKED_KEYS: usize = 100_000;
/// Usernames longer than this are not tracked (no Sautikit username is this long, so there is no
/// account to protect, and it keeps each entry small). Their source is still counted.
pub const MAX_TRACKED_USERNAME_LEN: usize = 128;

/// Which bans a failure started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BansStarted {
    pub source: bool,
    pub username: bool,
}

/// Brute-force limiter: a source that fails too often is banned, and a username that fails too
/// often (from any sources) is locked.
///
/// Sources are keyed by address, except that IPv6 addresses are folded to their /64 (one
/// subscriber usually holds a whole /64, so per-address bans would be trivially dodged) and
/// IPv4-mapped IPv6 addresses count as the IPv4 address.
///
/// A username lock also locks out the real device for the ban time; that is the deliberate trade
/// against a password being guessed from many sources. Callers should pass the username only
/// when it names an existing credential.
#[derive(Debug)]
pub struct FailureLimiter {
    limits: FailureLimits,
    sources: Table<IpAddr>,
    usernames: Table<String>,
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    window_start: Instant,
    failures: u32,
    ban: Ban,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ban {
    None,
    Until(Instant),
    /// `now + ban` overflowed `Instant`.
    Forever,
}

impl Counter {
    fn banned(&self, now: Instant) -> bool {
        match self.ban {
            Ban::None => false,
            Ban::Until(end) => now < end,
            Ban::Forever => true,
        }
    }

    fn window_over(&self, now: Instant, limits: &FailureLimits) -> bool {
        self.window_start
            .checked_add(limits.window)
            .is_some_and(|end| now >= end)
    }

    /// Nothing here that must be remembered.
    fn idle(&self, now: Instant, limits: &FailureLimits) -> bool {
        !self.banned(now) && (self.failures == 0 || self.window_over(now, limits))
    }

    /// Count a failure; true when it started a ban.
    fn fail(&mut self, now: Instant, limits: &FailureLimits) -> bool {
        if self.banned(now) {
            return false;
        }
        if self.ban != Ban::None || self.window_over(now, limits) {
            *self = Counter::fresh(now);
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures >= limits.max_failures {
            self.ban = now.checked_add(limits.ban).map_or(Ban::Forever, Ban::Until);
            self.failures = 0;
            self.window_start = now;
            return true;
        }
        false
    }

    fn fresh(now: Instant) -> Self {
        Counter {
            window_start: now,
            failures: 0,
            ban: Ban::None,
        }
    }

    /// Eviction order: plain windows oldest first, then bans ending soonest.
    fn eviction_rank(&self) -> (u8, Instant) {
        match self.ban {
            Ban::None => (0, self.window_start),
            Ban::Until(end) => (1, end),
            Ban::Forever => (2, self.window_start),
        }
    }
}

#[derive(Debug)]
struct Table<K> {
    entries: HashMap<K, Counter>,
    max: usize,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max: max.max(1),
        }
    }

    fn banned<Q>(&self, key: &Q, now: Instant) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).is_some_and(|c| c.banned(now))
    }

    fn fail<Q>(&mut self, key: &Q, now: Instant, limits: &FailureLimits) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(c) = self.entries.get_mut(key) {
            return c.fail(now, limits);
        }
        if self.entries.len() >= self.max {
            self.prune(now, limits);
        }
        if self.entries.len() >= self.max {
            self.evict_batch();
        }
        let mut c = Counter::fresh(now);
        let started = c.fail(now, limits);
        self.entries.insert(key.to_owned(), c);
        started
    }

    /// Drop the lowest-ranked tenth of the table at once, so a flood pays O(n) once per n/10
    /// new keys rather than on every one.
    fn evict_batch(&mut self) {
        let n = (self.max / 10).max(1).min(self.entries.len());
        let mut ranked: Vec<((u8, Instant), K)> = self
            .entries
            .iter()
            .map(|(k, c)| (c.eviction_rank(), k.clone()))
            .collect();
        if n < ranked.len() {
            ranked.select_nth_unstable_by_key(n, |(rank, _)| *rank);
        }
        for (_, k) in ranked.iter().take(n) {
            self.entries.remove(k);
        }
    }

    fn prune(&mut self, now: Instant, limits: &FailureLimits) {
        self.entries.retain(|_, c| !c.idle(now, limits));
    }
}

/// IPv6 folded to its /64, IPv4-mapped IPv6 to IPv4.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl FailureLimiter {
    pub fn new(limits: FailureLimits) -> Self {
        Self::with_max_tracked(limits, MAX_TRACKED_KEYS)
    }

    /// As [`new`](Self::new) with a different cap on tracked sources and usernames (each).
    pub fn with_max_tracked(limits: FailureLimits, max_tracked: usize) -> Self {
        Self {
            limits,
            sources: Table::new(max_tracked),
            usernames: Table::new(max_tracked),
        }
    }

    /// Is this source banned now?
    pub fn source_banned(&self, ip: IpAddr, now: Instant) -> bool {
        self.sources.banned(&source_key(ip), now)
    }

    /// Is this username locked now (too many failures for it from any sources)?
    pub fn username_locked(&self, username: &str, now: Instant) -> bool {
        self.usernames.banned(username, now)
    }

    /// Count a failed attempt. Returns which bans this failure started (for logging/metrics).
    ///
    /// Failures while a key is already banned do not extend its ban.
    pub fn record_failure(
        &mut self,
        ip: IpAddr,
        username: Option<&str>,
        now: Instant,
    ) -> BansStarted {
        let source = self.sources.fail(&source_key(ip), now, &self.limits);
        let username = match username {
            Some(u) if u.len() <= MAX_TRACKED_USERNAME_LEN => {
                self.usernames.fail(u, now, &self.limits)
            }
            _ => false,
        };
        BansStarted { source, username }
    }

    /// Drop windows and bans that are over (call periodically); keeps memory bounded.
    pub fn prune(&mut self, now: Instant) {
        self.sources.prune(now, &self.limits);
        self.usernames.prune(now, &self.limits);
    }

    pub fn banned_sources(&self, now: Instant) -> usize {
        self.sources
            .entries
            .values()
            .filter(|c| c.banned(now))
            .count()
    }

    /// Sources plus usernames currently tracked (for metrics and tests).
    pub fn tracked(&self) -> usize {
        self.sources.entries.len() + self.usernames.entries.len()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn our_answer_to_a_challenge_verifies() {
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            let challenge = super::challenge(alg, "carrier.example", "abc123", false);
            let value = super::answer_challenge(
                &format!("{challenge}, opaque=\"xyz\""),
                "INVITE",
                "sip:+254711000001@carrier.example",
                "trunkuser",
                "trunkpass",
                "c0ffee",
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let creds = parse_authorization(&value).unwrap_or_else(|e| panic!("{e}: {value}"));
            assert_eq!(creds.opaque.as_deref(), Some("xyz"));
            let ha1 = crate::digest::ha1(alg, "trunkuser", "carrier.example", "trunkpass");
            assert!(verify(&creds, "INVITE", &ha1), "{value}");
            assert!(!verify(&creds, "BYE", &ha1));
        }
        // Without qop: the RFC 2069 form.
        let value = super::answer_challenge(
            "Digest realm=\"r\", nonce=\"n\"",
            "INVITE",
            "sip:a@b",
            "u",
            "p",
            "c",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!value.contains("qop"), "{value}");
        assert!(
            super::answer_challenge("Digest nonce=\"n\"", "INVITE", "sip:a@b", "u", "p", "c")
                .is_err()
        );
    }

    /// Found by the `digest` fuzz target: a nonce holding an escaped control character was
    /// answered with the character dropped, so the response never verified. Escaped quotes and
    /// backslashes go back as sent.
    #[test]
    fn a_challenge_value_we_cannot_echo_is_refused() {
        let refused = super::answer_challenge(
            "Digest realm=\"r\", nonce=\"ab\\\u{1c}cd\"",
            "INVITE",
            "sip:a@b",
            "u",
            "p",
            "c",
        );
        assert!(refused.is_err(), "{refused:?}");
        let value = super::answer_challenge(
            r#"Digest realm="r\"q", nonce="a\\b\"c", qop="auth""#,
            "INVITE",
            "sip:a@b",
            "u",
            "p",
            "c",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let creds = parse_authorization(&value).unwrap_or_else(|e| panic!("{e}: {value}"));
        assert_eq!(creds.nonce, r#"a\b"c"#);
        assert_eq!(creds.realm, r#"r"q"#);
        let ha1 = crate::digest::ha1(Algorithm::Md5, "u", r#"r"q"#, "p");
        assert!(verify(&creds, "INVITE", &ha1), "{value}");
    }

    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const MD5_RESP: &str = "0123456789abcdef0123456789abcdef";

    fn md5_header(extra: &str) -> String {
        format!(
            r#"Digest username="ts_1a2b3c4d",realm="r",nonce="n",uri="sip:127.0.0.1:5060",response="{MD5_RESP}"{extra}"#
        )
    }

    #[test]
    fn auth_parses_sipp_style() {
        let h = format!(
            r#"Digest username="ts_1a2b3c4d",realm="0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",nonce="abc123",uri="sip:127.0.0.1:5060",response="{MD5_RESP}",algorithm=MD5,cnonce="abc",qop=auth,nc=00000001"#
        );
        let c = parse_authorization(&h).unwrap();
        assert_eq!(c.username, "ts_1a2b3c4d");
        assert_eq!(c.realm, "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(c.nonce, "abc123");
        assert_eq!(c.uri, "sip:127.0.0.1:5060");
        assert_eq!(c.response, MD5_RESP);
        assert_eq!(c.algorithm, Algorithm::Md5);
        assert_eq!(c.qop_auth, Some(("00000001".into(), "abc".into())));
        assert_eq!(c.nc, Some(1));
        assert_eq!(c.opaque, None);
    }

    #[test]
    fn auth_parses_baresip_style() {
        // baresip: spaces after commas, no algorithm (defaults to MD5).
        let h = format!(
            r#"Digest username="alice", realm="sip.example.com", nonce="5f1c", uri="sip:sip.example.com;transport=tcp", response="{MD5_RESP}", cnonce="7b8d2a1e", qop=auth, nc=0000000a"#
        );
        let c = parse_authorization(&h).unwrap();
        assert_eq!(c.uri, "sip:sip.example.com;transport=tcp");
        assert_eq!(c.algorithm, Algorithm::Md5);
        assert_eq!(c.nc, Some(10));
        assert_eq!(c.qop_auth, Some(("0000000a".into(), "7b8d2a1e".into())));
    }

    #[test]
    fn auth_parses_linphone_style_sha256() {
        // linphone: realm first, opaque, quoted-free algorithm, SHA-256.
        let resp = "a".repeat(64);
        let h = format!(
            r#"Digest realm="sip.example.com", nonce="Kx9", algorithm=SHA-256, opaque="+GNywA==", username="bob",  uri="sip:sip.example.com", response="{resp}", cnonce="XyZ", nc=0000FFFF, qop=auth"#
        );
        let c = parse_authorization(&h).unwrap();
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert_eq!(c.opaque.as_deref(), Some("+GNywA=="));
        assert_eq!(c.nc, Some(0xffff));
        assert_eq!(c.qop_auth.unwrap().0, "0000FFFF");
    }

    #[test]
    fn auth_case_insensitive_names_scheme_and_tokens() {
        let h = format!(
            r#"dIgEsT USERNAME="u",Realm="r",NONCE="n",Uri="sip:x",Response="{MD5_RESP}",Algorithm=md5,QOP="Auth",NC=00000002,CNonce="c""#
        );
        let c = parse_authorization(&h).unwrap();
        assert_eq!(c.algorithm, Algorithm::Md5);
        assert_eq!(c.nc, Some(2));
        let resp = "B".repeat(64);
        let h = format!(
            r#"Digest username="u",realm="r",nonce="n",uri="sip:x",response="{resp}",algorithm="sha-256""#
        );
        assert_eq!(
            parse_authorization(&h).unwrap().algorithm,
            Algorithm::Sha256
        );
    }

    #[test]
    fn auth_quoted_commas_escapes_and_unknown_params() {
        let h = format!(
            r#"Digest username="a,b\"c\\d", realm="x, y", nonce="n", uri="sip:u@h;a=\"q\"", response="{MD5_RESP}", foo=bar, baz="q,\"z", qop=auth, nc=00000001, cnonce="c""#
        );
        let c = parse_authorization(&h).unwrap();
        assert_eq!(c.username, r#"a,b"c\d"#);
        assert_eq!(c.realm, "x, y");
        assert_eq!(c.uri, r#"sip:u@h;a="q""#);
        let h = format!(
            r#"Digest username="ü😀", realm="", nonce="n", uri="sip:x", response="{MD5_RESP}""#
        );
        let c = parse_authorization(&h).unwrap();
        assert_eq!(c.username, "ü😀");
        assert_eq!(c.realm, "");
    }

    #[test]
    fn auth_folded_whitespace() {
        let h = format!(
            "  Digest\r\n username=\"u\" ,\r\n\trealm = \"r\",nonce=\"n\",\r\n  uri=\"sip:x\",response=\"{MD5_RESP}\"\t"
        );
        let c = parse_authorization(&h).unwrap();
        assert_eq!(c.username, "u");
        assert_eq!(c.realm, "r");
        // A fold inside a quoted string keeps its whitespace and loses the CRLF.
        let h = format!(
            "Digest username=\"a\r\n b\",realm=\"r\",nonce=\"n\",uri=\"sip:x\",response=\"{MD5_RESP}\""
        );
        assert_eq!(parse_authorization(&h).unwrap().username, "a b");
        // A CRLF without following whitespace is not a fold.
        let h = format!(
            "Digest username=\"u\",\r\nrealm=\"r\",nonce=\"n\",uri=\"sip:x\",response=\"{MD5_RESP}\""
        );
        assert!(matches!(
            parse_authorization(&h),
            Err(AuthParseError::Malformed(_))
        ));
    }

    #[test]
    fn auth_rfc2069_form_has_no_nc() {
        let c = parse_authorization(&md5_header("")).unwrap();
        assert_eq!(c.qop_auth, None);
        assert_eq!(c.nc, None);
        // nc/cnonce without qop take no part.
        let c = parse_authorization(&md5_header(",nc=00000001,cnonce=\"c\"")).unwrap();
        assert_eq!(c.nc, None);
    }

    #[test]
    fn auth_errors() {
        use AuthParseError::*;
        let e = |h: &str| parse_authorization(h).unwrap_err();
        assert_eq!(e("Basic dXNlcjpwYXNz"), NotDigest);
        assert_eq!(e(""), NotDigest);
        assert_eq!(e("Digestusername=\"u\""), NotDigest);
        assert_eq!(e("Digest"), MissingParam("username"));
        assert!(matches!(e("Digest,username=\"u\""), Malformed(_)));
        assert!(matches!(e("Digest username"), Malformed(_)));
        assert!(matches!(e("Digest username=\"u"), Malformed(_)));
        assert!(matches!(
            e("Digest username=\"u\" realm=\"r\""),
            Malformed(_)
        ));
        assert!(matches!(
            e("Digest username=\"u\",,realm=\"r\""),
            Malformed(_)
        ));
        assert!(matches!(e("Digest username=\"u\","), Malformed(_)));
        assert!(matches!(e("Digest username="), Malformed(_)));
        assert!(matches!(e("Digest username=sip:x"), Malformed(_)));
        assert!(matches!(e("Digest username=\"a\nb\""), Malformed(_)));
        assert!(matches!(e("Digest username=\"a\\\rb\""), Malformed(_)));
        assert!(matches!(e("Digest username=\"a\u{1}b\""), Malformed(_)));
        assert!(matches!(e(&md5_header(&"x".repeat(5000))), Malformed(_)));

        assert_eq!(
            e(&format!(
                r#"Digest username="u",nonce="n",uri="sip:x",response="{MD5_RESP}""#
            )),
            MissingParam("realm")
        );
        assert_eq!(
            e(&format!(
                r#"Digest username="u",realm="r",uri="sip:x",response="{MD5_RESP}""#
            )),
            MissingParam("nonce")
        );
        assert_eq!(
            e(&format!(
                r#"Digest username="u",realm="r",nonce="n",response="{MD5_RESP}""#
            )),
            MissingParam("uri")
        );
        assert_eq!(
            e(r#"Digest username="u",realm="r",nonce="n",uri="sip:x""#),
            MissingParam("response")
        );
        assert_eq!(e(&md5_header(",qop=auth,cnonce=\"c\"")), MissingParam("nc"));
        assert_eq!(
            e(&md5_header(",qop=auth,nc=00000001")),
            MissingParam("cnonce")
        );

        assert_eq!(
            e(&md5_header(",algorithm=MD5-sess")),
            UnsupportedAlgorithm("MD5-sess".into())
        );
        assert_eq!(
            e(&md5_header(",algorithm=SHA-256-sess")),
            UnsupportedAlgorithm("SHA-256-sess".into())
        );
        assert_eq!(
            e(&md5_header(",algorithm=SHA-512-256")),
            UnsupportedAlgorithm("SHA-512-256".into())
        );
        assert_eq!(
            e(&md5_header(",qop=auth-int,nc=00000001,cnonce=\"c\"")),
            UnsupportedQop("auth-int".into())
        );
        assert_eq!(
            e(&md5_header(",qop=\"auth,auth-int\"")),
            UnsupportedQop("auth,auth-int".into())
        );
        assert_eq!(
            e(&md5_header(",Realm=\"again\"")),
            DuplicateParam("realm".into())
        );
        assert_eq!(e(&md5_header(",nc=1,NC=2")), DuplicateParam("nc".into()));

        for nc in ["0000001", "000000001", "+0000001", "0000000g", "-0000001"] {
            assert!(
                matches!(
                    e(&md5_header(&format!(",qop=auth,cnonce=\"c\",nc={nc}"))),
                    Malformed(_)
                ),
                "{nc}"
            );
        }
        assert!(matches!(
            e(&md5_header(",qop=auth,cnonce=\"\",nc=00000001")),
            Malformed(_)
        ));
        // Response length must match the algorithm.
        assert!(matches!(e(&md5_header(",algorithm=SHA-256")), Malformed(_)));
        assert!(matches!(
            e(
                r#"Digest username="u",realm="r",nonce="n",uri="sip:x",response="0123456789abcdef0123456789abcdeg""#
            ),
            Malformed(_)
        ));
        let long = "a".repeat(64);
        assert!(matches!(
            e(&format!(
                r#"Digest username="u",realm="r",nonce="n",uri="sip:x",response="{long}""#
            )),
            Malformed(_)
        ));
    }

    #[test]
    fn auth_error_text_is_clipped() {
        let alg = "X".repeat(1000);
        match parse_authorization(&md5_header(&format!(",algorithm={alg}"))) {
            Err(AuthParseError::UnsupportedAlgorithm(s)) => assert_eq!(s.len(), 64),
            other => panic!("{other:?}"),
        }
    }

    fn signed_header(alg: Algorithm, ha1: &str, uri: &str, nonce: &str) -> String {
        let resp = digest::expected_response(&ResponseInput {
            algorithm: alg,
            ha1,
            method: "REGISTER",
            uri,
            nonce,
            qop_auth: Some(("00000001", "0a4f113b")),
        });
        format!(
            r#"Digest username="ts_1a2b3c4d", realm="sautikit", nonce="{nonce}", uri="{uri}", response="{resp}", algorithm={}, cnonce="0a4f113b", qop=auth, nc=00000001"#,
            alg.token()
        )
    }

    #[test]
    fn auth_verify() {
        for alg in Algorithm::ALL {
            let ha1 = digest::ha1(alg, "ts_1a2b3c4d", "sautikit", "secret");
            let h = signed_header(alg, &ha1, "sip:127.0.0.1:5060", "n0nce");
            let c = parse_authorization(&h).unwrap();
            assert!(verify(&c, "REGISTER", &ha1));
            assert!(!verify(&c, "INVITE", &ha1));
            let other = digest::ha1(alg, "ts_1a2b3c4d", "sautikit", "wrong");
            assert!(!verify(&c, "REGISTER", &other));

            let mut bad = c.clone();
            bad.uri = "sip:127.0.0.1".into();
            assert!(!verify(&bad, "REGISTER", &ha1));
            let mut bad = c.clone();
            let first = if bad.response.starts_with('0') {
                "1"
            } else {
                "0"
            };
            bad.response.replace_range(..1, first);
            assert!(!verify(&bad, "REGISTER", &ha1));
            let mut bad = c.clone();
            bad.qop_auth = Some(("00000002".into(), "0a4f113b".into()));
            assert!(!verify(&bad, "REGISTER", &ha1));
        }
    }

    #[test]
    fn auth_verify_rfc2069_form() {
        let ha1 = digest::ha1(Algorithm::Md5, "u", "r", "p");
        let resp = digest::expected_response(&ResponseInput {
            algorithm: Algorithm::Md5,
            ha1: &ha1,
            method: "REGISTER",
            uri: "sip:r",
            nonce: "n",
            qop_auth: None,
        });
        let h = format!(r#"Digest username="u",realm="r",nonce="n",uri="sip:r",response="{resp}""#);
        let c = parse_authorization(&h).unwrap();
        assert!(verify(&c, "REGISTER", &ha1));
        assert_eq!(c.nc, None);
    }

    #[test]
    fn auth_challenges() {
        let [a, b] = challenges("sautikit", "abc", false);
        assert_eq!(
            a,
            r#"Digest realm="sautikit", nonce="abc", algorithm=SHA-256, qop="auth""#
        );
        assert_eq!(
            b,
            r#"Digest realm="sautikit", nonce="abc", algorithm=MD5, qop="auth""#
        );
        let [a, b] = challenges("sautikit", "abc", true);
        assert!(a.ends_with(r#"qop="auth", stale=true"#));
        assert!(b.ends_with(r#"qop="auth", stale=true"#));
        let [a, _] = challenges("a\"b\\c\r\nX: y", "n", false);
        assert!(a.starts_with(r#"Digest realm="a\"b\\cX: y", "#), "{a}");
    }

    #[test]
    fn auth_challenge_parses_back_as_params() {
        // The realm we escape is read back verbatim by our own quoted-string reader.
        let [a, _] = challenges("we\"ird\\realm", "n", false);
        let reply = a.replacen(
            "Digest ",
            &format!(
                r#"Digest username="u", uri="sip:x", response="{}", "#,
                "c".repeat(64)
            ),
            1,
        );
        let reply = reply.replace(r#"qop="auth""#, r#"qop="auth", nc=00000001, cnonce="z""#);
        let c = parse_authorization(&reply).unwrap();
        assert_eq!(c.realm, "we\"ird\\realm");
        assert_eq!(c.algorithm, Algorithm::Sha256);
    }

    const T0: u64 = 1_750_000_000;

    #[test]
    fn auth_nonce_mint_and_check() {
        let key = NonceKey::new([7; 32]);
        let n = key.mint(T0, [1; 12]);
        assert_eq!(n.len(), 72);
        assert!(
            n.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(key.check(&n, T0), NonceState::Valid { issued_unix: T0 });
        assert_eq!(
            key.check(&n, T0 + 300),
            NonceState::Valid { issued_unix: T0 }
        );
        assert_eq!(key.check(&n, T0 + 301), NonceState::Stale);
        assert_eq!(key.check(&n, T0 + 100_000), NonceState::Stale);
        // Up to 30 s of skew from another engine's clock.
        assert_eq!(
            key.check(&n, T0 - 30),
            NonceState::Valid { issued_unix: T0 }
        );
        assert_eq!(key.check(&n, T0 - 31), NonceState::Invalid);
        // Different randomness, different nonce.
        assert_ne!(n, key.mint(T0, [2; 12]));
        // Same secret on another engine.
        assert_eq!(
            NonceKey::new([7; 32]).check(&n, T0 + 1),
            NonceState::Valid { issued_unix: T0 }
        );
        assert_eq!(NonceKey::new([8; 32]).check(&n, T0), NonceState::Invalid);
    }

    #[test]
    fn auth_nonce_any_flipped_character_is_invalid() {
        let key = NonceKey::new([42; 32]);
        let n = key.mint(T0, [9; 12]);
        for i in 0..n.len() {
            for repl in ["0", "f", "F", "g", "\""] {
                let mut m = n.clone();
                if &m[i..=i] == repl {
                    continue;
                }
                m.replace_range(i..=i, repl);
                assert_eq!(key.check(&m, T0), NonceState::Invalid, "{i} {repl}");
            }
        }
        for bad in ["", "abc", &n[..71], &format!("{n}0"), &n.to_uppercase()] {
            assert_eq!(key.check(bad, T0), NonceState::Invalid, "{bad}");
        }
        assert_eq!(format!("{key:?}"), "NonceKey(..)");
    }

    #[test]
    fn auth_nonce_counts_rise_and_replay() {
        let mut nc = NonceCounts::new();
        assert!(nc.is_empty());
        assert!(!nc.accept("a", T0, 0, T0), "nc starts at 1");
        assert!(nc.accept("a", T0, 1, T0));
        assert!(!nc.accept("a", T0, 1, T0 + 1), "replay");
        assert!(nc.accept("a", T0, 2, T0 + 1));
        assert!(nc.accept("a", T0, 5, T0 + 1), "gaps are fine");
        assert!(!nc.accept("a", T0, 5, T0 + 1), "equal");
        assert!(!nc.accept("a", T0, 3, T0 + 1), "lower");
        assert!(nc.accept("b", T0, 1, T0 + 1), "independent per nonce");
        assert_eq!(nc.len(), 2);
    }

    #[test]
    fn auth_nonce_counts_expiry() {
        let mut nc = NonceCounts::new();
        assert!(nc.accept("old", T0, 1, T0));
        assert!(nc.accept("new", T0 + 200, 1, T0 + 200));
        nc.forget_expired(T0 + 300);
        assert_eq!(nc.len(), 2, "still within the lifetime");
        nc.forget_expired(T0 + 301);
        assert_eq!(nc.len(), 1);
        assert!(!nc.accept("old", T0, 2, T0 + 301), "expired nonce refused");
        assert!(!nc.accept("late", T0, 1, T0 + 301));
        nc.forget_expired(T0 + 501);
        assert!(nc.is_empty());
    }

    #[test]
    fn auth_nonce_counts_cap_never_reopens_replay() {
        let mut nc = NonceCounts::with_max_tracked(3);
        assert!(nc.accept("a", T0, 1, T0));
        assert!(nc.accept("b", T0 + 1, 1, T0 + 1));
        assert!(nc.accept("c", T0 + 2, 1, T0 + 2));
        // Full: a nonce no newer than the oldest is refused rather than evicting.
        assert!(!nc.accept("z", T0, 1, T0 + 3));
        assert_eq!(nc.len(), 3);
        // A newer one evicts "a"; replaying "a" is then refused, not accepted as new.
        assert!(nc.accept("d", T0 + 3, 1, T0 + 3));
        assert_eq!(nc.len(), 3);
        assert!(!nc.accept("a", T0, 1, T0 + 3));
        assert!(!nc.accept("a", T0, 2, T0 + 3));
        assert!(nc.accept("c", T0 + 2, 2, T0 + 3));
        // Expired entries make room before anything is evicted.
        assert!(nc.accept("e", T0 + 302, 1, T0 + 302));
        assert_eq!(nc.len(), 3);
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn at(base: Instant, secs: u64) -> Instant {
        base + Duration::from_secs(secs)
    }

    #[test]
    fn auth_limiter_bans_on_twentieth_failure_for_300s() {
        let base = Instant::now();
        let mut l = FailureLimiter::new(FailureLimits::default());
        for i in 0..19 {
            let b = l.record_failure(ip(1), None, at(base, i));
            assert_eq!(b, BansStarted::default());
        }
        assert!(!l.source_banned(ip(1), at(base, 19)));
        let b = l.record_failure(ip(1), None, at(base, 19));
        assert_eq!(
            b,
            BansStarted {
                source: true,
                username: false
            }
        );
        assert!(l.source_banned(ip(1), at(base, 19)));
        assert!(!l.source_banned(ip(2), at(base, 19)));
        assert_eq!(l.banned_sources(at(base, 19)), 1);
        // Failures during the ban do not extend it.
        assert_eq!(
            l.record_failure(ip(1), None, at(base, 200)),
            BansStarted::default()
        );
        let end = at(base, 19 + 300);
        assert!(l.source_banned(ip(1), end - Duration::from_millis(1)));
        assert!(!l.source_banned(ip(1), end));
        assert_eq!(l.banned_sources(end), 0);
        // After the ban the count starts over.
        for i in 0..19 {
            l.record_failure(ip(1), None, end + Duration::from_secs(i));
        }
        assert!(!l.source_banned(ip(1), end + Duration::from_secs(19)));
    }

    #[test]
    fn auth_limiter_window_resets_after_60s() {
        let base = Instant::now();
        let mut l = FailureLimiter::new(FailureLimits::default());
        for _ in 0..19 {
            l.record_failure(ip(1), None, base);
        }
        let b = l.record_failure(ip(1), None, at(base, 60));
        assert!(!b.source);
        assert!(!l.source_banned(ip(1), at(base, 60)));
        // The new window started at 60 s with one failure: 19 more ban.
        for i in 0..18 {
            assert!(!l.record_failure(ip(1), None, at(base, 61 + i)).source);
        }
        assert!(l.record_failure(ip(1), None, at(base, 119)).source);
        assert!(l.source_banned(ip(1), at(base, 119)));
    }

    #[test]
    fn auth_limiter_username_lock_across_sources() {
        let base = Instant::now();
        let mut l = FailureLimiter::new(FailureLimits::default());
        for i in 0..19 {
            let b = l.record_failure(ip(i), Some("ts_1a2b3c4d"), at(base, 1));
            assert_eq!(b, BansStarted::default());
        }
        assert!(!l.username_locked("ts_1a2b3c4d", at(base, 1)));
        let b = l.record_failure(ip(99), Some("ts_1a2b3c4d"), at(base, 2));
        assert_eq!(
            b,
            BansStarted {
                source: false,
                username: true
            }
        );
        assert!(l.username_locked("ts_1a2b3c4d", at(base, 2)));
        assert!(!l.username_locked("ts_other", at(base, 2)));
        assert_eq!(l.banned_sources(at(base, 2)), 0);
        assert!(!l.username_locked("ts_1a2b3c4d", at(base, 302)));
        // Absurdly long usernames are not tracked at all.
        let long = "x".repeat(MAX_TRACKED_USERNAME_LEN + 1);
        for _ in 0..25 {
            l.record_failure(ip(500), Some(&long), base);
        }
        assert!(!l.username_locked(&long, base));
    }

    #[test]
    fn auth_limiter_ipv6_folds_to_64_and_mapped_v4() {
        let base = Instant::now();
        let mut l = FailureLimiter::new(FailureLimits::default());
        for i in 0..20u16 {
            let a = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, i, i, i);
            l.record_failure(IpAddr::V6(a), None, base);
        }
        let same64 = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 9, 9, 9, 9);
        let other64 = Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1);
        assert!(l.source_banned(IpAddr::V6(same64), base));
        assert!(!l.source_banned(IpAddr::V6(other64), base));

        for _ in 0..20 {
            l.record_failure(ip(7), None, base);
        }
        let mapped = Ipv4Addr::from(0x0a00_0007).to_ipv6_mapped();
        assert!(l.source_banned(IpAddr::V6(mapped), base));
    }

    #[test]
    fn auth_limiter_prune_and_cap_bound_memory() {
        let base = Instant::now();
        let mut l = FailureLimiter::new(FailureLimits::default());
        for i in 0..1000 {
            l.record_failure(ip(i), Some(&format!("u{i}")), base);
        }
        for _ in 0..20 {
            l.record_failure(ip(5000), None, base);
        }
        assert_eq!(l.tracked(), 2001);
        l.prune(at(base, 59));
        assert_eq!(l.tracked(), 2001, "windows still open");
        l.prune(at(base, 60));
        assert_eq!(l.tracked(), 1, "only the ban is left");
        assert!(l.source_banned(ip(5000), at(base, 60)));
        l.prune(at(base, 300));
        assert_eq!(l.tracked(), 0);

        // A flood of spoofed sources stays within the cap and does not evict a live ban.
        let mut l = FailureLimiter::with_max_tracked(FailureLimits::default(), 100);
        for _ in 0..20 {
            l.record_failure(ip(1_000_000), None, base);
        }
        for i in 0..10_000 {
            l.record_failure(ip(i), None, base + Duration::from_millis(u64::from(i)));
            assert!(l.tracked() <= 100);
        }
        assert!(l.source_banned(ip(1_000_000), at(base, 10)));
    }

    #[test]
    fn auth_limiter_survives_huge_durations() {
        let base = Instant::now();
        let limits = FailureLimits {
            max_failures: 1,
            window: Duration::MAX,
            ban: Duration::MAX,
        };
        let mut l = FailureLimiter::new(limits);
        assert!(l.record_failure(ip(1), Some("u"), base).source);
        assert!(l.source_banned(ip(1), at(base, 1_000_000)));
        l.prune(at(base, 1_000_000));
        assert_eq!(l.tracked(), 2);
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn auth_parse_never_panics(s in ".{0,600}") {
                let _ = parse_authorization(&s);
            }

            #[test]
            fn auth_parse_never_panics_on_digest_like(
                parts in proptest::collection::vec(
                    prop_oneof![
                        Just("Digest ".to_string()),
                        Just("username".to_string()),
                        Just("nc".to_string()),
                        Just("qop".to_string()),
                        Just("algorithm".to_string()),
                        Just("response".to_string()),
                        Just("=".to_string()),
                        Just(",".to_string()),
                        Just("\"".to_string()),
                        Just("\\".to_string()),
                        Just("\r\n ".to_string()),
                        Just("\r".to_string()),
                        Just(" ".to_string()),
                        "[ -~]{0,8}",
                        "[0-9a-f]{8}",
                        "\\PC{0,4}",
                    ],
                    0..40,
                )
            ) {
                let s: String = parts.concat();
                let _ = parse_authorization(&s);
                let _ = parse_authorization(&format!("Digest {s}"));
            }

            #[test]
            fn auth_nonce_round_trips_and_check_never_panics(
                s in ".{0,100}",
                t in any::<u64>(),
                r in any::<[u8; 12]>(),
            ) {
                let key = NonceKey::new([1; 32]);
                let _ = key.check(&s, t);
                prop_assert_eq!(key.check(&key.mint(t, r), t), NonceState::Valid { issued_unix: t });
            }
        }
    }
}
