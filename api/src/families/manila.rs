//! OpenStack Manila share replicas (`/v2/{project_id}/…` and `/v2/…` from microversion
//! 2.60): the `MANILA-*` endpoints of `../shared/spec/manila.md`, as python-manilaclient
//! uses them. Translates the wire format into `drplane_statemachine::manila` commands and
//! back; holds no state of its own.
//!
//! | ID | method and path |
//! |---|---|
//! | MANILA-VERSIONS | `GET /`, `GET /v2`, `GET /v2/` (public) |
//! | MANILA-SR-CREATE | `POST /v2/{p}/share-replicas` |
//! | MANILA-SR-LIST | `GET /v2/{p}/share-replicas[?share_id=&limit=&offset=]` |
//! | MANILA-SR-LIST-DETAIL | `GET /v2/{p}/share-replicas/detail[?…]` |
//! | MANILA-SR-SHOW | `GET /v2/{p}/share-replicas/{id}` |
//! | MANILA-SR-DELETE | `DELETE /v2/{p}/share-replicas/{id}` |
//! | MANILA-SR-PROMOTE, -RESYNC, -RESET-STATUS, -RESET-REPLICA-STATE, -FORCE-DELETE | `POST /v2/{p}/share-replicas/{id}/action` |
//! | MANILA-SR-EXPORT-LIST | `GET /v2/{p}/share-replicas/{id}/export-locations[/{el_id}]` (≥ 2.47) |
//! | MANILA-SHARE-SHOW | `GET /v2/{p}/shares/{id}` |
//!
//! Plus drplane's own administration of a share's replication type (what Manila reads
//! from the share type): `GET`/`PUT /drplane/v1/manila/shares/{share_id}` with
//! `{"replication_type": "dr" | "readable" | "writable" | null}` (admin, native errors).
//!
//! Microversions: `X-OpenStack-Manila-API-Version` (or `OpenStack-API-Version:
//! shared-file-system 2.N`), absent = 2.0, `latest` = 2.95; outside 2.0–2.95 → 406;
//! malformed → 400. The replica routes need ≥ 2.11, and `X-OpenStack-Manila-API-Experimental:
//! True` below 2.56 (else 404, as upstream). Every answer under `/v2` echoes the version
//! (and `Vary`), and errors are Manila faults `{"<name>": {"code", "message"}}`.
//!
//! Policy: `resync`, `reset_status`, `reset_replica_state`, `force_delete` and the
//! `only_host` scheduler hint are admin-only (403); deleting the active replica answers
//! 409 (decision 5). Another project's share or replica answers 404 like a missing one.

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::inventory::Share;
use drplane_statemachine::manila::{
    replica_state, ManilaCommand, ManilaOutcome, ManilaShare, NewReplica, Replica, ReplicaState,
    ReplicaStatus, ReplicationType, FIELD_POLICY,
};
use drplane_statemachine::replication::Pair;
use drplane_statemachine::{Command, CommandError, Proposal, Store};
use serde_json::{json, Map, Value};

use crate::auth::{failure_response, AuthFailure, Caller, Family};
use crate::control::{ClusterError, Consistency};
use crate::error::{ApiError, ErrorCode};
use crate::extract::{truncate, ApiJson, ApiPath};
use crate::middleware::RequestId;
use crate::routes::{idempotency_key, AppState};
use crate::time::format_rfc3339_ms;

/// Oldest and newest microversions served (decision 6).
pub const MIN_VERSION: Version = Version(2, 0);
pub const MAX_VERSION: Version = Version(2, 95);
/// Largest page of the replica lists.
pub const PAGE_MAX: usize = 1000;

const VERSION_HEADER: HeaderName = HeaderName::from_static("x-openstack-manila-api-version");
const EXPERIMENTAL_HEADER: HeaderName =
    HeaderName::from_static("x-openstack-manila-api-experimental");
const OPENSTACK_API_VERSION: HeaderName = HeaderName::from_static("openstack-api-version");

/// This family's routes (merged into the node's router; authentication already ran).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        // MANILA-VERSIONS. `/` is also Trove's version document: it lists both families.
        .route("/", get(root_versions))
        .route("/v2", get(v2_versions))
        .route("/v2/", get(v2_versions))
        .route("/v2/{*rest}", any(dispatch))
        .route(
            "/drplane/v1/manila/shares/{share_id}",
            get(native_show).put(native_set),
        )
}

// ---------------------------------------------------------------------------------------
// Microversions
// ---------------------------------------------------------------------------------------

/// A microversion `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("latest") {
            return Some(MAX_VERSION);
        }
        let (a, b) = s.split_once('.')?;
        let num = |x: &str| {
            (!x.is_empty() && x.len() <= 4 && x.bytes().all(|c| c.is_ascii_digit()))
                .then(|| x.parse::<u32>().ok())
                .flatten()
        };
        Some(Version(num(a)?, num(b)?))
    }
}

/// What the request negotiated.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    version: Version,
    experimental: bool,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The microversion asked for, or the fault to answer.
