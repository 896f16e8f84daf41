//! The dead-letter table (`outbox_dead_letters`): records the database
//! refuses for good, kept for operators (DESIGN I8).

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};

use super::DbError;

/// A quarantined record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The dead letter's id.
    pub id: i64,
    /// Entity kind.
    pub kind: String,
    /// Entity id.
    pub entity_id: String,
    /// The version that failed.
    pub version: i64,
    /// The entity as it was sent (absent for a tombstone).
    #[schema(value_type = Option<Object>)]
    pub payload: Option<serde_json::Value>,
    /// Whether the record was a delete.
    pub deleted: bool,
    /// The database's SQLSTATE.
    pub sqlstate: Option<String>,
    /// The database's message.
    pub message: String,
    /// Failed attempts.
    pub attempts: i32,
    /// First failure.
    pub first_failed_at: DateTime<Utc>,
    /// Latest failure.
    pub last_failed_at: DateTime<Utc>,
    /// When it was resolved (replayed, discarded, or superseded by a
    /// committed newer version).
    pub resolved_at: Option<DateTime<Utc>>,
    /// How it was resolved.
    pub resolution: Option<String>,
}

const COLUMNS: &str = "id, kind, entity_id, version, payload, deleted, sqlstate, message, attempts, \
                       first_failed_at, last_failed_at, resolved_at, resolution";

fn from_row(row: &tokio_postgres::Row) -> Result<DeadLetter, tokio_postgres::Error> {
    Ok(DeadLetter {
        id: row.try_get(0)?,
        kind: row.try_get(1)?,
        entity_id: row.try_get(2)?,
        version: row.try_get(3)?,
        payload: row.try_get(4)?,
        deleted: row.try_get(5)?,
        sqlstate: row.try_get(6)?,
        message: row.try_get(7)?,
        attempts: row.try_get(8)?,
        first_failed_at: row.try_get(9)?,
        last_failed_at: row.try_get(10)?,
        resolved_at: row.try_get(11)?,
        resolution: row.try_get(12)?,
    })
}

/// Unresolved dead letters, oldest first (at most `limit`).
pub async fn list_unresolved(pool: &Pool, limit: i64) -> Result<Vec<DeadLetter>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM outbox_dead_letters WHERE resolved_at IS NULL ORDER BY id LIMIT $1"),
            &[&limit],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// Number of unresolved dead letters.
pub async fn count_unresolved(pool: &Pool) -> Result<i64, DbError> {
    let client = pool.get().await?;
    let row = client.query_one("SELECT count(*) FROM outbox_dead_letters WHERE resolved_at IS NULL", &[]).await?;
    Ok(row.get(0))
}

/// A record to quarantine.
#[derive(Debug, Clone)]
pub(crate) struct NewDeadLetter {
    pub(crate) kind: &'static str,
    pub(crate) entity_id: String,
    pub(crate) version: i64,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) deleted: bool,
    pub(crate) sqlstate: Option<String>,
    pub(crate) message: String,
    pub(crate) attempts: i32,
}

