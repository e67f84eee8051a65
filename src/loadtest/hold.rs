//! The `hold` scenario: N concurrent inbound calls set up at a ramp and held while the engine
//! sends each its paced media (the numbers answer with a long `pause`: 20 ms PCMU silence), one
//! UDP socket per call here. Measured over the window: packets received against those due,
//! losses, the spacing of the kernel's arrival times against the 20 ms ptime, the RTP headers,
//! and the target's CPU and RSS when it runs on this machine. Then the caller hangs up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::sip_text::quantile;
use super::streams::{StreamStats, rtp_receiver};
use super::uac::{self, Uac, UacStats};
use super::{
    Claimed, Hooks, LoadError, Output, Sampler, Target, Verdict, claim_numbers, ms, procfs,
    release, seconds, start_hooks,
};
use super::{num, per_second, print_table, within};

#[derive(Debug, Clone, Args)]
pub struct HoldArgs {
    #[command(flatten)]
    pub target: Target,
    /// Concurrent calls held.
    #[arg(long, default_value_t = 100)]
    pub calls: usize,
    /// Seconds the calls are held and measured once all are up.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Calls set up (and later hung up) a second.
    #[arg(long, default_value_t = 50.0)]
    pub ramp: f64,
    /// Numbers claimed and called in turn.
    #[arg(long, default_value_t = 10)]
    pub numbers: usize,
    /// UDP sockets the calls' SIP is spread over.
    #[arg(long, default_value_t = 4)]
    pub sockets: usize,
    /// The pass line `--p99-ms` applies to the spacing: |arrival gap − 20 ms| p99.
    #[command(flatten)]
    pub output: Output,
}

pub async fn run(args: HoldArgs) -> Result<Verdict, LoadError> {
    within(args.calls, "--calls", 1..=20_000)?;
    per_second(args.ramp, "--ramp", "calls", 5_000.0)?;
    let window = seconds(args.duration, "--duration")?;
    if window < Duration::from_secs(1) {
        return Err(LoadError::Invalid(format!(
            "--duration {}: at least 1 second",
            args.duration
        )));
    }
    within(args.numbers, "--numbers", 1..=100)?;
    let server = super::resolve_server(&args.target.server).await?;
    let ramp_time = args.calls as f64 / args.ramp;
    // The script's pause outlasts the ramp, the window and the hang-up: the caller ends each call.
    let pause = (args.duration + 2.0 * ramp_time).ceil() as u64 + 60;
    let script = json!({"actions": [{"pause": {"length": pause}}]}).to_string();
    let api = super::ApiClient::new(&args.target)?;
    let (voice_url, events_url, hooks) = start_hooks(args.target.hooks_listen, script)?;
    eprintln!(
        "claiming {} numbers and routing them to {voice_url}",
        args.numbers
    );
    let claimed = claim_numbers(&api, args.numbers, Some((&voice_url, &events_url))).await?;
    let result = drive(&args, server, window, &claimed, &hooks).await;
    eprintln!("releasing the {} numbers", claimed.ids.len());
    release(&api, &claimed).await;
    result
}

