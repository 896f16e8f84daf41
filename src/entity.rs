//! Entity kinds: the user's own types, described by the [`Entity`] trait,
//! secondary [`Index`]es over them, and the registry form (`KindInfo`) the
//! store, the worker and hydration handle them in. No SQL: a kind's
//! statements are built in `pg` from its table name.

use std::any::{Any, TypeId};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use metrics::{Counter, Gauge};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::metrics as m;

/// A kind of entity kept by the [`Store`](crate::Store) and persisted to its
/// own table. Usually derived: `#[derive(outbox::Entity)]` with
/// `#[entity(kind = "account", table = "accounts")]` and `#[entity(id)]` on
/// the id field.
///
/// By default ([`Layout::Document`]) the table holds the entity as one
/// JSON document (`outbox::pg::create_table_sql` writes this):
///
/// ```sql
/// CREATE TABLE items (
///     id         text        PRIMARY KEY,
///     version    bigint      NOT NULL,
///     deleted    boolean     NOT NULL DEFAULT false,
///     data       json,                 -- the entity; NULL for a tombstone
///     updated_at timestamptz NOT NULL DEFAULT now()
/// );
/// ```
///
/// A `jsonb` column works as well (the start-up check finds which type the
/// table has; see [`DocumentType`] for what each costs). Columns worth
/// indexing can be added as generated columns over `data` (`status text
/// GENERATED ALWAYS AS (data->>'status') STORED`). With
/// [`Layout::Columns`] the fields go to typed columns of their own instead.
pub trait Entity: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The kind's name: a metric label, a log field, a dead letter's kind.
    /// Short, lowercase, fixed.
    const KIND: &'static str;
    /// The table the kind is persisted to.
    const TABLE: &'static str;
    /// How the table stores it.
    const LAYOUT: Layout = Layout::Document;
    /// The entity's id, unique within its kind. It must not change.
    fn id(&self) -> &str;

    /// The id as a shared string, equal to [`id`](Self::id). The store
    /// keys the entity's slot with it: an entity that holds its id in an
    /// `Arc<str>` returns a clone of it, and the key costs no allocation of
    /// its own (tens of MB for a million entities).
    fn shared_id(&self) -> Arc<str> {
        Arc::from(self.id())
    }
}

/// How a kind's table stores its entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One `data` column holding the entity as JSON (`json` or `jsonb`).
    Document,
    /// One typed column per field, named after it (the id field is the
    /// `id` column). The entity is read back from those columns as a JSON
    /// object of the same names, so its fields serialize under their own
    /// names. Every such column is nullable (a tombstone keeps none).
    Columns {
        /// The name of the id field.
        id_field: &'static str,
        /// The other fields' columns.
        columns: &'static [Column],
    },
}

/// The type of a document table's `data` column. The engine writes and
/// reads either; which one a table has is found at start-up.
///
/// `json` keeps the text as written: PostgreSQL checks it on the way in
/// and hands it back as it is, where `jsonb` parses it into its own form on
/// every write and turns that into text again on every read (a full read of
/// a million reference items took about 2.5 s of the database's CPU as
/// `jsonb` and under 1 s as `json`). `jsonb` is for tables queried by
/// containment or indexed with GIN from SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DocumentType {
    /// `json`: the text as written. What new tables get.
    #[default]
    Json,
    /// `jsonb`: PostgreSQL's parsed form.
    Jsonb,
}

impl DocumentType {
    /// The type's SQL name.
    pub fn sql_name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Jsonb => "jsonb",
        }
    }

    /// The SQL name of an array of the type.
    pub(crate) fn array_sql_name(self) -> &'static str {
        match self {
            Self::Json => "json[]",
            Self::Jsonb => "jsonb[]",
        }
    }

    /// The type named `name` (as `information_schema` spells it), if it
    /// is one of the two.
    pub(crate) fn named(name: &str) -> Option<Self> {
        match name {
            "json" => Some(Self::Json),
            "jsonb" => Some(Self::Jsonb),
            _ => None,
        }
    }
}

/// A typed column of a kind's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// The column's (and the field's) name.
    pub name: &'static str,
    /// Its PostgreSQL type (`text`, `bigint`, `numeric`, `timestamptz`,
    /// `jsonb`, ...).
    pub sql_type: &'static str,
}

