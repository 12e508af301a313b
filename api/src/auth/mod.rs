//! Authentication and authorization for every API family.
//!
//! One middleware, [`authenticate`], runs on every request (inside the request-id/metrics
//! layer). It decides from the path which family is called, reads that family's
//! credentials, resolves them against the replicated identity store into a [`Caller`],
//! enforces the coarse rules every family shares, and hands the [`Caller`] to the handler
//! as a request extension. A refusal is answered in the family's own error shape and
//! logged once, with the caller's identity (user, access key or token id) but never a
//! secret.
//!
//! | path prefix | family | credentials |
//! |---|---|---|
//! | `/drplane/v1/` | native | `X-Auth-Token` |
//! | `/v3/`, `/identity/v3/` | Keystone subset | `X-Auth-Token` (login itself is public) |
//! | `/v1.0/{project_id}/` | Trove | `X-Auth-Token` |
//! | `/v2/[{project_id}/]` | Manila | `X-Auth-Token` |
//! | `/v1/{project_id}/` | SDRS, ECS | `X-Auth-Token` or `Authorization: SDK-HMAC-SHA256 …` |
//! | `/api/` | Danube | `Authorization: Token …` or `ES-API-KEY` (login is public) |
//!
//! Public: `/livez`, `/readyz`, `/metrics`, version documents (`/`, `/v3`, `/v1.0`, `/v2`,
//! `/v1`), the logins (`POST /v3/auth/tokens`, `POST /api/accounts/login/`), and, while
//! this node's store has no user yet (a new cluster, or a node not yet caught up),
//! `POST /drplane/v1/cluster/init` and `GET /drplane/v1/cluster`. Every other path needs
//! credentials, unknown ones included (they are a 404 only for an authenticated caller).
//!
//! Rules applied here (families add their own, e.g. Manila's admin-only actions, with
//! [`Caller::require_admin`]):
//! - a credential scoped to one project may only use that project's paths (admins may use
//!   any): 403;
//! - `reader` changes nothing: any method but GET/HEAD/OPTIONS outside the auth endpoints
//!   needs `member`: 403;
//! - admin only: cluster membership changes, `/drplane/v1/identity/…`, Trove `/mgmt/…`
//!   (answered 401 as Trove does), and the prefixes in [`ADMIN_ONLY_PREFIXES`].
//!
//! Roles are global in one respect: `admin` on any project makes a cloud administrator,
//! as in Keystone's default policy. Grant `member` for project-scoped power.

pub mod danube;
pub mod huawei;
pub mod keystone;
pub(crate) mod ratelimit;
pub mod tokens;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drplane_statemachine::identity::Role;
use drplane_statemachine::Store;
use serde::Serialize;

use crate::control::Consistency;
use crate::error::{ApiError, ErrorCode, NativeErrorShape};
use crate::routes::AppState;

pub use ratelimit::LoginLimiter;

/// Settings of the identity layer.
#[derive(Clone)]
pub struct AuthOptions {
    /// Password of the `admin` user that the first `cluster/init` creates
    /// (`DRPLANE_ADMIN_PASSWORD` of the server). `None`: generated, returned once by init.
    pub admin_password: Option<String>,
    /// Lifetime of tokens from a Keystone password login.
    pub token_ttl: Duration,
    /// Lifetime of Danube login tokens (`AUTHTOKEN_DURATION` upstream: one hour).
    pub danube_token_ttl: Duration,
    /// Failed logins allowed per user name within `login_failure_window`, per node.
    pub login_failures_allowed: u32,
    pub login_failure_window: Duration,
    /// Scheme of the URLs in the Keystone service catalog (`https` behind TLS).
    pub public_scheme: String,
}

impl Default for AuthOptions {
    fn default() -> Self {
        AuthOptions {
            admin_password: None,
            token_ttl: Duration::from_secs(3600),
            danube_token_ttl: Duration::from_secs(3600),
            login_failures_allowed: 5,
            login_failure_window: Duration::from_secs(60),
            public_scheme: "http".into(),
        }
    }
}

impl std::fmt::Debug for AuthOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthOptions")
            .field(
                "admin_password",
                &self.admin_password.as_ref().map(|_| "<set>"),
            )
            .field("token_ttl", &self.token_ttl)
            .field("danube_token_ttl", &self.danube_token_ttl)
            .field("login_failures_allowed", &self.login_failures_allowed)
            .field("login_failure_window", &self.login_failure_window)
            .field("public_scheme", &self.public_scheme)
            .finish()
    }
}

