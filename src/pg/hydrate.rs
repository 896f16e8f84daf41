//! Hydration (DESIGN I9): at start-up, every entity of every kind is loaded
//! from its table with its version, streamed row by row, so versions continue
//! from what the database holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::{StreamExt, pin_mut};
use tokio_postgres::types::ToSql;

use super::DbError;
use super::upsert::JsonbRef;
use crate::store::{HydratedRow, Store};

/// Rows handed to the store per lock acquisition.
const CHUNK: usize = 10_000;

pub(crate) fn select_sql(table: &str) -> String {
    format!("SELECT id, version, deleted, data FROM {}", super::quote_ident(table))
}

/// What hydration loaded.
#[derive(Debug, Clone, Default)]
pub struct HydrationReport {
    /// Entities loaded per kind (tombstones included).
    pub per_kind: Vec<(&'static str, u64)>,
    /// All of them.
    pub total: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Why hydration failed: start-up stops rather than serve partial state.
#[derive(Debug, thiserror::Error)]
pub enum HydrateError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A stored row does not decode into its kind.
    #[error("{kind} {id} in table {table} does not decode: {error}")]
    Decode {
        /// Entity kind.
        kind: &'static str,
        /// Table.
        table: &'static str,
        /// Entity id.
        id: String,
        /// The decoding error.
        error: String,
    },
}

impl From<tokio_postgres::Error> for HydrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(DbError::Postgres(e))
    }
}

/// Loads every entity of every kind of `store` from the database.
pub async fn hydrate(store: &Store, pool: &Pool) -> Result<HydrationReport, HydrateError> {
    let started = Instant::now();
    let client = pool.get().await.map_err(DbError::from)?;
    let mut report = HydrationReport::default();
    for (kind_id, kind) in store.kinds().iter().enumerate() {
        let kind_started = Instant::now();
        let statement = client.prepare_cached(&kind.select_sql).await?;
        let rows = client.query_raw(&statement, std::iter::empty::<&(dyn ToSql + Sync)>()).await?;
        pin_mut!(rows);
        let mut chunk: Vec<HydratedRow> = Vec::with_capacity(CHUNK);
        let mut count = 0u64;
        while let Some(row) = rows.next().await {
            let row = row?;
            let id: &str = row.try_get(0)?;
            let version: i64 = row.try_get(1)?;
            let deleted: bool = row.try_get(2)?;
            let data: Option<JsonbRef<'_>> = row.try_get(3)?;
            let value = match (deleted, data) {
                (false, Some(json)) => Some((kind.decode)(json.0).map_err(|e| HydrateError::Decode {
                    kind: kind.name,
                    table: kind.table,
                    id: id.to_owned(),
                    error: e.to_string(),
                })?),
                (false, None) => {
                    return Err(HydrateError::Decode {
                        kind: kind.name,
                        table: kind.table,
                        id: id.to_owned(),
                        error: "a live row has no data".into(),
                    });
                }
                (true, _) => None,
            };
            chunk.push((Arc::from(id), u64::try_from(version).unwrap_or(0), value));
            count += 1;
            if chunk.len() == CHUNK {
                store.hydrate(kind_id, std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
            }
        }
        store.hydrate(kind_id, chunk);
        kind.hydrated.set(count as f64);
        tracing::info!(
            kind = kind.name,
            entities = count,
            elapsed_ms = kind_started.elapsed().as_millis() as u64,
            "hydrated"
        );
        report.per_kind.push((kind.name, count));
        report.total += count;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}
