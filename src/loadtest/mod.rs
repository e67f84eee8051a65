//! `sautikit loadtest`: load against any Sautikit deployment, the local one by default. A
//! scenario creates what it needs through the API (numbers claimed and routed to the load
//! test's own voice callback and events receiver), drives it, prints a live progress line and
//! a final table (and JSON), and releases what it claimed. Pass lines make the exit code usable
//! in CI. The benches drive the engine with the same caller ([`uac`]).

pub mod procfs;
pub mod report;
pub mod sip_text;
pub mod uac;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::post;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use sip_text::quantile;
use uac::{Uac, UacStats};

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Inbound calls at a rate, each answered by the numbers' script, held, then hung up by the
    /// caller.
    Inbound(InboundArgs),
}

/// The deployment under test.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Its API.
    #[arg(
        long,
        env = "SAUTIKIT_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// A workspace's API key; the numbers are claimed in this workspace.
    #[arg(long, env = "SAUTIKIT_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Its SIP listener (the load test calls from an address it takes calls from:
    /// `SAUTIKIT_CARRIER_ALLOW`).
    #[arg(long, env = "SAUTIKIT_SIP_SERVER", default_value = "127.0.0.1:5060")]
    pub server: String,
    /// Where the load test's voice callback and events receiver listen; the deployment must be
    /// able to reach it.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub hooks_listen: SocketAddr,
}

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
    /// Write the results, with a sample each second, as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML page with plots of the run to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Fail (exit 1) when INVITE→200 p99 is above this.
    #[arg(long, value_name = "MS")]
    pub p99_ms: Option<f64>,
    /// Fail (exit 1) when more calls than this fail.
    #[arg(long, default_value_t = 0)]
    pub max_failed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Setup(String),
}

/// Whether the run met its pass lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
}

pub async fn run(scenario: Scenario) -> Result<Verdict, LoadError> {
    match scenario {
        Scenario::Inbound(args) => inbound(args).await,
    }
}

/// The deployment's API, with the workspace's key.
struct ApiClient {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl ApiClient {
    fn new(target: &Target) -> Result<ApiClient, LoadError> {
        // reqwest is built without a default TLS provider; the API may be https.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| LoadError::Setup(format!("HTTP client: {e}")))?;
        Ok(ApiClient {
            base: target.api.trim_end_matches('/').to_owned(),
            key: target.api_key.clone(),
            http,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, LoadError> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|e| LoadError::Setup(format!("{method} {path}: {e}")))?;
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            Err(LoadError::Setup(format!(
                "{method} {path}: {status} {}",
                value["error"]["code"].as_str().unwrap_or_default()
            )))
        }
    }
}

/// Numbers claimed for the run, released at its end.
struct Claimed {
    ids: Vec<String>,
    numbers: Vec<Arc<str>>,
}

/// Claim `n` numbers and route them to the hooks; in dev mode a wallet short of their first
/// month is topped up with the `test` provider first.
async fn claim_numbers(
    api: &ApiClient,
    n: usize,
    voice_url: &str,
    events_url: &str,
) -> Result<Claimed, LoadError> {
    let available = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/numbers/available?limit={}", n.min(100)),
            None,
        )
        .await?;
    let offers = available.as_array().cloned().unwrap_or_default();
    if offers.len() < n {
        return Err(LoadError::Setup(format!(
            "{n} numbers wanted, {} available (at most 100 per run)",
            offers.len()
        )));
    }
    let price: i64 = offers
        .iter()
        .map(|o| o["monthly_price_minor"].as_i64().unwrap_or(0))
        .sum();
    let wallet = api.call(reqwest::Method::GET, "/v1/wallet", None).await?;
    let balance = wallet["balance_minor"].as_i64().unwrap_or(0);
    if balance < price {
        let currency = wallet["currency"].as_str().unwrap_or("KES").to_owned();
        api.call(
            reqwest::Method::POST,
            "/v1/topups",
            Some(
                json!({"provider": "test", "amount_minor": price - balance, "currency": currency}),
            ),
        )
        .await
        .map_err(|e| {
            LoadError::Setup(format!(
                "the wallet holds {balance} and {n} numbers cost {price} (minor units); a test \
                 top-up failed: {e}"
            ))
        })?;
    }
    let mut claimed = Claimed {
        ids: Vec::new(),
        numbers: Vec::new(),
    };
    for offer in &offers {
        let inventory = offer["id"].as_str().unwrap_or_default();
        let result = api
            .call(
                reqwest::Method::POST,
                &format!("/v1/numbers/{inventory}/claim"),
                None,
            )
            .await;
        let number = match result {
            Ok(n) => n,
            Err(e) => {
                release(api, &claimed).await;
                return Err(e);
            }
        };
        let id = number["id"].as_str().unwrap_or_default().to_owned();
        claimed.ids.push(id.clone());
        claimed
            .numbers
            .push(number["number"].as_str().unwrap_or_default().into());
        if let Err(e) = api
            .call(
                reqwest::Method::PATCH,
                &format!("/v1/numbers/{id}/routing"),
                Some(json!({"voice_callback_url": voice_url, "events_url": events_url})),
            )
            .await
        {
            release(api, &claimed).await;
            return Err(e);
        }
    }
    Ok(claimed)
}

