//! Load harness for the registrar (issue: registrations): thousands of softphones, simulated over
//! raw UDP in this process, register with digest authentication against a real release
//! `sautikit serve` (dev mode, its own temp data dir) and then stay registered.
//!
//! - **rate**: registrations per second for a fixed time. Each registration is a full round: a
//!   REGISTER without credentials → `401` (SHA-256 challenge) → the same REGISTER with an
//!   `Authorization` answering it → `200`. Devices take turns round-robin, so at 2,000/s each of
//!   10,000 devices registers every 5 s (one Call-ID per device, CSeq rising). Measured:
//!   completed/s, failures (any final response other than 200 to the authenticated REGISTER, or no
//!   final response in `BENCH_REG_TIMEOUT_MS`), latency from sending the authenticated REGISTER
//!   to its 200 (the pass line) and of the whole round from the first REGISTER, the engine's CPU
//!   (utime+stime from /proc) and RSS (VmRSS sampled, VmHWM).
//! - **hold**: on a fresh server, every device registers once (at `BENCH_HOLD_RAMP`), then the
//!   bindings are held for `BENCH_HOLD_SECONDS` (120) while each device refreshes its binding
//!   every `BENCH_REFRESH_SECS` (120; refreshes are paced evenly, so each binding refreshes once
//!   in a 120 s window) with `Expires: BENCH_EXPIRES` (300, and `SAUTIKIT_SIP_MAX_EXPIRES` is set
//!   to the same), answering the engine's OPTIONS keepalives (every
//!   `SAUTIKIT_SIP_KEEPALIVE_SECS` = `BENCH_KEEPALIVE_SECS`, default 30) with 200. A refresh
//!   reuses the device's nonce with the next nonce count, as softphones do; a `401` (stale
//!   nonce) is answered once more. Measured over the window: the engine's CPU in cores, RSS at
//!   the end (and VmHWM), keepalives answered, bindings that got none, refreshes and their
//!   latency, bindings left in the database.
//!
//! Credentials are inserted straight into `sip_credentials` (the API hashes each password with
//! Argon2, tens of ms each), spread ten per number over numbers claimed through the API (a
//! number holds at most ten bindings). The inventory is seeded and the workspace created with
//! `sautikit admin` before the server starts.
//!
//! Devices are spread over `BENCH_REG_SOCKETS` UDP sockets (50), each with its own task that
//! owns its devices (no locks), matches responses by Call-ID and CSeq, retransmits per Timer E
//! (T1 500 ms doubling to T2 4 s) and keeps its timers in a heap. Every device has its own
//! contact `sip:<username>@127.0.0.1:<its socket's port>;ob`: the registrar keys bindings by
//! (number, contact).
//!
//! `cargo bench --bench registrations`. Environment: `BENCH_TESTS` (`rate,hold`; `store` adds
//! the registrar's store calls timed from this process without SIP), `BENCH_BACKENDS`
//! (`sqlite,postgres`; PostgreSQL only when `SAUTIKIT_TEST_POSTGRES_URL` is set),
//! `BENCH_BINDINGS` (10000 devices, one credential each), `BENCH_REG_NUMBERS` (`BENCH_BINDINGS`
//! / 10, the fewest that hold them), `BENCH_REG_RATE` (2000 registrations/s; a comma list runs
//! each in turn), `BENCH_SECONDS` (60), `BENCH_REG_SOCKETS` (50), `BENCH_REG_TIMEOUT_MS`
//! (10000), `BENCH_HOLD_RAMP` (1000/s), `BENCH_HOLD_SECONDS` (120), `BENCH_REFRESH_SECS` (120),
//! `BENCH_EXPIRES` (300), `BENCH_KEEPALIVE_SECS` (30), `BENCH_P99_MS` (20: the pass line),
//! `BENCH_REG_TARGET` (2000 completed/s: the pass line), `BENCH_HOLD_CORES` (0.2) and
//! `BENCH_HOLD_RSS_MIB` (256).

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::uac::{cpu_time, ensure_nofile, machine_load, quantile, status_kib, thread_cpu};
use common::{Backend, Mode, Server, TestDb};
use futures::StreamExt;
use harness::{
    backend_name, claim_seeded, env_or, insert_credentials, mib, sample_rss, sip_listen,
    thread_delta, udp_rcvbuf_errors, udp_socket_drops,
};
use sautikit::loadtest::devices::{DevSpec, Devices, DevicesConfig, Progress, Secret, Stats};
use sautikit_sip::digest::Algorithm;
use tokio::sync::watch;

// The devices share the two cores with the server: keep them lean.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn ms_us(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

// The devices are the load test's (`sautikit::loadtest::devices`); this bench sets up a server
// with credentials inserted straight into its database and drives them.

/// Fields drop in order: the server stops before its database goes.
struct Ctx {
    server: Server,
    store: sautikit::db::Db,
    workspace_id: String,
    specs: Vec<DevSpec>,
    _db: TestDb,
}

