//! Inbound calls end to end: sipp (Debian `sip-tester`) calls a claimed number on a running
//! server; the number's voice callback and events_url are real HTTP servers in this test.
//! Every test runs on SQLite and PostgreSQL.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::Backend;
use common::calls::{
    NUMBER, scenario, setup, setup_with, sipp, sipp_media_port, start_server, timeline,
    verify_signature, wait_for_calls,
};
use common::dev_key;
use serde_json::json;

async fn sipp_uac_to_a_long_pause(backend: Backend) {
    let ctx = setup(backend, "/pause/60").await;
    let dir = tempfile::tempdir().unwrap();
    // sipp's own uac: INVITE, ACK, 2 s of call, then sipp hangs up with BYE.
    let (ok, out) = sipp(
        dir.path(),
        ctx.server.sip_addr(),
        &[
            "-sn", "uac", "-s", NUMBER, "-m", "5", "-r", "10", "-l", "5", "-d", "2000",
        ],
    )
    .await;
    assert!(ok, "sipp uac failed:\n{out}");
    let calls = wait_for_calls(&ctx.api, 5, |c| c["status"] == "completed").await;
    assert_eq!(calls.len(), 5, "{calls:?}");
    for c in &calls {
        assert_eq!(c["direction"], "inbound");
        assert_eq!(c["to"], "+254700000001");
        assert_eq!(c["number_id"], ctx.number_id.as_str());
        assert_eq!(c["hangup_cause"], "caller_hangup");
        let d = c["duration_seconds"].as_i64().unwrap();
        assert!((2..=4).contains(&d), "duration {d}: {c}");
        assert_eq!(c["cost_minor"], 0, "inbound rate is 0 in dev");
    }
    // The guide's jq shape.
    let first = ctx.api.get("/v1/calls?limit=1").await.json();
    for field in ["direction", "status", "from", "to", "duration_seconds"] {
        assert!(first[0].get(field).is_some(), "missing {field}: {first}");
    }
    // Signed lifecycle events reach the events_url, in order per call.
    let hits = ctx
        .events
        .wait_until(Duration::from_secs(30), |h| {
            h.iter()
                .filter(|h| h.event_kind == "call.completed")
                .count()
                >= 5
        })
        .await;
    for h in &hits {
        assert!(
            verify_signature(&ctx.secret, &h.signature, &h.body),
            "bad signature on {h:?}"
        );
    }
    for c in &calls {
        let id = c["id"].as_str().unwrap();
        let kinds: Vec<String> = hits
            .iter()
            .filter(|h| h.json()["payload"]["call_id"] == id)
            .map(|h| h.event_kind.clone())
            .collect();
        assert_eq!(
            kinds,
            ["call.started", "call.answered", "call.completed"],
            "events of {id}"
        );
        let done = hits
            .iter()
            .find(|h| h.event_kind == "call.completed" && h.json()["payload"]["call_id"] == id)
            .unwrap()
            .json();
        assert_eq!(done["payload"]["status"], "completed");
        assert_eq!(done["payload"]["duration_seconds"], c["duration_seconds"]);
    }
    // The callback got the form fields of DESIGN §6, signed.
    let hit = &ctx.voice.hits()[0];
    assert_eq!(hit.fields["To"], "+254700000001");
    assert_eq!(hit.fields["Direction"], "inbound");
    assert_eq!(hit.fields["CallStatus"], "ringing");
    assert_eq!(hit.fields["NumberId"], ctx.number_id);
    assert!(verify_signature(&ctx.secret, &hit.signature, &hit.body));
    // The timeline shows the SIP exchange and the action.
    let id = calls[0]["id"].as_str().unwrap();
    let entries = timeline(&ctx.api, id).await;
    let kinds: Vec<String> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    for k in [
        "sip.received",
        "callback.succeeded",
        "action.started",
        "sip.sent",
        "call.ended",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    // The pause waits for the ACK and resumes after it: still one start for its one action.
    let started: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["kind"] == "action.started")
        .collect();
    assert_eq!(started.len(), 1, "{started:?}");
    // Codecs are named as in SDP.
    let ok = entries
        .iter()
        .find(|e| e["kind"] == "sip.sent" && e["detail"]["status"] == 200)
        .expect("the 200 in the timeline");
    assert_eq!(ok["detail"]["codec"], "PCMU", "{ok}");
    drop(ctx.db);
}
on_both_backends!(sipp_uac_to_a_long_pause);

