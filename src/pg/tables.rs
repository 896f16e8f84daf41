//! Each kind's table: the SQL that creates it, creating the missing ones,
//! and the start-up check that every kind's table and columns exist.

use deadpool_postgres::Pool;

use super::{DbError, quote_ident, sql};
use crate::entity::{Entity, KindInfo};
use crate::store::Store;

/// `CREATE TABLE IF NOT EXISTS` for kind `E`'s table, of its layout (a
/// `data jsonb` document, or its typed columns).
pub fn create_table_sql<E: Entity>() -> String {
    sql::create_table(E::TABLE, E::LAYOUT)
}

/// Creates the table of every kind of `store` that does not exist yet
/// (existing tables are left as they are; the start-up check says what
/// they lack).
pub async fn ensure_tables(pool: &Pool, store: &Store) -> Result<(), DbError> {
    let client = pool.get().await?;
    for kind in store.kinds() {
        client.batch_execute(&sql::create_table(kind.table, kind.layout)).await?;
    }
    Ok(())
}

/// What a kind's table lacks.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The table does not exist.
    #[error(
        "the table {table} of entity kind {kind} does not exist; create it (or call outbox::pg::ensure_tables):\n{sql}"
    )]
    Missing {
        /// Entity kind.
        kind: &'static str,
        /// Its table.
        table: &'static str,
        /// The SQL that creates it.
        sql: String,
    },
    /// A column is missing.
    #[error("the table {table} of entity kind {kind} has no column {column}; add it:\n{sql}")]
    MissingColumn {
        /// Entity kind.
        kind: &'static str,
        /// Its table.
        table: &'static str,
        /// The column.
        column: String,
        /// The SQL that adds it.
        sql: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for TableError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(DbError::Postgres(e))
    }
}

impl From<deadpool_postgres::PoolError> for TableError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Db(DbError::Pool(e))
    }
}

/// Checks that every kind's table exists with every column the engine
/// reads and writes.
pub(crate) async fn check(pool: &Pool, kinds: &[KindInfo]) -> Result<(), TableError> {
    let client = pool.get().await?;
    for kind in kinds {
        let rows = client
            .query(
                "SELECT column_name FROM information_schema.columns
                 WHERE table_schema = ANY(current_schemas(false)) AND table_name = $1",
                &[&kind.table],
            )
            .await?;
        let present: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        if present.is_empty() {
            return Err(TableError::Missing {
                kind: kind.name,
                table: kind.table,
                sql: sql::create_table(kind.table, kind.layout),
            });
        }
        for (column, sql_type) in &sql::table(kind).columns {
            if !present.iter().any(|p| p == column) {
                let default = match column.as_str() {
                    "version" => " NOT NULL DEFAULT 0",
                    "deleted" => " NOT NULL DEFAULT false",
                    "updated_at" => " NOT NULL DEFAULT now()",
                    _ => "",
                };
                return Err(TableError::MissingColumn {
                    kind: kind.name,
                    table: kind.table,
                    column: column.clone(),
                    sql: format!(
                        "ALTER TABLE {} ADD COLUMN {} {sql_type}{default};",
                        quote_ident(kind.table),
                        quote_ident(column)
                    ),
                });
            }
        }
    }
    Ok(())
}
