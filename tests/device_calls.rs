//! Calls to registered devices end to end: a number with no voice callback rings its devices,
//! the first answer is bridged to the caller over our media relay, and either side's BYE ends
//! both legs (DESIGN §3, §8). Caller and devices are real UDP sockets in the test.

mod common;

use std::time::Duration;

use common::device::Device;
use common::peer::{RtpPeer, SipCaller, reply, sdp, sdp_rtp};
use common::receiver::Receiver;
use common::uac::status_code;
use common::{Api, Backend, Mode, Server, TestDb, wait_for_json};
use sautikit_sip::sdp::Codec;
use serde_json::{Value, json};

const NUMBER: &str = "254700000001";

struct Ctx {
    _db: TestDb,
    server: Server,
    api: Api,
    number_id: String,
    events: Receiver,
}

async fn setup(backend: Backend, env: &[(&str, &str)]) -> Ctx {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, env);
    let (_, key) = db.workspace("devices", 100_000);
    let api = server.api(&key);
    let number_id = common::device::claim(&api, common::device::FIRST_INVENTORY_ID).await;
    let events = Receiver::ok().await;
    // Events only: no voice callback, so calls ring the number's devices.
    let routed = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({"events_url": events.url("/events")}),
        )
        .await;
    assert_eq!(routed.status, 200, "{}", routed.text);
    Ctx {
        _db: db,
        server,
        api,
        number_id,
        events,
    }
}

impl Ctx {
    /// A device registered with a new credential of the number.
    async fn device(&self, label: &str) -> Device {
        let (_, user, password) =
            common::device::new_credential(&self.api, &self.number_id, label).await;
        let mut dev = Device::udp(self.server.sip_addr(), &user, &password).await;
        let contact = format!("Contact: <{}>\r\n", dev.contact());
        let ok = dev.register(&contact, "SHA-256").await;
        assert_eq!(status_code(&ok), Some(200), "{ok}");
        dev
    }

    async fn last_call(&self, status: &str) -> Value {
        let v = wait_for_json(
            &self.api,
            "/v1/calls?limit=1",
            Duration::from_secs(15),
            |v| v[0]["status"] == status,
        )
        .await;
        v[0].clone()
    }
}

/// The next request the device gets (keepalive OPTIONS are answered and skipped).
async fn next_request(dev: &mut Device, wait: Duration) -> String {
    loop {
        let msg = dev
            .recv(wait)
            .await
            .expect("a request for the device in time");
        if msg.starts_with("OPTIONS ") {
            dev.send(&reply(&msg, 200, "OK", "dev", None)).await;
            continue;
        }
        if status_code(&msg).is_none() {
            return msg;
        }
    }
}

