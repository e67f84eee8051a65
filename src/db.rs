//! Database connection: SQLite (embedded default) or PostgreSQL, chosen by the URL scheme, behind
//! sqlx's `Any` driver so that one set of `$N` queries serves both.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, ConnectOptions, Connection, Executor};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Error)]
pub enum DbError {
    #[error("unsupported database URL {0:?}: use sqlite:// or postgres://")]
    UnsupportedUrl(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Pools for one database. On SQLite, all writes go through a single connection: SQLite allows
/// one writer at a time, and queueing in the pool is far cheaper than `SQLITE_BUSY` retries.
/// Reads use a separate pool (WAL lets readers run beside the writer). On PostgreSQL both are the
/// same pool.
#[derive(Clone)]
pub struct Db {
    pub backend: Backend,
    pub read: AnyPool,
    pub write: AnyPool,
    /// Whether the database is known to be unreachable (see [`Db::watch_health`]).
    pub health: StorageHealth,
}

/// Whether the database is known to be down, as [`Db::watch_health`] last saw it. While it is,
/// the API answers `503 storage.unavailable` and new INVITEs `503` at once, instead of each
/// waiting out the pool's acquire timeout: sqlx retries a refused connection (a stopped
/// PostgreSQL on its own host) until then, taking it for a database that is starting up.
#[derive(Clone, Default)]
pub struct StorageHealth(Arc<AtomicBool>);

impl StorageHealth {
    pub fn is_down(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Returns whether this changed it.
    fn set_down(&self, down: bool) -> bool {
        self.0.swap(down, Ordering::Relaxed) != down
    }
}

/// How often the health of a PostgreSQL database is probed, and how long a probe may take.
pub const HEALTH_PROBE_EVERY: Duration = Duration::from_millis(500);
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Db {
    /// A write transaction. On SQLite it takes the write lock at its start (`BEGIN IMMEDIATE`):
    /// a deferred transaction that reads before it writes fails at once with `database is
    /// locked` when another process's writer commits in between (the busy timeout does not
    /// apply to that upgrade); an immediate one waits its turn. A server has one write
    /// connection; the CLI and tools beside a running server are the other writers.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.write.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.write.begin().await,
        }
    }

    pub async fn connect(url: &str) -> Result<Db, DbError> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl(url.to_owned()));
        };
        match backend {
            Backend::Sqlite => {
                create_sqlite_dir(url)?;
                let url = &sqlite_creating(url);
                let write = sqlite_pool(url, 1, true).await?;
                let read = sqlite_pool(url, 8, false).await?;
                Ok(Db {
                    backend,
                    read,
                    write,
                    health: StorageHealth::default(),
                })
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(32)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?;
                Ok(Db {
                    backend,
                    read: pool.clone(),
                    write: pool,
                    health: StorageHealth::default(),
                })
            }
        }
    }

    pub async fn migrate(&self) -> Result<(), DbError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&self.write).await?;
        Ok(())
    }

    /// SQLite: move WAL checkpoints off the write path. By default the connection whose commit
    /// takes the WAL past 1,000 pages copies them into the database file and syncs it inside that
    /// commit, and every write queued behind it waits (tens of milliseconds, every second or two
    /// under call load). Here the writer never checkpoints; a task checkpoints every `every`
    /// from a read connection in PASSIVE mode, beside the writer. Stops when the pools close.
    ///
    /// A PASSIVE checkpoint copies pages but never starts the log over, and the writer starts it
    /// over only at a moment when no reader is using it — which, under steady reads, never comes:
    /// the log then grows without end (12 GB in 10 minutes at 300 calls/s), and with it the
    /// mapped WAL index, in memory. So once the log holds `restart_frames` pages, the task
    /// checkpoints in RESTART mode at a moment when no reader is on the log and no write is
    /// under way (or, past four times the bound, waiting for them): the next write starts the
    /// log over from its beginning. The file keeps its largest size and is written over, which
    /// spares the truncation and its sync: a RESTART holds writers back 1–6 ms at 300 calls/s
    /// where a TRUNCATE held them 25–38 ms. A no-op on PostgreSQL.
    pub async fn checkpoint_in_background(
        &self,
        every: Duration,
        restart_frames: i64,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, DbError> {
        if self.backend != Backend::Sqlite {
            return Ok(None);
        }
        // The write pool has one connection, never retired for age or idleness: the setting
        // stays. Were it replaced after an error, the new one would checkpoint by itself again,
        // which is only slower.
        self.write.execute("PRAGMA wal_autocheckpoint = 0").await?;
        let read = self.read.clone();
        Ok(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut not_before = std::time::Instant::now();
            while !read.is_closed() {
                tick.tick().await;
                // (busy, pages in the log, pages checkpointed)
                let log = match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .fetch_one(&read)
                    .await
                {
                    Ok(row) => sqlx::Row::try_get::<i64, _>(&row, 1).unwrap_or(0),
                    Err(e) => {
                        if read.is_closed() {
                            break;
                        }
                        tracing::warn!(error = %e, "WAL checkpoint failed");
                        continue;
                    }
                };
                if log < restart_frames {
                    continue;
                }
                // First try at every tick without waiting: it restarts the log at a moment when
                // no reader is on it and no write is under way, and holds writers back only for
                // the copy. Only a log grown well past the bound (readers always on it) is
                // restarted by waiting for them, which holds writers that long.
                let patient = log >= restart_frames.saturating_mul(4);
                if patient && std::time::Instant::now() < not_before {
                    continue;
                }
                let wait = if patient {
                    READERS_WAIT
                } else {
                    Duration::ZERO
                };
                let started = std::time::Instant::now();
                match restart_wal(&read, wait).await {
                    Ok(true) => tracing::debug!(
                        pages = log,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "WAL restarted"
                    ),
                    Ok(false) if !patient => {}
                    // A reader older than the log's end outlasted the wait: writers go on, and
                    // the next patient try waits a while.
                    Ok(false) => {
                        tracing::debug!(pages = log, "WAL not restarted: a reader is still on it");
                        not_before = std::time::Instant::now() + Duration::from_secs(2);
                    }
                    Err(e) if read.is_closed() => {
                        tracing::debug!(error = %e, "WAL checkpoint stopped: closing");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "WAL restart failed"),
                }
            }
        })))
    }

    /// SQLite: bound the memory SQLite allocates, process-wide, to about `bytes` (its soft heap
    /// limit; 0 removes the bound). Beyond it the page caches recycle their pages instead of
    /// growing, so a growing database does not grow the process. A no-op on PostgreSQL.
    pub async fn limit_sqlite_memory(&self, bytes: u64) -> Result<(), DbError> {
        if self.backend != Backend::Sqlite {
            return Ok(());
        }
        // The limit is SQLite's, for the whole process: set once, through any connection.
        // A PRAGMA takes no bound parameters; `bytes` is a number.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA soft_heap_limit = {bytes}"
        )))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// PostgreSQL: probe the database every `every` over a connection of the probe's own,
    /// opened outside the pools (so a refused connection fails at once rather than being
    /// retried), and keep [`Db::health`] up to date. Down after a probe fails the way an
    /// unreachable database does, or after two probes in a row time out; up after a probe
    /// succeeds. A full server (`too many connections`) is not down: the pools have theirs.
    /// Stops when the pools close. `None` on SQLite, a file that cannot go away.
    pub fn watch_health(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if self.backend != Backend::Postgres {
            return None;
        }
        let options = self.read.connect_options();
        let pool = self.read.clone();
        let health = self.health.clone();
        Some(tokio::spawn(async move {
            let mut conn: Option<sqlx::AnyConnection> = None;
            let mut timeouts = 0u32;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !pool.is_closed() {
                tick.tick().await;
                let probe = async {
                    let c = match &mut conn {
                        Some(c) => c,
                        None => conn.insert(options.connect().await?),
                    };
                    c.ping().await
                };
                let down = match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, probe).await {
                    Ok(Ok(())) => {
                        timeouts = 0;
                        false
                    }
                    Ok(Err(e)) => {
                        conn = None;
                        let text = e.to_string();
                        if !is_unreachable(&text) {
                            continue;
                        }
                        if !health.is_down() {
                            tracing::warn!(error = %text, "database unreachable: storage marked down");
                        }
                        true
                    }
                    Err(_) => {
                        conn = None;
                        timeouts += 1;
                        if timeouts < 2 {
                            continue;
                        }
                        if !health.is_down() {
                            tracing::warn!("database probes time out: storage marked down");
                        }
                        true
                    }
                };
                if health.set_down(down) && !down {
                    tracing::info!("database reachable again: storage marked up");
                }
            }
            if let Some(c) = conn {
                let _ = c.close().await;
            }
        }))
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

