//! Load harness for inbound calls (issue: calls): a raw UDP SIP caller (UAC) in this process
//! drives a real release `sautikit serve` in dev mode, whose claimed numbers point their voice
//! callback and events URL at lean HTTP servers in this process. Everything shares one machine.
//!
//! - **rate**: calls per second for a fixed time. Each call: INVITE (SDP offer) → 100 Trying →
//!   voice callback (a 30 s `pause`) → 200 OK with SDP → ACK → after `BENCH_CALL_HOLD_MS`
//!   (default 0) the caller's BYE → 200. INVITEs are retransmitted per Timer A (500 ms, doubling)
//!   until a provisional response, BYEs per Timer E; a call without a final response in
//!   `BENCH_CALL_TIMEOUT_MS` (10 s) fails. Measured: calls attempted/answered/completed/failed,
//!   INVITE→200 p50/p99/max (from the first INVITE sent to the 200 received), the server's CPU
//!   (utime+stime from /proc) and RSS, events delivered to the events URL (3 per call:
//!   `call.started`, `call.answered`, `call.completed`), and `GET /v1/calls?status=completed`.
//! - **hold**: `BENCH_HOLD_CALLS` (2000) calls set up at `BENCH_HOLD_RAMP` per second and held
//!   `BENCH_HOLD_SECONDS` (60) while the engine sends paced silence (20 ms PCMU) to one UDP socket
//!   per call here. Measured per stream: spacing of receive times (|Δt − 20 ms| p50/p99, share
//!   within 5 ms), packets received vs expected, RTP header checks (sequence +1, timestamp +160,
//!   one SSRC, payload type 0); the engine's CPU, RSS, CPU per call and per packet.
//!
//! Spacing is measured twice: from the kernel's receive timestamp of each datagram
//! (`SO_TIMESTAMPNS`: when it reached the receiving socket, which is what a caller's jitter buffer
//! sees) and from when this process's task read it, which adds this harness's own scheduling
//! delay on the shared cores (an upper bound). The pass line uses the kernel's arrival times.
//!
//! `CARGO_TARGET_DIR=/work/target-calls cargo bench --bench calls`. Environment:
//! `BENCH_TESTS` (`rate,hold`), `BENCH_BACKENDS` (`sqlite,postgres`; PostgreSQL only when
//! `SAUTIKIT_TEST_POSTGRES_URL` is set; hold runs on the first backend only unless
//! `BENCH_HOLD_ALL_BACKENDS=1`), `BENCH_CALL_RATE` (1000; a comma list runs each in turn),
//! `BENCH_SECONDS` (60), `BENCH_CALL_NUMBERS` (100 claimed numbers, calls round-robin),
//! `BENCH_CALL_HOLD_MS` (0), `BENCH_UAC_SOCKETS` (4), `BENCH_HOLD_CALLS`, `BENCH_HOLD_SECONDS`,
//! `BENCH_HOLD_RAMP` (200), `BENCH_P99_MS` (50: the pass line).
//!
//! `BENCH_RENEWALS=100000` adds a month's renewals to the rate test: that many numbers of 100 other
//! workspaces, claimed straight through the store, all fall due 5 s into the run; the engine's
//! scheduler (ticking every second) renews them while the calls go on. Measured: how long after
//! falling due the last one was renewed (pass ≤ 60 s), and INVITE→200 of the calls set up
//! between the first and the last renewal (pass: p99 ≤ the line).

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;

use harness::{
    backend_name, env_or, mib, ms, sample_rss, serve_on_own_thread, server_log_excerpt,
    thread_delta, watch_window,
};

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::post;
use common::uac::{cpu_time, ensure_nofile, machine_load, quantile, status_kib, thread_cpu};
use common::{Api, Backend, Mode, Server, TestDb, dev_key};
use sautikit::loadtest::streams::{StreamStats, rtp_receiver};
use sautikit::loadtest::uac::{Uac, UacStats};
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::watch;

// The receivers and the caller share the two cores with the server: keep them lean.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The rate test's script: the caller's BYE ends each call well before the pause does.
const RATE_PAUSE_SECS: u64 = 30;

// ---------------------------------------------------------------------------------------------
// The customer's side: a voice callback that answers one fixed script, an events receiver that
// counts by kind. Each on its own single-threaded runtime and thread.

#[derive(Default)]
struct Hooks {
    voice: AtomicU64,
    started: AtomicU64,
    answered: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    other: AtomicU64,
}

impl Hooks {
    fn events(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
            + self.answered.load(Ordering::Relaxed)
            + self.completed.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }
}