async fn release(api: &ApiClient, claimed: &Claimed) {
    for id in &claimed.ids {
        if let Err(e) = api
            .call(reqwest::Method::DELETE, &format!("/v1/numbers/{id}"), None)
            .await
        {
            eprintln!("could not release number {id}: {e}");
        }
    }
}

/// Counts of what the voice callback and the events receiver got.
#[derive(Default)]
struct Hooks {
    voice: AtomicU64,
    events: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Hooks {
    fn events(&self) -> BTreeMap<String, u64> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// The voice callback (answering `script`) and the events receiver, on their own thread so that
/// the caller's work never delays them.
fn start_hooks(
    listen: SocketAddr,
    script: String,
) -> Result<(String, String, Arc<Hooks>), LoadError> {
    let hooks = Arc::new(Hooks::default());
    let script: &'static str = script.leak();
    let app = {
        let voice = hooks.clone();
        let events = hooks.clone();
        Router::new()
            .route(
                "/voice",
                post(move || {
                    voice.voice.fetch_add(1, Ordering::Relaxed);
                    async move { ([("content-type", "application/json")], script) }
                }),
            )
            .route(
                "/events",
                post(move |headers: HeaderMap| {
                    let kind = headers
                        .get("x-sautikit-event-kind")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("unknown")
                        .to_owned();
                    if let Ok(mut e) = events.events.lock() {
                        *e.entry(kind).or_default() += 1;
                    }
                    async { "ok" }
                }),
            )
    };
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| LoadError::Setup(format!("--hooks-listen {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| LoadError::Setup(format!("--hooks-listen {listen}: {e}")))?;
    std::thread::Builder::new()
        .name("loadtest-hooks".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                    let _ = axum::serve(listener, app).await;
                }
            });
        })
        .map_err(|e| LoadError::Setup(format!("the hooks' thread: {e}")))?;
    Ok((
        format!("http://{addr}/voice"),
        format!("http://{addr}/events"),
        hooks,
    ))
}

fn seconds(value: f64, flag: &str) -> Result<Duration, LoadError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| LoadError::Invalid(format!("{flag} {value}: seconds, ≥ 0")))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

async fn inbound(args: InboundArgs) -> Result<Verdict, LoadError> {
    if !(args.rate > 0.0 && args.rate <= 20_000.0) {
        return Err(LoadError::Invalid(format!(
            "--rate {}: calls a second, more than 0 and at most 20000",
            args.rate
        )));
    }
    let duration = seconds(args.duration, "--duration")?;
    let hold = seconds(args.hold, "--hold")?;
    if !(1..=100).contains(&args.numbers) {
        return Err(LoadError::Invalid(format!(
            "--numbers {}: 1 to 100",
            args.numbers
        )));
    }
    let script = match &args.script {
        Some(text) => {
            let parsed: Value = serde_json::from_str(text)
                .map_err(|e| LoadError::Invalid(format!("--script: not JSON: {e}")))?;
            parsed.to_string()
        }
        None => json!({"actions": [{"pause": {"length": hold.as_secs() + 30}}]}).to_string(),
    };
    let server = tokio::net::lookup_host(&args.target.server)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            LoadError::Invalid(format!("--server {}: no address", args.target.server))
        })?;

    let api = ApiClient::new(&args.target)?;
    let (voice_url, events_url, hooks) = start_hooks(args.target.hooks_listen, script)?;
    eprintln!(
        "claiming {} numbers and routing them to {voice_url}",
        args.numbers
    );
    let claimed = claim_numbers(&api, args.numbers, &voice_url, &events_url).await?;
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
    let mut sampler = Sampler::new(server, duration, args.rate);
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
            sampler.sample(&uac);
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
            sampler.sample(&uac);
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sampler.sample(&uac);
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
    let mut json = report.json.clone();
    json["timeline"] = serde_json::to_value(&sampler.samples).unwrap_or_default();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        std::fs::write(path, text)
            .map_err(|e| LoadError::Setup(format!("--json {}: {e}", path.display())))?;
    }
    if let Some(path) = &args.report {
        let page = report::html(&report.json, &sampler.samples)
            .map_err(|e| LoadError::Setup(format!("--report: {e}")))?;
        std::fs::write(path, page)
            .map_err(|e| LoadError::Setup(format!("--report {}: {e}", path.display())))?;
    }
    Ok(report.verdict)
}

/// Samples the run each second and prints the progress line.
struct Sampler {
    started: Instant,
    duration: Duration,
    rate: f64,
    terminal: bool,
    last: (u64, u64, Instant),
    /// The target's process when it runs on this machine, and its CPU time at the last sample.
    target: Option<(u32, Duration)>,
    samples: Vec<report::Sample>,
}

impl Sampler {
    fn new(server: SocketAddr, duration: Duration, rate: f64) -> Sampler {
        let target = local_process(server).map(|pid| (pid, procfs::cpu_time(pid)));
        Sampler {
            started: Instant::now(),
            duration,
            rate,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last: (0, 0, Instant::now()),
            target,
            samples: Vec::new(),
        }
    }