async fn setup(backend: Backend, devices: usize, expires: u32, keepalive_secs: u64) -> Ctx {
    let t0 = Instant::now();
    let db = TestDb::new(backend).await;
    // At most ten credentials per number: a number holds at most ten bindings.
    let n_numbers = env_or("BENCH_REG_NUMBERS", 0usize).max(devices.div_ceil(10));
    // Seeded before the server starts: with inventory present, dev mode seeds nothing else.
    let seeded = db.admin(&[
        "seed-inventory",
        "--count",
        &n_numbers.to_string(),
        "--start",
        "+254720000001",
    ]);
    assert_eq!(
        seeded["inserted"].as_u64(),
        Some(n_numbers as u64),
        "{seeded}"
    );
    let (workspace_id, key) = db.workspace("bench", 100_000_000);
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            ("SAUTIKIT_LOG", "warn"),
            ("SAUTIKIT_SIP_LISTEN", &sip_listen()),
            ("SAUTIKIT_SIP_MAX_EXPIRES", &expires.to_string()),
            ("SAUTIKIT_SIP_KEEPALIVE_SECS", &keepalive_secs.to_string()),
        ],
    );
    let api = server.api(&key);
    let store = sautikit::db::Db::connect(&db.url).await.expect("db");

    // Claim every seeded number through the API.
    let claimed: Vec<String> = claim_seeded(&api, &store, n_numbers)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let claim_time = t0.elapsed();

    // Credentials straight into the table: device g on number g % numbers, so devices in turn
    // hit different numbers (each REGISTER locks its number's row).
    let specs: Vec<DevSpec> = insert_credentials(&store, &workspace_id, &claimed, devices, "ts_b")
        .await
        .into_iter()
        .map(|c| DevSpec {
            user: c.user,
            secret: Secret::Ha1Sha256(c.ha1_sha256),
        })
        .collect();
    println!(
        "  setup: {n_numbers} numbers seeded and claimed through the API in {:.1} s, {devices} \
         credentials inserted in {:.1} s",
        claim_time.as_secs_f64(),
        (t0.elapsed() - claim_time).as_secs_f64()
    );
    Ctx {
        server,
        store,
        workspace_id,
        specs,
        _db: db,
    }
}

impl Ctx {
    /// A softphone for each credential, registering with the server.
    async fn devices(&self, s: &Settings) -> Devices {
        let config = DevicesConfig {
            server: self.server.sip_addr(),
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
            // The registrar accepts its own address as the AOR domain.
            domain: "127.0.0.1".into(),
            expected_realm: Some(self.workspace_id.clone()),
            sockets: s.sockets,
            expires: s.expires,
            timeout: s.timeout,
            user_agent: "sautikit-bench/1",
        };
        Devices::start(&config, &self.specs)
            .await
            .expect("device sockets")
    }

    /// The PostgreSQL database's name (None on SQLite).
    fn pg_name(&self) -> Option<String> {
        (self._db.backend == Backend::Postgres)
            .then(|| self._db.url.rsplit('/').next().unwrap_or("").to_owned())
    }

    /// Unexpired bindings in the database.
    async fn live_bindings(&self) -> i64 {
        let now = sautikit::time::to_db(chrono::Utc::now());
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sip_registrations WHERE expires_at > $1")
            .bind(now)
            .fetch_one(&self.store.read)
            .await
            .expect("count");
        sqlx::Row::try_get::<i64, _>(&row, "n").expect("n")
    }
}

/// (completed, failed, keepalives) in one second.
type Second = (u64, u64, u64);

/// Per-second deltas of the progress counters, one `Second` each second.
fn sample_seconds(
    progress: Arc<Progress>,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<Vec<Second>>) {
    let (tx, mut rx) = watch::channel(false);
    let h = tokio::spawn(async move {
        let mut out = Vec::new();
        let (_, mut c0, mut f0, mut o0) = progress.get();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = rx.changed() => break,
                _ = tick.tick() => {
                    let (_, c, f, o) = progress.get();
                    out.push((c - c0, f - f0, o - o0));
                    (c0, f0, o0) = (c, f, o);
                }
            }
        }
        out
    });
    (tx, h)
}

/// CPU time of the PostgreSQL backends serving database `name` (their process titles name it);
/// zero for SQLite, which runs inside the engine.
fn pg_backends_cpu(name: Option<&str>) -> Duration {
    let Some(name) = name else {
        return Duration::ZERO;
    };
    let mut total = Duration::ZERO;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return total;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(name) && cmd.starts_with(b"postgres") {
            total += cpu_time(pid);
        }
    }
    total
}

fn server_log_excerpt(server: &Server) -> String {
    let log = server.log_text();
    let lines: Vec<&str> = log.lines().collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        let key: String = l
            .split_whitespace()
            .skip(1)
            .take(8)
            .collect::<Vec<_>>()
            .join(" ");
        *kinds.entry(key).or_default() += 1;
    }
    let mut top: Vec<(String, usize)> = kinds.into_iter().collect();
    top.sort_by_key(|t| Reverse(t.1));
    let mut out = format!("{} log lines", lines.len());
    for (k, c) in top.iter().take(5) {
        out.push_str(&format!("\n      {c} × {k}"));
    }
    out
}

