//! `POST /v1/calls` end to end (DESIGN §5): a call placed through the API rings the callee through
//! the carrier trunk (a UDP socket of the test, or sipp), and once it answers the number's voice
//! callback is asked for a script with `Direction=outbound`, which runs as for an inbound call.
//! The limits (402, both 429s), hang-up while ringing and answered, idempotent replay, bad input
//! and `client_request_id` everywhere are shown here.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::audio::{correlation, espeak_reference, voiced_span};
use common::calls::{Ctx, setup_with};
use common::peer::{RtpPeer, reply, sdp, sdp_rtp};
use common::trunk::Trunk;
use common::uac::header;
use common::{Backend, Mode, Server, TestDb, wait_for_json};
use sautikit_sip::sdp::Codec;
use serde_json::{Value, json};

const FROM: &str = "+254700000001";
const CALLEE: &str = "+254711000001";
const SPOKEN: &str = "Hello from Sautikit.";

struct Placed {
    ctx: Ctx,
    trunk: Trunk,
}

/// A dev server whose trunk is a UDP socket of the test, the number's script `script`, and
/// `topup_minor` in the wallet (outbound rate KES 3.00 a minute).
async fn setup(backend: Backend, script: Value, topup_minor: i64, env: &[(&str, &str)]) -> Placed {
    let trunk = Trunk::bind().await;
    let trunk_uri = trunk.uri();
    let mut all = vec![("SAUTIKIT_OUTBOUND_TRUNK", trunk_uri.as_str())];
    all.extend_from_slice(env);
    let ctx = setup_with(backend, "/main", &all).await;
    ctx.voice.set_script("/main", script);
    if topup_minor > 0 {
        let topup = ctx
            .api
            .post(
                "/v1/topups",
                Some(json!({"provider": "test", "amount_minor": topup_minor, "currency": "KES"})),
            )
            .await;
        assert_eq!(topup.status, 201, "{}", topup.text);
    }
    Placed { ctx, trunk }
}

impl Placed {
    async fn place(&self, body: Value) -> common::Resp {
        self.ctx.api.post("/v1/calls", Some(body)).await
    }

    /// Place a call to `CALLEE` and return its id.
    async fn place_ok(&self) -> String {
        let r = self.place(json!({"from": FROM, "to": CALLEE})).await;
        assert_eq!(r.status, 201, "{}", r.text);
        r.json()["call_id"].as_str().unwrap().to_owned()
    }

    /// Answer `invite` at the trunk with media at `rtp`, and take our ACK.
    async fn answer(&self, invite: &str, from: SocketAddr, rtp: SocketAddr, tag: &str) {
        self.trunk
            .send(&reply(invite, 180, "Ringing", tag, None), from)
            .await;
        self.trunk
            .send(
                &reply(invite, 200, "OK", tag, Some(&sdp(rtp, Codec::Pcmu, 101))),
                from,
            )
            .await;
        // Other legs' refusals are ACKed too: wait for this answer's.
        loop {
            let (ack, _) = self.trunk.request("ACK").await;
            if ack.contains(&format!("tag={tag}")) {
                break;
            }
        }
    }

    /// Answer our BYE at the trunk.
    async fn bye_answered(&self, invite: &str, tag: &str) {
        let (bye, from) = self.trunk.request("BYE").await;
        assert_eq!(header(&bye, "Call-ID"), header(invite, "Call-ID"));
        self.trunk
            .send(&reply(&bye, 200, "OK", tag, None), from)
            .await;
    }

    /// Answer our CANCEL at the trunk (`200`), then the INVITE it cancels (`487`).
    async fn cancel_answered(&self, invite: &str, from: SocketAddr, tag: &str) {
        let (cancel, _) = self.trunk.request("CANCEL").await;
        assert_eq!(header(&cancel, "Call-ID"), header(invite, "Call-ID"));
        self.trunk
            .send(&reply(&cancel, 200, "OK", tag, None), from)
            .await;
        self.trunk
            .send(&reply(invite, 487, "Request Terminated", tag, None), from)
            .await;
    }

    async fn call_final(&self, id: &str) -> Value {
        call_final(&self.ctx, id).await
    }
}

async fn call_final(ctx: &Ctx, id: &str) -> Value {
    wait_for_json(
        &ctx.api,
        &format!("/v1/calls/{id}"),
        Duration::from_secs(20),
        |v| !matches!(v["status"].as_str(), Some("ringing") | Some("answered")),
    )
    .await
}

