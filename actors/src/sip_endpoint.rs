//! SipEndpoint: the UDP and TCP transports and the transaction layer, and the hand-off of each
//! dialog to its Call actor (DESIGN §2, §3, §8).
//!
//! The transaction layer (`sautikit_sip::transaction`) is sans-IO; this actor is its driver: it
//! feeds it what the sockets receive and a 10 ms tick, and sends what it returns. Everything
//! about a call — routing, the callback, the script — happens in the call's own actor, so a slow
//! callback or a failing call never holds up the endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use sautikit_sip::message::{self as sipmsg, response_to};
use sautikit_sip::rsip::{self, Method};
use sautikit_sip::stream::StreamFramer;
use sautikit_sip::transaction::{Peer, Timers, TransactionLayer, Transport, TuEvent, TxKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::admission::{
    Admission, AdmissionControl, AdmissionGate, Closed, Credit, RecentVerdicts,
};
use crate::call_store::{CallStore, TimelineEntry};
use crate::calls::{CallArgs, CallDeps, CallMsg, IncomingInvite, InviteServer};
use crate::clock::Clock;
use crate::registrar::RegistrarMsg;

/// How often the transaction layer's timers are checked. SIP's shortest timer is T1 = 500 ms, so
/// 10 ms of slack is invisible on the wire.
const TICK: Duration = Duration::from_millis(10);
pub use sautikit_sip::uas::ALLOW;
const MAX_DATAGRAM: usize = 65_535;
/// How long a TCP connection that broke its framing stays open for the answers to the requests
/// it sent before the break.
const TCP_LINGER: Duration = Duration::from_secs(1);
/// Transactions the layer's indexes hold before they first grow: 1,000 calls/s, two transactions
/// a call, each kept about 32 s after it ends (Timers J and L), comes to 64,000; 2,000
/// registrations/s (two REGISTERs each) to 128,000. The tables round up to 262,144 slots and
/// grow past about 229,000.
const EXPECTED_TRANSACTIONS: usize = 200_000;

pub enum SipMsg {
    /// A datagram, or one framed message from a TCP connection.
    Received {
        bytes: Vec<u8>,
        from: Peer,
    },
    TcpOpened {
        peer: SocketAddr,
        writer: mpsc::UnboundedSender<Vec<u8>>,
    },
    TcpClosed {
        peer: SocketAddr,
    },
    /// A connection we opened could not be made.
    TcpConnectFailed {
        peer: SocketAddr,
    },
    TimersDue,
    /// A Call actor answers its INVITE (or an in-dialog request).
    Respond {
        key: TxKey,
        response: rsip::Response,
        /// With the final answer to an INVITE: how long its setup waited outside the engine
        /// (the voice callback), so admission control sees the engine's own share; `None` when
        /// it is not a sample (it waited on a party we called, or is not such an answer).
        outside: Option<Duration>,
    },
    /// A Call actor sends an in-dialog request (BYE). `call_id` names the call whose timeline gets
    /// the final response.
    SendRequest {
        request: rsip::Request,
        to: Peer,
        call_id: String,
    },
    /// The call behind this SIP Call-ID has ended: stop routing its messages to it.
    DialogEnded {
        sip_call_id: String,
    },
    /// A Call actor starts an outbound leg: an INVITE whose responses, and the in-dialog
    /// requests of the dialog it makes, go to that call as leg `leg`.
    SendInvite {
        request: Box<rsip::Request>,
        to: Peer,
        call: ActorRef<CallMsg>,
        leg: u32,
    },
    /// A device's INVITE authenticated (by the Registrar) as a credential of `login`'s number.
    DeviceCallAuthenticated {
        key: TxKey,
        request: Box<rsip::Request>,
        from: Peer,
        login: Box<crate::registrar::DeviceLogin>,
    },
    /// The ACK for a 2xx to one of our INVITEs (not a transaction).
    SendAck {
        request: Box<rsip::Request>,
        to: Peer,
    },
    /// A Call actor failed before it told Calls anything of its call (no snapshot): its INVITE,
    /// if still unanswered, gets `500`, and its dialogs are forgotten.
    CallActorFailed {
        actor: ractor::ActorId,
    },
    /// The registrar asks for an OPTIONS to a registered device over the flow it registered on.
    SendKeepalive {
        contact: String,
        to: Peer,
        domain: String,
        binding_id: String,
        sent_at: chrono::DateTime<chrono::Utc>,
    },
}

#[derive(Clone)]
pub struct SipEndpointArgs {
    pub listen: SocketAddr,
    pub carrier_allow: Vec<IpNet>,
    pub deps: CallDeps,
    /// Supervisor of the Call actors (the Calls actor).
    pub calls: ActorCell,
    pub timers: Timers,
    pub admission: Admission,
    /// Per-source request-rate limits.
    pub flood: crate::flood::FloodLimits,
    /// Registered name of the Registrar actor (REGISTER goes there).
    pub registrar: String,
}

pub struct SipEndpoint;

/// An INVITE in setup: kept to answer `500` should its Call actor fail before it answers.
struct Setup {
    invite: rsip::Request,
    arrived: Instant,
}

pub struct SipEndpointState {
    args: SipEndpointArgs,
    local: SocketAddr,
    layer: TransactionLayer,
    flood: crate::flood::FloodGuard,
    udp: Arc<UdpSocket>,
    tcp: HashMap<SocketAddr, mpsc::UnboundedSender<Vec<u8>>>,
    /// Live calls by SIP Call-ID.
    dialogs: HashMap<String, ActorRef<CallMsg>>,
    /// INVITE server transactions by key → SIP Call-ID (CANCEL and Timer H name the key).
    invites: HashMap<TxKey, String>,
    /// The other way round, to forget a call's INVITE when it ends.
    invite_of: HashMap<String, TxKey>,
    /// INVITEs without a final response yet, and when each arrived.
    setting_up: HashMap<TxKey, Setup>,
    /// Which new INVITEs are taken on (see [`crate::admission`]).
    admission: AdmissionControl,
    /// The same as the UDP receive task sees it.
    gate: Arc<AdmissionGate>,
    /// Dropped with the endpoint: the UDP receive thread then ends.
    _receiving: tokio::sync::oneshot::Sender<()>,
    /// INVITEs turned away since the last report, and when that was.
    shed: u64,
    shed_reported: Instant,
    /// Our in-dialog requests → the call whose timeline records the answer.
    requests: HashMap<TxKey, String>,
    /// Our INVITEs (outbound legs) → the call and leg their responses go to.
    client_invites: HashMap<TxKey, (ActorRef<CallMsg>, u32)>,
    /// The other way round, by the leg's SIP Call-ID, to forget them when the leg's call ends.
    client_invite_of: HashMap<String, TxKey>,
    /// Messages waiting for a TCP connection we are opening.
    connecting: HashMap<SocketAddr, Vec<Vec<u8>>>,
    /// On-net legs: our INVITEs to our own listener (a `dial` to one of our numbers), by SIP
    /// Call-ID → the From-tag of our side. Both dialogs of such a call share its Call-ID, so the
    /// side a request is for is told by its From-tag: ours → the called side, known internally
    /// by [`on_net_id`].
    loopback: HashMap<String, String>,
    /// Keepalive OPTIONS in flight → the binding and when it was pinged.
    keepalives: HashMap<TxKey, (String, chrono::DateTime<chrono::Utc>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    store: Arc<dyn CallStore>,
    clock: Arc<dyn Clock>,
}

impl SipEndpointState {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Actor for SipEndpoint {
    type Msg = SipMsg;
    type State = SipEndpointState;
    type Arguments = (SipEndpointArgs, tokio::sync::oneshot::Sender<SocketAddr>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (args, bound): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (udp, tcp) = bind_both(args.listen).await?;
        let local = udp.local_addr()?;
        info!(%local, "SIP listening on UDP and TCP");
        let gate = Arc::new(AdmissionGate::default());
        let receiving = spawn_udp_receiver(
            &udp,
            UdpReceiver {
                endpoint: myself.clone(),
                gate: gate.clone(),
                carrier_allow: args.carrier_allow.clone(),
                local,
            },
        )?;
        let udp = Arc::new(udp);
        let mut tasks = vec![tokio::spawn(accept_loop(tcp, myself.clone()))];
        let me = myself.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if me.cast(SipMsg::TimersDue).is_err() {
                    return;
                }
            }
        }));
        let _ = bound.send(local);
        Ok(SipEndpointState {
            store: args.deps.store.clone(),
            clock: args.deps.clock.clone(),
            layer: TransactionLayer::with_capacity(args.timers, EXPECTED_TRANSACTIONS),
            flood: crate::flood::FloodGuard::new(args.flood, Instant::now()),
            admission: AdmissionControl::new(args.admission, Instant::now()),
            gate,
            _receiving: receiving,
            args,
            local,
            udp,
            tcp: HashMap::new(),
            dialogs: HashMap::new(),
            invites: HashMap::new(),
            invite_of: HashMap::new(),
            setting_up: HashMap::new(),
            shed: 0,
            shed_reported: Instant::now(),
            requests: HashMap::new(),
            keepalives: HashMap::new(),
            loopback: HashMap::new(),
            connecting: HashMap::new(),
            client_invites: HashMap::new(),
            client_invite_of: HashMap::new(),
            tasks,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for t in &state.tasks {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match message {
            SipMsg::Received { bytes, from } => {
                if admit(&myself, state, &bytes, from, now) {
                    state.layer.handle_datagram(&bytes, from, now);
                }
            }
            SipMsg::TcpOpened { peer, writer } => {
                for bytes in state.connecting.remove(&peer).unwrap_or_default() {
                    let _ = writer.send(bytes);
                }
                state.tcp.insert(peer, writer);
            }
            SipMsg::TcpConnectFailed { peer } => {
                if let Some(lost) = state.connecting.remove(&peer) {
                    info!(%peer, messages = lost.len(), "could not connect over TCP; messages dropped");
                }
            }
            SipMsg::TcpClosed { peer } => {
                state.tcp.remove(&peer);
                if let Some(r) = registrar(state) {
                    let _ = r.cast(RegistrarMsg::FlowClosed { peer });
                }
            }
            SipMsg::TimersDue => {
                state.layer.handle_timeout(now);
                state.admission.tick(now);
                report_shed(state, now);
                if state.flood.banned_changed(now) {
                    metrics::gauge!("sautikit_sip_flood_banned_sources")
                        .set(state.flood.banned(now) as f64);
                }
            }
            SipMsg::Respond {
                key,
                response,
                outside,
            } => {
                if response.status_code.code() >= 200
                    && let Some(setup) = state.setting_up.remove(&key)
                    && let Some(outside) = outside
                {
                    let engine = now
                        .saturating_duration_since(setup.arrived)
                        .saturating_sub(outside);
                    state.admission.setup_finished(engine, now);
                }
                if let Err(e) = state.layer.respond(&key, response, now) {
                    debug!(error = %e, "response for a finished transaction dropped");
                }
            }
            SipMsg::SendRequest {
                request,
                to,
                call_id,
            } => match state.layer.send_request(request, to, now) {
                Ok(key) => {
                    state.requests.insert(key, call_id);
                }
                Err(e) => warn!(error = %e, %call_id, "could not send an in-dialog request"),
            },
            SipMsg::SendInvite {
                request,
                to,
                call,
                leg,
            } => {
                let sip_call_id = sipmsg::call_id(&*request);
                if to.addr == state.local
                    && let (Some(id), Some(tag)) = (&sip_call_id, sipmsg::from_tag(&*request))
                {
                    state.loopback.insert(id.clone(), tag);
                }
                match (sip_call_id, state.layer.send_request(*request, to, now)) {
                    (Some(sip_call_id), Ok(key)) => {
                        state
                            .client_invites
                            .insert(key.clone(), (call.clone(), leg));
                        state.client_invite_of.insert(sip_call_id.clone(), key);
                        state.dialogs.insert(sip_call_id, call);
                    }
                    (_, Err(e)) => {
                        warn!(error = %e, "could not send an INVITE");
                        let _ = call.cast(CallMsg::LegTimedOut { leg });
                    }
                    (None, Ok(_)) => {
                        let _ = call.cast(CallMsg::LegTimedOut { leg });
                    }
                }
            }
            SipMsg::SendAck { request, to } => state.layer.send_ack(*request, to),
            SipMsg::DeviceCallAuthenticated {
                key,
                request,
                from,
                login,
            } => start_call(&myself, state, key, *request, from, Some(*login), None).await,
            SipMsg::SendKeepalive {
                contact,
                to,
                domain,
                binding_id,
                sent_at,
            } => {
                let via = state.local;
                let Some(request) = sautikit_sip::registrar::keepalive_options(
                    &contact,
                    &domain,
                    &via.ip().to_string(),
                    via.port(),
                    to.transport,
                ) else {
                    debug!(%binding_id, "binding with a contact we cannot address");
                    return Ok(());
                };
                match state.layer.send_request(request, to, now) {
                    Ok(key) => {
                        state.keepalives.insert(key, (binding_id, sent_at));
                    }
                    Err(e) => debug!(error = %e, "could not send a keepalive"),
                }
            }
            SipMsg::DialogEnded { sip_call_id } => forget_dialog(state, &sip_call_id),
            SipMsg::CallActorFailed { actor } => {
                let gone: Vec<String> = state
                    .dialogs
                    .iter()
                    .filter(|(_, call)| call.get_id() == actor)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in gone {
                    let unanswered = state.invite_of.get(&id).and_then(|key| {
                        Some((key.clone(), state.setting_up.get(key)?.invite.clone()))
                    });
                    if let Some((key, request)) = unanswered {
                        reply(state, &key, &request, 500, &[]);
                    }
                    forget_dialog(state, &id);
                }
            }
        }
        // Published before anything this message caused is sent: a caller that hears the answer
        // freeing a place must find the receive thread knowing it.
        publish_admission(state);
        drive(&myself, state).await;
        Ok(())
    }
}

/// Act on what the layer decided: hand events to calls, send what is due.
async fn drive(myself: &ActorRef<SipMsg>, state: &mut SipEndpointState) {
    while let Some(event) = state.layer.poll_event() {
        on_event(myself, state, event).await;
    }
    while let Some(t) = state.layer.poll_transmit() {
        transmit(myself, state, t.to, t.bytes);
    }
}

fn transmit(myself: &ActorRef<SipMsg>, state: &mut SipEndpointState, to: Peer, bytes: Vec<u8>) {
    match to.transport {
        Transport::Udp => match state.udp.try_send_to(&bytes, to.addr) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Rare: the socket buffer is full. Send it without blocking the endpoint.
                let udp = state.udp.clone();
                tokio::spawn(async move {
                    let _ = udp.send_to(&bytes, to.addr).await;
                });
            }
            Err(e) => debug!(error = %e, to = %to.addr, "UDP send failed"),
        },
        Transport::Tcp => match state.tcp.get(&to.addr) {
            Some(w) => {
                let _ = w.send(bytes);
            }
            // No connection yet (the trunk over TCP): open one; what is sent meanwhile waits.
            None => match state.connecting.get_mut(&to.addr) {
                Some(queue) => queue.push(bytes),
                None => {
                    state.connecting.insert(to.addr, vec![bytes]);
                    tokio::spawn(connect_out(to.addr, myself.clone()));
                }
            },
        },
    }
}

