//! The Keystone v3 subset OpenStack clients need, at `/v3` and `/identity/v3`:
//!
//! - `GET /v3` — version document (keystoneauth skips it when `auth_url` ends in `/v3`);
//! - `POST /v3/auth/tokens` — `password` (user by name + domain, or id) and `token`
//!   methods, scoped to a project by id or name + domain; answers 201 with
//!   `X-Subject-Token` and a token body whose catalog points `database` (Trove) and
//!   `sharev2` (Manila) at this cluster, built from the request's `Host`; a token from the
//!   `token` method expires when the presented token does, as in Keystone;
//! - `GET`/`HEAD /v3/auth/tokens` with `X-Subject-Token` — validate (admins any token,
//!   others their own);
//! - `DELETE /v3/auth/tokens` — revoke.
//!
//! Errors have Keystone's shape `{"error":{"code","title","message"}}`.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::identity::{IdentityCommand, Token, DEFAULT_DOMAIN, DEFAULT_DOMAIN_ID};
use drplane_statemachine::{Command, Proposal};
use serde::Deserialize;
use serde_json::{json, Value};

use super::tokens::{self, LoginError, Scope, UserRef};
use super::{failure_response, AuthFailure, Caller, Family};
use crate::routes::AppState;
use crate::time::format_rfc3339_ms;

pub(crate) fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for base in ["/v3", "/identity/v3"] {
        r = r
            .route(base, get(version))
            .route(&format!("{base}/"), get(version))
            .route(
                &format!("{base}/auth/tokens"),
                post(issue).get(validate).delete(revoke),
            );
    }
    r
}

fn fail(status: StatusCode, message: impl Into<String>) -> Response {
    failure_response(Family::Keystone, &AuthFailure::status(status, message))
}

/// `scheme://host` of this cluster as the client reached it. Only a plausible host name
/// (letters, digits, `.-:[]`) is echoed into URLs.
fn base_url(st: &AppState, headers: &HeaderMap) -> Result<String, Box<Response>> {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let plausible = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !plausible {
        return Err(Box::new(fail(
            StatusCode::BAD_REQUEST,
            "the request has no usable Host header to build the service catalog from",
        )));
    }
    Ok(format!("{}://{host}", st.auth.options.public_scheme))
}

async fn version(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let base = match base_url(&st, &headers) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    Json(json!({
        "version": {
            "id": "v3.14",
            "status": "stable",
            "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": format!("{base}/v3/")}],
            "media-types": [{
                "base": "application/json",
                "type": "application/vnd.openstack.identity-v3+json"
            }]
        }
    }))
    .into_response()
}

// ---- request bodies ----

#[derive(Debug, Deserialize)]
struct AuthRequest {
    auth: AuthBody,
}

#[derive(Debug, Deserialize)]
struct AuthBody {
    identity: IdentityBody,
    #[serde(default)]
    scope: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct IdentityBody {
    methods: Vec<String>,
    #[serde(default)]
    password: Option<PasswordBody>,
    #[serde(default)]
    token: Option<TokenBody>,
}

#[derive(Debug, Deserialize)]
struct PasswordBody {
    user: UserBody,
}

#[derive(Deserialize)]
struct UserBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<DomainBody>,
    password: String,
}

impl std::fmt::Debug for UserBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserBody")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenBody {
    id: String,
}

impl std::fmt::Debug for TokenBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenBody { .. }")
    }
}

#[derive(Debug, Deserialize)]
struct DomainBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

impl DomainBody {
    fn is_default(&self) -> bool {
        match (&self.id, &self.name) {
            (Some(id), _) => id == DEFAULT_DOMAIN_ID,
            (None, Some(name)) => name == DEFAULT_DOMAIN,
            (None, None) => false,
        }
    }
}

#[derive(Debug, Deserialize)]
struct TokensQuery {
    nocatalog: Option<String>,
}

fn wants_catalog(q: &TokensQuery) -> bool {
    // Keystone treats the mere presence of `nocatalog` (any value but false/0) as true.
    !matches!(q.nocatalog.as_deref(), Some(v) if !matches!(v, "false" | "0" | "False"))
}

