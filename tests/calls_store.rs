//! The calls store (`impl CallStore for SqlStore`) driven as a library on both backends: rating,
//! the wallet debit and its ledger row, events in the outbox, idempotency, orphan closing.

#[macro_use]
mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{Backend, TestDb};
use sautikit::calls_store::{CallFilter, TimelineRecord};
use sautikit::db::Db;
use sautikit::store::SqlStore;
use sautikit_actors::call_store::{
    CallAnswered, CallEnded, CallStarted, CallStatus, CallStore, TimelineEntry,
};
use sautikit_actors::model::{LedgerEntry, LedgerKind, TenantNumber};
use sautikit_actors::store::{ReleaseNumber, Store};
use serde_json::{Value, json};

const MONTHLY: i64 = 10_000;

struct Fx {
    _db: TestDb,
    store: SqlStore,
    ws: String,
    secret: String,
    number: TenantNumber,
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 27, 12, 0, 0).unwrap()
}

/// A migrated database, a workspace holding `MONTHLY + spare` KES, and one claimed number with
/// the given per-minute rates (so the wallet holds `spare` after the claim).
async fn fixture(backend: Backend, spare: i64, inbound: i64, outbound: i64) -> Fx {
    let tdb = TestDb::new(backend).await;
    let db = Db::connect(&tdb.url).await.expect("connect");
    db.migrate().await.expect("migrate");
    let store = SqlStore::new(db);
    let ws = store
        .create_workspace("calls", "KES", MONTHLY + spare, t0())
        .await
        .expect("workspace");
    let number = common::store::claim_first_number(
        &store,
        &ws.workspace_id,
        3,
        common::store::Prices {
            monthly: MONTHLY,
            inbound_per_min: inbound,
            outbound_per_min: outbound,
        },
        t0(),
    )
    .await;
    Fx {
        _db: tdb,
        store,
        ws: ws.workspace_id,
        secret: ws.webhook_secret,
        number,
    }
}

fn entry(at: DateTime<Utc>, kind: &str, detail: Value) -> TimelineEntry {
    TimelineEntry {
        at,
        kind: kind.into(),
        detail,
    }
}

fn started(
    fx: &Fx,
    call_id: &str,
    direction: &str,
    engine: &str,
    at: DateTime<Utc>,
) -> CallStarted {
    CallStarted {
        call_id: call_id.into(),
        workspace_id: fx.ws.clone(),
        number_id: fx.number.id.clone(),
        direction: direction.into(),
        from: "+254711111111".into(),
        to: fx.number.number.clone(),
        sip_call_id: format!("sip-{call_id}"),
        engine_id: engine.into(),
        started_at: at,
        timeline: vec![entry(at, "sip.received", json!({"method": "INVITE"}))],
        parent_call_id: None,
    }
}

fn ended(call_id: &str, status: CallStatus, at: DateTime<Utc>) -> CallEnded {
    CallEnded {
        call_id: call_id.into(),
        status,
        ended_at: at,
        hangup_cause: Some("caller_hangup".into()),
        failure_reason: None,
        sip_status: None,
        timeline: vec![entry(at, "sip.received", json!({"method": "BYE"}))],
    }
}

fn new_call_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

async fn call_charges(fx: &Fx) -> Vec<LedgerEntry> {
    fx.store
        .list_ledger(&fx.ws, None, 100)
        .await
        .expect("ledger")
        .into_iter()
        .filter(|e| e.kind == LedgerKind::CallCharge)
        .collect()
}

async fn balance(fx: &Fx) -> i64 {
    fx.store
        .get_wallet(&fx.ws)
        .await
        .expect("wallet")
        .expect("exists")
        .balance_minor
}

/// (event_kind, body) of a call's events in outbox order.
async fn call_events(fx: &Fx, call_id: &str) -> Vec<(String, Value)> {
    let rows = sqlx::query("SELECT event_kind, body FROM events WHERE call_id = $1 ORDER BY id")
        .bind(call_id)
        .fetch_all(&fx.store.db().read)
        .await
        .expect("events");
    rows.iter()
        .map(|r| {
            use sqlx::Row;
            let kind: String = r.try_get("event_kind").expect("kind");
            let body: String = r.try_get("body").expect("body");
            (kind, serde_json::from_str(&body).expect("json body"))
        })
        .collect()
}

async fn stored_call(fx: &Fx, call_id: &str) -> sautikit::calls_store::CallRecord {
    fx.store
        .get_call(&fx.ws, call_id)
        .await
        .expect("get")
        .expect("call")
}

