//! The engine: a store with its worker, started in order (lease, spill
//! replay, hydration, quarantined sets) and stopped in order (drain, then
//! spill what could not be written). What a server holds for its lifetime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{error, info, warn};

use crate::backoff;
use crate::metrics as m;
use crate::outbox::OutboxReceiver;
use crate::outbox::spill::SpillError;
use crate::pg::hydrate::{HydrateError, HydrationReport, hydrate};
use crate::pg::lease::{Attempt, Lease, LeaseState};
use crate::pg::{DbError, dead_letters};
use crate::store::Store;
use crate::worker::health::{Health, LeaseView, Role};
use crate::worker::{DrainReport, Worker, WorkerConfig};

mod builder;
pub mod operator;
mod spilling;
mod standby;
mod startup;

pub use builder::EngineBuilder;
use standby::Standby;
use startup::{load_quarantine, prepare};

/// How often the database is checked (and the unresolved dead letters
/// counted) while the engine runs, idle or not.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// How long one health check may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest pause between two attempts of a start-up step that needs the
/// database.
const STARTUP_RETRY_MAX: Duration = Duration::from_secs(5);

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Batching and retries.
    pub worker: WorkerConfig,
    /// Where spill files go (and are replayed from). `None`: changes not
    /// written by the drain deadline are reported, not kept.
    pub spill_dir: Option<PathBuf>,
    /// Take the single-writer lease (needs the `outbox_lease` table of the
    /// migrations). Without it nothing stops two processes from writing.
    pub lease: bool,
    /// This process's name in the lease row and logs.
    pub holder: String,
    /// Wait while another process holds the lease (a server); when false,
    /// start-up fails at once with [`StartError::LeaseHeld`] (a one-off
    /// command).
    pub wait_for_lease: bool,
    /// Where the engine records what it sees of the database; share it
    /// with whatever reports health (the server's readiness and status
    /// routes) before starting.
    pub health: Arc<Health>,
    /// How long the lease lasts unless renewed (renewed every third of it);
    /// a frozen or cut-off holder is replaced after about this long.
    pub lease_ttl: Duration,
}

/// Where start-up stands, for readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// A step under way.
    Step(&'a str),
    /// Another process holds the lease: this one is a hot standby,
    /// hydrated and following what the holder commits.
    Standby {
        /// The holder's name.
        holder: &'a str,
    },
}

impl std::fmt::Display for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Step(step) => f.write_str(step),
            Self::Standby { holder } => write!(f, "standby: following the lease holder {holder}"),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            worker: WorkerConfig::default(),
            spill_dir: None,
            lease: true,
            holder: default_holder(),
            wait_for_lease: true,
            health: Arc::default(),
            lease_ttl: crate::pg::lease::DEFAULT_TTL,
        }
    }
}

/// `host:pid`, naming this process in the lease row.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!("{}:{}", if host.is_empty() { "localhost" } else { &host }, std::process::id())
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A spill file is unreadable; it was kept.
    #[error(transparent)]
    Spill(#[from] SpillError),
    /// A spill file holds records this store cannot write; it was kept.
    #[error("spill file {path}: {reason}; it was kept")]
    SpillContent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The lease was lost while replaying a spill file.
    #[error("the single-writer lease was taken by another process during start-up")]
    LeaseLost,
    /// Another process holds the lease, and the engine was asked not to
    /// wait for it.
    #[error("the single-writer lease is held by {holder}: a server is running on this database")]
    LeaseHeld {
        /// The holder's name.
        holder: String,
    },
    /// Hydration failed.
    #[error(transparent)]
    Hydrate(#[from] HydrateError),
    /// A kind's table is missing, or lacks a column: start-up stops at
    /// once, saying what to create.
    #[error(transparent)]
    Table(crate::pg::TableError),
    /// The cancellation token given to [`EngineBuilder::cancel_on`] fired
    /// before start-up finished; nothing was started.
    #[error("start-up was cancelled")]
    Cancelled,
}

/// How a shutdown ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The drain.
    pub drain: DrainReport,
    /// Records written to a spill file, and the file.
    pub spilled: Option<(usize, PathBuf)>,
    /// Whether the lease had been lost.
    pub lease_lost: bool,
}

impl ShutdownReport {
    /// Whether every change reached the database.
    pub fn complete(&self) -> bool {
        self.drain.complete()
    }
}

/// A hydrated store with its worker.
pub struct Engine {
    store: Store,
    pool: Pool,
    health: Arc<Health>,
    worker: Worker,
    lease: Option<Arc<Lease>>,
    spill_dir: Option<PathBuf>,
    /// Stops the background tasks when the engine shuts down or is dropped.
    background: DropGuard,
    hydration: HydrationReport,
}

impl Engine {
    /// An engine for `store`, whose outbox `receiver` feeds the worker,
    /// writing through `pool`. Every setting has a default; see
    /// [`EngineBuilder`].
    pub fn builder(store: Store, receiver: OutboxReceiver, pool: Pool) -> EngineBuilder {
        EngineBuilder::new(store, receiver, pool)
    }

