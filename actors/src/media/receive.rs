//! A call's receiving side: what the caller sends on its RTP port. One task per call (receiving
//! cannot be batched like sending), idle but for packets: it wakes on a timer only while a
//! recording, a jitter buffer or a DTMF event needs it.
//!
//! It latches the stream to where the caller's packets actually come from (symmetric RTP, for
//! callers behind NAT), turns RFC 4733 telephone-events into digits, and writes recordings:
//! packets go through a jitter buffer (reordered, de-duplicated, gaps filled with silence) so the
//! WAV file keeps the caller's timing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sautikit_sip::dtmf::DtmfDetector;
use sautikit_sip::jitter::{Frame, JitterBuffer};
use sautikit_sip::rtp::{RtpHeader, g711};
use sautikit_sip::tone::SilenceDetector;
use sautikit_sip::wav::WavWriter;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{MediaCmd, MediaEvent, MediaEvents, MediaStats, StreamParams};

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
    Close,
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
    params: StreamParams,
    events: MediaEvents,
    stats: Arc<MediaStats>,
    latched: Option<SocketAddr>,
    /// Only when telephone-event was negotiated.
    dtmf: Option<DtmfDetector>,
    jitter: JitterBuffer,
    recorder: Option<Recorder>,
    pcm: Vec<i16>,
}

impl Receiver {
    pub(super) fn new(
        id: u64,
        socket: Arc<UdpSocket>,
        params: StreamParams,
        events: MediaEvents,
        stats: Arc<MediaStats>,
    ) -> Receiver {
        Receiver {
            id,
            socket,
            params,
            events,
            stats,
            latched: None,
            dtmf: params.telephone_event.map(|pt| DtmfDetector::new(pt, 8000)),
            jitter: JitterBuffer::new(8000, PLAYOUT_DELAY),
            recorder: None,
            pcm: Vec::with_capacity(160),
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
        next
    }

    async fn on_packet(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        engine: &mpsc::UnboundedSender<MediaCmd>,
    ) {
        self.stats.packets_received.fetch_add(1, Ordering::Relaxed);
        let Ok((header, payload)) = RtpHeader::parse(packet) else {
            return;
        };
        let pt = header.payload_type;
        let ours = pt == self.params.payload_type || Some(pt) == self.params.telephone_event;
        if !ours {
            return;
        }
        if self.latched != Some(from) {
            self.latched = Some(from);
            let _ = engine.send(MediaCmd::Latch {
                id: self.id,
                remote: from,
            });
        }
        let now = Instant::now();
        if Some(pt) == self.params.telephone_event {
            let digit = self
                .dtmf
                .as_mut()
                .and_then(|d| d.push(&header, payload, now.into_std()));
            if let Some(digit) = digit {
                self.digit(digit.key).await;
            }
        } else if self.recorder.is_some() {
            self.jitter.push(header, payload, now.into_std());
            self.drain(now).await;
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
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

pub(super) async fn run(
    mut r: Receiver,
    mut ctl: mpsc::UnboundedReceiver<RecvCmd>,
    engine: mpsc::UnboundedSender<MediaCmd>,
) {
    let mut buf = vec![0u8; 2048];
    let socket = r.socket.clone();
    loop {
        let deadline = r.next_deadline();
        tokio::select! {
            got = socket.recv_from(&mut buf) => match got {
                Ok((n, from)) => r.on_packet(&buf[..n], from, &engine).await,
                // ICMP errors from earlier sends surface here; nothing to do.
                Err(e) => debug!(stream = r.id, error = %e, "RTP receive error"),
            },
            cmd = ctl.recv() => match cmd {
                Some(RecvCmd::StartRecording(spec)) => r.start(spec).await,
                Some(RecvCmd::StopRecording(end, done)) => {
                    let outcome = r.finish(end).await;
                    if let Some(done) = done {
                        let _ = done.send(outcome);
                    }
                }
                Some(RecvCmd::Close) | None => {
                    let _ = r.finish(RecordingEnd::Hangup).await;
                    return;
                }
            },
            () = sleep_until(deadline) => r.on_timer().await,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
