//! The native replication-pair API (admin), over `statemachine::replication`.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /drplane/v1/pairs?project=&owner=&state=` | pairs with their replication status and RPO |
//! | `POST /drplane/v1/pairs` | create a pair: the target copy is created and fully synced by a job (`202` with the pair and `job_id`) |
//! | `GET /drplane/v1/pairs/{id}` | one pair |
//! | `PATCH /drplane/v1/pairs/{id}` | `enabled`, `sleep_time` (s), `bwlimit` (bytes/s, `null` removes it) |
//! | `POST /drplane/v1/pairs/{id}/actions` | `{"sync":{"full":false}}`, `{"failover":{"planned":true,"keep_replicating":false}}`, `{"reinit":{}}` (`202` with the job) |
//! | `DELETE /drplane/v1/pairs/{id}?delete_target=true` | delete the pair (and its target copy) by a job (`202`) |
//!
//! The API families use the same pairs through their own wire formats; this API is for
//! operators and tests. Reads are linearizable unless `?consistency=stale`; writes accept
//! `Idempotency-Key`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::inventory::validate_id;
use drplane_statemachine::jobs::{Job, VolumeLayout, VolumeRef};
use drplane_statemachine::replication::{
    NewPair, Pair, PairOp, ReplicationCommand, SLEEP_TIME_DEFAULT_S,
};
use drplane_statemachine::{Command, CommandError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::control::Consistency;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::inventory::{blocking, not_found, propose_command, refusal, unexpected};
use crate::routes::{read_barrier, AppState, ReadQuery};
use crate::time::format_rfc3339_ms;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/drplane/v1/pairs", get(list_pairs).post(create_pair))
        .route(
            "/drplane/v1/pairs/{id}",
            get(show_pair).patch(update_pair).delete(delete_pair),
        )
        .route("/drplane/v1/pairs/{id}/actions", post(pair_action))
}

fn volume_view(v: &VolumeRef) -> Value {
    json!({
        "host": v.host,
        "pool": v.pool,
        "volume_id": v.volume_id,
        "path": v.path,
        "size_bytes": v.size_bytes,
        "layout": v.layout,
    })
}

pub(crate) fn pair_view(p: &Pair, now_ms: u64) -> Value {
    json!({
        "id": p.id,
        "project": p.project,
        "owner": p.owner,
        "source": volume_view(&p.source),
        "target": volume_view(&p.target),
        "state": p.state.as_str(),
        "enabled": p.enabled,
        "sleep_time": p.sleep_time_s,
        "bwlimit": p.bwlimit_bytes_per_sec,
        "busy_job": p.busy_job,
        "operation": p.pending_op.as_ref().map(PairOp::name),
        "last_sync": p.last_sync_ms.map(format_rfc3339_ms),
        "recovery_point": p.recovery_point_ms.map(format_rfc3339_ms),
        "rpo_seconds": p.rpo_seconds(now_ms),
        "next_sync": p.next_sync_ms.map(format_rfc3339_ms),
        "bytes_sent_total": p.bytes_sent_total,
        "last_sync_bytes": p.last_sync_bytes,
        "syncs_ok": p.syncs_ok,
        "syncs_failed": p.syncs_failed,
        "last_error": p.last_error,
        "reinit_required": p.reinit_required,
        "created_at": format_rfc3339_ms(p.created_at_ms),
        "updated_at": format_rfc3339_ms(p.updated_at_ms),
    })
}

