//! The media bridge of a B2BUA call: two legs' RTP relayed both ways on the media thread, over
//! real UDP sockets on 127.0.0.1. Each test runs its own engine on its own stretch of ports
//! (31700-31859: below the ephemeral range, clear of the other tests' stretches).

use std::f64::consts::PI;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sautikit_actors::media::{
    Media, MediaEvent, MediaEvents, RecordingEnd, RecordingSpec, RtpPort, StreamParams,
};
use sautikit_actors::synth::Audio;
use sautikit_sip::rtp::{RtpHeader, g711};
use sautikit_sip::sdp::Codec;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{interval, timeout};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(3);
const TE_A: u8 = 101;
const TE_B: u8 = 96;

fn events() -> (MediaEvents, mpsc::UnboundedReceiver<MediaEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let events: MediaEvents = Arc::new(move |e: MediaEvent| {
        // Each stream's first packet is reported once (`early_media_is_reported_once_it_flows`
        // checks it); the bridge's own events are what these tests follow.
        if !matches!(e, MediaEvent::RemoteMediaStarted) {
            let _ = tx.send(e);
        }
    });
    (events, rx)
}

#[tokio::test]
async fn early_media_is_reported_once_it_flows() {
    let media = Media::start(LOCAL, 31_840, 31_859, 1, false);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let events: MediaEvents = Arc::new(move |e: MediaEvent| {
        let _ = tx.send(e);
    });
    let port = media.open(events).await.expect("a port");
    let phone = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    media.start_stream(
        port.id,
        StreamParams {
            remote: phone.local_addr().expect("addr"),
            codec: Codec::Pcmu,
            payload_type: 0,
            telephone_event: None,
        },
    );
    assert!(
        timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing reported before the remote sends"
    );
    let mut talk = Talker::new(7, Codec::Pcmu);
    for k in 0..3 {
        let packet = talk.audio(&[0; 160], k == 0);
        phone.send_to(&packet, port.local).await.expect("send");
    }
    assert!(matches!(
        next_event(&mut rx).await,
        MediaEvent::RemoteMediaStarted
    ));
    assert!(
        timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "reported once"
    );
    media.close(port.id);
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<MediaEvent>) -> MediaEvent {
    timeout(WAIT, rx.recv())
        .await
        .expect("a media event in time")
        .expect("events open")
}

/// A received packet.
#[derive(Debug, Clone)]
struct Got {
    header: RtpHeader,
    payload: Vec<u8>,
}

/// A fake phone: a UDP socket, and what arrives on it from its leg's media port. (Packets from
/// elsewhere are ignored: other tests on this machine may leave streams sending to a port this
/// phone then binds.)
struct Phone {
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Got>,
}

impl Phone {
    async fn bind(leg: SocketAddr) -> Phone {
        let socket = Arc::new(UdpSocket::bind((LOCAL, 0)).await.expect("bind"));
        let addr = socket.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        let s = socket.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = s.recv_from(&mut buf).await else {
                    continue;
                };
                if from != leg {
                    continue;
                }
                if let Ok((header, payload)) = RtpHeader::parse(&buf[..n])
                    && tx
                        .send(Got {
                            header,
                            payload: payload.to_vec(),
                        })
                        .is_err()
                {
                    return;
                }
            }
        });
        Phone { socket, addr, rx }
    }

    async fn next(&mut self) -> Got {
        timeout(WAIT, self.rx.recv())
            .await
            .expect("a packet in time")
            .expect("socket open")
    }

    /// What arrives within `quiet` of the last packet (the flow has stopped).
    async fn drain(&mut self, quiet: Duration) -> Vec<Got> {
        let mut got = Vec::new();
        while let Ok(Some(p)) = timeout(quiet, self.rx.recv()).await {
            got.push(p);
        }
        got
    }

    async fn send(&self, to: SocketAddr, packet: &[u8]) {
        self.socket.send_to(packet, to).await.expect("send");
    }
}

/// A fake phone's outgoing stream.
struct Talker {
    ssrc: u32,
    seq: u16,
    ts: u32,
    codec: Codec,
}

impl Talker {
    fn new(ssrc: u32, codec: Codec) -> Talker {
        Talker {
            ssrc,
            seq: 40_000,
            ts: 7_777,
            codec,
        }
    }

