//! Request extraction that answers malformed input with problem details.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::AckMode;
use super::error::ApiError;

/// `axum::Json`, with its rejections (bad syntax, wrong types, unknown
/// fields, wrong content type, too large) rendered as problem details.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(rejection_to_problem(rejection)),
        }
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
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(ApiError::bad_request(rejection.body_text()))
            }
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
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
