//! A one-node [`ControlPlane`] over a real [`Store`] in a temporary directory, with
//! switchable faults, and helpers to call the router in process.
//!
//! Identity: [`setup`] bootstraps the store (project `admin`, user `admin` with
//! [`ADMIN_PASSWORD`]) and issues [`ADMIN_TOKEN`]; [`send`] adds that token to every request
//! that carries no credentials of its own. [`send_raw`] sends exactly what it is given, and
//! [`setup_fresh`] gives a router over a store with no identity yet.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, Response};
use drplane_api::{
    ClusterError, ClusterStatus, Consistency, ControlPlane, Health, MemberInfo, NewMember, Role,
};
use drplane_statemachine::{CommandResult, Proposal, ProposalBatch, Store};
use tower::ServiceExt;

/// What the fake cluster answers to every cluster call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Unavailable { retry_after_secs: u64 },
    Unknown,
    Refused,
    Internal,
}

pub struct FakeCluster {
    store: Store,
    _dir: tempfile::TempDir,
    fault: Mutex<Fault>,
    members: Mutex<Vec<MemberInfo>>,
    /// Serializes applies, as the single Raft apply loop would.
    apply: Mutex<()>,
    pub proposals: AtomicUsize,
    pub last_force: Mutex<Option<bool>>,
    pub last_consistency: Mutex<Option<Consistency>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl FakeCluster {
    pub fn new() -> Arc<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open store");
        Arc::new(FakeCluster {
            store,
            _dir: dir,
            fault: Mutex::new(Fault::None),
            members: Mutex::new(vec![member(1, Role::Voter, true)]),
            apply: Mutex::new(()),
            proposals: AtomicUsize::new(0),
            last_force: Mutex::new(None),
            last_consistency: Mutex::new(None),
        })
    }

    pub fn set_fault(&self, f: Fault) {
        *self.fault.lock().expect("lock") = f;
    }

    pub fn proposals(&self) -> usize {
        self.proposals.load(Ordering::SeqCst)
    }

    pub fn last_force(&self) -> Option<bool> {
        *self.last_force.lock().expect("lock")
    }

    pub fn last_consistency(&self) -> Option<Consistency> {
        *self.last_consistency.lock().expect("lock")
    }

    fn check(&self) -> Result<(), ClusterError> {
        match *self.fault.lock().expect("lock") {
            Fault::None => Ok(()),
            Fault::Unavailable { retry_after_secs } => Err(ClusterError::Unavailable {
                reason: "no leader known".into(),
                retry_after_secs,
            }),
            Fault::Unknown => Err(ClusterError::Unknown("deadline passed after append".into())),
            Fault::Refused => Err(ClusterError::Refused(
                "promoting would leave no site majority".into(),
            )),
            Fault::Internal => Err(ClusterError::Internal("disk on fire at /srv/x".into())),
        }
    }

    fn status(&self) -> ClusterStatus {
        ClusterStatus {
            leader_contact_ms: None,
            node_id: 1,
            leader_id: Some(1),
            term: 3,
            state: "Leader".into(),
            last_log_index: Some(10),
            commit_index: Some(10),
            applied_index: Some(10),
            members: self.members.lock().expect("lock").clone(),
        }
    }

    fn change_member(
        &self,
        id: u64,
        force: bool,
        f: impl FnOnce(&mut Vec<MemberInfo>, usize),
    ) -> Result<ClusterStatus, ClusterError> {
        self.check()?;
        *self.last_force.lock().expect("lock") = Some(force);
        {
            let mut members = self.members.lock().expect("lock");
            let pos = members
                .iter()
                .position(|m| m.id == id)
                .ok_or_else(|| ClusterError::NotFound(format!("no member with id {id}")))?;
            f(&mut members, pos);
        }
        Ok(self.status())
    }
}

pub fn member(id: u64, role: Role, leader: bool) -> MemberInfo {
    MemberInfo {
        id,
        site: format!("site-{id}"),
        http: format!("127.0.0.1:{}", 8000 + id),
        raft: format!("127.0.0.1:{}", 9000 + id),
        role,
        leader,
        matched_index: Some(10),
        lag: Some(0),
    }
}

