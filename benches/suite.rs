//! The benchmark suite behind `scripts/bench` (targets P2–P7), writing
//! `BENCHMARKS.md` together with the P1 figures criterion measured just
//! before (`benches/store.rs`).
//!
//! Everything runs on this machine in one run, against one private
//! PostgreSQL with default durability (fsync and synchronous commit on),
//! every measurement repeated and reported as min / median / max:
//!
//! * P2: the same rows written into the same table by (a) one upsert per
//!   change, each in a spawned task; (b) write-through, each request awaiting
//!   its upsert; (c) the outbox worker; (d) the best of several hand-written
//!   batched writers (UNNEST upserts, COPY into a staging table, batch size
//!   and connections varied); (e) plain COPY into an empty table.
//! * P3: `POST /api/items` throughput and latency of the release binary
//!   with persistence on and off (`OUTBOX_BENCH_DISCARD_WRITES`), and off
//!   while PostgreSQL replays an on run's writes, in sets whose order
//!   alternates, same load generator (`outbox::loadgen`).
//! * P4: lag percentiles at half the sustainable write rate of P3.
//! * P5: hydration of 1,000,000 items by the release binary, with its peak
//!   resident memory.
//! * P6: a 30 s database outage under steady load: loss, and how long after
//!   the database's return the lag is back under a second.
//! * P7: handover to a hot standby after a release and after a freeze.
//! * The machine's speed: a fixed single-thread workload timed at the
//!   start, before P3, before P5 and at the end, so that a run in a slow
//!   hour of a shared host shows as one.
//!
//! The suite starts only processes it owns (its PostgreSQL, the server) and
//! stops them by their PIDs; all traffic stays on loopback.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::pin_mut;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use outbox::api::model::{Identifier, Item, ItemStatus};
use outbox::loadgen::{LoadConfig, LoadReport};
use outbox::pg::{LocalPostgres, LocalPostgresOptions};
use outbox::worker::WorkerConfig;
use outbox::{Engine, pg};
use serde_json::Value;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};

/// Repetitions of every measurement.
const RUNS: usize = 3;
/// Repetitions of the persistence comparison, whose figures vary most
/// from run to run on a shared machine.
const P2_RUNS: usize = 5;
/// Sets of P3 runs (persistence on, off, and off with the database's work
/// replayed, the order alternating): one
/// core shared by the server and the load generator makes each run's
/// throughput vary by ±15 % or more, more than what persistence costs, and
/// the median of five pairs moved by ±0.05 between invocations.
const P3_RUNS: usize = 9;
/// Rows the batched writers (c, d, e) write per run.
const FAST_ROWS: usize = 200_000;

/// The largest hand-written batch.
const TUNED_BATCH: usize = 5000;
/// The worker's batch size in its second P2 measurement (the default
/// before it was raised to 5000).
const SMALL_BATCH: usize = 1000;
/// Rows the one-row-per-transaction writers (a, b) write per run: the same
/// rows' first ones (their rate is what is compared).
const SLOW_ROWS: usize = 10_000;
/// The load generator's connections: enough to keep both cores busy (under
/// 10 % idle) with persistence on or off, so throughput is the server's
/// capacity on this machine rather than a round-trip latency.
const HTTP_CONNECTIONS: usize = 128;
/// Concurrent requests of the old system's pattern and of write-through.
const REQUEST_CONCURRENCY: usize = 16;
/// Items hydrated in P5.
const HYDRATE_ITEMS: usize = 1_000_000;
/// Database name.
const DB: &str = "bench";

type Runs = Vec<f64>;

fn stats(runs: &[f64]) -> (f64, f64, f64) {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    (sorted[0], sorted[sorted.len() / 2], sorted[sorted.len() - 1])
}

fn fmt3(runs: &[f64], digits: usize) -> String {
    let (min, median, max) = stats(runs);
    format!("{min:.digits$} / **{median:.digits$}** / {max:.digits$}")
}

/// Reference item `n`'s DFID: in the server's form (32 hex digits of a
/// random UUID), so that ids come in no particular order, as the server's
/// do, and are the same in every run.
fn bench_dfid(n: usize) -> String {
    // splitmix64: a bijection of n, twice with different seeds for 128 bits.
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    format!("DFID-{:016x}{:016x}", mix(n as u64), mix(!(n as u64)))
}

fn bench_item(n: usize) -> Item {
    let now = Utc::now();
    let mut data = serde_json::Map::new();
    data.insert("name".into(), format!("hex bolt {n}").into());
    data.insert("size".into(), "M8x40".into());
    data.insert("material".into(), "stainless steel A2".into());
    data.insert("weight_g".into(), (n % 500).into());
    Item {
        dfid: bench_dfid(n).into(),
        local_id: None,
        status: ItemStatus::Active,
        identifiers: vec![
            Identifier { key: "gtin".into(), value: format!("{:013}", 4_000_000_000_000u64 + n as u64).into() },
            Identifier { key: "sku".into(), value: format!("HB-{n}").into() },
        ],
        enriched_data: outbox::api::model::JsonObject::from_map(&data),
        merged_into: None,
        circuits: Vec::new(),
        created_at: now,
        updated_at: now,
    }
}

struct Bench {
    postgres: LocalPostgres,
    config: tokio_postgres::Config,
    url: String,
    binary: PathBuf,
    scratch: PathBuf,
    items: Arc<Vec<Arc<Item>>>,
}

impl Bench {
    async fn client(&self) -> tokio_postgres::Client {
        pg::connect(&self.config).await.expect("connect to the bench database")
    }

    /// An empty items table, and a checkpoint so that one run's dirty pages
    /// do not slow the next.
    async fn reset(&self) {
        let client = self.client().await;
        client
            .batch_execute("TRUNCATE items, circuits, local_ids, items_copy; CHECKPOINT")
            .await
            .expect("reset the tables");
    }

    async fn count_items(&self) -> i64 {
        self.client().await.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0)
    }
}

const UPSERT_ONE: &str =
    "INSERT INTO items AS t (id, version, deleted, data, updated_at) VALUES ($1, $2, false, $3, now())
     ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, deleted = EXCLUDED.deleted, data = EXCLUDED.data,
     updated_at = EXCLUDED.updated_at WHERE t.version < EXCLUDED.version";

