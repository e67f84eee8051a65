//! Registrar: REGISTER (RFC 3261 §10) from softphones, with digest authentication (RFC 7616,
//! RFC 8760), bindings kept in the database, OPTIONS keepalives to the UDP devices whose flow
//! this engine holds, and the removal of expired bindings (DESIGN §8).
//!
//! The rules are sans-IO in `sautikit_sip::{auth, registrar}`; this actor drives them. It holds
//! only what must not wait for the database (nonce counts, the failure limiter); database work
//! runs in tasks that answer the device themselves, so a slow disk never holds up other devices.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use sautikit_sip::auth::{
    self, DigestCredentials, FailureLimiter, FailureLimits, NonceCounts, NonceKey, NonceState,
};
use sautikit_sip::digest::Algorithm;
use sautikit_sip::message::{self as sipmsg, response_to};
use sautikit_sip::registrar::{self, BindingLimits, RegisterError, RegisterRequest};
use sautikit_sip::rsip::{self, prelude::*};
use sautikit_sip::transaction::{Peer, Transport, TxKey};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::model::NumberStatus;
use crate::sip_endpoint::SipMsg;
use crate::store::StorageError;

/// How often expired bindings are removed and the limiter's old windows dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// REGISTERs waiting on the database past which new ones are answered `503` with `Retry-After`,
/// as new INVITEs are when calls pile up. A healthy engine has a few dozen in flight; a
/// thousand is half a second of work at 2,000 a second, when devices start retransmitting
/// (T1) and each retransmission costs a parse.
pub const MAX_PENDING_REGISTERS: usize = 1_000;

/// Counts a REGISTER that waits on the database until it is answered.
struct PendingRegister(Arc<AtomicUsize>);

impl PendingRegister {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        PendingRegister(count.clone())
    }
}

