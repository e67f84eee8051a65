//! The call actors over real UDP with in-memory stores: a Call actor that fails ends its own call
//! cleanly (BYE, `failed` with `engine.error`) and no other call notices; the engine's hangup
//! reaches a live call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sautikit_actors::admission::Admission;
use sautikit_actors::audio::{AudioFetcher, PlayError};
use sautikit_actors::call_store::{
    CallAnswered, CallCharged, CallEnded, CallStarted, CallStore, NumberRoute, RecordingReady,
    TimelineEntry, WriteReceipt,
};
use sautikit_actors::callback::{CallbackClient, CallbackFailure, CallbackReply, CallbackRequest};
use sautikit_actors::clock::SystemClock;
use sautikit_actors::model::{NumberStatus, TenantNumber};
use sautikit_actors::registrar::{
    DeviceLogin, RegisterBindings, RegisterStoreError, RegistrarStore, Registration,
};
use sautikit_actors::store::{
    ClaimError, ClaimNumber, CreditWallet, Credited, ReleaseError, ReleaseNumber, StorageError,
    Store, WalletError,
};
use sautikit_actors::synth::{Audio, SpeechRequest, SynthError, Synthesizer};
use sautikit_actors::voice::parse_script;
use sautikit_actors::{Engine, RegistrarSetup, VoiceSetup};
use sautikit_sip::transaction::Timers;
use tokio::net::UdpSocket;

/// Calls to this number make the store panic when the answer is recorded: a bug in one call.
const BROKEN: &str = "+254700000099";
const HEALTHY: &str = "+254700000001";
/// Calls to this number have no voice callback (answered `480`), and the first time a call's end
/// is recorded the store panics: the Call actor fails in the same step that sent its first
/// snapshot to Calls.
const FAILS_AT_END: &str = "+254700000098";
/// Calls to this number ring its one registered device; once the caller's ACK comes, recording
/// the answer panics: the Call actor fails with a bridged device leg on the wire.
const RINGS_DEVICE: &str = "+254700000097";
/// Recording the start of a call to this number panics: the Call actor fails before it has told
/// Calls anything of its call.
const FAILS_AT_START: &str = "+254700000095";
/// Recording the end of a call to this number fails `END_FAILURES` times, then works.
const END_FAILS: &str = "+254700000096";
const END_FAILURES: usize = 4;
/// The start of a call to this number commits, but its write reports a failure (the connection
/// died between the commit and its answer).
const START_UNSEEN: &str = "+254700000094";

/// No SIP credentials exist: every REGISTER is refused.
/// The one device registered for `RINGS_DEVICE`, if a test set it; with `stall`, looking up a
/// REGISTER's realm never ends (a database that stopped answering).
#[derive(Default)]
struct NoDevices(Mutex<Option<SocketAddr>>, std::sync::atomic::AtomicBool);

