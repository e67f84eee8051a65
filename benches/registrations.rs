//! Load harness for the registrar (issue: registrations): thousands of softphones, simulated over
//! raw UDP in this process, register with digest authentication against a real release
//! `sautikit serve` (dev mode, its own temp data dir) and then stay registered.
//!
//! - **rate**: registrations per second for a fixed time. Each registration is a full round: a
//!   REGISTER without credentials → `401` (SHA-256 challenge) → the same REGISTER with an
//!   `Authorization` answering it → `200`. Devices take turns round-robin, so at 2,000/s each of
//!   10,000 devices registers every 5 s (one Call-ID per device, CSeq rising). Measured:
//!   completed/s, failures (any final response other than 200 to the authenticated REGISTER, or no
//!   final response in `BENCH_REG_TIMEOUT_MS`), latency from sending the authenticated REGISTER
//!   to its 200 (the pass line) and of the whole round from the first REGISTER, the engine's CPU
//!   (utime+stime from /proc) and RSS (VmRSS sampled, VmHWM).
//! - **hold**: on a fresh server, every device registers once (at `BENCH_HOLD_RAMP`), then the
//!   bindings are held for `BENCH_HOLD_SECONDS` (120) while each device refreshes its binding
//!   every `BENCH_REFRESH_SECS` (120; refreshes are paced evenly, so each binding refreshes once
//!   in a 120 s window) with `Expires: BENCH_EXPIRES` (300, and `SAUTIKIT_SIP_MAX_EXPIRES` is set
//!   to the same), answering the engine's OPTIONS keepalives (every
//!   `SAUTIKIT_SIP_KEEPALIVE_SECS` = `BENCH_KEEPALIVE_SECS`, default 30) with 200. A refresh
//!   reuses the device's nonce with the next nonce count, as softphones do; a `401` (stale
//!   nonce) is answered once more. Measured over the window: the engine's CPU in cores, RSS at
//!   the end (and VmHWM), keepalives answered, bindings that got none, refreshes and their
//!   latency, bindings left in the database.
//!
//! Credentials are inserted straight into `sip_credentials` (the API hashes each password with
//! Argon2, tens of ms each), spread ten per number over numbers claimed through the API (a
//! number holds at most ten bindings). The inventory is seeded and the workspace created with
//! `sautikit admin` before the server starts.
//!
//! Devices are spread over `BENCH_REG_SOCKETS` UDP sockets (50), each with its own task that
//! owns its devices (no locks), matches responses by Call-ID and CSeq, retransmits per Timer E
//! (T1 500 ms doubling to T2 4 s) and keeps its timers in a heap. Every device has its own
//! contact `sip:<username>@127.0.0.1:<its socket's port>;ob`: the registrar keys bindings by
//! (number, contact).
//!
//! `cargo bench --bench registrations`. Environment: `BENCH_TESTS` (`rate,hold`; `store` adds
//! the registrar's store calls timed from this process without SIP), `BENCH_BACKENDS`
//! (`sqlite,postgres`; PostgreSQL only when `SAUTIKIT_TEST_POSTGRES_URL` is set),
//! `BENCH_BINDINGS` (10000 devices, one credential each), `BENCH_REG_NUMBERS` (`BENCH_BINDINGS`
//! / 10, the fewest that hold them), `BENCH_REG_RATE` (2000 registrations/s; a comma list runs
//! each in turn), `BENCH_SECONDS` (60), `BENCH_REG_SOCKETS` (50), `BENCH_REG_TIMEOUT_MS`
//! (10000), `BENCH_HOLD_RAMP` (1000/s), `BENCH_HOLD_SECONDS` (120), `BENCH_REFRESH_SECS` (120),
//! `BENCH_EXPIRES` (300), `BENCH_KEEPALIVE_SECS` (30), `BENCH_P99_MS` (20: the pass line),
//! `BENCH_REG_TARGET` (2000 completed/s: the pass line), `BENCH_HOLD_CORES` (0.2) and
//! `BENCH_HOLD_RSS_MIB` (256).

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::uac::{
    cpu_time, cseq, ensure_nofile, header, headers, machine_load, quantile, request_method,
    response_to, status_code, status_kib, thread_cpu,
};
use common::{Backend, Mode, Server, TestDb};
use futures::StreamExt;
use harness::{
    auth_param, backend_name, claim_seeded, env_or, insert_credentials, mib, sample_rss,
    sha256_hex, sip_listen, thread_delta, udp_rcvbuf_errors, udp_socket_drops,
};
use nix::sys::socket::{setsockopt, sockopt};
use sautikit_sip::digest::Algorithm;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

// The devices share the two cores with the server: keep them lean.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
/// The AOR domain and Request-URI host: the server's address (the registrar accepts its IP).
const DOMAIN: &str = "127.0.0.1";
const CNONCE: &str = "0a4f113b";

fn ms_us(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

/// `branch=` of a message's top Via.
fn via_branch(msg: &str) -> &str {
    header(msg, "Via")
        .and_then(|v| v.split(';').find_map(|p| p.trim().strip_prefix("branch=")))
        .map(|b| b.split(',').next().unwrap_or(b))
        .unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// The devices: each socket task owns its devices, finds one by Call-ID (responses) or by the
// user part of the Request-URI (keepalives), and keeps its retransmission timers in a heap.

enum Cmd {
    /// Start a registration round for local device `dev`. `refresh`: answer the device's last
    /// challenge again with the next nonce count (a fresh challenge when it has none).
    Register { dev: usize, refresh: bool },
    /// Hand over the counts since the last `Take` and start new ones.
    Take(oneshot::Sender<Stats>),
}

/// Live counters for progress lines and for knowing when a phase has settled.
#[derive(Default)]
struct Progress {
    started: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    options: AtomicU64,
    /// Rounds skipped because the device was still busy.
    busy: AtomicU64,
}

impl Progress {
    fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.started.load(Ordering::Relaxed),
            self.completed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.options.load(Ordering::Relaxed),
        )
    }
}

#[derive(Default)]
struct Stats {
    /// Rounds begun.
    started: u64,
    /// Rounds that ended in 200.
    completed: u64,
    /// Of those, refreshes that reused a nonce (no fresh challenge round trip).
    refreshes: u64,
    /// 401s to a REGISTER without credentials (the expected first step).
    challenges: u64,
    /// 401s to an authenticated REGISTER (stale nonce or a refused nonce count), answered again.
    rechallenges: u64,
    /// Final responses other than 200/401 (and 401 after two re-challenges), by status.
    failed_status: BTreeMap<u16, u64>,
    timeouts: u64,
    /// A round came due while the device's previous one was still in flight (skipped).
    busy: u64,
    retransmissions: u64,
    send_errors: u64,
    /// Responses to a transaction no longer current (after a retransmission was answered).
    late: u64,
    unmatched: u64,
    /// The challenge's realm was not the workspace id.
    realm_mismatch: u64,
    /// µs from sending the authenticated REGISTER to its 200.
    auth_lat_us: Vec<u32>,
    /// When each authenticated REGISTER of `auth_lat_us` was sent (same order).
    auth_at: Vec<Instant>,
    /// µs from the round's first REGISTER to the 200.
    round_lat_us: Vec<u32>,
    /// OPTIONS keepalives received and answered 200.
    options: u64,
    /// The same OPTIONS again (the engine retransmitted: our 200 was lost or late).
    options_retx: u64,
    other_requests: u64,
    /// At the take: devices whose last round ended in 200.
    registered: u64,
    /// At the take: of those, devices that got no keepalive since the previous take.
    silent: u64,
    /// At the take: rounds still in flight.
    in_flight: u64,
}

