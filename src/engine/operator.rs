//! What an operator does with a quarantined change set, through the lease
//! holder's store (never behind it): the admin routes and the
//! `outbox dead-letters` command both call these.
//!
//! * **Replay** (after fixing the cause): the set's members are written
//!   again, whole, at versions above both memory's and the database's: the
//!   state memory holds (or, where memory does not hold the quarantined
//!   state, the dead letter's payload).
//! * **Discard**: memory is reverted to what the database holds, again at
//!   versions above both, and that is written, so memory and database agree.
//!
//! Either is an ordinary change set through the store and the worker:
//! fenced by the lease, indexes kept in step, and the dead letters resolved
//! in the transaction that writes the set. The call waits for the commit.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::entity::{KindId, Stored};
use crate::outbox::{Resolution, TicketError};
use crate::pg::dead_letters::{self, DeadLetter, DeadLetterError};
use crate::pg::hydrate::current_rows;
use crate::store::{ApplyError, Store};

/// Replays the quarantined set of dead letter `id`; returns its dead
/// letters, resolved.
pub async fn replay(store: &Store, pool: &Pool, id: i64, wait: Duration) -> Result<Vec<DeadLetter>, DeadLetterError> {
    act(store, pool, id, wait, Resolution::Replayed).await
}

/// Discards the quarantined set of dead letter `id` (memory reverts to
/// what the database holds); returns its dead letters, resolved.
pub async fn discard(store: &Store, pool: &Pool, id: i64, wait: Duration) -> Result<Vec<DeadLetter>, DeadLetterError> {
    act(store, pool, id, wait, Resolution::Discarded).await
}

/// One member of the set, with what is to be written.
struct Target {
    kind: KindId,
    letter: DeadLetter,
    /// The database's version (0: no row).
    database: u64,
    /// The database's state, decoded (`None`: no row, or a tombstone).
    database_value: Option<Arc<dyn Stored>>,
}

async fn act(
    store: &Store,
    pool: &Pool,
    id: i64,
    wait: Duration,
    resolution: Resolution,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let letters = dead_letters::set_of(pool, id).await?;
    if letters.is_empty() {
        return Err(DeadLetterError::NotFound(id));
    }
    let kinds = store.kinds();
    let mut targets = Vec::with_capacity(letters.len());
    for letter in letters {
        let kind = store
            .kind_named(&letter.kind)
            .ok_or_else(|| DeadLetterError::UnknownKind { id: letter.id, kind: letter.kind.clone() })?;
        let mut rows = current_rows(pool, &kinds[kind], &[letter.entity_id.as_str()]).await?;
        let (database, database_value) = match rows.remove(&letter.entity_id) {
            None => (0, None),
            Some(row) => {
                let value = match (row.deleted, row.data) {
                    (false, Some(json)) => Some((kinds[kind].decode)(&json).map_err(|e| {
                        DeadLetterError::Unavailable(format!(
                            "{} {} in the database does not decode: {e}",
                            letter.kind, letter.entity_id
                        ))
                    })?),
                    _ => None,
                };
                (row.version, value)
            }
        };
        targets.push(Target { kind, letter, database, database_value });
    }
    let ids: Vec<i64> = targets.iter().map(|t| t.letter.id).collect();
    let quarantine_id = targets[0].letter.quarantine_id as u64;
    let members: Vec<(KindId, &str)> = targets.iter().map(|t| (t.kind, t.letter.entity_id.as_str())).collect();

    let applied = store.apply_durable(|set| {
        // The set as its dead letters list it, or nothing (rule *Set at
        // rest*): a set that a later change is writing again has more
        // members than its letters.
        if !set.quarantine_at_rest(quarantine_id, &members) {
            return Err(DeadLetterError::BeingWritten(id));
        }
        set.resolve_as(resolution);
        for target in &targets {
            let entity = &target.letter.entity_id;
            let (memory_value, memory) = set.current_erased(target.kind, entity);
            let value = match resolution {
                Resolution::Discarded => target.database_value.clone(),
                _ => {
                    // (Under the store's lock: read through the change set.)
                    let holds = set.holds_quarantined(target.kind, entity);
                    if holds && memory >= target.letter.version.max(0) as u64 {
                        memory_value
                    } else {
                        from_payload(store, target)?
                    }
                }
            };
            set.put_erased(target.kind, entity, value, memory.max(target.database) + 1);
        }
        Ok::<_, DeadLetterError>(())
    });
    let ticket = match applied {
        Ok(((), ticket)) => ticket,
        Err(ApplyError::Failed(e)) => return Err(e),
        Err(ApplyError::Refused(refusal)) => return Err(DeadLetterError::Unavailable(refusal.to_string())),
    };
    match tokio::time::timeout(wait, ticket.wait()).await {
        Err(_) => return Err(DeadLetterError::TimedOut(wait)),
        Ok(Err(e @ (TicketError::Quarantined { .. } | TicketError::Conflict { .. }))) => {
            return Err(DeadLetterError::StillRefused(e.to_string()));
        }
        Ok(Err(e)) => return Err(DeadLetterError::Unavailable(e.to_string())),
        Ok(Ok(())) => {}
    }
    let resolved = dead_letters::by_ids(pool, &ids).await?;
    tracing::info!(
        dead_letter = id,
        members = resolved.len(),
        resolution = resolution.as_str(),
        "quarantined set resolved by an operator"
    );
    Ok(resolved)
}

/// The quarantined state of a member from its dead letter.
fn from_payload(store: &Store, target: &Target) -> Result<Option<Arc<dyn Stored>>, DeadLetterError> {
    let letter = &target.letter;
    if letter.deleted {
        return Ok(None);
    }
    let not_replayable = |reason: String| DeadLetterError::NotReplayable {
        id: letter.id,
        kind: letter.kind.clone(),
        entity_id: letter.entity_id.clone(),
        version: letter.version,
        reason,
    };
    let payload = letter.payload.as_ref().ok_or_else(|| not_replayable("it has no payload".into()))?;
    let json = serde_json::to_vec(payload).map_err(|e| not_replayable(e.to_string()))?;
    (store.kinds()[target.kind].decode)(&json).map(Some).map_err(|e| not_replayable(format!("it does not decode: {e}")))
}
