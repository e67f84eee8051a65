//! Command line and configuration: every flag is also an environment variable (DESIGN §9).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Seeds inventory and a `dev` workspace on a fresh database; allows http:// webhooks and the
    /// `test` top-up provider.
    Dev,
    /// https:// webhooks only; no test money.
    Production,
}

#[derive(Debug, Parser)]
#[command(name = "sautikit", version, about = "Programmable voice platform")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parse the command line and environment. A bad value set through the environment is
    /// reported with the variable's name too (clap names only the flag, which the operator may
    /// never have typed).
    pub fn parse_or_exit() -> Cli {
        use clap::CommandFactory;
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        let e = match Cli::try_parse() {
            Ok(cli) => return cli,
            Err(e) => e,
        };
        if matches!(
            e.kind(),
            ErrorKind::InvalidValue | ErrorKind::ValueValidation
        ) && let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg)
        {
            let long = arg
                .trim_start_matches("--")
                .split([' ', '='])
                .next()
                .unwrap_or_default()
                .to_owned();
            let on_command_line = std::env::args().any(|a| {
                a.strip_prefix("--")
                    .is_some_and(|f| f == long || f.starts_with(&format!("{long}=")))
            });
            let command = Cli::command();
            let env = command
                .get_subcommands()
                .flat_map(|c| c.get_arguments())
                .chain(command.get_arguments())
                .find(|a| a.get_long() == Some(long.as_str()))
                .and_then(|a| a.get_env())
                .and_then(|v| v.to_str())
                .map(str::to_owned);
            if let Some(env) = env
                && !on_command_line
                && let Ok(value) = std::env::var(&env)
            {
                let _ = e.print();
                eprintln!("  (the value {value:?} comes from the environment variable {env})");
                std::process::exit(2);
            }
        }
        e.exit()
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (HTTP API and engine) in one process.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(DbArgs),
    /// Operator commands that work on the database directly.
    Admin {
        #[command(flatten)]
        db: DbArgs,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// A test phone: call a number the way a carrier does.
    #[command(subcommand)]
    Phone(crate::phone::PhoneCommand),
    /// Load against a deployment, the local one by default.
    #[command(subcommand)]
    Loadtest(crate::loadtest::Scenario),
}

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// `sqlite://path?mode=rwc` or `postgres://…`; default: SQLite under the data directory.
    #[arg(long, env = "SAUTIKIT_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where the SQLite database and dev credentials live.
    #[arg(long, env = "SAUTIKIT_DATA_DIR", default_value = "./sautikit-data")]
    pub data_dir: PathBuf,
}

