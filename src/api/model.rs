//! The reference service's entity kinds: items, circuits and
//! local-id mappings. They are ordinary [`Entity`] implementations: the
//! engine knows nothing else about them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

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

/// An identifier's key (`gtin`, `sku`, ...). A handful of keys are shared
/// by millions of identifiers, so each distinct key is held once for the
/// process's lifetime (interned) and every identifier points to it: 16
/// bytes and no allocation of its own. An interned key is a plain pointer,
/// without a reference count: a count shared by every item would move its
/// cache line between the cores for each identifier two threads decode at
/// once (hydration's decoders), which cost a fifth of decoding an item.
/// The interner keeps at most [`INTERNED_KEYS`] keys; keys beyond that are
/// held by their identifiers alone, so requests with ever new keys cannot
/// grow it. Each thread that decodes identifiers keeps a map of the
/// interned keys it has met (at most [`INTERNED_KEYS`] of them, pointers
/// only).
#[derive(Clone)]
pub struct IdentifierKey(Key);

/// An interned key is a `&'static String`, a thin pointer, so that the
/// enum takes the 16 bytes of the boxed string alone.
#[derive(Clone)]
enum Key {
    Interned(&'static String),
    Own(Box<str>),
}

const _: () = assert!(std::mem::size_of::<IdentifierKey>() == 16, "an identifier key is two words");

/// Most distinct identifier keys the interner keeps.
pub const INTERNED_KEYS: usize = 4096;

impl IdentifierKey {
    /// The key `text`, interned while the interner has room.
    pub fn new(text: &str) -> Self {
        static KEYS: OnceLock<Interner> = OnceLock::new();
        thread_local! {
            // The keys this thread has met, read without the interner's
            // lock (whose count, too, every thread would share).
            static MET: RefCell<HashMap<&'static str, &'static String, foldhash::fast::RandomState>> =
                RefCell::default();
        }
        if let Some(key) = MET.with_borrow(|met| met.get(text).copied()) {
            return Self(Key::Interned(key));
        }
        match KEYS.get_or_init(|| Interner::new(INTERNED_KEYS)).get(text) {
            Some(key) => {
                MET.with_borrow_mut(|met| met.insert(key.as_str(), key));
                Self(Key::Interned(key))
            }
            None => Self(Key::Own(Box::from(text))),
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Key::Interned(key) => key,
            Key::Own(key) => key,
        }
    }
}

impl PartialEq for IdentifierKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for IdentifierKey {}

impl PartialOrd for IdentifierKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IdentifierKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::hash::Hash for IdentifierKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

/// Distinct strings held once for the process's lifetime, up to a bound.
struct Interner {
    keys: RwLock<HashMap<&'static str, &'static String>>,
    bound: usize,
}

impl Interner {
    fn new(bound: usize) -> Self {
        Self { keys: RwLock::default(), bound }
    }

    /// `text` as the interner holds it; `None` when it is not held and the
    /// interner is full.
    fn get(&self, text: &str) -> Option<&'static String> {
        if let Some(key) = self.keys.read().unwrap_or_else(PoisonError::into_inner).get(text) {
            return Some(*key);
        }
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(key) = keys.get(text) {
            return Some(*key);
        }
        if keys.len() >= self.bound {
            return None;
        }
        // Held for the process's lifetime, a bounded number of them.
        let key: &'static String = Box::leak(Box::new(text.to_owned()));
        keys.insert(key.as_str(), key);
        Some(key)
    }
}

