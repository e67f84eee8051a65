//! A stream's live audio for a WebSocket media stream (the `stream` verb): taps that copy each
//! 20 ms of what the caller says (inbound) and hears (outbound) to the stream's session, as µ-law,
//! without ever blocking the media thread; and the agent's audio, queued and played to the caller
//! by the pacer in exact frames (`sautikit_sip::playout`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sautikit_sip::playout::{MarkEcho, PlayoutQueue};
use sautikit_sip::rtp::g711;
use sautikit_sip::sdp::Codec;
use tokio::sync::mpsc;

/// Which side of the call a tapped frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapTrack {
    /// What the caller says.
    Inbound,
    /// What the caller hears.
    Outbound,
}

/// One packet's audio, as µ-law, and when it was seen.
#[derive(Debug)]
pub struct TapFrame {
    pub track: TapTrack,
    pub ulaw: Vec<u8>,
    pub at: std::time::Instant,
}

/// Where a track's frames go. Bounded: a session that falls behind loses frames (counted), the
/// media thread never waits for it.
#[derive(Clone, Debug)]
pub struct Tap {
    tx: mpsc::Sender<TapFrame>,
    track: TapTrack,
    dropped: Arc<AtomicU64>,
}

impl Tap {
    pub fn new(tx: mpsc::Sender<TapFrame>, track: TapTrack, dropped: Arc<AtomicU64>) -> Self {
        Tap { tx, track, dropped }
    }

    /// Copy `payload` (G.711 in `codec`) to the session as µ-law.
    pub(super) fn send(&self, payload: &[u8], codec: Codec) {
        let ulaw = match g711::transcode_table(codec, Codec::Pcmu) {
            Some(map) => payload.iter().map(|&b| map[usize::from(b)]).collect(),
            None => payload.to_vec(),
        };
        let frame = TapFrame {
            track: self.track,
            ulaw,
            at: std::time::Instant::now(),
        };
        if self.tx.try_send(frame).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("sautikit_media_stream_frames_dropped_total").increment(1);
        }
    }
}

/// What a session asks of the stream's playout.
#[derive(Debug)]
pub enum LiveCmd {
    /// Play what comes next; marks are echoed to `echoes`.
    Start {
        echoes: mpsc::UnboundedSender<MarkEcho>,
    },
    Audio(Vec<i16>),
    Mark(String),
    Clear,
    Stop,
}

/// Most audio a session may have waiting: 60 s at 8 kHz.
pub const MAX_QUEUED_SAMPLES: usize = 60 * 8000;

/// The agent's audio on the media thread.
pub(super) struct Live {
    queue: PlayoutQueue,
    echoes: mpsc::UnboundedSender<MarkEcho>,
    pcm: Vec<i16>,
    done: Vec<MarkEcho>,
}

impl Live {
    pub(super) fn new(echoes: mpsc::UnboundedSender<MarkEcho>) -> Self {
        Live {
            queue: PlayoutQueue::new(MAX_QUEUED_SAMPLES),
            echoes,
            pcm: Vec::with_capacity(160),
            done: Vec::new(),
        }
    }

    pub(super) fn apply(&mut self, cmd: LiveCmd) {
        match cmd {
            LiveCmd::Audio(samples) => {
                self.queue.push(&samples);
            }
            LiveCmd::Mark(name) => {
                if let Some(echo) = self.queue.mark(name) {
                    let _ = self.echoes.send(echo);
                }
            }
            LiveCmd::Clear => {
                for echo in self.queue.clear() {
                    let _ = self.echoes.send(echo);
                }
            }
            LiveCmd::Start { .. } | LiveCmd::Stop => {}
        }
    }

    /// The next frame of the agent's audio encoded in `codec` into `payload`; false when there is
    /// none to play now (the pacer sends silence).
    pub(super) fn next_frame(
        &mut self,
        codec: Codec,
        samples: usize,
        payload: &mut Vec<u8>,
    ) -> bool {
        if !self
            .queue
            .next_frame(samples, &mut self.pcm, &mut self.done)
        {
            return false;
        }
        g711::encode_into(codec, &self.pcm, payload);
        for echo in self.done.drain(..) {
            let _ = self.echoes.send(echo);
        }
        true
    }

    /// Samples refused because the queue was full.
    pub(super) fn dropped_samples(&self) -> u64 {
        self.queue.dropped_samples
    }
}
