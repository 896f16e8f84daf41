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

use criterion::{Criterion, criterion_group, criterion_main};
use outbox::store::Store;

#[path = "shared/record.rs"]
mod p1;

use p1::{
    ENTITIES, MEASURED, change_counters, change_set_two, ids, small_store, store, update_counter, update_item,
    update_one,
};

/// Runs `body` while a second thread keeps changing the other half of the
/// entities.
fn contended(store: &Store, ids: &Arc<Vec<String>>, body: impl FnOnce()) {
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (store, ids, stop) = (store.clone(), ids.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                update_item(&store, &ids[MEASURED + n % (ENTITIES - MEASURED)], n);
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
    let mut group = c.benchmark_group("record");

    let mut n = 0usize;
    group.bench_function("update_one", |b| {
        b.iter(|| {
            n += 1;
            update_one(&store, &ids, n);
        })
    });
    group.bench_function("change_set_two", |b| {
        b.iter(|| {
            n += 1;
            change_set_two(&store, &ids, n);
        })
    });
    group.bench_function("update_one_coalesced", |b| {
        b.iter(|| {
            n += 1;
            // The same entity each time: after the first, the record is absorbed.
            update_item(&store, black_box(&ids[0]), n);
        })
    });
    contended(&store, &ids, || {
        group.bench_function("update_one_contended", |b| {
            b.iter(|| {
                n += 1;
                update_one(&store, &ids, n);
            })
        });
        group.bench_function("change_set_two_contended", |b| {
            b.iter(|| {
                n += 1;
                change_set_two(&store, &ids, n);
            })
        });
    });
    group.finish();
    drop(worker);
}

/// The store's own cost, with an entity whose clone is trivial.
fn record_small(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let ids = ids();
    let (store, worker) = small_store(&runtime, &ids);
    let mut group = c.benchmark_group("record_small");
    let mut n = 0usize;
    group.bench_function("update_one", |b| {
        b.iter(|| {
            n += 1;
            update_counter(&store, &ids, n);
        })
    });
    group.bench_function("change_set_two", |b| {
        b.iter(|| {
            n += 1;
            change_counters(&store, &ids, n);
        })
    });
    group.finish();
    drop(worker);
}

criterion_group!(benches, record, record_small);
criterion_main!(benches);
