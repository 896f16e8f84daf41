//! A hash map for millions of small entries: the entries sit side by side
//! in one vector and the hash table holds only their 32-bit positions.
//!
//! A hash table keeps room for an eighth to a half of its buckets empty
//! (it doubles when seven eighths are taken), and that room is touched
//! memory, because entries land anywhere in it. With the entries in the
//! table, a million 48-byte entries sit in 2^21 buckets: 103 MB. Here the
//! empty buckets cost 4 bytes each and the entries 48, in a vector whose
//! spare capacity is never touched and so never resident: 58 MB. A lookup
//! pays one more memory access (the position, then the entry). See
//! *Memory per entity* in `docs/ARCHITECTURE.md`.
//!
//! Removal moves the last entry into the gap (`swap_remove`), so the order
//! of iteration is no order at all, as with any hash map.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

/// A hash map of `K` to `V` with dense entries; see the module docs.
///
/// Holds at most 2^32 entries (a process would need terabytes of memory
/// first); inserting past that panics.
pub struct DenseMap<K, V, S = foldhash::fast::RandomState> {
    positions: HashTable<u32>,
    entries: Vec<(K, V)>,
    hasher: S,
}

impl<K, V, S: Default> Default for DenseMap<K, V, S> {
    fn default() -> Self {
        Self { positions: HashTable::new(), entries: Vec::new(), hasher: S::default() }
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> DenseMap<K, V, S> {
    /// Number of entries: positions run from 0 to one less.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map holds no entry.
    #[cfg_attr(not(feature = "server"), allow(dead_code, reason = "the item index uses it"))]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Fills an empty map with `entries`, whose keys are distinct; the
    /// vector becomes the map's entries as it is. Their positions go into
    /// the table in the order of its buckets (a hash's bucket is its low
    /// bits: the entries are sorted by `hash & mask`, the mask that
    /// [`reserve_for_fill`](Self::reserve_for_fill) returns; entries in that
    /// order already are not moved again), so that for millions of entries
    /// each insert touches the table next to the last one, where inserting
    /// them in any other order would touch it anywhere: a cache miss or two
    /// each. The order only decides where memory is touched: the map is
    /// right in any order.
    #[cfg_attr(not(feature = "server"), allow(dead_code, reason = "the item index uses it"))]
    pub fn fill(&mut self, mut entries: Vec<(K, V)>) {
        assert!(self.entries.is_empty(), "only an empty map is filled");
        let mask = self.reserve_for_fill(entries.len());
        let Self { positions, entries: held, hasher } = self;
        entries.sort_unstable_by_key(|(key, _)| hasher.hash_one(key) & mask);
        for (at, (key, _)) in entries.iter().enumerate() {
            let hash = hasher.hash_one(key);
            debug_assert!(
                positions.find(hash, |&other| entries[other as usize].0 == *key).is_none(),
                "the keys a map is filled with are distinct"
            );
            positions.insert_unique(hash, position(at), |&other| hasher.hash_one(&entries[other as usize].0));
        }
        *held = entries;
    }

    /// Makes room to [`fill`](Self::fill) the empty map with `len`
    /// entries; returns the mask of the hashes' low bits that `fill` orders
    /// them by (sorting entries already in that order is one pass).
    #[cfg_attr(not(feature = "server"), allow(dead_code, reason = "the item index uses it"))]
    pub fn reserve_for_fill(&mut self, len: usize) -> u64 {
        let Self { positions, entries, hasher } = self;
        positions.reserve(len, |&at| hasher.hash_one(&entries[at as usize].0));
        // A table of 2^n buckets holds 7/8 of that; smaller tables are
        // filled in whatever order this gives.
        (positions.capacity() / 7 * 8).next_power_of_two() as u64 - 1
    }

    /// Room for `additional` more entries without growing. The entries'
    /// vector is reserved exactly: what is not filled is not resident.
    pub fn reserve(&mut self, additional: usize) {
        let Self { positions, entries, hasher } = self;
        positions.reserve(additional, |&at| hasher.hash_one(&entries[at as usize].0));
        entries.reserve_exact(additional);
    }

    /// Where `key`'s entry is. A position names the same entry until an
    /// entry is removed ([`swap_remove`](Self::swap_remove) moves the last
    /// one into the gap), so in a map nothing is removed from it names
    /// that entry for good: [`at`](Self::at) then finds it without hashing
    /// the key again.
    pub fn position<Q>(&self, key: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.position_hashed(self.hasher.hash_one(key), key)
    }

    /// The entry at position `at` (see [`position`](Self::position)).
    ///
    /// # Panics
    ///
    /// If no entry is there.
    pub fn at(&self, at: usize) -> (&K, &V) {
        let (key, value) = &self.entries[at];
        (key, value)
    }

    /// The entry at position `at`, its value to change.
    ///
    /// # Panics
    ///
    /// If no entry is there.
    pub fn at_mut(&mut self, at: usize) -> (&K, &mut V) {
        let (key, value) = &mut self.entries[at];
        (key, value)
    }

    fn position_hashed<Q>(&self, hash: u64, key: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entries = &self.entries;
        self.positions.find(hash, |&at| entries[at as usize].0.borrow() == key).map(|&at| at as usize)
    }

    /// The value of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.position(key).map(|at| &self.entries[at].1)
    }

    /// The value of `key`, to change.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.position(key).map(|at| &mut self.entries[at].1)
    }