fn job_ref(j: &Job) -> Value {
    json!({
        "job_id": j.id,
        "type": j.job_type,
        "status": j.status.as_str(),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    project: Option<String>,
    owner: Option<String>,
    state: Option<String>,
    consistency: Option<Consistency>,
}

async fn list_pairs(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    read_barrier(
        &st,
        ReadQuery {
            consistency: q.consistency,
        },
    )
    .await?;
    let store = st.cp.store().clone();
    let pairs = blocking("pair listing", move || store.list_pairs()).await?;
    let now = now_ms();
    let list: Vec<Value> = pairs
        .iter()
        .filter(|p| q.project.as_ref().is_none_or(|v| &p.project == v))
        .filter(|p| q.owner.as_ref().is_none_or(|v| &p.owner == v))
        .filter(|p| q.state.as_ref().is_none_or(|v| p.state.as_str() == v))
        .map(|p| pair_view(p, now))
        .collect();
    Ok(Json(json!({ "pairs": list })))
}

async fn show_pair(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    validate_id("id", &id)?;
    read_barrier(&st, q).await?;
    let store = st.cp.store().clone();
    let key = id.clone();
    match blocking("pair read", move || store.get_pair(&key)).await? {
        Some(p) => Ok(Json(json!({ "pair": pair_view(&p, now_ms()) }))),
        None => Err(not_found("replication pair", &id)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceBody {
    host: String,
    pool: String,
    volume_id: String,
    #[serde(default)]
    path: String,
    size_bytes: u64,
    layout: VolumeLayout,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetBody {
    host: String,
    pool: String,
    /// Defaults to the source's volume id (the copy lives on another host).
    volume_id: Option<String>,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    id: Option<String>,
    project: String,
    owner: Option<String>,
    source: SourceBody,
    target: TargetBody,
    #[serde(default = "yes")]
    enabled: bool,
    sleep_time: Option<u32>,
    bwlimit: Option<u64>,
}

fn yes() -> bool {
    true
}

async fn create_pair(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(b): ApiJson<CreateBody>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let id = b.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let job_id = uuid::Uuid::new_v4().to_string();
    let pair = NewPair {
        id: id.clone(),
        project: b.project,
        owner: b.owner.unwrap_or_else(|| "native".to_string()),
        target: VolumeRef {
            host: b.target.host,
            pool: b.target.pool,
            volume_id: b
                .target
                .volume_id
                .unwrap_or_else(|| b.source.volume_id.clone()),
            path: b.target.path,
            size_bytes: b.source.size_bytes,
            layout: b.source.layout,
        },
        source: VolumeRef {
            host: b.source.host,
            pool: b.source.pool,
            volume_id: b.source.volume_id,
            path: b.source.path,
            size_bytes: b.source.size_bytes,
            layout: b.source.layout,
        },
        enabled: b.enabled,
        sleep_time_s: b.sleep_time.unwrap_or(SLEEP_TIME_DEFAULT_S),
        bwlimit_bytes_per_sec: b.bwlimit,
    };
    let command = Command::Replication(ReplicationCommand::Create {
        pair: Box::new(pair),
        job_id: job_id.clone(),
    });
    match propose_command(&st, &headers, command).await? {
        Ok(Outcome::Pair(p)) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "pair": pair_view(&p, now_ms()), "job_id": job_id })),
        )
            .into_response()),
        Ok(other) => Err(unexpected("create_pair", &other)),
        Err(e) => Err(refusal(e, "replication pair")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    enabled: Option<bool>,
    sleep_time: Option<u32>,
    /// Absent: unchanged; `null`: no limit.
    #[serde(default, deserialize_with = "explicit_null")]
    bwlimit: Option<Option<u64>>,
}

fn explicit_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Ok(Some(Option::<u64>::deserialize(d)?))
}

async fn update_pair(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<UpdateBody>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let command = Command::Replication(ReplicationCommand::Update {
        id,
        enabled: b.enabled,
        sleep_time_s: b.sleep_time,
        bwlimit_bytes_per_sec: b.bwlimit,
    });
    match propose_command(&st, &headers, command).await? {
        Ok(Outcome::Pair(p)) => Ok(Json(json!({ "pair": pair_view(&p, now_ms()) }))),
        Ok(other) => Err(unexpected("update_pair", &other)),
        Err(e) => Err(refusal(e, "replication pair")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncAction {
    #[serde(default)]
    full: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverAction {
    #[serde(default = "yes")]
    planned: bool,
    #[serde(default)]
    keep_replicating: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum ActionBody {
    Sync(SyncAction),
    Failover(FailoverAction),
    Reinit(Empty),
}

async fn operate(
    st: &AppState,
    headers: &HeaderMap,
    id: String,
    op: PairOp,
    job_type: &str,
) -> Result<Response, ApiError> {
    let command = Command::Replication(ReplicationCommand::Operate {
        id,
        op,
        job_id: uuid::Uuid::new_v4().to_string(),
        job_type: job_type.to_string(),
    });
    match propose_command(st, headers, command).await? {
        Ok(Outcome::Job(j)) => {
            Ok((StatusCode::ACCEPTED, Json(json!({ "job": job_ref(&j) }))).into_response())
        }
        Ok(other) => Err(unexpected("operate_pair", &other)),
        Err(e @ CommandError::Conflict(_)) => Err(ApiError::from(e)),
        Err(e) => Err(refusal(e, "replication pair")),
    }
}

async fn pair_action(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<ActionBody>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let (op, job_type) = match b {
        ActionBody::Sync(s) => (
            PairOp::Sync {
                full: s.full,
                periodic: false,
            },
            "syncReplicationPair",
        ),
        ActionBody::Failover(f) if f.planned => (
            PairOp::PlannedFailover {
                keep_replicating: f.keep_replicating,
            },
            "plannedFailoverReplicationPair",
        ),
        ActionBody::Failover(_) => (PairOp::UnplannedFailover, "failoverReplicationPair"),
        ActionBody::Reinit(_) => (PairOp::Reinit, "reinitReplicationPair"),
    };
    operate(&st, &headers, id, op, job_type).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    delete_target: bool,
}

async fn delete_pair(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    operate(
        &st,
        &headers,
        id,
        PairOp::Delete {
            delete_target: q.delete_target,
        },
        "deleteReplicationPair",
    )
    .await
}
