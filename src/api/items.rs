//! Item routes (DESIGN A1).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::AppState;
use super::error::ApiError;
use super::extract::{ApiJson, wants_durable};
use super::model::{Identifier, Item, ItemStatus, new_dfid};
use crate::store::Versioned;

/// An item as the API returns it: its fields and its version.
#[derive(Debug, Serialize)]
pub struct ItemView {
    #[serde(flatten)]
    item: Item,
    version: u64,
}

impl From<Versioned<Item>> for ItemView {
    fn from(v: Versioned<Item>) -> Self {
        Self { version: v.version, item: Item::clone(&v.value) }
    }
}

/// Body of `POST /api/items`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateItem {
    identifiers: Vec<Identifier>,
    #[serde(default)]
    enriched_data: Option<Map<String, Value>>,
}

/// `POST /api/items`: creates an item with a new DFID at version 1.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateItem>,
) -> Result<Response, ApiError> {
    let now = Utc::now();
    let mut identifiers = body.identifiers;
    identifiers.dedup();
    let item = Item {
        dfid: new_dfid(),
        local_id: None,
        status: ItemStatus::Active,
        identifiers,
        enriched_data: body.enriched_data.unwrap_or_default(),
        merged_into: None,
        circuits: Vec::new(),
        created_at: now,
        updated_at: now,
    };
    let durable = wants_durable(&headers, state.ack);
    let saved = state.change(durable, |set| set.insert(item).map_err(ApiError::from)).await?;
    Ok(state.respond(StatusCode::CREATED, &ItemView::from(saved), durable))
}

/// `GET /api/items/{dfid}`.
pub async fn get(State(state): State<AppState>, Path(dfid): Path<String>) -> Result<Response, ApiError> {
    state.ensure_ready()?;
    match state.store.get::<Item>(&dfid) {
        Some(item) => Ok(axum::Json(ItemView::from(item)).into_response()),
        None => Err(ApiError::not_found(format!("item {dfid} not found"))),
    }
}
