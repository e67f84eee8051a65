//! Workspace webhook subscriptions and the signing secret.

use chrono::{DateTime, Utc};
use sautikit_actors::store::StorageError;
use sqlx::any::AnyRow;

use crate::idempotency::{mark_applied, request_key};
use crate::secrets;
use crate::store::{SqlStore, get, get_opt_time, get_time, storage};
use crate::time::{new_id, to_db};

/// Active subscriptions a workspace may hold.
pub const MAX_SUBSCRIPTIONS: i64 = 20;

#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("subscription not found")]
    NotFound,
    #[error("a workspace may have at most {MAX_SUBSCRIPTIONS} webhook subscriptions")]
    TooMany,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn from_row(r: &AnyRow) -> Result<Subscription, StorageError> {
    let events: String = get(r, "events")?;
    Ok(Subscription {
        id: get(r, "id")?,
        url: get(r, "url")?,
        events: events.split(',').map(str::to_owned).collect(),
        status: get(r, "status")?,
        created_at: get_time(r, "created_at")?,
        deleted_at: get_opt_time(r, "deleted_at")?,
    })
}

const COLS: &str = "id, url, events, status, created_at, deleted_at";

impl SqlStore {
    pub async fn create_subscription(
        &self,
        workspace_id: &str,
        url: &str,
        events: &[String],
        now: DateTime<Utc>,
    ) -> Result<Subscription, SubscriptionError> {
        let id = new_id();
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        // The count check and the insert are one statement, so concurrent creates cannot
        // exceed the limit.
        let r = sqlx::query(
            "INSERT INTO webhook_subscriptions (id, workspace_id, url, events, status, created_at) \
             SELECT $1, $2, $3, $4, 'active', $5 WHERE (SELECT COUNT(*) FROM webhook_subscriptions \
             WHERE workspace_id = $2 AND status = 'active') < $6",
        )
        .bind(&id)
        .bind(workspace_id)
        .bind(url)
        .bind(events.join(","))
        .bind(to_db(now))
        .bind(MAX_SUBSCRIPTIONS)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        if r.rows_affected() == 0 {
            tx.rollback().await.map_err(storage)?;
            return Err(SubscriptionError::TooMany);
        }
        mark_applied(&mut tx, request_key().as_ref(), now).await?;
        tx.commit().await.map_err(storage)?;
        self.get_subscription(workspace_id, &id)
            .await?
            .ok_or(SubscriptionError::NotFound)
    }

    pub async fn get_subscription(
        &self,
        workspace_id: &str,
        id: &str,
    ) -> Result<Option<Subscription>, StorageError> {
        let row = sqlx::query(const_format::concatcp!(
            "SELECT ",
            COLS,
            " FROM webhook_subscriptions WHERE id = $1 AND workspace_id = $2"
        ))
        .bind(id)
        .bind(workspace_id)
        .fetch_optional(&self.db().write)
        .await
        .map_err(storage)?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn list_subscriptions(
        &self,
        workspace_id: &str,
        before_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Subscription>, StorageError> {
        let rows = sqlx::query(const_format::concatcp!(
            "SELECT ",
            COLS,
            " FROM webhook_subscriptions WHERE workspace_id = $1 AND status = 'active' \
              AND ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
        ))
        .bind(workspace_id)
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.db().read)
        .await
        .map_err(storage)?;
        rows.iter().map(from_row).collect()
    }

    /// Delete a subscription; its undelivered events are canceled.
    pub async fn delete_subscription(
        &self,
        workspace_id: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Subscription, SubscriptionError> {
        let ts = to_db(now);
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        let r = sqlx::query(
            "UPDATE webhook_subscriptions SET status = 'deleted', deleted_at = $1 \
             WHERE id = $2 AND workspace_id = $3 AND status = 'active'",
        )
        .bind(&ts)
        .bind(id)
        .bind(workspace_id)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        if r.rows_affected() == 0 {
            tx.rollback().await.map_err(storage)?;
            return Err(SubscriptionError::NotFound);
        }
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'canceled', updated_at = $1 \
             WHERE subscription_id = $2 AND status = 'pending'",
        )
        .bind(&ts)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        tx.commit().await.map_err(storage)?;
        self.get_subscription(workspace_id, id)
            .await?
            .ok_or(SubscriptionError::NotFound)
    }

    /// A new signing secret; every delivery from now on is signed with it.
    pub async fn rotate_webhook_secret(&self, workspace_id: &str) -> Result<String, StorageError> {
        let secret = secrets::new_webhook_secret();
        sqlx::query("UPDATE workspaces SET webhook_secret = $1 WHERE id = $2")
            .bind(&secret)
            .bind(workspace_id)
            .execute(&self.db().write)
            .await
            .map_err(storage)?;
        Ok(secret)
    }
}
