//! A number's events receiver down (answering `503`) under a steady inbound load, then back:
//! - call setup takes as long while it is down as before (the outbox's retries stay off the
//!   call path);
//! - afterwards every event is delivered, and each call's in lifecycle order.
//!
//! The outage lasts `SAUTIKIT_RECEIVER_DOWN_SECS` (10 by default; `600` is the 10 minutes of
//! the issue), and the retry schedule is scaled by the same ratio to 10 minutes, so that the
//! deliveries are as far along their schedule (30 s, 2 min, 10 min, …) when the receiver comes
//! back as after a real 10-minute outage.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::calls::{
    INVENTORY_ID, NUMBER, claim_and_route, deliveries_of, final_calls, sipp_load, start_server_with,
};
use common::peer::SipCaller;
use common::receiver::Answer;
use common::uac::status_code;
use common::{Backend, TestDb, dev_key, postgres_available};

/// The two backends' runs take turns: each is a load of its own, and on a small machine the
/// other's would be what the setup times measure.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_sqlite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    receiver_down(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_postgres() {
    if postgres_available() {
        let _turn = ONE_AT_A_TIME.lock().await;
        receiver_down(Backend::Postgres).await;
    }
}

/// INVITE→200 of calls placed one after another for `spell`, each then ACKed and hung up.
async fn setup_times(sip: SocketAddr, spell: Duration) -> Vec<Duration> {
    let until = Instant::now() + spell;
    let mut took = Vec::new();
    while Instant::now() < until {
        let (answer, setup, mut caller) = SipCaller::timed_call(sip, NUMBER).await;
        took.push(setup);
        assert_eq!(status_code(&answer), Some(200), "{answer}");
        caller.ack().await;
        caller.bye().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    took.sort();
    took
}

/// Waits until no delivery is pending, asserting that none stays pending after its next
/// scheduled attempt; returns how long after `back` that was.
async fn wait_for_schedule(api: &common::Api, back: Instant) -> Duration {
    loop {
        let deliveries = api.get_all("/v1/webhooks/deliveries?limit=100").await;
        let due: Vec<chrono::DateTime<chrono::Utc>> = deliveries
            .iter()
            .filter(|d| d["status"] == "pending")
            .filter_map(|d| d["next_attempt_at"].as_str())
            .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
            .collect();
        let Some(last) = due.iter().max() else {
            return back.elapsed();
        };
        let late = chrono::Utc::now() - *last;
        assert!(
            late < chrono::Duration::seconds(10),
            "a delivery due at {last} is still pending {late} later"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The `p`th percentile of sorted times.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted
        .get(sorted.len() * p / 100)
        .or(sorted.last())
        .copied()
        .unwrap_or_default()
}

async fn receiver_down(backend: Backend) {
    let down = Duration::from_secs(
        std::env::var("SAUTIKIT_RECEIVER_DOWN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let scale = (down.as_secs_f64() / 600.0).to_string();
    let db = TestDb::new(backend).await;
    let server = start_server_with(&db, &[("SAUTIKIT_WEBHOOK_RETRY_SCALE", &scale)]);
    let api = server.api(&dev_key(&db.data_dir));
    let (_, _voice, events) = claim_and_route(&api, INVENTORY_ID, "/pause/5").await;
    let sip = server.sip_addr();

    // The load: 20 calls/s, each hung up by sipp after 1 s, from before the outage to after it.
    let dir = tempfile::tempdir().expect("tempdir");
    let load = sipp_load(dir.path(), sip, NUMBER, 20, 1_000_000, 1000);
    let before = setup_times(sip, Duration::from_secs(5)).await;

    events.set_behaviour(Arc::new(|_, _| Answer::Status(503)));
    let during = setup_times(sip, down).await;
    events.set_behaviour(Arc::new(|_, _| Answer::Status(200)));
    let back = Instant::now();
    let refused = events
        .hits()
        .iter()
        .filter(|h| h.answered == Some(503))
        .count();
    drop(load);

    // Unchanged: the median within 20 ms of the one before, and the 95th percentile far from a
    // stall. Retries that held up the call path would slow every probe made while they run,
    // many of them; one late probe on a shared machine is the machine.
    let (m0, m1) = (percentile(&before, 50), percentile(&during, 50));
    let p95 = percentile(&during, 95);
    let slowest = during.last().copied().unwrap_or_default();
    println!(
        "{backend:?}, receiver down {down:?}: setup median {m0:?} before, {m1:?} during \
         (95th percentile {p95:?}, slowest {slowest:?}, {} calls probed); {refused} deliveries \
         refused meanwhile",
        during.len()
    );
    assert!(
        refused > 0,
        "no delivery was tried while the receiver was down"
    );
    assert!(
        m1 <= m0 + Duration::from_millis(20),
        "setup median {m0:?} before, {m1:?} while the receiver was down"
    );
    assert!(p95 <= Duration::from_millis(250), "{during:?}");

    // Everything delivered afterwards: none pending past its next scheduled attempt, and the
    // first retried delivery to succeed brings the receiver's others forward.
    let calls = final_calls(&api).await;
    let drained = wait_for_schedule(&api, back).await;
    let deliveries = deliveries_of(&api, &calls).await;

    // In order: each call's events were acknowledged in lifecycle order, each once at least.
    let rank = |kind: &str| match kind {
        "call.started" => 0,
        "call.answered" => 1,
        "call.completed" | "call.failed" => 2,
        _ => 3,
    };
    let mut acknowledged: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for hit in events.hits() {
        if !hit.answered.is_some_and(|s| (200..300).contains(&s)) {
            continue;
        }
        let call = hit.json()["payload"]["call_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let seen = acknowledged.entry(call).or_default();
        if !seen.iter().any(|(id, _)| *id == hit.event_id) {
            seen.push((hit.event_id.clone(), hit.event_kind.clone()));
        }
    }
    for call in &calls {
        let id = call["id"].as_str().unwrap_or_default();
        let kinds: Vec<&str> = acknowledged
            .get(id)
            .map(|v| v.iter().map(|(_, k)| k.as_str()).collect())
            .unwrap_or_default();
        let terminal = format!("call.{}", call["status"].as_str().unwrap_or_default());
        assert!(
            kinds.first() == Some(&"call.started") && kinds.last() == Some(&terminal.as_str()),
            "call {id}: acknowledged {kinds:?}"
        );
        assert!(
            kinds.windows(2).all(|w| rank(w[0]) <= rank(w[1])),
            "call {id}: out of order {kinds:?}"
        );
    }
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
    println!(
        "{} calls, {} deliveries, all delivered in order; the last {drained:?} after the \
         receiver came back",
        calls.len(),
        deliveries.len()
    );
}
