//! Recordings on both backends: `CallStore::recording_ready` as a library (row, timeline and
//! `call.recording.ready` in one transaction), and `GET /v1/calls/{id}/recording(s)` against a
//! real server, with calls and recordings written into its database through the library.

#[macro_use]
mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{Api, Backend, Mode, Server, TestDb, dev_key};
use sautikit::db::Db;
use sautikit::recordings::RecordingsConfig;
use sautikit::store::SqlStore;
use sautikit_actors::call_store::{CallStarted, CallStore, RecordingReady, TimelineEntry};

use serde_json::{Value, json};
use sqlx::Row;

/// The engine id our inserted calls claim. It beats far in the future, so the server never
/// closes our calls as orphans.
const TEST_ENGINE: &str = "recordings-test";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 27, 12, 0, 0).unwrap()
}

fn entry(at: DateTime<Utc>, kind: &str, detail: Value) -> TimelineEntry {
    TimelineEntry {
        at,
        kind: kind.into(),
        detail,
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

async fn start_call(store: &SqlStore, ws: &str, number_id: &str, at: DateTime<Utc>) -> String {
    let id = new_id();
    store
        .call_started(CallStarted {
            call_id: id.clone(),
            workspace_id: ws.into(),
            number_id: number_id.into(),
            direction: "inbound".into(),
            from: "+254711222333".into(),
            to: "+254700000001".into(),
            sip_call_id: format!("sip-{id}"),
            engine_id: TEST_ENGINE.into(),
            started_at: at,
            timeline: vec![entry(at, "sip.received", json!({"method": "INVITE"}))],
            parent_call_id: None,
        })
        .await
        .expect("call started");
    id
}

fn ready(
    call_id: &str,
    recording_id: &str,
    ms: u64,
    size: u64,
    at: DateTime<Utc>,
) -> RecordingReady {
    RecordingReady {
        recording_id: recording_id.into(),
        call_id: call_id.into(),
        path: format!("recordings/{call_id}/{recording_id}.wav"),
        duration_ms: ms,
        size_bytes: size,
        created_at: at,
        timeline: vec![entry(
            at,
            "action.finished",
            json!({"verb": "record", "recording_id": recording_id}),
        )],
    }
}

/// (event_kind, body) of a call's events in outbox order.
async fn call_events(store: &SqlStore, call_id: &str) -> Vec<(String, Value)> {
    let rows = sqlx::query("SELECT event_kind, body FROM events WHERE call_id = $1 ORDER BY id")
        .bind(call_id)
        .fetch_all(&store.db().read)
        .await
        .expect("events");
    rows.iter()
        .map(|r| {
            let kind: String = r.try_get("event_kind").expect("kind");
            let body: String = r.try_get("body").expect("body");
            (kind, serde_json::from_str(&body).expect("json body"))
        })
        .collect()
}

async fn count(store: &SqlStore, sql: &'static str) -> i64 {
    let row = sqlx::query(sql)
        .fetch_one(&store.db().read)
        .await
        .expect("count");
    row.try_get("n").expect("n")
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The store

struct StoreFx {
    _db: TestDb,
    store: SqlStore,
    ws: String,
    number_id: String,
}

async fn store_fixture(backend: Backend) -> StoreFx {
    let tdb = TestDb::new(backend).await;
    let db = Db::connect(&tdb.url).await.expect("connect");
    db.migrate().await.expect("migrate");
    let store = SqlStore::new(db);
    store.set_recordings(RecordingsConfig {
        public_url: "https://voice.example.com/".into(),
        data_dir: tdb.data_dir.clone(),
    });
    let ws = store
        .create_workspace("rec", "KES", 100_000, t0())
        .await
        .expect("workspace");
    let number = common::store::claim_first_number(
        &store,
        &ws.workspace_id,
        1,
        common::store::Prices {
            monthly: 10_000,
            inbound_per_min: 0,
            outbound_per_min: 300,
        },
        t0(),
    )
    .await;
    StoreFx {
        _db: tdb,
        store,
        ws: ws.workspace_id,
        number_id: number.id,
    }
}

async fn store_writes_row_timeline_and_event(backend: Backend) {
    let fx = store_fixture(backend).await;
    let call = start_call(&fx.store, &fx.ws, &fx.number_id, t0()).await;
    let rec = new_id();
    let at = t0() + Duration::seconds(20);
    fx.store
        .recording_ready(ready(&call, &rec, 14_600, 233_644, at))
        .await
        .expect("recording ready");

    let rows = fx
        .store
        .list_call_recordings(&call, None, 10)
        .await
        .expect("list");
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.id, rec);
    assert_eq!(r.workspace_id, fx.ws);
    assert_eq!(r.call_id, call);
    assert_eq!(r.number_id, fx.number_id);
    assert_eq!(r.path, format!("recordings/{call}/{rec}.wav"));
    assert_eq!(r.duration_ms, 14_600);
    assert_eq!(r.size_bytes, 233_644);
    assert_eq!(r.created_at, at);

    let timeline = fx
        .store
        .list_call_timeline(&call, None, 100)
        .await
        .expect("timeline");
    let kinds: Vec<&str> = timeline.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(kinds, ["sip.received", "action.finished"]);
    assert_eq!(timeline[1].detail["recording_id"], rec.as_str());

    let events = call_events(&fx.store, &call).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["call.started", "call.recording.ready"]);
    let body = &events[1].1;
    assert_eq!(body["event_kind"], "call.recording.ready");
    assert_eq!(body["workspace_id"], fx.ws.as_str());
    assert_eq!(body["occurred_at"], "2026-06-27T12:00:20Z");
    let payload = &body["payload"];
    assert_eq!(
        keys(payload),
        [
            "call_id",
            "recording_id",
            "duration_seconds",
            "size_bytes",
            "download_url"
        ]
    );
    assert_eq!(
        *payload,
        json!({
            "call_id": call,
            "recording_id": rec,
            // 14.6 s rounds to 15.
            "duration_seconds": 15,
            "size_bytes": 233_644,
            "download_url": format!(
                "https://voice.example.com/v1/calls/{call}/recording?recording_id={rec}"
            ),
        })
    );
    // The event is addressed like the call's other events (ordering per call, number routing).
    let row = sqlx::query("SELECT number_id FROM events WHERE event_kind = 'call.recording.ready'")
        .fetch_one(&fx.store.db().read)
        .await
        .expect("event row");
    let number_id: String = row.try_get("number_id").expect("number_id");
    assert_eq!(number_id, fx.number_id);

    // A retried write of the same recording changes nothing.
    fx.store
        .recording_ready(ready(&call, &rec, 14_600, 233_644, at))
        .await
        .expect("repeat");
    assert_eq!(call_events(&fx.store, &call).await.len(), 2);
    assert_eq!(
        count(&fx.store, "SELECT COUNT(*) AS n FROM recordings").await,
        1
    );

    // A short recording is at least a second long; an empty one is 0.
    let short = new_id();
    fx.store
        .recording_ready(ready(&call, &short, 400, 6_444, at))
        .await
        .expect("short");
    let empty = new_id();
    fx.store
        .recording_ready(ready(&call, &empty, 0, 44, at))
        .await
        .expect("empty");
    let events = call_events(&fx.store, &call).await;
    assert_eq!(events[2].1["payload"]["duration_seconds"], 1);
    assert_eq!(events[3].1["payload"]["duration_seconds"], 0);
    let listed: Vec<String> = fx
        .store
        .list_call_recordings(&call, None, 10)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, [empty.clone(), short.clone(), rec.clone()]);
    let newest = fx
        .store
        .get_call_recording(&call, None)
        .await
        .expect("get")
        .expect("some");
    assert_eq!(newest.id, empty);
    let named = fx
        .store
        .get_call_recording(&call, Some(&rec))
        .await
        .expect("get")
        .expect("some");
    assert_eq!(named.id, rec);
}
on_both_backends!(store_writes_row_timeline_and_event);

