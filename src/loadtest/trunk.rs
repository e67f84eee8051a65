//! The callee's side of calls placed through the API, for the `outbound` scenario and the
//! placed-calls bench: the outbound trunk as one UDP socket and one task answering every INVITE
//! (its timers in a heap), a few RTP sockets matching each packet to its call by source port,
//! and the API client placing each call in a task of its own at its paced time. What happened
//! to each call is written into a [`Run`] as it happens (monotonic and kernel receive times),
//! read after the run.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use nix::sys::time::TimeSpec;
use sautikit_sip::rtp::RtpHeader;
use sautikit_sip::rtp::g711::ulaw;
use sautikit_sip::sdp::Codec;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::sip_text::{header, headers, request_method, response_to};

/// A PCMU sample this loud (about −30 dBFS) is the prompt, not the silence before it.
pub const AUDIBLE: i16 = 1000;
/// Callee numbers: this and the call's index in six digits.
pub const TO_PREFIX: &str = "+254711";
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);

// ---------------------------------------------------------------------------------------------
// What happened to each call. Every field is written by one task (the HTTP request's, the
// trunk's or the call's RTP socket's) and read after the run; 0 stands for "never".

#[derive(Default)]
pub struct CallRec {
    /// The POST was handed to the HTTP client: monotonic and wall-clock ns.
    pub posted: AtomicU64,
    pub posted_wall: AtomicU64,
    /// Its response came back, and its status (1: no response at all).
    pub responded: AtomicU64,
    pub status: AtomicU64,
    /// The call's INVITE was read by the trunk; the kernel's receive time (wall ns).
    pub invite: AtomicU64,
    pub invite_kernel: AtomicU64,
    /// Our `200` first went out: monotonic and wall-clock ns.
    pub ok_sent: AtomicU64,
    pub ok_sent_wall: AtomicU64,
    pub acked: AtomicU64,
    /// The first RTP packet from the call's port was read (the engine sends silence from the
    /// answer until the script plays something); its kernel receive time.
    pub rtp: AtomicU64,
    pub rtp_kernel: AtomicU64,
    /// A talkspurt after the stream's first packet (marker bit): the playback's start. A playback
    /// that started before the stream's first packet has none: its first packet is that one
    /// (see [`CallRec::prompt_times`]).
    pub prompt: AtomicU64,
    pub prompt_kernel: AtomicU64,
    /// The first packet with a sample at or above [`AUDIBLE`].
    pub audible: AtomicU64,
    pub audible_kernel: AtomicU64,
    pub packets: AtomicU64,
    /// The engine's BYE was read.
    pub bye: AtomicU64,
}

impl CallRec {
    /// When the prompt's first packet arrived: (monotonic, kernel wall clock) ns. It is the
    /// second talkspurt of the stream; with only one, the stream's first packet, if the call
    /// heard anything at all.
    pub fn prompt_times(&self) -> Option<(u64, u64)> {
        if get(&self.prompt) != 0 {
            Some((get(&self.prompt), get(&self.prompt_kernel)))
        } else if get(&self.audible) != 0 {
            Some((get(&self.rtp), get(&self.rtp_kernel)))
        } else {
            None
        }
    }
}

pub fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

pub fn set(a: &AtomicU64, v: u64) {
    a.store(v, Ordering::Relaxed)
}

/// Counters of the trunk and the RTP sockets.
#[derive(Default)]
pub struct Counters {
    pub invites: AtomicU64,
    pub invite_retransmissions: AtomicU64,
    /// INVITEs whose Request-URI names no call of this run (answered `404`).
    pub unknown_invites: AtomicU64,
    pub ok_retransmissions: AtomicU64,
    pub ack_timeouts: AtomicU64,
    pub acks: AtomicU64,
    pub byes: AtomicU64,
    /// BYEs for calls the trunk no longer holds (a retransmission; answered `200` again).
    pub stray_byes: AtomicU64,
    pub other_requests: AtomicU64,
    pub responses: AtomicU64,
    pub rtp_packets: AtomicU64,
    /// RTP from a port no live call of this run was offered on.
    pub rtp_unmatched: AtomicU64,
}