impl std::ops::Deref for IdentifierKey {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for IdentifierKey {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl From<String> for IdentifierKey {
    fn from(text: String) -> Self {
        Self::new(&text)
    }
}

impl PartialEq<str> for IdentifierKey {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<String> for IdentifierKey {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl std::fmt::Debug for IdentifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for IdentifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for IdentifierKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for IdentifierKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = IdentifierKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<IdentifierKey, E> {
                Ok(IdentifierKey::new(text))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// One identifier of an item: a key (e.g. `gtin`) and its value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Identifier {
    /// What kind of identifier.
    #[schema(value_type = String)]
    pub key: IdentifierKey,
    /// Its value. (A boxed string: 8 bytes less than a `String`, for
    /// millions of identifiers that never grow.)
    #[schema(value_type = String)]
    pub value: Box<str>,
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
///
/// Its strings are shared or boxed rather than `String`s, which keeps the
/// struct within 144 bytes (with its reference counts, one 160-byte block
/// of the allocator, not 192) for the millions a store holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Item {
    /// The item's id. Shared with the store's key of the item, so it is
    /// held once (see [`Entity::shared_id`]).
    #[schema(value_type = String)]
    pub dfid: Arc<str>,
    /// The local id it was created under, for local items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub local_id: Option<Box<str>>,
    /// Life-cycle status.
    pub status: ItemStatus,
    /// Identifiers, without duplicates.
    #[serde(deserialize_with = "exact_vec")]
    pub identifiers: Vec<Identifier>,
    /// Free-form data, merged key by key on update.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub enriched_data: JsonObject,
    /// The item this one was merged into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub merged_into: Option<Box<str>>,
    /// Circuits the item belongs to (at most 100).
    #[serde(default, deserialize_with = "exact_vec")]
    pub circuits: Vec<String>,
    /// When it was created.
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub updated_at: DateTime<Utc>,
}

/// A timestamp as JSON, exactly as chrono writes it (RFC 3339 in UTC with
/// `Z`, and 0, 3, 6 or 9 digits of fraction, as few as hold it), but
/// written by hand: chrono's own goes through `fmt` and took half the time
/// of serializing a whole item, which every response and every flushed row
/// pays twice. Years outside 0–9999 are left to chrono.
pub fn rfc3339<S: serde::Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    let year = time.year();
    if !(0..=9999).contains(&year) {
        return time.serialize(serializer);
    }
    // A leap second is written as second 60.
    let (second, nanos) = match time.nanosecond() {
        n if n >= 1_000_000_000 => (60, n - 1_000_000_000),
        n => (time.second(), n),
    };
    let mut out = [0u8; 30];
    let mut at = 0;
    for (value, digits, after) in [
        (year as u32, 4, b'-'),
        (time.month(), 2, b'-'),
        (time.day(), 2, b'T'),
        (time.hour(), 2, b':'),
        (time.minute(), 2, b':'),
        (second, 2, b'.'),
    ] {
        at = put_digits(&mut out, at, value, digits);
        out[at] = after;
        at += 1;
    }
    at = match nanos {
        0 => at - 1, // no fraction: drop the dot
        n if n % 1_000_000 == 0 => put_digits(&mut out, at, n / 1_000_000, 3),
        n if n % 1_000 == 0 => put_digits(&mut out, at, n / 1_000, 6),
        n => put_digits(&mut out, at, n, 9),
    };
    out[at] = b'Z';
    let text = std::str::from_utf8(&out[..=at]).expect("digits and separators are ASCII");
    serializer.serialize_str(text)
}

/// Reads a timestamp as chrono does, with the form [`rfc3339`] writes
/// (`YYYY-MM-DDTHH:MM:SS`, up to nine digits of fraction, `Z`) parsed by
/// hand: chrono's parser was a twentieth of hydration's CPU. Anything else
/// (an offset, a leap second, a lowercase `t`, ...) goes to chrono, so
/// what is accepted, and every error, is chrono's.
pub fn from_rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = DateTime<Utc>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 timestamp")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DateTime<Utc>, E> {
            match parse_utc(text.as_bytes()) {
                Some(time) => Ok(time),
                None => text.parse::<DateTime<chrono::FixedOffset>>().map(|t| t.with_timezone(&Utc)).map_err(E::custom),
            }
        }
    }
    deserializer.deserialize_str(Visitor)
}

/// `YYYY-MM-DDTHH:MM:SS[.F{1,9}]Z` as a valid UTC time (no leap second),
/// or `None`.
fn parse_utc(text: &[u8]) -> Option<DateTime<Utc>> {
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = text.get(range)?;
        digits.iter().try_fold(0u32, |n, &d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))
    };
    let at = |index: usize, expected: u8| text.get(index) == Some(&expected);
    if !(at(4, b'-') && at(7, b'-') && at(10, b'T') && at(13, b':') && at(16, b':') && text.last() == Some(&b'Z')) {
        return None;
    }
    let nanos = match text.len() {
        20 => 0,
        22..=30 if at(19, b'.') => {
            let digits = text.len() - 21;
            number(20..20 + digits)? * 10u32.pow(9 - digits as u32)
        }
        _ => return None,
    };
    let date = chrono::NaiveDate::from_ymd_opt(number(0..4)? as i32, number(5..7)?, number(8..10)?)?;
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if second > 59 {
        return None;
    }
    Some(date.and_hms_nano_opt(hour, minute, second, nanos)?.and_utc())
}

