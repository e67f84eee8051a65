//! The live calls Calls knows of: each Call actor's last snapshot, by actor and by call id.
//!
//! Ractor hands a supervisor its children's supervision events before its ordinary messages. A
//! Call actor that sends a snapshot and ends soon after can therefore have its end handled first,
//! and the snapshot would then stay in the book for good (several KB each, under load). A report
//! from an actor that has already stopped says so, and Calls checks again behind whatever event is
//! still queued ([`LiveCalls::forget_if_stopped`]).

use std::collections::HashMap;

use ractor::{ActorId, ActorRef, ActorStatus};

pub(super) struct LiveCalls<M, S> {
    by_actor: HashMap<ActorId, (ActorRef<M>, S)>,
    by_call_id: HashMap<String, ActorId>,
}

impl<M, S> LiveCalls<M, S> {
    pub(super) fn new() -> Self {
        LiveCalls {
            by_actor: HashMap::new(),
            by_call_id: HashMap::new(),
        }
    }

    /// Keep `snapshot` as what `actor` last reported of call `call_id`. True when the actor has
    /// already stopped: its end may have been handled before this report, so the caller must
    /// [`forget_if_stopped`](Self::forget_if_stopped) it once any event still queued is handled.
    pub(super) fn report(&mut self, actor: ActorRef<M>, call_id: String, snapshot: S) -> bool {
        let id = actor.get_id();
        let stopped = actor.get_status() == ActorStatus::Stopped;
        self.by_call_id.insert(call_id, id);
        self.by_actor.insert(id, (actor, snapshot));
        stopped
    }

    /// The actor has ended: its last snapshot, if any, leaves the book.
    pub(super) fn ended(&mut self, id: ActorId, call_id: impl Fn(&S) -> &str) -> Option<S> {
        let (_, snapshot) = self.by_actor.remove(&id)?;
        self.by_call_id.remove(call_id(&snapshot));
        Some(snapshot)
    }

    /// Drop the snapshot of an actor that has stopped (its end was handled before its report).
    pub(super) fn forget_if_stopped(&mut self, id: ActorId, call_id: impl Fn(&S) -> &str) {
        if self
            .by_actor
            .get(&id)
            .is_some_and(|(actor, _)| actor.get_status() == ActorStatus::Stopped)
        {
            self.ended(id, call_id);
        }
    }

    pub(super) fn by_call_id(&self, call_id: &str) -> Option<&(ActorRef<M>, S)> {
        self.by_call_id
            .get(call_id)
            .and_then(|id| self.by_actor.get(id))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_actor.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};

    struct Idle;

    impl Actor for Idle {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<()>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    fn id_of(s: &String) -> &str {
        s
    }

    #[tokio::test]
    async fn a_report_after_the_end_is_forgotten() {
        let mut book: LiveCalls<(), String> = LiveCalls::new();
        let (gone, handle) = Actor::spawn(None, Idle, ()).await.expect("spawn");
        gone.stop(None);
        handle.await.expect("stopped");
        // Its end is handled first (supervision events come before messages), then its report.
        assert!(book.ended(gone.get_id(), id_of).is_none());
        assert!(book.report(gone.clone(), "call-a".into(), "call-a".into()));
        book.forget_if_stopped(gone.get_id(), id_of);
        assert_eq!(book.len(), 0);
        assert!(book.by_call_id("call-a").is_none());
    }

    #[tokio::test]
    async fn a_live_call_stays_until_its_end() {
        let mut book: LiveCalls<(), String> = LiveCalls::new();
        let (live, handle) = Actor::spawn(None, Idle, ()).await.expect("spawn");
        assert!(!book.report(live.clone(), "call-b".into(), "call-b".into()));
        book.forget_if_stopped(live.get_id(), id_of);
        assert!(book.by_call_id("call-b").is_some());
        assert_eq!(book.ended(live.get_id(), id_of).as_deref(), Some("call-b"));
        assert_eq!(book.len(), 0);
        assert!(book.by_call_id("call-b").is_none());
        live.stop(None);
        handle.await.expect("stopped");
    }
}
