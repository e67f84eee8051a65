//! Media on real calls: the guide's FastAPI handler speaks through espeak-ng and the caller hears
//! it; prompts are paced; keys arrive by RFC 4733 (sip-tester's own captures) and SIP INFO; the
//! caller's audio is recorded and served; bad media input fails clearly. Every test runs on SQLite
//! and PostgreSQL.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Backend;
use common::audio::{copy_pcaps, correlation, espeak_reference, pcap_alaw, voiced_span};
use common::caller::{Caller, decode};
use common::calls::{NUMBER, scenario, setup, sipp, wait_for_calls};
use serde_json::{Value, json};

/// The guide's FastAPI handler as the voice callback: the caller hears espeak-ng say the text,
/// then the engine hangs up and `call.completed` reaches the events receiver.
async fn guide_fastapi_handler_speaks(backend: Backend) {
    let ctx = setup(backend, "/unused").await;
    let _uvicorn = common::guide::route_number_to_guide(&ctx).await;
    let sip = ctx.server.sip_addr();
    let packets = tokio::task::spawn_blocking(move || Caller::new(sip).call())
        .await
        .unwrap();
    assert!(packets.len() > 50, "{} RTP packets", packets.len());
    // Sequence numbers step by one, timestamps by 160, one SSRC.
    for w in packets.windows(2) {
        assert_eq!(w[1].header.ssrc, w[0].header.ssrc);
        assert_eq!(w[1].header.sequence, w[0].header.sequence.wrapping_add(1));
        assert_eq!(
            w[1].header.timestamp,
            w[0].header.timestamp.wrapping_add(160)
        );
    }
    let heard = decode(&packets);
    let dir = tempfile::tempdir().unwrap();
    let reference = espeak_reference("Hello, thank you for calling.", "en-us+f2", dir.path());
    let corr = correlation(&reference, &heard, 400);
    let (h0, h1) = voiced_span(&heard).expect("the caller heard speech");
    let (r0, r1) = voiced_span(&reference).unwrap();
    let heard_ms = (h1 - h0) as f64 / 8.0;
    let reference_ms = (r1 - r0) as f64 / 8.0;
    println!(
        "correlation {corr:.3}; spoken {heard_ms:.0} ms heard vs {reference_ms:.0} ms from espeak-ng"
    );
    assert!(corr >= 0.9, "correlation {corr}");
    assert!((heard_ms - reference_ms).abs() <= 100.0);
    let calls = wait_for_calls(&ctx.api, 1, |c| c["status"] == "completed").await;
    assert_eq!(calls[0]["hangup_cause"], "engine_hangup");
    ctx.events
        .wait_until(Duration::from_secs(30), |h| {
            h.iter().any(|h| h.event_kind == "call.completed")
        })
        .await;
}
on_both_backends!(guide_fastapi_handler_speaks);

/// A caller behind a NAT still hears the prompt: the engine sends to where its packets come from.
async fn symmetric_rtp(backend: Backend) {
    let ctx = setup(backend, "/short-say").await;
    ctx.voice.set_script(
        "/short-say",
        json!({"actions": [{"pause": {"length": 1}}, {"say": {"text": "Can you hear me?"}}, {"hangup": {}}]}),
    );
    let sip = ctx.server.sip_addr();
    let packets = tokio::task::spawn_blocking(move || Caller::new(sip).behind_nat().call())
        .await
        .unwrap();
    assert!(
        packets.len() > 50,
        "only {} packets reached the real port",
        packets.len()
    );
    assert!(voiced_span(&decode(&packets)).is_some(), "no speech heard");
}
on_both_backends!(symmetric_rtp);

async fn run_sipp(ctx: &common::calls::Ctx, file: &str, dir: &Path) {
    let (ok, out) = sipp(
        dir,
        ctx.server.sip_addr(),
        &["-sf", file, "-s", NUMBER, "-m", "1"],
    )
    .await;
    assert!(ok, "sipp {file} failed:\n{out}");
}

