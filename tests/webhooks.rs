//! Signed webhooks: retries, order, durability across kill -9, the delivery log, URL safety.

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::receiver::{Answer, Hit, Receiver};
use common::{Api, Backend, Mode, Server, TestDb, dev_key, wait_for_json};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};

const FAST_RETRIES: (&str, &str) = ("SAUTIKIT_WEBHOOK_RETRY_SCALE", "0.001");

fn dev_secret(db: &TestDb) -> String {
    let raw = std::fs::read(db.data_dir.join("dev-credentials.json")).expect("dev credentials");
    let v: Value = serde_json::from_slice(&raw).expect("json");
    v["webhook_secret"].as_str().expect("secret").to_owned()
}

/// An independent check of `X-Sautikit-Signature` (not the server's own signing code).
fn verify(secret: &str, hit: &Hit) -> bool {
    let parts: HashMap<&str, &str> = hit
        .signature
        .split(',')
        .filter_map(|p| p.split_once('='))
        .collect();
    let (Some(t), Some(v1)) = (parts.get("t"), parts.get("v1")) else {
        return false;
    };
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(hit.body.as_bytes());
    mac.update(b".");
    mac.update(t.as_bytes());
    hex::encode(mac.finalize().into_bytes()) == *v1
}

async fn subscribe(api: &Api, url: &str, events: &[&str]) -> String {
    let r = api
        .post("/v1/webhooks", Some(json!({"url": url, "events": events})))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().expect("id").to_owned()
}

async fn top_up(api: &Api, amount: i64) -> Value {
    let r = api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": amount, "currency": "KES"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()
}

fn amount(hit: &Hit) -> i64 {
    hit.json()["payload"]["amount_minor"].as_i64().unwrap_or(-1)
}

