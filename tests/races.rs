//! Concurrent claims: ownership and money stay correct under contention, within one process and
//! across two processes sharing one PostgreSQL database.

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};

use common::{Api, Backend, Mode, Server, TestDb};
use futures::future::join_all;

const NUMBERS: usize = 16;
const CLAIMS_PER_NUMBER_PER_WORKSPACE: usize = 2;
const PRICE: i64 = 10_000;
const AFFORDABLE: i64 = 5;

async fn concurrent_claims(backend: Backend) {
    let db = TestDb::new(backend).await;
    let seeded = db.admin(&[
        "seed-inventory",
        "--country",
        "KE",
        "--count",
        &NUMBERS.to_string(),
        "--start",
        "+254711000001",
    ]);
    assert_eq!(seeded["inserted"], NUMBERS as u64);
    let (_, key_a) = db.workspace("a", AFFORDABLE * PRICE);
    let (_, key_b) = db.workspace("b", AFFORDABLE * PRICE);

    // SQLite: one process. PostgreSQL: two processes on the same database, requests spread over
    // both, so only the database can keep them honest.
    let servers: Vec<Server> = match backend {
        Backend::Sqlite => vec![Server::start(&db, Mode::Production)],
        Backend::Postgres => vec![
            Server::start(&db, Mode::Production),
            Server::start(&db, Mode::Production),
        ],
    };
    let api_a: Vec<Api> = servers.iter().map(|s| s.api(&key_a)).collect();
    let api_b: Vec<Api> = servers.iter().map(|s| s.api(&key_b)).collect();

    let inventory = api_a[0]
        .get_all("/v1/numbers/available?contains=711&limit=100")
        .await;
    assert_eq!(inventory.len(), NUMBERS);
    let ids: Vec<String> = inventory
        .iter()
        .map(|n| n["id"].as_str().expect("id").to_owned())
        .collect();

    let mut requests = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        for j in 0..CLAIMS_PER_NUMBER_PER_WORKSPACE {
            for (w, apis) in [("a", &api_a), ("b", &api_b)] {
                let api = apis[(i + j) % apis.len()].clone();
                let path = format!("/v1/numbers/{id}/claim");
                requests.push(async move { (w, api.post(&path, None).await) });
            }
        }
    }
    assert_eq!(requests.len(), 64);
    let results = join_all(requests).await;

    let mut wins: HashMap<&str, usize> = HashMap::new();
    for (w, r) in &results {
        match r.status.as_u16() {
            201 => *wins.entry(w).or_default() += 1,
            409 => {
                r.assert_error(409, "numbers.already_claimed");
            }
            402 => {
                r.assert_error(402, "wallet.insufficient_funds");
            }
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert_eq!(wins.values().sum::<usize>(), 10, "{wins:?}");
    assert_eq!(wins.get("a"), Some(&5));
    assert_eq!(wins.get("b"), Some(&5));

    let mut owners: HashSet<String> = HashSet::new();
    for api in [&api_a[0], &api_b[0]] {
        let numbers = api.get_all("/v1/numbers").await;
        assert_eq!(numbers.len(), 5);
        for n in &numbers {
            assert!(
                owners.insert(n["number"].as_str().expect("number").to_owned()),
                "{n} has two owners"
            );
        }
        let wallet = api.get("/v1/wallet").await.json();
        assert_eq!(wallet["balance_minor"], 0);
        let ledger = api.get_all("/v1/wallet/transactions").await;
        let sum: i64 = ledger
            .iter()
            .map(|e| e["amount_minor"].as_i64().expect("amount"))
            .sum();
        assert_eq!(sum, wallet["balance_minor"].as_i64().expect("balance"));
        assert!(
            ledger
                .iter()
                .all(|e| e["balance_after_minor"].as_i64().expect("after") >= 0)
        );
        assert_eq!(ledger.len(), 6, "one credit and five rentals");
    }
    let left = api_a[0]
        .get_all("/v1/numbers/available?contains=711&limit=100")
        .await;
    assert_eq!(left.len(), NUMBERS - 10);
    assert!(
        left.iter()
            .all(|n| !owners.contains(n["number"].as_str().unwrap_or("")))
    );
}

on_both_backends!(concurrent_claims);
