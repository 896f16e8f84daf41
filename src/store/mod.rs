//! The store: in-memory entities of several kinds, each with an id and a
//! version, changed only through [`Store::apply`] (rules *Only through the store*
//! to *Tombstones stay* of docs/ARCHITECTURE.md).
//!
//! A change is a closure over a [`ChangeSet`]: it reads what it needs,
//! stages inserts, updates and deletes, and returns. Nothing is visible until
//! it returns `Ok`; then, in the same critical section, room in the outbox is
//! reserved (or the whole change is refused, state untouched), every staged
//! entity gets its next version, and the outbox records it. There is no
//! separate "persist" call to forget.
//!
//! ## Why one lock
//!
//! All kinds live behind one `std::sync::RwLock`. On the 2-core machines this
//! runs on, at most two threads run at once, and a change holds the write
//! lock for well under a microsecond (hash lookups, an `Arc` swap, a channel
//! send), so sharding would buy parallelism the hardware does not have.
//! What one lock buys is worth more: a change set spanning kinds is applied
//! all at once (readers never see half a merge), the outbox's reservation is
//! atomic with the change, and the worker takes a consistent snapshot of a
//! group of entities without lock ordering. Readers share the lock and never
//! wait on the database. Entities are held as `Arc`s, so the worker copies
//! pointers under the lock and serializes outside it. It is a std lock, not
//! a Tokio one, because nothing awaits while holding it.

mod change_set;
mod persist;
pub(crate) mod quarantine;

use std::any::TypeId;
use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use metrics::Counter;

pub use crate::entity::{Entity, Index};
use crate::entity::{ErasedIndex, JsonOnce, KindId, KindInfo, Stored, TypedIndex, downcast};
pub use change_set::ChangeSet;
use change_set::Staged;
pub(crate) use persist::{LoadedMember, LoadedSet, Loading, Unwritten};
use quarantine::QuarantineBook;

use crate::metrics as m;
use crate::outbox::{EntityKey, Ledger, TicketShared, Track, Waiter, push_waiter};
/// What the store hands out: the worker's end of the outbox, a durable
/// change's ticket, the outbox's figures.
pub use crate::outbox::{OutboxReceiver, OutboxSnapshot, Ticket, TicketError};

/// The `Retry-After` hint given when the queue is full: time for the worker
/// to write a few batches.
pub const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An entity and the version it has in the store.
pub struct Versioned<E> {
    /// Strictly increasing per entity, continuing across restarts.
    pub version: u64,
    /// The entity.
    pub value: Arc<E>,
    /// For a version a change set made: its JSON, made at most once and
    /// shared with the worker (see [`Versioned::json`]).
    pub(crate) json: Option<JsonOnce>,
}

impl<E> Versioned<E> {
    /// A version read from the store (no change set made it here).
    pub(crate) fn read(version: u64, value: Arc<E>) -> Self {
        Self { version, value, json: None }
    }
}

impl<E: Entity> Versioned<E> {
    /// The entity's JSON (`serde_json`), for an answer's body. For a version
    /// a change set has just made, it is made once and the worker writes
    /// these same bytes to the table instead of serializing the entity a
    /// second time (a created or changed entity is usually both answered
    /// and written).
    pub fn json(&self) -> Result<Cow<'_, [u8]>, serde_json::Error> {
        let Some(cell) = &self.json else { return serde_json::to_vec(&*self.value).map(Cow::Owned) };
        if let Some(json) = cell.get() {
            return Ok(Cow::Borrowed(json));
        }
        let json = serde_json::to_vec(&*self.value)?;
        Ok(Cow::Borrowed(cell.get_or_init(|| json)))
    }
}

impl<E> Clone for Versioned<E> {
    fn clone(&self) -> Self {
        Self { version: self.version, value: self.value.clone(), json: self.json.clone() }
    }
}

impl<E: fmt::Debug> fmt::Debug for Versioned<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Versioned").field("version", &self.version).field("value", &self.value).finish()
    }
}

impl<E> Deref for Versioned<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.value
    }
}