impl DbArgs {
    pub fn url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| crate::db::default_sqlite_url(&self.data_dir))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// HTTP API address (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "SAUTIKIT_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    #[arg(long, env = "SAUTIKIT_MODE", value_enum, default_value = "dev")]
    pub mode: Mode,
    /// SQLite: the memory its page caches may grow to together, in MiB (a soft limit: beyond it
    /// SQLite reuses cached pages instead of allocating more, and reads the rest from the
    /// operating system's file cache); 0 lets each of its 9 connections cache 2 MiB.
    #[arg(long, env = "SAUTIKIT_SQLITE_MEMORY_MIB", default_value_t = 8)]
    pub sqlite_memory_mib: u64,
    /// Log format.
    #[arg(long, env = "SAUTIKIT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Multiplies the webhook retry schedule (30 s, 2 min, … 24 h); tests use e.g. 0.001.
    #[arg(long, env = "SAUTIKIT_WEBHOOK_RETRY_SCALE", default_value_t = 1.0)]
    pub webhook_retry_scale: f64,
    /// Internal ranges (CIDRs, comma-separated) webhooks may reach in production, for on-premise
    /// receivers. Loopback, private, link-local and unspecified addresses are refused otherwise.
    #[arg(long, env = "SAUTIKIT_WEBHOOK_ALLOW_CIDRS", value_delimiter = ',')]
    pub webhook_allow_cidrs: Vec<ipnet::IpNet>,
    /// How long a process holds the webhook deliveries it is sending (PostgreSQL: another process
    /// takes them over after a crash once this runs out).
    #[arg(long, env = "SAUTIKIT_WEBHOOK_LEASE_SECS", default_value_t = 60)]
    pub webhook_lease_secs: u64,
    /// SIP address, UDP and TCP on the same port (port 0 picks one; printed as `sip listening on
    /// …`).
    #[arg(long, env = "SAUTIKIT_SIP_LISTEN", default_value = "127.0.0.1:5060")]
    pub sip_listen: SocketAddr,
    /// The SIP domain of addresses of record (`ts_…@DOMAIN` or `+2547…@DOMAIN`) that softphones
    /// register. Default: the SIP listen address's IP. The IP a REGISTER arrives at is always
    /// accepted too.
    #[arg(long, env = "SAUTIKIT_SIP_DOMAIN")]
    pub sip_domain: Option<String>,
    /// Failed SIP logins (REGISTER) from one source address, or for one username, within
    /// `SAUTIKIT_SIP_AUTH_WINDOW_SECS` that ban the source (or lock the username).
    #[arg(long, env = "SAUTIKIT_SIP_AUTH_MAX_FAILURES", default_value_t = 20)]
    pub sip_auth_max_failures: u32,
    #[arg(long, env = "SAUTIKIT_SIP_AUTH_WINDOW_SECS", default_value_t = 60)]
    pub sip_auth_window_secs: u64,
    /// How long a ban or lock lasts.
    #[arg(long, env = "SAUTIKIT_SIP_AUTH_BAN_SECS", default_value_t = 300)]
    pub sip_auth_ban_secs: u64,
    /// Seconds between OPTIONS keepalives to each device registered over UDP; a device that
    /// stops answering loses its binding.
    #[arg(long, env = "SAUTIKIT_SIP_KEEPALIVE_SECS", default_value_t = 30)]
    pub sip_keepalive_secs: u64,
    /// Digest algorithms a SIP login is challenged with, most preferred first, one challenge
    /// header each. Some older softphones (baresip 1.0 with libre 1.1, as Debian 12 ships it)
    /// refuse a whole 401 that holds any SHA-256 challenge: serve them with `MD5`.
    #[arg(long, env = "SAUTIKIT_SIP_DIGEST_ALGORITHMS", value_delimiter = ',',
          default_value = "SHA-256,MD5", value_parser = parse_digest_algorithm)]
    pub sip_digest_algorithms: Vec<sautikit_sip::digest::Algorithm>,
    /// A bridged call (to a device, or a dialled party) whose leg sends no RTP for this many
    /// seconds is ended with `hangup_cause: "media_timeout"`.
    #[arg(long, env = "SAUTIKIT_MEDIA_TIMEOUT_SECS", default_value_t = 60)]
    pub media_timeout_secs: u64,
    /// Where calls to numbers that are not ours go: a SIP URI such as
    /// `sip:carrier.example.com:5060` or `sip:192.0.2.10;transport=tcp`.
    #[arg(long, env = "SAUTIKIT_OUTBOUND_TRUNK")]
    pub outbound_trunk: Option<String>,
    /// Credentials to answer the trunk's `401`/`407` (MD5 or SHA-256 digest).
    #[arg(long, env = "SAUTIKIT_OUTBOUND_TRUNK_USERNAME")]
    pub outbound_trunk_username: Option<String>,
    #[arg(long, env = "SAUTIKIT_OUTBOUND_TRUNK_PASSWORD", hide_env_values = true)]
    pub outbound_trunk_password: Option<String>,
    /// Calls a workspace may place through the API per second (a token bucket as deep as one
    /// second's worth); past it `429 calls.rate_limited` with `Retry-After`.
    #[arg(long, env = "SAUTIKIT_CALLS_PER_SECOND", default_value_t = 10)]
    pub calls_per_second: u32,
    /// Live calls placed through the API a workspace may hold; past it
    /// `429 calls.concurrency_exceeded`.
    #[arg(long, env = "SAUTIKIT_MAX_LIVE_API_CALLS", default_value_t = 100)]
    pub max_live_api_calls: u32,
    /// Seconds a number's registered devices ring before the caller gets `480` (`no_answer`).
    #[arg(long, env = "SAUTIKIT_DEVICE_RING_SECS", default_value_t = 30)]
    pub device_ring_secs: u64,
    /// Shortest registration accepted (`423 Interval Too Brief` below it).
    #[arg(long, env = "SAUTIKIT_SIP_MIN_EXPIRES", default_value_t = 60)]
    pub sip_min_expires: u32,
    /// Longest registration granted (longer requests are clamped), also the default.
    #[arg(long, env = "SAUTIKIT_SIP_MAX_EXPIRES", default_value_t = 3600)]
    pub sip_max_expires: u32,
    /// SIP timer T1 in milliseconds (RFC 3261 §17: the first retransmission interval; a client
    /// transaction gives up after 64 × T1).
    #[arg(long, env = "SAUTIKIT_SIP_T1_MS", default_value_t = 500)]
    pub sip_t1_ms: u64,
    /// RTP port range, inclusive (`first-last`); even ports carry RTP.
    #[arg(long, env = "SAUTIKIT_RTP_PORTS", default_value = "20000-29999", value_parser = parse_port_range)]
    pub rtp_ports: (u16, u16),
    /// INVITEs a second one source address may send before it gets `503`; a second `503` within
    /// a minute, or twice this rate, bans the source.
    #[arg(long, env = "SAUTIKIT_SIP_RATE_INVITE", default_value_t = 20)]
    pub sip_rate_invite: u32,
    /// REGISTERs a second per source address, as for INVITEs.
    #[arg(long, env = "SAUTIKIT_SIP_RATE_REGISTER", default_value_t = 20)]
    pub sip_rate_register: u32,
    /// Other requests (OPTIONS, BYE, …) a second per source address, as for INVITEs.
    #[arg(long, env = "SAUTIKIT_SIP_RATE_OTHER", default_value_t = 50)]
    pub sip_rate_other: u32,
    /// Each kind of request a second from a carrier (`SAUTIKIT_CARRIER_ALLOW`), which is told
    /// `503` past it but never banned.
    #[arg(long, env = "SAUTIKIT_SIP_RATE_CARRIER", default_value_t = 5_000)]
    pub sip_rate_carrier: u32,
    /// How long a banned source is ignored, in seconds.
    #[arg(long, env = "SAUTIKIT_SIP_BAN_SECS", default_value_t = 300)]
    pub sip_ban_secs: u64,
    /// Carrier addresses (CIDRs, comma-separated) whose INVITEs are taken; others get `403`.
    /// Default: 127.0.0.0/8 and ::1 in dev mode, nobody in production.
    #[arg(long, env = "SAUTIKIT_CARRIER_ALLOW", value_delimiter = ',')]
    pub carrier_allow: Vec<ipnet::IpNet>,
    /// The address written into SDP answers and bound for RTP (default: the SIP address's IP, or
    /// 127.0.0.1 when SIP listens on every address).
    #[arg(long, env = "SAUTIKIT_MEDIA_IP")]
    pub media_ip: Option<std::net::IpAddr>,
    /// Run the media thread with real-time scheduling (SCHED_RR), as media servers do, so the
    /// 20 ms frames leave on time when the machine is busy. Needs CAP_SYS_NICE (or root); without
    /// it the engine logs why and runs at normal priority.
    #[arg(long, env = "SAUTIKIT_MEDIA_REALTIME", default_value_t = true, action = clap::ArgAction::Set)]
    pub media_realtime: bool,
    /// Threads that pace outgoing RTP, each owning a share of the calls (0: one per core, at most
    /// four).
    #[arg(long, env = "SAUTIKIT_MEDIA_THREADS", default_value_t = 0)]
    pub media_threads: usize,
    /// The engine's own share of a call's setup (INVITE to final response, less the voice
    /// callback) that counts as fast. When even the fastest setups of a 25 ms window are slower,
    /// a share of new INVITEs is answered `503` with `Retry-After` until they are fast again.
    #[arg(long, env = "SAUTIKIT_SETUP_TARGET_MS", default_value_t = 20)]
    pub setup_target_ms: u64,
    /// Calls between INVITE and final response the engine takes on at most, whatever their
    /// speed; INVITEs beyond it are answered `503` with `Retry-After`.
    #[arg(long, env = "SAUTIKIT_MAX_CALL_SETUPS", default_value_t = 1_000)]
    pub max_call_setups: usize,
    /// Live calls the engine takes on; INVITEs beyond it are answered `503`.
    #[arg(long, env = "SAUTIKIT_MAX_CALLS", default_value_t = 10_000)]
    pub max_calls: usize,
    /// PostgreSQL with several engines: an engine whose heartbeat is this many seconds old is
    /// taken for dead, and its live calls are closed as `failed` (`engine.restart`).
    #[arg(long, env = "SAUTIKIT_CALL_ORPHAN_SECS", default_value_t = 30)]
    pub call_orphan_secs: u64,
    /// How often the scheduler looks for due work (renewals, suspensions, releases), in seconds.
    #[arg(long, env = "SAUTIKIT_SCHEDULER_SECS", default_value_t = 60)]
    pub scheduler_secs: u64,
    /// A number suspended for an unpaid renewal is released after this many days still unpaid.
    #[arg(long, env = "SAUTIKIT_SUSPENDED_RELEASE_DAYS", default_value_t = 30)]
    pub suspended_release_days: u32,
    /// Dev mode only: the engine's clock starts at this RFC 3339 instant and runs from there, so
    /// that a claim can be made "on Jan 31" and renewals tried against it. Never in production.
    #[arg(long, env = "SAUTIKIT_DEV_CLOCK_START")]
    pub dev_clock_start: Option<String>,
    /// The base URL customers reach the API at (`https://api.example.com`), used in recording
    /// download URLs. Default: `http://` and the HTTP address as bound.
    #[arg(long, env = "SAUTIKIT_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,
}

