//! In-memory indexes of items, kept in step with the store (they are
//! updated in the same critical section as every change): items by status
//! in DFID order (merged, all items in DFID order, for stable cursor
//! pagination), and items by identifier.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError};

use super::model::{Item, ItemStatus};
use crate::dense::DenseMap;
use crate::store::Index;

/// Items by DFID, identifier and status.
#[derive(Default)]
pub struct ItemIndex {
    /// Items by identifier, keyed by a 64-bit hash of (key, value) under
    /// this process's random seed rather than by the text: an identifier
    /// held by one item, nearly all of them, costs one 24-byte entry and no
    /// allocation of its own (a dense map: at two identifiers per item, 69
    /// bytes per item where a hash map of the same entries takes 105). A
    /// hash held by several items (the same identifier on several items, or
    /// very rarely two identifiers with one hash) moves to `shared`. Lookups check each candidate's identifiers
    /// ([`page`](Self::page)), so a shared hash never lists an item that
    /// lacks the identifier.
    by_identifier: DenseMap<u64, Arc<str>, AlreadyHashed>,
    shared: HashMap<u64, BTreeSet<Arc<str>>, foldhash::fast::RandomState>,
    /// The seed of identifier hashes.
    seed: foldhash::fast::RandomState,
    /// Items by status, each set in DFID order; an item is in exactly one
    /// (or, while hydration loads, in `loading`).
    by_status: HashMap<ItemStatus, BTreeSet<Ranked>, foldhash::fast::RandomState>,
    /// Items hydration has added, not yet in the indexes: from
    /// [`reserve`](Index::reserve) to [`hydrated`](Index::hydrated), a new
    /// item's id and identifiers are pushed here, and the status sets and
    /// the identifier index are built from them, sorted, at the end.
    /// Inserted one at a time, each id (random, from a UUID) would walk a
    /// tree of up to millions, and each identifier land anywhere in a table
    /// of millions, with cache misses all the way, under the store's lock
    /// that both decoding threads wait on.
    loading: Option<Loading>,
}

/// New items' ids and identifiers gathered during hydration.
#[derive(Default)]
struct Loading {
    /// How many entities hydration expects: each status's vector reserves
    /// that much, the identifiers' twice that (room never filled is never
    /// touched).
    expected: usize,
    ids: HashMap<ItemStatus, Vec<Ranked>, foldhash::fast::RandomState>,
    /// Identifier hashes and the item holding each.
    identifiers: Vec<(u64, Arc<str>)>,
}

/// The identifier index's keys are hashes already (under this process's
/// random seed): its table uses them as they are, and its entries can be
/// put in the order of its buckets by sorting them by key.
#[derive(Clone, Copy, Default)]
struct AlreadyHashed;

impl BuildHasher for AlreadyHashed {
    type Hasher = KeyAsHash;

    fn build_hasher(&self) -> KeyAsHash {
        KeyAsHash(0)
    }
}

/// The `u64` hashed, as its hash.
struct KeyAsHash(u64);

impl std::hash::Hasher for KeyAsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; any other bytes are mixed in anyway.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(byte);
        }
    }
}

impl Loading {
    fn len(&self) -> usize {
        self.ids.values().map(Vec::len).sum()
    }
}

/// A DFID in a status set, with a number that orders it without reading
/// the text (see [`Ranked::rank`]).
///
/// DFIDs come from random UUIDs: each new one lands anywhere in a set of a
/// million, and inserting it compares it with a few dozen ids on the way
/// down the tree, each a read of text somewhere else in memory, most of
/// them cache misses. Ranked, nearly every comparison is between two
/// numbers in the node itself; the text is read only when two ranks are
/// equal. It costs 8 bytes per item.
#[derive(Clone, Debug)]
struct Ranked {
    rank: u64,
    id: Arc<str>,
}

/// From this many identifiers gathered while loading, the indexes are
/// built on two threads: below it, building takes a few milliseconds at
/// most, about what starting a thread costs to win back.
const PARALLEL_BUILD: usize = 65_536;

/// An identifier's hash under `seed`.
fn identifier_hash(seed: &foldhash::fast::RandomState, key: &str, value: &str) -> u64 {
    seed.hash_one((key, value))
}

/// What the server's DFIDs begin with.
const DFID_PREFIX: &[u8] = b"DFID-";

impl Ranked {
    fn new(id: &Arc<str>) -> Self {
        Self { rank: Self::rank(id), id: id.clone() }
    }