#[async_trait]
impl RegistrarStore for NoDevices {
    async fn credential_ids_by_label(
        &self,
        _number_id: &str,
        _label: &str,
    ) -> Result<Vec<String>, StorageError> {
        Ok(Vec::new())
    }
    async fn nonce_secret(&self, _now: DateTime<Utc>) -> Result<[u8; 32], StorageError> {
        Ok([9; 32])
    }
    async fn device_login(&self, _username: &str) -> Result<Option<DeviceLogin>, StorageError> {
        Ok(None)
    }
    async fn realm_for(&self, _aor_user: &str) -> Result<Option<String>, StorageError> {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(None)
    }
    async fn register(
        &self,
        _cmd: RegisterBindings,
    ) -> Result<Vec<Registration>, RegisterStoreError> {
        Err(RegisterStoreError::CredentialChanged)
    }
    async fn adopt_silent_bindings(
        &self,
        _engine_id: &str,
        _since: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        Ok(())
    }
    async fn udp_binding_count(
        &self,
        _engine_id: &str,
        _now: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        Ok(0)
    }
    async fn udp_bindings(
        &self,
        _engine_id: &str,
        _after: &str,
        _limit: u32,
        _now: DateTime<Utc>,
    ) -> Result<Vec<Registration>, StorageError> {
        Ok(Vec::new())
    }
    async fn drop_silent_binding(
        &self,
        _id: &str,
        _since: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        Ok(false)
    }
    async fn drop_flow_bindings(
        &self,
        _engine_id: &str,
        _source: SocketAddr,
    ) -> Result<u64, StorageError> {
        Ok(0)
    }
    async fn reachable_bindings(
        &self,
        number_id: &str,
        _engine_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Registration>, StorageError> {
        let device = *self.0.lock().unwrap();
        Ok(match device {
            Some(addr) if number_id == format!("id{RINGS_DEVICE}") => vec![Registration {
                id: "reg".into(),
                workspace_id: "ws".into(),
                number_id: number_id.into(),
                credential_id: "cred".into(),
                contact: format!("sip:desk@{addr}"),
                source: addr,
                transport: sautikit_sip::transaction::Transport::Udp,
                user_agent: None,
                expires_at: now + chrono::Duration::seconds(600),
                updated_at: now,
            }],
            _ => Vec::new(),
        })
    }
    async fn sweep_expired_bindings(&self, _now: DateTime<Utc>) -> Result<u64, StorageError> {
        Ok(0)
    }
}

struct NoStore;

#[async_trait]
impl Store for NoStore {
    async fn claim_number(&self, _: ClaimNumber) -> Result<TenantNumber, ClaimError> {
        Err(ClaimError::NotFound)
    }
    async fn release_number(&self, _: ReleaseNumber) -> Result<TenantNumber, ReleaseError> {
        Err(ReleaseError::NotFound)
    }
    async fn credit_wallet(&self, _: CreditWallet) -> Result<Credited, WalletError> {
        Err(WalletError::NotFound)
    }
}

/// (to, status, failure_reason, hangup_cause)
type Row = (String, String, Option<String>, Option<String>);

#[derive(Default)]
struct MemCalls {
    /// call id → row
    calls: Mutex<HashMap<String, Row>>,
    /// Calls whose answer was recorded.
    answered: Mutex<Vec<String>>,
    /// Whether the end of a call to `FAILS_AT_END` has panicked yet.
    end_panicked: std::sync::atomic::AtomicBool,
    /// Failed attempts to record the end of a call to `END_FAILS`.
    end_failures: std::sync::atomic::AtomicUsize,
}

impl MemCalls {
    /// (call id, status, failure_reason, hangup_cause)
    fn by_number(&self, to: &str) -> Option<Row> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .find(|(_, c)| c.0 == to)
            .map(|(id, c)| (id.clone(), c.1.clone(), c.2.clone(), c.3.clone()))
    }
}

fn route(number: &str) -> NumberRoute {
    NumberRoute {
        number_id: format!("id{number}"),
        workspace_id: "ws".into(),
        number: number.into(),
        status: NumberStatus::Active,
        voice_callback_url: Some("http://callback.invalid/voice".into()),
        events_url: None,
        inbound_per_min_minor: 0,
        outbound_per_min_minor: 0,
        currency: "KES".into(),
        webhook_secret: "whsec_test".into(),
    }
}

