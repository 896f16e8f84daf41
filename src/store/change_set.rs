//! [`ChangeSet`]: the changes of one [`Store::apply`](super::Store::apply),
//! staged until its closure returns. Reads through it see its own staged
//! changes.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Slot, State, StoreError, Versioned, View, kind_id_of};
use crate::entity::{JsonOnce, KindId, KindInfo, Stored, downcast};
use crate::outbox::{EntityKey, Resolution};
use crate::store::Entity;

/// Change sets larger than this index their staged entities in a map
/// instead of scanning them.
const STAGED_SCAN_LIMIT: usize = 16;

pub(super) struct Staged {
    pub(super) kind: KindId,
    pub(super) id: Arc<str>,
    pub(super) value: Option<Arc<dyn Stored>>,
    pub(super) version: u64,
    /// The entity's slot in its table, if it has one yet.
    pub(super) at: Option<usize>,
    /// The staged value's JSON, once made (shared with the caller's
    /// [`Versioned`]).
    pub(super) json: Option<JsonOnce>,
    /// The entity occupied the queue when staged.
    pub(super) occupied: bool,
}

/// Where a change set finds an entity.
#[derive(Clone, Copy)]
enum Found {
    /// Staged by the change set, at this position of its list.
    Staged(usize),
    /// In its table, at this slot.
    Table(usize),
    /// Neither: never seen.
    Absent,
}

/// The changes of one [`Store::apply`](super::Store::apply), staged until
/// its closure returns. Reads through it see its own staged changes.
pub struct ChangeSet<'a> {
    pub(super) kinds: &'a [KindInfo],
    pub(super) state: &'a State,
    pub(super) staged: Vec<Staged>,
    /// Positions in `staged`, used once it outgrows a linear scan.
    index: HashMap<(KindId, Arc<str>), usize>,
    /// Entities read but not changed whose durability a ticket waits for.
    pub(super) watched: Vec<EntityKey>,
    /// Set by an operator's replay or discard: how the dead letters of the
    /// quarantined sets this change set touches are resolved.
    pub(super) resolution: Option<Resolution>,
}

impl<'a> ChangeSet<'a> {
    /// A change set over `state` that stages into `room` (empty).
    pub(super) fn new(kinds: &'a [KindInfo], state: &'a State, room: Vec<Staged>) -> Self {
        debug_assert!(room.is_empty(), "a change set starts with nothing staged");
        Self { kinds, state, staged: room, index: HashMap::new(), watched: Vec::new(), resolution: None }
    }

    fn staged_position(&self, kind: KindId, id: &str) -> Option<usize> {
        if self.staged.len() <= STAGED_SCAN_LIMIT {
            self.staged.iter().position(|s| s.kind == kind && &*s.id == id)
        } else {
            self.index.get(&(kind, Arc::from(id))).copied()
        }
    }

    /// Where the entity is: staged by this change set, in its table, or
    /// neither. What it finds stays right until the entity is staged.
    fn find(&self, kind: KindId, id: &str) -> Found {
        if let Some(position) = self.staged_position(kind, id) {
            return Found::Staged(position);
        }
        self.state.tables[kind].position(id).map_or(Found::Absent, Found::Table)
    }

    /// The current value and version of an entity found by
    /// [`find`](Self::find), staged changes included.
    fn current_found(&self, kind: KindId, found: Found) -> (Option<&Arc<dyn Stored>>, u64) {
        match found {
            Found::Staged(position) => {
                let staged = &self.staged[position];
                (staged.value.as_ref(), staged.version)
            }
            Found::Table(at) => {
                let slot = self.state.tables[kind].at(at).1;
                (slot.value.as_ref(), slot.version)
            }
            Found::Absent => (None, 0),
        }
    }

    /// The entity's current value and version, staged changes included.
    fn current(&self, kind: KindId, id: &str) -> (Option<&Arc<dyn Stored>>, u64) {
        self.current_found(kind, self.find(kind, id))
    }

    /// Stages a new value (or a tombstone) of the entity `found` by
    /// [`find`](Self::find) and returns the version it gets: one more than
    /// the version before this change set (at least `at_least`), however
    /// often the change set touches it.
    fn stage(
        &mut self,
        kind: KindId,
        id: &str,
        found: Found,
        value: Option<Arc<dyn Stored>>,
        json: Option<JsonOnce>,
        at_least: u64,
    ) -> u64 {
        // Share the table's key when the entity exists, else the entity's
        // own id: no allocation.
        let (id, version, occupied, at) = match found {
            Found::Staged(position) => {
                let staged = &mut self.staged[position];
                staged.value = value;
                staged.json = json;
                staged.version = staged.version.max(at_least);
                return staged.version;
            }
            Found::Table(at) => {
                let (key, slot) = self.state.tables[kind].at(at);
                (key.clone(), slot.version + 1, slot.occupies(), Some(at))
            }
            Found::Absent => (value.as_ref().map_or_else(|| Arc::from(id), |v| v.shared_id()), 1, false, None),
        };
        let version = version.max(at_least);
        self.staged.push(Staged { kind, id: id.clone(), value, version, at, json, occupied });
        if self.staged.len() > STAGED_SCAN_LIMIT {
            if self.index.is_empty() {
                self.index = self.staged.iter().enumerate().map(|(i, s)| ((s.kind, s.id.clone()), i)).collect();
            } else {
                self.index.insert((kind, id), self.staged.len() - 1);
            }
        }
        version
    }

