//! Real-time pacing of media frames without drift: deadlines advance by exact multiples of the
//! period from a fixed start, never from the (late) moment we were woken.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Pacer {
    next: Instant,
    period: Duration,
}

impl Pacer {
    /// The first frame is due at `start`.
    pub fn new(start: Instant, period: Duration) -> Self {
        Self {
            next: start,
            // A zero period would make every frame due at once; one nanosecond is the floor.
            period: period.max(Duration::from_nanos(1)),
        }
    }

    /// When the next frame is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next)
    }

    /// How many frames are due at `now` (0 if woken early). A late wake returns several, so the
    /// stream catches up and stays on its original schedule.
    pub fn handle_timeout(&mut self, now: Instant) -> u32 {
        if now < self.next {
            return 0;
        }
        let late = now.duration_since(self.next);
        let n = late.as_nanos() / self.period.as_nanos() + 1;
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.next += self.period.saturating_mul(n);
        n
    }

    /// Skip ahead to `now` without reporting the missed frames (after a long stall, a gap is
    /// better than a burst). The schedule stays on the original grid.
    pub fn resync(&mut self, now: Instant) {
        self.handle_timeout(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catches_up_without_drift() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pacer::new(t0, ms(20));
        assert_eq!(p.poll_timeout(), Some(t0));
        assert_eq!(p.handle_timeout(t0), 1);
        assert_eq!(p.poll_timeout(), Some(t0 + ms(20)));
        assert_eq!(p.handle_timeout(t0 + ms(19)), 0);
        // Woken 3 ms late: one frame, next deadline still on the 20 ms grid.
        assert_eq!(p.handle_timeout(t0 + ms(23)), 1);
        assert_eq!(p.poll_timeout(), Some(t0 + ms(40)));
        // Woken 65 ms late: frames at 40, 60, 80, 100 are due.
        assert_eq!(p.handle_timeout(t0 + ms(105)), 4);
        assert_eq!(p.poll_timeout(), Some(t0 + ms(120)));
    }
}