pub struct Run {
    pub base: Instant,
    pub calls: Vec<CallRec>,
    /// The engine's RTP port → the call's index + 1, from our `200` until its BYE.
    pub ports: Vec<AtomicU64>,
    pub counters: Counters,
    /// The first few bodies of POSTs that did not answer `201`.
    pub errors: Mutex<Vec<String>>,
}

impl Run {
    pub fn new(calls: usize) -> Run {
        Run {
            base: Instant::now(),
            calls: (0..calls).map(|_| CallRec::default()).collect(),
            ports: (0..=u16::MAX).map(|_| AtomicU64::new(0)).collect(),
            counters: Counters::default(),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// Monotonic ns since the run's base, never 0.
    pub fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    pub fn instant(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns.saturating_sub(1))
    }
}

// ---------------------------------------------------------------------------------------------
// The trunk: one UDP socket and one task answering every INVITE, with its timers in a heap.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Leg {
    /// `180` sent, `200` due at the deadline.
    Ringing,
    Answered,
}

struct TrunkCall {
    idx: usize,
    leg: Leg,
    /// The last response sent to the INVITE (sent again for a retransmitted INVITE).
    last: Vec<u8>,
    ok: Vec<u8>,
    ok_first: Instant,
    acked: bool,
    rto: Duration,
    /// The next moment a timer of this call is due; heap entries for other moments are stale.
    deadline: Option<Instant>,
    rtp_port: u16,
}

pub struct Trunk {
    sock: UdpSocket,
    me: SocketAddr,
    engine: SocketAddr,
    media: Vec<SocketAddr>,
    ring: Duration,
    calls: HashMap<String, TrunkCall>,
    timers: BinaryHeap<Reverse<(Instant, String)>>,
    run: Arc<Run>,
}

/// The callee's index from a Request-URI `sip:+254711NNNNNN@…`.
fn callee_index(msg: &str) -> Option<usize> {
    let uri = msg.split(' ').nth(1)?;
    let user = uri.strip_prefix("sip:")?.split('@').next()?;
    user.strip_prefix(TO_PREFIX)?.parse().ok()
}

