//! `sautikit loadtest`: load against any Sautikit deployment, the local one by default. A
//! scenario creates what it needs through the API (numbers claimed and routed to the load
//! test's own voice callback and events receiver), drives it, prints a live progress line and
//! a final table (and JSON), and releases what it claimed. Pass lines make the exit code usable
//! in CI. The benches drive the engine with the same caller ([`uac`]).

pub mod devices;
pub mod hold;
pub mod inbound;
pub mod outbound;
pub mod procfs;
pub mod register;
pub mod report;
pub mod sip_text;
pub mod streams;
pub mod trunk;
pub mod uac;
pub mod webhooks;

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

use hold::HoldArgs;
use inbound::InboundArgs;
use outbound::OutboundArgs;
use register::RegisterArgs;
use webhooks::WebhooksArgs;

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Inbound calls at a rate, each answered by the numbers' script, held, then hung up by the
    /// caller.
    Inbound(InboundArgs),
    /// Concurrent calls held with media, the engine's RTP checked: spacing, loss, headers.
    Hold(HoldArgs),
    /// Softphones registering with SIP credentials made for the run: challenge, authenticated
    /// REGISTER, 200, at a rate; keepalives answered.
    Register(RegisterArgs),
    /// Calls placed through the API at a rate, to an outbound trunk the load test plays itself
    /// (the deployment's `SAUTIKIT_OUTBOUND_TRUNK` must point at it).
    Outbound(OutboundArgs),
    /// A backlog of call events built while the load test's receiver is down, then drained to
    /// it: delivery rate, completeness, duplicates and order.
    Webhooks(WebhooksArgs),
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
    pub api_key: Option<String>,
    /// Its SIP listener (the load test calls from an address it takes calls from:
    /// `SAUTIKIT_CARRIER_ALLOW`).
    #[arg(long, env = "SAUTIKIT_SIP_SERVER", default_value = "127.0.0.1:5060")]
    pub server: String,
    /// Where the load test's voice callback and events receiver listen; the deployment must be
    /// able to reach it.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub hooks_listen: SocketAddr,
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

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        })
    }
}

pub async fn run(scenario: Scenario) -> Result<Verdict, LoadError> {
    match scenario {
        Scenario::Inbound(args) => inbound::run(args).await,
        Scenario::Hold(args) => hold::run(args).await,
        Scenario::Register(args) => register::run(args).await,
        Scenario::Outbound(args) => outbound::run(args).await,
        Scenario::Webhooks(args) => webhooks::run(args).await,
    }
}

/// What every scenario writes, and its pass lines.
#[derive(Debug, Clone, Args)]
pub struct Output {
    /// Write the results, with a sample each second, as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML page with plots of the run to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Fail (exit 1) when the scenario's p99 latency is above this.
    #[arg(long, value_name = "MS")]
    pub p99_ms: Option<f64>,
    /// Fail (exit 1) when more than this fail.
    #[arg(long, default_value_t = 0)]
    pub max_failed: u64,
}

impl Output {
    fn passes(&self, failed: u64, p99: Duration) -> bool {
        failed <= self.max_failed && self.p99_ms.is_none_or(|line| ms(p99) <= line)
    }

    fn lines(&self) -> Value {
        json!({"max_failed": self.max_failed, "p99_ms": self.p99_ms})
    }

    /// The end of a run: its table printed, its files written, its verdict from its `pass`.
    fn finish(
        &self,
        report: &Value,
        samples: &[report::Sample],
        print: fn(&Value),
    ) -> Result<Verdict, LoadError> {
        print(report);
        self.write(report, samples)?;
        Ok(if report["pass"] == true {
            Verdict::Pass
        } else {
            Verdict::Fail
        })
    }

    /// The run's JSON (with the samples as its `timeline`) and HTML page, where asked for.
    fn write(&self, summary: &Value, samples: &[report::Sample]) -> Result<(), LoadError> {
        if let Some(path) = &self.json {
            let mut json = summary.clone();
            json["timeline"] = serde_json::to_value(samples).unwrap_or_default();
            let text = serde_json::to_string_pretty(&json).unwrap_or_default();
            std::fs::write(path, text)
                .map_err(|e| LoadError::Setup(format!("--json {}: {e}", path.display())))?;
        }
        if let Some(path) = &self.report {
            let page = report::html(summary, samples)
                .map_err(|e| LoadError::Setup(format!("--report: {e}")))?;
            std::fs::write(path, page)
                .map_err(|e| LoadError::Setup(format!("--report {}: {e}", path.display())))?;
        }
        Ok(())
    }
}

/// What a scenario's progress line and samples read, live.
pub trait Live {
    fn counts(&self) -> LiveCounts;
    /// p50, p99 and max of the latencies since the last call.
    fn recent_latency(&self) -> (Duration, Duration, Duration);
}

pub struct LiveCounts {
    pub attempted: u64,
    /// For calls: answered so far.
    pub answered: Option<u64>,
    pub completed: u64,
    pub failed: u64,
}

impl Live for uac::Progress {
    fn counts(&self) -> LiveCounts {
        let (attempted, answered, completed, failed) = self.get();
        LiveCounts {
            attempted,
            answered: Some(answered),
            completed,
            failed,
        }
    }

    fn recent_latency(&self) -> (Duration, Duration, Duration) {
        self.recent_setup()
    }
}

impl Live for devices::Progress {
    fn counts(&self) -> LiveCounts {
        let (attempted, completed, failed, _) = self.get();
        LiveCounts {
            attempted,
            answered: None,
            completed,
            failed,
        }
    }