/// An absolute http(s) URL without query or fragment; returned without a trailing `/`.
pub fn parse_public_url(s: &str) -> Result<String, String> {
    let u = url::Url::parse(s.trim()).map_err(|e| format!("not a URL ({e}): {s:?}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(format!("expected an http:// or https:// URL, got {s:?}"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!(
            "the public URL takes no query or fragment, got {s:?}"
        ));
    }
    Ok(u.as_str().trim_end_matches('/').to_owned())
}

/// `SHA-256` or `MD5`.
pub fn parse_digest_algorithm(s: &str) -> Result<sautikit_sip::digest::Algorithm, String> {
    sautikit_sip::digest::Algorithm::from_token(s)
        .ok_or_else(|| format!("expected SHA-256 or MD5, got {s:?}"))
}

/// `20000-29999` → (20000, 29999): at least two ports, first ≤ last.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("expected FIRST-LAST, got {s:?}"))?;
    let first: u16 = a.trim().parse().map_err(|_| format!("bad port {a:?}"))?;
    let last: u16 = b.trim().parse().map_err(|_| format!("bad port {b:?}"))?;
    if first == 0 || last <= first {
        return Err(format!(
            "the range must hold at least two ports above 0, got {first}-{last}"
        ));
    }
    Ok((first, last))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a workspace with a wallet; prints one JSON line with its API key and webhook secret.
    CreateWorkspace {
        #[arg(long)]
        name: String,
        /// Opening balance in minor units.
        #[arg(long, default_value_t = 0)]
        credit_minor: i64,
        #[arg(long, default_value = "KES")]
        currency: String,
    },
    /// Credit a workspace's wallet (an operator adjustment, recorded in the ledger).
    Credit {
        #[arg(long)]
        workspace: String,
        #[arg(long)]
        amount_minor: i64,
    },
    /// Add consecutive numbers to the inventory (existing numbers are left alone).
    SeedInventory {
        #[arg(long, default_value = "KE")]
        country: String,
        #[arg(long)]
        count: u64,
        /// First number in E.164 (default +254700000001).
        #[arg(long, default_value = "+254700000001")]
        start: String,
        #[arg(long, default_value_t = 10000)]
        monthly_price_minor: i64,
        #[arg(long, default_value_t = 300)]
        outbound_per_min_minor: i64,
        #[arg(long, default_value_t = 0)]
        inbound_per_min_minor: i64,
        #[arg(long, default_value = "KES")]
        currency: String,
    },
    /// Run the work due at a given time (renewals, suspensions, releases of unpaid numbers), as
    /// the scheduler does: after downtime, to catch up; in tests, to move through months. Prints
    /// one JSON line with what was done; each batch is committed on its own, and the work is safe
    /// to run again or beside running engines.
    RunDue {
        /// The time to run at (RFC 3339); default now.
        #[arg(long)]
        at: Option<String>,
        /// Numbers per transaction.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[arg(long, env = "SAUTIKIT_SUSPENDED_RELEASE_DAYS", default_value_t = 30)]
        suspended_release_days: u32,
        /// Print a JSON line on stderr after each committed batch.
        #[arg(long)]
        progress: bool,
    },
}
