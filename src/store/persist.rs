//! The store's side of persistence: what the worker, hydration, spill files
//! and operator actions call. Handlers never do; they use
//! [`Store::apply`](super::Store::apply).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::{HydratedRow, Slot, State, Store, group, mark_pending};
use crate::entity::{KindId, Stored};
use crate::metrics as m;
use crate::outbox::{Batch, DirtyRecord, EntityKey, OutboxReceiver, Quarantined, Row, TicketError};

/// The newest state of an entity not yet written, for a spill file.
pub(crate) struct Unwritten {
    pub(crate) kind: KindId,
    pub(crate) id: Arc<str>,
    pub(crate) version: u64,
    /// The version the database holds as far as this process knows (0: no
    /// row).
    pub(crate) base: u64,
    /// `None`: a tombstone.
    pub(crate) value: Option<Arc<dyn Stored>>,
    /// Entities with the same group were changed together (directly or
    /// through a shared entity) and must be written together.
    pub(crate) group: u64,
}

/// A quarantined set as loaded from the dead-letter table at start-up.
pub(crate) struct LoadedSet {
    pub(crate) id: u64,
    pub(crate) error: TicketError,
    pub(crate) members: Vec<LoadedMember>,
    /// Whether the members' quarantined states are put back in memory
    /// (then every member has an overlay).
    pub(crate) overlay: bool,
}

/// One member of a [`LoadedSet`].
pub(crate) struct LoadedMember {
    pub(crate) kind: KindId,
    pub(crate) id: Arc<str>,
    /// The version the database holds.
    pub(crate) base: u64,
    /// The quarantined state to put back in memory (version, value; `None`
    /// a tombstone), when memory should hold it.
    pub(crate) overlay: Option<(u64, Option<Arc<dyn Stored>>)>,
}

/// One hydration of one kind, from [`Store::reserve`] to
/// [`Store::hydrated`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Loading {
    kind: KindId,
    generation: u64,
}

impl Store {
    /// Makes room for `additional` more entities of a kind before a
    /// hydration loads them, and starts that hydration: what it returns is
    /// the hydration's to hand to [`hydrated`](Self::hydrated) at its end.
    pub(crate) fn reserve(&self, kind: KindId, additional: usize) -> Loading {
        let mut guard = self.write_state();
        guard.loading[kind] += 1;
        guard.tables[kind].reserve(additional);
        for index in &mut guard.indexes[kind] {
            index.reserve(additional);
        }
        Loading { kind, generation: guard.loading[kind] }
    }

    /// Loads entities read from the database at start-up: no outbox
    /// record, the database already has them. A row never replaces a newer
    /// version already in memory.
    pub(crate) fn hydrate(&self, kind: KindId, rows: Vec<HydratedRow>) {
        let mut guard = self.write_state();
        let state = &mut *guard;
        let (table, indexes) = (&mut state.tables[kind], &mut state.indexes[kind]);
        for (id, version, value) in rows {
            // The key moves into the table; the indexes clone the table's.
            let (id, slot) = table.entry_or_insert_with(id, Slot::new);
            if slot.track.is_some() {
                // Hydration precedes every change; an entity changed already
                // keeps its newer, unwritten state.
                tracing::warn!(kind = self.shared.kinds[kind].name, id = %id, "hydrating over an entity changed in memory; memory kept");
                continue;
            }
            if slot.version < version {
                for index in indexes.iter_mut() {
                    index.update(id, slot.value.as_deref(), value.as_deref());
                }
                slot.version = version;
                slot.value = value;
            }
        }
    }

    /// A hydration of a kind has ended (or stopped): its indexes may build
    /// and compact what they gathered while it loaded. Only the newest
    /// hydration's end counts: an abandoned one's, arriving after a new
    /// one has begun, would otherwise end the new one's loading halfway
    /// (its remaining entities then indexed one at a time).
    pub(crate) fn hydrated(&self, loading: Loading) {
        let mut guard = self.write_state();
        let state = &mut *guard;
        if state.loading[loading.kind] != loading.generation {
            tracing::debug!(
                kind = self.shared.kinds[loading.kind].name,
                "the end of an abandoned hydration ignored: a newer one loads"
            );
            return;
        }
        for index in &mut state.indexes[loading.kind] {
            index.hydrated();
        }
    }

