//! The prepaid cut-off of a call's paid leg (DESIGN §4, §8), used by every outbound leg billed at
//! the number's outbound rate: a whole slice of balance reserved before the leg is placed, the
//! reservation extended a slice at a time while the call lasts and the wallet can pay (concurrent
//! calls of one wallet share its balance), and BYE on both legs at the end of the paid time with
//! `hangup_cause: "balance_exhausted"`. The store ends the reservation with the call and charges
//! at most what was reserved; after a crash, closing the orphaned call settles it the same way.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tracing::warn;

use super::call::{CallMsg, CallState, Phase};
use crate::call_store::CallStatus;
use crate::money;

/// How long extending a reservation may take before it counts as failed.
const RESERVE_WAIT: Duration = Duration::from_secs(3);

/// A paid leg's reservation, as the call knows it.
pub(super) struct Prepaid {
    /// The call record it pays for: the call itself (a device's call out) or a dialled leg's.
    call_id: String,
    workspace_id: String,
    rate_per_min_minor: i64,
    /// The call's whole reservation so far.
    reserved_minor: i64,
    /// When the far end answered (paid time runs from there); `None` while it rings.
    answered: Option<Instant>,
    /// Names the current check timer (older ones are ignored).
    seq: u64,
}

/// Why a paid leg may not start.
pub(super) enum PrepaidRefusal {
    /// Less than a slice of the wallet's balance is free.
    InsufficientFunds,
    /// The store could not say.
    Storage,
}

impl Prepaid {
    /// A reservation made before the call started (the API reserves a placed call's first slice
    /// with its row).
    pub(super) fn reserved(
        call_id: &str,
        workspace_id: &str,
        rate_per_min_minor: i64,
        reserved_minor: i64,
    ) -> Self {
        Prepaid {
            call_id: call_id.to_owned(),
            workspace_id: workspace_id.to_owned(),
            rate_per_min_minor,
            reserved_minor,
            answered: None,
            seq: 0,
        }
    }

    /// The end of the paid time, once answered.
    fn paid_until(&self) -> Option<Instant> {
        let secs = money::paid_seconds(self.reserved_minor, self.rate_per_min_minor)?;
        Some(self.answered? + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
    }
}

impl CallState {
    /// Before a paid leg is placed: reserve its first slice (a minute at `rate_per_min_minor`)
    /// for call record `call_id`. A free rate needs no reservation (`None`).
    pub(super) async fn reserve_first_slice(
        &mut self,
        call_id: &str,
        workspace_id: &str,
        rate_per_min_minor: i64,
    ) -> Result<Option<Prepaid>, PrepaidRefusal> {
        let slice = money::prepaid_slice_minor(rate_per_min_minor);
        if slice == 0 {
            return Ok(None);
        }
        let now = self.now();
        match self
            .deps
            .store
            .reserve(call_id, workspace_id, slice, slice, now)
            .await
        {
            Ok(Some(reserved_minor)) => {
                self.note(
                    "prepaid.reserved",
                    json!({"call_id": call_id, "reserved_minor": reserved_minor, "rate_per_min_minor": rate_per_min_minor}),
                );
                Ok(Some(Prepaid {
                    call_id: call_id.to_owned(),
                    workspace_id: workspace_id.to_owned(),
                    rate_per_min_minor,
                    reserved_minor,
                    answered: None,
                    seq: 0,
                }))
            }
            Ok(None) => {
                self.note(
                    "prepaid.refused",
                    json!({"call_id": call_id, "needed_minor": slice, "rate_per_min_minor": rate_per_min_minor}),
                );
                Err(PrepaidRefusal::InsufficientFunds)
            }
            Err(e) => {
                warn!(call_id = %call_id, workspace_id, error = %e, "could not reserve the balance");
                Err(PrepaidRefusal::Storage)
            }
        }
    }

    /// The reservation of the call itself (`None`) or of leg `n`.
    fn prepaid_of(&mut self, leg: Option<u32>) -> Option<&mut Prepaid> {
        match leg {
            None => self.prepaid.as_mut(),
            Some(n) => self.legs.get_mut(n as usize)?.prepaid.as_mut(),
        }
    }