async fn engine_hangs_up(backend: Backend) {
    let ctx = setup(backend, "/hangup").await;
    for transport in ["u1", "t1"] {
        let dir = tempfile::tempdir().unwrap();
        let file = scenario(dir.path(), "engine_hangup.xml", None);
        let (ok, out) = sipp(
            dir.path(),
            ctx.server.sip_addr(),
            &["-sf", &file, "-s", NUMBER, "-m", "1", "-t", transport],
        )
        .await;
        assert!(ok, "sipp ({transport}) failed:\n{out}");
    }
    let calls = wait_for_calls(&ctx.api, 2, |c| c["status"] == "completed").await;
    for c in &calls {
        assert_eq!(c["hangup_cause"], "engine_hangup", "{c}");
        assert!(c["duration_seconds"].as_i64().unwrap() >= 1, "{c}");
    }
}
on_both_backends!(engine_hangs_up);

async fn cancel_before_answer(backend: Backend) {
    // The callback takes 3 s, so the call is still ringing when sipp cancels.
    let ctx = setup(backend, "/slow/3000").await;
    let dir = tempfile::tempdir().unwrap();
    let file = scenario(dir.path(), "cancel.xml", None);
    let (ok, out) = sipp(
        dir.path(),
        ctx.server.sip_addr(),
        &["-sf", &file, "-s", NUMBER, "-m", "1"],
    )
    .await;
    assert!(ok, "sipp cancel failed:\n{out}");
    let calls = wait_for_calls(&ctx.api, 1, |c| c["status"] == "canceled").await;
    let id = calls[0]["id"].as_str().unwrap().to_owned();
    let hits = ctx
        .events
        .wait_until(Duration::from_secs(30), |h| {
            h.iter().any(|h| h.event_kind == "call.failed")
        })
        .await;
    let failed = hits
        .iter()
        .find(|h| h.event_kind == "call.failed")
        .unwrap()
        .json();
    assert_eq!(failed["payload"]["call_id"], id.as_str());
    assert_eq!(failed["payload"]["status"], "canceled");
    assert_eq!(calls[0]["duration_seconds"], 0);
}
on_both_backends!(cancel_before_answer);

async fn refused_calls(backend: Backend) {
    let ctx = setup(backend, "/pause/5").await;
    let dir = tempfile::tempdir().unwrap();
    // Nobody has claimed this number.
    let file = scenario(dir.path(), "refused.xml", Some(404));
    let (ok, out) = sipp(
        dir.path(),
        ctx.server.sip_addr(),
        &["-sf", &file, "-s", "254799999999", "-m", "1"],
    )
    .await;
    assert!(ok, "expected 404:\n{out}");
    // The script rejects as busy: 486 and status busy.
    ctx.api
        .patch(
            &format!("/v1/numbers/{}/routing", ctx.number_id),
            json!({"voice_callback_url": ctx.voice.url("/reject-busy")}),
        )
        .await;
    let file = scenario(dir.path(), "refused.xml", Some(486));
    let (ok, out) = sipp(
        dir.path(),
        ctx.server.sip_addr(),
        &["-sf", &file, "-s", NUMBER, "-m", "1"],
    )
    .await;
    assert!(ok, "expected 486:\n{out}");
    wait_for_calls(&ctx.api, 1, |c| c["status"] == "busy").await;
    // No voice callback: 480.
    ctx.api
        .patch(
            &format!("/v1/numbers/{}/routing", ctx.number_id),
            json!({"voice_callback_url": null}),
        )
        .await;
    let file = scenario(dir.path(), "refused.xml", Some(480));
    let (ok, out) = sipp(
        dir.path(),
        ctx.server.sip_addr(),
        &["-sf", &file, "-s", NUMBER, "-m", "1"],
    )
    .await;
    assert!(ok, "expected 480:\n{out}");
}
on_both_backends!(refused_calls);

