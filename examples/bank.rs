//! A small bank on `outbox`: accounts and transfers live in memory and are
//! persisted to PostgreSQL in the background. A transfer debits one
//! account, credits another and records itself, in one change set.
//!
//! `cargo run --example bank` uses `DATABASE_URL` when set, else starts a
//! private PostgreSQL in `target/example-data/bank`; each run goes on from
//! what the last one wrote, versions continuing.

use std::time::Duration;

use outbox::store::{ApplyError, StoreError, Ticket};
use outbox::{Engine, Entity, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Entity)]
#[entity(kind = "account", table = "accounts")] // one json document per row
struct Account {
    #[entity(id)]
    id: String,
    balance: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Entity)]
#[entity(kind = "transfer", table = "transfers", columns)] // typed columns
struct Transfer {
    #[entity(id)]
    id: String,
    from_account: String,
    to_account: String,
    amount: i64,
}

/// The bank's tables, as its own migrations would create them.
const TABLES: &str = "CREATE TABLE IF NOT EXISTS accounts (id text PRIMARY KEY, version bigint NOT NULL,
    deleted boolean NOT NULL DEFAULT false, data json, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS transfers (id text PRIMARY KEY, version bigint NOT NULL,
    deleted boolean NOT NULL DEFAULT false, updated_at timestamptz NOT NULL DEFAULT now(),
    from_account text, to_account text, amount bigint);";

/// Why a transfer was declined (nothing changed).
#[derive(Debug, thiserror::Error)]
enum Declined {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{account} has only {balance}")]
    Funds { account: String, balance: i64 },
}

/// Debits `from`, credits `to` and records the transfer, all or nothing.
fn transfer(store: &Store, from: &str, to: &str, amount: i64) -> Result<Ticket, ApplyError<Declined>> {
    let (_, ticket) = store.apply_durable(|set| {
        let balance = set.get::<Account>(from).map_or(0, |a| a.value.balance);
        if balance < amount {
            return Err(Declined::Funds { account: from.to_owned(), balance });
        }
        set.update::<Account>(from, |a| a.balance -= amount)?;
        set.update::<Account>(to, |a| a.balance += amount)?;
        let id = format!("t{}", set.view().count::<Transfer>() + 1);
        Ok(set.insert(Transfer { id, from_account: from.into(), to_account: to.into(), amount })?)
    })?;
    Ok(ticket)
}

async fn start(pool: &outbox::pg::Pool) -> Result<Engine, outbox::engine::StartError> {
    let (store, receiver) = Store::builder().kind::<Account>().kind::<Transfer>().build();
    let engine = Engine::builder(store, receiver, pool.clone()).spill_dir("target/example-data/spill").start().await?;
    let loaded = engine.hydration();
    println!("started: loaded {} rows in {:?} {:?}", loaded.total, loaded.elapsed, loaded.per_kind);
    Ok(engine)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_postgres, config) = match std::env::var("DATABASE_URL") {
        Ok(url) => (None, outbox::pg::parse_url(&url)?),
        Err(_) => {
            let (postgres, config) =
                outbox::pg::LocalPostgres::open("target/example-data/bank/postgres", "bank").await?;
            (Some(postgres), config)
        }
    };
    let pool = outbox::pg::pool(config, 4);
    outbox::pg::migrate(&pool).await?; // the library's own tables
    pool.get().await?.batch_execute(TABLES).await?;

    let engine = start(&pool).await?;
    let store = engine.store();
    store.apply(|set| -> Result<(), StoreError> {
        for (id, balance) in [("alice", 100), ("bob", 50)] {
            if !set.contains::<Account>(id) {
                set.insert(Account { id: id.into(), balance })?;
            }
        }
        Ok(())
    })?;
    // Back and forth, so that every run has the money; durable: answered
    // once PostgreSQL has committed it.
    let back = store.read(|view| view.count::<Transfer>() % 2 == 1);
    let (from, to) = if back { ("bob", "alice") } else { ("alice", "bob") };
    transfer(store, from, to, 30)?.wait().await?;
    println!("transfer of 30 from {from} to {to} committed");
    match transfer(store, to, from, 1_000_000) {
        Err(ApplyError::Failed(Declined::Funds { account, balance })) => {
            println!("transfer of 1000000 declined: {account} has {balance}; nothing changed")
        }
        other => return Err(format!("expected a decline, got {:?}", other.map(|_| ())).into()),
    }
    println!("shut down: everything written = {}", engine.shutdown(Duration::from_secs(10)).await.complete());

    // A new process would do the same: load what the database holds.
    let engine = start(&pool).await?;
    for account in ["alice", "bob"] {
        let a = engine.store().get::<Account>(account).ok_or("account missing after restart")?;
        println!("{account}: balance {} at version {}", a.value.balance, a.version);
    }
    println!("{} transfers so far", engine.store().read(|view| view.count::<Transfer>()));
    engine.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
