//! Chaos: the engine killed with `kill -9` in the middle of a steady inbound load (sipp's uac at
//! 300 calls/s, each call answered by the number's script and billed per second), then started
//! again on the same database. Nothing may be lost or counted twice:
//! - every call row ends `completed`, or `failed` with `engine.restart`;
//! - every event is delivered, the terminal one of each call among them;
//! - the ledger equals the balance, and no call is charged twice or differently from its record;
//! - new calls are served within 2 s of the restart.

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::calls::{
    claim_and_route, deliveries_of, final_calls, sipp, sipp_load, start_server_with,
};
use common::{Backend, TestDb, dev_key};

/// The two backends' runs take turns: each is a 300 calls/s load on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NUMBER: &str = "+254730000001";
const RATE: u32 = 300;

async fn kill9_under_load(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDb::new(backend).await;
    let rtp = rtp_ports();
    let server = start_server_with(&db, &[("SAUTIKIT_RTP_PORTS", &rtp)]);
    // A number whose inbound calls cost 1 KES cent a second, so every call moves money.
    db.admin(&[
        "seed-inventory",
        "--count",
        "1",
        "--start",
        NUMBER,
        "--monthly-price-minor",
        "100",
        "--inbound-per-min-minor",
        "60",
        "--outbound-per-min-minor",
        "100",
    ]);
    let key = dev_key(&db.data_dir);
    let api = server.api(&key);
    let available = api
        .get_all("/v1/numbers/available?contains=254730000001&limit=100")
        .await;
    let inventory_id = available
        .iter()
        .find(|n| n["number"] == NUMBER)
        .and_then(|n| n["id"].as_str())
        .expect("the seeded number is available")
        .to_owned();
    let (_, _voice, events) = claim_and_route(&api, &inventory_id, "/pause/60").await;

    // The load: 300 calls/s, each hung up by sipp after 1 s of talk.
    let dir = tempfile::tempdir().expect("tempdir");
    let load = sipp_load(dir.path(), server.sip_addr(), NUMBER, RATE, 3000, 1000);
    // Killed once the load is well under way: hundreds of calls done, hundreds live or ringing.
    events
        .wait_until(Duration::from_secs(60), |h| {
            h.iter()
                .filter(|h| h.event_kind == "call.completed")
                .count()
                >= 300
        })
        .await;
    server.kill9();
    drop(load);

    // Started again on the same database: new calls are served at once.
    let restarted = Instant::now();
    let server = start_server_with(&db, &[("SAUTIKIT_RTP_PORTS", &rtp)]);
    let probe_dir = tempfile::tempdir().expect("tempdir");
    let (ok, out) = sipp(
        probe_dir.path(),
        server.sip_addr(),
        &[
            "-sn",
            "uac",
            "-s",
            NUMBER.trim_start_matches('+'),
            "-m",
            "1",
            "-d",
            "0",
        ],
    )
    .await;
    let served_after = restarted.elapsed();
    assert!(ok, "a call after the restart failed:\n{out}");
    assert!(
        served_after <= Duration::from_secs(2),
        "the first call after the restart ended {served_after:?} after it"
    );
    let api = server.api(&key);

    // Every call is final: completed, or failed because the engine died under it.
    let calls = final_calls(&api).await;
    let killed = calls.iter().filter(|c| c["status"] == "failed").count();
    assert!(calls.len() > 300, "{} calls", calls.len());
    assert!(killed > 0, "no call was live at the kill");
    for c in &calls {
        match c["status"].as_str() {
            Some("completed") => assert_eq!(c["hangup_cause"], "caller_hangup", "{c}"),
            Some("failed") => assert_eq!(c["failure_reason"], "engine.restart", "{c}"),
            _ => panic!("a call left unfinished: {c}"),
        }
    }

    // Every event is delivered, each call's start and end among them, exactly once each.
    let deliveries = deliveries_of(&api, &calls).await;
    let received: HashSet<String> = events.hits().into_iter().map(|h| h.event_id).collect();
    for d in &deliveries {
        let id = d["event_id"].as_str().expect("event_id");
        assert!(received.contains(id), "delivered but not received: {d}");
    }
    let mut kinds: HashMap<&str, Vec<&str>> = HashMap::new();
    for d in &deliveries {
        if let (Some(call), Some(kind)) = (d["call_id"].as_str(), d["event_kind"].as_str()) {
            kinds.entry(call).or_default().push(kind);
        }
    }
    for c in &calls {
        let id = c["id"].as_str().expect("id");
        let terminal = format!("call.{}", c["status"].as_str().unwrap_or_default());
        let of_call = &kinds[id];
        for kind in ["call.started", terminal.as_str()] {
            assert_eq!(
                of_call.iter().filter(|k| **k == kind).count(),
                1,
                "{id}: {of_call:?}"
            );
        }
    }

    // Money: the ledger sums to the balance, and each call is charged once, as its record says.
    let wallet = api.get("/v1/wallet").await.json();
    let ledger = api.get_all("/v1/wallet/transactions?limit=100").await;
    let sum: i64 = ledger
        .iter()
        .map(|e| e["amount_minor"].as_i64().expect("amount"))
        .sum();
    assert_eq!(Some(sum), wallet["balance_minor"].as_i64(), "{wallet}");
    let mut charged: HashMap<&str, (usize, i64)> = HashMap::new();
    for e in ledger.iter().filter(|e| e["kind"] == "call_charge") {
        let call = e["reference"]
            .as_str()
            .expect("a call charge names its call");
        let entry = charged.entry(call).or_default();
        entry.0 += 1;
        entry.1 -= e["amount_minor"].as_i64().expect("amount");
    }
    let mut paid = 0;
    for c in &calls {
        let id = c["id"].as_str().expect("id");
        let cost = c["cost_minor"].as_i64().expect("cost_minor");
        match charged.get(id) {
            Some(&(count, amount)) => {
                assert_eq!(count, 1, "{id} charged {count} times");
                assert_eq!(amount, cost, "{c}");
                paid += 1;
            }
            None => assert_eq!(cost, 0, "{c}"),
        }
    }
    assert!(paid > 300, "{paid} calls paid for");
    println!(
        "kill -9 under {RATE} calls/s: {} calls, {killed} closed by the restart, {} events \
         delivered, {paid} calls charged; first call after the restart done in {served_after:?}",
        calls.len(),
        deliveries.len()
    );
    assert_eq!(charged.len(), paid, "charges for calls that have no record");
    drop(db);
}
on_both_backends!(kill9_under_load);

/// Room for the ~400 calls live or ringing at once (the usual test range holds 200).
fn rtp_ports() -> String {
    let base = 40_000 + (std::process::id() % 8) * 1_000;
    format!("{}-{}", base, base + 998)
}
