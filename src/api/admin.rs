//! Operator routes (DESIGN A5, I8) under `/api/admin`, behind
//! `Authorization: Bearer $OUTBOX_ADMIN_TOKEN`; not served at all when the
//! token is unset.

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, Problem};
use crate::pg::dead_letters::{self, DeadLetter, DeadLetterError};

/// Most dead letters one listing returns.
const LIST_LIMIT: i64 = 1000;

/// Refuses requests without the admin bearer token (401), comparing in
/// constant time.
pub async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.admin_token.as_deref() else {
        return ApiError::not_found("no such route").into_response();
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
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
    /// Unresolved dead letters, oldest first (at most 1000).
    pub dead_letters: Vec<DeadLetter>,
}

/// `GET /api/admin/dead-letters`: the unresolved dead letters.
#[utoipa::path(get, path = "/api/admin/dead-letters", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Unresolved dead letters", body = DeadLetterList),
        (status = 401, description = "Missing or wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database does not answer", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let dead_letters = dead_letters::list_unresolved(&state.pool, LIST_LIMIT).await.map_err(|e| {
        ApiError::unavailable(format!("the database does not answer: {e}"), std::time::Duration::from_secs(5))
    })?;
    Ok(axum::Json(DeadLetterList { dead_letters }).into_response())
}

fn dead_letter_error(e: DeadLetterError) -> ApiError {
    match e {
        DeadLetterError::NotFound(_) => ApiError::not_found(e.to_string()),
        DeadLetterError::UnknownKind { .. } | DeadLetterError::StillRefused { .. } => {
            ApiError::unprocessable(e.to_string())
        }
        DeadLetterError::Db(db) => {
            ApiError::unavailable(format!("the database does not answer: {db}"), std::time::Duration::from_secs(5))
        }
    }
}

/// `POST /api/admin/dead-letters/{id}/replay`: writes the quarantined
/// record to its table (version-guarded: a newer row is kept) and resolves
/// the dead letter, in one transaction.
#[utoipa::path(post, path = "/api/admin/dead-letters/{id}/replay", tag = "admin",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The dead letter's id")),
    responses(
        (status = 200, description = "Replayed and resolved", body = DeadLetter),
        (status = 401, description = "Missing or wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No unresolved dead letter with that id", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The database refuses the record again", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database does not answer", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn replay(State(state): State<AppState>, Path(id): Path<i64>) -> Result<Response, ApiError> {
    let tables = state.store.tables();
    let table_of = |kind: &str| tables.iter().find(|(k, _)| *k == kind).map(|(_, t)| *t);
    let resolved = dead_letters::replay(&state.pool, id, table_of).await.map_err(dead_letter_error)?;
    state.store.forget_dead_letter(&resolved.kind, &resolved.entity_id);
    tracing::info!(id, kind = %resolved.kind, entity = %resolved.entity_id, version = resolved.version, "dead letter replayed");
    Ok(axum::Json(resolved).into_response())
}

/// `DELETE /api/admin/dead-letters/{id}`: resolves a dead letter without
/// writing it (the operator accepts that this version is not persisted).
#[utoipa::path(delete, path = "/api/admin/dead-letters/{id}", tag = "admin",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The dead letter's id")),
    responses(
        (status = 200, description = "Discarded", body = DeadLetter),
        (status = 401, description = "Missing or wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No unresolved dead letter with that id", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database does not answer", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn discard(State(state): State<AppState>, Path(id): Path<i64>) -> Result<Response, ApiError> {
    let resolved = dead_letters::discard(&state.pool, id).await.map_err(dead_letter_error)?;
    state.store.forget_dead_letter(&resolved.kind, &resolved.entity_id);
    tracing::warn!(id, kind = %resolved.kind, entity = %resolved.entity_id, version = resolved.version, "dead letter discarded");
    Ok(axum::Json(resolved).into_response())
}
