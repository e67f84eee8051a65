//! The `inbound` scenario: calls at a rate from the carrier's side, each answered by the
//! numbers' script, held, then hung up by the caller.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};

use super::sip_text::quantile;
use super::uac::{self, Uac, UacStats};
use super::{
    ApiClient, Claimed, Hooks, LoadError, Output, Sampler, Target, Verdict, claim_numbers, ms,
    procfs, release, seconds, start_hooks,
};
use super::{num, per_second, print_table, within};

#[derive(Debug, Clone, Args)]
pub struct InboundArgs {
    #[command(flatten)]
    pub target: Target,
    /// New calls a second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of new calls.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds each call is held after the answer before the caller hangs up.
    #[arg(long, default_value_t = 1.0)]
    pub hold: f64,
    /// Numbers claimed and called in turn.
    #[arg(long, default_value_t = 10)]
    pub numbers: usize,
    /// The VoiceAction script the numbers answer with (JSON); by default a pause longer than
    /// the hold, so the caller hangs up.
    #[arg(long)]
    pub script: Option<String>,
    /// UDP sockets the calls are spread over.
    #[arg(long, default_value_t = 4)]
    pub sockets: usize,
    #[command(flatten)]
    pub output: Output,
}

pub async fn run(args: InboundArgs) -> Result<Verdict, LoadError> {
    per_second(args.rate, "--rate", "calls", 20_000.0)?;
    let duration = seconds(args.duration, "--duration")?;
    let hold = seconds(args.hold, "--hold")?;
    within(args.numbers, "--numbers", 1..=100)?;
    let script = match &args.script {
        Some(text) => {
            let parsed: Value = serde_json::from_str(text)
                .map_err(|e| LoadError::Invalid(format!("--script: not JSON: {e}")))?;
            parsed.to_string()
        }
        None => json!({"actions": [{"pause": {"length": hold.as_secs() + 30}}]}).to_string(),
    };
    let server = super::resolve_server(&args.target.server).await?;

    let api = ApiClient::new(&args.target)?;
    let (voice_url, events_url, hooks) = start_hooks(args.target.hooks_listen, script)?;
    eprintln!(
        "claiming {} numbers and routing them to {voice_url}",
        args.numbers
    );
    let claimed = claim_numbers(&api, args.numbers, Some((&voice_url, &events_url))).await?;
    let result = drive_inbound(&args, server, duration, hold, &claimed, &hooks).await;
    eprintln!("releasing the {} numbers", claimed.ids.len());
    release(&api, &claimed).await;
    result
}

