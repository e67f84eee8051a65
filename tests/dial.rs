//! `dial` end to end (DESIGN §7, §8): an inbound call's script puts the caller through to
//! numbers out through the carrier trunk. The caller and the trunk are UDP sockets of the test;
//! the voice callback is a real HTTP server. Each dialled party is a call record of its own
//! (`parent_call_id`), billed per second at the outbound rate; the result is always posted.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::audio::{copy_pcaps, correlation, pcap_alaw};
use common::calls::{Ctx, setup_with};
use common::peer::{RtpPeer, SipCaller, reply, sdp, sdp_rtp};
use common::trunk::Trunk;
use common::uac::{header, status_code};
use common::{Backend, wait_for_json};
use sautikit_sip::sdp::Codec;
use serde_json::{Value, json};
use tokio::net::UdpSocket;

const NUMBER: &str = "254700000001";
/// The caller's own number (`SipCaller`'s From): presented to the dialled party by default.
const CALLER: &str = "+254711000002";

struct Dial {
    ctx: Ctx,
    trunk: Trunk,
}

/// A dev server whose trunk is a UDP socket of the test, its number's script `script`, and
/// KES 1,000 in the wallet (outbound rate KES 3.00 a minute).
async fn setup(backend: Backend, script: Value) -> Dial {
    let trunk = Trunk::bind().await;
    let trunk_uri = trunk.uri();
    let ctx = setup_at(backend, script, &trunk_uri).await;
    Dial { ctx, trunk }
}

