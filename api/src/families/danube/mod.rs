//! Danube Cloud (`/api/vm/…`, `/api/dc/{dc}/vm/…`, `/api/task/…`): endpoints DANUBE-* of
//! ../shared/spec/danube.md, as the `esdc-api` library and its `es` tool use them
//! (../shared/spec/clients.md §4). Translates the wire format into operations on the shared
//! model (`drplane_statemachine::danube`) and back; holds no state of its own.
//!
//! | ID | method and path (also under `/api/dc/{dc}`, with or without the trailing `/`) |
//! |---|---|
//! | DANUBE-REP-LIST | `GET /api/vm/{hostname_or_uuid}/replica/` |
//! | DANUBE-REP-SHOW / -CREATE / -UPDATE / -DELETE | `GET/POST/PUT/DELETE /api/vm/{vm}/replica/{repname}/` |
//! | DANUBE-REP-FAILOVER | `PUT /api/vm/{vm}/replica/{repname}/failover/` |
//! | DANUBE-REP-REINIT | `PUT /api/vm/{vm}/replica/{repname}/reinit/` |
//! | DANUBE-VM-STATUS | `GET /api/vm/{vm}/status/` |
//! | DANUBE-TASK-* | `/api/task/…` (module [`task`]) |
//!
//! Permissions: reading needs a credential of the VM's project (another project's VM is a
//! 404 "VM not found", like a missing one). Danube's "admin only" operations need a role
//! that may change the project (`member` or `admin`); a `reader` gets 403 "You do not have
//! permission to perform this action." (the authentication middleware answers that).
//!
//! DC: `/api/dc/{dc}/…` or a `dc` in the request data (the data wins) selects the virtual
//! datacenter; the one DC is `main` (the caller's project name or id are accepted as
//! aliases); any other is a 404 `Datacenter not found` ([`select_dc`]).
//!
//! Asynchronous calls accept `cb_url`/`cb_method`: the task-status body is sent there when
//! the task ends (module [`callback`], best effort).
//!
//! Every answer carries `es_version`, `es_username`, `es_dc`; task-style answers also
//! `es_task_id`, and answers about a real task `es_task_response: true` (header names with
//! underscores, as upstream sends them and the client reads them).

mod callback;
mod task;

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::danube::{
    self as model, CreateReplica, DanubeCommand, DanubeOutcome, Replica, TaskInfo,
};
use drplane_statemachine::inventory::{Server, WorkloadFilter};
use drplane_statemachine::{Command, CommandError};
use serde_json::{json, Map, Value};
use tracing::Instrument;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode, NativeErrorShape};
use crate::inventory::{blocking, propose_command};
use crate::routes::{read_barrier, AppState, ReadQuery};
use crate::time::format_rfc3339_ms;

/// The server version the `es_version` header announces.
pub const ES_VERSION: &str = concat!("drplane-", env!("CARGO_PKG_VERSION"));
/// The one virtual datacenter.
pub const DEFAULT_DC: &str = "main";

const H_VERSION: HeaderName = HeaderName::from_static("es_version");
const H_USERNAME: HeaderName = HeaderName::from_static("es_username");
const H_DC: HeaderName = HeaderName::from_static("es_dc");
const H_TASK_ID: HeaderName = HeaderName::from_static("es_task_id");
const H_TASK_RESPONSE: HeaderName = HeaderName::from_static("es_task_response");
const H_STREAM: HeaderName = HeaderName::from_static("es_stream");

/// This family's routes (merged into the node's router; authentication already ran).
pub(crate) fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for base in ["/api", "/api/dc/{dc}"] {
        for slash in ["", "/"] {
            r = r
                .route(
                    &format!("{base}/vm/{{vm}}/replica{slash}"),
                    any(replica_list),
                )
                .route(
                    &format!("{base}/vm/{{vm}}/replica/{{rep}}{slash}"),
                    any(replica),
                )
                .route(
                    &format!("{base}/vm/{{vm}}/replica/{{rep}}/failover{slash}"),
                    any(replica_failover),
                )
                .route(
                    &format!("{base}/vm/{{vm}}/replica/{{rep}}/reinit{slash}"),
                    any(replica_reinit),
                )
                .route(&format!("{base}/vm/{{vm}}/status{slash}"), any(vm_status))
                .route(&format!("{base}/task{slash}"), any(task::list));
        }
    }
    for slash in ["", "/"] {
        r = r
            .route(&format!("/api/task/{{id}}{slash}"), any(task::show))
            .route(
                &format!("/api/task/{{id}}/status{slash}"),
                any(task::status),
            )
            .route(&format!("/api/task/{{id}}/state{slash}"), any(task::status))
            .route(&format!("/api/task/{{id}}/done{slash}"), any(task::done))
            .route(
                &format!("/api/task/{{id}}/cancel{slash}"),
                any(task::cancel),
            );
    }
    r.route("/api", any(unknown))
        .route("/api/", any(unknown))
        .route("/api/{*rest}", any(unknown))
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