impl Drop for PendingRegister {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An active SIP credential and the number it registers, as the registrar checks a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLogin {
    pub credential_id: String,
    pub label: String,
    pub username: String,
    /// Also the digest realm.
    pub workspace_id: String,
    pub number_id: String,
    /// E.164 with `+`.
    pub number: String,
    pub number_status: NumberStatus,
    pub ha1_md5: String,
    pub ha1_sha256: String,
}

impl DeviceLogin {
    pub fn ha1(&self, algorithm: Algorithm) -> &str {
        match algorithm {
            Algorithm::Md5 => &self.ha1_md5,
            Algorithm::Sha256 => &self.ha1_sha256,
        }
    }
}

/// One binding of a number's address of record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub id: String,
    pub workspace_id: String,
    pub number_id: String,
    pub credential_id: String,
    pub contact: String,
    /// The flow the REGISTER came on: requests to the device go here.
    pub source: SocketAddr,
    pub transport: Transport,
    pub user_agent: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An authenticated REGISTER, to be applied in one transaction.
#[derive(Debug, Clone)]
pub struct RegisterBindings {
    pub login: DeviceLogin,
    /// The HA1 the request was verified with: the store applies the change only while the
    /// credential still has it, so a REGISTER racing a rotation cannot bind after it.
    pub verified_with: Algorithm,
    pub request: RegisterRequest,
    pub limits: BindingLimits,
    pub source: Peer,
    pub user_agent: Option<String>,
    pub engine_id: String,
    pub now: DateTime<Utc>,
}

#[derive(Debug, Clone, Error)]
pub enum RegisterStoreError {
    #[error(transparent)]
    Refused(#[from] RegisterError),
    #[error("the credential was rotated or revoked")]
    CredentialChanged,
    #[error("the number is not active")]
    NumberNotActive,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The registrar's persistence. Every method is one transaction.
#[async_trait]
pub trait RegistrarStore: Send + Sync + 'static {
    /// The nonce MAC key every engine on this database shares; made on first use.
    async fn nonce_secret(&self, now: DateTime<Utc>) -> Result<[u8; 32], StorageError>;

    /// The active credential with this username, with its number.
    async fn device_login(&self, username: &str) -> Result<Option<DeviceLogin>, StorageError>;

    /// The realm (workspace id) to challenge an address of record's user part with: a
    /// credential username, or a live number (E.164, with or without `+`).
    async fn realm_for(&self, aor_user: &str) -> Result<Option<String>, StorageError>;

    /// Realms that exist (workspaces with live numbers), up to a few hundred. A user we do not
    /// know is challenged with one of them, picked by the username, so that neither the shape of
    /// a realm nor whether it is shared tells a scanner which usernames exist.
    async fn realm_pool(&self) -> Result<Arc<[String]>, StorageError> {
        Ok(Arc::from(Vec::new()))
    }

    /// What `device_login` recently returned for this username, without touching the database,
    /// if the store keeps such a cache. It may be stale (a rotation on another engine): the
    /// registrar only takes it to accept a REGISTER whose response matches it, and `register`
    /// checks the HA1 again under its lock; anything else is looked up afresh.
    fn cached_login(&self, _username: &str) -> Option<DeviceLogin> {
        None
    }

    /// What `realm_for` recently returned for this user part, without touching the database.
    fn cached_realm(&self, _aor_user: &str) -> Option<String> {
        None
    }

    /// A cached login proved stale (`register` refused it): look it up afresh next time.
    fn forget_login(&self, _username: &str) {}

    /// Apply a REGISTER to the number's bindings (dropping expired ones) and return the bindings
    /// after it, unexpired, oldest first.
    async fn register(
        &self,
        cmd: RegisterBindings,
    ) -> Result<Vec<Registration>, RegisterStoreError>;

    /// Bindings of engines silent since `since` (no heartbeat after it, or none at all): their
    /// UDP bindings are taken over by this engine (the device's address still reaches us) and
    /// their TCP bindings, whose connections died with that process, are removed.
    async fn adopt_silent_bindings(
        &self,
        engine_id: &str,
        since: DateTime<Utc>,
    ) -> Result<(), StorageError>;

    /// How many unexpired UDP bindings `engine_id` holds the flow of.
    async fn udp_binding_count(
        &self,
        engine_id: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StorageError>;

    /// One page of the unexpired UDP bindings whose flow `engine_id` holds: at most `limit`,
    /// in id order, with ids after `after` (`""` for the first page).
    async fn udp_bindings(
        &self,
        engine_id: &str,
        after: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Registration>, StorageError>;

    /// Remove a binding a keepalive got no answer from, unless a REGISTER refreshed it after
    /// `since`.
    async fn drop_silent_binding(
        &self,
        id: &str,
        since: DateTime<Utc>,
    ) -> Result<bool, StorageError>;

    /// A TCP connection closed: its bindings can no longer be reached.
    async fn drop_flow_bindings(
        &self,
        engine_id: &str,
        source: SocketAddr,
    ) -> Result<u64, StorageError>;

    /// The unexpired bindings of a number that engine `engine_id` can reach: every UDP one, and
    /// TCP ones whose connection it holds. Oldest first.
    async fn reachable_bindings(
        &self,
        number_id: &str,
        engine_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Registration>, StorageError>;

    /// Remove bindings past their expiry.
    async fn sweep_expired_bindings(&self, now: DateTime<Utc>) -> Result<u64, StorageError>;

    /// The ids of a number's active SIP credentials with this label (`dial` with `device`).
    async fn credential_ids_by_label(
        &self,
        number_id: &str,
        label: &str,
    ) -> Result<Vec<String>, StorageError>;
}

#[derive(Clone)]
pub struct RegistrarArgs {
    pub store: Arc<dyn RegistrarStore>,
    pub clock: Arc<dyn Clock>,
    /// Our SIP domain (`SAUTIKIT_SIP_DOMAIN`); addresses of record are `user@domain` (our IP
    /// is accepted too).
    pub domain: String,
    pub engine_id: String,
    /// SQLite: bindings in the database at start were this process's before it restarted.
    pub single_process: bool,
    /// An engine silent this long is taken for dead (PostgreSQL): its UDP bindings are adopted.
    pub orphan_after: Duration,
    pub failures: FailureLimits,
    pub bindings: BindingLimits,
    /// Digest algorithms offered, most preferred first (one challenge header each).
    pub algorithms: Vec<Algorithm>,
    /// OPTIONS to each UDP binding this often; one that stops answering is removed.
    pub keepalive_every: Duration,
    /// REGISTERs waiting on the database past which new ones are shed ([`MAX_PENDING_REGISTERS`]).
    pub max_pending_registers: usize,
    /// Registered name of the SIP endpoint (keepalives go out through it).
    pub sip: String,
}

pub enum RegistrarMsg {
    /// A REGISTER arrived (no response sent yet).
    RegisterReceived {
        key: TxKey,
        request: Box<rsip::Request>,
        from: Peer,
        /// The address it arrived at (accepted as the domain of the AOR).
        local: SocketAddr,
        endpoint: ActorRef<SipMsg>,
    },
    /// An INVITE from a device (not a carrier): it must authenticate as a credential of one
    /// number (`407` challenge, the same nonce rules), then goes back to the endpoint as a
    /// `DeviceCallAuthenticated`.
    InviteReceived {
        key: TxKey,
        request: Box<rsip::Request>,
        from: Peer,
        local: SocketAddr,
        endpoint: ActorRef<SipMsg>,
    },
    /// The credential behind an Authorization header was looked up and its response checked.
    LoginChecked(Box<LoginChecked>),
    KeepaliveDue,
    /// An OPTIONS to a binding got no final response (Timer F).
    KeepaliveTimedOut {
        binding_id: String,
        sent_at: DateTime<Utc>,
    },
    /// A TCP connection closed.
    FlowClosed {
        peer: SocketAddr,
    },
    SweepDue,
}

/// What a login is for.
enum Purpose {
    Register(RegisterRequest),
    Call,
}

impl Purpose {
    fn method(&self) -> &'static str {
        match self {
            Purpose::Register(_) => "REGISTER",
            Purpose::Call => "INVITE",
        }
    }

    /// A registrar challenges with `401`/`WWW-Authenticate`, a proxy with `407`/`Proxy-…`.
    fn challenge_code(&self) -> u16 {
        match self {
            Purpose::Register(_) => 401,
            Purpose::Call => 407,
        }
    }
}

pub struct LoginChecked {
    key: TxKey,
    request: rsip::Request,
    purpose: Purpose,
    from: Peer,
    endpoint: ActorRef<SipMsg>,
    creds: DigestCredentials,
    /// The credential, when one has this username.
    login: Option<DeviceLogin>,
    /// The response matches the credential's HA1.
    response_ok: bool,
    aor_user: String,
}

pub struct Registrar;

pub struct RegistrarState {
    args: RegistrarArgs,
    nonces: NonceKey,
    /// A key of the same secret for realms of unknown users, so a first challenge does not tell
    /// a scanner which usernames exist.
    decoy: [u8; 32],
    counts: NonceCounts,
    limiter: FailureLimiter,
    ticker: Option<tokio::task::JoinHandle<()>>,
    /// The keepalive round under way.
    round: Option<tokio::task::JoinHandle<()>>,
    /// REGISTERs between their arrival and their answer that wait on the database.
    pending_registers: Arc<AtomicUsize>,
    /// REGISTERs answered `503` since the last sweep.
    shed_registers: u64,
    /// No keepalive round has run yet.
    first_round: bool,
}

impl Actor for Registrar {
    type Msg = RegistrarMsg;
    type State = RegistrarState;
    type Arguments = RegistrarArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let secret = args.store.nonce_secret(args.clock.now()).await?;
        let me = myself.clone();
        let keepalive_every = args.keepalive_every.max(Duration::from_secs(1));
        let ticker = tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            let mut keepalive = tokio::time::interval(keepalive_every);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let msg = tokio::select! {
                    _ = sweep.tick() => RegistrarMsg::SweepDue,
                    _ = keepalive.tick() => RegistrarMsg::KeepaliveDue,
                };
                if me.cast(msg).is_err() {
                    return;
                }
            }
        });
        Ok(RegistrarState {
            nonces: NonceKey::new(secret),
            decoy: derive_key(&secret, b"decoy realms"),
            counts: NonceCounts::new(),
            limiter: FailureLimiter::new(args.failures),
            ticker: Some(ticker),
            round: None,
            pending_registers: Arc::default(),
            shed_registers: 0,
            first_round: true,
            args,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        if let Some(t) = state.round.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RegistrarMsg::RegisterReceived {
                key,
                request,
                from,
                local,
                endpoint,
            } => {
                if state.pending_registers.load(Ordering::Relaxed)
                    >= state.args.max_pending_registers
                {
                    // Falling behind: a device told to come back later (RFC 3261 §21.5.4) does
                    // not retransmit into the queue. Spread the returns over ten seconds.
                    state.shed_registers += 1;
                    let mut r = [0u8; 1];
                    let _ = getrandom::fill(&mut r);
                    let after = (5 + u32::from(r[0]) % 10).to_string();
                    respond(
                        &endpoint,
                        &key,
                        &request,
                        503,
                        vec![("Retry-After".to_owned(), after)],
                    );
                    return Ok(());
                }
                let purpose = match registrar::parse_register(&request) {
                    Ok(r) => Purpose::Register(r),
                    Err(e) => {
                        debug!(error = %e, from = %from.addr, "malformed REGISTER");
                        // RFC 3261 §10.3: whether the address of record is ours is settled
                        // (404) before its contacts are read.
                        let (code, why) = if foreign_aor(&request, &state.args.domain, local) {
                            (404, "not an address of record of this server".to_owned())
                        } else {
                            (e.status(), e.to_string())
                        };
                        respond(&endpoint, &key, &request, code, warning(&why));
                        return Ok(());
                    }
                };
                on_login_request(
                    &myself, state, key, *request, purpose, from, local, endpoint,
                )
            }
            RegistrarMsg::InviteReceived {
                key,
                request,
                from,
                local,
                endpoint,
            } => on_login_request(
                &myself,
                state,
                key,
                *request,
                Purpose::Call,
                from,
                local,
                endpoint,
            ),
            RegistrarMsg::LoginChecked(checked) => on_login_checked(state, *checked),
            RegistrarMsg::KeepaliveDue => {
                if let Some(previous) = state.round.take()
                    && !previous.is_finished()
                {
                    // Not done in a whole interval (a slow database): the new round starts over.
                    warn!("a keepalive round did not finish within its interval");
                    previous.abort();
                }
                let now = state.args.clock.now();
                let first = std::mem::take(&mut state.first_round);
                // One process owns a SQLite file: at its start every binding was its own.
                let adopt = if state.args.single_process {
                    first.then_some(now)
                } else {
                    chrono::Duration::from_std(state.args.orphan_after)
                        .ok()
                        .map(|d| now - d)
                };
                state.round = Some(tokio::spawn(keepalive_round(
                    state.args.clone(),
                    adopt,
                    now,
                )));
            }
            RegistrarMsg::KeepaliveTimedOut {
                binding_id,
                sent_at,
            } => {
                let store = state.args.store.clone();
                tokio::spawn(async move {
                    match store.drop_silent_binding(&binding_id, sent_at).await {
                        Ok(true) => {
                            info!(%binding_id, "device stopped answering keepalives; binding removed")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            warn!(error = %e, %binding_id, "could not remove a silent binding")
                        }
                    }
                });
            }
            RegistrarMsg::FlowClosed { peer } => {
                let store = state.args.store.clone();
                let engine = state.args.engine_id.clone();
                tokio::spawn(async move {
                    match store.drop_flow_bindings(&engine, peer).await {
                        Ok(0) => {}
                        Ok(n) => {
                            info!(%peer, removed = n, "TCP connection of registered devices closed")
                        }
                        Err(e) => {
                            warn!(error = %e, %peer, "could not remove the bindings of a closed connection")
                        }
                    }
                });
            }
            RegistrarMsg::SweepDue => {
                if state.shed_registers > 0 {
                    metrics::counter!("sautikit_sip_registers_shed_total")
                        .increment(state.shed_registers);
                    warn!(
                        turned_away = state.shed_registers,
                        waiting = state.pending_registers.load(Ordering::Relaxed),
                        "overloaded: REGISTERs answered 503"
                    );
                    state.shed_registers = 0;
                }
                let now_unix = unix(state.args.clock.now());
                state.counts.forget_expired(now_unix);
                state.limiter.prune(Instant::now());
                metrics::gauge!("sautikit_sip_banned_sources")
                    .set(state.limiter.banned_sources(Instant::now()) as f64);
                let store = state.args.store.clone();
                let now = state.args.clock.now();
                tokio::spawn(async move {
                    match store.sweep_expired_bindings(now).await {
                        Ok(0) => {}
                        Ok(n) => debug!(removed = n, "expired bindings removed"),
                        Err(e) => warn!(error = %e, "could not remove expired bindings"),
                    }
                });
            }
        }
        Ok(())
    }
}

/// Bindings read a page at a time during a keepalive round.
const KEEPALIVE_PAGE: u32 = 500;

/// One keepalive round: an OPTIONS to every UDP binding this engine holds the flow of, spread
/// evenly over nine tenths of the keepalive interval (10,000 bindings every 30 s is 370 a
/// second) rather than all at once, whose answers would overflow the socket's receive buffer
/// and hold up REGISTERs. Bindings are read a page at a time.
async fn keepalive_round(
    args: RegistrarArgs,
    adopt_silent_since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) {
    let store = &args.store;
    let engine = &args.engine_id;
    if let Some(since) = adopt_silent_since
        && let Err(e) = store.adopt_silent_bindings(engine, since).await
    {
        warn!(error = %e, "could not adopt the bindings of silent engines");
    }
    let total = match store.udp_binding_count(engine, now).await {
        Ok(0) => return,
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "could not count the bindings to keep alive");
            return;
        }
    };
    let Some(sip) = ActorRef::<SipMsg>::where_is(args.sip.clone()) else {
        return;
    };
    let spread = args
        .keepalive_every
        .max(Duration::from_secs(1))
        .mul_f64(0.9);
    let step = spread.div_f64(total as f64);
    let start = tokio::time::Instant::now();
    let mut sent: u32 = 0;
    let mut after = String::new();
    loop {
        let page = match store
            .udp_bindings(engine, &after, KEEPALIVE_PAGE, now)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                warn!(error = %e, "could not read bindings to keep alive");
                return;
            }
        };
        let full = page.len() >= KEEPALIVE_PAGE as usize;
        if let Some(last) = page.last() {
            after.clone_from(&last.id);
        }
        for b in page {
            // Wake a few times a tick, not once per OPTIONS.
            let due = start + step * sent;
            if due > tokio::time::Instant::now() + Duration::from_millis(5) {
                tokio::time::sleep_until(due).await;
            }
            sent = sent.saturating_add(1);
            let msg = SipMsg::SendKeepalive {
                contact: b.contact,
                to: Peer {
                    addr: b.source,
                    transport: b.transport,
                },
                domain: args.domain.clone(),
                binding_id: b.id,
                sent_at: args.clock.now(),
            };
            if sip.cast(msg).is_err() {
                return;
            }
        }
        if !full {
            return;
        }
    }
}

