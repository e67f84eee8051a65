//! Harness code shared by the load benchmarks (`calls`, `registrations`, `bridge`, `placed`,
//! `streams`): settings from the environment, times and percentiles, a SIP port for the engine,
//! HTTP receivers on threads of their own, SIP credentials inserted straight into the database, digest helpers, and what the
//! engine's process does and uses (its log in brief, RSS samples, busiest threads, UDP drops).
//! Each bench includes it with `mod harness;` beside `tests/common` (`mod common;`).
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use sautikit_sip::digest::{Algorithm, ha1};
use tokio::sync::watch;

use crate::common::uac::{cpu_time, quantile, status_kib};
use crate::common::{Backend, Server};

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Wall-clock nanoseconds since the epoch: the clock of the kernel's receive timestamps
/// (`SO_TIMESTAMPNS`), so send times taken here compare with arrival times.
#[allow(unused_imports)]
pub use sautikit::loadtest::trunk::wall_ns;

/// p50, p99 and max of sorted samples.
pub fn p50_p99_max(sorted: &[Duration]) -> [Duration; 3] {
    [
        quantile(sorted, 0.5),
        quantile(sorted, 0.99),
        quantile(sorted, 1.0),
    ]
}

pub fn fmt3(v: [Duration; 3]) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(v[0]),
        ms(v[1]),
        ms(v[2])
    )
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[allow(unused_imports)] // not every bench answers challenges
pub use sautikit::loadtest::devices::{auth_param, sha256_hex};

pub fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Sqlite => "SQLite",
        Backend::Postgres => "PostgreSQL",
    }
}

/// A port free for both UDP and TCP (the engine binds both on the same number).
pub fn sip_listen() -> String {
    (0..100)
        .find_map(|_| {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            let addr = tcp.local_addr().ok()?;
            std::net::UdpSocket::bind(addr).ok()?;
            Some(addr.to_string())
        })
        .unwrap_or_else(|| "127.0.0.1:0".into())
}

/// Serves `app` on 127.0.0.1 from a thread with its own single-threaded runtime (the receivers
/// share the machine with the engine: keep them lean); returns its address.
pub fn serve_on_own_thread(app: Router) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            // tokio's listener: an accept backlog of 1024 (std's 128 overflows when the engine
            // opens its connections at once).
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let _ = tx.send(listener.local_addr().expect("addr"));
            let _ = axum::serve(listener, app).await;
        });
    });
    rx.recv().expect("address")
}

