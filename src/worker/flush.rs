//! Writing one batch: retries, isolation of what the database refuses,
//! conflicts, and the dead letters of quarantined change sets.
//!
//! A batch is written in one transaction. When it fails:
//!
//! * transient and schema failures are retried with capped, jittered
//!   exponential backoff, without a limit on attempts;
//! * a permanent refusal (bad data, a constraint) splits the batch in halves
//!   of whole groups until each refused group is alone, and the healthy
//!   halves commit; inside a refused group, probe transactions that are
//!   always rolled back find the row the database refuses, to name it;
//! * rows the database holds in a version this process did not write
//!   (conflicts) are known exactly: their groups are set aside and the rest
//!   is written again at once.
//!
//! Refused and conflicting groups are quarantined whole: every member gets a
//! dead letter with the set's quarantine id, recorded under the lease's
//! fence.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::Retryable;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info_span, warn};

use super::classify::{Classified, ErrorClass, classify_pool, classify_postgres};
use super::health::Health;
use crate::backoff;
use crate::metrics as m;
use crate::outbox::{Batch, Quarantined, TicketError};
use crate::pg;
use crate::pg::dead_letters::{self, NewDeadLetter, NewSet, Reason, RecordError};
use crate::pg::lease::{Lease, LeaseState};
use crate::pg::upsert::{self, Encoded, Mismatch, Mode, WriteError};
use crate::store::Store;

/// Longest one flush attempt may take before it is given up and retried:
/// past the server's own statement timeout.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(pg::STATEMENT_TIMEOUT.as_secs() + 5);

/// How a batch ended.
pub(crate) enum Outcome {
    /// Committed, except for the groups quarantined as dead letters.
    Committed(Vec<Quarantined>),
    /// Not written: the drain deadline passed or the lease was lost.
    Abandoned,
}

/// The drain deadline passed or the lease was lost: write nothing more.
pub(crate) struct Stopped;

/// Why a write stopped short of committing.
enum Failure {
    /// The database refuses these rows for good (or one cannot be
    /// encoded): isolate and quarantine. `table` and `row` say where, when
    /// known.
    Permanent {
        classified: Classified,
        message: String,
        table: Option<String>,
        row: Option<usize>,
    },
    /// Rows the database holds in versions this process did not write.
    Conflicts(Vec<Mismatch>),
    Stop,
}

/// A group set aside: refused for good, or in conflict.
struct SetAside {
    rows: Range<usize>,
    reason: Reason,
    /// The row refused, or in conflict.
    cause: usize,
    sqlstate: Option<String>,
    message: String,
    /// In a conflict: what the database holds of each conflicting row.
    conflicts: Vec<Mismatch>,
    attempts: i32,
}

/// Writes batches: what a writer task and a spill-file replay share.
pub(crate) struct Flusher {
    pub(crate) store: Store,
    /// What this process last saw of the database (written here).
    pub(crate) health: Arc<Health>,
    pub(crate) pool: Pool,
    pub(crate) lease: Option<Arc<Lease>>,
    pub(crate) retry_max_delay: Duration,
    /// Fired when the drain deadline passes: attempts stop.
    pub(crate) abort: CancellationToken,
    pub(crate) mode: Mode,
    /// Names the flusher in logs.
    pub(crate) name: &'static str,
    pub(crate) index: usize,
}

impl Flusher {
    /// Writes `batch` until it commits, quarantining the groups the
    /// database refuses for good or that conflict, or until the drain
    /// deadline or a lost lease stops it.
    pub(crate) async fn flush(&self, batch: &Batch) -> Outcome {
        let span = info_span!(
            "flush",
            flusher = self.name,
            index = self.index,
            rows = batch.rows.len(),
            groups = batch.groups.len()
        );
        async {
            let set_aside = match self.write_groups(batch, &batch.groups, 1).await {
                Ok(set_aside) => set_aside,
                Err(Stopped) => return Outcome::Abandoned,
            };
            if set_aside.is_empty() {
                return Outcome::Committed(Vec::new());
            }
            match self.record_dead_letters(batch, &set_aside).await {
                Ok(quarantined) => Outcome::Committed(quarantined),
                Err(Stopped) => Outcome::Abandoned,
            }
        }
        .instrument(span)
        .await
    }