fn reply(
    state: &mut SipEndpointState,
    key: &TxKey,
    req: &rsip::Request,
    code: u16,
    extra: &[(&str, &str)],
) {
    let mut resp = response_to(req, code, None, Some(&sipmsg::new_tag()));
    for (name, value) in extra {
        resp.headers
            .push(rsip::Header::Other((*name).to_owned(), (*value).to_owned()));
    }
    if let Err(e) = state.layer.respond(key, resp, Instant::now()) {
        debug!(error = %e, "could not answer a request");
    }
}

async fn on_event(myself: &ActorRef<SipMsg>, state: &mut SipEndpointState, event: TuEvent) {
    match event {
        TuEvent::RequestReceived { key, request, from } => {
            on_request(myself, state, key, request, from).await
        }
        TuEvent::AckReceived { request, .. } => {
            if let Some(call) = dialog_id(state, &request).and_then(|c| state.dialogs.get(&c)) {
                let _ = call.cast(CallMsg::AckReceived);
            }
        }
        TuEvent::CancelReceived { invite, .. } => {
            if let Some(call) = state
                .invites
                .get(&invite)
                .and_then(|c| state.dialogs.get(c))
            {
                let _ = call.cast(CallMsg::CancelReceived);
            }
        }
        TuEvent::AckTimeout { key } => {
            if let Some(call) = state.invites.get(&key).and_then(|c| state.dialogs.get(c)) {
                let _ = call.cast(CallMsg::AckTimedOut);
            }
        }
        TuEvent::ResponseReceived { key, response } => {
            let code = response.status_code.code();
            if code >= 200 && state.keepalives.remove(&key).is_some() {
                // Any final answer, even an error, shows the device and its flow are there.
                return;
            }
            if let Some((call, leg)) = state.client_invites.get(&key) {
                let _ = call.cast(CallMsg::LegResponse {
                    leg: *leg,
                    response: Box::new(response),
                });
                return;
            }
            if code >= 200
                && let Some(call_id) = state.requests.remove(&key)
            {
                let entry = TimelineEntry {
                    at: state.clock.now(),
                    kind: "sip.received".into(),
                    detail: serde_json::json!({
                        "status": code,
                        "reason": sautikit_sip::message::reason_of(&response.status_code),
                        "cseq": sipmsg::cseq(&response).map(|(n, m)| format!("{n} {m}")),
                    }),
                };
                let store = state.store.clone();
                tokio::spawn(async move {
                    let _ = store.append_timeline(&call_id, vec![entry]).await;
                });
            }
        }
        TuEvent::ClientTimeout { key } => {
            if let Some((call, leg)) = state.client_invites.remove(&key) {
                let _ = call.cast(CallMsg::LegTimedOut { leg });
                return;
            }
            if let Some((binding_id, sent_at)) = state.keepalives.remove(&key) {
                if let Some(r) = registrar(state) {
                    let _ = r.cast(RegistrarMsg::KeepaliveTimedOut {
                        binding_id,
                        sent_at,
                    });
                }
                return;
            }
            if let Some(call_id) = state.requests.remove(&key) {
                let entry = TimelineEntry {
                    at: state.clock.now(),
                    kind: "sip.timeout".into(),
                    detail: serde_json::json!({"message": "no final response to our request"}),
                };
                let store = state.store.clone();
                tokio::spawn(async move {
                    let _ = store.append_timeline(&call_id, vec![entry]).await;
                });
            }
        }
    }
}

