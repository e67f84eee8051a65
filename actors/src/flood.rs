//! Per-source request-rate limits on the SIP listener, in the manner of Kamailio's pike: each
//! source address's INVITEs, REGISTERs and other requests are counted over a sliding second,
//! each class against its own limit (carriers in `SAUTIKIT_CARRIER_ALLOW` against a higher one).
//! Past its limit a source gets `503` with `Retry-After`; a source that goes on (a second `503`
//! within a minute, or twice its limit within a second) is banned: everything it sends is dropped
//! unanswered for the ban time, so a scanner or a flood costs us a hash lookup a datagram.
//! Carriers are never banned, only told to slow down.
//!
//! Sans-IO: [`FloodGuard::check`] takes the time and says what to do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The counting window.
const WINDOW: Duration = Duration::from_secs(1);
/// Sources remembered at most; past this, idle ones are forgotten at once.
const MAX_SOURCES: usize = 100_000;
/// How often idle sources are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// `503`s a source may get within [`REFUSAL_WINDOW`] before it is banned: a scanner told to slow
/// down that does not is not a device with a burst.
const REFUSALS_BEFORE_BAN: u32 = 2;
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// Requests a second per source, by class, and how long a ban lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodLimits {
    pub invite: u32,
    pub register: u32,
    pub other: u32,
    /// Each class, for a carrier.
    pub carrier: u32,
    pub ban: Duration,
}

impl Default for FloodLimits {
    fn default() -> Self {
        FloodLimits {
            invite: 20,
            register: 20,
            other: 50,
            carrier: 5_000,
            ban: Duration::from_secs(300),
        }
    }
}

/// What a request is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    Invite,
    Register,
    Other,
}

impl RequestClass {
    /// The class of a raw message by its first word; `None` for a response or an ACK (which is
    /// never answered and belongs to an INVITE already counted).
    pub fn of(bytes: &[u8]) -> Option<RequestClass> {
        let method = bytes.split(|&b| b == b' ').next()?;
        Some(match method {
            b"INVITE" => RequestClass::Invite,
            b"REGISTER" => RequestClass::Register,
            b"ACK" => return None,
            m if m.starts_with(b"SIP/") => return None,
            _ => RequestClass::Other,
        })
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            RequestClass::Invite => "invite",
            RequestClass::Register => "register",
            RequestClass::Other => "other",
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Answer `503` with this `Retry-After`.
    Refuse {
        retry_after: Duration,
    },
    /// Drop it unanswered.
    Drop,
    /// Drop it: this request got the source banned until `until`.
    Banned {
        until: Instant,
    },
}

struct Source {
    window_start: Instant,
    current: [u32; 3],
    previous: [u32; 3],
    banned_until: Option<Instant>,
    last_seen: Instant,
    /// `503`s since `first_refusal`.
    refusals: u32,
    first_refusal: Instant,
}

pub struct FloodGuard {
    limits: FloodLimits,
    sources: HashMap<IpAddr, Source>,
    last_prune: Instant,
    /// For [`FloodGuard::banned_changed`].
    ban_started: bool,
    next_ban_end: Option<Instant>,
}

impl FloodGuard {
    pub fn new(limits: FloodLimits, now: Instant) -> Self {
        FloodGuard {
            limits,
            sources: HashMap::new(),
            last_prune: now,
            ban_started: false,
            next_ban_end: None,
        }
    }

    /// Count a request of `class` from `ip` and say what to do with it.
    pub fn check(
        &mut self,
        ip: IpAddr,
        class: RequestClass,
        carrier: bool,
        now: Instant,
    ) -> Verdict {
        if now.saturating_duration_since(self.last_prune) >= PRUNE_EVERY
            || self.sources.len() >= MAX_SOURCES
        {
            self.prune(now);
        }
        let source = self.sources.entry(ip).or_insert_with(|| Source {
            window_start: now,
            current: [0; 3],
            previous: [0; 3],
            banned_until: None,
            last_seen: now,
            refusals: 0,
            first_refusal: now,
        });
        source.last_seen = now;
        if let Some(until) = source.banned_until {
            if now < until {
                return Verdict::Drop;
            }
            source.banned_until = None;
        }
        let elapsed = now.saturating_duration_since(source.window_start);
        if elapsed >= 2 * WINDOW {
            source.previous = [0; 3];
            source.current = [0; 3];
            source.window_start = now;
        } else if elapsed >= WINDOW {
            source.previous = source.current;
            source.current = [0; 3];
            source.window_start += WINDOW;
        }
        let i = class.index();
        source.current[i] = source.current[i].saturating_add(1);
        // The sliding second: what is left of the previous window's count, plus this one's.
        let into = now
            .saturating_duration_since(source.window_start)
            .as_secs_f64();
        let rate = f64::from(source.previous[i]) * (1.0 - into / WINDOW.as_secs_f64()).max(0.0)
            + f64::from(source.current[i]);
        let limit = f64::from(if carrier {
            self.limits.carrier
        } else {
            match class {
                RequestClass::Invite => self.limits.invite,
                RequestClass::Register => self.limits.register,
                RequestClass::Other => self.limits.other,
            }
        });
        if rate <= limit {
            return Verdict::Pass;
        }
        if !carrier {
            if now.saturating_duration_since(source.first_refusal) > REFUSAL_WINDOW {
                source.refusals = 0;
                source.first_refusal = now;
            }
            source.refusals += 1;
        }
        if carrier || (rate <= 2.0 * limit && source.refusals < REFUSALS_BEFORE_BAN) {
            Verdict::Refuse {
                retry_after: WINDOW,
            }
        } else {
            let until = now + self.limits.ban;
            source.banned_until = Some(until);
            source.refusals = 0;
            self.ban_started = true;
            Verdict::Banned { until }
        }
    }

