//! Group commit, set-wise: a batch of call writes applied with one multi-row statement per kind
//! of change instead of a few statements per write. Each statement is a round trip (on SQLite to
//! sqlx's worker thread, on PostgreSQL to the server), and at hundreds of calls a second the round
//! trips, not the rows, were what the writer spent its time on.
//!
//! The outcome is that of applying the writes one by one in arrival order (`apply_in_tx`, which
//! a failed batch falls back to): starts, then answers, then ends are applied, which is arrival
//! order for any one call as long as its writes in the batch come in lifecycle order, one of each
//! kind at most (`applies`; a call's answer is queued without waiting, so its end often shares
//! the batch); timeline rows, ledger rows and events get their ids in arrival order. A batch this
//! cannot express (a kind twice for one call, an end before its answer, a recording) is applied
//! one write at a time.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::db::Backend;
use crate::sql::{in_list, pow2_chunks, value_rows};
use crate::store::low_balance_event;
use crate::webhooks::enqueue_all;

/// Rows per multi-row statement, at most: at most 9 values a row, far below either backend's
/// limit. Chunks are powers of two (see `pow2_chunks`).
const CHUNK: usize = 128;

/// Whether [`apply`] can take this batch: each call's lifecycle writes in it come at most one of
/// each kind and in lifecycle order (start, answer, end), the order in which the phases of
/// [`apply`] run. (An answer is queued without waiting for it to commit, so a call's answer and
/// its end often share a batch.)
pub(super) fn applies(batch: &[Pending]) -> bool {
    let mut last_phase: HashMap<&str, u8> = HashMap::new();
    for (w, _) in batch {
        let (call_id, phase) = match w {
            CallWrite::Started(c) => (c.call_id.as_str(), 0),
            CallWrite::Answered(c) => (c.call_id.as_str(), 1),
            CallWrite::Ended(c) => (c.call_id.as_str(), 2),
            CallWrite::Placed(c) => (c.call_id.as_str(), 0),
            CallWrite::Timeline { .. } => continue,
            CallWrite::Recording { .. } => return false,
        };
        if last_phase
            .insert(call_id, phase)
            .is_some_and(|before| before >= phase)
        {
            return false;
        }
    }
    true
}

/// A call an end in this batch ended.
struct EndedCall {
    call: CallRecord,
    /// The timeline line of its charge, when it was rated.
    charged: Option<TimelineEntry>,
    /// `wallet.low_balance`, when its debit crossed the threshold.
    low_balance: Option<EventDraft>,
}

/// What the batch does to each write, filled in phase by phase.
enum Outcome {
    /// A start or answer that changed the call (its event and timeline are written).
    Changed(Box<CallRecord>),
    /// An end that ended the call (rated, maybe charged) and the extra timeline line it adds.
    Ended(Box<EndedCall>),
    /// A repeat of a change that committed earlier: nothing is written.
    Repeat,
    /// An end of a call that was already final: nothing is written.
    AlreadyFinal(CallCharged),
    /// A timeline append.
    Appended,
    /// A placed call: written (with its `call.created` line), or refused.
    Placed(PlacedCallStart, Option<Box<(CallRecord, TimelineEntry)>>),
}

