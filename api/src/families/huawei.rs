//! Huawei Cloud SDRS (`/v1/{project_id}/…`) and ECS (`/v1/{project_id}/cloudservers/…`,
//! `/v1/{project_id}/jobs/…`): endpoints SDRS-*, ECS-* of ../shared/spec.
//! Translates the wire format into operations on the shared model and back; holds no
//! state of its own (the records are `drplane_statemachine::sdrs`).
//!
//! | ID | method and path |
//! |---|---|
//! | SDRS-DOMAIN-LIST | `GET /v1/{p}/active-domains` (one domain per pair of sites) |
//! | SDRS-PG-CREATE, SDRS-PG-LIST | `POST`, `GET /v1/{p}/server-groups` |
//! | SDRS-PG-SHOW, SDRS-PG-RENAME, SDRS-PG-DELETE | `GET`, `PUT`, `DELETE /v1/{p}/server-groups/{id}` |
//! | SDRS-PG-START/STOP/REVERSE/FAILOVER | `POST /v1/{p}/server-groups/{id}/action` |
//! | SDRS-PI-CREATE, SDRS-PI-LIST | `POST`, `GET /v1/{p}/protected-instances` |
//! | SDRS-PI-SHOW, SDRS-PI-RENAME, SDRS-PI-DELETE | `GET`, `PUT`, `DELETE /v1/{p}/protected-instances/{id}` |
//! | SDRS-PI-ATTACH-RP | `POST /v1/{p}/protected-instances/{id}/attachreplication` |
//! | SDRS-PI-DETACH-RP | `DELETE /v1/{p}/protected-instances/{id}/detachreplication/{rid}` |
//! | SDRS-RP-CREATE, SDRS-RP-LIST | `POST`, `GET /v1/{p}/replications` |
//! | SDRS-RP-SHOW, SDRS-RP-DELETE | `GET`, `DELETE /v1/{p}/replications/{id}` |
//! | SDRS-JOB-SHOW = ECS-JOB-SHOW | `GET /v1/{p}/jobs/{job_id}` (one job store, README decision 11) |
//! | ECS-MIGRATE | `POST /v1/{p}/cloudservers/{id}/migrate` |
//! | ECS-SERVER-SHOW | `GET /v1/{p}/cloudservers/{id}` |
//! | ECS-SERVER-BATCH-STOP | `POST /v1/{p}/cloudservers/action` `{"os-stop"}` |
//!
//! Errors: `{"error":{"code":"SDRS.xxxx","message":…}}` (ECS: `Ecs.xxxx`) with the
//! documented statuses: 400 for validation, state and not-found of SDRS resources,
//! 404 for an unknown job, an unknown ECS server or an unknown path, 405 for a wrong
//! method. The authentication layer already checked the signature and that the path
//! project is the caller's (403 SDRS.0005 otherwise); the path project scopes every read
//! and write, so another project's resources answer like missing ones.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post, MethodRouter};
use axum::{Json, Router};
use drplane_statemachine::inventory::{validate_id, Server, ServerStatus};
use drplane_statemachine::jobs::{Job, JobStatus};
use drplane_statemachine::replication::{Pair, PairOp, PairState};
use drplane_statemachine::sdrs::{
    self, refusal_code, server_status_name, GroupAction, NewGroup, NewInstance, NewSdrsPair,
    SdrsCommand, SdrsOutcome, Station, Status, Tag,
};
use drplane_statemachine::{Command, CommandError, Outcome, Store};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::error::{ApiError, NativeErrorShape};
use crate::extract::truncate;
use crate::inventory::{blocking, propose_command};
use crate::routes::{read_barrier, AppState, ReadQuery};
use crate::time::format_rfc3339_ms;

/// Largest page and the most ids in an id-list filter (sdrs.md §1.5).
const LIMIT_MAX: u64 = 1000;
const ID_LIST_MAX: usize = 30;

/// This family's routes (merged into the node's router; authentication already ran).
pub(crate) fn routes() -> Router<AppState> {
    let f = |m: MethodRouter<AppState>| m.fallback(method_not_allowed);
    Router::new()
        .route("/v1/{project_id}/active-domains", f(get(list_domains)))
        .route(
            "/v1/{project_id}/server-groups",
            f(get(list_groups).post(create_group)),
        )
        .route(
            "/v1/{project_id}/server-groups/{id}",
            f(get(show_group).put(rename_group).delete(delete_group)),
        )
        .route(
            "/v1/{project_id}/server-groups/{id}/action",
            f(post(group_action)),
        )
        .route(
            "/v1/{project_id}/protected-instances",
            f(get(list_instances).post(create_instance)),
        )
        .route(
            "/v1/{project_id}/protected-instances/{id}",
            f(get(show_instance)
                .put(rename_instance)
                .delete(delete_instance)),
        )
        .route(
            "/v1/{project_id}/protected-instances/{id}/attachreplication",
            f(post(attach_pair)),
        )
        .route(
            "/v1/{project_id}/protected-instances/{id}/detachreplication/{rid}",
            f(delete(detach_pair)),
        )
        .route(
            "/v1/{project_id}/replications",
            f(get(list_pairs).post(create_pair)),
        )
        .route(
            "/v1/{project_id}/replications/{id}",
            f(get(show_pair).delete(delete_pair)),
        )
        .route("/v1/{project_id}/jobs/{job_id}", f(get(show_job)))
        .route(
            "/v1/{project_id}/cloudservers/action",
            f(post(ecs_server_action)),
        )
        .route(
            "/v1/{project_id}/cloudservers/{id}",
            f(get(ecs_show_server)),
        )
        .route(
            "/v1/{project_id}/cloudservers/{id}/migrate",
            f(post(ecs_migrate)),
        )
        .route("/v1/{project_id}/{*rest}", any(unknown_path))
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    Sdrs,
    Ecs,
}

impl Fam {
    fn generic(self) -> &'static str {
        match self {
            Fam::Sdrs => "SDRS.0000",
            Fam::Ecs => "Ecs.0000",
        }
    }

    fn bad_request(self) -> &'static str {
        match self {
            Fam::Sdrs => "SDRS.0201",
            Fam::Ecs => "Ecs.0005",
        }
    }

    fn of_path(path: &str) -> Fam {
        if path.split('/').nth(3) == Some("cloudservers") {
            Fam::Ecs
        } else {
            Fam::Sdrs
        }
    }
}

/// An error in the Huawei shape.
#[derive(Debug)]
struct HwError {
    status: StatusCode,
    code: String,
    message: String,
    retry_after: Option<u64>,
}

type HwResult<T> = Result<T, HwError>;

