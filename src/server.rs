//! `sautikit serve`: storage, the actor tree and the HTTP API in one process.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use dashmap::DashMap;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sautikit_actors::calls::trunk::Trunk;
use sautikit_actors::clock::{Clock, ShiftedClock, SystemClock};
use sautikit_actors::scheduler::SchedulerArgs;

use crate::renewals::Renewals;
use sautikit_actors::admission::Admission;
use sautikit_actors::{Engine, RegistrarSetup, VoiceSetup};
use sautikit_sip::auth::FailureLimits;
use sautikit_sip::registrar::BindingLimits;
use sautikit_sip::transaction::{Peer, Timers, Transport};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::config::{Mode, ServeArgs};
use crate::db::{Backend, Db, DbError};
use crate::store::{SeedInventory, SqlStore};
use crate::webhooks::sender::{AddressPolicy, HttpSender};
use sautikit_actors::events::{EventsArgs, EventsConfig};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("dev bootstrap failed: {0}")]
    Bootstrap(String),
    #[error(transparent)]
    Engine(#[from] sautikit_actors::EngineError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid setting: {0}")]
    Config(String),
    #[error(transparent)]
    Sender(#[from] crate::webhooks::sender::SenderError),
    #[error(transparent)]
    Storage(#[from] sautikit_actors::store::StorageError),
}

/// What the dev workspace's secrets are, kept beside the database so every start can print them
/// (the database only has a hash of the API key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevCredentials {
    pub workspace_id: String,
    pub api_key: String,
    pub webhook_secret: String,
}

const DEV_CREDENTIALS_FILE: &str = "dev-credentials.json";
/// How many numbers a fresh dev database gets.
pub const DEV_INVENTORY_COUNT: u64 = 200;
/// KES 1,000.00.
pub const DEV_CREDIT_MINOR: i64 = 100_000;

pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

async fn dev_bootstrap(
    store: &SqlStore,
    data_dir: &Path,
) -> Result<Option<DevCredentials>, ServeError> {
    let path = data_dir.join(DEV_CREDENTIALS_FILE);
    let boot = |e: &dyn std::fmt::Display| ServeError::Bootstrap(e.to_string());
    if store.inventory_count().await.map_err(|e| boot(&e))? == 0 {
        let now = Utc::now();
        store
            .seed_inventory(
                &SeedInventory {
                    country: "KE".into(),
                    currency: "KES".into(),
                    count: DEV_INVENTORY_COUNT,
                    start: 254_700_000_001,
                    monthly_price_minor: 10_000,
                    inbound_per_min_minor: 0,
                    outbound_per_min_minor: 300,
                    guide_ids: true,
                },
                now,
            )
            .await
            .map_err(|e| boot(&e))?;
        let ws = store
            .create_workspace("dev", "KES", DEV_CREDIT_MINOR, now)
            .await
            .map_err(|e| boot(&e))?;
        let creds = DevCredentials {
            workspace_id: ws.workspace_id,
            api_key: ws.api_key,
            webhook_secret: ws.webhook_secret,
        };
        std::fs::create_dir_all(data_dir).map_err(|e| boot(&e))?;
        let json = serde_json::to_string_pretty(&creds).map_err(|e| boot(&e))?;
        write_private(&path, json.as_bytes()).map_err(|e| boot(&e))?;
        info!(workspace_id = %creds.workspace_id, "seeded dev inventory and workspace");
        return Ok(Some(creds));
    }
    match std::fs::read(&path) {
        Ok(raw) => match serde_json::from_slice::<DevCredentials>(&raw) {
            Ok(c)
                if store
                    .workspace_exists(&c.workspace_id)
                    .await
                    .unwrap_or(false) =>
            {
                Ok(Some(c))
            }
            _ => Ok(None),
        },
        Err(_) => Ok(None),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(data)
}

fn print_banner(addr: &std::net::SocketAddr, mode: Mode, dev: Option<&DevCredentials>) {
    let mode_name = if mode == Mode::Dev {
        "dev"
    } else {
        "production"
    };
    println!("Sautikit {} ({mode_name} mode)", env!("CARGO_PKG_VERSION"));
    if let Some(c) = dev {
        println!();
        println!("  workspace:       dev ({})", c.workspace_id);
        println!("  API key:         {}", c.api_key);
        println!("  webhook secret:  {}", c.webhook_secret);
        println!();
        println!("  export SAUTIKIT_API_KEY={}", c.api_key);
        println!(
            "  curl -s \"http://{addr}/v1/numbers/available?country=KE&currency=KES\" \\\n    -H \"Authorization: Bearer $SAUTIKIT_API_KEY\" | jq '.[0:3]'"
        );
        println!();
    } else if mode == Mode::Dev {
        println!(
            "  (no dev credentials on file: create a workspace with `sautikit admin create-workspace`)"
        );
    }
    // Tests and scripts read this line to find the port.
    println!("listening on http://{addr}");
}

pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    let db = Db::connect(&args.db.url()).await?;
    db.limit_sqlite_memory(args.sqlite_memory_mib.saturating_mul(1 << 20))
        .await?;
    let health_watch = db.watch_health(crate::db::HEALTH_PROBE_EVERY);
    db.migrate().await?;
    let store = SqlStore::new(db.clone());
    let dev = if args.mode == Mode::Dev {
        dev_bootstrap(&store, &args.db.data_dir).await?
    } else {
        None
    };
    if !(args.webhook_retry_scale.is_finite() && args.webhook_retry_scale >= 0.0) {
        return Err(ServeError::Config(
            "SAUTIKIT_WEBHOOK_RETRY_SCALE must be a non-negative number".into(),
        ));
    }
    if db.backend == Backend::Sqlite {
        // SQLite has one process: leases left by a crash belong to nobody.
        let freed = store.release_all_leases().await?;
        if freed > 0 {
            info!(freed, "released webhook leases left by the previous run");
        }
    }
    let clock: Arc<dyn Clock> = match &args.dev_clock_start {
        None => Arc::new(SystemClock),
        Some(start) if args.mode == Mode::Dev => {
            let start = crate::time::from_db(start)
                .map_err(|e| ServeError::Config(format!("SAUTIKIT_DEV_CLOCK_START: {e}")))?;
            Arc::new(ShiftedClock::starting_at(start))
        }
        Some(_) => {
            return Err(ServeError::Config(
                "SAUTIKIT_DEV_CLOCK_START is for dev mode only".into(),
            ));
        }
    };
    let sender = HttpSender::new(AddressPolicy {
        refuse_internal: args.mode == Mode::Production,
        allow: args.webhook_allow_cidrs.clone(),
    })?;
    let events = EventsArgs {
        outbox: Arc::new(store.clone()),
        sender: Arc::new(sender),
        clock: clock.clone(),
        config: EventsConfig {
            retry_scale: args.webhook_retry_scale,
            lease: Duration::from_secs(args.webhook_lease_secs.max(4)),
            ..EventsConfig::default()
        },
        committed: store.committed.clone(),
    };
    // Bound before the engine starts: recording links and `RecordingUrl` name this address.
    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: args.http_listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr()?;
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    // Recording downloads: the base URL put in download links, and where the files are.
    store.set_recordings(crate::recordings::RecordingsConfig {
        public_url: public_url.clone(),
        data_dir: args.db.data_dir.clone(),
    });
    let policy = AddressPolicy {
        refuse_internal: args.mode == Mode::Production,
        allow: args.webhook_allow_cidrs.clone(),
    };
    let callback = crate::callback::HttpCallbackClient::new(
        policy.clone(),
        sautikit_actors::callback::CALLBACK_TIMEOUT,
    )
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let voice = VoiceSetup {
        store: Arc::new(store.clone()),
        callback: Arc::new(callback),
        sip_listen: args.sip_listen,
        carrier_allow: carrier_allow(&args),
        rtp_ports: args.rtp_ports,
        media_ip: media_ip(&args),
        media_realtime: args.media_realtime,
        media_threads: media_threads(&args),
        single_process: db.backend == Backend::Sqlite,
        orphan_after: Duration::from_secs(args.call_orphan_secs.max(1)),
        timers: Timers {
            t1: Duration::from_millis(args.sip_t1_ms.clamp(10, 10_000)),
            ..Timers::default()
        },
        admission: Admission {
            target: Duration::from_millis(args.setup_target_ms.max(1)),
            max_setups: args.max_call_setups.max(1),
            max_calls: args.max_calls.max(1),
        },
        flood: sautikit_actors::flood::FloodLimits {
            invite: args.sip_rate_invite.max(1),
            register: args.sip_rate_register.max(1),
            other: args.sip_rate_other.max(1),
            carrier: args.sip_rate_carrier.max(1),
            ban: Duration::from_secs(args.sip_ban_secs),
        },
        synth: synthesizer(&args.db.data_dir),
        audio: Arc::new(
            crate::play::HttpAudioFetcher::new(
                policy.clone(),
                args.db.data_dir.join("play-cache"),
                crate::play::PlayLimits::default(),
            )
            .map_err(|e| ServeError::Config(e.to_string()))?,
        ),
        data_dir: args.db.data_dir.clone(),
        public_url,
        media_timeout: Duration::from_secs(args.media_timeout_secs.max(1)),
        ring_timeout: Duration::from_secs(args.device_ring_secs.max(1)),
        trunk: outbound_trunk(&args).await?,
        dial_policy: policy.clone(),
        streams: sautikit_actors::streaming::StreamSettings {
            require_tls: args.mode == Mode::Production,
            policy: policy.clone(),
            tls: Some(Arc::new(
                crate::webhooks::sender::tls_client_config()
                    .map_err(|e| ServeError::Config(e.to_string()))?,
            )),
        },
        registrar: RegistrarSetup {
            store: Arc::new(store.clone()),
            domain: args
                .sip_domain
                .clone()
                .unwrap_or_else(|| args.sip_listen.ip().to_string()),
            failures: FailureLimits {
                max_failures: args.sip_auth_max_failures.max(1),
                window: Duration::from_secs(args.sip_auth_window_secs.max(1)),
                ban: Duration::from_secs(args.sip_auth_ban_secs),
            },
            bindings: BindingLimits {
                default_expires: args.sip_max_expires.max(1),
                max_expires: args.sip_max_expires.max(1),
                min_expires: args.sip_min_expires.clamp(1, args.sip_max_expires.max(1)),
                ..BindingLimits::default()
            },
            algorithms: {
                let mut algs = args.sip_digest_algorithms.clone();
                algs.dedup();
                algs
            },
            keepalive_every: Duration::from_secs(args.sip_keepalive_secs.max(1)),
            max_pending_registers: sautikit_actors::registrar::MAX_PENDING_REGISTERS,
        },
    };
    let engine = Arc::new(
        Engine::start_full(
            Arc::new(store.clone()),
            clock.clone(),
            Some(events),
            Some(voice),
            Some(SchedulerArgs {
                work: Arc::new(Renewals::for_engine(
                    store.clone(),
                    args.suspended_release_days,
                )),
                clock: clock.clone(),
                every: Duration::from_secs(args.scheduler_secs.max(1)),
                numbers: None,
            }),
        )
        .await?,
    );
    if let Some(sip) = engine.sip_addr() {
        // Tests and scripts read this line to find the SIP port.
        println!("sip listening on {sip} (udp, tcp)");
        info!(%sip, "SIP listening");
    }
    let state = AppState {
        store: store.clone(),
        engine: engine.clone(),
        clock,
        mode: args.mode,
        metrics: metrics_handle(),
        auth_cache: Arc::new(DashMap::new()),
        openapi: Arc::default(),
        placing: Arc::new(api::placing::Placing::new(
            args.calls_per_second,
            args.max_live_api_calls,
        )),
    };
    let app = api::router(state);
    print_banner(&addr, args.mode, dev.as_ref());
    info!(%addr, mode = ?args.mode, "HTTP API listening");

    let purge_store = store.clone();
    let purge = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            if let Err(e) = purge_store.idempotency_purge(Utc::now()).await {
                warn!(error = %e, "idempotency purge failed");
            }
        }
    });

    // 16,384 pages: the log starts over at 64 MiB.
    let checkpointer = db
        .checkpoint_in_background(Duration::from_millis(250), 16_384)
        .await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    info!("shutting down");
    purge.abort();
    if let Some(c) = checkpointer {
        c.abort();
    }
    if let Some(h) = health_watch {
        h.abort();
    }
    if let Ok(engine) = Arc::try_unwrap(engine) {
        engine.stop().await;
    }
    db.close().await;
    Ok(())
}

