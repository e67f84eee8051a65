//! Rentals over a number's life (DESIGN §4): monthly renewals from the wallet, suspension when the
//! wallet cannot pay, reactivation by a later credit (oldest suspension first), and release after
//! `SAUTIKIT_SUSPENDED_RELEASE_DAYS` unpaid.
//!
//! Exactly once, whatever restarts or engines: a renewal is one transaction that debits the wallet,
//! writes a `number_rental` ledger row naming the number and the period, and moves the number's
//! `rental_period` on, conditionally on the period it read. The ledger's unique index on (number,
//! period) is the last line of defence. On PostgreSQL, engines take due numbers with
//! `FOR UPDATE SKIP LOCKED`, so each renewal is done by exactly one of them.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use sautikit_actors::model::{LedgerKind, TenantNumber};
use sautikit_actors::money;
use sautikit_actors::scheduler::{DueReport, DueWork};
use sautikit_actors::store::StorageError;
use serde_json::json;
use sqlx::AnyConnection;
use sqlx::any::AnyRow;
use tracing::{info, warn};

use crate::db::Backend;
use crate::sql::{in_list, pow2_chunks, value_rows};
use crate::store::{SqlStore, after_debit, after_release, get, storage, tenant_from_row};
use crate::time::{new_id, to_api, to_db};
use crate::webhooks::{EventDraft, enqueue_all};

/// Numbers renewed (or suspended) per transaction by `admin run-due`.
pub const DEFAULT_BATCH: usize = 500;

/// Per transaction in a serving engine on SQLite: short, so that call writes waiting for its one
/// writer never wait long behind a renewal batch (a call's writes may each wait out one).
pub const ENGINE_BATCH_SQLITE: usize = 50;

/// A serving engine on SQLite pauses half as long as each batch took: long enough for the call
/// writes that queued behind it to commit (they go in one group commit).
pub const ENGINE_PAUSE_RATIO_SQLITE: f32 = 0.5;

/// On PostgreSQL calls and renewals write side by side, but share the machine: a serving engine
/// renews in batches of 500 and rests a tenth of each batch's time, so that a month's renewals
/// do not take a whole core (and the WAL) from call setup. (Smaller batches cost more per
/// number: 250 took 1.7 times as long in all.)
pub const ENGINE_BATCH_POSTGRES: usize = 500;
pub const ENGINE_PAUSE_RATIO_POSTGRES: f32 = 0.1;

/// Ledger rows per multi-row INSERT (10 values each).
const LEDGER_CHUNK: usize = 64;

/// Rows per multi-row statement of a batch's other set-wise writes.
const SET_CHUNK: usize = 64;

/// How many times a batch that lost a deadlock is tried again before the run gives up (the next
/// tick tries again; nothing is half done).
const BATCH_ATTEMPTS: usize = 3;

/// What the scheduler needs besides the store.
#[derive(Clone)]
pub struct Renewals {
    pub store: SqlStore,
    /// A suspended number still unpaid this long is released.
    pub release_after: Duration,
    pub batch: usize,
    /// After each batch, pause this many times as long as it took (a serving engine leaves the
    /// database to calls between batches; `admin run-due` does not pause).
    pub pause_ratio: f32,
}

impl Renewals {
    pub fn new(store: SqlStore, release_after_days: u32) -> Self {
        Renewals {
            store,
            release_after: Duration::days(i64::from(release_after_days)),
            batch: DEFAULT_BATCH,
            pause_ratio: 0.0,
        }
    }

    /// As a serving engine's scheduler runs it: small batches with pauses between them, so that
    /// call writes never queue long behind one (SQLite has one writer) and renewals never take
    /// the machine from call setup (PostgreSQL).
    pub fn for_engine(store: SqlStore, release_after_days: u32) -> Self {
        let sqlite = store.db().backend == Backend::Sqlite;
        Renewals {
            batch: if sqlite {
                ENGINE_BATCH_SQLITE
            } else {
                ENGINE_BATCH_POSTGRES
            },
            pause_ratio: if sqlite {
                ENGINE_PAUSE_RATIO_SQLITE
            } else {
                ENGINE_PAUSE_RATIO_POSTGRES
            },
            ..Self::new(store, release_after_days)
        }
    }

