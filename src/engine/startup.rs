//! Start-up steps after the lease: replaying spill files, hydrating, and
//! loading the quarantined change sets of the dead-letter table into the
//! store.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{EngineConfig, Progress, StartError, retry_hydrate};
use crate::outbox::spill::{self, SpillRecord};
use crate::outbox::{Batch, Resolution, Row, TicketError};
use crate::pg::dead_letters::{DeadLetter, Reason};
use crate::pg::hydrate::HydrationReport;
use crate::pg::lease::{Lease, LeaseState};
use crate::pg::upsert::Mode;
use crate::store::{LoadedMember, LoadedSet, Store};
use crate::worker::flush::{Flusher, Outcome};
use crate::worker::health::Health;

/// A holder's preparation: replays this process's spill files (fenced by
/// `lease`), then hydrates every entity. `None`: cancelled.
pub(super) async fn prepare(
    store: &Store,
    pool: &Pool,
    lease: Option<&Arc<Lease>>,
    config: &EngineConfig,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<Option<HydrationReport>, StartError> {
    if !replay_spills(store, pool, lease, config, cancel, progress).await? {
        return Ok(None);
    }
    progress(Progress::Step("hydrating"));
    let Some(report) = retry_hydrate(store, pool, cancel).await? else { return Ok(None) };
    info!(entities = report.total, elapsed_ms = report.elapsed.as_millis() as u64, "hydration finished");
    Ok(Some(report))
}

/// Replays every spill file of this process's spill folder, oldest first.
/// `Ok(false)`: cancelled.
pub(super) async fn replay_spills(
    store: &Store,
    pool: &Pool,
    lease: Option<&Arc<Lease>>,
    config: &EngineConfig,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<bool, StartError> {
    let Some(dir) = &config.spill_dir else { return Ok(true) };
    let listed = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || spill::list(&dir)).await.expect("listing spill files does not panic")
    };
    for path in listed? {
        progress(Progress::Step(&format!("replaying spill file {}", path.display())));
        let replay = replay_spill(
            store,
            pool,
            lease.cloned(),
            config.health.clone(),
            &path,
            config.worker.retry_max_delay,
            cancel,
        );
        if !replay.await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Replays one spill file and removes it once its records are in the
/// database or quarantined. Records are written by compare-and-set against
/// their base, group by group: a record whose row moved on becomes a
/// conflict dead letter, a record the database refuses a refused one, and
/// neither stops the others. `Ok(false)`: cancelled.
async fn replay_spill(
    store: &Store,
    pool: &Pool,
    lease: Option<Arc<Lease>>,
    health: Arc<Health>,
    path: &Path,
    retry_max_delay: Duration,
    cancel: &CancellationToken,
) -> Result<bool, StartError> {
    let content = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || spill::read(&path)).await.expect("reading a spill file does not panic")?
    };
    let content_error = |reason: String| StartError::SpillContent { path: path.to_path_buf(), reason };
    // Files of format version 1 know no bases: written version-guarded.
    let mode = if content.records.iter().all(|r| r.base.is_some()) { Mode::CompareAndSet } else { Mode::Guarded };
    let batch = batch_of(store, content.records).map_err(content_error)?;
    let records = batch.rows.len();
    let flusher = Flusher {
        store: store.clone(),
        health,
        pool: pool.clone(),
        lease: lease.clone(),
        retry_max_delay,
        abort: cancel.child_token(),
        mode,
        name: "spill replay",
        index: 0,
    };
    match flusher.flush(&batch).await {
        Outcome::Committed(quarantined) => {
            if !quarantined.is_empty() {
                let rows: usize = quarantined.iter().map(|q| q.rows.len()).sum();
                error!(path = %path.display(), sets = quarantined.len(), rows, epoch = content.epoch,
                    "records of the spill file were quarantined (refused, or their rows moved on since it was written)");
            }
        }
        Outcome::Abandoned if lease.as_ref().is_some_and(|l| l.state() == LeaseState::Lost) => {
            return Err(StartError::LeaseLost);
        }
        Outcome::Abandoned => return Ok(false),
    }
    {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || spill::remove(&path))
            .await
            .expect("removing a spill file does not panic")?;
    }
    info!(records, path = %path.display(), epoch = content.epoch, reason = %content.reason, "replayed and removed a spill file");
    Ok(true)
}

