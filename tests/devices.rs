//! Real softphones as devices: Debian's baresip 1.0.0 registering with the registrar over UDP and
//! TCP, driven headless through tests/common/baresip.rs.
//!
//! This baresip (libre 1.1) answers MD5 digest challenges only, and refuses a whole 401 that holds
//! any SHA-256 challenge. The server therefore runs with `SAUTIKIT_SIP_DIGEST_ALGORITHMS=MD5`
//! here, except in the test that shows why that setting exists.
//!
//! It also answers a call to the number as a device: the caller is a hand-made UDP caller with
//! an RTP peer (tests/common/peer.rs), and audio is checked both ways, what the caller hears
//! from baresip's WAV source and what baresip records of the caller's frames.
//!
//! baresip is needed: with `SAUTIKIT_REQUIRE_BARESIP=1` (scripts/test.sh) a missing baresip fails
//! the tests; without it they print a note and return.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::baresip::{self, Baresip, BaresipConfig};
use common::peer::{RtpPeer, SipCaller, frame_index, sdp, sdp_rtp};
use common::receiver::Receiver;
use common::uac::status_code;
use common::{Api, Backend, Mode, Server, TestDb, wait_for_json};
use sautikit_sip::rtp::{RtpHeader, g711};
use sautikit_sip::sdp::Codec;
use serde_json::{Value, json};

const NUMBER: &str = "254700000001";
const MD5_ONLY: &[(&str, &str)] = &[("SAUTIKIT_SIP_DIGEST_ALGORITHMS", "MD5")];

struct Ctx {
    // Fields drop in order: the server stops before its database goes.
    server: Server,
    api: Api,
    number_id: String,
    /// Receives the number's call events (no voice callback: calls ring the devices).
    events: Receiver,
    /// Source WAVs and the phones' `sndfile` recordings.
    scratch: tempfile::TempDir,
    _db: TestDb,
}

async fn setup(backend: Backend, env: &[(&str, &str)]) -> Ctx {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, env);
    let (_, key) = db.workspace("devices", 100_000);
    let api = server.api(&key);
    let number_id = common::device::claim(&api, common::device::FIRST_INVENTORY_ID).await;
    let events = Receiver::ok().await;
    let routed = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({"events_url": events.url("/events")}),
        )
        .await;
    assert_eq!(routed.status, 200, "{}", routed.text);
    Ctx {
        server,
        api,
        number_id,
        events,
        scratch: tempfile::tempdir().expect("temp dir"),
        _db: db,
    }
}

impl Ctx {
    /// A new credential: (id, username, password).
    async fn credential(&self, label: &str) -> (String, String, String) {
        common::device::new_credential(&self.api, &self.number_id, label).await
    }

    async fn registrations(&self) -> Vec<Value> {
        common::device::registrations(&self.api, &self.number_id).await
    }

    /// A baresip that starts registering with the server at once, AOR `sip:{user}@127.0.0.1`,
    /// answering calls by itself with a 440 Hz tone.
    async fn phone(&self, transport: &'static str, user: &str, password: &str) -> Baresip {
        self.phone_playing(transport, user, password, None).await
    }

    /// [`Ctx::phone`] with `source_wav` as its microphone.
    async fn phone_playing(
        &self,
        transport: &'static str,
        user: &str,
        password: &str,
        source_wav: Option<PathBuf>,
    ) -> Baresip {
        Baresip::start(BaresipConfig {
            registrar: self.server.sip_addr(),
            transport,
            username: user.to_owned(),
            password: password.to_owned(),
            domain: "127.0.0.1".to_owned(),
            source_wav,
            record_dir: self
                .scratch
                .path()
                .join(format!("rec-{}", uuid::Uuid::now_v7().simple())),
            auto_answer: true,
        })
        .await
        .expect("start baresip")
    }
}

