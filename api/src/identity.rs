//! The native identity API: `/drplane/v1/identity/…` (admin only, enforced by
//! [`crate::auth`]), `GET /drplane/v1/auth/whoami` (any caller), and the bootstrap that
//! `POST /drplane/v1/cluster/init` runs.
//!
//! | method and path | what |
//! |---|---|
//! | `GET/POST /identity/projects`, `GET/PATCH/DELETE /identity/projects/{project}` | projects (`{project}`: id or name) |
//! | `GET/POST /identity/users`, `GET/PATCH/DELETE /identity/users/{user}` | users (`{user}`: id or name); a created user's generated password is shown once |
//! | `GET /identity/role-assignments?user=&project=` | role assignments |
//! | `PUT/DELETE /identity/projects/{project}/users/{user}/roles/{role}` | grant, revoke (`admin`, `member`, `reader`) |
//! | `GET/POST /identity/access-keys`, `DELETE /identity/access-keys/{ak}` | Huawei AK/SK pairs; the secret key is shown once |
//! | `GET/POST /identity/api-keys`, `DELETE /identity/api-keys/{id}` | Danube API keys; the key is shown once |
//! | `GET/POST /identity/tokens`, `DELETE /identity/tokens/{id}` | tokens: list, issue for a user (with `expires_in_secs`), revoke |
//!
//! Reads are linearizable unless `?consistency=stale`. Writes accept `Idempotency-Key`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::identity::{
    AccessKey, ApiKey, Bootstrap, BootstrapDemo, IdentityCommand, IdentityOutcome, Project, Role,
    RoleAssignment, Token, User, TOKEN_TTL_MAX_MS, TOKEN_TTL_MIN_MS,
};
use drplane_statemachine::{Command, Store};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::tokens::{self, Scope};
use crate::auth::{short_id, Caller};
use crate::control::{ClusterError, ClusterStatus, Consistency};
use crate::error::{ApiError, ErrorCode};
use crate::extract::{ApiJson, ApiPath, ApiQuery, OptionalJson};
use crate::routes::{propose, read_barrier, AppState, ReadQuery};
use crate::time::format_rfc3339_ms;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/drplane/v1/auth/whoami", get(whoami))
        .route(
            "/drplane/v1/identity/projects",
            get(list_projects).post(create_project),
        )
        .route(
            "/drplane/v1/identity/projects/{project}",
            get(show_project)
                .patch(update_project)
                .delete(delete_project),
        )
        .route(
            "/drplane/v1/identity/projects/{project}/users/{user}/roles/{role}",
            put(grant_role).delete(revoke_role),
        )
        .route(
            "/drplane/v1/identity/users",
            get(list_users).post(create_user),
        )
        .route(
            "/drplane/v1/identity/users/{user}",
            get(show_user).patch(update_user).delete(delete_user),
        )
        .route(
            "/drplane/v1/identity/role-assignments",
            get(list_role_assignments),
        )
        .route(
            "/drplane/v1/identity/access-keys",
            get(list_access_keys).post(create_access_key),
        )
        .route(
            "/drplane/v1/identity/access-keys/{ak}",
            axum::routing::delete(delete_access_key),
        )
        .route(
            "/drplane/v1/identity/api-keys",
            get(list_api_keys).post(create_api_key),
        )
        .route(
            "/drplane/v1/identity/api-keys/{id}",
            axum::routing::delete(delete_api_key),
        )
        .route(
            "/drplane/v1/identity/tokens",
            get(list_tokens).post(issue_token),
        )
        .route(
            "/drplane/v1/identity/tokens/{id}",
            axum::routing::delete(revoke_token),
        )
}

// ---- views ----

#[derive(Debug, Serialize)]
struct ProjectView {
    id: String,
    name: String,
    description: String,
    enabled: bool,
    created_at: String,
}

impl From<Project> for ProjectView {
    fn from(p: Project) -> Self {
        ProjectView {
            created_at: format_rfc3339_ms(p.created_at_ms),
            id: p.id,
            name: p.name,
            description: p.description,
            enabled: p.enabled,
        }
    }
}

