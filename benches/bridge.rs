//! Load harness for the RTP bridge (issue: calls between registered devices): a simulated carrier
//! calls numbers whose registered devices answer, and both sides talk through the engine's relay.
//!
//! A release `sautikit serve` (dev mode, its own temp data dir, SQLite) with `BENCH_CALLS` numbers
//! seeded with `sautikit admin`, claimed through the API, with no voice callback (so a call rings
//! the number's devices), and one SIP credential per number inserted straight into the database.
//! One simulated device per number registers over UDP (REGISTER → `401` → REGISTER with a SHA-256
//! `Authorization` → `200`) and answers every INVITE at once with `200` and an SDP answer;
//! devices share `BENCH_DEVICE_SOCKETS` (4) SIP sockets, one task each. The carrier (2 sockets)
//! then places one call to every number at `BENCH_RAMP` calls/s (100) from an allowed address:
//! INVITE with a PCMU offer → `100`/`180` → `200` when the device answers → ACK. The engine
//! bridges the caller's leg and the device's leg on one media thread.
//!
//! As soon as a call is answered both of its sides send 20 ms G.711 packets (160 payload bytes, 50
//! a second each way) to the engine's two RTP ports, paced on a 1 ms wheel like the engine's own
//! (every stream keeps one of 20 slots). The RTP side of the harness is `BENCH_RTP_THREADS` (2)
//! plain threads. Each has two sockets that its calls' SDP names, one for the carriers' side and
//! one for the devices' side, so the engine's legs latch onto them and what comes back is told
//! apart by the engine port it comes from. Every millisecond a thread sleeps to the next tick of
//! the wheel, reads what arrived (`recvmmsg`, 32 at a time) and sends the frames of the slots due
//! (`sendmmsg`, 16 at a time; after a late wake at most 3 slots back to back, older frames are
//! skipped and counted, so a stall of the harness does not reach the engine as a burst). No thread
//! waits in `epoll_wait`, so a packet the engine sends wakes nobody: on one machine the sender
//! pays for waking the receiver's thread, which on hosts of their own nobody does. 100,000
//! packets a second in all when the harness keeps pace. The engine's media threads run with
//! real-time scheduling (`SAUTIKIT_MEDIA_REALTIME`, on by default); the RTP threads are given
//! `SCHED_RR` one priority below them (`BENCH_HARNESS_REALTIME=0`: normal priority), so the engine
//! gets a core first and the harness still runs ahead of other work on the machine.
//!
//! Every packet carries in its first 28 payload bytes a tag (a magic, the stream's packet count,
//! and the wall-clock time in ns just before `sendto`), written with 16 G.711 codes whose
//! transcoded images are distinct, so the tag survives the relay's µ-law ↔ A-law mapping. The
//! receiving socket's kernel timestamp (`SO_TIMESTAMPNS`: when the datagram reached the socket,
//! before this harness read it) minus the tag's send time is the packet's **delay through the
//! relay**: two loopback hops, the engine waking, rewriting and sending. (The send time is taken
//! before the `sendmmsg` of its batch, so a packet late in a batch also counts the kernel's work
//! on the ones before it: the figure errs high, by a few µs a packet.)
//!
//! **Anchor.** `BENCH_ANCHOR_CALLS` (20) pairs of streams of the same kind go through a plain UDP
//! forwarder in this process instead of the engine (one thread waiting in `epoll_wait`, with the
//! media threads' scheduling policy) and are measured the same way in the same window. Its delay
//! is what two loopback hops and a thread wake cost on this machine at this load; the engine's
//! figure minus the anchor's estimates what the relay itself adds.
//!
//! After every call is answered and `BENCH_WARMUP` (3 s) has passed, the window of `BENCH_SECONDS`
//! (60) opens. Counted over it: packets sent per direction (by their send time) and received (by
//! the send time in their tag, so late packets still count), the delay distribution per
//! direction and by second, output sequence gaps, the engine's CPU (utime+stime from
//! `/proc/<pid>/stat`) and its busiest threads, RSS (VmRSS sampled, VmHWM), this process's own CPU,
//! and UDP receive-buffer drops (`/proc/net/snmp`, and per socket from `/proc/net/udp`: at the
//! engine's RTP ports and at the harness's). Loss in the relay is what was sent and not received,
//! less what the harness's own sockets dropped.
//!
//! `BENCH_VARIANTS` (`pcmu,pcma`): `pcmu` has devices answer PCMU (the relay copies payloads);
//! `pcma` has them answer PCMA (the relay transcodes both ways). Pass lines: `BENCH_CORES` (1.0),
//! `BENCH_P99_MS` (2.0, the p99 of the engine's delay in each direction). `BENCH_RTP_PORTS` sets the
//! engine's RTP range (20000-29999: 5,000 RTP ports), `BENCH_MEDIA_REALTIME` its
//! `SAUTIKIT_MEDIA_REALTIME` (true), `BENCH_HARNESS_REALTIME` (1) the RTP threads' scheduling.
//! The engine's other limits hold 1,000 bridged calls as they are: `SAUTIKIT_MAX_CALLS` 10,000,
//! `SAUTIKIT_MAX_CALL_SETUPS` 1,000 (at 100 calls/s a few dozen are in setup), two RTP ports a call,
//! `SAUTIKIT_MEDIA_TIMEOUT_SECS` 60 (both legs send throughout), and the workspace is created
//! with KES 10,000,000 of credit.
//!
//! `cargo bench --bench bridge`; `cargo test --benches` (or the bench binary without `--bench`)
//! runs 20 calls for 2 s as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::caller::recv_stamped;
use common::peer::{sdp, sdp_rtp};
use common::uac::{
    cpu_time, cseq, ensure_nofile, header, headers, machine_load, request_method, response_to,
    status_code, status_kib, thread_cpu,
};
use common::{Backend, Mode, Server, TestDb};
use harness::{
    auth_param, claim_seeded, env_or, insert_credentials, mib, sample_rss, sha256_hex, sip_listen,
    thread_delta, udp_rcvbuf_errors, udp_socket_drops,
};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::{
    MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg, setsockopt, sockopt,
};
use nix::sys::time::TimeSpec;
use sautikit::loadtest::trunk;
use sautikit_sip::rtp::{RtpView, g711};
use sautikit_sip::sdp::Codec;
use std::io::{IoSlice, IoSliceMut};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

// The simulated peers share the two cores with the server: keep them lean.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The AOR domain and REGISTER Request-URI host: the server's address.
const DOMAIN: &str = "127.0.0.1";
const CNONCE: &str = "0a4f113b";
const TELEPHONE_EVENT: u8 = 101;
/// Slots of 1 ms over the 20 ms frame period.
const SLOTS: usize = 20;
const PAYLOAD: usize = 160;
/// Tag nibbles: magic (4), packet count (8), send time in ns (16).
const TAG: usize = 28;
const MAGIC: [u8; 4] = [0xa, 0x5, 0xc, 0x3];
/// Wheel ticks an RTP thread sends back to back after a late wake; older ones are skipped.
const MAX_CATCH_UP: u64 = 3;
/// Delay histogram: 1 µs buckets up to this.
const HIST_US: usize = 200_000;

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The tag each packet carries through the relay.

/// 16 codes a sender writes nibbles with, and how the receiver reads them back after the relay
/// (identity, or the µ-law ↔ A-law table).
struct Alphabet {
    enc: [u8; 16],
    /// Received code → nibble; 0xff: not a symbol.
    dec: [u8; 256],
    fill: u8,
}

impl Alphabet {
    fn new(send: Codec, recv: Codec) -> Alphabet {
        let map = g711::transcode_table(send, recv);
        let image = |c: u8| map.map_or(c, |m| m[usize::from(c)]);
        let silent = [g711::SILENCE_PCMU, 0x7f, g711::SILENCE_PCMA, 0x55];
        let mut enc = [0u8; 16];
        let mut dec = [0xffu8; 256];
        let mut n = 0;
        for i in 0..256usize {
            // Spread over the code space: loud and quiet codes alike.
            let c = ((i * 37 + 11) % 256) as u8;
            let img = image(c);
            if n == 16
                || silent.contains(&c)
                || silent.contains(&img)
                || dec[usize::from(img)] != 0xff
            {
                continue;
            }
            enc[n] = c;
            dec[usize::from(img)] = n as u8;
            n += 1;
        }
        assert_eq!(n, 16, "16 codes that survive {send:?} → {recv:?}");
        let fill = match send {
            Codec::Pcmu => g711::SILENCE_PCMU,
            Codec::Pcma => g711::SILENCE_PCMA,
        };
        Alphabet { enc, dec, fill }
    }