/// The same with the trunk at `trunk_uri`.
async fn setup_at(backend: Backend, script: Value, trunk_uri: &str) -> Ctx {
    let ctx = setup_with(backend, "/main", &[("SAUTIKIT_OUTBOUND_TRUNK", trunk_uri)]).await;
    ctx.voice.set_script("/main", script);
    ctx.voice.set_script(
        "/after",
        json!({"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}),
    );
    let topup = ctx
        .api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": 100_000, "currency": "KES"})),
        )
        .await;
    assert_eq!(topup.status, 201, "{}", topup.text);
    ctx
}

impl Dial {
    /// Every call record once the one with `id` is final.
    async fn call_final(&self, id: &str) -> Value {
        wait_for_json(
            &self.ctx.api,
            &format!("/v1/calls/{id}"),
            Duration::from_secs(15),
            |v| !matches!(v["status"].as_str(), Some("ringing") | Some("answered")),
        )
        .await
    }

    async fn children(&self, parent: &str) -> Vec<Value> {
        self.ctx
            .api
            .get_all(&format!("/v1/calls?parent_call_id={parent}"))
            .await
    }
}

/// The request line's user: the number dialled.
fn dialled(invite: &str) -> String {
    invite
        .split_whitespace()
        .nth(1)
        .and_then(|uri| uri.strip_prefix("sip:"))
        .and_then(|rest| rest.split('@').next())
        .unwrap_or_default()
        .to_owned()
}

/// Answer a CANCEL at the trunk (`200`), then its INVITE (`487`).
async fn cancelled(t: &Dial, invite: &str, from: SocketAddr, tag: &str) {
    let (cancel, _) = t.trunk.request("CANCEL").await;
    assert_eq!(header(&cancel, "Call-ID"), header(invite, "Call-ID"));
    t.trunk
        .send(&reply(&cancel, 200, "OK", tag, None), from)
        .await;
    t.trunk
        .send(&reply(invite, 487, "Request Terminated", tag, None), from)
        .await;
}

async fn dials_through_the_trunk_bridges_and_bills_the_leg(backend: Backend) {
    let t = setup(
        backend,
        json!({"actions": [{"dial": {"number": "+254711000001", "action": "/after"}}]}),
    )
    .await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    // Answered at once (no answerOnBridge): the caller hears ringback while the party rings.
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    caller.ack().await;
    let ours = sdp_rtp(&ok).expect("our RTP address");
    let (invite, from) = t.trunk.request("INVITE").await;
    assert_eq!(dialled(&invite), "+254711000001");
    // The party sees the caller's own number (an inbound call forwarded).
    assert!(
        header(&invite, "From").is_some_and(|f| f.contains(&format!("sip:{CALLER}@"))),
        "{invite}"
    );
    let heard = rtp.receive(20, Duration::from_secs(3)).await;
    assert!(heard.len() >= 20, "ringback frames: {}", heard.len());
    let trunk_rtp = RtpPeer::new(Codec::Pcma, 2).await;
    t.trunk
        .send(&reply(&invite, 180, "Ringing", "far", None), from)
        .await;
    t.trunk
        .send(
            &reply(
                &invite,
                200,
                "OK",
                "far",
                Some(&sdp(trunk_rtp.addr(), Codec::Pcma, 101)),
            ),
            from,
        )
        .await;
    let (ack, _) = t.trunk.request("ACK").await;
    assert!(ack.contains("tag=far"), "{ack}");
    let leg = sdp_rtp(&invite).expect("the leg's RTP address");
    // Both ways through the bridge, transcoded PCMU ↔ PCMA.
    let (_, _, by_caller, by_trunk) = tokio::join!(
        rtp.send_frames(ours, 0, 50),
        trunk_rtp.send_frames(leg, 1000, 1050),
        rtp.receive(30, Duration::from_secs(4)),
        trunk_rtp.receive(30, Duration::from_secs(4)),
    );
    let caller_heard = by_caller
        .iter()
        .filter(|(_, i)| i.is_some_and(|i| i >= 1000))
        .count();
    let trunk_heard = by_trunk
        .iter()
        .filter(|(_, i)| i.is_some_and(|i| i < 1000))
        .count();
    assert!(
        caller_heard >= 25,
        "the caller heard the party: {caller_heard}"
    );
    assert!(
        trunk_heard >= 25,
        "the party heard the caller: {trunk_heard}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The party hangs up: its leg ends, the script goes on (`/after` hangs up the caller).
    let party_bye = format!(
        "BYE {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKpartybye\r\nFrom: {to};tag=far\r\nTo: {from_h}\r\nCall-ID: {cid}\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        contact = common::uac::contact_uri(&invite).expect("our Contact"),
        me = t.trunk.addr(),
        to = header(&invite, "To").unwrap(),
        from_h = header(&invite, "From").unwrap(),
        cid = header(&invite, "Call-ID").unwrap(),
    );
    t.trunk.send(&party_bye, from).await;
    let ok = loop {
        let (msg, _) = t
            .trunk
            .recv(Duration::from_secs(5))
            .await
            .expect("200 to BYE");
        if status_code(&msg).is_some() {
            break msg;
        }
    };
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    caller.await_bye(Duration::from_secs(10)).await;
    let posts = t.ctx.voice.posts("/after", 1).await;
    assert_eq!(posts.len(), 1, "{posts:?}");
    let result = &posts[0];
    assert_eq!(result["DialStatus"], "completed", "{result:?}");
    assert_eq!(result["DialSipStatus"], "200");
    let secs: u64 = result["DialDuration"].parse().unwrap();
    assert!((1..=5).contains(&secs), "{result:?}");
    let parent = result["CallId"].clone();
    let child_id = result["DialCallId"].clone();
    let child = t.call_final(&child_id).await;
    assert_eq!(child["status"], "completed", "{child}");
    assert_eq!(child["direction"], "outbound");
    assert_eq!(child["parent_call_id"], parent.as_str());
    assert_eq!(child["from"], CALLER);
    assert_eq!(child["to"], "+254711000001");
    assert_eq!(child["hangup_cause"], "callee_hangup", "{child}");
    let billed = child["duration_seconds"].as_i64().unwrap();
    assert!((1..=5).contains(&billed), "{child}");
    // The number's outbound rate: KES 3.00 a minute, per second, rounded up.
    assert_eq!(
        child["cost_minor"].as_i64().unwrap(),
        (billed * 300 + 59) / 60,
        "{child}"
    );
    let parent = t.call_final(&parent).await;
    assert_eq!(parent["status"], "completed", "{parent}");
    assert_eq!(t.children(parent["id"].as_str().unwrap()).await.len(), 1);
}
on_both_backends!(dials_through_the_trunk_bridges_and_bills_the_leg);

/// `numbers`: one busy at once, one answering after 2 s, one never answering. The second is
/// bridged, the third gets CANCEL, and the result is posted once. The caller's hang-up ends the
/// bridged leg too.
#[tokio::test]
async fn the_first_of_several_numbers_to_answer_wins() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"dial": {
            "numbers": ["+254711000001", "+254711000002", "+254711000003"],
            "action": "/after"
        }}]}),
    )
    .await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200));
    caller.ack().await;
    let mut invites = HashMap::new();
    while invites.len() < 3 {
        let (invite, from) = t.trunk.request("INVITE").await;
        invites.insert(dialled(&invite), (invite, from));
    }
    let (busy, from) = &invites["+254711000001"];
    t.trunk
        .send(&reply(busy, 486, "Busy Here", "busy", None), *from)
        .await;
    let (late, from) = invites["+254711000002"].clone();
    let (never, never_from) = invites["+254711000003"].clone();
    t.trunk
        .send(&reply(&late, 180, "Ringing", "late", None), from)
        .await;
    t.trunk
        .send(&reply(&never, 180, "Ringing", "never", None), never_from)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let trunk_rtp = RtpPeer::new(Codec::Pcmu, 2).await;
    t.trunk
        .send(
            &reply(
                &late,
                200,
                "OK",
                "late",
                Some(&sdp(trunk_rtp.addr(), Codec::Pcmu, 101)),
            ),
            from,
        )
        .await;
    cancelled(&t, &never, never_from, "never").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    caller.bye().await;
    let (bye, _) = t.trunk.request("BYE").await;
    assert_eq!(header(&bye, "Call-ID"), header(&late, "Call-ID"));
    t.trunk
        .send(&reply(&bye, 200, "OK", "late", None), from)
        .await;
    let posts = t.ctx.voice.posts("/after", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(t.ctx.voice.posts("/after", 1).await.len(), 1, "posted once");
    let result = &posts[0];
    assert_eq!(result["DialStatus"], "completed", "{result:?}");
    let children = t.children(&result["CallId"]).await;
    assert_eq!(children.len(), 3, "{children:?}");
    let by_to: HashMap<String, Value> = children
        .into_iter()
        .map(|c| (c["to"].as_str().unwrap().to_owned(), c))
        .collect();
    assert_eq!(by_to["+254711000001"]["status"], "busy");
    assert_eq!(by_to["+254711000001"]["cost_minor"], 0);
    assert_eq!(by_to["+254711000003"]["status"], "canceled");
    let won = t.call_final(&result["DialCallId"]).await;
    assert_eq!(won["to"], "+254711000002", "{won}");
    assert_eq!(won["status"], "completed");
}

