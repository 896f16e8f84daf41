//! The engine: a store, hydrated from PostgreSQL, with its worker running.
//! What a server holds for its lifetime.

use std::time::Duration;

use deadpool_postgres::Pool;

use crate::outbox::OutboxReceiver;
use crate::pg::hydrate::{HydrateError, HydrationReport, hydrate};
use crate::store::Store;
use crate::worker::{DrainReport, Worker, WorkerConfig};

/// A hydrated store with its worker. Build the store with
/// [`Store::builder`], start the engine before serving, and
/// [`shutdown`](Self::shutdown) it after the last request.
pub struct Engine {
    store: Store,
    worker: Worker,
}

impl Engine {
    /// Loads every entity of the store's kinds from the database (I9), then
    /// starts the worker. The store must not have been changed yet.
    pub async fn start(
        store: Store,
        receiver: OutboxReceiver,
        pool: Pool,
        config: WorkerConfig,
    ) -> Result<(Self, HydrationReport), HydrateError> {
        let report = hydrate(&store, &pool).await?;
        tracing::info!(entities = report.total, elapsed_ms = report.elapsed.as_millis() as u64, "hydration finished");
        let worker = Worker::start(store.clone(), receiver, pool, config);
        Ok((Self { store, worker }, report))
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stops taking changes and writes everything pending, within
    /// `deadline` (I10).
    pub async fn shutdown(self, deadline: Duration) -> DrainReport {
        self.worker.drain(deadline).await
    }
}