    /// Write the tag and fill the rest of a 160-byte payload.
    fn write(&self, count: u32, sent_ns: u64, out: &mut Vec<u8>) {
        for m in MAGIC {
            out.push(self.enc[usize::from(m)]);
        }
        for k in (0..8).rev() {
            out.push(self.enc[((count >> (4 * k)) & 0xf) as usize]);
        }
        for k in (0..16).rev() {
            out.push(self.enc[((sent_ns >> (4 * k)) & 0xf) as usize]);
        }
        out.resize(out.len() + PAYLOAD - TAG, self.fill);
    }

    /// (packet count, send time) from a received payload; None if it carries no tag.
    fn read(&self, payload: &[u8]) -> Option<(u32, u64)> {
        let tag = payload.get(..TAG)?;
        let mut nib = [0u8; TAG];
        for (o, &b) in nib.iter_mut().zip(tag) {
            let d = self.dec[usize::from(b)];
            if d == 0xff {
                return None;
            }
            *o = d;
        }
        if nib[..4] != MAGIC {
            return None;
        }
        let count = nib[4..12]
            .iter()
            .fold(0u32, |a, &d| (a << 4) | u32::from(d));
        let sent = nib[12..].iter().fold(0u64, |a, &d| (a << 4) | u64::from(d));
        Some((count, sent))
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// Delays in 1 µs buckets.
#[derive(Clone)]
struct Hist {
    counts: Vec<u32>,
    over: u64,
    n: u64,
    sum_us: u64,
    max_us: u64,
}

impl Hist {
    fn new() -> Hist {
        Hist {
            counts: vec![0; HIST_US],
            over: 0,
            n: 0,
            sum_us: 0,
            max_us: 0,
        }
    }

    fn record(&mut self, us: u64) {
        self.n += 1;
        self.sum_us += us;
        self.max_us = self.max_us.max(us);
        match self.counts.get_mut(us as usize) {
            Some(c) => *c += 1,
            None => self.over += 1,
        }
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.over += o.over;
        self.n += o.n;
        self.sum_us += o.sum_us;
        self.max_us = self.max_us.max(o.max_us);
    }

    /// The `p`-quantile in ms (nearest rank).
    fn q(&self, p: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((self.n as f64 * p).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (us, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return us as f64 / 1000.0;
            }
        }
        self.max_us as f64 / 1000.0
    }

    fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum_us as f64 / self.n as f64 / 1000.0
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.3} / p99 {:.3} / p99.9 {:.3} / max {:.3} ms (mean {:.3}; {} over 1 ms, {} over 20 ms)",
            self.q(0.5),
            self.q(0.99),
            self.q(0.999),
            self.max_us as f64 / 1000.0,
            self.mean(),
            self.n
                - self.counts[..1000]
                    .iter()
                    .map(|&c| u64::from(c))
                    .sum::<u64>(),
            self.n
                - self.counts[..20_000]
                    .iter()
                    .map(|&c| u64::from(c))
                    .sum::<u64>(),
        )
    }
}

/// Through the engine or through the anchor forwarder.
const ENGINE: usize = 0;
const ANCHOR: usize = 1;
/// Carrier → device, device → carrier.
const C2D: usize = 0;
const D2C: usize = 1;
const DIR_NAMES: [&str; 2] = ["carrier → device", "device → carrier"];

/// One RTP thread's counts, by [class][direction].
struct RtpStats {
    sent: [[u64; 2]; 2],
    received: [[u64; 2]; 2],
    delay: [[Hist; 2]; 2],
    send_errors: u64,
    /// Packets without a readable tag (the pacer's silence before a bridge, or damage).
    untagged: [[u64; 2]; 2],
    /// A packet's count below the previous one's on the same stream.
    reordered: u64,
    /// Sequence numbers of the relayed stream that skip (a relayed packet the engine numbered and
    /// could not send).
    seq_gaps: u64,
    streams: u64,
    /// Sends tried (in the window or not) and wheel ticks run late (more than 1 ms behind).
    attempts: u64,
    /// Frames skipped because this thread woke too late to send them in time.
    skipped: u64,
    late_ticks: u64,
    /// Most wheel ticks one wake had to catch up.
    max_catch_up: u64,
    /// When that was (wall-clock ns).
    max_catch_up_at: u64,
    /// By second of the window, engine packets: [received, over 2 ms, max µs].
    per_second: Vec<[u64; 3]>,
}

impl RtpStats {
    fn new() -> RtpStats {
        RtpStats {
            sent: [[0; 2]; 2],
            received: [[0; 2]; 2],
            delay: [[Hist::new(), Hist::new()], [Hist::new(), Hist::new()]],
            send_errors: 0,
            untagged: [[0; 2]; 2],
            reordered: 0,
            seq_gaps: 0,
            streams: 0,
            attempts: 0,
            skipped: 0,
            late_ticks: 0,
            max_catch_up: 0,
            max_catch_up_at: 0,
            per_second: Vec::new(),
        }
    }