#[async_trait]
impl CallStore for MemCalls {
    async fn route_by_number(&self, number: &str) -> Result<Option<NumberRoute>, StorageError> {
        Ok(match number {
            BROKEN | HEALTHY | END_FAILS | FAILS_AT_START | START_UNSEEN => Some(route(number)),
            FAILS_AT_END | RINGS_DEVICE => Some(NumberRoute {
                voice_callback_url: None,
                ..route(number)
            }),
            _ => None,
        })
    }
    async fn route_by_id(&self, id: &str) -> Result<Option<NumberRoute>, StorageError> {
        Ok(id.strip_prefix("id").map(route))
    }
    async fn recording_ready(&self, _: RecordingReady) -> Result<(), StorageError> {
        Ok(())
    }
    async fn call_started(&self, c: CallStarted) -> Result<(), StorageError> {
        if c.to == FAILS_AT_START {
            panic!("simulated bug while recording the start");
        }
        let unseen = c.to == START_UNSEEN;
        self.calls
            .lock()
            .unwrap()
            .insert(c.call_id, (c.to, "ringing".into(), None, None));
        if unseen {
            return Err(StorageError("connection lost".into()));
        }
        Ok(())
    }
    fn queue_call_answered(&self, c: CallAnswered) -> WriteReceipt {
        // In memory the write is done at once, in the caller (a panic here is the call's).
        let to = self.calls.lock().unwrap()[&c.call_id].0.clone();
        if to == BROKEN || to == RINGS_DEVICE {
            panic!("simulated bug while recording the answer");
        }
        self.calls.lock().unwrap().get_mut(&c.call_id).unwrap().1 = "answered".into();
        self.answered.lock().unwrap().push(c.call_id);
        Box::pin(std::future::ready(Ok(())))
    }
    async fn call_ended(&self, c: CallEnded) -> Result<CallCharged, StorageError> {
        let to = self.calls.lock().unwrap()[&c.call_id].0.clone();
        if to == END_FAILS
            && self
                .end_failures
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                < END_FAILURES
        {
            return Err(StorageError("database unavailable".into()));
        }
        if to == FAILS_AT_END
            && !self
                .end_panicked
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("simulated bug while recording the end");
        }
        let mut calls = self.calls.lock().unwrap();
        let row = calls.get_mut(&c.call_id).unwrap();
        row.1 = c.status.as_str().into();
        row.2 = c.failure_reason;
        row.3 = c.hangup_cause;
        Ok(CallCharged {
            duration_seconds: 0,
            cost_minor: 0,
            currency: "KES".into(),
        })
    }
    async fn call_ended_if_started(
        &self,
        c: CallEnded,
    ) -> Result<Option<CallCharged>, StorageError> {
        if !self.calls.lock().unwrap().contains_key(&c.call_id) {
            return Ok(None);
        }
        self.call_ended(c).await.map(Some)
    }
    async fn append_timeline(&self, _: &str, _: Vec<TimelineEntry>) -> Result<(), StorageError> {
        Ok(())
    }
    async fn reserve(
        &self,
        _: &str,
        _: &str,
        _: i64,
        _: i64,
        _: DateTime<Utc>,
    ) -> Result<Option<i64>, StorageError> {
        Ok(None)
    }
    async fn engine_heartbeat(&self, _: &str, _: DateTime<Utc>) -> Result<(), StorageError> {
        Ok(())
    }
    async fn close_orphaned_calls(
        &self,
        _: DateTime<Utc>,
        _: &str,
        _: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        Ok(0)
    }
}

/// Every call pauses for a minute.
struct PauseScript;

#[async_trait]
impl CallbackClient for PauseScript {
    async fn fetch(&self, _: CallbackRequest) -> Result<CallbackReply, CallbackFailure> {
        Ok(CallbackReply {
            script: parse_script(br#"{"actions": [{"pause": {"length": 60}}]}"#)
                .expect("valid script"),
            status_code: 200,
            latency_ms: 1,
        })
    }
}

/// Scripts here only pause: no prompt is ever made.
struct NoMedia;

#[async_trait]
impl Synthesizer for NoMedia {
    async fn synthesize(&self, _: &SpeechRequest) -> Result<Audio, SynthError> {
        Err(SynthError::Failed("no speech in this test".into()))
    }
}

#[async_trait]
impl AudioFetcher for NoMedia {
    async fn fetch(&self, _: &str) -> Result<Audio, PlayError> {
        Err(PlayError::Unreachable {
            message: "no audio in this test".into(),
        })
    }
}

/// A minimal UDP caller.
struct Uac {
    sock: UdpSocket,
    server: SocketAddr,
    call_id: String,
    number: String,
}

impl Uac {
    async fn new(server: SocketAddr, number: &str) -> Uac {
        Uac {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            call_id: format!("{}@test", uuid::Uuid::now_v7().simple()),
            number: number.trim_start_matches('+').into(),
        }
    }

    fn headers(&self, method: &str, branch: &str, to_tag: &str) -> String {
        let me = self.sock.local_addr().unwrap();
        format!(
            "Via: SIP/2.0/UDP {me};branch={branch}\r\nFrom: <sip:caller@{me}>;tag=abc\r\n\
             To: <sip:{n}@{s}>{to_tag}\r\nCall-ID: {c}\r\nCSeq: 1 {method}\r\n\
             Contact: <sip:caller@{me}>\r\nMax-Forwards: 70\r\n",
            n = self.number,
            s = self.server,
            c = self.call_id,
        )
    }