async fn baresip_registers_with_md5_and_is_listed(backend: Backend) {
    if !baresip::present_or_required("baresip_registers_with_md5_and_is_listed") {
        return;
    }
    let ctx = setup(backend, MD5_ONLY).await;
    let (cred_id, user, password) = ctx.credential("softphone").await;

    // Over UDP: baresip sends from the address it listens on.
    let udp = ctx.phone("udp", &user, &password).await;
    udp.wait_registered()
        .await
        .expect("baresip registers over UDP");
    let regs = ctx.registrations().await;
    assert_eq!(regs.len(), 1, "{regs:#?}");
    let r = &regs[0];
    assert_eq!(r["transport"], "udp", "{r:#}");
    assert_eq!(r["source"], udp.sip_addr().to_string(), "{r:#}");
    // baresip's Contact user is `USER-0x<pointer>`, at the address it listens on.
    let contact = r["contact"].as_str().unwrap_or_default();
    assert!(
        contact.starts_with(&format!("sip:{user}-"))
            && contact.ends_with(&format!("@{}", udp.sip_addr())),
        "{r:#}"
    );
    assert!(
        r["user_agent"]
            .as_str()
            .is_some_and(|ua| ua.contains("baresip")),
        "{r:#}"
    );
    assert_eq!(r["credential_id"], cred_id.as_str(), "{r:#}");
    assert_eq!(r["credential_label"], "softphone", "{r:#}");
    assert_eq!(r["number_id"], ctx.number_id.as_str(), "{r:#}");

    // A second phone over TCP, same credential: two bindings, one of each.
    let tcp = ctx.phone("tcp", &user, &password).await;
    tcp.wait_registered()
        .await
        .expect("baresip registers over TCP");
    let regs = ctx.registrations().await;
    assert_eq!(regs.len(), 2, "{regs:#?}");
    let by = |t: &str| {
        let of: Vec<&Value> = regs.iter().filter(|r| r["transport"] == t).collect();
        assert_eq!(of.len(), 1, "one {t} binding: {regs:#?}");
        of[0].clone()
    };
    let (u, t) = (by("udp"), by("tcp"));
    assert_eq!(u["source"], udp.sip_addr().to_string(), "{u:#}");
    // baresip opens the TCP connection from an ephemeral port, not the one it listens on (which
    // its Contact names): the source is that connection's far end.
    let tcp_source: std::net::SocketAddr = t["source"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a socket address: {t:#}"));
    assert_eq!(tcp_source.ip(), tcp.sip_addr().ip(), "{t:#}");
    assert_ne!(tcp_source, udp.sip_addr(), "{t:#}");
    assert!(
        t["contact"]
            .as_str()
            .is_some_and(|c| c.ends_with(&format!("@{};transport=tcp", tcp.sip_addr()))),
        "{t:#}"
    );
    for r in [&u, &t] {
        assert!(
            r["user_agent"]
                .as_str()
                .is_some_and(|ua| ua.contains("baresip")),
            "{r:#}"
        );
        assert_eq!(r["credential_label"], "softphone", "{r:#}");
    }

    // Rotating the credential ends both registrations at once.
    let rotated = ctx
        .api
        .post(
            &format!(
                "/v1/numbers/{}/sip-credentials/{cred_id}/rotate",
                ctx.number_id
            ),
            None,
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let regs = ctx.registrations().await;
    assert!(regs.is_empty(), "rotation leaves no binding: {regs:#?}");
}
on_both_backends!(baresip_registers_with_md5_and_is_listed);

/// Why `SAUTIKIT_SIP_DIGEST_ALGORITHMS` exists: with the default challenges (SHA-256, then MD5)
/// this baresip gives up on the whole 401, though an MD5 challenge is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_with_default_challenges_fails_clearly() {
    if !baresip::present_or_required("baresip_with_default_challenges_fails_clearly") {
        return;
    }
    let ctx = setup(Backend::Sqlite, &[]).await;
    let (_, user, password) = ctx.credential("softphone").await;
    let phone = ctx.phone("udp", &user, &password).await;
    let why = phone
        .wait_register_failed()
        .await
        .expect("baresip 1.0 cannot answer a 401 that offers SHA-256");
    // libre 1.1 fails the 401 with ENOSYS before it looks for the MD5 challenge.
    assert!(
        why.contains("Function not implemented"),
        "REGISTER_FAIL {why:?}\n{}",
        phone.log_tail(60)
    );
    let regs = ctx.registrations().await;
    assert!(regs.is_empty(), "{regs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_from_baresip_is_refused() {
    if !baresip::present_or_required("wrong_password_from_baresip_is_refused") {
        return;
    }
    let ctx = setup(Backend::Sqlite, MD5_ONLY).await;
    let (_, user, _) = ctx.credential("softphone").await;
    let phone = ctx.phone("udp", &user, "not-the-password").await;
    let why = phone
        .wait_register_failed()
        .await
        .expect("a wrong password is refused");
    assert!(
        why.contains("403"),
        "REGISTER_FAIL {why:?}\n{}",
        phone.log_tail(60)
    );
    let regs = ctx.registrations().await;
    assert!(regs.is_empty(), "{regs:#?}");
}

/// The source tone: 700 Hz at amplitude 10 000 (about -10 dBFS), 8 kHz 16-bit mono. baresip
/// hangs up when its source WAV ends, so it lasts longer than any call here.
const TONE_HZ: f64 = 700.0;
const TONE_AMPLITUDE: f64 = 10_000.0;
const TONE_SECS: u32 = 8;
/// How long the caller talks (20 ms frames): 3 s.
const TALK_FRAMES: u32 = 150;

/// Writes a mono 16-bit PCM WAV.
fn write_wav(path: &Path, sample_rate: u32, samples: &[i16]) {
    let data_len = (samples.len() * 2) as u32;
    let mut b = Vec::with_capacity(44 + samples.len() * 2);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&sample_rate.to_le_bytes());
    b.extend_from_slice(&(sample_rate * 2).to_le_bytes()); // bytes per second
    b.extend_from_slice(&2u16.to_le_bytes()); // block align
    b.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b).expect("write the source WAV");
}

fn tone_wav(path: &Path) {
    let rate = 8000u32;
    let samples: Vec<i16> = (0..rate * TONE_SECS)
        .map(|n| {
            let t = f64::from(n) / f64::from(rate);
            // A small phase offset keeps samples off exact zero.
            (TONE_AMPLITUDE * (2.0 * std::f64::consts::PI * TONE_HZ * t + 0.3).sin()) as i16
        })
        .collect();
    write_wav(path, rate, &samples);
}

fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / samples.len() as f64).sqrt()
}