    fn merge(&mut self, o: &RtpStats) {
        for c in 0..2 {
            for d in 0..2 {
                self.sent[c][d] += o.sent[c][d];
                self.received[c][d] += o.received[c][d];
                self.untagged[c][d] += o.untagged[c][d];
                self.delay[c][d].merge(&o.delay[c][d]);
            }
        }
        self.send_errors += o.send_errors;
        self.reordered += o.reordered;
        self.seq_gaps += o.seq_gaps;
        self.streams += o.streams;
        self.attempts += o.attempts;
        self.skipped += o.skipped;
        self.late_ticks += o.late_ticks;
        if o.max_catch_up > self.max_catch_up {
            self.max_catch_up = o.max_catch_up;
            self.max_catch_up_at = o.max_catch_up_at;
        }
        if self.per_second.len() < o.per_second.len() {
            self.per_second.resize(o.per_second.len(), [0; 3]);
        }
        for (a, b) in self.per_second.iter_mut().zip(&o.per_second) {
            a[0] += b[0];
            a[1] += b[1];
            a[2] = a[2].max(b[2]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The RTP threads: plain threads, each with its two shared sockets (and the anchor's streams'
// own sockets) in one epoll set; every millisecond the thread reads whatever arrived, and the
// streams of that slot of the wheel send their frame.

/// What the RTP threads share: the measuring window (wall-clock ns) and the stop.
struct Window {
    start: AtomicU64,
    end: AtomicU64,
    stop: AtomicBool,
}

impl Window {
    fn contains(&self, ns: u64) -> bool {
        ns >= self.start.load(Ordering::Relaxed) && ns < self.end.load(Ordering::Relaxed)
    }
}

/// Where a stream sends from and reads: a socket of its own (the anchor's streams), or one of its
/// RTP thread's two shared sockets (`CARRIER_SIDE`, `DEVICE_SIDE`), on which what comes back is
/// told apart by the engine port it comes from.
enum StreamSock {
    Own(std::net::UdpSocket),
    Shared(usize),
}

/// The carrier's side and the devices' side of an RTP thread's calls through the engine.
const CARRIER_SIDE: usize = 0;
const DEVICE_SIDE: usize = 1;
/// Datagrams an RTP thread hands the kernel in one `sendmmsg` or reads in one `recvmmsg`. The
/// send time in a packet's tag is taken before the call, so a packet late in a batch carries the
/// kernel's work on those before it into its measured delay (a few µs each): small batches.
const SEND_BATCH: usize = 16;
const RECV_BATCH: usize = 32;

/// One side of a call as the harness plays it: sends to `remote` and reads what comes back.
struct StreamSpec {
    sock: StreamSock,
    remote: SocketAddr,
    codec: Codec,
    /// How this side's packets are read where they arrive.
    send_alpha: Arc<Alphabet>,
    /// How packets arriving here are read.
    recv_alpha: Arc<Alphabet>,
    class: usize,
    /// The direction this side sends.
    dir: usize,
    slot: usize,
}

enum RtpCmd {
    Add(Box<StreamSpec>),
    Finish(oneshot::Sender<RtpStats>),
}

/// A stream in an RTP thread: its sending state and what it last read.
struct Stream {
    sock: StreamSock,
    remote: SocketAddr,
    payload_type: u8,
    send_alpha: Arc<Alphabet>,
    recv_alpha: Arc<Alphabet>,
    class: usize,
    dir: usize,
    count: u32,
    seq: u16,
    ts: u32,
    ssrc: u32,
    last_seq: Option<u16>,
    last_count: Option<u32>,
}

impl Stream {
    /// Write this stream's next packet into `buf`, tagged with the time now; returns that time.
    fn next_packet(&mut self, buf: &mut Vec<u8>, st: &mut RtpStats) -> u64 {
        buf.clear();
        buf.push(0x80);
        buf.push(self.payload_type | if self.count == 0 { 0x80 } else { 0 });
        buf.extend_from_slice(&self.seq.to_be_bytes());
        buf.extend_from_slice(&self.ts.to_be_bytes());
        buf.extend_from_slice(&self.ssrc.to_be_bytes());
        let now = realtime_ns();
        st.attempts += 1;
        self.send_alpha.write(self.count, now, buf);
        self.count = self.count.wrapping_add(1);
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(PAYLOAD as u32);
        now
    }

    /// Send the next packet from the stream's own socket (an anchor stream's).
    fn send_own(&mut self, buf: &mut Vec<u8>, window: &Window, st: &mut RtpStats) {
        let at = self.next_packet(buf, st);
        let ok =
            matches!(&self.sock, StreamSock::Own(sock) if sock.send_to(buf, self.remote).is_ok());
        self.sent(ok, at, window, st);
    }

    fn sent(&self, ok: bool, at: u64, window: &Window, st: &mut RtpStats) {
        if !ok {
            st.send_errors += 1;
        } else if window.contains(at) {
            st.sent[self.class][self.dir] += 1;
        }
    }

    /// Read everything queued on the stream's own socket.
    fn read_all(&mut self, buf: &mut [u8], window: &Window, st: &mut RtpStats) {
        let StreamSock::Own(sock) = &self.sock else {
            return;
        };
        let fd = sock.as_raw_fd();
        while let Ok((n, stamp)) = recv_stamped(fd, buf, MsgFlags::MSG_DONTWAIT) {
            let at = stamp.map_or_else(realtime_ns, |d| d.as_nanos() as u64);
            self.on_packet(&buf[..n], at, window, st);
        }
    }

    /// A packet that came back to this stream at `at` (the kernel's receive time).
    fn on_packet(&mut self, packet: &[u8], at: u64, window: &Window, st: &mut RtpStats) {
        let dir = 1 - self.dir;
        let class = self.class;
        let Ok(p) = RtpView::parse(packet) else {
            st.untagged[class][dir] += 1;
            return;
        };
        let Some((count, sent)) = self.recv_alpha.read(p.payload) else {
            st.untagged[class][dir] += 1;
            return;
        };
        if let Some(l) = self.last_seq
            && p.sequence.wrapping_sub(l) != 1
        {
            st.seq_gaps += 1;
        }
        self.last_seq = Some(p.sequence);
        if let Some(l) = self.last_count
            && (count.wrapping_sub(l) as i32) <= 0
        {
            st.reordered += 1;
        }
        self.last_count = Some(count);
        if window.contains(sent) {
            let us = at.saturating_sub(sent) / 1000;
            st.received[class][dir] += 1;
            st.delay[class][dir].record(us);
            if class == ENGINE {
                let sec = ((sent - window.start.load(Ordering::Relaxed)) / 1_000_000_000) as usize;
                if st.per_second.len() <= sec {
                    st.per_second.resize(sec + 1, [0; 3]);
                }
                let e = &mut st.per_second[sec];
                e[0] += 1;
                e[1] += u64::from(us > 2000);
                e[2] = e[2].max(us);
            }
        }
    }
}

/// One of an RTP thread's shared sockets: the streams it carries by the engine port they hear
/// from, and the packets of the current tick waiting for one `sendmmsg`.
struct SharedSide {
    sock: std::net::UdpSocket,
    by_port: Vec<u32>,
    out: Vec<Vec<u8>>,
    to: Vec<Option<SockaddrIn>>,
    /// (stream, send time) of each packet in `out`.
    pending: Vec<(usize, u64)>,
}

impl SharedSide {
    fn new(sock: std::net::UdpSocket) -> SharedSide {
        SharedSide {
            sock,
            by_port: vec![u32::MAX; 1 << 16],
            out: (0..SEND_BATCH)
                .map(|_| Vec::with_capacity(12 + PAYLOAD))
                .collect(),
            to: Vec::with_capacity(SEND_BATCH),
            pending: Vec::with_capacity(SEND_BATCH),
        }
    }

    /// Queue stream `k`'s next packet; sends the batch when it is full.
    fn queue(&mut self, k: usize, streams: &mut [Stream], window: &Window, st: &mut RtpStats) {
        let i = self.pending.len();
        let at = streams[k].next_packet(&mut self.out[i], st);
        self.to.push(match streams[k].remote {
            SocketAddr::V4(a) => Some(SockaddrIn::from(a)),
            SocketAddr::V6(_) => None,
        });
        self.pending.push((k, at));
        if self.pending.len() == SEND_BATCH {
            self.flush(streams, window, st);
        }
    }

    fn flush(&mut self, streams: &mut [Stream], window: &Window, st: &mut RtpStats) {
        if self.pending.is_empty() {
            return;
        }
        let n = self.pending.len();
        let slices: Vec<[IoSlice<'_>; 1]> =
            self.out[..n].iter().map(|b| [IoSlice::new(b)]).collect();
        let mut headers = MultiHeaders::<SockaddrIn>::preallocate(n, None);
        let sent = sendmmsg(
            self.sock.as_raw_fd(),
            &mut headers,
            &slices,
            &self.to,
            [],
            MsgFlags::empty(),
        )
        .map_or(0, |r| r.count());
        for (i, &(k, at)) in self.pending.iter().enumerate() {
            streams[k].sent(i < sent, at, window, st);
        }
        self.pending.clear();
        self.to.clear();
    }

    /// Read everything queued on the socket and hand each packet to its stream.
    fn read_all(
        &mut self,
        side: usize,
        bufs: &mut [[u8; 2048]; RECV_BATCH],
        streams: &mut [Stream],
        window: &Window,
        st: &mut RtpStats,
    ) {
        loop {
            let mut got = [(0usize, 0u16, 0u64); RECV_BATCH];
            let mut n = 0;
            {
                let mut headers = MultiHeaders::<SockaddrIn>::preallocate(
                    RECV_BATCH,
                    Some(nix::cmsg_space!(TimeSpec)),
                );
                let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                    bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                let Ok(results) = recvmmsg(
                    self.sock.as_raw_fd(),
                    &mut headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                ) else {
                    return;
                };
                for (msg, g) in results.zip(got.iter_mut()) {
                    let at = msg
                        .cmsgs()
                        .ok()
                        .and_then(trunk::arrival_ns)
                        .unwrap_or_else(realtime_ns);
                    *g = (msg.bytes, msg.address.map_or(0, |a| a.port()), at);
                    n += 1;
                }
            }
            for (i, &(len, port, at)) in got[..n].iter().enumerate() {
                match streams.get_mut(self.by_port[usize::from(port)] as usize) {
                    Some(s) => s.on_packet(&bufs[i][..len], at, window, st),
                    // The engine's ringback or silence before the stream was added here.
                    None => st.untagged[ENGINE][1 - side] += 1,
                }
            }
            if n < RECV_BATCH {
                return;
            }
        }
    }
}

fn spawn_rtp_thread(
    idx: usize,
    window: Arc<Window>,
    sides: [std::net::UdpSocket; 2],
) -> std::sync::mpsc::Sender<RtpCmd> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("bench-rtp{idx}"))
        .spawn(move || rtp_thread(idx, rx, window, sides))
        .expect("RTP thread");
    tx
}

/// Epoll data of the shared sockets; a stream's own socket's is its index.
const SHARED_TOKEN: u64 = u64::MAX - 1;

fn rtp_thread(
    idx: usize,
    rx: std::sync::mpsc::Receiver<RtpCmd>,
    window: Arc<Window>,
    sides: [std::net::UdpSocket; 2],
) {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    let mut st = RtpStats::new();
    let mut streams: Vec<Stream> = Vec::new();
    let mut wheel: Vec<Vec<usize>> = vec![Vec::new(); SLOTS];
    let mut events = vec![EpollEvent::empty(); 256];
    let mut out = Vec::with_capacity(12 + PAYLOAD);
    let mut buf = [0u8; 2048];
    let mut bufs = Box::new([[0u8; 2048]; RECV_BATCH]);
    let mut sides = sides.map(|sock| {
        sock.set_nonblocking(true).expect("nonblocking");
        assert!(
            trunk::stamp_arrivals(&sock).is_ok(),
            "SO_TIMESTAMPNS is needed for the delay figures"
        );
        SharedSide::new(sock)
    });
    for (i, side) in sides.iter().enumerate() {
        epoll
            .add(
                &side.sock,
                EpollEvent::new(EpollFlags::EPOLLIN, SHARED_TOKEN + i as u64),
            )
            .expect("epoll add");
    }
    let epoch = Instant::now();
    let mut done: u64 = 0;
    loop {
        loop {
            match rx.try_recv() {
                Ok(RtpCmd::Add(spec)) => {
                    let k = streams.len();
                    match &spec.sock {
                        StreamSock::Own(sock) => {
                            sock.set_nonblocking(true).expect("nonblocking");
                            assert!(
                                trunk::stamp_arrivals(sock).is_ok(),
                                "SO_TIMESTAMPNS is needed for the delay figures"
                            );
                            epoll
                                .add(sock, EpollEvent::new(EpollFlags::EPOLLIN, k as u64))
                                .expect("epoll add");
                        }
                        &StreamSock::Shared(side) => {
                            sides[side].by_port[usize::from(spec.remote.port())] = k as u32;
                        }
                    }
                    let ssrc = 0x5000_0000 | ((idx as u32) << 20) | k as u32;
                    streams.push(Stream {
                        sock: spec.sock,
                        remote: spec.remote,
                        payload_type: spec.codec.payload_type(),
                        send_alpha: spec.send_alpha,
                        recv_alpha: spec.recv_alpha,
                        class: spec.class,
                        dir: spec.dir,
                        count: 0,
                        seq: (ssrc as u16).wrapping_mul(7),
                        ts: ssrc.wrapping_mul(13),
                        ssrc,
                        last_seq: None,
                        last_count: None,
                    });
                    wheel[spec.slot % SLOTS].push(k);
                    st.streams += 1;
                }
                Ok(RtpCmd::Finish(reply)) => {
                    let _ = reply.send(st);
                    return;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        }
        // Sleep to the next millisecond of the wheel, then read what arrived meanwhile. Nobody
        // waits in `epoll_wait`, so a packet the engine sends here wakes no thread: the engine's
        // send does not pay for waking the harness (as on hosts of their own, where no send
        // does). The receive times come from the kernel, so reading late changes no delay.
        let next = epoch + Duration::from_millis(done + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let n = epoll.wait(&mut events, 0u16).unwrap_or(0);
        for e in &events[..n] {
            let token = e.data();
            if token >= SHARED_TOKEN {
                let side = (token - SHARED_TOKEN) as usize;
                sides[side].read_all(side, &mut bufs, &mut streams, &window, &mut st);
            } else if let Some(s) = streams.get_mut(token as usize) {
                s.read_all(&mut buf, &window, &mut st);
            }
        }
        if window.stop.load(Ordering::Relaxed) {
            continue;
        }
        let now = epoch.elapsed().as_millis() as u64;
        if now > done + 1 {
            st.late_ticks += now - done - 1;
            if now - done > st.max_catch_up {
                st.max_catch_up = now - done;
                st.max_catch_up_at = realtime_ns();
            }
        }
        // After a late wake, at most MAX_CATCH_UP ticks are sent back to back; the older ones
        // are skipped (their frames never leave), so a stall of this thread does not turn into
        // a burst that the engine would queue.
        while done + MAX_CATCH_UP < now {
            done += 1;
            st.skipped += wheel[(done % SLOTS as u64) as usize].len() as u64;
        }
        while done < now {
            done += 1;
            for &k in &wheel[(done % SLOTS as u64) as usize] {
                match streams[k].sock {
                    StreamSock::Own(_) => streams[k].send_own(&mut out, &window, &mut st),
                    StreamSock::Shared(side) => {
                        sides[side].queue(k, &mut streams, &window, &mut st);
                    }
                }
            }
            for side in &mut sides {
                side.flush(&mut streams, &window, &mut st);
            }
        }
    }
}

/// The anchor: a plain forwarder between pairs of sockets on a thread of its own, waiting in
/// `epoll_wait`, for what two loopback hops and a thread wake cost here. Returns, per pair, (the
/// socket the carrier side sends to, the socket the device side sends to), and the thread's id.
fn spawn_anchor(
    pairs: Vec<(SocketAddr, SocketAddr)>,
    window: Arc<Window>,
) -> (Vec<(SocketAddr, SocketAddr)>, u32) {
    // (socket, where what it reads goes, the socket that sends it)
    let mut socks = Vec::new();
    let mut addrs = Vec::new();
    for (carrier, device) in pairs {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind anchor");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind anchor");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        addrs.push((a.local_addr().expect("addr"), b.local_addr().expect("addr")));
        socks.push((a, device));
        socks.push((b, carrier));
    }
    std::thread::Builder::new()
        .name("bench-anchor".into())
        .spawn(move || {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
            for (k, (s, _)) in socks.iter().enumerate() {
                epoll
                    .add(s, EpollEvent::new(EpollFlags::EPOLLIN, k as u64))
                    .expect("epoll add");
            }
            let mut events = vec![EpollEvent::empty(); 64];
            let mut buf = [0u8; 2048];
            while !window.stop.load(Ordering::Relaxed) {
                let n = epoll.wait(&mut events, 100u16).unwrap_or(0);
                for e in &events[..n] {
                    let k = e.data() as usize;
                    // Pairs are adjacent: 2j forwards from 2j + 1's socket and back.
                    let (from, dest) = (&socks[k].0, socks[k].1);
                    let via = &socks[k ^ 1].0;
                    while let Ok(n) = from.recv(&mut buf) {
                        let _ = via.send_to(&buf[..n], dest);
                    }
                }
            }
        })
        .expect("anchor thread");
    (addrs, thread_id("bench-anchor").unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// SIP: the devices and the carrier, each socket a task owning its share.

/// What the SIP side tells the run.
enum Event {
    Registered,
    RegisterFailed(u16),
    /// Device `call` was rung; the engine's RTP for the device leg.
    DeviceAnswered {
        call: usize,
        engine: SocketAddr,
    },
    /// The carrier's call `call` was answered; the engine's RTP for the caller leg.
    CallerAnswered {
        call: usize,
        engine: SocketAddr,
        setup: Duration,
    },
    CallFailed {
        status: u16,
    },
    /// The engine ended a call (BYE to the carrier or a device).
    EngineBye,
}

struct Dev {
    call: usize,
    user: String,
    ha1: String,
    reg_call_id: String,
    cseq: u32,
    nc: u32,
    /// The last REGISTER sent, while its round is open.
    pending: Option<(Vec<u8>, Instant)>,
    rtp: SocketAddr,
}

struct DevSocket {
    sock: UdpSocket,
    me: SocketAddr,
    server: SocketAddr,
    ha2: String,
    codec: Codec,
    devs: Vec<Dev>,
    by_user: HashMap<String, usize>,
    by_reg: HashMap<String, usize>,
    /// Our 200 to each INVITE, by Call-ID (sent again if the INVITE is).
    answered: HashMap<String, Vec<u8>>,
    events: mpsc::UnboundedSender<Event>,
}

impl DevSocket {
    fn register_text(&mut self, i: usize, authorization: Option<&str>) -> Vec<u8> {
        let d = &mut self.devs[i];
        d.cseq += 1;
        let mut s = format!(
            "REGISTER sip:{DOMAIN} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bKd{user}x{cseq};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{DOMAIN}>;tag=t{user}\r\n\
             To: <sip:{user}@{DOMAIN}>\r\n\
             Call-ID: {cid}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:{user}@{me}>\r\n\
             Expires: 3600\r\n\
             User-Agent: sautikit-bench/1\r\n",
            me = self.me,
            user = d.user,
            cseq = d.cseq,
            cid = d.reg_call_id,
        );
        if let Some(a) = authorization {
            s.push_str("Authorization: ");
            s.push_str(a);
            s.push_str("\r\n");
        }
        s.push_str("Content-Length: 0\r\n\r\n");
        s.into_bytes()
    }

    fn send_register(&mut self, i: usize, text: Vec<u8>) {
        let _ = self.sock.try_send_to(&text, self.server);
        self.devs[i].pending = Some((text, Instant::now()));
    }

    fn on_datagram(&mut self, bytes: &[u8]) {
        let Ok(msg) = std::str::from_utf8(bytes) else {
            return;
        };
        if let Some(method) = request_method(msg) {
            self.on_request(msg, method);
            return;
        }
        let (Some(code), Some(cid)) = (status_code(msg), header(msg, "Call-ID")) else {
            return;
        };
        let Some(&i) = self.by_reg.get(cid) else {
            return;
        };
        if self.devs[i].pending.is_none() || code < 200 {
            return;
        }
        match code {
            401 => {
                let challenge = headers(msg, "WWW-Authenticate").into_iter().find(|c| {
                    auth_param(c, "algorithm").is_some_and(|a| a.eq_ignore_ascii_case("SHA-256"))
                });
                let (Some(realm), Some(nonce)) = (
                    challenge.and_then(|c| auth_param(c, "realm")),
                    challenge.and_then(|c| auth_param(c, "nonce")),
                ) else {
                    self.devs[i].pending = None;
                    let _ = self.events.send(Event::RegisterFailed(401));
                    return;
                };
                let d = &mut self.devs[i];
                d.nc += 1;
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
                );
                if d.nc > 3 {
                    d.pending = None;
                    let _ = self.events.send(Event::RegisterFailed(401));
                    return;
                }
                let text = self.register_text(i, Some(&auth));
                self.send_register(i, text);
            }
            200 => {
                self.devs[i].pending = None;
                let _ = self.events.send(Event::Registered);
            }
            other => {
                self.devs[i].pending = None;
                let _ = self.events.send(Event::RegisterFailed(other));
            }
        }
    }

    fn on_request(&mut self, msg: &str, method: &str) {
        match method {
            "INVITE" => {
                let cid = header(msg, "Call-ID").unwrap_or_default().to_owned();
                if let Some(ok) = self.answered.get(&cid) {
                    let _ = self.sock.try_send_to(ok, self.server);
                    return;
                }
                let user = msg
                    .split_whitespace()
                    .nth(1)
                    .and_then(|uri| uri.strip_prefix("sip:"))
                    .and_then(|u| u.split('@').next())
                    .unwrap_or("");
                let (Some(&i), Some(engine)) = (self.by_user.get(user), sdp_rtp(msg)) else {
                    let _ = self
                        .sock
                        .try_send_to(response_to(msg, 404, "Not Found").as_bytes(), self.server);
                    return;
                };
                let d = &self.devs[i];
                let body = sdp(d.rtp, self.codec, TELEPHONE_EVENT);
                let mut ok = String::from("SIP/2.0 200 OK\r\n");
                for v in headers(msg, "Via") {
                    ok.push_str(&format!("Via: {v}\r\n"));
                }
                for name in ["From", "Call-ID", "CSeq"] {
                    if let Some(v) = header(msg, name) {
                        ok.push_str(&format!("{name}: {v}\r\n"));
                    }
                }
                ok.push_str(&format!(
                    "To: {};tag=dev{}\r\nContact: <sip:{}@{}>\r\n\
                     Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
                    header(msg, "To").unwrap_or_default(),
                    d.call,
                    d.user,
                    self.me,
                    body.len()
                ));
                let ok = ok.into_bytes();
                let _ = self.sock.try_send_to(&ok, self.server);
                let _ = self.events.send(Event::DeviceAnswered {
                    call: d.call,
                    engine,
                });
                self.answered.insert(cid, ok);
            }
            "ACK" => {}
            _ => {
                if method == "BYE" {
                    let _ = self.events.send(Event::EngineBye);
                }
                let _ = self
                    .sock
                    .try_send_to(response_to(msg, 200, "OK").as_bytes(), self.server);
            }
        }
    }

    /// Registers every device (at most `window` rounds open at once, a REGISTER unanswered for
    /// 1 s sent again), then answers what the engine sends.
    async fn run(mut self, window: usize) {
        let mut buf = vec![0u8; 65_535];
        let mut todo: VecDeque<usize> = (0..self.devs.len()).collect();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                biased;
                r = self.sock.recv_from(&mut buf) => {
                    if let Ok((n, _)) = r {
                        self.on_datagram(&buf[..n]);
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let mut open = 0;
                    for i in 0..self.devs.len() {
                        if let Some((text, at)) = &self.devs[i].pending {
                            open += 1;
                            if now - *at > Duration::from_secs(1) {
                                let text = text.clone();
                                self.send_register(i, text);
                            }
                        }
                    }
                    while open < window {
                        let Some(i) = todo.pop_front() else { break };
                        let text = self.register_text(i, None);
                        self.send_register(i, text);
                        open += 1;
                    }
                }
            }
        }
    }
}

struct Call {
    call: usize,
    invite: Vec<u8>,
    first: Instant,
    last_sent: Instant,
    provisional: bool,
    ack: Option<Vec<u8>>,
}

struct Carrier {
    sock: UdpSocket,
    me: SocketAddr,
    server: SocketAddr,
    calls: HashMap<String, Call>,
    events: mpsc::UnboundedSender<Event>,
}

impl Carrier {
    fn start_call(&mut self, call: usize, number: &str, rtp: SocketAddr) {
        let (me, server) = (self.me, self.server);
        let cid = format!("br{call}-{}@bench", std::process::id());
        let offer = sdp(rtp, Codec::Pcmu, TELEPHONE_EVENT);
        let invite = format!(
            "INVITE sip:{number}@{server} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK{cid}i;rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:254711000000@{me}>;tag=c{call}\r\n\
             To: <sip:{number}@{server}>\r\n\
             Call-ID: {cid}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:carrier@{me}>\r\n\
             Content-Type: application/sdp\r\n\
             Content-Length: {len}\r\n\r\n{offer}",
            len = offer.len()
        )
        .into_bytes();
        let _ = self.sock.try_send_to(&invite, self.server);
        let now = Instant::now();
        self.calls.insert(
            cid,
            Call {
                call,
                invite,
                first: now,
                last_sent: now,
                provisional: false,
                ack: None,
            },
        );
    }

    fn on_datagram(&mut self, bytes: &[u8]) {
        let Ok(msg) = std::str::from_utf8(bytes) else {
            return;
        };
        if let Some(method) = request_method(msg) {
            if method == "BYE" {
                let _ = self.events.send(Event::EngineBye);
            }
            let _ = self
                .sock
                .try_send_to(response_to(msg, 200, "OK").as_bytes(), self.server);
            return;
        }
        let (Some(code), Some(cid), Some((_, "INVITE"))) =
            (status_code(msg), header(msg, "Call-ID"), cseq(msg))
        else {
            return;
        };
        let Some(c) = self.calls.get_mut(cid) else {
            return;
        };
        if code < 200 {
            c.provisional = true;
            return;
        }
        if let Some(ack) = &c.ack {
            // Our ACK was lost: the 200 came again.
            let _ = self.sock.try_send_to(ack, self.server);
            return;
        }
        let to = header(msg, "To").unwrap_or_default();
        let from = header(msg, "From").unwrap_or_default();
        let me = self.me;
        if code < 300 {
            let target = common::uac::contact_uri(msg)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("sip:{}", self.server));
            let ack = format!(
                "ACK {target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{cid}a;rport\r\n\
                 Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {cid}\r\n\
                 CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes();
            let _ = self.sock.try_send_to(&ack, self.server);
            c.ack = Some(ack);
            match sdp_rtp(msg) {
                Some(engine) => {
                    let _ = self.events.send(Event::CallerAnswered {
                        call: c.call,
                        engine,
                        setup: c.first.elapsed(),
                    });
                }
                None => {
                    let _ = self.events.send(Event::CallFailed { status: 0 });
                }
            }
        } else {
            let via = header(msg, "Via").unwrap_or_default();
            let ack = format!(
                "ACK sip:x@{s} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\nFrom: {from}\r\n\
                 To: {to}\r\nCall-ID: {cid}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
                s = self.server
            )
            .into_bytes();
            let _ = self.sock.try_send_to(&ack, self.server);
            c.ack = Some(ack);
            let _ = self.events.send(Event::CallFailed { status: code });
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<(usize, String, SocketAddr)>) {
        let mut buf = vec![0u8; 65_535];
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                biased;
                r = self.sock.recv_from(&mut buf) => {
                    if let Ok((n, _)) = r {
                        self.on_datagram(&buf[..n]);
                    }
                }
                cmd = rx.recv() => match cmd {
                    Some((call, number, rtp)) => self.start_call(call, &number, rtp),
                    None => return,
                },
                _ = tick.tick() => {
                    // Timer A, simplified: every 500 ms until a provisional response, for 10 s.
                    let now = Instant::now();
                    for c in self.calls.values_mut() {
                        if !c.provisional
                            && c.ack.is_none()
                            && now - c.last_sent >= Duration::from_millis(500)
                            && now - c.first < Duration::from_secs(10)
                        {
                            let _ = self.sock.try_send_to(&c.invite, self.server);
                            c.last_sent = now;
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One run.

struct Settings {
    calls: usize,
    seconds: f64,
    warmup: f64,
    ramp: f64,
    rtp_threads: usize,
    device_sockets: usize,
    anchor_calls: usize,
    cores_line: f64,
    p99_line_ms: f64,
    rtp_ports: String,
    media_realtime: String,
    harness_realtime: bool,
}

/// Real-time round-robin scheduling at `prio` for thread `tid` (util-linux `chrt`).
fn chrt(prio: u32, tid: u32) -> bool {
    std::process::Command::new("chrt")
        .args(["-r", "-p", &prio.to_string(), &tid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// The id of this process's thread named `name` (it may take a moment to appear).
fn thread_id(name: &str) -> Option<u32> {
    for _ in 0..100 {
        for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                return e.file_name().to_string_lossy().parse().ok();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// The real-time priority of the engine's media threads (None: they run at normal priority).
fn media_rt_priority(pid: u32) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for e in dir.flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if !stat.contains("(sautikit-media") {
            continue;
        }
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 40 (rt_priority) and 41 (policy); the first after ')' is field 3.
        let prio: u32 = f.get(37)?.parse().ok()?;
        let policy: u32 = f.get(38)?.parse().ok()?;
        return (policy != 0 && prio > 0).then_some(prio);
    }
    None
}

/// Datagrams dropped so far (receive buffer full) by the IPv4 UDP sockets on ports in `lo..=hi`
/// and on all other ports, from `/proc/net/udp`.
fn udp_drops_split(lo: u16, hi: u16) -> (u64, u64) {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let (mut inside, mut outside) = (0, 0);
    for l in table.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let port = f
            .get(1)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        let drops = f.last().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
        match port {
            Some(p) if (lo..=hi).contains(&p) => inside += drops,
            _ => outside += drops,
        }
    }
    (inside, outside)
}

fn bind_rtp() -> std::net::UdpSocket {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind RTP")
}

/// A shared RTP socket takes half of an RTP thread's packets: a receive buffer for a stall of
/// some 100 ms of them (`SO_RCVBUFFORCE` as root, else what `rmem_max` allows).
fn bind_shared_rtp() -> std::net::UdpSocket {
    let sock = bind_rtp();
    let bytes = 16 << 20;
    if setsockopt(&sock, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(&sock, sockopt::RcvBuf, &bytes);
    }
    sock
}

/// Returns whether the targets were met.
async fn run(s: &Settings, device_codec: Codec) -> bool {
    let variant = match device_codec {
        Codec::Pcmu => "PCMU ↔ PCMU (payload copied)",
        Codec::Pcma => "PCMU ↔ PCMA (transcoded)",
    };
    println!(
        "\n== bridge, {variant}: {} calls, {:.0} s window ==",
        s.calls, s.seconds
    );
    let t0 = Instant::now();
    let db = TestDb::new(Backend::Sqlite).await;
    let seeded = db.admin(&[
        "seed-inventory",
        "--count",
        &s.calls.to_string(),
        "--start",
        "+254720000001",
    ]);
    assert_eq!(
        seeded["inserted"].as_u64(),
        Some(s.calls as u64),
        "{seeded}"
    );
    let (workspace_id, key) = db.workspace("bench", 1_000_000_000);
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            ("SAUTIKIT_LOG", "warn"),
            ("SAUTIKIT_SIP_LISTEN", &sip_listen()),
            ("SAUTIKIT_SIP_MAX_EXPIRES", "3600"),
            ("SAUTIKIT_RTP_PORTS", &s.rtp_ports),
            ("SAUTIKIT_MEDIA_REALTIME", &s.media_realtime),
        ],
    );
    let pid = server.pid();
    let sip = server.sip_addr();
    let api = server.api(&key);
    let store = sautikit::db::Db::connect(&db.url).await.expect("db");
    let numbers = claim_seeded(&api, &store, s.calls).await;
    let ids: Vec<String> = numbers.iter().map(|(id, _)| id.clone()).collect();
    let creds = insert_credentials(&store, &workspace_id, &ids, s.calls, "ts_d").await;
    println!(
        "  setup: {} numbers claimed, {} credentials inserted in {:.1} s",
        numbers.len(),
        creds.len(),
        t0.elapsed().as_secs_f64()
    );

    // The harness's RTP sockets through the engine: each RTP thread has one for the carrier's
    // side of its calls and one for the devices' side (call i is thread i % threads's), which
    // every call's SDP names, so the engine's legs latch onto them; a thread sends a tick's
    // packets with one `sendmmsg` per socket and reads them back with `recvmmsg`.
    let shared: Vec<[std::net::UdpSocket; 2]> = (0..s.rtp_threads)
        .map(|_| [bind_shared_rtp(), bind_shared_rtp()])
        .collect();
    let side_addrs: Vec<[SocketAddr; 2]> = shared
        .iter()
        .map(|p| p.each_ref().map(|s| s.local_addr().expect("addr")))
        .collect();
    let harness_ports: Vec<u16> = side_addrs.iter().flatten().map(|a| a.port()).collect();
    let side_addr = |call: usize, side: usize| side_addrs[call % side_addrs.len()][side];

    // Devices: device g answers calls to number g.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let ha2 = sha256_hex(&format!("REGISTER:sip:{DOMAIN}"));
    for k in 0..s.device_sockets {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind device");
        let me = sock.local_addr().expect("addr");
        let mut devs = Vec::new();
        let mut by_user = HashMap::new();
        let mut by_reg = HashMap::new();
        for (g, c) in creds.iter().enumerate().skip(k).step_by(s.device_sockets) {
            let reg_call_id = format!("reg{g}-{}@bench", std::process::id());
            by_user.insert(c.user.clone(), devs.len());
            by_reg.insert(reg_call_id.clone(), devs.len());
            devs.push(Dev {
                call: g,
                user: c.user.clone(),
                ha1: c.ha1_sha256.clone(),
                reg_call_id,
                cseq: 0,
                nc: 0,
                pending: None,
                rtp: side_addr(g, DEVICE_SIDE),
            });
        }
        let ds = DevSocket {
            sock,
            me,
            server: sip,
            ha2: ha2.clone(),
            codec: device_codec,
            devs,
            by_user,
            by_reg,
            answered: HashMap::new(),
            events: ev_tx.clone(),
        };
        tokio::spawn(ds.run(8));
    }
    let mut registered = 0usize;
    let mut reg_failed: HashMap<u16, u64> = HashMap::new();
    let reg_deadline = Instant::now() + Duration::from_secs(60 + s.calls as u64 / 20);
    while registered + (reg_failed.values().sum::<u64>() as usize) < s.calls {
        let left = reg_deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ev_rx.recv()).await {
            Ok(Some(Event::Registered)) => registered += 1,
            Ok(Some(Event::RegisterFailed(code))) => *reg_failed.entry(code).or_default() += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    println!(
        "  {registered} devices registered in {:.1} s{}",
        t0.elapsed().as_secs_f64(),
        if reg_failed.is_empty() {
            String::new()
        } else {
            format!(", failed: {reg_failed:?}")
        }
    );

    // The RTP threads and the anchor.
    let window = Arc::new(Window {
        start: AtomicU64::new(u64::MAX),
        end: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
    });
    let rtp: Vec<_> = shared
        .into_iter()
        .enumerate()
        .map(|(i, sides)| spawn_rtp_thread(i, window.clone(), sides))
        .collect();
    let pcmu_pcmu = Arc::new(Alphabet::new(Codec::Pcmu, Codec::Pcmu));
    let c2d_alpha = Arc::new(Alphabet::new(Codec::Pcmu, device_codec));
    let d2c_alpha = Arc::new(Alphabet::new(device_codec, Codec::Pcmu));
    let anchor_socks: Vec<(std::net::UdpSocket, std::net::UdpSocket)> = (0..s.anchor_calls)
        .map(|_| (bind_rtp(), bind_rtp()))
        .collect();
    let (anchor, anchor_tid) = spawn_anchor(
        anchor_socks
            .iter()
            .map(|(c, d)| (c.local_addr().expect("addr"), d.local_addr().expect("addr")))
            .collect(),
        window.clone(),
    );
    // The anchor waits and wakes like the engine's media threads: with their scheduling policy.
    // The RTP threads run real-time too, one priority below the media threads, unless
    // BENCH_HARNESS_REALTIME=0: the engine takes a core first, as on a host of its own, and the
    // harness still runs ahead of anything else on the machine (at normal priority it shares
    // what the media threads leave with other work and falls seconds behind).
    let media_prio = media_rt_priority(pid);
    let anchor_policy = match media_prio {
        Some(prio) if chrt(prio, anchor_tid) => {
            format!("SCHED_RR {prio}, as the engine's media threads")
        }
        Some(prio) => format!("normal (chrt to SCHED_RR {prio} failed)"),
        None => "normal, as the engine's media threads".to_owned(),
    };
    let rtp_policy = match media_prio {
        Some(prio) if s.harness_realtime => {
            let below = prio.saturating_sub(1).max(1);
            let ok = (0..s.rtp_threads)
                .filter_map(|i| thread_id(&format!("bench-rtp{i}")))
                .filter(|&tid| chrt(below, tid))
                .count();
            format!("SCHED_RR {below} ({ok} of {} threads)", s.rtp_threads)
        }
        _ => "normal".to_owned(),
    };
    println!("  anchor thread scheduling: {anchor_policy}; RTP threads: {rtp_policy}");
    for (k, ((c, d), (to_c, to_d))) in anchor_socks.into_iter().zip(anchor).enumerate() {
        let t = &rtp[k % rtp.len()];
        let slot = k * 7;
        let _ = t.send(RtpCmd::Add(Box::new(StreamSpec {
            sock: StreamSock::Own(c),
            remote: to_c,
            codec: Codec::Pcmu,
            send_alpha: pcmu_pcmu.clone(),
            recv_alpha: pcmu_pcmu.clone(),
            class: ANCHOR,
            dir: C2D,
            slot,
        })));
        let _ = t.send(RtpCmd::Add(Box::new(StreamSpec {
            sock: StreamSock::Own(d),
            remote: to_d,
            codec: Codec::Pcmu,
            send_alpha: pcmu_pcmu.clone(),
            recv_alpha: pcmu_pcmu.clone(),
            class: ANCHOR,
            dir: D2C,
            slot: slot + 10,
        })));
    }

    // The carrier: calls ramp up; each call's RTP starts when both its sides know the engine's
    // ports.
    let mut carrier_txs = Vec::new();
    for _ in 0..2 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind carrier");
        let me = sock.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        let c = Carrier {
            sock,
            me,
            server: sip,
            calls: HashMap::new(),
            events: ev_tx.clone(),
        };
        tokio::spawn(c.run(rx));
        carrier_txs.push(tx);
    }
    let ramp_start = Instant::now();
    let mut placed = 0usize;
    let mut engine_dev: Vec<Option<SocketAddr>> = vec![None; s.calls];
    let mut engine_caller: Vec<Option<SocketAddr>> = vec![None; s.calls];
    let mut started = 0usize;
    let mut failed: HashMap<u16, u64> = HashMap::new();
    let mut setups: Vec<Duration> = Vec::with_capacity(s.calls);
    let mut engine_byes = 0u64;
    let deadline = ramp_start + Duration::from_secs_f64(s.calls as f64 / s.ramp + 30.0);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while started + (failed.values().sum::<u64>() as usize) < s.calls && Instant::now() < deadline {
        tokio::select! {
            _ = tick.tick() => {
                let due = ((ramp_start.elapsed().as_secs_f64() * s.ramp) as usize).min(s.calls);
                while placed < due {
                    let rtp_addr = side_addr(placed, CARRIER_SIDE);
                    let _ = carrier_txs[placed % carrier_txs.len()].send((
                        placed,
                        numbers[placed].1.clone(),
                        rtp_addr,
                    ));
                    placed += 1;
                }
            }
            ev = ev_rx.recv() => {
                let Some(ev) = ev else { break };
                let call = match ev {
                    Event::DeviceAnswered { call, engine } => {
                        engine_dev[call] = Some(engine);
                        call
                    }
                    Event::CallerAnswered { call, engine, setup } => {
                        engine_caller[call] = Some(engine);
                        setups.push(setup);
                        call
                    }
                    Event::CallFailed { status } => {
                        *failed.entry(status).or_default() += 1;
                        continue;
                    }
                    Event::EngineBye => {
                        engine_byes += 1;
                        continue;
                    }
                    _ => continue,
                };
                if let (Some(to_caller_leg), Some(to_dev_leg)) = (engine_caller[call], engine_dev[call])
                {
                    // Started once: a retransmitted answer changes nothing.
                    engine_caller[call] = None;
                    engine_dev[call] = None;
                    let t = &rtp[call % rtp.len()];
                    // Both sides of a call in one slot, spread over the wheel.
                    let slot = (call / rtp.len()) % SLOTS;
                    let _ = t.send(RtpCmd::Add(Box::new(StreamSpec {
                        sock: StreamSock::Shared(CARRIER_SIDE),
                        remote: to_caller_leg,
                        codec: Codec::Pcmu,
                        send_alpha: c2d_alpha.clone(),
                        recv_alpha: d2c_alpha.clone(),
                        class: ENGINE,
                        dir: C2D,
                        slot,
                    })));
                    let _ = t.send(RtpCmd::Add(Box::new(StreamSpec {
                        sock: StreamSock::Shared(DEVICE_SIDE),
                        remote: to_dev_leg,
                        codec: device_codec,
                        send_alpha: d2c_alpha.clone(),
                        recv_alpha: c2d_alpha.clone(),
                        class: ENGINE,
                        dir: D2C,
                        slot: slot + SLOTS / 2,
                    })));
                    started += 1;
                }
            }
        }
    }
    setups.sort();
    let q = |p: f64| {
        setups
            .get(((setups.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "  {started} calls bridged with RTP both ways, {} failed {failed:?}, ramp {:.1} s; \
         INVITE→200 p50 {:.1} / p99 {:.1} ms",
        failed.values().sum::<u64>(),
        ramp_start.elapsed().as_secs_f64(),
        q(0.5),
        q(0.99)
    );
    // Drain events in the background (BYEs from the engine would mean calls ended early).
    let byes = Arc::new(AtomicU64::new(engine_byes));
    {
        let byes = byes.clone();
        tokio::spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                if matches!(ev, Event::EngineBye) {
                    byes.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    tokio::time::sleep(Duration::from_secs_f64(s.warmup)).await;
    let load = machine_load();
    let me = std::process::id();
    let cpu0 = cpu_time(pid);
    let own0 = cpu_time(me);
    let threads0 = thread_cpu(pid);
    let own_threads0 = thread_cpu(me);
    let drops0 = udp_rcvbuf_errors();
    let (rtp_lo, rtp_hi) = s
        .rtp_ports
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .unwrap_or((20000, 29999));
    let engine_drops0 = udp_drops_split(rtp_lo, rtp_hi).0;
    let harness_drops0 = udp_socket_drops(&harness_ports);
    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(500));
    let w0 = Instant::now();
    window.start.store(realtime_ns(), Ordering::Relaxed);
    window.end.store(u64::MAX, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(s.seconds)).await;
    window.end.store(realtime_ns(), Ordering::Relaxed);
    let wall = w0.elapsed();
    let cpu = cpu_time(pid) - cpu0;
    let own = cpu_time(me) - own0;
    let threads1 = thread_cpu(pid);
    let own_threads1 = thread_cpu(me);
    let drops = udp_rcvbuf_errors() - drops0;
    let engine_drops = udp_drops_split(rtp_lo, rtp_hi).0 - engine_drops0;
    let harness_drops = udp_socket_drops(&harness_ports) - harness_drops0;
    let _ = rss_stop.send(true);
    let rss = rss_task.await.unwrap_or_default();
    let rss_peak = rss.iter().copied().max().unwrap_or(0);
    let rss_end = status_kib(pid, "VmRSS");
    let hwm = status_kib(pid, "VmHWM");
    // Late packets of the window still count: give them time, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    window.stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut st = RtpStats::new();
    for t in &rtp {
        let (reply, rx) = oneshot::channel();
        let _ = t.send(RtpCmd::Finish(reply));
        if let Ok(part) = rx.await {
            st.merge(&part);
        }
    }

    let secs = wall.as_secs_f64();
    let cores = cpu.as_secs_f64() / secs;
    let own_cores = own.as_secs_f64() / secs;
    println!("  load at the window's start: {load}");
    println!(
        "  window {secs:.1} s; engine CPU {cores:.3} cores ({:.2} µs per relayed packet); this \
         harness {own_cores:.3} cores",
        cpu.as_secs_f64() * 1e6 / (st.received[ENGINE][0] + st.received[ENGINE][1]).max(1) as f64
    );
    println!(
        "  engine threads: {}",
        thread_delta(&threads0, &threads1, wall)
    );
    println!(
        "  harness threads: {}",
        thread_delta(&own_threads0, &own_threads1, wall)
    );
    println!(
        "  engine RSS: {:.0} MiB at the end, peak sampled {:.0} MiB, VmHWM {:.0} MiB",
        mib(rss_end),
        mib(rss_peak),
        mib(hwm)
    );
    let mut lost_total = 0i64;
    let mut p99_worst = 0.0f64;
    for (c, class) in [(ENGINE, "engine"), (ANCHOR, "anchor")] {
        for d in [C2D, D2C] {
            let sent = st.sent[c][d];
            let got = st.received[c][d];
            let lost = sent as i64 - got as i64;
            println!(
                "  {class} {}: sent {sent}, received {got}, lost {lost}; delay {}",
                DIR_NAMES[d],
                st.delay[c][d].line()
            );
            if c == ENGINE {
                lost_total += lost;
                p99_worst = p99_worst.max(st.delay[c][d].q(0.99));
            }
        }
    }
    let anchor_p99 = st.delay[ANCHOR][C2D]
        .q(0.99)
        .max(st.delay[ANCHOR][D2C].q(0.99));
    let mut engine_all = st.delay[ENGINE][C2D].clone();
    engine_all.merge(&st.delay[ENGINE][D2C]);
    let mut anchor_all = st.delay[ANCHOR][C2D].clone();
    anchor_all.merge(&st.delay[ANCHOR][D2C]);
    println!(
        "  both directions: engine p50 {:.3} / p99 {:.3} ms, anchor p50 {:.3} / p99 {:.3} ms; \
         engine − anchor: p50 {:.3} / p99 {:.3} ms",
        engine_all.q(0.5),
        engine_all.q(0.99),
        anchor_all.q(0.5),
        anchor_all.q(0.99),
        engine_all.q(0.5) - anchor_all.q(0.5),
        engine_all.q(0.99) - anchor_all.q(0.99),
    );
    println!(
        "  untagged packets {:?}, out-of-order {}, output sequence gaps {}, harness send errors \
         {}, engine BYEs {}",
        st.untagged,
        st.reordered,
        st.seq_gaps,
        st.send_errors,
        byes.load(Ordering::Relaxed)
    );
    println!(
        "  UDP receive-buffer drops in the window: {drops} on the machine, {engine_drops} at the \
         engine's RTP ports, {harness_drops} at the harness's RTP sockets; \
         harness pacing: {} sends tried, {} frames skipped by a late harness thread, {} wheel \
         ticks run late (at most {} at once)",
        st.attempts, st.skipped, st.late_ticks, st.max_catch_up
    );
    let w_start = window.start.load(Ordering::Relaxed);
    println!(
        "  the longest harness pacing stall ended {:.1} s from the window's start",
        (st.max_catch_up_at as f64 - w_start as f64) / 1e9,
    );
    println!(
        "  engine packets over 2 ms / max ms, by second of the window: {}",
        st.per_second
            .iter()
            .map(|e| format!("{}/{:.1}", e[1], e[2] as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let cores_ok = cores <= s.cores_line;
    let delay_ok = p99_worst <= s.p99_line_ms;
    // A packet the harness itself did not read in time (its socket's buffer full while its
    // thread waited for a core) is lost outside the relay.
    let relay_lost = lost_total - harness_drops as i64;
    println!(
        "  lost: {lost_total} sent and not received (engine streams), of which \
         {harness_drops} dropped at the harness's own sockets; {relay_lost} otherwise"
    );
    let loss_ok = relay_lost <= 0 && started == s.calls;
    let ok = cores_ok && delay_ok && loss_ok;
    println!(
        "  targets: engine ≤ {:.1} core: {} ({cores:.3}); relay delay p99 ≤ {:.1} ms: {} ({p99_worst:.3} \
         ms, worse direction; anchor {anchor_p99:.3} ms); no packet lost in the relay: {} ({relay_lost}) → {}",
        s.cores_line,
        if cores_ok { "met" } else { "NOT met" },
        s.p99_line_ms,
        if delay_ok { "met" } else { "NOT met" },
        if loss_ok { "met" } else { "NOT met" },
        if ok { "PASS" } else { "FAIL" }
    );
    drop(server);
    ok
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. `cargo test --benches`) is a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let s = Settings {
        calls: env_or("BENCH_CALLS", if full { 1000usize } else { 20 }).max(1),
        seconds: env_or("BENCH_SECONDS", if full { 60.0 } else { 2.0 }),
        warmup: env_or("BENCH_WARMUP", if full { 3.0 } else { 0.5 }),
        ramp: env_or("BENCH_RAMP", 100.0f64).max(1.0),
        rtp_threads: env_or("BENCH_RTP_THREADS", 2usize).max(1),
        device_sockets: env_or("BENCH_DEVICE_SOCKETS", 4usize).max(1),
        anchor_calls: env_or("BENCH_ANCHOR_CALLS", if full { 20usize } else { 2 }),
        cores_line: env_or("BENCH_CORES", 1.0),
        p99_line_ms: env_or("BENCH_P99_MS", 2.0),
        rtp_ports: std::env::var("BENCH_RTP_PORTS").unwrap_or_else(|_| "20000-29999".into()),
        media_realtime: std::env::var("BENCH_MEDIA_REALTIME").unwrap_or_else(|_| "true".into()),
        harness_realtime: env_or("BENCH_HARNESS_REALTIME", 1u8) != 0,
    };
    let limit = ensure_nofile(16_384);
    println!(
        "bridge bench: {} calls, {} RTP threads, {} anchor pairs; open-file limit {limit}",
        s.calls, s.rtp_threads, s.anchor_calls
    );
    let variants = std::env::var("BENCH_VARIANTS").unwrap_or_else(|_| "pcmu,pcma".into());
    let mut summary = Vec::new();
    for v in variants.split(',').map(str::trim) {
        let codec = match v {
            "pcmu" => Codec::Pcmu,
            "pcma" => Codec::Pcma,
            _ => continue,
        };
        let ok = run(&s, codec).await;
        summary.push(format!("{v}: {}", if ok { "PASS" } else { "FAIL" }));
    }
    println!("\nsummary: {}", summary.join("; "));
}
