//! `stream` and `stopStream` (see `crate::voice::Stream`): the call's live audio to a WebSocket
//! agent. A bidirectional stream holds the script until its socket closes (a failure to connect
//! is a failed step, and the script goes on); a fork lets the script go on at once and lasts
//! until `stopStream` or the call's end. Every stream's start and end are on the timeline and,
//! with `statusCallback`, POSTed there.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::json;
use tracing::{info, warn};

use super::{Step, ensure_answered};
use crate::callback::{CallbackMethod, CallbackRequest};
use crate::calls::call::{CallMsg, CallState, Waiting};
use crate::streaming::{self, SessionCmd, SessionEvent, StreamCounters, StreamSpec};
use crate::voice::Stream;

/// A stream of the call.
pub(in crate::calls) struct ActiveStream {
    sid: String,
    control: tokio::sync::mpsc::UnboundedSender<SessionCmd>,
    counters: Arc<StreamCounters>,
    bidirectional: bool,
    status_callback: Option<String>,
    started: bool,
}

pub(super) async fn run(call: &mut CallState, s: &Stream) -> Step {
    if let Some(step) = ensure_answered(call).await {
        return step;
    }
    let Some(port) = call.rtp.as_ref().map(|p| p.id) else {
        call.fail("media.no_port").await;
        return Step::Ended;
    };
    let sid = format!("MZ{}", uuid::Uuid::now_v7().simple());
    let spec = StreamSpec {
        stream_sid: sid.clone(),
        workspace_id: call.route_ref().workspace_id.clone(),
        call_id: call.call_id.clone(),
        url: s.url.clone(),
        track: s.track,
        bidirectional: s.bidirectional,
        custom_parameters: s.custom_parameters.clone(),
        format: s.media_format,
        port,
    };
    let me = call.myself.clone();
    let event_sid = sid.clone();
    let handle = streaming::start(
        call.deps.media.clone(),
        call.deps.streams.clone(),
        spec,
        move |event| {
            let _ = me.cast(CallMsg::StreamEvent {
                sid: event_sid.clone(),
                event,
            });
        },
    );
    call.note(
        "stream.connecting",
        json!({"stream_sid": sid, "url": s.url, "track": s.track.names(), "bidirectional": s.bidirectional}),
    );
    info!(call_id = %call.call_id, stream_sid = %sid, "media stream connecting");
    call.streams.push(ActiveStream {
        sid: sid.clone(),
        control: handle.control,
        counters: handle.counters,
        bidirectional: s.bidirectional,
        status_callback: s.status_callback.clone(),
        started: false,
    });
    if s.bidirectional {
        call.waiting = Waiting::Stream;
        Step::Wait
    } else {
        Step::Next
    }
}

/// `stopStream`: the call's forked streams end.
pub(super) fn stop(call: &mut CallState) -> Step {
    for st in call.streams.iter().filter(|st| !st.bidirectional) {
        let _ = st.control.send(SessionCmd::Stop);
    }
    Step::Next
}

/// A stream started or ended.
pub(in crate::calls) async fn event(call: &mut CallState, sid: String, event: SessionEvent) {
    let Some(i) = call.streams.iter().position(|st| st.sid == sid) else {
        return;
    };
    match event {
        SessionEvent::Started => {
            if let Some(st) = call.streams.get_mut(i) {
                st.started = true;
            }
            call.note("stream.started", json!({"stream_sid": sid}));
            status(call, &call.streams[i], "stream-started", None);
        }
        SessionEvent::Ended { reason, message } => {
            let counts = counts(&call.streams[i].counters);
            let failure = reason.starts_with("stream.");
            call.note(
                if failure { "stream.failed" } else { "stream.stopped" },
                json!({"stream_sid": sid, "reason": reason, "message": message, "frames_sent": counts.0, "frames_received": counts.1, "frames_dropped": counts.2}),
            );
            status(
                call,
                &call.streams[i],
                if failure {
                    "stream-error"
                } else {
                    "stream-stopped"
                },
                failure.then_some(reason),
            );
            let st = call.streams.remove(i);
            if st.bidirectional && call.waiting == Waiting::Stream {
                // The socket closed: the script goes on (a failed connection is a failed step).
                call.waiting = Waiting::Nothing;
                if failure {
                    call.note("action.failed", json!({"failure_reason": reason}));
                    call.action_finished("failed");
                } else {
                    call.action_finished("completed");
                }
                call.index += 1;
                call.run().await;
            }
        }
    }
}

/// A key from the caller goes to every stream.
pub(in crate::calls) fn digit(call: &CallState, key: char) {
    for st in &call.streams {
        let _ = st.control.send(SessionCmd::Dtmf(key));
    }
}

/// The call ends: every stream gets `stop` and closes; its end is on the call's timeline.
pub(in crate::calls) fn call_ended(call: &mut CallState) {
    for st in std::mem::take(&mut call.streams) {
        let _ = st.control.send(SessionCmd::Stop);
        let counts = counts(&st.counters);
        call.note(
            "stream.stopped",
            json!({"stream_sid": st.sid, "reason": "call_ended", "frames_sent": counts.0, "frames_received": counts.1, "frames_dropped": counts.2}),
        );
        status(call, &st, "stream-stopped", None);
    }
}

fn counts(c: &StreamCounters) -> (u64, u64, u64) {
    (
        c.frames_sent.load(Ordering::Relaxed),
        c.frames_received.load(Ordering::Relaxed),
        c.frames_dropped.load(Ordering::Relaxed),
    )
}

/// POST the stream's status to its `statusCallback`, without waiting for the answer.
fn status(call: &CallState, st: &ActiveStream, event: &str, error: Option<&str>) {
    let Some(url) = st.status_callback.as_deref() else {
        return;
    };
    let Ok(url) = crate::voice::resolve_url(&call.document_url, url) else {
        return;
    };
    let mut extra = vec![
        (
            "AccountSid".to_owned(),
            call.route_ref().workspace_id.clone(),
        ),
        ("CallSid".to_owned(), call.call_id.clone()),
        ("StreamSid".to_owned(), st.sid.clone()),
        ("StreamEvent".to_owned(), event.to_owned()),
        ("Timestamp".to_owned(), call.now().to_rfc3339()),
    ];
    if let Some(e) = error {
        extra.push(("StreamError".to_owned(), e.to_owned()));
    }
    let request = CallbackRequest {
        url,
        method: CallbackMethod::Post,
        fields: call.fields(extra),
        secret: call.route_ref().webhook_secret.clone(),
        call_id: call.call_id.clone(),
    };
    let client = call.deps.callback.clone();
    let call_id = call.call_id.clone();
    tokio::spawn(async move {
        // Its reply is not a script: only a failure to deliver is worth a line.
        if let Err(crate::callback::CallbackFailure::Unreachable { .. }) =
            client.fetch(request).await
        {
            warn!(call_id = %call_id, "a stream's statusCallback was unreachable");
        }
    });
}
