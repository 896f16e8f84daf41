//! Operator routes under `/api/admin`, behind `Authorization: Bearer
//! $OUTBOX_ADMIN_TOKEN`; not served at all when the token is unset. Replay
//! and discard act on a whole quarantined set through this process's store
//! (it must hold the lease and be ready), and answer once it is committed.

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::error::ApiError;
use super::{AppState, Shared};
use crate::engine::operator;
use crate::pg::dead_letters::{self, DeadLetterError};

/// Most dead letters one listing returns.
const LIST_LIMIT: i64 = 1000;

/// Refuses requests without the admin bearer token (401). The token given
/// and the one expected are compared as SHA-256 digests, in constant time:
/// neither the bytes nor the length of the expected token show in the time
/// a refusal takes.
pub async fn require_token(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let Some(expected) = state.admin_token.as_deref() else {
        return ApiError::not_found("no such route").into_response();
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let (given, expected) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected.as_bytes()));
    if bool::from(given.as_slice().ct_eq(expected.as_slice())) {
        next.run(request).await
    } else {
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid admin bearer token is required")
                .into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("a valid header value"));
        response
    }
}

/// Body of `GET /api/admin/dead-letters`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterList {
    /// Dead letters, oldest first: the unresolved ones (at most 1000), or
    /// the members of the set an action resolved.
    pub dead_letters: Vec<dead_letters::DeadLetter>,
}

/// `GET /api/admin/dead-letters`: the unresolved dead letters.
#[utoipa::path(get, path = "/api/admin/dead-letters", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Unresolved dead letters", body = DeadLetterList),
        (status = 401, description = "Missing or wrong token"),
        (status = 503, description = "The database does not answer"),
    ))]
pub async fn list(State(state): State<Shared>) -> Result<Response, ApiError> {
    let dead_letters = dead_letters::list_unresolved(&state.pool, LIST_LIMIT).await.map_err(|e| {
        ApiError::unavailable(format!("the database does not answer: {e}"), std::time::Duration::from_secs(5))
    })?;
    Ok(axum::Json(DeadLetterList { dead_letters }).into_response())
}

fn dead_letter_error(e: DeadLetterError) -> ApiError {
    match e {
        DeadLetterError::NotFound(_) => ApiError::not_found(e.to_string()),
        DeadLetterError::UnknownKind { .. } | DeadLetterError::StillRefused(_) => {
            ApiError::unprocessable(e.to_string())
        }
        DeadLetterError::NotReplayable { .. } | DeadLetterError::BeingWritten(_) => ApiError::conflict(e.to_string()),
        DeadLetterError::Unavailable(_) => ApiError::unavailable(e.to_string(), std::time::Duration::from_secs(5)),
        DeadLetterError::TimedOut(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "not-yet-durable", e.to_string()),
        DeadLetterError::Db(db) => {
            ApiError::unavailable(format!("the database does not answer: {db}"), std::time::Duration::from_secs(5))
        }
    }
}

/// How long an action waits for its commit: the request's budget, less a
/// moment to answer in.
fn action_wait(state: &AppState) -> std::time::Duration {
    state
        .request_timeout
        .saturating_sub(std::time::Duration::from_millis(500))
        .max(std::time::Duration::from_millis(100))
}

/// `POST /api/admin/dead-letters/{id}/replay`: writes the quarantined set
/// of this dead letter again, whole, at versions above both memory's and the
/// database's (after the cause was fixed), through the store; answers with
/// the set's dead letters, resolved, once committed.
#[utoipa::path(post, path = "/api/admin/dead-letters/{id}/replay", tag = "admin",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The id of any dead letter of the set")),
    responses(
        (status = 200, description = "Replayed and resolved", body = DeadLetterList),
        (status = 401, description = "Missing or wrong token"),
        (status = 404, description = "No unresolved dead letter with that id"),
        (status = 409, description = "The quarantined state is not available any more (discard the set), or the set is being written again with a later change (try again once that ends)"),
        (status = 422, description = "The database refuses the set again"),
        (status = 503, description = "Not the lease holder, starting, or the database does not answer"),
        (status = 504, description = "Not committed in time; it stays queued"),
    ))]
pub async fn replay(State(state): State<Shared>, Path(id): Path<i64>) -> Result<Response, ApiError> {
    state.ensure_ready()?;
    let resolved =
        operator::replay(&state.store, &state.pool, id, action_wait(&state)).await.map_err(dead_letter_error)?;
    tracing::info!(id, members = resolved.len(), "quarantined set replayed");
    Ok(axum::Json(DeadLetterList { dead_letters: resolved }).into_response())
}

/// `DELETE /api/admin/dead-letters/{id}`: discards the quarantined set of
/// this dead letter: memory reverts to what the database holds (written
/// again above both versions, so they agree); answers with the set's dead
/// letters, resolved, once committed.
#[utoipa::path(delete, path = "/api/admin/dead-letters/{id}", tag = "admin",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The id of any dead letter of the set")),
    responses(
        (status = 200, description = "Discarded", body = DeadLetterList),
        (status = 401, description = "Missing or wrong token"),
        (status = 404, description = "No unresolved dead letter with that id"),
        (status = 409, description = "The set is being written again with a later change; try again once that ends"),
        (status = 422, description = "The database refuses the set again"),
        (status = 503, description = "Not the lease holder, starting, or the database does not answer"),
        (status = 504, description = "Not committed in time; it stays queued"),
    ))]
pub async fn discard(State(state): State<Shared>, Path(id): Path<i64>) -> Result<Response, ApiError> {
    state.ensure_ready()?;
    let resolved =
        operator::discard(&state.store, &state.pool, id, action_wait(&state)).await.map_err(dead_letter_error)?;
    tracing::warn!(id, members = resolved.len(), "quarantined set discarded: memory reverted to the database");
    Ok(axum::Json(DeadLetterList { dead_letters: resolved }).into_response())
}
