//! The persistence boundary the actors depend on. The service implements it with sqlx; tests may
//! implement it in memory. Every method is one database transaction: when it returns `Ok`, the
//! change is committed.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use thiserror::Error;

use crate::model::{LedgerEntry, LedgerKind, TenantNumber};

/// A failure of the storage itself (connection lost, constraint we did not expect, …).
#[derive(Debug, Clone, Error)]
#[error("storage failure: {0}")]
pub struct StorageError(pub String);

/// The `Idempotency-Key` of the API request that asks for a change. The change's transaction
/// marks the key as applied, so that once the change is committed no retry under the key makes
/// it again, even when its response was lost (a crash or a failed write after the commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyMark {
    pub workspace_id: String,
    pub key: String,
}

#[derive(Debug, Clone)]
pub struct ClaimNumber {
    pub workspace_id: String,
    pub inventory_id: String,
    pub now: DateTime<Utc>,
    pub idempotency: Option<IdempotencyMark>,
}

#[derive(Debug, Clone, Error)]
pub enum ClaimError {
    #[error("number not found")]
    NotFound,
    #[error("number already claimed")]
    AlreadyClaimed,
    #[error("insufficient wallet balance")]
    InsufficientFunds,
    #[error("the number is priced in {number} but the wallet holds {wallet}")]
    CurrencyMismatch { wallet: String, number: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug, Clone)]
pub struct ReleaseNumber {
    pub workspace_id: String,
    pub number_id: String,
    pub now: DateTime<Utc>,
}

#[derive(Debug, Clone, Error)]
pub enum ReleaseError {
    #[error("number not found")]
    NotFound,
    #[error("number already released")]
    AlreadyReleased,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug, Clone)]
pub struct CreditWallet {
    pub workspace_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub kind: LedgerKind,
    pub reference: Option<String>,
    pub now: DateTime<Utc>,
    pub idempotency: Option<IdempotencyMark>,
}

/// A credit, and the suspended numbers it paid to renew (oldest suspension first).
#[derive(Debug, Clone)]
pub struct Credited {
    pub entry: LedgerEntry,
    pub reactivated: Vec<TenantNumber>,
    /// The balance after the credit and the renewals it paid.
    pub balance_minor: i64,
}

#[derive(Debug, Clone, Error)]
pub enum WalletError {
    #[error("wallet not found")]
    NotFound,
    #[error("the wallet holds {wallet}, not {requested}")]
    CurrencyMismatch { wallet: String, requested: String },
    #[error("the balance would exceed the wallet limit")]
    BalanceLimit,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Take an available inventory row, debit the first month with a ledger row and create the
    /// tenant number — all or nothing.
    async fn claim_number(&self, cmd: ClaimNumber) -> Result<TenantNumber, ClaimError>;

    /// Several claims, answered in order. A store may commit them together (group commit); each
    /// result is as if the claim had run alone, one after the other.
    async fn claim_numbers(&self, cmds: Vec<ClaimNumber>) -> Vec<Result<TenantNumber, ClaimError>> {
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            out.push(self.claim_number(cmd).await);
        }
        out
    }

    /// Release a tenant number; its inventory row becomes available again.
    async fn release_number(&self, cmd: ReleaseNumber) -> Result<TenantNumber, ReleaseError>;

    /// Add money to a wallet with a ledger row; in the same transaction, renew the workspace's
    /// suspended numbers that the new balance can pay, oldest suspension first (DESIGN §4).
    async fn credit_wallet(&self, cmd: CreditWallet) -> Result<Credited, WalletError>;
}