async fn on_request(
    myself: &ActorRef<SipMsg>,
    state: &mut SipEndpointState,
    key: TxKey,
    request: rsip::Request,
    from: Peer,
) {
    let method = request.method;
    // RFC 3261 §8.2, before anything acts on the request (ACK and CANCEL are never refused).
    if !matches!(method, Method::Ack | Method::Cancel)
        && let Some(refusal) = sautikit_sip::uas::refusal(&request)
    {
        let headers: Vec<(&str, &str)> = refusal
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .collect();
        reply(state, &key, &request, refusal.code, &headers);
        return;
    }
    let msg_call_id = dialog_id(state, &request);
    let call = msg_call_id
        .as_ref()
        .and_then(|c| state.dialogs.get(c))
        .cloned();
    match method {
        Method::Invite => {
            if let Some(call) = call {
                let _ = call.cast(CallMsg::InDialogRequest {
                    key,
                    request: Box::new(request),
                });
                return;
            }
            let to_tag = sipmsg::to_tag(&request);
            if to_tag.is_some() {
                // A re-INVITE for a dialog we do not know.
                reply(state, &key, &request, 481, &[]);
                return;
            }
            let on_net = msg_call_id
                .as_deref()
                .and_then(|c| c.strip_suffix(ON_NET_SUFFIX))
                .map(str::to_owned);
            if let Some(id) = on_net {
                // Our own `dial` to one of our numbers: trusted like a carrier.
                start_call(
                    myself,
                    state,
                    key,
                    request,
                    from,
                    None,
                    Some(on_net_id(&id)),
                )
                .await;
                return;
            }
            if from_device(&state.args.carrier_allow, &request, from) {
                // Devices authenticate (407) as a credential of one number; the Registrar
                // holds the nonce and failure state.
                match registrar(state) {
                    Some(r) => {
                        let _ = r.cast(RegistrarMsg::InviteReceived {
                            key,
                            request: Box::new(request),
                            from,
                            local: state.local,
                            endpoint: myself.clone(),
                        });
                    }
                    None => reply(state, &key, &request, 503, &[("Retry-After", "5")]),
                }
                return;
            }
            start_call(myself, state, key, request, from, None, None).await;
        }
        Method::Bye | Method::Info | Method::Options if call.is_some() => {
            if let Some(call) = call {
                let _ = call.cast(CallMsg::InDialogRequest {
                    key,
                    request: Box::new(request),
                });
            }
        }
        Method::Options => reply(
            state,
            &key,
            &request,
            200,
            &[("Allow", ALLOW), ("Accept", "application/sdp")],
        ),
        Method::Bye | Method::Info => reply(state, &key, &request, 481, &[]),
        Method::Register => match registrar(state) {
            Some(r) => {
                let _ = r.cast(RegistrarMsg::RegisterReceived {
                    key,
                    request: Box::new(request),
                    from,
                    local: state.local,
                    endpoint: myself.clone(),
                });
            }
            None => reply(state, &key, &request, 503, &[("Retry-After", "5")]),
        },
        // Every other method was refused above.
        _ => {}
    }
}

