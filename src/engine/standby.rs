//! A hot standby (docs/ARCHITECTURE.md, *Standbys*): a process that finds
//! the lease held hydrates while it waits, then follows what the holder
//! commits through the commit feed, and takes the lease over once it has
//! expired or was released. After the takeover (which fences the old
//! holder: none of its transactions can commit after it), it replays its
//! own spill files and catches up on the last entries, then serves: no new
//! hydration.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::startup::replay_spills;
use super::{EngineConfig, Progress, StartError, hold, retry_hydrate};
use crate::entity::KindId;
use crate::pg::DbError;
use crate::pg::feed::{self, Gap};
use crate::pg::hydrate::{HydrateError, HydrationReport, current_rows};
use crate::pg::lease::{self, Attempt, Lease, LeaseRow};
use crate::store::{HydratedRow, Store};
use crate::worker::health::{LeaseView, Role};

/// How often a standby reads the feed and looks at the lease: a released
/// lease is taken over within about this long.
const POLL: Duration = Duration::from_millis(200);

/// Feed entries read at a time.
const FEED_PAGE: i64 = 256;

/// Why following stopped short.
enum Follow {
    /// The database failed: retry.
    Db(DbError),
    /// The holder wrote something this process cannot load: it cannot take
    /// over.
    Fatal(StartError),
}

impl From<DbError> for Follow {
    fn from(e: DbError) -> Self {
        Self::Db(e)
    }
}

/// What a standby needs.
pub(super) struct Standby<'a> {
    pub(super) store: &'a Store,
    pub(super) pool: &'a Pool,
    pub(super) config: &'a EngineConfig,
    pub(super) cancel: &'a CancellationToken,
    pub(super) progress: &'a (dyn Fn(Progress<'_>) + Sync),
}

impl Standby<'_> {
    /// Hydrates, follows the holder until the lease can be taken, takes it,
    /// and catches up. `None`: cancelled.
    pub(super) async fn wait_and_take_over(
        &self,
        held: LeaseRow,
        background: &CancellationToken,
    ) -> Result<Option<(Arc<Lease>, HydrationReport)>, StartError> {
        info!(holder = %held.holder, epoch = held.epoch, "the single-writer lease is held: hydrating and following as a standby");
        (self.progress)(Progress::Step(&format!("hydrating as a standby; the lease is held by {}", held.holder)));
        let Some(mut report) = retry_hydrate(self.store, self.pool, self.cancel).await? else { return Ok(None) };
        let mut cursor = report.feed_cursor;
        // A standby from here on: hydrated, following.
        self.standby(&held);
        info!(entities = report.total, cursor, "standby hydrated; following the holder's commits");
        let lease = loop {
            if self.cancel.is_cancelled() {
                return Ok(None);
            }
            match self.follow(cursor).await {
                Ok(next) => cursor = next,
                Err(Follow::Db(e)) => warn!(error = %e, "cannot follow the holder's commits yet; retrying"),
                Err(Follow::Fatal(e)) => return Err(e),
            }
            match self.try_take().await {
                Ok(Some(lease)) => break lease,
                Ok(None) => {}
                Err(e) => warn!(error = %e, "cannot read the lease yet; retrying"),
            }
            if self.cancel.run_until_cancelled(tokio::time::sleep(POLL)).await.is_none() {
                return Ok(None);
            }
        };
        hold(&lease, &self.config.health, background);
        // Fenced: every commit of the old holder is in the feed now.
        if !replay_spills(self.store, self.pool, Some(&lease), self.config, self.cancel, self.progress).await? {
            return Ok(None);
        }
        (self.progress)(Progress::Step("catching up on the last commits"));
        let started = std::time::Instant::now();
        loop {
            match self.follow(cursor).await {
                Ok(next) if next == cursor => break,
                Ok(next) => cursor = next,
                Err(Follow::Fatal(e)) => return Err(e),
                Err(Follow::Db(e)) => {
                    warn!(error = %e, "cannot catch up yet; retrying");
                    if self.cancel.run_until_cancelled(tokio::time::sleep(POLL)).await.is_none() {
                        return Ok(None);
                    }
                }
            }
        }
        report.feed_cursor = cursor;
        info!(cursor, elapsed_ms = started.elapsed().as_millis() as u64, "caught up; taking over as the holder");
        Ok(Some((lease, report)))
    }

    /// Says this process is a standby, behind `held`.
    fn standby(&self, held: &LeaseRow) {
        (self.progress)(Progress::Standby { holder: &held.holder });
        self.config.health.set_lease(LeaseView {
            role: Role::Standby,
            epoch: Some(held.epoch),
            holder: Some(held.holder.clone()),
            expires_at: Some(held.expires_at),
            lapsed: false,
        });
    }

    /// Takes the lease if it has expired or was released; `None` while
    /// another process holds it.
    async fn try_take(&self) -> Result<Option<Arc<Lease>>, DbError> {
        match lease::current(self.pool).await? {
            Some(row) if !row.expired => {
                self.standby(&row);
                return Ok(None);
            }
            _ => {}
        }
        match Lease::try_take(self.pool, &self.config.holder, self.config.lease_ttl).await? {
            Attempt::Taken(lease) => Ok(Some(lease)),
            Attempt::Held(row) => {
                self.standby(&row);
                Ok(None)
            }
        }
    }

    /// Applies what the feed holds after `cursor` to the store; returns the
    /// new cursor. Entries pruned before they were read make it hydrate
    /// again.
    async fn follow(&self, mut cursor: u64) -> Result<u64, Follow> {
        loop {
            let entries = match feed::after(self.pool, cursor, FEED_PAGE).await? {
                Ok(entries) => entries,
                Err(Gap) => {
                    warn!(cursor, "the commit feed was pruned past this standby; hydrating again");
                    return match crate::pg::hydrate::hydrate(self.store, self.pool).await {
                        Ok(report) => Ok(report.feed_cursor),
                        Err(HydrateError::Db(e)) => Err(Follow::Db(e)),
                        Err(e) => Err(Follow::Fatal(e.into())),
                    };
                }
            };
            let page = entries.len();
            let Some(last) = entries.last().map(|e| e.seq) else { return Ok(cursor) };
            let mut changed: HashMap<KindId, HashSet<String>> = HashMap::new();
            for entry in entries {
                for (kind, ids) in entry.kinds {
                    // A kind this process does not have is not its to follow.
                    if let Some(kind) = self.store.kind_named(&kind) {
                        changed.entry(kind).or_default().extend(ids);
                    }
                }
            }
            for (kind, ids) in changed {
                self.load(kind, ids).await?;
            }
            cursor = last;
            if page < FEED_PAGE as usize {
                return Ok(cursor);
            }
        }
    }

    /// Loads the current rows of `ids` into the store (a row never replaces
    /// a newer version).
    async fn load(&self, kind: KindId, ids: HashSet<String>) -> Result<(), Follow> {
        let info = &self.store.kinds()[kind];
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let rows = current_rows(self.pool, info, &ids).await?;
        let mut loaded: Vec<HydratedRow> = Vec::with_capacity(rows.len());
        for (id, row) in rows {
            let value = match (row.deleted, row.data) {
                (false, Some(json)) => Some((info.decode)(&json).map_err(|e| {
                    Follow::Fatal(
                        HydrateError::Decode {
                            kind: info.name,
                            table: info.table,
                            id: id.clone(),
                            error: e.to_string(),
                        }
                        .into(),
                    )
                })?),
                _ => None,
            };
            loaded.push((Arc::from(id.as_str()), row.version, value));
        }
        self.store.hydrate(kind, loaded);
        Ok(())
    }
}
