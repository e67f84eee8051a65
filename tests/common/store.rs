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
            idempotency: None,
        })
        .await
        .expect("claim")
}

/// Seed `count` Kenyan numbers from `start` (E.164 digits) at `monthly` KES a month and claim them
/// round-robin for `workspaces` new workspaces, each able to pay two months of its numbers,
/// claim `i` at `now` + `i` ms. Returns the workspace ids. Claims go through the store in groups
/// (the API would take minutes for 100,000).
pub async fn claim_many(
    store: &SqlStore,
    workspaces: usize,
    count: usize,
    start: u64,
    monthly: i64,
    now: DateTime<Utc>,
) -> Vec<String> {
    let workspaces = workspaces.clamp(1, count.max(1));
    let per = count.div_ceil(workspaces) as i64;
    let mut ws = Vec::with_capacity(workspaces);
    for i in 0..workspaces {
        let w = store
            .create_workspace(&format!("renter-{i}"), "KES", 2 * monthly * per, now)
            .await
            .expect("workspace");
        ws.push(w.workspace_id);
    }
    store
        .seed_inventory(
            &SeedInventory {
                country: "KE".into(),
                currency: "KES".into(),
                count: count as u64,
                start,
                monthly_price_minor: monthly,
                inbound_per_min_minor: 0,
                outbound_per_min_minor: 300,
                guide_ids: false,
            },
            now,
        )
        .await
        .expect("seed");
    let rows = sqlx::query(
        "SELECT id FROM inventory_numbers WHERE status = 'available' AND number >= $1 \
         ORDER BY number LIMIT $2",
    )
    .bind(format!("+{start}"))
    .bind(count as i64)
    .fetch_all(&store.db().read)
    .await
    .expect("inventory");
    let cmds: Vec<ClaimNumber> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| ClaimNumber {
            workspace_id: ws[i % workspaces].clone(),
            inventory_id: sqlx::Row::try_get::<String, _>(r, "id").expect("id"),
            now: now + chrono::Duration::milliseconds(i as i64),
            idempotency: None,
        })
        .collect();
    for chunk in cmds.chunks(500) {
        for r in store.claim_numbers(chunk.to_vec()).await {
            r.expect("claim");
        }
    }
    ws
}
