//! drplane's agent: the drivers that move data on one host.
//!
//! - [`driver`]: the [`Driver`] trait the agent's task runner calls, its types and errors.
//! - [`fs`]: real volumes under the agent's data directory; block sync over gRPC
//!   ([`blocksync`], `proto/blocksync.proto`) with a crash-safe journal ([`journal`]).
//! - [`sim`]: simulated volumes for scale tests, 1,000 agents in one process.
//! - [`control`]: the agent control protocol (`proto/control.proto`) between an agent and
//!   the leader's scheduler; [`runtime`]: the agent process (leader discovery, the control
//!   session, running assigned tasks through the driver).

#![allow(clippy::result_large_err)]

pub mod blocksync;
pub mod control;
pub mod digest;
pub mod driver;
pub mod fs;
pub mod journal;
pub mod manifest;
pub mod runtime;
pub mod sim;
pub mod tls;

/// Generated from `proto/blocksync.proto`.
pub mod proto {
    tonic::include_proto!("drplane.blocksync.v1");
}

pub use driver::{
    ApplyMode, Digest, Driver, DriverError, Inventory, MigrateRequest, PoolInfo, ProgressFn,
    SyncProgress, SyncRequest, SyncServer, SyncSource, SyncStats, VolumeInfo, VolumeKind,
    VolumeSpec, WriteOp, DEFAULT_BLOCK_SIZE,
};
pub use fs::{CrashPoint, FsConfig, FsDriver, ImageFormat, PoolConfig};
pub use sim::{SimConfig, SimDriver, SimNetwork};
pub use tls::AgentTls;
pub use tokio_util::sync::CancellationToken;
