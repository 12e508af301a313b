//! Huawei SDRS protection groups, protected instances and the SDRS view of replication
//! pairs, and the ECS operations on servers (cold migration, batch stop).
//!
//! These records are the Huawei family's own: their statuses are SDRS's names (§2 of
//! `../shared/spec/sdrs.md`) and a refusal carries the documented code as the first word
//! of a `CommandError::Conflict` (`"SDRS.1002 the protection group is …"`, see
//! [`refusal_code`]), so every node refuses with the same code and the API answers it
//! as documented. The data path is the shared model: a protected instance's disks are
//! `crate::replication` pairs (owner `sdrs/instance/<id>`), its DR server is an
//! inventory server, and every asynchronous call is a `crate::jobs` job composed here in
//! one command (check everything, then write).
//!
//! Status machines (sdrs.md §2.1): one group operation = one job with one sub-job per
//! protected instance (its pairs' tasks) and the group's unattached pairs' tasks at the top.
//!
//! ```text
//!  available ─start─► starting ─► protected ─stop─► stopping ─► available
//!  protected ─reverse{station}─► reversing ─► protected (priority_station = station)
//!  protected ─failover─► failing-over ─► failed-over (station flipped)
//!  failed-over ─start─► reprotecting ─► protected
//!  any transient ─job FAIL─► error-<op>   (each instance: its own sub-job's result)
//! ```
//!
//! When a job ends, [`on_job_end`] (after `replication::on_job_end` moved the pairs) reads
//! `job/<id>` in `sdrs_index` to learn what the job was for, and settles the statuses.
//! A retried group operation skips the instances already on the requested side, so each
//! instance fails over exactly once.
//!
//! Column families:
//! - `sdrs`: `g/<id>` [`Group`], `i/<id>` [`Instance`], `p/<id>` [`SdrsPair`],
//!   `e/<server id>` [`EcsServer`];
//! - `sdrs_index`: `gp/<project>\0<group>`, `ig/<group>\0<instance>`,
//!   `ip/<project>\0<instance>`, `pg/<group>\0<pair>`, `pp/<project>\0<pair>`,
//!   `srv/<server>` → instance id (protected or DR server), `vol/<volume>` → pair id,
//!   `job/<job id>` → [`JobRef`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{CommandResult, Outcome};
use crate::error::{CommandError, StoreError};
use crate::inventory::{
    self, validate_id, validate_project, Host, InventoryCommand, ResourceAmount, Server,
    ServerStatus, Workload, CF_HOSTS, CF_SERVERS,
};
use crate::jobs::{
    self, Job, JobStatus, MigrateDisk, NewJob, NewTask, TaskKind, VolumeLayout, VolumeRef,
    WorkloadAction,
};
use crate::replication::{self, NewPair, Pair, PairOp, PairState, ReplicationCommand};
use crate::store::{Store, CF_SITES};
use crate::txn::Txn;

pub const CF_SDRS: &str = "sdrs";
pub const CF_SDRS_INDEX: &str = "sdrs_index";

pub const CFS: &[&str] = &[CF_SDRS, CF_SDRS_INDEX];

/// Longest name and description, in UTF-8 bytes (sdrs.md §1.5).
pub const NAME_MAX: usize = 64;
pub const DESCRIPTION_MAX: usize = 64;
/// Protection groups per project (SDRS.0305).
pub const GROUPS_PER_PROJECT_MAX: usize = 1000;
/// Protected instances per group (SDRS.1358).
pub const INSTANCES_PER_GROUP_MAX: usize = 100;
/// Pairs of a group not attached to any instance (SDRS.1826).
pub const UNATTACHED_PAIRS_MAX: usize = 5;
/// Replication pairs per project (SDRS.0306).
pub const PAIRS_PER_PROJECT_MAX: usize = 5000;
/// Servers per ECS batch stop.
pub const STOP_SERVERS_MAX: usize = 1000;
/// Tags per protected instance.
pub const TAGS_MAX: usize = 10;
/// Seconds between periodic syncs of SDRS pairs.
pub const SLEEP_TIME_S: u32 = 30;
/// Attempts of each task the module plans itself.
const TASK_ATTEMPTS: u32 = replication::OP_TASK_ATTEMPTS;

/// Job types (sdrs.md §7; ECS job types per the README's decisions).
pub const JOB_CREATE_GROUP: &str = "createProtectionGroupNoCG";
pub const JOB_DELETE_GROUP: &str = "deleteProtectionGroupNoCG";
pub const JOB_CREATE_INSTANCE: &str = "createProtectedInstanceNoCG";
pub const JOB_DELETE_INSTANCE: &str = "deleteProtectedInstanceNoCG";
pub const JOB_ATTACH: &str = "attachReplicationPairNew";
pub const JOB_DETACH: &str = "detachReplicationPairNew";
pub const JOB_CREATE_PAIR: &str = "createReplicationPairNoCG";
pub const JOB_DELETE_PAIR: &str = "deleteReplicationPairNoCG";
pub const JOB_MIGRATE: &str = "migrateServer";
pub const JOB_STOP_SERVERS: &str = "batchStopServers";
pub const JOB_STOP_SERVER: &str = "stopServer";

// ---------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------

/// Statuses of groups, instances and pairs (sdrs.md §2; each record uses its subset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Creating,
    Available,
    Protected,
    Deleting,
    ErrorDeleting,
    Error,
    Starting,
    ErrorStarting,
    Reprotecting,
    ErrorReprotecting,
    Stopping,
    ErrorStopping,
    Reversing,
    ErrorReversing,
    FailingOver,
    FailedOver,
    ErrorFailingOver,
    Invalid,
    Fault,
    Attaching,
    Detaching,
    ErrorAttaching,
    ErrorDetaching,
}

impl Status {
    pub const ALL: &'static [Status] = &[
        Status::Creating,
        Status::Available,
        Status::Protected,
        Status::Deleting,
        Status::ErrorDeleting,
        Status::Error,
        Status::Starting,
        Status::ErrorStarting,
        Status::Reprotecting,
        Status::ErrorReprotecting,
        Status::Stopping,
        Status::ErrorStopping,
        Status::Reversing,
        Status::ErrorReversing,
        Status::FailingOver,
        Status::FailedOver,
        Status::ErrorFailingOver,
        Status::Invalid,
        Status::Fault,
        Status::Attaching,
        Status::Detaching,
        Status::ErrorAttaching,
        Status::ErrorDetaching,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Available => "available",
            Status::Protected => "protected",
            Status::Deleting => "deleting",
            Status::ErrorDeleting => "error-deleting",
            Status::Error => "error",
            Status::Starting => "starting",
            Status::ErrorStarting => "error-starting",
            Status::Reprotecting => "reprotecting",
            Status::ErrorReprotecting => "error-reprotecting",
            Status::Stopping => "stopping",
            Status::ErrorStopping => "error-stopping",
            Status::Reversing => "reversing",
            Status::ErrorReversing => "error-reversing",
            Status::FailingOver => "failing-over",
            Status::FailedOver => "failed-over",
            Status::ErrorFailingOver => "error-failing-over",
            Status::Invalid => "invalid",
            Status::Fault => "fault",
            Status::Attaching => "attaching",
            Status::Detaching => "detaching",
            Status::ErrorAttaching => "error-attaching",
            Status::ErrorDetaching => "error-detaching",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.iter().copied().find(|x| x.as_str() == s)
    }

    /// A job is running on the record.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Status::Creating
                | Status::Deleting
                | Status::Starting
                | Status::Reprotecting
                | Status::Stopping
                | Status::Reversing
                | Status::FailingOver
                | Status::Attaching
                | Status::Detaching
        )
    }

    pub fn is_error(self) -> bool {
        self.as_str().starts_with("error")
    }
}

/// Which of the group's availability zones is production now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Station {
    Source,
    Target,
}

impl Station {
    pub fn as_str(self) -> &'static str {
        match self {
            Station::Source => "source",
            Station::Target => "target",
        }
    }

    pub fn parse(s: &str) -> Option<Station> {
        match s {
            "source" => Some(Station::Source),
            "target" => Some(Station::Target),
            _ => None,
        }
    }

    pub fn flip(self) -> Station {
        match self {
            Station::Source => Station::Target,
            Station::Target => Station::Source,
        }
    }
}

/// A protection group (`server_group`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    pub project: String,
    pub name: String,
    pub description: Option<String>,
    pub status: Status,
    pub source_az: String,
    pub target_az: String,
    pub domain_id: String,
    pub domain_name: String,
    pub source_vpc_id: String,
    pub dr_type: String,
    pub station: Station,
    pub busy_job: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Group {
    /// The availability zone that is production now.
    pub fn production_az(&self) -> &str {
        self.az_of(self.station)
    }

    pub fn az_of(&self, s: Station) -> &str {
        match s {
            Station::Source => &self.source_az,
            Station::Target => &self.target_az,
        }
    }
}

/// One attached pair of a protected instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub pair_id: String,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

/// A protected instance: a production server and its DR twin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub project: String,
    pub group_id: String,
    pub name: String,
    pub description: Option<String>,
    pub status: Status,
    /// The production server at creation (never swaps).
    pub source_server: String,
    /// The DR server created with the instance.
    pub target_server: String,
    /// Where this instance's production is now (the group's, unless a group operation
    /// failed half-way).
    pub station: Station,
    pub attachments: Vec<Attachment>,
    pub tags: Vec<Tag>,
    pub flavor_ref: Option<String>,
    pub primary_subnet_id: Option<String>,
    pub primary_ip_address: Option<String>,
    pub tenancy: Option<String>,
    pub dedicated_host_id: Option<String>,
    pub cluster_id: Option<String>,
    pub busy_job: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// The SDRS side of a replication pair (the data side is `replication::Pair`, same id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdrsPair {
    pub id: String,
    pub project: String,
    pub group_id: String,
    pub name: String,
    pub description: Option<String>,
    pub status: Status,
    /// The volume in the group's source AZ and the one in its target AZ (creation order).
    pub source_volume: String,
    pub target_volume: String,
    /// `(protected instance, device)` when attached.
    pub attachment: Option<(String, String)>,
    pub bootable: bool,
    pub size_bytes: u64,
    pub busy_job: Option<String>,
    pub failure_detail: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// ECS facts the inventory does not keep.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EcsServer {
    /// The dedicated host (DeH) the server is on; `None`: the public pool.
    pub dedicated_host: Option<String>,
    /// The migration running on it.
    pub busy_job: Option<String>,
}

/// A group operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupOp {
    Start,
    Reprotect,
    Stop,
    Reverse,
    Failover,
}

impl GroupOp {
    /// (transient, success, failure) statuses.
    pub fn statuses(self) -> (Status, Status, Status) {
        match self {
            GroupOp::Start => (Status::Starting, Status::Protected, Status::ErrorStarting),
            GroupOp::Reprotect => (
                Status::Reprotecting,
                Status::Protected,
                Status::ErrorReprotecting,
            ),
            GroupOp::Stop => (Status::Stopping, Status::Available, Status::ErrorStopping),
            GroupOp::Reverse => (Status::Reversing, Status::Protected, Status::ErrorReversing),
            GroupOp::Failover => (
                Status::FailingOver,
                Status::FailedOver,
                Status::ErrorFailingOver,
            ),
        }
    }

    pub fn job_type(self) -> &'static str {
        match self {
            GroupOp::Start => "startProtectionGroupNoCG",
            GroupOp::Reprotect => "reprotectProtectionGroupNoCG",
            GroupOp::Stop => "stopProtectionGroupNoCG",
            GroupOp::Reverse => "reverseProtectionGroupNoCG",
            GroupOp::Failover => "failoverProtectionGroupNoCG",
        }
    }

    pub fn sub_job_type(self) -> &'static str {
        match self {
            GroupOp::Start => "startProtectionGroupRepNoCG",
            GroupOp::Reprotect => "reprotectProtectionGroupRepNoCG",
            GroupOp::Stop => "stopProtectionGroupRepNoCG",
            GroupOp::Reverse => "reverseProtectionGroupRepNoCG",
            GroupOp::Failover => "failoverProtectionGroupRepNoCG",
        }
    }
}

/// What a job of this module was for (`job/<id>` in `sdrs_index`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobRef {
    Group {
        group: String,
        op: GroupOp,
        station: Station,
    },
    InstanceOp {
        instance: String,
        op: GroupOp,
        station: Station,
    },
    CreateInstance {
        instance: String,
    },
    DeleteInstance {
        instance: String,
        delete_target_server: bool,
    },
    CreatePair {
        pair: String,
    },
    DeletePair {
        pair: String,
    },
    Migrate {
        server: String,
        target_host: String,
        dedicated_host: Option<String>,
        disks: Vec<MigrateDisk>,
    },
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewGroup {
    pub id: String,
    pub project: String,
    pub name: String,
    pub description: Option<String>,
    pub source_az: String,
    pub target_az: String,
    pub domain_id: String,
    pub domain_name: String,
    pub source_vpc_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewInstance {
    pub id: String,
    pub project: String,
    pub group_id: String,
    pub server_id: String,
    pub name: String,
    pub description: Option<String>,
    pub flavor_ref: Option<String>,
    pub primary_subnet_id: Option<String>,
    pub primary_ip_address: Option<String>,
    pub tenancy: Option<String>,
    pub dedicated_host_id: Option<String>,
    pub cluster_id: Option<String>,
    pub tags: Vec<Tag>,
    /// The DR server's id.
    pub dr_server_id: String,
    /// `(pair id, DR volume id)` for each disk of the server, in disk order (extra ones are
    /// unused).
    pub pair_ids: Vec<(String, String)>,
    pub job_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSdrsPair {
    pub id: String,
    pub project: String,
    pub group_id: String,
    pub volume_id: String,
    pub dr_volume_id: String,
    pub name: String,
    pub description: Option<String>,
    pub job_id: String,
}

/// A group action (the key of the `/action` body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupAction {
    /// Enable protection, or re-protect after a failover.
    Start,
    Stop,
    /// Planned failover to the given side.
    Reverse(Station),
    /// Unplanned failover.
    Failover,
}

/// Commands of this family. Add new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdrsCommand {
    /// SDRS-PG-CREATE. -> `SdrsOutcome::Job`.
    CreateGroup {
        group: Box<NewGroup>,
        job_id: String,
    },
    /// SDRS-PG-RENAME. -> `SdrsOutcome::Group`.
    RenameGroup {
        id: String,
        project: String,
        name: String,
    },
    /// SDRS-PG-DELETE. -> `SdrsOutcome::Job`.
    DeleteGroup {
        id: String,
        project: String,
        job_id: String,
    },
    /// SDRS-PG-START/STOP/REVERSE/FAILOVER. -> `SdrsOutcome::Job`.
    GroupAction {
        id: String,
        project: String,
        action: GroupAction,
        job_id: String,
    },
    /// SDRS-PI-CREATE. -> `SdrsOutcome::Job`.
    CreateInstance(Box<NewInstance>),
    /// SDRS-PI-RENAME. -> `SdrsOutcome::Instance`.
    RenameInstance {
        id: String,
        project: String,
        name: String,
    },
    /// SDRS-PI-DELETE. -> `SdrsOutcome::Job`.
    DeleteInstance {
        id: String,
        project: String,
        delete_target_server: bool,
        job_id: String,
    },
    /// SDRS-PI-ATTACH-RP. -> `SdrsOutcome::Job`.
    AttachPair {
        instance: String,
        project: String,
        pair: String,
        device: String,
        job_id: String,
    },
    /// SDRS-PI-DETACH-RP. -> `SdrsOutcome::Job`.
    DetachPair {
        instance: String,
        project: String,
        pair: String,
        job_id: String,
    },
    /// SDRS-RP-CREATE. -> `SdrsOutcome::Job`.
    CreatePair(Box<NewSdrsPair>),
    /// SDRS-RP-DELETE. -> `SdrsOutcome::Job`.
    DeletePair {
        id: String,
        project: String,
        group_id: Option<String>,
        delete_target_volume: bool,
        job_id: String,
    },
    /// ECS-MIGRATE: to `dedicated_host` or (None) back to the public pool.
    /// -> `SdrsOutcome::Job`.
    Migrate {
        server: String,
        project: String,
        dedicated_host: Option<String>,
        job_id: String,
    },
    /// ECS-SERVER-BATCH-STOP. -> `SdrsOutcome::Job`.
    StopServers {
        project: String,
        servers: Vec<String>,
        job_id: String,
    },
}