    /// Whether a ban began or ended since the last call (then [`FloodGuard::banned`] changed).
    pub fn banned_changed(&mut self, now: Instant) -> bool {
        let ends = self.next_ban_end.is_some_and(|e| e <= now);
        let changed = self.ban_started || ends;
        self.ban_started = false;
        if changed {
            self.next_ban_end = self
                .sources
                .values()
                .filter_map(|s| s.banned_until)
                .filter(|u| *u > now)
                .min();
        }
        changed
    }

    /// Sources banned now.
    pub fn banned(&self, now: Instant) -> usize {
        self.sources
            .values()
            .filter(|s| s.banned_until.is_some_and(|u| u > now))
            .count()
    }

    fn prune(&mut self, now: Instant) {
        self.last_prune = now;
        self.sources.retain(|_, s| {
            s.banned_until.is_some_and(|u| u > now)
                || now.saturating_duration_since(s.last_seen) < 2 * WINDOW
                || (s.refusals > 0
                    && now.saturating_duration_since(s.first_refusal) <= REFUSAL_WINDOW)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FloodLimits {
        FloodLimits {
            invite: 10,
            register: 5,
            other: 20,
            carrier: 100,
            ban: Duration::from_secs(60),
        }
    }

    const SCANNER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 1));

    #[test]
    fn a_source_past_its_limit_is_refused_then_banned_and_others_are_not() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(limits(), t0);
        let verdicts: Vec<Verdict> = (0..25)
            .map(|_| g.check(SCANNER, RequestClass::Invite, false, t0))
            .collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Pass));
        // One 503; the second refusal bans.
        assert!(matches!(verdicts[10], Verdict::Refuse { .. }));
        assert!(matches!(verdicts[11], Verdict::Banned { .. }));
        assert!(verdicts[12..].iter().all(|v| *v == Verdict::Drop));
        assert_eq!(g.banned(t0), 1);
        // Banned for everything, not only INVITE, until the ban ends.
        let later = t0 + Duration::from_secs(59);
        assert_eq!(
            g.check(SCANNER, RequestClass::Other, false, later),
            Verdict::Drop
        );
        assert_eq!(
            g.check(OTHER, RequestClass::Invite, false, t0),
            Verdict::Pass
        );
        let after = t0 + Duration::from_secs(61);
        assert_eq!(
            g.check(SCANNER, RequestClass::Invite, false, after),
            Verdict::Pass
        );
        assert_eq!(g.banned(after), 0);
    }

    #[test]
    fn classes_count_apart_and_the_window_slides() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(limits(), t0);
        for _ in 0..5 {
            assert_eq!(
                g.check(OTHER, RequestClass::Register, false, t0),
                Verdict::Pass
            );
        }
        assert!(matches!(
            g.check(OTHER, RequestClass::Register, false, t0),
            Verdict::Refuse { .. }
        ));
        assert_eq!(
            g.check(OTHER, RequestClass::Invite, false, t0),
            Verdict::Pass
        );
        // Half-way into the next second, half the last second still counts (6 × 0.5 = 3).
        let half = t0 + Duration::from_millis(1500);
        assert_eq!(
            g.check(OTHER, RequestClass::Register, false, half),
            Verdict::Pass
        );
        // Two seconds of quiet: a clean slate.
        let quiet = t0 + Duration::from_secs(4);
        for _ in 0..5 {
            assert_eq!(
                g.check(OTHER, RequestClass::Register, false, quiet),
                Verdict::Pass
            );
        }
    }

    /// A scanner that pauses after a `503` and comes back: banned at its second within a
    /// minute, though never twice over its limit.
    #[test]
    fn a_source_refused_three_times_in_a_minute_is_banned() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(limits(), t0);
        let mut last = Vec::new();
        for burst in 0..2u64 {
            let at = t0 + Duration::from_secs(10 * burst);
            last = (0..6)
                .map(|_| g.check(SCANNER, RequestClass::Register, false, at))
                .collect();
        }
        assert!(matches!(last[5], Verdict::Banned { .. }), "{last:?}");
        // Refusals a minute apart do not add up.
        let mut g = FloodGuard::new(limits(), t0);
        for burst in 0..3u64 {
            let at = t0 + Duration::from_secs(61 * burst);
            let v: Vec<Verdict> = (0..6)
                .map(|_| g.check(OTHER, RequestClass::Register, false, at))
                .collect();
            assert!(matches!(v[5], Verdict::Refuse { .. }), "{v:?}");
        }
    }

    #[test]
    fn carriers_have_their_own_limit_and_are_never_banned() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(limits(), t0);
        for _ in 0..100 {
            assert_eq!(
                g.check(OTHER, RequestClass::Invite, true, t0),
                Verdict::Pass
            );
        }
        for _ in 0..500 {
            assert!(matches!(
                g.check(OTHER, RequestClass::Invite, true, t0),
                Verdict::Refuse { .. }
            ));
        }
        assert_eq!(g.banned(t0), 0);
    }

    #[test]
    fn classes_by_first_word() {
        assert_eq!(
            RequestClass::of(b"INVITE sip:a@b SIP/2.0\r\n"),
            Some(RequestClass::Invite)
        );
        assert_eq!(
            RequestClass::of(b"REGISTER sip:b SIP/2.0\r\n"),
            Some(RequestClass::Register)
        );
        assert_eq!(
            RequestClass::of(b"OPTIONS sip:b SIP/2.0\r\n"),
            Some(RequestClass::Other)
        );
        assert_eq!(RequestClass::of(b"ACK sip:b SIP/2.0\r\n"), None);
        assert_eq!(RequestClass::of(b"SIP/2.0 200 OK\r\n"), None);
    }
}
