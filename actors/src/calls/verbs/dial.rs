//! `dial`: put the caller through to another party (DESIGN §7). Every target becomes an
//! outbound leg of this call with a call record of its own (`parent_call_id` = this call), paid
//! at the number's outbound rate through the prepaid module. The first leg to answer is bridged
//! to the caller and the others get CANCEL. The result (`DialStatus`, `DialDuration`,
//! `DialSipStatus`, `DialCallId`) is always posted: to `action` or the voice callback while the
//! caller is still here (its reply replaces the rest of the script, an empty one goes on), and
//! fire-and-forget when the caller hung up first.
//!
//! Until a leg answers the caller hears a ringback tone, or with one target the party's own
//! early media once its RTP really flows. With `answerOnBridge` the caller is not answered
//! until the party is: it gets `180`/`183` passed on instead.

use std::sync::OnceLock;
use std::time::Duration;

use sautikit_sip::rsip;
use sautikit_sip::transaction::{Peer, Transport};
use serde_json::json;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Step, post_step};
use crate::call_store::CallStatus;
use crate::callback::{CallbackMethod, CallbackRequest};
use crate::calls::call::{CallMsg, CallState, Phase, Waiting, normalize_number};
use crate::calls::leg::{LegOutcome, LegRefusal, LegState, LegTarget};
use crate::calls::trunk;
use crate::media::{MediaEvent, StreamParams};
use crate::model::NumberStatus;
use crate::synth::{Audio, SAMPLE_RATE};
use crate::voice::{DeviceTarget, Dial, DialTarget, resolve_url};

/// How long resolving a `sip` target's host may take.
const RESOLVE_WAIT: Duration = Duration::from_secs(5);

/// A `dial` in progress.
pub(in crate::calls) struct ActiveDial {
    action: Option<String>,
    ring_timeout: Duration,
    time_limit: Duration,
    answer_on_bridge: bool,
    /// This dial's legs (leg numbers of the call).
    legs: Vec<u32>,
    /// The code standing for targets that were never placed (no trunk, no device, a wallet
    /// that cannot pay, a forbidden address), reported when no leg got a response.
    unplaced: Option<u16>,
    winner: Option<u32>,
    answered_at: Option<Instant>,
    /// The ringback tone plays on the caller.
    ringback: bool,
    /// The leg whose early media is bridged to the caller.
    early: Option<u32>,
    /// `180`/`183` was passed on to the caller.
    alerted: bool,
    timed_out: bool,
    /// Names this dial's timers (ring, time limit).
    seq: u64,
}

pub(super) async fn run(call: &mut CallState, d: &Dial) -> Step {
    let path = format!("actions[{}].dial", call.index);
    let Some(caller_id) = caller_id(call, d, &path).await else {
        return Step::Ended;
    };
    call.waiting = Waiting::Bridge;
    if let Err(reason) = call.open_caller_port().await {
        call.fail(reason).await;
        return Step::Ended;
    }
    call.timer_seq += 1;
    let seq = call.timer_seq;
    let ring_timeout = Duration::from_secs(u64::from(d.timeout_seconds));
    call.dial = Some(ActiveDial {
        action: d.action.clone(),
        ring_timeout,
        time_limit: Duration::from_secs(u64::from(d.time_limit_seconds)),
        answer_on_bridge: d.answer_on_bridge,
        legs: Vec::new(),
        unplaced: None,
        winner: None,
        answered_at: None,
        ringback: false,
        early: None,
        alerted: false,
        timed_out: false,
        seq,
    });
    for target in targets(call, d, &caller_id).await {
        let placed = match target {
            Ok(t) => {
                let label = t.label.clone();
                match call.place_leg(t).await {
                    Ok(n) => Ok(n),
                    Err(LegRefusal::InsufficientFunds) => Err(402),
                    Err(LegRefusal::Failed(reason)) => {
                        call.note(
                            "dial.not_placed",
                            json!({"target": label, "reason": reason}),
                        );
                        Err(500)
                    }
                }
            }
            Err(code) => Err(code),
        };
        if let Some(dial) = call.dial.as_mut() {
            match placed {
                Ok(n) => dial.legs.push(n),
                Err(code) => dial.unplaced = Some(code),
            }
        }
    }
    let placed = call.dial.as_ref().map_or(0, |d| d.legs.len());
    if placed == 0 {
        conclude(call).await;
        return Step::Wait;
    }
    info!(call_id = %call.call_id, number_id = %call.route_ref().number_id, workspace_id = %call.route_ref().workspace_id, legs = placed, "dialling");
    let me = call.myself.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ring_timeout).await;
        let _ = me.cast(CallMsg::DialRingTimedOut { seq });
    });
    if !d.answer_on_bridge {
        if call.phase == Phase::Ringing
            && let Err(reason) = call.answer().await
        {
            call.fail(reason).await;
            return Step::Ended;
        }
        start_ringback(call);
    }
    Step::Wait
}