    /// The far end answered: paid time runs from now.
    pub(super) fn start_paid_time(&mut self, leg: Option<u32>) {
        let Some(p) = self.prepaid_of(leg) else {
            return;
        };
        p.answered = Some(Instant::now());
        self.schedule_prepaid_check(leg);
    }

    /// Wake at the point to ask for the next slice, or, if that has passed, at the end of the
    /// paid time.
    fn schedule_prepaid_check(&mut self, leg: Option<u32>) {
        self.timer_seq += 1;
        let seq = self.timer_seq;
        let Some(p) = self.prepaid_of(leg) else {
            return;
        };
        let Some(until) = p.paid_until() else {
            return;
        };
        let ahead = until
            .checked_sub(Duration::from_secs(
                money::PREPAID_EXTEND_AHEAD_SECONDS.unsigned_abs(),
            ))
            .unwrap_or(until);
        let wake = if ahead > Instant::now() { ahead } else { until };
        p.seq = seq;
        let me = self.myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(wake).await;
            let _ = me.cast(CallMsg::PrepaidCheck { leg, seq });
        });
    }

    /// Extend the reservation by a slice (or what is left); with nothing more to reserve, the
    /// paid leg ends at the end of its paid time.
    pub(super) async fn on_prepaid_check(&mut self, leg: Option<u32>, seq: u64) {
        let ended = self.phase == Phase::Ended;
        let Some(p) = self.prepaid_of(leg) else {
            return;
        };
        if seq != p.seq || ended {
            return;
        }
        let (call_id, ws, rate) = (
            p.call_id.clone(),
            p.workspace_id.clone(),
            p.rate_per_min_minor,
        );
        let slice = money::prepaid_slice_minor(rate);
        let now = self.now();
        // A store that does not answer in time is a store that failed: the call is not left
        // running past its paid time while we wait.
        let reserved = tokio::time::timeout(
            RESERVE_WAIT,
            self.deps.store.reserve(&call_id, &ws, slice, 1, now),
        )
        .await;
        let (extended, storage_failed) = match reserved {
            Ok(Ok(r)) => (r, false),
            Ok(Err(e)) => {
                warn!(call_id = %call_id, workspace_id = %ws, error = %e, "could not extend the reservation");
                (None, true)
            }
            Err(_) => {
                warn!(call_id = %call_id, workspace_id = %ws, "extending the reservation timed out");
                (None, true)
            }
        };
        if let Some(reserved_minor) = extended {
            if let Some(p) = self.prepaid_of(leg) {
                p.reserved_minor = reserved_minor;
            }
            self.note(
                "prepaid.extended",
                json!({
                    "call_id": call_id,
                    "reserved_minor": reserved_minor,
                    "paid_seconds": money::paid_seconds(reserved_minor, rate),
                }),
            );
            self.schedule_prepaid_check(leg);
            return;
        }
        let over = self
            .prepaid_of(leg)
            .and_then(|p| p.paid_until())
            .is_none_or(|until| Instant::now() >= until);
        if !over {
            // The last chance to extend is at the very end (a top-up may land meanwhile).
            self.schedule_prepaid_check(leg);
            return;
        }
        let reserved = self.prepaid_of(leg).map(|p| p.reserved_minor);
        let cause = if storage_failed {
            // Unpaid time is not given away, but the wallet was not found short either.
            self.note(
                "prepaid.unconfirmed",
                json!({"call_id": call_id, "reserved_minor": reserved, "reason": "storage"}),
            );
            "engine_error"
        } else {
            self.note(
                "prepaid.exhausted",
                json!({"call_id": call_id, "reserved_minor": reserved}),
            );
            "balance_exhausted"
        };
        match leg {
            // A dialled leg's paid time is over: that leg ends, the caller's script goes on.
            Some(n) => super::verbs::dial_leg_cut(self, n, cause).await,
            None => self.hang_up(CallStatus::Completed, cause, None).await,
        }
    }
}