impl Stats {
    fn failed(&self) -> u64 {
        self.failed_status.values().sum::<u64>() + self.timeouts
    }

    fn merge(&mut self, o: Stats) {
        self.started += o.started;
        self.completed += o.completed;
        self.refreshes += o.refreshes;
        self.challenges += o.challenges;
        self.rechallenges += o.rechallenges;
        for (k, v) in o.failed_status {
            *self.failed_status.entry(k).or_default() += v;
        }
        self.timeouts += o.timeouts;
        self.busy += o.busy;
        self.retransmissions += o.retransmissions;
        self.send_errors += o.send_errors;
        self.late += o.late;
        self.unmatched += o.unmatched;
        self.realm_mismatch += o.realm_mismatch;
        self.auth_lat_us.extend(o.auth_lat_us);
        self.auth_at.extend(o.auth_at);
        self.round_lat_us.extend(o.round_lat_us);
        self.options += o.options;
        self.options_retx += o.options_retx;
        self.other_requests += o.other_requests;
        self.registered += o.registered;
        self.silent += o.silent;
        self.in_flight += o.in_flight;
    }
}

/// One registration round in flight.
struct Op {
    started: Instant,
    /// When the current authenticated REGISTER was sent (None: waiting for the challenge).
    auth_sent: Option<Instant>,
    /// CSeq of the current transaction.
    cseq: u32,
    text: Vec<u8>,
    rto: Duration,
    /// The retransmission timer in force; heap entries for other moments are stale.
    next: Instant,
    rechallenges: u8,
    /// The round began with a REGISTER without credentials.
    fresh: bool,
}

struct Dev {
    user: String,
    /// SHA-256 HA1 (user:workspace:password).
    ha1: String,
    call_id: String,
    tag: String,
    contact: String,
    cseq: u32,
    nonce: Option<String>,
    nc: u32,
    op: Option<Op>,
    registered: bool,
    /// Keepalives since the last take.
    ka: u32,
    last_ka_branch: String,
}

struct DevSocket {
    sock: UdpSocket,
    me: SocketAddr,
    server: SocketAddr,
    realm: String,
    /// H(REGISTER:sip:127.0.0.1), the same for every request.
    ha2: String,
    expires: u32,
    timeout: Duration,
    devs: Vec<Dev>,
    by_call_id: HashMap<String, usize>,
    by_user: HashMap<String, usize>,
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    branch_seq: u64,
    stats: Stats,
    progress: Arc<Progress>,
}

impl DevSocket {
    fn register_text(&mut self, i: usize, authorization: Option<&str>) -> Vec<u8> {
        self.branch_seq += 1;
        let d = &mut self.devs[i];
        d.cseq += 1;
        let mut s = String::with_capacity(768);
        use std::fmt::Write;
        let _ = write!(
            s,
            "REGISTER sip:{DOMAIN} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bKr{port}x{seq};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{DOMAIN}>;tag={tag}\r\n\
             To: <sip:{user}@{DOMAIN}>\r\n\
             Call-ID: {cid}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <{contact}>\r\n\
             Expires: {exp}\r\n\
             User-Agent: sautikit-bench/1\r\n",
            me = self.me,
            port = self.me.port(),
            seq = self.branch_seq,
            user = d.user,
            tag = d.tag,
            cid = d.call_id,
            cseq = d.cseq,
            contact = d.contact,
            exp = self.expires,
        );
        if let Some(a) = authorization {
            s.push_str("Authorization: ");
            s.push_str(a);
            s.push_str("\r\n");
        }
        s.push_str("Content-Length: 0\r\n\r\n");
        s.into_bytes()
    }

    /// An authenticated REGISTER answering the device's nonce with the next nonce count.
    fn authorized_text(&mut self, i: usize) -> Vec<u8> {
        let d = &mut self.devs[i];
        d.nc += 1;
        let nonce = d.nonce.as_deref().unwrap_or("");
        let nc = format!("{:08x}", d.nc);
        let response = sha256_hex(&format!(
            "{}:{nonce}:{nc}:{CNONCE}:auth:{}",
            d.ha1, self.ha2
        ));
        let auth = format!(
            "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", \
             uri=\"sip:{DOMAIN}\", response=\"{response}\", algorithm=SHA-256, \
             cnonce=\"{CNONCE}\", qop=auth, nc={nc}",
            user = d.user,
            realm = self.realm,
        );
        self.register_text(i, Some(&auth))
    }

    /// Send a new transaction of device `i`'s round and arm its retransmission timer.
    fn send_tx(&mut self, i: usize, text: Vec<u8>, now: Instant) {
        if self.sock.try_send_to(&text, self.server).is_err() {
            self.stats.send_errors += 1;
        }
        let cseq = self.devs[i].cseq;
        let Some(op) = self.devs[i].op.as_mut() else {
            return;
        };
        op.cseq = cseq;
        op.text = text;
        op.rto = T1;
        op.next = (now + T1).min(op.started + self.timeout);
        self.timers.push(Reverse((op.next, i, cseq)));
    }