#[async_trait]
impl ControlPlane for FakeCluster {
    fn node_id(&self) -> u64 {
        1
    }

    async fn propose(&self, proposal: Proposal) -> Result<CommandResult, ClusterError> {
        self.check()?;
        self.proposals.fetch_add(1, Ordering::SeqCst);
        let _guard = self.apply.lock().expect("lock");
        let batch = ProposalBatch {
            time_ms: now_ms(),
            proposals: vec![proposal],
        };
        let results = self
            .store
            .apply_entry(Some(&batch), b"fake-meta")
            .map_err(|e| ClusterError::Internal(e.to_string()))?;
        results
            .into_iter()
            .next()
            .ok_or_else(|| ClusterError::Internal("no result".into()))
    }

    async fn read_barrier(&self, consistency: Consistency) -> Result<(), ClusterError> {
        self.check()?;
        *self.last_consistency.lock().expect("lock") = Some(consistency);
        Ok(())
    }

    fn store(&self) -> &Store {
        &self.store
    }

    async fn cluster_status(&self) -> Result<ClusterStatus, ClusterError> {
        self.check()?;
        Ok(self.status())
    }

    async fn init_cluster(&self) -> Result<ClusterStatus, ClusterError> {
        self.check()?;
        Ok(self.status())
    }

    async fn add_learner(&self, m: NewMember) -> Result<ClusterStatus, ClusterError> {
        self.check()?;
        let mut members = self.members.lock().expect("lock");
        if m.http.is_empty() {
            return Err(ClusterError::BadRequest("http address is empty".into()));
        }
        members.push(MemberInfo {
            id: m.id,
            site: m.site,
            http: m.http,
            raft: m.raft,
            role: Role::Learner,
            leader: false,
            matched_index: None,
            lag: None,
        });
        drop(members);
        Ok(self.status())
    }

    async fn promote(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError> {
        self.change_member(id, force, |ms, i| ms[i].role = Role::Voter)
    }

    async fn demote(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError> {
        self.change_member(id, force, |ms, i| ms[i].role = Role::Learner)
    }

    async fn remove(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError> {
        self.change_member(id, force, |ms, i| {
            ms.remove(i);
        })
    }

    fn health(&self) -> Health {
        match *self.fault.lock().expect("lock") {
            Fault::Unavailable { .. } => Health {
                ready: false,
                reason: "no leader known".into(),
            },
            _ => Health {
                ready: true,
                reason: "leader known and applied up to commit".into(),
            },
        }
    }

    fn metrics_text(&self) -> String {
        "# TYPE drplane_raft_term gauge\ndrplane_raft_term 3".into()
    }
}

/// The `admin` user's password in [`setup`]'s store (also the server's
/// `DRPLANE_ADMIN_PASSWORD` in its options).
pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
/// A token of `admin` on project `admin`, valid for an hour.
pub const ADMIN_TOKEN: &str = "adadadadadadadadadadadadadadadadadadadadadadadadadadadadadadadad";
pub const ADMIN_USER_ID: &str = "admin-user";
pub const ADMIN_PROJECT_ID: &str = "admin-project";

/// argon2 of [`ADMIN_PASSWORD`], computed once per test binary.
pub fn admin_password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        drplane_api::auth::tokens::hash_password(ADMIN_PASSWORD).expect("hash the admin password")
    })
}

/// Options of the routers built here: the admin password as `DRPLANE_ADMIN_PASSWORD`.
pub fn test_auth_options() -> drplane_api::AuthOptions {
    drplane_api::AuthOptions {
        admin_password: Some(ADMIN_PASSWORD.to_string()),
        ..Default::default()
    }
}

impl FakeCluster {
    /// Applies identity commands directly (as committed entries), returning their outcomes.
    pub fn apply_identity(
        &self,
        cmds: Vec<drplane_statemachine::identity::IdentityCommand>,
    ) -> Vec<CommandResult> {
        let _guard = self.apply.lock().expect("lock");
        let batch = ProposalBatch {
            time_ms: now_ms(),
            proposals: cmds
                .into_iter()
                .map(|c| Proposal {
                    request_id: None,
                    command: drplane_statemachine::Command::Identity(c),
                })
                .collect(),
        };
        self.store
            .apply_entry(Some(&batch), b"fake-meta")
            .expect("apply identity")
    }