    /// Writes the rows of `groups` in one transaction, setting aside (and
    /// returning) the groups that are refused for good or conflict, and
    /// committing the rest. A group, a change set, is never split.
    async fn write_groups(
        &self,
        batch: &Batch,
        groups: &[Range<usize>],
        attempts: i32,
    ) -> Result<Vec<SetAside>, Stopped> {
        let rows: Vec<usize> = groups.iter().flat_map(Clone::clone).collect();
        match self.write_rows(batch, &rows, true).await {
            Ok(()) => Ok(Vec::new()),
            Err(Failure::Stop) => Err(Stopped),
            Err(Failure::Conflicts(mismatches)) => {
                let (mut set_aside, rest) = self.set_aside_conflicts(batch, groups, &mismatches, attempts);
                if !rest.is_empty() {
                    set_aside.extend(Box::pin(self.write_groups(batch, &rest, attempts + 1)).await?);
                }
                Ok(set_aside)
            }
            Err(Failure::Permanent { classified, message, table, row }) if groups.len() == 1 => {
                let cause = match row {
                    Some(row) => row,
                    None => self.find_refused_row(batch, groups[0].clone(), table.as_deref()).await?,
                };
                let kinds = self.store.kinds();
                let refused = &batch.rows[cause];
                error!(
                    kind = kinds[refused.kind].name, id = %refused.id, version = refused.version,
                    rows = groups[0].len(), sqlstate = ?classified.sqlstate, error = %message,
                    "the database refuses a row for good; quarantining its change set as dead letters"
                );
                Ok(vec![SetAside {
                    rows: groups[0].clone(),
                    reason: Reason::Refused,
                    cause,
                    sqlstate: classified.sqlstate,
                    message,
                    conflicts: Vec::new(),
                    attempts,
                }])
            }
            Err(Failure::Permanent { .. }) => {
                let (left, right) = groups.split_at(groups.len() / 2);
                debug!(left = left.len(), right = right.len(), "splitting a refused batch");
                let mut set_aside = Box::pin(self.write_groups(batch, left, attempts + 1)).await?;
                set_aside.extend(Box::pin(self.write_groups(batch, right, attempts + 1)).await?);
                Ok(set_aside)
            }
        }
    }

    /// Splits `groups` into those with a row in conflict, set aside (and
    /// counted), and the rest, to be written again.
    fn set_aside_conflicts(
        &self,
        batch: &Batch,
        groups: &[Range<usize>],
        mismatches: &[Mismatch],
        attempts: i32,
    ) -> (Vec<SetAside>, Vec<Range<usize>>) {
        let kinds = self.store.kinds();
        let mut set_aside = Vec::new();
        let mut rest = Vec::new();
        for group in groups {
            let conflicts: Vec<Mismatch> = mismatches.iter().filter(|m| group.contains(&m.row)).cloned().collect();
            let Some(first) = conflicts.first() else {
                rest.push(group.clone());
                continue;
            };
            for mismatch in &conflicts {
                let row = &batch.rows[mismatch.row];
                kinds[row.kind].conflicts.increment(1);
                error!(kind = kinds[row.kind].name, id = %row.id, version = row.version,
                    database_version = ?mismatch.database_version,
                    "the database holds a version of this entity that this process did not write; quarantining its change set as a conflict");
            }
            let row = &batch.rows[first.row];
            set_aside.push(SetAside {
                rows: group.clone(),
                reason: Reason::Conflict,
                cause: first.row,
                sqlstate: None,
                message: format!(
                    "the database holds version {} of {} {}, written elsewhere; this process has version {}",
                    first.database_version.map_or_else(|| "none (no row)".to_owned(), |v| v.to_string()),
                    kinds[row.kind].name,
                    row.id,
                    row.version
                ),
                conflicts,
                attempts,
            });
        }
        (set_aside, rest)
    }