/// The number the dialled parties see: `callerId` when the workspace may present it, else the
/// caller's own number (an inbound call forwarded), else ours. `None`: the call was failed.
async fn caller_id(call: &mut CallState, d: &Dial, path: &str) -> Option<String> {
    let route = call.route_ref().clone();
    let forwarding = call.direction == "inbound" && normalize_number(&call.from).is_some();
    let wanted = match &d.caller_id {
        None if forwarding => return Some(call.from.clone()),
        None => return Some(route.number),
        Some(c) if *c == route.number || (forwarding && *c == call.from) => return Some(c.clone()),
        Some(c) => c.clone(),
    };
    match call.deps.store.route_by_number(&wanted).await {
        Ok(Some(r)) if r.workspace_id == route.workspace_id && r.status == NumberStatus::Active => {
            Some(wanted)
        }
        Ok(_) => {
            call.note(
                "action.failed",
                json!({"reason": "callback.invalid_actions", "path": format!("{path}.callerId"),
                       "message": format!("{path}.callerId: must be one of the workspace's numbers or the caller's own number")}),
            );
            call.fail("callback.invalid_actions").await;
            None
        }
        Err(e) => {
            warn!(call_id = %call.call_id, error = %e, "could not check a dial's callerId");
            call.fail("engine.error").await;
            None
        }
    }
}

/// Where each target goes, or the code that stands for why it cannot be placed.
async fn targets(call: &mut CallState, d: &Dial, caller_id: &str) -> Vec<Result<LegTarget, u16>> {
    let host = call.invite.local.ip().to_string();
    let from = format!("sip:{caller_id}@{host}");
    match &d.target {
        DialTarget::Number(n) => vec![number_target(call, n, &from, caller_id).await],
        DialTarget::Numbers(list) => {
            let mut targets = Vec::with_capacity(list.len());
            for n in list {
                targets.push(number_target(call, n, &from, caller_id).await);
            }
            targets
        }
        DialTarget::Sip(uri) => vec![sip_target(call, uri, &from, caller_id).await],
        DialTarget::Device(which) => device_targets(call, which, &from, caller_id).await,
    }
}

