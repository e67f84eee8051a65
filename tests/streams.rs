//! `stream` end to end: a call's live audio over a WebSocket in Twilio's Media Streams protocol.
//! The agent is tests/python/stream_agent.py, written from Twilio's published message format
//! alone (Python `websockets`); the caller is a UDP socket of the test; failures are WebSocket
//! servers of the test that misbehave.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Backend;
use common::audio::{copy_pcaps, correlation, espeak_reference, pcap_alaw, voiced_span};
use common::calls::{Ctx, NUMBER, setup};
use common::peer::{RtpPeer, SipCaller, sdp, sdp_rtp};
use common::uac::status_code;
use sautikit_sip::sdp::Codec;
use serde_json::{Value, json};

/// The Python agent on a free port, logging to a file of the test.
struct Agent {
    port: u16,
    log: PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    async fn start() -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("agent.log");
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("its address").port()
        };
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
        let child = std::process::Command::new(root.join(".venv/bin/python"))
            .arg(root.join("stream_agent.py"))
            .arg(port.to_string())
            .arg(&log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python in tests/python/.venv (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the agent did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Agent {
            port,
            log,
            child,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/media", self.port)
    }

    /// Every line logged so far.
    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Messages received of `event`.
    fn received(&self, event: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["msg"]["event"] == event)
            .collect()
    }

    /// Wait until the log holds a line `pred` accepts.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(Instant::now() < deadline, "the agent never logged {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A call to the number whose script is `script`, answered; the caller's RTP peer and where
/// our RTP comes from.
async fn call(ctx: &Ctx, script: Value, codec: Codec) -> (SipCaller, RtpPeer, SocketAddr) {
    ctx.voice.set_script("/main", script);
    let rtp = RtpPeer::new(codec, 1).await;
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), codec, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    caller.ack().await;
    let ours = sdp_rtp(&ok).expect("our RTP address");
    (caller, rtp, ours)
}

