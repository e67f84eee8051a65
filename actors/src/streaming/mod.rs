//! Media streams (the `stream` verb): a call's live audio over a WebSocket in Twilio's Media
//! Streams protocol, for AI voice agents. One task per stream: it connects (5 s, the address rules
//! of customer URLs, `wss://` only in production), says `connected` and `start`, then forwards
//! the tapped audio as 20 ms `media` messages and `dtmf`, plays what the server sends through the
//! media thread's playout queue (`media`, `mark`, `clear`), and ends with `stop`. It reports its
//! start and end to the call; the call never waits on the socket.

pub mod protocol;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sautikit_sip::playout::MarkEcho;
use sautikit_sip::rtp::g711;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::debug;

use crate::address::AddressPolicy;
use crate::media::{LiveCmd, Media, Tap, TapFrame, TapTrack};
use crate::voice::{MediaFormat, StreamTrack};
use protocol::{Incoming, Outgoing, StartInfo};

/// How long connecting (DNS, TCP, TLS, the WebSocket handshake) may take in all.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message or frame a server may send: a second of audio in base64 is 11 KB; anything
/// near this is not media.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The socket's read buffer. tungstenite zeroes the free part of it before every read, so its
/// default (128 KiB) costs more per 400-byte `media` message than everything else done with it;
/// 8 KiB holds a read's worth of messages (larger ones get room of their own).
const READ_BUFFER: usize = 8 * 1024;
/// Tapped frames waiting for the socket; beyond this they are dropped (and counted).
const TAP_QUEUE: usize = 500;
/// µ-law bytes in one 20 ms `media` message.
const CHUNK: usize = 160;

/// How streams may connect (from the server's mode).
#[derive(Clone, Default)]
pub struct StreamSettings {
    /// Production: `wss://` only.
    pub require_tls: bool,
    /// Which addresses a stream's host may resolve to.
    pub policy: AddressPolicy,
    /// TLS for `wss://`; without it `wss://` URLs fail to connect.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What one stream is.
#[derive(Clone)]
pub struct StreamSpec {
    pub stream_sid: String,
    pub workspace_id: String,
    pub call_id: String,
    pub url: String,
    pub track: StreamTrack,
    pub bidirectional: bool,
    pub custom_parameters: Vec<(String, String)>,
    pub format: MediaFormat,
    /// The call's media stream (its RTP port).
    pub port: u64,
}

/// What the call tells a stream.
#[derive(Debug)]
pub enum SessionCmd {
    /// The caller pressed a key.
    Dtmf(char),
    /// End the stream (`stopStream`, the call's end): `stop`, then close.
    Stop,
}

/// Counters the call reads when the stream ends.
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// `media` messages sent to the server.
    pub frames_sent: AtomicU64,
    /// `media` messages received from it.
    pub frames_received: AtomicU64,
    /// Tapped frames the socket could not take in time. Shared with the taps, which count into
    /// it as they drop: the call reads it when the call ends, before the session has finished.
    pub frames_dropped: Arc<AtomicU64>,
}

/// What a stream reports to its call.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// Connected, `connected` and `start` sent.
    Started,
    /// The stream is over: `reason` is `closed` (the server closed it), `stopped` (the call
    /// stopped it) or a failure (`stream.*`), with a message for the timeline.
    Ended {
        reason: &'static str,
        message: Option<String>,
    },
}

/// The handle a call keeps.
pub struct StreamHandle {
    pub control: mpsc::UnboundedSender<SessionCmd>,
    pub counters: Arc<StreamCounters>,
}

/// Start a stream's task; its events go to `events`.
pub fn start(
    media: Media,
    settings: StreamSettings,
    spec: StreamSpec,
    events: impl Fn(SessionEvent) + Send + Sync + 'static,
) -> StreamHandle {
    let (control, control_rx) = mpsc::unbounded_channel();
    let counters = Arc::new(StreamCounters::default());
    let task_counters = counters.clone();
    metrics::gauge!("sautikit_media_streams_live").increment(1.0);
    tokio::spawn(async move {
        let (reason, message) = run(
            &media,
            &settings,
            &spec,
            control_rx,
            &task_counters,
            &events,
        )
        .await;
        // Whatever ended it, the taps and the playout go.
        media.tap(spec.port, None, None);
        if spec.bidirectional {
            media.live(spec.port, LiveCmd::Stop);
        }
        metrics::gauge!("sautikit_media_streams_live").decrement(1.0);
        events(SessionEvent::Ended { reason, message });
    });
    StreamHandle { control, counters }
}