/// espeak-ng behind its cache. Without the program the server still runs (`cargo run` needs
/// nothing else): every `say` then fails its call with `tts.failed`, and the log says why.
fn synthesizer(data_dir: &Path) -> Arc<dyn sautikit_actors::synth::Synthesizer> {
    match crate::tts::EspeakSynthesizer::new(data_dir.join("tts-cache")) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(error = %e, "text to speech is unavailable: `say` will fail calls with tts.failed");
            Arc::new(NoSynthesizer(e))
        }
    }
}

struct NoSynthesizer(sautikit_actors::synth::SynthError);

#[async_trait::async_trait]
impl sautikit_actors::synth::Synthesizer for NoSynthesizer {
    async fn synthesize(
        &self,
        _: &sautikit_actors::synth::SpeechRequest,
    ) -> Result<sautikit_actors::synth::Audio, sautikit_actors::synth::SynthError> {
        Err(self.0.clone())
    }
}

/// `SAUTIKIT_OUTBOUND_TRUNK`, resolved once at start.
async fn outbound_trunk(args: &ServeArgs) -> Result<Option<Trunk>, ServeError> {
    let Some(text) = args.outbound_trunk.as_deref() else {
        return Ok(None);
    };
    let bad = |why: &str| ServeError::Config(format!("SAUTIKIT_OUTBOUND_TRUNK {text:?}: {why}"));
    let uri = sautikit_sip::rsip::Uri::try_from(text.trim()).map_err(|_| bad("not a SIP URI"))?;
    let host = uri.host_with_port.host.to_string();
    let port = uri.host_with_port.port.map(|p| *p.value()).unwrap_or(5060);
    let transport = if text.to_ascii_lowercase().contains("transport=tcp") {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("the host does not resolve"))?;
    let host_port = match uri.host_with_port.port {
        Some(_) => format!("{host}:{port}"),
        None => host,
    };
    Ok(Some(Trunk {
        peer: Peer { addr, transport },
        host: host_port,
        username: args.outbound_trunk_username.clone(),
        password: args.outbound_trunk_password.clone(),
    }))
}

fn carrier_allow(args: &ServeArgs) -> Vec<ipnet::IpNet> {
    if !args.carrier_allow.is_empty() {
        return args.carrier_allow.clone();
    }
    match args.mode {
        Mode::Dev => ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
        Mode::Production => {
            warn!("SAUTIKIT_CARRIER_ALLOW is empty: every INVITE will be refused with 403");
            Vec::new()
        }
    }
}

/// As configured, or one per core up to four (each sends ~100,000 packets/s within its budget).
fn media_threads(args: &ServeArgs) -> usize {
    if args.media_threads > 0 {
        return args.media_threads;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

fn media_ip(args: &ServeArgs) -> std::net::IpAddr {
    args.media_ip.unwrap_or_else(|| {
        let ip = args.sip_listen.ip();
        if ip.is_unspecified() {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        } else {
            ip
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
