//! The one-off commands of the `outbox` binary besides `serve`: `migrate`
//! and the operator's `dead-letters list|replay|discard`. They use the same
//! database as the server (`DATABASE_URL`, or the private PostgreSQL of the
//! data folder, running or not).

use tracing::info;

use crate::config::Config;
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
}

/// Applies the migrations and exits.
pub async fn migrate(config: &Config) -> Result<(), CommandError> {
    let database = Database::open_shared(config).await?;
    let pool = pg::pool(database.config.clone(), 1);
    let result = pg::migrate(&pool).await;
    pool.close();
    database.close().await?;
    let applied = result?;
    info!(applied, "migrations are up to date");
    Ok(())
}

/// Runs a dead-letter action; returns what to print (JSON).
pub async fn dead_letters(config: &Config, action: DeadLetterAction) -> Result<String, CommandError> {
    let database = Database::open_shared(config).await?;
    let pool = pg::pool(database.config.clone(), 1);
    let (store, _) = crate::api::store_builder().build();
    let tables = store.tables();
    let table_of = |kind: &str| tables.iter().find(|(k, _)| *k == kind).map(|(_, t)| *t);
    let result = async {
        Ok::<_, CommandError>(match action {
            DeadLetterAction::List => {
                let letters = dead_letters::list_unresolved(&pool, i64::MAX).await?;
                serde_json::to_string_pretty(&letters).expect("dead letters serialize")
            }
            DeadLetterAction::Replay(id) => {
                let resolved = dead_letters::replay(&pool, id, table_of).await?;
                info!(id, kind = %resolved.kind, entity = %resolved.entity_id, "dead letter replayed");
                serde_json::to_string_pretty(&resolved).expect("a dead letter serializes")
            }
            DeadLetterAction::Discard(id) => {
                let resolved = dead_letters::discard(&pool, id).await?;
                info!(id, kind = %resolved.kind, entity = %resolved.entity_id, "dead letter discarded");
                serde_json::to_string_pretty(&resolved).expect("a dead letter serializes")
            }
        })
    }
    .await;
    pool.close();
    database.close().await?;
    result
}