    async fn invite(&self) {
        self.invite_on("z9hG4bKinv").await;
    }

    /// The INVITE in a transaction of its own (`branch`), same Call-ID.
    async fn invite_on(&self, branch: &str) {
        let me = self.sock.local_addr().unwrap();
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
             m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n",
            ip = me.ip(),
            port = me.port() + 2
        );
        let msg = format!(
            "INVITE sip:{}@{} SIP/2.0\r\n{}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            self.number,
            self.server,
            self.headers("INVITE", branch, ""),
            sdp.len()
        );
        self.sock
            .send_to(msg.as_bytes(), self.server)
            .await
            .unwrap();
    }

    async fn recv(&self) -> String {
        let mut buf = vec![0u8; 65535];
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), self.sock.recv_from(&mut buf))
            .await
            .expect("a SIP message within 10 s")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Wait for a message whose first line contains `what`.
    async fn expect(&self, what: &str) -> String {
        loop {
            let m = self.recv().await;
            if m.lines().next().unwrap_or("").contains(what) {
                return m;
            }
        }
    }

    async fn ack(&self, ok: &str) {
        let to_tag = header(ok, "To")
            .and_then(|t| t.split(";tag=").nth(1).map(|t| format!(";tag={t}")))
            .unwrap_or_default();
        let msg = format!(
            "ACK sip:{}@{} SIP/2.0\r\n{}Content-Length: 0\r\n\r\n",
            self.number,
            self.server,
            self.headers("ACK", "z9hG4bKack", &to_tag)
        );
        self.sock
            .send_to(msg.as_bytes(), self.server)
            .await
            .unwrap();
    }

    /// Hang up from the caller's side.
    async fn bye(&self, ok: &str) {
        let to_tag = header(ok, "To")
            .and_then(|t| t.split(";tag=").nth(1).map(|t| format!(";tag={t}")))
            .unwrap_or_default();
        let msg = format!(
            "BYE sip:{}@{} SIP/2.0\r\n{}Content-Length: 0\r\n\r\n",
            self.number,
            self.server,
            self.headers("BYE", "z9hG4bKbye", &to_tag)
                .replace("CSeq: 1 BYE", "CSeq: 2 BYE")
        );
        self.sock
            .send_to(msg.as_bytes(), self.server)
            .await
            .unwrap();
    }

    /// Answer a BYE 200 OK.
    async fn answer_bye(&self, bye: &str) {
        let mut resp = String::from("SIP/2.0 200 OK\r\n");
        for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
            if let Some(v) = header(bye, name) {
                resp.push_str(&format!("{name}: {v}\r\n"));
            }
        }
        resp.push_str("Content-Length: 0\r\n\r\n");
        self.sock
            .send_to(resp.as_bytes(), self.server)
            .await
            .unwrap();
    }
}

