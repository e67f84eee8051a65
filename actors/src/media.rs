//! Media: RTP ports for calls, and media threads that send every call's 20 ms frames and read
//! what each caller sends (DTMF, recordings, and — while two streams are bridged — the packets
//! relayed to the other leg).
//!
//! One scheduler serves all outgoing streams (not a task or timer per call): a wheel of 1 ms
//! slots over the 20 ms frame period, each stream keeping one slot, so every millisecond the
//! thread sends the frames due in that slot — the prompt being played, or silence. 2,000 calls
//! cost 1,000 wake-ups a second of ~100 sends each, not 100,000 timers, and no stream waits behind
//! all the others. Packet layout, pacing arithmetic, jitter buffering and DTMF detection are
//! sans-IO in `sautikit_sip`; this is the driver.
//!
//! A bridge (a call's two legs talking to each other: the B2BUA's media path) lives on the media
//! thread of both its streams ([`Media::open_beside`] puts the second leg there). It costs no task
//! and no allocation per packet: the thread reads leg A's packet and rewrites it onto B's
//! outgoing stream (B's SSRC and numbering, µ-law ↔ A-law by table when the legs' codecs differ,
//! telephone-events with B's payload type) in a buffer A's receiver keeps, and sends it from B's
//! socket to B's (latched) remote. Each stream's outgoing side — socket, remote, the
//! [`RtpSender`] numbering every packet — is shared by the pacer and the other leg's receiver
//! behind a mutex that is never contended (both are on the shard's one thread); while relayed
//! packets own a stream, the pacer sends nothing on it.
//!
//! Receiving is batched as sending is. The RTP sockets are not registered with tokio's reactor,
//! which would wake the thread for every packet (each wake a context switch, and with real-time
//! scheduling a preemption of whatever else runs on the core): the media thread keeps them in an
//! epoll set of its own, edge-triggered, and looks at it once a millisecond on the pacer's grid.
//! The thread then reads each readable socket empty and hands the packets to the stream's
//! receiver (a state machine, see `receive`): no task is woken per packet. A packet waits at
//! most one slot (1 ms) for the thread; 1,000 bridged calls cost 1,000 wakes a second per thread
//! instead of one per packet. While streams are
//! started the slots are kept by a periodic kernel timer (a timerfd), which wakes the thread on
//! the grid to the microsecond: tokio's timers round to whole milliseconds and would make the
//! wait up to 2 ms.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use sautikit_sip::rtp::{DueTicks, FrameWheel, RtpRelay, RtpSender, g711};
use sautikit_sip::sdp::Codec;
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::synth::Audio;

mod live;
mod receive;

pub use live::{LiveCmd, MAX_QUEUED_SAMPLES, Tap, TapFrame, TapTrack};
pub use receive::{RecordingEnd, RecordingOutcome, RecordingSpec};

/// One frame: 20 ms of 8 kHz G.711.
pub const FRAME: Duration = Duration::from_millis(20);
const SAMPLES_PER_FRAME: usize = 160;
/// The frame period is cut into this many slots; streams are spread over them.
const SLOTS: usize = 20;
/// How often the media thread looks for received packets: once a slot, on the pacer's grid, so
/// both kinds of work share one wake.
const SLOT: Duration = Duration::from_millis(1);
const _: () = assert!(SLOT.as_nanos() * SLOTS as u128 == FRAME.as_nanos());
/// Frames sent back to back after a late wake. More would arrive as a burst the caller's jitter
/// buffer cannot use; the rest are skipped in time (the RTP clock and the prompt move on), so the
/// stream stays in step with the wall clock.
const MAX_BURST: u32 = 3;
/// A bridged leg whose remote sends no RTP for this long is reported
/// ([`MediaEvent::MediaTimeout`]), unless [`Media::bridge`] is given another figure.
pub const DEFAULT_MEDIA_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum MediaError {
    #[error("no free RTP port in {first}-{last}")]
    NoFreePort { first: u16, last: u16 },
    #[error("the media engine is not running")]
    Stopped,
}

/// What a call's media reports to its call.
#[derive(Debug, Clone)]
pub enum MediaEvent {
    /// A `play` finished (all its loops) or was stopped.
    PlaybackFinished { play_id: u64, interrupted: bool },
    /// The caller pressed a key (RFC 4733 telephone-event).
    Digit { key: char },
    /// A recording ended and its WAV file is complete.
    RecordingFinished(RecordingOutcome),
    /// The stream is bridged and its remote has sent no RTP (of its negotiated payload types)
    /// for the bridge's media timeout, counted from its last packet or from the bridge, whichever
    /// came later. Sent once per silence: a packet re-arms it.
    MediaTimeout { silent_for: Duration },
    /// The stream's remote sent its first RTP packet (of a negotiated payload type) since the
    /// stream started: a dialled party's early media is really flowing.
    RemoteMediaStarted,
}

/// Where a call's media events go (the Call actor casts them to itself).
pub type MediaEvents = Arc<dyn Fn(MediaEvent) + Send + Sync>;

/// An RTP port owned by a call until it is closed.
#[derive(Debug)]
pub struct RtpPort {
    pub id: u64,
    pub local: SocketAddr,
}

/// What was negotiated for a stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamParams {
    pub remote: SocketAddr,
    pub codec: Codec,
    pub payload_type: u8,
    pub telephone_event: Option<u8>,
}

