//! The native jobs API.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /drplane/v1/jobs?project=&status=&type=&limit=&marker=` | jobs, newest first; `limit` 1 to 1000 (default 100); `marker` is the last id of the previous page; the answer's `next_marker` is set when the page is full |
//! | `GET /drplane/v1/jobs/{id}` | a job with its tasks: kind and parameters, status, attempt, assigned agent, lease expiry, fencing token, progress |
//! | `POST /drplane/v1/jobs/{id}/cancel` | cancel a job that has not ended (its unfinished tasks are cancelled; it ends FAIL with "cancelled by <user>") |
//! | `POST /drplane/v1/jobs` | **admin/test facility**: create a job of `sleep` tasks (duration, dependencies by name, attempts, injected failures, optional host) to exercise the scheduler and agents and to benchmark dispatch |
//!
//! Visibility: a caller sees the jobs of its own project; an admin sees every job. Another
//! project's job answers 404, as a missing one does.
//!
//! Reads are linearizable unless `?consistency=stale`. Writes accept `Idempotency-Key`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::inventory::validate_id;
use drplane_statemachine::jobs::{
    validate_job_type, Job, JobFilter, JobStatus, JobsCommand, NewJob, NewTask, Task, TaskKind,
};
use drplane_statemachine::{Command, CommandError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::control::Consistency;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{truncate, ApiJson, ApiPath, ApiQuery};
use crate::inventory::{blocking, not_found, propose_command, refusal, unexpected};
use crate::routes::{read_barrier, AppState, ReadQuery};
use crate::time::format_rfc3339_ms;

/// Default and largest page of `GET /drplane/v1/jobs`.
pub const JOBS_PAGE_DEFAULT: usize = 100;
pub const JOBS_PAGE_MAX: usize = 1000;
/// Default attempts of a test task.
pub const TEST_TASK_ATTEMPTS_DEFAULT: u32 = 3;
/// Longest test task name (its id is `<job id>.<name>`).
pub const TEST_TASK_NAME_MAX: usize = 64;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/drplane/v1/jobs", get(list_jobs).post(create_test_job))
        .route("/drplane/v1/jobs/{id}", get(show_job))
        .route("/drplane/v1/jobs/{id}/cancel", post(cancel_job))
}

fn ts(ms: u64) -> String {
    format_rfc3339_ms(ms)
}

fn job_view(j: &Job) -> Value {
    json!({
        "id": j.id,
        "type": j.job_type,
        "project": j.project,
        "status": j.status.as_str(),
        "begin_time": ts(j.begin_time_ms),
        "end_time": j.end_time_ms.map(ts),
        "entities": j.entities,
        "parent_id": j.parent_id,
        "sub_jobs": j.sub_jobs,
        "error_code": j.error_code,
        "fail_reason": j.fail_reason,
        "task_count": j.tasks.len(),
    })
}

/// `{"type": "<kind>", …parameters}`.
fn kind_view(kind: &TaskKind) -> Value {
    let mut params = match serde_json::to_value(kind) {
        Ok(Value::Object(outer)) => match outer.into_iter().next() {
            Some((_, Value::Object(inner))) => inner,
            _ => serde_json::Map::new(),
        },
        _ => serde_json::Map::new(),
    };
    params.insert("type".into(), Value::String(kind.name().into()));
    Value::Object(params)
}

fn task_view(t: &Task) -> Value {
    json!({
        "id": t.id,
        "kind": kind_view(&t.kind),
        "depends_on": t.depends_on,
        "status": t.status.as_str(),
        "attempt": t.attempt,
        "max_attempts": t.max_attempts,
        "placement_host": t.placement_host,
        "assigned_agent": t.assigned_host,
        "lease_expiry": t.lease_expiry_ms.map(ts),
        "fencing_token": t.token.map(|k| json!({"term": k.term, "attempt": k.attempt})),
        "progress": {
            "percent": t.progress.percent,
            "bytes_done": t.progress.bytes_done,
            "bytes_total": t.progress.bytes_total,
        },
        "output": t.output,
        "last_error": t.last_error,
        "next_attempt_after": ts(t.next_attempt_after_ms),
        "created_at": ts(t.created_at_ms),
        "updated_at": ts(t.updated_at_ms),
        "finished_at": t.finished_at_ms.map(ts),
    })
}

fn job_with_tasks(j: &Job, tasks: &[Task]) -> Value {
    let mut v = job_view(j);
    if let Value::Object(m) = &mut v {
        m.insert(
            "tasks".into(),
            Value::Array(tasks.iter().map(task_view).collect()),
        );
    }
    v
}

fn bad_param(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidListParameter, message)
}

// ---- list ----

#[derive(Debug, Deserialize)]
struct JobsQuery {
    consistency: Option<Consistency>,
    project: Option<String>,
    status: Option<String>,
    #[serde(rename = "type")]
    job_type: Option<String>,
    limit: Option<String>,
    marker: Option<String>,
}

