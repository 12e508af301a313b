//! Danube tasks (DANUBE-TASK-STATUS, -DONE, -LIST, -DETAIL, -CANCEL) and the `ES-STREAM`
//! wait of the `es` client (spec §1.6, clients.md §4.4).
//!
//! A Danube task is a job: the same id, seen by every family. Status mapping:
//! INIT → PENDING, RUNNING → STARTED (both HTTP 201), SUCCESS → SUCCESS (200),
//! FAIL → FAILURE (400), FAIL by cancellation → REVOKED (410).
//!
//! Task ids have Danube's format `<user><tt><owner><tg><dc>-<8 hex>-<4 hex>-<4 hex>-<4 hex>`:
//! `1e1d1-…` for a real (exec) task, `1d1d1-…` for the dummy id of a synchronous answer.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::danube::{DanubeTask, TaskResult};
use drplane_statemachine::jobs::{Job, JobStatus, JobsCommand, ERROR_CANCELLED};
use drplane_statemachine::{Command, CommandError};
use serde_json::{json, Map, Value};

use super::{api_error, detail, iso, request_data, task_style, with_headers, Ctx};
use super::{H_STREAM, H_TASK_ID, H_TASK_RESPONSE};
use crate::auth::Caller;
use crate::inventory::{blocking, propose_command};
use crate::routes::{read_barrier, AppState, ReadQuery};

/// `API_SYNC_TIMEOUT` upstream: how long an `ES-STREAM` answer waits for its task.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often the streaming wait looks at the task.
const STREAM_CHECK: Duration = Duration::from_millis(200);

const NOT_EXIST_ANYMORE: &str = "Task does not exist (anymore)";
const NOT_EXIST: &str = "Task does not exist";
const CANNOT_CANCEL: &str = "Task cannot be canceled";

fn hex_id(tt: char) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "1{tt}1d1-{}-{}-{}-{}",
        &u[0..8],
        &u[8..12],
        &u[12..16],
        &u[16..20]
    )
}

/// A new real task id.
pub(crate) fn new_id(_caller: &Caller) -> String {
    hex_id('e')
}

/// The dummy id of a synchronous answer (it names no task).
pub(crate) fn dummy_id(_caller: &Caller) -> String {
    hex_id('d')
}

fn is_dummy(id: &str) -> bool {
    id.as_bytes().get(1) == Some(&b'd')
}

/// A task id in a URL: `[A-Za-z0-9-]+`.
fn task_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Danube's name of a job's state.
pub(crate) fn danube_state(job: &Job) -> &'static str {
    match job.status {
        JobStatus::Init => "PENDING",
        JobStatus::Running => "STARTED",
        JobStatus::Success => "SUCCESS",
        JobStatus::Fail if job.error_code.as_deref() == Some(ERROR_CANCELLED) => "REVOKED",
        JobStatus::Fail => "FAILURE",
    }
}

fn http_status(state: &str) -> StatusCode {
    match state {
        "SUCCESS" => StatusCode::OK,
        "FAILURE" => StatusCode::BAD_REQUEST,
        "REVOKED" => StatusCode::GONE,
        _ => StatusCode::CREATED,
    }
}

fn result_view(r: &TaskResult, hostname: &str) -> Value {
    let mut m = Map::new();
    m.insert("message".into(), json!(r.message));
    m.insert("returncode".into(), json!(r.returncode));
    m.insert("detail".into(), json!(r.detail));
    if let Some(s) = &r.replica {
        m.insert("hostname".into(), json!(hostname));
        m.insert("repname".into(), json!(s.repname));
        m.insert("node".into(), json!(s.node));
        m.insert("reserve_resources".into(), json!(s.reserve_resources));
        m.insert("sleep_time".into(), json!(s.sleep_time));
        m.insert("enabled".into(), json!(s.enabled));
        m.insert("reinit_required".into(), json!(s.reinit_required));
        m.insert("last_sync".into(), json!(s.last_sync_ms.map(iso)));
    }
    Value::Object(m)
}

