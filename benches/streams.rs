//! Load harness for media streams (issue 17, the `stream` verb): a real release `sautikit serve`
//! in dev mode whose claimed numbers answer every call with
//! `{"actions":[{"stream":{"url":"ws://…/agent","track":"inbound","bidirectional":true}}]}`, a
//! WebSocket agent in this process (tokio-tungstenite on a thread and runtime of its own), and
//! raw-UDP SIP callers (INVITE with a PCMU offer, ACK, BYE) sending 20 ms PCMU frames. Everything
//! shares one machine.
//!
//! Every frame a caller sends carries a marker in its first 7 payload bytes: the call's index (12
//! bits) and the frame's number (16 bits), a nibble a byte as `0x80 | nibble`, the rest µ-law
//! silence (`0xFF`). Those bytes come through µ-law → PCM → µ-law unchanged, so the agent and the
//! caller can tell which frame each message or packet is without decoding the audio. The agent is
//! lean (500 streams × 50 messages a second each way on two shared cores): it takes `media` apart
//! by finding `"payload":"`, decodes only the first 12 base64 characters, and echoes with a
//! pre-formatted `{"event":"media","streamSid":"…","media":{"payload":"…"}}` holding the payload
//! it got; other messages (`connected`, `start`, `stop`) are parsed as JSON.
//!
//! Phases, one server for all, each with calls of its own:
//!
//! - **latency**: `BENCH_LATENCY_STREAMS` (20) calls for `BENCH_LATENCY_SECONDS` (20). The agent
//!   echoes every second frame, so each echo finds the stream's playout queue empty (an echo of
//!   every frame keeps one frame queued for good once a late packet has made two arrive within one
//!   frame; the scale phase shows that). Measured: **caller's RTP → agent's `media`** (the
//!   caller's send, `Instant`, to the agent's read of the message, `Instant`: everything the
//!   engine adds, plus the agent's own scheduling), and **agent's `media` → caller's RTP** (the
//!   agent's send, wall clock, to the kernel's receive time of the packet at the caller,
//!   `SO_TIMESTAMPNS`, wall clock), counted as "queue empty" only when the previous echo had
//!   reached the caller before this one was sent; the others are shown apart.
//! - **clear**: `BENCH_CLEAR_TRIALS` (20) calls. On the call's first inbound frame the agent sends
//!   5 s of marked audio at once, 1 s later `clear`, and 300 ms after that closes the socket (the
//!   script ends and the engine hangs up). Measured per trial: `clear` sent (wall clock) → the
//!   first unmarked (silent) packet's kernel arrival at the caller, and the marked packets that
//!   arrived after `clear` was sent.
//! - **scale**: `BENCH_STREAMS` (500) calls set up at `BENCH_RAMP` (50) a second, then held
//!   `BENCH_SECONDS` (60) with the agent echoing every frame. Measured over that window: the
//!   engine's CPU (utime+stime from /proc) and RSS, this harness's CPU, both latencies, and over
//!   each whole call: frames the callers sent, the agent received (from the first frame it saw:
//!   frames sent before the stream connected are not counted), the agent echoed, and the callers
//!   received back (the calls hang up once every echo queued in the engine has played, or none
//!   has come back for 2 s); lost = sent − received each way. Also the engine's own counts from
//!   each call's `stream.stopped` timeline entry (`frames_sent`, `frames_received`, `frames_dropped`: tapped
//!   frames the socket could not take), `sautikit_media_streams_live` from `/metrics`, and UDP
//!   receive-buffer drops on the machine.
//!
//! `CARGO_TARGET_DIR=/work/target-streams cargo bench --bench streams` is a full run
//! (`cargo test --benches` a short smoke run: 5 streams, 3 s, 3 trials). Environment:
//! `BENCH_PHASES` (`latency,clear,scale`), `BENCH_LATENCY_STREAMS`, `BENCH_LATENCY_SECONDS`,
//! `BENCH_CLEAR_TRIALS`, `BENCH_STREAMS`, `BENCH_SECONDS`, `BENCH_RAMP`, `BENCH_NUMBERS` (10
//! claimed numbers, calls round-robin); the pass lines `BENCH_RTP_TO_WS_P99_MS` (5),
//! `BENCH_WS_TO_RTP_P99_MS` (25), `BENCH_CLEAR_MS` (20: the largest clear→silence of the trials),
//! `BENCH_MAX_CORES` (1.5); `BENCH_RTP_PORTS` (the engine's RTP range), `BENCH_SERVER_LOG` (the
//! engine's log filter, `warn`). SQLite only: a stream does not touch the database while it runs.
//! Exits non-zero when a pass line or a no-loss check fails.

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;

use harness::{
    claim_seeded, env_or, fmt3, mib, ms, p50_p99_max, sample_rss, serve_on_own_thread,
    server_log_excerpt, sip_listen, thread_delta, udp_rcvbuf_errors, wall_ns, watch_window,
};

use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::caller::recv_stamped;
use common::peer::{SipCaller, sdp_rtp};
use common::uac::{
    cpu_time, ensure_nofile, machine_load, quantile, rtp_header, sdp_offer_pcmu, status_code,
    status_kib, thread_cpu,
};
use common::{Api, Backend, Mode, Server, TestDb, dev_key};
use futures::{SinkExt, StreamExt};
use nix::sys::socket::{MsgFlags, setsockopt, sockopt};
use serde_json::{Value, json};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

// The agent and the callers share the two cores with the server: keep them lean.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Marker bytes at the start of every marked payload: 3 nibbles of call index, 4 of frame number.
const MARK: usize = 7;
/// Send times are kept for the last this many frames of each call (5 s).
const RING: usize = 256;
const FRAME: Duration = Duration::from_millis(20);
/// How much audio the agent sends at once in a clear trial, and when it clears.
const CLEAR_BURST_FRAMES: u32 = 250;
const CLEAR_AFTER: Duration = Duration::from_secs(1);