/// The JSON of one version of an entity, made at most once, by the caller
/// rendering its answer (`Versioned::json`); the worker writes it as made,
/// or serializes the entity itself when nobody made it.
pub(crate) type JsonOnce = Arc<std::sync::OnceLock<Vec<u8>>>;

/// An entity in its type-erased form, as the store holds it.
pub(crate) trait Stored: Any + Send + Sync {
    /// Appends the entity's JSON to `out`.
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error>;
    /// The entity as a JSON value (for typed columns: no text to parse
    /// back).
    fn to_value(&self) -> Result<serde_json::Value, serde_json::Error>;
    /// For downcasting to the concrete type.
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    /// For downcasting a borrowed value.
    fn as_any(&self) -> &dyn Any;
    fn shared_id(&self) -> Arc<str>;
}

impl<E: Entity> Stored for E {
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        serde_json::to_writer(out, self)
    }

    fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(self)
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn shared_id(&self) -> Arc<str> {
        let id = Entity::shared_id(self);
        debug_assert_eq!(&*id, self.id(), "Entity::shared_id equals Entity::id");
        id
    }
}

/// Turns a stored value back into its concrete type.
pub(crate) fn downcast<E: Entity>(value: &Arc<dyn Stored>) -> Arc<E> {
    value
        .clone()
        .into_any()
        .downcast::<E>()
        .unwrap_or_else(|_| panic!("a slot of kind {} holds another type; kinds are indexed by TypeId", E::KIND))
}

/// Index of a kind in the store's list of kinds.
pub(crate) type KindId = usize;

pub(crate) type Decode = fn(&[u8]) -> Result<Arc<dyn Stored>, serde_json::Error>;

/// Decodes a stored entity. The text is checked to be UTF-8 once, as a
/// whole, and then parsed as text: parsed as bytes, serde_json would check
/// each string on its own, which costs more than one pass over the text.
fn decode<E: Entity>(json: &[u8]) -> Result<Arc<dyn Stored>, serde_json::Error> {
    let text = std::str::from_utf8(json).map_err(|e| {
        <serde_json::Error as serde::de::Error>::custom(format_args!("invalid UTF-8 at byte {}", e.valid_up_to()))
    })?;
    Ok(Arc::new(serde_json::from_str::<E>(text)?))
}

/// Everything the store, the worker and hydration need to know of a kind,
/// with its metric handles resolved once (the change path only adds to an
/// atomic).
pub(crate) struct KindInfo {
    pub(crate) type_id: TypeId,
    pub(crate) name: &'static str,
    pub(crate) table: &'static str,
    pub(crate) layout: Layout,
    /// The type of a document table's `data` column, once found (by the
    /// start-up check of the tables, or by the first write of a worker
    /// started without it): 0 while not known, 1 `json`, 2 `jsonb`. An
    /// atomic rather than a `OnceLock`: a write that fails the way a
    /// changed column type makes writes fail looks it up again.
    document: AtomicU8,
    pub(crate) decode: Decode,
    pub(crate) mutations: Counter,
    pub(crate) coalesced: Counter,
    pub(crate) persisted: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) conflicts: Counter,
    pub(crate) hydrated: Gauge,
}

impl KindInfo {
    pub(crate) fn of<E: Entity>() -> Self {
        let labels = [("entity", E::KIND)];
        let kind = Self {
            type_id: TypeId::of::<E>(),
            name: E::KIND,
            table: E::TABLE,
            layout: E::LAYOUT,
            document: AtomicU8::new(0),
            decode: decode::<E>,
            mutations: metrics::counter!(m::MUTATIONS_TOTAL, &labels),
            coalesced: metrics::counter!(m::COALESCED_TOTAL, &labels),
            persisted: metrics::counter!(m::PERSISTED_TOTAL, &labels),
            dead_letters: metrics::counter!(m::DEAD_LETTERS_TOTAL, &labels),
            conflicts: metrics::counter!(m::CONFLICTS_TOTAL, &labels),
            hydrated: metrics::gauge!(m::HYDRATED_ENTITIES, &labels),
        };
        // Register every series at zero so it exists from the first scrape.
        for counter in [&kind.mutations, &kind.coalesced, &kind.persisted, &kind.dead_letters, &kind.conflicts] {
            counter.increment(0);
        }
        kind.hydrated.set(0.0);
        kind
    }

