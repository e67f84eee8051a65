//! Calls from registered devices end to end (DESIGN §8): a device authenticates its INVITE as a
//! credential of one number (`407`), calls out through the trunk with that number's identity,
//! paid from the wallet (a minute to start, cut when the balance is spent), or reaches one of our
//! own numbers without the trunk. The trunk and the device are UDP sockets of the test, or sipp
//! on both sides (a UAC with `[authentication]` as the device, a UAS as the carrier).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::device::{Device, challenges_named};
use common::peer::{RtpPeer, reply, sdp, sdp_rtp};
use common::uac::{header, status_code};
use common::voice::VoiceServer;
use common::{Api, Backend, Mode, Server, TestDb, wait_for_json};
use sautikit_sip::sdp::Codec;
use serde_json::{Value, json};
use tokio::net::UdpSocket;

const FIRST: &str = "01900000-0000-7000-8000-000000000001";
const SECOND: &str = "01900000-0000-7000-8000-000000000002";
const DIALLED: &str = "+254711000001";

struct Ctx {
    _db: TestDb,
    server: Server,
    api: Api,
    key: String,
    number_id: String,
    trunk: UdpSocket,
}

/// A server whose trunk is a UDP socket of the test; a workspace holding `talk_minor` after
/// claiming +254700000001 (outbound rate KES 3.00 a minute).
async fn setup(backend: Backend, talk_minor: i64, env: &[(&str, &str)]) -> Ctx {
    let db = TestDb::new(backend).await;
    let trunk = UdpSocket::bind("127.0.0.1:0").await.expect("trunk socket");
    let trunk_uri = format!("sip:{}", trunk.local_addr().unwrap());
    let mut all: Vec<(&str, &str)> = vec![("SAUTIKIT_OUTBOUND_TRUNK", trunk_uri.as_str())];
    all.extend_from_slice(env);
    let server = Server::start_with(&db, Mode::Dev, &all);
    let (_, key) = db.workspace("caller", 10_000 + talk_minor);
    let api = server.api(&key);
    let number_id = common::device::claim(&api, FIRST).await;
    Ctx {
        _db: db,
        server,
        api,
        key,
        number_id,
        trunk,
    }
}

impl Ctx {
    async fn device(&self) -> Device {
        let (_, user, password) =
            common::device::new_credential(&self.api, &self.number_id, "desk").await;
        Device::udp(self.server.sip_addr(), &user, &password).await
    }