fn negotiate(headers: &HeaderMap) -> Result<Negotiated, Fault> {
    let legacy = header_str(headers, &VERSION_HEADER);
    let modern = header_str(headers, &OPENSTACK_API_VERSION).and_then(|v| {
        let mut it = v.split_whitespace();
        match (it.next(), it.next()) {
            (Some(svc), Some(ver)) if svc.eq_ignore_ascii_case("shared-file-system") => Some(ver),
            _ => None,
        }
    });
    let version = match legacy.or(modern) {
        None => MIN_VERSION,
        Some(raw) => match Version::parse(raw) {
            Some(v) => v,
            None => {
                return Err(Fault::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "API Version String {} is of invalid format. Must be of format MajorNum.MinorNum.",
                        truncate(raw, 40)
                    ),
                ))
            }
        },
    };
    if version < MIN_VERSION || version > MAX_VERSION {
        return Err(Fault::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "Version {version} is not supported by the API. Minimum is {MIN_VERSION} and maximum is {MAX_VERSION}."
            ),
        ));
    }
    let experimental = header_str(headers, &EXPERIMENTAL_HEADER)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    Ok(Negotiated {
        version,
        experimental,
    })
}

/// Adds the version headers every `/v2` answer carries.
fn with_version(mut resp: Response, n: Option<Negotiated>, request_id: Option<&str>) -> Response {
    let h = resp.headers_mut();
    let v = n.map_or(MIN_VERSION, |n| n.version);
    if let Ok(val) = HeaderValue::from_str(&v.to_string()) {
        h.insert(VERSION_HEADER, val);
    }
    if let Ok(val) = HeaderValue::from_str(&format!("shared-file-system {v}")) {
        h.insert(OPENSTACK_API_VERSION, val);
    }
    h.insert(
        header::VARY,
        HeaderValue::from_static("X-OpenStack-Manila-API-Version"),
    );
    if n.is_some_and(|n| n.experimental) {
        h.insert(EXPERIMENTAL_HEADER, HeaderValue::from_static("True"));
    }
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        h.insert(HeaderName::from_static("x-compute-request-id"), id.clone());
        h.insert(HeaderName::from_static("x-openstack-request-id"), id);
    }
    resp
}

// ---------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------

/// A Manila fault: `{"<name>": {"code", "message"}}` (manila.md §1.4).
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl Fault {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Fault {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Fault::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Fault::new(StatusCode::NOT_FOUND, message)
    }

    /// The 404 of a route that does not exist (or not at this microversion).
    fn no_resource() -> Self {
        Fault::not_found("The resource could not be found.")
    }

    fn forbidden(rule: &str) -> Self {
        Fault::new(
            StatusCode::FORBIDDEN,
            format!("Policy doesn't allow {rule} to be performed."),
        )
    }

    fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(detail = %detail, "internal error");
        Fault::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the server log has the cause under this response's X-Request-Id",
        )
    }
}

impl IntoResponse for Fault {
    fn into_response(self) -> Response {
        let mut f = AuthFailure::status(self.status, self.message);
        if let Some(s) = self.retry_after {
            f = f.with_retry_after(s);
        }
        failure_response(Family::Manila, &f)
    }
}

impl From<ClusterError> for Fault {
    fn from(e: ClusterError) -> Self {
        let api = ApiError::from(e);
        if api.code == ErrorCode::Internal {
            return Fault::internal(api.message);
        }
        Fault {
            status: api.status,
            message: api.message,
            retry_after: api.retry_after_secs,
        }
    }
}

impl From<drplane_statemachine::StoreError> for Fault {
    fn from(e: drplane_statemachine::StoreError) -> Self {
        Fault::internal(format!("reading the state machine store: {e}"))
    }
}

/// A refusal of the state machine, in Manila's words.
fn refusal(e: CommandError, id: &str, deleting: bool) -> Fault {
    match e {
        CommandError::NotFound { kind, id: what } => match kind.as_str() {
            "share replica" if deleting => {
                Fault::not_found(format!("No replica exists with ID {id}."))
            }
            "share replica" => Fault::not_found(format!("Replica {id} not found.")),
            "share" => Fault::not_found(format!("No share exists with ID {what}.")),
            _ => Fault::bad(format!("{kind} {what} not found.")),
        },
        CommandError::Invalid { field, reason } if field == FIELD_POLICY => {
            Fault::new(StatusCode::FORBIDDEN, reason)
        }
        CommandError::Invalid { reason, .. } => Fault::bad(reason),
        CommandError::Conflict(m) => Fault::new(StatusCode::CONFLICT, m),
        CommandError::AlreadyExists { kind, id } => {
            Fault::new(StatusCode::CONFLICT, format!("{kind} {id} already exists."))
        }
    }
}

type FResult<T> = Result<T, Fault>;

// ---------------------------------------------------------------------------------------
// Version documents (MANILA-VERSIONS)
// ---------------------------------------------------------------------------------------

