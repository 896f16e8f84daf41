//! In-memory indexes of items, kept in step with the store (they are
//! updated in the same critical section as every change): all items in DFID
//! order for stable cursor pagination, items by identifier, and items by
//! status.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use super::model::{Item, ItemStatus};
use crate::store::Index;

/// Items by DFID, identifier and status.
#[derive(Default)]
pub struct ItemIndex {
    all: BTreeSet<Arc<str>>,
    /// Keyed by `key \x1f value` in one allocation (control characters
    /// cannot occur in identifiers). Most identifiers belong to one item: a
    /// one-element set costs 16 bytes instead of a B-tree node's couple of
    /// hundred.
    by_identifier: HashMap<Box<str>, IdSet, foldhash::fast::RandomState>,
    by_status: HashMap<ItemStatus, BTreeSet<Arc<str>>, foldhash::fast::RandomState>,
}

/// A set of DFIDs, in order, small when it holds one.
enum IdSet {
    One(Arc<str>),
    Many(BTreeSet<Arc<str>>),
}

impl IdSet {
    fn insert(&mut self, id: Arc<str>) {
        match self {
            Self::One(only) if *only == id => {}
            Self::One(only) => *self = Self::Many(BTreeSet::from([only.clone(), id])),
            Self::Many(set) => {
                set.insert(id);
            }
        }
    }

    /// Removes `id`; true when the set is now empty.
    fn remove(&mut self, id: &str) -> bool {
        match self {
            Self::One(only) => &**only == id,
            Self::Many(set) => {
                set.remove(id);
                set.is_empty()
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(set) => set.len(),
        }
    }

    fn contains(&self, id: &str) -> bool {
        match self {
            Self::One(only) => &**only == id,
            Self::Many(set) => set.contains(id),
        }
    }

    fn after<'a>(&'a self, lower: Bound<&'a str>) -> Box<dyn Iterator<Item = &'a Arc<str>> + 'a> {
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

impl Index<Item> for ItemIndex {
    fn reserve(&mut self, additional: usize) {
        self.by_identifier.reserve(additional);
    }

    fn update(&mut self, id: &Arc<str>, old: Option<&Item>, new: Option<&Item>) {
        match (old, new) {
            (None, Some(_)) => {
                self.all.insert(id.clone());
            }
            (Some(_), None) => {
                self.all.remove(id);
            }
            _ => {}
        }
        let old_status = old.map(|i| i.status);
        let new_status = new.map(|i| i.status);
        if old_status != new_status {
            if let Some(status) = old_status
                && let Some(set) = self.by_status.get_mut(&status)
            {
                set.remove(id);
            }
            if let Some(status) = new_status {
                self.by_status.entry(status).or_default().insert(id.clone());
            }
        }
        let old_ids = old.map(|i| i.identifiers.as_slice()).unwrap_or_default();
        let new_ids = new.map(|i| i.identifiers.as_slice()).unwrap_or_default();
        if old_ids != new_ids {
            for identifier in old_ids.iter().filter(|i| !new_ids.contains(i)) {
                let key = identifier_key(&identifier.key, &identifier.value);
                if self.by_identifier.get_mut(&key).is_some_and(|set| set.remove(id)) {
                    self.by_identifier.remove(&key);
                }
            }
            for identifier in new_ids.iter().filter(|i| !old_ids.contains(i)) {
                match self.by_identifier.entry(identifier_key(&identifier.key, &identifier.value)) {
                    std::collections::hash_map::Entry::Occupied(mut set) => set.get_mut().insert(id.clone()),
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(IdSet::One(id.clone()));
                    }
                }
            }
        }
    }
}

fn identifier_key(key: &str, value: &str) -> Box<str> {
    let mut joined = String::with_capacity(key.len() + 1 + value.len());
    joined.push_str(key);
    joined.push('\x1f');
    joined.push_str(value);
    joined.into_boxed_str()
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
    /// cursor `after`; and whether more follow.
    pub fn page(&self, filter: &ItemFilter, after: Option<&str>, limit: usize) -> (Vec<Arc<str>>, bool) {
        let lower = match after {
            Some(cursor) => Bound::Excluded(cursor),
            None => Bound::Unbounded,
        };
        let by_status = filter.status.map(|s| self.by_status.get(&s));
        let by_identifier =
            filter.identifier.as_ref().map(|(key, value)| self.by_identifier.get(&identifier_key(key, value)));
        if matches!(by_status, Some(None)) || matches!(by_identifier, Some(None)) {
            return (Vec::new(), false); // a filter that matches nothing
        }
        let (by_status, by_identifier) = (by_status.flatten(), by_identifier.flatten());
        // Walk the smaller candidate set; check the other filter per item.
        let mut matching: Box<dyn Iterator<Item = &Arc<str>>> = match (by_identifier, by_status) {
            (Some(ids), Some(status)) if ids.len() <= status.len() => {
                Box::new(ids.after(lower).filter(|id| status.contains(*id)))
            }
            (Some(ids), Some(status)) => {
                Box::new(status.range::<str, _>((lower, Bound::Unbounded)).filter(|id| ids.contains(id)))
            }
            (Some(ids), None) => ids.after(lower),
            (None, Some(status)) => Box::new(status.range::<str, _>((lower, Bound::Unbounded))),
            (None, None) => Box::new(self.all.range::<str, _>((lower, Bound::Unbounded))),
        };
        let page: Vec<Arc<str>> = matching.by_ref().take(limit).cloned().collect();
        let more = matching.next().is_some();
        (page, more)
    }

    /// Number of live items.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether there are no live items.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}
