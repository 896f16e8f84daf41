//! # outbox
//!
//! Keep an API server's state in memory and make its persistence to
//! PostgreSQL impossible to forget, fast, and observable.
//!
//! ## A tour, in the order data flows
//!
//! 1. **Handlers** change state only through the [`Store`]. The reference
//!    items/circuits service (`api`, feature `server`) is built this way.
//!    Entity kinds are your own types implementing [`entity::Entity`].
//! 2. The **store** ([`store`]) keeps entities of several kinds in memory,
//!    each with an id and a version. A change is a closure over a
//!    [`ChangeSet`](store::ChangeSet): everything it stages applies at once or
//!    not at all, and in the same critical section is recorded in the outbox.
//!    Reads never wait on the database.
//! 3. The **outbox** ([`outbox`]) is a bounded queue of dirty-entity records.
//!    Room is reserved before a change applies; a full queue refuses the
//!    change with a retry hint. An entity already pending is not queued
//!    again (coalescing), so memory stays bounded during an outage.
//!    A [`Ticket`](outbox::Ticket) lets a caller wait until its change set
//!    is committed.
//! 4. The **worker** ([`worker`]) takes records off the queue on its own
//!    thread, batches them (by size or age), reads each entity's newest
//!    state, and writes each batch in one transaction, retrying failures with
//!    [`backoff`], quarantining change sets the database refuses.
//! 5. **PostgreSQL** ([`pg`]): version-guarded upserts (a row applies only
//!    when its version is newer), hydration at start-up, migrations, the
//!    lease, dead letters, the connection pool.
//!
//! Around them: [`engine`] starts a store with its worker in order and stops
//! it in order; [`metrics`] names every metric. Behind features (all on by
//! default): `server` (the reference server: `api`, `config`, `server`,
//! `commands`, the Prometheus exporter), `loadgen`, and `local-postgres` (a
//! private PostgreSQL for development and tests). `docs/ARCHITECTURE.md` in
//! the repository is the map.
//!
//! ## A handler's view
//!
//! Entity kinds are your own types. A handler changes them through the
//! store; persistence follows without another call:
//!
//! ```
//! use outbox::store::{ApplyError, Entity, Store, StoreError};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Account { id: String, balance: i64 }
//!
//! impl Entity for Account {
//!     const KIND: &'static str = "account";
//!     const TABLE: &'static str = "accounts";
//!     fn id(&self) -> &str { &self.id }
//! }
//!
//! // At start-up (the receiver goes to the worker, see below).
//! let (store, _receiver) = Store::builder().kind::<Account>().capacity(10_000).build();
//!
//! // A handler: open two accounts in one change set.
//! store.apply(|set| -> Result<(), StoreError> {
//!     set.insert(Account { id: "alice".into(), balance: 100 })?;
//!     set.insert(Account { id: "bob".into(), balance: 0 })?;
//!     Ok(())
//! }).unwrap();
//!
//! // A transfer touches both: one change set, so the database never shows
//! // one half without the other.
//! let moved = store.apply(|set| -> Result<i64, StoreError> {
//!     set.update::<Account>("alice", |a| a.balance -= 30)?;
//!     let bob = set.update::<Account>("bob", |b| b.balance += 30)?;
//!     Ok(bob.balance)
//! });
//! assert!(matches!(moved, Ok(30)));
//!
//! // A change that fails applies nothing.
//! let failed = store.apply(|set| -> Result<(), StoreError> {
//!     set.update::<Account>("alice", |a| a.balance -= 1000)?;
//!     set.update::<Account>("carol", |c| c.balance += 1000)?; // no such account
//!     Ok(())
//! });
//! assert!(matches!(failed, Err(ApplyError::Failed(StoreError::NotFound { .. }))));
//! assert_eq!(store.get::<Account>("alice").unwrap().balance, 70);
//! assert_eq!(store.get::<Account>("alice").unwrap().version, 2);
//!
//! // Both accounts wait in the outbox (once each, however often changed).
//! assert_eq!(store.outbox().depth, 2);
//! ```
//!
//! Wiring it to PostgreSQL (the table layout is in [`store::Entity`]):
//!
//! ```no_run
//! # use outbox::store::{Entity, Store};
//! # #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! # struct Account { id: String, balance: i64 }
//! # impl Entity for Account {
//! #     const KIND: &'static str = "account";
//! #     const TABLE: &'static str = "accounts";
//! #     fn id(&self) -> &str { &self.id }
//! # }
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use outbox::Engine;
//!
//! let pool = outbox::pg::pool(outbox::pg::parse_url("postgres://localhost/app")?, 8);
//! outbox::pg::migrate(&pool).await?; // the library's lease and dead-letter tables
//! let (store, receiver) = Store::builder().kind::<Account>().build();
//! outbox::pg::ensure_tables(&pool, &store).await?; // or create them in your own migrations
//! // Takes the single-writer lease, replays spill files, loads every
//! // account with its version, then starts the worker.
//! let engine = Engine::builder(store, receiver, pool).spill_dir(".data/spill").start().await?;
//!
//! // A durable change: answer the client only once it is committed.
//! let (_, ticket) = engine.store().apply_durable(|set| set.upsert(Account { id: "carol".into(), balance: 5 }))?;
//! ticket.wait().await?;
//!
//! // On shutdown, after the last request: write everything pending (what
//! // the database does not take in time goes to a spill file).
//! let report = engine.shutdown(Duration::from_secs(30)).await;
//! assert!(report.complete());
//! # Ok(()) }
//! ```

/// The README's Rust examples, compiled (and, where they can, run) as
/// doctests so that they cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod backoff;
pub(crate) mod dense;
pub mod engine;
pub mod entity;
pub mod metrics;
pub mod outbox;
pub mod pg;
pub mod store;
pub mod worker;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod commands;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod connections;
#[cfg(feature = "loadgen")]
pub mod loadgen;
#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "server")]
pub use config::Config;
pub use engine::Engine;
pub use entity::Entity;
#[cfg(feature = "derive")]
pub use outbox_derive::Entity;
#[cfg(feature = "server")]
pub use server::{ServerError, run};
pub use store::Store;
/// Cancels start-up ([`engine::EngineBuilder::cancel_on`]).
pub use tokio_util::sync::CancellationToken;
