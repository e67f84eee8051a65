//! The `register` scenario: SIP credentials made through the API on numbers claimed for the
//! run, one simulated softphone per credential, and registration rounds at a rate — REGISTER
//! → `401` → REGISTER with `Authorization` (SHA-256) → `200` — with the engine's keepalives
//! answered. The latency of the pass line is authenticated REGISTER → `200`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};

use super::devices::{DevSpec, Devices, DevicesConfig, Secret, Stats};
use super::per_second;
use super::sip_text::quantile;
use super::{
    ApiClient, Claimed, LoadError, Output, Sampler, Target, Verdict, claim_numbers, ms, num,
    print_table, procfs, release, seconds, uac,
};

/// A number holds at most ten bindings.
const CREDENTIALS_PER_NUMBER: usize = 10;

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub target: Target,
    /// SIP credentials made for the run, one softphone each (ten per number claimed).
    #[arg(long, default_value_t = 100)]
    pub credentials: usize,
    /// Registrations a second (each a whole round: challenge and authenticated REGISTER).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of registrations; the softphones take turns.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// `Expires` the softphones ask for.
    #[arg(long, default_value_t = 3600)]
    pub expires: u32,
    /// The domain of the addresses of record (`SAUTIKIT_SIP_DOMAIN`); by default the SIP
    /// server's address, which the registrar accepts too.
    #[arg(long)]
    pub domain: Option<String>,
    /// UDP sockets the softphones are spread over.
    #[arg(long, default_value_t = 4)]
    pub sockets: usize,
    /// Register these credentials (`username:password` lines) instead of making them through
    /// the API: against any registrar (Kamailio, for one), with `--domain` its domain. Nothing
    /// is claimed, and no API key is needed.
    #[arg(long, value_name = "FILE")]
    pub credentials_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub output: Output,
}

pub async fn run(args: RegisterArgs) -> Result<Verdict, LoadError> {
    per_second(args.rate, "--rate", "registrations", 20_000.0)?;
    let duration = seconds(args.duration, "--duration")?;
    let max = 100 * CREDENTIALS_PER_NUMBER;
    if args.credentials_file.is_none() && !(1..=max).contains(&args.credentials) {
        return Err(LoadError::Invalid(format!(
            "--credentials {}: 1 to {max}",
            args.credentials
        )));
    }
    if !(60..=3600).contains(&args.expires) {
        return Err(LoadError::Invalid(format!(
            "--expires {}: 60 to 3600 seconds",
            args.expires
        )));
    }
    let server = super::resolve_server(&args.target.server).await?;
    if let Some(path) = &args.credentials_file {
        let specs = read_credentials(path)?;
        return drive(&args, server, duration, None, &specs).await;
    }
    let api = ApiClient::new(&args.target)?;
    let numbers = args.credentials.div_ceil(CREDENTIALS_PER_NUMBER);
    eprintln!(
        "claiming {numbers} numbers and making {} SIP credentials",
        args.credentials
    );
    let claimed = claim_numbers(&api, numbers, None).await?;
    let result = match make_credentials(&api, &claimed, args.credentials).await {
        Ok(specs) => drive(&args, server, duration, Some((&api, &claimed)), &specs).await,
        Err(e) => Err(e),
    };
    eprintln!(
        "releasing the {} numbers (their credentials and bindings go with them)",
        claimed.ids.len()
    );
    release(&api, &claimed).await;
    result
}

/// `username:password` lines; blank lines and `#` comments are skipped.
fn read_credentials(path: &std::path::Path) -> Result<Vec<DevSpec>, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::Invalid(format!("--credentials-file {}: {e}", path.display())))?;
    let mut specs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, password)) = line.split_once(':').filter(|(u, _)| !u.is_empty()) else {
            return Err(LoadError::Invalid(format!(
                "--credentials-file {} line {}: not username:password",
                path.display(),
                n + 1
            )));
        };
        specs.push(DevSpec {
            user: user.to_owned(),
            secret: Secret::Password(password.to_owned()),
        });
    }
    if specs.is_empty() {
        return Err(LoadError::Invalid(format!(
            "--credentials-file {}: no credentials",
            path.display()
        )));
    }
    Ok(specs)
}

