//! Test harness: real `sautikit` processes on SQLite or PostgreSQL, driven over HTTP.
#![allow(dead_code)]

pub mod audio;
pub mod baresip;
pub mod caller;
pub mod calls;
pub mod device;
pub mod guide;
pub mod peer;
pub mod proxy;
pub mod receiver;
pub mod store;
pub mod trunk;
pub mod uac;
pub mod voice;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;
use sqlx::Connection;

pub const BIN: &str = env!("CARGO_BIN_EXE_sautikit");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async test body once per backend. PostgreSQL comes from
/// `SAUTIKIT_TEST_POSTGRES_URL` (set by scripts/test.sh); without it the PostgreSQL variant fails
/// when `SAUTIKIT_REQUIRE_POSTGRES=1` and is reported as not run otherwise.
#[macro_export]
macro_rules! on_both_backends {
    ($body:ident) => {
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body($crate::common::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::common::postgres_available() {
                    super::$body($crate::common::Backend::Postgres).await;
                }
            }
        }
    };
}

pub fn postgres_available() -> bool {
    if std::env::var("SAUTIKIT_TEST_POSTGRES_URL").is_ok() {
        return true;
    }
    assert!(
        std::env::var("SAUTIKIT_REQUIRE_POSTGRES").as_deref() != Ok("1"),
        "SAUTIKIT_REQUIRE_POSTGRES=1 but SAUTIKIT_TEST_POSTGRES_URL is not set"
    );
    eprintln!("PostgreSQL variant not run: SAUTIKIT_TEST_POSTGRES_URL is not set");
    false
}

