//! Load harness for the numbers API (issue 2): claims per second, and `GET /v1/numbers/available`
//! latency, over HTTP against a real `sautikit serve` process with 10,000 inventory rows, on
//! SQLite and (when `SAUTIKIT_TEST_POSTGRES_URL` is set) PostgreSQL.
//!
//! `cargo bench --bench claims` — the client runs on the same machine and shares its cores.
//! Environment: `BENCH_CLAIMS` (default 5000, half the inventory), `BENCH_CONCURRENCY` (64),
//! `BENCH_QUERIES` (1000 per query shape).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Api, Backend, Mode, Server, TestDb};
use futures::StreamExt;
use futures::stream;

const INVENTORY: usize = 10_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The guide's query and its variants.
const QUERIES: [(&str, &str); 4] = [
    (
        "guide (25 rows)",
        "/v1/numbers/available?country=KE&currency=KES",
    ),
    (
        "limit=100",
        "/v1/numbers/available?country=KE&currency=KES&limit=100",
    ),
    ("page 50 (cursor)", "CURSOR"),
    (
        "contains=4242",
        "/v1/numbers/available?country=KE&currency=KES&contains=4242",
    ),
];

/// Sequential queries from one client (the latency a single caller sees), per query shape:
/// (name, p50, p99, max).
async fn query_latency(api: &Api, n: usize) -> Vec<(&'static str, Duration, Duration, Duration)> {
    // A cursor deep into the inventory: the 50th page of 100.
    let mut deep = "/v1/numbers/available?country=KE&currency=KES&limit=100".to_owned();
    for _ in 0..49 {
        let r = api.get(&deep).await;
        match r.header("link") {
            Some(l) => {
                deep = l
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches(|c| c == '<' || c == '>')
                    .to_owned()
            }
            None => break,
        }
    }
    let mut out = Vec::new();
    for (name, path) in QUERIES {
        let path = if path == "CURSOR" {
            deep.as_str()
        } else {
            path
        };
        for _ in 0..20 {
            let r = api.get(path).await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let r = api.get(path).await;
            samples.push(t.elapsed());
            assert_eq!(r.status, 200, "{}", r.text);
        }
        samples.sort();
        out.push((
            name,
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            percentile(&samples, 1.0),
        ));
    }
    out
}

fn print_queries(label: &str, n: usize, rows: &[(&str, Duration, Duration, Duration)]) {
    for (name, p50, p99, max) in rows {
        println!(
            "  GET available {label}, {name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({n} sequential)",
            ms(*p50),
            ms(*p99),
            ms(*max)
        );
    }
}

struct Settings {
    claims: usize,
    concurrency: usize,
    queries: usize,
}

async fn run(backend: Backend, s: &Settings) {
    let (claims, concurrency, queries) = (s.claims, s.concurrency, s.queries);

    let db = TestDb::new(backend).await;
    db.admin(&["seed-inventory", "--count", &INVENTORY.to_string()]);
    let (_, key) = db.workspace("bench", (INVENTORY as i64) * 10_000);
    let server = Server::start_with(&db, Mode::Production, &[("SAUTIKIT_LOG", "warn")]);
    let api = server.api(&key);

    let before = query_latency(&api, queries).await;

    let ids: Vec<String> = api
        .get_all("/v1/numbers/available?limit=100")
        .await
        .iter()
        .map(|n| n["id"].as_str().unwrap_or_default().to_owned())
        .take(claims)
        .collect();
    assert_eq!(ids.len(), claims);

    let started = Instant::now();
    let mut latencies: Vec<Duration> = stream::iter(ids)
        .map(|id| {
            let api = api.clone();
            async move {
                let t = Instant::now();
                let r = api.post(&format!("/v1/numbers/{id}/claim"), None).await;
                assert_eq!(r.status, 201, "{}", r.text);
                t.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    latencies.sort();
    let rate = claims as f64 / elapsed.as_secs_f64();

    let after = query_latency(&api, queries).await;
    let wallet = api.get("/v1/wallet").await.json();
    assert_eq!(
        wallet["balance_minor"],
        ((INVENTORY - claims) as i64) * 10_000,
        "every claim debited exactly once"
    );

    let name = match backend {
        Backend::Sqlite => "SQLite",
        Backend::Postgres => "PostgreSQL",
    };
    println!("== {name}: {INVENTORY} inventory rows ==");
    println!(
        "claims: {claims} in {:.2} s = {rate:.0} claims/s (concurrency {concurrency}); \
         claim latency p50 {:.2} ms, p99 {:.2} ms",
        elapsed.as_secs_f64(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );
    print_queries("before claims", queries, &before);
    print_queries(&format!("after {claims} claims"), queries, &after);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. `cargo test --benches`) is a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let settings = Settings {
        claims: env_usize("BENCH_CLAIMS", if full { INVENTORY / 2 } else { 50 }).min(INVENTORY),
        concurrency: env_usize("BENCH_CONCURRENCY", 64),
        queries: env_usize("BENCH_QUERIES", if full { 1000 } else { 30 }),
    };
    run(Backend::Sqlite, &settings).await;
    if std::env::var("SAUTIKIT_TEST_POSTGRES_URL").is_ok() {
        run(Backend::Postgres, &settings).await;
    } else {
        println!("PostgreSQL skipped: SAUTIKIT_TEST_POSTGRES_URL is not set");
    }
}