/// The call behind this SIP Call-ID (or on-net id) has ended: stop routing its messages to it.
fn forget_dialog(state: &mut SipEndpointState, sip_call_id: &str) {
    // An on-net call is forgotten once its called side is gone (our side's BYE or CANCEL may
    // still be on its way to it).
    if let Some(id) = sip_call_id.strip_suffix(ON_NET_SUFFIX) {
        state.loopback.remove(id);
    } else if !state.dialogs.contains_key(&on_net_id(sip_call_id)) {
        state.loopback.remove(sip_call_id);
    }
    state.dialogs.remove(sip_call_id);
    if let Some(key) = state.client_invite_of.remove(sip_call_id) {
        state.client_invites.remove(&key);
    }
    if let Some(key) = state.invite_of.remove(sip_call_id) {
        state.invites.remove(&key);
        state.setting_up.remove(&key);
    }
}

fn registrar(state: &SipEndpointState) -> Option<ActorRef<RegistrarMsg>> {
    ActorRef::<RegistrarMsg>::where_is(state.args.registrar.clone())
}

/// A new INVITE from a carrier, or an authenticated device: a Call actor takes it.
async fn start_call(
    myself: &ActorRef<SipMsg>,
    state: &mut SipEndpointState,
    key: TxKey,
    request: rsip::Request,
    from: Peer,
    device: Option<crate::registrar::DeviceLogin>,
    // The called side of an on-net call is known by another id than its Call-ID.
    id: Option<String>,
) {
    let Some(sip_call_id) = id.or_else(|| sipmsg::call_id(&request)) else {
        reply(state, &key, &request, 400, &[]);
        return;
    };
    if state.dialogs.contains_key(&sip_call_id) {
        reply(state, &key, &request, 482, &[]);
        return;
    }
    let now = Instant::now();
    let (setting_up, live) = (state.setting_up.len(), state.dialogs.len());
    let verdict = if !state.store.reachable() {
        // The database is known to be down: answered now, not after a pool's timeout.
        Err(Closed::StorageDown)
    } else if gated_by_receive_task(&state.args.carrier_allow, state.local, from) {
        // Its share was judged by the UDP receive task already.
        state.admission.caps(setting_up, live).map_err(Closed::Full)
    } else {
        state
            .admission
            .admit(setting_up, live, now)
            .map_err(Closed::Full)
    };
    if let Err(why) = verdict {
        state.shed += 1;
        metrics::counter!("sautikit_sip_invites_refused_total", "reason" => why.name())
            .increment(1);
        reply(
            state,
            &key,
            &request,
            503,
            &[("Retry-After", why.retry_after())],
        );
        return;
    }
    // Kept to answer 500 should the Call actor fail to start.
    let fallback = request.clone();
    let args = CallArgs {
        deps: state.args.deps.clone(),
        endpoint: myself.clone(),
        invite: IncomingInvite {
            server: Some(InviteServer {
                key: key.clone(),
                request,
            }),
            from,
            sip_call_id: sip_call_id.clone(),
            local: state.local,
            device,
        },
        placed: None,
    };
    match Actor::spawn_linked(None, crate::calls::Call, args, state.args.calls.clone()).await {
        Ok((call, _)) => {
            // Kept until the final response: should the actor fail before it answers, the
            // INVITE still gets its `500` (see `CallActorFailed`).
            state.setting_up.insert(
                key.clone(),
                Setup {
                    invite: fallback,
                    arrived: now,
                },
            );
            state.invite_of.insert(sip_call_id.clone(), key.clone());
            state.invites.insert(key, sip_call_id.clone());
            state.dialogs.insert(sip_call_id, call);
        }
        Err(e) => {
            warn!(error = %e, "could not start a Call actor");
            reply(state, &key, &fallback, 500, &[]);
        }
    }
}

