//! Secrets and tokens: generation, digests, password hashing, resolving a presented token
//! or API key into a [`Caller`], and the password login every family's login shares.
//!
//! Only digests of tokens and API keys are replicated (`IssueToken` carries the SHA-256,
//! never the token). A lookup that misses on this node asks the cluster for one
//! linearizable read barrier and looks again: a token issued through another node a moment
//! ago may not be applied here yet.

use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use drplane_statemachine::command::Outcome;
use drplane_statemachine::identity::{
    IdentityCommand, IdentityOutcome, Project, Role, Token, User,
};
use drplane_statemachine::{Command, CommandError, Proposal, Store};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{now_ms, short_id, AuthFailure, AuthMethod, Caller};
use crate::control::Consistency;
use crate::error::ApiError;
use crate::routes::AppState;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Hex SHA-256 of a secret string: the replicated id of a token or API key.
pub fn sha256_hex(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// `n` random bytes from the operating system's generator, as hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex(&buf)
}

/// A new record id: 32 hex characters (a v4 UUID without dashes).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `len` random characters from `alphabet`.
fn random_from(alphabet: &[u8], len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 1];
    while out.len() < len {
        rand::rngs::OsRng.fill_bytes(&mut buf);
        // Rejection sampling keeps the distribution uniform.
        let limit = 256 - (256 % alphabet.len());
        if (buf[0] as usize) < limit {
            out.push(alphabet[buf[0] as usize % alphabet.len()] as char);
        }
    }
    out
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789";

/// A generated password: 24 letters and digits (about 142 bits).
pub fn generate_password() -> String {
    random_from(ALNUM, 24)
}

/// A Huawei-style access key: 20 upper-case letters and digits.
pub fn generate_access_key() -> String {
    random_from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 20)
}

/// A Huawei-style secret key: 40 letters and digits.
pub fn generate_secret_key() -> String {
    random_from(ALNUM, 40)
}

/// Token strings: 64 hex characters (Keystone, native), 40 for Danube as upstream.
pub const TOKEN_BYTES: usize = 32;
pub const DANUBE_TOKEN_BYTES: usize = 20;

/// Whether a presented token or API key has a form drplane issues (so a garbage value
/// never costs a read barrier).
pub fn looks_like_secret(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// argon2id PHC string of `password` with a fresh random salt. CPU-heavy: call through
/// [`hash_password_blocking`] from async code.
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| ApiError::internal(format!("encoding a salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("hashing a password: {e}")))
}

/// Whether `password` matches the PHC string (constant time in the password).
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

pub async fn hash_password_blocking(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::internal(format!("password hashing task failed: {e}")))?
}

/// Verifies off the async threads. With `phc == None` (no such user) a dummy hash is
/// checked anyway, so an unknown name takes as long as a wrong password.
pub async fn verify_password_blocking(password: String, phc: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || match phc {
        Some(phc) => verify_password(&password, &phc),
        None => {
            verify_password(&password, DUMMY_HASH);
            false
        }
    })
    .await
    .unwrap_or(false)
}

/// An argon2id hash of a random string nobody knows, with the default parameters.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$ZHJwbGFuZWR1bW15c2FsdA$2D3bmX7c0r1H0lZp0mJ3d9mVb9l9r1pXq6z7uP3yQ9Q";

/// Checks a password against the policy for passwords set through the API.
pub fn check_new_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 8 || password.len() > 1024 {
        return Err(ApiError::new(
            crate::error::ErrorCode::ValidationFailed,
            "invalid password: 8 to 1024 bytes",
        ));
    }
    Ok(())
}

// ---- resolving credentials ----

