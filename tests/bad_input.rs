//! Bad input gets the error envelope and changes nothing.

#[macro_use]
mod common;

use common::{Api, Backend, Mode, Server, TestDb, dev_key};
use reqwest::Method;
use serde_json::json;

const FREE: &str = "01900000-0000-7000-8000-000000000050";

async fn raw(
    api: &Api,
    method: Method,
    path: &str,
    ctype: Option<&str>,
    body: &str,
) -> common::Resp {
    let mut rb = api.request(method, path).body(body.to_owned());
    if let Some(ct) = ctype {
        rb = rb.header("content-type", ct);
    }
    api.send(rb).await
}

async fn bad_input_changes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let api = server.api(&dev_key(&db.data_dir));
    let (_, other_key) = db.workspace("other", 50_000);
    let other = server.api(&other_key);
    let r = other
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000060/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    let others_number = r.json()["id"].as_str().expect("id").to_owned();
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000061/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    let mine = r.json()["id"].as_str().expect("id").to_owned();

    let before = common::snapshot(&api).await;
    let other_before = common::snapshot(&other).await;
    let topup = "/v1/topups";

    // Ids that are not UUIDs.
    api.post("/v1/numbers/not-a-uuid/claim", None)
        .await
        .assert_error(400, "request.invalid_id");
    api.get("/v1/numbers/123")
        .await
        .assert_error(400, "request.invalid_id");
    api.patch(
        "/v1/numbers/x'%20OR%201=1--/routing",
        json!({"events_url": null}),
    )
    .await
    .assert_error(400, "request.invalid_id");
    api.post(
        &format!("/v1/numbers/{mine}/sip-credentials/nope/rotate"),
        None,
    )
    .await
    .assert_error(400, "request.invalid_id");
    // Unknown but well-formed ids.
    api.post(
        "/v1/numbers/01900000-0000-7000-8000-999999999999/claim",
        None,
    )
    .await
    .assert_error(404, "numbers.not_found");
    api.post(
        &format!("/v1/numbers/{mine}/sip-credentials/01900000-0000-7000-8000-999999999999/rotate"),
        None,
    )
    .await
    .assert_error(404, "sip_credentials.not_found");

    // Amounts: zero, negative, huge, fractional, textual, beyond i64.
    for (amount, code, status) in [
        (json!(0), "topups.invalid_amount", 422),
        (json!(-500), "topups.invalid_amount", 422),
        (json!(1_000_000_000_000i64), "topups.invalid_amount", 422),
        (json!(12.5), "request.invalid_body", 422),
        (json!("100"), "request.invalid_body", 422),
        (json!(1e30), "request.invalid_body", 422),
    ] {
        api.post(
            topup,
            Some(json!({"provider": "test", "amount_minor": amount, "currency": "KES"})),
        )
        .await
        .assert_error(status, code);
    }
    let r = raw(
        &api,
        Method::POST,
        topup,
        Some("application/json"),
        r#"{"provider":"test","amount_minor":99999999999999999999999,"currency":"KES"}"#,
    )
    .await;
    r.assert_error(422, "request.invalid_body");
    // Currencies: unknown, lower-case, not the wallet's.
    for (cur, code) in [
        ("XYZ", "currency.unsupported"),
        ("kes", "currency.unsupported"),
        ("USD", "wallet.currency_mismatch"),
    ] {
        api.post(
            topup,
            Some(json!({"provider": "test", "amount_minor": 100, "currency": cur})),
        )
        .await
        .assert_error(422, code);
    }
    api.post(
        topup,
        Some(json!({"provider": "mpesa", "amount_minor": 100, "currency": "KES"})),
    )
    .await
    .assert_error(422, "topups.provider_unsupported");
    api.post(topup, Some(json!({"amount_minor": 100, "currency": "KES"})))
        .await
        .assert_error(422, "request.invalid_body");
    api.post(
        topup,
        Some(json!({"provider": "test", "amount_minor": 100, "currency": "KES", "extra": 1})),
    )
    .await
    .assert_error(422, "request.invalid_body");

    // Bodies that are not JSON, or not declared as JSON.
    raw(&api, Method::POST, topup, Some("application/json"), "hello")
        .await
        .assert_error(400, "request.malformed_json");
    raw(&api, Method::POST, topup, Some("application/json"), "")
        .await
        .assert_error(400, "request.malformed_json");
    raw(
        &api,
        Method::POST,
        topup,
        Some("text/plain"),
        r#"{"provider":"test"}"#,
    )
    .await
    .assert_error(415, "request.unsupported_media_type");
    raw(&api, Method::POST, topup, None, r#"{"provider":"test"}"#)
        .await
        .assert_error(415, "request.unsupported_media_type");
    raw(
        &api,
        Method::POST,
        &format!("/v1/numbers/{mine}/sip-credentials"),
        Some("application/json"),
        "{label",
    )
    .await
    .assert_error(400, "request.malformed_json");
    raw(
        &api,
        Method::PATCH,
        &format!("/v1/numbers/{mine}/routing"),
        Some("application/json"),
        "[1,2]",
    )
    .await
    .assert_error(422, "request.invalid_body");

    // Oversized bodies, with and without an idempotency key.
    let big = format!(
        r#"{{"provider":"test","amount_minor":100,"currency":"KES","pad":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    raw(&api, Method::POST, topup, Some("application/json"), &big)
        .await
        .assert_error(413, "request.too_large");
    let r = api
        .send(
            api.request(Method::POST, topup)
                .header("content-type", "application/json")
                .header("idempotency-key", "big-one")
                .body(big.clone()),
        )
        .await;
    r.assert_error(413, "request.too_large");

    // Authentication: missing, malformed, unknown, wrong scheme.
    let anon = server.anon();
    anon.get("/v1/wallet")
        .await
        .assert_error(401, "api_key.invalid");
    anon.post(&format!("/v1/numbers/{FREE}/claim"), None)
        .await
        .assert_error(401, "api_key.invalid");
    Api::new(&server.base, Some("nonsense"))
        .get("/v1/wallet")
        .await
        .assert_error(401, "api_key.invalid");
    Api::new(
        &server.base,
        Some("sk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    )
    .get("/v1/numbers")
    .await
    .assert_error(401, "api_key.invalid");
    let r = anon
        .send(
            anon.request(Method::GET, "/v1/wallet")
                .header("authorization", format!("Basic {}", dev_key(&db.data_dir))),
        )
        .await;
    r.assert_error(401, "api_key.invalid");

    // Another workspace's number does not exist for us.
    api.get(&format!("/v1/numbers/{others_number}"))
        .await
        .assert_error(404, "numbers.not_found");
    api.patch(
        &format!("/v1/numbers/{others_number}/routing"),
        json!({"voice_callback_url": "https://evil.example.com/"}),
    )
    .await
    .assert_error(404, "numbers.not_found");
    api.delete(&format!("/v1/numbers/{others_number}"))
        .await
        .assert_error(404, "numbers.not_found");
    api.post(
        &format!("/v1/numbers/{others_number}/sip-credentials"),
        Some(json!({"label": "x"})),
    )
    .await
    .assert_error(404, "numbers.not_found");
    api.get(&format!("/v1/numbers/{others_number}/sip-credentials"))
        .await
        .assert_error(404, "numbers.not_found");
    api.post(
        "/v1/numbers/01900000-0000-7000-8000-000000000060/claim",
        None,
    )
    .await
    .assert_error(409, "numbers.already_claimed");

    // Routing URLs.
    let routing = format!("/v1/numbers/{mine}/routing");
    for (body, code) in [
        (
            json!({"voice_callback_url": "ftp://ivr.example.com/voice"}),
            "routing.invalid_url",
        ),
        (
            json!({"voice_callback_url": "/voice"}),
            "routing.invalid_url",
        ),
        (json!({"events_url": "https://"}), "routing.invalid_url"),
        (json!({"events_url": "not a url"}), "routing.invalid_url"),
        (
            json!({"events_url": format!("https://e.com/{}", "a".repeat(3000))}),
            "routing.invalid_url",
        ),
        (json!({}), "routing.empty"),
    ] {
        api.patch(&routing, body).await.assert_error(422, code);
    }
    api.patch(&routing, json!({"voice_url": "https://ivr.example.com/"}))
        .await
        .assert_error(422, "request.invalid_body");
    api.patch(&routing, json!({"voice_callback_url": 5}))
        .await
        .assert_error(422, "request.invalid_body");
    api.post(
        &format!("/v1/numbers/{mine}/sip-credentials"),
        Some(json!({"label": "x".repeat(65)})),
    )
    .await
    .assert_error(422, "sip_credentials.invalid_label");

    // Idempotency-Key reused with another body.
    let first = api
        .send(
            api.request(Method::POST, topup)
                .header("idempotency-key", "k-1")
                .json(&json!({"provider": "test", "amount_minor": 0, "currency": "KES"})),
        )
        .await;
    first.assert_error(422, "topups.invalid_amount");
    let again = api
        .send(
            api.request(Method::POST, topup)
                .header("idempotency-key", "k-1")
                .json(&json!({"provider": "test", "amount_minor": 0, "currency": "KES"})),
        )
        .await;
    assert_eq!(again.status, 422);
    assert_eq!(again.header("idempotent-replay").as_deref(), Some("true"));
    assert_eq!(again.text, first.text, "the stored response, byte for byte");
    api.send(
        api.request(Method::POST, topup)
            .header("idempotency-key", "k-1")
            .json(&json!({"provider": "test", "amount_minor": 1, "currency": "KES"})),
    )
    .await
    .assert_error(409, "idempotency.conflict");
    api.send(
        api.request(Method::POST, topup)
            .header("idempotency-key", "")
            .json(&json!({"provider": "test", "amount_minor": 1, "currency": "KES"})),
    )
    .await
    .assert_error(400, "idempotency.invalid_key");

    // Queries.
    for q in [
        "limit=0",
        "limit=101",
        "limit=abc",
        "cursor=%%%",
        "country=kenya",
        "contains=7a",
        "capability=fax",
        "currency=XYZ",
    ] {
        api.get(&format!("/v1/numbers/available?{q}"))
            .await
            .assert_error(400, "request.invalid_query");
    }
    api.get("/v1/numbers?status=gone")
        .await
        .assert_error(400, "request.invalid_query");

    // Routes and methods.
    api.get("/v1/nothing-here")
        .await
        .assert_error(404, "route.not_found");
    anon.get("/nothing")
        .await
        .assert_error(404, "route.not_found");
    api.send(api.request(Method::PUT, "/v1/wallet"))
        .await
        .assert_error(405, "method.not_allowed");
    api.send(api.request(Method::DELETE, topup))
        .await
        .assert_error(405, "method.not_allowed");

    assert_eq!(common::snapshot(&api).await, before);
    assert_eq!(common::snapshot(&other).await, other_before);
    // Nothing was claimed: the free number is still in the inventory.
    let avail = api.get_all("/v1/numbers/available?contains=00000050").await;
    assert_eq!(avail.len(), 1);
}

on_both_backends!(bad_input_changes_nothing);

/// Idempotent claims: the replay returns the first response and debits once.
async fn idempotent_claim_debits_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let api = server.api(&dev_key(&db.data_dir));
    let claim = |key: &'static str| {
        api.send(
            api.request(Method::POST, &format!("/v1/numbers/{FREE}/claim"))
                .header("idempotency-key", key),
        )
    };
    let first = claim("claim-50").await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(first.header("idempotent-replay"), None);
    let second = claim("claim-50").await;
    assert_eq!(second.status, 201);
    assert_eq!(second.header("idempotent-replay").as_deref(), Some("true"));
    assert_eq!(second.text, first.text);
    // A new key is a new request: the number is taken by now.
    claim("claim-50-b")
        .await
        .assert_error(409, "numbers.already_claimed");
    assert_eq!(api.get("/v1/wallet").await.json()["balance_minor"], 90_000);
    assert_eq!(api.get_all("/v1/wallet/transactions").await.len(), 2);
}

on_both_backends!(idempotent_claim_debits_once);

/// Production mode: plain-http webhooks and test money are refused.
async fn production_rules(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.admin(&["seed-inventory", "--count", "5"]);
    let (_, key) = db.workspace("prod", 50_000);
    let server = Server::start(&db, Mode::Production);
    let api = server.api(&key);
    assert!(
        !server.stdout.join("\n").contains("sk_"),
        "no keys printed in production"
    );
    let inv = api.get("/v1/numbers/available").await.json();
    let r = api
        .post(
            &format!("/v1/numbers/{}/claim", inv[0]["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let before = common::snapshot(&api).await;
    api.patch(
        &format!("/v1/numbers/{id}/routing"),
        json!({"voice_callback_url": "http://ivr.example.com/voice"}),
    )
    .await
    .assert_error(422, "routing.insecure_url");
    api.post(
        "/v1/topups",
        Some(json!({"provider": "test", "amount_minor": 100, "currency": "KES"})),
    )
    .await
    .assert_error(403, "topups.provider_forbidden");
    assert_eq!(common::snapshot(&api).await, before);
    let r = api
        .patch(
            &format!("/v1/numbers/{id}/routing"),
            json!({"voice_callback_url": "https://ivr.example.com/voice"}),
        )
        .await;
    assert_eq!(r.status, 200);
}

on_both_backends!(production_rules);