async fn store_refuses_without_writing(backend: Backend) {
    let fx = store_fixture(backend).await;
    let call = start_call(&fx.store, &fx.ws, &fx.number_id, t0()).await;
    let before_events = count(&fx.store, "SELECT COUNT(*) AS n FROM events").await;
    let before_timeline = count(&fx.store, "SELECT COUNT(*) AS n FROM call_timeline").await;

    // An unknown call.
    let unknown = new_id();
    let err = fx
        .store
        .recording_ready(ready(&unknown, &new_id(), 5_000, 80_044, t0()))
        .await
        .expect_err("unknown call");
    assert!(err.0.contains("not found"), "{err:?}");

    // Paths that would leave the data directory.
    for path in ["/etc/passwd", "../x.wav", "recordings/../../x.wav", ""] {
        let mut r = ready(&call, &new_id(), 5_000, 80_044, t0());
        r.path = path.into();
        fx.store
            .recording_ready(r)
            .await
            .expect_err("unsafe path refused");
    }

    // The same recording id on another call.
    let rec = new_id();
    fx.store
        .recording_ready(ready(&call, &rec, 5_000, 80_044, t0()))
        .await
        .expect("first");
    let other_call = start_call(&fx.store, &fx.ws, &fx.number_id, t0()).await;
    fx.store
        .recording_ready(ready(&other_call, &rec, 5_000, 80_044, t0()))
        .await
        .expect_err("id reused on another call");

    // Only the one good recording and what came with it were written (plus the second call's
    // start).
    assert_eq!(
        count(&fx.store, "SELECT COUNT(*) AS n FROM recordings").await,
        1
    );
    assert_eq!(
        count(&fx.store, "SELECT COUNT(*) AS n FROM events").await,
        before_events + 2
    );
    assert_eq!(
        count(&fx.store, "SELECT COUNT(*) AS n FROM call_timeline").await,
        before_timeline + 2
    );
    assert!(call_events(&fx.store, &unknown).await.is_empty());
    let kinds: Vec<String> = call_events(&fx.store, &other_call)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(kinds, ["call.started"]);
}
on_both_backends!(store_refuses_without_writing);

