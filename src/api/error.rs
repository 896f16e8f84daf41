//! The API's one error type, rendered as RFC 9457 problem details
//! (`application/problem+json`) for every 4xx and 5xx. 5xx
//! bodies say little; the log says everything.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::outbox::TicketError;
use crate::store::{ApplyError, Refusal, StoreError};

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// A short, stable identifier of the problem type (the `type` member is
    /// `urn:outbox:problem:<kind>`).
    pub kind: &'static str,
    /// Human-readable explanation of this occurrence.
    pub detail: String,
    /// Seconds to wait before retrying (503).
    pub retry_after: Option<Duration>,
}

/// RFC 9457 problem details, the body of every 4xx and 5xx answer.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`urn:outbox:problem:<kind>`).
    #[serde(rename = "type")]
    pub type_: String,
    /// The HTTP status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong in this request.
    pub detail: String,
}

impl ApiError {
    /// A problem of `kind` with `status`.
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self { status, kind, detail: detail.into(), retry_after: None }
    }

    /// 400: the request is malformed.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// 409: the request conflicts with the current state.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// The same problem, as a conflict with the current state (409).
    pub fn as_conflict(self) -> Self {
        Self { status: StatusCode::CONFLICT, kind: "conflict", ..self }
    }

    /// The same problem, as a malformed request (400).
    pub fn as_bad_request(self) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind: "bad-request", ..self }
    }

    /// 422: well-formed but unacceptable.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", detail)
    }

    /// 503 with a retry hint.
    pub fn unavailable(detail: impl Into<String>, retry_after: Duration) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail) }
    }

    /// 500; the cause goes to the log, not to the client.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the server failed; the cause is logged")
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            type_: format!("urn:outbox:problem:{}", self.kind),
            title: self.title().to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
        };
        let mut response = (self.status, Json(problem)).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs().max(1);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => Self::not_found(e.to_string()),
            StoreError::AlreadyExists { .. } => Self::conflict(e.to_string()),
            StoreError::IdChanged { .. } => Self::internal(&e),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::QueueFull { retry_after, .. } => Self::unavailable(refusal.to_string(), retry_after),
            Refusal::Closed => Self::unavailable(refusal.to_string(), Duration::from_secs(5)),
            Refusal::TooLarge { .. } => Self::unprocessable(refusal.to_string()),
        }
    }
}

impl From<ApplyError<ApiError>> for ApiError {
    fn from(e: ApplyError<ApiError>) -> Self {
        match e {
            ApplyError::Refused(refusal) => refusal.into(),
            ApplyError::Failed(e) => e,
        }
    }
}

impl From<TicketError> for ApiError {
    fn from(e: TicketError) -> Self {
        match &e {
            // The database refuses the data itself: the client's to fix.
            _ if e.is_data_error() => {
                Self::unprocessable(format!("the change was applied in memory but cannot be persisted: {e}"))
            }
            // Someone wrote the entity behind this server's back; an
            // operator decides which version stands.
            TicketError::Conflict { .. } => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("the change was applied in memory but not persisted: {e}"),
            ),
            // This server stopped writing (it lost the lease, or its drain
            // deadline passed) before the change committed. The change is
            // kept in its spill file, replayed (never overwriting) when it
            // next holds the lease.
            TicketError::Abandoned => {
                tracing::warn!(error = %e, "durable change not committed: this server stopped writing");
                Self {
                    retry_after: Some(Duration::from_secs(1)),
                    ..Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not-persisted",
                        format!(
                            "the change was applied in memory but not committed: {e}; this server keeps it in its \
                             spill file and replays it when it next holds the lease"
                        ),
                    )
                }
            }
            TicketError::Quarantined { .. } => {
                tracing::error!(error = %e, "durable change not committed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "not-persisted",
                    format!("the change was applied in memory but not persisted: {e}"),
                )
            }
        }
    }
}