async fn event_kinds(fx: &Fx, call_id: &str) -> Vec<String> {
    call_events(fx, call_id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect()
}

async fn timeline(fx: &Fx, call_id: &str) -> Vec<TimelineRecord> {
    fx.store
        .list_call_timeline(call_id, None, 100)
        .await
        .expect("timeline")
}

async fn events_of_kind(fx: &Fx, kind: &str) -> usize {
    use sqlx::Row;
    let row =
        sqlx::query("SELECT COUNT(*) AS n FROM events WHERE workspace_id = $1 AND event_kind = $2")
            .bind(&fx.ws)
            .bind(kind)
            .fetch_one(&fx.store.db().read)
            .await
            .expect("count");
    let n: i64 = row.try_get("n").expect("n");
    usize::try_from(n).expect("count")
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

fn sorted(k: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = k.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

async fn rated_per_second_with_one_ledger_row(backend: Backend) {
    let fx = fixture(backend, 5_000, 300, 600).await;
    let id = new_call_id();
    let s = t0() + Duration::minutes(1);
    let a = s + Duration::seconds(2);
    // 61.2 s answered: billed 62 s at 300/min = 310.
    let e = a + Duration::milliseconds(61_200);
    fx.store
        .call_started(started(&fx, &id, "inbound", "engine-a", s))
        .await
        .expect("started");
    // A retried start (its commit acknowledged late) changes nothing.
    fx.store
        .call_started(started(&fx, &id, "inbound", "engine-a", s))
        .await
        .expect("started again");
    let c = fx
        .store
        .get_call(&fx.ws, &id)
        .await
        .expect("get")
        .expect("call");
    assert_eq!(c.status, CallStatus::Ringing);
    assert_eq!(c.rate_per_min_minor, 300, "the inbound rate is snapshotted");
    assert_eq!(c.currency, "KES");
    fx.store
        .call_answered(CallAnswered {
            call_id: id.clone(),
            answered_at: a,
            to: None,
            timeline: vec![entry(a, "sip.received", json!({"method": "ACK"}))],
        })
        .await
        .expect("answered");
    let charged = fx
        .store
        .call_ended(ended(&id, CallStatus::Completed, e))
        .await
        .expect("ended");
    assert_eq!(charged.duration_seconds, 62);
    assert_eq!(charged.cost_minor, 310);
    assert_eq!(charged.currency, "KES");

    let c = fx
        .store
        .get_call(&fx.ws, &id)
        .await
        .expect("get")
        .expect("call");
    assert_eq!(c.status, CallStatus::Completed);
    assert_eq!(c.duration_seconds, 62);
    assert_eq!(c.cost_minor, 310);
    assert_eq!(c.uncollected_minor, 0);
    assert_eq!(c.answered_at, Some(a));
    assert_eq!(c.ended_at, Some(e));
    assert_eq!(c.hangup_cause.as_deref(), Some("caller_hangup"));

    let charges = call_charges(&fx).await;
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(charges[0].amount_minor, -310);
    assert_eq!(charges[0].reference.as_deref(), Some(id.as_str()));
    assert_eq!(charges[0].balance_after_minor, 5_000 - 310);
    assert_eq!(balance(&fx).await, charges[0].balance_after_minor);

    // Ended twice: the stored charge comes back, nothing is written again.
    let again = fx
        .store
        .call_ended(ended(&id, CallStatus::Completed, e + Duration::seconds(30)))
        .await
        .expect("ended again");
    assert_eq!(again, charged);
    assert_eq!(call_charges(&fx).await.len(), 1);
    assert_eq!(balance(&fx).await, 5_000 - 310);

    let events = call_events(&fx, &id).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["call.started", "call.answered", "call.completed"]);
    for (kind, body) in &events {
        assert_eq!(body["event_kind"], kind.as_str());
        assert_eq!(body["workspace_id"], fx.ws.as_str());
        assert_eq!(body["payload"]["call_id"], id.as_str());
        assert_eq!(body["payload"]["number_id"], fx.number.id.as_str());
        assert_eq!(body["payload"]["direction"], "inbound");
        assert_eq!(body["payload"]["from"], "+254711111111");
        assert_eq!(body["payload"]["to"], fx.number.number.as_str());
    }
    let p = |i: usize| events[i].1["payload"].clone();
    assert_eq!(
        keys(&p(0)),
        sorted(&["call_id", "number_id", "direction", "from", "to", "status"])
    );
    assert_eq!(p(0)["status"], "ringing");
    assert_eq!(p(1)["status"], "answered");
    assert_eq!(p(1)["answered_at"], "2026-06-27T12:01:02Z");
    assert_eq!(p(2)["status"], "completed");
    assert_eq!(p(2)["duration_seconds"], 62);
    assert_eq!(p(2)["cost_minor"], 310);
    assert_eq!(p(2)["currency"], "KES");
    assert_eq!(p(2)["hangup_cause"], "caller_hangup");
    assert_eq!(p(2)["ended_at"], "2026-06-27T12:02:03Z");

    // The timeline: what the engine sent, then the charge, oldest first.
    let tl = fx
        .store
        .list_call_timeline(&id, None, 100)
        .await
        .expect("timeline");
    let kinds: Vec<&str> = tl.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "sip.received",
            "sip.received",
            "sip.received",
            "call.charged"
        ]
    );
    assert_eq!(tl[0].detail["method"], "INVITE");
    assert_eq!(tl[2].detail["method"], "BYE");
    assert_eq!(tl[3].detail["cost_minor"], 310);
    let page = fx
        .store
        .list_call_timeline(&id, Some(&tl[1].id), 1)
        .await
        .expect("page");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, tl[2].id);
}
on_both_backends!(rated_per_second_with_one_ledger_row);

async fn zero_rate_writes_no_ledger_row(backend: Backend) {
    let fx = fixture(backend, 5_000, 0, 300).await;
    let id = new_call_id();
    let s = t0() + Duration::minutes(1);
    fx.store
        .call_started(started(&fx, &id, "inbound", "engine-a", s))
        .await
        .expect("started");
    fx.store
        .call_answered(CallAnswered {
            call_id: id.clone(),
            answered_at: s,
            to: None,
            timeline: vec![],
        })
        .await
        .expect("answered");
    let charged = fx
        .store
        .call_ended(ended(&id, CallStatus::Completed, s + Duration::seconds(95)))
        .await
        .expect("ended");
    assert_eq!(charged.duration_seconds, 95);
    assert_eq!(charged.cost_minor, 0);
    let c = fx
        .store
        .get_call(&fx.ws, &id)
        .await
        .expect("get")
        .expect("call");
    assert_eq!(c.cost_minor, 0);
    assert_eq!(c.duration_seconds, 95);
    assert!(call_charges(&fx).await.is_empty());
    assert_eq!(balance(&fx).await, 5_000);
    let events = call_events(&fx, &id).await;
    assert_eq!(events[2].1["payload"]["cost_minor"], 0);
}
on_both_backends!(zero_rate_writes_no_ledger_row);

async fn short_wallet_is_debited_to_zero_never_below(backend: Backend) {
    // 100 left after the claim; an outbound call of 120 s at 300/min costs 600.
    let fx = fixture(backend, 100, 0, 300).await;
    fx.store
        .set_low_balance_threshold(&fx.ws, 50, t0())
        .await
        .expect("threshold");
    let id = new_call_id();
    let s = t0() + Duration::minutes(1);
    fx.store
        .call_started(started(&fx, &id, "outbound", "engine-a", s))
        .await
        .expect("started");
    fx.store
        .call_answered(CallAnswered {
            call_id: id.clone(),
            answered_at: s,
            to: None,
            timeline: vec![],
        })
        .await
        .expect("answered");
    let charged = fx
        .store
        .call_ended(ended(
            &id,
            CallStatus::Completed,
            s + Duration::seconds(120),
        ))
        .await
        .expect("ended");
    assert_eq!(charged.duration_seconds, 120);
    assert_eq!(
        charged.cost_minor, 100,
        "what the wallet held, not the rated 600"
    );
    assert_eq!(balance(&fx).await, 0);
    let charges = call_charges(&fx).await;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].amount_minor, -100);
    assert_eq!(charges[0].balance_after_minor, 0);
    let c = fx
        .store
        .get_call(&fx.ws, &id)
        .await
        .expect("get")
        .expect("call");
    assert_eq!(c.cost_minor, 100);
    assert_eq!(c.uncollected_minor, 500);
    assert_eq!(
        c.rate_per_min_minor, 300,
        "the outbound rate is snapshotted"
    );
    // The debit crossed the threshold: the same low-balance alert claims fire.
    assert_eq!(events_of_kind(&fx, "wallet.low_balance").await, 1);

    // A second call on an empty wallet: rated, nothing to take, no ledger row.
    let id2 = new_call_id();
    fx.store
        .call_started(started(&fx, &id2, "outbound", "engine-a", s))
        .await
        .expect("started");
    fx.store
        .call_answered(CallAnswered {
            call_id: id2.clone(),
            answered_at: s,
            to: None,
            timeline: vec![],
        })
        .await
        .expect("answered");
    let charged = fx
        .store
        .call_ended(ended(
            &id2,
            CallStatus::Completed,
            s + Duration::seconds(10),
        ))
        .await
        .expect("ended");
    assert_eq!(charged.cost_minor, 0);
    assert_eq!(call_charges(&fx).await.len(), 1);
    assert_eq!(balance(&fx).await, 0);
    let c = fx
        .store
        .get_call(&fx.ws, &id2)
        .await
        .expect("get")
        .expect("call");
    assert_eq!(c.uncollected_minor, 50);
    assert_eq!(
        events_of_kind(&fx, "wallet.low_balance").await,
        1,
        "once per crossing"
    );
}
on_both_backends!(short_wallet_is_debited_to_zero_never_below);