/// Writes `value` as `digits` decimal digits (zero-padded) at `at`; where
/// they end.
fn put_digits(out: &mut [u8], at: usize, mut value: u32, digits: usize) -> usize {
    for place in (at..at + digits).rev() {
        out[place] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    at + digits
}

/// A vector read from JSON without spare room: a vector grows as its
/// elements arrive (to four at the first), and every hydrated item would
/// keep the slack for its life.
fn exact_vec<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    let mut list = Vec::<T>::deserialize(deserializer)?;
    list.shrink_to_fit();
    Ok(list)
}

impl Entity for Item {
    const KIND: &'static str = "item";
    const TABLE: &'static str = "items";
    fn id(&self) -> &str {
        &self.dfid
    }
    fn shared_id(&self) -> Arc<str> {
        self.dfid.clone()
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
    #[serde(default, deserialize_with = "exact_vec")]
    #[schema(value_type = Vec<String>)]
    pub items: Vec<std::sync::Arc<str>>,
    /// When it was created.
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
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
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The string an interned key points to.
    fn interned(key: &IdentifierKey) -> Option<*const String> {
        match key.0 {
            Key::Interned(held) => Some(held),
            Key::Own(_) => None,
        }
    }

    #[test]
    fn identifier_keys_are_held_once_and_read_back_as_written() {
        let identifiers: Vec<Identifier> =
            serde_json::from_str(r#"[{"key":"gtin","value":"1"},{"key":"gtin","value":"2"}]"#).unwrap();
        let held = interned(&identifiers[0].key);
        assert!(held.is_some(), "interned");
        assert_eq!(held, interned(&identifiers[1].key), "one key, held once");
        assert_eq!(held, interned(&IdentifierKey::from("gtin")));
        let elsewhere = std::thread::spawn(|| interned(&IdentifierKey::from("gtin")).map(|p| p as usize));
        assert_eq!(held.map(|p| p as usize), elsewhere.join().unwrap(), "the same on every thread");
        assert_eq!(identifiers[0].key, *"gtin");
        assert_eq!(serde_json::to_string(&identifiers[1]).unwrap(), r#"{"key":"gtin","value":"2"}"#);
        assert!(serde_json::from_str::<Identifier>(r#"{"key":7,"value":"1"}"#).is_err());
    }

    #[test]
    fn a_decoded_item_keeps_no_spare_room_in_its_lists() {
        let item: Item = serde_json::from_str(
            r#"{"dfid":"d","status":"active","identifiers":[{"key":"gtin","value":"1"}],
                "circuits":["c1","c2","c3","c4","c5"],"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!((item.identifiers.capacity(), item.circuits.capacity()), (1, 5));
    }

    #[test]
    fn the_interner_stops_growing_at_its_bound() {
        let interner = Interner::new(3);
        let kept: Vec<&String> = ["a", "b", "c"].into_iter().map(|k| interner.get(k).unwrap()).collect();
        assert!(std::ptr::eq(kept[2], interner.get("c").unwrap()));
        assert_eq!(interner.get("d"), None, "past the bound keys are not kept");
        assert_eq!(interner.keys.read().unwrap().len(), 3);
    }

    #[test]
    fn keys_past_the_interners_bound_are_held_and_compared_by_text() {
        let own = IdentifierKey(Key::Own("gtin".into()));
        let shared = IdentifierKey::new("gtin");
        assert!(interned(&own).is_none() && interned(&shared).is_some());
        assert_eq!(own, shared);
        assert_eq!(own.cmp(&IdentifierKey::new("sku")), std::cmp::Ordering::Less);
        let hash = |key: &IdentifierKey| std::hash::BuildHasher::hash_one(&foldhash::fast::FixedState::default(), key);
        assert_eq!(hash(&own), hash(&shared));
        assert_eq!(
            (own.as_str(), own.to_string(), serde_json::to_string(&own).unwrap()),
            ("gtin", "gtin".to_owned(), r#""gtin""#.to_owned())
        );
    }

    #[test]
    fn timestamps_are_written_exactly_as_chrono_writes_them() {
        #[derive(Serialize)]
        struct Fast(#[serde(serialize_with = "rfc3339")] DateTime<Utc>);
        let day = |y, m, d| chrono::NaiveDate::from_ymd_opt(y, m, d).unwrap();
        let mut times: Vec<DateTime<Utc>> = Vec::new();
        for (date, nanos) in [
            (day(2026, 12, 2), [0, 5_000_000, 123_456_000, 123_456_789, 999_999_999, 1_000]),
            (day(1970, 1, 1), [0, 1, 10, 100_000_000, 120_000, 7]),
            (day(9999, 12, 31), [0, 999_000_000, 999_999_000, 1, 2, 3]),
            (day(0, 1, 1), [0, 1_000_000, 1_000, 1, 0, 0]),
            (day(-1, 6, 15), [0, 1, 0, 0, 0, 0]),
            (day(10_000, 1, 1), [0, 1, 0, 0, 0, 0]),
        ] {
            for (n, nanos) in nanos.into_iter().enumerate() {
                let time =
                    chrono::NaiveTime::from_hms_nano_opt(n as u32 * 4, n as u32 * 11, n as u32 * 9, nanos).unwrap();
                times.push(date.and_time(time).and_utc());
            }
        }
        // A leap second.
        let leap = chrono::NaiveTime::from_hms_nano_opt(23, 59, 59, 1_250_000_000).unwrap();
        times.push(day(2016, 12, 31).and_time(leap).and_utc());
        times.push(Utc::now());
        for time in times {
            assert_eq!(serde_json::to_string(&Fast(time)).unwrap(), serde_json::to_string(&time).unwrap(), "{time:?}");
        }
        assert_eq!(serde_json::to_string(&Fast(times_fixed())).unwrap(), r#""2026-01-02T03:04:05.006Z""#);
    }

    fn times_fixed() -> DateTime<Utc> {
        chrono::NaiveDate::from_ymd_opt(2026, 1, 2).unwrap().and_hms_milli_opt(3, 4, 5, 6).unwrap().and_utc()
    }

    #[test]
    fn timestamps_are_read_exactly_as_chrono_reads_them() {
        #[derive(Deserialize)]
        struct Fast(#[serde(deserialize_with = "from_rfc3339")] DateTime<Utc>);
        let texts = [
            "2026-12-02T17:25:41Z",
            "2026-12-02T17:25:41.1Z",
            "2026-12-02T17:25:41.123Z",
            "2026-12-02T17:25:41.123456Z",
            "2026-12-02T17:25:41.123456789Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "2024-02-29T12:00:00Z",
            // chrono's ground: offsets, a leap second, other spellings.
            "2026-12-02T17:25:41+02:00",
            "2026-12-02T17:25:41.5-07:30",
            "2016-12-31T23:59:60.25Z",
            "2026-12-02t17:25:41z",
            "2026-12-02 17:25:41Z",
            "2026-12-02T17:25:41.1234567891Z",
            // Refused, by both.
            "2025-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-02T24:00:00Z",
            "2026-12-02T17:61:00Z",
            "2026-12-02T17:25:61Z",
            "2026-12-02T17:25:41.Z",
            "2026-12-02T17:25:41",
            "2026-1-02T17:25:41Z",
            "+2026-12-02T17:25:41Z",
            "2026-12-02T17:25:4aZ",
            "",
        ];
        for text in texts {
            let json = serde_json::to_string(text).unwrap();
            let fast = serde_json::from_str::<Fast>(&json).map(|t| t.0).map_err(|e| e.to_string());
            let chrono = serde_json::from_str::<DateTime<Utc>>(&json).map_err(|e| e.to_string());
            assert_eq!(fast, chrono, "{text}");
        }
        let now = Utc::now();
        let written = serde_json::to_string(&now).unwrap();
        assert_eq!(serde_json::from_str::<Fast>(&written).unwrap().0, now);
        assert_eq!(parse_utc(b"2026-12-02T17:25:41.5Z"), "2026-12-02T17:25:41.5Z".parse::<DateTime<Utc>>().ok());
    }
}