async fn device_call_bridges_audio_both_ways(backend: Backend) {
    let ctx = setup(backend, &[]).await;
    let mut dev = ctx.device("desk").await;
    let caller_rtp = RtpPeer::new(Codec::Pcmu, 0x1111_1111).await;
    let dev_rtp = RtpPeer::new(Codec::Pcma, 0x2222_2222).await;

    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;

    // The device is rung at the flow it registered from, with our offer.
    let invite = next_request(&mut dev, Duration::from_secs(10)).await;
    assert!(
        invite.starts_with(&format!(
            "INVITE {}",
            dev.contact().split(';').next().unwrap()
        )),
        "{invite}"
    );
    let ours_for_dev = sdp_rtp(&invite).expect("an SDP offer to the device");
    dev.send(&reply(&invite, 180, "Ringing", "dev", None)).await;
    // The device answers with PCMA: the relay transcodes.
    dev.send(&reply(
        &invite,
        200,
        "OK",
        "dev",
        Some(&sdp(dev_rtp.addr(), Codec::Pcma, 96)),
    ))
    .await;
    let ack = next_request(&mut dev, Duration::from_secs(5)).await;
    assert!(ack.starts_with("ACK "), "{ack}");

    let (provisional, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert!(
        provisional.contains(&180),
        "the caller heard ringing: {provisional:?}"
    );
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    let ours_for_caller = sdp_rtp(&ok).expect("an SDP answer to the caller");
    caller.ack().await;

    // Audio both ways at once.
    let (a, b, got_at_dev, got_at_caller) = tokio::join!(
        caller_rtp.send_frames(ours_for_caller, 0, 60),
        dev_rtp.send_frames(ours_for_dev, 0, 60),
        dev_rtp.receive(45, Duration::from_secs(5)),
        caller_rtp.receive(45, Duration::from_secs(5)),
    );
    let _ = (a, b);
    for (side, got, pt) in [
        ("device", &got_at_dev, 8u8),
        ("caller", &got_at_caller, 0u8),
    ] {
        let frames: Vec<u32> = got.iter().filter_map(|(_, i)| *i).collect();
        assert!(
            frames.len() >= 40,
            "{side} heard {} frames of the other side",
            frames.len()
        );
        assert!(
            frames.windows(2).all(|w| w[1] == w[0] + 1),
            "{side} heard the frames in order, none lost: {frames:?}"
        );
        let audio: Vec<_> = got.iter().filter(|(_, i)| i.is_some()).collect();
        assert!(
            audio.iter().all(|(h, _)| h.payload_type == pt),
            "{side}: payload type {pt}"
        );
        let ssrcs: std::collections::HashSet<u32> = got.iter().map(|(h, _)| h.ssrc).collect();
        assert_eq!(ssrcs.len(), 1, "{side} sees one SSRC: {ssrcs:?}");
        let seqs: Vec<u16> = got.iter().map(|(h, _)| h.sequence).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
            "{side}: contiguous sequence numbers {seqs:?}"
        );
    }

    // The caller hangs up: the device gets BYE.
    caller.bye().await;
    let bye = next_request(&mut dev, Duration::from_secs(5)).await;
    assert!(bye.starts_with("BYE "), "{bye}");
    dev.send(&reply(&bye, 200, "OK", "dev", None)).await;

    let call = ctx.last_call("completed").await;
    assert_eq!(call["direction"], "inbound");
    assert_eq!(call["to"], format!("+{NUMBER}"));
    assert!(call["answered_at"].is_string(), "{call}");
    let id = call["id"].as_str().unwrap();
    let timeline = ctx.api.get(&format!("/v1/calls/{id}/events")).await.json();
    let legs = timeline
        .as_array()
        .map(|a| a.iter().filter(|e| e["detail"]["leg"].is_string()).count())
        .unwrap_or(0);
    assert!(
        legs >= 3,
        "the timeline shows the device leg's SIP messages: {timeline}"
    );
    let hits = ctx
        .events
        .wait_until(Duration::from_secs(10), |h| {
            h.iter().any(|h| h.json()["event_kind"] == "call.completed")
        })
        .await;
    let kinds: Vec<String> = hits
        .iter()
        .map(|h| h.json()["event_kind"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        kinds,
        ["call.started", "call.answered", "call.completed"],
        "{kinds:?}"
    );
}
on_both_backends!(device_call_bridges_audio_both_ways);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_hangs_up_first() {
    let ctx = setup(Backend::Sqlite, &[]).await;
    let mut dev = ctx.device("desk").await;
    let caller_rtp = RtpPeer::new(Codec::Pcmu, 7).await;
    let dev_rtp = RtpPeer::new(Codec::Pcmu, 8).await;
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    let invite = next_request(&mut dev, Duration::from_secs(10)).await;
    dev.send(&reply(
        &invite,
        200,
        "OK",
        "dev",
        Some(&sdp(dev_rtp.addr(), Codec::Pcmu, 101)),
    ))
    .await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    caller.ack().await;
    let _ack = next_request(&mut dev, Duration::from_secs(5)).await;
    // The device's BYE (in its own dialog: our From tag is in the INVITE's From, its tag in To).
    let bye = format!(
        "BYE sip:{NUMBER}@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKdevbye\r\n\
         From: {to};tag=dev\r\nTo: {from}\r\nCall-ID: {cid}\r\nCSeq: 2 BYE\r\nMax-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n",
        server = ctx.server.sip_addr(),
        me = dev.local,
        to = common::uac::header(&invite, "To").unwrap(),
        from = common::uac::header(&invite, "From").unwrap(),
        cid = common::uac::header(&invite, "Call-ID").unwrap(),
    );
    let resp = dev.transact(&bye).await;
    assert_eq!(status_code(&resp), Some(200), "{resp}");
    caller.await_bye(Duration::from_secs(5)).await;
    let call = ctx.last_call("completed").await;
    assert_eq!(call["hangup_cause"], "callee_hangup", "{call}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_no_answer_and_the_first_answer_wins() {
    let ctx = setup(Backend::Sqlite, &[("SAUTIKIT_DEVICE_RING_SECS", "2")]).await;
    let mut desk = ctx.device("desk").await;
    let mut phone = ctx.device("phone").await;
    let caller_rtp = RtpPeer::new(Codec::Pcmu, 7).await;

    // Both refuse busy: the caller gets 486 and the call is busy.
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    for dev in [&mut desk, &mut phone] {
        let invite = next_request(dev, Duration::from_secs(10)).await;
        dev.send(&reply(&invite, 486, "Busy Here", "dev", None))
            .await;
        // Our transaction layer acknowledges the refusal.
        let ack = next_request(dev, Duration::from_secs(5)).await;
        assert!(ack.starts_with("ACK "), "{ack}");
    }
    let (_, fin) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&fin), Some(486), "{fin}");
    ctx.last_call("busy").await;

    // Nobody answers: 480 after the ring time, and both devices get CANCEL.
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    let mut invites = Vec::new();
    for dev in [&mut desk, &mut phone] {
        let invite = next_request(dev, Duration::from_secs(10)).await;
        dev.send(&reply(&invite, 180, "Ringing", "dev", None)).await;
        invites.push(invite);
    }
    let (provisional, fin) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(provisional.iter().filter(|c| **c == 180).count().min(1), 1);
    assert_eq!(status_code(&fin), Some(480), "{fin}");
    for (dev, invite) in [&mut desk, &mut phone].into_iter().zip(&invites) {
        let cancel = next_request(dev, Duration::from_secs(5)).await;
        assert!(
            cancel.starts_with("CANCEL "),
            "{cancel}\n---- the INVITE was:\n{invite}"
        );
        dev.send(&reply(&cancel, 200, "OK", "dev", None)).await;
        dev.send(&reply(invite, 487, "Request Terminated", "dev", None))
            .await;
        let ack = next_request(dev, Duration::from_secs(5)).await;
        assert!(ack.starts_with("ACK "), "{ack}");
    }
    ctx.last_call("no_answer").await;

    // The phone answers first: the desk gets CANCEL and the call is bridged to the phone.
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    let desk_invite = next_request(&mut desk, Duration::from_secs(10)).await;
    desk.send(&reply(&desk_invite, 180, "Ringing", "dev", None))
        .await;
    let phone_invite = next_request(&mut phone, Duration::from_secs(10)).await;
    let phone_rtp = RtpPeer::new(Codec::Pcmu, 9).await;
    phone
        .send(&reply(
            &phone_invite,
            200,
            "OK",
            "dev",
            Some(&sdp(phone_rtp.addr(), Codec::Pcmu, 101)),
        ))
        .await;
    let cancel = next_request(&mut desk, Duration::from_secs(5)).await;
    assert!(cancel.starts_with("CANCEL "), "{cancel}");
    desk.send(&reply(&cancel, 200, "OK", "dev", None)).await;
    desk.send(&reply(&desk_invite, 487, "Request Terminated", "dev", None))
        .await;
    let ack = next_request(&mut desk, Duration::from_secs(5)).await;
    assert!(ack.starts_with("ACK "), "{ack}");
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    caller.ack().await;
    let ack = next_request(&mut phone, Duration::from_secs(5)).await;
    assert!(ack.starts_with("ACK "), "{ack}");
    caller.bye().await;
    let bye = next_request(&mut phone, Duration::from_secs(5)).await;
    assert!(bye.starts_with("BYE "), "{bye}");
    phone.send(&reply(&bye, 200, "OK", "dev", None)).await;
    ctx.last_call("completed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_gives_up_while_devices_ring() {
    let ctx = setup(Backend::Sqlite, &[]).await;
    let mut dev = ctx.device("desk").await;
    let caller_rtp = RtpPeer::new(Codec::Pcmu, 7).await;
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    let invite_text = caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    let invite = next_request(&mut dev, Duration::from_secs(10)).await;
    dev.send(&reply(&invite, 180, "Ringing", "dev", None)).await;
    let ringing = caller
        .recv(Duration::from_secs(5))
        .await
        .expect("a provisional");
    assert!(
        matches!(status_code(&ringing), Some(100) | Some(180)),
        "{ringing}"
    );
    caller.cancel(&invite_text).await;
    let cancel = next_request(&mut dev, Duration::from_secs(5)).await;
    assert!(cancel.starts_with("CANCEL "), "{cancel}");
    dev.send(&reply(&cancel, 200, "OK", "dev", None)).await;
    dev.send(&reply(&invite, 487, "Request Terminated", "dev", None))
        .await;
    let (_, fin) = caller.await_final(Duration::from_secs(5)).await;
    assert_eq!(status_code(&fin), Some(487), "{fin}");
    ctx.last_call("canceled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_leg_ends_the_call() {
    let ctx = setup(Backend::Sqlite, &[("SAUTIKIT_MEDIA_TIMEOUT_SECS", "1")]).await;
    let mut dev = ctx.device("desk").await;
    let caller_rtp = RtpPeer::new(Codec::Pcmu, 7).await;
    let dev_rtp = RtpPeer::new(Codec::Pcmu, 8).await;
    let mut caller = SipCaller::new(ctx.server.sip_addr(), NUMBER).await;
    caller
        .invite(&sdp(caller_rtp.addr(), Codec::Pcmu, 101))
        .await;
    let invite = next_request(&mut dev, Duration::from_secs(10)).await;
    let ours_for_dev = sdp_rtp(&invite).unwrap();
    dev.send(&reply(
        &invite,
        200,
        "OK",
        "dev",
        Some(&sdp(dev_rtp.addr(), Codec::Pcmu, 101)),
    ))
    .await;
    let (_, ok) = caller.await_final(Duration::from_secs(10)).await;
    let ours_for_caller = sdp_rtp(&ok).unwrap();
    caller.ack().await;
    // Both talk for a moment, then both fall silent.
    tokio::join!(
        caller_rtp.send_frames(ours_for_caller, 0, 10),
        dev_rtp.send_frames(ours_for_dev, 0, 10),
    );
    caller.await_bye(Duration::from_secs(10)).await;
    let call = ctx.last_call("completed").await;
    assert_eq!(call["hangup_cause"], "media_timeout", "{call}");
    loop {
        let msg = next_request(&mut dev, Duration::from_secs(5)).await;
        if msg.starts_with("BYE ") {
            break;
        }
    }
}
