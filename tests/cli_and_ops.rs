//! The CLI's admin commands, and the ops endpoints (health, metrics, OpenAPI).

#[macro_use]
mod common;

use common::{Backend, Mode, Server, TestDb, dev_key};
use serde_json::Value;

async fn admin_commands(backend: Backend) {
    let db = TestDb::new(backend).await;
    let v = db.admin(&[
        "create-workspace",
        "--name",
        "acme",
        "--credit-minor",
        "25000",
    ]);
    let keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["workspace_id", "api_key", "webhook_secret"]);
    let ws = v["workspace_id"].as_str().expect("id").to_owned();
    let key = v["api_key"].as_str().expect("key").to_owned();
    assert!(key.starts_with("sk_") && key.len() >= 3 + 43, "{key}");
    assert!(
        v["webhook_secret"]
            .as_str()
            .expect("secret")
            .starts_with("whsec_")
    );

    let credited = db.admin(&["credit", "--workspace", &ws, "--amount-minor", "500"]);
    assert_eq!(credited["balance_minor"], 25_500);

    let seeded = db.admin(&[
        "seed-inventory",
        "--country",
        "KE",
        "--count",
        "3",
        "--start",
        "+254720000001",
        "--monthly-price-minor",
        "20000",
        "--outbound-per-min-minor",
        "250",
        "--inbound-per-min-minor",
        "10",
    ]);
    assert_eq!(seeded["inserted"], 3);
    // Seeding again adds nothing.
    let again = db.admin(&["seed-inventory", "--count", "3", "--start", "+254720000001"]);
    assert_eq!(again["inserted"], 0);

    // Invalid input: exit code 2, nothing written.
    for args in [
        vec!["credit", "--workspace", &ws, "--amount-minor", "0"],
        vec!["credit", "--workspace", &ws, "--amount-minor", "-5"],
        vec![
            "credit",
            "--workspace",
            "01900000-0000-7000-8000-999999999999",
            "--amount-minor",
            "5",
        ],
        vec!["create-workspace", "--name", "x", "--currency", "XYZ"],
        vec!["create-workspace", "--name", ""],
        vec!["seed-inventory", "--count", "0"],
        vec!["seed-inventory", "--count", "2", "--start", "0712345678"],
        vec!["seed-inventory", "--count", "2", "--country", "Kenya"],
    ] {
        let out = db.admin_raw(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty());
        assert!(!out.stderr.is_empty());
    }

    let server = Server::start(&db, Mode::Production);
    let api = server.api(&key);
    assert_eq!(api.get("/v1/wallet").await.json()["balance_minor"], 25_500);
    let ledger = api.get_all("/v1/wallet/transactions").await;
    assert_eq!(ledger.len(), 2);
    assert_eq!(ledger[0]["kind"], "credit");
    let inv = api.get_all("/v1/numbers/available").await;
    assert_eq!(inv.len(), 3);
    assert_eq!(inv[0]["number"], "+254720000001");
    assert_eq!(inv[0]["monthly_price_minor"], 20_000);
    assert_eq!(inv[0]["inbound_per_min_minor"], 10);
    assert_eq!(inv[0]["outbound_per_min_minor"], 250);
}

on_both_backends!(admin_commands);

