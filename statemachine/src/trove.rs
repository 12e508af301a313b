//! OpenStack Trove instances and replication sets.
//!
//! Owned by the Trove family; see `crate::domain` for how a module plugs in. Records go in
//! the column families below (key prefixes separate record kinds and indexes).

use serde::{Deserialize, Serialize};

use crate::command::CommandResult;
use crate::error::{CommandError, StoreError};
use crate::jobs::Job;
use crate::txn::Txn;

pub const CF_TROVE: &str = "trove";
pub const CF_TROVE_INDEX: &str = "trove_index";

pub const CFS: &[&str] = &[CF_TROVE, CF_TROVE_INDEX];

/// Commands of this family. Add new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TroveCommand {}

impl TroveCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        match *self {}
    }

    pub fn kind(&self) -> &'static str {
        match *self {}
    }
}

/// What this family's commands produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TroveOutcome {}

pub(crate) fn apply(
    _txn: &mut Txn<'_>,
    cmd: &TroveCommand,
    _now: u64,
) -> Result<CommandResult, StoreError> {
    match *cmd {}
}

/// Called whenever a job ends (SUCCESS or FAIL), after the pairs it held moved on.
pub(crate) fn on_job_end(_txn: &mut Txn<'_>, _job: &Job, _now: u64) -> Result<(), StoreError> {
    Ok(())
}