fn latency_line(name: &str, v: &mut [u32]) -> String {
    v.sort_unstable();
    format!(
        "{name}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms_us(quantile(v, 0.5)),
        ms_us(quantile(v, 0.9)),
        ms_us(quantile(v, 0.99)),
        ms_us(quantile(v, 0.999)),
        ms_us(quantile(v, 1.0)),
    )
}

/// Where the authenticated REGISTERs over `line` were, by second of the run, beside the
/// keepalives the engine sent in that second; and the p99 over the seconds without keepalives.
fn slow_by_second(st: &Stats, started: Instant, line: Duration, per_second: &[Second]) -> String {
    let line_us = line.as_micros() as u32;
    let ka = |sec: u64| per_second.get(sec as usize).map_or(0, |x| x.2);
    let mut by_second: BTreeMap<u64, usize> = BTreeMap::new();
    let mut quiet: Vec<u32> = Vec::new();
    for (lat, at) in st.auth_lat_us.iter().zip(&st.auth_at) {
        let sec = at.saturating_duration_since(started).as_secs();
        if *lat > line_us {
            *by_second.entry(sec).or_default() += 1;
        }
        // Seconds with no keepalive sent, neither in it nor in the one before.
        if ka(sec) == 0 && (sec == 0 || ka(sec - 1) == 0) {
            quiet.push(*lat);
        }
    }
    quiet.sort_unstable();
    let mut worst: Vec<(u64, usize)> = by_second.iter().map(|(s, n)| (*s, *n)).collect();
    worst.sort_by_key(|(s, n)| (Reverse(*n), *s));
    let seconds: Vec<String> = worst
        .iter()
        .take(6)
        .map(|(s, n)| format!("t={s}s: {n} (keepalives that second {})", ka(*s)))
        .collect();
    format!(
        "authenticated REGISTER → 200 over {} ms: {} in {} seconds of the run (most: {}); p99 over \
         the {} REGISTERs sent away from keepalive rounds: {:.2} ms",
        line.as_millis(),
        by_second.values().sum::<usize>(),
        by_second.len(),
        if seconds.is_empty() {
            "none".into()
        } else {
            seconds.join(", ")
        },
        quiet.len(),
        ms_us(quantile(&quiet, 0.99))
    )
}

fn counts_line(s: &Stats) -> String {
    format!(
        "rounds started {} completed {} (nonce reused {}) failed {} (non-200 {:?}, timeouts {}); \
         challenges {}, re-challenges {}, busy skips {}, retransmissions {}, late responses {}, \
         unmatched {}, send errors {}, realm mismatches {}",
        s.started,
        s.completed,
        s.refreshes,
        s.failed(),
        s.failed_status,
        s.timeouts,
        s.challenges,
        s.rechallenges,
        s.busy,
        s.retransmissions,
        s.late,
        s.unmatched,
        s.send_errors,
        s.realm_mismatch
    )
}

/// Sends `total` rounds at `rate` per second, device after device from `first`; prints a
/// progress line every 5 s. Returns the time it took.
async fn pace(
    devices: &Devices,
    pid: u32,
    total: u64,
    rate: f64,
    first: u64,
    refresh: bool,
    label: &str,
) -> Duration {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut last_line = Instant::now();
    let mut last_cpu = cpu_time(pid);
    let mut last_done = devices.progress.get().1;
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            devices.register(((first + sent) % devices.n as u64) as usize, refresh);
            sent += 1;
        }
        if last_line.elapsed() >= Duration::from_secs(5) {
            let cpu = cpu_time(pid);
            let (s, c, f, o) = devices.progress.get();
            let dt = last_line.elapsed().as_secs_f64();
            println!(
                "  {label} t={:>5.1}s started {s} completed {c} ({:.0}/s) failed {f} keepalives {o}; \
                 server {:.2} cores, RSS {:.0} MiB",
                started.elapsed().as_secs_f64(),
                (c - last_done) as f64 / dt,
                (cpu - last_cpu).as_secs_f64() / dt,
                mib(status_kib(pid, "VmRSS"))
            );
            last_cpu = cpu;
            last_done = c;
            last_line = Instant::now();
        }
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Rate

struct Settings {
    devices: usize,
    sockets: usize,
    timeout: Duration,
    expires: u32,
    keepalive_secs: u64,
}

struct RateSettings {
    rate: f64,
    seconds: f64,
    p99_line: Duration,
    target: f64,
}

