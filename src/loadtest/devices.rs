//! Simulated softphones for the `register` scenario and the registrations bench: thousands of
//! devices on a few UDP sockets register with digest authentication (SHA-256), refresh, and
//! answer the engine's OPTIONS keepalives. Each socket's task owns its devices (no locks), finds
//! one by Call-ID (responses) or by the user part of the Request-URI (keepalives), and keeps its
//! retransmission timers (Timer E: T1 doubling to T2) in a heap.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use super::sip_text::{cseq, header, headers, request_method, response_to, status_code};

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
const CNONCE: &str = "0a4f113b";

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
pub struct Progress {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub options: AtomicU64,
    /// Rounds skipped because the device was still busy.
    pub busy: AtomicU64,
    /// Authenticated REGISTER → 200 since the last [`Progress::recent_latency`].
    recent: super::report::Recent,
}

impl Progress {
    /// p50, p99 and max of authenticated REGISTER → 200 since the last call.
    pub fn recent_latency(&self) -> (Duration, Duration, Duration) {
        self.recent.take()
    }

    /// (started, completed, failed, keepalives answered).
    pub fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.started.load(Ordering::Relaxed),
            self.completed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.options.load(Ordering::Relaxed),
        )
    }
}

#[derive(Default)]
pub struct Stats {
    /// Rounds begun.
    pub started: u64,
    /// Rounds that ended in 200.
    pub completed: u64,
    /// Of those, refreshes that reused a nonce (no fresh challenge round trip).
    pub refreshes: u64,
    /// 401s to a REGISTER without credentials (the expected first step).
    pub challenges: u64,
    /// 401s to an authenticated REGISTER (stale nonce or a refused nonce count), answered again.
    pub rechallenges: u64,
    /// Final responses other than 200/401 (and 401 after two re-challenges), by status.
    pub failed_status: BTreeMap<u16, u64>,
    pub timeouts: u64,
    /// A round came due while the device's previous one was still in flight (skipped).
    pub busy: u64,
    pub retransmissions: u64,
    pub send_errors: u64,
    /// Responses to a transaction no longer current (after a retransmission was answered).
    pub late: u64,
    pub unmatched: u64,
    /// The challenge's realm was not the workspace id.
    pub realm_mismatch: u64,
    /// µs from sending the authenticated REGISTER to its 200.
    pub auth_lat_us: Vec<u32>,
    /// When each authenticated REGISTER of `auth_lat_us` was sent (same order).
    pub auth_at: Vec<Instant>,
    /// µs from the round's first REGISTER to the 200.
    pub round_lat_us: Vec<u32>,
    /// OPTIONS keepalives received and answered 200.
    pub options: u64,
    /// The same OPTIONS again (the engine retransmitted: our 200 was lost or late).
    pub options_retx: u64,
    pub other_requests: u64,
    /// At the take: devices whose last round ended in 200.
    pub registered: u64,
    /// At the take: of those, devices that got no keepalive since the previous take.
    pub silent: u64,
    /// At the take: rounds still in flight.
    pub in_flight: u64,
}

impl Stats {
    pub fn failed(&self) -> u64 {
        self.failed_status.values().sum::<u64>() + self.timeouts
    }

