//! The Root supervisor and the [`Engine`] handle the service talks to.
//!
//! Children are registered under names unique to this engine, so a child restarted by Root is
//! found again by name and several engines can live in one test process.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::call_store::CallStore;
use crate::callback::CallbackClient;
use crate::calls::{CallDeps, Calls, CallsArgs, CallsMsg};
use crate::clock::Clock;
use crate::events::{Events, EventsArgs};
use crate::inventory::{Inventory, InventoryArgs, InventoryMsg};
use crate::media::Media;
use crate::model::{LedgerKind, TenantNumber};
use crate::numbers::{Numbers, NumbersMsg};
use crate::registrar::{Registrar, RegistrarArgs, RegistrarStore};
use crate::scheduler::{Scheduler, SchedulerArgs};
use crate::sip_endpoint::{SipEndpoint, SipEndpointArgs};
use crate::store::{
    ClaimError, Credited, IdempotencyMark, ReleaseError, StorageError, Store, WalletError,
};
use crate::wallet::{WalletDeps, WalletMsg, Wallets, WalletsMsg};

/// How long a caller waits for an actor's answer before reporting the engine unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("failed to start the actor tree: {0}")]
    Spawn(String),
}

#[derive(Clone)]
struct Names {
    inventory: String,
    wallets: String,
    events: String,
    numbers: String,
    calls: String,
    sip: String,
    registrar: String,
    scheduler: String,
}

impl Names {
    fn new() -> Self {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        Names {
            inventory: format!("sautikit.{tag}.inventory"),
            wallets: format!("sautikit.{tag}.wallets"),
            events: format!("sautikit.{tag}.events"),
            numbers: format!("sautikit.{tag}.numbers"),
            calls: format!("sautikit.{tag}.calls"),
            sip: format!("sautikit.{tag}.sip"),
            registrar: format!("sautikit.{tag}.registrar"),
            scheduler: format!("sautikit.{tag}.scheduler"),
        }
    }
}

/// Root has no messages of its own: it only supervises.
pub enum RootMsg {}

struct Root;

struct RootState {
    names: Names,
    deps: WalletDeps,
    events: Option<EventsArgs>,
    voice: Option<VoiceRuntime>,
    scheduler: Option<SchedulerArgs>,
}

/// How the engine takes calls: SIP and RTP addresses, who may send INVITEs, and the outside
/// services a call uses.
#[derive(Clone)]
pub struct VoiceSetup {
    pub store: Arc<dyn CallStore>,
    pub callback: Arc<dyn CallbackClient>,
    pub sip_listen: std::net::SocketAddr,
    pub carrier_allow: Vec<ipnet::IpNet>,
    /// RTP ports (inclusive).
    pub rtp_ports: (u16, u16),
    /// Written into SDP answers; RTP sockets bind to it.
    pub media_ip: std::net::IpAddr,
    /// Ask for real-time scheduling for the media threads (falls back to normal when refused).
    pub media_realtime: bool,
    /// Pacing threads; each owns a share of the calls.
    pub media_threads: usize,
    /// SQLite: every call live at start is an orphan of this same process.
    pub single_process: bool,
    /// An engine silent this long is taken for dead and its live calls are closed.
    pub orphan_after: std::time::Duration,
    pub timers: sautikit_sip::transaction::Timers,
    /// When new INVITEs are turned away with `503`.
    pub admission: crate::admission::Admission,
    /// Per-source SIP request-rate limits.
    pub flood: crate::flood::FloodLimits,
    pub synth: Arc<dyn crate::synth::Synthesizer>,
    pub audio: Arc<dyn crate::audio::AudioFetcher>,
    /// Recordings are written under it.
    pub data_dir: std::path::PathBuf,
    /// The API's public base URL (for `RecordingUrl`).
    pub public_url: String,
    pub registrar: RegistrarSetup,
    /// A bridged call leg that sends no RTP this long ends the call (`media_timeout`).
    pub media_timeout: Duration,
    /// How long a number's registered devices ring before the caller gets `480`.
    pub ring_timeout: Duration,
    /// `SAUTIKIT_OUTBOUND_TRUNK`, resolved.
    pub trunk: Option<crate::calls::trunk::Trunk>,
    /// Which addresses `dial`'s SIP targets may resolve to (the webhook rules).
    pub dial_policy: crate::address::AddressPolicy,
    /// How media streams (`stream`) connect.
    pub streams: crate::streaming::StreamSettings,
}