/// What the called side of an on-net call is known by (its Call-ID is its caller's too).
const ON_NET_SUFFIX: &str = ";on-net";

fn on_net_id(sip_call_id: &str) -> String {
    format!("{sip_call_id}{ON_NET_SUFFIX}")
}

/// The dialog a request belongs to: its Call-ID, or for a request our own on-net leg sent to
/// the side it called, that side's id.
fn dialog_id(state: &SipEndpointState, request: &rsip::Request) -> Option<String> {
    let id = sipmsg::call_id(request)?;
    match state.loopback.get(&id) {
        Some(tag) if sipmsg::from_tag(request).as_deref() == Some(tag.as_str()) => {
            Some(on_net_id(&id))
        }
        _ => Some(id),
    }
}

/// A new INVITE comes from a device rather than a carrier when it carries credentials, comes
/// from outside the carriers' addresses, or names one of our SIP usernames as its caller.
fn from_device(carrier_allow: &[IpNet], request: &rsip::Request, from: Peer) -> bool {
    let has_credentials = request
        .headers
        .iter()
        .any(|h| matches!(h, rsip::Header::ProxyAuthorization(_)));
    let username = sipmsg::from_user(request).is_some_and(|u| {
        u.len() == 11 && u.starts_with("ts_") && u[3..].bytes().all(|b| b.is_ascii_hexdigit())
    });
    has_credentials || username || !carrier_allowed(carrier_allow, from.addr)
}

