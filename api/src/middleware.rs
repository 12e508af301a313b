//! The one middleware every request passes: request id, tracing span, access log line,
//! metrics, and the guarantee that every error answer has the native shape.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::{ApiError, ErrorCode, NativeErrorShape};
use crate::metrics::HttpMetrics;

/// The request id header, read from the caller and echoed in every response.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest caller-supplied request id that is kept.
pub const REQUEST_ID_MAX: usize = 128;

/// The id of the request being served, available to handlers as an extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// A caller's request id is kept if it is 1 to 128 characters of ASCII letters, digits
/// and `-_.:/+=`: safe to log and to echo, and enough for UUIDs and trace ids.
fn is_sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= REQUEST_ID_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(&b))
}

fn metric_method(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

pub(crate) async fn track(
    State(metrics): State<Arc<HttpMetrics>>,
    mut req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| is_sane_request_id(s))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    req.extensions_mut().insert(RequestId(id.clone()));

    let span = tracing::info_span!(
        "http",
        request_id = %id,
        method = %method,
        path = %req.uri().path(),
    );
    async move {
        let mut resp = ensure_native_shape(next.run(req).await);
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        let elapsed = start.elapsed();
        let status = resp.status().as_u16();
        metrics.observe(metric_method(&method), &route, status, elapsed);
        tracing::debug!(
            status,
            route = %route,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "request answered"
        );
        resp
    }
    .instrument(span)
    .await
}

/// Rewrites an error answer that did not come from [`ApiError`] (axum's default 404/405,
/// a rejection we do not wrap, a layer's 413) into the native shape, keeping its status
/// and headers such as `Allow`.
fn ensure_native_shape(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || resp.extensions().get::<NativeErrorShape>().is_some()
    {
        return resp;
    }
    let err = match status {
        StatusCode::NOT_FOUND => ApiError::new(ErrorCode::RouteNotFound, "no route for this path"),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            ErrorCode::MethodNotAllowed,
            "this path does not accept this method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::PayloadTooLarge, "the request body is too large")
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "expected Content-Type: application/json",
        ),
        StatusCode::UNPROCESSABLE_ENTITY => {
            ApiError::new(ErrorCode::InvalidJsonBody, "the request body was refused")
        }
        s if s.is_client_error() => {
            ApiError::new(ErrorCode::InvalidRequest, "the request was refused").with_status(s)
        }
        s => ApiError::internal(format!("unshaped {s} answer from an inner layer")).with_status(s),
    };
    let (parts, _) = resp.into_parts();
    let mut native = err.into_response();
    let own: Vec<HeaderName> = native.headers().keys().cloned().collect();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH && !own.contains(name) {
            native.headers_mut().append(name.clone(), value.clone());
        }
    }
    native
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_sanity() {
        assert!(is_sane_request_id("3f2a6c1e-8d7b-4a59-9a51-2f0e1c9b7d10"));
        assert!(is_sane_request_id("trace:abc/def+1="));
        assert!(!is_sane_request_id(""));
        assert!(!is_sane_request_id("has space"));
        assert!(!is_sane_request_id("new\nline"));
        assert!(!is_sane_request_id(&"a".repeat(REQUEST_ID_MAX + 1)));
        assert!(is_sane_request_id(&"a".repeat(REQUEST_ID_MAX)));
    }
}
