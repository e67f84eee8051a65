//! Money over a number's life (DESIGN §4): monthly renewals on the claim's day of the month,
//! suspension when the wallet cannot pay, reactivation by a top-up (oldest first), release after
//! 30 days unpaid, exactly once across a `kill -9` and across two engines, and usage reports that
//! equal the ledger. Time moves with `sautikit admin run-due --at` and with the dev server's
//! `SAUTIKIT_DEV_CLOCK_START`; nothing sleeps for a month.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::peer::{SipCaller, sdp};
use common::receiver::Receiver;
use common::uac::status_code;
use common::{Api, BIN, Backend, Mode, Server, TestDb, wait_for_json};
use sautikit::db::Db;
use sautikit::store::SqlStore;
use sautikit_actors::call_store::{CallAnswered, CallEnded, CallStarted, CallStatus, CallStore};
use sautikit_actors::model::LedgerKind;
use sautikit_actors::store::{CreditWallet, Store};
use sautikit_sip::sdp::Codec;
use serde_json::{Value, json};
use sqlx::Row;

/// The dev inventory's monthly price.
const PRICE: i64 = 10_000;

fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

async fn webhook(api: &Api, receiver: &Receiver) {
    let r = api
        .post(
            "/v1/webhooks",
            Some(json!({"url": receiver.url("/hooks"), "events": ["number.*", "wallet.*"]})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

fn events_of(receiver: &Receiver, kind: &str) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    receiver
        .hits()
        .iter()
        .map(|h| h.json())
        .filter(|e| e["event_kind"] == kind)
        // Deliveries are at least once: count each event once.
        .filter(|e| seen.insert(e["event_id"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

async fn wait_events(receiver: &Receiver, kind: &str, n: usize) -> Vec<Value> {
    receiver
        .wait_until(StdDuration::from_secs(20), |_| {
            events_of(receiver, kind).len() >= n
        })
        .await;
    let got = events_of(receiver, kind);
    assert_eq!(got.len(), n, "{kind} events: {got:?}");
    got
}

/// Every ledger row of the workspace, oldest first.
async fn ledger(api: &Api) -> Vec<Value> {
    let mut rows = api.get_all("/v1/wallet/transactions").await;
    rows.reverse();
    rows
}

async fn balance(api: &Api) -> i64 {
    api.get("/v1/wallet").await.json()["balance_minor"]
        .as_i64()
        .expect("balance")
}

/// The balance and the ledger agree: the latest row's balance is the wallet's, and every row's
/// balance is the one before it plus its amount.
async fn assert_ledger_agrees(api: &Api) {
    let rows = ledger(api).await;
    let mut running = 0;
    for r in &rows {
        running += r["amount_minor"].as_i64().unwrap();
        assert_eq!(r["balance_after_minor"].as_i64().unwrap(), running, "{r}");
    }
    assert_eq!(balance(api).await, running);
}

fn run_due(db: &TestDb, t: DateTime<Utc>) -> Value {
    db.admin(&["run-due", "--at", &rfc(t)])
}

async fn renewals_follow_the_claim_day(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[("SAUTIKIT_DEV_CLOCK_START", "2027-01-31T10:00:00Z")],
    );
    let api = server.api(&common::dev_key(&db.data_dir));
    let hooks = Receiver::ok().await;
    webhook(&api, &hooks).await;
    let start = balance(&api).await;
    let number_id = common::device::claim(&api, common::device::FIRST_INVENTORY_ID).await;
    let n = api.get(&format!("/v1/numbers/{number_id}")).await.json();
    assert!(
        n["next_renewal_at"]
            .as_str()
            .unwrap()
            .starts_with("2027-02-28T10:00"),
        "Jan 31 renews on Feb 28: {n}"
    );

    // Nothing is due the day before.
    let r = run_due(&db, at(2027, 2, 27, 12));
    assert_eq!(r["renewed"], 0, "{r}");
    let r = run_due(&db, at(2027, 2, 28, 12));
    assert_eq!(
        (r["renewed"].as_u64(), r["suspended"].as_u64()),
        (Some(1), Some(0)),
        "{r}"
    );
    // The same run again does nothing: one renewal per period.
    assert_eq!(run_due(&db, at(2027, 2, 28, 13))["renewed"], 0);
    let n = api.get(&format!("/v1/numbers/{number_id}")).await.json();
    assert!(
        n["next_renewal_at"]
            .as_str()
            .unwrap()
            .starts_with("2027-03-31T10:00"),
        "anchored to the 31st, not to Feb 28: {n}"
    );
    assert_eq!(n["status"], "active");
    let r = run_due(&db, at(2027, 3, 31, 12));
    assert_eq!(r["renewed"], 1, "{r}");
    let n = api.get(&format!("/v1/numbers/{number_id}")).await.json();
    assert!(
        n["next_renewal_at"]
            .as_str()
            .unwrap()
            .starts_with("2027-04-30T10:00"),
        "{n}"
    );

    // Three rentals in all (the claim and two renewals), one ledger row each, naming the number
    // and the period.
    let rentals: Vec<Value> = ledger(&api)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "number_rental")
        .collect();
    assert_eq!(rentals.len(), 3, "{rentals:?}");
    let periods: Vec<(&str, &str)> = rentals
        .iter()
        .map(|r| {
            assert_eq!(r["reference"], number_id.as_str());
            assert_eq!(r["amount_minor"], -PRICE);
            (
                &r["period_start"].as_str().unwrap()[..10],
                &r["period_end"].as_str().unwrap()[..10],
            )
        })
        .collect();
    assert_eq!(
        periods,
        [
            ("2027-01-31", "2027-02-28"),
            ("2027-02-28", "2027-03-31"),
            ("2027-03-31", "2027-04-30")
        ]
    );
    assert_eq!(balance(&api).await, start - 3 * PRICE);
    assert_ledger_agrees(&api).await;
    let renewed = wait_events(&hooks, "number.renewed", 2).await;
    assert_eq!(renewed[0]["payload"]["number_id"], number_id.as_str());
    assert_eq!(renewed[0]["payload"]["amount_minor"], PRICE);
    let mut starts: Vec<&str> = renewed
        .iter()
        .map(|e| &e["payload"]["period_start"].as_str().unwrap()[..10])
        .collect();
    starts.sort_unstable();
    assert_eq!(starts, ["2027-02-28", "2027-03-31"]);
}
on_both_backends!(renewals_follow_the_claim_day);

async fn invite_status(server: &Server, number: &str) -> u16 {
    let mut caller = SipCaller::new(server.sip_addr(), number).await;
    let offer = sdp("127.0.0.1:40000".parse().unwrap(), Codec::Pcmu, 101);
    caller.invite(&offer).await;
    let (_, last) = caller.await_final(StdDuration::from_secs(10)).await;
    let code = status_code(&last).unwrap_or(0);
    if code < 300 {
        caller.ack().await;
        caller.bye().await;
    } else {
        caller.ack().await;
    }
    code
}

async fn an_empty_wallet_suspends_and_a_top_up_reactivates_the_oldest(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (_, key) = db.workspace("renter", 3 * PRICE);
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[("SAUTIKIT_DEV_CLOCK_START", "2027-01-10T10:00:00Z")],
    );
    let api = server.api(&key);
    let hooks = Receiver::ok().await;
    webhook(&api, &hooks).await;
    let available = api
        .get("/v1/numbers/available?country=KE&currency=KES")
        .await
        .json();
    let inventory: Vec<String> = available.as_array().unwrap()[..3]
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    let mut ids = Vec::new();
    let mut numbers = Vec::new();
    for inv in &inventory {
        let r = api.post(&format!("/v1/numbers/{inv}/claim"), None).await;
        assert_eq!(r.status, 201, "{}", r.text);
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
        numbers.push(
            r.json()["number"]
                .as_str()
                .unwrap()
                .trim_start_matches('+')
                .to_owned(),
        );
    }
    assert_eq!(balance(&api).await, 0);
    let (_, user, password) = common::device::new_credential(&api, &ids[2], "desk").await;
    drop(server);

    // A month and a day later, with the wallet empty: the engine's scheduler catches up on start
    // and suspends all three.
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[("SAUTIKIT_DEV_CLOCK_START", "2027-02-11T09:00:00Z")],
    );
    let api = server.api(&key);
    for id in &ids {
        wait_for_json(
            &api,
            &format!("/v1/numbers/{id}"),
            StdDuration::from_secs(20),
            |n: &Value| n["status"] == "suspended",
        )
        .await;
    }
    let suspended = wait_events(&hooks, "number.suspended", 3).await;
    for e in &suspended {
        assert_eq!(e["payload"]["amount_due_minor"], PRICE, "{e}");
        assert_eq!(e["payload"]["currency"], "KES");
    }
    let n = api.get(&format!("/v1/numbers/{}", ids[0])).await.json();
    assert!(n["suspended_at"].is_string(), "{n}");
    // The number and its routing are kept; calls and devices are refused.
    assert_eq!(invite_status(&server, &numbers[0]).await, 403);
    let mut device = common::device::Device::udp(server.sip_addr(), &user, &password).await;
    let contact = device.contact();
    let refused = device
        .register(&format!("Contact: {contact}\r\n"), "SHA-256")
        .await;
    assert_eq!(status_code(&refused), Some(403), "{refused}");

    // A top-up that pays two of the three renews the two oldest, at once.
    let r = api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": 2 * PRICE, "currency": "KES"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json()["reactivated_number_ids"], json!([ids[0], ids[1]]));
    assert_eq!(r.json()["balance_minor"], 0);
    for (i, want) in [(0, "active"), (1, "active"), (2, "suspended")] {
        let n = api.get(&format!("/v1/numbers/{}", ids[i])).await.json();
        assert_eq!(n["status"], want, "{n}");
    }
    let n = api.get(&format!("/v1/numbers/{}", ids[0])).await.json();
    assert!(
        n["next_renewal_at"]
            .as_str()
            .unwrap()
            .starts_with("2027-03-10"),
        "{n}"
    );
    let reactivated = wait_events(&hooks, "number.reactivated", 2).await;
    let mut got: Vec<&str> = reactivated
        .iter()
        .map(|e| e["payload"]["number_id"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    let mut want = vec![ids[0].as_str(), ids[1].as_str()];
    want.sort_unstable();
    assert_eq!(got, want);
    // A reactivated number takes calls again (no callback and no device: 480, not 403); the
    // still-suspended one does not.
    assert_eq!(invite_status(&server, &numbers[0]).await, 480);
    assert_eq!(invite_status(&server, &numbers[2]).await, 403);
    assert_ledger_agrees(&api).await;

    // 30 days after its suspension the unpaid one is released to the inventory; the other two
    // fell due on Mar 10 with an empty wallet and are suspended.
    let r = run_due(&db, at(2027, 3, 13, 12));
    assert_eq!(
        (
            r["renewed"].as_u64(),
            r["suspended"].as_u64(),
            r["released"].as_u64()
        ),
        (Some(0), Some(2), Some(1)),
        "{r}"
    );
    let n = api.get(&format!("/v1/numbers/{}", ids[2])).await.json();
    assert_eq!(n["status"], "released", "{n}");
    let back = api
        .get_all("/v1/numbers/available?country=KE&currency=KES")
        .await;
    assert!(
        back.iter().any(|n| n["id"] == inventory[2].as_str()),
        "back in the inventory"
    );
    let released = wait_events(&hooks, "number.released", 1).await;
    assert_eq!(released[0]["payload"]["reason"], "unpaid");
    assert_eq!(released[0]["payload"]["number_id"], ids[2].as_str());
    assert_ledger_agrees(&api).await;
}
on_both_backends!(an_empty_wallet_suspends_and_a_top_up_reactivates_the_oldest);

/// `count` numbers claimed on Jan 31 across `workspaces` workspaces, each wallet able to pay one
/// renewal of each of its numbers.
struct Many {
    db: TestDb,
    store: SqlStore,
    workspaces: Vec<String>,
    count: usize,
}

async fn many_due(backend: Backend, workspaces: usize, count: usize) -> Many {
    let db = TestDb::new(backend).await;
    let conn = Db::connect(&db.url).await.expect("connect");
    conn.migrate().await.expect("migrate");
    let store = SqlStore::new(conn);
    let ws = common::store::claim_many(
        &store,
        workspaces,
        count,
        254_720_000_000,
        PRICE,
        at(2027, 1, 31, 10),
    )
    .await;
    Many {
        db,
        store,
        workspaces: ws,
        count,
    }
}

impl Many {
    fn run_due(&self, batch: usize) -> std::process::Child {
        Command::new(BIN)
            .args([
                "admin",
                "run-due",
                "--at",
                "2027-02-28T12:00:00Z",
                "--progress",
            ])
            .args(["--batch", &batch.to_string()])
            .env("SAUTIKIT_DATABASE_URL", &self.db.url)
            .env("SAUTIKIT_DATA_DIR", &self.db.data_dir)
            .env("SAUTIKIT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn run-due")
    }

    async fn scalar(&self, sql: &'static str) -> i64 {
        sqlx::query(sql)
            .fetch_one(&self.store.db().read)
            .await
            .expect("query")
            .try_get::<i64, _>(0)
            .expect("a number")
    }

    async fn renewals(&self) -> i64 {
        self.scalar(
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'number_rental' \
             AND period_start >= '2027-02'",
        )
        .await
    }

    /// Every number renewed exactly once for period 1, and each wallet's balance is its opening
    /// credit less its rentals, equal to its ledger.
    async fn assert_each_renewed_once(&self) {
        assert_eq!(self.renewals().await, self.count as i64);
        assert_eq!(
            self.scalar(
                "SELECT COUNT(*) FROM tenant_numbers WHERE rental_period <> 1 \
                 OR status <> 'active' OR next_renewal_at NOT LIKE '2027-03-31%'"
            )
            .await,
            0
        );
        assert_eq!(
            self.scalar(
                "SELECT COUNT(*) FROM (SELECT reference FROM ledger_entries \
                 WHERE kind = 'number_rental' GROUP BY reference HAVING COUNT(*) <> 2) AS d"
            )
            .await,
            0,
            "a number paid other than twice"
        );
        let per = (self.count / self.workspaces.len()) as i64;
        for ws in &self.workspaces {
            let w = self
                .store
                .get_wallet(ws)
                .await
                .expect("wallet")
                .expect("one");
            assert_eq!(w.balance_minor, 0, "two months of {per} numbers paid");
            let sum: i64 = sqlx::query(
                "SELECT CAST(SUM(amount_minor) AS BIGINT) FROM ledger_entries \
                 WHERE workspace_id = $1",
            )
            .bind(ws)
            .fetch_one(&self.store.db().read)
            .await
            .expect("sum")
            .try_get(0)
            .expect("a sum");
            assert_eq!(sum, w.balance_minor);
        }
        let events = self
            .scalar("SELECT COUNT(*) FROM events WHERE event_kind = 'number.renewed'")
            .await;
        assert_eq!(events, self.count as i64, "one number.renewed per renewal");
    }
}

async fn a_kill_9_mid_batch_renews_each_number_once(backend: Backend) {
    let many = many_due(backend, 4, 2_000).await;
    let mut child = many.run_due(10);
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    // Kill it as soon as a few batches have committed.
    loop {
        let line = lines.next().expect("a progress line").expect("utf-8");
        let v: Value = serde_json::from_str(&line).expect("progress is JSON");
        if v["renewed"].as_u64().unwrap_or(0) >= 30 {
            break;
        }
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    let done = many.renewals().await;
    assert!(
        (30..many.count as i64).contains(&done),
        "killed part way: {done} of {} renewed",
        many.count
    );
    // The next run finishes the rest; none is renewed twice or skipped.
    let out = many.run_due(500).wait_with_output().expect("run-due");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["renewed"].as_i64(), Some(many.count as i64 - done), "{v}");
    many.assert_each_renewed_once().await;
}
on_both_backends!(a_kill_9_mid_batch_renews_each_number_once);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_postgres_renew_each_number_once() {
    if !common::postgres_available() {
        return;
    }
    let many = many_due(Backend::Postgres, 8, 3_000).await;
    let a = many.run_due(25);
    let b = many.run_due(25);
    let mut renewed = Vec::new();
    for child in [a, b] {
        let out = child.wait_with_output().expect("run-due");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        renewed.push(v["renewed"].as_i64().expect("renewed"));
    }
    eprintln!("renewals done by each engine: {renewed:?}");
    assert_eq!(
        renewed.iter().sum::<i64>(),
        many.count as i64,
        "{renewed:?}"
    );
    many.assert_each_renewed_once().await;
}

async fn usage_equals_the_ledger(backend: Backend) {
    let db = TestDb::new(backend).await;
    let conn = Db::connect(&db.url).await.expect("connect");
    conn.migrate().await.expect("migrate");
    let store = SqlStore::new(conn);
    let t0 = at(2027, 1, 5, 9);
    let ws = store
        .create_workspace("usage", "KES", 50_000, t0)
        .await
        .expect("workspace");
    let number = common::store::claim_first_number(
        &store,
        &ws.workspace_id,
        2,
        common::store::Prices {
            monthly: PRICE,
            inbound_per_min: 120,
            outbound_per_min: 300,
        },
        t0,
    )
    .await;
    // Calls in January and February, both directions, answered and not.
    let calls = [
        (at(2027, 1, 20, 8), "inbound", Some(61)),
        (at(2027, 1, 31, 23), "outbound", Some(30)),
        (at(2027, 2, 2, 12), "outbound", None),
        (at(2027, 2, 3, 12), "inbound", Some(125)),
    ];
    for (start, direction, talk) in calls {
        let id = uuid::Uuid::now_v7().to_string();
        store
            .call_started(CallStarted {
                call_id: id.clone(),
                workspace_id: ws.workspace_id.clone(),
                number_id: number.id.clone(),
                direction: direction.into(),
                from: "+254711111111".into(),
                to: number.number.clone(),
                sip_call_id: format!("sip-{id}"),
                engine_id: "e".into(),
                started_at: start,
                timeline: Vec::new(),
                parent_call_id: None,
            })
            .await
            .expect("started");
        let mut end = start + Duration::seconds(20);
        if let Some(secs) = talk {
            let answered = start + Duration::seconds(2);
            store
                .call_answered(CallAnswered {
                    call_id: id.clone(),
                    answered_at: answered,
                    to: None,
                    timeline: Vec::new(),
                })
                .await
                .expect("answered");
            end = answered + Duration::seconds(secs);
        }
        store
            .call_ended(CallEnded {
                call_id: id,
                status: if talk.is_some() {
                    CallStatus::Completed
                } else {
                    CallStatus::Failed
                },
                ended_at: end,
                hangup_cause: Some("caller_hangup".into()),
                failure_reason: None,
                sip_status: None,
                timeline: Vec::new(),
            })
            .await
            .expect("ended");
    }
    sautikit::renewals::Renewals::new(store.clone(), 30)
        .run(at(2027, 2, 5, 12), |_| {})
        .await
        .expect("renewal");
    store
        .credit_wallet(CreditWallet {
            workspace_id: ws.workspace_id.clone(),
            amount_minor: 7_000,
            currency: "KES".into(),
            kind: LedgerKind::TopUp,
            reference: None,
            now: at(2027, 2, 10, 12),
            idempotency: None,
        })
        .await
        .expect("top-up");
    let server = Server::start(&db, Mode::Dev);
    let api = server.api(&ws.api_key);

    let ledger_debits = |month: &'static str| {
        let store = store.clone();
        let ws = ws.workspace_id.clone();
        async move {
            let v: i64 = sqlx::query(
                "SELECT CAST(COALESCE(SUM(-amount_minor), 0) AS BIGINT) FROM ledger_entries \
                 WHERE workspace_id = $1 AND amount_minor < 0 AND created_at LIKE $2",
            )
            .bind(ws)
            .bind(format!("{month}%"))
            .fetch_one(&store.db().read)
            .await
            .expect("sum")
            .try_get(0)
            .expect("i64");
            v
        }
    };
    let r = api
        .get("/v1/usage?from=2027-01-01&to=2027-03-01&bucket=month")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let u = r.json();
    let buckets = u["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 2, "{u}");
    let jan = &buckets[0];
    let feb = &buckets[1];
    assert_eq!(
        jan["spend_minor"]["total"].as_i64(),
        Some(ledger_debits("2027-01").await)
    );
    assert_eq!(
        feb["spend_minor"]["total"].as_i64(),
        Some(ledger_debits("2027-02").await)
    );
    // January: the claim, 61 s inbound at 120/min (123 s → 122), 30 s outbound at 300/min.
    assert_eq!(jan["spend_minor"]["number_rental"], PRICE);
    assert_eq!(jan["spend_minor"]["inbound_calls"], 122);
    assert_eq!(jan["spend_minor"]["outbound_calls"], 150);
    assert_eq!(jan["calls"]["total"], 2);
    assert_eq!(jan["duration_seconds"], 91);
    // February: the renewal, 125 s inbound (250), one failed outbound call.
    assert_eq!(feb["spend_minor"]["number_rental"], PRICE);
    assert_eq!(feb["spend_minor"]["inbound_calls"], 250);
    assert_eq!(feb["calls"]["failed"], 1);
    assert_eq!(feb["credits_minor"], 7_000);
    assert_eq!(
        u["totals"]["spend_minor"]["total"].as_i64(),
        Some(ledger_debits("2027-01").await + ledger_debits("2027-02").await)
    );
    // By day, the same totals.
    let d = api
        .get("/v1/usage?from=2027-01-01&to=2027-03-01&bucket=day")
        .await
        .json();
    assert_eq!(d["buckets"].as_array().unwrap().len(), 59);
    assert_eq!(d["totals"]["spend_minor"], u["totals"]["spend_minor"]);
    let day_sum: i64 = d["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["spend_minor"]["total"].as_i64().unwrap())
        .sum();
    assert_eq!(Some(day_sum), u["totals"]["spend_minor"]["total"].as_i64());

    // Bad input gets the envelope.
    for q in [
        "from=2027-02-01&to=2027-01-01",
        "from=2026-01-01&to=2027-03-01",
        "bucket=week",
        "from=yesterday",
    ] {
        api.get(&format!("/v1/usage?{q}"))
            .await
            .assert_error(400, "request.invalid_query");
    }
    api.get("/v1/calls/stats?since=1y")
        .await
        .assert_error(400, "request.invalid_query");
    api.get("/v1/calls/stats?bucket=month")
        .await
        .assert_error(400, "request.invalid_query");
    let s = api.get("/v1/calls/stats?since=7d").await;
    assert_eq!(s.status, 200, "{}", s.text);
    let s = s.json();
    for key in [
        "total",
        "failed",
        "minutes_total",
        "spend_minor",
        "currency",
        "series",
    ] {
        assert!(s.get(key).is_some(), "{key} in {s}");
    }
}
on_both_backends!(usage_equals_the_ledger);