/// Whether a received message goes on to the transaction layer: a request from a source past
/// its rate limit is answered `503` or dropped here (see [`crate::flood`]). Our own address is
/// exempt: an on-net `dial` sends INVITEs from our listener to itself.
fn admit(
    myself: &ActorRef<SipMsg>,
    state: &mut SipEndpointState,
    bytes: &[u8],
    from: Peer,
    now: Instant,
) -> bool {
    use crate::flood::{RequestClass, Verdict};
    let Some(class) = RequestClass::of(bytes) else {
        return true;
    };
    if from.addr.ip() == state.local.ip() {
        return true;
    }
    let carrier = carrier_allowed(&state.args.carrier_allow, from.addr);
    match state.flood.check(from.addr.ip(), class, carrier, now) {
        Verdict::Pass => true,
        Verdict::Refuse { retry_after } => {
            metrics::counter!("sautikit_sip_rate_limited_total", "class" => class.name())
                .increment(1);
            let secs = retry_after.as_secs().max(1).to_string();
            if let Some(answer) = sautikit_sip::transaction::error_response_with(
                bytes,
                (503, "Service Unavailable"),
                "request rate limit",
                &[("Retry-After", &secs)],
            ) {
                transmit(myself, state, from, answer);
            }
            false
        }
        Verdict::Drop => {
            metrics::counter!("sautikit_sip_flood_dropped_total").increment(1);
            false
        }
        Verdict::Banned { until } => {
            let secs = until.saturating_duration_since(now).as_secs();
            warn!(source = %from.addr.ip(), class = class.name(), ban_seconds = secs, "SIP source banned for flooding");
            metrics::counter!("sautikit_sip_flood_bans_total").increment(1);
            false
        }
    }
}

