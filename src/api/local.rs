//! Local items: items created under a local id (LID), mapped to
//! their DFID by a mapping entity. A local merge merges the items of several
//! local ids into the first one's; a local unmerge restores exactly what the
//! merge changed.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Shared;
use super::error::ApiError;
use super::extract::{ApiJson, Durable};
use super::items::{CreateItem, ItemView, existing, merge_into};
use super::model::{Item, LocalMapping, LocalMerge};
use super::validate::{self, MAX_LOCAL_MERGE};
use crate::store::{ChangeSet, Versioned};

/// A local item: its local id and the item.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LocalItem {
    /// The local id (a UUID).
    pub local_id: String,
    /// The item it maps to.
    pub item: ItemView,
}

fn mapping(set: &ChangeSet<'_>, local_id: &str) -> Result<Versioned<LocalMapping>, ApiError> {
    set.get::<LocalMapping>(local_id).ok_or_else(|| ApiError::not_found(format!("local id {local_id} not found")))
}

/// `POST /api/items/local`: creates an item with a new local id, and the
/// mapping from that local id to the item's DFID, in one change set.
#[utoipa::path(post, path = "/api/items/local", tag = "local items", request_body = CreateItem,
    params(("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 201, description = "Created", body = LocalItem),
        (status = 422, description = "Invalid item"),
        (status = 503, description = "Queue full or starting"),
    ))]
pub async fn create(
    State(state): State<Shared>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<CreateItem>,
) -> Result<Response, ApiError> {
    body.validate("")?;
    let local_id = uuid::Uuid::new_v4().to_string();
    let item = body.into_item(Some(local_id.clone()));
    let mapping_id = local_id.clone();
    state
        .answer(
            durable,
            StatusCode::CREATED,
            |set| {
                let now = Utc::now();
                let mapping = LocalMapping {
                    local_id: mapping_id,
                    dfid: item.dfid.to_string(),
                    merge: None,
                    created_at: now,
                    updated_at: now,
                };
                set.insert(mapping)?;
                Ok(set.insert(item)?)
            },
            |created| LocalItem { local_id, item: created.into() },
        )
        .await
}

/// Body of `POST /api/items/local/merge`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalMergeRequest {
    /// 2 to 100 distinct local ids; the items of the second and later are
    /// merged into the first one's.
    pub local_ids: Vec<String>,
}

/// The outcome of a local merge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LocalMergeResult {
    /// The item merged into.
    pub target: ItemView,
    /// The items merged, now `merged`.
    pub merged: Vec<ItemView>,
}

/// `POST /api/items/local/merge`: merges the items of several local ids
/// into the first one's, remembering what changed for an unmerge; all in one
/// change set.
#[utoipa::path(post, path = "/api/items/local/merge", tag = "local items", request_body = LocalMergeRequest,
    params(("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 200, description = "Merged", body = LocalMergeResult),
        (status = 404, description = "A local id or its item is missing"),
        (status = 409, description = "Already merged, or an item not active"),
        (status = 422, description = "Fewer than 2 or duplicate local ids"),
    ))]
pub async fn merge(
    State(state): State<Shared>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<LocalMergeRequest>,
) -> Result<Response, ApiError> {
    let ids = body.local_ids;
    if ids.len() < 2 || ids.len() > MAX_LOCAL_MERGE {
        return Err(ApiError::unprocessable(format!("local_ids: 2 to {MAX_LOCAL_MERGE} local ids required")));
    }
    for (i, id) in ids.iter().enumerate() {
        validate::id(id, &format!("local_ids[{i}]"))?;
        if ids[..i].contains(id) {
            return Err(ApiError::unprocessable(format!("local_ids: {id} is given twice")));
        }
    }
    state
        .answer(
            durable,
            StatusCode::OK,
            |set| {
                let target_dfid = mapping(set, &ids[0])?.dfid.clone();
                let mut merged = Vec::new();
                let mut target = None;
                for local_id in &ids[1..] {
                    let map = mapping(set, local_id)?;
                    if map.merge.is_some() || map.dfid == target_dfid {
                        return Err(ApiError::conflict(format!(
                            "local id {local_id} is already merged into {}",
                            map.dfid
                        )));
                    }
                    let source_before: Item = Item::clone(&existing(set, &map.dfid)?.value);
                    let (merged_target, added) = merge_into(set, &target_dfid, &map.dfid)?;
                    let now = Utc::now();
                    set.update::<LocalMapping>(local_id, |m| {
                        m.merge = Some(LocalMerge {
                            target_dfid: target_dfid.clone(),
                            source_before: source_before.clone(),
                            added_identifiers: added,
                        });
                        m.dfid = target_dfid.clone();
                        m.updated_at = now;
                    })?;
                    merged.push(ItemView::from(existing(set, &source_before.dfid)?));
                    target = Some(merged_target);
                }
                let target = target.ok_or_else(|| ApiError::conflict("nothing to merge"))?;
                Ok(LocalMergeResult { target: target.into(), merged })
            },
            |result| result,
        )
        .await
}

/// Body of `POST /api/items/local/unmerge`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalUnmergeRequest {
    /// A local id merged by a local merge.
    pub local_id: String,
}

/// The outcome of a local unmerge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LocalUnmergeResult {
    /// The local id's item, as it was before the merge.
    pub restored: ItemView,
    /// The item it had been merged into, without the identifiers it gained
    /// (absent if that item was deleted since).
    pub target: Option<ItemView>,
}

/// `POST /api/items/local/unmerge`: undoes the local merge of one local id:
/// its item is restored as it was, the target loses the identifiers it
/// gained, and the mapping points back; all in one change set.
#[utoipa::path(post, path = "/api/items/local/unmerge", tag = "local items", request_body = LocalUnmergeRequest,
    params(("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 200, description = "Unmerged", body = LocalUnmergeResult),
        (status = 404, description = "No such local id"),
        (status = 409, description = "The local id is not merged, or its item was deleted since"),
    ))]
pub async fn unmerge(
    State(state): State<Shared>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<LocalUnmergeRequest>,
) -> Result<Response, ApiError> {
    validate::id(&body.local_id, "local_id")?;
    state
        .answer(
            durable,
            StatusCode::OK,
            |set| {
                let map = mapping(set, &body.local_id)?;
                let Some(merge) = map.merge.clone() else {
                    return Err(ApiError::conflict(format!("local id {} is not merged", body.local_id)));
                };
                if !set.contains::<Item>(&merge.source_before.dfid) {
                    return Err(ApiError::conflict(format!(
                        "item {} of local id {} was deleted after the merge; it cannot be restored",
                        merge.source_before.dfid, body.local_id
                    )));
                }
                let now = Utc::now();
                let target = if set.contains::<Item>(&merge.target_dfid) {
                    Some(set.update::<Item>(&merge.target_dfid, |item| {
                        item.identifiers.retain(|i| !merge.added_identifiers.contains(i));
                        item.updated_at = now;
                    })?)
                } else {
                    None
                };
                let restored = Item { updated_at: now, ..merge.source_before.clone() };
                let restored = set.upsert(restored)?;
                set.update::<LocalMapping>(&body.local_id, |m| {
                    m.dfid = merge.source_before.dfid.to_string();
                    m.merge = None;
                    m.updated_at = now;
                })?;
                Ok(LocalUnmergeResult { restored: restored.into(), target: target.map(ItemView::from) })
            },
            |result| result,
        )
        .await
}
