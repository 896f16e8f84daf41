//! The store: in-memory entities of several kinds, each with an id and a
//! version, changed only through [`Store::apply`] (DESIGN I1–I6).
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

pub(crate) mod kind;

use std::any::TypeId;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use metrics::Counter;

pub use kind::{Entity, Index};
use kind::{ErasedIndex, KindId, KindInfo, Stored, TypedIndex, downcast};

use crate::metrics as m;
use crate::outbox::spill::SpillRecord;
use crate::outbox::{
    Batch, DirtyRecord, EntityKey, Ledger, OutboxReceiver, OutboxSnapshot, Quarantined, Ticket, TicketError,
    TicketShared, Track, Waiter,
};

/// The `Retry-After` hint given when the queue is full: time for the worker
/// to write a few batches.
pub const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Change sets larger than this index their staged entities in a map
/// instead of scanning them.
const STAGED_SCAN_LIMIT: usize = 16;

/// An entity and the version it has in the store.
pub struct Versioned<E> {
    /// Strictly increasing per entity, continuing across restarts.
    pub version: u64,
    /// The entity.
    pub value: Arc<E>,
}

impl<E> Clone for Versioned<E> {
    fn clone(&self) -> Self {
        Self { version: self.version, value: self.value.clone() }
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
    /// The outbox is full (DESIGN I2): retry after the hint.
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
    fn occupies(&self) -> bool {
        self.track.as_ref().is_some_and(|t| t.occupies())
    }
}

/// One kind's entities.
pub(crate) type Table = HashMap<Arc<str>, Slot, foldhash::fast::RandomState>;

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
    /// Entities with an unresolved dead letter: the write of a newer
    /// version resolves it in the same transaction.
    pub(crate) dead_lettered: HashSet<EntityKey>,
}