/// Audio without its frames of pure digital silence: those our pacer sends while the agent's
/// next audio has not arrived yet (on a loaded machine the echo comes back unevenly; the gaps are
/// right, but they would shift the comparison with what was sent), and the capture's own.
fn without_gaps(heard: Vec<(SystemTime, Vec<i16>)>) -> Vec<i16> {
    heard
        .into_iter()
        .filter(|(_, pcm)| pcm.iter().any(|&s| s != pcm[0]))
        .flat_map(|(_, pcm)| pcm)
        .collect()
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

async fn timeline(ctx: &Ctx) -> Vec<Value> {
    let calls = ctx.api.get_all("/v1/calls").await;
    let id = calls[0]["id"].as_str().unwrap().to_owned();
    ctx.api.get_all(&format!("/v1/calls/{id}/events")).await
}

/// The agent echoes the caller's audio 200 ms later: the caller, sending sip-tester's
/// g711a.pcap, hears it back. `start` names the call and carries the custom parameters; `stop`
/// arrives when the caller hangs up.
async fn a_twilio_agent_echoes_the_caller(backend: Backend) {
    let ctx = setup(backend, "/main").await;
    let agent = Agent::start().await;
    let (mut caller, rtp, ours) = call(
        &ctx,
        json!({"actions": [{"stream": {"url": agent.url(), "bidirectional": true,
            "customParameters": {"mode": "echo", "customer": "acme"}}}]}),
        Codec::Pcma,
    )
    .await;
    let start = agent
        .wait_for("start", |l| l["msg"]["event"] == "start")
        .await;
    let dir = tempfile::tempdir().unwrap();
    copy_pcaps(dir.path());
    let sent = pcap_alaw(&dir.path().join("g711a.pcap"));
    let (_, heard) = tokio::join!(
        rtp.send_pcm(ours, &sent, 1),
        rtp.receive_timed(Duration::from_millis(sent.len() as u64 / 8 + 1500)),
    );
    let heard = without_gaps(heard);
    let sent = without_gaps(
        sent.chunks(160)
            .map(|c| (SystemTime::now(), c.to_vec()))
            .collect(),
    );
    caller.bye().await;
    let calls = ctx.api.get_all("/v1/calls").await;
    let call_id = calls[0]["id"].as_str().unwrap();
    assert_eq!(start["msg"]["start"]["callSid"], call_id);
    assert_eq!(
        start["msg"]["start"]["customParameters"]["customer"],
        "acme"
    );
    assert_eq!(start["msg"]["start"]["tracks"], json!(["inbound"]));
    assert_eq!(
        start["msg"]["start"]["mediaFormat"]["encoding"],
        "audio/x-mulaw"
    );
    assert!(
        start["msg"]["streamSid"]
            .as_str()
            .is_some_and(|s| s.starts_with("MZ"))
    );
    let corr = correlation(&sent, &heard, 4_000);
    assert!(
        corr >= 0.9,
        "the caller heard itself through the agent: correlation {corr:.3}"
    );
    agent
        .wait_for("stop", |l| l["msg"]["event"] == "stop")
        .await;
    let media = agent.received("media");
    assert!(media.len() >= 100, "{} media messages", media.len());
    // Every message after `connected` is numbered, in order.
    let numbers: Vec<u64> = agent
        .lines()
        .iter()
        .filter(|l| l["msg"]["event"] != "connected")
        .map(|l| {
            l["msg"]["sequenceNumber"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    let events = timeline(&ctx).await;
    assert!(
        events.iter().any(|e| e["kind"] == "stream.started"),
        "{events:#?}"
    );
    let stopped = events
        .iter()
        .find(|e| e["kind"] == "stream.stopped")
        .expect("stream.stopped on the timeline");
    assert!(
        stopped["detail"]["frames_sent"].as_u64().unwrap() >= 100,
        "{stopped}"
    );
    assert!(
        stopped["detail"]["frames_received"].as_u64().unwrap() >= 100,
        "{stopped}"
    );
}
on_both_backends!(a_twilio_agent_echoes_the_caller);

/// 3 s of audio sent at once, then a mark: the mark comes back once the 3 s have played, not at
/// once. `clear` half-way: the caller's audio stops within 40 ms and the mark comes back
/// flagged cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_follow_playout_and_clear_silences_at_once() {
    let ctx = setup(Backend::Sqlite, "/main").await;
    let agent = Agent::start().await;
    let (mut caller, rtp, _) = call(
        &ctx,
        json!({"actions": [{"stream": {"url": agent.url(), "bidirectional": true,
            "customParameters": {"mode": "marks"}}}]}),
        Codec::Pcmu,
    )
    .await;
    let heard = rtp.receive_timed(Duration::from_secs(4)).await;
    let sent = agent
        .wait_for("the tone sent", |l| l["did"] == "sent-tone-and-mark")
        .await;
    let mark = agent
        .wait_for("the mark", |l| l["msg"]["event"] == "mark")
        .await;
    assert_eq!(mark["msg"]["mark"]["name"], "after-tone");
    assert!(mark["msg"]["mark"].get("cleared").is_none(), "{mark}");
    let waited = mark["t"].as_f64().unwrap() - sent["t"].as_f64().unwrap();
    assert!(
        (2.9..=3.1).contains(&waited),
        "the mark came back {waited:.3} s after 3 s of audio"
    );
    let loud = heard
        .iter()
        .filter(|(_, pcm)| pcm.iter().any(|s| s.unsigned_abs() > 2000))
        .count();
    assert!(
        (145..=152).contains(&loud),
        "{loud} frames of the tone heard"
    );
    caller.bye().await;

    // Cleared half-way through.
    let agent = Agent::start().await;
    let (mut caller, rtp, _) = call(
        &ctx,
        json!({"actions": [{"stream": {"url": agent.url(), "bidirectional": true,
            "customParameters": {"mode": "marks", "clear_after_ms": "1500"}}}]}),
        Codec::Pcmu,
    )
    .await;
    let heard = rtp.receive_timed(Duration::from_secs(3)).await;
    let cleared = agent.wait_for("clear", |l| l["did"] == "clear").await;
    let mark = agent
        .wait_for("the mark", |l| l["msg"]["event"] == "mark")
        .await;
    assert_eq!(mark["msg"]["mark"]["cleared"], true, "{mark}");
    let at = cleared["t"].as_f64().unwrap();
    let last_loud = heard
        .iter()
        .filter(|(_, pcm)| pcm.iter().any(|s| s.unsigned_abs() > 2000))
        .map(|(t, _)| unix(*t))
        .fold(0.0, f64::max);
    assert!(last_loud > at - 0.5, "the tone played until the clear");
    assert!(
        last_loud - at <= 0.040,
        "silent {:.1} ms after the clear",
        (last_loud - at) * 1000.0
    );
    caller.bye().await;
}

/// A key pressed by the caller (RFC 4733) reaches the agent as `dtmf`.
#[tokio::test]
async fn dtmf_reaches_the_agent() {
    let ctx = setup(Backend::Sqlite, "/main").await;
    let agent = Agent::start().await;
    let (mut caller, rtp, ours) = call(
        &ctx,
        json!({"actions": [{"stream": {"url": agent.url(), "bidirectional": true,
            "customParameters": {"mode": "listen"}}}]}),
        Codec::Pcmu,
    )
    .await;
    agent
        .wait_for("start", |l| l["msg"]["event"] == "start")
        .await;
    rtp.send_dtmf(ours, 7, 101, 100).await;
    let dtmf = agent
        .wait_for("dtmf", |l| l["msg"]["event"] == "dtmf")
        .await;
    assert_eq!(dtmf["msg"]["dtmf"]["digit"], "7");
    assert_eq!(dtmf["msg"]["dtmf"]["track"], "inbound_track");
    caller.bye().await;
}

/// A fork: the script's `say` runs while the stream carries both tracks; the outbound track is
/// the prompt. `stopStream` ends it before the call does.
#[tokio::test]
async fn a_forked_stream_hears_both_tracks_while_the_script_runs() {
    let ctx = setup(Backend::Sqlite, "/main").await;
    let agent = Agent::start().await;
    let text = "Hello, thank you for calling.";
    let (_caller, rtp, ours) = call(
        &ctx,
        json!({"actions": [
            {"stream": {"url": agent.url(), "track": "both", "customParameters": {"mode": "listen"},
                "statusCallback": "/stream-status"}},
            {"say": {"text": text, "voice": "alice"}},
            {"stopStream": {}},
            {"pause": {"length": 1}},
            {"hangup": {}}
        ]}),
        Codec::Pcmu,
    )
    .await;
    let (_, _) = tokio::join!(
        rtp.send_frames(ours, 0, 100),
        rtp.receive(1000, Duration::from_secs(4)),
    );
    agent
        .wait_for("stop", |l| l["msg"]["event"] == "stop")
        .await;
    let start = agent.received("start");
    assert_eq!(
        start[0]["msg"]["start"]["tracks"],
        json!(["inbound", "outbound"])
    );
    let mut outbound = Vec::new();
    let mut inbound = 0;
    for m in agent.received("media") {
        let payload = m["msg"]["media"]["payload"].as_str().unwrap();
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .unwrap();
        assert_eq!(bytes.len(), 160);
        match m["msg"]["media"]["track"].as_str() {
            Some("outbound") => outbound.extend(
                bytes
                    .iter()
                    .map(|&b| sautikit_sip::rtp::g711::ulaw::decode(b)),
            ),
            Some("inbound") => inbound += 1,
            other => panic!("track {other:?}"),
        }
    }
    assert!(inbound >= 50, "{inbound} inbound frames");
    let dir = tempfile::tempdir().unwrap();
    let reference = espeak_reference(text, "en-us+f2", dir.path());
    assert!(voiced_span(&outbound).is_some());
    let corr = correlation(&reference, &outbound, 400);
    assert!(
        corr >= 0.9,
        "the outbound track is the prompt: correlation {corr:.3}"
    );
    let events = timeline(&ctx).await;
    let stopped = events
        .iter()
        .find(|e| e["kind"] == "stream.stopped")
        .expect("stream.stopped");
    assert_eq!(stopped["detail"]["reason"], "stopped", "{stopped}");
    // The statusCallback heard the start and the stop, signed form posts like every callback.
    let deadline = Instant::now() + Duration::from_secs(10);
    let statuses = loop {
        let statuses: Vec<_> = ctx
            .voice
            .hits()
            .into_iter()
            .filter(|h| h.path == "/stream-status")
            .map(|h| h.fields)
            .collect();
        if statuses.len() >= 2 || Instant::now() > deadline {
            break statuses;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let kinds: Vec<&str> = statuses.iter().map(|f| f["StreamEvent"].as_str()).collect();
    assert_eq!(kinds, ["stream-started", "stream-stopped"], "{statuses:?}");
    assert_eq!(
        statuses[0]["StreamSid"].as_str(),
        start[0]["msg"]["streamSid"].as_str().unwrap()
    );
}

/// 100 calls whose streams fail in every way: afterwards no stream task is left and the
/// server holds no more sockets than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_streams_leave_no_tasks_or_sockets_behind() {
    let ctx = setup(Backend::Sqlite, "/main").await;
    let closed = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let urls = [
        format!("ws://{closed}/"),
        format!("ws://{}/", bad_server("handshake").await),
        format!("ws://{}/", bad_server("garbage").await),
        format!("ws://{}/", bad_server("oversized").await),
    ];
    // Sockets only: the database's files come and go with its read pool's connections.
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", ctx.server.pid()))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        std::fs::read_link(e.path())
                            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let script = |url: &str| json!({"actions": [{"stream": {"url": url, "bidirectional": true}}, {"hangup": {}}]});
    {
        let _c = call(&ctx, script(&urls[0]), Codec::Pcmu).await;
        common::calls::wait_for_calls(&ctx.api, 1, |c| c["status"] == "completed").await;
    }
    let mut before = 0;
    for round in 0..25 {
        if round == 5 {
            // Pools (database connections, callback keep-alives) have grown to what these
            // calls need: from here on the count must not grow.
            before = fds();
        }
        let mut callers = Vec::new();
        for url in &urls {
            callers.push(call(&ctx, script(url), Codec::Pcmu).await);
        }
        // The list shows the newest 100.
        let done = (1 + 4 * (round + 1)).min(100);
        common::calls::wait_for_calls(&ctx.api, done, |c| c["status"] == "completed").await;
    }
    let metrics = ctx.api.get("/metrics").await.text;
    let live = metrics
        .lines()
        .find(|l| l.starts_with("sautikit_media_streams_live"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the live-streams gauge");
    assert_eq!(live, 0.0, "stream tasks left running");
    // Ports and connections of the last calls close as their ends are handled: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = fds();
    while after > before + 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = fds();
    }
    assert!(
        after <= before + 4,
        "sockets: {before} before, {after} after 100 failed streams"
    );
}

/// A WebSocket server of the test that misbehaves in `how`.
async fn bad_server(how: &'static str) -> SocketAddr {
    use futures::SinkExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if how == "handshake" {
                    drop(tcp);
                    return;
                }
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let message = match how {
                    "garbage" => "this is not JSON".to_owned(),
                    _ => "x".repeat(300 * 1024),
                };
                let _ = ws
                    .send(tokio_tungstenite::tungstenite::Message::text(message))
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    addr
}

/// Unreachable, a handshake cut short, garbage JSON, an oversized frame: each ends the stream
/// with its reason on the timeline, and the script goes on with the next action.
#[tokio::test]
async fn failures_end_the_stream_with_a_reason_and_the_script_goes_on() {
    let ctx = setup(Backend::Sqlite, "/main").await;
    let closed = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let cases = [
        (format!("ws://{closed}/"), "stream.unreachable"),
        (
            format!("ws://{}/", bad_server("handshake").await),
            "stream.handshake",
        ),
        (
            format!("ws://{}/", bad_server("garbage").await),
            "stream.invalid_message",
        ),
        (
            format!("ws://{}/", bad_server("oversized").await),
            "stream.message_too_large",
        ),
    ];
    for (i, (url, reason)) in cases.iter().enumerate() {
        let (_caller, _rtp, _) = call(
            &ctx,
            json!({"actions": [
                {"stream": {"url": url, "bidirectional": true}},
                {"hangup": {}}
            ]}),
            Codec::Pcmu,
        )
        .await;
        let calls =
            common::calls::wait_for_calls(&ctx.api, i + 1, |c| c["status"] == "completed").await;
        let id = calls[0]["id"].as_str().unwrap();
        let events = ctx.api.get_all(&format!("/v1/calls/{id}/events")).await;
        let failed = events
            .iter()
            .find(|e| e["kind"] == "stream.failed")
            .unwrap_or_else(|| panic!("stream.failed for {url}: {events:#?}"));
        assert_eq!(failed["detail"]["reason"], *reason, "{failed}");
        // The script went on: the hangup ran.
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "action.started" && e["detail"]["verb"] == "hangup"),
            "{events:#?}"
        );
    }
}

/// On a bridged call (`dial`), `track: both` streams each side as its own track: the caller's
/// voice inbound, the dialled party's (what the caller hears) outbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_tracks_of_a_bridged_call() {
    let trunk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let trunk_uri = format!("sip:{}", trunk.local_addr().unwrap());
    let ctx = common::calls::setup_with(
        Backend::Sqlite,
        "/main",
        &[("SAUTIKIT_OUTBOUND_TRUNK", trunk_uri.as_str())],
    )
    .await;
    let topup = ctx
        .api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": 100_000, "currency": "KES"})),
        )
        .await;
    assert_eq!(topup.status, 201);
    let agent = Agent::start().await;
    let (mut caller, rtp, ours) = call(
        &ctx,
        json!({"actions": [
            {"stream": {"url": agent.url(), "track": "both", "customParameters": {"mode": "listen"}}},
            {"dial": {"number": "+254711000001", "answerOnBridge": true}}
        ]}),
        Codec::Pcmu,
    )
    .await;
    let mut buf = vec![0u8; 65_535];
    let (invite, from) = loop {
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), trunk.recv_from(&mut buf))
            .await
            .expect("an INVITE at the trunk")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.starts_with("INVITE ") {
            break (text, from);
        }
    };
    let party = RtpPeer::new(Codec::Pcma, 2).await;
    let ok = common::peer::reply(
        &invite,
        200,
        "OK",
        "far",
        Some(&sdp(party.addr(), Codec::Pcma, 101)),
    );
    trunk.send_to(ok.as_bytes(), from).await.unwrap();
    let leg = sdp_rtp(&invite).expect("the leg's RTP address");
    tokio::join!(
        rtp.send_frames(ours, 0, 60),
        party.send_frames(leg, 1000, 1060),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    caller.bye().await;
    agent
        .wait_for("stop", |l| l["msg"]["event"] == "stop")
        .await;
    let (mut inbound, mut outbound) = (Vec::new(), Vec::new());
    for m in agent.received("media") {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(m["msg"]["media"]["payload"].as_str().unwrap())
            .unwrap();
        let Some(i) = common::peer::frame_index(Codec::Pcmu, &bytes) else {
            continue;
        };
        match m["msg"]["media"]["track"].as_str() {
            Some("inbound") => inbound.push(i),
            Some("outbound") => outbound.push(i),
            other => panic!("track {other:?}"),
        }
    }
    assert!(
        inbound.iter().filter(|&&i| i < 1000).count() >= 40,
        "caller's frames inbound: {inbound:?}"
    );
    assert!(
        inbound.iter().all(|&i| i < 1000),
        "only the caller inbound: {inbound:?}"
    );
    assert!(
        outbound.iter().filter(|&&i| i >= 1000).count() >= 40,
        "party's frames outbound: {outbound:?}"
    );
    assert!(
        outbound.iter().all(|&i| i >= 1000),
        "only the party outbound: {outbound:?}"
    );
}

