//! Calls: the supervisor of the Call actors, one per live call (DESIGN §2, §3).
//!
//! A Call actor owns its SIP dialog, its script and its media session. Calls keeps a snapshot of
//! what each call has on the wire (final response sent? dialog? RTP port?) so that when a Call
//! actor fails, its call is still ended cleanly — BYE or `500`, port freed, row closed as
//! `failed` — and no other call notices. It also finds live calls for the API's hangup, and keeps
//! this engine's heartbeat so calls orphaned by a dead process get closed.

mod call;
mod devices;
mod from_api;
mod from_device;
mod leg;
mod live;
mod prepaid;
pub mod trunk;
mod verbs;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use sautikit_sip::dialog::Dialog;
use sautikit_sip::message::{cancel_for, response_to};
use sautikit_sip::rsip;
use sautikit_sip::transaction::{Peer, TxKey};
use tracing::{error, info, warn};

pub use call::{CALL_ID_HEADER, Call, CallArgs, CallMsg, IncomingInvite, InviteServer};
pub use from_api::{PlaceRefusal, PlacedCall};

use crate::audio::AudioFetcher;
use crate::call_store::{CallEnded, CallStatus, CallStore, TimelineEntry};
use crate::callback::CallbackClient;
use crate::clock::Clock;
use crate::media::Media;
use crate::sip_endpoint::SipMsg;
use crate::synth::Synthesizer;

/// How often this engine records that it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// What every Call actor needs; cheap to clone.
#[derive(Clone)]
pub struct CallDeps {
    pub store: Arc<dyn CallStore>,
    pub callback: Arc<dyn CallbackClient>,
    pub clock: Arc<dyn Clock>,
    pub media: Media,
    /// The address RTP is sent from, written into SDP answers.
    pub media_ip: IpAddr,
    /// This process, for `calls.engine_id` and orphan closing.
    pub engine_id: String,
    /// Registered names of the Numbers and Calls actors and the SIP endpoint (stable across
    /// restarts by Root).
    pub numbers: String,
    pub calls: String,
    pub sip: String,
    /// Speech for `say`.
    pub synth: Arc<dyn Synthesizer>,
    /// Audio files for `play`.
    pub audio: Arc<dyn AudioFetcher>,
    /// Recordings are written under it (`recordings/<call>/<id>.wav`).
    pub data_dir: PathBuf,
    /// The API's public base URL, for `RecordingUrl`.
    pub public_url: String,
    /// Registered devices of a number (calls to devices ring them).
    pub devices: Arc<dyn crate::registrar::RegistrarStore>,
    /// A bridged leg silent this long ends the call (`media_timeout`).
    pub media_timeout: Duration,
    /// How long a number's devices ring before the caller gets `480`.
    pub ring_timeout: Duration,
    /// Where calls to numbers that are not ours go (`SAUTIKIT_OUTBOUND_TRUNK`).
    pub trunk: Option<trunk::Trunk>,
    /// Which addresses `dial`'s SIP targets may resolve to.
    pub dial_policy: crate::address::AddressPolicy,
    /// How media streams (`stream`) connect.
    pub streams: crate::streaming::StreamSettings,
}

/// What a call has on the wire, kept by Calls to end it cleanly should its actor fail.
#[derive(Clone)]
pub struct CallSnapshot {
    pub call_id: String,
    pub workspace_id: String,
    pub sip_call_id: String,
    pub endpoint: ActorRef<SipMsg>,
    /// The INVITE we answer and its server transaction (none for a call placed through the API).
    pub invite: Option<(TxKey, rsip::Request)>,
    pub peer: Peer,
    pub local: SocketAddr,
    pub final_sent: bool,
    pub dialog: Option<Dialog>,
    pub rtp_id: Option<u64>,
    /// Its outbound legs still on the wire.
    pub legs: Vec<LegSnapshot>,
}

/// An outbound leg on the wire: answered (a dialog to BYE) or not yet (an INVITE to CANCEL).
#[derive(Clone)]
pub struct LegSnapshot {
    pub sip_call_id: String,
    pub target: Peer,
    pub invite: rsip::Request,
    pub dialog: Option<Dialog>,
    pub rtp_id: Option<u64>,
    /// Its own call record (a dialled party), not yet ended.
    pub record_call_id: Option<String>,
}