/// What a [`ChangeSet`] operation can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// `insert` of an id that is live.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// Entity kind.
        kind: &'static str,
        /// Entity id.
        id: String,
    },
    /// `update` or `delete` of an id that is absent or deleted.
    #[error("{kind} {id} not found")]
    NotFound {
        /// Entity kind.
        kind: &'static str,
        /// Entity id.
        id: String,
    },
    /// An update changed the entity's id.
    #[error("{kind} {id}: an update may not change the id (to {new_id})")]
    IdChanged {
        /// Entity kind.
        kind: &'static str,
        /// The id updated.
        id: String,
        /// The id the update produced.
        new_id: String,
    },
}

/// Why a change was refused before it was applied. State is untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The outbox is full (rule *Room first*): retry after the hint.
    #[error("the outbox is full ({capacity} entities pending); retry in {} s", retry_after.as_secs())]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
        /// When a retry is likely to succeed.
        retry_after: Duration,
    },
    /// The store is shutting down and takes no more changes.
    #[error("the store is shutting down and accepts no changes")]
    Closed,
    /// The change set touches more entities than the outbox can ever hold:
    /// retrying cannot help; split it.
    #[error("the change touches {entities} entities; the outbox holds at most {capacity}")]
    TooLarge {
        /// Entities the change set would add to the queue.
        entities: usize,
        /// The queue's capacity.
        capacity: usize,
    },
}

/// The outcome of a change that did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError<E> {
    /// Refused by the outbox; nothing changed.
    #[error(transparent)]
    Refused(Refusal),
    /// The change's own closure failed; nothing changed.
    #[error(transparent)]
    Failed(E),
}

/// An entity as loaded from its table: id, version, value (`None`: a
/// tombstone).
pub(crate) type HydratedRow = (Arc<str>, u64, Option<Arc<dyn Stored>>);

/// One entity's slot: its newest value (`None`: absent or a tombstone) and
/// version, and, only while something of it is unwritten, its persistence
/// state (boxed, so the million settled slots of a hydrated store stay small).
pub(crate) struct Slot {
    pub(crate) value: Option<Arc<dyn Stored>>,
    pub(crate) version: u64,
    pub(crate) track: Option<Box<Track>>,
}

impl Slot {
    /// An entity not seen before.
    pub(crate) fn new() -> Self {
        Self { value: None, version: 0, track: None }
    }

    pub(crate) fn occupies(&self) -> bool {
        self.track.as_ref().is_some_and(|t| t.occupies())
    }
}

/// One kind's entities. Nothing is ever removed from a table (a deleted
/// entity keeps its slot, as a tombstone), so a slot's position names that
/// slot for good: staged changes, outbox records and batch rows carry it,
/// and find their slot again without hashing and comparing the id.
pub(crate) type Table = crate::dense::DenseMap<Arc<str>, Slot>;

/// Everything behind the store's lock.
pub(crate) struct State {
    /// Entities per kind, by id. foldhash: several times faster than
    /// SipHash on short ids, with a per-process random seed against
    /// crafted-collision floods.
    pub(crate) tables: Vec<Table>,
    /// Secondary indexes, per kind.
    pub(crate) indexes: Vec<Vec<Box<dyn ErasedIndex>>>,
    pub(crate) ledger: Ledger,
    pub(crate) closed: bool,
    /// Quarantined change sets: their members are written together with
    /// any later change of one of them, which resolves their dead letters
    /// in the same transaction.
    pub(crate) quarantine: QuarantineBook,
    /// Per kind, which hydration loads into it now: each
    /// [`reserve`](Store::reserve) starts a new one, and only that one's
    /// end tells the indexes that loading is over.
    pub(crate) loading: Vec<u64>,
    /// The staged list of the last change set, emptied, for the next one:
    /// a change set then stages without allocating.
    staged_room: Vec<Staged>,
}

/// The longest staged list kept for the next change set; a larger one (a
/// bulk change) is freed.
const STAGED_ROOM: usize = 64;

impl State {
    /// Keeps `staged`'s room for the next change set (its entries dropped).
    fn recycle(&mut self, mut staged: Vec<Staged>) {
        if staged.capacity() <= STAGED_ROOM {
            staged.clear();
            self.staged_room = staged;
        }
    }
}

pub(crate) struct Shared {
    pub(crate) kinds: Vec<KindInfo>,
    pub(crate) state: RwLock<State>,
    rejected_queue_full: Counter,
}

