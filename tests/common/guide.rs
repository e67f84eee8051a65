//! The guide's FastAPI voice handler (tests/python/guide_voice.py), served by uvicorn.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Start the guide's FastAPI handler under uvicorn (tests/python; scripts/test.sh makes the venv).
fn uvicorn(port: u16) -> std::process::Child {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    std::process::Command::new(root.join(".venv/bin/uvicorn"))
        .current_dir(&root)
        .args(["guide_voice:app", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("uvicorn in tests/python/.venv (scripts/test.sh installs it)")
}

/// Wait until `url` answers; false if uvicorn exited first (its port was taken meanwhile).
async fn wait_for_http(url: &str, uvicorn: &mut std::process::Child) -> bool {
    let client = reqwest::Client::new();
    // Python imports FastAPI slowly on a busy 2-core machine: allow a minute.
    for _ in 0..1200 {
        if client.post(url).send().await.is_ok() {
            return true;
        }
        if uvicorn.try_wait().ok().flatten().is_some() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

/// The guide's handler on a free TCP port, and its `/voice` URL. A port free when picked can be
/// taken before uvicorn binds it (tests run in parallel): then another is tried.
pub async fn guide_handler() -> (KillOnDrop, String) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free TCP port");
        let mut child = KillOnDrop(uvicorn(port));
        let url = format!("http://127.0.0.1:{port}/voice");
        if wait_for_http(&url, &mut child.0).await {
            return (child, url);
        }
    }
    panic!("uvicorn could not start on any of 5 ports");
}

pub struct KillOnDrop(pub std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guide's handler started and set as the voice callback of the context's number; the
/// handler runs until the returned guard drops.
pub async fn route_number_to_guide(ctx: &super::calls::Ctx) -> KillOnDrop {
    let (uvicorn, voice_url) = guide_handler().await;
    ctx.api
        .patch(
            &format!("/v1/numbers/{}/routing", ctx.number_id),
            serde_json::json!({"voice_callback_url": voice_url}),
        )
        .await;
    uvicorn
}