    /// A number that never orders two ids against their text: `a < b`
    /// implies `rank(a) <= rank(b)`. The top two bits are a class: ids
    /// below every id starting with `DFID-` (0), those starting with it
    /// (1), those above them all (2); the rest are the first 62 bits of the
    /// id's next 8 bytes (after `DFID-` in class 1, from its start
    /// otherwise), padded with zeros: the bytes that differ between DFIDs.
    fn rank(id: &str) -> u64 {
        let bytes = id.as_bytes();
        let (class, rest) = match bytes.strip_prefix(DFID_PREFIX) {
            Some(rest) => (1, rest),
            None if bytes < DFID_PREFIX => (0, bytes),
            None => (2, bytes),
        };
        let mut word = [0u8; 8];
        let n = rest.len().min(8);
        word[..n].copy_from_slice(&rest[..n]);
        (class << 62) | (u64::from_be_bytes(word) >> 2)
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.rank == other.rank && self.id == other.id
    }
}

impl Eq for Ranked {}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank.cmp(&other.rank).then_with(|| self.id.cmp(&other.id))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Looking up and ranging by text: the order is the text's (the rank only
/// decides what the text would decide).
impl std::borrow::Borrow<str> for Ranked {
    fn borrow(&self) -> &str {
        &self.id
    }
}

/// The items under one identifier hash, in DFID order.
enum Ids<'a> {
    One(&'a Arc<str>),
    Many(&'a BTreeSet<Arc<str>>),
}

impl<'a> Ids<'a> {
    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(set) => set.len(),
        }
    }

    fn contains(&self, id: &str) -> bool {
        match self {
            Self::One(only) => &***only == id,
            Self::Many(set) => set.contains(id),
        }
    }

    fn after(self, lower: Bound<&'a str>) -> Box<dyn Iterator<Item = &'a Arc<str>> + 'a> {
        match self {
            Self::One(only) => {
                let past = match lower {
                    Bound::Excluded(cursor) => &**only > cursor,
                    _ => true,
                };
                Box::new(past.then_some(only).into_iter())
            }
            Self::Many(set) => Box::new(set.range::<str, _>((lower, Bound::Unbounded))),
        }
    }
}

impl ItemIndex {
    fn identifier_hash(&self, key: &str, value: &str) -> u64 {
        identifier_hash(&self.seed, key, value)
    }

    fn ids(&self, hash: u64) -> Option<Ids<'_>> {
        match self.shared.get(&hash) {
            Some(set) => Some(Ids::Many(set)),
            None => self.by_identifier.get(&hash).map(Ids::One),
        }
    }

    fn add(&mut self, hash: u64, id: &Arc<str>) {
        if let Some(set) = self.shared.get_mut(&hash) {
            set.insert(id.clone());
            return;
        }
        match self.by_identifier.get(&hash) {
            None => {
                self.by_identifier.insert(hash, id.clone());
            }
            Some(only) if only == id => {}
            Some(_) => {
                let other = self.by_identifier.swap_remove(&hash).expect("the entry just read");
                self.shared.insert(hash, BTreeSet::from([other, id.clone()]));
            }
        }
    }

    fn remove(&mut self, hash: u64, id: &str) {
        if let Some(set) = self.shared.get_mut(&hash) {
            set.remove(id);
            if set.len() <= 1 {
                let last = set.pop_first();
                self.shared.remove(&hash);
                if let Some(last) = last {
                    self.by_identifier.insert(hash, last);
                }
            }
        } else if self.by_identifier.get(&hash).is_some_and(|only| &**only == id) {
            self.by_identifier.swap_remove(&hash);
        }
    }
}

impl Index<Item> for ItemIndex {
    fn reserve(&mut self, additional: usize) {
        // The identifier table is sized when it is filled, at the end.
        self.loading.get_or_insert_default().expected += additional;
    }

    fn hydrated(&mut self) {
        let built = self.add_loaded();
        self.loading = None;
        // Inserted one at a time, the ordered sets' nodes are left half
        // (ids arriving in order) to two thirds (in random order) full;
        // rebuilt from the sorted ids they are full: about 18 instead of up
        // to 32 bytes per id and set. A set just built from the loaded ids
        // (merged with what it held) is full already.
        for (status, set) in &mut self.by_status {
            if !built.contains(status) {
                compact(set);
            }
        }
    }