/// The project scope of a request, or the 400/401 answer.
fn scope_of(scope: Option<&Value>) -> Result<Scope, Box<Response>> {
    let Some(scope) = scope else {
        return Ok(Scope::Default);
    };
    if scope.as_str() == Some("unscoped") {
        return Ok(Scope::Default);
    }
    let Some(project) = scope.get("project") else {
        return Err(Box::new(fail(
            StatusCode::UNAUTHORIZED,
            "drplane issues project-scoped tokens only: scope the request to a project",
        )));
    };
    if let Some(id) = project.get("id").and_then(Value::as_str) {
        return Ok(Scope::ProjectId(id.to_string()));
    }
    let Some(name) = project.get("name").and_then(Value::as_str) else {
        return Err(Box::new(fail(
            StatusCode::BAD_REQUEST,
            "the project scope needs an id, or a name and a domain",
        )));
    };
    let domain: Option<DomainBody> = project
        .get("domain")
        .cloned()
        .and_then(|d| serde_json::from_value(d).ok());
    match domain {
        Some(d) if d.is_default() => Ok(Scope::ProjectName(name.to_string())),
        Some(_) => Err(Box::new(fail(
            StatusCode::UNAUTHORIZED,
            "only the Default domain exists in drplane",
        ))),
        None => Err(Box::new(fail(
            StatusCode::BAD_REQUEST,
            "a project named in the scope needs its domain (e.g. {\"name\": \"Default\"})",
        ))),
    }
}

// ---- token bodies ----

/// The Keystone token body of a token.
fn token_body(st: &AppState, t: &Token, base: &str, catalog: bool) -> Result<Value, Box<Response>> {
    let store = st.cp.store();
    let internal = |e: drplane_statemachine::StoreError| {
        Box::new(failure_response(
            Family::Keystone,
            &AuthFailure::from_api_error(&crate::error::ApiError::from(e)),
        ))
    };
    let user = store.get_user(&t.user_id).map_err(internal)?;
    let project = store.get_project(&t.project_id).map_err(internal)?;
    let (Some(user), Some(project)) = (user, project) else {
        return Err(Box::new(fail(
            StatusCode::NOT_FOUND,
            "Could not find token.",
        )));
    };
    let roles = store
        .effective_roles(&t.user_id, &t.project_id)
        .map_err(internal)?;
    let domain = json!({"id": DEFAULT_DOMAIN_ID, "name": DEFAULT_DOMAIN});
    let methods = match t.method.as_str() {
        "token" => vec!["token"],
        _ => vec!["password"],
    };
    let mut body = json!({
        "methods": methods,
        "user": {
            "id": user.id,
            "name": user.name,
            "domain": domain,
            "password_expires_at": null
        },
        "audit_ids": [super::short_id(&t.id)],
        "expires_at": format_rfc3339_ms(t.expires_at_ms),
        "issued_at": format_rfc3339_ms(t.issued_at_ms),
        "project": {"id": project.id, "name": project.name, "domain": domain},
        "is_domain": false,
        "roles": roles
            .iter()
            .map(|r| json!({"id": r.as_str(), "name": r.as_str()}))
            .collect::<Vec<_>>(),
    });
    if catalog {
        if let Some(obj) = body.as_object_mut() {
            obj.insert("catalog".into(), service_catalog(base, &project.id));
        }
    }
    Ok(json!({ "token": body }))
}

/// The catalog: Trove (`database`), Manila (`sharev2`) and this identity service.
pub fn service_catalog(base: &str, project_id: &str) -> Value {
    let service = |id: &str, ty: &str, name: &str, url: String| {
        let endpoints: Vec<Value> = ["public", "internal", "admin"]
            .iter()
            .map(|iface| {
                json!({
                    "id": format!("{id}-{iface}"),
                    "interface": iface,
                    "region": "RegionOne",
                    "region_id": "RegionOne",
                    "url": url,
                })
            })
            .collect();
        json!({"id": id, "type": ty, "name": name, "endpoints": endpoints})
    };
    json!([
        service(
            "drplane-trove",
            "database",
            "trove",
            format!("{base}/v1.0/{project_id}")
        ),
        service(
            "drplane-manila",
            "sharev2",
            "manilav2",
            format!("{base}/v2/{project_id}")
        ),
        service(
            "drplane-keystone",
            "identity",
            "keystone",
            format!("{base}/v3")
        ),
    ])
}

// ---- handlers ----

