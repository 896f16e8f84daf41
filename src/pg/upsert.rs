//! The batch write: per kind, one version-guarded upsert of all its rows
//! through `unnest` of parallel arrays, all kinds of a batch in one
//! transaction (DESIGN I3, I4).

use std::error::Error as StdError;

use bytes::BufMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use crate::outbox::Batch;
use crate::store::kind::{KindId, KindInfo};

/// The upsert statement for a kind's table. A row applies only when its
/// version is newer than the stored one, so replays, retries and
/// out-of-order commits never move the database backwards (I4), and a
/// tombstone is never undone by an older write (I6).
pub fn upsert_sql(table: &str) -> String {
    let table = super::quote_ident(table);
    format!(
        "INSERT INTO {table} AS t (id, version, deleted, data, updated_at) \
         SELECT u.id, u.version, u.deleted, u.data, now() \
         FROM unnest($1::text[], $2::int8[], $3::bool[], $4::jsonb[]) AS u(id, version, deleted, data) \
         ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, deleted = EXCLUDED.deleted, \
         data = EXCLUDED.data, updated_at = EXCLUDED.updated_at \
         WHERE t.version < EXCLUDED.version"
    )
}

/// Serialized JSON sent as `jsonb` in binary form (a version byte, then the
/// text), skipping a round trip through `serde_json::Value`.
#[derive(Debug)]
pub(crate) struct Jsonb(pub(crate) Vec<u8>);

impl ToSql for Jsonb {
    fn to_sql(&self, _ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.put_u8(1);
        out.put_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// A `jsonb` value as received, borrowed from the row.
pub(crate) struct JsonbRef<'a>(pub(crate) &'a [u8]);

impl<'a> FromSql<'a> for JsonbRef<'a> {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        match raw.split_first() {
            Some((1, json)) => Ok(Self(json)),
            _ => Err("unsupported jsonb binary format".into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
}

/// One kind's rows of a batch, as statement parameters, sorted by id so
/// that concurrent batches lock rows in the same order.
pub(crate) struct KindRows {
    pub(crate) kind: KindId,
    pub(crate) ids: Vec<String>,
    pub(crate) versions: Vec<i64>,
    pub(crate) deleted: Vec<bool>,
    pub(crate) data: Vec<Option<Jsonb>>,
}

/// A batch ready to send: encoded once, reused by every retry.
pub(crate) struct Encoded {
    pub(crate) kinds: Vec<KindRows>,
}

/// A row whose entity could not be serialized.
#[derive(Debug)]
pub(crate) struct EncodeError {
    pub(crate) row: usize,
    pub(crate) error: serde_json::Error,
}

/// Encodes the rows of `batch` (or only those at `rows`) per kind.
pub(crate) fn encode(
    kinds: &[KindInfo],
    batch: &Batch,
    rows: impl Iterator<Item = usize>,
) -> Result<Encoded, EncodeError> {
    let mut order: Vec<usize> = rows.collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&batch.rows[a], &batch.rows[b]);
        a.kind.cmp(&b.kind).then_with(|| a.id.cmp(&b.id))
    });
    let mut out: Vec<KindRows> = Vec::new();
    for index in order {
        let row = &batch.rows[index];
        if out.last().is_none_or(|k| k.kind != row.kind) {
            out.push(KindRows {
                kind: row.kind,
                ids: Vec::new(),
                versions: Vec::new(),
                deleted: Vec::new(),
                data: Vec::new(),
            });
        }
        let part = out.last_mut().expect("pushed above");
        let data = match &row.value {
            Some(value) => {
                let mut json = Vec::with_capacity(256);
                value.write_json(&mut json).map_err(|error| EncodeError { row: index, error })?;
                Some(Jsonb(json))
            }
            None => None,
        };
        part.ids.push(row.id.to_string());
        part.versions.push(i64::try_from(row.version).unwrap_or(i64::MAX));
        part.deleted.push(row.value.is_none());
        part.data.push(data);
    }
    debug_assert!(out.iter().all(|k| k.kind < kinds.len()));
    Ok(Encoded { kinds: out })
}

