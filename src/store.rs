//! Persistence with sqlx. Each public method is one transaction; money and ownership changes use
//! conditional SQL (`WHERE status = 'available'`, `WHERE balance_minor >= $n`) so that they stay
//! correct when several processes share one PostgreSQL database (DESIGN §2, §4).

use std::fmt::Display;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sautikit_actors::model::{LedgerEntry, LedgerKind, NumberStatus, TenantNumber};
use sautikit_actors::money::{self, MAX_BALANCE_MINOR};
use sautikit_actors::store::{
    ClaimError, ClaimNumber, CreditWallet, Credited, ReleaseError, ReleaseNumber, StorageError,
    Store, WalletError,
};
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use thiserror::Error;
use tokio::sync::Notify;

use crate::db::Db;
use crate::idempotency::{mark_applied, request_key};
use crate::secrets::{self, StoredSipSecret};
use crate::time::{from_db, new_id, to_api, to_db};
use crate::webhooks::{EventDraft, enqueue};

pub(crate) fn storage(e: impl Display) -> StorageError {
    StorageError(e.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

async fn drop_credential_registrations(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    credential_id: &str,
) -> Result<(), StorageError> {
    sqlx::query("DELETE FROM sip_registrations WHERE credential_id = $1")
        .bind(credential_id)
        .execute(&mut **tx)
        .await
        .map_err(storage)?;
    Ok(())
}

pub(crate) fn get<'r, T>(row: &'r AnyRow, col: &str) -> Result<T, StorageError>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get::<T, _>(col).map_err(storage)
}

pub(crate) fn get_time(row: &AnyRow, col: &str) -> Result<DateTime<Utc>, StorageError> {
    let s: String = get(row, col)?;
    from_db(&s).map_err(|e| StorageError(format!("bad timestamp in {col}: {e}")))
}

pub(crate) fn get_opt_time(row: &AnyRow, col: &str) -> Result<Option<DateTime<Utc>>, StorageError> {
    let s: Option<String> = get(row, col)?;
    s.map(|s| from_db(&s).map_err(|e| StorageError(format!("bad timestamp in {col}: {e}"))))
        .transpose()
}