async fn issue(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<TokensQuery>,
    body: Bytes,
) -> Response {
    let base = match base_url(&st, &headers) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let req: AuthRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("the request body is not a valid auth request: {e}"),
            )
        }
    };
    let scope = match scope_of(req.auth.scope.as_ref()) {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    let methods = &req.auth.identity.methods;
    let ttl = st.auth.options.token_ttl;
    let (result, label) = if methods.iter().any(|m| m == "password") {
        let Some(pw) = &req.auth.identity.password else {
            return fail(
                StatusCode::BAD_REQUEST,
                "the password method needs \"password\"",
            );
        };
        let user = match (&pw.user.id, &pw.user.name) {
            (Some(id), _) => UserRef::Id(id.clone()),
            (None, Some(name)) => {
                match &pw.user.domain {
                    Some(d) if d.is_default() => {}
                    Some(_) => {
                        tracing::warn!(user = %name, "login refused: unknown domain");
                        return fail(
                            StatusCode::UNAUTHORIZED,
                            "The request you have made requires authentication.",
                        );
                    }
                    None => {
                        return fail(
                            StatusCode::BAD_REQUEST,
                            "a user named in the request needs its domain (e.g. {\"name\": \"Default\"})",
                        )
                    }
                }
                UserRef::Name(name.clone())
            }
            (None, None) => return fail(StatusCode::BAD_REQUEST, "the user needs an id or a name"),
        };
        let label = user.label().to_string();
        (
            tokens::password_login(
                &st,
                &user,
                &pw.user.password,
                scope,
                "password",
                ttl,
                tokens::TOKEN_BYTES,
            )
            .await,
            label,
        )
    } else if methods.iter().any(|m| m == "token") {
        let Some(tb) = &req.auth.identity.token else {
            return fail(StatusCode::BAD_REQUEST, "the token method needs \"token\"");
        };
        let token = match tokens::valid_token(&st, &tb.id).await {
            Ok(t) => t,
            Err((f, who)) => {
                tracing::warn!(who, reason = %f.message, "token login refused");
                return failure_response(Family::Keystone, &f);
            }
        };
        let user = match st.cp.store().get_user(&token.user_id) {
            Ok(Some(u)) if u.enabled => u,
            Ok(_) => {
                return fail(
                    StatusCode::UNAUTHORIZED,
                    "The request you have made requires authentication.",
                )
            }
            Err(e) => {
                return failure_response(Family::Keystone, &AuthFailure::from_api_error(&e.into()))
            }
        };
        let label = user.name.clone();
        // As in Keystone, the new token expires when the presented one does (the state
        // machine caps it): otherwise a token could be renewed forever.
        (
            tokens::issue_token_from(&st, &user, &token, scope, "token", ttl, tokens::TOKEN_BYTES)
                .await,
            label,
        )
    } else {
        return fail(
            StatusCode::UNAUTHORIZED,
            "drplane supports the password and token authentication methods",
        );
    };
    let issued = match result {
        Ok(i) => i,
        Err(e) => return login_failure(Family::Keystone, &label, e),
    };
    tracing::info!(user = %issued.user.name, project = %issued.project.name, token_id = %super::short_id(&issued.record.id), "keystone token issued");
    let body = match token_body(&st, &issued.record, &base, wants_catalog(&q)) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&issued.token) {
        resp.headers_mut().insert("x-subject-token", v);
    }
    resp
}

/// The answer to a failed login in `family`'s shape, logged once.
pub(crate) fn login_failure(family: Family, label: &str, e: LoginError) -> Response {
    let f = match e {
        LoginError::RateLimited { retry_after_secs } => {
            tracing::warn!(user = %label, retry_after_secs, "login refused: too many failed attempts");
            let msg = match family {
                Family::Danube => format!(
                    "Request was throttled. Expected available in {retry_after_secs} seconds."
                ),
                _ => format!("too many failed logins for '{label}'; retry in {retry_after_secs} s"),
            };
            AuthFailure::status(StatusCode::TOO_MANY_REQUESTS, msg)
                .with_retry_after(retry_after_secs)
        }
        LoginError::Rejected { reason } => {
            tracing::warn!(user = %label, reason = %reason, "login failed");
            match family {
                // Danube answers bad credentials with 400 (DANUBE-AUTH-LOGIN).
                Family::Danube => AuthFailure::status(
                    StatusCode::BAD_REQUEST,
                    "Unable to log in with provided credentials.",
                ),
                _ => {
                    AuthFailure::unauthorized("The request you have made requires authentication.")
                }
            }
        }
        LoginError::Scope { reason } => {
            tracing::warn!(user = %label, reason = %reason, "login refused: project scope");
            match family {
                Family::Danube => AuthFailure::status(StatusCode::BAD_REQUEST, reason),
                _ => AuthFailure::unauthorized(reason),
            }
        }
        LoginError::Cluster(e) => {
            tracing::warn!(user = %label, error = %e, "login could not complete");
            AuthFailure::from_api_error(&e)
        }
    };
    failure_response(family, &f)
}

