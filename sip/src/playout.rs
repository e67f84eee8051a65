//! An agent's audio waiting to be played to the caller (a bidirectional media stream): chunks of
//! any size in, exact 20 ms frames out, so uneven chunks never make choppy audio; marks that are
//! echoed only once everything queued before them has been played; and `clear`, which drops the
//! queue at once and reports the marks it dropped (so an agent can tell played from cleared on
//! barge-in).
//!
//! Positions are counted in samples since the queue began: a mark is due once the samples played
//! reach the samples queued when it came.

use std::collections::VecDeque;

/// What became of a mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkEcho {
    /// Everything queued before it has been played.
    Played(String),
    /// It was dropped by `clear` before its audio had played.
    Cleared(String),
}

#[derive(Debug)]
pub struct PlayoutQueue {
    samples: VecDeque<i16>,
    /// Samples ever queued and ever played (or dropped by `clear`).
    queued: u64,
    played: u64,
    marks: VecDeque<(u64, String)>,
    /// Most samples held at once; more are dropped (and counted).
    capacity: usize,
    /// A partial frame waited one frame for the rest of its samples.
    tail_waited: bool,
    /// Samples refused because the queue was full.
    pub dropped_samples: u64,
}

impl PlayoutQueue {
    pub fn new(capacity_samples: usize) -> Self {
        PlayoutQueue {
            samples: VecDeque::new(),
            queued: 0,
            played: 0,
            marks: VecDeque::new(),
            capacity: capacity_samples,
            tail_waited: false,
            dropped_samples: 0,
        }
    }

    /// Samples waiting.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Queue audio; what does not fit is dropped and counted. Returns the samples taken.
    pub fn push(&mut self, audio: &[i16]) -> usize {
        let room = self.capacity.saturating_sub(self.samples.len());
        let take = audio.len().min(room);
        self.samples.extend(&audio[..take]);
        self.queued += take as u64;
        self.dropped_samples += (audio.len() - take) as u64;
        take
    }

    /// A mark after what is queued now; echoed at once when nothing is left to play.
    pub fn mark(&mut self, name: String) -> Option<MarkEcho> {
        if self.played >= self.queued {
            return Some(MarkEcho::Played(name));
        }
        self.marks.push_back((self.queued, name));
        None
    }

    /// Drop everything queued; the marks waiting for it are reported cleared.
    pub fn clear(&mut self) -> Vec<MarkEcho> {
        self.samples.clear();
        self.played = self.queued;
        self.tail_waited = false;
        self.marks
            .drain(..)
            .map(|(_, name)| MarkEcho::Cleared(name))
            .collect()
    }

    /// The next frame of `frame` samples into `out` (cleared first; padded with silence when the
    /// queue ends inside it). False when there is nothing to play now: the queue is empty, or it
    /// holds less than a frame that is given one frame's time for the rest to arrive. The marks
    /// this frame completes are appended to `echoes`.
    pub fn next_frame(
        &mut self,
        frame: usize,
        out: &mut Vec<i16>,
        echoes: &mut Vec<MarkEcho>,
    ) -> bool {
        out.clear();
        if self.samples.is_empty() {
            self.tail_waited = false;
            return false;
        }
        if self.samples.len() < frame && !self.tail_waited {
            self.tail_waited = true;
            return false;
        }
        self.tail_waited = false;
        let n = frame.min(self.samples.len());
        out.extend(self.samples.drain(..n));
        out.resize(frame, 0);
        self.played += n as u64;
        while let Some((at, _)) = self.marks.front() {
            if *at > self.played {
                break;
            }
            if let Some((_, name)) = self.marks.pop_front() {
                echoes.push(MarkEcho::Played(name));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: usize = 160;

    fn frames(q: &mut PlayoutQueue, n: usize) -> (usize, Vec<MarkEcho>) {
        let (mut played, mut echoes, mut out) = (0, Vec::new(), Vec::new());
        for _ in 0..n {
            if q.next_frame(FRAME, &mut out, &mut echoes) {
                assert_eq!(out.len(), FRAME);
                played += 1;
            }
        }
        (played, echoes)
    }

    #[test]
    fn uneven_chunks_come_out_as_whole_frames_in_order() {
        let mut q = PlayoutQueue::new(480_000);
        let audio: Vec<i16> = (0..800).map(|i| i as i16).collect();
        for chunk in audio.chunks(37) {
            q.push(chunk);
        }
        let mut out = Vec::new();
        let mut echoes = Vec::new();
        let mut heard = Vec::new();
        for _ in 0..5 {
            assert!(q.next_frame(FRAME, &mut out, &mut echoes));
            heard.extend_from_slice(&out);
        }
        assert_eq!(heard, audio);
        assert!(!q.next_frame(FRAME, &mut out, &mut echoes));
    }

    #[test]
    fn a_short_tail_waits_one_frame_for_the_rest() {
        let mut q = PlayoutQueue::new(480_000);
        q.push(&[7; 100]);
        let (mut out, mut echoes) = (Vec::new(), Vec::new());
        assert!(!q.next_frame(FRAME, &mut out, &mut echoes), "held a frame");
        q.push(&[8; 60]);
        assert!(q.next_frame(FRAME, &mut out, &mut echoes));
        assert_eq!(&out[..100], &[7; 100]);
        assert_eq!(&out[100..], &[8; 60]);
        // A tail nothing completes is played, padded, after one frame's wait.
        q.push(&[9; 10]);
        assert!(!q.next_frame(FRAME, &mut out, &mut echoes));
        assert!(q.next_frame(FRAME, &mut out, &mut echoes));
        assert_eq!(&out[..10], &[9; 10]);
        assert!(out[10..].iter().all(|&s| s == 0));
    }

    #[test]
    fn a_mark_is_echoed_when_the_audio_before_it_has_played() {
        let mut q = PlayoutQueue::new(480_000);
        q.push(&vec![1; 3 * 8000]);
        assert_eq!(q.mark("three-seconds".into()), None);
        let (played, echoes) = frames(&mut q, 149);
        assert_eq!(played, 149);
        assert!(echoes.is_empty(), "not before the last frame");
        let (_, echoes) = frames(&mut q, 1);
        assert_eq!(echoes, [MarkEcho::Played("three-seconds".into())]);
        // Nothing queued: echoed at once.
        assert_eq!(q.mark("now".into()), Some(MarkEcho::Played("now".into())));
    }

    #[test]
    fn clear_drops_the_queue_and_reports_its_marks() {
        let mut q = PlayoutQueue::new(480_000);
        q.push(&vec![1; 8000]);
        q.mark("a".into());
        q.push(&vec![1; 8000]);
        q.mark("b".into());
        let (_, echoes) = frames(&mut q, 60);
        assert_eq!(echoes, [MarkEcho::Played("a".into())]);
        assert_eq!(q.clear(), [MarkEcho::Cleared("b".into())]);
        assert!(q.is_empty());
        let (played, _) = frames(&mut q, 1);
        assert_eq!(played, 0, "silence the very next frame");
        // Audio after a clear plays, and its marks count from the clear.
        q.push(&[2; 160]);
        assert_eq!(q.mark("c".into()), None);
        let (played, echoes) = frames(&mut q, 1);
        assert_eq!((played, echoes), (1, vec![MarkEcho::Played("c".into())]));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut q = PlayoutQueue::new(1000);
        assert_eq!(q.push(&[0; 800]), 800);
        assert_eq!(q.push(&[0; 800]), 200);
        assert_eq!(q.dropped_samples, 600);
        assert_eq!(q.len(), 1000);
    }
}