async fn drive(
    args: &HoldArgs,
    server: SocketAddr,
    window: Duration,
    claimed: &Claimed,
    hooks: &Hooks,
) -> Result<Verdict, LoadError> {
    let setup = |what: &str, e: std::io::Error| LoadError::Setup(format!("{what}: {e}"));
    let bind = uac::route_to(server).map_err(|e| setup("route to the server", e))?;
    let timeout = Duration::from_secs(32);
    let mut uac = Uac::start(server, args.sockets, timeout)
        .await
        .map_err(|e| setup("SIP sockets", e))?;
    let measuring = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers = Vec::with_capacity(args.calls);
    let mut addrs = Vec::with_capacity(args.calls);
    for _ in 0..args.calls {
        let sock = UdpSocket::bind(SocketAddr::new(bind, 0))
            .await
            .map_err(|e| setup("an RTP socket (raise the open-file limit?)", e))?;
        addrs.push(sock.local_addr().map_err(|e| setup("RTP socket", e))?);
        receivers.push(tokio::spawn(rtp_receiver(
            sock,
            measuring.clone(),
            stop_rx.clone(),
        )));
    }
    let ramp_time = Duration::from_secs_f64(args.calls as f64 / args.ramp);
    let total = ramp_time + window;
    let mut sampler = Sampler::new(server, total, args.ramp, "setup");
    let started = sampler.started;
    let mut next_sample = started + Duration::from_secs(1);
    let interval = Duration::from_secs_f64(1.0 / args.ramp);

    // Ramp: every call set up.
    let mut sent = 0usize;
    while sent < args.calls {
        let due = started + interval.mul_f64(sent as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        while sent < args.calls && started + interval.mul_f64(sent as f64) <= Instant::now() {
            let number = claimed.numbers[sent % claimed.numbers.len()].clone();
            uac.call(number, addrs[sent], None);
            sent += 1;
        }
        if Instant::now() >= next_sample {
            sampler.sample(&*uac.progress);
            next_sample += Duration::from_secs(1);
        }
    }
    let until = Instant::now() + timeout;
    loop {
        let (_, answered, _, failed) = uac.progress.get();
        if answered + failed >= args.calls as u64 || Instant::now() > until {
            break;
        }
        if Instant::now() >= next_sample {
            sampler.sample(&*uac.progress);
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, answered, _, _) = uac.progress.get();

    // The window: every call up, media measured.
    let target = sampler.target.map(|(pid, _)| pid);
    let cpu0 = target.map(procfs::cpu_time);
    let me0 = procfs::cpu_time_self();
    let w0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    while w0.elapsed() < window {
        let next = next_sample.min(w0 + window);
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() >= next_sample {
            sampler.sample(&*uac.progress);
            next_sample += Duration::from_secs(1);
        }
    }
    measuring.store(false, Ordering::Relaxed);
    let wall = w0.elapsed();
    let target_cores = target.zip(cpu0).map(|(pid, c0)| {
        procfs::cpu_time(pid).saturating_sub(c0).as_secs_f64() / wall.as_secs_f64()
    });
    let harness_cores =
        procfs::cpu_time_self().saturating_sub(me0).as_secs_f64() / wall.as_secs_f64();
    let target_rss_mib =
        target.and_then(|pid| procfs::status_kib(pid, "VmRSS").map(|k| k as f64 / 1024.0));

    // Hang up, paced like the ramp.
    uac.bye_all(args.ramp);
    let settled = uac
        .settle(
            args.calls as u64,
            ramp_time + timeout + Duration::from_secs(2),
        )
        .await;
    sampler.sample(&*uac.progress);
    if sampler.terminal {
        eprintln!();
    }
    let stats = uac.finish().await;
    let _ = stop_tx.send(true);
    let mut media = StreamStats::default();
    let mut silent = 0u64;
    for r in receivers {
        let Ok(st) = r.await else { continue };
        if st.packets == 0 {
            silent += 1;
        }
        media.merge(st);
    }
    let until = Instant::now() + Duration::from_secs(10);
    while hooks.events().values().sum::<u64>() < 3 * stats.completed && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let measured = Measured {
        answered,
        wall,
        settled,
        silent,
        target_cores,
        target_rss_mib,
        harness_cores,
    };
    let report = report(args, &stats, &mut media, &measured, hooks);
    args.output.finish(&report, &sampler.samples, print)
}

struct Measured {
    answered: u64,
    wall: Duration,
    settled: bool,
    silent: u64,
    target_cores: Option<f64>,
    target_rss_mib: Option<f64>,
    harness_cores: f64,
}

fn report(
    args: &HoldArgs,
    stats: &UacStats,
    media: &mut StreamStats,
    m: &Measured,
    hooks: &Hooks,
) -> Value {
    media.deviations.sort_unstable();
    let devs = &media.deviations;
    let dev_ms = |p: f64| f64::from(quantile(devs, p)) / 1000.0;
    let within5 = devs.partition_point(|d| *d <= 5_000);
    let expected = m.answered as f64 * m.wall.as_secs_f64() / 0.020;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    for (code, n) in &stats.invite_status {
        failures.insert(
            format!(
                "INVITE {code} {}",
                sautikit_sip::message::reason_phrase(*code)
            ),
            *n,
        );
    }
    for (name, n) in [
        ("INVITE timeout", stats.invite_timeouts),
        ("BYE timeout", stats.bye_timeouts),
        ("hung up by the engine", stats.server_byes),
        ("unfinished", stats.unfinished),
        ("no media at all", m.silent),
    ] {
        if n > 0 {
            failures.insert(name.to_owned(), n);
        }
    }
    let failed: u64 = failures.values().sum();
    let p99 = Duration::from_micros(u64::from(quantile(devs, 0.99)));
    let pass = m.settled
        && media.lost == 0
        && media.header_errors() == 0
        && !devs.is_empty()
        && args.output.passes(failed, p99);
    let mut setup = stats.setup.clone();
    setup.sort();
    json!({
        "scenario": "hold",
        "settings": {
            "calls": args.calls,
            "duration_seconds": args.duration,
            "ramp": args.ramp,
            "numbers": args.numbers,
        },
        "calls": {
            "attempted": stats.attempted,
            "answered": stats.answered,
            "completed": stats.completed,
            "failed": failed,
            "failures": failures,
        },
        "setup_ms": {
            "p50": ms(quantile(&setup, 0.5)),
            "p99": ms(quantile(&setup, 0.99)),
        },
        "rtp": {
            "window_seconds": m.wall.as_secs_f64(),
            "packets_in_window": media.in_window,
            "packets_expected": expected.round(),
            "packets": media.packets,
            "lost": media.lost,
            "sequence_jumps": media.seq_errors,
            "timestamp_errors": media.ts_errors,
            "ssrc_changes": media.ssrc_changes,
            "payload_type_errors": media.pt_errors,
            "payload_size_errors": media.size_errors,
            "malformed": media.bad,
            "silent_streams": m.silent,
        },
        "spacing_ms": {
            "mean": if devs.is_empty() { 0.0 } else {
                media.spacing_sum_us as f64 / devs.len() as f64 / 1000.0
            },
            "deviation_p50": dev_ms(0.5),
            "deviation_p99": dev_ms(0.99),
            "deviation_max": dev_ms(1.0),
            "within_5ms_share": within5 as f64 / devs.len().max(1) as f64,
        },
        "target_cores": m.target_cores,
        "target_rss_mib": m.target_rss_mib,
        "harness_cores": m.harness_cores,
        "events": hooks.events(),
        "units": {"rate": "calls/s", "latency": "INVITE → 200", "items": "calls"},
        "pass_lines": args.output.lines(),
        "pass": pass,
    })
}

fn print(j: &Value) {
    let f = num;
    let r = &j["rtp"];
    let mut rows: Vec<(&str, String)> = vec![
        ("attempted", j["calls"]["attempted"].to_string()),
        ("answered", j["calls"]["answered"].to_string()),
        ("completed", j["calls"]["completed"].to_string()),
        ("failed", j["calls"]["failed"].to_string()),
        (
            "RTP in window",
            format!(
                "{} of {} due over {:.1} s; lost {}",
                r["packets_in_window"],
                r["packets_expected"],
                f(&r["window_seconds"]),
                r["lost"]
            ),
        ),
        (
            "spacing",
            format!(
                "mean {:.3} ms; |Δt − 20 ms| p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms; within 5 ms {:.2} %",
                f(&j["spacing_ms"]["mean"]),
                f(&j["spacing_ms"]["deviation_p50"]),
                f(&j["spacing_ms"]["deviation_p99"]),
                f(&j["spacing_ms"]["deviation_max"]),
                100.0 * f(&j["spacing_ms"]["within_5ms_share"])
            ),
        ),
        (
            "RTP headers",
            format!(
                "sequence jumps {}, timestamp errors {}, SSRC changes {}, payload type {}, size {}, malformed {}",
                r["sequence_jumps"],
                r["timestamp_errors"],
                r["ssrc_changes"],
                r["payload_type_errors"],
                r["payload_size_errors"],
                r["malformed"]
            ),
        ),
    ];
    if let (Some(cores), Some(rss)) = (j["target_cores"].as_f64(), j["target_rss_mib"].as_f64()) {
        rows.push((
            "target",
            format!("{cores:.3} cores over the window, RSS {rss:.0} MiB"),
        ));
    }
    rows.push((
        "load test CPU",
        format!("{:.3} cores", f(&j["harness_cores"])),
    ));
    print_table("held calls", &rows, j, &j["calls"]["failures"], &[]);
}