impl StreamParams {
    /// The stream an SDP negotiation settled on; `None` when the far end gave no usable RTP
    /// address (e.g. `0.0.0.0`).
    pub fn negotiated(answer: &sautikit_sip::sdp::Answer) -> Option<StreamParams> {
        Some(StreamParams {
            remote: answer.remote_rtp?,
            codec: answer.codec,
            payload_type: answer.payload_type,
            telephone_event: answer.telephone_event,
        })
    }
}

enum MediaCmd {
    Open {
        events: MediaEvents,
        reply: oneshot::Sender<Result<RtpPort, MediaError>>,
    },
    Start {
        id: u64,
        params: StreamParams,
    },
    Play {
        id: u64,
        play_id: u64,
        audio: Audio,
        loops: u32,
    },
    StopPlayback {
        id: u64,
    },
    Bridge {
        a: u64,
        b: u64,
        timeout: Duration,
    },
    Unbridge {
        a: u64,
        b: u64,
    },
    /// For the stream's receiver.
    Receiver {
        id: u64,
        cmd: receive::RecvCmd,
    },
    Close {
        id: u64,
    },
    /// A media stream's agent audio (bidirectional `stream`).
    Live {
        id: u64,
        cmd: LiveCmd,
    },
    /// Copy what the stream receives (`inbound`) and sends (`outbound`) to a media stream's
    /// session; `None` stops the copy.
    Tap {
        id: u64,
        inbound: Option<Tap>,
        outbound: Option<Tap>,
    },
}

/// Counters a benchmark or `/metrics` can read.
#[derive(Debug, Default)]
pub struct MediaStats {
    /// Frames the pacer sent (prompts, silence).
    pub packets_sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub packets_received: AtomicU64,
    /// Packets bridges relayed from one leg to the other.
    pub packets_relayed: AtomicU64,
    pub streams: AtomicU64,
}

/// Handle to the media engine; cheap to clone.
#[derive(Clone)]
pub struct Media {
    /// One pacing thread per shard; a stream lives on shard `id % shards` for its whole life.
    shards: Arc<[mpsc::UnboundedSender<MediaCmd>]>,
    next_shard: Arc<AtomicUsize>,
    pub stats: Arc<MediaStats>,
}

struct Playback {
    play_id: u64,
    audio: Audio,
    position: usize,
    loops_left: u32,
}

/// A stream's outgoing side, shared by the pacer and, while bridged, the receiver of the other
/// leg. Both run on the shard's one thread, so the lock is never contended.
#[derive(Debug)]
struct Out {
    socket: Arc<UdpSocket>,
    /// Where packets go: the negotiated address, then wherever the remote's packets come from
    /// (symmetric RTP, RFC 4961: the stream's receiver latches it).
    remote: Option<SocketAddr>,
    /// Numbers every packet of the stream, paced or relayed: one SSRC, one sequence.
    sender: Option<RtpSender>,
    /// Bridged, started, and no prompt playing here: the stream whose packets are relayed here.
    /// The pacer then sends nothing, and only that stream's receiver writes.
    relay_from: Option<u64>,
    relay: RtpRelay,
    /// A media stream listening to what this stream sends (paced or relayed).
    tap: Option<Tap>,
}

type SharedOut = Arc<Mutex<Out>>;

