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
    by_identifier: HashMap<(String, String), BTreeSet<Arc<str>>>,
    by_status: HashMap<ItemStatus, BTreeSet<Arc<str>>>,
}

impl Index<Item> for ItemIndex {
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
                let key = (identifier.key.clone(), identifier.value.clone());
                if let Some(set) = self.by_identifier.get_mut(&key) {
                    set.remove(id);
                    if set.is_empty() {
                        self.by_identifier.remove(&key);
                    }
                }
            }
            for identifier in new_ids.iter().filter(|i| !old_ids.contains(i)) {
                self.by_identifier
                    .entry((identifier.key.clone(), identifier.value.clone()))
                    .or_default()
                    .insert(id.clone());
            }
        }
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
    /// cursor `after`; and whether more follow.
    pub fn page(&self, filter: &ItemFilter, after: Option<&str>, limit: usize) -> (Vec<Arc<str>>, bool) {
        static EMPTY: BTreeSet<Arc<str>> = BTreeSet::new();
        let by_status = filter.status.map(|s| self.by_status.get(&s).unwrap_or(&EMPTY));
        let by_identifier = filter.identifier.as_ref().map(|k| self.by_identifier.get(k).unwrap_or(&EMPTY));
        // Walk the smallest candidate set; check the other filter per item.
        let (walk, check) = match (by_identifier, by_status) {
            (Some(i), Some(s)) if i.len() <= s.len() => (i, Some(s)),
            (Some(i), Some(s)) => (s, Some(i)),
            (Some(i), None) => (i, None),
            (None, Some(s)) => (s, None),
            (None, None) => (&self.all, None),
        };
        let lower = match after {
            Some(cursor) => Bound::Excluded(cursor),
            None => Bound::Unbounded,
        };
        let mut matching =
            walk.range::<str, _>((lower, Bound::Unbounded)).filter(|id| check.is_none_or(|set| set.contains(*id)));
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
