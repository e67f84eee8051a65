//! `sautikit admin …`: operator commands on the database, each printing one JSON line.

use chrono::Utc;
use sautikit_actors::model::LedgerKind;
use sautikit_actors::money;
use sautikit_actors::scheduler::DueReport;
use sautikit_actors::store::{CreditWallet, Store};
use serde_json::json;
use thiserror::Error;

use crate::config::AdminCommand;
use crate::db::{Db, DbError};
use crate::renewals::Renewals;
use crate::store::{SeedInventory, SqlStore};

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Failed(String),
}

pub async fn run(url: &str, cmd: AdminCommand) -> Result<serde_json::Value, AdminError> {
    // Validate before touching the database, so bad input changes nothing.
    let invalid = |m: String| AdminError::Invalid(m);
    match &cmd {
        AdminCommand::CreateWorkspace {
            name,
            credit_minor,
            currency,
        } => {
            if name.trim().is_empty() || name.len() > 100 {
                return Err(invalid("--name must be 1 to 100 characters".into()));
            }
            money::parse_currency(currency).map_err(|e| invalid(e.to_string()))?;
            if *credit_minor != 0 {
                money::validate_credit(*credit_minor).map_err(|e| invalid(e.to_string()))?;
            }
        }
        AdminCommand::Credit { amount_minor, .. } => {
            money::validate_credit(*amount_minor).map_err(|e| invalid(e.to_string()))?;
        }
        AdminCommand::RunDue { at, batch, .. } => {
            if let Some(at) = at {
                parse_at(at).ok_or_else(|| {
                    invalid("--at must be an RFC 3339 time, e.g. 2027-02-28T10:00:00Z".into())
                })?;
            }
            if !(1..=10_000).contains(batch) {
                return Err(invalid("--batch must be 1 to 10000".into()));
            }
        }
        AdminCommand::SeedInventory {
            country,
            count,
            start,
            monthly_price_minor,
            outbound_per_min_minor,
            inbound_per_min_minor,
            currency,
        } => {
            if !crate::api::extract::is_country_code(country) {
                return Err(invalid(
                    "--country must be ISO 3166-1 alpha-2, e.g. KE".into(),
                ));
            }
            money::parse_currency(currency).map_err(|e| invalid(e.to_string()))?;
            if *count == 0 || *count > 1_000_000 {
                return Err(invalid("--count must be 1 to 1000000".into()));
            }
            parse_e164(start)
                .ok_or_else(|| invalid("--start must be E.164, e.g. +254700000001".into()))?;
            if [
                monthly_price_minor,
                outbound_per_min_minor,
                inbound_per_min_minor,
            ]
            .iter()
            .any(|p| **p < 0 || **p > money::MAX_CREDIT_MINOR)
            {
                return Err(invalid(
                    "prices must be between 0 and 1000000000 minor units".into(),
                ));
            }
        }
    }

    let db = Db::connect(url).await?;
    db.migrate().await?;
    let store = SqlStore::new(db.clone());
    let now = Utc::now();
    let out = match cmd {
        AdminCommand::CreateWorkspace {
            name,
            credit_minor,
            currency,
        } => {
            let ws = store
                .create_workspace(&name, &currency, credit_minor, now)
                .await
                .map_err(|e| AdminError::Failed(e.to_string()))?;
            json!({
                "workspace_id": ws.workspace_id,
                "api_key": ws.api_key,
                "webhook_secret": ws.webhook_secret,
            })
        }
        AdminCommand::Credit {
            workspace,
            amount_minor,
        } => {
            let wallet = store
                .get_wallet(&workspace)
                .await
                .map_err(|e| AdminError::Failed(e.to_string()))?
                .ok_or_else(|| AdminError::Invalid(format!("no workspace {workspace}")))?;
            let credited = store
                .credit_wallet(CreditWallet {
                    workspace_id: workspace.clone(),
                    amount_minor,
                    currency: wallet.currency,
                    kind: LedgerKind::Credit,
                    reference: Some("admin".into()),
                    now,
                    idempotency: None,
                })
                .await
                .map_err(|e| AdminError::Failed(e.to_string()))?;
            json!({
                "workspace_id": workspace,
                "ledger_entry_id": credited.entry.id,
                "amount_minor": credited.entry.amount_minor,
                "balance_minor": credited.balance_minor,
                "currency": credited.entry.currency,
                "reactivated_number_ids":
                    credited.reactivated.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            })
        }
        AdminCommand::SeedInventory {
            country,
            count,
            start,
            monthly_price_minor,
            outbound_per_min_minor,
            inbound_per_min_minor,
            currency,
        } => {
            let start = parse_e164(&start).unwrap_or(0);
            let inserted = store
                .seed_inventory(
                    &SeedInventory {
                        country,
                        currency,
                        count,
                        start,
                        monthly_price_minor,
                        inbound_per_min_minor,
                        outbound_per_min_minor,
                        guide_ids: false,
                    },
                    now,
                )
                .await
                .map_err(|e| AdminError::Failed(e.to_string()))?;
            json!({ "inserted": inserted, "requested": count })
        }
        AdminCommand::RunDue {
            at,
            batch,
            suspended_release_days,
            progress,
        } => {
            let at = at.as_deref().and_then(parse_at).unwrap_or(now);
            let mut work = Renewals::new(store.clone(), suspended_release_days);
            work.batch = batch;
            let report = work
                .run(at, |so_far| {
                    if progress {
                        eprintln!("{}", due_json(at, so_far));
                    }
                })
                .await
                .map_err(|e| AdminError::Failed(e.to_string()))?;
            due_json(at, &report)
        }
    };
    db.close().await;
    Ok(out)
}

fn parse_at(s: &str) -> Option<chrono::DateTime<Utc>> {
    crate::time::from_db(s).ok()
}

fn due_json(at: chrono::DateTime<Utc>, r: &DueReport) -> serde_json::Value {
    json!({
        "at": crate::time::to_api(at),
        "renewed": r.renewed,
        "suspended": r.suspended,
        "released": r.released,
    })
}

/// `+254700000001` → 254700000001 (7 to 15 digits, as E.164 allows).
fn parse_e164(s: &str) -> Option<u64> {
    let digits = s.strip_prefix('+')?;
    if !(7..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