/// Ring timeout → `no-answer` with `DialSipStatus` 487 and the script goes on; busy → `busy`;
/// `timeLimit` cuts the bridged call; with `answerOnBridge` the caller gets `180` and no `200`
/// until the party answers, and its hang-up while the party rings cancels the leg and posts
/// `canceled`.
#[tokio::test]
async fn timeouts_busy_time_limits_and_the_caller_leaving() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"dial": {"number": "+254711000001", "timeout": 2, "action": "/after"}}]}),
    )
    .await;

    // No answer within 2 s.
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200));
    caller.ack().await;
    let (invite, from) = t.trunk.request("INVITE").await;
    t.trunk
        .send(&reply(&invite, 180, "Ringing", "slow", None), from)
        .await;
    cancelled(&t, &invite, from, "slow").await;
    // The script goes on after the failed dial: `/after` hangs up.
    caller.await_bye(Duration::from_secs(10)).await;
    let result = t.ctx.voice.posts("/after", 1).await.remove(0);
    assert_eq!(result["DialStatus"], "no-answer", "{result:?}");
    assert_eq!(result["DialSipStatus"], "487");
    let child = t.call_final(&result["DialCallId"]).await;
    assert_eq!(child["status"], "no_answer", "{child}");
    assert_eq!(child["cost_minor"], 0);

    // Busy.
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200));
    caller.ack().await;
    let (invite, from) = t.trunk.request("INVITE").await;
    t.trunk
        .send(&reply(&invite, 486, "Busy Here", "busy", None), from)
        .await;
    caller.await_bye(Duration::from_secs(10)).await;
    let result = t.ctx.voice.posts("/after", 2).await.remove(1);
    assert_eq!(result["DialStatus"], "busy", "{result:?}");
    assert_eq!(result["DialSipStatus"], "486");

    // timeLimit 2 s, and answerOnBridge: no 200 to the caller before the party's.
    t.ctx.voice.set_script(
        "/main",
        json!({"actions": [{"dial": {"number": "+254711000001", "timeLimit": 2,
                                      "answerOnBridge": true, "action": "/after"}}]}),
    );
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (invite, from) = t.trunk.request("INVITE").await;
    t.trunk
        .send(&reply(&invite, 180, "Ringing", "limit", None), from)
        .await;
    // The caller hears 180 passed on, and nothing final yet.
    let mut provisional = Vec::new();
    while let Some(msg) = caller.recv(Duration::from_millis(700)).await {
        let code = status_code(&msg).unwrap_or(0);
        assert!(code < 200, "a final answer before the party's: {msg}");
        provisional.push(code);
    }
    assert!(provisional.contains(&180), "{provisional:?}");
    let trunk_rtp = RtpPeer::new(Codec::Pcmu, 2).await;
    t.trunk
        .send(
            &reply(
                &invite,
                200,
                "OK",
                "limit",
                Some(&sdp(trunk_rtp.addr(), Codec::Pcmu, 101)),
            ),
            from,
        )
        .await;
    let (_, ok) = caller.await_final(Duration::from_secs(5)).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    caller.ack().await;
    let answered = Instant::now();
    let (bye, _) = t.trunk.request("BYE").await;
    let cut = answered.elapsed();
    assert!(
        cut >= Duration::from_millis(1500) && cut < Duration::from_secs(4),
        "cut after {cut:?}"
    );
    t.trunk
        .send(&reply(&bye, 200, "OK", "limit", None), from)
        .await;
    caller.await_bye(Duration::from_secs(10)).await;
    let result = t.ctx.voice.posts("/after", 3).await.remove(2);
    assert_eq!(result["DialStatus"], "completed", "{result:?}");
    let child = t.call_final(&result["DialCallId"]).await;
    assert_eq!(child["hangup_cause"], "time_limit", "{child}");

    // The caller gives up while the party rings (answerOnBridge: it was never answered).
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    let caller_invite = caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (invite, from) = t.trunk.request("INVITE").await;
    t.trunk
        .send(&reply(&invite, 180, "Ringing", "left", None), from)
        .await;
    loop {
        let msg = caller
            .recv(Duration::from_secs(5))
            .await
            .expect("180 passed on");
        if status_code(&msg) == Some(180) {
            break;
        }
    }
    caller.cancel(&caller_invite).await;
    cancelled(&t, &invite, from, "left").await;
    let result = t.ctx.voice.posts("/after", 4).await.remove(3);
    assert_eq!(result["DialStatus"], "canceled", "{result:?}");
    assert_eq!(result["CallStatus"], "canceled", "{result:?}");
    let child = t.call_final(&result["DialCallId"]).await;
    assert_eq!(child["status"], "canceled", "{child}");
    let parent = t.call_final(&result["CallId"]).await;
    assert_eq!(parent["status"], "canceled", "{parent}");
}