    fn start_round(&mut self, i: usize, refresh: bool) {
        if self.devs[i].op.is_some() {
            self.stats.busy += 1;
            self.progress.busy.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let reuse = refresh && self.devs[i].nonce.is_some();
        self.devs[i].op = Some(Op {
            started: now,
            auth_sent: reuse.then_some(now),
            cseq: 0,
            text: Vec::new(),
            rto: T1,
            next: now,
            rechallenges: 0,
            fresh: !reuse,
        });
        let text = if reuse {
            self.authorized_text(i)
        } else {
            self.register_text(i, None)
        };
        self.send_tx(i, text, now);
        self.stats.started += 1;
        self.progress.started.fetch_add(1, Ordering::Relaxed);
    }

    fn end_failed(&mut self, i: usize, status: Option<u16>) {
        self.devs[i].op = None;
        self.devs[i].registered = false;
        match status {
            Some(code) => *self.stats.failed_status.entry(code).or_default() += 1,
            None => self.stats.timeouts += 1,
        }
        self.progress.failed.fetch_add(1, Ordering::Relaxed);
    }

    fn on_request(&mut self, msg: &str, method: &str) {
        let reply = response_to(msg, 200, "OK");
        if self
            .sock
            .try_send_to(reply.as_bytes(), self.server)
            .is_err()
        {
            self.stats.send_errors += 1;
        }
        if method != "OPTIONS" {
            self.stats.other_requests += 1;
            return;
        }
        // `OPTIONS sip:<user>@127.0.0.1:<port>;ob SIP/2.0`
        let user = msg
            .split_once("sip:")
            .and_then(|(_, r)| r.split_once('@'))
            .map(|(u, _)| u)
            .unwrap_or("");
        let Some(&i) = self.by_user.get(user) else {
            self.stats.other_requests += 1;
            return;
        };
        let branch = via_branch(msg);
        let d = &mut self.devs[i];
        if !branch.is_empty() && d.last_ka_branch == branch {
            self.stats.options_retx += 1;
            return;
        }
        d.last_ka_branch.clear();
        d.last_ka_branch.push_str(branch);
        d.ka += 1;
        self.stats.options += 1;
        self.progress.options.fetch_add(1, Ordering::Relaxed);
    }

    fn on_datagram(&mut self, bytes: &[u8]) {
        let Ok(msg) = std::str::from_utf8(bytes) else {
            self.stats.unmatched += 1;
            return;
        };
        if let Some(method) = request_method(msg) {
            self.on_request(msg, method);
            return;
        }
        let now = Instant::now();
        let (Some(code), Some((n, method)), Some(cid)) =
            (status_code(msg), cseq(msg), header(msg, "Call-ID"))
        else {
            self.stats.unmatched += 1;
            return;
        };
        let Some(&i) = self.by_call_id.get(cid) else {
            self.stats.unmatched += 1;
            return;
        };
        if method != "REGISTER" {
            self.stats.unmatched += 1;
            return;
        }
        let Some(op) = self.devs[i].op.as_mut() else {
            self.stats.late += 1;
            return;
        };
        if op.cseq != n {
            self.stats.late += 1;
            return;
        }
        match code {
            100..=199 => {
                // Provisional: keep retransmitting, at T2 (RFC 3261 §17.1.2.2).
                op.rto = T2;
            }
            200..=299 => {
                let auth_sent = op.auth_sent.unwrap_or(op.started);
                self.stats
                    .auth_lat_us
                    .push((now - auth_sent).as_micros().min(u32::MAX as u128) as u32);
                self.stats.auth_at.push(auth_sent);
                self.stats
                    .round_lat_us
                    .push((now - op.started).as_micros().min(u32::MAX as u128) as u32);
                if !op.fresh {
                    self.stats.refreshes += 1;
                }
                self.devs[i].op = None;
                self.devs[i].registered = true;
                self.stats.completed += 1;
                self.progress.completed.fetch_add(1, Ordering::Relaxed);
            }
            401 => {
                let authed = op.auth_sent.is_some();
                if authed {
                    op.rechallenges += 1;
                    self.stats.rechallenges += 1;
                    if op.rechallenges > 2 {
                        self.end_failed(i, Some(401));
                        return;
                    }
                } else {
                    self.stats.challenges += 1;
                }
                let offered = headers(msg, "WWW-Authenticate");
                let Some(c) = offered.iter().find(|c| {
                    auth_param(c, "algorithm").is_some_and(|a| a.eq_ignore_ascii_case("SHA-256"))
                }) else {
                    self.end_failed(i, Some(401));
                    return;
                };
                let (Some(realm), Some(nonce)) = (auth_param(c, "realm"), auth_param(c, "nonce"))
                else {
                    self.end_failed(i, Some(401));
                    return;
                };
                if realm != self.realm {
                    self.stats.realm_mismatch += 1;
                }
                let nonce = nonce.to_owned();
                let d = &mut self.devs[i];
                d.nonce = Some(nonce);
                d.nc = 0;
                if let Some(op) = d.op.as_mut() {
                    op.auth_sent = Some(now);
                }
                let text = self.authorized_text(i);
                self.send_tx(i, text, now);
            }
            _ => self.end_failed(i, Some(code)),
        }
    }

    fn on_timer(&mut self, i: usize, cseq: u32, at: Instant, now: Instant) {
        let timeout = self.timeout;
        let Some(op) = self.devs[i].op.as_mut() else {
            return;
        };
        if op.cseq != cseq || op.next != at {
            return; // stale
        }
        if now >= op.started + timeout {
            self.end_failed(i, None);
            return;
        }
        if self.sock.try_send_to(&op.text, self.server).is_err() {
            self.stats.send_errors += 1;
        }
        self.stats.retransmissions += 1;
        op.rto = (op.rto * 2).min(T2);
        op.next = (now + op.rto).min(op.started + timeout);
        self.timers.push(Reverse((op.next, i, cseq)));
    }

    fn take(&mut self) -> Stats {
        let mut s = std::mem::take(&mut self.stats);
        for d in &mut self.devs {
            if d.op.is_some() {
                s.in_flight += 1;
            }
            if d.registered {
                s.registered += 1;
                if d.ka == 0 {
                    s.silent += 1;
                }
            }
            d.ka = 0;
        }
        s
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut buf = vec![0u8; 65_535];
        let far = Duration::from_secs(3600);
        loop {
            let next = self
                .timers
                .peek()
                .map(|Reverse((at, _, _))| *at)
                .unwrap_or_else(|| Instant::now() + far);
            tokio::select! {
                biased;
                r = self.sock.recv_from(&mut buf) => {
                    if let Ok((n, _)) = r {
                        self.on_datagram(&buf[..n]);
                    }
                    // Drain what else is queued without going back through select!.
                    while let Ok((n, _)) = self.sock.try_recv_from(&mut buf) {
                        self.on_datagram(&buf[..n]);
                    }
                }
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Register { dev, refresh }) => self.start_round(dev, refresh),
                    Some(Cmd::Take(reply)) => {
                        let _ = reply.send(self.take());
                    }
                    None => return,
                },
                () = tokio::time::sleep_until(next.into()) => {
                    let now = Instant::now();
                    while let Some(Reverse((at, _, _))) = self.timers.peek() {
                        if *at > now {
                            break;
                        }
                        let Some(Reverse((at, i, cseq))) = self.timers.pop() else { break };
                        self.on_timer(i, cseq, at, now);
                    }
                }
            }
        }
    }
}

/// A device as set up in the database: username and SHA-256 HA1.
struct DevSpec {
    user: String,
    ha1_sha256: String,
}

struct Devices {
    txs: Vec<mpsc::UnboundedSender<Cmd>>,
    progress: Arc<Progress>,
    n: usize,
    /// Rounds asked for so far.
    asked: AtomicU64,
    /// The sockets' ports.
    ports: Vec<u16>,
}

