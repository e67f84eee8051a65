//! Calls end to end: a dev server with a claimed number routed to a local voice-callback server
//! and events receiver, and sipp (Debian `sip-tester`) as the caller.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use super::receiver::Receiver;
use super::voice::VoiceServer;
use super::{Api, Backend, Mode, Server, TestDb, dev_key, wait_for_json};

pub const NUMBER: &str = "254700000001";
pub const INVENTORY_ID: &str = "01900000-0000-7000-8000-000000000001";

pub struct Ctx {
    pub db: TestDb,
    pub server: Server,
    pub api: Api,
    pub number_id: String,
    pub voice: VoiceServer,
    pub events: Receiver,
    pub secret: String,
}

/// A dev server with +254700000001 claimed and routed to `voice_path` on a local callback
/// server, its events to a local receiver.
pub async fn setup(backend: Backend, voice_path: &str) -> Ctx {
    setup_with(backend, voice_path, &[]).await
}

/// As [`setup`], the server started with these settings besides the usual ones.
pub async fn setup_with(backend: Backend, voice_path: &str, env: &[(&str, &str)]) -> Ctx {
    let db = TestDb::new(backend).await;
    let server = start_server_with(&db, env);
    let api = server.api(&dev_key(&db.data_dir));
    let (number_id, voice, events) = claim_and_route(&api, INVENTORY_ID, voice_path).await;
    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(db.data_dir.join("dev-credentials.json")).unwrap(),
    )
    .unwrap();
    let secret = creds["webhook_secret"].as_str().unwrap().to_owned();
    Ctx {
        db,
        server,
        api,
        number_id,
        voice,
        events,
        secret,
    }
}

pub fn start_server(db: &TestDb) -> Server {
    start_server_with(db, &[])
}

pub fn start_server_with(db: &TestDb, extra: &[(&str, &str)]) -> Server {
    let rtp = rtp_range();
    let mut env = vec![
        ("SAUTIKIT_SIP_LISTEN", "127.0.0.1:0"),
        ("SAUTIKIT_RTP_PORTS", rtp.as_str()),
        ("SAUTIKIT_WEBHOOK_RETRY_SCALE", "0.001"),
        // A dead engine's calls are closed after 2 s (PostgreSQL, several engines).
        ("SAUTIKIT_CALL_ORPHAN_SECS", "2"),
        // Deliveries a killed process had leased are taken over after 4 s (PostgreSQL).
        ("SAUTIKIT_WEBHOOK_LEASE_SECS", "4"),
        // A debug build on a shared 2-core machine sets calls up slower than a release build's
        // admission target: these tests are about what happens to the calls taken, so they are
        // all taken (admission by latency has its own tests and its benchmark).
        ("SAUTIKIT_SETUP_TARGET_MS", "1000"),
    ];
    env.extend_from_slice(extra);
    Server::start_with(db, Mode::Dev, &env)
}

/// Tests run in parallel: each server takes RTP ports from its own stretch.
pub fn rtp_range() -> String {
    let base = 20_000 + (std::process::id() % 50) as u16 * 200 + free_port() % 150 * 2;
    format!("{}-{}", base, base + 400)
}

pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Run sipp to `target` with `args`, in `dir`; returns (success, output).
/// An RTP port for sipp (`-mp`, which it cannot pick itself): unique within this test process,
/// from a stretch that depends on the process so concurrent test processes rarely meet.
pub fn sipp_media_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Below the ephemeral range (32768+), where clients and servers of the tests bind.
    let base = 10_000 + (std::process::id() % 40) as u16 * 400;
    loop {
        // sipp takes four ports from it: audio and video, RTP and RTCP.
        let port = base + NEXT.fetch_add(4, Ordering::Relaxed) % 400;
        let free = (0..4).all(|i| std::net::UdpSocket::bind(("127.0.0.1", port + i)).is_ok());
        if free {
            return port;
        }
    }
}