/// A `sip` target: the INVITE goes to the URI's host and port (a PBX socket of the test) with
/// the URI as its Request-URI; its `486` is the result (`busy`) and the script goes on.
#[tokio::test]
async fn a_sip_uri_is_dialled_at_its_host() {
    let pbx = UdpSocket::bind("127.0.0.1:0").await.expect("pbx socket");
    let uri = format!("sip:alice@{}", pbx.local_addr().unwrap());
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"dial": {"sip": uri, "action": "/after"}}]}),
    )
    .await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200));
    caller.ack().await;
    let mut buf = vec![0u8; 65_535];
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), pbx.recv_from(&mut buf))
        .await
        .expect("an INVITE at the PBX")
        .expect("recv");
    let invite = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        invite.starts_with(&format!("INVITE {uri} SIP/2.0")),
        "{invite}"
    );
    pbx.send_to(
        reply(&invite, 486, "Busy Here", "pbx", None).as_bytes(),
        from,
    )
    .await
    .expect("send");
    caller.await_bye(Duration::from_secs(10)).await;
    let result = t.ctx.voice.posts("/after", 1).await.remove(0);
    assert_eq!(result["DialStatus"], "busy", "{result:?}");
    assert_eq!(result["DialSipStatus"], "486");
    let child = t.call_final(&result["DialCallId"]).await;
    assert_eq!(child["to"], uri.as_str(), "{child}");
    assert_eq!(child["status"], "busy");
}