/// Sign changes (ignoring exact zeros).
fn zero_crossings(samples: &[i16]) -> usize {
    let mut last = 0i16;
    let mut n = 0;
    for &s in samples.iter().filter(|s| **s != 0) {
        if last != 0 && (last < 0) != (s < 0) {
            n += 1;
        }
        last = s;
    }
    n
}

/// Every RTP packet `peer` gets for `wait`, or until `want` packets: (header, decoded audio).
async fn receive_audio(peer: &RtpPeer, want: usize, wait: Duration) -> Vec<(RtpHeader, Vec<i16>)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while out.len() < want {
        let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, peer.sock.recv_from(&mut buf)).await
        else {
            break;
        };
        let Ok((h, payload)) = RtpHeader::parse(&buf[..n]) else {
            continue;
        };
        let mut pcm = Vec::with_capacity(160);
        if h.payload_type == peer.codec.payload_type() {
            g711::decode_into(peer.codec, payload, &mut pcm);
        }
        out.push((h, pcm));
    }
    out
}

/// Packets whose audio is clearly not silence.
fn loud(got: &[(RtpHeader, Vec<i16>)]) -> usize {
    got.iter()
        .filter(|(_, pcm)| pcm.len() == 160 && rms(pcm) > TONE_AMPLITUDE / 4.0)
        .count()
}

