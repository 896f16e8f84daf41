//! The dead-letter table (`outbox_dead_letters`): change sets the database
//! refuses for good, or that conflict with versions written elsewhere, kept
//! whole for operators. Every member of a quarantined set has a dead letter
//! carrying the set's quarantine id.
//!
//! This module reads and records dead letters. Replaying or discarding a
//! set writes entity tables, and that only ever happens through the lease
//! holder's store (see `engine::operator`), never from here.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};

use super::DbError;

/// Why a set was quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The database refuses a row of it for good (a constraint, bad data).
    Refused,
    /// The database holds a version of a row of it that this process did
    /// not write.
    Conflict,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Conflict => "conflict",
        }
    }

    fn parse(text: &str) -> Self {
        if text == "conflict" { Self::Conflict } else { Self::Refused }
    }
}

/// A quarantined record: one member of a quarantined change set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeadLetter {
    /// The dead letter's id.
    pub id: i64,
    /// The quarantined set it belongs to: its members are replayed or
    /// discarded together.
    pub quarantine_id: i64,
    /// Why the set was quarantined.
    pub reason: Reason,
    /// Whether this member is the one the database refused (or that was
    /// in conflict); the others were quarantined with it.
    pub cause: bool,
    /// Entity kind.
    pub kind: String,
    /// Entity id.
    pub entity_id: String,
    /// The version that was not written.
    pub version: i64,
    /// The version the database held when the set was quarantined (absent
    /// for dead letters older than sets).
    pub base_version: Option<i64>,
    /// In a conflict: the version the database holds (absent: no row).
    pub database_version: Option<i64>,
    /// The entity as it was sent (absent for a tombstone).
    #[cfg_attr(feature = "server", schema(value_type = Option<Object>))]
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
    /// committed newer version of its set).
    pub resolved_at: Option<DateTime<Utc>>,
    /// How it was resolved.
    pub resolution: Option<String>,
}

const COLUMNS: &str = "id, quarantine_id, reason, cause, kind, entity_id, version, base_version, database_version, \
                       payload, payload_text, deleted, sqlstate, message, attempts, first_failed_at, last_failed_at, \
                       resolved_at, resolution";

fn from_row(row: &tokio_postgres::Row) -> Result<DeadLetter, tokio_postgres::Error> {
    let payload: Option<serde_json::Value> = row.try_get(9)?;
    let payload_text: Option<String> = row.try_get(10)?;
    let payload = payload
        .or_else(|| payload_text.map(|text| serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))));
    Ok(DeadLetter {
        id: row.try_get(0)?,
        quarantine_id: row.try_get(1)?,
        reason: Reason::parse(row.try_get(2)?),
        cause: row.try_get(3)?,
        kind: row.try_get(4)?,
        entity_id: row.try_get(5)?,
        version: row.try_get(6)?,
        base_version: row.try_get(7)?,
        database_version: row.try_get(8)?,
        payload,
        deleted: row.try_get(11)?,
        sqlstate: row.try_get(12)?,
        message: row.try_get(13)?,
        attempts: row.try_get(14)?,
        first_failed_at: row.try_get(15)?,
        last_failed_at: row.try_get(16)?,
        resolved_at: row.try_get(17)?,
        resolution: row.try_get(18)?,
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

/// Every unresolved dead letter, by quarantine id (for start-up).
pub(crate) async fn all_unresolved(pool: &Pool) -> Result<Vec<DeadLetter>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM outbox_dead_letters WHERE resolved_at IS NULL ORDER BY quarantine_id, id"),
            &[],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// The unresolved dead letters of the set that dead letter `id` belongs
/// to (empty when `id` is not unresolved).
pub async fn set_of(pool: &Pool, id: i64) -> Result<Vec<DeadLetter>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM outbox_dead_letters WHERE resolved_at IS NULL AND quarantine_id =
                   (SELECT quarantine_id FROM outbox_dead_letters WHERE id = $1 AND resolved_at IS NULL)
                 ORDER BY id"
            ),
            &[&id],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// Dead letters by id, resolved or not.
pub async fn by_ids(pool: &Pool, ids: &[i64]) -> Result<Vec<DeadLetter>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(&format!("SELECT {COLUMNS} FROM outbox_dead_letters WHERE id = ANY($1) ORDER BY id"), &[&ids])
        .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// Number of unresolved dead letters.
pub async fn count_unresolved(pool: &Pool) -> Result<i64, DbError> {
    let client = pool.get().await?;
    let row = client.query_one("SELECT count(*) FROM outbox_dead_letters WHERE resolved_at IS NULL", &[]).await?;
    Ok(row.get(0))
}

/// One member of a set to quarantine.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// Entity kind.
    pub kind: &'static str,
    /// Entity id.
    pub entity_id: String,
    /// The version not written.
    pub version: i64,
    /// The entity's JSON (absent for a tombstone).
    pub payload: Option<Vec<u8>>,
    /// A tombstone.
    pub deleted: bool,
    /// The database's SQLSTATE.
    pub sqlstate: Option<String>,
    /// What happened.
    pub message: String,
    /// Attempts that included it.
    pub attempts: i32,
    /// This member is the one refused (or in conflict).
    pub cause: bool,
    /// The version the database holds (0: no row).
    pub base_version: i64,
    /// In a conflict: the version the database holds.
    pub database_version: Option<i64>,
}

