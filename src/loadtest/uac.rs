//! The carrier side of a load test: a few UDP sockets, each driven by one task that owns its
//! calls (no locks), finds a call by Call-ID and keeps its timers in a heap. Calls are placed
//! with a PCMU offer, ACKed, held, and ended with BYE; retransmissions follow RFC 3261 (Timer
//! A/E from T1, up to T2), and every outcome is counted.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use super::sip_text::{
    body, contact_uri, cseq, header, request_method, response_to, sdp_offer_pcmu, status_code,
};

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);

// The caller: a few UDP sockets, each driven by one task that owns its calls (no locks), finds
// a call by Call-ID and keeps its timers in a heap.

enum Cmd {
    /// Place a call to `number` offering media at `rtp`; BYE after `hold` (None: when told).
    Call {
        number: Arc<str>,
        rtp: SocketAddr,
        hold: Option<Duration>,
    },
    /// BYE every established call, spread at `per_sec` per second from this socket.
    ByeAll { per_sec: f64 },
    /// Stop and report; calls still open count as unfinished.
    Finish(oneshot::Sender<UacStats>),
}

/// Live counters for progress lines and for knowing when a run is over.
#[derive(Default)]
pub struct Progress {
    pub attempted: AtomicU64,
    pub answered: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Setups (INVITE→200) since the last [`Progress::recent_setup`].
    recent: super::report::Recent,
}

impl Progress {
    /// p50, p99 and max of the setups since the last call (zero when there were none).
    pub fn recent_setup(&self) -> (Duration, Duration, Duration) {
        self.recent.take()
    }

    /// (attempted, answered, completed, failed).
    pub fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.attempted.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
            self.completed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[derive(Default)]
pub struct UacStats {
    pub attempted: u64,
    pub answered: u64,
    pub completed: u64,
    /// Final responses ≥ 300 to INVITE, by status.
    pub invite_status: BTreeMap<u16, u64>,
    /// Final responses ≥ 300 to BYE, by status.
    pub bye_status: BTreeMap<u16, u64>,
    pub invite_timeouts: u64,
    pub bye_timeouts: u64,
    /// The engine hung up first (it should not: the script pauses 30 s).
    pub server_byes: u64,
    pub unfinished: u64,
    pub trying: u64,
    pub invite_retransmissions: u64,
    pub bye_retransmissions: u64,
    /// 200 OK retransmissions seen (each re-ACKed).
    pub ok_retransmissions: u64,
    pub no_sdp: u64,
    pub unmatched: u64,
    pub setup: Vec<Duration>,
    /// When each call of `setup` sent its first INVITE (same order).
    pub setup_sent: Vec<Instant>,
    pub bye_latency: Vec<Duration>,
    /// INVITE→`503` of the calls the engine turned away.
    pub refused: Vec<Duration>,
}

impl UacStats {
    pub fn failed(&self) -> u64 {
        self.invite_status.values().sum::<u64>()
            + self.bye_status.values().sum::<u64>()
            + self.invite_timeouts
            + self.bye_timeouts
            + self.server_byes
            + self.unfinished
    }