async fn rate_run(backend: Backend, s: &Settings, r: &RateSettings) -> bool {
    println!(
        "\n== rate, {}: {:.0} registrations/s (challenge + authenticated REGISTER) for {:.0} s, \
         {} devices on {} sockets ==",
        backend_name(backend),
        r.rate,
        r.seconds,
        s.devices,
        s.sockets
    );
    println!("  load before: {}", machine_load());
    let ctx = setup(backend, s.devices, s.expires, s.keepalive_secs).await;
    let pid = ctx.server.pid();
    let devices = ctx.devices(s).await;
    let total = (r.rate * r.seconds).round() as u64;
    let sip_port = [ctx.server.sip_addr().port()];
    let drops0 = udp_rcvbuf_errors();
    let (server_drops0, device_drops0) = (
        udp_socket_drops(&sip_port),
        udp_socket_drops(&devices.ports),
    );
    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(250));
    let (sec_stop, sec_task) = sample_seconds(devices.progress.clone());
    let pg = ctx.pg_name();
    let pg0 = pg_backends_cpu(pg.as_deref());
    let threads0 = thread_cpu(pid);
    let cpu0 = cpu_time(pid);
    let me0 = cpu_time(std::process::id());
    let started = Instant::now();
    let sending = pace(&devices, pid, total, r.rate, 0, false, "rate").await;
    let settled = devices.settle(s.timeout + Duration::from_secs(2)).await;
    let done = started.elapsed();
    let pg1 = pg_backends_cpu(pg.as_deref());
    let cpu1 = cpu_time(pid);
    let me1 = cpu_time(std::process::id());
    let threads1 = thread_cpu(pid);
    let _ = sec_stop.send(true);
    let _ = rss_stop.send(true);
    let per_second = sec_task.await.unwrap_or_default();
    let rss = rss_task.await.unwrap_or_default();
    let hwm = status_kib(pid, "VmHWM");
    let drops = udp_rcvbuf_errors() - drops0;
    let server_drops = udp_socket_drops(&sip_port) - server_drops0;
    let device_drops = udp_socket_drops(&devices.ports) - device_drops0;
    let mut st = devices.take().await;
    let live = ctx.live_bindings().await;

    let failed = st.failed();
    let achieved = st.completed as f64 / sending.as_secs_f64();
    let slow_line = slow_by_second(&st, started, r.p99_line, &per_second);
    let mut auth = std::mem::take(&mut st.auth_lat_us);
    let mut round = std::mem::take(&mut st.round_lat_us);
    let auth_line = latency_line("authenticated REGISTER → 200", &mut auth);
    let round_line = latency_line("whole round (REGISTER → 401 → REGISTER → 200)", &mut round);
    let p99 = Duration::from_micros(u64::from(quantile(&auth, 0.99)));
    let cores = (cpu1 - cpu0).as_secs_f64() / done.as_secs_f64();
    let peak = rss.iter().copied().max().unwrap_or(0);
    // Completions per whole second of the sending window (the last partial one left out).
    let full_secs = (sending.as_secs_f64().floor() as usize).min(per_second.len());
    let mut secs: Vec<u64> = per_second[..full_secs].iter().map(|x| x.0).collect();
    secs.sort_unstable();
    // The rate line counts whole seconds: the sending window ends a few ms past them, which
    // would take a run completing every round offered at the target just under it.
    let rate_met = st.completed as f64 >= r.target * sending.as_secs_f64().floor();
    let pass = failed == 0 && st.in_flight == 0 && rate_met && p99 <= r.p99_line;

    println!(
        "  offered {total} rounds in {:.2} s ({:.0}/s); all ended {} after {:.2} s",
        sending.as_secs_f64(),
        total as f64 / sending.as_secs_f64(),
        if settled { "" } else { "NOT" },
        done.as_secs_f64()
    );
    println!("  {}", counts_line(&st));
    println!("  {auth_line}");
    println!("  {round_line}");
    println!("  {slow_line}");
    println!(
        "  completed per second over {full_secs} whole seconds: min {}, median {}, max {}",
        secs.first().copied().unwrap_or(0),
        quantile(&secs, 0.5),
        secs.last().copied().unwrap_or(0)
    );
    println!(
        "  server CPU {cores:.2} cores ({:.0} µs per registration); RSS peak sampled {:.0} MiB, \
         VmHWM {:.0} MiB, at the end {:.0} MiB; harness {:.2} cores; UDP datagrams dropped for a \
         full receive buffer: {server_drops} at the server's socket, {device_drops} at the devices' \
         ({drops} machine-wide)",
        (cpu1 - cpu0).as_secs_f64() * 1e6 / st.completed.max(1) as f64,
        mib(peak),
        mib(hwm),
        mib(status_kib(pid, "VmRSS")),
        (me1 - me0).as_secs_f64() / done.as_secs_f64()
    );
    println!(
        "  server threads: {}",
        thread_delta(&threads0, &threads1, done)
    );
    if pg.is_some() {
        println!(
            "  PostgreSQL backends of this database: {:.2} cores ({:.0} µs per registration)",
            (pg1 - pg0).as_secs_f64() / done.as_secs_f64(),
            (pg1 - pg0).as_secs_f64() * 1e6 / st.completed.max(1) as f64
        );
    }
    println!(
        "  bindings in the database: {live} (devices registered here: {})",
        st.registered
    );
    println!("  server log: {}", server_log_excerpt(&ctx.server));
    println!("  load after: {}", machine_load());
    println!(
        "  RESULT rate {}: {:.0}/s offered, {achieved:.0}/s completed, failed {failed}, \
         auth→200 p50 {:.2} ms p99 {:.2} ms max {:.2} ms, round p50 {:.2} ms p99 {:.2} ms, \
         server {cores:.2} cores, RSS peak {:.0} MiB → {}",
        backend_name(backend),
        r.rate,
        ms_us(quantile(&auth, 0.5)),
        ms_us(quantile(&auth, 0.99)),
        ms_us(quantile(&auth, 1.0)),
        ms_us(quantile(&round, 0.5)),
        ms_us(quantile(&round, 0.99)),
        mib(peak.max(hwm)),
        if pass { "PASS" } else { "FAIL" }
    );
    drop(devices);
    drop(ctx);
    pass
}