    fn update(&mut self, id: &Arc<str>, old: Option<&Item>, new: Option<&Item>) {
        if self.loading.is_some() {
            match (old, new) {
                (None, Some(new)) => return self.load(id, new),
                (None, None) => return, // a tombstone loaded: nothing to index
                // An item changing or going while hydration loads (a
                // retried hydration, or a standby's, meeting newer rows):
                // one that is not in its status set is among the gathered
                // ones, which then go into the indexes first. (An item is
                // in its status set or gathered, never both.)
                (Some(old), _) => {
                    if !self.by_status.get(&old.status).is_some_and(|set| set.contains::<str>(id)) {
                        self.add_loaded();
                    }
                }
            }
        }
        let old_status = old.map(|i| i.status);
        let new_status = new.map(|i| i.status);
        if old_status != new_status {
            if let Some(status) = old_status
                && let Some(set) = self.by_status.get_mut(&status)
            {
                set.remove::<str>(id);
            }
            if let Some(status) = new_status {
                self.by_status.entry(status).or_default().insert(Ranked::new(id));
            }
        }
        let old_ids = old.map(|i| i.identifiers.as_slice()).unwrap_or_default();
        let new_ids = new.map(|i| i.identifiers.as_slice()).unwrap_or_default();
        if old_ids != new_ids {
            for identifier in old_ids.iter().filter(|i| !new_ids.contains(i)) {
                self.remove(self.identifier_hash(&identifier.key, &identifier.value), id);
            }
            for identifier in new_ids.iter().filter(|i| !old_ids.contains(i)) {
                self.add(self.identifier_hash(&identifier.key, &identifier.value), id);
            }
        }
    }
}

impl ItemIndex {
    /// Moves the ids gathered while loading into their status sets;
    /// returns the statuses whose sets were rebuilt (with full nodes).
    fn add_loaded(&mut self) -> Vec<ItemStatus> {
        let Some(loading) = &mut self.loading else { return Vec::new() };
        let (ids, identifiers) = (std::mem::take(&mut loading.ids), std::mem::take(&mut loading.identifiers));
        // Ids few next to their set (a standby hydrating again) go in one
        // at a time; the rest are built into sets of full nodes and merged.
        let (mut one_by_one, mut to_build) = (Vec::new(), Vec::new());
        for (status, ids) in ids {
            match self.by_status.get(&status) {
                Some(set) if ids.len() * 8 < set.len() => one_by_one.push((status, ids)),
                _ => to_build.push((status, ids)),
            }
        }
        // The status sets and the identifier index are sorted and built
        // side by side when there are many (at the end of hydration the
        // decoding threads are done, and both cores are free), or one after
        // the other where no thread can be started.
        let to_build = Mutex::new(to_build);
        let build_sets = || -> Vec<(ItemStatus, BTreeSet<Ranked>)> {
            let to_build = std::mem::take(&mut *to_build.lock().unwrap_or_else(PoisonError::into_inner));
            to_build.into_iter().map(|(status, ids)| (status, build(ids))).collect()
        };
        let sets = if identifiers.len() >= PARALLEL_BUILD {
            std::thread::scope(|scope| {
                let building = std::thread::Builder::new().spawn_scoped(scope, build_sets);
                self.add_identifiers(identifiers);
                match building {
                    Ok(sets) => sets.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(error) => {
                        tracing::warn!(error = %error, "no thread to build the item index on; building on this one");
                        build_sets()
                    }
                }
            })
        } else {
            self.add_identifiers(identifiers);
            build_sets()
        };
        let mut built = Vec::new();
        for (status, mut set) in sets {
            self.by_status.entry(status).or_default().append(&mut set);
            built.push(status);
        }
        for (status, ids) in one_by_one {
            self.by_status.entry(status).or_default().extend(ids);
        }
        built
    }

    /// Indexes the identifiers gathered while loading.
    fn add_identifiers(&mut self, identifiers: Vec<(u64, Arc<str>)>) {
        if self.by_identifier.is_empty() && self.shared.is_empty() {
            self.fill_identifiers(identifiers);
        } else {
            for (hash, id) in identifiers {
                self.add(hash, &id);
            }
        }
    }

    /// Gathers a new item while hydration loads.
    fn load(&mut self, id: &Arc<str>, item: &Item) {
        let Self { seed, loading, .. } = self;
        let loading = loading.as_mut().expect("only while loading");
        let expected = loading.expected;
        loading.ids.entry(item.status).or_insert_with(|| Vec::with_capacity(expected)).push(Ranked::new(id));
        if loading.identifiers.capacity() == 0 {
            // Items carry a gtin and a sku or so.
            loading.identifiers.reserve_exact(2 * expected);
        }
        let hashed = item.identifiers.iter().map(|i| (identifier_hash(seed, &i.key, &i.value), id.clone()));
        loading.identifiers.extend(hashed);
    }