async fn canceled_call_fires_call_failed(backend: Backend) {
    let fx = fixture(backend, 5_000, 300, 300).await;
    let id = new_call_id();
    let s = t0() + Duration::minutes(1);
    fx.store
        .call_started(started(&fx, &id, "inbound", "engine-a", s))
        .await
        .expect("started");
    let mut end = ended(&id, CallStatus::Canceled, s + Duration::seconds(7));
    end.hangup_cause = Some("canceled".into());
    end.failure_reason = Some("caller.canceled".into());
    let charged = fx.store.call_ended(end).await.expect("ended");
    assert_eq!(charged.duration_seconds, 0);
    assert_eq!(charged.cost_minor, 0);
    assert!(call_charges(&fx).await.is_empty());
    // Answering a call that already ended changes nothing.
    fx.store
        .call_answered(CallAnswered {
            call_id: id.clone(),
            answered_at: s + Duration::seconds(8),
            to: None,
            timeline: vec![],
        })
        .await
        .expect("late answer");
    let c = fx
        .store
        .get_call(&fx.ws, &id)
        .await
        .expect("get")
        .expect("call");
    assert_eq!(c.status, CallStatus::Canceled);
    assert_eq!(c.answered_at, None);
    let events = call_events(&fx, &id).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["call.started", "call.failed"]);
    let p = &events[1].1["payload"];
    assert_eq!(
        keys(p),
        sorted(&[
            "call_id",
            "number_id",
            "direction",
            "from",
            "to",
            "status",
            "failure_reason",
            "ended_at"
        ])
    );
    assert_eq!(p["status"], "canceled");
    assert_eq!(p["failure_reason"], "caller.canceled");
    assert_eq!(p["ended_at"], "2026-06-27T12:01:07Z");

    // Unknown calls are storage errors, not silent successes.
    assert!(
        fx.store
            .call_ended(ended(&new_call_id(), CallStatus::Completed, s))
            .await
            .is_err()
    );
    // A start whose write failed: ending it "if started" is nothing when its row is absent, and
    // the end itself (with its event) when the write committed unseen.
    let missing = new_call_id();
    let none = fx
        .store
        .call_ended_if_started(ended(&missing, CallStatus::Failed, s))
        .await
        .expect("absent call");
    assert!(none.is_none());
    assert!(call_events(&fx, &missing).await.is_empty());
    let unseen = new_call_id();
    fx.store
        .call_started(started(&fx, &unseen, "inbound", "engine-a", s))
        .await
        .expect("started");
    let mut end = ended(&unseen, CallStatus::Failed, s + Duration::seconds(1));
    end.hangup_cause = None;
    end.failure_reason = Some("storage.unavailable".into());
    let charged = fx
        .store
        .call_ended_if_started(end)
        .await
        .expect("ended")
        .expect("its row is there");
    assert_eq!(charged.cost_minor, 0);
    let events = call_events(&fx, &unseen).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].0, "call.failed");
    assert_eq!(
        events[1].1["payload"]["failure_reason"],
        "storage.unavailable"
    );
    // A non-final status is refused.
    let id2 = new_call_id();
    fx.store
        .call_started(started(&fx, &id2, "inbound", "engine-a", s))
        .await
        .expect("started");
    assert!(
        fx.store
            .call_ended(ended(&id2, CallStatus::Answered, s))
            .await
            .is_err()
    );
}
on_both_backends!(canceled_call_fires_call_failed);

