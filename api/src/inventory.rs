//! The native inventory API: hosts and the workloads on them. Admin only (the inventory
//! is the cloud's; projects see their workloads through the API families).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /drplane/v1/hosts` | every host: `name, site, state, driver, last_heartbeat` (RFC 3339 or null), capacity, allocation, reservations, what is still available |
//! | `GET /drplane/v1/hosts/{name}` | one host |
//! | `PUT /drplane/v1/hosts/{name}` | register a host by hand (an idempotent upsert, as an agent's registration); its site must exist |
//! | `DELETE /drplane/v1/hosts/{name}` | a host without workloads, assigned tasks or reservations |
//! | `GET/POST /drplane/v1/servers`, `GET/DELETE /drplane/v1/servers/{id}` | servers (`?project=&host=` filters); POST registers (upsert by `id`, generated when absent) |
//! | same for `/drplane/v1/shares` and `/drplane/v1/databases` | file shares, database instances |
//!
//! Reads are linearizable unless `?consistency=stale`. Writes accept `Idempotency-Key`.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::inventory::{
    validate_host_name, validate_id, Capacity, DatabaseInstance, DatabaseStatus, Datastore, Disk,
    Driver, Flavor, Host, HostRegistration, HostState, InventoryCommand, Server, ServerStatus,
    Share, ShareStatus, StoragePool, Volume, Workload, WorkloadFilter, WorkloadKind,
};
use drplane_statemachine::{Command, CommandError, Proposal};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::control::Consistency;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::routes::{idempotency_key, read_barrier, AppState, ReadQuery};
use crate::time::format_rfc3339_ms;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/drplane/v1/hosts", get(list_hosts))
        .route(
            "/drplane/v1/hosts/{name}",
            get(show_host).put(put_host).delete(delete_host),
        )
        .route("/drplane/v1/servers", get(list_servers).post(create_server))
        .route(
            "/drplane/v1/servers/{id}",
            get(show_server).delete(delete_server),
        )
        .route("/drplane/v1/shares", get(list_shares).post(create_share))
        .route(
            "/drplane/v1/shares/{id}",
            get(show_share).delete(delete_share),
        )
        .route(
            "/drplane/v1/databases",
            get(list_databases).post(create_database),
        )
        .route(
            "/drplane/v1/databases/{id}",
            get(show_database).delete(delete_database),
        )
}

// ---- shared by the native domain modules (`inventory`, `jobs`) ----

/// Validates, proposes, and returns the state machine's answer unmapped, so the handler
/// can pick a precise code for a refusal.
pub(crate) async fn propose_command(
    st: &AppState,
    headers: &HeaderMap,
    command: Command,
) -> Result<Result<Outcome, CommandError>, ApiError> {
    command.validate()?;
    let request_id = idempotency_key(headers)?;
    Ok(st
        .cp
        .propose(Proposal {
            request_id,
            command,
        })
        .await?)
}

/// Maps a refusal: a `NotFound` of another kind than `subject` is a missing reference
/// (`DRP-3005`, 409), not a missing subject (404).
pub(crate) fn refusal(e: CommandError, subject: &str) -> ApiError {
    match &e {
        CommandError::NotFound { kind, .. } if kind != subject => {
            ApiError::new(ErrorCode::ReferenceNotFound, e.to_string())
        }
        _ => e.into(),
    }
}

/// Runs a blocking store read off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, drplane_statemachine::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("{what} task failed: {e}")))?
        .map_err(ApiError::from)
}

pub(crate) fn not_found(kind: &str, id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::ResourceNotFound,
        format!("{kind} '{}' not found", crate::extract::truncate(id, 128)),
    )
}

pub(crate) fn unexpected(what: &str, outcome: &Outcome) -> ApiError {
    ApiError::internal(format!("{what} produced {outcome:?}"))
}