fn unix(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp()).unwrap_or(0)
}

fn derive_key(secret: &[u8; 32], label: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    let mut out = [0u8; 32];
    if let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        mac.update(label);
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

/// A realm for a user we do not know, stable per user so that asking again gives the same
/// answer: one of the real realms in `pool`, picked by a keyed hash of the username; with none,
/// a made-up id shaped like a workspace id.
fn decoy_realm(key: &[u8; 32], user: &str, pool: &[String]) -> String {
    let hashed = derive_key(key, user.as_bytes());
    if !pool.is_empty() {
        let mut pick = [0u8; 8];
        pick.copy_from_slice(&hashed[16..24]);
        return pool[jump_hash(u64::from_le_bytes(pick), pool.len())].clone();
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&hashed[..16]);
    b[6] = (b[6] & 0x0f) | 0x70;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b).to_string()
}

/// Lamping and Veach's jump consistent hash: a bucket in `0..buckets` for `key`. When buckets
/// are added at the end (the pool is ordered by workspace id, and ids grow with time) only the
/// keys that move to a new bucket change, so an unknown user's decoy stays put as workspaces
/// are created, as a real user's realm does.
fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (0u64, 0u64);
    while j < buckets as u64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as u64;
    }
    b as usize
}

fn fresh_nonce(state: &RegistrarState) -> String {
    let mut random = [0u8; 12];
    // Without OS randomness the nonce is still unforgeable (MACed) and time-bound.
    let _ = getrandom::fill(&mut random);
    state.nonces.mint(unix(state.args.clock.now()), random)
}