/// Why a batch transaction failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The attempt took longer than the server's statement timeout allows
    /// (the connection hung); it is abandoned and retried.
    #[error("the flush attempt did not finish within {0:?}")]
    TimedOut(std::time::Duration),
    /// The lease's lock connection is lost (the database is unreachable):
    /// no flush until it is re-taken.
    #[error("the single-writer lease is being re-taken (its connection to the database was lost)")]
    LeaseUnavailable,
    /// The lease's epoch is not ours: another process owns the database.
    #[error("the single-writer lease moved to epoch {current:?} (ours is {ours}); not committing")]
    Fenced { ours: u64, current: Option<u64> },
}

/// SQL resolving the unresolved dead letters of entities written now.
const RESOLVE_DEAD_LETTERS_SQL: &str = "UPDATE outbox_dead_letters SET resolved_at = now(), \
     resolution = 'superseded by a newer version' \
     WHERE resolved_at IS NULL AND kind = $1 AND entity_id = ANY($2)";

/// Writes an encoded batch in one transaction: first the fencing check
/// (when `epoch` is given) pipelined with one upsert per kind, then the resolution of
/// dead letters superseded by these rows (`resolve`: per kind, ids).
pub(crate) async fn write(
    client: &mut deadpool_postgres::Client,
    kinds: &[KindInfo],
    encoded: &Encoded,
    epoch: Option<u64>,
    resolve: &[(KindId, Vec<String>)],
) -> Result<(), WriteError> {
    let transaction = client.transaction().await?;
    let mut upserts = Vec::with_capacity(encoded.kinds.len());
    for part in &encoded.kinds {
        upserts.push((transaction.prepare_cached(&kinds[part.kind].upsert_sql).await?, part));
    }
    let upsert = async {
        for (statement, part) in &upserts {
            transaction.execute(statement, &[&part.ids, &part.versions, &part.deleted, &part.data]).await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    match epoch {
        Some(ours) => {
            // The fencing check and the upserts are sent together
            // (pipelined: one round trip less per batch); the server runs
            // them in order, and the transaction commits only if the epoch
            // read under the share lock is still ours.
            let fence = transaction.prepare_cached(super::lease::FENCE_SQL).await?;
            let check = transaction.query_opt(&fence, &[&super::lease::LEASE_NAME]);
            let (current, upserted) = futures_util::future::join(check, upsert).await;
            // A lost lease comes first: a fenced process reports nothing
            // as refused (no dead letters), it stops.
            let current = current?.map(|row| row.get::<_, i64>(0) as u64);
            if current != Some(ours) {
                return Err(WriteError::Fenced { ours, current });
            }
            upserted?;
        }
        None => upsert.await?,
    }
    for (kind, ids) in resolve {
        let statement = transaction.prepare_cached(RESOLVE_DEAD_LETTERS_SQL).await?;
        transaction.execute(&statement, &[&kinds[*kind].name, ids]).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Encodes spill records (by kind name) for one transaction. Fails on a
/// kind this store does not know.
pub(crate) fn encode_spilled(
    kinds: &[KindInfo],
    records: &[crate::outbox::spill::SpillRecord],
) -> Result<Encoded, String> {
    let mut parts: Vec<KindRows> = Vec::new();
    let mut sorted: Vec<&crate::outbox::spill::SpillRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.kind.cmp(&b.kind).then_with(|| a.id.cmp(&b.id)));
    for record in sorted {
        let kind = kinds
            .iter()
            .position(|k| k.name == record.kind)
            .ok_or_else(|| format!("records of kind {:?}, which this server does not have", record.kind))?;
        if parts.last().is_none_or(|p| p.kind != kind) {
            parts.push(KindRows { kind, ids: Vec::new(), versions: Vec::new(), deleted: Vec::new(), data: Vec::new() });
        }
        let part = parts.last_mut().expect("pushed above");
        part.ids.push(record.id.clone());
        part.versions.push(i64::try_from(record.version).unwrap_or(i64::MAX));
        part.deleted.push(record.deleted);
        part.data.push(match (&record.data, record.deleted) {
            (Some(value), false) => Some(Jsonb(serde_json::to_vec(value).map_err(|e| e.to_string())?)),
            _ => None,
        });
    }
    Ok(Encoded { kinds: parts })
}