fn lock(out: &Mutex<Out>) -> MutexGuard<'_, Out> {
    // Nothing panics while holding it; should something, the state is still fit to send from.
    out.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Out {
    /// Relayed packets (from stream `peer`) take the stream over from the pacer, if it has
    /// started; a no-op if they have it already.
    fn relay_from(&mut self, peer: u64, now: std::time::Instant) {
        let Some(sender) = self.sender.as_mut() else {
            return;
        };
        if self.relay_from.is_none() {
            self.relay.start(sender, now);
        }
        self.relay_from = Some(peer);
    }

    /// The pacer takes the stream back; a no-op if it has it.
    fn back_to_pacer(&mut self, now: std::time::Instant) {
        if self.relay_from.take().is_some()
            && let Some(sender) = self.sender.as_mut()
        {
            self.relay.stop(sender, now);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bridged {
    peer: u64,
    timeout: Duration,
}

struct Stream {
    socket: Arc<UdpSocket>,
    out: SharedOut,
    /// What the caller sends, once the stream has started.
    receiver: Option<receive::Receiver>,
    /// The socket is in the thread's epoll set (from the stream's start to its close).
    watched: bool,
    events: MediaEvents,
    codec: Codec,
    /// What was negotiated, once started.
    params: Option<StreamParams>,
    playback: Option<Playback>,
    /// The wheel slot this stream sends in, once started.
    slot: Option<usize>,
    bridge: Option<Bridged>,
    /// A bidirectional media stream's audio, played when no prompt plays.
    live: Option<live::Live>,
    /// A media stream listening to what this stream receives (given to its receiver).
    inbound_tap: Option<Tap>,
}

struct Engine {
    ip: IpAddr,
    first: u16,
    last: u16,
    /// This engine is shard `shard` of `shards`: it owns every `shards`-th even port and the
    /// stream ids `≡ shard (mod shards)`.
    shard: u16,
    shards: u16,
    /// Next port to try, so ports are reused as late as possible (stray packets of an ended
    /// call do not land in a new one).
    cursor: u16,
    next_id: u64,
    streams: HashMap<u64, Stream>,
    in_use: HashMap<u16, u64>,
    wheel: FrameWheel<u64>,
    /// The wheel's start: receive polls keep to its grid.
    epoch: std::time::Instant,
    readable: Readable,
    stats: Arc<MediaStats>,
}

/// A periodic timer, once a slot on the wheel's grid, armed while the thread polls sockets.
struct Tick {
    timer: AsyncFd<Timer>,
    armed: bool,
}

/// `AsyncFd` wants `AsRawFd`, which nix's `TimerFd` does not implement.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Tick {
    /// `None` (tokio's timer serves) if the kernel refuses a timerfd.
    fn new() -> Option<Tick> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(std::io::Error::from)
        .and_then(|t| {
            // SAFETY: `Timer` owns the timerfd (an `OwnedFd` inside nix's `TimerFd`): it stays
            // open, the same descriptor, until the `AsyncFd` holding it is dropped.
            unsafe { AsyncFd::register(Timer(t)) }.map_err(std::io::Error::from)
        });
        match timer {
            Ok(timer) => Some(Tick {
                timer,
                armed: false,
            }),
            Err(e) => {
                warn!(error = %e, "no timerfd for the media thread; it paces on tokio's timer");
                None
            }
        }
    }

    /// Arm the timer when `wanted` (from the next slot of the grid starting at `epoch`), disarm
    /// it when not; returns whether it is armed.
    fn arm(&mut self, wanted: bool, epoch: std::time::Instant) -> bool {
        if wanted == self.armed {
            return wanted;
        }
        let timer = &self.timer.get_ref().0;
        let set = if wanted {
            let since = std::time::Instant::now().saturating_duration_since(epoch);
            let into_slot = Duration::from_nanos(
                u64::try_from(since.as_nanos() % SLOT.as_nanos()).unwrap_or(0),
            );
            // Never zero: a zero first expiration disarms the timer.
            let first = (SLOT - into_slot).max(Duration::from_micros(1));
            timer.set(
                Expiration::IntervalDelayed(TimeSpec::from(first), TimeSpec::from(SLOT)),
                TimerSetTimeFlags::empty(),
            )
        } else {
            timer.unset()
        };
        match set {
            Ok(()) => self.armed = wanted,
            Err(e) => warn!(error = %e, "cannot set the media thread's timerfd"),
        }
        self.armed
    }

    /// The timer's next expiration (those missed by a late wake count as one). An error means
    /// the timer cannot be used.
    async fn expired(tick: Option<&Tick>) -> std::io::Result<()> {
        let Some(tick) = tick else {
            return std::future::pending().await;
        };
        loop {
            let mut guard = tick.timer.readable().await?;
            // The count of expirations is read and dropped; what fell due is computed from the
            // clock.
            match nix::unistd::read(guard.get_inner().0.as_fd(), &mut [0u8; 8]) {
                Ok(_) => {
                    // Read out: no longer readable until the next expiration, which the reactor
                    // reports afresh (clearing does not drop an expiration it has not seen).
                    guard.clear_ready();
                    return Ok(());
                }
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    warn!(error = %e, "reading the media thread's timerfd failed; it paces on tokio's timer");
                    return Err(e.into());
                }
            }
        }
    }
}

/// The shard's started streams' sockets, polled by the media thread (see the module's notes).
struct Readable {
    /// `None` if the kernel refused an epoll instance: each stream is then polled once a slot.
    epoll: Option<Epoll>,
    /// Room for every watched socket, so one `epoll_wait` sees all that are readable.
    events: Vec<EpollEvent>,
    watched: usize,
    /// Streams not read empty at the last poll (a flood hit the per-poll limit): read again at
    /// the next, as edge-triggered epoll will not report them again.
    unread: Vec<u64>,
    /// The next poll, on the wheel's grid.
    next: std::time::Instant,
}

