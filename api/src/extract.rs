//! Extractors that answer bad input in the native error shape.
//!
//! axum's own extractors answer with plain-text bodies and, for JSON data errors, 422.
//! These wrap them and turn every rejection into an [`ApiError`] that names the problem:
//! 400 for syntax, types, missing and unknown fields, 415 for a body not declared as
//! JSON, 413 for a body over the limit.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};

/// Largest accepted request body.
pub const BODY_LIMIT_BYTES: usize = 1 << 20;

/// A required JSON object body.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// An optional JSON object body: an empty (or all-whitespace) body is `None`.
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

/// Query parameters.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

/// Path parameters.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // The content type is checked before reading the body, so a wrong one is a 415
        // even when the body is also too large.
        require_json_content_type(req.headers())?;
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(from_bytes_rejection)?;
        Ok(ApiJson(parse_json(&bytes)?))
    }
}

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(from_bytes_rejection)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        require_json_content_type(&headers)?;
        Ok(OptionalJson(Some(parse_json(&bytes)?)))
    }
}

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| {
                ApiError::new(ErrorCode::InvalidQueryParameter, e.body_text())
            })
    }
}

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e: PathRejection| match e {
                PathRejection::FailedToDeserializePathParams(inner) => {
                    ApiError::new(ErrorCode::InvalidPathParameter, inner.body_text())
                }
                // No path parameters where the handler expects some: our routing bug.
                other => ApiError::internal(other.body_text()),
            })
    }
}

/// Parses a member id path segment.
pub fn parse_member_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>().map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidPathParameter,
            format!(
                "member id '{}' is not an unsigned 64-bit integer",
                truncate(raw, 64)
            ),
        )
    })
}

/// `application/json` or any `application/*+json`, parameters ignored.
fn is_json_content_type(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get(header::CONTENT_TYPE)?;
    let Ok(value) = value.to_str() else {
        return Some(false);
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    Some(json)
}

fn require_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    match is_json_content_type(headers) {
        Some(true) => Ok(()),
        Some(false) => {
            let got = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(not visible ASCII)");
            Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "Content-Type '{}' is not JSON; expected application/json",
                    truncate(got, 100)
                ),
            ))
        }
        None => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the request has no Content-Type header; expected application/json",
        )),
    }
}

/// Parses a body that must be one JSON object. serde lets a struct be read from an array
/// of its fields in order (`["a"]`); the native API takes objects only.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = axum::Json::<T>::from_bytes(bytes)
        .map(|axum::Json(v)| v)
        .map_err(from_json_rejection)?;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(value),
        _ => Err(ApiError::new(
            ErrorCode::InvalidJsonBody,
            "the JSON body must be an object, e.g. {\"name\": ...}",
        )),
    }
}

/// Maps axum's JSON rejection to the native shape, keeping serde's description (which
/// names the field, line and column) but not axum's plain-text framing.
fn from_json_rejection(e: JsonRejection) -> ApiError {
    match e {
        JsonRejection::JsonSyntaxError(inner) => ApiError::new(
            ErrorCode::MalformedJson,
            format!("the body is not valid JSON: {}", source_text(&inner)),
        ),
        JsonRejection::JsonDataError(inner) => ApiError::new(
            ErrorCode::InvalidJsonBody,
            format!(
                "the JSON body does not match the expected object: {}",
                source_text(&inner)
            ),
        ),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "expected Content-Type: application/json",
        ),
        JsonRejection::BytesRejection(inner) => from_bytes_rejection(inner),
        // JsonRejection is non-exhaustive.
        other => {
            ApiError::new(ErrorCode::InvalidRequest, other.body_text()).with_status(other.status())
        }
    }
}

fn from_bytes_rejection(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {BODY_LIMIT_BYTES} bytes"),
        )
    } else {
        ApiError::new(
            ErrorCode::BodyReadFailed,
            format!("could not read the request body: {}", e.body_text()),
        )
    }
}

/// A rejection's own description (serde's message, with the field path) without axum's
/// plain-text prefix: the rejection's source is the wrapped error.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    match e.source() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    }
}

/// At most `max` bytes of `s`, cut at a character boundary, for echoing input safely.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