#[allow(clippy::too_many_arguments)]
fn on_login_request(
    myself: &ActorRef<RegistrarMsg>,
    state: &mut RegistrarState,
    key: TxKey,
    request: rsip::Request,
    purpose: Purpose,
    from: Peer,
    local: SocketAddr,
    endpoint: ActorRef<SipMsg>,
) {
    let now = Instant::now();
    if state.limiter.source_banned(from.addr.ip(), now) {
        metrics::counter!("sautikit_sip_auth_refused_total", "reason" => "banned").increment(1);
        respond(&endpoint, &key, &request, 403, Vec::new());
        return;
    }
    // A REGISTER names its address of record in To; a device's call, in From.
    let aor = match purpose {
        Purpose::Register(_) => request.to_header().ok().map(|h| h.value().to_owned()),
        Purpose::Call => request.from_header().ok().map(|h| h.value().to_owned()),
    };
    let Some(aor) = aor.as_deref().and_then(sipmsg::header_uri) else {
        // A To (or From) that is there but no SIP URI (RFC 4475's unksm2) names no address of
        // record of ours.
        let code = match (&purpose, &aor) {
            (Purpose::Register(_), Some(_)) => 404,
            (Purpose::Call, Some(_)) => 403,
            (_, None) => 400,
        };
        respond(
            &endpoint,
            &key,
            &request,
            code,
            warning("no SIP address of record of this server"),
        );
        return;
    };
    let aor_user = aor.user().map(str::to_owned).unwrap_or_default();
    if aor_user.is_empty() || !our_domain(&aor, &state.args.domain, local) {
        let code = match purpose {
            Purpose::Register(_) => 404,
            Purpose::Call => 403,
        };
        respond(
            &endpoint,
            &key,
            &request,
            code,
            warning("not a domain of this server"),
        );
        return;
    }
    let authorization = request.headers.iter().find_map(|h| match (h, &purpose) {
        (rsip::Header::Authorization(a), Purpose::Register(_)) => Some(a.value().to_owned()),
        (rsip::Header::ProxyAuthorization(a), Purpose::Call) => Some(a.value().to_owned()),
        _ => None,
    });
    let Some(authorization) = authorization else {
        // First contact: challenge with the realm of the AOR's workspace (or a decoy).
        if let Some(realm) = state.args.store.cached_realm(&aor_user) {
            let nonce = fresh_nonce(state);
            Challenge {
                code: purpose.challenge_code(),
                algorithms: &state.args.algorithms,
                realm: &realm,
                nonce: &nonce,
                stale: false,
            }
            .send(&endpoint, &key, &request);
            return;
        }
        let pending = matches!(purpose, Purpose::Register(_))
            .then(|| PendingRegister::new(&state.pending_registers));
        let store = state.args.store.clone();
        let decoy = state.decoy;
        let nonce = fresh_nonce(state);
        let algorithms = state.args.algorithms.clone();
        let code = purpose.challenge_code();
        tokio::spawn(async move {
            let realm = match store.realm_for(&aor_user).await {
                Ok(Some(realm)) => realm,
                Ok(None) => {
                    let pool = store.realm_pool().await.unwrap_or_else(|e| {
                        warn!(error = %e, "could not read the realm pool");
                        Arc::from(Vec::new())
                    });
                    decoy_realm(&decoy, &aor_user, &pool)
                }
                Err(e) => {
                    warn!(error = %e, "could not look up a realm");
                    respond(&endpoint, &key, &request, 500, Vec::new());
                    return;
                }
            };
            let c = Challenge {
                code,
                algorithms: &algorithms,
                realm: &realm,
                nonce: &nonce,
                stale: false,
            };
            c.send(&endpoint, &key, &request);
            drop(pending);
        });
        return;
    };
    let creds = match auth::parse_authorization(&authorization) {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, from = %from.addr, "malformed Authorization");
            state.limiter.record_failure(from.addr.ip(), None, now);
            respond(
                &endpoint,
                &key,
                &request,
                400,
                warning("malformed Authorization"),
            );
            return;
        }
    };
    if state.limiter.username_locked(&creds.username, now) {
        metrics::counter!("sautikit_sip_auth_refused_total", "reason" => "locked").increment(1);
        respond(&endpoint, &key, &request, 403, Vec::new());
        return;
    }
    // A REGISTER from a device seen recently is checked against the login cached then; a call,
    // or anything the cached login would refuse, against the database.
    if let Purpose::Register(_) = purpose
        && let Some(login) = state.args.store.cached_login(&creds.username)
        && login.number_status == NumberStatus::Active
        && creds.realm == login.workspace_id
        && aor_matches(&aor_user, &login)
        && auth::verify(&creds, purpose.method(), login.ha1(creds.algorithm))
    {
        on_login_checked(
            state,
            LoginChecked {
                key,
                request,
                purpose,
                from,
                endpoint,
                creds,
                login: Some(login),
                response_ok: true,
                aor_user,
            },
        );
        return;
    }
    let pending = matches!(purpose, Purpose::Register(_))
        .then(|| PendingRegister::new(&state.pending_registers));
    let store = state.args.store.clone();
    let me = myself.clone();
    tokio::spawn(async move {
        let _pending = pending;
        let login = match store.device_login(&creds.username).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "could not look up a credential");
                respond(&endpoint, &key, &request, 500, Vec::new());
                return;
            }
        };
        let response_ok = login
            .as_ref()
            .is_some_and(|l| auth::verify(&creds, purpose.method(), l.ha1(creds.algorithm)));
        let _ = me.cast(RegistrarMsg::LoginChecked(Box::new(LoginChecked {
            key,
            request,
            purpose,
            from,
            endpoint,
            creds,
            login,
            response_ok,
            aor_user,
        })));
    });
}