/// What every answer says about the caller.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) username: String,
    pub(crate) dc: String,
}

impl Ctx {
    fn of(caller: &Caller, dc: Option<&str>) -> Self {
        Ctx {
            username: caller.user_name.clone(),
            dc: dc.unwrap_or(DEFAULT_DC).to_string(),
        }
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub(crate) fn with_headers(mut resp: Response, ctx: &Ctx) -> Response {
    let h = resp.headers_mut();
    h.insert(H_VERSION, HeaderValue::from_static(ES_VERSION));
    h.insert(H_USERNAME, header_value(&ctx.username));
    h.insert(H_DC, header_value(&ctx.dc));
    // Shaped for this family: the request middleware must not rewrite it.
    resp.extensions_mut().insert(NativeErrorShape);
    resp
}

/// `{"detail": …}` with `status`.
pub(crate) fn detail(status: StatusCode, msg: &str, ctx: &Ctx) -> Response {
    with_headers(
        (status, Json(json!({ "detail": msg }))).into_response(),
        ctx,
    )
}

/// `{"task_id", "status", "result"}`; `real`: about a real task (`es_task_response`).
pub(crate) fn task_style(
    status: StatusCode,
    task_id: &str,
    state: &str,
    result: Value,
    real: bool,
    ctx: &Ctx,
) -> Response {
    let body = json!({"task_id": task_id, "status": state, "result": result});
    let mut resp = with_headers((status, Json(body)).into_response(), ctx);
    resp.headers_mut().insert(H_TASK_ID, header_value(task_id));
    if real {
        resp.headers_mut()
            .insert(H_TASK_RESPONSE, HeaderValue::from_static("true"));
    }
    resp
}

/// A synchronous success (200 unless said otherwise) with a dummy task id.
fn sync_ok(status: StatusCode, result: Value, caller: &Caller, ctx: &Ctx) -> Response {
    task_style(
        status,
        &task::dummy_id(caller),
        "SUCCESS",
        result,
        false,
        ctx,
    )
}

/// A validation failure: 400 task-style FAILURE with per-field lists.
fn field_errors(errors: BTreeMap<String, Vec<String>>, caller: &Caller, ctx: &Ctx) -> Response {
    let result: Map<String, Value> = errors.into_iter().map(|(k, v)| (k, json!(v))).collect();
    task_style(
        StatusCode::BAD_REQUEST,
        &task::dummy_id(caller),
        "FAILURE",
        Value::Object(result),
        false,
        ctx,
    )
}

fn field_error(field: &str, msg: &str, caller: &Caller, ctx: &Ctx) -> Response {
    field_errors(
        BTreeMap::from([(field.to_string(), vec![msg.to_string()])]),
        caller,
        ctx,
    )
}

/// A cluster or store error in Danube's shape (`Retry-After` kept).
pub(crate) fn api_error(e: ApiError, ctx: &Ctx) -> Response {
    if e.status.is_server_error() {
        if e.code == ErrorCode::Internal {
            tracing::error!(detail = %e.message, "internal error");
        } else {
            tracing::warn!(code = %e.code, reason = %e.message, "request failed");
        }
    }
    let msg = match e.code {
        ErrorCode::Internal => {
            "Internal server error; the server log has the cause under this response's X-Request-Id"
                .to_string()
        }
        _ => e.message.clone(),
    };
    let mut resp = detail(e.status, &msg, ctx);
    if let Some(secs) = e.retry_after_secs {
        resp.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn method_not_allowed(method: &Method, ctx: &Ctx) -> Response {
    detail(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("Method \"{method}\" not allowed."),
        ctx,
    )
}

/// A refusal of the state machine in Danube's shape (spec §1.7).
fn refusal(e: CommandError, caller: &Caller, ctx: &Ctx) -> Response {
    match e {
        CommandError::NotFound { kind, .. } if kind == model::KIND_VM => {
            detail(StatusCode::NOT_FOUND, model::ERR_VM_NOT_FOUND, ctx)
        }
        CommandError::NotFound { kind, .. } if kind == model::KIND_REPLICA => {
            detail(StatusCode::NOT_FOUND, model::ERR_SLAVE_NOT_FOUND, ctx)
        }
        CommandError::NotFound { kind, id } if kind == "host" => field_error(
            "node",
            &format!("Object with hostname={id} does not exist."),
            caller,
            ctx,
        ),
        CommandError::NotFound { kind, id } => detail(
            StatusCode::NOT_FOUND,
            &format!("{kind} '{id}' not found"),
            ctx,
        ),
        CommandError::AlreadyExists { kind, .. } if kind == model::KIND_REPLICA => {
            detail(StatusCode::NOT_ACCEPTABLE, model::ERR_SLAVE_EXISTS, ctx)
        }
        CommandError::AlreadyExists { kind, id } => detail(
            StatusCode::CONFLICT,
            &format!("{kind} '{id}' already exists"),
            ctx,
        ),
        CommandError::Invalid { field, reason } => field_error(&field, &reason, caller, ctx),
        CommandError::Conflict(m) => {
            let status = match m.as_str() {
                model::ERR_PENDING_TASKS => StatusCode::CONFLICT,
                model::ERR_NODE_NOT_OPERATIONAL
                | model::ERR_VM_NOT_STOPPED_OR_RUNNING
                | model::ERR_VM_NOT_OPERATIONAL => StatusCode::LOCKED,
                model::ERR_REINIT_REQUIRED
                | model::ERR_REINIT_NOT_REQUIRED
                | model::ERR_NOT_ENOUGH_RESOURCES => StatusCode::PRECONDITION_REQUIRED,
                _ if m.starts_with("insufficient") => {
                    return field_error("node", &m, caller, ctx);
                }
                _ => StatusCode::CONFLICT,
            };
            detail(status, &m, ctx)
        }
    }
}

async fn unknown(method: Method, caller: Caller) -> Response {
    let _ = method;
    detail(StatusCode::NOT_FOUND, "Not found.", &Ctx::of(&caller, None))
}

// ---------------------------------------------------------------------------------------
// Path parameters, DC, VM lookup
// ---------------------------------------------------------------------------------------

/// `hostname_or_uuid` and `repname` in URLs: `[A-Za-z0-9._-]+` (else upstream has no route).
fn url_param_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// A DC name the caller may use: the one DC, or the caller's project by name or id.
fn dc_ok(dc: &str, caller: &Caller) -> bool {
    dc == DEFAULT_DC || dc == caller.project_name || dc == caller.project_id
}

/// Upstream's `ObjectNotFound(model=Dc)`.
pub(crate) const ERR_DC_NOT_FOUND: &str = "Datacenter not found";
/// Danube's 403 (spec §1.7).
pub(crate) const ERR_PERMISSION_DENIED: &str = "You do not have permission to perform this action.";

/// The DC a DC-bound call works in (spec §1.1, upstream `request_data`): a `dc` in the
/// request data wins over the `/api/dc/{dc}/` path segment; neither means the caller's
/// current DC (`main`). An empty or null `dc` is no choice. An unknown DC, or one the
/// caller may not use, is refused with Danube's 404 `Datacenter not found`.
pub(crate) fn select_dc(
    caller: &Caller,
    path_dc: Option<&str>,
    data: &Map<String, Value>,
) -> Result<Ctx, Box<Response>> {
    let data_dc = match data.get("dc") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let chosen = data_dc.as_deref().or(path_dc);
    match chosen {
        Some(dc) if !dc_ok(dc, caller) => {
            tracing::info!(dc = %dc, caller = %caller.describe(), "danube: unknown datacenter");
            // The caller's current DC names the answer, not the refused one.
            Err(Box::new(detail(
                StatusCode::NOT_FOUND,
                ERR_DC_NOT_FOUND,
                &Ctx::of(caller, None),
            )))
        }
        _ => Ok(Ctx::of(caller, chosen)),
    }
}

fn path_parts(p: &BTreeMap<String, String>) -> (Option<&str>, &str, Option<&str>) {
    (
        p.get("dc").map(String::as_str),
        p.get("vm").map(String::as_str).unwrap_or(""),
        p.get("rep").map(String::as_str),
    )
}

/// Looks a VM up by hostname or uuid among what the caller may see (its project first).
async fn find_vm(st: &AppState, caller: &Caller, key: &str) -> Result<Option<Server>, ApiError> {
    let store = st.cp.store().clone();
    let project = caller.project_id.clone();
    let admin = caller.is_admin();
    let key = key.to_string();
    blocking("danube vm lookup", move || {
        if let Some(s) = store.get_server(&key)? {
            if s.project == project || admin {
                return Ok(Some(s));
            }
        }
        let own = store.list_servers(&WorkloadFilter {
            project: Some(project.clone()),
            host: None,
        })?;
        if let Some(s) = own.into_iter().find(|s| s.name == key) {
            return Ok(Some(s));
        }
        if admin {
            let all = store.list_servers(&WorkloadFilter::default())?;
            return Ok(all.into_iter().find(|s| s.name == key));
        }
        Ok(None)
    })
    .await
}

/// Common start of a VM-bound call: DC (path or data), path patterns, a fresh read, the VM.
async fn vm_call(
    st: &AppState,
    caller: &Caller,
    params: &BTreeMap<String, String>,
    data: &Map<String, Value>,
) -> Result<(Ctx, Server), Response> {
    let (dc, vm, rep) = path_parts(params);
    let ctx = select_dc(caller, dc, data).map_err(|r| *r)?;
    if !url_param_ok(vm) || rep.is_some_and(|r| !url_param_ok(r)) {
        return Err(detail(StatusCode::NOT_FOUND, "Not found.", &ctx));
    }
    if let Err(e) = read_barrier(st, ReadQuery::default()).await {
        return Err(api_error(e, &ctx));
    }
    match find_vm(st, caller, vm).await {
        Ok(Some(s)) => Ok((ctx, s)),
        Ok(None) => Err(detail(StatusCode::NOT_FOUND, model::ERR_VM_NOT_FOUND, &ctx)),
        Err(e) => Err(api_error(e, &ctx)),
    }
}

// ---------------------------------------------------------------------------------------
// Request data
// ---------------------------------------------------------------------------------------

/// The request's data: the query string for GET, the JSON body otherwise (`{}` if empty).
fn request_data(
    method: &Method,
    query: Option<&str>,
    body: &[u8],
) -> Result<Map<String, Value>, String> {
    if *method == Method::GET || *method == Method::HEAD {
        let mut m = Map::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(k), Some(v)) = (pct_decode(k), pct_decode(v)) else {
                return Err("Malformed query string.".into());
            };
            m.insert(k, Value::String(v));
        }
        return Ok(m);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("JSON parse error - Expected a JSON object.".into()),
        Err(e) => Err(format!("JSON parse error - {e}")),
    }
}

fn pct_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Field parsing with Django REST framework's messages; errors collect per field.
#[derive(Default)]
struct Fields {
    errors: BTreeMap<String, Vec<String>>,
}

impl Fields {
    fn err(&mut self, field: &str, msg: impl Into<String>) {
        self.errors
            .entry(field.to_string())
            .or_default()
            .push(msg.into());
    }

    fn boolean(&mut self, data: &Map<String, Value>, field: &str) -> Option<bool> {
        let v = data.get(field)?;
        let b = match v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) if n.as_u64() == Some(1) => Some(true),
            Value::Number(n) if n.as_u64() == Some(0) => Some(false),
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(true),
                "false" | "0" | "no" | "off" => Some(false),
                _ => None,
            },
            _ => None,
        };
        if b.is_none() {
            if v.is_null() {
                self.err(field, "This field may not be null.");
            } else {
                self.err(field, "Must be a valid boolean.");
            }
        }
        b
    }

    /// An integer in `[min, max]`; `Some(None)` for an allowed null.
    fn integer(
        &mut self,
        data: &Map<String, Value>,
        field: &str,
        min: u64,
        max: u64,
        nullable: bool,
    ) -> Option<Option<u64>> {
        let v = data.get(field)?;
        let n: Option<i128> = match v {
            Value::Null if nullable => return Some(None),
            Value::Null => {
                self.err(field, "This field may not be null.");
                return None;
            }
            Value::Number(n) => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 1e18)
                        .map(|f| f as i128)
                }),
            Value::String(s) => s.trim().parse::<i128>().ok(),
            _ => None,
        };
        let Some(n) = n else {
            self.err(field, "A valid integer is required.");
            return None;
        };
        if n < i128::from(min) {
            self.err(
                field,
                format!("Ensure this value is greater than or equal to {min}."),
            );
            return None;
        }
        if n > i128::from(max) {
            self.err(
                field,
                format!("Ensure this value is less than or equal to {max}."),
            );
            return None;
        }
        Some(Some(n as u64))
    }

    fn string(
        &mut self,
        data: &Map<String, Value>,
        field: &str,
        max: usize,
    ) -> Option<Option<String>> {
        match data.get(field)? {
            Value::Null => Some(None),
            Value::String(s) if s.is_empty() => Some(None),
            Value::String(s) if s.len() > max => {
                self.err(
                    field,
                    format!("Ensure this field has no more than {max} characters."),
                );
                None
            }
            Value::String(s) => Some(Some(s.clone())),
            Value::Number(n) => Some(Some(n.to_string())),
            _ => {
                self.err(field, "Not a valid string.");
                None
            }
        }
    }
}

