//! The customer guide (`claim-and-route-a-number.md`), step by step, against a real server.

#[macro_use]
mod common;

use common::{Backend, Mode, Server, TestDb, dev_key};
use regex::Regex;
use sautikit::db::Db;
use sautikit::secrets::verify_password;
use sautikit::store::SqlStore;
use sautikit_sip::digest::{Algorithm, ha1};
use serde_json::{Value, json};

/// The guide's first inventory entry, verbatim.
const GUIDE_INVENTORY_ENTRY: &str = r#"{
"id": "01900000-0000-7000-8000-000000000001",
"number": "+254700000001",
"country": "KE",
"capabilities": ["voice"],
"monthly_price_minor": 10000,
"inbound_per_min_minor": 0,
"outbound_per_min_minor": 300,
"currency": "KES"
}"#;

/// Replaces the values of the named keys, so bodies can be compared byte for byte apart from ids
/// and timestamps.
fn mask(text: &str, keys: &[&str]) -> String {
    let mut out = text.to_owned();
    for k in keys {
        let re = Regex::new(&format!(r#""{k}":"[^"]*""#)).expect("regex");
        out = re
            .replace_all(&out, format!(r#""{k}":"<{k}>""#))
            .into_owned();
    }
    out
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

async fn guide_flow(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let key = dev_key(&db.data_dir);
    // The banner hands the customer the key and the first guide step.
    let banner = server.stdout.join("\n");
    assert!(banner.contains(&key), "{banner}");
    assert!(
        banner.contains("/v1/numbers/available?country=KE&currency=KES"),
        "{banner}"
    );
    let api = server.api(&key);

    // Browse: the guide's URL and the guide's entry.
    let r = api
        .get("/v1/numbers/available?country=KE&currency=KES")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let list = r.json();
    let list = list.as_array().expect("a bare array");
    assert!(list.len() >= 3);
    let expected: Value = serde_json::from_str(GUIDE_INVENTORY_ENTRY).expect("guide json");
    assert_eq!(list[0], expected);
    for entry in list {
        assert_eq!(keys(entry), keys(&expected));
    }
    let compact = serde_json::to_string(&expected).expect("json");
    assert!(r.text.starts_with(&format!("[{compact}")), "{}", r.text);
    // The dev inventory holds at least 100 Kenyan numbers at the guide's prices.
    let all = api
        .get_all("/v1/numbers/available?country=KE&currency=KES&limit=100")
        .await;
    assert!(all.len() >= 100, "{}", all.len());
    assert!(all.iter().all(|n| n["monthly_price_minor"] == 10000
        && n["outbound_per_min_minor"] == 300
        && n["currency"] == "KES"));

    // Claim: 201 and the guide's body.
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000001/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        mask(&r.text, &["id", "created_at"]),
        r#"{"id":"<id>","number":"+254700000001","status":"active","currency":"KES","monthly_price_minor":10000,"created_at":"<created_at>"}"#
    );
    let claimed = r.json();
    let number_id = claimed["id"].as_str().expect("id").to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&number_id)
            .expect("uuid")
            .get_version_num(),
        7
    );
    let ts = Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$").expect("regex");
    assert!(ts.is_match(claimed["created_at"].as_str().expect("ts")));
    // The first month was debited, with a ledger row.
    assert_eq!(api.get("/v1/wallet").await.json()["balance_minor"], 90_000);
    let ledger = api.get("/v1/wallet/transactions").await.json();
    assert_eq!(ledger[0]["kind"], "number_rental");
    assert_eq!(ledger[0]["amount_minor"], -10_000);
    assert_eq!(ledger[0]["balance_after_minor"], 90_000);
    assert_eq!(ledger[0]["reference"], number_id.as_str());
    // The number is no longer available.
    let r = api
        .get("/v1/numbers/available?country=KE&currency=KES&limit=1")
        .await;
    assert_eq!(r.json()[0]["number"], "+254700000002");

    // Routing, then the guide's read-back.
    let r = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({
                "voice_callback_url": "https://ivr.example.com/voice",
                "events_url": "https://ivr.example.com/events"
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let n = api.get(&format!("/v1/numbers/{number_id}")).await.json();
    assert_eq!(
        json!({"number": n["number"], "status": n["status"],
               "voice_callback_url": n["voice_callback_url"], "events_url": n["events_url"]}),
        json!({"number": "+254700000001", "status": "active",
               "voice_callback_url": "https://ivr.example.com/voice",
               "events_url": "https://ivr.example.com/events"})
    );
    for field in [
        "capabilities",
        "monthly_price_minor",
        "currency",
        "next_renewal_at",
        "created_at",
    ] {
        assert!(!n[field].is_null(), "{field} missing: {n}");
    }
    // One URL at a time; null clears.
    let r = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({"events_url": null}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let n = r.json();
    assert_eq!(n["events_url"], Value::Null);
    assert_eq!(n["voice_callback_url"], "https://ivr.example.com/voice");

    // SIP credentials: the guide's body, then rotate.
    let r = api
        .post(
            &format!("/v1/numbers/{number_id}/sip-credentials"),
            Some(json!({"label": "main-agent"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let cred = r.json();
    assert_eq!(
        keys(&cred),
        ["id", "label", "username", "password", "status"]
    );
    assert_eq!(cred["label"], "main-agent");
    assert_eq!(cred["status"], "active");
    let username = cred["username"].as_str().expect("username").to_owned();
    assert!(
        Regex::new("^ts_[0-9a-f]{8}$")
            .expect("regex")
            .is_match(&username)
    );
    let old_password = cred["password"].as_str().expect("password").to_owned();
    assert!(old_password.len() * 6 >= 128, "{old_password}");
    let cred_id = cred["id"].as_str().expect("id").to_owned();
    let listed = api
        .get(&format!("/v1/numbers/{number_id}/sip-credentials"))
        .await;
    assert!(!listed.text.contains(&old_password));
    assert!(!listed.text.contains("password"));
    assert_eq!(listed.json()[0]["username"], username.as_str());

    let r = api
        .post(
            &format!("/v1/numbers/{number_id}/sip-credentials/{cred_id}/rotate"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rotated = r.json();
    let new_password = rotated["password"].as_str().expect("password").to_owned();
    assert_ne!(new_password, old_password);
    assert_eq!(rotated["username"], username.as_str());

    // What the registrar will check: the old password no longer verifies, the new one does, for
    // both the Argon2id hash and the digest HA1 values.
    let store = SqlStore::new(Db::connect(&db.url).await.expect("connect"));
    let (login, secret) = store
        .sip_login(&username)
        .await
        .expect("query")
        .expect("active credential");
    let realm = login.workspace_id.clone();
    assert!(verify_password(&new_password, &secret.password_hash));
    assert!(!verify_password(&old_password, &secret.password_hash));
    assert_eq!(
        secret.ha1_md5,
        ha1(Algorithm::Md5, &username, &realm, &new_password)
    );
    assert_ne!(
        secret.ha1_md5,
        ha1(Algorithm::Md5, &username, &realm, &old_password)
    );
    assert_eq!(
        secret.ha1_sha256,
        ha1(Algorithm::Sha256, &username, &realm, &new_password)
    );
    assert!(!secret.password_hash.contains(&new_password));

    // Revoke: no longer usable.
    let r = api
        .delete(&format!(
            "/v1/numbers/{number_id}/sip-credentials/{cred_id}"
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "revoked");
    assert!(store.sip_login(&username).await.expect("query").is_none());
    api.post(
        &format!("/v1/numbers/{number_id}/sip-credentials/{cred_id}/rotate"),
        None,
    )
    .await
    .assert_error(409, "sip_credentials.revoked");

    // Insufficient funds: the guide's exact body (plus our request_id), and nothing changes.
    let (_, poor_key) = db.workspace("poor", 5_000);
    let poor = server.api(&poor_key);
    let before = common::snapshot(&poor).await;
    let r = poor
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000002/claim",
            None,
        )
        .await;
    r.assert_error(402, "wallet.insufficient_funds");
    assert_eq!(
        mask(&r.text, &["request_id"]),
        r#"{"error":{"code":"wallet.insufficient_funds","message":"insufficient wallet balance","request_id":"<request_id>"}}"#
    );
    assert_eq!(common::snapshot(&poor).await, before);
    let r = api
        .get("/v1/numbers/available?country=KE&currency=KES&limit=1")
        .await;
    assert_eq!(r.json()[0]["number"], "+254700000002", "still available");

    // Release: the number returns to the inventory, credentials are revoked.
    let r = api.delete(&format!("/v1/numbers/{number_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "released");
    api.delete(&format!("/v1/numbers/{number_id}"))
        .await
        .assert_error(409, "numbers.released");
    let r = api
        .get("/v1/numbers/available?country=KE&currency=KES&limit=1")
        .await;
    assert_eq!(r.json()[0]["number"], "+254700000001");
    // …and can be claimed again.
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000001/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_ne!(r.json()["id"], number_id.as_str());
}

on_both_backends!(guide_flow);

async fn pagination_and_filters(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let api = server.api(&dev_key(&db.data_dir));

    // Following Link headers visits every available number exactly once, in order.
    let all = api.get_all("/v1/numbers/available?limit=7").await;
    let numbers: Vec<&str> = all
        .iter()
        .map(|n| n["number"].as_str().unwrap_or(""))
        .collect();
    let mut sorted = numbers.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(numbers, sorted);
    assert_eq!(numbers.len(), 200);

    let r = api
        .get("/v1/numbers/available?contains=00000042&capability=voice")
        .await;
    let v = r.json();
    let found: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|n| n["number"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(found, ["+254700000042"]);
    assert_eq!(
        api.get("/v1/numbers/available?country=UG").await.json(),
        json!([])
    );
    assert_eq!(
        api.get("/v1/numbers/available?currency=USD").await.json(),
        json!([])
    );
    assert!(
        api.get("/v1/numbers/available?limit=100")
            .await
            .header("link")
            .is_some()
    );

    // Newest first for the workspace's numbers and ledger.
    for i in 1..=3 {
        let r = api
            .post(
                &format!("/v1/numbers/01900000-0000-7000-8000-00000000001{i}/claim"),
                None,
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let r = api.get("/v1/numbers?limit=2").await;
    let first = r.json();
    assert_eq!(first[0]["number"], "+254700000013");
    assert_eq!(first[1]["number"], "+254700000012");
    let link = r.header("link").expect("next link");
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    let all = api.get_all("/v1/numbers?limit=2").await;
    assert_eq!(all.len(), 3);
    assert_eq!(all[2]["number"], "+254700000011");
    let ledger = api.get_all("/v1/wallet/transactions?limit=1").await;
    assert_eq!(ledger.len(), 4);
    let sum: i64 = ledger
        .iter()
        .map(|e| e["amount_minor"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(sum, api.get("/v1/wallet").await.json()["balance_minor"]);
}

on_both_backends!(pagination_and_filters);
