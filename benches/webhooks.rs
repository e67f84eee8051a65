//! Load harness for webhook delivery (issue 3): signed deliveries per second from a backlog to a
//! local receiver, and the engine's memory while it drains.
//!
//! The backlog is written straight into the outbox (as committed events would be), spread over
//! 1,000 ordering keys, with one subscription. Then a release `sautikit serve` starts and drains
//! it; the receiver (in this process) answers 200 at once. RSS of the server is sampled every
//! 50 ms. Two backlog sizes show whether memory grows with the backlog.
//!
//! `cargo bench --bench webhooks`; `BENCH_BACKLOG` (default 100000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use chrono::Utc;
use common::{Backend, Mode, Server, TestDb};
use sautikit::db::Db;
use sautikit::store::SqlStore;
use sautikit::webhooks::{EventDraft, enqueue};
use serde_json::json;
use tokio::sync::Notify;

const KEYS: usize = 1000;

// The receiver runs in this process and shares the two cores with the server: keep it lean.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) used by a process or thread, from its `/proc/…/stat`.
fn cpu_secs(stat_path: &str) -> f64 {
    let ticks = std::fs::read_to_string(stat_path)
        .ok()
        .and_then(|s| {
            // The fields after the command name (which may hold spaces) start after ")".
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line: 12 and 13 after ")".
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// (busy, total) jiffies of the whole machine, from `/proc/stat`.
fn machine_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

async fn fill_backlog(db: &TestDb, workspace_id: &str, url: &str, n: usize) {
    let store = SqlStore::new(Db::connect(&db.url).await.expect("connect"));
    store
        .create_subscription(workspace_id, url, &["*".to_owned()], Utc::now())
        .await
        .expect("subscription");
    let mut done = 0;
    while done < n {
        let mut tx = store.db().write.begin().await.expect("begin");
        for i in done..(done + 2000).min(n) {
            enqueue(
                &mut tx,
                &EventDraft {
                    workspace_id: workspace_id.to_owned(),
                    kind: "number.provisioned",
                    number_id: Some(format!("bench-number-{}", i % KEYS)),
                    call_id: None,
                    payload: json!({"number_id": format!("bench-number-{}", i % KEYS), "seq": i}),
                    events_url: None,
                },
                Utc::now(),
            )
            .await
            .expect("enqueue");
        }
        tx.commit().await.expect("commit");
        done = (done + 2000).min(n);
    }
    store.db().close().await;
}

async fn run(backend: Backend, backlog: usize) {
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let app = {
        let (count, done) = (count.clone(), done.clone());
        Router::new().route(
            "/hook",
            post(move || {
                let (count, done) = (count.clone(), done.clone());
                async move {
                    if count.fetch_add(1, Ordering::Relaxed) + 1 >= backlog {
                        done.notify_one();
                    }
                    "ok"
                }
            }),
        )
    };
    // The receiver gets its own single-threaded runtime on its own thread: a lean local
    // receiver, as a customer's would be, not sharing this harness's workers.
    // (Bound with tokio's listener: its accept backlog is 1024. std's 128 overflows when the
    // engine opens its connections at once, and dropped SYNs are retried only after seconds.)
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // "<pid>/task/<tid>": where this thread's CPU time can be read.
        let _ = tid_tx.send(
            std::fs::read_link("/proc/thread-self")
                .map(|p| format!("/proc/{}/stat", p.display()))
                .unwrap_or_default(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let _ = addr_tx.send(listener.local_addr().expect("addr"));
            let _ = axum::serve(listener, app).await;
        });
    });
    let url = format!("http://{}/hook", addr_rx.recv().expect("receiver address"));
    let receiver_stat = tid_rx.recv().expect("receiver thread");

    let db = TestDb::new(backend).await;
    let (ws, _) = db.workspace("bench", 0);
    let t = Instant::now();
    fill_backlog(&db, &ws, &url, backlog).await;
    let fill = t.elapsed();

    let load_before = loadavg();
    let machine_before = machine_jiffies();
    let receiver_cpu_before = cpu_secs(&receiver_stat);
    let started = Instant::now();
    // BENCH_SERVER_LOG (a tracing filter) keeps the server's log, e.g. to time its statements.
    let server_log = std::env::var("BENCH_SERVER_LOG").ok();
    let server = Server::start_with(
        &db,
        Mode::Production,
        &[
            ("SAUTIKIT_LOG", server_log.as_deref().unwrap_or("warn")),
            ("SAUTIKIT_WEBHOOK_ALLOW_CIDRS", "127.0.0.0/8"),
        ],
    );
    let pid = server.pid();
    let mut samples = vec![rss_kib(pid)];
    let (mut t10, mut t90) = (None, None);
    let finished = loop {
        tokio::select! {
            () = done.notified() => break true,
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                samples.push(rss_kib(pid));
                let c = count.load(Ordering::Relaxed);
                if std::env::var("BENCH_TIMELINE").is_ok() && samples.len() % 10 == 0 {
                    println!("  t={:.1}s delivered={c}", started.elapsed().as_secs_f64());
                }
                if t10.is_none() && c >= backlog / 10 {
                    t10 = Some((Instant::now(), c));
                }
                if t90.is_none() && c >= backlog * 9 / 10 {
                    t90 = Some((Instant::now(), c));
                }
                if started.elapsed() > Duration::from_secs(600) {
                    break false;
                }
            }
        }
    };
    let elapsed = started.elapsed();
    let server_cpu = cpu_secs(&format!("/proc/{pid}/stat"));
    let receiver_cpu = cpu_secs(&receiver_stat) - receiver_cpu_before;
    let machine_after = machine_jiffies();
    let machine_busy = (machine_after.0 - machine_before.0) as f64
        / (machine_after.1 - machine_before.1).max(1) as f64;
    samples.push(rss_kib(pid));
    let steady = match (t10, t90) {
        (Some((a, ca)), Some((b, cb))) if b > a => (cb - ca) as f64 / (b - a).as_secs_f64(),
        _ => f64::NAN,
    };
    let delivered = count.load(Ordering::Relaxed);
    assert!(finished, "only {delivered} of {backlog} delivered in 600 s");
    let name = match backend {
        Backend::Sqlite => "SQLite",
        Backend::Postgres => "PostgreSQL",
    };
    let peak = samples.iter().max().copied().unwrap_or(0);
    let mut sorted = samples.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    println!(
        "{name}: backlog {backlog} ({KEYS} ordering keys), filled in {:.1} s; drained in {:.2} s \
         = {:.0} deliveries/s overall, {steady:.0}/s steady (10%→90%); server RSS start {} MiB, \
         median {} MiB, peak {} MiB",
        fill.as_secs_f64(),
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64(),
        samples[0] / 1024,
        median / 1024,
        peak / 1024
    );
    // CPU per delivery does not depend on what else runs on the machine; the rates above do.
    println!(
        "  CPU: server {server_cpu:.2} s = {:.0} µs/delivery, receiver {receiver_cpu:.2} s = {:.0} \
         µs/delivery; machine busy {:.0} % of 2 cores during the drain, load average {load_before} \
         → {}",
        server_cpu * 1e6 / delivered as f64,
        receiver_cpu * 1e6 / delivered as f64,
        machine_busy * 100.0,
        loadavg()
    );
    if server_log.is_some() {
        let kept = std::env::temp_dir().join(format!("bench-webhooks-{name}-{backlog}.log"));
        if std::fs::copy(&server.log, &kept).is_ok() {
            println!("  server log: {}", kept.display());
        }
    }
    drop(server);
    if std::env::var("BENCH_KEEP_DB").is_ok() {
        // Left for a look at its tables and plans; drop it by hand.
        println!("  database kept: {}", db.url);
        std::mem::forget(db);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let big: usize = std::env::var("BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 500 });
    let mut backends: Vec<Backend> = if std::env::var("SAUTIKIT_TEST_POSTGRES_URL").is_ok() {
        vec![Backend::Sqlite, Backend::Postgres]
    } else {
        vec![Backend::Sqlite]
    };
    // BENCH_BACKEND=sqlite or postgres runs one of them.
    match std::env::var("BENCH_BACKEND").as_deref() {
        Ok("sqlite") => backends.retain(|b| *b == Backend::Sqlite),
        Ok("postgres") => backends.retain(|b| *b == Backend::Postgres),
        _ => {}
    }
    // BENCH_SMALL=0 skips the run with a tenth of the backlog.
    let small = std::env::var("BENCH_SMALL").as_deref() != Ok("0");
    for backend in backends {
        // A tenth of the backlog first: memory should not grow with the backlog.
        if small {
            run(backend, (big / 10).max(100)).await;
        }
        run(backend, big).await;
    }
}