    fn audio(&mut self, samples: &[i16], marker: bool) -> Vec<u8> {
        let mut payload = Vec::new();
        g711::encode_into(self.codec, samples, &mut payload);
        let pt = self.codec.payload_type();
        let p = self.packet(pt, self.ts, marker, &payload);
        self.ts = self.ts.wrapping_add(samples.len() as u32);
        p
    }

    fn packet(&mut self, pt: u8, ts: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        RtpHeader::new(pt, self.seq, ts, self.ssrc, marker).write(&mut buf);
        buf.extend_from_slice(payload);
        self.seq = self.seq.wrapping_add(1);
        buf
    }

    /// One RFC 4733 key press of `code` (three updates, three end packets), named by the
    /// current timestamp.
    fn key(&mut self, pt: u8, code: u8) -> Vec<Vec<u8>> {
        let start = self.ts;
        let mut packets = Vec::new();
        for (i, end) in [false, false, false, true, true, true]
            .into_iter()
            .enumerate()
        {
            let duration = 160 * (i.min(3) as u16 + 1);
            let [d0, d1] = duration.to_be_bytes();
            let flags = if end { 0x8a } else { 0x0a };
            packets.push(self.packet(pt, start, i == 0, &[code, flags, d0, d1]));
        }
        self.ts = self.ts.wrapping_add(640);
        packets
    }
}

/// Frame `k` (20 ms) of a tone of period `period` samples: consecutive frames differ clearly.
fn frame(period: f64, k: u32) -> Vec<i16> {
    (0..160)
        .map(|i| {
            let n = f64::from(160 * k + i);
            (12_000.0 * (2.0 * PI * n / period).sin()) as i16
        })
        .collect()
}

fn tone_a(k: u32) -> Vec<i16> {
    frame(173.0, k)
}

fn tone_b(k: u32) -> Vec<i16> {
    frame(151.0, k)
}

/// Whether `payload` (in `codec`) is `samples` after G.711 coding, transcoding included.
fn sounds_like(codec: Codec, payload: &[u8], samples: &[i16]) -> bool {
    let mut decoded = Vec::new();
    g711::decode_into(codec, payload, &mut decoded);
    decoded.len() == samples.len()
        && decoded.iter().zip(samples).all(|(&got, &want)| {
            let (got, want) = (i32::from(got), i32::from(want));
            (got - want).abs() <= want.abs() / 8 + 64
        })
}

fn is_silence(codec: Codec, payload: &[u8]) -> bool {
    let silence = match codec {
        Codec::Pcmu => g711::SILENCE_PCMU,
        Codec::Pcma => g711::SILENCE_PCMA,
    };
    payload.len() == 160 && payload.iter().all(|&b| b == silence)
}

/// One leg's outgoing stream as a phone sees it: one SSRC, sequence numbers without a gap.
struct Stream {
    ssrc: u32,
    last_seq: u16,
    last_ts: u32,
}

impl Stream {
    fn new(first: &Got) -> Stream {
        Stream {
            ssrc: first.header.ssrc,
            last_seq: first.header.sequence,
            last_ts: first.header.timestamp,
        }
    }

    fn follows(&mut self, p: &Got) {
        assert_eq!(p.header.ssrc, self.ssrc, "one SSRC per stream");
        assert_eq!(
            p.header.sequence,
            self.last_seq.wrapping_add(1),
            "sequence numbers without a gap"
        );
        self.last_seq = p.header.sequence;
        self.last_ts = p.header.timestamp;
    }
}

fn params(remote: SocketAddr, codec: Codec, te: Option<u8>) -> StreamParams {
    StreamParams {
        remote,
        codec,
        payload_type: codec.payload_type(),
        telephone_event: te,
    }
}

/// Two legs on one thread, started, each with its phone; the pacer's first packet checked.
struct Call {
    media: Media,
    a: RtpPort,
    b: RtpPort,
    a_events: mpsc::UnboundedReceiver<MediaEvent>,
    b_events: mpsc::UnboundedReceiver<MediaEvent>,
    phone_a: Phone,
    phone_b: Phone,
    heard_a: Stream,
    heard_b: Stream,
}