fn task_info(
    caller: &Caller,
    server: &Server,
    job_id: &str,
    data: &Map<String, Value>,
) -> TaskInfo {
    let mut params = Value::Object(data.clone()).to_string();
    if params.len() > model::PARAMS_MAX {
        params = "{}".into();
    }
    TaskInfo {
        job_id: job_id.to_string(),
        user_id: caller.user_id.clone(),
        user_name: caller.user_name.clone(),
        hostname: server.name.clone(),
        params_json: params,
    }
}

// ---------------------------------------------------------------------------------------
// Views of records
// ---------------------------------------------------------------------------------------

/// ISO 8601 UTC to the second: `2018-01-01T10:00:00Z`.
pub(crate) fn iso(ms: u64) -> String {
    let s = format_rfc3339_ms(ms);
    match s.get(..19) {
        Some(head) => format!("{head}Z"),
        None => s,
    }
}

fn node_status(st: &AppState, node: &str) -> &'static str {
    match st.cp.store().get_host(node) {
        Ok(Some(h)) if h.is_online() => "online",
        Ok(Some(_)) => "unreachable",
        _ => "unreachable",
    }
}

/// The replica object of §2.2.
fn replica_view(st: &AppState, server: &Server, r: &Replica) -> Value {
    let last_sync = st.cp.store().danube_last_sync(r).ok().flatten();
    let disk_zpools: Map<String, Value> = r
        .disk_zpools
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
        .collect();
    json!({
        "hostname": server.name,
        "repname": r.repname,
        "node": r.node,
        "root_zpool": r.root_zpool,
        "disk_zpools": disk_zpools,
        "reserve_resources": r.reserve_resources,
        "sleep_time": r.sleep_time,
        "enabled": r.enabled,
        "bwlimit": r.bwlimit,
        "last_sync": last_sync.map(iso),
        "reinit_required": r.reinit_required,
        "node_status": node_status(st, &r.node),
        "created": iso(r.created_ms),
    })
}