fn header(msg: &str, name: &str) -> Option<String> {
    msg.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

async fn wait_for(
    store: &MemCalls,
    number: &str,
    status: &str,
) -> (String, Option<String>, Option<String>) {
    wait_within(store, number, status, Duration::from_secs(5)).await
}

/// The same, for what is written at a heartbeat of Calls (every 5 s).
async fn wait_within(
    store: &MemCalls,
    number: &str,
    status: &str,
    within: Duration,
) -> (String, Option<String>, Option<String>) {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some((id, s, reason, cause)) = store.by_number(number)
            && s == status
        {
            return (id, reason, cause);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "call to {number} never became {status}: {:?}",
        store.by_number(number)
    );
}

/// An engine whose calls are stored in `calls` and scripted by `PauseScript`.
async fn start_engine(
    calls: &Arc<MemCalls>,
    rtp_ports: (u16, u16),
    media_threads: usize,
) -> Engine {
    start_engine_with(calls, rtp_ports, media_threads, Arc::default()).await
}

/// The same, with `devices` as the registered devices.
async fn start_engine_with(
    calls: &Arc<MemCalls>,
    rtp_ports: (u16, u16),
    media_threads: usize,
    devices: Arc<NoDevices>,
) -> Engine {
    start_engine_shedding(calls, rtp_ports, media_threads, devices, 1_000).await
}

/// The same, shedding REGISTERs once `max_pending_registers` wait on the store.
async fn start_engine_shedding(
    calls: &Arc<MemCalls>,
    rtp_ports: (u16, u16),
    media_threads: usize,
    devices: Arc<NoDevices>,
    max_pending_registers: usize,
) -> Engine {
    Engine::start_full(
        Arc::new(NoStore),
        Arc::new(SystemClock),
        None,
        Some(VoiceSetup {
            store: calls.clone(),
            callback: Arc::new(PauseScript),
            sip_listen: "127.0.0.1:0".parse().unwrap(),
            carrier_allow: vec!["127.0.0.0/8".parse().unwrap()],
            rtp_ports,
            media_ip: "127.0.0.1".parse().unwrap(),
            media_realtime: false,
            media_threads,
            single_process: true,
            orphan_after: Duration::from_secs(30),
            timers: Timers::default(),
            admission: Admission::default(),
            flood: sautikit_actors::flood::FloodLimits::default(),
            synth: Arc::new(NoMedia),
            audio: Arc::new(NoMedia),
            data_dir: std::env::temp_dir(),
            public_url: "http://127.0.0.1:1".into(),
            media_timeout: Duration::from_secs(60),
            ring_timeout: Duration::from_secs(30),
            trunk: None,
            dial_policy: Default::default(),
            streams: Default::default(),
            registrar: RegistrarSetup {
                store: devices,
                domain: "127.0.0.1".into(),
                failures: Default::default(),
                bindings: Default::default(),
                algorithms: sautikit_sip::digest::Algorithm::ALL.to_vec(),
                keepalive_every: Duration::from_secs(30),
                max_pending_registers,
            },
        }),
        None,
    )
    .await
    .expect("engine starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_call_actor_ends_only_its_own_call() {
    let calls = Arc::new(MemCalls::default());
    let engine = start_engine(&calls, (31_000, 31_400), 2).await;
    let sip = engine.sip_addr().expect("SIP is bound");

    // The healthy call is answered and stays up.
    let healthy = Uac::new(sip, HEALTHY).await;
    healthy.invite().await;
    let ok = healthy.expect("200 OK").await;
    healthy.ack(&ok).await;
    let (healthy_id, _, _) = wait_for(&calls, HEALTHY, "answered").await;

    // The broken call's actor panics once answered: Calls sends its BYE and records it failed.
    let broken = Uac::new(sip, BROKEN).await;
    broken.invite().await;
    let ok = broken.expect("200 OK").await;
    broken.ack(&ok).await;
    let bye = broken.expect("BYE").await;
    broken.answer_bye(&bye).await;
    let (_, reason, _) = wait_for(&calls, BROKEN, "failed").await;
    assert_eq!(reason.as_deref(), Some("engine.error"));

    // The healthy call noticed nothing and is still live: the engine can hang it up.
    assert_eq!(calls.by_number(HEALTHY).unwrap().1, "answered");
    let hung_up = tokio::time::timeout(
        Duration::from_secs(10),
        engine.hangup_call("ws", &healthy_id),
    );
    let bye_seen = async {
        let bye = healthy.expect("BYE").await;
        healthy.answer_bye(&bye).await;
    };
    let (hung_up, ()) = tokio::join!(hung_up, bye_seen);
    assert!(hung_up.expect("hangup within 10 s").expect("hangup"));
    let (_, _, cause) = wait_for(&calls, HEALTHY, "completed").await;
    assert_eq!(cause.as_deref(), Some("api_hangup"));
    // Another workspace cannot hang up a call it does not own.
    assert!(!engine.hangup_call("other", &healthy_id).await.unwrap());

    // A BYE that overtakes a lost ACK: the caller had our 200, so the call was answered.
    let hasty = Uac::new(sip, HEALTHY).await;
    hasty.invite().await;
    let ok = hasty.expect("200 OK").await;
    hasty.bye(&ok).await;
    hasty.expect("200 OK").await;
    calls
        .calls
        .lock()
        .unwrap()
        .retain(|id, _| *id != healthy_id);
    let (hasty_id, _, cause) = wait_for(&calls, HEALTHY, "completed").await;
    assert_eq!(cause.as_deref(), Some("caller_hangup"));
    assert!(calls.answered.lock().unwrap().contains(&hasty_id));
    engine.stop().await;
}

/// Ractor hands Calls a child's failure before that child's queued messages. On one thread, a
/// Call actor that sends its first snapshot and fails in the same step has both waiting when
/// Calls next runs; Calls must still end the call from that snapshot, and keep nothing of it.
#[tokio::test]
async fn a_call_failing_right_after_its_snapshot_is_ended_and_forgotten() {
    let calls = Arc::new(MemCalls::default());
    let engine = start_engine(&calls, (31_500, 31_600), 1).await;
    let sip = engine.sip_addr().expect("SIP is bound");

    let uac = Uac::new(sip, FAILS_AT_END).await;
    uac.invite().await;
    uac.expect("480").await;
    let (_, reason, _) = wait_for(&calls, FAILS_AT_END, "failed").await;
    assert_eq!(reason.as_deref(), Some("engine.error"));
    assert_eq!(engine.live_calls().await.expect("live calls"), 0);
    engine.stop().await;
}

/// A Call actor that fails before its first snapshot (Calls knows nothing of its call): the
/// endpoint answers its INVITE `500` and forgets its dialog, so the same Call-ID is a new call
/// again (not `482`, a loop) and nothing of it is left behind.
#[tokio::test]
async fn a_call_failing_before_its_first_snapshot_is_answered_and_forgotten() {
    let calls = Arc::new(MemCalls::default());
    let engine = start_engine(&calls, (32_200, 32_300), 1).await;
    let sip = engine.sip_addr().expect("SIP is bound");
    let uac = Uac::new(sip, FAILS_AT_START).await;
    uac.invite().await;
    uac.expect("500").await;
    uac.invite_on("z9hG4bKagain").await;
    uac.expect("500").await;
    assert_eq!(engine.live_calls().await.expect("live calls"), 0);
    engine.stop().await;
}

/// A Call actor that fails with a bridged device leg: Calls ends both legs from its snapshot,
/// BYE to the caller and BYE to the device, and records the call failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_call_actor_ends_its_device_leg_too() {
    let calls = Arc::new(MemCalls::default());
    let device = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let devices = Arc::new(NoDevices(
        Mutex::new(Some(device.local_addr().unwrap())),
        Default::default(),
    ));
    let engine = start_engine_with(&calls, (31_600, 31_700), 1, devices).await;
    let sip = engine.sip_addr().expect("SIP is bound");
    let caller = Uac::new(sip, RINGS_DEVICE).await;
    caller.invite().await;

    // The device gets the INVITE and answers it.
    let (invite, from) = device_recv(&device).await;
    assert!(invite.starts_with("INVITE "), "{invite}");
    let me = device.local_addr().unwrap();
    let answer = format!(
        "v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n",
        me.port() + 2
    );
    let mut ok = String::from("SIP/2.0 200 OK\r\n");
    for name in ["Via", "From", "Call-ID", "CSeq"] {
        ok.push_str(&format!("{name}: {}\r\n", header(&invite, name).unwrap()));
    }
    ok.push_str(&format!(
        "To: {};tag=desk\r\nContact: <sip:desk@{me}>\r\nContent-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{answer}",
        header(&invite, "To").unwrap(),
        answer.len()
    ));
    device.send_to(ok.as_bytes(), from).await.unwrap();

    // The caller is answered, and its ACK makes the actor fail.
    let ok = caller.expect("200 OK").await;
    caller.ack(&ok).await;
    let bye = caller.expect("BYE").await;
    caller.answer_bye(&bye).await;
    let bye_at_device = loop {
        let (m, _) = device_recv(&device).await;
        if m.starts_with("BYE ") {
            break m;
        }
        assert!(m.starts_with("ACK "), "{m}");
    };
    assert_eq!(
        header(&bye_at_device, "Call-ID"),
        header(&invite, "Call-ID")
    );
    assert!(
        header(&bye_at_device, "To").unwrap().contains("tag=desk"),
        "{bye_at_device}"
    );
    let (_, reason, _) = wait_for(&calls, RINGS_DEVICE, "failed").await;
    assert_eq!(reason.as_deref(), Some("engine.error"));
    engine.stop().await;
}

async fn device_recv(device: &UdpSocket) -> (String, SocketAddr) {
    let mut buf = vec![0u8; 65_535];
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), device.recv_from(&mut buf))
        .await
        .expect("a message at the device")
        .unwrap();
    (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
}

