//! Which new calls the engine takes on, judged by how long the engine itself takes to set calls
//! up (RFC 3261 §21.5.4: `503` with `Retry-After` sends a carrier elsewhere or later).
//!
//! An engine that keeps accepting calls it cannot serve makes every call slow until all of them
//! time out: answered calls stay up, send media and wait for their BYE, and the backlog feeds
//! itself. A fixed count of calls in setup is a poor signal: the right count depends on the
//! machine, the database and the mix of scripts. Setup latency is the signal. As in CoDel, the
//! minimum over a short window tells a standing queue from a burst or one slow call: when even
//! the fastest setup of a window took longer than the target, every call is waiting on the
//! engine. The share of new INVITEs admitted then falls multiplicatively and climbs back
//! additively once setups are fast again (AIMD), so the engine runs at what it can serve with a
//! short queue, and the excess is refused at once rather than served late.
//!
//! The engine's share of a setup is its time from INVITE to final response less the time spent
//! waiting on the customer's voice callback; setups that waited on a ringing party are not
//! samples. The fixed caps stay as a backstop for an engine so stuck that no setup finishes.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Settings of admission control.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    /// The engine's share of a setup that counts as fast.
    pub target: Duration,
    /// Calls between their INVITE and its final response, at most (the backstop).
    pub max_setups: usize,
    /// Live calls in all, at most.
    pub max_calls: usize,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            target: Duration::from_millis(20),
            max_setups: 1_000,
            max_calls: 10_000,
        }
    }
}

/// How long one window of setup samples lasts.
const WINDOW: Duration = Duration::from_millis(25);
/// A window with fewer samples says nothing about a queue (one slow call at low load).
const MIN_SAMPLES: u32 = 4;
/// After a slow window the admitted share is multiplied by (target / its fastest setup) to
/// this power, a gentler cut than in proportion: the samples lag the queue by its own delay,
/// so a full cut overshoots into an idle engine. The factor stays within these bounds.
const POWER: f64 = 0.5;
const DECREASE: f64 = 0.5;
const DECREASE_LEAST: f64 = 0.95;
/// After a fast window (its fastest setup under half the target) the share is raised by this;
/// between half the target and the target it holds.
const INCREASE: f64 = 0.01;
/// Never admit less than this share, so that fast setups can still be seen.
const MIN_SHARE: f64 = 0.05;

/// Why an INVITE was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Setups are slow: the engine is behind.
    SlowSetups,
    /// `max_setups` calls are in setup.
    TooManySetups,
    /// `max_calls` calls are live.
    TooManyCalls,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::SlowSetups => "slow_setups",
            Refusal::TooManySetups => "too_many_setups",
            Refusal::TooManyCalls => "too_many_calls",
        }
    }
}

/// Admits a share of the INVITEs it is asked about, evenly spread: each ask adds the share,
/// each admission takes 1 (so it stays below 1, and a share of 1 admits every one).
#[derive(Debug, Default)]
pub struct Credit(f64);

impl Credit {
    pub fn admit(&mut self, share: f64) -> bool {
        self.0 += share;
        if self.0 >= 1.0 - f64::EPSILON {
            self.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The endpoint's admission as its UDP receive task sees it, so that a new INVITE from a
/// carrier is refused there, statelessly, instead of queueing in the endpoint's mailbox behind
/// the calls it serves: a refusal must be quick and cheap, or refusing becomes the overload.
/// The endpoint publishes after each message it handles; the task only reads.
#[derive(Debug)]
pub struct AdmissionGate {
    share: AtomicU64,
    closed: AtomicU8,
    /// INVITEs the task refused since the endpoint last reported them.
    refused: AtomicU64,
}

/// Why every new INVITE is refused, when one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// A hard cap is reached.
    Full(Refusal),
    /// The database is known to be unreachable.
    StorageDown,
}

impl Default for AdmissionGate {
    fn default() -> Self {
        AdmissionGate {
            share: AtomicU64::new(1.0f64.to_bits()),
            closed: AtomicU8::new(0),
            refused: AtomicU64::new(0),
        }
    }
}

impl AdmissionGate {
    pub fn publish(&self, share: f64, closed: Option<Closed>) {
        self.share.store(share.to_bits(), Ordering::Relaxed);
        let code = match closed {
            None => 0,
            // Published only for a cap; a slow share is the share itself, not a closure.
            Some(Closed::Full(Refusal::SlowSetups)) => 0,
            Some(Closed::Full(Refusal::TooManySetups)) => 1,
            Some(Closed::Full(Refusal::TooManyCalls)) => 2,
            Some(Closed::StorageDown) => 3,
        };
        self.closed.store(code, Ordering::Relaxed);
    }

    /// Whether the next new INVITE is taken on, by `credit` over the published share.
    pub fn admit(&self, credit: &mut Credit) -> Result<(), Closed> {
        match self.closed.load(Ordering::Relaxed) {
            0 if credit.admit(f64::from_bits(self.share.load(Ordering::Relaxed))) => Ok(()),
            0 => Err(Closed::Full(Refusal::SlowSetups)),
            1 => Err(Closed::Full(Refusal::TooManySetups)),
            2 => Err(Closed::Full(Refusal::TooManyCalls)),
            _ => Err(Closed::StorageDown),
        }
    }

    /// The task answered an INVITE `503`.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// How many the task refused since the last call.
    pub fn take_refused(&self) -> u64 {
        self.refused.swap(0, Ordering::Relaxed)
    }
}

impl Closed {
    pub fn name(self) -> &'static str {
        match self {
            Closed::Full(r) => r.name(),
            Closed::StorageDown => "storage_down",
        }
    }

    /// `Retry-After` seconds for the `503`.
    pub fn retry_after(self) -> &'static str {
        match self {
            Closed::Full(_) => "1",
            Closed::StorageDown => "5",
        }
    }
}

