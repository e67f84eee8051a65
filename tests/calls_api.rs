//! `GET /v1/calls…` and `POST /v1/calls/{id}/hangup` against a real server, with calls written
//! into its database through the store library (a second connection: WAL on SQLite).

#[macro_use]
mod common;

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use common::receiver::Receiver;
use common::{Api, Backend, Mode, Server, TestDb, dev_key, wait_for_json};
use sautikit::db::Db;
use sautikit::store::SqlStore;
use sautikit_actors::call_store::{
    CallAnswered, CallEnded, CallStarted, CallStatus, CallStore, TimelineEntry,
};
use serde_json::{Value, json};

/// The engine id our inserted calls claim. It beats far in the future, so a server that closes
/// orphaned calls never takes our live calls for orphans.
const TEST_ENGINE: &str = "calls-api-test";

/// Field order is drop order: the server stops before its database is dropped.
struct Fx {
    server: Server,
    store: SqlStore,
    api: Api,
    ws: String,
    other: Api,
    other_ws: String,
    _db: TestDb,
}

async fn claim(api: &Api, inventory_index: u32) -> (String, String) {
    let r = api
        .post(
            &format!("/v1/numbers/01900000-0000-7000-8000-{inventory_index:012}/claim"),
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let v = r.json();
    (
        v["id"].as_str().expect("id").to_owned(),
        v["number"].as_str().expect("number").to_owned(),
    )
}

async fn fixture(backend: Backend) -> Fx {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let api = server.api(&dev_key(&db.data_dir));
    let creds: Value = serde_json::from_slice(
        &std::fs::read(db.data_dir.join("dev-credentials.json")).expect("dev credentials"),
    )
    .expect("json");
    let ws = creds["workspace_id"].as_str().expect("id").to_owned();
    let (other_ws, other_key) = db.workspace("other", 100_000);
    let other = server.api(&other_key);
    let conn = Db::connect(&db.url).await.expect("connect");
    let store = SqlStore::new(conn);
    store
        .engine_heartbeat(TEST_ENGINE, Utc::now() + Duration::days(1))
        .await
        .expect("heartbeat");
    Fx {
        _db: db,
        server,
        store,
        api,
        ws,
        other,
        other_ws,
    }
}

fn entry(at: DateTime<Utc>, kind: &str, detail: Value) -> TimelineEntry {
    TimelineEntry {
        at,
        kind: kind.into(),
        detail,
    }
}

/// Start a call (and take it as far as `status`) through the store.
async fn call(
    store: &SqlStore,
    ws: &str,
    number_id: &str,
    number: &str,
    direction: &str,
    status: CallStatus,
    talk_ms: i64,
) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let s = Utc::now() - Duration::minutes(5);
    let (from, to) = if direction == "inbound" {
        ("+254711222333".to_owned(), number.to_owned())
    } else {
        (number.to_owned(), "+254711222333".to_owned())
    };
    store
        .call_started(CallStarted {
            call_id: id.clone(),
            workspace_id: ws.into(),
            number_id: number_id.into(),
            direction: direction.into(),
            from,
            to,
            sip_call_id: format!("sip-{id}"),
            engine_id: TEST_ENGINE.into(),
            started_at: s,
            timeline: vec![
                entry(s, "sip.received", json!({"method": "INVITE"})),
                entry(
                    s + Duration::milliseconds(3),
                    "sip.sent",
                    json!({"status": 180, "reason": "Ringing"}),
                ),
            ],
            parent_call_id: None,
        })
        .await
        .expect("started");
    if status == CallStatus::Ringing {
        return id;
    }
    let a = s + Duration::seconds(2);
    let answered = matches!(
        status,
        CallStatus::Answered | CallStatus::Completed | CallStatus::Failed
    );
    if answered {
        store
            .call_answered(CallAnswered {
                call_id: id.clone(),
                answered_at: a,
                to: None,
                timeline: vec![entry(a, "sip.received", json!({"method": "ACK"}))],
            })
            .await
            .expect("answered");
    }
    if status == CallStatus::Answered {
        return id;
    }
    let e = a + Duration::milliseconds(talk_ms);
    store
        .call_ended(CallEnded {
            call_id: id.clone(),
            status,
            ended_at: e,
            hangup_cause: Some("caller_hangup".into()),
            failure_reason: (status != CallStatus::Completed).then(|| "callback.timeout".into()),
            sip_status: None,
            timeline: vec![entry(e, "sip.received", json!({"method": "BYE"}))],
        })
        .await
        .expect("ended");
    id
}

