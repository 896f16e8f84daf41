//! The batch write: per kind, version-guarded upserts through `unnest` of
//! parallel arrays (statements of up to 500 rows, sent together), all
//! kinds of a batch in one transaction, and a check that the table holds
//! every row as written.
//!
//! Rows the table has never held (the store knows no version of them in
//! the database) are instead streamed in with `COPY`, the cheapest way into
//! a table. Should such a row be there after all (a retry after a commit
//! whose answer was lost, or a row this process did not know of), the
//! `COPY` fails with a unique violation, and the same transaction is run
//! again with every row upserted, so the version guard and the conflict
//! check decide as for any other row.
//!
//! A row the guard left unwritten (the table holds an equal version with
//! other content, or a newer one) was written by someone else: the
//! transaction is rolled back and the rows are reported as conflicts, never
//! silently dropped. An equal version with the same content is this
//! process's own earlier write (a retry after a commit whose answer was
//! lost), and is fine.

use std::error::Error as StdError;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::sql;
use crate::entity::{DocumentType, KindId, KindInfo, Layout, Stored};
use crate::outbox::{Batch, Resolution};

/// The JSON of a document table's rows, one after the other in one
/// buffer (one allocation per batch, not one per row), sent as a `json[]`
/// or `jsonb[]` in binary form or copied into a binary `COPY`, without a round trip
/// through `serde_json::Value`.
#[derive(Debug, Default)]
pub(crate) struct JsonColumn {
    text: Vec<u8>,
    /// Each row's JSON in `text`; `None` for a tombstone.
    spans: Vec<Option<Range<usize>>>,
    /// How many rows it will hold, to size `text` once.
    expected: usize,
}

impl JsonColumn {
    /// A column for `rows` rows.
    fn with_rows(rows: usize) -> Self {
        Self { text: Vec::new(), spans: Vec::with_capacity(rows), expected: rows }
    }

    /// Appends a row's entity (`None`: a tombstone): `made`, its JSON as its
    /// caller already made it, or else the entity serialized here.
    fn push(&mut self, value: Option<&dyn Stored>, made: Option<&[u8]>) -> Result<(), serde_json::Error> {
        let span = match value {
            Some(value) => {
                let start = self.text.len();
                match made {
                    Some(json) => self.text.extend_from_slice(json),
                    None => {
                        if let Err(e) = value.write_json(&mut self.text) {
                            self.text.truncate(start);
                            return Err(e);
                        }
                    }
                }
                if start == 0 {
                    // Sized from the first row, with room for longer ones:
                    // growing a buffer of the whole batch by doubling
                    // would copy it again and again.
                    let len = self.text.len();
                    self.text.reserve(self.expected.saturating_sub(self.spans.len() + 1) * (len + len / 2));
                }
                Some(start..self.text.len())
            }
            None => None,
        };
        self.spans.push(span);
        Ok(())
    }

    /// Each row's JSON, in order.
    fn iter(&self) -> impl Iterator<Item = Option<&[u8]>> {
        self.spans.iter().map(|span| span.clone().map(|span| &self.text[span]))
    }
}

/// `jsonb`'s binary form: a version byte, then the text (`json`'s is the
/// text alone).
const JSONB_VERSION: u8 = 1;

/// The element type of a `json[]` or `jsonb[]` parameter.
fn element_type(document: DocumentType) -> Type {
    match document {
        DocumentType::Json => Type::JSON,
        DocumentType::Jsonb => Type::JSONB,
    }
}

/// One JSON value in the binary form of `document`: its length, then its
/// bytes.
fn put_json(out: &mut BytesMut, json: &[u8], document: DocumentType) {
    match document {
        DocumentType::Json => out.put_i32(field_length(json.len())),
        DocumentType::Jsonb => {
            out.put_i32(field_length(json.len() + 1));
            out.put_u8(JSONB_VERSION);
        }
    }
    out.put_slice(json);
}

/// Some rows of a [`JsonColumn`], as a statement parameter for a column
/// of type `document`.
#[derive(Debug, Clone)]
pub(crate) struct JsonRows<'c> {
    column: &'c JsonColumn,
    rows: Range<usize>,
    document: DocumentType,
}

