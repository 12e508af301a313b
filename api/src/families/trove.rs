//! OpenStack Trove (`/v1.0/{project_id}/…`): endpoints TROVE-* of ../shared/spec/trove.md.
//! Translates the wire format into `statemachine::trove` commands and back; holds no
//! state of its own.
//!
//! | endpoint | method and path |
//! |---|---|
//! | TROVE-VERSIONS | `GET /v1.0` (the root `/` is shared with MANILA-VERSIONS) |
//! | TROVE-INST-LIST / -LIST-DETAIL | `GET /v1.0/{p}/instances[/detail]?limit=&marker=&include_clustered=` |
//! | TROVE-INST-CREATE | `POST /v1.0/{p}/instances` (also replicas: `replica_of`, `replica_count`) |
//! | TROVE-INST-SHOW / -UPDATE / -DELETE | `GET` / `PUT`, `PATCH` / `DELETE /v1.0/{p}/instances/{id}` |
//! | TROVE-ACT-* | `POST /v1.0/{p}/instances/{id}/action` |
//! | TROVE-MGMT-LIST / -SHOW | `GET /v1.0/{p}/mgmt/instances[/{id}]` (admin; the auth layer answers others 401) |
//! | TROVE-MGMT-* actions | `POST /v1.0/{p}/mgmt/instances/{id}/action` |
//! | (flavors, for clients) | `GET /v1.0/{p}/flavors[/{id}]` |
//!
//! Errors are OpenStack faults: `{"badRequest": {"code": 400, "message": …}}` and its
//! siblings (spec §1.2); unknown paths under `/v1.0` answer `itemNotFound`. Another
//! project's instance answers 404 like a missing one. Every accepted action is a native
//! job (`/drplane/v1/jobs`); Trove clients watch `status` / `operating_status` instead.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::inventory::{validate_id, Datastore};
use drplane_statemachine::jobs::JobStatus;
use drplane_statemachine::trove::{
    self, CreateInstance, InstanceView, RefusalKind, TroveAccess, TroveAction, TroveCommand,
    TroveOutcome, FLAVORS, REPLICA_COUNT_MAX,
};
use drplane_statemachine::{Command, CommandError};
use serde_json::{json, Map, Value};

use crate::auth::{failure_response, AuthFailure, Caller, Family};
use crate::error::{ApiError, ErrorCode};
use crate::inventory::{blocking, propose_command};
use crate::routes::{read_barrier, AppState, ReadQuery};
use crate::time::format_rfc3339_ms;

/// Default and largest page of the instance lists.
pub const PAGE_DEFAULT: usize = 20;
pub const PAGE_MAX: usize = 1000;
/// How long TROVE-MGMT-STOP waits for the guest to confirm.
pub const STOP_WAIT: Duration = Duration::from_secs(30);

/// This family's routes (merged into the node's router; authentication already ran).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1.0", get(versions).fallback(bad_method))
        .route("/v1.0/", get(versions).fallback(bad_method))
        .route(
            "/v1.0/{project_id}/instances",
            get(list).post(create).fallback(bad_method),
        )
        .route(
            "/v1.0/{project_id}/instances/detail",
            get(list_detail).fallback(bad_method),
        )
        .route(
            "/v1.0/{project_id}/instances/{id}",
            get(show)
                .put(update)
                .patch(update)
                .delete(delete)
                .fallback(bad_method),
        )
        .route(
            "/v1.0/{project_id}/instances/{id}/action",
            post(action).fallback(bad_method),
        )
        .route(
            "/v1.0/{project_id}/mgmt/instances",
            get(mgmt_list).fallback(bad_method),
        )
        .route(
            "/v1.0/{project_id}/mgmt/instances/{id}",
            get(mgmt_show).fallback(bad_method),
        )
        .route(
            "/v1.0/{project_id}/mgmt/instances/{id}/action",
            post(mgmt_action).fallback(bad_method),
        )
        .route(
            "/v1.0/{project_id}/flavors",
            get(flavors).fallback(bad_method),
        )
        .route(
            "/v1.0/{project_id}/flavors/{id}",
            get(flavor_show).fallback(bad_method),
        )
        // Unknown paths under /v1.0 answer in Trove's shape (a catch-all may sit beside
        // static segments, not beside a parameter).
        .route("/v1.0/{project_id}", any(unknown_path))
        .route("/v1.0/{project_id}/{*rest}", any(unknown_path))
        .route(
            "/v1.0/{project_id}/instances/{id}/{*rest}",
            any(unknown_path),
        )
        .route("/v1.0/{project_id}/mgmt/{*rest}", any(unknown_path))
        .route(
            "/v1.0/{project_id}/mgmt/instances/{id}/{*rest}",
            any(unknown_path),
        )
}

// ---------------------------------------------------------------------------------------
// Errors: OpenStack faults
// ---------------------------------------------------------------------------------------

/// An error answered as a Trove fault.
#[derive(Debug)]
pub(crate) struct TroveError {
    status: StatusCode,
    message: String,
    retry_after_secs: Option<u64>,
}

impl TroveError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        TroveError {
            status,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        TroveError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(id: &str) -> Self {
        TroveError::new(
            StatusCode::NOT_FOUND,
            format!(
                "Resource {} cannot be found.",
                crate::extract::truncate(id, 128)
            ),
        )
    }

