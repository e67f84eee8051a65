//! Pacing, in a test binary of its own so that no other test's calls share the machine with it:
//! over a 10 s prompt the caller sees one packet every 20 ms (p99 within 5 ms). Runs on SQLite and
//! PostgreSQL.

mod common;

use std::time::Duration;

use common::Backend;
use common::caller::{Caller, deviation_p99, spacings};
use common::calls::setup;
use serde_json::json;

/// A 10 s prompt arrives paced: packet spacing p99 within 5 ms of 20 ms at the receiver.
async fn prompts_are_paced(backend: Backend) {
    let ctx = setup(backend, "/long-say").await;
    let text = "This is a long prompt that keeps the caller listening for about ten seconds, \
                so that the pacing of the packets can be measured properly by the receiver, \
                one frame every twenty milliseconds, from start to end.";
    ctx.voice.set_script(
        "/long-say",
        json!({"actions": [{"say": {"text": text}}, {"hangup": {}}]}),
    );
    let sip = ctx.server.sip_addr();
    let packets = tokio::task::spawn_blocking(move || Caller::new(sip).call())
        .await
        .unwrap();
    let duration = packets.last().unwrap().at - packets[0].at;
    assert!(duration >= Duration::from_secs(8), "{duration:?}");
    let spacing = spacings(&packets);
    let p99 = deviation_p99(&spacing);
    println!(
        "{} packets over {duration:?}; spacing p50 {:.2} ms, |Δ−20 ms| p99 {p99:.2} ms",
        packets.len(),
        spacing[spacing.len() / 2]
    );
    assert!(p99 <= 5.0, "spacing deviation p99 {p99} ms");
}
on_both_backends!(prompts_are_paced);
