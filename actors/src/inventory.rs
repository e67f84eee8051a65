//! The Inventory actor: one per process, it serializes claims and releases so that a burst of
//! claims for the same number queues here instead of contending inside the database. Correctness
//! across processes still comes from the conditional SQL behind [`Store::claim_number`].

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, warn};

use crate::clock::Clock;
use crate::model::TenantNumber;
use crate::store::{ClaimError, ClaimNumber, ReleaseError, ReleaseNumber, Store};

pub enum InventoryMsg {
    ClaimRequested {
        workspace_id: String,
        inventory_id: String,
        reply: RpcReplyPort<Result<TenantNumber, ClaimError>>,
    },
    ReleaseRequested {
        workspace_id: String,
        number_id: String,
        reply: RpcReplyPort<Result<TenantNumber, ReleaseError>>,
    },
}

pub struct Inventory;

pub struct InventoryState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
}

impl Actor for Inventory {
    type Msg = InventoryMsg;
    type State = InventoryState;
    type Arguments = InventoryState;

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
            InventoryMsg::ClaimRequested {
                workspace_id,
                inventory_id,
                reply,
            } => {
                let result = state
                    .store
                    .claim_number(ClaimNumber {
                        workspace_id: workspace_id.clone(),
                        inventory_id: inventory_id.clone(),
                        now: state.clock.now(),
                    })
                    .await;
                match &result {
                    Ok(n) => info!(
                        workspace_id,
                        number_id = %n.id,
                        number = %n.number,
                        "number claimed"
                    ),
                    Err(ClaimError::Storage(e)) => {
                        warn!(workspace_id, inventory_id, error = %e, "claim failed")
                    }
                    Err(e) => info!(workspace_id, inventory_id, reason = %e, "claim refused"),
                }
                // The caller may have given up (timeout); the outcome is committed either way.
                let _ = reply.send(result);
            }
            InventoryMsg::ReleaseRequested {
                workspace_id,
                number_id,
                reply,
            } => {
                let result = state
                    .store
                    .release_number(ReleaseNumber {
                        workspace_id: workspace_id.clone(),
                        number_id: number_id.clone(),
                        now: state.clock.now(),
                    })
                    .await;
                if result.is_ok() {
                    info!(workspace_id, number_id, "number released");
                }
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}