async fn orphans_of_dead_engines_are_closed(backend: Backend) {
    let fx = fixture(backend, 5_000, 600, 600).await;
    let now = t0() + Duration::hours(1);
    // Its last sign of life, 20 s ago.
    fx.store
        .engine_heartbeat("dead", now - Duration::seconds(20))
        .await
        .expect("beat");
    fx.store
        .engine_heartbeat("alive", now - Duration::seconds(60))
        .await
        .expect("beat");
    // Upsert: a later beat replaces the earlier one.
    fx.store
        .engine_heartbeat("alive", now - Duration::seconds(2))
        .await
        .expect("beat");

    let dead_answered = new_call_id();
    let dead_ringing = new_call_id();
    let never_beat = new_call_id();
    let alive_answered = new_call_id();
    let mine = new_call_id();
    let s = now - Duration::seconds(40);
    for (id, engine) in [
        (&dead_answered, "dead"),
        (&dead_ringing, "dead"),
        (&never_beat, "ghost"),
        (&alive_answered, "alive"),
        (&mine, "me"),
    ] {
        fx.store
            .call_started(started(&fx, id, "inbound", engine, s))
            .await
            .expect("started");
    }
    for id in [&dead_answered, &alive_answered] {
        fx.store
            .call_answered(CallAnswered {
                call_id: id.clone(),
                answered_at: now - Duration::seconds(30),
                to: None,
                timeline: vec![],
            })
            .await
            .expect("answered");
    }
    let closed = fx
        .store
        .close_orphaned_calls(now, "me", now - Duration::seconds(15))
        .await
        .expect("close");
    assert_eq!(closed, 3);

    let get = |id: String| {
        let store = fx.store.clone();
        let ws = fx.ws.clone();
        async move { store.get_call(&ws, &id).await.expect("get").expect("call") }
    };
    let c = get(dead_answered.clone()).await;
    assert_eq!(c.status, CallStatus::Failed);
    assert_eq!(c.failure_reason.as_deref(), Some("engine.restart"));
    // Rated up to its engine's last heartbeat, not through the time the engine was down.
    assert_eq!(c.ended_at, Some(now - Duration::seconds(20)));
    assert_eq!(c.duration_seconds, 10, "rated up to the last heartbeat");
    assert_eq!(c.cost_minor, 100);
    for id in [&dead_ringing, &never_beat] {
        let c = get(id.clone()).await;
        assert_eq!(c.status, CallStatus::Failed);
        assert_eq!(c.failure_reason.as_deref(), Some("engine.restart"));
        assert_eq!(c.cost_minor, 0);
    }
    assert_eq!(
        get(alive_answered.clone()).await.status,
        CallStatus::Answered
    );
    assert_eq!(get(mine.clone()).await.status, CallStatus::Ringing);

    let charges = call_charges(&fx).await;
    assert_eq!(charges.len(), 1);
    assert_eq!(
        charges[0].reference.as_deref(),
        Some(dead_answered.as_str())
    );
    assert_eq!(balance(&fx).await, 5_000 - 100);

    let events = call_events(&fx, &dead_answered).await;
    let last = &events.last().expect("events").1;
    assert_eq!(last["event_kind"], "call.failed");
    assert_eq!(last["payload"]["failure_reason"], "engine.restart");
    assert_eq!(last["payload"]["status"], "failed");
    let tl = fx
        .store
        .list_call_timeline(&dead_ringing, None, 100)
        .await
        .expect("timeline");
    let last = tl.last().expect("entry");
    assert_eq!(last.kind, "call.status");
    assert_eq!(last.detail["failure_reason"], "engine.restart");
    assert_eq!(last.detail["engine_id"], "dead");

    // Nothing left to close; a second sweep is a no-op.
    let again = fx
        .store
        .close_orphaned_calls(now, "me", now - Duration::seconds(15))
        .await
        .expect("close");
    assert_eq!(again, 0);
    assert_eq!(events_of_kind(&fx, "call.failed").await, 3);
}
on_both_backends!(orphans_of_dead_engines_are_closed);