    fn recent_latency(&self) -> (Duration, Duration, Duration) {
        devices::Progress::recent_latency(self)
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
            key: target.api_key.clone().ok_or_else(|| {
                LoadError::Invalid("an API key is needed: --api-key or SAUTIKIT_API_KEY".into())
            })?,
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

/// Claim `n` numbers and route them to `hooks` (voice callback, events URL) when given; in dev
/// mode a wallet short of their first month is topped up with the `test` provider first.
async fn claim_numbers(
    api: &ApiClient,
    n: usize,
    hooks: Option<(&str, &str)>,
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
        let Some((voice_url, events_url)) = hooks else {
            continue;
        };
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
    let (voice, events) = serve_hooks(listen, app)?;
    Ok((voice, events, hooks))
}

/// Serves `app` (its `/voice` and `/events`) at `listen` on a thread of its own, so that the
/// load test's own work never delays it; returns the two URLs.
fn serve_hooks(listen: SocketAddr, app: Router) -> Result<(String, String), LoadError> {
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
    ))
}

/// `value` a second, more than 0 and at most `max`.
fn per_second(value: f64, flag: &str, what: &str, max: f64) -> Result<(), LoadError> {
    if value > 0.0 && value <= max {
        Ok(())
    } else {
        Err(LoadError::Invalid(format!(
            "{flag} {value}: {what} a second, more than 0 and at most {max}"
        )))
    }
}

/// `value` within `range`.
fn within(
    value: usize,
    flag: &str,
    range: std::ops::RangeInclusive<usize>,
) -> Result<(), LoadError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(LoadError::Invalid(format!(
            "{flag} {value}: {} to {}",
            range.start(),
            range.end()
        )))
    }
}

async fn resolve_server(server: &str) -> Result<SocketAddr, LoadError> {
    tokio::net::lookup_host(server)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| LoadError::Invalid(format!("--server {server}: no address")))
}

fn seconds(value: f64, flag: &str) -> Result<Duration, LoadError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| LoadError::Invalid(format!("{flag} {value}: seconds, ≥ 0")))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// The final table on stdout: the title, a row each, failures by reason, each `(label, counts)`
/// list (`event call.started 100`), the first errors, and the verdict.
fn print_table(
    title: &str,
    rows: &[(&str, String)],
    j: &Value,
    failures: &Value,
    lists: &[(&str, &Value)],
) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n{title}");
    for (name, value) in rows {
        let _ = writeln!(out, "  {name:<18} {value}");
    }
    if let Some(failures) = failures.as_object() {
        for (why, n) in failures {
            let _ = writeln!(out, "  failed: {why:<30} {n}");
        }
    }
    for (label, counts) in lists {
        if let Some(counts) = counts.as_object() {
            for (kind, n) in counts {
                let _ = writeln!(out, "  {label} {kind:<24} {n}");
            }
        }
    }
    if let Some(errors) = j["first_errors"].as_array() {
        for e in errors {
            let _ = writeln!(out, "  error: {}", e.as_str().unwrap_or_default());
        }
    }
    let _ = writeln!(
        out,
        "  RESULT {}",
        if j["pass"] == true { "PASS" } else { "FAIL" }
    );
}

/// A number of the run's JSON (0 when missing).
fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
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
    /// What the latency on the progress line is.
    latency: &'static str,
}

impl Sampler {
    fn new(server: SocketAddr, duration: Duration, rate: f64, latency: &'static str) -> Sampler {
        let target = local_process(server).map(|pid| (pid, procfs::cpu_time(pid)));
        Sampler {
            started: Instant::now(),
            duration,
            rate,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last: (0, 0, Instant::now()),
            target,
            samples: Vec::new(),
            latency,
        }
    }

    fn sample(&mut self, live: &dyn Live) {
        let LiveCounts {
            attempted,
            answered,
            completed,
            failed,
        } = live.counts();
        let now = Instant::now();
        let span = now.duration_since(self.last.2).as_secs_f64().max(1e-3);
        let achieved = attempted.saturating_sub(self.last.0) as f64 / span;
        let failed_now = failed.saturating_sub(self.last.1);
        self.last = (attempted, failed, now);
        let (p50, p99, max) = live.recent_latency();
        let (target_cores, target_rss_mib, target_rss_file_mib) = match self.target.as_mut() {
            Some((pid, cpu)) => {
                let used = procfs::cpu_time(*pid);
                let cores = used.saturating_sub(*cpu).as_secs_f64() / span;
                *cpu = used;
                let status = procfs::Status::read(*pid);
                let mib = |field| {
                    status
                        .as_ref()
                        .and_then(|s| s.kib(field))
                        .map(|k| k as f64 / 1024.0)
                };
                let file = mib("RssFile").zip(mib("RssShmem")).map(|(f, s)| f + s);
                (Some(cores), mib("VmRSS"), file)
            }
            None => (None, None, None),
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
            target_rss_file_mib,
        });
        let target = match (target_cores, target_rss_mib) {
            (Some(c), Some(r)) => format!("  target {c:.2} cores {r:.0} MiB"),
            _ => String::new(),
        };
        let answered = answered
            .map(|a| format!("  answered {a}"))
            .unwrap_or_default();
        let line = format!(
            "{t:6.1}/{:.0} s  offered {offered:.0}/s  achieved {achieved:.0}/s  in flight {}{answered}  completed {completed}  failed {failed}  {} p50 {:.1} ms p99 {:.1} ms{target}",
            self.duration.as_secs_f64(),
            attempted.saturating_sub(completed + failed),
            self.latency,
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