// ---------------------------------------------------------------------------------------
// DANUBE-REP-LIST
// ---------------------------------------------------------------------------------------

async fn replica_list(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    Path(params): Path<BTreeMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Response {
    let path_ctx = Ctx::of(&caller, params.get("dc").map(String::as_str));
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed(&method, &path_ctx);
    }
    let data = match request_data(&method, query.as_deref(), b"") {
        Ok(d) => d,
        Err(m) => return detail(StatusCode::BAD_REQUEST, &m, &path_ctx),
    };
    let (ctx, server) = match vm_call(&st, &caller, &params, &data).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut f = Fields::default();
    let full = f.boolean(&data, "full").unwrap_or(false);
    if !f.errors.is_empty() {
        return field_errors(f.errors, &caller, &ctx);
    }
    let store = st.cp.store().clone();
    let vm_id = server.id.clone();
    let reps = match blocking("danube replicas", move || store.danube_replicas(&vm_id)).await {
        Ok(r) => r,
        Err(e) => return api_error(e, &ctx),
    };
    let result: Vec<Value> = if full {
        reps.iter().map(|r| replica_view(&st, &server, r)).collect()
    } else {
        reps.iter()
            .map(|r| Value::String(r.repname.clone()))
            .collect()
    };
    sync_ok(StatusCode::OK, Value::Array(result), &caller, &ctx)
}