/// Each broken callback: `500` to the caller, `call.failed` naming why, and the timeline shows it.
async fn callback_failures(backend: Backend) {
    let ctx = setup(backend, "/status500").await;
    let cases = [
        ("/status500", "callback.http_status", "callback.failed"),
        ("/notjson", "callback.invalid_json", "callback.failed"),
        (
            "/unknown-verb",
            "callback.invalid_actions",
            "callback.failed",
        ),
        // `dial` presenting a number the workspace does not hold.
        ("/dial", "callback.invalid_actions", "action.failed"),
        // Longer than the 10 s deadline.
        ("/slow/11000", "callback.timeout", "callback.failed"),
    ];
    let mut seen = std::collections::HashSet::new();
    for (path, reason, timeline_kind) in cases {
        ctx.api
            .patch(
                &format!("/v1/numbers/{}/routing", ctx.number_id),
                json!({"voice_callback_url": ctx.voice.url(path)}),
            )
            .await;
        let dir = tempfile::tempdir().unwrap();
        let file = scenario(dir.path(), "refused.xml", Some(500));
        let (ok, out) = sipp(
            dir.path(),
            ctx.server.sip_addr(),
            &["-sf", &file, "-s", NUMBER, "-m", "1"],
        )
        .await;
        assert!(ok, "{path}: expected 500:\n{out}");
        // Two cases share a reason: each looks at a call not seen before.
        let new = |c: &serde_json::Value| {
            c["failure_reason"] == reason && !seen.contains(c["id"].as_str().unwrap_or_default())
        };
        let calls = wait_for_calls(&ctx.api, 1, new).await;
        let call = calls.iter().find(|c| new(c)).unwrap();
        seen.insert(call["id"].as_str().unwrap_or_default().to_owned());
        assert_eq!(call["status"], "failed", "{path}: {call}");
        let id = call["id"].as_str().unwrap().to_owned();
        let events = timeline(&ctx.api, &id).await;
        assert!(
            events.iter().any(|e| e["kind"] == timeline_kind),
            "{path}: {timeline_kind} not in {events:?}"
        );
        let hits = ctx
            .events
            .wait_until(Duration::from_secs(30), |h| {
                h.iter().any(|h| {
                    h.event_kind == "call.failed" && h.json()["payload"]["call_id"] == id.as_str()
                })
            })
            .await;
        let failed = hits
            .iter()
            .find(|h| {
                h.event_kind == "call.failed" && h.json()["payload"]["call_id"] == id.as_str()
            })
            .unwrap()
            .json();
        assert_eq!(failed["payload"]["failure_reason"], reason, "{path}");
    }
}
on_both_backends!(callback_failures);

/// A server killed with live calls: on restart (SQLite) or once its heartbeat is stale
/// (PostgreSQL) its calls are closed as `failed` with `engine.restart`, with their events.
async fn calls_live_at_a_crash_are_closed(backend: Backend) {
    let ctx = setup(backend, "/pause/60").await;
    let dir = tempfile::tempdir().unwrap();
    let media_port = sipp_media_port().to_string();
    // A 60 s call; sipp is killed with the test.
    let _sipp = tokio::process::Command::new("sipp")
        .current_dir(dir.path())
        .args(["-sn", "uac", "-s", NUMBER, "-m", "1", "-d", "60000"])
        .args(["-mp", &media_port, "-i", "127.0.0.1", "-nostdin"])
        .arg(ctx.server.sip_addr().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sipp runs");
    let calls = wait_for_calls(&ctx.api, 1, |c| c["status"] == "answered").await;
    let id = calls[0]["id"].as_str().unwrap().to_owned();
    ctx.server.kill9();
    let server = start_server(&ctx.db);
    let api = server.api(&dev_key(&ctx.db.data_dir));
    let calls = wait_for_calls(&api, 1, |c| c["failure_reason"] == "engine.restart").await;
    assert_eq!(calls[0]["id"], id.as_str());
    assert_eq!(calls[0]["status"], "failed");
    let hits = ctx
        .events
        .wait_until(Duration::from_secs(30), |h| {
            h.iter().any(|h| h.event_kind == "call.failed")
        })
        .await;
    let failed = hits
        .iter()
        .find(|h| h.event_kind == "call.failed")
        .unwrap()
        .json();
    assert_eq!(failed["payload"]["call_id"], id.as_str());
    assert_eq!(failed["payload"]["failure_reason"], "engine.restart");
}
on_both_backends!(calls_live_at_a_crash_are_closed);

/// `POST /v1/calls/{id}/hangup` ends a live call: our BYE reaches the caller (sipp waits for
/// it), the record is final when the request returns.
async fn api_hangup(backend: Backend) {
    let ctx = setup(backend, "/pause/60").await;
    let dir = tempfile::tempdir().unwrap();
    let file = scenario(dir.path(), "engine_hangup.xml", None);
    let sip = ctx.server.sip_addr();
    let caller = tokio::spawn({
        let dir = dir.path().to_owned();
        async move { sipp(&dir, sip, &["-sf", &file, "-s", NUMBER, "-m", "1"]).await }
    });
    let calls = wait_for_calls(&ctx.api, 1, |c| c["status"] == "answered").await;
    let id = calls[0]["id"].as_str().unwrap().to_owned();
    let r = ctx.api.post(&format!("/v1/calls/{id}/hangup"), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let call = r.json();
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["hangup_cause"], "api_hangup");
    let (ok, out) = caller.await.unwrap();
    assert!(ok, "sipp did not get our BYE:\n{out}");
    // Hanging up again is idempotent: the same final record.
    let again = ctx.api.post(&format!("/v1/calls/{id}/hangup"), None).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json(), call);
}
on_both_backends!(api_hangup);

