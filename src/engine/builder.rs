//! [`EngineBuilder`]: an engine with defaults, and each setting on its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::{Engine, EngineConfig, Progress, StartError};
use crate::outbox::OutboxReceiver;
use crate::store::Store;
use crate::worker::WorkerConfig;
use crate::worker::health::Health;

/// What hears each start-up step.
type ProgressFn = Box<dyn Fn(Progress<'_>) + Send + Sync>;

/// Builds and starts an [`Engine`] (from [`Engine::builder`]).
///
/// The defaults suit a server: take the single-writer lease (waiting as a
/// hot standby while another process holds it), no spill directory,
/// batches of up to 1000 rows gathered for 5 ms, two writers.
///
/// ```no_run
/// # async fn example(store: outbox::Store, receiver: outbox::outbox::OutboxReceiver,
/// #                  pool: outbox::pg::Pool) -> Result<(), outbox::engine::StartError> {
/// let engine = outbox::Engine::builder(store, receiver, pool)
///     .spill_dir(".data/spill")
///     .holder("api-1")
///     .on_progress(|step| println!("{step}"))
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
pub struct EngineBuilder {
    store: Store,
    receiver: OutboxReceiver,
    pool: Pool,
    config: EngineConfig,
    cancel: CancellationToken,
    progress: ProgressFn,
}

impl EngineBuilder {
    pub(super) fn new(store: Store, receiver: OutboxReceiver, pool: Pool) -> Self {
        Self {
            store,
            receiver,
            pool,
            config: EngineConfig::default(),
            cancel: CancellationToken::new(),
            progress: Box::new(|step| tracing::info!(step = %step, "starting")),
        }
    }

    /// Every setting at once.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Where changes not written by the shutdown deadline go, and where
    /// start-up replays them from. Without it they are reported, not kept.
    pub fn spill_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.spill_dir = Some(dir.into());
        self
    }

    /// Whether to take the single-writer lease (default: yes). Without it
    /// nothing stops two processes from writing the same rows.
    pub fn lease(mut self, take: bool) -> Self {
        self.config.lease = take;
        self
    }

    /// This process's name in the lease row and logs (default `host:pid`).
    pub fn holder(mut self, name: impl Into<String>) -> Self {
        self.config.holder = name.into();
        self
    }

    /// While another process holds the lease: wait as a hot standby
    /// (default), or fail at once with [`StartError::LeaseHeld`] (a one-off
    /// command).
    pub fn wait_for_lease(mut self, wait: bool) -> Self {
        self.config.wait_for_lease = wait;
        self
    }

    /// How long the lease lasts unless renewed (default 10 s): a frozen
    /// holder is replaced after about this long.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// Batching and retries, all at once.
    pub fn worker(mut self, worker: WorkerConfig) -> Self {
        self.config.worker = worker;
        self
    }

    /// Most rows per batch (default 1000).
    pub fn batch_max(mut self, rows: usize) -> Self {
        self.config.worker.batch_max = rows.max(1);
        self
    }

    /// How long a batch waits for more records after its first (default
    /// 5 ms).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.config.worker.linger = linger;
        self
    }

    /// Batches written at once, each on its own connection (default 2).
    pub fn writers(mut self, writers: usize) -> Self {
        self.config.worker.writers = writers.max(1);
        self
    }

    /// Where the engine records what it sees of the database; share it with
    /// whatever reports health.
    pub fn health(mut self, health: Arc<Health>) -> Self {
        self.config.health = health;
        self
    }

    /// Stop start-up when `token` fires ([`StartError::Cancelled`]). Once
    /// started, the engine's background tasks (renewing the lease, watching
    /// the database) run until [`Engine::shutdown`] or until the engine is
    /// dropped, so that a shutdown begun by the same token still drains
    /// under the lease.
    pub fn cancel_on(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    /// Hears each start-up step (default: logged at `info`).
    pub fn on_progress(mut self, progress: impl Fn(Progress<'_>) + Send + Sync + 'static) -> Self {
        self.progress = Box::new(progress);
        self
    }

    /// Starts the engine: checks every kind's table (a missing table or
    /// column fails at once, naming it), takes the lease, replays spill
    /// files, hydrates the store, loads quarantined change sets, and starts
    /// the worker. Steps that need the database are retried while it is
    /// away.
    pub async fn start(self) -> Result<Engine, StartError> {
        Engine::start(self.store, self.receiver, self.pool, self.config, &self.cancel, &*self.progress)
            .await?
            .ok_or(StartError::Cancelled)
    }
}