async fn call(ports: (u16, u16), codecs: (Codec, Codec), te: (Option<u8>, Option<u8>)) -> Call {
    let media = Media::start(LOCAL, ports.0, ports.1, 1, false);
    let (ev_a, a_events) = events();
    let (ev_b, b_events) = events();
    let a = media.open(ev_a).await.expect("open a");
    let b = media.open_beside(a.id, ev_b).await.expect("open b");
    assert!(media.same_thread(a.id, b.id));
    let mut phone_a = Phone::bind(a.local).await;
    let mut phone_b = Phone::bind(b.local).await;
    media.start_stream(a.id, params(phone_a.addr, codecs.0, te.0));
    media.start_stream(b.id, params(phone_b.addr, codecs.1, te.1));
    // Before the bridge: the pacer's silence, a talkspurt starting.
    let first_a = phone_a.next().await;
    assert!(first_a.header.marker, "{first_a:?}");
    assert!(is_silence(codecs.0, &first_a.payload));
    assert_eq!(first_a.header.payload_type, codecs.0.payload_type());
    let first_b = phone_b.next().await;
    assert!(is_silence(codecs.1, &first_b.payload));
    Call {
        media,
        a,
        b,
        a_events,
        b_events,
        heard_a: Stream::new(&first_a),
        heard_b: Stream::new(&first_b),
        phone_a,
        phone_b,
    }
}

/// Read what `phone` hears until frame `last` of `tone` (in `codec`) arrives: the pacer's silence
/// first, then the other leg's frames relayed, in order, from one of the first few; the first
/// relayed one marked, 160 samples apart. Returns how many were relayed.
async fn hears(
    phone: &mut Phone,
    heard: &mut Stream,
    codec: Codec,
    tone: fn(u32) -> Vec<i16>,
    last: u32,
) -> u32 {
    let mut next_k: Option<u32> = None;
    let mut relayed = 0;
    loop {
        let p = phone.next().await;
        heard.follows(&p);
        assert_eq!(p.header.payload_type, codec.payload_type());
        let k = match next_k {
            None if is_silence(codec, &p.payload) => continue,
            None => {
                let k = (0..5)
                    .find(|&k| sounds_like(codec, &p.payload, &tone(k)))
                    .expect("the first relayed frame is one of the first sent");
                assert!(
                    p.header.marker,
                    "the first relayed packet starts a talkspurt"
                );
                k
            }
            Some(k) => {
                assert!(
                    sounds_like(codec, &p.payload, &tone(k)),
                    "frame {k} relayed in order"
                );
                assert!(!p.header.marker);
                k
            }
        };
        relayed += 1;
        next_k = Some(k + 1);
        if k == last {
            return relayed;
        }
    }
}