/// Why connecting failed: the reason for the timeline and `failure_reason`.
fn failed(reason: &'static str, message: impl Into<String>) -> (&'static str, Option<String>) {
    (reason, Some(message.into()))
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect(
    settings: &StreamSettings,
    spec: &StreamSpec,
) -> Result<Socket, (&'static str, Option<String>)> {
    let url =
        url::Url::parse(&spec.url).map_err(|e| failed("stream.unreachable", e.to_string()))?;
    let tls = url.scheme() == "wss";
    if settings.require_tls && !tls {
        return Err(failed(
            "stream.insecure_url",
            "production streams must use wss://",
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| failed("stream.unreachable", "the URL has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout_at(deadline, tokio::net::lookup_host((host.as_str(), port)))
            .await
            .map_err(|_| failed("stream.unreachable", "resolving the host timed out"))?
            .map_err(|e| failed("stream.unreachable", format!("resolving {host}: {e}")))?
            .collect();
    let permitted: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| settings.policy.permits(a.ip()))
        .collect();
    if permitted.is_empty() {
        return Err(if addrs.is_empty() {
            failed("stream.unreachable", format!("{host} has no address"))
        } else {
            failed(
                "stream.forbidden",
                format!("{host} resolves only to addresses streams may not reach"),
            )
        });
    }
    let mut last = String::new();
    let mut tcp = None;
    for addr in permitted {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("connecting to {addr}: {e}"),
            Err(_) => {
                last = format!("connecting to {addr} timed out");
                break;
            }
        }
    }
    let tcp = tcp.ok_or_else(|| failed("stream.unreachable", last))?;
    let _ = tcp.set_nodelay(true);
    let connector = match (tls, &settings.tls) {
        (true, Some(config)) => Some(tokio_tungstenite::Connector::Rustls(config.clone())),
        (true, None) => {
            return Err(failed(
                "stream.unreachable",
                "no TLS configuration for wss://",
            ));
        }
        (false, _) => Some(tokio_tungstenite::Connector::Plain),
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    match tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::client_async_tls_with_config(
            spec.url.as_str(),
            tcp,
            Some(config),
            connector,
        ),
    )
    .await
    {
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(e)) => Err(failed("stream.handshake", e.to_string())),
        Err(_) => Err(failed(
            "stream.handshake",
            "the WebSocket handshake timed out",
        )),
    }
}

/// Each track's audio re-framed into exact 20 ms chunks, numbered per track.
struct Track {
    name: &'static str,
    pending: Vec<u8>,
    chunk: u64,
    /// For L16: the track brought to 16 kHz.
    up: sautikit_sip::halfband::Upsampler,
}

impl Track {
    fn new(name: &'static str) -> Self {
        Track {
            name,
            pending: Vec::with_capacity(2 * CHUNK),
            chunk: 0,
            up: Default::default(),
        }
    }

    /// One 20 ms chunk of µ-law as the stream's payload bytes.
    fn payload(
        &mut self,
        format: MediaFormat,
        ulaw: &[u8],
        scratch: &mut Vec<i16>,
        wide: &mut Vec<i16>,
    ) -> Vec<u8> {
        match format {
            MediaFormat::Mulaw => ulaw.to_vec(),
            MediaFormat::L16 => {
                g711::decode_into(sautikit_sip::sdp::Codec::Pcmu, ulaw, scratch);
                self.up.process(scratch, wide);
                wide.iter().flat_map(|s| s.to_be_bytes()).collect()
            }
        }
    }
}

/// A server's payload as 8 kHz samples for the playout queue; `None` when it is not whole L16
/// samples.
fn agent_audio(
    format: MediaFormat,
    payload: &[u8],
    down: &mut sautikit_sip::halfband::Downsampler,
    scratch: &mut Vec<i16>,
) -> Option<Vec<i16>> {
    let mut pcm = Vec::new();
    match format {
        MediaFormat::Mulaw => {
            g711::decode_into(sautikit_sip::sdp::Codec::Pcmu, payload, &mut pcm);
        }
        MediaFormat::L16 => {
            if !payload.len().is_multiple_of(2) {
                return None;
            }
            scratch.clear();
            scratch.extend(
                payload
                    .chunks_exact(2)
                    .map(|b| i16::from_be_bytes([b[0], b[1]])),
            );
            down.process(scratch, &mut pcm);
        }
    }
    Some(pcm)
}

async fn run(
    media: &Media,
    settings: &StreamSettings,
    spec: &StreamSpec,
    mut control: mpsc::UnboundedReceiver<SessionCmd>,
    counters: &StreamCounters,
    events: &(impl Fn(SessionEvent) + Send + Sync),
) -> (&'static str, Option<String>) {
    let mut socket = match connect(settings, spec).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let started = Instant::now();
    let mut out = Outgoing::new(&spec.stream_sid);
    let start = out.start(&StartInfo {
        stream_sid: &spec.stream_sid,
        account_sid: &spec.workspace_id,
        call_sid: &spec.call_id,
        tracks: spec.track.names(),
        custom_parameters: &spec.custom_parameters,
        format: spec.format,
    });
    // The taps start before `start` goes out: an agent that hears `start` hears everything
    // after it (the frames wait in the tap's queue until the loop below sends them).
    let (tap_tx, mut tap_rx) = mpsc::channel::<TapFrame>(TAP_QUEUE);
    let tap = |track| Tap::new(tap_tx.clone(), track, counters.frames_dropped.clone());
    media.tap(
        spec.port,
        spec.track.inbound().then(|| tap(TapTrack::Inbound)),
        spec.track.outbound().then(|| tap(TapTrack::Outbound)),
    );
    drop(tap_tx);
    let (echo_tx, mut echo_rx) = mpsc::unbounded_channel();
    if spec.bidirectional {
        media.live(spec.port, LiveCmd::Start { echoes: echo_tx });
    } else {
        drop(echo_tx);
    }
    if let Err(e) = send_all(&mut socket, [Outgoing::connected(), start]).await {
        return failed("stream.closed", e);
    }
    events(SessionEvent::Started);
    let mut inbound = Track::new("inbound");
    let mut outbound = Track::new("outbound");
    let (mut scratch, mut wide) = (Vec::new(), Vec::new());
    let mut down = sautikit_sip::halfband::Downsampler::default();
    // A closed channel is not read again (it would be ready forever).
    let mut tapping = true;
    let mut echoing = spec.bidirectional;
    loop {
        tokio::select! {
            frame = tap_rx.recv(), if tapping => {
                let Some(frame) = frame else {
                    tapping = false;
                    continue;
                };
                let track = match frame.track {
                    TapTrack::Inbound => &mut inbound,
                    TapTrack::Outbound => &mut outbound,
                };
                track.pending.extend_from_slice(&frame.ulaw);
                let at_ms = u64::try_from(frame.at.saturating_duration_since(started).as_millis()).unwrap_or(u64::MAX);
                let mut sent = 0;
                let mut failure = None;
                while track.pending.len() >= CHUNK {
                    track.chunk += 1;
                    let chunk: Vec<u8> = track.pending.drain(..CHUNK).collect();
                    let payload = track.payload(spec.format, &chunk, &mut scratch, &mut wide);
                    let text = out.media(track.name, track.chunk, at_ms, &payload);
                    if let Err(e) = socket.feed(Message::text(text)).await {
                        failure = Some(e.to_string());
                        break;
                    }
                    sent += 1;
                }
                if let Some(e) = failure {
                    break failed("stream.closed", e);
                }
                if sent > 0 {
                    if let Err(e) = socket.flush().await {
                        break failed("stream.closed", e.to_string());
                    }
                    counters.frames_sent.fetch_add(sent, Ordering::Relaxed);
                }
            }
            echo = echo_rx.recv(), if echoing => {
                let Some(echo) = echo else {
                    echoing = false;
                    continue;
                };
                let text = match echo {
                    MarkEcho::Played(name) => out.mark(&name, false),
                    MarkEcho::Cleared(name) => out.mark(&name, true),
                };
                if let Err(e) = socket.send(Message::text(text)).await {
                    break failed("stream.closed", e.to_string());
                }
            }
            cmd = control.recv() => match cmd {
                Some(SessionCmd::Dtmf(digit)) => {
                    if let Err(e) = socket.send(Message::text(out.dtmf(digit))).await {
                        break failed("stream.closed", e.to_string());
                    }
                }
                Some(SessionCmd::Stop) | None => {
                    let stop = out.stop(&spec.workspace_id, &spec.call_id);
                    let _ = socket.send(Message::text(stop)).await;
                    let _ = socket.close(None).await;
                    break ("stopped", None);
                }
            },
            msg = socket.next() => match msg {
                Some(Ok(Message::Text(text))) => match protocol::parse(text.as_str()) {
                    Ok(Incoming::Media(payload)) => {
                        counters.frames_received.fetch_add(1, Ordering::Relaxed);
                        if spec.bidirectional {
                            let Some(pcm) = agent_audio(spec.format, &payload, &mut down, &mut scratch) else {
                                let _ = socket.close(None).await;
                                break failed("stream.invalid_message", "an L16 payload of an odd number of bytes");
                            };
                            media.live(spec.port, LiveCmd::Audio(pcm));
                        }
                    }
                    Ok(Incoming::Mark(name)) => {
                        if spec.bidirectional {
                            media.live(spec.port, LiveCmd::Mark(name));
                        }
                    }
                    Ok(Incoming::Clear) => {
                        if spec.bidirectional {
                            media.live(spec.port, LiveCmd::Clear);
                        }
                    }
                    Ok(Incoming::Other(event)) => {
                        debug!(stream_sid = %spec.stream_sid, %event, "stream message ignored");
                    }
                    Err(e) => {
                        let _ = socket.close(None).await;
                        break failed("stream.invalid_message", e.to_string());
                    }
                },
                Some(Ok(Message::Binary(_))) => {
                    let _ = socket.close(None).await;
                    break failed("stream.invalid_message", "binary messages are not part of the protocol");
                }
                Some(Ok(Message::Close(_))) | None => break ("closed", None),
                Some(Ok(_)) => {}
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
                    break failed("stream.message_too_large", e.to_string());
                }
                Some(Err(e)) => break failed("stream.closed", e.to_string()),
            },
        }
    }
}

async fn send_all(socket: &mut Socket, texts: [String; 2]) -> Result<(), String> {
    for t in texts {
        socket
            .feed(Message::text(t))
            .await
            .map_err(|e| e.to_string())?;
    }
    socket.flush().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> StreamSpec {
        StreamSpec {
            stream_sid: "MZ1".into(),
            workspace_id: "ws".into(),
            call_id: "call".into(),
            url: url.into(),
            track: StreamTrack::Inbound,
            bidirectional: true,
            custom_parameters: Vec::new(),
            format: MediaFormat::Mulaw,
            port: 0,
        }
    }

    fn reason(r: Result<Socket, (&'static str, Option<String>)>) -> &'static str {
        match r {
            Ok(_) => "connected",
            Err((reason, _)) => reason,
        }
    }

    #[tokio::test]
    async fn production_rules_are_kept_before_anything_is_dialled() {
        let production = StreamSettings {
            require_tls: true,
            policy: AddressPolicy {
                refuse_internal: true,
                allow: Vec::new(),
            },
            tls: None,
        };
        assert_eq!(
            reason(connect(&production, &spec("ws://127.0.0.1:9/")).await),
            "stream.insecure_url"
        );
        assert_eq!(
            reason(connect(&production, &spec("wss://127.0.0.1:9/")).await),
            "stream.forbidden"
        );
        // An operator's allowed range is reachable again (and then refused by the closed port).
        let allowed = StreamSettings {
            policy: AddressPolicy {
                refuse_internal: true,
                allow: vec!["127.0.0.0/8".parse().unwrap()],
            },
            ..StreamSettings::default()
        };
        assert_eq!(
            reason(connect(&allowed, &spec("ws://127.0.0.1:9/")).await),
            "stream.unreachable"
        );
    }
}