/// Tell the UDP receive task what admission is now.
fn publish_admission(state: &SipEndpointState) {
    let closed = if !state.store.reachable() {
        Some(Closed::StorageDown)
    } else {
        state
            .admission
            .caps(state.setting_up.len(), state.dialogs.len())
            .err()
            .map(Closed::Full)
    };
    state.gate.publish(state.admission.share(), closed);
}

/// At most one line a second while INVITEs are being turned away.
fn report_shed(state: &mut SipEndpointState, now: Instant) {
    state.shed += state.gate.take_refused();
    if state.shed > 0 && now.duration_since(state.shed_reported) >= Duration::from_secs(1) {
        warn!(
            turned_away = state.shed,
            setting_up = state.setting_up.len(),
            live = state.dialogs.len(),
            admitted_share = state.admission.share(),
            "overloaded: new INVITEs answered 503"
        );
        state.shed = 0;
        state.shed_reported = now;
    }
}

fn carrier_allowed(allow: &[IpNet], addr: SocketAddr) -> bool {
    let ip = match addr.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(std::net::IpAddr::V4)
            .unwrap_or(std::net::IpAddr::V6(v6)),
        v4 => v4,
    };
    allow.iter().any(|n| n.contains(&ip))
}

/// Receive buffer asked for on the SIP UDP socket. The default (about 200 kB, some 400
/// datagrams) overflows when thousands of devices answer keepalives or register within a
/// second; the kernel caps the request at `net.core.rmem_max`.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

fn grow_receive_buffer(udp: &UdpSocket) {
    let socket = socket2::SockRef::from(udp);
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        warn!(error = %e, "could not enlarge the SIP socket's receive buffer");
    }
    match socket.recv_buffer_size() {
        // Linux reports twice what it grants (the other half is its bookkeeping).
        Ok(n) if n < UDP_RECEIVE_BUFFER => info!(
            bytes = n,
            wanted = UDP_RECEIVE_BUFFER,
            "SIP socket receive buffer capped by the system (net.core.rmem_max)"
        ),
        _ => {}
    }
}

/// UDP and TCP on one port. With port 0 the port UDP gets may be taken for TCP (by another
/// listener of this very process, say): then try another.
async fn bind_both(listen: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind(listen).await?;
        grow_receive_buffer(&udp);
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if listen.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")))
}

/// New INVITEs whose admission the UDP receive task judges: from a carrier over UDP (the
/// volume; others take the endpoint's way, past the flood guard), not our own on-net legs
/// (sent from our listener's socket).
fn gated_by_receive_task(carrier_allow: &[IpNet], local: SocketAddr, from: Peer) -> bool {
    from.transport == Transport::Udp
        && from.addr != local
        && carrier_allowed(carrier_allow, from.addr)
}

/// What the UDP receive thread needs.
struct UdpReceiver {
    endpoint: ActorRef<SipMsg>,
    gate: Arc<AdmissionGate>,
    carrier_allow: Vec<IpNet>,
    local: SocketAddr,
}

/// Receive on a thread of its own, with a runtime of its own, over a second descriptor of the
/// same socket (the endpoint's is only sent on). Reading and shedding then never wait behind the
/// calls' work on the shared runtime, which is busiest exactly when load must be shed (as a
/// SIP server's receiver processes do). Ends when the returned sender is dropped.
fn spawn_udp_receiver(
    udp: &UdpSocket,
    receiver: UdpReceiver,
) -> std::io::Result<tokio::sync::oneshot::Sender<()>> {
    use std::os::fd::AsFd;
    let fd = udp.as_fd().try_clone_to_owned()?;
    let socket = std::net::UdpSocket::from(fd);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("sautikit-sip-rx".into())
        .spawn(move || {
            runtime.block_on(async move {
                let socket = match UdpSocket::from_std(socket) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "SIP UDP receiver could not start");
                        return;
                    }
                };
                tokio::select! {
                    () = udp_loop(socket, receiver) => {}
                    _ = stopped => {}
                }
            });
        })?;
    Ok(stop)
}

