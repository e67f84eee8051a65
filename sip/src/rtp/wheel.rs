//! Real-time pacing of many media streams from one scheduler, without drift and without bursts.
//!
//! The 20 ms frame period is cut into slots (1 ms each by default). Every stream is given one
//! slot, its phase, for its whole life: it sends when the wheel reaches that slot, once per
//! period. Streams are spread over the slots evenly, so 2,000 calls cost a few hundred µs of work
//! every millisecond instead of one 10 ms burst every 20 ms, during which the calls served last
//! would be 10 ms late and any preemption would delay all of them.
//!
//! Deadlines are exact multiples of the slot length from a fixed start, never from the (late)
//! moment the driver woke, so the RTP clock does not drift.

use std::time::{Duration, Instant};

/// Ticks `[first, first + count)` fell due at the last [`FrameWheel::handle_timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueTicks {
    pub first: u64,
    pub count: u64,
}

#[derive(Debug, Clone)]
pub struct FrameWheel<K> {
    start: Instant,
    slot: Duration,
    /// The first tick not yet handled.
    next_tick: u64,
    buckets: Vec<Vec<K>>,
    len: usize,
}

impl<K: PartialEq + Copy> FrameWheel<K> {
    /// A wheel whose period (`slot × slots`) starts at `start`.
    pub fn new(start: Instant, slot: Duration, slots: usize) -> Self {
        Self {
            start,
            // A zero slot would make every tick due at once; one microsecond is the floor.
            slot: slot.max(Duration::from_micros(1)),
            next_tick: 0,
            buckets: (0..slots.max(1)).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Add a stream to the least loaded slot, which it keeps; returns the slot. Its first frame
    /// is due when the wheel next reaches that slot (within one period).
    pub fn insert(&mut self, key: K, now: Instant) -> usize {
        if self.len == 0 {
            // An idle wheel was not ticking: start from now rather than "catching up" the idle
            // time as if it were late.
            self.next_tick = self.tick_at(now);
        }
        let slot = self
            .buckets
            .iter()
            .enumerate()
            .min_by_key(|(_, b)| b.len())
            .map_or(0, |(i, _)| i);
        self.buckets[slot].push(key);
        self.len += 1;
        slot
    }

    /// Remove a stream from its slot. Returns whether it was there.
    pub fn remove(&mut self, key: K, slot: usize) -> bool {
        let Some(bucket) = self.buckets.get_mut(slot) else {
            return false;
        };
        match bucket.iter().position(|k| *k == key) {
            Some(i) => {
                bucket.swap_remove(i);
                self.len -= 1;
                true
            }
            None => false,
        }
    }

    /// The streams in a slot.
    pub fn bucket(&self, slot: usize) -> &[K] {
        self.buckets.get(slot).map_or(&[], Vec::as_slice)
    }

    /// When the next tick with a stream in its slot is due; `None` when there are no streams.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        let n = self.buckets.len() as u64;
        (self.next_tick..self.next_tick + n)
            .find(|t| !self.buckets[(t % n) as usize].is_empty())
            .map(|t| self.deadline(t))
    }

    /// The ticks due at `now` (none if woken early). After a late wake several are due; the
    /// schedule stays on its original grid.
    pub fn handle_timeout(&mut self, now: Instant) -> DueTicks {
        let first = self.next_tick;
        if now < self.deadline(first) {
            return DueTicks { first, count: 0 };
        }
        let last = self.tick_at(now);
        self.next_tick = last + 1;
        DueTicks {
            first,
            count: last + 1 - first,
        }
    }

    /// For each slot with something due, in the order its ticks fell due: the slot and how many
    /// frames each of its streams owes.
    pub fn due_slots(&self, due: DueTicks) -> impl Iterator<Item = (usize, u32)> + use<K> {
        let n = self.buckets.len() as u64;
        let whole = due.count / n;
        let extra = due.count % n;
        let touched = due.count.min(n);
        (0..touched).map(move |i| {
            let slot = ((due.first + i) % n) as usize;
            let frames = whole + u64::from(i < extra);
            (slot, u32::try_from(frames).unwrap_or(u32::MAX))
        })
    }

    fn deadline(&self, tick: u64) -> Instant {
        let nanos = self.slot.as_nanos().saturating_mul(u128::from(tick));
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The last tick whose deadline is at or before `now`.
    fn tick_at(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.start).as_nanos();
        u64::try_from(since / self.slot.as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn wheel(t0: Instant) -> FrameWheel<u32> {
        FrameWheel::new(t0, ms(1), 20)
    }

    #[test]
    fn streams_spread_evenly_and_keep_their_slot() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        let slots: Vec<usize> = (0..60).map(|k| w.insert(k, t0)).collect();
        for s in 0..20 {
            assert_eq!(w.bucket(s).len(), 3, "slot {s}");
        }
        assert!(w.remove(7, slots[7]));
        assert!(!w.remove(7, slots[7]));
        assert_eq!(w.len(), 59);
        // The freed slot is the least loaded: the next stream goes there.
        assert_eq!(w.insert(100, t0), slots[7]);
    }

    #[test]
    fn each_slot_is_due_once_per_period_on_its_own_grid() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        w.insert(1, t0); // slot 0
        w.insert(2, t0); // slot 1
        assert_eq!(w.poll_timeout(), Some(t0));
        let due = w.handle_timeout(t0);
        assert_eq!(due, DueTicks { first: 0, count: 1 });
        assert_eq!(w.due_slots(due).collect::<Vec<_>>(), vec![(0, 1)]);
        assert_eq!(w.poll_timeout(), Some(t0 + ms(1)));
        // Woken early: nothing.
        assert_eq!(w.handle_timeout(t0 + Duration::from_micros(900)).count, 0);
        // Woken 300 µs late for slot 1: slot 1 once; the next is slot 0 of the next period,
        // still at 20 ms (the empty slots in between are skipped).
        let due = w.handle_timeout(t0 + Duration::from_micros(1300));
        assert_eq!(w.due_slots(due).collect::<Vec<_>>(), vec![(1, 1)]);
        assert_eq!(w.poll_timeout(), Some(t0 + ms(20)));
        let due = w.handle_timeout(t0 + ms(20));
        assert_eq!(
            w.due_slots(due)
                .filter(|(s, _)| !w.bucket(*s).is_empty())
                .collect::<Vec<_>>(),
            vec![(0, 1)]
        );
    }

    #[test]
    fn a_late_wake_owes_each_stream_the_frames_that_fell_due() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        for k in 0..20 {
            w.insert(k, t0);
        }
        assert_eq!(w.handle_timeout(t0).count, 1);
        // 65 ms late: ticks 1..=65 are due; slots 1..=5 owe 4 frames, the others 3.
        let due = w.handle_timeout(t0 + ms(65));
        assert_eq!(
            due,
            DueTicks {
                first: 1,
                count: 65
            }
        );
        let owed: Vec<(usize, u32)> = w.due_slots(due).collect();
        assert_eq!(owed.len(), 20);
        assert_eq!(owed[0], (1, 4));
        assert_eq!(owed[4], (5, 4));
        assert_eq!(owed[5], (6, 3));
        assert_eq!(owed[19], (0, 3));
        assert_eq!(owed.iter().map(|(_, f)| u64::from(*f)).sum::<u64>(), 65);
        assert_eq!(w.poll_timeout(), Some(t0 + ms(66)));
    }

    #[test]
    fn an_idle_wheel_restarts_from_now_without_catching_up() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        assert_eq!(w.poll_timeout(), None);
        let later = t0 + Duration::from_secs(3600) + Duration::from_micros(500);
        let slot = w.insert(9, later);
        let next = w.poll_timeout().expect("a stream is due");
        assert!(next >= later - ms(1) && next < later + ms(20), "{next:?}");
        let due = w.handle_timeout(next);
        assert_eq!(due.count, 1);
        assert_eq!(w.due_slots(due).collect::<Vec<_>>(), vec![(slot, 1)]);
    }
}