    /// Loads the quarantined sets of the dead-letter table (after
    /// hydration): their members are written together with any later change
    /// of one of them, and where memory should hold the quarantined state
    /// (the database refused it; it never held it), it is put back.
    pub(crate) fn load_quarantine(&self, sets: Vec<LoadedSet>) {
        let mut guard = self.write_state();
        let state = &mut *guard;
        for set in sets {
            let mut members = Vec::with_capacity(set.members.len());
            for member in set.members {
                if let Some((version, value)) = member.overlay {
                    let slot = state.tables[member.kind].get_or_insert_with(member.id.clone(), Slot::new);
                    if slot.track.is_none() && slot.version < version {
                        for index in &mut state.indexes[member.kind] {
                            index.update(&member.id, slot.value.as_deref(), value.as_deref());
                        }
                        slot.version = version;
                        slot.value = value;
                    }
                }
                members.push(((member.kind, member.id), member.base));
            }
            state.quarantine.insert(set.id, members, set.error, set.overlay);
        }
    }

    /// Entities in quarantined sets.
    pub fn quarantined(&self) -> usize {
        self.read_state().quarantine.entities()
    }

    /// Claims of durable callers the store holds (tickets waiting on
    /// entities not yet committed). Bounded by the callers still waiting.
    pub fn waiting_claims(&self) -> usize {
        let guard = self.read_state();
        guard
            .tables
            .iter()
            .flat_map(|table| table.values())
            .filter_map(|slot| slot.track.as_ref())
            .map(|track| track.waiters.len())
            .sum()
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
        // Groups found waiting for a batch in flight, so that each of their
        // many records costs a lookup, not a walk over the group.
        let mut blocked_groups: HashSet<u64> = HashSet::new();
        let in_flight = |slot: &Slot| slot.track.as_ref().is_some_and(|t| t.in_flight.is_some());
        let in_flight_by_key =
            |state: &State, (kind, id): &EntityKey| state.tables[*kind].get(id).is_some_and(in_flight);
        while batch.rows.len() < max_rows {
            let Some(record) = backlog.pop_front() else { break };
            let slot = state.tables[record.kind].at(record.at).1;
            let Some(pending) =
                slot.track.as_ref().and_then(|track| track.pending).filter(|pending| pending.seq == record.seq)
            else {
                continue; // stale: taken earlier with its group
            };
            let blocked_now = match pending.group {
                Some(group) => {
                    blocked_groups.contains(&group)
                        || state
                            .ledger
                            .groups
                            .get(&group)
                            .is_some_and(|m| m.iter().any(|key| in_flight_by_key(state, key)))
                }
                None => in_flight(slot),
            };
            if blocked_now {
                blocked_groups.extend(pending.group);
                blocked.push(record);
                continue;
            }
            let batch_group = state.ledger.next_group_id();
            let start = batch.rows.len();
            match pending.group {
                Some(group) => {
                    for (kind, id) in state.ledger.groups.remove(&group).unwrap_or_default() {
                        if let Some(at) = state.tables[kind].position(&id) {
                            take_row(state, kind, at, batch_group, &mut batch.rows);
                        }
                    }
                }
                None => take_row(state, record.kind, record.at, batch_group, &mut batch.rows),
            }
            batch.groups.push(start..batch.rows.len());
        }
        let still_blocked = blocked.len();
        for record in blocked.into_iter().rev() {
            backlog.push_front(record);
        }
        (batch, still_blocked)
    }