    /// Fills the empty identifier index from `identifiers` (hashes and the
    /// item holding each, in any order): sorted, a hash held by several
    /// items is a run, which goes to `shared`; the rest become the dense
    /// map's entries as they are, without a copy. They are sorted in the
    /// order the map fills its table in (its keys are their own hashes),
    /// then by hash and id, so that the map need not sort them again.
    fn fill_identifiers(&mut self, mut identifiers: Vec<(u64, Arc<str>)>) {
        // The map's hash of a key is the key itself (`AlreadyHashed`), so
        // its order is the keys' low bits under its mask.
        let mask = self.by_identifier.reserve_for_fill(identifiers.len());
        identifiers.sort_unstable_by(|(a, a_id), (b, b_id)| (a & mask, a, a_id).cmp(&(b & mask, b, b_id)));
        // An item listing an identifier twice (or two of its identifiers
        // with one hash) is indexed under it once.
        identifiers.dedup();
        let (mut kept, mut at) = (0, 0);
        while at < identifiers.len() {
            let hash = identifiers[at].0;
            let end = at + identifiers[at..].iter().take_while(|(other, _)| *other == hash).count();
            if end - at == 1 {
                identifiers.swap(kept, at);
                kept += 1;
            } else {
                let ids: BTreeSet<Arc<str>> = identifiers[at..end].iter().map(|(_, id)| id.clone()).collect();
                self.shared.insert(hash, ids);
            }
            at = end;
        }
        identifiers.truncate(kept);
        self.by_identifier.fill(identifiers);
    }
}

/// A set of `ids` (in any order), with full nodes: the ids are sorted in
/// place, then moved into trees an eighth at a time from the top (each
/// part's room in the vector freed before the next is built, and merged
/// into the set with `append`, which frees the old nodes as it builds the
/// new ones), so that the vector and the set are never both held whole:
/// about a quarter of the memory of building the set from the whole
/// vector at once, for about four walks of the set.
fn build(mut ids: Vec<Ranked>) -> BTreeSet<Ranked> {
    ids.sort_unstable();
    let part = ids.len().div_ceil(8).max(4096);
    let mut set = BTreeSet::new();
    while !ids.is_empty() {
        let mut top: BTreeSet<Ranked> = ids.drain(ids.len().saturating_sub(part)..).collect();
        ids.shrink_to_fit();
        set.append(&mut top);
    }
    set
}

/// Rebuilds `set` with full nodes and without a second copy of it at any
/// moment: `append` builds a new tree from the merged sorted input while
/// it frees the old nodes (and into an empty set it would only swap, so
/// the first id goes ahead on its own).
fn compact(set: &mut BTreeSet<Ranked>) {
    if let Some(first) = set.pop_first() {
        let mut fresh = BTreeSet::from([first]);
        fresh.append(set);
        *set = fresh;
    }
}

/// Which items a listing asks for.
#[derive(Debug, Default, Clone)]
pub struct ItemFilter {
    /// Only items with this status.
    pub status: Option<ItemStatus>,
    /// Only items with this identifier.
    pub identifier: Option<(String, String)>,
}