/// Apply a batch (see [`applies`]) in the caller's transaction. The second value says whether
/// events were queued.
pub(super) async fn apply(
    conn: &mut AnyConnection,
    backend: Backend,
    batch: &[Pending],
) -> Result<(Vec<Written>, bool), StorageError> {
    let writes: Vec<&CallWrite> = batch.iter().map(|(w, _)| w).collect();
    let mut outcomes: Vec<Option<Outcome>> = writes
        .iter()
        .map(|w| matches!(w, CallWrite::Timeline { .. }).then_some(Outcome::Appended))
        .collect();
    start_calls(conn, backend, &writes, &mut outcomes).await?;
    answer_calls(conn, backend, &writes, &mut outcomes).await?;
    end_calls(conn, backend, &writes, &mut outcomes).await?;
    place_calls(conn, backend, &writes, &mut outcomes).await?;

    // Timeline rows and events, in arrival order.
    let mut timeline: Vec<(&str, &TimelineEntry)> = Vec::new();
    let mut events: Vec<(EventDraft, DateTime<Utc>)> = Vec::new();
    let mut results = Vec::with_capacity(writes.len());
    for (w, outcome) in writes.iter().zip(&outcomes) {
        let outcome = outcome
            .as_ref()
            .ok_or_else(|| StorageError("a call write was left unapplied".into()))?;
        match (w, outcome) {
            (CallWrite::Started(c), Outcome::Changed(stored)) => {
                timeline.extend(c.timeline.iter().map(|e| (c.call_id.as_str(), e)));
                let draft = call_event(stored, "call.started", base_payload(stored));
                events.push((draft, c.started_at));
                results.push(Written::Other);
            }
            (CallWrite::Answered(c), Outcome::Changed(stored)) => {
                timeline.extend(c.timeline.iter().map(|e| (c.call_id.as_str(), e)));
                events.push((answered_event(stored, c.answered_at), c.answered_at));
                results.push(Written::Other);
            }
            (CallWrite::Ended(c), Outcome::Ended(e)) => {
                let EndedCall {
                    call,
                    charged,
                    low_balance,
                } = e.as_ref();
                timeline.extend(c.timeline.iter().map(|e| (c.call_id.as_str(), e)));
                timeline.extend(charged.iter().map(|e| (c.call_id.as_str(), e)));
                if let Some(low) = low_balance {
                    events.push((low.clone(), c.ended_at));
                }
                events.push((ended_event(call, c.ended_at), c.ended_at));
                results.push(Written::Ended(call.charged()));
            }
            (CallWrite::Ended(_), Outcome::AlreadyFinal(charged)) => {
                results.push(Written::Ended(charged.clone()));
            }
            (CallWrite::Timeline { call_id, entries }, Outcome::Appended) => {
                timeline.extend(entries.iter().map(|e| (call_id.as_str(), e)));
                results.push(Written::Other);
            }
            (CallWrite::Placed(c), Outcome::Placed(placed, written)) => {
                if let Some(w) = written {
                    let (stored, created) = w.as_ref();
                    timeline.push((c.call_id.as_str(), created));
                    events.push((started_event(stored), c.started_at));
                }
                results.push(Written::Placed(placed.clone()));
            }
            (_, Outcome::Repeat) => results.push(Written::Other),
            _ => {
                return Err(StorageError(
                    "a call write got another kind's outcome".into(),
                ));
            }
        }
    }
    insert_timelines(conn, backend, &timeline).await?;
    enqueue_all(conn, backend, &events).await?;
    Ok((results, !events.is_empty()))
}

/// Calls already in the table among `ids`, by id.
async fn read_calls(
    conn: &mut AnyConnection,
    backend: Backend,
    ids: &[&str],
) -> Result<HashMap<String, CallRecord>, StorageError> {
    let mut out = HashMap::new();
    for chunk in pow2_chunks(ids, CHUNK) {
        let sql = format!(
            concat!("SELECT ", call_cols!(), " FROM calls WHERE id IN {}"),
            in_list(backend, chunk.len())
        );
        // Safe: `sql` is built only from placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(*id);
        }
        for row in q.fetch_all(&mut *conn).await.map_err(storage)? {
            let c = call_from_row(&row)?;
            out.insert(c.id.clone(), c);
        }
    }
    Ok(out)
}

/// A query being bound.
type AnyQuery = sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>;

/// The writes of one kind, with their places in the batch.
fn select<'a, T>(
    writes: &[&'a CallWrite],
    pick: impl Fn(&'a CallWrite) -> Option<&'a T>,
) -> Vec<(usize, &'a T)> {
    writes
        .iter()
        .enumerate()
        .filter_map(|(i, w)| pick(w).map(|t| (i, t)))
        .collect()
}

/// One conditional change of many call rows: `statement` (with `{values}` where the rows of
/// `width` values go) RETURNING the rows it changed. Returns those, and the others of `items`
/// as they stand (a repeat of a change that committed, or a call already past it); a call in
/// neither does not exist.
async fn change_calls<T>(
    conn: &mut AnyConnection,
    backend: Backend,
    items: &[(usize, &T)],
    id: impl Fn(&T) -> &str,
    statement: &str,
    width: usize,
    bind: impl Fn(AnyQuery, &T) -> Result<AnyQuery, StorageError>,
) -> Result<(HashMap<String, CallRecord>, HashMap<String, CallRecord>), StorageError> {
    let mut changed = HashMap::new();
    for chunk in pow2_chunks(items, CHUNK) {
        let sql = statement.replace("{values}", &value_rows(backend, chunk.len(), width));
        // Safe: `sql` is a constant with placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (_, item) in chunk {
            q = bind(q, item)?;
        }
        let rows = q.fetch_all(&mut *conn).await.map_err(storage)?;
        for row in &rows {
            let c = call_from_row(row)?;
            changed.insert(c.id.clone(), c);
        }
    }
    let missing: Vec<&str> = items
        .iter()
        .map(|(_, item)| id(item))
        .filter(|i| !changed.contains_key(*i))
        .collect();
    let existing = read_calls(conn, backend, &missing).await?;
    Ok((changed, existing))
}