    /// A batch finished: its versions are durable, except for the groups
    /// `quarantined`. Clears what it wrote, resolves the tickets it
    /// satisfies, and settles lag.
    ///
    /// Quarantined groups are in the dead-letter table: they stop occupying
    /// the queue (the entities stay live in memory), their tickets fail with
    /// the cause, and they become quarantined sets, written again whole with
    /// the next change of any member. A member changed while its group was
    /// being written is written again at once, with the whole set.
    pub(crate) fn commit(&self, batch: &Batch, quarantined: &[Quarantined]) {
        let now = Instant::now();
        let mut persisted = vec![0u64; self.shared.kinds.len()];
        let mut dead = vec![0u64; self.shared.kinds.len()];
        let refused_at = |index: usize| quarantined.iter().find(|q| q.rows.contains(&index));
        let mut guard = self.write_state();
        let state = &mut *guard;
        for (index, row) in batch.rows.iter().enumerate() {
            let refused = refused_at(index);
            state.ledger.settle(row.seq);
            match refused {
                None => {
                    persisted[row.kind] += 1;
                    if row.resolves.is_some() {
                        state.quarantine.leave(&(row.kind, row.id.clone()));
                    }
                }
                Some(_) => dead[row.kind] += 1,
            }
            let Some(slot) = slot_of(&mut state.tables[row.kind], row) else { continue };
            let Some(track) = slot.track.as_mut() else { continue };
            debug_assert_eq!(track.in_flight, Some(row.version), "a batch commits what it took");
            track.in_flight = None;
            if refused.is_none() {
                track.base = row.version;
            }
            track.waiters.retain(|waiter| {
                if waiter.target > row.version {
                    return waiter.is_live();
                }
                match refused {
                    None => waiter.arrive(),
                    Some(q) => waiter.fail(q.error.clone()),
                }
                false
            });
            if track.pending.is_none() {
                state.ledger.depth -= 1;
                if track.waiters.is_empty()
                    && let Some(track) = slot.track.take()
                {
                    state.ledger.end_track(track);
                }
            }
        }
        for q in quarantined {
            let members: Vec<(EntityKey, u64)> =
                batch.rows[q.rows.clone()].iter().map(|row| ((row.kind, row.id.clone()), row.base)).collect();
            let keys: Vec<EntityKey> = members.iter().map(|(key, _)| key.clone()).collect();
            state.quarantine.insert(q.set, members, q.error.clone(), true);
            let changed_meanwhile = keys.iter().any(|(kind, id)| {
                state.tables[*kind].get(id).and_then(|s| s.track.as_ref()).is_some_and(|t| t.pending.is_some())
            });
            if changed_meanwhile {
                for key in &keys {
                    mark_pending(state, key, now);
                }
                if keys.len() > 1 {
                    group(state, &keys);
                }
            }
        }
        drop(guard);
        // Recorded outside the lock, which changes wait for.
        let latency = metrics::histogram!(m::PERSIST_LATENCY);
        for (index, row) in batch.rows.iter().enumerate() {
            if refused_at(index).is_none() {
                latency.record(now.saturating_duration_since(row.since).as_secs_f64());
            }
        }
        for ((kind, count), dead) in self.shared.kinds.iter().zip(persisted).zip(dead) {
            if count > 0 {
                kind.persisted.increment(count);
            }
            if dead > 0 {
                kind.dead_letters.increment(dead);
            }
        }
    }

    /// The newest state of every entity not yet written (pending, or in a
    /// batch that did not commit), with the groups that must be written
    /// together, for a spill file. Copies pointers under the read lock;
    /// serializing is the caller's.
    pub(crate) fn unwritten(&self) -> Vec<Unwritten> {
        let guard = self.read_state();
        let mut records = Vec::new();
        // Entities linked by a pending group or a batch group are unioned.
        let mut parent: Vec<usize> = Vec::new();
        let mut first_of: HashMap<(bool, u64), usize> = HashMap::new();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        for (kind, table) in guard.tables.iter().enumerate() {
            for (id, slot) in table.iter() {
                let Some(track) = slot.track.as_ref().filter(|t| t.occupies()) else { continue };
                let index = records.len();
                parent.push(index);
                let labels = [
                    track.pending.and_then(|p| p.group).map(|g| (false, g)),
                    track.in_flight.map(|_| (true, track.batch_group)),
                ];
                for label in labels.into_iter().flatten() {
                    match first_of.get(&label) {
                        Some(&other) => {
                            let (a, b) = (root(&mut parent, index), root(&mut parent, other));
                            parent[a] = b;
                        }
                        None => {
                            first_of.insert(label, index);
                        }
                    }
                }
                records.push(Unwritten {
                    kind,
                    id: id.clone(),
                    version: slot.version,
                    base: track.base,
                    value: slot.value.clone(),
                    group: 0,
                });
            }
        }
        for (index, record) in records.iter_mut().enumerate() {
            record.group = root(&mut parent, index) as u64;
        }
        records
    }