/// The request line's user: the number called.
fn called(invite: &str) -> String {
    invite
        .split_whitespace()
        .nth(1)
        .and_then(|uri| uri.strip_prefix("sip:"))
        .and_then(|rest| rest.split('@').next())
        .unwrap_or_default()
        .to_owned()
}

/// A call placed through the API rings the trunk presenting the number, runs the voice
/// callback's script once answered (`Direction=outbound`, `ClientRequestId`), is heard by the
/// callee, is hung up by the script's end, and is billed at the outbound rate. Its record and
/// every event carry `client_request_id`.
async fn a_placed_call_runs_its_script_and_is_billed(backend: Backend) {
    let t = setup(
        backend,
        json!({"actions": [{"say": {"text": SPOKEN}}, {"pause": {"length": 1}}]}),
        100_000,
        &[],
    )
    .await;
    let created = t
        .place(json!({"from": FROM, "to": CALLEE, "client_request_id": "order-42"}))
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let body = created.json();
    assert_eq!(body["status"], "ringing");
    assert_eq!(body["client_request_id"], "order-42");
    let id = body["call_id"].as_str().unwrap().to_owned();
    let ringing = t.ctx.api.get(&format!("/v1/calls/{id}")).await.json();
    assert_eq!(ringing["status"], "ringing", "{ringing}");
    assert_eq!(ringing["direction"], "outbound");
    assert_eq!(ringing["client_request_id"], "order-42");
    let (invite, from) = t.trunk.request("INVITE").await;
    assert_eq!(called(&invite), CALLEE);
    assert!(
        header(&invite, "From").is_some_and(|f| f.contains(&format!("sip:{FROM}@"))),
        "{invite}"
    );
    assert!(
        header(&invite, "P-Asserted-Identity").is_some_and(|f| f.contains(FROM)),
        "{invite}"
    );
    let callee = RtpPeer::new(Codec::Pcmu, 7).await;
    t.answer(&invite, from, callee.addr(), "far").await;
    let posts = t.ctx.voice.posts("/main", 1).await;
    let first = &posts[0];
    assert_eq!(first["Direction"], "outbound", "{first:?}");
    assert_eq!(first["CallStatus"], "answered");
    assert_eq!(first["CallId"], id);
    assert_eq!(first["From"], FROM);
    assert_eq!(first["To"], CALLEE);
    assert_eq!(first["ClientRequestId"], "order-42");
    // What the script says reaches the callee, from the port our INVITE offered.
    let heard = callee.receive_pcm(Duration::from_secs(4)).await;
    assert!(voiced_span(&heard).is_some(), "the callee heard speech");
    let _ = sdp_rtp(&invite).expect("our offer's RTP address");
    t.bye_answered(&invite, "far").await;
    let call = t.call_final(&id).await;
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["hangup_cause"], "engine_hangup");
    assert_eq!(call["sip_status"], 200);
    assert_eq!(call["client_request_id"], "order-42");
    assert_eq!(call["from"], FROM);
    assert_eq!(call["to"], CALLEE);
    let billed = call["duration_seconds"].as_i64().unwrap();
    assert!((2..=8).contains(&billed), "{call}");
    assert_eq!(
        call["cost_minor"].as_i64().unwrap(),
        (billed * 300 + 59) / 60,
        "{call}"
    );
    let hits = t
        .ctx
        .events
        .wait_until(Duration::from_secs(20), |h| {
            h.iter().any(|h| h.event_kind == "call.completed")
        })
        .await;
    let kinds: Vec<&str> = hits.iter().map(|h| h.event_kind.as_str()).collect();
    assert_eq!(kinds, ["call.started", "call.answered", "call.completed"]);
    for h in &hits {
        let payload = &h.json()["payload"];
        assert_eq!(payload["client_request_id"], "order-42", "{payload}");
        assert_eq!(payload["direction"], "outbound");
    }
    let done = &hits[2].json()["payload"];
    assert_eq!(done["cost_minor"], call["cost_minor"], "{done}");
    assert_eq!(done["sip_status"], 200);
    // Listed as outbound.
    let outbound = t.ctx.api.get_all("/v1/calls?direction=outbound").await;
    assert_eq!(outbound.len(), 1);
    assert!(
        t.ctx
            .api
            .get_all("/v1/calls?direction=inbound")
            .await
            .is_empty()
    );
}
on_both_backends!(a_placed_call_runs_its_script_and_is_billed);

