//! drplane's replicated state machine: domain records, typed commands, validation and a
//! deterministic `apply` over RocksDB column families.
//!
//! Architecture invariant: this crate knows nothing of Raft, the network, HTTP or any API
//! family's wire format. The Raft adapter hands it commands together with an opaque
//! "applied meta" blob (the last-applied log id and membership, encoded by the adapter),
//! and this crate writes both in one RocksDB write batch.

pub mod codec;
pub mod command;
pub mod danube;
pub mod domain;
pub mod error;
pub mod identity;
pub mod inventory;
pub mod jobs;
pub mod manila;
pub mod model;
pub mod replication;
pub mod sdrs;
pub mod store;
pub mod trove;
pub mod txn;

pub use command::{Command, CommandResult, Outcome, Proposal, ProposalBatch};
pub use error::{CommandError, StoreError};
pub use model::Site;
pub use store::Store;
