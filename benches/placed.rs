//! Load harness for calls placed through the API (issue: placed calls): `POST /v1/calls` at a
//! fixed rate to a real release `sautikit serve` in dev mode whose outbound trunk is a raw UDP SIP
//! UAS in this process. Everything shares one machine.
//!
//! Each call: `POST /v1/calls` from the one claimed number to `+254711` and the call's index in
//! six digits → the engine's INVITE at the trunk (matched to its request by that Request-URI
//! user) → our `200 OK` (retransmitted on T1 until the ACK) with media at one of a few RTP sockets
//! here → the number's voice callback (a server in this process) answers
//! `{"actions":[{"say":{"text":"Hello from Sautikit."}}]}`, synthesized once by the warm-up calls
//! and then played from the cache → the engine's RTP, matched to its call by its source port (the
//! port of the INVITE's SDP offer) → the script's end: the engine's BYE → our `200`.
//!
//! Measured per call: API request (handed to the HTTP client) → INVITE at the trunk; our `200`
//! sent → first RTP packet from the call's port (the engine sends silence from the answer until
//! the script plays), and → the prompt's first packet (the playback's talkspurt, marker bit) and
//! the first audible one; API request → HTTP response; the HTTP status (`201` expected). Arrival
//! is the kernel's receive time of the datagram (`SO_TIMESTAMPNS`, wall clock, as are the send
//! times it is compared with); the same from when this harness's task read it is printed beside
//! it (an upper bound: it adds this process's own scheduling on the shared cores). A call fails
//! when its POST is not `201` or it never gets an INVITE, an ACK for our `200`, RTP, an audible
//! prompt or the engine's BYE. After the run every call record must be `completed`
//! (`GET /v1/calls?direction=outbound&status=…`), and 3 events per call (`call.started`,
//! `call.answered`, `call.completed`) must reach the events URL. Also: the engine's CPU
//! (utime+stime from /proc) and RSS, this harness's CPU, RTP packets per call.
//!
//! `CARGO_TARGET_DIR=/work/target-placed cargo bench --bench placed`. Environment:
//! `BENCH_BACKENDS` (`sqlite,postgres`; PostgreSQL only when `SAUTIKIT_TEST_POSTGRES_URL` is set),
//! `BENCH_CALL_RATE` (200; a comma list runs each in turn), `BENCH_SECONDS` (60),
//! `BENCH_RING_MS` (0: the trunk answers at once; otherwise `180` at once and `200` that much
//! later), `BENCH_RTP_SOCKETS` (8), `BENCH_WARMUP_CALLS` (3, placed one after another before the
//! measured run and left out of its figures), `BENCH_CALL_TIMEOUT_MS` (15000: how long after the
//! last POST a call may take to end), `BENCH_INVITE_P99_MS` (20), `BENCH_RTP_P99_MS` (50),
//! `BENCH_MAX_CORES` (1.5): the pass lines; `BENCH_RTP_PORTS` (the engine's RTP range),
//! `BENCH_SERVER_LOG` (the engine's log filter, `warn`), `BENCH_SERVER_LOG_COPY` (a path to copy the
//! engine's log to before its data directory goes), `BENCH_CALLS_CSV` (a path for every call's
//! times, in ns: POST sent (wall clock), → response, → INVITE, 200 → RTP).

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;

use harness::{
    backend_name, env_or, fmt3, mib, ms, p50_p99_max, sample_rss, serve_on_own_thread,
    server_log_excerpt, sip_listen, thread_delta, udp_socket_drops,
};

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::post;
use common::uac::{cpu_time, machine_load, quantile, status_kib, thread_cpu};
use common::{Api, Backend, Mode, Server, TestDb, dev_key};
use nix::sys::socket::{setsockopt, sockopt};
use sautikit::loadtest::trunk::{
    AUDIBLE, CallRec, Placer, Run, Trunk, get, rtp_sink, stamp_arrivals,
};
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::watch;

// The trunk, the receivers and the HTTP client share the two cores with the server: keep them
// lean.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The number's script: a cached `say`, then the script's end hangs up.
const SCRIPT: &str = r#"{"actions":[{"say":{"text":"Hello from Sautikit."}}]}"#;
// ---------------------------------------------------------------------------------------------
// The customer's side: a voice callback answering the script, an events receiver counting by
// kind. Each on its own single-threaded runtime and thread.