/// How softphones register (DESIGN §8).
#[derive(Clone)]
pub struct RegistrarSetup {
    pub store: Arc<dyn RegistrarStore>,
    /// `SAUTIKIT_SIP_DOMAIN`.
    pub domain: String,
    pub failures: sautikit_sip::auth::FailureLimits,
    pub bindings: sautikit_sip::registrar::BindingLimits,
    /// Digest algorithms offered, most preferred first.
    pub algorithms: Vec<sautikit_sip::digest::Algorithm>,
    pub keepalive_every: Duration,
    /// REGISTERs waiting on the database past which new ones get `503` (normally
    /// [`crate::registrar::MAX_PENDING_REGISTERS`]).
    pub max_pending_registers: usize,
}

/// What Root needs to (re)start the voice actors.
#[derive(Clone)]
struct VoiceRuntime {
    setup: VoiceSetup,
    deps: CallDeps,
    /// The address SIP is bound to; a restarted endpoint binds it again (not a new port 0).
    sip_addr: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
}

impl Root {
    async fn spawn_inventory(
        myself: &ActorRef<RootMsg>,
        state: &RootState,
    ) -> Result<(), ActorProcessingErr> {
        Actor::spawn_linked(
            Some(state.names.inventory.clone()),
            Inventory,
            InventoryArgs {
                store: state.deps.store.clone(),
                clock: state.deps.clock.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        Ok(())
    }

    async fn spawn_wallets(
        myself: &ActorRef<RootMsg>,
        state: &RootState,
    ) -> Result<(), ActorProcessingErr> {
        Actor::spawn_linked(
            Some(state.names.wallets.clone()),
            Wallets,
            state.deps.clone(),
            myself.get_cell(),
        )
        .await?;
        Ok(())
    }
}

impl Root {
    async fn spawn_scheduler(
        myself: &ActorRef<RootMsg>,
        state: &RootState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(args) = &state.scheduler {
            let mut args = args.clone();
            args.numbers = state.voice.as_ref().map(|_| state.names.numbers.clone());
            Actor::spawn_linked(
                Some(state.names.scheduler.clone()),
                Scheduler,
                args,
                myself.get_cell(),
            )
            .await?;
        }
        Ok(())
    }

    async fn spawn_events(
        myself: &ActorRef<RootMsg>,
        state: &RootState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(args) = &state.events {
            Actor::spawn_linked(
                Some(state.names.events.clone()),
                Events,
                args.clone(),
                myself.get_cell(),
            )
            .await?;
        }
        Ok(())
    }
}

impl Root {
    async fn spawn_numbers(
        myself: &ActorRef<RootMsg>,
        state: &RootState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(v) = &state.voice {
            Actor::spawn_linked(
                Some(state.names.numbers.clone()),
                Numbers,
                v.setup.store.clone(),
                myself.get_cell(),
            )
            .await?;
        }
        Ok(())
    }

    async fn spawn_calls(
        myself: &ActorRef<RootMsg>,
        state: &RootState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(v) = &state.voice {
            Actor::spawn_linked(
                Some(state.names.calls.clone()),
                Calls,
                CallsArgs {
                    deps: v.deps.clone(),
                    single_process: v.setup.single_process,
                    orphan_after: v.setup.orphan_after,
                },
                myself.get_cell(),
            )
            .await?;
        }
        Ok(())
    }

    async fn spawn_registrar(
        myself: &ActorRef<RootMsg>,
        state: &RootState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(v) = &state.voice else {
            return Ok(());
        };
        let r = &v.setup.registrar;
        Actor::spawn_linked(
            Some(state.names.registrar.clone()),
            Registrar,
            RegistrarArgs {
                store: r.store.clone(),
                clock: v.deps.clock.clone(),
                domain: r.domain.clone(),
                engine_id: v.deps.engine_id.clone(),
                single_process: v.setup.single_process,
                orphan_after: v.setup.orphan_after,
                failures: r.failures,
                bindings: r.bindings,
                algorithms: r.algorithms.clone(),
                keepalive_every: r.keepalive_every,
                max_pending_registers: r.max_pending_registers,
                sip: state.names.sip.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        Ok(())
    }

    async fn spawn_sip(
        myself: &ActorRef<RootMsg>,
        state: &RootState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(v) = &state.voice else {
            return Ok(());
        };
        let Some(calls) = ActorRef::<CallsMsg>::where_is(state.names.calls.clone()) else {
            return Err("the Calls actor is not running".into());
        };
        let listen = v
            .sip_addr
            .lock()
            .ok()
            .and_then(|a| *a)
            .unwrap_or(v.setup.sip_listen);
        let (tx, rx) = tokio::sync::oneshot::channel();
        Actor::spawn_linked(
            Some(state.names.sip.clone()),
            SipEndpoint,
            (
                SipEndpointArgs {
                    listen,
                    carrier_allow: v.setup.carrier_allow.clone(),
                    deps: v.deps.clone(),
                    calls: calls.get_cell(),
                    timers: v.setup.timers,
                    admission: v.setup.admission,
                    flood: v.setup.flood,
                    registrar: state.names.registrar.clone(),
                },
                tx,
            ),
            myself.get_cell(),
        )
        .await?;
        if let Ok(addr) = rx.await
            && let Ok(mut slot) = v.sip_addr.lock()
        {
            *slot = Some(addr);
        }
        Ok(())
    }
}

impl Actor for Root {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootState;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Root::spawn_inventory(&myself, &state).await?;
        Root::spawn_wallets(&myself, &state).await?;
        Root::spawn_events(&myself, &state).await?;
        Root::spawn_numbers(&myself, &state).await?;
        Root::spawn_calls(&myself, &state).await?;
        Root::spawn_registrar(&myself, &state).await?;
        Root::spawn_sip(&myself, &state).await?;
        Root::spawn_scheduler(&myself, &state).await?;
        Ok(state)
    }

    // Replace ractor's stop-on-child-exit: a failed child is restarted under its name.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = event {
            let name = cell.get_name().unwrap_or_default();
            error!(actor = %name, error = %err, "child actor failed; restarting");
            if name == state.names.inventory {
                Root::spawn_inventory(&myself, state).await?;
            } else if name == state.names.wallets {
                Root::spawn_wallets(&myself, state).await?;
            } else if name == state.names.events {
                Root::spawn_events(&myself, state).await?;
            } else if name == state.names.numbers {
                Root::spawn_numbers(&myself, state).await?;
            } else if name == state.names.calls {
                Root::spawn_calls(&myself, state).await?;
            } else if name == state.names.registrar {
                Root::spawn_registrar(&myself, state).await?;
            } else if name == state.names.sip {
                Root::spawn_sip(&myself, state).await?;
            } else if name == state.names.scheduler {
                Root::spawn_scheduler(&myself, state).await?;
            } else {
                warn!(actor = %name, "unknown child failed");
            }
        }
        Ok(())
    }
}

/// The running actor tree, as the HTTP layer and CLI see it.
pub struct Engine {
    names: Names,
    sip_addr: Option<std::net::SocketAddr>,
    /// This process's id on the calls it holds; `None` when it takes no calls.
    engine_id: Option<String>,
    /// Calls can be placed: an outbound trunk is configured.
    has_trunk: bool,
    root: ActorRef<RootMsg>,
    join: JoinHandle<()>,
}

impl Engine {
    /// The tree without webhook delivery (tests of the other actors).
    pub async fn start(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine, EngineError> {
        Self::start_with(store, clock, None).await
    }

    /// The whole tree; `events` wires the Events actor to its outbox and transport.
    pub async fn start_with(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        events: Option<EventsArgs>,
    ) -> Result<Engine, EngineError> {
        Self::start_full(store, clock, events, None, None).await
    }

    /// The whole tree, taking calls when `voice` is given and running due work (renewals) when
    /// `scheduler` is.
    pub async fn start_full(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        events: Option<EventsArgs>,
        voice: Option<VoiceSetup>,
        scheduler: Option<SchedulerArgs>,
    ) -> Result<Engine, EngineError> {
        let names = Names::new();
        let voice = voice.map(|setup| {
            let media = Media::start(
                setup.media_ip,
                setup.rtp_ports.0,
                setup.rtp_ports.1,
                setup.media_threads,
                setup.media_realtime,
            );
            VoiceRuntime {
                deps: CallDeps {
                    store: setup.store.clone(),
                    callback: setup.callback.clone(),
                    clock: clock.clone(),
                    media,
                    media_ip: setup.media_ip,
                    engine_id: uuid::Uuid::now_v7().to_string(),
                    numbers: names.numbers.clone(),
                    calls: names.calls.clone(),
                    sip: names.sip.clone(),
                    synth: setup.synth.clone(),
                    audio: setup.audio.clone(),
                    data_dir: setup.data_dir.clone(),
                    public_url: setup.public_url.clone(),
                    devices: setup.registrar.store.clone(),
                    media_timeout: setup.media_timeout,
                    ring_timeout: setup.ring_timeout,
                    trunk: setup.trunk.clone(),
                    dial_policy: setup.dial_policy.clone(),
                    streams: setup.streams.clone(),
                },
                setup,
                sip_addr: Arc::new(std::sync::Mutex::new(None)),
            }
        });
        let sip_addr = voice.as_ref().map(|v| v.sip_addr.clone());
        let engine_id = voice.as_ref().map(|v| v.deps.engine_id.clone());
        let has_trunk = voice.as_ref().is_some_and(|v| v.deps.trunk.is_some());
        let (root, join) = Actor::spawn(
            None,
            Root,
            RootState {
                names: names.clone(),
                deps: WalletDeps { store, clock },
                events,
                voice,
                scheduler,
            },
        )
        .await
        .map_err(|e| EngineError::Spawn(e.to_string()))?;
        let sip_addr = sip_addr.and_then(|a| a.lock().ok().and_then(|a| *a));
        Ok(Engine {
            names,
            sip_addr,
            engine_id,
            has_trunk,
            root,
            join,
        })
    }

    /// Where SIP listens (UDP and TCP), when the engine takes calls.
    pub fn sip_addr(&self) -> Option<std::net::SocketAddr> {
        self.sip_addr
    }

    /// The API changed or released a number: cached routes must be read again.
    pub fn number_changed(&self, number_id: &str) {
        if let Some(numbers) = ActorRef::<NumbersMsg>::where_is(self.names.numbers.clone()) {
            let _ = numbers.cast(NumbersMsg::NumberChanged {
                number_id: number_id.to_owned(),
            });
        }
    }

    /// Claim a number; `idempotency`: the request's key, marked applied by the claim.
    pub async fn claim_number(
        &self,
        workspace_id: &str,
        inventory_id: &str,
        idempotency: Option<IdempotencyMark>,
    ) -> Result<TenantNumber, ClaimError> {
        let actor = lookup::<InventoryMsg>(&self.names.inventory)?;
        ask(&actor, |reply| InventoryMsg::ClaimRequested {
            workspace_id: workspace_id.to_owned(),
            inventory_id: inventory_id.to_owned(),
            idempotency,
            reply,
        })
        .await?
    }

    pub async fn release_number(
        &self,
        workspace_id: &str,
        number_id: &str,
    ) -> Result<TenantNumber, ReleaseError> {
        let actor = lookup::<InventoryMsg>(&self.names.inventory)?;
        ask(&actor, |reply| InventoryMsg::ReleaseRequested {
            workspace_id: workspace_id.to_owned(),
            number_id: number_id.to_owned(),
            reply,
        })
        .await?
    }

    /// Credit a wallet; `idempotency`: the request's key, marked applied by the credit.
    pub async fn credit_wallet(
        &self,
        workspace_id: &str,
        amount_minor: i64,
        currency: &str,
        kind: LedgerKind,
        reference: Option<String>,
        idempotency: Option<IdempotencyMark>,
    ) -> Result<Credited, WalletError> {
        let actor = lookup::<WalletsMsg>(&self.names.wallets)?;
        let credited = ask(&actor, |reply| WalletsMsg::ForWorkspace {
            workspace_id: workspace_id.to_owned(),
            msg: WalletMsg::CreditRequested {
                amount_minor,
                currency: currency.to_owned(),
                kind,
                reference,
                idempotency,
                reply,
            },
        })
        .await??;
        for n in &credited.reactivated {
            self.number_changed(&n.id);
        }
        Ok(credited)
    }

    /// Hang up a live call of this workspace held by this process, and wait until it has ended
    /// and its final record is committed. `Ok(false)`: no such live call here.
    pub async fn hangup_call(
        &self,
        workspace_id: &str,
        call_id: &str,
    ) -> Result<bool, StorageError> {
        let Some(calls) = ActorRef::<CallsMsg>::where_is(self.names.calls.clone()) else {
            return Ok(false);
        };
        ask(&calls, |reply| CallsMsg::HangupRequested {
            workspace_id: workspace_id.to_owned(),
            call_id: call_id.to_owned(),
            reply,
        })
        .await
    }

    /// This process's id on the calls it holds, when it takes calls.
    pub fn engine_id(&self) -> Option<&str> {
        self.engine_id.as_deref()
    }

    /// Whether calls can be placed from here (an outbound trunk is configured).
    pub fn can_place_calls(&self) -> bool {
        self.has_trunk && self.sip_addr.is_some()
    }

    /// Start a call the API placed (its row written with this engine's id, its first slice
    /// reserved).
    pub async fn place_call(
        &self,
        placed: crate::calls::PlacedCall,
    ) -> Result<Result<(), crate::calls::PlaceRefusal>, StorageError> {
        let Some(calls) = ActorRef::<CallsMsg>::where_is(self.names.calls.clone()) else {
            return Ok(Err(crate::calls::PlaceRefusal::Unavailable));
        };
        ask(&calls, |reply| CallsMsg::PlaceCall {
            placed: Box::new(placed),
            reply,
        })
        .await
    }

    /// A placed call whose row could not be written: the write may have committed unseen, so
    /// Calls ends the call (`failed`, `storage.unavailable`) at its next heartbeats if it did.
    pub fn end_if_started(&self, call_id: String, now: chrono::DateTime<chrono::Utc>) {
        crate::calls::end_if_started(&self.names.calls, call_id, now, Vec::new());
    }

    /// An end the store refused: Calls writes it at its next heartbeats, until it is written.
    pub fn end_later(&self, end: crate::call_store::CallEnded) {
        crate::calls::end_later(&self.names.calls, end);
    }

    /// A fresh SIP Call-ID, for a placed call's row before its INVITE is sent.
    pub fn new_sip_call_id() -> String {
        sautikit_sip::message::new_call_id()
    }

    /// How many calls this process holds as live (each has a Call actor that has not ended).
    pub async fn live_calls(&self) -> Result<usize, StorageError> {
        let Some(calls) = ActorRef::<CallsMsg>::where_is(self.names.calls.clone()) else {
            return Ok(0);
        };
        ask(&calls, CallsMsg::LiveCount).await
    }

    /// Stop the tree and wait for every actor to finish its current message.
    pub async fn stop(self) {
        self.root
            .stop_children_and_wait(None, Some(CALL_TIMEOUT))
            .await;
        self.root.stop(None);
        let _ = self.join.await;
    }
}

fn lookup<M: ractor::Message>(name: &str) -> Result<ActorRef<M>, StorageError> {
    ActorRef::<M>::where_is(name)
        .ok_or_else(|| StorageError(format!("actor {name} is not running")))
}

async fn ask<M, T>(
    actor: &ActorRef<M>,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, StorageError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(build, Some(CALL_TIMEOUT)).await {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(StorageError("engine timed out".into())),
        Ok(CallResult::SenderError) => Err(StorageError("engine dropped the request".into())),
        Err(e) => Err(StorageError(format!("engine unavailable: {e}"))),
    }
}