// `WHERE true` keeps SQLite from reading ON CONFLICT as part of the join. The rate and currency
// are copied from the number as it is now: the call is billed at the price in force when it
// started.
const START_CALLS: &str = concat!(
    "INSERT INTO calls (id, workspace_id, number_id, direction, from_number, to_number, status, \
     sip_call_id, engine_id, started_at, currency, rate_per_min_minor, created_at, updated_at, \
     parent_call_id) \
     SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, 'ringing', \
     v.column7, v.column8, v.column9, t.currency, \
     CASE WHEN v.column4 = 'inbound' THEN t.inbound_per_min_minor \
       ELSE t.outbound_per_min_minor END, v.column9, v.column9, v.column10 \
     FROM (VALUES {values}) AS v \
     JOIN tenant_numbers t ON t.id = v.column3 AND t.workspace_id = v.column2 \
     WHERE true ON CONFLICT (id) DO NOTHING RETURNING ",
    call_cols!()
);

const ANSWER_CALLS: &str = concat!(
    "UPDATE calls SET status = 'answered', answered_at = v.column2, updated_at = v.column2, \
     to_number = COALESCE(v.column3, calls.to_number) \
     FROM (VALUES {values}) AS v WHERE calls.id = v.column1 AND calls.status = 'ringing' \
     RETURNING ",
    call_cols!()
);

// The conditional update comes first: it also locks the rows, so a second ender finds them final.
const END_CALLS: &str = concat!(
    "UPDATE calls SET status = v.column2, ended_at = v.column3, hangup_cause = v.column4, \
     failure_reason = v.column5, updated_at = v.column3, \
     sip_status = COALESCE(CAST(v.column6 AS BIGINT), calls.sip_status) FROM (VALUES {values}) AS v \
     WHERE calls.id = v.column1 AND calls.status IN ('ringing', 'answered') RETURNING ",
    call_cols!()
);

/// Insert the new calls (`ringing`).
async fn start_calls(
    conn: &mut AnyConnection,
    backend: Backend,
    writes: &[&CallWrite],
    outcomes: &mut [Option<Outcome>],
) -> Result<(), StorageError> {
    let starts = select(writes, |w| match w {
        CallWrite::Started(c) => Some(c),
        _ => None,
    });
    if starts.is_empty() {
        return Ok(());
    }
    let (mut inserted, existing) = change_calls(
        conn,
        backend,
        &starts,
        |c| &c.call_id,
        START_CALLS,
        10,
        |q, c| {
            check_direction(&c.direction)?;
            Ok(q.bind(c.call_id.clone())
                .bind(c.workspace_id.clone())
                .bind(c.number_id.clone())
                .bind(c.direction.clone())
                .bind(c.from.clone())
                .bind(c.to.clone())
                .bind(c.sip_call_id.clone())
                .bind(c.engine_id.clone())
                .bind(to_db(c.started_at))
                .bind(c.parent_call_id.clone()))
        },
    )
    .await?;
    for (i, c) in starts {
        outcomes[i] = Some(match inserted.remove(&c.call_id) {
            Some(stored) => Outcome::Changed(Box::new(stored)),
            // A retry of a start that did commit.
            None if existing.contains_key(&c.call_id) => Outcome::Repeat,
            None => return Err(unknown_number(c)),
        });
    }
    Ok(())
}

