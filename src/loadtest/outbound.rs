//! The `outbound` scenario: calls placed through the API (`POST /v1/calls`) at a rate, to an
//! outbound trunk the load test plays itself. The deployment's `SAUTIKIT_OUTBOUND_TRUNK` must
//! point at `--trunk-listen`. Each call: the POST → the engine's INVITE at the trunk (matched by
//! its Request-URI, `+254711` and the call's index) → our `200` with media at one of our RTP
//! sockets → the number's voice callback answers the script (by default a pause as long as the
//! hold, then hangup) → the engine's RTP → its BYE → our `200`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::sip_text::quantile;
use super::trunk::{Placer, Run, Trunk, get, rtp_sink, stamp_arrivals};
use super::{
    ApiClient, Hooks, Live, LiveCounts, LoadError, Output, Sampler, Target, Verdict, claim_numbers,
    ms, procfs, release, seconds, start_hooks,
};
use super::{num, per_second, print_table};

#[derive(Debug, Clone, Args)]
pub struct OutboundArgs {
    #[command(flatten)]
    pub target: Target,
    /// Where the load test's trunk listens (UDP); the deployment's `SAUTIKIT_OUTBOUND_TRUNK`
    /// must be `sip:` this address.
    #[arg(long, default_value = "127.0.0.1:5090")]
    pub trunk_listen: SocketAddr,
    /// New calls a second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Seconds of new calls.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds each answered call is held by the default script before it hangs up.
    #[arg(long, default_value_t = 1.0)]
    pub hold: f64,
    /// Milliseconds the trunk rings (`180`) before it answers; 0 answers at once.
    #[arg(long, default_value_t = 0)]
    pub ring_ms: u64,
    /// The VoiceAction script the callee hears (JSON); by default a pause as long as the hold,
    /// then hangup.
    #[arg(long)]
    pub script: Option<String>,
    /// UDP sockets the trunk's media is spread over.
    #[arg(long, default_value_t = 4)]
    pub rtp_sockets: usize,
    #[command(flatten)]
    pub output: Output,
}

pub async fn run(args: OutboundArgs) -> Result<Verdict, LoadError> {
    per_second(args.rate, "--rate", "calls", 5_000.0)?;
    let duration = seconds(args.duration, "--duration")?;
    let hold = seconds(args.hold, "--hold")?;
    let script = match &args.script {
        Some(text) => serde_json::from_str::<Value>(text)
            .map_err(|e| LoadError::Invalid(format!("--script: not JSON: {e}")))?
            .to_string(),
        None => json!({"actions": [
            {"pause": {"length": hold.as_secs_f64().ceil() as u64}},
            {"hangup": {}}
        ]})
        .to_string(),
    };
    let total = (args.rate * duration.as_secs_f64()).round() as usize;
    if total == 0 || total >= 1_000_000 {
        return Err(LoadError::Invalid(format!(
            "--rate × --duration: {total} calls; 1 to 999999"
        )));
    }
    let server = super::resolve_server(&args.target.server).await?;
    // Bound before anything is claimed: a port in use stops the run with nothing to undo.
    let trunk_sock = UdpSocket::bind(args.trunk_listen)
        .await
        .map_err(|e| LoadError::Setup(format!("--trunk-listen {}: {e}", args.trunk_listen)))?;
    let api = ApiClient::new(&args.target)?;
    let (voice_url, events_url, hooks) = start_hooks(args.target.hooks_listen, script)?;
    eprintln!(
        "claiming a number and routing it to {voice_url}; the deployment's outbound trunk must \
         be sip:{}",
        args.trunk_listen
    );
    let claimed = claim_numbers(&api, 1, Some((&voice_url, &events_url))).await?;
    let result = drive(&args, server, trunk_sock, &api, &claimed.numbers[0], &hooks).await;
    eprintln!("releasing the number");
    release(&api, &claimed).await;
    result
}

