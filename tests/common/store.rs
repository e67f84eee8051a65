//! Storage-level fixtures: numbers seeded and claimed straight through the store, for tests that
//! drive `SqlStore` without a server.

use chrono::{DateTime, Utc};
use sautikit::store::{InventoryFilter, SeedInventory, SqlStore};
use sautikit_actors::model::TenantNumber;
use sautikit_actors::store::{ClaimNumber, Store};

/// A number's prices, in KES minor units.
pub struct Prices {
    pub monthly: i64,
    pub inbound_per_min: i64,
    pub outbound_per_min: i64,
}

/// Seed `count` Kenyan numbers from +254700000001 with `prices` and claim the first for
/// `workspace_id` (which pays the monthly price).
pub async fn claim_first_number(
    store: &SqlStore,
    workspace_id: &str,
    count: u64,
    prices: Prices,
    now: DateTime<Utc>,
) -> TenantNumber {
    store
        .seed_inventory(
            &SeedInventory {
                country: "KE".into(),
                currency: "KES".into(),
                count,
                start: 254_700_000_001,
                monthly_price_minor: prices.monthly,
                inbound_per_min_minor: prices.inbound_per_min,
                outbound_per_min_minor: prices.outbound_per_min,
                guide_ids: false,
            },
            now,
        )
        .await
        .expect("seed");
    let inv = store
        .list_available(&InventoryFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("inventory");
    store
        .claim_number(ClaimNumber {
            workspace_id: workspace_id.to_owned(),
            inventory_id: inv[0].id.clone(),
            now,
        })
        .await
        .expect("claim")
}