/// A response to `request` as the callee: Via, From, Call-ID and CSeq echoed, To with our tag,
/// our Contact, and an SDP body when given.
fn callee_response(
    request: &str,
    code: u16,
    reason: &str,
    tag: &str,
    contact: SocketAddr,
    sdp_body: Option<&str>,
) -> Vec<u8> {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for v in headers(request, "Via") {
        out.push_str(&format!("Via: {v}\r\n"));
    }
    for name in ["From", "Call-ID", "CSeq"] {
        if let Some(v) = header(request, name) {
            out.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    let to = header(request, "To").unwrap_or_default();
    out.push_str(&format!("To: {to};tag={tag}\r\n"));
    out.push_str(&format!("Contact: <sip:trunk@{contact}>\r\n"));
    match sdp_body {
        Some(b) => out.push_str(&format!(
            "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out.into_bytes()
}

impl Trunk {
    /// The trunk on `sock`, answering the engine at `engine` with media at one of `media` (by
    /// the call's index); `ring`: `180` at once and `200` that much later (zero: `200` at once).
    pub fn new(
        sock: UdpSocket,
        engine: SocketAddr,
        media: Vec<SocketAddr>,
        ring: Duration,
        run: Arc<Run>,
    ) -> std::io::Result<Trunk> {
        let me = sock.local_addr()?;
        Ok(Trunk {
            sock,
            me,
            engine,
            media,
            ring,
            calls: HashMap::new(),
            timers: BinaryHeap::new(),
            run,
        })
    }

    fn send(&self, bytes: &[u8]) {
        // Loopback UDP: a full socket buffer is the only failure, and the engine's INVITE
        // retransmissions (ours of the 200) cover a loss.
        let _ = self.sock.try_send_to(bytes, self.engine);
    }

    fn arm(&mut self, cid: &str, at: Instant) {
        if let Some(c) = self.calls.get_mut(cid) {
            c.deadline = Some(at);
            self.timers.push(Reverse((at, cid.to_owned())));
        }
    }

    /// Send the call's `200` for the first time and start matching its RTP.
    fn answer(&mut self, cid: &str) {
        let Some(c) = self.calls.get_mut(cid) else {
            return;
        };
        let run = &self.run;
        let rec = &run.calls[c.idx];
        set(&run.ports[usize::from(c.rtp_port)], c.idx as u64 + 1);
        set(&rec.ok_sent_wall, wall_ns());
        set(&rec.ok_sent, run.now());
        let _ = self.sock.try_send_to(&c.ok, self.engine);
        let now = Instant::now();
        c.leg = Leg::Answered;
        c.last = c.ok.clone();
        c.ok_first = now;
        c.rto = T1;
        self.arm(cid, now + T1);
    }

    fn on_invite(&mut self, msg: &str, kernel: u64) {
        let c = &self.run.counters;
        let Some(cid) = header(msg, "Call-ID") else {
            return;
        };
        if let Some(call) = self.calls.get(cid) {
            c.invite_retransmissions.fetch_add(1, Ordering::Relaxed);
            let _ = self.sock.try_send_to(&call.last, self.engine);
            return;
        }
        let (Some(idx), Some(rtp)) = (
            callee_index(msg).filter(|i| *i < self.run.calls.len()),
            sdp_rtp(msg),
        ) else {
            c.unknown_invites.fetch_add(1, Ordering::Relaxed);
            self.send(&callee_response(msg, 404, "Not Found", "x", self.me, None));
            return;
        };
        c.invites.fetch_add(1, Ordering::Relaxed);
        let rec = &self.run.calls[idx];
        set(&rec.invite_kernel, kernel);
        set(&rec.invite, self.run.now());
        let tag = format!("t{idx}");
        let media = self.media[idx % self.media.len()];
        let answer_sdp = sdp(media, Codec::Pcmu, 101);
        let ok = callee_response(msg, 200, "OK", &tag, self.me, Some(&answer_sdp));
        let now = Instant::now();
        let mut call = TrunkCall {
            idx,
            leg: Leg::Ringing,
            last: Vec::new(),
            ok,
            ok_first: now,
            acked: false,
            rto: T1,
            deadline: None,
            rtp_port: rtp.port(),
        };
        if self.ring.is_zero() {
            self.calls.insert(cid.to_owned(), call);
            self.answer(cid);
        } else {
            call.last = callee_response(msg, 180, "Ringing", &tag, self.me, None);
            self.send(&call.last);
            self.calls.insert(cid.to_owned(), call);
            self.arm(cid, now + self.ring);
        }
    }

    fn on_datagram(&mut self, bytes: &[u8], kernel: u64) {
        let Ok(msg) = std::str::from_utf8(bytes) else {
            return;
        };
        let c = &self.run.counters;
        let Some(method) = request_method(msg) else {
            c.responses.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match method {
            "INVITE" => self.on_invite(msg, kernel),
            "ACK" => {
                c.acks.fetch_add(1, Ordering::Relaxed);
                if let Some(call) = header(msg, "Call-ID").and_then(|cid| self.calls.get_mut(cid))
                    && !call.acked
                {
                    call.acked = true;
                    call.deadline = None;
                    set(&self.run.calls[call.idx].acked, self.run.now());
                }
            }
            "BYE" => {
                self.send(response_to(msg, 200, "OK").as_bytes());
                let Some(call) = header(msg, "Call-ID").and_then(|cid| self.calls.remove(cid))
                else {
                    c.stray_byes.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                c.byes.fetch_add(1, Ordering::Relaxed);
                let run = &self.run;
                set(&run.calls[call.idx].bye, run.now());
                let _ = run.ports[usize::from(call.rtp_port)].compare_exchange(
                    call.idx as u64 + 1,
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            _ => {
                c.other_requests.fetch_add(1, Ordering::Relaxed);
                self.send(response_to(msg, 200, "OK").as_bytes());
            }
        }
    }

    fn on_timer(&mut self, cid: String, at: Instant, now: Instant) {
        let Some(call) = self.calls.get_mut(&cid) else {
            return;
        };
        if call.deadline != Some(at) {
            return; // stale
        }
        call.deadline = None;
        match call.leg {
            Leg::Ringing => self.answer(&cid),
            Leg::Answered if call.acked => {}
            Leg::Answered => {
                if now - call.ok_first >= 64 * T1 {
                    // Timer H's span: the engine never acknowledged; forget the call.
                    self.run
                        .counters
                        .ack_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    self.calls.remove(&cid);
                    return;
                }
                let _ = self.sock.try_send_to(&call.ok, self.engine);
                self.run
                    .counters
                    .ok_retransmissions
                    .fetch_add(1, Ordering::Relaxed);
                call.rto = (call.rto * 2).min(T2);
                let at = now + call.rto;
                self.arm(&cid, at);
            }
        }
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut buf = vec![0u8; 65_535];
        let fd = self.sock.as_raw_fd();
        let far = Duration::from_secs(3600);
        loop {
            let next = self
                .timers
                .peek()
                .map(|Reverse((at, _))| *at)
                .unwrap_or_else(|| Instant::now() + far);
            tokio::select! {
                biased;
                r = self.sock.readable() => {
                    if r.is_err() {
                        return;
                    }
                    while let Ok((n, stamp)) = self.sock.try_io(Interest::READABLE, || {
                        recv_stamped(fd, &mut buf, MsgFlags::MSG_DONTWAIT)
                    }) {
                        let kernel = stamp.map_or_else(wall_ns, |d| d.as_nanos() as u64);
                        let bytes = buf[..n].to_vec();
                        self.on_datagram(&bytes, kernel);
                    }
                }
                () = tokio::time::sleep_until(next.into()) => {
                    let now = Instant::now();
                    while let Some(Reverse((at, _))) = self.timers.peek() {
                        if *at > now {
                            break;
                        }
                        let Some(Reverse((at, cid))) = self.timers.pop() else { break };
                        self.on_timer(cid, at, now);
                    }
                }
                _ = stop.changed() => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The callee's media: a few UDP sockets, each read by one task, every packet matched to its call
// by its source port.

/// One datagram, its source port and the kernel's receive time (wall-clock ns).
fn recv_from_stamped(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, u16, Option<u64>)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(TimeSpec);
    let msg = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)?;
    let at = arrival_ns(msg.cmsgs()?);
    let port = msg.address.map_or(0, |a| a.port());
    Ok((msg.bytes, port, at))
}

pub async fn rtp_sink(sock: UdpSocket, run: Arc<Run>, mut stop: watch::Receiver<bool>) {
    let mut buf = [0u8; 2048];
    let fd = sock.as_raw_fd();
    loop {
        tokio::select! {
            r = sock.readable() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        while let Ok((n, port, stamp)) =
            sock.try_io(Interest::READABLE, || recv_from_stamped(fd, &mut buf))
        {
            let c = &run.counters;
            c.rtp_packets.fetch_add(1, Ordering::Relaxed);
            let idx = get(&run.ports[usize::from(port)]);
            if idx == 0 {
                c.rtp_unmatched.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let rec = &run.calls[idx as usize - 1];
            let kernel = stamp.unwrap_or_else(wall_ns);
            let now = run.now();
            let index = rec.packets.fetch_add(1, Ordering::Relaxed);
            let Ok((h, payload)) = RtpHeader::parse(&buf[..n]) else {
                continue;
            };
            let audible = payload
                .iter()
                .any(|&b| ulaw::decode(b).unsigned_abs() >= AUDIBLE.unsigned_abs());
            if index == 0 {
                set(&rec.rtp_kernel, kernel);
                set(&rec.rtp, now);
            }
            if h.marker && index > 0 && get(&rec.prompt) == 0 {
                set(&rec.prompt_kernel, kernel);
                set(&rec.prompt, now);
            }
            if audible && get(&rec.audible) == 0 {
                set(&rec.audible_kernel, kernel);
                set(&rec.audible, now);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The API client: every POST in a task of its own, sent at its paced time whatever the ones
// before it are doing.

#[derive(Clone)]
pub struct Placer {
    pub client: reqwest::Client,
    /// `…/v1/calls`.
    pub url: String,
    /// `Bearer <key>`.
    pub auth: String,
    pub from: String,
    pub run: Arc<Run>,
}

impl Placer {
    pub fn place(&self, idx: usize) -> tokio::task::JoinHandle<()> {
        let p = self.clone();
        tokio::spawn(async move {
            let body = format!(r#"{{"from":"{}","to":"{TO_PREFIX}{idx:06}"}}"#, p.from);
            let rec = &p.run.calls[idx];
            let request = p
                .client
                .post(&p.url)
                .header("authorization", &p.auth)
                .header("content-type", "application/json")
                .body(body);
            set(&rec.posted_wall, wall_ns());
            set(&rec.posted, p.run.now());
            let status = match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    if status != 201
                        && let Ok(mut errors) = p.run.errors.lock()
                        && errors.len() < 5
                    {
                        errors.push(format!("{status} {text}"));
                    }
                    u64::from(status)
                }
                Err(e) => {
                    if let Ok(mut errors) = p.run.errors.lock()
                        && errors.len() < 5
                    {
                        errors.push(format!("transport: {e}"));
                    }
                    1
                }
            };
            set(&rec.responded, p.run.now());
            set(&rec.status, status);
        })
    }
}

/// Wall-clock ns (the clock of the kernel's receive times).
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Ask the kernel to stamp each datagram's arrival (`SO_TIMESTAMPNS`).
pub fn stamp_arrivals(sock: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    setsockopt(sock, sockopt::ReceiveTimestampns, &true).map_err(std::io::Error::from)
}

/// One datagram and the kernel's receive time (wall clock).
pub fn recv_stamped(
    fd: RawFd,
    buf: &mut [u8],
    flags: MsgFlags,
) -> std::io::Result<(usize, Option<Duration>)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(TimeSpec);
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), flags)?;
    let at = arrival_ns(msg.cmsgs()?).map(Duration::from_nanos);
    Ok((msg.bytes, at))
}

/// The kernel's receive time (`SO_TIMESTAMPNS`, wall-clock ns) among a datagram's control
/// messages.
pub fn arrival_ns(mut cmsgs: impl Iterator<Item = ControlMessageOwned>) -> Option<u64> {
    cmsgs.find_map(|c| match c {
        ControlMessageOwned::ScmTimestampns(t) => {
            Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        }
        _ => None,
    })
}

/// An SDP body offering or answering `codec` and RFC 4733 events (`te`) at `rtp`.
pub fn sdp(rtp: SocketAddr, codec: Codec, te: u8) -> String {
    format!(
        "v=0\r\no=- 7 7 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP {pt} {te}\r\na=rtpmap:{pt} {name}/8000\r\n\
         a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-15\r\na=sendrecv\r\n",
        ip = rtp.ip(),
        port = rtp.port(),
        pt = codec.payload_type(),
        name = codec.name(),
    )
}

/// Where a message's SDP body says RTP goes.
pub fn sdp_rtp(msg: &str) -> Option<SocketAddr> {
    let body = msg.split("\r\n\r\n").nth(1)?;
    let ip = body
        .lines()
        .find_map(|l| l.strip_prefix("c=IN IP4 "))?
        .trim()
        .parse()
        .ok()?;
    let port = body
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, port))
}