/// A number: on-net when it is one of our numbers (the INVITE goes to our own listener and
/// arrives as an inbound call to it), otherwise through the trunk.
async fn number_target(
    call: &mut CallState,
    number: &str,
    from: &str,
    caller_id: &str,
) -> Result<LegTarget, u16> {
    match call.deps.store.route_by_number(number).await {
        Ok(Some(r)) if r.status != NumberStatus::Released => {
            let local = call.invite.local;
            let uri = format!("sip:{number}@{local}");
            return Ok(LegTarget {
                label: number.to_owned(),
                uri: uri.clone(),
                to: uri,
                from: from.to_owned(),
                from_display: Some(caller_id.to_owned()),
                peer: Peer {
                    addr: local,
                    transport: Transport::Udp,
                },
                extra: Vec::new(),
                record: Some((caller_id.to_owned(), number.to_owned())),
            });
        }
        Ok(_) => {}
        Err(e) => {
            warn!(call_id = %call.call_id, error = %e, "could not look a dialled number up");
            return Err(500);
        }
    }
    let Some(trunk) = call.deps.trunk.clone() else {
        call.note(
            "dial.not_placed",
            json!({"target": number, "reason": "trunk.not_configured"}),
        );
        return Err(503);
    };
    Ok(LegTarget {
        label: number.to_owned(),
        uri: trunk.uri(number),
        to: trunk.uri(number),
        from: from.to_owned(),
        from_display: Some(caller_id.to_owned()),
        peer: trunk.peer,
        extra: vec![("P-Asserted-Identity", format!("<{from}>"))],
        record: Some((caller_id.to_owned(), number.to_owned())),
    })
}