impl Media {
    /// Start the engine with RTP ports `first..=last` on `ip`, paced by `threads` threads (each
    /// owning a share of the calls). Only even ports carry RTP (the odd neighbour is RTCP's by
    /// convention). `realtime` asks for real-time scheduling of the media threads.
    pub fn start(ip: IpAddr, first: u16, last: u16, threads: usize, realtime: bool) -> Media {
        let stats = Arc::new(MediaStats::default());
        let shards = u16::try_from(threads.clamp(1, 64)).unwrap_or(1);
        let mut txs = Vec::with_capacity(usize::from(shards));
        for shard in 0..shards {
            let (tx, rx) = mpsc::unbounded_channel();
            let first_port = first_port(first, shard);
            let epoch = Instant::now().into_std();
            let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
                Ok(e) => Some(e),
                Err(e) => {
                    warn!(error = %e, "no epoll set for the media thread; it reads every socket each slot");
                    None
                }
            };
            let engine = Engine {
                ip,
                first,
                last,
                shard,
                shards,
                cursor: first_port,
                next_id: 1,
                streams: HashMap::new(),
                in_use: HashMap::new(),
                wheel: FrameWheel::new(epoch, SLOT, SLOTS),
                epoch,
                readable: Readable {
                    epoll,
                    events: Vec::new(),
                    watched: 0,
                    unread: Vec::new(),
                    next: epoch,
                },
                stats: stats.clone(),
            };
            txs.push(tx);
            // Pacing gets threads of its own: on the shared runtime a frame would wait behind
            // whatever HTTP or database work holds the workers, and the caller hears the jitter.
            let spawned = std::thread::Builder::new()
                .name(format!("sautikit-media{shard}"))
                .spawn(move || {
                    if realtime {
                        raise_priority();
                    }
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(engine.run(rx)),
                        Err(e) => warn!(error = %e, "the media runtime could not start"),
                    }
                });
            if let Err(e) = spawned {
                warn!(error = %e, "a media thread could not start");
            }
        }
        Media {
            shards: txs.into(),
            next_shard: Arc::new(AtomicUsize::new(0)),
            stats,
        }
    }

    /// The shard (media thread) of stream `id`.
    fn shard_of(&self, id: u64) -> usize {
        let n = self.shards.len() as u64;
        usize::try_from(id % n.max(1)).unwrap_or(0)
    }

    fn send(&self, id: u64, cmd: MediaCmd) -> Result<(), MediaError> {
        let tx = self
            .shards
            .get(self.shard_of(id))
            .ok_or(MediaError::Stopped)?;
        tx.send(cmd).map_err(|_| MediaError::Stopped)
    }

    /// Whether streams `a` and `b` live on the same media thread (only then can they be bridged).
    pub fn same_thread(&self, a: u64, b: u64) -> bool {
        self.shard_of(a) == self.shard_of(b)
    }

    /// Bind a free port for a call; its events go to `events`. Calls are dealt to the pacing
    /// threads in turn; a thread whose ports are all taken passes to the next.
    pub async fn open(&self, events: MediaEvents) -> Result<RtpPort, MediaError> {
        let n = self.shards.len();
        let start = self.next_shard.fetch_add(1, Ordering::Relaxed);
        let mut last_err = MediaError::Stopped;
        for k in 0..n {
            let (reply, rx) = oneshot::channel();
            let Some(tx) = self.shards.get((start + k) % n) else {
                continue;
            };
            if tx
                .send(MediaCmd::Open {
                    events: events.clone(),
                    reply,
                })
                .is_err()
            {
                continue;
            }
            match rx.await {
                Ok(Ok(port)) => return Ok(port),
                Ok(Err(e)) => last_err = e,
                Err(_) => {}
            }
        }
        Err(last_err)
    }

    /// Open a port on the same media thread as stream `beside` (a bridge needs both legs on one
    /// thread). Unlike [`Media::open`] it does not fall back to another thread when this one has
    /// no free port: it fails with [`MediaError::NoFreePort`].
    pub async fn open_beside(
        &self,
        beside: u64,
        events: MediaEvents,
    ) -> Result<RtpPort, MediaError> {
        let (reply, rx) = oneshot::channel();
        self.send(beside, MediaCmd::Open { events, reply })?;
        rx.await.map_err(|_| MediaError::Stopped)?
    }

    /// Start sending (silence until something plays) and listening. Again on a started stream
    /// (a re-INVITE): the new remote and codec apply; the stream keeps its SSRC and numbering.
    pub fn start_stream(&self, id: u64, params: StreamParams) {
        let _ = self.send(id, MediaCmd::Start { id, params });
    }

    /// Play `audio` `loops` times (replacing whatever plays); `PlaybackFinished` follows.
    pub fn play(&self, id: u64, play_id: u64, audio: Audio, loops: u32) {
        let _ = self.send(
            id,
            MediaCmd::Play {
                id,
                play_id,
                audio,
                loops: loops.max(1),
            },
        );
    }

    /// Stop what plays now (barge-in); `PlaybackFinished { interrupted: true }` follows.
    pub fn stop_playback(&self, id: u64) {
        let _ = self.send(id, MediaCmd::StopPlayback { id });
    }

    /// Relay both ways between streams `a` and `b`, which must be on the same media thread (open
    /// the second with [`Media::open_beside`]; otherwise this logs a warning and does nothing).
    /// Whatever either plays stops (`PlaybackFinished { interrupted: true }`), and while bridged
    /// the pacer sends nothing on them: each hears the other — transcoded when their codecs
    /// differ, telephone-events included (with the payload type the hearing leg negotiated;
    /// dropped if it negotiated none). Digits are still reported and recordings still made on
    /// each leg, and each leg's outgoing stream keeps its SSRC and numbering throughout.
    ///
    /// A leg whose remote sends no RTP for `media_timeout` (usually [`DEFAULT_MEDIA_TIMEOUT`];
    /// zero: never) reports [`MediaEvent::MediaTimeout`] to its events. The streams may be bridged
    /// before they have started: relaying begins as each starts. Bridging a stream bridged to a
    /// third ends that bridge first. A `play` on a bridged stream is heard on that leg in place of
    /// the other leg (which still hears this one); when it ends or is stopped, relaying resumes.
    pub fn bridge(&self, a: u64, b: u64, media_timeout: Duration) {
        if !self.same_thread(a, b) {
            warn!(
                a,
                b,
                "cannot bridge streams on different media threads (open the second leg with \
                 open_beside); not bridged"
            );
            return;
        }
        let _ = self.send(
            a,
            MediaCmd::Bridge {
                a,
                b,
                timeout: media_timeout,
            },
        );
    }

    /// Stop relaying between `a` and `b`: both go back to the pacer (silence until something
    /// plays), their numbering continuing. Nothing happens unless they are bridged together.
    pub fn unbridge(&self, a: u64, b: u64) {
        if self.same_thread(a, b) {
            let _ = self.send(a, MediaCmd::Unbridge { a, b });
        }
    }

    /// Record what the caller says into a WAV file; `RecordingFinished` follows.
    pub fn start_recording(&self, id: u64, spec: RecordingSpec) {
        let _ = self.send(
            id,
            MediaCmd::Receiver {
                id,
                cmd: receive::RecvCmd::StartRecording(spec),
            },
        );
    }

    /// End the recording now (a key from SIP INFO); `RecordingFinished` follows.
    pub fn stop_recording(&self, id: u64, end: RecordingEnd) {
        let _ = self.send(
            id,
            MediaCmd::Receiver {
                id,
                cmd: receive::RecvCmd::StopRecording(end, None),
            },
        );
    }

    /// End the recording and wait for its file to be complete (the call is ending).
    pub async fn finish_recording(&self, id: u64, end: RecordingEnd) -> Option<RecordingOutcome> {
        let (done, rx) = oneshot::channel();
        self.send(
            id,
            MediaCmd::Receiver {
                id,
                cmd: receive::RecvCmd::StopRecording(end, Some(done)),
            },
        )
        .ok()?;
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .ok()?
            .ok()
            .flatten()
    }

    /// Copy what stream `id` receives (`inbound`) and sends (`outbound`) to a media stream's
    /// session; `None` for both stops copying.
    pub fn tap(&self, id: u64, inbound: Option<Tap>, outbound: Option<Tap>) {
        let _ = self.send(
            id,
            MediaCmd::Tap {
                id,
                inbound,
                outbound,
            },
        );
    }

    /// A bidirectional media stream's audio for stream `id`: start, queue audio and marks,
    /// clear, stop. Played when no prompt plays.
    pub fn live(&self, id: u64, cmd: LiveCmd) {
        let _ = self.send(id, MediaCmd::Live { id, cmd });
    }

    /// Stop sending and listening and free the port (a recording in progress is finished). A
    /// bridge it is in ends: the other stream goes back to the pacer.
    pub fn close(&self, id: u64) {
        let _ = self.send(id, MediaCmd::Close { id });
    }
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<MediaCmd>) {
        let mut buf = Vec::with_capacity(12 + SAMPLES_PER_FRAME);
        let mut payload = Vec::with_capacity(SAMPLES_PER_FRAME);
        let mut bufs = receive::RecvBufs::new();
        let sleep = tokio::time::sleep(FRAME);
        tokio::pin!(sleep);
        let mut tick = Tick::new();
        loop {
            // While streams are started, the tick drives polls and pacing alike; otherwise (or
            // without a timerfd) tokio's timer does.
            let ticking = match tick.as_mut() {
                Some(t) => t.arm(self.readable.watched > 0, self.epoch),
                None => false,
            };
            let poll = (self.readable.watched > 0 && !ticking).then_some(self.readable.next);
            let deadline = match (self.wheel.poll_timeout(), poll) {
                _ if ticking => None,
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(at) = deadline {
                sleep.as_mut().reset(Instant::from_std(at));
            }
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.apply(cmd),
                    None => return,
                },
                ticked = Tick::expired(tick.as_ref()), if ticking => {
                    if ticked.is_err() {
                        tick = None;
                        continue;
                    }
                    let now = Instant::now().into_std();
                    self.poll_readable(now, &mut bufs);
                    let due = self.wheel.handle_timeout(now);
                    self.send_due(due, now, &mut buf, &mut payload);
                }
                () = &mut sleep, if deadline.is_some() => {
                    let now = Instant::now().into_std();
                    if poll.is_some_and(|at| now >= at) {
                        self.poll_readable(now, &mut bufs);
                    }
                    let due = self.wheel.handle_timeout(now);
                    self.send_due(due, now, &mut buf, &mut payload);
                }
            }
        }
    }

    /// Read every stream whose socket has something to read (and those left unread at the
    /// last poll), and set the next poll to the next slot of the grid.
    fn poll_readable(&mut self, now: std::time::Instant, bufs: &mut receive::RecvBufs) {
        let r = &mut self.readable;
        let slots_since = now.saturating_duration_since(self.epoch).as_nanos() / SLOT.as_nanos();
        let next = u32::try_from(slots_since + 1).unwrap_or(u32::MAX);
        r.next = self.epoch + SLOT * next;
        let Some(epoll) = &r.epoll else {
            // Every socket, every poll: none is left unread for long.
            for s in self.streams.values_mut().filter(|s| s.watched) {
                if let Some(rx) = s.receiver.as_mut() {
                    rx.read(bufs);
                }
            }
            return;
        };
        let streams = &mut self.streams;
        let mut read = |id: u64, unread: &mut Vec<u64>| {
            if let Some(rx) = streams.get_mut(&id).and_then(|s| s.receiver.as_mut())
                && rx.read(bufs)
            {
                unread.push(id);
            }
        };
        // Those left unread last time; any still not read empty go on the end, kept.
        let left = r.unread.len();
        for i in 0..left {
            if let Some(&id) = r.unread.get(i) {
                read(id, &mut r.unread);
            }
        }
        r.unread.drain(..left);
        // One call per poll, with room for every socket. Edge-triggered: a socket is reported
        // once per arrival, and is read empty (or kept on the unread list).
        r.events.resize(r.watched.max(1), EpollEvent::empty());
        let n = match epoll.wait(&mut r.events, 0u8) {
            Ok(n) => n,
            Err(Errno::EINTR) => return,
            Err(e) => {
                warn!(error = %e, "epoll_wait on the media thread's sockets failed");
                return;
            }
        };
        for event in r.events.iter().take(n) {
            read(event.data(), &mut r.unread);
        }
    }

    fn apply(&mut self, cmd: MediaCmd) {
        match cmd {
            MediaCmd::Open { events, reply } => {
                let _ = reply.send(self.open(events));
            }
            MediaCmd::Start { id, params } => self.start(id, params),
            MediaCmd::Play {
                id,
                play_id,
                audio,
                loops,
            } => {
                if let Some(s) = self.streams.get_mut(&id) {
                    if let Some(old) = s.playback.take() {
                        (s.events)(MediaEvent::PlaybackFinished {
                            play_id: old.play_id,
                            interrupted: true,
                        });
                    }
                    let mut out = lock(&s.out);
                    // On a bridged leg the prompt takes the leg's stream over until it ends.
                    out.back_to_pacer(Instant::now().into_std());
                    if let Some(sender) = out.sender.as_mut() {
                        sender.start_talkspurt();
                    }
                    drop(out);
                    s.playback = Some(Playback {
                        play_id,
                        audio,
                        position: 0,
                        loops_left: loops,
                    });
                } else {
                    debug!(stream = id, "play on a closed stream");
                }
            }
            MediaCmd::StopPlayback { id } => {
                if let Some(s) = self.streams.get_mut(&id)
                    && let Some(old) = s.playback.take()
                {
                    (s.events)(MediaEvent::PlaybackFinished {
                        play_id: old.play_id,
                        interrupted: true,
                    });
                    if let Some(b) = s.bridge {
                        lock(&s.out).relay_from(b.peer, Instant::now().into_std());
                    }
                }
            }
            MediaCmd::Bridge { a, b, timeout } => self.bridge(a, b, timeout),
            MediaCmd::Unbridge { a, b } => {
                if self.bridged_to(a) == Some(b) {
                    self.leave_bridge(a);
                }
                if self.bridged_to(b) == Some(a) {
                    self.leave_bridge(b);
                }
            }
            MediaCmd::Receiver { id, cmd } => {
                if let Some(r) = self.streams.get_mut(&id).and_then(|s| s.receiver.as_mut()) {
                    r.command(cmd);
                }
            }
            MediaCmd::Live { id, cmd } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                match cmd {
                    LiveCmd::Start { echoes } => s.live = Some(live::Live::new(echoes)),
                    LiveCmd::Stop => {
                        if let Some(l) = s.live.take() {
                            let dropped = l.dropped_samples();
                            if dropped > 0 {
                                debug!(
                                    stream = id,
                                    dropped, "agent audio dropped: its queue was full"
                                );
                            }
                        }
                    }
                    cmd => {
                        if let Some(l) = s.live.as_mut() {
                            l.apply(cmd);
                        }
                    }
                }
            }
            MediaCmd::Tap {
                id,
                inbound,
                outbound,
            } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                lock(&s.out).tap = outbound;
                if let Some(r) = s.receiver.as_mut() {
                    r.tap(inbound.clone());
                }
                s.inbound_tap = inbound;
            }
            MediaCmd::Close { id } => {
                if let Some(peer) = self.bridged_to(id) {
                    self.leave_bridge(id);
                    if self.bridged_to(peer) == Some(id) {
                        self.leave_bridge(peer);
                    }
                }
                if let Some(mut s) = self.streams.remove(&id) {
                    if let Some(slot) = s.slot {
                        self.wheel.remove(id, slot);
                    }
                    if let Some(r) = s.receiver.as_mut() {
                        r.close();
                    }
                    if s.watched {
                        self.readable.watched -= 1;
                        if let Some(epoll) = &self.readable.epoll
                            && let Err(e) = epoll.delete(&*s.socket)
                        {
                            debug!(stream = id, error = %e, "removing the RTP socket from the epoll set");
                        }
                    }
                    if let Ok(local) = s.socket.local_addr() {
                        self.in_use.remove(&local.port());
                    }
                    self.stats.streams.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn start(&mut self, id: u64, params: StreamParams) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.codec = params.codec;
        s.params = Some(params);
        {
            let mut out = lock(&s.out);
            out.remote = Some(params.remote);
            match out.sender.as_mut() {
                Some(sender) => {
                    // A re-INVITE: same stream, maybe another payload type.
                    sender.payload_type = params.payload_type & 0x7f;
                    sender.start_talkspurt();
                }
                None => {
                    let mut sender = RtpSender::new(params.payload_type);
                    sender.start_talkspurt();
                    out.sender = Some(sender);
                    if let Some(b) = s.bridge
                        && s.playback.is_none()
                    {
                        // Bridged before it started: relaying begins now.
                        out.relay_from(b.peer, Instant::now().into_std());
                    }
                }
            }
        }
        if s.slot.is_none() {
            s.slot = Some(self.wheel.insert(id, Instant::now().into_std()));
        }
        if !s.watched {
            match &self.readable.epoll {
                Some(epoll) => match epoll.add(
                    &*s.socket,
                    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, id),
                ) {
                    Ok(()) => s.watched = true,
                    Err(e) => {
                        warn!(stream = id, error = %e, "cannot watch the RTP socket; nothing is received on it")
                    }
                },
                None => s.watched = true,
            }
            if s.watched {
                self.readable.watched += 1;
            }
        }
        match s.receiver.as_mut() {
            // A re-INVITE: the same receiver, on the new terms.
            Some(r) => r.renegotiate(params),
            None => {
                let mut r = receive::Receiver::new(
                    id,
                    s.socket.clone(),
                    s.out.clone(),
                    params,
                    s.events.clone(),
                    self.stats.clone(),
                );
                r.tap(s.inbound_tap.clone());
                s.receiver = Some(r);
                // Read at the next poll what arrived before the stream started: the socket is
                // watched edge-triggered, and an arrival before it was watched is not reported.
                self.readable.unread.push(id);
            }
        }
        if let Some(b) = s.bridge {
            // The receiver relays to the peer, and the peer's receiver relays (transcoding) for
            // this stream's codec, which may have changed.
            self.link(id, b.peer);
            self.link(b.peer, id);
        }
    }

    /// The stream `id` is bridged to.
    fn bridged_to(&self, id: u64) -> Option<u64> {
        self.streams.get(&id).and_then(|s| s.bridge).map(|b| b.peer)
    }

    fn bridge(&mut self, a: u64, b: u64, timeout: Duration) {
        if a == b || !self.streams.contains_key(&a) || !self.streams.contains_key(&b) {
            warn!(
                a,
                b, "bridge with a closed stream (or of a stream with itself) ignored"
            );
            return;
        }
        for (x, y) in [(a, b), (b, a)] {
            if let Some(old) = self.bridged_to(x)
                && old != y
            {
                self.leave_bridge(x);
                if self.bridged_to(old) == Some(x) {
                    self.leave_bridge(old);
                }
            }
        }
        let now = Instant::now().into_std();
        for (x, y) in [(a, b), (b, a)] {
            let Some(s) = self.streams.get_mut(&x) else {
                continue;
            };
            if let Some(old) = s.playback.take() {
                (s.events)(MediaEvent::PlaybackFinished {
                    play_id: old.play_id,
                    interrupted: true,
                });
            }
            s.bridge = Some(Bridged { peer: y, timeout });
            lock(&s.out).relay_from(y, now);
        }
        self.link(a, b);
        self.link(b, a);
        debug!(a, b, "streams bridged");
    }

    /// Tell `x`'s receiver (once `x` has started) where to relay: to `y` (once `y` has
    /// started).
    fn link(&mut self, x: u64, y: u64) {
        let (Some(sx), Some(sy)) = (self.streams.get(&x), self.streams.get(&y)) else {
            return;
        };
        let peer = sy.params.map(|p| receive::Peer {
            id: y,
            out: sy.out.clone(),
            codec: p.codec,
            payload_type: p.payload_type,
            telephone_event: p.telephone_event,
            map: g711::transcode_table(sx.codec, p.codec),
        });
        let Some(sx) = self.streams.get_mut(&x) else {
            return;
        };
        if let (Some(receiver), Some(bridge)) = (sx.receiver.as_mut(), sx.bridge) {
            receiver.bridge(peer, bridge.timeout);
        }
    }

    /// `x` is bridged no more: back to the pacer, its receiver relaying nothing.
    fn leave_bridge(&mut self, x: u64) {
        let Some(s) = self.streams.get_mut(&x) else {
            return;
        };
        if s.bridge.take().is_none() {
            return;
        }
        lock(&s.out).back_to_pacer(Instant::now().into_std());
        if let Some(r) = s.receiver.as_mut() {
            r.unbridge();
        }
        debug!(stream = x, "stream unbridged");
    }

    fn open(&mut self, events: MediaEvents) -> Result<RtpPort, MediaError> {
        let no_port = MediaError::NoFreePort {
            first: self.first,
            last: self.last,
        };
        let first = u32::from(first_port(self.first, self.shard));
        let last = u32::from(self.last);
        let step = 2 * u32::from(self.shards);
        if first > last {
            return Err(no_port);
        }
        for _ in 0..(last - first) / step + 1 {
            let port = u32::from(self.cursor).max(first);
            let next = if port + step > last {
                first
            } else {
                port + step
            };
            self.cursor = u16::try_from(next).unwrap_or(self.first);
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if self.in_use.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.ip, port);
            let socket = match UdpSocket::bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    debug!(port, error = %e, "RTP port busy");
                    continue;
                }
            };
            // Non-blocking: the media thread reads until the socket is empty, and a full send
            // buffer drops a frame rather than stalling the thread.
            if socket.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_id * u64::from(self.shards) + u64::from(self.shard);
            self.next_id += 1;
            self.in_use.insert(port, id);
            let socket = Arc::new(socket);
            self.streams.insert(
                id,
                Stream {
                    out: Arc::new(Mutex::new(Out {
                        socket: socket.clone(),
                        remote: None,
                        sender: None,
                        relay_from: None,
                        relay: RtpRelay::new(8000),
                        tap: None,
                    })),
                    socket,
                    events,
                    codec: Codec::Pcmu,
                    params: None,
                    playback: None,
                    receiver: None,
                    watched: false,
                    slot: None,
                    bridge: None,
                    live: None,
                    inbound_tap: None,
                },
            );
            self.stats.streams.fetch_add(1, Ordering::Relaxed);
            return Ok(RtpPort { id, local: addr });
        }
        Err(no_port)
    }

    /// Send what fell due: each stream in a due slot sends the frames it owes, at most
    /// `MAX_BURST` back to back; the rest are skipped in time. Its receiver is polled too (what
    /// falls due there without packets can wait a frame).
    fn send_due(
        &mut self,
        due: DueTicks,
        now: std::time::Instant,
        buf: &mut Vec<u8>,
        payload: &mut Vec<u8>,
    ) {
        let mut sent = 0u64;
        let mut errors = 0u64;
        let mut skipped = 0u64;
        for (slot, frames) in self.wheel.due_slots(due) {
            for id in self.wheel.bucket(slot) {
                let Some(s) = self.streams.get_mut(id) else {
                    continue;
                };
                if let Some(r) = s.receiver.as_mut() {
                    r.poll(now);
                }
                for _ in 0..frames.min(MAX_BURST) {
                    match s.send_frame(buf, payload) {
                        Some(Ok(())) => sent += 1,
                        Some(Err(e)) => {
                            errors += 1;
                            if errors == 1 {
                                warn!(error = %e, stream = id, "RTP send failed");
                            }
                        }
                        None => {}
                    }
                }
                if frames > MAX_BURST {
                    s.skip_frames(frames - MAX_BURST);
                    skipped += u64::from(frames - MAX_BURST);
                }
            }
        }
        self.stats.packets_sent.fetch_add(sent, Ordering::Relaxed);
        if errors > 0 {
            self.stats.send_errors.fetch_add(errors, Ordering::Relaxed);
        }
        if skipped > 0 {
            warn!(frames = skipped, "media pacing fell behind; frames skipped");
        }
    }
}

