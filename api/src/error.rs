//! The native API's error registry and error shape.
//!
//! Every non-2xx answer of the native API has the body
//!
//! ```json
//! {"error":{"code":"DRP-3001","status":404,"message":"site 'x' not found","fix":"..."}}
//! ```
//!
//! `code` is stable: clients and runbooks may branch on it. `message` is about this request;
//! `fix` is the registry's one-line advice for the code. Codes are grouped by the first
//! digit: 1 = the request itself, 2 = routing, 3 = resources, 4 = cluster state,
//! 5 = faults on our side, 6 = identity and access. A code is never reused for another meaning; `ERRORS.md` lists
//! them all (a unit test keeps it in step with this file).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use drplane_statemachine::{CommandError, StoreError};

use crate::control::ClusterError;

/// Retry-After (seconds) for a 503 whose cause gives no better hint.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

/// Every error code a native API client can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A 4xx answer not covered by a more precise code.
    InvalidRequest,
    MalformedJson,
    InvalidJsonBody,
    UnsupportedMediaType,
    PayloadTooLarge,
    InvalidPathParameter,
    InvalidQueryParameter,
    InvalidIdempotencyKey,
    ValidationFailed,
    BadClusterRequest,
    BodyReadFailed,
    RouteNotFound,
    MethodNotAllowed,
    ResourceNotFound,
    AlreadyExists,
    Conflict,
    MemberNotFound,
    ClusterUnavailable,
    OutcomeUnknown,
    Refused,
    NotReady,
    Internal,
    Unauthenticated,
    Forbidden,
    TooManyLoginAttempts,
    InvalidListParameter,
    ReferenceNotFound,
    ResourceInUse,
    JobFinished,
}

/// The registry entry of one code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeInfo {
    /// `DRP-` and four digits.
    pub code: &'static str,
    /// The HTTP status the code is answered with.
    pub status: u16,
    /// One line: what went wrong.
    pub cause: &'static str,
    /// One line: what the caller should do.
    pub fix: &'static str,
}