    pub fn merge(&mut self, o: UacStats) {
        self.attempted += o.attempted;
        self.answered += o.answered;
        self.completed += o.completed;
        for (k, v) in o.invite_status {
            *self.invite_status.entry(k).or_default() += v;
        }
        for (k, v) in o.bye_status {
            *self.bye_status.entry(k).or_default() += v;
        }
        self.invite_timeouts += o.invite_timeouts;
        self.bye_timeouts += o.bye_timeouts;
        self.server_byes += o.server_byes;
        self.unfinished += o.unfinished;
        self.trying += o.trying;
        self.invite_retransmissions += o.invite_retransmissions;
        self.bye_retransmissions += o.bye_retransmissions;
        self.ok_retransmissions += o.ok_retransmissions;
        self.no_sdp += o.no_sdp;
        self.unmatched += o.unmatched;
        self.setup.extend(o.setup);
        self.setup_sent.extend(o.setup_sent);
        self.bye_latency.extend(o.bye_latency);
        self.refused.extend(o.refused);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Inviting { provisional: bool },
    Established,
    Byeing,
}

struct Call {
    phase: Phase,
    first_sent: Instant,
    /// The next moment a timer of this call is due; heap entries for other moments are stale.
    deadline: Option<Instant>,
    rto: Duration,
    invite: Vec<u8>,
    ack: Vec<u8>,
    bye: Vec<u8>,
    bye_first: Instant,
    hold: Option<Duration>,
}

struct UacSocket {
    sock: UdpSocket,
    me: SocketAddr,
    server: SocketAddr,
    idx: usize,
    next: u64,
    timeout: Duration,
    calls: HashMap<String, Call>,
    timers: BinaryHeap<Reverse<(Instant, String)>>,
    stats: UacStats,
    progress: Arc<Progress>,
}

impl UacSocket {
    fn send(&self, bytes: &[u8]) {
        // Loopback UDP: a full socket buffer is the only failure, and Timer A/E cover a loss.
        let _ = self.sock.try_send_to(bytes, self.server);
    }

    fn arm(&mut self, cid: &str, at: Instant) {
        if let Some(c) = self.calls.get_mut(cid) {
            c.deadline = Some(at);
            self.timers.push(Reverse((at, cid.to_owned())));
        }
    }

    fn start_call(&mut self, number: &str, rtp: SocketAddr, hold: Option<Duration>) {
        self.next += 1;
        let cid = format!("b{}-{}-{}@bench", self.idx, self.next, std::process::id());
        let (me, server) = (self.me, self.server);
        let sdp = sdp_offer_pcmu(rtp, self.next);
        let invite = format!(
            "INVITE sip:{number}@{server} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK{cid}i;rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:254711000000@{me}>;tag=f{n}\r\n\
             To: <sip:{number}@{server}>\r\n\
             Call-ID: {cid}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:bench@{me}>\r\n\
             Content-Type: application/sdp\r\n\
             Content-Length: {len}\r\n\r\n{sdp}",
            n = self.next,
            len = sdp.len()
        )
        .into_bytes();
        let now = Instant::now();
        self.send(&invite);
        self.calls.insert(
            cid.clone(),
            Call {
                phase: Phase::Inviting { provisional: false },
                first_sent: now,
                deadline: None,
                rto: T1,
                invite,
                ack: Vec::new(),
                bye: Vec::new(),
                bye_first: now,
                hold,
            },
        );
        self.arm(&cid, now + T1);
        self.stats.attempted += 1;
        self.progress.attempted.fetch_add(1, Ordering::Relaxed);
    }

    fn fail(&mut self, cid: &str) {
        self.calls.remove(cid);
        self.progress.failed.fetch_add(1, Ordering::Relaxed);
    }

    fn send_bye(&mut self, cid: &str, now: Instant) {
        let Some(c) = self.calls.get_mut(cid) else {
            return;
        };
        c.phase = Phase::Byeing;
        c.bye_first = now;
        c.rto = T1;
        let _ = self.sock.try_send_to(&c.bye, self.server);
        self.arm(cid, now + T1);
    }