impl HwError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        HwError {
            status: StatusCode::BAD_REQUEST,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
        }
    }

    fn with_status(mut self, s: StatusCode) -> Self {
        self.status = s;
        self
    }

    /// A native error (cluster unavailable, store fault, …) in this family's shape.
    fn from_api(fam: Fam, e: ApiError) -> Self {
        let code = match e.status.as_u16() {
            400 => fam.bad_request(),
            401 => match fam {
                Fam::Sdrs => "SDRS.0002",
                Fam::Ecs => "Ecs.0000",
            },
            403 => match fam {
                Fam::Sdrs => "SDRS.0005",
                Fam::Ecs => "Ecs.0003",
            },
            _ => fam.generic(),
        };
        if e.status.is_server_error() {
            tracing::warn!(code = %e.code, detail = %e.message, "request failed");
        }
        let message = if e.status == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error; the server log has the cause under this response's X-Request-Id"
                .to_string()
        } else {
            e.message
        };
        HwError {
            status: e.status,
            code: code.to_string(),
            message,
            retry_after: e.retry_after_secs,
        }
    }

    /// A refusal of the state machine.
    fn from_command(fam: Fam, e: CommandError) -> Self {
        if let Some((code, msg)) = refusal_code(&e) {
            let status = if code == "Ecs.0114" {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            return HwError::new(code, msg).with_status(status);
        }
        let code = match (&e, fam) {
            (CommandError::Invalid { field, .. }, Fam::Sdrs) => match field.as_str() {
                "name" => "SDRS.0202",
                "description" => "SDRS.0212",
                "server_group_id" => "SDRS.0207",
                "server_id" => "SDRS.0210",
                "volume_id" => "SDRS.0211",
                "protected_instance_id" => "SDRS.0208",
                "replication_id" => "SDRS.0213",
                _ => "SDRS.0201",
            },
            (CommandError::Invalid { .. }, Fam::Ecs) => "Ecs.0005",
            (CommandError::Conflict(_), Fam::Sdrs) => "SDRS.1002",
            (CommandError::Conflict(_), Fam::Ecs) => "Ecs.0100",
            (_, f) => f.bad_request(),
        };
        HwError::new(code, e.to_string())
    }
}

impl IntoResponse for HwError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = %self.code, reason = %self.message, "huawei request failed");
        } else {
            tracing::debug!(code = %self.code, reason = %self.message, "huawei request refused");
        }
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(NativeErrorShape);
        resp
    }
}

async fn unknown_path(uri: Uri) -> HwError {
    let fam = Fam::of_path(uri.path());
    HwError::new(
        fam.generic(),
        format!("no such resource: '{}'", truncate(uri.path(), 200)),
    )
    .with_status(StatusCode::NOT_FOUND)
}

async fn method_not_allowed(method: Method, uri: Uri) -> HwError {
    let fam = Fam::of_path(uri.path());
    HwError::new(
        fam.generic(),
        format!(
            "'{}' does not accept method {}",
            truncate(uri.path(), 200),
            truncate(method.as_str(), 20)
        ),
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

// ---------------------------------------------------------------------------------------
// Request helpers
// ---------------------------------------------------------------------------------------

fn path_or<T>(fam: Fam, p: Result<Path<T>, PathRejection>) -> HwResult<T> {
    p.map(|Path(v)| v)
        .map_err(|e| HwError::new(fam.bad_request(), format!("invalid path: {e}")))
}

fn query_or(
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> HwResult<BTreeMap<String, String>> {
    q.map(|Query(v)| v)
        .map_err(|e| HwError::new("SDRS.0201", format!("invalid query string: {e}")))
}

/// The body as JSON; an empty body is `null`.
fn body_json(fam: Fam, b: Result<Bytes, BytesRejection>) -> HwResult<Value> {
    let bytes = b.map_err(|e| {
        let status = e.status();
        HwError::new(fam.bad_request(), format!("cannot read the body: {e}")).with_status(
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                status
            } else {
                StatusCode::BAD_REQUEST
            },
        )
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        HwError::new(
            fam.bad_request(),
            format!("the body is not valid JSON: {e}"),
        )
    })
}

/// `body[key]` as an object (`SDRS.0201` when missing or not an object).
fn wrapper<'a>(body: &'a Value, key: &str) -> HwResult<&'a Map<String, Value>> {
    body.get(key).and_then(Value::as_object).ok_or_else(|| {
        HwError::new(
            "SDRS.0201",
            format!("the body must be a JSON object with a '{key}' object"),
        )
    })
}

/// An optional string field (`null` = absent); another type is `code`.
fn opt_str(m: &Map<String, Value>, key: &str, code: &str) -> HwResult<Option<String>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(HwError::new(code, format!("'{key}' must be a string"))),
    }
}

fn req_str(m: &Map<String, Value>, key: &str, code: &str) -> HwResult<String> {
    opt_str(m, key, code)?.ok_or_else(|| HwError::new(code, format!("'{key}' is required")))
}

fn opt_bool(m: &Map<String, Value>, key: &str, code: &str) -> HwResult<Option<bool>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(HwError::new(code, format!("'{key}' must be true or false"))),
    }
}

fn check_name(name: &str) -> HwResult<()> {
    sdrs::validate_name("name", name).map_err(|e| HwError::new("SDRS.0202", e.to_string()))
}

fn check_description(d: &Option<String>) -> HwResult<()> {
    if let Some(d) = d {
        sdrs::validate_description(d).map_err(|e| HwError::new("SDRS.0212", e.to_string()))?;
    }
    Ok(())
}

/// An id from a path or body: a malformed one answers like an unknown one.
fn check_id(id: &str, code: &str, what: &str) -> HwResult<()> {
    validate_id(what, id)
        .map_err(|_| HwError::new(code, format!("{what} '{}' not found", truncate(id, 64))))
}

fn new_job_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Proposes a command of this family; the outcome or the refusal in the family's shape.
async fn propose(
    st: &AppState,
    fam: Fam,
    headers: &HeaderMap,
    cmd: SdrsCommand,
) -> HwResult<SdrsOutcome> {
    let kind = cmd.kind();
    match propose_command(st, headers, Command::Sdrs(cmd))
        .await
        .map_err(|e| HwError::from_api(fam, e))?
    {
        Ok(Outcome::Sdrs(o)) => Ok(*o),
        Ok(other) => Err(HwError::from_api(
            fam,
            ApiError::internal(format!("{kind} produced {other:?}")),
        )),
        Err(e) => Err(HwError::from_command(fam, e)),
    }
}

async fn propose_job(
    st: &AppState,
    fam: Fam,
    headers: &HeaderMap,
    cmd: SdrsCommand,
) -> HwResult<Json<Value>> {
    let kind = cmd.kind();
    match propose(st, fam, headers, cmd).await? {
        SdrsOutcome::Job { job_id } => {
            tracing::info!(job_id = %job_id, command = kind, "job accepted");
            Ok(Json(json!({ "job_id": job_id })))
        }
        other => Err(HwError::from_api(
            fam,
            ApiError::internal(format!("{kind} produced {other:?}")),
        )),
    }
}

async fn barrier(st: &AppState, fam: Fam) -> HwResult<()> {
    read_barrier(st, ReadQuery::default())
        .await
        .map_err(|e| HwError::from_api(fam, e))
}

async fn read<T: Send + 'static>(
    st: &AppState,
    fam: Fam,
    what: &'static str,
    f: impl FnOnce(&Store) -> Result<T, drplane_statemachine::StoreError> + Send + 'static,
) -> HwResult<T> {
    let store = st.cp.store().clone();
    blocking(what, move || f(&store))
        .await
        .map_err(|e| HwError::from_api(fam, e))
}

// ---------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------

/// `yyyy-MM-dd HH:mm:ss.SSS` (groups, instances).
fn ts_space(ms: u64) -> String {
    let s = format_rfc3339_ms(ms);
    s.trim_end_matches('Z').replacen('T', " ", 1)
}