/// A set to quarantine: its members' dead letters.
#[derive(Debug, Clone)]
pub struct NewSet {
    /// Why.
    pub reason: Reason,
    /// One per member.
    pub letters: Vec<NewDeadLetter>,
}

/// Why dead letters were not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The lease's epoch is not the recorder's: another process owns the
    /// database, and this one records nothing more.
    #[error("the single-writer lease moved to epoch {current:?} (ours is {ours}); not recording")]
    Fenced {
        /// The recorder's epoch.
        ours: u64,
        /// The epoch in the lease row.
        current: Option<u64>,
    },
    /// The lease is ours but expired by the database's clock: it is renewed
    /// first, then the record is retried.
    #[error("the single-writer lease has lapsed; waiting to renew it")]
    Lapsed,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

super::from_driver_errors!(RecordError);

const INSERT_SQL: &str = "INSERT INTO outbox_dead_letters (kind, entity_id, version, payload, payload_text, deleted, \
       sqlstate, message, attempts, quarantine_id, reason, cause, base_version, database_version)
     VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
     ON CONFLICT (kind, entity_id) WHERE resolved_at IS NULL DO UPDATE SET
       version = EXCLUDED.version, payload = EXCLUDED.payload, payload_text = EXCLUDED.payload_text,
       deleted = EXCLUDED.deleted, sqlstate = EXCLUDED.sqlstate, message = EXCLUDED.message,
       attempts = outbox_dead_letters.attempts + EXCLUDED.attempts, last_failed_at = now(),
       quarantine_id = EXCLUDED.quarantine_id, reason = EXCLUDED.reason, cause = EXCLUDED.cause,
       base_version = EXCLUDED.base_version, database_version = EXCLUDED.database_version";

