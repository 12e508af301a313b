//! Domain records. Timestamps are milliseconds since the Unix epoch, chosen by the
//! proposing leader and carried in the command (never read from a clock in `apply`).

use serde::{Deserialize, Serialize};

/// A failure domain: one site holds one copy of a workload; every node belongs to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub name: String,
    pub description: String,
    pub created_at_ms: u64,
}

/// Longest site name accepted.
pub const SITE_NAME_MAX: usize = 63;
/// Longest site description accepted, in bytes.
pub const SITE_DESCRIPTION_MAX: usize = 1024;