/// An overloaded engine turns new calls away instead of slowing every call down: with
/// `SAUTIKIT_MAX_CALL_SETUPS=1`, an INVITE that arrives while another call still waits for its
/// voice callback is answered `503` with `Retry-After` and leaves no call behind; once the first
/// call is answered, the next INVITE is taken.
async fn overload_is_answered_503(backend: Backend) {
    use common::uac::{header, sdp_offer_pcmu, status_code};
    let ctx = setup_with(backend, "/slow/1500", &[("SAUTIKIT_MAX_CALL_SETUPS", "1")]).await;
    let server = ctx.server.sip_addr();
    let sip = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sip.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let me = sip.local_addr().unwrap();
    let invite = |call_id: &str| {
        let sdp = sdp_offer_pcmu(me, 1);
        format!(
            "INVITE sip:{NUMBER}@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{call_id}\r\n\
             From: <sip:254711000002@{me}>;tag=t{call_id}\r\nTo: <sip:{NUMBER}@{server}>\r\n\
             Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@{me}>\r\n\
             Max-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        )
    };
    // The next final response to the INVITE of `call_id`, skipping everything else.
    let final_for = |call_id: &str| loop {
        let mut buf = vec![0u8; 65535];
        let (n, _) = sip.recv_from(&mut buf).expect("a SIP message within 10 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if header(&msg, "Call-ID") == Some(call_id) && status_code(&msg).is_some_and(|c| c >= 200) {
            return msg;
        }
    };
    let first = format!("first-{}", uuid::Uuid::now_v7().simple());
    sip.send_to(invite(&first).as_bytes(), server).unwrap();
    // The first call is setting up: its callback has been asked and takes 1.5 s to answer.
    for _ in 0..100 {
        if !ctx.voice.hits().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ctx.voice.hits().len(), 1, "the first call's callback");

    let second = format!("second-{}", uuid::Uuid::now_v7().simple());
    sip.send_to(invite(&second).as_bytes(), server).unwrap();
    let refused = final_for(&second);
    assert_eq!(status_code(&refused), Some(503), "{refused}");
    assert_eq!(header(&refused, "Retry-After"), Some("1"), "{refused}");
    // Retransmissions keep their original's verdict while the engine is still full: the
    // refused one is refused again, the admitted one goes on to its transaction (a `503` here
    // would be a second final response to a call about to be answered `200`).
    sip.send_to(invite(&second).as_bytes(), server).unwrap();
    let refused = final_for(&second);
    assert_eq!(status_code(&refused), Some(503), "{refused}");
    sip.send_to(invite(&first).as_bytes(), server).unwrap();

    let answered = final_for(&first);
    assert_eq!(status_code(&answered), Some(200), "{answered}");
    let third = format!("third-{}", uuid::Uuid::now_v7().simple());
    sip.send_to(invite(&third).as_bytes(), server).unwrap();
    let answered = final_for(&third);
    assert_eq!(status_code(&answered), Some(200), "{answered}");

    let calls = wait_for_calls(&ctx.api, 2, |_| true).await;
    assert_eq!(calls.len(), 2, "the refused INVITE left no call: {calls:?}");
    assert_eq!(
        ctx.voice.hits().len(),
        2,
        "no callback for the refused call"
    );
}
on_both_backends!(overload_is_answered_503);