#[derive(Debug, Serialize)]
struct UserView {
    id: String,
    name: String,
    domain: String,
    enabled: bool,
    default_project_id: Option<String>,
    created_at: String,
    password_changed_at: String,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        UserView {
            created_at: format_rfc3339_ms(u.created_at_ms),
            password_changed_at: format_rfc3339_ms(u.password_changed_at_ms),
            id: u.id,
            name: u.name,
            domain: u.domain,
            enabled: u.enabled,
            default_project_id: u.default_project_id,
        }
    }
}

#[derive(Debug, Serialize)]
struct AssignmentView {
    user_id: String,
    user_name: Option<String>,
    project_id: String,
    project_name: Option<String>,
    role: Role,
    created_at: String,
}

fn assignment_view(store: &Store, ra: RoleAssignment) -> Result<AssignmentView, ApiError> {
    Ok(AssignmentView {
        user_name: store.get_user(&ra.user_id)?.map(|u| u.name),
        project_name: store.get_project(&ra.project_id)?.map(|p| p.name),
        created_at: format_rfc3339_ms(ra.created_at_ms),
        user_id: ra.user_id,
        project_id: ra.project_id,
        role: ra.role,
    })
}

#[derive(Debug, Serialize)]
struct AccessKeyView {
    access_key: String,
    /// Only in the answer to the create call.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_key: Option<String>,
    user_id: String,
    project_id: String,
    description: String,
    created_at: String,
}

fn access_key_view(k: AccessKey, with_secret: bool) -> AccessKeyView {
    AccessKeyView {
        created_at: format_rfc3339_ms(k.created_at_ms),
        secret_key: with_secret.then_some(k.secret_key),
        access_key: k.access_key,
        user_id: k.user_id,
        project_id: k.project_id,
        description: k.description,
    }
}

#[derive(Debug, Serialize)]
struct ApiKeyView {
    id: String,
    /// Only in the answer to the create call.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    user_id: String,
    project_id: String,
    description: String,
    created_at: String,
}

fn api_key_view(k: ApiKey, key: Option<String>) -> ApiKeyView {
    ApiKeyView {
        created_at: format_rfc3339_ms(k.created_at_ms),
        key,
        id: k.id,
        user_id: k.user_id,
        project_id: k.project_id,
        description: k.description,
    }
}

#[derive(Debug, Serialize)]
struct TokenView {
    id: String,
    /// Only in the answer to the issue call.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    user_id: String,
    project_id: String,
    method: String,
    roles: Vec<Role>,
    issued_at: String,
    expires_at: String,
    revoked: bool,
    revoked_at: Option<String>,
}

fn token_view(t: Token, token: Option<String>) -> TokenView {
    TokenView {
        issued_at: format_rfc3339_ms(t.issued_at_ms),
        expires_at: format_rfc3339_ms(t.expires_at_ms),
        revoked: t.revoked_at_ms.is_some(),
        revoked_at: t.revoked_at_ms.map(format_rfc3339_ms),
        token,
        id: t.id,
        user_id: t.user_id,
        project_id: t.project_id,
        method: t.method,
        roles: t.roles,
    }
}

// ---- helpers ----

fn not_found(kind: &str, r: &str) -> ApiError {
    ApiError::new(
        ErrorCode::ResourceNotFound,
        format!("{kind} '{}' not found", crate::extract::truncate(r, 100)),
    )
}

/// A project by id, else by name.
fn find_project(store: &Store, r: &str) -> Result<Project, ApiError> {
    if let Some(p) = store.get_project(r)? {
        return Ok(p);
    }
    store
        .get_project_by_name(r)?
        .ok_or_else(|| not_found("project", r))
}

/// A user by id, else by name.
fn find_user(store: &Store, r: &str) -> Result<User, ApiError> {
    if let Some(u) = store.get_user(r)? {
        return Ok(u);
    }
    store
        .get_user_by_name(r)?
        .ok_or_else(|| not_found("user", r))
}