    /// Records for every pending mark, for the drain's safety sweep.
    pub(crate) fn pending_records(&self) -> Vec<DirtyRecord> {
        let guard = self.read_state();
        let mut records = Vec::new();
        for (kind, table) in guard.tables.iter().enumerate() {
            for at in 0..table.len() {
                if let Some(pending) = table.at(at).1.track.as_ref().and_then(|t| t.pending) {
                    records.push(DirtyRecord { kind, at, seq: pending.seq });
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
                        waiter.fail(TicketError::Abandoned);
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
            if let Some(track) = slot_of(&mut guard.tables[row.kind], row).and_then(|s| s.track.as_mut()) {
                for waiter in track.waiters.drain(..) {
                    waiter.fail(TicketError::Abandoned);
                }
            }
        }
    }

    /// The version of an entity in memory, tombstones included (0: never
    /// seen).
    pub(crate) fn version_of(&self, kind: KindId, id: &str) -> u64 {
        self.read_state().tables[kind].get(id).map_or(0, |slot| slot.version)
    }

    /// The index of the kind named `name`.
    pub(crate) fn kind_named(&self, name: &str) -> Option<KindId> {
        self.shared.kinds.iter().position(|k| k.name == name)
    }
}

/// Takes the pending change of the entity in slot `at` of `kind`'s table
/// into a batch's `rows` (nothing if it has none), in flight from now on.
fn take_row(state: &mut State, kind: KindId, at: usize, batch_group: u64, rows: &mut Vec<Row>) {
    let resolves = state.quarantine.resolution_of(kind, state.tables[kind].at(at).0);
    let (id, slot) = state.tables[kind].at_mut(at);
    let Some(track) = slot.track.as_mut() else { return };
    let Some(pending) = track.pending.take() else { return };
    track.in_flight = Some(slot.version);
    track.batch_group = batch_group;
    rows.push(Row {
        kind,
        id: id.clone(),
        at: Some(at),
        version: slot.version,
        value: slot.value.clone(),
        json: track.json.take(),
        seq: pending.seq,
        since: pending.since,
        base: track.base,
        resolves,
    });
}

/// The slot a batch's row was taken from: by its position when it came
/// from the store, else by its id.
fn slot_of<'a>(table: &'a mut super::Table, row: &Row) -> Option<&'a mut Slot> {
    match row.at {
        Some(at) => {
            let (id, slot) = table.at_mut(at);
            debug_assert_eq!(id, &row.id, "a slot keeps its position in its table");
            Some(slot)
        }
        None => table.get_mut(&row.id),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use crate::store::tests::Doc;
    use crate::store::{Store, StoreError};

    /// The JSON a caller made of the version its change set produced goes
    /// with that version into the batch, and only with it: a later change,
    /// in another change set or in the same one, leaves the batch without
    /// it (the worker then serializes the newest value itself).
    #[test]
    fn a_callers_json_goes_into_the_batch_with_its_version_only() {
        let (store, receiver) = Store::builder().kind::<Doc>().build();
        let mut backlog = VecDeque::new();
        let made = store.apply(|set| set.insert(Doc { id: "a".into(), n: 1 })).unwrap();
        let json = made.json().unwrap().into_owned();
        assert_eq!(json, serde_json::to_vec(&Doc { id: "a".into(), n: 1 }).unwrap());
        let (batch, _) = store.take_batch(&receiver, &mut backlog, 10);
        let carried = |batch: &crate::outbox::Batch| batch.rows[0].json.as_ref().and_then(|c| c.get()).cloned();
        assert_eq!((batch.rows[0].version, carried(&batch)), (1, Some(json)));
        store.commit(&batch, &[]);

        // Answered, then changed again before the next batch.
        let answered = store.apply(|set| set.update::<Doc>("a", |d| d.n = 2)).unwrap();
        answered.json().unwrap();
        store.apply(|set| set.update::<Doc>("a", |d| d.n = 3)).unwrap();
        let (batch, _) = store.take_batch(&receiver, &mut backlog, 10);
        assert_eq!((batch.rows[0].version, carried(&batch)), (3, None), "version 2's JSON is not version 3's");
        store.commit(&batch, &[]);

        // Twice in one change set: only the last value's JSON counts.
        let first = store
            .apply(|set| {
                let first = set.update::<Doc>("a", |d| d.n = 4)?;
                first.json().unwrap();
                set.update::<Doc>("a", |d| d.n = 5)?;
                Ok::<_, StoreError>(first)
            })
            .unwrap();
        assert_eq!(first.json().unwrap().as_ref(), serde_json::to_vec(&Doc { id: "a".into(), n: 4 }).unwrap());
        let (batch, _) = store.take_batch(&receiver, &mut backlog, 10);
        assert_eq!((batch.rows[0].version, carried(&batch)), (4, None));
        let row = batch.rows[0].value.as_deref().expect("live");
        let mut written = Vec::new();
        row.write_json(&mut written).unwrap();
        assert_eq!(written, serde_json::to_vec(&Doc { id: "a".into(), n: 5 }).unwrap());
    }

    /// During an outage, a hot entity's batch stays in flight and every
    /// later change set touching it joins one growing group, blocked behind
    /// it. Taking a batch must cost about one step per waiting record, not
    /// one walk over the group per record (which froze the store's lock for
    /// seconds, growing quadratically).
    #[test]
    fn a_large_blocked_group_costs_one_step_per_record() {
        let (store, receiver) = Store::builder().kind::<Doc>().capacity(100_000).build();
        store.apply(|set| set.insert(Doc { id: "hot".into(), n: 0 }).map(|_| ())).unwrap();
        let mut backlog = VecDeque::new();
        let (in_flight, _) = store.take_batch(&receiver, &mut backlog, 1000);
        assert_eq!(in_flight.rows.len(), 1);
        const LINKED: u64 = 40_000;
        for n in 0..LINKED {
            store
                .apply(|set| -> Result<(), StoreError> {
                    set.update::<Doc>("hot", |d| d.n = n)?;
                    set.insert(Doc { id: format!("d{n}"), n })?;
                    Ok(())
                })
                .unwrap();
        }
        let started = Instant::now();
        for _ in 0..40 {
            let (batch, blocked) = store.take_batch(&receiver, &mut backlog, 1000);
            assert!(batch.rows.is_empty(), "the group waits for the batch in flight");
            assert_eq!(blocked as u64, LINKED + 1);
        }
        // Linear: milliseconds. Quadratic: 40 × 40,000² steps, minutes.
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        store.commit(&in_flight, &[]);
        let (batch, _) = store.take_batch(&receiver, &mut backlog, 1000);
        assert_eq!(batch.rows.len() as u64, LINKED + 1, "the group is taken whole once unblocked");
        assert_eq!(batch.groups.len(), 1);
    }

    /// Counts the ends of loading it is told of.
    #[derive(Default)]
    struct Ends(usize);

    impl crate::store::Index<Doc> for Ends {
        fn update(&mut self, _: &std::sync::Arc<str>, _: Option<&Doc>, _: Option<&Doc>) {}
        fn hydrated(&mut self) {
            self.0 += 1;
        }
    }

    /// A hydration abandoned while a retry loads (its end arrives late,
    /// when its task is dropped) does not end the retry's loading: only
    /// the newest hydration's end reaches the indexes, once.
    #[test]
    fn only_the_newest_hydrations_end_reaches_the_indexes() {
        let (store, _receiver) = Store::builder().kind::<Doc>().index::<Doc, _>(Ends::default()).build();
        let ends = |store: &Store| store.read(|view| view.index::<Ends>().0);
        let abandoned = store.reserve(0, 10);
        let retry = store.reserve(0, 10);
        store.hydrated(abandoned);
        assert_eq!(ends(&store), 0, "the retry is still loading");
        store.hydrated(retry);
        assert_eq!(ends(&store), 1);
        store.hydrated(abandoned);
        assert_eq!(ends(&store), 1, "an abandoned hydration's end after the retry's changes nothing");

        // With no newer hydration, a stopped one's end is the end.
        let stopped = store.reserve(0, 10);
        store.hydrated(stopped);
        assert_eq!(ends(&store), 2);
    }
}