impl ToSql for JsonRows<'_> {
    /// A one-dimensional `json[]` or `jsonb[]` in the binary array format:
    /// dimensions, whether there are NULLs, the element type, the length
    /// and lower bound, then each element's length (-1 for NULL) and bytes.
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let spans = &self.column.spans[self.rows.clone()];
        let rows = i32::try_from(spans.len())?;
        out.reserve(20 + 5 * spans.len() + spans.iter().flatten().map(|span| span.len()).sum::<usize>());
        out.put_i32(i32::from(rows > 0));
        out.put_i32(i32::from(spans.iter().any(Option::is_none)));
        out.put_u32(element_type(self.document).oid());
        if rows > 0 {
            out.put_i32(rows);
            out.put_i32(1);
        }
        for span in spans {
            match span {
                Some(span) => put_json(out, &self.column.text[span.clone()], self.document),
                None => out.put_i32(-1),
            }
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON_ARRAY || *ty == Type::JSONB_ARRAY
    }

    to_sql_checked!();
}

/// JSON as text, borrowed from the row as received (its bytes are checked
/// by the JSON decoder, which reads them anyway).
pub(crate) struct JsonText<'a>(pub(crate) &'a [u8]);

impl<'a> FromSql<'a> for JsonText<'a> {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Self(raw))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT
    }
}

/// One kind's rows of a batch, as statement parameters, sorted by id so
/// that concurrent batches lock rows in the same order. Ids are borrowed
/// from the batch.
pub(crate) struct KindRows<'a> {
    pub(crate) kind: KindId,
    pub(crate) ids: Vec<&'a str>,
    pub(crate) versions: Vec<i64>,
    pub(crate) deleted: Vec<bool>,
    /// The entities of a document table.
    pub(crate) data: JsonColumn,
    /// The entities of a table of typed columns: per column, per row, the
    /// value as text (cast by the statement).
    pub(crate) columns: Vec<Vec<Option<String>>>,
    /// The version each row expects the table to hold (compare-and-set).
    pub(crate) bases: Vec<i64>,
    /// Each row's index in the batch.
    pub(crate) rows: Vec<usize>,
    /// Whether the table held none of these rows when they were taken (base
    /// 0): they may be copied in.
    pub(crate) fresh: bool,
}

/// Most rows per upsert statement. A batch's rows the table already holds
/// go in statements of at most this many, sent together (pipelined) in the
/// batch's transaction. PostgreSQL writes updates more slowly in one
/// statement of thousands of rows than in several of hundreds: P2's
/// updates-only workload, 6 runs each, went from 0.78 of the hand-written
/// UNNEST writer (one statement per 5000-row batch) to 0.85 (pieces of
/// 1000), 0.88 (250) and 0.92 (500).
const UPSERT_ROWS: usize = 500;

/// Some rows of a kind, as statement parameters.
struct Params<'p> {
    ids: &'p [&'p str],
    versions: &'p [i64],
    deleted: &'p [bool],
    data: JsonRows<'p>,
    columns: Vec<&'p [Option<String>]>,
    bases: &'p [i64],
}

impl Params<'_> {
    /// Ids, versions, tombstones, the entity's arrays, and
    /// (compare-and-set) the bases.
    fn as_sql(&self, with_bases: bool) -> Vec<&(dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&self.ids, &self.versions, &self.deleted];
        if self.columns.is_empty() {
            params.push(&self.data);
        } else {
            params.extend(self.columns.iter().map(|column| column as &(dyn ToSql + Sync)));
        }
        if with_bases {
            params.push(&self.bases);
        }
        params
    }
}

impl<'a> KindRows<'a> {
    /// The parameters of the rows at `rows`, for a table whose documents
    /// are of type `document`.
    fn slice(&self, rows: Range<usize>, document: DocumentType) -> Params<'_> {
        Params {
            ids: &self.ids[rows.clone()],
            versions: &self.versions[rows.clone()],
            deleted: &self.deleted[rows.clone()],
            data: JsonRows {
                column: &self.data,
                rows: if self.columns.is_empty() { rows.clone() } else { 0..0 },
                document,
            },
            columns: self.columns.iter().map(|column| &column[rows.clone()]).collect(),
            bases: &self.bases[rows],
        }
    }

    /// The parameters of all rows.
    fn all(&self, document: DocumentType) -> Params<'_> {
        self.slice(0..self.ids.len(), document)
    }

    /// The parameters in pieces of at most `UPSERT_ROWS` rows, in order.
    fn pieces(&self, document: DocumentType) -> Vec<Params<'_>> {
        (0..self.ids.len())
            .step_by(UPSERT_ROWS)
            .map(|start| self.slice(start..self.ids.len().min(start + UPSERT_ROWS), document))
            .collect()
    }
}

