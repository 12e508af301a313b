//! Huawei SDRS protection groups and protected instances (and the ECS view of servers).
//!
//! Owned by the Sdrs family; see `crate::domain` for how a module plugs in. Records go in
//! the column families below (key prefixes separate record kinds and indexes).

use serde::{Deserialize, Serialize};

use crate::command::CommandResult;
use crate::error::{CommandError, StoreError};
use crate::jobs::Job;
use crate::txn::Txn;

pub const CF_SDRS: &str = "sdrs";
pub const CF_SDRS_INDEX: &str = "sdrs_index";

pub const CFS: &[&str] = &[CF_SDRS, CF_SDRS_INDEX];

/// Commands of this family. Add new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdrsCommand {}

impl SdrsCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        match *self {}
    }

    pub fn kind(&self) -> &'static str {
        match *self {}
    }
}

/// What this family's commands produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdrsOutcome {}

pub(crate) fn apply(
    _txn: &mut Txn<'_>,
    cmd: &SdrsCommand,
    _now: u64,
) -> Result<CommandResult, StoreError> {
    match *cmd {}
}

/// Called whenever a job ends (SUCCESS or FAIL), after the pairs it held moved on.
pub(crate) fn on_job_end(_txn: &mut Txn<'_>, _job: &Job, _now: u64) -> Result<(), StoreError> {
    Ok(())
}