// ---------------------------------------------------------------------------------------
// DANUBE-REP-SHOW / CREATE / UPDATE / DELETE
// ---------------------------------------------------------------------------------------

async fn replica(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path(params): Path<BTreeMap<String, String>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let path_ctx = Ctx::of(&caller, params.get("dc").map(String::as_str));
    let data = match request_data(&method, query.as_deref(), &body) {
        Ok(d) => d,
        Err(m) => return detail(StatusCode::BAD_REQUEST, &m, &path_ctx),
    };
    let (ctx, server) = match vm_call(&st, &caller, &params, &data).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let repname = params.get("rep").cloned().unwrap_or_default();
    match method {
        Method::GET | Method::HEAD => {
            let store = st.cp.store().clone();
            let vm_id = server.id.clone();
            let rep = repname.clone();
            match blocking("danube replica", move || store.danube_replica(&vm_id, &rep)).await {
                Ok(Some(r)) => sync_ok(
                    StatusCode::OK,
                    replica_view(&st, &server, &r),
                    &caller,
                    &ctx,
                ),
                Ok(None) => detail(StatusCode::NOT_FOUND, model::ERR_SLAVE_NOT_FOUND, &ctx),
                Err(e) => api_error(e, &ctx),
            }
        }
        Method::POST => create(&st, &caller, &ctx, &headers, &server, &repname, &data).await,
        Method::PUT => update(&st, &caller, &ctx, &headers, &server, &repname, &data).await,
        Method::DELETE => {
            let job_id = task::new_id(&caller);
            let cmd = DanubeCommand::DeleteReplica {
                task: task_info(&caller, &server, &job_id, &data),
                project: server.project.clone(),
                vm_id: server.id.clone(),
                repname: repname.clone(),
            };
            run_task(&st, &caller, &ctx, &headers, cmd, &data).await
        }
        other => method_not_allowed(&other, &ctx),
    }
}

