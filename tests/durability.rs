//! Committed state survives `kill -9`.

#[macro_use]
mod common;

use common::{Backend, Mode, Server, TestDb, dev_key};
use serde_json::json;

async fn kill9_keeps_claims_and_money(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let key = dev_key(&db.data_dir);
    let api = server.api(&key);
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000007/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let number_id = r.json()["id"].as_str().expect("id").to_owned();
    let r = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({"voice_callback_url": "https://ivr.example.com/voice"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": 2500, "currency": "KES"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let before = common::snapshot(&api).await;
    assert_eq!(before["wallet"]["balance_minor"], 100_000 - 10_000 + 2_500);

    server.kill9();

    let server = Server::start(&db, Mode::Dev);
    // Same key (the dev workspace is not re-created on a non-empty database).
    assert_eq!(dev_key(&db.data_dir), key);
    let api = server.api(&key);
    assert_eq!(common::snapshot(&api).await, before);
    let available = api.get_all("/v1/numbers/available?limit=100").await;
    assert!(!available.iter().any(|n| n["number"] == "+254700000007"));
    assert_eq!(available.len(), 199);
}

on_both_backends!(kill9_keeps_claims_and_money);