/// The in-memory state and the only way to change it. Cheap to clone: all
/// clones share one store.
#[derive(Clone)]
pub struct Store {
    pub(crate) shared: Arc<Shared>,
}

/// Declares the kinds a store holds and its outbox capacity.
pub struct StoreBuilder {
    kinds: Vec<KindInfo>,
    indexes: Vec<(KindId, Box<dyn ErasedIndex>)>,
    capacity: usize,
}

impl Default for StoreBuilder {
    fn default() -> Self {
        Self { kinds: Vec::new(), indexes: Vec::new(), capacity: 100_000 }
    }
}

impl StoreBuilder {
    /// Adds a kind.
    ///
    /// # Panics
    /// When the kind, its name or its table was added already: a
    /// programming error, found at start.
    pub fn kind<E: Entity>(mut self) -> Self {
        let info = KindInfo::of::<E>();
        assert!(
            !self.kinds.iter().any(|k| k.type_id == info.type_id || k.name == info.name || k.table == info.table),
            "entity kind {} (table {}) is registered twice",
            info.name,
            info.table
        );
        self.kinds.push(info);
        self
    }

    /// Adds a secondary index over kind `E` (added before), kept in step
    /// with every change. Read it with [`View::index`].
    pub fn index<E: Entity, I: Index<E>>(mut self, index: I) -> Self {
        let kind = kind_id_of::<E>(&self.kinds);
        self.indexes.push((kind, Box::new(TypedIndex { index, kind: std::marker::PhantomData })));
        self
    }

    /// Most distinct entities that may wait to be written (at least 1).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The store, and the receiving end of its outbox for the worker.
    pub fn build(self) -> (Store, OutboxReceiver) {
        let (ledger, receiver) = Ledger::new(self.capacity);
        metrics::gauge!(m::QUEUE_CAPACITY).set(self.capacity as f64);
        let tables: Vec<Table> = self.kinds.iter().map(|_| Table::default()).collect();
        let mut indexes: Vec<Vec<Box<dyn ErasedIndex>>> = self.kinds.iter().map(|_| Vec::new()).collect();
        for (kind, index) in self.indexes {
            indexes[kind].push(index);
        }
        let shared = Shared {
            kinds: self.kinds,
            state: RwLock::new(State {
                loading: vec![0; tables.len()],
                tables,
                indexes,
                ledger,
                closed: false,
                quarantine: QuarantineBook::default(),
                staged_room: Vec::new(),
            }),
            rejected_queue_full: metrics::counter!(m::REJECTED_TOTAL, "reason" => "queue_full"),
        };
        shared.rejected_queue_full.increment(0);
        (Store { shared: Arc::new(shared) }, receiver)
    }
}

fn kind_id_of<E: Entity>(kinds: &[KindInfo]) -> KindId {
    let type_id = TypeId::of::<E>();
    kinds
        .iter()
        .position(|k| k.type_id == type_id)
        .unwrap_or_else(|| panic!("entity kind {} is not registered with this store (StoreBuilder::kind)", E::KIND))
}

impl Store {
    /// Starts declaring a store.
    pub fn builder() -> StoreBuilder {
        StoreBuilder::default()
    }

    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn kinds(&self) -> &[KindInfo] {
        &self.shared.kinds
    }