    fn from_refusal(kind: RefusalKind, message: String) -> Self {
        let status = match kind {
            RefusalKind::BadRequest => StatusCode::BAD_REQUEST,
            RefusalKind::Unauthorized => StatusCode::UNAUTHORIZED,
            RefusalKind::Forbidden => StatusCode::FORBIDDEN,
            RefusalKind::NotFound => StatusCode::NOT_FOUND,
            RefusalKind::OverLimit => StatusCode::PAYLOAD_TOO_LARGE,
            RefusalKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            RefusalKind::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        };
        TroveError::new(status, message)
    }

    fn from_command(e: CommandError) -> Self {
        match e {
            CommandError::Invalid { .. } => TroveError::bad(format!("Validation error: {e}")),
            CommandError::NotFound { id, .. } => TroveError::not_found(&id),
            CommandError::AlreadyExists { .. } => {
                TroveError::new(StatusCode::CONFLICT, e.to_string())
            }
            CommandError::Conflict(m) => TroveError::new(StatusCode::UNPROCESSABLE_ENTITY, m),
        }
    }
}

impl From<ApiError> for TroveError {
    fn from(e: ApiError) -> Self {
        if e.code == ErrorCode::Internal {
            // Logged once, here; the caller gets the request id to quote.
            tracing::error!(detail = %e.message, "internal error");
            return TroveError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error. Please keep this response's X-Request-Id to help us figure out what went wrong.",
            );
        }
        let mut t = TroveError::new(e.status, e.message);
        t.retry_after_secs = e.retry_after_secs;
        t
    }
}

impl From<CommandError> for TroveError {
    fn from(e: CommandError) -> Self {
        TroveError::from_command(e)
    }
}

/// Trove's fault name of a status (spec §1.2).
fn fault_name(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 => "conflict",
        413 => "overLimit",
        415 => "badMediaType",
        422 => "unprocessableEntity",
        501 => "notImplemented",
        503 => "serviceUnavailable",
        _ => "instanceFault",
    }
}

impl IntoResponse for TroveError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::UNAUTHORIZED {
            // The auth layer's shape, with its WWW-Authenticate.
            return failure_response(Family::Trove, &AuthFailure::unauthorized(self.message));
        }
        let mut inner = json!({"code": self.status.as_u16(), "message": self.message});
        if let Some(s) = self.retry_after_secs {
            inner["retryAfter"] = json!(s.to_string());
        }
        let mut resp =
            (self.status, Json(json!({ fault_name(self.status): inner }))).into_response();
        if let Some(s) = self.retry_after_secs {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(s),
            );
        }
        // Shaped for Trove: the request middleware must not rewrite it.
        resp.extensions_mut().insert(crate::error::NativeErrorShape);
        resp
    }
}

type TroveResult = Result<Response, TroveError>;

async fn bad_method() -> TroveError {
    TroveError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "The server could not comply with the request since it is either malformed or otherwise incorrect.",
    )
}

async fn unknown_path() -> TroveError {
    TroveError::new(StatusCode::NOT_FOUND, "The resource could not be found.")
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// `scheme://host` as the client reached this node (only a plausible Host is echoed).
fn base_url(st: &AppState, headers: &HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("{}://{host}", st.auth.options.public_scheme)
}

/// Trove's timestamps: `YYYY-MM-DDTHH:MM:SS`.
fn ts(ms: u64) -> String {
    format_rfc3339_ms(ms).chars().take(19).collect()
}

fn links(base: &str, project: &str, kind: &str, id: &str) -> Value {
    json!([
        {"href": format!("{base}/v1.0/{project}/{kind}/{id}"), "rel": "self"},
        {"href": format!("{base}/{kind}/{id}"), "rel": "bookmark"},
    ])
}

fn path2(p: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), TroveError> {
    p.map(|Path(x)| x)
        .map_err(|e| TroveError::bad(format!("Invalid path: {e}")))
}

fn path1(p: Result<Path<String>, PathRejection>) -> Result<String, TroveError> {
    p.map(|Path(x)| x)
        .map_err(|e| TroveError::bad(format!("Invalid path: {e}")))
}

fn json_body(body: &Bytes) -> Result<Value, TroveError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(TroveError::bad("Invalid request body."));
    }
    serde_json::from_slice::<Value>(body)
        .map_err(|e| TroveError::bad(format!("Invalid request body: the body is not JSON ({e}).")))
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A flavor reference: an id, or a URL whose last segment is the id.
fn flavor_ref(v: &Value) -> Result<String, TroveError> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        _ => {
            return Err(TroveError::bad(
                "Validation error: 'flavorRef' must be a string or an integer.",
            ))
        }
    };
    if s.is_empty() || s.len() > 255 || !s.chars().any(|c| c.is_ascii_alphanumeric()) {
        return Err(TroveError::bad(
            "Validation error: 'flavorRef' must be 1 to 255 characters with a letter or digit.",
        ));
    }
    Ok(s.rsplit('/').next().unwrap_or(&s).to_string())
}

/// A volume size: an integer ≥ 1, or a string of digits without a leading zero.
fn volume_size(v: &Value) -> Result<u64, TroveError> {
    let bad = || TroveError::bad("Validation error: 'size' must be an integer of at least 1 (GB).");
    match v {
        Value::Number(n) => n.as_u64().filter(|n| *n >= 1).ok_or_else(bad),
        Value::String(s)
            if !s.is_empty() && !s.starts_with('0') && s.chars().all(|c| c.is_ascii_digit()) =>
        {
            s.parse::<u64>().map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

fn opt_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, TroveError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TroveError::bad(format!(
            "Validation error: '{key}' must be a string."
        ))),
    }
}

