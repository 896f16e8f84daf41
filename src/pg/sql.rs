//! The SQL statements of one kind's table, built from its name once and
//! kept for the life of the process.
//!
//! Every kind's table has the same layout (see [`Entity`](crate::store::Entity)):
//! `id text PRIMARY KEY, version bigint, deleted boolean, data jsonb,
//! updated_at timestamptz`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use super::quote_ident;

/// The statements of one table.
#[derive(Debug)]
pub(crate) struct TableSql {
    /// Version-guarded upsert of parallel arrays (id, version, deleted,
    /// data): a row applies only when its version is newer than the stored
    /// one, so replays, retries and out-of-order commits never move the
    /// database backwards, and a tombstone is never undone by an older
    /// write.
    pub(crate) upsert: String,
    /// Compare-and-set write of parallel arrays (id, version, deleted, data,
    /// base): a row applies only where the table holds exactly version
    /// `base` (0: no row), the version the writer last knew. For spill
    /// files, whose writer may have lost the lease meanwhile.
    pub(crate) compare_and_set: String,
    /// After a write, the rows of parallel arrays (id, version, deleted,
    /// data) that the table does not hold as given: their 1-based position
    /// and the version the table holds (NULL: no row).
    pub(crate) mismatches: String,
    /// Every row, for hydration.
    pub(crate) select: String,
}

impl TableSql {
    fn new(table: &str) -> Self {
        let table = quote_ident(table);
        let upsert = format!(
            "INSERT INTO {table} AS t (id, version, deleted, data, updated_at) \
             SELECT u.id, u.version, u.deleted, u.data, now() \
             FROM unnest($1::text[], $2::int8[], $3::bool[], $4::jsonb[]) AS u(id, version, deleted, data) \
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, deleted = EXCLUDED.deleted, \
             data = EXCLUDED.data, updated_at = EXCLUDED.updated_at \
             WHERE t.version < EXCLUDED.version"
        );
        // Both parts see the statement's snapshot: a row of base 0 is only
        // inserted, a row of another base only updated where it still is
        // at that base.
        let compare_and_set = format!(
            "WITH u AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::bool[], $4::jsonb[], $5::int8[]) \
                AS u(id, version, deleted, data, base)), \
             updated AS (UPDATE {table} AS t SET version = u.version, deleted = u.deleted, data = u.data, \
                updated_at = now() FROM u WHERE t.id = u.id AND t.version = u.base AND u.base <> 0 RETURNING t.id), \
             inserted AS (INSERT INTO {table} (id, version, deleted, data, updated_at) \
                SELECT u.id, u.version, u.deleted, u.data, now() FROM u WHERE u.base = 0 \
                ON CONFLICT (id) DO NOTHING RETURNING id) \
             SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted)"
        );
        let mismatches = format!(
            "SELECT u.ord, t.version \
             FROM unnest($1::text[], $2::int8[], $3::bool[], $4::jsonb[]) WITH ORDINALITY AS u(id, version, deleted, data, ord) \
             LEFT JOIN {table} AS t ON t.id = u.id \
             WHERE t.id IS NULL OR t.version <> u.version OR t.deleted <> u.deleted \
                OR t.data IS DISTINCT FROM u.data"
        );
        let select = format!("SELECT id, version, deleted, data FROM {table}");
        Self { upsert, compare_and_set, mismatches, select }
    }
}

/// The statements of `table`, built on first use.
pub(crate) fn table(table: &str) -> &'static TableSql {
    static CACHE: OnceLock<Mutex<HashMap<String, &'static TableSql>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // One small leak per table for the life of the process.
    cache.entry(table.to_owned()).or_insert_with(|| Box::leak(Box::new(TableSql::new(table))))
}

/// The version-guarded upsert statement of a table: a row applies only when
/// its version is newer than the stored one.
pub fn upsert_sql(table_name: &str) -> String {
    table(table_name).upsert.clone()
}