/// One target with early media (`183` with SDP): the caller, answered at once, hears the
/// party's own ringback frames once they flow, then the party itself after its `200`.
#[tokio::test]
async fn the_caller_hears_the_partys_early_media() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"dial": {"number": "+254711000001", "action": "/after"}}]}),
    )
    .await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200));
    caller.ack().await;
    let (invite, from) = t.trunk.request("INVITE").await;
    let leg = sdp_rtp(&invite).expect("the leg's RTP address");
    let trunk_rtp = RtpPeer::new(Codec::Pcmu, 2).await;
    let party_sdp = sdp(trunk_rtp.addr(), Codec::Pcmu, 101);
    t.trunk
        .send(
            &reply(&invite, 183, "Session Progress", "early", Some(&party_sdp)),
            from,
        )
        .await;
    // The party's early media (frames 500…): the caller hears them in place of our tone.
    let (_, early) = tokio::join!(
        trunk_rtp.send_frames(leg, 500, 575),
        rtp.receive(60, Duration::from_secs(3)),
    );
    let heard = early
        .iter()
        .filter(|(_, i)| i.is_some_and(|i| (500..575).contains(&i)))
        .count();
    assert!(
        heard >= 30,
        "the caller heard the party's early media: {heard}"
    );
    t.trunk
        .send(&reply(&invite, 200, "OK", "early", Some(&party_sdp)), from)
        .await;
    let (ack, _) = t.trunk.request("ACK").await;
    assert!(ack.contains("tag=early"), "{ack}");
    let (_, talk) = tokio::join!(
        trunk_rtp.send_frames(leg, 1000, 1050),
        // Early frames not yet read come first.
        rtp.receive(80, Duration::from_secs(3)),
    );
    let heard = talk
        .iter()
        .filter(|(_, i)| i.is_some_and(|i| i >= 1000))
        .count();
    assert!(heard >= 25, "the caller heard the party: {heard}");
    caller.bye().await;
    let (bye, _) = t.trunk.request("BYE").await;
    t.trunk
        .send(&reply(&bye, 200, "OK", "early", None), from)
        .await;
    let result = t.ctx.voice.posts("/after", 1).await.remove(0);
    assert_eq!(result["DialStatus"], "completed", "{result:?}");
}