/// Hanging up from the API: while ringing the callee gets CANCEL and the call is `canceled`
/// (SIP 487); once answered it gets BYE. Hanging up an ended call answers its record again.
#[tokio::test]
async fn hangup_while_ringing_cancels_and_while_answered_hangs_up() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"pause": {"length": 30}}]}),
        100_000,
        &[],
    )
    .await;
    let id = t.place_ok().await;
    let (invite, from) = t.trunk.request("INVITE").await;
    t.trunk
        .send(&reply(&invite, 180, "Ringing", "r1", None), from)
        .await;
    let hangup = t
        .ctx
        .api
        .post(&format!("/v1/calls/{id}/hangup"), None)
        .await;
    assert_eq!(hangup.status, 200, "{}", hangup.text);
    t.cancel_answered(&invite, from, "r1").await;
    let call = t.call_final(&id).await;
    assert_eq!(call["status"], "canceled", "{call}");
    assert_eq!(call["hangup_cause"], "api_hangup");
    assert_eq!(call["sip_status"], 487);
    assert_eq!(call["cost_minor"], 0);
    let again = t
        .ctx
        .api
        .post(&format!("/v1/calls/{id}/hangup"), None)
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "canceled");

    let id = t.place_ok().await;
    let (invite, from) = t.trunk.request("INVITE").await;
    let callee = RtpPeer::new(Codec::Pcmu, 8).await;
    t.answer(&invite, from, callee.addr(), "r2").await;
    t.ctx.voice.posts("/main", 1).await;
    let hangup = t
        .ctx
        .api
        .post(&format!("/v1/calls/{id}/hangup"), None)
        .await;
    assert_eq!(hangup.status, 200, "{}", hangup.text);
    t.bye_answered(&invite, "r2").await;
    let call = t.call_final(&id).await;
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["hangup_cause"], "api_hangup");
    assert_eq!(call["sip_status"], 200);
}

/// `time_limit`: the answered call is hung up (BYE) when it is reached, whatever the script.
#[tokio::test]
async fn time_limit_hangs_up_the_answered_call() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"pause": {"length": 30}}]}),
        100_000,
        &[],
    )
    .await;
    let r = t
        .place(json!({"from": FROM, "to": CALLEE, "time_limit": 2}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json()["call_id"].as_str().unwrap().to_owned();
    let (invite, from) = t.trunk.request("INVITE").await;
    let callee = RtpPeer::new(Codec::Pcmu, 14).await;
    t.answer(&invite, from, callee.addr(), "tl").await;
    t.bye_answered(&invite, "tl").await;
    let call = t.call_final(&id).await;
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["hangup_cause"], "time_limit");
    let secs = call["duration_seconds"].as_i64().unwrap();
    assert!((2..=3).contains(&secs), "{call}");
}

/// Several numbers ring at once: one busy, one answering; the third is cancelled. The record
/// names the one that answered.
#[tokio::test]
async fn the_first_of_several_numbers_to_answer_is_connected() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"pause": {"length": 1}}]}),
        100_000,
        &[],
    )
    .await;
    let r = t
        .place(json!({"from": FROM, "to": ["+254711000001", "+254711000002", "+254711000003"]}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json()["call_id"].as_str().unwrap().to_owned();
    let mut invites = HashMap::new();
    while invites.len() < 3 {
        let (invite, from) = t.trunk.request("INVITE").await;
        invites.insert(called(&invite), (invite, from));
    }
    let (busy, from) = &invites["+254711000001"];
    t.trunk
        .send(&reply(busy, 486, "Busy Here", "busy", None), *from)
        .await;
    let (never, never_from) = invites["+254711000003"].clone();
    t.trunk
        .send(&reply(&never, 180, "Ringing", "never", None), never_from)
        .await;
    let (late, from) = invites["+254711000002"].clone();
    let callee = RtpPeer::new(Codec::Pcmu, 9).await;
    t.answer(&late, from, callee.addr(), "late").await;
    t.cancel_answered(&never, never_from, "never").await;
    let posts = t.ctx.voice.posts("/main", 1).await;
    assert_eq!(posts[0]["To"], "+254711000002", "{posts:?}");
    t.bye_answered(&late, "late").await;
    let call = t.call_final(&id).await;
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["to"], "+254711000002");
}

