//! `sautikit phone call` against a running server: the caller hears the guide's FastAPI handler
//! (checked against espeak-ng's own rendering), its keys reach `getDigits`, `--hangup-after`
//! ends the call as the caller's hangup, and a refused call exits non-zero. The phone is a
//! client: these run on SQLite only.

mod common;

use std::process::Output;
use std::time::Duration;

use common::Backend;
use common::audio::{correlation, espeak_reference, voiced_span};
use common::calls::{Ctx, NUMBER, setup, wait_for_calls};
use serde_json::json;

/// Run `sautikit phone call` with `args` after the number, the API key in the environment.
async fn phone(ctx: &Ctx, number: &str, args: &[&str]) -> (Output, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sautikit"));
    command
        .args(["phone", "call", number, "--server"])
        .arg(ctx.server.sip_addr().to_string())
        .args(args)
        .env("SAUTIKIT_API_URL", &ctx.api.base)
        .env("SAUTIKIT_API_KEY", ctx.api.key().expect("a key"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("the phone finished within 90 s")
        .expect("the phone ran");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!(
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    (output, stdout)
}

fn printed_call_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("call id: "))
        .unwrap_or_else(|| panic!("no call id printed:\n{stdout}"))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_phone_call_hears_the_guide_handler() {
    let ctx = setup(Backend::Sqlite, "/unused").await;
    let _uvicorn = common::guide::route_number_to_guide(&ctx).await;
    let dir = tempfile::tempdir().unwrap();
    let heard_path = dir.path().join("heard.wav");
    let (output, stdout) = phone(&ctx, NUMBER, &["--record", heard_path.to_str().unwrap()]).await;
    assert!(output.status.success(), "exit {:?}", output.status);
    for line in [
        "200: answered (PCMU",
        "prompt 1 starts",
        "they hung up (BYE)",
        "timeline:",
        "action.started",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    // The record, as a table of field and value.
    for row in [
        "status completed",
        "hangup_cause engine_hangup",
        "cost KES 0.00",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == row),
            "{row:?} missing from:\n{stdout}"
        );
    }
    // The id printed is the call's, as the guide's `GET /v1/calls?limit=1` shows it.
    let id = printed_call_id(&stdout);
    let newest = ctx.api.get("/v1/calls?limit=1").await.json();
    assert_eq!(newest[0]["id"], id.as_str(), "{newest}");

    // What was saved is what the guide's handler says, as espeak-ng renders it.
    let wav = std::fs::read(&heard_path).unwrap();
    let (rate, channels, heard) = sautikit_sip::wav::parse_wav(&wav).unwrap();
    assert_eq!((rate, channels), (8_000, 1));
    let reference = espeak_reference("Hello, thank you for calling.", "en-us+f2", dir.path());
    let corr = correlation(&reference, &heard, 400);
    let (h0, h1) = voiced_span(&heard).expect("speech in the saved WAV");
    let (r0, r1) = voiced_span(&reference).unwrap();
    println!(
        "correlation {corr:.3}; spoken {} ms heard vs {} ms from espeak-ng",
        (h1 - h0) / 8,
        (r1 - r0) / 8
    );
    assert!(corr >= 0.9, "correlation {corr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_reach_get_digits_and_hangup_after_is_the_callers_hangup() {
    let ctx = setup(Backend::Sqlite, "/menu").await;
    ctx.voice.set_script(
        "/menu",
        json!({"actions": [
            {"getDigits": {"numDigits": 2, "timeout": 10, "action": "/digits",
                "nested": [{"say": {"text": "Enter two digits."}}]}},
        ]}),
    );
    ctx.voice
        .set_script("/digits", json!({"actions": [{"pause": {"length": 30}}]}));
    // Over TCP, so that the phone's TCP path is covered too.
    let (output, stdout) = phone(
        &ctx,
        NUMBER,
        &["--tcp", "--dtmf", "4@1.0,2", "--hangup-after", "4"],
    )
    .await;
    assert!(output.status.success(), "exit {:?}", output.status);
    for line in ["sent key 4", "sent key 2", "hanging up", "we hung up (BYE)"] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    let digits: Vec<String> = ctx
        .voice
        .hits()
        .iter()
        .filter(|h| h.path == "/digits")
        .map(|h| h.fields.get("Digits").cloned().unwrap_or_default())
        .collect();
    assert_eq!(digits, ["42"]);
    let calls = wait_for_calls(&ctx.api, 1, |c| c["status"] == "completed").await;
    assert_eq!(calls[0]["hangup_cause"], "caller_hangup", "{}", calls[0]);
    assert_eq!(calls[0]["id"], printed_call_id(&stdout).as_str());
    let d = calls[0]["duration_seconds"].as_i64().unwrap();
    assert!((4..=5).contains(&d), "duration {d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_call_exits_non_zero() {
    let ctx = setup(Backend::Sqlite, "/unused").await;
    // Not a number of ours: 404.
    let (output, stdout) = phone(&ctx, "+254799999999", &[]).await;
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("404 Not Found: the call was not connected"),
        "{stdout}"
    );
    // Bad input is refused before any call, with exit code 2.
    let (output, _) = phone(&ctx, NUMBER, &["--dtmf", "x"]).await;
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--dtmf"), "{err}");
}

/// `sautikit phone register` as the number's softphone: registered with a credential, it rings
/// when the number is called, answers with a WAV file, and the caller (`sautikit phone call`)
/// hears that file through the engine's bridge; then it hangs up and unregisters.
#[tokio::test(flavor = "multi_thread")]
async fn a_registered_phone_answers_and_the_caller_hears_it() {
    use common::device::{FIRST_INVENTORY_ID, claim, new_credential, registrations};
    use common::{Mode, Server, TestDb, wait_for_json};

    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start(&db, Mode::Dev);
    let (_, key) = db.workspace("phones", 100_000);
    let api = server.api(&key);
    // No voice callback: calls to the number ring its devices.
    let number_id = claim(&api, FIRST_INVENTORY_ID).await;
    let (_, username, password) = new_credential(&api, &number_id, "desk").await;

    let dir = tempfile::tempdir().unwrap();
    let text = "This is the desk phone speaking.";
    let reference = espeak_reference(text, "en-us+m3", dir.path());
    let greeting = dir.path().join("greeting.wav");
    std::fs::write(
        &greeting,
        sautikit_sip::wav::encode_pcm16(8_000, &reference),
    )
    .unwrap();
    let sip = server.sip_addr().to_string();
    let softphone = tokio::process::Command::new(env!("CARGO_BIN_EXE_sautikit"))
        .args([
            "phone",
            "register",
            "--username",
            &username,
            "--server",
            &sip,
        ])
        .arg("--answer-with")
        .arg(&greeting)
        .args(["--hangup-after", "3", "--calls", "1"])
        .env("SAUTIKIT_SIP_PASSWORD", &password)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the softphone started");
    let listed = wait_for_json(
        &api,
        &format!("/v1/numbers/{number_id}/registrations"),
        Duration::from_secs(30),
        |v| v.as_array().is_some_and(|a| a.len() == 1),
    )
    .await;
    assert_eq!(listed[0]["user_agent"], "sautikit-phone", "{listed}");

    let heard_path = dir.path().join("heard.wav");
    let mut caller = tokio::process::Command::new(env!("CARGO_BIN_EXE_sautikit"));
    caller
        .args(["phone", "call", NUMBER, "--server", &sip, "--record"])
        .arg(&heard_path)
        .env_remove("SAUTIKIT_API_KEY")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let called = tokio::time::timeout(Duration::from_secs(60), caller.output())
        .await
        .expect("the call ended within 60 s")
        .unwrap();
    let called_out = String::from_utf8_lossy(&called.stdout);
    println!("{called_out}");
    assert!(called.status.success(), "{called_out}");
    assert!(called_out.contains("they hung up (BYE)"), "{called_out}");

    let registered = tokio::time::timeout(Duration::from_secs(30), softphone.wait_with_output())
        .await
        .expect("the softphone unregistered and exited")
        .unwrap();
    let phone_out = String::from_utf8_lossy(&registered.stdout);
    println!("{phone_out}");
    assert!(registered.status.success(), "{phone_out}");
    for line in [
        "registered for",
        "call from",
        "answered (PCMU)",
        "hanging up",
        "we hung up (BYE)",
        "unregistered",
    ] {
        assert!(
            phone_out.contains(line),
            "{line:?} missing from:\n{phone_out}"
        );
    }
    assert!(registrations(&api, &number_id).await.is_empty());

    // What the caller heard is the softphone's file, through the engine's bridge.
    let (_, _, heard) = sautikit_sip::wav::parse_wav(&std::fs::read(&heard_path).unwrap()).unwrap();
    let corr = correlation(&reference, &heard, 400);
    println!("correlation {corr:.3}");
    assert!(corr >= 0.9, "correlation {corr}");
    let calls = wait_for_calls(&api, 1, |c| c["status"] == "completed").await;
    assert_eq!(calls[0]["hangup_cause"], "callee_hangup", "{}", calls[0]);
}
