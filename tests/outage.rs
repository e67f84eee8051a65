//! PostgreSQL taken away for 20 s under a steady inbound load, then given back. The server's
//! connections go through a proxy the test cuts in one of two ways: every connection dropped and
//! new ones closed at once, as when a database dies behind a pooler or proxy; or every
//! connection dropped and new ones refused, as from a stopped PostgreSQL on its own host (which
//! the pool alone would retry until its acquire timeout; the engine's health probe notices it
//! within half a second). Meanwhile:
//! - new INVITEs get `503` with `Retry-After` promptly, never a hang;
//! - the API answers `503 storage.unavailable` with `Retry-After`, promptly;
//! - nothing panics, and service comes back by itself when the database does;
//! - afterwards every call is final and every event delivered (none lost in the outage).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::calls::{
    INVENTORY_ID, NUMBER, claim_and_route, deliveries_of, final_calls, sipp, sipp_load,
    start_server_with,
};
use common::peer::SipCaller;
use common::proxy::CutProxy;
use common::uac::{header, status_code};
use common::{Backend, TestDb, dev_key, postgres_available};

/// How long the database is away.
const OUTAGE: Duration = Duration::from_secs(20);
/// What "promptly" means for an answer during the outage.
const PROMPT: Duration = Duration::from_secs(1);
/// By when the engine knows the database is away (its probe runs every 500 ms).
const HEALTH_NOTICED: Duration = Duration::from_secs(1);

/// How the database goes away.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outage {
    /// Connections dropped, new ones accepted and closed at once.
    Cut,
    /// Connections dropped, new ones refused.
    Refused,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_for_20_s_under_load() {
    if postgres_available() {
        away_under_load(Outage::Cut).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusing_connections_for_20_s_under_load() {
    if postgres_available() {
        away_under_load(Outage::Refused).await;
    }
}

async fn away_under_load(outage: Outage) {
    let db = TestDb::new(Backend::Postgres).await;
    let pg: SocketAddr = db
        .url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|hostport| hostport.parse().ok())
        .expect("the test database URL names host:port");
    let mut proxy = CutProxy::start(pg).await;
    let url = db.url.replace(&pg.to_string(), &proxy.addr().to_string());
    let server = start_server_with(&db, &[("SAUTIKIT_DATABASE_URL", &url)]);
    let api = server.api(&dev_key(&db.data_dir));
    let (_, _voice, events) = claim_and_route(&api, INVENTORY_ID, "/pause/5").await;

    // The load: 20 calls/s, each hung up by sipp after 1 s, through the whole outage.
    let dir = tempfile::tempdir().expect("tempdir");
    let load = sipp_load(dir.path(), server.sip_addr(), NUMBER, 20, 100_000, 1000);
    events
        .wait_until(Duration::from_secs(30), |h| {
            h.iter()
                .filter(|h| h.event_kind == "call.completed")
                .count()
                >= 20
        })
        .await;

    match outage {
        Outage::Cut => proxy.cut(),
        Outage::Refused => proxy.refuse(),
    }
    let cut_at = Instant::now();
    let sip = server.sip_addr();
    let (mut api_probes, mut sip_probes) = (0, 0);
    let (mut api_slowest, mut sip_slowest) = (Duration::ZERO, Duration::ZERO);
    while cut_at.elapsed() < OUTAGE {
        let asked = Instant::now();
        let r = api.get("/v1/wallet").await;
        let took = asked.elapsed();
        // The first requests after the cut may still be served from a connection that has not
        // noticed; from then on, 503. A request already waiting for a connection when the
        // database went away may wait out the pool's timeout: those made from the health
        // probe's first failure on (within half a second) are answered at once.
        if r.status != 200 && asked.duration_since(cut_at) > HEALTH_NOTICED {
            r.assert_error(503, "storage.unavailable");
            assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{}", r.text);
            assert!(took <= PROMPT, "the API took {took:?} to answer");
            api_probes += 1;
            api_slowest = api_slowest.max(took);
        }
        let asked = Instant::now();
        let (answer, took, _) = SipCaller::timed_call(sip, NUMBER).await;
        if asked.duration_since(cut_at) <= HEALTH_NOTICED {
            continue;
        }
        assert_eq!(status_code(&answer), Some(503), "{answer}");
        assert!(header(&answer, "Retry-After").is_some(), "{answer}");
        assert!(took <= PROMPT, "the INVITE took {took:?} to be answered");
        sip_probes += 1;
        sip_slowest = sip_slowest.max(took);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        api_probes >= 10 && sip_probes >= 10,
        "{api_probes} / {sip_probes}"
    );

    // Back by itself: the API at once, and calls again.
    proxy.restore().await;
    let back = Instant::now();
    loop {
        let r = api.get("/v1/wallet").await;
        if r.status == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "API still {} 10 s after the database came back: {}",
            r.status,
            r.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Calls again within seconds: a call caught by the database's return (a connection the pool
    // had not yet replaced) may still fail; the next ones must not.
    let probe_dir = tempfile::tempdir().expect("tempdir");
    let mut tries = 0;
    loop {
        let (ok, out) = sipp(
            probe_dir.path(),
            sip,
            &["-sn", "uac", "-s", NUMBER, "-m", "1", "-d", "0"],
        )
        .await;
        tries += 1;
        if ok {
            break;
        }
        println!("call {tries} after the outage failed:\n{out}");
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "no call succeeded within 10 s of the database's return"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(load);

    // Nothing lost: every call is final, every delivery made. A call caught between its INVITE
    // and its answer by the cut may fail (its answer could not be written); none is left open.
    let calls = final_calls(&api).await;
    for c in &calls {
        assert!(c["status"] == "completed" || c["status"] == "failed", "{c}");
    }
    let deliveries = deliveries_of(&api, &calls).await;
    let completed = calls.iter().filter(|c| c["status"] == "completed").count();
    assert!(
        completed * 10 >= calls.len() * 9,
        "{completed} of {} completed",
        calls.len()
    );
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
    println!(
        "PostgreSQL away ({outage:?}) {OUTAGE:?}: {api_probes} API and {sip_probes} SIP probes answered 503 \
         (slowest {api_slowest:?} and {sip_slowest:?}); \
         {} calls ({completed} completed), {} deliveries, all final and delivered; \
         calls again at try {tries}",
        calls.len(),
        deliveries.len()
    );
}