impl Devices {
    /// Device `g` lives on socket `g % sockets` as its local device `g / sockets`.
    async fn start(
        server: SocketAddr,
        realm: &str,
        specs: &[DevSpec],
        sockets: usize,
        expires: u32,
        timeout: Duration,
    ) -> Devices {
        let progress = Arc::new(Progress::default());
        let ha2 = sha256_hex(&format!("REGISTER:sip:{DOMAIN}"));
        let run = std::process::id();
        let mut txs = Vec::with_capacity(sockets);
        let mut ports = Vec::with_capacity(sockets);
        for s in 0..sockets {
            let sock = UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind device socket");
            // Keepalives come in bursts of thousands (the engine sends a round at once).
            let _ = setsockopt(&sock, sockopt::RcvBuf, &(4 << 20));
            let me = sock.local_addr().expect("addr");
            ports.push(me.port());
            let mut devs = Vec::new();
            let mut by_call_id = HashMap::new();
            let mut by_user = HashMap::new();
            for (g, spec) in specs.iter().enumerate().skip(s).step_by(sockets) {
                let call_id = format!("reg{g}-{run}@bench");
                by_call_id.insert(call_id.clone(), devs.len());
                by_user.insert(spec.user.clone(), devs.len());
                devs.push(Dev {
                    user: spec.user.clone(),
                    ha1: spec.ha1_sha256.clone(),
                    call_id,
                    tag: format!("t{g}x{run}"),
                    contact: format!("sip:{}@{me};ob", spec.user),
                    cseq: 0,
                    nonce: None,
                    nc: 0,
                    op: None,
                    registered: false,
                    ka: 0,
                    last_ka_branch: String::new(),
                });
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let ds = DevSocket {
                sock,
                me,
                server,
                realm: realm.to_owned(),
                ha2: ha2.clone(),
                expires,
                timeout,
                devs,
                by_call_id,
                by_user,
                timers: BinaryHeap::new(),
                branch_seq: 0,
                stats: Stats::default(),
                progress: progress.clone(),
            };
            tokio::spawn(ds.run(rx));
            txs.push(tx);
        }
        Devices {
            txs,
            progress,
            n: specs.len(),
            asked: AtomicU64::new(0),
            ports,
        }
    }

    /// A round for device `g` (0..n).
    fn register(&self, g: usize, refresh: bool) {
        let s = self.txs.len();
        self.asked.fetch_add(1, Ordering::Relaxed);
        let _ = self.txs[g % s].send(Cmd::Register {
            dev: g / s,
            refresh,
        });
    }

    async fn take(&self) -> Stats {
        let mut all = Stats::default();
        for tx in &self.txs {
            let (reply, rx) = oneshot::channel();
            let _ = tx.send(Cmd::Take(reply));
            if let Ok(s) = rx.await {
                all.merge(s);
            }
        }
        all
    }

    /// Until every round asked for has ended (or was skipped), or `limit` passes.
    async fn settle(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            let (_, c, f, _) = self.progress.get();
            let busy = self.progress.busy.load(Ordering::Relaxed);
            if c + f + busy >= self.asked.load(Ordering::Relaxed) {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A server with numbers claimed through the API and credentials inserted into its database.

/// Fields drop in order: the server stops before its database goes.
struct Ctx {
    server: Server,
    store: sautikit::db::Db,
    workspace_id: String,
    specs: Vec<DevSpec>,
    _db: TestDb,
}

async fn setup(backend: Backend, devices: usize, expires: u32, keepalive_secs: u64) -> Ctx {
    let t0 = Instant::now();
    let db = TestDb::new(backend).await;
    // At most ten credentials per number: a number holds at most ten bindings.
    let n_numbers = env_or("BENCH_REG_NUMBERS", 0usize).max(devices.div_ceil(10));
    // Seeded before the server starts: with inventory present, dev mode seeds nothing else.
    let seeded = db.admin(&[
        "seed-inventory",
        "--count",
        &n_numbers.to_string(),
        "--start",
        "+254720000001",
    ]);
    assert_eq!(
        seeded["inserted"].as_u64(),
        Some(n_numbers as u64),
        "{seeded}"
    );
    let (workspace_id, key) = db.workspace("bench", 100_000_000);
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            ("SAUTIKIT_LOG", "warn"),
            ("SAUTIKIT_SIP_LISTEN", &sip_listen()),
            ("SAUTIKIT_SIP_MAX_EXPIRES", &expires.to_string()),
            ("SAUTIKIT_SIP_KEEPALIVE_SECS", &keepalive_secs.to_string()),
        ],
    );
    let api = server.api(&key);
    let store = sautikit::db::Db::connect(&db.url).await.expect("db");

    // Claim every seeded number through the API.
    let claimed: Vec<String> = claim_seeded(&api, &store, n_numbers)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let claim_time = t0.elapsed();

    // Credentials straight into the table: device g on number g % numbers, so devices in turn
    // hit different numbers (each REGISTER locks its number's row).
    let specs: Vec<DevSpec> = insert_credentials(&store, &workspace_id, &claimed, devices, "ts_b")
        .await
        .into_iter()
        .map(|c| DevSpec {
            user: c.user,
            ha1_sha256: c.ha1_sha256,
        })
        .collect();
    println!(
        "  setup: {n_numbers} numbers seeded and claimed through the API in {:.1} s, {devices} \
         credentials inserted in {:.1} s",
        claim_time.as_secs_f64(),
        (t0.elapsed() - claim_time).as_secs_f64()
    );
    Ctx {
        server,
        store,
        workspace_id,
        specs,
        _db: db,
    }
}

impl Ctx {
    /// The PostgreSQL database's name (None on SQLite).
    fn pg_name(&self) -> Option<String> {
        (self._db.backend == Backend::Postgres)
            .then(|| self._db.url.rsplit('/').next().unwrap_or("").to_owned())
    }

    /// Unexpired bindings in the database.
    async fn live_bindings(&self) -> i64 {
        let now = sautikit::time::to_db(chrono::Utc::now());
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sip_registrations WHERE expires_at > $1")
            .bind(now)
            .fetch_one(&self.store.read)
            .await
            .expect("count");
        sqlx::Row::try_get::<i64, _>(&row, "n").expect("n")
    }
}

/// (completed, failed, keepalives) in one second.
type Second = (u64, u64, u64);

/// Per-second deltas of the progress counters, one `Second` each second.
fn sample_seconds(
    progress: Arc<Progress>,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<Vec<Second>>) {
    let (tx, mut rx) = watch::channel(false);
    let h = tokio::spawn(async move {
        let mut out = Vec::new();
        let (_, mut c0, mut f0, mut o0) = progress.get();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = rx.changed() => break,
                _ = tick.tick() => {
                    let (_, c, f, o) = progress.get();
                    out.push((c - c0, f - f0, o - o0));
                    (c0, f0, o0) = (c, f, o);
                }
            }
        }
        out
    });
    (tx, h)
}

/// CPU time of the PostgreSQL backends serving database `name` (their process titles name it);
/// zero for SQLite, which runs inside the engine.
fn pg_backends_cpu(name: Option<&str>) -> Duration {
    let Some(name) = name else {
        return Duration::ZERO;
    };
    let mut total = Duration::ZERO;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return total;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(name) && cmd.starts_with(b"postgres") {
            total += cpu_time(pid);
        }
    }
    total
}

fn server_log_excerpt(server: &Server) -> String {
    let log = server.log_text();
    let lines: Vec<&str> = log.lines().collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        let key: String = l
            .split_whitespace()
            .skip(1)
            .take(8)
            .collect::<Vec<_>>()
            .join(" ");
        *kinds.entry(key).or_default() += 1;
    }
    let mut top: Vec<(String, usize)> = kinds.into_iter().collect();
    top.sort_by_key(|t| Reverse(t.1));
    let mut out = format!("{} log lines", lines.len());
    for (k, c) in top.iter().take(5) {
        out.push_str(&format!("\n      {c} × {k}"));
    }
    out
}

fn latency_line(name: &str, v: &mut [u32]) -> String {
    v.sort_unstable();
    format!(
        "{name}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms_us(quantile(v, 0.5)),
        ms_us(quantile(v, 0.9)),
        ms_us(quantile(v, 0.99)),
        ms_us(quantile(v, 0.999)),
        ms_us(quantile(v, 1.0)),
    )
}

/// Where the authenticated REGISTERs over `line` were, by second of the run, beside the
/// keepalives the engine sent in that second; and the p99 over the seconds without keepalives.
fn slow_by_second(st: &Stats, started: Instant, line: Duration, per_second: &[Second]) -> String {
    let line_us = line.as_micros() as u32;
    let ka = |sec: u64| per_second.get(sec as usize).map_or(0, |x| x.2);
    let mut by_second: BTreeMap<u64, usize> = BTreeMap::new();
    let mut quiet: Vec<u32> = Vec::new();
    for (lat, at) in st.auth_lat_us.iter().zip(&st.auth_at) {
        let sec = at.saturating_duration_since(started).as_secs();
        if *lat > line_us {
            *by_second.entry(sec).or_default() += 1;
        }
        // Seconds with no keepalive sent, neither in it nor in the one before.
        if ka(sec) == 0 && (sec == 0 || ka(sec - 1) == 0) {
            quiet.push(*lat);
        }
    }
    quiet.sort_unstable();
    let mut worst: Vec<(u64, usize)> = by_second.iter().map(|(s, n)| (*s, *n)).collect();
    worst.sort_by_key(|(s, n)| (Reverse(*n), *s));
    let seconds: Vec<String> = worst
        .iter()
        .take(6)
        .map(|(s, n)| format!("t={s}s: {n} (keepalives that second {})", ka(*s)))
        .collect();
    format!(
        "authenticated REGISTER → 200 over {} ms: {} in {} seconds of the run (most: {}); p99 over \
         the {} REGISTERs sent away from keepalive rounds: {:.2} ms",
        line.as_millis(),
        by_second.values().sum::<usize>(),
        by_second.len(),
        if seconds.is_empty() {
            "none".into()
        } else {
            seconds.join(", ")
        },
        quiet.len(),
        ms_us(quantile(&quiet, 0.99))
    )
}