fn on_login_checked(state: &mut RegistrarState, mut c: LoginChecked) {
    let now = Instant::now();
    let ip = c.from.addr.ip();
    let login = match c.login.take() {
        Some(login)
            if c.response_ok
                && c.creds.realm == login.workspace_id
                && aor_matches(&c.aor_user, &login) =>
        {
            login
        }
        known => {
            // Unknown user, wrong password, foreign realm or another number's AOR: one answer
            // for all, so a scanner learns nothing. Only usernames that exist are counted (a
            // scan of made-up names must not fill the limiter).
            let username = known.as_ref().map(|_| c.creds.username.as_str());
            let bans = state.limiter.record_failure(ip, username, now);
            metrics::counter!("sautikit_sip_auth_failures_total").increment(1);
            if bans.source {
                metrics::counter!("sautikit_sip_auth_bans_total", "kind" => "source").increment(1);
                warn!(source = %ip, "too many failed SIP logins: source banned");
            }
            if bans.username {
                metrics::counter!("sautikit_sip_auth_bans_total", "kind" => "username")
                    .increment(1);
                warn!(username = %c.creds.username, "too many failed SIP logins: username locked");
            }
            info!(source = %c.from.addr, username = %c.creds.username, "SIP login refused");
            respond(&c.endpoint, &c.key, &c.request, 403, Vec::new());
            return;
        }
    };
    if !state.args.algorithms.contains(&c.creds.algorithm) {
        // An answer to a challenge we no longer offer.
        rechallenge(state, &c, &login.workspace_id, false);
        return;
    }
    let now_unix = unix(state.args.clock.now());
    let issued = match state.nonces.check(&c.creds.nonce, now_unix) {
        NonceState::Valid { issued_unix } => issued_unix,
        NonceState::Stale => {
            rechallenge(state, &c, &login.workspace_id, true);
            return;
        }
        NonceState::Invalid => {
            rechallenge(state, &c, &login.workspace_id, false);
            return;
        }
    };
    // Replay protection needs qop=auth's nonce count: the RFC 2069 form is refused.
    let Some(nc) = c.creds.nc else {
        respond(
            &c.endpoint,
            &c.key,
            &c.request,
            403,
            warning("qop=auth is required"),
        );
        return;
    };
    if !state.counts.accept(&c.creds.nonce, issued, nc, now_unix) {
        info!(source = %c.from.addr, username = %login.username, "replayed SIP Authorization refused");
        metrics::counter!("sautikit_sip_auth_refused_total", "reason" => "replay").increment(1);
        rechallenge(state, &c, &login.workspace_id, true);
        return;
    }
    if login.number_status != NumberStatus::Active {
        respond(
            &c.endpoint,
            &c.key,
            &c.request,
            403,
            warning("the number is not active"),
        );
        return;
    }
    let register = match c.purpose {
        Purpose::Register(r) => r,
        Purpose::Call => {
            info!(workspace_id = %login.workspace_id, number_id = %login.number_id,
                credential_id = %login.credential_id, source = %c.from.addr, "device call authenticated");
            let _ = c.endpoint.cast(SipMsg::DeviceCallAuthenticated {
                key: c.key,
                request: Box::new(c.request),
                from: c.from,
                login: Box::new(login),
            });
            return;
        }
    };
    let user_agent = c.request.headers.iter().find_map(|h| match h {
        rsip::Header::UserAgent(u) => Some(u.value().chars().take(200).collect::<String>()),
        _ => None,
    });
    let cmd = RegisterBindings {
        verified_with: c.creds.algorithm,
        request: register,
        limits: state.args.bindings,
        source: c.from,
        user_agent,
        engine_id: state.args.engine_id.clone(),
        now: state.args.clock.now(),
        login,
    };
    let store = state.args.store.clone();
    let pending = PendingRegister::new(&state.pending_registers);
    tokio::spawn(async move {
        let _pending = pending;
        let username = cmd.login.username.clone();
        let (workspace_id, number_id, credential_id) = (
            cmd.login.workspace_id.clone(),
            cmd.login.number_id.clone(),
            cmd.login.credential_id.clone(),
        );
        let now = cmd.now;
        match store.register(cmd).await {
            Ok(bindings) => {
                debug!(%workspace_id, %number_id, %credential_id, source = %c.from.addr,
                    bindings = bindings.len(), "REGISTER accepted");
                let contacts = bindings
                    .iter()
                    .map(|b| {
                        let left = (b.expires_at - now).num_seconds().max(0);
                        (
                            "Contact".to_owned(),
                            format!("<{}>;expires={left}", b.contact),
                        )
                    })
                    .collect();
                respond(&c.endpoint, &c.key, &c.request, 200, contacts);
            }
            Err(RegisterStoreError::Refused(e)) => {
                let mut extra = warning(&e.to_string());
                if let RegisterError::IntervalTooBrief { min } = e {
                    extra.push(("Min-Expires".to_owned(), min.to_string()));
                }
                respond(&c.endpoint, &c.key, &c.request, e.status(), extra);
            }
            Err(RegisterStoreError::CredentialChanged) => {
                store.forget_login(&username);
                respond(&c.endpoint, &c.key, &c.request, 403, Vec::new());
            }
            Err(RegisterStoreError::NumberNotActive) => {
                store.forget_login(&username);
                respond(
                    &c.endpoint,
                    &c.key,
                    &c.request,
                    403,
                    warning("the number is not active"),
                );
            }
            Err(RegisterStoreError::Storage(e)) => {
                warn!(error = %e, %number_id, "could not store a registration");
                respond(&c.endpoint, &c.key, &c.request, 500, Vec::new());
            }
        }
    });
}