async fn drive_inbound(
    args: &InboundArgs,
    server: SocketAddr,
    duration: Duration,
    hold: Duration,
    claimed: &Claimed,
    hooks: &Hooks,
) -> Result<Verdict, LoadError> {
    // Our RTP goes nowhere: one socket the engine's media is sent to, drained.
    let sink = tokio::net::UdpSocket::bind(SocketAddr::new(
        uac::route_to(server).map_err(|e| LoadError::Setup(format!("route to {server}: {e}")))?,
        0,
    ))
    .await
    .map_err(|e| LoadError::Setup(format!("RTP sink: {e}")))?;
    let rtp = sink
        .local_addr()
        .map_err(|e| LoadError::Setup(format!("RTP sink: {e}")))?;
    let drain = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while sink.recv(&mut buf).await.is_ok() {}
    });
    let timeout = Duration::from_secs(32);
    let mut uac = Uac::start(server, args.sockets, timeout)
        .await
        .map_err(|e| LoadError::Setup(format!("SIP sockets: {e}")))?;
    let total = (args.rate * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut sampler = Sampler::new(server, duration, args.rate, "setup");
    let started = sampler.started;
    let cpu_before = procfs::cpu_time_self();
    let mut next_sample = started + Duration::from_secs(1);
    let mut placed = 0u64;
    while placed < total {
        let due = started + interval.mul_f64(placed as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
        // Catch up after a late wake, as a carrier's calls keep arriving.
        while placed < total && started + interval.mul_f64(placed as f64) <= Instant::now() {
            let number = claimed.numbers[(placed as usize) % claimed.numbers.len()].clone();
            uac.call(number, rtp, Some(hold));
            placed += 1;
        }
        if Instant::now() >= next_sample {
            sampler.sample(&*uac.progress);
            next_sample += Duration::from_secs(1);
        }
    }
    // The calls still up are held, then hung up; one failing to end gives up at the timeout.
    let give_up = Instant::now() + hold + timeout + Duration::from_secs(5);
    let settled = loop {
        let (_, _, completed, failed) = uac.progress.get();
        if completed + failed >= total {
            break true;
        }
        if Instant::now() >= give_up {
            break false;
        }
        if Instant::now() >= next_sample {
            sampler.sample(&*uac.progress);
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sampler.sample(&*uac.progress);
    if sampler.terminal {
        eprintln!();
    }
    let sending = started
        .elapsed()
        .min(duration.max(Duration::from_millis(1)));
    // The load test's own CPU while it placed and ended the calls: what measuring cost.
    let harness_cores = procfs::cpu_time_self()
        .saturating_sub(cpu_before)
        .as_secs_f64()
        / started.elapsed().as_secs_f64();
    let stats = uac.finish().await;
    drain.abort();
    // Each completed call sends call.started, call.answered and call.completed.
    let want_events = 3 * stats.completed;
    let until = Instant::now() + Duration::from_secs(10);
    while hooks.events().values().sum::<u64>() < want_events && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = Report::new(args, &stats, sending, hooks, settled, harness_cores);
    report.print();
    args.output.write(&report.json, &sampler.samples)?;
    Ok(report.verdict)
}

struct Report {
    json: Value,
    verdict: Verdict,
}

impl Report {
    fn new(
        args: &InboundArgs,
        stats: &UacStats,
        sending: Duration,
        hooks: &Hooks,
        settled: bool,
        harness_cores: f64,
    ) -> Report {
        let mut setup = stats.setup.clone();
        setup.sort();
        let mut bye = stats.bye_latency.clone();
        bye.sort();
        let mut refused = stats.refused.clone();
        refused.sort();
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        for (code, n) in &stats.invite_status {
            *failures
                .entry(format!(
                    "INVITE {code} {}",
                    sautikit_sip::message::reason_phrase(*code)
                ))
                .or_default() += n;
        }
        for (code, n) in &stats.bye_status {
            *failures
                .entry(format!(
                    "BYE {code} {}",
                    sautikit_sip::message::reason_phrase(*code)
                ))
                .or_default() += n;
        }
        for (name, n) in [
            ("INVITE timeout", stats.invite_timeouts),
            ("BYE timeout", stats.bye_timeouts),
            ("hung up by the engine", stats.server_byes),
            ("unfinished", stats.unfinished),
        ] {
            if n > 0 {
                failures.insert(name.to_owned(), n);
            }
        }
        let failed = stats.failed();
        let p99 = quantile(&setup, 0.99);
        let pass = settled && args.output.passes(failed, p99);
        let json = json!({
            "scenario": "inbound",
            "settings": {
                "rate": args.rate,
                "duration_seconds": args.duration,
                "hold_seconds": args.hold,
                "numbers": args.numbers,
                "sockets": args.sockets,
            },
            "calls": {
                "attempted": stats.attempted,
                "answered": stats.answered,
                "completed": stats.completed,
                "failed": failed,
                "failures": failures,
            },
            "achieved_rate": stats.attempted as f64 / sending.as_secs_f64(),
            "setup_ms": {
                "p50": ms(quantile(&setup, 0.5)),
                "p99": ms(p99),
                "max": ms(quantile(&setup, 1.0)),
            },
            "bye_ms": {
                "p50": ms(quantile(&bye, 0.5)),
                "p99": ms(quantile(&bye, 0.99)),
            },
            "refused_ms": {
                "p50": ms(quantile(&refused, 0.5)),
                "p99": ms(quantile(&refused, 0.99)),
            },
            "sip": {
                "trying": stats.trying,
                "invite_retransmissions": stats.invite_retransmissions,
                "bye_retransmissions": stats.bye_retransmissions,
                "ok_retransmissions": stats.ok_retransmissions,
            },
            "voice_callbacks": hooks.voice.load(Ordering::Relaxed),
            "harness_cores": harness_cores,
            "events": hooks.events(),
            "units": {"rate": "calls/s", "latency": "INVITE → 200", "items": "calls"},
            "pass_lines": args.output.lines(),
            "pass": pass,
        });
        Report {
            json,
            verdict: if pass { Verdict::Pass } else { Verdict::Fail },
        }
    }

    fn print(&self) {
        let j = &self.json;
        let rows: Vec<(&str, String)> = vec![
            ("attempted", j["calls"]["attempted"].to_string()),
            ("answered", j["calls"]["answered"].to_string()),
            ("completed", j["calls"]["completed"].to_string()),
            ("failed", j["calls"]["failed"].to_string()),
            (
                "achieved rate",
                format!("{:.1}/s", num(&j["achieved_rate"])),
            ),
            (
                "INVITE→200",
                format!(
                    "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                    num(&j["setup_ms"]["p50"]),
                    num(&j["setup_ms"]["p99"]),
                    num(&j["setup_ms"]["max"])
                ),
            ),
            (
                "BYE→200",
                format!(
                    "p50 {:.2} ms  p99 {:.2} ms",
                    num(&j["bye_ms"]["p50"]),
                    num(&j["bye_ms"]["p99"])
                ),
            ),
            ("voice callbacks", j["voice_callbacks"].to_string()),
            (
                "load test CPU",
                format!(
                    "{:.3} cores (its caller, voice callback and events receiver)",
                    num(&j["harness_cores"])
                ),
            ),
        ];
        print_table(
            "inbound calls",
            &rows,
            j,
            &j["calls"]["failures"],
            &[("event", &j["events"])],
        );
    }
}
