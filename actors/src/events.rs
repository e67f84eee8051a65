//! The Events actor: drains the durable outbox and delivers signed webhooks (DESIGN §6).
//!
//! It leases due deliveries in batches, groups them by ordering key, and hands each group to a
//! task that sends its deliveries one after another, stopping at the first failure so that later
//! events of the same key wait behind the one being retried. Results come back as messages and
//! are written to the outbox in batches. Memory is bounded by the batch and in-flight limits, not
//! by the size of the backlog. A crash between a send and its record means a second delivery
//! after restart: at least once, never lost.
//!
//! Leasing and recording run as tasks of their own, at most one of each at a time, so sending
//! goes on while the database works and the next lease overlaps the last record. The bookkeeping
//! ([`Book`]) decides what starts when, without doing any I/O. One rule keeps each key in order:
//! a stop (a failed attempt, or a delivery released unsent) must be committed before a later
//! lease starts, because until then the outbox still sees the key as held by this process and
//! would hand out its later deliveries; and whatever a lease already running returns for a key
//! that stopped meanwhile is released, not sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::store::StorageError;
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

/// Events committed within this window share one outbox pass. Each pass is a lease and then a
/// record, and on SQLite those share the one write connection with every call write: at 20 ms
/// they came 50 times a second each at 650 calls/s, and a call's first write often queued
/// behind one. 50 ms gives fewer, larger passes; an event waits at most that much longer (on
/// PostgreSQL too, where passes cost a round trip per statement to the server).
const COALESCE: Duration = Duration::from_millis(50);

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
    /// The lease in flight finished: `limit` deliveries were asked for.
    Leased {
        result: Result<Vec<LeasedDelivery>, StorageError>,
        limit: usize,
    },
    /// The record in flight finished; if it failed, what it was to write comes back.
    Recorded {
        failed: Option<(Vec<AttemptRecord>, Vec<LeasedDelivery>)>,
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

/// What the actor holds and what it may start next: sans-IO, the actor does the I/O it asks for.
#[derive(Default)]
struct Book {
    in_flight: usize,
    /// Every ordering key with deliveries held here (bounded by the lease batches).
    keys: HashMap<String, KeySlot>,
    /// Keys with waiting deliveries and nothing running, in the order they became ready.
    ready: VecDeque<String>,
    /// Deliveries held but not yet started (bounded by two lease batches).
    queued_deliveries: usize,
    /// Finished attempts and released deliveries not yet handed to a record.
    attempts: Vec<AttemptRecord>,
    released: Vec<LeasedDelivery>,
    /// The buffered results hold a stop: no lease may start before it is committed.
    unrecorded_stop: bool,
    /// A record is in flight; `Some(true)` if it holds a stop.
    recording: Option<bool>,
    /// The last record failed: the next waits for the poll, instead of retrying in a loop.
    record_held: bool,
    /// The poll asks for buffered results to be written even if the batch is not full.
    flush_due: bool,
    /// A lease is in flight.
    leasing: bool,
    /// Keys that stopped while the lease in flight ran: what it returns for them is released.
    stopped_while_leasing: HashSet<String>,
    /// More may be due: a notification or poll came, or the last lease came back full.
    more_due: bool,
}

impl Book {
    fn new() -> Book {
        // Work may be waiting from before a restart.
        Book {
            more_due: true,
            ..Book::default()
        }
    }

    fn poll(&mut self) {
        self.more_due = true;
        self.flush_due = true;
        self.record_held = false;
    }

    fn committed(&mut self) {
        self.more_due = true;
    }

    fn group_finished(
        &mut self,
        key: String,
        attempts: Vec<AttemptRecord>,
        released: Vec<LeasedDelivery>,
        stopped: bool,
    ) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.attempts.extend(attempts);
        self.released.extend(released);
        if stopped {
            self.unrecorded_stop = true;
            if self.leasing {
                self.stopped_while_leasing.insert(key.clone());
            }
        }
        if let Some(slot) = self.keys.get_mut(&key) {
            slot.running = false;
            if stopped {
                // Later events of this key wait behind the one being retried.
                self.queued_deliveries -= slot.waiting.len();
                self.released.extend(slot.waiting.drain(..));
                self.keys.remove(&key);
            } else if slot.waiting.is_empty() {
                self.keys.remove(&key);
            } else {
                self.ready.push_back(key);
            }
        }
    }

    /// A lease may start: nothing stopped is waiting to be committed, there is room for one more
    /// batch, and something may be due.
    fn lease_wanted(&self, lease_batch: usize) -> bool {
        !self.leasing
            && self.more_due
            && !self.unrecorded_stop
            && self.recording != Some(true)
            && self.queued_deliveries < lease_batch
    }

    fn lease_started(&mut self) {
        self.leasing = true;
        // Notifications from now on may be for events this lease does not see.
        self.more_due = false;
    }

    /// Takes the deliveries of a finished lease, oldest first. Returns how many it held back.
    fn leased(&mut self, leased: Vec<LeasedDelivery>, limit: usize) -> usize {
        self.leasing = false;
        if leased.len() >= limit {
            // There may be more.
            self.more_due = true;
        }
        let stopped = std::mem::take(&mut self.stopped_while_leasing);
        let mut held_back = 0;
        // The outbox hands them out oldest first: appending keeps each key's order, also behind
        // a group of the same key that is still being sent.
        for d in leased {
            if stopped.contains(&d.ordering_key) {
                // Leased while an earlier one of its key failed: it waits for the retry.
                self.released.push(d);
                self.unrecorded_stop = true;
                held_back += 1;
                continue;
            }
            self.queued_deliveries += 1;
            match self.keys.get_mut(&d.ordering_key) {
                Some(slot) => slot.waiting.push_back(d),
                None => {
                    let key = d.ordering_key.clone();
                    let mut slot = KeySlot::default();
                    slot.waiting.push_back(d);
                    self.keys.insert(key.clone(), slot);
                    self.ready.push_back(key);
                }
            }
        }
        held_back
    }

    fn lease_failed(&mut self) {
        self.leasing = false;
        // Nothing came back, so nothing of a stopped key can be sent; the poll retries.
        self.stopped_while_leasing.clear();
    }

    /// A record should start: promptly for a stop (the next lease waits for it) or when idle
    /// (the next event of a key may wait for it), in batches otherwise.
    fn record_wanted(&self, record_batch: usize) -> bool {
        self.recording.is_none()
            && !self.record_held
            && (!self.attempts.is_empty() || !self.released.is_empty())
            && (self.unrecorded_stop
                || self.flush_due
                || self.in_flight == 0
                || self.attempts.len() >= record_batch)
    }

    fn take_record(&mut self) -> (Vec<AttemptRecord>, Vec<LeasedDelivery>) {
        self.recording = Some(self.unrecorded_stop);
        self.unrecorded_stop = false;
        self.flush_due = false;
        (
            std::mem::take(&mut self.attempts),
            std::mem::take(&mut self.released),
        )
    }

    fn recorded(&mut self, failed: Option<(Vec<AttemptRecord>, Vec<LeasedDelivery>)>) {
        let had_stop = self.recording.take() == Some(true);
        if let Some((mut attempts, mut released)) = failed {
            // Kept for the next try; leases hold the deliveries meanwhile.
            attempts.append(&mut self.attempts);
            released.append(&mut self.released);
            self.attempts = attempts;
            self.released = released;
            self.unrecorded_stop |= had_stop;
            self.record_held = true;
        }
    }

    /// The next group to send, while there are free sending slots.
    fn next_group(&mut self, max_in_flight: usize) -> Option<(String, Vec<LeasedDelivery>)> {
        while self.in_flight < max_in_flight {
            let key = self.ready.pop_front()?;
            let Some(slot) = self.keys.get_mut(&key) else {
                continue;
            };
            if slot.running || slot.waiting.is_empty() {
                continue;
            }
            let group: Vec<LeasedDelivery> = slot.waiting.drain(..).collect();
            slot.running = true;
            self.queued_deliveries -= group.len();
            self.in_flight += 1;
            return Some((key, group));
        }
        None
    }
}

