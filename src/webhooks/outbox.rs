//! The outbox in SQL: leasing due deliveries in order, recording attempts in batches, and the
//! delivery log customers read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sautikit_actors::store::StorageError;
use sautikit_actors::webhook::{
    AttemptRecord, LeasedDelivery, MAX_ATTEMPTS, Outbox, Resolution, Unwritten,
};
use sqlx::AssertSqlSafe;

use crate::db::Backend;
use crate::sql::{in_list, in_list_from, placeholder, pow2_chunks, value_rows};
use crate::store::{SqlStore, get, get_opt_time, get_time, storage};
use crate::time::{new_id, to_db};

/// Rows per multi-row statement (7 values each: well under every backend's parameter limit).
const CHUNK: usize = 100;
/// Rows per multi-row write on the delivery path (at most 18 values a row: 4,500 parameters).
const ROW_CHUNK: usize = 250;
/// Values per `IN` list on the delivery path.
const IN_CHUNK: usize = 500;

// A delivery is leased only when no earlier pending delivery of its ordering key is blocked
// (in backoff, or leased by a sender); the unblocked earlier ones come first in id order, so they
// are in the same batch. Only leased or already-attempted deliveries can block: a fresh one is
// always due. That keeps the per-candidate probe on a small partial index
// (`webhook_deliveries_blockers`). Candidates are unleased (`webhook_deliveries_unleased`, 0007):
// a lease that lapsed is cleared first ([`REAP_LAPSED`]), and until then it blocks its key.
macro_rules! lease_candidates {
    ($limit:literal, $fence:literal, $lock:literal) => {
        concat!(
            "UPDATE webhook_deliveries SET lease_token = $1, lease_until = $2 WHERE id IN (\
             SELECT d.id FROM webhook_deliveries d \
             WHERE d.status = 'pending' AND d.lease_token IS NULL \
               AND (d.attempts = 0 OR d.next_attempt_at <= $3) \
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p \
                 WHERE p.status = 'pending' AND (p.lease_token IS NOT NULL OR p.attempts > 0) \
                   AND p.ordering_key = d.ordering_key AND p.id < d.id \
                   AND (p.lease_token IS NOT NULL OR p.next_attempt_at > $3)",
            $fence,
            ") ORDER BY d.id LIMIT ",
            $limit,
            $lock,
            ") RETURNING id"
        )
    };
}

/// SQLite: a bound `LIMIT` would make every run prepare the statement again (see
/// [`UNEXPANDED_SQLITE`]).
const LEASE_SQLITE: &str = lease_candidates!("CAST($4 AS INTEGER)", "", "");
// `OFFSET 0` keeps PostgreSQL from turning the NOT EXISTS into an anti-join over every pending
// row (it misjudges the blockers as one row); per candidate it is one probe of the small index.
const LEASE_POSTGRES: &str = lease_candidates!("$4", " OFFSET 0", " FOR UPDATE OF d SKIP LOCKED");

/// Clears leases that lapsed (their holder crashed, or lost track of them), so that their
/// deliveries are unleased candidates again. The repeated `lease_token` term lets SQLite use the
/// blockers index, which holds every leased delivery.
const REAP_LAPSED: &str = "UPDATE webhook_deliveries SET lease_token = NULL, lease_until = NULL \
    WHERE status = 'pending' AND (lease_token IS NOT NULL OR attempts > 0) \
      AND lease_token IS NOT NULL AND lease_until < $1";

/// How often (at most) a lease also clears lapsed leases: they are rare (a crash), and the scan
/// covers every leased delivery.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Pages of unexpanded events read per lease, at most (events without subscribers yield nothing).
const EXPAND_PAGES: usize = 4;

/// SQLite (3.51) reads a bare bound `LIMIT ?` at prepare time and marks the statement expired
/// whenever that parameter is bound again, so each run of a cached statement prepared it afresh
/// (5 % of the SQLite thread at 500 calls/s, in the two outbox reads here). A `CAST` of the
/// parameter is not read at prepare time; the plan is the same.
const UNEXPANDED_SQLITE: &str = "SELECT id, workspace_id, event_kind, number_id, call_id, body, \
    events_url FROM events WHERE expanded = 0 AND id > $1 ORDER BY id LIMIT CAST($2 AS INTEGER)";
/// PostgreSQL (0008): queued events with their claims, after a `seq`. Rows this process claimed
/// and still holds are left out; rows another process holds are read, because their ordering keys
/// must wait. In `seq` order, which is commit order for the events of one ordering key (0006):
/// UUIDv7 ids of two processes committing in the same millisecond can be in either order. Claims
/// are made only under the lease's advisory lock; `record` deletes a claimed row only while it
/// still holds the claim.
const QUEUED_POSTGRES: &str = "SELECT q.seq, q.lease_token, q.lease_until, e.id, e.workspace_id, \
    e.event_kind, e.number_id, e.call_id, e.body, e.events_url \
    FROM event_queue q JOIN events e ON e.id = q.event_id \
    WHERE q.seq > $1 AND (q.lease_token IS DISTINCT FROM $2 OR q.lease_until < $3) \
    ORDER BY q.seq LIMIT $4";

/// How often (at most) a SQLite read also looks below its cursor, for events another process
/// committed with a lower id than ones already handed out.
const BELOW_CURSOR_EVERY: Duration = Duration::from_secs(1);