async fn create(
    st: &AppState,
    caller: &Caller,
    ctx: &Ctx,
    headers: &HeaderMap,
    server: &Server,
    repname: &str,
    data: &Map<String, Value>,
) -> Response {
    let mut f = Fields::default();
    if let Err(CommandError::Invalid { reason, .. }) = model::validate_repname(repname) {
        f.err("repname", reason);
    }
    let node = match f.string(data, "node", 255) {
        Some(Some(n)) => Some(n),
        Some(None) | None => {
            if !f.errors.contains_key("node") {
                f.err("node", "This field is required.");
            }
            None
        }
    };
    let root_zpool = f.string(data, "root_zpool", model::ZPOOL_MAX).flatten();
    let mut disk_zpools = BTreeMap::new();
    match data.get("disk_zpools") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let n = k.trim().parse::<u32>().ok().filter(|n| *n >= 1);
                match (n, v) {
                    (Some(n), Value::String(z)) if !z.is_empty() && z.len() <= model::ZPOOL_MAX => {
                        disk_zpools.insert(n, z.clone());
                    }
                    (None, _) => f.err("disk_zpools", format!("Invalid disk_id \"{k}\".")),
                    _ => f.err(
                        "disk_zpools",
                        format!(
                            "Invalid zpool for disk {k}: a name of 1 to {} characters.",
                            model::ZPOOL_MAX
                        ),
                    ),
                }
            }
        }
        Some(_) => f.err("disk_zpools", "Expected a dictionary of items."),
    }
    let reserve_resources = f.boolean(data, "reserve_resources").unwrap_or(true);
    let sleep_time = f
        .integer(
            data,
            "sleep_time",
            0,
            u64::from(model::SLEEP_TIME_MAX),
            false,
        )
        .flatten()
        .unwrap_or(u64::from(model::SLEEP_TIME_DEFAULT));
    let enabled = f.boolean(data, "enabled").unwrap_or(true);
    let bwlimit = f
        .integer(data, "bwlimit", 0, model::BWLIMIT_MAX, true)
        .flatten();
    if let Some(z) = &root_zpool {
        if let Err(CommandError::Invalid { reason, .. }) = model::validate_zpool("root_zpool", z) {
            f.err("root_zpool", reason);
        }
    }
    if let Some(n) = &node {
        if drplane_statemachine::inventory::validate_host_name("node", n).is_err() {
            f.err("node", format!("Object with hostname={n} does not exist."));
        }
    }
    let (Some(node), true) = (node, f.errors.is_empty()) else {
        return field_errors(f.errors, caller, ctx);
    };
    let job_id = task::new_id(caller);
    let cmd = DanubeCommand::CreateReplica(Box::new(CreateReplica {
        task: task_info(caller, server, &job_id, data),
        project: server.project.clone(),
        vm_id: server.id.clone(),
        repname: repname.to_string(),
        node,
        root_zpool,
        disk_zpools,
        reserve_resources,
        sleep_time: sleep_time as u32,
        enabled,
        bwlimit,
    }));
    run_task(st, caller, ctx, headers, cmd, data).await
}

async fn update(
    st: &AppState,
    caller: &Caller,
    ctx: &Ctx,
    headers: &HeaderMap,
    server: &Server,
    repname: &str,
    data: &Map<String, Value>,
) -> Response {
    let mut f = Fields::default();
    let reserve_resources = f.boolean(data, "reserve_resources");
    let sleep_time = f
        .integer(
            data,
            "sleep_time",
            0,
            u64::from(model::SLEEP_TIME_MAX),
            false,
        )
        .flatten()
        .map(|v| v as u32);
    let enabled = f.boolean(data, "enabled");
    let bwlimit = f.integer(data, "bwlimit", 0, model::BWLIMIT_MAX, true);
    if !f.errors.is_empty() {
        return field_errors(f.errors, caller, ctx);
    }
    if model::validate_repname(repname).is_err() {
        return detail(StatusCode::NOT_FOUND, model::ERR_SLAVE_NOT_FOUND, ctx);
    }
    let job_id = task::new_id(caller);
    let cmd = DanubeCommand::UpdateReplica {
        task: task_info(caller, server, &job_id, data),
        project: server.project.clone(),
        vm_id: server.id.clone(),
        repname: repname.to_string(),
        reserve_resources,
        sleep_time,
        enabled,
        bwlimit,
    };
    run_task(st, caller, ctx, headers, cmd, data).await
}