/// Recordings sent together go through the group commit like other call writes: a bad one in
/// the batch fails alone, the rest land, each with its event.
async fn store_group_commit(backend: Backend) {
    let fx = store_fixture(backend).await;
    let call = start_call(&fx.store, &fx.ws, &fx.number_id, t0()).await;
    let ids: Vec<String> = (0..20).map(|_| new_id()).collect();
    let unknown = new_id();
    let mut writes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let target = if i == 7 { &unknown } else { &call };
        writes.push(fx.store.recording_ready(ready(
            target,
            id,
            1_000 * (i as u64 + 1),
            16_044,
            t0(),
        )));
    }
    let results = futures::future::join_all(writes).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_ok(), i != 7, "write {i}: {r:?}");
    }
    let stored = fx
        .store
        .list_call_recordings(&call, None, 100)
        .await
        .expect("list");
    assert_eq!(stored.len(), 19);
    let events = call_events(&fx.store, &call).await;
    assert_eq!(
        events
            .iter()
            .filter(|(k, _)| k == "call.recording.ready")
            .count(),
        19
    );
}
on_both_backends!(store_group_commit);

// ---------------------------------------------------------------------------------------------
// The API

/// Field order is drop order: the server stops before its database is dropped.
struct ApiFx {
    server: Server,
    store: SqlStore,
    api: Api,
    ws: String,
    number_id: String,
    other: Api,
    db: TestDb,
}

async fn api_fixture(backend: Backend, env: &[(&str, &str)]) -> ApiFx {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, env);
    let api = server.api(&dev_key(&db.data_dir));
    let creds: Value = serde_json::from_slice(
        &std::fs::read(db.data_dir.join("dev-credentials.json")).expect("dev credentials"),
    )
    .expect("json");
    let ws = creds["workspace_id"].as_str().expect("id").to_owned();
    let (_, other_key) = db.workspace("other", 100_000);
    let other = server.api(&other_key);
    let r = api
        .post(
            "/v1/numbers/01900000-0000-7000-8000-000000000001/claim",
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let number_id = r.json()["id"].as_str().expect("id").to_owned();
    let store = SqlStore::new(Db::connect(&db.url).await.expect("connect"));
    store
        .engine_heartbeat(TEST_ENGINE, Utc::now() + Duration::days(1))
        .await
        .expect("heartbeat");
    ApiFx {
        server,
        store,
        api,
        ws,
        number_id,
        other,
        db,
    }
}

/// A WAV file: 8 kHz 16-bit mono PCM, `samples` samples of a sawtooth.
fn wav(samples: u32) -> Vec<u8> {
    let data_len = samples * 2;
    let mut w = Vec::with_capacity(44 + data_len as usize);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&8000u32.to_le_bytes());
    w.extend_from_slice(&16000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..samples {
        let s = ((i % 200) as i16 - 100) * 300;
        w.extend_from_slice(&s.to_le_bytes());
    }
    w
}