async fn retried_until_acknowledged(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, &[FAST_RETRIES]);
    let api = server.api(&dev_key(&db.data_dir));
    let secret = dev_secret(&db);
    // Fails the first three attempts of each event, then acknowledges.
    let rx = Receiver::start(Arc::new(|_, nth| {
        Answer::Status([500, 502, 429][..].get(nth).copied().unwrap_or(200))
    }))
    .await;
    subscribe(&api, &rx.url("/hooks"), &["wallet.*"]).await;
    let entry = top_up(&api, 1234).await;

    let hits = rx
        .wait_until(Duration::from_secs(30), |h| h.len() >= 4)
        .await;
    assert_eq!(hits.len(), 4);
    let first = &hits[0];
    let body = first.json();
    assert_eq!(
        body.as_object().expect("object").keys().collect::<Vec<_>>(),
        [
            "event_id",
            "event_kind",
            "workspace_id",
            "occurred_at",
            "payload"
        ]
    );
    assert_eq!(body["event_kind"], "wallet.top_up");
    assert_eq!(body["payload"]["amount_minor"], 1234);
    assert_eq!(body["payload"]["ledger_entry_id"], entry["id"]);
    assert_eq!(first.event_id, body["event_id"].as_str().expect("id"));
    assert_eq!(first.event_kind, "wallet.top_up");
    assert_eq!(first.content_type, "application/json");
    assert!(
        first.user_agent.starts_with("Sautikit-Webhooks/"),
        "{}",
        first.user_agent
    );
    for h in &hits {
        assert_eq!(h.body, first.body, "every attempt sends the same bytes");
        assert!(verify(&secret, h), "signature of {h:?}");
        assert!(!verify("whsec_wrong", h));
    }

    let log = wait_for_json(
        &api,
        "/v1/webhooks/deliveries?event_kind=wallet.top_up",
        Duration::from_secs(10),
        |v| v[0]["status"] == "succeeded",
    )
    .await;
    let d = &log[0];
    assert_eq!(d["attempt_count"], 4);
    let codes: Vec<i64> = d["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(codes, [500, 502, 429, 200]);
    let numbers: Vec<i64> = d["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| a["attempt"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
    assert!(d["attempts"][0]["latency_ms"].as_i64().is_some());
    assert!(d["delivered_at"].is_string());
}

on_both_backends!(retried_until_acknowledged);

async fn order_is_kept_while_retrying(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, &[FAST_RETRIES]);
    let api = server.api(&dev_key(&db.data_dir));
    // The first top-up and the first number event are refused twice.
    let rx = Receiver::start(Arc::new(|hit, nth| {
        let first_top_up = hit.event_kind == "wallet.top_up" && amount(hit) == 1;
        let provisioned = hit.event_kind == "number.provisioned";
        if (first_top_up || provisioned) && nth < 2 {
            Answer::Status(503)
        } else {
            Answer::Status(200)
        }
    }))
    .await;
    subscribe(&api, &rx.url("/all"), &["*"]).await;
    for a in 1..=12 {
        top_up(&api, a).await;
    }
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000005/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    let number_id = r.json()["id"].as_str().expect("id").to_owned();
    let r = api.delete(&format!("/v1/numbers/{number_id}")).await;
    assert_eq!(r.status, 200);

    let hits = rx
        .wait_until(Duration::from_secs(30), |h| {
            h.iter().filter(|h| h.event_kind == "wallet.top_up").count() >= 14
                && h.iter().any(|h| h.event_kind == "number.released")
        })
        .await;
    let top_ups: Vec<i64> = hits
        .iter()
        .filter(|h| h.event_kind == "wallet.top_up")
        .map(amount)
        .collect();
    // 1 is refused twice and retried; 2…12 wait behind it.
    assert_eq!(top_ups, [1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let number_events: Vec<&str> = hits
        .iter()
        .filter(|h| h.event_kind.starts_with("number."))
        .map(|h| h.event_kind.as_str())
        .collect();
    assert_eq!(
        number_events,
        [
            "number.provisioned",
            "number.provisioned",
            "number.provisioned",
            "number.released"
        ]
    );
    let released = hits
        .iter()
        .find(|h| h.event_kind == "number.released")
        .expect("released");
    assert_eq!(released.json()["payload"]["number_id"], number_id.as_str());
}

on_both_backends!(order_is_kept_while_retrying);

async fn kill9_with_undelivered_events(backend: Backend) {
    const WORKSPACES: usize = 10;
    const PER_WORKSPACE: usize = 100;
    const EVENTS: usize = WORKSPACES * PER_WORKSPACE;
    let db = TestDb::new(backend).await;
    // PostgreSQL keeps a dead process's leases until they lapse; keep that short here.
    let env = [FAST_RETRIES, ("SAUTIKIT_WEBHOOK_LEASE_SECS", "4")];
    let server = Server::start_with(&db, Mode::Dev, &env);
    // At first the receiver takes requests and never answers them.
    let rx = Receiver::start(Arc::new(|_, _| Answer::Stall)).await;
    // Wallet events are ordered per workspace: ten workspaces give ten independent queues.
    let mut apis = Vec::new();
    for w in 0..WORKSPACES {
        let (_, key) = db.workspace(&format!("w{w}"), 0);
        let api = server.api(&key);
        subscribe(&api, &rx.url("/events"), &["wallet.top_up"]).await;
        apis.push(api);
    }
    let tasks: Vec<_> = apis
        .iter()
        .enumerate()
        .map(|(w, api)| {
            let api = api.clone();
            tokio::spawn(async move {
                for i in 0..PER_WORKSPACE {
                    top_up(&api, (w * PER_WORKSPACE + i) as i64 + 1).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("top-ups");
    }
    // One delivery of each workspace is stuck in flight; the other 990 wait behind them.
    rx.wait_until(Duration::from_secs(30), |h| h.len() >= WORKSPACES)
        .await;
    server.kill9();

    rx.set_behaviour(Arc::new(|_, _| Answer::Status(200)));
    let server = Server::start_with(&db, Mode::Dev, &env);
    let hits = rx
        .wait_until(Duration::from_secs(90), |h| {
            h.iter().map(|h| &h.event_id).collect::<HashSet<_>>().len() >= EVENTS
        })
        .await;
    let distinct: HashSet<&String> = hits.iter().map(|h| &h.event_id).collect();
    assert_eq!(distinct.len(), EVENTS, "every event delivered, none lost");
    let amounts: HashSet<i64> = hits.iter().map(amount).collect();
    assert_eq!(amounts.len(), EVENTS);
    println!(
        "kill -9 with {EVENTS} undelivered events ({backend:?}): {} requests, {} duplicates \
         (requests in flight at the kill, delivered again)",
        hits.len(),
        hits.len() - EVENTS
    );
    // Order per workspace survived the crash: first deliveries are in creation order.
    for w in 0..WORKSPACES {
        let range = (w * PER_WORKSPACE) as i64 + 1..=((w + 1) * PER_WORKSPACE) as i64;
        let mut firsts: Vec<i64> = Vec::new();
        for a in hits.iter().map(amount).filter(|a| range.contains(a)) {
            if !firsts.contains(&a) {
                firsts.push(a);
            }
        }
        let mut sorted = firsts.clone();
        sorted.sort();
        assert_eq!(firsts, sorted, "workspace {w}");
    }
    // The log agrees: nothing left pending.
    for api in &apis {
        let api = server.api(api.key().expect("key"));
        wait_for_json(
            &api,
            "/v1/webhooks/deliveries?status=pending&limit=100",
            Duration::from_secs(10),
            |v| v.as_array().is_some_and(|a| a.is_empty()),
        )
        .await;
    }
}

on_both_backends!(kill9_with_undelivered_events);

async fn dead_letter_then_redeliver(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[("SAUTIKIT_WEBHOOK_RETRY_SCALE", "0.00001")],
    );
    let api = server.api(&dev_key(&db.data_dir));
    let rx = Receiver::start(Arc::new(|_, _| Answer::Status(500))).await;
    subscribe(&api, &rx.url("/h"), &["wallet.top_up"]).await;
    top_up(&api, 77).await;
    let log = wait_for_json(
        &api,
        "/v1/webhooks/deliveries",
        Duration::from_secs(30),
        |v| v[0]["status"] == "dead_letter",
    )
    .await;
    assert_eq!(log[0]["attempt_count"], 8, "{log}");
    assert_eq!(rx.hits().len(), 8);
    let id = log[0]["id"].as_str().expect("id").to_owned();

    rx.set_behaviour(Arc::new(|_, _| Answer::Status(204)));
    let r = api
        .post(&format!("/v1/webhooks/deliveries/{id}/redeliver"), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json()["status"], "pending");
    let log = wait_for_json(
        &api,
        "/v1/webhooks/deliveries?status=succeeded",
        Duration::from_secs(10),
        |v| v.as_array().is_some_and(|a| a.len() == 1),
    )
    .await;
    assert_eq!(log[0]["attempt_count"], 9);
    assert_eq!(log[0]["attempts"][8]["status_code"], 204);
    assert_eq!(rx.hits().len(), 9);
}

on_both_backends!(dead_letter_then_redeliver);

async fn subscriptions_secrets_and_low_balance(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, &[FAST_RETRIES]);
    let api = server.api(&dev_key(&db.data_dir));
    let old_secret = dev_secret(&db);
    let rx = Receiver::ok().await;
    let numbers_sub = subscribe(&api, &rx.url("/numbers"), &["number.*"]).await;
    subscribe(&api, &rx.url("/low"), &["wallet.low_balance"]).await;
    let subs = api.get("/v1/webhooks").await.json();
    assert_eq!(subs.as_array().map(Vec::len), Some(2));

    // Threshold KES 950: the first claim crosses it (once), the second does not fire again.
    let r = api
        .patch("/v1/wallet", json!({"low_balance_threshold_minor": 95_000}))
        .await;
    assert_eq!(r.json()["low_balance_threshold_minor"], 95_000);
    for id in ["000000000021", "000000000022"] {
        let r = api
            .post(
                &format!("/v1/numbers/01900000-0000-7000-8000-{id}/claim"),
                None,
            )
            .await;
        assert_eq!(r.status, 201);
    }
    rx.wait_until(Duration::from_secs(10), |h| {
        h.iter().filter(|h| h.path == "/numbers").count() == 2 && h.iter().any(|h| h.path == "/low")
    })
    .await;
    // A top-up back above the threshold re-arms it; the next crossing fires again.
    top_up(&api, 20_000).await;
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000023/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    let hits = rx
        .wait_until(Duration::from_secs(10), |h| {
            h.iter().filter(|h| h.path == "/low").count() == 2
                && h.iter().filter(|h| h.path == "/numbers").count() == 3
        })
        .await;
    assert!(
        hits.iter()
            .filter(|h| h.path == "/numbers")
            .all(|h| h.event_kind == "number.provisioned")
    );
    let low: Vec<&Hit> = hits.iter().filter(|h| h.path == "/low").collect();
    assert_eq!(low[0].json()["payload"]["balance_minor"], 90_000);
    assert_eq!(
        low[0].json()["payload"]["low_balance_threshold_minor"],
        95_000
    );
    assert!(hits.iter().all(|h| verify(&old_secret, h)));

    // Rotate: deliveries from now on use the new secret.
    let r = api.post("/v1/webhooks/secret/rotate", None).await;
    assert_eq!(r.status, 200);
    let new_secret = r.json()["webhook_secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    assert!(new_secret.starts_with("whsec_") && new_secret != old_secret);
    let r = api.delete(&format!("/v1/webhooks/{numbers_sub}")).await;
    assert_eq!(r.json()["status"], "deleted");
    subscribe(&api, &rx.url("/wallet"), &["wallet.top_up"]).await;
    top_up(&api, 5).await;
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000024/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    let hits = rx
        .wait_until(Duration::from_secs(10), |h| {
            h.iter().any(|h| h.path == "/wallet")
        })
        .await;
    let wallet_hit = hits.iter().find(|h| h.path == "/wallet").expect("hit");
    assert!(verify(&new_secret, wallet_hit));
    assert!(!verify(&old_secret, wallet_hit));
    // The deleted subscription got nothing more.
    assert_eq!(hits.iter().filter(|h| h.path == "/numbers").count(), 3);
    assert_eq!(
        api.get("/v1/webhooks")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Delivery log filters.
    let by_kind = api
        .get("/v1/webhooks/deliveries?event_kind=number.provisioned")
        .await
        .json();
    assert_eq!(by_kind.as_array().map(Vec::len), Some(3));
    let number_id = by_kind[0]["number_id"]
        .as_str()
        .expect("number id")
        .to_owned();
    let by_number = api
        .get(&format!("/v1/webhooks/deliveries?number_id={number_id}"))
        .await
        .json();
    assert_eq!(by_number.as_array().map(Vec::len), Some(1));
    // A delivery's first attempt is written when its outcome is recorded, just after the receiver
    // answered: the last one may reach the log a moment after its hit.
    wait_for_json(
        &api,
        "/v1/webhooks/deliveries",
        Duration::from_secs(10),
        |v| v.as_array().map(Vec::len) == Some(6),
    )
    .await;
    let all = api.get_all("/v1/webhooks/deliveries?limit=2").await;
    assert_eq!(all.len(), 6);
}

on_both_backends!(subscriptions_secrets_and_low_balance);

async fn bad_input_changes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let api = server.api(&dev_key(&db.data_dir));
    let rx = Receiver::ok().await;
    subscribe(&api, &rx.url("/ok"), &["*"]).await;
    let before = api.get("/v1/webhooks").await.text;
    for (body, code) in [
        (
            json!({"url": "ftp://x.example.com/", "events": ["*"]}),
            "webhooks.invalid_url",
        ),
        (
            json!({"url": "/relative", "events": ["*"]}),
            "webhooks.invalid_url",
        ),
        (
            json!({"url": "https://", "events": ["*"]}),
            "webhooks.invalid_url",
        ),
        (
            json!({"url": "not a url", "events": ["*"]}),
            "webhooks.invalid_url",
        ),
        (
            json!({"url": "https://x.example.com/", "events": ["number.nope"]}),
            "webhooks.event_unknown",
        ),
        (
            json!({"url": "https://x.example.com/", "events": ["*", "bogus"]}),
            "webhooks.event_unknown",
        ),
        (
            json!({"url": "https://x.example.com/", "events": ["call.*"]}),
            "webhooks.event_unsupported",
        ),
        (
            json!({"url": "https://x.example.com/", "events": ["call.completed"]}),
            "webhooks.event_unsupported",
        ),
        (
            json!({"url": "https://x.example.com/", "events": []}),
            "webhooks.events_invalid",
        ),
    ] {
        api.post("/v1/webhooks", Some(body))
            .await
            .assert_error(422, code);
    }
    api.post(
        "/v1/webhooks",
        Some(json!({"url": "https://x.example.com/"})),
    )
    .await
    .assert_error(422, "request.invalid_body");
    api.post("/v1/webhooks", Some(json!({"url": 5, "events": ["*"]})))
        .await
        .assert_error(422, "request.invalid_body");
    api.post(
        "/v1/webhooks/deliveries/01900000-0000-7000-8000-999999999999/redeliver",
        None,
    )
    .await
    .assert_error(404, "webhooks.delivery_not_found");
    api.post("/v1/webhooks/deliveries/nope/redeliver", None)
        .await
        .assert_error(400, "request.invalid_id");
    api.delete("/v1/webhooks/01900000-0000-7000-8000-999999999999")
        .await
        .assert_error(404, "webhooks.not_found");
    api.get("/v1/webhooks/deliveries?status=lost")
        .await
        .assert_error(400, "request.invalid_query");
    api.get("/v1/webhooks/deliveries?number_id=x")
        .await
        .assert_error(400, "request.invalid_id");
    api.patch("/v1/wallet", json!({"low_balance_threshold_minor": -1}))
        .await
        .assert_error(422, "wallet.invalid_threshold");
    api.patch("/v1/wallet", json!({"threshold": 5}))
        .await
        .assert_error(422, "request.invalid_body");
    // Another workspace cannot see or redeliver ours.
    top_up(&api, 1).await;
    let log = wait_for_json(
        &api,
        "/v1/webhooks/deliveries",
        Duration::from_secs(10),
        |v| v[0]["status"] == "succeeded",
    )
    .await;
    let (_, other_key) = db.workspace("other", 0);
    let other = server.api(&other_key);
    assert_eq!(other.get("/v1/webhooks/deliveries").await.json(), json!([]));
    other
        .post(
            &format!(
                "/v1/webhooks/deliveries/{}/redeliver",
                log[0]["id"].as_str().unwrap_or("")
            ),
            None,
        )
        .await
        .assert_error(404, "webhooks.delivery_not_found");
    assert_eq!(api.get("/v1/webhooks").await.text, before);
    assert_eq!(rx.hits().len(), 1);
}

on_both_backends!(bad_input_changes_nothing);

/// Production: deliveries to internal addresses are refused and recorded, unless allowed.
async fn production_refuses_internal_addresses(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (ws, key) = db.workspace("prod", 0);
    let server = Server::start_with(&db, Mode::Production, &[FAST_RETRIES]);
    let api = server.api(&key);
    api.post(
        "/v1/webhooks",
        Some(json!({"url": "http://hooks.example.com/", "events": ["*"]})),
    )
    .await
    .assert_error(422, "webhooks.insecure_url");
    subscribe(&api, "https://127.0.0.1:9/hook", &["wallet.*"]).await;
    subscribe(&api, "https://localhost:9/hook", &["wallet.*"]).await;
    db.admin(&["credit", "--workspace", &ws, "--amount-minor", "100"]);
    let log = wait_for_json(
        &api,
        "/v1/webhooks/deliveries",
        Duration::from_secs(15),
        |v| {
            v.as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|d| d["status"] == "dead_letter"))
        },
    )
    .await;
    for d in log.as_array().expect("array") {
        assert_eq!(d["attempt_count"], 1, "{d}");
        let err = d["attempts"][0]["error"].as_str().unwrap_or_default();
        assert!(err.starts_with("address.forbidden"), "{err}");
    }
    drop(server);

    // An operator allow-list lets on-premise receivers through: the attempt is made (and fails
    // to connect here), not refused.
    let server = Server::start_with(
        &db,
        Mode::Production,
        &[
            FAST_RETRIES,
            ("SAUTIKIT_WEBHOOK_ALLOW_CIDRS", "127.0.0.0/8,::1/128"),
        ],
    );
    let api = server.api(&key);
    db.admin(&["credit", "--workspace", &ws, "--amount-minor", "100"]);
    let log = wait_for_json(
        &api,
        "/v1/webhooks/deliveries?status=pending",
        Duration::from_secs(15),
        |v| {
            v.as_array().is_some_and(|a| {
                a.len() == 2 && a.iter().all(|d| d["attempt_count"].as_i64() >= Some(1))
            })
        },
    )
    .await;
    for d in log.as_array().expect("array") {
        let err = d["attempts"][0]["error"].as_str().unwrap_or_default();
        assert!(!err.starts_with("address.forbidden"), "{err}");
    }
}

on_both_backends!(production_refuses_internal_addresses);

/// Two processes on one PostgreSQL share the outbox without double sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_outbox() {
    if !common::postgres_available() {
        return;
    }
    const EVENTS: usize = 300;
    let db = TestDb::new(Backend::Postgres).await;
    let a = Server::start(&db, Mode::Dev);
    let b = Server::start(&db, Mode::Dev);
    let key = dev_key(&db.data_dir);
    let (api_a, api_b) = (a.api(&key), b.api(&key));
    let rx = Receiver::ok().await;
    subscribe(&api_a, &rx.url("/x"), &["wallet.top_up"]).await;
    let tasks: Vec<_> = (0..EVENTS)
        .map(|i| {
            let api = if i % 2 == 0 {
                api_a.clone()
            } else {
                api_b.clone()
            };
            async move { top_up(&api, i as i64 + 1).await }
        })
        .collect();
    futures::future::join_all(tasks).await;
    let hits = rx
        .wait_until(Duration::from_secs(30), |h| h.len() >= EVENTS)
        .await;
    let distinct: HashSet<&String> = hits.iter().map(|h| &h.event_id).collect();
    assert_eq!(distinct.len(), EVENTS);
    assert_eq!(hits.len(), EVENTS, "no event was sent twice");
    // Order per workspace still holds across the two processes.
    let mut seen: Vec<i64> = Vec::new();
    for h in &hits {
        seen.push(h.json()["payload"]["balance_minor"].as_i64().unwrap_or(0));
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "balances arrive in commit order");
}

/// Events nobody subscribes to are still processed (marked expanded), and stay out of the way.
async fn unsubscribed_events_are_expanded(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let api = server.api(&dev_key(&db.data_dir));
    for a in 1..=5 {
        top_up(&api, a).await;
    }
    let store =
        sautikit::store::SqlStore::new(sautikit::db::Db::connect(&db.url).await.expect("connect"));
    // PostgreSQL keeps unexpanded events in a queue table (0008), SQLite flags them.
    let unexpanded = match backend {
        Backend::Sqlite => "SELECT COUNT(*) AS n FROM events WHERE expanded = 0",
        Backend::Postgres => "SELECT COUNT(*) AS n FROM event_queue",
    };
    let pending = || async {
        let row = sqlx::query(unexpanded)
            .fetch_one(&store.db().read)
            .await
            .expect("count");
        sqlx::Row::try_get::<i64, _>(&row, "n").expect("n")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pending().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "events left unexpanded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = sqlx::query("SELECT COUNT(*) AS n FROM events")
        .fetch_one(&store.db().read)
        .await
        .expect("count");
    assert_eq!(sqlx::Row::try_get::<i64, _>(&total, "n").expect("n"), 5);
    assert_eq!(api.get("/v1/webhooks/deliveries").await.json(), json!([]));
}

on_both_backends!(unsubscribed_events_are_expanded);
