//! The outbox in SQL: leasing due deliveries in order, recording attempts in batches, and the
//! delivery log customers read.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sautikit_actors::store::StorageError;
use sautikit_actors::webhook::{AttemptRecord, LeasedDelivery, MAX_ATTEMPTS, Outbox, Resolution};
use sqlx::AssertSqlSafe;

use crate::db::Backend;
use crate::store::{SqlStore, get, get_opt_time, get_time, storage};
use crate::time::{new_id, to_db};

/// Rows per multi-row statement (7 values each: well under every backend's parameter limit).
const CHUNK: usize = 100;

/// Placeholders for `n` rows of `width` values. SQLite gets anonymous `?`: it resolves each named
/// `$N` by a linear scan, which makes wide multi-row statements quadratic.
fn value_rows(backend: Backend, n: usize, width: usize) -> String {
    (0..n)
        .map(|r| {
            let cols: Vec<String> = (0..width)
                .map(|c| match backend {
                    Backend::Sqlite => "?".to_owned(),
                    Backend::Postgres => format!("${}", 1 + r * width + c),
                })
                .collect();
            format!("({})", cols.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `($1, $2, …)` or `(?, ?, …)` for an `IN` list of `n` values.
fn in_list(backend: Backend, n: usize) -> String {
    let v = value_rows(backend, n, 1);
    // value_rows gives "(a), (b)"; an IN list wants "(a, b)".
    format!("({})", v.replace(['(', ')'], ""))
}

// A delivery is leased only when no earlier pending delivery of its ordering key is blocked
// (in backoff, or leased by a sender); the unblocked earlier ones come first in id order, so they
// are in the same batch. Only leased or already-attempted deliveries can block: a fresh one is
// always due. That keeps the per-candidate probe on a small partial index
// (`webhook_deliveries_blockers`).
macro_rules! lease_candidates {
    ($fence:literal, $lock:literal) => {
        concat!(
            "UPDATE webhook_deliveries SET lease_token = $1, lease_until = $2 WHERE id IN (\
             SELECT d.id FROM webhook_deliveries d \
             WHERE d.status = 'pending' AND (d.attempts = 0 OR d.next_attempt_at <= $3) \
               AND (d.lease_until IS NULL OR d.lease_until < $3) \
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p \
                 WHERE p.status = 'pending' AND (p.lease_token IS NOT NULL OR p.attempts > 0) \
                   AND p.ordering_key = d.ordering_key AND p.id < d.id \
                   AND (p.next_attempt_at > $3 \
                        OR (p.lease_until IS NOT NULL AND p.lease_until >= $3))",
            $fence,
            ") ORDER BY d.id LIMIT $4",
            $lock,
            ") RETURNING id"
        )
    };
}

const LEASE_SQLITE: &str = lease_candidates!("", "");
// `OFFSET 0` keeps PostgreSQL from turning the NOT EXISTS into an anti-join over every pending
// row (it misjudges the blockers as one row); per candidate it is one probe of the small index.
const LEASE_POSTGRES: &str = lease_candidates!(" OFFSET 0", " FOR UPDATE OF d SKIP LOCKED");

/// Events turned into deliveries per lease transaction.
const EXPAND_BATCH: i64 = 2000;

const UNEXPANDED_SQLITE: &str = "SELECT id, workspace_id, event_kind, number_id, call_id \
    FROM events WHERE expanded = 0 ORDER BY id LIMIT $1";
const UNEXPANDED_POSTGRES: &str = "SELECT id, workspace_id, event_kind, number_id, call_id \
    FROM events WHERE expanded = 0 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Who receives committed events: one delivery per matching subscription (number and wallet
/// events) or to the number's `events_url` (call events), in event order. Runs inside the lease
/// transaction, so expansion and leasing see one consistent outbox.
async fn expand_events(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    now: DateTime<Utc>,
) -> Result<usize, StorageError> {
    let unexpanded = match backend {
        Backend::Sqlite => UNEXPANDED_SQLITE,
        Backend::Postgres => UNEXPANDED_POSTGRES,
    };
    let events = sqlx::query(unexpanded)
        .bind(EXPAND_BATCH)
        .fetch_all(&mut *conn)
        .await
        .map_err(storage)?;
    if events.is_empty() {
        return Ok(0);
    }
    // Subscriptions per workspace and events_url per number, looked up once per batch.
    let mut subscriptions: HashMap<String, Vec<(String, String, String)>> = HashMap::new();
    let mut events_urls: HashMap<String, Option<String>> = HashMap::new();
    // (event id, workspace, subscription, url, ordering key, kind, number, call)
    let mut deliveries: Vec<[Option<String>; 8]> = Vec::new();
    let mut ids: Vec<String> = Vec::with_capacity(events.len());
    for e in &events {
        let id: String = get(e, "id")?;
        let workspace: String = get(e, "workspace_id")?;
        let kind: String = get(e, "event_kind")?;
        let number: Option<String> = get(e, "number_id")?;
        let call: Option<String> = get(e, "call_id")?;
        let subject = super::subject(number.as_deref(), call.as_deref());
        let mut push = |sub: Option<String>, url: String, key: String| {
            deliveries.push([
                Some(id.clone()),
                Some(workspace.clone()),
                sub,
                Some(url),
                Some(key),
                Some(kind.clone()),
                number.clone(),
                call.clone(),
            ]);
        };
        if kind.starts_with("call.") {
            if let Some(n) = &number {
                if !events_urls.contains_key(n) {
                    let url = sqlx::query("SELECT events_url FROM tenant_numbers WHERE id = $1")
                        .bind(n)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(storage)?
                        .map(|r| get::<Option<String>>(&r, "events_url"))
                        .transpose()?
                        .flatten();
                    events_urls.insert(n.clone(), url);
                }
                if let Some(Some(url)) = events_urls.get(n) {
                    push(None, url.clone(), format!("events_url:{n}|{subject}"));
                }
            }
        } else {
            if !subscriptions.contains_key(&workspace) {
                let rows = sqlx::query(
                    "SELECT id, url, events FROM webhook_subscriptions \
                     WHERE workspace_id = $1 AND status = 'active' ORDER BY id",
                )
                .bind(&workspace)
                .fetch_all(&mut *conn)
                .await
                .map_err(storage)?;
                let subs = rows
                    .iter()
                    .map(|r| Ok((get(r, "id")?, get(r, "url")?, get(r, "events")?)))
                    .collect::<Result<Vec<(String, String, String)>, StorageError>>()?;
                subscriptions.insert(workspace.clone(), subs);
            }
            for (sub_id, url, patterns) in subscriptions.get(&workspace).into_iter().flatten() {
                if patterns
                    .split(',')
                    .any(|p| super::pattern_matches(p, &kind))
                {
                    push(
                        Some(sub_id.clone()),
                        url.clone(),
                        format!("sub:{sub_id}|{subject}"),
                    );
                }
            }
        }
        ids.push(id);
    }
    let ts = to_db(now);
    // 11 values a row: 200 rows stay far below every backend's parameter limit.
    for chunk in deliveries.chunks(200) {
        let sql = format!(
            "INSERT INTO webhook_deliveries (id, event_id, workspace_id, subscription_id, url, \
             ordering_key, event_kind, number_id, call_id, status, attempts, max_attempts, \
             next_attempt_at, created_at, updated_at) \
             SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, \
             v.column8, v.column9, 'pending', 0, v.column10, v.column11, v.column11, v.column11 \
             FROM (VALUES {}) AS v",
            value_rows(backend, chunk.len(), 11)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for d in chunk {
            q = q.bind(new_id());
            for v in d {
                q = q.bind(v.clone());
            }
            q = q.bind(MAX_ATTEMPTS).bind(ts.clone());
        }
        q.execute(&mut *conn).await.map_err(storage)?;
    }
    match (backend, ids.last()) {
        // One writer: nothing else commits inside this transaction, so the unexpanded events up
        // to the last one read are exactly the ones read.
        (Backend::Sqlite, Some(last)) => {
            sqlx::query("UPDATE events SET expanded = 1 WHERE expanded = 0 AND id <= $1")
                .bind(last)
                .execute(&mut *conn)
                .await
                .map_err(storage)?;
        }
        // Other processes commit concurrently (with ids possibly below ours): name each row.
        _ => {
            for chunk in ids.chunks(CHUNK) {
                let sql = format!(
                    "UPDATE events SET expanded = 1 WHERE id IN {}",
                    in_list(backend, chunk.len())
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for id in chunk {
                    q = q.bind(id.clone());
                }
                q.execute(&mut *conn).await.map_err(storage)?;
            }
        }
    }
    Ok(deliveries.len())
}

/// One delivery in the log, with its attempts.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub id: String,
    pub event_id: String,
    pub event_kind: String,
    pub subscription_id: Option<String>,
    pub url: String,
    pub number_id: Option<String>,
    pub call_id: Option<String>,
    pub status: String,
    pub attempt_count: i64,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Clone)]
pub struct AttemptView {
    pub attempt: i64,
    pub attempted_at: DateTime<Utc>,
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub id: Option<String>,
    pub event_kind: Option<String>,
    pub status: Option<String>,
    pub call_id: Option<String>,
    pub number_id: Option<String>,
    pub before_id: Option<String>,
    pub limit: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RedeliverError {
    #[error("delivery not found")]
    NotFound,
    #[error("the subscription of this delivery was deleted")]
    Canceled,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl SqlStore {
    /// After a crash of the only process (SQLite), nobody holds a lease: free them at start.
    pub async fn release_all_leases(&self) -> Result<u64, StorageError> {
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET lease_token = NULL, lease_until = NULL \
             WHERE lease_token IS NOT NULL",
        )
        .execute(&self.db().write)
        .await
        .map_err(storage)?;
        Ok(r.rows_affected())
    }

    pub async fn list_deliveries(
        &self,
        workspace_id: &str,
        f: &DeliveryFilter,
    ) -> Result<Vec<DeliveryRecord>, StorageError> {
        let mut sql = String::from(
            "SELECT id, event_id, event_kind, subscription_id, url, number_id, call_id, status, \
             attempts, next_attempt_at, last_status_code, last_error, created_at, delivered_at \
             FROM webhook_deliveries WHERE workspace_id = $1",
        );
        let mut args: Vec<String> = vec![workspace_id.to_owned()];
        for (col, val) in [
            ("id", &f.id),
            ("event_kind", &f.event_kind),
            ("status", &f.status),
            ("call_id", &f.call_id),
            ("number_id", &f.number_id),
        ] {
            if let Some(v) = val {
                args.push(v.clone());
                sql.push_str(&format!(" AND {col} = ${}", args.len()));
            }
        }
        if let Some(b) = &f.before_id {
            args.push(b.clone());
            sql.push_str(&format!(" AND id < ${}", args.len()));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", args.len() + 1));
        // Safe: built only from the static fragments above; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for a in args {
            q = q.bind(a);
        }
        let rows = q
            .bind(f.limit)
            .fetch_all(&self.db().read)
            .await
            .map_err(storage)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let status: String = get(r, "status")?;
            out.push(DeliveryRecord {
                id: get(r, "id")?,
                event_id: get(r, "event_id")?,
                event_kind: get(r, "event_kind")?,
                subscription_id: get(r, "subscription_id")?,
                url: get(r, "url")?,
                number_id: get(r, "number_id")?,
                call_id: get(r, "call_id")?,
                next_attempt_at: if status == "pending" {
                    Some(get_time(r, "next_attempt_at")?)
                } else {
                    None
                },
                status,
                attempt_count: get(r, "attempts")?,
                last_status_code: get(r, "last_status_code")?,
                last_error: get(r, "last_error")?,
                created_at: get_time(r, "created_at")?,
                delivered_at: get_opt_time(r, "delivered_at")?,
                attempts: Vec::new(),
            });
        }
        self.attach_attempts(&mut out).await?;
        Ok(out)
    }

    async fn attach_attempts(&self, deliveries: &mut [DeliveryRecord]) -> Result<(), StorageError> {
        for chunk in deliveries.chunks_mut(CHUNK) {
            let sql = format!(
                "SELECT delivery_id, attempt, attempted_at, status_code, latency_ms, error \
                 FROM webhook_attempts WHERE delivery_id IN {} ORDER BY delivery_id, attempt",
                in_list(self.db().backend, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for d in chunk.iter() {
                q = q.bind(d.id.clone());
            }
            let rows = q.fetch_all(&self.db().read).await.map_err(storage)?;
            for r in &rows {
                let id: String = get(r, "delivery_id")?;
                if let Some(d) = chunk.iter_mut().find(|d| d.id == id) {
                    d.attempts.push(AttemptView {
                        attempt: get(r, "attempt")?,
                        attempted_at: get_time(r, "attempted_at")?,
                        status_code: get(r, "status_code")?,
                        latency_ms: get(r, "latency_ms")?,
                        error: get(r, "error")?,
                    });
                }
            }
        }
        Ok(())
    }

    pub async fn get_delivery(
        &self,
        workspace_id: &str,
        id: &str,
    ) -> Result<Option<DeliveryRecord>, StorageError> {
        let found = self
            .list_deliveries(
                workspace_id,
                &DeliveryFilter {
                    id: Some(id.to_owned()),
                    limit: 1,
                    ..Default::default()
                },
            )
            .await?;
        Ok(found.into_iter().next())
    }

    /// Queue one more attempt now, also for a dead letter or a delivered event.
    pub async fn redeliver(
        &self,
        workspace_id: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<DeliveryRecord, RedeliverError> {
        let ts = to_db(now);
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET \
               max_attempts = CASE WHEN status = 'pending' THEN max_attempts ELSE attempts + 1 END, \
               status = 'pending', next_attempt_at = $1, updated_at = $1 \
             WHERE id = $2 AND workspace_id = $3 AND status <> 'canceled'",
        )
        .bind(&ts)
        .bind(id)
        .bind(workspace_id)
        .execute(&self.db().write)
        .await
        .map_err(storage)?;
        let d = self
            .get_delivery(workspace_id, id)
            .await?
            .ok_or(RedeliverError::NotFound)?;
        if r.rows_affected() == 0 {
            return Err(RedeliverError::Canceled);
        }
        self.committed.notify_one();
        Ok(d)
    }
}

#[async_trait]
impl Outbox for SqlStore {
    async fn lease_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<LeasedDelivery>, StorageError> {
        let token = new_id();
        let mut tx = self.db().write.begin().await.map_err(storage)?;
        let lease = match self.db().backend {
            Backend::Sqlite => LEASE_SQLITE,
            Backend::Postgres => {
                // Serialize leasing across processes, so two processes never take deliveries of
                // one ordering key at once; SKIP LOCKED keeps rows being recorded out of the way.
                sqlx::query("SELECT pg_advisory_xact_lock(7302519)")
                    .execute(&mut *tx)
                    .await
                    .map_err(storage)?;
                LEASE_POSTGRES
            }
        };
        expand_events(&mut tx, self.db().backend, now).await?;
        let leased: Vec<String> = sqlx::query(lease)
            .bind(&token)
            .bind(to_db(lease_until))
            .bind(to_db(now))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?
            .iter()
            .map(|r| get(r, "id"))
            .collect::<Result<_, _>>()?;
        if leased.is_empty() {
            // Commit, not roll back: the expansion above must stick.
            tx.commit().await.map_err(storage)?;
            return Ok(Vec::new());
        }
        let mut rows = Vec::with_capacity(leased.len());
        for chunk in leased.chunks(CHUNK) {
            let sql = format!(
                "SELECT d.id, d.event_id, d.event_kind, d.ordering_key, d.url, d.attempts, \
                 d.max_attempts, d.lease_until, e.body, w.webhook_secret \
                 FROM webhook_deliveries d JOIN events e ON e.id = d.event_id \
                 JOIN workspaces w ON w.id = d.workspace_id WHERE d.id IN {}",
                in_list(self.db().backend, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.clone());
            }
            rows.extend(q.fetch_all(&mut *tx).await.map_err(storage)?);
        }
        tx.commit().await.map_err(storage)?;
        let mut out: Vec<LeasedDelivery> = rows
            .iter()
            .map(|r| {
                Ok(LeasedDelivery {
                    id: get(r, "id")?,
                    event_id: get(r, "event_id")?,
                    event_kind: get(r, "event_kind")?,
                    ordering_key: get(r, "ordering_key")?,
                    url: get(r, "url")?,
                    body: get(r, "body")?,
                    secret: get(r, "webhook_secret")?,
                    attempts: get(r, "attempts")?,
                    max_attempts: get(r, "max_attempts")?,
                    lease_until: get_time(r, "lease_until")?,
                })
            })
            .collect::<Result<_, StorageError>>()?;
        // The groups are built in outbox order.
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn record(
        &self,
        attempts: &[AttemptRecord],
        released: &[String],
    ) -> Result<(), StorageError> {
        let backend = self.db().backend;
        let mut tx = self.db().write.begin().await.map_err(storage)?;
        for chunk in attempts.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO webhook_attempts (id, delivery_id, attempt, attempted_at, status_code, \
                 latency_ms, error) VALUES {}",
                value_rows(backend, chunk.len(), 7)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for a in chunk {
                q = q
                    .bind(new_id())
                    .bind(a.delivery_id.clone())
                    .bind(a.attempt)
                    .bind(to_db(a.attempted_at))
                    .bind(a.result.status_code.map(i64::from))
                    .bind(a.result.latency_ms)
                    .bind(a.result.error.clone());
            }
            q.execute(&mut *tx).await.map_err(storage)?;

            // One UPDATE … FROM (VALUES …) per chunk: columns are column1… on both backends.
            let sql = format!(
                "UPDATE webhook_deliveries SET status = v.column2, attempts = v.column3, \
                 next_attempt_at = v.column4, last_status_code = v.column5, last_error = v.column6, \
                 delivered_at = v.column7, updated_at = v.column8, lease_token = NULL, \
                 lease_until = NULL FROM (VALUES {}) AS v WHERE webhook_deliveries.id = v.column1",
                value_rows(backend, chunk.len(), 8)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for a in chunk {
                let at = to_db(a.attempted_at);
                let (status, next, delivered) = match &a.resolution {
                    Resolution::Succeeded => ("succeeded", at.clone(), Some(at.clone())),
                    Resolution::RetryAt(t) => ("pending", to_db(*t), None),
                    Resolution::DeadLetter => ("dead_letter", at.clone(), None),
                };
                q = q
                    .bind(a.delivery_id.clone())
                    .bind(status)
                    .bind(a.attempt)
                    .bind(next)
                    .bind(a.result.status_code.map(i64::from))
                    .bind(a.result.error.clone())
                    .bind(delivered)
                    .bind(at);
            }
            q.execute(&mut *tx).await.map_err(storage)?;
        }
        for chunk in released.chunks(CHUNK) {
            let sql = format!(
                "UPDATE webhook_deliveries SET lease_token = NULL, lease_until = NULL \
                 WHERE id IN {}",
                in_list(backend, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.clone());
            }
            q.execute(&mut *tx).await.map_err(storage)?;
        }
        tx.commit().await.map_err(storage)?;
        Ok(())
    }
}
