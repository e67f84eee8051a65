//! The `webhooks` scenario: a backlog of call events built while the load test's events
//! receiver is down (it answers `503`), then drained to it once it is up. Inbound calls at a
//! rate (each answered, then hung up by the caller) give three events each — `call.started`,
//! `call.answered`, `call.completed` — to the numbers' `events_url`. Measured: how long after
//! the receiver's return the first delivery came (the engine retries on its schedule; the
//! first success makes the rest due at once), the drain rate, every event delivered, none twice,
//! and each call's events in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use clap::Args;
use serde_json::{Value, json};

use super::sip_text::quantile;
use super::uac::{self, Uac};
use super::{
    ApiClient, Live, LiveCounts, LoadError, Output, Sampler, Target, Verdict, claim_numbers, ms,
    procfs, release, seconds,
};
use super::{num, per_second, print_table, within};

#[derive(Debug, Clone, Args)]
pub struct WebhooksArgs {
    #[command(flatten)]
    pub target: Target,
    /// Calls placed while the receiver is down; three events each make the backlog.
    #[arg(long, default_value_t = 300)]
    pub calls: usize,
    /// Calls a second.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Numbers claimed and called in turn.
    #[arg(long, default_value_t = 10)]
    pub numbers: usize,
    /// Seconds the backlog may take to drain once the receiver is up (the engine's first retry
    /// comes up to 30 s after a failed attempt).
    #[arg(long, default_value_t = 300.0)]
    pub drain_timeout: f64,
    /// The pass line `--p99-ms` applies to how long after the receiver's return each event was
    /// delivered.
    #[command(flatten)]
    pub output: Output,
}

/// What the receiver saw.
#[derive(Default)]
struct Receiver {
    up: AtomicBool,
    /// Attempts answered `503` while down.
    refused: AtomicU64,
    voice: AtomicU64,
    state: Mutex<Delivered>,
}

#[derive(Default)]
struct Delivered {
    /// Event ids delivered (answered `200`).
    ids: HashSet<String>,
    duplicates: u64,
    by_kind: BTreeMap<String, u64>,
    /// Each call's event kinds in the order they were delivered (first deliveries only).
    per_call: HashMap<String, Vec<String>>,
    /// When each delivery came, and when it was (for the progress line) since the last sample.
    at: Vec<Instant>,
    recent: Vec<Duration>,
}

impl Receiver {
    fn event(&self, headers: &HeaderMap, body: &[u8]) -> StatusCode {
        if !self.up.load(Ordering::Relaxed) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (id, kind) = (
            header("x-sautikit-event-id"),
            header("x-sautikit-event-kind"),
        );
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let call_id = body["payload"]["call_id"].as_str().unwrap_or("").to_owned();
        // How old the event is at delivery: from when it happened.
        let age = body["occurred_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .and_then(|t| (chrono::Utc::now() - t.to_utc()).to_std().ok())
            .unwrap_or_default();
        if let Ok(mut d) = self.state.lock() {
            if !d.ids.insert(id) {
                d.duplicates += 1;
            } else {
                *d.by_kind.entry(kind.clone()).or_default() += 1;
                d.per_call.entry(call_id).or_default().push(kind);
                d.at.push(Instant::now());
                d.recent.push(age);
            }
        }
        StatusCode::OK
    }

    fn delivered(&self) -> u64 {
        self.state.lock().map_or(0, |d| d.ids.len() as u64)
    }
}

impl Live for Receiver {
    fn counts(&self) -> LiveCounts {
        let delivered = self.delivered();
        LiveCounts {
            attempted: delivered,
            answered: None,
            completed: delivered,
            failed: self.refused.load(Ordering::Relaxed),
        }
    }