#[derive(Default)]
struct Hooks {
    voice: AtomicU64,
    outbound: AtomicU64,
    started: AtomicU64,
    answered: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    other: AtomicU64,
}

impl Hooks {
    fn events(&self) -> u64 {
        get(&self.started)
            + get(&self.answered)
            + get(&self.completed)
            + get(&self.failed)
            + get(&self.other)
    }

    fn line(&self) -> String {
        format!(
            "voice callbacks {} ({} Direction=outbound), events: started {} answered {} completed {} \
             failed {} other {}",
            get(&self.voice),
            get(&self.outbound),
            get(&self.started),
            get(&self.answered),
            get(&self.completed),
            get(&self.failed),
            get(&self.other),
        )
    }
}

/// (voice callback URL, events URL, counters).
fn start_hooks() -> (String, String, Arc<Hooks>) {
    let hooks = Arc::new(Hooks::default());
    let voice = {
        let hooks = hooks.clone();
        Router::new().route(
            "/voice",
            post(move |form: String| {
                hooks.voice.fetch_add(1, Ordering::Relaxed);
                if form.contains("Direction=outbound") {
                    hooks.outbound.fetch_add(1, Ordering::Relaxed);
                }
                async move { ([("content-type", "application/json")], SCRIPT) }
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
// A server with one number claimed and routed to this process, its trunk this process.

/// Fields drop in order: the server stops before its database goes.
struct Ctx {
    server: Server,
    api: Api,
    from: String,
    hooks: Arc<Hooks>,
    _db: TestDb,
}

async fn setup(backend: Backend, trunk: SocketAddr, calls: usize) -> Ctx {
    let db = TestDb::new(backend).await;
    let rtp_ports = std::env::var("BENCH_RTP_PORTS").unwrap_or_else(|_| "20000-29999".into());
    let log = std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into());
    let trunk_uri = format!("sip:{trunk}");
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            ("SAUTIKIT_LOG", &log),
            ("SAUTIKIT_SIP_LISTEN", &sip_listen()),
            ("SAUTIKIT_RTP_PORTS", &rtp_ports),
            ("SAUTIKIT_OUTBOUND_TRUNK", &trunk_uri),
            // The limits stay well above the load: this measures the call path, not them.
            ("SAUTIKIT_CALLS_PER_SECOND", "100000"),
            ("SAUTIKIT_MAX_LIVE_API_CALLS", "100000"),
        ],
    );
    let api = server.api(&dev_key(&db.data_dir));
    // Each live call holds a minute at KES 3.00 (300 minor) and pays a few seconds at its end;
    // the dev wallet's KES 1,000 holds a few hundred. Top up for the whole run, with room.
    let topup = (calls as i64 * 100 + 1_000_000).min(1_000_000_000);
    let r = api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": topup, "currency": "KES"})),
        )
        .await;
    assert!(r.status.is_success(), "top-up: {} {}", r.status, r.text);
    let (voice_url, events_url, hooks) = start_hooks();
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000001/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201, "claim: {}", r.text);
    let v = r.json();
    let id = v["id"].as_str().expect("id").to_owned();
    let from = v["number"].as_str().expect("number").to_owned();
    let r = api
        .patch(
            &format!("/v1/numbers/{id}/routing"),
            json!({"voice_callback_url": voice_url, "events_url": events_url}),
        )
        .await;
    assert_eq!(r.status, 200, "routing: {}", r.text);
    Ctx {
        server,
        api,
        from,
        hooks,
        _db: db,
    }
}