/// The live view of the run: counts over every call, latency of the INVITEs since the last
/// sample.
struct OutboundLive {
    run: Arc<Run>,
    calls: usize,
    /// Run-relative ns of the last sample.
    last: AtomicU64,
}

impl Live for OutboundLive {
    fn counts(&self) -> LiveCounts {
        let calls = &self.run.calls[..self.calls];
        let posted = calls.iter().filter(|r| get(&r.posted) != 0).count() as u64;
        let answered = calls.iter().filter(|r| get(&r.ok_sent) != 0).count() as u64;
        let completed = calls.iter().filter(|r| get(&r.bye) != 0).count() as u64;
        let refused = calls
            .iter()
            .filter(|r| !matches!(get(&r.status), 0 | 201))
            .count() as u64;
        LiveCounts {
            attempted: posted,
            answered: Some(answered),
            completed,
            failed: refused,
        }
    }

    fn recent_latency(&self) -> (Duration, Duration, Duration) {
        let now = self.run.now();
        let since = self.last.swap(now, Ordering::Relaxed);
        let mut recent: Vec<Duration> = self.run.calls[..self.calls]
            .iter()
            .filter(|r| get(&r.invite) > since)
            .map(|r| Duration::from_nanos(get(&r.invite).saturating_sub(get(&r.posted))))
            .collect();
        recent.sort();
        (
            quantile(&recent, 0.5),
            quantile(&recent, 0.99),
            quantile(&recent, 1.0),
        )
    }
}