    /// The value of `key`, inserted from `default()` when absent.
    pub fn get_or_insert_with(&mut self, key: K, default: impl FnOnce() -> V) -> &mut V {
        self.entry_or_insert_with(key, default).1
    }

    /// The key held and the value of `key`, inserted from `default()` when
    /// absent: a caller that moves its key in can go on with the map's own
    /// instead of a copy of it.
    pub fn entry_or_insert_with(&mut self, key: K, default: impl FnOnce() -> V) -> (&K, &mut V) {
        let at = self.position_or_insert_with(key, default);
        self.at_mut(at)
    }

    /// The position of `key`'s entry, inserted from `default()` when
    /// absent.
    pub fn position_or_insert_with(&mut self, key: K, default: impl FnOnce() -> V) -> usize {
        let hash = self.hasher.hash_one(&key);
        match self.position_hashed(hash, &key) {
            Some(at) => at,
            None => self.push(hash, key, default()),
        }
    }

    /// Sets `key` to `value`; the value it replaces.
    #[cfg_attr(not(feature = "server"), allow(dead_code, reason = "the item index uses it"))]
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let hash = self.hasher.hash_one(&key);
        match self.position_hashed(hash, &key) {
            Some(at) => Some(std::mem::replace(&mut self.entries[at].1, value)),
            None => {
                self.push(hash, key, value);
                None
            }
        }
    }

    /// Appends an entry for a key that is absent and hashes to `hash`; its
    /// position.
    fn push(&mut self, hash: u64, key: K, value: V) -> usize {
        let at = self.entries.len();
        let Self { positions, entries, hasher } = self;
        positions.insert_unique(hash, position(at), |&at| hasher.hash_one(&entries[at as usize].0));
        entries.push((key, value));
        at
    }

    /// Removes `key`; its value. The last entry takes the removed one's
    /// place.
    #[cfg_attr(not(feature = "server"), allow(dead_code, reason = "the item index uses it"))]
    pub fn swap_remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Self { positions, entries, hasher } = self;
        let found = positions.find_entry(hasher.hash_one(key), |&at| entries[at as usize].0.borrow() == key).ok()?;
        let (at, _) = found.remove();
        let last = entries.len() - 1;
        if at as usize != last {
            let moved = hasher.hash_one(&entries[last].0);
            let position =
                positions.find_mut(moved, |&other| other as usize == last).expect("every entry has a position");
            *position = at;
        }
        Some(entries.swap_remove(at as usize).1)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(key, value)| (key, value))
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, value)| value)
    }

    /// Every value, to change, in no particular order.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.iter_mut().map(|(_, value)| value)
    }
}