/// `yyyy-MM-ddTHH:mm:ss.SSSSSS` (pairs).
fn ts_micro(ms: u64) -> String {
    let s = format_rfc3339_ms(ms);
    format!("{}000", s.trim_end_matches('Z'))
}

/// `yyyy-MM-ddTHH:mm:ss.SSSZ` (jobs).
fn ts_job(ms: u64) -> String {
    format_rfc3339_ms(ms)
}

fn group_view(store: &Store, g: &sdrs::Group) -> Result<Value, drplane_statemachine::StoreError> {
    let (instances, pairs) = store.sdrs_group_members(&g.id)?;
    let mut progress = Vec::new();
    for p in &pairs {
        if let Some(rp) = store.get_pair(p)? {
            progress.push(pair_progress(&rp));
        }
    }
    Ok(json!({
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "status": g.status.as_str(),
        "progress": average(&progress),
        "source_availability_zone": g.source_az,
        "target_availability_zone": g.target_az,
        "domain_id": g.domain_id,
        "domain_name": g.domain_name,
        "priority_station": g.station.as_str(),
        "protected_instance_num": instances.len(),
        "replication_num": pairs.len(),
        "disaster_recovery_drill_num": 0,
        "protected_status": null,
        "replication_status": null,
        "health_status": null,
        "source_vpc_id": g.source_vpc_id,
        "target_vpc_id": g.source_vpc_id,
        "test_vpc_id": null,
        "dr_type": g.dr_type,
        "created_at": ts_space(g.created_at_ms),
        "updated_at": ts_space(g.updated_at_ms),
        "protection_type": "replication-pair",
        "replication_model": null,
        "server_type": "ECS",
    }))
}

fn average(v: &[u8]) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.iter().map(|x| u64::from(*x)).sum::<u64>() / v.len() as u64
}

fn pair_progress(p: &Pair) -> u8 {
    if p.recovery_point_ms.is_some() {
        100
    } else {
        0
    }
}

fn instance_view(
    store: &Store,
    i: &sdrs::Instance,
) -> Result<Value, drplane_statemachine::StoreError> {
    let mut progress = Vec::new();
    for a in &i.attachments {
        if let Some(rp) = store.get_pair(&a.pair_id)? {
            progress.push(pair_progress(&rp));
        }
    }
    let mut status = i.status.as_str();
    if !i.status.is_transient()
        && (store.get_server(&i.source_server)?.is_none()
            || store.get_server(&i.target_server)?.is_none())
    {
        status = Status::Invalid.as_str();
    }
    Ok(json!({
        "id": i.id,
        "name": i.name,
        "description": i.description,
        "server_group_id": i.group_id,
        "status": status,
        "progress": average(&progress),
        "source_server": i.source_server,
        "target_server": i.target_server,
        "created_at": ts_space(i.created_at_ms),
        "updated_at": ts_space(i.updated_at_ms),
        "priority_station": i.station.as_str(),
        "attachment": i.attachments.iter().map(|a| json!({"replication": a.pair_id, "device": a.device})).collect::<Vec<_>>(),
        "tags": i.tags.iter().map(|t| json!({"key": t.key, "value": t.value})).collect::<Vec<_>>(),
        "metadata": {},
        "flavor_ref": i.flavor_ref,
    }))
}

fn replication_status(p: &Pair) -> &'static str {
    match p.state {
        PairState::Creating => "copying",
        PairState::Active if matches!(p.pending_op, Some(PairOp::Sync { .. })) => "copying",
        PairState::Active if p.enabled => "active",
        PairState::Active => "active-stopped",
        PairState::FailedOver | PairState::Error => "inactive",
    }
}

fn pair_view(
    store: &Store,
    sp: &sdrs::SdrsPair,
    now: u64,
) -> Result<Value, drplane_statemachine::StoreError> {
    let rp = store.get_pair(&sp.id)?;
    let station = match store.sdrs_group(&sp.group_id)? {
        Some(g) => g.station.as_str(),
        None => Station::Source.as_str(),
    };
    let offline = |h: &str| -> Result<bool, drplane_statemachine::StoreError> {
        Ok(store.get_host(h)?.is_none_or(|x| !x.is_online()))
    };
    let (repl, progress, fault, rpo, rp_time, last_sync) = match &rp {
        Some(p) => {
            let fault = if offline(&p.source.host)? {
                "2"
            } else if offline(&p.target.host)? {
                "5"
            } else {
                "0"
            };
            (
                replication_status(p),
                pair_progress(p),
                fault,
                p.rpo_seconds(now),
                p.recovery_point_ms.map(ts_job),
                p.last_sync_ms.map(ts_job),
            )
        }
        None => ("inactive", 0, "0", None, None, None),
    };
    Ok(json!({
        "id": sp.id,
        "name": sp.name,
        "description": sp.description,
        "replication_model": "hypermetro",
        "status": sp.status.as_str(),
        "progress": progress,
        "replication_status": repl,
        "attachment": sp.attachment.iter().map(|(pi, dev)| json!({"device": dev, "protected_instance": pi})).collect::<Vec<_>>(),
        "server_group_id": sp.group_id,
        "volume_ids": format!("{},{}", sp.source_volume, sp.target_volume),
        "priority_station": station,
        "fault_level": fault,
        "created_at": ts_micro(sp.created_at_ms),
        "updated_at": ts_micro(sp.updated_at_ms),
        "record_metadata": {
            "multiattach": false,
            "bootable": sp.bootable,
            "volume_size": sp.size_bytes.div_ceil(1 << 30),
            "volume_type": "SSD",
        },
        "failure_detail": sp.failure_detail,
        // drplane additions: how fresh the DR copy is.
        "recovery_point": rp_time,
        "last_sync_time": last_sync,
        "rpo_seconds": rpo,
        "production_host": rp.as_ref().map(|p| p.source.host.clone()),
        "dr_host": rp.as_ref().map(|p| p.target.host.clone()),
    }))
}

fn is_ecs_job(t: &str) -> bool {
    matches!(
        t,
        sdrs::JOB_MIGRATE | sdrs::JOB_STOP_SERVERS | sdrs::JOB_STOP_SERVER
    )
}

fn job_view(store: &Store, j: &Job, depth: u8) -> Result<Value, drplane_statemachine::StoreError> {
    let mut entities = Map::new();
    for (k, v) in &j.entities {
        match k.as_str() {
            "sub_jobs_total" => {
                entities.insert(k.clone(), json!(v.parse::<u64>().unwrap_or(0)));
            }
            "recovery_point_ms" => {
                if let Ok(ms) = v.parse::<u64>() {
                    entities.insert("recovery_point".into(), json!(ts_job(ms)));
                }
                entities.insert(k.clone(), json!(v));
            }
            _ => {
                entities.insert(k.clone(), json!(v));
            }
        }
    }
    if depth == 0 && (!j.sub_jobs.is_empty() || is_ecs_job(&j.job_type)) {
        let mut subs = Vec::new();
        for id in &j.sub_jobs {
            if let Some(s) = store.get_job(id)? {
                subs.push(job_view(store, &s, 1)?);
            }
        }
        entities.insert("sub_jobs_total".into(), json!(subs.len()));
        entities.insert("sub_jobs".into(), Value::Array(subs));
    }
    let error_code = (j.status == JobStatus::Fail).then(|| {
        if is_ecs_job(&j.job_type) {
            "Ecs.0000"
        } else {
            "SDRS.0000"
        }
    });
    let fail_reason = j.fail_reason.as_ref().map(|r| match &j.error_code {
        Some(c) => format!("{c}: {r}"),
        None => r.clone(),
    });
    if let (Some(r), true) = (&fail_reason, depth == 1) {
        entities.insert("errorcode_message".into(), json!(r));
    }
    Ok(json!({
        "job_id": j.id,
        "job_type": j.job_type,
        "status": j.status.as_str(),
        "begin_time": ts_job(j.begin_time_ms),
        "end_time": j.end_time_ms.map(ts_job),
        "error_code": error_code,
        "fail_reason": fail_reason,
        "entities": entities,
    }))
}