/// How long a verdict on a new INVITE is remembered: at least Timer B (64·T1), after which its
/// sender has given up retransmitting it.
const REMEMBER: Duration = Duration::from_secs(32);

/// The receive thread's verdicts on the new INVITEs of the last 32 to 64 s, by transaction, so
/// that a retransmission gets its original's verdict rather than a fresh one: the
/// retransmission of an admitted INVITE goes on to its transaction (not a `503` while the
/// original is answered `200`), and that of a refused one is refused again without using up
/// a place. Two generations swapped every [`REMEMBER`]: no timer per entry.
#[derive(Debug)]
pub struct RecentVerdicts {
    hasher: std::hash::RandomState,
    current: std::collections::HashMap<u64, Option<Closed>>,
    previous: std::collections::HashMap<u64, Option<Closed>>,
    swapped: Instant,
}

impl RecentVerdicts {
    pub fn new(now: Instant) -> Self {
        RecentVerdicts {
            hasher: std::hash::RandomState::new(),
            current: Default::default(),
            previous: Default::default(),
            swapped: now,
        }
    }

    /// The verdict on the INVITE known by `identity` (its Call-ID, CSeq and top Via): the one
    /// given before if it was seen in the last 32 s, else `decide()`'s, remembered. The flag
    /// says whether it was decided now.
    pub fn judge(
        &mut self,
        identity: &[&[u8]],
        now: Instant,
        decide: impl FnOnce() -> Result<(), Closed>,
    ) -> (Result<(), Closed>, bool) {
        let since = now.saturating_duration_since(self.swapped);
        if since >= REMEMBER {
            if since >= 2 * REMEMBER {
                self.previous.clear();
            } else {
                std::mem::swap(&mut self.previous, &mut self.current);
            }
            self.current.clear();
            self.swapped = now;
        }
        let key = std::hash::BuildHasher::hash_one(&self.hasher, identity);
        if let Some(seen) = self.current.get(&key).or_else(|| self.previous.get(&key)) {
            return (seen.map_or(Ok(()), Err), false);
        }
        let verdict = decide();
        self.current.insert(key, verdict.err());
        (verdict, true)
    }
}

/// The admission state machine: fed setup samples and asked about new INVITEs, both with `now`.
#[derive(Debug)]
pub struct AdmissionControl {
    limits: Admission,
    window_start: Instant,
    window_min: Option<Duration>,
    window_samples: u32,
    /// The share of new INVITEs admitted, in `[MIN_SHARE, 1]`.
    share: f64,
    credit: Credit,
}

impl AdmissionControl {
    pub fn new(limits: Admission, now: Instant) -> Self {
        AdmissionControl {
            limits,
            window_start: now,
            window_min: None,
            window_samples: 0,
            share: 1.0,
            credit: Credit::default(),
        }
    }

    /// A setup ended with a final response; `engine` is the engine's share of it.
    pub fn setup_finished(&mut self, engine: Duration, now: Instant) {
        self.roll(now);
        self.window_min = Some(self.window_min.map_or(engine, |m| m.min(engine)));
        self.window_samples += 1;
    }

    /// Whether a new INVITE is taken on, with `setting_up` calls in setup and `live` in all.
    pub fn admit(&mut self, setting_up: usize, live: usize, now: Instant) -> Result<(), Refusal> {
        self.caps(setting_up, live)?;
        self.roll(now);
        if self.credit.admit(self.share) {
            Ok(())
        } else {
            Err(Refusal::SlowSetups)
        }
    }

