//! Input limits of the reference API (rule *Refuse bad input whole*). Every request is
//! validated whole before the store is touched, so a refused request changes
//! nothing. The limits are documented in the README and the OpenAPI
//! document.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::model::Identifier;

/// Most identifiers on one item (and in one request).
pub const MAX_IDENTIFIERS: usize = 100;
/// Longest identifier key, in characters.
pub const MAX_KEY_LEN: usize = 128;
/// Longest identifier value, in characters.
pub const MAX_VALUE_LEN: usize = 512;
/// Most top-level keys of `enriched_data`.
pub const MAX_ENRICHED_KEYS: usize = 256;
/// Largest `enriched_data` of one item, serialized, in bytes.
pub const MAX_ENRICHED_BYTES: usize = 64 * 1024;
/// Most items in one batch create.
pub const MAX_BATCH: usize = 1000;
/// Longest circuit name, in characters.
pub const MAX_NAME_LEN: usize = 200;
/// Most items in one circuit.
pub const MAX_CIRCUIT_ITEMS: usize = 10_000;
/// Most circuits one item belongs to: deleting an item changes it and all
/// its circuits in one change set, which must fit the outbox.
pub const MAX_ITEM_CIRCUITS: usize = 100;
/// Most local ids in one local merge.
pub const MAX_LOCAL_MERGE: usize = 100;
/// Longest id accepted in a path or body, in characters.
pub const MAX_ID_LEN: usize = 128;
/// Default and largest page of `GET /api/items`.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page of `GET /api/items`.
pub const MAX_PAGE: usize = 1000;

/// Checks identifiers (`at` names where they are, for the message); `min`
/// is the fewest accepted.
pub fn identifiers(list: &[Identifier], min: usize, at: &str) -> Result<(), ApiError> {
    if list.len() < min {
        return Err(ApiError::unprocessable(format!("{at}: at least {min} identifier(s) required")));
    }
    if list.len() > MAX_IDENTIFIERS {
        return Err(ApiError::unprocessable(format!("{at}: at most {MAX_IDENTIFIERS} identifiers allowed")));
    }
    for (i, identifier) in list.iter().enumerate() {
        text(&identifier.key, 1, MAX_KEY_LEN, &format!("{at}[{i}].key"))?;
        text(&identifier.value, 1, MAX_VALUE_LEN, &format!("{at}[{i}].value"))?;
    }
    Ok(())
}

/// Checks a string's length in characters (as JSON Schema's `maxLength`
/// counts) and that it has no control characters.
pub fn text(value: &str, min: usize, max: usize, at: &str) -> Result<(), ApiError> {
    let length = value.chars().count();
    if length < min {
        return Err(ApiError::unprocessable(format!("{at}: must not be empty")));
    }
    if length > max {
        return Err(ApiError::unprocessable(format!("{at}: at most {max} characters allowed ({length} given)")));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(format!("{at}: control characters are not allowed")));
    }
    Ok(())
}

/// Checks `enriched_data` (as it would be stored).
pub fn enriched_data(data: &Map<String, Value>, at: &str) -> Result<(), ApiError> {
    if data.len() > MAX_ENRICHED_KEYS {
        return Err(ApiError::unprocessable(format!("{at}: at most {MAX_ENRICHED_KEYS} keys allowed")));
    }
    for key in data.keys() {
        text(key, 1, MAX_KEY_LEN, &format!("{at} key"))?;
    }
    if data.iter().any(|(key, value)| key.contains('\0') || holds_nul(value)) {
        return Err(ApiError::unprocessable(format!("{at}: the NUL character (\\u0000) cannot be stored")));
    }
    let size = serde_json::to_vec(data).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_ENRICHED_BYTES {
        return Err(ApiError::unprocessable(format!(
            "{at}: at most {MAX_ENRICHED_BYTES} bytes allowed ({size} given)"
        )));
    }
    Ok(())
}

/// Whether a JSON value holds a NUL character anywhere. PostgreSQL cannot
/// hold it in text or jsonb, and the item table's generated `status`, the
/// conflict check and the dead letters read documents as one or the other,
/// so it could never be persisted.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// Checks an id taken from a path or a body.
pub fn id(value: &str, at: &str) -> Result<(), ApiError> {
    text(value, 1, MAX_ID_LEN, at)
}

/// Adds `extra` identifiers to `list`, skipping duplicates; returns those
/// added.
pub fn add_identifiers(list: &mut Vec<Identifier>, extra: &[Identifier]) -> Vec<Identifier> {
    let mut added = Vec::new();
    for identifier in extra {
        if !list.contains(identifier) {
            list.push(identifier.clone());
            added.push(identifier.clone());
        }
    }
    added
}

/// `list` without duplicates, first occurrence kept.
pub fn dedup_identifiers(list: Vec<Identifier>) -> Vec<Identifier> {
    let mut out = Vec::with_capacity(list.len());
    add_identifiers(&mut out, &list);
    out
}