fn parse_role(r: &str) -> Result<Role, ApiError> {
    Role::parse(r).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidPathParameter,
            format!(
                "role '{}' does not exist: use admin, member or reader",
                crate::extract::truncate(r, 40)
            ),
        )
    })
}

async fn run(
    st: &AppState,
    headers: &HeaderMap,
    cmd: IdentityCommand,
) -> Result<IdentityOutcome, ApiError> {
    match propose(st, headers, Command::Identity(cmd)).await? {
        Outcome::Identity(o) => Ok(o),
        other => Err(ApiError::internal(format!(
            "an identity command produced {other:?}"
        ))),
    }
}

fn unexpected(o: IdentityOutcome) -> ApiError {
    ApiError::internal(format!("unexpected identity outcome {o:?}"))
}

fn created<T: Serialize>(body: T) -> Response {
    (StatusCode::CREATED, Json(body)).into_response()
}

// ---- whoami ----

async fn whoami(caller: Caller) -> Json<Caller> {
    Json(caller)
}

// ---- projects ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProjectRequest {
    name: String,
    #[serde(default)]
    description: String,
}

async fn list_projects(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_barrier(&st, q).await?;
    let projects: Vec<ProjectView> = st
        .cp
        .store()
        .list_projects()?
        .into_iter()
        .map(ProjectView::from)
        .collect();
    Ok(Json(json!({ "projects": projects })))
}

async fn create_project(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateProjectRequest>,
) -> Result<Response, ApiError> {
    let cmd = IdentityCommand::CreateProject {
        id: tokens::new_id(),
        name: req.name,
        description: req.description,
    };
    match run(&st, &headers, cmd).await? {
        IdentityOutcome::Project(p) => {
            tracing::info!(caller = %caller.describe(), project = %p.name, "project created");
            Ok(created(ProjectView::from(p)))
        }
        o => Err(unexpected(o)),
    }
}