    fn on_datagram(&mut self, bytes: &[u8]) {
        let Ok(msg) = std::str::from_utf8(bytes) else {
            self.stats.unmatched += 1;
            return;
        };
        let now = Instant::now();
        let Some(cid) = header(msg, "Call-ID") else {
            self.stats.unmatched += 1;
            return;
        };
        if let Some(method) = request_method(msg) {
            // A request from the engine: BYE (it hung up first), OPTIONS, INFO … answer 200.
            let _ = self
                .sock
                .try_send_to(response_to(msg, 200, "OK").as_bytes(), self.server);
            if method == "BYE" && self.calls.contains_key(cid) {
                self.stats.server_byes += 1;
                let cid = cid.to_owned();
                self.fail(&cid);
            }
            return;
        }
        let (Some(code), Some((_, method))) = (status_code(msg), cseq(msg)) else {
            self.stats.unmatched += 1;
            return;
        };
        let cid = cid.to_owned();
        let Some(call) = self.calls.get_mut(&cid) else {
            // A retransmitted final response after the call ended here.
            if method == "INVITE" && (200..300).contains(&code) {
                self.stats.ok_retransmissions += 1;
            }
            return;
        };
        match (method, call.phase) {
            ("INVITE", Phase::Inviting { .. }) if code < 200 => {
                if code == 100 {
                    self.stats.trying += 1;
                }
                call.phase = Phase::Inviting { provisional: true };
                let at = call.first_sent + self.timeout;
                self.arm(&cid, at);
            }
            ("INVITE", Phase::Inviting { .. }) if code < 300 => {
                self.stats.setup.push(now - call.first_sent);
                self.progress.recent.push(now - call.first_sent);
                self.stats.setup_sent.push(call.first_sent);
                self.stats.answered += 1;
                self.progress.answered.fetch_add(1, Ordering::Relaxed);
                if !body(msg).contains("m=audio") {
                    self.stats.no_sdp += 1;
                }
                let to = header(msg, "To").unwrap_or_default();
                let from = header(msg, "From").unwrap_or_default();
                let target = contact_uri(msg)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("sip:{}", self.server));
                let me = self.me;
                let mk = |m: &str, n: u32, branch: char| {
                    format!(
                        "{m} {target} SIP/2.0\r\n\
                         Via: SIP/2.0/UDP {me};branch=z9hG4bK{cid}{branch};rport\r\n\
                         Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {cid}\r\n\
                         CSeq: {n} {m}\r\nContent-Length: 0\r\n\r\n"
                    )
                    .into_bytes()
                };
                call.ack = mk("ACK", 1, 'a');
                call.bye = mk("BYE", 2, 'b');
                call.phase = Phase::Established;
                let _ = self.sock.try_send_to(&call.ack, self.server);
                match call.hold {
                    Some(h) if h.is_zero() => self.send_bye(&cid, now),
                    Some(h) => self.arm(&cid, now + h),
                    None => call.deadline = None,
                }
            }
            ("INVITE", Phase::Inviting { .. }) => {
                // A failure: ACK it (same branch as the INVITE) and count it.
                let to = header(msg, "To").unwrap_or_default();
                let via = header(msg, "Via").unwrap_or_default();
                let from = header(msg, "From").unwrap_or_default();
                let ack = format!(
                    "ACK sip:x@{s} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\nFrom: {from}\r\n\
                     To: {to}\r\nCall-ID: {cid}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
                    s = self.server
                );
                let _ = self.sock.try_send_to(ack.as_bytes(), self.server);
                *self.stats.invite_status.entry(code).or_default() += 1;
                if code == 503 {
                    self.stats.refused.push(now - call.first_sent);
                }
                self.fail(&cid);
            }
            ("INVITE", _) if (200..300).contains(&code) => {
                // Our ACK was lost or late: the engine retransmits its 200; ACK again.
                self.stats.ok_retransmissions += 1;
                let _ = self.sock.try_send_to(&call.ack, self.server);
            }
            ("BYE", Phase::Byeing) if code >= 200 => {
                let took = now - call.bye_first;
                if code < 300 {
                    self.stats.completed += 1;
                    self.stats.bye_latency.push(took);
                    self.calls.remove(&cid);
                    self.progress.completed.fetch_add(1, Ordering::Relaxed);
                } else {
                    *self.stats.bye_status.entry(code).or_default() += 1;
                    self.fail(&cid);
                }
            }
            _ => {}
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
        match call.phase {
            Phase::Inviting { provisional } => {
                if provisional || now - call.first_sent >= self.timeout {
                    self.stats.invite_timeouts += 1;
                    self.fail(&cid);
                    return;
                }
                let _ = self.sock.try_send_to(&call.invite, self.server);
                self.stats.invite_retransmissions += 1;
                call.rto *= 2;
                let at = (now + call.rto).min(call.first_sent + self.timeout);
                self.arm(&cid, at);
            }
            Phase::Established => self.send_bye(&cid, now),
            Phase::Byeing => {
                if now - call.bye_first >= self.timeout {
                    self.stats.bye_timeouts += 1;
                    self.fail(&cid);
                    return;
                }
                let _ = self.sock.try_send_to(&call.bye, self.server);
                self.stats.bye_retransmissions += 1;
                call.rto = (call.rto * 2).min(T2);
                let at = (now + call.rto).min(call.bye_first + self.timeout);
                self.arm(&cid, at);
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut buf = vec![0u8; 65_535];
        let far = Duration::from_secs(3600);
        loop {
            let next = self
                .timers
                .peek()
                .map(|Reverse((at, _))| *at)
                .unwrap_or_else(|| Instant::now() + far);
            tokio::select! {
                biased;
                r = self.sock.recv_from(&mut buf) => {
                    if let Ok((n, _)) = r {
                        self.on_datagram(&buf[..n]);
                    }
                }
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Call { number, rtp, hold }) => self.start_call(&number, rtp, hold),
                    Some(Cmd::ByeAll { per_sec }) => {
                        let now = Instant::now();
                        let ids: Vec<String> = self
                            .calls
                            .iter()
                            .filter(|(_, c)| c.phase == Phase::Established)
                            .map(|(k, _)| k.clone())
                            .collect();
                        for (i, cid) in ids.iter().enumerate() {
                            let at = now + Duration::from_secs_f64(i as f64 / per_sec);
                            self.arm(cid, at);
                        }
                    }
                    Some(Cmd::Finish(reply)) => {
                        self.stats.unfinished = self.calls.len() as u64;
                        let _ = reply.send(std::mem::take(&mut self.stats));
                        return;
                    }
                    None => return,
                },
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
            }
        }
    }
}

pub struct Uac {
    txs: Vec<mpsc::UnboundedSender<Cmd>>,
    pub progress: Arc<Progress>,
    next: usize,
}

impl Uac {
    /// `sockets` UDP sockets on the address the route to `server` leaves from; a call that
    /// gets no final response (or whose BYE gets none) within `timeout` has failed.
    pub async fn start(
        server: SocketAddr,
        sockets: usize,
        timeout: Duration,
    ) -> std::io::Result<Uac> {
        let local = route_to(server)?;
        let progress = Arc::new(Progress::default());
        let mut txs = Vec::new();
        for idx in 0..sockets.max(1) {
            let sock = UdpSocket::bind(SocketAddr::new(local, 0)).await?;
            let me = sock.local_addr()?;
            let (tx, rx) = mpsc::unbounded_channel();
            let s = UacSocket {
                sock,
                me,
                server,
                idx,
                next: 0,
                timeout,
                calls: HashMap::new(),
                timers: BinaryHeap::new(),
                stats: UacStats::default(),
                progress: progress.clone(),
            };
            tokio::spawn(s.run(rx));
            txs.push(tx);
        }
        Ok(Uac {
            txs,
            progress,
            next: 0,
        })
    }

    pub fn call(&mut self, number: Arc<str>, rtp: SocketAddr, hold: Option<Duration>) {
        let i = self.next % self.txs.len();
        self.next += 1;
        let _ = self.txs[i].send(Cmd::Call { number, rtp, hold });
    }

    pub fn bye_all(&self, per_sec: f64) {
        let per = per_sec / self.txs.len() as f64;
        for tx in &self.txs {
            let _ = tx.send(Cmd::ByeAll { per_sec: per });
        }
    }

    pub async fn finish(self) -> UacStats {
        let mut all = UacStats::default();
        for tx in self.txs {
            let (reply, rx) = oneshot::channel();
            let _ = tx.send(Cmd::Finish(reply));
            if let Ok(s) = rx.await {
                all.merge(s);
            }
        }
        all
    }

    /// Until `placed` calls have completed or failed, or `limit` passes.
    pub async fn settle(&self, placed: u64, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            let (_, _, c, f) = self.progress.get();
            if c + f >= placed {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The local address the route to `server` leaves from.
pub fn route_to(server: SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let any: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(server)?;
    Ok(probe.local_addr()?.ip())
}