    /// The hard caps alone: for an INVITE whose share was judged already (by the gate).
    pub fn caps(&self, setting_up: usize, live: usize) -> Result<(), Refusal> {
        if live >= self.limits.max_calls {
            return Err(Refusal::TooManyCalls);
        }
        if setting_up >= self.limits.max_setups {
            return Err(Refusal::TooManySetups);
        }
        Ok(())
    }

    /// Time passes: windows that have ended are closed even when nothing else happens.
    pub fn tick(&mut self, now: Instant) {
        self.roll(now);
    }

    /// The share of new INVITEs being admitted now.
    pub fn share(&self) -> f64 {
        self.share
    }

    /// Close the windows that have ended by `now`, adjusting the share.
    fn roll(&mut self, now: Instant) {
        let Some(since) = now.checked_duration_since(self.window_start) else {
            return;
        };
        if since < WINDOW {
            return;
        }
        let target = self.limits.target.as_secs_f64();
        let fastest = match self.window_min {
            Some(m) if self.window_samples >= MIN_SAMPLES => m.as_secs_f64(),
            // Too few setups to tell: as fast as can be.
            _ => 0.0,
        };
        if fastest > target {
            let factor = (target / fastest)
                .powf(POWER)
                .clamp(DECREASE, DECREASE_LEAST);
            self.share = (self.share * factor).max(MIN_SHARE);
        } else if fastest < target / 2.0 {
            // Windows that passed with nothing in them count as fast ones.
            let windows = (since.as_nanos() / WINDOW.as_nanos()).max(1) as f64;
            self.share = (self.share + INCREASE * windows).min(1.0);
        }
        self.window_start = now;
        self.window_min = None;
        self.window_samples = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn control(t0: Instant) -> AdmissionControl {
        AdmissionControl::new(Admission::default(), t0)
    }

    /// Offer `offered` INVITEs per second to an engine that sets up `capacity` per second with
    /// `service` each when idle; each admitted call queues behind those still in setup. Returns
    /// (admitted, refused, p99 of the admitted calls' setups).
    fn simulate(offered: u32, capacity: u32, seconds: u32) -> (u32, u32, Duration) {
        let t0 = Instant::now();
        let mut c = control(t0);
        let step = Duration::from_secs(1) / offered;
        let per_call = Duration::from_secs(1) / capacity;
        let service = 5 * MS;
        // The engine works through admitted calls one after another.
        let mut busy_until = t0;
        let mut finishing: std::collections::VecDeque<(Instant, Duration)> = Default::default();
        let (mut admitted, mut refused) = (0, 0);
        let mut delays = Vec::new();
        for i in 0..offered * seconds {
            let now = t0 + step * i;
            while let Some(&(at, took)) = finishing.front() {
                if at > now {
                    break;
                }
                finishing.pop_front();
                c.setup_finished(took, at);
            }
            match c.admit(finishing.len(), 0, now) {
                Ok(()) => {
                    admitted += 1;
                    busy_until = busy_until.max(now) + per_call;
                    let done = busy_until + service;
                    finishing.push_back((done, done - now));
                    delays.push(done - now);
                }
                Err(_) => refused += 1,
            }
        }
        delays.sort();
        let p99 = delays
            .get(delays.len() * 99 / 100)
            .copied()
            .unwrap_or_default();
        (admitted, refused, p99)
    }

    #[test]
    fn a_retransmission_gets_its_originals_verdict_for_32_seconds() {
        let t0 = Instant::now();
        let mut recent = RecentVerdicts::new(t0);
        let admitted: [&[u8]; 3] = [b"a@x", b"1 INVITE", b"SIP/2.0/UDP h;branch=z9hG4bK1"];
        let refused: [&[u8]; 3] = [b"b@x", b"1 INVITE", b"SIP/2.0/UDP h;branch=z9hG4bK2"];
        let full = Err(Closed::Full(Refusal::SlowSetups));
        assert_eq!(recent.judge(&admitted, t0, || Ok(())), (Ok(()), true));
        assert_eq!(recent.judge(&refused, t0, || full), (full, true));
        // Retransmissions (Timer A doubling up to Timer B) are not judged again, whatever the
        // gate says now.
        for at in [500, 1_500, 3_500, 7_500, 15_500, 31_500, 40_000] {
            let now = t0 + at * MS;
            assert_eq!(
                recent.judge(&admitted, now, || full),
                (Ok(()), false),
                "{at}"
            );
            assert_eq!(
                recent.judge(&refused, now, || Ok(())),
                (full, false),
                "{at}"
            );
        }
        // Another transaction of the same call is a new INVITE.
        let other: [&[u8]; 3] = [b"a@x", b"1 INVITE", b"SIP/2.0/UDP h;branch=z9hG4bK3"];
        assert_eq!(
            recent.judge(&other, t0 + 40 * 1_000 * MS, || full),
            (full, true)
        );
        // Forgotten once two swaps have passed without it.
        let later = t0 + 100 * 1_000 * MS;
        assert_eq!(recent.judge(&admitted, later, || full), (full, true));
    }

    #[test]
    fn under_capacity_everything_is_admitted() {
        let (admitted, refused, p99) = simulate(500, 1_000, 5);
        assert_eq!((admitted, refused), (2_500, 0));
        assert!(p99 < 20 * MS, "{p99:?}");
    }

    #[test]
    fn at_twice_capacity_goodput_stays_near_capacity_and_setups_stay_fast() {
        let (admitted, refused, p99) = simulate(2_000, 1_000, 30);
        // Goodput at least 90 % of what the engine can do.
        assert!(admitted >= 27_000, "admitted {admitted}");
        assert!(admitted <= 30_100, "admitted {admitted}");
        assert_eq!(admitted + refused, 60_000);
        assert!(p99 <= 100 * MS, "admitted setups' p99 {p99:?}");
    }

    #[test]
    fn one_slow_setup_at_low_load_refuses_nobody() {
        let t0 = Instant::now();
        let mut c = control(t0);
        c.setup_finished(Duration::from_secs(5), t0 + MS);
        for i in 1..50u32 {
            assert_eq!(c.admit(1, 1, t0 + 50 * MS * i), Ok(()));
        }
    }

    #[test]
    fn a_standing_queue_lowers_the_share_and_fast_setups_restore_it() {
        let t0 = Instant::now();
        let mut c = control(t0);
        for i in 0..10u32 {
            c.setup_finished(40 * MS, t0 + MS * i);
        }
        // The window closes at the next event after it: that INVITE is refused, the share cut
        // by √(20 / 40).
        let later = t0 + WINDOW + MS;
        assert_eq!(c.admit(10, 10, later), Err(Refusal::SlowSetups));
        assert!((c.share() - 0.5f64.sqrt()).abs() < 1e-9, "{}", c.share());
        // Setups at the target hold it.
        for i in 0..5u32 {
            c.setup_finished(15 * MS, later + MS * i);
        }
        let _ = c.admit(0, 0, later + WINDOW + MS);
        assert!((c.share() - 0.5f64.sqrt()).abs() < 1e-9, "{}", c.share());
        // Fast ones restore it.
        let later = later + WINDOW + MS;
        let windows = (1.0 / INCREASE) as u32;
        for w in 0..windows {
            for i in 0..5u32 {
                c.setup_finished(3 * MS, later + WINDOW * w + MS * i);
            }
        }
        let _ = c.admit(0, 0, later + WINDOW * windows + MS);
        assert_eq!(c.share(), 1.0);
    }

    #[test]
    fn an_idle_spell_counts_as_fast_windows() {
        let t0 = Instant::now();
        let mut c = control(t0);
        for round in 0..20u32 {
            let at = t0 + WINDOW * round;
            for i in 0..5u32 {
                c.setup_finished(50 * MS, at + MS * i);
            }
        }
        let _ = c.admit(0, 0, t0 + WINDOW * 20 + MS);
        assert_eq!(c.share(), MIN_SHARE);
        // A spell of windows with no setups at all: the share is back to 1.
        let _ = c.admit(0, 0, t0 + WINDOW * (21 + (1.0 / INCREASE) as u32) + MS);
        assert_eq!(c.share(), 1.0);
    }

    #[test]
    fn the_gate_admits_the_published_share_and_nothing_when_closed() {
        let gate = AdmissionGate::default();
        let mut credit = Credit::default();
        assert!((0..10).all(|_| gate.admit(&mut credit).is_ok()));
        gate.publish(0.25, None);
        let admitted = (0..100).filter(|_| gate.admit(&mut credit).is_ok()).count();
        assert_eq!(admitted, 25);
        gate.publish(1.0, Some(Closed::StorageDown));
        assert_eq!(gate.admit(&mut credit), Err(Closed::StorageDown));
        gate.publish(1.0, Some(Closed::Full(Refusal::TooManyCalls)));
        assert_eq!(
            gate.admit(&mut credit),
            Err(Closed::Full(Refusal::TooManyCalls))
        );
        gate.refused();
        gate.refused();
        assert_eq!(gate.take_refused(), 2);
        assert_eq!(gate.take_refused(), 0);
    }

    #[test]
    fn the_caps_hold_whatever_the_share() {
        let t0 = Instant::now();
        let mut c = AdmissionControl::new(
            Admission {
                max_setups: 2,
                max_calls: 5,
                ..Admission::default()
            },
            t0,
        );
        assert_eq!(c.admit(2, 2, t0), Err(Refusal::TooManySetups));
        assert_eq!(c.admit(0, 5, t0), Err(Refusal::TooManyCalls));
        assert_eq!(c.admit(1, 4, t0), Ok(()));
    }
}