async fn show_project(
    State(st): State<AppState>,
    ApiPath(r): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<ProjectView>, ApiError> {
    read_barrier(&st, q).await?;
    Ok(Json(find_project(st.cp.store(), &r)?.into()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProjectRequest {
    description: Option<String>,
    enabled: Option<bool>,
}

async fn update_project(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateProjectRequest>,
) -> Result<Json<ProjectView>, ApiError> {
    read_barrier(&st, ReadQuery::default()).await?;
    let p = find_project(st.cp.store(), &r)?;
    let cmd = IdentityCommand::UpdateProject {
        id: p.id,
        description: req.description,
        enabled: req.enabled,
    };
    match run(&st, &headers, cmd).await? {
        IdentityOutcome::Project(p) => {
            tracing::info!(caller = %caller.describe(), project = %p.name, "project updated");
            Ok(Json(p.into()))
        }
        o => Err(unexpected(o)),
    }
}

async fn delete_project(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    read_barrier(&st, ReadQuery::default()).await?;
    let p = find_project(st.cp.store(), &r)?;
    run(&st, &headers, IdentityCommand::DeleteProject { id: p.id }).await?;
    tracing::info!(caller = %caller.describe(), project = %p.name, "project deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- users ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUserRequest {
    name: String,
    /// Generated (and shown once) when absent.
    #[serde(default)]
    password: Option<String>,
    /// Id or name; also the project a `role` is granted on.
    #[serde(default)]
    project: Option<String>,
    /// Granted on `project` right away.
    #[serde(default)]
    role: Option<String>,
}

async fn list_users(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_barrier(&st, q).await?;
    let users: Vec<UserView> = st
        .cp
        .store()
        .list_users()?
        .into_iter()
        .map(UserView::from)
        .collect();
    Ok(Json(json!({ "users": users })))
}

async fn create_user(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateUserRequest>,
) -> Result<Response, ApiError> {
    drplane_statemachine::identity::validate_user_name(&req.name)?;
    let role = req.role.as_deref().map(parse_role).transpose()?;
    if role.is_some() && req.project.is_none() {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "a role needs the project to grant it on (\"project\")",
        ));
    }
    let project = match &req.project {
        Some(r) => {
            read_barrier(&st, ReadQuery::default()).await?;
            Some(find_project(st.cp.store(), r)?)
        }
        None => None,
    };
    let (password, generated) = match req.password {
        Some(p) => {
            tokens::check_new_password(&p)?;
            (p, false)
        }
        None => (tokens::generate_password(), true),
    };
    let hash = tokens::hash_password_blocking(password.clone()).await?;
    let cmd = IdentityCommand::CreateUser {
        id: tokens::new_id(),
        name: req.name,
        password_hash: hash,
        default_project_id: project.as_ref().map(|p| p.id.clone()),
    };
    let user = match run(&st, &headers, cmd).await? {
        IdentityOutcome::User(u) => u,
        o => return Err(unexpected(o)),
    };
    tracing::info!(caller = %caller.describe(), user = %user.name, "user created");
    let mut roles = Vec::new();
    if let (Some(role), Some(p)) = (role, &project) {
        let cmd = IdentityCommand::GrantRole {
            user_id: user.id.clone(),
            project_id: p.id.clone(),
            role,
        };
        if let IdentityOutcome::RoleAssignment(ra) = run(&st, &HeaderMap::new(), cmd).await? {
            roles.push(assignment_view(st.cp.store(), ra)?);
        }
    }
    let mut body = serde_json::to_value(UserView::from(user))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("role_assignments".into(), json!(roles));
        if generated {
            obj.insert("password".into(), json!(password));
        }
    }
    Ok(created(body))
}

async fn show_user(
    State(st): State<AppState>,
    ApiPath(r): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_barrier(&st, q).await?;
    let store = st.cp.store();
    let user = find_user(store, &r)?;
    let roles = store
        .list_role_assignments(Some(&user.id), None)?
        .into_iter()
        .map(|ra| assignment_view(store, ra))
        .collect::<Result<Vec<_>, _>>()?;
    let mut body = serde_json::to_value(UserView::from(user))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("role_assignments".into(), json!(roles));
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateUserRequest {
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    /// Id or name; `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    default_project: Option<Option<String>>,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
fn double_option<'de, D>(d: D) -> Result<Option<Option<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<String>::deserialize(d).map(Some)
}

async fn update_user(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateUserRequest>,
) -> Result<Json<UserView>, ApiError> {
    read_barrier(&st, ReadQuery::default()).await?;
    let user = find_user(st.cp.store(), &r)?;
    let default_project_id = match req.default_project {
        Some(Some(p)) => Some(Some(find_project(st.cp.store(), &p)?.id)),
        Some(None) => Some(None),
        None => None,
    };
    let password_hash = match req.password {
        Some(p) => {
            tokens::check_new_password(&p)?;
            Some(tokens::hash_password_blocking(p).await?)
        }
        None => None,
    };
    let cmd = IdentityCommand::UpdateUser {
        id: user.id,
        password_hash,
        enabled: req.enabled,
        default_project_id,
    };
    match run(&st, &headers, cmd).await? {
        IdentityOutcome::User(u) => {
            tracing::info!(caller = %caller.describe(), user = %u.name, "user updated");
            Ok(Json(u.into()))
        }
        o => Err(unexpected(o)),
    }
}

async fn delete_user(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    read_barrier(&st, ReadQuery::default()).await?;
    let user = find_user(st.cp.store(), &r)?;
    run(&st, &headers, IdentityCommand::DeleteUser { id: user.id }).await?;
    tracing::info!(caller = %caller.describe(), user = %user.name, "user deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- roles ----

#[derive(Debug, Default, Deserialize)]
struct AssignmentsQuery {
    user: Option<String>,
    project: Option<String>,
    consistency: Option<Consistency>,
}

async fn list_role_assignments(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<AssignmentsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_barrier(
        &st,
        ReadQuery {
            consistency: q.consistency,
        },
    )
    .await?;
    let store = st.cp.store();
    let user = q.user.as_deref().map(|u| find_user(store, u)).transpose()?;
    let project = q
        .project
        .as_deref()
        .map(|p| find_project(store, p))
        .transpose()?;
    let list = store
        .list_role_assignments(
            user.as_ref().map(|u| u.id.as_str()),
            project.as_ref().map(|p| p.id.as_str()),
        )?
        .into_iter()
        .map(|ra| assignment_view(store, ra))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "role_assignments": list })))
}

async fn grant_role(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((project, user, role)): ApiPath<(String, String, String)>,
) -> Result<Json<AssignmentView>, ApiError> {
    let role = parse_role(&role)?;
    read_barrier(&st, ReadQuery::default()).await?;
    let p = find_project(st.cp.store(), &project)?;
    let u = find_user(st.cp.store(), &user)?;
    let cmd = IdentityCommand::GrantRole {
        user_id: u.id,
        project_id: p.id,
        role,
    };
    match run(&st, &headers, cmd).await? {
        IdentityOutcome::RoleAssignment(ra) => {
            tracing::info!(caller = %caller.describe(), user = %u.name, project = %p.name, %role, "role granted");
            Ok(Json(assignment_view(st.cp.store(), ra)?))
        }
        o => Err(unexpected(o)),
    }
}

async fn revoke_role(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((project, user, role)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let role = parse_role(&role)?;
    read_barrier(&st, ReadQuery::default()).await?;
    let p = find_project(st.cp.store(), &project)?;
    let u = find_user(st.cp.store(), &user)?;
    let cmd = IdentityCommand::RevokeRole {
        user_id: u.id,
        project_id: p.id,
        role,
    };
    run(&st, &headers, cmd).await?;
    tracing::info!(caller = %caller.describe(), user = %u.name, project = %p.name, %role, "role revoked");
    Ok(StatusCode::NO_CONTENT)
}

// ---- credentials ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialRequest {
    /// Id or name.
    user: String,
    /// Id or name; the user's default project when absent.
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Default, Deserialize)]
struct ByUserQuery {
    user: Option<String>,
    consistency: Option<Consistency>,
}

