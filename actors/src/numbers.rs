//! Numbers: one Number actor per claimed number that has had a call, holding its route (status,
//! callback URLs, rates, signing secret) so an INVITE costs no database read.
//!
//! The cache is refreshed when the API changes the number (`NumberChanged`) and, because other
//! processes may change it too (several engines on one PostgreSQL), whenever it is older than
//! `ROUTE_TTL`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::warn;

use crate::call_store::{CallStore, NumberRoute};
use crate::store::StorageError;

/// How long a cached route is trusted without asking the database.
pub const ROUTE_TTL: Duration = Duration::from_secs(5);

pub type RouteReply = RpcReplyPort<Result<Option<NumberRoute>, StorageError>>;

pub enum NumbersMsg {
    /// An INVITE arrived for this E.164 number (with `+`).
    RouteRequested { number: String, reply: RouteReply },
    /// The database answered a look-up for a number without an actor.
    RouteLoaded {
        number: String,
        result: Result<Option<NumberRoute>, StorageError>,
    },
    /// The API changed or released this number: drop what is cached.
    NumberChanged { number_id: String },
}

pub struct Numbers;

pub struct NumbersState {
    store: Arc<dyn CallStore>,
    by_number: HashMap<String, ActorRef<NumberMsg>>,
    by_id: HashMap<String, String>,
    /// Look-ups in flight and who waits for them.
    loading: HashMap<String, Vec<RouteReply>>,
}

impl Actor for Numbers {
    type Msg = NumbersMsg;
    type State = NumbersState;
    type Arguments = Arc<dyn CallStore>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        store: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(NumbersState {
            store,
            by_number: HashMap::new(),
            by_id: HashMap::new(),
            loading: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            NumbersMsg::RouteRequested { number, reply } => {
                if let Some(actor) = state.by_number.get(&number) {
                    if actor.cast(NumberMsg::RouteRequested { reply }).is_ok() {
                        return Ok(());
                    }
                    state.by_number.remove(&number);
                    return Ok(());
                }
                let waiters = state.loading.entry(number.clone()).or_default();
                waiters.push(reply);
                if waiters.len() == 1 {
                    // Load off the actor, so one slow query does not hold up other numbers.
                    let store = state.store.clone();
                    let me = myself.clone();
                    tokio::spawn(async move {
                        let result = store.route_by_number(&number).await;
                        let _ = me.cast(NumbersMsg::RouteLoaded { number, result });
                    });
                }
            }
            NumbersMsg::RouteLoaded { number, result } => {
                let waiters = state.loading.remove(&number).unwrap_or_default();
                if let Ok(Some(route)) = &result {
                    match Actor::spawn_linked(
                        None,
                        Number,
                        NumberArgs {
                            store: state.store.clone(),
                            route: route.clone(),
                        },
                        myself.get_cell(),
                    )
                    .await
                    {
                        Ok((actor, _)) => {
                            state.by_id.insert(route.number_id.clone(), number.clone());
                            state.by_number.insert(number, actor);
                        }
                        Err(e) => warn!(error = %e, "could not start a Number actor"),
                    }
                }
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
            NumbersMsg::NumberChanged { number_id } => {
                if let Some(number) = state.by_id.get(&number_id)
                    && let Some(actor) = state.by_number.get(number)
                {
                    let _ = actor.cast(NumberMsg::Changed);
                }
            }
        }
        Ok(())
    }

    // A Number actor that stops (released number) or fails is forgotten; the next INVITE loads
    // the number afresh. Never stop Numbers itself for a child.
    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let cell: Option<ActorCell> = match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => Some(cell),
            SupervisionEvent::ActorFailed(cell, err) => {
                warn!(error = %err, "Number actor failed");
                Some(cell)
            }
            _ => None,
        };
        if let Some(cell) = cell {
            let id = cell.get_id();
            state.by_number.retain(|_, a| a.get_id() != id);
            let live: std::collections::HashSet<&String> = state.by_number.keys().collect();
            state.by_id.retain(|_, n| live.contains(n));
        }
        Ok(())
    }
}

pub enum NumberMsg {
    RouteRequested { reply: RouteReply },
    Changed,
}

pub struct Number;

pub struct NumberArgs {
    store: Arc<dyn CallStore>,
    route: NumberRoute,
}

pub struct NumberState {
    store: Arc<dyn CallStore>,
    route: NumberRoute,
    loaded_at: Option<Instant>,
}

impl Actor for Number {
    type Msg = NumberMsg;
    type State = NumberState;
    type Arguments = NumberArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(NumberState {
            store: args.store,
            route: args.route,
            loaded_at: Some(Instant::now()),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            NumberMsg::Changed => state.loaded_at = None,
            NumberMsg::RouteRequested { reply } => {
                let fresh = state.loaded_at.is_some_and(|t| t.elapsed() < ROUTE_TTL);
                if !fresh {
                    let loaded = match state.store.route_by_id(&state.route.number_id).await {
                        // Released, and perhaps claimed again by someone else: look the E.164
                        // number up afresh.
                        Ok(None) => state.store.route_by_number(&state.route.number).await,
                        other => other,
                    };
                    match loaded {
                        Ok(Some(route)) => {
                            state.route = route;
                            state.loaded_at = Some(Instant::now());
                        }
                        Ok(None) => {
                            // Released: answer as unknown and leave.
                            let _ = reply.send(Ok(None));
                            myself.stop(None);
                            return Ok(());
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return Ok(());
                        }
                    }
                }
                let _ = reply.send(Ok(Some(state.route.clone())));
            }
        }
        Ok(())
    }
}
