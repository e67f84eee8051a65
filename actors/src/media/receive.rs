//! A call's receiving side: what the caller sends on its RTP port. One task per call, idle but
//! for packets: the media thread wakes it when its socket has something to read (see the media
//! module: the thread polls its streams' sockets once a millisecond), and a timer wakes it while a
//! recording, a jitter buffer, a DTMF event or a bridge's media timeout needs it.
//!
//! It latches the stream to where the caller's packets actually come from (symmetric RTP, for
//! callers behind NAT), turns RFC 4733 telephone-events into digits, and writes recordings:
//! packets go through a jitter buffer (reordered, de-duplicated, gaps filled with silence) so the
//! WAV file keeps the caller's timing.
//!
//! While the stream is bridged it also relays each packet, as it arrives, onto the other leg's
//! outgoing stream (see the media module), and watches for the caller falling silent.

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use sautikit_sip::dtmf::DtmfDetector;
use sautikit_sip::jitter::{Frame, JitterBuffer};
use sautikit_sip::rtp::{RelayKind, RtpView, g711};
use sautikit_sip::tone::SilenceDetector;
use sautikit_sip::wav::WavWriter;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{MediaEvent, MediaEvents, MediaStats, SharedOut, StreamParams, lock};

/// Jitter absorbed before audio is written: enough for reordering on a mobile network, short
/// enough that a key pressed to end a recording cuts it close to the press.
const PLAYOUT_DELAY: Duration = Duration::from_millis(60);
/// Quieter than this is silence for `record`'s `timeout` (a quiet room on a phone line is
/// around -60 dBFS; speech is well above -35).
const SILENCE_DBFS: f32 = -45.0;
/// Recorded audio is written to disk in chunks of this many bytes (4 s at 8 kHz 16-bit).
const FLUSH_BYTES: usize = 64 * 1024;
/// While recording, the task checks limits at least this often, even if the caller sends nothing
/// (silence suppression): silence is then the absence of packets.
const RECORDING_TICK: Duration = Duration::from_millis(100);
/// Room for any packet relayed (a UDP datagram on an Ethernet path), allocated once per stream.
const RELAY_BUFFER: usize = 1500;
/// Packets read per system call at most. A read that returns fewer than it had room for found
/// the socket empty, so the usual wake (one packet) costs one call, not a second one that only
/// learns the socket is empty.
const BATCH: usize = 2;
/// Room for one datagram read.
const RECV_BUFFER: usize = 2048;
/// Reads per wake at most: a flooded socket does not hold the media thread; the task yields, then
/// reads on.
const MAX_READS_PER_WAKE: usize = 16;

/// What a `record` asks for.
#[derive(Debug, Clone)]
pub struct RecordingSpec {
    pub recording_id: String,
    /// Absolute path of the WAV file to write.
    pub path: PathBuf,
    pub max_length: Duration,
    /// End after this much silence; `None`: never.
    pub silence_timeout: Option<Duration>,
    /// Keys that end the recording (the key is not part of the audio).
    pub finish_keys: String,
}

/// Why a recording ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordingEnd {
    MaxLength,
    Silence,
    FinishKey(char),
    /// The call ended.
    Hangup,
}

impl RecordingEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingEnd::MaxLength => "max_length",
            RecordingEnd::Silence => "silence",
            RecordingEnd::FinishKey(_) => "finish_key",
            RecordingEnd::Hangup => "hangup",
        }
    }
}

/// A finished recording.
#[derive(Debug, Clone)]
pub struct RecordingOutcome {
    pub recording_id: String,
    pub path: PathBuf,
    pub duration_ms: u64,
    pub size_bytes: u64,
    pub end: RecordingEnd,
    /// Writing the file failed: the recording is unusable.
    pub error: Option<String>,
}

#[derive(Debug)]
pub enum RecvCmd {
    StartRecording(RecordingSpec),
    /// End the recording; the outcome also goes to `done` (a call that is ending waits for it).
    StopRecording(
        RecordingEnd,
        Option<tokio::sync::oneshot::Sender<Option<RecordingOutcome>>>,
    ),
    /// Relay what arrives to `peer` (`None`: the peer has not started yet; relay nothing), and
    /// report a silence of `timeout` (zero: never).
    Bridge {
        peer: Option<Peer>,
        timeout: Duration,
    },
    Unbridge,
    /// Copy each audio packet received to a media stream's session (`None`: stop).
    Tap(Option<super::Tap>),
    Close,
}