async fn list_jobs(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<JobsQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobStatus::parse(&s.to_ascii_uppercase()).ok_or_else(|| {
            bad_param(format!(
                "status '{}' is not one of INIT, RUNNING, SUCCESS, FAIL",
                truncate(s, 32)
            ))
        })?),
    };
    let job_type = match q.job_type {
        None => None,
        Some(t) => {
            validate_job_type(&t).map_err(|e| bad_param(e.to_string()))?;
            Some(t)
        }
    };
    let limit = match q.limit.as_deref() {
        None => JOBS_PAGE_DEFAULT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=JOBS_PAGE_MAX).contains(&n) => n,
            _ => {
                return Err(bad_param(format!(
                    "limit '{}' is not a number from 1 to {JOBS_PAGE_MAX}",
                    truncate(s, 32)
                )))
            }
        },
    };
    if let Some(m) = &q.marker {
        validate_id("marker", m).map_err(|e| bad_param(e.to_string()))?;
    }
    // A caller sees its own project's jobs; an admin any project's.
    let project = if caller.is_admin() {
        q.project
    } else {
        match q.project {
            Some(p) if p != caller.project_id => {
                return Ok(Json(json!({"jobs": [], "next_marker": null})))
            }
            _ => Some(caller.project_id.clone()),
        }
    };
    read_barrier(
        &st,
        ReadQuery {
            consistency: q.consistency,
        },
    )
    .await?;
    let store = st.cp.store().clone();
    if let Some(m) = &q.marker {
        let visible = store
            .get_job(m)?
            .is_some_and(|j| caller.can_see(&j.project));
        if !visible {
            return Err(bad_param(format!(
                "marker '{m}' is not the id of a job you can see; use the last id of the previous page"
            )));
        }
    }
    let filter = JobFilter {
        project,
        status,
        job_type,
    };
    let marker = q.marker.clone();
    let jobs = blocking("job listing", move || {
        store.list_jobs(&filter, marker.as_deref(), limit)
    })
    .await?;
    let next_marker = if jobs.len() == limit {
        jobs.last().map(|j| j.id.clone())
    } else {
        None
    };
    Ok(Json(json!({
        "jobs": jobs.iter().map(job_view).collect::<Vec<_>>(),
        "next_marker": next_marker,
    })))
}

// ---- show ----

async fn visible_job(st: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    match st.cp.store().get_job(id)? {
        Some(j) if caller.can_see(&j.project) => Ok(j),
        _ => Err(not_found("job", id)),
    }
}

async fn show_job(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, ApiError> {
    validate_id("id", &id)?;
    read_barrier(&st, q).await?;
    let job = visible_job(&st, &caller, &id).await?;
    let store = st.cp.store().clone();
    let tasks = blocking("task listing", move || store.job_tasks(&id)).await?;
    Ok(Json(job_with_tasks(&job, &tasks)))
}

// ---- cancel ----

async fn cancel_job(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    validate_id("id", &id)?;
    // Visibility is checked on a fresh read so another project's job stays a 404.
    read_barrier(&st, ReadQuery::default()).await?;
    visible_job(&st, &caller, &id).await?;
    let command = Command::Jobs(JobsCommand::CancelJob {
        job_id: id.clone(),
        by: format!("user '{}'", caller.user_name),
    });
    match propose_command(&st, &headers, command).await? {
        Ok(Outcome::Job(job)) => {
            let store = st.cp.store().clone();
            let tasks = blocking("task listing", move || store.job_tasks(&id)).await?;
            Ok(Json(job_with_tasks(&job, &tasks)))
        }
        Ok(other) => Err(unexpected("cancel_job", &other)),
        Err(CommandError::Conflict(m)) => Err(ApiError::new(ErrorCode::JobFinished, m)),
        Err(e) => Err(refusal(e, "job")),
    }
}

// ---- create (admin/test facility) ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestTaskBody {
    /// Unique within the request; the task's id is `<job id>.<name>`.
    name: String,
    duration_ms: u64,
    #[serde(default)]
    depends_on: Vec<String>,
    max_attempts: Option<u32>,
    /// The first this-many attempts fail (retryable), for retry tests.
    #[serde(default)]
    fail_attempts: u32,
    /// Run on this host only.
    host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTestJobRequest {
    /// Default: the caller's project.
    project: Option<String>,
    /// Default: `test`.
    #[serde(rename = "type")]
    job_type: Option<String>,
    #[serde(default)]
    entities: BTreeMap<String, String>,
    tasks: Vec<TestTaskBody>,
}

async fn create_test_job(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateTestJobRequest>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let job_id = uuid::Uuid::new_v4().to_string();
    let mut tasks = Vec::with_capacity(req.tasks.len());
    for t in req.tasks {
        validate_id("tasks.name", &t.name)?;
        if t.name.len() > TEST_TASK_NAME_MAX {
            return Err(ApiError::new(
                ErrorCode::ValidationFailed,
                format!("invalid tasks.name: at most {TEST_TASK_NAME_MAX} characters"),
            ));
        }
        tasks.push(NewTask {
            id: format!("{job_id}.{}", t.name),
            kind: TaskKind::Sleep {
                duration_ms: t.duration_ms,
                fail_attempts: t.fail_attempts,
            },
            depends_on: t
                .depends_on
                .iter()
                .map(|d| format!("{job_id}.{d}"))
                .collect(),
            max_attempts: t.max_attempts.unwrap_or(TEST_TASK_ATTEMPTS_DEFAULT),
            host: t.host,
        });
    }
    let new = NewJob {
        id: job_id.clone(),
        job_type: req.job_type.unwrap_or_else(|| "test".into()),
        project: req.project.unwrap_or_else(|| caller.project_id.clone()),
        entities: req.entities,
        tasks,
        sub_jobs: Vec::new(),
    };
    let command = Command::Jobs(JobsCommand::CreateJob(Box::new(new)));
    match propose_command(&st, &headers, command).await? {
        Ok(Outcome::Job(job)) => {
            let store = st.cp.store().clone();
            let id = job.id.clone();
            let tasks = blocking("task listing", move || store.job_tasks(&id)).await?;
            let location = HeaderValue::from_str(&format!("/drplane/v1/jobs/{}", job.id))
                .map_err(|e| ApiError::internal(format!("job id not a header value: {e}")))?;
            Ok((
                StatusCode::CREATED,
                [(header::LOCATION, location)],
                Json(job_with_tasks(&job, &tasks)),
            )
                .into_response())
        }
        Ok(other) => Err(unexpected("create_job", &other)),
        Err(e) => Err(refusal(e, "job")),
    }
}