fn counts_line(s: &Stats) -> String {
    format!(
        "rounds started {} completed {} (nonce reused {}) failed {} (non-200 {:?}, timeouts {}); \
         challenges {}, re-challenges {}, busy skips {}, retransmissions {}, late responses {}, \
         unmatched {}, send errors {}, realm mismatches {}",
        s.started,
        s.completed,
        s.refreshes,
        s.failed(),
        s.failed_status,
        s.timeouts,
        s.challenges,
        s.rechallenges,
        s.busy,
        s.retransmissions,
        s.late,
        s.unmatched,
        s.send_errors,
        s.realm_mismatch
    )
}

/// Sends `total` rounds at `rate` per second, device after device from `first`; prints a
/// progress line every 5 s. Returns the time it took.
async fn pace(
    devices: &Devices,
    pid: u32,
    total: u64,
    rate: f64,
    first: u64,
    refresh: bool,
    label: &str,
) -> Duration {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut last_line = Instant::now();
    let mut last_cpu = cpu_time(pid);
    let mut last_done = devices.progress.get().1;
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            devices.register(((first + sent) % devices.n as u64) as usize, refresh);
            sent += 1;
        }
        if last_line.elapsed() >= Duration::from_secs(5) {
            let cpu = cpu_time(pid);
            let (s, c, f, o) = devices.progress.get();
            let dt = last_line.elapsed().as_secs_f64();
            println!(
                "  {label} t={:>5.1}s started {s} completed {c} ({:.0}/s) failed {f} keepalives {o}; \
                 server {:.2} cores, RSS {:.0} MiB",
                started.elapsed().as_secs_f64(),
                (c - last_done) as f64 / dt,
                (cpu - last_cpu).as_secs_f64() / dt,
                mib(status_kib(pid, "VmRSS"))
            );
            last_cpu = cpu;
            last_done = c;
            last_line = Instant::now();
        }
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Rate

struct Settings {
    devices: usize,
    sockets: usize,
    timeout: Duration,
    expires: u32,
    keepalive_secs: u64,
}

struct RateSettings {
    rate: f64,
    seconds: f64,
    p99_line: Duration,
    target: f64,
}

async fn rate_run(backend: Backend, s: &Settings, r: &RateSettings) -> bool {
    println!(
        "\n== rate, {}: {:.0} registrations/s (challenge + authenticated REGISTER) for {:.0} s, \
         {} devices on {} sockets ==",
        backend_name(backend),
        r.rate,
        r.seconds,
        s.devices,
        s.sockets
    );
    println!("  load before: {}", machine_load());
    let ctx = setup(backend, s.devices, s.expires, s.keepalive_secs).await;
    let pid = ctx.server.pid();
    let devices = Devices::start(
        ctx.server.sip_addr(),
        &ctx.workspace_id,
        &ctx.specs,
        s.sockets,
        s.expires,
        s.timeout,
    )
    .await;
    let total = (r.rate * r.seconds).round() as u64;
    let sip_port = [ctx.server.sip_addr().port()];
    let drops0 = udp_rcvbuf_errors();
    let (server_drops0, device_drops0) = (
        udp_socket_drops(&sip_port),
        udp_socket_drops(&devices.ports),
    );
    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(250));
    let (sec_stop, sec_task) = sample_seconds(devices.progress.clone());
    let pg = ctx.pg_name();
    let pg0 = pg_backends_cpu(pg.as_deref());
    let threads0 = thread_cpu(pid);
    let cpu0 = cpu_time(pid);
    let me0 = cpu_time(std::process::id());
    let started = Instant::now();
    let sending = pace(&devices, pid, total, r.rate, 0, false, "rate").await;
    let settled = devices.settle(s.timeout + Duration::from_secs(2)).await;
    let done = started.elapsed();
    let pg1 = pg_backends_cpu(pg.as_deref());
    let cpu1 = cpu_time(pid);
    let me1 = cpu_time(std::process::id());
    let threads1 = thread_cpu(pid);
    let _ = sec_stop.send(true);
    let _ = rss_stop.send(true);
    let per_second = sec_task.await.unwrap_or_default();
    let rss = rss_task.await.unwrap_or_default();
    let hwm = status_kib(pid, "VmHWM");
    let drops = udp_rcvbuf_errors() - drops0;
    let server_drops = udp_socket_drops(&sip_port) - server_drops0;
    let device_drops = udp_socket_drops(&devices.ports) - device_drops0;
    let mut st = devices.take().await;
    let live = ctx.live_bindings().await;

    let failed = st.failed();
    let achieved = st.completed as f64 / sending.as_secs_f64();
    let slow_line = slow_by_second(&st, started, r.p99_line, &per_second);
    let mut auth = std::mem::take(&mut st.auth_lat_us);
    let mut round = std::mem::take(&mut st.round_lat_us);
    let auth_line = latency_line("authenticated REGISTER → 200", &mut auth);
    let round_line = latency_line("whole round (REGISTER → 401 → REGISTER → 200)", &mut round);
    let p99 = Duration::from_micros(u64::from(quantile(&auth, 0.99)));
    let cores = (cpu1 - cpu0).as_secs_f64() / done.as_secs_f64();
    let peak = rss.iter().copied().max().unwrap_or(0);
    // Completions per whole second of the sending window (the last partial one left out).
    let full_secs = (sending.as_secs_f64().floor() as usize).min(per_second.len());
    let mut secs: Vec<u64> = per_second[..full_secs].iter().map(|x| x.0).collect();
    secs.sort_unstable();
    let pass = failed == 0 && st.in_flight == 0 && achieved >= r.target && p99 <= r.p99_line;

    println!(
        "  offered {total} rounds in {:.2} s ({:.0}/s); all ended {} after {:.2} s",
        sending.as_secs_f64(),
        total as f64 / sending.as_secs_f64(),
        if settled { "" } else { "NOT" },
        done.as_secs_f64()
    );
    println!("  {}", counts_line(&st));
    println!("  {auth_line}");
    println!("  {round_line}");
    println!("  {slow_line}");
    println!(
        "  completed per second over {full_secs} whole seconds: min {}, median {}, max {}",
        secs.first().copied().unwrap_or(0),
        quantile(&secs, 0.5),
        secs.last().copied().unwrap_or(0)
    );
    println!(
        "  server CPU {cores:.2} cores ({:.0} µs per registration); RSS peak sampled {:.0} MiB, \
         VmHWM {:.0} MiB, at the end {:.0} MiB; harness {:.2} cores; UDP datagrams dropped for a \
         full receive buffer: {server_drops} at the server's socket, {device_drops} at the devices' \
         ({drops} machine-wide)",
        (cpu1 - cpu0).as_secs_f64() * 1e6 / st.completed.max(1) as f64,
        mib(peak),
        mib(hwm),
        mib(status_kib(pid, "VmRSS")),
        (me1 - me0).as_secs_f64() / done.as_secs_f64()
    );
    println!(
        "  server threads: {}",
        thread_delta(&threads0, &threads1, done)
    );
    if pg.is_some() {
        println!(
            "  PostgreSQL backends of this database: {:.2} cores ({:.0} µs per registration)",
            (pg1 - pg0).as_secs_f64() / done.as_secs_f64(),
            (pg1 - pg0).as_secs_f64() * 1e6 / st.completed.max(1) as f64
        );
    }
    println!(
        "  bindings in the database: {live} (devices registered here: {})",
        st.registered
    );
    println!("  server log: {}", server_log_excerpt(&ctx.server));
    println!("  load after: {}", machine_load());
    println!(
        "  RESULT rate {}: {:.0}/s offered, {achieved:.0}/s completed, failed {failed}, \
         auth→200 p50 {:.2} ms p99 {:.2} ms max {:.2} ms, round p50 {:.2} ms p99 {:.2} ms, \
         server {cores:.2} cores, RSS peak {:.0} MiB → {}",
        backend_name(backend),
        r.rate,
        ms_us(quantile(&auth, 0.5)),
        ms_us(quantile(&auth, 0.99)),
        ms_us(quantile(&auth, 1.0)),
        ms_us(quantile(&round, 0.5)),
        ms_us(quantile(&round, 0.99)),
        mib(peak.max(hwm)),
        if pass { "PASS" } else { "FAIL" }
    );
    drop(devices);
    drop(ctx);
    pass
}

