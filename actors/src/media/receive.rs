//! A call's receiving side: what the caller sends on its RTP port. A state machine owned by the
//! stream on its media thread, with no task of its own: the thread reads the socket when epoll
//! says it is readable (see the media module: it polls its streams' sockets once a millisecond)
//! and hands each packet here, and visits each stream once a frame (on its pacing slot) for what
//! is due without packets: a recording's limits and jitter buffer, a DTMF event's end, a bridge's
//! media timeout. No task is woken and nothing is allocated per packet.
//!
//! It latches the stream to where the caller's packets actually come from (symmetric RTP, for
//! callers behind NAT), turns RFC 4733 telephone-events into digits, and records: packets go
//! through a jitter buffer (reordered, de-duplicated, gaps filled with silence) so the WAV file
//! keeps the caller's timing. The file itself is written by a task of the recording's own, so
//! the media thread never waits for the disk.
//!
//! While the stream is bridged it also relays each packet, as it arrives, onto the other leg's
//! outgoing stream (see the media module), and watches for the caller falling silent.

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use sautikit_sip::dtmf::DtmfDetector;
use sautikit_sip::jitter::{Frame, JitterBuffer};
use sautikit_sip::rtp::{RelayKind, RtpView, g711};
use sautikit_sip::tone::SilenceDetector;
use sautikit_sip::wav::WavWriter;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{MediaEvent, MediaEvents, MediaStats, SharedOut, StreamParams, lock};

/// Jitter absorbed before audio is written: enough for reordering on a mobile network, short
/// enough that a key pressed to end a recording cuts it close to the press.
const PLAYOUT_DELAY: Duration = Duration::from_millis(60);
/// Quieter than this is silence for `record`'s `timeout` (a quiet room on a phone line is
/// around -60 dBFS; speech is well above -35).
const SILENCE_DBFS: f32 = -45.0;
/// Recorded audio is handed to the recording's writer in chunks of this many bytes (4 s at
/// 8 kHz 16-bit).
const FLUSH_BYTES: usize = 64 * 1024;
/// Room for any packet relayed (a UDP datagram on an Ethernet path), allocated once per stream.
const RELAY_BUFFER: usize = 1500;
/// Packets read per system call at most. A read that returns fewer than it had room for found
/// the socket empty, so the usual read (one packet) costs one call, not a second one that only
/// learns the socket is empty.
const BATCH: usize = 2;
/// Room for one datagram read.
const RECV_BUFFER: usize = 2048;
/// Reads per poll at most: a flooded socket does not hold the media thread; the rest is read at
/// the next poll.
const MAX_READS_PER_POLL: usize = 16;

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

/// Where a finished recording's outcome goes besides the stream's events (a call that is ending
/// waits for it).
pub(super) type OutcomeWaiter = oneshot::Sender<Option<RecordingOutcome>>;