/// (a) The old system: every change spawns a task that upserts its row.
async fn naive(bench: &Bench) -> f64 {
    let pool = pg::pool(bench.config.clone(), REQUEST_CONCURRENCY);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(SLOW_ROWS);
    for item in bench.items.iter().take(SLOW_ROWS) {
        let (pool, item) = (pool.clone(), item.clone());
        tasks.push(tokio::spawn(async move {
            let client = pool.get().await.expect("a connection");
            let statement = client.prepare_cached(UPSERT_ONE).await.expect("prepare");
            client.execute(&statement, &[&&*item.dfid, &1i64, &Json(&*item)]).await.expect("upsert");
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let rate = SLOW_ROWS as f64 / started.elapsed().as_secs_f64();
    pool.close();
    rate
}

/// (b) Write-through: each request awaits its own upsert before answering;
/// `REQUEST_CONCURRENCY` requests in flight.
async fn write_through(bench: &Bench) -> f64 {
    let pool = pg::pool(bench.config.clone(), REQUEST_CONCURRENCY);
    let started = Instant::now();
    let mut handlers = Vec::new();
    for handler in 0..REQUEST_CONCURRENCY {
        let (pool, items) = (pool.clone(), bench.items.clone());
        handlers.push(tokio::spawn(async move {
            let client = pool.get().await.expect("a connection");
            let statement = client.prepare_cached(UPSERT_ONE).await.expect("prepare");
            for item in items.iter().take(SLOW_ROWS).skip(handler).step_by(REQUEST_CONCURRENCY) {
                client.execute(&statement, &[&&*item.dfid, &1i64, &Json(&**item)]).await.expect("upsert");
            }
        }));
    }
    for handler in handlers {
        handler.await.expect("handler");
    }
    let rate = SLOW_ROWS as f64 / started.elapsed().as_secs_f64();
    pool.close();
    rate
}

/// (c) The outbox worker, batches of up to `batch_max` rows: every row is
/// a change recorded through the store, the first `updates` of them
/// updates of rows the table holds (version 1, hydrated), the rest inserts;
/// timed by [`time_worker`], so the figure is the worker's own throughput
/// (taking batches, encoding, writing, committing), not the cost of the
/// changes.
async fn outbox_worker(bench: &Bench, batch_max: usize, updates: usize) -> f64 {
    let builder = outbox::api::store_builder().capacity(FAST_ROWS * 2);
    let items = bench.items.clone();
    time_worker(bench, builder, WorkerConfig { batch_max, ..WorkerConfig::default() }, move |store| {
        for (n, item) in items.iter().enumerate() {
            if n < updates {
                store.apply(|set| set.upsert(Item::clone(item))).expect("update");
            } else {
                store.apply(|set| set.insert(Item::clone(item))).expect("insert");
            }
        }
    })
    .await
}

/// Starts an engine on a store of `builder` (hydrating what the tables
/// hold), has `record` record the changes once hydration is done and
/// before the worker starts, and times the worker from then until the
/// outbox is empty: rows per second.
async fn time_worker(
    bench: &Bench,
    builder: outbox::store::StoreBuilder,
    worker: WorkerConfig,
    record: impl FnOnce(&outbox::Store) + Send + 'static,
) -> f64 {
    let pool = pg::pool(bench.config.clone(), 8);
    let (store, receiver) = builder.build();
    let recorded: Arc<Mutex<Option<Instant>>> = Arc::default();
    let record = Mutex::new(Some(record));
    let on_step = {
        let (store, recorded) = (store.clone(), recorded.clone());
        move |step: outbox::engine::Progress<'_>| {
            // The step after hydration, before the worker starts.
            if step.to_string() == "loading quarantined change sets" {
                let record = record.lock().unwrap().take().expect("recorded once");
                record(&store);
                *recorded.lock().unwrap() = Some(Instant::now());
            }
        }
    };
    let engine = Engine::builder(store, receiver, pool.clone())
        .worker(worker)
        .holder("bench")
        .on_progress(on_step)
        .start()
        .await
        .expect("start");
    let started = recorded.lock().unwrap().expect("the changes were recorded before the worker started");
    let changes = engine.store().outbox().depth;
    while engine.store().outbox().depth > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = changes as f64 / started.elapsed().as_secs_f64();
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
    pool.close();
    rate
}

/// (d) Hand-written batched upserts: `unnest` of parallel arrays, batches
/// spread over `connections`, one transaction each, rows sorted by id.
async fn unnest(bench: &Bench, batch: usize, connections: usize) -> f64 {
    unnest_updating(bench, batch, connections, 0).await
}

/// (d) as above, the first `updates` rows written as updates (version 2,
/// over rows the table holds at version 1).
async fn unnest_updating(bench: &Bench, batch: usize, connections: usize, updates: usize) -> f64 {
    let sql = pg::upsert_sql("items", pg::DocumentType::Json);
    let started = Instant::now();
    let mut workers = Vec::new();
    for connection in 0..connections {
        let (config, items, sql) = (bench.config.clone(), bench.items.clone(), sql.clone());
        workers.push(tokio::spawn(async move {
            let mut client = pg::connect(&config).await.expect("connect");
            let statement = client.prepare(&sql).await.expect("prepare");
            for (index, chunk) in items.chunks(batch).enumerate().skip(connection).step_by(connections) {
                // Ids sort as the rows are numbered: already in id order.
                let rows: Vec<&Arc<Item>> = chunk.iter().collect();
                let ids: Vec<&str> = rows.iter().map(|i| &*i.dfid).collect();
                let versions: Vec<i64> =
                    (0..rows.len()).map(|i| if index * batch + i < updates { 2 } else { 1 }).collect();
                let deleted = vec![false; rows.len()];
                let data: Vec<Json<&Item>> = rows.iter().map(|i| Json(&***i)).collect();
                let transaction = client.transaction().await.expect("begin");
                transaction.execute(&statement, &[&ids, &versions, &deleted, &data]).await.expect("upsert");
                transaction.commit().await.expect("commit");
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    FAST_ROWS as f64 / started.elapsed().as_secs_f64()
}

const COPY_TYPES: [Type; 4] = [Type::TEXT, Type::INT8, Type::BOOL, Type::JSON];

async fn copy_rows(
    transaction: &tokio_postgres::Transaction<'_>,
    into: &str,
    rows: &[&Arc<Item>],
) -> Result<(), tokio_postgres::Error> {
    let sink = transaction.copy_in(&format!("COPY {into} (id, version, deleted, data) FROM STDIN BINARY")).await?;
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    pin_mut!(writer);
    for item in rows {
        let values: [&(dyn ToSql + Sync); 4] = [&&*item.dfid, &1i64, &false, &Json(&***item)];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// (d) Hand-written: COPY each batch into a per-connection temporary
/// staging table, then one version-guarded `INSERT ... SELECT`.
async fn copy_staging(bench: &Bench, batch: usize, connections: usize) -> f64 {
    let started = Instant::now();
    let mut workers = Vec::new();
    for connection in 0..connections {
        let (config, items) = (bench.config.clone(), bench.items.clone());
        workers.push(tokio::spawn(async move {
            let mut client = pg::connect(&config).await.expect("connect");
            client
                .batch_execute(
                    "CREATE TEMP TABLE stage (id text, version bigint, deleted boolean, data json) ON COMMIT DELETE ROWS",
                )
                .await
                .expect("staging table");
            for chunk in items.chunks(batch).skip(connection).step_by(connections) {
                let rows: Vec<&Arc<Item>> = chunk.iter().collect();
                let transaction = client.transaction().await.expect("begin");
                copy_rows(&transaction, "stage", &rows).await.expect("copy");
                transaction
                    .batch_execute(
                        "INSERT INTO items AS t (id, version, deleted, data, updated_at)
                         SELECT id, version, deleted, data, now() FROM stage ORDER BY id
                         ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, deleted = EXCLUDED.deleted,
                           data = EXCLUDED.data, updated_at = EXCLUDED.updated_at WHERE t.version < EXCLUDED.version",
                    )
                    .await
                    .expect("insert from stage");
                transaction.commit().await.expect("commit");
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    FAST_ROWS as f64 / started.elapsed().as_secs_f64()
}

/// (e) The machine's ceiling: plain COPY into an empty table with the same
/// columns and indexes, split over two connections.
async fn plain_copy(bench: &Bench) -> f64 {
    let started = Instant::now();
    let mut workers = Vec::new();
    let half = FAST_ROWS.div_ceil(2);
    for connection in 0..2 {
        let (config, items) = (bench.config.clone(), bench.items.clone());
        workers.push(tokio::spawn(async move {
            let mut client = pg::connect(&config).await.expect("connect");
            let rows: Vec<&Arc<Item>> = items.iter().skip(connection * half).take(half).collect();
            let transaction = client.transaction().await.expect("begin");
            copy_rows(&transaction, "items_copy", &rows).await.expect("copy");
            transaction.commit().await.expect("commit");
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    FAST_ROWS as f64 / started.elapsed().as_secs_f64()
}

/// The mixed workloads: the share of the rows written as updates.
const WORKLOADS: [(&str, usize); 3] =
    [("100 % inserts", 0), ("50 % updates", FAST_ROWS / 2), ("100 % updates", FAST_ROWS)];

/// One workload's rates, runs alternating writer by writer.
#[derive(Default)]
struct Workload {
    name: &'static str,
    outbox: Runs,
    unnest: Runs,
    copy: Runs,
    outbox_over_unnest: Runs,
    outbox_over_copy: Runs,
}

/// The items table empty but for the first `updates` rows, at version 1.
async fn prefill(bench: &Bench, updates: usize) {
    bench.reset().await;
    let mut client = bench.client().await;
    let rows: Vec<&Arc<Item>> = bench.items.iter().take(updates).collect();
    let transaction = client.transaction().await.expect("begin");
    copy_rows(&transaction, "items", &rows).await.expect("prefill");
    transaction.commit().await.expect("commit");
    client.batch_execute("VACUUM ANALYZE items").await.expect("vacuum");
    client.batch_execute("CHECKPOINT").await.expect("checkpoint");
}

/// P2 by workload: the worker (default settings), the best hand-written
/// upsert (UNNEST, 1000 rows, 2 connections) and plain COPY of the same
/// number of rows into an empty table (the ceiling, whatever the mix).
async fn workloads(bench: &Bench) -> Vec<Workload> {
    let mut out = Vec::new();
    // `OUTBOX_BENCH_MIX=100` runs only the workload of that share of
    // updates, for profiling.
    let only: Option<usize> = std::env::var("OUTBOX_BENCH_MIX").ok().and_then(|v| v.parse().ok());
    for (name, updates) in WORKLOADS {
        if only.is_some_and(|percent| percent * FAST_ROWS / 100 != updates) {
            continue;
        }
        let mut w = Workload { name, ..Workload::default() };
        for run in 0..RUNS {
            prefill(bench, updates).await;
            let c = outbox_worker(bench, WorkerConfig::default().batch_max, updates).await;
            assert_eq!(bench.count_items().await, FAST_ROWS as i64, "the outbox wrote every row");
            prefill(bench, updates).await;
            let d = unnest_updating(bench, 1000, 2, updates).await;
            bench.reset().await;
            let e = plain_copy(bench).await;
            eprintln!("P2 {name}, run {}/{RUNS}: c {c:.0}  d {d:.0}  e {e:.0} rows/s", run + 1);
            w.outbox.push(c);
            w.unnest.push(d);
            w.copy.push(e);
            w.outbox_over_unnest.push(c / d);
            w.outbox_over_copy.push(c / e);
        }
        out.push(w);
    }
    bench.reset().await;
    out
}

/// The same fields as a `data json` document and as typed columns, for
/// the layout comparison (rows of similar size: ~250 bytes).
macro_rules! layout_kind {
    ($name:ident, $kind:literal, $table:literal $(, $columns:ident)?) => {
        #[derive(Clone, serde::Serialize, serde::Deserialize, outbox::Entity)]
        #[entity(kind = $kind, table = $table $(, $columns)?)]
        struct $name {
            #[entity(id)]
            id: String,
            name: String,
            size: String,
            material: String,
            weight_g: i64,
            gtin: String,
            sku: String,
            active: bool,
            created_at: chrono::DateTime<Utc>,
        }

        impl $name {
            fn new(n: usize) -> Self {
                Self {
                    id: bench_dfid(n),
                    name: format!("hex bolt {n}"),
                    size: "M8x40".into(),
                    material: "stainless steel A2".into(),
                    weight_g: (n % 500) as i64,
                    gtin: format!("{:013}", 4_000_000_000_000u64 + n as u64),
                    sku: format!("HB-{n}"),
                    active: n % 7 != 0,
                    created_at: Utc::now(),
                }
            }
        }
    };
}

layout_kind!(DocumentRow, "document_row", "layout_documents");
layout_kind!(ColumnRow, "column_row", "layout_columns", columns);

/// The outbox worker writing `FAST_ROWS` rows of kind `E` (made by
/// `make`), one change each, timed like (c).
async fn layout_worker<E: outbox::Entity>(bench: &Bench, make: fn(usize) -> E) -> f64 {
    let pool = pg::pool(bench.config.clone(), 1);
    let (store, _) = outbox::Store::builder().kind::<E>().build();
    pg::ensure_tables(&pool, &store).await.expect("layout tables");
    pool.close();
    bench.client().await.batch_execute(&format!("TRUNCATE {}; CHECKPOINT", E::TABLE)).await.expect("reset");
    let builder = outbox::Store::builder().kind::<E>().capacity(FAST_ROWS * 2);
    let rate = time_worker(bench, builder, WorkerConfig::default(), move |store| {
        for n in 0..FAST_ROWS {
            store.apply(|set| set.insert(make(n))).expect("insert");
        }
    })
    .await;
    let written: i64 =
        bench.client().await.query_one(&format!("SELECT count(*) FROM {}", E::TABLE), &[]).await.unwrap().get(0);
    assert_eq!(written, FAST_ROWS as i64, "every {} row written", E::KIND);
    rate
}

/// The worker's throughput with typed columns against the document
/// layout, same fields, runs alternating.
#[derive(Default)]
struct Layouts {
    document: Runs,
    columns: Runs,
    columns_over_document: Runs,
    /// Average row size in the table, bytes (document, columns).
    row_bytes: (f64, f64),
}

async fn layouts(bench: &Bench) -> Layouts {
    let mut l = Layouts::default();
    // Warm-up, not counted.
    layout_worker(bench, DocumentRow::new).await;
    layout_worker(bench, ColumnRow::new).await;
    for run in 0..P2_RUNS {
        let (document, columns) = if run % 2 == 0 {
            let d = layout_worker(bench, DocumentRow::new).await;
            (d, layout_worker(bench, ColumnRow::new).await)
        } else {
            let c = layout_worker(bench, ColumnRow::new).await;
            (layout_worker(bench, DocumentRow::new).await, c)
        };
        eprintln!("layouts run {}/{P2_RUNS}: document {document:.0}, columns {columns:.0} rows/s", run + 1);
        l.document.push(document);
        l.columns.push(columns);
        l.columns_over_document.push(columns / document);
    }
    let client = bench.client().await;
    let size = |table: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(&format!("SELECT avg(pg_column_size(t.*))::float8 FROM {table} t"), &[])
                .await
                .expect("row size");
            row.get::<_, f64>(0)
        }
    };
    l.row_bytes = (size("layout_documents").await, size("layout_columns").await);
    client.batch_execute("TRUNCATE layout_documents, layout_columns").await.expect("reset");
    l
}

#[derive(Default)]
struct Persistence {
    naive: Runs,
    write_through: Runs,
    outbox: Runs,
    /// (c) with batches of `SMALL_BATCH`.
    outbox_small: Runs,
    candidates: Vec<(String, Runs)>,
    best_candidate: String,
    hand_written: Runs,
    copy: Runs,
    outbox_over_hand: Runs,
    small_over_hand: Runs,
    outbox_over_naive: Runs,
    outbox_over_copy: Runs,
}

async fn persistence(bench: &Bench) -> Persistence {
    let mut p = Persistence::default();
    let names = [
        "UNNEST, 1000 rows, 1 connection",
        "UNNEST, 1000 rows, 2 connections",
        "UNNEST, 5000 rows, 2 connections",
        "COPY to staging, 1000 rows, 2 connections",
        "COPY to staging, 5000 rows, 2 connections",
    ];
    p.candidates = names.iter().map(|n| (n.to_string(), Vec::new())).collect();
    // A warm-up of the two batched upserts, not counted: the first writes
    // into a fresh database are slower (relation extension, cold caches).
    bench.reset().await;
    outbox_worker(bench, WorkerConfig::default().batch_max, 0).await;
    bench.reset().await;
    unnest(bench, 1000, 2).await;
    for run in 0..P2_RUNS {
        eprintln!("P2 run {}/{P2_RUNS}", run + 1);
        bench.reset().await;
        let a = naive(bench).await;
        bench.reset().await;
        let b = write_through(bench).await;
        // (c) and (e) back to back, alternating which goes first, so that
        // their ratio compares the machine at one moment.
        let (c, e) = if run % 2 == 0 {
            let c = ceiling_pair_worker(bench).await;
            (c, ceiling_pair_copy(bench).await)
        } else {
            let e = ceiling_pair_copy(bench).await;
            (ceiling_pair_worker(bench).await, e)
        };
        bench.reset().await;
        let small = outbox_worker(bench, SMALL_BATCH, 0).await;
        assert_eq!(bench.count_items().await, FAST_ROWS as i64, "the outbox wrote every row in small batches");
        eprintln!("  (c) with batches of {SMALL_BATCH}: {small:.0} rows/s");
        p.outbox_small.push(small);
        for (index, candidate) in p.candidates.iter_mut().enumerate() {
            bench.reset().await;
            let rate = match index {
                0 => unnest(bench, 1000, 1).await,
                1 => unnest(bench, 1000, 2).await,
                2 => unnest(bench, TUNED_BATCH, 2).await,
                3 => copy_staging(bench, 1000, 2).await,
                _ => copy_staging(bench, 5000, 2).await,
            };
            assert_eq!(bench.count_items().await, FAST_ROWS as i64, "{} wrote every row", candidate.0);
            eprintln!("  (d) candidate {}: {rate:.0} rows/s", candidate.0);
            candidate.1.push(rate);
        }
        eprintln!("  a {a:.0}  b {b:.0}  c {c:.0}  e {e:.0} rows/s");
        p.naive.push(a);
        p.write_through.push(b);
        p.outbox.push(c);
        p.copy.push(e);
    }
    // (d) is the hand-written writer with the best median: comparing each
    // run with the best of five noisy candidates of that run would favour
    // (d) by the noise alone.
    let best = p.candidates.iter().max_by(|x, y| stats(&x.1).1.total_cmp(&stats(&y.1).1)).expect("candidates").clone();
    p.best_candidate = best.0;
    p.hand_written = best.1;
    for run in 0..P2_RUNS {
        let c = p.outbox[run];
        p.outbox_over_hand.push(c / p.hand_written[run]);
        p.small_over_hand.push(p.outbox_small[run] / p.hand_written[run]);
        p.outbox_over_naive.push(c / p.naive[run]);
        p.outbox_over_copy.push(c / p.copy[run]);
    }
    bench.reset().await;
    p
}

/// (c) of P2 on an empty table: the worker with its defaults.
async fn ceiling_pair_worker(bench: &Bench) -> f64 {
    bench.reset().await;
    let c = outbox_worker(bench, WorkerConfig::default().batch_max, 0).await;
    assert_eq!(bench.count_items().await, FAST_ROWS as i64, "the outbox wrote every row");
    c
}

/// (e) of P2 on an empty table: plain COPY.
async fn ceiling_pair_copy(bench: &Bench) -> f64 {
    bench.reset().await;
    plain_copy(bench).await
}

/// The release server, run by the suite.
struct Server {
    child: Child,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the release server and waits until it is ready.
    async fn start(bench: &Bench, envs: &[(&str, String)]) -> Server {
        let server = Server::launch(bench, "server", envs).await;
        server.wait_ready(Duration::from_secs(300)).await;
        server
    }

    /// Starts the release server (data in a folder named `name`) and waits
    /// until it listens.
    async fn launch(bench: &Bench, name: &str, envs: &[(&str, String)]) -> Server {
        let data_dir = bench.scratch.join(name);
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut command = Command::new(&bench.binary);
        command
            .env_remove("DATABASE_URL")
            .env("DATABASE_URL", &bench.url)
            .env("OUTBOX_DATA_DIR", &data_dir)
            .env("OUTBOX_LISTEN", "127.0.0.1:0")
            .env("OUTBOX_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start the release server");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            // Every server's log is kept next to the suite's PostgreSQL.
            static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut log = std::fs::File::create(bench.scratch.join(format!("server-{n:02}.log"))).ok();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(log) = log.as_mut() {
                        let _ = writeln!(log, "{line}");
                    }
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let _ = addr_tx.send(rest.split(['"', ' ']).next().unwrap_or_default().to_owned());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let addr = addr_rx.recv_timeout(Duration::from_secs(60)).expect("the server listens");
        Server { child, addr, lines }
    }

    /// Polls `/readyz` every 10 ms until 200; returns when it was.
    async fn wait_ready(&self, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
        loop {
            if let Ok(response) = client.get(self.url("/readyz")).send().await
                && response.status() == 200
            {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "the server became ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the status route says `role`.
    async fn wait_role(&self, role: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let client = reqwest::Client::new();
        loop {
            if let Ok(response) = client.get(self.url("/api/outbox/status")).send().await
                && let Ok(body) = response.json::<Value>().await
                && body["role"] == role
            {
                return;
            }
            assert!(Instant::now() < deadline, "the server became {role}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), signal);
    }

    /// Waits (bounded) for the process to end.
    fn wait_exit(self) {
        self.wait_exit_within(Duration::from_secs(60));
    }

    /// Waits up to `limit` for the process to end, then kills it.
    fn wait_exit_within(mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Peak resident memory so far (VmHWM), in MiB.
    fn peak_rss_mib(&self) -> f64 {
        self.memory_mib("VmHWM:")
    }

    /// A memory figure of `/proc/PID/status` (`VmHWM:`, `VmRSS:`), in MiB.
    fn memory_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// A number field of the first JSON log line whose message is `message`.
    fn logged(&self, message: &str, field: &str) -> Option<f64> {
        self.lines.lock().unwrap().iter().find_map(|line| {
            let value: Value = serde_json::from_str(line).ok()?;
            (value["message"] == message).then(|| value[field].as_f64()).flatten()
        })
    }

    fn stop(self) {
        self.signal(Signal::SIGTERM);
        self.wait_exit_within(Duration::from_secs(120));
    }
}

fn load(server: &Server, rate: Option<u64>, seconds: u64, lag_every: Option<Duration>) -> LoadConfig {
    LoadConfig {
        target: server.url(""),
        rate,
        duration: Duration::from_secs(seconds),
        connections: HTTP_CONNECTIONS,
        durable: false,
        lag_every,
        progress: false,
    }
}

#[derive(Default)]
struct Http {
    on: Vec<LoadReport>,
    off: Vec<LoadReport>,
    /// Persistence off while PostgreSQL does the work of an on run
    /// ([`replay_database_work`]).
    replayed: Vec<LoadReport>,
    ratio: Runs,
    /// On against the replayed run of the same triple.
    ratio_replayed: Runs,
    /// CPU used during each run, as shares of the machine's cores.
    cpu_on: Vec<CpuShares>,
    cpu_off: Vec<CpuShares>,
    cpu_replayed: Vec<CpuShares>,
    /// Rows per second the replay wrote in each replayed run.
    replay_rates: Runs,
    /// Whether PostgreSQL ran on a CPU of its own.
    pinned: bool,
}

/// P3's three runs.
#[derive(Clone, Copy, PartialEq)]
enum P3Run {
    On,
    Off,
    /// Off, while PostgreSQL does an on run's writes.
    Replayed,
}

impl P3Run {
    /// How the progress lines and BENCHMARKS.md name it.
    fn name(self) -> &'static str {
        match self {
            Self::On => "persistence on",
            Self::Off => "persistence off",
            Self::Replayed => "persistence off, the database's work replayed",
        }
    }
}

/// Rows per transaction of the replayed database work: about what the
/// worker's batches hold at P3's load.
const REPLAY_BATCH: usize = 300;

/// The database's side of a run with persistence on, without the server:
/// a thread confined to PostgreSQL's CPU copies reference items into
/// `items_copy` (the columns and indexes of `items`) at `rate` rows a
/// second in transactions of [`REPLAY_BATCH`] rows, until `stop` is set
/// (or the suite's items run out). On this machine PostgreSQL's work on
/// its CPU slows the other one (the two virtual CPUs share the host's
/// hardware), which a database on its own host would not do: an off run
/// with this replay pays that slowdown too, so that what remains between
/// it and an on run is what persistence costs the server itself. Returns
/// the rows written and the seconds it ran.
fn replay_database_work(
    bench: &Bench,
    rate: f64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, f64)> {
    let (config, items) = (bench.config.clone(), bench.items.clone());
    std::thread::spawn(move || {
        confine_this_thread("0");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async move {
            let mut client = pg::connect(&config).await.expect("connect");
            let mut tick = tokio::time::interval(Duration::from_secs_f64(REPLAY_BATCH as f64 / rate.max(1.0)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let started = Instant::now();
            let mut written = 0;
            for chunk in items.chunks(REPLAY_BATCH) {
                tick.tick().await;
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let rows: Vec<&Arc<Item>> = chunk.iter().collect();
                let transaction = client.transaction().await.expect("begin");
                copy_rows(&transaction, "items_copy", &rows).await.expect("copy");
                transaction.commit().await.expect("commit");
                written += rows.len();
            }
            (written, started.elapsed().as_secs_f64())
        })
    })
}

/// Confines the calling thread alone to `cpus` (`taskset -p -c` on its id).
fn confine_this_thread(cpus: &str) {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| link.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<i32>().ok()));
    match tid {
        Some(tid) => taskset(&[], tid, cpus),
        None => eprintln!("  could not find this thread's id to confine it to CPU {cpus}"),
    }
}

/// Where the machine's CPU went during a run, each as a share of all cores.
#[derive(Clone, Copy, Default)]
struct CpuShares {
    postgres: f64,
    server: f64,
    load_generator: f64,
    /// The machine's idle time (`/proc/stat`: idle and iowait).
    idle: f64,
}

/// CPU seconds (user + system) used so far by each party of a run.
struct CpuSample {
    at: Instant,
    postgres: f64,
    server: f64,
    load_generator: f64,
    /// Ticks of the whole machine: idle (with iowait), and all.
    idle_ticks: u64,
    all_ticks: u64,
}

/// The machine's (idle + iowait, all) ticks from the first line of `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let all = fields.iter().take(8).sum();
    (fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0), all)
}

/// Fields 14–17 of `/proc/PID/stat` (utime, stime, cutime, cstime), in
/// clock ticks, and the parent's pid (field 4).
fn proc_times(pid: i32) -> Option<(i32, [u64; 4])> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after ')'.
    let rest: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some((field(4)? as i32, [field(14)?, field(15)?, field(16)?, field(17)?]))
}

/// Clock ticks per second (`getconf CLK_TCK`), asked once.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

impl CpuSample {
    /// PostgreSQL's CPU is the postmaster's own, its reaped children's
    /// (backends that ended), and its live children's.
    fn take(postmaster: i32, server: i32) -> CpuSample {
        let ticks = clock_ticks();
        let own = |pid: i32| proc_times(pid).map_or(0.0, |(_, t)| (t[0] + t[1]) as f64 / ticks);
        let mut postgres = proc_times(postmaster).map_or(0.0, |(_, t)| t.iter().sum::<u64>() as f64 / ticks);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if let Some((parent, t)) = proc_times(pid)
                && parent == postmaster
            {
                postgres += (t[0] + t[1]) as f64 / ticks;
            }
        }
        let (idle_ticks, all_ticks) = machine_ticks();
        CpuSample {
            at: Instant::now(),
            postgres,
            server: own(server),
            load_generator: own(std::process::id() as i32),
            idle_ticks,
            all_ticks,
        }
    }

    fn shares_since(&self, before: &CpuSample) -> CpuShares {
        let capacity = self.at.duration_since(before.at).as_secs_f64() * cores() as f64;
        CpuShares {
            postgres: (self.postgres - before.postgres) / capacity,
            server: (self.server - before.server) / capacity,
            load_generator: (self.load_generator - before.load_generator) / capacity,
            idle: (self.idle_ticks - before.idle_ticks) as f64 / (self.all_ticks - before.all_ticks).max(1) as f64,
        }
    }
}

/// The server's CPU time per request (µs) in each run of P3.
fn server_us_per_request(shares: &[CpuShares], reports: &[LoadReport]) -> Runs {
    shares.iter().zip(reports).map(|(s, r)| s.server * cores() as f64 / r.throughput * 1e6).collect()
}

/// Per set of P3's runs (an on and an off run back to back), the server's
/// CPU per request with persistence on over that without: a drift of the
/// machine's speed across the sets weighs on both sides of each ratio.
fn cpu_ratio_per_set(on: &[f64], off: &[f64]) -> Runs {
    on.iter().zip(off).map(|(on, off)| on / off).collect()
}

/// The machine's CPUs, as counted before P3 confines this process to some
/// of them (`available_parallelism` follows the process's affinity).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Sets the CPUs of every thread of `pid` (`taskset -a -p -c`).
fn set_affinity(pid: i32, cpus: &str) {
    taskset(&["-a"], pid, cpus);
}

/// Runs `taskset [extra] -p -c CPUS ID`; says so when it fails.
fn taskset(extra: &[&str], id: i32, cpus: &str) {
    let status = Command::new("taskset")
        .args(extra)
        .args(["-p", "-c", cpus, &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("  could not set the CPUs of {id} to {cpus} (is taskset installed?)");
    }
}

/// Sets the CPUs of the PostgreSQL postmaster and its children; the
/// backends it forks later inherit them.
fn set_postgres_affinity(postmaster: i32, cpus: &str) {
    set_affinity(postmaster, cpus);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if proc_times(pid).is_some_and(|(parent, _)| parent == postmaster) {
            set_affinity(pid, cpus);
        }
    }
}

/// P3 as if the database had its own host: PostgreSQL on the first CPU,
/// this process (the load generator) and the servers it starts on the
/// others. Undone by [`unpin`].
fn pin(postmaster: i32) -> bool {
    let cores = cores();
    if cores < 2 {
        return false;
    }
    set_postgres_affinity(postmaster, "0");
    set_affinity(std::process::id() as i32, &format!("1-{}", cores - 1));
    true
}

fn unpin(postmaster: i32) {
    let cores = cores();
    let all = format!("0-{}", cores - 1);
    set_postgres_affinity(postmaster, &all);
    set_affinity(std::process::id() as i32, &all);
}

async fn http(bench: &Bench) -> Http {
    let mut h = Http::default();
    let postmaster = bench.postgres.pid().expect("the bench PostgreSQL runs");
    h.pinned = pin(postmaster);
    for run in 0..P3_RUNS {
        // On, off, replayed, then replayed, off, on: a drift of the host's
        // speed during the runs weighs on both sides alike. A replay
        // writes at the rate of the latest on run.
        let order = if run % 2 == 0 {
            [P3Run::On, P3Run::Off, P3Run::Replayed]
        } else {
            [P3Run::Replayed, P3Run::Off, P3Run::On]
        };
        for mode in order {
            let persist = mode == P3Run::On;
            eprintln!("P3 run {}/{P3_RUNS}, {}", run + 1, mode.name());
            bench.reset().await;
            let server = Server::start(bench, &[("OUTBOX_BENCH_DISCARD_WRITES", (!persist).to_string())]).await;
            let postmaster = bench.postgres.pid().expect("the bench PostgreSQL runs");
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let replay = (mode == P3Run::Replayed).then(|| {
                let rate = h.on.last().map_or(20_000.0, |r| r.throughput);
                replay_database_work(bench, rate, stop.clone())
            });
            let before = CpuSample::take(postmaster, server.pid());
            let report = outbox::loadgen::run(&load(&server, None, 8, None)).await.expect("load");
            let cpu = CpuSample::take(postmaster, server.pid()).shares_since(&before);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(replay) = replay {
                let (rows, seconds) =
                    tokio::task::spawn_blocking(move || replay.join().expect("the replay does not panic"))
                        .await
                        .expect("joined");
                h.replay_rates.push(rows as f64 / seconds);
                eprintln!("  the replay wrote {rows} rows in {seconds:.1} s");
            }
            server.stop();
            eprintln!(
                "  {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors; CPU: PostgreSQL {:.0} %, server {:.0} % ({:.1} µs per request), load generator {:.0} %, idle {:.0} %",
                report.throughput,
                report.latency.p50,
                report.latency.p99,
                report.errors,
                cpu.postgres * 100.0,
                cpu.server * 100.0,
                server_us_per_request(std::slice::from_ref(&cpu), std::slice::from_ref(&report))[0],
                cpu.load_generator * 100.0,
                cpu.idle * 100.0
            );
            match mode {
                P3Run::On => {
                    h.on.push(report);
                    h.cpu_on.push(cpu);
                }
                P3Run::Off => {
                    h.off.push(report);
                    h.cpu_off.push(cpu);
                }
                P3Run::Replayed => {
                    h.replayed.push(report);
                    h.cpu_replayed.push(cpu);
                }
            }
        }
        h.ratio.push(h.on[run].throughput / h.off[run].throughput);
        h.ratio_replayed.push(h.on[run].throughput / h.replayed[run].throughput);
    }
    if h.pinned {
        unpin(postmaster);
    }
    bench.reset().await;
    h
}

#[derive(Default)]
struct Lag {
    rate: u64,
    reports: Vec<LoadReport>,
}

async fn lag(bench: &Bench, sustainable: f64) -> Lag {
    let rate = (sustainable / 2.0) as u64;
    let mut l = Lag { rate, ..Lag::default() };
    for run in 0..RUNS {
        eprintln!("P4 run {}/{RUNS} at {rate} req/s", run + 1);
        bench.reset().await;
        let server = Server::start(bench, &[]).await;
        let report =
            outbox::loadgen::run(&load(&server, Some(rate), 10, Some(Duration::from_millis(10)))).await.expect("load");
        server.stop();
        let lag = report.lag.expect("lag sampled");
        eprintln!("  lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", lag.p50, lag.p99, lag.max);
        l.reports.push(report);
    }
    bench.reset().await;
    l
}

#[derive(Default)]
struct Hydration {
    /// The runs at each size: 1M items first, then the larger sizes.
    sizes: Vec<(usize, Vec<HydrateRun>)>,
}

impl Hydration {
    /// The runs at 1M items, which the verdict is drawn from.
    fn base(&self) -> &[HydrateRun] {
        &self.sizes[0].1
    }
}

/// One start of the server on items already in the table.
struct HydrateRun {
    /// Hydration as the server logs it.
    seconds: f64,
    /// From process start to ready.
    ready: f64,
    peak_rss_mib: f64,
    /// CPU seconds from start to ready: the server's, PostgreSQL's.
    server_cpu: f64,
    postgres_cpu: f64,
}

/// The larger sizes P5 is also measured at, to show the curve is linear.
const HYDRATE_SCALE: [usize; 2] = [2_000_000, 4_000_000];

/// Starts the release server on `count` items already in `items`.
async fn hydrate_once(bench: &Bench, count: usize) -> HydrateRun {
    let postmaster = bench.postgres.pid().expect("the bench PostgreSQL runs");
    let before = CpuSample::take(postmaster, 0);
    let started = Instant::now();
    let server = Server::start(bench, &[]).await;
    let ready = started.elapsed().as_secs_f64();
    let after = CpuSample::take(postmaster, server.pid());
    let hydration_ms = server.logged("hydration finished", "elapsed_ms").expect("hydration is logged");
    let entities = server.logged("hydration finished", "entities").unwrap_or(0.0);
    assert_eq!(entities as usize, count, "every item hydrated");
    let rss = server.peak_rss_mib();
    eprintln!("  resident when ready {:.0} MiB (peak {rss:.0} MiB)", server.memory_mib("VmRSS:"));
    server.stop();
    let run = HydrateRun {
        seconds: hydration_ms / 1000.0,
        ready,
        peak_rss_mib: rss,
        server_cpu: after.server,
        postgres_cpu: after.postgres - before.postgres,
    };
    eprintln!(
        "  {count} items: hydration {:.2} s, ready after {ready:.2} s, peak RSS {rss:.0} MiB; CPU: server {:.2} s, PostgreSQL {:.2} s",
        run.seconds, run.server_cpu, run.postgres_cpu
    );
    run
}

async fn hydration(bench: &Bench) -> Hydration {
    eprintln!("P5: writing {HYDRATE_ITEMS} items");
    fill_items(bench, HYDRATE_ITEMS).await;
    let mut h = Hydration::default();
    let mut runs = Vec::new();
    for run in 0..RUNS {
        eprintln!("P5 run {}/{RUNS}", run + 1);
        runs.push(hydrate_once(bench, HYDRATE_ITEMS).await);
    }
    h.sizes.push((HYDRATE_ITEMS, runs));
    // `OUTBOX_BENCH_P5_CURVE=0` leaves out 2M and 4M, for profiling.
    let curve = std::env::var("OUTBOX_BENCH_P5_CURVE").map_or(true, |v| v != "0");
    for count in HYDRATE_SCALE.into_iter().filter(|_| curve) {
        eprintln!("P5: writing {count} items");
        fill_items(bench, count).await;
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(hydrate_once(bench, count).await);
        }
        h.sizes.push((count, runs));
    }
    bench.reset().await;
    h
}

/// One figure of each run.
fn figure(runs: &[HydrateRun], f: impl Fn(&HydrateRun) -> f64) -> Runs {
    runs.iter().map(f).collect()
}

/// Empties `items` and COPYs `count` reference items into it.
async fn fill_items(bench: &Bench, count: usize) {
    bench.reset().await;
    let mut client = bench.client().await;
    let chunk = 100_000;
    for start in (0..count).step_by(chunk) {
        let items: Vec<Arc<Item>> = (start..(start + chunk).min(count)).map(|n| Arc::new(bench_item(n))).collect();
        let rows: Vec<&Arc<Item>> = items.iter().collect();
        let transaction = client.transaction().await.unwrap();
        copy_rows(&transaction, "items", &rows).await.expect("copy items");
        transaction.commit().await.unwrap();
    }
    client.batch_execute("VACUUM ANALYZE items").await.unwrap();
    client.batch_execute("CHECKPOINT").await.unwrap();
}

#[derive(Default)]
struct Handover {
    ttl_seconds: u64,
    rate: u64,
    release_seconds: Runs,
    freeze_seconds: Runs,
    acknowledged: Vec<u64>,
    lost: Vec<i64>,
}

/// Durable creates at a steady rate, each sent to the first server that
/// answers it (refused connections, 503 and timeouts go to the next), until
/// `stop`; returns the DFIDs acknowledged.
async fn failover_load(urls: Vec<String>, rate: u64, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let mut acknowledged = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let body = serde_json::json!({"identifiers": [{"key": "handover", "value": n.to_string()}]});
        for url in &urls {
            let sent = client.post(format!("{url}/api/items")).header("Prefer", "durable").json(&body).send().await;
            if let Ok(response) = sent
                && response.status().is_success()
                && let Ok(item) = response.json::<Value>().await
            {
                acknowledged.push(item["dfid"].as_str().unwrap_or_default().to_owned());
                break;
            }
        }
    }
    acknowledged
}

/// P7: a standby taking over a holder of 1,000,000 items, once after the
/// holder's graceful stop (the lease released) and once after it froze (the
/// lease expired), under a steady durable load.
async fn handover(bench: &Bench) -> Handover {
    let ttl = pg::lease::DEFAULT_TTL.as_secs();
    let mut h = Handover { ttl_seconds: ttl, rate: 200, ..Handover::default() };
    eprintln!("P7: writing {HYDRATE_ITEMS} items");
    fill_items(bench, HYDRATE_ITEMS).await;
    for run in 0..RUNS {
        eprintln!("P7 run {}/{RUNS}", run + 1);
        let a = Server::start(bench, &[]).await;
        let b = Server::launch(bench, "standby-b", &[]).await;
        b.wait_role("standby", Duration::from_secs(300)).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let urls = vec![a.url(""), b.url("")];
        let load = tokio::spawn(failover_load(urls, h.rate, stop.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Release: a graceful stop.
        let released = Instant::now();
        a.signal(Signal::SIGTERM);
        let ready = b.wait_ready(Duration::from_secs(60)).await;
        h.release_seconds.push(ready.duration_since(released).as_secs_f64());
        a.wait_exit();
        // Freeze: B stops answering and renewing; C takes over at expiry.
        let c = Server::launch(bench, "standby-c", &[]).await;
        c.wait_role("standby", Duration::from_secs(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut acknowledged = load.await.expect("load task");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = tokio::spawn(failover_load(vec![b.url(""), c.url("")], h.rate, stop.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let frozen = Instant::now();
        b.signal(Signal::SIGSTOP);
        let ready = c.wait_ready(Duration::from_secs(120)).await;
        h.freeze_seconds.push(ready.duration_since(frozen).as_secs_f64());
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        acknowledged.extend(load.await.expect("load task"));
        b.signal(Signal::SIGCONT);
        b.wait_exit();
        c.wait_role("leader", Duration::from_secs(10)).await;
        let stored: i64 = bench
            .client()
            .await
            .query_one("SELECT count(*) FROM items WHERE id = ANY($1)", &[&acknowledged])
            .await
            .unwrap()
            .get(0);
        c.stop();
        let lost = acknowledged.len() as i64 - stored;
        eprintln!(
            "  after release ready in {:.2} s, after a freeze in {:.2} s; {} durable creates acknowledged, {lost} lost",
            h.release_seconds[run],
            h.freeze_seconds[run],
            acknowledged.len()
        );
        h.acknowledged.push(acknowledged.len() as u64);
        h.lost.push(lost);
    }
    bench.reset().await;
    h
}

#[derive(Default)]
struct Outage {
    rate: u64,
    acknowledged: Vec<u64>,
    lost: Vec<i64>,
    recovery_seconds: Runs,
    peak_lag_seconds: Runs,
    refused: Vec<u64>,
}

async fn outage(bench: &Bench, rate: u64) -> Outage {
    let mut o = Outage { rate, ..Outage::default() };
    for run in 0..RUNS {
        eprintln!("P6 run {}/{RUNS}: 30 s outage at {rate} req/s", run + 1);
        bench.reset().await;
        let server = Server::start(bench, &[]).await;
        let status = server.url("/api/outbox/status");
        let started = Instant::now();
        let samples: Arc<Mutex<Vec<(f64, f64)>>> = Arc::new(Mutex::new(Vec::new()));
        let sampler = {
            let samples = samples.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                loop {
                    if let Ok(response) = client.get(&status).send().await
                        && let Ok(body) = response.json::<Value>().await
                    {
                        let lag = body["lag_seconds"].as_f64().unwrap_or(0.0);
                        samples.lock().unwrap().push((started.elapsed().as_secs_f64(), lag));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let config = load(&server, Some(rate), 55, None);
        let load = tokio::spawn(async move { outbox::loadgen::run(&config).await });
        tokio::time::sleep(Duration::from_secs(10)).await;
        std::thread::scope(|s| s.spawn(|| bench.postgres.stop()).join().unwrap()).expect("stop PostgreSQL");
        tokio::time::sleep(Duration::from_secs(30)).await;
        std::thread::scope(|s| s.spawn(|| bench.postgres.restart()).join().unwrap()).expect("start PostgreSQL");
        let back = started.elapsed().as_secs_f64();
        let report = load.await.expect("load task").expect("load");
        // Wait (bounded) for the backlog to be written.
        let deadline = Instant::now() + Duration::from_secs(60);
        while samples.lock().unwrap().last().is_none_or(|(_, lag)| *lag > 0.0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        sampler.abort();
        server.stop();
        let samples = samples.lock().unwrap().clone();
        let recovery = samples
            .iter()
            .filter(|(t, _)| *t >= back)
            .find(|(t, lag)| *lag < 1.0 && samples.iter().filter(|(u, _)| u > t).all(|(_, l)| *l < 1.0))
            .map_or(f64::INFINITY, |(t, _)| t - back);
        let peak = samples.iter().map(|(_, l)| *l).fold(0.0, f64::max);
        let stored = bench.count_items().await;
        let lost = report.ok as i64 - stored;
        eprintln!(
            "  {} acknowledged, {} refused, {lost} lost, lag peak {peak:.1} s, back under 1 s {recovery:.1} s after the database",
            report.ok, report.refused
        );
        o.acknowledged.push(report.ok);
        o.refused.push(report.refused);
        o.lost.push(lost);
        o.recovery_seconds.push(recovery);
        o.peak_lag_seconds.push(peak);
    }
    bench.reset().await;
    o
}

/// P1 medians from criterion's output (nanoseconds), by benchmark id, with
/// the heap allocations per change `benches/allocations.rs` counted.
fn criterion_medians(root: &Path) -> Vec<(String, f64, f64, f64, Option<f64>)> {
    let allocations: Value = std::fs::read(root.join("allocations.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut out = Vec::new();
    for group in ["record_small", "record"] {
        let Ok(entries) = std::fs::read_dir(root.join(group)) else { continue };
        let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for name in names {
            let Ok(text) = std::fs::read_to_string(root.join(group).join(&name).join("new/estimates.json")) else {
                continue;
            };
            let estimates: Value = serde_json::from_str(&text).unwrap_or_default();
            let median = &estimates["median"];
            let (low, point, high) = (
                median["confidence_interval"]["lower_bound"].as_f64().unwrap_or(f64::NAN),
                median["point_estimate"].as_f64().unwrap_or(f64::NAN),
                median["confidence_interval"]["upper_bound"].as_f64().unwrap_or(f64::NAN),
            );
            let id = format!("{group}/{name}");
            let allocated = allocations[&id].as_f64();
            out.push((id, low, point, high, allocated));
        }
    }
    out
}

/// fdatasync latency of the database's disk, from `pg_test_fsync` next to
/// the server binaries: the least one commit costs.
fn fsync_latency(scratch: &Path) -> String {
    let Ok(bin) = outbox::pg::local::find_binaries(None) else { return "an unknown time".into() };
    let file = scratch.join("fsync.test");
    let output = Command::new(bin.join("pg_test_fsync")).arg("-s").arg("1").arg("-f").arg(&file).output();
    let _ = std::fs::remove_file(&file);
    let stdout = output.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let line = stdout.lines().find(|l| l.trim_start().starts_with("fdatasync")).unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.iter().position(|w| *w == "usecs/op") {
        Some(i) if i > 0 => format!("{} µs per fdatasync (pg_test_fsync)", words[i - 1]),
        _ => "an unknown time per fdatasync".into(),
    }
}

/// Items the speed probe encodes and decodes.
const PROBE_ITEMS: usize = 20_000;

/// The host's speed at this moment: milliseconds one thread takes to encode
/// [`PROBE_ITEMS`] reference items as JSON and decode them again (the
/// median of nine rounds). The same work in every run of the suite, so
/// that runs in slow and fast hours of a shared machine can be told apart.
fn speed_probe(items: &[Arc<Item>]) -> f64 {
    let items = &items[..PROBE_ITEMS.min(items.len())];
    let mut rounds: Vec<f64> = (0..9)
        .map(|_| {
            let started = Instant::now();
            for item in items {
                let text = serde_json::to_string(&**item).expect("encode an item");
                std::hint::black_box(serde_json::from_str::<Item>(&text).expect("decode an item"));
            }
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    let median = rounds[rounds.len() / 2];
    eprintln!("speed probe: {median:.1} ms");
    median
}

fn machine(postgres_version: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(|| "unknown".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0));
    let cores = cores();
    format!(
        "{cores} cores ({cpu}), {memory} memory, PostgreSQL {postgres_version} (default durability: fsync, synchronous_commit on, full_page_writes on)"
    )
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

#[allow(clippy::too_many_arguments)]
fn report(
    machine: &str,
    p1: &[(String, f64, f64, f64, Option<f64>)],
    p2: &Persistence,
    mixed: &[Workload],
    layouts: &Layouts,
    p3: &Http,
    p4: &Lag,
    p5: &Hydration,
    p6: &Outage,
    p7: &Handover,
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `scripts/bench` on {} in {:.1} minutes. Every figure comes from this one run on this machine; ratios compare measurements taken side by side in the same run.\n",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        elapsed.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        w,
        "**Machine:** {machine}. The database, the server, the load generator and the benchmark share the same cores, so absolute figures are lower than on separate machines; the ratios are the point.\n"
    );
    let _ = writeln!(w, "Figures are **min / median / max** over {RUNS} runs unless said otherwise.\n");

    let _ = writeln!(w, "## Summary\n");
    let _ = writeln!(w, "| target | measured (median) | verdict |\n|---|---|---|");
    let small = p1.iter().find(|(n, ..)| n == "record_small/update_one").map_or(f64::NAN, |r| r.2);
    let small_pair = p1.iter().find(|(n, ..)| n == "record_small/change_set_two").map_or(f64::NAN, |r| r.2);
    let _ = writeln!(
        w,
        "| P1 recording a change ≤ 1 µs | {:.0} ns one entity, {:.0} ns two-entity change set | {} |",
        small,
        small_pair,
        verdict(small <= 1000.0)
    );
    let (_, hand, _) = stats(&p2.outbox_over_hand);
    let (_, naive, _) = stats(&p2.outbox_over_naive);
    let (_, ceiling, _) = stats(&p2.outbox_over_copy);
    let _ = writeln!(
        w,
        "| P2 worker ≥ 95 % of the best hand-written batch writer | {:.0} % | {} |",
        hand * 100.0,
        verdict(hand >= 0.95)
    );
    let (_, tuned, _) = stats(&p2.small_over_hand);
    let _ = writeln!(
        w,
        "| P2 the same, worker with `OUTBOX_BATCH_MAX={SMALL_BATCH}` (reported, no target) | {:.0} % | |",
        tuned * 100.0
    );
    let _ = writeln!(
        w,
        "| P2 worker ≥ 80 % of a plain binary COPY (the ceiling) | {:.0} % | {} |",
        ceiling * 100.0,
        verdict(ceiling >= 0.8)
    );
    let _ = writeln!(w, "| P2 worker against the naive pattern (reported, no target) | {naive:.0}× | |");
    let (_, http_ratio, _) = stats(&p3.ratio);
    let (_, replayed_ratio, _) = stats(&p3.ratio_replayed);
    // The server's CPU per request of each run: on, off, replayed.
    let us_per_request = [
        server_us_per_request(&p3.cpu_on, &p3.on),
        server_us_per_request(&p3.cpu_off, &p3.off),
        server_us_per_request(&p3.cpu_replayed, &p3.replayed),
    ];
    let [(_, cpu_on, _), (_, cpu_off, _), (_, cpu_replayed, _)] = us_per_request.each_ref().map(|runs| stats(runs));
    let cpu_ratios = cpu_ratio_per_set(&us_per_request[0], &us_per_request[1]);
    let (_, cpu_per_set, _) = stats(&cpu_ratios);
    let _ = writeln!(
        w,
        "| P3 throughput with persistence ≥ 95 % of without{} | {:.0} % (against an off run with the database's work replayed: {:.0} %) | {} |",
        if p3.pinned { ", PostgreSQL on its own CPU" } else { "" },
        http_ratio * 100.0,
        replayed_ratio * 100.0,
        verdict(http_ratio >= 0.95)
    );
    let _ = writeln!(
        w,
        "| P3 server CPU per request with persistence ≤ 1.05× without | {cpu_on:.1} / {cpu_off:.1} µs = {:.2}× (per set of runs: {cpu_per_set:.2}×; replayed: {cpu_replayed:.1} µs, {:.2}×) | {} |",
        cpu_on / cpu_off,
        cpu_on / cpu_replayed,
        verdict(cpu_on / cpu_off <= 1.05)
    );
    let lag99: Runs = p4.reports.iter().map(|r| r.lag.map_or(f64::NAN, |l| l.p99)).collect();
    let (_, lag99m, _) = stats(&lag99);
    let _ = writeln!(
        w,
        "| P4 p99 lag ≤ 200 ms at half the sustainable rate | {lag99m:.1} ms at {} req/s | {} |",
        p4.rate,
        verdict(lag99m <= 200.0)
    );
    let (_, hyd, _) = stats(&figure(p5.base(), |r| r.seconds));
    let (_, rss, _) = stats(&figure(p5.base(), |r| r.peak_rss_mib));
    let _ = writeln!(
        w,
        "| P5 hydration of 1,000,000 items ≤ 3 s, peak RSS ≤ 600 MiB | {hyd:.2} s, peak RSS {rss:.0} MiB | {} |",
        verdict(hyd <= 3.0 && rss <= 600.0)
    );
    let lost: i64 = p6.lost.iter().sum();
    let (_, rec, _) = stats(&p6.recovery_seconds);
    let _ = writeln!(
        w,
        "| P6 30 s outage: zero loss, lag < 1 s within 10 s of the database's return | {lost} lost, {rec:.1} s | {} |",
        verdict(lost == 0 && rec <= 10.0)
    );
    let (_, release, _) = stats(&p7.release_seconds);
    let (_, freeze, _) = stats(&p7.freeze_seconds);
    let lost7: i64 = p7.lost.iter().sum();
    let _ = writeln!(
        w,
        "| P7 handover with 1,000,000 items ≤ 1 s after release, ≤ TTL + 2 s after a freeze, zero loss | {release:.2} s, {freeze:.2} s (TTL {} s), {lost7} lost | {} |\n",
        p7.ttl_seconds,
        verdict(release <= 1.0 && freeze <= p7.ttl_seconds as f64 + 2.0 && lost7 == 0)
    );

    let _ = writeln!(w, "## P1: recording a change\n");
    let _ = writeln!(
        w,
        "Method: criterion (`benches/store.rs`), 1 s warm-up, 3 s measurement, 100 samples; the median with its 95 % confidence interval. The store holds 10,000 entities; a worker that discards its batches drains the outbox meanwhile (so most changes take the full path: a new pending mark and a record on the channel). `record_small` changes a two-field entity, which isolates the store's own cost; `record` changes a reference item (identifiers, enriched data, timestamps), so it includes cloning the item and keeping its indexes (by status, by identifier). `_contended` runs with a second thread changing other entities all the time; `_coalesced` changes an entity already pending. Heap allocations per change: counted on the changing thread (the worker's are not included) by `benches/allocations.rs`, a binary of its own with a counting allocator, over 20,000 changes after 20,000 uncounted ones; unlike the times, the machine's speed does not move them.\n"
    );
    let _ = writeln!(w, "| benchmark | median (ns) | 95 % CI (ns) | heap allocations per change |\n|---|---|---|---|");
    for (name, low, point, high, allocated) in p1 {
        let allocated = allocated.map_or_else(|| "–".to_owned(), |a| format!("{a:.2}"));
        let _ = writeln!(w, "| `{name}` | {point:.0} | {low:.0} – {high:.0} | {allocated} |");
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## P2: persistence throughput, side by side\n");
    let _ = writeln!(
        w,
        "Method: the same reference items (~350 bytes of JSON each, DFIDs in the server's form) written into the same `items` table (primary key, a generated `status` column and its index) of one local database, emptied and checkpointed before each method. (a) and (b) write the first {SLOW_ROWS} of them, one transaction per row, {REQUEST_CONCURRENCY} at a time; (c), (d) and (e) write all {FAST_ROWS}. (c) records every item through the store as its own change once the engine has taken the lease and hydrated (the empty table), before its worker starts, and is timed from then until the outbox is empty: the worker's own throughput (rows the table has never held go in with COPY, the rest with the version-guarded upsert), with the default settings (batches of up to 5000 rows, 5 ms linger, 2 writers, the lease's fencing check in every transaction), and again with batches of up to {SMALL_BATCH} rows (the default until this measurement showed what the commit per batch costs). (d) is the hand-written writer below with the best median (each run of (c) is compared with the same run of that writer); (e) is a plain binary COPY into an empty table with the same columns and indexes, on two connections, run right before or after (c) (alternately), so that their ratio compares the machine at one moment.\n"
    );
    let _ = writeln!(w, "| method | rows/s |\n|---|---|");
    let _ = writeln!(w, "| (a) naive: a spawned task per change, one upsert each | {} |", fmt3(&p2.naive, 0));
    let _ = writeln!(w, "| (b) write-through: each request awaits its upsert | {} |", fmt3(&p2.write_through, 0));
    let _ = writeln!(w, "| (c) outbox worker, defaults | {} |", fmt3(&p2.outbox, 0));
    let _ = writeln!(w, "| (c) outbox worker, `OUTBOX_BATCH_MAX={SMALL_BATCH}` | {} |", fmt3(&p2.outbox_small, 0));
    let _ =
        writeln!(w, "| (d) best hand-written batched upsert ({}) | {} |", p2.best_candidate, fmt3(&p2.hand_written, 0));
    let _ = writeln!(w, "| (e) plain COPY into an empty table | {} |", fmt3(&p2.copy, 0));
    let _ = writeln!(w, "\nHand-written candidates for (d):\n\n| writer | rows/s |\n|---|---|");
    for (name, runs) in &p2.candidates {
        let _ = writeln!(w, "| {name} | {} |", fmt3(runs, 0));
    }
    let _ = writeln!(w, "\n| ratio (per run, same run) | min / median / max | target |\n|---|---|---|");
    let _ = writeln!(w, "| (c)/(d), defaults | {} | ≥ 0.95 |", fmt3(&p2.outbox_over_hand, 2));
    let _ =
        writeln!(w, "| (c)/(d), `OUTBOX_BATCH_MAX={SMALL_BATCH}` | {} | (reported) |", fmt3(&p2.small_over_hand, 2));
    let _ = writeln!(w, "| (c)/(a) | {} | (reported) |", fmt3(&p2.outbox_over_naive, 1));
    let _ = writeln!(w, "| (c)/(e) | {} | ≥ 0.80 (the ceiling) |\n", fmt3(&p2.outbox_over_copy, 2));

    let _ = writeln!(w, "### By workload: inserts, updates, both\n");
    let _ = writeln!(
        w,
        "Method: {FAST_ROWS} rows per run as above, the first ones written as updates of rows the table already holds (version 1, loaded before the run; the engine hydrates them, its time not counted) and the rest as inserts. (c) the worker with its defaults, timed as above; (d) the UNNEST upsert, 1000 rows per transaction on 2 connections, writing updates at version 2; (e) plain COPY of {FAST_ROWS} rows into an empty table, the ceiling of writing that many rows whatever the mix. {RUNS} runs per workload, the three writers in turn.\n"
    );
    let _ = writeln!(
        w,
        "| workload | (c) worker rows/s | (d) UNNEST rows/s | (e) COPY rows/s | (c)/(d) | (c)/(e) |\n|---|---|---|---|---|---|"
    );
    for m in mixed {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            m.name,
            fmt3(&m.outbox, 0),
            fmt3(&m.unnest, 0),
            fmt3(&m.copy, 0),
            fmt3(&m.outbox_over_unnest, 2),
            fmt3(&m.outbox_over_copy, 2)
        );
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "### Typed columns against the document layout\n");
    let _ = writeln!(
        w,
        "Method: one kind with nine fields (five text, a bigint, a boolean, a timestamptz), written by the outbox worker with its defaults as in (c), {FAST_ROWS} rows per run, once as a `data json` document per row and once in typed columns of its own table; runs alternate which layout goes first; each table is emptied and checkpointed before its run. Average row size in the table: {:.0} bytes (document), {:.0} bytes (columns).\n",
        layouts.row_bytes.0, layouts.row_bytes.1
    );
    let _ = writeln!(w, "| layout | rows/s |\n|---|---|");
    let _ = writeln!(w, "| document (`data json`) | {} |", fmt3(&layouts.document, 0));
    let _ = writeln!(w, "| typed columns | {} |", fmt3(&layouts.columns, 0));
    let _ = writeln!(w, "| columns / document (per run) | {} |\n", fmt3(&layouts.columns_over_document, 2));

    let _ = writeln!(w, "## P3: HTTP throughput, persistence on vs off\n");
    let _ = writeln!(
        w,
        "Method: the release binary serving `POST /api/items` with its defaults, driven by `outbox loadgen`'s code ({HTTP_CONNECTIONS} connections, each sending its next request when the last is answered, 8 s), persistence on and off (`OUTBOX_BENCH_DISCARD_WRITES=true`: the worker takes batches and writes nothing) in {P3_RUNS} sets of consecutive runs, on first in one set and last in the next (so that a drift of the machine's speed weighs on both sides alike), each run on a fresh server and an empty table. Latency is measured from send to answer. {}\n",
        if p3.pinned {
            "PostgreSQL is confined to the first CPU and the server and the load generator to the others (`taskset`), in both the on and the off runs, as if the database had its own host."
        } else {
            "This machine has one CPU: PostgreSQL, the server and the load generator share it."
        }
    );
    let _ = writeln!(
        w,
        "A third run in each set, persistence off while a thread on PostgreSQL's CPU copies reference items into a table with the columns and indexes of `items` at the rate of the latest on run ({REPLAY_BATCH} rows per transaction; it wrote {} rows/s), gives PostgreSQL an on run's work without the server: on this machine the database's work on its CPU slows the other CPU (see the notes), which a database on its own host would not do, so the on run against this one shows what persistence costs the server itself. The verdicts keep the plain off run.\n",
        fmt3(&p3.replay_rates, 0)
    );
    let _ = writeln!(w, "| | req/s | p50 ms | p99 ms |\n|---|---|---|---|");
    for (name, reports) in
        [(P3Run::On.name(), &p3.on), (P3Run::Off.name(), &p3.off), (P3Run::Replayed.name(), &p3.replayed)]
    {
        let t: Runs = reports.iter().map(|r| r.throughput).collect();
        let p50: Runs = reports.iter().map(|r| r.latency.p50).collect();
        let p99: Runs = reports.iter().map(|r| r.latency.p99).collect();
        let _ = writeln!(w, "| {name} | {} | {} | {} |", fmt3(&t, 0), fmt3(&p50, 2), fmt3(&p99, 2));
    }
    let _ = writeln!(
        w,
        "\nRatio on/off per set of runs: {} (target ≥ 0.95); on against replayed: {}. Server CPU per request on/off per set of runs: {} (the verdict takes the medians' ratio).\n",
        fmt3(&p3.ratio, 2),
        fmt3(&p3.ratio_replayed, 2),
        fmt3(&cpu_ratios, 2)
    );
    let _ = writeln!(
        w,
        "Where the CPU went (share of all cores over each run's load, from `/proc`: PostgreSQL is the postmaster and all its backends; the load generator is the benchmark process; everything else is the rest of the machine, kernel and hypervisor steal included):\n"
    );
    let _ = writeln!(
        w,
        "| | PostgreSQL | server | load generator | everything else | idle | server CPU per request (µs) |\n|---|---|---|---|---|---|---|"
    );
    for ((name, shares), per_request) in [
        (P3Run::On.name().to_owned(), &p3.cpu_on),
        (P3Run::Off.name().to_owned(), &p3.cpu_off),
        (format!("{} (load generator: with the replay)", P3Run::Replayed.name()), &p3.cpu_replayed),
    ]
    .into_iter()
    .zip(&us_per_request)
    {
        let pct = |f: fn(&CpuShares) -> f64| -> Runs { shares.iter().map(|s| f(s) * 100.0).collect() };
        let _ = writeln!(
            w,
            "| {name} | {} % | {} % | {} % | {} % | {} % | {} |",
            fmt3(&pct(|s| s.postgres), 0),
            fmt3(&pct(|s| s.server), 0),
            fmt3(&pct(|s| s.load_generator), 0),
            fmt3(&pct(|s| 1.0 - s.idle - s.postgres - s.server - s.load_generator), 0),
            fmt3(&pct(|s| s.idle), 0),
            fmt3(per_request, 1)
        );
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## P4: lag under load\n");
    let _ = writeln!(
        w,
        "Method: the release binary at a fixed {} req/s (half the median sustainable rate of P3 with persistence on) for 10 s, requests scheduled ahead so a stall is charged to the requests it delays; the engine's lag (`/api/outbox/status`) sampled every 10 ms.\n",
        p4.rate
    );
    let _ = writeln!(w, "| | p50 | p90 | p99 | max |\n|---|---|---|---|---|");
    let col = |f: fn(&outbox::loadgen::Percentiles) -> f64, lag: bool| -> Runs {
        p4.reports.iter().map(|r| if lag { r.lag.as_ref().map_or(f64::NAN, f) } else { f(&r.latency) }).collect()
    };
    let _ = writeln!(
        w,
        "| lag (ms) | {} | {} | {} | {} |",
        fmt3(&col(|p| p.p50, true), 1),
        fmt3(&col(|p| p.p90, true), 1),
        fmt3(&col(|p| p.p99, true), 1),
        fmt3(&col(|p| p.max, true), 1)
    );
    let _ = writeln!(
        w,
        "| request latency (ms) | {} | {} | {} | {} |\n",
        fmt3(&col(|p| p.p50, false), 2),
        fmt3(&col(|p| p.p90, false), 2),
        fmt3(&col(|p| p.p99, false), 2),
        fmt3(&col(|p| p.max, false), 2)
    );

    let _ = writeln!(w, "## P5: hydration\n");
    let _ = writeln!(
        w,
        "Method: {HYDRATE_ITEMS} reference items (DFIDs in the server's form: 32 hex digits of a random UUID, so rows come in no DFID order) COPYed into `items`, then the release binary started against the database; hydration time is what the server logs (`hydration finished`, streamed rows decoded into the store and its item indexes), readiness is from process start to `/readyz` 200, and peak memory is the process's `VmHWM`; CPU is the server's and PostgreSQL's (the postmaster and its backends) from `/proc`, from the server's start until it is ready.\n"
    );
    let _ = writeln!(w, "| | min / median / max |\n|---|---|");
    let base = p5.base();
    let _ = writeln!(w, "| hydration (s) | {} |", fmt3(&figure(base, |r| r.seconds), 2));
    let _ = writeln!(w, "| rows/s | {} |", fmt3(&figure(base, |r| HYDRATE_ITEMS as f64 / r.seconds), 0));
    let _ = writeln!(w, "| start to ready (s) | {} |", fmt3(&figure(base, |r| r.ready), 2));
    let _ = writeln!(w, "| peak RSS (MiB) | {} |", fmt3(&figure(base, |r| r.peak_rss_mib), 0));
    let _ = writeln!(w, "| CPU, start to ready: server (s) | {} |", fmt3(&figure(base, |r| r.server_cpu), 2));
    let _ = writeln!(w, "| CPU, start to ready: PostgreSQL (s) | {} |\n", fmt3(&figure(base, |r| r.postgres_cpu), 2));

    let _ = writeln!(w, "The curve ({RUNS} runs at each size after its items are written; per 1M from the medians):\n");
    let _ = writeln!(
        w,
        "| items | hydration (s) | s per 1M | peak RSS (MiB) | MiB per 1M | CPU per 1M: server / PostgreSQL (s) |\n|---|---|---|---|---|---|"
    );
    for (count, runs) in &p5.sizes {
        let millions = *count as f64 / 1e6;
        let median = |f: fn(&HydrateRun) -> f64| stats(&figure(runs, f)).1;
        let _ = writeln!(
            w,
            "| {count} | {} | {:.2} | {:.0} | {:.0} | {:.2} / {:.2} |",
            fmt3(&figure(runs, |r| r.seconds), 2),
            median(|r| r.seconds) / millions,
            median(|r| r.peak_rss_mib),
            median(|r| r.peak_rss_mib) / millions,
            median(|r| r.server_cpu) / millions,
            median(|r| r.postgres_cpu) / millions
        );
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## P6: a 30 s outage under steady load\n");
    let _ = writeln!(
        w,
        "Method: the release binary at a steady {} req/s for 55 s; PostgreSQL stopped 10 s in and started again 30 s later; lag sampled every 100 ms. Lost = acknowledged creates minus rows in the table once the backlog is written. Recovery = time from the database's return until the lag is under 1 s for good.\n",
        p6.rate
    );
    let _ = writeln!(
        w,
        "| run | acknowledged | refused (503) | lost | peak lag (s) | recovery (s) |\n|---|---|---|---|---|---|"
    );
    for run in 0..p6.lost.len() {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {:.1} | {:.1} |",
            run + 1,
            p6.acknowledged[run],
            p6.refused[run],
            p6.lost[run],
            p6.peak_lag_seconds[run],
            p6.recovery_seconds[run]
        );
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## P7: handover to a standby\n");
    let _ = writeln!(
        w,
        "Method: {HYDRATE_ITEMS} reference items in `items`; holder A and standby B of the release binary (B hydrated and following, status `standby`), default lease time to live ({} s); a client sends durable creates at {} req/s to whichever server answers (refused connections, 503 and 2 s timeouts go to the next). Release: SIGTERM to A (it drains and releases the lease), timed until B's `/readyz` answers 200 (polled every 10 ms). Freeze: a new standby C, then SIGSTOP to B, timed until C is ready. Lost = durable creates acknowledged and not in the table at the end.\n",
        p7.ttl_seconds, p7.rate
    );
    let _ = writeln!(w, "| | min / median / max |\n|---|---|");
    let _ = writeln!(w, "| release → standby ready (s) | {} |", fmt3(&p7.release_seconds, 2));
    let _ = writeln!(w, "| freeze → standby ready (s) | {} |", fmt3(&p7.freeze_seconds, 2));
    let acknowledged: Vec<String> = p7.acknowledged.iter().map(u64::to_string).collect();
    let lost: Vec<String> = p7.lost.iter().map(i64::to_string).collect();
    let _ = writeln!(w, "| durable creates acknowledged per run | {} |", acknowledged.join(" / "));
    let _ = writeln!(w, "| lost per run | {} |\n", lost.join(" / "));
    md
}

fn main() {
    let started = Instant::now();
    cores(); // counted before any pinning
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary =
        std::env::var_os("OUTBOX_BIN").map(PathBuf::from).unwrap_or_else(|| root.join("target/release/outbox"));
    assert!(binary.exists(), "build the release binary first (cargo build --release): {}", binary.display());
    let scratch = root.join("target/bench");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        eprintln!("starting a private PostgreSQL (default durability)");
        let postgres = tokio::task::spawn_blocking({
            let dir = scratch.join("postgres");
            move || LocalPostgres::start(LocalPostgresOptions::new(dir)).expect("start PostgreSQL")
        })
        .await
        .unwrap();
        let admin = postgres.config("postgres");
        pg::create_database_if_missing(&admin, DB).await.unwrap();
        let config = postgres.config(DB);
        let url = postgres.connection_string(DB);
        let pool = pg::pool(config.clone(), 1);
        outbox::api::schema::migrate(&pool).await.expect("migrations");
        pool.close();
        let client = pg::connect(&config).await.unwrap();
        client.batch_execute("CREATE TABLE IF NOT EXISTS items_copy (LIKE items INCLUDING ALL)").await.unwrap();
        let version: String = client.query_one("SHOW server_version", &[]).await.unwrap().get(0);
        drop(client);
        let items: Vec<Arc<Item>> = (0..FAST_ROWS).map(|n| Arc::new(bench_item(n))).collect();
        let bench = Bench { postgres, config, url, binary, scratch: scratch.clone(), items: Arc::new(items) };

        // `OUTBOX_BENCH_ONLY=p2,p5` runs only those parts, for profiling,
        // and leaves BENCHMARKS.md alone.
        if let Ok(only) = std::env::var("OUTBOX_BENCH_ONLY") {
            for part in only.split(',') {
                match part.trim() {
                    "probe" => drop(speed_probe(&bench.items)),
                    "p2" => drop(persistence(&bench).await),
                    "p3" => drop(http(&bench).await),
                    "p4" => drop(lag(&bench, 14_000.0).await),
                    "p5" => drop(hydration(&bench).await),
                    "p6" => drop(outage(&bench, 80_000 / 30).await),
                    "p7" => drop(handover(&bench).await),
                    "layouts" => drop(layouts(&bench).await),
                    "workloads" => drop(workloads(&bench).await),
                    other => panic!("unknown part {other}"),
                }
            }
            let postgres = bench.postgres;
            tokio::task::spawn_blocking(move || postgres.stop()).await.unwrap().expect("stop PostgreSQL");
            return;
        }
        let mut probes = vec![("the start", speed_probe(&bench.items))];
        let p2 = persistence(&bench).await;
        let mixed = workloads(&bench).await;
        let layouts = layouts(&bench).await;
        probes.push(("the start of P3", speed_probe(&bench.items)));
        let p3 = http(&bench).await;
        let sustainable = stats(&p3.on.iter().map(|r| r.throughput).collect::<Vec<_>>()).1;
        let p4 = lag(&bench, sustainable).await;
        probes.push(("the start of P5", speed_probe(&bench.items)));
        let p5 = hydration(&bench).await;
        // Steady load that the outbox can hold through the whole outage
        // (80 % of the default capacity of 100,000 entities over 30 s), so
        // every request is accepted and "zero loss" covers all of them.
        let p6 = outage(&bench, p4.rate.min(80_000 / 30)).await;
        let p7 = handover(&bench).await;
        let p1 = criterion_medians(&root.join("target/criterion"));
        probes.push(("the end", speed_probe(&bench.items)));
        let speed = format!(
            "one thread encoded and decoded {PROBE_ITEMS} reference items (JSON) in {} ms at {}: the same work in every run, a measure of how fast the machine was during this one",
            probes.iter().map(|(_, ms)| format!("{ms:.0}")).collect::<Vec<_>>().join(" / "),
            probes.iter().map(|(at, _)| *at).collect::<Vec<_>>().join(", ")
        );
        let machine = format!("{}; the disk takes {}; {speed}", machine(&version), fsync_latency(&scratch));
        let markdown = report(&machine, &p1, &p2, &mixed, &layouts, &p3, &p4, &p5, &p6, &p7, started.elapsed());
        let notes = std::fs::read_to_string(root.join("benches/NOTES.md")).unwrap_or_default();
        std::fs::write(root.join("BENCHMARKS.md"), format!("{markdown}{notes}")).expect("write BENCHMARKS.md");
        eprintln!("wrote BENCHMARKS.md in {:.1} minutes", started.elapsed().as_secs_f64() / 60.0);
        let postgres = bench.postgres;
        tokio::task::spawn_blocking(move || postgres.stop()).await.unwrap().expect("stop PostgreSQL");
    });
}