// ---------------------------------------------------------------------------------------------
// Hold

struct HoldSettings {
    ramp: f64,
    seconds: f64,
    refresh_secs: f64,
    cores_line: f64,
    rss_line_mib: f64,
}

async fn hold_run(backend: Backend, s: &Settings, h: &HoldSettings) -> bool {
    println!(
        "\n== hold, {}: {} bindings held {:.0} s; Expires {} s, a refresh every {:.0} s per \
         binding, OPTIONS keepalives every {} s ==",
        backend_name(backend),
        s.devices,
        h.seconds,
        s.expires,
        h.refresh_secs,
        s.keepalive_secs
    );
    println!("  load before: {}", machine_load());
    let ctx = setup(backend, s.devices, s.expires, s.keepalive_secs).await;
    let pid = ctx.server.pid();
    let devices = ctx.devices(s).await;

    // Everyone registers once.
    let cpu_r0 = cpu_time(pid);
    let r0 = Instant::now();
    pace(&devices, pid, s.devices as u64, h.ramp, 0, false, "ramp").await;
    let settled = devices.settle(s.timeout + Duration::from_secs(2)).await;
    let ramp = r0.elapsed();
    let cpu_r1 = cpu_time(pid);
    let mut ramp_stats = devices.take().await;
    let mut ramp_auth = std::mem::take(&mut ramp_stats.auth_lat_us);
    println!(
        "  ramp: {} of {} registered in {:.1} s{} ({} failed); server {:.2} cores; {}",
        ramp_stats.completed,
        s.devices,
        ramp.as_secs_f64(),
        if settled { "" } else { " (NOT all ended)" },
        ramp_stats.failed(),
        (cpu_r1 - cpu_r0).as_secs_f64() / ramp.as_secs_f64().max(0.001),
        latency_line("authenticated REGISTER → 200", &mut ramp_auth)
    );

    // The window: refreshes paced evenly, keepalives answered as they come.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = devices.take().await; // keepalives are counted from here
    println!("  load at window start: {}", machine_load());
    let rss_start = status_kib(pid, "VmRSS");
    let sip_port = [ctx.server.sip_addr().port()];
    let drops0 = udp_rcvbuf_errors();
    let (server_drops0, device_drops0) = (
        udp_socket_drops(&sip_port),
        udp_socket_drops(&devices.ports),
    );
    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(500));
    let (sec_stop, sec_task) = sample_seconds(devices.progress.clone());
    let pg = ctx.pg_name();
    let pg0 = pg_backends_cpu(pg.as_deref());
    let threads0 = thread_cpu(pid);
    let cpu0 = cpu_time(pid);
    let me0 = cpu_time(std::process::id());
    let w0 = Instant::now();
    let refresh_rate = s.devices as f64 / h.refresh_secs;
    let total = (refresh_rate * h.seconds).round() as u64;
    pace(&devices, pid, total, refresh_rate, 0, true, "hold").await;
    let rest = Duration::from_secs_f64(h.seconds).saturating_sub(w0.elapsed());
    tokio::time::sleep(rest).await;
    let wall = w0.elapsed();
    let pg1 = pg_backends_cpu(pg.as_deref());
    let cpu1 = cpu_time(pid);
    let me1 = cpu_time(std::process::id());
    let threads1 = thread_cpu(pid);
    let rss_end = status_kib(pid, "VmRSS");
    let hwm = status_kib(pid, "VmHWM");
    let _ = sec_stop.send(true);
    let _ = rss_stop.send(true);
    let per_second = sec_task.await.unwrap_or_default();
    let rss = rss_task.await.unwrap_or_default();
    let drops = udp_rcvbuf_errors() - drops0;
    let server_drops = udp_socket_drops(&sip_port) - server_drops0;
    let device_drops = udp_socket_drops(&devices.ports) - device_drops0;
    println!("  load at window end: {}", machine_load());
    let settled = devices.settle(s.timeout + Duration::from_secs(2)).await;
    let mut st = devices.take().await;
    let live = ctx.live_bindings().await;

    let cores = (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64();
    let peak = rss.iter().copied().max().unwrap_or(0);
    let failed = st.failed();
    let mut auth = std::mem::take(&mut st.auth_lat_us);
    st.round_lat_us.clear();
    let refresh_line = latency_line("refresh REGISTER → 200", &mut auth);
    let ka_per_sec: Vec<u64> = per_second.iter().map(|x| x.2).collect();
    let busy_secs = ka_per_sec.iter().filter(|n| **n > 0).count();
    let pass = cores <= h.cores_line
        && mib(rss_end) <= h.rss_line_mib
        && failed == 0
        && st.silent == 0
        && live == s.devices as i64;

    println!(
        "  window {:.1} s: refreshes {} of {total} sent completed ({} reused the nonce, {} \
         re-challenged), failed {failed}; {}{}",
        wall.as_secs_f64(),
        st.completed,
        st.refreshes,
        st.rechallenges,
        refresh_line,
        if settled { "" } else { " (NOT all ended)" }
    );
    println!("  {}", counts_line(&st));
    println!(
        "  keepalives: {} OPTIONS answered 200 ({} retransmitted by the engine), in {busy_secs} of \
         {} seconds, at most {} in one second; bindings with no keepalive in the window: {} of {}",
        st.options,
        st.options_retx,
        ka_per_sec.len(),
        ka_per_sec.iter().max().copied().unwrap_or(0),
        st.silent,
        st.registered
    );
    println!(
        "  engine: {cores:.3} cores over the window; RSS {:.0} MiB at the start, {:.0} MiB at the \
         end, peak sampled {:.0} MiB, VmHWM {:.0} MiB (whole run, ramp included); harness {:.2} \
         cores; UDP datagrams dropped for a full receive buffer: {server_drops} at the server's \
         socket, {device_drops} at the devices' ({drops} machine-wide)",
        mib(rss_start),
        mib(rss_end),
        mib(peak),
        mib(hwm),
        (me1 - me0).as_secs_f64() / wall.as_secs_f64()
    );
    println!(
        "  server threads in the window: {}",
        thread_delta(&threads0, &threads1, wall)
    );
    if pg.is_some() {
        println!(
            "  PostgreSQL backends of this database: {:.3} cores over the window (not in the \
             engine's figure)",
            (pg1 - pg0).as_secs_f64() / wall.as_secs_f64()
        );
    }
    println!("  bindings in the database at the end: {live}");
    println!("  server log: {}", server_log_excerpt(&ctx.server));
    println!(
        "  RESULT hold {}: {} bindings, {cores:.3} cores, RSS {:.0} MiB at the end (VmHWM {:.0}), \
         keepalives {} answered, {} silent bindings, refreshes {} ok / {failed} failed \
         (p99 {:.2} ms), bindings in db {live} → {}",
        backend_name(backend),
        st.registered,
        mib(rss_end),
        mib(hwm),
        st.options,
        st.silent,
        st.completed,
        ms_us(quantile(&auth, 0.99)),
        if pass { "PASS" } else { "FAIL" }
    );
    drop(devices);
    drop(ctx);
    pass
}