/// Mark ringing calls answered.
async fn answer_calls(
    conn: &mut AnyConnection,
    backend: Backend,
    writes: &[&CallWrite],
    outcomes: &mut [Option<Outcome>],
) -> Result<(), StorageError> {
    let answers = select(writes, |w| match w {
        CallWrite::Answered(c) => Some(c),
        _ => None,
    });
    if answers.is_empty() {
        return Ok(());
    }
    let (mut changed, existing) = change_calls(
        conn,
        backend,
        &answers,
        |c| &c.call_id,
        ANSWER_CALLS,
        3,
        |q, c| {
            Ok(q.bind(c.call_id.clone())
                .bind(to_db(c.answered_at))
                .bind(c.to.clone()))
        },
    )
    .await?;
    for (i, c) in answers {
        outcomes[i] = Some(match changed.remove(&c.call_id) {
            Some(stored) => Outcome::Changed(Box::new(stored)),
            // Answered (or ended) already: a repeat changes nothing.
            None if existing.contains_key(&c.call_id) => Outcome::Repeat,
            None => return Err(call_not_found(&c.call_id)),
        });
    }
    Ok(())
}

/// A wallet as a batch of ends sees it: read (and on PostgreSQL locked) once, debited in memory
/// call by call, written once.
struct WalletDraft {
    balance: i64,
    currency: String,
    threshold: i64,
    alerted: bool,
    debited: i64,
    /// The latest debit, for `updated_at`.
    last_at: DateTime<Utc>,
}