/// The caller acting as `user_id` in `project_id`, if both exist and are enabled and the
/// user holds a role there; otherwise why not (for the log, and as a 401 message).
pub fn caller_for(
    store: &Store,
    user_id: &str,
    project_id: &str,
    method: AuthMethod,
    token_id: Option<String>,
    access_key: Option<String>,
) -> Result<Caller, String> {
    let fail = |e: drplane_statemachine::StoreError| format!("identity store: {e}");
    let user = store
        .get_user(user_id)
        .map_err(fail)?
        .ok_or("the user of these credentials no longer exists")?;
    if !user.enabled {
        return Err(format!("user '{}' is disabled", user.name));
    }
    let project = store
        .get_project(project_id)
        .map_err(fail)?
        .ok_or("the project of these credentials no longer exists")?;
    if !project.enabled {
        return Err(format!("project '{}' is disabled", project.name));
    }
    let roles = store.effective_roles(user_id, project_id).map_err(fail)?;
    if roles.is_empty() {
        return Err(format!(
            "user '{}' no longer has a role on project '{}'",
            user.name, project.name
        ));
    }
    Ok(Caller {
        user_id: user.id,
        user_name: user.name,
        project_id: project.id,
        project_name: project.name,
        roles,
        method,
        token_id,
        access_key,
    })
}

/// Looks a record up locally; on a miss, waits for one linearizable read barrier and looks
/// again. A failed barrier counts as a miss (logged).
async fn lookup_with_barrier<T>(
    st: &AppState,
    get: impl Fn(&Store) -> Result<Option<T>, drplane_statemachine::StoreError>,
) -> Result<Option<T>, ApiError> {
    if let Some(found) = get(st.cp.store())? {
        return Ok(Some(found));
    }
    if let Err(e) = st.cp.read_barrier(Consistency::Linearizable).await {
        tracing::debug!(error = %e, "read barrier after a credential miss failed");
        return Ok(None);
    }
    Ok(get(st.cp.store())?)
}

/// Why a token is not usable now.
pub fn token_problem(t: &Token, now: u64) -> Option<&'static str> {
    if t.revoked_at_ms.is_some() {
        Some("the token has been revoked")
    } else if t.expires_at_ms <= now {
        Some("the token has expired")
    } else {
        None
    }
}

/// The valid token record of a presented token string; the refusal otherwise, with who
/// presented it for the log.
pub(crate) async fn valid_token(
    st: &AppState,
    presented: &str,
) -> Result<Token, (AuthFailure, String)> {
    if !looks_like_secret(presented) {
        return Err((
            AuthFailure::unauthorized("the token is not valid"),
            "token=(malformed)".into(),
        ));
    }
    let hash = sha256_hex(presented);
    let who = format!("token_id={}", short_id(&hash));
    let token = lookup_with_barrier(st, |s| s.get_token(&hash))
        .await
        .map_err(|e| (AuthFailure::from_api_error(&e), who.clone()))?
        .ok_or_else(|| {
            (
                AuthFailure::unauthorized("the token is not valid"),
                who.clone(),
            )
        })?;
    let who = format!("{who} user_id={}", token.user_id);
    if let Some(problem) = token_problem(&token, now_ms()) {
        return Err((AuthFailure::unauthorized(problem), who));
    }
    Ok(token)
}

/// A presented token → the caller.
pub(crate) async fn caller_from_token(
    st: &AppState,
    presented: &str,
    method: AuthMethod,
) -> Result<Caller, (AuthFailure, String)> {
    let token = valid_token(st, presented).await?;
    let who = format!("token_id={} user_id={}", short_id(&token.id), token.user_id);
    caller_for(
        st.cp.store(),
        &token.user_id,
        &token.project_id,
        method,
        Some(token.id.clone()),
        None,
    )
    .map_err(|reason| (AuthFailure::unauthorized(reason), who))
}

/// A presented Danube API key → the caller.
pub(crate) async fn caller_from_api_key(
    st: &AppState,
    presented: &str,
) -> Result<Caller, (AuthFailure, String)> {
    if !looks_like_secret(presented) {
        return Err((
            AuthFailure::unauthorized("Invalid API key."),
            "api_key=(malformed)".into(),
        ));
    }
    let hash = sha256_hex(presented);
    let key = lookup_with_barrier(st, |s| s.get_api_key_by_hash(&hash))
        .await
        .map_err(|e| (AuthFailure::from_api_error(&e), "api_key=?".into()))?;
    let Some(key) = key else {
        return Err((
            AuthFailure::unauthorized("Invalid API key."),
            format!("api_key_digest={}", short_id(&hash)),
        ));
    };
    let who = format!("api_key={} user_id={}", key.id, key.user_id);
    caller_for(
        st.cp.store(),
        &key.user_id,
        &key.project_id,
        AuthMethod::ApiKey,
        None,
        None,
    )
    .map_err(|reason| (AuthFailure::unauthorized(reason), who))
}