/// Placed calls by status, from the API.
async fn records_by_status(api: &Api) -> BTreeMap<String, usize> {
    let mut by_status = BTreeMap::new();
    for status in [
        "completed",
        "failed",
        "busy",
        "no_answer",
        "canceled",
        "answered",
        "ringing",
    ] {
        let n = api
            .get_all(&format!(
                "/v1/calls?direction=outbound&status={status}&limit=100"
            ))
            .await
            .len();
        if n > 0 {
            by_status.insert(status.to_owned(), n);
        }
    }
    by_status
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

// ---------------------------------------------------------------------------------------------
// A run

struct Settings {
    rate: f64,
    seconds: f64,
    ring: Duration,
    rtp_sockets: usize,
    warmup: usize,
    timeout: Duration,
    invite_line: Duration,
    rtp_line: Duration,
    max_cores: f64,
}

/// One run's figures, for the closing table.
struct Outcome {
    backend: Backend,
    rate: f64,
    placed: usize,
    created: usize,
    failed: usize,
    invite: [Duration; 3],
    rtp: [Duration; 3],
    prompt: [Duration; 3],
    cores: f64,
    rss_mib: f64,
    harness_cores: f64,
    completed_records: usize,
    pass: bool,
}

/// p50, p99 and max of sorted samples.
/// The calls over `line`, by second of their POST, and the p99 without the run's first second.
fn over_line(samples: &[(Duration, u64)], line: Duration, what: &str) -> String {
    let mut by_second: BTreeMap<u64, usize> = BTreeMap::new();
    let mut warm: Vec<Duration> = Vec::new();
    for (d, second) in samples {
        if *d > line {
            *by_second.entry(*second).or_default() += 1;
        }
        if *second >= 1 {
            warm.push(*d);
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
        "  {what} over {:.0} ms: {} calls in {} seconds of the run (most: {}); p99 without the first second {:.2} ms",
        ms(line),
        by_second.values().sum::<usize>(),
        by_second.len(),
        if seconds.is_empty() {
            "none".into()
        } else {
            seconds.join(", ")
        },
        ms(quantile(&warm, 0.99)),
    )
}

async fn placed_run(backend: Backend, s: &Settings) -> Outcome {
    let total = (s.rate * s.seconds).round() as usize;
    println!(
        "\n== placed, {}: {:.0} calls/s for {:.0} s ({total} calls), the trunk answering {} ==",
        backend_name(backend),
        s.rate,
        s.seconds,
        if s.ring.is_zero() {
            "at once".to_owned()
        } else {
            format!("after {} ms", s.ring.as_millis())
        }
    );
    println!("  load before: {}", machine_load());
    let run = Arc::new(Run::new(s.warmup + total));
    let trunk_sock = UdpSocket::bind("127.0.0.1:0").await.expect("trunk socket");
    let trunk_addr = trunk_sock.local_addr().expect("addr");
    assert!(
        stamp_arrivals(&trunk_sock).is_ok(),
        "SO_TIMESTAMPNS is needed for arrival times"
    );
    let ctx = setup(backend, trunk_addr, s.warmup + total).await;
    let pid = ctx.server.pid();
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut media = Vec::new();
    let mut media_ports = Vec::new();
    let mut sinks = Vec::new();
    for _ in 0..s.rtp_sockets {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("RTP socket");
        assert!(
            stamp_arrivals(&sock).is_ok(),
            "SO_TIMESTAMPNS is needed for arrival times"
        );
        // As deep as the kernel allows (net.core.rmem_max): drops are counted below.
        let _ = setsockopt(&sock, sockopt::RcvBuf, &(4 << 20));
        let addr = sock.local_addr().expect("addr");
        media.push(addr);
        media_ports.push(addr.port());
        sinks.push(tokio::spawn(rtp_sink(sock, run.clone(), stop_rx.clone())));
    }
    let trunk = Trunk::new(
        trunk_sock,
        ctx.server.sip_addr(),
        media,
        s.ring,
        run.clone(),
    )
    .expect("trunk");
    let trunk_task = tokio::spawn(trunk.run(stop_rx.clone()));

    let key = ctx.api.key().expect("key").to_owned();
    let placer = Placer {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        url: format!("{}/v1/calls", ctx.api.base),
        auth: format!("Bearer {key}"),
        from: ctx.from.clone(),
        run: run.clone(),
    };

    // Warm-up, one call at a time: the first `say` synthesizes the prompt, the rest play it from
    // the cache; the HTTP connections and prepared statements warm up too.
    for idx in 0..s.warmup {
        let _ = placer.place(idx).await;
        let until = Instant::now() + Duration::from_secs(15);
        while get(&run.calls[idx].bye) == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rec = &run.calls[idx];
        let after_ok = |at: u64| ms(Duration::from_nanos(at.saturating_sub(get(&rec.ok_sent))));
        println!(
            "  warm-up call {idx}: status {}, INVITE {}, {} RTP packets (first {:.1} ms after our 200, \
             the prompt's {:.1} ms, the first audible {:.1} ms), BYE {}",
            get(&rec.status),
            get(&rec.invite) != 0,
            get(&rec.packets),
            after_ok(get(&rec.rtp)),
            after_ok(rec.prompt_times().map_or(0, |(at, _)| at)),
            after_ok(get(&rec.audible)),
            get(&rec.bye) != 0
        );
    }
    let first = s.warmup;
    let measured = &run.calls[first..first + total];
    let udp_drops0 = udp_socket_drops(&media_ports) + udp_socket_drops(&[trunk_addr.port()]);

    let (rss_stop, rss_task) = sample_rss(pid, Duration::from_millis(250));
    let threads0 = thread_cpu(pid);
    let cpu0 = cpu_time(pid);
    let me0 = cpu_time(std::process::id());
    let started = Instant::now();
    let started_ns = run.now();
    println!(
        "  measured run starts at {} UTC (t=0s below)",
        chrono::Utc::now().format("%H:%M:%S%.3f")
    );
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0usize;
    let mut last_line = Instant::now();
    let mut last_cpu = cpu0;
    let count = |f: fn(&CallRec) -> bool| measured.iter().filter(|r| f(r)).count();
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * s.rate) as usize).min(total);
        while sent < due {
            drop(placer.place(first + sent));
            sent += 1;
        }
        if last_line.elapsed() >= Duration::from_secs(5) {
            let cpu = cpu_time(pid);
            println!(
                "  t={:>5.1}s posted {sent} created {} INVITEs {} RTP {} BYEs {}; engine {:.2} cores; events {}",
                started.elapsed().as_secs_f64(),
                count(|r| get(&r.status) == 201),
                count(|r| get(&r.invite) != 0),
                count(|r| get(&r.rtp) != 0),
                count(|r| get(&r.bye) != 0),
                (cpu - last_cpu).as_secs_f64() / last_line.elapsed().as_secs_f64(),
                ctx.hooks.events()
            );
            last_cpu = cpu;
            last_line = Instant::now();
        }
    }
    let sending = started.elapsed();
    // Until every call has ended (or its POST failed), or the time runs out.
    let until = Instant::now() + s.timeout + s.ring;
    let settled = loop {
        let open = measured
            .iter()
            .filter(|r| {
                let status = get(&r.status);
                status == 0 || (status == 201 && get(&r.bye) == 0)
            })
            .count();
        if open == 0 {
            break true;
        }
        if Instant::now() > until {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let calls_done = started.elapsed();
    let cpu1 = cpu_time(pid);
    let threads1 = thread_cpu(pid);
    let me1 = cpu_time(std::process::id());
    let _ = rss_stop.send(true);
    let rss = rss_task.await.unwrap_or_default();
    let hwm = status_kib(pid, "VmHWM");
    let udp_drops = udp_socket_drops(&media_ports) + udp_socket_drops(&[trunk_addr.port()]);

    let want_events = 3 * (s.warmup + total) as u64;
    let drained = wait_events(&ctx.hooks, want_events, Duration::from_secs(60)).await;
    let by_status = records_by_status(&ctx.api).await;
    let _ = stop_tx.send(true);
    let _ = trunk_task.await;
    for sink in sinks {
        let _ = sink.await;
    }

    // Per call.
    let mut http: BTreeMap<u64, usize> = BTreeMap::new();
    let (mut no_invite, mut no_ack, mut no_rtp, mut no_bye, mut failed) = (0, 0, 0, 0, 0);
    let mut unheard = 0;
    let mut created = 0usize;
    let mut invite_k = Vec::new();
    let mut invite_r = Vec::new();
    let mut rtp_k = Vec::new();
    let mut rtp_r = Vec::new();
    let mut prompt_k = Vec::new();
    let mut prompt_r = Vec::new();
    let mut audible_k = Vec::new();
    let mut response = Vec::new();
    let mut talk = Vec::new();
    let mut packets = Vec::new();
    let ns = |a: u64, b: u64| Duration::from_nanos(b.saturating_sub(a));
    for r in measured {
        let status = get(&r.status);
        *http.entry(status).or_default() += 1;
        let second = run
            .instant(get(&r.posted))
            .saturating_duration_since(run.instant(started_ns))
            .as_secs();
        if get(&r.responded) != 0 {
            response.push(ns(get(&r.posted), get(&r.responded)));
        }
        if get(&r.invite) != 0 {
            invite_k.push((ns(get(&r.posted_wall), get(&r.invite_kernel)), second));
            invite_r.push(ns(get(&r.posted), get(&r.invite)));
        }
        if get(&r.rtp) != 0 {
            rtp_k.push((ns(get(&r.ok_sent_wall), get(&r.rtp_kernel)), second));
            rtp_r.push(ns(get(&r.ok_sent), get(&r.rtp)));
        }
        if let Some((at, kernel)) = r.prompt_times() {
            prompt_k.push((ns(get(&r.ok_sent_wall), kernel), second));
            prompt_r.push(ns(get(&r.ok_sent), at));
        }
        if get(&r.audible) != 0 {
            audible_k.push(ns(get(&r.ok_sent_wall), get(&r.audible_kernel)));
        }
        if get(&r.bye) != 0 && get(&r.ok_sent) != 0 {
            talk.push(ns(get(&r.ok_sent), get(&r.bye)));
        }
        if status == 201 {
            created += 1;
        }
        let ended_well = if status != 201 {
            false
        } else if get(&r.invite) == 0 {
            no_invite += 1;
            false
        } else if get(&r.acked) == 0 {
            no_ack += 1;
            false
        } else if get(&r.rtp) == 0 {
            no_rtp += 1;
            false
        } else if get(&r.audible) == 0 {
            unheard += 1;
            false
        } else if get(&r.bye) == 0 {
            no_bye += 1;
            false
        } else {
            packets.push(get(&r.packets));
            true
        };
        if !ended_well {
            failed += 1;
        }
    }
    if let Ok(path) = std::env::var("BENCH_CALLS_CSV") {
        let mut csv = String::from(
            "call,posted_wall_ns,status,response_ns,invite_kernel_ns,ok_to_rtp_kernel_ns,\
             ok_to_prompt_kernel_ns,ok_to_audible_kernel_ns,packets\n",
        );
        for (i, r) in measured.iter().enumerate() {
            let since = |a: u64, b: u64| if b == 0 { 0 } else { b.saturating_sub(a) };
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{},{}\n",
                first + i,
                get(&r.posted_wall),
                get(&r.status),
                since(get(&r.posted), get(&r.responded)),
                since(get(&r.posted_wall), get(&r.invite_kernel)),
                since(get(&r.ok_sent_wall), get(&r.rtp_kernel)),
                since(
                    get(&r.ok_sent_wall),
                    r.prompt_times().map_or(0, |(_, kernel)| kernel)
                ),
                since(get(&r.ok_sent_wall), get(&r.audible_kernel)),
                get(&r.packets),
            ));
        }
        match std::fs::write(&path, csv) {
            Ok(()) => println!("  per-call times written to {path}"),
            Err(e) => println!("  per-call times NOT written to {path}: {e}"),
        }
    }
    let over_invite = over_line(&invite_k, s.invite_line, "API→INVITE");
    let over_rtp = over_line(&rtp_k, s.rtp_line, "200→RTP");
    let over_prompt = over_line(&prompt_k, s.rtp_line, "200→prompt");
    let mut invite_k: Vec<Duration> = invite_k.into_iter().map(|(d, _)| d).collect();
    let mut rtp_k: Vec<Duration> = rtp_k.into_iter().map(|(d, _)| d).collect();
    let mut prompt_k: Vec<Duration> = prompt_k.into_iter().map(|(d, _)| d).collect();
    for v in [
        &mut invite_k,
        &mut invite_r,
        &mut rtp_k,
        &mut rtp_r,
        &mut prompt_k,
        &mut prompt_r,
        &mut audible_k,
        &mut response,
        &mut talk,
    ] {
        v.sort();
    }
    packets.sort();
    let invite = p50_p99_max(&invite_k);
    let rtp = p50_p99_max(&rtp_k);
    let prompt = p50_p99_max(&prompt_k);
    let cores = (cpu1 - cpu0).as_secs_f64() / calls_done.as_secs_f64();
    let harness_cores = (me1 - me0).as_secs_f64() / calls_done.as_secs_f64();
    let peak = rss.iter().copied().max().unwrap_or(0);
    let rss_mib = mib(hwm.max(peak));
    let completed_records = by_status.get("completed").copied().unwrap_or(0);
    let created_all = created
        + run.calls[..first]
            .iter()
            .filter(|r| get(&r.status) == 201)
            .count();
    let records_ok = completed_records == created_all && by_status.len() == 1;
    let events_ok = ctx.hooks.events() >= want_events;
    let pass = failed == 0
        && settled
        && records_ok
        && invite[1] <= s.invite_line
        && rtp[1] <= s.rtp_line
        && cores <= s.max_cores;
    let c = &run.counters;

    println!(
        "  offered {total} calls in {:.2} s = {:.0}/s; all ended {}after {:.2} s",
        sending.as_secs_f64(),
        total as f64 / sending.as_secs_f64(),
        if settled { "" } else { "NOT " },
        calls_done.as_secs_f64()
    );
    println!(
        "  POST /v1/calls: status {http:?}; API→response {}",
        fmt3(p50_p99_max(&response))
    );
    for e in run.errors.lock().expect("errors").iter() {
        println!("    e.g. {e}");
    }
    println!(
        "  calls: created {created}, failed {failed} (not 201: {}, no INVITE {no_invite}, 200 never ACKed {no_ack}, \
         no RTP {no_rtp}, no prompt heard {unheard}, no BYE {no_bye})",
        total - created
    );
    println!(
        "  trunk: INVITEs {} (+{} retransmitted, {} unknown), 200 retransmissions {}, ACKs {}, ACK timeouts {}, \
         BYEs {} (+{} stray), other requests {}, responses {}",
        get(&c.invites),
        get(&c.invite_retransmissions),
        get(&c.unknown_invites),
        get(&c.ok_retransmissions),
        get(&c.acks),
        get(&c.ack_timeouts),
        get(&c.byes),
        get(&c.stray_byes),
        get(&c.other_requests),
        get(&c.responses),
    );
    println!(
        "  API→INVITE at the trunk (kernel arrival): {}; as read here: {}",
        fmt3(invite),
        fmt3(p50_p99_max(&invite_r))
    );
    println!("{over_invite}");
    println!(
        "  our 200→first RTP (kernel arrival): {}; as read here: {}",
        fmt3(rtp),
        fmt3(p50_p99_max(&rtp_r))
    );
    println!("{over_rtp}");
    println!(
        "  our 200→the prompt's first packet (kernel arrival): {}; as read here: {}; \
         200→first packet at or above {AUDIBLE}: {}",
        fmt3(prompt),
        fmt3(p50_p99_max(&prompt_r)),
        fmt3(p50_p99_max(&audible_k))
    );
    println!("{over_prompt}");
    println!(
        "  RTP: {} packets ({} from no live call's port), per completed call min {} / p50 {} / max {}; \
         our 200→engine's BYE {}; UDP drops at the trunk and media sockets {}",
        get(&c.rtp_packets),
        get(&c.rtp_unmatched),
        quantile(&packets, 0.0),
        quantile(&packets, 0.5),
        quantile(&packets, 1.0),
        fmt3(p50_p99_max(&talk)),
        udp_drops.saturating_sub(udp_drops0)
    );
    println!(
        "  engine CPU: {cores:.3} cores while calls ran ({:.1} s); RSS peak sampled {:.0} MiB, VmHWM {:.0} MiB; \
         harness {harness_cores:.2} cores",
        calls_done.as_secs_f64(),
        mib(peak),
        mib(hwm),
    );
    println!(
        "  engine threads while calls ran: {}",
        thread_delta(&threads0, &threads1, calls_done)
    );
    println!(
        "  records (placed calls incl. {} warm-up): {by_status:?}, completed {completed_records} of {created_all} created",
        s.warmup
    );
    println!(
        "  events: {} of {want_events} expected (3 × placed) {}; {}",
        ctx.hooks.events(),
        match drained {
            Some(d) => format!(
                "all delivered {:.1} s after the calls ended",
                d.as_secs_f64()
            ),
            None => "NOT all delivered within 60 s".to_owned(),
        },
        ctx.hooks.line()
    );
    println!("  server log: {}", server_log_excerpt(&ctx.server));
    if let Ok(to) = std::env::var("BENCH_SERVER_LOG_COPY") {
        match std::fs::copy(&ctx.server.log, &to) {
            Ok(_) => println!("  server log copied to {to}"),
            Err(e) => println!("  server log NOT copied to {to}: {e}"),
        }
    }
    println!("  load after: {}", machine_load());
    println!(
        "  RESULT placed {}: {:.0}/s, failed {failed}, API→INVITE {}, 200→RTP {}, engine {cores:.3} cores, \
         RSS {rss_mib:.0} MiB, records completed {completed_records}/{created_all}, events {}/{want_events} → {}",
        backend_name(backend),
        s.rate,
        fmt3(invite),
        fmt3(rtp),
        ctx.hooks.events(),
        if pass && events_ok { "PASS" } else { "FAIL" }
    );
    drop(ctx);
    Outcome {
        backend,
        rate: s.rate,
        placed: total,
        created,
        failed,
        invite,
        rtp,
        prompt,
        cores,
        rss_mib,
        harness_cores,
        completed_records,
        pass,
    }
}