    pub fn merge(&mut self, o: Stats) {
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
    secret: Secret,
    /// SHA-256 HA1 (user:realm:password) for `realm`.
    ha1: String,
    /// The realm of the last challenge.
    realm: String,
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
    /// The AOR domain and Request-URI host.
    domain: String,
    /// The realm the challenges should carry, when known (the workspace id).
    expected_realm: Option<String>,
    /// H(REGISTER:sip:<domain>), the same for every request.
    ha2: String,
    user_agent: &'static str,
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
            "REGISTER sip:{domain} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bKr{port}x{seq};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{domain}>;tag={tag}\r\n\
             To: <sip:{user}@{domain}>\r\n\
             Call-ID: {cid}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <{contact}>\r\n\
             Expires: {exp}\r\n\
             User-Agent: {ua}\r\n",
            domain = self.domain,
            ua = self.user_agent,
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
             uri=\"sip:{domain}\", response=\"{response}\", algorithm=SHA-256, \
             cnonce=\"{CNONCE}\", qop=auth, nc={nc}",
            user = d.user,
            realm = d.realm,
            domain = self.domain,
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
                self.progress.recent.push(now - auth_sent);
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
                if self.expected_realm.as_deref().is_some_and(|r| r != realm) {
                    self.stats.realm_mismatch += 1;
                }
                let nonce = nonce.to_owned();
                let d = &mut self.devs[i];
                if d.realm != realm {
                    d.realm = realm.to_owned();
                    if let Secret::Password(password) = &d.secret {
                        d.ha1 = sha256_hex(&format!("{}:{realm}:{password}", d.user));
                    }
                }
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

/// How a device proves who it is.
#[derive(Debug, Clone)]
pub enum Secret {
    /// The credential's password: the HA1 is computed for the realm the challenge names.
    Password(String),
    /// A SHA-256 HA1 (user:realm:password) computed beforehand.
    Ha1Sha256(String),
}

/// One device: its credential's username and secret.
#[derive(Debug, Clone)]
pub struct DevSpec {
    pub user: String,
    pub secret: Secret,
}

/// Where and how the devices register.
#[derive(Debug, Clone)]
pub struct DevicesConfig {
    /// The registrar's SIP address.
    pub server: SocketAddr,
    /// The address the devices' sockets bind to (their contacts carry it).
    pub bind: IpAddr,
    /// The AOR domain and Request-URI host.
    pub domain: String,
    /// The realm the challenges must carry, when known; others are counted as mismatches.
    pub expected_realm: Option<String>,
    pub sockets: usize,
    /// `Expires` asked for.
    pub expires: u32,
    /// A round with no final answer by then fails.
    pub timeout: Duration,
    pub user_agent: &'static str,
}

pub struct Devices {
    txs: Vec<mpsc::UnboundedSender<Cmd>>,
    pub progress: Arc<Progress>,
    pub n: usize,
    /// Rounds asked for so far.
    asked: AtomicU64,
    /// The sockets' ports.
    pub ports: Vec<u16>,
}

impl Devices {
    /// Device `g` lives on socket `g % sockets` as its local device `g / sockets`.
    pub async fn start(config: &DevicesConfig, specs: &[DevSpec]) -> std::io::Result<Devices> {
        let sockets = config.sockets.max(1);
        let progress = Arc::new(Progress::default());
        let ha2 = sha256_hex(&format!("REGISTER:sip:{}", config.domain));
        let run = std::process::id();
        let mut txs = Vec::with_capacity(sockets);
        let mut ports = Vec::with_capacity(sockets);
        for s in 0..sockets {
            let sock = UdpSocket::bind(SocketAddr::new(config.bind, 0)).await?;
            // Keepalives come in bursts of thousands (the engine sends a round at once).
            let _ =
                nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
            let me = sock.local_addr()?;
            ports.push(me.port());
            let mut devs = Vec::new();
            let mut by_call_id = HashMap::new();
            let mut by_user = HashMap::new();
            for (g, spec) in specs.iter().enumerate().skip(s).step_by(sockets) {
                let call_id = format!("reg{g}-{run}@loadtest");
                by_call_id.insert(call_id.clone(), devs.len());
                by_user.insert(spec.user.clone(), devs.len());
                let ha1 = match &spec.secret {
                    Secret::Ha1Sha256(ha1) => ha1.clone(),
                    Secret::Password(_) => String::new(),
                };
                devs.push(Dev {
                    user: spec.user.clone(),
                    secret: spec.secret.clone(),
                    ha1,
                    realm: String::new(),
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
                server: config.server,
                domain: config.domain.clone(),
                expected_realm: config.expected_realm.clone(),
                ha2: ha2.clone(),
                user_agent: config.user_agent,
                expires: config.expires,
                timeout: config.timeout,
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
        Ok(Devices {
            txs,
            progress,
            n: specs.len(),
            asked: AtomicU64::new(0),
            ports,
        })
    }

    /// A round for device `g` (0..n).
    pub fn register(&self, g: usize, refresh: bool) {
        let s = self.txs.len();
        self.asked.fetch_add(1, Ordering::Relaxed);
        let _ = self.txs[g % s].send(Cmd::Register {
            dev: g / s,
            refresh,
        });
    }

    pub async fn take(&self) -> Stats {
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
    pub async fn settle(&self, limit: Duration) -> bool {
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

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A parameter of a `WWW-Authenticate` value: `name="value"` or `name=token`.
pub fn auth_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = value;
    while let Some(pos) = rest.find(name) {
        let before = rest[..pos].chars().last();
        let after = &rest[pos + name.len()..];
        rest = after;
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            continue;
        }
        let Some(v) = after.trim_start().strip_prefix('=') else {
            continue;
        };
        let v = v.trim_start();
        if let Some(q) = v.strip_prefix('"') {
            return q.split('"').next();
        }
        return v.split([',', ' ']).next();
    }
    None
}