/// (voice callback URL, events URL, counters). The callback answers
/// `{"actions":[{"pause":{"length":pause_secs}}]}`.
/// With `BENCH_HOLD_SAY=1` it speaks instead: one prompt, synthesized once and then served from
/// the cache to every call, looped for as long as the pause would have lasted (the media
/// issue's "calls playing a cached prompt").
fn start_hooks(pause_secs: u64) -> (String, String, Arc<Hooks>) {
    let script: &'static str = if std::env::var("BENCH_HOLD_SAY").as_deref() == Ok("1") {
        let text = "Thank you for calling. All our agents are busy; please stay on the line and \
                    your call will be answered in the order it was received.";
        // The prompt is about 6 s long.
        let loops = (pause_secs / 6 + 1).min(100);
        format!(r#"{{"actions":[{{"say":{{"text":"{text}","loop":{loops}}}}}]}}"#).leak()
    } else {
        format!(r#"{{"actions":[{{"pause":{{"length":{pause_secs}}}}}]}}"#).leak()
    };
    let hooks = Arc::new(Hooks::default());
    let voice = {
        let hooks = hooks.clone();
        Router::new().route(
            "/voice",
            post(move || {
                hooks.voice.fetch_add(1, Ordering::Relaxed);
                async move { ([("content-type", "application/json")], script) }
            }),
        )
    };
    let events = {
        let hooks = hooks.clone();
        Router::new().route(
            "/events",
            post(move |headers: HeaderMap| {
                let kind = headers
                    .get("x-sautikit-event-kind")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let c = match kind {
                    "call.started" => &hooks.started,
                    "call.answered" => &hooks.answered,
                    "call.completed" => &hooks.completed,
                    "call.failed" => &hooks.failed,
                    _ => &hooks.other,
                };
                c.fetch_add(1, Ordering::Relaxed);
                async { "ok" }
            }),
        )
    };
    let v = serve_on_own_thread(voice);
    let e = serve_on_own_thread(events);
    (
        format!("http://{v}/voice"),
        format!("http://{e}/events"),
        hooks,
    )
}

// ---------------------------------------------------------------------------------------------
// A server with N numbers claimed and routed to this process.

/// Fields drop in order: the server stops before its database goes.
struct Ctx {
    server: Server,
    api: Api,
    numbers: Vec<Arc<str>>,
    hooks: Arc<Hooks>,
    _db: TestDb,
}

async fn setup(backend: Backend, n_numbers: usize, pause_secs: u64) -> Ctx {
    let db = TestDb::new(backend).await;
    // A port free for both UDP and TCP: with port 0 the engine binds UDP first and then TCP on
    // the same number, which fails now and then when that TCP port is in use (seen here, with
    // thousands of HTTP connections to the hooks coming and going).
    let sip_listen = (0..100)
        .find_map(|_| {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            let addr = tcp.local_addr().ok()?;
            std::net::UdpSocket::bind(addr).ok()?;
            Some(addr.to_string())
        })
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let rtp_ports = std::env::var("BENCH_RTP_PORTS").unwrap_or_else(|_| "20000-29999".into());
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            ("SAUTIKIT_LOG", "warn"),
            ("SAUTIKIT_SIP_LISTEN", &sip_listen),
            ("SAUTIKIT_RTP_PORTS", &rtp_ports),
            // Renewals (`BENCH_RENEWALS`) are picked up within a second of falling due.
            ("SAUTIKIT_SCHEDULER_SECS", "1"),
        ],
    );
    let api = server.api(&dev_key(&db.data_dir));
    // The dev wallet holds KES 1,000 = 10 months of one number: top up for the rest.
    if n_numbers > 9 {
        let r = api
            .post(
                "/v1/topups",
                Some(json!({"provider": "test", "amount_minor": n_numbers as i64 * 10_000, "currency": "KES"})),
            )
            .await;
        assert!(r.status.is_success(), "top-up: {} {}", r.status, r.text);
    }
    let (voice_url, events_url, hooks) = start_hooks(pause_secs);
    let mut numbers = Vec::new();
    for i in 1..=n_numbers {
        let r = api
            .post(
                &format!("/v1/numbers/01900000-0000-7000-8000-{i:012}/claim"),
                None,
            )
            .await;
        assert_eq!(r.status, 201, "claim {i}: {}", r.text);
        let v = r.json();
        let id = v["id"].as_str().expect("id").to_owned();
        let number = v["number"]
            .as_str()
            .expect("number")
            .trim_start_matches('+');
        let r = api
            .patch(
                &format!("/v1/numbers/{id}/routing"),
                json!({"voice_callback_url": voice_url, "events_url": events_url}),
            )
            .await;
        assert_eq!(r.status, 200, "routing: {}", r.text);
        numbers.push(Arc::from(number));
    }
    Ctx {
        server,
        api,
        numbers,
        hooks,
        _db: db,
    }
}

async fn count_completed(api: &Api) -> (usize, BTreeMap<String, usize>) {
    let mut by_status = BTreeMap::new();
    let mut completed = 0;
    for status in ["completed", "failed", "answered", "ringing"] {
        let n = api
            .get_all(&format!("/v1/calls?status={status}&limit=100"))
            .await
            .len();
        if status == "completed" {
            completed = n;
        }
        by_status.insert(status.to_owned(), n);
    }
    (completed, by_status)
}