fn split_caps(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Records only the service reads.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryNumber {
    pub id: String,
    pub number: String,
    pub country: String,
    pub capabilities: Vec<String>,
    pub monthly_price_minor: i64,
    pub inbound_per_min_minor: i64,
    pub outbound_per_min_minor: i64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wallet {
    pub workspace_id: String,
    pub balance_minor: i64,
    pub currency: String,
    pub low_balance_threshold_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipCredential {
    pub id: String,
    pub workspace_id: String,
    pub number_id: String,
    pub label: String,
    pub username: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct NewWorkspace {
    pub workspace_id: String,
    pub api_key: String,
    pub webhook_secret: String,
}

#[derive(Debug, Clone)]
pub struct SeedInventory {
    pub country: String,
    pub currency: String,
    pub count: u64,
    /// First number, digits only (E.164 without `+`).
    pub start: u64,
    pub monthly_price_minor: i64,
    pub inbound_per_min_minor: i64,
    pub outbound_per_min_minor: i64,
    /// Dev seeding uses the guide's ids (`01900000-0000-7000-8000-<12-digit index>`) so the
    /// guide's claim command works verbatim.
    pub guide_ids: bool,
}

#[derive(Debug, Clone, Default)]
pub struct InventoryFilter {
    pub country: Option<String>,
    pub currency: Option<String>,
    pub capability: Option<String>,
    /// Digits the number must contain.
    pub contains: Option<String>,
    /// Numbers strictly after this one (the cursor).
    pub after_number: Option<String>,
    pub limit: i64,
}

/// A routing change: `None` leaves a URL as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct RoutingChange {
    pub voice_callback_url: Option<Option<String>>,
    pub events_url: Option<Option<String>>,
}

#[derive(Debug, Error)]
pub enum NumberError {
    #[error("number not found")]
    NotFound,
    #[error("number has been released")]
    Released,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug, Error)]
pub enum CredentialError {
    #[error("number not found")]
    NumberNotFound,
    #[error("number has been released")]
    NumberReleased,
    #[error("credential not found")]
    NotFound,
    #[error("credential has been revoked")]
    Revoked,
    #[error("username already taken")]
    UsernameTaken,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

// ---------------------------------------------------------------------------------------------

macro_rules! tenant_cols {
    () => {
        "id, workspace_id, inventory_id, number, status, capabilities, currency, \
         monthly_price_minor, inbound_per_min_minor, outbound_per_min_minor, voice_callback_url, \
         events_url, next_renewal_at, created_at, updated_at, released_at, rental_period, \
         suspended_at"
    };
}
/// [`tenant_cols!`] for queries assembled at run time.
pub(crate) const TENANT_COLS: &str = tenant_cols!();

macro_rules! inventory_cols {
    () => {
        "id, number, country, capabilities, monthly_price_minor, inbound_per_min_minor, \
         outbound_per_min_minor, currency"
    };
}
macro_rules! ledger_cols {
    () => {
        "id, workspace_id, kind, amount_minor, balance_after_minor, currency, reference, created_at, \
         period_start, period_end"
    };
}
macro_rules! credential_cols {
    () => {
        "id, workspace_id, number_id, label, username, status, created_at, updated_at, revoked_at"
    };
}

pub(crate) fn tenant_from_row(row: &AnyRow) -> Result<TenantNumber, StorageError> {
    let status: String = get(row, "status")?;
    let caps: String = get(row, "capabilities")?;
    Ok(TenantNumber {
        id: get(row, "id")?,
        workspace_id: get(row, "workspace_id")?,
        inventory_id: get(row, "inventory_id")?,
        number: get(row, "number")?,
        status: NumberStatus::parse(&status)
            .ok_or_else(|| StorageError(format!("unknown number status {status:?}")))?,
        capabilities: split_caps(&caps),
        currency: get(row, "currency")?,
        monthly_price_minor: get(row, "monthly_price_minor")?,
        inbound_per_min_minor: get(row, "inbound_per_min_minor")?,
        outbound_per_min_minor: get(row, "outbound_per_min_minor")?,
        voice_callback_url: get(row, "voice_callback_url")?,
        events_url: get(row, "events_url")?,
        next_renewal_at: get_time(row, "next_renewal_at")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
        released_at: get_opt_time(row, "released_at")?,
        rental_period: get(row, "rental_period")?,
        suspended_at: get_opt_time(row, "suspended_at")?,
    })
}

fn inventory_from_row(row: &AnyRow) -> Result<InventoryNumber, StorageError> {
    let caps: String = get(row, "capabilities")?;
    Ok(InventoryNumber {
        id: get(row, "id")?,
        number: get(row, "number")?,
        country: get(row, "country")?,
        capabilities: split_caps(&caps),
        monthly_price_minor: get(row, "monthly_price_minor")?,
        inbound_per_min_minor: get(row, "inbound_per_min_minor")?,
        outbound_per_min_minor: get(row, "outbound_per_min_minor")?,
        currency: get(row, "currency")?,
    })
}

fn ledger_from_row(row: &AnyRow) -> Result<LedgerEntry, StorageError> {
    let kind: String = get(row, "kind")?;
    Ok(LedgerEntry {
        id: get(row, "id")?,
        workspace_id: get(row, "workspace_id")?,
        kind: LedgerKind::parse(&kind)
            .ok_or_else(|| StorageError(format!("unknown ledger kind {kind:?}")))?,
        amount_minor: get(row, "amount_minor")?,
        balance_after_minor: get(row, "balance_after_minor")?,
        currency: get(row, "currency")?,
        reference: get(row, "reference")?,
        created_at: get_time(row, "created_at")?,
        period: match (
            get_opt_time(row, "period_start")?,
            get_opt_time(row, "period_end")?,
        ) {
            (Some(s), Some(e)) => Some((s, e)),
            _ => None,
        },
    })
}

fn credential_from_row(row: &AnyRow) -> Result<SipCredential, StorageError> {
    Ok(SipCredential {
        id: get(row, "id")?,
        workspace_id: get(row, "workspace_id")?,
        number_id: get(row, "number_id")?,
        label: get(row, "label")?,
        username: get(row, "username")?,
        status: get(row, "status")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
        revoked_at: get_opt_time(row, "revoked_at")?,
    })
}

/// A bind value for queries assembled from static fragments.
enum Arg {
    Text(String),
    Int(i64),
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::Int(i) => q.bind(i),
        };
    }
    q
}

#[derive(Clone)]
pub struct SqlStore {
    db: Db,
    /// Signalled after a commit that wrote events, so the Events actor looks at once.
    pub committed: Arc<Notify>,
    /// Group commit of call writes, started on first use.
    pub(crate) call_writer: Arc<std::sync::OnceLock<crate::calls_store::CallWriter>>,
    /// Group commit of REGISTERs, started on first use.
    pub(crate) register_writer: Arc<std::sync::OnceLock<crate::registrations::RegisterWriter>>,
    /// The registrar's lookups by username, dropped here on rotation, revocation and release.
    pub(crate) login_cache: Arc<crate::registrations::LoginCache>,
    /// Public URL and data directory for recordings, set by `serve` (see `recordings.rs`).
    pub(crate) recordings: Arc<std::sync::OnceLock<crate::recordings::RecordingsConfig>>,
    /// What this process's Events actor holds of the outbox (`webhooks::outbox`).
    pub(crate) leases: Arc<crate::webhooks::outbox::LocalLeases>,
}

impl SqlStore {
    pub fn new(db: Db) -> Self {
        SqlStore {
            db,
            committed: Arc::new(Notify::new()),
            call_writer: Arc::default(),
            register_writer: Arc::default(),
            login_cache: Arc::default(),
            recordings: Arc::default(),
            leases: Arc::default(),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Tell the Events actor that events were committed (it coalesces bursts).
    pub(crate) fn events_committed(&self) {
        self.committed.notify_one();
    }

    // --- workspaces and keys --------------------------------------------------------------

    pub async fn create_workspace(
        &self,
        name: &str,
        currency: &str,
        credit_minor: i64,
        now: DateTime<Utc>,
    ) -> Result<NewWorkspace, StorageError> {
        let workspace_id = new_id();
        let api_key = secrets::new_api_key();
        let webhook_secret = secrets::new_webhook_secret();
        let ts = to_db(now);
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        sqlx::query(
            "INSERT INTO workspaces (id, name, webhook_secret, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&workspace_id)
        .bind(name)
        .bind(&webhook_secret)
        .bind(&ts)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        sqlx::query(
            "INSERT INTO wallets (workspace_id, currency, balance_minor, updated_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&workspace_id)
        .bind(currency)
        .bind(credit_minor)
        .bind(&ts)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        if credit_minor > 0 {
            sqlx::query(
                "INSERT INTO ledger_entries (id, workspace_id, kind, amount_minor, \
                 balance_after_minor, currency, reference, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(new_id())
            .bind(&workspace_id)
            .bind(LedgerKind::Credit.as_str())
            .bind(credit_minor)
            .bind(credit_minor)
            .bind(currency)
            .bind("workspace.created")
            .bind(&ts)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        }
        sqlx::query(
            "INSERT INTO api_keys (id, workspace_id, key_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(new_id())
        .bind(&workspace_id)
        .bind(secrets::hash_api_key(&api_key))
        .bind(&ts)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        tx.commit().await.map_err(storage)?;
        Ok(NewWorkspace {
            workspace_id,
            api_key,
            webhook_secret,
        })
    }

    /// The workspace an API key (by its SHA-256) belongs to.
    pub async fn workspace_for_key_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<String>, StorageError> {
        let row = sqlx::query(
            "SELECT workspace_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.db.read)
        .await
        .map_err(storage)?;
        row.map(|r| get(&r, "workspace_id")).transpose()
    }

    pub async fn workspace_exists(&self, workspace_id: &str) -> Result<bool, StorageError> {
        let row = sqlx::query("SELECT id FROM workspaces WHERE id = $1")
            .bind(workspace_id)
            .fetch_optional(&self.db.read)
            .await
            .map_err(storage)?;
        Ok(row.is_some())
    }

    // --- inventory ------------------------------------------------------------------------

    pub async fn inventory_count(&self) -> Result<i64, StorageError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM inventory_numbers")
            .fetch_one(&self.db.read)
            .await
            .map_err(storage)?;
        get(&row, "n")
    }

    /// Insert `count` consecutive numbers; numbers already present are left alone.
    pub async fn seed_inventory(
        &self,
        seed: &SeedInventory,
        now: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        let ts = to_db(now);
        let mut inserted = 0;
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        for i in 0..seed.count {
            let id = if seed.guide_ids {
                format!("01900000-0000-7000-8000-{:012}", i + 1)
            } else {
                new_id()
            };
            let number = format!("+{}", seed.start + i);
            let r = sqlx::query(
                "INSERT INTO inventory_numbers (id, number, country, capabilities, \
                 monthly_price_minor, inbound_per_min_minor, outbound_per_min_minor, currency, \
                 status, created_at) VALUES ($1, $2, $3, 'voice', $4, $5, $6, $7, 'available', $8) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(number)
            .bind(&seed.country)
            .bind(seed.monthly_price_minor)
            .bind(seed.inbound_per_min_minor)
            .bind(seed.outbound_per_min_minor)
            .bind(&seed.currency)
            .bind(&ts)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
            inserted += r.rows_affected();
        }
        tx.commit().await.map_err(storage)?;
        Ok(inserted)
    }

    pub async fn list_available(
        &self,
        f: &InventoryFilter,
    ) -> Result<Vec<InventoryNumber>, StorageError> {
        let mut sql = String::from(concat!(
            "SELECT ",
            inventory_cols!(),
            " FROM inventory_numbers WHERE status = 'available'"
        ));
        let mut args = Vec::new();
        let mut push = |clause: &str, arg: Arg, sql: &mut String| {
            args.push(arg);
            sql.push_str(&clause.replace("$?", &format!("${}", args.len())));
        };
        if let Some(c) = &f.country {
            push(" AND country = $?", Arg::Text(c.clone()), &mut sql);
        }
        if let Some(c) = &f.currency {
            push(" AND currency = $?", Arg::Text(c.clone()), &mut sql);
        }
        if let Some(c) = &f.capability {
            push(
                " AND (',' || capabilities || ',') LIKE $?",
                Arg::Text(format!("%,{c},%")),
                &mut sql,
            );
        }
        if let Some(d) = &f.contains {
            push(" AND number LIKE $?", Arg::Text(format!("%{d}%")), &mut sql);
        }
        if let Some(n) = &f.after_number {
            push(" AND number > $?", Arg::Text(n.clone()), &mut sql);
        }
        push(" ORDER BY number LIMIT $?", Arg::Int(f.limit), &mut sql);
        // Safe: `sql` is built only from the static fragments above; values are bound.
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), args)
            .fetch_all(&self.db.read)
            .await
            .map_err(storage)?;
        rows.iter().map(inventory_from_row).collect()
    }

    // --- tenant numbers -------------------------------------------------------------------

    pub async fn list_numbers(
        &self,
        workspace_id: &str,
        status: Option<NumberStatus>,
        before_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TenantNumber>, StorageError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            tenant_cols!(),
            " FROM tenant_numbers WHERE workspace_id = $1 AND ($2 IS NULL OR status = $2) \
              AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        ))
        .bind(workspace_id)
        .bind(status.map(NumberStatus::as_str))
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.db.read)
        .await
        .map_err(storage)?;
        rows.iter().map(tenant_from_row).collect()
    }

    pub async fn get_number(
        &self,
        workspace_id: &str,
        number_id: &str,
    ) -> Result<Option<TenantNumber>, StorageError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            tenant_cols!(),
            " FROM tenant_numbers WHERE id = $1 AND workspace_id = $2"
        ))
        .bind(number_id)
        .bind(workspace_id)
        .fetch_optional(&self.db.read)
        .await
        .map_err(storage)?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    pub async fn update_routing(
        &self,
        workspace_id: &str,
        number_id: &str,
        change: &RoutingChange,
        now: DateTime<Utc>,
    ) -> Result<TenantNumber, NumberError> {
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        let row =
            sqlx::query("SELECT status FROM tenant_numbers WHERE id = $1 AND workspace_id = $2")
                .bind(number_id)
                .bind(workspace_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(storage)?;
        let Some(row) = row else {
            return Err(NumberError::NotFound);
        };
        let status: String = get(&row, "status")?;
        if status == NumberStatus::Released.as_str() {
            return Err(NumberError::Released);
        }
        // Each URL is either kept (`$n` flag 0) or replaced by its bound value (flag 1).
        let (set_voice, voice) = match &change.voice_callback_url {
            None => (0i64, None),
            Some(v) => (1, v.clone()),
        };
        let (set_events, events) = match &change.events_url {
            None => (0i64, None),
            Some(v) => (1, v.clone()),
        };
        let updated = sqlx::query(concat!(
            "UPDATE tenant_numbers SET \
               voice_callback_url = CASE WHEN $1 = 1 THEN $2 ELSE voice_callback_url END, \
               events_url = CASE WHEN $3 = 1 THEN $4 ELSE events_url END, \
               updated_at = $5 \
             WHERE id = $6 AND workspace_id = $7 AND status <> 'released' RETURNING ",
            tenant_cols!()
        ))
        .bind(set_voice)
        .bind(voice)
        .bind(set_events)
        .bind(events)
        .bind(to_db(now))
        .bind(number_id)
        .bind(workspace_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(storage)?;
        let Some(updated) = updated else {
            return Err(NumberError::Released);
        };
        let number = tenant_from_row(&updated)?;
        tx.commit().await.map_err(storage)?;
        Ok(number)
    }

    // --- SIP credentials ------------------------------------------------------------------

    async fn live_number_check(
        &self,
        workspace_id: &str,
        number_id: &str,
    ) -> Result<(), CredentialError> {
        match self.get_number(workspace_id, number_id).await? {
            None => Err(CredentialError::NumberNotFound),
            Some(n) if n.status == NumberStatus::Released => Err(CredentialError::NumberReleased),
            Some(_) => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create_sip_credential(
        &self,
        id: &str,
        workspace_id: &str,
        number_id: &str,
        label: &str,
        username: &str,
        secret: &StoredSipSecret,
        now: DateTime<Utc>,
    ) -> Result<SipCredential, CredentialError> {
        let ts = to_db(now);
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        // Conditional on the number being live, in the same statement: a concurrent release
        // cannot leave an active credential on a released number.
        let r = sqlx::query(
            "INSERT INTO sip_credentials (id, workspace_id, number_id, label, username, \
             password_hash, ha1_md5, ha1_sha256, status, created_at, updated_at) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, 'active', $9, $9 FROM tenant_numbers \
             WHERE id = $3 AND workspace_id = $2 AND status <> 'released'",
        )
        .bind(id)
        .bind(workspace_id)
        .bind(number_id)
        .bind(label)
        .bind(username)
        .bind(&secret.password_hash)
        .bind(&secret.ha1_md5)
        .bind(&secret.ha1_sha256)
        .bind(&ts)
        .execute(&mut *tx)
        .await;
        match r {
            Ok(r) if r.rows_affected() == 1 => {}
            Ok(_) => {
                tx.rollback().await.map_err(storage)?;
                self.live_number_check(workspace_id, number_id).await?;
                return Err(CredentialError::NumberNotFound);
            }
            Err(e) if is_unique_violation(&e) => return Err(CredentialError::UsernameTaken),
            Err(e) => return Err(storage(e).into()),
        }
        mark_applied(&mut tx, request_key().as_ref(), now).await?;
        tx.commit().await.map_err(storage)?;
        self.get_sip_credential(workspace_id, number_id, id)
            .await?
            .ok_or(CredentialError::NotFound)
    }

    pub async fn get_sip_credential(
        &self,
        workspace_id: &str,
        number_id: &str,
        credential_id: &str,
    ) -> Result<Option<SipCredential>, StorageError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            credential_cols!(),
            " FROM sip_credentials WHERE id = $1 AND number_id = $2 AND workspace_id = $3"
        ))
        .bind(credential_id)
        .bind(number_id)
        .bind(workspace_id)
        .fetch_optional(&self.db.write)
        .await
        .map_err(storage)?;
        row.as_ref().map(credential_from_row).transpose()
    }

    pub async fn list_sip_credentials(
        &self,
        workspace_id: &str,
        number_id: &str,
        before_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SipCredential>, CredentialError> {
        if self.get_number(workspace_id, number_id).await?.is_none() {
            return Err(CredentialError::NumberNotFound);
        }
        let rows = sqlx::query(concat!(
            "SELECT ",
            credential_cols!(),
            " FROM sip_credentials WHERE number_id = $1 AND workspace_id = $2 \
              AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        ))
        .bind(number_id)
        .bind(workspace_id)
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.db.read)
        .await
        .map_err(storage)?;
        Ok(rows
            .iter()
            .map(credential_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Replace the password of an active credential (same username).
    pub async fn rotate_sip_credential(
        &self,
        workspace_id: &str,
        number_id: &str,
        credential_id: &str,
        secret: &StoredSipSecret,
        now: DateTime<Utc>,
    ) -> Result<SipCredential, CredentialError> {
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        let r = sqlx::query(
            "UPDATE sip_credentials SET password_hash = $1, ha1_md5 = $2, ha1_sha256 = $3, \
             updated_at = $4 WHERE id = $5 AND number_id = $6 AND workspace_id = $7 \
             AND status = 'active'",
        )
        .bind(&secret.password_hash)
        .bind(&secret.ha1_md5)
        .bind(&secret.ha1_sha256)
        .bind(to_db(now))
        .bind(credential_id)
        .bind(number_id)
        .bind(workspace_id)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        // Devices registered with the old password are gone with it.
        drop_credential_registrations(&mut tx, credential_id).await?;
        tx.commit().await.map_err(storage)?;
        self.logins().forget_credential(credential_id);
        let cred = self
            .get_sip_credential(workspace_id, number_id, credential_id)
            .await?
            .ok_or(CredentialError::NotFound)?;
        if r.rows_affected() == 0 {
            return Err(CredentialError::Revoked);
        }
        Ok(cred)
    }

    pub async fn revoke_sip_credential(
        &self,
        workspace_id: &str,
        number_id: &str,
        credential_id: &str,
        now: DateTime<Utc>,
    ) -> Result<SipCredential, CredentialError> {
        let ts = to_db(now);
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        let r = sqlx::query(
            "UPDATE sip_credentials SET status = 'revoked', revoked_at = $1, updated_at = $1 \
             WHERE id = $2 AND number_id = $3 AND workspace_id = $4 AND status = 'active'",
        )
        .bind(&ts)
        .bind(credential_id)
        .bind(number_id)
        .bind(workspace_id)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        drop_credential_registrations(&mut tx, credential_id).await?;
        tx.commit().await.map_err(storage)?;
        self.logins().forget_credential(credential_id);
        let cred = self
            .get_sip_credential(workspace_id, number_id, credential_id)
            .await?
            .ok_or(CredentialError::NotFound)?;
        if r.rows_affected() == 0 {
            return Err(CredentialError::Revoked);
        }
        Ok(cred)
    }

    /// What a registrar needs to check a login: the credential, its stored secret, and the realm
    /// (the workspace id). Only active credentials are returned.
    pub async fn sip_login(
        &self,
        username: &str,
    ) -> Result<Option<(SipCredential, StoredSipSecret)>, StorageError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            credential_cols!(),
            ", password_hash, ha1_md5, ha1_sha256 FROM sip_credentials \
              WHERE username = $1 AND status = 'active'"
        ))
        .bind(username)
        .fetch_optional(&self.db.read)
        .await
        .map_err(storage)?;
        row.map(|r| {
            Ok((
                credential_from_row(&r)?,
                StoredSipSecret {
                    password_hash: get(&r, "password_hash")?,
                    ha1_md5: get(&r, "ha1_md5")?,
                    ha1_sha256: get(&r, "ha1_sha256")?,
                },
            ))
        })
        .transpose()
    }

    // --- wallet ---------------------------------------------------------------------------

    pub async fn get_wallet(&self, workspace_id: &str) -> Result<Option<Wallet>, StorageError> {
        let row = sqlx::query(
            "SELECT workspace_id, balance_minor, currency, low_balance_threshold_minor \
             FROM wallets WHERE workspace_id = $1",
        )
        .bind(workspace_id)
        .fetch_optional(&self.db.read)
        .await
        .map_err(storage)?;
        row.map(|r| {
            Ok(Wallet {
                workspace_id: get(&r, "workspace_id")?,
                balance_minor: get(&r, "balance_minor")?,
                currency: get(&r, "currency")?,
                low_balance_threshold_minor: get(&r, "low_balance_threshold_minor")?,
            })
        })
        .transpose()
    }

    pub async fn list_ledger(
        &self,
        workspace_id: &str,
        before_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LedgerEntry>, StorageError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            ledger_cols!(),
            " FROM ledger_entries WHERE workspace_id = $1 AND ($2 IS NULL OR id < $2) \
              ORDER BY id DESC LIMIT $3"
        ))
        .bind(workspace_id)
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.db.read)
        .await
        .map_err(storage)?;
        rows.iter().map(ledger_from_row).collect()
    }
}

/// After a debit: a balance that crossed the workspace's threshold downward fires
/// `wallet.low_balance` once; a credit back above the threshold re-arms it.
pub(crate) async fn after_debit(
    conn: &mut sqlx::AnyConnection,
    workspace_id: &str,
    wallet_row: &AnyRow,
    currency: &str,
    now: DateTime<Utc>,
) -> Result<(), StorageError> {
    let balance: i64 = get(wallet_row, "balance_minor")?;
    let threshold: i64 = get(wallet_row, "low_balance_threshold_minor")?;
    let alerted: i64 = get(wallet_row, "low_balance_alerted")?;
    if balance >= threshold || alerted != 0 {
        return Ok(());
    }
    let armed = sqlx::query(
        "UPDATE wallets SET low_balance_alerted = 1 \
         WHERE workspace_id = $1 AND low_balance_alerted = 0",
    )
    .bind(workspace_id)
    .execute(&mut *conn)
    .await
    .map_err(storage)?
    .rows_affected();
    if armed != 1 {
        return Ok(());
    }
    enqueue(
        conn,
        &low_balance_event(workspace_id, balance, threshold, currency),
        now,
    )
    .await
}

/// `wallet.low_balance`: a debit took the balance below the threshold (once per crossing).
pub(crate) fn low_balance_event(
    workspace_id: &str,
    balance: i64,
    threshold: i64,
    currency: &str,
) -> EventDraft {
    EventDraft {
        workspace_id: workspace_id.to_owned(),
        kind: "wallet.low_balance",
        number_id: None,
        call_id: None,
        payload: json!({
            "balance_minor": balance,
            "low_balance_threshold_minor": threshold,
            "currency": currency,
        }),
        events_url: None,
    }
}

/// What releasing a number does besides its own row, in the same transaction: the inventory row
/// is offered again, its credentials and bindings die with it (a released number must not keep
/// registering), and `number.released` is queued with why (`requested` or `unpaid`).
pub(crate) async fn after_release(
    tx: &mut sqlx::AnyConnection,
    number: &TenantNumber,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), StorageError> {
    let ts = to_db(now);
    sqlx::query("UPDATE inventory_numbers SET status = 'available' WHERE id = $1")
        .bind(&number.inventory_id)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
    sqlx::query(
        "UPDATE sip_credentials SET status = 'revoked', revoked_at = $1, updated_at = $1 \
         WHERE number_id = $2 AND status = 'active'",
    )
    .bind(&ts)
    .bind(&number.id)
    .execute(&mut *tx)
    .await
    .map_err(storage)?;
    sqlx::query("DELETE FROM sip_registrations WHERE number_id = $1")
        .bind(&number.id)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
    enqueue(
        tx,
        &EventDraft::for_number(
            number,
            "number.released",
            json!({
                "number_id": number.id,
                "number": number.number,
                "status": number.status.as_str(),
                "reason": reason,
                "released_at": number.released_at.map(to_api),
            }),
        ),
        now,
    )
    .await
}

fn finish_claim(
    r: Result<Result<TenantNumber, ClaimError>, ClaimTxError>,
) -> Result<TenantNumber, ClaimError> {
    match r {
        Ok(r) => r,
        Err(ClaimTxError::Conflict) => Err(ClaimError::AlreadyClaimed),
        Err(ClaimTxError::Retry) => Err(StorageError("claim kept losing deadlocks".into()).into()),
        Err(ClaimTxError::Storage(e)) => Err(e.into()),
    }
}

impl SqlStore {
    /// One claim in its own transaction.
    async fn claim_once(
        &self,
        cmd: &ClaimNumber,
    ) -> Result<Result<TenantNumber, ClaimError>, ClaimTxError> {
        let mut tx = self.db.begin_write().await.map_err(tx_err)?;
        let outcome = claim_in_tx(&mut tx, cmd).await?;
        match &outcome {
            Ok(_) => {
                tx.commit().await.map_err(tx_err)?;
                self.events_committed();
            }
            Err(_) => tx.rollback().await.map_err(tx_err)?,
        }
        Ok(outcome)
    }

    /// Set the low-balance threshold; a balance already at or above it re-arms the alert.
    pub async fn set_low_balance_threshold(
        &self,
        workspace_id: &str,
        threshold_minor: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Wallet>, StorageError> {
        let r = sqlx::query(
            "UPDATE wallets SET low_balance_threshold_minor = $1, updated_at = $2, \
               low_balance_alerted = CASE WHEN balance_minor >= $1 THEN 0 ELSE low_balance_alerted END \
             WHERE workspace_id = $3",
        )
        .bind(threshold_minor)
        .bind(to_db(now))
        .bind(workspace_id)
        .execute(&self.db.write)
        .await
        .map_err(storage)?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_wallet(workspace_id).await
    }
}

/// A storage failure inside a claim; `Conflict` is the one-owner index firing (a claim that the
/// conditional update should already have refused).
enum ClaimTxError {
    Storage(StorageError),
    Conflict,
    /// PostgreSQL chose this transaction as a deadlock victim (or a serialization failure):
    /// nothing was written, run it again.
    Retry,
}

fn tx_err(e: sqlx::Error) -> ClaimTxError {
    let code = e
        .as_database_error()
        .and_then(|d| d.code().map(|c| c.into_owned()));
    match code.as_deref() {
        Some("40P01") | Some("40001") => ClaimTxError::Retry,
        _ => ClaimTxError::Storage(storage(e)),
    }
}

/// Attempts for a claim that keeps losing deadlocks before it reports a storage failure.
const CLAIM_ATTEMPTS: usize = 5;

impl From<StorageError> for ClaimTxError {
    fn from(e: StorageError) -> Self {
        ClaimTxError::Storage(e)
    }
}

/// One claim inside an open transaction. `Ok(Err(refusal))` leaves the transaction as it found
/// it (a refused claim undoes its own inventory change, the only write made before a refusal),
/// so several claims can share one transaction; `Err` spoils the transaction.
async fn claim_in_tx(
    tx: &mut sqlx::AnyConnection,
    cmd: &ClaimNumber,
) -> Result<Result<TenantNumber, ClaimError>, ClaimTxError> {
    // The common path is five statements; the diagnostics below run only on refusal.
    let inv = sqlx::query(concat!(
        "UPDATE inventory_numbers SET status = 'claimed' \
             WHERE id = $1 AND status = 'available' RETURNING ",
        inventory_cols!()
    ))
    .bind(&cmd.inventory_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(tx_err)?;
    let Some(inv) = inv else {
        let exists = sqlx::query("SELECT id FROM inventory_numbers WHERE id = $1")
            .bind(&cmd.inventory_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(tx_err)?
            .is_some();
        return Ok(Err(if exists {
            ClaimError::AlreadyClaimed
        } else {
            ClaimError::NotFound
        }));
    };
    let inv = inventory_from_row(&inv)?;
    let ts = to_db(cmd.now);
    let balance = sqlx::query(
        "UPDATE wallets SET balance_minor = balance_minor - $1, updated_at = $2 \
             WHERE workspace_id = $3 AND currency = $4 AND balance_minor >= $5 \
             RETURNING balance_minor, low_balance_threshold_minor, low_balance_alerted",
    )
    .bind(inv.monthly_price_minor)
    .bind(&ts)
    .bind(&cmd.workspace_id)
    .bind(&inv.currency)
    .bind(inv.monthly_price_minor)
    .fetch_optional(&mut *tx)
    .await
    .map_err(tx_err)?;
    let Some(balance) = balance else {
        let wallet_currency: Option<String> =
            sqlx::query("SELECT currency FROM wallets WHERE workspace_id = $1")
                .bind(&cmd.workspace_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(tx_err)?
                .map(|r| get(&r, "currency"))
                .transpose()?;
        sqlx::query("UPDATE inventory_numbers SET status = 'available' WHERE id = $1")
            .bind(&inv.id)
            .execute(&mut *tx)
            .await
            .map_err(tx_err)?;
        return match wallet_currency {
            None => Err(StorageError("workspace has no wallet".into()).into()),
            Some(w) if w != inv.currency => Ok(Err(ClaimError::CurrencyMismatch {
                wallet: w,
                number: inv.currency,
            })),
            Some(_) => Ok(Err(ClaimError::InsufficientFunds)),
        };
    };
    let balance_after: i64 = get(&balance, "balance_minor")?;
    let number_id = new_id();
    let renews_at = to_db(money::rental_period_start(cmd.now, 1));
    sqlx::query(
        "INSERT INTO ledger_entries (id, workspace_id, kind, amount_minor, balance_after_minor, \
             currency, reference, created_at, period_start, period_end) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)",
    )
    .bind(new_id())
    .bind(&cmd.workspace_id)
    .bind(LedgerKind::NumberRental.as_str())
    .bind(-inv.monthly_price_minor)
    .bind(balance_after)
    .bind(&inv.currency)
    .bind(&number_id)
    .bind(&ts)
    .bind(&renews_at)
    .execute(&mut *tx)
    .await
    .map_err(tx_err)?;
    let r = sqlx::query(concat!(
        "INSERT INTO tenant_numbers (id, workspace_id, inventory_id, number, status, \
             capabilities, currency, monthly_price_minor, inbound_per_min_minor, \
             outbound_per_min_minor, next_renewal_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9, $10, $11, $11) RETURNING ",
        tenant_cols!()
    ))
    .bind(&number_id)
    .bind(&cmd.workspace_id)
    .bind(&inv.id)
    .bind(&inv.number)
    .bind(inv.capabilities.join(","))
    .bind(&inv.currency)
    .bind(inv.monthly_price_minor)
    .bind(inv.inbound_per_min_minor)
    .bind(inv.outbound_per_min_minor)
    .bind(&renews_at)
    .bind(&ts)
    .fetch_one(&mut *tx)
    .await;
    let row = match r {
        Ok(row) => row,
        // The one-owner index is the last line of defence behind the conditional UPDATE.
        Err(e) if is_unique_violation(&e) => return Err(ClaimTxError::Conflict),
        Err(e) => return Err(storage(e).into()),
    };
    let number = tenant_from_row(&row)?;
    enqueue(
        &mut *tx,
        &EventDraft {
            workspace_id: cmd.workspace_id.clone(),
            kind: "number.provisioned",
            number_id: Some(number.id.clone()),
            call_id: None,
            payload: json!({
                "number_id": number.id,
                "number": number.number,
                "status": number.status.as_str(),
                "monthly_price_minor": number.monthly_price_minor,
                "currency": number.currency,
                "next_renewal_at": to_api(number.next_renewal_at),
            }),
            events_url: None,
        },
        cmd.now,
    )
    .await?;
    after_debit(
        &mut *tx,
        &cmd.workspace_id,
        &balance,
        &number.currency,
        cmd.now,
    )
    .await?;
    mark_applied(&mut *tx, cmd.idempotency.as_ref(), cmd.now).await?;
    Ok(Ok(number))
}

#[async_trait]
impl Store for SqlStore {
    async fn claim_number(&self, cmd: ClaimNumber) -> Result<TenantNumber, ClaimError> {
        for _ in 1..CLAIM_ATTEMPTS {
            match self.claim_once(&cmd).await {
                Err(ClaimTxError::Retry) => continue,
                other => return finish_claim(other),
            }
        }
        finish_claim(self.claim_once(&cmd).await)
    }

    /// Group commit: the claims share one transaction. If it fails, each is tried on its own.
    async fn claim_numbers(&self, cmds: Vec<ClaimNumber>) -> Vec<Result<TenantNumber, ClaimError>> {
        if cmds.len() > 1 {
            let batch = async {
                let mut tx = self.db.begin_write().await.map_err(storage)?;
                let mut out = Vec::with_capacity(cmds.len());
                for cmd in &cmds {
                    out.push(claim_in_tx(&mut tx, cmd).await?);
                }
                tx.commit().await.map_err(storage)?;
                Ok::<_, ClaimTxError>(out)
            };
            if let Ok(out) = batch.await {
                self.events_committed();
                return out;
            }
        }
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            out.push(self.claim_number(cmd).await);
        }
        out
    }

    async fn release_number(&self, cmd: ReleaseNumber) -> Result<TenantNumber, ReleaseError> {
        let ts = to_db(cmd.now);
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        let released = sqlx::query(concat!(
            "UPDATE tenant_numbers SET status = 'released', released_at = $1, updated_at = $1 \
             WHERE id = $2 AND workspace_id = $3 AND status <> 'released' RETURNING ",
            tenant_cols!()
        ))
        .bind(&ts)
        .bind(&cmd.number_id)
        .bind(&cmd.workspace_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(storage)?;
        let Some(released) = released else {
            let exists =
                sqlx::query("SELECT id FROM tenant_numbers WHERE id = $1 AND workspace_id = $2")
                    .bind(&cmd.number_id)
                    .bind(&cmd.workspace_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(storage)?
                    .is_some();
            tx.rollback().await.map_err(storage)?;
            return Err(if exists {
                ReleaseError::AlreadyReleased
            } else {
                ReleaseError::NotFound
            });
        };
        let number = tenant_from_row(&released)?;
        after_release(&mut tx, &number, "requested", cmd.now).await?;
        tx.commit().await.map_err(storage)?;
        self.logins().forget_number(&number.id);
        self.events_committed();
        Ok(number)
    }

    async fn credit_wallet(&self, cmd: CreditWallet) -> Result<Credited, WalletError> {
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        let currency: Option<String> =
            sqlx::query("SELECT currency FROM wallets WHERE workspace_id = $1")
                .bind(&cmd.workspace_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(storage)?
                .map(|r| get(&r, "currency"))
                .transpose()?;
        let Some(currency) = currency else {
            tx.rollback().await.map_err(storage)?;
            return Err(WalletError::NotFound);
        };
        if currency != cmd.currency {
            tx.rollback().await.map_err(storage)?;
            return Err(WalletError::CurrencyMismatch {
                wallet: currency,
                requested: cmd.currency,
            });
        }
        let ts = to_db(cmd.now);
        let balance = sqlx::query(
            "UPDATE wallets SET balance_minor = balance_minor + $1, updated_at = $2, \
               low_balance_alerted = CASE WHEN balance_minor + $1 >= low_balance_threshold_minor \
                 THEN 0 ELSE low_balance_alerted END \
             WHERE workspace_id = $3 AND balance_minor <= $4 RETURNING balance_minor",
        )
        .bind(cmd.amount_minor)
        .bind(&ts)
        .bind(&cmd.workspace_id)
        .bind(MAX_BALANCE_MINOR - cmd.amount_minor)
        .fetch_optional(&mut *tx)
        .await
        .map_err(storage)?;
        let Some(balance) = balance else {
            tx.rollback().await.map_err(storage)?;
            return Err(WalletError::BalanceLimit);
        };
        let balance_after: i64 = get(&balance, "balance_minor")?;
        let entry = LedgerEntry {
            id: new_id(),
            workspace_id: cmd.workspace_id.clone(),
            kind: cmd.kind,
            amount_minor: cmd.amount_minor,
            balance_after_minor: balance_after,
            currency,
            reference: cmd.reference,
            created_at: cmd.now,
            period: None,
        };
        sqlx::query(
            "INSERT INTO ledger_entries (id, workspace_id, kind, amount_minor, balance_after_minor, \
             currency, reference, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&entry.id)
        .bind(&entry.workspace_id)
        .bind(entry.kind.as_str())
        .bind(entry.amount_minor)
        .bind(entry.balance_after_minor)
        .bind(&entry.currency)
        .bind(&entry.reference)
        .bind(&ts)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        enqueue(
            &mut tx,
            &EventDraft {
                workspace_id: entry.workspace_id.clone(),
                kind: "wallet.top_up",
                number_id: None,
                call_id: None,
                payload: json!({
                    "ledger_entry_id": entry.id,
                    "kind": entry.kind.as_str(),
                    "amount_minor": entry.amount_minor,
                    "balance_minor": entry.balance_after_minor,
                    "currency": entry.currency,
                    "reference": entry.reference,
                }),
                events_url: None,
            },
            cmd.now,
        )
        .await?;
        let (reactivated, balance_minor) = crate::renewals::reactivate(
            &mut tx,
            self.db.backend,
            &entry.workspace_id,
            &entry.currency,
            balance_after,
            cmd.now,
        )
        .await?;
        mark_applied(&mut tx, cmd.idempotency.as_ref(), cmd.now).await?;
        tx.commit().await.map_err(storage)?;
        self.events_committed();
        Ok(Credited {
            entry,
            reactivated,
            balance_minor,
        })
    }
}