/// Where a bridged stream's packets go: the other leg's outgoing stream and what it negotiated.
#[derive(Debug)]
pub(super) struct Peer {
    pub(super) id: u64,
    pub(super) out: SharedOut,
    /// The peer's codec: what relayed payloads are in.
    pub(super) codec: sautikit_sip::sdp::Codec,
    pub(super) payload_type: u8,
    pub(super) telephone_event: Option<u8>,
    /// From this stream's codec to the peer's, when they differ.
    pub(super) map: Option<&'static [u8; 256]>,
}

/// Bridged: where packets go, and the silence that is reported.
struct Bridge {
    peer: Option<Peer>,
    timeout: Option<Duration>,
    /// The last packet, or the bridge's start if later.
    heard_at: Instant,
    /// The silence since `heard_at` was reported.
    reported: bool,
}

struct Recorder {
    spec: RecordingSpec,
    file: Option<std::fs::File>,
    pending: Vec<u8>,
    data_bytes: u64,
    silence: SilenceDetector,
    started: Instant,
    error: Option<String>,
}

pub(super) struct Receiver {
    id: u64,
    socket: Arc<UdpSocket>,
    /// This stream's outgoing side (latching sets its remote).
    out: SharedOut,
    params: StreamParams,
    events: MediaEvents,
    stats: Arc<MediaStats>,
    latched: Option<SocketAddr>,
    /// Only when telephone-event was negotiated.
    dtmf: Option<DtmfDetector>,
    jitter: JitterBuffer,
    recorder: Option<Recorder>,
    pcm: Vec<i16>,
    bridge: Option<Bridge>,
    /// Where relayed packets are written.
    relay_buf: Vec<u8>,
    /// A media stream listening to what the caller says.
    tap: Option<super::Tap>,
}