/// End live calls: final status, then per-second rating, wallet debits with their ledger rows
/// (in arrival order, so each row's `balance_after_minor` is what it would be one by one), and
/// duration and cost on the rows.
async fn end_calls(
    conn: &mut AnyConnection,
    backend: Backend,
    writes: &[&CallWrite],
    outcomes: &mut [Option<Outcome>],
) -> Result<(), StorageError> {
    let ends = select(writes, |w| match w {
        CallWrite::Ended(c) => Some(c),
        _ => None,
    });
    if ends.is_empty() {
        return Ok(());
    }
    let (mut ended, existing) = change_calls(
        conn,
        backend,
        &ends,
        |c| &c.call_id,
        END_CALLS,
        6,
        |q, c| {
            check_final(c)?;
            Ok(q.bind(c.call_id.clone())
                .bind(c.status.as_str())
                .bind(to_db(c.ended_at))
                .bind(c.hangup_cause.clone())
                .bind(c.failure_reason.clone())
                .bind(c.sip_status.map(i64::from)))
        },
    )
    .await?;

    // Their prepaid reservations end here too: a reserved call is charged at most what it held.
    let ended_ids: Vec<String> = ended.keys().cloned().collect();
    let reserved = super::release_reservations(conn, &ended_ids).await?;

    // Rate every call this batch ended; read the wallets of those with something to pay.
    let mut rated: Vec<(usize, CallRecord, i64)> = Vec::new();
    for (i, c) in &ends {
        let Some(mut call) = ended.remove(&c.call_id) else {
            outcomes[*i] = Some(match existing.get(&c.call_id) {
                Some(stored) => Outcome::AlreadyFinal(stored.charged()),
                None => return Err(call_not_found(&c.call_id)),
            });
            continue;
        };
        call.duration_seconds = call
            .answered_at
            .map(|a| money::billable_seconds(a, c.ended_at))
            .unwrap_or(0);
        let cost = money::reserved_charge_minor(
            money::call_cost_minor(call.duration_seconds, call.rate_per_min_minor),
            reserved.get(&call.id).copied(),
        );
        rated.push((*i, call, cost));
    }
    let payers: Vec<&str> = rated
        .iter()
        .filter(|(_, _, cost)| *cost > 0)
        .map(|(_, c, _)| c.workspace_id.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut wallets = lock_wallets(conn, backend, &payers).await?;

    let mut ledger: Vec<LedgerRow> = Vec::new();
    let mut updates: Vec<(String, i64, i64, i64)> = Vec::new();
    for (i, mut call, cost) in rated {
        let CallWrite::Ended(end) = writes[i] else {
            return Err(StorageError("a rated call is not an end".into()));
        };
        let (mut charged, mut low_balance) = (None, None);
        if cost > 0 {
            let w = wallets.get_mut(&call.workspace_id).ok_or_else(|| {
                StorageError(format!("workspace {} has no wallet", call.workspace_id))
            })?;
            check_currency(&call, &w.currency)?;
            let charge = money::collectable_minor(cost, w.balance);
            let mut entry_id = None;
            if charge > 0 {
                w.balance -= charge;
                w.debited += charge;
                w.last_at = w.last_at.max(end.ended_at);
                let id = new_id();
                ledger.push(LedgerRow {
                    id: id.clone(),
                    workspace_id: call.workspace_id.clone(),
                    amount: -charge,
                    balance_after: w.balance,
                    currency: call.currency.clone(),
                    call_id: call.id.clone(),
                    at: to_db(end.ended_at),
                });
                entry_id = Some(id);
                // Once per crossing, as `after_debit` does one write at a time.
                if w.balance < w.threshold && !w.alerted {
                    w.alerted = true;
                    low_balance = Some(low_balance_event(
                        &call.workspace_id,
                        w.balance,
                        w.threshold,
                        &w.currency,
                    ));
                }
            }
            call.cost_minor = charge;
            call.uncollected_minor = cost - charge;
            charged = Some(charged_entry(&call, cost, entry_id, end.ended_at));
        }
        if call.duration_seconds > 0 || cost > 0 {
            updates.push((
                call.id.clone(),
                call.duration_seconds,
                call.cost_minor,
                call.uncollected_minor,
            ));
        }
        outcomes[i] = Some(Outcome::Ended(Box::new(EndedCall {
            call,
            charged,
            low_balance,
        })));
    }
    write_wallets(conn, &wallets).await?;
    insert_ledger(conn, backend, &ledger).await?;
    update_costs(conn, backend, &updates).await?;
    Ok(())
}

/// Admit and write the calls placed through the API, in arrival order, each workspace's wallet
/// locked and read once for all of its calls in the batch. They come after the batch's ends, so
/// slots and reservations those free count already.
async fn place_calls(
    conn: &mut AnyConnection,
    backend: Backend,
    writes: &[&CallWrite],
    outcomes: &mut [Option<Outcome>],
) -> Result<(), StorageError> {
    let placed = select(writes, |w| match w {
        CallWrite::Placed(c) => Some(c.as_ref()),
        _ => None,
    });
    if placed.is_empty() {
        return Ok(());
    }
    let workspaces: std::collections::BTreeSet<&str> = placed
        .iter()
        .map(|(_, c)| c.workspace_id.as_str())
        .collect();
    let mut wallets = HashMap::new();
    for ws in workspaces {
        wallets.insert(ws, PlacingWallet::lock(conn, ws).await?);
    }
    let mut admitted: Vec<&NewPlacedCall> = Vec::new();
    for (i, c) in &placed {
        let wallet = wallets
            .get_mut(c.workspace_id.as_str())
            .ok_or_else(|| StorageError("a placed call's wallet was not read".into()))?;
        match wallet.admit(c) {
            Some(refused) => outcomes[*i] = Some(Outcome::Placed(refused, None)),
            None => admitted.push(c),
        }
    }
    let mut stored: HashMap<String, CallRecord> = insert_placed(conn, backend, &admitted)
        .await?
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    for (i, c) in placed {
        if outcomes[i].is_some() {
            continue;
        }
        let call = stored.remove(&c.call_id).ok_or_else(|| {
            StorageError(format!("number {} is not the workspace's", c.number_id))
        })?;
        mark_applied(conn, c.idempotency.as_ref(), c.started_at).await?;
        let written = PlacedCallStart::Written {
            reserved_minor: c.slice_minor,
        };
        outcomes[i] = Some(Outcome::Placed(
            written,
            Some(Box::new((call, placed_entry(c)))),
        ));
    }
    Ok(())
}

// As `START_CALLS`, at the outbound rate, with what only a placed call has.
const PLACE_CALLS: &str = concat!(
    "INSERT INTO calls (id, workspace_id, number_id, direction, from_number, to_number, status, \
     sip_call_id, engine_id, started_at, currency, rate_per_min_minor, created_at, updated_at, \
     origin, client_request_id, voice_callback_url, events_url) \
     SELECT v.column1, v.column2, v.column3, 'outbound', v.column4, v.column5, 'ringing', \
     v.column6, v.column7, v.column8, t.currency, t.outbound_per_min_minor, v.column8, \
     v.column8, 'api', v.column9, v.column10, v.column11 \
     FROM (VALUES {values}) AS v \
     JOIN tenant_numbers t ON t.id = v.column3 AND t.workspace_id = v.column2 RETURNING ",
    call_cols!()
);

/// Insert admitted placed calls (`ringing`) and their first slices' reservations; returns the
/// rows written (a call whose number is not its workspace's is not among them).
pub(super) async fn insert_placed(
    conn: &mut AnyConnection,
    backend: Backend,
    calls: &[&NewPlacedCall],
) -> Result<Vec<CallRecord>, StorageError> {
    let mut out = Vec::with_capacity(calls.len());
    for chunk in pow2_chunks(calls, CHUNK) {
        let sql = PLACE_CALLS.replace("{values}", &value_rows(backend, chunk.len(), 11));
        // Safe: `sql` is a constant with placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for c in chunk {
            q = q
                .bind(c.call_id.clone())
                .bind(c.workspace_id.clone())
                .bind(c.number_id.clone())
                .bind(c.from.clone())
                .bind(c.to.clone())
                .bind(c.sip_call_id.clone())
                .bind(c.engine_id.clone())
                .bind(to_db(c.started_at))
                .bind(c.client_request_id.clone())
                .bind(c.voice_callback_url.clone())
                .bind(c.events_url.clone());
        }
        for row in q.fetch_all(&mut *conn).await.map_err(storage)? {
            out.push(call_from_row(&row)?);
        }
    }
    let reserved: Vec<&&NewPlacedCall> = calls.iter().filter(|c| c.slice_minor > 0).collect();
    for chunk in pow2_chunks(&reserved, CHUNK) {
        let sql = format!(
            "INSERT INTO call_reservations (call_id, workspace_id, amount_minor, created_at, \
             updated_at) VALUES {}",
            value_rows(backend, chunk.len(), 5)
        );
        // Safe: `sql` is built only from placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for c in chunk {
            let ts = to_db(c.started_at);
            q = q
                .bind(c.call_id.clone())
                .bind(c.workspace_id.clone())
                .bind(c.slice_minor)
                .bind(ts.clone())
                .bind(ts);
        }
        q.execute(&mut *conn).await.map_err(storage)?;
    }
    Ok(out)
}