/// Waits until the events receiver has `want` events or `limit` passes; returns how long it took.
async fn wait_events(hooks: &Hooks, want: u64, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if hooks.events() >= want {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn hooks_line(h: &Hooks) -> String {
    format!(
        "voice callbacks {}, events: started {} answered {} completed {} failed {} other {}",
        h.voice.load(Ordering::Relaxed),
        h.started.load(Ordering::Relaxed),
        h.answered.load(Ordering::Relaxed),
        h.completed.load(Ordering::Relaxed),
        h.failed.load(Ordering::Relaxed),
        h.other.load(Ordering::Relaxed),
    )
}

// ---------------------------------------------------------------------------------------------
// Rate

struct RateSettings {
    rate: f64,
    seconds: f64,
    numbers: usize,
    hold: Duration,
    sockets: usize,
    timeout: Duration,
    p99_line: Duration,
    /// Numbers of other workspaces whose renewals all fall due 5 s into the run.
    renewals: usize,
    /// An overload run: the engine's capacity in calls/s, against which this rate is judged.
    capacity: Option<f64>,
    /// Most RSS growth allowed after the first 60 s (runs of 2 minutes or more).
    rss_growth_line: f64,
}

// ---------------------------------------------------------------------------------------------
// A month's renewals at once, during the call load (`BENCH_RENEWALS`).

/// Claim `n` extra numbers in 100 workspaces that can each pay a renewal.
async fn seed_renewals(db: &TestDb, n: usize) -> sautikit::store::SqlStore {
    let conn = sautikit::db::Db::connect(&db.url).await.expect("connect");
    let store = sautikit::store::SqlStore::new(conn);
    common::store::claim_many(&store, 100, n, 254_730_000_000, 10_000, chrono::Utc::now()).await;
    store
}

/// Make the seeded numbers due at `due` (claimed a calendar month before it).
async fn make_due(store: &sautikit::store::SqlStore, due: chrono::DateTime<chrono::Utc>) {
    let claimed = due
        .checked_sub_months(chrono::Months::new(1))
        .expect("a month earlier");
    sqlx::query(
        "UPDATE tenant_numbers SET created_at = $1, next_renewal_at = $2 \
         WHERE number >= '+25473'",
    )
    .bind(sautikit::time::to_db(claimed))
    .bind(sautikit::time::to_db(due))
    .execute(&store.db().write)
    .await
    .expect("make due");
}

/// Poll until every seeded number is renewed: when the first and the last renewal were seen.
async fn watch_renewals(
    store: sautikit::store::SqlStore,
    n: usize,
    limit: Duration,
) -> (Option<Instant>, Option<Instant>) {
    let started = Instant::now();
    let mut first = None;
    while started.elapsed() < limit {
        let done: i64 = sqlx::query(
            "SELECT COUNT(*) FROM tenant_numbers WHERE rental_period >= 1 \
             AND number >= '+25473'",
        )
        .fetch_one(&store.db().read)
        .await
        .and_then(|r| sqlx::Row::try_get(&r, 0))
        .unwrap_or(0);
        if done > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if done as usize >= n {
            return (first, Some(Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (first, None)
}

/// Where in the run the calls over `line` were (by second of their first INVITE), and the p99 of
/// the run without its first second (connection pools and statement caches warm up then).
fn slow_by_second(stats: &UacStats, started: Instant, line: Duration) -> String {
    let mut by_second: BTreeMap<u64, usize> = BTreeMap::new();
    let mut warm: Vec<Duration> = Vec::new();
    for (took, at) in stats.setup.iter().zip(&stats.setup_sent) {
        let second = at.saturating_duration_since(started).as_secs();
        if *took > line {
            *by_second.entry(second).or_default() += 1;
        }
        if second >= 1 {
            warm.push(*took);
        }
    }
    warm.sort();
    let mut worst: Vec<(u64, usize)> = by_second.iter().map(|(s, n)| (*s, *n)).collect();
    worst.sort_by_key(|(s, n)| (Reverse(*n), *s));
    let seconds: Vec<String> = worst
        .iter()
        .take(6)
        .map(|(s, n)| format!("t={s}s: {n}"))
        .collect();
    format!(
        "  INVITE→200 over {:.0} ms: {} calls in {} seconds of the run (most: {}); p99 without the first second {}",
        ms(line),
        by_second.values().sum::<usize>(),
        by_second.len(),
        if seconds.is_empty() {
            "none".into()
        } else {
            seconds.join(", ")
        },
        if warm.is_empty() {
            "n/a".to_owned()
        } else {
            format!("{:.2} ms", ms(quantile(&warm, 0.99)))
        }
    )
}

/// An overload run (`BENCH_TESTS=overload`): offered `s.rate` against an engine that serves
/// `capacity` calls/s. Pass: goodput (completed calls/s) ≥ 90 % of the lesser of capacity and
/// the rate offered, accepted calls' INVITE→200 p99 ≤ 100 ms, the excess refused with `503`
/// within 5 ms (p99), and no failure but `503`s.
fn overload_result(
    backend: Backend,
    s: &RateSettings,
    capacity: f64,
    stats: &UacStats,
    setup: &[Duration],
    sending: Duration,
) -> bool {
    let mut refused = stats.refused.clone();
    refused.sort();
    let goodput = stats.completed as f64 / sending.as_secs_f64();
    let other_failures = stats.failed() - refused.len() as u64;
    let p99 = quantile(setup, 0.99);
    let refused_p99 = quantile(&refused, 0.99);
    let pass = goodput >= 0.9 * capacity.min(s.rate)
        && p99 <= Duration::from_millis(100)
        && (refused.is_empty() || refused_p99 <= Duration::from_millis(5))
        && other_failures == 0;
    println!(
        "  RESULT overload {} {:.2}× capacity ({:.0}/s offered, capacity {capacity:.0}/s): goodput {goodput:.0}/s          ({:.0} % of capacity), accepted INVITE→200 p50 {:.2} ms p99 {:.2} ms max {:.2} ms; refused {}          ({:.1} %) with 503, INVITE→503 p50 {:.2} ms p99 {:.2} ms max {:.2} ms; other failures {other_failures} → {}",
        backend_name(backend),
        s.rate / capacity,
        s.rate,
        100.0 * goodput / capacity,
        ms(quantile(setup, 0.5)),
        ms(p99),
        ms(quantile(setup, 1.0)),
        refused.len(),
        100.0 * refused.len() as f64 / stats.attempted.max(1) as f64,
        ms(quantile(&refused, 0.5)),
        ms(refused_p99),
        ms(quantile(&refused, 1.0)),
        if pass { "PASS" } else { "FAIL" }
    );
    pass
}

/// The engine's RSS each minute of a long run, and its growth after the first 60 s: the
/// median of the last 10 s of samples less the median of those from 60 to 70 s.
fn rss_over_time(samples: &[u64], every: Duration, line_mib: f64) -> bool {
    let per_sec = (1.0 / every.as_secs_f64()).round() as usize;
    let window = |from: usize| -> Option<f64> {
        let mut w: Vec<u64> = samples.get(from..from + 10 * per_sec)?.to_vec();
        w.sort();
        Some(mib(quantile(&w, 0.5)))
    };
    let minutes: Vec<String> = samples
        .iter()
        .step_by(60 * per_sec)
        .enumerate()
        .map(|(m, kib)| format!("{m} min {:.1}", mib(*kib)))
        .collect();
    println!("  RSS each minute (MiB): {}", minutes.join(", "));
    let (Some(after_warmup), Some(end)) = (
        window(60 * per_sec),
        samples.len().checked_sub(10 * per_sec).and_then(window),
    ) else {
        println!("  RESULT soak: too few RSS samples → FAIL");
        return false;
    };
    let growth = end - after_warmup;
    let pass = growth <= line_mib;
    println!(
        "  RESULT soak: RSS {after_warmup:.1} MiB at 60 s, {end:.1} MiB at the end: growth {growth:+.1} MiB          (line {line_mib} MiB) → {}",
        if pass { "PASS" } else { "FAIL" }
    );
    pass
}

/// Returns whether the run met zero failures and p99 ≤ the line.
async fn rate_run(backend: Backend, s: &RateSettings) -> bool {
    println!(
        "\n== rate, {}: {:.0} calls/s for {:.0} s, {} numbers, hold {} ms ==",
        backend_name(backend),
        s.rate,
        s.seconds,
        s.numbers,
        s.hold.as_millis()
    );
    println!("  load before: {}", machine_load());
    let ctx = setup(backend, s.numbers, RATE_PAUSE_SECS).await;
    let pid = ctx.server.pid();
    let sip = ctx.server.sip_addr();
    // Media of the rate test goes to one socket that drops it.
    let sink = UdpSocket::bind("127.0.0.1:0").await.expect("sink");
    let sink_addr = sink.local_addr().expect("addr");
    let sink_task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        let mut n = 0u64;
        while sink.recv(&mut buf).await.is_ok() {
            n += 1;
        }
        n
    });
    let renewals = if s.renewals > 0 {
        let t = Instant::now();
        let store = seed_renewals(&ctx._db, s.renewals).await;
        println!(
            "  seeded {} numbers in 100 workspaces for renewal in {:.1} s",
            s.renewals,
            t.elapsed().as_secs_f64()
        );
        Some(store)
    } else {
        None
    };
    let mut uac = Uac::start(sip, s.sockets, s.timeout)
        .await
        .expect("UAC sockets");
    let total = (s.rate * s.seconds).round() as u64;
    let renewal_lead = Duration::from_secs(5);
    let renewal_watch = match &renewals {
        Some(store) => {
            make_due(
                store,
                chrono::Utc::now() + chrono::Duration::from_std(renewal_lead).expect("lead"),
            )
            .await;
            Some(tokio::spawn(watch_renewals(
                store.clone(),
                s.renewals,
                Duration::from_secs(300),
            )))
        }
        None => None,
    };

    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(250));
    let threads0 = thread_cpu(pid);
    let cpu0 = cpu_time(pid);
    let me0 = cpu_time(std::process::id());
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut last_line = Instant::now();
    let mut last_cpu = cpu0;
    let mut n = 0usize;
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * s.rate) as u64).min(total);
        while sent < due {
            uac.call(
                ctx.numbers[n % ctx.numbers.len()].clone(),
                sink_addr,
                Some(s.hold),
            );
            n += 1;
            sent += 1;
        }
        if last_line.elapsed() >= Duration::from_secs(5) {
            let cpu = cpu_time(pid);
            let (a, an, c, f) = uac.progress.get();
            println!(
                "  t={:>5.1}s attempted {a} answered {an} completed {c} failed {f}; server {:.2} cores; events {}",
                started.elapsed().as_secs_f64(),
                (cpu - last_cpu).as_secs_f64() / last_line.elapsed().as_secs_f64(),
                ctx.hooks.events()
            );
            last_cpu = cpu;
            last_line = Instant::now();
        }
    }
    let sending = started.elapsed();
    let settled = uac
        .settle(total, s.timeout + s.hold + Duration::from_secs(2))
        .await;
    let calls_done = started.elapsed();
    let cpu1 = cpu_time(pid);
    let threads1 = thread_cpu(pid);
    let me1 = cpu_time(std::process::id());
    let stats = uac.finish().await;

    let want_events = 3 * stats.completed;
    let drained = wait_events(&ctx.hooks, want_events, Duration::from_secs(60)).await;
    let all_done = started.elapsed();
    let cpu2 = cpu_time(pid);
    let _ = rss_stop.send(true);
    let rss = rss_task.await.unwrap_or_default();
    let hwm = status_kib(pid, "VmHWM");
    let (api_completed, by_status) = count_completed(&ctx.api).await;
    sink_task.abort();

    let mut setup = stats.setup.clone();
    setup.sort();
    let slow_line = slow_by_second(&stats, started, s.p99_line);
    let mut renewals_pass = true;
    if let Some(watch) = renewal_watch {
        let (first, last) = watch.await.unwrap_or((None, None));
        let due = started + renewal_lead;
        match (first, last) {
            (Some(first), Some(last)) => {
                let mut during: Vec<Duration> = stats
                    .setup
                    .iter()
                    .zip(&stats.setup_sent)
                    .filter(|(_, at)| **at >= first && **at <= last)
                    .map(|(took, _)| *took)
                    .collect();
                during.sort();
                let took = last.saturating_duration_since(due);
                renewals_pass =
                    took <= Duration::from_secs(60) && quantile(&during, 0.99) <= s.p99_line;
                println!(
                    "  RESULT renewals {}: {} numbers due at t={:.0}s renewed {:.1} s after they fell due \
                     (first seen {:.1} s, last {:.1} s); {} calls set up meanwhile: INVITE→200 p50 {:.2} ms, \
                     p99 {:.2} ms, max {:.2} ms → {}",
                    backend_name(backend),
                    s.renewals,
                    renewal_lead.as_secs_f64(),
                    took.as_secs_f64(),
                    first.saturating_duration_since(due).as_secs_f64(),
                    took.as_secs_f64(),
                    during.len(),
                    ms(quantile(&during, 0.5)),
                    ms(quantile(&during, 0.99)),
                    ms(quantile(&during, 1.0)),
                    if renewals_pass { "PASS" } else { "FAIL" }
                );
            }
            _ => {
                renewals_pass = false;
                println!(
                    "  RESULT renewals {}: NOT all {} renewed within 300 s → FAIL",
                    backend_name(backend),
                    s.renewals
                );
            }
        }
    }
    let mut bye = stats.bye_latency.clone();
    bye.sort();
    let failed = stats.failed();
    let p99 = quantile(&setup, 0.99);
    let cores = (cpu1 - cpu0).as_secs_f64() / calls_done.as_secs_f64();
    let cores_all = (cpu2 - cpu0).as_secs_f64() / all_done.as_secs_f64();
    let peak = rss.iter().copied().max().unwrap_or(0);
    let achieved = stats.attempted as f64 / sending.as_secs_f64();
    let mut pass = failed == 0 && stats.completed == total && p99 <= s.p99_line;
    if let Some(capacity) = s.capacity {
        pass = overload_result(backend, s, capacity, &stats, &setup, sending);
    }
    if s.seconds >= 120.0 {
        // While calls ran, not while the events drained after them.
        let during = ((calls_done.as_millis() / 250) as usize).min(rss.len());
        pass &= rss_over_time(
            &rss[..during],
            Duration::from_millis(250),
            s.rss_growth_line,
        );
    }

    println!(
        "  offered {total} calls in {:.2} s = {achieved:.0}/s; all answered/ended {} after {:.2} s",
        sending.as_secs_f64(),
        if settled { "" } else { "NOT" },
        calls_done.as_secs_f64()
    );
    println!(
        "  calls: attempted {} answered {} completed {} failed {} (INVITE non-2xx {:?}, INVITE timeouts {}, \
         BYE non-2xx {:?}, BYE timeouts {}, engine BYEs {}, unfinished {})",
        stats.attempted,
        stats.answered,
        stats.completed,
        failed,
        stats.invite_status,
        stats.invite_timeouts,
        stats.bye_status,
        stats.bye_timeouts,
        stats.server_byes,
        stats.unfinished
    );
    println!(
        "  SIP: 100 Trying {}, INVITE retransmissions {}, BYE retransmissions {}, 200 retransmissions {}, \
         200 without SDP {}, unmatched {}",
        stats.trying,
        stats.invite_retransmissions,
        stats.bye_retransmissions,
        stats.ok_retransmissions,
        stats.no_sdp,
        stats.unmatched
    );
    println!(
        "  INVITE→200: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; BYE→200: p50 {:.2} ms, p99 {:.2} ms",
        ms(quantile(&setup, 0.5)),
        ms(quantile(&setup, 0.9)),
        ms(p99),
        ms(quantile(&setup, 1.0)),
        ms(quantile(&bye, 0.5)),
        ms(quantile(&bye, 0.99)),
    );
    println!("{slow_line}");
    println!(
        "  server CPU: {cores:.2} cores while calls ran ({:.1} s), {cores_all:.2} incl. event drain; \
         RSS peak sampled {:.0} MiB, VmHWM {:.0} MiB; harness CPU {:.2} cores",
        calls_done.as_secs_f64(),
        mib(peak),
        mib(hwm),
        (me1 - me0).as_secs_f64() / calls_done.as_secs_f64()
    );
    println!(
        "  server threads while calls ran: {}",
        thread_delta(&threads0, &threads1, calls_done)
    );
    println!(
        "  events: {} of {want_events} expected (3 × completed) {}; {}",
        ctx.hooks.events(),
        match drained {
            Some(d) => format!(
                "all delivered {:.1} s after the calls ended",
                d.as_secs_f64()
            ),
            None => "NOT all delivered within 60 s".to_owned(),
        },
        hooks_line(&ctx.hooks)
    );
    println!(
        "  API: GET /v1/calls?status=completed → {api_completed} (of {} completed here); by status {by_status:?}",
        stats.completed
    );
    println!("  server log: {}", server_log_excerpt(&ctx.server));
    println!("  load after: {}", machine_load());
    println!(
        "  RESULT rate {}: {:.0}/s offered, {achieved:.0}/s achieved, failed {failed}, p50 {:.2} ms, p99 {:.2} ms, \
         max {:.2} ms, server {cores:.2} cores, RSS {:.0} MiB, events {}/{want_events}, API completed {api_completed} → {}",
        backend_name(backend),
        s.rate,
        ms(quantile(&setup, 0.5)),
        ms(p99),
        ms(quantile(&setup, 1.0)),
        mib(hwm.max(peak)),
        ctx.hooks.events(),
        if pass && ctx.hooks.events() >= want_events && api_completed as u64 == stats.completed {
            "PASS"
        } else {
            "FAIL"
        }
    );
    drop(ctx);
    pass && renewals_pass
}