impl Stream {
    /// Send the next frame, if the stream has somewhere to send it and is not relaying.
    fn send_frame(
        &mut self,
        buf: &mut Vec<u8>,
        payload: &mut Vec<u8>,
    ) -> Option<std::io::Result<()>> {
        let mut guard = lock(&self.out);
        let out = &mut *guard;
        if out.relay_from.is_some() {
            // Bridged: the other leg's packets are this stream's frames.
            return None;
        }
        let (Some(remote), Some(sender)) = (out.remote, out.sender.as_mut()) else {
            return None;
        };
        next_payload(
            self.codec,
            &mut self.playback,
            &mut self.live,
            &self.events,
            payload,
        );
        if let Some(tap) = &out.tap {
            tap.send(payload, self.codec);
        }
        buf.clear();
        sender.next_packet(payload, SAMPLES_PER_FRAME as u32, buf);
        if self.playback.is_none()
            && let Some(b) = self.bridge
        {
            // A prompt played on a bridged leg ended with this frame: relaying resumes.
            out.relay_from(b.peer, Instant::now().into_std());
        }
        // Non-blocking: a full socket buffer drops this frame rather than stalling every other
        // call's timing.
        Some(out.socket.send_to(buf, remote).map(|_| ()))
    }

    /// Frames that fell due but were not sent: time moves on all the same.
    fn skip_frames(&mut self, frames: u32) {
        let samples = frames as usize * SAMPLES_PER_FRAME;
        {
            let mut out = lock(&self.out);
            if out.relay_from.is_some() {
                // Relaying: the relay keeps the stream's clock.
                return;
            }
            if let Some(sender) = out.sender.as_mut() {
                sender.timestamp = sender.timestamp.wrapping_add(samples as u32);
                // The gap is a new talkspurt for the caller's jitter buffer.
                sender.start_talkspurt();
            }
        }
        if let Some(p) = self.playback.as_mut() {
            let len = p.audio.samples.len().max(1);
            p.position += samples;
            while p.position >= len && p.loops_left > 1 {
                p.position -= len;
                p.loops_left -= 1;
            }
            p.position = p.position.min(len);
        }
    }
}