/// The database fails while a call's end is written, longer than the Call actor retries: Calls
/// takes the end over and writes it at a later heartbeat (the end carries the charge and frees
/// the call's reservation, so it is never dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_the_database_refused_is_written_later() {
    let calls = Arc::new(MemCalls::default());
    let engine = start_engine(&calls, (31_800, 31_900), 1).await;
    let sip = engine.sip_addr().expect("SIP is bound");
    let caller = Uac::new(sip, END_FAILS).await;
    caller.invite().await;
    let ok = caller.expect("200 OK").await;
    caller.ack(&ok).await;
    wait_for(&calls, END_FAILS, "answered").await;
    caller.bye(&ok).await;
    caller.expect("200 OK").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((_, status, _, cause)) = calls.by_number(END_FAILS)
            && status == "completed"
        {
            assert_eq!(cause.as_deref(), Some("caller_hangup"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the end was never written: {:?}",
            calls.by_number(END_FAILS)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        calls.end_failures.load(std::sync::atomic::Ordering::SeqCst),
        END_FAILURES + 1,
        "four refusals, then one write"
    );
    engine.stop().await;
}

/// A call's start commits but its write reports a failure: the caller is refused `503`, and
/// the row that was written after all does not stay `ringing`: Calls ends it at a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_written_unseen_is_ended() {
    let calls = Arc::new(MemCalls::default());
    let engine = start_engine(&calls, (32_100, 32_200), 1).await;
    let sip = engine.sip_addr().expect("SIP is bound");
    let caller = Uac::new(sip, START_UNSEEN).await;
    caller.invite().await;
    let refused = caller.expect("503 Service Unavailable").await;
    assert!(refused.contains("Retry-After: 5"), "{refused}");
    let (_, reason, cause) =
        wait_within(&calls, START_UNSEEN, "failed", Duration::from_secs(30)).await;
    assert_eq!(reason.as_deref(), Some("storage.unavailable"));
    assert_eq!(cause, None);
    engine.stop().await;
}