/// Read and (PostgreSQL) lock the wallets of these workspaces, in id order so that concurrent
/// batches lock them in one order.
async fn lock_wallets(
    conn: &mut AnyConnection,
    backend: Backend,
    workspaces: &[&str],
) -> Result<BTreeMap<String, WalletDraft>, StorageError> {
    let mut out = BTreeMap::new();
    for chunk in pow2_chunks(workspaces, CHUNK) {
        // A no-op write: it locks the rows (PostgreSQL) so the balances read here are the ones
        // the debits apply to, even with other processes debiting the same wallets.
        let sql = format!(
            "UPDATE wallets SET updated_at = updated_at WHERE workspace_id IN {} \
             RETURNING workspace_id, balance_minor, currency, low_balance_threshold_minor, \
             low_balance_alerted",
            in_list(backend, chunk.len())
        );
        // Safe: `sql` is built only from placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for ws in chunk {
            q = q.bind(*ws);
        }
        for row in q.fetch_all(&mut *conn).await.map_err(storage)? {
            let alerted: i64 = get(&row, "low_balance_alerted")?;
            out.insert(
                get(&row, "workspace_id")?,
                WalletDraft {
                    balance: get(&row, "balance_minor")?,
                    currency: get(&row, "currency")?,
                    threshold: get(&row, "low_balance_threshold_minor")?,
                    alerted: alerted != 0,
                    debited: 0,
                    last_at: DateTime::<Utc>::MIN_UTC,
                },
            );
        }
    }
    Ok(out)
}

async fn write_wallets(
    conn: &mut AnyConnection,
    wallets: &BTreeMap<String, WalletDraft>,
) -> Result<(), StorageError> {
    for (ws, w) in wallets.iter().filter(|(_, w)| w.debited > 0) {
        let done = sqlx::query(
            "UPDATE wallets SET balance_minor = balance_minor - $1, low_balance_alerted = $2, \
             updated_at = $3 WHERE workspace_id = $4 AND balance_minor >= $1",
        )
        .bind(w.debited)
        .bind(i64::from(w.alerted))
        .bind(to_db(w.last_at))
        .bind(ws)
        .execute(&mut *conn)
        .await
        .map_err(storage)?
        .rows_affected();
        if done != 1 {
            return Err(StorageError(
                "wallet balance changed under its row lock".into(),
            ));
        }
    }
    Ok(())
}

