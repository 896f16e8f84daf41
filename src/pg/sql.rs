//! The SQL statements of one kind's table, built from its name and layout
//! once and kept for the life of the process.
//!
//! Every statement takes parallel arrays: ids (`text[]`), versions
//! (`int8[]`), tombstone flags (`bool[]`), then the entity: one `json[]`
//! (or `jsonb[]`, the column's type) for a document table, or one `text[]`
//! per typed column, cast in SQL to the column's type (PostgreSQL parses the
//! values, as it parses JSON).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use super::quote_ident;
use crate::entity::{Column, DocumentType, KindInfo, Layout};

/// The statements of one table.
#[derive(Debug)]
pub(crate) struct TableSql {
    /// Version-guarded upsert: a row applies only when its version is newer
    /// than the stored one, so replays, retries and out-of-order commits
    /// never move the database backwards, and a tombstone is never undone by
    /// an older write.
    pub(crate) upsert: String,
    /// Compare-and-set write (the entity's arrays, then bases `int8[]`): a
    /// row applies only where the table holds exactly version `base` (0: no
    /// row), the version the writer last knew. For spill files, whose writer
    /// may have lost the lease meanwhile.
    pub(crate) compare_and_set: String,
    /// After a write, the rows of the arrays that the table does not hold as
    /// given: their 1-based position and the version the table holds (NULL:
    /// no row).
    pub(crate) mismatches: String,
    /// Every row as (id, version, deleted, the entity as JSON text), for
    /// hydration; followed by `WHERE id = ANY($1)` to read some. The entity
    /// is cast to text in the statement rather than sent in its binary
    /// form, so that turning it into text (for `jsonb`, most of what the
    /// database does per row) is part of the scan's output: done by
    /// parallel workers when the plan has them, not by the one backend
    /// that sends every row.
    pub(crate) select: String,
    /// `COPY ... FROM STDIN` of (id, version, deleted, the entity) for rows
    /// the table has never held: binary for a document table, text (each
    /// value parsed by its column's type, as the casts do) for typed
    /// columns.
    pub(crate) copy: String,
    /// Whether [`copy`](Self::copy) reads PostgreSQL's binary format.
    pub(crate) copy_binary: bool,
    /// The columns `CREATE TABLE` would make, for start-up checks and
    /// messages: (name, type).
    pub(crate) columns: Vec<(String, String)>,
    /// The type of a document table's `data` column that the statements
    /// were made for, which the parameters' encoding follows.
    pub(crate) document: DocumentType,
}

/// What differs between the layouts, as SQL fragments.
struct Shape {
    /// The entity's column names, quoted (`data`, or the typed columns).
    names: Vec<String>,
    /// `unnest` parameter types for them (`json[]` or `jsonb[]`, or
    /// `text[]` each).
    params: Vec<&'static str>,
    /// How each `u.<name>` becomes the column's value.
    values: Vec<String>,
    /// Per column, whether `t.<name>` (the table's) differs from
    /// `u.<name>` (the given one).
    differs: Vec<String>,
    /// The entity as JSON text, read from a row `t`.
    read: String,
}

fn shape(layout: Layout, document: DocumentType) -> Shape {
    match layout {
        Layout::Document => Shape {
            names: vec!["data".into()],
            params: vec![document.array_sql_name()],
            values: vec!["u.data".into()],
            differs: vec![match document {
                DocumentType::Json => json_differs("t.data", "u.data"),
                DocumentType::Jsonb => "t.data IS DISTINCT FROM u.data".into(),
            }],
            read: "t.data::text".into(),
        },
        Layout::Columns { id_field, columns } => {
            let values: Vec<String> =
                columns.iter().map(|c| format!("u.{}::{}", quote_ident(c.name), c.sql_type)).collect();
            Shape {
                names: columns.iter().map(|c| quote_ident(c.name)).collect(),
                params: columns.iter().map(|_| "text[]").collect(),
                differs: columns
                    .iter()
                    .zip(&values)
                    .map(|(c, v)| {
                        let name = quote_ident(c.name);
                        match c.sql_type.eq_ignore_ascii_case("json") {
                            true => json_differs(&format!("t.{name}"), &format!("u.{name}")),
                            false => format!("t.{name} IS DISTINCT FROM {v}"),
                        }
                    })
                    .collect(),
                values,
                read: format!("({})::text", read_columns(id_field, columns)),
            }
        }
    }
}

/// Whether the `json` value `table` (a column) differs from `given` (json
/// or its text). `json` has no equality: the same text is the same
/// document, and other text is compared as jsonb (as values, not with its
/// spacing and key order). Text first, because a `json` column may hold
/// what jsonb refuses (`\u0000`).
fn json_differs(table: &str, given: &str) -> String {
    format!(
        "CASE WHEN {table}::text = {given}::text THEN false ELSE {table}::jsonb IS DISTINCT FROM {given}::jsonb END"
    )
}

/// `jsonb_build_object('<id field>', t.id, '<column>', t.<column>, ...)`,
/// in pieces of at most 40 columns (a function takes at most 100
/// arguments), joined with `||`.
fn read_columns(id_field: &str, columns: &[Column]) -> String {
    let literal = |name: &str| format!("'{}'", name.replace('\'', "''"));
    let mut pieces = vec![format!("jsonb_build_object({}, t.id)", literal(id_field))];
    for chunk in columns.chunks(40) {
        let pairs: Vec<String> =
            chunk.iter().map(|c| format!("{}, t.{}", literal(c.name), quote_ident(c.name))).collect();
        pieces.push(format!("jsonb_build_object({})", pairs.join(", ")));
    }
    pieces.join(" || ")
}

