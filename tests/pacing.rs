//! Pacing, in a test binary of its own so that no other test's calls share the machine with it:
//! over a 10 s prompt the caller sees one packet every 20 ms. Runs on SQLite and PostgreSQL.
//!
//! The target (spacing p99 within 5 ms of 20 ms, with 2,000 calls) is measured by the `calls`
//! benchmark (`BENCH_TESTS=hold`), not asserted here: on a shared machine one stall of the host
//! moves the p99 of a single 12 s call past 5 ms (seen once in CI at 5.6 ms, against 0.8 ms in
//! the runs before and after). This test asserts what no stall explains away: the packets come
//! at 20 ms, not in bursts, and nearly all of them on time.

mod common;

use std::time::Duration;

use common::Backend;
use common::caller::{Caller, deviation_p99, spacings};
use common::calls::setup;
use serde_json::json;

/// A 10 s prompt arrives paced: median spacing 20 ms (±1), and at least 95 % of the packets
/// within 5 ms of it (its p99 is printed).
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
    let median = spacing[spacing.len() / 2];
    assert!(
        (19.0..=21.0).contains(&median),
        "median spacing {median} ms"
    );
    let on_time = spacing.iter().filter(|s| (*s - 20.0).abs() <= 5.0).count();
    assert!(
        on_time * 100 >= spacing.len() * 95,
        "{on_time} of {} spacings within 5 ms of 20 ms",
        spacing.len()
    );
}
on_both_backends!(prompts_are_paced);
