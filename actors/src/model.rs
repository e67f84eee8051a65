//! Domain records shared by the actors and the service.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Lifecycle of a number owned by a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumberStatus {
    Active,
    Suspended,
    Released,
}

impl NumberStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NumberStatus::Active => "active",
            NumberStatus::Suspended => "suspended",
            NumberStatus::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(NumberStatus::Active),
            "suspended" => Some(NumberStatus::Suspended),
            "released" => Some(NumberStatus::Released),
            _ => None,
        }
    }
}

/// A number claimed by a workspace (the guide's `tenant_number`). Prices are copied from the
/// inventory at claim time, so a later price change never alters what a customer agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantNumber {
    pub id: String,
    pub workspace_id: String,
    pub inventory_id: String,
    pub number: String,
    pub status: NumberStatus,
    pub capabilities: Vec<String>,
    pub currency: String,
    pub monthly_price_minor: i64,
    pub inbound_per_min_minor: i64,
    pub outbound_per_min_minor: i64,
    pub voice_callback_url: Option<String>,
    pub events_url: Option<String>,
    pub next_renewal_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub released_at: Option<DateTime<Utc>>,
    /// The latest rental period paid (0: the month debited at claim).
    pub rental_period: i64,
    /// When a renewal could not be paid; `None` unless suspended.
    pub suspended_at: Option<DateTime<Utc>>,
}

/// Why a wallet balance changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerKind {
    /// Money added through a payment provider.
    TopUp,
    /// Money added by an operator (`sautikit admin credit`) or at workspace creation.
    Credit,
    /// A month of number rental.
    NumberRental,
    /// An answered call, rated per second.
    CallCharge,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::TopUp => "top_up",
            LedgerKind::Credit => "credit",
            LedgerKind::NumberRental => "number_rental",
            LedgerKind::CallCharge => "call_charge",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "top_up" => Some(LedgerKind::TopUp),
            "credit" => Some(LedgerKind::Credit),
            "number_rental" => Some(LedgerKind::NumberRental),
            "call_charge" => Some(LedgerKind::CallCharge),
            _ => None,
        }
    }
}

/// One append-only ledger row: a signed amount and the balance right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: String,
    pub workspace_id: String,
    pub kind: LedgerKind,
    pub amount_minor: i64,
    pub balance_after_minor: i64,
    pub currency: String,
    pub reference: Option<String>,
    pub created_at: DateTime<Utc>,
    /// For a `number_rental`: the month it pays for (`reference` names the number).
    pub period: Option<(DateTime<Utc>, DateTime<Utc>)>,
}