async fn routes_and_reads(backend: Backend) {
    let fx = fixture(backend, 5_000, 0, 300).await;
    let r = fx
        .store
        .route_by_number(&fx.number.number)
        .await
        .expect("route")
        .expect("found");
    assert_eq!(r.number_id, fx.number.id);
    assert_eq!(r.workspace_id, fx.ws);
    assert_eq!(r.number, fx.number.number);
    assert_eq!(r.webhook_secret, fx.secret);
    assert_eq!(r.outbound_per_min_minor, 300);
    assert_eq!(r.currency, "KES");
    let bare = fx.number.number.trim_start_matches('+');
    assert_eq!(
        fx.store.route_by_number(bare).await.expect("route"),
        Some(r.clone())
    );
    assert_eq!(
        fx.store.route_by_id(&fx.number.id).await.expect("route"),
        Some(r.clone())
    );
    assert_eq!(
        fx.store
            .route_by_number("+254799999999")
            .await
            .expect("route"),
        None
    );

    // Calls list: newest first, filters, cursor.
    let s = t0() + Duration::minutes(1);
    let mut ids = Vec::new();
    for dir in ["inbound", "outbound", "inbound"] {
        let id = new_call_id();
        fx.store
            .call_started(started(&fx, &id, dir, "e", s))
            .await
            .expect("started");
        ids.push(id);
    }
    fx.store
        .call_ended(ended(
            &ids[0],
            CallStatus::NoAnswer,
            s + Duration::seconds(30),
        ))
        .await
        .expect("ended");
    let all = fx
        .store
        .list_calls(
            &fx.ws,
            &CallFilter {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .expect("list");
    let got: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);
    let inbound = fx
        .store
        .list_calls(
            &fx.ws,
            &CallFilter {
                direction: Some("inbound".into()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(inbound.len(), 2);
    let no_answer = fx
        .store
        .list_calls(
            &fx.ws,
            &CallFilter {
                status: Some(CallStatus::NoAnswer),
                number_id: Some(fx.number.id.clone()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(no_answer.len(), 1);
    assert_eq!(no_answer[0].id, ids[0]);
    let older = fx
        .store
        .list_calls(
            &fx.ws,
            &CallFilter {
                before_id: Some(ids[1].clone()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].id, ids[0]);
    assert!(
        fx.store
            .get_call("another-workspace", &ids[0])
            .await
            .expect("get")
            .is_none()
    );

    // A released number no longer routes; its calls stay readable.
    fx.store
        .release_number(ReleaseNumber {
            workspace_id: fx.ws.clone(),
            number_id: fx.number.id.clone(),
            now: t0() + Duration::hours(1),
        })
        .await
        .expect("release");
    assert_eq!(
        fx.store
            .route_by_number(&fx.number.number)
            .await
            .expect("route"),
        None
    );
    assert_eq!(
        fx.store.route_by_id(&fx.number.id).await.expect("route"),
        None
    );
    assert!(
        fx.store
            .get_call(&fx.ws, &ids[0])
            .await
            .expect("get")
            .is_some()
    );

    // Timeline appends between lifecycle changes keep their order.
    fx.store
        .append_timeline(
            &ids[1],
            (0..5)
                .map(|i| entry(s, "action.started", json!({"verb": "pause", "index": i})))
                .collect(),
        )
        .await
        .expect("append");
    let tl = fx
        .store
        .list_call_timeline(&ids[1], None, 100)
        .await
        .expect("timeline");
    let idx: Vec<i64> = tl[1..]
        .iter()
        .map(|t| t.detail["index"].as_i64().expect("index"))
        .collect();
    assert_eq!(idx, [0, 1, 2, 3, 4]);
}
on_both_backends!(routes_and_reads);

/// Two processes (two pools) end calls of one wallet at once: each call is charged once, the
/// wallet is never taken below zero, and the ledger adds up to the balance.
async fn concurrent_ends_charge_once_and_never_overdraw(backend: Backend) {
    // 1,000 left after the claim; eight calls of 62 s at 300/min cost 310 each (2,480 rated).
    let fx = fixture(backend, 1_000, 0, 300).await;
    let second = SqlStore::new(Db::connect(&fx._db.url).await.expect("connect"));
    let s = t0() + Duration::minutes(1);
    let mut ids = Vec::new();
    for _ in 0..8 {
        let id = new_call_id();
        fx.store
            .call_started(started(&fx, &id, "outbound", "engine-a", s))
            .await
            .expect("started");
        fx.store
            .call_answered(CallAnswered {
                call_id: id.clone(),
                answered_at: s,
                to: None,
                timeline: vec![],
            })
            .await
            .expect("answered");
        ids.push(id);
    }
    let end = s + Duration::milliseconds(61_200);
    // Every call is ended by both stores at the same time.
    let mut tasks = Vec::new();
    for id in &ids {
        for store in [fx.store.clone(), second.clone()] {
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .call_ended(ended(&id, CallStatus::Completed, end))
                    .await
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("join").expect("ended"));
    }
    // Both enders of a call see the same charge.
    for pair in results.chunks(2) {
        assert_eq!(pair[0], pair[1]);
    }
    let charged: i64 = results.chunks(2).map(|p| p[0].cost_minor).sum();
    assert_eq!(charged, 1_000, "everything the wallet held, and no more");
    assert_eq!(balance(&fx).await, 0);
    let charges = call_charges(&fx).await;
    let refs: std::collections::HashSet<_> = charges.iter().map(|e| e.reference.clone()).collect();
    assert_eq!(refs.len(), charges.len(), "one ledger row per call at most");
    assert_eq!(-charges.iter().map(|e| e.amount_minor).sum::<i64>(), 1_000);
    // Newest first: the latest row's balance_after is the wallet's balance.
    assert_eq!(charges[0].balance_after_minor, 0);
    let mut uncollected = 0;
    for id in &ids {
        let c = stored_call(&fx, id).await;
        assert_eq!(c.cost_minor + c.uncollected_minor, 310);
        uncollected += c.uncollected_minor;
    }
    assert_eq!(uncollected, 8 * 310 - 1_000);
    assert_eq!(events_of_kind(&fx, "call.completed").await, 8);
}
on_both_backends!(concurrent_ends_charge_once_and_never_overdraw);

/// Writes from many calls at once are committed in groups; a bad write in a group (a number that
/// does not exist) fails alone and every other write lands.
async fn group_commit_isolates_a_bad_write(backend: Backend) {
    let fx = fixture(backend, 100_000, 60, 0).await;
    let ids: Vec<String> = (0..40).map(|_| new_call_id()).collect();
    let mut starts = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut s = started(&fx, id, "inbound", "engine-a", t0());
        if i == 17 {
            s.number_id = new_call_id();
        }
        let store = fx.store.clone();
        starts.push(tokio::spawn(async move { store.call_started(s).await }));
    }
    let mut failed = Vec::new();
    for (i, h) in starts.into_iter().enumerate() {
        if h.await.expect("join").is_err() {
            failed.push(i);
        }
    }
    assert_eq!(failed, [17], "only the write for the unknown number fails");
    // Answer and end all the others concurrently: each is charged exactly once.
    let mut ends = Vec::new();
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != 17) {
        let store = fx.store.clone();
        let id = id.clone();
        let at = t0() + Duration::seconds(i as i64);
        ends.push(tokio::spawn(async move {
            store
                .call_answered(CallAnswered {
                    call_id: id.clone(),
                    answered_at: at,
                    to: None,
                    timeline: vec![],
                })
                .await?;
            store
                .call_ended(ended(
                    &id,
                    CallStatus::Completed,
                    at + Duration::seconds(30),
                ))
                .await
        }));
    }
    for h in ends {
        let charged = h.await.expect("join").expect("ended");
        assert_eq!(charged.duration_seconds, 30);
        assert_eq!(charged.cost_minor, 30);
    }
    assert_eq!(call_charges(&fx).await.len(), 39);
    assert_eq!(balance(&fx).await, 100_000 - 39 * 30);
}
on_both_backends!(group_commit_isolates_a_bad_write);

/// Ends of many calls of one wallet at once, as the group commit applies them together: the
/// ledger reads as if they were charged one by one (each row's balance follows from the one
/// before), `wallet.low_balance` fires once, right before the `call.completed` of the call that
/// crossed the threshold, and each call's timeline keeps its order.
async fn a_group_of_ends_debits_in_order(backend: Backend) {
    // 1,000 left after the claim; 20 calls of 30 s at 60/min cost 30 each.
    let fx = fixture(backend, 1_000, 60, 0).await;
    fx.store
        .set_low_balance_threshold(&fx.ws, 700, t0())
        .await
        .expect("threshold");
    let ids: Vec<String> = (0..20).map(|_| new_call_id()).collect();
    for id in &ids {
        fx.store
            .call_started(started(&fx, id, "inbound", "engine-a", t0()))
            .await
            .expect("started");
        fx.store
            .call_answered(CallAnswered {
                call_id: id.clone(),
                answered_at: t0(),
                to: None,
                timeline: vec![entry(t0(), "sip.received", json!({"method": "ACK"}))],
            })
            .await
            .expect("answered");
    }
    let end = t0() + Duration::seconds(30);
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let store = fx.store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                store
                    .call_ended(ended(&id, CallStatus::Completed, end))
                    .await
            })
        })
        .collect();
    for t in tasks {
        let charged = t.await.expect("join").expect("ended");
        assert_eq!((charged.duration_seconds, charged.cost_minor), (30, 30));
    }
    assert_eq!(balance(&fx).await, 1_000 - 20 * 30);
    // Newest first; each row is 30 below the one before it.
    let charges = call_charges(&fx).await;
    assert_eq!(charges.len(), 20);
    let afters: Vec<i64> = charges
        .iter()
        .rev()
        .map(|e| e.balance_after_minor)
        .collect();
    let want: Vec<i64> = (1..=20).map(|k| 1_000 - 30 * k).collect();
    assert_eq!(afters, want);

    assert_eq!(events_of_kind(&fx, "wallet.low_balance").await, 1);
    // The crossing: the first charge that left less than 700 (670).
    let crossing = charges
        .iter()
        .find(|e| e.balance_after_minor == 670)
        .expect("the crossing charge");
    let call_id = crossing.reference.clone().expect("reference");
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT event_kind, call_id, body FROM events WHERE workspace_id = $1 \
         AND event_kind IN ('wallet.low_balance', 'call.completed') ORDER BY id",
    )
    .bind(&fx.ws)
    .fetch_all(&fx.store.db().read)
    .await
    .expect("events");
    let at = rows
        .iter()
        .position(|r| r.try_get::<String, _>("event_kind").expect("kind") == "wallet.low_balance")
        .expect("low balance event");
    let next: Option<String> = rows[at + 1].try_get("call_id").expect("call_id");
    assert_eq!(next.as_deref(), Some(call_id.as_str()));
    let body: String = rows[at].try_get("body").expect("body");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["payload"]["balance_minor"], 670);

    for id in &ids {
        let kinds: Vec<String> = timeline(&fx, id)
            .await
            .into_iter()
            .map(|t| t.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "sip.received",
                "sip.received",
                "sip.received",
                "call.charged"
            ],
            "INVITE, ACK, BYE, then the charge"
        );
        assert_eq!(
            event_kinds(&fx, id).await,
            ["call.started", "call.answered", "call.completed"]
        );
    }
}
on_both_backends!(a_group_of_ends_debits_in_order);

