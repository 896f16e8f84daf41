//! P1: the cost of recording a change through the store (the
//! update, its version, and the outbox record), for one entity and for a
//! two-entity change set, alone and with a second thread changing other
//! entities at the same time.
//!
//! A worker that discards its batches drains the outbox meanwhile, so most
//! changes take the full path (a new pending mark and a record on the
//! channel) rather than the coalesced one; the `coalesced` case measures the
//! latter alone.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use criterion::{Criterion, criterion_group, criterion_main};
use outbox::api::model::{Identifier, Item, ItemStatus};
use outbox::store::{Store, StoreError};
use outbox::worker::{Worker, WorkerConfig};

/// Entities the benchmarks rotate over.
const ENTITIES: usize = 10_000;

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

fn ids() -> Vec<String> {
    (0..ENTITIES).map(|n| format!("DFID-{n:08}")).collect()
}

/// A store of `ENTITIES` items with a worker that discards what it takes.
fn store(runtime: &tokio::runtime::Runtime) -> (Store, Worker) {
    let (store, receiver) = outbox::api::store_builder().capacity(1_000_000).build();
    store
        .apply(|set| -> Result<(), StoreError> {
            for n in 0..ENTITIES {
                set.insert(item(n))?;
            }
            Ok(())
        })
        .expect("seed the store");
    let pool = outbox::pg::pool(outbox::pg::parse_url("host=/nonexistent dbname=none").unwrap(), 1);
    let config = WorkerConfig { discard: true, linger: Duration::from_micros(200), ..WorkerConfig::default() };
    let worker =
        runtime.block_on(async { Worker::start(store.clone(), receiver, pool, config, None, Default::default()) });
    (store, worker)
}

fn update_one(store: &Store, id: &str, n: u64) {
    store
        .apply(|set| {
            set.update::<Item>(id, |item| item.updated_at = chrono::DateTime::from_timestamp(n as i64, 0).unwrap())
        })
        .expect("update");
}

fn change_set_two(store: &Store, a: &str, b: &str, n: u64) {
    store
        .apply(|set| -> Result<(), StoreError> {
            let at = chrono::DateTime::from_timestamp(n as i64, 0).unwrap();
            set.update::<Item>(a, |item| item.updated_at = at)?;
            set.update::<Item>(b, |item| item.updated_at = at)?;
            Ok(())
        })
        .expect("change set");
}

/// Runs `body` while a second thread keeps changing the other half of the
/// entities.
fn contended(store: &Store, ids: &Arc<Vec<String>>, body: impl FnOnce()) {
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (store, ids, stop) = (store.clone(), ids.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[ENTITIES / 2 + n % (ENTITIES / 2)];
                update_one(&store, id, n as u64);
                n += 1;
            }
        })
    };
    body();
    stop.store(true, Ordering::Relaxed);
    other.join().expect("contending thread");
}

fn record(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (store, worker) = store(&runtime);
    let ids = Arc::new(ids());
    let half = ENTITIES / 2;
    let mut group = c.benchmark_group("record");

    let mut n = 0usize;
    group.bench_function("update_one", |b| {
        b.iter(|| {
            n += 1;
            update_one(&store, &ids[n % half], n as u64);
        })
    });
    group.bench_function("change_set_two", |b| {
        b.iter(|| {
            n += 1;
            change_set_two(&store, &ids[n % half], &ids[(n + 7) % half], n as u64);
        })
    });
    group.bench_function("update_one_coalesced", |b| {
        b.iter(|| {
            n += 1;
            // The same entity each time: after the first, the record is absorbed.
            update_one(&store, black_box(&ids[0]), n as u64);
        })
    });
    contended(&store, &ids, || {
        group.bench_function("update_one_contended", |b| {
            b.iter(|| {
                n += 1;
                update_one(&store, &ids[n % half], n as u64);
            })
        });
        group.bench_function("change_set_two_contended", |b| {
            b.iter(|| {
                n += 1;
                change_set_two(&store, &ids[n % half], &ids[(n + 7) % half], n as u64);
            })
        });
    });
    group.finish();
    drop(worker);
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Counter {
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

/// The store's own cost, with an entity whose clone is trivial.
fn record_small(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (store, receiver) = Store::builder().kind::<Counter>().capacity(1_000_000).build();
    let ids = ids();
    store
        .apply(|set| -> Result<(), StoreError> {
            for id in &ids {
                set.insert(Counter { id: id.clone(), n: 0 })?;
            }
            Ok(())
        })
        .unwrap();
    let pool = outbox::pg::pool(outbox::pg::parse_url("host=/nonexistent dbname=none").unwrap(), 1);
    let config = WorkerConfig { discard: true, linger: Duration::from_micros(200), ..WorkerConfig::default() };
    let worker =
        runtime.block_on(async { Worker::start(store.clone(), receiver, pool, config, None, Default::default()) });
    let mut group = c.benchmark_group("record_small");
    let mut n = 0usize;
    group.bench_function("update_one", |b| {
        b.iter(|| {
            n += 1;
            store.apply(|set| set.update::<Counter>(&ids[n % ENTITIES], |c| c.n += 1)).unwrap();
        })
    });
    group.bench_function("change_set_two", |b| {
        b.iter(|| {
            n += 1;
            store
                .apply(|set| -> Result<(), StoreError> {
                    set.update::<Counter>(&ids[n % ENTITIES], |c| c.n += 1)?;
                    set.update::<Counter>(&ids[(n + 7) % ENTITIES], |c| c.n += 1)?;
                    Ok(())
                })
                .unwrap();
        })
    });
    group.finish();
    drop(worker);
}

criterion_group!(benches, record, record_small);
criterion_main!(benches);