/// A fresh database (a SQLite file in a temp dir, or a new PostgreSQL database) and a data dir.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub data_dir: PathBuf,
    pg_admin_url: Option<String>,
    pg_name: Option<String>,
    _tmp: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        match backend {
            Backend::Sqlite => TestDb {
                backend,
                url: format!("sqlite://{}/sautikit.db?mode=rwc", data_dir.display()),
                data_dir,
                pg_admin_url: None,
                pg_name: None,
                _tmp: tmp,
            },
            Backend::Postgres => {
                let admin = std::env::var("SAUTIKIT_TEST_POSTGRES_URL").expect("postgres url");
                let name = format!("sautikit_t_{}", uuid::Uuid::now_v7().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let _ = conn.close().await;
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                TestDb {
                    backend,
                    url: format!("{base}/{name}"),
                    data_dir,
                    pg_admin_url: Some(admin),
                    pg_name: Some(name),
                    _tmp: tmp,
                }
            }
        }
    }

    /// Runs `sautikit admin …` against this database and returns its one JSON line.
    pub fn admin(&self, args: &[&str]) -> Value {
        let out = self.admin_raw(args);
        assert!(
            out.status.success(),
            "admin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("utf-8");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "admin prints exactly one line: {stdout:?}");
        serde_json::from_str(lines[0]).expect("admin prints JSON")
    }

    pub fn admin_raw(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("admin")
            .args(args)
            .env("SAUTIKIT_DATABASE_URL", &self.url)
            .env("SAUTIKIT_DATA_DIR", &self.data_dir)
            .env("SAUTIKIT_LOG", "warn")
            .output()
            .expect("run sautikit admin")
    }

    /// A workspace with `credit_minor` KES; returns (workspace_id, api_key).
    pub fn workspace(&self, name: &str, credit_minor: i64) -> (String, String) {
        let v = self.admin(&[
            "create-workspace",
            "--name",
            name,
            "--credit-minor",
            &credit_minor.to_string(),
        ]);
        (
            v["workspace_id"].as_str().expect("id").to_owned(),
            v["api_key"].as_str().expect("key").to_owned(),
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let (Some(admin), Some(name)) = (self.pg_admin_url.clone(), self.pg_name.clone()) {
            // Drop is synchronous; do the async clean-up on a thread with its own runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A running `sautikit serve` process.
pub struct Server {
    pub base: String,
    pub stdout: Vec<String>,
    child: Child,
    pub log: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dev,
    Production,
}

impl Server {
    pub fn start(db: &TestDb, mode: Mode) -> Server {
        Self::start_with(db, mode, &[])
    }

    pub fn start_with(db: &TestDb, mode: Mode, env: &[(&str, &str)]) -> Server {
        let log = db
            .data_dir
            .join(format!("server-{}.log", uuid::Uuid::now_v7().simple()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .env("SAUTIKIT_DATABASE_URL", &db.url)
            .env("SAUTIKIT_DATA_DIR", &db.data_dir)
            .env("SAUTIKIT_HTTP_LISTEN", "127.0.0.1:0")
            // Tests run servers side by side: each takes its own SIP port.
            .env("SAUTIKIT_SIP_LISTEN", "127.0.0.1:0")
            .env(
                "SAUTIKIT_MODE",
                if mode == Mode::Dev {
                    "dev"
                } else {
                    "production"
                },
            )
            .env("SAUTIKIT_LOG", "info,sqlx=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAUTIKIT_TEST_LOG: every server's log filter, to look into a test or a bench.
        if let Ok(filter) = std::env::var("SAUTIKIT_TEST_LOG") {
            cmd.env("SAUTIKIT_LOG", filter);
        }
        let mut child = cmd.spawn().expect("spawn sautikit serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        let base = addr.trim().to_owned();
                        lines.push(line);
                        return Server {
                            base,
                            stdout: lines,
                            child,
                            log,
                        };
                    }
                    lines.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("server did not start; stdout {lines:?}\nlog:\n{log}");
                }
            }
        }
    }

    pub fn api(&self, key: &str) -> Api {
        Api::new(&self.base, Some(key))
    }

    pub fn anon(&self) -> Api {
        Api::new(&self.base, None)
    }

    /// SIGKILL: no chance to flush or shut down.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn dev_key(data_dir: &Path) -> String {
    let raw = std::fs::read(data_dir.join("dev-credentials.json")).expect("dev credentials file");
    let v: Value = serde_json::from_slice(&raw).expect("json");
    v["api_key"].as_str().expect("api_key").to_owned()
}

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    /// Asserts the error envelope with this status and code, and returns the message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        let v = self.json();
        let obj = v.as_object().expect("object");
        assert_eq!(obj.len(), 1, "only `error` at top level: {}", self.text);
        let e = v["error"].as_object().expect("error object");
        let keys: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(keys, ["code", "message", "request_id"], "{}", self.text);
        assert_eq!(v["error"]["code"], code, "{}", self.text);
        let rid = v["error"]["request_id"].as_str().expect("request_id");
        assert!(rid.starts_with("req_"), "{rid}");
        v["error"]["message"].as_str().expect("message").to_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

#[derive(Clone)]
pub struct Api {
    pub base: String,
    key: Option<String>,
    client: reqwest::Client,
}

impl Api {
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    pub fn new(base: &str, key: Option<&str>) -> Api {
        // reqwest is built without a default TLS provider (see Cargo.toml): pick ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Api {
            base: base.trim_end_matches('/').to_owned(),
            key: key.map(str::to_owned),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        let mut rb = self.client.request(method, url);
        if let Some(k) = &self.key {
            rb = rb.bearer_auth(k);
        }
        rb
    }

    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.expect("HTTP request");
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        Resp {
            status,
            headers,
            text,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> Resp {
        let mut rb = self.request(reqwest::Method::POST, path);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        self.send(rb).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Resp {
        self.send(self.request(reqwest::Method::PATCH, path).json(&body))
            .await
    }

    /// GET a list and follow `Link: rel="next"` to the end.
    pub async fn get_all(&self, path: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = Some(path.to_owned());
        while let Some(p) = next.take() {
            let r = self.get(&p).await;
            assert_eq!(r.status, 200, "{}", r.text);
            out.extend(r.json().as_array().expect("array").iter().cloned());
            next = r.header("link").and_then(|l| {
                l.split(';').next().map(|u| {
                    u.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                })
            });
        }
        out
    }
}

/// Everything about a workspace's money and numbers, to show that a failed request changed nothing.
pub async fn snapshot(api: &Api) -> Value {
    serde_json::json!({
        "wallet": api.get("/v1/wallet").await.json(),
        "ledger": api.get_all("/v1/wallet/transactions?limit=100").await,
        "numbers": api.get_all("/v1/numbers?limit=100").await,
    })
}

/// Polls `GET path` until `pred` holds on the JSON body. For state that only the API shows
/// (the delivery log); each poll is a real request, bounded by `timeout`.
pub async fn wait_for_json(
    api: &Api,
    path: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let v = api.get(path).await.json();
        if pred(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition on {path} not met within {timeout:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Server {
    /// The SIP address the server printed (`sip listening on …`).
    pub fn sip_addr(&self) -> std::net::SocketAddr {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix("sip listening on "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("the server printed its SIP address")
    }
}

/// A program of the test venv (tests/python/.venv/bin), or `None` (the test does not run) when
/// it is missing and `require` (an environment variable scripts/test.sh sets to `1`) is not set.
pub fn venv_tool(name: &str, require: &str) -> Option<std::path::PathBuf> {
    let bin = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python/.venv/bin")
        .join(name);
    if bin.is_file() {
        return Some(bin);
    }
    assert!(
        std::env::var(require).as_deref() != Ok("1"),
        "{require}=1 but {} is missing (scripts/test.sh installs tests/python/requirements.txt \
         into that venv)",
        bin.display()
    );
    eprintln!(
        "not run: {} is missing (scripts/test.sh installs it)",
        bin.display()
    );
    None
}