/// A batch ready to send: encoded once, reused by every retry.
pub(crate) struct Encoded<'a> {
    pub(crate) kinds: Vec<KindRows<'a>>,
    /// Entities whose unresolved dead letters this write resolves: per
    /// kind and resolution, their ids.
    pub(crate) resolve: Vec<(KindId, Resolution, Vec<&'a str>)>,
}

/// A row whose entity could not be serialized.
#[derive(Debug)]
pub(crate) struct EncodeError {
    pub(crate) row: usize,
    pub(crate) error: String,
}

/// The value of a typed column as text for its `::type` cast: strings as
/// they are, numbers and booleans as written, null as NULL, and JSON text
/// for `jsonb` columns (and for objects and arrays).
fn column_text(value: Option<serde_json::Value>, sql_type: &str) -> Option<String> {
    use serde_json::Value;
    match value {
        None | Some(Value::Null) => None,
        Some(value) if sql_type.eq_ignore_ascii_case("jsonb") || sql_type.eq_ignore_ascii_case("json") => {
            Some(value.to_string())
        }
        Some(Value::String(text)) => Some(text),
        Some(Value::Bool(flag)) => Some(flag.to_string()),
        Some(Value::Number(number)) => Some(number.to_string()),
        Some(other) => Some(other.to_string()),
    }
}

/// What a JSON value is, for messages.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn version(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Encodes the rows of `batch` at `rows` per kind.
pub(crate) fn encode<'a>(
    kinds: &[KindInfo],
    batch: &'a Batch,
    rows: impl Iterator<Item = usize>,
) -> Result<Encoded<'a>, EncodeError> {
    let mut order: Vec<usize> = rows.collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&batch.rows[a], &batch.rows[b]);
        a.kind.cmp(&b.kind).then_with(|| (a.base != 0).cmp(&(b.base != 0))).then_with(|| a.id.cmp(&b.id))
    });
    let mut out: Vec<KindRows<'a>> = Vec::new();
    let mut resolve: Vec<(KindId, Resolution, Vec<&'a str>)> = Vec::new();
    for (position, &index) in order.iter().enumerate() {
        let row = &batch.rows[index];
        let fresh = row.base == 0;
        if out.last().is_none_or(|k| k.kind != row.kind || k.fresh != fresh) {
            // The rows of this part: the next ones of the same kind and
            // freshness (`order` is sorted so).
            let part_rows = order[position..]
                .iter()
                .take_while(|&&i| batch.rows[i].kind == row.kind && (batch.rows[i].base == 0) == fresh)
                .count();
            let typed = match kinds[row.kind].layout {
                Layout::Document => 0,
                Layout::Columns { columns, .. } => columns.len(),
            };
            out.push(KindRows {
                kind: row.kind,
                ids: Vec::new(),
                versions: Vec::new(),
                deleted: Vec::new(),
                data: match kinds[row.kind].layout {
                    Layout::Document => JsonColumn::with_rows(part_rows),
                    Layout::Columns { .. } => JsonColumn::default(),
                },
                columns: vec![Vec::new(); typed],
                bases: Vec::new(),
                rows: Vec::new(),
                fresh,
            });
        }
        let part = out.last_mut().expect("pushed above");
        let encode_error = |error: String| EncodeError { row: index, error };
        match kinds[row.kind].layout {
            Layout::Document => {
                let made = row.json.as_ref().and_then(|cell| cell.get()).map(Vec::as_slice);
                part.data.push(row.value.as_deref(), made).map_err(|e| encode_error(e.to_string()))?;
            }
            Layout::Columns { columns, .. } => {
                let mut fields = match &row.value {
                    None => None,
                    Some(value) => match value.to_value().map_err(|e| encode_error(e.to_string()))? {
                        serde_json::Value::Object(fields) => Some(fields),
                        other => {
                            return Err(encode_error(format!(
                                "a typed-column entity is not a JSON object: {}",
                                json_kind(&other)
                            )));
                        }
                    },
                };
                for (values, column) in part.columns.iter_mut().zip(columns) {
                    values.push(fields.as_mut().and_then(|f| column_text(f.remove(column.name), column.sql_type)));
                }
            }
        }
        part.ids.push(&row.id);
        part.versions.push(version(row.version));
        part.deleted.push(row.value.is_none());
        part.bases.push(version(row.base));
        part.rows.push(index);
        if let Some(resolution) = row.resolves {
            match resolve.iter_mut().find(|(kind, r, _)| *kind == row.kind && *r == resolution) {
                Some((_, _, ids)) => ids.push(&row.id),
                None => resolve.push((row.kind, resolution, vec![&row.id])),
            }
        }
    }
    Ok(Encoded { kinds: out, resolve })
}