/// The task-status body (`status`, `result`) of a job and its Danube record.
pub(super) fn status_body(job: &Job, meta: Option<&DanubeTask>) -> (&'static str, Value) {
    let state = danube_state(job);
    let result = match state {
        "PENDING" | "STARTED" => Value::Null,
        _ => match meta.and_then(|m| m.result.as_ref().map(|r| (r, m))) {
            Some((r, m)) => result_view(r, &m.hostname),
            None => match job.status {
                JobStatus::Success => {
                    json!({"message": "Task finished", "returncode": 0, "detail": ""})
                }
                _ => json!({
                    "message": "Got bad return code (1)",
                    "returncode": 1,
                    "detail": job.fail_reason.clone().unwrap_or_default(),
                }),
            },
        },
    };
    (state, result)
}

/// The task-status answer for the current state of a job.
fn status_answer(job: &Job, meta: Option<&DanubeTask>, ctx: &Ctx) -> Response {
    let (state, result) = status_body(job, meta);
    task_style(http_status(state), &job.id, state, result, true, ctx)
}

// ---------------------------------------------------------------------------------------
// The answer of a call that started a task (ES-STREAM)
// ---------------------------------------------------------------------------------------

/// The keep-alive period after `elapsed` (upstream's schedule).
fn poll_period(elapsed: Duration) -> Duration {
    let s = elapsed.as_secs();
    Duration::from_secs(match s {
        0..=4 => 1,
        5..=29 => 3,
        30..=59 => 6,
        60..=1199 => 12,
        _ => 30,
    })
}