    fn sample(&mut self, uac: &Uac) {
        let (attempted, answered, completed, failed) = uac.progress.get();
        let now = Instant::now();
        let span = now.duration_since(self.last.2).as_secs_f64().max(1e-3);
        let achieved = attempted.saturating_sub(self.last.0) as f64 / span;
        let failed_now = failed.saturating_sub(self.last.1);
        self.last = (attempted, failed, now);
        let (p50, p99, max) = uac.progress.recent_setup();
        let (target_cores, target_rss_mib) = match self.target.as_mut() {
            Some((pid, cpu)) => {
                let used = procfs::cpu_time(*pid);
                let cores = used.saturating_sub(*cpu).as_secs_f64() / span;
                *cpu = used;
                (
                    Some(cores),
                    procfs::status_kib(*pid, "VmRSS").map(|k| k as f64 / 1024.0),
                )
            }
            None => (None, None),
        };
        let t = now.duration_since(self.started).as_secs_f64();
        let offered = if now.duration_since(self.started) <= self.duration {
            self.rate
        } else {
            0.0
        };
        self.samples.push(report::Sample {
            t,
            offered,
            achieved,
            p50_ms: ms(p50),
            p99_ms: ms(p99),
            max_ms: ms(max),
            failed: failed_now,
            target_cores,
            target_rss_mib,
        });
        let target = match (target_cores, target_rss_mib) {
            (Some(c), Some(r)) => format!("  target {c:.2} cores {r:.0} MiB"),
            _ => String::new(),
        };
        let line = format!(
            "{t:6.1}/{:.0} s  offered {offered:.0}/s  achieved {achieved:.0}/s  in flight {}  answered {answered}  completed {completed}  failed {failed}  setup p50 {:.1} ms p99 {:.1} ms{target}",
            self.duration.as_secs_f64(),
            attempted.saturating_sub(completed + failed),
            ms(p50),
            ms(p99),
        );
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}

/// The process on this machine that holds the UDP socket `server` (its SIP listener), if we may
/// see it: through the socket's inode in /proc/net/udp and the processes' descriptors.
fn local_process(server: SocketAddr) -> Option<u32> {
    let port = format!(":{:04X}", server.port());
    let inode = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local = fields.get(1)?;
                (local.ends_with(&port) && fields.get(3) == Some(&"07"))
                    .then(|| fields.get(9).map(|i| (*i).to_owned()))
                    .flatten()
            })
        })?;
    let wanted = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == wanted) {
                return Some(pid);
            }
        }
    }
    None
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
        let mut pass = failed <= args.max_failed && settled;
        if let Some(line) = args.p99_ms {
            pass &= ms(p99) <= line;
        }
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
            "pass_lines": {"max_failed": args.max_failed, "p99_ms": args.p99_ms},
            "pass": pass,
        });
        Report {
            json,
            verdict: if pass { Verdict::Pass } else { Verdict::Fail },
        }
    }

    fn print(&self) {
        let j = &self.json;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "\ninbound calls");
        let rows: Vec<(String, String)> = vec![
            ("attempted".into(), j["calls"]["attempted"].to_string()),
            ("answered".into(), j["calls"]["answered"].to_string()),
            ("completed".into(), j["calls"]["completed"].to_string()),
            ("failed".into(), j["calls"]["failed"].to_string()),
            (
                "achieved rate".into(),
                format!("{:.1}/s", j["achieved_rate"].as_f64().unwrap_or(0.0)),
            ),
            (
                "INVITE→200".into(),
                format!(
                    "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                    j["setup_ms"]["p50"].as_f64().unwrap_or(0.0),
                    j["setup_ms"]["p99"].as_f64().unwrap_or(0.0),
                    j["setup_ms"]["max"].as_f64().unwrap_or(0.0)
                ),
            ),
            (
                "BYE→200".into(),
                format!(
                    "p50 {:.2} ms  p99 {:.2} ms",
                    j["bye_ms"]["p50"].as_f64().unwrap_or(0.0),
                    j["bye_ms"]["p99"].as_f64().unwrap_or(0.0)
                ),
            ),
            ("voice callbacks".into(), j["voice_callbacks"].to_string()),
            (
                "load test CPU".into(),
                format!(
                    "{:.3} cores (its caller, voice callback and events receiver)",
                    j["harness_cores"].as_f64().unwrap_or(0.0)
                ),
            ),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "  {name:<18} {value}");
        }
        if let Some(failures) = j["calls"]["failures"].as_object() {
            for (why, n) in failures {
                let _ = writeln!(out, "  failed: {why:<30} {n}");
            }
        }
        if let Some(events) = j["events"].as_object() {
            for (kind, n) in events {
                let _ = writeln!(out, "  event {kind:<24} {n}");
            }
        }
        let _ = writeln!(
            out,
            "  RESULT {}",
            if self.verdict == Verdict::Pass {
                "PASS"
            } else {
                "FAIL"
            }
        );
    }
}