    fn recent_latency(&self) -> (Duration, Duration, Duration) {
        let mut recent = self
            .state
            .lock()
            .map(|mut d| std::mem::take(&mut d.recent))
            .unwrap_or_default();
        recent.sort();
        (
            quantile(&recent, 0.5),
            quantile(&recent, 0.99),
            quantile(&recent, 1.0),
        )
    }
}

/// The voice callback (a pause: the caller hangs up) and the events receiver, on their own
/// thread.
fn start_receiver(listen: SocketAddr) -> Result<(String, String, Arc<Receiver>), LoadError> {
    let receiver = Arc::new(Receiver::default());
    let app = {
        let voice = receiver.clone();
        let events = receiver.clone();
        Router::new()
            .route(
                "/voice",
                post(move || {
                    voice.voice.fetch_add(1, Ordering::Relaxed);
                    async {
                        (
                            [("content-type", "application/json")],
                            r#"{"actions":[{"pause":{"length":30}}]}"#,
                        )
                    }
                }),
            )
            .route(
                "/events",
                post(move |headers: HeaderMap, body: axum::body::Bytes| {
                    let status = events.event(&headers, &body);
                    async move { status }
                }),
            )
    };
    let (voice, events) = super::serve_hooks(listen, app)?;
    Ok((voice, events, receiver))
}

pub async fn run(args: WebhooksArgs) -> Result<Verdict, LoadError> {
    within(args.calls, "--calls", 1..=100_000)?;
    per_second(args.rate, "--rate", "calls", 5_000.0)?;
    within(args.numbers, "--numbers", 1..=100)?;
    let drain_timeout = seconds(args.drain_timeout, "--drain-timeout")?;
    let server = super::resolve_server(&args.target.server).await?;
    let api = ApiClient::new(&args.target)?;
    let (voice_url, events_url, receiver) = start_receiver(args.target.hooks_listen)?;
    eprintln!(
        "claiming {} numbers; their events go to {events_url}, which answers 503 until the \
         backlog is built",
        args.numbers
    );
    let claimed = claim_numbers(&api, args.numbers, Some((&voice_url, &events_url))).await?;
    let result = drive(&args, server, drain_timeout, &claimed.numbers, &receiver).await;
    eprintln!("releasing the {} numbers", claimed.ids.len());
    release(&api, &claimed).await;
    result
}

async fn drive(
    args: &WebhooksArgs,
    server: SocketAddr,
    drain_timeout: Duration,
    numbers: &[Arc<str>],
    receiver: &Arc<Receiver>,
) -> Result<Verdict, LoadError> {
    let setup = |what: &str, e: std::io::Error| LoadError::Setup(format!("{what}: {e}"));
    let sink = tokio::net::UdpSocket::bind(SocketAddr::new(
        uac::route_to(server).map_err(|e| setup("route to the server", e))?,
        0,
    ))
    .await
    .map_err(|e| setup("RTP sink", e))?;
    let rtp = sink.local_addr().map_err(|e| setup("RTP sink", e))?;
    let drain = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while sink.recv(&mut buf).await.is_ok() {}
    });
    let timeout = Duration::from_secs(32);
    let mut uac = Uac::start(server, 4, timeout)
        .await
        .map_err(|e| setup("SIP sockets", e))?;
    let placing = Duration::from_secs_f64(args.calls as f64 / args.rate);
    let mut sampler = Sampler::new(server, placing + drain_timeout, args.rate, "event age");
    let started = sampler.started;
    let cpu_before = procfs::cpu_time_self();
    let mut next_sample = started + Duration::from_secs(1);
    let mut tick = |sampler: &mut Sampler| {
        if Instant::now() >= next_sample {
            sampler.sample(&**receiver);
            next_sample += Duration::from_secs(1);
        }
    };

    // The backlog: calls while the receiver is down; each call's first attempts are refused.
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut placed = 0usize;
    while placed < args.calls {
        let due = started + interval.mul_f64(placed as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        while placed < args.calls && started + interval.mul_f64(placed as f64) <= Instant::now() {
            uac.call(
                numbers[placed % numbers.len()].clone(),
                rtp,
                Some(Duration::ZERO),
            );
            placed += 1;
        }
        tick(&mut sampler);
    }
    let settled = uac
        .settle(args.calls as u64, timeout + Duration::from_secs(5))
        .await;
    let stats = uac.finish().await;
    drain.abort();
    let want = 3 * stats.completed;
    // Every event tried once (and refused) before the receiver comes back.
    let until = Instant::now() + Duration::from_secs(30);
    while receiver.refused.load(Ordering::Relaxed) < want && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tick(&mut sampler);
    }
    let backlog = receiver.refused.load(Ordering::Relaxed);

    // The receiver is back: the backlog drains.
    receiver.up.store(true, Ordering::Relaxed);
    let up = Instant::now();
    let give_up = up + drain_timeout;
    while receiver.delivered() < want && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tick(&mut sampler);
    }
    // A moment more for duplicates to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sampler.sample(&**receiver);
    if sampler.terminal {
        eprintln!();
    }
    let harness_cores = procfs::cpu_time_self()
        .saturating_sub(cpu_before)
        .as_secs_f64()
        / started.elapsed().as_secs_f64();
    let report = report(
        args,
        receiver,
        &Phases {
            up,
            want,
            backlog,
            calls_completed: stats.completed,
            calls_failed: stats.failed(),
            settled,
            harness_cores,
        },
    );
    args.output.finish(&report, &sampler.samples, print)
}