/// A `sip:` URI: its host resolved, and in production only to addresses the webhook rules
/// permit. `sips:` needs TLS, which the engine does not speak (`416`).
async fn sip_target(
    call: &mut CallState,
    text: &str,
    from: &str,
    caller_id: &str,
) -> Result<LegTarget, u16> {
    let refuse = |call: &mut CallState, reason: &str, code: u16| {
        call.note("dial.not_placed", json!({"target": text, "reason": reason}));
        Err(code)
    };
    let Ok(uri) = rsip::Uri::try_from(text) else {
        return refuse(call, "sip.bad_uri", 416);
    };
    if matches!(uri.scheme, Some(rsip::Scheme::Sips)) {
        return refuse(call, "sip.tls_unsupported", 416);
    }
    let host = uri.host_with_port.host.to_string();
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri
        .host_with_port
        .port
        .as_ref()
        .map_or(5060, |p| *p.value());
    let transport = if uri
        .params
        .iter()
        .any(|p| matches!(p, rsip::Param::Transport(t) if *t == rsip::Transport::Tcp))
    {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let resolved =
        tokio::time::timeout(RESOLVE_WAIT, tokio::net::lookup_host((host.as_str(), port))).await;
    let addrs: Vec<std::net::SocketAddr> = match resolved {
        Ok(Ok(a)) => a.collect(),
        _ => return refuse(call, "dns.unresolved", 503),
    };
    let Some(addr) = addrs
        .iter()
        .copied()
        .find(|a| call.deps.dial_policy.permits(a.ip()))
    else {
        return refuse(call, "address.forbidden", 403);
    };
    Ok(LegTarget {
        label: text.to_owned(),
        uri: text.to_owned(),
        to: text.to_owned(),
        from: from.to_owned(),
        from_display: Some(caller_id.to_owned()),
        peer: Peer { addr, transport },
        extra: Vec::new(),
        record: Some((caller_id.to_owned(), text.to_owned())),
    })
}

/// The number's registered devices this engine can reach: all, or those of one credential.
async fn device_targets(
    call: &mut CallState,
    which: &DeviceTarget,
    from: &str,
    caller_id: &str,
) -> Vec<Result<LegTarget, u16>> {
    let route = call.route_ref().clone();
    let now = call.now();
    let bindings = call
        .deps
        .devices
        .reachable_bindings(&route.number_id, &call.deps.engine_id, now)
        .await;
    let credentials = match which {
        DeviceTarget::All => Ok(None),
        DeviceTarget::Label(label) => call
            .deps
            .devices
            .credential_ids_by_label(&route.number_id, label)
            .await
            .map(Some),
    };
    let (bindings, credentials) = match (bindings, credentials) {
        (Ok(b), Ok(c)) => (b, c),
        (Err(e), _) | (_, Err(e)) => {
            warn!(call_id = %call.call_id, error = %e, "could not read the number's devices");
            return vec![Err(500)];
        }
    };
    let host = call.invite.local.ip().to_string();
    let targets: Vec<Result<LegTarget, u16>> = bindings
        .iter()
        .filter(|b| {
            credentials
                .as_ref()
                .is_none_or(|ids| ids.contains(&b.credential_id))
        })
        .map(|b| {
            let mut t = call.device_leg_target(b, &host, from, caller_id);
            t.record = Some((caller_id.to_owned(), route.number.clone()));
            Ok(t)
        })
        .collect();
    if targets.is_empty() {
        call.note(
            "dial.not_placed",
            json!({"target": "device", "reason": "devices.none_registered"}),
        );
        return vec![Err(480)];
    }
    targets
}

/// One period of the ringback tone, made once.
fn ringback_audio() -> Audio {
    static TONE: OnceLock<Audio> = OnceLock::new();
    TONE.get_or_init(|| Audio::new(sautikit_sip::tone::ringback(SAMPLE_RATE)))
        .clone()
}

fn start_ringback(call: &mut CallState) {
    let Some(port) = call.rtp.as_ref().map(|p| p.id) else {
        return;
    };
    let Some(dial) = call.dial.as_mut() else {
        return;
    };
    if dial.ringback {
        return;
    }
    dial.ringback = true;
    let period =
        u64::from(sautikit_sip::tone::RINGBACK_ON_MS + sautikit_sip::tone::RINGBACK_OFF_MS);
    let loops =
        u32::try_from(dial.ring_timeout.as_millis() as u64 / period + 2).unwrap_or(u32::MAX);
    call.timer_seq += 1;
    let play_id = call.timer_seq;
    call.deps.media.play(port, play_id, ringback_audio(), loops);
    call.note("media.ringback", json!({"loops": loops}));
}

fn stop_ringback(call: &mut CallState) {
    let Some(dial) = call.dial.as_mut() else {
        return;
    };
    if !std::mem::take(&mut dial.ringback) {
        return;
    }
    if let Some(port) = call.rtp.as_ref().map(|p| p.id) {
        call.deps.media.stop_playback(port);
    }
}

fn is_dial_leg(call: &CallState, n: u32) -> bool {
    call.dial.as_ref().is_some_and(|d| d.legs.contains(&n))
}

/// A response to one of the dial's INVITEs.
pub(in crate::calls) async fn leg_response(
    call: &mut CallState,
    n: u32,
    response: &rsip::Response,
) {
    let outcome = call.on_leg_response(n, response);
    call.report_legs();
    if !is_dial_leg(call, n) {
        return;
    }
    match outcome {
        LegOutcome::Nothing => {}
        LegOutcome::Ringing { code, early } => ringing(call, n, code, early).await,
        LegOutcome::Answered(stream) => answered(call, n, stream).await,
        LegOutcome::Refused => {
            let code = call
                .legs
                .get(n as usize)
                .and_then(|l| l.final_code)
                .unwrap_or(500);
            let (status, failure) = trunk::refusal(code);
            call.end_leg_record(n, status, cause_of(status), failure.as_deref());
            leg_gone(call, n).await;
        }
    }
}

fn cause_of(status: CallStatus) -> Option<&'static str> {
    match status {
        CallStatus::Busy => Some("busy"),
        CallStatus::NoAnswer => Some("no_answer"),
        _ => None,
    }
}