/// The AOR's user part names this login: its username, or its number with or without `+`.
fn aor_matches(aor_user: &str, login: &DeviceLogin) -> bool {
    aor_user == login.username
        || aor_user.trim_start_matches('+') == login.number.trim_start_matches('+')
}

/// Whether a REGISTER's To names no SIP address of record of ours.
fn foreign_aor(request: &rsip::Request, domain: &str, local: SocketAddr) -> bool {
    let to = request.to_header().ok().map(|h| h.value().to_owned());
    match to.as_deref().map(sipmsg::header_uri) {
        Some(Some(aor)) => !our_domain(&aor, domain, local),
        Some(None) => true,
        None => false,
    }
}

fn our_domain(aor: &rsip::Uri, domain: &str, local: SocketAddr) -> bool {
    let host = aor.host_with_port.host.to_string();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case(domain) {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == local.ip() || local.ip().is_unspecified(),
        Err(_) => false,
    }
}

fn warning(text: &str) -> Vec<(String, String)> {
    vec![(
        "Warning".to_owned(),
        format!("399 sautikit \"{}\"", text.replace('"', "'")),
    )]
}

/// A fresh challenge for a login whose credentials were right but whose nonce is not usable
/// (stale, not ours, replayed, or answered with an algorithm no longer offered).
fn rechallenge(state: &RegistrarState, c: &LoginChecked, realm: &str, stale: bool) {
    let nonce = fresh_nonce(state);
    Challenge {
        code: c.purpose.challenge_code(),
        algorithms: &state.args.algorithms,
        realm,
        nonce: &nonce,
        stale,
    }
    .send(&c.endpoint, &c.key, &c.request);
}