/// The (user, project) a credential request names.
async fn credential_owner(
    st: &AppState,
    user: &str,
    project: Option<&str>,
) -> Result<(User, Project), ApiError> {
    read_barrier(st, ReadQuery::default()).await?;
    let store = st.cp.store();
    let user = find_user(store, user)?;
    let project = match project.or(user.default_project_id.as_deref()) {
        Some(p) => find_project(store, p)?,
        None => {
            return Err(ApiError::new(
                ErrorCode::ValidationFailed,
                format!(
                    "user '{}' has no default project: name one with \"project\"",
                    user.name
                ),
            ))
        }
    };
    Ok((user, project))
}

async fn list_access_keys(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ByUserQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_barrier(
        &st,
        ReadQuery {
            consistency: q.consistency,
        },
    )
    .await?;
    let user = q
        .user
        .as_deref()
        .map(|u| find_user(st.cp.store(), u))
        .transpose()?;
    let keys: Vec<AccessKeyView> = st
        .cp
        .store()
        .list_access_keys()?
        .into_iter()
        .filter(|k| user.as_ref().is_none_or(|u| u.id == k.user_id))
        .map(|k| access_key_view(k, false))
        .collect();
    Ok(Json(json!({ "access_keys": keys })))
}

async fn create_access_key(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CredentialRequest>,
) -> Result<Response, ApiError> {
    let (user, project) = credential_owner(&st, &req.user, req.project.as_deref()).await?;
    let cmd = IdentityCommand::CreateAccessKey {
        access_key: tokens::generate_access_key(),
        secret_key: tokens::generate_secret_key(),
        user_id: user.id,
        project_id: project.id,
        description: req.description,
    };
    match run(&st, &headers, cmd).await? {
        IdentityOutcome::AccessKey(k) => {
            tracing::info!(caller = %caller.describe(), user = %user.name, access_key = %k.access_key, "access key created");
            Ok(created(access_key_view(k, true)))
        }
        o => Err(unexpected(o)),
    }
}