/// The server's log in brief: its line count and the five most frequent kinds of line (level,
/// target and the start of the message), ANSI colours stripped.
pub fn server_log_excerpt(server: &Server) -> String {
    let raw = server.log_text();
    // Strip ANSI colour codes.
    let mut log = String::with_capacity(raw.len());
    let mut in_esc = false;
    for ch in raw.chars() {
        match (in_esc, ch) {
            (false, '\u{1b}') => in_esc = true,
            (true, 'm') => in_esc = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    let lines: Vec<&str> = log.lines().collect();
    let n = lines.len();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        // Group by level, target and the start of the message.
        let key: String = l
            .split_whitespace()
            .skip(1)
            .take(9)
            .collect::<Vec<_>>()
            .join(" ");
        *kinds.entry(key).or_default() += 1;
    }
    let mut top: Vec<(String, usize)> = kinds.into_iter().collect();
    top.sort_by_key(|t| Reverse(t.1));
    let mut out = format!("{n} log lines");
    for (k, c) in top.iter().take(5) {
        out.push_str(&format!("\n      {c} × {k}"));
    }
    out
}

/// Samples a process's RSS every `every` until told to stop; returns samples in KiB.
pub fn sample_rss(
    pid: u32,
    every: Duration,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<Vec<u64>>) {
    let (tx, mut rx) = watch::channel(false);
    let h = tokio::spawn(async move {
        let mut out = vec![status_kib(pid, "VmRSS")];
        loop {
            tokio::select! {
                _ = rx.changed() => break,
                () = tokio::time::sleep(every) => out.push(status_kib(pid, "VmRSS")),
            }
        }
        out.push(status_kib(pid, "VmRSS"));
        out
    });
    (tx, h)
}

/// Busiest server threads over an interval: (name, share of one core).
pub fn thread_delta(
    before: &[(String, Duration)],
    after: &[(String, Duration)],
    wall: Duration,
) -> String {
    let mut rows: Vec<(String, f64)> = after
        .iter()
        .map(|(n, t)| {
            let b = before
                .iter()
                .find(|(m, _)| m == n)
                .map(|(_, t)| *t)
                .unwrap_or_default();
            (
                n.clone(),
                t.saturating_sub(b).as_secs_f64() / wall.as_secs_f64(),
            )
        })
        .filter(|(_, c)| *c >= 0.01)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows.iter()
        .take(8)
        .map(|(n, c)| format!("{n} {:.0}%", c * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Datagrams dropped so far by the IPv4 UDP sockets bound to these ports (`/proc/net/udp`, the
/// last column: receive buffer full).
pub fn udp_socket_drops(ports: &[u16]) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            ports
                .contains(&port)
                .then(|| f.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// UDP receive-buffer drops on this machine so far (`/proc/net/snmp`, all sockets).
pub fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let lines: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    if lines.len() < 2 {
        return 0;
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    names
        .iter()
        .position(|n| *n == "RcvbufErrors")
        .and_then(|i| values.get(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A device's credential as inserted: its username and SHA-256 HA1 (user:workspace:password).
pub struct Credential {
    pub user: String,
    pub ha1_sha256: String,
}

/// Inserts `count` active SIP credentials straight into `sip_credentials` (the API hashes each
/// password with Argon2, tens of ms each): credential `g` is `<prefix><g as 7 hex digits>` on
/// number `numbers[g % numbers.len()]`, with both HA1s from `sautikit_sip::digest::ha1` and a
/// placeholder where the Argon2 hash would be (the registrar uses the HA1s).
pub async fn insert_credentials(
    store: &sautikit::db::Db,
    workspace_id: &str,
    numbers: &[String],
    count: usize,
    prefix: &str,
) -> Vec<Credential> {
    let now = sautikit::time::to_db(chrono::Utc::now());
    let mut out = Vec::with_capacity(count);
    let mut tx = store.write.begin().await.expect("begin");
    for chunk_start in (0..count).step_by(100) {
        let chunk_end = (chunk_start + 100).min(count);
        let mut sql = String::from(
            "INSERT INTO sip_credentials (id, workspace_id, number_id, label, username, \
             password_hash, ha1_md5, ha1_sha256, status, created_at, updated_at) VALUES ",
        );
        let mut binds: Vec<String> = Vec::with_capacity(8 * (chunk_end - chunk_start));
        for g in chunk_start..chunk_end {
            let user = format!("{prefix}{g:07x}");
            let password = format!("bench-{g}-{}", uuid::Uuid::now_v7().simple());
            let md5 = ha1(Algorithm::Md5, &user, workspace_id, &password);
            let sha = ha1(Algorithm::Sha256, &user, workspace_id, &password);
            let k = binds.len();
            if g > chunk_start {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, 'bench placeholder: registrar uses HA1', ${}, ${}, \
                 'active', ${}, ${})",
                k + 1,
                k + 2,
                k + 3,
                k + 4,
                k + 5,
                k + 6,
                k + 7,
                k + 8,
                k + 8
            ));
            binds.extend([
                uuid::Uuid::now_v7().to_string(),
                workspace_id.to_owned(),
                numbers[g % numbers.len()].clone(),
                format!("bench {g}"),
                user.clone(),
                md5,
                sha.clone(),
                now.clone(),
            ]);
            out.push(Credential {
                user,
                ha1_sha256: sha,
            });
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(b);
        }
        q.execute(&mut *tx).await.expect("insert credentials");
    }
    tx.commit().await.expect("commit credentials");
    out
}

/// Claims the first `n` available inventory numbers through the API, 16 at a time; returns each
/// claimed number's id and its E.164 digits without `+`, in inventory order.
pub async fn claim_seeded(
    api: &crate::common::Api,
    store: &sautikit::db::Db,
    n: usize,
) -> Vec<(String, String)> {
    use futures::StreamExt;
    let rows = sqlx::query(
        "SELECT id FROM inventory_numbers WHERE status = 'available' ORDER BY number LIMIT $1",
    )
    .bind(n as i64)
    .fetch_all(&store.read)
    .await
    .expect("inventory");
    let inventory: Vec<String> = rows
        .iter()
        .map(|r| sqlx::Row::try_get::<String, _>(r, "id").expect("id"))
        .collect();
    assert_eq!(inventory.len(), n, "seeded inventory");
    futures::stream::iter(inventory)
        .map(|id| {
            let api = api.clone();
            async move {
                let r = api.post(&format!("/v1/numbers/{id}/claim"), None).await;
                assert_eq!(r.status, 201, "claim {id}: {}", r.text);
                let v = r.json();
                (
                    v["id"].as_str().expect("id").to_owned(),
                    v["number"]
                        .as_str()
                        .expect("number")
                        .trim_start_matches('+')
                        .to_owned(),
                )
            }
        })
        .buffered(16)
        .collect()
        .await
}

/// Wait out a measured window of `window`, printing `who`'s CPU and RSS every 10 s; the wall
/// time it took.
pub async fn watch_window(pid: u32, window: Duration, who: &str) -> Duration {
    let w0 = std::time::Instant::now();
    let mut last_line = w0;
    let mut last_cpu = cpu_time(pid);
    while w0.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(250).min(window.saturating_sub(w0.elapsed())))
            .await;
        if last_line.elapsed() >= Duration::from_secs(10) {
            let cpu = cpu_time(pid);
            println!(
                "  t={:>5.1}s {who} {:.2} cores, RSS {:.0} MiB",
                w0.elapsed().as_secs_f64(),
                (cpu - last_cpu).as_secs_f64() / last_line.elapsed().as_secs_f64(),
                mib(status_kib(pid, "VmRSS"))
            );
            last_cpu = cpu;
            last_line = std::time::Instant::now();
        }
    }
    w0.elapsed()
}