/// Writes the dead letters of `sets` in one transaction, fenced like a
/// flush when `epoch` is given, and returns each set's quarantine id. A
/// member that already has an unresolved dead letter gets it updated
/// (newest version, more attempts, the new set). A payload that jsonb
/// refuses (it is often what the database refused in the first place) is
/// kept as text instead; the other letters keep theirs as jsonb.
pub async fn record(pool: &Pool, epoch: Option<u64>, sets: &[NewSet]) -> Result<Vec<u64>, RecordError> {
    let mut client = pool.get().await?;
    let mut transaction = client.transaction().await?;
    if let Some(ours) = epoch {
        let current = transaction.query_opt(super::lease::FENCE_SQL, &[&super::lease::LEASE_NAME]).await?;
        // Recorded only while the lease is ours; an expired one is renewed
        // first (the record is retried).
        match super::lease::Fence::of(current.as_ref(), ours) {
            super::lease::Fence::Ours => {}
            super::lease::Fence::Expired => return Err(RecordError::Lapsed),
            super::lease::Fence::Taken(current) => return Err(RecordError::Fenced { ours, current }),
        }
    }
    let statement = transaction.prepare_cached(INSERT_SQL).await?;
    let mut ids = Vec::with_capacity(sets.len());
    for set in sets {
        let id: i64 = transaction.query_one("SELECT nextval('outbox_quarantine_ids')", &[]).await?.get(0);
        for letter in &set.letters {
            let text = letter.payload.as_deref().map(String::from_utf8_lossy);
            let savepoint = transaction.savepoint("dead_letter").await?;
            let reason = set.reason.as_str();
            match insert(&savepoint, &statement, letter, id, reason, text.as_deref(), None).await {
                Ok(_) => savepoint.commit().await?,
                Err(e) if text.is_some() && e.code().is_some_and(|c| c.code().starts_with("22")) => {
                    savepoint.rollback().await?;
                    tracing::warn!(kind = letter.kind, id = %letter.entity_id, error = %super::ErrorText(&e),
                        "a dead letter's payload is refused as jsonb; keeping it as text");
                    insert(&transaction, &statement, letter, id, reason, None, text.as_deref()).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        ids.push(id as u64);
    }
    transaction.commit().await?;
    Ok(ids)
}

/// Inserts (or updates) one dead letter, with its payload as jsonb or as
/// text.
async fn insert(
    transaction: &tokio_postgres::Transaction<'_>,
    statement: &tokio_postgres::Statement,
    letter: &NewDeadLetter,
    set: i64,
    reason: &str,
    jsonb: Option<&str>,
    text: Option<&str>,
) -> Result<u64, tokio_postgres::Error> {
    transaction
        .execute(
            statement,
            &[
                &letter.kind,
                &letter.entity_id,
                &letter.version,
                &jsonb,
                &text,
                &letter.deleted,
                &letter.sqlstate,
                &letter.message,
                &letter.attempts,
                &set,
                &reason,
                &letter.cause,
                &letter.base_version,
                &letter.database_version,
            ],
        )
        .await
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
    /// The quarantined state is neither in memory nor in the dead letter:
    /// it cannot be replayed, only discarded.
    #[error(
        "dead letter {id}: version {version} of {kind} {entity_id} is neither held in memory nor readable from its payload ({reason}); discard the set instead"
    )]
    NotReplayable {
        /// Dead letter id.
        id: i64,
        /// Entity kind.
        kind: String,
        /// Entity id.
        entity_id: String,
        /// The quarantined version.
        version: i64,
        /// Why the payload cannot be used.
        reason: String,
    },
    /// The set is being written again, with a later change of a member
    /// (which brings that change's other entities into it), or was written
    /// or quarantined again since its dead letters were read: they are not
    /// the set as memory holds it. Nothing was changed; the same id can be
    /// acted on once that write ends (unless it resolved the set).
    #[error(
        "the quarantined set of dead letter {0} is being written again with a later change of one of its members (or was just written); nothing was changed: try again once that write ends"
    )]
    BeingWritten(i64),
    /// The database refused the set again; its dead letters stay.
    #[error("the database refused the set again: {0}")]
    StillRefused(String),
    /// The server is not the lease holder, is starting or stopping: only
    /// the holder's store may write entities.
    #[error("{0}")]
    Unavailable(String),
    /// The write was not confirmed in time; it goes on in the background.
    #[error("the set was not written within {0:?}; it stays queued and is written when the database answers")]
    TimedOut(std::time::Duration),
    /// The database failed otherwise.
    #[error(transparent)]
    Db(#[from] DbError),
}

super::from_driver_errors!(DeadLetterError);
