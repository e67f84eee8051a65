//! `Idempotency-Key` when a change was committed but its response was not stored (the process
//! died between the two, or the response could not be written): no retry under the key makes the
//! change a second time.
//!
//! Through the API: each POST whose change must not happen twice marks its key applied in the
//! change's own transaction; a rotation, which a retry may well repeat, does not. The lost
//! response is made by taking the stored one away, as a crash between the commit and the store
//! would have left the row. At the store: the key's states, and a failure after the commit that
//! keeps the key instead of forgetting it.

mod common;

use chrono::{Duration, Utc};
use common::{Api, Backend, Mode, Server, TestDb, dev_key, postgres_available};
use reqwest::Method;
use sautikit::db::Db;
use sautikit::idempotency::{IdempotencyBegin, with_request_key};
use sautikit::store::SqlStore;
use sautikit_actors::model::LedgerKind;
use sautikit_actors::store::{CreditWallet, IdempotencyMark, Store, WalletError};
use serde_json::{Value, json};

#[tokio::test]
async fn a_lost_response_never_repeats_the_change_sqlite() {
    a_lost_response_never_repeats_the_change(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_lost_response_never_repeats_the_change_postgres() {
    if postgres_available() {
        a_lost_response_never_repeats_the_change(Backend::Postgres).await;
    }
}

#[tokio::test]
async fn a_key_is_forgotten_only_while_nothing_was_committed_sqlite() {
    a_key_is_forgotten_only_while_nothing_was_committed(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_key_is_forgotten_only_while_nothing_was_committed_postgres() {
    if postgres_available() {
        a_key_is_forgotten_only_while_nothing_was_committed(Backend::Postgres).await;
    }
}

async fn post_keyed(api: &Api, path: &str, key: &str, body: Value) -> common::Resp {
    api.send(
        api.request(Method::POST, path)
            .header("Idempotency-Key", key)
            .json(&body),
    )
    .await
}

/// Whether the key's row says its change was committed.
async fn applied(db: &Db, key: &str) -> bool {
    let row = sqlx::query("SELECT applied_at FROM idempotency_keys WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&db.read)
        .await
        .expect("the key's row");
    sqlx::Row::try_get::<Option<String>, _>(&row, 0)
        .expect("applied_at")
        .is_some()
}

async fn a_lost_response_never_repeats_the_change(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let server = Server::start(&tdb, Mode::Dev);
    let api = server.api(&dev_key(&tdb.data_dir));
    let db = Db::connect(&tdb.url).await.expect("connect");

    let balance = || async { api.get("/v1/wallet").await.json()["balance_minor"].as_i64() };
    let before = balance().await.expect("a balance");
    let topup = json!({"provider": "test", "amount_minor": 50_000, "currency": "KES"});
    let r = post_keyed(&api, "/v1/topups", "top-1", topup.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(balance().await, Some(before + 50_000));

    let available = api.get("/v1/numbers/available?limit=1").await.json();
    let inventory_id = available[0]["id"].as_str().expect("an available number");
    let claim = format!("/v1/numbers/{inventory_id}/claim");
    let r = post_keyed(&api, &claim, "claim-1", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let number_id = r.json()["id"].as_str().expect("id").to_owned();

    let creds = format!("/v1/numbers/{number_id}/sip-credentials");
    let r = post_keyed(&api, &creds, "cred-1", json!({"label": "desk"})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let cred_id = r.json()["id"].as_str().expect("id").to_owned();
    let rotate = format!("{creds}/{cred_id}/rotate");
    let r = post_keyed(&api, &rotate, "rotate-1", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let hook =
        json!({"url": "https://hooks.example.com/sautikit", "events": ["wallet.low_balance"]});
    let r = post_keyed(&api, "/v1/webhooks", "hook-1", hook.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text);

    // A change marks its key in its own transaction; a rotation, which may be repeated, does not.
    for key in ["top-1", "claim-1", "cred-1", "hook-1"] {
        assert!(applied(&db, key).await, "{key} is not marked applied");
    }
    assert!(!applied(&db, "rotate-1").await);

    // The responses lost, as a crash between each commit and its stored response leaves them,
    // and more than a minute ago: the retries change nothing and say so.
    sqlx::query(
        "UPDATE idempotency_keys SET status_code = NULL, response_body = NULL, created_at = $1",
    )
    .bind(sautikit::time::to_db(Utc::now() - Duration::minutes(2)))
    .execute(&db.write)
    .await
    .expect("lose the responses");
    let wallet = api.get("/v1/wallet").await.json();
    for (path, key, body) in [
        ("/v1/topups", "top-1", topup),
        (claim.as_str(), "claim-1", json!({})),
        (creds.as_str(), "cred-1", json!({"label": "desk"})),
        ("/v1/webhooks", "hook-1", hook),
    ] {
        post_keyed(&api, path, key, body)
            .await
            .assert_error(409, "idempotency.response_lost");
    }
    assert_eq!(
        api.get("/v1/wallet").await.json(),
        wallet,
        "no credit or debit"
    );
    assert_eq!(api.get_all(&creds).await.len(), 1, "one credential");
    assert_eq!(
        api.get_all("/v1/webhooks").await.len(),
        1,
        "one subscription"
    );
    assert_eq!(api.get_all("/v1/numbers").await.len(), 1, "one number");

    // The rotation, not marked, runs again: a new password.
    let again = post_keyed(&api, &rotate, "rotate-1", json!({})).await;
    assert_eq!(again.status, 200, "{}", again.text);
}

async fn a_key_is_forgotten_only_while_nothing_was_committed(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = Db::connect(&tdb.url).await.expect("connect");
    db.migrate().await.expect("migrate");
    let store = SqlStore::new(db);
    let t0 = Utc::now();
    let ws = store
        .create_workspace("keys", "KES", 0, t0)
        .await
        .expect("workspace")
        .workspace_id;
    let mark = |key: &str| IdempotencyMark {
        workspace_id: ws.clone(),
        key: key.into(),
    };
    let credit = |currency: &str, key: &str| CreditWallet {
        workspace_id: ws.clone(),
        amount_minor: 1_000,
        currency: currency.into(),
        kind: LedgerKind::TopUp,
        reference: None,
        now: t0,
        idempotency: Some(mark(key)),
    };
    let begin = |key: &'static str, at| {
        let store = &store;
        let ws = &ws;
        async move {
            store
                .idempotency_begin(ws, key, "hash", at)
                .await
                .expect("begin")
        }
    };

    // Committed, then the request fails (a response that could not be built or stored): the
    // key is kept, so the retry does not credit again.
    assert_eq!(begin("paid", t0).await, IdempotencyBegin::Fresh);
    store
        .credit_wallet(credit("KES", "paid"))
        .await
        .expect("credit");
    assert!(!store.idempotency_forget(&ws, "paid").await.expect("forget"));
    assert_eq!(
        begin("paid", t0 + Duration::seconds(1)).await,
        IdempotencyBegin::InProgress
    );
    assert_eq!(
        begin("paid", t0 + Duration::seconds(61)).await,
        IdempotencyBegin::ResponseLost
    );
    // Its stored response, once there, is what every retry gets.
    store
        .idempotency_finish(&ws, "paid", 201, "{}")
        .await
        .expect("finish");
    assert_eq!(
        begin("paid", t0 + Duration::seconds(62)).await,
        IdempotencyBegin::Replay {
            status: 201,
            body: "{}".into()
        }
    );

    // A change that rolled back marks nothing: the failed request's key is forgotten, and the
    // retry runs.
    assert_eq!(begin("refused", t0).await, IdempotencyBegin::Fresh);
    let refused = store.credit_wallet(credit("USD", "refused")).await;
    assert!(matches!(refused, Err(WalletError::CurrencyMismatch { .. })));
    assert!(
        store
            .idempotency_forget(&ws, "refused")
            .await
            .expect("forget")
    );
    assert_eq!(begin("refused", t0).await, IdempotencyBegin::Fresh);

    // A request that died before any change: after a minute its key is taken as free.
    assert_eq!(begin("died", t0).await, IdempotencyBegin::Fresh);
    assert_eq!(
        begin("died", t0 + Duration::seconds(61)).await,
        IdempotencyBegin::Fresh
    );

    // A change made within the request's scope (as the API serves it) marks its key too.
    assert_eq!(begin("hook", t0).await, IdempotencyBegin::Fresh);
    with_request_key(
        mark("hook"),
        store.create_subscription(&ws, "https://hooks.example.com/", &[], t0),
    )
    .await
    .expect("subscription");
    assert!(!store.idempotency_forget(&ws, "hook").await.expect("forget"));

    let wallet = store
        .get_wallet(&ws)
        .await
        .expect("wallet")
        .expect("exists");
    assert_eq!(wallet.balance_minor, 1_000, "credited once");
}