/// What this family's commands produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdrsOutcome {
    Job { job_id: String },
    Group(Group),
    Instance(Instance),
}

/// Names: 1 to 64 UTF-8 bytes of ASCII letters, digits, `.`, `_`, `-` and CJK unified
/// ideographs (README decision 4).
pub fn validate_name(field: &str, name: &str) -> Result<(), CommandError> {
    let ok_char = |c: char| {
        c.is_ascii_alphanumeric() || "._-".contains(c) || ('\u{4E00}'..='\u{9FFF}').contains(&c)
    };
    if name.is_empty() || name.len() > NAME_MAX || !name.chars().all(ok_char) {
        return Err(CommandError::invalid(
            field,
            format!("must be 1 to {NAME_MAX} bytes of letters, digits, '.', '_', '-' or Chinese characters"),
        ));
    }
    Ok(())
}

/// Descriptions: at most 64 UTF-8 bytes, no `<` or `>`.
pub fn validate_description(d: &str) -> Result<(), CommandError> {
    if d.len() > DESCRIPTION_MAX || d.contains(['<', '>']) || d.chars().any(char::is_control) {
        return Err(CommandError::invalid(
            "description",
            format!(
                "must be at most {DESCRIPTION_MAX} bytes without '<', '>' or control characters"
            ),
        ));
    }
    Ok(())
}

/// Tags of a protected instance (sdrs.md §5: ≤ 10, unique keys, key 1–36 and value
/// 0–43 characters, none of `* < > \ = , | /` or control characters).
pub fn validate_tags(tags: &[Tag]) -> Result<(), CommandError> {
    if tags.len() > TAGS_MAX {
        return Err(CommandError::invalid(
            "tags",
            format!("at most {TAGS_MAX} tags"),
        ));
    }
    let bad = |s: &str| s.chars().any(|c| c.is_control() || "*<>\\=,|/".contains(c));
    let mut keys = std::collections::BTreeSet::new();
    for t in tags {
        let kl = t.key.chars().count();
        if kl == 0 || kl > 36 || bad(&t.key) {
            return Err(CommandError::invalid(
                "tags.key",
                "must be 1 to 36 characters without * < > \\ = , | / or control characters",
            ));
        }
        if t.value.chars().count() > 43 || bad(&t.value) {
            return Err(CommandError::invalid(
                "tags.value",
                "must be 0 to 43 characters without * < > \\ = , | / or control characters",
            ));
        }
        if !keys.insert(t.key.as_str()) {
            return Err(CommandError::invalid(
                "tags.key",
                format!("key '{}' appears twice", t.key),
            ));
        }
    }
    Ok(())
}

fn validate_opt(field: &str, v: &Option<String>) -> Result<(), CommandError> {
    match v {
        Some(s) if s.len() > 128 || s.chars().any(char::is_control) => Err(CommandError::invalid(
            field,
            "must be at most 128 bytes without control characters",
        )),
        _ => Ok(()),
    }
}

impl SdrsCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            SdrsCommand::CreateGroup { group, job_id } => {
                validate_id("id", &group.id)?;
                validate_project(&group.project)?;
                validate_name("name", &group.name)?;
                if let Some(d) = &group.description {
                    validate_description(d)?;
                }
                crate::command::validate_site_name(&group.source_az)?;
                crate::command::validate_site_name(&group.target_az)?;
                validate_id("domain_id", &group.domain_id)?;
                validate_opt("domain_name", &Some(group.domain_name.clone()))?;
                validate_opt("source_vpc_id", &Some(group.source_vpc_id.clone()))?;
                validate_id("job_id", job_id)
            }
            SdrsCommand::RenameGroup { id, project, name }
            | SdrsCommand::RenameInstance { id, project, name } => {
                validate_id("id", id)?;
                validate_project(project)?;
                validate_name("name", name)
            }
            SdrsCommand::DeleteGroup {
                id,
                project,
                job_id,
            }
            | SdrsCommand::GroupAction {
                id,
                project,
                job_id,
                ..
            }
            | SdrsCommand::DeleteInstance {
                id,
                project,
                job_id,
                ..
            } => {
                validate_id("id", id)?;
                validate_project(project)?;
                validate_id("job_id", job_id)
            }
            SdrsCommand::CreateInstance(n) => {
                validate_id("id", &n.id)?;
                validate_project(&n.project)?;
                validate_id("server_group_id", &n.group_id)?;
                validate_id("server_id", &n.server_id)?;
                validate_name("name", &n.name)?;
                if let Some(d) = &n.description {
                    validate_description(d)?;
                }
                validate_opt("flavorRef", &n.flavor_ref)?;
                validate_opt("primary_subnet_id", &n.primary_subnet_id)?;
                validate_opt("primary_ip_address", &n.primary_ip_address)?;
                validate_opt("tenancy", &n.tenancy)?;
                validate_opt("cluster_id", &n.cluster_id)?;
                if let Some(h) = &n.dedicated_host_id {
                    inventory::validate_host_name("dedicated_host_id", h)?;
                }
                validate_tags(&n.tags)?;
                validate_id("dr_server_id", &n.dr_server_id)?;
                if n.pair_ids.len() > inventory::DISKS_MAX {
                    return Err(CommandError::invalid("pair_ids", "too many"));
                }
                for (p, v) in &n.pair_ids {
                    validate_id("pair_id", p)?;
                    validate_id("volume_id", v)?;
                }
                validate_id("job_id", &n.job_id)
            }
            SdrsCommand::AttachPair {
                instance,
                project,
                pair,
                device,
                job_id,
            } => {
                validate_id("protected_instance_id", instance)?;
                validate_project(project)?;
                validate_id("replication_id", pair)?;
                validate_device(device)?;
                validate_id("job_id", job_id)
            }
            SdrsCommand::DetachPair {
                instance,
                project,
                pair,
                job_id,
            } => {
                validate_id("protected_instance_id", instance)?;
                validate_project(project)?;
                validate_id("replication_id", pair)?;
                validate_id("job_id", job_id)
            }
            SdrsCommand::CreatePair(n) => {
                validate_id("id", &n.id)?;
                validate_project(&n.project)?;
                validate_id("server_group_id", &n.group_id)?;
                validate_id("volume_id", &n.volume_id)?;
                validate_id("dr_volume_id", &n.dr_volume_id)?;
                validate_name("name", &n.name)?;
                if let Some(d) = &n.description {
                    validate_description(d)?;
                }
                validate_id("job_id", &n.job_id)
            }
            SdrsCommand::DeletePair {
                id,
                project,
                group_id,
                job_id,
                ..
            } => {
                validate_id("id", id)?;
                validate_project(project)?;
                if let Some(g) = group_id {
                    validate_id("server_group_id", g)?;
                }
                validate_id("job_id", job_id)
            }
            SdrsCommand::Migrate {
                server,
                project,
                dedicated_host,
                job_id,
            } => {
                validate_id("server_id", server)?;
                validate_project(project)?;
                if let Some(h) = dedicated_host {
                    inventory::validate_host_name("dedicated_host_id", h)?;
                }
                validate_id("job_id", job_id)
            }
            SdrsCommand::StopServers {
                project,
                servers,
                job_id,
            } => {
                validate_project(project)?;
                if servers.is_empty() || servers.len() > STOP_SERVERS_MAX {
                    return Err(CommandError::invalid(
                        "servers",
                        format!("give 1 to {STOP_SERVERS_MAX} servers"),
                    ));
                }
                for s in servers {
                    validate_id("servers.id", s)?;
                }
                validate_id("job_id", job_id)
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SdrsCommand::CreateGroup { .. } => "sdrs_create_group",
            SdrsCommand::RenameGroup { .. } => "sdrs_rename_group",
            SdrsCommand::DeleteGroup { .. } => "sdrs_delete_group",
            SdrsCommand::GroupAction { .. } => "sdrs_group_action",
            SdrsCommand::CreateInstance(_) => "sdrs_create_instance",
            SdrsCommand::RenameInstance { .. } => "sdrs_rename_instance",
            SdrsCommand::DeleteInstance { .. } => "sdrs_delete_instance",
            SdrsCommand::AttachPair { .. } => "sdrs_attach_pair",
            SdrsCommand::DetachPair { .. } => "sdrs_detach_pair",
            SdrsCommand::CreatePair(_) => "sdrs_create_pair",
            SdrsCommand::DeletePair { .. } => "sdrs_delete_pair",
            SdrsCommand::Migrate { .. } => "ecs_migrate",
            SdrsCommand::StopServers { .. } => "ecs_stop_servers",
        }
    }
}

/// Device names: `/dev/` and 1 to 16 letters and digits (`/dev/vdb`).
pub fn validate_device(d: &str) -> Result<(), CommandError> {
    let ok = d.strip_prefix("/dev/").is_some_and(|n| {
        !n.is_empty() && n.len() <= 16 && n.chars().all(|c| c.is_ascii_alphanumeric())
    });
    if !ok {
        return Err(CommandError::invalid(
            "device",
            "must be a device name such as /dev/vdb",
        ));
    }
    Ok(())
}

/// The documented code of a refusal made by this module: `("SDRS.1002", "message")`.
pub fn refusal_code(e: &CommandError) -> Option<(&str, &str)> {
    let CommandError::Conflict(m) = e else {
        return None;
    };
    let (code, rest) = m.split_once(' ')?;
    let family_code = (code.starts_with("SDRS.") || code.starts_with("Ecs."))
        && code.len() <= 9
        && code
            .rsplit('.')
            .next()
            .is_some_and(|d| d.len() == 4 && d.bytes().all(|b| b.is_ascii_digit()));
    family_code.then_some((code, rest))
}

fn refuse(code: &str, msg: impl std::fmt::Display) -> CommandError {
    CommandError::Conflict(format!("{code} {msg}"))
}

// ---------------------------------------------------------------------------------------
// Keys and record helpers
// ---------------------------------------------------------------------------------------

fn key(prefix: &str, id: &str) -> Vec<u8> {
    format!("{prefix}/{id}").into_bytes()
}

fn key2(prefix: &str, a: &str, b: &str) -> Vec<u8> {
    let mut k = format!("{prefix}/{a}").into_bytes();
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn ids_under(txn: &Txn<'_>, prefix: &str, a: &str) -> Result<Vec<String>, StoreError> {
    let p = key2(prefix, a, "");
    Ok(txn
        .scan_prefix(CF_SDRS_INDEX, &p)?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k[p.len()..]).into_owned())
        .collect())
}

fn load_group(txn: &Txn<'_>, id: &str) -> Result<Option<Group>, StoreError> {
    txn.get_record(CF_SDRS, &key("g", id))
}

fn save_group(txn: &mut Txn<'_>, g: &Group) -> Result<(), StoreError> {
    txn.put(CF_SDRS_INDEX, &key2("gp", &g.project, &g.id), Vec::new())?;
    txn.put_record(CF_SDRS, &key("g", &g.id), g)
}

fn load_instance(txn: &Txn<'_>, id: &str) -> Result<Option<Instance>, StoreError> {
    txn.get_record(CF_SDRS, &key("i", id))
}

fn save_instance(txn: &mut Txn<'_>, i: &Instance) -> Result<(), StoreError> {
    txn.put(CF_SDRS_INDEX, &key2("ig", &i.group_id, &i.id), Vec::new())?;
    txn.put(CF_SDRS_INDEX, &key2("ip", &i.project, &i.id), Vec::new())?;
    txn.put(
        CF_SDRS_INDEX,
        &key("srv", &i.source_server),
        i.id.clone().into_bytes(),
    )?;
    txn.put(
        CF_SDRS_INDEX,
        &key("srv", &i.target_server),
        i.id.clone().into_bytes(),
    )?;
    txn.put_record(CF_SDRS, &key("i", &i.id), i)
}

fn remove_instance(txn: &mut Txn<'_>, i: &Instance) -> Result<(), StoreError> {
    txn.delete(CF_SDRS_INDEX, &key2("ig", &i.group_id, &i.id))?;
    txn.delete(CF_SDRS_INDEX, &key2("ip", &i.project, &i.id))?;
    txn.delete(CF_SDRS_INDEX, &key("srv", &i.source_server))?;
    txn.delete(CF_SDRS_INDEX, &key("srv", &i.target_server))?;
    txn.delete(CF_SDRS, &key("i", &i.id))
}

fn load_spair(txn: &Txn<'_>, id: &str) -> Result<Option<SdrsPair>, StoreError> {
    txn.get_record(CF_SDRS, &key("p", id))
}

fn save_spair(txn: &mut Txn<'_>, p: &SdrsPair) -> Result<(), StoreError> {
    txn.put(CF_SDRS_INDEX, &key2("pg", &p.group_id, &p.id), Vec::new())?;
    txn.put(CF_SDRS_INDEX, &key2("pp", &p.project, &p.id), Vec::new())?;
    txn.put(
        CF_SDRS_INDEX,
        &key("vol", &p.source_volume),
        p.id.clone().into_bytes(),
    )?;
    txn.put(
        CF_SDRS_INDEX,
        &key("vol", &p.target_volume),
        p.id.clone().into_bytes(),
    )?;
    txn.put_record(CF_SDRS, &key("p", &p.id), p)
}

fn remove_spair(txn: &mut Txn<'_>, p: &SdrsPair) -> Result<(), StoreError> {
    txn.delete(CF_SDRS_INDEX, &key2("pg", &p.group_id, &p.id))?;
    txn.delete(CF_SDRS_INDEX, &key2("pp", &p.project, &p.id))?;
    txn.delete(CF_SDRS_INDEX, &key("vol", &p.source_volume))?;
    txn.delete(CF_SDRS_INDEX, &key("vol", &p.target_volume))?;
    txn.delete(CF_SDRS, &key("p", &p.id))
}

fn load_ecs(txn: &Txn<'_>, server: &str) -> Result<EcsServer, StoreError> {
    Ok(txn
        .get_record(CF_SDRS, &key("e", server))?
        .unwrap_or_default())
}

fn save_ecs(txn: &mut Txn<'_>, server: &str, e: &EcsServer) -> Result<(), StoreError> {
    if *e == EcsServer::default() {
        txn.delete(CF_SDRS, &key("e", server))
    } else {
        txn.put_record(CF_SDRS, &key("e", server), e)
    }
}

fn put_job_ref(txn: &mut Txn<'_>, job_id: &str, r: &JobRef) -> Result<(), StoreError> {
    txn.put_record(CF_SDRS_INDEX, &key("job", job_id), r)
}

fn load_server(txn: &Txn<'_>, id: &str) -> Result<Option<Server>, StoreError> {
    txn.get_record(CF_SERVERS, id.as_bytes())
}

/// Records a changed server through the inventory (keeps its indexes and allocations).
fn put_server(
    txn: &mut Txn<'_>,
    s: Server,
    now: u64,
) -> Result<Result<(), CommandError>, StoreError> {
    let cmd = InventoryCommand::RegisterWorkloads {
        workloads: vec![Workload::Server(s)],
    };
    Ok(inventory::apply(txn, &cmd, now)?.map(|_| ()))
}

/// Every host of a site, by name.
fn hosts_in_site(txn: &Txn<'_>, site: &str) -> Result<Vec<Host>, StoreError> {
    let mut out = Vec::new();
    for (_, v) in txn.scan_prefix(CF_HOSTS, b"")? {
        let h: Host = crate::codec::decode(&v)?;
        if h.site == site {
            out.push(h);
        }
    }
    Ok(out)
}