    /// The row of a refused group that the database refuses: halves of the
    /// candidates are tried in transactions that are always rolled back.
    /// Candidates are the rows of the table the error named, when it named
    /// one. (A refusal that needs rows of both halves, such as a foreign
    /// key between them, ends on a row of the second half.)
    async fn find_refused_row(
        &self,
        batch: &Batch,
        group: Range<usize>,
        table: Option<&str>,
    ) -> Result<usize, Stopped> {
        let kinds = self.store.kinds();
        let mut candidates: Vec<usize> = group.clone().collect();
        if let Some(table) = table {
            let of_table: Vec<usize> =
                candidates.iter().copied().filter(|&i| kinds[batch.rows[i].kind].table == table).collect();
            if !of_table.is_empty() {
                candidates = of_table;
            }
        }
        while candidates.len() > 1 {
            let (left, right) = candidates.split_at(candidates.len() / 2);
            candidates = match self.write_rows(batch, left, false).await {
                Err(Failure::Stop) => return Err(Stopped),
                Err(Failure::Permanent { row: Some(row), .. }) => vec![row],
                Err(Failure::Permanent { .. }) => left.to_vec(),
                Ok(()) | Err(Failure::Conflicts(_)) => right.to_vec(),
            };
        }
        Ok(candidates.first().copied().unwrap_or(group.start))
    }