/// A batch of spill records, their groups kept together.
fn batch_of(store: &Store, mut records: Vec<SpillRecord>) -> Result<Batch, String> {
    // Records without a group (format version 1) are groups of their own.
    records.sort_by_key(|r| r.group);
    let kinds = store.kinds();
    let since = Instant::now();
    let mut batch = Batch::default();
    let mut current: Option<u64> = None;
    for record in records {
        let kind = store
            .kind_named(&record.kind)
            .ok_or_else(|| format!("records of kind {:?}, which this server does not have", record.kind))?;
        let value = match (&record.data, record.deleted) {
            (_, true) => None,
            (Some(data), false) => Some((kinds[kind].decode)(data.get().as_bytes()).map_err(|e| {
                format!("{} {} version {} does not decode: {e}", record.kind, record.id, record.version)
            })?),
            (None, false) => return Err(format!("{} {} is live but has no data", record.kind, record.id)),
        };
        if record.group.is_none() || record.group != current {
            batch.groups.push(batch.rows.len()..batch.rows.len());
            current = record.group;
        }
        batch.rows.push(Row {
            kind,
            id: Arc::from(record.id.as_str()),
            at: None,
            version: record.version,
            value,
            json: None,
            seq: 0,
            since,
            base: record.base.unwrap_or(0),
            // A quarantined set being written again when the file was
            // spilled is resolved by its replay.
            resolves: Some(Resolution::Superseded),
        });
        let end = batch.rows.len();
        batch.groups.last_mut().expect("pushed above").end = end;
    }
    Ok(batch)
}

/// Loads the unresolved dead letters into the store as quarantined sets.
/// The members of a set the database refused get their quarantined state
/// back in memory (as before the restart), when the database still holds
/// what it held then; a conflict leaves memory with what the database
/// holds (its dead letter keeps the other state).
pub(super) fn load_quarantine(store: &Store, letters: Vec<DeadLetter>) {
    let mut sets: BTreeMap<i64, Vec<DeadLetter>> = BTreeMap::new();
    for letter in letters {
        sets.entry(letter.quarantine_id).or_default().push(letter);
    }
    let kinds = store.kinds();
    let mut loaded = Vec::with_capacity(sets.len());
    let mut overlaid = 0usize;
    for (id, letters) in sets {
        let Some(cause) = letters.iter().find(|l| l.cause).or(letters.first()) else { continue };
        let error = match cause.reason {
            Reason::Refused => TicketError::Quarantined {
                kind: cause.kind.clone(),
                id: cause.entity_id.clone(),
                version: cause.version.max(0) as u64,
                sqlstate: cause.sqlstate.clone(),
                message: cause.message.clone(),
            },
            Reason::Conflict => TicketError::Conflict {
                kind: cause.kind.clone(),
                id: cause.entity_id.clone(),
                version: cause.version.max(0) as u64,
                database_version: cause.database_version.map(|v| v.max(0) as u64),
            },
        };
        let mut members = Vec::with_capacity(letters.len());
        let mut overlay = cause.reason == Reason::Refused;
        for letter in &letters {
            let Some(kind) = store.kind_named(&letter.kind) else {
                warn!(dead_letter = letter.id, kind = %letter.kind, "a dead letter of a kind this server does not have is left as it is");
                continue;
            };
            let database = store.version_of(kind, &letter.entity_id);
            let version = letter.version.max(0) as u64;
            let still_based = letter.base_version.is_none_or(|base| base.max(0) as u64 == database);
            let value = match (&letter.payload, letter.deleted) {
                (_, true) => Some(None),
                (Some(payload), false) => {
                    serde_json::to_vec(payload).ok().and_then(|json| (kinds[kind].decode)(&json).ok()).map(Some)
                }
                (None, false) => None,
            };
            let member_overlay = match value {
                Some(value) if version > database && still_based => Some((version, value)),
                _ => None,
            };
            overlay &= member_overlay.is_some();
            members.push(LoadedMember {
                kind,
                id: Arc::from(letter.entity_id.as_str()),
                base: database,
                overlay: member_overlay,
            });
        }
        if !overlay {
            for member in &mut members {
                member.overlay = None;
            }
        } else {
            overlaid += members.len();
        }
        loaded.push(LoadedSet { id: id as u64, error, members, overlay });
    }
    if !loaded.is_empty() {
        info!(sets = loaded.len(), entities_restored = overlaid, "loaded quarantined change sets");
    }
    store.load_quarantine(loaded);
}
