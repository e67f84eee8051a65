//! The README's walk-through, as the README has it: its shell blocks from the guide's steps to
//! the first call are taken from README.md and run with bash against a fresh dev server, so the
//! manual cannot drift from the product. Only the addresses differ (the test's server listens
//! on ports of its own), through the variables the blocks read.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Backend, Mode, Server, TestDb};

/// The ```sh blocks between the README's marker comment and the next `## ` heading after the
/// first call.
fn walkthrough(readme: &str) -> String {
    let start = readme
        .find("<!-- The blocks below are run as they stand by tests/readme.rs")
        .expect("the README marks its tested blocks");
    let end = readme[start..]
        .find("\n## API conventions")
        .map(|i| start + i)
        .expect("the walk-through ends before the API conventions");
    let mut script = String::new();
    let mut inside = false;
    for line in readme[start..end].lines() {
        match (inside, line.trim_end()) {
            (false, "```sh") => inside = true,
            (true, "```") => {
                inside = false;
                script.push('\n');
            }
            (true, text) => {
                script.push_str(text);
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_walkthrough_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let script = walkthrough(&readme);
    assert!(
        script.contains("sautikit phone call") && script.contains("/claim"),
        "{script}"
    );

    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start(&db, Mode::Dev);
    // The reader's working directory: the repository's examples, and the data directory where
    // `scripts/run.sh` keeps it.
    let cwd = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join("examples"), cwd.path().join("examples")).unwrap();
    std::os::unix::fs::symlink(&db.data_dir, cwd.path().join("sautikit-data")).unwrap();
    let port = free_port();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_sautikit")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bash = tokio::process::Command::new("bash");
    bash.args(["-euo", "pipefail", "-c", &script])
        .current_dir(cwd.path())
        .env_remove("SAUTIKIT_API_KEY")
        .env("PATH", path)
        .env("SAUTIKIT_API_URL", &server.base)
        .env("SAUTIKIT_SIP_SERVER", server.sip_addr().to_string())
        .env("PORT", port.to_string())
        .env("HANDLER_URL", format!("http://127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), bash.output())
        .await
        .expect("the walk-through finished within 120 s")
        .expect("bash ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the walk-through failed ({:?}):\n{stdout}\n{stderr}",
        output.status
    );
    // Each step did what the guide says: a claim, routing, a credential and its rotation, a
    // top-up, and the first call, in which the handler heard the key the phone pressed.
    for expected in [
        "\"status\": \"active\"",
        "\"voice_callback_url\": \"http://127.0.0.1:",
        "\"username\": \"ts_",
        "\"provider\": \"test\"",
        "200: answered (PCMU",
        "sent key 7",
        "/key",
        "\"Digits\": \"7\"",
        "they hung up (BYE)",
        "\"status\": \"completed\"",
        "call.ended",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}\n{stderr}"
        );
    }
    let heard = std::fs::read(cwd.path().join("heard.wav")).expect("heard.wav saved");
    let (_, _, samples) = sautikit_sip::wav::parse_wav(&heard).unwrap();
    assert!(
        common::audio::voiced_span(&samples).is_some(),
        "speech in heard.wav"
    );
}
