//! Item routes. Every mutation is one change set through the
//! store: there is no other way to change an item, so none can be left
//! unpersisted.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::Shared;
use super::error::ApiError;
use super::extract::{ApiJson, ApiQuery, Durable};
use super::index::{ItemFilter, ItemIndex};
use super::model::{Circuit, Identifier, Item, ItemStatus, JsonObject, new_dfid};
use super::validate::{self, DEFAULT_PAGE, MAX_BATCH, MAX_IDENTIFIERS, MAX_PAGE};
use crate::store::{ChangeSet, StoreError, Versioned};

/// An item as the API returns it: its fields and its version.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ItemView {
    /// The item.
    #[serde(flatten)]
    pub item: Item,
    /// Its version: 1 at creation, one more for every change set that
    /// touched it.
    pub version: u64,
}

impl From<Versioned<Item>> for ItemView {
    fn from(v: Versioned<Item>) -> Self {
        Self { version: v.version, item: Item::clone(&v.value) }
    }
}

/// An item as the API returns it ([`ItemView`]'s JSON), made from the
/// item's own JSON with the version added, without copying the item: for
/// an item a change set has just made, the worker writes that same JSON
/// to the table (see [`Versioned::json`]).
pub struct ItemBody(pub Versioned<Item>);

impl super::AnswerBody for ItemBody {
    fn into_json(self) -> Result<Vec<u8>, serde_json::Error> {
        use std::io::Write as _;
        let item = self.0.json()?;
        // An item serializes as an object with at least its DFID, and the
        // view flattens its fields and adds the version last.
        let Some((b'}', fields)) = item.split_last() else {
            return Err(serde::ser::Error::custom("an item does not serialize as a JSON object"));
        };
        let mut body = Vec::with_capacity(item.len() + 24);
        body.extend_from_slice(fields);
        write!(body, ",\"version\":{}}}", self.0.version).map_err(serde::ser::Error::custom)?;
        Ok(body)
    }
}

/// Body of `POST /api/items` (and of each item of a batch create).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateItem {
    /// 1 to 100 identifiers; duplicates are dropped.
    pub identifiers: Vec<Identifier>,
    /// Free-form data (at most 256 keys, 64 KiB).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub enriched_data: Option<Map<String, Value>>,
}

impl CreateItem {
    /// Validates the body; `at` locates it in the request.
    pub fn validate(&self, at: &str) -> Result<(), ApiError> {
        validate::identifiers(&self.identifiers, 1, &format!("{at}identifiers"))?;
        if let Some(data) = &self.enriched_data {
            validate::enriched_data(data, &format!("{at}enriched_data"))?;
        }
        Ok(())
    }

    /// A new active item with a fresh DFID.
    pub fn into_item(self, local_id: Option<String>) -> Item {
        let now = Utc::now();
        Item {
            dfid: new_dfid().into(),
            local_id: local_id.map(Into::into),
            status: ItemStatus::Active,
            identifiers: validate::dedup_identifiers(self.identifiers),
            enriched_data: self.enriched_data.as_ref().map(JsonObject::from_map).unwrap_or_default(),
            merged_into: None,
            circuits: Vec::new(),
            created_at: now,
            updated_at: now,
        }
    }
}

/// The item `dfid` in a change set, or 404.
pub(crate) fn existing(set: &ChangeSet<'_>, dfid: &str) -> Result<Versioned<Item>, ApiError> {
    set.get::<Item>(dfid).ok_or_else(|| ApiError::not_found(format!("item {dfid} not found")))
}

/// 409 unless the item is active.
pub(crate) fn require_active(item: &Item, action: &str) -> Result<(), ApiError> {
    match item.status {
        ItemStatus::Active => Ok(()),
        ItemStatus::Merged => Err(ApiError::conflict(format!(
            "item {} is merged into {}; {action} is not possible",
            item.dfid,
            item.merged_into.as_deref().unwrap_or("another item")
        ))),
        ItemStatus::Deprecated => {
            Err(ApiError::conflict(format!("item {} is deprecated; {action} is not possible", item.dfid)))
        }
    }
}

/// Merges `source` (active) into `target` (active): the target gains the
/// source's identifiers, the source becomes `merged`. Returns the target
/// and the identifiers it gained.
pub(crate) fn merge_into(
    set: &mut ChangeSet<'_>,
    target: &str,
    source: &str,
) -> Result<(Versioned<Item>, Vec<Identifier>), ApiError> {
    if target == source {
        return Err(ApiError::conflict(format!("item {target} cannot be merged into itself")));
    }
    let target_item = existing(set, target)?;
    let source_item = existing(set, source)?;
    require_active(&target_item, "a merge")?;
    require_active(&source_item, "a merge")?;
    let mut identifiers = target_item.identifiers.clone();
    let added = validate::add_identifiers(&mut identifiers, &source_item.identifiers);
    if identifiers.len() > MAX_IDENTIFIERS {
        return Err(ApiError::conflict(format!(
            "the merged item would have {} identifiers; at most {MAX_IDENTIFIERS} are allowed",
            identifiers.len()
        )));
    }
    let now = Utc::now();
    set.update::<Item>(source, |item| {
        item.status = ItemStatus::Merged;
        item.merged_into = Some(target.into());
        item.updated_at = now;
    })?;
    let merged = set.update::<Item>(target, |item| {
        item.identifiers = identifiers;
        item.updated_at = now;
    })?;
    Ok((merged, added))
}