/// The identity layer's per-node state.
#[derive(Debug)]
pub struct AuthState {
    pub options: AuthOptions,
    pub limiter: LoginLimiter,
}

impl AuthState {
    pub fn new(options: AuthOptions) -> Self {
        let limiter =
            LoginLimiter::new(options.login_failures_allowed, options.login_failure_window);
        AuthState { options, limiter }
    }
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `X-Auth-Token` (a native or Keystone token).
    Token,
    /// `Authorization: Token …` (a Danube login token).
    DanubeToken,
    /// `ES-API-KEY`.
    ApiKey,
    /// `Authorization: SDK-HMAC-SHA256 …`.
    AkSk,
}

/// The authenticated caller of a request, set by [`authenticate`] as a request extension
/// (handlers take it as an extractor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub user_id: String,
    pub user_name: String,
    pub project_id: String,
    pub project_name: String,
    /// Effective roles on `project_id` (implied roles included, strongest first), read
    /// from the current assignments, not from the token.
    pub roles: Vec<Role>,
    pub method: AuthMethod,
    /// The token's id (hex SHA-256), when a token was presented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The access key, for AK/SK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
}

impl Caller {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// A cloud administrator.
    pub fn is_admin(&self) -> bool {
        self.has_role(Role::Admin)
    }

    /// May change things (`member` or `admin`).
    pub fn can_write(&self) -> bool {
        self.has_role(Role::Member)
    }

    /// Whether resources of `project_id` are visible to this caller. Families answer
    /// their own not-found when this is false, so another project's resources cannot be
    /// told from missing ones.
    pub fn can_see(&self, project_id: &str) -> bool {
        self.project_id == project_id || self.is_admin()
    }

    /// `Ok` for an admin; otherwise the native 403, for handlers of admin-only operations.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "user '{}' lacks the admin role this operation needs",
                    self.user_name
                ),
            ))
        }
    }

    /// For log lines: who, never a secret.
    pub fn describe(&self) -> String {
        let mut s = format!("user={} project={}", self.user_name, self.project_name);
        if let Some(ak) = &self.access_key {
            s.push_str(&format!(" access_key={ak}"));
        }
        if let Some(t) = &self.token_id {
            s.push_str(&format!(" token_id={}", short_id(t)));
        }
        s
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthenticated,
                "this request carries no authenticated caller",
            )
        })
    }
}

/// The first 12 characters of a token id: enough to find it in `identity tokens list`.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Milliseconds since the Unix epoch, by this node's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---- families and error shapes ----

/// The API family a path belongs to; it decides credentials and error shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Native,
    Keystone,
    Trove,
    Manila,
    Sdrs,
    Ecs,
    Danube,
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/').split('/').collect()
}

/// The family of a path (native for anything unknown).
pub fn family_of(path: &str) -> Family {
    let segs = segments(path);
    match segs.first().copied().unwrap_or("") {
        "v3" => Family::Keystone,
        "identity" if segs.get(1) == Some(&"v3") => Family::Keystone,
        "v1.0" => Family::Trove,
        "v2" => Family::Manila,
        "v1" if segs.get(2) == Some(&"cloudservers") => Family::Ecs,
        "v1" => Family::Sdrs,
        "api" => Family::Danube,
        _ => Family::Native,
    }
}

