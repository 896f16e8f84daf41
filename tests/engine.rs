//! The engine against a real PostgreSQL: the model of memory equals the
//! database, coalescing, change-set atomicity, backpressure, monotonic
//! versions, tickets, and the shutdown drain.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestDb, fresh_db};
use outbox::Engine;
use outbox::store::{ApplyError, Entity, Refusal, Store, StoreBuilder, StoreError};
use outbox::worker::{Worker, WorkerConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Doc {
    id: String,
    body: String,
    n: u64,
}

impl Entity for Doc {
    const KIND: &'static str = "doc";
    const TABLE: &'static str = "docs";
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tag {
    id: String,
    label: String,
}

impl Entity for Tag {
    const KIND: &'static str = "tag";
    const TABLE: &'static str = "tags";
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Account {
    id: String,
    balance: i64,
}

impl Entity for Account {
    const KIND: &'static str = "account";
    const TABLE: &'static str = "accounts";
    fn id(&self) -> &str {
        &self.id
    }
}

/// Creates the standard entity tables, with a row-write counter and a
/// statement counter per table (and a count of the `COPY` statements among
/// them) for the tests that count writes.
async fn create_tables(db: &TestDb, tables: &[&str]) {
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE TABLE writes (tbl text, kind text, n bigint, PRIMARY KEY (tbl, kind));
             CREATE FUNCTION count_row() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO writes VALUES (TG_TABLE_NAME, 'row', 1)
               ON CONFLICT (tbl, kind) DO UPDATE SET n = writes.n + 1;
               RETURN NULL;
             END $$;
             CREATE FUNCTION count_statement() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO writes VALUES (TG_TABLE_NAME, 'statement', 1)
               ON CONFLICT (tbl, kind) DO UPDATE SET n = writes.n + 1;
               IF current_query() ILIKE 'COPY %' THEN
                 INSERT INTO writes VALUES (TG_TABLE_NAME, 'copy', 1)
                 ON CONFLICT (tbl, kind) DO UPDATE SET n = writes.n + 1;
               END IF;
               RETURN NULL;
             END $$;",
        )
        .await
        .expect("create counters");
    for table in tables {
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id text PRIMARY KEY, version bigint NOT NULL, deleted boolean NOT NULL DEFAULT false,
                   data jsonb, updated_at timestamptz NOT NULL DEFAULT now());
                 CREATE TRIGGER {table}_rows AFTER INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION count_row();
                 CREATE TRIGGER {table}_statements AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION count_statement();"
            ))
            .await
            .expect("create an entity table");
    }
}

async fn write_count(db: &TestDb, table: &str, kind: &str) -> i64 {
    let client = db.connect().await;
    client
        .query_opt("SELECT n FROM writes WHERE tbl = $1 AND kind = $2", &[&table, &kind])
        .await
        .expect("read counters")
        .map_or(0, |r| r.get(0))
}

/// Rows of a table: id → (version, deleted, data).
async fn db_rows(db: &TestDb, table: &str) -> BTreeMap<String, (u64, bool, Option<serde_json::Value>)> {
    let client = db.connect().await;
    client
        .query(&format!("SELECT id, version, deleted, data FROM {table}"), &[])
        .await
        .expect("read rows")
        .into_iter()
        .map(|r| (r.get(0), (r.get::<_, i64>(1) as u64, r.get(2), r.get(3))))
        .collect()
}

/// Memory as the same map (tombstones included).
fn memory_rows<E: Entity>(store: &Store) -> BTreeMap<String, (u64, bool, Option<serde_json::Value>)> {
    store.read(|view| {
        view.entries::<E>()
            .map(|(id, version, value)| {
                let json = value.map(|v| serde_json::to_value(&*v).expect("serializes"));
                (id.to_owned(), (version, json.is_none(), json))
            })
            .collect()
    })
}

fn config(batch_max: usize, writers: usize) -> WorkerConfig {
    WorkerConfig {
        batch_max,
        linger: Duration::from_millis(1),
        retry_max_delay: Duration::from_millis(200),
        writers,
        discard: false,
    }
}

/// An engine as the server runs it: migrations, the single-writer lease
/// (so every flush goes through the fencing check), hydration.
async fn start(db: &TestDb, builder: StoreBuilder, worker: WorkerConfig) -> Engine {
    engine_builder(db, builder, worker).await.start().await.expect("start the engine")
}

/// The builder of [`start`]'s engine, for tests that change a setting.
async fn engine_builder(db: &TestDb, builder: StoreBuilder, worker: WorkerConfig) -> outbox::engine::EngineBuilder {
    let pool = outbox::pg::pool(db.config.clone(), 8);
    outbox::pg::migrate(&pool).await.expect("migrations");
    let (store, receiver) = builder.build();
    Engine::builder(store, receiver, pool).worker(worker).holder("engine-test")
}

/// A database with the `docs` table (then `ddl`, when given) and an engine
/// writing docs in batches of up to 1000 rows on one connection.
async fn docs_engine(name: &str, ddl: Option<&str>) -> (TestDb, Engine) {
    let db = fresh_db(name).await;
    create_tables(&db, &["docs"]).await;
    if let Some(ddl) = ddl {
        db.connect().await.batch_execute(ddl).await.unwrap();
    }
    let engine = start(&db, Store::builder().kind::<Doc>(), config(1000, 1)).await;
    (db, engine)
}