/// REGISTERs that pile up behind a stalled database: past the limit, new ones are answered `503`
/// with a `Retry-After` of 5–14 s at once, so devices come back later instead of retransmitting
/// into the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_past_the_pending_limit_are_told_to_retry_later() {
    let calls = Arc::new(MemCalls::default());
    let devices = Arc::new(NoDevices::default());
    devices.1.store(true, std::sync::atomic::Ordering::SeqCst);
    let engine = start_engine_shedding(&calls, (32_000, 32_100), 1, devices, 3).await;
    let sip = engine.sip_addr().expect("SIP is bound");
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    for i in 0..4 {
        let register = format!(
            "REGISTER sip:{sip} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKshed{i}\r\n\
             From: <sip:ts_0000000{i}@{sip}>;tag=t{i}\r\nTo: <sip:ts_0000000{i}@{sip}>\r\n\
             Call-ID: shed-{i}\r\nCSeq: 1 REGISTER\r\nContact: <sip:dev@{me}>\r\n\
             Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        sock.send_to(register.as_bytes(), sip).await.unwrap();
    }
    // Three wait on the store; the fourth is shed at once. Nothing else is answered.
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .expect("an answer to the fourth REGISTER")
        .unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("SIP/2.0 503"), "{msg}");
    assert_eq!(header(&msg, "Call-ID").as_deref(), Some("shed-3"), "{msg}");
    let after: u32 = header(&msg, "Retry-After")
        .expect("Retry-After")
        .trim()
        .parse()
        .expect("seconds");
    assert!((5..=14).contains(&after), "{msg}");
    let more = tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await;
    assert!(
        more.is_err(),
        "the waiting REGISTERs are not answered while the store stalls"
    );
    engine.stop().await;
}