/// A row the table does not hold as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mismatch {
    /// Its index in the batch.
    pub(crate) row: usize,
    /// The version the table holds (`None`: no row).
    pub(crate) database_version: Option<u64>,
}

/// Why a batch transaction failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("no database connection: {}", super::PoolErrorText(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{}", super::ErrorText(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The attempt took longer than the server's statement timeout allows
    /// (the connection hung); it is abandoned and retried.
    #[error("the flush attempt did not finish within {0:?}")]
    TimedOut(std::time::Duration),
    /// The lease was not renewed in time (the database is away, or this
    /// process was frozen): no flush until it is.
    #[error("the single-writer lease has lapsed (not renewed in time); waiting to renew it")]
    LeaseLapsed,
    /// The lease's epoch is not ours: another process owns the database.
    #[error("the single-writer lease moved to epoch {current:?} (ours is {ours}); not committing")]
    Fenced { ours: u64, current: Option<u64> },
    /// Rows the table holds in a version this process did not write: the
    /// transaction was rolled back.
    #[error("{} row(s) conflict with versions written elsewhere", .0.len())]
    Conflicts(Vec<Mismatch>),
}

/// How rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The normal flush: rows the table never held are copied in, the
    /// rest written with the version-guarded upsert.
    Upsert,
    /// Version-guarded upsert of every row, whatever the store knew of the
    /// table (spill files that record no bases).
    Guarded,
    /// Compare-and-set against each row's base: spill-file replay.
    CompareAndSet,
}

/// The rows the table does not hold as written, for the kinds whose write
/// changed fewer rows than it carried (the version guard left some alone).
async fn find_mismatches(
    transaction: &deadpool_postgres::Transaction<'_>,
    kinds: &[KindInfo],
    encoded: &Encoded<'_>,
    written: &[u64],
) -> Result<Vec<Mismatch>, tokio_postgres::Error> {
    let mut mismatches = Vec::new();
    for (part, count) in encoded.kinds.iter().zip(written) {
        if *count as usize == part.ids.len() {
            continue;
        }
        let sql = sql::table(&kinds[part.kind]);
        let statement = transaction.prepare_cached(&sql.mismatches).await?;
        let params = part.all(sql.document);
        for row in transaction.query(&statement, &params.as_sql(false)).await? {
            let position = row.get::<_, i64>(0) as usize;
            let database_version = row.get::<_, Option<i64>>(1).map(|v| v.max(0) as u64);
            mismatches.push(Mismatch { row: part.rows[position - 1], database_version });
        }
    }
    Ok(mismatches)
}

/// SQL resolving the unresolved dead letters of entities written now.
const RESOLVE_DEAD_LETTERS_SQL: &str = "UPDATE outbox_dead_letters SET resolved_at = now(), resolution = $3 \
     WHERE resolved_at IS NULL AND kind = $1 AND entity_id = ANY($2)";

/// How one kind's part of a batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Statement {
    Upsert,
    CompareAndSet,
    Copy,
}

impl Statement {
    fn of(mode: Mode, part: &KindRows<'_>, copy: bool) -> Self {
        match mode {
            Mode::Upsert if copy && part.fresh => Self::Copy,
            Mode::Upsert | Mode::Guarded => Self::Upsert,
            Mode::CompareAndSet => Self::CompareAndSet,
        }
    }
}