// ---- login ----

/// Which project a login asks for.
#[derive(Debug, Clone)]
pub enum Scope {
    /// The user's default project, or the only project it has a role on.
    Default,
    ProjectId(String),
    ProjectName(String),
}

/// A token just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The secret: shown to the caller once, never stored.
    pub token: String,
    pub record: Token,
    pub user: User,
    pub project: Project,
}

/// Why a login failed.
#[derive(Debug)]
pub enum LoginError {
    /// Too many failures for this name: 429 with `Retry-After`.
    RateLimited { retry_after_secs: u64 },
    /// Wrong name or password, or a disabled user: the caller gets a generic message, the
    /// log gets `reason`.
    Rejected { reason: String },
    /// Authenticated, but the asked project cannot be used: 401 with this message.
    Scope { reason: String },
    /// The cluster could not issue the token.
    Cluster(ApiError),
}

/// Which user a login names.
#[derive(Debug, Clone)]
pub enum UserRef {
    Name(String),
    Id(String),
}

impl UserRef {
    /// The rate-limit key and log label.
    pub fn label(&self) -> &str {
        match self {
            UserRef::Name(n) | UserRef::Id(n) => n,
        }
    }
}

/// Checks a password and issues a token scoped to `scope`.
pub(crate) async fn password_login(
    st: &AppState,
    user: &UserRef,
    password: &str,
    scope: Scope,
    method: &str,
    ttl: Duration,
    token_bytes: usize,
) -> Result<Issued, LoginError> {
    let label = user.label().to_string();
    if let Err(secs) = st.auth.limiter.check(&label) {
        return Err(LoginError::RateLimited {
            retry_after_secs: secs,
        });
    }
    let found = match user {
        UserRef::Name(n) => lookup_with_barrier(st, |s| s.get_user_by_name(n)).await,
        UserRef::Id(id) => lookup_with_barrier(st, |s| s.get_user(id)).await,
    }
    .map_err(LoginError::Cluster)?;
    let ok = verify_password_blocking(
        password.to_string(),
        found.as_ref().map(|u| u.password_hash.clone()),
    )
    .await;
    let user = match found {
        Some(u) if ok && u.enabled => u,
        Some(u) if ok => {
            st.auth.limiter.record_failure(&label);
            return Err(LoginError::Rejected {
                reason: format!("user '{}' is disabled", u.name),
            });
        }
        Some(_) => {
            st.auth.limiter.record_failure(&label);
            return Err(LoginError::Rejected {
                reason: "wrong password".into(),
            });
        }
        None => {
            st.auth.limiter.record_failure(&label);
            return Err(LoginError::Rejected {
                reason: "no such user".into(),
            });
        }
    };
    st.auth.limiter.record_success(&label);
    issue_token(st, &user, scope, method, ttl, token_bytes).await
}

/// Issues a token for an authenticated `user`.
pub(crate) async fn issue_token(
    st: &AppState,
    user: &User,
    scope: Scope,
    method: &str,
    ttl: Duration,
    token_bytes: usize,
) -> Result<Issued, LoginError> {
    issue(st, user, None, scope, method, ttl, token_bytes).await
}

/// Issues a token for the user of the valid token `parent` (Keystone's `token` method):
/// it expires when `parent` does at the latest, and not at all if `parent` was revoked or
/// expired by the time the command applies.
pub(crate) async fn issue_token_from(
    st: &AppState,
    user: &User,
    parent: &Token,
    scope: Scope,
    method: &str,
    ttl: Duration,
    token_bytes: usize,
) -> Result<Issued, LoginError> {
    issue(st, user, Some(parent), scope, method, ttl, token_bytes).await
}

