//! Wallets: a supervisor that owns one Wallet actor per workspace. Each Wallet actor serializes
//! the credits and debits of its workspace; the conditional SQL behind the [`Store`] keeps the
//! balance correct across processes.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::{info, warn};

use crate::clock::Clock;
use crate::model::LedgerKind;
use crate::store::{CreditWallet, Credited, IdempotencyMark, Store, WalletError};

pub enum WalletMsg {
    CreditRequested {
        amount_minor: i64,
        currency: String,
        kind: LedgerKind,
        reference: Option<String>,
        idempotency: Option<IdempotencyMark>,
        reply: RpcReplyPort<Result<Credited, WalletError>>,
    },
}

pub enum WalletsMsg {
    /// A wallet operation for a workspace; the supervisor starts its Wallet actor on first use.
    ForWorkspace {
        workspace_id: String,
        msg: WalletMsg,
    },
}

#[derive(Clone)]
pub struct WalletDeps {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
}

pub struct Wallets;

pub struct WalletsState {
    deps: WalletDeps,
    by_workspace: HashMap<String, ActorRef<WalletMsg>>,
}

impl Actor for Wallets {
    type Msg = WalletsMsg;
    type State = WalletsState;
    type Arguments = WalletDeps;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        deps: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WalletsState {
            deps,
            by_workspace: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let WalletsMsg::ForWorkspace { workspace_id, msg } = message;
        let wallet = match state.by_workspace.get(&workspace_id) {
            Some(w) => w.clone(),
            None => {
                let (w, _) = Actor::spawn_linked(
                    None,
                    Wallet,
                    WalletArgs {
                        workspace_id: workspace_id.clone(),
                        deps: state.deps.clone(),
                    },
                    myself.get_cell(),
                )
                .await?;
                state.by_workspace.insert(workspace_id.clone(), w.clone());
                w
            }
        };
        if let Err(e) = wallet.cast(msg) {
            // The actor died between lookup and send; its reply port is dropped with the message,
            // so the caller sees an error rather than a hang.
            warn!(workspace_id, error = %e, "wallet actor unavailable");
            state.by_workspace.remove(&workspace_id);
        }
        Ok(())
    }

    // ractor's default stops the supervisor when a child exits; a failed wallet must only be
    // forgotten, so the next request starts a fresh one.
    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state
                    .by_workspace
                    .retain(|_, w| w.get_id() != cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                warn!(error = %err, "wallet actor failed; it restarts on next use");
                state
                    .by_workspace
                    .retain(|_, w| w.get_id() != cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }
}

pub struct Wallet;

pub struct WalletArgs {
    workspace_id: String,
    deps: WalletDeps,
}

impl Actor for Wallet {
    type Msg = WalletMsg;
    type State = WalletArgs;
    type Arguments = WalletArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WalletMsg::CreditRequested {
                amount_minor,
                currency,
                kind,
                reference,
                idempotency,
                reply,
            } => {
                let result = state
                    .deps
                    .store
                    .credit_wallet(CreditWallet {
                        workspace_id: state.workspace_id.clone(),
                        amount_minor,
                        currency,
                        kind,
                        reference,
                        now: state.deps.clock.now(),
                        idempotency,
                    })
                    .await;
                if let Ok(credited) = &result {
                    info!(
                        workspace_id = %state.workspace_id,
                        amount_minor,
                        balance_after_minor = credited.entry.balance_after_minor,
                        reactivated = credited.reactivated.len(),
                        kind = kind.as_str(),
                        "wallet credited"
                    );
                }
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}
