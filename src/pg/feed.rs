//! The commit feed: what the lease holder commits, in commit order, for
//! standbys to follow (docs/ARCHITECTURE.md, *Standbys*).
//!
//! Every flush transaction of the holder appends one entry: the next number
//! of `outbox_feed_head`, taken with an update of that row, which is locked
//! until the transaction ends. A second transaction that wants a number
//! waits for the first to commit or roll back, so numbers are handed out in
//! commit order and without gaps (a rolled-back number is taken again): a
//! follower that has read entry N has seen every commit before it, whatever
//! order the writers' transactions started in. The heavy work of the two
//! writers still runs side by side; only their commits are ordered.

use std::time::Duration;

use deadpool_postgres::Pool;

use super::DbError;
use super::lease::LEASE_NAME;

/// Appends the entry of one flush transaction (inside it, last before the
/// commit).
const APPEND_SQL: &str = "WITH head AS (
       INSERT INTO outbox_feed_head AS h (name, seq) VALUES ($1, 1)
       ON CONFLICT (name) DO UPDATE SET seq = h.seq + 1 RETURNING seq)
     INSERT INTO outbox_feed (seq, epoch, kinds, kind_ends, ids) SELECT seq, $2, $3, $4, $5 FROM head";

/// One committed flush transaction: the entities it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    /// Per kind name, the ids written.
    pub(crate) kinds: Vec<(String, Vec<String>)>,
}

/// Appends the entry of a transaction written under `epoch`: per kind
/// name, the ids it wrote.
pub(crate) async fn append(
    transaction: &deadpool_postgres::Transaction<'_>,
    written: &[(&str, &[&str])],
    epoch: u64,
) -> Result<(), tokio_postgres::Error> {
    let names: Vec<&str> = written.iter().map(|(name, _)| *name).collect();
    let mut ends = Vec::with_capacity(written.len());
    let mut ids: Vec<&str> = Vec::with_capacity(written.iter().map(|(_, ids)| ids.len()).sum());
    for (_, part) in written {
        ids.extend_from_slice(part);
        ends.push(ids.len() as i32);
    }
    let statement = transaction.prepare_cached(APPEND_SQL).await?;
    transaction.execute(&statement, &[&LEASE_NAME, &(epoch as i64), &names, &ends, &ids]).await?;
    Ok(())
}

/// The number of the last entry (0 before the first), as `client` sees it
/// (inside a snapshot, the entry that snapshot ends with).
pub(crate) async fn head(client: &tokio_postgres::Client) -> Result<u64, tokio_postgres::Error> {
    let row = client.query_opt("SELECT seq FROM outbox_feed_head WHERE name = $1", &[&LEASE_NAME]).await?;
    Ok(row.map_or(0, |row| row.get::<_, i64>(0).max(0) as u64))
}

/// What follows entry `after`: up to `limit` entries in order. `Err(Gap)`
/// when entries after `after` were pruned before they were read.
pub(crate) async fn after(pool: &Pool, after: u64, limit: i64) -> Result<Result<Vec<Entry>, Gap>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT seq, kinds, kind_ends, ids FROM outbox_feed WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&(after as i64), &limit],
        )
        .await?;
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        let seq = row.get::<_, i64>(0).max(0) as u64;
        let names: Vec<String> = row.get(1);
        let ends: Vec<i32> = row.get(2);
        let mut ids = row.get::<_, Vec<String>>(3).into_iter();
        let mut kinds = Vec::with_capacity(names.len());
        let mut start = 0usize;
        for (name, end) in names.into_iter().zip(ends) {
            let end = (end.max(0) as usize).max(start);
            kinds.push((name, ids.by_ref().take(end - start).collect()));
            start = end;
        }
        entries.push(Entry { seq, kinds });
    }
    let gap = match entries.first() {
        Some(first) => first.seq != after + 1,
        // The head and its entry are written in one transaction: a head
        // past the cursor with no entry after it means they were pruned.
        None => head(&client).await? > after,
    };
    Ok(if gap { Err(Gap) } else { Ok(entries) })
}

/// Entries after a follower's cursor were pruned before it read them: it
/// must load everything again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap;

/// Removes entries older than `keep` (the holder, now and then).
pub(crate) async fn prune(pool: &Pool, keep: Duration) -> Result<u64, DbError> {
    let client = pool.get().await?;
    Ok(client
        .execute(
            "DELETE FROM outbox_feed WHERE committed_at < now() - make_interval(secs => $1)",
            &[&keep.as_secs_f64()],
        )
        .await?)
}
