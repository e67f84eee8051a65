//! The actor tree with an in-memory store: supervisors survive failing children, and the
//! Inventory actor serializes claims even over a store with no atomicity of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sautikit_actors::Engine;
use sautikit_actors::clock::Clock;
use sautikit_actors::model::{LedgerEntry, LedgerKind, NumberStatus, TenantNumber};
use sautikit_actors::store::{
    ClaimError, ClaimNumber, CreditWallet, Credited, ReleaseError, ReleaseNumber, StorageError,
    Store, WalletError,
};

struct FixedClock;
impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }
}

/// A deliberately racy store: it checks, yields, then writes. Only serialization by the actor
/// keeps two claims of the same number from both succeeding. `PANIC` ids and amount 13 panic.
#[derive(Default)]
struct RacyStore {
    owners: Mutex<HashMap<String, String>>,
    balances: Mutex<HashMap<String, i64>>,
}

fn number(cmd: &ClaimNumber) -> TenantNumber {
    TenantNumber {
        id: format!("n-{}", cmd.inventory_id),
        workspace_id: cmd.workspace_id.clone(),
        inventory_id: cmd.inventory_id.clone(),
        number: "+254700000001".into(),
        status: NumberStatus::Active,
        capabilities: vec!["voice".into()],
        currency: "KES".into(),
        monthly_price_minor: 0,
        inbound_per_min_minor: 0,
        outbound_per_min_minor: 0,
        voice_callback_url: None,
        events_url: None,
        next_renewal_at: cmd.now,
        created_at: cmd.now,
        updated_at: cmd.now,
        released_at: None,
        rental_period: 0,
        suspended_at: None,
    }
}

#[async_trait]
impl Store for RacyStore {
    async fn claim_number(&self, cmd: ClaimNumber) -> Result<TenantNumber, ClaimError> {
        if cmd.inventory_id == "PANIC" {
            panic!("simulated bug in claim");
        }
        let taken = self
            .owners
            .lock()
            .map_err(|e| StorageError(e.to_string()))?
            .contains_key(&cmd.inventory_id);
        if taken {
            return Err(ClaimError::AlreadyClaimed);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.owners
            .lock()
            .map_err(|e| StorageError(e.to_string()))?
            .insert(cmd.inventory_id.clone(), cmd.workspace_id.clone());
        Ok(number(&cmd))
    }

    async fn release_number(&self, _cmd: ReleaseNumber) -> Result<TenantNumber, ReleaseError> {
        Err(ReleaseError::NotFound)
    }

    async fn credit_wallet(&self, cmd: CreditWallet) -> Result<Credited, WalletError> {
        if cmd.amount_minor == 13 {
            panic!("simulated bug in credit");
        }
        let mut b = self
            .balances
            .lock()
            .map_err(|e| StorageError(e.to_string()))?;
        let bal = b.entry(cmd.workspace_id.clone()).or_default();
        *bal += cmd.amount_minor;
        Ok(Credited {
            entry: LedgerEntry {
                id: "l".into(),
                workspace_id: cmd.workspace_id,
                kind: cmd.kind,
                amount_minor: cmd.amount_minor,
                balance_after_minor: *bal,
                currency: cmd.currency,
                reference: cmd.reference,
                created_at: cmd.now,
                period: None,
            },
            reactivated: Vec::new(),
            balance_minor: *bal,
        })
    }
}

async fn engine() -> (Engine, Arc<RacyStore>) {
    let store = Arc::new(RacyStore::default());
    let engine = Engine::start(store.clone(), Arc::new(FixedClock))
        .await
        .expect("engine starts");
    (engine, store)
}

/// Wait (bounded) until `f` succeeds: the restart happens asynchronously after the failure.
async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..500 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn inventory_restarts_after_a_panic() {
    let (engine, _) = engine().await;
    let err = engine
        .claim_number("ws", "PANIC", None)
        .await
        .expect_err("the panicking claim fails");
    assert!(matches!(err, ClaimError::Storage(_)), "{err:?}");
    // Root restarts Inventory under its name; later claims work, and so do wallets.
    let n = eventually(|| async { engine.claim_number("ws", "inv-1", None).await.ok() }).await;
    assert_eq!(n.inventory_id, "inv-1");
    let e = engine
        .credit_wallet("ws", 100, "KES", LedgerKind::TopUp, None, None)
        .await
        .expect("wallets unaffected");
    assert_eq!(e.entry.balance_after_minor, 100);
    engine.stop().await;
}

#[tokio::test]
async fn a_failed_wallet_does_not_take_down_the_others() {
    let (engine, _) = engine().await;
    engine
        .credit_wallet("ws-a", 100, "KES", LedgerKind::TopUp, None, None)
        .await
        .expect("credit");
    engine
        .credit_wallet("ws-b", 7, "KES", LedgerKind::TopUp, None, None)
        .await
        .expect("credit");
    let err = engine
        .credit_wallet("ws-a", 13, "KES", LedgerKind::TopUp, None, None)
        .await
        .expect_err("the panicking credit fails");
    assert!(matches!(err, WalletError::Storage(_)), "{err:?}");
    // ws-a's wallet actor is replaced on next use; ws-b's never noticed.
    let a = eventually(|| async {
        engine
            .credit_wallet("ws-a", 1, "KES", LedgerKind::TopUp, None, None)
            .await
            .ok()
    })
    .await;
    assert_eq!(a.entry.balance_after_minor, 101);
    let b = engine
        .credit_wallet("ws-b", 1, "KES", LedgerKind::TopUp, None, None)
        .await
        .expect("credit");
    assert_eq!(b.entry.balance_after_minor, 8);
    engine.stop().await;
}

#[tokio::test]
async fn inventory_serializes_claims() {
    let (engine, store) = engine().await;
    let engine = Arc::new(engine);
    let attempts = (0..32).map(|i| {
        let engine = engine.clone();
        async move { engine.claim_number(&format!("ws-{i}"), "inv-9", None).await }
    });
    let results = futures::future::join_all(attempts).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, ClaimError::AlreadyClaimed))
    );
    assert_eq!(store.owners.lock().map(|o| o.len()).unwrap_or(0), 1);
}

#[tokio::test]
async fn two_engines_in_one_process_are_independent() {
    let (a, _) = engine().await;
    let (b, _) = engine().await;
    a.claim_number("ws", "x", None).await.expect("a claims");
    b.claim_number("ws", "x", None)
        .await
        .expect("b has its own store");
    a.stop().await;
    b.claim_number("ws", "y", None).await.expect("b still runs");
    b.stop().await;
}