// ---------------------------------------------------------------------------------------
// DANUBE-REP-FAILOVER, DANUBE-REP-REINIT
// ---------------------------------------------------------------------------------------

async fn replica_failover(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path(params): Path<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let path_ctx = Ctx::of(&caller, params.get("dc").map(String::as_str));
    if method != Method::PUT {
        return method_not_allowed(&method, &path_ctx);
    }
    let data = match request_data(&method, None, &body) {
        Ok(d) => d,
        Err(m) => return detail(StatusCode::BAD_REQUEST, &m, &path_ctx),
    };
    let (ctx, server) = match vm_call(&st, &caller, &params, &data).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut f = Fields::default();
    let force = f.boolean(&data, "force").unwrap_or(false);
    if !f.errors.is_empty() {
        return field_errors(f.errors, &caller, &ctx);
    }
    let repname = params.get("rep").cloned().unwrap_or_default();
    if model::validate_repname(&repname).is_err() {
        return detail(StatusCode::NOT_FOUND, model::ERR_SLAVE_NOT_FOUND, &ctx);
    }
    let job_id = task::new_id(&caller);
    let cmd = DanubeCommand::FailoverReplica {
        task: task_info(&caller, &server, &job_id, &data),
        project: server.project.clone(),
        vm_id: server.id.clone(),
        repname,
        force,
    };
    run_task(&st, &caller, &ctx, &headers, cmd, &data).await
}

async fn replica_reinit(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path(params): Path<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let path_ctx = Ctx::of(&caller, params.get("dc").map(String::as_str));
    if method != Method::PUT {
        return method_not_allowed(&method, &path_ctx);
    }
    let data = match request_data(&method, None, &body) {
        Ok(d) => d,
        Err(m) => return detail(StatusCode::BAD_REQUEST, &m, &path_ctx),
    };
    let (ctx, server) = match vm_call(&st, &caller, &params, &data).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let repname = params.get("rep").cloned().unwrap_or_default();
    if model::validate_repname(&repname).is_err() {
        return detail(StatusCode::NOT_FOUND, model::ERR_SLAVE_NOT_FOUND, &ctx);
    }
    let job_id = task::new_id(&caller);
    let cmd = DanubeCommand::ReinitReplica {
        task: task_info(&caller, &server, &job_id, &data),
        project: server.project.clone(),
        vm_id: server.id.clone(),
        repname,
    };
    run_task(&st, &caller, &ctx, &headers, cmd, &data).await
}

/// Proposes a command that starts a task; answers 201 PENDING (streamed with ES-STREAM),
/// 205 for an update without a task, or the refusal.
async fn run_task(
    st: &AppState,
    caller: &Caller,
    ctx: &Ctx,
    headers: &HeaderMap,
    cmd: DanubeCommand,
    data: &Map<String, Value>,
) -> Response {
    let kind = cmd.kind();
    let (vm, rep) = match &cmd {
        DanubeCommand::CreateReplica(c) => (c.vm_id.clone(), c.repname.clone()),
        DanubeCommand::UpdateReplica { vm_id, repname, .. }
        | DanubeCommand::DeleteReplica { vm_id, repname, .. }
        | DanubeCommand::FailoverReplica { vm_id, repname, .. }
        | DanubeCommand::ReinitReplica { vm_id, repname, .. } => (vm_id.clone(), repname.clone()),
    };
    let span = tracing::info_span!("danube_task", kind, project = %caller.project_id, vm = %vm, repname = %rep);
    async move {
    let result = propose_command(st, headers, Command::Danube(cmd)).await;
    match result {
        Err(e) => api_error(e, ctx),
        Ok(Err(e)) => {
            tracing::info!(refusal = %e, "danube task refused");
            refusal(e, caller, ctx)
        }
        Ok(Ok(Outcome::Danube(o))) => match *o {
            DanubeOutcome::Task(job) => {
                tracing::info!(job_id = %job.id, status = job.status.as_str(), "danube task started");
                callback::watch(st.cp.store(), &job.id, data);
                task::pending_answer(st, headers, &job.id, ctx)
            }
            DanubeOutcome::Replica(r) => {
                let server = match find_vm(st, caller, &r.vm_id).await {
                    Ok(Some(s)) => s,
                    Ok(None) => return detail(StatusCode::NOT_FOUND, model::ERR_VM_NOT_FOUND, ctx),
                    Err(e) => return api_error(e, ctx),
                };
                sync_ok(
                    StatusCode::RESET_CONTENT,
                    replica_view(st, &server, &r),
                    caller,
                    ctx,
                )
            }
        },
        Ok(Ok(other)) => api_error(
            ApiError::internal(format!("{kind} produced {other:?}")),
            ctx,
        ),
    }
    }
    .instrument(span)
    .await
}