/// The subject token of a validate/revoke call, checked against the caller.
async fn subject(
    st: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<Token, Box<Response>> {
    let Some(presented) = headers
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    else {
        return Err(Box::new(fail(
            StatusCode::BAD_REQUEST,
            "send the token to check in the X-Subject-Token header",
        )));
    };
    let token = match tokens::valid_token(st, presented).await {
        Ok(t) => t,
        Err((f, who)) if f.status == StatusCode::UNAUTHORIZED => {
            tracing::info!(who, reason = %f.message, caller = %caller.describe(), "subject token not valid");
            return Err(Box::new(fail(
                StatusCode::NOT_FOUND,
                "Could not find token.",
            )));
        }
        Err((f, _)) => return Err(Box::new(failure_response(Family::Keystone, &f))),
    };
    if token.user_id != caller.user_id && !caller.is_admin() {
        tracing::warn!(caller = %caller.describe(), "refused to show another user's token");
        return Err(Box::new(fail(
            StatusCode::FORBIDDEN,
            "only an admin may check another user's token",
        )));
    }
    Ok(token)
}

async fn validate(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<TokensQuery>,
) -> Response {
    let base = match base_url(&st, &headers) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let token = match subject(&st, &caller, &headers).await {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    let body = match token_body(&st, &token, &base, wants_catalog(&q)) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let mut resp = Json(body).into_response();
    if let Some(v) = headers.get("x-subject-token") {
        resp.headers_mut().insert("x-subject-token", v.clone());
    }
    resp
}

async fn revoke(State(st): State<AppState>, caller: Caller, headers: HeaderMap) -> Response {
    let token = match subject(&st, &caller, &headers).await {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    let cmd = Command::Identity(IdentityCommand::RevokeToken {
        token_hash: token.id.clone(),
    });
    match st
        .cp
        .propose(Proposal {
            request_id: None,
            command: cmd,
        })
        .await
    {
        Ok(Ok(Outcome::Identity(_))) => {
            tracing::info!(caller = %caller.describe(), token_id = %super::short_id(&token.id), "token revoked");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(Ok(other)) => failure_response(
            Family::Keystone,
            &AuthFailure::from_api_error(&crate::error::ApiError::internal(format!(
                "RevokeToken produced {other:?}"
            ))),
        ),
        Ok(Err(_)) => fail(StatusCode::NOT_FOUND, "Could not find token."),
        Err(e) => failure_response(Family::Keystone, &AuthFailure::from_api_error(&e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert!(matches!(scope_of(None), Ok(Scope::Default)));
        let s = json!({"project": {"id": "p1"}});
        assert!(matches!(scope_of(Some(&s)), Ok(Scope::ProjectId(id)) if id == "p1"));
        let s = json!({"project": {"name": "demo", "domain": {"name": "Default"}}});
        assert!(matches!(scope_of(Some(&s)), Ok(Scope::ProjectName(n)) if n == "demo"));
        let s = json!({"project": {"name": "demo", "domain": {"id": "default"}}});
        assert!(matches!(scope_of(Some(&s)), Ok(Scope::ProjectName(_))));
        let s = json!({"project": {"name": "demo", "domain": {"name": "Other"}}});
        assert!(scope_of(Some(&s)).is_err());
        let s = json!({"domain": {"id": "default"}});
        assert!(scope_of(Some(&s)).is_err());
    }

    #[test]
    fn catalog_points_at_this_cluster() {
        let c = service_catalog("http://127.0.0.1:7001", "p1");
        let db = c
            .as_array()
            .and_then(|a| a.iter().find(|s| s["type"] == "database"))
            .expect("database");
        assert_eq!(db["endpoints"][0]["url"], "http://127.0.0.1:7001/v1.0/p1");
        assert_eq!(db["endpoints"][0]["interface"], "public");
        let share = c
            .as_array()
            .and_then(|a| a.iter().find(|s| s["type"] == "sharev2"))
            .expect("sharev2");
        assert_eq!(share["endpoints"][0]["url"], "http://127.0.0.1:7001/v2/p1");
    }

    #[test]
    fn nocatalog() {
        assert!(wants_catalog(&TokensQuery { nocatalog: None }));
        assert!(!wants_catalog(&TokensQuery {
            nocatalog: Some(String::new())
        }));
        assert!(!wants_catalog(&TokensQuery {
            nocatalog: Some("1".into())
        }));
        assert!(wants_catalog(&TokensQuery {
            nocatalog: Some("false".into())
        }));
    }
}
