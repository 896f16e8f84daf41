//! Hydration (see *Ready after start-up* in docs/ARCHITECTURE.md): at start-up, every entity of every kind is loaded
//! from its table with its version, streamed row by row, so versions continue
//! from what the database holds. How it uses the cores: *Hydration speed*
//! in docs/ARCHITECTURE.md.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::{StreamExt, pin_mut};
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::DbError;
use super::upsert::JsonText;
use crate::entity::{KindId, KindInfo};
use crate::store::{HydratedRow, Store};

/// Rows handed to a decoder, and to the store per lock acquisition.
const CHUNK: usize = 1_024;

/// Threads decoding rows.
const DECODERS: usize = 2;

/// What hydration loaded.
#[derive(Debug, Clone, Default)]
pub struct HydrationReport {
    /// Entities loaded per kind (tombstones included).
    pub per_kind: Vec<(&'static str, u64)>,
    /// All of them.
    pub total: u64,
    /// How long it took.
    pub elapsed: Duration,
    /// The commit feed's last entry in the snapshot hydrated: a standby
    /// follows from here.
    pub feed_cursor: u64,
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
///
/// Rows are streamed on a task of its own and decoded and put into the
/// store (and its indexes) by two blocking threads, so that both cores work.
/// Dropping the returned future stops the streaming at its next row and
/// the decoders before their next chunk.
pub async fn hydrate(store: &Store, pool: &Pool) -> Result<HydrationReport, HydrateError> {
    // A task of its own runs on a runtime worker whatever the caller runs
    // on (the main thread's `block_on`, say), next to the connection's task,
    // which wakes it every few rows: waking a task on the same worker costs
    // far less than waking another thread.
    let (store, pool) = (store.clone(), pool.clone());
    let task = tokio::spawn(async move { load(&store, &pool).await });
    let _stop = AbortOnDrop(task.abort_handle());
    match task.await {
        Ok(result) => result,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only the runtime shutting down cancels it, and then nothing
            // awaits this future any more.
            Err(error) => unreachable!("hydration was cancelled while awaited: {error}"),
        },
    }
}

/// Tells a kind's indexes that loading has ended when hydration stops
/// before its end (an error, or the future dropped), so that what they
/// gathered while loading is indexed for a store that is used on. The
/// runtime drops an aborted task when it gets to it, possibly after a
/// retry has begun; the store then ignores this end (it names its own
/// hydration, no longer the newest).
struct EndLoading {
    store: Store,
    loading: crate::store::Loading,
    armed: bool,
}

impl Drop for EndLoading {
    fn drop(&mut self) {
        if self.armed {
            self.store.hydrated(self.loading);
        }
    }
}

/// Stops a task when dropped (a no-op once the task has finished).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Lets the planner read a large table with parallel workers, for the
/// hydration transaction only. For a `jsonb` table, turning each entity
/// into text is most of the database's work per row, and the select does
/// it in the scan's output, so workers share it (a `json` table holds the
/// text already; its read gains less: 0.77 to 0.86 s against 0.91 s for a
/// million reference items). The planner's default cost of passing a row from a
/// worker to the backend (`parallel_tuple_cost`, 0.1: ten times that of
/// processing a row) outweighs what it reckons a worker saves per row (the
/// conversion counts at its catalog cost, a small fraction of its real
/// one), and keeps a read of every row on one process whatever the table's
/// size; at 0, starting workers pays from about 100,000 rows (of about
/// 350 bytes of JSON each). How many workers: the database's own settings
/// (`max_parallel_workers_per_gather`, the table's size, free worker
/// slots). Set only where the setting exists, so that an engine without it
/// reads as before. The statement's plan, cached with the connection, keeps
/// its workers; only hydration runs that statement.
const PARALLEL_READ: &str = "SELECT set_config(name, '0', true) FROM pg_settings WHERE name = 'parallel_tuple_cost'";

async fn load(store: &Store, pool: &Pool) -> Result<HydrationReport, HydrateError> {
    let started = Instant::now();
    let mut client = pool.get().await.map_err(DbError::from)?;
    // One read-only transaction at REPEATABLE READ for every kind: one
    // snapshot for all of them (at READ COMMITTED each statement would take
    // its own, and a change set committed between two kinds' reads would
    // load half), the pool's statement timeout lifted for this long read,
    // and its tables read by parallel workers where that pays.
    let client = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    client.batch_execute(&format!("SET LOCAL statement_timeout = 0; {PARALLEL_READ}")).await?;
    // Where a standby follows from: the commit feed's head in this snapshot.
    let feed_cursor = client
        .query_opt("SELECT seq FROM outbox_feed_head WHERE name = $1", &[&super::lease::LEASE_NAME])
        .await?
        .map_or(0, |row| row.get::<_, i64>(0).max(0) as u64);
    let mut report = HydrationReport { feed_cursor, ..HydrationReport::default() };
    for (kind_id, kind) in store.kinds().iter().enumerate() {
        let kind_started = Instant::now();
        let (count, compacting) = hydrate_kind(store, &client, kind_id).await?;
        kind.hydrated.set(count as f64);
        tracing::info!(
            kind = kind.name,
            entities = count,
            elapsed_ms = kind_started.elapsed().as_millis() as u64,
            compacting_ms = compacting.as_millis() as u64,
            "hydrated"
        );
        report.per_kind.push((kind.name, count));
        report.total += count;
    }
    client.commit().await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Loads one kind: rows arrive on this task, and two threads each decode
/// a chunk of them (JSON decoding is the most expensive step, so it gets
/// both cores while PostgreSQL waits on socket buffers) and put it into the
/// store and its indexes themselves, while the rows are still in their own
/// core's cache. Returns the rows loaded, and how long compacting the
/// indexes took at the end.
async fn hydrate_kind(
    store: &Store,
    client: &deadpool_postgres::Transaction<'_>,
    kind_id: KindId,
) -> Result<(u64, Duration), HydrateError> {
    let kind = &store.kinds()[kind_id];
    // The planner's row estimate sizes the table once instead of rehashing
    // it a dozen times on the way to a million entities.
    let estimate: i64 = client
        .query_opt("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)", &[&kind.table])
        .await?
        .map_or(0, |row| row.get(0));
    // The estimate comes from ANALYZE's sample and may fall a little short;
    // a vector reserved exactly would then double at the very end (holding
    // its old and new copy at once: about 50 MB per million entities at
    // the peak), while room reserved and never filled is never touched,
    // so never resident.
    let estimate = usize::try_from(estimate).unwrap_or(0);
    let loading = store.reserve(kind_id, estimate + estimate / 16);
    let mut end_loading = EndLoading { store: store.clone(), loading, armed: true };

    let (raw, raw_rx) = tokio::sync::mpsc::channel::<Vec<tokio_postgres::Row>>(4);
    // Cancelled when this future is dropped before the decoders are done:
    // they stop before their next chunk.
    let abandoned = CancellationToken::new();
    let _abandon_on_drop = abandoned.clone().drop_guard();
    let decoders = spawn_decoders(store, kind_id, raw_rx, &abandoned);
    let statement = client.prepare_cached(&super::sql::table(kind).select).await?;
    let rows = client.query_raw(&statement, std::iter::empty::<&(dyn ToSql + Sync)>()).await?;
    pin_mut!(rows);
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut count = 0u64;
    let streamed = async {
        while let Some(row) = rows.next().await {
            chunk.push(row?);
            count += 1;
            if chunk.len() == CHUNK {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                // Waits only while both decoders are busy: back-pressure.
                if raw.send(full).await.is_err() {
                    break; // a decoder failed; its error is reported below
                }
            }
        }
        let _ = raw.send(std::mem::take(&mut chunk)).await;
        Ok::<(), HydrateError>(())
    }
    .await;
    drop(raw);
    let mut decoding = Ok(());
    for decoder in decoders {
        let result = decoder.await.expect("a hydration decoder does not panic");
        decoding = decoding.and(result);
    }
    streamed?;
    decoding?;
    // Compacting a kind's indexes takes a while for millions of entities.
    end_loading.armed = false;
    let (store, compacting) = (store.clone(), Instant::now());
    tokio::task::spawn_blocking(move || store.hydrated(loading)).await.expect("compacting indexes does not panic");
    Ok((count, compacting.elapsed()))
}

/// The decoder threads of one kind: each takes a chunk of raw rows at a
/// time, decodes it and puts it into the store, until the rows end or
/// hydration is `abandoned`. A row that does not decode closes the channel,
/// so that streaming stops.
fn spawn_decoders(
    store: &Store,
    kind_id: KindId,
    raw: tokio::sync::mpsc::Receiver<Vec<tokio_postgres::Row>>,
    abandoned: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<Result<(), HydrateError>>> {
    let kind = &store.kinds()[kind_id];
    // Shared by the decoders; each holds it only to take one chunk.
    let raw = Arc::new(Mutex::new(raw));
    (0..DECODERS)
        .map(|_| {
            let (raw, store, abandoned) = (raw.clone(), store.clone(), abandoned.clone());
            let (decode, name, table) = (kind.decode, kind.name, kind.table);
            tokio::task::spawn_blocking(move || -> Result<(), HydrateError> {
                let take = || raw.lock().unwrap_or_else(PoisonError::into_inner).blocking_recv();
                while let Some(rows) = take() {
                    if abandoned.is_cancelled() {
                        break;
                    }
                    let chunk = rows.iter().map(|row| decode_row(decode, name, table, row)).collect();
                    let chunk = match chunk {
                        Ok(chunk) => chunk,
                        Err(e) => {
                            raw.lock().unwrap_or_else(PoisonError::into_inner).close();
                            return Err(e);
                        }
                    };
                    drop(rows);
                    store.hydrate(kind_id, chunk);
                }
                Ok(())
            })
        })
        .collect()
}

fn decode_row(
    decode: crate::entity::Decode,
    kind: &'static str,
    table: &'static str,
    row: &tokio_postgres::Row,
) -> Result<HydratedRow, HydrateError> {
    let id: &str = row.try_get(0)?;
    let version: i64 = row.try_get(1)?;
    let deleted: bool = row.try_get(2)?;
    let data: Option<JsonText<'_>> = row.try_get(3)?;
    let decode_error = |error: String| HydrateError::Decode { kind, table, id: id.to_owned(), error };
    let value = match (deleted, data) {
        (false, Some(json)) => Some(decode(json.0).map_err(|e| decode_error(e.to_string()))?),
        (false, None) => return Err(decode_error("a live row has no data".into())),
        (true, _) => None,
    };
    // The key shares the entity's id where the entity holds it shared.
    let key = value.as_ref().map_or_else(|| Arc::from(id), |v| v.shared_id());
    Ok((key, u64::try_from(version).unwrap_or(0), value))
}

/// A row of an entity table as it is now.
pub(crate) struct CurrentRow {
    pub(crate) version: u64,
    pub(crate) deleted: bool,
    /// The entity's JSON (absent for a tombstone).
    pub(crate) data: Option<Vec<u8>>,
}

/// The rows of `ids` of `kind`'s table now (absent ids: no row).
pub(crate) async fn current_rows(
    pool: &Pool,
    kind: &KindInfo,
    ids: &[&str],
) -> Result<std::collections::HashMap<String, CurrentRow>, DbError> {
    let client = pool.get().await?;
    let rows = client.query(&format!("{} WHERE t.id = ANY($1)", super::sql::table(kind).select), &[&ids]).await?;
    let mut current = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let data: Option<JsonText<'_>> = row.try_get(3)?;
        current.insert(
            row.try_get::<_, String>(0)?,
            CurrentRow {
                version: u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0),
                deleted: row.try_get(2)?,
                data: data.map(|json| json.0.to_vec()),
            },
        );
    }
    Ok(current)
}