fn parse_access(v: &Value) -> Result<TroveAccess, TroveError> {
    let Value::Object(o) = v else {
        return Err(TroveError::bad(
            "Validation error: 'access' must be an object.",
        ));
    };
    let is_public = match o.get("is_public") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(TroveError::bad(
                "Validation error: 'access.is_public' must be a boolean.",
            ))
        }
    };
    let allowed_cidrs = match o.get("allowed_cidrs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|c| match c {
                Value::String(s) if valid_cidr(s) => Ok(s.clone()),
                _ => Err(TroveError::bad(
                    "Validation error: 'access.allowed_cidrs' must be IPv4 CIDRs such as 10.0.0.0/24.",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(TroveError::bad(
                "Validation error: 'access.allowed_cidrs' must be a list.",
            ))
        }
    };
    Ok(TroveAccess {
        is_public,
        allowed_cidrs,
    })
}

fn valid_cidr(s: &str) -> bool {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    ip.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Proposes a Trove command; a refusal becomes its fault.
async fn propose_trove(
    st: &AppState,
    headers: &HeaderMap,
    cmd: TroveCommand,
) -> Result<(Vec<String>, Option<String>), TroveError> {
    match propose_command(st, headers, Command::Trove(cmd)).await? {
        Ok(Outcome::Trove(o)) => match *o {
            TroveOutcome::Accepted { ids, job_id } => Ok((ids, job_id)),
            TroveOutcome::Refused(r) => Err(TroveError::from_refusal(r.kind, r.message)),
        },
        Ok(other) => Err(ApiError::internal(format!("a Trove command produced {other:?}")).into()),
        Err(e) => Err(e.into()),
    }
}

fn accepted() -> Response {
    StatusCode::ACCEPTED.into_response()
}

/// A live instance of `project` (admins: of any project when `project` is None).
async fn load(st: &AppState, project: Option<&str>, id: &str) -> Result<InstanceView, TroveError> {
    if validate_id("id", id).is_err() {
        return Err(TroveError::not_found(id));
    }
    read_barrier(st, ReadQuery::default()).await?;
    let store = st.cp.store().clone();
    let key = id.to_string();
    let v = blocking("trove show", move || store.trove_instance(&key)).await?;
    match v {
        Some(v) if project.is_none_or(|p| v.db.project == p) => Ok(v),
        _ => Err(TroveError::not_found(id)),
    }
}

// ---------------------------------------------------------------------------------------
// Views (spec §5)
// ---------------------------------------------------------------------------------------

struct ViewCtx<'a> {
    base: &'a str,
    admin: bool,
    detail: bool,
}

fn instance_view(v: &InstanceView, cx: &ViewCtx<'_>) -> Value {
    let db = &v.db;
    let t = &v.trove;
    let p = &db.project;
    let mut o = Map::new();
    o.insert("id".into(), json!(db.id));
    o.insert("name".into(), json!(db.name));
    o.insert("status".into(), json!(v.status()));
    o.insert("operating_status".into(), json!(v.operating_status()));
    o.insert("links".into(), links(cx.base, p, "instances", &db.id));
    o.insert(
        "flavor".into(),
        json!({"id": t.flavor_id, "links": links(cx.base, p, "flavors", &t.flavor_id)}),
    );
    let mut ds = json!({"type": db.datastore.kind, "version": db.datastore.version});
    if cx.detail {
        ds["version_number"] = json!(db.datastore.version);
    }
    o.insert("datastore".into(), ds);
    o.insert(
        "region".into(),
        json!(t.region.clone().unwrap_or_else(|| "RegionOne".into())),
    );
    o.insert(
        "access".into(),
        json!({"is_public": t.access.is_public, "allowed_cidrs": t.access.allowed_cidrs}),
    );
    let mut vol = json!({"size": v.volume_gb()});
    if cx.detail && v.status() == "ACTIVE" {
        vol["used"] = json!(0.0);
    }
    o.insert("volume".into(), vol);
    o.insert("ip".into(), json!([]));
    o.insert("addresses".into(), json!([]));
    if let Some(src) = &t.replica_of {
        o.insert(
            "replica_of".into(),
            json!({"id": src, "links": links(cx.base, p, "instances", src)}),
        );
    }
    if !t.replicas.is_empty() {
        let reps: Vec<Value> = t
            .replicas
            .iter()
            .map(|r| json!({"id": r, "links": links(cx.base, p, "instances", r)}))
            .collect();
        o.insert("replicas".into(), Value::Array(reps));
    }
    if cx.detail {
        o.insert(
            "created".into(),
            json!(ts(t.created_at_ms.max(db.created_at_ms))),
        );
        o.insert(
            "updated".into(),
            json!(ts(t.updated_at_ms.max(db.updated_at_ms))),
        );
        o.insert(
            "service_status_updated".into(),
            json!(ts(t.service_updated_ms)),
        );
        if let Some(f) = &t.fault {
            o.insert(
                "fault".into(),
                json!({
                    "message": f.message,
                    "created": ts(f.created_ms),
                    "details": if cx.admin { json!(f.details) } else { Value::Null },
                }),
            );
        }
        if let Some(l) = &t.locality {
            o.insert("locality".into(), json!(l));
        }
    }
    if cx.admin {
        o.insert("tenant_id".into(), json!(p));
        if cx.detail {
            o.insert("server_id".into(), json!(db.id));
            o.insert("volume_id".into(), json!(db.volume.id));
            o.insert("encrypted_rpc_messaging".into(), json!(false));
        }
    }
    Value::Object(o)
}