fn site_of_host(txn: &Txn<'_>, host: &str) -> Result<Option<String>, StoreError> {
    Ok(inventory::host_txn(txn, host)?.map(|h| h.site))
}

/// A sub-job id derived from its parent's (32 hex: the parent's first 24 and a counter).
pub fn sub_job_id(job_id: &str, n: usize) -> String {
    let head: String = job_id.chars().take(24).collect();
    format!("{head}{n:08x}")
}

/// Picks a host of `site` (or exactly `pinned`) with room for `vcpus`/`ram_mb` and
/// `bytes` in one pool: online hosts first, then the most free RAM, then by name.
/// Returns the host and the pool.
fn pick_host(
    txn: &Txn<'_>,
    site: &str,
    pinned: Option<&str>,
    exclude: Option<&str>,
    (vcpus, ram_mb, bytes): (u32, u64, u64),
    prefer_pool: Option<&str>,
) -> Result<Option<(Host, String)>, StoreError> {
    let mut hosts = hosts_in_site(txn, site)?;
    hosts.retain(|h| pinned.is_none_or(|p| p == h.name) && exclude.is_none_or(|x| x != h.name));
    hosts.sort_by(|a, b| {
        b.is_online()
            .cmp(&a.is_online())
            .then(b.available().ram_mb.cmp(&a.available().ram_mb))
            .then(a.name.cmp(&b.name))
    });
    for h in hosts {
        let avail = h.available();
        if avail.vcpus < vcpus || avail.ram_mb < ram_mb {
            continue;
        }
        let mut pools: Vec<(String, u64)> = avail.pool_bytes.into_iter().collect();
        pools.sort_by(|a, b| {
            (Some(a.0.as_str()) != prefer_pool)
                .cmp(&(Some(b.0.as_str()) != prefer_pool))
                .then(b.1.cmp(&a.1))
        });
        if let Some((pool, _)) = pools.into_iter().find(|(_, free)| *free >= bytes) {
            return Ok(Some((h, pool)));
        }
    }
    Ok(None)
}