// ---------------------------------------------------------------------------------------
// DANUBE-VM-STATUS
// ---------------------------------------------------------------------------------------

async fn vm_status(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    Path(params): Path<BTreeMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Response {
    let path_ctx = Ctx::of(&caller, params.get("dc").map(String::as_str));
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed(&method, &path_ctx);
    }
    let data = match request_data(&method, query.as_deref(), b"") {
        Ok(d) => d,
        Err(m) => return detail(StatusCode::BAD_REQUEST, &m, &path_ctx),
    };
    let (ctx, server) = match vm_call(&st, &caller, &params, &data).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let store = st.cp.store().clone();
    let vm_id = server.id.clone();
    let read = blocking("danube vm status", move || {
        let overlay = store.danube_vm_state(&vm_id)?;
        let pending = store.danube_pending_tasks(Some(&vm_id))?;
        let mut tasks = Vec::new();
        for (_, id) in pending {
            if let Some(t) = store.danube_task(&id)? {
                tasks.push(t);
            }
        }
        Ok((overlay, tasks))
    })
    .await;
    let (overlay, tasks) = match read {
        Ok(x) => x,
        Err(e) => return api_error(e, &ctx),
    };
    let (node, base, _) = model::vm_location(&server, overlay.as_ref());
    // A VM locked by a running create or failover shows its status with a trailing '-'.
    let locked = tasks
        .iter()
        .any(|t| t.view == "vm_replica_failover" || (t.view == "vm_replica" && t.method == "POST"));
    let status = if locked && (base == "running" || base == "stopped") {
        format!("{base}-")
    } else {
        base.clone()
    };
    let status_change = overlay
        .as_ref()
        .map_or(server.updated_at_ms, |o| o.status_change_ms);
    let uptime = if base == "running" {
        crate::auth::now_ms().saturating_sub(status_change) / 1000
    } else {
        0
    };
    let tasks: Map<String, Value> = tasks
        .iter()
        .map(|t| {
            (
                t.id.clone(),
                json!({"view": t.view, "method": t.method, "hostname": t.hostname, "repname": t.repname}),
            )
        })
        .collect();
    let result = json!({
        "hostname": server.name,
        "uuid": server.id,
        "alias": server.name,
        "status": status,
        "status_change": iso(status_change),
        "node": node,
        "node_status": node_status(&st, &node),
        "tasks": tasks,
        "uptime": uptime,
    });
    sync_ok(StatusCode::OK, result, &caller, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_from_query_and_body() {
        let d = request_data(&Method::GET, Some("full=True&x=a%20b"), b"").expect("query");
        assert_eq!(d.get("full"), Some(&json!("True")));
        assert_eq!(d.get("x"), Some(&json!("a b")));
        assert!(request_data(&Method::PUT, None, b"")
            .expect("empty")
            .is_empty());
        assert!(request_data(&Method::PUT, None, b"[1]").is_err());
        assert!(request_data(&Method::PUT, None, b"{nope").is_err());
    }

    #[test]
    fn fields_follow_drf_messages() {
        let data: Map<String, Value> = serde_json::from_str(
            r#"{"a": "True", "b": "maybe", "n": "12", "m": -1, "big": 99999999999, "z": null}"#,
        )
        .expect("json");
        let mut f = Fields::default();
        assert_eq!(f.boolean(&data, "a"), Some(true));
        assert_eq!(f.boolean(&data, "b"), None);
        assert_eq!(f.integer(&data, "n", 0, 100, false), Some(Some(12)));
        assert_eq!(f.integer(&data, "m", 0, 100, false), None);
        assert_eq!(f.integer(&data, "big", 0, 2_147_483_647, true), None);
        assert_eq!(f.integer(&data, "z", 0, 10, true), Some(None));
        assert_eq!(f.errors["b"], vec!["Must be a valid boolean."]);
        assert!(f.errors["m"][0].contains("greater than or equal to 0"));
        assert!(f.errors["big"][0].contains("less than or equal to 2147483647"));
    }

    #[test]
    fn url_params_and_iso() {
        assert!(url_param_ok("web-1.example_2"));
        assert!(!url_param_ok("a b"));
        assert!(!url_param_ok(""));
        assert_eq!(iso(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}