/// What the agent does with a call's stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum AgentMode {
    /// Echo every second frame (the playout queue is empty when each echo arrives).
    Half = 1,
    /// Echo every frame.
    Echo = 2,
    /// 5 s of audio at once, then `clear`, then close.
    Clear = 3,
}

impl AgentMode {
    fn from_u8(v: u8) -> Option<AgentMode> {
        match v {
            1 => Some(AgentMode::Half),
            2 => Some(AgentMode::Echo),
            3 => Some(AgentMode::Clear),
            _ => None,
        }
    }

    /// Frame numbers between consecutive echoes.
    fn step(self) -> u32 {
        if self == AgentMode::Half { 2 } else { 1 }
    }
}

fn mark(payload: &mut [u8], call: usize, frame: u32) {
    let v = ((call as u64 & 0xfff) << 16) | u64::from(frame & 0xffff);
    for (i, b) in payload.iter_mut().take(MARK).enumerate() {
        *b = 0x80 | ((v >> (4 * (MARK - 1 - i))) & 0xf) as u8;
    }
}

/// (call index, frame number) of a marked payload; None for silence or anything else.
fn read_mark(p: &[u8]) -> Option<(usize, u32)> {
    let mut v = 0u64;
    for &b in p.get(..MARK)? {
        if b & 0xf0 != 0x80 {
            return None;
        }
        v = (v << 4) | u64::from(b & 0xf);
    }
    Some(((v >> 16) as usize, (v & 0xffff) as u32))
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn set(a: &AtomicU64, v: u64) {
    a.store(v, Ordering::Relaxed)
}

fn add(a: &AtomicU64, v: u64) {
    a.fetch_add(v, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// What the callers and the agent share: per call, the send times of its recent frames and its
// counters; latency samples while a window is being measured.

struct Slot {
    mode: AtomicU8,
    /// The caller sent frame `f` at `sent[f % RING]` (monotonic ns since the base, never 0).
    sent: Box<[AtomicU64]>,
    /// The agent sent the echo of frame `f` at `echo_wall[f % RING]` (wall-clock ns).
    echo_wall: Box<[AtomicU64]>,
    answered: AtomicU64,
    caller_sent: AtomicU64,
    /// The agent read `start` for this call (set on its first media message, which names it).
    agent_seen: AtomicU64,
    /// First frame number the agent got, + 1.
    agent_first: AtomicU64,
    agent_got: AtomicU64,
    agent_echoed: AtomicU64,
    /// Marked packets the caller got back.
    caller_back: AtomicU64,
    /// When the agent sent `clear` (wall-clock ns).
    clear_wall: AtomicU64,
}

impl Slot {
    fn new() -> Slot {
        let ring = || (0..RING).map(|_| AtomicU64::new(0)).collect();
        Slot {
            mode: AtomicU8::new(0),
            sent: ring(),
            echo_wall: ring(),
            answered: AtomicU64::new(0),
            caller_sent: AtomicU64::new(0),
            agent_seen: AtomicU64::new(0),
            agent_first: AtomicU64::new(0),
            agent_got: AtomicU64::new(0),
            agent_echoed: AtomicU64::new(0),
            caller_back: AtomicU64::new(0),
            clear_wall: AtomicU64::new(0),
        }
    }

    fn mode(&self) -> Option<AgentMode> {
        AgentMode::from_u8(self.mode.load(Ordering::Relaxed))
    }
}

struct Shared {
    base: Instant,
    slots: Vec<Slot>,
    /// Latency samples are kept only while this is set.
    measuring: AtomicBool,
    /// Caller's RTP → agent's read, µs.
    rtp_to_ws: Mutex<Vec<u32>>,
    /// Agent's send → caller's kernel arrival, µs: the previous echo had arrived (queue empty),
    /// or not.
    ws_to_rtp_empty: Mutex<Vec<u32>>,
    ws_to_rtp_queued: Mutex<Vec<u32>>,
    /// How late the agent's 5 ms timer fired, µs.
    agent_late: Mutex<Vec<u32>>,
    agent_connections: AtomicU64,
    /// Messages or connections the agent could not make sense of.
    agent_errors: AtomicU64,
}

impl Shared {
    fn new(calls: usize) -> Shared {
        Shared {
            base: Instant::now(),
            slots: (0..calls).map(|_| Slot::new()).collect(),
            measuring: AtomicBool::new(false),
            rtp_to_ws: Mutex::new(Vec::new()),
            ws_to_rtp_empty: Mutex::new(Vec::new()),
            ws_to_rtp_queued: Mutex::new(Vec::new()),
            agent_late: Mutex::new(Vec::new()),
            agent_connections: AtomicU64::new(0),
            agent_errors: AtomicU64::new(0),
        }
    }

    /// Monotonic ns since the base, never 0.
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    fn clear_samples(&self) {
        for v in [
            &self.rtp_to_ws,
            &self.ws_to_rtp_empty,
            &self.ws_to_rtp_queued,
            &self.agent_late,
        ] {
            v.lock().expect("samples").clear();
        }
    }
}

fn us(ns: u64) -> u32 {
    (ns / 1000).min(u64::from(u32::MAX)) as u32
}

fn sorted_durations(v: &Mutex<Vec<u32>>) -> Vec<Duration> {
    let mut d: Vec<Duration> = v
        .lock()
        .expect("samples")
        .iter()
        .map(|&u| Duration::from_micros(u64::from(u)))
        .collect();
    d.sort();
    d
}

// ---------------------------------------------------------------------------------------------
// The agent: a WebSocket server on its own thread and single-threaded runtime.

fn start_agent(sh: Arc<Shared>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind agent");
                let _ = tx.send(listener.local_addr().expect("addr"));
                tokio::spawn(agent_stalls(sh.clone()));
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(agent_connection(tcp, sh.clone()));
                }
            });
        })
        .expect("agent thread");
    rx.recv().expect("agent address")
}