// ---------------------------------------------------------------------------------------------
// Hold

struct HoldSettings {
    ramp: f64,
    seconds: f64,
    refresh_secs: f64,
    cores_line: f64,
    rss_line_mib: f64,
}

async fn hold_run(backend: Backend, s: &Settings, h: &HoldSettings) -> bool {
    println!(
        "\n== hold, {}: {} bindings held {:.0} s; Expires {} s, a refresh every {:.0} s per \
         binding, OPTIONS keepalives every {} s ==",
        backend_name(backend),
        s.devices,
        h.seconds,
        s.expires,
        h.refresh_secs,
        s.keepalive_secs
    );
    println!("  load before: {}", machine_load());
    let ctx = setup(backend, s.devices, s.expires, s.keepalive_secs).await;
    let pid = ctx.server.pid();
    let devices = Devices::start(
        ctx.server.sip_addr(),
        &ctx.workspace_id,
        &ctx.specs,
        s.sockets,
        s.expires,
        s.timeout,
    )
    .await;

    // Everyone registers once.
    let cpu_r0 = cpu_time(pid);
    let r0 = Instant::now();
    pace(&devices, pid, s.devices as u64, h.ramp, 0, false, "ramp").await;
    let settled = devices.settle(s.timeout + Duration::from_secs(2)).await;
    let ramp = r0.elapsed();
    let cpu_r1 = cpu_time(pid);
    let mut ramp_stats = devices.take().await;
    let mut ramp_auth = std::mem::take(&mut ramp_stats.auth_lat_us);
    println!(
        "  ramp: {} of {} registered in {:.1} s{} ({} failed); server {:.2} cores; {}",
        ramp_stats.completed,
        s.devices,
        ramp.as_secs_f64(),
        if settled { "" } else { " (NOT all ended)" },
        ramp_stats.failed(),
        (cpu_r1 - cpu_r0).as_secs_f64() / ramp.as_secs_f64().max(0.001),
        latency_line("authenticated REGISTER → 200", &mut ramp_auth)
    );

    // The window: refreshes paced evenly, keepalives answered as they come.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = devices.take().await; // keepalives are counted from here
    println!("  load at window start: {}", machine_load());
    let rss_start = status_kib(pid, "VmRSS");
    let sip_port = [ctx.server.sip_addr().port()];
    let drops0 = udp_rcvbuf_errors();
    let (server_drops0, device_drops0) = (
        udp_socket_drops(&sip_port),
        udp_socket_drops(&devices.ports),
    );
    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(500));
    let (sec_stop, sec_task) = sample_seconds(devices.progress.clone());
    let pg = ctx.pg_name();
    let pg0 = pg_backends_cpu(pg.as_deref());
    let threads0 = thread_cpu(pid);
    let cpu0 = cpu_time(pid);
    let me0 = cpu_time(std::process::id());
    let w0 = Instant::now();
    let refresh_rate = s.devices as f64 / h.refresh_secs;
    let total = (refresh_rate * h.seconds).round() as u64;
    pace(&devices, pid, total, refresh_rate, 0, true, "hold").await;
    let rest = Duration::from_secs_f64(h.seconds).saturating_sub(w0.elapsed());
    tokio::time::sleep(rest).await;
    let wall = w0.elapsed();
    let pg1 = pg_backends_cpu(pg.as_deref());
    let cpu1 = cpu_time(pid);
    let me1 = cpu_time(std::process::id());
    let threads1 = thread_cpu(pid);
    let rss_end = status_kib(pid, "VmRSS");
    let hwm = status_kib(pid, "VmHWM");
    let _ = sec_stop.send(true);
    let _ = rss_stop.send(true);
    let per_second = sec_task.await.unwrap_or_default();
    let rss = rss_task.await.unwrap_or_default();
    let drops = udp_rcvbuf_errors() - drops0;
    let server_drops = udp_socket_drops(&sip_port) - server_drops0;
    let device_drops = udp_socket_drops(&devices.ports) - device_drops0;
    println!("  load at window end: {}", machine_load());
    let settled = devices.settle(s.timeout + Duration::from_secs(2)).await;
    let mut st = devices.take().await;
    let live = ctx.live_bindings().await;

    let cores = (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64();
    let peak = rss.iter().copied().max().unwrap_or(0);
    let failed = st.failed();
    let mut auth = std::mem::take(&mut st.auth_lat_us);
    st.round_lat_us.clear();
    let refresh_line = latency_line("refresh REGISTER → 200", &mut auth);
    let ka_per_sec: Vec<u64> = per_second.iter().map(|x| x.2).collect();
    let busy_secs = ka_per_sec.iter().filter(|n| **n > 0).count();
    let pass = cores <= h.cores_line
        && mib(rss_end) <= h.rss_line_mib
        && failed == 0
        && st.silent == 0
        && live == s.devices as i64;

    println!(
        "  window {:.1} s: refreshes {} of {total} sent completed ({} reused the nonce, {} \
         re-challenged), failed {failed}; {}{}",
        wall.as_secs_f64(),
        st.completed,
        st.refreshes,
        st.rechallenges,
        refresh_line,
        if settled { "" } else { " (NOT all ended)" }
    );
    println!("  {}", counts_line(&st));
    println!(
        "  keepalives: {} OPTIONS answered 200 ({} retransmitted by the engine), in {busy_secs} of \
         {} seconds, at most {} in one second; bindings with no keepalive in the window: {} of {}",
        st.options,
        st.options_retx,
        ka_per_sec.len(),
        ka_per_sec.iter().max().copied().unwrap_or(0),
        st.silent,
        st.registered
    );
    println!(
        "  engine: {cores:.3} cores over the window; RSS {:.0} MiB at the start, {:.0} MiB at the \
         end, peak sampled {:.0} MiB, VmHWM {:.0} MiB (whole run, ramp included); harness {:.2} \
         cores; UDP datagrams dropped for a full receive buffer: {server_drops} at the server's \
         socket, {device_drops} at the devices' ({drops} machine-wide)",
        mib(rss_start),
        mib(rss_end),
        mib(peak),
        mib(hwm),
        (me1 - me0).as_secs_f64() / wall.as_secs_f64()
    );
    println!(
        "  server threads in the window: {}",
        thread_delta(&threads0, &threads1, wall)
    );
    if pg.is_some() {
        println!(
            "  PostgreSQL backends of this database: {:.3} cores over the window (not in the \
             engine's figure)",
            (pg1 - pg0).as_secs_f64() / wall.as_secs_f64()
        );
    }
    println!("  bindings in the database at the end: {live}");
    println!("  server log: {}", server_log_excerpt(&ctx.server));
    println!(
        "  RESULT hold {}: {} bindings, {cores:.3} cores, RSS {:.0} MiB at the end (VmHWM {:.0}), \
         keepalives {} answered, {} silent bindings, refreshes {} ok / {failed} failed \
         (p99 {:.2} ms), bindings in db {live} → {}",
        backend_name(backend),
        st.registered,
        mib(rss_end),
        mib(hwm),
        st.options,
        st.silent,
        st.completed,
        ms_us(quantile(&auth, 0.99)),
        if pass { "PASS" } else { "FAIL" }
    );
    drop(devices);
    drop(ctx);
    pass
}

