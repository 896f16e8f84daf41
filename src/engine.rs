//! The engine: a store with its worker, started in the order of DESIGN I9
//! (lease, spill replay, hydration) and stopped in the order of I10 (drain,
//! then spill what could not be written). What a server holds for its
//! lifetime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics as m;
use crate::outbox::OutboxReceiver;
use crate::outbox::spill::{self, SpillError};
use crate::pg::hydrate::{HydrateError, HydrationReport, hydrate};
use crate::pg::lease::{Lease, LeaseState};
use crate::pg::upsert::{self, WriteError};
use crate::pg::{DbError, dead_letters};
use crate::store::Store;
use crate::worker::classify::{ErrorClass, classify_postgres};
use crate::worker::{DrainReport, Worker, WorkerConfig};

/// How often the database is checked (and the unresolved dead letters
/// counted) while the engine runs, idle or not.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { worker: WorkerConfig::default(), spill_dir: None, lease: true, holder: default_holder() }
    }
}

/// `host:pid`, naming this process in the lease row.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!("{}:{}", if host.is_empty() { "localhost" } else { &host }, std::process::id())
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
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
    /// Hydration failed.
    #[error(transparent)]
    Hydrate(#[from] HydrateError),
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
    worker: Worker,
    lease: Option<Arc<Lease>>,
    spill_dir: Option<PathBuf>,
    background: CancellationToken,
}

impl Engine {
    /// Starts in the order of I9: takes the lease (waiting while another
    /// process holds it), replays spill files, hydrates every entity, loads
    /// the unresolved dead letters, then starts the worker. `progress`
    /// hears each step (for `/readyz`). Returns `None` if `cancel` fires
    /// first.
    pub async fn start(
        store: Store,
        receiver: OutboxReceiver,
        pool: Pool,
        db_config: &tokio_postgres::Config,
        config: EngineConfig,
        cancel: &CancellationToken,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<Option<(Self, HydrationReport)>, EngineError> {
        let background = cancel.child_token();
        let lease = if config.lease {
            progress("taking the single-writer lease");
            let acquired = retry_startup("lease", cancel, || {
                Lease::acquire(db_config, &config.holder, cancel, |holder| {
                    progress(&format!("waiting for the single-writer lease held by {holder}"))
                })
            })
            .await;
            let Some(Some(lease)) = acquired else { return Ok(None) };
            tokio::spawn(lease.clone().keep(background.clone()));
            Some(lease)
        } else {
            None
        };

        if let Some(dir) = &config.spill_dir {
            for path in spill::list(dir)? {
                progress(&format!("replaying spill file {}", path.display()));
                if !replay_spill(&store, &pool, lease.as_deref(), &path, cancel).await? {
                    return Ok(None);
                }
            }
        }

        progress("hydrating");
        let Some(report) = retry_hydrate(&store, &pool, cancel).await? else { return Ok(None) };
        info!(entities = report.total, elapsed_ms = report.elapsed.as_millis() as u64, "hydration finished");

        let Some(keys) = retry_startup("dead letters", cancel, || dead_letters::unresolved_keys(&pool)).await else {
            return Ok(None);
        };
        for (kind, id) in &keys {
            store.mark_dead_lettered(kind, id);
        }
        m::dead_letters_unresolved(keys.len() as i64);
        if !keys.is_empty() {
            warn!(dead_letters = keys.len(), "unresolved dead letters are waiting for an operator");
        }
        m::engine_started();
        tokio::spawn(watch_database(store.clone(), pool.clone(), background.clone()));

        let worker = Worker::start(store.clone(), receiver, pool, config.worker, lease.clone());
        Ok(Some((Self { store, worker, lease, spill_dir: config.spill_dir, background }, report)))
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

    /// Stops taking changes and writes everything pending within `deadline`
    /// (I10). What is still unwritten then (the database is away, or the
    /// lease was lost) goes to a spill file, replayed at the next start.
    pub async fn shutdown(self, deadline: Duration) -> ShutdownReport {
        let lease_lost = self.lease.as_ref().is_some_and(|l| l.state() == LeaseState::Lost);
        let drain = self.worker.drain(deadline).await;
        let mut spilled = None;
        if !drain.complete() {
            let records = self.store.unwritten();
            match &self.spill_dir {
                Some(dir) if !records.is_empty() => {
                    let reason = if lease_lost { "lease lost" } else { "drain deadline passed" };
                    match spill::write(dir, reason, &records) {
                        Ok(path) => {
                            m::spilled(records.len());
                            error!(records = records.len(), path = %path.display(), reason,
                                "spilled unwritten changes to a file; the next start replays them");
                            spilled = Some((records.len(), path));
                        }
                        Err(e) => {
                            error!(error = %e, records = records.len(), "could not write the spill file; these changes are lost")
                        }
                    }
                }
                Some(_) => {}
                None => error!(records = records.len(), "no spill folder: unwritten changes are lost"),
            }
        }
        self.background.cancel();
        if let Some(lease) = &self.lease {
            lease.release().await;
        }
        ShutdownReport { drain, spilled, lease_lost }
    }
}

/// Replays one spill file in one transaction (fenced by the lease) and
/// removes it after the commit. `Ok(false)`: cancelled.
async fn replay_spill(
    store: &Store,
    pool: &Pool,
    lease: Option<&Lease>,
    path: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<bool, EngineError> {
    let records = spill::read(path)?;
    let encoded = upsert::encode_spilled(store.kinds(), &records)
        .map_err(|reason| EngineError::SpillContent { path: path.to_path_buf(), reason })?;
    let epoch = lease.map(Lease::epoch);
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let mut client = pool.get().await?;
            upsert::write(&mut client, store.kinds(), &encoded, epoch, &[]).await
        }
        .await;
        match attempt {
            Ok(()) => break,
            Err(WriteError::Fenced { .. }) => return Err(EngineError::LeaseLost),
            Err(WriteError::Postgres(e)) if classify_postgres(&e).class == ErrorClass::Permanent => {
                return Err(EngineError::SpillContent {
                    path: path.to_path_buf(),
                    reason: format!("the database refuses its records: {e}"),
                });
            }
            Err(e) => {
                error!(error = %e, path = %path.display(), "cannot replay the spill file yet; retrying");
                if cancel.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
                    return Ok(false);
                }
                delay = (delay * 2).min(STARTUP_RETRY_MAX);
            }
        }
    }
    spill::remove(path)?;
    info!(records = records.len(), path = %path.display(), "replayed and removed a spill file");
    Ok(true)
}