/// A small deterministic PRNG (xorshift64*), so failures replay by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random operation of the model test: creates, updates, deletes,
/// re-creates, and change sets over several entities of both kinds.
fn random_change(store: &Store, rng: &mut Rng, ids: u64) {
    let doc_id = |rng: &mut Rng| format!("d{}", rng.below(ids));
    let tag_id = |rng: &mut Rng| format!("t{}", rng.below(ids));
    let op = rng.below(10);
    let n = rng.next();
    let result = store.apply(|set| -> Result<(), StoreError> {
        match op {
            // Create or re-create (after a delete), else update.
            0..=2 => {
                let id = doc_id(rng);
                if set.contains::<Doc>(&id) {
                    set.update::<Doc>(&id, |d| d.n = n)?;
                } else {
                    set.insert(Doc { id, body: format!("body {n}"), n })?;
                }
            }
            3 => {
                let id = tag_id(rng);
                set.upsert(Tag { id, label: format!("label {n}") })?;
            }
            4 | 5 => {
                let id = doc_id(rng);
                if set.contains::<Doc>(&id) {
                    set.delete::<Doc>(&id)?;
                }
                let id = tag_id(rng);
                if set.contains::<Tag>(&id) && n.is_multiple_of(3) {
                    set.delete::<Tag>(&id)?;
                }
            }
            // Change sets across kinds and entities.
            _ => {
                for _ in 0..2 + rng.below(3) {
                    let id = doc_id(rng);
                    if set.contains::<Doc>(&id) {
                        set.update::<Doc>(&id, |d| d.body.push('+'))?;
                    } else {
                        set.upsert(Doc { id, body: "set".into(), n })?;
                    }
                    let id = tag_id(rng);
                    set.upsert(Tag { id, label: format!("set {n}") })?;
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(()) | Err(ApplyError::Refused(Refusal::QueueFull { .. })) => {}
        Err(e) => panic!("unexpected change failure: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn randomized_model_database_equals_memory_after_drain() {
    for seed in 1..=4u64 {
        let db = fresh_db(&format!("model{seed}")).await;
        create_tables(&db, &["docs", "tags"]).await;
        // Small batches and a small capacity exercise grouping, blocking on
        // in-flight entities and backpressure.
        let engine = start(&db, Store::builder().kind::<Doc>().kind::<Tag>().capacity(64), config(7, 2)).await;
        let store = engine.store().clone();
        let writers: Vec<_> = (0..4u64)
            .map(|thread| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(seed * 7919 + thread * 104_729 + 1);
                    for _ in 0..3000 {
                        random_change(&store, &mut rng, 40);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer thread");
        }
        let report = engine.shutdown(Duration::from_secs(60)).await;
        assert!(report.complete(), "seed {seed}: drain left {} unwritten", report.drain.unwritten);
        assert_eq!(db_rows(&db, "docs").await, memory_rows::<Doc>(&store), "seed {seed}: docs differ");
        assert_eq!(db_rows(&db, "tags").await, memory_rows::<Tag>(&store), "seed {seed}: tags differ");
        assert!(memory_rows::<Doc>(&store).len() > 10, "the run touched many entities");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn coalescing_writes_one_row_with_the_last_version() {
    let db = fresh_db("coalesce").await;
    create_tables(&db, &["docs"]).await;
    let pool = outbox::pg::pool(db.config.clone(), 4);
    let (store, receiver) = Store::builder().kind::<Doc>().capacity(10).build();
    store.apply(|set| set.insert(Doc { id: "hot".into(), body: String::new(), n: 0 })).expect("insert");
    for n in 1..=10_000u64 {
        store.apply(|set| set.update::<Doc>("hot", |d| d.n = n)).expect("update");
        assert_eq!(store.outbox().depth, 1, "one entity pending, however often it changes");
    }
    // The worker starts only now: all 10,001 changes precede any flush.
    let worker = Worker::start(store.clone(), receiver, pool, config(1000, 2), None, Default::default());
    assert!(worker.drain(Duration::from_secs(30)).await.complete());
    let rows = db_rows(&db, "docs").await;
    assert_eq!(rows["hot"].0, 10_001, "the newest version is written");
    assert_eq!(rows["hot"].2.as_ref().unwrap()["n"], 10_000);
    assert_eq!(write_count(&db, "docs", "row").await, 1, "one row write for 10,001 changes");
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_never_see_half_a_change_set() {
    const ACCOUNTS: i64 = 12;
    const TOTAL: i64 = ACCOUNTS * 1000;
    let db = fresh_db("atomic").await;
    create_tables(&db, &["accounts"]).await;
    let engine = start(&db, Store::builder().kind::<Account>(), config(5, 2)).await;
    let store = engine.store().clone();
    store
        .apply(|set| -> Result<(), StoreError> {
            for i in 0..ACCOUNTS {
                set.insert(Account { id: format!("a{i}"), balance: 1000 })?;
            }
            Ok(())
        })
        .expect("open accounts");

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let config = db.config.clone();
        tokio::spawn(async move {
            let client = outbox::pg::connect(&config).await.expect("reader connects");
            let mut observations = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let row = client
                    .query_one(
                        "SELECT count(*), coalesce(sum((data->>'balance')::bigint), 0)::bigint FROM accounts",
                        &[],
                    )
                    .await
                    .expect("read balances");
                let (count, sum): (i64, i64) = (row.get(0), row.get(1));
                assert!(
                    (count == 0 && sum == 0) || (count == ACCOUNTS && sum == TOTAL),
                    "a reader saw half a change set: {count} accounts holding {sum}"
                );
                observations += 1;
            }
            observations
        })
    };

    let writers: Vec<_> = (0..3u64)
        .map(|thread| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(thread + 11);
                for _ in 0..4000 {
                    let from = format!("a{}", rng.below(ACCOUNTS as u64));
                    let to = format!("a{}", rng.below(ACCOUNTS as u64));
                    if from == to {
                        continue;
                    }
                    let amount = rng.below(50) as i64;
                    store
                        .apply(|set| -> Result<(), StoreError> {
                            set.update::<Account>(&from, |a| a.balance -= amount)?;
                            set.update::<Account>(&to, |a| a.balance += amount)?;
                            Ok(())
                        })
                        .expect("transfer");
                    if rng.below(8) == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer thread");
    }
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
    stop.store(true, Ordering::Relaxed);
    let observations = reader.await.expect("the reader found no torn change set");
    assert!(observations > 10, "the reader ran alongside the writers ({observations} reads)");
    assert_eq!(db_rows(&db, "accounts").await, memory_rows::<Account>(&store));
    assert!(write_count(&db, "accounts", "statement").await > 10, "many batches were written");
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_refuses_changes_and_leaves_state_untouched() {
    let db = fresh_db("backpressure").await;
    create_tables(&db, &["docs"]).await;
    let engine = start(&db, Store::builder().kind::<Doc>().capacity(3), config(100, 1)).await;
    let store = engine.store().clone();

    // Pause the database for writes: hold a lock the upsert needs.
    let locker = db.connect().await;
    locker.batch_execute("BEGIN; LOCK TABLE docs IN ACCESS EXCLUSIVE MODE").await.expect("lock");

    for i in 0..3 {
        store.apply(|set| set.insert(Doc { id: format!("d{i}"), body: "first".into(), n: 0 })).expect("room");
    }
    // Changes to entities already pending are absorbed, not refused.
    store.apply(|set| set.update::<Doc>("d0", |d| d.n = 1)).expect("coalesced change needs no room");
    let before = memory_rows::<Doc>(&store);

    let refused = store.apply(|set| -> Result<(), StoreError> {
        set.update::<Doc>("d1", |d| d.n = 99)?;
        set.insert(Doc { id: "d3".into(), body: "no room".into(), n: 0 })?;
        Ok(())
    });
    match refused {
        Err(ApplyError::Refused(Refusal::QueueFull { capacity, retry_after })) => {
            assert_eq!(capacity, 3);
            assert!(retry_after >= Duration::from_secs(1));
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert_eq!(memory_rows::<Doc>(&store), before, "a refused change set changes nothing, not even its first half");
    assert!(store.get::<Doc>("d3").is_none());
    assert_eq!(store.outbox().depth, 3);

    locker.batch_execute("ROLLBACK").await.expect("unlock");
    let drained = common::poll_until(Duration::from_secs(20), || async { store.outbox().depth == 0 }).await;
    assert!(drained, "everything pending commits once the database is back");
    store.apply(|set| set.insert(Doc { id: "d3".into(), body: "room again".into(), n: 0 })).expect("room again");
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
    assert_eq!(db_rows(&db, "docs").await, memory_rows::<Doc>(&store));
}

/// A shutdown begun by the token that could cancel start-up (a server's
/// SIGTERM) still drains under the lease: the lease is renewed until the
/// drain is done, however long after the token the drain comes.
#[tokio::test(flavor = "multi_thread")]
async fn the_lease_is_kept_until_the_drain_after_the_start_token_fires() {
    let db = fresh_db("drain_after_cancel").await;
    create_tables(&db, &["docs"]).await;
    let cancel = outbox::CancellationToken::new();
    let ttl = Duration::from_secs(1);
    let engine = engine_builder(&db, Store::builder().kind::<Doc>(), config(1000, 1))
        .await
        .lease_ttl(ttl)
        .cancel_on(cancel.clone())
        .start()
        .await
        .expect("start the engine");
    cancel.cancel();
    // Twice the time to live: unrenewed, the lease would have lapsed.
    tokio::time::sleep(ttl * 2).await;
    let store = engine.store().clone();
    store.apply(|set| set.insert(Doc { id: "late".into(), body: "after the token".into(), n: 1 })).unwrap();
    let report = engine.shutdown(Duration::from_secs(10)).await;
    assert!(report.complete(), "the drain wrote everything under a renewed lease: {report:?}");
    assert_eq!(db_rows(&db, "docs").await, memory_rows::<Doc>(&store));
}

/// A stored row that does not decode into its kind ends start-up with an
/// error naming it, at once (it would not decode on a retry either), and
/// the rows streamed around it (several chunks' worth) do not hide it.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_that_does_not_decode_ends_start_up_with_its_id() {
    let db = fresh_db("undecodable_row").await;
    create_tables(&db, &["docs"]).await;
    db.connect()
        .await
        .batch_execute(
            r#"INSERT INTO docs (id, version, data)
                 SELECT 'd' || n, 1, jsonb_build_object('id', 'd' || n, 'body', 'b', 'n', n)
                 FROM generate_series(1, 5000) n;
               INSERT INTO docs (id, version, data) VALUES ('bad', 1, '{"id": "bad", "body": 7, "n": 1}');
               INSERT INTO docs (id, version, data)
                 SELECT 'e' || n, 1, jsonb_build_object('id', 'e' || n, 'body', 'b', 'n', n)
                 FROM generate_series(1, 5000) n;"#,
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let result = engine_builder(&db, Store::builder().kind::<Doc>(), config(1000, 1)).await.start().await;
    let error = result.err().expect("start-up fails").to_string();
    assert!(error.contains("doc bad in table docs does not decode"), "{error}");
    assert!(error.contains("invalid type"), "serde's reason is kept: {error}");
    assert!(started.elapsed() < Duration::from_secs(10), "not retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_continue_across_restarts_and_old_writes_change_nothing() {
    let db = fresh_db("monotonic").await;
    create_tables(&db, &["docs"]).await;
    let engine = start(&db, Store::builder().kind::<Doc>(), config(100, 2)).await;
    engine.store().apply(|set| set.insert(Doc { id: "a".into(), body: "v1".into(), n: 1 })).unwrap();
    engine.store().apply(|set| set.update::<Doc>("a", |d| d.body = "v2".into())).unwrap();
    engine.store().apply(|set| set.update::<Doc>("a", |d| d.body = "v3".into())).unwrap();
    engine.store().apply(|set| set.insert(Doc { id: "gone".into(), body: "x".into(), n: 1 })).unwrap();
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
    engine_store_delete_and_restart(&db).await;
}

async fn engine_store_delete_and_restart(db: &TestDb) {
    // Second life: versions continue from the hydrated ones.
    let engine = start(db, Store::builder().kind::<Doc>(), config(100, 2)).await;
    let store = engine.store().clone();
    assert_eq!(store.get::<Doc>("a").expect("hydrated").version, 3);
    let updated = store.apply(|set| set.update::<Doc>("a", |d| d.body = "v4".into())).unwrap();
    assert_eq!(updated.version, 4, "the version continues from the hydrated one");
    let tombstone = store.apply(|set| set.delete::<Doc>("gone")).unwrap();
    assert_eq!(tombstone, 2);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());

    // Third life: the tombstone is hydrated; a re-create continues from it.
    let engine = start(db, Store::builder().kind::<Doc>(), config(100, 2)).await;
    assert!(engine.store().get::<Doc>("gone").is_none(), "a tombstone stays deleted");
    let again = engine.store().apply(|set| set.insert(Doc { id: "gone".into(), body: "back".into(), n: 2 })).unwrap();
    assert_eq!(again.version, 3);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());

    // Replaying an older batch (a retry, a stale writer) changes nothing.
    let before = db_rows(db, "docs").await;
    let client = db.connect().await;
    let sql = outbox::pg::upsert_sql("docs", outbox::pg::DocumentType::Jsonb);
    let old = serde_json::json!({"id": "a", "body": "v2", "n": 1});
    let tombstone_replay = Option::<serde_json::Value>::None;
    client
        .execute(&sql, &[&vec!["a"], &vec![2i64], &vec![false], &vec![Some(old)]])
        .await
        .expect("replay an old version");
    client
        .execute(&sql, &[&vec!["gone"], &vec![2i64], &vec![true], &vec![tombstone_replay]])
        .await
        .expect("replay the old tombstone");
    assert_eq!(db_rows(db, "docs").await, before, "older versions never overwrite newer ones");
}

#[tokio::test(flavor = "multi_thread")]
async fn tickets_resolve_only_after_the_change_set_is_in_the_database() {
    let db = fresh_db("tickets").await;
    create_tables(&db, &["docs", "tags"]).await;
    let engine = start(&db, Store::builder().kind::<Doc>().kind::<Tag>(), config(1000, 2)).await;
    let store = engine.store().clone();
    let mut waiters = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        let config = db.config.clone();
        waiters.push(tokio::spawn(async move {
            let ((doc, tag), ticket) = store
                .apply_durable(|set| -> Result<_, StoreError> {
                    let doc = set.upsert(Doc { id: format!("d{i}"), body: "durable".into(), n: i })?;
                    let tag = set.upsert(Tag { id: format!("t{i}"), label: "durable".into() })?;
                    Ok((doc.version, tag.version))
                })
                .expect("apply");
            ticket.wait().await.expect("committed");
            // The moment the ticket resolves, both rows are readable.
            let client = outbox::pg::connect(&config).await.expect("connect");
            let d: i64 =
                client.query_one("SELECT version FROM docs WHERE id = $1", &[&format!("d{i}")]).await.unwrap().get(0);
            let t: i64 =
                client.query_one("SELECT version FROM tags WHERE id = $1", &[&format!("t{i}")]).await.unwrap().get(0);
            assert!(d as u64 >= doc && t as u64 >= tag, "ticket resolved before its commit");
        }));
    }
    for waiter in waiters {
        waiter.await.expect("waiter");
    }
    let statements = write_count(&db, "docs", "statement").await;
    assert!(statements < 200, "waiters share batches (group commit): {statements} batches for 200 tickets");

    // A change set that changes nothing is durable at once.
    let ((), ticket) = store.apply_durable(|_| Ok::<_, StoreError>(())).unwrap();
    ticket.wait().await.expect("nothing to wait for");
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_store_refuses_changes() {
    let (store, _receiver) = Store::builder().kind::<Doc>().build();
    store.apply(|set| set.insert(Doc { id: "a".into(), body: String::new(), n: 0 })).unwrap();
    store.close();
    let refused = store.apply(|set| set.update::<Doc>("a", |d| d.n = 1));
    assert!(matches!(refused, Err(ApplyError::Refused(Refusal::Closed))));
    assert_eq!(store.get::<Doc>("a").unwrap().n, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_right_after_writes_drains_every_acknowledged_change() {
    use nix::sys::signal::Signal;
    let db = fresh_db("drain").await;
    // A long linger keeps changes pending when the signal arrives.
    let mut server = common::ServerProcess::start(
        &[],
        &[
            ("DATABASE_URL", db.url()),
            ("OUTBOX_DATA_DIR", common::scratch_dir("drain").display().to_string()),
            ("OUTBOX_LINGER_MS", "3000".into()),
        ],
    );
    server.wait_ready(Duration::from_secs(30)).await;
    let http = common::http();
    let mut acknowledged = Vec::new();
    for i in 0..300 {
        let response = http
            .post(server.url("/api/items"))
            .json(&serde_json::json!({"identifiers": [{"key": "n", "value": i.to_string()}]}))
            .send()
            .await
            .expect("create");
        assert_eq!(response.status(), 201);
        let item: serde_json::Value = response.json().await.unwrap();
        acknowledged.push((item["dfid"].as_str().unwrap().to_owned(), item["version"].as_i64().unwrap()));
    }
    server.signal(Signal::SIGTERM);
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "clean exit after the drain: {status}\n{}", server.log());
    assert!(server.log().contains("outbox drained"), "{}", server.log());

    let client = db.connect().await;
    for (dfid, version) in acknowledged {
        let row = client.query_opt("SELECT version FROM items WHERE id = $1", &[&dfid]).await.unwrap();
        let stored: i64 = row.unwrap_or_else(|| panic!("acknowledged item {dfid} is missing")).get(0);
        assert!(stored >= version);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payload_jsonb_refuses_is_kept_as_text_and_other_dead_letters_keep_theirs() {
    let db = fresh_db("nul").await;
    create_tables(&db, &["docs"]).await;
    db.connect()
        .await
        .batch_execute("ALTER TABLE docs ADD CONSTRAINT no_poison CHECK (data->>'body' <> 'poison')")
        .await
        .unwrap();
    let engine = start(&db, Store::builder().kind::<Doc>(), config(1000, 1)).await;
    let store = engine.store().clone();
    let mut tickets = Vec::new();
    for i in 0..50u64 {
        // jsonb refuses the NUL character (\u0000): the row, and its dead
        // letter's payload as jsonb, can never be stored. Another row of the
        // same batch is refused by a check.
        let body = match i {
            17 => "nul \0 inside".to_owned(),
            33 => "poison".to_owned(),
            _ => "fine".to_owned(),
        };
        let ((), ticket) =
            store.apply_durable(|set| set.insert(Doc { id: format!("d{i}"), body, n: i }).map(|_| ())).unwrap();
        tickets.push(ticket);
    }
    for (i, ticket) in tickets.into_iter().enumerate() {
        let outcome = tokio::time::timeout(Duration::from_secs(30), ticket.wait()).await.expect("ticket resolves");
        if i == 17 || i == 33 {
            let error = outcome.expect_err("the refused entity is quarantined");
            let name = format!("d{i}");
            assert!(matches!(error, outbox::outbox::TicketError::Quarantined { ref id, .. } if *id == name), "{error}");
        } else {
            outcome.expect("the others commit");
        }
    }
    let rows = db_rows(&db, "docs").await;
    assert_eq!(rows.len(), 48, "every other row committed");
    assert!(!rows.contains_key("d17"));
    assert_eq!(store.get::<Doc>("d17").expect("still live in memory").body, "nul \0 inside");

    let pool = outbox::pg::pool(db.config.clone(), 2);
    let letters = outbox::pg::dead_letters::list_unresolved(&pool, 10).await.expect("list");
    assert_eq!(letters.len(), 2, "{letters:?}");
    let nul = letters.iter().find(|l| l.entity_id == "d17").unwrap();
    assert_eq!((nul.kind.as_str(), nul.version), ("doc", 1));
    assert_eq!(nul.payload.as_ref().unwrap()["body"], "nul \0 inside", "the payload jsonb refuses is kept as text");
    let poison = letters.iter().find(|l| l.entity_id == "d33").unwrap();
    assert_eq!(poison.payload.as_ref().unwrap()["body"], "poison", "the other dead letter keeps its payload");
    let stored: (bool, bool) = db
        .connect()
        .await
        .query_one("SELECT payload IS NULL, payload_text IS NULL FROM outbox_dead_letters WHERE entity_id = 'd33'", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(stored, (false, true), "stored as jsonb");

    // After a restart, memory holds the quarantined state again.
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
    let engine = start(&db, Store::builder().kind::<Doc>(), config(1000, 1)).await;
    let store = engine.store().clone();
    let restored = store.get::<Doc>("d17").expect("restored from the dead letter");
    assert_eq!((restored.body.as_str(), restored.version), ("nul \0 inside", 1));
    assert_eq!(store.quarantined(), 2);

    // A corrected version commits and resolves the dead letter.
    let ((), ticket) =
        store.apply_durable(|set| set.update::<Doc>("d17", |d| d.body = "clean".into()).map(|_| ())).unwrap();
    tokio::time::timeout(Duration::from_secs(30), ticket.wait()).await.expect("resolves").expect("commits");
    assert_eq!(outbox::pg::dead_letters::count_unresolved(&pool).await.unwrap(), 1, "d33's stays");
    assert_eq!(db_rows(&db, "docs").await.len(), 49);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Transfer {
    id: String,
    from: String,
    to: String,
    amount: i64,
}

impl Entity for Transfer {
    const KIND: &'static str = "transfer";
    const TABLE: &'static str = "transfers";
    fn id(&self) -> &str {
        &self.id
    }
}

/// A transfer: debit, credit and the transfer record, one change set.
fn transfer(store: &Store, id: &str, amount: i64) -> outbox::outbox::Ticket {
    let ((), ticket) = store
        .apply_durable(|set| -> Result<(), StoreError> {
            set.update::<Account>("alice", |a| a.balance -= amount)?;
            set.update::<Account>("bob", |b| b.balance += amount)?;
            set.insert(Transfer { id: id.into(), from: "alice".into(), to: "bob".into(), amount })?;
            Ok(())
        })
        .expect("applies");
    ticket
}

async fn balances(db: &TestDb) -> (i64, i64, Vec<String>) {
    let accounts = db_rows(db, "accounts").await;
    let balance = |id: &str| accounts[id].2.as_ref().unwrap()["balance"].as_i64().unwrap();
    let transfers = db_rows(db, "transfers").await.into_keys().collect();
    (balance("alice"), balance("bob"), transfers)
}

/// A database with accounts and transfers (a CHECK constraint refuses
/// transfers over 1000), an engine, and alice's (5000) and bob's (0)
/// accounts written; then transfer t1 of 2000, refused: the database holds
/// none of its set. Returns a client of the database too.
async fn transfers_engine(name: &str) -> (TestDb, Engine, tokio_postgres::Client) {
    let db = fresh_db(name).await;
    create_tables(&db, &["accounts", "transfers"]).await;
    let client = db.connect().await;
    client
        .batch_execute("ALTER TABLE transfers ADD CONSTRAINT at_most_1000 CHECK ((data->>'amount')::bigint <= 1000)")
        .await
        .unwrap();
    let engine = start(&db, Store::builder().kind::<Account>().kind::<Transfer>(), config(1000, 2)).await;
    let store = engine.store();
    let ((), opened) = store
        .apply_durable(|set| -> Result<(), StoreError> {
            set.insert(Account { id: "alice".into(), balance: 5000 })?;
            set.insert(Account { id: "bob".into(), balance: 0 })?;
            Ok(())
        })
        .unwrap();
    opened.wait().await.unwrap();

    // The transfer row is refused: the whole change set is quarantined and
    // the ticket names the transfer, not an account.
    let error = transfer(store, "t1", 2000).wait().await.expect_err("refused");
    assert!(
        matches!(&error, outbox::outbox::TicketError::Quarantined { kind, id, .. } if kind == "transfer" && id == "t1"),
        "{error}"
    );
    assert_eq!(balances(&db).await, (5000, 0, vec![]), "the database holds none of the set");
    (db, engine, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_change_set_stays_whole_until_an_operator_resolves_it() {
    let (db, engine, client) = transfers_engine("transfers").await;
    let store = engine.store().clone();
    let pool = outbox::pg::pool(db.config.clone(), 2);
    let letters = outbox::pg::dead_letters::list_unresolved(&pool, 10).await.unwrap();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(letters.iter().all(|l| l.quarantine_id == letters[0].quarantine_id), "one set");
    let causes: Vec<&str> = letters.iter().filter(|l| l.cause).map(|l| l.entity_id.as_str()).collect();
    assert_eq!(causes, ["t1"]);

    // A later transfer touches both accounts: it is written with the whole
    // quarantined set or not at all; here not (t1 is still refused).
    let error = transfer(&store, "t2", 100).wait().await.expect_err("written with the set, refused with it");
    assert!(matches!(&error, outbox::outbox::TicketError::Quarantined { id, .. } if id == "t1"), "{error}");
    assert_eq!(balances(&db).await, (5000, 0, vec![]), "balances never show a transfer without its record");
    assert_eq!(store.quarantined(), 4, "the set grew by t2");

    // After the cause is fixed, a replay writes the whole set.
    client.batch_execute("ALTER TABLE transfers DROP CONSTRAINT at_most_1000").await.unwrap();
    let id = outbox::pg::dead_letters::list_unresolved(&pool, 10).await.unwrap()[0].id;
    let resolved = outbox::engine::operator::replay(&store, &pool, id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(resolved.len(), 4);
    assert!(resolved.iter().all(|l| l.resolution.as_deref() == Some("replayed")), "{resolved:?}");
    assert_eq!(balances(&db).await, (2900, 2100, vec!["t1".to_owned(), "t2".to_owned()]));
    assert_eq!(store.quarantined(), 0);

    // Discard reverts memory to the database, whole.
    client
        .batch_execute(
            "ALTER TABLE transfers ADD CONSTRAINT at_most_1000 CHECK ((data->>'amount')::bigint <= 1000) NOT VALID",
        )
        .await
        .unwrap();
    transfer(&store, "t3", 2500).wait().await.expect_err("refused");
    assert_eq!(store.get::<Account>("alice").unwrap().balance, 400, "memory holds the quarantined transfer");
    let id = outbox::pg::dead_letters::list_unresolved(&pool, 10).await.unwrap()[0].id;
    let resolved = outbox::engine::operator::discard(&store, &pool, id, Duration::from_secs(20)).await.unwrap();
    assert!(resolved.iter().all(|l| l.resolution.as_deref() == Some("discarded")), "{resolved:?}");
    assert_eq!(store.get::<Account>("alice").unwrap().balance, 2900, "memory reverted");
    assert!(store.get::<Transfer>("t3").is_none());
    assert_eq!(memory_rows::<Account>(&store), db_rows(&db, "accounts").await, "memory equals the database");
    assert_eq!(memory_rows::<Transfer>(&store), db_rows(&db, "transfers").await);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_leaves_a_quarantined_set_alone_while_a_later_change_writes_it_again() {
    use outbox::engine::operator;
    use outbox::pg::dead_letters::{self, DeadLetterError};

    let (db, engine, _client) = transfers_engine("set_at_rest").await;
    let store = engine.store().clone();
    let pool = outbox::pg::pool(db.config.clone(), 2);
    let letters = dead_letters::list_unresolved(&pool, 10).await.unwrap();
    assert_eq!(letters.len(), 3, "alice, bob and t1: {letters:?}");
    let id = letters[0].id;

    // The worker's next write waits: a transaction locks both tables
    // against writes (reads go on).
    let mut locker = db.connect().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE accounts, transfers IN EXCLUSIVE MODE").await.unwrap();

    // t2 touches both accounts: the set is written again with it, so t2
    // belongs to the set now, though the dead letters do not list it yet.
    let t2 = transfer(&store, "t2", 100);
    let memory = || (store.get::<Account>("alice").unwrap().balance, store.get::<Account>("bob").unwrap().balance);
    assert_eq!(memory(), (2900, 2100));

    // Resolving the set as its letters list it would revert the accounts
    // and leave t2 in memory without its effect: both actions are turned
    // away, changing nothing.
    let wait = Duration::from_secs(2);
    for (action, answer) in [
        ("discard", operator::discard(&store, &pool, id, wait).await),
        ("replay", operator::replay(&store, &pool, id, wait).await),
    ] {
        let error = answer.expect_err(action);
        assert!(matches!(error, DeadLetterError::BeingWritten(i) if i == id), "{action}: {error}");
    }
    assert_eq!(memory(), (2900, 2100), "memory is unchanged");
    assert!(store.get::<Transfer>("t1").is_some() && store.get::<Transfer>("t2").is_some());

    // The write goes on: refused again (t1), quarantined with t2.
    lock.rollback().await.unwrap();
    let error = t2.wait().await.expect_err("written with the set, refused with it");
    assert!(matches!(&error, outbox::outbox::TicketError::Quarantined { id, .. } if id == "t1"), "{error}");
    assert_eq!(store.quarantined(), 4);
    assert_eq!(balances(&db).await, (5000, 0, vec![]), "the database holds none of the set");
    assert_eq!(dead_letters::set_of(&pool, id).await.unwrap().len(), 4, "the same letter now names the grown set");

    // Now the set is at rest: discarding it reverts every member, t2 too.
    let resolved = operator::discard(&store, &pool, id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(resolved.len(), 4);
    assert!(resolved.iter().all(|l| l.resolution.as_deref() == Some("discarded")), "{resolved:?}");
    assert_eq!(memory(), (5000, 0));
    assert!(store.get::<Transfer>("t1").is_none() && store.get::<Transfer>("t2").is_none());
    assert_eq!(memory_rows::<Account>(&store), db_rows(&db, "accounts").await, "memory equals the database");
    assert_eq!(memory_rows::<Transfer>(&store), db_rows(&db, "transfers").await);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

/// `docs` with its documents as `json` rather than `jsonb`: the tests of
/// the write paths run on both types.
const JSON_DOCS: &str = "ALTER TABLE docs ALTER COLUMN data TYPE json USING data::json";

#[tokio::test(flavor = "multi_thread")]
async fn a_version_written_elsewhere_is_a_conflict_never_a_silent_success() {
    for (name, ddl) in [("conflict", None), ("conflict-json", Some(JSON_DOCS))] {
        a_version_written_elsewhere_is_a_conflict(name, ddl).await;
    }
}

async fn a_version_written_elsewhere_is_a_conflict(name: &str, ddl: Option<&str>) {
    let (db, engine) = docs_engine(name, ddl).await;
    let store = engine.store().clone();
    let ((), ticket) =
        store.apply_durable(|set| set.insert(Doc { id: "d".into(), body: "ours".into(), n: 1 }).map(|_| ())).unwrap();
    ticket.wait().await.unwrap();
    // Someone writes the row behind the store's back, at a newer version.
    let client = db.connect().await;
    client
        .batch_execute(
            "UPDATE docs SET version = 5, data = jsonb_set(data::jsonb, '{body}', '\"theirs\"') WHERE id = 'd'",
        )
        .await
        .unwrap();
    let ((), ticket) = store.apply_durable(|set| set.update::<Doc>("d", |d| d.n = 2).map(|_| ())).unwrap();
    let error = ticket.wait().await.expect_err("a conflict fails the durable change");
    assert!(
        matches!(error, outbox::outbox::TicketError::Conflict { version: 2, database_version: Some(5), .. }),
        "{error}"
    );
    let rows = db_rows(&db, "docs").await;
    assert_eq!((rows["d"].0, rows["d"].2.as_ref().unwrap()["body"].as_str()), (5, Some("theirs")), "not overwritten");
    let pool = outbox::pg::pool(db.config.clone(), 2);
    let letters = outbox::pg::dead_letters::list_unresolved(&pool, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.reason, letter.version, letter.database_version),
        (outbox::pg::dead_letters::Reason::Conflict, 2, Some(5))
    );
    // The same version with the same content is this process's own write
    // (a retry after a lost answer), not a conflict: replaying the row as it
    // is in the table changes nothing and fails nothing.
    // An operator decides: replay makes memory win, above both versions.
    let resolved = outbox::engine::operator::replay(&store, &pool, letter.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(resolved[0].resolution.as_deref(), Some("replayed"));
    let rows = db_rows(&db, "docs").await;
    assert_eq!(rows["d"].0, 6, "written above both versions");
    assert_eq!(memory_rows::<Doc>(&store), rows);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

/// Inserts `doc` into `docs` at `version` behind the store's back.
async fn insert_behind(db: &TestDb, doc: &Doc, version: i64) {
    let data = serde_json::to_value(doc).unwrap();
    db.connect()
        .await
        .execute("INSERT INTO docs (id, version, data) VALUES ($1, $2, $3)", &[&doc.id, &version, &data])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn new_rows_are_copied_and_a_retry_after_an_ambiguous_commit_falls_back_to_the_upsert() {
    for (name, ddl) in [("copy-retry", None), ("copy-retry-json", Some(JSON_DOCS))] {
        new_rows_are_copied_and_a_retry_falls_back(name, ddl).await;
    }
}

async fn new_rows_are_copied_and_a_retry_falls_back(name: &str, ddl: Option<&str>) {
    let (db, engine) = docs_engine(name, ddl).await;
    let store = engine.store().clone();
    let doc = |id: String| Doc { body: format!("body of {id}"), id, n: 1 };
    let create = |ids: Vec<String>| {
        store
            .apply_durable(|set| -> Result<(), StoreError> {
                for id in ids {
                    set.insert(doc(id))?;
                }
                Ok(())
            })
            .unwrap()
            .1
    };
    // Rows the table never held go in with COPY.
    create((0..100).map(|i| format!("new{i}")).collect()).wait().await.unwrap();
    assert!(write_count(&db, "docs", "copy").await >= 1, "new rows are copied");
    let copies = write_count(&db, "docs", "copy").await;

    // The state after a commit whose answer was lost: the table holds the
    // rows as this batch writes them, the store thinks it holds none.
    let ids: Vec<String> = (0..50).map(|i| format!("again{i}")).collect();
    for id in &ids {
        insert_behind(&db, &doc(id.clone()), 1).await;
    }
    let mut batch = ids.clone();
    batch.extend((0..50).map(|i| format!("fresh{i}")));
    create(batch).wait().await.expect("the retry recognises its own rows and writes the rest");
    assert_eq!(write_count(&db, "docs", "copy").await, copies, "the COPY met the rows and was rolled back");
    let pool = outbox::pg::pool(db.config.clone(), 2);
    assert!(outbox::pg::dead_letters::list_unresolved(&pool, 10).await.unwrap().is_empty());
    assert_eq!(memory_rows::<Doc>(&store), db_rows(&db, "docs").await);

    // A row of the same version written by someone else is a conflict, on
    // this path as on any other; the rest of the batch is written.
    let theirs = Doc { id: "taken".into(), body: "theirs".into(), n: 9 };
    insert_behind(&db, &theirs, 1).await;
    let error = create(vec!["taken".into()]).wait().await.expect_err("a conflict");
    assert!(
        matches!(error, outbox::outbox::TicketError::Conflict { version: 1, database_version: Some(1), .. }),
        "{error}"
    );
    create(vec!["after".into()]).wait().await.unwrap();
    let rows = db_rows(&db, "docs").await;
    assert_eq!(rows["taken"].2.as_ref().unwrap()["body"], "theirs", "not overwritten");
    assert_eq!(rows.len(), 100 + 100 + 2);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_row_in_a_copied_batch_is_quarantined_alone() {
    let (db, engine) =
        docs_engine("copy-refused", Some("ALTER TABLE docs ADD CHECK (data->>'body' <> 'refused')")).await;
    let store = engine.store().clone();
    let tickets: Vec<_> = (0..300)
        .map(|i| {
            let body = if i == 150 { "refused".to_owned() } else { format!("body {i}") };
            let doc = Doc { id: format!("d{i}"), body, n: 0 };
            store.apply_durable(|set| set.insert(doc).map(|_| ())).unwrap().1
        })
        .collect();
    for (i, ticket) in tickets.into_iter().enumerate() {
        let result = tokio::time::timeout(Duration::from_secs(30), ticket.wait()).await.expect("resolves");
        if i == 150 {
            let error = result.expect_err("refused");
            assert!(
                matches!(&error, outbox::outbox::TicketError::Quarantined { sqlstate: Some(code), .. } if code == "23514"),
                "{error}"
            );
        } else {
            result.unwrap_or_else(|e| panic!("d{i}: {e}"));
        }
    }
    assert!(write_count(&db, "docs", "copy").await >= 1, "the rows were copied");
    let rows = db_rows(&db, "docs").await;
    assert_eq!(rows.len(), 299);
    assert!(!rows.contains_key("d150"));
    let pool = outbox::pg::pool(db.config.clone(), 2);
    let letters = outbox::pg::dead_letters::list_unresolved(&pool, 10).await.unwrap();
    assert_eq!(letters.iter().map(|l| l.entity_id.as_str()).collect::<Vec<_>>(), ["d150"]);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

/// Rows the table holds go in upsert statements of at most 500 rows, sent
/// together in the batch's transaction: a change set of 1200 updates is
/// written whole in three statements, and one refused in the last of them
/// is quarantined whole with the refusal's own error (not the error of an
/// aborted transaction that the statements after it get).
#[tokio::test(flavor = "multi_thread")]
async fn updates_sent_in_several_statements_are_written_or_refused_whole() {
    let (db, engine) = docs_engine("pieces", Some("ALTER TABLE docs ADD CHECK (data->>'body' <> 'refused')")).await;
    let store = engine.store().clone();
    let ids: Vec<String> = (0..1200).map(|i| format!("d{i:04}")).collect();
    let update_all = |body: &'static str, refused: Option<&str>| {
        store
            .apply_durable(|set| -> Result<(), StoreError> {
                for id in &ids {
                    let body = if refused == Some(id.as_str()) { "refused" } else { body };
                    set.update::<Doc>(id, |d| d.body = body.into())?;
                }
                Ok(())
            })
            .unwrap()
            .1
    };
    let ((), inserted) = store
        .apply_durable(|set| -> Result<(), StoreError> {
            for id in &ids {
                set.insert(Doc { id: id.clone(), body: "v1".into(), n: 0 })?;
            }
            Ok(())
        })
        .unwrap();
    inserted.wait().await.expect("copied");
    let statements = write_count(&db, "docs", "statement").await;

    update_all("v2", None).wait().await.expect("written");
    assert_eq!(db_rows(&db, "docs").await, memory_rows::<Doc>(&store));
    assert_eq!(write_count(&db, "docs", "statement").await - statements, 3, "500 + 500 + 200 rows");

    let error = update_all("v3", Some("d1150")).wait().await.expect_err("refused");
    assert!(
        matches!(&error, outbox::outbox::TicketError::Quarantined { id, sqlstate: Some(code), .. }
            if id == "d1150" && code == "23514"),
        "{error}"
    );
    let rows = db_rows(&db, "docs").await;
    assert!(rows.values().all(|(version, _, data)| *version == 2 && data.as_ref().unwrap()["body"] == "v2"));
    let pool = outbox::pg::pool(db.config.clone(), 2);
    assert_eq!(outbox::pg::dead_letters::count_unresolved(&pool).await.unwrap(), 1200, "the set, whole");
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_that_give_up_leave_no_claims_behind() {
    // No worker: nothing is ever committed, as in a database outage.
    let (store, _receiver) = Store::builder().kind::<Doc>().capacity(10).build();
    store.apply(|set| set.insert(Doc { id: "hot".into(), body: String::new(), n: 0 }).map(|_| ())).unwrap();
    for n in 0..10_000u64 {
        let ((), ticket) = store.apply_durable(|set| set.update::<Doc>("hot", |d| d.n = n).map(|_| ())).unwrap();
        drop(ticket); // the request timed out
    }
    assert!(store.waiting_claims() <= 1, "claims held: {}", store.waiting_claims());
    let ((), waiting) = store.apply_durable(|set| set.update::<Doc>("hot", |d| d.n += 1).map(|_| ())).unwrap();
    assert_eq!(store.waiting_claims(), 1, "a caller still waiting keeps its claim");
    drop(waiting);
}

/// An engine of `builder` started (migrations, hydration; no lease) on a
/// task, so that a test can watch the database while it hydrates.
fn start_in_background(db: &TestDb, builder: StoreBuilder) -> tokio::task::JoinHandle<Engine> {
    let db_config = db.config.clone();
    tokio::spawn(async move {
        let pool = outbox::pg::pool(db_config, 4);
        outbox::pg::migrate(&pool).await.unwrap();
        let (store, receiver) = builder.build();
        Engine::builder(store, receiver, pool).worker(config(1000, 1)).lease(false).start().await.unwrap()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn hydration_reads_every_kind_from_one_snapshot() {
    let db = fresh_db("snapshot").await;
    create_tables(&db, &["tags"]).await;
    let client = db.connect().await;
    // `docs` is a view whose one row takes 3 s to read, so that a change
    // set can commit while hydration is between the two kinds.
    client
        .batch_execute(
            "CREATE TABLE docs_rows (id text PRIMARY KEY, version bigint NOT NULL, deleted boolean NOT NULL DEFAULT false,
               data jsonb, updated_at timestamptz NOT NULL DEFAULT now());
             CREATE FUNCTION slow() RETURNS boolean LANGUAGE sql VOLATILE AS $$ SELECT true FROM pg_sleep(3) $$;
             CREATE VIEW docs AS SELECT id, version, deleted, data, updated_at FROM docs_rows WHERE slow();
             INSERT INTO docs_rows VALUES ('d', 1, false, '{\"id\": \"d\", \"body\": \"before\", \"n\": 1}');",
        )
        .await
        .unwrap();
    let hydrating = start_in_background(&db, Store::builder().kind::<Doc>().kind::<Tag>());
    let reading = common::poll_until(Duration::from_secs(20), || async {
        client
            .query_one(
                // Only this test's database: other tests read tables named
                // `docs` in theirs, in the same cluster, at the same time.
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid()
                   AND datname = current_database() AND query LIKE '%FROM \"docs\"%'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    assert!(reading, "hydration reads the slow kind");
    // A change set across both kinds commits meanwhile.
    client
        .batch_execute(
            "BEGIN;
             UPDATE docs_rows SET version = 2, data = '{\"id\": \"d\", \"body\": \"after\", \"n\": 2}';
             INSERT INTO tags VALUES ('t', 1, false, '{\"id\": \"t\", \"label\": \"after\"}');
             COMMIT;",
        )
        .await
        .unwrap();
    let engine = hydrating.await.unwrap();
    let store = engine.store();
    let doc = store.get::<Doc>("d").unwrap();
    assert_eq!((doc.version, doc.body.as_str()), (1, "before"));
    assert!(store.get::<Tag>("t").is_none(), "the later change set is not half loaded");
}

#[tokio::test(flavor = "multi_thread")]
async fn hydration_reads_a_large_table_with_parallel_workers_and_leaves_the_setting_local() {
    let db = fresh_db("parallel").await;
    let client = db.connect().await;
    let default_cost: String = client.query_one("SHOW parallel_tuple_cost", &[]).await.unwrap().get(0);
    // `docs` stands in for a table large enough for parallel workers: the
    // database lets a table of any size have two and costs starting them at
    // nothing, and each row takes a while to read so that they can be seen.
    // What hydration itself must change is the cost of passing rows from
    // the workers, which on its own keeps this plan on one process.
    client
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" SET min_parallel_table_scan_size = 0;
             ALTER DATABASE \"{name}\" SET parallel_setup_cost = 0;
             ALTER DATABASE \"{name}\" SET max_parallel_workers_per_gather = 2;
             CREATE TABLE docs_rows (id text PRIMARY KEY, version bigint NOT NULL, deleted boolean NOT NULL DEFAULT false,
               data jsonb, updated_at timestamptz NOT NULL DEFAULT now());
             CREATE FUNCTION slow_row() RETURNS boolean LANGUAGE sql VOLATILE PARALLEL SAFE COST 1
               AS $$ SELECT true FROM pg_sleep(0.0005) $$;
             CREATE VIEW docs AS SELECT id, version, deleted, data, updated_at FROM docs_rows WHERE slow_row();
             INSERT INTO docs_rows SELECT 'd' || n, n, n % 10 = 0,
               CASE WHEN n % 10 <> 0 THEN jsonb_build_object('id', 'd' || n, 'body', 'row ' || n, 'n', n) END
               FROM generate_series(1, 4000) AS n;
             ANALYZE docs_rows;",
            name = db.name
        ))
        .await
        .unwrap();
    let hydrating = start_in_background(&db, Store::builder().kind::<Doc>());
    // The statement a parallel worker of this read runs (building the
    // library's indexes, its migrations, may start workers too).
    let mut read_by_workers = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while read_by_workers.is_none() && !hydrating.is_finished() && std::time::Instant::now() < deadline {
        read_by_workers = client
            .query_opt(
                "SELECT query FROM pg_stat_activity WHERE backend_type = 'parallel worker'
                   AND datname = current_database() AND query LIKE '%FROM \"docs\"%' LIMIT 1",
                &[],
            )
            .await
            .unwrap()
            .map(|row| row.get::<_, String>(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let engine = hydrating.await.unwrap();
    let statement = read_by_workers.expect("hydration reads the table with parallel workers");
    // The workers make the text: the cast is in their scan's output (on a
    // connection of its own, which has the database's settings above).
    let mut explaining = db.connect().await;
    let transaction = explaining.transaction().await.unwrap();
    transaction.batch_execute("SET LOCAL parallel_tuple_cost = 0").await.unwrap();
    let plan: Vec<String> = transaction
        .query(&format!("EXPLAIN (VERBOSE) {statement}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    transaction.commit().await.unwrap();
    let scan = plan.iter().position(|line| line.contains("Parallel Seq Scan")).expect("a parallel scan");
    let output = plan[scan..].iter().find(|line| line.trim_start().starts_with("Output:")).expect("its output");
    assert!(output.contains("(docs_rows.data)::text"), "the workers cast the document to text: {plan:#?}");
    let store = engine.store();
    for n in 1..=4000u64 {
        let doc = store.get::<Doc>(&format!("d{n}"));
        if n % 10 == 0 {
            assert!(doc.is_none(), "d{n} is a tombstone");
        } else {
            let doc = doc.unwrap_or_else(|| panic!("d{n} hydrated"));
            assert_eq!((doc.version, doc.n, doc.body.as_str()), (n, n, format!("row {n}").as_str()));
        }
    }
    // The cost is the hydration transaction's alone: no connection the
    // pool hands out afterwards keeps it.
    let pool = engine.pool().clone();
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
    let size = pool.status().size;
    let mut connections = Vec::new();
    for _ in 0..size {
        connections.push(pool.get().await.unwrap());
    }
    for connection in &connections {
        let cost: String = connection.query_one("SHOW parallel_tuple_cost", &[]).await.unwrap().get(0);
        assert_eq!(cost, default_cost, "the database's cost on a pooled connection");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_too_large_for_its_index_is_quarantined_not_retried_forever() {
    let (_db, engine) = docs_engine("index-limit", Some("CREATE INDEX docs_body ON docs ((data->>'body'))")).await;
    let store = engine.store().clone();
    // Incompressible text larger than a B-tree index row may be (54000).
    let mut rng = Rng(7);
    let big: String = (0..12_000).map(|_| char::from(b'a' + (rng.next() % 26) as u8)).collect();
    let ((), refused) =
        store.apply_durable(|set| set.insert(Doc { id: "big".into(), body: big, n: 0 }).map(|_| ())).unwrap();
    let ((), fine) =
        store.apply_durable(|set| set.insert(Doc { id: "small".into(), body: "x".into(), n: 0 }).map(|_| ())).unwrap();
    let error =
        tokio::time::timeout(Duration::from_secs(30), refused.wait()).await.expect("resolves").expect_err("refused");
    assert!(
        matches!(&error, outbox::outbox::TicketError::Quarantined { sqlstate: Some(code), .. } if code.starts_with("54")),
        "{error}"
    );
    tokio::time::timeout(Duration::from_secs(30), fine.wait()).await.expect("the writer is not wedged").unwrap();
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_recorded_only_under_the_lease() {
    let db = fresh_db("fenced-letters").await;
    let pool = outbox::pg::pool(db.config.clone(), 2);
    outbox::pg::migrate(&pool).await.unwrap();
    let outbox::pg::lease::Attempt::Taken(lease) =
        outbox::pg::lease::Lease::try_take(&pool, "test", Duration::from_secs(10)).await.unwrap()
    else {
        panic!("the lease is free");
    };
    let set = outbox::pg::dead_letters::NewSet {
        reason: outbox::pg::dead_letters::Reason::Refused,
        letters: vec![outbox::pg::dead_letters::NewDeadLetter {
            kind: "doc",
            entity_id: "d".into(),
            version: 1,
            payload: Some(b"{}".to_vec()),
            deleted: false,
            sqlstate: Some("23514".into()),
            message: "refused".into(),
            attempts: 1,
            cause: true,
            base_version: 0,
            database_version: None,
        }],
    };
    let fenced = outbox::pg::dead_letters::record(&pool, Some(lease.epoch() + 1), std::slice::from_ref(&set)).await;
    assert!(matches!(fenced, Err(outbox::pg::dead_letters::RecordError::Fenced { .. })), "{fenced:?}");
    assert_eq!(outbox::pg::dead_letters::count_unresolved(&pool).await.unwrap(), 0, "a fenced process records nothing");
    outbox::pg::dead_letters::record(&pool, Some(lease.epoch()), &[set]).await.unwrap();
    assert_eq!(outbox::pg::dead_letters::count_unresolved(&pool).await.unwrap(), 1);
    lease.release().await;
}

/// A kind whose id is an `Arc<str>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, outbox::Entity)]
#[entity(kind = "label", table = "labels")]
struct Label {
    #[entity(id)]
    id: std::sync::Arc<str>,
    label: String,
}

#[test]
fn an_id_held_in_an_arc_is_shared_with_the_stores_key() {
    let label = Label { id: "t1".into(), label: "x".into() };
    assert!(std::sync::Arc::ptr_eq(&outbox::entity::Entity::shared_id(&label), &label.id), "the derive shares the id");
    let (store, _receiver) = Store::builder().kind::<Label>().capacity(10).build();
    store.apply(|set| set.insert(label)).unwrap();
    let stored = store.read(|view| view.get::<Label>("t1")).unwrap();
    // The entity's id is held by the entity and by the store's key (and by
    // the pending record of the unwritten change): one allocation.
    assert!(std::sync::Arc::strong_count(&stored.value.id) >= 2, "the store's key is the entity's id");
    let reading = reading("r1", 1);
    assert!(!std::ptr::eq(outbox::entity::Entity::shared_id(&reading).as_ptr(), reading.id.as_ptr()));
}

/// A kind stored in typed columns of its own table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, outbox::Entity)]
#[entity(kind = "reading", table = "readings", columns)]
struct Reading {
    #[entity(id)]
    id: String,
    label: String,
    total: i64,
    count: i32,
    active: bool,
    taken_at: chrono::DateTime<chrono::Utc>,
    note: Option<String>,
    extra: serde_json::Value,
    #[entity(sql = "numeric")]
    amount: f64,
}

fn reading(id: &str, n: i64) -> Reading {
    Reading {
        id: id.into(),
        label: format!("label {n} with 'quotes', a\ttab, a\nnewline, a\r, a backslash \\ and \\N, and ünïcode"),
        total: n * 1_000_000_000_000,
        count: n as i32,
        active: n % 2 == 0,
        taken_at: chrono::DateTime::from_timestamp(1_700_000_000 + n, 0).unwrap(),
        note: (n % 3 != 0).then(|| format!("note {n}")),
        extra: serde_json::json!({"n": n, "tags": ["a", "b\t"], "nested": {"ok": true}, "path": "C:\\dir\nx"}),
        amount: n as f64 + 0.25,
    }
}

/// A kind in typed columns with a `json` column, which has no equality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, outbox::Entity)]
#[entity(kind = "sample", table = "samples", columns)]
struct Sample {
    #[entity(id)]
    id: String,
    n: i64,
    #[entity(sql = "json")]
    doc: serde_json::Value,
}

/// The conflict check compares a typed `json` column as JSON: a version
/// written elsewhere is a conflict, as for any other column, not an error
/// of the check's own statement retried for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_typed_json_column_is_compared_as_json_in_the_conflict_check() {
    let db = fresh_db("typed-json").await;
    let pool = outbox::pg::pool(db.config.clone(), 4);
    outbox::pg::migrate(&pool).await.unwrap();
    let (store, _) = Store::builder().kind::<Sample>().build();
    outbox::pg::ensure_tables(&pool, &store).await.unwrap();
    assert!(outbox::pg::create_table_sql::<Sample>().contains("\"doc\" json,"));
    let engine = start(&db, Store::builder().kind::<Sample>(), config(1000, 1)).await;
    let store = engine.store().clone();
    let sample = Sample { id: "s".into(), n: 1, doc: serde_json::json!({"b": [1, 2], "a": "x"}) };
    let ((), ticket) = store.apply_durable(|set| set.insert(sample.clone()).map(|_| ())).unwrap();
    ticket.wait().await.unwrap();
    db.connect().await.batch_execute("UPDATE samples SET version = 5, n = 9 WHERE id = 's'").await.unwrap();
    let ((), ticket) = store.apply_durable(|set| set.update::<Sample>("s", |s| s.n = 2).map(|_| ())).unwrap();
    let error = tokio::time::timeout(Duration::from_secs(20), ticket.wait())
        .await
        .expect("the check answers")
        .expect_err("a conflict");
    assert!(
        matches!(error, outbox::outbox::TicketError::Conflict { version: 2, database_version: Some(5), .. }),
        "{error}"
    );
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kind_in_typed_columns_round_trips() {
    let db = fresh_db("typed").await;
    let pool = outbox::pg::pool(db.config.clone(), 4);
    outbox::pg::migrate(&pool).await.unwrap();
    let builder = || Store::builder().kind::<Reading>();
    let (store, _) = builder().build();
    outbox::pg::ensure_tables(&pool, &store).await.unwrap();
    assert!(outbox::pg::create_table_sql::<Reading>().contains("\"total\" bigint"));
    let engine = start(&db, builder(), config(1000, 2)).await;
    let store = engine.store().clone();
    let ((), ticket) = store
        .apply_durable(|set| -> Result<(), StoreError> {
            for n in 0..50 {
                set.insert(reading(&format!("r{n}"), n))?;
            }
            Ok(())
        })
        .unwrap();
    ticket.wait().await.unwrap();
    store.apply(|set| set.update::<Reading>("r1", |r| r.note = None).map(|_| ())).unwrap();
    store.apply(|set| set.delete::<Reading>("r2").map(|_| ())).unwrap();
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());

    // The columns hold typed values, not a document.
    let client = db.connect().await;
    let row = client
        .query_one(
            "SELECT label, total, count, active, taken_at, note, extra->'nested'->>'ok', amount::text FROM readings WHERE id = 'r4'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), reading("r4", 4).label);
    assert_eq!(row.get::<_, i64>(1), 4_000_000_000_000);
    assert_eq!(row.get::<_, i32>(2), 4);
    assert!(row.get::<_, bool>(3));
    assert_eq!(row.get::<_, chrono::DateTime<chrono::Utc>>(4), reading("r4", 4).taken_at);
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("note 4"));
    assert_eq!(row.get::<_, String>(6), "true");
    assert_eq!(row.get::<_, String>(7), "4.25");
    let tombstone: (bool, Option<String>) = client
        .query_one("SELECT deleted, label FROM readings WHERE id = 'r2'", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(tombstone, (true, None), "a tombstone keeps no values");

    // Hydrated back from the columns, equal to what was written.
    let engine = start(&db, builder(), config(1000, 2)).await;
    let store = engine.store();
    for n in 0..50 {
        let id = format!("r{n}");
        let mut expected = reading(&id, n);
        if n == 1 {
            expected.note = None;
        }
        match store.get::<Reading>(&id) {
            Some(loaded) if n != 2 => assert_eq!(*loaded.value, expected),
            None if n == 2 => {}
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(store.read(|view| view.version::<Reading>("r1")), 2);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_or_column_stops_start_up_at_once_saying_what_to_create() {
    let db = fresh_db("missing-table").await;
    let pool = outbox::pg::pool(db.config.clone(), 4);
    outbox::pg::migrate(&pool).await.unwrap();
    let start = |builder: StoreBuilder| {
        let pool = pool.clone();
        async move {
            let (store, receiver) = builder.build();
            let started = std::time::Instant::now();
            let result = Engine::builder(store, receiver, pool).start().await;
            (result.map(|_| ()), started.elapsed())
        }
    };
    let (result, elapsed) = start(Store::builder().kind::<Reading>()).await;
    let error = result.expect_err("no table").to_string();
    assert!(elapsed < Duration::from_secs(1), "at once: {elapsed:?}");
    assert!(
        error.contains("readings") && error.contains("CREATE TABLE") && error.contains("\"amount\" numeric"),
        "{error}"
    );

    db.connect().await.batch_execute(&outbox::pg::create_table_sql::<Reading>()).await.unwrap();
    db.connect().await.batch_execute("ALTER TABLE readings DROP COLUMN note").await.unwrap();
    let (result, elapsed) = start(Store::builder().kind::<Reading>()).await;
    let error = result.expect_err("no column").to_string();
    assert!(elapsed < Duration::from_secs(1), "at once: {elapsed:?}");
    assert!(error.contains("no column note") && error.contains("ADD COLUMN \"note\" text"), "{error}");
}

/// A document table's `data` column is `json` or `jsonb` (the statements
/// follow what the table has); any other type stops start-up with the
/// statement that changes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_document_column_of_another_type_stops_start_up_saying_what_to_change() {
    assert!(outbox::pg::create_table_sql::<Doc>().contains("data       json,"), "new tables hold json");
    let db = fresh_db("document-type").await;
    let pool = outbox::pg::pool(db.config.clone(), 4);
    outbox::pg::migrate(&pool).await.unwrap();
    db.connect()
        .await
        .batch_execute(&outbox::pg::create_table_sql::<Doc>().replace("data       json,", "data       text,"))
        .await
        .unwrap();
    let (store, receiver) = Store::builder().kind::<Doc>().build();
    let error = Engine::builder(store, receiver, pool.clone()).start().await.map(|_| ()).expect_err("text").to_string();
    assert!(
        error.contains("docs")
            && error.contains("type text")
            && error.contains("ALTER COLUMN data TYPE json USING data::json"),
        "{error}"
    );
    let rows = db_rows_text(&db).await;
    assert!(rows.is_empty(), "nothing written: {rows:?}");

    // Changed as it says, the table takes the engine's writes and gives
    // them back at the next start.
    db.connect().await.batch_execute("ALTER TABLE docs ALTER COLUMN data TYPE json USING data::json").await.unwrap();
    let engine = start(&db, Store::builder().kind::<Doc>(), config(100, 1)).await;
    let doc = Doc { id: "a".into(), body: "caf\u{e9} \"quoted\"".into(), n: u64::MAX };
    let ((), ticket) = engine.store().apply_durable(|set| set.insert(doc.clone()).map(|_| ())).unwrap();
    ticket.wait().await.unwrap();
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
    let engine = start(&db, Store::builder().kind::<Doc>(), config(100, 1)).await;
    assert_eq!(engine.store().get::<Doc>("a").map(|d| (*d.value).clone()), Some(doc));
    assert_eq!(memory_rows::<Doc>(engine.store()), db_rows(&db, "docs").await);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

/// A document column whose type changes while the engine runs (a
/// migration from `jsonb` to `json`, or back) is followed: the first write
/// that fails for it is made again for the new type, and nothing is
/// quarantined.
#[tokio::test(flavor = "multi_thread")]
async fn a_document_column_that_changes_type_while_the_engine_runs_is_followed() {
    let (db, engine) = docs_engine("type-changes", None).await;
    let store = engine.store().clone();
    let write = |ids: std::ops::Range<u32>, n: u64| {
        let ((), ticket) = store
            .apply_durable(|set| -> Result<(), StoreError> {
                for i in ids {
                    let doc = Doc { id: format!("d{i}"), body: format!("body {i}"), n };
                    match set.get::<Doc>(&doc.id) {
                        Some(_) => set.update::<Doc>(&doc.id, |d| d.n = n).map(|_| ())?,
                        None => set.insert(doc).map(|_| ())?,
                    }
                }
                Ok(())
            })
            .unwrap();
        ticket
    };
    write(0..10, 1).wait().await.unwrap();
    let client = db.connect().await;
    for (ddl, n) in [
        ("ALTER TABLE docs ALTER COLUMN data TYPE json USING data::json", 2),
        ("ALTER TABLE docs ALTER COLUMN data TYPE jsonb USING data::jsonb", 3),
    ] {
        client.batch_execute(ddl).await.unwrap();
        let copies = write_count(&db, "docs", "copy").await;
        // New rows (a COPY) in one change set, then updates in another.
        write(10 * n as u32..10 * n as u32 + 10, n).wait().await.expect("new rows after the change");
        write(0..10, n).wait().await.expect("updates after the change");
        assert!(write_count(&db, "docs", "copy").await > copies, "the new rows were copied");
    }
    let pool = outbox::pg::pool(db.config.clone(), 2);
    assert!(outbox::pg::dead_letters::list_unresolved(&pool, 10).await.unwrap().is_empty(), "nothing quarantined");
    assert_eq!(memory_rows::<Doc>(&store), db_rows(&db, "docs").await);
    assert!(engine.shutdown(Duration::from_secs(30)).await.complete());
}

/// The `docs` table's rows with their data as text, whatever its type.
async fn db_rows_text(db: &TestDb) -> Vec<(String, Option<String>)> {
    let client = db.connect().await;
    let rows = client.query("SELECT id, data::text FROM docs", &[]).await.unwrap();
    rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()
}