/// A write step failed: in a `COPY` of rows thought new, or elsewhere.
enum StepError {
    Copy(tokio_postgres::Error),
    Other(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for StepError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Other(e)
    }
}

/// Writes an encoded batch in one transaction: the fencing check (when
/// `epoch` is given) pipelined with one write per kind, a check that every
/// row is in the table as written, and the resolution of dead letters these
/// rows supersede. With `commit` false, the transaction is rolled back at
/// the end whatever happens (a probe: does the database accept these rows?).
///
/// When a `COPY` of rows thought new meets one of them in the table (a
/// unique violation), the transaction is rolled back and run again at once
/// with those rows upserted: an earlier commit of this batch whose answer
/// was lost is then recognised as such, and another writer's row as a
/// conflict.
///
/// When a write fails the way a changed document column type makes it
/// fail, the tables' types are looked up again, and if one did change the
/// write is made once more for it.
pub(crate) async fn write(
    client: &mut deadpool_postgres::Client,
    kinds: &[KindInfo],
    encoded: &Encoded<'_>,
    epoch: Option<u64>,
    mode: Mode,
    commit: bool,
) -> Result<(), WriteError> {
    for part in &encoded.kinds {
        super::tables::learn_document_type(client, &kinds[part.kind], false).await?;
    }
    let mut looked_up = false;
    loop {
        let written = async {
            match write_once(client, kinds, encoded, epoch, mode, commit, true).await? {
                Written::Done => Ok(()),
                Written::CopiedOverARow(e) => {
                    crate::metrics::copy_fell_back();
                    tracing::debug!(error = %super::ErrorText(&e), "a row copied as new is in the table already; writing the batch with upserts");
                    match write_once(client, kinds, encoded, epoch, mode, commit, false).await? {
                        Written::Done => Ok(()),
                        Written::CopiedOverARow(e) => Err(e.into()),
                    }
                }
            }
        }
        .await;
        // A document column's type may have changed under the engine (an
        // `ALTER TABLE` while it runs, such as a migration to `json`): if
        // it did, the write is made again for the type the table has now,
        // rather than refused for good.
        if let Err(WriteError::Postgres(e)) = &written
            && !looked_up
            && e.code().is_some_and(|code| TYPE_CHANGED.contains(code))
        {
            looked_up = true;
            let mut changed = false;
            for part in &encoded.kinds {
                changed |= super::tables::learn_document_type(client, &kinds[part.kind], true).await?;
            }
            if changed {
                tracing::warn!("a document column's type changed while the engine ran; writing the batch again for it");
                continue;
            }
        }
        return written;
    }
}

/// What a write whose `json` or `jsonb` no longer matches its table's
/// column fails with: binary jsonb read as json text, binary json read as
/// jsonb (an unknown version byte, reported as an internal error), a
/// parameter of the other type, a comparison `json` lacks.
const TYPE_CHANGED: [SqlState; 4] = [
    SqlState::INVALID_TEXT_REPRESENTATION,
    SqlState::INTERNAL_ERROR,
    SqlState::DATATYPE_MISMATCH,
    SqlState::UNDEFINED_FUNCTION,
];

/// How a write ended without an error to report.
enum Written {
    /// Written (committed, or rolled back as asked).
    Done,
    /// A `COPY` of rows thought new met one of them in the table; rolled
    /// back.
    CopiedOverARow(tokio_postgres::Error),
}