    /// The live entity `id`, as this change set would leave it so far.
    pub fn get<E: Entity>(&self, id: &str) -> Option<Versioned<E>> {
        let kind = kind_id_of::<E>(self.kinds);
        match self.current(kind, id) {
            (Some(value), version) => Some(Versioned::read(version, downcast::<E>(value))),
            (None, _) => None,
        }
    }

    /// Whether `id` is live.
    pub fn contains<E: Entity>(&self, id: &str) -> bool {
        self.current(kind_id_of::<E>(self.kinds), id).0.is_some()
    }

    /// Asks a durable caller's ticket to also wait until the current
    /// version of `id` is committed, without changing it: for requests that
    /// turn out to change nothing (an idempotent repeat) but whose answer
    /// shows state that may still be pending. If `id` is quarantined, the
    /// ticket fails with the reason: its state is not durable.
    pub fn watch<E: Entity>(&mut self, id: &str) {
        self.watched.push((kind_id_of::<E>(self.kinds), Arc::from(id)));
    }

    /// A read-only view of the store as it was before this change set.
    pub fn view(&self) -> View<'_> {
        View { kinds: self.kinds, state: self.state }
    }

    /// Creates an entity; refused if its id is live. A deleted id may be
    /// created again: its version continues from the tombstone's.
    pub fn insert<E: Entity>(&mut self, entity: E) -> Result<Versioned<E>, StoreError> {
        let kind = kind_id_of::<E>(self.kinds);
        let found = self.find(kind, entity.id());
        if self.current_found(kind, found).0.is_some() {
            return Err(StoreError::AlreadyExists { kind: E::KIND, id: entity.id().to_owned() });
        }
        Ok(self.put(kind, found, entity))
    }

    /// Creates or replaces an entity.
    pub fn upsert<E: Entity>(&mut self, entity: E) -> Result<Versioned<E>, StoreError> {
        let kind = kind_id_of::<E>(self.kinds);
        let found = self.find(kind, entity.id());
        Ok(self.put(kind, found, entity))
    }

    /// Stages `entity`, `found` by [`find`](Self::find) under its id.
    fn put<E: Entity>(&mut self, kind: KindId, found: Found, entity: E) -> Versioned<E> {
        let value = Arc::new(entity);
        let json = JsonOnce::default();
        let version =
            self.stage(kind, value.id(), found, Some(value.clone() as Arc<dyn Stored>), Some(json.clone()), 0);
        Versioned { version, value, json: Some(json) }
    }

    /// Changes a live entity in place; refused if it is absent or deleted.
    pub fn update<E: Entity>(&mut self, id: &str, change: impl FnOnce(&mut E)) -> Result<Versioned<E>, StoreError> {
        let kind = kind_id_of::<E>(self.kinds);
        let found = self.find(kind, id);
        let Some(current) = self.current_found(kind, found).0 else {
            return Err(StoreError::NotFound { kind: E::KIND, id: id.to_owned() });
        };
        let mut entity = E::clone(&downcast::<E>(current));
        change(&mut entity);
        if entity.id() != id {
            return Err(StoreError::IdChanged { kind: E::KIND, id: id.to_owned(), new_id: entity.id().to_owned() });
        }
        Ok(self.put(kind, found, entity))
    }

    /// Deletes a live entity, leaving a versioned tombstone; refused if it
    /// is absent or already deleted. Returns the tombstone's version.
    pub fn delete<E: Entity>(&mut self, id: &str) -> Result<u64, StoreError> {
        let kind = kind_id_of::<E>(self.kinds);
        let found = self.find(kind, id);
        if self.current_found(kind, found).0.is_none() {
            return Err(StoreError::NotFound { kind: E::KIND, id: id.to_owned() });
        }
        Ok(self.stage(kind, id, found, None, None, 0))
    }

    /// The type-erased current value and version of an entity (operator
    /// actions work across kinds).
    pub(crate) fn current_erased(&self, kind: KindId, id: &str) -> (Option<Arc<dyn Stored>>, u64) {
        let (value, version) = self.current(kind, id);
        (value.cloned(), version)
    }

    /// Stages a type-erased value (`None`: a tombstone) at a version of at
    /// least `at_least`: for operator actions, whose versions continue above
    /// both memory's and the database's.
    pub(crate) fn put_erased(&mut self, kind: KindId, id: &str, value: Option<Arc<dyn Stored>>, at_least: u64) -> u64 {
        let found = self.find(kind, id);
        self.stage(kind, id, found, value, None, at_least)
    }

    /// Whether memory holds the quarantined state of a member of a
    /// quarantined set.
    pub(crate) fn holds_quarantined(&self, kind: KindId, id: &str) -> bool {
        self.state.quarantine.member(kind, &Arc::from(id)).is_some_and(|m| m.holds)
    }

    /// Whether quarantined set `set` is at rest with exactly `members`: it
    /// holds them and no others, and none of them is being written. A later
    /// change of a member writes the set again with that change's other
    /// entities (which then belong to it too), so until that write ends the
    /// set's dead letters list only part of it.
    pub(crate) fn quarantine_at_rest(&self, set: u64, members: &[(KindId, &str)]) -> bool {
        let book = &self.state.quarantine;
        let Some(quarantined) = book.set(set) else { return false };
        quarantined.members.len() == members.len()
            && members.iter().all(|&(kind, id)| {
                book.member(kind, &Arc::from(id)).is_some_and(|m| m.set == set)
                    && !self.state.tables[kind].get(id).is_some_and(Slot::occupies)
            })
    }

    /// The quarantined sets this change set touches are resolved as
    /// `resolution` when it commits.
    pub(crate) fn resolve_as(&mut self, resolution: Resolution) {
        self.resolution = Some(resolution);
    }
}
