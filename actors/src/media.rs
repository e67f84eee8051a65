//! Media: RTP ports for calls and one pacing task that sends every call's 20 ms frames.
//!
//! One scheduler serves all streams (not a task or timer per call): each tick it sends the frame
//! that is due for every stream, so 2,000 calls cost 50 wake-ups a second, not 100,000. The
//! packet layout and pacing arithmetic are sans-IO in `sautikit_sip::rtp`; this is the driver.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sautikit_sip::rtp::{Pacer, RtpSender, g711};
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

/// One frame: 20 ms of 8 kHz G.711.
pub const FRAME: Duration = Duration::from_millis(20);
const SAMPLES_PER_FRAME: u32 = 160;

#[derive(Debug, Error)]
pub enum MediaError {
    #[error("no free RTP port in {first}-{last}")]
    NoFreePort { first: u16, last: u16 },
    #[error("the media engine is not running")]
    Stopped,
}

/// G.711 variant negotiated for a call; decides the payload type and the silence byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioCodec {
    Pcmu,
    Pcma,
}

impl AudioCodec {
    fn silence(self) -> u8 {
        match self {
            AudioCodec::Pcmu => g711::SILENCE_PCMU,
            AudioCodec::Pcma => g711::SILENCE_PCMA,
        }
    }
}

/// An RTP port owned by a call until it is closed.
#[derive(Debug)]
pub struct RtpPort {
    pub id: u64,
    pub local: SocketAddr,
}

enum MediaCmd {
    Open {
        reply: oneshot::Sender<Result<RtpPort, MediaError>>,
    },
    Start {
        id: u64,
        remote: SocketAddr,
        codec: AudioCodec,
        payload_type: u8,
    },
    Close {
        id: u64,
    },
}

/// Counters a benchmark or `/metrics` can read.
#[derive(Debug, Default)]
pub struct MediaStats {
    pub packets_sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub streams: AtomicU64,
}

/// Handle to the media engine; cheap to clone.
#[derive(Clone)]
pub struct Media {
    tx: mpsc::UnboundedSender<MediaCmd>,
    pub stats: Arc<MediaStats>,
}

struct Stream {
    socket: Arc<UdpSocket>,
    remote: Option<SocketAddr>,
    sender: Option<RtpSender>,
    silence: u8,
}

struct Engine {
    ip: IpAddr,
    first: u16,
    last: u16,
    /// Next port to try, so ports are reused as late as possible (stray packets of an ended
    /// call do not land in a new one).
    cursor: u16,
    next_id: u64,
    streams: HashMap<u64, Stream>,
    in_use: HashMap<u16, u64>,
    stats: Arc<MediaStats>,
}

impl Media {
    /// Start the engine with RTP ports `first..=last` on `ip`. Only even ports carry RTP (the odd
    /// neighbour is RTCP's by convention).
    pub fn start(ip: IpAddr, first: u16, last: u16) -> Media {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(MediaStats::default());
        let engine = Engine {
            ip,
            first,
            last,
            cursor: first,
            next_id: 1,
            streams: HashMap::new(),
            in_use: HashMap::new(),
            stats: stats.clone(),
        };
        tokio::spawn(engine.run(rx));
        Media { tx, stats }
    }

    /// Bind a free port for a call.
    pub async fn open(&self) -> Result<RtpPort, MediaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(MediaCmd::Open { reply })
            .map_err(|_| MediaError::Stopped)?;
        rx.await.map_err(|_| MediaError::Stopped)?
    }

    /// Start sending silence to `remote` (nothing else plays yet).
    pub fn start_stream(&self, id: u64, remote: SocketAddr, codec: AudioCodec, payload_type: u8) {
        let _ = self.tx.send(MediaCmd::Start {
            id,
            remote,
            codec,
            payload_type,
        });
    }

    /// Stop sending and free the port.
    pub fn close(&self, id: u64) {
        let _ = self.tx.send(MediaCmd::Close { id });
    }
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<MediaCmd>) {
        let mut tick = tokio::time::interval(FRAME);
        // A late wake sends the frames that fell due at once (the pacer counts them), so the
        // stream keeps its clock rather than drifting.
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut pacer = Pacer::new(Instant::now().into_std(), FRAME);
        let mut buf = Vec::with_capacity(12 + SAMPLES_PER_FRAME as usize);
        let mut payload = Vec::with_capacity(SAMPLES_PER_FRAME as usize);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.apply(cmd),
                    None => return,
                },
                now = tick.tick() => {
                    let due = pacer.handle_timeout(now.into_std());
                    for _ in 0..due.min(5) {
                        self.send_frames(&mut buf, &mut payload);
                    }
                }
            }
        }
    }

    fn apply(&mut self, cmd: MediaCmd) {
        match cmd {
            MediaCmd::Open { reply } => {
                let _ = reply.send(self.open());
            }
            MediaCmd::Start {
                id,
                remote,
                codec,
                payload_type,
            } => {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.remote = Some(remote);
                    s.silence = codec.silence();
                    let mut sender = RtpSender::new(payload_type);
                    sender.start_talkspurt();
                    s.sender = Some(sender);
                }
            }
            MediaCmd::Close { id } => {
                if let Some(s) = self.streams.remove(&id) {
                    if let Ok(local) = s.socket.local_addr() {
                        self.in_use.remove(&local.port());
                    }
                    self.stats.streams.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn open(&mut self) -> Result<RtpPort, MediaError> {
        let first = self.first + (self.first & 1);
        let span = u32::from(self.last.saturating_sub(first)) / 2 + 1;
        for _ in 0..span {
            let port = self.cursor.max(first);
            let port = port + (port & 1);
            self.cursor = if port >= self.last.saturating_sub(1) {
                first
            } else {
                port + 2
            };
            if port > self.last || self.in_use.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.ip, port);
            let std_socket = match std::net::UdpSocket::bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    debug!(port, error = %e, "RTP port busy");
                    continue;
                }
            };
            if std_socket.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(socket) = UdpSocket::from_std(std_socket) else {
                continue;
            };
            let id = self.next_id;
            self.next_id += 1;
            self.in_use.insert(port, id);
            self.streams.insert(
                id,
                Stream {
                    socket: Arc::new(socket),
                    remote: None,
                    sender: None,
                    silence: g711::SILENCE_PCMU,
                },
            );
            self.stats.streams.fetch_add(1, Ordering::Relaxed);
            return Ok(RtpPort { id, local: addr });
        }
        Err(MediaError::NoFreePort {
            first: self.first,
            last: self.last,
        })
    }

    fn send_frames(&mut self, buf: &mut Vec<u8>, payload: &mut Vec<u8>) {
        let mut sent = 0u64;
        let mut errors = 0u64;
        for s in self.streams.values_mut() {
            let (Some(remote), Some(sender)) = (s.remote, s.sender.as_mut()) else {
                continue;
            };
            payload.clear();
            payload.resize(SAMPLES_PER_FRAME as usize, s.silence);
            buf.clear();
            sender.next_packet(payload, SAMPLES_PER_FRAME, buf);
            // Non-blocking: a full socket buffer drops this frame rather than stalling every
            // other call's timing.
            match s.socket.try_send_to(buf, remote) {
                Ok(_) => sent += 1,
                Err(e) => {
                    errors += 1;
                    if errors == 1 {
                        warn!(error = %e, %remote, "RTP send failed");
                    }
                }
            }
        }
        self.stats.packets_sent.fetch_add(sent, Ordering::Relaxed);
        if errors > 0 {
            self.stats.send_errors.fetch_add(errors, Ordering::Relaxed);
        }
    }
}