fn created(location: String, body: Value) -> Result<Response, ApiError> {
    let location = HeaderValue::from_str(&location)
        .map_err(|e| ApiError::internal(format!("location not a header value: {e}")))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

fn ts(ms: u64) -> String {
    format_rfc3339_ms(ms)
}

// ---- hosts ----

fn host_view(h: &Host) -> Value {
    let reserved = h.reserved();
    let available = h.available();
    let reservations: Vec<Value> = h
        .reservations
        .iter()
        .map(|(holder, r)| {
            json!({
                "holder": holder,
                "vcpus": r.resources.vcpus,
                "ram_mb": r.resources.ram_mb,
                "pool_bytes": r.resources.pool_bytes,
                "created_at": ts(r.created_at_ms),
            })
        })
        .collect();
    json!({
        "name": h.name,
        "site": h.site,
        "state": h.state,
        "driver": h.driver,
        "agent_address": h.agent_address,
        "last_heartbeat": h.last_heartbeat_ms.map(ts),
        "registered_at": ts(h.registered_at_ms),
        "updated_at": ts(h.updated_at_ms),
        "capacity": {
            "vcpus": h.capacity.vcpus,
            "ram_mb": h.capacity.ram_mb,
            "storage_pools": h.capacity.pools.iter().map(|p| json!({
                "name": p.name,
                "total_bytes": p.total_bytes,
                "free_bytes": p.free_bytes,
            })).collect::<Vec<_>>(),
        },
        "allocated": {"vcpus": h.allocated.vcpus, "ram_mb": h.allocated.ram_mb},
        "reserved": {
            "vcpus": reserved.vcpus,
            "ram_mb": reserved.ram_mb,
            "pool_bytes": reserved.pool_bytes,
        },
        "available": {
            "vcpus": available.vcpus,
            "ram_mb": available.ram_mb,
            "pool_bytes": available.pool_bytes,
        },
        "reservations": reservations,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolBody {
    name: String,
    total_bytes: u64,
    free_bytes: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapacityBody {
    #[serde(default)]
    vcpus: u32,
    #[serde(default)]
    ram_mb: u64,
    #[serde(default)]
    storage_pools: Vec<PoolBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutHostRequest {
    site: String,
    #[serde(default)]
    driver: Option<Driver>,
    #[serde(default)]
    agent_address: String,
    #[serde(default)]
    capacity: CapacityBody,
    /// `online` (heartbeats now), `offline`, or absent (unchanged; new hosts: offline).
    #[serde(default)]
    state: Option<HostState>,
}

async fn list_hosts(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    read_barrier(&st, query).await?;
    let store = st.cp.store().clone();
    let hosts = blocking("host listing", move || store.list_hosts()).await?;
    Ok(Json(
        json!({ "hosts": hosts.iter().map(host_view).collect::<Vec<_>>() }),
    ))
}

async fn show_host(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    validate_host_name("name", &name)?;
    read_barrier(&st, query).await?;
    match st.cp.store().get_host(&name)? {
        Some(h) => Ok(Json(host_view(&h))),
        None => Err(not_found("host", &name)),
    }
}

async fn put_host(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<PutHostRequest>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let reg = HostRegistration {
        name,
        site: req.site,
        driver: req.driver.unwrap_or(Driver::None),
        agent_address: req.agent_address,
        capacity: Capacity {
            vcpus: req.capacity.vcpus,
            ram_mb: req.capacity.ram_mb,
            pools: req
                .capacity
                .storage_pools
                .into_iter()
                .map(|p| StoragePool {
                    name: p.name,
                    total_bytes: p.total_bytes,
                    free_bytes: p.free_bytes,
                })
                .collect(),
        },
        state: req.state,
    };
    let command = Command::Inventory(InventoryCommand::RegisterHost(Box::new(reg)));
    match propose_command(&st, &headers, command).await? {
        Ok(Outcome::Host(h)) => Ok(Json(host_view(&h))),
        Ok(other) => Err(unexpected("register_host", &other)),
        Err(e) => Err(refusal(e, "host")),
    }
}

async fn delete_host(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let command = Command::Inventory(InventoryCommand::DeleteHost { name });
    match propose_command(&st, &headers, command).await? {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(CommandError::Conflict(m)) => Err(ApiError::new(ErrorCode::ResourceInUse, m)),
        Err(e) => Err(refusal(e, "host")),
    }
}

// ---- workloads ----

#[derive(Debug, Deserialize)]
struct WorkloadQuery {
    consistency: Option<Consistency>,
    project: Option<String>,
    host: Option<String>,
}

fn flavor_view(f: &Flavor) -> Value {
    json!({"vcpus": f.vcpus, "ram_mb": f.ram_mb})
}

fn workload_view(w: &Workload) -> Value {
    match w {
        Workload::Server(s) => json!({
            "id": s.id,
            "project": s.project,
            "name": s.name,
            "host": s.host,
            "status": s.status,
            "flavor": flavor_view(&s.flavor),
            "disks": s.disks.iter().map(|d| json!({
                "id": d.id,
                "size_bytes": d.size_bytes,
                "pool": d.pool,
                "path": d.path,
            })).collect::<Vec<_>>(),
            "created_at": ts(s.created_at_ms),
            "updated_at": ts(s.updated_at_ms),
        }),
        Workload::Share(s) => json!({
            "id": s.id,
            "project": s.project,
            "name": s.name,
            "host": s.host,
            "pool": s.pool,
            "size_bytes": s.size_bytes,
            "path": s.path,
            "status": s.status,
            "created_at": ts(s.created_at_ms),
            "updated_at": ts(s.updated_at_ms),
        }),
        Workload::Database(d) => json!({
            "id": d.id,
            "project": d.project,
            "name": d.name,
            "host": d.host,
            "status": d.status,
            "flavor": flavor_view(&d.flavor),
            "volume": {
                "id": d.volume.id,
                "size_bytes": d.volume.size_bytes,
                "pool": d.volume.pool,
                "path": d.volume.path,
            },
            "datastore": d.datastore,
            "created_at": ts(d.created_at_ms),
            "updated_at": ts(d.updated_at_ms),
        }),
    }
}

fn plural(kind: WorkloadKind) -> &'static str {
    match kind {
        WorkloadKind::Server => "servers",
        WorkloadKind::Share => "shares",
        WorkloadKind::Database => "databases",
    }
}

async fn list_workloads(
    st: AppState,
    caller: Caller,
    kind: WorkloadKind,
    query: WorkloadQuery,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    read_barrier(
        &st,
        ReadQuery {
            consistency: query.consistency,
        },
    )
    .await?;
    let filter = WorkloadFilter {
        project: query.project,
        host: query.host,
    };
    let store = st.cp.store().clone();
    let items = blocking("workload listing", move || {
        store.list_workloads(kind, &filter)
    })
    .await?;
    let mut body = serde_json::Map::new();
    body.insert(
        plural(kind).to_string(),
        Value::Array(items.iter().map(workload_view).collect()),
    );
    Ok(Json(Value::Object(body)))
}

async fn show_workload(
    st: AppState,
    caller: Caller,
    kind: WorkloadKind,
    id: String,
    query: ReadQuery,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    validate_id("id", &id)?;
    read_barrier(&st, query).await?;
    match st.cp.store().get_workload(kind, &id)? {
        Some(w) => Ok(Json(workload_view(&w))),
        None => Err(not_found(kind.as_str(), &id)),
    }
}

async fn register_workload(
    st: AppState,
    caller: Caller,
    headers: HeaderMap,
    workload: Workload,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let kind = workload.kind();
    let command = Command::Inventory(InventoryCommand::RegisterWorkloads {
        workloads: vec![workload],
    });
    match propose_command(&st, &headers, command).await? {
        Ok(Outcome::Workloads(ws)) if ws.len() == 1 => created(
            format!("/drplane/v1/{}/{}", plural(kind), ws[0].id()),
            workload_view(&ws[0]),
        ),
        Ok(other) => Err(unexpected("register_workloads", &other)),
        Err(e) => Err(refusal(e, kind.as_str())),
    }
}

async fn delete_workload(
    st: AppState,
    caller: Caller,
    headers: HeaderMap,
    kind: WorkloadKind,
    id: String,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let command = Command::Inventory(InventoryCommand::DeleteWorkload { kind, id });
    match propose_command(&st, &headers, command).await? {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(refusal(e, kind.as_str())),
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlavorBody {
    vcpus: u32,
    ram_mb: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskBody {
    id: Option<String>,
    size_bytes: u64,
    pool: String,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerBody {
    id: Option<String>,
    project: String,
    name: String,
    host: String,
    status: Option<ServerStatus>,
    flavor: FlavorBody,
    #[serde(default)]
    disks: Vec<DiskBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareBody {
    id: Option<String>,
    project: String,
    name: String,
    host: String,
    pool: String,
    size_bytes: u64,
    #[serde(default)]
    path: String,
    status: Option<ShareStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeBody {
    id: Option<String>,
    size_bytes: u64,
    pool: String,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatastoreBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    version: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseBody {
    id: Option<String>,
    project: String,
    name: String,
    host: String,
    status: Option<DatabaseStatus>,
    flavor: FlavorBody,
    volume: VolumeBody,
    datastore: DatastoreBody,
}

async fn list_servers(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<WorkloadQuery>,
) -> Result<Json<Value>, ApiError> {
    list_workloads(st, caller, WorkloadKind::Server, q).await
}

async fn show_server(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, ApiError> {
    show_workload(st, caller, WorkloadKind::Server, id, q).await
}

async fn delete_server(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    delete_workload(st, caller, headers, WorkloadKind::Server, id).await
}

async fn create_server(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(b): ApiJson<ServerBody>,
) -> Result<Response, ApiError> {
    let server = Server {
        id: b.id.unwrap_or_else(new_id),
        project: b.project,
        name: b.name,
        host: b.host,
        status: b.status.unwrap_or(ServerStatus::Active),
        flavor: Flavor {
            vcpus: b.flavor.vcpus,
            ram_mb: b.flavor.ram_mb,
        },
        disks: b
            .disks
            .into_iter()
            .map(|d| Disk {
                id: d.id.unwrap_or_else(new_id),
                size_bytes: d.size_bytes,
                pool: d.pool,
                path: d.path,
            })
            .collect(),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    register_workload(st, caller, headers, Workload::Server(server)).await
}

async fn list_shares(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<WorkloadQuery>,
) -> Result<Json<Value>, ApiError> {
    list_workloads(st, caller, WorkloadKind::Share, q).await
}

async fn show_share(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, ApiError> {
    show_workload(st, caller, WorkloadKind::Share, id, q).await
}

async fn delete_share(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    delete_workload(st, caller, headers, WorkloadKind::Share, id).await
}

async fn create_share(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(b): ApiJson<ShareBody>,
) -> Result<Response, ApiError> {
    let share = Share {
        id: b.id.unwrap_or_else(new_id),
        project: b.project,
        name: b.name,
        host: b.host,
        pool: b.pool,
        size_bytes: b.size_bytes,
        path: b.path,
        status: b.status.unwrap_or(ShareStatus::Available),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    register_workload(st, caller, headers, Workload::Share(share)).await
}

async fn list_databases(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<WorkloadQuery>,
) -> Result<Json<Value>, ApiError> {
    list_workloads(st, caller, WorkloadKind::Database, q).await
}

async fn show_database(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, ApiError> {
    show_workload(st, caller, WorkloadKind::Database, id, q).await
}

async fn delete_database(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    delete_workload(st, caller, headers, WorkloadKind::Database, id).await
}

async fn create_database(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(b): ApiJson<DatabaseBody>,
) -> Result<Response, ApiError> {
    let db = DatabaseInstance {
        id: b.id.unwrap_or_else(new_id),
        project: b.project,
        name: b.name,
        host: b.host,
        status: b.status.unwrap_or(DatabaseStatus::Active),
        volume: Volume {
            id: b.volume.id.unwrap_or_else(new_id),
            size_bytes: b.volume.size_bytes,
            pool: b.volume.pool,
            path: b.volume.path,
        },
        flavor: Flavor {
            vcpus: b.flavor.vcpus,
            ram_mb: b.flavor.ram_mb,
        },
        datastore: Datastore {
            kind: b.datastore.kind,
            version: b.datastore.version,
        },
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    register_workload(st, caller, headers, Workload::Database(db)).await
}