/// Writes dead letters in one transaction. An entity that already has an
/// unresolved dead letter gets it updated (newest version, more attempts)
/// rather than a second one.
pub(crate) async fn record(pool: &Pool, letters: &[NewDeadLetter]) -> Result<(), DbError> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    let statement = transaction
        .prepare_cached(
            "INSERT INTO outbox_dead_letters (kind, entity_id, version, payload, deleted, sqlstate, message, attempts)
             VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8)
             ON CONFLICT (kind, entity_id) WHERE resolved_at IS NULL DO UPDATE SET
               version = EXCLUDED.version, payload = EXCLUDED.payload, deleted = EXCLUDED.deleted,
               sqlstate = EXCLUDED.sqlstate, message = EXCLUDED.message,
               attempts = outbox_dead_letters.attempts + EXCLUDED.attempts, last_failed_at = now()",
        )
        .await?;
    for letter in letters {
        let payload = letter.payload.as_deref().map(String::from_utf8_lossy);
        transaction
            .execute(
                &statement,
                &[
                    &letter.kind,
                    &letter.entity_id,
                    &letter.version,
                    &payload.as_deref(),
                    &letter.deleted,
                    &letter.sqlstate,
                    &letter.message,
                    &letter.attempts,
                ],
            )
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// `(kind, entity_id)` of every unresolved dead letter.
pub(crate) async fn unresolved_keys(pool: &Pool) -> Result<Vec<(String, String)>, DbError> {
    let client = pool.get().await?;
    let rows = client.query("SELECT kind, entity_id FROM outbox_dead_letters WHERE resolved_at IS NULL", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Why an operator action on a dead letter failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// No unresolved dead letter has that id.
    #[error("no unresolved dead letter {0}")]
    NotFound(i64),
    /// The dead letter's kind is not one this server writes.
    #[error("dead letter {id} is of kind {kind:?}, which this server does not have")]
    UnknownKind {
        /// Dead letter id.
        id: i64,
        /// Its kind.
        kind: String,
    },
    /// The database refused the record again; the dead letter stays.
    #[error("the database refused the record again ({sqlstate}): {message}")]
    StillRefused {
        /// SQLSTATE.
        sqlstate: String,
        /// The database's message.
        message: String,
    },
    /// The database failed otherwise.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for DeadLetterError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(DbError::Postgres(e))
    }
}

impl From<deadpool_postgres::PoolError> for DeadLetterError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Db(DbError::Pool(e))
    }
}

/// Writes a dead letter's record to its entity table (version-guarded: a
/// newer row in the table is kept) and resolves it, in one transaction. If
/// the database refuses it again, the dead letter stays, with one more
/// attempt counted. `table_of` maps a kind to its table.
pub async fn replay(
    pool: &Pool,
    id: i64,
    table_of: impl Fn(&str) -> Option<&'static str>,
) -> Result<DeadLetter, DeadLetterError> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    let row = transaction
        .query_opt(
            &format!("SELECT {COLUMNS} FROM outbox_dead_letters WHERE id = $1 AND resolved_at IS NULL FOR UPDATE"),
            &[&id],
        )
        .await?
        .ok_or(DeadLetterError::NotFound(id))?;
    let letter = from_row(&row)?;
    let table = table_of(&letter.kind).ok_or_else(|| DeadLetterError::UnknownKind { id, kind: letter.kind.clone() })?;
    let payload = if letter.deleted { None } else { letter.payload.clone() };
    let written = transaction
        .execute(
            &super::upsert_sql(table),
            &[&vec![letter.entity_id.as_str()], &vec![letter.version], &vec![letter.deleted], &vec![payload]],
        )
        .await;
    if let Err(e) = written {
        let Some(db) = e.as_db_error() else { return Err(e.into()) };
        let (sqlstate, message) = (db.code().code().to_owned(), db.message().to_owned());
        drop(transaction);
        client
            .execute(
                "UPDATE outbox_dead_letters SET attempts = attempts + 1, last_failed_at = now(), sqlstate = $2, message = $3
                 WHERE id = $1",
                &[&id, &sqlstate, &message],
            )
            .await?;
        return Err(DeadLetterError::StillRefused { sqlstate, message });
    }
    let row = transaction
        .query_one(
            &format!(
                "UPDATE outbox_dead_letters SET resolved_at = now(), resolution = 'replayed' WHERE id = $1 RETURNING {COLUMNS}"
            ),
            &[&id],
        )
        .await?;
    let resolved = from_row(&row)?;
    transaction.commit().await?;
    Ok(resolved)
}

/// Resolves a dead letter without writing it: the operator accepts that
/// this version of the entity is not in the database.
pub async fn discard(pool: &Pool, id: i64) -> Result<DeadLetter, DeadLetterError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!(
                "UPDATE outbox_dead_letters SET resolved_at = now(), resolution = 'discarded'
                 WHERE id = $1 AND resolved_at IS NULL RETURNING {COLUMNS}"
            ),
            &[&id],
        )
        .await?
        .ok_or(DeadLetterError::NotFound(id))?;
    Ok(from_row(&row)?)
}