async fn udp_loop(socket: UdpSocket, r: UdpReceiver) {
    let UdpReceiver {
        endpoint,
        gate,
        carrier_allow,
        local,
    } = r;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut credit = Credit::default();
    let mut recent = RecentVerdicts::new(Instant::now());
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, addr)) => {
                let from = Peer {
                    addr,
                    transport: Transport::Udp,
                };
                // Shedding load: a new INVITE refused here is answered at once, statelessly,
                // and never reaches the endpoint.
                if crate::flood::RequestClass::of(&buf[..n])
                    == Some(crate::flood::RequestClass::Invite)
                    && gated_by_receive_task(&carrier_allow, local, from)
                    && let Some(identity) =
                        sautikit_sip::transaction::new_invite_identity(&buf[..n])
                    && let (Err(why), fresh) =
                        recent.judge(&identity, Instant::now(), || gate.admit(&mut credit))
                    && let Some(answer) = sautikit_sip::transaction::refuse_new_invite(
                        &buf[..n],
                        (503, "Service Unavailable"),
                        &[("Retry-After", why.retry_after())],
                    )
                {
                    if fresh {
                        gate.refused();
                        metrics::counter!("sautikit_sip_invites_refused_total", "reason" => why.name())
                            .increment(1);
                    }
                    if let Err(e) = socket.send_to(&answer, addr).await {
                        debug!(error = %e, %addr, "could not send a 503");
                    }
                    continue;
                }
                let msg = SipMsg::Received {
                    bytes: buf[..n].to_vec(),
                    from,
                };
                if endpoint.cast(msg).is_err() {
                    return;
                }
            }
            // ICMP port unreachable from an earlier send shows up here on some systems.
            Err(e) => debug!(error = %e, "UDP receive error"),
        }
    }
}

async fn accept_loop(listener: TcpListener, endpoint: ActorRef<SipMsg>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(tcp_connection(stream, peer, endpoint.clone()));
            }
            Err(e) => {
                warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Open a TCP connection to `peer` (the outbound trunk); it then serves like an accepted one.
async fn connect_out(peer: SocketAddr, endpoint: ActorRef<SipMsg>) {
    match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(peer)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            tcp_connection(stream, peer, endpoint).await;
        }
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TCP connect failed");
            let _ = endpoint.cast(SipMsg::TcpConnectFailed { peer });
        }
        Err(_) => {
            info!(%peer, "TCP connect timed out");
            let _ = endpoint.cast(SipMsg::TcpConnectFailed { peer });
        }
    }
}

async fn tcp_connection(stream: TcpStream, peer: SocketAddr, endpoint: ActorRef<SipMsg>) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let own_tx = tx.clone();
    if endpoint
        .cast(SipMsg::TcpOpened { peer, writer: tx })
        .is_err()
    {
        return;
    }
    // An empty write asks the writer to finish: what was queued before it is flushed first.
    let mut writer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if bytes.is_empty() {
                let _ = wr.shutdown().await;
                return;
            }
            if wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut framer = StreamFramer::new();
    let mut buf = vec![0u8; 16 * 1024];
    'read: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        framer.push(&buf[..n]);
        while let Some(next) = framer.next_message() {
            match next {
                Ok(bytes) => {
                    let from = Peer {
                        addr: peer,
                        transport: Transport::Tcp,
                    };
                    if endpoint.cast(SipMsg::Received { bytes, from }).is_err() {
                        break 'read;
                    }
                }
                Err(e) => {
                    // The stream cannot be re-synchronised after a framing error: answer the
                    // message that broke it when its headers were read, then close.
                    info!(%peer, error = %e, "closing a TCP connection with a malformed stream");
                    let answer = e.status().and_then(|status| {
                        sautikit_sip::transaction::error_response(
                            framer.failed_head(),
                            status,
                            &e.to_string(),
                        )
                    });
                    if let Some(answer) = answer {
                        let _ = own_tx.send(answer);
                    }
                    // Requests framed before the error are still being answered: let those
                    // answers out before the connection goes.
                    tokio::time::sleep(TCP_LINGER).await;
                    let _ = own_tx.send(Vec::new());
                    let _ = tokio::time::timeout(TCP_LINGER, &mut writer).await;
                    break 'read;
                }
            }
        }
    }
    writer.abort();
    let _ = endpoint.cast(SipMsg::TcpClosed { peer });
}