    /// Applies a change: `change` stages inserts, updates and deletes on the
    /// [`ChangeSet`]; if it returns `Ok`, all of them apply at once and are
    /// recorded in the outbox, else nothing does. Refused when the outbox is
    /// full or the store is closed, with state untouched.
    ///
    /// `change` runs under the store's write lock: keep it short and never
    /// block or await in it (validate input before calling).
    pub fn apply<T, E>(&self, change: impl FnOnce(&mut ChangeSet<'_>) -> Result<T, E>) -> Result<T, ApplyError<E>> {
        self.apply_inner(false, change).map(|(value, _)| value)
    }

    /// [`apply`](Self::apply), also handing back a [`Ticket`] that resolves
    /// when every entity of the change set is committed (rule *Durable means
    /// committed*).
    pub fn apply_durable<T, E>(
        &self,
        change: impl FnOnce(&mut ChangeSet<'_>) -> Result<T, E>,
    ) -> Result<(T, Ticket), ApplyError<E>> {
        self.apply_inner(true, change).map(|(value, ticket)| (value, ticket.unwrap_or_else(Ticket::done)))
    }

    fn apply_inner<T, E>(
        &self,
        want_ticket: bool,
        change: impl FnOnce(&mut ChangeSet<'_>) -> Result<T, E>,
    ) -> Result<(T, Option<Ticket>), ApplyError<E>> {
        let kinds = &self.shared.kinds;
        let mut guard = self.write_state();
        if guard.closed {
            return Err(ApplyError::Refused(Refusal::Closed));
        }
        let room = std::mem::take(&mut guard.staged_room);
        let mut set = ChangeSet::new(kinds, &guard, room);
        let outcome = change(&mut set);
        let ChangeSet { staged, watched, resolution, .. } = set;
        let value = match outcome {
            Ok(value) => value,
            Err(error) => {
                guard.recycle(staged);
                return Err(ApplyError::Failed(error));
            }
        };
        if staged.is_empty() {
            guard.recycle(staged);
            let ticket = want_ticket.then(|| watch_only(&mut guard, &watched));
            return Ok((value, ticket));
        }
        let state = &mut *guard;

        // A quarantined set stays whole: changing one of its members writes
        // the current state of all of them with this change set.
        let siblings = quarantined_siblings(state, &staged);
        if let Err(refusal) = self.reserve_room(state, &staged, &siblings) {
            state.recycle(staged);
            return Err(ApplyError::Refused(refusal));
        }

        // Read when a pending mark starts (a change that coalesces needs no
        // time), once per change set.
        let now = std::cell::OnceCell::new();
        let (watched, watched_failure) =
            if want_ticket { watch_targets(state, watched, &staged, &siblings) } else { (Vec::new(), None) };
        let ticket = want_ticket.then(|| TicketShared::new(staged.len() + watched.len()));
        for s in &staged {
            apply_staged(state, &kinds[s.kind], s, &now, ticket.as_ref().map(|(shared, _)| shared));
        }
        for key in &siblings {
            mark_pending(state, key, *now.get_or_init(Instant::now));
        }
        if let Some(resolution) = resolution {
            for s in &staged {
                state.quarantine.resolve_as(&(s.kind, s.id.clone()), resolution);
            }
        }
        if staged.len() + siblings.len() > 1 {
            let mut members: Vec<EntityKey> = staged.iter().map(|s| (s.kind, s.id.clone())).collect();
            members.extend(siblings);
            group(state, &members);
        }
        if let Some((shared, _)) = &ticket {
            add_waiters(state, watched, shared);
            if let Some(error) = watched_failure {
                shared.fail(error);
            }
        }
        state.recycle(staged);
        Ok((value, ticket.map(|(_, ticket)| ticket)))
    }

    /// Reserves room for every entity the change set makes occupy the
    /// queue (rule *Room first*), or refuses it, changing nothing. Staged
    /// under this same lock, so `occupied` is still true.
    fn reserve_room(&self, state: &State, staged: &[Staged], siblings: &[EntityKey]) -> Result<(), Refusal> {
        let newly_occupying = staged.iter().filter(|s| !s.occupied).count()
            + siblings.iter().filter(|(kind, id)| !state.tables[*kind].get(id).is_some_and(Slot::occupies)).count();
        if newly_occupying > state.ledger.capacity {
            return Err(Refusal::TooLarge { entities: newly_occupying, capacity: state.ledger.capacity });
        }
        if state.ledger.depth + newly_occupying > state.ledger.capacity {
            self.shared.rejected_queue_full.increment(1);
            return Err(Refusal::QueueFull { capacity: state.ledger.capacity, retry_after: QUEUE_FULL_RETRY_AFTER });
        }
        Ok(())
    }

    /// The newest value of one entity, if it is live.
    pub fn get<E: Entity>(&self, id: &str) -> Option<Versioned<E>> {
        self.read(|view| view.get::<E>(id))
    }

    /// Reads several entities consistently: no change applies while `read`
    /// runs. Keep it short; it holds the store's read lock.
    pub fn read<R>(&self, read: impl FnOnce(&View<'_>) -> R) -> R {
        let guard = self.read_state();
        read(&View { kinds: &self.shared.kinds, state: &guard })
    }

    /// Depth, capacity and lag of the outbox now.
    pub fn outbox(&self) -> OutboxSnapshot {
        OutboxSnapshot::of(&self.read_state().ledger)
    }

    /// Stops taking changes: every later [`apply`](Self::apply) is refused
    /// with [`Refusal::Closed`]. Pending changes are still written.
    pub fn close(&self) {
        self.write_state().closed = true;
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.read_state().closed
    }
}

/// Puts one staged entity in its slot: the new value and version, its
/// indexes, a pending mark (or coalescing into the one it has), and the
/// durable caller's claim.
fn apply_staged(
    state: &mut State,
    kind: &KindInfo,
    s: &Staged,
    now: &std::cell::OnceCell<Instant>,
    ticket: Option<&Arc<TicketShared>>,
) {
    let base = state.quarantine.member(s.kind, &s.id).map(|m| m.base);
    let table = &mut state.tables[s.kind];
    let at = s.at.unwrap_or_else(|| table.position_or_insert_with(s.id.clone(), Slot::new));
    let slot = table.at_mut(at).1;
    for index in &mut state.indexes[s.kind] {
        index.update(&s.id, slot.value.as_deref(), s.value.as_deref());
    }
    let previous = slot.version;
    slot.version = s.version;
    slot.value = s.value.clone();
    let track = slot.track.get_or_insert_with(|| state.ledger.track(base.unwrap_or(previous)));
    if !track.occupies() {
        state.ledger.depth += 1;
    }
    // The cell of the version now pending (none for a tombstone or an
    // operator's change): an older version's JSON must not be written.
    track.json = s.json.clone();
    if track.pending.is_none() {
        track.pending = Some(state.ledger.mark(s.kind, at, *now.get_or_init(Instant::now)));
    } else {
        kind.coalesced.increment(1);
    }
    kind.mutations.increment(1);
    if let Some(shared) = ticket {
        push_waiter(&mut track.waiters, Waiter::new(s.version, shared));
    }
}

/// An entity and the version of it a ticket waits for.
type Target = (KindId, Arc<str>, u64);

/// Of the entities a durable change set watched without writing them: the
/// versions its ticket waits for, and the error it fails with if one of
/// them is quarantined.
fn watch_targets(
    state: &State,
    watched: Vec<EntityKey>,
    staged: &[Staged],
    siblings: &[EntityKey],
) -> (Vec<Target>, Option<crate::outbox::TicketError>) {
    let mut targets = Vec::new();
    let mut failure = None;
    for key in watched {
        if staged.iter().any(|s| s.kind == key.0 && s.id == key.1) || siblings.contains(&key) {
            continue;
        }
        match watch_target(state, &key) {
            Watch::Wait(version) => targets.push((key.0, key.1, version)),
            Watch::Durable => {}
            Watch::Failed(error) => failure = Some(error),
        }
    }
    (targets, failure)
}

/// What a durable caller watching an entity it did not change waits for.
enum Watch {
    /// Nothing of it is unwritten.
    Durable,
    /// This version of it is still to be committed.
    Wait(u64),
    /// It is quarantined: its state is not durable.
    Failed(crate::outbox::TicketError),
}

fn watch_target(state: &State, key: &EntityKey) -> Watch {
    let Some(slot) = state.tables[key.0].get(&key.1) else { return Watch::Durable };
    if slot.occupies() {
        return Watch::Wait(slot.version);
    }
    match state.quarantine.set_of(key.0, &key.1) {
        Some(set) => Watch::Failed(set.error.clone()),
        None => Watch::Durable,
    }
}

/// A ticket for a change set that changed nothing but asked to wait for
/// the entities it read (`ChangeSet::watch`): it resolves once their current
/// versions are committed (at once when none is pending), and fails if one
/// of them is quarantined.
fn watch_only(state: &mut State, watched: &[EntityKey]) -> Ticket {
    let mut targets = Vec::new();
    for key in watched {
        match watch_target(state, key) {
            Watch::Durable => {}
            Watch::Wait(version) => targets.push((key.0, key.1.clone(), version)),
            Watch::Failed(error) => return Ticket::failed(error),
        }
    }
    if targets.is_empty() {
        return Ticket::done();
    }
    let (shared, ticket) = TicketShared::new(targets.len());
    add_waiters(state, targets, &shared);
    ticket
}

/// Makes `ticket` wait for each entity's version (they all occupy the
/// queue, so a commit will reach them).
fn add_waiters(state: &mut State, targets: Vec<(KindId, Arc<str>, u64)>, ticket: &Arc<TicketShared>) {
    for (kind, id, version) in targets {
        if let Some(track) = state.tables[kind].get_mut(&id).and_then(|s| s.track.as_mut()) {
            push_waiter(&mut track.waiters, Waiter::new(version, ticket));
        }
    }
}

/// The members of the quarantined sets that `staged` touches, other than
/// the staged entities themselves.
fn quarantined_siblings(state: &State, staged: &[Staged]) -> Vec<EntityKey> {
    let mut sets = Vec::new();
    for s in staged {
        if let Some(member) = state.quarantine.member(s.kind, &s.id)
            && !sets.contains(&member.set)
        {
            sets.push(member.set);
        }
    }
    let mut siblings = Vec::new();
    for set in sets {
        for key in state.quarantine.set(set).map(|s| s.members.as_slice()).unwrap_or_default() {
            if !staged.iter().any(|s| s.kind == key.0 && s.id == key.1) && !siblings.contains(key) {
                siblings.push(key.clone());
            }
        }
    }
    siblings
}

/// Gives an entity a pending mark (it must be written again) without
/// changing it: members of a quarantined set written with a change of
/// another member. Counts it in the queue's depth if it did not occupy it.
pub(crate) fn mark_pending(state: &mut State, (kind, id): &EntityKey, now: Instant) {
    let base = state.quarantine.member(*kind, id).map(|m| m.base);
    let table = &mut state.tables[*kind];
    let Some(at) = table.position(id) else { return };
    let slot = table.at_mut(at).1;
    let version = slot.version;
    let track = slot.track.get_or_insert_with(|| state.ledger.track(base.unwrap_or(version)));
    if !track.occupies() {
        state.ledger.depth += 1;
    }
    if track.pending.is_none() {
        track.pending = Some(state.ledger.mark(*kind, at, now));
    }
}

/// Puts the pending marks of `members` (changed together) into one group,
/// merging the groups they were in.
pub(crate) fn group(state: &mut State, members: &[EntityKey]) {
    let group_of = |state: &State, (kind, id): &EntityKey| {
        state.tables[*kind].get(id).and_then(|s| s.track.as_ref()).and_then(|t| t.pending).and_then(|p| p.group)
    };
    let target = members
        .iter()
        .filter_map(|m| group_of(state, m))
        .max_by_key(|g| state.ledger.groups.get(g).map_or(0, Vec::len))
        .unwrap_or_else(|| state.ledger.new_group());
    let mut joining: Vec<EntityKey> = Vec::new();
    for member in members {
        match group_of(state, member) {
            Some(g) if g == target => {}
            Some(g) => joining.extend(state.ledger.groups.remove(&g).unwrap_or_default()),
            None => joining.push(member.clone()),
        }
    }
    for (kind, id) in &joining {
        if let Some(pending) =
            state.tables[*kind].get_mut(id).and_then(|s| s.track.as_mut()).and_then(|t| t.pending.as_mut())
        {
            pending.group = Some(target);
        }
    }
    state.ledger.groups.entry(target).or_default().extend(joining);
}

/// A consistent, read-only view of the store.
pub struct View<'a> {
    pub(crate) kinds: &'a [KindInfo],
    pub(crate) state: &'a State,
}

impl View<'_> {
    /// The live entity `id`.
    pub fn get<E: Entity>(&self, id: &str) -> Option<Versioned<E>> {
        let slot = self.state.tables[kind_id_of::<E>(self.kinds)].get(id)?;
        Some(Versioned::read(slot.version, downcast::<E>(slot.value.as_ref()?)))
    }

    /// The version of `id`, tombstones included (0 when never seen).
    pub fn version<E: Entity>(&self, id: &str) -> u64 {
        self.state.tables[kind_id_of::<E>(self.kinds)].get(id).map_or(0, |slot| slot.version)
    }

    /// Every live entity of a kind, in no particular order.
    pub fn iter<E: Entity>(&self) -> impl Iterator<Item = Versioned<E>> + '_ {
        self.state.tables[kind_id_of::<E>(self.kinds)]
            .values()
            .filter_map(|slot| Some(Versioned::read(slot.version, downcast::<E>(slot.value.as_ref()?))))
    }

    /// Every entity of a kind with its version, tombstones as `None`.
    pub fn entries<E: Entity>(&self) -> impl Iterator<Item = (&str, u64, Option<Arc<E>>)> + '_ {
        self.state.tables[kind_id_of::<E>(self.kinds)]
            .iter()
            .map(|(id, slot)| (&**id, slot.version, slot.value.as_ref().map(downcast::<E>)))
    }

