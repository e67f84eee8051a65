//! The OpenAPI document is the contract: schemathesis (from the test venv, tests/python) generates
//! valid and invalid requests for every operation of `/v1/openapi.json` and checks that no answer
//! is a 5xx, and that every answer's status, content type and body are the ones documented.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::device::{FIRST_INVENTORY_ID, claim, new_credential};
use common::trunk::Trunk;
use common::{Backend, TestDb, dev_key};
use serde_json::json;

const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance";
/// Bounds that keep the run well inside the suite's time on two cores; a fixed seed so that a
/// failure reproduces.
const MAX_EXAMPLES: &str = "25";
const MAX_TIME_SECS: &str = "100";
const SEED: &str = "4475";

fn schemathesis() -> Option<PathBuf> {
    common::venv_tool("schemathesis", "SAUTIKIT_REQUIRE_SCHEMATHESIS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let Some(bin) = schemathesis() else { return };
    let db = TestDb::new(Backend::Sqlite).await;
    // A trunk that never answers: placed calls ring (and are hung up or time out) instead of
    // being refused for want of a trunk.
    let trunk = Trunk::bind().await;
    let server =
        common::calls::start_server_with(&db, &[("SAUTIKIT_OUTBOUND_TRUNK", &trunk.uri())]);
    let key = dev_key(&db.data_dir);
    let api = server.api(&key);

    // Something for the operations to find: a routed number (the one the document's examples
    // place calls from) with a credential, a webhook subscription, and top-ups in the ledger.
    let number_id = claim(&api, FIRST_INVENTORY_ID).await;
    let r = api
        .patch(
            &format!("/v1/numbers/{number_id}/routing"),
            json!({"voice_callback_url": "http://127.0.0.1:9/voice",
                   "events_url": "http://127.0.0.1:9/events"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    new_credential(&api, &number_id, "desk").await;
    let r = api
        .post(
            "/v1/webhooks",
            Some(json!({"url": "http://127.0.0.1:9/hooks", "events": ["*"]})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = api
        .post(
            "/v1/topups",
            Some(json!({"provider": "test", "amount_minor": 50_000, "currency": "KES"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);

    let work = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(170),
        tokio::process::Command::new(&bin)
            .current_dir(work.path())
            .args(["run", &format!("{}/v1/openapi.json", server.base)])
            .args(["--url", &server.base])
            .args(["--header", &format!("Authorization: Bearer {key}")])
            .args(["--checks", CHECKS])
            .args(["--max-examples", MAX_EXAMPLES])
            .args(["--max-time", MAX_TIME_SECS])
            .args(["--seed", SEED])
            .args(["--workers", "2"])
            .args(["--request-timeout", "20"])
            .args(["--generation-database", "none"])
            .args(["--no-color", "--output-truncate", "false"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("schemathesis finished in time")
    .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("schemathesis took {:?}:\n{stdout}", started.elapsed());
    assert!(
        out.status.success(),
        "schemathesis failed ({}):\n{stdout}\n{stderr}\nserver log tail:\n{}",
        out.status,
        tail(&server.log_text(), 40)
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