/// Where sqlx reports a connection that took long to acquire (past 2 s by default).
const SLOW_ACQUIRE_TARGET: &str = "sqlx::pool::acquire";

/// Lets at most one of sqlx's slow-acquire warnings through per `every`; the rest are counted
/// (`sautikit_db_slow_acquires_unlogged_total`). An overloaded writer otherwise logs one per
/// waiting query, tens of thousands a minute, and the logging adds to the overload.
pub struct SlowAcquireGate {
    every: Duration,
    started: std::time::Instant,
    /// Milliseconds after `started` the last one went through, plus one (0: none yet).
    last: std::sync::atomic::AtomicU64,
}

impl SlowAcquireGate {
    pub fn new(every: Duration) -> Self {
        SlowAcquireGate {
            every,
            started: std::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether an event with this target is logged now.
    pub fn pass(&self, target: &str) -> bool {
        use std::sync::atomic::Ordering;
        if target != SLOW_ACQUIRE_TARGET {
            return true;
        }
        let now = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return true;
        }
        metrics::counter!("sautikit_db_slow_acquires_unlogged_total").increment(1);
        false
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for SlowAcquireGate {
    /// Every level passes. Without a hint, the filter it is combined with loses its own (an
    /// `And` of filters has none unless both have one): the global maximum level stays at
    /// TRACE, and every `log` record of the libraries (tungstenite traces each WebSocket frame)
    /// went through the dispatcher only to be dropped there.
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.pass(meta.target())
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // Asked again at every event of sqlx's acquire, once for every other callsite.
        if meta.target() == SLOW_ACQUIRE_TARGET {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::always()
        }
    }
}

/// Which database a connection talks to.
pub fn backend_of(conn: &sqlx::AnyConnection) -> Backend {
    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
        Backend::Sqlite
    } else {
        Backend::Postgres
    }
}

/// How long a RESTART checkpoint of an overgrown log waits for the log's readers.
const READERS_WAIT: Duration = Duration::from_millis(100);

/// A RESTART checkpoint: true when the log was copied whole and the next write starts it over.
/// It holds new writers back while it waits for the log's readers and for a write under way, so
/// it waits `wait` at most (not the connections' 10 s); with no wait it gives up at once when
/// either is there.
async fn restart_wal(read: &AnyPool, wait: Duration) -> Result<bool, sqlx::Error> {
    let mut conn = read.acquire().await?;
    // A PRAGMA takes no bound parameters; the wait is a number.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {}",
        wait.as_millis()
    )))
    .execute(&mut *conn)
    .await?;
    let result = sqlx::query("PRAGMA wal_checkpoint(RESTART)")
        .fetch_one(&mut *conn)
        .await;
    conn.execute("PRAGMA busy_timeout = 10000").await?;
    Ok(sqlx::Row::try_get::<i64, _>(&result?, 0)? == 0)
}