    /// The type of a document table's `data` column, if known.
    pub(crate) fn document(&self) -> Option<DocumentType> {
        // Relaxed: the code stands alone (no other memory is published
        // with it), and a writer that reads a former type fails, looks the
        // type up again and writes once more.
        match self.document.load(Ordering::Relaxed) {
            1 => Some(DocumentType::Json),
            2 => Some(DocumentType::Jsonb),
            _ => None,
        }
    }

    /// Notes the type of a document table's `data` column.
    pub(crate) fn set_document(&self, document: DocumentType) {
        let code = match document {
            DocumentType::Json => 1,
            DocumentType::Jsonb => 2,
        };
        self.document.store(code, Ordering::Relaxed);
    }
}

/// A secondary index over one kind, kept in step with the store: it is
/// updated in the same critical section as every change (and at hydration),
/// so a read through [`View::index`](crate::store::View::index) always agrees with
/// the entities.
pub trait Index<E: Entity>: Send + Sync + 'static {
    /// Entity `id` changed from `old` to `new` (`None`: absent or deleted).
    fn update(&mut self, id: &Arc<str>, old: Option<&E>, new: Option<&E>);

    /// About `additional` entities are about to be loaded (hydration): a
    /// chance to size the index once.
    fn reserve(&mut self, additional: usize) {
        let _ = additional;
    }

    /// Hydration of the kind has finished: a chance to rebuild what loading
    /// one entity at a time left loose (spare room, half-full nodes).
    fn hydrated(&mut self) {}
}

/// An index in its type-erased form.
pub(crate) trait ErasedIndex: Send + Sync {
    fn update(&mut self, id: &Arc<str>, old: Option<&dyn Stored>, new: Option<&dyn Stored>);
    fn reserve(&mut self, additional: usize);
    fn hydrated(&mut self);
    fn as_any(&self) -> &dyn Any;
}

/// Adapts an [`Index`] of `E` to [`ErasedIndex`].
pub(crate) struct TypedIndex<E, I> {
    pub(crate) index: I,
    pub(crate) kind: std::marker::PhantomData<fn(&E)>,
}

impl<E: Entity, I: Index<E>> ErasedIndex for TypedIndex<E, I> {
    fn update(&mut self, id: &Arc<str>, old: Option<&dyn Stored>, new: Option<&dyn Stored>) {
        fn cast<E: Entity>(value: Option<&dyn Stored>) -> Option<&E> {
            value.and_then(|v| v.as_any().downcast_ref::<E>())
        }
        self.index.update(id, cast::<E>(old), cast::<E>(new));
    }

    fn reserve(&mut self, additional: usize) {
        self.index.reserve(additional);
    }

    fn hydrated(&mut self) {
        self.index.hydrated();
    }

    fn as_any(&self) -> &dyn Any {
        &self.index
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::{Entity, decode};

    #[derive(Clone, Serialize, Deserialize)]
    struct Note {
        id: String,
        text: String,
    }

    impl Entity for Note {
        const KIND: &'static str = "note";
        const TABLE: &'static str = "notes";
        fn id(&self) -> &str {
            &self.id
        }
    }

    #[test]
    fn stored_json_decodes_and_bad_text_is_refused_with_where() {
        let note = decode::<Note>(r#"{"id":"n1","text":"caf\u00e9 ☕"}"#.as_bytes()).unwrap();
        let note = note.into_any().downcast::<Note>().unwrap_or_else(|_| panic!("a note"));
        assert_eq!((note.id.as_str(), note.text.as_str()), ("n1", "café ☕"));
        let mut bad = br#"{"id":"n1","text":"ab"}"#.to_vec();
        bad[19] = 0xff;
        let error = decode::<Note>(&bad).err().expect("not UTF-8").to_string();
        assert_eq!(error, "invalid UTF-8 at byte 19");
        let error = decode::<Note>(br#"{"id":"n1"}"#).err().expect("a field is missing").to_string();
        assert!(error.contains("missing field `text`"), "{error}");
    }
}