struct Phases {
    up: Instant,
    want: u64,
    backlog: u64,
    calls_completed: u64,
    calls_failed: u64,
    settled: bool,
    harness_cores: f64,
}

fn report(args: &WebhooksArgs, receiver: &Receiver, p: &Phases) -> Value {
    let empty = Delivered::default();
    let guard = receiver.state.lock();
    let d = guard.as_deref().unwrap_or(&empty);
    let mut after_up: Vec<Duration> =
        d.at.iter()
            .map(|t| t.saturating_duration_since(p.up))
            .collect();
    after_up.sort();
    let first = after_up.first().copied().unwrap_or_default();
    let last = after_up.last().copied().unwrap_or_default();
    let delivered = d.ids.len() as u64;
    let drain_rate = if last > first {
        delivered.saturating_sub(1) as f64 / (last - first).as_secs_f64()
    } else {
        0.0
    };
    let in_order = ["call.started", "call.answered", "call.completed"];
    let out_of_order = d
        .per_call
        .values()
        .filter(|kinds| {
            let ranks: Vec<usize> = kinds
                .iter()
                .filter_map(|k| in_order.iter().position(|o| o == k))
                .collect();
            ranks.windows(2).any(|w| w[0] > w[1])
        })
        .count();
    let missing = p.want.saturating_sub(delivered);
    let p99 = quantile(&after_up, 0.99);
    let failed = missing + p.calls_failed;
    let pass = p.settled
        && d.duplicates == 0
        && out_of_order == 0
        && delivered >= p.want
        && args.output.passes(failed, p99);
    json!({
        "scenario": "webhooks",
        "settings": {
            "calls": args.calls,
            "rate": args.rate,
            "numbers": args.numbers,
            "drain_timeout_seconds": args.drain_timeout,
        },
        "calls": {
            "completed": p.calls_completed,
            "failed": p.calls_failed,
        },
        "events": {
            "expected": p.want,
            "refused_while_down": p.backlog,
            "delivered": delivered,
            "missing": missing,
            "duplicates": d.duplicates,
            "calls_out_of_order": out_of_order,
            "by_kind": d.by_kind,
        },
        "drain": {
            "first_delivery_after_up_s": first.as_secs_f64(),
            "last_delivery_after_up_s": last.as_secs_f64(),
            "deliveries_per_second": drain_rate,
            "after_up_ms": {
                "p50": ms(quantile(&after_up, 0.5)),
                "p99": ms(p99),
                "max": ms(last),
            },
        },
        "voice_callbacks": receiver.voice.load(Ordering::Relaxed),
        "harness_cores": p.harness_cores,
        "units": {"rate": "deliveries/s", "latency": "event age at delivery", "items": "events"},
        "pass_lines": args.output.lines(),
        "pass": pass,
    })
}

fn print(j: &Value) {
    let f = num;
    let e = &j["events"];
    let rows: Vec<(&str, String)> = vec![
        (
            "calls",
            format!(
                "{} completed, {} failed",
                j["calls"]["completed"], j["calls"]["failed"]
            ),
        ),
        (
            "backlog",
            format!(
                "{} events, {} attempts refused while down",
                e["expected"], e["refused_while_down"]
            ),
        ),
        (
            "delivered",
            format!(
                "{} (missing {}, duplicates {}, calls out of order {})",
                e["delivered"], e["missing"], e["duplicates"], e["calls_out_of_order"]
            ),
        ),
        (
            "drain",
            format!(
                "first delivery {:.2} s after the receiver came back, last {:.2} s; {:.0} deliveries/s",
                f(&j["drain"]["first_delivery_after_up_s"]),
                f(&j["drain"]["last_delivery_after_up_s"]),
                f(&j["drain"]["deliveries_per_second"])
            ),
        ),
        (
            "load test CPU",
            format!("{:.3} cores", f(&j["harness_cores"])),
        ),
    ];
    print_table(
        "webhook backlog",
        &rows,
        j,
        &Value::Null,
        &[("event", &e["by_kind"])],
    );
}
