//! The Events actor: drains the durable outbox and delivers signed webhooks (DESIGN §6).
//!
//! It leases due deliveries in batches, groups them by ordering key, and hands each group to a
//! task that sends its deliveries one after another, stopping at the first failure so that later
//! events of the same key wait behind the one being retried. Results come back as messages and
//! are written to the outbox in batches. Memory is bounded by the batch and in-flight limits, not
//! by the size of the backlog. A crash between a send and its record means a second delivery
//! after restart: at least once, never lost.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::webhook::{
    AttemptRecord, DELIVERY_TIMEOUT, LeasedDelivery, Outbox, SignedRequest, WebhookSender, resolve,
    signature_header,
};

#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// Groups (ordering keys) being delivered at once.
    pub max_in_flight: usize,
    /// Deliveries leased per outbox query.
    pub lease_batch: usize,
    /// How long a lease protects a delivery from other processes.
    pub lease: Duration,
    /// Multiplies the retry schedule (1.0 in production; tests shrink it).
    pub retry_scale: f64,
    /// How often the outbox is polled for retries that fell due and other processes' events.
    pub poll_interval: Duration,
    /// Finished attempts buffered before they are written in one batch.
    pub record_batch: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            max_in_flight: 192,
            lease_batch: 1024,
            lease: Duration::from_secs(60),
            retry_scale: 1.0,
            poll_interval: Duration::from_millis(250),
            record_batch: 512,
        }
    }
}

/// Events committed within this window share one outbox pass.
const COALESCE: Duration = Duration::from_millis(20);

pub enum EventsMsg {
    /// New events were committed: look for work now.
    EventsCommitted,
    /// The poll interval elapsed.
    PollDue,
    /// A group's task finished: its attempts, and the deliveries it did not attempt.
    GroupFinished {
        key: String,
        attempts: Vec<AttemptRecord>,
        released: Vec<LeasedDelivery>,
        /// The group stopped before its end (a failed attempt, or its lease running out): what
        /// waits behind it in the same ordering key must wait for the retry.
        stopped: bool,
    },
}

pub struct Events;

#[derive(Clone)]
pub struct EventsArgs {
    pub outbox: Arc<dyn Outbox>,
    pub sender: Arc<dyn WebhookSender>,
    pub clock: Arc<dyn Clock>,
    pub config: EventsConfig,
    /// Signalled by the storage layer after it commits events.
    pub committed: Arc<Notify>,
}

/// The deliveries of one ordering key held by this actor: at most one group of them is being
/// sent; later ones (leased while it runs) wait here, in order, and go next.
#[derive(Default)]
struct KeySlot {
    waiting: VecDeque<LeasedDelivery>,
    running: bool,
}

pub struct EventsState {
    args: EventsArgs,
    in_flight: usize,
    /// Every ordering key with deliveries held here (bounded by the lease batches).
    keys: HashMap<String, KeySlot>,
    /// Keys with waiting deliveries and nothing running, in the order they became ready.
    ready: VecDeque<String>,
    /// Deliveries held but not yet started (bounded by two lease batches).
    queued_deliveries: usize,
    attempts: Vec<AttemptRecord>,
    released: Vec<LeasedDelivery>,
    waker: tokio::task::JoinHandle<()>,
}

impl Actor for Events {
    type Msg = EventsMsg;
    type State = EventsState;
    type Arguments = EventsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // A restarted actor holds nothing: what an earlier incarnation leased is nobody's.
        if let Err(e) = args.outbox.forget_leases().await {
            warn!(error = %e, "forgetting earlier webhook leases failed");
        }
        myself.send_interval(args.config.poll_interval, || EventsMsg::PollDue);
        let committed = args.committed.clone();
        let me = myself.clone();
        let waker = tokio::spawn(async move {
            loop {
                committed.notified().await;
                if me.cast(EventsMsg::EventsCommitted).is_err() {
                    break;
                }
                // Coalesce: commits in the next few milliseconds are picked up by one outbox
                // pass, instead of one pass per committed change competing for the writer.
                tokio::time::sleep(COALESCE).await;
            }
        });
        // Work may be waiting from before a restart.
        myself.cast(EventsMsg::PollDue)?;
        Ok(EventsState {
            args,
            in_flight: 0,
            keys: HashMap::new(),
            ready: VecDeque::new(),
            queued_deliveries: 0,
            attempts: Vec::new(),
            released: Vec::new(),
            waker,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.waker.abort();
        // Keep what was already sent from being sent again.
        flush(state).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            EventsMsg::EventsCommitted | EventsMsg::PollDue => {
                flush(state).await;
            }
            EventsMsg::GroupFinished {
                key,
                attempts,
                released,
                stopped,
            } => {
                state.in_flight = state.in_flight.saturating_sub(1);
                state.attempts.extend(attempts);
                state.released.extend(released);
                if let Some(slot) = state.keys.get_mut(&key) {
                    slot.running = false;
                    if stopped {
                        // Later events of this key wait behind the one being retried.
                        state.queued_deliveries -= slot.waiting.len();
                        state.released.extend(slot.waiting.drain(..));
                        state.keys.remove(&key);
                    } else if slot.waiting.is_empty() {
                        state.keys.remove(&key);
                    } else {
                        state.ready.push_back(key);
                    }
                }
                // Record promptly when idle (the next event of a key waits for it), in batches
                // when busy.
                if state.in_flight == 0 || state.attempts.len() >= state.args.config.record_batch {
                    flush(state).await;
                }
            }
        }
        fill(&myself, state).await;
        Ok(())
    }
}

