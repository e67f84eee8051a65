//! `record`: an optional beep, then the caller's audio into a WAV file (8 kHz, 16-bit) under the
//! data directory until `maxLength`, `timeout` seconds of silence, a `finishOnKey` key or the
//! caller hangs up. The recording is stored with `call.recording.ready`, and `RecordingUrl`,
//! `RecordingId`, `RecordingDuration` (and `Digits`: the key that ended it) are posted to `action`
//! or the voice callback.

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

use super::{Step, ensure_answered, post_step};
use crate::call_store::RecordingReady;
use crate::calls::call::{CallState, Waiting};
use crate::media::{RecordingEnd, RecordingOutcome, RecordingSpec, recording_path};
use crate::synth::Audio;
use crate::voice::Record;

/// A `record` in progress.
pub(in crate::calls) struct ActiveRecording {
    spec: Record,
    recording_id: String,
    /// The beep is over and audio is being written.
    started: bool,
}

/// 250 ms at 1 kHz, like a voicemail beep.
fn beep() -> Audio {
    static BEEP: OnceLock<Audio> = OnceLock::new();
    BEEP.get_or_init(|| Audio::new(sautikit_sip::tone::beep(1000.0, 250, 8000, 0.4)))
        .clone()
}

pub(super) async fn run(call: &mut CallState, spec: &Record) -> Step {
    if let Some(step) = ensure_answered(call).await {
        return step;
    }
    call.recording = Some(ActiveRecording {
        spec: spec.clone(),
        recording_id: uuid::Uuid::now_v7().to_string(),
        started: false,
    });
    if spec.play_beep {
        super::prompt::play(call, beep(), 1);
    } else {
        start(call);
    }
    Step::Wait
}

/// The beep is over (or there was none): record.
pub(super) fn start(call: &mut CallState) {
    let (Some(r), Some(port)) = (call.recording.as_mut(), call.rtp.as_ref()) else {
        return;
    };
    r.started = true;
    let path = call
        .deps
        .data_dir
        .join(recording_path(&call.call_id, &r.recording_id));
    let spec = RecordingSpec {
        recording_id: r.recording_id.clone(),
        path,
        max_length: Duration::from_secs(u64::from(r.spec.max_length_seconds.max(1))),
        silence_timeout: (r.spec.timeout_seconds > 0)
            .then(|| Duration::from_secs(u64::from(r.spec.timeout_seconds))),
        finish_keys: r.spec.finish_on_key.clone(),
    };
    call.deps.media.start_recording(port.id, spec);
    let id = r.recording_id.clone();
    call.note("recording.started", json!({"recording_id": id}));
    call.waiting = Waiting::Recording;
}

pub(super) fn is_recording(call: &CallState) -> bool {
    call.recording.as_ref().is_some_and(|r| r.started)
}

/// A key from SIP INFO (RFC 4733 keys are handled by the media task itself).
pub(super) fn digit(call: &mut CallState, key: char) {
    if let (Some(r), Some(port)) = (call.recording.as_ref(), call.rtp.as_ref())
        && r.started
        && r.spec.finish_on_key.contains(key)
    {
        call.deps
            .media
            .stop_recording(port.id, RecordingEnd::FinishKey(key));
    }
}

/// The WAV file is complete: store it, then post it.
pub(super) async fn finished(call: &mut CallState, outcome: RecordingOutcome) {
    let Some(r) = call.recording.take() else {
        return;
    };
    if outcome.recording_id != r.recording_id {
        return;
    }
    if !store(call, &outcome).await {
        call.fail("record.failed").await;
        return;
    }
    let digits = match outcome.end {
        RecordingEnd::FinishKey(k) => k.to_string(),
        _ => String::new(),
    };
    let fields = vec![
        (
            "RecordingUrl".to_owned(),
            download_url(call, &outcome.recording_id),
        ),
        ("RecordingId".to_owned(), outcome.recording_id.clone()),
        (
            "RecordingDuration".to_owned(),
            outcome.duration_ms.div_ceil(1000).to_string(),
        ),
        ("Digits".to_owned(), digits),
    ];
    post_step(call, r.spec.action.as_deref(), fields).await;
}

/// The call is ending while recording: finish the file and store it (no callback: the call is
/// over).
pub(super) async fn interrupted(call: &mut CallState) {
    let Some(r) = call.recording.take() else {
        return;
    };
    let Some(port) = call.rtp.as_ref() else {
        return;
    };
    if !r.started {
        return;
    }
    if let Some(outcome) = call
        .deps
        .media
        .finish_recording(port.id, RecordingEnd::Hangup)
        .await
    {
        store(call, &outcome).await;
    }
}

fn download_url(call: &CallState, recording_id: &str) -> String {
    format!(
        "{}/v1/calls/{}/recording?recording_id={recording_id}",
        call.deps.public_url.trim_end_matches('/'),
        call.call_id
    )
}

/// Write the recording's row and event; false if the file or the store failed.
async fn store(call: &mut CallState, outcome: &RecordingOutcome) -> bool {
    if let Some(e) = &outcome.error {
        call.note(
            "recording.failed",
            json!({"recording_id": outcome.recording_id, "error": e}),
        );
        return false;
    }
    call.note(
        "recording.finished",
        json!({"recording_id": outcome.recording_id, "duration_ms": outcome.duration_ms, "size_bytes": outcome.size_bytes, "ended_by": outcome.end.as_str()}),
    );
    let relative = recording_path(&call.call_id, &outcome.recording_id);
    let ready = RecordingReady {
        recording_id: outcome.recording_id.clone(),
        call_id: call.call_id.clone(),
        path: relative.to_string_lossy().into_owned(),
        duration_ms: outcome.duration_ms,
        size_bytes: outcome.size_bytes,
        created_at: call.now(),
        timeline: std::mem::take(&mut call.timeline),
    };
    match call.deps.store.recording_ready(ready).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(call_id = %call.call_id, error = %e, "storing a recording failed");
            false
        }
    }
}