    async fn trunk_recv(&self, wait: Duration) -> Option<(String, SocketAddr)> {
        let mut buf = vec![0u8; 65_535];
        let (n, from) = tokio::time::timeout(wait, self.trunk.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    }

    async fn trunk_send(&self, text: &str, to: SocketAddr) {
        self.trunk.send_to(text.as_bytes(), to).await.expect("send");
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

/// The device's INVITE to `to`, answering our `407` with its credentials. Returns the final
/// response (provisional ones skipped) and the INVITE that got it.
async fn device_call(dev: &mut Device, to: &str, offer: &str) -> (String, String) {
    let call_id = format!("out-{}", uuid::Uuid::now_v7().simple());
    let invite = |dev: &Device, cseq: u32, auth: Option<String>| {
        let auth = auth
            .map(|a| format!("Proxy-Authorization: {a}\r\n"))
            .unwrap_or_default();
        format!(
            "INVITE sip:{to}@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{b};rport\r\n\
             From: <sip:{user}@{server_ip}>;tag=dev{cseq}\r\nTo: <sip:{to}@{server}>\r\n\
             Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <{contact}>\r\nMax-Forwards: 70\r\n\
             {auth}Content-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{offer}",
            server = dev.server,
            server_ip = dev.server.ip(),
            me = dev.local,
            b = uuid::Uuid::now_v7().simple(),
            user = dev.user,
            contact = dev.contact(),
            len = offer.len(),
        )
    };
    let first = invite(dev, 1, None);
    let challenge = dev.transact(&first).await;
    assert_eq!(status_code(&challenge), Some(407), "{challenge}");
    let ack = format!(
        "ACK sip:{to}@{} SIP/2.0\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        dev.server,
        header(&first, "Via").unwrap(),
        header(&first, "From").unwrap(),
        header(&challenge, "To").unwrap(),
    );
    dev.send(&ack).await;
    let c = challenges_named(&challenge, "Proxy-Authenticate")
        .into_iter()
        .find(|c| c.algorithm == "SHA-256")
        .expect("a SHA-256 challenge");
    let auth = common::device::authorization(
        &c,
        &dev.user,
        &dev.password,
        "INVITE",
        &format!("sip:{to}@{}", dev.server),
        1,
        "dev-cnonce",
    );
    let second = invite(dev, 2, Some(auth));
    dev.send(&second).await;
    loop {
        let msg = dev
            .recv(Duration::from_secs(15))
            .await
            .expect("an answer to the INVITE");
        match status_code(&msg) {
            Some(code) if code >= 200 => return (msg, second),
            _ => continue,
        }
    }
}

fn ack_for(invite: &str, ok: &str) -> String {
    format!(
        "ACK {} SIP/2.0\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 2 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        invite.split(' ').nth(1).unwrap(),
        header(invite, "Via").unwrap(),
        header(invite, "From").unwrap(),
        header(ok, "To").unwrap(),
        header(invite, "Call-ID").unwrap(),
    )
}

async fn calls_out_through_the_trunk_billed_per_second(backend: Backend) {
    let ctx = setup(backend, 100_000, &[]).await;
    let dev = ctx.device().await;
    let dev_rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let trunk_rtp = RtpPeer::new(Codec::Pcma, 2).await;
    let offer = sdp(dev_rtp.addr(), Codec::Pcmu, 101);
    let device = tokio::spawn({
        let mut dev = dev;
        async move {
            let (ok, invite) = device_call(&mut dev, DIALLED, &offer).await;
            (dev, ok, invite)
        }
    });
    // The trunk gets our INVITE: E.164 with `+`, From and P-Asserted-Identity = the number.
    let (invite, from) = ctx
        .trunk_recv(Duration::from_secs(10))
        .await
        .expect("an INVITE at the trunk");
    assert!(
        invite.starts_with(&format!("INVITE sip:{DIALLED}@")),
        "{invite}"
    );
    assert!(
        header(&invite, "From")
            .unwrap()
            .contains("sip:+254700000001@"),
        "{invite}"
    );
    assert!(
        header(&invite, "P-Asserted-Identity")
            .unwrap()
            .contains("sip:+254700000001@"),
        "{invite}"
    );
    let ours = sdp_rtp(&invite).expect("an offer");
    ctx.trunk_send(&reply(&invite, 180, "Ringing", "trunk", None), from)
        .await;
    ctx.trunk_send(
        &reply(
            &invite,
            200,
            "OK",
            "trunk",
            Some(&sdp(trunk_rtp.addr(), Codec::Pcma, 101)),
        ),
        from,
    )
    .await;
    let (mut dev, ok, dev_invite) = device.await.unwrap();
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    dev.send(&ack_for(&dev_invite, &ok)).await;
    let ours_for_dev = sdp_rtp(&ok).unwrap();
    let (_, _, heard_by_trunk) = tokio::join!(
        dev_rtp.send_frames(ours_for_dev, 0, 50),
        trunk_rtp.send_frames(ours, 0, 50),
        trunk_rtp.receive(30, Duration::from_secs(4)),
    );
    let frames = heard_by_trunk.iter().filter(|(_, i)| i.is_some()).count();
    assert!(frames >= 25, "the trunk heard the device: {frames} frames");
    // Talk for two more seconds, then the device hangs up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bye = format!(
        "BYE {} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKdevbye{}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 3 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        dev_invite.split(' ').nth(1).unwrap(),
        dev.local,
        uuid::Uuid::now_v7().simple(),
        header(&dev_invite, "From").unwrap(),
        header(&ok, "To").unwrap(),
        header(&dev_invite, "Call-ID").unwrap(),
    );
    let resp = dev.transact(&bye).await;
    assert_eq!(status_code(&resp), Some(200), "{resp}");
    loop {
        let (msg, from) = ctx
            .trunk_recv(Duration::from_secs(5))
            .await
            .expect("BYE at the trunk");
        if msg.starts_with("BYE ") {
            ctx.trunk_send(&reply(&msg, 200, "OK", "trunk", None), from)
                .await;
            break;
        }
    }
    let call = ctx.last_call("completed").await;
    assert_eq!(call["direction"], "outbound");
    assert_eq!(call["from"], "+254700000001");
    assert_eq!(call["to"], DIALLED);
    let secs = call["duration_seconds"].as_i64().unwrap();
    assert!((3..=6).contains(&secs), "{call}");
    // KES 3.00 a minute, per second: ceil(secs × 300 / 60).
    assert_eq!(
        call["cost_minor"].as_i64().unwrap(),
        (secs * 300 + 59) / 60,
        "{call}"
    );
}
on_both_backends!(calls_out_through_the_trunk_billed_per_second);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn less_than_a_minute_of_balance_is_402_and_nothing_reaches_the_trunk() {
    let ctx = setup(Backend::Sqlite, 299, &[]).await;
    let mut dev = ctx.device().await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let (fin, _) = device_call(&mut dev, DIALLED, &sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    assert_eq!(status_code(&fin), Some(402), "{fin}");
    assert!(ctx.trunk_recv(Duration::from_millis(500)).await.is_none());
    let call = ctx.last_call("failed").await;
    assert_eq!(call["failure_reason"], "wallet.insufficient_funds");
    let wallet = ctx.api.get("/v1/wallet").await.json();
    assert_eq!(wallet["balance_minor"], 299);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_is_cut_when_the_balance_is_spent() {
    // 90 s of talk at KES 3.00 a minute: 450 minor units.
    let ctx = setup(Backend::Sqlite, 450, &[]).await;
    let mut dev = ctx.device().await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let offer = sdp(rtp.addr(), Codec::Pcmu, 101);
    let device = tokio::spawn(async move {
        let (ok, invite) = device_call(&mut dev, DIALLED, &offer).await;
        (dev, ok, invite)
    });
    let (invite, from) = ctx
        .trunk_recv(Duration::from_secs(10))
        .await
        .expect("an INVITE");
    let trunk_rtp = RtpPeer::new(Codec::Pcmu, 2).await;
    ctx.trunk_send(
        &reply(
            &invite,
            200,
            "OK",
            "trunk",
            Some(&sdp(trunk_rtp.addr(), Codec::Pcmu, 101)),
        ),
        from,
    )
    .await;
    let answered = Instant::now();
    let (mut dev, ok, dev_invite) = device.await.unwrap();
    dev.send(&ack_for(&dev_invite, &ok)).await;
    let ours = sdp_rtp(&invite).unwrap();
    let ours_for_dev = sdp_rtp(&ok).unwrap();
    // Keep both legs talking (a silent leg would end the call for another reason).
    let talk = tokio::spawn(async move {
        tokio::join!(
            rtp.send_frames(ours_for_dev, 0, 5_000),
            trunk_rtp.send_frames(ours, 0, 5_000)
        );
    });

    let bye = loop {
        let (msg, from) = ctx
            .trunk_recv(Duration::from_secs(100))
            .await
            .expect("BYE at the trunk");
        if msg.starts_with("BYE ") {
            ctx.trunk_send(&reply(&msg, 200, "OK", "trunk", None), from)
                .await;
            break answered.elapsed();
        }
    };
    talk.abort();
    assert!(
        bye >= Duration::from_secs(89) && bye <= Duration::from_secs(91),
        "cut at {bye:?}"
    );
    let got_bye = loop {
        let msg = dev
            .recv(Duration::from_secs(5))
            .await
            .expect("BYE at the device");
        if msg.starts_with("BYE ") {
            break msg;
        }
    };
    dev.send(&reply(&got_bye, 200, "OK", "dev", None)).await;
    let call = ctx.last_call("completed").await;
    assert_eq!(call["hangup_cause"], "balance_exhausted", "{call}");
    let wallet = ctx.api.get("/v1/wallet").await.json();
    assert_eq!(wallet["balance_minor"], 0, "{wallet}");
}

/// Real SIP peers on both sides: a sipp UAC as the device (answering our `407` with its
/// credential through sipp's `[authentication]`, which speaks MD5 only) and a sipp UAS as the
/// carrier trunk, whose scenario fails unless the INVITE dials `+254711000001` and presents the
/// number in From and P-Asserted-Identity. The call is billed per second at the outbound rate.
async fn a_sipp_device_calls_out_through_a_sipp_trunk(backend: Backend) {
    let trunk_port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("its address").port()
    };
    let trunk_uri = format!("sip:127.0.0.1:{trunk_port}");
    let ctx = setup(
        backend,
        100_000,
        &[
            ("SAUTIKIT_OUTBOUND_TRUNK", trunk_uri.as_str()),
            ("SAUTIKIT_SIP_DIGEST_ALGORITHMS", "MD5"),
        ],
    )
    .await;
    let (_, user, password) =
        common::device::new_credential(&ctx.api, &ctx.number_id, "sipp").await;
    let dir = ctx._db.data_dir.clone();
    let uas_scenario = common::calls::scenario(&dir, "trunk_uas.xml", None);
    let uac_scenario = common::calls::scenario(&dir, "device_out_uac.xml", None);
    let trunk = common::calls::sipp_uas(&dir, &uas_scenario, trunk_port).await;
    let (ok, out) = common::calls::sipp(
        &dir,
        ctx.server.sip_addr(),
        &[
            "-sf",
            &uac_scenario,
            "-s",
            &user,
            "-au",
            &user,
            "-ap",
            &password,
            "-m",
            "1",
        ],
    )
    .await;
    assert!(ok, "sipp (device) failed:\n{out}");
    let trunk = tokio::time::timeout(Duration::from_secs(30), trunk.wait_with_output())
        .await
        .expect("sipp (trunk) ends")
        .expect("sipp (trunk) runs");
    assert!(
        trunk.status.success(),
        "sipp (trunk) failed:\n{}{}",
        String::from_utf8_lossy(&trunk.stdout),
        String::from_utf8_lossy(&trunk.stderr)
    );
    let call = ctx.last_call("completed").await;
    assert_eq!(call["direction"], "outbound", "{call}");
    assert_eq!(call["from"], "+254700000001");
    assert_eq!(call["to"], DIALLED);
    let secs = call["duration_seconds"].as_i64().unwrap();
    assert!((3..=5).contains(&secs), "{call}");
    let cost = (secs * 300 + 59) / 60;
    assert_eq!(call["cost_minor"].as_i64().unwrap(), cost, "{call}");
    let wallet = ctx.api.get("/v1/wallet").await.json();
    assert_eq!(wallet["balance_minor"], 100_000 - cost, "{wallet}");
}
on_both_backends!(a_sipp_device_calls_out_through_a_sipp_trunk);

/// A crash loses no reservation: the engine dies (`kill -9`) while a paid call talks. The restarted
/// engine closes the call as `failed` with `engine.restart`, charges it per second from its row,
/// and releases its reservation: a wallet that held a minute and a half can start a call again.
async fn a_crash_mid_call_settles_the_reservation(backend: Backend) {
    // A heartbeat every third of a second: the call is rated up to the last one.
    let mut ctx = setup(backend, 450, &[("SAUTIKIT_CALL_ORPHAN_SECS", "1")]).await;
    let mut dev = ctx.device().await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let offer = sdp(rtp.addr(), Codec::Pcmu, 101);
    let o = offer.clone();
    let device = tokio::spawn(async move {
        let (ok, invite) = device_call(&mut dev, DIALLED, &o).await;
        (dev, ok, invite)
    });
    let (invite, from) = ctx
        .trunk_recv(Duration::from_secs(10))
        .await
        .expect("INVITE");
    let trunk_rtp = RtpPeer::new(Codec::Pcmu, 2).await;
    let answer = sdp(trunk_rtp.addr(), Codec::Pcmu, 101);
    ctx.trunk_send(&reply(&invite, 200, "OK", "trunk", Some(&answer)), from)
        .await;
    let (mut dev, ok, dev_invite) = device.await.unwrap();
    dev.send(&ack_for(&dev_invite, &ok)).await;
    ctx.last_call("answered").await;

    // While it talks, its minute is held: a second call is refused.
    let mut second = ctx.device().await;
    let (fin, _) = device_call(&mut second, DIALLED, &offer).await;
    assert_eq!(status_code(&fin), Some(402), "{fin}");
    // Some talk before the crash.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let pid = ctx.server.pid().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let trunk_uri = format!("sip:{}", ctx.trunk.local_addr().unwrap());
    ctx.server = Server::start_with(
        &ctx._db,
        Mode::Dev,
        &[
            ("SAUTIKIT_OUTBOUND_TRUNK", trunk_uri.as_str()),
            ("SAUTIKIT_CALL_ORPHAN_SECS", "1"),
        ],
    );
    ctx.api = ctx.server.api(&ctx.key);
    let calls = wait_for_json(
        &ctx.api,
        "/v1/calls?limit=2",
        Duration::from_secs(30),
        |v| v[1]["status"] == "failed",
    )
    .await;
    let call = &calls[1];
    assert_eq!(call["failure_reason"], "engine.restart", "{call}");
    let secs = call["duration_seconds"].as_i64().unwrap();
    let cost = call["cost_minor"].as_i64().unwrap();
    assert!((1..=30).contains(&secs), "{call}");
    assert_eq!(cost, (secs * 300 + 59) / 60, "{call}");
    let wallet = ctx.api.get("/v1/wallet").await.json();
    assert_eq!(wallet["balance_minor"], 450 - cost, "{wallet}");

    // The reservation is gone with the call: a new call reaches the trunk.
    let mut third = ctx.device().await;
    let calling = tokio::spawn(async move { device_call(&mut third, DIALLED, &offer).await });
    let (again, from) = loop {
        let (m, f) = ctx
            .trunk_recv(Duration::from_secs(10))
            .await
            .expect("INVITE");
        if m.starts_with("INVITE ") && header(&m, "Call-ID") != header(&invite, "Call-ID") {
            break (m, f);
        }
    };
    ctx.trunk_send(&reply(&again, 486, "Busy Here", "trunk", None), from)
        .await;
    let (fin, _) = calling.await.unwrap();
    assert_eq!(status_code(&fin), Some(486), "{fin}");
}
on_both_backends!(a_crash_mid_call_settles_the_reservation);

/// Concurrent calls of one wallet share its balance: with 1.5 minutes of talk, a call that rings
/// holds one minute, so a second call gets `402`; once the first ends, its minute is free again.
async fn calls_of_one_wallet_share_the_balance(backend: Backend) {
    let ctx = setup(backend, 450, &[]).await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let offer = sdp(rtp.addr(), Codec::Pcmu, 101);
    let mut first_dev = ctx.device().await;
    let o = offer.clone();
    let first = tokio::spawn(async move { device_call(&mut first_dev, DIALLED, &o).await });
    let (invite, from) = ctx
        .trunk_recv(Duration::from_secs(10))
        .await
        .expect("INVITE");
    ctx.trunk_send(&reply(&invite, 180, "Ringing", "trunk", None), from)
        .await;

    let mut second_dev = ctx.device().await;
    let (fin, _) = device_call(&mut second_dev, DIALLED, &offer).await;
    assert_eq!(status_code(&fin), Some(402), "{fin}");
    let first_call_id = header(&invite, "Call-ID").unwrap().to_owned();
    while let Some((m, _)) = ctx.trunk_recv(Duration::from_millis(300)).await {
        assert_eq!(
            header(&m, "Call-ID"),
            Some(first_call_id.as_str()),
            "the refused call reached the trunk: {m}"
        );
    }

    ctx.trunk_send(&reply(&invite, 486, "Busy Here", "trunk", None), from)
        .await;
    let (fin, _) = first.await.unwrap();
    assert_eq!(status_code(&fin), Some(486), "{fin}");
    // The first call ends (its row after the refused one's, which started later).
    wait_for_json(
        &ctx.api,
        "/v1/calls?limit=2",
        Duration::from_secs(15),
        |v| v[1]["status"] == "busy",
    )
    .await;
    let mut third_dev = ctx.device().await;
    let third = tokio::spawn(async move { device_call(&mut third_dev, DIALLED, &offer).await });
    let (again, from) = loop {
        let (m, f) = ctx
            .trunk_recv(Duration::from_secs(10))
            .await
            .expect("INVITE");
        if m.starts_with("INVITE ") {
            break (m, f);
        }
    };
    assert_ne!(header(&again, "Call-ID"), Some(first_call_id.as_str()));
    ctx.trunk_send(&reply(&again, 486, "Busy Here", "trunk", None), from)
        .await;
    let (fin, _) = third.await.unwrap();
    assert_eq!(status_code(&fin), Some(486), "{fin}");
    let wallet = ctx.api.get("/v1/wallet").await.json();
    assert_eq!(
        wallet["balance_minor"], 450,
        "unanswered calls cost nothing"
    );
}
on_both_backends!(calls_of_one_wallet_share_the_balance);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carrier_refusals_challenges_and_no_trunk() {
    let ctx = setup(
        Backend::Sqlite,
        100_000,
        &[
            ("SAUTIKIT_OUTBOUND_TRUNK_USERNAME", "acme"),
            ("SAUTIKIT_OUTBOUND_TRUNK_PASSWORD", "trunk-secret"),
        ],
    )
    .await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let offer = sdp(rtp.addr(), Codec::Pcmu, 101);

    // The carrier challenges (407): we answer with the trunk credentials; then it is busy.
    let mut dev = ctx.device().await;
    let o = offer.clone();
    let device = tokio::spawn(async move { device_call(&mut dev, DIALLED, &o).await });
    let (invite, from) = ctx.trunk_recv(Duration::from_secs(10)).await.unwrap();
    let challenge = "Digest realm=\"carrier\", nonce=\"c4rr13r\", algorithm=MD5, qop=\"auth\"";
    let mut resp = reply(&invite, 407, "Proxy Authentication Required", "trunk", None);
    resp = resp.replace(
        "Content-Length: 0",
        &format!("Proxy-Authenticate: {challenge}\r\nContent-Length: 0"),
    );
    ctx.trunk_send(&resp, from).await;
    let (again, from) = loop {
        let (m, f) = ctx
            .trunk_recv(Duration::from_secs(5))
            .await
            .expect("the INVITE again");
        if m.starts_with("INVITE ") {
            break (m, f);
        }
    };
    let creds =
        sautikit_sip::auth::parse_authorization(header(&again, "Proxy-Authorization").unwrap())
            .expect("credentials");
    let ha1 = sautikit_sip::digest::ha1(
        sautikit_sip::digest::Algorithm::Md5,
        "acme",
        "carrier",
        "trunk-secret",
    );
    assert!(
        sautikit_sip::auth::verify(&creds, "INVITE", &ha1),
        "{again}"
    );
    assert_eq!(header(&again, "Call-ID"), header(&invite, "Call-ID"));
    ctx.trunk_send(&reply(&again, 486, "Busy Here", "trunk", None), from)
        .await;
    let (fin, _) = device.await.unwrap();
    assert_eq!(status_code(&fin), Some(486), "{fin}");
    ctx.last_call("busy").await;

    // A carrier failure: 503 → failed with the code.
    let mut dev = ctx.device().await;
    let o = offer.clone();
    let device = tokio::spawn(async move { device_call(&mut dev, DIALLED, &o).await });
    let (invite, from) = loop {
        let (m, f) = ctx.trunk_recv(Duration::from_secs(10)).await.unwrap();
        if m.starts_with("INVITE ") {
            break (m, f);
        }
    };
    ctx.trunk_send(
        &reply(&invite, 503, "Service Unavailable", "trunk", None),
        from,
    )
    .await;
    let (fin, _) = device.await.unwrap();
    assert_eq!(status_code(&fin), Some(503), "{fin}");
    let call = ctx.last_call("failed").await;
    assert_eq!(call["failure_reason"], "sip.503", "{call}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_trunk_the_device_gets_503() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start_with(&db, Mode::Dev, &[]);
    let (_, key) = db.workspace("caller", 100_000);
    let api = server.api(&key);
    let claimed = api.post(&format!("/v1/numbers/{FIRST}/claim"), None).await;
    let number_id = claimed.json()["id"].as_str().unwrap().to_owned();
    let v = api
        .post(
            &format!("/v1/numbers/{number_id}/sip-credentials"),
            Some(json!({"label": "x"})),
        )
        .await
        .json();
    let mut dev = Device::udp(
        server.sip_addr(),
        v["username"].as_str().unwrap(),
        v["password"].as_str().unwrap(),
    )
    .await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let (fin, _) = device_call(&mut dev, DIALLED, &sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    assert_eq!(status_code(&fin), Some(503), "{fin}");
    let calls = wait_for_json(&api, "/v1/calls?limit=1", Duration::from_secs(10), |v| {
        v[0]["status"] == "failed"
    })
    .await;
    assert_eq!(calls[0]["failure_reason"], "trunk.not_configured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_calling_our_own_number_reaches_its_script_without_the_trunk() {
    let ctx = setup(Backend::Sqlite, 100_000, &[]).await;
    let second = ctx
        .api
        .post(&format!("/v1/numbers/{SECOND}/claim"), None)
        .await;
    assert_eq!(second.status, 201, "{}", second.text);
    let second_id = second.json()["id"].as_str().unwrap().to_owned();
    let voice = VoiceServer::start().await;
    voice.set_script(
        "/answer",
        json!({"actions": [{"pause": {"length": 1}}, {"hangup": {}}]}),
    );
    let routed = ctx
        .api
        .patch(
            &format!("/v1/numbers/{second_id}/routing"),
            json!({"voice_callback_url": voice.url("/answer")}),
        )
        .await;
    assert_eq!(routed.status, 200, "{}", routed.text);
    let mut dev = ctx.device().await;
    let rtp = RtpPeer::new(Codec::Pcmu, 1).await;
    let (ok, invite) =
        device_call(&mut dev, "0700000002", &sdp(rtp.addr(), Codec::Pcmu, 101)).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    dev.send(&ack_for(&invite, &ok)).await;
    let hits = voice.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(
        hits[0].fields.get("From").map(String::as_str),
        Some("+254700000001")
    );
    assert_eq!(
        hits[0].fields.get("To").map(String::as_str),
        Some("+254700000002")
    );
    assert!(
        ctx.trunk_recv(Duration::from_millis(300)).await.is_none(),
        "nothing reaches the trunk"
    );
    let bye = loop {
        let msg = dev
            .recv(Duration::from_secs(10))
            .await
            .expect("the script hangs up");
        if msg.starts_with("BYE ") {
            break msg;
        }
    };
    dev.send(&reply(&bye, 200, "OK", "dev", None)).await;
}