async fn delete_access_key(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(ak): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    run(
        &st,
        &headers,
        IdentityCommand::DeleteAccessKey {
            access_key: ak.clone(),
        },
    )
    .await?;
    tracing::info!(caller = %caller.describe(), access_key = %ak, "access key deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_api_keys(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ByUserQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_barrier(
        &st,
        ReadQuery {
            consistency: q.consistency,
        },
    )
    .await?;
    let user = q
        .user
        .as_deref()
        .map(|u| find_user(st.cp.store(), u))
        .transpose()?;
    let keys: Vec<ApiKeyView> = st
        .cp
        .store()
        .list_api_keys()?
        .into_iter()
        .filter(|k| user.as_ref().is_none_or(|u| u.id == k.user_id))
        .map(|k| api_key_view(k, None))
        .collect();
    Ok(Json(json!({ "api_keys": keys })))
}

async fn create_api_key(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CredentialRequest>,
) -> Result<Response, ApiError> {
    let (user, project) = credential_owner(&st, &req.user, req.project.as_deref()).await?;
    let key = tokens::random_hex(tokens::DANUBE_TOKEN_BYTES);
    let cmd = IdentityCommand::CreateApiKey {
        id: tokens::new_id(),
        key_hash: tokens::sha256_hex(&key),
        user_id: user.id,
        project_id: project.id,
        description: req.description,
    };
    match run(&st, &headers, cmd).await? {
        IdentityOutcome::ApiKey(k) => {
            tracing::info!(caller = %caller.describe(), user = %user.name, api_key = %k.id, "api key created");
            Ok(created(api_key_view(k, Some(key))))
        }
        o => Err(unexpected(o)),
    }
}

async fn delete_api_key(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    run(
        &st,
        &headers,
        IdentityCommand::DeleteApiKey { id: id.clone() },
    )
    .await?;
    tracing::info!(caller = %caller.describe(), api_key = %id, "api key deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- tokens ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueTokenRequest {
    /// Id or name.
    user: String,
    /// Id or name; the user's default project when absent.
    #[serde(default)]
    project: Option<String>,
    /// Lifetime, 1 s to 30 days; the Keystone token lifetime when absent.
    #[serde(default)]
    expires_in_secs: Option<u64>,
}

async fn list_tokens(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ByUserQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_barrier(
        &st,
        ReadQuery {
            consistency: q.consistency,
        },
    )
    .await?;
    let user = q
        .user
        .as_deref()
        .map(|u| find_user(st.cp.store(), u))
        .transpose()?;
    let list: Vec<TokenView> = st
        .cp
        .store()
        .list_tokens()?
        .into_iter()
        .filter(|t| user.as_ref().is_none_or(|u| u.id == t.user_id))
        .map(|t| token_view(t, None))
        .collect();
    Ok(Json(json!({ "tokens": list })))
}

async fn issue_token(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<IssueTokenRequest>,
) -> Result<Response, ApiError> {
    let ttl = match req.expires_in_secs {
        Some(s) => {
            let ms = s.saturating_mul(1000);
            if !(TOKEN_TTL_MIN_MS..=TOKEN_TTL_MAX_MS).contains(&ms) {
                return Err(ApiError::new(
                    ErrorCode::ValidationFailed,
                    format!("invalid expires_in_secs: 1 to {}", TOKEN_TTL_MAX_MS / 1000),
                ));
            }
            std::time::Duration::from_millis(ms)
        }
        None => st.auth.options.token_ttl,
    };
    read_barrier(&st, ReadQuery::default()).await?;
    let user = find_user(st.cp.store(), &req.user)?;
    let scope = match req.project {
        Some(p) => Scope::ProjectId(find_project(st.cp.store(), &p)?.id),
        None => Scope::Default,
    };
    let issued = tokens::issue_token(&st, &user, scope, "issued", ttl, tokens::TOKEN_BYTES)
        .await
        .map_err(|e| match e {
            tokens::LoginError::Scope { reason } => ApiError::new(ErrorCode::Conflict, reason),
            tokens::LoginError::Cluster(e) => e,
            tokens::LoginError::RateLimited { .. } | tokens::LoginError::Rejected { .. } => {
                ApiError::internal("token issue refused unexpectedly")
            }
        })?;
    tracing::info!(caller = %caller.describe(), user = %user.name, token_id = %short_id(&issued.record.id), "token issued by an admin");
    Ok(created(token_view(issued.record, Some(issued.token))))
}

async fn revoke_token(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    run(
        &st,
        &headers,
        IdentityCommand::RevokeToken {
            token_hash: id.clone(),
        },
    )
    .await?;
    tracing::info!(caller = %caller.describe(), token_id = %short_id(&id), "token revoked by an admin");
    Ok(StatusCode::NO_CONTENT)
}

// ---- bootstrap (cluster init) ----

/// The optional body of `POST /drplane/v1/cluster/init`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InitRequest {
    /// Also create project `demo` with user `demo` (role member), for `drplane dev`.
    #[serde(default)]
    demo: bool,
}