    /// Writes `rows` of `batch` in one transaction (rolled back at the end
    /// when `commit` is false), retrying transient and schema failures with
    /// capped, jittered backoff without a limit on attempts.
    async fn write_rows(&self, batch: &Batch, rows: &[usize], commit: bool) -> Result<(), Failure> {
        let kinds = self.store.kinds();
        let encoded = match upsert::encode(kinds, batch, rows.iter().copied()) {
            Ok(encoded) => encoded,
            Err(e) => {
                let row = &batch.rows[e.row];
                return Err(Failure::Permanent {
                    classified: Classified {
                        class: ErrorClass::Permanent,
                        error_type: "data",
                        sqlstate: None,
                        unknown: false,
                    },
                    message: format!("{} {} cannot be serialized: {}", kinds[row.kind].name, row.id, e.error),
                    table: None,
                    row: Some(e.row),
                });
            }
        };
        let cap = self.retry_max_delay;
        let attempt = || self.attempt(&encoded, rows.len(), commit);
        let retried = attempt
            .retry(backoff::policy(cap))
            .sleep(tokio::time::sleep)
            .when(|e: &WriteError| match e {
                WriteError::Fenced { .. } | WriteError::Conflicts(_) => false,
                e => classify_write(e).class != ErrorClass::Permanent,
            })
            .adjust(move |_, delay| delay.map(|d| d.min(cap)))
            .notify(|e: &WriteError, delay| {
                let classified = classify_write(e);
                m::retry_scheduled();
                let delay_ms = delay.as_millis() as u64;
                if classified.unknown {
                    error!(error = %e, rows = rows.len(), delay_ms, "flush failed with an unrecognized error; retrying as transient");
                } else if classified.class == ErrorClass::Schema {
                    error!(error = %e, sqlstate = ?classified.sqlstate, rows = rows.len(), delay_ms,
                        "flush failed: the schema does not fit (an operator must fix it); data waits and is retried");
                } else {
                    warn!(error = %e, error_type = classified.error_type, sqlstate = ?classified.sqlstate,
                        rows = rows.len(), delay_ms, "flush failed; retrying");
                }
            });
        let result = tokio::select! {
            result = retried => result,
            _ = self.abort.cancelled() => {
                warn!(rows = rows.len(), "drain deadline passed; batch abandoned");
                return Err(Failure::Stop);
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(WriteError::Fenced { current, .. }) => {
                if let Some(lease) = &self.lease {
                    lease.fenced(current);
                }
                Err(Failure::Stop)
            }
            Err(WriteError::Conflicts(mismatches)) => Err(Failure::Conflicts(mismatches)),
            Err(e) => {
                let classified = classify_write(&e);
                let db = match &e {
                    WriteError::Postgres(pg) => pg.as_db_error(),
                    _ => None,
                };
                let message = db.map_or_else(|| e.to_string(), |db| db.message().to_owned());
                let table = db.and_then(|db| db.table()).map(str::to_owned);
                Err(Failure::Permanent { classified, message, table, row: None })
            }
        }
    }

    async fn attempt(&self, encoded: &Encoded<'_>, rows: usize, commit: bool) -> Result<(), WriteError> {
        let started = Instant::now();
        let _under_way = self.health.under_way("a flush attempt");
        let result = async {
            // Flush only under the lease; while it is being re-taken (the
            // database went away) the attempt fails like any other
            // connection failure, and is counted and retried.
            let epoch = match &self.lease {
                Some(lease) => match lease.state() {
                    LeaseState::Held(epoch) => Some(epoch),
                    LeaseState::Lapsed => return Err(WriteError::LeaseLapsed),
                    LeaseState::Lost => return Err(WriteError::Fenced { ours: lease.epoch(), current: None }),
                },
                None => None,
            };
            let mut client = self.pool.get().await?;
            // The server ends a stuck statement after STATEMENT_TIMEOUT; a
            // connection that hangs without an answer is given up here.
            tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                upsert::write(&mut client, self.store.kinds(), encoded, epoch, self.mode, commit),
            )
            .await
            .unwrap_or(Err(WriteError::TimedOut(ATTEMPT_TIMEOUT)))
        }
        .await;
        let elapsed = started.elapsed();
        match &result {
            Ok(()) if commit => {
                m::flush_committed(elapsed);
                self.health.success(SystemTime::now());
                debug!(rows, elapsed_us = elapsed.as_micros() as u64, "batch committed");
            }
            Ok(()) => {}
            Err(WriteError::Fenced { .. }) => m::flush_fenced(elapsed),
            Err(e) => {
                let classified = classify_write(e);
                let reached_database = classified.sqlstate.is_some() || matches!(e, WriteError::Conflicts(_));
                if commit {
                    m::flush_failed(elapsed, classified.error_type, reached_database);
                }
                self.health.failure(&classified, reached_database, e.to_string());
            }
        }
        result
    }

    /// Writes the dead letters of the groups set aside, retrying until it
    /// succeeds (or the drain deadline stops it): a record is only ever
    /// dropped from the queue once it is in the dead-letter table.
    async fn record_dead_letters(&self, batch: &Batch, set_aside: &[SetAside]) -> Result<Vec<Quarantined>, Stopped> {
        let sets: Vec<NewSet> = set_aside.iter().map(|aside| self.dead_letters_of(batch, aside)).collect();
        let epoch = self.lease.as_ref().map(|lease| lease.epoch());
        let record = || async {
            tokio::time::timeout(ATTEMPT_TIMEOUT, dead_letters::record(&self.pool, epoch, &sets))
                .await
                .unwrap_or(Err(RecordError::Db(pg::DbError::Timeout(ATTEMPT_TIMEOUT))))
        };
        let recorded = record
            .retry(backoff::policy(self.retry_max_delay))
            .sleep(tokio::time::sleep)
            .when(|e: &RecordError| !matches!(e, RecordError::Fenced { .. }))
            .notify(|e: &RecordError, delay| {
                error!(error = %e, sets = sets.len(), delay_ms = delay.as_millis() as u64, "cannot write dead letters; retrying");
            });
        let ids = tokio::select! {
            recorded = recorded => match recorded {
                Ok(ids) => ids,
                Err(RecordError::Fenced { current, .. }) => {
                    if let Some(lease) = &self.lease {
                        lease.fenced(current);
                    }
                    return Err(Stopped);
                }
                Err(e) => {
                    // Not reached: every other error is retried.
                    error!(error = %e, "dead letters not written");
                    return Err(Stopped);
                }
            },
            _ = self.abort.cancelled() => return Err(Stopped),
        };
        if let Ok(count) = dead_letters::count_unresolved(&self.pool).await {
            m::dead_letters_unresolved(count);
            self.health.dead_letters(count);
        }
        Ok(set_aside.iter().zip(ids).map(|(aside, set)| self.quarantined(batch, aside, set)).collect())
    }