/// The admin view (§5.2), with drplane's replication details.
fn mgmt_view(st: &AppState, v: &InstanceView, cx: &ViewCtx<'_>, show: bool) -> Value {
    let mut o = instance_view(v, cx);
    let db = &v.db;
    let t = &v.trove;
    let server_status = match db.status {
        drplane_statemachine::inventory::DatabaseStatus::Build => "BUILD",
        drplane_statemachine::inventory::DatabaseStatus::Active => "ACTIVE",
        drplane_statemachine::inventory::DatabaseStatus::Shutdown => "SHUTDOWN",
        drplane_statemachine::inventory::DatabaseStatus::Reboot => "REBOOT",
        drplane_statemachine::inventory::DatabaseStatus::Error => "ERROR",
    };
    if let Value::Object(m) = &mut o {
        let deleted = t.deleted_at_ms.is_some();
        m.insert(
            "server".into(),
            json!({
                "id": db.id,
                "name": db.name,
                "status": if deleted { "DELETED" } else { server_status },
                "host": db.host,
                "tenant_id": db.project,
                "addresses": {},
            }),
        );
        m.insert("server_id".into(), json!(db.id));
        m.insert("volume_id".into(), json!(db.volume.id));
        m.insert("service_status".into(), json!(t.service.api_name()));
        m.insert("task_description".into(), json!(t.task.description()));
        m.insert("deleted".into(), json!(deleted));
        m.insert("deleted_at".into(), json!(t.deleted_at_ms.map(ts)));
        m.insert("tenant_id".into(), json!(db.project));
        m.insert("encrypted_rpc_messaging".into(), json!(false));
        // drplane's own: the job the instance is busy with, and the link feeding it.
        m.insert("job_id".into(), json!(t.busy_job));
        if let Some(pid) = &t.feed_pair {
            let pair = st.cp.store().get_pair(pid).ok().flatten();
            let now = crate::auth::now_ms();
            m.insert(
                "replication".into(),
                match pair {
                    Some(p) => json!({
                        "pair_id": p.id,
                        "state": p.state.as_str(),
                        "source_host": p.source.host,
                        "target_host": p.target.host,
                        "recovery_point": p.recovery_point_ms.map(format_rfc3339_ms),
                        "rpo_seconds": p.rpo_seconds(now),
                        "busy_job": p.busy_job,
                        "last_error": p.last_error,
                    }),
                    None => json!({"pair_id": pid, "state": "gone"}),
                },
            );
        }
        if show {
            m.insert(
                "guest_status".into(),
                json!({"state_description": t.service.api_name().to_ascii_lowercase()}),
            );
            m.insert(
                "volume".into(),
                json!({
                    "size": v.volume_gb(),
                    "id": db.volume.id,
                    "status": if deleted { "deleted" } else { "in-use" },
                    "attachments": [{"server_id": db.id, "device": "/dev/vdb"}],
                    "host": db.host,
                    "pool": db.volume.pool,
                    "size_bytes": db.volume.size_bytes,
                }),
            );
        }
    }
    o
}

// ---------------------------------------------------------------------------------------
// TROVE-VERSIONS
// ---------------------------------------------------------------------------------------

/// The Trove entry of a versions document (for `GET /` too, which the families share).
pub(crate) fn version_entry(base: &str) -> Value {
    json!({
        "id": "v1.0",
        "links": [{"href": format!("{base}/v1.0/"), "rel": "self"}],
        "status": "CURRENT",
        "updated": "2012-08-01T00:00:00Z",
    })
}

async fn versions(State(st): State<AppState>, headers: HeaderMap) -> Json<Value> {
    let base = base_url(&st, &headers);
    Json(json!({"versions": [version_entry(&base)]}))
}

// ---------------------------------------------------------------------------------------
// TROVE-INST-LIST, TROVE-INST-LIST-DETAIL, TROVE-MGMT-LIST
// ---------------------------------------------------------------------------------------

fn parse_limit(q: &std::collections::HashMap<String, String>) -> Result<usize, TroveError> {
    match q.get("limit").map(String::as_str) {
        None | Some("") => Ok(PAGE_DEFAULT),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n.min(PAGE_MAX)),
            _ => Err(TroveError::bad(format!(
                "Validation error: limit '{}' must be a positive integer.",
                crate::extract::truncate(s, 32)
            ))),
        },
    }
}

fn parse_bool(
    q: &std::collections::HashMap<String, String>,
    key: &str,
) -> Result<bool, TroveError> {
    match q.get(key).map(|s| s.to_ascii_lowercase()) {
        None => Ok(false),
        Some(s) if s.is_empty() || s == "false" || s == "0" => Ok(false),
        Some(s) if s == "true" || s == "1" => Ok(true),
        Some(_) => Err(TroveError::bad(format!(
            "Validation error: '{key}' must be true or false."
        ))),
    }
}

/// One page after `marker` (ids in order), with a `next` link when more remain.
fn page(
    items: Vec<InstanceView>,
    q: &std::collections::HashMap<String, String>,
    next_base: &str,
    render: impl Fn(&InstanceView) -> Value,
) -> Result<Value, TroveError> {
    let limit = parse_limit(q)?;
    let marker = q.get("marker").filter(|m| !m.is_empty());
    let rest: Vec<InstanceView> = items
        .into_iter()
        .filter(|v| marker.is_none_or(|m| v.db.id.as_str() > m.as_str()))
        .collect();
    let more = rest.len() > limit;
    let shown: Vec<Value> = rest.iter().take(limit).map(render).collect();
    let mut body = json!({"instances": shown});
    if more {
        if let Some(last) = rest.get(limit - 1) {
            body["links"] = json!([{
                "rel": "next",
                "href": format!("{next_base}?limit={limit}&marker={}", last.db.id),
            }]);
        }
    }
    Ok(body)
}