impl TableSql {
    fn new(table: &str, layout: Layout, document: DocumentType) -> Self {
        let table = quote_ident(table);
        let shape = shape(layout, document);
        let n = shape.names.len();
        // $1 ids, $2 versions, $3 tombstones, $4.. the entity, then bases.
        let entity_params: Vec<String> =
            shape.params.iter().enumerate().map(|(i, ty)| format!("${}::{ty}", i + 4)).collect();
        let unnest_names = format!("id, version, deleted, {}", shape.names.join(", "));
        let unnest =
            format!("unnest($1::text[], $2::int8[], $3::bool[], {}) AS u({unnest_names})", entity_params.join(", "));
        let names = shape.names.join(", ");
        let values = shape.values.join(", ");
        let updates: Vec<String> = shape.names.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        let upsert = format!(
            "INSERT INTO {table} AS t (id, version, deleted, {names}, updated_at) \
             SELECT u.id, u.version, u.deleted, {values}, now() FROM {unnest} \
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, deleted = EXCLUDED.deleted, \
             {}, updated_at = EXCLUDED.updated_at \
             WHERE t.version < EXCLUDED.version",
            updates.join(", ")
        );
        // Both parts see the statement's snapshot: a row of base 0 is only
        // inserted, a row of another base only updated where it still is
        // at that base.
        let bases = format!("${}::int8[]", n + 4);
        let cas_unnest = format!(
            "unnest($1::text[], $2::int8[], $3::bool[], {}, {bases}) AS u({unnest_names}, base)",
            entity_params.join(", ")
        );
        let sets: Vec<String> = shape.names.iter().zip(&shape.values).map(|(c, v)| format!("{c} = {v}")).collect();
        let compare_and_set = format!(
            "WITH u AS (SELECT * FROM {cas_unnest}), \
             updated AS (UPDATE {table} AS t SET version = u.version, deleted = u.deleted, {}, \
                updated_at = now() FROM u WHERE t.id = u.id AND t.version = u.base AND u.base <> 0 RETURNING t.id), \
             inserted AS (INSERT INTO {table} (id, version, deleted, {names}, updated_at) \
                SELECT u.id, u.version, u.deleted, {values}, now() FROM u WHERE u.base = 0 \
                ON CONFLICT (id) DO NOTHING RETURNING id) \
             SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted)",
            sets.join(", ")
        );
        let mismatches = format!(
            "SELECT u.ord, t.version \
             FROM unnest($1::text[], $2::int8[], $3::bool[], {}) WITH ORDINALITY AS u({unnest_names}, ord) \
             LEFT JOIN {table} AS t ON t.id = u.id \
             WHERE t.id IS NULL OR t.version <> u.version OR t.deleted <> u.deleted OR {}",
            entity_params.join(", "),
            shape.differs.join(" OR ")
        );
        let select = format!(
            "SELECT t.id, t.version, t.deleted, CASE WHEN t.deleted THEN NULL ELSE {} END FROM {table} AS t",
            shape.read
        );
        let copy_binary = matches!(layout, Layout::Document);
        let copy = format!(
            "COPY {table} (id, version, deleted, {names}) FROM STDIN{}",
            if copy_binary { " (FORMAT binary)" } else { "" }
        );
        let mut columns = vec![
            ("id".to_owned(), "text".to_owned()),
            ("version".to_owned(), "bigint".to_owned()),
            ("deleted".to_owned(), "boolean".to_owned()),
        ];
        match layout {
            Layout::Document => columns.push(("data".to_owned(), document.sql_name().to_owned())),
            Layout::Columns { columns: typed, .. } => {
                columns.extend(typed.iter().map(|c| (c.name.to_owned(), c.sql_type.to_owned())));
            }
        }
        columns.push(("updated_at".to_owned(), "timestamptz".to_owned()));
        Self { upsert, compare_and_set, mismatches, select, copy, copy_binary, columns, document }
    }
}

/// The statements of `kind`'s table (of the document type found for it;
/// `json`, what new tables hold, while none is), built on first use.
pub(crate) fn table(kind: &KindInfo) -> &'static TableSql {
    table_of(kind.table, kind.layout, kind.document().unwrap_or_default())
}

fn table_of(table: &str, layout: Layout, document: DocumentType) -> &'static TableSql {
    static CACHE: OnceLock<Mutex<HashMap<(String, DocumentType), &'static TableSql>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // One small leak per table (and document type) for the life of the
    // process.
    cache
        .entry((table.to_owned(), document))
        .or_insert_with(|| Box::leak(Box::new(TableSql::new(table, layout, document))))
}

/// The version-guarded upsert statement of a document table whose `data`
/// column is of type `document`: a row applies only when its version is
/// newer than the stored one.
pub fn upsert_sql(table_name: &str, document: DocumentType) -> String {
    table_of(table_name, Layout::Document, document).upsert.clone()
}

/// `CREATE TABLE IF NOT EXISTS` for a kind's table, of its layout: `id`,
/// `version`, `deleted`, the entity (`data json`, or its typed columns,
/// nullable: a tombstone keeps none), `updated_at`.
pub(crate) fn create_table(table: &str, layout: Layout) -> String {
    let entity = match layout {
        Layout::Document => "    data       json,\n".to_owned(),
        Layout::Columns { columns, .. } => {
            columns.iter().map(|c| format!("    {} {},\n", quote_ident(c.name), c.sql_type)).collect()
        }
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n    id         text        PRIMARY KEY,\n    version    bigint      NOT NULL,\n    deleted    boolean     NOT NULL DEFAULT false,\n{entity}    updated_at timestamptz NOT NULL DEFAULT now()\n);",
        quote_ident(table)
    )
}