async fn write_once(
    client: &mut deadpool_postgres::Client,
    kinds: &[KindInfo],
    encoded: &Encoded<'_>,
    epoch: Option<u64>,
    mode: Mode,
    commit: bool,
    copy: bool,
) -> Result<Written, WriteError> {
    let transaction = client.transaction().await?;
    let mut statements = Vec::with_capacity(encoded.kinds.len());
    for part in &encoded.kinds {
        let sql = sql::table(&kinds[part.kind]);
        let how = Statement::of(mode, part, copy);
        let text = match how {
            Statement::Upsert => &sql.upsert,
            Statement::CompareAndSet => &sql.compare_and_set,
            Statement::Copy => &sql.copy,
        };
        statements.push((transaction.prepare_cached(text).await?, part, how, sql));
    }
    let writes = async {
        let mut written = Vec::with_capacity(statements.len());
        for (statement, part, how, sql) in &statements {
            let count = match how {
                Statement::Upsert => {
                    // Sent together, answered in order; rows sorted by id
                    // stay locked in id order.
                    let pieces = part.pieces(sql.document);
                    let transaction = &transaction;
                    let counts = futures_util::future::try_join_all(
                        pieces
                            .iter()
                            .map(|piece| async move { transaction.execute(statement, &piece.as_sql(false)).await }),
                    )
                    .await?;
                    counts.iter().sum()
                }
                Statement::CompareAndSet => {
                    transaction.query_one(statement, &part.all(sql.document).as_sql(true)).await?.get::<_, i64>(0)
                        as u64
                }
                Statement::Copy => copy_in(&transaction, statement, part, sql).await.map_err(StepError::Copy)?,
            };
            written.push(count);
        }
        Ok::<_, StepError>(written)
    };
    let written = match epoch {
        Some(ours) => {
            // The fencing check and the writes are sent together
            // (pipelined: one round trip less per batch); the server runs
            // them in order, and the transaction commits only if the epoch
            // read under the share lock is still ours.
            let fence = transaction.prepare_cached(super::lease::FENCE_SQL).await?;
            let check = transaction.query_opt(&fence, &[&super::lease::LEASE_NAME]);
            let (current, written) = futures_util::future::join(check, writes).await;
            // A lost lease comes first: a fenced process reports nothing
            // as refused (no dead letters), it stops.
            match super::lease::Fence::of(current?.as_ref(), ours) {
                super::lease::Fence::Ours => {}
                super::lease::Fence::Expired => return Err(WriteError::LeaseLapsed),
                super::lease::Fence::Taken(current) => return Err(WriteError::Fenced { ours, current }),
            }
            written
        }
        None => writes.await,
    };
    let written = match written {
        Ok(written) => written,
        Err(StepError::Copy(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Ok(Written::CopiedOverARow(e));
        }
        Err(StepError::Copy(e) | StepError::Other(e)) => return Err(e.into()),
    };
    let mismatches = find_mismatches(&transaction, kinds, encoded, &written).await?;
    if !mismatches.is_empty() {
        return Err(WriteError::Conflicts(mismatches));
    }
    // Under the lease, standbys follow what is committed.
    if let (Some(ours), true) = (epoch, commit) {
        let written: Vec<(&str, &[&str])> =
            encoded.kinds.iter().map(|part| (kinds[part.kind].name, part.ids.as_slice())).collect();
        super::feed::append(&transaction, &written, ours).await?;
    }
    for (kind, resolution, ids) in &encoded.resolve {
        let statement = transaction.prepare_cached(RESOLVE_DEAD_LETTERS_SQL).await?;
        transaction.execute(&statement, &[&kinds[*kind].name, ids, &resolution.as_str()]).await?;
    }
    if commit {
        transaction.commit().await?;
    } else {
        transaction.rollback().await?;
    }
    Ok(Written::Done)
}

/// How much of a `COPY`'s data goes into one message.
const COPY_CHUNK: usize = 256 * 1024;

/// Streams `part`'s rows into its table with the prepared `COPY` of
/// `sql` (binary for a document table, of its type; text for typed
/// columns); the number of rows copied.
async fn copy_in(
    transaction: &deadpool_postgres::Transaction<'_>,
    statement: &tokio_postgres::Statement,
    part: &KindRows<'_>,
    sql: &sql::TableSql,
) -> Result<u64, tokio_postgres::Error> {
    let mut data = if sql.copy_binary { copy_binary(part, sql.document) } else { copy_text(part) };
    let sink = transaction.copy_in::<_, Bytes>(statement).await?;
    futures_util::pin_mut!(sink);
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(COPY_CHUNK)).freeze();
        sink.feed(chunk).await?;
    }
    sink.as_mut().finish().await
}

