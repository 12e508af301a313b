//! Typed commands and their results.
//!
//! One Raft log entry carries a [`ProposalBatch`]: the leader's timestamp plus many client
//! proposals (batching at the API boundary is how many writes share one log sync). Each
//! proposal may carry a request id; the state machine remembers recent ids with their
//! results, so a proposal retried after an ambiguous failure (leader change, lost reply)
//! is applied at most once.

use serde::{Deserialize, Serialize};

use crate::error::CommandError;
use crate::model::{Site, SITE_DESCRIPTION_MAX, SITE_NAME_MAX};

/// A state change. Add new variants at the end only: the variant index is on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Does nothing; used as a write barrier and by benchmarks of the bare path.
    Noop,
    CreateSite {
        name: String,
        description: String,
    },
    DeleteSite {
        name: String,
    },
    /// Projects, users, roles, credentials and tokens (`crate::identity`).
    Identity(crate::identity::IdentityCommand),
    /// Hosts, workloads and reservations (`crate::inventory`).
    Inventory(crate::inventory::InventoryCommand),
    /// Jobs and their tasks (`crate::jobs`).
    Jobs(crate::jobs::JobsCommand),
    /// Replication pairs and their operations (`crate::replication`).
    Replication(crate::replication::ReplicationCommand),
    /// Huawei SDRS/ECS records (`crate::sdrs`).
    Sdrs(crate::sdrs::SdrsCommand),
    /// Danube Cloud records (`crate::danube`).
    Danube(crate::danube::DanubeCommand),
    /// OpenStack Trove records (`crate::trove`).
    Trove(crate::trove::TroveCommand),
    /// OpenStack Manila records (`crate::manila`).
    Manila(crate::manila::ManilaCommand),
}

impl Command {
    /// Stateless validation, run by the API before proposing and again in `apply`
    /// (so a command that reaches the log from any path is still checked).
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            Command::Noop => Ok(()),
            Command::CreateSite { name, description } => {
                validate_site_name(name)?;
                if description.len() > SITE_DESCRIPTION_MAX {
                    return Err(CommandError::invalid(
                        "description",
                        format!("at most {SITE_DESCRIPTION_MAX} bytes"),
                    ));
                }
                Ok(())
            }
            Command::DeleteSite { name } => validate_site_name(name),
            Command::Identity(cmd) => cmd.validate(),
            Command::Inventory(cmd) => cmd.validate(),
            Command::Jobs(cmd) => cmd.validate(),
            Command::Replication(cmd) => cmd.validate(),
            Command::Sdrs(cmd) => cmd.validate(),
            Command::Danube(cmd) => cmd.validate(),
            Command::Trove(cmd) => cmd.validate(),
            Command::Manila(cmd) => cmd.validate(),
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Noop => "noop",
            Command::CreateSite { .. } => "create_site",
            Command::DeleteSite { .. } => "delete_site",
            Command::Identity(cmd) => cmd.kind(),
            Command::Inventory(cmd) => cmd.kind(),
            Command::Jobs(cmd) => cmd.kind(),
            Command::Replication(cmd) => cmd.kind(),
            Command::Sdrs(cmd) => cmd.kind(),
            Command::Danube(cmd) => cmd.kind(),
            Command::Trove(cmd) => cmd.kind(),
            Command::Manila(cmd) => cmd.kind(),
        }
    }
}

/// Site names: 1 to 63 characters of ASCII letters, digits, `.`, `_`, `-` and `/`
/// (for hierarchical names such as `eu/west/dc1`), starting and ending with a letter or
/// digit, with no empty `/` segment.
pub fn validate_site_name(name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > SITE_NAME_MAX {
        return Err(CommandError::invalid(
            "name",
            format!("must be 1 to {SITE_NAME_MAX} characters"),
        ));
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let last_ok = name
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !last_ok
        || name.contains("//")
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
    {
        return Err(CommandError::invalid(
            "name",
            "use letters, digits, '.', '_', '-' and '/', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// One client's proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Idempotency key: the same id is applied once; a repeat returns the first result.
    pub request_id: Option<String>,
    pub command: Command,
}

/// The payload of one Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalBatch {
    /// Milliseconds since the epoch, stamped by the leader that proposed the entry.
    pub time_ms: u64,
    pub proposals: Vec<Proposal>,
}

/// What a successful command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    Site(Site),
    Identity(crate::identity::IdentityOutcome),
    /// A host as stored after the command (`crate::inventory`).
    Host(Box<crate::inventory::Host>),
    /// The workloads as stored after the command.
    Workloads(Vec<crate::inventory::Workload>),
    /// A job as stored after the command (`crate::jobs`).
    Job(Box<crate::jobs::Job>),
    /// A task as stored after the command.
    Task(Box<crate::jobs::Task>),
    /// Ids of the tasks a command acted on (e.g. whose lease it expired).
    TaskIds(Vec<String>),
    /// A replication pair as stored after the command (`crate::replication`).
    Pair(Box<crate::replication::Pair>),
    Sdrs(Box<crate::sdrs::SdrsOutcome>),
    Danube(Box<crate::danube::DanubeOutcome>),
    Trove(Box<crate::trove::TroveOutcome>),
    Manila(Box<crate::manila::ManilaOutcome>),
}

pub type CommandResult = Result<Outcome, CommandError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names() {
        assert!(validate_site_name("site-a").is_ok());
        assert!(validate_site_name("dc1.rack_2").is_ok());
        assert!(validate_site_name("").is_err());
        assert!(validate_site_name("-lead").is_err());
        assert!(validate_site_name("has space").is_err());
        assert!(validate_site_name("eu/west/dc1").is_ok());
        assert!(validate_site_name("bench/run1-c256/t1/42").is_ok());
        assert!(validate_site_name("a//b").is_err());
        assert!(validate_site_name("a/").is_err());
        assert!(validate_site_name("/a").is_err());
        assert!(validate_site_name(&"x".repeat(64)).is_err());
        assert!(validate_site_name(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn description_limit() {
        let ok = Command::CreateSite {
            name: "a".into(),
            description: "d".repeat(SITE_DESCRIPTION_MAX),
        };
        assert!(ok.validate().is_ok());
        let too_long = Command::CreateSite {
            name: "a".into(),
            description: "d".repeat(SITE_DESCRIPTION_MAX + 1),
        };
        assert!(matches!(
            too_long.validate(),
            Err(CommandError::Invalid { .. })
        ));
    }
}