/// On-net: a number of ours is dialled without the trunk. The INVITE reaches our own listener
/// and is an inbound call to that number, running its own script (answer, 2 s, hang up); its
/// hang-up ends the dialled leg and the first call's script goes on.
#[tokio::test]
async fn one_of_our_numbers_is_dialled_on_net() {
    let t = setup(
        Backend::Sqlite,
        json!({"actions": [{"dial": {"number": "+254700000002", "action": "/after"}}]}),
    )
    .await;
    let second = common::device::claim(&t.ctx.api, "01900000-0000-7000-8000-000000000002").await;
    t.ctx.voice.set_script(
        "/second",
        json!({"actions": [{"pause": {"length": 2}}, {"hangup": {}}]}),
    );
    let routed = t
        .ctx
        .api
        .patch(
            &format!("/v1/numbers/{second}/routing"),
            json!({"voice_callback_url": t.ctx.voice.url("/second")}),
        )
        .await;
    assert_eq!(routed.status, 200, "{}", routed.text);
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200));
    caller.ack().await;
    caller.await_bye(Duration::from_secs(20)).await;
    assert!(
        t.trunk.recv(Duration::from_millis(200)).await.is_none(),
        "nothing went to the trunk"
    );
    let result = t.ctx.voice.posts("/after", 1).await.remove(0);
    assert_eq!(result["DialStatus"], "completed", "{result:?}");
    let secs: u64 = result["DialDuration"].parse().unwrap();
    assert!((1..=4).contains(&secs), "{result:?}");
    let child = t.call_final(&result["DialCallId"]).await;
    assert_eq!(child["status"], "completed", "{child}");
    assert_eq!(child["hangup_cause"], "callee_hangup", "{child}");
    // The called number took it as an inbound call from the caller's number.
    let second_calls = t
        .ctx
        .api
        .get_all(&format!("/v1/calls?number_id={second}"))
        .await;
    let inbound: Vec<&Value> = second_calls
        .iter()
        .filter(|c| c["direction"] == "inbound")
        .collect();
    assert_eq!(inbound.len(), 1, "{second_calls:?}");
    assert_eq!(inbound[0]["from"], CALLER, "{:?}", inbound[0]);
    let inbound = t.call_final(inbound[0]["id"].as_str().unwrap()).await;
    assert_eq!(inbound["status"], "completed", "{inbound}");
    assert!(
        t.ctx.voice.hits().iter().any(|h| h.path == "/second"),
        "the called number's script ran"
    );
}

/// The dialled party's paid time: a wallet holding one minute at the outbound rate pays for one
/// minute of the party. Then the party gets BYE (`balance_exhausted`), the caller's script goes
/// on, and the wallet is spent to zero, never below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_is_cut_when_its_paid_time_runs_out() {
    let db = common::TestDb::new(Backend::Sqlite).await;
    let trunk = Trunk::bind().await;
    let trunk_uri = trunk.uri();
    let server = common::Server::start_with(
        &db,
        common::Mode::Dev,
        &[("SAUTIKIT_OUTBOUND_TRUNK", trunk_uri.as_str())],
    );
    // The number's first month (KES 100.00) and one minute at KES 3.00.
    let (_, key) = db.workspace("dialler", 10_000 + 300);
    let api = server.api(&key);
    let number_id = common::device::claim(&api, common::device::FIRST_INVENTORY_ID).await;
    let voice = common::voice::VoiceServer::start().await;
    voice.set_script(
        "/main",
        json!({"actions": [{"dial": {"number": "+254711000001", "action": "/after"}}]}),
    );
    voice.set_script("/after", json!({"actions": [{"hangup": {}}]}));
    let routed = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({"voice_callback_url": voice.url("/main")}),
        )
        .await;
    assert_eq!(routed.status, 200, "{}", routed.text);
    let t = Dial {
        ctx: Ctx {
            db,
            server,
            api,
            number_id,
            voice,
            events: common::receiver::Receiver::ok().await,
            secret: String::new(),
        },
        trunk,
    };
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let mut caller = SipCaller::new(t.ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200));
    caller.ack().await;
    let ours = sdp_rtp(&ok).expect("our RTP address");
    let (invite, from) = t.trunk.request("INVITE").await;
    let trunk_rtp = RtpPeer::new(Codec::Pcmu, 2).await;
    t.trunk
        .send(
            &reply(
                &invite,
                200,
                "OK",
                "paid",
                Some(&sdp(trunk_rtp.addr(), Codec::Pcmu, 101)),
            ),
            from,
        )
        .await;
    let answered = Instant::now();
    let leg = sdp_rtp(&invite).expect("the leg's RTP address");
    // Both talk throughout (a silent leg would end for another reason).
    let talk = tokio::spawn(async move {
        tokio::join!(
            rtp.send_frames(ours, 0, 5_000),
            trunk_rtp.send_frames(leg, 0, 5_000)
        );
    });
    let cut = loop {
        let (msg, _) = t
            .trunk
            .recv(Duration::from_secs(75))
            .await
            .expect("BYE at the trunk");
        if msg.starts_with("BYE ") {
            t.trunk
                .send(&reply(&msg, 200, "OK", "paid", None), from)
                .await;
            break answered.elapsed();
        }
    };
    assert!(
        cut >= Duration::from_secs(59) && cut <= Duration::from_secs(62),
        "cut at {cut:?}"
    );
    caller.await_bye(Duration::from_secs(10)).await;
    talk.abort();
    let result = t.ctx.voice.posts("/after", 1).await.remove(0);
    assert_eq!(result["DialStatus"], "completed", "{result:?}");
    let child = t.call_final(&result["DialCallId"]).await;
    assert_eq!(child["hangup_cause"], "balance_exhausted", "{child}");
    assert_eq!(child["cost_minor"], 300, "{child}");
    let wallet = t.ctx.api.get("/v1/wallet").await.json();
    assert_eq!(wallet["balance_minor"], 0, "{wallet}");
}

