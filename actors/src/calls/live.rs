//! The live calls Calls knows of: each Call actor's last snapshot, by actor and by call id.
//!
//! Ractor hands a supervisor its children's supervision events before its ordinary messages, so
//! a Call actor's end can be seen before snapshots it sent just before it ended. Calls therefore
//! acts on an end only from a message it sends itself ([`super::CallsMsg::CallActorEnded`]),
//! which queues behind every snapshot the actor sent: the book always holds the newest snapshot
//! when the end is handled, and nothing is left behind.

use std::collections::HashMap;

use ractor::{ActorId, ActorRef};

use super::{CallMsg, CallSnapshot};

#[derive(Default)]
pub(super) struct LiveCalls {
    by_actor: HashMap<ActorId, (ActorRef<CallMsg>, CallSnapshot)>,
    by_call_id: HashMap<String, ActorId>,
}

impl LiveCalls {
    /// Keep `snapshot` as what `actor` last reported of its call.
    pub(super) fn report(&mut self, actor: ActorRef<CallMsg>, snapshot: CallSnapshot) {
        let id = actor.get_id();
        self.by_call_id.insert(snapshot.call_id.clone(), id);
        self.by_actor.insert(id, (actor, snapshot));
    }

    /// The actor has ended: its last snapshot, if any, leaves the book.
    pub(super) fn ended(&mut self, id: ActorId) -> Option<CallSnapshot> {
        let (_, snapshot) = self.by_actor.remove(&id)?;
        self.by_call_id.remove(&snapshot.call_id);
        Some(snapshot)
    }

    pub(super) fn by_call_id(&self, call_id: &str) -> Option<&(ActorRef<CallMsg>, CallSnapshot)> {
        self.by_call_id
            .get(call_id)
            .and_then(|id| self.by_actor.get(id))
    }

    pub(super) fn len(&self) -> usize {
        self.by_actor.len()
    }
}
