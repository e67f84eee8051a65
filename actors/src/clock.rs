//! Time as an input, so actors and money rules are testable without waiting.

use chrono::{DateTime, SubsecRound, Utc};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// Wall-clock time, truncated to whole microseconds so that what we store round-trips exactly.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now().trunc_subsecs(6)
    }
}

/// Wall-clock time moved to start at a given instant (dev mode's `SAUTIKIT_DEV_CLOCK_START`): the
/// engine lives "on Jan 31" while seconds still pass at their real pace.
#[derive(Debug, Clone, Copy)]
pub struct ShiftedClock {
    offset: chrono::TimeDelta,
}

impl ShiftedClock {
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        ShiftedClock {
            offset: start - SystemClock.now(),
        }
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> DateTime<Utc> {
        (SystemClock.now() + self.offset).trunc_subsecs(6)
    }
}