pub enum CallsMsg {
    /// A call has a row and an id (and, later, a dialog).
    Snapshot {
        actor: ActorRef<CallMsg>,
        snapshot: Box<CallSnapshot>,
    },
    /// The API asks to hang up a call; answers `true` once it has ended and is recorded.
    HangupRequested {
        workspace_id: String,
        call_id: String,
        reply: RpcReplyPort<bool>,
    },
    HeartbeatDue,
    /// A Call actor ended (`failure` says why, if it failed). Sent by Calls to itself from the
    /// supervision event, so that it queues behind every snapshot the actor sent.
    CallActorEnded {
        actor: ActorId,
        failure: Option<String>,
    },
    /// How many calls Calls holds as live (for tests and diagnostics).
    LiveCount(RpcReplyPort<usize>),
    /// The API places a call (its row is written, its first slice reserved): start its Call
    /// actor, which calls the callee.
    PlaceCall {
        placed: Box<PlacedCall>,
        reply: RpcReplyPort<Result<(), PlaceRefusal>>,
    },
    /// A call's end that could not be written (the database failed): Calls writes it again at
    /// every heartbeat until it is. The end carries the charge and frees the call's reservation,
    /// so it is never dropped.
    EndNotRecorded(Box<CallEnded>),
    /// A call refused because its start could not be written. The write may have committed all
    /// the same (the connection died between the commit and its answer), leaving a `ringing`
    /// row that nothing would end: Calls ends the call if its row is there, at every heartbeat
    /// until the store answers either way.
    StartNotConfirmed(Box<CallEnded>),
}

/// An end waiting to be written again.
struct Unrecorded {
    end: CallEnded,
    /// The call's start is in doubt too (`CallsMsg::StartNotConfirmed`).
    if_started: bool,
}

pub struct Calls;

pub struct CallsArgs {
    pub deps: CallDeps,
    /// SQLite: one process owns the database, so every call live at start is an orphan.
    pub single_process: bool,
    /// An engine silent this long is dead: its live calls are closed.
    pub orphan_after: Duration,
}

pub struct CallsState {
    deps: CallDeps,
    orphan_after: chrono::Duration,
    live: live::LiveCalls,
    /// Ends waiting to be written again (see `CallsMsg::EndNotRecorded` and
    /// `CallsMsg::StartNotConfirmed`).
    unrecorded: Vec<Unrecorded>,
}

impl Actor for Calls {
    type Msg = CallsMsg;
    type State = CallsState;
    type Arguments = CallsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let deps = args.deps;
        let orphan_after = chrono::Duration::from_std(args.orphan_after).unwrap_or_default();
        let now = deps.clock.now();
        deps.store.engine_heartbeat(&deps.engine_id, now).await?;
        let stale_before = if args.single_process {
            now
        } else {
            now - orphan_after
        };
        let closed = deps
            .store
            .close_orphaned_calls(now, &deps.engine_id, stale_before)
            .await?;
        if closed > 0 {
            info!(closed, "closed calls left live by a stopped engine");
        }
        // Beat well inside the orphan window, so a live engine is never taken for dead.
        let beat = HEARTBEAT
            .min(args.orphan_after / 3)
            .max(Duration::from_millis(100));
        myself.send_interval(beat, || CallsMsg::HeartbeatDue);
        Ok(CallsState {
            deps,
            orphan_after,
            live: live::LiveCalls::default(),
            unrecorded: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            CallsMsg::EndNotRecorded(end) => {
                warn!(call_id = %end.call_id, "a call's end is not recorded yet; retrying at each heartbeat");
                state.unrecorded.push(Unrecorded {
                    end: *end,
                    if_started: false,
                });
            }
            CallsMsg::StartNotConfirmed(end) => {
                warn!(call_id = %end.call_id, "a refused call's start may have been written; ending it at the next heartbeat");
                state.unrecorded.push(Unrecorded {
                    end: *end,
                    if_started: true,
                });
            }
            CallsMsg::Snapshot { actor, snapshot } => {
                state.live.report(actor, *snapshot);
            }
            CallsMsg::CallActorEnded { actor, failure } => {
                let snapshot = state.live.ended(actor);
                if let Some(err) = failure {
                    error!(error = %err, call_id = snapshot.as_ref().map(|s| s.call_id.as_str()), "call actor failed; ending its call");
                    match snapshot {
                        Some(s) => end_failed_call(&state.deps, &myself, s),
                        // It failed before it told us anything: the endpoint answers its INVITE
                        // and forgets its dialog.
                        None => {
                            if let Some(endpoint) =
                                ActorRef::<SipMsg>::where_is(state.deps.sip.clone())
                            {
                                let _ = endpoint.cast(SipMsg::CallActorFailed { actor });
                            }
                        }
                    }
                }
            }
            CallsMsg::LiveCount(reply) => {
                let _ = reply.send(state.live.len());
            }
            CallsMsg::PlaceCall { placed, reply } => {
                let _ = reply.send(place_call(&state.deps, &myself, placed).await);
            }
            CallsMsg::HangupRequested {
                workspace_id,
                call_id,
                reply,
            } => {
                let target = state
                    .live
                    .by_call_id(&call_id)
                    .filter(|(_, s)| s.workspace_id == workspace_id);
                match target {
                    Some((actor, _)) => {
                        if let Err(e) = actor.cast(CallMsg::HangupRequested { reply }) {
                            warn!(%call_id, error = %e, "call ended before the hangup reached it");
                        }
                    }
                    None => {
                        let _ = reply.send(false);
                    }
                }
            }
            CallsMsg::HeartbeatDue => {
                let deps = state.deps.clone();
                let orphan_after = state.orphan_after;
                let unrecorded = std::mem::take(&mut state.unrecorded);
                // Off the actor: a slow database must not hold up hangups.
                tokio::spawn(async move {
                    record_ends(&deps, &myself, unrecorded).await;
                    let now = deps.clock.now();
                    if let Err(e) = deps.store.engine_heartbeat(&deps.engine_id, now).await {
                        warn!(error = %e, "engine heartbeat failed");
                        return;
                    }
                    let stale = now - orphan_after;
                    match deps
                        .store
                        .close_orphaned_calls(now, &deps.engine_id, stale)
                        .await
                    {
                        Ok(n) if n > 0 => info!(closed = n, "closed calls of a silent engine"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "closing orphaned calls failed"),
                    }
                });
            }
        }
        Ok(())
    }