/// The listening half of the sipp test: `RtpPeer::receive_pcm` keeps every packet's audio, in
/// order (30 ms packets, as sipp's g711a.pcap has), skipping other payload types. It once kept
/// only the last packet's, which looked like a bridge relaying one packet of the party's speech.
#[tokio::test]
async fn receive_pcm_keeps_every_packet() {
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let sender = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut sent = Vec::new();
    for k in 0..4u16 {
        // A falling ramp, each packet's starting higher than the last one's.
        let start = 1000 * (i16::try_from(k).expect("small") + 1);
        let samples: Vec<i16> = (0..240).map(|i| start - 3 * i).collect();
        let mut payload = Vec::new();
        sautikit_sip::rtp::g711::encode_into(Codec::Pcmu, &samples, &mut payload);
        let mut decoded = Vec::new();
        sautikit_sip::rtp::g711::decode_into(Codec::Pcmu, &payload, &mut decoded);
        // Packet 2 is PCMA (PT 8): not the peer's codec, so not heard.
        let pt = if k == 2 { 8 } else { 0 };
        if pt == 0 {
            sent.extend_from_slice(&decoded);
        }
        let mut packet = Vec::new();
        sautikit_sip::rtp::RtpHeader::new(pt, 100 + k, 240 * u32::from(k), 9, k == 0)
            .write(&mut packet);
        packet.extend_from_slice(&payload);
        sender.send_to(&packet, rtp.addr()).await.expect("send");
    }
    let heard = rtp.receive_pcm(Duration::from_millis(300)).await;
    assert_eq!(heard.len(), 3 * 240, "every packet's audio is kept");
    assert_eq!(heard, sent);
}

/// A real carrier peer: sipp as the trunk answers in PCMA and speaks sip-tester's g711a.pcap;
/// the caller (PCMU) hears that speech through the bridge, transcoded. sipp's scenario fails
/// unless the INVITE dials +254711000001 presenting the caller's own number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_hears_a_sipp_trunk_through_the_bridge() {
    let trunk_port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("its address").port()
    };
    let ctx = setup_at(
        Backend::Sqlite,
        // No ringback before the party's answer: the caller hears the trunk's speech alone.
        json!({"actions": [{"dial": {"number": "+254711000001", "answerOnBridge": true, "action": "/after"}}]}),
        &format!("sip:127.0.0.1:{trunk_port}"),
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    copy_pcaps(dir.path());
    let scenario = common::calls::scenario(dir.path(), "dial_trunk_pcap.xml", None);
    let trunk = common::calls::sipp_uas(dir.path(), &scenario, trunk_port).await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller.invite(&sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    caller.ack().await;
    let heard = rtp.receive_pcm(Duration::from_secs(9)).await;
    caller.bye().await;
    let out = tokio::time::timeout(Duration::from_secs(30), trunk.wait_with_output())
        .await
        .expect("sipp (trunk) ends")
        .expect("sipp (trunk) runs");
    assert!(
        out.status.success(),
        "sipp (trunk) failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = pcap_alaw(&dir.path().join("g711a.pcap"));
    let corr = correlation(&sent, &heard, 4_000);
    assert!(
        corr >= 0.9,
        "the caller heard the trunk's speech: correlation {corr:.3} over {} samples\n{}",
        heard.len(),
        ctx.server.log_text()
    );
}