async fn issue(
    st: &AppState,
    user: &User,
    parent: Option<&Token>,
    scope: Scope,
    method: &str,
    ttl: Duration,
    token_bytes: usize,
) -> Result<Issued, LoginError> {
    let store = st.cp.store();
    let scope_err = |reason: String| LoginError::Scope { reason };
    let project = match &scope {
        Scope::ProjectId(id) => lookup_with_barrier(st, |s| s.get_project(id))
            .await
            .map_err(LoginError::Cluster)?,
        Scope::ProjectName(name) => lookup_with_barrier(st, |s| s.get_project_by_name(name))
            .await
            .map_err(LoginError::Cluster)?,
        Scope::Default => {
            let by_default = match &user.default_project_id {
                Some(id) => store
                    .get_project(id)
                    .map_err(|e| LoginError::Cluster(e.into()))?,
                None => None,
            };
            match by_default {
                Some(p) => Some(p),
                None => {
                    let mut projects: Vec<String> = store
                        .list_role_assignments(Some(&user.id), None)
                        .map_err(|e| LoginError::Cluster(e.into()))?
                        .into_iter()
                        .map(|ra| ra.project_id)
                        .collect();
                    projects.dedup();
                    match projects.as_slice() {
                        [only] => store
                            .get_project(only)
                            .map_err(|e| LoginError::Cluster(e.into()))?,
                        _ => {
                            return Err(scope_err(format!(
                                "user '{}' has no default project: name the project to log in to",
                                user.name
                            )))
                        }
                    }
                }
            }
        }
    };
    let Some(project) = project else {
        return Err(scope_err(
            "the project does not exist or the user has no role on it".into(),
        ));
    };
    let token = random_hex(token_bytes);
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let cmd = Command::Identity(match parent {
        None => IdentityCommand::IssueToken {
            token_hash: sha256_hex(&token),
            user_id: user.id.clone(),
            project_id: project.id.clone(),
            method: method.to_string(),
            ttl_ms,
        },
        Some(p) => IdentityCommand::IssueTokenFrom {
            token_hash: sha256_hex(&token),
            parent_hash: p.id.clone(),
            project_id: project.id.clone(),
            method: method.to_string(),
            ttl_ms,
        },
    });
    if let Err(e) = cmd.validate() {
        return Err(LoginError::Cluster(e.into()));
    }
    let result = st
        .cp
        .propose(Proposal {
            request_id: None,
            command: cmd,
        })
        .await
        .map_err(|e| LoginError::Cluster(e.into()))?;
    match result {
        Ok(Outcome::Identity(IdentityOutcome::Token(record))) => Ok(Issued {
            token,
            record,
            user: user.clone(),
            project,
        }),
        Ok(other) => Err(LoginError::Cluster(ApiError::internal(format!(
            "IssueToken produced {other:?}"
        )))),
        Err(CommandError::NotFound { .. }) | Err(CommandError::Conflict(_)) => Err(scope_err(
            match parent {
                None => "the project does not exist, is disabled, or the user has no role on it",
                Some(_) => "the token has expired or been revoked, or the project does not exist, is disabled, or the user has no role on it",
            }
            .into(),
        )),
        Err(e) => Err(LoginError::Cluster(e.into())),
    }
}

/// Roles as Keystone and the native API list them.
pub fn role_names(roles: &[Role]) -> Vec<&'static str> {
    roles.iter().map(|r| r.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_randomness() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = random_hex(TOKEN_BYTES);
        assert_eq!(a.len(), 64);
        assert!(looks_like_secret(&a));
        assert_ne!(a, random_hex(TOKEN_BYTES));
        assert!(looks_like_secret(&random_hex(DANUBE_TOKEN_BYTES)));
        assert!(!looks_like_secret("not-a-token"));
        let p = generate_password();
        assert_eq!(p.len(), 24);
        assert!(p.bytes().all(|b| b.is_ascii_alphanumeric()));
        let ak = generate_access_key();
        assert!(drplane_statemachine::identity::validate_access_key(&ak).is_ok());
        assert_eq!(generate_secret_key().len(), 40);
        assert_eq!(new_id().len(), 32);
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(
            PasswordHash::new(DUMMY_HASH).is_ok(),
            "the dummy hash parses"
        );
        assert!(!verify_password("", DUMMY_HASH));
    }
}