/// `scheme://host` as the client reached this node (only a plausible Host is echoed).
fn base_url(st: &AppState, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
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

fn manila_version_entry(base: &str) -> Value {
    json!({
        "id": "v2.0",
        "status": "CURRENT",
        "version": MAX_VERSION.to_string(),
        "min_version": MIN_VERSION.to_string(),
        "updated": "2015-08-27T11:33:21Z",
        "links": [
            {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"},
            {"rel": "self", "href": format!("{base}/v2/")},
        ],
        "media-types": [{
            "base": "application/json",
            "type": "application/vnd.openstack.share+json;version=1",
        }],
    })
}

/// TROVE-VERSIONS' entry (trove.md §6.1): `/` is shared by both OpenStack families.
fn trove_version_entry(base: &str) -> Value {
    json!({
        "id": "v1.0",
        "links": [{"href": format!("{base}/v1.0/"), "rel": "self"}],
        "status": "CURRENT",
        "updated": "2012-08-01T00:00:00Z",
    })
}

/// MANILA-VERSIONS (and TROVE-VERSIONS) at `/`: python-manilaclient takes the first
/// `CURRENT` entry that has a `version`, so Manila's comes first.
async fn root_versions(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let base = base_url(&st, &headers);
    Json(json!({"versions": [manila_version_entry(&base), trove_version_entry(&base)]}))
        .into_response()
}

/// MANILA-VERSIONS at `/v2` and `/v2/`.
async fn v2_versions(State(st): State<AppState>, req: Request) -> Response {
    let base = base_url(&st, req.headers());
    let n = negotiate(req.headers()).ok();
    let body = json!({"versions": [manila_version_entry(&base)]});
    with_version(Json(body).into_response(), n, request_id(&req).as_deref())
}

fn request_id(req: &Request) -> Option<String> {
    req.extensions().get::<RequestId>().map(|r| r.0.clone())
}

// ---------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------

/// Collections that may follow `/v2/` directly (≥ 2.60), as the auth layer knows them.
const COLLECTIONS: &[&str] = &[
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

/// Everything a handler needs about the request.
struct Ctx {
    st: AppState,
    caller: Caller,
    n: Negotiated,
    headers: HeaderMap,
    base: String,
    /// `/v2/{project_id}` or `/v2`, as the client spelled it (for links).
    prefix: String,
    query: BTreeMap<String, String>,
}

impl Ctx {
    fn admin(&self) -> bool {
        self.caller.is_admin()
    }

    /// The project a command acts for: `None` for an administrator (sees every project).
    fn scope(&self) -> Option<String> {
        (!self.admin()).then(|| self.caller.project_id.clone())
    }

    fn at_least(&self, v: Version) -> bool {
        self.n.version >= v
    }

    /// Replica routes: ≥ 2.11, experimental below 2.56.
    fn replicas_available(&self) -> bool {
        self.at_least(Version(2, 11)) && (self.at_least(Version(2, 56)) || self.n.experimental)
    }

    fn require_admin(&self, rule: &str) -> FResult<()> {
        if self.admin() {
            Ok(())
        } else {
            Err(Fault::forbidden(rule))
        }
    }
}

async fn dispatch(State(st): State<AppState>, req: Request) -> Response {
    let rid = request_id(&req);
    let n = match negotiate(req.headers()) {
        Ok(n) => n,
        Err(f) => return with_version(f.into_response(), None, rid.as_deref()),
    };
    let resp = match route(st, n, req).await {
        Ok(r) => r,
        Err(f) => f.into_response(),
    };
    with_version(resp, Some(n), rid.as_deref())
}

async fn route(st: AppState, n: Negotiated, req: Request) -> FResult<Response> {
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return Err(Fault::new(
            StatusCode::UNAUTHORIZED,
            "no credentials: send an X-Auth-Token header",
        ));
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = match req.uri().query() {
        None => BTreeMap::new(),
        Some(q) => serde_urlencoded_pairs(q)?,
    };
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), crate::extract::BODY_LIMIT_BYTES)
        .await
        .map_err(|_| {
            Fault::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large or could not be read",
            )
        })?;

    let mut segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    segs.remove(0); // "v2"
    if segs.last() == Some(&"") {
        segs.pop();
    }
    let (project, rest): (Option<&str>, &[&str]) = match segs.first() {
        Some(first) if !COLLECTIONS.contains(first) => (Some(*first), &segs[1..]),
        _ => (None, &segs[..]),
    };
    let base = base_url(&st, &headers);
    let prefix = match project {
        Some(p) => format!("/v2/{p}"),
        None => "/v2".to_string(),
    };
    let ctx = Ctx {
        st,
        caller,
        n,
        headers,
        base,
        prefix,
        query,
    };
    let known = matches!(
        rest,
        ["share-replicas"]
            | ["share-replicas", "detail"]
            | ["share-replicas", _]
            | ["share-replicas", _, "action"]
            | ["share-replicas", _, "export-locations"]
            | ["share-replicas", _, "export-locations", _]
            | ["shares", _]
    );
    if !known {
        return Err(Fault::no_resource());
    }
    if project.is_none() && !ctx.at_least(Version(2, 60)) {
        return Err(Fault::bad(
            "Malformed request url: the project ID is required in the URL before microversion 2.60.",
        ));
    }
    if rest.first() == Some(&"share-replicas") && !ctx.replicas_available() {
        return Err(Fault::no_resource());
    }
    let not_allowed = || {
        Fault::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("The method {method} is not allowed for this resource."),
        )
    };
    match (rest, &method) {
        (["share-replicas"], &Method::GET) => list(&ctx, None, false).await,
        (["share-replicas"], &Method::POST) => create(&ctx, &body).await,
        (["share-replicas", "detail"], &Method::GET) => list(&ctx, None, true).await,
        (["share-replicas", id], &Method::GET) => show(&ctx, id).await,
        (["share-replicas", id], &Method::DELETE) => delete(&ctx, id, false).await,
        (["share-replicas", id, "action"], &Method::POST) => action(&ctx, id, &body).await,
        (["share-replicas", id, "export-locations"], &Method::GET) => exports(&ctx, id, None).await,
        (["share-replicas", id, "export-locations", el], &Method::GET) => {
            exports(&ctx, id, Some(el)).await
        }
        (["shares", id], &Method::GET) => share_show(&ctx, id).await,
        _ => Err(not_allowed()),
    }
}