/// A callee that is busy, never answers, or whose carrier fails: the call ends with the status
/// and SIP code, and the voice callback is never asked.
#[tokio::test]
async fn refusals_and_no_answer_end_the_call_with_the_sip_code() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"pause": {"length": 1}}]}),
        100_000,
        &[],
    )
    .await;
    for (code, reason, status) in [
        (486, "Busy Here", "busy"),
        (503, "Service Unavailable", "failed"),
        (480, "Temporarily Unavailable", "no_answer"),
    ] {
        let id = t.place_ok().await;
        let (invite, from) = t.trunk.request("INVITE").await;
        t.trunk
            .send(&reply(&invite, code, reason, "x", None), from)
            .await;
        let call = t.call_final(&id).await;
        assert_eq!(call["status"], status, "{call}");
        assert_eq!(call["sip_status"], code);
        assert_eq!(call["cost_minor"], 0);
    }
    // Ring time over: CANCEL, `no_answer`, 487.
    let r = t
        .place(json!({"from": FROM, "to": CALLEE, "timeout": 1}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json()["call_id"].as_str().unwrap().to_owned();
    let (invite, from) = t.trunk.request("INVITE").await;
    t.trunk
        .send(&reply(&invite, 180, "Ringing", "slow", None), from)
        .await;
    t.cancel_answered(&invite, from, "slow").await;
    let call = t.call_final(&id).await;
    assert_eq!(call["status"], "no_answer", "{call}");
    assert_eq!(call["sip_status"], 487);
    assert!(
        t.ctx.voice.hits().is_empty(),
        "no script for unanswered calls"
    );
}

/// `402` when less than a minute at the outbound rate is free; nothing is written or dialled.
/// Live calls' reservations count: a wallet holding one minute places one call at a time.
#[tokio::test]
async fn a_wallet_without_a_minute_is_refused_402() {
    let db = TestDb::new(Backend::Sqlite).await;
    let trunk = Trunk::bind().await;
    let trunk_uri = trunk.uri();
    let server = Server::start_with(&db, Mode::Dev, &[("SAUTIKIT_OUTBOUND_TRUNK", &trunk_uri)]);
    // The first month's rental (KES 100), then KES 2.99: less than a minute at KES 3.00.
    let (_, key) = db.workspace("poor", 10_000 + 299);
    let api = server.api(&key);
    let number_id = common::device::claim(&api, common::device::FIRST_INVENTORY_ID).await;
    let routed = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({"voice_callback_url": "http://127.0.0.1:9/voice"}),
        )
        .await;
    assert_eq!(routed.status, 200, "{}", routed.text);
    let r = api
        .post("/v1/calls", Some(json!({"from": FROM, "to": CALLEE})))
        .await;
    assert_eq!(r.status, 402, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "wallet.insufficient_funds");
    assert!(api.get_all("/v1/calls").await.is_empty());
    assert!(
        trunk.recv(Duration::from_millis(500)).await.is_none(),
        "nothing reaches the trunk"
    );
    // A top-up to exactly one minute: one call, whose reservation holds it; a second is 402.
    let topup = api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": 1, "currency": "KES"})),
        )
        .await;
    assert_eq!(topup.status, 201, "{}", topup.text);
    let first = api
        .post("/v1/calls", Some(json!({"from": FROM, "to": CALLEE})))
        .await;
    assert_eq!(first.status, 201, "{}", first.text);
    let second = api
        .post("/v1/calls", Some(json!({"from": FROM, "to": CALLEE})))
        .await;
    assert_eq!(second.status, 402, "{}", second.text);
    let id = first.json()["call_id"].as_str().unwrap().to_owned();
    let hung = api.post(&format!("/v1/calls/{id}/hangup"), None).await;
    assert_eq!(hung.status, 200, "{}", hung.text);
    assert_eq!(hung.json()["cost_minor"], 0);
    let wallet = api.get("/v1/wallet").await.json();
    assert_eq!(wallet["balance_minor"], 300, "{wallet}");
}

