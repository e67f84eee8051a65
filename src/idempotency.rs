//! `Idempotency-Key` (DESIGN §5): the response to a POST is kept 24 h per (workspace, key, body
//! hash), and a retry gets it again instead of running the request twice.
//!
//! A key lives through three states: pending (the first request is running), applied (its change
//! is committed) and answered (its response is stored). The change's own transaction marks the key
//! applied ([`mark_applied`]), so the two cannot part: once the change is committed, no retry under
//! the key makes it again, whatever becomes of the response afterwards. Without the mark, a process
//! dying between the commit and the stored response, or a response that could not be stored,
//! would let a retry top up a wallet or place a call a second time.
//!
//! Only a key that is pending and not applied is forgotten: when its request failed on our side
//! (a retry must get a real second attempt), or when it has been pending so long that its process
//! is taken to be gone.

use std::future::Future;

use chrono::{DateTime, Duration, Utc};
use sautikit_actors::store::{IdempotencyMark, StorageError};

use crate::store::{SqlStore, get, storage};
use crate::time::to_db;

/// How long a stored idempotent response is replayed.
pub const IDEMPOTENCY_TTL_HOURS: i64 = 24;
/// A request that holds a key this long without finishing is taken to have died with its process.
const PENDING_STALE_SECS: i64 = 60;

tokio::task_local! {
    /// The key of the API request being served, for the changes it commits.
    static REQUEST_KEY: IdempotencyMark;
}

/// Serve a request that came with an `Idempotency-Key`: its changes mark the key applied.
pub async fn with_request_key<F: Future>(mark: IdempotencyMark, serve: F) -> F::Output {
    REQUEST_KEY.scope(mark, serve).await
}

/// The `Idempotency-Key` of the request this task serves, if it came with one.
pub fn request_key() -> Option<IdempotencyMark> {
    REQUEST_KEY.try_with(Clone::clone).ok()
}

/// Inside the transaction of a change that must not be made twice (a claim, a credit, a placed
/// call, a new credential or subscription): mark the request's key applied. Commits with the
/// change or not at all.
pub(crate) async fn mark_applied(
    conn: &mut sqlx::AnyConnection,
    mark: Option<&IdempotencyMark>,
    now: DateTime<Utc>,
) -> Result<(), StorageError> {
    let Some(mark) = mark else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE idempotency_keys SET applied_at = $1 \
         WHERE workspace_id = $2 AND idempotency_key = $3 AND applied_at IS NULL",
    )
    .bind(to_db(now))
    .bind(&mark.workspace_id)
    .bind(&mark.key)
    .execute(&mut *conn)
    .await
    .map_err(storage)?;
    Ok(())
}

/// The outcome of presenting an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// First use: run the request, then [`SqlStore::idempotency_finish`].
    Fresh,
    /// Seen with the same body: send this stored response again.
    Replay { status: u16, body: String },
    /// Seen with another body.
    Conflict,
    /// The first request with this key is still running.
    InProgress,
    /// The first request's change was committed, but its process died before storing the
    /// response: the change is not made again, and there is no response to send.
    ResponseLost,
}

impl SqlStore {
    pub async fn idempotency_begin(
        &self,
        workspace_id: &str,
        key: &str,
        request_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<IdempotencyBegin, StorageError> {
        let expired = to_db(now - Duration::hours(IDEMPOTENCY_TTL_HOURS));
        let stale = to_db(now - Duration::seconds(PENDING_STALE_SECS));
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE workspace_id = $1 AND idempotency_key = $2 \
             AND (created_at < $3 \
                  OR (status_code IS NULL AND applied_at IS NULL AND created_at < $4))",
        )
        .bind(workspace_id)
        .bind(key)
        .bind(&expired)
        .bind(&stale)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (workspace_id, idempotency_key, request_hash, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(workspace_id)
        .bind(key)
        .bind(request_hash)
        .bind(to_db(now))
        .execute(&mut *tx)
        .await
        .map_err(storage)?
        .rows_affected();
        let outcome = if inserted == 1 {
            IdempotencyBegin::Fresh
        } else {
            let row = sqlx::query(
                "SELECT request_hash, status_code, response_body, applied_at, created_at \
                 FROM idempotency_keys WHERE workspace_id = $1 AND idempotency_key = $2",
            )
            .bind(workspace_id)
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(storage)?;
            let hash: String = get(&row, "request_hash")?;
            let status: Option<i64> = get(&row, "status_code")?;
            let body: Option<String> = get(&row, "response_body")?;
            let applied: Option<String> = get(&row, "applied_at")?;
            let created: String = get(&row, "created_at")?;
            match (hash == request_hash, status) {
                (false, _) => IdempotencyBegin::Conflict,
                (true, Some(s)) => IdempotencyBegin::Replay {
                    status: u16::try_from(s).unwrap_or(500),
                    body: body.unwrap_or_default(),
                },
                (true, None) if applied.is_some() && created < stale => {
                    IdempotencyBegin::ResponseLost
                }
                (true, None) => IdempotencyBegin::InProgress,
            }
        };
        tx.commit().await.map_err(storage)?;
        Ok(outcome)
    }

    /// Store the response to replay under the key.
    pub async fn idempotency_finish(
        &self,
        workspace_id: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StorageError> {
        sqlx::query(
            "UPDATE idempotency_keys SET status_code = $1, response_body = $2 \
             WHERE workspace_id = $3 AND idempotency_key = $4",
        )
        .bind(i64::from(status))
        .bind(body)
        .bind(workspace_id)
        .bind(key)
        .execute(&self.db().write)
        .await
        .map_err(storage)?;
        Ok(())
    }

    /// Forget a key whose request failed on our side, so that the client's retry runs again —
    /// unless the request's change was committed all the same: then the key stays, and the
    /// answer is `false`.
    pub async fn idempotency_forget(
        &self,
        workspace_id: &str,
        key: &str,
    ) -> Result<bool, StorageError> {
        let r = sqlx::query(
            "DELETE FROM idempotency_keys WHERE workspace_id = $1 AND idempotency_key = $2 \
             AND applied_at IS NULL",
        )
        .bind(workspace_id)
        .bind(key)
        .execute(&self.db().write)
        .await
        .map_err(storage)?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn idempotency_purge(&self, now: DateTime<Utc>) -> Result<u64, StorageError> {
        let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(to_db(now - Duration::hours(IDEMPOTENCY_TTL_HOURS)))
            .execute(&self.db().write)
            .await
            .map_err(storage)?;
        Ok(r.rows_affected())
    }
}