/// How late a 5 ms timer on the agent's runtime fires, while measuring: a busy agent delays its
/// reads, which shows up in both latencies as if the engine had added it.
async fn agent_stalls(sh: Arc<Shared>) {
    let period = Duration::from_millis(5);
    let mut next = Instant::now() + period;
    loop {
        tokio::time::sleep_until(next.into()).await;
        let late = Instant::now().saturating_duration_since(next);
        if sh.measuring() {
            sh.agent_late
                .lock()
                .expect("samples")
                .push(us(late.as_nanos() as u64));
        }
        next = Instant::now() + period;
    }
}

const MEDIA_START: &str = r#"{"event":"media""#;
const PAYLOAD_KEY: &str = r#""payload":""#;

async fn agent_connection(tcp: tokio::net::TcpStream, sh: Arc<Shared>) {
    // Small echoes must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    // tungstenite zeroes the free part of its read buffer before every read: keep it small.
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await else {
        add(&sh.agent_errors, 1);
        return;
    };
    add(&sh.agent_connections, 1);
    let mut sid = String::new();
    // `{"event":"media","streamSid":"…","media":{"payload":"`, once `start` names the stream.
    let mut prefix = String::new();
    let mut call: Option<usize> = None;
    let mut mode: Option<AgentMode> = None;
    let mut clear_at: Option<tokio::time::Instant> = None;
    let mut close_at: Option<tokio::time::Instant> = None;
    let mut head = [0u8; 12];
    loop {
        let timer = clear_at.or(close_at);
        let msg = tokio::select! {
            m = ws.next() => m,
            () = tokio::time::sleep_until(timer.unwrap_or_else(tokio::time::Instant::now)), if timer.is_some() => {
                if clear_at.take().is_some() {
                    if let Some(c) = call {
                        set(&sh.slots[c].clear_wall, wall_ns());
                    }
                    let clear = format!(r#"{{"event":"clear","streamSid":"{sid}"}}"#);
                    if ws.send(Message::text(clear)).await.is_err() {
                        break;
                    }
                    close_at = Some(tokio::time::Instant::now() + Duration::from_millis(300));
                } else {
                    close_at = None;
                    // The engine answers the close; the loop ends when the socket does.
                    let _ = ws.close(None).await;
                }
                continue;
            }
        };
        let Some(Ok(msg)) = msg else { break };
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        let t = text.as_str();
        if !t.starts_with(MEDIA_START) {
            let Ok(v) = serde_json::from_str::<Value>(t) else {
                add(&sh.agent_errors, 1);
                continue;
            };
            match v["event"].as_str() {
                Some("start") => {
                    sid = v["start"]["streamSid"].as_str().unwrap_or("").to_owned();
                    prefix =
                        format!(r#"{{"event":"media","streamSid":"{sid}","media":{{"payload":""#);
                }
                Some("stop") => break,
                _ => {}
            }
            continue;
        }
        let now = sh.now();
        let payload = t
            .find(PAYLOAD_KEY)
            .map(|p| &t[p + PAYLOAD_KEY.len()..])
            .and_then(|rest| rest.find('"').map(|end| &rest[..end]));
        let marked = payload
            .and_then(|p| p.get(..12))
            .and_then(|b64| STANDARD.decode_slice(b64, &mut head).ok())
            .and_then(|_| read_mark(&head));
        let (Some(payload), Some((idx, frame))) = (payload, marked) else {
            // Frames before the caller's first (silence) are not ours to measure.
            continue;
        };
        let Some(slot) = sh.slots.get(idx) else {
            add(&sh.agent_errors, 1);
            continue;
        };
        if call.is_none() {
            call = Some(idx);
            mode = slot.mode();
            set(&slot.agent_seen, 1);
            set(&slot.agent_first, u64::from(frame) + 1);
        }
        add(&slot.agent_got, 1);
        let sent = get(&slot.sent[frame as usize % RING]);
        if sent != 0 && sh.measuring() {
            sh.rtp_to_ws
                .lock()
                .expect("samples")
                .push(us(now.saturating_sub(sent)));
        }
        match mode {
            Some(m @ (AgentMode::Half | AgentMode::Echo)) => {
                if frame % m.step() != 0 || prefix.is_empty() {
                    continue;
                }
                let mut echo = String::with_capacity(prefix.len() + payload.len() + 3);
                echo.push_str(&prefix);
                echo.push_str(payload);
                echo.push_str(r#""}}"#);
                set(&slot.echo_wall[frame as usize % RING], wall_ns());
                if ws.send(Message::text(echo)).await.is_err() {
                    break;
                }
                add(&slot.agent_echoed, 1);
            }
            Some(AgentMode::Clear) => {
                if clear_at.is_some() || close_at.is_some() || get(&slot.clear_wall) != 0 {
                    continue;
                }
                let mut audio = [0xFFu8; 160];
                let mut failed = false;
                for k in 0..CLEAR_BURST_FRAMES {
                    mark(&mut audio, idx, k);
                    let text = format!(
                        r#"{{"event":"media","streamSid":"{sid}","media":{{"payload":"{}"}}}}"#,
                        STANDARD.encode(audio)
                    );
                    if ws.feed(Message::text(text)).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || ws.flush().await.is_err() {
                    break;
                }
                add(&slot.agent_echoed, u64::from(CLEAR_BURST_FRAMES));
                clear_at = Some(tokio::time::Instant::now() + CLEAR_AFTER);
            }
            None => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The callers' RTP: one task sends every call's frames on a 1 ms tick (each call keeps its own
// 20 ms phase), one task per call receives.

struct Sending {
    idx: usize,
    sock: Arc<UdpSocket>,
    to: SocketAddr,
    frame: u32,
    ssrc: u32,
    next: Instant,
}

enum SendCmd {
    Add(Sending),
    /// Stop sending for these calls.
    Stop(Range<usize>),
}

async fn rtp_sender(sh: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<SendCmd>) {
    let mut calls: Vec<Sending> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut packet = [0u8; 12 + 160];
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(SendCmd::Add(s)) => calls.push(s),
                Some(SendCmd::Stop(r)) => calls.retain(|c| !r.contains(&c.idx)),
                None => return,
            },
            _ = tick.tick() => {
                let now = Instant::now();
                for c in calls.iter_mut().filter(|c| c.next <= now) {
                    let slot = &sh.slots[c.idx];
                    packet[0] = 0x80;
                    packet[1] = if c.frame == 0 { 0x80 } else { 0 };
                    packet[2..4].copy_from_slice(&(c.frame as u16).to_be_bytes());
                    packet[4..8].copy_from_slice(&(c.frame.wrapping_mul(160)).to_be_bytes());
                    packet[8..12].copy_from_slice(&c.ssrc.to_be_bytes());
                    packet[12..].fill(0xFF);
                    mark(&mut packet[12..], c.idx, c.frame);
                    set(&slot.sent[c.frame as usize % RING], sh.now());
                    if c.sock.try_send_to(&packet, c.to).is_ok() {
                        add(&slot.caller_sent, 1);
                    }
                    c.frame = c.frame.wrapping_add(1);
                    c.next += FRAME;
                    if c.next + Duration::from_millis(100) < now {
                        // This task fell far behind: no burst, the stream goes on from now.
                        c.next = now + FRAME;
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Received {
    packets: u64,
    marked: u64,
    /// Echoes missing between the ones received (by frame number).
    gaps: u64,
    /// Marked with another call's index, or not RTP.
    wrong: u64,
    /// Clear trials: (kernel arrival wall ns, marked) of every packet.
    trace: Vec<(u64, bool)>,
}

async fn rtp_receiver(
    idx: usize,
    sock: Arc<UdpSocket>,
    sh: Arc<Shared>,
    trace: bool,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let mut r = Received::default();
    let stamps = setsockopt(&*sock, sockopt::ReceiveTimestampns, &true).is_ok();
    assert!(stamps, "SO_TIMESTAMPNS is needed for the arrival times");
    let slot = &sh.slots[idx];
    let step = slot.mode().map_or(1, AgentMode::step);
    let fd = sock.as_raw_fd();
    let mut buf = [0u8; 2048];
    let mut last: Option<u32> = None;
    let mut prev_arrival = 0u64;
    loop {
        tokio::select! {
            res = sock.readable() => if res.is_err() { break },
            _ = stop.changed() => break,
        }
        while let Ok((n, stamp)) = sock.try_io(Interest::READABLE, || {
            recv_stamped(fd, &mut buf, MsgFlags::MSG_DONTWAIT)
        }) {
            let kernel = stamp.map_or_else(wall_ns, |d| d.as_nanos() as u64);
            r.packets += 1;
            let Some(h) = rtp_header(&buf[..n]) else {
                r.wrong += 1;
                continue;
            };
            let payload = &buf[n - h.payload_len..n];
            let Some((c, f)) = read_mark(payload) else {
                if trace {
                    r.trace.push((kernel, false));
                }
                continue;
            };
            if c != idx {
                r.wrong += 1;
                continue;
            }
            r.marked += 1;
            add(&slot.caller_back, 1);
            if trace {
                r.trace.push((kernel, true));
                continue;
            }
            let sent = get(&slot.echo_wall[f as usize % RING]);
            if sent != 0 && sh.measuring() {
                let took = us(kernel.saturating_sub(sent));
                let v = if prev_arrival < sent {
                    &sh.ws_to_rtp_empty
                } else {
                    &sh.ws_to_rtp_queued
                };
                v.lock().expect("samples").push(took);
            }
            if let Some(l) = last {
                let d = (f.wrapping_sub(l)) & 0xffff;
                if d > step && d < 0x8000 {
                    r.gaps += u64::from(d / step - 1);
                }
            }
            last = Some(f);
            prev_arrival = kernel;
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The calls: one task each, with its own SIP socket (tests/common's SipCaller).

#[derive(Clone)]
struct Env {
    sh: Arc<Shared>,
    sip: SocketAddr,
    numbers: Arc<Vec<String>>,
    sender: mpsc::UnboundedSender<SendCmd>,
}

/// A call placed and held: until `hangup` (our BYE) or, with `engine_ends`, until the engine's
/// BYE. Returns a failure's description.
async fn one_call(
    env: Env,
    idx: usize,
    sock: Arc<UdpSocket>,
    engine_ends: bool,
    mut hangup: watch::Receiver<bool>,
) -> Result<(), String> {
    let number = &env.numbers[idx % env.numbers.len()];
    let mut caller = SipCaller::new(env.sip, number).await;
    let rtp = sock.local_addr().map_err(|e| e.to_string())?;
    caller.invite(&sdp_offer_pcmu(rtp, idx as u64 + 1)).await;
    let (_, ok) = caller.await_final(Duration::from_secs(15)).await;
    if status_code(&ok) != Some(200) {
        return Err(format!(
            "INVITE answered {}",
            ok.lines().next().unwrap_or("")
        ));
    }
    caller.ack().await;
    let to = sdp_rtp(&ok).ok_or("no RTP address in the 200")?;
    set(&env.sh.slots[idx].answered, 1);
    let _ = env.sender.send(SendCmd::Add(Sending {
        idx,
        sock,
        to,
        frame: 0,
        ssrc: 0x5700_0000 + idx as u32,
        next: Instant::now(),
    }));
    if engine_ends {
        caller.await_bye(Duration::from_secs(30)).await;
    } else {
        let _ = hangup.wait_for(|h| *h).await;
        caller.bye().await;
    }
    Ok(())
}

/// The calls of one phase, their receivers, and how to end them.
struct Calls {
    range: Range<usize>,
    hangup: watch::Sender<bool>,
    stop_rx: watch::Sender<bool>,
    calls: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    receivers: Vec<tokio::task::JoinHandle<Received>>,
}

async fn place_calls(
    env: &Env,
    range: Range<usize>,
    mode: AgentMode,
    ramp: f64,
    engine_ends: bool,
) -> Calls {
    let (hangup, hangup_rx) = watch::channel(false);
    let (stop_rx, stop_rx_rx) = watch::channel(false);
    let mut calls = Vec::new();
    let mut receivers = Vec::new();
    let started = Instant::now();
    for (k, idx) in range.clone().enumerate() {
        env.sh.slots[idx].mode.store(mode as u8, Ordering::Relaxed);
        let due = started + Duration::from_secs_f64(k as f64 / ramp);
        tokio::time::sleep_until(due.into()).await;
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("RTP socket"));
        receivers.push(tokio::spawn(rtp_receiver(
            idx,
            sock.clone(),
            env.sh.clone(),
            mode == AgentMode::Clear,
            stop_rx_rx.clone(),
        )));
        calls.push(tokio::spawn(one_call(
            env.clone(),
            idx,
            sock,
            engine_ends,
            hangup_rx.clone(),
        )));
    }
    Calls {
        range,
        hangup,
        stop_rx,
        calls,
        receivers,
    }
}

/// Until every call of `range` is answered and its stream has reached the agent, or `limit`.
async fn wait_streaming(sh: &Shared, range: Range<usize>, limit: Duration) -> (usize, usize) {
    let until = Instant::now() + limit;
    loop {
        let answered = range
            .clone()
            .filter(|&i| get(&sh.slots[i].answered) != 0)
            .count();
        let streaming = range
            .clone()
            .filter(|&i| get(&sh.slots[i].agent_seen) != 0)
            .count();
        if streaming == range.len() || Instant::now() > until {
            return (answered, streaming);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Ended {
    failures: Vec<String>,
    received: Vec<Received>,
}

/// Stop the callers' frames, let the queued echoes play out and hang up (or wait for the
/// engine's BYEs), then stop the receivers.
async fn end_calls(env: &Env, c: Calls, engine_ends: bool) -> Ended {
    if !engine_ends {
        let _ = env.sender.send(SendCmd::Stop(c.range.clone()));
        // Echoes still queued in the engine (after the agent or this harness stalled) play out
        // first: until every echo is back, or none has come back for 2 s (30 s at most).
        let echoed_back = |sh: &Shared| -> (u64, u64) {
            c.range.clone().fold((0, 0), |(e, b), i| {
                let s = &sh.slots[i];
                (e + get(&s.agent_echoed), b + get(&s.caller_back))
            })
        };
        let until = Instant::now() + Duration::from_secs(30);
        let mut last = (u64::MAX, Instant::now());
        tokio::time::sleep(Duration::from_millis(500)).await;
        loop {
            let (echoed, back) = echoed_back(&env.sh);
            if back >= echoed || Instant::now() > until {
                break;
            }
            if back != last.0 {
                last = (back, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = c.hangup.send(true);
    }
    let mut failures = Vec::new();
    for h in c.calls {
        match tokio::time::timeout(Duration::from_secs(60), h).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("call task: {e}")),
            Err(_) => failures.push("call did not end within 60 s".into()),
        }
    }
    let _ = env.sender.send(SendCmd::Stop(c.range.clone()));
    let _ = c.stop_rx.send(true);
    let mut received = Vec::new();
    for h in c.receivers {
        received.push(h.await.unwrap_or_default());
    }
    Ended { failures, received }
}

/// The engine's counts from the `stream.stopped` (or `stream.failed`) entries of the calls not in
/// `skip` (earlier phases'): (streams, frames_sent, frames_received, frames_dropped, failed
/// reasons).
async fn engine_counts(
    api: &Api,
    skip: &std::collections::HashSet<String>,
) -> (u64, u64, u64, u64, Vec<String>) {
    let calls = api.get_all("/v1/calls?limit=100").await;
    let ids: Vec<String> = calls
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .filter(|id| !skip.contains(id))
        .collect();
    let timelines: Vec<Vec<Value>> = futures::stream::iter(ids)
        .map(|id| async move { api.get_all(&format!("/v1/calls/{id}/events")).await })
        .buffer_unordered(8)
        .collect()
        .await;
    let (mut n, mut sent, mut received, mut dropped) = (0, 0, 0, 0);
    let mut failed = Vec::new();
    for events in timelines {
        for e in events {
            let kind = e["kind"].as_str().unwrap_or("");
            if kind != "stream.stopped" && kind != "stream.failed" {
                continue;
            }
            let d = &e["detail"];
            n += 1;
            sent += d["frames_sent"].as_u64().unwrap_or(0);
            received += d["frames_received"].as_u64().unwrap_or(0);
            dropped += d["frames_dropped"].as_u64().unwrap_or(0);
            if kind == "stream.failed" {
                failed.push(d["reason"].as_str().unwrap_or("?").to_owned());
            }
        }
    }
    (n, sent, received, dropped, failed)
}

/// `sautikit_media_streams_live` from `/metrics`.
async fn live_streams(api: &Api) -> Option<f64> {
    let text = api.get("/metrics").await.text;
    text.lines()
        .find(|l| l.starts_with("sautikit_media_streams_live"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Frames lost each way over whole calls: (sent by callers, got by the agent, lost on the way
/// in, echoed by the agent, got back by callers, lost on the way out, gaps seen by callers).
struct Flow {
    sent: u64,
    agent_got: u64,
    lost_in: u64,
    echoed: u64,
    back: u64,
    lost_out: u64,
    gaps: u64,
    wrong: u64,
}

fn flow(sh: &Shared, range: Range<usize>, received: &[Received]) -> Flow {
    let mut f = Flow {
        sent: 0,
        agent_got: 0,
        lost_in: 0,
        echoed: 0,
        back: 0,
        lost_out: 0,
        gaps: 0,
        wrong: 0,
    };
    for (idx, r) in range.zip(received) {
        let s = &sh.slots[idx];
        let sent = get(&s.caller_sent);
        let first = get(&s.agent_first).saturating_sub(1);
        let got = get(&s.agent_got);
        f.sent += sent;
        f.agent_got += got;
        f.lost_in += sent.saturating_sub(first).saturating_sub(got);
        let echoed = get(&s.agent_echoed);
        f.echoed += echoed;
        f.back += r.marked;
        f.lost_out += echoed.saturating_sub(r.marked);
        f.gaps += r.gaps;
        f.wrong += r.wrong;
    }
    f
}

fn flow_line(f: &Flow) -> String {
    format!(
        "frames: callers sent {}, agent got {} (lost on the way in {}), agent echoed {}, callers got back {} \
         (lost on the way out {}, gaps {}), stray packets {}",
        f.sent, f.agent_got, f.lost_in, f.echoed, f.back, f.lost_out, f.gaps, f.wrong
    )
}

// ---------------------------------------------------------------------------------------------
// Setup

/// Fields drop in order: the server stops before its database goes.
struct Ctx {
    server: Server,
    api: Api,
    _db: TestDb,
}

async fn setup(numbers: usize, agent: SocketAddr) -> (Ctx, Vec<String>) {
    let db = TestDb::new(Backend::Sqlite).await;
    let rtp_ports = std::env::var("BENCH_RTP_PORTS").unwrap_or_else(|_| "20000-29999".into());
    let log = std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into());
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            ("SAUTIKIT_LOG", &log),
            ("SAUTIKIT_SIP_LISTEN", &sip_listen()),
            ("SAUTIKIT_RTP_PORTS", &rtp_ports),
        ],
    );
    let api = server.api(&dev_key(&db.data_dir));
    let r = api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": 50_000_000, "currency": "KES"})),
        )
        .await;
    assert!(r.status.is_success(), "top-up: {} {}", r.status, r.text);
    let script: &'static str = format!(
        r#"{{"actions":[{{"stream":{{"url":"ws://{agent}/agent","track":"inbound","bidirectional":true}}}}]}}"#
    )
    .leak();
    let voice = serve_on_own_thread(Router::new().route(
        "/voice",
        post(move || async move { ([("content-type", "application/json")], script) }),
    ));
    let events = serve_on_own_thread(Router::new().route("/events", post(|| async { "ok" })));
    let store = sautikit::db::Db::connect(&db.url).await.expect("database");
    let claimed = claim_seeded(&api, &store, numbers).await;
    for (id, _) in &claimed {
        let r = api
            .patch(
                &format!("/v1/numbers/{id}/routing"),
                json!({"voice_callback_url": format!("http://{voice}/voice"),
                       "events_url": format!("http://{events}/events")}),
            )
            .await;
        assert_eq!(r.status, 200, "routing: {}", r.text);
    }
    let numbers = claimed.into_iter().map(|(_, n)| n).collect();
    (
        Ctx {
            server,
            api,
            _db: db,
        },
        numbers,
    )
}

// ---------------------------------------------------------------------------------------------
// Phases

struct Settings {
    latency_streams: usize,
    latency_seconds: f64,
    clear_trials: usize,
    streams: usize,
    seconds: f64,
    ramp: f64,
    rtp_to_ws_line: Duration,
    ws_to_rtp_line: Duration,
    clear_line: Duration,
    max_cores: f64,
}

/// Lines for the summary, and whether every check passed.
struct Verdicts {
    lines: Vec<String>,
    pass: bool,
}

impl Verdicts {
    fn check(&mut self, ok: bool, line: String) {
        self.pass &= ok;
        self.lines
            .push(format!("{} {line}", if ok { "met    " } else { "NOT met" }));
    }
}

async fn latency_phase(env: &Env, range: Range<usize>, s: &Settings, v: &mut Verdicts) {
    println!(
        "\n== latency: {} streams, every second frame echoed, {:.0} s ==",
        range.len(),
        s.latency_seconds
    );
    println!("  load before: {}", machine_load());
    let calls = place_calls(env, range.clone(), AgentMode::Half, s.ramp, false).await;
    let (answered, streaming) =
        wait_streaming(&env.sh, range.clone(), Duration::from_secs(20)).await;
    println!(
        "  {answered} answered, {streaming} streaming of {}",
        range.len()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.sh.clear_samples();
    env.sh.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(s.latency_seconds)).await;
    env.sh.measuring.store(false, Ordering::Relaxed);
    let a = sorted_durations(&env.sh.rtp_to_ws);
    let b = sorted_durations(&env.sh.ws_to_rtp_empty);
    let bq = sorted_durations(&env.sh.ws_to_rtp_queued);
    let late = sorted_durations(&env.sh.agent_late);
    let ended = end_calls(env, calls, false).await;
    let f = flow(&env.sh, range.clone(), &ended.received);
    let a3 = p50_p99_max(&a);
    println!(
        "  the agent's 5 ms timer late by {}",
        fmt3(p50_p99_max(&late))
    );
    let b3 = p50_p99_max(&b);
    println!(
        "  caller's RTP → agent's media ({} frames): {}",
        a.len(),
        fmt3(a3)
    );
    println!(
        "  agent's media → caller's RTP, queue empty ({} frames): {}; p90 {:.2} ms",
        b.len(),
        fmt3(b3),
        ms(quantile(&b, 0.9))
    );
    println!(
        "  agent's media → caller's RTP, behind an earlier echo ({} frames): {}",
        bq.len(),
        fmt3(p50_p99_max(&bq))
    );
    println!("  {}", flow_line(&f));
    if !ended.failures.is_empty() {
        println!(
            "  failed calls: {:?}",
            &ended.failures[..ended.failures.len().min(5)]
        );
    }
    println!("  load after: {}", machine_load());
    v.check(
        !a.is_empty() && a3[1] <= s.rtp_to_ws_line,
        format!(
            "RTP→WebSocket p99 {:.2} ms (line {:.0} ms; p50 {:.2}, max {:.2}, {} frames)",
            ms(a3[1]),
            ms(s.rtp_to_ws_line),
            ms(a3[0]),
            ms(a3[2]),
            a.len()
        ),
    );
    v.check(
        !b.is_empty() && b3[1] <= s.ws_to_rtp_line,
        format!(
            "WebSocket→RTP, queue empty, p99 {:.2} ms (line {:.0} ms; p50 {:.2}, max {:.2}, {} frames)",
            ms(b3[1]),
            ms(s.ws_to_rtp_line),
            ms(b3[0]),
            ms(b3[2]),
            b.len()
        ),
    );
    v.check(
        ended.failures.is_empty() && streaming == range.len() && f.lost_in == 0 && f.lost_out == 0,
        format!(
            "latency calls: {} failed, {streaming}/{} streaming, lost in {} out {}",
            ended.failures.len(),
            range.len(),
            f.lost_in,
            f.lost_out
        ),
    );
}

async fn clear_phase(env: &Env, range: Range<usize>, s: &Settings, v: &mut Verdicts) {
    println!(
        "\n== clear: {} trials (5 s of audio at once, clear after 1 s) ==",
        range.len()
    );
    let calls = place_calls(env, range.clone(), AgentMode::Clear, s.ramp.min(10.0), true).await;
    let ended = end_calls(env, calls, true).await;
    let mut to_silence = Vec::new();
    let mut after = Vec::new();
    let mut played_before = Vec::new();
    let mut untimed = 0;
    for (idx, r) in range.clone().zip(&ended.received) {
        let cleared = get(&env.sh.slots[idx].clear_wall);
        if cleared == 0 {
            untimed += 1;
            continue;
        }
        let first_silent = r
            .trace
            .iter()
            .find(|(at, marked)| *at > cleared && !marked)
            .map(|(at, _)| *at);
        let Some(silent) = first_silent else {
            untimed += 1;
            continue;
        };
        to_silence.push(Duration::from_nanos(silent - cleared));
        after.push(
            r.trace
                .iter()
                .filter(|(at, marked)| *at > cleared && *marked)
                .count(),
        );
        played_before.push(
            r.trace
                .iter()
                .filter(|(at, marked)| *at <= cleared && *marked)
                .count(),
        );
    }
    to_silence.sort();
    after.sort();
    played_before.sort();
    let t3 = p50_p99_max(&to_silence);
    println!(
        "  clear → first silent packet ({} trials, {untimed} without a measure): {}; all: {:?}",
        to_silence.len(),
        fmt3(t3),
        to_silence
            .iter()
            .map(|d| format!("{:.1}", ms(*d)))
            .collect::<Vec<_>>()
    );
    println!(
        "  agent audio packets after clear was sent: max {} (p50 {}); before it: p50 {} (50 expected)",
        quantile(&after, 1.0),
        quantile(&after, 0.5),
        quantile(&played_before, 0.5)
    );
    if !ended.failures.is_empty() {
        println!(
            "  failed calls: {:?}",
            &ended.failures[..ended.failures.len().min(5)]
        );
    }
    v.check(
        !to_silence.is_empty() && untimed == 0 && t3[2] <= s.clear_line,
        format!(
            "clear→silence max {:.2} ms (line {:.0} ms; p50 {:.2}, {} trials, {untimed} unmeasured), \
             agent packets after clear max {}",
            ms(t3[2]),
            ms(s.clear_line),
            ms(t3[0]),
            to_silence.len(),
            quantile(&after, 1.0)
        ),
    );
    v.check(
        ended.failures.is_empty(),
        format!("clear calls: {} failed", ended.failures.len()),
    );
}

async fn scale_phase(
    env: &Env,
    ctx: &Ctx,
    range: Range<usize>,
    s: &Settings,
    earlier: &std::collections::HashSet<String>,
    v: &mut Verdicts,
) {
    let n = range.len();
    println!(
        "\n== scale: {n} echo streams (set up at {:.0}/s), held {:.0} s ==",
        s.ramp, s.seconds
    );
    let limit = ensure_nofile(4 * n as u64 + 1024);
    println!("  open-file limit {limit}; load before: {}", machine_load());
    let pid = ctx.server.pid();
    let udp0 = udp_rcvbuf_errors();
    let cpu_r0 = cpu_time(pid);
    let ramp0 = Instant::now();
    let calls = place_calls(env, range.clone(), AgentMode::Echo, s.ramp, false).await;
    let (answered, streaming) =
        wait_streaming(&env.sh, range.clone(), Duration::from_secs(30)).await;
    println!(
        "  ramp: {answered} answered, {streaming} streaming of {n} after {:.1} s; engine {:.2} cores during the ramp",
        ramp0.elapsed().as_secs_f64(),
        (cpu_time(pid) - cpu_r0).as_secs_f64() / ramp0.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = live_streams(&ctx.api).await;
    println!("  load at window start: {}", machine_load());
    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(500));
    let threads0 = thread_cpu(pid);
    let cpu0 = cpu_time(pid);
    let me0 = cpu_time(std::process::id());
    let my_threads0 = thread_cpu(std::process::id());
    let got0: u64 = range.clone().map(|i| get(&env.sh.slots[i].agent_got)).sum();
    env.sh.clear_samples();
    env.sh.measuring.store(true, Ordering::Relaxed);
    let wall = watch_window(pid, Duration::from_secs_f64(s.seconds), "engine").await;
    env.sh.measuring.store(false, Ordering::Relaxed);
    let cpu1 = cpu_time(pid);
    let me1 = cpu_time(std::process::id());
    let my_threads1 = thread_cpu(std::process::id());
    let threads1 = thread_cpu(pid);
    let got1: u64 = range.clone().map(|i| get(&env.sh.slots[i].agent_got)).sum();
    let _ = rss_stop.send(true);
    let rss = rss_task.await.unwrap_or_default();
    println!("  load at window end: {}", machine_load());
    let a = sorted_durations(&env.sh.rtp_to_ws);
    let b = sorted_durations(&env.sh.ws_to_rtp_empty);
    let bq = sorted_durations(&env.sh.ws_to_rtp_queued);
    let ended = end_calls(env, calls, false).await;
    let f = flow(&env.sh, range.clone(), &ended.received);
    let udp_drops = udp_rcvbuf_errors().saturating_sub(udp0);
    // The timeline is written after the call ends: wait for every stream's entry (10 s at most).
    let until = Instant::now() + Duration::from_secs(10);
    let (stopped, e_sent, e_received, e_dropped, e_failed) = loop {
        let counts = engine_counts(&ctx.api, earlier).await;
        if counts.0 >= n as u64 || Instant::now() > until {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let live_after = live_streams(&ctx.api).await;
    let cores = (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64();
    let harness_cores = (me1 - me0).as_secs_f64() / wall.as_secs_f64();
    let peak = rss.iter().copied().max().unwrap_or(0);
    let per_s = (got1 - got0) as f64 / wall.as_secs_f64();
    println!(
        "  engine: {cores:.3} cores over {:.1} s, RSS peak sampled {:.0} MiB (VmHWM {:.0} MiB); harness {harness_cores:.2} cores; \
         {per_s:.0} media messages/s to the agent; {:.1} µs of engine CPU per frame each way",
        wall.as_secs_f64(),
        mib(peak),
        mib(status_kib(pid, "VmHWM")),
        (cpu1 - cpu0).as_secs_f64() * 1e6 / (2.0 * (got1 - got0).max(1) as f64)
    );
    println!(
        "  engine threads in the window: {}",
        thread_delta(&threads0, &threads1, wall)
    );
    println!(
        "  harness threads in the window: {}; the agent's 5 ms timer late by {}",
        thread_delta(&my_threads0, &my_threads1, wall),
        fmt3(p50_p99_max(&sorted_durations(&env.sh.agent_late)))
    );
    println!(
        "  caller's RTP → agent's media ({} frames): {}",
        a.len(),
        fmt3(p50_p99_max(&a))
    );
    println!(
        "  agent's media → caller's RTP: queue empty ({} frames) {}; behind an earlier echo ({} frames) {}",
        b.len(),
        fmt3(p50_p99_max(&b)),
        bq.len(),
        fmt3(p50_p99_max(&bq))
    );
    println!("  {}", flow_line(&f));
    println!(
        "  engine (stream.stopped of {stopped} streams): frames sent {e_sent}, received {e_received}, dropped {e_dropped}; \
         failed streams {e_failed:?}; sautikit_media_streams_live {live:?} in the window, {live_after:?} after; \
         UDP receive-buffer drops on the machine {udp_drops}"
    );
    if !ended.failures.is_empty() {
        println!(
            "  failed calls ({}): {:?}",
            ended.failures.len(),
            &ended.failures[..ended.failures.len().min(5)]
        );
    }
    println!("  server log: {}", server_log_excerpt(&ctx.server));
    v.check(
        cores <= s.max_cores,
        format!(
            "{n} echo streams: engine {cores:.3} cores (line {}), RSS {:.0} MiB",
            s.max_cores,
            mib(peak)
        ),
    );
    v.check(
        ended.failures.is_empty()
            && streaming == n
            && f.lost_in == 0
            && f.lost_out == 0
            && f.gaps == 0
            && e_dropped == 0,
        format!(
            "{n} echo streams: {} failed calls, {streaming}/{n} streaming, frames lost in {} / out {} \
             (gaps {}), engine-dropped {e_dropped}, of {} sent",
            ended.failures.len(),
            f.lost_in,
            f.lost_out,
            f.gaps,
            f.sent
        ),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. `cargo test --benches`) is a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let phases = std::env::var("BENCH_PHASES").unwrap_or_else(|_| "latency,clear,scale".into());
    let s = Settings {
        latency_streams: env_or("BENCH_LATENCY_STREAMS", if full { 20 } else { 5 }),
        latency_seconds: env_or("BENCH_LATENCY_SECONDS", if full { 20.0 } else { 3.0 }),
        clear_trials: env_or("BENCH_CLEAR_TRIALS", if full { 20 } else { 3 }),
        streams: env_or("BENCH_STREAMS", if full { 500 } else { 5 }),
        seconds: env_or("BENCH_SECONDS", if full { 60.0 } else { 3.0 }),
        ramp: env_or("BENCH_RAMP", 50.0f64).max(1.0),
        rtp_to_ws_line: Duration::from_micros(
            (env_or("BENCH_RTP_TO_WS_P99_MS", 5.0f64) * 1000.0) as u64,
        ),
        ws_to_rtp_line: Duration::from_micros(
            (env_or("BENCH_WS_TO_RTP_P99_MS", 25.0f64) * 1000.0) as u64,
        ),
        clear_line: Duration::from_micros((env_or("BENCH_CLEAR_MS", 20.0f64) * 1000.0) as u64),
        max_cores: env_or("BENCH_MAX_CORES", 1.5),
    };
    let numbers = env_or("BENCH_NUMBERS", 10usize).clamp(1, 200);
    let lat = 0..s.latency_streams;
    let clr = lat.end..lat.end + s.clear_trials;
    let scl = clr.end..clr.end + s.streams;
    assert!(
        scl.end <= 0x1000,
        "at most 4096 calls: the marker holds 12 bits of index"
    );
    let sh = Arc::new(Shared::new(scl.end));
    let agent = start_agent(sh.clone());
    let (ctx, numbers) = setup(numbers, agent).await;
    let (sender, sender_rx) = mpsc::unbounded_channel();
    tokio::spawn(rtp_sender(sh.clone(), sender_rx));
    let env = Env {
        sh: sh.clone(),
        sip: ctx.server.sip_addr(),
        numbers: Arc::new(numbers),
        sender,
    };
    let mut v = Verdicts {
        lines: Vec::new(),
        pass: true,
    };
    if phases.contains("latency") && !lat.is_empty() {
        latency_phase(&env, lat, &s, &mut v).await;
    }
    if phases.contains("clear") && !clr.is_empty() {
        clear_phase(&env, clr, &s, &mut v).await;
    }
    if phases.contains("scale") && !scl.is_empty() {
        // The earlier phases' calls are not the scale phase's.
        let earlier: std::collections::HashSet<String> = ctx
            .api
            .get_all("/v1/calls?limit=100")
            .await
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect();
        scale_phase(&env, &ctx, scl, &s, &earlier, &mut v).await;
    }
    println!(
        "\n  agent: {} connections, {} errors",
        get(&sh.agent_connections),
        get(&sh.agent_errors)
    );
    println!("\n== summary ==");
    for l in &v.lines {
        println!("  {l}");
    }
    println!("  RESULT streams: {}", if v.pass { "PASS" } else { "FAIL" });
    drop(ctx);
    if !v.pass {
        std::process::exit(1);
    }
}