/// The answer of init: the cluster status plus, once, generated passwords.
#[derive(Debug, Serialize)]
pub(crate) struct InitResponse {
    #[serde(flatten)]
    status: ClusterStatus,
    /// The `admin` user's password, when the server generated it (no
    /// `DRPLANE_ADMIN_PASSWORD`). Shown only in this answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_password: Option<String>,
    /// The `demo` user's password, when `demo` was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    demo_password: Option<String>,
}

/// `POST /drplane/v1/cluster/init`: a one-node cluster, then the first admin. If the
/// cluster exists but its identity store was never bootstrapped (an init whose bootstrap
/// did not complete), the bootstrap is completed instead of refusing.
pub(crate) async fn init(
    st: &AppState,
    req: Option<InitRequest>,
) -> Result<InitResponse, ApiError> {
    let req = req.unwrap_or_default();
    let status = match st.cp.init_cluster().await {
        Ok(s) => s,
        Err(ClusterError::Refused(m)) => {
            st.cp.read_barrier(Consistency::Linearizable).await?;
            if st.cp.store().identity_bootstrapped()? {
                return Err(ClusterError::Refused(m).into());
            }
            tracing::warn!("the cluster is initialized but has no user: completing the bootstrap");
            st.cp.cluster_status().await?
        }
        Err(e) => return Err(e.into()),
    };
    let (admin_password, generated) = match &st.auth.options.admin_password {
        Some(p) => (p.clone(), false),
        None => (tokens::generate_password(), true),
    };
    let admin_hash = tokens::hash_password_blocking(admin_password.clone()).await?;
    let demo_password = req.demo.then(tokens::generate_password);
    let demo = match &demo_password {
        Some(p) => Some(BootstrapDemo {
            project_id: tokens::new_id(),
            user_id: tokens::new_id(),
            password_hash: tokens::hash_password_blocking(p.clone()).await?,
        }),
        None => None,
    };
    let cmd = IdentityCommand::Bootstrap(Bootstrap {
        admin_project_id: tokens::new_id(),
        admin_user_id: tokens::new_id(),
        admin_password_hash: admin_hash,
        demo,
    });
    let created = match run(st, &HeaderMap::new(), cmd).await? {
        IdentityOutcome::Bootstrapped { created } => created,
        o => return Err(unexpected(o)),
    };
    if created {
        tracing::info!(
            generated_admin_password = generated,
            demo = req.demo,
            "identity bootstrapped: project admin, user admin"
        );
    }
    Ok(InitResponse {
        status,
        admin_password: (created && generated).then_some(admin_password),
        demo_password: demo_password.filter(|_| created),
    })
}

/// The init route's handler.
pub(crate) async fn init_handler(
    State(st): State<AppState>,
    OptionalJson(req): OptionalJson<InitRequest>,
) -> Result<Json<InitResponse>, ApiError> {
    Ok(Json(init(&st, req).await?))
}