/// Keys from sip-tester's RFC 4733 captures, pressed during a long nested prompt (barge-in), and
/// from SIP INFO, arrive in `Digits`.
async fn get_digits_from_rfc4733_and_info(backend: Backend) {
    let ctx = setup(backend, "/gather").await;
    ctx.voice.set_script(
        "/gather",
        json!({"actions": [
            {"getDigits": {"numDigits": 3, "timeout": 5, "action": "/digits",
                "nested": [{"say": {"text": "Please enter your three digit code, followed by nothing at all, because we count them for you."}}]}},
            {"say": {"text": "We did not get your code."}}
        ]}),
    );
    ctx.voice
        .set_script("/digits", json!({"actions": [{"hangup": {}}]}));
    let dir = tempfile::tempdir().unwrap();
    copy_pcaps(dir.path());
    let file = scenario(dir.path(), "dtmf_pcap.xml", None);
    run_sipp(&ctx, &file, dir.path()).await;
    let file = scenario(dir.path(), "dtmf_info.xml", None);
    run_sipp(&ctx, &file, dir.path()).await;
    let digits: Vec<String> = ctx
        .voice
        .hits()
        .iter()
        .filter(|h| h.path == "/digits")
        .map(|h| h.fields.get("Digits").cloned().unwrap_or_default())
        .collect();
    assert_eq!(digits, ["123", "456"]);
    let calls = wait_for_calls(&ctx.api, 2, |c| c["status"] == "completed").await;
    let id = calls[0]["id"].as_str().unwrap();
    let events = common::calls::timeline(&ctx.api, id).await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "dtmf.received" && e["detail"]["source"] == "sip_info"),
        "{events:?}"
    );
}
on_both_backends!(get_digits_from_rfc4733_and_info);