/// Credential `k` on number `k % numbers`, so that softphones in turn bind different numbers.
/// The API hashes each password (Argon2): a few are made at once.
async fn make_credentials(
    api: &ApiClient,
    claimed: &Claimed,
    n: usize,
) -> Result<Vec<DevSpec>, LoadError> {
    let made: Vec<Result<DevSpec, LoadError>> = futures::stream::iter(0..n)
        .map(|k| {
            let number = &claimed.ids[k % claimed.ids.len()];
            async move {
                let credential = api
                    .call(
                        reqwest::Method::POST,
                        &format!("/v1/numbers/{number}/sip-credentials"),
                        Some(json!({"label": format!("loadtest-{k}")})),
                    )
                    .await?;
                match (
                    credential["username"].as_str(),
                    credential["password"].as_str(),
                ) {
                    (Some(user), Some(password)) => Ok(DevSpec {
                        user: user.to_owned(),
                        secret: Secret::Password(password.to_owned()),
                    }),
                    _ => Err(LoadError::Setup(format!(
                        "a SIP credential without username or password: {credential}"
                    ))),
                }
            }
        })
        .buffered(4)
        .collect()
        .await;
    made.into_iter().collect()
}

async fn drive(
    args: &RegisterArgs,
    server: SocketAddr,
    duration: Duration,
    made: Option<(&ApiClient, &Claimed)>,
    specs: &[DevSpec],
) -> Result<Verdict, LoadError> {
    let bind =
        uac::route_to(server).map_err(|e| LoadError::Setup(format!("route to {server}: {e}")))?;
    let timeout = Duration::from_secs(10);
    let config = DevicesConfig {
        server,
        bind,
        domain: args
            .domain
            .clone()
            .unwrap_or_else(|| server.ip().to_string()),
        expected_realm: None,
        sockets: args.sockets,
        expires: args.expires,
        timeout,
        user_agent: "sautikit-loadtest",
    };
    let devices = Devices::start(&config, specs)
        .await
        .map_err(|e| LoadError::Setup(format!("SIP sockets: {e}")))?;
    let total = (args.rate * duration.as_secs_f64()).round() as u64;
    let mut sampler = Sampler::new(server, duration, args.rate, "REGISTER→200");
    let started = sampler.started;
    let cpu_before = procfs::cpu_time_self();
    let mut next_sample = started + Duration::from_secs(1);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut sent = 0u64;
    while sent < total {
        let due = started + interval.mul_f64(sent as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        while sent < total && started + interval.mul_f64(sent as f64) <= Instant::now() {
            devices.register((sent % devices.n as u64) as usize, false);
            sent += 1;
        }
        if Instant::now() >= next_sample {
            sampler.sample(&*devices.progress);
            next_sample += Duration::from_secs(1);
        }
    }
    let sending = started.elapsed().max(Duration::from_millis(1));
    let settled = devices.settle(timeout + Duration::from_secs(2)).await;
    sampler.sample(&*devices.progress);
    if sampler.terminal {
        eprintln!();
    }
    let harness_cores = procfs::cpu_time_self()
        .saturating_sub(cpu_before)
        .as_secs_f64()
        / started.elapsed().as_secs_f64();
    let stats = devices.take().await;
    // What the API lists: one binding per softphone whose last round ended in 200.
    let mut listed = None;
    if let Some((api, claimed)) = made {
        let mut n = 0usize;
        for id in &claimed.ids {
            let bindings = api
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/numbers/{id}/registrations"),
                    None,
                )
                .await?;
            n += bindings.as_array().map_or(0, Vec::len);
        }
        listed = Some(n);
    }
    let report = report(args, &stats, sending, settled, harness_cores, listed);
    args.output.finish(&report, &sampler.samples, print)
}