    /// Starts in order (rule *Ready after start-up*): checks every kind's
    /// table, takes the lease, or, while another process holds it, waits as
    /// a hot standby (hydrated, following what the holder commits) until it
    /// can take it over; replays spill files; hydrates every entity (or
    /// catches up); loads the quarantined sets; then starts the worker.
    /// `progress` hears each step (for `/readyz`). `None` if `cancel` fires
    /// first.
    async fn start(
        store: Store,
        receiver: OutboxReceiver,
        pool: Pool,
        config: EngineConfig,
        cancel: &CancellationToken,
        progress: &(dyn Fn(Progress<'_>) + Sync),
    ) -> Result<Option<Self>, StartError> {
        // Background tasks (renewing the lease, watching the database,
        // pruning the commit feed) do not stop with `cancel`: a shutdown
        // still drains under the lease. They stop with the engine, at its
        // shutdown or drop, or here when start-up ends early.
        let background = CancellationToken::new();
        let stop_background = background.clone().drop_guard();
        // Every kind's table and columns, before anything else: a missing
        // one is a deployment mistake, said at once, not retried.
        progress(Progress::Step("checking tables"));
        let checked = retry_startup("table check", cancel, || async {
            match crate::pg::tables::check(&pool, store.kinds()).await {
                Ok(()) => Ok(Ok(())),
                Err(crate::pg::TableError::Db(e)) => Err(e),
                Err(e) => Ok(Err(e)),
            }
        })
        .await;
        match checked {
            None => return Ok(None),
            Some(Err(e)) => return Err(StartError::Table(e)),
            Some(Ok(())) => {}
        }
        let (lease, hydration) = if !config.lease {
            let Some(report) = prepare(&store, &pool, None, &config, cancel, progress).await? else { return Ok(None) };
            (None, report)
        } else {
            let Some((lease, report)) = lead(&store, &pool, &config, cancel, progress, &background).await? else {
                return Ok(None);
            };
            tokio::spawn(prune_feed(pool.clone(), background.clone()));
            (Some(lease), report)
        };

        progress(Progress::Step("loading quarantined change sets"));
        let Some(letters) = retry_startup("dead letters", cancel, || dead_letters::all_unresolved(&pool)).await else {
            return Ok(None);
        };
        m::dead_letters_unresolved(letters.len() as i64);
        config.health.dead_letters(letters.len() as i64);
        if !letters.is_empty() {
            warn!(dead_letters = letters.len(), "unresolved dead letters are waiting for an operator");
        }
        load_quarantine(&store, letters);
        m::engine_started();
        tokio::spawn(watch_database(config.health.clone(), pool.clone(), background.clone()));

        let worker =
            Worker::start(store.clone(), receiver, pool.clone(), config.worker, lease.clone(), config.health.clone());
        let health = config.health;
        Ok(Some(Self {
            store,
            pool,
            worker,
            lease,
            health,
            spill_dir: config.spill_dir,
            background: stop_background,
            hydration,
        }))
    }

    /// What hydration loaded at start-up.
    pub fn hydration(&self) -> &HydrationReport {
        &self.hydration
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Resolves if another process takes the lease: this one must stop
    /// (never, without a lease).
    pub async fn lease_lost(&self) {
        match &self.lease {
            Some(lease) => lease.lost().await,
            None => std::future::pending().await,
        }
    }

    /// The database pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// What the engine last saw of the database.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Stops taking changes and writes everything pending within `deadline`.
    /// What is still unwritten then (the database is away, or the lease was
    /// lost) goes to a spill file, replayed at the next start.
    pub async fn shutdown(self, deadline: Duration) -> ShutdownReport {
        let lease_lost = self.lease.as_ref().is_some_and(|l| l.state() == LeaseState::Lost);
        let drain = self.worker.drain(deadline).await;
        let mut spilled = None;
        if !drain.complete() {
            let reason = if lease_lost { "lease lost" } else { "drain deadline passed" };
            let epoch = self.lease.as_ref().map(|lease| lease.epoch());
            spilled = spilling::spill(&self.store, self.spill_dir.as_deref(), reason, epoch).await;
        }
        drop(self.background);
        if let Some(lease) = &self.lease {
            lease.release().await;
        }
        ShutdownReport { drain, spilled, lease_lost }
    }
}

/// Takes the lease (or waits for it as a hot standby), then replays spill
/// files and hydrates. `None`: cancelled.
async fn lead(
    store: &Store,
    pool: &Pool,
    config: &EngineConfig,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Progress<'_>) + Sync),
    background: &CancellationToken,
) -> Result<Option<(Arc<Lease>, HydrationReport)>, StartError> {
    progress(Progress::Step("taking the single-writer lease"));
    let taking = || Lease::try_take(pool, &config.holder, config.lease_ttl);
    let Some(attempt) = retry_startup("lease", cancel, taking).await else { return Ok(None) };
    match attempt {
        Attempt::Taken(lease) => {
            hold(&lease, &config.health, background);
            let prepared = prepare(store, pool, Some(&lease), config, cancel, progress).await?;
            Ok(prepared.map(|report| (lease, report)))
        }
        Attempt::Held(row) if !config.wait_for_lease => Err(StartError::LeaseHeld { holder: row.holder }),
        Attempt::Held(row) => {
            let standby = Standby { store, pool, config, cancel, progress };
            standby.wait_and_take_over(row, background).await
        }
    }
}

/// This process holds `lease` now: keeps it renewed, and tells `health`
/// (the status route, readiness) about it until it is lost.
fn hold(lease: &Arc<Lease>, health: &Arc<Health>, background: &CancellationToken) {
    tokio::spawn(lease.clone().keep(background.clone()));
    health.set_lease_handle(lease.clone());
    let (lease, health, cancel) = (lease.clone(), health.clone(), background.clone());
    tokio::spawn(async move {
        health.set_lease(LeaseView::held(lease.epoch(), lease.holder(), lease.expires_at()));
        let mut renewals = lease.renewals();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = lease.lost() => {
                    health.set_lease(LeaseView { role: Role::Fenced, ..LeaseView::held(lease.epoch(), lease.holder(), lease.expires_at()) });
                    return;
                }
                changed = renewals.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let expires_at = *renewals.borrow_and_update();
                    health.set_lease(LeaseView::held(lease.epoch(), lease.holder(), expires_at));
                }
            }
        }
    });
}

