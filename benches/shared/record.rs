//! The stores and changes P1 measures, shared by its timing
//! (`benches/store.rs`) and its allocation count (`benches/allocations.rs`).

use std::time::Duration;

use chrono::Utc;

use outbox::api::model::{Identifier, Item, ItemStatus};
use outbox::store::{OutboxReceiver, Store, StoreError};
use outbox::worker::{Worker, WorkerConfig};

/// Entities the benchmarks rotate over.
pub const ENTITIES: usize = 10_000;

fn item(n: usize) -> Item {
    let now = Utc::now();
    Item {
        dfid: format!("DFID-{n:08}").into(),
        local_id: None,
        status: ItemStatus::Active,
        identifiers: vec![Identifier { key: "gtin".into(), value: format!("{n:013}").into() }],
        enriched_data: outbox::api::model::JsonObject::from_map(
            serde_json::json!({"name": "bolt", "size": "M8"}).as_object().unwrap(),
        ),
        merged_into: None,
        circuits: Vec::new(),
        created_at: now,
        updated_at: now,
    }
}

/// The ids of the `ENTITIES` entities of either store.
pub fn ids() -> Vec<String> {
    (0..ENTITIES).map(|n| format!("DFID-{n:08}")).collect()
}

/// A worker that discards the batches it takes from `store`'s outbox, so
/// that most changes take the full path (a new pending mark and a record
/// on the channel).
fn drained(runtime: &tokio::runtime::Runtime, store: &Store, receiver: OutboxReceiver) -> Worker {
    let pool = outbox::pg::pool(outbox::pg::parse_url("host=/nonexistent dbname=none").unwrap(), 1);
    let config = WorkerConfig { discard: true, linger: Duration::from_micros(200), ..WorkerConfig::default() };
    runtime.block_on(async { Worker::start(store.clone(), receiver, pool, config, None, Default::default()) })
}

/// A store of `ENTITIES` reference items with a worker that discards what
/// it takes.
pub fn store(runtime: &tokio::runtime::Runtime) -> (Store, Worker) {
    let (store, receiver) = outbox::api::store_builder().capacity(1_000_000).build();
    store
        .apply(|set| -> Result<(), StoreError> {
            for n in 0..ENTITIES {
                set.insert(item(n))?;
            }
            Ok(())
        })
        .expect("seed the store");
    let worker = drained(runtime, &store, receiver);
    (store, worker)
}

/// The reference items the measured changes rotate over: the first half
/// of the entities (a contending thread takes the other half).
pub const MEASURED: usize = ENTITIES / 2;

/// Changes reference item `id`, stamping it with `n`.
pub fn update_item(store: &Store, id: &str, n: usize) {
    store
        .apply(|set| {
            set.update::<Item>(id, |item| item.updated_at = chrono::DateTime::from_timestamp(n as i64, 0).unwrap())
        })
        .expect("update");
}

/// Changes reference item `n` of the measured half (of `ids`).
pub fn update_one(store: &Store, ids: &[String], n: usize) {
    update_item(store, &ids[n % MEASURED], n);
}

/// Changes reference items `n` and `n + 7` of the measured half (of `ids`)
/// in one change set.
pub fn change_set_two(store: &Store, ids: &[String], n: usize) {
    store
        .apply(|set| -> Result<(), StoreError> {
            let at = chrono::DateTime::from_timestamp(n as i64, 0).unwrap();
            set.update::<Item>(&ids[n % MEASURED], |item| item.updated_at = at)?;
            set.update::<Item>(&ids[(n + 7) % MEASURED], |item| item.updated_at = at)?;
            Ok(())
        })
        .expect("change set");
}

/// An entity whose clone is trivial: changing it costs the store's own
/// work and little else.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Counter {
    id: String,
    n: u64,
}

impl outbox::store::Entity for Counter {
    const KIND: &'static str = "counter";
    const TABLE: &'static str = "counters";
    fn id(&self) -> &str {
        &self.id
    }
}

/// A store of `ENTITIES` counters (ids from [`ids`]) with a worker that
/// discards what it takes.
pub fn small_store(runtime: &tokio::runtime::Runtime, ids: &[String]) -> (Store, Worker) {
    let (store, receiver) = Store::builder().kind::<Counter>().capacity(1_000_000).build();
    store
        .apply(|set| -> Result<(), StoreError> {
            for id in ids {
                set.insert(Counter { id: id.clone(), n: 0 })?;
            }
            Ok(())
        })
        .unwrap();
    let worker = drained(runtime, &store, receiver);
    (store, worker)
}

/// Changes counter `n` (of `ids`).
pub fn update_counter(store: &Store, ids: &[String], n: usize) {
    store.apply(|set| set.update::<Counter>(&ids[n % ENTITIES], |c| c.n += 1)).unwrap();
}

/// Changes counters `n` and `n + 7` (of `ids`) in one change set.
pub fn change_counters(store: &Store, ids: &[String], n: usize) {
    store
        .apply(|set| -> Result<(), StoreError> {
            set.update::<Counter>(&ids[n % ENTITIES], |c| c.n += 1)?;
            set.update::<Counter>(&ids[(n + 7) % ENTITIES], |c| c.n += 1)?;
            Ok(())
        })
        .unwrap();
}
