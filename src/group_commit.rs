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
}

/// Start one group-commit loop taking at most `max` writes a batch, starting batches at least
/// `gap` apart (a write that finds the lane idle for longer goes at once); writes sent to the
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
            // Under load, let writes gather instead of committing each as it comes.
            if !gap.is_zero() {
                tokio::time::sleep_until(last_commit + gap).await;
            }
            last_commit = tokio::time::Instant::now();
            batch.push(first);
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            committer.commit(&mut batch).await;
            batch.clear();
        }
    });
    tx
}