pub struct EventsState {
    args: EventsArgs,
    book: Book,
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
        myself.cast(EventsMsg::PollDue)?;
        Ok(EventsState {
            args,
            book: Book::new(),
            waker,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.waker.abort();
        // Keep what was already sent from being sent again. (A record still in flight finishes
        // on its own; a lease in flight lapses.)
        let (attempts, released) = state.book.take_record();
        if (!attempts.is_empty() || !released.is_empty())
            && let Err(e) = state.args.outbox.record(&attempts, &released).await
        {
            warn!(error = %e, pending = attempts.len(), "recording webhook attempts failed");
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let book = &mut state.book;
        match message {
            EventsMsg::EventsCommitted => book.committed(),
            EventsMsg::PollDue => book.poll(),
            EventsMsg::GroupFinished {
                key,
                attempts,
                released,
                stopped,
            } => book.group_finished(key, attempts, released, stopped),
            EventsMsg::Leased { result, limit } => match result {
                Ok(leased) => {
                    let count = leased.len();
                    let held_back = book.leased(leased, limit);
                    debug!(
                        leased = count,
                        held_back,
                        in_flight = book.in_flight,
                        "webhook deliveries leased"
                    );
                }
                Err(e) => {
                    warn!(error = %e, "leasing webhook deliveries failed");
                    book.lease_failed();
                }
            },
            EventsMsg::Recorded { failed } => book.recorded(failed),
        }
        drive(&myself, state);
        Ok(())
    }
}

/// Starts what the book allows: groups while there are free sending slots (so connections are
/// reused instead of churned), a record, and a lease when the queue has room for another batch
/// (so memory stays bounded by two lease batches, whatever the backlog).
fn drive(myself: &ActorRef<EventsMsg>, state: &mut EventsState) {
    let cfg = &state.args.config;
    while let Some((key, group)) = state.book.next_group(cfg.max_in_flight) {
        spawn_group(myself.clone(), &state.args, key, group);
    }
    // Record before leasing: a stop just buffered must be committed before the next lease.
    if state.book.record_wanted(cfg.record_batch) {
        let (attempts, released) = state.book.take_record();
        let outbox = state.args.outbox.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let failed = match outbox.record(&attempts, &released).await {
                Ok(()) => {
                    debug!(
                        attempts = attempts.len(),
                        released = released.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "webhook attempts recorded"
                    );
                    None
                }
                Err(e) => {
                    warn!(error = %e, pending = attempts.len(), "recording webhook attempts failed");
                    Some((attempts, released))
                }
            };
            // If the actor is gone, the leases lapse and the deliveries are retried.
            let _ = me.cast(EventsMsg::Recorded { failed });
        });
    }
    if state.book.lease_wanted(cfg.lease_batch) {
        state.book.lease_started();
        let outbox = state.args.outbox.clone();
        let clock = state.args.clock.clone();
        let limit = cfg.lease_batch;
        let lease = chrono::Duration::from_std(cfg.lease).unwrap_or_default();
        let me = myself.clone();
        tokio::spawn(async move {
            let now = clock.now();
            let started = std::time::Instant::now();
            let result = outbox.lease_due(now, limit, now + lease).await;
            debug!(
                ms = started.elapsed().as_millis() as u64,
                "webhook lease finished"
            );
            // If the actor is gone, what was leased lapses and is sent again: at least once.
            let _ = me.cast(EventsMsg::Leased { result, limit });
        });
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
            // The body moves into the request: one copy per delivery fewer. The URL stays: the
            // attempt's record names it (a retry that succeeds brings its receiver's others
            // forward).
            let request = SignedRequest {
                timeout: left,
                url: d.url.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::{MAX_ATTEMPTS, SendResult};
    use chrono::{DateTime, Utc};

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    fn delivery(id: &str, key: &str) -> LeasedDelivery {
        LeasedDelivery {
            id: id.to_owned(),
            event_id: format!("e-{id}"),
            event_kind: "number.provisioned".to_owned(),
            ordering_key: key.to_owned(),
            url: "http://127.0.0.1/hook".to_owned(),
            body: "{}".to_owned(),
            secret: "whsec_test".to_owned(),
            attempts: 0,
            max_attempts: MAX_ATTEMPTS,
            lease_until: at(),
            unwritten: None,
        }
    }

    fn attempt(d: &LeasedDelivery, status: u16) -> AttemptRecord {
        let result = SendResult {
            status_code: Some(status),
            error: None,
            forbidden: false,
            latency_ms: 1,
        };
        resolve(d, at(), result, 1.0)
    }

    fn ids(ds: &[LeasedDelivery]) -> Vec<&str> {
        ds.iter().map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn a_key_that_stops_during_a_lease_gets_nothing_from_it() {
        let mut b = Book::new();
        assert!(b.lease_wanted(4));
        b.lease_started();
        assert!(!b.lease_wanted(4), "one lease at a time");
        b.leased(vec![delivery("1", "k"), delivery("2", "j")], 4);
        let (k, group) = b.next_group(8).expect("group k");
        assert_eq!((k.as_str(), ids(&group)), ("k", vec!["1"]));
        let (j, group_j) = b.next_group(8).expect("group j");
        assert_eq!(j, "j");

        // A second lease overlaps the sending; meanwhile key k fails.
        b.committed();
        assert!(b.lease_wanted(4));
        b.lease_started();
        b.group_finished(k, vec![attempt(&group[0], 500)], Vec::new(), true);
        assert!(b.record_wanted(512), "a stop is recorded at once");
        // The lease in flight saw k as held by this process and handed out its next delivery:
        // it must not be sent before the retry of "1".
        let held_back = b.leased(vec![delivery("3", "k"), delivery("4", "j")], 4);
        assert_eq!(held_back, 1);
        assert_eq!(ids(&b.released), vec!["3"]);
        assert!(!b.keys.contains_key("k"));
        // j's next one waits behind its running group, in order.
        assert_eq!(
            ids(&b.keys["j"].waiting.iter().cloned().collect::<Vec<_>>()),
            vec!["4"]
        );

        // No lease while the stop is not committed, also while its record is in flight.
        b.committed();
        assert!(!b.lease_wanted(4));
        let (attempts, released) = b.take_record();
        assert_eq!(attempts.len(), 1);
        assert_eq!(ids(&released), vec!["3"]);
        assert!(!b.lease_wanted(4));
        b.recorded(None);
        assert!(b.lease_wanted(4));

        // j finishes well: its waiting delivery goes next.
        b.group_finished(j, vec![attempt(&group_j[0], 200)], Vec::new(), false);
        let (j, group) = b.next_group(8).expect("j again");
        assert_eq!((j.as_str(), ids(&group)), ("j", vec!["4"]));
    }

    #[test]
    fn a_stop_before_the_lease_blocks_it_until_recorded() {
        let mut b = Book::new();
        b.lease_started();
        b.leased(vec![delivery("1", "k"), delivery("2", "k")], 2);
        let (k, group) = b.next_group(8).expect("group");
        // "1" fails: "2" comes back released with it.
        b.group_finished(
            k,
            vec![attempt(&group[0], 503)],
            vec![group[1].clone()],
            true,
        );
        assert!(b.more_due, "the lease came back full");
        assert!(!b.lease_wanted(4));
        let _ = b.take_record();
        // A failed record keeps its batch, and the stop blocks leasing until it is written.
        b.recorded(Some((
            vec![attempt(&group[0], 503)],
            vec![group[1].clone()],
        )));
        assert!(!b.lease_wanted(4));
        assert!(!b.record_wanted(512), "held until the next poll");
        b.poll();
        assert!(b.record_wanted(512));
        let (attempts, released) = b.take_record();
        assert_eq!((attempts.len(), ids(&released)), (1, vec!["2"]));
        b.recorded(None);
        assert!(b.lease_wanted(4));
    }

    #[test]
    fn leases_stop_at_two_batches_and_records_wait_for_a_batch() {
        let mut b = Book::new();
        b.lease_started();
        b.leased((0..4).map(|i| delivery(&i.to_string(), "k")).collect(), 4);
        assert!(b.more_due);
        assert!(!b.lease_wanted(4), "a full batch is queued");
        let (k, group) = b.next_group(8).expect("group");
        assert!(b.lease_wanted(4), "room again");
        b.lease_started();
        assert!(!b.record_wanted(512), "nothing finished yet");
        let attempts: Vec<AttemptRecord> = group.iter().map(|d| attempt(d, 200)).collect();
        // The group ends while another key still sends: a partial batch waits.
        b.in_flight += 1;
        b.group_finished(k, attempts, Vec::new(), false);
        assert!(!b.record_wanted(512));
        assert!(b.record_wanted(4), "a full batch is written");
        b.leased(Vec::new(), 4);
        assert!(
            !b.more_due,
            "a short lease: nothing more is due until notified"
        );
    }
}
