//! Each kind's table: the SQL that creates it, creating the missing ones,
//! the start-up check that every kind's table and columns exist, and the
//! type (`json` or `jsonb`) of each document table's `data` column, which
//! the statements follow.

use deadpool_postgres::Pool;

use super::{DbError, quote_ident, sql};
use crate::entity::{DocumentType, Entity, KindInfo, Layout};
use crate::store::Store;

/// `CREATE TABLE IF NOT EXISTS` for kind `E`'s table, of its layout (a
/// `data json` document, or its typed columns).
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

/// The type of the `data` column of `table` as `information_schema`
/// names it (`json`, `jsonb`, `text`, ...), in the first schema of the
/// search path that has the table; `None` without such a column.
async fn data_type(client: &tokio_postgres::Client, table: &str) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT data_type::text FROM information_schema.columns
             WHERE table_schema = ANY(current_schemas(false)) AND table_name = $1 AND column_name = 'data'
             ORDER BY array_position(current_schemas(false), table_schema::name) LIMIT 1",
            &[&table],
        )
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// Finds the type of the `data` column of `kind`'s table, if it is a
/// document table: when the type is not known yet (a worker started
/// without the engine's start-up check), or `again`, after a write failed
/// the way a changed column type makes writes fail. Whether the type
/// changed. A column of another type, or none, changes nothing: the
/// statements then send `json`, and what the table does with it is the
/// database's to say, as for any schema error.
pub(crate) async fn learn_document_type(
    client: &tokio_postgres::Client,
    kind: &KindInfo,
    again: bool,
) -> Result<bool, tokio_postgres::Error> {
    if kind.layout != Layout::Document || (kind.document().is_some() && !again) {
        return Ok(false);
    }
    let found = data_type(client, kind.table).await?.as_deref().and_then(DocumentType::named);
    match found {
        Some(document) if found != kind.document() => {
            kind.set_document(document);
            Ok(true)
        }
        _ => Ok(false),
    }
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
    /// A document table's `data` column is neither `json` nor `jsonb`.
    #[error(
        "the column data of table {table} (entity kind {kind}) is of type {found}; the engine writes JSON documents to a json or jsonb column:\n{sql}"
    )]
    DocumentType {
        /// Entity kind.
        kind: &'static str,
        /// Its table.
        table: &'static str,
        /// The column's type.
        found: String,
        /// The SQL that changes it to `json`.
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
/// reads and writes, and notes the type of each document table's `data`
/// column (`json` or `jsonb`), which the statements follow.
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
        if kind.layout == Layout::Document
            && let Some(found) = data_type(&client, kind.table).await?
        {
            match DocumentType::named(&found) {
                Some(document) => kind.set_document(document),
                None => {
                    return Err(TableError::DocumentType {
                        kind: kind.name,
                        table: kind.table,
                        found,
                        sql: format!(
                            "ALTER TABLE {} ALTER COLUMN data TYPE json USING data::json;",
                            quote_ident(kind.table)
                        ),
                    });
                }
            }
        }
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