/// The first even port of a shard's share (every `shards`-th even port from `first`).
fn first_port(first: u16, shard: u16) -> u16 {
    let even = u32::from(first) + u32::from(first & 1);
    u16::try_from(even + 2 * u32::from(shard)).unwrap_or(u16::MAX)
}

/// Real-time round-robin scheduling for the calling (media) thread, as media servers ask for: a
/// frame must not wait for a busy machine's time slice. It only sleeps and sends, so it cannot
/// starve the rest (and the kernel caps real-time threads' share anyway).
fn raise_priority() {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let policy = ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::RoundRobin);
    let result = ThreadPriorityValue::try_from(REALTIME_PRIORITY)
        .map_err(|e| e.to_string())
        .and_then(|value| {
            set_thread_priority_and_policy(
                thread_native_id(),
                ThreadPriority::Crossplatform(value),
                policy,
            )
            .map_err(|e| e.to_string())
        });
    match result {
        Ok(()) => info!("media thread runs with real-time scheduling"),
        Err(e) => info!(
            error = %e,
            "media thread runs at normal priority (real-time scheduling refused; grant CAP_SYS_NICE \
             or set SAUTIKIT_MEDIA_REALTIME=false to silence this)"
        ),
    }
}

/// A low real-time priority: above every normal thread, below the kernel's own.
const REALTIME_PRIORITY: u8 = 10;