/// Query parameters (the last value of a repeated key wins).
fn serde_urlencoded_pairs(q: &str) -> FResult<BTreeMap<String, String>> {
    let uri: axum::http::Uri = format!("/?{q}")
        .parse()
        .map_err(|_| Fault::bad("Malformed query string."))?;
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
            .map_err(|_| Fault::bad("Malformed query string."))?;
    Ok(pairs.into_iter().collect())
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

async fn barrier(ctx: &Ctx) -> FResult<()> {
    ctx.st.cp.read_barrier(Consistency::Linearizable).await?;
    Ok(())
}

async fn read<T: Send + 'static>(
    ctx: &Ctx,
    f: impl FnOnce(&Store) -> Result<T, drplane_statemachine::StoreError> + Send + 'static,
) -> FResult<T> {
    barrier(ctx).await?;
    let store = ctx.st.cp.store().clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Fault::internal(format!("store read task failed: {e}")))?
        .map_err(Fault::from)
}

/// A replica with what its views need: its pair, its share's active volume and type.
struct Loaded {
    replica: Replica,
    pair: Option<Pair>,
    active_volume: Option<String>,
    replication_type: Option<ReplicationType>,
}

fn load_many(
    store: &Store,
    replicas: Vec<Replica>,
) -> Result<Vec<Loaded>, drplane_statemachine::StoreError> {
    let mut shares: HashMap<String, (Option<String>, Option<ReplicationType>)> = HashMap::new();
    let mut out = Vec::with_capacity(replicas.len());
    for r in replicas {
        if !shares.contains_key(&r.share_id) {
            let active = store
                .replicas_of_share(&r.share_id)?
                .into_iter()
                .find(|x| x.active)
                .map(|x| x.volume_id);
            let rt = store
                .get_manila_share(&r.share_id)?
                .map(|m| m.replication_type);
            shares.insert(r.share_id.clone(), (active, rt));
        }
        let (active_volume, replication_type) =
            shares.get(&r.share_id).cloned().unwrap_or((None, None));
        let pair = match &r.pair_id {
            Some(p) => store.get_pair(p)?,
            None => None,
        };
        out.push(Loaded {
            replica: r,
            pair,
            active_volume,
            replication_type,
        });
    }
    Ok(out)
}

fn manila_time(ms: u64) -> String {
    // `YYYY-MM-DDTHH:MM:SS.ffffff`
    let s = format_rfc3339_ms(ms);
    format!("{}000", s.trim_end_matches('Z'))
}

fn now_ms() -> u64 {
    crate::auth::now_ms()
}

fn state_of(l: &Loaded) -> ReplicaState {
    replica_state(
        &l.replica,
        l.pair.as_ref(),
        l.active_volume.as_deref(),
        now_ms(),
    )
}

fn summary_view(l: &Loaded) -> Value {
    json!({
        "id": l.replica.id,
        "share_id": l.replica.share_id,
        "status": l.replica.status.as_str(),
        "replica_state": state_of(l).as_str(),
    })
}

fn backend_host(r: &Replica) -> String {
    format!("{}@drplane#{}", r.host, r.pool)
}

fn detail_view(ctx: &Ctx, l: &Loaded) -> Value {
    let r = &l.replica;
    let mut v = Map::new();
    v.insert("id".into(), json!(r.id));
    v.insert("share_id".into(), json!(r.share_id));
    v.insert("status".into(), json!(r.status.as_str()));
    v.insert("replica_state".into(), json!(state_of(l).as_str()));
    v.insert("availability_zone".into(), json!(r.availability_zone));
    v.insert("share_network_id".into(), Value::Null);
    v.insert("created_at".into(), json!(manila_time(r.created_at_ms)));
    v.insert(
        "updated_at".into(),
        if r.updated_at_ms > r.created_at_ms {
            json!(manila_time(r.updated_at_ms))
        } else {
            Value::Null
        },
    );
    if ctx.admin() {
        v.insert("host".into(), json!(backend_host(r)));
        v.insert("share_server_id".into(), Value::Null);
        if ctx.at_least(Version(2, 30)) {
            v.insert(
                "cast_rules_to_readonly".into(),
                json!(!r.active && l.replication_type == Some(ReplicationType::Readable)),
            );
        }
    }
    if ctx.at_least(Version(2, 95)) {
        v.insert("metadata".into(), json!(r.metadata));
    }
    Value::Object(v)
}

fn export_view(l: &Loaded) -> Value {
    let r = &l.replica;
    let path = if r.path.is_empty() {
        format!("{}:/{}", r.host, r.volume_id)
    } else {
        format!("{}:{}", r.host, r.path)
    };
    json!({
        "id": r.export_id,
        "share_instance_id": r.id,
        "path": path,
        "is_admin_only": false,
        "preferred": true,
        "availability_zone": r.availability_zone,
        "replica_state": state_of(l).as_str(),
    })
}

/// The replica if the caller may see it.
async fn load_one(ctx: &Ctx, id: &str) -> FResult<Loaded> {
    let rid = id.to_string();
    let found = read(ctx, move |s| match s.get_share_replica(&rid)? {
        Some(r) => Ok(load_many(s, vec![r])?.pop()),
        None => Ok(None),
    })
    .await?;
    match found {
        Some(l) if ctx.caller.can_see(&l.replica.project) => Ok(l),
        _ => Err(Fault::not_found(format!(
            "Replica {} not found.",
            truncate(id, 64)
        ))),
    }
}

fn ok_json(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn parse_index(ctx: &Ctx, key: &str) -> FResult<Option<usize>> {
    match ctx.query.get(key) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| Fault::bad(format!("{key} param must be an integer"))),
    }
}