/// The call rate: past the bucket `429 calls.rate_limited` with `Retry-After`.
#[tokio::test]
async fn placing_faster_than_the_rate_is_refused_429() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"hangup": {}}]}),
        100_000,
        &[("SAUTIKIT_CALLS_PER_SECOND", "2")],
    )
    .await;
    let send = || async {
        let rb = t
            .ctx
            .api
            .request(reqwest::Method::POST, "/v1/calls")
            .header("Idempotency-Key", "retry-me")
            .json(&json!({"from": FROM, "to": CALLEE}));
        t.ctx.api.send(rb).await
    };
    let mut codes = Vec::new();
    for _ in 0..2 {
        codes.push(
            t.place(json!({"from": FROM, "to": CALLEE}))
                .await
                .status
                .as_u16(),
        );
    }
    let limited = send().await;
    codes.push(limited.status.as_u16());
    assert_eq!(codes, [201, 201, 429], "{}", limited.text);
    assert_eq!(limited.json()["error"]["code"], "calls.rate_limited");
    assert_eq!(limited.header("retry-after").as_deref(), Some("1"));
    assert_eq!(t.ctx.api.get_all("/v1/calls").await.len(), 2);
    // A 429 is not remembered under its Idempotency-Key: after Retry-After the retry places it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retried = send().await;
    assert_eq!(retried.status, 201, "{}", retried.text);
    assert!(retried.header("idempotent-replay").is_none());
    assert_eq!(t.ctx.api.get_all("/v1/calls").await.len(), 3);
}

/// Concurrency: past the limit `429 calls.concurrency_exceeded`; the slot is free again however
/// the call ended (completed, busy, no answer, failed, canceled).
#[tokio::test]
async fn the_concurrency_slot_is_released_on_every_end() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"pause": {"length": 1}}]}),
        100_000,
        &[("SAUTIKIT_MAX_LIVE_API_CALLS", "1")],
    )
    .await;
    let busy_again = |r: &common::Resp| {
        assert_eq!(r.status, 429, "{}", r.text);
        assert_eq!(r.json()["error"]["code"], "calls.concurrency_exceeded");
    };
    // Completed: answered, the script ends, BYE.
    let id = t.place_ok().await;
    busy_again(&t.place(json!({"from": FROM, "to": CALLEE})).await);
    let (invite, from) = t.trunk.request("INVITE").await;
    let callee = RtpPeer::new(Codec::Pcmu, 10).await;
    t.answer(&invite, from, callee.addr(), "a").await;
    t.bye_answered(&invite, "a").await;
    assert_eq!(t.call_final(&id).await["status"], "completed");
    // Busy, failed, and a callee that never answers (ring time over).
    for (code, status) in [
        (Some(486), "busy"),
        (Some(500), "failed"),
        (None, "no_answer"),
    ] {
        let r = t
            .place(json!({"from": FROM, "to": CALLEE, "timeout": 1}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let id = r.json()["call_id"].as_str().unwrap().to_owned();
        busy_again(&t.place(json!({"from": FROM, "to": CALLEE})).await);
        let (invite, from) = t.trunk.request("INVITE").await;
        match code {
            Some(c) => {
                t.trunk
                    .send(&reply(&invite, c, "No", "b", None), from)
                    .await
            }
            None => {
                t.trunk
                    .send(&reply(&invite, 180, "Ringing", "b", None), from)
                    .await;
                t.cancel_answered(&invite, from, "b").await;
            }
        }
        assert_eq!(t.call_final(&id).await["status"], status);
    }
    // Canceled from the API while ringing.
    let id = t.place_ok().await;
    let (invite, from) = t.trunk.request("INVITE").await;
    t.trunk
        .send(&reply(&invite, 180, "Ringing", "c", None), from)
        .await;
    let hangup = t
        .ctx
        .api
        .post(&format!("/v1/calls/{id}/hangup"), None)
        .await;
    assert_eq!(hangup.status, 200);
    t.cancel_answered(&invite, from, "c").await;
    assert_eq!(t.call_final(&id).await["status"], "canceled");
    // Free again.
    t.place_ok().await;
}

/// `Idempotency-Key`: the replay answers the same call, with `Idempotent-Replay: true`, and
/// dials nothing more.
#[tokio::test]
async fn a_replayed_request_places_one_call() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"hangup": {}}]}),
        100_000,
        &[],
    )
    .await;
    let send = || async {
        let rb = t
            .ctx
            .api
            .request(reqwest::Method::POST, "/v1/calls")
            .header("Idempotency-Key", "place-once")
            .json(&json!({"from": FROM, "to": CALLEE, "client_request_id": "c-1"}));
        t.ctx.api.send(rb).await
    };
    let first = send().await;
    assert_eq!(first.status, 201, "{}", first.text);
    let second = send().await;
    assert_eq!(second.status, 201, "{}", second.text);
    assert_eq!(second.header("idempotent-replay").as_deref(), Some("true"));
    assert_eq!(first.json()["call_id"], second.json()["call_id"]);
    let (invite, from) = t.trunk.request("INVITE").await;
    t.trunk
        .send(&reply(&invite, 486, "Busy Here", "x", None), from)
        .await;
    // No second INVITE (only the ACK of the 486 may come).
    while let Some((msg, _)) = t.trunk.recv(Duration::from_millis(700)).await {
        assert!(!msg.starts_with("INVITE "), "a second INVITE: {msg}");
    }
    assert_eq!(t.ctx.api.get_all("/v1/calls").await.len(), 1);
}