pub(crate) struct Shared {
    pub(crate) kinds: Vec<KindInfo>,
    pub(crate) state: RwLock<State>,
    rejected_queue_full: Counter,
    health: crate::worker::health::Health,
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
        let tables = self.kinds.iter().map(|_| Table::default()).collect();
        let mut indexes: Vec<Vec<Box<dyn ErasedIndex>>> = self.kinds.iter().map(|_| Vec::new()).collect();
        for (kind, index) in self.indexes {
            indexes[kind].push(index);
        }
        let shared = Shared {
            kinds: self.kinds,
            state: RwLock::new(State { tables, indexes, ledger, closed: false, dead_lettered: HashSet::new() }),
            rejected_queue_full: metrics::counter!(m::REJECTED_TOTAL, "reason" => "queue_full"),
            health: Default::default(),
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
    /// when every entity of the change set is committed (DESIGN I11).
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
        let (value, staged, watched) = {
            let mut set =
                ChangeSet { kinds, state: &guard, staged: Vec::new(), index: HashMap::new(), watched: Vec::new() };
            let value = change(&mut set).map_err(ApplyError::Failed)?;
            (value, set.staged, set.watched)
        };
        if staged.is_empty() {
            let ticket = want_ticket.then(|| watch_only(&mut guard, &watched));
            return Ok((value, ticket));
        }
        let state = &mut *guard;

        // Reserve room (I2) before touching anything.
        // Staged under this same lock, so `occupied` is still true.
        let newly_occupying = staged.iter().filter(|s| !s.occupied).count();
        if newly_occupying > state.ledger.capacity {
            return Err(ApplyError::Refused(Refusal::TooLarge {
                entities: newly_occupying,
                capacity: state.ledger.capacity,
            }));
        }
        if state.ledger.depth + newly_occupying > state.ledger.capacity {
            self.shared.rejected_queue_full.increment(1);
            return Err(ApplyError::Refused(Refusal::QueueFull {
                capacity: state.ledger.capacity,
                retry_after: QUEUE_FULL_RETRY_AFTER,
            }));
        }

        let now = Instant::now();
        // Watched entities the change set does not also change, and that
        // still have something unwritten: the ticket waits for them too.
        let watched = if want_ticket {
            watched
                .into_iter()
                .filter(|(kind, id)| !staged.iter().any(|s| s.kind == *kind && s.id == *id))
                .filter_map(|(kind, id)| {
                    let slot = state.tables[kind].get(&id).filter(|slot| slot.occupies())?;
                    Some((kind, id.clone(), slot.version))
                })
                .collect()
        } else {
            Vec::new()
        };
        let ticket = want_ticket.then(|| TicketShared::new(staged.len() + watched.len()));
        for s in &staged {
            let kind = &kinds[s.kind];
            let slot = state.tables[s.kind].entry(s.id.clone()).or_insert_with(|| Slot {
                value: None,
                version: 0,
                track: None,
            });
            for index in &mut state.indexes[s.kind] {
                index.update(&s.id, slot.value.as_deref(), s.value.as_deref());
            }
            slot.version = s.version;
            slot.value = s.value.clone();
            let track = slot.track.get_or_insert_with(Box::default);
            if !track.occupies() {
                state.ledger.depth += 1;
            }
            if track.pending.is_none() {
                track.pending = Some(state.ledger.mark(s.kind, &s.id, now));
            } else {
                kind.coalesced.increment(1);
            }
            kind.mutations.increment(1);
            if let Some((shared, _)) = &ticket {
                track.waiters.push(Waiter { target: s.version, ticket: shared.clone() });
            }
        }
        if staged.len() > 1 {
            let members: Vec<EntityKey> = staged.iter().map(|s| (s.kind, s.id.clone())).collect();
            group(state, &members);
        }
        if let Some((shared, _)) = &ticket {
            add_waiters(state, watched, shared);
        }
        Ok((value, ticket.map(|(_, ticket)| ticket)))
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

    /// What the worker last saw of the database.
    pub fn health(&self) -> &crate::worker::health::Health {
        &self.shared.health
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

    /// Makes room for `additional` more entities of a kind (before
    /// hydration).
    pub(crate) fn reserve(&self, kind: KindId, additional: usize) {
        let mut guard = self.write_state();
        guard.tables[kind].reserve(additional);
        for index in &mut guard.indexes[kind] {
            index.reserve(additional);
        }
    }

    /// Loads entities read from the database at start-up: no outbox
    /// record, the database already has them. A row never replaces a newer
    /// version already in memory.
    pub(crate) fn hydrate(&self, kind: KindId, rows: Vec<HydratedRow>) {
        let mut guard = self.write_state();
        let state = &mut *guard;
        let table = &mut state.tables[kind];
        for (id, version, value) in rows {
            let slot = table.entry(id.clone()).or_insert_with(|| Slot { value: None, version: 0, track: None });
            if slot.track.is_some() {
                // Hydration precedes every change; an entity changed already
                // keeps its newer, unwritten state.
                tracing::warn!(kind = self.shared.kinds[kind].name, id = %id, "hydrating over an entity changed in memory; memory kept");
                continue;
            }
            if slot.version < version {
                for index in &mut state.indexes[kind] {
                    index.update(&id, slot.value.as_deref(), value.as_deref());
                }
                slot.version = version;
                slot.value = value;
            }
        }
    }

    /// Takes whole groups of pending entities, oldest first, until
    /// `max_rows` rows (a group is never split, so a batch may exceed it by
    /// one group). Records whose group has an entity still being written wait
    /// at the front of `backlog` until that batch finishes.
    pub(crate) fn take_batch(
        &self,
        receiver: &OutboxReceiver,
        backlog: &mut VecDeque<DirtyRecord>,
        max_rows: usize,
    ) -> (Batch, usize) {
        let mut guard = self.write_state();
        // Drained under the lock: afterwards no record of an entity taken
        // below can still be in the channel (see `Ledger::new`).
        backlog.extend(receiver.records.try_iter());
        let state = &mut *guard;
        let mut batch = Batch::default();
        let mut blocked = Vec::new();
        while batch.rows.len() < max_rows {
            let Some(record) = backlog.pop_front() else { break };
            let Some(pending) = state.tables[record.kind]
                .get(&record.id)
                .and_then(|slot| slot.track.as_ref())
                .and_then(|track| track.pending)
                .filter(|pending| pending.seq == record.seq)
            else {
                continue; // stale: taken earlier with its group
            };
            let members = match pending.group {
                Some(group) => state.ledger.groups.get(&group).cloned().unwrap_or_default(),
                None => vec![(record.kind, record.id.clone())],
            };
            let in_flight = members.iter().any(|(kind, id)| {
                state.tables[*kind].get(id).and_then(|s| s.track.as_ref()).is_some_and(|t| t.in_flight.is_some())
            });
            if in_flight {
                blocked.push(record);
                continue;
            }
            if let Some(group) = pending.group {
                state.ledger.groups.remove(&group);
            }
            let start = batch.rows.len();
            for (kind, id) in members {
                let Some(slot) = state.tables[kind].get_mut(&id) else { continue };
                let Some(track) = slot.track.as_mut() else { continue };
                let Some(pending) = track.pending.take() else { continue };
                track.in_flight = Some(slot.version);
                let dead_lettered =
                    !state.dead_lettered.is_empty() && state.dead_lettered.contains(&(kind, id.clone()));
                batch.rows.push(crate::outbox::Row {
                    kind,
                    id,
                    version: slot.version,
                    value: slot.value.clone(),
                    seq: pending.seq,
                    since: pending.since,
                    dead_lettered,
                });
            }
            batch.groups.push(start..batch.rows.len());
        }
        let still_blocked = blocked.len();
        for record in blocked.into_iter().rev() {
            backlog.push_front(record);
        }
        (batch, still_blocked)
    }

    /// A batch committed: its versions are durable. Clears what it wrote,
    /// resolves the tickets it satisfies, and settles lag.
    ///
    /// Rows of `quarantined` groups were refused for good and are in the
    /// dead-letter table: they stop occupying the queue (the entity stays
    /// live in memory), their tickets fail with the cause, and a newer
    /// version of them is written normally and resolves the dead letter.
    pub(crate) fn commit(&self, batch: &Batch, quarantined: &[Quarantined]) {
        let now = Instant::now();
        let mut persisted = vec![0u64; self.shared.kinds.len()];
        let mut dead = vec![0u64; self.shared.kinds.len()];
        let latency = metrics::histogram!(m::PERSIST_LATENCY);
        let mut guard = self.write_state();
        let state = &mut *guard;
        for (index, row) in batch.rows.iter().enumerate() {
            let refused = quarantined.iter().find(|q| q.rows.contains(&index));
            state.ledger.settle(row.seq);
            let key = (row.kind, row.id.clone());
            match refused {
                None => {
                    persisted[row.kind] += 1;
                    latency.record(now.saturating_duration_since(row.since).as_secs_f64());
                    if row.dead_lettered {
                        state.dead_lettered.remove(&key);
                    }
                }
                Some(_) => {
                    dead[row.kind] += 1;
                    state.dead_lettered.insert(key);
                }
            }
            let Some(slot) = state.tables[row.kind].get_mut(&row.id) else { continue };
            let Some(track) = slot.track.as_mut() else { continue };
            debug_assert_eq!(track.in_flight, Some(row.version), "a batch commits what it took");
            track.in_flight = None;
            track.waiters.retain(|waiter| {
                if waiter.target > row.version {
                    return true;
                }
                match refused {
                    None => waiter.ticket.arrive(),
                    Some(q) => waiter.ticket.fail(q.error.clone()),
                }
                false
            });
            if track.pending.is_none() {
                state.ledger.depth -= 1;
                if track.waiters.is_empty() {
                    slot.track = None;
                }
            }
        }
        drop(guard);
        for ((kind, count), dead) in self.shared.kinds.iter().zip(persisted).zip(dead) {
            if count > 0 {
                kind.persisted.increment(count);
            }
            if dead > 0 {
                kind.dead_letters.increment(dead);
            }
        }
    }

    /// Kind and table of every kind, in registration order.
    pub fn tables(&self) -> Vec<(&'static str, &'static str)> {
        self.shared.kinds.iter().map(|k| (k.name, k.table)).collect()
    }

    /// Notes that an entity has an unresolved dead letter (loaded at
    /// start-up), so that writing a newer version resolves it.
    pub(crate) fn mark_dead_lettered(&self, kind: &str, id: &str) {
        if let Some(kind) = self.shared.kinds.iter().position(|k| k.name == kind) {
            self.write_state().dead_lettered.insert((kind, Arc::from(id)));
        }
    }

    /// Forgets an entity's dead letter (replayed or discarded by an
    /// operator).
    pub fn forget_dead_letter(&self, kind: &str, id: &str) {
        if let Some(kind) = self.shared.kinds.iter().position(|k| k.name == kind) {
            self.write_state().dead_lettered.remove(&(kind, Arc::from(id)));
        }
    }

    /// The newest state of every entity not yet written (pending or in a
    /// batch that did not commit), for a spill file.
    pub fn unwritten(&self) -> Vec<SpillRecord> {
        let guard = self.read_state();
        let mut records = Vec::new();
        for (kind, table) in guard.tables.iter().enumerate() {
            for (id, slot) in table {
                if !slot.occupies() {
                    continue;
                }
                let data = match &slot.value {
                    None => None,
                    Some(value) => {
                        let mut json = Vec::new();
                        match value.write_json(&mut json).map(|()| serde_json::from_slice(&json)) {
                            Ok(Ok(value)) => Some(value),
                            Ok(Err(e)) | Err(e) => {
                                // Written as null it would replay as a live
                                // entity without data; it cannot be kept.
                                tracing::error!(kind = self.shared.kinds[kind].name, id = %id, version = slot.version,
                                    error = %e, "an unwritten entity cannot be serialized; it is left out of the spill file");
                                continue;
                            }
                        }
                    }
                };
                records.push(SpillRecord {
                    kind: self.shared.kinds[kind].name.to_owned(),
                    id: id.to_string(),
                    version: slot.version,
                    deleted: slot.value.is_none(),
                    data,
                });
            }
        }
        records
    }

    /// Records for every pending mark, for the drain's safety sweep.
    pub(crate) fn pending_records(&self) -> Vec<DirtyRecord> {
        let guard = self.read_state();
        let mut records = Vec::new();
        for (kind, table) in guard.tables.iter().enumerate() {
            for (id, slot) in table {
                if let Some(pending) = slot.track.as_ref().and_then(|t| t.pending) {
                    records.push(DirtyRecord { kind, id: id.clone(), seq: pending.seq });
                }
            }
        }
        records
    }

    /// Fails every ticket still waiting: this process will write nothing
    /// more (the drain deadline passed).
    pub(crate) fn fail_waiters(&self) {
        let mut guard = self.write_state();
        for table in guard.tables.iter_mut() {
            for slot in table.values_mut() {
                if let Some(track) = slot.track.as_mut() {
                    for waiter in track.waiters.drain(..) {
                        waiter.ticket.fail(TicketError::Abandoned);
                    }
                }
            }
        }
    }

    /// The batch's rows will never be written by this process (the drain
    /// deadline passed): their tickets fail. The rows stay in flight; the
    /// caller reports or spills them.
    pub(crate) fn abandon(&self, batch: &Batch) {
        let mut guard = self.write_state();
        for row in &batch.rows {
            if let Some(track) = guard.tables[row.kind].get_mut(&row.id).and_then(|s| s.track.as_mut()) {
                for waiter in track.waiters.drain(..) {
                    waiter.ticket.fail(TicketError::Abandoned);
                }
            }
        }
    }
}

/// A ticket for a change set that changed nothing but asked to wait for
/// the entities it read (`ChangeSet::watch`): it resolves once their current
/// versions are committed (at once when none is pending).
fn watch_only(state: &mut State, watched: &[EntityKey]) -> Ticket {
    let targets: Vec<(KindId, Arc<str>, u64)> = watched
        .iter()
        .filter_map(|(kind, id)| {
            let slot = state.tables[*kind].get(id).filter(|slot| slot.occupies())?;
            Some((*kind, id.clone(), slot.version))
        })
        .collect();
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
            track.waiters.push(Waiter { target: version, ticket: ticket.clone() });
        }
    }
}