// ---------------------------------------------------------------------------------------
// Lists
// ---------------------------------------------------------------------------------------

struct Page {
    limit: usize,
    offset: usize,
}

fn page(q: &BTreeMap<String, String>) -> HwResult<Page> {
    let limit = match q.get("limit").map(String::as_str) {
        None | Some("") => LIMIT_MAX,
        Some(s) => match s.parse::<u64>() {
            Ok(0) => LIMIT_MAX,
            Ok(n) if n <= LIMIT_MAX => n,
            _ => {
                return Err(HwError::new(
                    "SDRS.0221",
                    format!(
                        "limit '{}' is not an integer from 0 to {LIMIT_MAX}",
                        truncate(s, 32)
                    ),
                ))
            }
        },
    };
    let offset = match q.get("offset").map(String::as_str) {
        None | Some("") => 0,
        Some(s) => s.parse::<u64>().map_err(|_| {
            HwError::new(
                "SDRS.0222",
                format!("offset '{}' is not a non-negative integer", truncate(s, 32)),
            )
        })?,
    };
    Ok(Page {
        limit: limit as usize,
        offset: usize::try_from(offset).unwrap_or(usize::MAX),
    })
}

fn status_filter(q: &BTreeMap<String, String>) -> HwResult<Option<Status>> {
    match q.get("status").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => Status::parse(s).map(Some).ok_or_else(|| {
            HwError::new(
                "SDRS.0209",
                format!("status '{}' is not a known status", truncate(s, 32)),
            )
        }),
    }
}

