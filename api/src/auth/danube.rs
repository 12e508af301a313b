//! Danube Cloud's accounts endpoints (DANUBE-AUTH-LOGIN, DANUBE-AUTH-LOGOUT):
//!
//! - `POST /api/accounts/login/` with `{"username","password"}` as JSON (what esdc-api
//!   sends, `Content-Type: application/json; indent=4`) or as a form: 200
//!   `{"token","expires","detail"}`; the token (40 hex, one hour) is then sent as
//!   `Authorization: Token <token>`. Bad credentials: 400 `{"detail"}` as upstream; too
//!   many failures: 429 with `Retry-After`.
//! - `GET /api/accounts/logout/`: revokes the token the request carries; 200 `{"detail":"Bye."}`.
//!
//! The token is scoped to the user's default project (or its only project).
//!
//! Like every Danube reply, these carry `es_version`, `es_username` and `es_dc` (spec
//! §1.4): after a login the user who logged in and the user's DC (`main`), at logout the
//! caller; a refused login has no user yet (`es_username` empty, as upstream's anonymous
//! user).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drplane_statemachine::identity::IdentityCommand;
use drplane_statemachine::{Command, Proposal};
use serde_json::{json, Value};

use super::keystone::login_failure;
use super::tokens::{self, Scope, UserRef};
use super::{failure_response, AuthFailure, AuthMethod, Caller, Family};
use crate::families::danube::{with_headers, Ctx, DEFAULT_DC};
use crate::routes::AppState;
use crate::time::format_rfc3339_ms;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/accounts/login/", post(login))
        .route("/api/accounts/login", post(login))
        .route("/api/accounts/logout/", get(logout))
        .route("/api/accounts/logout", get(logout))
}

/// Danube's reply headers for `username` in the default DC.
fn danube_headers(resp: Response, username: &str) -> Response {
    with_headers(
        resp,
        &Ctx {
            username: username.to_string(),
            dc: DEFAULT_DC.to_string(),
        },
    )
}

fn bad_request(message: &str) -> Response {
    failure_response(
        Family::Danube,
        &AuthFailure::status(StatusCode::BAD_REQUEST, message),
    )
}

/// `%XX` and `+` decoding of one form value.
fn form_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                out.push(v);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// (username, password) from a JSON or form body.
fn credentials(headers: &HeaderMap, body: &[u8]) -> Result<(String, String), &'static str> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ct.starts_with("application/x-www-form-urlencoded") {
        let text = std::str::from_utf8(body).map_err(|_| "the form is not UTF-8")?;
        let mut user = None;
        let mut pass = None;
        for pair in text.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "username" => user = form_decode(v),
                "password" => pass = form_decode(v),
                _ => {}
            }
        }
        return match (user, pass) {
            (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Ok((u, p)),
            _ => Err("Must include \"username\" and \"password\"."),
        };
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| "JSON parse error.")?;
    match (
        v.get("username").and_then(Value::as_str),
        v.get("password").and_then(Value::as_str),
    ) {
        (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Ok((u.to_string(), p.to_string())),
        _ => Err("Must include \"username\" and \"password\"."),
    }
}

async fn login(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (username, password) = match credentials(&headers, &body) {
        Ok(c) => c,
        Err(msg) => return danube_headers(bad_request(msg), ""),
    };
    let user = UserRef::Name(username.clone());
    let issued = match tokens::password_login(
        &st,
        &user,
        &password,
        Scope::Default,
        "danube",
        st.auth.options.danube_token_ttl,
        tokens::DANUBE_TOKEN_BYTES,
    )
    .await
    {
        Ok(i) => i,
        Err(e) => return danube_headers(login_failure(Family::Danube, &username, e), ""),
    };
    tracing::info!(user = %issued.user.name, project = %issued.project.name, token_id = %super::short_id(&issued.record.id), "danube token issued");
    let resp = Json(json!({
        "token": issued.token,
        "expires": format_rfc3339_ms(issued.record.expires_at_ms),
        "detail": "Welcome to Danube Cloud API.",
    }))
    .into_response();
    danube_headers(resp, &issued.user.name)
}

async fn logout(State(st): State<AppState>, caller: Caller) -> Response {
    if let (AuthMethod::DanubeToken, Some(id)) = (caller.method, &caller.token_id) {
        let cmd = Command::Identity(IdentityCommand::RevokeToken {
            token_hash: id.clone(),
        });
        match st
            .cp
            .propose(Proposal {
                request_id: None,
                command: cmd,
            })
            .await
        {
            Ok(_) => {
                tracing::info!(caller = %caller.describe(), "danube token revoked at logout")
            }
            Err(e) => {
                return danube_headers(
                    failure_response(Family::Danube, &AuthFailure::from_api_error(&e.into())),
                    &caller.user_name,
                )
            }
        }
    }
    danube_headers(
        Json(json!({"detail": "Bye."})).into_response(),
        &caller.user_name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_and_form_credentials() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; indent=4"),
        );
        assert_eq!(
            credentials(&h, br#"{"username":"admin","password":"p w"}"#),
            Ok(("admin".into(), "p w".into()))
        );
        assert!(credentials(&h, br#"{"username":"admin"}"#).is_err());
        assert!(credentials(&h, b"nope").is_err());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert_eq!(
            credentials(&h, b"username=a%40b&password=x+y%21"),
            Ok(("a@b".into(), "x y!".into()))
        );
        assert!(credentials(&h, b"username=a").is_err());
        assert_eq!(form_decode("%zz"), None);
    }
}