    /// Bootstraps `admin` and issues [`ADMIN_TOKEN`].
    pub fn bootstrap_identity(&self) {
        use drplane_statemachine::identity::{Bootstrap, IdentityCommand};
        let results = self.apply_identity(vec![
            IdentityCommand::Bootstrap(Bootstrap {
                admin_project_id: ADMIN_PROJECT_ID.into(),
                admin_user_id: ADMIN_USER_ID.into(),
                admin_password_hash: admin_password_hash().to_string(),
                demo: None,
            }),
            IdentityCommand::IssueToken {
                token_hash: drplane_api::auth::tokens::sha256_hex(ADMIN_TOKEN),
                user_id: ADMIN_USER_ID.into(),
                project_id: ADMIN_PROJECT_ID.into(),
                method: "issued".into(),
                ttl_ms: 3_600_000,
            },
        ]);
        for r in results {
            r.expect("bootstrap identity");
        }
    }
}

/// A router over a fresh fake cluster whose identity is bootstrapped (see the module docs).
pub fn setup() -> (Arc<FakeCluster>, axum::Router) {
    let cp = FakeCluster::new();
    cp.bootstrap_identity();
    let router = drplane_api::router_with(cp.clone(), test_auth_options());
    (cp, router)
}

/// A router over a fake cluster with no identity yet (as before the first init).
pub fn setup_fresh() -> (Arc<FakeCluster>, axum::Router) {
    let cp = FakeCluster::new();
    let router = drplane_api::router_with(cp.clone(), test_auth_options());
    (cp, router)
}

/// One answered request: status, headers and the body as bytes.
pub struct Answer {
    pub status: u16,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("visible header").to_string())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req`, adding `X-Auth-Token: ADMIN_TOKEN` unless it has credentials of its own
/// (`X-Auth-Token`, `Authorization` or `ES-API-KEY`).
pub async fn send(router: &axum::Router, mut req: Request<Body>) -> Answer {
    let h = req.headers();
    if !h.contains_key("x-auth-token")
        && !h.contains_key("authorization")
        && !h.contains_key("es-api-key")
    {
        req.headers_mut().insert(
            "x-auth-token",
            axum::http::HeaderValue::from_static(ADMIN_TOKEN),
        );
    }
    send_raw(router, req).await
}

/// Sends `req` exactly as given.
pub async fn send_raw(router: &axum::Router, req: Request<Body>) -> Answer {
    let resp: Response<Body> = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .expect("read body")
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

pub fn req(method: &str, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .expect("request")
}

pub fn json_req(method: &str, uri: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

pub async fn get(router: &axum::Router, uri: &str) -> Answer {
    send(router, req("GET", uri)).await
}

pub async fn post_json(router: &axum::Router, uri: &str, body: &str) -> Answer {
    send(router, json_req("POST", uri, body)).await
}

/// Asserts the native error shape, status and code; returns the message.
pub fn assert_error(a: &Answer, status: u16, code: &str) -> String {
    assert_eq!(a.status, status, "status; body: {}", a.text());
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("application/json"),
        "error content type"
    );
    let v = a.json();
    let err = v
        .get("error")
        .unwrap_or_else(|| panic!("no error object: {v}"));
    let mut keys: Vec<&str> = err
        .as_object()
        .expect("error is an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["code", "fix", "message", "status"],
        "error keys: {v}"
    );
    assert_eq!(err["code"], code, "code: {v}");
    assert_eq!(err["status"], status, "status field: {v}");
    let fix = err["fix"].as_str().expect("fix is a string");
    assert!(!fix.is_empty(), "empty fix: {v}");
    let message = err["message"].as_str().expect("message is a string");
    assert!(!message.is_empty(), "empty message: {v}");
    assert!(a.header("x-request-id").is_some(), "no X-Request-Id");
    message.to_string()
}