/// 201 `{"task_id", "status": "PENDING", "result": null}`; with an `ES-STREAM` header a
/// streamed 201 instead: spaces while the task runs, then (for `ES-STREAM: es`) the final
/// status line and the task-status JSON.
pub(crate) fn pending_answer(
    st: &AppState,
    headers: &HeaderMap,
    job_id: &str,
    ctx: &Ctx,
) -> Response {
    let stream_mode = headers
        .get("es-stream")
        .map(|v| v.to_str().map(str::trim).unwrap_or("") == "es");
    let pending = json!({"task_id": job_id, "status": "PENDING", "result": null});
    let Some(with_status_line) = stream_mode else {
        return task_style(
            StatusCode::CREATED,
            job_id,
            "PENDING",
            Value::Null,
            true,
            ctx,
        );
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(8);
    let store = st.cp.store().clone();
    let id = job_id.to_string();
    tokio::spawn(async move {
        let start = Instant::now();
        let mut next_space = start + poll_period(Duration::ZERO);
        loop {
            let s = store.clone();
            let i = id.clone();
            let read = tokio::task::spawn_blocking(move || {
                Ok::<_, drplane_statemachine::StoreError>((s.get_job(&i)?, s.danube_task(&i)?))
            })
            .await;
            let (job, meta) = match read {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::warn!(job_id = %id, error = %e, "es-stream: cannot read the task");
                    (None, None)
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "es-stream: read task failed");
                    (None, None)
                }
            };
            let finished = job.as_ref().filter(|j| j.status.is_terminal());
            if let Some(j) = finished {
                let (state, result) = status_body(j, meta.as_ref());
                let body = json!({"task_id": j.id, "status": state, "result": result});
                let mut out = String::new();
                if with_status_line {
                    out.push_str(&format!("{}\n", http_status(state).as_u16()));
                }
                out.push_str(&body.to_string());
                let _ = tx.send(Ok(Bytes::from(out))).await;
                return;
            }
            if job.is_none() && start.elapsed() > Duration::from_secs(30) {
                // Purged or never applied here: answer what we know.
                let mut out = String::new();
                if with_status_line {
                    out.push_str("404\n");
                }
                out.push_str(&json!({"detail": NOT_EXIST_ANYMORE}).to_string());
                let _ = tx.send(Ok(Bytes::from(out))).await;
                return;
            }
            if start.elapsed() >= SYNC_TIMEOUT {
                let mut out = String::new();
                if with_status_line {
                    out.push_str("201\n");
                }
                out.push_str(&pending.to_string());
                let _ = tx.send(Ok(Bytes::from(out))).await;
                return;
            }
            let now = Instant::now();
            if now >= next_space {
                if tx.send(Ok(Bytes::from_static(b" "))).await.is_err() {
                    tracing::debug!(job_id = %id, "es-stream: the client went away");
                    return;
                }
                next_space = now + poll_period(start.elapsed());
            }
            tokio::time::sleep(STREAM_CHECK).await;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = with_headers((StatusCode::CREATED, body).into_response(), ctx);
    let h = resp.headers_mut();
    h.insert(H_STREAM, HeaderValue::from_static("True"));
    if let Ok(v) = HeaderValue::from_str(job_id) {
        h.insert(H_TASK_ID, v);
    }
    h.insert(H_TASK_RESPONSE, HeaderValue::from_static("true"));
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

// ---------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------

/// What the caller may know of a task id.
enum Seen {
    /// No such task, or one of another project (which cannot be told from a missing one).
    Missing,
    /// A task of the caller's project that is neither the caller's nor may an admin see.
    Forbidden,
    Visible(Box<(Job, Option<DanubeTask>)>),
}

/// Upstream's `IsUserTask` (spec DANUBE-TASK-STATUS): a task is shown to the user who
/// created it and to an admin; anyone else gets 403. (Upstream also shows it to the owner
/// of the task's object; drplane's VMs belong to projects, not users, so there is no such
/// owner.) A job made by another family has no Danube user: only an admin sees it here.
fn task_visibility(caller: &Caller, job: Option<Job>, meta: Option<DanubeTask>) -> Seen {
    let Some(job) = job else {
        return Seen::Missing;
    };
    if !caller.can_see(&job.project) {
        return Seen::Missing;
    }
    let mine = meta.as_ref().is_some_and(|m| m.user_id == caller.user_id);
    if mine || caller.is_admin() {
        Seen::Visible(Box::new((job, meta)))
    } else {
        Seen::Forbidden
    }
}

/// The job and its Danube record, as far as the caller may see it.
async fn visible_task(
    st: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<Seen, crate::error::ApiError> {
    read_barrier(st, ReadQuery::default()).await?;
    let store = st.cp.store().clone();
    let i = id.to_string();
    let (job, meta) = blocking("danube task", move || {
        Ok((store.get_job(&i)?, store.danube_task(&i)?))
    })
    .await?;
    let seen = task_visibility(caller, job, meta);
    if matches!(seen, Seen::Forbidden) {
        tracing::info!(task_id = %id, caller = %caller.describe(), "danube task of another user refused");
    }
    Ok(seen)
}

fn forbidden(ctx: &Ctx) -> Response {
    detail(StatusCode::FORBIDDEN, super::ERR_PERMISSION_DENIED, ctx)
}

/// The caller's DC for the task calls (a `dc` in the data is checked like elsewhere).
fn task_ctx(caller: &Caller, data: &Map<String, Value>) -> Result<Ctx, Box<Response>> {
    super::select_dc(caller, None, data)
}

fn ctx_of(caller: &Caller) -> Ctx {
    Ctx::of(caller, None)
}

/// DANUBE-TASK-STATUS: `GET /api/task/{task_id}/status/` (alias `/state/`).
pub(crate) async fn status(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let ctx = ctx_of(&caller);
    if method != Method::GET && method != Method::HEAD {
        return super::method_not_allowed(&method, &ctx);
    }
    let ctx = match query_ctx(&caller, &method, query.as_deref()) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    if !task_id_ok(&id) || is_dummy(&id) {
        return detail(StatusCode::NOT_FOUND, NOT_EXIST_ANYMORE, &ctx);
    }
    match visible_task(&st, &caller, &id).await {
        Ok(Seen::Visible(v)) => status_answer(&v.0, v.1.as_ref(), &ctx),
        Ok(Seen::Forbidden) => forbidden(&ctx),
        Ok(Seen::Missing) => detail(StatusCode::NOT_FOUND, NOT_EXIST_ANYMORE, &ctx),
        Err(e) => api_error(e, &ctx),
    }
}

/// The DC of a GET task call from its query string.
fn query_ctx(caller: &Caller, method: &Method, query: Option<&str>) -> Result<Ctx, Box<Response>> {
    match request_data(method, query, b"") {
        Ok(d) => task_ctx(caller, &d),
        Err(m) => Err(Box::new(detail(
            StatusCode::BAD_REQUEST,
            &m,
            &ctx_of(caller),
        ))),
    }
}

/// DANUBE-TASK-DONE: `GET /api/task/{task_id}/done/`.
pub(crate) async fn done(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let ctx = ctx_of(&caller);
    if method != Method::GET && method != Method::HEAD {
        return super::method_not_allowed(&method, &ctx);
    }
    let ctx = match query_ctx(&caller, &method, query.as_deref()) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    if !task_id_ok(&id) || is_dummy(&id) {
        return detail(StatusCode::NOT_FOUND, NOT_EXIST_ANYMORE, &ctx);
    }
    match visible_task(&st, &caller, &id).await {
        Ok(Seen::Forbidden) => forbidden(&ctx),
        Ok(Seen::Visible(v)) => {
            let job = v.0;
            let state = danube_state(&job);
            let body = json!({"task_id": job.id, "done": job.status == JobStatus::Success});
            let mut resp =
                with_headers((http_status(state), axum::Json(body)).into_response(), &ctx);
            if let Ok(v) = HeaderValue::from_str(&job.id) {
                resp.headers_mut().insert(H_TASK_ID, v);
            }
            resp
        }
        Ok(Seen::Missing) => detail(StatusCode::NOT_FOUND, NOT_EXIST_ANYMORE, &ctx),
        Err(e) => api_error(e, &ctx),
    }
}

/// DANUBE-TASK-LIST: `GET /api/task/` — pending task ids of the caller (an admin: of
/// every user of the visible projects).
pub(crate) async fn list(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    Path(params): Path<BTreeMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Response {
    let path_dc = params.get("dc").map(String::as_str);
    if method != Method::GET && method != Method::HEAD {
        return super::method_not_allowed(&method, &Ctx::of(&caller, path_dc));
    }
    let data = match request_data(&method, query.as_deref(), b"") {
        Ok(d) => d,
        Err(m) => return detail(StatusCode::BAD_REQUEST, &m, &Ctx::of(&caller, path_dc)),
    };
    let ctx = match super::select_dc(&caller, path_dc, &data) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    if let Err(e) = read_barrier(&st, ReadQuery::default()).await {
        return api_error(e, &ctx);
    }
    let store = st.cp.store().clone();
    let c = caller.clone();
    let read = blocking("danube task list", move || {
        let mut out = Vec::new();
        for (_, id) in store.danube_pending_tasks(None)? {
            if let Some(t) = store.danube_task(&id)? {
                if c.can_see(&t.project) && (c.is_admin() || t.user_id == c.user_id) {
                    out.push(t.id);
                }
            }
        }
        Ok(out)
    })
    .await;
    match read {
        Ok(ids) => with_headers(axum::Json(ids).into_response(), &ctx),
        Err(e) => api_error(e, &ctx),
    }
}

/// DANUBE-TASK-DETAIL: `GET /api/task/{task_id}/` — a pending task's API-view record.
pub(crate) async fn detail_view(st: &AppState, caller: &Caller, id: &str, ctx: &Ctx) -> Response {
    if !task_id_ok(id) || is_dummy(id) {
        return detail(StatusCode::NOT_FOUND, NOT_EXIST, ctx);
    }
    match visible_task(st, caller, id).await {
        Ok(Seen::Forbidden) => forbidden(ctx),
        Ok(Seen::Visible(v)) => {
            let (job, Some(meta)) = *v else {
                return detail(StatusCode::NOT_FOUND, NOT_EXIST, ctx);
            };
            if job.status.is_terminal() {
                return detail(StatusCode::NOT_FOUND, NOT_EXIST, ctx);
            }
            let mut m: Map<String, Value> =
                serde_json::from_str(&meta.params_json).unwrap_or_default();
            m.insert("view".into(), json!(meta.view));
            m.insert("method".into(), json!(meta.method));
            m.insert("hostname".into(), json!(meta.hostname));
            m.insert("repname".into(), json!(meta.repname));
            m.insert(
                "orig_status".into(),
                json!(if meta.master_was_running { 1 } else { 2 }),
            );
            m.insert("task_id".into(), json!(meta.id));
            with_headers(axum::Json(Value::Object(m)).into_response(), ctx)
        }
        Ok(_) => detail(StatusCode::NOT_FOUND, NOT_EXIST, ctx),
        Err(e) => api_error(e, ctx),
    }
}

pub(crate) async fn show(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let ctx = ctx_of(&caller);
    if method != Method::GET && method != Method::HEAD {
        return super::method_not_allowed(&method, &ctx);
    }
    let ctx = match query_ctx(&caller, &method, query.as_deref()) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    detail_view(&st, &caller, &id, &ctx).await
}

/// DANUBE-TASK-CANCEL: `PUT /api/task/{task_id}/cancel/` with `force`.
pub(crate) async fn cancel(
    State(st): State<AppState>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let ctx = ctx_of(&caller);
    if method != Method::PUT {
        return super::method_not_allowed(&method, &ctx);
    }
    let data = match request_data(&method, None, &body) {
        Ok(d) => d,
        Err(m) => return super::detail(StatusCode::BAD_REQUEST, &m, &ctx),
    };
    let ctx = match task_ctx(&caller, &data) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let mut f = super::Fields::default();
    let force = f.boolean(&data, "force").unwrap_or(false);
    if !f.errors.is_empty() {
        return super::field_errors(f.errors, &caller, &ctx);
    }
    if !task_id_ok(&id) || is_dummy(&id) {
        return super::detail(StatusCode::NOT_ACCEPTABLE, CANNOT_CANCEL, &ctx);
    }
    // Only the task's creator (or an admin) may revoke it; anything else is "not
    // cancellable" (spec DANUBE-TASK-CANCEL: 406).
    let (job, meta) = match visible_task(&st, &caller, &id).await {
        Ok(Seen::Visible(v)) => match *v {
            (j, Some(m)) => (j, m),
            (_, None) => return super::detail(StatusCode::NOT_ACCEPTABLE, CANNOT_CANCEL, &ctx),
        },
        Ok(_) => return super::detail(StatusCode::NOT_ACCEPTABLE, CANNOT_CANCEL, &ctx),
        Err(e) => return api_error(e, &ctx),
    };
    let mine = meta.user_id == caller.user_id || caller.is_admin();
    let cancellable = match job.status {
        JobStatus::Init => true,
        JobStatus::Running => force,
        _ => false,
    };
    if !mine || !cancellable {
        return super::detail(StatusCode::NOT_ACCEPTABLE, CANNOT_CANCEL, &ctx);
    }
    let cmd = Command::Jobs(JobsCommand::CancelJob {
        job_id: id.clone(),
        by: format!("user '{}'", caller.user_name),
    });
    match propose_command(&st, &headers, cmd).await {
        Err(e) => api_error(e, &ctx),
        Ok(Err(CommandError::Conflict(_))) => {
            super::detail(StatusCode::NOT_ACCEPTABLE, CANNOT_CANCEL, &ctx)
        }
        Ok(Err(e)) => super::detail(StatusCode::NOT_ACCEPTABLE, &e.to_string(), &ctx),
        Ok(Ok(Outcome::Job(j))) => {
            tracing::info!(job_id = %j.id, project = %j.project, "danube task revoked");
            let meta = st.cp.store().danube_task(&id).ok().flatten();
            status_answer(&j, meta.as_ref(), &ctx)
        }
        Ok(Ok(_)) => status_answer(&job, Some(&meta), &ctx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_danube_format() {
        let id = hex_id('e');
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.len(), 5, "{id}");
        assert_eq!(parts[0], "1e1d1");
        assert_eq!(
            parts[1..].iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![8, 4, 4, 4]
        );
        assert!(task_id_ok(&id));
        assert!(!is_dummy(&id));
        assert!(is_dummy(&hex_id('d')));
        assert!(!task_id_ok("a_b"));
    }

    #[test]
    fn poll_schedule() {
        assert_eq!(poll_period(Duration::from_secs(0)), Duration::from_secs(1));
        assert_eq!(poll_period(Duration::from_secs(10)), Duration::from_secs(3));
        assert_eq!(poll_period(Duration::from_secs(45)), Duration::from_secs(6));
        assert_eq!(
            poll_period(Duration::from_secs(100)),
            Duration::from_secs(12)
        );
        assert_eq!(
            poll_period(Duration::from_secs(2000)),
            Duration::from_secs(30)
        );
    }
}
