//! P1's heap allocations: how many allocations recording a change makes
//! on the thread that makes it, for the same stores and changes
//! `benches/store.rs` times (a worker draining the outbox meanwhile, so
//! most changes take the full path). Unlike a time, the count does not
//! move with the machine's speed; it moves with the code.
//!
//! A binary of its own, because counting replaces the global allocator:
//! the timings keep the plain one. The counts go to
//! `target/criterion/allocations.json`, which `scripts/bench` puts into
//! BENCHMARKS.md's P1 table.

#[path = "shared/record.rs"]
mod p1;

use p1::{change_counters, change_set_two, ids, small_store, store, update_counter, update_item, update_one};

/// Changes counted per case, after as many uncounted ones.
const CALLS: usize = 20_000;

/// Allocations on this thread per call of `change`, over `CALLS` calls
/// that follow `CALLS` uncounted ones (so that tables and channels have
/// grown to their steady size).
fn per_change(mut change: impl FnMut(usize)) -> f64 {
    (0..CALLS).for_each(&mut change);
    let counted = allocation_counter::measure(|| (CALLS..2 * CALLS).for_each(&mut change));
    counted.count_total as f64 / CALLS as f64
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let ids = ids();
    let mut counts = serde_json::Map::new();
    {
        let (store, _worker) = small_store(&runtime, &ids);
        counts.insert("record_small/update_one".into(), per_change(|n| update_counter(&store, &ids, n)).into());
        counts.insert("record_small/change_set_two".into(), per_change(|n| change_counters(&store, &ids, n)).into());
    }
    {
        let (store, _worker) = store(&runtime);
        counts.insert("record/update_one".into(), per_change(|n| update_one(&store, &ids, n)).into());
        counts.insert("record/change_set_two".into(), per_change(|n| change_set_two(&store, &ids, n)).into());
        counts.insert("record/update_one_coalesced".into(), per_change(|n| update_item(&store, &ids[0], n)).into());
    }
    for (name, count) in &counts {
        println!("{name}: {count:.2} allocations per change");
    }
    std::fs::create_dir_all("target/criterion").expect("create target/criterion");
    std::fs::write("target/criterion/allocations.json", serde_json::to_vec_pretty(&counts).expect("numbers"))
        .expect("write target/criterion/allocations.json");
}