/// MANILA-SR-LIST and MANILA-SR-LIST-DETAIL.
async fn list(ctx: &Ctx, _unused: Option<()>, detail: bool) -> FResult<Response> {
    let limit = match parse_index(ctx, "limit")? {
        None | Some(0) => PAGE_MAX,
        Some(l) => l.min(PAGE_MAX),
    };
    let offset = parse_index(ctx, "offset")?.unwrap_or(0);
    let share_id = ctx.query.get("share_id").cloned();
    let admin = ctx.admin();
    let project = ctx.caller.project_id.clone();
    let sid = share_id.clone();
    let listed = read(ctx, move |s| {
        let replicas = match &sid {
            Some(id) => {
                let share: Option<Share> = s.get_share(id)?;
                match share {
                    Some(sh) if admin || sh.project == project => s.replicas_of_share(id)?,
                    _ => return Ok(None),
                }
            }
            None if admin => s.list_share_replicas()?,
            None => s.replicas_of_project(&project)?,
        };
        Ok(Some(load_many(s, replicas)?))
    })
    .await?;
    let Some(all) = listed else {
        return Err(Fault::not_found(format!(
            "Share with share ID {} not found.",
            truncate(share_id.as_deref().unwrap_or(""), 64)
        )));
    };
    let total = all.len();
    let page: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|l| {
            if detail {
                detail_view(ctx, l)
            } else {
                summary_view(l)
            }
        })
        .collect();
    let mut body = json!({ "share_replicas": page });
    if offset.saturating_add(limit) < total {
        let mut q = format!("limit={limit}&offset={}", offset + limit);
        if let Some(s) = &share_id {
            q.push_str(&format!("&share_id={s}"));
        }
        let path = if detail {
            "share-replicas/detail"
        } else {
            "share-replicas"
        };
        body["share_replica_links"] = json!([{
            "rel": "next",
            "href": format!("{}{}/{path}?{q}", ctx.base, ctx.prefix),
        }]);
    }
    Ok(ok_json(StatusCode::OK, body))
}

/// MANILA-SR-SHOW.
async fn show(ctx: &Ctx, id: &str) -> FResult<Response> {
    let l = load_one(ctx, id).await?;
    Ok(ok_json(
        StatusCode::OK,
        json!({ "share_replica": detail_view(ctx, &l) }),
    ))
}

/// MANILA-SR-EXPORT-LIST (≥ 2.47), and one export location.
async fn exports(ctx: &Ctx, id: &str, el: Option<&str>) -> FResult<Response> {
    if !ctx.at_least(Version(2, 47)) {
        return Err(Fault::no_resource());
    }
    let l = load_one(ctx, id).await?;
    let view = export_view(&l);
    match el {
        None => Ok(ok_json(
            StatusCode::OK,
            json!({ "export_locations": [view] }),
        )),
        Some(e) if e == l.replica.export_id => {
            Ok(ok_json(StatusCode::OK, json!({ "export_location": view })))
        }
        Some(e) => Err(Fault::not_found(format!(
            "Export location {} not found.",
            truncate(e, 64)
        ))),
    }
}

/// MANILA-SHARE-SHOW (the subset manila.md lists).
async fn share_show(ctx: &Ctx, id: &str) -> FResult<Response> {
    let sid = id.to_string();
    let found = read(ctx, move |s| {
        let Some(share) = s.get_share(&sid)? else {
            return Ok(None);
        };
        let ms = s.get_manila_share(&sid)?;
        let replicas = s.replicas_of_share(&sid)?;
        let site = s.get_host(&share.host)?.map(|h| h.site);
        Ok(Some((share, ms, replicas, site)))
    })
    .await?;
    let (share, ms, replicas, site) = match found {
        Some(f) if ctx.caller.can_see(&f.0.project) => f,
        _ => {
            return Err(Fault::not_found(format!(
                "Share {} could not be found.",
                truncate(id, 64)
            )))
        }
    };
    Ok(ok_json(
        StatusCode::OK,
        json!({ "share": share_view(ctx, &share, ms.as_ref(), &replicas, site) }),
    ))
}

fn share_view(
    ctx: &Ctx,
    share: &Share,
    ms: Option<&ManilaShare>,
    replicas: &[Replica],
    site: Option<String>,
) -> Value {
    let active = replicas.iter().find(|r| r.active);
    let gib = share.size_bytes.div_ceil(1 << 30).max(1);
    let status = match active {
        Some(a) => a.status.as_str().to_string(),
        None => serde_json::to_value(share.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "available".into()),
    };
    let self_href = format!("{}{}/shares/{}", ctx.base, ctx.prefix, share.id);
    let mut v = Map::new();
    v.insert("id".into(), json!(share.id));
    v.insert("name".into(), json!(share.name));
    v.insert("description".into(), Value::Null);
    v.insert("status".into(), json!(status));
    v.insert("size".into(), json!(gib));
    v.insert("share_proto".into(), json!("NFS"));
    v.insert(
        "availability_zone".into(),
        json!(active.map(|a| a.availability_zone.clone()).or(site)),
    );
    v.insert("share_network_id".into(), Value::Null);
    v.insert("share_server_id".into(), Value::Null);
    let type_name = ms.map(|m| format!("drplane-{}", m.replication_type.as_str()));
    v.insert("share_type".into(), json!(type_name));
    v.insert("share_type_name".into(), json!(type_name));
    v.insert("snapshot_id".into(), Value::Null);
    v.insert("is_public".into(), json!(false));
    v.insert("task_state".into(), Value::Null);
    v.insert("project_id".into(), json!(share.project));
    v.insert("metadata".into(), json!({}));
    v.insert("created_at".into(), json!(manila_time(share.created_at_ms)));
    v.insert(
        "links".into(),
        json!([{"rel": "self", "href": self_href}, {"rel": "bookmark", "href": self_href}]),
    );
    if ctx.at_least(Version(2, 11)) {
        v.insert(
            "replication_type".into(),
            json!(ms.map(|m| m.replication_type.as_str())),
        );
        v.insert(
            "has_replicas".into(),
            json!(replicas.iter().any(|r| !r.active)),
        );
    }
    if ctx.admin() {
        v.insert(
            "host".into(),
            json!(active.map_or_else(
                || format!("{}@drplane#{}", share.host, share.pool),
                backend_host
            )),
        );
    }
    Value::Object(v)
}