impl Receiver {
    pub(super) fn new(
        id: u64,
        socket: Arc<UdpSocket>,
        out: SharedOut,
        params: StreamParams,
        events: MediaEvents,
        stats: Arc<MediaStats>,
    ) -> Receiver {
        Receiver {
            id,
            socket,
            out,
            params,
            events,
            stats,
            latched: None,
            dtmf: params.telephone_event.map(|pt| DtmfDetector::new(pt, 8000)),
            jitter: JitterBuffer::new(8000, PLAYOUT_DELAY),
            recorder: None,
            pcm: Vec::with_capacity(160),
            bridge: None,
            relay_buf: Vec::new(),
            tap: None,
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let std_deadlines = [
            self.jitter.poll_timeout(),
            self.dtmf.as_ref().and_then(|d| d.poll_timeout()),
        ];
        let mut next: Option<Instant> = std_deadlines
            .into_iter()
            .flatten()
            .map(Instant::from_std)
            .min();
        if self.recorder.is_some() {
            let tick = Instant::now() + RECORDING_TICK;
            next = Some(next.map_or(tick, |n| n.min(tick)));
        }
        if let Some(b) = &self.bridge
            && let Some(timeout) = b.timeout
            && !b.reported
        {
            let at = b.heard_at + timeout;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        next
    }

    async fn on_packet(&mut self, packet: &[u8], from: SocketAddr) {
        self.stats.packets_received.fetch_add(1, Ordering::Relaxed);
        let Ok(packet) = RtpView::parse(packet) else {
            return;
        };
        let pt = packet.payload_type;
        let event = Some(pt) == self.params.telephone_event;
        if pt != self.params.payload_type && !event {
            return;
        }
        if self.latched != Some(from) {
            if self.latched.is_none() {
                (self.events)(MediaEvent::RemoteMediaStarted);
            }
            self.latched = Some(from);
            let mut out = lock(&self.out);
            if out.remote != Some(from) {
                debug!(stream = self.id, remote = %from, "RTP latched to the caller's source address");
                out.remote = Some(from);
            }
        }
        let now = Instant::now();
        if let Some(b) = self.bridge.as_mut() {
            b.heard_at = now;
            b.reported = false;
            if let Some(peer) = &b.peer {
                relay(
                    self.id,
                    peer,
                    &packet,
                    event,
                    now,
                    &mut self.relay_buf,
                    &self.stats,
                );
            }
        }
        if !event && let Some(tap) = &self.tap {
            tap.send(packet.payload, self.params.codec);
        }
        if event {
            let digit = self
                .dtmf
                .as_mut()
                .and_then(|d| d.push(&packet.header(), packet.payload, now.into_std()));
            if let Some(digit) = digit {
                self.digit(digit.key).await;
            }
        } else if self.recorder.is_some() {
            self.jitter
                .push(packet.header(), packet.payload, now.into_std());
            self.drain(now).await;
        }
    }

    fn bridge(&mut self, peer: Option<Peer>, timeout: Duration) {
        let timeout = (!timeout.is_zero()).then_some(timeout);
        match self.bridge.as_mut() {
            // Linked again (the peer restarted, or a new timeout): the silence goes on.
            Some(b) => {
                b.peer = peer;
                b.timeout = timeout;
            }
            None => {
                self.bridge = Some(Bridge {
                    peer,
                    timeout,
                    heard_at: Instant::now(),
                    reported: false,
                });
            }
        }
        if self.relay_buf.capacity() < RELAY_BUFFER {
            self.relay_buf = Vec::with_capacity(RELAY_BUFFER);
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(b) = self.bridge.as_mut()
            && let Some(timeout) = b.timeout
            && !b.reported
            && now >= b.heard_at + timeout
        {
            b.reported = true;
            let silent_for = now.duration_since(b.heard_at);
            debug!(
                stream = self.id,
                ?silent_for,
                "bridged stream silent: media timeout"
            );
            (self.events)(MediaEvent::MediaTimeout { silent_for });
        }
        let digit = self.dtmf.as_mut().and_then(|d| d.poll(now.into_std()));
        if let Some(digit) = digit {
            self.digit(digit.key).await;
        }
        self.drain(now).await;
        if let Some(r) = &self.recorder
            && now.duration_since(r.started) >= r.spec.max_length + PLAYOUT_DELAY * 2
        {
            // The caller stopped sending altogether: the wall clock ends it.
            let _ = self.finish(RecordingEnd::MaxLength).await;
        }
    }

    async fn digit(&mut self, key: char) {
        (self.events)(MediaEvent::Digit { key });
        if let Some(r) = &self.recorder
            && r.spec.finish_keys.contains(key)
        {
            let _ = self.finish(RecordingEnd::FinishKey(key)).await;
        }
    }

    /// Write what the jitter buffer releases; end on length or silence.
    async fn drain(&mut self, now: Instant) {
        while let Some(frame) = self.jitter.pop(now.into_std()) {
            self.pcm.clear();
            match frame {
                Frame::Audio { payload, .. } => {
                    g711::decode_into(self.params.codec, &payload, &mut self.pcm);
                }
                Frame::Lost { samples } => self.pcm.resize(samples as usize, 0),
            }
            let Some(r) = self.recorder.as_mut() else {
                return;
            };
            let max_samples = r.spec.max_length.as_millis() as u64 * 8;
            let room = max_samples.saturating_sub(r.data_bytes / 2) as usize;
            let take = self.pcm.len().min(room);
            for s in &self.pcm[..take] {
                r.pending.extend_from_slice(&s.to_le_bytes());
            }
            r.data_bytes += take as u64 * 2;
            r.silence.push(&self.pcm[..take]);
            if r.pending.len() >= FLUSH_BYTES {
                r.flush().await;
            }
            if take < self.pcm.len() || r.data_bytes / 2 >= max_samples {
                let _ = self.finish(RecordingEnd::MaxLength).await;
                return;
            }
            if let Some(limit) = r.spec.silence_timeout
                && r.silence.silent_for() >= limit
            {
                let _ = self.finish(RecordingEnd::Silence).await;
                return;
            }
        }
    }

    async fn start(&mut self, spec: RecordingSpec) {
        if self.recorder.is_some() {
            let _ = self.finish(RecordingEnd::Hangup).await;
        }
        // What arrived before the recording started is not part of it.
        self.jitter = JitterBuffer::new(8000, PLAYOUT_DELAY);
        let path = spec.path.clone();
        let created = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            use std::io::Write;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::File::create(&path)?;
            // Sizes are patched when the recording ends.
            f.write_all(&WavWriter::new(8000).start())?;
            Ok(f)
        })
        .await;
        let (file, error) = match created {
            Ok(Ok(f)) => (Some(f), None),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(e) => (None, Some(e.to_string())),
        };
        if let Some(e) = &error {
            warn!(stream = self.id, error = %e, "cannot create the recording file");
        }
        self.recorder = Some(Recorder {
            spec,
            file,
            pending: Vec::with_capacity(FLUSH_BYTES + 640),
            data_bytes: 0,
            silence: SilenceDetector::new(8000, SILENCE_DBFS),
            started: Instant::now(),
            error,
        });
    }

    async fn finish(&mut self, end: RecordingEnd) -> Option<RecordingOutcome> {
        let mut r = self.recorder.take()?;
        r.flush().await;
        let data_bytes = r.data_bytes;
        let mut error = r.error.take();
        if let Some(file) = r.file.take() {
            let done = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                use std::io::{Seek, SeekFrom, Write};
                let mut file = file;
                file.seek(SeekFrom::Start(0))?;
                file.write_all(
                    &WavWriter::new(8000).header(u32::try_from(data_bytes).unwrap_or(u32::MAX)),
                )?;
                file.sync_all()
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error = Some(e.to_string()),
                Err(e) => error = Some(e.to_string()),
            }
        }
        debug!(
            stream = self.id,
            end = end.as_str(),
            data_bytes,
            "recording finished"
        );
        let outcome = RecordingOutcome {
            recording_id: r.spec.recording_id.clone(),
            path: r.spec.path.clone(),
            duration_ms: data_bytes / 16,
            size_bytes: data_bytes + 44,
            end,
            error,
        };
        (self.events)(MediaEvent::RecordingFinished(outcome.clone()));
        Some(outcome)
    }
}

