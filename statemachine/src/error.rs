use serde::{Deserialize, Serialize};

/// Why a command was refused by the state machine. Deterministic: every node refuses the
/// same command with the same error. Callers (the API families) branch on the variant to
/// pick their own status code and error shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("{kind} '{id}' not found")]
    NotFound { kind: String, id: String },
    #[error("{kind} '{id}' already exists")]
    AlreadyExists { kind: String, id: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("conflict: {0}")]
    Conflict(String),
}

impl CommandError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        CommandError::Invalid {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// A failure of the store itself (disk, corruption, codec). Never the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("codec: {0}")]
    Codec(String),
    #[error("missing column family {0}")]
    MissingColumnFamily(&'static str),
    #[error("corrupt snapshot: {0}")]
    Snapshot(String),
}