/// Write a WAV under the server's data dir and record it through the library.
async fn record(fx: &ApiFx, call: &str, samples: u32, at: DateTime<Utc>) -> (String, Vec<u8>) {
    let id = new_id();
    let bytes = wav(samples);
    let rel = format!("recordings/{call}/{id}.wav");
    let full = fx.db.data_dir.join(&rel);
    std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
    std::fs::write(&full, &bytes).expect("write wav");
    fx.store
        .recording_ready(RecordingReady {
            recording_id: id.clone(),
            call_id: call.into(),
            path: rel,
            duration_ms: u64::from(samples) / 8,
            size_bytes: bytes.len() as u64,
            created_at: at,
            timeline: vec![],
        })
        .await
        .expect("recording ready");
    (id, bytes)
}

struct Download {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

async fn download(api: &Api, path: &str) -> Download {
    let r = api
        .request(reqwest::Method::GET, path)
        .send()
        .await
        .expect("GET");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.expect("body").to_vec();
    Download {
        status,
        headers,
        body,
    }
}

fn header<'a>(d: &'a Download, name: &str) -> &'a str {
    d.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
}

#[track_caller]
fn assert_wav(d: &Download, id: &str, bytes: &[u8]) {
    assert_eq!(d.status, 200, "{}", String::from_utf8_lossy(&d.body));
    assert_eq!(header(d, "content-type"), "audio/wav");
    assert_eq!(header(d, "content-length"), bytes.len().to_string());
    assert_eq!(
        header(d, "content-disposition"),
        format!("inline; filename=\"{id}.wav\"")
    );
    assert!(d.body == bytes, "the WAV bytes differ");
}