async fn list_impl(
    st: AppState,
    caller: Caller,
    headers: HeaderMap,
    project: String,
    q: std::collections::HashMap<String, String>,
    detail: bool,
) -> TroveResult {
    parse_bool(&q, "include_clustered")?;
    read_barrier(&st, ReadQuery::default()).await?;
    let store = st.cp.store().clone();
    let p = project.clone();
    let items = blocking("trove list", move || store.trove_instances(Some(&p))).await?;
    let base = base_url(&st, &headers);
    let cx = ViewCtx {
        base: &base,
        admin: caller.is_admin(),
        detail,
    };
    let next = format!(
        "{base}/v1.0/{project}/instances{}",
        if detail { "/detail" } else { "" }
    );
    let body = page(items, &q, &next, |v| instance_view(v, &cx))?;
    Ok(Json(body).into_response())
}

/// TROVE-INST-LIST
async fn list(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> TroveResult {
    let project = path1(p)?;
    list_impl(st, caller, headers, project, q, false).await
}

/// TROVE-INST-LIST-DETAIL
async fn list_detail(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> TroveResult {
    let project = path1(p)?;
    list_impl(st, caller, headers, project, q, true).await
}

/// TROVE-MGMT-LIST (admin: every project, `project_id` filters; `deleted=true` lists the
/// deleted ones).
async fn mgmt_list(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> TroveResult {
    let project = path1(p)?;
    let deleted = parse_bool(&q, "deleted")?;
    parse_bool(&q, "include_clustered")?;
    let filter = q.get("project_id").filter(|s| !s.is_empty()).cloned();
    read_barrier(&st, ReadQuery::default()).await?;
    let store = st.cp.store().clone();
    let items = blocking("trove mgmt list", move || {
        if deleted {
            store.trove_deleted_instances(filter.as_deref())
        } else {
            store.trove_instances(filter.as_deref())
        }
    })
    .await?;
    let base = base_url(&st, &headers);
    let cx = ViewCtx {
        base: &base,
        admin: caller.is_admin(),
        detail: true,
    };
    let next = format!("{base}/v1.0/{project}/mgmt/instances");
    let body = page(items, &q, &next, |v| mgmt_view(&st, v, &cx, false))?;
    Ok(Json(body).into_response())
}

// ---------------------------------------------------------------------------------------
// TROVE-INST-SHOW, TROVE-MGMT-SHOW
// ---------------------------------------------------------------------------------------

async fn show(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
) -> TroveResult {
    let (project, id) = path2(p)?;
    let v = load(&st, Some(&project), &id).await?;
    let base = base_url(&st, &headers);
    let cx = ViewCtx {
        base: &base,
        admin: caller.is_admin(),
        detail: true,
    };
    Ok(Json(json!({"instance": instance_view(&v, &cx)})).into_response())
}

async fn mgmt_show(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> TroveResult {
    let (_project, id) = path2(p)?;
    let deleted = parse_bool(&q, "deleted")?;
    let v = match load(&st, None, &id).await {
        Ok(v) => v,
        Err(e) if deleted && e.status == StatusCode::NOT_FOUND => {
            let store = st.cp.store().clone();
            let key = id.clone();
            blocking("trove mgmt show", move || {
                store.trove_deleted_instance(&key)
            })
            .await?
            .ok_or_else(|| TroveError::not_found(&id))?
        }
        Err(e) => return Err(e),
    };
    let base = base_url(&st, &headers);
    let cx = ViewCtx {
        base: &base,
        admin: caller.is_admin(),
        detail: true,
    };
    Ok(Json(json!({"instance": mgmt_view(&st, &v, &cx, true)})).into_response())
}

// ---------------------------------------------------------------------------------------
// TROVE-INST-CREATE
// ---------------------------------------------------------------------------------------

fn parse_create(project: &str, body: &Value) -> Result<CreateInstance, TroveError> {
    let Some(Value::Object(i)) = body.get("instance") else {
        return Err(TroveError::bad(
            "Validation error: the body must be {\"instance\": {...}}.",
        ));
    };
    let name =
        match i.get("name") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(TroveError::bad(
                "Validation error: instance 'name' is a required property and must be a string.",
            )),
        };
    trove::validate_name(&name).map_err(|e| TroveError::bad(format!("Validation error: {e}")))?;
    let replica_of = opt_str(i, "replica_of")?;
    let flavor_id = match i.get("flavorRef") {
        None | Some(Value::Null) => None,
        Some(v) => Some(flavor_ref(v)?),
    };
    let volume_gb = match i.get("volume") {
        None | Some(Value::Null) => None,
        Some(Value::Object(v)) => Some(volume_size(v.get("size").unwrap_or(&Value::Null))?),
        Some(_) => {
            return Err(TroveError::bad(
                "Validation error: 'volume' must be an object.",
            ))
        }
    };
    let datastore = match i.get("datastore") {
        None | Some(Value::Null) => None,
        Some(Value::Object(d)) => {
            let kind = opt_str(d, "type")?.unwrap_or_else(|| trove::DEFAULT_DATASTORE.0.into());
            let version = opt_str(d, "version")?
                .or(opt_str(d, "version_number")?)
                .unwrap_or_else(|| trove::DEFAULT_DATASTORE.1.into());
            Some(Datastore { kind, version })
        }
        Some(_) => {
            return Err(TroveError::bad(
                "Validation error: 'datastore' must be an object.",
            ))
        }
    };
    let replica_count = match i.get("replica_count") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=REPLICA_COUNT_MAX as u64).contains(&n) => Some(n as usize),
            _ => {
                return Err(TroveError::bad(format!(
                    "Validation error: 'replica_count' must be an integer from 1 to {REPLICA_COUNT_MAX}."
                )))
            }
        },
    };
    if replica_count.is_some() && replica_of.is_none() {
        return Err(TroveError::bad(
            "Cannot create multiple non-replica instances: 'replica_count' needs 'replica_of'.",
        ));
    }
    let locality = opt_str(i, "locality")?;
    if let Some(l) = &locality {
        if l != "affinity" && l != "anti-affinity" {
            return Err(TroveError::bad(
                "Validation error: 'locality' must be 'affinity' or 'anti-affinity'.",
            ));
        }
    }
    if let Some(n) = i.get("nics") {
        let Value::Array(a) = n else {
            return Err(TroveError::bad("Validation error: 'nics' must be a list."));
        };
        if a.len() > 1 {
            return Err(TroveError::bad(
                "Validation error: at most one item in 'nics'.",
            ));
        }
        if replica_of.is_some() && a.iter().any(|n| n.get("ip_address").is_some()) {
            return Err(TroveError::bad(
                "Cannot specify an IP address for replicas.",
            ));
        }
    }
    if replica_of.is_some() {
        if locality.is_some() {
            return Err(TroveError::bad("Cannot set 'locality' for replicas."));
        }
        for k in ["databases", "users"] {
            if i.get(k).is_some_and(|v| !v.is_null()) {
                return Err(TroveError::bad(format!(
                    "Cannot specify '{k}' when creating replicas."
                )));
            }
        }
    }
    let access = match i.get("access") {
        None | Some(Value::Null) => None,
        Some(a) => Some(parse_access(a)?),
    };
    let count = if replica_of.is_some() {
        replica_count.unwrap_or(1)
    } else {
        1
    };
    Ok(CreateInstance {
        project: project.to_string(),
        ids: (0..count).map(|_| new_id()).collect(),
        name,
        flavor_id,
        volume_gb,
        datastore,
        replica_of,
        availability_zone: opt_str(i, "availability_zone")?,
        locality,
        region: opt_str(i, "region_name")?,
        access,
        job_id: new_id(),
    })
}

