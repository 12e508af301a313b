//! The small trait through which the HTTP API reaches the cluster. The API knows nothing of
//! openraft or RocksDB internals: it proposes commands, asks for a read barrier, then reads
//! the local state machine store.

use async_trait::async_trait;
use drplane_statemachine::{CommandResult, Proposal, Store};
use serde::{Deserialize, Serialize};

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Read index through the leader, then wait until this node has applied up to it.
    #[default]
    Linearizable,
    /// Read this node's state as it is.
    Stale,
}

/// Errors from the cluster, by what the caller should do about them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    /// No leader, no quorum or a deadline passed: retry later (HTTP 503 + Retry-After).
    #[error("cluster unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after_secs: u64,
    },
    /// The request was sent but its outcome is unknown (deadline passed after it may have
    /// been appended). Retry with the same Idempotency-Key to be safe. HTTP 503.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The operation is refused in the current state (site-majority rule, not
    /// initialized, already initialized, ...). HTTP 409.
    #[error("{0}")]
    Refused(String),
    /// The caller's mistake. HTTP 400.
    #[error("{0}")]
    BadRequest(String),
    /// No such member. HTTP 404.
    #[error("{0}")]
    NotFound(String),
    /// A fault on our side. HTTP 500, logged.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Role of a member in the Raft membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Voter,
    Learner,
}

/// One member of the cluster as `GET /drplane/v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: u64,
    pub site: String,
    pub http: String,
    pub raft: String,
    pub role: Role,
    pub leader: bool,
    /// Highest log index known replicated to this member (known only on the leader).
    pub matched_index: Option<u64>,
    /// Leader's last log index minus matched_index (known only on the leader).
    pub lag: Option<u64>,
}

/// The whole cluster in one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: u64,
    /// The leader as the answering node can tell: null on a follower that has not heard
    /// from its last leader for a lease (`leader_contact_ms` says how long).
    pub leader_id: Option<u64>,
    /// On a follower: milliseconds since it last heard from a leader; null on the leader.
    #[serde(default)]
    pub leader_contact_ms: Option<u64>,
    pub term: u64,
    /// Raft server state of the node that answered: Leader, Follower, Candidate, Learner.
    pub state: String,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub members: Vec<MemberInfo>,
}

/// A node to add as a learner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    pub id: u64,
    pub site: String,
    pub http: String,
    pub raft: String,
}

/// Liveness and readiness of this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Ready = knows a leader and has applied up to the commit index it learned.
    pub ready: bool,
    pub reason: String,
}

/// What the HTTP API needs from the node it runs on.
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> u64;

    /// Replicate a proposal through the leader (forwarded if this node is a follower) and
    /// return its result once it is committed and applied on this node.
    async fn propose(&self, proposal: Proposal) -> Result<CommandResult, ClusterError>;

    /// Wait until a read of the local store is as fresh as `consistency` asks.
    async fn read_barrier(&self, consistency: Consistency) -> Result<(), ClusterError>;

    /// The local state machine store, for reads after `read_barrier`.
    fn store(&self) -> &Store;

    /// Wait (briefly, without network) until this node has applied every entry it already
    /// knows to be committed. Credentials are checked against the local store with no
    /// read barrier; this closes the window in which a follower has learned that a
    /// revocation committed but has not applied it yet.
    async fn catch_up_local(&self) -> Result<(), ClusterError> {
        Ok(())
    }

    async fn cluster_status(&self) -> Result<ClusterStatus, ClusterError>;

    /// Make a one-node cluster of this node.
    async fn init_cluster(&self) -> Result<ClusterStatus, ClusterError>;

    /// Add a learner (forwarded to the leader).
    async fn add_learner(&self, member: NewMember) -> Result<ClusterStatus, ClusterError>;

    /// Learner -> voter. `force` skips the site-majority rule.
    async fn promote(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError>;

    /// Voter -> learner.
    async fn demote(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError>;

    /// Remove a member entirely.
    async fn remove(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError>;

    fn health(&self) -> Health;

    /// Prometheus text exposition of `drplane_*` metrics.
    fn metrics_text(&self) -> String;
}