/// A leg rings: pass it on (`answerOnBridge`), and with one target relay its early media.
async fn ringing(call: &mut CallState, n: u32, code: u16, early: Option<StreamParams>) {
    let Some(dial) = call.dial.as_ref() else {
        return;
    };
    let single = dial.legs.len() == 1;
    let answer_on_bridge = dial.answer_on_bridge;
    let already_early = dial.early == Some(n);
    match (single, early) {
        (true, Some(stream)) if !already_early => {
            let Some(leg_port) = call.leg_port(n) else {
                return;
            };
            call.deps.media.start_stream(leg_port, stream);
            if call.phase == Phase::Ringing {
                if !answer_on_bridge {
                    return;
                }
                if let Err(reason) = call.early_answer().await {
                    call.note("dial.early_media", json!({"error": reason}));
                    return;
                }
            }
            let Some(caller_port) = call.rtp.as_ref().map(|p| p.id) else {
                return;
            };
            call.deps
                .media
                .bridge(caller_port, leg_port, Duration::ZERO);
            if let Some(dial) = call.dial.as_mut() {
                dial.early = Some(n);
                dial.alerted = true;
                // Bridging stopped it; it plays again in place of the party until its RTP flows.
                dial.ringback = false;
            }
            start_ringback(call);
            call.note("dial.early_media", json!({"leg": n}));
        }
        _ => {
            if answer_on_bridge && call.phase == Phase::Ringing && !dial.alerted {
                if let Some(dial) = call.dial.as_mut() {
                    dial.alerted = true;
                }
                if code == 183 {
                    call.respond_provisional(183, "Session Progress");
                } else {
                    call.respond_provisional(180, "Ringing");
                }
            }
        }
    }
}

/// The first leg to answer is bridged to the caller; the others stop ringing.
async fn answered(call: &mut CallState, n: u32, stream: StreamParams) {
    let Some(dial) = call.dial.as_mut() else {
        return;
    };
    if dial.winner.is_some() {
        call.bye_leg(n);
        call.end_leg_record(n, CallStatus::Canceled, Some("answered_elsewhere"), None);
        return;
    }
    dial.winner = Some(n);
    dial.answered_at = Some(Instant::now());
    let others: Vec<u32> = dial.legs.iter().copied().filter(|&o| o != n).collect();
    let (seq, time_limit) = (dial.seq, dial.time_limit);
    for other in others {
        stop_leg(call, other, CallStatus::Canceled, "answered_elsewhere");
    }
    stop_ringback(call);
    let Some(leg_port) = call.leg_port(n) else {
        return;
    };
    call.deps.media.start_stream(leg_port, stream);
    if call.phase == Phase::Ringing
        && let Err(reason) = call.answer().await
    {
        call.bye_leg(n);
        call.end_leg_record(n, CallStatus::Failed, None, Some(reason));
        call.fail(reason).await;
        return;
    }
    if let Some(caller_port) = call.rtp.as_ref().map(|p| p.id) {
        call.deps
            .media
            .bridge(caller_port, leg_port, call.deps.media_timeout);
    }
    call.bridged = Some(n);
    call.leg_record_answered(n);
    call.start_paid_time(Some(n));
    let label = call.legs.get(n as usize).map(|l| l.label.clone());
    call.note("call.bridged", json!({"leg": label}));
    let me = call.myself.clone();
    tokio::spawn(async move {
        tokio::time::sleep(time_limit).await;
        let _ = me.cast(CallMsg::DialTimeLimit { seq });
    });
}

/// Stop a leg that is not (or no longer) wanted, ending its record as `status`.
fn stop_leg(call: &mut CallState, n: u32, status: CallStatus, cause: &str) {
    match call.legs.get(n as usize).map(|l| l.state) {
        Some(LegState::Calling) | Some(LegState::Early) => call.cancel_leg(n),
        Some(LegState::Answered) => call.bye_leg(n),
        _ => {}
    }
    call.close_leg_media(n);
    call.end_leg_record(n, status, Some(cause), None);
}

/// A leg ended without being bridged: once none is left, the dial is over.
async fn leg_gone(call: &mut CallState, n: u32) {
    let Some(dial) = call.dial.as_mut() else {
        return;
    };
    if dial.early == Some(n) {
        dial.early = None;
    }
    if dial.winner.is_some() {
        return;
    }
    let live = dial.legs.iter().any(|&l| {
        call.legs
            .get(l as usize)
            .is_some_and(|leg| leg.state != LegState::Ended)
    });
    if !live {
        conclude(call).await;
    }
}