// ---------------------------------------------------------------------------------------------
// Store: the registrar's database work alone, called in this process (no SIP), to separate the
// database's share of a registration from the rest.

async fn store_run(backend: Backend, s: &Settings) {
    use sautikit_actors::registrar::{RegisterBindings, RegistrarStore};
    use sautikit_sip::registrar::{BindingLimits, ContactSet, RegisterRequest, RequestedContact};
    use sautikit_sip::transaction::{Peer, Transport};

    println!(
        "\n== store, {}: the registrar's store calls from this process, no SIP; {} credentials ==",
        backend_name(backend),
        s.devices
    );
    println!("  load before: {}", machine_load());
    // The server idles meanwhile (its keepalive rounds are an hour apart).
    let ctx = setup(backend, s.devices, s.expires, 3600).await;
    let store = Arc::new(sautikit::store::SqlStore::new(
        sautikit::db::Db::connect(&ctx._db.url).await.expect("db"),
    ));
    let us = |t: Instant| t.elapsed().as_micros().min(u32::MAX as u128) as u32;
    let me = std::process::id();

    // The price of one statement: a round trip to the write connection's worker thread.
    {
        let mut conn = store.db().write.acquire().await.expect("acquire");
        let n = 5000;
        let mut lat = Vec::with_capacity(n);
        let cpu0 = cpu_time(me);
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            sqlx::query("SELECT 1")
                .execute(&mut *conn)
                .await
                .expect("select 1");
            lat.push(us(t));
        }
        println!(
            "  `SELECT 1` on the write connection, one at a time: {:.0}/s, {:.0} µs CPU each; {}",
            n as f64 / t0.elapsed().as_secs_f64(),
            (cpu_time(me) - cpu0).as_secs_f64() * 1e6 / n as f64,
            latency_line("latency", &mut lat)
        );
        drop(conn);
        let mut lat = Vec::with_capacity(n);
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            let tx = store.db().write.begin().await.expect("begin");
            tx.commit().await.expect("commit");
            lat.push(us(t));
        }
        println!(
            "  empty transaction (acquire, BEGIN, COMMIT, release): {:.0}/s; {}",
            n as f64 / t0.elapsed().as_secs_f64(),
            latency_line("latency", &mut lat)
        );
    }

    let mut logins = Vec::with_capacity(s.devices);
    let mut lat = Vec::with_capacity(s.devices);
    let t0 = Instant::now();
    for spec in &ctx.specs {
        let t = Instant::now();
        let l = store
            .device_login(&spec.user)
            .await
            .expect("device_login")
            .expect("a login");
        lat.push(us(t));
        logins.push(l);
    }
    println!(
        "  device_login, one at a time: {:.0}/s; {}",
        s.devices as f64 / t0.elapsed().as_secs_f64(),
        latency_line("latency", &mut lat)
    );
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for spec in ctx.specs.iter().take(3000) {
        let t = Instant::now();
        let realm = store.realm_for(&spec.user).await.expect("realm_for");
        assert_eq!(realm.as_deref(), Some(ctx.workspace_id.as_str()));
        lat.push(us(t));
    }
    println!(
        "  realm_for, one at a time: {:.0}/s; {}",
        lat.len() as f64 / t0.elapsed().as_secs_f64(),
        latency_line("latency", &mut lat)
    );

    let logins = Arc::new(logins);
    let cmd = move |logins: &[sautikit_actors::registrar::DeviceLogin], g: usize, cseq: u32| {
        let login = logins[g].clone();
        RegisterBindings {
            request: RegisterRequest {
                contacts: ContactSet::Bind(vec![RequestedContact {
                    uri: format!("sip:{}@127.0.0.1:5999;ob", login.username),
                    expires: None,
                }]),
                expires: Some(300),
                call_id: format!("store-{g}@bench"),
                cseq,
            },
            login,
            verified_with: Algorithm::Sha256,
            limits: BindingLimits {
                default_expires: 3600,
                max_expires: 300,
                min_expires: 60,
                max_contacts: 10,
            },
            source: Peer {
                addr: "127.0.0.1:5999".parse().expect("addr"),
                transport: Transport::Udp,
            },
            user_agent: Some("sautikit-bench/1".into()),
            engine_id: "bench-store".into(),
            now: chrono::Utc::now(),
        }
    };
    // One at a time: the transaction's own latency, first as inserts, then as refreshes.
    for (label, cseq) in [("new binding", 1u32), ("refresh", 2)] {
        let mut lat = Vec::with_capacity(s.devices);
        let cpu0 = cpu_time(me);
        let t0 = Instant::now();
        for g in 0..s.devices {
            let t = Instant::now();
            let after = store
                .register(cmd(&logins, g, cseq))
                .await
                .expect("register");
            assert!(!after.is_empty());
            lat.push(us(t));
        }
        println!(
            "  register ({label}), one at a time: {:.0}/s, {:.0} µs CPU each (this process; SQLite \
             runs in it, a PostgreSQL server does not); {}",
            s.devices as f64 / t0.elapsed().as_secs_f64(),
            (cpu_time(me) - cpu0).as_secs_f64() * 1e6 / s.devices as f64,
            latency_line("latency", &mut lat)
        );
    }
    // Many at once, as the registrar's tasks do under load.
    for (concurrency, cseq) in [(16usize, 3u32), (64, 4)] {
        let t0 = Instant::now();
        let mut lat: Vec<u32> = futures::stream::iter(0..s.devices)
            .map(|g| {
                let store = store.clone();
                let c = cmd(&logins, g, cseq);
                async move {
                    let t = Instant::now();
                    store.register(c).await.expect("register");
                    t.elapsed().as_micros().min(u32::MAX as u128) as u32
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        println!(
            "  register (refresh), {concurrency} at once: {:.0}/s; {}",
            s.devices as f64 / t0.elapsed().as_secs_f64(),
            latency_line("latency", &mut lat)
        );
    }
    if backend == Backend::Sqlite {
        what_if_fewer_statements(&store, &logins, s.devices).await;
    }
    println!("  load after: {}", machine_load());
    drop(ctx);
}

/// What-if (not the server's code): the common path of a REGISTER in three statements instead of
/// eight — both checks in one conditional UPDATE, the number's bindings read once (expired ones
/// dropped in Rust), the binding written with one upsert, and the answer's list made from what
/// was read and written instead of read again. SQLite only (its one writer serializes; on
/// PostgreSQL the checks would lock the number's row with `SELECT … FOR UPDATE` instead).
async fn what_if_fewer_statements(
    store: &Arc<sautikit::store::SqlStore>,
    logins: &Arc<Vec<sautikit_actors::registrar::DeviceLogin>>,
    devices: usize,
) {
    async fn one(
        store: &sautikit::store::SqlStore,
        login: &sautikit_actors::registrar::DeviceLogin,
        g: usize,
        cseq: i64,
    ) -> usize {
        let now = chrono::Utc::now();
        let ts = sautikit::time::to_db(now);
        let expires = sautikit::time::to_db(now + chrono::Duration::seconds(300));
        let contact = format!("sip:{}@127.0.0.1:5999;ob", login.username);
        let mut tx = store.db().write.begin().await.expect("begin");
        let ok = sqlx::query(
            "UPDATE sip_credentials SET updated_at = updated_at WHERE id = $1 AND status = 'active' \
             AND ha1_sha256 = $2 AND EXISTS (SELECT 1 FROM tenant_numbers WHERE id = $3 \
             AND status = 'active')",
        )
        .bind(&login.credential_id)
        .bind(&login.ha1_sha256)
        .bind(&login.number_id)
        .execute(&mut *tx)
        .await
        .expect("check");
        assert_eq!(ok.rows_affected(), 1);
        let rows = sqlx::query(
            "SELECT id, contact, sip_call_id, cseq, source_addr, transport, user_agent, \
             expires_at, created_at, updated_at FROM sip_registrations WHERE number_id = $1",
        )
        .bind(&login.number_id)
        .fetch_all(&mut *tx)
        .await
        .expect("bindings");
        let live = rows
            .iter()
            .filter(|r| sqlx::Row::try_get::<String, _>(*r, "expires_at").is_ok_and(|e| e > ts))
            .count();
        sqlx::query(
            "INSERT INTO sip_registrations (id, workspace_id, number_id, credential_id, contact, \
             source_addr, transport, user_agent, sip_call_id, cseq, engine_id, expires_at, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'udp', $7, $8, $9, $10, $11, \
             $12, $12) ON CONFLICT (number_id, contact) DO UPDATE SET credential_id = \
             excluded.credential_id, source_addr = excluded.source_addr, transport = \
             excluded.transport, user_agent = excluded.user_agent, sip_call_id = \
             excluded.sip_call_id, cseq = excluded.cseq, engine_id = excluded.engine_id, \
             expires_at = excluded.expires_at, updated_at = excluded.updated_at",
        )
        .bind(sautikit::time::new_id())
        .bind(&login.workspace_id)
        .bind(&login.number_id)
        .bind(&login.credential_id)
        .bind(&contact)
        .bind("127.0.0.1:5999")
        .bind("sautikit-bench/1")
        .bind(format!("whatif-{g}@bench"))
        .bind(cseq)
        .bind("bench-store")
        .bind(&expires)
        .bind(&ts)
        .execute(&mut *tx)
        .await
        .expect("upsert");
        tx.commit().await.expect("commit");
        live
    }
    let me = std::process::id();
    let cpu0 = cpu_time(me);
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(devices);
    for g in 0..devices {
        let t = Instant::now();
        one(store, &logins[g], g, 5).await;
        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    println!(
        "  WHAT-IF 3 statements (refresh), one at a time: {:.0}/s, {:.0} µs CPU each; {}",
        devices as f64 / t0.elapsed().as_secs_f64(),
        (cpu_time(me) - cpu0).as_secs_f64() * 1e6 / devices as f64,
        latency_line("latency", &mut lat)
    );
    let t0 = Instant::now();
    let mut lat: Vec<u32> = futures::stream::iter(0..devices)
        .map(|g| {
            let store = store.clone();
            let logins = logins.clone();
            async move {
                let t = Instant::now();
                one(&store, &logins[g], g, 6).await;
                t.elapsed().as_micros().min(u32::MAX as u128) as u32
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    println!(
        "  WHAT-IF 3 statements (refresh), 16 at once: {:.0}/s; {}",
        devices as f64 / t0.elapsed().as_secs_f64(),
        latency_line("latency", &mut lat)
    );
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
    let s = Settings {
        devices: env_or("BENCH_BINDINGS", if full { 10_000usize } else { 200 }).max(1),
        sockets: env_or("BENCH_REG_SOCKETS", if full { 50usize } else { 4 }).max(1),
        timeout: Duration::from_millis(env_or("BENCH_REG_TIMEOUT_MS", 10_000)),
        expires: env_or("BENCH_EXPIRES", 300u32),
        keepalive_secs: env_or("BENCH_KEEPALIVE_SECS", if full { 30u64 } else { 1 }),
    };
    let limit = ensure_nofile(4096);
    println!(
        "registrations bench: {} devices, {} sockets; open-file limit {limit}",
        s.devices, s.sockets
    );
    let mut summary = Vec::new();
    if tests.contains("rate") {
        let rates = std::env::var("BENCH_REG_RATE")
            .unwrap_or_else(|_| if full { "2000" } else { "100" }.to_owned());
        for &backend in &backends {
            for rate in rates
                .split(',')
                .filter_map(|r| r.trim().parse::<f64>().ok())
            {
                let r = RateSettings {
                    rate,
                    seconds: env_or("BENCH_SECONDS", if full { 60.0 } else { 3.0 }),
                    p99_line: Duration::from_millis(env_or("BENCH_P99_MS", 20)),
                    target: env_or("BENCH_REG_TARGET", if full { 2000.0 } else { 0.0 }),
                };
                let ok = rate_run(backend, &s, &r).await;
                summary.push(format!(
                    "rate {} {rate:.0}/s: {}",
                    backend_name(backend),
                    if ok { "PASS" } else { "FAIL" }
                ));
            }
        }
    }
    if tests.contains("hold") {
        for &backend in &backends {
            let h = HoldSettings {
                ramp: env_or("BENCH_HOLD_RAMP", if full { 1000.0 } else { 100.0 }),
                seconds: env_or("BENCH_HOLD_SECONDS", if full { 120.0 } else { 4.0 }),
                refresh_secs: env_or("BENCH_REFRESH_SECS", if full { 120.0 } else { 4.0 }),
                cores_line: env_or("BENCH_HOLD_CORES", 0.2),
                rss_line_mib: env_or("BENCH_HOLD_RSS_MIB", 256.0),
            };
            let ok = hold_run(backend, &s, &h).await;
            summary.push(format!(
                "hold {}: {}",
                backend_name(backend),
                if ok { "PASS" } else { "FAIL" }
            ));
        }
    }
    if tests.contains("store") {
        for &backend in &backends {
            store_run(backend, &s).await;
        }
    }
    println!("\nsummary: {}", summary.join("; "));
}