/// `POST /api/items`: creates an item with a new DFID at version 1.
#[utoipa::path(post, path = "/api/items", tag = "items", request_body = CreateItem,
    params(("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 201, description = "Created", body = ItemView),
        (status = 400, description = "Malformed JSON"),
        (status = 413, description = "Body too large"),
        (status = 422, description = "Invalid item"),
        (status = 503, description = "Queue full or starting; see Retry-After"),
    ))]
pub async fn create(
    State(state): State<Shared>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<CreateItem>,
) -> Result<Response, ApiError> {
    body.validate("")?;
    let item = body.into_item(None);
    state.answer(durable, StatusCode::CREATED, |set| Ok(set.insert(item)?), ItemBody).await
}

/// Body of `POST /api/items/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchCreate {
    /// 1 to 1000 items, created all together or not at all.
    pub items: Vec<CreateItem>,
}

/// Items created together.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemList {
    /// The items.
    pub items: Vec<ItemView>,
}

/// `POST /api/items/batch`: creates up to 1000 items in one change set,
/// after validating every one of them.
#[utoipa::path(post, path = "/api/items/batch", tag = "items", request_body = BatchCreate,
    params(("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 201, description = "Created", body = ItemList),
        (status = 400, description = "Malformed JSON"),
        (status = 422, description = "An item is invalid; none was created"),
        (status = 503, description = "Queue full or starting"),
    ))]
pub async fn create_batch(
    State(state): State<Shared>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<BatchCreate>,
) -> Result<Response, ApiError> {
    if body.items.is_empty() || body.items.len() > MAX_BATCH {
        return Err(ApiError::unprocessable(format!(
            "items: 1 to {MAX_BATCH} items required ({} given)",
            body.items.len()
        )));
    }
    for (i, item) in body.items.iter().enumerate() {
        item.validate(&format!("items[{i}]."))?;
    }
    let items: Vec<Item> = body.items.into_iter().map(|b| b.into_item(None)).collect();
    state
        .answer(
            durable,
            StatusCode::CREATED,
            |set| {
                items
                    .into_iter()
                    .map(|item| set.insert(item).map(ItemView::from))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ApiError::from)
            },
            |saved| ItemList { items: saved },
        )
        .await
}

/// `GET /api/items/{dfid}`.
#[utoipa::path(get, path = "/api/items/{dfid}", tag = "items",
    params(("dfid" = String, Path, description = "The item's DFID")),
    responses(
        (status = 200, description = "The item", body = ItemView),
        (status = 404, description = "No such item (or deleted)"),
    ))]
pub async fn get(State(state): State<Shared>, Path(dfid): Path<String>) -> Result<Response, ApiError> {
    state.ensure_ready()?;
    match state.store.get::<Item>(&dfid) {
        Some(item) => Ok(axum::Json(ItemView::from(item)).into_response()),
        None => Err(ApiError::not_found(format!("item {dfid} not found"))),
    }
}

/// Query of `GET /api/items`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only items with this status.
    pub status: Option<ItemStatus>,
    /// Only items with an identifier of this key (give `value` too).
    pub key: Option<String>,
    /// Only items with an identifier of this value (give `key` too).
    pub value: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
}

/// A page of items.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemPage {
    /// Items in DFID order.
    pub items: Vec<ItemView>,
    /// Cursor of the next page (`after=`), absent on the last page.
    pub next: Option<String>,
}

/// `GET /api/items`: lists items by status and/or identifier, in DFID order,
/// with a stable cursor.
#[utoipa::path(get, path = "/api/items", tag = "items", params(ListQuery),
    responses(
        (status = 200, description = "A page of items", body = ItemPage),
        (status = 400, description = "Bad query"),
    ))]