    // Never stop for a child: a failed call is ended (in `CallActorEnded`), the others go on.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                let _ = myself.cast(CallsMsg::CallActorEnded {
                    actor: cell.get_id(),
                    failure: None,
                });
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let _ = myself.cast(CallsMsg::CallActorEnded {
                    actor: cell.get_id(),
                    failure: Some(err.to_string()),
                });
            }
            _ => {}
        }
        Ok(())
    }
}

/// Start the Call actor of a call placed through the API, supervised like every other.
async fn place_call(
    deps: &CallDeps,
    calls: &ActorRef<CallsMsg>,
    placed: Box<PlacedCall>,
) -> Result<(), PlaceRefusal> {
    let trunk = deps.trunk.as_ref().ok_or(PlaceRefusal::NoTrunk)?;
    let endpoint =
        ActorRef::<SipMsg>::where_is(deps.sip.clone()).ok_or(PlaceRefusal::Unavailable)?;
    let args = CallArgs {
        deps: deps.clone(),
        endpoint,
        invite: IncomingInvite {
            server: None,
            from: trunk.peer,
            sip_call_id: placed.sip_call_id.clone(),
            local: placed.local,
            device: None,
        },
        placed: Some(placed),
    };
    Actor::spawn_linked(None, Call, args, calls.get_cell())
        .await
        .map(|_| ())
        .map_err(|e| {
            warn!(error = %e, "could not start a placed call's actor");
            PlaceRefusal::Unavailable
        })
}

/// Hand Calls (registered as `calls`) an end the store refused: it writes it at its heartbeats.
pub(crate) fn end_later(calls: &str, end: CallEnded) {
    if let Some(calls) = ActorRef::<CallsMsg>::where_is(calls) {
        let _ = calls.cast(CallsMsg::EndNotRecorded(Box::new(end)));
    }
}

/// Hand Calls a call refused because its start could not be written: should the start have
/// committed unseen, Calls ends it (`failed`, `storage.unavailable`).
pub(crate) fn end_if_started(
    calls: &str,
    call_id: String,
    now: DateTime<Utc>,
    timeline: Vec<TimelineEntry>,
) {
    if let Some(calls) = ActorRef::<CallsMsg>::where_is(calls) {
        let _ = calls.cast(CallsMsg::StartNotConfirmed(Box::new(CallEnded {
            call_id,
            status: CallStatus::Failed,
            ended_at: now,
            hangup_cause: None,
            failure_reason: Some("storage.unavailable".into()),
            sip_status: None,
            timeline,
        })));
    }
}

