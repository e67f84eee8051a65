//! The Scheduler (DESIGN §2): runs the work that falls due with time — number renewals,
//! suspensions and releases of numbers left unpaid — from the database.
//!
//! Due work is found and claimed in the database, so a restart neither misses it nor does it
//! twice, and several engines on one PostgreSQL share it (each item is taken by exactly one). This
//! actor only decides *when* to look: every `every`, and never two runs at once in one process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{info, warn};

use crate::clock::Clock;
use crate::numbers::NumbersMsg;
use crate::store::StorageError;

/// What one pass over the due work did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueReport {
    pub renewed: u64,
    pub suspended: u64,
    pub released: u64,
    /// Numbers whose status changed: their cached routes must be read again.
    pub changed_numbers: Vec<String>,
}

impl DueReport {
    pub fn absorb(&mut self, other: DueReport) {
        self.renewed += other.renewed;
        self.suspended += other.suspended;
        self.released += other.released;
        self.changed_numbers.extend(other.changed_numbers);
    }

    pub fn is_empty(&self) -> bool {
        self.renewed == 0 && self.suspended == 0 && self.released == 0
    }
}

/// The database side of due work. Every item is done in a transaction that also marks it done.
#[async_trait]
pub trait DueWork: Send + Sync + 'static {
    /// Do everything due at or before `now`.
    async fn run_due(&self, now: DateTime<Utc>) -> Result<DueReport, StorageError>;
}

#[derive(Clone)]
pub struct SchedulerArgs {
    pub work: Arc<dyn DueWork>,
    pub clock: Arc<dyn Clock>,
    /// How often to look for due work.
    pub every: Duration,
    /// The Numbers actor's name, told of numbers whose status changed.
    pub numbers: Option<String>,
}

pub enum SchedulerMsg {
    /// Time to look for due work.
    Tick,
    /// A run ended.
    RunFinished(Result<DueReport, StorageError>),
}

pub struct Scheduler;

pub struct SchedulerState {
    args: SchedulerArgs,
    running: bool,
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Catch up at once: work that fell due while no engine ran is due now.
        let _ = myself.cast(SchedulerMsg::Tick);
        myself.send_interval(args.every, || SchedulerMsg::Tick);
        Ok(SchedulerState {
            args,
            running: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SchedulerMsg::Tick => {
                if state.running {
                    return Ok(());
                }
                state.running = true;
                let work = state.args.work.clone();
                let now = state.args.clock.now();
                // The run may take a while (a month's renewals at once): off the actor, so
                // ticks that arrive meanwhile are simply skipped.
                tokio::spawn(async move {
                    let result = work.run_due(now).await;
                    let _ = myself.cast(SchedulerMsg::RunFinished(result));
                });
            }
            SchedulerMsg::RunFinished(result) => {
                state.running = false;
                match result {
                    Ok(report) => {
                        if !report.is_empty() {
                            info!(
                                renewed = report.renewed,
                                suspended = report.suspended,
                                released = report.released,
                                "due work done"
                            );
                        }
                        if let Some(name) = &state.args.numbers
                            && let Some(numbers) = ActorRef::<NumbersMsg>::where_is(name.clone())
                        {
                            for number_id in report.changed_numbers {
                                let _ = numbers.cast(NumbersMsg::NumberChanged { number_id });
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "due work failed; it is tried again next tick"),
                }
            }
        }
        Ok(())
    }
}
