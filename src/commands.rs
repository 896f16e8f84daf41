//! The one-off commands of the `outbox` binary besides `serve`: `migrate`
//! and the operator's `dead-letters list|replay|discard`. They use the same
//! database as the server (`DATABASE_URL`, or the private PostgreSQL of the
//! data folder, running or not).

use tracing::info;

use crate::config::Config;
use crate::engine::{Engine, EngineConfig, StartError, operator};
use crate::pg::dead_letters::{self, DeadLetterError};
use crate::pg::{self, DbError};
use crate::server::{Database, ServerError};

/// An operator action on dead letters.
#[derive(Debug, Clone)]
pub enum DeadLetterAction {
    /// Print the unresolved dead letters as JSON.
    List,
    /// Write one to its table and resolve it.
    Replay(i64),
    /// Resolve one without writing it.
    Discard(i64),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The database could not be opened.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A database step failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The dead-letter action failed.
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] StartError),
    /// A server holds the lease: it alone may write entities.
    #[error(
        "a server holds the single-writer lease ({holder}); only it may write entities: use its admin API, {route} (with the admin bearer token), or stop it first"
    )]
    HolderRunning {
        /// The lease holder.
        holder: String,
        /// The dead letter.
        id: i64,
        /// The admin route to use instead.
        route: String,
    },
    /// Interrupted during start-up.
    #[error("interrupted")]
    Cancelled,
}

/// Applies the migrations and exits.
pub async fn migrate(config: &Config) -> Result<(), CommandError> {
    let database = Database::open_shared(config).await?;
    let pool = pg::pool(database.config.clone(), 1);
    let result = crate::api::schema::migrate(&pool).await;
    pool.close();
    database.close().await?;
    let applied = result?;
    info!(applied, "migrations are up to date");
    Ok(())
}

/// Runs a dead-letter action; returns what to print (JSON).
///
/// Listing only reads. Replay and discard write entities, which only the
/// lease holder's store may do: they take the lease themselves (without
/// waiting), start an engine on the reference service's store (spill
/// replay, hydration, quarantined sets), act, and drain. While a server holds
/// the lease they refuse, saying to use its admin API.
pub async fn dead_letters(config: &Config, action: DeadLetterAction) -> Result<String, CommandError> {
    let database = Database::open_shared(config).await?;
    let pool = pg::pool(database.config.clone(), 2);
    let result = match action {
        DeadLetterAction::List => dead_letters::list_unresolved(&pool, i64::MAX)
            .await
            .map(|letters| serde_json::to_string_pretty(&letters).expect("dead letters serialize"))
            .map_err(CommandError::from),
        DeadLetterAction::Replay(id) | DeadLetterAction::Discard(id) => act_as_holder(config, &pool, &action, id).await,
    };
    pool.close();
    database.close().await?;
    result
}

async fn act_as_holder(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    action: &DeadLetterAction,
    id: i64,
) -> Result<String, CommandError> {
    let (store, receiver) = crate::api::store_builder().capacity(config.queue_capacity).build();
    let engine_config = EngineConfig {
        worker: config.worker(),
        spill_dir: Some(config.spill_dir()),
        lease: true,
        holder: format!("{} (outbox dead-letters)", crate::engine::default_holder()),
        wait_for_lease: false,
        lease_ttl: config.lease_ttl(),
        ..EngineConfig::default()
    };
    let started = Engine::builder(store, receiver, pool.clone()).config(engine_config).start().await;
    let engine = match started {
        Ok(engine) => engine,
        Err(StartError::Cancelled) => return Err(CommandError::Cancelled),
        Err(StartError::LeaseHeld { holder }) => {
            return Err(CommandError::HolderRunning { holder, id, route: route(action, id) });
        }
        Err(e) => return Err(e.into()),
    };
    let wait = config.request_timeout();
    let acted = match action {
        DeadLetterAction::Replay(_) => operator::replay(engine.store(), pool, id, wait).await,
        _ => operator::discard(engine.store(), pool, id, wait).await,
    };
    let report = engine.shutdown(config.drain_timeout()).await;
    if !report.complete() {
        tracing::error!(unwritten = report.drain.unwritten, "not every change was written before the drain deadline");
    }
    let resolved = acted?;
    info!(id, members = resolved.len(), "quarantined set resolved");
    Ok(serde_json::to_string_pretty(&resolved).expect("dead letters serialize"))
}

fn route(action: &DeadLetterAction, id: i64) -> String {
    match action {
        DeadLetterAction::Replay(_) => format!("POST /api/admin/dead-letters/{id}/replay"),
        _ => format!("DELETE /api/admin/dead-letters/{id}"),
    }
}
