//! The native `/drplane/v1` API, health, readiness and metrics.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drplane_statemachine::command::{validate_site_name, Outcome};
use drplane_statemachine::store::REQUEST_ID_MAX;
use drplane_statemachine::{Command, Proposal, Site};
use serde::{Deserialize, Serialize};

use crate::control::{ClusterStatus, Consistency, ControlPlane, MemberInfo, NewMember};
use crate::error::{ApiError, ErrorCode, NativeErrorShape};
use crate::extract::{
    parse_member_id, truncate, ApiJson, ApiPath, ApiQuery, OptionalJson, BODY_LIMIT_BYTES,
};
use crate::metrics::HttpMetrics;
use crate::middleware::track;
use crate::time::format_rfc3339_ms;

/// The header whose value becomes [`Proposal::request_id`].
pub const IDEMPOTENCY_KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) cp: Arc<dyn ControlPlane>,
    pub(crate) metrics: Arc<HttpMetrics>,
    /// Identity settings and the login rate limiter (`crate::auth`).
    pub(crate) auth: Arc<crate::auth::AuthState>,
}

/// The HTTP API of one node: `/livez`, `/readyz`, `/metrics` and the native
/// `/drplane/v1` routes. Every non-2xx answer has the native error shape
/// (see [`crate::error`]); every answer carries an `X-Request-Id`.
pub fn router(cp: Arc<dyn ControlPlane>) -> Router {
    router_with(cp, crate::auth::AuthOptions::default())
}

/// [`router`] with identity settings (the admin password of the first init, token
/// lifetimes, login rate limits). Every route but health, metrics, version documents and
/// logins requires credentials (see [`crate::auth`]).
pub fn router_with(cp: Arc<dyn ControlPlane>, auth: crate::auth::AuthOptions) -> Router {
    let metrics = Arc::new(HttpMetrics::new());
    let state = AppState {
        cp,
        metrics: metrics.clone(),
        auth: Arc::new(crate::auth::AuthState::new(auth)),
    };
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/drplane/v1/cluster", get(cluster_status))
        .route(
            "/drplane/v1/cluster/init",
            post(crate::identity::init_handler),
        )
        .route(
            "/drplane/v1/cluster/members",
            get(list_members).post(add_member),
        )
        .route(
            "/drplane/v1/cluster/members/{id}",
            axum::routing::delete(remove_member),
        )
        .route("/drplane/v1/cluster/members/{id}/promote", post(promote))
        .route("/drplane/v1/cluster/members/{id}/demote", post(demote))
        .route("/drplane/v1/sites", get(list_sites).post(create_site))
        .route(
            "/drplane/v1/sites/{name}",
            get(get_site).delete(delete_site),
        )
        .merge(crate::identity::routes())
        .merge(crate::auth::keystone::routes())
        .merge(crate::auth::danube::routes())
        .merge(crate::inventory::routes())
        .merge(crate::jobs::routes())
        .merge(crate::pairs::routes())
        .merge(crate::families::huawei::routes())
        .merge(crate::families::danube::routes())
        .merge(crate::families::trove::routes())
        .merge(crate::families::manila::routes())
        // Must come after the routes: it is set on each route present.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(metrics, track))
        .with_state(state)
}

// ---- health and metrics ----

async fn livez() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(st): State<AppState>) -> Response {
    let health = st.cp.health();
    if health.ready {
        return Json(serde_json::json!({
            "ready": true,
            "reason": health.reason,
            "node_id": st.cp.node_id(),
        }))
        .into_response();
    }
    // Probes poll this often: answered without the warn-level log of other 503s.
    let err = ApiError::new(ErrorCode::NotReady, health.reason.clone());
    let body = serde_json::json!({
        "ready": false,
        "reason": health.reason,
        "node_id": st.cp.node_id(),
        "error": err.error_object(),
    });
    let mut resp = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    resp.extensions_mut().insert(NativeErrorShape);
    resp
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    let mut out = st.cp.metrics_text();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    st.metrics.render(&mut out);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
        )],
        out,
    )
        .into_response()
}

// ---- cluster ----

async fn cluster_status(State(st): State<AppState>) -> Result<Json<ClusterStatus>, ApiError> {
    Ok(Json(st.cp.cluster_status().await?))
}

async fn list_members(State(st): State<AppState>) -> Result<Json<Vec<MemberInfo>>, ApiError> {
    Ok(Json(st.cp.cluster_status().await?.members))
}

async fn add_member(
    State(st): State<AppState>,
    ApiJson(member): ApiJson<NewMember>,
) -> Result<(StatusCode, Json<ClusterStatus>), ApiError> {
    let status = st.cp.add_learner(member).await?;
    Ok((StatusCode::CREATED, Json(status)))
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    force: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceBody {
    force: Option<bool>,
}

/// `force` from `?force=` or `{"force": ...}`; both may be given if they agree.
fn resolve_force(query: ForceQuery, body: Option<ForceBody>) -> Result<bool, ApiError> {
    match (query.force, body.and_then(|b| b.force)) {
        (Some(q), Some(b)) if q != b => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("force={q} in the query and \"force\": {b} in the body disagree"),
        )),
        (q, b) => Ok(q.or(b).unwrap_or(false)),
    }
}

