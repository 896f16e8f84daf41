//! The reference service's entity kinds: items, circuits and
//! local-id mappings. They are ordinary [`Entity`] implementations: the
//! engine knows nothing else about them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A JSON object kept as its serialized text. An item's free-form data is
/// read and written whole far more often than it is looked into (every
/// response and every flush serialize it; only an update merges keys), so
/// holding the text costs a fraction of the memory of a parsed map and
/// hydrates several times faster.
#[derive(Debug, Clone)]
pub struct JsonObject(Box<RawValue>);

impl JsonObject {
    /// `{}`.
    pub fn empty() -> Self {
        Self(RawValue::from_string("{}".to_owned()).expect("{} is JSON"))
    }

    /// From a parsed object.
    pub fn from_map(map: &Map<String, Value>) -> Self {
        Self(serde_json::value::to_raw_value(map).expect("a JSON map serializes"))
    }

    /// The parsed object.
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(self.0.get()).expect("a JsonObject holds a JSON object")
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl Default for JsonObject {
    fn default() -> Self {
        Self::empty()
    }
}

impl PartialEq for JsonObject {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get() || self.to_map() == other.to_map()
    }
}

impl Serialize for JsonObject {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        if !raw.get().trim_start().starts_with('{') {
            return Err(serde::de::Error::custom("expected a JSON object"));
        }
        Ok(Self(raw))
    }
}

use crate::store::Entity;

/// One identifier of an item: a key (e.g. `gtin`) and its value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Identifier {
    /// What kind of identifier.
    pub key: String,
    /// Its value.
    pub value: String,
}

/// Where an item is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    /// In use.
    Active,
    /// Merged into another item (`merged_into`).
    Merged,
    /// No longer in use.
    Deprecated,
}

impl ItemStatus {
    /// The status as it appears in JSON and queries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Merged => "merged",
            Self::Deprecated => "deprecated",
        }
    }
}

/// An item, identified by its DFID.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Item {
    /// The item's id.
    pub dfid: String,
    /// The local id it was created under, for local items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_id: Option<String>,
    /// Life-cycle status.
    pub status: ItemStatus,
    /// Identifiers, without duplicates.
    pub identifiers: Vec<Identifier>,
    /// Free-form data, merged key by key on update.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub enriched_data: JsonObject,
    /// The item this one was merged into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// Circuits the item belongs to (at most 100).
    #[serde(default)]
    pub circuits: Vec<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl Entity for Item {
    const KIND: &'static str = "item";
    const TABLE: &'static str = "items";
    fn id(&self) -> &str {
        &self.dfid
    }
}

/// A circuit: a named set of items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Circuit {
    /// The circuit's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// DFIDs of its items. Shared strings: a change copies the list by
    /// reference counts, not by allocating every DFID again (a circuit may
    /// hold thousands).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub items: Vec<std::sync::Arc<str>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl Entity for Circuit {
    const KIND: &'static str = "circuit";
    const TABLE: &'static str = "circuits";
    fn id(&self) -> &str {
        &self.id
    }
}

/// A local id (LID) and the DFID it maps to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalMapping {
    /// The local id.
    pub local_id: String,
    /// The item it maps to now.
    pub dfid: String,
    /// Set while the local id's item is merged into another by a local
    /// merge: what the unmerge restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<LocalMerge>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// What a local merge changed, so that the unmerge can restore it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalMerge {
    /// The item merged into.
    pub target_dfid: String,
    /// The merged item as it was before the merge.
    pub source_before: Item,
    /// Identifiers the target gained (it did not have them before).
    pub added_identifiers: Vec<Identifier>,
}

impl Entity for LocalMapping {
    const KIND: &'static str = "local_id";
    const TABLE: &'static str = "local_ids";
    fn id(&self) -> &str {
        &self.local_id
    }
}

/// A new DFID.
pub fn new_dfid() -> String {
    format!("DFID-{}", uuid::Uuid::new_v4().simple())
}