impl Recorder {
    async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let Some(file) = self.file.take() else {
            self.pending.clear();
            return;
        };
        let chunk = std::mem::take(&mut self.pending);
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = file;
            let r = file.write_all(&chunk);
            (file, r, chunk)
        })
        .await;
        match written {
            Ok((file, Ok(()), mut chunk)) => {
                self.file = Some(file);
                chunk.clear();
                self.pending = chunk;
            }
            Ok((_, Err(e), _)) => self.error = Some(e.to_string()),
            Err(e) => self.error = Some(e.to_string()),
        }
    }
}

impl Receiver {
    /// Read what the socket holds (the media thread saw a packet arrive) and handle each packet.
    /// The socket is watched edge-triggered: the task reads it empty, or wakes itself to go on.
    async fn receive(&mut self, socket: &UdpSocket, bufs: &mut RecvBufs, ready: &Notify) {
        let mut more = false;
        for _ in 0..MAX_READS_PER_WAKE {
            let n = match read_batch(socket, bufs) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return,
                // ICMP errors from earlier sends surface here; nothing to do but read on. One
                // that persists ends the wake without waking the task again (no spinning): the
                // next packet's arrival does.
                Err(e) => {
                    debug!(stream = self.id, error = %e, "RTP receive error");
                    more = false;
                    continue;
                }
            };
            for i in 0..n {
                let (Some(&(len, from)), Some(data)) = (bufs.got.get(i), bufs.data.get(i)) else {
                    continue;
                };
                let (Some(from), Some(packet)) = (from, data.get(..len)) else {
                    continue;
                };
                self.on_packet(packet, from).await;
            }
            if n < BATCH {
                return;
            }
            more = true;
        }
        if more {
            // Not read empty: give the thread's other tasks their turn, then read on.
            tokio::task::yield_now().await;
            ready.notify_one();
        }
    }
}

/// Where a receiving task reads to.
struct RecvBufs {
    data: [[u8; RECV_BUFFER]; BATCH],
    /// Length and source of each datagram of the last read.
    got: [(usize, Option<SocketAddr>); BATCH],
}

