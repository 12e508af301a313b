//! drplane's Raft layer: openraft's type configuration, the RocksDB log store, the adapter
//! that drives the `statemachine` crate, snapshots, the gRPC transport, and [`RaftNode`],
//! the handle the rest of the node uses to propose, read and change membership.
//!
//! Architecture invariant: nothing here knows HTTP or the API families. Callers hand in
//! `statemachine` proposals and get `statemachine` results back.

// openraft's StorageError and tonic's Status are large by their authors' design and are
// dictated by the traits we implement; boxing them here would only add allocations.
#![allow(clippy::result_large_err)]

pub mod eager;
pub mod election;
pub mod forward;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod node;
pub mod service;
pub mod snapshot_data;
pub mod state_machine;

pub mod pb {
    tonic::include_proto!("drplane.raft.v1");
}

use std::fmt;

use serde::{Deserialize, Serialize};

pub use forward::{MembershipChange, NodeError};
pub use node::{ClusterView, MemberView, RaftNode, RaftNodeConfig};

/// What every member advertises: its site and the addresses to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub site: String,
    /// HTTP API address, `host:port`.
    pub http: String,
    /// Raft gRPC address, `host:port`.
    pub raft: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{site:{}, http:{}, raft:{}}}",
            self.site, self.http, self.raft
        )
    }
}

/// The response of one log entry: one result per proposal it carried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied(pub Vec<drplane_statemachine::CommandResult>);

openraft::declare_raft_types!(
    /// drplane's openraft type configuration.
    pub TypeConfig:
        D = drplane_statemachine::ProposalBatch,
        R = Applied,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::snapshot_data::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, NodeInfo>;
pub type StorageError = openraft::StorageError<u64>;

/// Wrap any error as openraft's opaque error type.
pub(crate) fn any_err(e: impl std::error::Error + 'static) -> openraft::AnyError {
    openraft::AnyError::new(&e)
}

/// Milliseconds since the Unix epoch (leader-side stamping only; never in `apply`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