impl ItemIndex {
    /// Up to `limit` DFIDs matching `filter`, in DFID order, after the
    /// cursor `after`; and whether more follow. With an identifier in the
    /// filter, `has_identifier(dfid)` must tell whether that item holds it
    /// (the index finds candidates by a hash of the identifier).
    pub fn page(
        &self,
        filter: &ItemFilter,
        after: Option<&str>,
        limit: usize,
        has_identifier: impl Fn(&str) -> bool,
    ) -> (Vec<Arc<str>>, bool) {
        let Some(loading) = self.loading.as_ref().filter(|loading| loading.len() > 0) else {
            return self.page_of_sets(filter, after, limit, has_identifier);
        };
        // While hydration loads (the server answers no listing before it is
        // ready; a library's caller may ask): the first matches in the
        // indexes merged with the gathered items that match (which the
        // indexes do not hold yet), sorted.
        let (mut page, _) = self.page_of_sets(filter, after, limit.saturating_add(1), &has_identifier);
        let loaded = loading.ids.iter().filter(|(status, _)| filter.status.is_none_or(|wanted| wanted == **status));
        page.extend(
            loaded
                .flat_map(|(_, ids)| ids)
                .map(|ranked| &ranked.id)
                .filter(|id| after.is_none_or(|cursor| &***id > cursor))
                .filter(|id| filter.identifier.is_none() || has_identifier(id))
                .cloned(),
        );
        page.sort_unstable();
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    /// [`page`](Self::page) of the status sets alone.
    fn page_of_sets(
        &self,
        filter: &ItemFilter,
        after: Option<&str>,
        limit: usize,
        has_identifier: impl Fn(&str) -> bool,
    ) -> (Vec<Arc<str>>, bool) {
        let lower = match after {
            Some(cursor) => Bound::Excluded(cursor),
            None => Bound::Unbounded,
        };
        let by_status = filter.status.map(|s| self.by_status.get(&s));
        let by_identifier = filter.identifier.as_ref().map(|(key, value)| self.ids(self.identifier_hash(key, value)));
        if matches!(by_status, Some(None)) || matches!(by_identifier, Some(None)) {
            return (Vec::new(), false); // a filter that matches nothing
        }
        let (by_status, by_identifier) = (by_status.flatten(), by_identifier.flatten());
        // Walk the smaller candidate set; check the other filter per item.
        let mut matching: Box<dyn Iterator<Item = &Arc<str>>> = match (by_identifier, by_status) {
            (Some(ids), Some(status)) if ids.len() <= status.len() => {
                Box::new(ids.after(lower).filter(|id| status.contains::<str>(id)))
            }
            (Some(ids), Some(status)) => Box::new(
                status.range::<str, _>((lower, Bound::Unbounded)).map(|r| &r.id).filter(move |id| ids.contains(id)),
            ),
            (Some(ids), None) => ids.after(lower),
            (None, Some(status)) => Box::new(status.range::<str, _>((lower, Bound::Unbounded)).map(|r| &r.id)),
            (None, None) => Box::new(self.all_after(lower)),
        };
        if filter.identifier.is_some() {
            matching = Box::new(matching.filter(|id| has_identifier(id)));
        }
        let page: Vec<Arc<str>> = matching.by_ref().take(limit).cloned().collect();
        let more = matching.next().is_some();
        (page, more)
    }

    /// Every live item after `lower`, in DFID order: the status sets
    /// merged as they are walked (each item is in exactly one), which costs
    /// a comparison or two per item listed instead of a third ordered set
    /// of every item (18 MB per million).
    fn all_after<'a>(&'a self, lower: Bound<&'a str>) -> impl Iterator<Item = &'a Arc<str>> + 'a {
        let mut heads: Vec<_> =
            self.by_status.values().map(|set| set.range::<str, _>((lower, Bound::Unbounded)).peekable()).collect();
        std::iter::from_fn(move || {
            let (first, _) = heads
                .iter_mut()
                .enumerate()
                .filter_map(|(at, head)| head.peek().map(|ranked| (at, *ranked)))
                .min_by(|(_, a), (_, b)| a.cmp(b))?;
            heads[first].next().map(|ranked| &ranked.id)
        })
    }

    /// Number of live items.
    pub fn len(&self) -> usize {
        self.by_status.values().map(BTreeSet::len).sum::<usize>() + self.loading.as_ref().map_or(0, Loading::len)
    }

    /// Whether there are no live items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::Identifier;

    fn item(dfid: &str, identifiers: &[(&str, &str)]) -> Item {
        let now = chrono::Utc::now();
        Item {
            dfid: dfid.into(),
            local_id: None,
            status: ItemStatus::Active,
            identifiers: identifiers.iter().map(|(k, v)| Identifier { key: (*k).into(), value: (*v).into() }).collect(),
            enriched_data: Default::default(),
            merged_into: None,
            circuits: Vec::new(),
            created_at: now,
            updated_at: now,
        }
    }

    fn listed(index: &ItemIndex, key: &str, value: &str, has: impl Fn(&str) -> bool) -> Vec<String> {
        let filter = ItemFilter { status: None, identifier: Some((key.into(), value.into())) };
        index.page(&filter, None, 10, has).0.iter().map(|id| id.to_string()).collect()
    }

    #[test]
    fn an_identifier_shared_by_items_lists_them_all_and_each_removal_is_kept() {
        let mut index = ItemIndex::default();
        let ids: Vec<Arc<str>> = ["a", "b", "c"].into_iter().map(Arc::from).collect();
        for id in &ids {
            index.update(id, None, Some(&item(id, &[("gtin", "1"), ("sku", id)])));
        }
        assert_eq!(listed(&index, "gtin", "1", |_| true), ["a", "b", "c"]);
        assert_eq!(listed(&index, "sku", "b", |_| true), ["b"]);
        assert_eq!(index.shared.len(), 1, "only the shared identifier leaves the compact map");
        // b gives up the shared identifier, then c is deleted: a alone holds
        // it, and it moves back to the compact map.
        index.update(&ids[1], Some(&item("b", &[("gtin", "1"), ("sku", "b")])), Some(&item("b", &[("sku", "b")])));
        assert_eq!(listed(&index, "gtin", "1", |_| true), ["a", "c"]);
        index.update(&ids[2], Some(&item("c", &[("gtin", "1"), ("sku", "c")])), None);
        assert_eq!(listed(&index, "gtin", "1", |_| true), ["a"]);
        assert!(index.shared.is_empty());
        index.update(&ids[0], Some(&item("a", &[("gtin", "1"), ("sku", "a")])), None);
        assert!(listed(&index, "gtin", "1", |_| true).is_empty());
        assert_eq!(listed(&index, "sku", "b", |_| true), ["b"]);
        assert_eq!((index.by_identifier.len(), index.shared.len(), index.len()), (1, 0, 1));
    }