#[derive(Debug)]
pub enum RecvCmd {
    StartRecording(RecordingSpec),
    /// End the recording; the outcome also goes to the waiter.
    StopRecording(RecordingEnd, Option<OutcomeWaiter>),
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

/// A recording in progress: the audio not yet handed to its writer, and its limits.
struct Recorder {
    spec: RecordingSpec,
    writer: mpsc::UnboundedSender<Write>,
    pending: Vec<u8>,
    data_bytes: u64,
    silence: SilenceDetector,
    started: Instant,
}

/// What a recording's writer task is told.
enum Write {
    Chunk(Vec<u8>),
    /// The audio is complete (`data_bytes` of it): patch the header, sync, report.
    Finish {
        end: RecordingEnd,
        data_bytes: u64,
        waiter: Option<OutcomeWaiter>,
    },
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
    /// `RemoteMediaStarted` was reported.
    heard: bool,
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
            heard: false,
            dtmf: params.telephone_event.map(|pt| DtmfDetector::new(pt, 8000)),
            jitter: JitterBuffer::new(8000, PLAYOUT_DELAY),
            recorder: None,
            pcm: Vec::with_capacity(160),
            bridge: None,
            relay_buf: Vec::new(),
            tap: None,
        }
    }

    /// A re-INVITE settled on `params`: the stream latches again (the remote may have moved);
    /// a recording, a bridge and a tap go on.
    pub(super) fn renegotiate(&mut self, params: StreamParams) {
        if params.telephone_event != self.params.telephone_event {
            self.dtmf = params.telephone_event.map(|pt| DtmfDetector::new(pt, 8000));
        }
        self.params = params;
        self.latched = None;
    }

    pub(super) fn command(&mut self, cmd: RecvCmd) {
        match cmd {
            RecvCmd::StartRecording(spec) => self.start(spec),
            RecvCmd::StopRecording(end, waiter) => self.finish(end, waiter),
        }
    }

    /// Relay what arrives to `peer` (`None`: the peer has not started yet; relay nothing), and
    /// report a silence of `timeout` (zero: never).
    pub(super) fn bridge(&mut self, peer: Option<Peer>, timeout: Duration) {
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

    pub(super) fn unbridge(&mut self) {
        self.bridge = None;
    }

    /// Copy each audio packet received to a media stream's session (`None`: stop).
    pub(super) fn tap(&mut self, tap: Option<super::Tap>) {
        self.tap = tap;
    }

    /// The stream closes: a recording in progress ends with the call.
    pub(super) fn close(&mut self) {
        self.finish(RecordingEnd::Hangup, None);
    }

    /// Read what the socket holds (epoll saw a packet arrive) and handle each packet. The socket
    /// is watched edge-triggered, so it must be read empty; `true`: it may not be (a flood hit
    /// the per-poll limit), read it again at the next poll.
    pub(super) fn read(&mut self, bufs: &mut RecvBufs) -> bool {
        let mut more = false;
        for _ in 0..MAX_READS_PER_POLL {
            let n = match read_batch(&self.socket, bufs) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return false,
                // ICMP errors from earlier sends surface here; nothing to do but read on. One
                // that persists ends the poll without reading again (no spinning): the next
                // packet's arrival does.
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
                self.on_packet(packet, from);
            }
            if n < BATCH {
                return false;
            }
            more = true;
        }
        more
    }

    fn on_packet(&mut self, packet: &[u8], from: SocketAddr) {
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
            if !self.heard {
                self.heard = true;
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
            // A packet can complete two digits: the second waits in the detector.
            let mut digit = self
                .dtmf
                .as_mut()
                .and_then(|d| d.push(&packet.header(), packet.payload, now));
            while let Some(d) = digit {
                self.digit(d.key);
                digit = self.dtmf.as_mut().and_then(|d| d.poll(now));
            }
        } else if self.recorder.is_some() {
            self.jitter.push(packet.header(), packet.payload, now);
            self.drain(now);
        }
    }

    /// What falls due without packets, checked once a frame: a bridge's silence, the end of a
    /// DTMF event whose end packets were lost, a recording's audio and limits when the caller
    /// stops sending.
    pub(super) fn poll(&mut self, now: Instant) {
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
        if self
            .dtmf
            .as_ref()
            .and_then(|d| d.poll_timeout())
            .is_some_and(|at| at <= now)
        {
            while let Some(d) = self.dtmf.as_mut().and_then(|d| d.poll(now)) {
                self.digit(d.key);
            }
        }
        if self.recorder.is_none() {
            return;
        }
        self.drain(now);
        if let Some(r) = &self.recorder
            && now.duration_since(r.started) >= r.spec.max_length + PLAYOUT_DELAY * 2
        {
            // The caller stopped sending altogether: the wall clock ends it.
            self.finish(RecordingEnd::MaxLength, None);
        }
    }

    fn digit(&mut self, key: char) {
        (self.events)(MediaEvent::Digit { key });
        if let Some(r) = &self.recorder
            && r.spec.finish_keys.contains(key)
        {
            self.finish(RecordingEnd::FinishKey(key), None);
        }
    }

    /// Hand what the jitter buffer releases to the writer; end on length or silence.
    fn drain(&mut self, now: Instant) {
        while let Some(frame) = self.jitter.pop(now) {
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
                r.flush();
            }
            if take < self.pcm.len() || r.data_bytes / 2 >= max_samples {
                self.finish(RecordingEnd::MaxLength, None);
                return;
            }
            if let Some(limit) = r.spec.silence_timeout
                && r.silence.silent_for() >= limit
            {
                self.finish(RecordingEnd::Silence, None);
                return;
            }
        }
    }

    fn start(&mut self, spec: RecordingSpec) {
        if self.recorder.is_some() {
            self.finish(RecordingEnd::Hangup, None);
        }
        // What arrived before the recording started is not part of it.
        self.jitter = JitterBuffer::new(8000, PLAYOUT_DELAY);
        let (writer, chunks) = mpsc::unbounded_channel();
        tokio::spawn(write_recording(
            self.id,
            spec.recording_id.clone(),
            spec.path.clone(),
            self.events.clone(),
            chunks,
        ));
        self.recorder = Some(Recorder {
            spec,
            writer,
            pending: Vec::with_capacity(FLUSH_BYTES + 640),
            data_bytes: 0,
            silence: SilenceDetector::new(8000, SILENCE_DBFS),
            started: Instant::now(),
        });
    }

    /// End the recording (if one is in progress): its writer completes the file and reports
    /// the outcome to the stream's events and to `waiter`.
    fn finish(&mut self, end: RecordingEnd, waiter: Option<OutcomeWaiter>) {
        let Some(mut r) = self.recorder.take() else {
            if let Some(waiter) = waiter {
                let _ = waiter.send(None);
            }
            return;
        };
        r.flush();
        debug!(
            stream = self.id,
            end = end.as_str(),
            data_bytes = r.data_bytes,
            "recording finished"
        );
        // The writer ends only on this message (or a panic, which drops the waiter: the one
        // waiting is told by the closed channel).
        let _ = r.writer.send(Write::Finish {
            end,
            data_bytes: r.data_bytes,
            waiter,
        });
    }
}