// ---------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Proposes a Manila command; `Err` of the inner result is the state machine's refusal.
async fn propose(ctx: &Ctx, cmd: ManilaCommand) -> FResult<Result<ManilaOutcome, CommandError>> {
    let command = Command::Manila(cmd);
    if let Err(e) = command.validate() {
        return Ok(Err(e));
    }
    let request_id = idempotency_key(&ctx.headers).map_err(|e| Fault::bad(e.message))?;
    let result = ctx
        .st
        .cp
        .propose(Proposal {
            request_id,
            command,
        })
        .await?;
    match result {
        Ok(Outcome::Manila(o)) => Ok(Ok(*o)),
        Ok(other) => Err(Fault::internal(format!(
            "a Manila command produced {other:?}"
        ))),
        Err(e) => Ok(Err(e)),
    }
}

/// The JSON object of a body, or the fault for a body that is not one.
fn body_object(body: &Bytes) -> FResult<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Fault::bad("Malformed request body: the body is empty."));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Fault::bad(
            "Malformed request body: expected a JSON object.",
        )),
        Err(e) => Err(Fault::bad(format!("Malformed request body: {e}"))),
    }
}

/// A replica answer (202 with the detail view) after a command.
async fn replica_answer(ctx: &Ctx, r: Replica, status: StatusCode) -> FResult<Response> {
    let id = r.id.clone();
    let l = match read(ctx, move |s| load_many(s, vec![r])).await?.pop() {
        Some(l) => l,
        None => return Err(Fault::internal(format!("replica {id} vanished"))),
    };
    Ok(ok_json(
        status,
        json!({ "share_replica": detail_view(ctx, &l) }),
    ))
}

/// MANILA-SR-CREATE.
async fn create(ctx: &Ctx, body: &Bytes) -> FResult<Response> {
    let obj = body_object(body)?;
    let Some(Value::Object(sr)) = obj.get("share_replica") else {
        return Err(Fault::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Body does not contain 'share_replica' information.",
        ));
    };
    let share_id = match sr.get("share_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        None | Some(Value::Null) => {
            return Err(Fault::bad("Must provide Share ID to add replica."))
        }
        Some(Value::String(_)) => return Err(Fault::bad("Must provide Share ID to add replica.")),
        Some(_) => return Err(Fault::bad("share_id must be a string.")),
    };
    if drplane_statemachine::inventory::validate_id("share_id", &share_id).is_err() {
        return Err(Fault::not_found(format!(
            "No share exists with ID {}.",
            truncate(&share_id, 64)
        )));
    }
    let availability_zone = match sr.get("availability_zone") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(Fault::bad("availability_zone must be a string.")),
    };
    let v = ctx.n.version;
    match sr.get("share_network_id") {
        None | Some(Value::Null) => {}
        Some(net) => {
            if v >= Version(2, 51) && v < Version(2, 72) {
                return Err(Fault::bad(
                    "share_network_id is not accepted between microversions 2.51 and 2.71: use 2.72 or later.",
                ));
            }
            return Err(Fault::bad(format!(
                "Share network {} not found: drplane shares use no share networks.",
                truncate(&net.to_string(), 64)
            )));
        }
    }
    let mut only_host = None;
    if v >= Version(2, 67) {
        match sr.get("scheduler_hints") {
            None | Some(Value::Null) => {}
            Some(Value::Object(h)) => {
                if let Some(k) = h.keys().find(|k| k.as_str() != "only_host") {
                    return Err(Fault::bad(format!(
                        "Invalid scheduler hint '{}': only 'only_host' is supported.",
                        truncate(k, 64)
                    )));
                }
                match h.get("only_host") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) if !s.is_empty() => {
                        ctx.require_admin("share_replica:create_with_scheduler_hints")?;
                        only_host = Some(s.clone());
                    }
                    Some(_) => return Err(Fault::bad("only_host must be a non-empty string.")),
                }
            }
            Some(_) => return Err(Fault::bad("scheduler_hints must be an object.")),
        }
    }
    let mut metadata = BTreeMap::new();
    if v >= Version(2, 95) {
        match sr.get("metadata") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, val) in m {
                    let Value::String(s) = val else {
                        return Err(Fault::bad(format!(
                            "Metadata value of key '{}' must be a string.",
                            truncate(k, 64)
                        )));
                    };
                    metadata.insert(k.clone(), s.clone());
                }
            }
            Some(_) => return Err(Fault::bad("metadata must be an object.")),
        }
    }
    let cmd = ManilaCommand::CreateReplica {
        project: ctx.scope(),
        replica: Box::new(NewReplica {
            id: new_id(),
            share_id: share_id.clone(),
            availability_zone,
            only_host,
            metadata,
            export_id: new_id(),
        }),
        job_id: new_id(),
    };
    match propose(ctx, cmd).await? {
        Ok(ManilaOutcome::Replica(r)) => replica_answer(ctx, r, StatusCode::ACCEPTED).await,
        Ok(other) => Err(Fault::internal(format!("create produced {other:?}"))),
        Err(e) => Err(refusal(e, &share_id, false)),
    }
}