pub async fn list(State(state): State<Shared>, ApiQuery(query): ApiQuery<ListQuery>) -> Result<Response, ApiError> {
    state.ensure_ready()?;
    let identifier = match (query.key, query.value) {
        (Some(key), Some(value)) => {
            validate::text(&key, 1, validate::MAX_KEY_LEN, "key").map_err(ApiError::as_bad_request)?;
            validate::text(&value, 1, validate::MAX_VALUE_LEN, "value").map_err(ApiError::as_bad_request)?;
            Some((key, value))
        }
        (None, None) => None,
        _ => return Err(ApiError::bad_request("key and value go together: give both or neither")),
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit: 1 to {MAX_PAGE} (got {limit})")));
    }
    let filter = ItemFilter { status: query.status, identifier };
    let page = state.store.read(|view| {
        let has_identifier = |dfid: &str| {
            let Some((key, value)) = &filter.identifier else { return true };
            view.get::<Item>(dfid)
                .is_some_and(|item| item.value.identifiers.iter().any(|i| i.key == *key && *i.value == **value))
        };
        let (ids, more) = view.index::<ItemIndex>().page(&filter, query.after.as_deref(), limit, has_identifier);
        let items: Vec<ItemView> = ids.iter().filter_map(|id| view.get::<Item>(id)).map(ItemView::from).collect();
        let next = if more { items.last().map(|i| i.item.dfid.to_string()) } else { None };
        ItemPage { items, next }
    });
    Ok(axum::Json(page).into_response())
}

/// Body of `PUT /api/items/{dfid}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateItem {
    /// Merged into the item's data key by key; a `null` value removes the key.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub enriched_data: Option<Map<String, Value>>,
    /// Identifiers to add (those already present are skipped).
    #[serde(default)]
    pub identifiers: Option<Vec<Identifier>>,
}

/// `PUT /api/items/{dfid}`: enriches an item and adds identifiers.
#[utoipa::path(put, path = "/api/items/{dfid}", tag = "items", request_body = UpdateItem,
    params(("dfid" = String, Path, description = "The item's DFID"),
           ("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 200, description = "The updated item", body = ItemView),
        (status = 404, description = "No such item"),
        (status = 409, description = "The item is merged"),
        (status = 422, description = "Invalid update"),
    ))]
pub async fn update(
    State(state): State<Shared>,
    Path(dfid): Path<String>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<UpdateItem>,
) -> Result<Response, ApiError> {
    if let Some(identifiers) = &body.identifiers {
        validate::identifiers(identifiers, 0, "identifiers")?;
    }
    if let Some(data) = &body.enriched_data {
        validate::enriched_data(data, "enriched_data")?;
    }
    state
        .answer(
            durable,
            StatusCode::OK,
            |set| {
                let item = existing(set, &dfid)?;
                if item.status == ItemStatus::Merged {
                    require_active(&item, "an update")?;
                }
                if body.enriched_data.is_none() && body.identifiers.is_none() {
                    return Ok(item); // nothing to change: the item as it is
                }
                let mut identifiers = item.identifiers.clone();
                validate::add_identifiers(&mut identifiers, body.identifiers.as_deref().unwrap_or_default());
                if identifiers.len() > MAX_IDENTIFIERS {
                    return Err(ApiError::conflict(format!(
                        "the item would have {} identifiers; at most {MAX_IDENTIFIERS} are allowed",
                        identifiers.len()
                    )));
                }
                let mut data = item.enriched_data.to_map();
                for (key, value) in body.enriched_data.unwrap_or_default() {
                    if value.is_null() {
                        data.remove(&key);
                    } else {
                        data.insert(key, value);
                    }
                }
                validate::enriched_data(&data, "the item's enriched_data after the update")
                    .map_err(ApiError::as_conflict)?;
                Ok(set.update::<Item>(&dfid, |item| {
                    item.identifiers = identifiers;
                    item.enriched_data = JsonObject::from_map(&data);
                    item.updated_at = Utc::now();
                })?)
            },
            ItemBody,
        )
        .await
}

/// Body of `POST /api/items/{dfid}/merge`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeItems {
    /// The item merged into the one in the path.
    pub source_dfid: String,
}

/// `POST /api/items/{dfid}/merge`: merges `source_dfid` into this item.
#[utoipa::path(post, path = "/api/items/{dfid}/merge", tag = "items", request_body = MergeItems,
    params(("dfid" = String, Path, description = "The target's DFID"),
           ("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 200, description = "The target, with the source's identifiers", body = ItemView),
        (status = 404, description = "Target or source missing"),
        (status = 409, description = "Merge into itself, or an item not active"),
    ))]
pub async fn merge(
    State(state): State<Shared>,
    Path(dfid): Path<String>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<MergeItems>,
) -> Result<Response, ApiError> {
    validate::id(&body.source_dfid, "source_dfid")?;
    state
        .answer(
            durable,
            StatusCode::OK,
            |set| merge_into(set, &dfid, &body.source_dfid),
            |(target, _)| ItemBody(target),
        )
        .await
}

/// Body of `POST /api/items/{dfid}/split`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitItem {
    /// Identifiers of the item to move to a new item.
    pub identifiers: Vec<Identifier>,
}

