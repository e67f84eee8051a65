//! The guide's Express `/events` handler, run as written under Node with express from npm,
//! accepts our deliveries; a copy that flips one byte of the body first rejects them.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Backend, Mode, Server, TestDb, dev_key, wait_for_json};
use serde_json::{Value, json};

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// The guide's handler text, verbatim (checked against the guide when it is beside the repo).
const SNIPPET: &str = include_str!("node/guide_events_handler.snippet.js");

fn node_ready() -> bool {
    let ok = Command::new("node").arg("--version").output().is_ok()
        && node_dir().join("node_modules/express").is_dir();
    if !ok {
        assert!(
            std::env::var("SAUTIKIT_REQUIRE_NODE").as_deref() != Ok("1"),
            "node or tests/node/node_modules/express is missing (scripts/test.sh installs them)"
        );
        eprintln!("Express test not run: node or express missing (run scripts/test.sh)");
    }
    ok
}

struct Node {
    child: Child,
    lines: mpsc::Receiver<String>,
    file: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

impl Node {
    /// Starts the handler app; returns it and its port.
    fn start(secret: &str) -> (Node, u16) {
        // The copy: same handler on another path, flipping one byte of the body first.
        let copy = SNIPPET
            .lines()
            .filter(|l| !l.starts_with("import "))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("app.post(\"/events\",", "app.post(\"/events-flipped\",")
            .replacen(
                "(req, res) => {",
                "(req, res) => {\nreq.body[0] ^= 0x01;",
                1,
            );
        let program = format!(
            "import express from \"express\";\nconst app = express();\n\n// The guide, as written:\n{SNIPPET}\n\n// A copy that flips one byte of the body before verifying:\n{copy}\n\nconst server = app.listen(0, \"127.0.0.1\", () => console.log(`listening ${{server.address().port}}`));\n"
        );
        let file = node_dir().join(format!(
            "receiver-{}.generated.mjs",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(&file, program).expect("write handler");
        let mut child = Command::new("node")
            .arg(&file)
            .env("WEBHOOK_SECRET", secret)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = Node {
            child,
            lines: rx,
            file,
        };
        let line = node.next_line(Duration::from_secs(30));
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        (node, port)
    }

    fn next_line(&mut self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("node printed nothing within {timeout:?}"))
    }
}

fn dev_secret(db: &TestDb) -> String {
    let raw = std::fs::read(db.data_dir.join("dev-credentials.json")).expect("credentials");
    let v: Value = serde_json::from_slice(&raw).expect("json");
    v["webhook_secret"].as_str().expect("secret").to_owned()
}

async fn guide_express_handler_accepts_our_signature(backend: Backend) {
    if !node_ready() {
        return;
    }
    let guide =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/seed/claim-and-route-a-number.md");
    if let Ok(text) = std::fs::read_to_string(&guide) {
        assert!(
            text.contains(SNIPPET.trim()),
            "the snippet is the guide's, verbatim"
        );
    }
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, &[("SAUTIKIT_WEBHOOK_RETRY_SCALE", "0.001")]);
    let api = server.api(&dev_key(&db.data_dir));
    let (mut node, port) = Node::start(&dev_secret(&db));
    for path in ["/events", "/events-flipped"] {
        let r = api
            .post(
                "/v1/webhooks",
                Some(json!({"url": format!("http://127.0.0.1:{port}{path}"), "events": ["number.*"]})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000009/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201);

    // The handler's own log line: event_kind, payload.call_id (none for number events), status.
    let line = node.next_line(Duration::from_secs(30));
    assert_eq!(line, "number.provisioned undefined active");

    let log = wait_for_json(
        &api,
        "/v1/webhooks/deliveries?event_kind=number.provisioned",
        Duration::from_secs(30),
        |v| {
            v.as_array().is_some_and(|a| {
                a.len() == 2
                    && a.iter().all(|d| {
                        d["attempt_count"].as_i64() >= Some(2) || d["status"] == "succeeded"
                    })
            })
        },
    )
    .await;
    for d in log.as_array().expect("array") {
        let url = d["url"].as_str().unwrap_or_default();
        if url.ends_with("/events") {
            assert_eq!(d["status"], "succeeded", "{d}");
            assert_eq!(d["attempts"][0]["status_code"], 200);
        } else {
            // The flipped copy refuses every attempt: the signature covers the body.
            assert_eq!(d["status"], "pending", "{d}");
            for a in d["attempts"].as_array().expect("attempts") {
                assert_eq!(a["status_code"], 401, "{d}");
            }
        }
    }
}

on_both_backends!(guide_express_handler_accepts_our_signature);