/// Leg `n`'s INVITE got no final response (Timer B).
pub(in crate::calls) async fn leg_timed_out(call: &mut CallState, n: u32) {
    if !is_dial_leg(call, n) {
        return;
    }
    call.end_leg_record(n, CallStatus::NoAnswer, Some("no_answer"), None);
    leg_gone(call, n).await;
}

/// Nobody answered within `timeout`: the legs get CANCEL, the result is `no-answer`.
pub(in crate::calls) async fn ring_timed_out(call: &mut CallState, seq: u64) {
    let Some(dial) = call.dial.as_mut() else {
        return;
    };
    if dial.seq != seq || dial.winner.is_some() {
        return;
    }
    dial.timed_out = true;
    let legs = dial.legs.clone();
    let after = dial.ring_timeout.as_secs();
    call.note("dial.no_answer", json!({"after_seconds": after}));
    for n in legs {
        stop_leg(call, n, CallStatus::NoAnswer, "no_answer");
    }
    conclude(call).await;
}

/// The bridged leg reached its `timeLimit`.
pub(in crate::calls) async fn time_limit_reached(call: &mut CallState, seq: u64) {
    let Some(dial) = call.dial.as_ref() else {
        return;
    };
    if dial.seq != seq {
        return;
    }
    if let Some(n) = dial.winner {
        call.note(
            "dial.time_limit",
            json!({"seconds": dial.time_limit.as_secs()}),
        );
        leg_cut(call, n, "time_limit").await;
    }
}

/// The bridged leg is hung up by us (`timeLimit`, its paid time, its silence): the caller's
/// script goes on.
pub(in crate::calls) async fn leg_cut(call: &mut CallState, n: u32, cause: &str) {
    if call.dial.as_ref().and_then(|d| d.winner) != Some(n) {
        return;
    }
    call.bye_leg(n);
    call.end_leg_record(n, CallStatus::Completed, Some(cause), None);
    conclude(call).await;
}

/// The bridged party hung up (its record is ended already).
pub(in crate::calls) async fn leg_hung_up(call: &mut CallState, n: u32) {
    let Some(dial) = call.dial.as_ref() else {
        return;
    };
    if dial.winner == Some(n) {
        conclude(call).await;
    } else if dial.legs.contains(&n) {
        leg_gone(call, n).await;
    }
}

/// What a dialled leg's media reported.
pub(in crate::calls) async fn leg_media(call: &mut CallState, n: u32, event: MediaEvent) {
    let Some(dial) = call.dial.as_ref() else {
        return;
    };
    match event {
        MediaEvent::RemoteMediaStarted if dial.early == Some(n) => {
            // The party's early media flows: the caller hears it instead of our tone.
            stop_ringback(call);
        }
        MediaEvent::MediaTimeout { .. } if dial.winner == Some(n) => {
            let label = call.legs.get(n as usize).map(|l| l.label.clone());
            call.note("media.timeout", json!({"leg": label}));
            leg_cut(call, n, "media_timeout").await;
        }
        _ => {}
    }
}

/// What the dial came to: `DialStatus` and the SIP code behind it, and the leg it speaks of.
fn outcome(call: &CallState, dial: &ActiveDial) -> (&'static str, Option<u16>, Option<u32>) {
    let code_of = |n: u32| call.legs.get(n as usize).and_then(|l| l.final_code);
    if let Some(n) = dial.winner {
        return ("completed", code_of(n).or(Some(200)), Some(n));
    }
    if dial.timed_out {
        return ("no-answer", Some(487), dial.legs.first().copied());
    }
    let coded: Vec<(u32, u16)> = dial
        .legs
        .iter()
        .filter_map(|&n| Some((n, code_of(n)?)))
        .collect();
    if let Some(&(n, c)) = coded.iter().find(|(_, c)| matches!(c, 486 | 600)) {
        return ("busy", Some(c), Some(n));
    }
    if let Some(&(n, c)) = coded.iter().find(|(_, c)| matches!(c, 408 | 480 | 487)) {
        return ("no-answer", Some(c), Some(n));
    }
    match coded.last() {
        Some(&(n, c)) => ("failed", Some(c), Some(n)),
        None => ("failed", dial.unplaced, dial.legs.first().copied()),
    }
}