/// `keep`: the one write connection is never retired for age or idleness, so per-connection
/// settings made later (`checkpoint_in_background`) last.
async fn sqlite_pool(url: &str, max: u32, keep: bool) -> Result<AnyPool, DbError> {
    let mut options = AnyPoolOptions::new();
    if keep {
        options = options.max_lifetime(None).idle_timeout(None);
    }
    // No ping before handing out a connection: an embedded database does not drop connections,
    // and the ping was one more round trip to SQLite's worker thread for every transaction.
    let pool = options
        .test_before_acquire(false)
        .max_connections(max)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // WAL: readers never block the writer. synchronous=NORMAL in WAL mode keeps every
                // commit across a process crash (kill -9); only an OS crash can lose the last ones.
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute("PRAGMA synchronous = NORMAL").await?;
                conn.execute("PRAGMA busy_timeout = 10000").await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    Ok(pool)
}

/// A SQLite URL that creates its file when missing (`mode=rwc`), unless it names a mode of its
/// own (`mode=ro` for a read-only copy) or is in memory.
fn sqlite_creating(url: &str) -> String {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let has_mode = query.split('&').any(|p| p.starts_with("mode="));
    if has_mode || path.ends_with(":memory:") {
        return url.to_owned();
    }
    if query.is_empty() {
        format!("{path}?mode=rwc")
    } else {
        format!("{path}?{query}&mode=rwc")
    }
}

/// `sqlite://./sautikit-data/sautikit.db?mode=rwc` → make sure `./sautikit-data` exists.
fn create_sqlite_dir(url: &str) -> Result<(), DbError> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or("");
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    if let Some(dir) = Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|source| DbError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// The default database: a SQLite file under `data_dir`, created if missing.
pub fn default_sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}/sautikit.db?mode=rwc", data_dir.display())
}