/// A call's answer queued without waiting (as the Call actor does on ACK) and its end right
/// behind it, for many calls at once: answers and ends share a group commit, and each call is
/// still answered before it ends (rated from its answer), with its events and timeline in order.
async fn queued_answers_and_their_ends_commit_together_in_order(backend: Backend) {
    // 1,000 left after the claim; 10 calls of 20 s at 60/min cost 20 each.
    let fx = fixture(backend, 1_000, 60, 0).await;
    let ids: Vec<String> = (0..10).map(|_| new_call_id()).collect();
    for id in &ids {
        fx.store
            .call_started(started(&fx, id, "inbound", "engine-a", t0()))
            .await
            .expect("started");
    }
    let answered_at = t0() + Duration::seconds(1);
    let end = answered_at + Duration::seconds(20);
    let mut receipts = Vec::new();
    let mut ends = Vec::new();
    for id in &ids {
        receipts.push(fx.store.queue_call_answered(CallAnswered {
            call_id: id.clone(),
            answered_at,
            to: None,
            timeline: vec![entry(answered_at, "sip.received", json!({"method": "ACK"}))],
        }));
        let store = fx.store.clone();
        let id = id.clone();
        ends.push(tokio::spawn(async move {
            store
                .call_ended(ended(&id, CallStatus::Completed, end))
                .await
        }));
    }
    for r in receipts {
        r.await.expect("answered");
    }
    for e in ends {
        let charged = e.await.expect("join").expect("ended");
        assert_eq!((charged.duration_seconds, charged.cost_minor), (20, 20));
    }
    assert_eq!(balance(&fx).await, 1_000 - 10 * 20);
    assert_eq!(call_charges(&fx).await.len(), 10);
    for id in &ids {
        let c = stored_call(&fx, id).await;
        assert_eq!(c.status, CallStatus::Completed);
        assert_eq!(c.answered_at, Some(answered_at));
        assert_eq!(
            event_kinds(&fx, id).await,
            ["call.started", "call.answered", "call.completed"]
        );
        let details: Vec<Value> = timeline(&fx, id)
            .await
            .into_iter()
            .map(|t| t.detail)
            .collect();
        assert_eq!(details[0]["method"], "INVITE");
        assert_eq!(details[1]["method"], "ACK");
        assert_eq!(details[2]["method"], "BYE");
    }
}
on_both_backends!(queued_answers_and_their_ends_commit_together_in_order);

/// SQLite: the usual webhook lease (nothing due in the delivery table, one receiver per event)
/// writes nothing, so it runs without SQLite's write lock and never holds up a call's writes.
/// Here another connection holds that lock for the whole lease.
#[tokio::test]
async fn sqlite_lease_of_new_events_needs_no_write_lock() {
    use sautikit_actors::webhook::Outbox;
    use sqlx::{Connection, Executor};

    let fx = fixture(Backend::Sqlite, 1_000, 0, 0).await;
    fx.store
        .update_routing(
            &fx.ws,
            &fx.number.id,
            &sautikit::store::RoutingChange {
                voice_callback_url: None,
                events_url: Some(Some("http://127.0.0.1:9/events".into())),
            },
            t0(),
        )
        .await
        .expect("events_url");
    // The first lease also clears lapsed leases, a write done again only once the lease's clock
    // (fixed here) has moved on a second: out of the way.
    let lease_until = t0() + Duration::seconds(60);
    let none = fx
        .store
        .lease_due(t0(), 16, lease_until)
        .await
        .expect("lease");
    assert!(none.is_empty());
    let id = new_call_id();
    fx.store
        .call_started(started(&fx, &id, "inbound", "engine-a", t0()))
        .await
        .expect("start");

    let mut holder = sqlx::AnyConnection::connect(&fx._db.url)
        .await
        .expect("connect");
    holder.execute("BEGIN IMMEDIATE").await.expect("write lock");
    let leased = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        fx.store.lease_due(t0(), 16, lease_until),
    )
    .await
    .expect("the lease waited for the write lock")
    .expect("lease");
    holder.execute("ROLLBACK").await.expect("rollback");
    let kinds: Vec<&str> = leased.iter().map(|d| d.event_kind.as_str()).collect();
    assert_eq!(kinds, ["call.started"]);
    assert_eq!(leased[0].url, "http://127.0.0.1:9/events");
}

/// PostgreSQL: a call's start (which the caller waits for before the voice callback) does not
/// queue behind other calls' writes. Another connection holds call A's row locked, so the end of A
/// waits in its batch; the start of call B must still commit, and A's end once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_start_does_not_wait_behind_a_blocked_end() {
    use sqlx::{Connection, Executor};

    if !common::postgres_available() {
        return;
    }
    let fx = fixture(Backend::Postgres, 5_000, 0, 0).await;
    let a = new_call_id();
    let s = t0() + Duration::minutes(1);
    fx.store
        .call_started(started(&fx, &a, "inbound", "engine-a", s))
        .await
        .expect("start A");

    let mut holder = sqlx::AnyConnection::connect(&fx._db.url)
        .await
        .expect("connect");
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .expect("pid");
    holder.execute("BEGIN").await.expect("begin");
    holder
        .execute(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM calls WHERE id = '{a}' FOR UPDATE"
        )))
        .await
        .expect("lock A");
    let store = fx.store.clone();
    let end_a = tokio::spawn({
        let end = ended(&a, CallStatus::Canceled, s + Duration::seconds(5));
        async move { store.call_ended(end).await }
    });
    // The end of A is queued (and blocked) once the holder's lock has a waiter.
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE {holder_pid} = ANY(pg_blocking_pids(pid))"
    );
    let mut watcher = sqlx::AnyConnection::connect(&fx._db.url)
        .await
        .expect("connect");
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(waiting.clone()))
                .fetch_one(&mut watcher)
                .await
                .expect("pg_locks");
            if n > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the end of A never reached the locked row");

    let b = new_call_id();
    // Without a lane of its own the start waits as long as the lock is held: forever here.
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        fx.store.call_started(started(
            &fx,
            &b,
            "inbound",
            "engine-a",
            s + Duration::seconds(1),
        )),
    )
    .await
    .expect("the start of B waited behind the blocked end of A")
    .expect("start B");
    assert!(!end_a.is_finished(), "the end of A was not blocked");

    holder.execute("ROLLBACK").await.expect("release A");
    let charged = end_a.await.expect("join").expect("end A");
    assert_eq!(charged.cost_minor, 0);
    assert_eq!(stored_call(&fx, &a).await.status, CallStatus::Canceled);
    assert_eq!(stored_call(&fx, &b).await.status, CallStatus::Ringing);
    assert_eq!(event_kinds(&fx, &b).await, ["call.started"]);
}