/// The next 20 ms to send: the playing prompt (its end padded with silence) or silence.
fn next_payload(
    codec: Codec,
    playback: &mut Option<Playback>,
    live: &mut Option<live::Live>,
    events: &MediaEvents,
    payload: &mut Vec<u8>,
) {
    let silence = match codec {
        Codec::Pcmu => g711::SILENCE_PCMU,
        Codec::Pcma => g711::SILENCE_PCMA,
    };
    let Some(p) = playback.as_mut() else {
        // No prompt: a media stream's agent speaks, or silence.
        if live
            .as_mut()
            .is_some_and(|l| l.next_frame(codec, SAMPLES_PER_FRAME, payload))
        {
            return;
        }
        payload.clear();
        payload.resize(SAMPLES_PER_FRAME, silence);
        return;
    };
    let samples = &p.audio.samples;
    let end = (p.position + SAMPLES_PER_FRAME).min(samples.len());
    g711::encode_into(codec, &samples[p.position.min(end)..end], payload);
    p.position = end;
    if p.position >= samples.len() {
        if p.loops_left > 1 {
            p.loops_left -= 1;
            p.position = 0;
        } else {
            let play_id = p.play_id;
            *playback = None;
            events(MediaEvent::PlaybackFinished {
                play_id,
                interrupted: false,
            });
        }
    }
    payload.resize(SAMPLES_PER_FRAME, silence);
}

/// Where recordings go, relative to the data directory.
pub fn recording_path(call_id: &str, recording_id: &str) -> PathBuf {
    PathBuf::from("recordings")
        .join(call_id)
        .join(format!("{recording_id}.wav"))
}