async fn drive(
    args: &OutboundArgs,
    server: SocketAddr,
    trunk_sock: UdpSocket,
    api: &ApiClient,
    from: &str,
    hooks: &Hooks,
) -> Result<Verdict, LoadError> {
    let duration = Duration::from_secs_f64(args.duration);
    let total = (args.rate * duration.as_secs_f64()).round() as usize;
    let setup = |what: &str, e: std::io::Error| LoadError::Setup(format!("{what}: {e}"));
    // Each call holds a minute's reservation while it is up; in dev mode the wallet is topped up
    // for the whole run (a deployment in production refuses test top-ups: then the balance must
    // already hold it, and calls it cannot hold are counted as 402).
    let money = (total as i64)
        .saturating_mul(300)
        .clamp(10_000, 1_000_000_000);
    let wallet = api.call(reqwest::Method::GET, "/v1/wallet", None).await?;
    let currency = wallet["currency"].as_str().unwrap_or("KES").to_owned();
    if let Err(e) = api
        .call(
            reqwest::Method::POST,
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": money, "currency": currency})),
        )
        .await
    {
        eprintln!("no test top-up ({e}): the wallet's balance pays for the calls");
    }

    let run = Arc::new(Run::new(total));
    let (stop_tx, stop_rx) = watch::channel(false);
    stamp_arrivals(&trunk_sock).map_err(|e| setup("SO_TIMESTAMPNS on the trunk", e))?;
    let media_ip = args.trunk_listen.ip();
    let mut media = Vec::new();
    let mut sinks = Vec::new();
    for _ in 0..args.rtp_sockets.max(1) {
        let sock = UdpSocket::bind(SocketAddr::new(media_ip, 0))
            .await
            .map_err(|e| setup("RTP socket", e))?;
        stamp_arrivals(&sock).map_err(|e| setup("SO_TIMESTAMPNS on RTP", e))?;
        media.push(sock.local_addr().map_err(|e| setup("RTP socket", e))?);
        sinks.push(tokio::spawn(rtp_sink(sock, run.clone(), stop_rx.clone())));
    }
    let trunk = Trunk::new(
        trunk_sock,
        server,
        media,
        Duration::from_millis(args.ring_ms),
        run.clone(),
    )
    .map_err(|e| setup("trunk socket", e))?;
    let trunk_task = tokio::spawn(trunk.run(stop_rx.clone()));
    let placer = Placer {
        client: api.http.clone(),
        url: format!("{}/v1/calls", api.base),
        auth: format!("Bearer {}", api.key),
        from: from.to_owned(),
        run: run.clone(),
    };
    let live = OutboundLive {
        run: run.clone(),
        calls: total,
        last: AtomicU64::new(0),
    };

    let mut sampler = Sampler::new(server, duration, args.rate, "API→INVITE");
    let started = sampler.started;
    let cpu_before = procfs::cpu_time_self();
    let mut next_sample = started + Duration::from_secs(1);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut sent = 0usize;
    while sent < total {
        let due = started + interval.mul_f64(sent as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        while sent < total && started + interval.mul_f64(sent as f64) <= Instant::now() {
            drop(placer.place(sent));
            sent += 1;
        }
        if Instant::now() >= next_sample {
            sampler.sample(&live);
            next_sample += Duration::from_secs(1);
        }
    }
    let sending = started.elapsed().max(Duration::from_millis(1));
    // Until every call has ended (or its POST failed), or the time runs out.
    let limit = Duration::from_secs_f64(args.hold) + Duration::from_millis(args.ring_ms);
    let give_up = Instant::now() + limit + Duration::from_secs(20);
    let settled = loop {
        let open = run.calls.iter().any(|r| {
            let status = get(&r.status);
            status == 0 || (status == 201 && get(&r.bye) == 0)
        });
        if !open {
            break true;
        }
        if Instant::now() >= give_up {
            break false;
        }
        if Instant::now() >= next_sample {
            sampler.sample(&live);
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sampler.sample(&live);
    if sampler.terminal {
        eprintln!();
    }
    let harness_cores = procfs::cpu_time_self()
        .saturating_sub(cpu_before)
        .as_secs_f64()
        / started.elapsed().as_secs_f64();
    let created = run.calls.iter().filter(|r| get(&r.status) == 201).count() as u64;
    let until = Instant::now() + Duration::from_secs(15);
    while hooks.events().values().sum::<u64>() < 3 * created && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let _ = trunk_task.await;
    for sink in sinks {
        let _ = sink.await;
    }
    let errors = run.errors.lock().map(|e| e.clone()).unwrap_or_default();
    let report = report(args, &run, sending, settled, hooks, harness_cores, &errors);
    args.output.finish(&report, &sampler.samples, print)
}

fn report(
    args: &OutboundArgs,
    run: &Run,
    sending: Duration,
    settled: bool,
    hooks: &Hooks,
    harness_cores: f64,
    errors: &[String],
) -> Value {
    let ns = |a: u64, b: u64| Duration::from_nanos(b.saturating_sub(a));
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut fail = |why: String| *failures.entry(why).or_default() += 1;
    let (mut created, mut answered, mut completed, mut packets) = (0u64, 0u64, 0u64, 0u64);
    let (mut invite, mut response, mut rtp) = (Vec::new(), Vec::new(), Vec::new());
    for r in &run.calls {
        let status = get(&r.status);
        if get(&r.responded) != 0 {
            response.push(ns(get(&r.posted), get(&r.responded)));
        }
        if get(&r.invite) != 0 {
            invite.push(ns(get(&r.posted_wall), get(&r.invite_kernel)));
        }
        if get(&r.rtp) != 0 {
            rtp.push(ns(get(&r.ok_sent_wall), get(&r.rtp_kernel)));
        }
        packets += get(&r.packets);
        match status {
            0 => fail("POST unanswered".into()),
            1 => fail("POST failed (no HTTP response)".into()),
            201 => created += 1,
            code => fail(format!(
                "POST {code} {}",
                reqwest::StatusCode::from_u16(code as u16)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("")
            )),
        }
        if status != 201 {
            continue;
        }
        if get(&r.ok_sent) != 0 {
            answered += 1;
        }
        if get(&r.invite) == 0 {
            fail("no INVITE at the trunk".into());
        } else if get(&r.acked) == 0 {
            fail("no ACK for the trunk's 200".into());
        } else if get(&r.rtp) == 0 {
            fail("no RTP from the engine".into());
        } else if get(&r.bye) == 0 {
            fail("no BYE from the engine".into());
        } else {
            completed += 1;
        }
    }
    for v in [&mut invite, &mut response, &mut rtp] {
        v.sort();
    }
    let c = &run.counters;
    let failed: u64 = failures.values().sum();
    let p99 = quantile(&invite, 0.99);
    let pass = settled && args.output.passes(failed, p99);
    json!({
        "scenario": "outbound",
        "settings": {
            "rate": args.rate,
            "duration_seconds": args.duration,
            "hold_seconds": args.hold,
            "ring_ms": args.ring_ms,
            "trunk": format!("sip:{}", args.trunk_listen),
        },
        "calls": {
            "attempted": run.calls.len(),
            "created": created,
            "answered": answered,
            "completed": completed,
            "failed": failed,
            "failures": failures,
        },
        "achieved_rate": run.calls.iter().filter(|r| get(&r.posted) != 0).count() as f64
            / sending.as_secs_f64(),
        "api_to_invite_ms": {
            "p50": ms(quantile(&invite, 0.5)),
            "p99": ms(p99),
            "max": ms(quantile(&invite, 1.0)),
        },
        "post_response_ms": {
            "p50": ms(quantile(&response, 0.5)),
            "p99": ms(quantile(&response, 0.99)),
        },
        "answer_to_rtp_ms": {
            "p50": ms(quantile(&rtp, 0.5)),
            "p99": ms(quantile(&rtp, 0.99)),
        },
        "sip": {
            "invites": get(&c.invites),
            "invite_retransmissions": get(&c.invite_retransmissions),
            "unknown_invites": get(&c.unknown_invites),
            "ok_retransmissions": get(&c.ok_retransmissions),
            "byes": get(&c.byes),
        },
        "rtp_packets": packets,
        "voice_callbacks": hooks.voice.load(Ordering::Relaxed),
        "events": hooks.events(),
        "first_errors": errors,
        "harness_cores": harness_cores,
        "units": {"rate": "calls/s", "latency": "API → INVITE at the trunk", "items": "calls"},
        "pass_lines": args.output.lines(),
        "pass": pass,
    })
}

fn print(j: &Value) {
    let f = num;
    let rows: Vec<(&str, String)> = vec![
        ("attempted", j["calls"]["attempted"].to_string()),
        ("created (201)", j["calls"]["created"].to_string()),
        ("answered", j["calls"]["answered"].to_string()),
        ("completed", j["calls"]["completed"].to_string()),
        ("failed", j["calls"]["failed"].to_string()),
        ("achieved rate", format!("{:.1}/s", f(&j["achieved_rate"]))),
        (
            "API→INVITE",
            format!(
                "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                f(&j["api_to_invite_ms"]["p50"]),
                f(&j["api_to_invite_ms"]["p99"]),
                f(&j["api_to_invite_ms"]["max"])
            ),
        ),
        (
            "POST→response",
            format!(
                "p50 {:.2} ms  p99 {:.2} ms",
                f(&j["post_response_ms"]["p50"]),
                f(&j["post_response_ms"]["p99"])
            ),
        ),
        (
            "200→first RTP",
            format!(
                "p50 {:.2} ms  p99 {:.2} ms",
                f(&j["answer_to_rtp_ms"]["p50"]),
                f(&j["answer_to_rtp_ms"]["p99"])
            ),
        ),
        ("voice callbacks", j["voice_callbacks"].to_string()),
        (
            "load test CPU",
            format!("{:.3} cores", f(&j["harness_cores"])),
        ),
    ];
    print_table(
        "calls placed through the API",
        &rows,
        j,
        &j["calls"]["failures"],
        &[("event", &j["events"])],
    );
}