/// `fx.store.reserve` for the fixture's workspace, at the fixture's time.
async fn reserve(fx: &Fx, call_id: &str, want: i64, at_least: i64) -> Option<i64> {
    fx.store
        .reserve(call_id, &fx.ws, want, at_least, t0() + Duration::minutes(1))
        .await
        .expect("reserve")
}

/// Prepaid reservations (DESIGN §4): concurrent calls of one wallet share its balance, one
/// reservation at a time from two stores (two processes) never over-reserves, an extension takes
/// a slice or what is left, a call's end releases its reservation and charges at most what it
/// held, an unanswered call's reservation is released for nothing, and after a crash closing the
/// orphaned call settles its reservation.
async fn reservations_share_the_balance_and_settle_with_the_call(backend: Backend) {
    // 1,050 left after the claim: three slices of 300 (a minute at 300/min) and 150 spare.
    let fx = fixture(backend, 1_050, 0, 300).await;
    let second = SqlStore::new(Db::connect(&fx._db.url).await.expect("connect"));
    let s = t0() + Duration::minutes(1);
    let mut ids = Vec::new();
    for _ in 0..6 {
        let id = new_call_id();
        fx.store
            .call_started(started(&fx, &id, "outbound", "engine-a", s))
            .await
            .expect("started");
        ids.push(id);
    }
    // Six calls ask for their first slice at once, through two stores.
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let store = if i % 2 == 0 {
            fx.store.clone()
        } else {
            second.clone()
        };
        let (id, ws) = (id.clone(), fx.ws.clone());
        tasks.push(tokio::spawn(async move {
            store.reserve(&id, &ws, 300, 300, s).await.expect("reserve")
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.expect("task"));
    }
    let reserved: Vec<usize> = (0..6).filter(|i| got[*i] == Some(300)).collect();
    assert_eq!(reserved.len(), 3, "three slices fit: {got:?}");
    assert!(got.iter().all(|g| *g == Some(300) || g.is_none()));
    let (a, b, c) = (&ids[reserved[0]], &ids[reserved[1]], &ids[reserved[2]]);
    let refused = &ids[(0..6).find(|i| got[*i].is_none()).expect("a refused call")];
    // A refused call can still take what is left to extend, but not a whole slice to start.
    assert_eq!(reserve(&fx, refused, 300, 300).await, None);
    // Extensions: `a` takes the 150 left, then nothing is left for `b`.
    assert_eq!(reserve(&fx, a, 300, 1).await, Some(450));
    assert_eq!(reserve(&fx, b, 300, 1).await, None);
    assert_eq!(balance(&fx).await, 1_050, "reserving takes nothing yet");

    // `a` answered and talked 90.02 s: rated 91 s (455) but charged what it held (450).
    fx.store
        .call_answered(CallAnswered {
            call_id: a.clone(),
            answered_at: s,
            to: None,
            timeline: vec![],
        })
        .await
        .expect("answered");
    let charged = fx
        .store
        .call_ended(ended(
            a,
            CallStatus::Completed,
            s + Duration::milliseconds(90_020),
        ))
        .await
        .expect("ended");
    assert_eq!(charged.duration_seconds, 91);
    assert_eq!(charged.cost_minor, 450);
    assert_eq!(balance(&fx).await, 600);
    // `b` never answered: its slice is released for nothing.
    fx.store
        .call_ended(ended(b, CallStatus::NoAnswer, s + Duration::seconds(20)))
        .await
        .expect("ended");
    assert_eq!(balance(&fx).await, 600);
    // Free now: 600 less `c`'s 300. A new call can start; an ended call cannot reserve.
    assert_eq!(reserve(&fx, refused, 300, 300).await, Some(300));
    assert_eq!(reserve(&fx, b, 300, 1).await, None);
    assert_eq!(reserve(&fx, refused, 300, 1).await, None);

    // The engine holding `c` dies while it talks: closing the orphan settles its reservation,
    // charged from the call row but never past what it held.
    fx.store
        .call_answered(CallAnswered {
            call_id: c.clone(),
            answered_at: s,
            to: None,
            timeline: vec![],
        })
        .await
        .expect("answered");
    // Its engine was last heard 5 minutes in: the call is rated to then (5 minutes), and charged
    // no more than the one minute it held.
    second
        .engine_heartbeat("engine-a", s + Duration::minutes(5))
        .await
        .expect("beat");
    let later = s + Duration::minutes(10);
    let closed = second
        .close_orphaned_calls(later, "engine-b", later)
        .await
        .expect("close");
    assert_eq!(
        closed, 4,
        "`c`, the refused-then-reserved call and the two left ringing"
    );
    let call = stored_call(&fx, c).await;
    assert_eq!(call.status, CallStatus::Failed);
    assert_eq!(call.cost_minor, 300, "charged at most its reservation");
    assert_eq!(balance(&fx).await, 300);
    use sqlx::Row;
    let left: i64 = sqlx::query("SELECT COUNT(*) AS n FROM call_reservations")
        .fetch_one(&fx.store.db().read)
        .await
        .expect("count")
        .try_get("n")
        .expect("n");
    assert_eq!(left, 0, "no reservation outlives its call");
    let charges = call_charges(&fx).await;
    assert_eq!(charges.len(), 2);
    assert!(charges.iter().all(|e| e.balance_after_minor >= 0));
}
on_both_backends!(reservations_share_the_balance_and_settle_with_the_call);

/// A dialled party's leg is a call record of its own: it names its parent on the row and in its
/// events (other calls' payloads are unchanged), and a parent that does not exist is refused.
async fn dialled_legs_name_their_parent(backend: Backend) {
    let fx = fixture(backend, 5_000, 0, 300).await;
    let s = t0() + Duration::minutes(1);
    let parent = new_call_id();
    fx.store
        .call_started(started(&fx, &parent, "inbound", "engine-a", s))
        .await
        .expect("parent");
    let leg = new_call_id();
    fx.store
        .call_started(CallStarted {
            parent_call_id: Some(parent.clone()),
            ..started(&fx, &leg, "outbound", "engine-a", s)
        })
        .await
        .expect("leg");
    assert_eq!(
        stored_call(&fx, &leg).await.parent_call_id.as_deref(),
        Some(parent.as_str())
    );
    assert_eq!(
        stored_call(&fx, &leg).await.rate_per_min_minor,
        300,
        "outbound rate"
    );
    let leg_events = call_events(&fx, &leg).await;
    assert_eq!(
        leg_events[0].1["payload"]["parent_call_id"],
        parent.as_str(),
        "{leg_events:?}"
    );
    let parent_events = call_events(&fx, &parent).await;
    assert!(
        parent_events[0].1["payload"]
            .get("parent_call_id")
            .is_none()
    );
    let orphan = new_call_id();
    assert!(
        fx.store
            .call_started(CallStarted {
                parent_call_id: Some(new_call_id()),
                ..started(&fx, &orphan, "outbound", "engine-a", s)
            })
            .await
            .is_err(),
        "a leg of no call"
    );
    assert!(
        fx.store
            .get_call(&fx.ws, &orphan)
            .await
            .expect("get")
            .is_none()
    );
}
on_both_backends!(dialled_legs_name_their_parent);

fn placed(fx: &Fx, at: DateTime<Utc>, max_live: i64) -> sautikit::calls_store::NewPlacedCall {
    let call_id = new_call_id();
    sautikit::calls_store::NewPlacedCall {
        sip_call_id: format!("{call_id}@test"),
        call_id,
        workspace_id: fx.ws.clone(),
        number_id: fx.number.id.clone(),
        from: fx.number.number.clone(),
        to: "+254711000001".into(),
        engine_id: "engine-a".into(),
        started_at: at,
        client_request_id: Some("crm-1".into()),
        voice_callback_url: None,
        events_url: None,
        slice_minor: 300,
        max_live,
        idempotency: None,
    }
}

/// Calls placed through the API at once, from two stores (two processes), many of them sharing
/// a group commit: the limit of live placed calls and the wallet's free balance each admit
/// exactly as many as fit, counted in one place, and a refused call writes nothing. An end frees
/// its slot and its reservation for the next.
async fn placed_calls_are_admitted_exactly_up_to_the_limit_and_the_balance(backend: Backend) {
    use sautikit::calls_store::PlacedCallStart;
    use sautikit::idempotency::IdempotencyBegin;

    // 1,500 left after the claim: five first slices of 300.
    let fx = fixture(backend, 1_500, 0, 300).await;
    let second = SqlStore::new(Db::connect(&fx._db.url).await.expect("connect"));
    let place_all = |n: usize, max_live: i64| {
        let mut tasks = Vec::new();
        for i in 0..n {
            let store = if i % 2 == 0 {
                fx.store.clone()
            } else {
                second.clone()
            };
            let mut c = placed(&fx, t0(), max_live);
            // Each under an Idempotency-Key, which only a written call marks applied.
            c.idempotency = Some(sautikit_actors::store::IdempotencyMark {
                workspace_id: fx.ws.clone(),
                key: c.call_id.clone(),
            });
            tasks.push(tokio::spawn(async move {
                let key = &c.call_id;
                let begun = store
                    .idempotency_begin(&c.workspace_id, key, "h", t0())
                    .await;
                assert_eq!(begun.expect("begin"), IdempotencyBegin::Fresh);
                let r = store.start_placed_call(&c).await.expect("placed");
                let forgotten = store.idempotency_forget(&c.workspace_id, key).await;
                assert_eq!(
                    forgotten.expect("forget"),
                    !matches!(r, PlacedCallStart::Written { .. }),
                    "{r:?}: the key is kept exactly when the call was written"
                );
                (c.call_id, r)
            }));
        }
        tasks
    };
    let mut results = Vec::new();
    for t in place_all(12, 3) {
        results.push(t.await.expect("task"));
    }
    let written: Vec<&String> = results
        .iter()
        .filter(|(_, r)| matches!(r, PlacedCallStart::Written { .. }))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(written.len(), 3, "the limit admits three: {results:?}");
    assert!(results.iter().all(|(_, r)| *r
        == PlacedCallStart::Written {
            reserved_minor: 300
        }
        || *r == PlacedCallStart::ConcurrencyExceeded));
    for (id, r) in &results {
        let stored = fx.store.get_call(&fx.ws, id).await.expect("read");
        assert_eq!(stored.is_some(), *r != PlacedCallStart::ConcurrencyExceeded);
    }
    let first = stored_call(&fx, written[0]).await;
    assert_eq!(first.status, CallStatus::Ringing);
    assert_eq!(first.rate_per_min_minor, 300);
    assert_eq!(event_kinds(&fx, written[0]).await, ["call.started"]);
    assert_eq!(timeline(&fx, written[0]).await[0].kind, "call.created");

    // A higher limit: now the balance admits two more (five slices in all), and no more.
    let mut results = Vec::new();
    for t in place_all(12, 100) {
        results.push(t.await.expect("task"));
    }
    let more = results
        .iter()
        .filter(|(_, r)| matches!(r, PlacedCallStart::Written { .. }))
        .count();
    assert_eq!(more, 2, "two more slices fit: {results:?}");
    assert!(results.iter().all(|(_, r)| matches!(
        r,
        PlacedCallStart::Written { .. } | PlacedCallStart::InsufficientFunds
    )));

    // An unanswered end frees its slice for nothing, and the next call gets it.
    fx.store
        .call_ended(ended(
            written[0],
            CallStatus::NoAnswer,
            t0() + Duration::seconds(30),
        ))
        .await
        .expect("ended");
    assert_eq!(balance(&fx).await, 1_500);
    let c = placed(&fx, t0() + Duration::seconds(31), 100);
    assert_eq!(
        fx.store.start_placed_call(&c).await.expect("placed"),
        PlacedCallStart::Written {
            reserved_minor: 300
        }
    );
    let c = placed(&fx, t0() + Duration::seconds(31), 100);
    assert_eq!(
        fx.store.start_placed_call(&c).await.expect("placed"),
        PlacedCallStart::InsufficientFunds
    );
}
on_both_backends!(placed_calls_are_admitted_exactly_up_to_the_limit_and_the_balance);