/// How long the commit feed keeps an entry: a standby that fell further
/// behind than this hydrates again.
const FEED_KEPT: Duration = Duration::from_secs(600);

/// The holder prunes the commit feed now and then.
async fn prune_feed(pool: Pool, cancel: CancellationToken) {
    loop {
        if cancel.run_until_cancelled(tokio::time::sleep(Duration::from_secs(60))).await.is_none() {
            return;
        }
        match crate::pg::feed::prune(&pool, FEED_KEPT).await {
            Ok(pruned) if pruned > 0 => tracing::debug!(pruned, "pruned the commit feed"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot prune the commit feed; retrying later"),
        }
    }
}

pub(super) async fn retry_hydrate(
    store: &Store,
    pool: &Pool,
    cancel: &CancellationToken,
) -> Result<Option<HydrationReport>, StartError> {
    let mut delays = backoff::delays(STARTUP_RETRY_MAX);
    loop {
        match hydrate(store, pool).await {
            Ok(report) => return Ok(Some(report)),
            // A row that does not decode will not decode next time either.
            Err(e @ HydrateError::Decode { .. }) => return Err(e.into()),
            Err(HydrateError::Db(e)) => {
                error!(error = %e, "hydration failed; retrying");
                let delay = delays.next().unwrap_or(STARTUP_RETRY_MAX);
                if cancel.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
                    return Ok(None);
                }
            }
        }
    }
}

/// Retries a start-up step that needs the database until it succeeds: the
/// database may be starting or briefly away. `None`: cancelled.
pub(crate) async fn retry_startup<T, F, Fut>(step: &str, cancel: &CancellationToken, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut delays = backoff::delays(STARTUP_RETRY_MAX);
    let mut failures = 0u32;
    loop {
        match cancel.run_until_cancelled(attempt()).await? {
            Ok(value) => {
                if failures > 0 {
                    info!(step, failures, "start-up step succeeded after retries");
                }
                return Some(value);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    warn!(step, error = %e, "start-up step failed; retrying");
                } else {
                    error!(step, error = %e, failures, "start-up step still failing; retrying");
                }
                let delay = delays.next().unwrap_or(STARTUP_RETRY_MAX);
                cancel.run_until_cancelled(tokio::time::sleep(delay)).await?;
            }
        }
    }
}

/// Every few seconds, even when idle: checks that the database answers
/// (`outbox_db_up`, the status route) and reads the unresolved dead letters.
async fn watch_database(health: Arc<Health>, pool: Pool, cancel: CancellationToken) {
    loop {
        if cancel.run_until_cancelled(tokio::time::sleep(HEALTH_INTERVAL)).await.is_none() {
            return;
        }
        let checked = {
            let _under_way = health.under_way("a health check");
            tokio::time::timeout(HEALTH_TIMEOUT, crate::pg::ping(&pool)).await
        };
        let up = matches!(checked, Ok(Ok(())));
        m::database_reachable(up);
        health.reachable(up);
        if up && let Ok(Ok(count)) = tokio::time::timeout(HEALTH_TIMEOUT, dead_letters::count_unresolved(&pool)).await {
            m::dead_letters_unresolved(count);
            health.dead_letters(count);
        }
    }
}