impl Ctx {
    /// The newest call, once it is `completed` and is not `not`.
    async fn newest_completed_call(&self, not: Option<&str>) -> Value {
        let v = wait_for_json(
            &self.api,
            "/v1/calls?limit=1",
            Duration::from_secs(15),
            |v| v[0]["status"] == "completed" && not.is_none_or(|id| v[0]["id"] != id),
        )
        .await;
        v[0].clone()
    }

    fn event_kinds(&self) -> Vec<String> {
        self.events
            .hits()
            .iter()
            .map(|h| h.json()["event_kind"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    async fn wait_completed_events(&self, n: usize) -> Vec<String> {
        self.events
            .wait_until(Duration::from_secs(10), |h| {
                h.iter()
                    .filter(|h| h.json()["event_kind"] == "call.completed")
                    .count()
                    >= n
            })
            .await;
        self.event_kinds()
    }
}

/// baresip as the number's device: it rings, answers by itself and is bridged to the caller.
/// The caller hears baresip's 700 Hz WAV source; baresip records the caller's frames. The
/// caller hangs up the first call, baresip the second.
async fn baresip_answers_a_call_and_audio_flows_both_ways(backend: Backend) {
    if !baresip::present_or_required("baresip_answers_a_call_and_audio_flows_both_ways") {
        return;
    }
    let ctx = setup(backend, MD5_ONLY).await;
    let (_, user, password) = ctx.credential("softphone").await;
    let wav = ctx.scratch.path().join("tone.wav");
    tone_wav(&wav);
    let phone = ctx.phone_playing("udp", &user, &password, Some(wav)).await;
    phone.wait_registered().await.expect("baresip registers");

    // The caller hangs up.
    let caller_rtp = RtpPeer::new(Codec::Pcmu, 0x1111_1111).await;
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    let (provisional, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert!(
        provisional.contains(&180),
        "the caller heard ringing: {provisional:?}\n{}",
        phone.log_tail(80)
    );
    assert_eq!(status_code(&ok), Some(200), "{ok}\n{}", phone.log_tail(80));
    let ours_for_caller = sdp_rtp(&ok).expect("an SDP answer to the caller");
    caller.ack().await;
    phone
        .wait_event("CALL_ESTABLISHED")
        .await
        .expect("baresip answered");

    let ((), got) = tokio::join!(
        caller_rtp.send_frames(ours_for_caller, 0, TALK_FRAMES),
        receive_audio(
            &caller_rtp,
            TALK_FRAMES as usize,
            Duration::from_millis(20 * u64::from(TALK_FRAMES)),
        ),
    );
    // What the caller heard: baresip's tone, in PCMU, one stream without gaps.
    let loud_packets = loud(&got);
    assert!(
        loud_packets >= 100,
        "the caller heard {loud_packets} loud packets of {} in 3 s\n{}",
        got.len(),
        phone.log_tail(80)
    );
    assert!(
        got.iter().all(|(h, _)| h.payload_type == 0),
        "PCMU only: {:?}",
        got.iter()
            .map(|(h, _)| h.payload_type)
            .collect::<HashSet<_>>()
    );
    let ssrcs: HashSet<u32> = got.iter().map(|(h, _)| h.ssrc).collect();
    assert_eq!(ssrcs.len(), 1, "the caller sees one SSRC: {ssrcs:?}");
    let seqs: Vec<u16> = got.iter().map(|(h, _)| h.sequence).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
        "contiguous sequence numbers: {seqs:?}"
    );
    // The tone's pitch, from sign changes over the whole stream (its packets are contiguous).
    let stream: Vec<i16> = got
        .iter()
        .flat_map(|(_, pcm)| pcm.iter().copied())
        .collect();
    let hz = zero_crossings(&stream) as f64 / 2.0 / (stream.len() as f64 / 8000.0);
    assert!(
        (TONE_HZ - 20.0..=TONE_HZ + 20.0).contains(&hz),
        "the caller hears about {TONE_HZ} Hz, not {hz:.0} Hz"
    );
    let level = rms(&got
        .iter()
        .flat_map(|(_, pcm)| pcm.clone())
        .collect::<Vec<_>>());
    assert!(
        level > TONE_AMPLITUDE * 0.5,
        "the tone arrives at its level (RMS {level:.0}, sent about {:.0})",
        TONE_AMPLITUDE / 2f64.sqrt()
    );

    caller.bye().await;
    let closed = phone.wait_closed().await.expect("baresip's call ends");
    assert_eq!(
        closed["param"], "Connection reset by peer",
        "baresip got the BYE (not the end of its WAV): {closed}"
    );
    let rec = phone.wait_recording().await.expect("baresip's recording");
    let heard = baresip::read_wav(&rec.heard).expect("the heard WAV");
    assert_eq!((heard.sample_rate, heard.channels), (8000, 1));
    // The caller's square-wave frames are loud: count loud 20 ms windows.
    let loud_windows = heard
        .samples
        .chunks_exact(160)
        .filter(|w| rms(w) > 4000.0)
        .count();
    assert!(
        loud_windows >= 100,
        "baresip heard {loud_windows} loud 20 ms windows in {:?} (RMS {:.0})",
        heard.duration(),
        heard.rms()
    );
    // The numbered frames themselves, read back at the best alignment: in order.
    let frames = (0..160)
        .map(|offset| {
            heard.samples[offset.min(heard.samples.len())..]
                .chunks_exact(160)
                .filter_map(|w| {
                    let mut bytes = Vec::with_capacity(160);
                    g711::encode_into(Codec::Pcmu, w, &mut bytes);
                    frame_index(Codec::Pcmu, &bytes)
                })
                .collect::<Vec<u32>>()
        })
        .max_by_key(Vec::len)
        .unwrap_or_default();
    assert!(
        frames.len() >= 100 && frames.windows(2).all(|w| w[1] > w[0]),
        "baresip heard the caller's frames in order: {frames:?}"
    );
    let sent = baresip::read_wav(&rec.sent).expect("the sent WAV");
    assert!(sent.rms() > TONE_AMPLITUDE / 4.0, "RMS {}", sent.rms());

    let call = ctx.newest_completed_call(None).await;
    assert_eq!(call["direction"], "inbound", "{call}");
    assert_eq!(call["to"], format!("+{NUMBER}"), "{call}");
    assert!(call["answered_at"].is_string(), "{call}");
    assert_eq!(call["hangup_cause"], "caller_hangup", "{call}");
    let first_id = call["id"].as_str().unwrap().to_owned();
    let kinds = ctx.wait_completed_events(1).await;
    assert_eq!(
        kinds,
        ["call.started", "call.answered", "call.completed"],
        "{kinds:?}"
    );

    // baresip hangs up: the caller gets the BYE.
    let caller_rtp = RtpPeer::new(Codec::Pcmu, 0x3333_3333).await;
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    let (provisional, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert!(provisional.contains(&180), "{provisional:?}");
    assert_eq!(status_code(&ok), Some(200), "{ok}\n{}", phone.log_tail(80));
    let ours_for_caller = sdp_rtp(&ok).expect("an SDP answer to the caller");
    caller.ack().await;
    phone
        .wait_event("CALL_ESTABLISHED")
        .await
        .expect("baresip answered again");
    // Talk until the caller hears baresip (at most 2 s).
    let ((), got) = tokio::join!(
        caller_rtp.send_frames(ours_for_caller, 0, 25),
        receive_audio(&caller_rtp, 25, Duration::from_secs(2)),
    );
    assert!(loud(&got) >= 10, "{} packets", got.len());
    phone.hangup().await.expect("hang up");
    let bye = caller.await_bye(Duration::from_secs(10)).await;
    assert!(bye.contains(&caller.call_id), "{bye}");
    let closed = phone.wait_closed().await.expect("baresip's call ends");
    assert_eq!(closed["param"], "Connection reset by user", "{closed}");
    let call = ctx.newest_completed_call(Some(&first_id)).await;
    assert_eq!(call["hangup_cause"], "callee_hangup", "{call}");
    let kinds = ctx.wait_completed_events(2).await;
    assert_eq!(
        kinds,
        [
            "call.started",
            "call.answered",
            "call.completed",
            "call.started",
            "call.answered",
            "call.completed"
        ],
        "{kinds:?}"
    );
}
on_both_backends!(baresip_answers_a_call_and_audio_flows_both_ways);

/// `dial` with `device`: a script puts the caller through to the number's registered baresip
/// (chosen by its credential's label). baresip answers, the caller hears its WAV source, and the
/// dialled leg is a call record of its own under the caller's, billed at the outbound rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_device_rings_a_registered_baresip() {
    if !baresip::present_or_required("dial_device_rings_a_registered_baresip") {
        return;
    }
    let ctx = setup(Backend::Sqlite, MD5_ONLY).await;
    let voice = common::voice::VoiceServer::start().await;
    voice.set_script(
        "/main",
        json!({"actions": [{"dial": {"device": "softphone", "action": "/after"}}]}),
    );
    voice.set_script("/after", json!({"actions": [{"hangup": {}}]}));
    let routed = ctx
        .api
        .patch(
            &format!("/v1/numbers/{}/routing", ctx.number_id),
            json!({"voice_callback_url": voice.url("/main")}),
        )
        .await;
    assert_eq!(routed.status, 200, "{}", routed.text);
    let (_, user, password) = ctx.credential("softphone").await;
    let wav = ctx.scratch.path().join("tone.wav");
    tone_wav(&wav);
    let phone = ctx.phone_playing("udp", &user, &password, Some(wav)).await;
    phone.wait_registered().await.expect("baresip registers");

    let caller_rtp = RtpPeer::new(Codec::Pcmu, 0x2222_2222).await;
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}\n{}", phone.log_tail(80));
    let ours = sdp_rtp(&ok).expect("an SDP answer to the caller");
    caller.ack().await;
    phone
        .wait_event("CALL_ESTABLISHED")
        .await
        .expect("baresip was rung and answered");
    let ((), got) = tokio::join!(
        caller_rtp.send_frames(ours, 0, TALK_FRAMES),
        receive_audio(
            &caller_rtp,
            TALK_FRAMES as usize,
            Duration::from_millis(20 * u64::from(TALK_FRAMES)),
        ),
    );
    let loud_packets = loud(&got);
    assert!(
        loud_packets >= 100,
        "the caller heard baresip: {loud_packets} loud packets of {}\n{}",
        got.len(),
        phone.log_tail(80)
    );
    caller.bye().await;
    phone.wait_closed().await.expect("baresip's call ends");
    let parent = wait_for_json(
        &ctx.api,
        "/v1/calls?limit=5",
        Duration::from_secs(15),
        |v| {
            v.as_array().is_some_and(|calls| {
                calls
                    .iter()
                    .any(|c| c["parent_call_id"].is_null() && c["status"] == "completed")
                    && calls
                        .iter()
                        .any(|c| c["parent_call_id"].is_string() && c["status"] == "completed")
            })
        },
    )
    .await;
    let calls = parent.as_array().expect("calls");
    let child = calls
        .iter()
        .find(|c| c["parent_call_id"].is_string())
        .expect("the dialled leg's record");
    let top = calls
        .iter()
        .find(|c| c["parent_call_id"].is_null())
        .expect("the caller's record");
    assert_eq!(child["parent_call_id"], top["id"], "{child}");
    assert_eq!(child["direction"], "outbound", "{child}");
    assert!(child["duration_seconds"].as_i64().unwrap() >= 2, "{child}");
    assert!(child["cost_minor"].as_i64().unwrap() > 0, "{child}");
}