fn report(
    args: &RegisterArgs,
    stats: &Stats,
    sending: Duration,
    settled: bool,
    harness_cores: f64,
    listed: Option<usize>,
) -> Value {
    let micros = |v: &[u32]| {
        let mut v: Vec<Duration> = v
            .iter()
            .map(|us| Duration::from_micros(u64::from(*us)))
            .collect();
        v.sort();
        v
    };
    let auth = micros(&stats.auth_lat_us);
    let round = micros(&stats.round_lat_us);
    let mut failures: BTreeMap<String, u64> = stats
        .failed_status
        .iter()
        .map(|(code, n)| {
            (
                format!(
                    "REGISTER {code} {}",
                    sautikit_sip::message::reason_phrase(*code)
                ),
                *n,
            )
        })
        .collect();
    if stats.timeouts > 0 {
        failures.insert("REGISTER timeout".into(), stats.timeouts);
    }
    let failed = stats.failed();
    let p99 = quantile(&auth, 0.99);
    // Every softphone registered holds exactly one binding, which the API lists.
    let pass = settled
        && stats.in_flight == 0
        && listed.is_none_or(|n| n as u64 == stats.registered)
        && args.output.passes(failed, p99);
    json!({
        "scenario": "register",
        "settings": {
            "credentials": credentials_setting(args),
            "rate": args.rate,
            "duration_seconds": args.duration,
            "expires": args.expires,
            "sockets": args.sockets,
        },
        "registrations": {
            "attempted": stats.started,
            "completed": stats.completed,
            "failed": failed,
            "failures": failures,
            "busy_skips": stats.busy,
        },
        "achieved_rate": stats.completed as f64 / sending.as_secs_f64(),
        "register_ms": {
            "p50": ms(quantile(&auth, 0.5)),
            "p99": ms(p99),
            "max": ms(quantile(&auth, 1.0)),
        },
        "round_ms": {
            "p50": ms(quantile(&round, 0.5)),
            "p99": ms(quantile(&round, 0.99)),
        },
        "sip": {
            "challenges": stats.challenges,
            "rechallenges": stats.rechallenges,
            "retransmissions": stats.retransmissions,
            "keepalives_answered": stats.options,
            "unmatched": stats.unmatched,
        },
        "softphones_registered": stats.registered,
        "bindings_listed": listed,
        "harness_cores": harness_cores,
        "units": {"rate": "registrations/s", "latency": "REGISTER → 200", "items": "registrations"},
        "pass_lines": args.output.lines(),
        "pass": pass,
    })
}

fn credentials_setting(args: &RegisterArgs) -> Value {
    match &args.credentials_file {
        Some(path) => json!(path.display().to_string()),
        None => json!(args.credentials),
    }
}

fn print(j: &Value) {
    let f = num;
    let rows: Vec<(&str, String)> = vec![
        ("attempted", j["registrations"]["attempted"].to_string()),
        ("completed", j["registrations"]["completed"].to_string()),
        ("failed", j["registrations"]["failed"].to_string()),
        ("achieved rate", format!("{:.1}/s", f(&j["achieved_rate"]))),
        (
            "REGISTER→200",
            format!(
                "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms (the authenticated REGISTER)",
                f(&j["register_ms"]["p50"]),
                f(&j["register_ms"]["p99"]),
                f(&j["register_ms"]["max"])
            ),
        ),
        (
            "whole round",
            format!(
                "p50 {:.2} ms  p99 {:.2} ms (REGISTER → 401 → REGISTER → 200)",
                f(&j["round_ms"]["p50"]),
                f(&j["round_ms"]["p99"])
            ),
        ),
        (
            "registered",
            match j["bindings_listed"].as_u64() {
                Some(n) => format!(
                    "{} softphones; the API lists {n} bindings",
                    j["softphones_registered"]
                ),
                None => format!("{} softphones", j["softphones_registered"]),
            },
        ),
        (
            "keepalives",
            format!("{} OPTIONS answered", j["sip"]["keepalives_answered"]),
        ),
        (
            "load test CPU",
            format!("{:.3} cores", f(&j["harness_cores"])),
        ),
    ];
    print_table(
        "registrations",
        &rows,
        j,
        &j["registrations"]["failures"],
        &[],
    );
}