#[derive(Clone, Copy)]
enum MemberOp {
    Promote,
    Demote,
    Remove,
}

async fn member_op(
    st: &AppState,
    op: MemberOp,
    raw_id: &str,
    query: ForceQuery,
    body: Option<ForceBody>,
) -> Result<Json<ClusterStatus>, ApiError> {
    let id = parse_member_id(raw_id)?;
    let force = resolve_force(query, body)?;
    let status = match op {
        MemberOp::Promote => st.cp.promote(id, force).await?,
        MemberOp::Demote => st.cp.demote(id, force).await?,
        MemberOp::Remove => st.cp.remove(id, force).await?,
    };
    Ok(Json(status))
}

async fn promote(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ForceQuery>,
    OptionalJson(body): OptionalJson<ForceBody>,
) -> Result<Json<ClusterStatus>, ApiError> {
    member_op(&st, MemberOp::Promote, &id, query, body).await
}

async fn demote(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ForceQuery>,
    OptionalJson(body): OptionalJson<ForceBody>,
) -> Result<Json<ClusterStatus>, ApiError> {
    member_op(&st, MemberOp::Demote, &id, query, body).await
}

async fn remove_member(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ForceQuery>,
    OptionalJson(body): OptionalJson<ForceBody>,
) -> Result<Json<ClusterStatus>, ApiError> {
    member_op(&st, MemberOp::Remove, &id, query, body).await
}

// ---- sites ----

/// A site as the native API shows it.
#[derive(Debug, Serialize)]
struct SiteView {
    name: String,
    description: String,
    /// RFC 3339, UTC, milliseconds.
    created_at: String,
}

impl From<Site> for SiteView {
    fn from(s: Site) -> Self {
        SiteView {
            created_at: format_rfc3339_ms(s.created_at_ms),
            name: s.name,
            description: s.description,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSiteRequest {
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ReadQuery {
    pub(crate) consistency: Option<Consistency>,
}

/// The optional `Idempotency-Key` header, which becomes the proposal's request id.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |why: String| ApiError::new(ErrorCode::InvalidIdempotencyKey, why);
    if values.next().is_some() {
        return Err(bad("send the Idempotency-Key header once".into()));
    }
    let key = value
        .to_str()
        .map_err(|_| bad("the Idempotency-Key must be visible ASCII".into()))?;
    if key.is_empty() {
        return Err(bad("the Idempotency-Key is empty".into()));
    }
    if key.len() > REQUEST_ID_MAX {
        return Err(bad(format!(
            "the Idempotency-Key is {} bytes; at most {REQUEST_ID_MAX} are accepted",
            key.len()
        )));
    }
    Ok(Some(key.to_owned()))
}

/// Validates, then proposes, then maps the state machine's refusal.
pub(crate) async fn propose(
    st: &AppState,
    headers: &HeaderMap,
    command: Command,
) -> Result<Outcome, ApiError> {
    command.validate()?;
    let request_id = idempotency_key(headers)?;
    let result = st
        .cp
        .propose(Proposal {
            request_id,
            command,
        })
        .await?;
    Ok(result?)
}

pub(crate) async fn read_barrier(st: &AppState, query: ReadQuery) -> Result<(), ApiError> {
    st.cp
        .read_barrier(query.consistency.unwrap_or_default())
        .await?;
    Ok(())
}

async fn create_site(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateSiteRequest>,
) -> Result<Response, ApiError> {
    let command = Command::CreateSite {
        name: req.name,
        description: req.description,
    };
    match propose(&st, &headers, command).await? {
        Outcome::Site(site) => {
            let location = HeaderValue::from_str(&format!(
                "/drplane/v1/sites/{}",
                site.name.replace('/', "%2F")
            ))
            .map_err(|e| ApiError::internal(format!("site name not a header value: {e}")))?;
            Ok((
                StatusCode::CREATED,
                [(header::LOCATION, location)],
                Json(SiteView::from(site)),
            )
                .into_response())
        }
        other => Err(ApiError::internal(format!(
            "create_site produced {other:?} instead of a site"
        ))),
    }
}

async fn delete_site(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    propose(&st, &headers, Command::DeleteSite { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_site(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<SiteView>, ApiError> {
    validate_site_name(&name)?;
    read_barrier(&st, query).await?;
    match st.cp.store().get_site(&name)? {
        Some(site) => Ok(Json(SiteView::from(site))),
        None => Err(ApiError::new(
            ErrorCode::ResourceNotFound,
            format!("site '{name}' not found"),
        )),
    }
}

async fn list_sites(
    State(st): State<AppState>,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_barrier(&st, query).await?;
    let store = st.cp.store().clone();
    let sites = tokio::task::spawn_blocking(move || store.list_sites())
        .await
        .map_err(|e| ApiError::internal(format!("site listing task failed: {e}")))??;
    let sites: Vec<SiteView> = sites.into_iter().map(SiteView::from).collect();
    Ok(Json(serde_json::json!({ "sites": sites })))
}

// ---- fallbacks ----

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::RouteNotFound,
        format!("no route for path '{}'", truncate(uri.path(), 200)),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "path '{}' does not accept method {}",
            truncate(uri.path(), 200),
            truncate(method.as_str(), 20)
        ),
    )
}
