//! Request extraction that answers malformed input with problem details.

use std::convert::Infallible;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};

use super::error::ApiError;
use super::{AckMode, Shared};

/// `axum::Json`, with its rejections (bad syntax, wrong types, unknown
/// fields, wrong content type, too large) rendered as problem details.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        rejection_to_problem(rejection)
    }
}

fn rejection_to_problem(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let detail = rejection.body_text();
    match rejection {
        JsonRejection::JsonDataError(_) => ApiError::unprocessable(detail),
        JsonRejection::JsonSyntaxError(_) => ApiError::bad_request(detail),
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", detail)
        }
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", "the request body exceeds the size limit")
        }
        _ => ApiError::new(status, "bad-request", detail),
    }
}

/// `axum::extract::Query`, with a bad query (unknown parameter, wrong
/// type) answered 400 as problem details.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(rejection.body_text())
    }
}

/// Whether the change is to be acknowledged only once committed: the
/// request asks for it (`Prefer: durable`), or the server's default
/// (`OUTBOX_ACK`) says so.
pub struct Durable(pub bool);

impl FromRequestParts<Shared> for Durable {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Self::Rejection> {
        Ok(Self(wants_durable(&parts.headers, state.ack)))
    }
}

/// Whether the request asks for a durable acknowledgement (`Prefer:
/// durable`, RFC 7240), or the server's default says so.
pub fn wants_durable(headers: &HeaderMap, default: AckMode) -> bool {
    let asked = headers.get_all(header::HeaderName::from_static("prefer")).iter().any(|value| {
        value.to_str().unwrap_or_default().split(',').any(|preference| {
            let name = preference.split([';', '=']).next().unwrap_or_default().trim();
            name.eq_ignore_ascii_case("durable")
        })
    });
    asked || default == AckMode::Durable
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn prefer_durable_is_recognized_among_other_preferences() {
        let mut headers = HeaderMap::new();
        assert!(!wants_durable(&headers, AckMode::Memory));
        assert!(wants_durable(&headers, AckMode::Durable));
        headers.insert("prefer", HeaderValue::from_static("respond-async, Durable"));
        assert!(wants_durable(&headers, AckMode::Memory));
        headers.insert("prefer", HeaderValue::from_static("return=minimal"));
        assert!(!wants_durable(&headers, AckMode::Memory));
    }
}