/// The two items of a split.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SplitResult {
    /// The item split, without the moved identifiers.
    pub original: ItemView,
    /// The new item holding them.
    pub created: ItemView,
}

/// `POST /api/items/{dfid}/split`: moves identifiers to a new item; both
/// change in one change set.
#[utoipa::path(post, path = "/api/items/{dfid}/split", tag = "items", request_body = SplitItem,
    params(("dfid" = String, Path, description = "The item's DFID"),
           ("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 201, description = "The original and the created item", body = SplitResult),
        (status = 404, description = "No such item"),
        (status = 409, description = "The item is not active"),
        (status = 422, description = "Unknown identifiers, or none would remain"),
    ))]
pub async fn split(
    State(state): State<Shared>,
    Path(dfid): Path<String>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<SplitItem>,
) -> Result<Response, ApiError> {
    validate::identifiers(&body.identifiers, 1, "identifiers")?;
    let moved = validate::dedup_identifiers(body.identifiers);
    state
        .answer(
            durable,
            StatusCode::CREATED,
            |set| {
                let original = existing(set, &dfid)?;
                require_active(&original, "a split")?;
                let unknown: Vec<String> = moved
                    .iter()
                    .filter(|i| !original.identifiers.contains(i))
                    .map(|i| format!("{}={}", i.key, i.value))
                    .collect();
                if !unknown.is_empty() {
                    return Err(ApiError::conflict(format!("item {dfid} has no identifier(s) {}", unknown.join(", "))));
                }
                let remaining: Vec<Identifier> =
                    original.identifiers.iter().filter(|i| !moved.contains(i)).cloned().collect();
                if remaining.is_empty() {
                    return Err(ApiError::conflict("a split must leave the original at least one identifier"));
                }
                let now = Utc::now();
                let created = Item {
                    dfid: new_dfid().into(),
                    local_id: None,
                    status: ItemStatus::Active,
                    identifiers: moved.clone(),
                    enriched_data: JsonObject::empty(),
                    merged_into: None,
                    circuits: Vec::new(),
                    created_at: now,
                    updated_at: now,
                };
                let original = set.update::<Item>(&dfid, |item| {
                    item.identifiers = remaining;
                    item.updated_at = now;
                })?;
                let created = set.insert(created)?;
                Ok(SplitResult { original: original.into(), created: created.into() })
            },
            |result| result,
        )
        .await
}

/// `PUT /api/items/{dfid}/deprecate`: marks an active item deprecated;
/// deprecating a deprecated item changes nothing.
#[utoipa::path(put, path = "/api/items/{dfid}/deprecate", tag = "items",
    params(("dfid" = String, Path, description = "The item's DFID"),
           ("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 200, description = "The deprecated item", body = ItemView),
        (status = 404, description = "No such item"),
        (status = 409, description = "The item is merged"),
    ))]
pub async fn deprecate(
    State(state): State<Shared>,
    Path(dfid): Path<String>,
    Durable(durable): Durable,
) -> Result<Response, ApiError> {
    state
        .answer(
            durable,
            StatusCode::OK,
            |set| {
                let item = existing(set, &dfid)?;
                match item.status {
                    ItemStatus::Deprecated => {
                        // Idempotent: nothing changes, but a durable caller still
                        // waits for the state it is shown to be committed.
                        set.watch::<Item>(&dfid);
                        Ok(item)
                    }
                    ItemStatus::Merged => Err(ApiError::conflict(format!(
                        "item {dfid} is merged into {}; it cannot be deprecated",
                        item.merged_into.as_deref().unwrap_or("another item")
                    ))),
                    ItemStatus::Active => Ok(set.update::<Item>(&dfid, |item| {
                        item.status = ItemStatus::Deprecated;
                        item.updated_at = Utc::now();
                    })?),
                }
            },
            ItemBody,
        )
        .await
}

/// `DELETE /api/items/{dfid}`: deletes an item (a versioned tombstone) and
/// takes it out of its circuits, in one change set.
#[utoipa::path(delete, path = "/api/items/{dfid}", tag = "items",
    params(("dfid" = String, Path, description = "The item's DFID"),
           ("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such item"),
    ))]
pub async fn delete(
    State(state): State<Shared>,
    Path(dfid): Path<String>,
    Durable(durable): Durable,
) -> Result<Response, ApiError> {
    state
        .answer(
            durable,
            StatusCode::NO_CONTENT,
            |set| {
                let item = existing(set, &dfid)?;
                let now = Utc::now();
                for circuit in &item.circuits {
                    match set.update::<Circuit>(circuit, |c| {
                        c.items.retain(|d| **d != *dfid);
                        c.updated_at = now;
                    }) {
                        Ok(_) | Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                set.delete::<Item>(&dfid)?;
                Ok(())
            },
            |()| (),
        )
        .await
}