    /// The index of type `I` added with [`StoreBuilder::index`].
    ///
    /// # Panics
    /// When no such index was added: a programming error.
    pub fn index<I: 'static>(&self) -> &I {
        self.state
            .indexes
            .iter()
            .flatten()
            .find_map(|index| index.as_any().downcast_ref::<I>())
            .unwrap_or_else(|| panic!("index {} is not registered with this store", std::any::type_name::<I>()))
    }

    /// Number of live entities of a kind.
    pub fn count<E: Entity>(&self) -> usize {
        self.state.tables[kind_id_of::<E>(self.kinds)].values().filter(|s| s.value.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::{ApplyError, STAGED_ROOM, Store, StoreError};
    use crate::store::Entity;

    /// The entity of the store's unit tests.
    #[derive(Clone, Serialize, Deserialize)]
    pub(crate) struct Doc {
        pub(crate) id: String,
        pub(crate) n: u64,
    }

    impl Entity for Doc {
        const KIND: &'static str = "doc";
        const TABLE: &'static str = "docs";
        fn id(&self) -> &str {
            &self.id
        }
    }

    fn doc(id: &str) -> Doc {
        Doc { id: id.into(), n: 0 }
    }

    /// Each change set stages into the list the one before it left: what a
    /// failed or refused change set staged is gone from it, so the next
    /// applies only its own changes; a bulk change's list is not kept.
    #[test]
    fn a_change_set_stages_into_the_emptied_list_of_the_one_before() {
        let (store, receiver) = Store::builder().kind::<Doc>().capacity(3).build();
        store.apply(|set| set.insert(doc("a"))).unwrap();
        let failed = store.apply(|set| -> Result<(), StoreError> {
            set.insert(doc("b"))?;
            set.update::<Doc>("absent", |d| d.n = 1)?;
            Ok(())
        });
        assert!(matches!(failed, Err(ApplyError::Failed(StoreError::NotFound { .. }))));
        let refused = store.apply(|set| -> Result<(), StoreError> {
            for id in ["c", "d", "e"] {
                set.insert(doc(id))?;
            }
            Ok(())
        });
        assert!(matches!(refused, Err(ApplyError::Refused(_))), "three more do not fit beside a");
        assert!(store.read_state().staged_room.capacity() > 0, "the list is kept for the next change set");

        let changed = store.apply(|set| set.update::<Doc>("a", |d| d.n = 7)).unwrap();
        assert_eq!((changed.version, changed.n), (2, 7));
        for id in ["b", "c", "d", "e"] {
            assert!(store.get::<Doc>(id).is_none(), "{id} was staged by a change set that did not apply");
        }
        let mut backlog = std::collections::VecDeque::new();
        let (batch, _) = store.take_batch(&receiver, &mut backlog, 10);
        let written: Vec<&str> = batch.rows.iter().map(|row| &*row.id).collect();
        assert_eq!(written, ["a"]);
        store.commit(&batch, &[]);

        let (store, _receiver) = Store::builder().kind::<Doc>().capacity(1_000).build();
        store
            .apply(|set| -> Result<(), StoreError> {
                for n in 0..=STAGED_ROOM {
                    set.insert(doc(&n.to_string()))?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(store.read_state().staged_room.capacity(), 0, "a bulk change's list is freed");
    }
}