async fn ops_endpoints(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, Mode::Dev);
    let api = server.api(&dev_key(&db.data_dir));
    let anon = server.anon();

    let h = anon.get("/healthz").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");

    // A claim shows up in the metrics.
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000003/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    let m = anon.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain")
    );
    assert!(
        m.text.contains("sautikit_numbers_claimed_total 1"),
        "{}",
        m.text
    );
    // Where memory goes: the resident set, its anonymous part, and SQLite's own share.
    let gauge = |name: &str| -> f64 {
        m.text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{}", m.text))
    };
    let rss = gauge("sautikit_process_resident_memory_bytes");
    let anon_rss = gauge("sautikit_process_anonymous_memory_bytes");
    let sqlite = gauge("sautikit_sqlite_memory_bytes");
    assert!(
        rss > 1e6 && anon_rss > 0.0 && anon_rss <= rss,
        "{rss} {anon_rss}"
    );
    if matches!(backend, Backend::Sqlite) {
        // Its connections hold memory.
        assert!(sqlite > 10_000.0 && sqlite < rss, "{sqlite} of {rss}");
    }
    // The two heaps: Rust's (mimalloc) has committed memory, C's holds at least what it uses.
    let rust_heap = gauge("sautikit_rust_heap_committed_bytes");
    let c_held = gauge("sautikit_c_heap_held_bytes");
    let c_used = gauge("sautikit_c_heap_used_bytes");
    assert!(rust_heap > 1e6, "{rust_heap}");
    assert!(c_used > 0.0 && c_used <= c_held, "{c_used} of {c_held}");
    // Transparent huge pages are off for the engine, so its resident memory is what its heaps
    // touched. (Where the kernel gives them to every mapping, one may be faulted in before
    // `main` turns them off.)
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("the server's /proc status");
    assert!(status.contains("THP_enabled:\t0"), "{status}");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", server.pid()))
        .expect("the server's smaps_rollup");
    let huge_kib: u64 = smaps
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("AnonHugePages missing from:\n{smaps}"));
    assert!(huge_kib <= 2048, "{huge_kib} KiB in huge pages:\n{smaps}");
    assert!(
        m.text
            .contains("sautikit_http_requests_total{method=\"POST\",route=\"/v1/numbers/{inventory_id}/claim\",status=\"201\"} 1"),
        "{}",
        m.text
    );
    // Every response carries its request id.
    assert!(
        r.header("x-request-id")
            .unwrap_or_default()
            .starts_with("req_")
    );

    // The OpenAPI document covers every route we serve, and every route it names is served.
    let doc: Value = anon.get("/v1/openapi.json").await.json();
    let paths = doc["paths"].as_object().expect("paths");
    let served = [
        ("get", "/v1/numbers/available"),
        ("post", "/v1/numbers/{inventory_id}/claim"),
        ("get", "/v1/numbers"),
        ("get", "/v1/numbers/{id}"),
        ("delete", "/v1/numbers/{id}"),
        ("patch", "/v1/numbers/{id}/routing"),
        ("post", "/v1/numbers/{id}/sip-credentials"),
        ("get", "/v1/numbers/{id}/sip-credentials"),
        ("post", "/v1/numbers/{id}/sip-credentials/{cred_id}/rotate"),
        ("delete", "/v1/numbers/{id}/sip-credentials/{cred_id}"),
        ("get", "/v1/numbers/{id}/registrations"),
        ("delete", "/v1/numbers/{id}/registrations/{reg_id}"),
        ("get", "/v1/wallet"),
        ("get", "/v1/wallet/transactions"),
        ("post", "/v1/topups"),
        ("patch", "/v1/wallet"),
        ("post", "/v1/webhooks"),
        ("get", "/v1/webhooks"),
        ("delete", "/v1/webhooks/{id}"),
        ("get", "/v1/webhooks/deliveries"),
        ("post", "/v1/webhooks/deliveries/{id}/redeliver"),
        ("post", "/v1/webhooks/secret/rotate"),
        ("get", "/v1/calls"),
        ("post", "/v1/calls"),
        ("get", "/v1/calls/{id}"),
        ("get", "/v1/calls/{id}/events"),
        ("post", "/v1/calls/{id}/hangup"),
        ("get", "/v1/calls/{id}/recording"),
        ("get", "/v1/calls/{id}/recordings"),
        ("get", "/v1/usage"),
        ("get", "/v1/calls/stats"),
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/v1/openapi.json"),
    ];
    let mut documented = Vec::new();
    for (path, item) in paths {
        for method in item.as_object().expect("item").keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    documented.sort();
    let mut expected: Vec<(String, String)> = served
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    expected.sort();
    assert_eq!(documented, expected);
    let zero = "01900000-0000-7000-8000-999999999999";
    for (method, path) in &expected {
        let concrete = path
            .replace("{inventory_id}", zero)
            .replace("{id}", zero)
            .replace("{cred_id}", zero)
            .replace("{reg_id}", zero);
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let r = api.send(api.request(m, &concrete)).await;
        let code = serde_json::from_str::<Value>(&r.text)
            .map(|v| v["error"]["code"].clone())
            .unwrap_or(Value::Null);
        assert_ne!(
            code, "route.not_found",
            "{method} {path} is documented but not served"
        );
        assert_ne!(r.status, 405, "{method} {path}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

on_both_backends!(ops_endpoints);

/// A SQLite URL naming a file that does not exist yet (in a directory that does not either)
/// creates it, as an operator expects: no `?mode=rwc` needed.
#[test]
fn a_sqlite_url_to_a_new_file_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fresh").join("new.db");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sautikit"))
        .arg("migrate")
        .env(
            "SAUTIKIT_DATABASE_URL",
            format!("sqlite://{}", file.display()),
        )
        .env("SAUTIKIT_DATA_DIR", dir.path())
        .output()
        .expect("sautikit runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(file.exists(), "the database file was created");
}

/// A bad setting fails at start, naming the setting as the operator set it: the environment
/// variable when it came from there.
#[test]
fn a_bad_setting_is_named_at_start() {
    for (var, value) in [
        ("SAUTIKIT_MODE", "prod"),
        ("SAUTIKIT_RTP_PORTS", "abc"),
        ("SAUTIKIT_CALLS_PER_SECOND", "-1"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sautikit"))
            .arg("serve")
            .env(var, value)
            .output()
            .expect("sautikit runs");
        assert_eq!(out.status.code(), Some(2), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var) && err.contains(value), "{var}: {err}");
    }
}