impl Recorder {
    /// Hand the pending audio to the writer.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(FLUSH_BYTES + 640));
        let _ = self.writer.send(Write::Chunk(chunk));
    }
}

/// A recording's writer: creates the WAV file, appends each chunk in order, and at the end
/// patches the sizes into the header, syncs, and reports the outcome. Disk work runs on tokio's
/// blocking threads, one piece at a time.
async fn write_recording(
    stream: u64,
    recording_id: String,
    path: PathBuf,
    events: MediaEvents,
    mut rx: mpsc::UnboundedReceiver<Write>,
) {
    let create = path.clone();
    let created = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        use std::io::Write;
        if let Some(dir) = create.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::File::create(&create)?;
        // Sizes are patched when the recording ends.
        f.write_all(&WavWriter::new(8000).start())?;
        Ok(f)
    })
    .await;
    let (mut file, mut error) = match created {
        Ok(Ok(f)) => (Some(f), None),
        Ok(Err(e)) => (None, Some(e.to_string())),
        Err(e) => (None, Some(e.to_string())),
    };
    if let Some(e) = &error {
        warn!(stream, error = %e, "cannot create the recording file");
    }
    while let Some(msg) = rx.recv().await {
        match msg {
            Write::Chunk(chunk) => {
                let Some(f) = file.take() else {
                    continue;
                };
                let written = tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    let mut f = f;
                    let r = f.write_all(&chunk);
                    (f, r)
                })
                .await;
                match written {
                    Ok((f, Ok(()))) => file = Some(f),
                    Ok((_, Err(e))) => error = Some(e.to_string()),
                    Err(e) => error = Some(e.to_string()),
                }
            }
            Write::Finish {
                end,
                data_bytes,
                waiter,
            } => {
                if let Some(f) = file.take() {
                    let done = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                        use std::io::{Seek, SeekFrom, Write};
                        let mut f = f;
                        f.seek(SeekFrom::Start(0))?;
                        f.write_all(
                            &WavWriter::new(8000)
                                .header(u32::try_from(data_bytes).unwrap_or(u32::MAX)),
                        )?;
                        f.sync_all()
                    })
                    .await;
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => error = Some(e.to_string()),
                        Err(e) => error = Some(e.to_string()),
                    }
                }
                let outcome = RecordingOutcome {
                    recording_id,
                    path,
                    duration_ms: data_bytes / 16,
                    size_bytes: data_bytes + 44,
                    end,
                    error,
                };
                (events)(MediaEvent::RecordingFinished(outcome.clone()));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Some(outcome));
                }
                return;
            }
        }
    }
}

/// Where the media thread reads its streams' packets to (one for the thread: reads never
/// overlap). Not `Send` (the kernel's headers hold raw pointers): made on the thread.
pub(super) struct RecvBufs {
    data: [[u8; RECV_BUFFER]; BATCH],
    /// Length and source of each datagram of the last read.
    got: [(usize, Option<SocketAddr>); BATCH],
    headers: MultiHeaders<SockaddrStorage>,
}

impl RecvBufs {
    pub(super) fn new() -> Box<RecvBufs> {
        Box::new(RecvBufs {
            data: [[0; RECV_BUFFER]; BATCH],
            got: [(0, None); BATCH],
            headers: MultiHeaders::preallocate(BATCH, None),
        })
    }
}

/// One `recvmmsg` (non-blocking) into `bufs`: how many datagrams it read.
fn read_batch(socket: &UdpSocket, bufs: &mut RecvBufs) -> nix::Result<usize> {
    let RecvBufs { data, got, headers } = bufs;
    let mut slices = data.each_mut().map(|d| [IoSliceMut::new(d)]);
    let results = recvmmsg(
        socket.as_raw_fd(),
        headers,
        slices.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    let mut n = 0;
    for (msg, got) in results.zip(got.iter_mut()) {
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
        .relay(sender, packet, payload_type, kind, map, now, buf)
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
