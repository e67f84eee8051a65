//! After the call: its record, cost and timeline, from the API.

use std::time::{Duration, Instant};

use serde_json::Value;

/// How long the record may take to show the call's end (its final write is queued).
const RECORD_WAIT: Duration = Duration::from_secs(5);

pub async fn print_call(api: &str, key: &str, call_id: &str) {
    // reqwest is built without a default TLS provider; the API may be https.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("the call's record is not available: {e}");
            return;
        }
    };
    let base = api.trim_end_matches('/');
    let get = |path: String| {
        let request = client.get(format!("{base}{path}")).bearer_auth(key);
        async move {
            let response = request.send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(|e| e.to_string())?;
            let body: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(body)
            } else {
                Err(format!(
                    "{status}: {}",
                    body["error"]["message"].as_str().unwrap_or_default()
                ))
            }
        }
    };
    let until = Instant::now() + RECORD_WAIT;
    let record = loop {
        match get(format!("/v1/calls/{call_id}")).await {
            Ok(record) if record["ended_at"].is_string() || Instant::now() >= until => {
                break record;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                eprintln!("the call's record is not available: {e}");
                return;
            }
        }
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    println!("\nrecord of {call_id}:");
    for field in [
        "status",
        "direction",
        "from",
        "to",
        "duration_seconds",
        "hangup_cause",
        "failure_reason",
    ] {
        println!("  {field:<17} {}", text(&record[field]));
    }
    let cost = record["cost_minor"].as_i64().unwrap_or(0);
    println!(
        "  {:<17} {} {}.{:02}",
        "cost",
        text(&record["currency"]),
        cost / 100,
        (cost % 100).abs()
    );
    match get(format!("/v1/calls/{call_id}/events")).await {
        Ok(Value::Array(entries)) => {
            println!("\ntimeline:");
            for e in entries {
                println!(
                    "  {}  {:<18} {}",
                    text(&e["at"]),
                    text(&e["kind"]),
                    e["detail"]
                );
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("the call's timeline is not available: {e}"),
    }
}