async fn recording_wav(ctx: &common::calls::Ctx, call_id: &str) -> Vec<i16> {
    let resp = ctx
        .api
        .request(
            reqwest::Method::GET,
            &format!("/v1/calls/{call_id}/recording"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("audio/wav")
    );
    let raw = resp.bytes().await.unwrap();
    let (rate, channels, samples) = sautikit_sip::wav::parse_wav(&raw).expect("a WAV");
    assert_eq!((rate, channels), (8000, 1));
    samples
}

/// `record` fed with g711a.pcap: the WAV we serve matches what was sent; the silence `timeout`,
/// `maxLength` and `finishOnKey` each end it as specified; `call.recording.ready` and the
/// `Recording*` fields are posted.
async fn record_matches_what_was_said(backend: Backend) {
    let ctx = setup(backend, "/record").await;
    let dir = tempfile::tempdir().unwrap();
    copy_pcaps(dir.path());
    ctx.voice
        .set_script("/recorded", json!({"actions": [{"hangup": {}}]}));
    let sent = pcap_alaw(&dir.path().join("g711a.pcap"));

    // 1. Ends on 2 s of silence after the 7 s capture.
    ctx.voice.set_script(
        "/record",
        json!({"actions": [{"record": {"maxLength": 30, "timeout": 2, "playBeep": false, "action": "/recorded"}}]}),
    );
    let file = scenario(dir.path(), "record_pcap.xml", None);
    run_sipp(&ctx, &file, dir.path()).await;
    let calls = wait_for_calls(&ctx.api, 1, |c| c["status"] == "completed").await;
    let id = calls[0]["id"].as_str().unwrap().to_owned();
    let recorded = recording_wav(&ctx, &id).await;
    let corr = correlation(&sent, &recorded, 800);
    let secs = recorded.len() as f64 / 8000.0;
    println!("silence-ended recording: {secs:.2} s, correlation {corr:.3}");
    assert!(corr >= 0.9, "correlation {corr}");
    assert!((8.5..=11.0).contains(&secs), "{secs} s");
    let hit = ctx
        .voice
        .hits()
        .into_iter()
        .find(|h| h.path == "/recorded")
        .expect("the recording was posted");
    assert!(hit.fields["RecordingUrl"].contains(&format!("/v1/calls/{id}/recording")));
    assert!(!hit.fields["RecordingId"].is_empty());
    let posted: u64 = hit.fields["RecordingDuration"].parse().unwrap();
    assert!((9..=11).contains(&posted), "{posted}");
    let hits = ctx
        .events
        .wait_until(Duration::from_secs(30), |h| {
            h.iter().any(|h| h.event_kind == "call.recording.ready")
        })
        .await;
    let ready = hits
        .iter()
        .find(|h| h.event_kind == "call.recording.ready")
        .unwrap()
        .json();
    assert_eq!(ready["payload"]["call_id"], id.as_str());
    assert_eq!(
        ready["payload"]["recording_id"],
        hit.fields["RecordingId"].as_str()
    );

    // 2. maxLength 2 s cuts it.
    ctx.voice.set_script(
        "/record",
        json!({"actions": [{"record": {"maxLength": 2, "timeout": 0, "playBeep": true, "action": "/recorded"}}]}),
    );
    run_sipp(&ctx, &file, dir.path()).await;
    let calls = wait_for_calls(&ctx.api, 2, |c| c["status"] == "completed").await;
    let recorded = recording_wav(&ctx, calls[0]["id"].as_str().unwrap()).await;
    let secs = recorded.len() as f64 / 8000.0;
    println!("maxLength recording: {secs:.2} s");
    assert!((secs - 2.0).abs() <= 0.05, "{secs} s");

    // 3. # ends it; the key is posted as Digits.
    ctx.voice.set_script(
        "/record",
        json!({"actions": [{"record": {"maxLength": 60, "timeout": 0, "finishOnKey": "#", "playBeep": false, "action": "/recorded"}}]}),
    );
    let file = scenario(dir.path(), "record_pcap_pound.xml", None);
    run_sipp(&ctx, &file, dir.path()).await;
    let calls = wait_for_calls(&ctx.api, 3, |c| c["status"] == "completed").await;
    let recorded = recording_wav(&ctx, calls[0]["id"].as_str().unwrap()).await;
    let secs = recorded.len() as f64 / 8000.0;
    println!("finishOnKey recording: {secs:.2} s");
    assert!((7.0..=8.5).contains(&secs), "{secs} s");
    let last = ctx
        .voice
        .hits()
        .into_iter()
        .rev()
        .find(|h| h.path == "/recorded")
        .unwrap();
    assert_eq!(last.fields["Digits"], "#");
}
on_both_backends!(record_matches_what_was_said);

/// Bad media input: a clear `failure_reason` or validation error, never a hang.
async fn bad_media_input(backend: Backend) {
    let ctx = setup(backend, "/bad").await;
    let dir = tempfile::tempdir().unwrap();
    ctx.voice
        .set_file("/audio/missing.wav", 404, "text/plain", b"gone".to_vec());
    ctx.voice.set_file(
        "/audio/huge.wav",
        200,
        "audio/wav",
        vec![0u8; 17 * 1024 * 1024],
    );
    ctx.voice.set_file(
        "/audio/page.wav",
        200,
        "text/html",
        b"<html><body>Not audio</body></html>".to_vec(),
    );
    let cases: [(Value, &str, u16); 6] = [
        (
            json!({"actions": [{"say": {"text": "Hello", "voice": "nosuchvoice"}}]}),
            "tts.failed",
            200,
        ),
        (
            json!({"actions": [{"play": {"url": "/audio/missing.wav"}}]}),
            "play.http_status",
            200,
        ),
        (
            json!({"actions": [{"play": {"url": "/audio/huge.wav"}}]}),
            "play.too_large",
            200,
        ),
        (
            json!({"actions": [{"play": {"url": "/audio/page.wav"}}]}),
            "play.not_audio",
            200,
        ),
        (
            json!({"actions": [{"say": {"text": "   "}}]}),
            "callback.invalid_actions",
            500,
        ),
        (
            json!({"actions": [{"getDigits": {"numDigits": -1}}]}),
            "callback.invalid_actions",
            500,
        ),
    ];
    for (i, (script, reason, sip_status)) in cases.into_iter().enumerate() {
        ctx.voice.set_script("/bad", script.clone());
        let file = if sip_status == 200 {
            scenario(dir.path(), "answer_wait_bye.xml", None)
        } else {
            scenario(dir.path(), "refused.xml", Some(sip_status))
        };
        run_sipp(&ctx, &file, dir.path()).await;
        let calls = wait_for_calls(&ctx.api, i + 1, |c| c["status"] == "failed").await;
        assert_eq!(calls[0]["failure_reason"], reason, "{script}");
        if reason == "callback.invalid_actions" {
            let events = common::calls::timeline(&ctx.api, calls[0]["id"].as_str().unwrap()).await;
            let text = serde_json::to_string(&events).unwrap();
            let path = if script.to_string().contains("getDigits") {
                "actions[0].getDigits.numDigits"
            } else {
                "actions[0].say.text"
            };
            assert!(text.contains(path), "{path} not in {text}");
        }
    }
}
on_both_backends!(bad_media_input);