/// A refusal: the status (401, 403, 429, 503, 500, …) and what to tell the caller.
#[derive(Debug, Clone)]
pub struct AuthFailure {
    pub status: StatusCode,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl AuthFailure {
    pub fn unauthorized(message: impl Into<String>) -> Self {
        AuthFailure {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        AuthFailure {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        AuthFailure {
            status,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    /// From a cluster or store error met while authenticating.
    pub fn from_api_error(e: &ApiError) -> Self {
        AuthFailure {
            status: e.status,
            message: match e.code {
                ErrorCode::Internal => {
                    "internal error; the server log has the cause under this response's X-Request-Id"
                        .into()
                }
                _ => e.message.clone(),
            },
            retry_after_secs: e.retry_after_secs,
        }
    }
}

/// The OpenStack fault name of a status (Trove and Manila differ only in 409).
fn openstack_fault_name(family: Family, status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 if family == Family::Manila => "conflictingRequest",
        409 => "conflict",
        413 | 429 => "overLimit",
        415 => "badMediaType",
        422 if family == Family::Trove => "unprocessableEntity",
        503 => "serviceUnavailable",
        _ if family == Family::Manila => "computeFault",
        _ => "instanceFault",
    }
}

/// Title of a Keystone error body.
fn keystone_title(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

/// The body of a refusal in `family`'s own error shape.
pub fn failure_body(family: Family, f: &AuthFailure) -> serde_json::Value {
    let code = f.status.as_u16();
    match family {
        Family::Native => native_error(f).body(),
        Family::Keystone => serde_json::json!({
            "error": {"code": code, "title": keystone_title(f.status), "message": f.message}
        }),
        Family::Trove | Family::Manila => {
            let mut inner = serde_json::json!({"code": code, "message": f.message});
            if let (Some(secs), Some(obj)) = (f.retry_after_secs, inner.as_object_mut()) {
                obj.insert("retryAfter".into(), secs.to_string().into());
            }
            serde_json::json!({ openstack_fault_name(family, f.status): inner })
        }
        Family::Sdrs => {
            let code = match code {
                401 => "SDRS.0002",
                403 => "SDRS.0005",
                400 => "SDRS.0201",
                _ => "SDRS.0000",
            };
            serde_json::json!({"error": {"code": code, "message": f.message}})
        }
        Family::Ecs => match code {
            // The API gateway's answer to bad IAM credentials, as Huawei's cloud gives it.
            401 => serde_json::json!({"error_code": "APIGW.0301", "error_msg": f.message}),
            403 => serde_json::json!({"error": {"code": "Ecs.0003", "message": f.message}}),
            _ => serde_json::json!({"error": {"code": "Ecs.0000", "message": f.message}}),
        },
        Family::Danube => serde_json::json!({"detail": f.message}),
    }
}

fn native_error(f: &AuthFailure) -> ApiError {
    let code = match f.status.as_u16() {
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::Forbidden,
        429 => ErrorCode::TooManyLoginAttempts,
        503 => ErrorCode::ClusterUnavailable,
        500 => ErrorCode::Internal,
        _ => ErrorCode::InvalidRequest,
    };
    let mut e = ApiError::new(code, f.message.clone());
    e.status = f.status;
    e.retry_after_secs = f.retry_after_secs;
    e
}

/// A refusal as a response in `family`'s shape (with `Retry-After` and, for 401,
/// `WWW-Authenticate` where the family's server sends one).
pub fn failure_response(family: Family, f: &AuthFailure) -> Response {
    if family == Family::Native {
        return native_error(f).into_response();
    }
    let mut resp = (f.status, axum::Json(failure_body(family, f))).into_response();
    if let Some(secs) = f.retry_after_secs {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if f.status == StatusCode::UNAUTHORIZED {
        let challenge = match family {
            Family::Danube => Some("Token"),
            Family::Keystone | Family::Trove | Family::Manila => Some("Keystone"),
            _ => None,
        };
        if let Some(c) = challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
    }
    // Shaped for its family: the request middleware must not rewrite it.
    resp.extensions_mut().insert(NativeErrorShape);
    resp
}

/// Logs a refusal once and answers it.
fn deny(family: Family, method: &Method, path: &str, who: &str, f: AuthFailure) -> Response {
    if f.status.is_server_error() {
        tracing::warn!(family = ?family, %method, path, who, status = f.status.as_u16(), reason = %f.message, "authentication could not complete");
    } else {
        tracing::warn!(family = ?family, %method, path, who, status = f.status.as_u16(), reason = %f.message, "request refused by authentication");
    }
    failure_response(family, &f)
}

// ---- the access rules ----

/// How a request is guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Public,
    /// Public while this node's store has no user.
    PublicUntilBootstrapped,
    Authenticated,
}

fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Version documents of the families: `/`, `/v1`, `/v1.0`, `/v2`, `/v3` (± trailing slash).
fn is_version_document(path: &str) -> bool {
    matches!(
        path,
        "/" | "/v1"
            | "/v1/"
            | "/v1.0"
            | "/v1.0/"
            | "/v2"
            | "/v2/"
            | "/v3"
            | "/v3/"
            | "/identity"
            | "/identity/"
            | "/identity/v3"
            | "/identity/v3/"
    )
}

fn is_keystone_tokens(path: &str) -> bool {
    matches!(
        path,
        "/v3/auth/tokens"
            | "/v3/auth/tokens/"
            | "/identity/v3/auth/tokens"
            | "/identity/v3/auth/tokens/"
    )
}

fn is_danube_login(path: &str) -> bool {
    matches!(path, "/api/accounts/login" | "/api/accounts/login/")
}

fn is_danube_logout(path: &str) -> bool {
    matches!(path, "/api/accounts/logout" | "/api/accounts/logout/")
}

/// Endpoints that manage the caller's own credentials: not "changes" for the reader rule.
fn is_auth_endpoint(path: &str) -> bool {
    is_keystone_tokens(path) || is_danube_login(path) || is_danube_logout(path)
}

fn access_rule(method: &Method, path: &str) -> Access {
    if matches!(path, "/livez" | "/readyz" | "/metrics") {
        return Access::Public;
    }
    if is_read(method) && is_version_document(path) {
        return Access::Public;
    }
    if *method == Method::POST && (is_keystone_tokens(path) || is_danube_login(path)) {
        return Access::Public;
    }
    if (*method == Method::POST && path == "/drplane/v1/cluster/init")
        || (is_read(method) && path == "/drplane/v1/cluster")
    {
        return Access::PublicUntilBootstrapped;
    }
    // Everything else needs credentials, unknown paths included (deny by default: a path
    // spelled to dodge a prefix check, e.g. `//drplane/…`, is still guarded).
    Access::Authenticated
}

/// Native path prefixes whose every method needs `admin`. Other domain modules add
/// theirs here (e.g. inventory administration).
pub const ADMIN_ONLY_PREFIXES: &[&str] = &["/drplane/v1/identity/", "/drplane/v1/identity"];

/// Native path prefixes whose changes (non-read methods) need `admin`.
pub const ADMIN_WRITE_PREFIXES: &[&str] = &["/drplane/v1/cluster"];

/// Top-level Manila collections that may follow `/v2/` directly (microversion ≥ 2.60
/// drops the project id from paths).
const MANILA_COLLECTIONS: &[&str] = &[
    "share-replicas",
    "shares",
    "share-networks",
    "share-servers",
    "share-groups",
    "share-group-types",
    "share-group-snapshots",
    "share-snapshots",
    "snapshots",
    "types",
    "scheduler-stats",
    "availability-zones",
    "limits",
    "extensions",
    "quota-sets",
    "quota-class-sets",
    "services",
    "security-services",
    "messages",
    "share-access-rules",
    "share-transfers",
    "share-backups",
    "resource-locks",
];

/// The `{project_id}` segment of a family path, if the path has one.
pub fn path_project(family: Family, path: &str) -> Option<&str> {
    let segs = segments(path);
    let seg = match family {
        Family::Sdrs | Family::Ecs | Family::Trove => segs.get(1).copied(),
        Family::Manila => segs
            .get(1)
            .copied()
            .filter(|s| !MANILA_COLLECTIONS.contains(s)),
        _ => None,
    }?;
    (!seg.is_empty()).then_some(seg)
}

/// Trove's admin-only management paths: `/v1.0/{project_id}/mgmt/…`.
fn is_trove_mgmt(path: &str) -> bool {
    let segs = segments(path);
    segs.first() == Some(&"v1.0") && segs.get(2) == Some(&"mgmt")
}

fn needs_admin(family: Family, method: &Method, path: &str) -> bool {
    match family {
        Family::Native => {
            ADMIN_ONLY_PREFIXES
                .iter()
                .any(|p| path == *p || path.starts_with(&format!("{}/", p.trim_end_matches('/'))))
                || (!is_read(method)
                    && ADMIN_WRITE_PREFIXES
                        .iter()
                        .any(|p| path == *p || path.starts_with(&format!("{p}/"))))
        }
        Family::Trove => is_trove_mgmt(path),
        _ => false,
    }
}

// ---- the middleware ----

/// Credentials as presented.
enum Presented {
    Token(String),
    DanubeToken(String),
    ApiKey(String),
    AkSk,
    Nothing,
}

fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, AuthFailure> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthFailure::unauthorized(format!(
            "send the {name} header once"
        )));
    }
    let s = v.to_str().map_err(|_| {
        AuthFailure::unauthorized(format!("the {name} header is not visible ASCII"))
    })?;
    Ok(Some(s.trim()))
}

fn presented(family: Family, headers: &HeaderMap) -> Result<Presented, AuthFailure> {
    let authorization = single_header(headers, "authorization")?;
    match family {
        Family::Danube => {
            if let Some(a) = authorization {
                if let Some(t) = a.strip_prefix("Token ") {
                    return Ok(Presented::DanubeToken(t.trim().to_string()));
                }
            }
            if let Some(k) = single_header(headers, "es-api-key")? {
                return Ok(Presented::ApiKey(k.to_string()));
            }
            if authorization.is_some() {
                return Err(AuthFailure::unauthorized(
                    "Invalid token header. Use 'Authorization: Token <token>' or ES-API-KEY.",
                ));
            }
            Ok(Presented::Nothing)
        }
        Family::Sdrs | Family::Ecs if huawei::is_signed_request(headers) => Ok(Presented::AkSk),
        _ => match single_header(headers, "x-auth-token")? {
            Some(t) => Ok(Presented::Token(t.to_string())),
            None => Ok(Presented::Nothing),
        },
    }
}

/// Authenticates and authorizes every request; see the module docs.
pub(crate) async fn authenticate(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let family = family_of(&path);
    match access_rule(&method, &path) {
        Access::Public => return next.run(req).await,
        Access::PublicUntilBootstrapped => match st.cp.store().identity_bootstrapped() {
            Ok(false) => return next.run(req).await,
            Ok(true) => {}
            Err(e) => {
                let e = ApiError::from(e);
                return deny(family, &method, &path, "-", AuthFailure::from_api_error(&e));
            }
        },
        Access::Authenticated => {}
    }

    let credentials = match presented(family, req.headers()) {
        Ok(c) => c,
        Err(f) => return deny(family, &method, &path, "-", f),
    };
    // Check credentials against every change this node knows is committed (a revocation
    // acknowledged by the leader may be committed here but not yet applied).
    if !matches!(credentials, Presented::Nothing) {
        if let Err(e) = st.cp.catch_up_local().await {
            let e = ApiError::from(e);
            return deny(family, &method, &path, "-", AuthFailure::from_api_error(&e));
        }
    }
    let (caller, mut req) = match credentials {
        Presented::Nothing => {
            let msg = match family {
                Family::Danube => "Authentication credentials were not provided.",
                Family::Sdrs | Family::Ecs => {
                    "no credentials: send X-Auth-Token or an SDK-HMAC-SHA256 signature"
                }
                _ => "no credentials: send an X-Auth-Token header",
            };
            return deny(family, &method, &path, "-", AuthFailure::unauthorized(msg));
        }
        Presented::Token(t) | Presented::DanubeToken(t) => {
            let m = if family == Family::Danube {
                AuthMethod::DanubeToken
            } else {
                AuthMethod::Token
            };
            match tokens::caller_from_token(&st, &t, m).await {
                Ok(c) => (c, req),
                Err((f, who)) => {
                    let f = if family == Family::Danube && f.status == StatusCode::UNAUTHORIZED {
                        AuthFailure::unauthorized("Invalid token.")
                    } else {
                        f
                    };
                    return deny(family, &method, &path, &who, f);
                }
            }
        }
        Presented::ApiKey(k) => match tokens::caller_from_api_key(&st, &k).await {
            Ok(c) => (c, req),
            Err((f, who)) => return deny(family, &method, &path, &who, f),
        },
        Presented::AkSk => match aksk(&st, req).await {
            Ok(pair) => pair,
            Err((f, who)) => return deny(family, &method, &path, &who, f),
        },
    };
    let who = caller.describe();

    if let Some(project) = path_project(family, &path) {
        if project != caller.project_id && !caller.is_admin() {
            return deny(
                family,
                &method,
                &path,
                &who,
                AuthFailure::forbidden(format!(
                    "the credentials are scoped to project {}, not to the project in the path",
                    caller.project_id
                )),
            );
        }
    }
    if needs_admin(family, &method, &path) && !caller.is_admin() {
        let f = if family == Family::Trove {
            // Trove answers a non-admin call to /mgmt with 401, not 403.
            AuthFailure::unauthorized("User does not have admin privileges.")
        } else {
            AuthFailure::forbidden(format!(
                "user '{}' lacks the admin role this operation needs",
                caller.user_name
            ))
        };
        return deny(family, &method, &path, &who, f);
    }
    if !is_read(&method) && !is_auth_endpoint(&path) && !caller.can_write() {
        let msg = match family {
            Family::Danube => "You do not have permission to perform this action.".to_string(),
            _ => format!(
                "user '{}' has only the reader role on project '{}': it cannot change anything",
                caller.user_name, caller.project_name
            ),
        };
        return deny(family, &method, &path, &who, AuthFailure::forbidden(msg));
    }
    tracing::debug!(caller = %who, "authenticated");
    req.extensions_mut().insert(caller);
    next.run(req).await
}

// ---- Huawei AK/SK ----

/// The `Access=` value of an `SDK-HMAC-SHA256` Authorization header.
fn access_key_of(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    huawei::parse_authorization(auth)
        .ok()
        .map(|a| a.access_key.to_string())
}

/// Verifies an `SDK-HMAC-SHA256` request: buffers the body (the signature covers it),
/// makes sure the access key is known here (one read barrier if it is not), verifies the
/// signature and the date ([`huawei::verify`]) and `X-Project-Id` against the path
/// ([`huawei::check_project`]), then resolves the key's user and project.
async fn aksk(st: &AppState, req: Request) -> Result<(Caller, Request), (AuthFailure, String)> {
    let ak = access_key_of(req.headers()).ok_or_else(|| {
        (
            AuthFailure::unauthorized("malformed SDK-HMAC-SHA256 Authorization header"),
            "-".to_string(),
        )
    })?;
    let who = format!("access_key={ak}");
    let store = st.cp.store().clone();
    let known = |store: &Store| store.get_access_key(&ak).ok().flatten().is_some();
    if !known(&store) {
        if let Err(e) = st.cp.read_barrier(Consistency::Linearizable).await {
            tracing::debug!(error = %e, "read barrier for an unknown access key failed");
        }
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, crate::extract::BODY_LIMIT_BYTES)
        .await
        .map_err(|_| {
            (
                AuthFailure::status(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body is too large or could not be read",
                ),
                who.clone(),
            )
        })?;
    let lookup = |key: &str| {
        store
            .get_access_key(key)
            .ok()
            .flatten()
            .map(|k| k.secret_key)
    };
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    // HTTP/2 carries the host in `:authority`, not in a Host header, but the signer signed
    // it as `host`: give the verifier what an HTTP/1.1 request would have carried.
    let mut h2_headers = None;
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(value) = http::HeaderValue::from_str(authority.as_str()) {
                let mut h = parts.headers.clone();
                h.insert(http::header::HOST, value);
                h2_headers = Some(h);
            }
        }
    }
    let verified = huawei::verify(
        &huawei::HuaweiRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: h2_headers.as_ref().unwrap_or(&parts.headers),
            body: &bytes,
        },
        lookup,
        now_secs,
    )
    .map_err(|e| (AuthFailure::unauthorized(e.to_string()), who.clone()))?;
    let family = family_of(parts.uri.path());
    if let Some(project) = path_project(family, parts.uri.path()) {
        huawei::check_project(&parts.headers, project)
            .map_err(|e| (AuthFailure::unauthorized(e.to_string()), who.clone()))?;
    }
    let record = store
        .get_access_key(&verified)
        .map_err(|e| (AuthFailure::from_api_error(&ApiError::from(e)), who.clone()))?
        .ok_or_else(|| (AuthFailure::unauthorized("unknown access key"), who.clone()))?;
    let caller = tokens::caller_for(
        &store,
        &record.user_id,
        &record.project_id,
        AuthMethod::AkSk,
        None,
        Some(record.access_key.clone()),
    )
    .map_err(|reason| (AuthFailure::unauthorized(reason), who.clone()))?;
    Ok((caller, Request::from_parts(parts, Body::from(bytes))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_by_path() {
        assert_eq!(family_of("/drplane/v1/sites"), Family::Native);
        assert_eq!(family_of("/v3/auth/tokens"), Family::Keystone);
        assert_eq!(family_of("/identity/v3/auth/tokens"), Family::Keystone);
        assert_eq!(family_of("/v1.0/p/instances"), Family::Trove);
        assert_eq!(family_of("/v2/p/share-replicas"), Family::Manila);
        assert_eq!(family_of("/v1/p/server-groups"), Family::Sdrs);
        assert_eq!(family_of("/v1/p/cloudservers/x/migrate"), Family::Ecs);
        assert_eq!(family_of("/api/vm/x/replica/"), Family::Danube);
        assert_eq!(family_of("/nowhere"), Family::Native);
    }

    #[test]
    fn project_segments() {
        assert_eq!(
            path_project(Family::Trove, "/v1.0/p1/instances"),
            Some("p1")
        );
        assert_eq!(
            path_project(Family::Manila, "/v2/p1/share-replicas"),
            Some("p1")
        );
        assert_eq!(path_project(Family::Manila, "/v2/share-replicas/x"), None);
        assert_eq!(path_project(Family::Sdrs, "/v1/p2/jobs/j"), Some("p2"));
        assert_eq!(path_project(Family::Native, "/drplane/v1/sites"), None);
        assert_eq!(path_project(Family::Trove, "/v1.0/"), None);
    }

    #[test]
    fn rules() {
        assert_eq!(access_rule(&Method::GET, "/livez"), Access::Public);
        assert_eq!(access_rule(&Method::GET, "/v3"), Access::Public);
        assert_eq!(
            access_rule(&Method::POST, "/v3/auth/tokens"),
            Access::Public
        );
        assert_eq!(
            access_rule(&Method::GET, "/v3/auth/tokens"),
            Access::Authenticated
        );
        assert_eq!(
            access_rule(&Method::POST, "/api/accounts/login/"),
            Access::Public
        );
        assert_eq!(
            access_rule(&Method::GET, "/api/accounts/logout/"),
            Access::Authenticated
        );
        assert_eq!(
            access_rule(&Method::POST, "/drplane/v1/cluster/init"),
            Access::PublicUntilBootstrapped
        );
        assert_eq!(
            access_rule(&Method::GET, "/drplane/v1/sites"),
            Access::Authenticated
        );
        assert_eq!(access_rule(&Method::GET, "/nowhere"), Access::Authenticated);
        assert_eq!(
            access_rule(&Method::GET, "//drplane/v1/identity/users"),
            Access::Authenticated
        );
        assert!(needs_admin(
            Family::Native,
            &Method::GET,
            "/drplane/v1/identity/users"
        ));
        assert!(needs_admin(
            Family::Native,
            &Method::GET,
            "/drplane/v1/identity"
        ));
        assert!(!needs_admin(
            Family::Native,
            &Method::GET,
            "/drplane/v1/identityx"
        ));
        assert!(needs_admin(
            Family::Native,
            &Method::POST,
            "/drplane/v1/cluster/members"
        ));
        assert!(!needs_admin(
            Family::Native,
            &Method::GET,
            "/drplane/v1/cluster"
        ));
        assert!(!needs_admin(
            Family::Native,
            &Method::POST,
            "/drplane/v1/sites"
        ));
        assert!(needs_admin(
            Family::Trove,
            &Method::GET,
            "/v1.0/p/mgmt/instances"
        ));
    }

    #[test]
    fn shapes() {
        let f = AuthFailure::unauthorized("nope");
        assert_eq!(
            failure_body(Family::Trove, &f),
            serde_json::json!({"unauthorized": {"code": 401, "message": "nope"}})
        );
        assert_eq!(
            failure_body(Family::Danube, &f),
            serde_json::json!({"detail": "nope"})
        );
        assert_eq!(failure_body(Family::Sdrs, &f)["error"]["code"], "SDRS.0002");
        assert_eq!(failure_body(Family::Ecs, &f)["error_code"], "APIGW.0301");
        assert_eq!(failure_body(Family::Keystone, &f)["error"]["code"], 401);
        assert_eq!(
            failure_body(Family::Native, &f)["error"]["code"],
            "DRP-6001"
        );
        let f = AuthFailure::forbidden("no");
        assert!(failure_body(Family::Manila, &f).get("forbidden").is_some());
    }

    #[test]
    fn access_key_parsing() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!(
                "SDK-HMAC-SHA256 Access=AK123, SignedHeaders=host;x-sdk-date, Signature={}",
                "ab".repeat(32)
            ))
            .expect("header"),
        );
        assert_eq!(access_key_of(&h).as_deref(), Some("AK123"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic x"));
        assert_eq!(access_key_of(&h), None);
    }
}