/// One `recvmmsg` (non-blocking) into `bufs`: how many datagrams it read.
fn read_batch(socket: &UdpSocket, bufs: &mut RecvBufs) -> nix::Result<usize> {
    // Set up per read, small: nix's headers hold raw pointers, so they cannot live in the task
    // across its awaits.
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut slices = bufs.data.each_mut().map(|d| [IoSliceMut::new(d)]);
    let results = recvmmsg(
        socket.as_raw_fd(),
        &mut headers,
        slices.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    let mut n = 0;
    for (msg, got) in results.zip(bufs.got.iter_mut()) {
        *got = (msg.bytes, msg.address.as_ref().and_then(socket_addr));
        n += 1;
    }
    Ok(n)
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// The receiving task of one stream: `ready` is notified by the media thread when the socket is
/// readable (the socket is not registered with tokio's reactor, see the media module).
pub(super) async fn run(
    mut r: Receiver,
    mut ctl: mpsc::UnboundedReceiver<RecvCmd>,
    ready: Arc<Notify>,
) {
    let mut bufs = Box::new(RecvBufs {
        data: [[0; RECV_BUFFER]; BATCH],
        got: [(0, None); BATCH],
    });
    let socket = r.socket.clone();
    // One timer for the task's life, moved only when the next deadline comes earlier than where
    // it is set. A bridged stream's media-timeout deadline moves later with every packet, and
    // re-arming a timer per packet costs more than relaying the packet; when the timer fires
    // before the real deadline, `on_timer` finds nothing due (it checks every condition against
    // the clock) and the loop sets it again.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        if let Some(deadline) = r.next_deadline()
            && armed.is_none_or(|at| deadline < at)
        {
            timer.as_mut().reset(deadline);
            armed = Some(deadline);
        }
        tokio::select! {
            // Packets first: they are what the task exists for, and a command or timer in the
            // same wake loses nothing by waiting for them.
            biased;
            () = ready.notified() => r.receive(&socket, &mut bufs, &ready).await,
            cmd = ctl.recv() => match cmd {
                Some(RecvCmd::StartRecording(spec)) => r.start(spec).await,
                Some(RecvCmd::StopRecording(end, done)) => {
                    let outcome = r.finish(end).await;
                    if let Some(done) = done {
                        let _ = done.send(outcome);
                    }
                }
                Some(RecvCmd::Bridge { peer, timeout }) => r.bridge(peer, timeout),
                Some(RecvCmd::Unbridge) => r.bridge = None,
                Some(RecvCmd::Tap(tap)) => r.tap = tap,
                Some(RecvCmd::Close) | None => {
                    let _ = r.finish(RecordingEnd::Hangup).await;
                    return;
                }
            },
            () = &mut timer, if armed.is_some() => {
                armed = None;
                r.on_timer().await;
            }
        }
    }
}

/// Relay one packet of stream `from` onto `peer`'s outgoing stream: one (uncontended) lock, the
/// header rewritten and the payload copied (or mapped, byte by byte) into `buf`, one non-blocking
/// send. Nothing is allocated.
fn relay(
    from: u64,
    peer: &Peer,
    packet: &RtpView<'_>,
    event: bool,
    now: Instant,
    buf: &mut Vec<u8>,
    stats: &MediaStats,
) {
    let (payload_type, kind, map) = if event {
        // The peer negotiated no telephone-events: it cannot take them.
        let Some(pt) = peer.telephone_event else {
            return;
        };
        (pt, RelayKind::Event, None)
    } else {
        let samples = u32::try_from(packet.payload.len()).unwrap_or(u32::MAX);
        (peer.payload_type, RelayKind::Audio { samples }, peer.map)
    };
    let mut guard = lock(&peer.out);
    let out = &mut *guard;
    // Not ours to write (a prompt plays there, or the bridge is ending).
    if out.relay_from != Some(from) {
        return;
    }
    let (Some(remote), Some(sender)) = (out.remote, out.sender.as_mut()) else {
        return;
    };
    if !out
        .relay
        .relay(sender, packet, payload_type, kind, map, now.into_std(), buf)
    {
        return;
    }
    if !event && let Some(tap) = &out.tap {
        // What the peer's caller hears: the payload after the 12-byte header.
        tap.send(buf.get(12..).unwrap_or_default(), peer.codec);
    }
    match out.socket.send_to(buf, remote) {
        Ok(_) => {
            stats.packets_relayed.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            stats.send_errors.fetch_add(1, Ordering::Relaxed);
            debug!(stream = peer.id, error = %e, "relayed RTP send failed");
        }
    }
}