/// `mediaFormat: "audio/l16;rate=16000"`: 16-bit PCM at 16 kHz both ways. The echo agent sends
/// back what it got, and the caller hears itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l16_at_16_khz_both_ways() {
    let ctx = setup(Backend::Sqlite, "/main").await;
    let agent = Agent::start().await;
    let (mut caller, rtp, ours) = call(
        &ctx,
        json!({"actions": [{"stream": {"url": agent.url(), "bidirectional": true,
            "mediaFormat": "audio/l16;rate=16000", "customParameters": {"mode": "echo"}}}]}),
        Codec::Pcma,
    )
    .await;
    let start = agent
        .wait_for("start", |l| l["msg"]["event"] == "start")
        .await;
    assert_eq!(
        start["msg"]["start"]["mediaFormat"]["encoding"],
        "audio/l16"
    );
    assert_eq!(start["msg"]["start"]["mediaFormat"]["sampleRate"], 16000);
    let dir = tempfile::tempdir().unwrap();
    copy_pcaps(dir.path());
    let sent = pcap_alaw(&dir.path().join("g711a.pcap"));
    let (_, heard) = tokio::join!(
        rtp.send_pcm(ours, &sent, 1),
        rtp.receive_timed(Duration::from_millis(sent.len() as u64 / 8 + 1500)),
    );
    let heard = without_gaps(heard);
    let sent = without_gaps(
        sent.chunks(160)
            .map(|c| (SystemTime::now(), c.to_vec()))
            .collect(),
    );
    caller.bye().await;
    let media = agent.received("media");
    use base64::Engine as _;
    let first = base64::engine::general_purpose::STANDARD
        .decode(media[0]["msg"]["media"]["payload"].as_str().unwrap())
        .unwrap();
    assert_eq!(first.len(), 640, "20 ms of 16-bit samples at 16 kHz");
    let corr = correlation(&sent, &heard, 4_000);
    assert!(
        corr >= 0.9,
        "the caller heard itself through L16: correlation {corr:.3}"
    );
}