// ---------------------------------------------------------------------------------------------
// Store: the registrar's database work alone, called in this process (no SIP), to separate the
// database's share of a registration from the rest.

async fn store_run(backend: Backend, s: &Settings) {
    use sautikit_actors::registrar::{RegisterBindings, RegistrarStore};
    use sautikit_sip::registrar::{BindingLimits, ContactSet, RegisterRequest, RequestedContact};
    use sautikit_sip::transaction::{Peer, Transport};

    println!(
        "\n== store, {}: the registrar's store calls from this process, no SIP; {} credentials ==",
        backend_name(backend),
        s.devices
    );
    println!("  load before: {}", machine_load());
    // The server idles meanwhile (its keepalive rounds are an hour apart).
    let ctx = setup(backend, s.devices, s.expires, 3600).await;
    let store = Arc::new(sautikit::store::SqlStore::new(
        sautikit::db::Db::connect(&ctx._db.url).await.expect("db"),
    ));
    let us = |t: Instant| t.elapsed().as_micros().min(u32::MAX as u128) as u32;
    let me = std::process::id();

    // The price of one statement: a round trip to the write connection's worker thread.
    {
        let mut conn = store.db().write.acquire().await.expect("acquire");
        let n = 5000;
        let mut lat = Vec::with_capacity(n);
        let cpu0 = cpu_time(me);
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            sqlx::query("SELECT 1")
                .execute(&mut *conn)
                .await
                .expect("select 1");
            lat.push(us(t));
        }
        println!(
            "  `SELECT 1` on the write connection, one at a time: {:.0}/s, {:.0} µs CPU each; {}",
            n as f64 / t0.elapsed().as_secs_f64(),
            (cpu_time(me) - cpu0).as_secs_f64() * 1e6 / n as f64,
            latency_line("latency", &mut lat)
        );
        drop(conn);
        let mut lat = Vec::with_capacity(n);
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            let tx = store.db().write.begin().await.expect("begin");
            tx.commit().await.expect("commit");
            lat.push(us(t));
        }
        println!(
            "  empty transaction (acquire, BEGIN, COMMIT, release): {:.0}/s; {}",
            n as f64 / t0.elapsed().as_secs_f64(),
            latency_line("latency", &mut lat)
        );
    }

    let mut logins = Vec::with_capacity(s.devices);
    let mut lat = Vec::with_capacity(s.devices);
    let t0 = Instant::now();
    for spec in &ctx.specs {
        let t = Instant::now();
        let l = store
            .device_login(&spec.user)
            .await
            .expect("device_login")
            .expect("a login");
        lat.push(us(t));
        logins.push(l);
    }
    println!(
        "  device_login, one at a time: {:.0}/s; {}",
        s.devices as f64 / t0.elapsed().as_secs_f64(),
        latency_line("latency", &mut lat)
    );
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for spec in ctx.specs.iter().take(3000) {
        let t = Instant::now();
        let realm = store.realm_for(&spec.user).await.expect("realm_for");
        assert_eq!(realm.as_deref(), Some(ctx.workspace_id.as_str()));
        lat.push(us(t));
    }
    println!(
        "  realm_for, one at a time: {:.0}/s; {}",
        lat.len() as f64 / t0.elapsed().as_secs_f64(),
        latency_line("latency", &mut lat)
    );

    let logins = Arc::new(logins);
    let cmd = move |logins: &[sautikit_actors::registrar::DeviceLogin], g: usize, cseq: u32| {
        let login = logins[g].clone();
        RegisterBindings {
            request: RegisterRequest {
                contacts: ContactSet::Bind(vec![RequestedContact {
                    uri: format!("sip:{}@127.0.0.1:5999;ob", login.username),
                    expires: None,
                }]),
                expires: Some(300),
                call_id: format!("store-{g}@bench"),
                cseq,
            },
            login,
            verified_with: Algorithm::Sha256,
            limits: BindingLimits {
                default_expires: 3600,
                max_expires: 300,
                min_expires: 60,
                max_contacts: 10,
            },
            source: Peer {
                addr: "127.0.0.1:5999".parse().expect("addr"),
                transport: Transport::Udp,
            },
            user_agent: Some("sautikit-bench/1".into()),
            engine_id: "bench-store".into(),
            now: chrono::Utc::now(),
        }
    };
    // One at a time: the transaction's own latency, first as inserts, then as refreshes.
    for (label, cseq) in [("new binding", 1u32), ("refresh", 2)] {
        let mut lat = Vec::with_capacity(s.devices);
        let cpu0 = cpu_time(me);
        let t0 = Instant::now();
        for g in 0..s.devices {
            let t = Instant::now();
            let after = store
                .register(cmd(&logins, g, cseq))
                .await
                .expect("register");
            assert!(!after.is_empty());
            lat.push(us(t));
        }
        println!(
            "  register ({label}), one at a time: {:.0}/s, {:.0} µs CPU each (this process; SQLite \
             runs in it, a PostgreSQL server does not); {}",
            s.devices as f64 / t0.elapsed().as_secs_f64(),
            (cpu_time(me) - cpu0).as_secs_f64() * 1e6 / s.devices as f64,
            latency_line("latency", &mut lat)
        );
    }
    // Many at once, as the registrar's tasks do under load.
    for (concurrency, cseq) in [(16usize, 3u32), (64, 4)] {
        let t0 = Instant::now();
        let mut lat: Vec<u32> = futures::stream::iter(0..s.devices)
            .map(|g| {
                let store = store.clone();
                let c = cmd(&logins, g, cseq);
                async move {
                    let t = Instant::now();
                    store.register(c).await.expect("register");
                    t.elapsed().as_micros().min(u32::MAX as u128) as u32
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        println!(
            "  register (refresh), {concurrency} at once: {:.0}/s; {}",
            s.devices as f64 / t0.elapsed().as_secs_f64(),
            latency_line("latency", &mut lat)
        );
    }
    if backend == Backend::Sqlite {
        what_if_fewer_statements(&store, &logins, s.devices).await;
    }
    println!("  load after: {}", machine_load());
    drop(ctx);
}

/// What-if (not the server's code): the common path of a REGISTER in three statements instead of
/// eight — both checks in one conditional UPDATE, the number's bindings read once (expired ones
/// dropped in Rust), the binding written with one upsert, and the answer's list made from what
/// was read and written instead of read again. SQLite only (its one writer serializes; on
/// PostgreSQL the checks would lock the number's row with `SELECT … FOR UPDATE` instead).
async fn what_if_fewer_statements(
    store: &Arc<sautikit::store::SqlStore>,
    logins: &Arc<Vec<sautikit_actors::registrar::DeviceLogin>>,
    devices: usize,
) {
    async fn one(
        store: &sautikit::store::SqlStore,
        login: &sautikit_actors::registrar::DeviceLogin,
        g: usize,
        cseq: i64,
    ) -> usize {
        let now = chrono::Utc::now();
        let ts = sautikit::time::to_db(now);
        let expires = sautikit::time::to_db(now + chrono::Duration::seconds(300));
        let contact = format!("sip:{}@127.0.0.1:5999;ob", login.username);
        let mut tx = store.db().write.begin().await.expect("begin");
        let ok = sqlx::query(
            "UPDATE sip_credentials SET updated_at = updated_at WHERE id = $1 AND status = 'active' \
             AND ha1_sha256 = $2 AND EXISTS (SELECT 1 FROM tenant_numbers WHERE id = $3 \
             AND status = 'active')",
        )
        .bind(&login.credential_id)
        .bind(&login.ha1_sha256)
        .bind(&login.number_id)
        .execute(&mut *tx)
        .await
        .expect("check");
        assert_eq!(ok.rows_affected(), 1);
        let rows = sqlx::query(
            "SELECT id, contact, sip_call_id, cseq, source_addr, transport, user_agent, \
             expires_at, created_at, updated_at FROM sip_registrations WHERE number_id = $1",
        )
        .bind(&login.number_id)
        .fetch_all(&mut *tx)
        .await
        .expect("bindings");
        let live = rows
            .iter()
            .filter(|r| sqlx::Row::try_get::<String, _>(*r, "expires_at").is_ok_and(|e| e > ts))
            .count();
        sqlx::query(
            "INSERT INTO sip_registrations (id, workspace_id, number_id, credential_id, contact, \
             source_addr, transport, user_agent, sip_call_id, cseq, engine_id, expires_at, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'udp', $7, $8, $9, $10, $11, \
             $12, $12) ON CONFLICT (number_id, contact) DO UPDATE SET credential_id = \
             excluded.credential_id, source_addr = excluded.source_addr, transport = \
             excluded.transport, user_agent = excluded.user_agent, sip_call_id = \
             excluded.sip_call_id, cseq = excluded.cseq, engine_id = excluded.engine_id, \
             expires_at = excluded.expires_at, updated_at = excluded.updated_at",
        )
        .bind(sautikit::time::new_id())
        .bind(&login.workspace_id)
        .bind(&login.number_id)
        .bind(&login.credential_id)
        .bind(&contact)
        .bind("127.0.0.1:5999")
        .bind("sautikit-bench/1")
        .bind(format!("whatif-{g}@bench"))
        .bind(cseq)
        .bind("bench-store")
        .bind(&expires)
        .bind(&ts)
        .execute(&mut *tx)
        .await
        .expect("upsert");
        tx.commit().await.expect("commit");
        live
    }
    let me = std::process::id();
    let cpu0 = cpu_time(me);
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(devices);
    for g in 0..devices {
        let t = Instant::now();
        one(store, &logins[g], g, 5).await;
        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    println!(
        "  WHAT-IF 3 statements (refresh), one at a time: {:.0}/s, {:.0} µs CPU each; {}",
        devices as f64 / t0.elapsed().as_secs_f64(),
        (cpu_time(me) - cpu0).as_secs_f64() * 1e6 / devices as f64,
        latency_line("latency", &mut lat)
    );
    let t0 = Instant::now();
    let mut lat: Vec<u32> = futures::stream::iter(0..devices)
        .map(|g| {
            let store = store.clone();
            let logins = logins.clone();
            async move {
                let t = Instant::now();
                one(&store, &logins[g], g, 6).await;
                t.elapsed().as_micros().min(u32::MAX as u128) as u32
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    println!(
        "  WHAT-IF 3 statements (refresh), 16 at once: {:.0}/s; {}",
        devices as f64 / t0.elapsed().as_secs_f64(),
        latency_line("latency", &mut lat)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. `cargo test --benches`) is a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let tests = std::env::var("BENCH_TESTS").unwrap_or_else(|_| "rate,hold".into());
    let mut backends = Vec::new();
    for b in std::env::var("BENCH_BACKENDS")
        .unwrap_or_else(|_| "sqlite,postgres".into())
        .split(',')
    {
        match b.trim() {
            "sqlite" => backends.push(Backend::Sqlite),
            "postgres" if std::env::var("SAUTIKIT_TEST_POSTGRES_URL").is_ok() => {
                backends.push(Backend::Postgres)
            }
            "postgres" => println!("PostgreSQL skipped: SAUTIKIT_TEST_POSTGRES_URL is not set"),
            _ => {}
        }
    }
    let s = Settings {
        devices: env_or("BENCH_BINDINGS", if full { 10_000usize } else { 200 }).max(1),
        sockets: env_or("BENCH_REG_SOCKETS", if full { 50usize } else { 4 }).max(1),
        timeout: Duration::from_millis(env_or("BENCH_REG_TIMEOUT_MS", 10_000)),
        expires: env_or("BENCH_EXPIRES", 300u32),
        keepalive_secs: env_or("BENCH_KEEPALIVE_SECS", if full { 30u64 } else { 1 }),
    };
    let limit = ensure_nofile(4096);
    println!(
        "registrations bench: {} devices, {} sockets; open-file limit {limit}",
        s.devices, s.sockets
    );
    let mut summary = Vec::new();
    if tests.contains("rate") {
        let rates = std::env::var("BENCH_REG_RATE")
            .unwrap_or_else(|_| if full { "2000" } else { "100" }.to_owned());
        for &backend in &backends {
            for rate in rates
                .split(',')
                .filter_map(|r| r.trim().parse::<f64>().ok())
            {
                let r = RateSettings {
                    rate,
                    seconds: env_or("BENCH_SECONDS", if full { 60.0 } else { 3.0 }),
                    p99_line: Duration::from_millis(env_or("BENCH_P99_MS", 20)),
                    target: env_or("BENCH_REG_TARGET", if full { 2000.0 } else { 0.0 }),
                };
                let ok = rate_run(backend, &s, &r).await;
                summary.push(format!(
                    "rate {} {rate:.0}/s: {}",
                    backend_name(backend),
                    if ok { "PASS" } else { "FAIL" }
                ));
            }
        }
    }
    if tests.contains("hold") {
        for &backend in &backends {
            let h = HoldSettings {
                ramp: env_or("BENCH_HOLD_RAMP", if full { 1000.0 } else { 100.0 }),
                seconds: env_or("BENCH_HOLD_SECONDS", if full { 120.0 } else { 4.0 }),
                refresh_secs: env_or("BENCH_REFRESH_SECS", if full { 120.0 } else { 4.0 }),
                cores_line: env_or("BENCH_HOLD_CORES", 0.2),
                rss_line_mib: env_or("BENCH_HOLD_RSS_MIB", 256.0),
            };
            let ok = hold_run(backend, &s, &h).await;
            summary.push(format!(
                "hold {}: {}",
                backend_name(backend),
                if ok { "PASS" } else { "FAIL" }
            ));
        }
    }
    if tests.contains("store") {
        for &backend in &backends {
            store_run(backend, &s).await;
        }
    }
    println!("\nsummary: {}", summary.join("; "));
}