/// Puts the pending marks of `members` (changed together) into one group,
/// merging the groups they were in.
fn group(state: &mut State, members: &[EntityKey]) {
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

struct Staged {
    kind: KindId,
    id: Arc<str>,
    value: Option<Arc<dyn Stored>>,
    version: u64,
    /// The entity occupied the queue when staged.
    occupied: bool,
}

/// The changes of one [`Store::apply`], staged until its closure returns.
/// Reads through it see its own staged changes.
pub struct ChangeSet<'a> {
    kinds: &'a [KindInfo],
    state: &'a State,
    staged: Vec<Staged>,
    /// Positions in `staged`, used once it outgrows a linear scan.
    index: HashMap<(KindId, Arc<str>), usize>,
    /// Entities read but not changed whose durability a ticket waits for.
    watched: Vec<EntityKey>,
}

impl ChangeSet<'_> {
    fn staged_position(&self, kind: KindId, id: &str) -> Option<usize> {
        if self.staged.len() <= STAGED_SCAN_LIMIT {
            self.staged.iter().position(|s| s.kind == kind && &*s.id == id)
        } else {
            self.index.get(&(kind, Arc::from(id))).copied()
        }
    }

    /// The entity's current value and version, staged changes included.
    fn current(&self, kind: KindId, id: &str) -> (Option<&Arc<dyn Stored>>, u64) {
        if let Some(position) = self.staged_position(kind, id) {
            let staged = &self.staged[position];
            return (staged.value.as_ref(), staged.version);
        }
        match self.state.tables[kind].get(id) {
            Some(slot) => (slot.value.as_ref(), slot.version),
            None => (None, 0),
        }
    }

    /// Stages a new value (or a tombstone) and returns the version it gets:
    /// one more than the version before this change set, however often the
    /// change set touches it.
    fn stage(&mut self, kind: KindId, id: &str, value: Option<Arc<dyn Stored>>) -> u64 {
        if let Some(position) = self.staged_position(kind, id) {
            let staged = &mut self.staged[position];
            staged.value = value;
            return staged.version;
        }
        // Share the table's key when the entity exists: no allocation.
        let (id, version, occupied) = match self.state.tables[kind].get_key_value(id) {
            Some((key, slot)) => (key.clone(), slot.version + 1, slot.occupies()),
            None => (Arc::from(id), 1, false),
        };
        self.staged.push(Staged { kind, id: id.clone(), value, version, occupied });
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
            (Some(value), version) => Some(Versioned { version, value: downcast::<E>(value) }),
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
    /// shows state that may still be pending.
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
        if self.current(kind, entity.id()).0.is_some() {
            return Err(StoreError::AlreadyExists { kind: E::KIND, id: entity.id().to_owned() });
        }
        Ok(self.put(kind, entity))
    }

    /// Creates or replaces an entity.
    pub fn upsert<E: Entity>(&mut self, entity: E) -> Result<Versioned<E>, StoreError> {
        Ok(self.put(kind_id_of::<E>(self.kinds), entity))
    }

    fn put<E: Entity>(&mut self, kind: KindId, entity: E) -> Versioned<E> {
        let value = Arc::new(entity);
        let version = self.stage(kind, value.id(), Some(value.clone() as Arc<dyn Stored>));
        Versioned { version, value }
    }

    /// Changes a live entity in place; refused if it is absent or deleted.
    pub fn update<E: Entity>(&mut self, id: &str, change: impl FnOnce(&mut E)) -> Result<Versioned<E>, StoreError> {
        let kind = kind_id_of::<E>(self.kinds);
        let Some(current) = self.current(kind, id).0 else {
            return Err(StoreError::NotFound { kind: E::KIND, id: id.to_owned() });
        };
        let mut entity = E::clone(&downcast::<E>(current));
        change(&mut entity);
        if entity.id() != id {
            return Err(StoreError::IdChanged { kind: E::KIND, id: id.to_owned(), new_id: entity.id().to_owned() });
        }
        Ok(self.put(kind, entity))
    }

    /// Deletes a live entity, leaving a versioned tombstone (I6); refused if
    /// it is absent or already deleted. Returns the tombstone's version.
    pub fn delete<E: Entity>(&mut self, id: &str) -> Result<u64, StoreError> {
        let kind = kind_id_of::<E>(self.kinds);
        if self.current(kind, id).0.is_none() {
            return Err(StoreError::NotFound { kind: E::KIND, id: id.to_owned() });
        }
        Ok(self.stage(kind, id, None))
    }
}

/// A consistent, read-only view of the store.
pub struct View<'a> {
    kinds: &'a [KindInfo],
    state: &'a State,
}

impl View<'_> {
    /// The live entity `id`.
    pub fn get<E: Entity>(&self, id: &str) -> Option<Versioned<E>> {
        let slot = self.state.tables[kind_id_of::<E>(self.kinds)].get(id)?;
        Some(Versioned { version: slot.version, value: downcast::<E>(slot.value.as_ref()?) })
    }

    /// The version of `id`, tombstones included (0 when never seen).
    pub fn version<E: Entity>(&self, id: &str) -> u64 {
        self.state.tables[kind_id_of::<E>(self.kinds)].get(id).map_or(0, |slot| slot.version)
    }

    /// Every live entity of a kind, in no particular order.
    pub fn iter<E: Entity>(&self) -> impl Iterator<Item = Versioned<E>> + '_ {
        self.state.tables[kind_id_of::<E>(self.kinds)]
            .values()
            .filter_map(|slot| Some(Versioned { version: slot.version, value: downcast::<E>(slot.value.as_ref()?) }))
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
