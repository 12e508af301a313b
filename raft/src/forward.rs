//! Requests a node sends to the leader on a client's behalf, over the `Forward` RPC.

use drplane_statemachine::{CommandResult, Proposal};
use serde::{Deserialize, Serialize};

use crate::NodeInfo;

/// A membership change, as an operator asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    Promote(u64),
    Demote(u64),
    Remove(u64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// Client proposals for the leader's batcher.
    Propose(Vec<Proposal>),
    /// Confirm leadership with a quorum and return the index a linearizable read must wait for.
    ReadIndex,
    AddLearner {
        id: u64,
        node: NodeInfo,
    },
    ChangeMembership {
        change: MembershipChange,
        force: bool,
    },
    /// The leader's view of replication progress, for cluster status.
    Replication,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardResponse {
    /// Results in order, with the log index that carried them.
    Proposed {
        index: u64,
        results: Vec<CommandResult>,
    },
    ReadIndex(Option<u64>),
    Done,
    /// member id -> matched log index, and the leader's last log index.
    Replication {
        matched: Vec<(u64, Option<u64>)>,
        last_log_index: Option<u64>,
    },
}

/// Why a forwarded request failed, from the leader's side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NodeError {
    #[error("not the leader (leader is {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("internal: {0}")]
    Internal(String),
}