/// Reserves `bytes` in `pool` of `host` for the job (released when it ends).
fn reserve_bytes(
    txn: &mut Txn<'_>,
    host: &str,
    pool: &str,
    bytes: u64,
    extra: (u32, u64),
    job_id: &str,
    now: u64,
) -> Result<Result<(), CommandError>, StoreError> {
    let req = ResourceAmount {
        vcpus: extra.0,
        ram_mb: extra.1,
        pool_bytes: BTreeMap::from([(pool.to_string(), bytes)]),
    };
    let mut h = match inventory::check_reserve(txn, host, job_id, &req)? {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    inventory::put_reservation(txn, &mut h, job_id, &req, now)?;
    Ok(Ok(()))
}

fn group_not_found(id: &str) -> CommandError {
    refuse("SDRS.1013", format!("protection group '{id}' not found"))
}

fn instance_not_found(id: &str) -> CommandError {
    refuse("SDRS.1320", format!("protected instance '{id}' not found"))
}

fn pair_not_found(id: &str) -> CommandError {
    refuse("SDRS.1608", format!("replication pair '{id}' not found"))
}

fn visible_group(
    txn: &Txn<'_>,
    id: &str,
    project: &str,
) -> Result<Result<Group, CommandError>, StoreError> {
    Ok(match load_group(txn, id)? {
        Some(g) if g.project == project => Ok(g),
        _ => Err(group_not_found(id)),
    })
}

fn visible_instance(
    txn: &Txn<'_>,
    id: &str,
    project: &str,
) -> Result<Result<Instance, CommandError>, StoreError> {
    Ok(match load_instance(txn, id)? {
        Some(i) if i.project == project => Ok(i),
        _ => Err(instance_not_found(id)),
    })
}

fn visible_spair(
    txn: &Txn<'_>,
    id: &str,
    project: &str,
) -> Result<Result<SdrsPair, CommandError>, StoreError> {
    Ok(match load_spair(txn, id)? {
        Some(p) if p.project == project => Ok(p),
        _ => Err(pair_not_found(id)),
    })
}

macro_rules! tri {
    ($e:expr) => {
        match $e? {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

fn job_outcome(job_id: &str) -> Outcome {
    Outcome::Sdrs(Box::new(SdrsOutcome::Job {
        job_id: job_id.to_string(),
    }))
}

fn empty_job(
    id: &str,
    job_type: &str,
    project: &str,
    entities: BTreeMap<String, String>,
) -> NewJob {
    NewJob {
        id: id.to_string(),
        job_type: job_type.to_string(),
        project: project.to_string(),
        entities,
        tasks: Vec::new(),
        sub_jobs: Vec::new(),
    }
}

/// Stages a composed job and ends it at once if it has nothing to run.
fn start_job(
    txn: &mut Txn<'_>,
    job: &NewJob,
    now: u64,
) -> Result<Result<(), CommandError>, StoreError> {
    if let Err(e) = jobs::check_new_job(txn, job)? {
        return Ok(Err(e));
    }
    jobs::insert_job(txn, job, None, now)?;
    jobs::finish_if_empty(txn, &job.id, now)?;
    Ok(Ok(()))
}

fn ents(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------

pub(crate) fn apply(
    txn: &mut Txn<'_>,
    cmd: &SdrsCommand,
    now: u64,
) -> Result<CommandResult, StoreError> {
    match cmd {
        SdrsCommand::CreateGroup { group, job_id } => create_group(txn, group, job_id, now),
        SdrsCommand::RenameGroup { id, project, name } => {
            let mut g = tri!(visible_group(txn, id, project));
            g.name = name.clone();
            g.updated_at_ms = now;
            save_group(txn, &g)?;
            Ok(Ok(Outcome::Sdrs(Box::new(SdrsOutcome::Group(g)))))
        }
        SdrsCommand::DeleteGroup {
            id,
            project,
            job_id,
        } => {
            let g = tri!(visible_group(txn, id, project));
            if g.status.is_transient() || g.busy_job.is_some() {
                return Ok(Err(refuse(
                    "SDRS.1002",
                    format!(
                        "protection group '{id}' is {}: wait for its job to end",
                        g.status.as_str()
                    ),
                )));
            }
            if !ids_under(txn, "ig", id)?.is_empty() {
                return Ok(Err(refuse(
                    "SDRS.1001",
                    format!(
                        "protection group '{id}' still has protected instances: delete them first"
                    ),
                )));
            }
            if !ids_under(txn, "pg", id)?.is_empty() {
                return Ok(Err(refuse(
                    "SDRS.1010",
                    format!(
                        "protection group '{id}' still has replication pairs: delete them first"
                    ),
                )));
            }
            txn.delete(CF_SDRS_INDEX, &key2("gp", &g.project, &g.id))?;
            txn.delete(CF_SDRS, &key("g", &g.id))?;
            let job = empty_job(
                job_id,
                JOB_DELETE_GROUP,
                project,
                ents(&[("server_group_id", id)]),
            );
            tri!(start_job(txn, &job, now));
            Ok(Ok(job_outcome(job_id)))
        }
        SdrsCommand::GroupAction {
            id,
            project,
            action,
            job_id,
        } => group_action(txn, id, project, *action, job_id, now),
        SdrsCommand::CreateInstance(n) => create_instance(txn, n, now),
        SdrsCommand::RenameInstance { id, project, name } => {
            let mut i = tri!(visible_instance(txn, id, project));
            i.name = name.clone();
            i.updated_at_ms = now;
            save_instance(txn, &i)?;
            Ok(Ok(Outcome::Sdrs(Box::new(SdrsOutcome::Instance(i)))))
        }
        SdrsCommand::DeleteInstance {
            id,
            project,
            delete_target_server,
            job_id,
        } => delete_instance(txn, id, project, *delete_target_server, job_id, now),
        SdrsCommand::AttachPair {
            instance,
            project,
            pair,
            device,
            job_id,
        } => attach(txn, instance, project, pair, device, job_id, now),
        SdrsCommand::DetachPair {
            instance,
            project,
            pair,
            job_id,
        } => detach(txn, instance, project, pair, job_id, now),
        SdrsCommand::CreatePair(n) => create_pair(txn, n, now),
        SdrsCommand::DeletePair {
            id,
            project,
            group_id,
            delete_target_volume,
            job_id,
        } => delete_pair(
            txn,
            id,
            project,
            group_id.as_deref(),
            *delete_target_volume,
            job_id,
            now,
        ),
        SdrsCommand::Migrate {
            server,
            project,
            dedicated_host,
            job_id,
        } => migrate(txn, server, project, dedicated_host.as_deref(), job_id, now),
        SdrsCommand::StopServers {
            project,
            servers,
            job_id,
        } => stop_servers(txn, project, servers, job_id, now),
    }
}

fn create_group(
    txn: &mut Txn<'_>,
    n: &NewGroup,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    if n.source_az == n.target_az {
        return Ok(Err(refuse(
            "SDRS.0203",
            "source_availability_zone and target_availability_zone must differ",
        )));
    }
    for az in [&n.source_az, &n.target_az] {
        if txn.get(CF_SITES, az.as_bytes())?.is_none() {
            return Ok(Err(refuse(
                "SDRS.0203",
                format!("availability zone '{az}' does not exist"),
            )));
        }
    }
    if load_group(txn, &n.id)?.is_some() {
        return Ok(Err(CommandError::AlreadyExists {
            kind: "protection group".into(),
            id: n.id.clone(),
        }));
    }
    if ids_under(txn, "gp", &n.project)?.len() >= GROUPS_PER_PROJECT_MAX {
        return Ok(Err(refuse(
            "SDRS.0305",
            format!("the project already has {GROUPS_PER_PROJECT_MAX} protection groups"),
        )));
    }
    let g = Group {
        id: n.id.clone(),
        project: n.project.clone(),
        name: n.name.clone(),
        description: n.description.clone(),
        status: Status::Available,
        source_az: n.source_az.clone(),
        target_az: n.target_az.clone(),
        domain_id: n.domain_id.clone(),
        domain_name: n.domain_name.clone(),
        source_vpc_id: n.source_vpc_id.clone(),
        dr_type: "migration".into(),
        station: Station::Source,
        busy_job: None,
        created_at_ms: now,
        updated_at_ms: now,
    };
    save_group(txn, &g)?;
    let job = empty_job(
        job_id,
        JOB_CREATE_GROUP,
        &n.project,
        ents(&[("server_group_id", &n.id)]),
    );
    tri!(start_job(txn, &job, now));
    Ok(Ok(job_outcome(job_id)))
}

/// The side (of `g`) that the pair's writable copy is on.
fn pair_side(txn: &Txn<'_>, g: &Group, p: &Pair) -> Result<Station, StoreError> {
    let site = site_of_host(txn, &p.source.host)?;
    Ok(if site.as_deref() == Some(g.target_az.as_str()) {
        Station::Target
    } else {
        Station::Source
    })
}

/// The pair operation a group operation needs on one pair (None: nothing to run).
fn pair_op_for(
    txn: &Txn<'_>,
    g: &Group,
    op: GroupOp,
    station: Station,
    p: &Pair,
) -> Result<Option<PairOp>, StoreError> {
    Ok(match op {
        GroupOp::Stop => None,
        GroupOp::Start | GroupOp::Reprotect => match p.state {
            PairState::FailedOver => Some(PairOp::Reinit),
            PairState::Error if p.reinit_required => Some(PairOp::Reinit),
            _ => Some(PairOp::Sync {
                full: false,
                periodic: false,
            }),
        },
        GroupOp::Reverse => {
            if pair_side(txn, g, p)? == station {
                None
            } else {
                Some(PairOp::PlannedFailover {
                    keep_replicating: true,
                })
            }
        }
        GroupOp::Failover => {
            if pair_side(txn, g, p)? == station {
                None
            } else {
                Some(PairOp::UnplannedFailover)
            }
        }
    })
}

/// Whether a server (missing counts as stopped) is stopped.
fn server_stopped(txn: &Txn<'_>, id: &str) -> Result<bool, StoreError> {
    Ok(load_server(txn, id)?.is_none_or(|s| s.status == ServerStatus::Shutoff))
}

fn instance_server_at(i: &Instance, s: Station) -> &str {
    // The instance's production server is its source server while its station is the
    // side it was created on.
    if s == Station::Source {
        &i.source_server
    } else {
        &i.target_server
    }
}

fn group_action(
    txn: &mut Txn<'_>,
    id: &str,
    project: &str,
    action: GroupAction,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let g = tri!(visible_group(txn, id, project));
    let not_allowed = |what: &str| {
        refuse(
            "SDRS.1002",
            format!(
                "{what} is not allowed while protection group '{id}' is {}",
                g.status.as_str()
            ),
        )
    };
    let (op, station) = match action {
        GroupAction::Start => match g.status {
            Status::Available | Status::ErrorStarting => (GroupOp::Start, g.station),
            Status::FailedOver | Status::ErrorReprotecting => (GroupOp::Reprotect, g.station),
            _ => return Ok(Err(not_allowed("enabling protection"))),
        },
        GroupAction::Stop => match g.status {
            Status::Protected | Status::ErrorStopping => (GroupOp::Stop, g.station),
            _ => return Ok(Err(not_allowed("disabling protection"))),
        },
        GroupAction::Reverse(s) => match g.status {
            Status::Protected | Status::ErrorReversing => {
                if s == g.station && g.status == Status::Protected {
                    return Ok(Err(refuse(
                        "SDRS.1002",
                        format!(
                            "the production site of protection group '{id}' is already '{}'",
                            s.as_str()
                        ),
                    )));
                }
                (GroupOp::Reverse, s)
            }
            _ => return Ok(Err(not_allowed("a planned failover"))),
        },
        GroupAction::Failover => match g.status {
            Status::Protected | Status::ErrorFailingOver | Status::ErrorReversing => {
                (GroupOp::Failover, g.station.flip())
            }
            _ => return Ok(Err(not_allowed("a failover"))),
        },
    };
    if let Some(j) = &g.busy_job {
        return Ok(Err(refuse(
            "SDRS.1002",
            format!("protection group '{id}' is busy with job '{j}'"),
        )));
    }
    let pair_ids = ids_under(txn, "pg", id)?;
    if pair_ids.is_empty() && op != GroupOp::Stop {
        return Ok(Err(refuse(
            "SDRS.1002",
            format!(
                "protection group '{id}' has no replication pairs: add protected instances first"
            ),
        )));
    }
    let mut instances = Vec::new();
    for iid in ids_under(txn, "ig", id)? {
        if let Some(i) = load_instance(txn, &iid)? {
            if i.busy_job.is_some() || i.status.is_transient() {
                return Ok(Err(refuse(
                    "SDRS.1002",
                    format!(
                        "protected instance '{}' is {}: wait for its job to end",
                        i.id,
                        i.status.as_str()
                    ),
                )));
            }
            instances.push(i);
        }
    }
    // Servers that must be stopped (sdrs.md §2.1).
    for i in &instances {
        match op {
            GroupOp::Reverse if i.station != station => {
                let s = instance_server_at(i, i.station);
                if !server_stopped(txn, s)? {
                    return Ok(Err(refuse(
                        "SDRS.1319",
                        format!("server '{s}' of protected instance '{}' at the production site is not stopped", i.id),
                    )));
                }
            }
            GroupOp::Reprotect => {
                let s = instance_server_at(i, i.station.flip());
                if !server_stopped(txn, s)? {
                    return Ok(Err(refuse(
                        "SDRS.1342",
                        format!(
                            "server '{s}' of protected instance '{}' at the DR site is not stopped",
                            i.id
                        ),
                    )));
                }
            }
            _ => {}
        }
    }
    // Plan: one sub-job per instance, the unattached pairs at the top.
    let (transient, _, _) = op.statuses();
    let mut top = empty_job(
        job_id,
        op.job_type(),
        project,
        ents(&[("server_group_id", id)]),
    );
    let mut spairs = Vec::new();
    for pid in &pair_ids {
        let Some(sp) = load_spair(txn, pid)? else {
            continue;
        };
        if sp.busy_job.is_some() || sp.status.is_transient() {
            return Ok(Err(refuse(
                "SDRS.1002",
                format!(
                    "replication pair '{}' is {}: wait for its job to end",
                    sp.id,
                    sp.status.as_str()
                ),
            )));
        }
        spairs.push(sp);
    }
    // (pair, op, the job id holding its tasks)
    let mut planned: Vec<(String, PairOp, String)> = Vec::new();
    let mut min_rp: Option<u64> = None;
    let plan_pair = |txn: &Txn<'_>,
                     job: &mut NewJob,
                     pair_id: &str,
                     planned: &mut Vec<(String, PairOp, String)>|
     -> Result<Result<Option<u64>, CommandError>, StoreError> {
        let Some(p) = replication::load_pair(txn, pair_id)? else {
            return Ok(Ok(None));
        };
        let Some(pop) = pair_op_for(txn, &g, op, station, &p)? else {
            return Ok(Ok(None));
        };
        if let Err(e) = replication::check_op(&p, &pop) {
            return Ok(Err(refuse("SDRS.1002", e)));
        }
        replication::plan_op(&p, &pop, job, &[]);
        planned.push((p.id.clone(), pop.clone(), job.id.clone()));
        Ok(Ok(if pop == PairOp::UnplannedFailover {
            Some(p.recovery_point_ms.unwrap_or(0))
        } else {
            None
        }))
    };
    for (n, i) in instances.iter().enumerate() {
        let sub_id = sub_job_id(job_id, n + 1);
        let mut sub = empty_job(
            &sub_id,
            op.sub_job_type(),
            project,
            ents(&[("protected_instance_id", &i.id), ("server_group_id", id)]),
        );
        let mut inst_rp: Option<u64> = None;
        // An instance already on the requested side has nothing to do.
        let skip = matches!(op, GroupOp::Reverse | GroupOp::Failover) && i.station == station;
        if !skip {
            for a in &i.attachments {
                if let Some(rp) = tri!(plan_pair(txn, &mut sub, &a.pair_id, &mut planned)) {
                    inst_rp = Some(inst_rp.map_or(rp, |x: u64| x.min(rp)));
                }
            }
        }
        if let Some(rp) = inst_rp {
            sub.entities
                .insert("recovery_point_ms".into(), rp.to_string());
            min_rp = Some(min_rp.map_or(rp, |x| x.min(rp)));
        }
        top.sub_jobs.push(sub);
    }
    for sp in &spairs {
        if sp.attachment.is_none() {
            if let Some(rp) = tri!(plan_pair(txn, &mut top, &sp.id, &mut planned)) {
                min_rp = Some(min_rp.map_or(rp, |x| x.min(rp)));
            }
        }
    }
    if let Some(rp) = min_rp {
        top.entities
            .insert("recovery_point_ms".into(), rp.to_string());
    }
    if top.tasks.len() > jobs::TASKS_PER_JOB_MAX
        || top
            .sub_jobs
            .iter()
            .any(|s| s.tasks.len() > jobs::TASKS_PER_JOB_MAX)
    {
        return Ok(Err(refuse(
            "SDRS.1002",
            "too many replication pairs for one job",
        )));
    }
    if let Err(e) = jobs::check_new_job(txn, &top)? {
        return Ok(Err(e));
    }
    // Write: pairs first (begin_op may cancel periodic syncs), then the records.
    for (pair_id, pop, holder) in &planned {
        if let Err(e) = replication::begin_op(txn, pair_id, pop, holder, now)? {
            return Ok(Err(refuse("SDRS.1002", e)));
        }
    }
    let enable = match op {
        GroupOp::Start | GroupOp::Reprotect => Some(true),
        GroupOp::Stop => Some(false),
        _ => None,
    };
    if let Some(enabled) = enable {
        for sp in &spairs {
            if replication::load_pair(txn, &sp.id)?.is_some() {
                let up = ReplicationCommand::Update {
                    id: sp.id.clone(),
                    enabled: Some(enabled),
                    sleep_time_s: None,
                    bwlimit_bytes_per_sec: None,
                };
                if let Err(e) = replication::apply(txn, &up, now)? {
                    return Ok(Err(refuse("SDRS.1002", e)));
                }
            }
        }
    }
    for sp in &mut spairs {
        sp.status = transient;
        sp.busy_job = Some(job_id.to_string());
        sp.updated_at_ms = now;
        save_spair(txn, sp)?;
    }
    for (n, i) in instances.iter_mut().enumerate() {
        let sub_id = sub_job_id(job_id, n + 1);
        i.status = transient;
        i.busy_job = Some(sub_id.clone());
        i.updated_at_ms = now;
        save_instance(txn, i)?;
        put_job_ref(
            txn,
            &sub_id,
            &JobRef::InstanceOp {
                instance: i.id.clone(),
                op,
                station,
            },
        )?;
    }
    let mut g = g.clone();
    g.status = transient;
    g.busy_job = Some(job_id.to_string());
    g.updated_at_ms = now;
    save_group(txn, &g)?;
    put_job_ref(
        txn,
        job_id,
        &JobRef::Group {
            group: id.to_string(),
            op,
            station,
        },
    )?;
    jobs::insert_job(txn, &top, None, now)?;
    jobs::finish_if_empty(txn, job_id, now)?;
    Ok(Ok(job_outcome(job_id)))
}

/// A server's disk as the source copy of a pair.
fn disk_ref(s: &Server, d: &inventory::Disk) -> VolumeRef {
    VolumeRef {
        host: s.host.clone(),
        pool: d.pool.clone(),
        volume_id: d.id.clone(),
        path: d.path.clone(),
        size_bytes: d.size_bytes,
        layout: VolumeLayout::Block,
    }
}

fn device_name(n: usize) -> String {
    let letter = (b'a' + (n % 26) as u8) as char;
    if n < 26 {
        format!("/dev/vd{letter}")
    } else {
        format!("/dev/vd{}{letter}", (b'a' + (n / 26 - 1) as u8) as char)
    }
}

fn create_instance(
    txn: &mut Txn<'_>,
    n: &NewInstance,
    now: u64,
) -> Result<CommandResult, StoreError> {
    // Checks in the order of sdrs.md SDRS-PI-CREATE.
    if n.primary_ip_address.is_some() && n.primary_subnet_id.is_none() {
        return Ok(Err(refuse(
            "SDRS.1380",
            "primary_ip_address needs primary_subnet_id",
        )));
    }
    let dedicated = match n.tenancy.as_deref() {
        None | Some("shared") => {
            if n.dedicated_host_id.is_some() {
                return Ok(Err(refuse(
                    "SDRS.1371",
                    "dedicated_host_id needs tenancy 'dedicated'",
                )));
            }
            false
        }
        Some("dedicated") => true,
        Some(t) => {
            return Ok(Err(refuse(
                "SDRS.0228",
                format!("tenancy '{t}' is not 'shared' or 'dedicated'"),
            )))
        }
    };
    let g = tri!(visible_group(txn, &n.group_id, &n.project));
    if !matches!(g.status, Status::Available | Status::Protected) || g.busy_job.is_some() {
        return Ok(Err(refuse(
            "SDRS.1024",
            format!(
                "protection group '{}' is {}: it must be available or protected",
                g.id,
                g.status.as_str()
            ),
        )));
    }
    let server = match load_server(txn, &n.server_id)? {
        Some(s) if s.project == n.project => s,
        _ => {
            return Ok(Err(refuse(
                "SDRS.1326",
                format!("server '{}' not found", n.server_id),
            )))
        }
    };
    if let Some(other) = txn.get(CF_SDRS_INDEX, &key("srv", &server.id))? {
        return Ok(Err(refuse(
            "SDRS.1305",
            format!(
                "server '{}' is already protected by protected instance '{}'",
                server.id,
                String::from_utf8_lossy(&other)
            ),
        )));
    }
    // VPC (SDRS.1304): the inventory records no VPC for servers; every server is taken to
    // be in its project's VPC, so the check cannot fail today.
    let Some(server_site) = site_of_host(txn, &server.host)? else {
        return Ok(Err(refuse(
            "SDRS.1303",
            format!("the host of server '{}' is unknown", server.id),
        )));
    };
    if server_site != g.production_az() {
        return Ok(Err(refuse(
            "SDRS.1303",
            format!(
                "server '{}' is in availability zone '{server_site}', not in the group's production zone '{}'",
                server.id,
                g.production_az()
            ),
        )));
    }
    if !matches!(server.status, ServerStatus::Active | ServerStatus::Shutoff) {
        return Ok(Err(refuse(
            "SDRS.1333",
            format!(
                "server '{}' is {}: it must be ACTIVE or SHUTOFF",
                server.id,
                server_status_name(server.status)
            ),
        )));
    }
    if server.disks.is_empty() {
        return Ok(Err(refuse(
            "SDRS.1339",
            format!("server '{}' has no system disk", server.id),
        )));
    }
    // Shared (multi-attach) disks: the same volume id or image path on another server.
    for (_, v) in txn.scan_prefix(CF_SERVERS, b"")? {
        let other: Server = crate::codec::decode(&v)?;
        if other.id == server.id {
            continue;
        }
        for d in &server.disks {
            if other
                .disks
                .iter()
                .any(|o| o.id == d.id || (!d.path.is_empty() && o.path == d.path))
            {
                return Ok(Err(refuse(
                    "SDRS.0201",
                    format!(
                        "disk '{}' of server '{}' is shared with server '{}': servers with shared disks cannot be protected",
                        d.id, server.id, other.id
                    ),
                )));
            }
        }
    }
    for d in &server.disks {
        if let Some(p) = txn.get(CF_SDRS_INDEX, &key("vol", &d.id))? {
            return Ok(Err(refuse(
                "SDRS.1811",
                format!(
                    "disk '{}' is already in replication pair '{}'",
                    d.id,
                    String::from_utf8_lossy(&p)
                ),
            )));
        }
    }
    if ids_under(txn, "ig", &g.id)?.len() >= INSTANCES_PER_GROUP_MAX {
        return Ok(Err(refuse(
            "SDRS.1358",
            format!(
                "protection group '{}' already has {INSTANCES_PER_GROUP_MAX} protected instances",
                g.id
            ),
        )));
    }
    if n.pair_ids.len() < server.disks.len() {
        return Ok(Err(CommandError::Conflict(format!(
            "server '{}' has {} disks but the request carried {} pair ids; retry",
            server.id,
            server.disks.len(),
            n.pair_ids.len()
        ))));
    }
    for (pid, vid) in n.pair_ids.iter().take(server.disks.len()) {
        if replication::load_pair(txn, pid)?.is_some() || load_spair(txn, pid)?.is_some() {
            return Ok(Err(CommandError::AlreadyExists {
                kind: "replication pair".into(),
                id: pid.clone(),
            }));
        }
        if txn.get(CF_SDRS_INDEX, &key("vol", vid))?.is_some() {
            return Ok(Err(CommandError::AlreadyExists {
                kind: "volume".into(),
                id: vid.clone(),
            }));
        }
    }
    if load_instance(txn, &n.id)?.is_some() {
        return Ok(Err(CommandError::AlreadyExists {
            kind: "protected instance".into(),
            id: n.id.clone(),
        }));
    }
    if load_server(txn, &n.dr_server_id)?.is_some() {
        return Ok(Err(CommandError::AlreadyExists {
            kind: "server".into(),
            id: n.dr_server_id.clone(),
        }));
    }
    // The DR server's host: in the group's DR zone, with room for the flavor and disks.
    let dr_az = g.az_of(g.station.flip()).to_string();
    let total: u64 = server.disks.iter().map(|d| d.size_bytes).sum();
    let pinned = if dedicated {
        n.dedicated_host_id.as_deref()
    } else {
        None
    };
    if let Some(h) = pinned {
        if inventory::host_txn(txn, h)?.is_none_or(|x| x.site != dr_az) {
            return Ok(Err(refuse(
                "SDRS.1372",
                format!("dedicated host '{h}' not found in the DR availability zone '{dr_az}'"),
            )));
        }
    }
    let prefer = server.disks.first().map(|d| d.pool.clone());
    let Some((dr_host, dr_pool)) = pick_host(
        txn,
        &dr_az,
        pinned,
        None,
        (server.flavor.vcpus, server.flavor.ram_mb, total),
        prefer.as_deref(),
    )?
    else {
        return Ok(Err(refuse(
            "SDRS.0203",
            format!(
                "no host in the DR availability zone '{dr_az}' has room for the DR server ({} vCPUs, {} MB RAM, {total} bytes of disk)",
                server.flavor.vcpus, server.flavor.ram_mb
            ),
        )));
    };
    // Compose the job: one Create per disk.
    let mut job = empty_job(
        &n.job_id,
        JOB_CREATE_INSTANCE,
        &n.project,
        ents(&[
            ("server_group_id", &g.id),
            ("protected_instance_id", &n.id),
            ("native_server_id", &n.dr_server_id),
        ]),
    );
    let protected = g.status == Status::Protected;
    let owner = format!("sdrs/instance/{}", n.id);
    let mut new_pairs = Vec::new();
    let mut dr_disks = Vec::new();
    let mut attachments = Vec::new();
    for (idx, (d, (pid, vid))) in server.disks.iter().zip(&n.pair_ids).enumerate() {
        let target = VolumeRef {
            host: dr_host.name.clone(),
            pool: dr_pool.clone(),
            volume_id: vid.clone(),
            path: String::new(),
            size_bytes: d.size_bytes,
            layout: VolumeLayout::Block,
        };
        let np = NewPair {
            id: pid.clone(),
            project: n.project.clone(),
            owner: owner.clone(),
            source: disk_ref(&server, d),
            target: target.clone(),
            enabled: protected,
            sleep_time_s: SLEEP_TIME_S,
            bwlimit_bytes_per_sec: None,
        };
        if let Err(e) = replication::check_new_pair(txn, &np)? {
            return Ok(Err(e));
        }
        dr_disks.push(inventory::Disk {
            id: vid.clone(),
            size_bytes: d.size_bytes,
            pool: dr_pool.clone(),
            path: String::new(),
        });
        attachments.push(Attachment {
            pair_id: pid.clone(),
            device: device_name(idx),
        });
        new_pairs.push((np, d.clone(), idx));
    }
    for (np, _, _) in &new_pairs {
        let staged = pair_preview(np, &n.job_id, now);
        replication::plan_op(&staged, &PairOp::Create, &mut job, &[]);
    }
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    // Write.
    tri!(reserve_bytes(
        txn,
        &dr_host.name,
        &dr_pool,
        total,
        (0, 0),
        &n.job_id,
        now
    ));
    let dr = Server {
        id: n.dr_server_id.clone(),
        project: n.project.clone(),
        name: server.name.clone(),
        host: dr_host.name.clone(),
        status: ServerStatus::Shutoff,
        flavor: server.flavor,
        disks: dr_disks,
        created_at_ms: now,
        updated_at_ms: now,
    };
    tri!(put_server(txn, dr, now));
    for (np, d, idx) in &new_pairs {
        replication::insert_pair(txn, np, &n.job_id, now)?;
        save_spair(
            txn,
            &SdrsPair {
                id: np.id.clone(),
                project: n.project.clone(),
                group_id: g.id.clone(),
                name: format!("{}-{}", n.name.chars().take(40).collect::<String>(), idx),
                description: None,
                status: Status::Creating,
                source_volume: d.id.clone(),
                target_volume: np.target.volume_id.clone(),
                attachment: Some((n.id.clone(), device_name(*idx))),
                bootable: *idx == 0,
                size_bytes: d.size_bytes,
                busy_job: Some(n.job_id.clone()),
                failure_detail: None,
                created_at_ms: now,
                updated_at_ms: now,
            },
        )?;
    }
    save_instance(
        txn,
        &Instance {
            id: n.id.clone(),
            project: n.project.clone(),
            group_id: g.id.clone(),
            name: n.name.clone(),
            description: n.description.clone(),
            status: Status::Creating,
            source_server: server.id.clone(),
            target_server: n.dr_server_id.clone(),
            station: g.station,
            attachments,
            tags: n.tags.clone(),
            flavor_ref: n.flavor_ref.clone(),
            primary_subnet_id: n.primary_subnet_id.clone(),
            primary_ip_address: n.primary_ip_address.clone(),
            tenancy: n.tenancy.clone(),
            dedicated_host_id: n.dedicated_host_id.clone(),
            cluster_id: n.cluster_id.clone(),
            busy_job: Some(n.job_id.clone()),
            created_at_ms: now,
            updated_at_ms: now,
        },
    )?;
    put_job_ref(
        txn,
        &n.job_id,
        &JobRef::CreateInstance {
            instance: n.id.clone(),
        },
    )?;
    jobs::insert_job(txn, &job, None, now)?;
    jobs::finish_if_empty(txn, &n.job_id, now)?;
    Ok(Ok(job_outcome(&n.job_id)))
}

/// A pair as `insert_pair` will stage it (for planning its creation tasks first).
fn pair_preview(np: &NewPair, job_id: &str, now: u64) -> Pair {
    Pair {
        id: np.id.clone(),
        project: np.project.clone(),
        owner: np.owner.clone(),
        source: np.source.clone(),
        target: np.target.clone(),
        state: PairState::Creating,
        enabled: np.enabled,
        sleep_time_s: np.sleep_time_s,
        bwlimit_bytes_per_sec: np.bwlimit_bytes_per_sec,
        busy_job: Some(job_id.to_string()),
        pending_op: Some(PairOp::Create),
        sync_started_ms: Some(now),
        last_sync_ms: None,
        recovery_point_ms: None,
        next_sync_ms: None,
        bytes_sent_total: 0,
        last_sync_bytes: 0,
        syncs_ok: 0,
        syncs_failed: 0,
        last_error: None,
        reinit_required: false,
        created_at_ms: now,
        updated_at_ms: now,
    }
}

/// The copy of `p` that is the pair's original DR volume (`dr_volume`), wherever it is now.
fn dr_copy(p: &Pair, dr_volume: &str) -> VolumeRef {
    if p.source.volume_id == dr_volume {
        p.source.clone()
    } else {
        p.target.clone()
    }
}

/// Plans the removal of a pair (and of its DR volume when asked) into `job`.
fn plan_pair_delete(
    txn: &Txn<'_>,
    sp: &SdrsPair,
    delete_dr_volume: bool,
    workload: &str,
    job: &mut NewJob,
) -> Result<Result<Option<PairOp>, CommandError>, StoreError> {
    let Some(p) = replication::load_pair(txn, &sp.id)? else {
        return Ok(Ok(None));
    };
    let op = PairOp::Delete {
        delete_target: false,
    };
    if let Err(e) = replication::check_op(&p, &op) {
        return Ok(Err(refuse("SDRS.1301", e)));
    }
    if delete_dr_volume {
        let v = dr_copy(&p, &sp.target_volume);
        job.tasks.push(NewTask {
            id: format!("{}:{}:drop", job.id, sp.id),
            kind: TaskKind::Workload {
                host: v.host.clone(),
                workload_kind: "server".into(),
                workload_id: workload.to_string(),
                action: WorkloadAction::DeleteVolume { volume: v },
            },
            depends_on: Vec::new(),
            max_attempts: TASK_ATTEMPTS,
            host: None,
        });
    }
    Ok(Ok(Some(op)))
}

fn delete_instance(
    txn: &mut Txn<'_>,
    id: &str,
    project: &str,
    delete_target_server: bool,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let mut i = tri!(visible_instance(txn, id, project));
    let deletable = matches!(
        i.status,
        Status::Available
            | Status::Protected
            | Status::FailedOver
            | Status::Error
            | Status::ErrorStarting
            | Status::ErrorStopping
            | Status::ErrorReversing
            | Status::ErrorFailingOver
            | Status::ErrorDeleting
            | Status::ErrorReprotecting
            | Status::Invalid
            | Status::Fault
    );
    if !deletable || i.busy_job.is_some() {
        return Ok(Err(refuse(
            "SDRS.1301",
            format!(
                "protected instance '{id}' is {}: it cannot be deleted now",
                i.status.as_str()
            ),
        )));
    }
    if let Some(g) = load_group(txn, &i.group_id)? {
        if g.status.is_transient() || g.busy_job.is_some() {
            return Ok(Err(refuse(
                "SDRS.1002",
                format!("protection group '{}' is {}", g.id, g.status.as_str()),
            )));
        }
    }
    let mut job = empty_job(
        job_id,
        JOB_DELETE_INSTANCE,
        project,
        ents(&[
            ("server_group_id", &i.group_id),
            ("protected_instance_id", id),
            ("native_server_id", &i.target_server),
        ]),
    );
    let mut ops = Vec::new();
    let mut spairs = Vec::new();
    for a in &i.attachments {
        let Some(sp) = load_spair(txn, &a.pair_id)? else {
            continue;
        };
        if let Some(op) = tri!(plan_pair_delete(
            txn,
            &sp,
            delete_target_server,
            &i.target_server,
            &mut job
        )) {
            ops.push((sp.id.clone(), op));
        }
        spairs.push(sp);
    }
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    for (pid, op) in &ops {
        if let Err(e) = replication::begin_op(txn, pid, op, job_id, now)? {
            return Ok(Err(refuse("SDRS.1301", e)));
        }
    }
    for sp in &mut spairs {
        sp.status = Status::Deleting;
        sp.busy_job = Some(job_id.to_string());
        sp.updated_at_ms = now;
        save_spair(txn, sp)?;
    }
    i.status = Status::Deleting;
    i.busy_job = Some(job_id.to_string());
    i.updated_at_ms = now;
    save_instance(txn, &i)?;
    put_job_ref(
        txn,
        job_id,
        &JobRef::DeleteInstance {
            instance: id.to_string(),
            delete_target_server,
        },
    )?;
    jobs::insert_job(txn, &job, None, now)?;
    jobs::finish_if_empty(txn, job_id, now)?;
    Ok(Ok(job_outcome(job_id)))
}

fn attach(
    txn: &mut Txn<'_>,
    instance: &str,
    project: &str,
    pair: &str,
    device: &str,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let mut i = tri!(visible_instance(txn, instance, project));
    let g = tri!(visible_group(txn, &i.group_id, project));
    if !matches!(g.status, Status::Available | Status::Protected) || g.busy_job.is_some() {
        return Ok(Err(refuse(
            "SDRS.1024",
            format!("protection group '{}' is {}", g.id, g.status.as_str()),
        )));
    }
    if !matches!(i.status, Status::Available | Status::Protected) || i.busy_job.is_some() {
        return Ok(Err(refuse(
            "SDRS.1328",
            format!(
                "protected instance '{instance}' is {}: it must be available or protected",
                i.status.as_str()
            ),
        )));
    }
    let mut sp = tri!(visible_spair(txn, pair, project));
    if !matches!(sp.status, Status::Available | Status::Protected) || sp.busy_job.is_some() {
        return Ok(Err(refuse(
            "SDRS.1601",
            format!(
                "replication pair '{pair}' is {}: it must be available or protected",
                sp.status.as_str()
            ),
        )));
    }
    if sp.group_id != i.group_id {
        return Ok(Err(refuse(
            "SDRS.1611",
            format!(
                "replication pair '{pair}' is not in protection group '{}'",
                i.group_id
            ),
        )));
    }
    if let Some((other, _)) = &sp.attachment {
        return Ok(Err(refuse(
            "SDRS.1603",
            format!(
                "replication pair '{pair}' is already attached to protected instance '{other}'"
            ),
        )));
    }
    let device = match device.strip_prefix("/dev/sd") {
        Some(rest) => format!("/dev/vd{rest}"),
        None => device.to_string(),
    };
    if i.attachments.iter().any(|a| a.device == device) {
        return Ok(Err(refuse(
            "SDRS.1603",
            format!("device '{device}' is already used on protected instance '{instance}'"),
        )));
    }
    // The DR server gains the pair's DR volume.
    if let (Some(p), Some(mut dr)) = (
        replication::load_pair(txn, pair)?,
        load_server(txn, &i.target_server)?,
    ) {
        let v = dr_copy(&p, &sp.target_volume);
        if !dr.disks.iter().any(|d| d.id == v.volume_id) && dr.host == v.host {
            dr.disks.push(inventory::Disk {
                id: v.volume_id.clone(),
                size_bytes: v.size_bytes,
                pool: v.pool.clone(),
                path: v.path.clone(),
            });
            tri!(put_server(txn, dr, now));
        }
    }
    sp.attachment = Some((instance.to_string(), device.clone()));
    sp.updated_at_ms = now;
    save_spair(txn, &sp)?;
    i.attachments.push(Attachment {
        pair_id: pair.to_string(),
        device: device.clone(),
    });
    i.updated_at_ms = now;
    save_instance(txn, &i)?;
    let job = empty_job(
        job_id,
        JOB_ATTACH,
        project,
        ents(&[
            ("protected_instance_id", instance),
            ("replication_pair_id", pair),
        ]),
    );
    tri!(start_job(txn, &job, now));
    Ok(Ok(job_outcome(job_id)))
}

fn detach(
    txn: &mut Txn<'_>,
    instance: &str,
    project: &str,
    pair: &str,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let mut i = tri!(visible_instance(txn, instance, project));
    let g = tri!(visible_group(txn, &i.group_id, project));
    use Status as S;
    if !matches!(
        g.status,
        S::Available
            | S::Protected
            | S::FailedOver
            | S::ErrorStarting
            | S::ErrorStopping
            | S::ErrorReversing
            | S::ErrorFailingOver
    ) || g.busy_job.is_some()
    {
        return Ok(Err(refuse(
            "SDRS.1002",
            format!("protection group '{}' is {}", g.id, g.status.as_str()),
        )));
    }
    if !matches!(
        i.status,
        S::Available
            | S::Protected
            | S::FailedOver
            | S::ErrorStarting
            | S::ErrorStopping
            | S::ErrorReversing
            | S::ErrorFailingOver
            | S::ErrorDeleting
            | S::ErrorReprotecting
            | S::Invalid
            | S::Fault
    ) || i.busy_job.is_some()
    {
        return Ok(Err(refuse(
            "SDRS.1328",
            format!("protected instance '{instance}' is {}", i.status.as_str()),
        )));
    }
    let mut sp = tri!(visible_spair(txn, pair, project));
    if sp.attachment.as_ref().is_none_or(|(pi, _)| pi != instance) {
        return Ok(Err(refuse(
            "SDRS.1604",
            format!("replication pair '{pair}' is not attached to protected instance '{instance}'"),
        )));
    }
    if sp.busy_job.is_some() || sp.status.is_transient() {
        return Ok(Err(refuse(
            "SDRS.1601",
            format!("replication pair '{pair}' is {}", sp.status.as_str()),
        )));
    }
    if sp.bootable {
        for s in [&i.source_server, &i.target_server] {
            if !server_stopped(txn, s)? {
                return Ok(Err(refuse(
                    "SDRS.1316",
                    format!(
                        "replication pair '{pair}' holds the system disk: stop server '{s}' first"
                    ),
                )));
            }
        }
    }
    if let (Some(p), Some(mut dr)) = (
        replication::load_pair(txn, pair)?,
        load_server(txn, &i.target_server)?,
    ) {
        let v = dr_copy(&p, &sp.target_volume);
        if dr.disks.iter().any(|d| d.id == v.volume_id) {
            dr.disks.retain(|d| d.id != v.volume_id);
            tri!(put_server(txn, dr, now));
        }
    }
    sp.attachment = None;
    sp.updated_at_ms = now;
    save_spair(txn, &sp)?;
    i.attachments.retain(|a| a.pair_id != pair);
    i.updated_at_ms = now;
    save_instance(txn, &i)?;
    let job = empty_job(
        job_id,
        JOB_DETACH,
        project,
        ents(&[
            ("protected_instance_id", instance),
            ("replication_pair_id", pair),
        ]),
    );
    tri!(start_job(txn, &job, now));
    Ok(Ok(job_outcome(job_id)))
}

/// Finds the server holding disk `volume` in `project`.
fn server_of_disk(
    txn: &Txn<'_>,
    project: &str,
    volume: &str,
) -> Result<Option<(Server, inventory::Disk)>, StoreError> {
    for (_, v) in txn.scan_prefix(CF_SERVERS, b"")? {
        let s: Server = crate::codec::decode(&v)?;
        if s.project != project {
            continue;
        }
        if let Some(d) = s.disks.iter().find(|d| d.id == volume).cloned() {
            return Ok(Some((s, d)));
        }
    }
    Ok(None)
}

fn create_pair(txn: &mut Txn<'_>, n: &NewSdrsPair, now: u64) -> Result<CommandResult, StoreError> {
    let g = tri!(visible_group(txn, &n.group_id, &n.project));
    if !matches!(g.status, Status::Available | Status::Protected) || g.busy_job.is_some() {
        return Ok(Err(refuse(
            "SDRS.1024",
            format!(
                "protection group '{}' is {}: it must be available or protected",
                g.id,
                g.status.as_str()
            ),
        )));
    }
    let Some((server, disk)) = server_of_disk(txn, &n.project, &n.volume_id)? else {
        return Ok(Err(refuse(
            "SDRS.0211",
            format!("volume '{}' not found", n.volume_id),
        )));
    };
    if let Some(p) = txn.get(CF_SDRS_INDEX, &key("vol", &n.volume_id))? {
        return Ok(Err(refuse(
            "SDRS.1811",
            format!(
                "volume '{}' is already used by replication pair '{}'",
                n.volume_id,
                String::from_utf8_lossy(&p)
            ),
        )));
    }
    if !matches!(server.status, ServerStatus::Active | ServerStatus::Shutoff) {
        return Ok(Err(refuse(
            "SDRS.1801",
            format!(
                "volume '{}' is not available: its server '{}' is {}",
                n.volume_id,
                server.id,
                server_status_name(server.status)
            ),
        )));
    }
    let site = site_of_host(txn, &server.host)?;
    if site.as_deref() != Some(g.production_az()) {
        return Ok(Err(refuse(
            "SDRS.1810",
            format!(
                "volume '{}' is not in the group's production availability zone '{}'",
                n.volume_id,
                g.production_az()
            ),
        )));
    }
    let mut unattached = 0;
    for pid in ids_under(txn, "pg", &g.id)? {
        if load_spair(txn, &pid)?.is_some_and(|p| p.attachment.is_none()) {
            unattached += 1;
        }
    }
    if unattached >= UNATTACHED_PAIRS_MAX {
        return Ok(Err(refuse(
            "SDRS.1826",
            format!("protection group '{}' already has {UNATTACHED_PAIRS_MAX} replication pairs not attached to a protected instance", g.id),
        )));
    }
    if ids_under(txn, "pp", &n.project)?.len() >= PAIRS_PER_PROJECT_MAX {
        return Ok(Err(refuse("SDRS.0306", "replication pair quota exhausted")));
    }
    if load_spair(txn, &n.id)?.is_some()
        || txn
            .get(CF_SDRS_INDEX, &key("vol", &n.dr_volume_id))?
            .is_some()
    {
        return Ok(Err(CommandError::AlreadyExists {
            kind: "replication pair".into(),
            id: n.id.clone(),
        }));
    }
    let dr_az = g.az_of(g.station.flip()).to_string();
    let Some((dr_host, dr_pool)) = pick_host(
        txn,
        &dr_az,
        None,
        None,
        (0, 0, disk.size_bytes),
        Some(&disk.pool),
    )?
    else {
        return Ok(Err(refuse(
            "SDRS.0203",
            format!(
                "no host in the DR availability zone '{dr_az}' has room for a {} byte volume",
                disk.size_bytes
            ),
        )));
    };
    let np = NewPair {
        id: n.id.clone(),
        project: n.project.clone(),
        owner: format!("sdrs/pair/{}", n.id),
        source: disk_ref(&server, &disk),
        target: VolumeRef {
            host: dr_host.name.clone(),
            pool: dr_pool.clone(),
            volume_id: n.dr_volume_id.clone(),
            path: String::new(),
            size_bytes: disk.size_bytes,
            layout: VolumeLayout::Block,
        },
        enabled: g.status == Status::Protected,
        sleep_time_s: SLEEP_TIME_S,
        bwlimit_bytes_per_sec: None,
    };
    if let Err(e) = replication::check_new_pair(txn, &np)? {
        return Ok(Err(e));
    }
    let mut job = empty_job(
        &n.job_id,
        JOB_CREATE_PAIR,
        &n.project,
        ents(&[
            ("server_group_id", &g.id),
            ("replication_pair_id", &n.id),
            ("volume_ids", &format!("{},{}", n.volume_id, n.dr_volume_id)),
        ]),
    );
    replication::plan_op(
        &pair_preview(&np, &n.job_id, now),
        &PairOp::Create,
        &mut job,
        &[],
    );
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    tri!(reserve_bytes(
        txn,
        &dr_host.name,
        &dr_pool,
        disk.size_bytes,
        (0, 0),
        &n.job_id,
        now
    ));
    replication::insert_pair(txn, &np, &n.job_id, now)?;
    save_spair(
        txn,
        &SdrsPair {
            id: n.id.clone(),
            project: n.project.clone(),
            group_id: g.id.clone(),
            name: n.name.clone(),
            description: n.description.clone(),
            status: Status::Creating,
            source_volume: n.volume_id.clone(),
            target_volume: n.dr_volume_id.clone(),
            attachment: None,
            bootable: server.disks.first().is_some_and(|d| d.id == disk.id),
            size_bytes: disk.size_bytes,
            busy_job: Some(n.job_id.clone()),
            failure_detail: None,
            created_at_ms: now,
            updated_at_ms: now,
        },
    )?;
    put_job_ref(txn, &n.job_id, &JobRef::CreatePair { pair: n.id.clone() })?;
    jobs::insert_job(txn, &job, None, now)?;
    jobs::finish_if_empty(txn, &n.job_id, now)?;
    Ok(Ok(job_outcome(&n.job_id)))
}

fn delete_pair(
    txn: &mut Txn<'_>,
    id: &str,
    project: &str,
    group_id: Option<&str>,
    delete_target_volume: bool,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let mut sp = tri!(visible_spair(txn, id, project));
    if let Some(gid) = group_id {
        if gid != sp.group_id {
            return Ok(Err(refuse(
                "SDRS.1611",
                format!("replication pair '{id}' is not in protection group '{gid}'"),
            )));
        }
    }
    use Status as S;
    let ok = matches!(
        sp.status,
        S::Available
            | S::Protected
            | S::FailedOver
            | S::Error
            | S::ErrorStarting
            | S::ErrorStopping
            | S::ErrorReversing
            | S::ErrorFailingOver
            | S::ErrorDeleting
            | S::ErrorReprotecting
            | S::ErrorAttaching
            | S::Invalid
            | S::Fault
    );
    if !ok || sp.busy_job.is_some() {
        return Ok(Err(refuse(
            "SDRS.1601",
            format!(
                "replication pair '{id}' is {}: it cannot be deleted now",
                sp.status.as_str()
            ),
        )));
    }
    if let Some((pi, _)) = &sp.attachment {
        return Ok(Err(refuse(
            "SDRS.1605",
            format!(
                "replication pair '{id}' is attached to protected instance '{pi}': detach it first"
            ),
        )));
    }
    if let Some(g) = load_group(txn, &sp.group_id)? {
        if g.status.is_transient() || g.busy_job.is_some() {
            return Ok(Err(refuse(
                "SDRS.1002",
                format!("protection group '{}' is {}", g.id, g.status.as_str()),
            )));
        }
    }
    let mut job = empty_job(
        job_id,
        JOB_DELETE_PAIR,
        project,
        ents(&[
            ("server_group_id", &sp.group_id),
            ("replication_pair_id", id),
        ]),
    );
    let op = tri!(plan_pair_delete(
        txn,
        &sp,
        delete_target_volume,
        id,
        &mut job
    ));
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    if let Some(op) = &op {
        if let Err(e) = replication::begin_op(txn, id, op, job_id, now)? {
            return Ok(Err(refuse("SDRS.1601", e)));
        }
    }
    sp.status = Status::Deleting;
    sp.busy_job = Some(job_id.to_string());
    sp.updated_at_ms = now;
    save_spair(txn, &sp)?;
    put_job_ref(
        txn,
        job_id,
        &JobRef::DeletePair {
            pair: id.to_string(),
        },
    )?;
    jobs::insert_job(txn, &job, None, now)?;
    jobs::finish_if_empty(txn, job_id, now)?;
    Ok(Ok(job_outcome(job_id)))
}

/// A server status by its ECS name.
pub fn server_status_name(s: ServerStatus) -> &'static str {
    match s {
        ServerStatus::Build => "BUILD",
        ServerStatus::Active => "ACTIVE",
        ServerStatus::Shutoff => "SHUTOFF",
        ServerStatus::Migrating => "RESIZE",
        ServerStatus::Reboot => "REBOOT",
        ServerStatus::Error => "ERROR",
    }
}

fn ecs_not_found(id: &str) -> CommandError {
    refuse("Ecs.0114", format!("The ECS '{id}' does not exist."))
}

fn migrate(
    txn: &mut Txn<'_>,
    server_id: &str,
    project: &str,
    dedicated_host: Option<&str>,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let mut server = match load_server(txn, server_id)? {
        Some(s) if s.project == project => s,
        _ => return Ok(Err(ecs_not_found(server_id))),
    };
    if server.status != ServerStatus::Shutoff {
        return Ok(Err(refuse(
            "Ecs.0100",
            format!(
                "server '{server_id}' is {}: only a stopped (SHUTOFF) server can be cold migrated",
                server_status_name(server.status)
            ),
        )));
    }
    let mut ecs = load_ecs(txn, server_id)?;
    if let Some(j) = &ecs.busy_job {
        return Ok(Err(refuse(
            "Ecs.0100",
            format!("server '{server_id}' is being migrated by job '{j}'"),
        )));
    }
    if let Some(pi) = txn.get(CF_SDRS_INDEX, &key("srv", server_id))? {
        return Ok(Err(refuse(
            "Ecs.0100",
            format!(
                "server '{server_id}' is protected by SDRS protected instance '{}': its disks cannot move",
                String::from_utf8_lossy(&pi)
            ),
        )));
    }
    let Some(site) = site_of_host(txn, &server.host)? else {
        return Ok(Err(refuse(
            "Ecs.0000",
            format!("the host of server '{server_id}' is unknown"),
        )));
    };
    let alloc = (server.flavor.vcpus, server.flavor.ram_mb);
    let total: u64 = server.disks.iter().map(|d| d.size_bytes).sum();
    let prefer = server.disks.first().map(|d| d.pool.clone());
    let (target, pool) = match dedicated_host {
        Some(d) => {
            match inventory::host_txn(txn, d)? {
                Some(h) if h.site == site => {}
                _ => {
                    return Ok(Err(refuse(
                        "Ecs.0000",
                        format!("dedicated host '{d}' not found in availability zone '{site}'"),
                    )))
                }
            }
            if ecs.dedicated_host.as_deref() == Some(d) {
                return Ok(Err(refuse(
                    "Ecs.0221",
                    format!("server '{server_id}' is already on dedicated host '{d}': cold migration to the same dedicated host is not supported"),
                )));
            }
            if d == server.host {
                (d.to_string(), String::new())
            } else {
                match pick_host(txn, &site, Some(d), None, (alloc.0, alloc.1, total), prefer.as_deref())? {
                    Some((h, p)) => (h.name, p),
                    None => {
                        return Ok(Err(refuse(
                            "Ecs.0000",
                            format!("dedicated host '{d}' lacks room for server '{server_id}' ({} vCPUs, {} MB RAM, {total} bytes)", alloc.0, alloc.1),
                        )))
                    }
                }
            }
        }
        None => {
            if ecs.dedicated_host.is_none() {
                return Ok(Err(refuse(
                    "Ecs.0000",
                    format!("server '{server_id}' is not on a dedicated host: give migrate.dedicated_host_id"),
                )));
            }
            match pick_host(txn, &site, None, Some(&server.host), (alloc.0, alloc.1, total), prefer.as_deref())? {
                Some((h, p)) => (h.name, p),
                None => {
                    return Ok(Err(refuse(
                        "Ecs.0000",
                        format!("no other host of the public pool in availability zone '{site}' has room for server '{server_id}'"),
                    )))
                }
            }
        }
    };
    let mut job = empty_job(
        job_id,
        JOB_MIGRATE,
        project,
        ents(&[("server_id", server_id), ("sub_jobs_total", "0")]),
    );
    let mut disks = Vec::new();
    if target != server.host {
        for d in &server.disks {
            let src = disk_ref(&server, d);
            let mut dst = src.clone();
            dst.host = target.clone();
            dst.pool = pool.clone();
            dst.path = String::new();
            disks.push(MigrateDisk {
                source: src,
                target: dst,
            });
        }
        let mig_id = format!("{job_id}:migrate");
        job.tasks.push(NewTask {
            id: mig_id.clone(),
            kind: TaskKind::Migrate {
                server_id: server_id.to_string(),
                source_host: server.host.clone(),
                target_host: target.clone(),
                disks: disks.clone(),
            },
            depends_on: Vec::new(),
            max_attempts: TASK_ATTEMPTS,
            host: None,
        });
        for (n, d) in disks.iter().enumerate() {
            job.tasks.push(NewTask {
                id: format!("{job_id}:drop:{n}"),
                kind: TaskKind::Workload {
                    host: d.source.host.clone(),
                    workload_kind: "server".into(),
                    workload_id: server_id.to_string(),
                    action: WorkloadAction::DeleteVolume {
                        volume: d.source.clone(),
                    },
                },
                depends_on: vec![mig_id.clone()],
                max_attempts: TASK_ATTEMPTS,
                host: None,
            });
        }
    }
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    if !disks.is_empty() {
        if let Err(e) = reserve_bytes(txn, &target, &pool, total, alloc, job_id, now)? {
            return Ok(Err(refuse("Ecs.0000", e)));
        }
    }
    server.status = ServerStatus::Migrating;
    tri!(put_server(txn, server, now));
    ecs.busy_job = Some(job_id.to_string());
    save_ecs(txn, server_id, &ecs)?;
    put_job_ref(
        txn,
        job_id,
        &JobRef::Migrate {
            server: server_id.to_string(),
            target_host: target,
            dedicated_host: dedicated_host.map(str::to_string),
            disks,
        },
    )?;
    jobs::insert_job(txn, &job, None, now)?;
    jobs::finish_if_empty(txn, job_id, now)?;
    Ok(Ok(job_outcome(job_id)))
}

fn stop_servers(
    txn: &mut Txn<'_>,
    project: &str,
    servers: &[String],
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let mut found = Vec::new();
    for id in servers {
        let s = match load_server(txn, id)? {
            Some(s) if s.project == project => s,
            _ => return Ok(Err(ecs_not_found(id))),
        };
        if !matches!(s.status, ServerStatus::Active | ServerStatus::Shutoff) {
            return Ok(Err(refuse(
                "Ecs.0100",
                format!(
                    "server '{id}' is {}: it cannot be stopped now",
                    server_status_name(s.status)
                ),
            )));
        }
        if !found.iter().any(|f: &Server| f.id == s.id) {
            found.push(s);
        }
    }
    let mut job = empty_job(
        job_id,
        JOB_STOP_SERVERS,
        project,
        ents(&[("sub_jobs_total", &found.len().to_string())]),
    );
    for (n, s) in found.iter().enumerate() {
        job.sub_jobs.push(empty_job(
            &sub_job_id(job_id, n + 1),
            JOB_STOP_SERVER,
            project,
            ents(&[("server_id", &s.id)]),
        ));
    }
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    for mut s in found {
        if s.status != ServerStatus::Shutoff {
            s.status = ServerStatus::Shutoff;
            tri!(put_server(txn, s, now));
        }
    }
    jobs::insert_job(txn, &job, None, now)?;
    jobs::finish_if_empty(txn, job_id, now)?;
    Ok(Ok(job_outcome(job_id)))
}

// ---------------------------------------------------------------------------------------
// The end of a job
// ---------------------------------------------------------------------------------------

/// Called whenever a job ends (SUCCESS or FAIL), after the pairs it held moved on.
pub(crate) fn on_job_end(txn: &mut Txn<'_>, job: &Job, now: u64) -> Result<(), StoreError> {
    let k = key("job", &job.id);
    let Some(r) = txn.get_record::<JobRef>(CF_SDRS_INDEX, &k)? else {
        return Ok(());
    };
    txn.delete(CF_SDRS_INDEX, &k)?;
    let ok = job.status == JobStatus::Success;
    let reason = || {
        job.fail_reason
            .clone()
            .unwrap_or_else(|| "the job failed".into())
    };
    match r {
        JobRef::Group { group, op, station } => {
            let Some(mut g) = load_group(txn, &group)? else {
                return Ok(());
            };
            let (_, success, failure) = op.statuses();
            if g.busy_job.as_deref() == Some(job.id.as_str()) {
                g.busy_job = None;
                g.status = if ok { success } else { failure };
                if ok {
                    g.station = station;
                }
                g.updated_at_ms = now;
                save_group(txn, &g)?;
            }
            // The group's own pairs (unattached ones).
            for pid in ids_under(txn, "pg", &group)? {
                let Some(mut sp) = load_spair(txn, &pid)? else {
                    continue;
                };
                if sp.busy_job.as_deref() == Some(job.id.as_str()) {
                    settle_pair(&mut sp, ok, success, failure, &reason, now);
                    save_spair(txn, &sp)?;
                }
            }
        }
        JobRef::InstanceOp {
            instance,
            op,
            station,
        } => {
            let Some(mut i) = load_instance(txn, &instance)? else {
                return Ok(());
            };
            let (_, success, failure) = op.statuses();
            if i.busy_job.as_deref() == Some(job.id.as_str()) {
                i.busy_job = None;
                i.status = if ok { success } else { failure };
                if ok {
                    i.station = station;
                }
                i.updated_at_ms = now;
                for a in &i.attachments {
                    let Some(mut sp) = load_spair(txn, &a.pair_id)? else {
                        continue;
                    };
                    if sp.busy_job.is_some() {
                        settle_pair(&mut sp, ok, success, failure, &reason, now);
                        save_spair(txn, &sp)?;
                    }
                }
                save_instance(txn, &i)?;
            }
        }
        JobRef::CreateInstance { instance } => {
            let Some(mut i) = load_instance(txn, &instance)? else {
                return Ok(());
            };
            let protected =
                load_group(txn, &i.group_id)?.is_some_and(|g| g.status == Status::Protected);
            let success = if protected {
                Status::Protected
            } else {
                Status::Available
            };
            i.busy_job = None;
            i.status = if ok { success } else { Status::Error };
            i.updated_at_ms = now;
            for a in &i.attachments {
                let Some(mut sp) = load_spair(txn, &a.pair_id)? else {
                    continue;
                };
                settle_pair(&mut sp, ok, success, Status::Error, &reason, now);
                save_spair(txn, &sp)?;
                if ok && protected {
                    enable_pair(txn, &sp.id, true, now)?;
                }
            }
            save_instance(txn, &i)?;
        }
        JobRef::DeleteInstance {
            instance,
            delete_target_server,
        } => {
            let Some(mut i) = load_instance(txn, &instance)? else {
                return Ok(());
            };
            if ok {
                for a in &i.attachments {
                    if let Some(sp) = load_spair(txn, &a.pair_id)? {
                        remove_spair(txn, &sp)?;
                    }
                }
                remove_instance(txn, &i)?;
                if delete_target_server && load_server(txn, &i.target_server)?.is_some() {
                    let del = InventoryCommand::DeleteWorkload {
                        kind: inventory::WorkloadKind::Server,
                        id: i.target_server.clone(),
                    };
                    // A refusal (it cannot be refused today) leaves the server listed.
                    let _ = inventory::apply(txn, &del, now)?;
                }
            } else {
                i.busy_job = None;
                i.status = Status::ErrorDeleting;
                i.updated_at_ms = now;
                for a in &i.attachments {
                    if let Some(mut sp) = load_spair(txn, &a.pair_id)? {
                        settle_pair(
                            &mut sp,
                            false,
                            Status::ErrorDeleting,
                            Status::ErrorDeleting,
                            &reason,
                            now,
                        );
                        save_spair(txn, &sp)?;
                    }
                }
                save_instance(txn, &i)?;
            }
        }
        JobRef::CreatePair { pair } => {
            let Some(mut sp) = load_spair(txn, &pair)? else {
                return Ok(());
            };
            let protected =
                load_group(txn, &sp.group_id)?.is_some_and(|g| g.status == Status::Protected);
            let success = if protected {
                Status::Protected
            } else {
                Status::Available
            };
            settle_pair(&mut sp, ok, success, Status::Error, &reason, now);
            save_spair(txn, &sp)?;
            if ok && protected {
                enable_pair(txn, &pair, true, now)?;
            }
        }
        JobRef::DeletePair { pair } => {
            let Some(mut sp) = load_spair(txn, &pair)? else {
                return Ok(());
            };
            if ok {
                remove_spair(txn, &sp)?;
            } else {
                settle_pair(
                    &mut sp,
                    false,
                    Status::ErrorDeleting,
                    Status::ErrorDeleting,
                    &reason,
                    now,
                );
                save_spair(txn, &sp)?;
            }
        }
        JobRef::Migrate {
            server,
            target_host,
            dedicated_host,
            disks,
        } => {
            let mut ecs = load_ecs(txn, &server)?;
            ecs.busy_job = None;
            if ok {
                ecs.dedicated_host = dedicated_host;
            }
            save_ecs(txn, &server, &ecs)?;
            if let Some(mut s) = load_server(txn, &server)? {
                s.status = ServerStatus::Shutoff;
                if ok {
                    s.host = target_host;
                    for d in &mut s.disks {
                        if let Some(m) = disks.iter().find(|m| m.source.volume_id == d.id) {
                            d.pool = m.target.pool.clone();
                            d.path = m.target.path.clone();
                        }
                    }
                }
                // Refused only if the target host vanished: the server stays where it was.
                if let Err(e) = put_server(txn, s.clone(), now)? {
                    tracing::warn!(server = %server, error = %e, "migrated server not recorded on its new host");
                    s.host = disks
                        .first()
                        .map(|d| d.source.host.clone())
                        .unwrap_or(s.host);
                    let _ = put_server(txn, s, now)?;
                }
            }
        }
    }
    Ok(())
}

fn settle_pair(
    sp: &mut SdrsPair,
    ok: bool,
    success: Status,
    failure: Status,
    reason: &dyn Fn() -> String,
    now: u64,
) {
    sp.busy_job = None;
    sp.status = if ok { success } else { failure };
    sp.failure_detail = if ok { None } else { Some(reason()) };
    sp.updated_at_ms = now;
}

fn enable_pair(txn: &mut Txn<'_>, id: &str, enabled: bool, now: u64) -> Result<(), StoreError> {
    if replication::load_pair(txn, id)?.is_none() {
        return Ok(());
    }
    let up = ReplicationCommand::Update {
        id: id.to_string(),
        enabled: Some(enabled),
        sleep_time_s: None,
        bwlimit_bytes_per_sec: None,
    };
    let _ = replication::apply(txn, &up, now)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

impl Store {
    fn sdrs_ids(&self, prefix: &str, a: &str) -> Result<Vec<String>, StoreError> {
        let p = key2(prefix, a, "");
        Ok(self
            .scan_keys(CF_SDRS_INDEX, &p, usize::MAX)?
            .into_iter()
            .map(|k| String::from_utf8_lossy(&k[p.len()..]).into_owned())
            .collect())
    }

    pub fn sdrs_group(&self, id: &str) -> Result<Option<Group>, StoreError> {
        self.get_record(CF_SDRS, &key("g", id))
    }

    pub fn sdrs_instance(&self, id: &str) -> Result<Option<Instance>, StoreError> {
        self.get_record(CF_SDRS, &key("i", id))
    }

    pub fn sdrs_pair(&self, id: &str) -> Result<Option<SdrsPair>, StoreError> {
        self.get_record(CF_SDRS, &key("p", id))
    }

    pub fn ecs_server(&self, id: &str) -> Result<EcsServer, StoreError> {
        Ok(self.get_record(CF_SDRS, &key("e", id))?.unwrap_or_default())
    }

    /// A project's protection groups, by id.
    pub fn sdrs_groups(&self, project: &str) -> Result<Vec<Group>, StoreError> {
        let mut out = Vec::new();
        for id in self.sdrs_ids("gp", project)? {
            if let Some(g) = self.sdrs_group(&id)? {
                out.push(g);
            }
        }
        Ok(out)
    }

    pub fn sdrs_instances(&self, project: &str) -> Result<Vec<Instance>, StoreError> {
        let mut out = Vec::new();
        for id in self.sdrs_ids("ip", project)? {
            if let Some(i) = self.sdrs_instance(&id)? {
                out.push(i);
            }
        }
        Ok(out)
    }

    pub fn sdrs_pairs(&self, project: &str) -> Result<Vec<SdrsPair>, StoreError> {
        let mut out = Vec::new();
        for id in self.sdrs_ids("pp", project)? {
            if let Some(p) = self.sdrs_pair(&id)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Ids of a group's protected instances and of its pairs.
    pub fn sdrs_group_members(
        &self,
        group: &str,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        Ok((self.sdrs_ids("ig", group)?, self.sdrs_ids("pg", group)?))
    }

    /// The protected instance a server belongs to (as production or DR server).
    pub fn sdrs_instance_of_server(&self, server: &str) -> Result<Option<String>, StoreError> {
        let cf = self
            .db
            .cf_handle(CF_SDRS_INDEX)
            .ok_or(StoreError::MissingColumnFamily(CF_SDRS_INDEX))?;
        Ok(self
            .db
            .get_cf(cf, key("srv", server))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::inventory::{Disk, Flavor};
    use crate::jobs::testkit::Fixture;
    use crate::jobs::{JobsCommand, TaskOutcome, TaskStatus};

    const P: &str = "proj1";

    fn setup() -> Fixture {
        let f = Fixture::new();
        f.site("az1");
        f.site("az2");
        f.host("h1", "az1");
        f.host("h2", "az2");
        f.host("h3", "az1");
        f
    }

    fn server(f: &Fixture, id: &str, host: &str, disks: usize) {
        let s = Server {
            id: id.into(),
            project: P.into(),
            name: format!("name-{id}"),
            host: host.into(),
            status: ServerStatus::Active,
            flavor: Flavor {
                vcpus: 1,
                ram_mb: 512,
            },
            disks: (0..disks)
                .map(|n| Disk {
                    id: format!("{id}-d{n}"),
                    size_bytes: 1 << 20,
                    pool: "p1".into(),
                    path: format!("/data/{id}-d{n}"),
                })
                .collect(),
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        f.inv(InventoryCommand::RegisterWorkloads {
            workloads: vec![Workload::Server(s)],
        })
        .expect("register server");
    }

    fn sdrs(f: &Fixture, c: SdrsCommand) -> CommandResult {
        f.apply(Command::Sdrs(c))
    }

    fn job_of(r: CommandResult) -> String {
        match r {
            Ok(Outcome::Sdrs(o)) => match *o {
                SdrsOutcome::Job { job_id } => job_id,
                other => panic!("not a job: {other:?}"),
            },
            other => panic!("refused: {other:?}"),
        }
    }

    fn code(r: CommandResult) -> String {
        match r {
            Err(e) => refusal_code(&e)
                .map(|(c, _)| c.to_string())
                .unwrap_or_else(|| format!("{e}")),
            Ok(o) => panic!("accepted: {o:?}"),
        }
    }

    fn group(f: &Fixture, id: &str) -> String {
        job_of(sdrs(
            f,
            SdrsCommand::CreateGroup {
                group: Box::new(NewGroup {
                    id: id.into(),
                    project: P.into(),
                    name: "pg-1".into(),
                    description: None,
                    source_az: "az1".into(),
                    target_az: "az2".into(),
                    domain_id: "dom".into(),
                    domain_name: "az1-az2".into(),
                    source_vpc_id: "vpc".into(),
                }),
                job_id: format!("job-{id}"),
            },
        ))
    }

    fn new_instance(id: &str, group: &str, server: &str) -> NewInstance {
        NewInstance {
            id: id.into(),
            project: P.into(),
            group_id: group.into(),
            server_id: server.into(),
            name: format!("pi-{id}"),
            description: None,
            flavor_ref: None,
            primary_subnet_id: None,
            primary_ip_address: None,
            tenancy: None,
            dedicated_host_id: None,
            cluster_id: None,
            tags: Vec::new(),
            dr_server_id: format!("dr-{id}"),
            pair_ids: (0..4)
                .map(|n| (format!("{id}-pair{n}"), format!("{id}-drv{n}")))
                .collect(),
            job_id: format!("job-{id}"),
        }
    }

    fn instance(f: &Fixture, id: &str, group: &str, server: &str) -> String {
        job_of(sdrs(
            f,
            SdrsCommand::CreateInstance(Box::new(new_instance(id, group, server))),
        ))
    }

    /// Runs every ready task on its host until none is left; `fail` names a task kind to
    /// fail for good (not retryable).
    fn run(f: &Fixture, fail: Option<&str>) {
        for _ in 0..100 {
            let ready = f.store.ready_tasks(u64::MAX, 1000).expect("ready");
            if ready.is_empty() {
                return;
            }
            for t in ready {
                if f.task(&t.id).status != TaskStatus::Ready {
                    continue;
                }
                let host = t.placement_host.clone().expect("placed");
                let token = f.assign_ok(&t.id, &host, 1);
                let outcome = if fail == Some(t.kind.name()) {
                    TaskOutcome::Failed {
                        reason: "injected".into(),
                        retryable: false,
                    }
                } else {
                    TaskOutcome::Succeeded {
                        output: BTreeMap::new(),
                    }
                };
                f.jobs(JobsCommand::ReportResult {
                    task_id: t.id.clone(),
                    token,
                    outcome,
                })
                .expect("report");
            }
        }
        panic!("tasks never ran out");
    }

    fn g(f: &Fixture, id: &str) -> Group {
        f.store.sdrs_group(id).expect("read").expect("group")
    }

    fn i(f: &Fixture, id: &str) -> Instance {
        f.store.sdrs_instance(id).expect("read").expect("instance")
    }

    fn stop(f: &Fixture, ids: &[&str], job: &str) {
        job_of(sdrs(
            f,
            SdrsCommand::StopServers {
                project: P.into(),
                servers: ids.iter().map(|s| s.to_string()).collect(),
                job_id: job.into(),
            },
        ));
    }

    fn action(f: &Fixture, a: GroupAction, job: &str) -> CommandResult {
        sdrs(
            f,
            SdrsCommand::GroupAction {
                id: "g1".into(),
                project: P.into(),
                action: a,
                job_id: job.into(),
            },
        )
    }

    /// A protected group g1 with instances pi1 (server s1, 2 disks) and pi2 (s2).
    fn protected_group() -> Fixture {
        let f = setup();
        server(&f, "s1", "h1", 2);
        server(&f, "s2", "h1", 1);
        group(&f, "g1");
        instance(&f, "pi1", "g1", "s1");
        instance(&f, "pi2", "g1", "s2");
        run(&f, None);
        let j = job_of(action(&f, GroupAction::Start, "start1"));
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert_eq!(g(&f, "g1").status, Status::Protected);
        f
    }

    #[test]
    fn sdrs_pg_create_and_rename_and_refusals() {
        let f = setup();
        let j = group(&f, "g1");
        // SDRS-PG-CREATE: nothing for agents to do; the job ends at once.
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert_eq!(
            f.job(&j)
                .entities
                .get("server_group_id")
                .map(String::as_str),
            Some("g1")
        );
        let gr = g(&f, "g1");
        assert_eq!(
            (gr.status, gr.station),
            (Status::Available, Station::Source)
        );
        let mut bad = NewGroup {
            id: "g2".into(),
            project: P.into(),
            name: "x".into(),
            description: None,
            source_az: "az1".into(),
            target_az: "az1".into(),
            domain_id: "d".into(),
            domain_name: "d".into(),
            source_vpc_id: "v".into(),
        };
        let create = |b: &NewGroup| {
            sdrs(
                &f,
                SdrsCommand::CreateGroup {
                    group: Box::new(b.clone()),
                    job_id: "jx".into(),
                },
            )
        };
        assert_eq!(code(create(&bad)), "SDRS.0203");
        bad.target_az = "nowhere".into();
        assert_eq!(code(create(&bad)), "SDRS.0203");
        // SDRS-PG-RENAME, another project's group is missing (SDRS.1013).
        let r = sdrs(
            &f,
            SdrsCommand::RenameGroup {
                id: "g1".into(),
                project: P.into(),
                name: "new".into(),
            },
        );
        assert!(r.is_ok());
        assert_eq!(g(&f, "g1").name, "new");
        let r = sdrs(
            &f,
            SdrsCommand::RenameGroup {
                id: "g1".into(),
                project: "other".into(),
                name: "n".into(),
            },
        );
        assert_eq!(code(r), "SDRS.1013");
        assert!(validate_name("name", "a b").is_err());
        assert!(validate_name("name", "保护组-1").is_ok());
        assert!(validate_name("name", &"x".repeat(65)).is_err());
        assert!(validate_description("a<b").is_err());
    }

    #[test]
    fn sdrs_pi_create_composes_pairs_and_dr_server() {
        let f = setup();
        server(&f, "s1", "h1", 2);
        group(&f, "g1");
        let j = instance(&f, "pi1", "g1", "s1");
        let job = f.job(&j);
        assert_eq!(job.job_type, JOB_CREATE_INSTANCE);
        assert_eq!(
            job.entities.get("native_server_id").map(String::as_str),
            Some("dr-pi1")
        );
        // CreateTarget + full Sync per disk, on the DR host.
        let tasks = f.store.job_tasks(&j).expect("tasks");
        assert_eq!(tasks.len(), 4);
        assert!(tasks
            .iter()
            .all(|t| t.placement_host.as_deref() == Some("h2")));
        let pi = i(&f, "pi1");
        assert_eq!(pi.status, Status::Creating);
        assert_eq!(pi.attachments.len(), 2);
        assert_eq!(pi.attachments[0].device, "/dev/vda");
        let dr = f
            .store
            .get_server("dr-pi1")
            .expect("read")
            .expect("dr server");
        assert_eq!((dr.name.as_str(), dr.host.as_str()), ("name-s1", "h2"));
        assert_eq!(dr.status, ServerStatus::Shutoff);
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert_eq!(i(&f, "pi1").status, Status::Available);
        let sp = f.store.sdrs_pair("pi1-pair0").expect("read").expect("pair");
        assert_eq!(sp.status, Status::Available);
        let rp = f.store.get_pair("pi1-pair0").expect("read").expect("pair");
        assert_eq!(rp.state, PairState::Active);
        assert!(!rp.enabled, "an available group does not replicate");
    }

    #[test]
    fn sdrs_pi_create_refusals_name_their_code() {
        let f = setup();
        server(&f, "s1", "h1", 1);
        server(&f, "s0", "h1", 0);
        server(&f, "s9", "h2", 1);
        group(&f, "g1");
        let try_create = |n: NewInstance| code(sdrs(&f, SdrsCommand::CreateInstance(Box::new(n))));
        assert_eq!(try_create(new_instance("x", "nope", "s1")), "SDRS.1013");
        assert_eq!(try_create(new_instance("x", "g1", "nope")), "SDRS.1326");
        assert_eq!(try_create(new_instance("x", "g1", "s9")), "SDRS.1303");
        assert_eq!(try_create(new_instance("x", "g1", "s0")), "SDRS.1339");
        let mut n = new_instance("x", "g1", "s1");
        n.primary_ip_address = Some("10.0.0.1".into());
        assert_eq!(try_create(n), "SDRS.1380");
        let mut n = new_instance("x", "g1", "s1");
        n.tenancy = Some("weird".into());
        assert_eq!(try_create(n), "SDRS.0228");
        let mut n = new_instance("x", "g1", "s1");
        n.dedicated_host_id = Some("h2".into());
        assert_eq!(try_create(n), "SDRS.1371");
        let mut n = new_instance("x", "g1", "s1");
        n.tenancy = Some("dedicated".into());
        n.dedicated_host_id = Some("h3".into());
        assert_eq!(try_create(n), "SDRS.1372", "h3 is not in the DR zone");
        // A shared disk: another server with the same volume.
        let mut shared = f.store.get_server("s1").expect("read").expect("s1");
        shared.id = "s1-twin".into();
        f.inv(InventoryCommand::RegisterWorkloads {
            workloads: vec![Workload::Server(shared)],
        })
        .expect("twin");
        assert_eq!(try_create(new_instance("x", "g1", "s1")), "SDRS.0201");
        f.inv(InventoryCommand::DeleteWorkload {
            kind: inventory::WorkloadKind::Server,
            id: "s1-twin".into(),
        })
        .expect("delete twin");
        instance(&f, "pi1", "g1", "s1");
        assert_eq!(try_create(new_instance("pi2", "g1", "s1")), "SDRS.1305");
        assert_eq!(try_create(new_instance("pi2", "g1", "dr-pi1")), "SDRS.1305");
        // The group cannot be deleted while it has instances.
        let r = sdrs(
            &f,
            SdrsCommand::DeleteGroup {
                id: "g1".into(),
                project: P.into(),
                job_id: "jd".into(),
            },
        );
        assert_eq!(code(r), "SDRS.1001");
    }

    #[test]
    fn sdrs_pg_start_reverse_and_failback() {
        let f = protected_group();
        for pi in ["pi1", "pi2"] {
            assert_eq!(i(&f, pi).status, Status::Protected);
        }
        assert!(
            f.store
                .get_pair("pi1-pair0")
                .expect("r")
                .expect("p")
                .enabled
        );
        // SDRS-PG-REVERSE needs the production servers stopped (SDRS.1319).
        assert_eq!(
            code(action(&f, GroupAction::Reverse(Station::Target), "rev1")),
            "SDRS.1319"
        );
        stop(&f, &["s1", "s2"], "stop1");
        assert_eq!(
            code(action(&f, GroupAction::Reverse(Station::Source), "rev1")),
            "SDRS.1002"
        );
        let j = job_of(action(&f, GroupAction::Reverse(Station::Target), "rev1"));
        let job = f.job(&j);
        assert_eq!(job.sub_jobs.len(), 2);
        assert_eq!(g(&f, "g1").status, Status::Reversing);
        assert_eq!(i(&f, "pi1").status, Status::Reversing);
        // pi1's sub-job: final Sync, Fence, Promote for each of its two pairs.
        let sub = f.store.get_job(&job.sub_jobs[0]).expect("r").expect("sub");
        let kinds: Vec<&str> = f
            .store
            .job_tasks(&sub.id)
            .expect("t")
            .iter()
            .map(|t| t.kind.name())
            .collect::<Vec<_>>()
            .into_iter()
            .collect();
        assert_eq!(kinds.len(), 6);
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        let gr = g(&f, "g1");
        assert_eq!(
            (gr.status, gr.station),
            (Status::Protected, Station::Target)
        );
        assert_eq!(i(&f, "pi1").station, Station::Target);
        let rp = f.store.get_pair("pi1-pair0").expect("r").expect("p");
        assert_eq!(rp.source.host, "h2", "the DR copy is the writable one now");
        assert_eq!(rp.state, PairState::Active);
        // Fail back: the servers on the target side must be stopped (they are: DR servers).
        let j = job_of(action(&f, GroupAction::Reverse(Station::Source), "rev2"));
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert_eq!(g(&f, "g1").station, Station::Source);
        assert_eq!(
            f.store
                .get_pair("pi1-pair0")
                .expect("r")
                .expect("p")
                .source
                .host,
            "h1"
        );
    }

    #[test]
    fn sdrs_pg_failover_and_reprotect() {
        let f = protected_group();
        let j = job_of(action(&f, GroupAction::Failover, "fo1"));
        assert_eq!(g(&f, "g1").status, Status::FailingOver);
        let job = f.job(&j);
        assert!(job.entities.contains_key("recovery_point_ms"));
        let tasks = f.store.job_tasks(&job.sub_jobs[0]).expect("t");
        assert!(tasks.iter().all(|t| t.kind.name() == "promote"));
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        let gr = g(&f, "g1");
        assert_eq!(
            (gr.status, gr.station),
            (Status::FailedOver, Station::Target)
        );
        assert_eq!(i(&f, "pi1").status, Status::FailedOver);
        let rp = f.store.get_pair("pi1-pair0").expect("r").expect("p");
        assert_eq!(rp.state, PairState::FailedOver);
        // Re-protect needs the servers at the (new) DR site stopped (SDRS.1342).
        assert_eq!(code(action(&f, GroupAction::Start, "rp1")), "SDRS.1342");
        stop(&f, &["s1", "s2"], "stop1");
        let j = job_of(action(&f, GroupAction::Start, "rp1"));
        assert_eq!(f.job(&j).job_type, "reprotectProtectionGroupNoCG");
        assert_eq!(g(&f, "g1").status, Status::Reprotecting);
        run(&f, None);
        let gr = g(&f, "g1");
        assert_eq!(
            (gr.status, gr.station),
            (Status::Protected, Station::Target)
        );
        assert_eq!(
            f.store.get_pair("pi1-pair0").expect("r").expect("p").state,
            PairState::Active
        );
        // Stop protection: no agent work, pairs no longer replicate.
        let j = job_of(action(&f, GroupAction::Stop, "st1"));
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert_eq!(g(&f, "g1").status, Status::Available);
        assert!(
            !f.store
                .get_pair("pi1-pair0")
                .expect("r")
                .expect("p")
                .enabled
        );
    }

    #[test]
    fn sdrs_failed_failover_is_retried_once_per_instance() {
        let f = protected_group();
        // pi1 has two pairs; fail pi1's promotions only after pi2 succeeded.
        let j = job_of(action(&f, GroupAction::Failover, "fo1"));
        let job = f.job(&j);
        let t2 = f.store.job_tasks(&job.sub_jobs[1]).expect("t");
        for t in &t2 {
            let tok = f.assign_ok(&t.id, t.placement_host.as_deref().unwrap_or("h2"), 1);
            f.succeed(&t.id, tok).expect("ok");
        }
        assert_eq!(i(&f, "pi2").status, Status::FailedOver);
        run(&f, Some("promote"));
        assert_eq!(f.job(&j).status, JobStatus::Fail);
        assert_eq!(g(&f, "g1").status, Status::ErrorFailingOver);
        assert_eq!(i(&f, "pi1").status, Status::ErrorFailingOver);
        assert_eq!(i(&f, "pi2").status, Status::FailedOver);
        assert_eq!(i(&f, "pi2").station, Station::Target);
        // Retry: pi2 has nothing to do (empty sub-job), pi1 is promoted.
        let j = job_of(action(&f, GroupAction::Failover, "fo2"));
        let job = f.job(&j);
        let sub2 = f.job(&job.sub_jobs[1]);
        assert!(sub2.tasks.is_empty());
        assert_eq!(sub2.status, JobStatus::Success);
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert_eq!(g(&f, "g1").status, Status::FailedOver);
        for pi in ["pi1", "pi2"] {
            assert_eq!(i(&f, pi).station, Station::Target);
        }
        let promoted: usize = f
            .store
            .list_jobs(&Default::default(), None, 100)
            .expect("jobs")
            .iter()
            .flat_map(|j| f.store.job_tasks(&j.id).expect("t"))
            .filter(|t| t.kind.name() == "promote" && t.status == TaskStatus::Succeeded)
            .filter(|t| t.id.contains("pi2-pair0"))
            .count();
        assert_eq!(promoted, 1, "pi2 was failed over exactly once");
    }

    #[test]
    fn sdrs_pi_delete_and_pairs_attach_detach() {
        let f = setup();
        server(&f, "s1", "h1", 1);
        server(&f, "s2", "h1", 2);
        group(&f, "g1");
        instance(&f, "pi1", "g1", "s1");
        run(&f, None);
        // SDRS-RP-CREATE on a disk of another server, then attach it to pi1.
        let create = |id: &str, vol: &str| {
            sdrs(
                &f,
                SdrsCommand::CreatePair(Box::new(NewSdrsPair {
                    id: id.into(),
                    project: P.into(),
                    group_id: "g1".into(),
                    volume_id: vol.into(),
                    dr_volume_id: format!("{id}-dr"),
                    name: "rp".into(),
                    description: None,
                    job_id: format!("job-{id}"),
                })),
            )
        };
        assert_eq!(code(create("rpx", "s1-d0")), "SDRS.1811");
        assert_eq!(code(create("rpx", "nope")), "SDRS.0211");
        let j = job_of(create("rp1", "s2-d1"));
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert_eq!(
            f.store.sdrs_pair("rp1").expect("r").expect("p").status,
            Status::Available
        );
        let attach = |dev: &str, job: &str| {
            sdrs(
                &f,
                SdrsCommand::AttachPair {
                    instance: "pi1".into(),
                    project: P.into(),
                    pair: "rp1".into(),
                    device: dev.into(),
                    job_id: job.into(),
                },
            )
        };
        assert_eq!(code(attach("/dev/vda", "a1")), "SDRS.1603");
        job_of(attach("/dev/sdb", "a1"));
        assert_eq!(i(&f, "pi1").attachments[1].device, "/dev/vdb");
        assert_eq!(code(attach("/dev/vdc", "a2")), "SDRS.1603");
        let dr = f.store.get_server("dr-pi1").expect("r").expect("dr");
        assert_eq!(dr.disks.len(), 2);
        let r = sdrs(
            &f,
            SdrsCommand::DeletePair {
                id: "rp1".into(),
                project: P.into(),
                group_id: None,
                delete_target_volume: false,
                job_id: "d1".into(),
            },
        );
        assert_eq!(code(r), "SDRS.1605");
        job_of(sdrs(
            &f,
            SdrsCommand::DetachPair {
                instance: "pi1".into(),
                project: P.into(),
                pair: "rp1".into(),
                job_id: "dt1".into(),
            },
        ));
        let r = sdrs(
            &f,
            SdrsCommand::DetachPair {
                instance: "pi1".into(),
                project: P.into(),
                pair: "rp1".into(),
                job_id: "dt2".into(),
            },
        );
        assert_eq!(code(r), "SDRS.1604");
        let j = job_of(sdrs(
            &f,
            SdrsCommand::DeletePair {
                id: "rp1".into(),
                project: P.into(),
                group_id: None,
                delete_target_volume: true,
                job_id: "d1".into(),
            },
        ));
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert!(f.store.sdrs_pair("rp1").expect("r").is_none());
        assert!(f.store.get_pair("rp1").expect("r").is_none());
        // SDRS-PI-DELETE with the DR server.
        let j = job_of(sdrs(
            &f,
            SdrsCommand::DeleteInstance {
                id: "pi1".into(),
                project: P.into(),
                delete_target_server: true,
                job_id: "del1".into(),
            },
        ));
        assert_eq!(i(&f, "pi1").status, Status::Deleting);
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert!(f.store.sdrs_instance("pi1").expect("r").is_none());
        assert!(f.store.get_server("dr-pi1").expect("r").is_none());
        assert!(f.store.get_pair("pi1-pair0").expect("r").is_none());
        assert!(f.store.sdrs_instance_of_server("s1").expect("r").is_none());
        // The group is empty now and can go.
        let j = job_of(sdrs(
            &f,
            SdrsCommand::DeleteGroup {
                id: "g1".into(),
                project: P.into(),
                job_id: "dg".into(),
            },
        ));
        assert_eq!(f.job(&j).status, JobStatus::Success);
        assert!(f.store.sdrs_group("g1").expect("r").is_none());
    }

    #[test]
    fn ecs_migrate_and_stop() {
        let f = setup();
        server(&f, "s1", "h1", 2);
        let mig = |deh: Option<&str>, job: &str| {
            sdrs(
                &f,
                SdrsCommand::Migrate {
                    server: "s1".into(),
                    project: P.into(),
                    dedicated_host: deh.map(str::to_string),
                    job_id: job.into(),
                },
            )
        };
        assert_eq!(code(mig(Some("h3"), "m1")), "Ecs.0100", "not stopped");
        let r = sdrs(
            &f,
            SdrsCommand::StopServers {
                project: P.into(),
                servers: vec!["nope".into()],
                job_id: "st0".into(),
            },
        );
        assert_eq!(code(r), "Ecs.0114");
        stop(&f, &["s1"], "st1");
        assert_eq!(f.job("st1").status, JobStatus::Success);
        assert_eq!(f.job("st1").sub_jobs.len(), 1);
        assert_eq!(code(mig(None, "m1")), "Ecs.0000", "not on a DeH");
        assert_eq!(code(mig(Some("h2"), "m1")), "Ecs.0000", "DeH in another AZ");
        let j = job_of(mig(Some("h3"), "m1"));
        let srv = f.store.get_server("s1").expect("r").expect("s1");
        assert_eq!(srv.status, ServerStatus::Migrating);
        let tasks = f.store.job_tasks(&j).expect("t");
        assert_eq!(tasks[0].kind.name(), "migrate");
        assert_eq!(tasks[0].placement_host.as_deref(), Some("h3"));
        assert_eq!(tasks.len(), 3, "migrate, then drop each old disk");
        assert_eq!(code(mig(Some("h3"), "m2")), "Ecs.0100", "busy");
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        let srv = f.store.get_server("s1").expect("r").expect("s1");
        assert_eq!(
            (srv.host.as_str(), srv.status),
            ("h3", ServerStatus::Shutoff)
        );
        assert_eq!(
            f.store
                .ecs_server("s1")
                .expect("r")
                .dedicated_host
                .as_deref(),
            Some("h3")
        );
        assert_eq!(code(mig(Some("h3"), "m2")), "Ecs.0221");
        // Back to the public pool: another host of the zone.
        let j = job_of(mig(None, "m3"));
        run(&f, None);
        assert_eq!(f.job(&j).status, JobStatus::Success);
        let srv = f.store.get_server("s1").expect("r").expect("s1");
        assert_eq!(srv.host, "h1");
        assert_eq!(f.store.ecs_server("s1").expect("r").dedicated_host, None);
    }

    #[test]
    fn refusal_codes_parse() {
        let e = refuse("SDRS.1002", "busy");
        assert_eq!(refusal_code(&e), Some(("SDRS.1002", "busy")));
        assert_eq!(
            refusal_code(&CommandError::Conflict("other thing".into())),
            None
        );
        assert_eq!(
            sub_job_id("0123456789abcdef0123456789abcdef", 3),
            "0123456789abcdef0123456700000003"
        );
    }
}