/// PostgreSQL's binary `COPY` header: the signature, no flags, no header
/// extension.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// A document table's rows in the binary `COPY` format: per row four
/// fields, each its length and its bytes in the type's binary form (text,
/// int8, bool, json or jsonb), -1 for NULL.
fn copy_binary(part: &KindRows<'_>, document: DocumentType) -> BytesMut {
    let size = part.ids.iter().map(|id| id.len()).sum::<usize>() + part.data.text.len();
    let mut out = BytesMut::with_capacity(COPY_HEADER.len() + size + part.ids.len() * 36 + 2);
    out.put_slice(COPY_HEADER);
    for (((id, version), deleted), data) in part.ids.iter().zip(&part.versions).zip(&part.deleted).zip(part.data.iter())
    {
        out.put_i16(4);
        out.put_i32(field_length(id.len()));
        out.put_slice(id.as_bytes());
        out.put_i32(8);
        out.put_i64(*version);
        out.put_i32(1);
        out.put_u8(u8::from(*deleted));
        match data {
            Some(json) => put_json(&mut out, json, document),
            None => out.put_i32(-1),
        }
    }
    out.put_i16(-1);
    out
}

/// A field's length for the binary format. No value of a row reaches it:
/// PostgreSQL refuses any field over 1 GiB, and one that long is refused
/// whatever length is written here.
fn field_length(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

/// A typed-column table's rows in the text `COPY` format: tab-separated,
/// one line per row, `\N` for NULL, each value parsed by its column's type.
fn copy_text(part: &KindRows<'_>) -> BytesMut {
    let mut out = BytesMut::with_capacity(part.ids.len() * (48 + 16 * part.columns.len()));
    for (row, id) in part.ids.iter().enumerate() {
        put_text(&mut out, id);
        out.put_u8(b'\t');
        // Writing into a growable buffer cannot fail.
        let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{}", part.versions[row]));
        out.put_slice(if part.deleted[row] { b"\tt" } else { b"\tf" });
        for column in &part.columns {
            out.put_u8(b'\t');
            match &column[row] {
                Some(value) => put_text(&mut out, value),
                None => out.put_slice(b"\\N"),
            }
        }
        out.put_u8(b'\n');
    }
    out
}

/// A value in the text `COPY` format: backslash, tab, newline and carriage
/// return escaped.
fn put_text(out: &mut BytesMut, text: &str) {
    for &byte in text.as_bytes() {
        match byte {
            b'\\' => out.put_slice(b"\\\\"),
            b'\t' => out.put_slice(b"\\t"),
            b'\n' => out.put_slice(b"\\n"),
            b'\r' => out.put_slice(b"\\r"),
            other => out.put_u8(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::types::{FromSql, ToSql, Type};

    use super::*;

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct Doc {
        id: String,
        n: u64,
    }

    impl crate::entity::Entity for Doc {
        const KIND: &'static str = "doc";
        const TABLE: &'static str = "docs";
        fn id(&self) -> &str {
            &self.id
        }
    }

    /// A row whose JSON its caller already made is written with those
    /// bytes; the others are serialized.
    #[test]
    fn a_made_json_is_written_as_made() {
        let doc = Doc { id: "a".into(), n: 1 };
        let mut column = JsonColumn::with_rows(3);
        column.push(Some(&doc), Some(br#"{"id":"a","n":1,"made":true}"#)).unwrap();
        column.push(Some(&doc), None).unwrap();
        column.push(None, Some(b"{}")).unwrap();
        let rows: Vec<_> = column.iter().map(|r| r.map(<[u8]>::to_vec)).collect();
        assert_eq!(
            rows,
            [Some(br#"{"id":"a","n":1,"made":true}"#.to_vec()), Some(serde_json::to_vec(&doc).unwrap()), None]
        );
    }

    fn column(rows: &[Option<Doc>]) -> JsonColumn {
        let mut column = JsonColumn::with_rows(rows.len());
        for row in rows {
            column.push(row.as_ref().map(|doc| doc as &dyn Stored), None).unwrap();
        }
        column
    }

    /// `rows` as PostgreSQL's own array decoding reads them back from a
    /// `json[]` or `jsonb[]` parameter (of the rows' document type).
    fn read_back(rows: JsonRows<'_>) -> Vec<Option<serde_json::Value>> {
        let ty = match rows.document {
            DocumentType::Json => Type::JSON_ARRAY,
            DocumentType::Jsonb => Type::JSONB_ARRAY,
        };
        let mut buf = BytesMut::new();
        rows.to_sql_checked(&ty, &mut buf).unwrap();
        // The header names the element type (after dimensions and flags).
        assert_eq!(&buf[8..12], element_type(rows.document).oid().to_be_bytes(), "element type");
        <Vec<Option<serde_json::Value>>>::from_sql(&ty, &buf).unwrap()
    }

    fn values(rows: &[Option<Doc>]) -> Vec<Option<serde_json::Value>> {
        rows.iter().map(|row| row.as_ref().map(|doc| serde_json::to_value(doc).unwrap())).collect()
    }

    /// The column reads back, as PostgreSQL's own array decoding reads a
    /// `json[]` or a `jsonb[]`, to the rows it was given, tombstones as
    /// NULL.
    #[test]
    fn a_json_column_is_a_json_or_jsonb_array_of_its_rows() {
        let rows = [
            Some(Doc { id: "a".into(), n: 1 }),
            None,
            Some(Doc { id: "b\"\u{e9}".into(), n: u64::MAX }),
            Some(Doc { id: String::new(), n: 0 }),
        ];
        for document in [DocumentType::Json, DocumentType::Jsonb] {
            for rows in [&rows[..], &rows[..1], &rows[1..2], &rows[..0]] {
                let column = column(rows);
                assert_eq!(read_back(JsonRows { column: &column, rows: 0..rows.len(), document }), values(rows));
            }
            // A statement's piece of a column: only its rows.
            let all = column(&rows);
            for piece in [0..4, 1..3, 2..4, 3..3] {
                assert_eq!(read_back(JsonRows { column: &all, rows: piece.clone(), document }), values(&rows[piece]));
            }
        }
        assert!(JsonRows::accepts(&Type::JSON_ARRAY) && JsonRows::accepts(&Type::JSONB_ARRAY));
        assert!(!JsonRows::accepts(&Type::JSONB) && !JsonRows::accepts(&Type::TEXT_ARRAY));
    }

    /// A kind's rows split into statements of at most `UPSERT_ROWS` rows,
    /// in order, every row in exactly one.
    #[test]
    fn pieces_cover_every_row_once_in_order() {
        for rows in [0, 1, UPSERT_ROWS, UPSERT_ROWS + 1, 2 * UPSERT_ROWS + 201] {
            let ids: Vec<String> = (0..rows).map(|i| format!("d{i:05}")).collect();
            let part = KindRows {
                kind: 0,
                ids: ids.iter().map(String::as_str).collect(),
                versions: (0..rows as i64).collect(),
                deleted: vec![false; rows],
                data: column(&vec![None; rows]),
                columns: Vec::new(),
                bases: (0..rows as i64).map(|v| v + 1).collect(),
                rows: (0..rows).collect(),
                fresh: false,
            };
            let pieces = part.pieces(DocumentType::Json);
            assert!(pieces.iter().all(|p| !p.ids.is_empty() && p.ids.len() <= UPSERT_ROWS));
            assert_eq!(pieces.len(), rows.div_ceil(UPSERT_ROWS));
            let ids: Vec<&str> = pieces.iter().flat_map(|p| p.ids.iter().copied()).collect();
            assert_eq!(ids, part.ids);
            let versions: Vec<i64> = pieces.iter().flat_map(|p| p.versions.iter().copied()).collect();
            assert_eq!(versions, part.versions);
            let bases: Vec<i64> = pieces.iter().flat_map(|p| p.bases.iter().copied()).collect();
            assert_eq!(bases, part.bases);
            assert_eq!(pieces.iter().map(|p| p.data.rows.len()).sum::<usize>(), rows);
        }
    }

    /// Rows longer than the first (the buffer is sized from it) keep their
    /// own text, and a tombstone has none.
    #[test]
    fn each_row_keeps_its_own_text() {
        let long = "x".repeat(1000);
        let rows = [Some(Doc { id: "short".into(), n: 1 }), Some(Doc { id: long.clone(), n: 2 }), None];
        let column = column(&rows);
        let texts: Vec<Option<&[u8]>> = column.iter().collect();
        assert_eq!(texts[0], Some(&br#"{"id":"short","n":1}"#[..]));
        assert_eq!(texts[1], Some(format!(r#"{{"id":"{long}","n":2}}"#).as_bytes()));
        assert_eq!(texts[2], None);
    }
}
