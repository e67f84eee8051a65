//! Group commit: writes queue up while a transaction runs, and the next transaction takes
//! everything that queued. One transaction's fixed cost (on SQLite, the commit's WAL pages and
//! the single writer; on PostgreSQL, a commit each) is shared by the batch, and each write still
//! gets its own answer. Call writes ([`crate::calls_store`]) and REGISTERs
//! ([`crate::registrations`]) commit this way.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// A queued write and who waits for its result.
pub(crate) type Pending<W, R> = (W, oneshot::Sender<R>);

/// What one lane commits.
pub(crate) trait Committer: Send + Sync + 'static {
    type Write: Send + 'static;
    type Output: Send + 'static;

    /// Commit the batch and answer every write in it, leaving `batch` empty.
    fn commit(
        &self,
        batch: &mut Vec<Pending<Self::Write, Self::Output>>,
    ) -> impl Future<Output = ()> + Send;

    /// Whether a write's batch should go without waiting out the gap: someone is waiting on it
    /// with a latency target tighter than the gap's saving is worth.
    fn urgent(&self, _write: &Self::Write) -> bool {
        false
    }
}

/// Move what has queued into `batch`, up to `max` writes.
fn drain<W, R>(
    rx: &mut mpsc::UnboundedReceiver<Pending<W, R>>,
    batch: &mut Vec<Pending<W, R>>,
    max: usize,
) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
}

/// Start one group-commit loop taking at most `max` writes a batch, starting batches at least
/// `gap` apart (a write that finds the lane idle for longer goes at once, and so does a batch holding an urgent write); writes sent to the
/// returned queue commit in order. The loop ends when every sender is dropped.
pub(crate) fn lane<C: Committer>(
    committer: C,
    gap: Duration,
    max: usize,
) -> mpsc::UnboundedSender<Pending<C::Write, C::Output>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Pending<C::Write, C::Output>>();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(max);
        // The first write finds no commit before it and goes at once.
        let now = tokio::time::Instant::now();
        let mut last_commit = now.checked_sub(gap).unwrap_or(now);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            drain(&mut rx, &mut batch, max);
            // Under load, let writes gather instead of committing each as it comes; an urgent
            // write ends the wait.
            if !gap.is_zero() && !batch.iter().any(|(w, _)| committer.urgent(w)) {
                let deadline = last_commit + gap;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        next = rx.recv(), if batch.len() < max => match next {
                            Some(p) => {
                                let urgent = committer.urgent(&p.0);
                                batch.push(p);
                                if urgent {
                                    break;
                                }
                            }
                            None => break,
                        },
                        else => break,
                    }
                }
                drain(&mut rx, &mut batch, max);
            }
            last_commit = tokio::time::Instant::now();
            committer.commit(&mut batch).await;
            batch.clear();
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Commits by recording the writes of each batch.
    struct Recorder(Arc<Mutex<Vec<Vec<u32>>>>);

    impl Committer for Recorder {
        type Write = u32;
        type Output = ();

        async fn commit(&self, batch: &mut Vec<Pending<u32, ()>>) {
            let writes = batch.iter().map(|(w, _)| *w).collect();
            if let Ok(mut log) = self.0.lock() {
                log.push(writes);
            }
            for (_, reply) in batch.drain(..) {
                let _ = reply.send(());
            }
        }

        /// Odd writes are urgent.
        fn urgent(&self, write: &u32) -> bool {
            write % 2 == 1
        }
    }

    async fn write(lane: &mpsc::UnboundedSender<Pending<u32, ()>>, w: u32) {
        let (tx, rx) = oneshot::channel();
        lane.send((w, tx)).expect("lane open");
        rx.await.expect("committed");
    }

    /// With a gap of a minute, a batch waits it out unless an urgent write joins it; the test
    /// would take that minute if urgency were ignored, and fails its bound.
    #[tokio::test]
    async fn an_urgent_write_ends_the_wait_for_the_gap() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let lane = lane(Recorder(log.clone()), Duration::from_secs(60), 16);
        let started = std::time::Instant::now();
        // The first write finds the lane idle and goes at once.
        write(&lane, 0).await;
        // The next waits out the gap, until an urgent write joins its batch: both commit
        // together, at once.
        let (reply, waiting) = oneshot::channel();
        lane.send((2, reply)).expect("lane open");
        write(&lane, 1).await;
        waiting.await.expect("committed");
        // An urgent write after a commit goes at once too.
        write(&lane, 3).await;
        let batches = log.lock().expect("log").clone();
        assert_eq!(batches, vec![vec![0], vec![2, 1], vec![3]]);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
}