/// Bad input gets the envelope, and nothing is written or dialled.
#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_dialled() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"hangup": {}}]}),
        100_000,
        &[],
    )
    .await;
    let eleven: Vec<String> = (0..11).map(|i| format!("+2547110000{i:02}")).collect();
    for (body, status, code) in [
        (
            json!({"from": "+254700000999", "to": CALLEE}),
            422,
            "calls.invalid_from",
        ),
        (
            json!({"from": FROM, "to": "0711000001"}),
            422,
            "calls.invalid_to",
        ),
        (
            json!({"from": FROM, "to": eleven}),
            422,
            "calls.too_many_targets",
        ),
        (
            json!({"from": FROM, "to": "sip:alice@10.0.0.1"}),
            422,
            "calls.invalid_to",
        ),
        (
            json!({"from": FROM, "to": CALLEE, "timeout": -5}),
            422,
            "calls.invalid_timeout",
        ),
        (
            json!({"from": FROM, "to": CALLEE, "time_limit": 0}),
            422,
            "calls.invalid_time_limit",
        ),
        (
            json!({"from": FROM, "to": CALLEE, "caller_id": "+254799999999"}),
            422,
            "calls.invalid_caller_id",
        ),
        (
            json!({"from": FROM, "to": CALLEE, "voice_callback_url": "ftp://x"}),
            422,
            "calls.invalid_url",
        ),
        (json!({"from": FROM, "to": []}), 422, "calls.invalid_to"),
        (json!({"from": FROM}), 422, "request.invalid_body"),
        (
            json!({"from": FROM, "to": CALLEE, "colour": "blue"}),
            422,
            "request.invalid_body",
        ),
    ] {
        let r = t.place(body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        let envelope = r.json();
        assert_eq!(envelope["error"]["code"], code, "{body}: {envelope}");
        assert!(envelope["error"]["request_id"].is_string());
    }
    assert!(t.ctx.api.get_all("/v1/calls").await.is_empty());
    assert!(t.trunk.recv(Duration::from_millis(500)).await.is_none());
}

/// A placed call's script may `dial`: the callee is put through to a second party through the
/// trunk, audio both ways, exactly as for an inbound call.
#[tokio::test]
async fn a_placed_calls_script_can_dial() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"dial": {"number": "+254711000009", "answerOnBridge": true}}]}),
        100_000,
        &[],
    )
    .await;
    let id = t.place_ok().await;
    let (invite, from) = t.trunk.request("INVITE").await;
    let callee = RtpPeer::new(Codec::Pcmu, 11).await;
    t.answer(&invite, from, callee.addr(), "callee").await;
    let (dialled, dial_from) = t.trunk.request("INVITE").await;
    assert_eq!(called(&dialled), "+254711000009");
    let party = RtpPeer::new(Codec::Pcmu, 12).await;
    t.answer(&dialled, dial_from, party.addr(), "party").await;
    let ours = sdp_rtp(&invite).expect("the call's RTP address");
    let leg = sdp_rtp(&dialled).expect("the leg's RTP address");
    let (_, _, by_callee, by_party) = tokio::join!(
        callee.send_frames(ours, 0, 50),
        party.send_frames(leg, 1000, 1050),
        callee.receive(30, Duration::from_secs(4)),
        party.receive(30, Duration::from_secs(4)),
    );
    let callee_heard = by_callee
        .iter()
        .filter(|(_, i)| i.is_some_and(|i| i >= 1000))
        .count();
    let party_heard = by_party
        .iter()
        .filter(|(_, i)| i.is_some_and(|i| i < 1000))
        .count();
    assert!(
        callee_heard >= 25,
        "the callee heard the party: {callee_heard}"
    );
    assert!(
        party_heard >= 25,
        "the party heard the callee: {party_heard}"
    );
    // The callee hangs up: both legs end.
    let bye = format!(
        "BYE {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKcalleebye\r\nFrom: {to};tag=callee\r\nTo: {from_h}\r\nCall-ID: {cid}\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        contact = common::uac::contact_uri(&invite).expect("our Contact"),
        me = t.trunk.addr(),
        to = header(&invite, "To").unwrap(),
        from_h = header(&invite, "From").unwrap(),
        cid = header(&invite, "Call-ID").unwrap(),
    );
    t.trunk.send(&bye, from).await;
    t.bye_answered(&dialled, "party").await;
    let call = t.call_final(&id).await;
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["hangup_cause"], "callee_hangup");
    let children = t
        .ctx
        .api
        .get_all(&format!("/v1/calls?parent_call_id={id}"))
        .await;
    assert_eq!(children.len(), 1, "{children:?}");
    assert_eq!(children[0]["to"], "+254711000009");
}