// ---------------------------------------------------------------------------------------------
// Hold

struct HoldSettings {
    calls: usize,
    seconds: f64,
    ramp: f64,
    numbers: usize,
    sockets: usize,
    timeout: Duration,
}

async fn hold_run(backend: Backend, s: &HoldSettings) {
    println!(
        "\n== hold, {}: {} calls held {:.0} s (set up at {:.0}/s) ==",
        backend_name(backend),
        s.calls,
        s.seconds,
        s.ramp
    );
    let limit = ensure_nofile(2 * s.calls as u64 + 1024);
    println!("  open-file limit {limit}; load before: {}", machine_load());
    // The script's pause outlasts the ramp, the window and the hang-up: the caller ends each call.
    let pause = (s.seconds + 2.0 * s.calls as f64 / s.ramp) as u64 + 60;
    let ctx = setup(backend, s.numbers, pause).await;
    let pid = ctx.server.pid();
    let sip = ctx.server.sip_addr();
    let mut uac = Uac::start(sip, s.sockets, s.timeout)
        .await
        .expect("UAC sockets");
    let measuring = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers = Vec::with_capacity(s.calls);
    let mut addrs = Vec::with_capacity(s.calls);
    for _ in 0..s.calls {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("RTP socket");
        addrs.push(sock.local_addr().expect("addr"));
        receivers.push(tokio::spawn(rtp_receiver(
            sock,
            measuring.clone(),
            stop_rx.clone(),
        )));
    }

    // Ramp.
    let cpu_r0 = cpu_time(pid);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0usize;
    while sent < s.calls {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * s.ramp) as usize).min(s.calls);
        while sent < due {
            uac.call(
                ctx.numbers[sent % ctx.numbers.len()].clone(),
                addrs[sent],
                None,
            );
            sent += 1;
        }
    }
    let until = Instant::now() + s.timeout + Duration::from_secs(2);
    loop {
        let (_, an, _, f) = uac.progress.get();
        if an + f >= s.calls as u64 || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp = started.elapsed();
    let cpu_r1 = cpu_time(pid);
    let (_, answered, _, failed_setup) = uac.progress.get();
    println!(
        "  ramp: {answered} of {} answered in {:.1} s ({failed_setup} failed); server {:.2} cores during the ramp",
        s.calls,
        ramp.as_secs_f64(),
        (cpu_r1 - cpu_r0).as_secs_f64() / ramp.as_secs_f64()
    );

    // Settle, then the measured window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("  load at window start: {}", machine_load());
    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(500));
    let threads0 = thread_cpu(pid);
    let cpu0 = cpu_time(pid);
    let me0 = cpu_time(std::process::id());
    measuring.store(true, Ordering::Relaxed);
    let wall = watch_window(pid, Duration::from_secs_f64(s.seconds), "server").await;
    measuring.store(false, Ordering::Relaxed);
    let cpu1 = cpu_time(pid);
    let me1 = cpu_time(std::process::id());
    let threads1 = thread_cpu(pid);
    let _ = rss_stop.send(true);
    let rss = rss_task.await.unwrap_or_default();
    println!("  load at window end: {}", machine_load());

    // Hang up, paced like the ramp.
    uac.bye_all(s.ramp);
    let settled = uac
        .settle(
            s.calls as u64,
            Duration::from_secs_f64(s.calls as f64 / s.ramp) + s.timeout + Duration::from_secs(2),
        )
        .await;
    let stats = uac.finish().await;
    let _ = stop_tx.send(true);
    let mut all = StreamStats::default();
    let mut silent = 0;
    for r in receivers {
        let Ok(st) = r.await else { continue };
        if st.packets == 0 {
            silent += 1;
        }
        all.merge(st);
    }
    let want_events = 3 * stats.completed;
    let drained = wait_events(&ctx.hooks, want_events, Duration::from_secs(30)).await;
    let hwm = status_kib(pid, "VmHWM");

    all.deviations.sort_unstable();
    all.read_deviations.sort_unstable();
    let devs = &all.deviations;
    let read_devs = &all.read_deviations;
    let within5 = devs.partition_point(|d| *d <= 5_000);
    let held = answered as f64;
    let expected = held * wall.as_secs_f64() / 0.020;
    let cores = (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64();
    let peak = rss.iter().copied().max().unwrap_or(0);
    let mean_spacing = if devs.is_empty() {
        0.0
    } else {
        all.spacing_sum_us as f64 / devs.len() as f64 / 1000.0
    };
    let mut setup = stats.setup.clone();
    setup.sort();
    println!(
        "  setup INVITE→200: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; calls: attempted {} answered {} completed {} \
         failed {} (INVITE {:?}, timeouts {}/{}, engine BYEs {}, unfinished {}); INVITE rtx {}, BYE rtx {}; \
         all ended: {settled}",
        ms(quantile(&setup, 0.5)),
        ms(quantile(&setup, 0.99)),
        ms(quantile(&setup, 1.0)),
        stats.attempted,
        stats.answered,
        stats.completed,
        stats.failed(),
        stats.invite_status,
        stats.invite_timeouts,
        stats.bye_timeouts,
        stats.server_byes,
        stats.unfinished,
        stats.invite_retransmissions,
        stats.bye_retransmissions,
    );
    println!(
        "  RTP in the {:.1} s window: {} packets of {:.0} expected ({:.3} %); {} streams silent overall",
        wall.as_secs_f64(),
        all.in_window,
        expected,
        100.0 * all.in_window as f64 / expected.max(1.0),
        silent
    );
    println!(
        "  spacing of kernel arrival times: mean {mean_spacing:.3} ms; |Δt − 20 ms| p50 {:.3} ms, p99 {:.3} ms, \
         p99.9 {:.3} ms, max {:.3} ms; within 5 ms {:.3} % of {} spacings",
        quantile(devs, 0.5) as f64 / 1000.0,
        quantile(devs, 0.99) as f64 / 1000.0,
        quantile(devs, 0.999) as f64 / 1000.0,
        quantile(devs, 1.0) as f64 / 1000.0,
        100.0 * within5 as f64 / devs.len().max(1) as f64,
        devs.len()
    );
    println!(
        "  spacing of this harness's read times (adds its own scheduling): |Δt − 20 ms| p50 {:.3} ms, \
         p99 {:.3} ms, max {:.3} ms",
        quantile(read_devs, 0.5) as f64 / 1000.0,
        quantile(read_devs, 0.99) as f64 / 1000.0,
        quantile(read_devs, 1.0) as f64 / 1000.0,
    );
    println!(
        "  RTP headers over all {} packets: sequence jumps {} (lost {}), timestamp errors {}, SSRC changes {}, \
         payload type ≠ 0: {}, payload ≠ 160 B: {}, malformed {}",
        all.packets,
        all.seq_errors,
        all.lost,
        all.ts_errors,
        all.ssrc_changes,
        all.pt_errors,
        all.size_errors,
        all.bad
    );
    let packets_per_s = all.in_window as f64 / wall.as_secs_f64();
    println!(
        "  engine: {cores:.3} cores, RSS peak sampled {:.0} MiB (VmHWM {:.0} MiB over the whole run); \
         CPU per call {:.5} core-s per call-s; CPU per packet {:.2} µs; harness {:.2} cores",
        mib(peak),
        mib(hwm),
        cores / held.max(1.0),
        (cpu1 - cpu0).as_secs_f64() * 1e6 / all.in_window.max(1) as f64,
        (me1 - me0).as_secs_f64() / wall.as_secs_f64()
    );
    println!(
        "  server threads in the window: {}",
        thread_delta(&threads0, &threads1, wall)
    );
    println!(
        "  events: {} of {want_events} {}; {}",
        ctx.hooks.events(),
        if drained.is_some() {
            "(all)"
        } else {
            "(NOT all within 30 s)"
        },
        hooks_line(&ctx.hooks)
    );
    println!("  server log: {}", server_log_excerpt(&ctx.server));
    println!(
        "  RESULT hold {}: {answered} calls, {packets_per_s:.0} packets/s, arrival spacing |Δ−20| p50 {:.3} ms \
         p99 {:.3} ms (read by the harness: p99 {:.3} ms), within 5 ms {:.2} %, packets {}/{expected:.0}, \
         engine {cores:.3} cores, RSS {:.0} MiB, {:.2} µs/packet",
        backend_name(backend),
        quantile(devs, 0.5) as f64 / 1000.0,
        quantile(devs, 0.99) as f64 / 1000.0,
        quantile(read_devs, 0.99) as f64 / 1000.0,
        100.0 * within5 as f64 / devs.len().max(1) as f64,
        all.in_window,
        mib(peak.max(hwm)),
        (cpu1 - cpu0).as_secs_f64() * 1e6 / all.in_window.max(1) as f64,
    );
    drop(ctx);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. `cargo test --benches`) is a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let tests = std::env::var("BENCH_TESTS").unwrap_or_else(|_| "rate,hold".into());
    let mut backends = Vec::new();
    for b in std::env::var("BENCH_BACKENDS")
        .unwrap_or_else(|_| "sqlite,postgres".into())
        .split(',')
    {
        match b.trim() {
            "sqlite" => backends.push(Backend::Sqlite),
            "postgres" if std::env::var("SAUTIKIT_TEST_POSTGRES_URL").is_ok() => {
                backends.push(Backend::Postgres)
            }
            "postgres" => println!("PostgreSQL skipped: SAUTIKIT_TEST_POSTGRES_URL is not set"),
            _ => {}
        }
    }
    let timeout = Duration::from_millis(env_or("BENCH_CALL_TIMEOUT_MS", 10_000));
    let sockets = env_or("BENCH_UAC_SOCKETS", 4usize).max(1);
    let numbers = env_or("BENCH_CALL_NUMBERS", if full { 100usize } else { 3 }).clamp(1, 200);

    let mut summary = Vec::new();
    if tests.contains("rate") {
        let rates = std::env::var("BENCH_CALL_RATE")
            .unwrap_or_else(|_| if full { "1000" } else { "20" }.to_owned());
        for &backend in &backends {
            for rate in rates
                .split(',')
                .filter_map(|r| r.trim().parse::<f64>().ok())
            {
                let s = RateSettings {
                    rate,
                    seconds: env_or("BENCH_SECONDS", if full { 60.0 } else { 2.0 }),
                    numbers,
                    hold: Duration::from_millis(env_or("BENCH_CALL_HOLD_MS", 0)),
                    sockets,
                    timeout,
                    p99_line: Duration::from_millis(env_or("BENCH_P99_MS", 50)),
                    renewals: env_or("BENCH_RENEWALS", 0usize),
                    capacity: None,
                    rss_growth_line: env_or("BENCH_RSS_GROWTH_MIB", 5.0),
                };
                let ok = rate_run(backend, &s).await;
                summary.push(format!(
                    "{} {rate:.0}/s: {}",
                    backend_name(backend),
                    if ok {
                        "met zero failures and p99"
                    } else {
                        "did not meet"
                    }
                ));
            }
        }
    }
    if tests.contains("overload") {
        let capacity = env_or("BENCH_CAPACITY", if full { 1000.0 } else { 20.0 });
        let multiples =
            std::env::var("BENCH_OVERLOAD_MULTIPLES").unwrap_or_else(|_| "1,1.5,2".into());
        for &backend in &backends {
            for m in multiples
                .split(',')
                .filter_map(|r| r.trim().parse::<f64>().ok())
            {
                let s = RateSettings {
                    rate: capacity * m,
                    seconds: env_or("BENCH_SECONDS", if full { 30.0 } else { 2.0 }),
                    numbers,
                    hold: Duration::from_millis(env_or("BENCH_CALL_HOLD_MS", 0)),
                    sockets,
                    timeout,
                    p99_line: Duration::from_millis(100),
                    renewals: 0,
                    capacity: Some(capacity),
                    rss_growth_line: env_or("BENCH_RSS_GROWTH_MIB", 5.0),
                };
                let ok = rate_run(backend, &s).await;
                summary.push(format!(
                    "overload {} {m}× {capacity:.0}/s: {}",
                    backend_name(backend),
                    if ok { "PASS" } else { "FAIL" }
                ));
            }
        }
    }
    if tests.contains("hold") {
        let all_backends = std::env::var("BENCH_HOLD_ALL_BACKENDS").as_deref() == Ok("1");
        for &backend in backends.iter().take(if all_backends { 2 } else { 1 }) {
            let s = HoldSettings {
                calls: env_or("BENCH_HOLD_CALLS", if full { 2000 } else { 20 }),
                seconds: env_or("BENCH_HOLD_SECONDS", if full { 60.0 } else { 2.0 }),
                ramp: env_or("BENCH_HOLD_RAMP", 200.0),
                numbers,
                sockets,
                timeout,
            };
            hold_run(backend, &s).await;
        }
    }
    if !summary.is_empty() {
        println!("\nrate summary: {}", summary.join("; "));
    }
}