async fn retry_hydrate(
    store: &Store,
    pool: &Pool,
    cancel: &CancellationToken,
) -> Result<Option<HydrationReport>, EngineError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match hydrate(store, pool).await {
            Ok(report) => return Ok(Some(report)),
            // A row that does not decode will not decode next time either.
            Err(e @ HydrateError::Decode { .. }) => return Err(e.into()),
            Err(HydrateError::Db(e)) => {
                error!(error = %e, "hydration failed; retrying");
                if cancel.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
                    return Ok(None);
                }
                delay = (delay * 2).min(STARTUP_RETRY_MAX);
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
    let mut delay = Duration::from_millis(100);
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
                cancel.run_until_cancelled(tokio::time::sleep(delay)).await?;
                delay = (delay * 2).min(STARTUP_RETRY_MAX);
            }
        }
    }
}

/// Every few seconds, even when idle: checks that the database answers
/// (`outbox_db_up`, the status route) and reads the unresolved dead letters.
async fn watch_database(store: Store, pool: Pool, cancel: CancellationToken) {
    loop {
        if cancel.run_until_cancelled(tokio::time::sleep(HEALTH_INTERVAL)).await.is_none() {
            return;
        }
        let up = matches!(tokio::time::timeout(Duration::from_secs(2), crate::pg::ping(&pool)).await, Ok(Ok(())));
        m::database_reachable(up);
        store.health().reachable(up);
        if up
            && let Ok(Ok(count)) =
                tokio::time::timeout(Duration::from_secs(2), dead_letters::count_unresolved(&pool)).await
        {
            m::dead_letters_unresolved(count);
        }
    }
}