/// What this process's Events actor holds of the outbox.
///
/// Rows it leases carry `token` in `lease_token`. A delivery of an event with a single receiver
/// is not written when the event is expanded: it is handed to the actor straight away and written
/// once, with its first attempt (or as pending if it is released unattempted). Until then its
/// event stays unexpanded, so a crash loses nothing: the event is expanded and sent again after
/// the restart (PostgreSQL: when the claim lapses).
///
/// Where such a claim is kept differs. On PostgreSQL it is the event's `event_queue` row, claimed
/// with `token` (0008), so other processes see it. On SQLite one process owns the file, and the
/// claim is `unwritten` here, which keeps such events from being read twice; reads continue after
/// `cursor`, the highest event id handed out.
#[derive(Default)]
pub struct LocalLeases {
    inner: Mutex<LocalInner>,
}

#[derive(Default)]
struct LocalInner {
    token: Option<String>,
    unwritten: HashSet<String>,
    cursor: Option<String>,
    below_cursor_at: Option<Instant>,
    /// On the lease's clock (`now`), so a test with a fixed clock leases without reaping.
    reaped_at: Option<DateTime<Utc>>,
    /// The last delivery id made here: ids of deliveries handed out unwritten are not in the
    /// table, and later ones of the same key must still sort after them.
    last_delivery_id: Option<uuid::Uuid>,
    /// Receivers whose waiting deliveries were brought forward, and when (see
    /// [`bring_forward`]).
    recovered: HashMap<String, Instant>,
}

impl LocalLeases {
    fn lock(&self) -> std::sync::MutexGuard<'_, LocalInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn token(&self) -> String {
        self.lock().token.get_or_insert_with(new_id).clone()
    }
}

/// Delivery ids in expansion order. Deliveries of one ordering key go out in id order, and ids are
/// UUIDv7: within one process they only grow, but another process expanding in the same
/// millisecond could make smaller ones. On PostgreSQL expansion starts from the largest id in the
/// table (read under the lease lock) and every new id is above the one before.
#[derive(Default)]
struct DeliveryIds {
    last: Option<uuid::Uuid>,
}

impl DeliveryIds {
    fn next(&mut self) -> String {
        let mut id = uuid::Uuid::now_v7();
        if let Some(last) = self.last
            && id <= last
        {
            id = uuid_after(last);
        }
        self.last = Some(id);
        id.to_string()
    }
}

/// The next UUIDv7 after `u` in the same millisecond: its random part plus one, keeping the
/// version and variant bits.
fn uuid_after(u: uuid::Uuid) -> uuid::Uuid {
    const RAND_B: u128 = (1 << 62) - 1;
    let v = u.as_u128();
    if v & RAND_B != RAND_B {
        return uuid::Uuid::from_u128(v + 1);
    }
    // rand_b is full: carry into rand_a (the low 12 bits of the high half), and from there into
    // the millisecond timestamp (the high 48 bits).
    let high = v >> 64;
    let high = if high & 0xfff != 0xfff {
        high + 1
    } else {
        (((high >> 16) + 1) << 16) | 0x7000
    };
    uuid::Uuid::from_u128((high << 64) | (0b10u128 << 62))
}

/// Where the next read of unexpanded events starts, and which of them to skip.
struct ReadFrom {
    after: String,
    skip: HashSet<String>,
}

/// What one expansion produced besides the rows it wrote.
#[derive(Default)]
struct Expanded {
    deliveries: Vec<LeasedDelivery>,
    /// Events whose delivery is handed out unwritten.
    unwritten: Vec<String>,
    last_read: Option<String>,
}

/// A delivery row to write at expansion: pending, and leased to this process unless its key is
/// held elsewhere.
struct NewRow {
    id: String,
    event: usize,
    subscription_id: Option<String>,
    url: String,
    ordering_key: String,
    leased: bool,
}

struct EventRow {
    id: String,
    /// Its queue row (PostgreSQL).
    seq: Option<i64>,
    workspace_id: String,
    kind: String,
    number_id: Option<String>,
    call_id: Option<String>,
    body: String,
    secret: String,
    /// A per-call override of the number's `events_url`.
    events_url: Option<String>,
}

/// Who receives the events of one expansion, looked up once per page of events for all of
/// them: a query per workspace or number would hold the lease transaction (and, on SQLite, the
/// only write connection) for a round trip each.
#[derive(Default)]
struct Receivers {
    /// Webhook secret per workspace.
    secrets: HashMap<String, String>,
    /// `events_url` per number looked up (call events); `None` for a number without one.
    events_urls: HashMap<String, Option<String>>,
    /// Active subscriptions per workspace as (id, url, event patterns), in id order (other
    /// events).
    subscriptions: HashMap<String, Vec<(String, String, String)>>,
}

/// Fill `receivers` with what the events in `rows` need and it does not hold yet.
async fn load_receivers(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    rows: &[sqlx::any::AnyRow],
    receivers: &mut Receivers,
) -> Result<(), StorageError> {
    let (mut workspaces, mut numbers, mut subscribers) = (Vec::new(), Vec::new(), Vec::new());
    let mut asked: HashSet<String> = HashSet::new();
    for r in rows {
        let workspace_id: String = get(r, "workspace_id")?;
        let kind: String = get(r, "event_kind")?;
        if kind.starts_with("call.") {
            if let Some(n) = get::<Option<String>>(r, "number_id")?
                && !receivers.events_urls.contains_key(&n)
            {
                receivers.events_urls.insert(n.clone(), None);
                numbers.push(n);
            }
        } else if !receivers.subscriptions.contains_key(&workspace_id) {
            receivers
                .subscriptions
                .insert(workspace_id.clone(), Vec::new());
            subscribers.push(workspace_id.clone());
        }
        if !receivers.secrets.contains_key(&workspace_id) && asked.insert(workspace_id.clone()) {
            workspaces.push(workspace_id);
        }
    }
    let found = fetch_in(
        conn,
        backend,
        "SELECT id, webhook_secret FROM workspaces WHERE id IN ",
        "",
        &workspaces,
    )
    .await?;
    for r in &found {
        receivers
            .secrets
            .insert(get(r, "id")?, get(r, "webhook_secret")?);
    }
    let found = fetch_in(
        conn,
        backend,
        "SELECT id, events_url FROM tenant_numbers WHERE events_url IS NOT NULL AND id IN ",
        "",
        &numbers,
    )
    .await?;
    for r in &found {
        receivers
            .events_urls
            .insert(get(r, "id")?, get(r, "events_url")?);
    }
    let found = fetch_in(
        conn,
        backend,
        "SELECT workspace_id, id, url, events FROM webhook_subscriptions \
         WHERE status = 'active' AND workspace_id IN ",
        " ORDER BY workspace_id, id",
        &subscribers,
    )
    .await?;
    for r in &found {
        let workspace_id: String = get(r, "workspace_id")?;
        receivers
            .subscriptions
            .entry(workspace_id)
            .or_default()
            .push((get(r, "id")?, get(r, "url")?, get(r, "events")?));
    }
    Ok(())
}

