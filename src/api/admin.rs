//! Operator routes (DESIGN A5, I8) under `/api/admin`, behind
//! `Authorization: Bearer $OUTBOX_ADMIN_TOKEN`; not served at all when the
//! token is unset.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, Problem};
use crate::pg::dead_letters::{self, DeadLetter};

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