fn print_table(outcomes: &[Outcome], s: &Settings) {
    if outcomes.is_empty() {
        return;
    }
    let head: Vec<String> = outcomes
        .iter()
        .map(|o| format!("{} {:.0}/s", backend_name(o.backend), o.rate))
        .collect();
    println!("\n| | {} |", head.join(" | "));
    println!("|---|{}", "---|".repeat(outcomes.len()));
    let row = |name: String, f: &dyn Fn(&Outcome) -> String| {
        let cells: Vec<String> = outcomes.iter().map(f).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    row("calls placed / created / failed".into(), &|o| {
        format!("{} / {} / **{}**", o.placed, o.created, o.failed)
    });
    row("records `completed`".into(), &|o| {
        format!("{}", o.completed_records)
    });
    let lat =
        |v: [Duration; 3]| format!("{:.2} / **{:.2}** / {:.2} ms", ms(v[0]), ms(v[1]), ms(v[2]));
    row(
        format!(
            "API→INVITE p50 / p99 / max (target p99 ≤ {:.0} ms)",
            ms(s.invite_line)
        ),
        &|o| lat(o.invite),
    );
    row(
        format!(
            "200→first RTP p50 / p99 / max (target p99 ≤ {:.0} ms)",
            ms(s.rtp_line)
        ),
        &|o| lat(o.rtp),
    );
    row(
        "200→the prompt's first packet p50 / p99 / max".into(),
        &|o| lat(o.prompt),
    );
    row(
        format!("engine CPU (target ≤ {} cores)", s.max_cores),
        &|o| format!("**{:.3} cores**", o.cores),
    );
    row("engine RSS".into(), &|o| format!("{:.0} MiB", o.rss_mib));
    row("harness CPU".into(), &|o| {
        format!("{:.2} cores", o.harness_cores)
    });
    row("all targets".into(), &|o| {
        if o.pass { "met" } else { "NOT met" }.to_owned()
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. `cargo test --benches`) is a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
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
    let rates = std::env::var("BENCH_CALL_RATE")
        .unwrap_or_else(|_| if full { "200" } else { "20" }.to_owned());
    let mut outcomes = Vec::new();
    let mut settings = None;
    for &backend in &backends {
        for rate in rates
            .split(',')
            .filter_map(|r| r.trim().parse::<f64>().ok())
        {
            let s = Settings {
                rate,
                seconds: env_or("BENCH_SECONDS", if full { 60.0 } else { 2.0 }),
                ring: Duration::from_millis(env_or("BENCH_RING_MS", 0)),
                rtp_sockets: env_or("BENCH_RTP_SOCKETS", 8usize).max(1),
                warmup: env_or("BENCH_WARMUP_CALLS", 3usize),
                timeout: Duration::from_millis(env_or("BENCH_CALL_TIMEOUT_MS", 15_000)),
                invite_line: Duration::from_millis(env_or("BENCH_INVITE_P99_MS", 20)),
                rtp_line: Duration::from_millis(env_or("BENCH_RTP_P99_MS", 50)),
                max_cores: env_or("BENCH_MAX_CORES", 1.5),
            };
            outcomes.push(placed_run(backend, &s).await);
            settings = Some(s);
        }
    }
    if let Some(s) = settings {
        print_table(&outcomes, &s);
    }
}