#[tokio::test]
async fn bridge_relays_transcodes_latches_and_keeps_each_stream_continuous() {
    let mut c = call(
        (31_700, 31_719),
        (Codec::Pcmu, Codec::Pcma),
        (Some(TE_A), Some(TE_B)),
    )
    .await;
    c.media.bridge(c.a.id, c.b.id, Duration::from_secs(60));

    // Both talk for a second.
    let mut talk_a = Talker::new(0xa1a1_0001, Codec::Pcmu);
    let mut talk_b = Talker::new(0xb2b2_0002, Codec::Pcma);
    let mut tick = interval(Duration::from_millis(20));
    for k in 0..50 {
        tick.tick().await;
        c.phone_a
            .send(c.a.local, &talk_a.audio(&tone_a(k), k == 0))
            .await;
        c.phone_b
            .send(c.b.local, &talk_b.audio(&tone_b(k), k == 0))
            .await;
    }
    // Each hears the other, transcoded, in its own stream.
    let relayed = hears(&mut c.phone_b, &mut c.heard_b, Codec::Pcma, tone_a, 49).await;
    assert!(relayed >= 45, "{relayed} of A's frames relayed");
    let relayed = hears(&mut c.phone_a, &mut c.heard_a, Codec::Pcmu, tone_b, 49).await;
    assert!(relayed >= 45, "{relayed} of B's frames relayed");

    // A presses 5: B gets it with the payload type it negotiated, and A's call hears the digit.
    let key = talk_a.key(TE_A, 5);
    for p in &key {
        c.phone_a.send(c.a.local, p).await;
    }
    let mut stamps = Vec::new();
    for (i, sent) in key.iter().enumerate() {
        let p = c.phone_b.next().await;
        c.heard_b.follows(&p);
        assert_eq!(p.header.payload_type, TE_B);
        assert_eq!(p.payload, sent[12..], "the event passes unchanged");
        assert_eq!(p.header.marker, i == 0, "the event's own marker");
        stamps.push(p.header.timestamp);
    }
    assert!(
        stamps.iter().all(|&t| t == stamps[0]),
        "one event, one timestamp"
    );
    loop {
        match next_event(&mut c.a_events).await {
            MediaEvent::Digit { key } => {
                assert_eq!(key, '5');
                break;
            }
            MediaEvent::PlaybackFinished { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    // B's phone moves to another port (a NAT rebinding): what A says follows it there.
    let mut phone_b2 = Phone::bind(c.b.local).await;
    let mut k = 50;
    let first_at_b2 = loop {
        tick.tick().await;
        phone_b2
            .send(c.b.local, &talk_b.audio(&tone_b(k), false))
            .await;
        c.phone_a
            .send(c.a.local, &talk_a.audio(&tone_a(k), false))
            .await;
        k += 1;
        assert!(k < 150, "A's audio never reached B's new port");
        if let Ok(Some(p)) = timeout(Duration::from_millis(1), phone_b2.rx.recv()).await {
            break p;
        }
    };
    // Up to the move the old port got A's audio; from it the new one, the stream unbroken.
    for p in c.phone_b.drain(Duration::from_millis(100)).await {
        c.heard_b.follows(&p);
    }
    c.heard_b.follows(&first_at_b2);
    assert_eq!(first_at_b2.header.payload_type, 8);
    let from = (50..k)
        .find(|&k| sounds_like(Codec::Pcma, &first_at_b2.payload, &tone_a(k)))
        .expect("A's audio at B's new port");
    for j in from + 1..k {
        let p = phone_b2.next().await;
        c.heard_b.follows(&p);
        assert!(sounds_like(Codec::Pcma, &p.payload, &tone_a(j)));
    }
    // A kept hearing B throughout.
    for p in c.phone_a.drain(Duration::from_millis(100)).await {
        c.heard_a.follows(&p);
        assert!(!is_silence(Codec::Pcmu, &p.payload));
    }

    // Unbridged: the pacer's silence again, same streams, a talkspurt starting, time moved on.
    c.media.unbridge(c.a.id, c.b.id);
    for (phone, heard, codec) in [
        (&mut c.phone_a, &mut c.heard_a, Codec::Pcmu),
        (&mut phone_b2, &mut c.heard_b, Codec::Pcma),
    ] {
        let last_relayed_ts = heard.last_ts;
        let p = phone.next().await;
        heard.follows(&p);
        assert!(is_silence(codec, &p.payload));
        assert!(p.header.marker);
        let moved = p.header.timestamp.wrapping_sub(last_relayed_ts);
        assert!(
            (160..8000 * 5).contains(&moved),
            "the clock moves on by {moved}"
        );
        for _ in 0..3 {
            let p = phone.next().await;
            heard.follows(&p);
            assert!(is_silence(codec, &p.payload));
            assert!(!p.header.marker);
        }
    }
    assert!(
        c.media
            .stats
            .packets_relayed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 90
    );
    c.media.close(c.a.id);
    c.media.close(c.b.id);
}

#[tokio::test]
async fn a_leg_that_stops_sending_times_out() {
    let mut c = call(
        (31_720, 31_739),
        (Codec::Pcma, Codec::Pcma),
        (Some(TE_A), None),
    )
    .await;
    c.media.bridge(c.a.id, c.b.id, Duration::from_millis(300));
    // A talks for a second; B never sends anything.
    let mut talk_a = Talker::new(7, Codec::Pcma);
    let mut tick = interval(Duration::from_millis(20));
    for k in 0..50 {
        tick.tick().await;
        c.phone_a
            .send(c.a.local, &talk_a.audio(&tone_a(k), k == 0))
            .await;
    }
    match c.b_events.try_recv() {
        Ok(MediaEvent::MediaTimeout { silent_for }) => {
            assert!(silent_for >= Duration::from_millis(300), "{silent_for:?}");
            assert!(silent_for < Duration::from_millis(900), "{silent_for:?}");
        }
        other => panic!("B's silence was not reported: {other:?}"),
    }
    assert!(
        c.a_events.try_recv().is_err(),
        "A, still talking, did not time out"
    );
    // A falls silent too: reported once, 300 ms after its last packet.
    match next_event(&mut c.a_events).await {
        MediaEvent::MediaTimeout { silent_for } => {
            assert!(silent_for >= Duration::from_millis(300), "{silent_for:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(c.b_events.try_recv().is_err(), "a silence is reported once");
    // A speaks again: its timeout is re-armed.
    c.phone_a
        .send(c.a.local, &talk_a.audio(&tone_a(50), true))
        .await;
    assert!(matches!(
        next_event(&mut c.a_events).await,
        MediaEvent::MediaTimeout { .. }
    ));
    c.media.close(c.a.id);
    c.media.close(c.b.id);
}

#[tokio::test]
async fn closing_a_leg_ends_the_bridge_and_the_other_goes_back_to_the_pacer() {
    let mut c = call(
        (31_740, 31_759),
        (Codec::Pcmu, Codec::Pcmu),
        (Some(TE_A), Some(TE_A)),
    )
    .await;
    c.media.bridge(c.a.id, c.b.id, Duration::from_secs(60));
    let mut talk_a = Talker::new(9, Codec::Pcmu);
    let mut tick = interval(Duration::from_millis(20));
    for k in 0..10 {
        tick.tick().await;
        c.phone_a
            .send(c.a.local, &talk_a.audio(&tone_a(k), k == 0))
            .await;
    }
    hears(&mut c.phone_b, &mut c.heard_b, Codec::Pcmu, tone_a, 9).await;
    c.media.close(c.a.id);
    // A's phone still talks into the closed port: nothing of it reaches B, which hears the
    // pacer's silence, its stream unbroken.
    for k in 10..15 {
        c.phone_a
            .send(c.a.local, &talk_a.audio(&tone_a(k), false))
            .await;
    }
    let p = c.phone_b.next().await;
    c.heard_b.follows(&p);
    assert!(is_silence(Codec::Pcmu, &p.payload));
    assert!(p.header.marker);
    for _ in 0..5 {
        let p = c.phone_b.next().await;
        c.heard_b.follows(&p);
        assert!(is_silence(Codec::Pcmu, &p.payload));
    }
    c.media.close(c.b.id);
}

#[tokio::test]
async fn same_codec_passes_audio_unchanged_and_drops_events_the_other_leg_cannot_take() {
    let mut c = call(
        (31_760, 31_779),
        (Codec::Pcmu, Codec::Pcmu),
        (Some(TE_A), None),
    )
    .await;
    c.media.bridge(c.a.id, c.b.id, Duration::from_secs(60));
    let mut talk_a = Talker::new(11, Codec::Pcmu);
    let mut sent = Vec::new();
    let mut tick = interval(Duration::from_millis(20));
    for k in 0..20 {
        tick.tick().await;
        if k == 10 {
            for p in talk_a.key(TE_A, 9) {
                c.phone_a.send(c.a.local, &p).await;
            }
        }
        let p = talk_a.audio(&tone_a(k), k == 0);
        sent.push(p[12..].to_vec());
        c.phone_a.send(c.a.local, &p).await;
    }
    // B hears A's frames byte for byte, nothing else, in one unbroken stream.
    let mut relayed = Vec::new();
    while relayed.last() != sent.last() {
        let p = c.phone_b.next().await;
        c.heard_b.follows(&p);
        assert_eq!(p.header.payload_type, 0, "no telephone-event for B");
        if !is_silence(Codec::Pcmu, &p.payload) {
            relayed.push(p.payload);
        }
    }
    assert!(relayed.len() >= 15);
    assert_eq!(relayed[..], sent[sent.len() - relayed.len()..]);
    // A's digit is still detected.
    assert!(matches!(
        next_event(&mut c.a_events).await,
        MediaEvent::Digit { key: '9' }
    ));
    c.media.close(c.a.id);
    c.media.close(c.b.id);
}

#[tokio::test]
async fn a_prompt_on_a_bridged_leg_takes_it_over_until_it_ends() {
    let mut c = call(
        (31_780, 31_799),
        (Codec::Pcmu, Codec::Pcma),
        (Some(TE_A), Some(TE_B)),
    )
    .await;
    // A prompt playing when the bridge comes is stopped.
    let long = Audio::new(vec![3000i16; 8000 * 10]);
    c.media.play(c.a.id, 1, long.clone(), 1);
    c.media.bridge(c.a.id, c.b.id, Duration::from_secs(60));
    assert!(matches!(
        next_event(&mut c.a_events).await,
        MediaEvent::PlaybackFinished {
            play_id: 1,
            interrupted: true
        }
    ));

    let mut talk_a = Talker::new(13, Codec::Pcmu);
    let mut tick = interval(Duration::from_millis(20));
    let mut k = 0;
    let mut talk = async |c: &mut Call, frames: u32| {
        for _ in 0..frames {
            tick.tick().await;
            c.phone_a
                .send(c.a.local, &talk_a.audio(&tone_a(k), k == 0))
                .await;
            k += 1;
        }
    };
    talk(&mut c, 10).await;
    hears(&mut c.phone_b, &mut c.heard_b, Codec::Pcma, tone_a, 9).await;

    // A 200 ms prompt to B: B hears it instead of A, then A again.
    let prompt = Audio::new(vec![-5000i16; 1600]);
    c.media.play(c.b.id, 2, prompt, 1);
    talk(&mut c, 30).await;
    let mut phases = vec!["a"];
    loop {
        let p = c.phone_b.next().await;
        c.heard_b.follows(&p);
        let phase = if sounds_like(Codec::Pcma, &p.payload, &[-5000; 160]) {
            "prompt"
        } else if is_silence(Codec::Pcma, &p.payload) {
            "silence"
        } else {
            "a"
        };
        if phases.last() != Some(&phase) {
            assert!(p.header.marker, "{phase} starts a talkspurt");
            phases.push(phase);
        }
        if phases.len() == 3 {
            break;
        }
    }
    assert_eq!(phases, ["a", "prompt", "a"]);
    assert!(matches!(
        next_event(&mut c.b_events).await,
        MediaEvent::PlaybackFinished {
            play_id: 2,
            interrupted: false
        }
    ));
    c.media.close(c.a.id);
    c.media.close(c.b.id);
}

#[tokio::test]
async fn streams_on_different_threads_are_not_bridged() {
    let media = Media::start(LOCAL, 31_800, 31_839, 2, false);
    let (ev_a, _a_events) = events();
    let (ev_c, _c_events) = events();
    let a = media.open(ev_a).await.expect("open a");
    let c = media.open(ev_c).await.expect("open c");
    assert!(
        !media.same_thread(a.id, c.id),
        "open deals streams to the threads in turn"
    );
    let (ev_b, _b_events) = events();
    let b = media.open_beside(a.id, ev_b).await.expect("open b");
    assert!(media.same_thread(a.id, b.id));

    let phone_a = Phone::bind(a.local).await;
    let mut phone_c = Phone::bind(c.local).await;
    media.start_stream(a.id, params(phone_a.addr, Codec::Pcmu, None));
    media.start_stream(c.id, params(phone_c.addr, Codec::Pcmu, None));
    media.bridge(a.id, c.id, Duration::from_secs(60));
    let mut talk_a = Talker::new(15, Codec::Pcmu);
    let mut heard_c = Stream::new(&phone_c.next().await);
    let mut tick = interval(Duration::from_millis(20));
    for k in 0..10 {
        tick.tick().await;
        phone_a
            .send(a.local, &talk_a.audio(&tone_a(k), false))
            .await;
        // C's pacer goes on: silence, nothing of A.
        let p = phone_c.next().await;
        heard_c.follows(&p);
        assert!(is_silence(Codec::Pcmu, &p.payload));
    }
    media.close(a.id);
    media.close(b.id);
    media.close(c.id);
}

#[tokio::test]
async fn streams_bridged_before_one_starts_relay_once_it_does() {
    let media = Media::start(LOCAL, 31_840, 31_859, 1, false);
    let (ev_a, _a_events) = events();
    let (ev_b, _b_events) = events();
    let a = media.open(ev_a).await.expect("open a");
    let b = media.open_beside(a.id, ev_b).await.expect("open b");
    let phone_a = Phone::bind(a.local).await;
    let mut phone_b = Phone::bind(b.local).await;
    media.start_stream(a.id, params(phone_a.addr, Codec::Pcma, None));
    // B (say, a callee whose answer is still to come) is bridged before it has started.
    media.bridge(a.id, b.id, Duration::from_secs(60));
    media.start_stream(b.id, params(phone_b.addr, Codec::Pcmu, None));
    let mut talk_a = Talker::new(17, Codec::Pcma);
    let mut tick = interval(Duration::from_millis(20));
    for k in 0..10 {
        tick.tick().await;
        phone_a
            .send(a.local, &talk_a.audio(&tone_a(k), k == 0))
            .await;
    }
    // B's stream starts with A's audio: no pacer silence before it.
    let first = phone_b.next().await;
    assert!(first.header.marker);
    let mut heard_b = Stream::new(&first);
    let k0 = (0..5)
        .find(|&k| sounds_like(Codec::Pcmu, &first.payload, &tone_a(k)))
        .expect("A's audio first");
    for k in k0 + 1..10 {
        let p = phone_b.next().await;
        heard_b.follows(&p);
        assert!(sounds_like(Codec::Pcmu, &p.payload, &tone_a(k)));
    }
    media.close(a.id);
    media.close(b.id);
}

/// A recording belongs to the stream's receiving side: a re-INVITE (the stream started again on
/// new terms) does not end it, and its finish key does, with the audio from both sides of the
/// re-INVITE in the file.
#[tokio::test]
async fn a_recording_goes_on_through_a_reinvite_and_ends_on_its_key() {
    let media = Media::start(LOCAL, 31_860, 31_879, 1, false);
    let (ev, mut rx) = events();
    let port = media.open(ev).await.expect("a port");
    let phone = Phone::bind(port.local).await;
    media.start_stream(port.id, params(phone.addr, Codec::Pcmu, Some(TE_A)));
    let dir = std::env::temp_dir().join(format!("sautikit-bridge-rec-{}", std::process::id()));
    let path = dir.join("r.wav");
    media.start_recording(
        port.id,
        RecordingSpec {
            recording_id: "r1".into(),
            path: path.clone(),
            max_length: Duration::from_secs(30),
            silence_timeout: None,
            finish_keys: "#".into(),
        },
    );
    let mut talk = Talker::new(9, Codec::Pcmu);
    let mut tick = interval(Duration::from_millis(20));
    for k in 0..50 {
        tick.tick().await;
        if k == 25 {
            // A session refresh: the same terms, negotiated again.
            media.start_stream(port.id, params(phone.addr, Codec::Pcmu, Some(TE_A)));
        }
        phone
            .send(port.local, &talk.audio(&tone_a(k), k == 0))
            .await;
    }
    // '#' is event code 11.
    for p in talk.key(TE_A, 11) {
        tick.tick().await;
        phone.send(port.local, &p).await;
    }
    match next_event(&mut rx).await {
        MediaEvent::Digit { key } => assert_eq!(key, '#'),
        other => panic!("expected the key, got {other:?}"),
    }
    match next_event(&mut rx).await {
        MediaEvent::RecordingFinished(o) => {
            assert_eq!(o.end, RecordingEnd::FinishKey('#'), "{o:?}");
            assert!(o.error.is_none(), "{o:?}");
            // 50 frames (1 s), less what the jitter buffer still held when the key came; over
            // the 25 frames (500 ms) sent before the re-INVITE.
            assert!((600..=1000).contains(&o.duration_ms), "{o:?}");
            let wav = std::fs::read(&path).expect("the recording's file");
            assert_eq!(wav.len() as u64, o.size_bytes);
            let data = u32::from_le_bytes([wav[40], wav[41], wav[42], wav[43]]);
            assert_eq!(u64::from(data), o.size_bytes - 44, "the header's data size");
        }
        other => panic!("expected the recording, got {other:?}"),
    }
    media.close(port.id);
    let _ = std::fs::remove_dir_all(dir);
}
