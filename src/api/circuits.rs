//! Circuit routes: a circuit and an item change together when the item is
//! added.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Shared;
use super::error::ApiError;
use super::extract::{ApiJson, Durable};
use super::items::{existing, require_active};
use super::model::{Circuit, Item};
use super::validate::{self, MAX_CIRCUIT_ITEMS, MAX_ITEM_CIRCUITS, MAX_NAME_LEN};
use crate::store::Versioned;

/// A circuit as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CircuitView {
    /// The circuit.
    #[serde(flatten)]
    pub circuit: Circuit,
    /// Its version.
    pub version: u64,
}

impl From<Versioned<Circuit>> for CircuitView {
    fn from(v: Versioned<Circuit>) -> Self {
        Self { version: v.version, circuit: Circuit::clone(&v.value) }
    }
}

/// Body of `POST /api/circuits`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCircuit {
    /// 1 to 200 bytes.
    pub name: String,
}

/// `POST /api/circuits`: creates a circuit.
#[utoipa::path(post, path = "/api/circuits", tag = "circuits", request_body = CreateCircuit,
    params(("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 201, description = "Created", body = CircuitView),
        (status = 422, description = "Invalid name"),
    ))]
pub async fn create(
    State(state): State<Shared>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<CreateCircuit>,
) -> Result<Response, ApiError> {
    validate::text(&body.name, 1, MAX_NAME_LEN, "name")?;
    let now = Utc::now();
    let circuit = Circuit {
        id: uuid::Uuid::new_v4().to_string(),
        name: body.name,
        items: Vec::new(),
        created_at: now,
        updated_at: now,
    };
    state.answer(durable, StatusCode::CREATED, |set| Ok(set.insert(circuit)?), CircuitView::from).await
}

/// `GET /api/circuits/{id}`.
#[utoipa::path(get, path = "/api/circuits/{id}", tag = "circuits",
    params(("id" = String, Path, description = "The circuit's id")),
    responses(
        (status = 200, description = "The circuit", body = CircuitView),
        (status = 404, description = "No such circuit"),
    ))]
pub async fn get(State(state): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    state.ensure_ready()?;
    match state.store.get::<Circuit>(&id) {
        Some(circuit) => Ok(axum::Json(CircuitView::from(circuit)).into_response()),
        None => Err(ApiError::not_found(format!("circuit {id} not found"))),
    }
}

/// Body of `POST /api/circuits/{id}/items`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddItem {
    /// The item to add.
    pub dfid: String,
}

/// `POST /api/circuits/{id}/items`: adds an item to a circuit; the circuit
/// and the item change in one change set. Adding an item already there
/// changes nothing.
#[utoipa::path(post, path = "/api/circuits/{id}/items", tag = "circuits", request_body = AddItem,
    params(("id" = String, Path, description = "The circuit's id"),
           ("Prefer" = Option<String>, Header, description = "`durable`: answer after the commit")),
    responses(
        (status = 200, description = "The circuit", body = CircuitView),
        (status = 404, description = "No such circuit or item"),
        (status = 409, description = "The item is not active"),
        (status = 422, description = "The circuit is full, or the item is in too many circuits"),
    ))]
pub async fn add_item(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Durable(durable): Durable,
    ApiJson(body): ApiJson<AddItem>,
) -> Result<Response, ApiError> {
    validate::id(&body.dfid, "dfid")?;
    state
        .answer(
            durable,
            StatusCode::OK,
            |set| {
                let circuit =
                    set.get::<Circuit>(&id).ok_or_else(|| ApiError::not_found(format!("circuit {id} not found")))?;
                let item = existing(set, &body.dfid)?;
                require_active(&item, "adding it to a circuit")?;
                if circuit.items.iter().any(|d| **d == *body.dfid) {
                    set.watch::<Circuit>(&id);
                    set.watch::<Item>(&body.dfid);
                    return Ok(circuit);
                }
                if circuit.items.len() >= MAX_CIRCUIT_ITEMS {
                    return Err(ApiError::conflict(format!("circuit {id} holds {MAX_CIRCUIT_ITEMS} items already")));
                }
                if item.circuits.len() >= MAX_ITEM_CIRCUITS {
                    return Err(ApiError::conflict(format!(
                        "item {} is in {MAX_ITEM_CIRCUITS} circuits already",
                        body.dfid
                    )));
                }
                let now = Utc::now();
                set.update::<Item>(&body.dfid, |item| {
                    if !item.circuits.contains(&id) {
                        item.circuits.push(id.clone());
                    }
                    item.updated_at = now;
                })?;
                Ok(set.update::<Circuit>(&id, |c| {
                    c.items.push(std::sync::Arc::from(body.dfid.as_str()));
                    c.updated_at = now;
                })?)
            },
            CircuitView::from,
        )
        .await
}