/// What a failure looks like when the database cannot be reached at all (stopped, restarting,
/// refusing or cutting connections), as opposed to one statement failing: sqlx's texts for its
/// I/O and pool errors, and PostgreSQL's for shutdown and start-up (57P01, 57P03). TLS failures
/// and a crashed SQLite worker are left out: they are faults to fix, not outages to wait out.
const UNREACHABLE: [&str; 6] = [
    "error communicating with database",
    "pool timed out while waiting for an open connection",
    "attempted to acquire a connection on a closed pool",
    "terminating connection due to administrator command",
    "the database system is starting up",
    "the database system is shutting down",
];

/// Whether a storage failure's text says the database is unreachable: the API answers those
/// `503 storage.unavailable` with `Retry-After` (the SIP side answers `503` likewise), since
/// they pass once the database is back.
pub fn is_unreachable(message: &str) -> bool {
    UNREACHABLE.iter().any(|sign| message.contains(sign))
}

#[cfg(test)]
mod tests {
    /// Pins sqlx's texts: if an upgrade changes them, this fails rather than outages turning
    /// into `500`s.
    #[test]
    fn unreachable_databases_are_told_from_failed_statements() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        for e in [io, sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed] {
            let text = crate::store::storage(e).to_string();
            assert!(super::is_unreachable(&text), "{text}");
        }
        for e in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("x".into()),
        ] {
            let text = crate::store::storage(e).to_string();
            assert!(!super::is_unreachable(&text), "{text}");
        }
    }

    #[test]
    fn sqlite_urls_create_their_file_unless_told_otherwise() {
        assert_eq!(
            super::sqlite_creating("sqlite:///var/lib/s/new.db"),
            "sqlite:///var/lib/s/new.db?mode=rwc"
        );
        assert_eq!(
            super::sqlite_creating("sqlite://x.db?cache=shared"),
            "sqlite://x.db?cache=shared&mode=rwc"
        );
        assert_eq!(
            super::sqlite_creating("sqlite://x.db?mode=ro"),
            "sqlite://x.db?mode=ro"
        );
        assert_eq!(super::sqlite_creating("sqlite::memory:"), "sqlite::memory:");
    }

    use super::*;

    #[test]
    fn slow_acquire_warnings_are_rate_limited() {
        let gate = SlowAcquireGate::new(Duration::from_millis(200));
        assert!(gate.pass("sautikit::registrar"));
        assert!(gate.pass(SLOW_ACQUIRE_TARGET));
        for _ in 0..100 {
            assert!(!gate.pass(SLOW_ACQUIRE_TARGET));
            assert!(gate.pass("sqlx::query"));
        }
        std::thread::sleep(Duration::from_millis(250));
        assert!(gate.pass(SLOW_ACQUIRE_TARGET));
        assert!(!gate.pass(SLOW_ACQUIRE_TARGET));
    }

    /// The writer no longer checkpoints; the background task does, so committed pages reach the
    /// database file without any checkpoint by the writer.
    #[tokio::test]
    async fn wal_is_checkpointed_beside_the_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.db");
        let db = Db::connect(&format!("sqlite://{}?mode=rwc", file.display()))
            .await
            .expect("connect");
        db.write
            .execute("CREATE TABLE t (v TEXT NOT NULL)")
            .await
            .expect("create");
        let task = db
            .checkpoint_in_background(Duration::from_millis(20), i64::MAX)
            .await
            .expect("start")
            .expect("a task on SQLite");
        let row = sqlx::query("PRAGMA wal_autocheckpoint")
            .fetch_one(&db.write)
            .await
            .expect("pragma");
        assert_eq!(sqlx::Row::try_get::<i64, _>(&row, 0).expect("value"), 0);
        let before = std::fs::metadata(&file).expect("db file").len();
        for _ in 0..200 {
            sqlx::query("INSERT INTO t (v) VALUES ($1)")
                .bind("x".repeat(4000))
                .execute(&db.write)
                .await
                .expect("insert");
        }
        // 800 kB committed: in the WAL at once, in the database file once checkpointed.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&file).expect("db file").len() < before + 700_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing was checkpointed into the database file"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        db.close().await;
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task stops when the pools close")
            .expect("no panic");
    }

    /// Past `restart_frames` pages the log starts over (RESTART), even while readers come and
    /// go; PASSIVE checkpoints alone let it grow without end.
    #[tokio::test]
    async fn a_long_wal_starts_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("w.db");
        let wal = dir.path().join("w.db-wal");
        let db = Db::connect(&format!("sqlite://{}?mode=rwc", file.display()))
            .await
            .expect("connect");
        db.write
            .execute("CREATE TABLE t (v TEXT NOT NULL)")
            .await
            .expect("create");
        let task = db
            .checkpoint_in_background(Duration::from_millis(20), 128)
            .await
            .expect("start")
            .expect("a task on SQLite");
        let insert = |n: usize| {
            let write = db.write.clone();
            async move {
                for _ in 0..n {
                    sqlx::query("INSERT INTO t (v) VALUES ($1)")
                        .bind("z".repeat(4000))
                        .execute(&write)
                        .await
                        .expect("insert");
                }
            }
        };
        insert(10).await;
        // A reader whose snapshot ends inside the log: no checkpoint may copy what came after
        // it, so the log cannot start over while it reads, and grows past the bound.
        let mut reader = db.read.begin().await.expect("begin");
        sqlx::query("SELECT COUNT(*) FROM t")
            .fetch_one(&mut *reader)
            .await
            .expect("read");
        let started = std::time::Instant::now();
        insert(500).await;
        // The checkpointer's tries to empty the log wait for this reader 100 ms at most.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "writes were held {:?}",
            started.elapsed()
        );
        reader.rollback().await.expect("end");
        // Readers come and go without a pause, three at a time: there is always one on the log,
        // so the writer never finds a moment to start it over by itself. The checkpointer must:
        // a log started over gets new salts in its header (SQLite's WAL format,
        // bytes 16..24), read here from the file without disturbing SQLite.
        let salt = || {
            let mut header = [0u8; 24];
            std::fs::File::open(&wal)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header))
                .map_or_else(|_| Vec::new(), |()| header[16..].to_vec())
        };
        let before = salt();
        let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let readers: Vec<_> = (0..3u64)
            .map(|i| {
                let (read, reading) = (db.read.clone(), reading.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(3 * i)).await;
                    while reading.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut tx = read.begin().await.expect("begin");
                        sqlx::query("SELECT COUNT(*) FROM t")
                            .fetch_one(&mut *tx)
                            .await
                            .expect("read");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        tx.rollback().await.expect("end");
                    }
                })
            })
            .collect();
        // (A failed patient try during the pinned read backs the next off 2 s.)
        let deadline = std::time::Instant::now() + Duration::from_secs(8);
        let mut rows = 510;
        while salt() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "the log never started over"
            );
            insert(1).await;
            rows += 1;
        }
        reading.store(false, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.await.expect("reader");
        }
        // Written over from its start, the file grows no more.
        let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
        insert(100).await;
        assert!(
            std::fs::metadata(&wal).map_or(0, |m| m.len()) <= size,
            "the log file grew past {size} bytes"
        );
        rows += 100;
        let row = sqlx::query("SELECT COUNT(*) AS n FROM t")
            .fetch_one(&db.read)
            .await
            .expect("count");
        assert_eq!(sqlx::Row::try_get::<i64, _>(&row, "n").expect("n"), rows);
        db.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }

    /// With the soft heap limit, reading a database larger than the limit through every read
    /// connection leaves SQLite's memory near the limit; unbounded, each of the 8 readers would
    /// cache 2 MiB of it.
    #[tokio::test]
    async fn sqlite_memory_stays_near_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("m.db");
        let db = Db::connect(&format!("sqlite://{}?mode=rwc", file.display()))
            .await
            .expect("connect");
        db.limit_sqlite_memory(2 << 20).await.expect("limit");
        let row = sqlx::query("PRAGMA soft_heap_limit")
            .fetch_one(&db.read)
            .await
            .expect("pragma");
        assert_eq!(
            sqlx::Row::try_get::<i64, _>(&row, 0).expect("value"),
            2 << 20
        );
        db.write
            .execute("CREATE TABLE t (v TEXT NOT NULL)")
            .await
            .expect("create");
        let mut tx = db.begin_write().await.expect("begin");
        for _ in 0..3000 {
            sqlx::query("INSERT INTO t (v) VALUES ($1)")
                .bind("y".repeat(4000))
                .execute(&mut *tx)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
        // 12 MB read by 8 connections at once, twice.
        for _ in 0..2 {
            let scans = (0..8)
                .map(|_| sqlx::query("SELECT SUM(LENGTH(v)) AS n FROM t").fetch_one(&db.read));
            for row in futures::future::join_all(scans).await {
                let n: i64 = sqlx::Row::try_get(&row.expect("scan"), "n").expect("n");
                assert_eq!(n, 12_000_000);
            }
        }
        // SAFETY: sqlite3_memory_used reads SQLite's allocation counter; no arguments, no state.
        let used = unsafe { libsqlite3_sys::sqlite3_memory_used() };
        db.limit_sqlite_memory(0).await.expect("unlimit");
        db.close().await;
        assert!(used < 6 << 20, "SQLite holds {} KiB", used >> 10);
    }
}