impl ErrorCode {
    /// Every code, in registry order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidRequest,
        ErrorCode::MalformedJson,
        ErrorCode::InvalidJsonBody,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::PayloadTooLarge,
        ErrorCode::InvalidPathParameter,
        ErrorCode::InvalidQueryParameter,
        ErrorCode::InvalidIdempotencyKey,
        ErrorCode::ValidationFailed,
        ErrorCode::BadClusterRequest,
        ErrorCode::BodyReadFailed,
        ErrorCode::RouteNotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::ResourceNotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::Conflict,
        ErrorCode::MemberNotFound,
        ErrorCode::ClusterUnavailable,
        ErrorCode::OutcomeUnknown,
        ErrorCode::Refused,
        ErrorCode::NotReady,
        ErrorCode::Internal,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::TooManyLoginAttempts,
        ErrorCode::InvalidListParameter,
        ErrorCode::ReferenceNotFound,
        ErrorCode::ResourceInUse,
        ErrorCode::JobFinished,
    ];

    /// The registry entry: code, status, cause and fix.
    pub const fn info(self) -> CodeInfo {
        use ErrorCode::*;
        let (code, status, cause, fix) = match self {
            InvalidRequest => (
                "DRP-1000",
                400,
                "The request is not acceptable and no more precise code applies.",
                "Read the message; correct the request before retrying it.",
            ),
            MalformedJson => (
                "DRP-1001",
                400,
                "The request body is not well-formed JSON (or is empty where a body is required).",
                "Send one complete JSON document; the message gives the line and column of the first error.",
            ),
            InvalidJsonBody => (
                "DRP-1002",
                400,
                "The JSON body has a field of the wrong type, lacks a required field or has an unknown field.",
                "Correct the field named in the message; unknown fields are refused, not ignored.",
            ),
            UnsupportedMediaType => (
                "DRP-1003",
                415,
                "The request has a body that is not declared as JSON.",
                "Send the header `Content-Type: application/json`.",
            ),
            PayloadTooLarge => (
                "DRP-1004",
                413,
                "The request body is larger than 1 MiB.",
                "Send a smaller body; no native API request needs more than 1 MiB.",
            ),
            InvalidPathParameter => (
                "DRP-1005",
                400,
                "A path segment has the wrong form, e.g. a member id that is not an unsigned 64-bit integer.",
                "Use the form given in the message, e.g. a decimal member id such as `/members/2`.",
            ),
            InvalidQueryParameter => (
                "DRP-1006",
                400,
                "A query parameter has a value that is not allowed.",
                "Use `consistency=linearizable` or `consistency=stale`, and `force=true` or `force=false`.",
            ),
            InvalidIdempotencyKey => (
                "DRP-1007",
                400,
                "The Idempotency-Key header is repeated, empty, longer than 128 bytes or not visible ASCII.",
                "Send one Idempotency-Key of 1 to 128 visible ASCII characters, e.g. a UUID.",
            ),
            ValidationFailed => (
                "DRP-1008",
                400,
                "A field is syntactically valid JSON but breaks a rule (name syntax, length limit).",
                "Correct the field named in the message.",
            ),
            BadClusterRequest => (
                "DRP-1009",
                400,
                "The cluster refused a membership request as malformed (e.g. bad address or id).",
                "Correct the member fields named in the message.",
            ),
            BodyReadFailed => (
                "DRP-1010",
                400,
                "The request body could not be read to its end.",
                "Retry the request; check that the client sends the whole body it announces.",
            ),
            RouteNotFound => (
                "DRP-2001",
                404,
                "No route matches the request path.",
                "Check the path against the API reference; native routes start with `/drplane/v1/`.",
            ),
            MethodNotAllowed => (
                "DRP-2002",
                405,
                "The path exists but does not accept this HTTP method.",
                "Use one of the methods listed in the `Allow` response header.",
            ),
            ResourceNotFound => (
                "DRP-3001",
                404,
                "The named resource does not exist.",
                "Check the name; list the collection to see what exists.",
            ),
            AlreadyExists => (
                "DRP-3002",
                409,
                "A resource with this name already exists.",
                "Pick another name, or delete the existing resource first. To retry a create safely, send an Idempotency-Key.",
            ),
            Conflict => (
                "DRP-3003",
                409,
                "The change conflicts with the current state of the resource.",
                "Read the resource again and retry the change against its current state.",
            ),
            MemberNotFound => (
                "DRP-3004",
                404,
                "No cluster member has this id.",
                "List members with `GET /drplane/v1/cluster/members`.",
            ),
            ClusterUnavailable => (
                "DRP-4001",
                503,
                "The cluster has no leader or quorum right now, or a deadline passed.",
                "Retry after the `Retry-After` seconds; if it persists, check `GET /drplane/v1/cluster` on each node.",
            ),
            OutcomeUnknown => (
                "DRP-4002",
                503,
                "The request may or may not have been applied: the deadline passed after it was sent to the log.",
                "Retry with the same Idempotency-Key; it is then applied at most once.",
            ),
            Refused => (
                "DRP-4003",
                409,
                "The cluster refuses the operation in its current state (not initialized, site-majority rule, ...).",
                "Read the message; change the cluster state first, or use `force=true` if you accept the risk it names.",
            ),
            NotReady => (
                "DRP-4004",
                503,
                "This node is not ready: it knows no leader or has not caught up with the commit index.",
                "Send traffic to another node or wait; `GET /drplane/v1/cluster` shows leader and lag.",
            ),
            Internal => (
                "DRP-5001",
                500,
                "A fault on the server side (storage, encoding or an invariant broken).",
                "Report the response's `X-Request-Id` to the operator; the server log has the cause.",
            ),
            Unauthenticated => (
                "DRP-6001",
                401,
                "The request has no credentials, or they are unknown, expired or revoked.",
                "Log in (`drplane identity login`, or `POST /v3/auth/tokens`) and send the token as `X-Auth-Token`.",
            ),
            Forbidden => (
                "DRP-6002",
                403,
                "The caller is known but its roles do not allow this operation (or this project).",
                "Ask an admin for the role the message names, or use credentials scoped to the right project.",
            ),
            TooManyLoginAttempts => (
                "DRP-6003",
                429,
                "Too many failed logins for this user name in the last minute.",
                "Wait the `Retry-After` seconds, then log in with the right password.",
            ),
            InvalidListParameter => (
                "DRP-1011",
                400,
                "A list filter or pagination parameter (status, type, limit, marker) has a value that is not allowed.",
                "Use a value the message lists; `limit` is 1 to 1000 and `marker` is the last id of the previous page.",
            ),
            ReferenceNotFound => (
                "DRP-3005",
                409,
                "The request refers to another resource (site, host, storage pool) that does not exist.",
                "Create the referenced resource first, or correct the name the message gives.",
            ),
            ResourceInUse => (
                "DRP-3006",
                409,
                "The resource is still in use (a host with workloads, assigned tasks or reservations).",
                "Delete, move or release what the message names first, then retry.",
            ),
            JobFinished => (
                "DRP-3007",
                409,
                "The job has already ended (SUCCESS or FAIL), so it cannot be cancelled.",
                "Nothing to do: read the job with `GET /drplane/v1/jobs/{id}` for its outcome.",
            ),
        };
        CodeInfo {
            code,
            status,
            cause,
            fix,
        }
    }

    /// `DRP-` and four digits.
    pub const fn as_str(self) -> &'static str {
        self.info().code
    }

    /// The HTTP status the code is answered with.
    pub fn status(self) -> StatusCode {
        StatusCode::from_u16(self.info().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Marks a response whose body already has the native error shape, so the request
/// middleware does not rewrite it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NativeErrorShape;

/// An error answered in the native shape.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    /// The status answered; the code's own status unless a rewritten foreign answer
    /// carried another one.
    pub status: StatusCode,
    /// About this request: what exactly was wrong.
    pub message: String,
    /// Set on 503 answers: the `Retry-After` header, in seconds.
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            status: code.status(),
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// An internal fault: the detail goes to the log (once, when answered), the caller
    /// gets a generic message and the request id.
    pub fn internal(detail: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Internal, detail)
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The JSON body of this error: `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.error_object() })
    }

    /// The inner object of the body: `{"code","status","message","fix"}`.
    pub fn error_object(&self) -> serde_json::Value {
        let message = match self.code {
            ErrorCode::Internal => {
                "internal error; the server log has the cause under this response's X-Request-Id"
                    .to_string()
            }
            _ => self.message.clone(),
        };
        serde_json::json!({
            "code": self.code.as_str(),
            "status": self.status.as_u16(),
            "message": message,
            "fix": self.code.info().fix,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Logged once, here, where the error is answered (inside the request's span).
        if self.status.is_server_error() {
            if self.code == ErrorCode::Internal {
                tracing::error!(code = %self.code, detail = %self.message, "internal error");
            } else {
                tracing::warn!(code = %self.code, reason = %self.message, "request failed");
            }
        }
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ErrorCode::PayloadTooLarge {
            // The rest of the body was never read: the connection cannot carry another
            // request, so tell the client not to reuse it.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp.extensions_mut().insert(NativeErrorShape);
        resp
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Unavailable {
                reason,
                retry_after_secs,
            } => ApiError::new(ErrorCode::ClusterUnavailable, reason)
                .with_retry_after(retry_after_secs),
            ClusterError::Unknown(m) => ApiError::new(ErrorCode::OutcomeUnknown, m)
                .with_retry_after(DEFAULT_RETRY_AFTER_SECS),
            ClusterError::Refused(m) => ApiError::new(ErrorCode::Refused, m),
            ClusterError::BadRequest(m) => ApiError::new(ErrorCode::BadClusterRequest, m),
            ClusterError::NotFound(m) => ApiError::new(ErrorCode::MemberNotFound, m),
            ClusterError::Internal(m) => ApiError::internal(m),
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let code = match &e {
            CommandError::NotFound { .. } => ErrorCode::ResourceNotFound,
            CommandError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            CommandError::Invalid { .. } => ErrorCode::ValidationFailed,
            CommandError::Conflict(_) => ErrorCode::Conflict,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(format!("reading the state machine store: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_well_formed_and_statuses_valid() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            let info = code.info();
            assert!(seen.insert(info.code), "duplicate {}", info.code);
            let digits = info.code.strip_prefix("DRP-").expect("DRP- prefix");
            assert_eq!(digits.len(), 4, "{}", info.code);
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{}", info.code);
            assert_eq!(code.status().as_u16(), info.status, "{}", info.code);
            assert!(info.status >= 400, "{}", info.code);
            assert!(!info.cause.is_empty() && !info.fix.is_empty());
            assert!(!info.cause.contains('\n') && !info.fix.contains('\n'));
        }
    }

    #[test]
    fn errors_md_lists_every_code_with_its_status() {
        let doc = include_str!("../ERRORS.md");
        for code in ErrorCode::ALL {
            let info = code.info();
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}`", info.code)))
                .unwrap_or_else(|| panic!("ERRORS.md has no row for {}", info.code));
            assert!(
                row.contains(&format!("| {} |", info.status)),
                "ERRORS.md row for {} lacks status {}: {row}",
                info.code,
                info.status
            );
            assert!(
                row.contains(info.cause),
                "cause of {} differs: {row}",
                info.code
            );
            assert!(
                row.contains(info.fix),
                "fix of {} differs: {row}",
                info.code
            );
        }
        let rows = doc.lines().filter(|l| l.starts_with("| `DRP-")).count();
        assert_eq!(
            rows,
            ErrorCode::ALL.len(),
            "ERRORS.md lists codes that do not exist"
        );
    }

    #[test]
    fn internal_detail_is_not_shown_to_the_caller() {
        let e = ApiError::internal("rocksdb: /var/lib/secret/path corrupt");
        let body = e.body().to_string();
        assert!(!body.contains("/var/lib/secret"), "{body}");
        assert!(body.contains("DRP-5001"), "{body}");
    }
}