/// MANILA-SR-DELETE and MANILA-SR-FORCE-DELETE.
async fn delete(ctx: &Ctx, id: &str, force: bool) -> FResult<Response> {
    if force {
        ctx.require_admin("share_replica:force_delete")?;
    }
    let cmd = ManilaCommand::Delete {
        project: ctx.scope(),
        replica_id: id.to_string(),
        job_id: new_id(),
        force,
    };
    if drplane_statemachine::inventory::validate_id("id", id).is_err() {
        return Err(Fault::not_found(format!(
            "No replica exists with ID {}.",
            truncate(id, 64)
        )));
    }
    match propose(ctx, cmd).await? {
        Ok(_) => Ok(StatusCode::ACCEPTED.into_response()),
        Err(e) => Err(refusal(e, id, true)),
    }
}

/// The actions of `POST …/share-replicas/{id}/action`.
async fn action(ctx: &Ctx, id: &str, body: &Bytes) -> FResult<Response> {
    let obj = body_object(body)?;
    const KNOWN: &[&str] = &[
        "promote",
        "resync",
        "reset_status",
        "os-reset_status",
        "reset_replica_state",
        "os-reset_replica_state",
        "force_delete",
        "os-force_delete",
    ];
    let Some((name, arg)) = obj.iter().find(|(k, _)| KNOWN.contains(&k.as_str())) else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(Fault::bad(format!(
            "There is no such action: {}",
            truncate(&keys.join(", "), 100)
        )));
    };
    let valid_id = drplane_statemachine::inventory::validate_id("id", id).is_ok();
    if !valid_id {
        return Err(Fault::not_found(format!(
            "Replica {} not found.",
            truncate(id, 64)
        )));
    }
    match name.as_str() {
        "promote" => promote(ctx, id, arg).await,
        "resync" => resync(ctx, id).await,
        "reset_status" | "os-reset_status" => reset_status(ctx, id, arg).await,
        "reset_replica_state" | "os-reset_replica_state" => reset_replica_state(ctx, id, arg).await,
        _ => delete(ctx, id, true).await,
    }
}

/// MANILA-SR-PROMOTE.
async fn promote(ctx: &Ctx, id: &str, arg: &Value) -> FResult<Response> {
    if ctx.at_least(Version(2, 75)) {
        if let Value::Object(o) = arg {
            match o.get("quiesce_wait_time") {
                None | Some(Value::Null) => {}
                Some(w) => {
                    let ok = match w {
                        Value::Number(n) => n.as_u64().is_some_and(|n| n > 0),
                        Value::String(s) => s.trim().parse::<u64>().is_ok_and(|n| n > 0),
                        _ => false,
                    };
                    if !ok {
                        return Err(Fault::bad(
                            "quiesce_wait_time must be an integer and greater than 0.",
                        ));
                    }
                }
            }
        }
    }
    let cmd = ManilaCommand::Promote {
        project: ctx.scope(),
        replica_id: id.to_string(),
        job_id: new_id(),
        admin: ctx.admin(),
    };
    match propose(ctx, cmd).await? {
        Ok(ManilaOutcome::AlreadyActive(_)) => Ok(StatusCode::OK.into_response()),
        Ok(ManilaOutcome::Replica(r)) => replica_answer(ctx, r, StatusCode::ACCEPTED).await,
        Ok(other) => Err(Fault::internal(format!("promote produced {other:?}"))),
        Err(e) => Err(refusal(e, id, false)),
    }
}

/// MANILA-SR-RESYNC (admin only, decision 5).
async fn resync(ctx: &Ctx, id: &str) -> FResult<Response> {
    ctx.require_admin("share_replica:resync")?;
    let cmd = ManilaCommand::Resync {
        project: ctx.scope(),
        replica_id: id.to_string(),
        job_id: new_id(),
    };
    match propose(ctx, cmd).await? {
        Ok(ManilaOutcome::AlreadyActive(_)) => Ok(StatusCode::OK.into_response()),
        Ok(_) => Ok(StatusCode::ACCEPTED.into_response()),
        Err(e) => Err(refusal(e, id, false)),
    }
}

/// The string under `key` of an action's argument object.
fn arg_string<'a>(arg: &'a Value, key: &str) -> Option<&'a str> {
    arg.as_object()
        .and_then(|o| o.get(key))
        .and_then(Value::as_str)
}

/// MANILA-SR-RESET-STATUS (admin).
async fn reset_status(ctx: &Ctx, id: &str, arg: &Value) -> FResult<Response> {
    ctx.require_admin("share_replica:reset_status")?;
    let Some(raw) = arg_string(arg, "status") else {
        return Err(Fault::bad("Must specify 'status'"));
    };
    let Some(status) = ReplicaStatus::parse_resettable(&raw.to_ascii_lowercase()) else {
        let valid: Vec<&str> = ReplicaStatus::RESETTABLE
            .iter()
            .map(|s| s.as_str())
            .collect();
        return Err(Fault::bad(format!(
            "Invalid state. Valid states: {}.",
            valid.join(", ")
        )));
    };
    let cmd = ManilaCommand::ResetStatus {
        project: ctx.scope(),
        replica_id: id.to_string(),
        status,
    };
    match propose(ctx, cmd).await? {
        Ok(_) => Ok(StatusCode::ACCEPTED.into_response()),
        Err(e) => Err(refusal(e, id, false)),
    }
}