    #[test]
    fn a_candidate_without_the_identifier_is_never_listed() {
        // Two identifiers with one hash share candidates; the listing keeps
        // only the items that hold the identifier asked for.
        let mut index = ItemIndex::default();
        for id in ["a", "b", "c"] {
            index.update(&Arc::from(id), None, Some(&item(id, &[("gtin", "1")])));
        }
        assert_eq!(listed(&index, "gtin", "1", |dfid| dfid != "b"), ["a", "c"]);
        let filter = ItemFilter { status: None, identifier: Some(("gtin".into(), "1".into())) };
        let (page, more) = index.page(&filter, None, 1, |dfid| dfid != "a");
        assert_eq!((page.iter().map(|id| id.to_string()).collect::<Vec<_>>(), more), (vec!["b".to_owned()], true));
    }

    #[test]
    fn ranked_ids_order_as_their_text_does() {
        // Ids near the edges of the classes: prefixes of `DFID-`, ids just
        // below and above it, bytes that sort first and last, padding.
        let mut ids: Vec<String> =
            ["", "D", "DFID", "DFID-", "DFID-\0", "DFID-\0\0", "DFID,", "DFID.", "DFIC~", "DFIE"]
                .into_iter()
                .map(str::to_owned)
                .collect();
        // Pseudo-random ids over an alphabet that makes long common
        // prefixes and ties of the first bytes likely.
        let alphabet = ['D', 'F', 'I', '-', '\0', '0', '9', 'a', 'f', '\u{7f}', 'é'];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..3000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let prefix = if state.is_multiple_of(3) { "DFID-" } else { "" };
            let len = (state >> 8) as usize % 14;
            let text: String =
                (0..len).map(|i| alphabet[(state >> (12 + 4 * (i % 12))) as usize % alphabet.len()]).collect();
            ids.push(format!("{prefix}{text}"));
        }
        ids.push(new_dfid_like(1));
        ids.push(new_dfid_like(2));
        for a in &ids {
            for b in ids.iter().step_by(7) {
                let (ra, rb) = (Ranked::new(&Arc::from(a.as_str())), Ranked::new(&Arc::from(b.as_str())));
                assert_eq!(ra.cmp(&rb), a.cmp(b), "{a:?} against {b:?}");
                if a < b {
                    assert!(ra.rank <= rb.rank, "{a:?} < {b:?} but ranked above it");
                }
            }
        }
    }

    fn new_dfid_like(n: u64) -> String {
        format!("DFID-{:032x}", u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
    }

    #[test]
    fn items_in_no_order_are_listed_in_dfid_order() {
        let mut index = ItemIndex::default();
        let mut dfids: Vec<String> = (0..500).map(new_dfid_like).collect();
        dfids
            .extend(["DFID-", "DFID-0", "DFIC-9", "d001", "DFID-00000000000000000000000000000000x"].map(str::to_owned));
        for dfid in &dfids {
            index.update(&Arc::from(dfid.as_str()), None, Some(&item(dfid, &[])));
        }
        dfids.sort();
        let filter = ItemFilter { status: Some(ItemStatus::Active), identifier: None };
        let (first, more) = index.page(&filter, None, 200, |_| true);
        assert!(more);
        let (rest, more) = index.page(&filter, Some(&first[199]), 400, |_| true);
        assert!(!more);
        let listed: Vec<String> = first.iter().chain(&rest).map(|id| id.to_string()).collect();
        assert_eq!(listed, dfids);
        let all = ItemFilter { status: None, identifier: None };
        assert_eq!(index.page(&all, Some("DFID-0"), 3, |_| true).0, index.page(&filter, Some("DFID-0"), 3, |_| true).0);
    }

    /// Two indexes given the same changes: `direct` indexes each item at
    /// once, `loaded` is the one tests put into hydration's loading (with
    /// `reserve`); `items` holds every live item, to tell which holds an
    /// identifier.
    #[derive(Default)]
    struct Twins {
        direct: ItemIndex,
        loaded: ItemIndex,
        items: HashMap<String, Item>,
    }

    impl Twins {
        /// Item `id` becomes `new` (`None`: deleted, or a tombstone row).
        fn apply(&mut self, id: &str, new: Option<Item>) {
            let (id, old): (Arc<str>, _) = (Arc::from(id), self.items.remove(id));
            self.direct.update(&id, old.as_ref(), new.as_ref());
            self.loaded.update(&id, old.as_ref(), new.as_ref());
            if let Some(new) = new {
                self.items.insert(id.to_string(), new);
            }
        }

        /// Every listing of `index` by status (any, active, merged), by
        /// each of `identifiers` (and by none), after each of `cursors`;
        /// and the number of items.
        fn listings(
            &self,
            index: &ItemIndex,
            identifiers: &[(&str, &str)],
            cursors: &[Option<&str>],
            limit: usize,
        ) -> (Vec<(Vec<String>, bool)>, usize) {
            let mut pages = Vec::new();
            for status in [None, Some(ItemStatus::Active), Some(ItemStatus::Merged)] {
                for identifier in std::iter::once(None).chain(identifiers.iter().map(Some)) {
                    for after in cursors {
                        let identifier = identifier.map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
                        let filter = ItemFilter { status, identifier };
                        let has = |dfid: &str| {
                            let (key, value) = filter.identifier.as_ref().expect("asked with an identifier");
                            self.items[dfid].identifiers.iter().any(|i| &*i.key == key && &*i.value == value)
                        };
                        let (page, more) = index.page(&filter, *after, limit, has);
                        pages.push((page.iter().map(|id| id.to_string()).collect(), more));
                    }
                }
            }
            (pages, index.len())
        }

        /// The listings of `direct`, after checking that `loaded` gives
        /// the same.
        fn agreed(
            &self,
            identifiers: &[(&str, &str)],
            cursors: &[Option<&str>],
            limit: usize,
        ) -> (Vec<(Vec<String>, bool)>, usize) {
            let direct = self.listings(&self.direct, identifiers, cursors, limit);
            assert_eq!(self.listings(&self.loaded, identifiers, cursors, limit), direct);
            direct
        }

        fn hydrated(&mut self) {
            self.direct.hydrated();
            self.loaded.hydrated();
        }
    }

    #[test]
    fn items_loaded_by_hydration_are_listed_as_items_inserted_one_at_a_time() {
        // `loaded` gathers new ids while hydration loads (after `reserve`)
        // and builds its sets at the end; `direct` inserts each id at once.
        let mut twins = Twins::default();
        twins.loaded.reserve(320);
        let item_n = |n: usize| {
            let gtin = (n % 50).to_string();
            let mut it = item(&format!("d{n:03}"), &[("sku", &n.to_string()), ("gtin", &gtin)]);
            if n.is_multiple_of(3) {
                it.status = ItemStatus::Merged;
            }
            if n == 7 || n == 320 {
                // An identifier listed twice: in the ids the index is
                // filled with at once, and in those added one at a time.
                it.identifiers.push(it.identifiers[0].clone());
            }
            it
        };
        let identifiers = [("gtin", "7"), ("sku", "102"), ("sku", "105"), ("sku", "x105"), ("sku", "320")];
        let cursors = [None, Some("d100"), Some("d2")];
        for n in (0..300).map(|n| (n * 7) % 300) {
            twins.apply(&format!("d{n:03}"), Some(item_n(n)));
        }
        assert_eq!(twins.loaded.loading.as_ref().map(Loading::len), Some(300), "new ids wait for the end of hydration");
        twins.agreed(&identifiers, &cursors, 40);
        // A loaded item changes status, another an identifier, another
        // goes, and more arrive.
        let mut active = item_n(102);
        active.status = ItemStatus::Active;
        twins.apply("d102", Some(active));
        assert!(twins.loaded.loading.as_ref().is_some_and(|l| l.len() == 0 && l.identifiers.is_empty()));
        let mut renamed = item_n(105);
        renamed.identifiers[0].value = "x105".into();
        twins.apply("d105", Some(renamed));
        twins.apply("d101", None);
        for n in (300..321).rev() {
            twins.apply(&format!("d{n:03}"), Some(item_n(n)));
        }
        let (pages, len) = twins.agreed(&identifiers, &cursors, 40);
        assert_eq!(len, 320);
        assert!(pages.iter().all(|(page, _)| !page.contains(&"d101".to_owned())));
        twins.hydrated();
        assert!(twins.loaded.loading.is_none());
        let entries = |index: &ItemIndex| {
            let mut shared: Vec<(u64, Vec<String>)> =
                index.shared.iter().map(|(h, ids)| (*h, ids.iter().map(|id| id.to_string()).collect())).collect();
            let mut single: Vec<(u64, String)> =
                index.by_identifier.iter().map(|(h, id)| (*h, id.to_string())).collect();
            shared.sort();
            single.sort();
            (shared, single)
        };
        // Hashes differ between the two (a seed each); the shapes agree.
        let (shared, single) = entries(&twins.loaded);
        let (direct_shared, direct_single) = entries(&twins.direct);
        assert_eq!((shared.len(), single.len()), (direct_shared.len(), direct_single.len()));
        assert_eq!((shared.len(), single.len()), (50, 320), "gtins shared by six or seven, one sku each");
        assert_eq!(twins.agreed(&identifiers, &cursors, 40), (pages, len));
    }

    #[test]
    fn a_second_hydration_gathers_new_items_until_its_end_whatever_else_changes() {
        // A standby hydrating again over a full index: new items are
        // gathered; tombstones, and changes of items already indexed, do
        // not make it index what it gathered before the end.
        let mut twins = Twins::default();
        let item_n = |n: usize| {
            let mut it = item(&format!("d{n:03}"), &[("sku", &n.to_string()), ("gtin", &(n % 10).to_string())]);
            if n.is_multiple_of(3) {
                it.status = ItemStatus::Merged;
            }
            it
        };
        twins.loaded.reserve(200);
        for n in (0..200).rev() {
            twins.apply(&format!("d{n:03}"), Some(item_n(n)));
        }
        twins.loaded.hydrated();
        twins.loaded.reserve(200);
        for n in 200..210 {
            twins.apply(&format!("d{n:03}"), Some(item_n(n)));
        }
        twins.apply("gone", None); // a tombstone row
        let mut changed = item_n(50);
        changed.status = ItemStatus::Merged;
        changed.identifiers[0].value = "x50".into();
        twins.apply("d050", Some(changed));
        twins.apply("d051", None);
        let gathered = twins.loaded.loading.as_ref().map(|l| (l.len(), l.identifiers.len()));
        assert_eq!(gathered, Some((10, 20)), "nothing indexed before the end");
        let identifiers = [("gtin", "3"), ("sku", "x50"), ("sku", "205")];
        twins.agreed(&identifiers, &[Some("d040")], 30);
        twins.loaded.hydrated();
        twins.agreed(&identifiers, &[Some("d040")], 30);
        assert_eq!(twins.loaded.len(), 209);
    }

    #[test]
    fn many_loaded_items_are_indexed_on_two_threads_as_one_at_a_time() {
        let mut twins = Twins::default();
        let count = PARALLEL_BUILD / 2 + 100; // two identifiers each
        twins.loaded.reserve(count);
        for n in (0..count).map(|n| (n * 7919) % count) {
            let mut it = item(&new_dfid_like(n as u64), &[("sku", &n.to_string()), ("gtin", &(n % 1000).to_string())]);
            if n.is_multiple_of(4) {
                it.status = ItemStatus::Merged;
            }
            twins.apply(&it.dfid.clone(), Some(it));
        }
        twins.hydrated();
        twins.agreed(&[("gtin", "12"), ("sku", "4321")], &[Some("DFID-8")], 500);
        let loaded = &twins.loaded;
        assert_eq!((loaded.len(), loaded.shared.len(), loaded.by_identifier.len()), (count, 1000, count));
    }

    #[test]
    fn compacting_after_hydration_keeps_every_listing() {
        let mut index = ItemIndex::default();
        index.reserve(300);
        // Out of order, as rows come from a table, some merged.
        for n in (0..300).map(|n| (n * 7) % 300) {
            let mut it = item(&format!("d{n:03}"), &[("sku", &n.to_string())]);
            if n % 3 == 0 {
                it.status = ItemStatus::Merged;
            }
            index.update(&it.dfid.clone(), None, Some(&it));
        }
        let pages = |index: &ItemIndex| {
            [None, Some(ItemStatus::Active), Some(ItemStatus::Merged)].map(|status| {
                let filter = ItemFilter { status, identifier: None };
                let (first, more) = index.page(&filter, Some("d100"), 50, |_| true);
                (first.iter().map(|id| id.to_string()).collect::<Vec<_>>(), more)
            })
        };
        let before = pages(&index);
        let every: Vec<String> = (101..151).map(|n| format!("d{n:03}")).collect();
        assert_eq!(before[0], (every, true), "all statuses merged in DFID order");
        assert_eq!(before[2].0.first().map(String::as_str), Some("d102"));
        index.hydrated();
        assert_eq!(pages(&index), before);
        assert_eq!((index.len(), listed(&index, "sku", "42", |_| true)), (300, vec!["d042".to_owned()]));
    }
}