/// Write finished attempts and released deliveries; false if that failed (they are kept for
/// the next try).
async fn flush(state: &mut EventsState) -> bool {
    if state.attempts.is_empty() && state.released.is_empty() {
        return true;
    }
    match state
        .args
        .outbox
        .record(&state.attempts, &state.released)
        .await
    {
        Ok(()) => {
            state.attempts.clear();
            state.released.clear();
            true
        }
        // Keep them: the next flush retries. Leases hold the deliveries meanwhile.
        Err(e) => {
            warn!(error = %e, pending = state.attempts.len(), "recording webhook attempts failed");
            false
        }
    }
}

/// Start ready keys while there are free sending slots; lease more when the queue runs low.
/// Concurrency stays at `max_in_flight`, so connections are reused instead of churned, and
/// memory stays bounded by the queue (at most two lease batches), whatever the backlog.
async fn fill(myself: &ActorRef<EventsMsg>, state: &mut EventsState) {
    let cfg = state.args.config.clone();
    loop {
        start_queued(myself, state);
        if state.queued_deliveries >= cfg.lease_batch {
            return;
        }
        // Record what has finished first: a failed attempt must be in the outbox before the
        // next lease, so that later events of its key wait behind it.
        if !flush(state).await {
            return;
        }
        let now = state.args.clock.now();
        let lease_until = now + chrono::Duration::from_std(cfg.lease).unwrap_or_default();
        let leased = match state
            .args
            .outbox
            .lease_due(now, cfg.lease_batch, lease_until)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "leasing webhook deliveries failed");
                return;
            }
        };
        let leased_count = leased.len();
        debug!(
            leased = leased_count,
            in_flight = state.in_flight,
            "webhook deliveries leased"
        );
        state.queued_deliveries += leased_count;
        // The outbox hands them out oldest first: appending keeps each key's order, also behind
        // a group of the same key that is still being sent.
        for d in leased {
            match state.keys.get_mut(&d.ordering_key) {
                Some(slot) => slot.waiting.push_back(d),
                None => {
                    let key = d.ordering_key.clone();
                    let mut slot = KeySlot::default();
                    slot.waiting.push_back(d);
                    state.keys.insert(key.clone(), slot);
                    state.ready.push_back(key);
                }
            }
        }
        if leased_count < cfg.lease_batch {
            // Nothing more is due right now.
            start_queued(myself, state);
            return;
        }
    }
}

fn start_queued(myself: &ActorRef<EventsMsg>, state: &mut EventsState) {
    while state.in_flight < state.args.config.max_in_flight {
        let Some(key) = state.ready.pop_front() else {
            return;
        };
        let Some(slot) = state.keys.get_mut(&key) else {
            continue;
        };
        if slot.running || slot.waiting.is_empty() {
            continue;
        }
        let group: Vec<LeasedDelivery> = slot.waiting.drain(..).collect();
        slot.running = true;
        state.queued_deliveries -= group.len();
        state.in_flight += 1;
        spawn_group(myself.clone(), &state.args, key, group);
    }
}

fn spawn_group(
    myself: ActorRef<EventsMsg>,
    args: &EventsArgs,
    key: String,
    group: Vec<LeasedDelivery>,
) {
    let sender = args.sender.clone();
    let clock = args.clock.clone();
    let scale = args.config.retry_scale;
    // Stop sending from a group while a quarter of the lease is left: a request in flight (at
    // most the 10 s delivery timeout with the default 60 s lease) must finish inside it.
    let margin = chrono::Duration::from_std(args.config.lease / 4).unwrap_or_default();
    tokio::spawn(async move {
        let mut attempts = Vec::with_capacity(group.len());
        let mut released = Vec::new();
        let mut stopped = false;
        let mut rest = group.into_iter();
        while let Some(mut d) = rest.next() {
            let now = clock.now();
            // The request must end before the lease does, or another sender could take it.
            let left = (d.lease_until - now - margin)
                .to_std()
                .unwrap_or_default()
                .min(DELIVERY_TIMEOUT);
            if left < Duration::from_secs(1) {
                released.push(d);
                released.extend(rest.by_ref());
                stopped = true;
                break;
            }
            let signature = signature_header(&d.secret, d.body.as_bytes(), now.timestamp());
            // The body moves into the request: one copy per delivery fewer.
            let request = SignedRequest {
                timeout: left,
                url: std::mem::take(&mut d.url),
                signature,
                body: std::mem::take(&mut d.body),
                event_id: d.event_id.clone(),
                event_kind: d.event_kind.clone(),
            };
            let result = sender.send(request).await;
            let record = resolve(&d, now, result, scale);
            let acknowledged = record.result.acknowledged();
            attempts.push(record);
            if !acknowledged {
                // Later events of this key wait behind the one being retried.
                released.extend(rest.by_ref());
                stopped = true;
                break;
            }
        }
        // If the actor is gone, the leases lapse and the deliveries are retried: at least once.
        let _ = myself.cast(EventsMsg::GroupFinished {
            key,
            attempts,
            released,
            stopped,
        });
    });
}
