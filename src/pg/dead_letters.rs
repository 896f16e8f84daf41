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