/// Write ends that failed before; those that fail again go back to Calls for the next heartbeat.
async fn record_ends(deps: &CallDeps, calls: &ActorRef<CallsMsg>, ends: Vec<Unrecorded>) {
    for Unrecorded { end, if_started } in ends {
        let recorded = if if_started {
            deps.store
                .call_ended_if_started(end.clone())
                .await
                .map(|charged| charged.is_some())
        } else {
            deps.store.call_ended(end.clone()).await.map(|_| true)
        };
        match recorded {
            Ok(true) => info!(call_id = %end.call_id, "a call's end was recorded on a retry"),
            Ok(false) => {
                info!(call_id = %end.call_id, "a refused call's start was never written: nothing to end");
            }
            Err(e) => {
                warn!(call_id = %end.call_id, error = %e, "recording a call's end failed again");
                let end = Box::new(end);
                let _ = calls.cast(if if_started {
                    CallsMsg::StartNotConfirmed(end)
                } else {
                    CallsMsg::EndNotRecorded(end)
                });
            }
        }
    }
}

/// The call's actor is gone: finish its call from the snapshot.
fn end_failed_call(deps: &CallDeps, calls: &ActorRef<CallsMsg>, mut s: CallSnapshot) {
    let now = deps.clock.now();
    let mut timeline = Vec::new();
    if let Some(dialog) = s.dialog.as_mut() {
        let bye = dialog.bye(&s.local.ip().to_string(), s.local.port(), s.peer.transport);
        timeline.push(TimelineEntry {
            at: now,
            kind: "sip.sent".into(),
            detail: serde_json::json!({"method": "BYE"}),
        });
        let _ = s.endpoint.cast(SipMsg::SendRequest {
            request: bye,
            to: s.peer,
            call_id: s.call_id.clone(),
        });
    } else if let Some((key, invite)) = s.invite.as_ref().filter(|_| !s.final_sent) {
        let response = response_to(invite, 500, Some("Server Internal Error"), None);
        timeline.push(TimelineEntry {
            at: now,
            kind: "sip.sent".into(),
            detail: serde_json::json!({"status": 500}),
        });
        let _ = s.endpoint.cast(SipMsg::Respond {
            key: key.clone(),
            response,
            outside: None,
        });
    }
    if let Some(id) = s.rtp_id {
        deps.media.close(id);
    }
    let _ = s.endpoint.cast(SipMsg::DialogEnded {
        sip_call_id: s.sip_call_id.clone(),
    });
    // Dialled parties' records end with the call (their answered time is billed).
    let mut ends = Vec::new();
    for mut leg in std::mem::take(&mut s.legs) {
        let (request, method) = match leg.dialog.as_mut() {
            Some(d) => (
                d.bye(
                    &s.local.ip().to_string(),
                    s.local.port(),
                    leg.target.transport,
                ),
                "BYE",
            ),
            None => (cancel_for(&leg.invite), "CANCEL"),
        };
        timeline.push(TimelineEntry {
            at: now,
            kind: "sip.sent".into(),
            detail: serde_json::json!({"method": method, "leg_call_id": leg.sip_call_id}),
        });
        let _ = s.endpoint.cast(SipMsg::SendRequest {
            request,
            to: leg.target,
            call_id: s.call_id.clone(),
        });
        if let Some(id) = leg.rtp_id {
            deps.media.close(id);
        }
        let _ = s.endpoint.cast(SipMsg::DialogEnded {
            sip_call_id: leg.sip_call_id,
        });
        if let Some(call_id) = leg.record_call_id {
            ends.push(CallEnded {
                call_id,
                status: CallStatus::Failed,
                ended_at: now,
                hangup_cause: Some("engine_error".into()),
                failure_reason: Some("engine.error".into()),
                sip_status: None,
                timeline: Vec::new(),
            });
        }
    }
    let store = deps.store.clone();
    let calls = calls.clone();
    tokio::spawn(async move {
        let end = CallEnded {
            call_id: s.call_id.clone(),
            status: CallStatus::Failed,
            ended_at: now,
            hangup_cause: Some("engine_error".into()),
            failure_reason: Some("engine.error".into()),
            sip_status: None,
            timeline,
        };
        ends.push(end);
        for end in ends {
            if let Err(e) = store.call_ended(end.clone()).await {
                warn!(call_id = %end.call_id, error = %e, "recording a failed call's end failed");
                let _ = calls.cast(CallsMsg::EndNotRecorded(Box::new(end)));
            }
        }
    });
}