/// A digest challenge: `401` with `WWW-Authenticate` (registrar) or `407` with
/// `Proxy-Authenticate` (a device's call), one header per algorithm.
struct Challenge<'a> {
    code: u16,
    algorithms: &'a [Algorithm],
    realm: &'a str,
    nonce: &'a str,
    stale: bool,
}

impl Challenge<'_> {
    fn send(&self, endpoint: &ActorRef<SipMsg>, key: &TxKey, request: &rsip::Request) {
        let header = if self.code == 407 {
            "Proxy-Authenticate"
        } else {
            "WWW-Authenticate"
        };
        let extra = self
            .algorithms
            .iter()
            .map(|a| {
                (
                    header.to_owned(),
                    auth::challenge(*a, self.realm, self.nonce, self.stale),
                )
            })
            .collect();
        respond(endpoint, key, request, self.code, extra);
    }
}

fn respond(
    endpoint: &ActorRef<SipMsg>,
    key: &TxKey,
    request: &rsip::Request,
    code: u16,
    extra: Vec<(String, String)>,
) {
    let mut response = response_to(request, code, None, Some(&sipmsg::new_tag()));
    for (name, value) in extra {
        response.headers.push(rsip::Header::Other(name, value));
    }
    let _ = endpoint.cast(SipMsg::Respond {
        key: key.clone(),
        response,
        outside: None,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoy_realms_look_like_workspace_ids_and_are_stable() {
        let key = derive_key(&[7u8; 32], b"decoy realms");
        let a = decoy_realm(&key, "ts_00000001", &[]);
        assert_eq!(a, decoy_realm(&key, "ts_00000001", &[]));
        assert_ne!(a, decoy_realm(&key, "ts_00000002", &[]));
        let parsed = uuid::Uuid::parse_str(&a).unwrap_or_default();
        assert_eq!(parsed.get_version_num(), 7);
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn decoy_realms_are_drawn_from_the_real_ones() {
        let key = derive_key(&[7u8; 32], b"decoy realms");
        let pool: Vec<String> = (0..5)
            .map(|i| format!("0193e0b2-0000-7000-8000-00000000000{i}"))
            .collect();
        let mut used = std::collections::HashSet::new();
        for i in 0..200 {
            let user = format!("ts_{i:08x}");
            let realm = decoy_realm(&key, &user, &pool);
            assert!(pool.contains(&realm), "{realm}");
            assert_eq!(realm, decoy_realm(&key, &user, &pool), "stable per user");
            used.insert(realm);
        }
        assert_eq!(used.len(), pool.len(), "every real realm serves as a decoy");

        // A workspace created later joins the end of the pool: few decoys move, all to it.
        let mut grown = pool.clone();
        grown.push("0193e0b2-0000-7000-8000-000000000005".to_owned());
        let mut moved = 0;
        for i in 0..600 {
            let user = format!("ts_{i:08x}");
            let (before, after) = (
                decoy_realm(&key, &user, &pool),
                decoy_realm(&key, &user, &grown),
            );
            if before != after {
                assert_eq!(after, grown[5], "{user} moved to an old realm");
                moved += 1;
            }
        }
        assert!(
            (40..=170).contains(&moved),
            "{moved} of 600 moved (about 1 in 6 expected)"
        );
    }

    #[test]
    fn aor_user_is_the_username_or_the_number() {
        let login = DeviceLogin {
            credential_id: "c".into(),
            label: String::new(),
            username: "ts_0a0b0c0d".into(),
            workspace_id: "w".into(),
            number_id: "n".into(),
            number: "+254700000001".into(),
            number_status: NumberStatus::Active,
            ha1_md5: String::new(),
            ha1_sha256: String::new(),
        };
        assert!(aor_matches("ts_0a0b0c0d", &login));
        assert!(aor_matches("+254700000001", &login));
        assert!(aor_matches("254700000001", &login));
        assert!(!aor_matches("254700000002", &login));
        assert!(!aor_matches("ts_0a0b0c0e", &login));
    }
}
