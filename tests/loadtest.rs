//! `sautikit loadtest inbound` against a running server: it claims and routes its numbers
//! through the API, places the calls, and its counts agree with the server's records and
//! events; it releases the numbers afterwards; refusals fail the run, counted by reason.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{Backend, Mode, Server, TestDb, dev_key};
use serde_json::Value;

async fn loadtest(server: &Server, key: &str, args: &[&str]) -> (Output, Value) {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sautikit"));
    command
        .args(["loadtest", "inbound"])
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .env("SAUTIKIT_API_URL", &server.base)
        .env("SAUTIKIT_API_KEY", key)
        .env("SAUTIKIT_SIP_SERVER", server.sip_addr().to_string())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the load test finished within 120 s")
        .expect("the load test ran");
    println!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let json = std::fs::read(&json_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    (output, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_at_100_calls_a_second_agrees_with_the_server() {
    let db = TestDb::new(Backend::Sqlite).await;
    // A debug build on shared cores: admission judges setups against a looser target.
    let server = Server::start_with(&db, Mode::Dev, &[("SAUTIKIT_SETUP_TARGET_MS", "1000")]);
    let key = dev_key(&db.data_dir);
    let api = server.api(&key);
    let (output, report) = loadtest(
        &server,
        &key,
        &[
            "--rate",
            "100",
            "--duration",
            "10",
            "--hold",
            "1",
            "--numbers",
            "10",
        ],
    )
    .await;
    assert!(output.status.success(), "{report}");
    let calls = &report["calls"];
    assert_eq!(calls["attempted"], 1000, "{report}");
    assert_eq!(calls["completed"], 1000, "{report}");
    assert_eq!(calls["failed"], 0, "{report}");
    assert_eq!(report["pass"], true);
    // The server recorded exactly these calls, all completed, and sent their events.
    let recorded = api.get_all("/v1/calls?limit=100").await;
    assert_eq!(recorded.len(), 1000);
    assert!(recorded.iter().all(|c| c["status"] == "completed"));
    for kind in ["call.started", "call.answered", "call.completed"] {
        assert_eq!(report["events"][kind], 1000, "{kind}: {report}");
    }
    assert_eq!(report["voice_callbacks"], 1000);
    // Its numbers were released again.
    let numbers = api.get_all("/v1/numbers?status=active&limit=100").await;
    assert!(numbers.is_empty(), "{numbers:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("RESULT PASS"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_fail_the_run_counted_by_reason() {
    let db = TestDb::new(Backend::Sqlite).await;
    // Five live calls at most: held calls fill it and the rest are refused 503.
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            ("SAUTIKIT_SETUP_TARGET_MS", "1000"),
            ("SAUTIKIT_MAX_CALLS", "5"),
        ],
    );
    let key = dev_key(&db.data_dir);
    let (output, report) = loadtest(
        &server,
        &key,
        &[
            "--rate",
            "20",
            "--duration",
            "2",
            "--hold",
            "3",
            "--numbers",
            "2",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert_eq!(report["pass"], false);
    let refused = report["calls"]["failures"]["INVITE 503 Service Unavailable"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused >= 30, "{report}");
    assert_eq!(report["calls"]["completed"].as_u64().unwrap() + refused, 40);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("failed: INVITE 503 Service Unavailable"),
        "{stdout}"
    );
    // Bad settings change nothing and exit 2.
    let (output, _) = loadtest(&server, &key, &["--rate", "0"]).await;
    assert_eq!(output.status.code(), Some(2));
}