async fn create(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> TroveResult {
    let project = path1(p)?;
    let body = json_body(&body)?;
    let req = parse_create(&project, &body)?;
    let (ids, _) = propose_trove(&st, &headers, TroveCommand::Create(Box::new(req))).await?;
    let first = ids
        .first()
        .cloned()
        .ok_or_else(|| ApiError::internal("a Trove create accepted no instance"))?;
    let v = load(&st, Some(&project), &first).await?;
    let base = base_url(&st, &headers);
    let cx = ViewCtx {
        base: &base,
        admin: caller.is_admin(),
        detail: true,
    };
    Ok((
        StatusCode::OK,
        Json(json!({"instance": instance_view(&v, &cx)})),
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------
// TROVE-INST-UPDATE, TROVE-INST-DELETE
// ---------------------------------------------------------------------------------------

async fn update(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> TroveResult {
    let (project, id) = path2(p)?;
    let body = json_body(&body)?;
    let Some(Value::Object(i)) = body.get("instance") else {
        return Err(TroveError::bad(
            "Validation error: the body must be {\"instance\": {...}}.",
        ));
    };
    const KEYS: &[&str] = &[
        "name",
        "replica_of",
        "slave_of",
        "configuration",
        "datastore_version",
        "access",
    ];
    if let Some(k) = i.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(TroveError::bad(format!(
            "Validation error: additional property '{}' is not allowed.",
            crate::extract::truncate(k, 64)
        )));
    }
    if i.keys().filter(|k| *k != "name").count() > 1 {
        return Err(TroveError::bad(
            "Only one attribute (except 'name') is allowed to update.",
        ));
    }
    let name = match i.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => {
            trove::validate_name(n)
                .map_err(|e| TroveError::bad(format!("Validation error: {e}")))?;
            Some(n.clone())
        }
        Some(_) => {
            return Err(TroveError::bad(
                "Validation error: 'name' must be a string.",
            ))
        }
    };
    let mut job_action = None;
    if i.contains_key("slave_of") {
        job_action = Some(TroveAction::Detach);
    }
    if let Some(r) = i.get("replica_of") {
        if !r.is_null() {
            return Err(TroveError::bad(
                "Validation error: 'replica_of' can only be set to null (detach the replica).",
            ));
        }
        job_action = Some(TroveAction::Detach);
    }
    if let Some(c) = i.get("configuration") {
        match c {
            Value::Null => {}
            Value::String(cid) => {
                return Err(TroveError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "Configuration group {} cannot be found.",
                        crate::extract::truncate(cid, 64)
                    ),
                ))
            }
            _ => {
                return Err(TroveError::bad(
                    "Validation error: 'configuration' must be a string or null.",
                ))
            }
        }
    }
    if let Some(dv) = i.get("datastore_version") {
        let Value::String(version) = dv else {
            return Err(TroveError::bad(
                "Validation error: 'datastore_version' must be a string.",
            ));
        };
        job_action = Some(TroveAction::Upgrade {
            version: version.clone(),
        });
    }
    let access = match i.get("access") {
        None | Some(Value::Null) => None,
        Some(a) => Some(parse_access(a)?),
    };
    if validate_id("id", &id).is_err() {
        return Err(TroveError::not_found(&id));
    }
    if let Some(action) = job_action {
        propose_trove(
            &st,
            &headers,
            TroveCommand::Act {
                id: id.clone(),
                scope: Some(project.clone()),
                action,
                job_id: new_id(),
            },
        )
        .await?;
    }
    if name.is_some() || access.is_some() {
        propose_trove(
            &st,
            &headers,
            TroveCommand::Update {
                id,
                scope: Some(project),
                name,
                access,
            },
        )
        .await?;
    }
    Ok(accepted())
}

async fn delete(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
) -> TroveResult {
    let (project, id) = path2(p)?;
    act(&st, &headers, Some(project), id, TroveAction::Delete).await?;
    Ok(accepted())
}

async fn act(
    st: &AppState,
    headers: &HeaderMap,
    scope: Option<String>,
    id: String,
    action: TroveAction,
) -> Result<Option<String>, TroveError> {
    if validate_id("id", &id).is_err() {
        return Err(TroveError::not_found(&id));
    }
    let (_, job) = propose_trove(
        st,
        headers,
        TroveCommand::Act {
            id,
            scope,
            action,
            job_id: new_id(),
        },
    )
    .await?;
    Ok(job)
}

// ---------------------------------------------------------------------------------------
// TROVE-ACT-*, TROVE-MGMT-* actions
// ---------------------------------------------------------------------------------------

/// The one action key of an action body and its value (an object).
fn one_action<'a>(
    body: &'a Value,
    known: &[&str],
) -> Result<(&'a str, &'a Map<String, Value>), TroveError> {
    let Value::Object(o) = body else {
        return Err(TroveError::bad("Invalid request body."));
    };
    if o.is_empty() {
        return Err(TroveError::bad("Invalid request body."));
    }
    if let Some(k) = o.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(TroveError::bad(format!(
            "Invalid instance action: {}",
            crate::extract::truncate(k, 64)
        )));
    }
    if o.len() > 1 {
        return Err(TroveError::bad(
            "Only one action can be specified per request.",
        ));
    }
    let Some((k, v)) = o.iter().next() else {
        return Err(TroveError::bad("Invalid request body."));
    };
    match v {
        Value::Object(inner) => Ok((k.as_str(), inner)),
        _ => Err(TroveError::bad(format!(
            "Validation error: '{k}' must be an object."
        ))),
    }
}

