//! drplane's HTTP API.
//!
//! [`router`] serves `/livez`, `/readyz`, `/metrics` and the native `/drplane/v1` API of
//! one node. It reaches the cluster only through the [`ControlPlane`] trait: propose a
//! command, ask for a read barrier, read the local store, manage membership.
//!
//! Architecture invariant: this crate knows nothing of openraft or RocksDB internals;
//! it sees [`drplane_statemachine::Store`] only through its read methods.
//!
//! Architecture invariant: every non-2xx answer has the native error shape
//! `{"error":{"code","status","message","fix"}}` with a code from [`ErrorCode`]; bad
//! input is a 4xx, never a panic or a 500.
//!
//! Code map:
//! - `auth`: authentication middleware, callers, Keystone and Danube logins, the Huawei
//!   signature verifier;
//! - `identity`: the native identity admin API and the bootstrap run by `cluster/init`;
//! - `control`: the trait the node implements, and the cluster types it returns;
//! - `error`: the error code registry (listed in `ERRORS.md`) and [`ApiError`];
//! - `extract`: extractors that answer bad input in the native shape;
//! - `families`: the vendor API families, one module each (`huawei` = SDRS + ECS,
//!   `danube`, `trove`, `manila`);
//! - `pairs`: native replication-pair endpoints;
//! - `inventory`: native hosts, servers, shares and databases endpoints (admin);
//! - `jobs`: native jobs endpoints (list, show with tasks, cancel, test jobs);
//! - `middleware`: request id, tracing span, access log, metrics, error-shape guarantee;
//! - `metrics`: the HTTP layer's own Prometheus metrics;
//! - `routes`: the handlers and [`router`];
//! - `time`: RFC 3339 formatting of millisecond timestamps.

pub mod auth;
pub mod control;
pub mod error;
mod extract;
mod families;
mod identity;
mod inventory;
mod jobs;
pub mod metrics;
pub mod middleware;
mod pairs;
mod routes;
pub mod time;

pub use auth::{AuthOptions, Caller};
pub use control::{
    ClusterError, ClusterStatus, Consistency, ControlPlane, Health, MemberInfo, NewMember, Role,
};
pub use error::{ApiError, CodeInfo, ErrorCode};
pub use extract::BODY_LIMIT_BYTES;
pub use routes::{router, router_with, IDEMPOTENCY_KEY_HEADER};