/// MANILA-SR-RESET-REPLICA-STATE (admin).
async fn reset_replica_state(ctx: &Ctx, id: &str, arg: &Value) -> FResult<Response> {
    ctx.require_admin("share_replica:reset_replica_state")?;
    let Some(raw) = arg_string(arg, "replica_state") else {
        return Err(Fault::bad("Must specify 'replica_state'"));
    };
    let Some(replica_state) = ReplicaState::parse(&raw.to_ascii_lowercase()) else {
        return Err(Fault::bad(
            "Invalid replica_state. Valid states: active, in_sync, out_of_sync, error.",
        ));
    };
    let cmd = ManilaCommand::ResetReplicaState {
        project: ctx.scope(),
        replica_id: id.to_string(),
        replica_state,
    };
    match propose(ctx, cmd).await? {
        Ok(_) => Ok(StatusCode::ACCEPTED.into_response()),
        Err(e) => Err(refusal(e, id, false)),
    }
}

// ---------------------------------------------------------------------------------------
// Native administration of a share's replication type
// ---------------------------------------------------------------------------------------

fn native_share_view(share_id: &str, ms: Option<&ManilaShare>, replicas: &[Replica]) -> Value {
    json!({
        "share_id": share_id,
        "replication_type": ms.map(|m| m.replication_type.as_str()),
        "replicas": replicas.iter().map(|r| json!({
            "id": r.id,
            "host": r.host,
            "pool": r.pool,
            "availability_zone": r.availability_zone,
            "volume_id": r.volume_id,
            "status": r.status.as_str(),
            "active": r.active,
            "pair_id": r.pair_id,
            "busy_job": r.busy_job,
            "last_error": r.last_error,
        })).collect::<Vec<_>>(),
    })
}

async fn native_read(st: &AppState, share_id: String) -> Result<Value, ApiError> {
    st.cp.read_barrier(Consistency::Linearizable).await?;
    let store = st.cp.store().clone();
    let id = share_id.clone();
    let (share, ms, replicas) = crate::inventory::blocking("manila share read", move || {
        Ok((
            store.get_share(&id)?,
            store.get_manila_share(&id)?,
            store.replicas_of_share(&id)?,
        ))
    })
    .await?;
    if share.is_none() {
        return Err(crate::inventory::not_found("share", &share_id));
    }
    Ok(native_share_view(&share_id, ms.as_ref(), &replicas))
}

/// `GET /drplane/v1/manila/shares/{share_id}` (admin).
async fn native_show(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(share_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    Ok(Json(native_read(&st, share_id).await?))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTypeBody {
    replication_type: Option<String>,
}

/// `PUT /drplane/v1/manila/shares/{share_id}` (admin): the share type's
/// `replication_type`, as Manila would read it from the share's type.
async fn native_set(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(share_id): ApiPath<String>,
    ApiJson(body): ApiJson<SetTypeBody>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let replication_type = match body.replication_type.as_deref() {
        None => None,
        Some(s) => Some(ReplicationType::parse(s).ok_or_else(|| {
            ApiError::new(
                ErrorCode::ValidationFailed,
                format!(
                    "replication_type '{}' is not one of writable, readable, dr (or null)",
                    truncate(s, 32)
                ),
            )
        })?),
    };
    let command = Command::Manila(ManilaCommand::SetReplicationType {
        share_id: share_id.clone(),
        replication_type,
        active_replica_id: new_id(),
        export_id: new_id(),
    });
    match crate::inventory::propose_command(&st, &headers, command).await? {
        Ok(_) => Ok(Json(native_read(&st, share_id).await?)),
        Err(e) => Err(crate::inventory::refusal(e, "share")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(Version::parse("2.95"), Some(Version(2, 95)));
        assert_eq!(Version::parse(" 2.11 "), Some(Version(2, 11)));
        assert_eq!(Version::parse("latest"), Some(MAX_VERSION));
        assert_eq!(Version::parse("2"), None);
        assert_eq!(Version::parse("2.x"), None);
        assert_eq!(Version::parse("2.-1"), None);
        assert!(Version(2, 9) < Version(2, 11));
        assert!(Version(2, 100) > MAX_VERSION);
    }

    #[test]
    fn negotiation() {
        let mut h = HeaderMap::new();
        assert_eq!(negotiate(&h).expect("default").version, MIN_VERSION);
        h.insert(VERSION_HEADER, HeaderValue::from_static("2.56"));
        assert_eq!(negotiate(&h).expect("legacy").version, Version(2, 56));
        h.insert(VERSION_HEADER, HeaderValue::from_static("2.96"));
        assert_eq!(
            negotiate(&h).expect_err("too new").status,
            StatusCode::NOT_ACCEPTABLE
        );
        h.insert(VERSION_HEADER, HeaderValue::from_static("two"));
        assert_eq!(
            negotiate(&h).expect_err("malformed").status,
            StatusCode::BAD_REQUEST
        );
        let mut h = HeaderMap::new();
        h.insert(
            OPENSTACK_API_VERSION,
            HeaderValue::from_static("shared-file-system 2.47"),
        );
        h.insert(EXPERIMENTAL_HEADER, HeaderValue::from_static("True"));
        let n = negotiate(&h).expect("modern");
        assert_eq!(n.version, Version(2, 47));
        assert!(n.experimental);
    }

    #[test]
    fn timestamps_have_microseconds() {
        assert_eq!(manila_time(0), "1970-01-01T00:00:00.000000");
        assert_eq!(manila_time(1_500), "1970-01-01T00:00:01.500000");
    }
}