async fn action(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> TroveResult {
    let (project, id) = path2(p)?;
    let body = json_body(&body)?;
    let (key, inner) = one_action(
        &body,
        &[
            "restart",
            "resize",
            "promote_to_replica_source",
            "eject_replica_source",
            "reset_status",
        ],
    )?;
    let action =
        match key {
            // TROVE-ACT-RESTART
            "restart" => TroveAction::Restart,
            "resize" => match (inner.get("flavorRef"), inner.get("volume")) {
                (Some(_), Some(_)) => return Err(TroveError::bad(
                    "Validation error: 'resize' takes either 'flavorRef' or 'volume', not both.",
                )),
                // TROVE-ACT-RESIZE-FLAVOR
                (Some(f), None) => TroveAction::ResizeFlavor {
                    flavor_id: flavor_ref(f)?,
                },
                // TROVE-ACT-RESIZE-VOLUME
                (None, Some(Value::Object(v))) => TroveAction::ResizeVolume {
                    size_gb: volume_size(v.get("size").unwrap_or(&Value::Null))?,
                },
                (None, Some(_)) => {
                    return Err(TroveError::bad(
                        "Validation error: 'resize.volume' must be an object with 'size'.",
                    ))
                }
                (None, None) => {
                    return Err(TroveError::bad(
                        "Validation error: 'resize' needs 'flavorRef' or 'volume'.",
                    ))
                }
            },
            // TROVE-ACT-PROMOTE
            "promote_to_replica_source" => TroveAction::Promote,
            // TROVE-ACT-EJECT
            "eject_replica_source" => TroveAction::Eject,
            // TROVE-ACT-RESET-STATUS: admin by policy; `force_delete` (the client's force
            // delete) is the owner's.
            _ => {
                if !caller.is_admin() && !inner.contains_key("force_delete") {
                    return Err(TroveError::new(
                        StatusCode::FORBIDDEN,
                        "Policy doesn't allow instance:reset_status to be performed.",
                    ));
                }
                TroveAction::ResetStatus
            }
        };
    act(&st, &headers, Some(project), id, action).await?;
    Ok(accepted())
}

async fn mgmt_action(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> TroveResult {
    let (_project, id) = path2(p)?;
    let body = json_body(&body)?;
    let (key, inner) = one_action(
        &body,
        &["stop", "reboot", "migrate", "reset-task-status", "rebuild"],
    )?;
    let action = match key {
        // TROVE-MGMT-STOP
        "stop" => TroveAction::Stop,
        // TROVE-MGMT-REBOOT
        "reboot" => TroveAction::Reboot,
        // TROVE-MGMT-MIGRATE
        "migrate" => TroveAction::Migrate {
            host: opt_str(inner, "host")?,
        },
        // TROVE-MGMT-RESET-TASK
        "reset-task-status" => TroveAction::ResetTask,
        // TROVE-MGMT-REBUILD
        _ => {
            if let Some(k) = inner.keys().find(|k| *k != "image_id") {
                return Err(TroveError::bad(format!(
                    "Validation error: additional property '{}' is not allowed in 'rebuild'.",
                    crate::extract::truncate(k, 64)
                )));
            }
            match inner.get("image_id") {
                Some(Value::String(s)) if is_uuid(s) => TroveAction::Rebuild {
                    image_id: s.clone(),
                },
                _ => {
                    return Err(TroveError::bad(
                        "Validation error: 'rebuild.image_id' is required and must be a UUID.",
                    ))
                }
            }
        }
    };
    if let TroveAction::Migrate { host: Some(h) } = &action {
        drplane_statemachine::inventory::validate_host_name("host", h)
            .map_err(|e| TroveError::bad(format!("Validation error: {e}")))?;
    }
    let stop = action == TroveAction::Stop;
    let job = act(&st, &headers, None, id, action).await?;
    if let (true, Some(job)) = (stop, job) {
        // TROVE-MGMT-STOP answers once the guest confirmed.
        wait_job(&st, &job).await?;
    }
    Ok(accepted())
}

/// Waits (bounded) for a job to end; a failure is the guest's error (500).
async fn wait_job(st: &AppState, job: &str) -> Result<(), TroveError> {
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        if let Some(j) = st.cp.store().get_job(job).map_err(ApiError::from)? {
            match j.status {
                JobStatus::Success => return Ok(()),
                JobStatus::Fail => {
                    let reason = j.fail_reason.unwrap_or_default();
                    tracing::warn!(job, reason = %reason, "the guest could not stop the database");
                    return Err(TroveError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("The guest could not stop the database: {reason}"),
                    ));
                }
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            // Still running: accepted; the status shows the outcome.
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Flavors (what `flavorRef` names)
// ---------------------------------------------------------------------------------------

fn flavor_view(base: &str, project: &str, f: &trove::TroveFlavor) -> Value {
    json!({
        "id": f.id,
        "str_id": f.id,
        "name": f.name,
        "ram": f.ram_mb,
        "vcpus": f.vcpus,
        "disk": 0,
        "links": links(base, project, "flavors", f.id),
    })
}

async fn flavors(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
) -> TroveResult {
    let project = path1(p)?;
    let base = base_url(&st, &headers);
    let all: Vec<Value> = FLAVORS
        .iter()
        .map(|f| flavor_view(&base, &project, f))
        .collect();
    Ok(Json(json!({"flavors": all})).into_response())
}

async fn flavor_show(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
) -> TroveResult {
    let (project, id) = path2(p)?;
    let base = base_url(&st, &headers);
    match trove::flavor(&id) {
        Some(f) => Ok(Json(json!({"flavor": flavor_view(&base, &project, f)})).into_response()),
        None => Err(TroveError::not_found(&id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavor_refs_and_sizes() {
        assert_eq!(flavor_ref(&json!("2")).ok().as_deref(), Some("2"));
        assert_eq!(flavor_ref(&json!(3)).ok().as_deref(), Some("3"));
        assert_eq!(
            flavor_ref(&json!("http://x/v1.0/p/flavors/4"))
                .ok()
                .as_deref(),
            Some("4")
        );
        assert!(flavor_ref(&json!("")).is_err());
        assert!(flavor_ref(&json!("---")).is_err());
        assert!(flavor_ref(&json!(null)).is_err());
        assert_eq!(volume_size(&json!(4)).ok(), Some(4));
        assert_eq!(volume_size(&json!("12")).ok(), Some(12));
        assert!(volume_size(&json!("012")).is_err());
        assert!(volume_size(&json!(0)).is_err());
        assert!(volume_size(&json!(-1)).is_err());
        assert!(volume_size(&json!(1.5)).is_err());
    }

    #[test]
    fn action_bodies() {
        let known = ["restart", "resize"];
        assert!(one_action(&json!({"restart": {}}), &known).is_ok());
        let e = one_action(&json!({}), &known).err().map(|e| e.message);
        assert_eq!(e.as_deref(), Some("Invalid request body."));
        let e = one_action(&json!({"nope": {}}), &known)
            .err()
            .map(|e| e.message);
        assert_eq!(e.as_deref(), Some("Invalid instance action: nope"));
        let e = one_action(&json!({"restart": {}, "resize": {}}), &known)
            .err()
            .map(|e| e.message);
        assert_eq!(
            e.as_deref(),
            Some("Only one action can be specified per request.")
        );
        assert!(one_action(&json!({"restart": 1}), &known).is_err());
        assert!(one_action(&json!([1]), &known).is_err());
    }

    #[test]
    fn uuids_and_cidrs() {
        assert!(is_uuid("6f1f9185-b737-4e25-9000-000000000001"));
        assert!(!is_uuid("6f1f9185"));
        assert!(valid_cidr("10.0.0.0/24"));
        assert!(valid_cidr("10.0.0.1"));
        assert!(!valid_cidr("10.0.0.0/33"));
        assert!(!valid_cidr("x"));
    }

    #[test]
    fn create_bodies() {
        let c = parse_create(
            "p",
            &json!({"instance": {"name": "a", "flavorRef": "2", "volume": {"size": 1}}}),
        );
        assert!(c.is_ok());
        let c = parse_create(
            "p",
            &json!({"instance": {"name": "r", "replica_of": "m", "replica_count": 2}}),
        )
        .ok()
        .map(|c| c.ids.len());
        assert_eq!(c, Some(2));
        assert!(
            parse_create("p", &json!({"instance": {"name": "a", "replica_count": 2}})).is_err()
        );
        assert!(parse_create("p", &json!({"instance": {"name": "!!"}})).is_err());
        assert!(parse_create("p", &json!({"name": "a"})).is_err());
        assert!(parse_create(
            "p",
            &json!({"instance": {"name": "r", "replica_of": "m", "locality": "affinity"}})
        )
        .is_err());
    }
}