/// The result's fields.
fn result_fields(
    call: &CallState,
    dial: &ActiveDial,
    status: &str,
    sip: Option<u16>,
    leg: Option<u32>,
) -> Vec<(String, String)> {
    let duration = dial.answered_at.map_or(0, |t| t.elapsed().as_secs());
    let mut fields = vec![
        ("DialStatus".to_owned(), status.to_owned()),
        ("DialDuration".to_owned(), duration.to_string()),
    ];
    if let Some(code) = sip {
        fields.push(("DialSipStatus".to_owned(), code.to_string()));
    }
    if let Some(id) = leg.and_then(|n| call.legs.get(n as usize)?.record.clone()) {
        fields.push(("DialCallId".to_owned(), id));
    }
    fields
}

/// The dial is over (answered and hung up, refused, timed out): post its result; the reply
/// goes on with the caller's call.
async fn conclude(call: &mut CallState) {
    stop_ringback(call);
    let Some(dial) = call.dial.take() else {
        return;
    };
    for &n in &dial.legs {
        if call
            .legs
            .get(n as usize)
            .is_some_and(|l| l.state != LegState::Ended && !l.cancelled)
        {
            stop_leg(call, n, CallStatus::Canceled, "dial_ended");
        }
    }
    call.bridged = None;
    let (status, sip, leg) = outcome(call, &dial);
    let fields = result_fields(call, &dial, status, sip, leg);
    call.note(
        "dial.finished",
        json!({"status": status, "sip_status": sip}),
    );
    call.waiting = Waiting::Nothing;
    post_step(call, dial.action.as_deref(), fields).await;
}

/// The caller's call ends while it dials (the caller hung up, the API hung up): the legs end
/// with it (in `end_legs`), and the result still goes out, without waiting for a reply.
pub(in crate::calls) fn interrupted(call: &mut CallState) {
    let Some(dial) = call.dial.take() else {
        return;
    };
    let (status, sip, leg) = match dial.winner {
        Some(n) => (
            "completed",
            call.legs.get(n as usize).and_then(|l| l.final_code),
            Some(n),
        ),
        None => ("canceled", Some(487), dial.legs.first().copied()),
    };
    let fields = result_fields(call, &dial, status, sip, leg);
    let url = match dial.action.as_deref() {
        Some(a) => resolve_url(&call.document_url, a).ok(),
        None => call
            .route
            .as_ref()
            .and_then(|r| r.voice_callback_url.clone()),
    };
    call.note(
        "dial.finished",
        json!({"status": status, "sip_status": sip, "caller": "gone"}),
    );
    let Some(url) = url else {
        return;
    };
    let call_status = if dial.winner.is_some() || call.dialog.is_some() {
        "completed"
    } else {
        "canceled"
    };
    let mut fields = call.fields(fields);
    // The call has ended: its status is final, not the phase the base fields read.
    for (k, v) in &mut fields {
        if k == "CallStatus" {
            call_status.clone_into(v);
        }
    }
    let request = CallbackRequest {
        url,
        method: CallbackMethod::Post,
        fields,
        secret: call.route_ref().webhook_secret.clone(),
        call_id: call.call_id.clone(),
    };
    let client = call.deps.callback.clone();
    let call_id = call.call_id.clone();
    tokio::spawn(async move {
        if let Err(e) = client.fetch(request).await {
            warn!(call_id = %call_id, error = %e, "posting a dial's result after the caller left failed");
        }
    });
}