/// A `call_charge` ledger row.
struct LedgerRow {
    id: String,
    workspace_id: String,
    amount: i64,
    balance_after: i64,
    currency: String,
    call_id: String,
    at: String,
}

async fn insert_ledger(
    conn: &mut AnyConnection,
    backend: Backend,
    rows: &[LedgerRow],
) -> Result<(), StorageError> {
    for chunk in pow2_chunks(rows, CHUNK) {
        let sql = format!(
            "INSERT INTO ledger_entries (id, workspace_id, kind, amount_minor, \
             balance_after_minor, currency, reference, created_at) VALUES {}",
            value_rows(backend, chunk.len(), 8)
        );
        // Safe: `sql` is built only from placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(r.id.clone())
                .bind(r.workspace_id.clone())
                .bind(LedgerKind::CallCharge.as_str())
                .bind(r.amount)
                .bind(r.balance_after)
                .bind(r.currency.clone())
                .bind(r.call_id.clone())
                .bind(r.at.clone());
        }
        q.execute(&mut *conn).await.map_err(storage)?;
    }
    Ok(())
}

async fn update_costs(
    conn: &mut AnyConnection,
    backend: Backend,
    rows: &[(String, i64, i64, i64)],
) -> Result<(), StorageError> {
    for chunk in pow2_chunks(rows, CHUNK) {
        let sql = format!(
            "UPDATE calls SET duration_seconds = v.column2, cost_minor = v.column3, \
             uncollected_minor = v.column4 FROM (VALUES {}) AS v WHERE calls.id = v.column1",
            value_rows(backend, chunk.len(), 4)
        );
        // Safe: `sql` is built only from placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (id, duration, cost, uncollected) in chunk {
            q = q
                .bind(id.clone())
                .bind(*duration)
                .bind(*cost)
                .bind(*uncollected);
        }
        q.execute(&mut *conn).await.map_err(storage)?;
    }
    Ok(())
}

/// Timeline rows of several calls, ids given in the order listed.
pub(super) async fn insert_timelines(
    conn: &mut AnyConnection,
    backend: Backend,
    entries: &[(&str, &TimelineEntry)],
) -> Result<(), StorageError> {
    for chunk in pow2_chunks(entries, CHUNK) {
        let sql = format!(
            "INSERT INTO call_timeline (id, call_id, at, kind, detail) VALUES {}",
            value_rows(backend, chunk.len(), 5)
        );
        // Safe: `sql` is built only from placeholders; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (call_id, e) in chunk {
            let detail = serde_json::to_string(&e.detail).map_err(storage)?;
            q = q
                .bind(new_id())
                .bind(call_id.to_string())
                .bind(to_db(e.at))
                .bind(e.kind.clone())
                .bind(detail);
        }
        q.execute(&mut *conn).await.map_err(storage)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(write: CallWrite) -> Pending {
        (write, oneshot::channel().0)
    }

    fn answer(id: &str) -> CallWrite {
        CallWrite::Answered(CallAnswered {
            call_id: id.into(),
            answered_at: Utc::now(),
            to: None,
            timeline: Vec::new(),
        })
    }

    fn end(id: &str) -> CallWrite {
        CallWrite::Ended(CallEnded {
            call_id: id.into(),
            status: CallStatus::Completed,
            ended_at: Utc::now(),
            hangup_cause: None,
            failure_reason: None,
            sip_status: None,
            timeline: Vec::new(),
        })
    }

    #[test]
    fn a_batch_applies_set_wise_when_each_call_moves_forward() {
        let applies_to =
            |writes: Vec<CallWrite>| applies(&writes.into_iter().map(pending).collect::<Vec<_>>());
        assert!(applies_to(vec![answer("a"), end("a"), answer("b")]));
        assert!(applies_to(vec![
            answer("a"),
            CallWrite::Timeline {
                call_id: "a".into(),
                entries: Vec::new()
            },
            end("a")
        ]));
        // Phases run start, answer, end: an end before its answer, or a kind twice, cannot.
        assert!(!applies_to(vec![end("a"), answer("a")]));
        assert!(!applies_to(vec![end("a"), end("a")]));
        assert!(!applies_to(vec![answer("a"), answer("a")]));
    }
}