async fn api_serves_recordings(backend: Backend) {
    let fx = api_fixture(backend, &[]).await;
    let base = fx.server.base.clone();
    let now = Utc::now();
    let call = start_call(&fx.store, &fx.ws, &fx.number_id, now).await;
    let silent_call = start_call(&fx.store, &fx.ws, &fx.number_id, now).await;

    // A call without recordings.
    fx.api
        .get(&format!("/v1/calls/{call}/recording"))
        .await
        .assert_error(404, "recordings.not_found");
    let r = fx.api.get(&format!("/v1/calls/{call}/recordings")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json(), json!([]));

    // Two recordings (3 s, then 1.5 s, over a 64 KiB chunk each way).
    let (first, first_bytes) = record(&fx, &call, 24_000, now).await;
    let (second, second_bytes) = record(&fx, &call, 12_000, now + Duration::seconds(5)).await;

    // The most recent by default, the named one on request; bytes and headers exact.
    let d = download(&fx.api, &format!("/v1/calls/{call}/recording")).await;
    assert_wav(&d, &second, &second_bytes);
    let d = download(
        &fx.api,
        &format!("/v1/calls/{call}/recording?recording_id={first}"),
    )
    .await;
    assert_wav(&d, &first, &first_bytes);

    // The list: newest first, exactly these fields, download URLs on the server's own address.
    let r = fx.api.get(&format!("/v1/calls/{call}/recordings")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let list = r.json();
    let items = list.as_array().expect("bare array");
    assert_eq!(items.len(), 2);
    assert_eq!(
        keys(&items[0]),
        [
            "id",
            "call_id",
            "duration_seconds",
            "size_bytes",
            "created_at",
            "download_url"
        ]
    );
    assert_eq!(items[0]["id"], second.as_str());
    assert_eq!(items[1]["id"], first.as_str());
    assert_eq!(items[0]["call_id"], call.as_str());
    assert_eq!(items[0]["duration_seconds"], 2); // 1.5 s, halves up
    assert_eq!(items[1]["duration_seconds"], 3);
    assert_eq!(items[1]["size_bytes"], first_bytes.len());
    let url = format!("{base}/v1/calls/{call}/recording?recording_id={first}");
    assert_eq!(items[1]["download_url"], url.as_str());
    // The download URL works as given.
    assert_wav(&download(&fx.api, &url).await, &first, &first_bytes);
    // Paged like every list.
    let r = fx
        .api
        .get(&format!("/v1/calls/{call}/recordings?limit=1"))
        .await;
    assert_eq!(r.json().as_array().expect("array").len(), 1);
    assert!(r.header("link").is_some());
    assert_eq!(
        fx.api
            .get_all(&format!("/v1/calls/{call}/recordings?limit=1"))
            .await
            .len(),
        2
    );

    // Another workspace sees no such call.
    for path in [
        format!("/v1/calls/{call}/recording"),
        format!("/v1/calls/{call}/recording?recording_id={first}"),
        format!("/v1/calls/{call}/recordings"),
    ] {
        fx.other
            .get(&path)
            .await
            .assert_error(404, "calls.not_found");
    }
    // An unknown recording id, and one that belongs to another call.
    fx.api
        .get(&format!(
            "/v1/calls/{call}/recording?recording_id={}",
            new_id()
        ))
        .await
        .assert_error(404, "recordings.not_found");
    fx.api
        .get(&format!(
            "/v1/calls/{silent_call}/recording?recording_id={first}"
        ))
        .await
        .assert_error(404, "recordings.not_found");
    // An unknown call.
    fx.api
        .get(&format!("/v1/calls/{}/recording", new_id()))
        .await
        .assert_error(404, "calls.not_found");
    // Ids that are not UUIDs.
    fx.api
        .get(&format!("/v1/calls/{call}/recording?recording_id=nope"))
        .await
        .assert_error(400, "request.invalid_id");
    fx.api
        .get("/v1/calls/nope/recording")
        .await
        .assert_error(400, "request.invalid_id");
    fx.api
        .get("/v1/calls/nope/recordings")
        .await
        .assert_error(400, "request.invalid_id");
    // Without a key.
    fx.server
        .anon()
        .get(&format!("/v1/calls/{call}/recording"))
        .await
        .assert_error(401, "api_key.invalid");

    // The row outlived its file.
    let (gone, _) = record(&fx, &silent_call, 800, now).await;
    std::fs::remove_file(
        fx.db
            .data_dir
            .join(format!("recordings/{silent_call}/{gone}.wav")),
    )
    .expect("remove");
    fx.api
        .get(&format!("/v1/calls/{silent_call}/recording"))
        .await
        .assert_error(404, "recordings.not_found");

    // A stored path that leaves the data directory is never followed, even if the file exists.
    let outside = fx.db.data_dir.parent().expect("parent").join("outside.wav");
    std::fs::write(&outside, wav(800)).expect("outside file");
    let evil = new_id();
    sqlx::query(
        "INSERT INTO recordings (id, workspace_id, call_id, number_id, path, duration_ms, \
         size_bytes, created_at) VALUES ($1, $2, $3, $4, '../outside.wav', 100, 1644, $5)",
    )
    .bind(&evil)
    .bind(&fx.ws)
    .bind(&silent_call)
    .bind(&fx.number_id)
    .bind(sautikit::time::to_db(Utc::now()))
    .execute(&fx.store.db().write)
    .await
    .expect("insert row by hand");
    let d = download(
        &fx.api,
        &format!("/v1/calls/{silent_call}/recording?recording_id={evil}"),
    )
    .await;
    assert_eq!(d.status, 500);
    assert!(!d.body.starts_with(b"RIFF"));
}
on_both_backends!(api_serves_recordings);

/// `SAUTIKIT_PUBLIC_URL` is the base of the download URLs the API hands out.
async fn public_url_setting(backend: Backend) {
    let fx = api_fixture(
        backend,
        &[("SAUTIKIT_PUBLIC_URL", "https://voice.example.com/base/")],
    )
    .await;
    let call = start_call(&fx.store, &fx.ws, &fx.number_id, Utc::now()).await;
    let (id, _) = record(&fx, &call, 8_000, Utc::now()).await;
    let r = fx.api.get(&format!("/v1/calls/{call}/recordings")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json()[0]["download_url"],
        format!("https://voice.example.com/base/v1/calls/{call}/recording?recording_id={id}")
    );
}
on_both_backends!(public_url_setting);

/// A public URL that is not an absolute http(s) URL stops `serve` before it starts.
#[test]
fn bad_public_url_refused() {
    for bad in [
        "voice.example.com",
        "ftp://voice.example.com",
        "https://x.example/?a=1",
    ] {
        let out = std::process::Command::new(common::BIN)
            .arg("serve")
            .env("SAUTIKIT_PUBLIC_URL", bad)
            .env("SAUTIKIT_DATA_DIR", "/nonexistent/sautikit-recordings-test")
            .output()
            .expect("run sautikit serve");
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("public-url"), "{bad}: {err}");
    }
}