/// `['a','b']` or `["a","b"]` (sdrs.md §1.5); at most 30 ids.
fn id_list(q: &BTreeMap<String, String>, key: &str) -> HwResult<Option<Vec<String>>> {
    let Some(raw) = q.get(key) else {
        return Ok(None);
    };
    let inner = raw.trim().trim_start_matches('[').trim_end_matches(']');
    let ids: Vec<String> = inner
        .split(',')
        .map(|s| s.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if ids.len() > ID_LIST_MAX {
        return Err(HwError::new(
            "SDRS.0226",
            format!(
                "'{key}' holds {} ids; at most {ID_LIST_MAX} are allowed",
                ids.len()
            ),
        ));
    }
    Ok(Some(ids))
}

fn paged<T>(mut items: Vec<T>, p: &Page) -> (usize, Vec<T>) {
    let count = items.len();
    let items: Vec<T> = items.drain(..).skip(p.offset).take(p.limit).collect();
    (count, items)
}

// ---------------------------------------------------------------------------------------
// SDRS-DOMAIN-LIST
// ---------------------------------------------------------------------------------------

/// One active-active domain per unordered pair of sites: (id, name, a, b).
fn domains(
    store: &Store,
) -> Result<Vec<(String, String, String, String)>, drplane_statemachine::StoreError> {
    let sites: Vec<String> = store.list_sites()?.into_iter().map(|s| s.name).collect();
    let mut out = Vec::new();
    for (n, a) in sites.iter().enumerate() {
        for b in &sites[n + 1..] {
            let h = Sha256::digest(format!("drplane-domain\0{a}\0{b}").as_bytes());
            let x = hex::encode(&h[..16]);
            let id = format!(
                "{}-{}-{}-{}-{}",
                &x[..8],
                &x[8..12],
                &x[12..16],
                &x[16..20],
                &x[20..32]
            );
            out.push((id, format!("{a}--{b}"), a.clone(), b.clone()));
        }
    }
    Ok(out)
}

async fn list_domains(State(st): State<AppState>, _caller: Caller) -> HwResult<Json<Value>> {
    barrier(&st, Fam::Sdrs).await?;
    let ds = read(&st, Fam::Sdrs, "domain listing", domains).await?;
    let list: Vec<Value> = ds
        .into_iter()
        .map(|(id, name, a, b)| {
            json!({
                "id": id,
                "name": name,
                "description": format!("replication between sites {a} and {b}"),
                "sold_out": false,
                "local_replication_cluster": {"availability_zone": a},
                "remote_replication_cluster": {"availability_zone": b},
            })
        })
        .collect();
    Ok(Json(json!({ "domains": list })))
}

// ---------------------------------------------------------------------------------------
// Protection groups
// ---------------------------------------------------------------------------------------

async fn create_group(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let project = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let m = wrapper(&body, "server_group")?;
    let name = req_str(m, "name", "SDRS.0202")?;
    check_name(&name)?;
    let description = opt_str(m, "description", "SDRS.0212")?;
    check_description(&description)?;
    let source_az = req_str(m, "source_availability_zone", "SDRS.0203")?;
    let target_az = req_str(m, "target_availability_zone", "SDRS.0203")?;
    let domain_id = req_str(m, "domain_id", "SDRS.0205")?;
    let vpc = req_str(m, "source_vpc_id", "SDRS.0204")?;
    if vpc.is_empty() || vpc.len() > 128 || vpc.chars().any(char::is_control) {
        return Err(HwError::new(
            "SDRS.0204",
            "source_vpc_id must be 1 to 128 bytes",
        ));
    }
    if let Some(t) = opt_str(m, "dr_type", "SDRS.0201")? {
        if t != "migration" {
            return Err(HwError::new("SDRS.0201", "dr_type must be 'migration'"));
        }
    }
    barrier(&st, Fam::Sdrs).await?;
    let ds = read(&st, Fam::Sdrs, "domain listing", domains).await?;
    let Some((_, domain_name, a, b)) = ds.into_iter().find(|d| d.0 == domain_id) else {
        return Err(HwError::new(
            "SDRS.0205",
            format!(
                "domain '{}' not found: list them with GET /v1/{{project_id}}/active-domains",
                truncate(&domain_id, 64)
            ),
        ));
    };
    let pair_ok = (source_az == a && target_az == b) || (source_az == b && target_az == a);
    if !pair_ok {
        return Err(HwError::new(
            "SDRS.0203",
            format!("domain '{domain_id}' joins availability zones '{a}' and '{b}': source and target must be those two"),
        ));
    }
    let cmd = SdrsCommand::CreateGroup {
        group: Box::new(NewGroup {
            id: new_uuid(),
            project,
            name,
            description,
            source_az,
            target_az,
            domain_id,
            domain_name,
            source_vpc_id: vpc,
        }),
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

async fn list_groups(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> HwResult<Json<Value>> {
    let project = path_or(Fam::Sdrs, p)?;
    let q = query_or(q)?;
    let pg = page(&q)?;
    let status = status_filter(&q)?;
    let name = q.get("name").cloned().filter(|s| !s.is_empty());
    let az = q
        .get("availability_zone")
        .cloned()
        .filter(|s| !s.is_empty());
    let query_type = q.get("query_type").cloned().unwrap_or_default();
    if !matches!(
        query_type.as_str(),
        "" | "general" | "status_abnormal" | "stop_protected" | "period_no_dr_drill"
    ) {
        return Err(HwError::new(
            "SDRS.0201",
            format!("query_type '{}' is not known", truncate(&query_type, 32)),
        ));
    }
    barrier(&st, Fam::Sdrs).await?;
    let out = read(&st, Fam::Sdrs, "group listing", move |store| {
        let mut gs = store.sdrs_groups(&project)?;
        gs.retain(|g| {
            status.is_none_or(|s| g.status == s)
                && name.as_deref().is_none_or(|n| g.name.contains(n))
                && az.as_deref().is_none_or(|a| g.production_az() == a)
                && match query_type.as_str() {
                    "status_abnormal" => g.status.is_error(),
                    "stop_protected" => matches!(g.status, Status::Available | Status::FailedOver),
                    _ => true,
                }
        });
        gs.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(a.id.cmp(&b.id)));
        let (count, gs) = paged(gs, &pg);
        let mut views = Vec::with_capacity(gs.len());
        for g in &gs {
            views.push(group_view(store, g)?);
        }
        Ok((count, views))
    })
    .await?;
    Ok(Json(json!({"server_groups": out.1, "count": out.0})))
}

async fn visible_group(st: &AppState, project: &str, id: &str) -> HwResult<sdrs::Group> {
    check_id(id, "SDRS.1013", "protection group")?;
    barrier(st, Fam::Sdrs).await?;
    let (p, i) = (project.to_string(), id.to_string());
    read(st, Fam::Sdrs, "group read", move |s| {
        Ok(s.sdrs_group(&i)?.filter(|g| g.project == p))
    })
    .await?
    .ok_or_else(|| HwError::new("SDRS.1013", format!("protection group '{id}' not found")))
}

async fn show_group(
    State(st): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let g = visible_group(&st, &project, &id).await?;
    let v = read(&st, Fam::Sdrs, "group view", move |s| group_view(s, &g)).await?;
    Ok(Json(json!({ "server_group": v })))
}

async fn rename_group(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let m = wrapper(&body, "server_group")?;
    let name = req_str(m, "name", "SDRS.0202")?;
    check_name(&name)?;
    check_id(&id, "SDRS.1013", "protection group")?;
    match propose(
        &st,
        Fam::Sdrs,
        &headers,
        SdrsCommand::RenameGroup { id, project, name },
    )
    .await?
    {
        SdrsOutcome::Group(g) => {
            let v = read(&st, Fam::Sdrs, "group view", move |s| group_view(s, &g)).await?;
            Ok(Json(json!({ "server_group": v })))
        }
        other => Err(HwError::from_api(
            Fam::Sdrs,
            ApiError::internal(format!("rename produced {other:?}")),
        )),
    }
}

async fn delete_group(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    check_id(&id, "SDRS.1013", "protection group")?;
    let cmd = SdrsCommand::DeleteGroup {
        id,
        project,
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

async fn group_action(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let Some(obj) = body.as_object() else {
        return Err(HwError::new(
            "SDRS.0201",
            "the body must be a JSON object with one action key",
        ));
    };
    if obj.len() != 1 {
        return Err(HwError::new(
            "SDRS.0206",
            "give exactly one of start-server-group, stop-server-group, reverse-server-group, failover-server-group",
        ));
    }
    let Some((key, val)) = obj.iter().next() else {
        return Err(HwError::new("SDRS.0206", "no action given"));
    };
    if !(val.is_null() || val.is_object()) {
        return Err(HwError::new(
            "SDRS.0201",
            format!("'{key}' must be an object"),
        ));
    }
    let action = match key.as_str() {
        // SDRS-PG-START (enable protection or re-protect, by the group's status).
        "start-server-group" => GroupAction::Start,
        // SDRS-PG-STOP
        "stop-server-group" => GroupAction::Stop,
        // SDRS-PG-REVERSE (planned failover)
        "reverse-server-group" => {
            let station = val
                .get("priority_station")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    HwError::new(
                        "SDRS.0216",
                        "reverse-server-group.priority_station is required",
                    )
                })?;
            let s = Station::parse(station).ok_or_else(|| {
                HwError::new(
                    "SDRS.0216",
                    format!(
                        "priority_station '{}' is not 'source' or 'target'",
                        truncate(station, 32)
                    ),
                )
            })?;
            GroupAction::Reverse(s)
        }
        // SDRS-PG-FAILOVER (unplanned failover)
        "failover-server-group" => GroupAction::Failover,
        other => {
            return Err(HwError::new(
                "SDRS.0206",
                format!("unknown action '{}'", truncate(other, 64)),
            ))
        }
    };
    check_id(&id, "SDRS.1013", "protection group")?;
    let cmd = SdrsCommand::GroupAction {
        id,
        project,
        action,
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

// ---------------------------------------------------------------------------------------
// Protected instances
// ---------------------------------------------------------------------------------------

fn parse_tags(m: &Map<String, Value>) -> HwResult<Vec<Tag>> {
    let bad = |why: &str| HwError::new("SDRS.0201", format!("invalid tags: {why}"));
    match m.get("tags") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for t in items {
                let o = t.as_object().ok_or_else(|| bad("each tag is an object"))?;
                let key = o
                    .get("key")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("key is required"))?;
                let value = match o.get("value") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => return Err(bad("value is required")),
                    Some(_) => return Err(bad("value must be a string")),
                };
                out.push(Tag {
                    key: key.to_string(),
                    value,
                });
            }
            sdrs::validate_tags(&out).map_err(|e| bad(&e.to_string()))?;
            Ok(out)
        }
        Some(_) => Err(bad("tags must be a list")),
    }
}

async fn create_instance(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let project = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let m = wrapper(&body, "protected_instance")?;
    let group_id = req_str(m, "server_group_id", "SDRS.0207")?;
    let server_id = req_str(m, "server_id", "SDRS.0210")?;
    let name = req_str(m, "name", "SDRS.0202")?;
    check_name(&name)?;
    let description = opt_str(m, "description", "SDRS.0212")?;
    check_description(&description)?;
    let subnet = opt_str(m, "primary_subnet_id", "SDRS.0201")?;
    let ip = opt_str(m, "primary_ip_address", "SDRS.0219")?;
    if let Some(ip) = &ip {
        if ip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(HwError::new(
                "SDRS.0219",
                format!(
                    "primary_ip_address '{}' is not an IPv4 address",
                    truncate(ip, 64)
                ),
            ));
        }
    }
    let flavor_ref = opt_str(m, "flavorRef", "SDRS.0201")?;
    let cluster_id = opt_str(m, "cluster_id", "SDRS.0218")?;
    let tenancy = opt_str(m, "tenancy", "SDRS.0228")?;
    if let Some(t) = &tenancy {
        if t != "shared" && t != "dedicated" {
            return Err(HwError::new(
                "SDRS.0228",
                format!(
                    "tenancy '{}' is not 'shared' or 'dedicated'",
                    truncate(t, 32)
                ),
            ));
        }
    }
    let dedicated_host_id = opt_str(m, "dedicated_host_id", "SDRS.1372")?;
    if tenancy.as_deref() != Some("dedicated") && dedicated_host_id.is_some() {
        return Err(HwError::new(
            "SDRS.1371",
            "dedicated_host_id needs tenancy 'dedicated'",
        ));
    }
    if let Some(h) = &dedicated_host_id {
        drplane_statemachine::inventory::validate_host_name("dedicated_host_id", h).map_err(
            |_| {
                HwError::new(
                    "SDRS.1372",
                    format!("dedicated host '{}' not found", truncate(h, 64)),
                )
            },
        )?;
    }
    let tags = parse_tags(m)?;
    check_id(&group_id, "SDRS.1013", "protection group")?;
    check_id(&server_id, "SDRS.1326", "server")?;
    // One (pair, DR volume) id per disk of the server (re-checked in the command).
    barrier(&st, Fam::Sdrs).await?;
    let sid = server_id.clone();
    let disks = read(&st, Fam::Sdrs, "server read", move |s| {
        Ok(s.get_server(&sid)?.map_or(0, |x| x.disks.len()))
    })
    .await?;
    let pair_ids = (0..disks.max(1))
        .map(|_| (new_uuid(), new_uuid()))
        .collect();
    let cmd = SdrsCommand::CreateInstance(Box::new(NewInstance {
        id: new_uuid(),
        project,
        group_id,
        server_id,
        name,
        description,
        flavor_ref,
        primary_subnet_id: subnet,
        primary_ip_address: ip,
        tenancy,
        dedicated_host_id,
        cluster_id,
        tags,
        dr_server_id: new_uuid(),
        pair_ids,
        job_id: new_job_id(),
    }));
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

async fn list_instances(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> HwResult<Json<Value>> {
    let project = path_or(Fam::Sdrs, p)?;
    let q = query_or(q)?;
    let pg = page(&q)?;
    let status = status_filter(&q)?;
    let groups = match id_list(&q, "server_group_ids")? {
        Some(ids) => Some(ids),
        None => q
            .get("server_group_id")
            .filter(|s| !s.is_empty())
            .map(|g| vec![g.clone()]),
    };
    let ids = if groups.is_some() {
        None
    } else {
        id_list(&q, "protected_instance_ids")?
    };
    let name = q.get("name").cloned().filter(|s| !s.is_empty());
    let az = q
        .get("availability_zone")
        .cloned()
        .filter(|s| !s.is_empty());
    let abnormal = q.get("query_type").is_some_and(|t| t == "status_abnormal");
    barrier(&st, Fam::Sdrs).await?;
    let out = read(&st, Fam::Sdrs, "instance listing", move |store| {
        let mut items = store.sdrs_instances(&project)?;
        let mut zones: BTreeMap<String, String> = BTreeMap::new();
        if az.is_some() {
            for g in store.sdrs_groups(&project)? {
                zones.insert(g.id.clone(), g.production_az().to_string());
            }
        }
        items.retain(|i| {
            groups.as_ref().is_none_or(|gs| gs.contains(&i.group_id))
                && ids.as_ref().is_none_or(|xs| xs.contains(&i.id))
                && status.is_none_or(|s| i.status == s)
                && name.as_deref().is_none_or(|n| i.name.contains(n))
                && az
                    .as_deref()
                    .is_none_or(|a| zones.get(&i.group_id).is_some_and(|z| z == a))
                && (!abnormal || i.status.is_error())
        });
        items.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(a.id.cmp(&b.id)));
        let (count, items) = paged(items, &pg);
        let mut views = Vec::with_capacity(items.len());
        for i in &items {
            views.push(instance_view(store, i)?);
        }
        Ok((count, views))
    })
    .await?;
    Ok(Json(json!({"protected_instances": out.1, "count": out.0})))
}

async fn visible_instance(st: &AppState, project: &str, id: &str) -> HwResult<sdrs::Instance> {
    check_id(id, "SDRS.1320", "protected instance")?;
    barrier(st, Fam::Sdrs).await?;
    let (p, i) = (project.to_string(), id.to_string());
    read(st, Fam::Sdrs, "instance read", move |s| {
        Ok(s.sdrs_instance(&i)?.filter(|x| x.project == p))
    })
    .await?
    .ok_or_else(|| HwError::new("SDRS.1320", format!("protected instance '{id}' not found")))
}

async fn show_instance(
    State(st): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let i = visible_instance(&st, &project, &id).await?;
    let v = read(&st, Fam::Sdrs, "instance view", move |s| {
        instance_view(s, &i)
    })
    .await?;
    Ok(Json(json!({ "protected_instance": v })))
}

async fn rename_instance(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let m = wrapper(&body, "protected_instance")?;
    let name = req_str(m, "name", "SDRS.0202")?;
    check_name(&name)?;
    check_id(&id, "SDRS.1320", "protected instance")?;
    match propose(
        &st,
        Fam::Sdrs,
        &headers,
        SdrsCommand::RenameInstance { id, project, name },
    )
    .await?
    {
        SdrsOutcome::Instance(i) => {
            let v = read(&st, Fam::Sdrs, "instance view", move |s| {
                instance_view(s, &i)
            })
            .await?;
            Ok(Json(json!({ "protected_instance": v })))
        }
        other => Err(HwError::from_api(
            Fam::Sdrs,
            ApiError::internal(format!("rename produced {other:?}")),
        )),
    }
}

async fn delete_instance(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let empty = Map::new();
    let m = match &body {
        Value::Null => &empty,
        Value::Object(o) => o,
        _ => return Err(HwError::new("SDRS.0201", "the body must be a JSON object")),
    };
    let delete_target_server = opt_bool(m, "delete_target_server", "SDRS.0201")?.unwrap_or(false);
    // EIPs are not modelled: the flag is accepted and has nothing to release.
    opt_bool(m, "delete_target_eip", "SDRS.0201")?;
    check_id(&id, "SDRS.1320", "protected instance")?;
    let cmd = SdrsCommand::DeleteInstance {
        id,
        project,
        delete_target_server,
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

async fn attach_pair(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let m = wrapper(&body, "replicationAttachment")?;
    let pair = req_str(m, "replication_id", "SDRS.0213")?;
    let device = req_str(m, "device", "SDRS.0201")?;
    sdrs::validate_device(&device).map_err(|e| HwError::new("SDRS.0201", e.to_string()))?;
    check_id(&id, "SDRS.1320", "protected instance")?;
    check_id(&pair, "SDRS.1608", "replication pair")?;
    let cmd = SdrsCommand::AttachPair {
        instance: id,
        project,
        pair,
        device,
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

async fn detach_pair(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String, String)>, PathRejection>,
) -> HwResult<Json<Value>> {
    let (project, id, pair) = path_or(Fam::Sdrs, p)?;
    check_id(&id, "SDRS.1320", "protected instance")?;
    check_id(&pair, "SDRS.1608", "replication pair")?;
    let cmd = SdrsCommand::DetachPair {
        instance: id,
        project,
        pair,
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

// ---------------------------------------------------------------------------------------
// Replication pairs
// ---------------------------------------------------------------------------------------

async fn create_pair(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let project = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let m = wrapper(&body, "replication")?;
    let group_id = req_str(m, "server_group_id", "SDRS.0207")?;
    let volume_id = req_str(m, "volume_id", "SDRS.0211")?;
    let name = req_str(m, "name", "SDRS.0202")?;
    check_name(&name)?;
    let description = opt_str(m, "description", "SDRS.0212")?;
    check_description(&description)?;
    opt_str(m, "cluster_id", "SDRS.0218")?;
    check_id(&group_id, "SDRS.1013", "protection group")?;
    validate_id("volume_id", &volume_id).map_err(|_| {
        HwError::new(
            "SDRS.0211",
            format!("volume '{}' not found", truncate(&volume_id, 64)),
        )
    })?;
    let cmd = SdrsCommand::CreatePair(Box::new(NewSdrsPair {
        id: new_uuid(),
        project,
        group_id,
        volume_id,
        dr_volume_id: new_uuid(),
        name,
        description,
        job_id: new_job_id(),
    }));
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

async fn list_pairs(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> HwResult<Json<Value>> {
    let project = path_or(Fam::Sdrs, p)?;
    let q = query_or(q)?;
    let pg = page(&q)?;
    let status = status_filter(&q)?;
    let groups = match id_list(&q, "server_group_ids")? {
        Some(ids) => Some(ids),
        None => q
            .get("server_group_id")
            .filter(|s| !s.is_empty())
            .map(|g| vec![g.clone()]),
    };
    let instances = match id_list(&q, "protected_instance_ids")? {
        Some(ids) => Some(ids),
        None => q
            .get("protected_instance_id")
            .filter(|s| !s.is_empty())
            .map(|g| vec![g.clone()]),
    };
    let name = q.get("name").cloned().filter(|s| !s.is_empty());
    let volume = q.get("volume_id").cloned().filter(|s| !s.is_empty());
    let az = q
        .get("availability_zone")
        .cloned()
        .filter(|s| !s.is_empty());
    let abnormal = q.get("query_type").is_some_and(|t| t == "status_abnormal");
    barrier(&st, Fam::Sdrs).await?;
    let now = crate::auth::now_ms();
    let out = read(&st, Fam::Sdrs, "pair listing", move |store| {
        let mut items = store.sdrs_pairs(&project)?;
        let mut zones: BTreeMap<String, String> = BTreeMap::new();
        if az.is_some() {
            for g in store.sdrs_groups(&project)? {
                zones.insert(g.id.clone(), g.production_az().to_string());
            }
        }
        items.retain(|p| {
            groups.as_ref().is_none_or(|gs| gs.contains(&p.group_id))
                && instances
                    .as_ref()
                    .is_none_or(|xs| p.attachment.as_ref().is_some_and(|(pi, _)| xs.contains(pi)))
                && status.is_none_or(|s| p.status == s)
                && name.as_deref().is_none_or(|n| p.name.contains(n))
                && volume
                    .as_deref()
                    .is_none_or(|v| p.source_volume == v || p.target_volume == v)
                && az
                    .as_deref()
                    .is_none_or(|a| zones.get(&p.group_id).is_some_and(|z| z == a))
                && (!abnormal || p.status.is_error())
        });
        items.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(a.id.cmp(&b.id)));
        let (count, items) = paged(items, &pg);
        let mut views = Vec::with_capacity(items.len());
        for p in &items {
            views.push(pair_view(store, p, now)?);
        }
        Ok((count, views))
    })
    .await?;
    Ok(Json(json!({"replications": out.1, "count": out.0})))
}

async fn show_pair(
    State(st): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    check_id(&id, "SDRS.1608", "replication pair")?;
    barrier(&st, Fam::Sdrs).await?;
    let now = crate::auth::now_ms();
    let i2 = id.clone();
    let v = read(&st, Fam::Sdrs, "pair view", move |s| {
        match s.sdrs_pair(&i2)? {
            Some(p) if p.project == project => Ok(Some(pair_view(s, &p, now)?)),
            _ => Ok(None),
        }
    })
    .await?
    .ok_or_else(|| HwError::new("SDRS.1608", format!("replication pair '{id}' not found")))?;
    Ok(Json(json!({ "replication": v })))
}

async fn delete_pair(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let body = body_json(Fam::Sdrs, b)?;
    let (group_id, delete_target_volume) = match &body {
        Value::Null => (None, false),
        Value::Object(o) => match o.get("replication") {
            None | Some(Value::Null) => (None, false),
            Some(Value::Object(m)) => (
                opt_str(m, "server_group_id", "SDRS.0207")?,
                opt_bool(m, "delete_target_volume", "SDRS.0201")?.unwrap_or(false),
            ),
            Some(_) => return Err(HwError::new("SDRS.0201", "'replication' must be an object")),
        },
        _ => return Err(HwError::new("SDRS.0201", "the body must be a JSON object")),
    };
    check_id(&id, "SDRS.1608", "replication pair")?;
    if let Some(g) = &group_id {
        check_id(g, "SDRS.0207", "protection group")?;
    }
    let cmd = SdrsCommand::DeletePair {
        id,
        project,
        group_id,
        delete_target_volume,
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Sdrs, &headers, cmd).await
}

// ---------------------------------------------------------------------------------------
// SDRS-JOB-SHOW = ECS-JOB-SHOW
// ---------------------------------------------------------------------------------------

async fn show_job(
    State(st): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Sdrs, p)?;
    let missing = || {
        HwError::new(
            "SDRS.0408",
            format!("job '{}' not found", truncate(&id, 64)),
        )
        .with_status(StatusCode::NOT_FOUND)
    };
    if validate_id("job_id", &id).is_err() {
        return Err(missing());
    }
    barrier(&st, Fam::Sdrs).await?;
    let i2 = id.clone();
    let v = read(&st, Fam::Sdrs, "job view", move |s| {
        match s.get_job(&i2)? {
            Some(j) if j.project == project => Ok(Some(job_view(s, &j, 0)?)),
            _ => Ok(None),
        }
    })
    .await?;
    v.map(Json).ok_or_else(missing)
}

// ---------------------------------------------------------------------------------------
// ECS
// ---------------------------------------------------------------------------------------

fn ecs_server_view(store: &Store, s: &Server) -> Result<Value, drplane_statemachine::StoreError> {
    let host = store.get_host(&s.host)?;
    let ecs = store.ecs_server(&s.id)?;
    let (vm_state, power, task_state) = match s.status {
        ServerStatus::Active => ("active", 1, Value::Null),
        ServerStatus::Shutoff => ("stopped", 4, Value::Null),
        ServerStatus::Build => ("building", 0, json!("spawning")),
        ServerStatus::Migrating => ("stopped", 4, json!("resize_migrating")),
        ServerStatus::Reboot => ("active", 1, json!("rebooting")),
        ServerStatus::Error => ("error", 0, Value::Null),
    };
    let host_status = match &host {
        Some(h) if h.is_online() => "UP",
        Some(_) => "DOWN",
        None => "UNKNOWN",
    };
    let hints = match &ecs.dedicated_host {
        Some(d) => json!({"tenancy": ["dedicated"], "dedicated_host_id": [d]}),
        None => json!({}),
    };
    let protected_by = store.sdrs_instance_of_server(&s.id)?;
    let created = format_rfc3339_ms(s.created_at_ms);
    let updated = format_rfc3339_ms(s.updated_at_ms);
    let secs = |t: &str| format!("{}Z", t.get(..19).unwrap_or(t));
    Ok(json!({
        "id": s.id,
        "name": s.name,
        "status": server_status_name(s.status),
        "OS-EXT-STS:vm_state": vm_state,
        "OS-EXT-STS:task_state": task_state,
        "OS-EXT-STS:power_state": power,
        "OS-EXT-AZ:availability_zone": host.as_ref().map(|h| h.site.clone()),
        "OS-EXT-SRV-ATTR:host": s.host,
        "hostId": hex::encode(&Sha256::digest(s.host.as_bytes())[..14]),
        "host_status": host_status,
        "flavor": {
            "id": format!("c{}m{}", s.flavor.vcpus, s.flavor.ram_mb),
            "name": format!("c{}m{}", s.flavor.vcpus, s.flavor.ram_mb),
            "vcpus": s.flavor.vcpus.to_string(),
            "ram": s.flavor.ram_mb.to_string(),
            "disk": (s.disks.first().map_or(0, |d| d.size_bytes).div_ceil(1 << 30)).to_string(),
        },
        "metadata": {"charging_mode": "0"},
        "os:scheduler_hints": hints,
        "os-extended-volumes:volumes_attached": s.disks.iter().enumerate().map(|(n, d)| json!({
            "id": d.id, "device": format!("/dev/vd{}", (b'a' + (n % 26) as u8) as char), "bootIndex": if n == 0 { "0" } else { "-1" },
        })).collect::<Vec<_>>(),
        "locked": false,
        "created": secs(&created),
        "updated": secs(&updated),
        "tenant_id": s.project,
        "sdrs_protected_instance_id": protected_by,
    }))
}

async fn ecs_show_server(
    State(st): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Ecs, p)?;
    let missing =
        || HwError::new("Ecs.0114", "The ECS does not exist.").with_status(StatusCode::NOT_FOUND);
    if validate_id("server_id", &id).is_err() {
        return Err(missing());
    }
    barrier(&st, Fam::Ecs).await?;
    let v = read(&st, Fam::Ecs, "server view", move |s| {
        match s.get_server(&id)? {
            Some(x) if x.project == project => Ok(Some(ecs_server_view(s, &x)?)),
            _ => Ok(None),
        }
    })
    .await?;
    v.map(|v| Json(json!({ "server": v }))).ok_or_else(missing)
}

async fn ecs_migrate(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let (project, id) = path_or(Fam::Ecs, p)?;
    let body = body_json(Fam::Ecs, b)?;
    // README decision 9: a missing `migrate` (the Python SDK drops nulls) is `migrate: null`.
    let dedicated_host = match &body {
        Value::Null => None,
        Value::Object(o) => match o.get("migrate") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => match m.get("dedicated_host_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(_) => {
                    return Err(HwError::new(
                        "Ecs.0005",
                        "migrate.dedicated_host_id must be a non-empty string",
                    ))
                }
            },
            Some(_) => {
                return Err(HwError::new(
                    "Ecs.0005",
                    "'migrate' must be an object or null",
                ))
            }
        },
        _ => return Err(HwError::new("Ecs.0005", "the body must be a JSON object")),
    };
    if validate_id("server_id", &id).is_err() {
        return Err(
            HwError::new("Ecs.0114", "The ECS does not exist.").with_status(StatusCode::NOT_FOUND)
        );
    }
    if let Some(d) = &dedicated_host {
        drplane_statemachine::inventory::validate_host_name("dedicated_host_id", d).map_err(
            |_| {
                HwError::new(
                    "Ecs.0000",
                    format!("dedicated host '{}' not found", truncate(d, 64)),
                )
            },
        )?;
    }
    let cmd = SdrsCommand::Migrate {
        server: id,
        project,
        dedicated_host,
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Ecs, &headers, cmd).await
}

async fn ecs_server_action(
    State(st): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> HwResult<Json<Value>> {
    let project = path_or(Fam::Ecs, p)?;
    let body = body_json(Fam::Ecs, b)?;
    let bad = |m: &str| HwError::new("Ecs.0005", m.to_string());
    let stop = body
        .get("os-stop")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            bad("the body must hold an 'os-stop' object (the only batch action served)")
        })?;
    match stop.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "SOFT" || t == "HARD" => {}
        Some(_) => return Err(bad("os-stop.type must be SOFT or HARD")),
    }
    let list = stop
        .get("servers")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("os-stop.servers must be a list of {\"id\": …}"))?;
    let mut servers = Vec::new();
    for s in list {
        let id = s
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("each of os-stop.servers needs an 'id' string"))?;
        if validate_id("id", id).is_err() {
            return Err(HwError::new(
                "Ecs.0114",
                format!("The ECS '{}' does not exist.", truncate(id, 64)),
            )
            .with_status(StatusCode::NOT_FOUND));
        }
        servers.push(id.to_string());
    }
    if servers.is_empty() || servers.len() > sdrs::STOP_SERVERS_MAX {
        return Err(bad("os-stop.servers must list 1 to 1000 servers"));
    }
    let cmd = SdrsCommand::StopServers {
        project,
        servers,
        job_id: new_job_id(),
    };
    propose_job(&st, Fam::Ecs, &headers, cmd).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_each_objects_format() {
        let ms = 1_557_000_000_123;
        assert_eq!(ts_space(ms), "2019-05-04 20:00:00.123");
        assert_eq!(ts_micro(ms), "2019-05-04T20:00:00.123000");
        assert_eq!(ts_job(ms), "2019-05-04T20:00:00.123Z");
    }

    #[test]
    fn id_lists_accept_both_quote_styles() {
        let mut q = BTreeMap::new();
        q.insert("ids".to_string(), "['a','b']".to_string());
        assert_eq!(
            id_list(&q, "ids").ok().flatten(),
            Some(vec!["a".into(), "b".into()])
        );
        q.insert("ids".to_string(), "[\"a\", \"b\"]".to_string());
        assert_eq!(
            id_list(&q, "ids").ok().flatten(),
            Some(vec!["a".into(), "b".into()])
        );
        let many: Vec<String> = (0..31).map(|n| format!("'{n}'")).collect();
        q.insert("ids".to_string(), format!("[{}]", many.join(",")));
        assert_eq!(
            id_list(&q, "ids").err().map(|e| e.code),
            Some("SDRS.0226".to_string())
        );
    }

    #[test]
    fn paging_rules() {
        let mut q = BTreeMap::new();
        q.insert("limit".to_string(), "1001".to_string());
        assert_eq!(
            page(&q).err().map(|e| e.code),
            Some("SDRS.0221".to_string())
        );
        q.insert("limit".to_string(), "0".to_string());
        q.insert("offset".to_string(), "-1".to_string());
        assert_eq!(
            page(&q).err().map(|e| e.code),
            Some("SDRS.0222".to_string())
        );
    }

    #[test]
    fn refusals_keep_their_documented_code() {
        let e = HwError::from_command(
            Fam::Sdrs,
            CommandError::Conflict("SDRS.1305 already protected".into()),
        );
        assert_eq!(
            (e.code.as_str(), e.status),
            ("SDRS.1305", StatusCode::BAD_REQUEST)
        );
        let e = HwError::from_command(Fam::Ecs, CommandError::Conflict("Ecs.0114 gone".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e = HwError::from_command(Fam::Sdrs, CommandError::invalid("name", "bad"));
        assert_eq!(e.code, "SDRS.0202");
    }
}
