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

/// Writes an encoded batch in one transaction. `before` runs first inside
/// the transaction (the lease's fencing check).
pub(crate) async fn write(
    client: &mut deadpool_postgres::Client,
    kinds: &[KindInfo],
    encoded: &Encoded,
) -> Result<(), tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    for part in &encoded.kinds {
        let statement = transaction.prepare_cached(&kinds[part.kind].upsert_sql).await?;
        transaction.execute(&statement, &[&part.ids, &part.versions, &part.deleted, &part.data]).await?;
    }
    transaction.commit().await
}