    /// The dead letters of a group set aside, one per member; the cause's
    /// message is the database's, the others say which member they were
    /// quarantined with.
    fn dead_letters_of(&self, batch: &Batch, aside: &SetAside) -> NewSet {
        let kinds = self.store.kinds();
        let cause = &batch.rows[aside.cause];
        let letters = aside
            .rows
            .clone()
            .map(|index| {
                let row = &batch.rows[index];
                let payload = row.value.as_ref().and_then(|value| {
                    let mut json = Vec::new();
                    value.write_json(&mut json).ok().map(|()| json)
                });
                let conflict = aside.conflicts.iter().find(|m| m.row == index);
                let is_cause = index == aside.cause || conflict.is_some();
                let message = if is_cause {
                    aside.message.clone()
                } else {
                    format!(
                        "quarantined with {} {} of its change set: {}",
                        kinds[cause.kind].name, cause.id, aside.message
                    )
                };
                NewDeadLetter {
                    kind: kinds[row.kind].name,
                    entity_id: row.id.to_string(),
                    version: i64::try_from(row.version).unwrap_or(i64::MAX),
                    payload,
                    deleted: row.value.is_none(),
                    sqlstate: aside.sqlstate.clone(),
                    message,
                    attempts: aside.attempts,
                    cause: is_cause,
                    base_version: i64::try_from(row.base).unwrap_or(i64::MAX),
                    database_version: conflict.and_then(|m| m.database_version).map(|v| v as i64),
                }
            })
            .collect();
        NewSet { reason: aside.reason, letters }
    }

    /// A recorded set, as the store learns of it: its rows, its quarantine
    /// id, and what its tickets fail with (naming the cause).
    fn quarantined(&self, batch: &Batch, aside: &SetAside, set: u64) -> Quarantined {
        let row = &batch.rows[aside.cause];
        let (kind, id, version) = (self.store.kinds()[row.kind].name.to_owned(), row.id.to_string(), row.version);
        let error = match aside.reason {
            Reason::Refused => TicketError::Quarantined {
                kind,
                id,
                version,
                sqlstate: aside.sqlstate.clone(),
                message: aside.message.clone(),
            },
            Reason::Conflict => TicketError::Conflict {
                kind,
                id,
                version,
                database_version: aside.conflicts.first().and_then(|m| m.database_version),
            },
        };
        Quarantined { rows: aside.rows.clone(), error, set }
    }
}

pub(crate) fn classify_write(error: &WriteError) -> Classified {
    match error {
        WriteError::Pool(e) => classify_pool(e),
        WriteError::Postgres(e) => classify_postgres(e),
        WriteError::TimedOut(_) => {
            Classified { class: ErrorClass::Transient, error_type: "timeout", sqlstate: None, unknown: false }
        }
        WriteError::Fenced { .. } => {
            Classified { class: ErrorClass::Transient, error_type: "other", sqlstate: None, unknown: false }
        }
        WriteError::LeaseLapsed => {
            Classified { class: ErrorClass::Transient, error_type: "connection", sqlstate: None, unknown: false }
        }
        WriteError::Conflicts(_) => {
            Classified { class: ErrorClass::Permanent, error_type: "conflict", sqlstate: None, unknown: false }
        }
    }
}