/// Where entry `at` is, as the table holds it.
fn position(at: usize) -> u32 {
    u32::try_from(at).expect("a DenseMap holds at most 2^32 entries")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn agrees_with_a_hash_map_through_inserts_replacements_and_removals() {
        let mut dense = DenseMap::<u64, u64>::default();
        let mut reference = HashMap::new();
        // A fixed pseudo-random walk over a small key space: keys are
        // inserted, replaced and removed many times, so removals move
        // entries from every position, the last one included.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let key = state % 500;
            match state % 3 {
                0 => assert_eq!(dense.insert(key, step), reference.insert(key, step)),
                1 => assert_eq!(dense.swap_remove(&key), reference.remove(&key)),
                _ => *dense.get_or_insert_with(key, || step) += 1,
            }
            if state % 3 == 2 {
                *reference.entry(key).or_insert(step) += 1;
            }
            assert_eq!(dense.len(), reference.len());
        }
        for key in 0..500 {
            assert_eq!(dense.get(&key), reference.get(&key), "key {key}");
        }
        let mut listed: Vec<(u64, u64)> = dense.iter().map(|(k, v)| (*k, *v)).collect();
        let mut expected: Vec<(u64, u64)> = reference.into_iter().collect();
        listed.sort_unstable();
        expected.sort_unstable();
        assert_eq!(listed, expected);
    }

    #[test]
    fn looks_up_by_borrowed_key_and_grows_past_its_reservation() {
        let mut dense = DenseMap::<Arc<str>, usize>::default();
        dense.reserve(10);
        for n in 0..1000 {
            assert_eq!(dense.insert(Arc::from(format!("id-{n}")), n), None);
        }
        assert_eq!(dense.get("id-999"), Some(&999));
        assert_eq!(dense.position("id-7").map(|at| dense.at(at)).map(|(k, v)| (&**k, *v)), Some(("id-7", 7)));
        *dense.get_mut("id-7").unwrap() = 70;
        assert_eq!(dense.swap_remove("id-0"), Some(0));
        assert_eq!((dense.get("id-0"), dense.get("id-7"), dense.len()), (None, Some(&70), 999));
        assert_eq!(dense.values().sum::<usize>(), (1..1000).sum::<usize>() + 63);
    }

    /// A position names its entry while the map grows (by inserts, by
    /// reserving), and until an entry is removed: then the last entry
    /// takes the removed one's position.
    #[test]
    fn a_position_names_its_entry_until_an_entry_is_removed() {
        let mut dense = DenseMap::<Arc<str>, usize>::default();
        let positions: Vec<usize> =
            (0..100).map(|n| dense.position_or_insert_with(Arc::from(format!("id-{n}")), || n)).collect();
        for n in 100..5_000 {
            dense.insert(Arc::from(format!("id-{n}")), n);
        }
        dense.reserve(100_000);
        assert_eq!(dense.position_or_insert_with(Arc::from("id-42"), || 0), positions[42], "present: not inserted");
        for (n, &at) in positions.iter().enumerate() {
            assert_eq!(dense.at(at), (&Arc::from(format!("id-{n}")), &n));
            assert_eq!(dense.position(&*format!("id-{n}")), Some(at));
        }
        *dense.at_mut(positions[7]).1 = 70;
        assert_eq!(dense.get("id-7"), Some(&70));
        dense.swap_remove("id-3");
        assert_eq!(dense.at(positions[3]), (&Arc::from("id-4999"), &4999), "the last entry moved into the gap");
        assert_eq!(dense.position("id-4999"), Some(positions[3]));
    }

    #[test]
    fn a_filled_map_finds_every_entry_and_goes_on_changing() {
        for (reserved, count) in [(0, 0), (0, 5), (10, 1000), (100_000, 70_000)] {
            let mut dense = DenseMap::<u64, u64>::default();
            dense.reserve(reserved);
            // Keys in no order, from a fixed pseudo-random walk.
            let keys: Vec<u64> =
                (0..count).map(|n: u64| n.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)).collect();
            dense.fill(keys.iter().map(|&key| (key, key ^ 1)).collect());
            assert_eq!(dense.len(), keys.len());
            assert!(keys.iter().all(|key| dense.get(key) == Some(&(key ^ 1))), "{count} entries");
            assert_eq!(dense.get(&3), None);
            // Inserts and removals after filling keep every position right.
            for &key in keys.iter().step_by(3) {
                assert_eq!(dense.swap_remove(&key), Some(key ^ 1));
            }
            for key in [3, 4, 5] {
                assert_eq!(dense.insert(key, key), None);
            }
            for (at, key) in keys.iter().enumerate() {
                assert_eq!(dense.get(key), (at % 3 != 0).then_some(&(key ^ 1)), "{key}");
            }
            assert_eq!(dense.len(), keys.len() - keys.len().div_ceil(3) + 3);
        }
    }

    #[test]
    fn an_entry_gives_the_key_held_and_keeps_the_value_there() {
        let mut dense = DenseMap::<Arc<str>, usize>::default();
        let first: Arc<str> = Arc::from("id-1");
        dense.insert(first.clone(), 1);
        let again: Arc<str> = Arc::from("id-1");
        let (key, value) = dense.entry_or_insert_with(again, || unreachable!("the key is held"));
        assert!(Arc::ptr_eq(key, &first), "the key held, not the one given");
        *value += 10;
        let (key, value) = dense.entry_or_insert_with(Arc::from("id-2"), || 2);
        assert_eq!((&**key, *value), ("id-2", 2));
        assert_eq!((dense.get("id-1"), dense.len()), (Some(&11), 2));
    }
}