    /// Everything due at `now`, batch by batch, calling `progress` after each committed batch.
    pub async fn run(
        &self,
        now: DateTime<Utc>,
        mut progress: impl FnMut(&DueReport),
    ) -> Result<DueReport, StorageError> {
        let mut total = DueReport::default();
        loop {
            let (report, taken) = self.retrying(|| self.renew_batch(now)).await?;
            self.after_commit(&report);
            total.absorb(report);
            progress(&total);
            if taken < self.batch {
                break;
            }
        }
        loop {
            let (report, taken) = self.retrying(|| self.release_batch(now)).await?;
            self.after_commit(&report);
            total.absorb(report);
            progress(&total);
            if taken < self.batch {
                break;
            }
        }
        Ok(total)
    }

    async fn retrying<F, Fut>(&self, mut batch: F) -> Result<(DueReport, usize), StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(DueReport, usize), StorageError>>,
    {
        let mut attempt = 1;
        loop {
            let began = std::time::Instant::now();
            let result = batch().await;
            if self.pause_ratio > 0.0 {
                tokio::time::sleep(began.elapsed().mul_f32(self.pause_ratio)).await;
            }
            match result {
                Err(e) if attempt < BATCH_ATTEMPTS => {
                    warn!(error = %e, attempt, "due-work batch failed; trying it again");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn after_commit(&self, report: &DueReport) {
        if report.is_empty() {
            return;
        }
        self.store.events_committed();
        let gone: HashSet<&str> = report.changed_numbers.iter().map(String::as_str).collect();
        self.store.logins().forget_numbers(&gone);
    }

    /// One batch of numbers whose renewal is due: each is renewed if its wallet can pay, in due
    /// order, and suspended otherwise. Returns what was done and how many numbers were taken.
    async fn renew_batch(&self, now: DateTime<Utc>) -> Result<(DueReport, usize), StorageError> {
        let db = self.store.db();
        let backend = db.backend;
        let mut tx = db.begin_write().await.map_err(storage)?;
        let sql = format!(
            "SELECT {} FROM tenant_numbers WHERE status = 'active' AND next_renewal_at <= $1 \
             ORDER BY next_renewal_at, id LIMIT $2{}",
            crate::store::TENANT_COLS,
            lock_suffix(backend)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(to_db(now))
            .bind(self.batch as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?;
        let taken = rows.len();
        if taken == 0 {
            tx.rollback().await.map_err(storage)?;
            return Ok((DueReport::default(), 0));
        }
        let mut by_workspace: BTreeMap<String, Vec<TenantNumber>> = BTreeMap::new();
        for row in &rows {
            let n = tenant_from_row(row)?;
            by_workspace
                .entry(n.workspace_id.clone())
                .or_default()
                .push(n);
        }
        let mut plan = Plan::default();
        let workspaces: Vec<&str> = by_workspace.keys().map(String::as_str).collect();
        let wallets = lock_wallets(&mut tx, backend, &workspaces).await?;
        for (workspace_id, numbers) in &by_workspace {
            let wallet = wallets
                .get(workspace_id)
                .ok_or_else(|| StorageError(format!("workspace {workspace_id} has no wallet")))?;
            let mut balance = wallet.balance;
            for n in numbers {
                if n.currency == wallet.currency && money::can_pay(balance, n.monthly_price_minor) {
                    balance -= n.monthly_price_minor;
                    plan.renew(n, n.rental_period + 1, balance, Paid::Renewed);
                } else {
                    plan.suspend(n, balance, now, self.release_after);
                }
            }
        }
        let report = plan.write(&mut tx, backend, now).await?;
        tx.commit().await.map_err(storage)?;
        if !report.is_empty() {
            info!(
                renewed = report.renewed,
                suspended = report.suspended,
                "renewals committed"
            );
        }
        Ok((report, taken))
    }

    /// One batch of suspended numbers unpaid for `release_after`: released to the inventory.
    async fn release_batch(&self, now: DateTime<Utc>) -> Result<(DueReport, usize), StorageError> {
        let db = self.store.db();
        let backend = db.backend;
        let mut tx = db.begin_write().await.map_err(storage)?;
        let sql = format!(
            "SELECT id FROM tenant_numbers WHERE status = 'suspended' AND suspended_at <= $1 \
             ORDER BY suspended_at, id LIMIT $2{}",
            lock_suffix(backend)
        );
        let ids: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(to_db(now - self.release_after))
            .bind(self.batch as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(storage)?
            .iter()
            .map(|r| get(r, "id"))
            .collect::<Result<_, _>>()?;
        let taken = ids.len();
        let mut report = DueReport::default();
        let ts = to_db(now);
        for id in ids {
            let sql = format!(
                "UPDATE tenant_numbers SET status = 'released', released_at = $1, updated_at = $1 \
                 WHERE id = $2 AND status = 'suspended' RETURNING {}",
                crate::store::TENANT_COLS
            );
            let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&ts)
                .bind(&id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(storage)?
            else {
                continue;
            };
            let number = tenant_from_row(&row)?;
            after_release(&mut tx, &number, "unpaid", now).await?;
            info!(number_id = %number.id, workspace_id = %number.workspace_id,
                "suspended number released unpaid");
            report.released += 1;
            report.changed_numbers.push(number.id);
        }
        tx.commit().await.map_err(storage)?;
        Ok((report, taken))
    }
}

#[async_trait::async_trait]
impl DueWork for Renewals {
    async fn run_due(&self, now: DateTime<Utc>) -> Result<DueReport, StorageError> {
        self.run(now, |_| {}).await
    }
}

/// In the caller's credit transaction: renew the workspace's suspended numbers that `balance`
/// can pay, oldest suspension first, stopping at the first it cannot (a later one never jumps
/// the queue). Each pays the period running at `now` (months it spent suspended are not
/// charged). Returns the numbers reactivated and the balance after them.
pub(crate) async fn reactivate(
    tx: &mut AnyConnection,
    backend: Backend,
    workspace_id: &str,
    currency: &str,
    balance: i64,
    now: DateTime<Utc>,
) -> Result<(Vec<TenantNumber>, i64), StorageError> {
    let sql = format!(
        "SELECT {} FROM tenant_numbers WHERE workspace_id = $1 AND status = 'suspended' \
         ORDER BY suspended_at, created_at, id{}",
        crate::store::TENANT_COLS,
        lock_suffix_waiting(backend)
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workspace_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(storage)?;
    let mut plan = Plan::default();
    let mut left = balance;
    for row in &rows {
        let n = tenant_from_row(row)?;
        if n.currency != currency || !money::can_pay(left, n.monthly_price_minor) {
            break;
        }
        left -= n.monthly_price_minor;
        let period = money::period_to_pay(n.created_at, n.rental_period, now);
        plan.renew(&n, period, left, Paid::Reactivated);
    }
    if plan.renewals.is_empty() {
        return Ok((Vec::new(), balance));
    }
    // The wallet row is already locked by the credit.
    plan.write(tx, backend, now).await?;
    let mut out = Vec::with_capacity(plan.renewals.len());
    for r in plan.renewals {
        let mut n = r.number;
        n.status = sautikit_actors::model::NumberStatus::Active;
        n.rental_period = r.period;
        n.next_renewal_at = r.period_end;
        n.suspended_at = None;
        n.updated_at = now;
        out.push(n);
    }
    Ok((out, left))
}

/// `FOR UPDATE SKIP LOCKED` on PostgreSQL: another engine's batch has these rows; this one takes
/// the next. SQLite has one writer at a time and needs nothing.
fn lock_suffix(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
    }
}

fn lock_suffix_waiting(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE",
    }
}

struct LockedWallet {
    balance: i64,
    currency: String,
}

/// The wallets of `workspace_ids` (sorted), locked in that order, so two engines never wait on
/// each other in a cycle.
async fn lock_wallets(
    tx: &mut AnyConnection,
    backend: Backend,
    workspace_ids: &[&str],
) -> Result<BTreeMap<String, LockedWallet>, StorageError> {
    let mut out = BTreeMap::new();
    for chunk in pow2_chunks(workspace_ids, SET_CHUNK) {
        let sql = format!(
            "SELECT workspace_id, balance_minor, currency FROM wallets WHERE workspace_id IN {} \
             ORDER BY workspace_id{}",
            in_list(backend, chunk.len()),
            lock_suffix_waiting(backend)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(*id);
        }
        for row in q.fetch_all(&mut *tx).await.map_err(storage)? {
            out.insert(
                get::<String>(&row, "workspace_id")?,
                LockedWallet {
                    balance: get(&row, "balance_minor")?,
                    currency: get(&row, "currency")?,
                },
            );
        }
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Paid {
    Renewed,
    Reactivated,
}

struct Renewal {
    number: TenantNumber,
    period: i64,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    balance_after: i64,
    ledger_id: String,
    paid: Paid,
}

struct Suspension {
    number: TenantNumber,
    balance: i64,
    release_at: DateTime<Utc>,
}

/// What a batch will write, decided in memory before the first write.
#[derive(Default)]
struct Plan {
    renewals: Vec<Renewal>,
    suspensions: Vec<Suspension>,
}

impl Plan {
    fn renew(&mut self, n: &TenantNumber, period: i64, balance_after: i64, paid: Paid) {
        self.renewals.push(Renewal {
            number: n.clone(),
            period,
            period_start: money::rental_period_start(n.created_at, period),
            period_end: money::rental_period_start(n.created_at, period + 1),
            balance_after,
            ledger_id: new_id(),
            paid,
        });
    }

    fn suspend(
        &mut self,
        n: &TenantNumber,
        balance: i64,
        now: DateTime<Utc>,
        release_after: Duration,
    ) {
        self.suspensions.push(Suspension {
            number: n.clone(),
            balance,
            release_at: now + release_after,
        });
    }

    async fn write(
        &self,
        tx: &mut AnyConnection,
        backend: Backend,
        now: DateTime<Utc>,
    ) -> Result<DueReport, StorageError> {
        let ts = to_db(now);
        let mut report = DueReport::default();
        let mut events = Vec::with_capacity(self.renewals.len() + self.suspensions.len());
        for r in &self.renewals {
            let n = &r.number;
            let (kind, status_before) = match r.paid {
                Paid::Renewed => ("number.renewed", "active"),
                Paid::Reactivated => ("number.reactivated", "suspended"),
            };
            events.push((
                EventDraft::for_number(
                    n,
                    kind,
                    json!({
                        "number_id": n.id,
                        "number": n.number,
                        "status": "active",
                        "previous_status": status_before,
                        "amount_minor": n.monthly_price_minor,
                        "currency": n.currency,
                        "period_start": to_api(r.period_start),
                        "period_end": to_api(r.period_end),
                        "next_renewal_at": to_api(r.period_end),
                        "balance_minor": r.balance_after,
                        "ledger_entry_id": r.ledger_id,
                    }),
                ),
                now,
            ));
            report.renewed += 1;
            if r.paid == Paid::Reactivated {
                report.changed_numbers.push(n.id.clone());
            }
        }
        for s in &self.suspensions {
            let n = &s.number;
            let done = sqlx::query(
                "UPDATE tenant_numbers SET status = 'suspended', suspended_at = $1, updated_at = $1 \
                 WHERE id = $2 AND rental_period = $3 AND status = 'active'",
            )
            .bind(&ts)
            .bind(&n.id)
            .bind(n.rental_period)
            .execute(&mut *tx)
            .await
            .map_err(storage)?
            .rows_affected();
            if done != 1 {
                return Err(StorageError(format!(
                    "number {} changed while its suspension was written",
                    n.id
                )));
            }
            info!(number_id = %n.id, workspace_id = %n.workspace_id,
                amount_due_minor = n.monthly_price_minor, "renewal unpaid: number suspended");
            events.push((
                EventDraft::for_number(
                    n,
                    "number.suspended",
                    json!({
                        "number_id": n.id,
                        "number": n.number,
                        "status": "suspended",
                        "reason": "insufficient_funds",
                        "amount_due_minor": n.monthly_price_minor,
                        "currency": n.currency,
                        "balance_minor": s.balance,
                        "due_at": to_api(n.next_renewal_at),
                        "release_at": to_api(s.release_at),
                    }),
                ),
                now,
            ));
            report.suspended += 1;
            report.changed_numbers.push(n.id.clone());
        }
        self.advance_numbers(tx, backend, &ts).await?;
        self.debit_wallets(tx, backend, now).await?;
        self.insert_ledger(tx, backend, &ts).await?;
        enqueue_all(tx, backend, &events).await?;
        Ok(report)
    }

    /// Moves each renewed number to its next period, conditionally on the period and status it
    /// was read with: a multi-row `UPDATE … FROM (VALUES …)` per chunk.
    async fn advance_numbers(
        &self,
        tx: &mut AnyConnection,
        backend: Backend,
        ts: &str,
    ) -> Result<(), StorageError> {
        for chunk in pow2_chunks(&self.renewals, SET_CHUNK) {
            let sql = format!(
                "UPDATE tenant_numbers SET status = 'active', suspended_at = NULL, \
                   rental_period = v.column2, next_renewal_at = v.column3, updated_at = v.column4 \
                 FROM (VALUES {}) AS v \
                 WHERE tenant_numbers.id = v.column1 AND tenant_numbers.rental_period = v.column5 \
                   AND tenant_numbers.status = v.column6",
                value_rows(backend, chunk.len(), 6)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                let from_status = match r.paid {
                    Paid::Renewed => "active",
                    Paid::Reactivated => "suspended",
                };
                q = q
                    .bind(r.number.id.clone())
                    .bind(r.period)
                    .bind(to_db(r.period_end))
                    .bind(ts.to_owned())
                    .bind(r.number.rental_period)
                    .bind(from_status);
            }
            let done = q.execute(&mut *tx).await.map_err(storage)?.rows_affected();
            if done != chunk.len() as u64 {
                return Err(StorageError(format!(
                    "{} of {} numbers changed while their renewals were written",
                    chunk.len() as u64 - done,
                    chunk.len()
                )));
            }
        }
        Ok(())
    }

    /// One debit per wallet for all its renewals, each conditional on the balance it needs: a
    /// multi-row `UPDATE … FROM (VALUES …)` per chunk of wallets.
    async fn debit_wallets(
        &self,
        tx: &mut AnyConnection,
        backend: Backend,
        now: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        let mut totals: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for r in &self.renewals {
            *totals
                .entry((&r.number.workspace_id, &r.number.currency))
                .or_default() += r.number.monthly_price_minor;
        }
        let debits: Vec<((&str, &str), i64)> = totals
            .into_iter()
            .filter(|(_, total)| *total != 0)
            .collect();
        let ts = to_db(now);
        for chunk in pow2_chunks(&debits, SET_CHUNK) {
            let sql = format!(
                "UPDATE wallets SET balance_minor = balance_minor - v.column1, updated_at = v.column2 \
                 FROM (VALUES {}) AS v \
                 WHERE wallets.workspace_id = v.column3 AND wallets.currency = v.column4 \
                   AND wallets.balance_minor >= v.column1 \
                 RETURNING workspace_id, currency, balance_minor, low_balance_threshold_minor, \
                   low_balance_alerted",
                value_rows(backend, chunk.len(), 4)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for ((workspace_id, currency), total) in chunk {
                q = q
                    .bind(*total)
                    .bind(ts.clone())
                    .bind(workspace_id.to_string())
                    .bind(currency.to_string());
            }
            let rows: Vec<AnyRow> = q.fetch_all(&mut *tx).await.map_err(storage)?;
            if rows.len() != chunk.len() {
                return Err(StorageError(
                    "wallet balance changed under its row lock".into(),
                ));
            }
            for row in &rows {
                let workspace_id: String = get(row, "workspace_id")?;
                let currency: String = get(row, "currency")?;
                after_debit(tx, &workspace_id, row, &currency, now).await?;
            }
        }
        Ok(())
    }

    async fn insert_ledger(
        &self,
        tx: &mut AnyConnection,
        backend: Backend,
        ts: &str,
    ) -> Result<(), StorageError> {
        for chunk in pow2_chunks(&self.renewals, LEDGER_CHUNK) {
            let sql = format!(
                "INSERT INTO ledger_entries (id, workspace_id, kind, amount_minor, \
                 balance_after_minor, currency, reference, created_at, period_start, period_end) \
                 VALUES {}",
                value_rows(backend, chunk.len(), 10)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.ledger_id.clone())
                    .bind(r.number.workspace_id.clone())
                    .bind(LedgerKind::NumberRental.as_str())
                    .bind(-r.number.monthly_price_minor)
                    .bind(r.balance_after)
                    .bind(r.number.currency.clone())
                    .bind(r.number.id.clone())
                    .bind(ts.to_owned())
                    .bind(to_db(r.period_start))
                    .bind(to_db(r.period_end));
            }
            q.execute(&mut *tx).await.map_err(storage)?;
        }
        Ok(())
    }
}