/// The rows of `select` (which ends in `IN `) followed by `rest`, for all of `ids`: one
/// statement per chunk, chunks of power-of-two sizes so the statements stay cached.
async fn fetch_in(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    select: &str,
    rest: &str,
    ids: &[String],
) -> Result<Vec<sqlx::any::AnyRow>, StorageError> {
    let mut rows = Vec::new();
    for chunk in pow2_chunks(ids, IN_CHUNK) {
        let sql = format!("{select}{}{rest}", in_list(backend, chunk.len()));
        // Safe: `sql` is built from constants and placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(id.clone());
        }
        rows.extend(q.fetch_all(&mut *conn).await.map_err(storage)?);
    }
    Ok(rows)
}

/// Who receives committed events: one delivery per matching subscription (number and wallet
/// events) or to the number's `events_url` (call events), in event order. Runs inside the lease
/// transaction, so expansion and leasing see one consistent outbox.
///
/// A delivery whose ordering key has pending deliveries not held by this process waits behind
/// them (written pending, unleased). An event of a key whose earlier event another process holds
/// claimed (PostgreSQL) stays queued. Any other is handed out at once: written already leased to
/// this process, or, for an event with a single receiver, not written at all yet (see
/// [`LocalLeases`]).
///
/// Without `may_write`, an expansion that would write anything (a delivery row, an expanded
/// flag, a queue claim) writes nothing and returns `None`.
#[allow(clippy::too_many_arguments)]
async fn expand_events(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    now: DateTime<Utc>,
    want: usize,
    token: &str,
    lease_until: DateTime<Utc>,
    from: &ReadFrom,
    ids: &mut DeliveryIds,
    may_write: bool,
) -> Result<Option<Expanded>, StorageError> {
    let mut out = Expanded::default();
    let mut events: Vec<EventRow> = Vec::new();
    let mut receivers = Receivers::default();
    // Receivers per event: (subscription, url, ordering key).
    let mut targets: Vec<Vec<(Option<String>, String, String)>> = Vec::new();
    let mut after = from.after.clone();
    let mut after_seq = 0i64;
    let now_db = to_db(now);
    // Ordering keys of events another process holds claimed (PostgreSQL): later events of those
    // keys stay queued until it has written them.
    let mut elsewhere: HashSet<String> = HashSet::new();
    let mut produced = 0usize;
    for _ in 0..EXPAND_PAGES {
        if produced >= want {
            break;
        }
        let page = (want - produced).max(16);
        let fetch = i64::try_from(page + from.skip.len()).unwrap_or(i64::MAX);
        let rows = match backend {
            Backend::Sqlite => sqlx::query(UNEXPANDED_SQLITE).bind(&after).bind(fetch),
            Backend::Postgres => sqlx::query(QUEUED_POSTGRES)
                .bind(after_seq)
                .bind(token)
                .bind(&now_db)
                .bind(fetch),
        }
        .fetch_all(&mut *conn)
        .await
        .map_err(storage)?;
        let full = rows.len() >= page + from.skip.len();
        // The next page starts after this one's last row.
        if let Some(last) = rows.last() {
            match backend {
                Backend::Sqlite => after = get(last, "id")?,
                Backend::Postgres => after_seq = get(last, "seq")?,
            }
        }
        load_receivers(conn, backend, &rows, &mut receivers).await?;
        for r in &rows {
            let workspace_id: String = get(r, "workspace_id")?;
            let secret = receivers
                .secrets
                .get(&workspace_id)
                .cloned()
                .ok_or_else(|| {
                    StorageError(format!(
                        "workspace {workspace_id} of an event does not exist"
                    ))
                })?;
            let e = EventRow {
                id: get(r, "id")?,
                seq: match backend {
                    Backend::Sqlite => None,
                    Backend::Postgres => Some(get(r, "seq")?),
                },
                secret,
                workspace_id,
                kind: get(r, "event_kind")?,
                number_id: get(r, "number_id")?,
                call_id: get(r, "call_id")?,
                body: get(r, "body")?,
                events_url: get(r, "events_url")?,
            };
            if from.skip.contains(&e.id) {
                continue;
            }
            // Only another process's live claims come back claimed (the query leaves ours out).
            let held_elsewhere = backend == Backend::Postgres && {
                let holder: Option<String> = get(r, "lease_token")?;
                let until: Option<String> = get(r, "lease_until")?;
                holder.is_some() && until.is_some_and(|u| u >= now_db)
            };
            let subject = super::subject(e.number_id.as_deref(), e.call_id.as_deref());
            let mut to = Vec::new();
            if e.kind.starts_with("call.") {
                if let Some(url) = &e.events_url {
                    let n = e.number_id.as_deref().unwrap_or_default();
                    to.push((None, url.clone(), format!("events_url:{n}|{subject}")));
                } else if let Some(n) = &e.number_id
                    && let Some(Some(url)) = receivers.events_urls.get(n)
                {
                    to.push((None, url.clone(), format!("events_url:{n}|{subject}")));
                }
            } else {
                for (sub_id, url, patterns) in receivers
                    .subscriptions
                    .get(&e.workspace_id)
                    .into_iter()
                    .flatten()
                {
                    if patterns
                        .split(',')
                        .any(|p| super::pattern_matches(p, &e.kind))
                    {
                        to.push((
                            Some(sub_id.clone()),
                            url.clone(),
                            format!("sub:{sub_id}|{subject}"),
                        ));
                    }
                }
            }
            if held_elsewhere {
                elsewhere.extend(to.into_iter().map(|(_, _, key)| key));
                continue;
            }
            produced += to.len();
            targets.push(to);
            events.push(e);
        }
        if !full {
            break;
        }
    }
    out.last_read = (after != from.after).then_some(after);
    if events.is_empty() {
        return Ok(Some(out));
    }

    // Keys with pending deliveries this process does not hold: new ones queue behind them.
    let keys: Vec<&String> = targets
        .iter()
        .flatten()
        .map(|(_, _, k)| k)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // Two probes, each on its own partial index: unleased pending deliveries, and deliveries
    // leased by another process (the blockers index holds every leased one).
    let mut blocked: HashSet<String> = HashSet::new();
    for chunk in keys.chunks(IN_CHUNK) {
        let keys_in = in_list(backend, chunk.len());
        let sql = format!(
            "SELECT DISTINCT ordering_key FROM webhook_deliveries WHERE status = 'pending' \
             AND lease_token IS NULL AND ordering_key IN {keys_in} \
             UNION SELECT DISTINCT ordering_key FROM webhook_deliveries \
             WHERE status = 'pending' AND (lease_token IS NOT NULL OR attempts > 0) \
             AND ordering_key IN {} AND lease_token <> {}",
            in_list_from(backend, chunk.len() + 1, chunk.len()),
            placeholder(backend, 2 * chunk.len() + 1)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for _ in 0..2 {
            for k in chunk {
                q = q.bind((*k).clone());
            }
        }
        for r in q.bind(token).fetch_all(&mut *conn).await.map_err(storage)? {
            blocked.insert(get(&r, "ordering_key")?);
        }
    }

    if backend == Backend::Postgres {
        // Under the lease lock: ids above every delivery another process wrote (see DeliveryIds).
        let row = sqlx::query("SELECT max(id) AS m FROM webhook_deliveries")
            .fetch_one(&mut *conn)
            .await
            .map_err(storage)?;
        let written =
            get::<Option<String>>(&row, "m")?.and_then(|m| uuid::Uuid::parse_str(&m).ok());
        ids.last = ids.last.max(written);
    }
    let mut rows: Vec<NewRow> = Vec::new();
    let mut written_events: Vec<(&str, Option<i64>)> = Vec::new();
    let mut claims: Vec<i64> = Vec::new();
    for (i, (e, to)) in events.iter().zip(targets).enumerate() {
        if to.iter().any(|(_, _, key)| elsewhere.contains(key)) {
            // Stays queued, unclaimed; so do later events of any of its keys.
            elsewhere.extend(to.into_iter().map(|(_, _, key)| key));
            continue;
        }
        let single = to.len() == 1;
        let mut unwritten = false;
        for (sub, url, key) in to {
            let id = ids.next();
            if blocked.contains(&key) {
                rows.push(NewRow {
                    id,
                    event: i,
                    subscription_id: sub,
                    url,
                    ordering_key: key,
                    leased: false,
                });
                continue;
            }
            let unwritten_delivery = single.then(|| {
                Arc::new(Unwritten {
                    event_id: e.id.clone(),
                    workspace_id: e.workspace_id.clone(),
                    subscription_id: sub.clone(),
                    url: url.clone(),
                    ordering_key: key.clone(),
                    event_kind: e.kind.clone(),
                    number_id: e.number_id.clone(),
                    call_id: e.call_id.clone(),
                    created_at: now,
                    queue_seq: e.seq,
                })
            });
            unwritten = unwritten_delivery.is_some();
            out.deliveries.push(LeasedDelivery {
                id: id.clone(),
                event_id: e.id.clone(),
                event_kind: e.kind.clone(),
                ordering_key: key.clone(),
                url: url.clone(),
                body: e.body.clone(),
                secret: e.secret.clone(),
                attempts: 0,
                max_attempts: MAX_ATTEMPTS,
                lease_until,
                unwritten: unwritten_delivery,
            });
            if !unwritten {
                rows.push(NewRow {
                    id,
                    event: i,
                    subscription_id: sub,
                    url,
                    ordering_key: key,
                    leased: true,
                });
            }
        }
        if unwritten {
            match (backend, e.seq) {
                (Backend::Sqlite, _) => out.unwritten.push(e.id.clone()),
                (Backend::Postgres, Some(seq)) => claims.push(seq),
                (Backend::Postgres, None) => {
                    return Err(StorageError(format!("event {} has no queue row", e.id)));
                }
            }
        } else {
            written_events.push((&e.id, e.seq));
        }
    }

    let writes = !(rows.is_empty() && written_events.is_empty() && claims.is_empty());
    if writes && !may_write {
        return Ok(None);
    }
    let ts = to_db(now);
    let until = to_db(lease_until);
    // 13 values a row.
    for chunk in rows.chunks(ROW_CHUNK) {
        let sql = format!(
            "INSERT INTO webhook_deliveries (id, event_id, workspace_id, subscription_id, url, \
             ordering_key, event_kind, number_id, call_id, status, attempts, max_attempts, \
             next_attempt_at, lease_token, lease_until, created_at, updated_at) \
             SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, \
             v.column8, v.column9, 'pending', 0, v.column10, v.column11, v.column12, v.column13, \
             v.column11, v.column11 FROM (VALUES {}) AS v",
            value_rows(backend, chunk.len(), 13)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for d in chunk {
            let e = &events[d.event];
            q = q
                .bind(d.id.clone())
                .bind(e.id.clone())
                .bind(e.workspace_id.clone())
                .bind(d.subscription_id.clone())
                .bind(d.url.clone())
                .bind(d.ordering_key.clone())
                .bind(e.kind.clone())
                .bind(e.number_id.clone())
                .bind(e.call_id.clone())
                .bind(MAX_ATTEMPTS)
                .bind(ts.clone())
                .bind(d.leased.then(|| token.to_owned()))
                .bind(d.leased.then(|| until.clone()));
        }
        q.execute(&mut *conn).await.map_err(storage)?;
    }
    mark_expanded(conn, backend, &written_events, None).await?;
    for chunk in claims.chunks(IN_CHUNK) {
        let sql = format!(
            "UPDATE event_queue SET lease_token = $1, lease_until = $2 WHERE seq IN {}",
            in_list_from(backend, 3, chunk.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(token).bind(&until);
        for seq in chunk {
            q = q.bind(*seq);
        }
        q.execute(&mut *conn).await.map_err(storage)?;
    }
    Ok(Some(out))
}

/// Events whose deliveries are written now (or that have none): SQLite flags the event row,
/// PostgreSQL deletes its queue row. Each is `(event id, queue seq)`. `holder` is the claim a
/// PostgreSQL row must still carry (`record`): a claim that lapsed and was taken again belongs to
/// its new holder, whose copy is the one that counts.
async fn mark_expanded(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    events: &[(&str, Option<i64>)],
    holder: Option<&str>,
) -> Result<(), StorageError> {
    for chunk in events.chunks(IN_CHUNK) {
        let q = match backend {
            Backend::Sqlite => {
                let sql = format!(
                    "UPDATE events SET expanded = 1 WHERE id IN {}",
                    in_list(backend, chunk.len())
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for (id, _) in chunk {
                    q = q.bind(*id);
                }
                q
            }
            Backend::Postgres => {
                let sql = format!(
                    "DELETE FROM event_queue WHERE ($1 IS NULL OR lease_token = $1) AND seq IN {}",
                    in_list_from(backend, 2, chunk.len())
                );
                let mut q = sqlx::query(AssertSqlSafe(sql)).bind(holder);
                for (id, seq) in chunk {
                    let seq = seq.ok_or_else(|| {
                        StorageError(format!("event {id} has no queue row to remove"))
                    })?;
                    q = q.bind(seq);
                }
                q
            }
        };
        let done = q
            .execute(&mut *conn)
            .await
            .map_err(storage)?
            .rows_affected();
        if holder.is_some() && usize::try_from(done).is_ok_and(|d| d < chunk.len()) {
            tracing::warn!(
                lost = chunk.len() as u64 - done,
                "webhook queue claims lapsed before their deliveries were recorded (sent twice)"
            );
        }
    }
    Ok(())
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
    /// The usual lease on SQLite: no delivery in the table is due, and every event read has a
    /// single receiver whose delivery is handed out unwritten, so the lease writes nothing. It
    /// then runs in one read transaction and leaves the only write connection to call writes
    /// (an empty lease transaction held it for several round trips, 50 times a second at 650
    /// calls/s, and each call's first write queued behind it). `None`: something must be
    /// written, and the caller leases in a write transaction, reading again. That includes
    /// events nobody receives (their `expanded` flag) and deliveries queued behind one in
    /// backoff: then each pass reads twice, on the read pool.
    async fn lease_without_writing(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        token: &str,
        lease_until: DateTime<Utc>,
        from: &ReadFrom,
        ids: &mut DeliveryIds,
    ) -> Result<Option<Expanded>, StorageError> {
        let mut tx = self.db().read.begin().await.map_err(storage)?;
        // A superset of what the lease query takes (it also checks for blockers).
        let due = sqlx::query(
            "SELECT 1 AS due FROM webhook_deliveries WHERE status = 'pending' \
             AND lease_token IS NULL AND (attempts = 0 OR next_attempt_at <= $1) LIMIT 1",
        )
        .bind(to_db(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(storage)?;
        if due.is_some() {
            tx.rollback().await.map_err(storage)?;
            return Ok(None);
        }
        let expanded = expand_events(
            &mut tx,
            Backend::Sqlite,
            now,
            limit,
            token,
            lease_until,
            from,
            ids,
            false,
        )
        .await?;
        tx.rollback().await.map_err(storage)?;
        Ok(expanded)
    }

    /// Keep what a lease handed out, and return its deliveries: `table` (leased rows, in id
    /// order) first, then the expanded ones, which are newer, in event order.
    fn keep_handed_out(
        &self,
        mut table: Vec<LeasedDelivery>,
        expanded: Expanded,
        ids: DeliveryIds,
    ) -> Vec<LeasedDelivery> {
        let mut l = self.leases.lock();
        l.last_delivery_id = ids.last;
        if self.db().backend == Backend::Sqlite {
            l.unwritten.extend(expanded.unwritten);
            if let Some(last) = expanded.last_read
                && l.cursor.as_ref().is_none_or(|c| *c < last)
            {
                l.cursor = Some(last);
            }
            if l.unwritten.is_empty() {
                l.cursor = None;
            }
        }
        table.extend(expanded.deliveries);
        table
    }

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
             attempts, next_attempt_at, last_status_code, last_error, created_at, delivered_at, \
             first_attempted_at, first_status_code, first_latency_ms, first_error \
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
            // Attempt 1 is on the row (rows from before 0006 have it in webhook_attempts).
            let first = match get_opt_time(r, "first_attempted_at")? {
                Some(attempted_at) => vec![AttemptView {
                    attempt: 1,
                    attempted_at,
                    status_code: get(r, "first_status_code")?,
                    latency_ms: get::<Option<i64>>(r, "first_latency_ms")?.unwrap_or(0),
                    error: get(r, "first_error")?,
                }],
                None => Vec::new(),
            };
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
                attempts: first,
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
        let backend = self.db().backend;
        let token = self.leases.token();
        let from = match backend {
            Backend::Sqlite => {
                let mut l = self.leases.lock();
                let below = l
                    .below_cursor_at
                    .is_none_or(|t| t.elapsed() >= BELOW_CURSOR_EVERY);
                match &l.cursor {
                    Some(c) if !below => ReadFrom {
                        after: c.clone(),
                        skip: HashSet::new(),
                    },
                    _ => {
                        l.below_cursor_at = Some(Instant::now());
                        ReadFrom {
                            after: String::new(),
                            skip: l.unwritten.clone(),
                        }
                    }
                }
            }
            // Claims are in the queue table: every read starts at its head.
            Backend::Postgres => ReadFrom {
                after: String::new(),
                skip: HashSet::new(),
            },
        };
        let mut ids = DeliveryIds {
            last: self.leases.lock().last_delivery_id,
        };
        let reap = {
            let mut l = self.leases.lock();
            let due = l
                .reaped_at
                .is_none_or(|t| (now - t).to_std().is_ok_and(|d| d >= REAP_EVERY));
            if due {
                l.reaped_at = Some(now);
            }
            due
        };
        if backend == Backend::Sqlite
            && !reap
            && let Some(expanded) = self
                .lease_without_writing(now, limit, &token, lease_until, &from, &mut ids)
                .await?
        {
            return Ok(self.keep_handed_out(Vec::new(), expanded, ids));
        }
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        let lease = match backend {
            Backend::Sqlite => LEASE_SQLITE,
            Backend::Postgres => {
                // Serialize leasing across processes, so two processes never take deliveries of
                // one ordering key at once; SKIP LOCKED keeps rows being recorded out of the way.
                // No bitmap scans, hash or merge joins in this transaction: without statistics
                // (a fresh table, or autovacuum off) the planner would read and sort the whole
                // queue (100 ms for a backlog of 100,000) instead of the first page of its
                // primary key, which is in `seq` order already, joined to events row by row.
                sqlx::query(
                    "SELECT pg_advisory_xact_lock(7302519), \
                     set_config('enable_bitmapscan', 'off', true), \
                     set_config('enable_hashjoin', 'off', true), \
                     set_config('enable_mergejoin', 'off', true)",
                )
                .execute(&mut *tx)
                .await
                .map_err(storage)?;
                LEASE_POSTGRES
            }
        };
        if reap {
            sqlx::query(REAP_LAPSED)
                .bind(to_db(now))
                .execute(&mut *tx)
                .await
                .map_err(storage)?;
        }
        // Deliveries already in the table first (retries, and ones that waited behind them):
        // they are older than anything expanded now.
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
        let mut rows = Vec::with_capacity(leased.len());
        for chunk in leased.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT d.id, d.event_id, d.event_kind, d.ordering_key, d.url, d.attempts, \
                 d.max_attempts, d.lease_until, e.body, w.webhook_secret \
                 FROM webhook_deliveries d JOIN events e ON e.id = d.event_id \
                 JOIN workspaces w ON w.id = d.workspace_id WHERE d.id IN {}",
                in_list(backend, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.clone());
            }
            rows.extend(q.fetch_all(&mut *tx).await.map_err(storage)?);
        }
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
                    unwritten: None,
                })
            })
            .collect::<Result<_, StorageError>>()?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        let expanded = if out.len() < limit {
            expand_events(
                &mut tx,
                backend,
                now,
                limit - out.len(),
                &token,
                lease_until,
                &from,
                &mut ids,
                true,
            )
            .await?
            .ok_or_else(|| StorageError("an expansion that may write did not".into()))?
        } else {
            Expanded::default()
        };
        tx.commit().await.map_err(storage)?;
        Ok(self.keep_handed_out(out, expanded, ids))
    }

    async fn record(
        &self,
        attempts: &[AttemptRecord],
        released: &[LeasedDelivery],
    ) -> Result<(), StorageError> {
        let backend = self.db().backend;
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        if backend == Backend::Postgres {
            // Each batch touches a few hundred rows by primary key. Without statistics (a fresh
            // table, or autovacuum off) the planner hash-joins them against a scan of the whole
            // table instead, which grows with every delivery ever made.
            sqlx::query(
                "SELECT set_config('enable_hashjoin', 'off', true), \
                 set_config('enable_mergejoin', 'off', true)",
            )
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        }

        // Deliveries that so far existed only in this process: written once, as they stand after
        // this attempt (or pending, if released unattempted), and their events marked expanded
        // (SQLite) or their claimed queue rows deleted (PostgreSQL).
        let mut first_writes: Vec<FirstWrite> = Vec::new();
        for a in attempts {
            if let Some(u) = &a.unwritten {
                let at = to_db(a.attempted_at);
                let (status, next, delivered) = match &a.resolution {
                    Resolution::Succeeded => ("succeeded", at.clone(), Some(at.clone())),
                    Resolution::RetryAt(t) => ("pending", to_db(*t), None),
                    Resolution::DeadLetter => ("dead_letter", at.clone(), None),
                };
                let first = (a.attempt == 1).then(|| InlineAttempt {
                    attempted_at: at.clone(),
                    status_code: a.result.status_code.map(i64::from),
                    latency_ms: a.result.latency_ms,
                    error: a.result.error.clone(),
                });
                first_writes.push(FirstWrite {
                    id: a.delivery_id.clone(),
                    u: u.clone(),
                    status,
                    attempts: a.attempt,
                    max_attempts: a.max_attempts,
                    next_attempt_at: next,
                    last_status_code: a.result.status_code.map(i64::from),
                    last_error: a.result.error.clone(),
                    updated_at: at,
                    delivered_at: delivered,
                    first,
                });
            }
        }
        for d in released {
            if let Some(u) = &d.unwritten {
                let ts = to_db(u.created_at);
                first_writes.push(FirstWrite {
                    id: d.id.clone(),
                    u: u.clone(),
                    status: "pending",
                    attempts: d.attempts,
                    max_attempts: d.max_attempts,
                    next_attempt_at: ts.clone(),
                    last_status_code: None,
                    last_error: None,
                    updated_at: ts,
                    delivered_at: None,
                    first: None,
                });
            }
        }
        for chunk in first_writes.chunks(ROW_CHUNK) {
            // A pending one whose subscription was deleted meanwhile is canceled, as the deletion
            // would have done had it been written already.
            let sql = format!(
                "INSERT INTO webhook_deliveries (id, event_id, workspace_id, subscription_id, url, \
                 ordering_key, event_kind, number_id, call_id, status, attempts, max_attempts, \
                 next_attempt_at, last_status_code, last_error, created_at, updated_at, \
                 delivered_at, first_attempted_at, first_status_code, first_latency_ms, \
                 first_error) \
                 SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, \
                 v.column7, v.column8, v.column9, \
                 CASE WHEN v.column10 = 'pending' AND EXISTS (SELECT 1 FROM webhook_subscriptions s \
                   WHERE s.id = v.column4 AND s.status = 'deleted') THEN 'canceled' \
                   ELSE v.column10 END, \
                 v.column11, v.column12, v.column13, v.column14, v.column15, v.column16, \
                 v.column17, v.column18, v.column19, v.column20, v.column21, v.column22 \
                 FROM (VALUES {}) AS v",
                value_rows(backend, chunk.len(), 22)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for w in chunk {
                q = q
                    .bind(w.id.clone())
                    .bind(w.u.event_id.clone())
                    .bind(w.u.workspace_id.clone())
                    .bind(w.u.subscription_id.clone())
                    .bind(w.u.url.clone())
                    .bind(w.u.ordering_key.clone())
                    .bind(w.u.event_kind.clone())
                    .bind(w.u.number_id.clone())
                    .bind(w.u.call_id.clone())
                    .bind(w.status)
                    .bind(w.attempts)
                    .bind(w.max_attempts)
                    .bind(w.next_attempt_at.clone())
                    .bind(w.last_status_code)
                    .bind(w.last_error.clone())
                    .bind(to_db(w.u.created_at))
                    .bind(w.updated_at.clone())
                    .bind(w.delivered_at.clone())
                    .bind(w.first.as_ref().map(|f| f.attempted_at.clone()))
                    .bind(w.first.as_ref().and_then(|f| f.status_code))
                    .bind(w.first.as_ref().map(|f| f.latency_ms))
                    .bind(w.first.as_ref().and_then(|f| f.error.clone()));
            }
            q.execute(&mut *tx).await.map_err(storage)?;
        }
        let first_events: Vec<(&str, Option<i64>)> = first_writes
            .iter()
            .map(|w| (w.u.event_id.as_str(), w.u.queue_seq))
            .collect();
        let holder = self.leases.token();
        mark_expanded(&mut tx, backend, &first_events, Some(&holder)).await?;

        // The first attempt is kept on the delivery row; later ones get rows of their own.
        let later: Vec<&AttemptRecord> = attempts.iter().filter(|a| a.attempt != 1).collect();
        for chunk in later.chunks(ROW_CHUNK) {
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
        }

        // Deliveries already in the table: one UPDATE … FROM (VALUES …) per chunk (columns are
        // column1… on both backends).
        let updates: Vec<&AttemptRecord> =
            attempts.iter().filter(|a| a.unwritten.is_none()).collect();
        for chunk in updates.chunks(ROW_CHUNK) {
            let sql = format!(
                "UPDATE webhook_deliveries SET status = v.column2, attempts = v.column3, \
                 next_attempt_at = v.column4, last_status_code = v.column5, last_error = v.column6, \
                 delivered_at = v.column7, updated_at = v.column8, lease_token = NULL, \
                 lease_until = NULL, \
                 first_attempted_at = CASE WHEN v.column3 = 1 THEN v.column8 \
                   ELSE webhook_deliveries.first_attempted_at END, \
                 first_status_code = CASE WHEN v.column3 = 1 THEN v.column5 \
                   ELSE webhook_deliveries.first_status_code END, \
                 first_latency_ms = CASE WHEN v.column3 = 1 THEN v.column9 \
                   ELSE webhook_deliveries.first_latency_ms END, \
                 first_error = CASE WHEN v.column3 = 1 THEN v.column6 \
                   ELSE webhook_deliveries.first_error END \
                 FROM (VALUES {}) AS v WHERE webhook_deliveries.id = v.column1",
                value_rows(backend, chunk.len(), 9)
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
                    .bind(at)
                    .bind(a.result.latency_ms);
            }
            q.execute(&mut *tx).await.map_err(storage)?;
        }
        let unleased: Vec<&str> = released
            .iter()
            .filter(|d| d.unwritten.is_none())
            .map(|d| d.id.as_str())
            .collect();
        for chunk in unleased.chunks(IN_CHUNK) {
            let sql = format!(
                "UPDATE webhook_deliveries SET lease_token = NULL, lease_until = NULL \
                 WHERE id IN {}",
                in_list(backend, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&mut *tx).await.map_err(storage)?;
        }
        bring_forward(&mut tx, backend, &self.leases, attempts).await?;
        tx.commit().await.map_err(storage)?;
        if !first_events.is_empty() {
            let mut l = self.leases.lock();
            for (e, _) in &first_events {
                l.unwritten.remove(*e);
            }
            if l.unwritten.is_empty() {
                l.cursor = None;
            }
        }
        Ok(())
    }

    async fn forget_leases(&self) -> Result<(), StorageError> {
        {
            let mut l = self.leases.lock();
            *l = LocalInner::default();
        }
        // On PostgreSQL the earlier incarnation's leases and queue claims lapse (a record it
        // started may still be running).
        if self.db().backend == Backend::Sqlite {
            // One process: whatever an earlier incarnation of the actor leased is free now.
            self.release_all_leases().await?;
        }
        Ok(())
    }
}

/// A delivery written for the first time by `record`.
struct FirstWrite {
    id: String,
    u: Arc<Unwritten>,
    status: &'static str,
    attempts: i64,
    max_attempts: i64,
    next_attempt_at: String,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    updated_at: String,
    delivered_at: Option<String>,
    /// The first attempt, kept on the row.
    first: Option<InlineAttempt>,
}

struct InlineAttempt {
    attempted_at: String,
    status_code: Option<i64>,
    latency_ms: i64,
    error: Option<String>,
}

/// How long after bringing a receiver's deliveries forward another success there does it again.
const BRING_FORWARD_EVERY: Duration = Duration::from_secs(5);

/// A retried delivery that succeeded says its receiver is back: its other deliveries waiting out
/// a backoff (up to hours, after a long outage) are made due now, so the backlog drains at once
/// rather than over the rest of the schedule. Order per key is unchanged (the lease still hands
/// out only the head of each key). Once per receiver per [`BRING_FORWARD_EVERY`] in this
/// process: successes come by the hundred while a backlog drains.
async fn bring_forward(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    leases: &LocalLeases,
    attempts: &[AttemptRecord],
) -> Result<(), StorageError> {
    let now = Instant::now();
    let mut urls: Vec<&str> = attempts
        .iter()
        .filter(|a| a.attempt > 1 && a.resolution == Resolution::Succeeded)
        .map(|a| a.url.as_str())
        .collect();
    if urls.is_empty() {
        // The usual batch: nothing was retried, so nothing to lock or write.
        return Ok(());
    }
    urls.sort_unstable();
    urls.dedup();
    {
        let mut l = leases.lock();
        l.recovered
            .retain(|_, at| now.duration_since(*at) < BRING_FORWARD_EVERY);
        urls.retain(|u| !l.recovered.contains_key(*u));
        for u in &urls {
            l.recovered.insert((*u).to_owned(), now);
        }
    }
    let Some(at) = attempts.iter().map(|a| a.attempted_at).max() else {
        return Ok(());
    };
    let at = to_db(at);
    for chunk in urls.chunks(IN_CHUNK) {
        let sql = format!(
            "UPDATE webhook_deliveries SET next_attempt_at = {} \
             WHERE status = 'pending' AND attempts > 0 AND lease_token IS NULL \
             AND next_attempt_at > {} AND url IN {}",
            placeholder(backend, 1),
            placeholder(backend, 2),
            in_list_from(backend, 3, chunk.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(at.clone())
            .bind(at.clone());
        for url in chunk {
            q = q.bind(*url);
        }
        let moved = q.execute(&mut **tx).await.map_err(storage)?.rows_affected();
        if moved > 0 {
            tracing::info!(
                receivers = chunk.len(),
                deliveries = moved,
                "a receiver is back: its deliveries waiting to retry are due now"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_rise_above_a_floor_from_another_process() {
        // A floor far in the future: every id must still come out above it, in order.
        let floor = uuid::Uuid::parse_str("7fffffff-ffff-7fff-bfff-fffffffffffe").expect("uuid");
        let mut ids = DeliveryIds { last: Some(floor) };
        let made: Vec<uuid::Uuid> = (0..4)
            .map(|_| uuid::Uuid::parse_str(&ids.next()).expect("uuid"))
            .collect();
        assert!(made[0] > floor);
        assert!(made.windows(2).all(|w| w[0] < w[1]), "{made:?}");
        for u in &made {
            assert_eq!(u.get_version_num(), 7, "{u}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{u}");
        }
        // Without a floor: plain UUIDv7, rising.
        let mut fresh = DeliveryIds::default();
        let (a, b) = (fresh.next(), fresh.next());
        assert!(a < b);
        // A full random part carries into the next millisecond.
        let full = uuid::Uuid::parse_str("01900000-0000-7fff-bfff-ffffffffffff").expect("uuid");
        let next = uuid_after(full);
        assert!(next > full);
        assert_eq!(next.get_version_num(), 7);
        assert_eq!(next.get_variant(), uuid::Variant::RFC4122);
    }
}
