//! The Inventory actor: one per process, it serializes claims and releases so that a burst of
//! claims for the same number queues here instead of contending inside the database. Correctness
//! across processes still comes from the conditional SQL behind [`Store::claim_number`].
//!
//! Claims that queue up while a batch is running are committed together ([`Store::claim_numbers`],
//! group commit): one transaction's fixed cost is shared by the batch, and each claim is still
//! decided in arrival order.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, warn};

use crate::clock::Clock;
use crate::model::TenantNumber;
use crate::store::{ClaimError, ClaimNumber, IdempotencyMark, ReleaseError, ReleaseNumber, Store};

pub enum InventoryMsg {
    ClaimRequested {
        workspace_id: String,
        inventory_id: String,
        idempotency: Option<IdempotencyMark>,
        reply: RpcReplyPort<Result<TenantNumber, ClaimError>>,
    },
    ReleaseRequested {
        workspace_id: String,
        number_id: String,
        reply: RpcReplyPort<Result<TenantNumber, ReleaseError>>,
    },
    /// Sent to itself after the first claim of a batch: every claim that arrived before this
    /// message is in the batch.
    ClaimsWaiting,
}

/// Claims committed together at most (group commit).
const MAX_BATCH: usize = 128;

type ClaimReply = RpcReplyPort<Result<TenantNumber, ClaimError>>;

pub struct Inventory;

pub struct InventoryArgs {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
}

pub struct InventoryState {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    waiting: Vec<(ClaimNumber, ClaimReply)>,
    batch_scheduled: bool,
}

impl InventoryState {
    /// Run the waiting claims as one group commit and answer each.
    async fn run_claims(&mut self) {
        let batch: Vec<(ClaimNumber, ClaimReply)> = if self.waiting.len() > MAX_BATCH {
            self.waiting.drain(..MAX_BATCH).collect()
        } else {
            std::mem::take(&mut self.waiting)
        };
        if batch.is_empty() {
            return;
        }
        let (cmds, replies): (Vec<ClaimNumber>, Vec<ClaimReply>) = batch.into_iter().unzip();
        let logged: Vec<(String, String)> = cmds
            .iter()
            .map(|c| (c.workspace_id.clone(), c.inventory_id.clone()))
            .collect();
        let results = self.store.claim_numbers(cmds).await;
        for (((workspace_id, inventory_id), reply), result) in
            logged.into_iter().zip(replies).zip(results)
        {
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
    }
}

impl Actor for Inventory {
    type Msg = InventoryMsg;
    type State = InventoryState;
    type Arguments = InventoryArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(InventoryState {
            store: args.store,
            clock: args.clock,
            waiting: Vec::new(),
            batch_scheduled: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            InventoryMsg::ClaimRequested {
                workspace_id,
                inventory_id,
                idempotency,
                reply,
            } => {
                let cmd = ClaimNumber {
                    workspace_id,
                    inventory_id,
                    now: state.clock.now(),
                    idempotency,
                };
                state.waiting.push((cmd, reply));
                if !state.batch_scheduled {
                    state.batch_scheduled = true;
                    myself.cast(InventoryMsg::ClaimsWaiting)?;
                }
            }
            InventoryMsg::ClaimsWaiting => {
                state.batch_scheduled = false;
                state.run_claims().await;
                if !state.waiting.is_empty() {
                    state.batch_scheduled = true;
                    myself.cast(InventoryMsg::ClaimsWaiting)?;
                }
            }
            InventoryMsg::ReleaseRequested {
                workspace_id,
                number_id,
                reply,
            } => {
                // Claims that arrived first are decided first.
                while !state.waiting.is_empty() {
                    state.run_claims().await;
                }
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