/// The guide's way: a `curl` places the call; sipp is the carrier trunk, answering with its
/// media at a socket of the test, which hears the script's `say` (checked against espeak-ng's
/// own rendering). `call.completed` carries the cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guide_style_curl_places_a_call_sipp_hears_it() {
    let trunk_port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("its address").port()
    };
    let trunk_uri = format!("sip:127.0.0.1:{trunk_port}");
    let ctx = setup_with(
        Backend::Sqlite,
        "/main",
        &[("SAUTIKIT_OUTBOUND_TRUNK", trunk_uri.as_str())],
    )
    .await;
    ctx.voice.set_script(
        "/main",
        json!({"actions": [{"say": {"text": SPOKEN, "voice": "alice"}}, {"pause": {"length": 1}}]}),
    );
    let topup = ctx
        .api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": 100_000, "currency": "KES"})),
        )
        .await;
    assert_eq!(topup.status, 201);
    let callee = RtpPeer::new(Codec::Pcmu, 13).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sipp/api_trunk_uas.xml"),
    )
    .unwrap()
    .replace("[rtp_port]", &callee.addr().port().to_string());
    let scenario = dir.path().join("api_trunk_uas.xml");
    std::fs::write(&scenario, text).unwrap();
    let trunk = common::calls::sipp_uas(dir.path(), &scenario.to_string_lossy(), trunk_port).await;
    let key = common::dev_key(&ctx.db.data_dir);
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-X", "POST", &format!("{}/v1/calls", ctx.api.base)])
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args(["-H", "Content-Type: application/json"])
        .args([
            "-d",
            r#"{"from": "+254700000001", "to": "+254711000001", "client_request_id": "guide-1"}"#,
        ])
        .output()
        .await
        .expect("curl runs");
    let created: Value = serde_json::from_slice(&out.stdout).expect("JSON from curl");
    assert_eq!(created["status"], "ringing", "{created}");
    assert_eq!(created["client_request_id"], "guide-1");
    let id = created["call_id"].as_str().unwrap().to_owned();
    let heard = callee.receive_pcm(Duration::from_secs(5)).await;
    let done = tokio::time::timeout(Duration::from_secs(30), trunk.wait_with_output())
        .await
        .expect("sipp (trunk) ends")
        .expect("sipp (trunk) runs");
    assert!(
        done.status.success(),
        "sipp (trunk) failed:\n{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let reference = espeak_reference(SPOKEN, "en-us+f2", dir.path());
    let corr = correlation(&reference, &heard, 400);
    assert!(
        corr >= 0.9,
        "sipp's side heard the script: correlation {corr:.3}"
    );
    let call = call_final(&ctx, &id).await;
    assert_eq!(call["status"], "completed", "{call}");
    let hits = ctx
        .events
        .wait_until(Duration::from_secs(20), |h| {
            h.iter().any(|h| h.event_kind == "call.completed")
        })
        .await;
    let completed = hits
        .iter()
        .find(|h| h.event_kind == "call.completed")
        .unwrap()
        .json();
    assert_eq!(completed["payload"]["call_id"], id);
    assert_eq!(completed["payload"]["cost_minor"], call["cost_minor"]);
    assert!(call["cost_minor"].as_i64().unwrap() > 0, "{call}");
    assert_eq!(completed["payload"]["client_request_id"], "guide-1");
}