const CALL_KEYS: [&str; 16] = [
    "id",
    "number_id",
    "direction",
    "status",
    "from",
    "to",
    "started_at",
    "answered_at",
    "ended_at",
    "duration_seconds",
    "hangup_cause",
    "failure_reason",
    "cost_minor",
    "currency",
    "parent_call_id",
    "sip_status",
];

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|v| v["id"].as_str().expect("id").to_owned())
        .collect()
}

fn link_target(link: &str) -> String {
    link.split(';')
        .next()
        .expect("target")
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

async fn list_get_filter_and_page(backend: Backend) {
    let fx = fixture(backend).await;
    let (num_a, e164_a) = claim(&fx.api, 1).await;
    let (num_b, e164_b) = claim(&fx.api, 2).await;
    let (num_o, e164_o) = claim(&fx.other, 3).await;

    // Before any call: an empty array, no Link.
    let r = fx.api.get("/v1/calls").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json(), json!([]));
    assert!(r.header("link").is_none());

    let mut made = Vec::new();
    let statuses = [
        CallStatus::Completed,
        CallStatus::Failed,
        CallStatus::Busy,
        CallStatus::NoAnswer,
        CallStatus::Canceled,
        CallStatus::Ringing,
        CallStatus::Answered,
    ];
    for i in 0..16 {
        let (n, e) = if i % 4 == 3 {
            (&num_b, &e164_b)
        } else {
            (&num_a, &e164_a)
        };
        let dir = if i % 2 == 0 { "inbound" } else { "outbound" };
        let status = statuses[i % statuses.len()];
        made.push((
            call(&fx.store, &fx.ws, n, e, dir, status, 61_200).await,
            n.clone(),
            dir,
            status,
        ));
    }
    let other_call = call(
        &fx.store,
        &fx.other_ws,
        &num_o,
        &e164_o,
        "inbound",
        CallStatus::Completed,
        1_000,
    )
    .await;
    // The guide's last call: inbound, completed, 62 billed seconds at the guide's inbound rate 0.
    let guide_call = call(
        &fx.store,
        &fx.ws,
        &num_a,
        &e164_a,
        "inbound",
        CallStatus::Completed,
        61_200,
    )
    .await;
    made.push((
        guide_call.clone(),
        num_a.clone(),
        "inbound",
        CallStatus::Completed,
    ));
    let newest_first: Vec<String> = made.iter().rev().map(|m| m.0.clone()).collect();

    // The guide: GET /v1/calls?limit=1 | jq '.[0] | {direction, status, from, to, duration_seconds}'
    let r = fx.api.get("/v1/calls?limit=1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let first = &v.as_array().expect("bare array")[0];
    assert_eq!(first["id"], guide_call.as_str());
    assert_eq!(first["direction"], "inbound");
    assert_eq!(first["status"], "completed");
    assert_eq!(first["from"], "+254711222333");
    assert_eq!(first["to"], e164_a.as_str());
    assert_eq!(first["duration_seconds"], 62);
    let mut keys: Vec<&str> = first
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    let mut want = CALL_KEYS.to_vec();
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(first["number_id"], num_a.as_str());
    assert_eq!(first["cost_minor"], 0);
    assert_eq!(first["currency"], "KES");
    assert_eq!(first["hangup_cause"], "caller_hangup");
    assert_eq!(first["failure_reason"], Value::Null);
    for k in ["started_at", "answered_at", "ended_at"] {
        let t = first[k].as_str().expect("timestamp");
        assert_eq!(t.len(), 20, "to the second: {t}");
        assert!(t.ends_with('Z'), "{t}");
    }
    let link = r.header("link").expect("Link on a partial page");
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    assert!(link.starts_with("</v1/calls?limit=1&cursor="), "{link}");

    // Every page, newest first, nothing twice, nothing of the other workspace.
    let all = fx.api.get_all("/v1/calls?limit=5").await;
    assert_eq!(ids(&all), newest_first);
    assert!(!ids(&all).contains(&other_call));
    let default_page = fx.api.get("/v1/calls").await.json();
    assert_eq!(default_page.as_array().expect("array").len(), 17);

    // A live call: nulls where unknown, duration 0.
    let ringing = all
        .iter()
        .find(|c| c["status"] == "ringing")
        .expect("ringing");
    assert_eq!(ringing["answered_at"], Value::Null);
    assert_eq!(ringing["ended_at"], Value::Null);
    assert_eq!(ringing["duration_seconds"], 0);
    assert_eq!(ringing["cost_minor"], 0);
    let answered = all
        .iter()
        .find(|c| c["status"] == "answered")
        .expect("answered");
    assert!(answered["answered_at"].is_string());
    assert_eq!(answered["duration_seconds"], 0, "0 until ended");
    // Outbound calls are rated at the guide's 300/min: 62 s → 310.
    let outbound_done = all
        .iter()
        .find(|c| c["status"] == "failed" && c["direction"] == "outbound")
        .expect("an answered outbound failure");
    assert_eq!(outbound_done["cost_minor"], 310);
    assert_eq!(outbound_done["failure_reason"], "callback.timeout");

    // Filters, alone and together; the Link keeps them.
    let by_number = fx
        .api
        .get_all(&format!("/v1/calls?number_id={num_b}&limit=2"))
        .await;
    let want: Vec<String> = made
        .iter()
        .rev()
        .filter(|m| m.1 == num_b)
        .map(|m| m.0.clone())
        .collect();
    assert_eq!(ids(&by_number), want);
    let r = fx
        .api
        .get(&format!("/v1/calls?number_id={num_b}&limit=2"))
        .await;
    let next = link_target(&r.header("link").expect("link"));
    assert!(next.contains(&format!("number_id={num_b}")), "{next}");
    for dir in ["inbound", "outbound"] {
        let got = fx.api.get_all(&format!("/v1/calls?direction={dir}")).await;
        let want: Vec<String> = made
            .iter()
            .rev()
            .filter(|m| m.2 == dir)
            .map(|m| m.0.clone())
            .collect();
        assert_eq!(ids(&got), want, "{dir}");
    }
    for status in statuses {
        let got = fx
            .api
            .get_all(&format!("/v1/calls?status={}&limit=2", status.as_str()))
            .await;
        let want: Vec<String> = made
            .iter()
            .rev()
            .filter(|m| m.3 == status)
            .map(|m| m.0.clone())
            .collect();
        assert_eq!(ids(&got), want, "{}", status.as_str());
    }
    let both = fx
        .api
        .get_all(&format!(
            "/v1/calls?number_id={num_a}&direction=inbound&status=completed"
        ))
        .await;
    let want: Vec<String> = made
        .iter()
        .rev()
        .filter(|m| m.1 == num_a && m.2 == "inbound" && m.3 == CallStatus::Completed)
        .map(|m| m.0.clone())
        .collect();
    assert_eq!(ids(&both), want);
    // Another workspace's number as a filter: simply nothing.
    assert_eq!(
        fx.api
            .get_all(&format!("/v1/calls?number_id={num_o}"))
            .await,
        Vec::<Value>::new()
    );

    // One call: the same object as in the list.
    for c in all.iter().take(4) {
        let id = c["id"].as_str().expect("id");
        let r = fx.api.get(&format!("/v1/calls/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(&r.json(), c);
    }

    // Another workspace's call is not found, everywhere.
    for path in [
        format!("/v1/calls/{other_call}"),
        format!("/v1/calls/{other_call}/events"),
    ] {
        fx.api.get(&path).await.assert_error(404, "calls.not_found");
    }
    fx.api
        .post(&format!("/v1/calls/{other_call}/hangup"), None)
        .await
        .assert_error(404, "calls.not_found");
    let r = fx.other.get(&format!("/v1/calls/{other_call}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let unknown = uuid::Uuid::now_v7().to_string();
    fx.api
        .get(&format!("/v1/calls/{unknown}"))
        .await
        .assert_error(404, "calls.not_found");

    // Ids that are not UUIDs, bad filters, bad pages.
    for path in ["/v1/calls/nope", "/v1/calls/nope/events"] {
        fx.api
            .get(path)
            .await
            .assert_error(400, "request.invalid_id");
    }
    fx.api
        .post("/v1/calls/123/hangup", None)
        .await
        .assert_error(400, "request.invalid_id");
    for q in [
        "direction=sideways",
        "status=done",
        "status=COMPLETED",
        "number_id=not-a-uuid",
        "limit=0",
        "limit=101",
        "limit=ten",
        "cursor=%%%",
        "parent_call_id=nope",
    ] {
        fx.api
            .get(&format!("/v1/calls?{q}"))
            .await
            .assert_error(400, "request.invalid_query");
    }
    fx.anon()
        .get("/v1/calls")
        .await
        .assert_error(401, "api_key.invalid");

    // The legs a call dialled: their own records, found by their parent.
    assert_eq!(first["parent_call_id"], Value::Null);
    let mut legs = Vec::new();
    for to in ["+254711000001", "+254711000002"] {
        let id = uuid::Uuid::now_v7().to_string();
        let s = Utc::now() - Duration::minutes(1);
        fx.store
            .call_started(CallStarted {
                call_id: id.clone(),
                workspace_id: fx.ws.clone(),
                number_id: num_a.clone(),
                direction: "outbound".into(),
                from: e164_a.clone(),
                to: to.into(),
                sip_call_id: format!("sip-{id}"),
                engine_id: TEST_ENGINE.into(),
                started_at: s,
                timeline: vec![],
                parent_call_id: Some(guide_call.clone()),
            })
            .await
            .expect("leg started");
        legs.push(id);
    }
    let children = fx
        .api
        .get_all(&format!("/v1/calls?parent_call_id={guide_call}&limit=1"))
        .await;
    legs.reverse();
    assert_eq!(ids(&children), legs, "newest first");
    assert!(
        children
            .iter()
            .all(|c| c["parent_call_id"] == guide_call.as_str()
                && c["direction"] == "outbound"
                && c["rate_per_min_minor"].is_null())
    );
    let one = fx.api.get(&format!("/v1/calls/{}", legs[0])).await.json();
    assert_eq!(one["parent_call_id"], guide_call.as_str());
    let none = fx
        .api
        .get(&format!("/v1/calls?parent_call_id={other_call}"))
        .await
        .json();
    assert_eq!(none, json!([]));
}
on_both_backends!(list_get_filter_and_page);

impl Fx {
    fn anon(&self) -> Api {
        self.server.anon()
    }
}

async fn timeline_oldest_first(backend: Backend) {
    let fx = fixture(backend).await;
    let (num, e164) = claim(&fx.api, 1).await;
    let id = call(
        &fx.store,
        &fx.ws,
        &num,
        &e164,
        "outbound",
        CallStatus::Completed,
        61_200,
    )
    .await;
    let r = fx.api.get(&format!("/v1/calls/{id}/events")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.header("link").is_none());
    let tl = r.json();
    let tl = tl.as_array().expect("bare array");
    let kinds: Vec<&str> = tl
        .iter()
        .map(|t| t["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "sip.received",
            "sip.sent",
            "sip.received",
            "sip.received",
            "call.charged"
        ]
    );
    for t in tl {
        let mut keys: Vec<&str> = t
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(keys, ["at", "detail", "id", "kind"]);
        assert!(t["detail"].is_object());
    }
    assert_eq!(tl[0]["detail"], json!({"method": "INVITE"}));
    assert_eq!(tl[1]["detail"]["status"], 180);
    assert_eq!(tl[4]["detail"]["cost_minor"], 310);
    // Milliseconds keep entries of one second apart: INVITE and 180 are 3 ms apart.
    let at0 = tl[0]["at"].as_str().expect("at");
    let at1 = tl[1]["at"].as_str().expect("at");
    assert_eq!(at0.len(), 24, "{at0}");
    assert!(at0 < at1, "{at0} < {at1}");

    // Paged: oldest first across pages.
    let paged = fx
        .api
        .get_all(&format!("/v1/calls/{id}/events?limit=2"))
        .await;
    assert_eq!(&paged, tl);
    let r = fx.api.get(&format!("/v1/calls/{id}/events?limit=2")).await;
    let next = link_target(&r.header("link").expect("link"));
    assert!(
        next.starts_with(&format!("/v1/calls/{id}/events?limit=2&cursor=")),
        "{next}"
    );
    for q in ["limit=0", "limit=101", "cursor=%%%"] {
        fx.api
            .get(&format!("/v1/calls/{id}/events?{q}"))
            .await
            .assert_error(400, "request.invalid_query");
    }
    fx.other
        .get(&format!("/v1/calls/{id}/events"))
        .await
        .assert_error(404, "calls.not_found");
}
on_both_backends!(timeline_oldest_first);

async fn hangup_of_calls_not_live_here(backend: Backend) {
    let fx = fixture(backend).await;
    let (num, e164) = claim(&fx.api, 1).await;
    let done = call(
        &fx.store,
        &fx.ws,
        &num,
        &e164,
        "inbound",
        CallStatus::Completed,
        5_000,
    )
    .await;
    let before = fx.api.get(&format!("/v1/calls/{done}")).await.json();
    // Idempotent: an ended call is answered with its record, unchanged.
    let r = fx.api.post(&format!("/v1/calls/{done}/hangup"), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json(), before);
    assert_eq!(
        fx.api.get(&format!("/v1/calls/{done}")).await.json(),
        before
    );

    // Live in the database but held by no call actor of this server (it was started by another
    // process): refused, and the record is untouched.
    let live = call(
        &fx.store,
        &fx.ws,
        &num,
        &e164,
        "inbound",
        CallStatus::Answered,
        0,
    )
    .await;
    let msg = fx
        .api
        .post(&format!("/v1/calls/{live}/hangup"), None)
        .await
        .assert_error(409, "calls.not_live");
    assert!(msg.contains("another engine process"), "{msg}");
    let v = fx.api.get(&format!("/v1/calls/{live}")).await.json();
    assert_eq!(v["status"], "answered");
}
on_both_backends!(hangup_of_calls_not_live_here);

async fn call_events_reach_the_numbers_events_url(backend: Backend) {
    let fx = fixture(backend).await;
    let rx = Receiver::ok().await;
    let (num, e164) = claim(&fx.api, 1).await;
    let r = fx
        .api
        .patch(
            &format!("/v1/numbers/{num}/routing"),
            json!({"events_url": rx.url("/events")}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = call(
        &fx.store,
        &fx.ws,
        &num,
        &e164,
        "outbound",
        CallStatus::Completed,
        61_200,
    )
    .await;
    // Written by another process, so the server finds them on its outbox poll.
    let hits = rx
        .wait_until(StdDuration::from_secs(30), |h| h.len() >= 3)
        .await;
    let kinds: Vec<&str> = hits.iter().map(|h| h.event_kind.as_str()).collect();
    assert_eq!(kinds, ["call.started", "call.answered", "call.completed"]);
    for h in &hits {
        assert_eq!(h.path, "/events");
        assert!(h.signature.starts_with("t="), "{}", h.signature);
        let body = h.json();
        assert_eq!(body["payload"]["call_id"], id.as_str());
        assert_eq!(body["payload"]["number_id"], num.as_str());
    }
    let done = hits[2].json();
    assert_eq!(done["payload"]["status"], "completed");
    assert_eq!(done["payload"]["duration_seconds"], 62);
    assert_eq!(done["payload"]["cost_minor"], 310);
    assert_eq!(done["payload"]["currency"], "KES");
    // The delivery log knows them by call (attempts are recorded just after they are sent).
    let log = wait_for_json(
        &fx.api,
        &format!("/v1/webhooks/deliveries?call_id={id}"),
        StdDuration::from_secs(30),
        |v| v.as_array().is_some_and(|a| a.len() == 3),
    )
    .await;
    assert_eq!(log.as_array().map(Vec::len), Some(3), "{log:?}");
}
on_both_backends!(call_events_reach_the_numbers_events_url);