pub async fn sipp(dir: &Path, target: SocketAddr, args: &[&str]) -> (bool, String) {
    let media_port = sipp_media_port().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("sipp")
            .current_dir(dir)
            .args(args)
            // sipp picks its own SIP port (5060 or the next free one).
            .args([
                "-mp",
                &media_port,
                "-i",
                "127.0.0.1",
                "-nostdin",
                "-timeout",
                "60s",
                "-timeout_error",
                "-trace_err",
                &target.to_string(),
            ])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("sipp finished within 120 s")
    .expect("sipp runs (scripts/test.sh installs sip-tester)");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().ends_with("_errors.log") {
            text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    (out.status.success(), text)
}

/// sipp as a carrier trunk: a UAS for one call on 127.0.0.1:`port` running `scenario` from
/// `dir`, returned once it listens.
pub async fn sipp_uas(dir: &Path, scenario: &str, port: u16) -> tokio::process::Child {
    let media = sipp_media_port().to_string();
    let port_arg = port.to_string();
    let mut uas = tokio::process::Command::new("sipp")
        .current_dir(dir)
        .args([
            "-sf",
            scenario,
            "-p",
            &port_arg,
            "-i",
            "127.0.0.1",
            "-mp",
            &media,
        ])
        .args(["-m", "1", "-nostdin", "-timeout", "60s", "-timeout_error"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sipp runs (scripts/test.sh installs sip-tester)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        if let Ok(Some(status)) = uas.try_wait() {
            let out = uas.wait_with_output().await.expect("its output");
            panic!(
                "sipp (UAS) exited at start ({status}):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sipp (UAS) did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    uas
}

/// A scenario from tests/sipp with `[status]` filled in, written to `dir`.
pub fn scenario(dir: &Path, name: &str, status: Option<u16>) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sipp")
        .join(name);
    let mut text = std::fs::read_to_string(src).unwrap();
    if let Some(code) = status {
        text = text.replace("[status]", &code.to_string());
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

pub fn verify_signature(secret: &str, header: &str, body: &str) -> bool {
    let parts: std::collections::HashMap<&str, &str> = header
        .split(',')
        .filter_map(|p| p.split_once('='))
        .collect();
    let (Some(t), Some(v1)) = (parts.get("t"), parts.get("v1")) else {
        return false;
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    mac.update(b".");
    mac.update(t.as_bytes());
    hex_encode(&mac.finalize().into_bytes()) == *v1
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn wait_for_calls(api: &Api, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let v = wait_for_json(api, "/v1/calls?limit=100", Duration::from_secs(30), |v| {
        v.as_array()
            .is_some_and(|a| a.iter().filter(|c| pred(c)).count() >= n)
    })
    .await;
    v.as_array().unwrap().clone()
}

pub async fn timeline(api: &Api, call_id: &str) -> Vec<Value> {
    api.get_all(&format!("/v1/calls/{call_id}/events?limit=100"))
        .await
}

/// Every call of the workspace, once none is `ringing` or `answered` (within 60 s).
pub async fn final_calls(api: &Api) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let calls = api.get_all("/v1/calls?limit=100").await;
        let live = calls
            .iter()
            .filter(|c| c["status"] == "ringing" || c["status"] == "answered")
            .count();
        if live == 0 {
            return calls;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{live} of {} calls still live after 60 s",
            calls.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every delivery of the workspace, once none is pending and each of `calls` has its
/// `call.started` and its terminal event (`call.<status>`) among them (within 60 s: events are
/// turned into deliveries by the Events actor after they commit, and a killed engine's share is
/// taken over once its lease runs out). Each delivery must have succeeded.
pub async fn deliveries_of(api: &Api, calls: &[Value]) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let deliveries = api.get_all("/v1/webhooks/deliveries?limit=100").await;
        let mut kinds: std::collections::HashMap<&str, Vec<&str>> = Default::default();
        for d in &deliveries {
            if let (Some(call), Some(kind)) = (d["call_id"].as_str(), d["event_kind"].as_str()) {
                kinds.entry(call).or_default().push(kind);
            }
        }
        let missing = calls.iter().find(|c| {
            let id = c["id"].as_str().unwrap_or_default();
            let terminal = format!("call.{}", c["status"].as_str().unwrap_or_default());
            let of_call = kinds.get(id).map(Vec::as_slice).unwrap_or_default();
            !of_call.contains(&"call.started") || !of_call.contains(&terminal.as_str())
        });
        let pending = deliveries.iter().any(|d| d["status"] == "pending");
        if missing.is_none() && !pending {
            for d in &deliveries {
                assert_eq!(d["status"], "succeeded", "{d}");
            }
            return deliveries;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 60 s: pending deliveries {pending}; a call without its events: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Claims `inventory_id` and routes it to a new voice-callback server at `voice_path` and a new
/// events receiver; returns the number's id with the two servers.
pub async fn claim_and_route(
    api: &Api,
    inventory_id: &str,
    voice_path: &str,
) -> (String, VoiceServer, Receiver) {
    let claimed = api
        .post(&format!("/v1/numbers/{inventory_id}/claim"), None)
        .await;
    assert_eq!(claimed.status, 201, "{}", claimed.text);
    let number_id = claimed.json()["id"].as_str().expect("id").to_owned();
    let voice = VoiceServer::start().await;
    let events = Receiver::ok().await;
    let routed = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({"voice_callback_url": voice.url(voice_path), "events_url": events.url("/events")}),
        )
        .await;
    assert_eq!(routed.status, 200, "{}", routed.text);
    (number_id, voice, events)
}

/// A steady load in the background: sipp's own uac calling `number` at `rate` calls/s, up to
/// `calls` of them, each hung up by sipp after `hold_ms`. Killed when dropped.
pub fn sipp_load(
    dir: &Path,
    target: SocketAddr,
    number: &str,
    rate: u32,
    calls: u32,
    hold_ms: u32,
) -> tokio::process::Child {
    let media_port = sipp_media_port().to_string();
    tokio::process::Command::new("sipp")
        .current_dir(dir)
        .args(["-sn", "uac", "-s", number.trim_start_matches('+')])
        .args(["-r", &rate.to_string(), "-m", &calls.to_string()])
        .args(["-d", &hold_ms.to_string()])
        .args(["-mp", &media_port, "-i", "127.0.0.1", "-nostdin"])
        .arg(target.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sipp runs (scripts/test.sh installs sip-tester)")
}
